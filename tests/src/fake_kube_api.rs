//! A stand-in Kubernetes API server for the few endpoints the agent uses, speaking their real JSON.
//!
//! - `GET /api/v1/nodes/{name}`: a `Node` (metadata with `uid`, `resourceVersion`,
//!   `creationTimestamp` and labels; `spec.taints`; `status` with conditions, addresses and
//!   `nodeInfo`).
//! - `GET /version` (`major`/`minor` the test sets, 1.34 by default), and, once a test gives the
//!   fake a key set, `GET /openid/v1/jwks` and `GET /.well-known/openid-configuration` (404
//!   before), as the API server serves its service-account issuer's keys.
//! - `PATCH /api/v1/nodes/{name}`: `application/merge-patch+json` (RFC 7386) or
//!   `application/strategic-merge-patch+json` (applied the same way: for the fields the agent
//!   patches, taints and an Event's scalars, a strategic merge replaces as a merge patch does). A
//!   `metadata.resourceVersion` in the patch is a precondition, as in the real API: 409 `Conflict`
//!   when the object changed. JSON patches and server-side apply answer 415.
//! - `POST /api/v1/namespaces/{ns}/events` (201, the object with `uid`, `resourceVersion` and
//!   `creationTimestamp`; 409 `AlreadyExists`; the real API's namespace checks) and
//!   `PATCH /api/v1/namespaces/{ns}/events/{name}` (404 `NotFound` when it is gone).
//!
//! - `GET /api/v1/pods` (list, and watch with `watch=true`): see [`pods`].
//!
//! Every request needs `Authorization: Bearer <token>` (401 `Unauthorized` otherwise); errors are
//! `Status` objects. Tests inject faults per operation (an error status, a hang, a dropped
//! connection), make another writer change a node under the agent's patch (a real conflict), run
//! a hook on every request (e.g. to probe the agent's `/readyz` at that moment), and read what was
//! asked. `tests/tests/startup_taint.rs` checks these shapes against k8s-openapi's types.

mod pods;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::task::JoinSet;

pub use pods::{SIDECAR_ID, pod_object, served_with_sidecar};

/// The API call a request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    GetNode,
    PatchNode,
    CreateEvent,
    PatchEvent,
    Version,
    Jwks,
    OpenIdConfiguration,
    /// `GET /api/v1/pods`.
    ListPods,
    /// `GET /api/v1/pods?watch=true`.
    WatchPods,
    /// Anything else (404).
    Other,
}

/// A misbehaviour to inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KubeFault {
    /// Answer with this status (and a `Status` object with the matching reason).
    Status(u16),
    /// Never answer.
    Hang,
    /// Close the connection without an answer.
    Drop,
}

/// One request the fake received.
#[derive(Debug, Clone)]
pub struct KubeRequest {
    pub op: Op,
    pub method: String,
    pub path: String,
    /// The query string, as sent (percent-encoded).
    pub query: Option<String>,
    pub content_type: Option<String>,
    pub authorization: Option<String>,
    pub body: String,
    /// When it arrived.
    pub at: Instant,
    /// The status answered (0: none, a hang or a dropped connection).
    pub status: u16,
}

impl KubeRequest {
    /// The body as JSON (`Null` when it is not JSON).
    #[must_use]
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
}

type Hook = Arc<dyn Fn(&KubeRequest) + Send + Sync>;

struct Faults {
    op: Option<Op>,
    fault: KubeFault,
    /// `None`: until cleared.
    left: Option<u32>,
}

#[derive(Default)]
struct State {
    resource_version: u64,
    nodes: BTreeMap<String, Value>,
    events: BTreeMap<(String, String), Value>,
    fault: Option<Faults>,
    concurrent_writes: u32,
    requests: Vec<KubeRequest>,
    hook: Option<Hook>,
    /// `/version`'s major and minor; 1.34 when unset.
    version: Option<(String, String)>,
    /// The service-account issuer's key set; `None`: 404.
    jwks: Option<Value>,
    pods: pods::Pods,
}

