//! The `ocsf` format: what each event carries, checked field by field, and every shape checked
//! against the OCSF release's schema (ocsf-json-schema, through tests/fixtures/ocsf_validate.py).

use std::io::Write as _;
use std::process::{Command, Stdio};

use base64::Engine as _;
use serde_json::Value;

use super::*;
use crate::audit::ocsf;
use crate::ebpf::Caller;
use crate::proof::Proof;

const POD_UID: &str = "0b5c3e9e-5a5e-4d8f-9a51-6c0f2a1d7e11";
const ROLE: &str = "arn:aws:iam::111122223333:role/shop-reader";

fn allowed() -> AuditRecord {
    AuditRecord {
        ts: "2026-11-26T10:00:00.250Z".into(),
        outcome: "allowed",
        http_status: 200,
        reason: None,
        cache: Some("miss"),
        latency_us: 2500,
        cluster: Some("prod-eu".into()),
        node: None,
        caller: CallerRecord {
            peer: "169.254.200.7:40112".into(),
            cgroup_id: Some(4242),
            cgroup_path: Some("/kubepods.slice/x".into()),
            pod_uid: Some(POD_UID.into()),
            container_id: Some("63fc2f5ea961".into()),
            pid: Some(31337),
            comm: Some("python3".into()),
            start_ns: Some(1_230_000_000),
            exec_id: Some("bm9kZS1hOjEyMzAwMDAwMDA6MzEzMzc=".into()),
        },
        pod: Some(PodRecord {
            namespace: "shop".into(),
            name: "web-0".into(),
            service_account: "reader".into(),
            container: Some("app".into()),
            token_matches: Some(true),
            container_scope: Some("listed"),
        }),
        token: Some(TokenRecord {
            namespace: Some("shop".into()),
            service_account: Some("reader".into()),
            pod_name: Some("web-0".into()),
            pod_uid: Some(POD_UID.into()),
            node_name: Some("node-a".into()),
            jti: Some("jti-1".into()),
        }),
        binding: "match",
        verified_by: Proof::KERNEL | Proof::EKS_AUTH,
        role_arn: Some(ROLE.into()),
        association_id: Some("a-123".into()),
        credentials: Some(ServedCredentials {
            access_key_id: "ASIAEXAMPLEKEY".into(),
            assumed_role_arn: Some(
                "arn:aws:sts::111122223333:assumed-role/shop-reader/eks-x".into(),
            ),
            expiration: "2026-11-26T16:00:00Z".into(),
            source: "eks_auth",
        }),
    }
}

/// A refused request from a caller outside any pod, with no token.
fn anonymous() -> AuditRecord {
    AuditRecord {
        ts: "2026-11-26T10:00:01.000Z".into(),
        outcome: "denied",
        http_status: 400,
        reason: Some("no Authorization header".into()),
        cache: None,
        latency_us: 40,
        cluster: None,
        node: None,
        caller: CallerRecord {
            peer: "[::1]:5000".into(),
            ..CallerRecord::default()
        },
        pod: None,
        token: None,
        binding: "off",
        verified_by: Proof::empty(),
        role_arn: None,
        association_id: None,
        credentials: None,
    }
}

/// A token refused under `enforce`: presented from a pod the view does not know.
fn mismatched() -> AuditRecord {
    AuditRecord {
        outcome: "denied",
        http_status: 403,
        reason: Some("token binding mismatch".into()),
        pod: None,
        binding: "mismatch",
        verified_by: Proof::empty(),
        role_arn: None,
        association_id: None,
        credentials: None,
        ..allowed()
    }
}

fn event(record: &AuditRecord, node: Option<&str>) -> Value {
    let record = AuditRecord {
        node: node.map(str::to_owned),
        ..record.clone()
    };
    let mut line = Vec::new();
    ocsf::to_line(&record, &mut line).unwrap();
    assert_eq!(line.last(), Some(&b'\n'));
    assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1);
    serde_json::from_slice(&line).unwrap()
}

/// Runs the schema validator over `events`; panics with its report when any is invalid. Python
/// and the packages are set up by `cargo xtask setup`: missing, the test fails, never skips.
pub(crate) fn validate(events: &[Value]) {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/ocsf_validate.py"
    );
    let mut child = Command::new("python3")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 (cargo xtask setup installs it)");
    let mut stdin = child.stdin.take().unwrap();
    for e in events {
        writeln!(stdin, "{e}").unwrap();
    }
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    let report =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{report}");
    assert!(
        report.contains(&format!("{} events valid, 0 invalid", events.len())),
        "{report}"
    );
}

