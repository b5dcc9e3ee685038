//! Audit log rotation end to end: the real agent, with a small `--audit-log-max-size`, under
//! concurrent credential requests from several pods, rotates its audit log many times and loses no
//! record: every request answered has its record, whole, in `audit.log` or one of its backups, and
//! no file is larger than the bound.
//!
//! Needs root, cgroup v2, eBPF, and the agent binary (`cargo build -p eks-pod-identity-agent`).

use std::path::{Path, PathBuf};
use std::process::Stdio;

use e2e::agent::{AgentArgs, AgentProcess, node_with_web_pods};
use e2e::clients::{Family, PyRequests};
use serde_json::Value;

/// `--audit-log-max-size`: a handful of records (each under 1 KiB) a file.
const MAX_SIZE: u64 = 4096;
/// `--audit-log-max-backups`: more than the rotations this load makes, so that every record stays.
const MAX_BACKUPS: u32 = 1000;
/// Requests per pod, each on a new connection; with 8 pods, far below the agent's 4096-record
/// audit queue even if the writer fell behind.
const REQUESTS: usize = 50;

/// The audit log and its backups, oldest first (`audit.log.<highest>` … `audit.log.1`,
/// `audit.log`). Fails on a stray name or a gap in the numbers.
fn audit_files(dir: &Path) -> Vec<PathBuf> {
    let mut numbers = Vec::new();
    let mut current = false;
    for entry in std::fs::read_dir(dir).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if name == "audit.log" {
            current = true;
        } else if let Some(n) = name.strip_prefix("audit.log.") {
            let n: u32 = n
                .parse()
                .unwrap_or_else(|_| panic!("unexpected file {name} beside the audit log"));
            numbers.push(n);
        }
    }
    assert!(current, "audit.log is missing");
    numbers.sort_unstable();
    assert_eq!(
        numbers,
        (1..=u32::try_from(numbers.len()).unwrap()).collect::<Vec<_>>(),
        "backups are numbered from 1 without a gap"
    );
    let mut files: Vec<PathBuf> = numbers
        .iter()
        .rev()
        .map(|n| dir.join(format!("audit.log.{n}")))
        .collect();
    files.push(dir.join("audit.log"));
    files
}

#[test]
fn audit_rotation_under_load_loses_no_record() {
    if !e2e::privileged("audit_rotation_under_load_loses_no_record") {
        return;
    }
    let (node, fake, pods) = node_with_web_pods(
        "e2e-audit-rotation",
        [
            "web-0", "web-1", "web-2", "web-3", "web-4", "web-5", "web-6", "web-7",
        ],
    )
    .unwrap();
    for pod in &pods {
        pod.refresh_token(&fake).unwrap();
    }
    let audit = node.dir().join("audit.log");
    let agent = AgentProcess::start(
        &node,
        &fake,
        AgentArgs::default().audit_log(&audit).args([
            "--audit-log-max-size".to_owned(),
            MAX_SIZE.to_string(),
            "--audit-log-max-backups".to_owned(),
            MAX_BACKUPS.to_string(),
        ]),
    )
    .unwrap();

    // Every pod at once, a new connection per request, over IPv4 and IPv6.
    let children: Vec<_> = pods
        .iter()
        .enumerate()
        .map(|(i, pod)| {
            let family = if i % 2 == 0 { Family::V4 } else { Family::V6 };
            pod.python_requests_command(family, &pod.token_path(), REQUESTS, false)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut answered = 0;
    for (pod, child) in pods.iter().zip(children) {
        let run = PyRequests::parse(&child.wait_with_output().unwrap()).unwrap();
        assert_eq!(run.exchanges.len(), REQUESTS);
        for ex in &run.exchanges {
            assert!(ex.status.is_some(), "pod {}: unanswered {ex:?}", pod.name);
        }
        answered += run.exchanges.len();
    }
    assert_eq!(
        agent.metric("pod_identity_audit_dropped_total").unwrap(),
        0.0,
        "no record dropped from the audit queue"
    );
    // SIGTERM: the agent drains the audit queue before it exits.
    let status = agent.stop().unwrap();
    assert!(status.success(), "the agent exits 0 on SIGTERM: {status}");

    let files = audit_files(node.dir());
    assert!(
        files.len() > 2,
        "more than one rotation happened: {files:?}"
    );
    let mut records = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        let size = u64::try_from(text.len()).unwrap();
        assert!(size <= MAX_SIZE, "{} is {size} bytes", f.display());
        assert!(
            text.ends_with('\n'),
            "{} does not end with a whole line",
            f.display()
        );
        for line in text.lines() {
            let r: Value = serde_json::from_str(line).unwrap_or_else(|e| {
                panic!("{}: a line that is not JSON ({e}): {line}", f.display())
            });
            records.push(r);
        }
    }
    eprintln!(
        "{answered} requests answered, {} records in {} files",
        records.len(),
        files.len()
    );
    assert_eq!(
        records.len(),
        answered,
        "one record per answered request across {} files",
        files.len()
    );
    for pod in &pods {
        let mine = records
            .iter()
            .filter(|r| r["caller"]["pod_uid"] == pod.uid.as_str())
            .count();
        assert_eq!(mine, REQUESTS, "records of pod {}", pod.name);
    }
    for r in &records {
        assert_eq!(r["caller"]["pod_uid"], r["token"]["pod_uid"], "{r}");
    }
}
