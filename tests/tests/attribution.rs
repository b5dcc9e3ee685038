//! Attribution end to end: every credential request's audit record names the pod, container, process
//! and cgroup the kernel saw connect — over IPv4, IPv6 and IPv4 on an IPv6 socket, with real SDKs,
//! with pods in kubelet cgroups of both drivers, and under concurrency. Also: no secret reaches the
//! audit log, and the eBPF programs are attached while the agent runs and gone once it stopped.
//!
//! Needs root, cgroup v2, eBPF, and the agent binary (`cargo build -p eks-pod-identity-agent`).

use std::os::unix::fs::MetadataExt as _;
use std::process::Stdio;
use std::time::Duration;

use e2e::agent::{AgentArgs, AgentProcess, start_fake_eks_auth_in, wait_audit_records};
use e2e::cgroup::{BpfAttachType, CgroupDriver, QosClass, attached_programs};
use e2e::clients::{ClientCredentials, Family, botocore_script, sdk_client_bin};
use e2e::fake_eks_auth::{Association, FakeEksAuth, decode_unverified};
use e2e::node::{CREDENTIALS_URI_V4, CREDENTIALS_URI_V6, Pod, PodSpec, SimNode};
use serde_json::Value;

const AUDIT_WAIT: Duration = Duration::from_secs(10);

/// A real SDK client run as `pod`; returns its pid (the `sh` the pod command starts `exec`s through
/// `ip netns exec` into the client, so the spawned child's pid is the client's) and its credentials.
fn sdk_fetch(pod: &Pod, rust: bool, uri: &str) -> (u32, ClientCredentials) {
    let mut cmd = if rust {
        pod.command(&sdk_client_bin().unwrap().to_string_lossy())
    } else {
        let mut c = pod.command("python3");
        c.arg(botocore_script());
        c
    };
    cmd.envs(pod.client_env(uri))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{} client of pod {} via {uri} failed: {}",
        if rust { "rust" } else { "botocore" },
        pod.name,
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout.lines().rev().find(|l| !l.trim().is_empty()).unwrap();
    (pid, serde_json::from_str(line).unwrap())
}

/// The inode of the pod's container cgroup directory: its cgroup id.
fn cgroup_id(pod: &Pod) -> u64 {
    std::fs::metadata(&pod.cgroup).unwrap().ino()
}

/// `YYYY-MM-DDTHH:MM:SS[.fff…]Z`.
fn is_rfc3339_utc(ts: &str) -> bool {
    let b = ts.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|s| s.iter().all(u8::is_ascii_digit));
    let fraction_ok = match &ts.get(19..ts.len().saturating_sub(1)) {
        Some("") => true,
        Some(f) => f.starts_with('.') && f.len() > 1 && f[1..].bytes().all(|c| c.is_ascii_digit()),
        None => false,
    };
    b.len() >= 20
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19)
        && fraction_ok
        && ts.ends_with('Z')
        && ts[..4] >= *"2024"
}

/// Checks one audit record of a request from `pod` (a kubelet pod) with the token in its token file.
fn assert_pod_record(
    r: &Value,
    pod: &Pod,
    pid: u32,
    comm: &str,
    cache: &str,
    association: &Association,
) {
    let token = std::fs::read_to_string(pod.token_path()).unwrap();
    let claims = decode_unverified(&token).unwrap();
    let ctx = format!("pod {} record {r}", pod.name);
    assert_eq!(r["outcome"], "allowed", "{ctx}");
    assert_eq!(r["http_status"], 200, "{ctx}");
    assert!(r.get("reason").is_none(), "{ctx}");
    assert_eq!(r["binding"], "match", "{ctx}");
    // No cluster keys here: the kernel and EKS Auth vouch, not a signature.
    assert_eq!(
        r["verified_by"],
        serde_json::json!(["kernel", "eks-auth"]),
        "{ctx}"
    );
    assert_eq!(r["cache"], cache, "{ctx}");
    assert!(r["latency_us"].is_u64(), "{ctx}");
    assert!(
        is_rfc3339_utc(r["ts"].as_str().unwrap_or_default()),
        "{ctx}"
    );
    let c = &r["caller"];
    assert_eq!(c["pod_uid"], pod.uid.as_str(), "{ctx}");
    assert_eq!(c["container_id"], pod.container_id.as_str(), "{ctx}");
    assert_eq!(c["pid"], pid, "{ctx}");
    assert_eq!(c["comm"], comm, "{ctx}");
    assert_eq!(c["cgroup_id"], cgroup_id(pod), "{ctx}");
    assert_eq!(
        c["cgroup_path"],
        pod.cgroup_v2_path().unwrap().as_str(),
        "{ctx}"
    );
    let t = &r["token"];
    assert_eq!(t["namespace"], pod.namespace.as_str(), "{ctx}");
    assert_eq!(t["service_account"], pod.service_account.as_str(), "{ctx}");
    assert_eq!(t["pod_name"], pod.name.as_str(), "{ctx}");
    assert_eq!(t["pod_uid"], pod.uid.as_str(), "{ctx}");
    assert_eq!(t["node_name"], pod.node().name(), "{ctx}");
    assert_eq!(t["jti"], claims.jti.as_str(), "{ctx}");
    assert_eq!(r["role_arn"], association.role_arn.as_str(), "{ctx}");
    assert_eq!(
        r["association_id"],
        association.association_id.as_str(),
        "{ctx}"
    );
}

