//! The per-request audit log: one JSON line per credential request, for security teams.
//!
//! The request path queues an [`AuditEvent`] (never blocking; a full queue drops it and counts
//! it): what the request found out, as shared references (the caller's cgroup, the token's claims,
//! the credentials served) and plain values, nothing formatted. The writer thread, a thread of its
//! own, turns each event into an [`AuditRecord`] and serialises it. Records carry claims, kernel facts and the
//! identifiers of the credentials served (access key id, assumed-role ARN: what CloudTrail logs),
//! never a token, a secret key or a session token. Every record starts with `v`, the schema
//! version ([`SCHEMA_VERSION`]); `docs/audit-log.md` documents the schema field by field.
//!
//! **Rotation.** So that the log can never fill the node's disk, the writer rotates the file by
//! size ([`AuditRotation`]): before a record that would take the file past `max_size` (and the file
//! is not empty), it flushes, renames `PATH.n` → `PATH.n+1` (removing the oldest,
//! `PATH.<max_backups>`, when every number is taken) and `PATH` → `PATH.1`, and opens a fresh
//! `PATH`. `PATH.1` is the newest backup, the highest number the oldest. With `max_backups` 0 the
//! full file is replaced by an empty one. A record is serialised whole before it is written, so it
//! is never split across files, and no file grows past `max_size` unless a single record is larger
//! (then it is written alone). A rotation that fails (a rename refused, a full disk) is logged and
//! tried again after a while; meanwhile records go on to the current file, so nothing is lost.
//! `max_size` 0 never rotates, and stdout (`-`) is never rotated.
//!
//! The file is also reopened when something else rotated it away (logrotate's rename or remove):
//! at each batch, the writer checks that the path still names the file it writes.
//!
//! **Formats.** [`Formatter`] writes each record in the native form ([`to_line`]) or as an OCSF
//! event ([`ocsf`]), both from the same [`AuditRecord`], on the writer thread: the request path
//! pays for neither. It also adds what the request path does not look up: the process's start
//! and its Tetragon `exec_id` ([`process`]).

pub mod ocsf;
mod process;
mod record;
mod rotation;
mod writer;

use std::io;
use std::path::PathBuf;
use std::thread::JoinHandle;

use prometheus::IntCounter;
use tokio::sync::mpsc;

use crate::config::{AuditFormat, AuditRotation, AuditSink};
pub use record::{
    AuditEvent, AuditRecord, CallerRecord, PodRecord, SCHEMA_VERSION, ServedCredentials,
    TokenRecord, timestamp, to_line,
};
use writer::{Output, write_records};

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

/// Where the audit log counts what it loses: every record is written or counted here.
#[derive(Clone)]
pub struct AuditCounters {
    /// Records dropped because the queue was full (the writer behind).
    pub dropped: IntCounter,
    /// Records lost because writing them failed (a full disk, the file removed and not
    /// reopened): none of their bytes stays in the file.
    pub write_failed: IntCounter,
}

impl AuditCounters {
    pub fn new(metrics: &crate::metrics::Metrics) -> Self {
        AuditCounters {
            dropped: metrics.audit_dropped.clone(),
            write_failed: metrics.audit_write_failed.clone(),
        }
    }
}

/// How the writer thread turns an event into a line.
#[derive(Debug, Clone, Default)]
pub struct Formatter {
    pub format: AuditFormat,
    /// The cluster's name (`--cluster-name`), in every record.
    pub cluster: Option<String>,
    /// This node's name (`--node-name`), in every record (the OCSF event's `device`), and part
    /// of `exec_id`.
    pub node: Option<String>,
}

impl Formatter {
    /// The record of `event`, with the caller's process start and `exec_id` looked up.
    pub fn record(&self, event: &AuditEvent) -> AuditRecord {
        let mut record = event.to_record();
        record.cluster.clone_from(&self.cluster);
        record.node.clone_from(&self.node);
        let caller = &mut record.caller;
        if let Some(pid) = caller.pid {
            caller.start_ns = process::start_ns_before(pid, event.at);
            caller.exec_id = match (&self.node, caller.start_ns) {
                (Some(node), Some(start)) => Some(process::exec_id(node, start, pid)),
                _ => None,
            };
        }
        record
    }

    /// Appends `event` to `line` as one JSON line in this format.
    ///
    /// # Errors
    /// Serialisation failed (it cannot for these types, whose maps all have string keys).
    pub fn line(&self, event: &AuditEvent, line: &mut Vec<u8>) -> serde_json::Result<()> {
        let record = self.record(event);
        match self.format {
            AuditFormat::Native => to_line(&record, line),
            AuditFormat::Ocsf => ocsf::to_line(&record, line),
        }
    }
}

/// The request path's handle on the audit log. Cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    queue: mpsc::Sender<AuditEvent>,
    dropped: IntCounter,
}

/// The writer thread; [`AuditWriter::finish`] waits until every queued record is written.
pub struct AuditWriter(JoinHandle<()>);

impl AuditLog {
    /// Opens the sink and starts the writer thread, which writes records as `format` says and
    /// rotates a file as `rotation` says.
    pub fn start(
        sink: AuditSink,
        format: Formatter,
        rotation: AuditRotation,
        capacity: usize,
        counters: AuditCounters,
    ) -> Result<(AuditLog, AuditWriter), AuditError> {
        let out = Output::open(sink, rotation)?;
        let (queue, records) = mpsc::channel(capacity.max(1));
        let write_failed = counters.write_failed;
        let thread = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || write_records(out, &format, records, write_failed))
            .map_err(AuditError::Thread)?;
        let dropped = counters.dropped;
        Ok((AuditLog { queue, dropped }, AuditWriter(thread)))
    }

    /// Queues a request's event; drops and counts it if the writer is behind.
    pub fn record(&self, event: AuditEvent) {
        if self.queue.try_send(event).is_err() {
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

#[cfg(test)]
mod tests;
