//! The stand-in API's pods: list and watch, as an informer on one node uses them.
//!
//! - `GET /api/v1/pods?fieldSelector=spec.nodeName%3D<node>`: a `PodList` of that node's pods, with
//!   the list's `resourceVersion` (any `limit`, `resourceVersion=0` and `resourceVersionMatch`
//!   are accepted; one page, as the API server's watch cache serves it).
//! - `...&watch=true&resourceVersion=<rv>`: the changes after `<rv>` as JSON lines (`ADDED`,
//!   `MODIFIED`, `DELETED`; `BOOKMARK` after the replay when `allowWatchBookmarks=true`, and
//!   whenever a test asks), then live ones, until `timeoutSeconds` (the API server's 1800 s when
//!   absent) or until a test ends every watch. A `<rv>` older than the history kept is answered
//!   200 with one `ERROR` event holding a 410 `Expired` `Status`, as the API server does, so the
//!   client lists again.
//!
//! Pods are JSON the test builds ([`pod_object`] gives the kubelet's shape, with
//! `containerStatuses`), changed through [`super::FakeKubeApi::add_pod`] and its siblings.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::BodyExt as _;
use hyper::body::Frame;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::{Shared, State, rfc3339};

/// What the pods endpoint keeps: the pods, their changes (for watches resuming from a version)
/// and the open watches.
#[derive(Default)]
pub(super) struct Pods {
    pub(super) by_uid: BTreeMap<String, Value>,
    /// Every change: (resourceVersion, type, object).
    history: Vec<(u64, &'static str, Value)>,
    /// Versions below this are gone from the history (410 for a watch from one of them).
    oldest: u64,
    watches: Vec<Watch>,
}

struct Watch {
    node: Option<String>,
    lines: mpsc::UnboundedSender<Bytes>,
}

/// One watch's body: its lines as they come, ended at its deadline or when the fake drops it.
pub(super) struct WatchBody {
    lines: mpsc::UnboundedReceiver<Bytes>,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl hyper::body::Body for WatchBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = self.get_mut();
        if this.deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        this.lines
            .poll_recv(cx)
            .map(|line| line.map(|l| Ok(Frame::data(l))))
    }
}

