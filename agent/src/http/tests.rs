//! The request path, without sockets: a scripted upstream behind the real cache.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use http_body_util::BodyExt as _;
use serde_json::json;

use super::*;
use crate::attribution::Policy;
use crate::config::{CacheConfig, TokenBinding};
use crate::credentials::{Association, Credentials, UpstreamError};
use crate::token::unsigned_token;

const POD: &str = "0b5e3c2a-1111-4222-8333-444455556666";

#[derive(Default)]
struct Upstream {
    calls: AtomicUsize,
    script: Mutex<VecDeque<UpstreamError>>,
}

impl Retriever for Arc<Upstream> {
    async fn fetch(&self, _token: &str) -> Result<Issued, UpstreamError> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        if let Some(e) = self.script.lock().unwrap().pop_front() {
            return Err(e);
        }
        Ok(Issued::new(
            Credentials {
                access_key_id: format!("ASIA{n}"),
                secret_access_key: "secret".into(),
                session_token: "session".into(),
                account_id: "111122223333".into(),
                expiration: SystemTime::now() + Duration::from_secs(6 * 3600),
            },
            Association {
                namespace: "shop".into(),
                role_arn: "arn:aws:iam::111122223333:role/cart".into(),
                association_id: "a-1".into(),
                ..Association::default()
            },
        ))
    }
}

fn endpoint(
    up: &Arc<Upstream>,
    attribution: Attribution,
    global: RateLimit,
) -> Endpoint<Arc<Upstream>> {
    let metrics = Metrics::new().unwrap();
    let cache = CredentialCache::new(
        up.clone(),
        CacheConfig {
            max_entries: 100,
            ..CacheConfig::default()
        },
        Clock::System,
        metrics.clone(),
        None,
    );
    Endpoint::new(
        cache,
        vec![
            "169.254.170.23".parse().unwrap(),
            "fd00:ec2::23".parse().unwrap(),
        ],
        global,
        Arc::new(attribution),
        None,
        metrics,
        Arc::new(NamespaceLabels::new(10)),
        Clock::System,
    )
}

fn policy(binding: TokenBinding, pod_request: RateLimit) -> Attribution {
    let refused = prometheus::IntCounter::new("refused", "refused").unwrap();
    let policy = Policy {
        binding,
        pod_request,
        ..Policy::off()
    };
    Attribution::new(None, None, policy, refused)
}

fn no_limit() -> RateLimit {
    RateLimit {
        per_second: 0,
        burst: 0,
    }
}

fn token(pod: &str, sa: &str, jti: &str) -> String {
    let now = Clock::System.unix_now();
    unsigned_token(&json!({
        "aud": ["pods.eks.amazonaws.com"], "exp": now + 86400, "iat": now, "nbf": now, "jti": jti,
        "sub": format!("system:serviceaccount:shop:{sa}"),
        "kubernetes.io": {"namespace": "shop", "pod": {"name": "cart", "uid": pod},
                          "serviceaccount": {"name": sa, "uid": "s"}}
    }))
}

fn request(method: &str, path: &str, host: &str, auth: Option<&str>) -> Request<()> {
    let mut b = Request::builder()
        .method(method)
        .uri(path)
        .header("host", host);
    if let Some(auth) = auth {
        b = b.header("authorization", auth);
    }
    b.body(()).unwrap()
}

fn anonymous() -> Caller {
    Caller::unattributed("169.254.200.1:40000".parse().unwrap())
}

/// A credential request as an SDK sends it, to the agent's IPv4 address.
async fn fetch(e: &Endpoint<Arc<Upstream>>, token: &str, caller: &Caller) -> (u16, String) {
    send(
        e,
        request("GET", CREDENTIALS_PATH, "169.254.170.23", Some(token)),
        caller,
    )
    .await
}