impl State {
    fn next_rv(&mut self) -> String {
        self.resource_version += 1;
        self.resource_version.to_string()
    }
}

struct Shared {
    token: String,
    state: Mutex<State>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The fake's own runtime, stopped (hung connections included) when the last clone goes.
struct ServerRuntime(Option<tokio::runtime::Runtime>);

impl Drop for ServerRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// A running stand-in API server. Cheap to clone.
#[derive(Clone)]
pub struct FakeKubeApi {
    shared: Arc<Shared>,
    addr: SocketAddr,
    _runtime: Arc<ServerRuntime>,
}

impl std::fmt::Debug for FakeKubeApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeKubeApi")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl FakeKubeApi {
    /// Serves on `listener` (bound where the agent can reach it, e.g. the node's loopback), on a
    /// runtime of its own, accepting `Bearer <token>` only.
    pub fn start(listener: std::net::TcpListener, token: &str) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("fake-kube-api")
            .enable_all()
            .build()
            .context("building the fake API's runtime")?;
        listener
            .set_nonblocking(true)
            .context("set_nonblocking on the fake API's listener")?;
        let addr = listener.local_addr().context("local_addr")?;
        let listener = {
            let _guard = runtime.enter();
            tokio::net::TcpListener::from_std(listener).context("registering the listener")?
        };
        let shared = Arc::new(Shared {
            token: token.to_owned(),
            state: Mutex::new(State::default()),
        });
        runtime.spawn(accept_loop(listener, Arc::clone(&shared)));
        Ok(Self {
            shared,
            addr,
            _runtime: Arc::new(ServerRuntime(Some(runtime))),
        })
    }

    /// Where it listens.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Writes a kubeconfig that points a client at this server with its token.
    pub fn write_kubeconfig(&self, path: &Path) -> Result<()> {
        let config = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{}\n\
             users:\n- name: agent\n  user:\n    token: {}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: agent\n\
             current-context: fake\n",
            self.addr, self.shared.token
        );
        std::fs::write(path, config).with_context(|| format!("writing {}", path.display()))
    }

    /// Adds (or replaces) a node with these `(key, effect)` taints.
    pub fn add_node(&self, name: &str, taints: &[(&str, &str)]) {
        let mut state = self.shared.state();
        let rv = state.next_rv();
        let now = rfc3339(SystemTime::now());
        let taints: Vec<Value> = taints
            .iter()
            .map(|(key, effect)| json!({"key": key, "effect": effect}))
            .collect();
        let node = json!({
            "kind": "Node",
            "apiVersion": "v1",
            "metadata": {
                "name": name,
                "uid": uuid::Uuid::new_v4().to_string(),
                "resourceVersion": rv,
                "creationTimestamp": now,
                "labels": {
                    "kubernetes.io/hostname": name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "node.kubernetes.io/instance-type": "m7i.large",
                },
            },
            "spec": {"providerID": "aws:///us-west-2a/i-0e2e0e2e0e2e0e2e0", "taints": taints},
            "status": {
                "conditions": [{
                    "type": "Ready", "status": "True", "reason": "KubeletReady",
                    "message": "kubelet is posting ready status",
                    "lastHeartbeatTime": now, "lastTransitionTime": now,
                }],
                "addresses": [
                    {"type": "InternalIP", "address": "10.0.0.1"},
                    {"type": "Hostname", "address": name},
                ],
                "nodeInfo": {
                    "architecture": "amd64", "bootID": uuid::Uuid::new_v4().to_string(),
                    "containerRuntimeVersion": "containerd://1.7.27", "kernelVersion": "6.1.0",
                    "kubeProxyVersion": "", "kubeletVersion": "v1.33.0",
                    "machineID": "ec2e2e", "operatingSystem": "linux",
                    "osImage": "Amazon Linux 2023", "systemUUID": "ec2e2e",
                },
            },
        });
        state.nodes.insert(name.to_owned(), node);
    }

    /// A node as the API has it now.
    #[must_use]
    pub fn node(&self, name: &str) -> Option<Value> {
        self.shared.state().nodes.get(name).cloned()
    }

    /// A node's taints as `(key, effect)`.
    #[must_use]
    pub fn taints(&self, name: &str) -> Vec<(String, String)> {
        let Some(node) = self.node(name) else {
            return Vec::new();
        };
        node.pointer("/spec/taints")
            .and_then(Value::as_array)
            .map(|taints| {
                taints
                    .iter()
                    .map(|t| {
                        let s = |k: &str| t[k].as_str().unwrap_or_default().to_owned();
                        (s("key"), s("effect"))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Another writer adds a taint to the node just before each of the next `n` node patches
    /// applies (so a patch conditional on what was read meets a real conflict).
    pub fn concurrent_writes(&self, n: u32) {
        self.shared.state().concurrent_writes = n;
    }

    /// Injects `fault` for requests of `op` (every operation when `None`), for the next `times`
    /// of them or until [`Self::clear_fault`] (`None`).
    pub fn set_fault(&self, op: Option<Op>, fault: KubeFault, times: Option<u32>) {
        self.shared.state().fault = Some(Faults {
            op,
            fault,
            left: times,
        });
    }

    /// Removes any injected fault.
    pub fn clear_fault(&self) {
        self.shared.state().fault = None;
    }

    /// Runs `hook` on every request, before it is answered (on the fake's thread).
    pub fn on_request(&self, hook: impl Fn(&KubeRequest) + Send + Sync + 'static) {
        self.shared.state().hook = Some(Arc::new(hook));
    }

    /// Every request so far.
    #[must_use]
    pub fn requests(&self) -> Vec<KubeRequest> {
        self.shared.state().requests.clone()
    }

    /// Serves `keys` (JWKs) at `/openid/v1/jwks`; `None`: 404 there.
    pub fn set_jwks(&self, keys: Option<Vec<Value>>) {
        self.shared.state().jwks = keys.map(|keys| json!({ "keys": keys }));
    }

    /// What `/version` says (EKS writes minors like `"34+"`).
    pub fn set_version(&self, major: &str, minor: &str) {
        self.shared.state().version = Some((major.to_owned(), minor.to_owned()));
    }

    /// The requests of `op` so far.
    #[must_use]
    pub fn count(&self, op: Op) -> usize {
        self.shared
            .state()
            .requests
            .iter()
            .filter(|r| r.op == op)
            .count()
    }

    /// The Events stored now.
    #[must_use]
    pub fn events(&self) -> Vec<Value> {
        self.shared.state().events.values().cloned().collect()
    }
}

async fn accept_loop(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
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
        while connections.try_join_next().is_some() {}
    }
}

type HttpResponse = Response<Full<Bytes>>;
/// What the connection serves: a whole body, or a watch's stream.
type AnyResponse = Response<UnsyncBoxBody<Bytes, std::io::Error>>;

fn whole(response: HttpResponse) -> AnyResponse {
    response.map(|body| body.map_err(|never| match never {}).boxed_unsync())
}

fn classify(method: &str, path: &str, query: Option<&str>) -> (Op, Vec<String>) {
    let parts: Vec<String> = path
        .trim_start_matches('/')
        .split('/')
        .map(str::to_owned)
        .collect();
    let p: Vec<&str> = parts.iter().map(String::as_str).collect();
    let op = match (method, p.as_slice()) {
        ("GET", ["api", "v1", "nodes", _]) => Op::GetNode,
        ("PATCH", ["api", "v1", "nodes", _]) => Op::PatchNode,
        ("POST", ["api", "v1", "namespaces", _, "events"]) => Op::CreateEvent,
        ("PATCH", ["api", "v1", "namespaces", _, "events", _]) => Op::PatchEvent,
        ("GET", ["version"]) => Op::Version,
        ("GET", ["openid", "v1", "jwks"]) => Op::Jwks,
        ("GET", [".well-known", "openid-configuration"]) => Op::OpenIdConfiguration,
        ("GET", ["api", "v1", "pods"]) => {
            if pods::query_params(query).get("watch").map(String::as_str) == Some("true") {
                Op::WatchPods
            } else {
                Op::ListPods
            }
        }
        _ => Op::Other,
    };
    (op, parts)
}

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<AnyResponse, std::io::Error> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    };
    let (op, path) = classify(parts.method.as_str(), parts.uri.path(), parts.uri.query());
    let mut request = KubeRequest {
        op,
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(str::to_owned),
        content_type: header("content-type"),
        authorization: header("authorization"),
        body: String::from_utf8_lossy(&body).into_owned(),
        at: Instant::now(),
        status: 0,
    };
    let (fault, hook) = {
        let mut state = shared.state();
        (take_fault(&mut state, op), state.hook.clone())
    };
    if let Some(hook) = hook {
        hook(&request);
    }
    let response = match fault {
        Some(KubeFault::Hang) => {
            shared.state().requests.push(request);
            return std::future::pending().await;
        }
        Some(KubeFault::Drop) => {
            shared.state().requests.push(request);
            return Err(std::io::Error::other("injected: connection dropped"));
        }
        Some(KubeFault::Status(code)) => status(code, "injected fault", None),
        None if request.authorization.as_deref() != Some(&format!("Bearer {}", shared.token)) => {
            status(401, "Unauthorized", None)
        }
        None if op == Op::WatchPods => {
            let params = pods::query_params(request.query.as_deref());
            let response = pods::watch(&shared, &params);
            request.status = response.status().as_u16();
            shared.state().requests.push(request);
            return Ok(response);
        }
        None => answer(&shared, &request, &path),
    };
    request.status = response.status().as_u16();
    shared.state().requests.push(request);
    Ok(whole(response))
}

fn take_fault(state: &mut State, op: Op) -> Option<KubeFault> {
    let faults = state.fault.as_mut()?;
    if faults.op.is_some_and(|o| o != op) {
        return None;
    }
    let fault = faults.fault;
    match &mut faults.left {
        None => {}
        Some(0) => {
            state.fault = None;
            return None;
        }
        Some(n) => {
            *n -= 1;
            if *n == 0 {
                state.fault = None;
            }
        }
    }
    Some(fault)
}

/// What the real API server does, faults aside.
fn answer(shared: &Shared, req: &KubeRequest, path: &[String]) -> HttpResponse {
    match req.op {
        Op::GetNode => {
            let state = shared.state();
            match state.nodes.get(&path[3]) {
                Some(node) => json_response(StatusCode::OK, node),
                None => not_found("nodes", &path[3]),
            }
        }
        Op::PatchNode => patch_node(shared, req, &path[3]),
        Op::CreateEvent => create_event(shared, req, &path[3]),
        Op::PatchEvent => patch_event(shared, req, &path[3], &path[5]),
        Op::Version => {
            let state = shared.state();
            let (major, minor) = state
                .version
                .clone()
                .unwrap_or_else(|| ("1".to_owned(), "34".to_owned()));
            json_response(
                StatusCode::OK,
                &json!({
                    "major": major, "minor": minor,
                    "gitVersion": format!("v{major}.{}.0", minor.trim_end_matches('+')),
                    "platform": "linux/amd64",
                }),
            )
        }
        Op::Jwks => match &shared.state().jwks {
            Some(jwks) => json_response(StatusCode::OK, jwks),
            None => status(
                404,
                "the server could not find the requested resource",
                None,
            ),
        },
        Op::OpenIdConfiguration => match &shared.state().jwks {
            Some(_) => json_response(
                StatusCode::OK,
                &json!({
                    "issuer": "https://kubernetes.default.svc",
                    "jwks_uri": "https://kubernetes.default.svc/openid/v1/jwks",
                    "response_types_supported": ["id_token"],
                    "subject_types_supported": ["public"],
                    "id_token_signing_alg_values_supported": ["RS256"],
                }),
            ),
            None => status(
                404,
                "the server could not find the requested resource",
                None,
            ),
        },
        Op::ListPods | Op::WatchPods => {
            pods::list(shared, &pods::query_params(req.query.as_deref()))
        }
        Op::Other => status(
            404,
            "the server could not find the requested resource",
            None,
        ),
    }
}

fn patch_body(req: &KubeRequest) -> Result<Value, Box<HttpResponse>> {
    match req.content_type.as_deref() {
        Some("application/merge-patch+json" | "application/strategic-merge-patch+json") => {}
        other => {
            return Err(Box::new(status(
                415,
                &format!("the fake supports merge and strategic merge patches, not {other:?}"),
                None,
            )));
        }
    }
    serde_json::from_str(&req.body)
        .map_err(|e| Box::new(status(400, &format!("invalid patch: {e}"), None)))
}

fn patch_node(shared: &Shared, req: &KubeRequest, name: &str) -> HttpResponse {
    let patch = match patch_body(req) {
        Ok(p) => p,
        Err(r) => return *r,
    };
    let mut state = shared.state();
    if !state.nodes.contains_key(name) {
        return not_found("nodes", name);
    }
    if state.concurrent_writes > 0 {
        state.concurrent_writes -= 1;
        let rv = state.next_rv();
        if let Some(node) = state.nodes.get_mut(name) {
            if let Some(taints) = node
                .pointer_mut("/spec/taints")
                .and_then(Value::as_array_mut)
            {
                taints.push(
                    json!({"key": "other.example.com/added-meanwhile", "effect": "NoSchedule"}),
                );
            }
            node["metadata"]["resourceVersion"] = json!(rv);
        }
    }
    let current_rv = state.nodes[name]["metadata"]["resourceVersion"].clone();
    if let Some(wanted) = patch.pointer("/metadata/resourceVersion")
        && *wanted != current_rv
    {
        return status(
            409,
            &format!(
                "Operation cannot be fulfilled on nodes \"{name}\": the object has been modified; please apply your changes to the latest version and try again"
            ),
            Some(("nodes", name)),
        );
    }
    let rv = state.next_rv();
    let Some(node) = state.nodes.get_mut(name) else {
        return not_found("nodes", name);
    };
    merge(node, &patch);
    node["metadata"]["resourceVersion"] = json!(rv);
    json_response(StatusCode::OK, node)
}

fn create_event(shared: &Shared, req: &KubeRequest, namespace: &str) -> HttpResponse {
    let Ok(mut event) = serde_json::from_str::<Value>(&req.body) else {
        return status(400, "the body is not JSON", None);
    };
    if event["kind"] != "Event" || event["apiVersion"] != "v1" {
        return status(400, "the body is not a v1 Event", None);
    }
    if let Some(ns) = event.pointer("/metadata/namespace").and_then(Value::as_str)
        && ns != namespace
    {
        return status(
            400,
            "the namespace of the provided object does not match the namespace sent on the request",
            None,
        );
    }
    if event
        .pointer("/involvedObject/namespace")
        .and_then(Value::as_str)
        != Some(namespace)
    {
        return status(
            422,
            "involvedObject.namespace: does not match event.namespace",
            None,
        );
    }
    let Some(name) = event
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .map(str::to_owned)
    else {
        return status(422, "metadata.name: Required value", None);
    };
    let mut state = shared.state();
    let key = (namespace.to_owned(), name.clone());
    if state.events.contains_key(&key) {
        return status(
            409,
            &format!("events \"{name}\" already exists"),
            Some(("events", &name)),
        );
    }
    let rv = state.next_rv();
    event["metadata"]["namespace"] = json!(namespace);
    event["metadata"]["uid"] = json!(uuid::Uuid::new_v4().to_string());
    event["metadata"]["resourceVersion"] = json!(rv);
    event["metadata"]["creationTimestamp"] = json!(rfc3339(SystemTime::now()));
    state.events.insert(key, event.clone());
    json_response(StatusCode::CREATED, &event)
}

fn patch_event(shared: &Shared, req: &KubeRequest, namespace: &str, name: &str) -> HttpResponse {
    let patch = match patch_body(req) {
        Ok(p) => p,
        Err(r) => return *r,
    };
    let mut state = shared.state();
    let rv = state.next_rv();
    let Some(event) = state
        .events
        .get_mut(&(namespace.to_owned(), name.to_owned()))
    else {
        return not_found("events", name);
    };
    merge(event, &patch);
    event["metadata"]["resourceVersion"] = json!(rv);
    json_response(StatusCode::OK, event)
}

/// RFC 7386: objects merge key by key, `null` removes, anything else replaces.
fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    if let Value::Object(target) = target {
        for (key, value) in patch {
            if value.is_null() {
                target.remove(key);
            } else {
                merge(target.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

fn not_found(kind: &str, name: &str) -> HttpResponse {
    status(
        404,
        &format!("{kind} \"{name}\" not found"),
        Some((kind, name)),
    )
}

/// A `Status` object, as the API answers every error.
fn status(code: u16, message: &str, details: Option<(&str, &str)>) -> HttpResponse {
    let reason = match code {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        409 if message.contains("already exists") => "AlreadyExists",
        409 => "Conflict",
        415 => "UnsupportedMediaType",
        422 => "Invalid",
        429 => "TooManyRequests",
        500 => "InternalError",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "Unknown",
    };
    let mut body = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    });
    if let Some((kind, name)) = details {
        body["details"] = json!({"name": name, "kind": kind});
    }
    json_response(
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        &body,
    )
}

fn json_response(status: StatusCode, body: &Value) -> HttpResponse {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("audit-id", uuid::Uuid::new_v4().to_string())
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

/// `2026-11-25T12:57:38Z`.
#[must_use]
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Starts the fake inside `netns` on `127.0.0.1:<ephemeral>` (where the agent, in the node, reaches
/// it), with a fresh token.
pub fn start_in(netns: &crate::netns::NetNs) -> Result<FakeKubeApi> {
    let listener = netns
        .run(|| std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)))?
        .context("binding the fake API inside the node")?;
    FakeKubeApi::start(listener, &format!("e2e-{}", uuid::Uuid::new_v4().simple()))
}

/// The agent's arguments to reach `api` from `node`: a kubeconfig in the node's directory
/// (`KUBECONFIG`) and the node's name (`NODE_NAME`), as the DaemonSet gives them.
///
/// # Panics
/// The kubeconfig cannot be written.
#[must_use]
pub fn agent_args(node: &crate::node::SimNode, api: &FakeKubeApi) -> crate::agent::AgentArgs {
    let kubeconfig = node.dir().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig)
        .unwrap_or_else(|e| panic!("writing {}: {e:#}", kubeconfig.display()));
    crate::agent::AgentArgs {
        env: vec![
            ("KUBECONFIG".into(), kubeconfig.display().to_string()),
            ("NODE_NAME".into(), node.name().to_owned()),
        ],
        // These tests count the agent's API calls: token validation's own (tests/validation.rs)
        // and the pod view's (tests/pod_view.rs) stay out of them.
        extra: vec![
            "--token-validation".into(),
            "off".into(),
            "--pod-view".into(),
            "off".into(),
        ],
        ..crate::agent::AgentArgs::default()
    }
}

/// [`agent_args`] with the pod view at its default (`auto`: on, with the kubeconfig).
pub fn agent_args_with_view(
    node: &crate::node::SimNode,
    api: &FakeKubeApi,
) -> crate::agent::AgentArgs {
    let mut args = agent_args(node, api);
    if let Some(at) = args.extra.iter().position(|a| a == "--pod-view") {
        args.extra.drain(at..at + 2);
    }
    args
}

/// Waits up to 45 s for the agent's `pod_identity_pod_view_synced` to be `value` (1: listed and
/// watching; 0: the watch is down); panics with the agent's log otherwise.
pub fn wait_view_synced(agent: &crate::agent::AgentProcess, value: f64) {
    let synced = crate::wait_for(Duration::from_secs(45), || {
        agent
            .metric("pod_identity_pod_view_synced")
            .is_ok_and(|v| v == value)
    });
    assert!(
        synced,
        "pod view synced != {value}: {}",
        agent.logs().unwrap_or_default()
    );
}
