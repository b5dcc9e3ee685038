//! Token binding end to end: the token's pod and node claims against the pod and node the kernel
//! attributes the connection to, under `--token-binding enforce` and `audit`, with and without the
//! eBPF programs; and a token rotated during an EKS Auth outage, served from the cache.
//!
//! Needs root, cgroup v2, eBPF, and the agent binary (`cargo build -p eks-pod-identity-agent`).

use std::time::Duration;

use e2e::agent::{
    AgentArgs, AgentProcess, node_with_web_pods, start_fake_eks_auth_in, wait_audit_records,
};
use e2e::clients::Family;
use e2e::fake_eks_auth::{ApiError, Fault, FaultTimes, decode_unverified};
use e2e::node::{CREDENTIALS_URI_V4, PodSpec, SimNode};
use serde_json::Value;

const AUDIT_WAIT: Duration = Duration::from_secs(10);

fn jti(token: &str) -> String {
    decode_unverified(token).unwrap().jti
}

#[test]
fn enforce_refuses_replayed_and_foreign_node_tokens_and_unattributed_callers() {
    if !e2e::privileged("enforce_refuses_replayed_and_foreign_node_tokens_and_unattributed_callers")
    {
        return;
    }
    let (node, fake, [a, b]) = node_with_web_pods("e2e-enforce", ["web-a", "web-b"]).unwrap();
    fake.associate("none", "none", "host-role");
    let c = node
        .add_pod(PodSpec::new("web-c", "shop", "web-sa"))
        .unwrap();
    let host = node.add_non_pod_caller("backup").unwrap();
    let a_token = a.refresh_token(&fake).unwrap();
    b.refresh_token(&fake).unwrap();
    // C's own pod, but a node claim naming another node than the agent's `--node-name`.
    let c_token = fake
        .issue_token(&c.token_spec().node("some-other-node", "0000-other"))
        .unwrap();
    c.write_token(&c_token).unwrap();
    let host_token = host.refresh_token(&fake).unwrap();

    let audit = node.dir().join("audit.log");
    let agent = AgentProcess::start(
        &node,
        &fake,
        AgentArgs::default()
            .audit_log(&audit)
            .args(["--token-binding", "enforce"]),
    )
    .unwrap();

    // B presents A's token (read from A's token file): refused before EKS Auth is asked.
    let replay = b
        .python_requests(Family::V4, &a.token_path(), 1, false)
        .unwrap();
    let ex = &replay.exchanges[0];
    assert_eq!(ex.status, Some(403), "{ex:?}");
    assert!(
        ex.body.contains("token binding") && ex.body.contains(&a.uid),
        "the body names the reason: {ex:?}"
    );
    assert_eq!(
        fake.calls_for_jti(&jti(&a_token)),
        0,
        "EKS Auth is not called for a replayed token"
    );
    let records = wait_audit_records(&audit, 1, AUDIT_WAIT).unwrap();
    let r = &records[0];
    assert_eq!(r["outcome"], "denied", "{r}");
    assert_eq!(r["http_status"], 403, "{r}");
    assert_eq!(r["binding"], "mismatch", "{r}");
    // The kernel saw another pod, and the token never reached EKS Auth: nothing vouches.
    assert_eq!(r["verified_by"], serde_json::json!([]), "{r}");
    assert!(
        r["reason"].as_str().is_some_and(|s| s.contains(&a.uid)),
        "{r}"
    );
    assert_eq!(r["caller"]["pod_uid"], b.uid.as_str(), "{r}");
    assert_eq!(r["caller"]["pid"], replay.pid, "{r}");
    assert_eq!(r["token"]["pod_uid"], a.uid.as_str(), "{r}");
    assert!(r.get("role_arn").is_none(), "{r}");

    // A itself is served.
    let own = a.fetch_with_botocore(CREDENTIALS_URI_V4).unwrap();
    assert!(own.is_ok(), "pod A with its own token: {own:?}");
    assert_eq!(fake.calls_for_jti(&jti(&a_token)), 1);

    // Replayed again now that A's credentials are cached: still refused, the cache is not a way round.
    let replay = b
        .python_requests(Family::V6, &a.token_path(), 1, false)
        .unwrap();
    assert_eq!(
        replay.exchanges[0].status,
        Some(403),
        "{:?}",
        replay.exchanges[0]
    );
    assert!(!replay.exchanges[0].body.contains("ASIA"));

    // A token for another node.
    let foreign = c
        .python_requests(Family::V4, &c.token_path(), 1, false)
        .unwrap();
    let ex = &foreign.exchanges[0];
    assert_eq!(ex.status, Some(403), "{ex:?}");
    assert!(
        ex.body.contains("some-other-node") && ex.body.contains(node.name()),
        "the body names both nodes: {ex:?}"
    );
    assert_eq!(fake.calls_for_jti(&jti(&c_token)), 0);

    // A caller in no pod's cgroup.
    let outside = host
        .python_requests(Family::V4, &host.token_path(), 1, false)
        .unwrap();
    let ex = &outside.exchanges[0];
    assert_eq!(ex.status, Some(403), "{ex:?}");
    assert!(ex.body.contains("token binding"), "{ex:?}");
    assert_eq!(fake.calls_for_jti(&jti(&host_token)), 0);

    let records = wait_audit_records(&audit, 5, AUDIT_WAIT).unwrap();
    let bindings: Vec<&Value> = records.iter().map(|r| &r["binding"]).collect();
    assert_eq!(
        bindings,
        ["mismatch", "match", "mismatch", "mismatch", "unattributed"],
        "{records:#?}"
    );
    for r in records.iter().filter(|r| r["binding"] != "match") {
        assert_eq!(r["outcome"], "denied", "{r}");
        assert!(r["reason"].is_string(), "{r}");
    }
    let node_record = &records[3];
    assert_eq!(node_record["token"]["node_name"], "some-other-node");
    assert_eq!(node_record["caller"]["pod_uid"], c.uid.as_str());

    for (result, count) in [("match", 1.0), ("mismatch", 3.0), ("unattributed", 1.0)] {
        assert_eq!(
            agent
                .metric(&format!(
                    "pod_identity_binding_total{{result=\"{result}\"}}"
                ))
                .unwrap(),
            count,
            "binding result {result}"
        );
    }
    assert_eq!(
        agent
            .metric("pod_identity_http_response{code=\"403\"}")
            .unwrap(),
        4.0
    );
}

