//! Rotation at the size bound, and the backups shifted.

use super::*;

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
