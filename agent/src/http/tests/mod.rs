//! The request path, without sockets: a scripted upstream behind the real cache. This file holds
//! the upstream, the endpoint and the requests the parts share: [`responses`] (statuses, bodies,
//! the `Host` header, local token checks), [`binding`] (token binding, rotation, verified
//! namespaces), [`limits`] (per-pod and node-wide), [`scope`] (per-container scoping).

mod binding;
mod limits;
mod responses;
mod scope;

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
