//! Per-container scoping end to end: a pod lists the containers that may receive its credentials
//! (annotation `eks-pod-identity-agent.amazonaws.com/containers`); the kernel places each caller
//! in a container cgroup of the pod, and the pod view (the stand-in Kubernetes API serving the
//! pod with its containerStatuses) names it. Under `--token-binding enforce` the other
//! containers (a sidecar, an ephemeral debug container, a process in no container) are refused,
//! a container the pod's status does not list yet is told to retry, and the refusal holds while
//! the API server is away; an Event on the pod names the container. Under `audit` they are served
//! and recorded.
//!
//! Needs root, cgroup v2, eBPF, python3 with botocore, and the agent binary.

use std::path::Path;
use std::time::Duration;

use e2e::agent::{AgentArgs, AgentProcess, node_with_web_pods, read_audit_log};
use e2e::clients::Family;
use e2e::fake_kube_api::{self, FakeKubeApi, KubeFault, SIDECAR_ID};
use e2e::node::{CREDENTIALS_URI_V4, Pod, SimNode};
use serde_json::{Value, json};

const ANNOTATION: &str = "eks-pod-identity-agent.amazonaws.com/containers";

const DEBUG_ID: &str = "de6b00000000000000000000000000000000000000000000000000000000feed";
const LATE_ID: &str = "1a7e00000000000000000000000000000000000000000000000000000000c0de";

/// The agent with the pod view (its default, `auto`), an audit log and `--token-binding mode`.
fn scope_args(node: &SimNode, api: &FakeKubeApi, audit: &Path, mode: &str) -> AgentArgs {
    fake_kube_api::agent_args_with_view(node, api)
        .audit_log(audit)
        .args(["--token-binding", mode])
}

/// `pod` as the API server serves it: containers `app` (the cgroup its processes start in) and
/// `istio-proxy`, an ephemeral `debugger`, and the containers annotation when `listed` is given.
fn served(node: &SimNode, pod: &Pod, listed: Option<&str>) -> Value {
    let mut object = fake_kube_api::served_with_sidecar(node, pod);
    object["status"]["ephemeralContainerStatuses"] = json!([{
        "name": "debugger", "ready": false, "restartCount": 0, "image": "busybox:1",
        "imageID": "", "containerID": format!("containerd://{DEBUG_ID}"),
    }]);
    if let Some(listed) = listed {
        object["metadata"]["annotations"][ANNOTATION] = json!(listed);
    }
    object
}

/// One request from the pod's current container: the exchange and its audit record.
fn ask(pod: &Pod, audit: &Path) -> (u16, String, Option<String>, Value) {
    let before = read_audit_log(audit).map_or(0, |r| r.len());
    let r = pod
        .python_requests(Family::V4, &pod.token_path(), 1, false)
        .unwrap();
    let ex = &r.exchanges[0];
    let status = ex.status.unwrap_or_else(|| panic!("no response: {r:?}"));
    let retry_after = ex
        .headers
        .iter()
        .find(|(k, _)| k == "retry-after")
        .map(|(_, v)| v.clone());
    let records = e2e::agent::wait_audit_records(audit, before + 1, Duration::from_secs(5))
        .expect("the request's audit record");
    (
        status,
        ex.body.clone(),
        retry_after,
        records[before].clone(),
    )
}

fn synced(agent: &AgentProcess, value: f64) {
    fake_kube_api::wait_view_synced(agent, value);
}

