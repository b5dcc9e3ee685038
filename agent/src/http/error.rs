//! The one place where a request's failure becomes an HTTP response.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;

use crate::credentials::UpstreamError;
use crate::credentials::cache::FetchError;
use crate::token::TokenError;
use crate::validation::ValidationError;

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
    /// Refused by local validation (the cluster's signing keys), before any upstream call.
    #[error("{0}")]
    Validation(#[from] ValidationError),
    #[error("token binding: {0}")]
    Binding(String),
    /// The caller's container is not among those its pod lists (per-container scoping).
    #[error("container scoping: {0}")]
    ContainerNotAllowed(String),
    /// The pod lists containers, and the caller's is not in the pod's status yet.
    #[error(
        "container scoping: the caller's container is not in the pod's status yet; retry shortly"
    )]
    ContainerPending,
    #[error("{0}")]
    Upstream(Arc<UpstreamError>),
    /// The token's call to EKS Auth could not be made before the request's deadline (EKS Auth's
    /// pace): credentials are expected in `retry_after`. Shows EKS Auth's throttling when it
    /// throttled the call.
    #[error("{}", queued_reason(*retry_after, throttled.as_deref()))]
    Queued {
        retry_after: Duration,
        throttled: Option<Arc<UpstreamError>>,
    },
}

fn queued_reason(retry_after: Duration, throttled: Option<&UpstreamError>) -> String {
    match throttled {
        Some(e) => e.to_string(),
        None => format!(
            "EKS Auth is busy: this token's call is queued behind other pods' first requests; retry in {} s",
            whole_seconds(retry_after)
        ),
    }
}

/// `Retry-After` seconds: rounded up, at least 1.
fn whole_seconds(d: Duration) -> u64 {
    (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
}

impl From<FetchError> for RequestError {
    fn from(e: FetchError) -> Self {
        match e {
            FetchError::Upstream(e) => RequestError::Upstream(e),
            FetchError::Queued {
                retry_after,
                throttled,
            } => RequestError::Queued {
                retry_after,
                throttled,
            },
        }
    }
}

impl RequestError {
    pub fn status(&self) -> StatusCode {
        match self {
            RequestError::NotFound => StatusCode::NOT_FOUND,
            RequestError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            RequestError::ForbiddenHost
            | RequestError::Binding(_)
            | RequestError::ContainerNotAllowed(_) => StatusCode::FORBIDDEN,
            // The pod view learns the container's name within moments of its start.
            RequestError::ContainerPending => StatusCode::SERVICE_UNAVAILABLE,
            RequestError::Throttled
            | RequestError::PodThrottled { .. }
            | RequestError::Queued { .. } => StatusCode::TOO_MANY_REQUESTS,
            RequestError::Token(_) => StatusCode::BAD_REQUEST,
            // Validation that is on but has no key: the agent's fault, not the token's.
            RequestError::Validation(ValidationError::NoKeys) => StatusCode::SERVICE_UNAVAILABLE,
            RequestError::Validation(_) => StatusCode::BAD_REQUEST,
            // EKS Auth's status when it is an error's. Anything else (a redirect or a 1xx from a
            // proxy at a custom endpoint) would not read as a failure: 502.
            RequestError::Upstream(e) => StatusCode::from_u16(e.status)
                .ok()
                .filter(|s| s.is_client_error() || s.is_server_error())
                .unwrap_or(StatusCode::BAD_GATEWAY),
        }
    }

    /// `error` when EKS Auth failed; `denied` when the agent refused the request itself.
    pub fn outcome(&self) -> &'static str {
        match self {
            RequestError::Upstream(_) | RequestError::Queued { .. } => "error",
            _ => "denied",
        }
    }

    /// The kind of refusal, for rate-limited logging.
    pub fn kind(&self) -> RefusalKind {
        match self {
            RequestError::NotFound => RefusalKind::NotFound,
            RequestError::MethodNotAllowed => RefusalKind::MethodNotAllowed,
            RequestError::ForbiddenHost => RefusalKind::ForbiddenHost,
            RequestError::Throttled => RefusalKind::Throttled,
            RequestError::PodThrottled { .. } => RefusalKind::PodThrottled,
            RequestError::Token(_) => RefusalKind::Token,
            RequestError::Validation(_) => RefusalKind::Validation,
            RequestError::Binding(_) => RefusalKind::Binding,
            RequestError::ContainerNotAllowed(_) | RequestError::ContainerPending => {
                RefusalKind::ContainerScope
            }
            RequestError::Upstream(_) => RefusalKind::Upstream,
            RequestError::Queued { .. } => RefusalKind::Queued,
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
            RequestError::Throttled | RequestError::ContainerPending => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            RequestError::PodThrottled { retry_after }
            | RequestError::Queued { retry_after, .. } => {
                headers.insert(
                    header::RETRY_AFTER,
                    HeaderValue::from(whole_seconds(*retry_after)),
                );
            }
            RequestError::Upstream(e) if e.is_throttling() => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        response
    }
}

/// The kinds of refusal, each logged at most once per period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalKind {
    NotFound,
    MethodNotAllowed,
    ForbiddenHost,
    Throttled,
    PodThrottled,
    Token,
    Validation,
    Binding,
    ContainerScope,
    Upstream,
    Queued,
}

