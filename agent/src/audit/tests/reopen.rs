//! JSON lines through rotation, and a file moved away, removed, or not rotatable under the
//! writer.

use super::*;

#[tokio::test]
async fn writes_json_lines_and_survives_rotation() {
    let dir = test_dir("logrotate");
    let path = dir.join("audit.log");
    let (log, writer) = AuditLog::start(
        AuditSink::File(path.clone()),
        Formatter::default(),
        NO_ROTATION,
        16,
        counters(),
    )
    .unwrap();
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
    write_batch(&mut out, &Formatter::default(), backlog, &mut errors);
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
