//! What is lost, whole and counted: a full queue, a full disk.

use super::*;

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
        write_batch(
            &mut out,
            &Formatter::default(),
            std::iter::once(large(seq)),
            &mut errors,
        );
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
    write_batch(
        &mut out,
        &Formatter::default(),
        std::iter::once(large(99)),
        &mut errors,
    );
    assert_eq!(seqs(&records_in(&path)), [99]);
}