#[test]
fn audit_mode_serves_a_replayed_token_and_records_the_mismatch() {
    if !e2e::privileged("audit_mode_serves_a_replayed_token_and_records_the_mismatch") {
        return;
    }
    let (node, fake, [a, b]) = node_with_web_pods("e2e-audit-mode", ["web-a", "web-b"]).unwrap();
    a.refresh_token(&fake).unwrap();
    let audit = node.dir().join("audit.log");
    let agent = AgentProcess::start(
        &node,
        &fake,
        AgentArgs::default()
            .audit_log(&audit)
            .args(["--token-binding", "audit"]),
    )
    .unwrap();

    let replay = b
        .python_requests(Family::V4, &a.token_path(), 1, false)
        .unwrap();
    assert_eq!(
        replay.exchanges[0].status,
        Some(200),
        "audit mode serves: {:?}",
        replay.exchanges[0]
    );
    let records = wait_audit_records(&audit, 1, AUDIT_WAIT).unwrap();
    let r = &records[0];
    assert_eq!(r["outcome"], "allowed", "{r}");
    assert_eq!(r["binding"], "mismatch", "{r}");
    assert_eq!(r["caller"]["pod_uid"], b.uid.as_str(), "{r}");
    assert_eq!(r["token"]["pod_uid"], a.uid.as_str(), "{r}");
    assert_eq!(
        agent
            .metric("pod_identity_binding_total{result=\"mismatch\"}")
            .unwrap(),
        1.0
    );
    assert_eq!(
        agent
            .metric("pod_identity_binding_total{result=\"match\"}")
            .unwrap(),
        0.0
    );
}

#[test]
fn enforce_refuses_to_start_without_the_ebpf_programs() {
    if !e2e::privileged("enforce_refuses_to_start_without_the_ebpf_programs") {
        return;
    }
    let node = SimNode::new().unwrap();
    let fake = start_fake_eks_auth_in(node.netns(), "e2e-enforce-no-ebpf").unwrap();
    let args = AgentArgs {
        cgroup_root: false,
        ready_timeout: Duration::from_secs(10),
        ..AgentArgs::default()
    }
    .args([
        "--cgroup-root",
        "/nonexistent/dir",
        "--token-binding",
        "enforce",
    ]);
    let err = format!(
        "{:#}",
        AgentProcess::start(&node, &fake, args).expect_err("the agent must not start")
    );
    assert!(err.contains("exited"), "it exits at start: {err}");
    assert!(!err.contains("exit status: 0"), "it exits non-zero: {err}");
    assert!(
        err.contains("enforce") && err.contains("/nonexistent/dir"),
        "the message names the cause: {err}"
    );
}

