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

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write as _};
use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use prometheus::IntCounter;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::cgroup::CgroupInfo;
use crate::config::{AuditRotation, AuditSink};
use crate::credentials::Issued;
use crate::credentials::cache::Lookup;
use crate::ebpf;
use crate::token::Claims;

/// One credential request as the request path hands it over: shared references and plain
/// values, so that queuing it copies a few pointers and formats nothing. The writer thread turns
/// it into an [`AuditRecord`] ([`AuditEvent::to_record`]).
#[derive(Debug, Clone)]
pub struct AuditEvent {
    pub at: SystemTime,
    pub outcome: &'static str,
    pub http_status: u16,
    /// Why the request was refused or failed.
    pub reason: Option<String>,
    /// How the credentials were looked up, when they were.
    pub lookup: Option<Lookup>,
    pub latency: Duration,
    pub peer: SocketAddr,
    /// The process that connected, from the kernel.
    pub process: Option<ebpf::Caller>,
    /// Its cgroup, with the pod and container.
    pub cgroup: Option<Arc<CgroupInfo>>,
    /// The token's claims as presented.
    pub claims: Option<Arc<Claims>>,
    /// `match`, `mismatch`, `unattributed` or `off`.
    pub binding: &'static str,
    /// The credentials served: only for allowed requests.
    pub issued: Option<Arc<Issued>>,
}

impl AuditEvent {
    /// A request with nothing found out yet: only when, from where, and its answer.
    pub fn new(at: SystemTime, peer: SocketAddr, outcome: &'static str, http_status: u16) -> Self {
        AuditEvent {
            at,
            outcome,
            http_status,
            reason: None,
            lookup: None,
            latency: Duration::ZERO,
            peer,
            process: None,
            cgroup: None,
            claims: None,
            binding: "off",
            issued: None,
        }
    }

    /// The record as the log writes it (formatting happens here, on the writer thread).
    pub fn to_record(&self) -> AuditRecord {
        let cgroup = self.cgroup.as_deref();
        let pod = cgroup.and_then(|c| c.pod.as_ref());
        let process = self.process.as_ref();
        let association = self.issued.as_ref().map(|i| &i.association);
        let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_owned());
        AuditRecord {
            ts: timestamp(self.at),
            outcome: self.outcome,
            http_status: self.http_status,
            reason: self.reason.clone(),
            cache: self.lookup.map(Lookup::as_str),
            latency_us: u64::try_from(self.latency.as_micros()).unwrap_or(u64::MAX),
            caller: CallerRecord {
                peer: self.peer.to_string(),
                cgroup_id: process.map(|p| p.cgroup_id),
                cgroup_path: cgroup.map(|c| c.path.clone()),
                pod_uid: pod.map(|p| p.pod_uid.to_string()),
                container_id: pod.and_then(|p| p.container_id.clone()),
                pid: process.map(|p| p.pid),
                comm: process.map(|p| p.comm.clone()),
            },
            token: self.claims.as_deref().map(|c| TokenRecord {
                namespace: c.namespace().map(str::to_owned),
                service_account: c.service_account().map(str::to_owned),
                pod_name: c.pod_name().map(str::to_owned),
                pod_uid: c.pod_uid().map(str::to_owned),
                node_name: c.node_name().map(str::to_owned),
                jti: c.jti.clone(),
            }),
            binding: self.binding,
            role_arn: association.and_then(|a| non_empty(&a.role_arn)),
            association_id: association.and_then(|a| non_empty(&a.association_id)),
            credentials: match (&self.issued, self.lookup) {
                (Some(issued), Some(lookup)) => Some(ServedCredentials {
                    access_key_id: issued.credentials.access_key_id.clone(),
                    assumed_role_arn: non_empty(&issued.association.assumed_role_arn),
                    expiration: humantime::format_rfc3339_seconds(issued.credentials.expiration)
                        .to_string(),
                    source: match lookup {
                        Lookup::Hit => "cache",
                        Lookup::Coalesced => "coalesced",
                        Lookup::Miss => "eks_auth",
                    },
                }),
                _ => None,
            },
        }
    }
}

/// One credential request, as the audit log writes it.
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
    /// The credentials handed out (allowed requests only): the keys to join the record with
    /// CloudTrail. Never the secret key or the session token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credentials: Option<ServedCredentials>,
}

