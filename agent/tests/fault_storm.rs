//! The fault storm (issue 8, item 4): hours of EKS Auth flapping — server errors, hangs,
//! throttling, garbage, slow answers, reset connections — against 2000 cached identities, on
//! tokio's paused clock.
//!
//! Everything real but the network: the EKS Auth client (`aws-sdk-eksauth` with the agent's
//! production timeouts and retries, its own timeouts firing on paused time), the credential cache
//! with production settings, and the credential endpoint. The stand-in HTTP client answers
//! according to a "weather" the test changes over simulated time.
//!
//! Checked, at a probe every few simulated minutes:
//! - every identity is answered 200 with its own credentials from the cache (no upstream call),
//!   unless the credentials it was last served have truly run out (less than 15 s left);
//! - memory (bytes and allocations live, counted by this binary's allocator) and tasks do not
//!   grow: no later probe exceeds the most seen during the first renewal round under an outage,
//!   and at rest at the end they are what they were at rest after that round;
//! - requests for new tokens dropped midway (SDK clients that give up) leave nothing behind;
//! - every identity is renewed in each renewal round, outages notwithstanding;
//!
//! and at the end, in fair weather: nothing is in flight or queued towards EKS Auth, every
//! identity is served again, and garbage answers made no metric labels of their own.
//!
//! Not exercised here: the node-wide and per-pod request limits (they count on the real clock and
//! a probe asks 2000 times at one instant), and token binding (no kernel attribution).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_smithy_runtime_api::client::http::{
    HttpClient, HttpConnector, HttpConnectorFuture, HttpConnectorSettings, SharedHttpConnector,
};
use aws_smithy_runtime_api::client::orchestrator::{HttpRequest, HttpResponse};
use aws_smithy_runtime_api::client::result::ConnectorError;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_runtime_api::http::StatusCode;
use aws_smithy_types::body::SdkBody;
use bytes::Bytes;
use futures::future::join_all;
use http::Request;
use http_body_util::BodyExt as _;
use pod_identity_agent::attribution::{Attribution, Caller, Policy};
use pod_identity_agent::clock::Clock;
use pod_identity_agent::config::{CacheConfig, RateLimit, TokenBinding, UpstreamConfig};
use pod_identity_agent::credentials::cache::CredentialCache;
use pod_identity_agent::credentials::eks_auth::EksAuth;
use pod_identity_agent::http::{CREDENTIALS_PATH, Endpoint};
use pod_identity_agent::metrics::{Metrics, NamespaceLabels};
use pod_identity_agent::token::{Claims, unsigned_token};
use serde_json::json;
use tokio::time::Instant;

// ---------------------------------------------------------------------------------------------
// Memory in use, counted by the allocator.

static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);
static LIVE_ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

/// The system allocator, counting the bytes and allocations live.
struct Counting;

// SAFETY: every call is forwarded to `System` with the caller's arguments; the counters only
// observe.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as is.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE_BYTES.fetch_add(layout.size(), Ordering::Relaxed);
            LIVE_ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as is.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE_BYTES.fetch_add(layout.size(), Ordering::Relaxed);
            LIVE_ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as is.
        unsafe { System.dealloc(ptr, layout) };
        LIVE_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
        LIVE_ALLOCATIONS.fetch_sub(1, Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded as is.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE_BYTES.fetch_add(new_size, Ordering::Relaxed);
            LIVE_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Bytes and allocations live, and tasks alive on the runtime.
#[derive(Debug, Clone, Copy, Default)]
struct Footprint {
    bytes: usize,
    allocations: usize,
    tasks: usize,
}

impl Footprint {
    fn now() -> Self {
        Footprint {
            bytes: LIVE_BYTES.load(Ordering::Relaxed),
            allocations: LIVE_ALLOCATIONS.load(Ordering::Relaxed),
            tasks: tokio::runtime::Handle::current()
                .metrics()
                .num_alive_tasks(),
        }
    }

    fn max(self, other: Footprint) -> Footprint {
        Footprint {
            bytes: self.bytes.max(other.bytes),
            allocations: self.allocations.max(other.allocations),
            tasks: self.tasks.max(other.tasks),
        }
    }
}

impl fmt::Display for Footprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:>9} bytes ({:>6.1} KiB) in {:>6} allocations, {:>4} tasks",
            self.bytes,
            self.bytes as f64 / 1024.0,
            self.allocations,
            self.tasks
        )
    }
}

