//! Local token validation end to end: the agent in a simulated node fetches the cluster's signing
//! keys from a Kubernetes API stand-in (`/version`, `/openid/v1/jwks`), the EKS Auth stand-in signs
//! and verifies tokens with the same key (RS256), and forged tokens are refused at the door with no
//! call to EKS Auth: a forged signature under a known `kid`, an unknown `kid` (after one refetch),
//! the wrong audience, 2,000 distinct forgeries. A key rotation on the API server is picked up; the
//! keys persist for a restart while the API server is down; with no keys at all the agent serves
//! as before.
//!
//! Privileged tests need root, cgroup v2, eBPF, and the agent binary (`cargo build -p eks-pod-identity-agent`).

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use e2e::agent::{AgentArgs, AgentProcess, node_with_web_pods};
use e2e::clients::{Family, RawRequest};
use e2e::cluster_keys::ClusterKey;
use e2e::fake_eks_auth::{ApiError, FakeEksAuth, Fault, FaultTimes};
use e2e::fake_kube_api::{self, FakeKubeApi, KubeFault, Op};
use e2e::node::{AGENT_V4, Pod, SimNode};

const AGENT: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(AGENT_V4), 80);

/// The agent's arguments: a kubeconfig for `api`, local validation `mode`, state in `state`.
fn validating_args(node: &SimNode, api: &FakeKubeApi, mode: &str, state: &Path) -> AgentArgs {
    let kubeconfig = node.dir().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();
    AgentArgs {
        env: vec![("KUBECONFIG".into(), kubeconfig.display().to_string())],
        ..AgentArgs::default()
    }
    .args(["--token-validation", mode, "--state-dir"])
    .args([state.display().to_string()])
}

/// A node whose cluster signs with `rsa-1`, published by a Kubernetes API stand-in.
fn cluster(name: &str) -> (SimNode, FakeEksAuth, Pod, FakeKubeApi, Arc<ClusterKey>) {
    let (node, fake, [web]) = node_with_web_pods(name, ["web"]).unwrap();
    let key = ClusterKey::fixture("rsa-1").unwrap();
    fake.use_cluster_key(key.clone());
    let api = fake_kube_api::start_in(node.netns()).unwrap();
    api.set_jwks(Some(vec![key.jwk.clone()]));
    (node, fake, web, api, key)
}

/// One request with `token`, from the test process in `pod`'s network namespace.
fn get(pod: &Pod, token: &str) -> (u16, String) {
    let request = RawRequest::get("/v1/credentials")
        .host("169.254.170.23")
        .authorization(token)
        .to_bytes();
    let r = pod
        .raw_http(AGENT, &request, Duration::from_secs(5))
        .unwrap();
    (r.status, r.body_text())
}

fn sdk_status(pod: &Pod) -> u16 {
    let r = pod
        .python_requests(Family::V4, &pod.token_path(), 1, false)
        .unwrap();
    r.exchanges[0].status.unwrap_or(0)
}

fn failures(agent: &AgentProcess, reason: &str) -> f64 {
    agent
        .metric(&format!(
            "pod_identity_local_validation_failures_total{{reason=\"{reason}\"}}"
        ))
        .unwrap_or(0.0)
}