async fn send(e: &Endpoint<Arc<Upstream>>, req: Request<()>, caller: &Caller) -> (u16, String) {
    let r = e.handle(req, caller).await;
    let status = r.status().as_u16();
    let body = r.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

#[tokio::test]
async fn serves_credentials_then_hits_the_cache() {
    let up = Arc::new(Upstream::default());
    let e = endpoint(&up, Attribution::off(), no_limit());
    let t = token(POD, "cart", "j1");
    let (status, body) = fetch(&e, &t, &anonymous()).await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["AccessKeyId"], "ASIA1");
    assert!(v["Expiration"].as_str().unwrap().ends_with('Z'));
    let (status, _) = send(
        &e,
        request("GET", CREDENTIALS_PATH, "[fd00:ec2::23]:80", Some(&t)),
        &anonymous(),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(up.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn bad_requests_get_their_status() {
    let up = Arc::new(Upstream::default());
    let e = endpoint(&up, Attribution::off(), no_limit());
    let t = token(POD, "cart", "j1");
    let c = anonymous();
    assert_eq!(
        send(
            &e,
            request("GET", "/v1/other", "169.254.170.23", Some(&t)),
            &c
        )
        .await
        .0,
        404
    );
    assert_eq!(
        send(
            &e,
            request("POST", CREDENTIALS_PATH, "169.254.170.23", Some(&t)),
            &c
        )
        .await
        .0,
        405
    );
    assert_eq!(
        send(
            &e,
            request("GET", CREDENTIALS_PATH, "example.com", Some(&t)),
            &c
        )
        .await
        .0,
        403
    );
    assert_eq!(
        send(
            &e,
            request("GET", CREDENTIALS_PATH, "169.254.170.2", Some(&t)),
            &c
        )
        .await
        .0,
        403
    );
    let (status, body) = send(
        &e,
        request("GET", CREDENTIALS_PATH, "169.254.170.23", None),
        &c,
    )
    .await;
    assert_eq!(
        (status, body.as_str()),
        (400, "no token in the Authorization header")
    );
    assert_eq!(fetch(&e, "garbage", &c).await.0, 400);
    let expired = unsigned_token(&json!({"aud": "pods.eks.amazonaws.com", "exp": 1000}));
    let (status, body) = fetch(&e, &expired, &c).await;
    assert_eq!((status, body.as_str()), (400, "the token has expired"));
    assert_eq!(
        up.calls.load(Ordering::SeqCst),
        0,
        "no bad request reached upstream"
    );
}

#[tokio::test]
async fn upstream_errors_keep_their_status_and_code() {
    let up = Arc::new(Upstream::default());
    let e = endpoint(&up, Attribution::off(), no_limit());
    for (status, code) in [
        (400, "InvalidTokenException"),
        (404, "ResourceNotFoundException"),
    ] {
        up.script
            .lock()
            .unwrap()
            .push_back(UpstreamError::new(status, code, "said upstream"));
        let t = token(POD, "cart", code);
        let got = fetch(&e, &t, &anonymous()).await;
        assert_eq!(got, (status, format!("({code}): said upstream")));
    }
    // A throttled call is the agent's to retry, at its pace: the pod is served.
    let calls = up.calls.load(Ordering::SeqCst);
    up.script.lock().unwrap().push_back(UpstreamError::new(
        429,
        "ThrottlingException",
        "said upstream",
    ));
    let t = token(POD, "cart", "throttled");
    assert_eq!(fetch(&e, &t, &anonymous()).await.0, 200);
    assert_eq!(up.calls.load(Ordering::SeqCst), calls + 2);
}

#[tokio::test]
async fn enforced_binding_refuses_another_pods_token_and_unattributed_callers() {
    let up = Arc::new(Upstream::default());
    let policy = policy(TokenBinding::Enforce, no_limit());
    let e = endpoint(&up, policy, no_limit());
    let t = token(POD, "cart", "j1");
    let (status, body) = fetch(&e, &t, &Caller::in_test_pod("another-pod")).await;
    assert_eq!(status, 403);
    assert!(body.contains("another-pod"), "{body}");
    assert_eq!(fetch(&e, &t, &anonymous()).await.0, 403);
    assert_eq!(fetch(&e, &t, &Caller::in_test_pod(POD)).await.0, 200);
}

#[tokio::test]
async fn a_rotated_token_is_served_the_pods_cached_credentials_while_upstream_fails() {
    let up = Arc::new(Upstream::default());
    let policy = policy(TokenBinding::Audit, no_limit());
    let e = endpoint(&up, policy, no_limit());
    let old = token(POD, "cart", "old");
    let (status, first) = fetch(&e, &old, &Caller::in_test_pod(POD)).await;
    assert_eq!(status, 200);
    up.script.lock().unwrap().extend([
        UpstreamError::new(503, "ServiceUnavailableException", "down"),
        UpstreamError::new(503, "ServiceUnavailableException", "down"),
        UpstreamError::new(503, "ServiceUnavailableException", "down"),
    ]);
    let new = token(POD, "cart", "new");
    let (status, body) = fetch(&e, &new, &Caller::in_test_pod(POD)).await;
    assert_eq!((status, &body), (200, &first));
    // Not for another service account of the pod, nor for a caller the kernel does not place in it.
    let other_sa = token(POD, "admin", "new2");
    assert_eq!(fetch(&e, &other_sa, &Caller::in_test_pod(POD)).await.0, 503);
    let new3 = token(POD, "cart", "new3");
    assert_eq!(fetch(&e, &new3, &anonymous()).await.0, 503);
}

#[tokio::test]
async fn namespace_labels_come_only_from_what_eks_auth_verified() {
    let up = Arc::new(Upstream::default());
    let e = endpoint(&up, Attribution::off(), no_limit());
    let now = Clock::System.unix_now();
    for i in 0..5 {
        up.script.lock().unwrap().push_back(UpstreamError::new(
            400,
            "InvalidTokenException",
            "forged",
        ));
        let forged = unsigned_token(&json!({
            "aud": "pods.eks.amazonaws.com", "exp": now + 3600, "iat": now,
            "kubernetes.io": {"namespace": format!("forged-{i}")}
        }));
        assert_eq!(fetch(&e, &forged, &anonymous()).await.0, 400);
    }
    assert_eq!(
        fetch(&e, &token(POD, "cart", "j1"), &anonymous()).await.0,
        200
    );
    let text = String::from_utf8(e.metrics.render()).unwrap();
    assert!(!text.contains("forged"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("pod_identity_requests_total{")
                && l.contains(r#"namespace="shop""#)
                && l.contains(r#"code="200""#)),
        "{text}"
    );
}

#[tokio::test]
async fn the_node_wide_limit_answers_429() {
    let up = Arc::new(Upstream::default());
    let e = endpoint(
        &up,
        Attribution::off(),
        RateLimit {
            per_second: 1,
            burst: 2,
        },
    );
    let t = token(POD, "cart", "j1");
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(fetch(&e, &t, &anonymous()).await.0);
    }
    assert_eq!(statuses, [200, 200, 429]);
}

#[tokio::test]
async fn a_pod_over_its_limit_does_not_spend_the_node_wide_allowance() {
    let up = Arc::new(Upstream::default());
    let per_pod = RateLimit {
        per_second: 1,
        burst: 2,
    };
    let node_wide = RateLimit {
        per_second: 1,
        burst: 4,
    };
    let e = endpoint(&up, policy(TokenBinding::Audit, per_pod), node_wide);
    let flooder = token(POD, "cart", "j1");
    let mut statuses = Vec::new();
    for _ in 0..50 {
        statuses.push(fetch(&e, &flooder, &Caller::in_test_pod(POD)).await.0);
    }
    assert_eq!(statuses[..3], [200, 200, 429]);
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 2);
    // The node-wide bucket lost only the flooder's two: its neighbour is served, twice.
    let neighbour = "11111111-2222-4333-8444-555555555555";
    let t = token(neighbour, "cart", "j2");
    for _ in 0..2 {
        assert_eq!(fetch(&e, &t, &Caller::in_test_pod(neighbour)).await.0, 200);
    }
    // And the per-pod key is the kernel's pod: a token naming the neighbour changes nothing.
    assert_eq!(fetch(&e, &t, &Caller::in_test_pod(POD)).await.0, 429);
}

#[test]
fn host_header_forms() {
    for (host, ip) in [
        ("169.254.170.23", Some("169.254.170.23")),
        ("169.254.170.23:80", Some("169.254.170.23")),
        ("[fd00:ec2::23]", Some("fd00:ec2::23")),
        ("[fd00:ec2::23]:80", Some("fd00:ec2::23")),
        ("fd00:ec2::23", Some("fd00:ec2::23")),
        ("[fd00:ec2::23]x", None),
        ("169.254.170.23:http", None),
        ("localhost", None),
        ("", None),
    ] {
        assert_eq!(host_ip(host), ip.map(|i| i.parse().unwrap()), "{host:?}");
    }
}

/// A token that fails the checks the agent can make (shape, claims, time, audience) is refused
/// before the cache: no EKS Auth call, no place in the admission queue — a flood of such tokens
/// costs the neighbours nothing.
#[tokio::test]
async fn a_token_failing_local_checks_never_reaches_the_queue_or_eks_auth() {
    let up = Arc::new(Upstream::default());
    let e = endpoint(&up, Attribution::off(), no_limit());
    let now = Clock::System.unix_now();
    let claims = |exp: i64, nbf: i64, aud: &str| {
        unsigned_token(&json!({"aud": [aud], "exp": exp, "iat": nbf, "nbf": nbf, "jti": "j"}))
    };
    let aud = "pods.eks.amazonaws.com";
    for bad in [
        "not-a-jwt".to_owned(),
        "a.b.c".to_owned(),
        claims(now - 3600, now - 7200, aud),
        claims(now + 7200, now + 3600, aud),
        claims(now + 3600, now, "sts.amazonaws.com"),
    ] {
        let (status, body) = fetch(&e, &bad, &Caller::in_test_pod(POD)).await;
        assert!((400..500).contains(&status), "{bad}: {status} {body}");
    }
    assert_eq!(up.calls.load(Ordering::SeqCst), 0);
    let state = |s: &str| e.metrics.cache_state.with_label_values(&[s]).get();
    assert_eq!((state("miss"), state("coalesced")), (0, 0));
    assert_eq!(e.metrics.upstream_deferred.get(), 0);
}