/// The storm's later probes against the most seen in its first hours, which include the first
/// renewal round under a 90-minute outage (every entry's renewal pending at once) and its
/// completion. Allowed on top, for what legitimately appears later: a metric series seen for the
/// first time (an error code first met by a renewal), queues and maps at a new high-water mark of
/// their capacity, a few more renewals pending at the moment of the probe, a dropped request's
/// call still under way: 5 % plus 256 KiB, 1024 allocations, 4 tasks.
fn within_peak(peak: Footprint, now: Footprint) -> bool {
    now.bytes <= peak.bytes + peak.bytes / 20 + 256 * 1024
        && now.allocations <= peak.allocations + 1024
        && now.tasks <= peak.tasks + 4
}

/// At rest (nothing pending, nothing in flight) at the end against at rest at the checkpoint:
/// only new metric series and high-water marks, 1 % plus 64 KiB and 256 allocations; the same
/// tasks. A leak of one allocation per dropped request (over a thousand of them after the
/// checkpoint) goes past it.
fn within_rest(rest: Footprint, now: Footprint) -> bool {
    now.bytes <= rest.bytes + rest.bytes / 100 + 64 * 1024
        && now.allocations <= rest.allocations + 256
        && now.tasks <= rest.tasks
}

// ---------------------------------------------------------------------------------------------
// EKS Auth's weather and the stand-in HTTP client that plays it.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Weather {
    /// Credentials after 30 ms.
    Healthy,
    /// 500 `InternalServerException` and 503 `ServiceUnavailableException`, alternately.
    ServerErrors,
    /// Never answers: the SDK's timeouts must end the call.
    Hang,
    /// 429 `ThrottlingException`.
    Throttling,
    /// 200 with a body that is not JSON, 200 with truncated JSON, a proxy's 502 HTML page, and a
    /// 500 whose error type is garbled (a new one every time).
    Garbage,
    /// Credentials after 7/8 of the default attempt timeout (within it).
    Slow,
    /// Credentials after 7/4 of the default attempt timeout: past it, so never received.
    Slower,
    /// The connection is reset.
    Reset,
}

const WEATHERS: [Weather; 8] = [
    Weather::Healthy,
    Weather::ServerErrors,
    Weather::Hang,
    Weather::Throttling,
    Weather::Garbage,
    Weather::Slow,
    Weather::Slower,
    Weather::Reset,
];

impl Weather {
    /// No call can succeed.
    fn fails(self) -> bool {
        !matches!(self, Weather::Healthy | Weather::Slow)
    }
}

/// EKS Auth as the stand-in plays it.
struct Sky {
    weather: Mutex<Weather>,
    clock: Clock,
    /// HTTP attempts, by the weather they met.
    attempts: [AtomicU64; WEATHERS.len()],
    next: AtomicU64,
    /// Answers under way (hung ones included, until the SDK drops them), and their most.
    open: AtomicI64,
    most_open: AtomicI64,
}

impl Sky {
    fn new(clock: Clock) -> Arc<Self> {
        Arc::new(Sky {
            weather: Mutex::new(Weather::Healthy),
            clock,
            attempts: Default::default(),
            next: AtomicU64::new(0),
            open: AtomicI64::new(0),
            most_open: AtomicI64::new(0),
        })
    }

    fn weather(&self) -> Weather {
        *self.weather.lock().unwrap()
    }

    fn set(&self, weather: Weather) {
        *self.weather.lock().unwrap() = weather;
    }

    fn attempts(&self) -> u64 {
        self.attempts
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .sum()
    }

