//! `eks-pod-identity-agent audit who --access-key-id ASIA…`: which pods and processes received
//! these credentials, and when — the join from a CloudTrail event (`userIdentity.accessKeyId`) to
//! the pod, container, pid and process name, read from the audit log and its rotated files.
//!
//! A command-line tool, run on the node (or on a copy of the files): plain blocking file reads, no
//! runtime.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

/// Why the audit log could not be searched.
#[derive(Debug, thiserror::Error)]
pub enum AuditWhoError {
    #[error("no audit log at {} (nor rotated files {}.N)", path.display(), path.display())]
    Missing { path: PathBuf },
    #[error("reading {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}:{line}: not an audit record ({reason})", path.display())]
    Malformed {
        path: PathBuf,
        line: usize,
        reason: String,
    },
}

/// One pod and process that received the credentials, over the time range it asked.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Receiver {
    pub namespace: Option<String>,
    pub pod_name: Option<String>,
    pub pod_uid: Option<String>,
    pub container_id: Option<String>,
    pub pid: Option<u64>,
    pub comm: Option<String>,
    pub cgroup_path: Option<String>,
    /// First and last time it was handed these credentials (the records' `ts`).
    pub first: String,
    pub last: String,
    /// How many answers carried them.
    pub requests: u64,
}

/// What the search read and found.
#[derive(Debug, Default)]
pub struct Found {
    pub files: Vec<PathBuf>,
    pub receivers: Vec<Receiver>,
}

/// The audit log and its rotated files (`PATH`, `PATH.1`, `PATH.2`, …), oldest first.
pub fn audit_files(path: &Path) -> Result<Vec<PathBuf>, AuditWhoError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(AuditWhoError::Missing { path: path.into() });
        }
        Err(source) => {
            return Err(AuditWhoError::Read {
                path: dir.into(),
                source,
            });
        }
    };
    let mut numbered: Vec<(u64, PathBuf)> = Vec::new();
    for entry in entries.flatten() {
        let file_name = entry.file_name().to_string_lossy().into_owned();
        if file_name == name {
            numbered.push((0, entry.path()));
        } else if let Some(n) = file_name
            .strip_prefix(&name)
            .and_then(|rest| rest.strip_prefix('.'))
            .and_then(|n| n.parse::<u64>().ok())
        {
            numbered.push((n, entry.path()));
        }
    }
    if numbered.is_empty() {
        return Err(AuditWhoError::Missing { path: path.into() });
    }
    // The highest number is the oldest; the live file (0) the newest.
    numbered.sort_by_key(|(n, _)| std::cmp::Reverse(*n));
    Ok(numbered.into_iter().map(|(_, p)| p).collect())
}

/// Every pod and process whose allowed answers carried `access_key_id`.
pub fn who(path: &Path, access_key_id: &str) -> Result<Found, AuditWhoError> {
    let files = audit_files(path)?;
    let mut by_receiver: BTreeMap<String, Receiver> = BTreeMap::new();
    for file in &files {
        let read_error = |source| AuditWhoError::Read {
            path: file.clone(),
            source,
        };
        let reader = BufReader::new(std::fs::File::open(file).map_err(read_error)?);
        for (i, line) in reader.lines().enumerate() {
            let line = line.map_err(read_error)?;
            if line.trim().is_empty() {
                continue;
            }
            let record: Value =
                serde_json::from_str(&line).map_err(|e| AuditWhoError::Malformed {
                    path: file.clone(),
                    line: i + 1,
                    reason: e.to_string(),
                })?;
            if !record.is_object() || !record["ts"].is_string() {
                return Err(AuditWhoError::Malformed {
                    path: file.clone(),
                    line: i + 1,
                    reason: "no `ts`".into(),
                });
            }
            if record["credentials"]["access_key_id"].as_str() != Some(access_key_id) {
                continue;
            }
            let text = |v: &Value| v.as_str().map(str::to_owned);
            let caller = &record["caller"];
            let token = &record["token"];
            let found = Receiver {
                namespace: text(&token["namespace"]),
                pod_name: text(&token["pod_name"]),
                pod_uid: text(&caller["pod_uid"]),
                container_id: text(&caller["container_id"]),
                pid: caller["pid"].as_u64(),
                comm: text(&caller["comm"]),
                cgroup_path: text(&caller["cgroup_path"]),
                ..Receiver::default()
            };
            let key = serde_json::to_string(&found).unwrap_or_default();
            let ts = text(&record["ts"]).unwrap_or_default();
            let entry = by_receiver.entry(key).or_insert(Receiver {
                first: ts.clone(),
                ..found
            });
            // RFC 3339 UTC with fixed precision: text order is time order.
            if ts < entry.first {
                entry.first.clone_from(&ts);
            }
            if ts > entry.last {
                entry.last = ts;
            }
            entry.requests += 1;
        }
    }
    let mut receivers: Vec<Receiver> = by_receiver.into_values().collect();
    receivers.sort_by(|a, b| a.first.cmp(&b.first).then_with(|| a.pid.cmp(&b.pid)));
    Ok(Found { files, receivers })
}

/// The receivers as an aligned table, one line each.
pub fn table(receivers: &[Receiver]) -> String {
    let dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let rows: Vec<[String; 8]> = receivers
        .iter()
        .map(|r| {
            [
                r.first.clone(),
                r.last.clone(),
                r.requests.to_string(),
                format!("{}/{}", dash(&r.namespace), dash(&r.pod_name)),
                dash(&r.pod_uid),
                dash(&r.container_id),
                r.pid.map_or_else(|| "-".into(), |p| p.to_string()),
                dash(&r.comm),
            ]
        })
        .collect();
    let header = [
        "FIRST",
        "LAST",
        "REQUESTS",
        "NAMESPACE/POD",
        "POD UID",
        "CONTAINER",
        "PID",
        "COMM",
    ]
    .map(str::to_owned);
    let mut widths = header.clone().map(|h| h.len());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(&header).chain(&rows) {
        let mut line = String::new();
        for (cell, w) in row.iter().zip(widths) {
            let _ = write!(line, "{cell:<w$}  ");
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
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
}
