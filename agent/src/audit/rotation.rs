//! The audit log file and its rotation by size: the open file (appended to, whole lines only),
//! which inode it is and how large, `PATH` → `PATH.1` … `PATH.<max_backups>`, and reopening when
//! something else moved or removed the file.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::AuditError;
use crate::config::AuditRotation;

/// How long a failed rotation or reopen waits before it is tried again: a lasting failure (a full
/// disk, a read-only directory) is then logged now and then, not for every record.
const RETRY_AFTER: Duration = Duration::from_secs(10);

/// Lines gathered before they are written: one `write` for many records, bounded.
const BATCH_BYTES: usize = 64 * 1024;

/// Records that could not be written, and why: none of their bytes stayed in the file.
#[derive(Debug)]
pub(super) struct Lost {
    pub records: u64,
    pub error: io::Error,
}

/// The audit log file: the open file, which inode it is, how large it is, and its rotation.
///
/// Lines are gathered in `pending` and written together ([`LogFile::flush`]) to the file the path
/// names at that moment — never to a file removed under us — and a write that fails midway is
/// cut back to where it began, so that the file holds whole lines only.
pub(super) struct LogFile {
    pub(super) path: PathBuf,
    /// Opened for appending: each write lands at the end.
    file: File,
    /// When the path names another inode, the file was moved away under us.
    inode: u64,
    /// The file's size, the pending lines not included.
    size: u64,
    /// Whole lines not written yet, and how many.
    pending: Vec<u8>,
    pending_records: u64,
    rotation: AuditRotation,
    /// After a failed rotation or reopen: not again before then.
    pub(super) retry_at: Option<Instant>,
}

impl LogFile {
    pub(super) fn open(path: PathBuf, rotation: AuditRotation) -> Result<LogFile, AuditError> {
        let (file, inode, size) = open_append(&path).map_err(|source| AuditError::Open {
            path: path.clone(),
            source,
        })?;
        Ok(LogFile {
            path,
            file,
            inode,
            size,
            pending: Vec::with_capacity(BATCH_BYTES),
            pending_records: 0,
            rotation,
            retry_at: None,
        })
    }

    /// Reopens the file if the path no longer names the file we write (logrotate moved or removed
    /// it); otherwise takes its size from the file system (something else may have truncated it).
    pub(super) fn reopen_if_moved(&mut self) {
        match fs::metadata(&self.path) {
            Ok(m) if m.ino() == self.inode => self.size = m.len(),
            _ if self.waiting() => {}
            _ => {
                if let Err(e) = self.reopen() {
                    tracing::warn!(
                        path = %self.path.display(),
                        error = %e,
                        "could not reopen the audit log after it was moved"
                    );
                    self.retry_at = Some(Instant::now() + RETRY_AFTER);
                }
            }
        }
    }

    /// Adds one complete line; first writes what is pending and rotates if the line would take
    /// the file past the bound. `Err`: records written before it were lost.
    pub(super) fn write_line(&mut self, line: &[u8]) -> Result<(), Lost> {
        let len = len_u64(line.len());
        let mut lost = Ok(());
        if self.is_full_for(len) && !self.waiting() {
            lost = self.flush();
            if let Err(e) = self.rotate() {
                tracing::warn!(
                    path = %e.path.display(),
                    step = e.step,
                    error = %e.source,
                    "could not rotate the audit log; writing on to the current file"
                );
                self.retry_at = Some(Instant::now() + RETRY_AFTER);
            }
        }
        self.pending.extend_from_slice(line);
        self.pending_records += 1;
        if self.pending.len() >= BATCH_BYTES {
            lost = lost.and(self.flush());
        }
        lost
    }

    /// Writes the pending lines to the file the path names now (reopened first if it was moved
    /// or removed), all of them or none: a failed write is cut back to where it began.
    pub(super) fn flush(&mut self) -> Result<(), Lost> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let records = std::mem::take(&mut self.pending_records);
        let result = self.write_pending();
        self.pending.clear();
        result.map_err(|error| Lost { records, error })
    }

    fn write_pending(&mut self) -> io::Result<()> {
        self.reopen_if_moved();
        let meta = self.file.metadata()?;
        // Removed under us and not reopened (yet): what is written there is gone.
        if meta.nlink() == 0 {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "the audit log was removed and could not be reopened",
            ));
        }
        let start = meta.len();
        match self.file.write_all(&self.pending) {
            Ok(()) => {
                self.size = start + len_u64(self.pending.len());
                Ok(())
            }
            Err(e) => {
                // Part of it may have reached the file: a torn line would corrupt the next one.
                if let Err(cut) = self.file.set_len(start) {
                    tracing::warn!(path = %self.path.display(), error = %cut,
                        "could not cut a partly written audit batch back");
                }
                self.size = start;
                Err(e)
            }
        }
    }

    /// Whether a line of `len` bytes would take a non-empty file past the size bound (a line
    /// larger than the bound on its own is written alone, to an empty file).
    fn is_full_for(&self, len: u64) -> bool {
        let max = self.rotation.max_size;
        let size = self.size + len_u64(self.pending.len());
        max > 0 && size > 0 && size.saturating_add(len) > max
    }

    fn waiting(&self) -> bool {
        self.retry_at.is_some_and(|t| Instant::now() < t)
    }

    /// Moves the file to `PATH.1` (the older backups one number up) and opens a fresh `PATH`.
    /// Called with nothing pending. A failure at any step leaves the current file open.
    fn rotate(&mut self) -> Result<(), RotateError> {
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
        // Should this fail, the next records go to the file now named `PATH.1`, and the next
        // batch (after the wait) tries again to open `PATH`.
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
    fn reopen(&mut self) -> io::Result<()> {
        let (file, inode, size) = open_append(&self.path)?;
        self.replace(file, inode, size);
        Ok(())
    }

    fn replace(&mut self, file: File, inode: u64, size: u64) {
        self.file = file;
        self.inode = inode;
        self.size = size;
        self.retry_at = None;
    }
}

/// A rotation step that failed, and on which file.
#[derive(Debug, thiserror::Error)]
#[error("{step} {}", path.display())]
pub(super) struct RotateError {
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
pub(super) fn shift_backups(path: &Path, max: u32) -> Result<(), RotateError> {
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
pub(super) fn backup_path(path: &Path, n: u32) -> PathBuf {
    let mut name = OsString::from(path.as_os_str());
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

/// Nothing at `path` (anything that cannot be looked at counts as taken: renaming onto it will
/// say why).
fn is_free(path: &Path) -> bool {
    matches!(fs::symlink_metadata(path), Err(e) if e.kind() == io::ErrorKind::NotFound)
}

pub(super) fn len_u64(len: usize) -> u64 {
    u64::try_from(len).unwrap_or(u64::MAX)
}

/// Opens (creating, mode 0640) `path` for appending; returns it with its inode and size.
fn open_append(path: &Path) -> io::Result<(File, u64, u64)> {
    opened(
        OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(path)?,
    )
}

/// Creates `path` (mode 0640), which must not exist, for appending.
fn open_append_new(path: &Path) -> io::Result<(File, u64, u64)> {
    opened(
        OpenOptions::new()
            .create_new(true)
            .append(true)
            .mode(0o640)
            .open(path)?,
    )
}

fn opened(file: File) -> io::Result<(File, u64, u64)> {
    let meta = file.metadata()?;
    Ok((file, meta.ino(), meta.len()))
}
