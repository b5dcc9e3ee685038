//! Least privilege, measured: the server runs with exactly the capabilities the Helm chart grants it
//! (`agent.capabilities` in `deploy/charts/eks-pod-identity-agent/values.yaml`) — eBPF attached and
//! token binding enforced — and with any one of them taken away it cannot do its job. `initialize`
//! needs `NET_ADMIN` alone.
//!
//! The agent runs as uid 0 with its capability bounding set cut down by `setpriv`, as a container
//! runtime does for a non-privileged container with `capabilities: {drop: [ALL], add: […]}`.

use std::ffi::OsString;
use std::time::Duration;

use e2e::agent::{AgentArgs, AgentProcess, node_with_web_pods, wait_audit_records};
use e2e::clients::Family;
use e2e::netns::NetNs;
use e2e::node::CREDENTIALS_URI_V4;
use yaml_rust2::YamlLoader;

/// The chart's capability lists: (server, init container), as Kubernetes names them (`BPF`, …).
fn chart_capabilities() -> (Vec<String>, Vec<String>) {
    let path = e2e::workspace_root().join("deploy/charts/eks-pod-identity-agent/values.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let values = &YamlLoader::load_from_str(&text).unwrap()[0];
    // `NAME: why` pairs: the chart renders the names into `capabilities.add`.
    let list = |y: &yaml_rust2::Yaml| -> Vec<String> {
        y.as_hash()
            .unwrap_or_else(|| panic!("a capability map in {}", path.display()))
            .keys()
            .map(|c| c.as_str().unwrap().to_owned())
            .collect()
    };
    (
        list(&values["agent"]["capabilities"]),
        list(&values["init"]["capabilities"]),
    )
}

/// `setpriv` keeping only `caps` in the bounding set (so uid 0 gets exactly those at exec).
fn limited_to(caps: &[String]) -> Vec<OsString> {
    let mut bounding = String::from("--bounding-set=-all");
    for cap in caps {
        bounding.push_str(",+");
        bounding.push_str(&cap.trim_start_matches("CAP_").to_ascii_lowercase());
    }
    ["setpriv", &bounding, "--inh-caps=-all", "--"]
        .iter()
        .map(OsString::from)
        .collect()
}

#[test]
fn the_server_attaches_and_enforces_with_only_the_charts_capabilities() {
    if !e2e::privileged("the_server_attaches_and_enforces_with_only_the_charts_capabilities") {
        return;
    }
    let (server_caps, _) = chart_capabilities();
    let (node, fake, [a, b]) = node_with_web_pods("e2e-caps", ["web-a", "web-b"]).unwrap();
    a.refresh_token(&fake).unwrap();
    b.refresh_token(&fake).unwrap();
    let audit = node.dir().join("audit.log");
    let args = AgentArgs {
        wrapper: limited_to(&server_caps),
        ..AgentArgs::default()
    }
    .audit_log(&audit)
    .args(["--token-binding", "enforce", "--pod-connect-rate", "100"]);
    let agent = AgentProcess::start(&node, &fake, args).unwrap();
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.pid().unwrap())).unwrap();
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .unwrap()
        .trim()
        .to_owned();
    assert_ne!(
        effective, "000001ffffffffff",
        "the agent must not run with every capability"
    );
    assert_eq!(agent.metric("pod_identity_ebpf_attached").unwrap(), 1.0);

    let creds = a
        .fetch_with_botocore(CREDENTIALS_URI_V4)
        .unwrap()
        .unwrap_or_else(|e| panic!("botocore: {e}\n{}", agent.logs().unwrap()));
    assert!(creds.access_key_id.starts_with("ASIA"));
    // B presents A's token: refused by binding, which needs the kernel's attribution.
    let replay = b
        .python_requests(Family::V4, &a.token_path(), 1, false)
        .unwrap();
    assert_eq!(replay.exchanges[0].status, Some(403), "{replay:?}");

    let records = wait_audit_records(&audit, 2, Duration::from_secs(10)).unwrap();
    assert!(
        records
            .iter()
            .any(|r| r["outcome"] == "allowed" && r["caller"]["pod_uid"] == a.uid.as_str()),
        "the allowed request is attributed to its pod: {records:?}"
    );
    assert!(
        records
            .iter()
            .any(|r| r["binding"] == "mismatch" && r["caller"]["pod_uid"] == b.uid.as_str()),
        "the replay is attributed to the pod that sent it: {records:?}"
    );
    assert!(agent.stop().unwrap().success());
}

#[test]
fn every_capability_the_chart_grants_the_server_is_needed() {
    if !e2e::privileged("every_capability_the_chart_grants_the_server_is_needed") {
        return;
    }
    let (server_caps, _) = chart_capabilities();
    for dropped in &server_caps {
        let (node, fake, _) = node_with_web_pods("e2e-caps-minus", []).unwrap();
        let fewer: Vec<String> = server_caps
            .iter()
            .filter(|c| *c != dropped)
            .cloned()
            .collect();
        let args = AgentArgs {
            wrapper: limited_to(&fewer),
            ready_timeout: Duration::from_secs(10),
            ..AgentArgs::default()
        }
        .args(["--token-binding", "enforce"]);
        let started = AgentProcess::start(&node, &fake, args);
        let err = format!(
            "{:#}",
            started.expect_err(&format!("without {dropped} the server must not come up"))
        );
        assert!(
            err.contains("Permission denied") || err.contains("Operation not permitted"),
            "without {dropped}: the failure is a permission: {err}"
        );
    }
}

