//! What the fuzz targets share: a stand-in for EKS Auth behind the real cache and endpoint, a
//! fixed clock (so that the checked-in tokens never expire), callers, and the invariants every
//! answer of the endpoint keeps.
//!
//! Every input gets a fresh runtime and endpoint: a crash reproduces from its input alone.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use pod_identity_agent::attribution::{Attribution, Caller, Policy};
use pod_identity_agent::cgroup::{CgroupInfo, PodCgroup, Qos};
use pod_identity_agent::clock::Clock;
use pod_identity_agent::config::{CacheConfig, RateLimit, TokenBinding};
use pod_identity_agent::credentials::cache::CredentialCache;
use pod_identity_agent::credentials::{Association, Credentials, Issued, Retriever, UpstreamError};
use pod_identity_agent::http::{CREDENTIALS_PATH, Endpoint, host_ip};
use pod_identity_agent::metrics::{Metrics, NamespaceLabels};
use pod_identity_agent::token::Claims;

/// "Now" for every target: 2026-11-25T08:00:00Z. The seed tokens are valid from a day before
/// to a day after.
pub const NOW: i64 = 1_795_593_600;
/// The pod the stand-in caller is in (and the seed tokens name).
pub const POD: &str = "0b5e3c2a-1111-4222-8333-444455556666";
/// This node, for the token's node claim.
pub const NODE: &str = "ip-10-0-0-1.us-west-2.compute.internal";
/// The agent's addresses: the only `Host` values accepted.
pub const HOSTS: [&str; 2] = ["169.254.170.23", "fd00:ec2::23"];
/// Every secret key and session token the stand-in issues starts with these: no answer but a
/// 200 may contain them.
pub const SECRET_MARK: &str = "FUZZSECRETKEY";
pub const SESSION_MARK: &str = "FUZZSESSIONTOKEN";
/// A token whose `jti` is `upstream:<status>:<code>` gets that error from the stand-in (a code
/// not in [`KNOWN_CODES`] reads `UnknownError`).
pub const UPSTREAM_ERROR_JTI: &str = "upstream:";
/// EKS Auth's error codes, and the agent's own for failures without an answer.
pub const KNOWN_CODES: [&str; 12] = [
    "AccessDeniedException",
    "ExpiredTokenException",
    "InvalidParameterException",
    "InvalidRequestException",
    "InvalidTokenException",
    "ResourceNotFoundException",
    "ThrottlingException",
    "InternalServerException",
    "ServiceUnavailableException",
    "Timeout",
    "Unreachable",
    "BadResponse",
];

/// A clock that starts at [`NOW`] and follows tokio's (paused) time. Call inside the runtime.
pub fn clock() -> Clock {
    Clock::tokio(SystemTime::UNIX_EPOCH + Duration::from_secs(NOW.unsigned_abs()))
}

/// A current-thread runtime with paused time: timers (hyper's header timeout, the writer's
/// pause) fire as soon as nothing else can run.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a current-thread runtime")
}

/// EKS Auth, played without a network. It insists on the endpoint's promise that no token it
/// should have refused reaches upstream.
#[derive(Clone)]
pub struct StandIn(Arc<StandInState>);

pub struct StandInState {
    clock: Clock,
    calls: AtomicUsize,
}

impl StandIn {
    pub fn new(clock: Clock) -> Self {
        StandIn(Arc::new(StandInState {
            clock,
            calls: AtomicUsize::new(0),
        }))
    }

    pub fn calls(&self) -> usize {
        self.0.calls.load(Ordering::SeqCst)
    }
}