    async fn answer(self: Arc<Self>, request: HttpRequest) -> Result<HttpResponse, ConnectorError> {
        let weather = self.weather();
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let index = WEATHERS.iter().position(|w| *w == weather).unwrap();
        self.attempts[index].fetch_add(1, Ordering::Relaxed);
        let _open = Open::new(&self);
        let claims = claims_of(&request);
        match weather {
            Weather::Healthy => {
                tokio::time::sleep(Duration::from_millis(30)).await;
                Ok(reply(200, None, self.credentials(&claims, n)))
            }
            Weather::Slow | Weather::Slower => {
                let attempt = UpstreamConfig::default().attempt_timeout;
                let delay = if weather == Weather::Slow {
                    attempt * 7 / 8
                } else {
                    attempt * 7 / 4
                };
                tokio::time::sleep(delay).await;
                Ok(reply(200, None, self.credentials(&claims, n)))
            }
            Weather::ServerErrors => {
                tokio::time::sleep(Duration::from_millis(5)).await;
                let (status, code) = if n.is_multiple_of(2) {
                    (500, "InternalServerException")
                } else {
                    (503, "ServiceUnavailableException")
                };
                Ok(error(status, code, &format!("request {n} failed")))
            }
            Weather::Throttling => {
                let message = format!("Rate exceeded ({n})");
                Ok(error(429, "ThrottlingException", &message))
            }
            Weather::Hang => std::future::pending().await,
            Weather::Garbage => Ok(self.garbage(&claims, n)),
            Weather::Reset => Err(ConnectorError::io("connection reset by peer".into())),
        }
    }

    /// Four kinds of garbage, in turn.
    fn garbage(&self, claims: &Claims, n: u64) -> HttpResponse {
        match n % 4 {
            0 => reply(200, None, format!("\u{1}\u{2}<<garbage {n}>>\u{ff}")),
            1 => {
                let mut body = self.credentials(claims, n);
                body.truncate(body.len() / 2);
                reply(200, None, body)
            }
            2 => {
                let page = format!("<html><body>502 Bad Gateway (proxy {n})</body></html>");
                reply(502, None, page)
            }
            _ => {
                let garbled = format!("com.amazonaws.eksauth#Garbled{n:x}");
                let body = json!({"__type": garbled, "message": "?"});
                reply(500, None, body.to_string())
            }
        }
    }

    /// Six-hour credentials, a new access key id each time: `ASIA` `STORM` and the pod's number,
    /// or `GHOST` and the dropped request's.
    fn credentials(&self, claims: &Claims, n: u64) -> String {
        let pod = claims.pod_name().unwrap();
        let key = match pod.strip_prefix("pod-") {
            Some(i) => format!("ASIASTORM{i}X{n:010}"),
            None => format!("ASIAGHOSTX{n:010}"),
        };
        let expiration = self.clock.now() + CREDENTIAL_LIFE;
        let expiration = expiration.duration_since(UNIX_EPOCH).unwrap().as_secs();
        let session = format!("eks-storm-{pod}");
        let service_account = claims.service_account().unwrap();
        json!({
            "subject": {"namespace": NAMESPACE, "serviceAccount": service_account},
            "audience": "pods.eks.amazonaws.com",
            "podIdentityAssociation": {
                "associationArn": "arn:aws:eks:us-west-2:111122223333:podidentityassociation/a",
                "associationId": "a-storm",
            },
            "assumedRoleUser": {
                "arn": format!("arn:aws:sts::111122223333:assumed-role/storm-role/{session}"),
                "assumeRoleId": format!("AROASTORM:{session}"),
            },
            "credentials": {
                "sessionToken": format!("storm-session-{n}"),
                "secretAccessKey": format!("storm-secret-{n}"),
                "accessKeyId": key,
                "expiration": expiration,
            },
        })
        .to_string()
    }
}

/// An answer under way.
struct Open<'a>(&'a Sky);

