//! `eks-pod-identity-agent audit who --access-key-id ASIA…`: which pods and processes received
//! these credentials, and when — the join from a CloudTrail event (`userIdentity.accessKeyId`) to
//! the pod, container (id and name), pid and process name, read from the audit log and its
//! rotated files, in either format (native or OCSF, even mixed across files).
//!
//! A command-line tool, run on the node (or on a copy of the files): plain blocking file reads, no
//! runtime. This file finds the files and gathers the receivers; [`record`] reads one record of
//! either format; [`table`] prints them.

mod record;
mod table;

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

use record::receiver;
pub use table::table;

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
    /// The container's name in the pod's spec (`app`, `istio-proxy`), when the record has it.
    pub container: Option<String>,
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
            let (ts, found) = match receiver(&record, access_key_id) {
                Ok(Some(found)) => found,
                Ok(None) => continue,
                Err(reason) => {
                    return Err(AuditWhoError::Malformed {
                        path: file.clone(),
                        line: i + 1,
                        reason: reason.into(),
                    });
                }
            };
            let key = serde_json::to_string(&found).unwrap_or_default();
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

#[cfg(test)]
mod tests;