/// The records whose caller pid is `pid`, in file order.
fn by_pid(records: &[Value], pid: u32) -> Vec<&Value> {
    records
        .iter()
        .filter(|r| r["caller"]["pid"] == pid)
        .collect()
}

/// Asserts that no token and no credential the fake issued appears in `text`.
fn assert_no_secrets(text: &str, what: &str, tokens: &[String], fake: &FakeEksAuth) {
    for token in tokens {
        assert!(!text.contains(token.as_str()), "{what} contains a token");
        let signature = token.rsplit('.').next().unwrap();
        assert!(
            !text.contains(signature),
            "{what} contains a token's signature"
        );
    }
    let issued = fake.issued();
    assert!(!issued.is_empty());
    for c in issued {
        assert!(
            !text.contains(&c.secret_access_key),
            "{what} contains a secret access key"
        );
        assert!(
            !text.contains(&c.session_token),
            "{what} contains a session token"
        );
    }
}

fn programs_attached(node: &SimNode) -> Vec<u32> {
    BpfAttachType::ALL
        .iter()
        .map(|t| attached_programs(node.cgroup_root(), *t).unwrap())
        .collect()
}

#[test]
fn audit_records_name_the_calling_pod_process_and_cgroup() {
    if !e2e::privileged("audit_records_name_the_calling_pod_process_and_cgroup") {
        return;
    }
    let node = SimNode::new().unwrap();
    let fake = start_fake_eks_auth_in(node.netns(), "e2e-attribution").unwrap();
    let web_assoc = fake.associate("shop", "web-sa", "web-role");
    let batch_assoc = fake.associate("jobs", "batch-sa", "batch-role");
    let mapped_assoc = fake.associate("legacy", "v4-on-v6", "legacy-role");
    fake.associate("none", "none", "host-role");
    let web = node
        .add_pod(PodSpec::new("web-0", "shop", "web-sa"))
        .unwrap();
    let batch = node
        .add_pod(
            PodSpec::new("batch-0", "jobs", "batch-sa")
                .driver(CgroupDriver::Cgroupfs)
                .qos(QosClass::Guaranteed),
        )
        .unwrap();
    let mapped = node
        .add_pod(PodSpec::new("legacy-0", "legacy", "v4-on-v6").qos(QosClass::BestEffort))
        .unwrap();
    let host = node.add_non_pod_caller("cron").unwrap();
    let mut tokens = Vec::new();
    for p in [&web, &batch, &mapped, &host] {
        tokens.push(p.refresh_token(&fake).unwrap());
    }

    let audit = node.dir().join("audit.log");
    let agent = AgentProcess::start(&node, &fake, AgentArgs::default().audit_log(&audit)).unwrap();
    assert_eq!(
        agent.metric("pod_identity_ebpf_attached").unwrap(),
        1.0,
        "the programs are attached"
    );
    assert_eq!(
        programs_attached(&node),
        vec![1, 1, 1],
        "sock_ops, connect4 and connect6 each attached once at the node's cgroup root"
    );

    // botocore over IPv4 (a cache miss, then a hit), the Rust SDK over IPv6 (likewise).
    let (web_pid1, _) = sdk_fetch(&web, false, CREDENTIALS_URI_V4);
    let (web_pid2, _) = sdk_fetch(&web, false, CREDENTIALS_URI_V4);
    let (batch_pid1, _) = sdk_fetch(&batch, true, CREDENTIALS_URI_V6);
    let (batch_pid2, _) = sdk_fetch(&batch, true, CREDENTIALS_URI_V6);
    // IPv4 on an AF_INET6 socket: only connect6 runs in the kernel.
    let m = mapped
        .python_requests(Family::V4Mapped, &mapped.token_path(), 2, false)
        .unwrap();
    for ex in &m.exchanges {
        assert_eq!(ex.status, Some(200), "v4-mapped request: {ex:?}");
    }
    // A process outside any pod's cgroup: attributed to no pod, and served under `audit`.
    let h = host
        .python_requests(Family::V4, &host.token_path(), 1, false)
        .unwrap();
    assert_eq!(h.exchanges[0].status, Some(200), "{:?}", h.exchanges[0]);

    let records = wait_audit_records(&audit, 7, AUDIT_WAIT).unwrap();
    assert_eq!(records.len(), 7, "one record per request: {records:#?}");

    let rust_comm: String = sdk_client_bin()
        .unwrap()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .chars()
        .take(15)
        .collect();
    for (pid, cache) in [(web_pid1, "miss"), (web_pid2, "hit")] {
        let rs = by_pid(&records, pid);
        assert_eq!(
            rs.len(),
            1,
            "one record for botocore pid {pid}: {records:#?}"
        );
        assert_pod_record(rs[0], &web, pid, "python3", cache, &web_assoc);
        assert!(
            rs[0]["caller"]["peer"]
                .as_str()
                .unwrap()
                .starts_with(&format!("{}:", web.ipv4)),
            "{}",
            rs[0]
        );
    }
    for (pid, cache) in [(batch_pid1, "miss"), (batch_pid2, "hit")] {
        let rs = by_pid(&records, pid);
        assert_eq!(
            rs.len(),
            1,
            "one record for sdk-client pid {pid}: {records:#?}"
        );
        assert_pod_record(rs[0], &batch, pid, &rust_comm, cache, &batch_assoc);
        assert!(
            rs[0]["caller"]["peer"]
                .as_str()
                .unwrap()
                .starts_with(&format!("[{}]:", batch.ipv6)),
            "{}",
            rs[0]
        );
    }
    let rs = by_pid(&records, m.pid);
    assert_eq!(
        rs.len(),
        2,
        "two records for the v4-mapped client: {records:#?}"
    );
    assert_pod_record(rs[0], &mapped, m.pid, "python3", "miss", &mapped_assoc);
    assert_pod_record(rs[1], &mapped, m.pid, "python3", "hit", &mapped_assoc);

    let rs = by_pid(&records, h.pid);
    assert_eq!(
        rs.len(),
        1,
        "one record for the non-pod caller: {records:#?}"
    );
    let r = rs[0];
    assert_eq!(r["binding"], "unattributed", "{r}");
    assert_eq!(r["outcome"], "allowed", "{r}");
    assert_eq!(r["http_status"], 200, "{r}");
    assert_eq!(r["caller"]["pod_uid"], Value::Null, "{r}");
    assert_eq!(r["caller"]["container_id"], Value::Null, "{r}");
    assert_eq!(r["caller"]["comm"], "python3", "{r}");
    assert_eq!(r["caller"]["cgroup_id"], cgroup_id(&host), "{r}");
    assert_eq!(
        r["caller"]["cgroup_path"],
        host.cgroup_v2_path().unwrap().as_str(),
        "{r}"
    );

    let metrics = agent.metrics().unwrap();
    assert_no_secrets(
        &std::fs::read_to_string(&audit).unwrap(),
        "the audit log",
        &tokens,
        &fake,
    );
    assert_no_secrets(&agent.logs().unwrap(), "the agent's log", &tokens, &fake);
    assert_no_secrets(&metrics, "/metrics", &tokens, &fake);

    // The links are fd-based: once the agent has exited, the kernel holds none of its programs at
    // the node's cgroup root (asked with BPF_PROG_QUERY, what `bpftool cgroup show` prints).
    let status = agent.stop().unwrap();
    assert!(status.success(), "the agent exits 0 on SIGTERM: {status}");
    assert_eq!(
        programs_attached(&node),
        vec![0, 0, 0],
        "no program stays attached after the agent exits"
    );
    // A connect from a pod now reaches no program: none is refused with EPERM, each finds nothing
    // listening (the addresses `initialize` made stay). An agent started again attaches exactly
    // once more and attributes again.
    let down = web
        .connect_flood(
            &[Family::V4, Family::V6, Family::V4Mapped],
            3,
            Duration::ZERO,
            Duration::ZERO,
        )
        .unwrap();
    assert!(
        down.attempts.iter().all(|a| a.errno == libc::ECONNREFUSED),
        "with the agent stopped, connects are refused by the stack, not the programs: {:?}",
        down.attempts
    );
    let audit2 = node.dir().join("audit2.log");
    let again = AgentProcess::start(&node, &fake, AgentArgs::default().audit_log(&audit2)).unwrap();
    assert_eq!(programs_attached(&node), vec![1, 1, 1]);
    let (pid, _) = sdk_fetch(&web, false, CREDENTIALS_URI_V4);
    let records = wait_audit_records(&audit2, 1, AUDIT_WAIT).unwrap();
    assert_eq!(records[0]["caller"]["pid"], pid, "{}", records[0]);
    assert_eq!(records[0]["caller"]["pod_uid"], web.uid.as_str());
    assert!(again.stop().unwrap().success());
    assert_eq!(programs_attached(&node), vec![0, 0, 0]);
}

