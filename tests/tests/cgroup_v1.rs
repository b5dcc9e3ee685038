//! A node without cgroup v2 (Amazon Linux 2 boots cgroup v1 only), made for real: the agent runs
//! in a mount namespace of its own where every cgroup2 mount is unmounted, so that its
//! `/proc/self/mountinfo` shows cgroup v1 hierarchies only. Under `audit` (the default) it serves
//! every pod, unattributed, and says why; under `enforce` it refuses to start, naming cgroup v1.
//! A `--cgroup-root` that is not in the cgroup2 hierarchy is the same.
//!
//! Needs root (mount and network namespaces) and the agent binary.

use std::ffi::OsString;
use std::time::Duration;

use e2e::agent::{AgentArgs, AgentProcess, node_with_web_pods, wait_audit_records};
use e2e::node::CREDENTIALS_URI_V4;

/// Runs the agent in a private mount namespace without cgroup2 mounts.
fn without_cgroup2() -> Vec<OsString> {
    let script = r#"for m in $(awk '{for (i = 7; i <= NF; i++) if ($i == "-") { if ($(i+1) == "cgroup2") print $5; break }}' /proc/self/mountinfo); do umount -l "$m" || exit 97; done; exec "$@""#;
    [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        script,
        "sh",
    ]
    .iter()
    .map(OsString::from)
    .collect()
}

#[test]
fn without_cgroup_v2_audit_serves_unattributed_and_enforce_refuses_to_start() {
    if !e2e::privileged("without_cgroup_v2_audit_serves_unattributed_and_enforce_refuses_to_start")
    {
        return;
    }
    let (node, fake, [web]) = node_with_web_pods("e2e-cgv1", ["web-0"]).unwrap();
    web.refresh_token(&fake).unwrap();
    let audit = node.dir().join("audit.log");
    let agent = AgentProcess::start(
        &node,
        &fake,
        AgentArgs {
            wrapper: without_cgroup2(),
            ..AgentArgs::default()
        }
        .audit_log(&audit),
    )
    .unwrap();
    let creds = web
        .fetch_with_botocore(CREDENTIALS_URI_V4)
        .unwrap()
        .unwrap_or_else(|e| panic!("botocore: {e}\n{}", agent.logs().unwrap()));
    assert!(creds.access_key_id.starts_with("ASIA"));
    assert_eq!(agent.metric("pod_identity_ebpf_attached").unwrap(), 0.0);
    let logs = agent.logs().unwrap();
    assert!(
        logs.contains("eBPF attribution unavailable") && logs.contains("cgroup v1 only"),
        "{logs}"
    );
    let records = wait_audit_records(&audit, 1, Duration::from_secs(10)).unwrap();
    assert_eq!(records[0]["outcome"], "allowed", "{records:?}");
    assert_eq!(records[0]["binding"], "unattributed", "{records:?}");
    assert!(agent.stop().unwrap().success());

    let refused = AgentProcess::start(
        &node,
        &fake,
        AgentArgs {
            wrapper: without_cgroup2(),
            ready_timeout: Duration::from_secs(10),
            ..AgentArgs::default()
        }
        .args(["--token-binding", "enforce"]),
    );
    let err = format!(
        "{:#}",
        refused.expect_err("enforce must not start without cgroup v2")
    );
    assert!(
        err.contains("--token-binding enforce needs the eBPF programs")
            && err.contains("no cgroup v2 hierarchy on this node"),
        "{err}"
    );
}

#[test]
fn a_cgroup_root_outside_the_cgroup2_hierarchy_is_the_same() {
    if !e2e::privileged("a_cgroup_root_outside_the_cgroup2_hierarchy_is_the_same") {
        return;
    }
    let (node, fake, [web]) = node_with_web_pods("e2e-cgroot", ["web-0"]).unwrap();
    web.refresh_token(&fake).unwrap();
    let elsewhere = node.dir().join("not-a-cgroup");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let args = || {
        AgentArgs {
            cgroup_root: false,
            ready_timeout: Duration::from_secs(10),
            ..AgentArgs::default()
        }
        .args(["--cgroup-root", elsewhere.to_str().unwrap()])
    };
    let agent = AgentProcess::start(&node, &fake, args()).unwrap();
    let creds = web
        .fetch_with_botocore(CREDENTIALS_URI_V4)
        .unwrap()
        .unwrap_or_else(|e| panic!("botocore: {e}\n{}", agent.logs().unwrap()));
    assert!(creds.access_key_id.starts_with("ASIA"));
    assert_eq!(agent.metric("pod_identity_ebpf_attached").unwrap(), 0.0);
    assert!(agent.stop().unwrap().success());

    let err = format!(
        "{:#}",
        AgentProcess::start(&node, &fake, args().args(["--token-binding", "enforce"]))
            .expect_err("enforce must not start")
    );
    assert!(
        err.contains("not a directory below the cgroup2 mount"),
        "{err}"
    );
}