#[test]
fn forged_tokens_are_refused_locally_without_calling_eks_auth() {
    if !e2e::privileged("forged_tokens_are_refused_locally_without_calling_eks_auth") {
        return;
    }
    let (node, fake, web, api, key) = cluster("e2e-forged");
    let audit = node.dir().join("audit.log");
    let agent = AgentProcess::start(
        &node,
        &fake,
        validating_args(&node, &api, "auto", &node.dir().join("state")).audit_log(&audit),
    )
    .unwrap();
    // The cluster's own token: verified, then exchanged.
    web.refresh_token(&fake).unwrap();
    assert_eq!(sdk_status(&web), 200, "log:\n{}", agent.logs().unwrap());
    assert!(api.count(Op::Jwks) >= 1 && api.count(Op::Version) >= 1);
    assert!(
        agent
            .metric("pod_identity_local_validation{result=\"success\"}")
            .unwrap()
            >= 1.0
    );
    let calls = fake.calls();

    // Signed with another key, naming the cluster's.
    let other = ClusterKey::fixture("rsa-2").unwrap();
    let forged = fake
        .issue_token_signed(&web.token_spec(), &other, &key.kid)
        .unwrap();
    let (status, body) = get(&web, &forged);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("signature"), "{body}");
    // The cluster's key, the wrong audience.
    let wrong_audience = fake
        .issue_token(&web.token_spec().audience("sts.amazonaws.com"))
        .unwrap();
    let (status, body) = get(&web, &wrong_audience);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("audience"), "{body}");
    // A key the API server does not have, after the agent asked it once more.
    let jwks_before = api.count(Op::Jwks);
    let unknown = fake
        .issue_token_signed(&web.token_spec(), &other, &other.kid)
        .unwrap();
    let (status, body) = get(&web, &unknown);
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("not one of the cluster's signing keys"),
        "{body}"
    );
    assert!(api.count(Op::Jwks) <= jwks_before + 1);

    // 2,000 distinct forgeries: every one answered here.
    for _ in 0..2000 {
        let forged = fake
            .issue_token_signed(&web.token_spec(), &other, &key.kid)
            .unwrap();
        assert_eq!(get(&web, &forged).0, 400);
    }
    assert_eq!(fake.calls(), calls, "no forged token reached EKS Auth");
    assert_eq!(failures(&agent, "signature"), 2001.0);
    assert_eq!(failures(&agent, "audience"), 1.0);
    assert_eq!(failures(&agent, "unknown_key"), 1.0);
    assert_eq!(
        agent
            .metric("pod_identity_upstream_queued{type=\"fetch\"}")
            .unwrap_or(0.0),
        0.0
    );
    // The refusals are in the audit log, with why.
    let records = e2e::agent::wait_audit_records(&audit, 2004, Duration::from_secs(10)).unwrap();
    let refused: Vec<_> = records
        .iter()
        .filter(|r| r["http_status"] == 400 && r["outcome"] == "denied")
        .collect();
    assert!(refused.len() >= 2003, "{} refusals audited", refused.len());
    assert!(
        refused.iter().any(|r| r["reason"]
            .as_str()
            .is_some_and(|s| s.contains("signature"))),
        "{:?}",
        refused.first()
    );
    agent.stop().unwrap();
}

#[test]
fn a_key_rotation_on_the_api_server_is_picked_up() {
    if !e2e::privileged("a_key_rotation_on_the_api_server_is_picked_up") {
        return;
    }
    let (node, fake, web, api, key) = cluster("e2e-rotate");
    let agent = AgentProcess::start(
        &node,
        &fake,
        validating_args(&node, &api, "on", &node.dir().join("state")),
    )
    .unwrap();
    web.refresh_token(&fake).unwrap();
    assert_eq!(sdk_status(&web), 200, "log:\n{}", agent.logs().unwrap());

    // The API server publishes a second key and the cluster signs with it, more than the agent's
    // refetch interval (10 s) after its last fetch.
    let second = ClusterKey::fixture("rsa-2").unwrap();
    api.set_jwks(Some(vec![key.jwk.clone(), second.jwk.clone()]));
    fake.use_cluster_key(second);
    std::thread::sleep(Duration::from_secs(11));
    let jwks_before = api.count(Op::Jwks);
    web.refresh_token(&fake).unwrap();
    assert_eq!(sdk_status(&web), 200, "log:\n{}", agent.logs().unwrap());
    assert_eq!(api.count(Op::Jwks), jwks_before + 1, "one refetch");
    assert_eq!(agent.metric("pod_identity_signing_keys").unwrap(), 2.0);
    agent.stop().unwrap();
}

