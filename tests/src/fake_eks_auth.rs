//! A fake EKS Auth (`AssumeRoleForPodIdentity`) speaking the real wire format, and the token issuer whose
//! tokens it accepts.
//!
//! Wire format (shared/PROTOCOL.md §2): rest-json, `POST /clusters/{clusterName}/assume-role-for-pod-identity`
//! with body `{"token":"…"}` and a SigV4 `Authorization` header for service `eks-auth` (only its shape is
//! checked). Success is a 200 with all five members, `credentials.expiration` in epoch seconds as a JSON
//! number. Errors carry `X-Amzn-ErrorType` and `{"__type":…,"message":…}`.
//!
//! Tokens are projected-service-account-shaped JWTs (§3) signed HS256 with a secret of this instance, or,
//! once a test gives it the cluster's key ([`FakeEksAuth::use_cluster_key`], the key a Kubernetes API
//! stand-in publishes), RS256/ES256 with that key, so
//! the fake can tell its own tokens from forged ones, like the real service does with the cluster's key.
//!
//! Tests steer it at any time: associations, faults (errors, hangs, garbage), an artificial delay, the
//! credential lifetime, a rate limit (a token bucket answering `ThrottlingException` past it, as the real
//! service throttles); and observe it: call counts (total, throttled, and per token `jti`), requests, issued
//! keys.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::task::JoinSet;

pub use crate::cluster_keys::ClusterKey;

/// The AWS account of every role the fake hands out.
pub const ACCOUNT_ID: &str = "111122223333";
/// The audience of pod identity tokens.
pub const AUDIENCE: &str = "pods.eks.amazonaws.com";
/// The region the fake pretends to be in.
pub const REGION: &str = "us-west-2";

/// EKS Auth's modelled errors (PROTOCOL.md §2), with their statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiError {
    /// 400 `AccessDeniedException`.
    AccessDenied,
    /// 400 `ExpiredTokenException`.
    ExpiredToken,
    /// 400 `InvalidParameterException`.
    InvalidParameter,
    /// 400 `InvalidRequestException`.
    InvalidRequest,
    /// 400 `InvalidTokenException`.
    InvalidToken,
    /// 404 `ResourceNotFoundException`.
    ResourceNotFound,
    /// 429 `ThrottlingException`.
    Throttling,
    /// 500 `InternalServerException`.
    InternalServer,
    /// 503 `ServiceUnavailableException`.
    ServiceUnavailable,
}

impl ApiError {
    /// The `__type` / `X-Amzn-ErrorType` value.
    #[must_use]
    pub fn type_name(self) -> &'static str {
        match self {
            Self::AccessDenied => "AccessDeniedException",
            Self::ExpiredToken => "ExpiredTokenException",
            Self::InvalidParameter => "InvalidParameterException",
            Self::InvalidRequest => "InvalidRequestException",
            Self::InvalidToken => "InvalidTokenException",
            Self::ResourceNotFound => "ResourceNotFoundException",
            Self::Throttling => "ThrottlingException",
            Self::InternalServer => "InternalServerException",
            Self::ServiceUnavailable => "ServiceUnavailableException",
        }
    }

    /// The HTTP status the real service answers with.
    #[must_use]
    pub fn status(self) -> StatusCode {
        match self {
            Self::ResourceNotFound => StatusCode::NOT_FOUND,
            Self::Throttling => StatusCode::TOO_MANY_REQUESTS,
            Self::InternalServer => StatusCode::INTERNAL_SERVER_ERROR,
            Self::ServiceUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

/// A misbehaviour to inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this modelled error.
    Error(ApiError),
    /// Never answer (the connection stays open until the client gives up or the fake is dropped).
    Hang,
    /// Answer 200 with a body that is not JSON.
    Garbage,
}

/// How many calls a fault applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultTimes {
    /// The next `n` calls, then back to normal.
    Next(u32),
    /// Every call until [`FakeEksAuth::clear_fault`].
    Always,
}

/// When a token is valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenValidity {
    /// Issued now, valid for the spec's lifetime.
    Valid,
    /// Expired an hour ago.
    Expired,
    /// Valid only from an hour from now.
    NotYetValid,
}

