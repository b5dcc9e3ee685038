//! The node-local pod view end to end: the kernel places a caller in a pod (its cgroup), the
//! stand-in Kubernetes API serves that pod (list, then watch) with the container id of the
//! cgroup's scope, and the audit record names the pod, its service account and the container.
//! A change of the pod reaches the view through the watch; a watch that ends, and one whose
//! version has expired (410 Gone, then a new list), are survived; with the API away the names
//! stay; without RBAC for pods the agent serves without names and says so once.
//!
//! Needs root, cgroup v2, eBPF, python3, and the agent binary (`cargo build -p eks-pod-identity-agent`).

use std::path::PathBuf;
use std::time::Duration;

use e2e::agent::{AgentArgs, AgentProcess, node_with_web_pods, wait_audit_records};
use e2e::clients::Family;
use e2e::fake_kube_api::{self, FakeKubeApi, KubeFault, Op, SIDECAR_ID, pod_object};
use e2e::node::{Pod, SimNode};
use serde_json::{Value, json};

/// The agent's arguments with the pod view at its default (`auto`) and an audit log.
fn view_args(node: &SimNode, api: &FakeKubeApi, audit: &std::path::Path) -> AgentArgs {
    fake_kube_api::agent_args_with_view(node, api).audit_log(audit)
}

/// The simulated pod as the API server serves it: its app container has the id of the cgroup
/// the pod's processes run in; a sidecar another.
fn served(node: &SimNode, pod: &Pod) -> Value {
    fake_kube_api::served_with_sidecar(node, pod)
}

fn wait_metric(agent: &AgentProcess, series: &str, done: impl Fn(f64) -> bool) {
    let ok = e2e::wait_for(Duration::from_secs(45), || {
        agent.metric(series).is_ok_and(&done)
    });
    assert!(
        ok,
        "{series} = {:?}; log:\n{}",
        agent.metric(series),
        agent.logs().unwrap_or_default()
    );
}

/// One request from `pod` with its token; the audit record it produced (the `n`th).
fn request_record(pod: &Pod, audit: &std::path::Path, n: usize) -> Value {
    let r = pod
        .python_requests(Family::V4, &pod.token_path(), 1, false)
        .unwrap();
    assert_eq!(r.exchanges[0].status, Some(200), "{r:?}");
    let records = wait_audit_records(audit, n, Duration::from_secs(5)).unwrap();
    records[n - 1].clone()
}

fn audit_path(node: &SimNode) -> PathBuf {
    node.dir().join("audit.log")
}