#[test]
fn stored_keys_validate_while_the_api_server_is_down_and_no_keys_mean_no_outage() {
    if !e2e::privileged(
        "stored_keys_validate_while_the_api_server_is_down_and_no_keys_mean_no_outage",
    ) {
        return;
    }
    let (node, fake, web, api, key) = cluster("e2e-stored");
    let state = node.dir().join("state");
    let agent =
        AgentProcess::start(&node, &fake, validating_args(&node, &api, "auto", &state)).unwrap();
    web.refresh_token(&fake).unwrap();
    assert_eq!(sdk_status(&web), 200, "log:\n{}", agent.logs().unwrap());
    let stored = state.join("jwks.json");
    assert!(
        e2e::wait_for(Duration::from_secs(5), || stored.exists()),
        "the key set is stored"
    );
    let mode = std::fs::metadata(&stored).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    agent.stop().unwrap();

    // The API server is down when the agent starts again: the stored keys still refuse a forgery.
    api.set_fault(None, KubeFault::Status(503), None);
    let agent =
        AgentProcess::start(&node, &fake, validating_args(&node, &api, "auto", &state)).unwrap();
    let calls = fake.calls();
    let other = ClusterKey::fixture("rsa-2").unwrap();
    let forged = fake
        .issue_token_signed(&web.token_spec(), &other, &key.kid)
        .unwrap();
    assert_eq!(get(&web, &forged).0, 400);
    assert_eq!(fake.calls(), calls, "refused without EKS Auth");
    web.refresh_token(&fake).unwrap();
    assert_eq!(sdk_status(&web), 200, "log:\n{}", agent.logs().unwrap());
    agent.stop().unwrap();

    // No stored keys and no API server: as without validation (EKS Auth judges), never an outage.
    let empty = node.dir().join("empty-state");
    let agent =
        AgentProcess::start(&node, &fake, validating_args(&node, &api, "auto", &empty)).unwrap();
    web.refresh_token(&fake).unwrap();
    assert_eq!(sdk_status(&web), 200, "log:\n{}", agent.logs().unwrap());
    let calls = fake.calls();
    let forged = fake
        .issue_token_signed(&web.token_spec(), &other, &key.kid)
        .unwrap();
    let (status, body) = get(&web, &forged);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("InvalidToken"), "EKS Auth refused it: {body}");
    assert_eq!(fake.calls(), calls + 1);
    assert!(
        agent
            .metric("pod_identity_local_validation{result=\"skipped\"}")
            .unwrap()
            >= 1.0
    );
    agent.stop().unwrap();
}

/// The cache is keyed by the pod once a token verifies: the kubelet's rotated token of a cached
/// pod costs no EKS Auth call, and is served from the cache while EKS Auth is down, with no eBPF
/// (no kernel to vouch for the caller). A forgery of the same pod is still refused.
#[test]
fn a_rotated_token_is_served_from_the_cache_without_eks_auth_or_ebpf() {
    if !e2e::privileged("a_rotated_token_is_served_from_the_cache_without_eks_auth_or_ebpf") {
        return;
    }
    let (node, fake, web, api, key) = cluster("e2e-rotated");
    let audit = node.dir().join("audit.log");
    let args = AgentArgs {
        cgroup_root: false,
        ..validating_args(&node, &api, "auto", &node.dir().join("state"))
    }
    .audit_log(&audit)
    .args(["--cgroup-root", "/nonexistent/dir"]);
    let agent = AgentProcess::start(&node, &fake, args).unwrap();
    assert_eq!(agent.metric("pod_identity_ebpf_attached").unwrap(), 0.0);

    let first = web.refresh_token(&fake).unwrap();
    let (status, issued) = get(&web, &first);
    assert_eq!(status, 200, "{issued}\nlog:\n{}", agent.logs().unwrap());
    let calls = fake.calls();

    // The kubelet rotates the token: its signature verifies, the pod's credentials are served.
    let rotated = web.refresh_token(&fake).unwrap();
    assert_ne!(rotated, first);
    let (status, body) = get(&web, &rotated);
    assert_eq!((status, &body), (200, &issued));
    assert_eq!(fake.calls(), calls, "no EKS Auth call for a rotated token");

    // EKS Auth is down: the next rotation is served from the cache too.
    fake.set_fault(
        Fault::Error(ApiError::ServiceUnavailable),
        FaultTimes::Always,
    );
    let during_outage = web.refresh_token(&fake).unwrap();
    let (status, body) = get(&web, &during_outage);
    assert_eq!((status, &body), (200, &issued));
    assert_eq!(sdk_status(&web), 200, "the SDK, on the same token");
    assert_eq!(fake.calls(), calls, "EKS Auth was not asked");
    // A token of the same pod signed with another key is no rotation.
    let other = ClusterKey::fixture("rsa-2").unwrap();
    let forged = fake
        .issue_token_signed(&web.token_spec(), &other, &key.kid)
        .unwrap();
    assert_eq!(get(&web, &forged).0, 400);

    // The audit log says what vouched for each: EKS Auth and the signature for the first token,
    // the signature alone for the rotated ones (no kernel here).
    let records = e2e::agent::wait_audit_records(&audit, 5, Duration::from_secs(10)).unwrap();
    let verified_by: Vec<_> = records.iter().map(|r| r["verified_by"].clone()).collect();
    assert_eq!(
        verified_by,
        [
            serde_json::json!(["signature", "eks-auth"]),
            serde_json::json!(["signature"]),
            serde_json::json!(["signature"]),
            serde_json::json!(["signature"]),
            serde_json::json!([]),
        ],
        "{records:?}"
    );
    agent.stop().unwrap();
}