#[test]
fn under_enforce_only_the_listed_containers_of_a_pod_get_its_credentials() {
    if !e2e::privileged("under_enforce_only_the_listed_containers_of_a_pod_get_its_credentials") {
        return;
    }
    let (node, fake, [mut web]) = node_with_web_pods("e2e-scope", ["web"]).unwrap();
    let app_id = web.container_id.clone();
    let api = fake_kube_api::start_in(node.netns()).unwrap();
    api.add_pod(served(&node, &web, Some("app")));
    let audit = node.dir().join("audit.log");
    let args = scope_args(&node, &api, &audit, "enforce").args(["--pod-events"]);
    let agent = AgentProcess::start(&node, &fake, args).unwrap();
    synced(&agent, 1.0);
    web.refresh_token(&fake).unwrap();

    // The listed container: served, to a real SDK too.
    let (status, _, _, record) = ask(&web, &audit);
    assert_eq!(status, 200, "{record}");
    assert_eq!(record["pod"]["container"], "app", "{record}");
    assert_eq!(record["pod"]["container_scope"], "listed", "{record}");
    let creds = web.fetch_with_botocore(CREDENTIALS_URI_V4).unwrap();
    assert!(creds.is_ok(), "{creds:?}");

    // The sidecar: refused, with the token the app was just served for (cached), and by the SDK.
    web.enter_container(SIDECAR_ID).unwrap();
    let (status, body, _, record) = ask(&web, &audit);
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("container istio-proxy"), "{body}");
    assert!(body.contains("lists: app"), "{body}");
    assert_eq!(record["outcome"], "denied", "{record}");
    assert_eq!(record["pod"]["container"], "istio-proxy", "{record}");
    assert_eq!(record["pod"]["container_scope"], "unlisted", "{record}");
    assert_eq!(
        record["binding"], "match",
        "the token is the pod's own: {record}"
    );
    assert!(record["credentials"].is_null(), "{record}");
    let refused = web.fetch_with_botocore(CREDENTIALS_URI_V4).unwrap();
    assert!(
        refused.is_err(),
        "the sidecar's SDK got credentials: {refused:?}"
    );
    // An Event on the pod says which container and why, with the pod view's names.
    let mut event = None;
    let posted = e2e::wait_for(Duration::from_secs(10), || {
        event = api
            .events()
            .into_iter()
            .find(|e| e["reason"] == "PodIdentityContainerNotListed");
        event.is_some()
    });
    assert!(posted, "no Event: {:#?}", api.events());
    let event = event.unwrap();
    assert_eq!(event["involvedObject"]["uid"], web.uid.as_str(), "{event}");
    assert_eq!(
        event["involvedObject"]["name"],
        web.name.as_str(),
        "{event}"
    );
    let message = event["message"].as_str().unwrap_or_default();
    assert!(
        message.starts_with("Container istio-proxy of this pod"),
        "{message}"
    );
    assert!(
        message.contains("refused (--token-binding enforce)"),
        "{message}"
    );

    // A sidecar that can write its cgroupfs nests a cgroup named like the app's container below
    // its own: still the sidecar.
    web.enter_nested_cgroup(&format!("cri-containerd-{app_id}.scope"))
        .unwrap();
    let (status, _, _, record) = ask(&web, &audit);
    assert_eq!(status, 403, "{record}");
    assert_eq!(record["pod"]["container"], "istio-proxy", "{record}");

    // An ephemeral debug container, and a process of the pod in no container.
    web.enter_container(DEBUG_ID).unwrap();
    let (status, _, _, record) = ask(&web, &audit);
    assert_eq!(status, 403);
    assert_eq!(record["pod"]["container"], "debugger", "{record}");
    web.enter_container("").unwrap();
    let (status, body, _, _) = ask(&web, &audit);
    assert_eq!(status, 403);
    assert!(body.contains("in no container"), "{body}");

    // A container the pod's status does not list yet: told to retry. Once the kubelet's status
    // update (and the annotation naming it) reaches the view through the watch, served.
    web.enter_container(LATE_ID).unwrap();
    let (status, _, retry_after, record) = ask(&web, &audit);
    assert_eq!(status, 503, "{record}");
    assert_eq!(retry_after.as_deref(), Some("1"));
    assert_eq!(record["pod"]["container_scope"], "pending", "{record}");
    assert!(api.update_pod(&web.uid, |pod| {
        pod["metadata"]["annotations"][ANNOTATION] = json!("app, worker");
        pod["status"]["containerStatuses"]
            .as_array_mut()
            .unwrap()
            .push(json!({"name": "worker", "ready": true, "restartCount": 0,
                         "image": "w:1", "imageID": "",
                         "containerID": format!("containerd://{LATE_ID}")}));
    }));
    let served_late = e2e::wait_for(Duration::from_secs(10), || ask(&web, &audit).0 == 200);
    assert!(served_late, "the listed worker was not served");
    let record = read_audit_log(&audit).unwrap().pop().unwrap();
    assert_eq!(record["pod"]["container"], "worker", "{record}");

    // The API server goes away: the pod was seen with the annotation, so the sidecar stays
    // refused (the last view is kept), and the app stays served.
    api.set_fault(None, KubeFault::Status(503), None);
    api.end_pod_watches();
    synced(&agent, 0.0);
    web.enter_container(SIDECAR_ID).unwrap();
    assert_eq!(ask(&web, &audit).0, 403);
    web.enter_container(&app_id).unwrap();
    assert_eq!(ask(&web, &audit).0, 200);

    // Every refusal counted, as the records have them (botocore retries: several requests).
    let records = read_audit_log(&audit).unwrap();
    let count = |scope: &str| {
        records
            .iter()
            .filter(|r| r["pod"]["container_scope"] == scope)
            .count() as f64
    };
    assert!(count("unlisted") >= 6.0);
    for result in ["unlisted", "pending", "listed"] {
        let series = format!("pod_identity_container_scope_total{{result=\"{result}\"}}");
        assert_eq!(agent.metric(&series).unwrap(), count(result), "{series}");
    }
    // Refused before EKS Auth saw their tokens, the 403s still count under the pod's namespace:
    // the pod view's, for the pod the kernel saw.
    let refused = records.iter().filter(|r| r["http_status"] == 403).count() as f64;
    let text = agent.metrics().unwrap();
    let counted: f64 = text
        .lines()
        .filter(|l| {
            l.starts_with("pod_identity_requests_total{")
                && l.contains(r#"code="403""#)
                && l.contains(r#"namespace="shop""#)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(counted, refused, "{text}");
}

#[test]
fn under_audit_and_without_the_annotation_every_container_is_served() {
    if !e2e::privileged("under_audit_and_without_the_annotation_every_container_is_served") {
        return;
    }
    let (node, fake, [mut web, mut shop]) =
        node_with_web_pods("e2e-scope-audit", ["web", "shop"]).unwrap();
    let api = fake_kube_api::start_in(node.netns()).unwrap();
    api.add_pod(served(&node, &web, Some("app")));
    api.add_pod(served(&node, &shop, None));
    let audit = node.dir().join("audit.log");
    let agent =
        AgentProcess::start(&node, &fake, scope_args(&node, &api, &audit, "audit")).unwrap();
    synced(&agent, 1.0);
    web.refresh_token(&fake).unwrap();
    shop.refresh_token(&fake).unwrap();

    // Recorded as unlisted, served.
    web.enter_container(SIDECAR_ID).unwrap();
    let (status, _, _, record) = ask(&web, &audit);
    assert_eq!(status, 200, "{record}");
    assert_eq!(record["outcome"], "allowed", "{record}");
    assert_eq!(record["pod"]["container_scope"], "unlisted", "{record}");

    // A pod without the annotation: no scoping, nothing recorded of it.
    shop.enter_container(SIDECAR_ID).unwrap();
    let (status, _, _, record) = ask(&shop, &audit);
    assert_eq!(status, 200, "{record}");
    assert_eq!(record["pod"]["container"], "istio-proxy", "{record}");
    assert!(record["pod"].get("container_scope").is_none(), "{record}");
}