#[test]
fn audit_mode_without_the_ebpf_programs_serves_unattributed() {
    if !e2e::privileged("audit_mode_without_the_ebpf_programs_serves_unattributed") {
        return;
    }
    let (node, fake, [a]) = node_with_web_pods("e2e-audit-no-ebpf", ["web-a"]).unwrap();
    a.refresh_token(&fake).unwrap();
    let audit = node.dir().join("audit.log");
    let args = AgentArgs {
        cgroup_root: false,
        ..AgentArgs::default()
    }
    .audit_log(&audit)
    .args([
        "--cgroup-root",
        "/nonexistent/dir",
        "--token-binding",
        "audit",
    ]);
    let agent = AgentProcess::start(&node, &fake, args).unwrap();
    let warned = agent
        .log_records()
        .unwrap()
        .into_iter()
        .any(|l| l["level"] == "WARN" && l.to_string().contains("/nonexistent/dir"));
    assert!(
        warned,
        "a warning names the cause:\n{}",
        agent.logs().unwrap()
    );
    assert_eq!(agent.metric("pod_identity_ebpf_attached").unwrap(), 0.0);

    let own = a.fetch_with_botocore(CREDENTIALS_URI_V4).unwrap();
    assert!(own.is_ok(), "served without eBPF: {own:?}");
    let records = wait_audit_records(&audit, 1, AUDIT_WAIT).unwrap();
    let r = &records[0];
    assert_eq!(r["binding"], "unattributed", "{r}");
    assert_eq!(r["outcome"], "allowed", "{r}");
    assert_eq!(r["caller"]["pod_uid"], Value::Null, "{r}");
    assert_eq!(r["caller"]["pid"], Value::Null, "{r}");
    assert_eq!(
        agent
            .metric("pod_identity_binding_total{result=\"unattributed\"}")
            .unwrap(),
        1.0
    );
}

#[test]
fn a_token_rotated_during_an_outage_gets_the_pods_cached_credentials() {
    if !e2e::privileged("a_token_rotated_during_an_outage_gets_the_pods_cached_credentials") {
        return;
    }
    let (node, fake, [a, b]) = node_with_web_pods("e2e-rotation", ["web-a", "web-b"]).unwrap();
    a.refresh_token(&fake).unwrap();
    b.refresh_token(&fake).unwrap();
    let audit = node.dir().join("audit.log");
    let _agent = AgentProcess::start(&node, &fake, AgentArgs::default().audit_log(&audit)).unwrap();

    let before = a
        .fetch_with_botocore(CREDENTIALS_URI_V4)
        .unwrap()
        .expect("first fetch");

    // EKS Auth goes down, and kubelet rotates A's token meanwhile.
    fake.set_fault(
        Fault::Error(ApiError::ServiceUnavailable),
        FaultTimes::Always,
    );
    let rotated = a.refresh_token(&fake).unwrap();
    let after = a
        .fetch_with_botocore(CREDENTIALS_URI_V4)
        .unwrap()
        .unwrap_or_else(|e| panic!("a rotated token during an outage must be served: {e}"));
    assert_eq!(
        after, before,
        "the pod's cached credentials are served for its new token"
    );
    assert_eq!(
        fake.calls_for_token(&rotated),
        0,
        "the kernel saw the pod the new token names: served from the cache, no call"
    );

    // Another pod of the same service account, never served before, gets nothing of A's.
    let other = b.fetch_with_botocore(CREDENTIALS_URI_V4).unwrap();
    assert!(
        other.is_err(),
        "another pod must not receive pod A's credentials: {other:?}"
    );

    let records = wait_audit_records(&audit, 3, AUDIT_WAIT).unwrap();
    let r = records
        .iter()
        .find(|r| r["token"]["jti"] == jti(&rotated).as_str())
        .expect("a record for the rotated token");
    assert_eq!(r["outcome"], "allowed", "{r}");
    assert_eq!(r["binding"], "match", "{r}");
    assert_eq!(r["caller"]["pod_uid"], a.uid.as_str(), "{r}");
    // Only the kernel vouched: no keys here, and EKS Auth has not seen the new token yet.
    assert_eq!(r["verified_by"], serde_json::json!(["kernel"]), "{r}");
}
