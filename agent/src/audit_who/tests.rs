//! `audit who` over files of both formats, rotated, missing and malformed.

use super::*;

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("audit-who-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn line(ts: &str, key: &str, pod: &str, pid: u32) -> String {
    serde_json::json!({
        "v": 1, "ts": ts, "outcome": "allowed", "http_status": 200,
        "caller": {"pod_uid": format!("uid-{pod}"), "container_id": "c1", "pid": pid, "comm": "python3",
                   "cgroup_path": "/kubepods.slice/x"},
        "token": {"namespace": "shop", "pod_name": pod},
        "credentials": {"access_key_id": key, "expiration": "2026-11-26T12:00:00Z", "source": "cache"}
    })
    .to_string()
}

#[test]
fn finds_every_receiver_across_rotated_files_with_time_ranges() {
    let d = dir("rotated");
    let path = d.join("audit.log");
    std::fs::write(
        d.join("audit.log.2"),
        line("2026-11-26T10:00:00.000Z", "ASIAONE", "web-0", 10) + "\n",
    )
    .unwrap();
    std::fs::write(
        d.join("audit.log.1"),
        [
            line("2026-11-26T10:05:00.000Z", "ASIAONE", "web-0", 10),
            line("2026-11-26T10:06:00.000Z", "ASIATWO", "web-1", 20),
        ]
        .join("\n")
            + "\n",
    )
    .unwrap();
    std::fs::write(
        &path,
        line("2026-11-26T10:09:00.000Z", "ASIAONE", "web-2", 30) + "\n",
    )
    .unwrap();
    std::fs::write(d.join("audit.log.old"), "not ours").unwrap();

    let found = who(&path, "ASIAONE").unwrap();
    assert_eq!(found.files.len(), 3);
    assert_eq!(found.receivers.len(), 2);
    let web0 = &found.receivers[0];
    assert_eq!(web0.pod_name.as_deref(), Some("web-0"));
    assert_eq!(web0.first, "2026-11-26T10:00:00.000Z");
    assert_eq!(web0.last, "2026-11-26T10:05:00.000Z");
    assert_eq!(web0.requests, 2);
    assert_eq!(found.receivers[1].pid, Some(30));
    let printed = table(&found.receivers);
    assert!(printed.starts_with("FIRST"), "{printed}");
    assert!(printed.contains("shop/web-2"), "{printed}");
    assert!(who(&path, "ASIANONE").unwrap().receivers.is_empty());
    std::fs::remove_dir_all(&d).unwrap();
}

/// An allowed request as the `ocsf` format writes it.
fn ocsf_line(ms: u64, key: &str, pod: &str, container: &str, pid: u32) -> String {
    serde_json::json!({
        "class_uid": 3002, "time": ms, "status_id": 1,
        "metadata": {"version": "1.5.0", "product": {"name": "eks-pod-identity-agent"}},
        "user": {"uid": "arn:aws:iam::111122223333:role/r", "credential_uid": key},
        "session": {"credential_uid": key, "expiration_time": ms + 3_600_000},
        "actor": {"process": {"pid": pid, "name": "python3", "container": {
            "uid": "c1", "name": container, "pod_uuid": format!("uid-{pod}"),
            "tags": [{"name": "k8s.namespace.name", "value": "shop"},
                     {"name": "k8s.pod.name", "value": pod}]}}},
        "unmapped": {"cgroup_path": "/kubepods.slice/x"}
    })
    .to_string()
}

#[test]
fn reads_native_and_ocsf_records_mixed_across_files_with_container_names() {
    let d = dir("mixed");
    let path = d.join("audit.log");
    // Native before the switch to OCSF: the pod view's names win over the token's.
    let mut native: Value =
        serde_json::from_str(&line("2026-11-26T10:00:00.000Z", "ASIAONE", "web-0", 10)).unwrap();
    native["pod"] = serde_json::json!({"namespace": "shop", "name": "web-0",
        "service_account": "reader", "container": "app"});
    std::fs::write(d.join("audit.log.1"), native.to_string() + "\n").unwrap();
    // 2026-11-26T10:05:00.000Z and 10:06, after the switch: the same container, and a sidecar.
    std::fs::write(
        &path,
        [
            ocsf_line(1_795_687_500_000, "ASIAONE", "web-0", "app", 10),
            ocsf_line(1_795_687_560_000, "ASIAONE", "web-0", "istio-proxy", 11),
            ocsf_line(1_795_687_560_000, "ASIAOTHER", "web-0", "app", 10),
        ]
        .join("\n")
            + "\n",
    )
    .unwrap();
    let found = who(&path, "ASIAONE").unwrap();
    assert_eq!(found.receivers.len(), 2, "{:?}", found.receivers);
    let app = &found.receivers[0];
    assert_eq!(app.container.as_deref(), Some("app"));
    assert_eq!(app.namespace.as_deref(), Some("shop"));
    assert_eq!(app.pod_name.as_deref(), Some("web-0"));
    assert_eq!(app.pid, Some(10));
    assert_eq!(app.first, "2026-11-26T10:00:00.000Z");
    assert_eq!(app.last, "2026-11-26T10:05:00.000Z");
    assert_eq!(app.requests, 2);
    let sidecar = &found.receivers[1];
    assert_eq!(sidecar.container.as_deref(), Some("istio-proxy"));
    assert_eq!(sidecar.first, "2026-11-26T10:06:00.000Z");
    let printed = table(&found.receivers);
    assert!(printed.contains("CONTAINER ID"), "{printed}");
    assert!(printed.contains("istio-proxy"), "{printed}");
    // An OCSF event without its time is no record.
    std::fs::write(&path, "{\"class_uid\":3002}\n").unwrap();
    let err = who(&path, "ASIAONE").unwrap_err().to_string();
    assert!(err.contains("audit.log:1: not an audit record"), "{err}");
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn missing_and_malformed_files_are_clear_errors() {
    let d = dir("bad");
    let err = who(&d.join("audit.log"), "ASIA").unwrap_err().to_string();
    assert!(err.contains("no audit log at"), "{err}");
    let err = who(&d.join("nodir/audit.log"), "ASIA")
        .unwrap_err()
        .to_string();
    assert!(err.contains("no audit log at"), "{err}");
    std::fs::write(d.join("audit.log.1"), "{\"ts\":\"x\"}\n{ torn\n").unwrap();
    let err = who(&d.join("audit.log"), "ASIA").unwrap_err().to_string();
    assert!(err.contains("audit.log.1:2: not an audit record"), "{err}");
    std::fs::remove_dir_all(&d).unwrap();
}