/// The version of the record's schema, written as `v` in every record. It changes only when a
/// field changes meaning or goes away; new fields may appear in any version.
pub const SCHEMA_VERSION: u32 = 1;

/// What identifies the credentials a request was given, as CloudTrail records their use.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ServedCredentials {
    /// The access key id (`ASIA…`): CloudTrail's `userIdentity.accessKeyId`. An identifier, not a
    /// secret.
    pub access_key_id: String,
    /// `arn:aws:sts::<account>:assumed-role/<role>/<session>`: CloudTrail's `userIdentity.arn`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub assumed_role_arn: Option<String>,
    /// When the credentials expire, RFC 3339 UTC.
    pub expiration: String,
    /// `cache` (served from the cache), `coalesced` (another request's EKS Auth call, shared) or
    /// `eks_auth` (this request's own call).
    pub source: &'static str,
}

/// A record as written: the schema version first, then the record.
#[derive(Serialize)]
struct Versioned<'a> {
    v: u32,
    #[serde(flatten)]
    record: &'a AuditRecord,
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
    queue: mpsc::Sender<AuditEvent>,
    dropped: IntCounter,
}

/// The writer thread; [`AuditWriter::finish`] waits until every queued record is written.
pub struct AuditWriter(JoinHandle<()>);

impl AuditLog {
    /// Opens the sink and starts the writer thread, which rotates a file as `rotation` says.
    pub fn start(
        sink: AuditSink,
        rotation: AuditRotation,
        capacity: usize,
        dropped: IntCounter,
    ) -> Result<(AuditLog, AuditWriter), AuditError> {
        let out = Output::open(sink, rotation)?;
        let (queue, records) = mpsc::channel(capacity.max(1));
        let thread = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || write_records(out, records))
            .map_err(AuditError::Thread)?;
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

/// How long a failed rotation or reopen waits before it is tried again: a lasting failure (a full
/// disk, a read-only directory) is then logged now and then, not for every record.
const RETRY_AFTER: Duration = Duration::from_secs(10);

/// Where records go: stdout, or a file that is rotated by size and may be rotated under us.
enum Output {
    Stdout(io::Stdout),
    File(LogFile),
}

impl Output {
    fn open(sink: AuditSink, rotation: AuditRotation) -> Result<Output, AuditError> {
        match sink {
            AuditSink::Stdout => Ok(Output::Stdout(io::stdout())),
            AuditSink::File(path) => LogFile::open(path, rotation).map(Output::File),
        }
    }

    /// Where records go, for logs.
    fn path(&self) -> &Path {
        match self {
            Output::Stdout(_) => Path::new("-"),
            Output::File(f) => &f.path,
        }
    }

    fn reopen_if_moved(&mut self) {
        if let Output::File(f) = self {
            f.reopen_if_moved();
        }
    }

    /// Writes one complete line (a serialised record and its newline).
    fn write_line(&mut self, line: &[u8]) -> io::Result<()> {
        match self {
            Output::Stdout(out) => out.write_all(line),
            Output::File(f) => f.write_line(line),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Output::Stdout(out) => out.flush(),
            Output::File(f) => f.file.flush(),
        }
    }
}

/// The audit log file: the open file, which inode it is, how large it is, and its rotation.
struct LogFile {
    path: PathBuf,
    /// Holds whole lines only: everything in it goes to the file it was written for.
    file: BufWriter<File>,
    /// When the path names another inode, the file was moved away under us.
    inode: u64,
    /// The file's size once `file` is flushed.
    size: u64,
    rotation: AuditRotation,
    /// After a failed rotation or reopen: not again before then.
    retry_at: Option<Instant>,
}

impl LogFile {
    fn open(path: PathBuf, rotation: AuditRotation) -> Result<LogFile, AuditError> {
        let (file, inode, size) = open_append(&path).map_err(|source| AuditError::Open {
            path: path.clone(),
            source,
        })?;
        Ok(LogFile {
            path,
            file,
            inode,
            size,
            rotation,
            retry_at: None,
        })
    }

