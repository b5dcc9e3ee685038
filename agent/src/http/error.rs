//! The one place where a request's failure becomes an HTTP response.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;

use crate::credentials::UpstreamError;
use crate::token::TokenError;

/// Why a credential request was not answered with credentials.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RequestError {
    #[error("not found")]
    NotFound,
    #[error("method not allowed: use GET")]
    MethodNotAllowed,
    #[error("the Host header is not one of the agent's addresses")]
    ForbiddenHost,
    #[error("too many requests to the agent")]
    Throttled,
    #[error("too many requests from this pod")]
    PodThrottled { retry_after: Duration },
    #[error("{0}")]
    Token(#[from] TokenError),
    #[error("token binding: {0}")]
    Binding(String),
    #[error("{0}")]
    Upstream(Arc<UpstreamError>),
}

impl RequestError {
    pub fn status(&self) -> StatusCode {
        match self {
            RequestError::NotFound => StatusCode::NOT_FOUND,
            RequestError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            RequestError::ForbiddenHost | RequestError::Binding(_) => StatusCode::FORBIDDEN,
            RequestError::Throttled | RequestError::PodThrottled { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            RequestError::Token(_) => StatusCode::BAD_REQUEST,
            RequestError::Upstream(e) => {
                StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_GATEWAY)
            }
        }
    }

    /// `error` when EKS Auth failed; `denied` when the agent refused the request itself.
    pub fn outcome(&self) -> &'static str {
        match self {
            RequestError::Upstream(_) => "error",
            _ => "denied",
        }
    }

    /// The plain-text response: every SDK reads it, and it names the reason.
    pub fn to_response(&self) -> Response<Full<Bytes>> {
        let mut response = text(self.status(), self.to_string());
        let headers = response.headers_mut();
        match self {
            RequestError::MethodNotAllowed => {
                headers.insert(header::ALLOW, HeaderValue::from_static("GET"));
            }
            RequestError::Throttled => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            RequestError::PodThrottled { retry_after } => {
                let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
                headers.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
            }
            _ => {}
        }
        response
    }
}

/// A plain-text response.
pub fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// The success response: the credentials' pre-rendered JSON.
pub fn credentials(body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_headers() {
        let upstream = RequestError::Upstream(Arc::new(UpstreamError::new(
            404,
            "ResourceNotFoundException",
            "no association",
        )));
        assert_eq!(upstream.status(), StatusCode::NOT_FOUND);
        assert_eq!(
            upstream.to_string(),
            "(ResourceNotFoundException): no association"
        );
        assert_eq!(upstream.outcome(), "error");
        let r = RequestError::MethodNotAllowed.to_response();
        assert_eq!(r.headers()[header::ALLOW], "GET");
        let r = RequestError::PodThrottled {
            retry_after: Duration::from_millis(1500),
        }
        .to_response();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[header::RETRY_AFTER], "2");
        assert_eq!(
            RequestError::Token(TokenError::Expired).status(),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(RequestError::Binding("x".into()).outcome(), "denied");
    }
}
