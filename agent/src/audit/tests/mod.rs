//! The audit log end to end in a temporary directory. This file holds the records and the
//! directory helpers the parts share: [`rotation`] (by size, backups), [`reopen`] (the file
//! moved, removed or unrotatable under the writer), [`losses`] (a full queue, a full disk).

mod losses;
mod ocsf;
mod reopen;
mod rotation;

use std::ffi::OsString;
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use super::rotation::{LogFile, backup_path, len_u64, shift_backups};
use super::writer::{WriteErrors, write_batch};
use super::*;
use crate::credentials::cache::Lookup;

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

fn counters() -> AuditCounters {
    AuditCounters {
        dropped: metric(),
        write_failed: metric(),
    }
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
    let counters = counters();
    let (log, writer) = AuditLog::start(
        AuditSink::File(path.to_path_buf()),
        Formatter::default(),
        rotation,
        records.len(),
        counters.clone(),
    )
    .unwrap();
    for r in records {
        log.record(r);
    }
    drop(log);
    writer.finish().await;
    assert_eq!(counters.dropped.get(), 0);
    assert_eq!(counters.write_failed.get(), 0);
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
