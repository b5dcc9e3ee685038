//! EKS Auth's replies and errors, to the agent's HTTP answer.
//!
//! Input, as text: the reply's status line (`200`), a line with its `X-Amzn-ErrorType` (empty:
//! none), then its body. Two paths:
//! - the reply is played to the real EKS Auth client (`aws-sdk-eksauth`'s deserialisers, then
//!   the agent's own mapping and checks, `eks_auth.rs`) through a stand-in HTTP client, and the
//!   outcome rendered as the endpoint renders it (`http/error.rs`, the credentials body);
//! - the same status, the second line as an error code and the body as its message go straight
//!   to `UpstreamError` → `RequestError` → response.
//!
//! Checked: nothing panics; credentials only from a 2xx reply that has them (the SDK reads
//! missing members as empty), rendered as the SDKs accept them;
//! an error is always answered with a client or server error status (never 1xx, 2xx or 3xx),
//! plain text `(Code): message`; a code is permanent exactly when EKS Auth documents it so.
#![no_main]

use std::sync::{Arc, LazyLock, Mutex};

use aws_sdk_eksauth::config::{BehaviorVersion, Credentials, Region, retry::RetryConfig};
use aws_smithy_http_client::test_util::infallible_client_fn;
use libfuzzer_sys::fuzz_target;
use pod_identity_agent::credentials::eks_auth::EksAuth;
use pod_identity_agent::credentials::upstream_error::classify;
use pod_identity_agent::credentials::{ErrorClass, Retriever, UpstreamError};
use pod_identity_agent::http::RequestError;
use pod_identity_agent::http::error::credentials;

/// The reply the stand-in HTTP client plays next: status, error type, body.
static REPLY: Mutex<(u16, Option<String>, Vec<u8>)> = Mutex::new((200, None, Vec::new()));

/// One client for every input: building one costs far more than a call.
static CLIENT: LazyLock<(tokio::runtime::Runtime, EksAuth)> = LazyLock::new(|| {
    let http_client = infallible_client_fn(|_request| {
        let (status, error_type, body) = REPLY.lock().unwrap().clone();
        let mut reply = http::Response::builder()
            .status(status)
            .header("content-type", "application/json");
        if let Some(t) = error_type {
            reply = reply.header("x-amzn-errortype", t);
        }
        reply.body(body).unwrap()
    });
    let config = aws_sdk_eksauth::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-west-2"))
        .credentials_provider(Credentials::new("AKIDFUZZ", "fuzz", None, None, "fuzz"))
        .http_client(http_client)
        .retry_config(RetryConfig::disabled())
        .build();
    let client = aws_sdk_eksauth::Client::from_conf(config);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    (rt, EksAuth::from_client(client, "fuzz-cluster".into()))
});

/// The codes EKS Auth documents as permanent for a token.
const PERMANENT: [&str; 6] = [
    "AccessDenied",
    "ExpiredToken",
    "InvalidParameter",
    "InvalidRequest",
    "InvalidToken",
    "ResourceNotFound",
];

fuzz_target!(|data: &[u8]| {
    let mut lines = data.splitn(3, |&b| b == b'\n');
    let (Some(status), Some(error_type)) = (lines.next(), lines.next()) else {
        return;
    };
    let body = lines.next().unwrap_or_default();
    let Some(status) = std::str::from_utf8(status)
        .ok()
        .and_then(|s| s.trim().parse::<u16>().ok())
        .filter(|s| (100..=999).contains(s))
    else {
        return;
    };
    let error_type = String::from_utf8_lossy(error_type).into_owned();

    // Straight from an error to the answer.
    let message = String::from_utf8_lossy(body).into_owned();
    check_error(&UpstreamError::new(status, error_type.clone(), message));
    let bare = error_type.strip_suffix("Exception").unwrap_or(&error_type);
    assert_eq!(
        classify(&error_type) == ErrorClass::Permanent,
        PERMANENT.contains(&bare),
        "{error_type:?}"
    );

    // Through the EKS Auth client. A status or header `http` refuses cannot be on the wire.
    let error_type = (!error_type.is_empty()).then_some(error_type);
    if error_type
        .as_deref()
        .is_some_and(|t| http::HeaderValue::from_str(t).is_err())
        || http::StatusCode::from_u16(status).is_err()
    {
        return;
    }
    *REPLY.lock().unwrap() = (status, error_type, body.to_vec());
    let (rt, eks_auth) = &*CLIENT;
    let result = rt.block_on(eks_auth.fetch("header.payload.signature"));
    match result {
        Ok(issued) => {
            assert!(
                (200..300).contains(&status),
                "credentials from a {status} reply"
            );
            let response = credentials(issued.body.clone());
            assert_eq!(response.status(), 200);
            let v: serde_json::Value = serde_json::from_slice(&issued.body).unwrap();
            for key in ["AccessKeyId", "SecretAccessKey", "Token"] {
                assert!(
                    v[key].as_str().is_some_and(|k| !k.is_empty()),
                    "{key} in {v}"
                );
            }
            assert!(v["AccountId"].is_string(), "{v}");
            let expiration = v["Expiration"].as_str().unwrap();
            assert!(expiration.ends_with('Z'), "{expiration}");
            assert_eq!(
                humantime::parse_rfc3339(expiration).ok(),
                Some(issued.credentials.expiration)
                    .map(|t| t - std::time::Duration::from_nanos(u64::from(nanos(t)))),
                "{expiration}"
            );
        }
        Err(e) => check_error(&e),
    }
});

/// An EKS Auth error becomes a client or server error, `(Code): message` in plain text.
fn check_error(e: &UpstreamError) {
    let err = RequestError::Upstream(Arc::new(e.clone()));
    let status = err.status();
    assert!(
        status.is_client_error() || status.is_server_error(),
        "{e:?} answered {status}"
    );
    assert_eq!(err.outcome(), "error");
    let response = err.to_response();
    assert_eq!(response.status(), status);
    assert_eq!(
        response.headers()[http::header::CONTENT_TYPE],
        "text/plain; charset=utf-8"
    );
    assert_eq!(err.to_string(), format!("({}): {}", e.code, e.message));
}

fn nanos(t: std::time::SystemTime) -> u32 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
}