#[test]
fn audit_records_name_the_pod_and_container_the_kernel_saw() {
    if !e2e::privileged("audit_records_name_the_pod_and_container_the_kernel_saw") {
        return;
    }
    let (node, fake, [web]) = node_with_web_pods("e2e-pod-view", ["web"]).unwrap();
    let api = fake_kube_api::start_in(node.netns()).unwrap();
    api.add_pod(served(&node, &web));
    // A pod of another node: not this node's to watch.
    api.add_pod(pod_object(
        "another-node",
        "shop",
        "elsewhere",
        "3c1e5b7a-0000-4000-8000-000000000001",
        "web-sa",
        &[("app", SIDECAR_ID)],
    ));
    let _: k8s_openapi::api::core::v1::Pod = serde_json::from_value(served(&node, &web)).unwrap();
    let audit = audit_path(&node);
    let agent = AgentProcess::start(&node, &fake, view_args(&node, &api, &audit)).unwrap();
    wait_metric(&agent, "pod_identity_pod_view_synced", |v| v == 1.0);
    assert_eq!(agent.metric("pod_identity_pod_view_pods").unwrap(), 1.0);

    // One list of this node's pods, then one watch from its version, long and with bookmarks.
    let requests = api.requests();
    let list = requests.iter().find(|r| r.op == Op::ListPods).unwrap();
    let query = list.query.as_deref().unwrap_or_default();
    let selector = format!("fieldSelector=spec.nodeName%3D{}", node.name());
    assert!(query.contains(&selector), "{query}");
    let watch = requests.iter().find(|r| r.op == Op::WatchPods).unwrap();
    let query = watch.query.as_deref().unwrap_or_default();
    assert!(query.contains(&selector), "{query}");
    assert!(query.contains("timeoutSeconds=290"), "{query}");
    assert!(query.contains("allowWatchBookmarks=true"), "{query}");
    assert!(e2e::wait_for(Duration::from_secs(10), || api.pod_watches() == 1));

    web.refresh_token(&fake).unwrap();
    let record = request_record(&web, &audit, 1);
    assert_eq!(
        record["pod"],
        json!({"namespace": "shop", "name": "web", "service_account": "web-sa",
               "container": "app", "token_matches": true}),
        "{record}"
    );
    assert_eq!(record["caller"]["container_id"], web.container_id.as_str());
    assert_eq!(
        record["token"]["service_account"], "web-sa",
        "the claims beside"
    );

    // The pod changes (a new service account in its spec, the container renamed): through
    // the watch. The token still names web-sa: flagged and counted.
    api.bookmark_pod_watches();
    assert!(api.update_pod(&web.uid, |pod| {
        pod["spec"]["serviceAccountName"] = json!("other-sa");
        pod["status"]["containerStatuses"][0]["name"] = json!("main");
    }));
    let ok = e2e::wait_for(Duration::from_secs(10), || {
        let n = e2e::agent::read_audit_log(&audit).unwrap().len() + 1;
        request_record(&web, &audit, n)["pod"]["service_account"] == "other-sa"
    });
    assert!(ok, "the change did not reach the view");
    let record = e2e::agent::read_audit_log(&audit).unwrap().pop().unwrap();
    assert_eq!(record["pod"]["container"], "main", "{record}");
    assert_eq!(record["pod"]["token_matches"], false, "{record}");
    assert!(
        agent
            .metric("pod_identity_pod_view_token_mismatch_total")
            .unwrap()
            >= 1.0
    );
    assert_eq!(
        api.count(Op::ListPods),
        1,
        "a change comes through the watch, no list"
    );

    // The watch ends (as at its timeout): resumed from where it was, no new list.
    api.end_pod_watches();
    assert!(
        e2e::wait_for(Duration::from_secs(10), || api.pod_watches() == 1),
        "the watch was not resumed"
    );
    assert_eq!(api.count(Op::ListPods), 1);

    // An etcd compaction: the resumed watch meets 410 Gone, and the view is listed again. A
    // change made meanwhile (the service account back) is in the new list.
    api.expire_pod_watches();
    assert!(api.update_pod(&web.uid, |pod| {
        pod["spec"]["serviceAccountName"] = json!("web-sa");
    }));
    wait_metric(
        &agent,
        "pod_identity_pod_view_errors_total{reason=\"expired\"}",
        |v| v >= 1.0,
    );
    assert!(
        e2e::wait_for(Duration::from_secs(10), || api.count(Op::ListPods) == 2),
        "no new list after 410: {:?}",
        api.requests()
            .iter()
            .map(|r| (r.op, r.status))
            .collect::<Vec<_>>()
    );
    wait_metric(&agent, "pod_identity_pod_view_synced", |v| v == 1.0);
    let n = e2e::agent::read_audit_log(&audit).unwrap().len() + 1;
    let record = request_record(&web, &audit, n);
    assert_eq!(record["pod"]["service_account"], "web-sa", "{record}");
    assert_eq!(record["pod"]["token_matches"], true, "{record}");

    // The API server goes away: the watch ends and cannot come back. The names stay.
    api.set_fault(None, KubeFault::Status(503), None);
    api.end_pod_watches();
    wait_metric(&agent, "pod_identity_pod_view_synced", |v| v == 0.0);
    let record = request_record(&web, &audit, n + 1);
    assert_eq!(
        record["pod"],
        json!({"namespace": "shop", "name": "web", "service_account": "web-sa",
               "container": "main", "token_matches": true}),
        "the last view: {record}"
    );
    assert_eq!(agent.metric("pod_identity_pod_view_pods").unwrap(), 1.0);
    assert!(
        agent
            .metric("pod_identity_pod_view_errors_total{reason=\"unavailable\"}")
            .unwrap()
            >= 1.0
    );

    // Back: the next change puts the view in step again.
    api.clear_fault();
    assert!(
        e2e::wait_for(Duration::from_secs(40), || api.pod_watches() == 1),
        "the watch did not come back"
    );
    api.delete_pod(&web.uid);
    wait_metric(&agent, "pod_identity_pod_view_pods", |v| v == 0.0);
    wait_metric(&agent, "pod_identity_pod_view_synced", |v| v == 1.0);
    let record = request_record(&web, &audit, n + 2);
    assert!(
        record.get("pod").is_none(),
        "a deleted pod is not named: {record}"
    );

    let token = std::fs::read_to_string(web.token_path()).unwrap();
    assert!(
        !agent.logs().unwrap().contains(token.trim()),
        "never the token"
    );
}

#[test]
fn without_rbac_for_pods_the_agent_serves_without_names_and_says_so_once() {
    if !e2e::privileged("without_rbac_for_pods_the_agent_serves_without_names_and_says_so_once") {
        return;
    }
    let (node, fake, [web]) = node_with_web_pods("e2e-pod-view-rbac", ["web"]).unwrap();
    let api = fake_kube_api::start_in(node.netns()).unwrap();
    api.add_pod(served(&node, &web));
    api.set_fault(Some(Op::ListPods), KubeFault::Status(403), None);
    let audit = audit_path(&node);
    let agent = AgentProcess::start(&node, &fake, view_args(&node, &api, &audit)).unwrap();
    wait_metric(
        &agent,
        "pod_identity_pod_view_errors_total{reason=\"forbidden\"}",
        |v| v >= 2.0,
    );
    web.refresh_token(&fake).unwrap();
    let record = request_record(&web, &audit, 1);
    assert!(record.get("pod").is_none(), "{record}");
    assert_eq!(record["caller"]["pod_uid"], web.uid.as_str());
    assert_eq!(agent.metric("pod_identity_pod_view_synced").unwrap(), 0.0);
    let logs = agent.logs().unwrap();
    assert_eq!(
        logs.matches("forbidden to list or watch pods").count(),
        1,
        "{logs}"
    );

    // RBAC granted: the names come with the next list.
    api.clear_fault();
    wait_metric(&agent, "pod_identity_pod_view_synced", |v| v == 1.0);
    let record = request_record(&web, &audit, 2);
    assert_eq!(record["pod"]["name"], "web", "{record}");
}