#[test]
fn many_pods_in_parallel_are_each_attributed_to_themselves() {
    if !e2e::privileged("many_pods_in_parallel_are_each_attributed_to_themselves") {
        return;
    }
    const PODS: usize = 8;
    const REQUESTS: usize = 5;
    let node = SimNode::new().unwrap();
    let fake = start_fake_eks_auth_in(node.netns(), "e2e-parallel").unwrap();
    let mut pods = Vec::new();
    for i in 0..PODS {
        let namespace = format!("team-{}", i % 3);
        let sa = format!("sa-{i}");
        fake.associate(&namespace, &sa, &format!("role-{i}"));
        let driver = if i % 2 == 0 {
            CgroupDriver::Systemd
        } else {
            CgroupDriver::Cgroupfs
        };
        let qos = [
            QosClass::Burstable,
            QosClass::Guaranteed,
            QosClass::BestEffort,
        ][i % 3];
        let pod = node
            .add_pod(
                PodSpec::new(&format!("app-{i}"), &namespace, &sa)
                    .driver(driver)
                    .qos(qos),
            )
            .unwrap();
        pod.refresh_token(&fake).unwrap();
        pods.push(pod);
    }
    let audit = node.dir().join("audit.log");
    let agent = AgentProcess::start(&node, &fake, AgentArgs::default().audit_log(&audit)).unwrap();

    // All pods at once, each on a new connection per request, over all three ways in.
    let families = [Family::V4, Family::V6, Family::V4Mapped];
    let children: Vec<_> = pods
        .iter()
        .enumerate()
        .map(|(i, pod)| {
            pod.python_requests_command(families[i % 3], &pod.token_path(), REQUESTS, false)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut pids = Vec::new();
    for (pod, child) in pods.iter().zip(children) {
        let run = e2e::clients::PyRequests::parse(&child.wait_with_output().unwrap()).unwrap();
        for ex in &run.exchanges {
            assert_eq!(ex.status, Some(200), "pod {}: {ex:?}", pod.name);
        }
        pids.push(run.pid);
    }

    let records = wait_audit_records(&audit, PODS * REQUESTS, AUDIT_WAIT).unwrap();
    assert_eq!(records.len(), PODS * REQUESTS);
    for r in &records {
        assert_eq!(
            r["caller"]["pod_uid"], r["token"]["pod_uid"],
            "a request attributed to the wrong pod: {r}"
        );
        assert_eq!(r["binding"], "match", "{r}");
    }
    for (pod, pid) in pods.iter().zip(&pids) {
        let mine: Vec<&Value> = records
            .iter()
            .filter(|r| r["token"]["pod_uid"] == pod.uid.as_str())
            .collect();
        assert_eq!(mine.len(), REQUESTS, "pod {}: {mine:#?}", pod.name);
        for r in mine {
            assert_eq!(r["caller"]["pid"], *pid, "{r}");
            assert_eq!(r["caller"]["cgroup_id"], cgroup_id(pod), "{r}");
            assert_eq!(
                r["caller"]["container_id"],
                pod.container_id.as_str(),
                "{r}"
            );
        }
    }
    assert_eq!(
        agent
            .metric("pod_identity_binding_total{result=\"match\"}")
            .unwrap(),
        (PODS * REQUESTS) as f64
    );
}
