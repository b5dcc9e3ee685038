//! The kernel fallback end to end: on kernels without 64-bit compare-and-swap in BPF (before 5.12)
//! the connect programs load without the per-pod token bucket. Forced here with
//! `EKS_POD_IDENTITY_AGENT_FORCE_NO_LIMITER=1`: the agent serves and attributes as ever, says so in
//! `pod_identity_ebpf_connect_limiter`, and refuses no connect for its rate (which it cannot
//! enforce), while the same flags without the switch do.
//!
//! Needs root, cgroup v2, eBPF, and the agent binary (`cargo build -p eks-pod-identity-agent`).

use std::time::Duration;

use e2e::agent::{AgentArgs, AgentProcess, node_with_web_pods, wait_audit_records};
use e2e::clients::Family;

const EPERM: i32 = 1;

#[test]
fn the_limiter_less_fallback_serves_and_attributes() {
    if !e2e::privileged("the_limiter_less_fallback_serves_and_attributes") {
        return;
    }
    let (node, fake, [pod]) = node_with_web_pods("e2e-fallback", ["web-0"]).unwrap();
    pod.refresh_token(&fake).unwrap();
    let audit = node.dir().join("audit.log");
    let limit = ["--pod-connect-rate", "1", "--pod-connect-burst", "2"];
    let mut args = AgentArgs::default()
        .audit_log(&audit)
        .args(["--token-binding", "enforce"])
        .args(limit);
    args.env
        .push(("EKS_POD_IDENTITY_AGENT_FORCE_NO_LIMITER".into(), "1".into()));
    let agent = AgentProcess::start(&node, &fake, args).unwrap();
    assert_eq!(agent.metric("pod_identity_ebpf_attached").unwrap(), 1.0);
    assert_eq!(
        agent.metric("pod_identity_ebpf_connect_limiter").unwrap(),
        0.0
    );

    // Served and attributed: under `enforce`, a 200 is only possible with the kernel's record.
    let fetched = pod
        .python_requests(Family::V4, &pod.token_path(), 1, false)
        .unwrap();
    assert_eq!(
        fetched.exchanges[0].status,
        Some(200),
        "{:?}",
        fetched.exchanges[0]
    );
    let records = wait_audit_records(&audit, 1, Duration::from_secs(10)).unwrap();
    assert_eq!(records[0]["caller"]["pod_uid"], pod.uid.as_str());
    assert_eq!(records[0]["caller"]["pid"], fetched.pid);

    // No token bucket: ten connects at once all pass, though the rate allows two.
    let flood = pod
        .connect_flood(&[Family::V4], 10, Duration::ZERO, Duration::ZERO)
        .unwrap();
    assert_eq!(flood.failed_with(EPERM), 0, "{:?}", flood.attempts);
    assert!(agent.logs().unwrap().contains("as asked"));
    assert!(agent.stop().unwrap().success());

    // The same flags without the switch: this kernel runs the limiter, and it refuses.
    let agent = AgentProcess::start(&node, &fake, AgentArgs::default().args(limit)).unwrap();
    assert_eq!(
        agent.metric("pod_identity_ebpf_connect_limiter").unwrap(),
        1.0
    );
    let flood = pod
        .connect_flood(&[Family::V4], 10, Duration::ZERO, Duration::ZERO)
        .unwrap();
    assert!(flood.failed_with(EPERM) >= 7, "{:?}", flood.attempts);
    assert!(agent.stop().unwrap().success());
}