impl Retriever for StandIn {
    async fn fetch(&self, token: &str) -> Result<Issued, UpstreamError> {
        let n = self.0.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let claims = Claims::parse(token)
            .unwrap_or_else(|e| panic!("EKS Auth was sent a token the agent cannot read: {e}"));
        if let Err(e) = claims.check(self.0.clock.unix_now()) {
            panic!("EKS Auth was sent a token the agent should have refused: {e}");
        }
        if let Some((status, code)) = claims
            .jti
            .as_deref()
            .and_then(|j| j.strip_prefix(UPSTREAM_ERROR_JTI))
            .and_then(|rest| rest.split_once(':'))
            && let Ok(status) = status.parse::<u16>()
        {
            // EKS Auth's codes only: the shared registry counts errors by code.
            let code = KNOWN_CODES
                .iter()
                .find(|known| **known == code)
                .unwrap_or(&"UnknownError");
            return Err(UpstreamError::new(status, *code, "said upstream"));
        }
        Ok(Issued::new(
            Credentials {
                access_key_id: format!("ASIAFUZZ{n}"),
                secret_access_key: format!("{SECRET_MARK}{n}"),
                session_token: format!("{SESSION_MARK}{n}"),
                account_id: "111122223333".into(),
                expiration: self.0.clock.now() + Duration::from_secs(6 * 3600),
            },
            Association {
                namespace: claims.namespace().unwrap_or_default().into(),
                service_account: claims.service_account().unwrap_or_default().into(),
                role_arn: "arn:aws:iam::111122223333:role/fuzz".into(),
                association_id: "a-fuzz".into(),
                assumed_role_arn: "arn:aws:sts::111122223333:assumed-role/fuzz/s".into(),
            },
        ))
    }
}

/// The agent's addresses, parsed.
pub fn hosts() -> Vec<IpAddr> {
    HOSTS.iter().filter_map(|h| h.parse().ok()).collect()
}

/// The real endpoint and cache in front of `upstream`, with the agent's default cache settings
/// and no rate limits (they follow the real clock, so would make runs irreproducible).
pub fn endpoint(binding: TokenBinding, clock: Clock, upstream: StandIn) -> Endpoint<StandIn> {
    // One registry for every input: building one is most of an endpoint's cost, and nothing
    // the endpoint decides depends on a counter.
    static METRICS: std::sync::LazyLock<Metrics> =
        std::sync::LazyLock::new(|| Metrics::new().expect("the metrics registry"));
    static NAMESPACES: std::sync::LazyLock<Arc<NamespaceLabels>> =
        std::sync::LazyLock::new(|| Arc::new(NamespaceLabels::new(8)));
    let metrics = METRICS.clone();
    let cache = CredentialCache::new(
        upstream,
        CacheConfig {
            max_entries: 16,
            ..CacheConfig::default()
        },
        clock,
        metrics.clone(),
        None,
    );
    let policy = Policy {
        binding,
        node_name: Some(NODE.into()),
        ..Policy::off()
    };
    let attribution = Attribution::new(None, None, policy, metrics.pod_connections_refused.clone());
    Endpoint::new(
        cache,
        hosts(),
        RateLimit {
            per_second: 0,
            burst: 0,
        },
        Arc::new(attribution),
        None,
        metrics,
        // Shared as the registry is, so that its series stay bounded.
        NAMESPACES.clone(),
        clock,
    )
}

/// The caller of a connection: `0` known only by its address, `1` in pod [`POD`], `2` in a
/// cgroup that is no pod's.
pub fn caller(kind: u8) -> Caller {
    let peer = "169.254.200.1:40000".parse().expect("a socket address");
    let pod = match kind % 3 {
        0 => return Caller::unattributed(peer),
        1 => Some(PodCgroup {
            pod_uid: Arc::from(POD),
            container_id: Some("a".repeat(64)),
            qos: Qos::Burstable,
        }),
        _ => None,
    };
    Caller {
        peer,
        process: Some(pod_identity_agent::ebpf::Caller {
            cgroup_id: 9,
            pid: 42,
            tid: 42,
            uid: 0,
            comm: "python3".into(),
            netns_cookie: 0,
        }),
        cgroup: Some(Arc::new(CgroupInfo {
            id: 9,
            path: "/kubepods.slice/kubepods-burstable.slice/x".into(),
            pod,
        })),
    }
}

/// What the checks need to know of a request, taken before the endpoint consumes it.
#[derive(Debug, Clone)]
pub struct RequestFacts {
    pub method: http::Method,
    pub path: String,
    pub host: Option<http::HeaderValue>,
    pub authorization: Option<http::HeaderValue>,
}

impl RequestFacts {
    pub fn of<B>(req: &http::Request<B>) -> Self {
        RequestFacts {
            method: req.method().clone(),
            path: req.uri().path().to_owned(),
            host: req.headers().get(http::header::HOST).cloned(),
            authorization: req.headers().get(http::header::AUTHORIZATION).cloned(),
        }
    }