    /// Reopens the file if the path no longer names the file we write (logrotate moved it);
    /// otherwise takes its size from the file system (something else may have truncated it).
    fn reopen_if_moved(&mut self) {
        match fs::metadata(&self.path) {
            Ok(m) if m.ino() == self.inode => self.size = m.len() + self.buffered(),
            _ if self.waiting() => {}
            _ => {
                if let Err(e) = self.reopen() {
                    tracing::warn!(
                        path = %self.path.display(),
                        error = %e,
                        "could not reopen the audit log after it was moved; writing on to the old file"
                    );
                    self.retry_at = Some(Instant::now() + RETRY_AFTER);
                }
            }
        }
    }

    /// Writes one complete line, rotating first if the line would take the file past the bound.
    fn write_line(&mut self, line: &[u8]) -> io::Result<()> {
        let len = len_u64(line.len());
        if self.is_full_for(len)
            && !self.waiting()
            && let Err(e) = self.rotate()
        {
            tracing::warn!(
                path = %e.path.display(),
                step = e.step,
                error = %e.source,
                "could not rotate the audit log; writing on to the current file"
            );
            self.retry_at = Some(Instant::now() + RETRY_AFTER);
        }
        match self.file.write_all(line) {
            Ok(()) => {
                self.size += len;
                Ok(())
            }
            Err(e) => {
                // Part of it may have reached the file: count what is there.
                if let Ok(m) = self.file.get_ref().metadata() {
                    self.size = m.len() + self.buffered();
                }
                Err(e)
            }
        }
    }

    /// Whether a line of `len` bytes would take a non-empty file past the size bound (a line
    /// larger than the bound on its own is written alone, to an empty file).
    fn is_full_for(&self, len: u64) -> bool {
        let max = self.rotation.max_size;
        max > 0 && self.size > 0 && self.size.saturating_add(len) > max
    }

    fn waiting(&self) -> bool {
        self.retry_at.is_some_and(|t| Instant::now() < t)
    }

    fn buffered(&self) -> u64 {
        len_u64(self.file.buffer().len())
    }

    /// Moves the file to `PATH.1` (the older backups one number up) and opens a fresh `PATH`.
    /// A failure at any step leaves the current file open, with nothing lost.
    fn rotate(&mut self) -> Result<(), RotateError> {
        // Every record written so far belongs to the file being rotated, none to the next.
        self.file
            .flush()
            .map_err(|e| RotateError::at("flushing", &self.path, e))?;
        // Moved away by someone else since the batch began: that was the rotation.
        let still_here = fs::metadata(&self.path).is_ok_and(|m| m.ino() == self.inode);
        if still_here {
            if self.rotation.max_backups == 0 {
                return self.replace_with_empty();
            }
            shift_backups(&self.path, self.rotation.max_backups)?;
            let newest = backup_path(&self.path, 1);
            fs::rename(&self.path, &newest)
                .map_err(|e| RotateError::at("renaming", &self.path, e))?;
        }
        // Should this fail, the records go on to the file now named `PATH.1`, and the next batch
        // (after the wait) tries again to open `PATH`.
        self.reopen()
            .map_err(|e| RotateError::at("opening", &self.path, e))
    }

    /// With no backups kept: a fresh empty file is made beside the full one and renamed over it,
    /// so that the path always names a file, and a failure leaves the full one in place.
    fn replace_with_empty(&mut self) -> Result<(), RotateError> {
        let mut name = OsString::from(self.path.as_os_str());
        name.push(".rotating");
        let fresh = PathBuf::from(name);
        // A leftover of a crash mid-rotation.
        let _ = fs::remove_file(&fresh);
        let (file, inode, size) =
            open_append_new(&fresh).map_err(|e| RotateError::at("creating", &fresh, e))?;
        if let Err(e) = fs::rename(&fresh, &self.path) {
            let _ = fs::remove_file(&fresh);
            return Err(RotateError::at("renaming", &fresh, e));
        }
        self.replace(file, inode, size);
        Ok(())
    }

    /// Opens the file at the path afresh (the old one was moved away, by us or by someone else).
    /// The old file's buffered records are flushed to it first; if they cannot be, it stays.
    fn reopen(&mut self) -> io::Result<()> {
        self.file.flush()?;
        let (file, inode, size) = open_append(&self.path)?;
        self.replace(file, inode, size);
        Ok(())
    }