/// What to put in a minted token. Build with [`TokenSpec::new`] (or `Pod::token_spec`) and adjust.
#[derive(Debug, Clone)]
pub struct TokenSpec {
    /// Kubernetes namespace.
    pub namespace: String,
    /// Service account name.
    pub service_account: String,
    /// Service account uid.
    pub service_account_uid: String,
    /// Pod name and uid, if the token is bound to a pod.
    pub pod: Option<(String, String)>,
    /// Node name and uid, if the token carries node claims.
    pub node: Option<(String, String)>,
    /// Lifetime (`exp - iat`); kubelet's default is 24 h.
    pub lifetime: Duration,
    /// Time validity.
    pub validity: TokenValidity,
    /// Audience (`aud`).
    pub audience: String,
    /// A fixed `jti`; a fresh uuid when `None`.
    pub jti: Option<String>,
}

impl TokenSpec {
    /// A valid 24 h token for a service account, with no pod or node claims.
    #[must_use]
    pub fn new(namespace: &str, service_account: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
            service_account_uid: uuid::Uuid::new_v4().to_string(),
            pod: None,
            node: None,
            lifetime: Duration::from_secs(24 * 3600),
            validity: TokenValidity::Valid,
            audience: AUDIENCE.to_owned(),
            jti: None,
        }
    }

    /// Binds the token to a pod (`kubernetes.io.pod`).
    #[must_use]
    pub fn pod(mut self, name: &str, uid: &str) -> Self {
        self.pod = Some((name.to_owned(), uid.to_owned()));
        self
    }

    /// Adds node claims (`kubernetes.io.node`).
    #[must_use]
    pub fn node(mut self, name: &str, uid: &str) -> Self {
        self.node = Some((name.to_owned(), uid.to_owned()));
        self
    }

    /// Sets the lifetime.
    #[must_use]
    pub fn lifetime(mut self, lifetime: Duration) -> Self {
        self.lifetime = lifetime;
        self
    }

    /// Sets the time validity.
    #[must_use]
    pub fn validity(mut self, validity: TokenValidity) -> Self {
        self.validity = validity;
        self
    }

    /// Makes the token already expired.
    #[must_use]
    pub fn expired(self) -> Self {
        self.validity(TokenValidity::Expired)
    }

    /// Makes the token not valid yet.
    #[must_use]
    pub fn not_yet_valid(self) -> Self {
        self.validity(TokenValidity::NotYetValid)
    }

    /// Overrides the pod uid claim (keeping the pod name), e.g. to present another pod's token.
    #[must_use]
    pub fn pod_uid(mut self, uid: &str) -> Self {
        let name = self.pod.take().map_or_else(|| "pod".to_owned(), |(n, _)| n);
        self.pod = Some((name, uid.to_owned()));
        self
    }

    /// Sets the audience.
    #[must_use]
    pub fn audience(mut self, audience: &str) -> Self {
        audience.clone_into(&mut self.audience);
        self
    }
}

/// A name and uid pair in the `kubernetes.io` claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NameUid {
    /// Object name.
    pub name: String,
    /// Object uid.
    pub uid: String,
}

/// The `kubernetes.io` claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KubernetesClaims {
    /// Namespace.
    pub namespace: String,
    /// Service account.
    pub serviceaccount: NameUid,
    /// Pod the token is bound to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<NameUid>,
    /// Node the pod runs on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<NameUid>,
}

/// A projected service account token's claims (PROTOCOL.md §3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Issuer.
    pub iss: String,
    /// `system:serviceaccount:<ns>:<sa>`.
    pub sub: String,
    /// Audiences.
    pub aud: Vec<String>,
    /// Expiry, epoch seconds.
    pub exp: i64,
    /// Issued at, epoch seconds.
    pub iat: i64,
    /// Not before, epoch seconds.
    pub nbf: i64,
    /// Token id.
    pub jti: String,
    /// Kubernetes claims.
    #[serde(rename = "kubernetes.io")]
    pub kubernetes: KubernetesClaims,
}