#[test]
fn an_allowed_request_names_the_actor_role_key_and_node() {
    let e = event(&allowed(), Some("node-a"));
    assert_eq!(e["class_uid"], 3002);
    assert_eq!(e["type_uid"], 300_201);
    assert_eq!(e["metadata"]["version"], ocsf::VERSION);
    assert_eq!(e["time"], 1_795_687_200_250_u64);
    assert_eq!(e["status_id"], 1);
    assert_eq!(e["status_code"], "200");
    let process = &e["actor"]["process"];
    assert_eq!(process["pid"], 31337);
    assert_eq!(process["name"], "python3");
    assert_eq!(process["uid"], "bm9kZS1hOjEyMzAwMDAwMDA6MzEzMzc=");
    let container = &process["container"];
    assert_eq!(container["uid"], "63fc2f5ea961");
    assert_eq!(container["name"], "app");
    assert_eq!(container["pod_uuid"], POD_UID);
    assert_eq!(
        container["tags"],
        serde_json::json!([
            {"name": "k8s.namespace.name", "value": "shop"},
            {"name": "k8s.pod.name", "value": "web-0"},
        ])
    );
    assert_eq!(
        e["actor"]["user"]["uid"],
        "system:serviceaccount:shop:reader"
    );
    assert_eq!(e["user"]["uid"], ROLE);
    assert_eq!(e["user"]["name"], "shop-reader");
    assert_eq!(e["user"]["account"]["uid"], "111122223333");
    assert_eq!(e["user"]["credential_uid"], "ASIAEXAMPLEKEY");
    assert_eq!(e["session"]["credential_uid"], "ASIAEXAMPLEKEY");
    assert_eq!(e["session"]["expiration_time"], 1_795_708_800_000_u64);
    assert_eq!(e["device"]["hostname"], "node-a");
    assert_eq!(
        e["metadata"]["tags"],
        serde_json::json!([{"name": "k8s.cluster.name", "value": "prod-eu"}])
    );
    assert_eq!(e["src_endpoint"]["ip"], "169.254.200.7");
    assert_eq!(e["unmapped"]["binding"], "match");
    assert_eq!(e["unmapped"]["container_scope"], "listed");
    assert_eq!(
        e["unmapped"]["verified_by"],
        serde_json::json!(["kernel", "eks-auth"])
    );
    validate(&[e]);
}

#[test]
fn refused_requests_name_whom_they_claimed_or_nobody() {
    let anonymous = event(&anonymous(), None);
    assert_eq!(anonymous["status_id"], 2);
    assert_eq!(anonymous["status_code"], "400");
    assert_eq!(anonymous["status_detail"], "no Authorization header");
    assert_eq!(anonymous["user"]["uid"], "system:anonymous");
    assert!(anonymous.get("actor").is_none() && anonymous.get("device").is_none());
    assert!(anonymous.get("session").is_none());
    let mismatched = event(&mismatched(), Some("node-a"));
    assert_eq!(mismatched["severity_id"], 3);
    assert_eq!(
        mismatched["user"]["uid"],
        "system:serviceaccount:shop:reader"
    );
    // The kernel's facts stay; no pod view, so no names.
    assert_eq!(
        mismatched["actor"]["process"]["container"]["uid"],
        "63fc2f5ea961"
    );
    assert!(mismatched["actor"].get("user").is_none());
    assert_eq!(mismatched["unmapped"]["token"]["pod_name"], "web-0");
    validate(&[anonymous, mismatched]);
}

#[test]
fn the_writer_writes_ocsf_with_this_process_exec_id() {
    let dir = test_dir("ocsf-writer");
    let path = dir.join("audit.log");
    let pid = std::process::id();
    let event = AuditEvent {
        process: Some(Caller {
            cgroup_id: 1,
            pid,
            tid: pid,
            uid: 0,
            comm: "cargo-test".into(),
            netns_cookie: 1,
        }),
        // Answered now: this process was running then (a record from before it started would
        // name another process that had its pid, and gets no exec_id).
        at: std::time::SystemTime::now(),
        ..record(403)
    };
    let formatter = Formatter {
        format: crate::config::AuditFormat::Ocsf,
        cluster: Some("prod-eu".into()),
        node: Some("node-a".into()),
    };
    let mut out = writer::Output::open(AuditSink::File(path.clone()), NO_ROTATION).unwrap();
    write_batch(
        &mut out,
        &formatter,
        [event.clone(), record(200)].into_iter(),
        &mut WriteErrors::new(metric()),
    );
    drop(out);
    let lines: Vec<Value> = fs::read_to_string(&path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    let exec_id = lines[0]["actor"]["process"]["uid"].as_str().unwrap();
    let decoded = String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(exec_id)
            .unwrap(),
    )
    .unwrap();
    let start = formatter.record(&event).caller.start_ns.unwrap();
    assert_eq!(decoded, format!("node-a:{start}:{pid}"));
    assert_eq!(lines[0]["unmapped"]["process_start_ns"], start);
    validate(&lines);
    // The native format carries the same identifier.
    let native = Formatter {
        format: crate::config::AuditFormat::Native,
        ..formatter
    };
    let mut line = Vec::new();
    native.line(&event, &mut line).unwrap();
    let native: Value = serde_json::from_slice(&line).unwrap();
    assert_eq!(native["caller"]["exec_id"], exec_id);
    // And the cluster and node, as the OCSF event does.
    assert_eq!(native["cluster"], "prod-eu");
    assert_eq!(native["node"], "node-a");
    assert_eq!(lines[0]["metadata"]["tags"][0]["value"], "prod-eu");
    fs::remove_dir_all(&dir).unwrap();
}