    fn replace(&mut self, file: BufWriter<File>, inode: u64, size: u64) {
        self.file = file;
        self.inode = inode;
        self.size = size;
        self.retry_at = None;
    }
}

/// A rotation step that failed, and on which file.
#[derive(Debug, thiserror::Error)]
#[error("{step} {}", path.display())]
struct RotateError {
    step: &'static str,
    path: PathBuf,
    #[source]
    source: io::Error,
}

impl RotateError {
    fn at(step: &'static str, path: &Path, source: io::Error) -> RotateError {
        RotateError {
            step,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Makes room for `PATH.1`: renames `PATH.n` → `PATH.n+1` from the first free number down to 1,
/// removing the oldest, `PATH.<max>`, first when every number is taken. Backups past a gap (left by
/// a failed rotation, or removed by hand) keep their numbers: they are older all the same, and no
/// rotation renames more files than there are.
fn shift_backups(path: &Path, max: u32) -> Result<(), RotateError> {
    let free = match (1..=max).find(|&n| is_free(&backup_path(path, n))) {
        Some(n) => n,
        None => {
            let oldest = backup_path(path, max);
            fs::remove_file(&oldest)
                .map_err(|e| RotateError::at("removing the oldest backup", &oldest, e))?;
            max
        }
    };
    for n in (1..free).rev() {
        let from = backup_path(path, n);
        fs::rename(&from, backup_path(path, n + 1))
            .map_err(|e| RotateError::at("renaming", &from, e))?;
    }
    Ok(())
}

/// `PATH.<n>`: backup `n`, 1 the newest.
fn backup_path(path: &Path, n: u32) -> PathBuf {
    let mut name = OsString::from(path.as_os_str());
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

/// Nothing at `path` (anything that cannot be looked at counts as taken: renaming onto it will
/// say why).
fn is_free(path: &Path) -> bool {
    matches!(fs::symlink_metadata(path), Err(e) if e.kind() == io::ErrorKind::NotFound)
}

fn len_u64(len: usize) -> u64 {
    u64::try_from(len).unwrap_or(u64::MAX)
}

/// Opens (creating, mode 0640) `path` for appending; returns it with its inode and size.
fn open_append(path: &Path) -> io::Result<(BufWriter<File>, u64, u64)> {
    opened(
        OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(path)?,
    )
}

/// Creates `path` (mode 0640), which must not exist, for appending.
fn open_append_new(path: &Path) -> io::Result<(BufWriter<File>, u64, u64)> {
    opened(
        OpenOptions::new()
            .create_new(true)
            .append(true)
            .mode(0o640)
            .open(path)?,
    )
}

fn opened(file: File) -> io::Result<(BufWriter<File>, u64, u64)> {
    let meta = file.metadata()?;
    Ok((BufWriter::new(file), meta.ino(), meta.len()))
}

/// Logs the first write error of a run and the recovery, not every record of a full disk.
#[derive(Default)]
struct WriteErrors {
    failing: bool,
}

impl WriteErrors {
    fn failed(&mut self, out: &Output, e: &io::Error) {
        if !self.failing {
            self.failing = true;
            tracing::warn!(
                path = %out.path().display(),
                error = %e,
                "could not write the audit log; records may be lost until it recovers"
            );
        }
    }

    fn flushed(&mut self, out: &Output) {
        if self.failing {
            self.failing = false;
            tracing::info!(path = %out.path().display(), "writing the audit log again");
        }
    }
}

/// Appends `record` to `line` as the log writes it: one JSON object, the schema version first,
/// and a newline (the only one: JSON escapes those inside strings).
///
/// # Errors
/// Serialisation failed (it cannot for these types, whose maps all have string keys).
pub fn to_line(record: &AuditRecord, line: &mut Vec<u8>) -> serde_json::Result<()> {
    let versioned = Versioned {
        v: SCHEMA_VERSION,
        record,
    };
    serde_json::to_writer(&mut *line, &versioned)?;
    line.push(b'\n');
    Ok(())
}

/// The writer thread: a batch at a time, flushed when the queue is momentarily empty.
fn write_records(mut out: Output, mut records: mpsc::Receiver<AuditEvent>) {
    // One buffer for every record: a record is serialised whole before it is written, so that its
    // size is known before the file is rotated (a record is never split across files) and it is
    // handed to the file as one complete line.
    let mut line = Vec::with_capacity(1024);
    let mut errors = WriteErrors::default();
    while let Some(first) = records.blocking_recv() {
        out.reopen_if_moved();
        let mut next = Some(first);
        while let Some(event) = next {
            line.clear();
            let written = match to_line(&event.to_record(), &mut line) {
                Ok(()) => out.write_line(&line),
                Err(e) => Err(io::Error::from(e)),
            };
            if let Err(e) = written {
                errors.failed(&out, &e);
            }
            next = records.try_recv().ok();
        }
        match out.flush() {
            Ok(()) => errors.flushed(&out),
            Err(e) => errors.failed(&out, &e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(n: u16) -> AuditEvent {
        AuditEvent {
            lookup: Some(Lookup::Hit),
            latency: Duration::from_micros(12),
            ..AuditEvent::new(
                SystemTime::UNIX_EPOCH,
                "169.254.200.1:1234".parse().unwrap(),
                "allowed",
                n,
            )
        }
    }

    /// Record number `seq` (in `latency_us`), to check order across files.
    fn numbered(seq: u64) -> AuditEvent {
        AuditEvent {
            latency: Duration::from_micros(seq),
            ..record(200)
        }
    }

    fn metric() -> IntCounter {
        IntCounter::new("dropped", "test").unwrap()
    }

    const NO_ROTATION: AuditRotation = AuditRotation {
        max_size: 0,
        max_backups: 5,
    };

    /// A fresh directory for one test.
    fn test_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("audit-test-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Writes `records` through the writer thread, waits for it to finish, and checks that none
    /// was dropped.
    async fn write_all(path: &Path, rotation: AuditRotation, records: Vec<AuditEvent>) {
        let dropped = metric();
        let (log, writer) = AuditLog::start(
            AuditSink::File(path.to_path_buf()),
            rotation,
            records.len(),
            dropped.clone(),
        )
        .unwrap();
        for r in records {
            log.record(r);
        }
        drop(log);
        writer.finish().await;
        assert_eq!(dropped.get(), 0);
    }

    /// The records of one file: every line a complete JSON record, the file ending in a newline.
    fn records_in(path: &Path) -> Vec<serde_json::Value> {
        let text = fs::read_to_string(path).unwrap();
        assert!(
            text.is_empty() || text.ends_with('\n'),
            "{} ends mid-line",
            path.display()
        );
        text.lines()
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: {e}: {l:?}", path.display()))
            })
            .collect()
    }

    /// `PATH.<highest>` … `PATH.1`, `PATH`: oldest first. Fails on a gap or a stray file.
    fn files_oldest_first(path: &Path) -> Vec<PathBuf> {
        let dir = path.parent().unwrap();
        let count = fs::read_dir(dir).unwrap().count();
        let backups = count - 1;
        let mut files: Vec<PathBuf> = (1..=u32::try_from(backups).unwrap())
            .rev()
            .map(|n| backup_path(path, n))
            .collect();
        files.push(path.to_path_buf());
        for f in &files {
            assert!(f.is_file(), "{} missing among {count} files", f.display());
        }
        files
    }

    fn seqs(records: &[serde_json::Value]) -> Vec<u64> {
        records
            .iter()
            .map(|r| r["latency_us"].as_u64().unwrap())
            .collect()
    }

    #[tokio::test]
    async fn rotates_at_the_size_bound_keeping_at_most_max_backups() {
        let dir = test_dir("bound");
        let path = dir.join("audit.log");
        let rotation = AuditRotation {
            max_size: 1000,
            max_backups: 3,
        };
        write_all(&path, rotation, (0..200).map(numbered).collect()).await;

        let files = files_oldest_first(&path);
        assert_eq!(files.len(), 4, "the file and 3 backups: {files:?}");
        let mut all = Vec::new();
        for (i, f) in files.iter().enumerate() {
            let size = fs::metadata(f).unwrap().len();
            assert!(size <= 1000, "{} is {size} bytes", f.display());
            let records = records_in(f);
            assert!(!records.is_empty(), "{} is empty", f.display());
            // A backup was rotated only because the next record would not fit.
            if let Some(newer) = files.get(i + 1) {
                let next = fs::read_to_string(newer).unwrap();
                let next_line = next.split_inclusive('\n').next().unwrap();
                assert!(
                    size + len_u64(next_line.len()) > 1000,
                    "{} rotated early",
                    f.display()
                );
            }
            all.extend(seqs(&records));
        }
        // The newest records, in order, with none missing since the oldest backup began.
        let first = all[0];
        assert_eq!(all, (first..200).collect::<Vec<_>>());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn enough_backups_keep_every_record_in_order() {
        let dir = test_dir("every");
        let path = dir.join("audit.log");
        let rotation = AuditRotation {
            max_size: 700,
            max_backups: 1000,
        };
        // Some records far larger than the rest, one larger than the bound.
        let records = (0..300)
            .map(|i| AuditEvent {
                reason: match i % 37 {
                    0 => Some("x".repeat(2000)),
                    5 => Some("y".repeat(400)),
                    _ => None,
                },
                ..numbered(i)
            })
            .collect();
        write_all(&path, rotation, records).await;

        let mut all = Vec::new();
        for f in files_oldest_first(&path) {
            let size = fs::metadata(&f).unwrap().len();
            let records = records_in(&f);
            if size > 700 {
                assert_eq!(records.len(), 1, "{} is over the bound", f.display());
                assert_eq!(records[0]["reason"].as_str().map(str::len), Some(2000));
            }
            all.extend(seqs(&records));
        }
        assert_eq!(all, (0..300).collect::<Vec<_>>());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn records_larger_than_the_bound_are_each_written_alone() {
        let dir = test_dir("alone");
        let path = dir.join("audit.log");
        let rotation = AuditRotation {
            max_size: 50,
            max_backups: 10,
        };
        write_all(&path, rotation, (0..5).map(numbered).collect()).await;
        let files = files_oldest_first(&path);
        assert_eq!(files.len(), 5);
        for (seq, f) in files.iter().enumerate() {
            assert_eq!(seqs(&records_in(f)), vec![len_u64(seq)]);
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn no_backups_replaces_the_full_file() {
        let dir = test_dir("nobackup");
        let path = dir.join("audit.log");
        let rotation = AuditRotation {
            max_size: 1000,
            max_backups: 0,
        };
        write_all(&path, rotation, (0..100).map(numbered).collect()).await;
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![OsString::from("audit.log")]);
        assert!(fs::metadata(&path).unwrap().len() <= 1000);
        let kept = seqs(&records_in(&path));
        let first = kept[0];
        assert!(first > 0);
        assert_eq!(kept, (first..100).collect::<Vec<_>>());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn an_existing_file_past_the_bound_is_rotated_before_the_first_record() {
        let dir = test_dir("existing");
        let path = dir.join("audit.log");
        let earlier = format!(
            "{}\n",
            serde_json::to_string(&numbered(7).to_record()).unwrap()
        )
        .repeat(20);
        fs::write(&path, &earlier).unwrap();
        fs::write(backup_path(&path, 1), "{}\n").unwrap();
        let rotation = AuditRotation {
            max_size: 1000,
            max_backups: 5,
        };
        write_all(&path, rotation, vec![numbered(8)]).await;
        assert_eq!(fs::read_to_string(backup_path(&path, 1)).unwrap(), earlier);
        assert_eq!(fs::read_to_string(backup_path(&path, 2)).unwrap(), "{}\n");
        assert_eq!(seqs(&records_in(&path)), vec![8]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn writes_json_lines_and_survives_rotation() {
        let dir = test_dir("logrotate");
        let path = dir.join("audit.log");
        let (log, writer) =
            AuditLog::start(AuditSink::File(path.clone()), NO_ROTATION, 16, metric()).unwrap();
        log.record(record(200));
        // Let the writer catch up before rotating, as logrotate would find it.
        for _ in 0..100 {
            if fs::read_to_string(&path)
                .unwrap_or_default()
                .lines()
                .count()
                == 1
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        fs::rename(&path, dir.join("audit.log.1")).unwrap();
        log.record(record(403));
        drop(log);
        writer.finish().await;
        let rotated = fs::read_to_string(dir.join("audit.log.1")).unwrap();
        let fresh = fs::read_to_string(&path).unwrap();
        let first: serde_json::Value = serde_json::from_str(rotated.trim()).unwrap();
        let second: serde_json::Value = serde_json::from_str(fresh.trim()).unwrap();
        assert_eq!(first["http_status"], 200);
        assert_eq!(first["ts"], "1970-01-01T00:00:00.000Z");
        assert_eq!(second["http_status"], 403);
        assert!(second.get("reason").is_none());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_moved_away_is_reopened_and_then_rotated_by_size() {
        let dir = test_dir("moved");
        let path = dir.join("audit.log");
        let line = format!(
            "{}\n",
            serde_json::to_string(&numbered(1).to_record()).unwrap()
        );
        let rotation = AuditRotation {
            max_size: len_u64(line.len() * 2),
            max_backups: 2,
        };
        let mut out = LogFile::open(path.clone(), rotation).unwrap();
        out.write_line(line.as_bytes()).unwrap();
        out.file.flush().unwrap();
        // logrotate, dateext style.
        let moved = dir.join("audit.log-20260101");
        fs::rename(&path, &moved).unwrap();
        out.reopen_if_moved();
        for _ in 0..3 {
            out.write_line(line.as_bytes()).unwrap();
        }
        out.file.flush().unwrap();
        assert_eq!(fs::read_to_string(&moved).unwrap(), line);
        assert_eq!(
            fs::read_to_string(backup_path(&path, 1)).unwrap(),
            line.repeat(2)
        );
        assert_eq!(fs::read_to_string(&path).unwrap(), line);
        // Moved away in the middle of a batch: the rotation that is due opens a fresh file and
        // leaves the moved one where it is.
        fs::rename(&path, dir.join("elsewhere")).unwrap();
        out.write_line(line.as_bytes()).unwrap();
        out.write_line(line.as_bytes()).unwrap();
        out.file.flush().unwrap();
        assert_eq!(
            fs::read_to_string(dir.join("elsewhere")).unwrap(),
            line.repeat(2)
        );
        assert_eq!(fs::read_to_string(&path).unwrap(), line);
        assert_eq!(
            fs::read_to_string(backup_path(&path, 1)).unwrap(),
            line.repeat(2)
        );
        assert!(!backup_path(&path, 2).exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_failed_rotation_writes_on_to_the_current_file_and_is_retried_later() {
        let dir = test_dir("failed");
        let path = dir.join("audit.log");
        let line = format!(
            "{}\n",
            serde_json::to_string(&numbered(1).to_record()).unwrap()
        );
        let rotation = AuditRotation {
            max_size: len_u64(line.len()),
            max_backups: 1,
        };
        // The only backup's name is taken by a directory that cannot be removed as a file.
        let blocker = backup_path(&path, 1);
        fs::create_dir_all(blocker.join("inside")).unwrap();
        let mut out = LogFile::open(path.clone(), rotation).unwrap();
        out.write_line(line.as_bytes()).unwrap();
        out.write_line(line.as_bytes()).unwrap();
        let retry_at = out.retry_at.expect("the rotation failed");
        // Not tried again for every record.
        for _ in 0..10 {
            out.write_line(line.as_bytes()).unwrap();
        }
        assert_eq!(out.retry_at, Some(retry_at));
        out.file.flush().unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), line.repeat(12));

        // Once the obstacle is gone and the wait is over, the next record rotates.
        fs::remove_dir_all(&blocker).unwrap();
        out.retry_at = Some(Instant::now());
        out.write_line(line.as_bytes()).unwrap();
        out.file.flush().unwrap();
        assert_eq!(out.retry_at, None);
        assert_eq!(fs::read_to_string(&blocker).unwrap(), line.repeat(12));
        assert_eq!(fs::read_to_string(&path).unwrap(), line);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn backups_shift_up_to_the_first_gap_or_the_oldest_goes() {
        let dir = test_dir("gap");
        let path = dir.join("audit.log");
        for (n, text) in [(1, "one"), (2, "two"), (4, "four")] {
            fs::write(backup_path(&path, n), text).unwrap();
        }
        shift_backups(&path, 5).unwrap();
        let read = |n| fs::read_to_string(backup_path(&path, n)).ok();
        assert_eq!(
            (1..=5).map(read).collect::<Vec<_>>(),
            vec![
                None,
                Some("one".into()),
                Some("two".into()),
                Some("four".into()),
                None
            ]
        );
        // All taken: the oldest goes.
        fs::write(backup_path(&path, 1), "new").unwrap();
        fs::write(backup_path(&path, 5), "five").unwrap();
        shift_backups(&path, 5).unwrap();
        assert_eq!(
            (1..=5).map(read).collect::<Vec<_>>(),
            vec![
                None,
                Some("new".into()),
                Some("one".into()),
                Some("two".into()),
                Some("four".into())
            ]
        );
        fs::remove_dir_all(&dir).unwrap();
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