impl<'a> Open<'a> {
    fn new(sky: &'a Sky) -> Self {
        let open = sky.open.fetch_add(1, Ordering::Relaxed) + 1;
        sky.most_open.fetch_max(open, Ordering::Relaxed);
        Open(sky)
    }
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The claims of the token in an `AssumeRoleForPodIdentity` request (`{"token": …}`).
fn claims_of(request: &HttpRequest) -> Claims {
    let body: serde_json::Value =
        serde_json::from_slice(request.body().bytes().expect("an in-memory body")).unwrap();
    Claims::parse(body["token"].as_str().unwrap()).unwrap()
}

fn reply(status: u16, error_type: Option<&str>, body: String) -> HttpResponse {
    let mut response =
        HttpResponse::new(StatusCode::try_from(status).unwrap(), SdkBody::from(body));
    response
        .headers_mut()
        .insert("content-type", "application/json");
    if let Some(t) = error_type {
        response
            .headers_mut()
            .insert("x-amzn-errortype", t.to_owned());
    }
    response
}

/// EKS Auth's error shape (restJson1): `X-Amzn-ErrorType` and `{"__type", "message"}`.
fn error(status: u16, code: &str, message: &str) -> HttpResponse {
    reply(
        status,
        Some(code),
        json!({"__type": code, "message": message}).to_string(),
    )
}

/// The stand-in HTTP client: every request is answered by the sky, on tokio's clock.
#[derive(Clone)]
struct StandIn(Arc<Sky>);

impl fmt::Debug for StandIn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StandIn")
    }
}

impl HttpConnector for StandIn {
    fn call(&self, request: HttpRequest) -> HttpConnectorFuture {
        HttpConnectorFuture::new(self.0.clone().answer(request))
    }
}

impl HttpClient for StandIn {
    fn http_connector(
        &self,
        _settings: &HttpConnectorSettings,
        _components: &RuntimeComponents,
    ) -> SharedHttpConnector {
        SharedHttpConnector::new(self.clone())
    }
}

// ---------------------------------------------------------------------------------------------
// The agent, as `server` builds it with its default flags.

const PODS: usize = 2000;
const NAMESPACE: &str = "storm";
const HOST: &str = "169.254.170.23";
const CREDENTIAL_LIFE: Duration = Duration::from_secs(6 * 3600);
const MIN_REMAINING: Duration = Duration::from_secs(15);
const MINUTE: Duration = Duration::from_secs(60);

/// The agent's defaults (`--max-cache-size` raised above the 2000 identities).
fn cache_config() -> CacheConfig {
    CacheConfig {
        max_entries: 2500,
        min_remaining: MIN_REMAINING,
        ..CacheConfig::default()
    }
}

async fn eks_auth(sky: &Arc<Sky>) -> EksAuth {
    let sdk_config = EksAuth::loader(&UpstreamConfig::default())
        .region(aws_config::Region::new("us-west-2"))
        .credentials_provider(aws_credential_types::Credentials::new(
            "AKIDFAULTSTORM",
            "fault-storm-secret",
            None,
            None,
            "fault-storm",
        ))
        .http_client(StandIn(sky.clone()))
        .load()
        .await;
    EksAuth::from_sdk_config(&sdk_config, "storm-cluster".into())
}

/// A projected token of pod `name`, valid for a day.
fn token(clock: &Clock, name: &str, sa: usize) -> String {
    let now = clock.unix_now();
    unsigned_token(&json!({
        "aud": ["pods.eks.amazonaws.com"], "exp": now + 86_400, "iat": now, "nbf": now,
        "jti": format!("jti-{name}"),
        "sub": format!("system:serviceaccount:{NAMESPACE}:sa-{sa}"),
        "kubernetes.io": {
            "namespace": NAMESPACE,
            "pod": {"name": name, "uid": format!("uid-{name}")},
            "serviceaccount": {"name": format!("sa-{sa}"), "uid": "s"}
        }
    }))
}

/// One credential request, as a pod's SDK makes it: the status and the body.
async fn ask(endpoint: &Endpoint<EksAuth>, caller: &Caller, token: &str) -> (u16, Bytes) {
    let request = Request::builder()
        .method("GET")
        .uri(CREDENTIALS_PATH)
        .header("host", HOST)
        .header("authorization", token)
        .body(())
        .unwrap();
    let response = endpoint.handle(request, caller).await;
    let status = response.status().as_u16();
    (
        status,
        response.into_body().collect().await.unwrap().to_bytes(),
    )
}