/// Runs `initialize` in a fresh namespace with only `caps`; returns its exit status and whether
/// the agent's link got its address.
fn initialize_with(caps: &[String]) -> (std::process::ExitStatus, bool) {
    let ns = NetNs::create().unwrap();
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", ns.name()))
        .arg("--")
        .args(limited_to(caps))
        .arg(e2e::agent::agent_bin().unwrap())
        .arg("initialize")
        .output()
        .unwrap();
    let addr = std::process::Command::new("ip")
        .args(["-n", ns.name(), "-4", "addr", "show", "dev", "pod-id-link0"])
        .output()
        .unwrap();
    let has_addr = String::from_utf8_lossy(&addr.stdout).contains("169.254.170.23/32");
    (out.status, has_addr)
}

#[test]
fn initialize_needs_only_the_init_containers_capabilities() {
    if !e2e::privileged("initialize_needs_only_the_init_containers_capabilities") {
        return;
    }
    let (_, init_caps) = chart_capabilities();
    assert_eq!(init_caps, ["NET_ADMIN"]);
    let (status, has_addr) = initialize_with(&init_caps);
    assert!(status.success() && has_addr, "{status} {has_addr}");
    let (status, has_addr) = initialize_with(&[]);
    assert!(
        !status.success() && !has_addr,
        "without NET_ADMIN: {status}"
    );
}

/// The capability sets of every thread of `pid`: (thread, `CapInh`, `CapPrm`, `CapEff`, `CapBnd`,
/// `CapAmb`, `NoNewPrivs`), as `/proc` shows them.
fn thread_sets(pid: u32) -> Vec<(String, [String; 6])> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap();
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap_or_else(|| panic!("{name} in {}", task.path().display()))
                .trim()
                .to_owned()
        };
        out.push((
            task.file_name().to_string_lossy().into_owned(),
            [
                field("CapInh:"),
                field("CapPrm:"),
                field("CapEff:"),
                field("CapBnd:"),
                field("CapAmb:"),
                field("NoNewPrivs:"),
            ],
        ));
    }
    out
}

#[test]
fn the_server_gives_up_every_capability_once_set_up_and_still_attributes_and_enforces() {
    if !e2e::privileged(
        "the_server_gives_up_every_capability_once_set_up_and_still_attributes_and_enforces",
    ) {
        return;
    }
    let (node, fake, [a, b]) = node_with_web_pods("e2e-caps-drop", ["web-a", "web-b"]).unwrap();
    a.refresh_token(&fake).unwrap();
    b.refresh_token(&fake).unwrap();
    let audit = node.dir().join("audit.log");
    // Root with every capability, as a privileged container or a host process would be.
    let args = AgentArgs::default().audit_log(&audit).args([
        "--token-binding",
        "enforce",
        "--pod-connect-rate",
        "1",
        "--pod-connect-burst",
        "5",
    ]);
    let agent = AgentProcess::start(&node, &fake, args).unwrap();
    let pid = agent.pid().unwrap();
    assert!(
        e2e::wait_for(Duration::from_secs(5), || agent
            .logs()
            .unwrap()
            .contains("dropped every capability")),
        "{}",
        agent.logs().unwrap()
    );
    let none = "0000000000000000".to_owned();
    let expected = [
        none.clone(),
        none.clone(),
        none.clone(),
        none.clone(),
        none,
        "1".to_owned(),
    ];
    let threads = thread_sets(pid);
    assert!(threads.len() > 1, "the runtime's threads: {threads:?}");
    for (tid, sets) in &threads {
        assert_eq!(
            sets, &expected,
            "thread {tid}: CapInh CapPrm CapEff CapBnd CapAmb NoNewPrivs"
        );
    }
    assert_eq!(agent.metric("pod_identity_ebpf_attached").unwrap(), 1.0);

    // Attribution and enforce, without a capability.
    let creds = a
        .fetch_with_botocore(CREDENTIALS_URI_V4)
        .unwrap()
        .unwrap_or_else(|e| panic!("botocore: {e}\n{}", agent.logs().unwrap()));
    assert!(creds.access_key_id.starts_with("ASIA"));
    let replay = b
        .python_requests(Family::V4, &a.token_path(), 1, false)
        .unwrap();
    assert_eq!(replay.exchanges[0].status, Some(403), "{replay:?}");
    let records = wait_audit_records(&audit, 2, Duration::from_secs(10)).unwrap();
    assert!(
        records
            .iter()
            .any(|r| r["binding"] == "mismatch" && r["caller"]["pod_uid"] == b.uid.as_str()),
        "the replay is attributed to the pod that sent it: {records:?}"
    );

    // The kernel's maps, read through the descriptors opened before the drop: B's connects past
    // its bucket are refused in the kernel and counted into the metrics by the background task.
    let report = b
        .connect_flood(
            &[Family::V4],
            40,
            Duration::from_secs(1),
            Duration::from_millis(1),
        )
        .unwrap();
    assert!(
        report.failed_with(libc::EPERM) > 0,
        "the kernel refused none of B's connects: {report:?}"
    );
    assert!(
        e2e::wait_for(Duration::from_secs(12), || agent
            .metrics()
            .unwrap()
            .lines()
            .any(
                |l| l.starts_with("pod_identity_connections_denied_total") && !l.ends_with(" 0")
            )),
        "the refusals were never read from the kernel's maps:\n{}",
        agent.metrics().unwrap()
    );
    let logs = agent.logs().unwrap();
    assert!(
        !logs.contains("Operation not permitted") && !logs.contains("Permission denied"),
        "{logs}"
    );
    // Detaching on exit needs nothing either.
    assert!(agent.stop().unwrap().success());
}