    /// The token as the endpoint reads it.
    pub fn token(&self) -> Option<&str> {
        self.authorization
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .filter(|t| !t.is_empty())
    }
}

/// The invariants of one answer, whatever the request:
/// - the status is 200 or a client or server error;
/// - a 200 only for `GET /v1/credentials` to one of the agent's addresses with a token that
///   reads and is in date (and, under `enforce`, names the calling pod), with a JSON body of
///   credentials the stand-in issued;
/// - any other answer is plain text and names no secret: not the stand-in's secret keys or
///   session tokens, nor the token presented.
pub fn check_answer(
    facts: &RequestFacts,
    binding: TokenBinding,
    caller: &Caller,
    response: &http::Response<bytes::Bytes>,
    now: i64,
) {
    let status = response.status().as_u16();
    let body = response.body();
    let content_type = response
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    assert!(
        status == 200 || (400..=599).contains(&status),
        "status {status} for {facts:?}: {}",
        String::from_utf8_lossy(body)
    );
    if status == 200 {
        assert_eq!(facts.method, http::Method::GET, "200 for {facts:?}");
        assert_eq!(facts.path, CREDENTIALS_PATH, "200 for {facts:?}");
        let host = facts.host.as_ref().and_then(|h| h.to_str().ok());
        assert!(
            host.and_then(host_ip)
                .is_some_and(|ip| hosts().contains(&ip)),
            "200 with Host {host:?}"
        );
        let token = facts.token().expect("a 200 without a token");
        let claims = Claims::parse(token).expect("a 200 for a token that does not read");
        claims.check(now).expect("a 200 for a token out of date");
        if binding == TokenBinding::Enforce {
            assert_eq!(
                caller.pod_uid(),
                Some(POD),
                "a 200 under enforce for a caller in no pod"
            );
            assert_eq!(
                claims.pod_uid(),
                Some(POD),
                "a 200 under enforce for a token naming another pod"
            );
            assert!(
                claims.node_name().is_none_or(|n| n == NODE),
                "a 200 under enforce for a token of another node"
            );
        }
        assert_eq!(content_type, "application/json");
        let v: serde_json::Value =
            serde_json::from_slice(body).expect("a 200 whose body is not JSON");
        let field = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
        assert!(field("AccessKeyId").starts_with("ASIAFUZZ"), "{v}");
        assert!(field("SecretAccessKey").starts_with(SECRET_MARK), "{v}");
        assert!(field("Token").starts_with(SESSION_MARK), "{v}");
        assert_eq!(field("AccountId"), "111122223333");
        assert!(field("Expiration").ends_with('Z'), "{v}");
        assert!(v.get("Code").is_none(), "{v}");
    } else {
        assert_eq!(content_type, "text/plain; charset=utf-8", "status {status}");
        let text = String::from_utf8_lossy(body);
        assert!(
            !text.contains(SECRET_MARK) && !text.contains(SESSION_MARK),
            "a secret in a {status}: {text}"
        );
        // Only a JWT-shaped token: a short or free-form value may be a word of any message.
        if let Some(token) = facts
            .token()
            .filter(|t| t.len() >= 16 && t.split('.').count() == 3)
        {
            assert!(
                !text.contains(token),
                "the token echoed in a {status}: {text}"
            );
        }
        match status {
            405 => assert_eq!(response.headers()[http::header::ALLOW], "GET"),
            429 => assert!(response.headers().contains_key(http::header::RETRY_AFTER)),
            _ => {}
        }
    }
}

/// What the endpoint decides under `binding` for `caller` and claims, as the README states it.
pub fn bound(binding: TokenBinding, caller: &Caller, claims: &Claims) -> bool {
    match binding {
        TokenBinding::Off | TokenBinding::Audit => true,
        TokenBinding::Enforce => {
            caller.pod_uid().is_some()
                && claims.pod_uid() == caller.pod_uid()
                && claims.node_name().is_none_or(|n| n == NODE)
        }
    }
}

/// Collects a response's body, for the checks.
pub async fn collect(
    response: http::Response<http_body_util::Full<bytes::Bytes>>,
) -> http::Response<bytes::Bytes> {
    use http_body_util::BodyExt as _;
    let (parts, body) = response.into_parts();
    let bytes = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(never) => match never {},
    };
    http::Response::from_parts(parts, bytes)
}
