//! The audit log end to end in a temporary directory: records, rotation, reopening, losses.

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
        AuditLog::start(AuditSink::File(path.clone()), NO_ROTATION, 16, counters()).unwrap();
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
    out.flush().unwrap();
    // logrotate, dateext style.
    let moved = dir.join("audit.log-20260101");
    fs::rename(&path, &moved).unwrap();
    out.reopen_if_moved();
    for _ in 0..3 {
        out.write_line(line.as_bytes()).unwrap();
    }
    out.flush().unwrap();
    assert_eq!(fs::read_to_string(&moved).unwrap(), line);
    assert_eq!(
        fs::read_to_string(backup_path(&path, 1)).unwrap(),
        line.repeat(2)
    );
    assert_eq!(fs::read_to_string(&path).unwrap(), line);
    // Moved away in the middle of a batch: the lines not written yet go to a fresh file at the
    // path, which is rotated by size as usual; the moved one stays as it was.
    fs::rename(&path, dir.join("elsewhere")).unwrap();
    out.write_line(line.as_bytes()).unwrap();
    out.write_line(line.as_bytes()).unwrap();
    out.flush().unwrap();
    assert_eq!(fs::read_to_string(dir.join("elsewhere")).unwrap(), line);
    assert_eq!(fs::read_to_string(&path).unwrap(), line);
    assert_eq!(fs::read_to_string(backup_path(&path, 1)).unwrap(), line);
    assert_eq!(
        fs::read_to_string(backup_path(&path, 2)).unwrap(),
        line.repeat(2)
    );
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
    out.flush().unwrap();
    assert_eq!(fs::read_to_string(&path).unwrap(), line.repeat(12));

    // Once the obstacle is gone and the wait is over, the next record rotates.
    fs::remove_dir_all(&blocker).unwrap();
    out.retry_at = Some(Instant::now());
    out.write_line(line.as_bytes()).unwrap();
    out.flush().unwrap();
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

/// Found by reading the code: the writer checked that the path still named its file only at the
/// start of a batch, so during a backlog (one long batch) a file removed by logrotate went on
/// being written — to a deleted inode, every record lost without a count.
#[test]
fn a_file_removed_during_a_backlog_gets_no_more_records() {
    let dir = test_dir("removed");
    let path = dir.join("audit.log");
    let failed = metric();
    let mut out = Output::open(AuditSink::File(path.clone()), NO_ROTATION).unwrap();
    let mut errors = WriteErrors::new(failed.clone());
    let removing = path.clone();
    let backlog = (0..400).map(|seq| {
        if seq == 200 {
            fs::remove_file(&removing).unwrap();
        }
        numbered(seq)
    });
    write_batch(&mut out, backlog, &mut errors);
    // What was written before the removal went with the file; every record after it is at the
    // path, whole, in order.
    let records = records_in(&path);
    let seqs = seqs(&records);
    assert!(
        seqs.ends_with(&(200..400).collect::<Vec<_>>()),
        "{} records after the removal: {:?}…",
        seqs.len(),
        &seqs[..seqs.len().min(5)]
    );
    assert_eq!(failed.get(), 0);
    fs::remove_dir_all(&dir).unwrap();
}

/// A tmpfs of `size` mounted on a fresh directory, unmounted on drop.
struct SmallFs(PathBuf);

impl SmallFs {
    fn mount(name: &str, size: &str) -> Option<SmallFs> {
        // Needs root (CAP_SYS_ADMIN); under CI it must run, never skip.
        let root = std::process::Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
        if !root {
            assert!(
                std::env::var_os("CI").is_none(),
                "{name}: needs root to mount a tmpfs"
            );
            eprintln!("{name}: skipped, needs root");
            return None;
        }
        let dir = test_dir(name);
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .status()
            .unwrap();
        assert!(status.success(), "mount tmpfs on {}", dir.display());
        Some(SmallFs(dir))
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A record of more than 8 KiB (a long refusal reason), numbered `seq`.
fn large(seq: u64) -> AuditEvent {
    AuditEvent {
        reason: Some("x".repeat(9000)),
        ..numbered(seq)
    }
}

/// Reproduced on a full file system: a record of 8 KiB or more bypassed the writer's buffer, the
/// kernel wrote part of it, and the next write failed — a torn line, and the next record glued
/// to it. Now a failed write is cut back to where it began, and the records are counted.
#[test]
fn a_full_disk_loses_whole_records_only_and_counts_them() {
    let Some(fs_) = SmallFs::mount("full", "64k") else {
        return;
    };
    let path = fs_.0.join("audit.log");
    let failed = metric();
    let mut out = Output::open(AuditSink::File(path.clone()), NO_ROTATION).unwrap();
    let mut errors = WriteErrors::new(failed.clone());
    // One at a time, as records come in a quiet spell: each a batch of its own.
    for seq in 0..20 {
        write_batch(&mut out, std::iter::once(large(seq)), &mut errors);
    }
    let records = records_in(&path);
    assert!(
        !records.is_empty() && records.len() < 20,
        "{}",
        records.len()
    );
    assert_eq!(
        seqs(&records),
        (0..records.len() as u64).collect::<Vec<_>>()
    );
    assert_eq!(failed.get(), 20 - records.len() as u64);
    // Room again: writing resumes, whole lines.
    fs::remove_file(&path).unwrap();
    write_batch(&mut out, std::iter::once(large(99)), &mut errors);
    assert_eq!(seqs(&records_in(&path)), [99]);
}