const REFUSAL_KINDS: usize = RefusalKind::Queued as usize + 1;

/// Refused requests come in bursts (a flooding pod, a storm of bad tokens, EKS Auth throttling):
/// one log line each would flood the log when it matters least. This lets one line per kind of
/// refusal through per period, and says how many were left out since.
pub struct RefusalLog {
    period: Duration,
    kinds: Mutex<[KindWindow; REFUSAL_KINDS]>,
}

#[derive(Clone, Copy, Default)]
struct KindWindow {
    logged_at: Option<tokio::time::Instant>,
    suppressed: u64,
}

impl RefusalLog {
    pub fn new(period: Duration) -> Self {
        RefusalLog {
            period,
            kinds: Mutex::new([KindWindow::default(); REFUSAL_KINDS]),
        }
    }

    /// Whether to log this refusal now; if so, how many of its kind were not logged since the
    /// last line.
    pub fn sample(&self, kind: RefusalKind) -> Option<u64> {
        let now = tokio::time::Instant::now();
        let mut kinds = self.kinds.lock().unwrap_or_else(PoisonError::into_inner);
        let window = &mut kinds[kind as usize];
        match window.logged_at {
            Some(at) if now.saturating_duration_since(at) < self.period => {
                window.suppressed += 1;
                None
            }
            _ => {
                window.logged_at = Some(now);
                Some(std::mem::take(&mut window.suppressed))
            }
        }
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
    fn an_upstream_error_is_always_answered_with_an_error_status() {
        // Found by the `upstream_reply` fuzz target: a 302 from EKS Auth's endpoint was answered
        // 302 (and a 200 or 101 would have been answered as such).
        for (upstream, answered) in [(302, 502), (200, 502), (101, 502), (999, 502), (404, 404)] {
            let e = RequestError::Upstream(Arc::new(UpstreamError::new(upstream, "", "")));
            assert_eq!(e.status().as_u16(), answered, "{upstream}");
        }
    }

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

    #[test]
    fn queued_requests_get_429_with_retry_after_and_the_throttling_when_there_was_one() {
        let queued = RequestError::from(FetchError::Queued {
            retry_after: Duration::from_millis(2300),
            throttled: None,
        });
        let r = queued.to_response();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[header::RETRY_AFTER], "3");
        assert!(queued.to_string().contains("retry in 3 s"), "{queued}");
        assert_eq!(queued.outcome(), "error");
        let throttled = RequestError::from(FetchError::Queued {
            retry_after: Duration::ZERO,
            throttled: Some(Arc::new(UpstreamError::new(
                429,
                "ThrottlingException",
                "Rate exceeded",
            ))),
        });
        assert_eq!(
            throttled.to_string(),
            "(ThrottlingException): Rate exceeded"
        );
        assert_eq!(throttled.to_response().headers()[header::RETRY_AFTER], "1");
        let upstream = RequestError::Upstream(Arc::new(UpstreamError::new(
            429,
            "ThrottlingException",
            "Rate exceeded",
        )));
        assert_eq!(upstream.to_response().headers()[header::RETRY_AFTER], "1");
    }

    #[tokio::test(start_paused = true)]
    async fn refusal_logs_are_rate_limited_per_kind_and_count_what_they_left_out() {
        let log = RefusalLog::new(Duration::from_secs(10));
        assert_eq!(log.sample(RefusalKind::Token), Some(0));
        for _ in 0..5 {
            assert_eq!(log.sample(RefusalKind::Token), None);
        }
        // Another kind has its own window.
        assert_eq!(log.sample(RefusalKind::Binding), Some(0));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(log.sample(RefusalKind::Token), Some(5));
        assert_eq!(log.sample(RefusalKind::Token), None);
    }
}
