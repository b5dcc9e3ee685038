//! The audit log joins with CloudTrail: each allowed record carries the access key id the pod's SDK
//! received (the same on cache hits, a new one after a renewal), the assumed-role ARN, the
//! expiration and where the answer came from; no record ever holds a secret key or a session token;
//! and `audit who` finds the pod and process of a key across rotated files.

use std::time::Duration;

use e2e::agent::{AgentArgs, AgentProcess, node_with_web_pods, read_audit_log};
use e2e::node::CREDENTIALS_URI_V4;
use serde_json::Value;

const AUDIT_WAIT: Duration = Duration::from_secs(10);

/// Every record of the log and its rotated files, oldest first.
fn all_records(audit: &std::path::Path) -> Vec<Value> {
    let mut files: Vec<(u64, std::path::PathBuf)> = std::fs::read_dir(audit.parent().unwrap())
        .unwrap()
        .filter_map(|e| {
            let path = e.ok()?.path();
            let name = path.file_name()?.to_string_lossy().into_owned();
            match name.strip_prefix("audit.log") {
                Some("") => Some((0, path)),
                Some(n) => Some((n.strip_prefix('.')?.parse().ok()?, path)),
                None => None,
            }
        })
        .collect();
    files.sort_by_key(|(n, _)| std::cmp::Reverse(*n));
    files
        .iter()
        .flat_map(|(_, p)| read_audit_log(p).unwrap())
        .collect()
}

fn allowed_with_key<'a>(records: &'a [Value], key: &str) -> Vec<&'a Value> {
    records
        .iter()
        .filter(|r| r["outcome"] == "allowed" && r["credentials"]["access_key_id"] == key)
        .collect()
}

#[test]
fn allowed_records_carry_the_served_access_key_and_audit_who_finds_the_pod() {
    if !e2e::privileged("allowed_records_carry_the_served_access_key_and_audit_who_finds_the_pod") {
        return;
    }
    let (node, fake, [web, other]) = node_with_web_pods("e2e-join", ["web-0", "web-1"]).unwrap();
    web.refresh_token(&fake).unwrap();
    other.refresh_token(&fake).unwrap();
    let audit = node.dir().join("audit.log");
    let args = AgentArgs::default().audit_log(&audit).args([
        "--max-credential-retention-before-renewal",
        "3s",
        // Small files: the search has to read rotated ones.
        "--audit-log-max-size",
        "2Ki",
        "--audit-log-max-backups",
        "100",
    ]);
    let agent = AgentProcess::start(&node, &fake, args).unwrap();

    let fetch = |pod: &e2e::node::Pod| {
        pod.fetch_with_botocore(CREDENTIALS_URI_V4)
            .unwrap()
            .unwrap_or_else(|e| panic!("botocore: {e}\n{}", agent.logs().unwrap()))
    };
    let first = fetch(&web);
    let again = fetch(&web);
    assert_eq!(first.access_key_id, again.access_key_id, "a cache hit");
    fetch(&other);
    let mut records = Vec::new();
    assert!(
        e2e::wait_for(AUDIT_WAIT, || {
            records = all_records(&audit);
            records.len() >= 3
        }),
        "3 records: {records:?}"
    );
    let with_first = allowed_with_key(&records, &first.access_key_id);
    assert_eq!(
        with_first.len(),
        2,
        "both answers carried the key: {records:?}"
    );
    let sources: Vec<&str> = with_first
        .iter()
        .map(|r| r["credentials"]["source"].as_str().unwrap())
        .collect();
    assert_eq!(sources, ["eks_auth", "cache"], "{with_first:?}");
    for r in &with_first {
        assert_eq!(r["v"], 1, "{r}");
        assert_eq!(r["caller"]["pod_uid"], web.uid.as_str(), "{r}");
        assert!(
            r["credentials"]["assumed_role_arn"]
                .as_str()
                .is_some_and(
                    |a| a.starts_with("arn:aws:sts::") && a.contains(":assumed-role/web-role/")
                ),
            "{r}"
        );
        assert_eq!(
            r["credentials"]["expiration"].as_str(),
            first.expiry.as_deref(),
            "the expiration the SDK got: {r}"
        );
    }

    // After a renewal the pod gets, and the record names, a new key.
    assert!(
        e2e::wait_for(Duration::from_secs(10), || fake.issued().len() >= 3),
        "no renewal within 10 s"
    );
    let mut renewed = fetch(&web);
    for _ in 0..50 {
        if renewed.access_key_id != first.access_key_id {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        renewed = fetch(&web);
    }
    assert_ne!(renewed.access_key_id, first.access_key_id, "renewed");
    // Enough traffic that the 2 KiB files rotate a few times.
    for _ in 0..6 {
        fetch(&other);
    }
    let status = agent.stop().unwrap();
    assert!(status.success());
    let backups = std::fs::read_dir(node.dir())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("audit.log.")
        })
        .count();
    assert!(backups >= 2, "the log rotated: {backups} backups");

    // No file of the log holds a secret the fake issued.
    let mut all = String::new();
    for entry in std::fs::read_dir(node.dir()).unwrap() {
        let path = entry.unwrap().path();
        if path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("audit.log")
        {
            all.push_str(&std::fs::read_to_string(&path).unwrap());
        }
    }
    for issued in fake.issued() {
        assert!(
            !all.contains(&issued.secret_access_key),
            "a secret key in the audit log"
        );
        assert!(
            !all.contains(&issued.session_token),
            "a session token in the audit log"
        );
    }
    assert!(
        all.contains(&renewed.access_key_id),
        "the renewed key is recorded"
    );

    // `audit who` finds web-0 and only web-0 for the first key, across the rotated files.
    let bin = e2e::agent::agent_bin().unwrap();
    let found = e2e::agent::audit_who(&audit, &first.access_key_id).unwrap();
    // Two botocore runs: two processes of web-0, one answer each.
    assert_eq!(found.len(), 2, "{found:?}");
    for f in &found {
        assert_eq!(f["pod_uid"], web.uid.as_str(), "{f}");
        assert_eq!(f["pod_name"], "web-0", "{f}");
        assert_eq!(f["requests"], 1, "{f}");
        assert!(
            f["comm"].as_str().is_some_and(|c| c.starts_with("python")),
            "{f}"
        );
    }
    assert_ne!(found[0]["pid"], found[1]["pid"]);

    // A key nobody got: exit 1; a missing file: exit 2 with the path named.
    let none = std::process::Command::new(&bin)
        .args(["audit", "who", "--access-key-id", "ASIANOBODYGOTTHIS000"])
        .arg("--audit-log")
        .arg(&audit)
        .output()
        .unwrap();
    assert_eq!(none.status.code(), Some(1));
    let missing = std::process::Command::new(&bin)
        .args(["audit", "who", "--access-key-id", "ASIA"])
        .arg("--audit-log")
        .arg(node.dir().join("nope.log"))
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("nope.log"));
}