/// A query string's parameters, percent-decoded.
pub(super) fn query_params(query: Option<&str>) -> BTreeMap<String, String> {
    query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The node a `fieldSelector` asks for (`spec.nodeName=<node>`); `None`: every pod.
fn node_selector(params: &BTreeMap<String, String>) -> Result<Option<String>, String> {
    let Some(selector) = params.get("fieldSelector").filter(|s| !s.is_empty()) else {
        return Ok(None);
    };
    match selector.split_once('=') {
        Some(("spec.nodeName", node)) => Ok(Some(node.trim_start_matches('=').to_owned())),
        _ => Err(format!(
            "the fake serves fieldSelector spec.nodeName=<node> only, not {selector:?}"
        )),
    }
}

fn on_node(pod: &Value, node: Option<&str>) -> bool {
    node.is_none_or(|n| pod.pointer("/spec/nodeName").and_then(Value::as_str) == Some(n))
}

fn line(kind: &str, object: &Value) -> Bytes {
    let mut l = json!({"type": kind, "object": object}).to_string();
    l.push('\n');
    Bytes::from(l)
}

fn bookmark(rv: u64) -> Value {
    json!({"kind": "Pod", "apiVersion": "v1", "metadata": {"resourceVersion": rv.to_string()}})
}

/// `GET /api/v1/pods` without `watch`.
pub(super) fn list(shared: &Shared, params: &BTreeMap<String, String>) -> super::HttpResponse {
    let node = match node_selector(params) {
        Ok(node) => node,
        Err(message) => return super::status(400, &message, None),
    };
    let state = shared.state();
    let items: Vec<&Value> = state
        .pods
        .by_uid
        .values()
        .filter(|p| on_node(p, node.as_deref()))
        .collect();
    super::json_response(
        StatusCode::OK,
        &json!({
            "kind": "PodList",
            "apiVersion": "v1",
            "metadata": {"resourceVersion": state.resource_version.to_string()},
            "items": items,
        }),
    )
}

/// `GET /api/v1/pods?watch=true`: the response head now, the lines as they come.
pub(super) fn watch(shared: &Shared, params: &BTreeMap<String, String>) -> super::AnyResponse {
    let node = match node_selector(params) {
        Ok(node) => node,
        Err(message) => return super::whole(super::status(400, &message, None)),
    };
    let from: Option<u64> = match params.get("resourceVersion").map(String::as_str) {
        None | Some("" | "0") => None,
        Some(rv) => match rv.parse() {
            Ok(rv) => Some(rv),
            Err(_) => {
                let message = format!("invalid resourceVersion {rv:?}");
                return super::whole(super::status(400, &message, None));
            }
        },
    };
    let timeout = params
        .get("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .map_or(Duration::from_secs(1800), Duration::from_secs);
    let bookmarks = params.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    let (tx, rx) = mpsc::unbounded_channel();
    let mut state = shared.state();
    let current = state.resource_version;
    match from {
        Some(rv) if rv < state.pods.oldest => {
            let _ = tx.send(line(
                "ERROR",
                &json!({
                    "kind": "Status", "apiVersion": "v1", "metadata": {},
                    "status": "Failure",
                    "message": format!("too old resource version: {rv} ({})", state.pods.oldest),
                    "reason": "Expired", "code": 410,
                }),
            ));
            drop(tx);
        }
        _ => {
            if let Some(rv) = from {
                for (version, kind, object) in &state.pods.history {
                    if *version > rv && on_node(object, node.as_deref()) {
                        let _ = tx.send(line(kind, object));
                    }
                }
            }
            if bookmarks {
                let _ = tx.send(line("BOOKMARK", &bookmark(current)));
            }
            state.pods.watches.push(Watch { node, lines: tx });
        }
    }
    let body = WatchBody {
        lines: rx,
        deadline: Box::pin(tokio::time::sleep(timeout)),
    };
    let mut response = Response::new(body.boxed_unsync());
    response.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("application/json"),
    );
    response
}

impl State {
    /// Records a change of `object` and sends it to the watches of its node.
    pub(super) fn pod_changed(&mut self, kind: &'static str, object: Value) {
        let rv = self.resource_version;
        self.pods.watches.retain(|w| {
            !on_node(&object, w.node.as_deref()) || w.lines.send(line(kind, &object)).is_ok()
        });
        self.pods.history.push((rv, kind, object));
    }

    pub(super) fn pod_bookmark(&mut self) {
        let rv = self.resource_version;
        self.pods
            .watches
            .retain(|w| w.lines.send(line("BOOKMARK", &bookmark(rv))).is_ok());
    }

    /// Ends every open watch.
    pub(super) fn end_pod_watches(&mut self) {
        self.pods.watches.clear();
    }

    /// Forgets the history up to now (an etcd compaction): a watch resuming from an earlier
    /// version gets 410 Gone.
    pub(super) fn expire_pod_history(&mut self) {
        let rv = self.next_rv();
        self.pods.oldest = rv.parse().unwrap_or(u64::MAX);
        self.pods.history.clear();
    }
}

/// The runtime id of the `istio-proxy` sidecar [`served_with_sidecar`] gives a pod.
pub const SIDECAR_ID: &str = "5e1dcafe0000000000000000000000000000000000000000000000000000beef";

/// A simulated pod as the API server serves it: its `app` container has the id of the cgroup the
/// pod's processes run in, an `istio-proxy` sidecar [`SIDECAR_ID`].
#[must_use]
pub fn served_with_sidecar(node: &crate::node::SimNode, pod: &crate::node::Pod) -> Value {
    pod_object(
        node.name(),
        &pod.namespace,
        &pod.name,
        &pod.uid,
        &pod.service_account,
        &[("app", &pod.container_id), ("istio-proxy", SIDECAR_ID)],
    )
}

/// A pod as the API server serves it once the kubelet runs it: `Running`, with a
/// `containerStatuses` entry (`containerd://<id>`) per `(name, runtime id)` of `containers`.
#[must_use]
pub fn pod_object(
    node: &str,
    namespace: &str,
    name: &str,
    uid: &str,
    service_account: &str,
    containers: &[(&str, &str)],
) -> Value {
    let now = rfc3339(std::time::SystemTime::now());
    let specs: Vec<Value> = containers
        .iter()
        .map(|(name, _)| json!({"name": name, "image": format!("public.ecr.aws/docker/library/{name}:1")}))
        .collect();
    let statuses: Vec<Value> = containers
        .iter()
        .map(|(name, id)| {
            json!({
                "name": name, "ready": true, "restartCount": 0, "started": true,
                "image": format!("public.ecr.aws/docker/library/{name}:1"),
                "imageID": format!("public.ecr.aws/docker/library/{name}@sha256:{}", "0".repeat(64)),
                "containerID": format!("containerd://{id}"),
                "state": {"running": {"startedAt": now}},
            })
        })
        .collect();
    json!({
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {
            "name": name, "namespace": namespace, "uid": uid,
            "creationTimestamp": now,
            "labels": {"app": name},
            "annotations": {"kubectl.kubernetes.io/restartedAt": now},
            "managedFields": [{
                "manager": "kubelet", "operation": "Update", "apiVersion": "v1", "time": now,
                "fieldsType": "FieldsV1", "fieldsV1": {"f:status": {"f:phase": {}}},
                "subresource": "status",
            }],
        },
        "spec": {
            "nodeName": node,
            "serviceAccountName": service_account,
            "containers": specs,
            "restartPolicy": "Always",
        },
        "status": {
            "phase": "Running",
            "podIP": "10.0.0.10",
            "startTime": now,
            "containerStatuses": statuses,
        },
    })
}

impl super::FakeKubeApi {
    /// Adds a pod (or replaces one with the same `metadata.uid`): `ADDED` (`MODIFIED` when it
    /// replaces) to the watches of its node.
    pub fn add_pod(&self, mut pod: Value) {
        let mut state = self.shared.state();
        let rv = state.next_rv();
        pod["metadata"]["resourceVersion"] = json!(rv);
        let uid = pod["metadata"]["uid"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let kind = if state.pods.by_uid.contains_key(&uid) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        state.pods.by_uid.insert(uid, pod.clone());
        state.pod_changed(kind, pod);
    }

    /// Changes the pod `uid` with `change`: `MODIFIED`. False when there is no such pod.
    pub fn update_pod(&self, uid: &str, change: impl FnOnce(&mut Value)) -> bool {
        let mut state = self.shared.state();
        let rv = state.next_rv();
        let Some(pod) = state.pods.by_uid.get_mut(uid) else {
            return false;
        };
        change(pod);
        pod["metadata"]["resourceVersion"] = json!(rv);
        let pod = pod.clone();
        state.pod_changed("MODIFIED", pod);
        true
    }

    /// Deletes the pod `uid`: `DELETED`.
    pub fn delete_pod(&self, uid: &str) -> bool {
        let mut state = self.shared.state();
        let rv = state.next_rv();
        let Some(mut pod) = state.pods.by_uid.remove(uid) else {
            return false;
        };
        pod["metadata"]["resourceVersion"] = json!(rv);
        state.pod_changed("DELETED", pod);
        true
    }

    /// A pod as the API has it now.
    #[must_use]
    pub fn pod(&self, uid: &str) -> Option<Value> {
        self.shared.state().pods.by_uid.get(uid).cloned()
    }

    /// Sends a `BOOKMARK` at the current version to every open watch.
    pub fn bookmark_pod_watches(&self) {
        self.shared.state().pod_bookmark();
    }

    /// Ends every open watch (as the API server does at `timeoutSeconds`, or on a restart).
    pub fn end_pod_watches(&self) {
        self.shared.state().end_pod_watches();
    }

    /// An etcd compaction: the history so far is gone, every open watch ends, and a watch
    /// resuming from a version before now gets 410 Gone (so the client lists again).
    pub fn expire_pod_watches(&self) {
        let mut state = self.shared.state();
        state.expire_pod_history();
        state.end_pod_watches();
    }

    /// Open watches of pods.
    #[must_use]
    pub fn pod_watches(&self) -> usize {
        let mut state = self.shared.state();
        state.pods.watches.retain(|w| !w.lines.is_closed());
        state.pods.watches.len()
    }
}