/// Reads a token's claims without checking its signature or times.
pub fn decode_unverified(token: &str) -> Result<Claims> {
    let data = jsonwebtoken::dangerous::insecure_decode::<Claims>(token)
        .context("decoding token claims")?;
    Ok(data.claims)
}

/// A configured pod identity association.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Association {
    /// `arn:aws:iam::111122223333:role/<name>`.
    pub role_arn: String,
    /// `a-…`.
    pub association_id: String,
    /// `arn:aws:eks:us-west-2:111122223333:podidentityassociation/<cluster>/a-…`.
    pub association_arn: String,
}

/// One request the fake received.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    /// HTTP method.
    pub method: String,
    /// Request path.
    pub path: String,
    /// Headers, in order (names lowercase).
    pub headers: Vec<(String, String)>,
    /// Raw body.
    pub body: String,
    /// The `token` member of the body, if the body parsed.
    pub token: Option<String>,
    /// The token's `jti`, if the token decoded.
    pub jti: Option<String>,
}

impl RecordedRequest {
    /// The first header of that (case-insensitive) name.
    #[must_use]
    pub fn header(&self, name: &str) -> Option<&str> {
        crate::find_header(&self.headers, name)
    }
}

/// Credentials the fake handed out.
#[derive(Debug, Clone)]
pub struct IssuedCredentials {
    /// `ASIA…`, distinct per call.
    pub access_key_id: String,
    /// Secret key.
    pub secret_access_key: String,
    /// Session token.
    pub session_token: String,
    /// Expiration, epoch seconds.
    pub expiration: i64,
    /// The `jti` of the token exchanged.
    pub jti: String,
    /// Namespace of the token's subject.
    pub namespace: String,
    /// Service account of the token's subject.
    pub service_account: String,
    /// Role assumed.
    pub role_arn: String,
}

/// EKS Auth's throttling: a token bucket of `burst` calls refilled at `per_second`.
#[derive(Debug)]
struct RateLimit {
    per_second: f64,
    burst: f64,
    tokens: f64,
    at: std::time::Instant,
}

