//! EKS Auth's errors: which are permanent for a token and which are worth retrying.

use std::fmt;

/// Whether retrying the same token can succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The token will never work (invalid, expired, denied, no association): stop trying it.
    Permanent,
    /// Throttling, server errors, timeouts, unreadable answers: try again later.
    Transient,
}

/// An error from EKS Auth (or from reaching it), with the HTTP status the agent answers with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamError {
    /// The upstream status; for failures without one, the status the agent answers with.
    pub status: u16,
    /// The error code, as EKS Auth names it (`InvalidTokenException`) or the agent (`Timeout`).
    pub code: String,
    pub message: String,
}

impl UpstreamError {
    pub fn new(status: u16, code: impl Into<String>, message: impl Into<String>) -> Self {
        UpstreamError {
            status,
            code: code.into(),
            message: message.into(),
        }
    }

    pub fn class(&self) -> ErrorClass {
        classify(&self.code)
    }

    /// EKS Auth said "too fast": a signal for the pace of calls, not about the token.
    pub fn is_throttling(&self) -> bool {
        self.status == 429 || is_throttling_code(&self.code)
    }

    /// The code as a metric label: one EKS Auth documents, or the agent's own for failures
    /// without one; any other (a garbled answer's, a proxy's) is `UnknownError`, so that answers
    /// cannot grow the label set.
    pub fn code_label(&self) -> &str {
        if LABELLED_CODES.contains(&bare_code(&self.code)) {
            &self.code
        } else {
            "UnknownError"
        }
    }
}

/// EKS Auth's documented error codes (without `Exception`), then the agent's own.
const LABELLED_CODES: [&str; 15] = [
    "AccessDenied",
    "ExpiredToken",
    "InternalServer",
    "InvalidParameter",
    "InvalidRequest",
    "InvalidToken",
    "ResourceNotFound",
    "ServiceUnavailable",
    "Throttling",
    "BadResponse",
    "RequestNotSigned",
    "ShuttingDown",
    "Timeout",
    "UnknownError",
    "Unreachable",
];

/// `(Code): message`, the plain-text body the agent answers with.
impl fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "({}): {}", self.code, self.message)
    }
}

impl std::error::Error for UpstreamError {}

/// An error code without its `Exception` suffix: EKS Auth's codes come with it or without.
pub fn bare_code(code: &str) -> &str {
    code.strip_suffix("Exception").unwrap_or(code)
}

/// `ThrottlingException` (or `Throttling`).
pub fn is_throttling_code(code: &str) -> bool {
    bare_code(code) == "Throttling"
}

/// The codes EKS Auth documents as permanent for a token; everything else is transient.
pub fn classify(code: &str) -> ErrorClass {
    match bare_code(code) {
        "AccessDenied" | "ExpiredToken" | "InvalidParameter" | "InvalidRequest"
        | "InvalidToken" | "ResourceNotFound" => ErrorClass::Permanent,
        _ => ErrorClass::Transient,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permanent_and_transient_codes() {
        for code in [
            "AccessDeniedException",
            "ExpiredTokenException",
            "InvalidParameterException",
            "InvalidRequestException",
            "InvalidTokenException",
            "ResourceNotFoundException",
            "InvalidToken",
        ] {
            assert_eq!(classify(code), ErrorClass::Permanent, "{code}");
        }
        for code in [
            "ThrottlingException",
            "InternalServerException",
            "ServiceUnavailableException",
            "Timeout",
            "Unreachable",
            "BadResponse",
        ] {
            assert_eq!(classify(code), ErrorClass::Transient, "{code}");
        }
    }

    #[test]
    fn throttling_is_recognised() {
        assert!(UpstreamError::new(429, "ThrottlingException", "slow down").is_throttling());
        assert!(UpstreamError::new(400, "Throttling", "slow down").is_throttling());
        assert!(!UpstreamError::new(503, "ServiceUnavailableException", "x").is_throttling());
    }

    #[test]
    fn only_known_codes_are_labels() {
        let label = |code: &str| UpstreamError::new(500, code, "m").code_label().to_owned();
        for code in [
            "InvalidTokenException",
            "ThrottlingException",
            "Throttling",
            "ServiceUnavailableException",
            "Timeout",
            "BadResponse",
        ] {
            assert_eq!(label(code), code);
        }
        // Found by the fault storm: a garbled error type made a label value of its own.
        for code in ["Garbled8af", "", "TimeoutException2", "<html>"] {
            assert_eq!(label(code), "UnknownError", "{code:?}");
        }
    }

    #[test]
    fn display_is_code_then_message() {
        let e = UpstreamError::new(400, "InvalidTokenException", "bad signature");
        assert_eq!(e.to_string(), "(InvalidTokenException): bad signature");
    }
}
