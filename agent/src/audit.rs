//! The per-request audit log: one JSON line per credential request, for security teams.
//!
//! Records are queued on the request path (never blocking it; a full queue drops the record and
//! counts it) and written by a thread of their own. The file is reopened when it has been rotated
//! away (renamed or removed). Records carry claims and kernel facts, never a token or a credential.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write as _};
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::path::PathBuf;
use std::thread::JoinHandle;
use std::time::SystemTime;

use prometheus::IntCounter;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::config::AuditSink;

/// One credential request, as the audit log records it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct AuditRecord {
    /// RFC 3339, UTC.
    pub ts: String,
    /// `allowed`, `denied` (refused by policy or validation) or `error` (upstream failed).
    pub outcome: &'static str,
    pub http_status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// `hit`, `miss` or `coalesced`, when credentials were looked up.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache: Option<&'static str>,
    pub latency_us: u64,
    pub caller: CallerRecord,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<TokenRecord>,
    /// `match`, `mismatch`, `unattributed` or `off`.
    pub binding: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role_arn: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub association_id: Option<String>,
}

/// The caller, from the kernel.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct CallerRecord {
    pub peer: String,
    pub cgroup_id: Option<u64>,
    pub cgroup_path: Option<String>,
    pub pod_uid: Option<String>,
    pub container_id: Option<String>,
    pub pid: Option<u32>,
    pub comm: Option<String>,
}

/// The token's claims as presented (unverified).
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct TokenRecord {
    pub namespace: Option<String>,
    pub service_account: Option<String>,
    pub pod_name: Option<String>,
    pub pod_uid: Option<String>,
    pub node_name: Option<String>,
    pub jti: Option<String>,
}

/// The time format of `ts`.
pub fn timestamp(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// Why the audit log could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("opening the audit log {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("starting the audit writer thread")]
    Thread(#[source] io::Error),
}

/// The request path's handle on the audit log. Cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    queue: mpsc::Sender<AuditRecord>,
    dropped: IntCounter,
}

/// The writer thread; [`AuditWriter::finish`] waits until every queued record is written.
pub struct AuditWriter(JoinHandle<()>);

impl AuditLog {
    /// Opens the sink and starts the writer thread.
    pub fn start(
        sink: AuditSink,
        capacity: usize,
        dropped: IntCounter,
    ) -> Result<(AuditLog, AuditWriter), AuditError> {
        let out = Output::open(sink)?;
        let (queue, records) = mpsc::channel(capacity.max(1));
        let thread = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || write_records(out, records))
            .map_err(AuditError::Thread)?;
        Ok((AuditLog { queue, dropped }, AuditWriter(thread)))
    }

    /// Queues a record; drops and counts it if the writer is behind.
    pub fn record(&self, record: AuditRecord) {
        if self.queue.try_send(record).is_err() {
            self.dropped.inc();
        }
    }
}

impl AuditWriter {
    /// Waits for the writer to drain the queue (once every [`AuditLog`] clone is dropped).
    pub async fn finish(self) {
        let _ = tokio::task::spawn_blocking(move || self.0.join()).await;
    }
}

/// Where records go: stdout, or a file that may be rotated under us.
enum Output {
    Stdout(io::Stdout),
    File {
        path: PathBuf,
        file: BufWriter<File>,
        inode: u64,
    },
}

impl Output {
    fn open(sink: AuditSink) -> Result<Output, AuditError> {
        match sink {
            AuditSink::Stdout => Ok(Output::Stdout(io::stdout())),
            AuditSink::File(path) => {
                let (file, inode) = open_append(&path).map_err(|source| AuditError::Open {
                    path: path.clone(),
                    source,
                })?;
                Ok(Output::File { path, file, inode })
            }
        }
    }

    fn writer(&mut self) -> &mut dyn io::Write {
        match self {
            Output::Stdout(out) => out,
            Output::File { file, .. } => file,
        }
    }

    /// Reopens the file if the path no longer names the file we write (logrotate moved it).
    fn reopen_if_rotated(&mut self) {
        let Output::File { path, file, inode } = self else {
            return;
        };
        let current = std::fs::metadata(&*path).map(|m| m.ino()).ok();
        if current == Some(*inode) {
            return;
        }
        match open_append(path) {
            Ok((new_file, new_inode)) => {
                let _ = file.flush();
                *file = new_file;
                *inode = new_inode;
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "could not reopen the rotated audit log")
            }
        }
    }
}

fn open_append(path: &std::path::Path) -> io::Result<(BufWriter<File>, u64)> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)?;
    let inode = file.metadata()?.ino();
    Ok((BufWriter::new(file), inode))
}

/// The writer thread: a batch at a time, flushed when the queue is momentarily empty.
fn write_records(mut out: Output, mut records: mpsc::Receiver<AuditRecord>) {
    while let Some(first) = records.blocking_recv() {
        out.reopen_if_rotated();
        let mut next = Some(first);
        while let Some(record) = next {
            let w = out.writer();
            if serde_json::to_writer(&mut *w, &record)
                .map_err(io::Error::from)
                .and_then(|()| w.write_all(b"\n"))
                .is_err()
            {
                tracing::warn!("could not write an audit record");
            }
            next = records.try_recv().ok();
        }
        if out.writer().flush().is_err() {
            tracing::warn!("could not flush the audit log");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(n: u16) -> AuditRecord {
        AuditRecord {
            ts: timestamp(SystemTime::UNIX_EPOCH),
            outcome: "allowed",
            http_status: n,
            reason: None,
            cache: Some("hit"),
            latency_us: 12,
            caller: CallerRecord {
                peer: "169.254.200.1:1234".into(),
                ..CallerRecord::default()
            },
            token: None,
            binding: "off",
            role_arn: None,
            association_id: None,
        }
    }

    fn metric() -> IntCounter {
        IntCounter::new("dropped", "test").unwrap()
    }

    #[tokio::test]
    async fn writes_json_lines_and_survives_rotation() {
        let dir = std::env::temp_dir().join(format!("audit-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("audit.log");
        let _ = std::fs::remove_file(&path);
        let (log, writer) = AuditLog::start(AuditSink::File(path.clone()), 16, metric()).unwrap();
        log.record(record(200));
        // Let the writer catch up before rotating, as logrotate would find it.
        for _ in 0..100 {
            if std::fs::read_to_string(&path)
                .unwrap_or_default()
                .lines()
                .count()
                == 1
            {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        std::fs::rename(&path, dir.join("audit.log.1")).unwrap();
        log.record(record(403));
        drop(log);
        writer.finish().await;
        let rotated = std::fs::read_to_string(dir.join("audit.log.1")).unwrap();
        let fresh = std::fs::read_to_string(&path).unwrap();
        let first: serde_json::Value = serde_json::from_str(rotated.trim()).unwrap();
        let second: serde_json::Value = serde_json::from_str(fresh.trim()).unwrap();
        assert_eq!(first["http_status"], 200);
        assert_eq!(first["ts"], "1970-01-01T00:00:00.000Z");
        assert_eq!(second["http_status"], 403);
        assert!(second.get("reason").is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let (queue, _records) = mpsc::channel(1);
        let dropped = metric();
        let log = AuditLog {
            queue,
            dropped: dropped.clone(),
        };
        log.record(record(200));
        log.record(record(200));
        assert_eq!(dropped.get(), 1);
    }
}