impl RateLimit {
    /// Takes one call's token, if there is one.
    fn take(&mut self) -> bool {
        let now = std::time::Instant::now();
        let refill = now.duration_since(self.at).as_secs_f64() * self.per_second;
        self.tokens = (self.tokens + refill).min(self.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[derive(Debug)]
struct State {
    associations: HashMap<(String, String), Association>,
    rate_limit: Option<RateLimit>,
    throttled: u64,
    fault: Option<(Fault, FaultTimes)>,
    delay: Duration,
    credential_lifetime: Duration,
    calls: u64,
    calls_by_jti: HashMap<String, u64>,
    requests: Vec<RecordedRequest>,
    issued: Vec<IssuedCredentials>,
    next_key: u64,
    /// The cluster key new tokens are signed with (HS256 with `secret` when `None`).
    signing: Option<Arc<ClusterKey>>,
    /// Cluster keys whose tokens are accepted (every key ever used for signing).
    trusted: Vec<Arc<ClusterKey>>,
}

#[derive(Debug)]
struct Shared {
    cluster: String,
    secret: [u8; 32],
    issuer: String,
    state: Mutex<State>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock only happens in a failing test; keep serving the rest.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The fake's own runtime: it serves from its own thread, so tests may block (waiting for a client process,
/// sleeping) on any thread, inside or outside a tokio runtime, without starving it.
#[derive(Debug)]
struct ServerRuntime(Option<tokio::runtime::Runtime>);

impl Drop for ServerRuntime {
    fn drop(&mut self) {
        // `shutdown_background` (unlike dropping) is allowed from inside another runtime; it aborts the accept
        // loop and every connection task, hung ones included.
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// A running fake EKS Auth. Cheap to clone; the server stops when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct FakeEksAuth {
    shared: Arc<Shared>,
    addr: SocketAddr,
    _runtime: Arc<ServerRuntime>,
}

impl FakeEksAuth {
    /// Serves EKS Auth for `cluster` on `listener` (which may have been bound inside a network namespace).
    ///
    /// The server runs on a runtime of its own (one worker thread), stopped when the last clone is dropped.
    pub fn start(listener: std::net::TcpListener, cluster: &str) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("fake-eks-auth")
            .enable_all()
            .build()
            .context("building the fake's runtime")?;
        listener
            .set_nonblocking(true)
            .context("set_nonblocking on the fake's listener")?;
        let addr = listener
            .local_addr()
            .context("local_addr of the fake's listener")?;
        let listener = {
            let _guard = runtime.enter();
            tokio::net::TcpListener::from_std(listener)
                .context("registering the fake's listener")?
        };
        let shared = Arc::new(Shared {
            cluster: cluster.to_owned(),
            secret: rand::random(),
            issuer: format!(
                "https://oidc.eks.{REGION}.amazonaws.com/id/E2E{}",
                uuid::Uuid::new_v4().simple()
            ),
            state: Mutex::new(State {
                associations: HashMap::new(),
                rate_limit: None,
                throttled: 0,
                fault: None,
                delay: Duration::ZERO,
                credential_lifetime: Duration::from_secs(6 * 3600),
                calls: 0,
                calls_by_jti: HashMap::new(),
                requests: Vec::new(),
                issued: Vec::new(),
                next_key: 0,
                signing: None,
                trusted: Vec::new(),
            }),
        });
        runtime.spawn(accept_loop(listener, Arc::clone(&shared)));
        Ok(Self {
            shared,
            addr,
            _runtime: Arc::new(ServerRuntime(Some(runtime))),
        })
    }

    /// Where the fake listens.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The endpoint URL to give a client (`http://<addr>`).
    #[must_use]
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The cluster name the fake serves.
    #[must_use]
    pub fn cluster(&self) -> &str {
        &self.shared.cluster
    }

    /// Signs new tokens with `key` from now on, and accepts tokens signed with it (as well as
    /// those signed with the keys before it): a key rotation of the cluster.
    pub fn use_cluster_key(&self, key: Arc<ClusterKey>) {
        let mut state = self.shared.state();
        state.trusted.push(key.clone());
        state.signing = Some(key);
    }

    /// Mints a token signed with this fake's key.
    pub fn issue_token(&self, spec: &TokenSpec) -> Result<String> {
        let signing = self.shared.state().signing.clone();
        match signing {
            Some(key) => self.issue_token_signed(spec, &key, &key.kid),
            None => {
                let mut header = Header::new(Algorithm::HS256);
                header.kid = Some("e2e".to_owned());
                jsonwebtoken::encode(
                    &header,
                    &self.claims(spec)?,
                    &EncodingKey::from_secret(&self.shared.secret),
                )
                .context("signing a token")
            }
        }
    }

    /// Mints a token signed with `key` and naming key `kid`: with a key the fake does not trust,
    /// or another key's id, a forgery.
    pub fn issue_token_signed(
        &self,
        spec: &TokenSpec,
        key: &ClusterKey,
        kid: &str,
    ) -> Result<String> {
        key.sign(kid, &self.claims(spec)?)
    }

    fn claims(&self, spec: &TokenSpec) -> Result<Claims> {
        let now = epoch_now();
        let lifetime = i64::try_from(spec.lifetime.as_secs()).context("token lifetime")?;
        let iat = match spec.validity {
            TokenValidity::Valid => now,
            TokenValidity::Expired => now - 3600 - lifetime,
            TokenValidity::NotYetValid => now + 3600,
        };
        let claims = Claims {
            iss: self.shared.issuer.clone(),
            sub: format!(
                "system:serviceaccount:{}:{}",
                spec.namespace, spec.service_account
            ),
            aud: vec![spec.audience.clone()],
            exp: iat + lifetime,
            iat,
            nbf: iat,
            jti: spec
                .jti
                .clone()
                .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
            kubernetes: KubernetesClaims {
                namespace: spec.namespace.clone(),
                serviceaccount: NameUid {
                    name: spec.service_account.clone(),
                    uid: spec.service_account_uid.clone(),
                },
                pod: spec.pod.as_ref().map(|(name, uid)| NameUid {
                    name: name.clone(),
                    uid: uid.clone(),
                }),
                node: spec.node.as_ref().map(|(name, uid)| NameUid {
                    name: name.clone(),
                    uid: uid.clone(),
                }),
            },
        };
        Ok(claims)
    }

    /// Associates `namespace`/`service_account` with role `arn:aws:iam::111122223333:role/<role_name>`.
    pub fn associate(
        &self,
        namespace: &str,
        service_account: &str,
        role_name: &str,
    ) -> Association {
        let id = format!("a-{}", &uuid::Uuid::new_v4().simple().to_string()[..17]);
        let association = Association {
            role_arn: format!("arn:aws:iam::{ACCOUNT_ID}:role/{role_name}"),
            association_arn: format!(
                "arn:aws:eks:{REGION}:{ACCOUNT_ID}:podidentityassociation/{}/{id}",
                self.shared.cluster
            ),
            association_id: id,
        };
        self.shared.state().associations.insert(
            (namespace.to_owned(), service_account.to_owned()),
            association.clone(),
        );
        association
    }

    /// Removes an association.
    pub fn disassociate(&self, namespace: &str, service_account: &str) {
        self.shared
            .state()
            .associations
            .remove(&(namespace.to_owned(), service_account.to_owned()));
    }

    /// Injects a fault for the next `n` calls or for all calls (replacing any previous fault).
    pub fn set_fault(&self, fault: Fault, times: FaultTimes) {
        self.shared.state().fault = Some((fault, times));
    }

    /// Removes any injected fault.
    pub fn clear_fault(&self) {
        self.shared.state().fault = None;
    }

    /// Delays every answer by `delay` (zero to stop).
    pub fn set_delay(&self, delay: Duration) {
        self.shared.state().delay = delay;
    }

    /// Throttles like the real service: past `per_second` calls per second (a token bucket holding `burst`,
    /// full now), every call is answered 429 `ThrottlingException` at once (before any delay or fault).
    /// `None` removes the limit.
    pub fn set_rate_limit(&self, limit: Option<(f64, f64)>) {
        self.shared.state().rate_limit = limit.map(|(per_second, burst)| RateLimit {
            per_second,
            burst,
            tokens: burst,
            at: std::time::Instant::now(),
        });
    }

    /// Calls answered `ThrottlingException` by the rate limit (injected faults not counted).
    #[must_use]
    pub fn throttled(&self) -> u64 {
        self.shared.state().throttled
    }

    /// Sets the lifetime of credentials handed out from now on (default 6 h).
    pub fn set_credential_lifetime(&self, lifetime: Duration) {
        self.shared.state().credential_lifetime = lifetime;
    }

    /// Total number of requests received (any path, any outcome).
    #[must_use]
    pub fn calls(&self) -> u64 {
        self.shared.state().calls
    }

    /// Number of requests that presented the token with this `jti`.
    #[must_use]
    pub fn calls_for_jti(&self, jti: &str) -> u64 {
        self.shared
            .state()
            .calls_by_jti
            .get(jti)
            .copied()
            .unwrap_or(0)
    }

    /// Number of requests that presented this token (looked up by its `jti`).
    #[must_use]
    pub fn calls_for_token(&self, token: &str) -> u64 {
        decode_unverified(token).map_or(0, |c| self.calls_for_jti(&c.jti))
    }

    /// The most recent request.
    #[must_use]
    pub fn last_request(&self) -> Option<RecordedRequest> {
        self.shared.state().requests.last().cloned()
    }

    /// Every set of credentials handed out, oldest first.
    #[must_use]
    pub fn issued(&self) -> Vec<IssuedCredentials> {
        self.shared.state().issued.clone()
    }
}

async fn accept_loop(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    // Connection tasks live in this set: aborting the loop drops the set, which aborts them all (hangs too).
    let mut connections = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let shared = Arc::clone(&shared);
        connections.spawn(async move {
            let service = service_fn(move |req| handle(Arc::clone(&shared), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
        // Reap finished connections so the set does not grow without bound.
        while connections.try_join_next().is_some() {}
    }
}

type HttpResponse = Response<Full<Bytes>>;

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<HttpResponse, Infallible> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let body = String::from_utf8_lossy(&body).into_owned();
    let token = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("token").and_then(|t| t.as_str()).map(str::to_owned));
    let jti = token
        .as_deref()
        .and_then(|t| decode_unverified(t).ok())
        .map(|c| c.jti);
    let recorded = RecordedRequest {
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        headers: parts
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body,
        token: token.clone(),
        jti: jti.clone(),
    };

    let (delay, fault, throttled) = {
        let mut state = shared.state();
        state.calls += 1;
        if let Some(jti) = &jti {
            *state.calls_by_jti.entry(jti.clone()).or_default() += 1;
        }
        state.requests.push(recorded.clone());
        let throttled = state.rate_limit.as_mut().is_some_and(|l| !l.take());
        if throttled {
            state.throttled += 1;
        }
        (state.delay, take_fault(&mut state), throttled)
    };
    // The real service throttles at its front door, before any work.
    if throttled {
        return Ok(error(ApiError::Throttling, "Rate exceeded"));
    }
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    match fault {
        Some(Fault::Hang) => std::future::pending::<()>().await,
        Some(Fault::Garbage) => {
            return Ok(response(
                StatusCode::OK,
                "<html><body>this is not JSON</body></html>".into(),
                None,
            ));
        }
        Some(Fault::Error(e)) => return Ok(error(e, "injected fault")),
        None => {}
    }
    Ok(answer(&shared, &recorded))
}

fn take_fault(state: &mut State) -> Option<Fault> {
    let (fault, times) = state.fault?;
    match times {
        FaultTimes::Always => Some(fault),
        FaultTimes::Next(0) => {
            state.fault = None;
            None
        }
        FaultTimes::Next(1) => {
            state.fault = None;
            Some(fault)
        }
        FaultTimes::Next(n) => {
            state.fault = Some((fault, FaultTimes::Next(n - 1)));
            Some(fault)
        }
    }
}

/// The real service's behaviour, once faults are out of the way.
fn answer(shared: &Shared, req: &RecordedRequest) -> HttpResponse {
    let Some(cluster) = req
        .path
        .strip_prefix("/clusters/")
        .and_then(|rest| rest.strip_suffix("/assume-role-for-pod-identity"))
        .filter(|_| req.method == "POST")
    else {
        return error_typed(
            StatusCode::NOT_FOUND,
            "UnknownOperationException",
            "unknown operation",
        );
    };
    if !sigv4_shape_ok(req.header("authorization")) {
        return error_typed(
            StatusCode::FORBIDDEN,
            "MissingAuthenticationTokenException",
            "missing or malformed SigV4 Authorization for eks-auth",
        );
    }
    if cluster != shared.cluster {
        return error(
            ApiError::ResourceNotFound,
            &format!("No cluster found for name: {cluster}."),
        );
    }
    let Some(token) = &req.token else {
        return error(
            ApiError::InvalidRequest,
            "body must be {\"token\": \"...\"}",
        );
    };

    // The cluster key the token names, if the fake trusts one by that id; else its own secret.
    let cluster_key = jsonwebtoken::decode_header(token).ok().and_then(|h| {
        let kid = h.kid?;
        shared
            .state()
            .trusted
            .iter()
            .find(|k| k.kid == kid)
            .cloned()
    });
    let (mut validation, key) = match &cluster_key {
        Some(k) => (Validation::new(k.algorithm), k.decoding.clone()),
        None => (
            Validation::new(Algorithm::HS256),
            DecodingKey::from_secret(&shared.secret),
        ),
    };
    validation.set_audience(&[AUDIENCE]);
    validation.validate_nbf = true;
    validation.leeway = 0;
    let claims = match jsonwebtoken::decode::<Claims>(token, &key, &validation) {
        Ok(data) => data.claims,
        Err(e) => {
            return match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => {
                    error(ApiError::ExpiredToken, "token expired")
                }
                _ => error(ApiError::InvalidToken, &format!("invalid token: {e}")),
            };
        }
    };

    let namespace = claims.kubernetes.namespace.clone();
    let service_account = claims.kubernetes.serviceaccount.name.clone();
    let mut state = shared.state();
    let Some(association) = state
        .associations
        .get(&(namespace.clone(), service_account.clone()))
        .cloned()
    else {
        return error(
            ApiError::ResourceNotFound,
            &format!("No pod identity association found for {namespace}/{service_account}."),
        );
    };
    state.next_key += 1;
    let n = state.next_key;
    let lifetime = i64::try_from(state.credential_lifetime.as_secs()).unwrap_or(i64::MAX / 2);
    let issued = IssuedCredentials {
        access_key_id: format!("ASIAE2E{n:013}"),
        secret_access_key: format!("e2eSecret{}", uuid::Uuid::new_v4().simple()),
        session_token: session_token(n),
        expiration: epoch_now() + lifetime,
        jti: claims.jti.clone(),
        namespace: namespace.clone(),
        service_account: service_account.clone(),
        role_arn: association.role_arn.clone(),
    };
    state.issued.push(issued.clone());
    drop(state);

    let pod_name = claims
        .kubernetes
        .pod
        .as_ref()
        .map_or("unknown", |p| p.name.as_str());
    let mut session = format!("eks-{}-{pod_name}-{}", shared.cluster, uuid::Uuid::new_v4());
    session.truncate(64);
    let role_name = association.role_arn.rsplit('/').next().unwrap_or_default();
    let body = json!({
        "subject": { "namespace": namespace, "serviceAccount": service_account },
        "audience": AUDIENCE,
        "podIdentityAssociation": {
            "associationArn": association.association_arn,
            "associationId": association.association_id,
        },
        "assumedRoleUser": {
            "arn": format!("arn:aws:sts::{ACCOUNT_ID}:assumed-role/{role_name}/{session}"),
            "assumeRoleId": format!("AROAE2EFAKEROLE{n:05}:{session}"),
        },
        "credentials": {
            "sessionToken": issued.session_token,
            "secretAccessKey": issued.secret_access_key,
            "accessKeyId": issued.access_key_id,
            "expiration": issued.expiration,
        },
    });
    response(StatusCode::OK, body.to_string(), None)
}

/// `AWS4-HMAC-SHA256 Credential=<key>/<date>/<region>/eks-auth/aws4_request, SignedHeaders=…, Signature=…`
fn sigv4_shape_ok(authorization: Option<&str>) -> bool {
    let Some(rest) = authorization.and_then(|a| a.strip_prefix("AWS4-HMAC-SHA256 ")) else {
        return false;
    };
    let Some(credential) = rest
        .split(',')
        .map(str::trim)
        .find_map(|part| part.strip_prefix("Credential="))
    else {
        return false;
    };
    let scope: Vec<&str> = credential.split('/').collect();
    scope.len() == 5
        && scope[3] == "eks-auth"
        && scope[4] == "aws4_request"
        && rest.contains("SignedHeaders=")
        && rest.contains("Signature=")
}

fn error(e: ApiError, message: &str) -> HttpResponse {
    error_typed(e.status(), e.type_name(), message)
}

fn error_typed(status: StatusCode, type_name: &str, message: &str) -> HttpResponse {
    let body = json!({ "__type": type_name, "message": message }).to_string();
    response(status, body, Some(type_name))
}

fn response(status: StatusCode, body: String, error_type: Option<&str>) -> HttpResponse {
    let mut builder = Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("x-amzn-requestid", uuid::Uuid::new_v4().to_string());
    if let Some(t) = error_type {
        builder = builder.header("x-amzn-errortype", t);
    }
    builder
        .body(Full::new(Bytes::from(body)))
        // Only fails on invalid header values, and every value above is ASCII we built ourselves.
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

fn epoch_now() -> i64 {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    i64::try_from(secs).unwrap_or(i64::MAX)
}

/// A session token as long as STS's (about 1 KiB of base64), so that what the agent caches and
/// serves weighs what it does in a cluster; unique per call.
fn session_token(n: u64) -> String {
    let mut token = format!("e2eSession{n}-{}-", uuid::Uuid::new_v4().simple());
    let filler = "IQoJb3JpZ2luX2VjEHYaCXVzLXdlc3QtMiJHMEUCIQ+/";
    while token.len() < SESSION_TOKEN_LEN {
        token.push_str(filler);
    }
    token.truncate(SESSION_TOKEN_LEN);
    token
}

/// The length of the session tokens the stand-in issues.
pub const SESSION_TOKEN_LEN: usize = 1024;