/// The access key id and expiration of a credentials body.
fn served(body: &[u8]) -> (String, SystemTime) {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap();
    let key = v["AccessKeyId"].as_str().unwrap().to_owned();
    let expiration = humantime::parse_rfc3339(v["Expiration"].as_str().unwrap()).unwrap();
    (key, expiration)
}

/// What an identity was last served.
struct Held {
    key: String,
    expiration: SystemTime,
}

#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    probes: usize,
    served: usize,
    /// Not served, its last credentials having run out.
    expired: usize,
    /// Served by a new upstream call after its credentials ran out.
    refetched: usize,
    dropped: usize,
    ghosts_answered: usize,
}

struct Storm {
    endpoint: Endpoint<EksAuth>,
    cache: CredentialCache<EksAuth>,
    metrics: Metrics,
    sky: Arc<Sky>,
    clock: Clock,
    caller: Caller,
    tokens: Vec<String>,
    held: Vec<Option<Held>>,
    ghosts: usize,
    tally: Tally,
}

impl Storm {
    fn state(&self, state: &str) -> u64 {
        self.metrics.cache_state.with_label_values(&[state]).get()
    }

    /// Phase 1: every pod asks until served (a request whose call cannot finish by its deadline
    /// is answered 429, and the call goes on: the SDK's retry a second later is a hit).
    async fn fetch_all(&mut self) {
        for round in 0.. {
            let missing: Vec<usize> = (0..PODS).filter(|&i| self.held[i].is_none()).collect();
            if missing.is_empty() {
                eprintln!("phase 1: {PODS} identities cached in {round} rounds");
                return;
            }
            assert!(round < 30, "{} identities still not served", missing.len());
            let answers = join_all(
                missing
                    .iter()
                    .map(|&i| ask(&self.endpoint, &self.caller, &self.tokens[i])),
            )
            .await;
            for (&i, (status, body)) in missing.iter().zip(answers) {
                match status {
                    200 => {
                        let (key, expiration) = served(&body);
                        self.held[i] = Some(Held { key, expiration });
                    }
                    429 => {}
                    other => panic!("pod {i} answered {other} in fair weather"),
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Every identity asks once. Each must be served its own credentials with at least
    /// `MIN_REMAINING` left, no older than what it was served before — from the cache — unless
    /// what it was last served has run out.
    async fn probe(&mut self) {
        let now = self.clock.now();
        let ran_out = |held: &Option<Held>| {
            held.as_ref().is_none_or(|h| {
                h.expiration.duration_since(now).unwrap_or_default() < MIN_REMAINING
            })
        };
        let may_refetch = self.held.iter().filter(|h| ran_out(h)).count();
        let before = (
            self.state("hit"),
            self.state("miss"),
            self.state("coalesced"),
        );
        let weather = self.sky.weather();
        let answers = join_all(
            self.tokens
                .iter()
                .map(|t| ask(&self.endpoint, &self.caller, t)),
        )
        .await;
        let now = self.clock.now();
        let mut served_here = 0;
        for (i, (status, body)) in answers.into_iter().enumerate() {
            if status == 200 {
                let (key, expiration) = served(&body);
                assert_eq!(
                    key.get(9..13),
                    Some(format!("{i:04}").as_str()),
                    "pod {i} was served another pod's credentials ({key})"
                );
                assert!(
                    expiration.duration_since(now).unwrap_or_default() >= MIN_REMAINING,
                    "pod {i} was served credentials with less than {MIN_REMAINING:?} left ({key})"
                );
                if let Some(held) = &self.held[i] {
                    assert!(
                        expiration >= held.expiration,
                        "pod {i} was served older credentials ({key}) than before ({})",
                        held.key
                    );
                }
                self.held[i] = Some(Held { key, expiration });
                served_here += 1;
            } else {
                assert!(
                    ran_out(&self.held[i]),
                    "pod {i} answered {status} in {weather:?} weather at {:?} while its \
                     credentials ({}) had {:?} left",
                    self.elapsed(),
                    self.held[i].as_ref().map_or("", |h| h.key.as_str()),
                    self.held[i]
                        .as_ref()
                        .map(|h| h.expiration.duration_since(now).unwrap_or_default()),
                );
                self.tally.expired += 1;
            }
        }
        let hits = self.state("hit") - before.0;
        let refetched = (self.state("miss") - before.1) + (self.state("coalesced") - before.2);
        assert_eq!(
            (hits + refetched) as usize,
            served_here,
            "every answer is a hit or a call"
        );
        assert!(
            refetched as usize <= may_refetch,
            "{refetched} identities were fetched upstream while only {may_refetch} had run out"
        );
        self.tally.probes += 1;
        self.tally.served += served_here;
        self.tally.refetched += refetched as usize;
    }

    /// New pods whose SDKs give up after 200 ms: their calls go on without them, and fail.
    async fn drop_requests(&mut self, n: usize) {
        let tokens: Vec<String> = (0..n)
            .map(|k| token(&self.clock, &format!("ghost-{}", self.ghosts + k), k))
            .collect();
        self.ghosts += n;
        let answers = join_all(tokens.iter().map(|t| {
            tokio::time::timeout(
                Duration::from_millis(200),
                ask(&self.endpoint, &self.caller, t),
            )
        }))
        .await;
        for answer in answers {
            match answer {
                Err(_) => self.tally.dropped += 1,
                Ok((status, _)) => {
                    assert_ne!(status, 200, "a new token served in failing weather");
                    self.tally.ghosts_answered += 1;
                }
            }
        }
    }

    /// Every identity was last served credentials issued after the stand-in's `n`th answer.
    fn assert_renewed_since(&self, n: u64, round: &str) {
        let stale = |held: &Option<Held>| {
            let key = &held.as_ref().unwrap().key;
            key[14..].parse::<u64>().unwrap() < n
        };
        let count = self.held.iter().filter(|h| stale(h)).count();
        assert_eq!(
            count,
            0,
            "{count} identities not renewed by {round}, pod {:?} first",
            self.held.iter().position(stale)
        );
    }

    /// Simulated time since the test began.
    fn elapsed(&self) -> Duration {
        self.clock.now().duration_since(start()).unwrap()
    }
}

/// The wall clock's reading when the test begins (it then follows tokio's clock).
fn start() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

/// The weather, spell by spell (minutes). The first renewal round is due about 2 h 55 min after
/// the identities were cached: 90 minutes of hangs cover it, so every identity lives on its old
/// credentials; the round then completes through short fair spells between throttling, server
/// errors and slow answers. The second round (about 3 h later) meets another 90-minute outage,
/// of every kind of failure in turn.
const SCHEDULE: &[(u64, Weather)] = &[
    (10, Weather::Healthy),
    (20, Weather::ServerErrors),
    (10, Weather::Healthy),
    (30, Weather::Hang),
    (20, Weather::Throttling),
    (30, Weather::Garbage),
    (20, Weather::Slow),
    (15, Weather::Slower),
    (15, Weather::Reset),
    (90, Weather::Hang), // 2:50–4:20, over the first renewal round
    (5, Weather::Healthy),
    (20, Weather::Throttling),
    (10, Weather::Slow),
    (25, Weather::ServerErrors),
    (10, Weather::Healthy),
    (20, Weather::Garbage),
    (15, Weather::Reset),
    (20, Weather::Slower),
    (10, Weather::Healthy),
    (15, Weather::Throttling),
    // 6:50–8:20, over the second renewal round: no call succeeds.
    (15, Weather::Hang),
    (20, Weather::Garbage),
    (20, Weather::ServerErrors),
    (15, Weather::Reset),
    (20, Weather::Slower),
    // The second round completes.
    (15, Weather::Slow),
    (15, Weather::Throttling),
    (10, Weather::Healthy),
    (15, Weather::Garbage),
    (15, Weather::ServerErrors),
    (30, Weather::Healthy),
];

/// Every identity asks this often.
const PROBE_EVERY: u64 = 10;
/// The checkpoint: the first renewal round is over, nothing is pending (memory and task counts at
/// rest); the probes until then set the peak the later ones are held to.
const CHECKPOINT: u64 = 330;
/// New tokens whose requests are dropped, at each probe in failing weather.
const DROPPED_PER_PROBE: usize = 50;
/// Fair weather at the end, for everything to settle.
const SETTLE: Duration = Duration::from_secs(30 * 60);

#[tokio::test(start_paused = true)]
async fn two_thousand_identities_ride_out_hours_of_eks_auth_flapping() {
    let wall = std::time::Instant::now();
    let origin = Instant::now();
    let at_start = Footprint::now();
    let clock = Clock::tokio(start());
    let sky = Sky::new(clock);
    let metrics = Metrics::new().unwrap();
    let cache = CredentialCache::new(
        eks_auth(&sky).await,
        cache_config(),
        clock,
        metrics.clone(),
        None,
    );
    let attribution = Attribution::new(
        None,
        None,
        Policy {
            binding: TokenBinding::Audit,
            ..Policy::off()
        },
        prometheus::IntCounter::new("refused", "refused").unwrap(),
    );
    let endpoint = Endpoint::new(
        cache.clone(),
        vec![HOST.parse().unwrap()],
        RateLimit {
            per_second: 0,
            burst: 0,
        },
        Arc::new(attribution),
        None,
        metrics.clone(),
        Arc::new(NamespaceLabels::new(64)),
        clock,
    );
    let mut storm = Storm {
        endpoint,
        cache,
        metrics,
        sky: sky.clone(),
        clock,
        caller: Caller::unattributed("169.254.200.1:40000".parse().unwrap()),
        tokens: (0..PODS)
            .map(|i| token(&clock, &format!("pod-{i:04}"), i % 40))
            .collect(),
        held: (0..PODS).map(|_| None).collect(),
        ghosts: 0,
        tally: Tally::default(),
    };

    // Phase 1: fair weather, every identity cached.
    storm.fetch_all().await;
    let first_round = storm.sky.next.load(Ordering::Relaxed);
    assert_eq!(storm.cache.entry_count().await, PODS as u64);
    let after_fetch = Footprint::now();
    let series_after_fetch = series(&storm.metrics);

    // Phase 2: the storm. Events: a spell starts, or a probe is due.
    let mut spells = BTreeMap::new();
    let mut t = 0;
    for &(minutes, weather) in SCHEDULE {
        spells.insert(t, (weather, t + minutes));
        t += minutes;
    }
    let end = t;
    let mut spell_end = 0;
    let mut peak = Footprint::default();
    let mut at_rest: Option<Footprint> = None;
    let mut most = Footprint::default();
    let mut series_at_checkpoint = 0;
    let mut second_round = 0;
    let mut events: BTreeSet<u64> = spells.keys().copied().collect();
    events.extend((0..end).step_by(PROBE_EVERY as usize));
    for minute in events {
        tokio::time::sleep_until(origin + MINUTE * minute as u32).await;
        if let Some(&(weather, until)) = spells.get(&minute) {
            storm.sky.set(weather);
            spell_end = until;
        }
        if !minute.is_multiple_of(PROBE_EVERY) {
            continue;
        }
        // Measured before this probe's own requests.
        let now = Footprint::now();
        if minute == CHECKPOINT {
            storm.assert_renewed_since(first_round, "the first renewal round");
            second_round = storm.sky.next.load(Ordering::Relaxed);
            peak = peak.max(now);
            at_rest = Some(now);
            series_at_checkpoint = series(&storm.metrics);
        } else if at_rest.is_some() {
            most = most.max(now);
            assert!(
                within_peak(peak, now),
                "at {minute} min: {now} against the peak of the first hours, {peak}"
            );
        } else {
            peak = peak.max(now);
        }
        storm.probe().await;
        if storm.sky.weather().fails() && spell_end - minute >= 5 {
            storm.drop_requests(DROPPED_PER_PROBE).await;
        }
    }
    let at_rest = at_rest.unwrap();
    storm.assert_renewed_since(second_round, "the second renewal round");

    // Phase 3: fair weather, everything settles.
    storm.sky.set(Weather::Healthy);
    tokio::time::sleep_until(origin + MINUTE * end as u32 + SETTLE).await;
    let in_flight = storm.metrics.upstream_in_flight.get();
    let queued = |t: &str| storm.metrics.upstream_queued.with_label_values(&[t]).get();
    assert_eq!(in_flight, 0, "calls still in flight towards EKS Auth");
    assert_eq!(
        (queued("fetch"), queued("refresh")),
        (0, 0),
        "calls still queued"
    );
    assert_eq!(
        storm.sky.open.load(Ordering::Relaxed),
        0,
        "answers still open"
    );
    let before = storm.tally;
    storm.probe().await;
    assert_eq!(
        storm.tally.served - before.served,
        PODS,
        "every identity served again in fair weather"
    );
    assert_eq!(
        storm.cache.entry_count().await,
        PODS as u64,
        "no entry of a dropped request"
    );
    let at_end = Footprint::now();
    assert!(
        within_rest(at_rest, at_end),
        "at the end: {at_end} against {at_rest} at the checkpoint"
    );

    // Bounded label sets: error codes, not messages.
    let text = String::from_utf8(storm.metrics.render()).unwrap();
    let codes: BTreeSet<&str> = text
        .lines()
        .filter(|l| l.starts_with("pod_identity_cache_errors{"))
        .filter_map(|l| l.split("code=\"").nth(1)?.split('"').next())
        .collect();
    let series_at_end = series(&storm.metrics);
    let simulated = Instant::now() - origin;

    eprintln!(
        "fault storm: {PODS} identities, {:.1} h simulated ({} min of weather, then {} min fair), in {:.1} s wall-clock",
        simulated.as_secs_f64() / 3600.0,
        end,
        SETTLE.as_secs() / 60,
        wall.elapsed().as_secs_f64()
    );
    eprintln!("  EKS Auth HTTP attempts by weather:");
    for (w, n) in WEATHERS.iter().zip(&storm.sky.attempts) {
        eprintln!("    {w:?}: {}", n.load(Ordering::Relaxed));
    }
    eprintln!(
        "    total {}, at most {} open at once",
        storm.sky.attempts(),
        storm.sky.most_open.load(Ordering::Relaxed)
    );
    eprintln!(
        "  probes: {} x {PODS} requests: {} served, {} not served with expired credentials, {} refetched after expiry",
        storm.tally.probes, storm.tally.served, storm.tally.expired, storm.tally.refetched
    );
    eprintln!(
        "  dropped requests for new tokens: {} dropped midway, {} answered (errors) first",
        storm.tally.dropped, storm.tally.ghosts_answered
    );
    eprintln!(
        "  cache: {} hits, {} misses, {} renewals, {} evicted; in flight {in_flight}",
        storm.state("hit"),
        storm.state("miss"),
        storm.state("refresh"),
        storm.state("evicted")
    );
    eprintln!("  pod_identity_cache_errors codes: {codes:?}");
    eprintln!(
        "  metric series: {series_after_fetch} after phase 1, {series_at_checkpoint} at the checkpoint, {series_at_end} at the end"
    );
    eprintln!("  at start        {at_start}");
    eprintln!("  after phase 1   {after_fetch}");
    eprintln!("  peak to {CHECKPOINT} min {peak}");
    eprintln!("  at {CHECKPOINT} min, rest {at_rest}");
    eprintln!("  peak after      {most}");
    eprintln!("  at the end      {at_end}");

    assert!(codes.len() <= 10, "error codes as labels: {codes:?}");
    assert!(
        series_at_end <= series_at_checkpoint + 8,
        "metric series grew from {series_at_checkpoint} to {series_at_end}"
    );
}

/// Metric series exported (sample lines).
fn series(metrics: &Metrics) -> usize {
    String::from_utf8(metrics.render())
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .count()
}
