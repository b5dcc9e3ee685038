//! Health, readiness and metrics endpoints.
//!
//! Answered in-process from state the listeners keep: the original agent probes itself over
//! HTTP, and that self-request times out under load. A scrape only renders: what comes from the
//! kernel is brought up to date in the background (see [`crate::server`]).

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;

use crate::http::error::text;
use crate::listener::Readiness;
use crate::metrics::Metrics;

/// What the probe and metrics ports serve.
#[derive(Clone)]
pub struct Probes {
    pub readiness: Readiness,
    /// `None` on the probe port, which serves only `/healthz` and `/readyz`.
    pub metrics: Option<Metrics>,
}

impl Probes {
    pub fn handle<B>(&self, req: &Request<B>) -> Response<Full<Bytes>> {
        if req.method() != Method::GET {
            return text(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed: use GET".into(),
            );
        }
        match req.uri().path() {
            "/healthz" => text(StatusCode::OK, "ok".into()),
            "/readyz" if self.readiness.is_ready() => text(StatusCode::OK, "ready".into()),
            "/readyz" => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "credential listeners are not accepting".into(),
            ),
            "/metrics" => match &self.metrics {
                Some(metrics) => {
                    let mut response = Response::new(Full::new(Bytes::from(metrics.render())));
                    response.headers_mut().insert(
                        header::CONTENT_TYPE,
                        http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                    );
                    response
                }
                None => text(StatusCode::NOT_FOUND, "not found".into()),
            },
            _ => text(StatusCode::NOT_FOUND, "not found".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::listener::Accepting;

    fn get(probes: &Probes, path: &str) -> StatusCode {
        probes
            .handle(&Request::get(path).body(()).unwrap())
            .status()
    }

    #[test]
    fn readiness_follows_the_listeners() {
        let accepting = Accepting::default();
        let probes = Probes {
            readiness: Readiness::new(vec![accepting.clone()]),
            metrics: None,
        };
        assert_eq!(get(&probes, "/healthz"), StatusCode::OK);
        assert_eq!(get(&probes, "/readyz"), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(get(&probes, "/metrics"), StatusCode::NOT_FOUND);
        accepting.set(true);
        assert_eq!(get(&probes, "/readyz"), StatusCode::OK);
        let none = Probes {
            readiness: Readiness::new(vec![]),
            metrics: None,
        };
        assert_eq!(get(&none, "/readyz"), StatusCode::SERVICE_UNAVAILABLE);
    }
}
