//! What a token's local check found, why a token was refused, and the counters of both (resolved
//! once, so the request path only increments).

use prometheus::{IntCounter, IntGauge};

use super::keys::SignatureError;
use crate::metrics::Metrics;
use crate::token::TokenError;

/// How a token's signature was checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verification {
    /// It verifies with one of the cluster's keys.
    Signature,
    /// Not checked (validation off, or no key to check it with): EKS Auth will.
    Unchecked,
}

/// Why a token was refused by local validation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    #[error("{0}")]
    Signature(#[from] SignatureError),
    #[error("the token's key (`kid`) is not one of the cluster's signing keys")]
    UnknownKey,
    #[error("{0}")]
    Claims(TokenError),
    #[error("token validation is on, but the cluster's signing keys are not available")]
    NoKeys,
}

/// The reasons a token fails local checks, as `pod_identity_local_validation_failures_total`
/// labels them (the audience and claims checks included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Header,
    NoKeyId,
    Algorithm,
    Signature,
    UnknownKey,
    Claims,
    Audience,
    NoKeys,
}

impl Reason {
    pub const ALL: [Reason; 8] = [
        Reason::Header,
        Reason::NoKeyId,
        Reason::Algorithm,
        Reason::Signature,
        Reason::UnknownKey,
        Reason::Claims,
        Reason::Audience,
        Reason::NoKeys,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Header => "header",
            Reason::NoKeyId => "no_kid",
            Reason::Algorithm => "algorithm",
            Reason::Signature => "signature",
            Reason::UnknownKey => "unknown_key",
            Reason::Claims => "claims",
            Reason::Audience => "audience",
            Reason::NoKeys => "no_keys",
        }
    }
}

impl ValidationError {
    pub fn reason(&self) -> Reason {
        match self {
            ValidationError::Signature(SignatureError::Header) => Reason::Header,
            ValidationError::Signature(SignatureError::NoKeyId) => Reason::NoKeyId,
            ValidationError::Signature(SignatureError::Algorithm) => Reason::Algorithm,
            ValidationError::Signature(SignatureError::Signature) => Reason::Signature,
            ValidationError::UnknownKey => Reason::UnknownKey,
            ValidationError::Claims(_) => Reason::Claims,
            ValidationError::NoKeys => Reason::NoKeys,
        }
    }
}

/// The counters, resolved once.
pub(super) struct Counters {
    pub(super) success: IntCounter,
    pub(super) failure: IntCounter,
    pub(super) skipped: IntCounter,
    pub(super) reasons: [IntCounter; Reason::ALL.len()],
    pub(super) keys: IntGauge,
    pub(super) fetched: IntCounter,
    pub(super) fetch_failed: IntCounter,
}

impl Counters {
    pub(super) fn new(metrics: &Metrics) -> Self {
        let result = |r: &str| metrics.local_validation.with_label_values(&[r]);
        let fetch = |r: &str| metrics.signing_key_fetches.with_label_values(&[r]);
        Counters {
            success: result("success"),
            failure: result("failure"),
            skipped: result("skipped"),
            reasons: Reason::ALL.map(|r| {
                metrics
                    .local_validation_failures
                    .with_label_values(&[r.as_str()])
            }),
            keys: metrics.signing_keys.clone(),
            fetched: fetch("ok"),
            fetch_failed: fetch("error"),
        }
    }
}
