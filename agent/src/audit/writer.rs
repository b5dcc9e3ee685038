//! The writer thread: takes events off the queue a batch at a time, serialises each into one
//! line, and hands whole lines to the output; counts what is lost.

use std::io::{self, Write as _};
use std::path::Path;

use tokio::sync::mpsc;

use prometheus::IntCounter;

use super::rotation::{LogFile, Lost};
use super::{AuditError, AuditEvent, Formatter};
use crate::config::{AuditRotation, AuditSink};

/// Where records go: stdout, or a file that is rotated by size and may be rotated under us.
pub(super) enum Output {
    Stdout(io::Stdout),
    File(LogFile),
}

impl Output {
    pub(super) fn open(sink: AuditSink, rotation: AuditRotation) -> Result<Output, AuditError> {
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

    /// Hands over one complete line (a serialised record and its newline). `Err`: records lost.
    fn write_line(&mut self, line: &[u8]) -> Result<(), Lost> {
        match self {
            Output::Stdout(out) => out
                .write_all(line)
                .map_err(|error| Lost { records: 1, error }),
            Output::File(f) => f.write_line(line),
        }
    }

    /// Writes what is pending. `Err`: records lost.
    fn flush(&mut self) -> Result<(), Lost> {
        match self {
            Output::Stdout(out) => out.flush().map_err(|error| Lost { records: 0, error }),
            Output::File(f) => f.flush(),
        }
    }
}

/// Counts the records lost to write failures, and logs the first failure of a run and the
/// recovery, not every record of a full disk.
pub(super) struct WriteErrors {
    failed: IntCounter,
    failing: bool,
}

impl WriteErrors {
    pub(super) fn new(failed: IntCounter) -> Self {
        WriteErrors {
            failed,
            failing: false,
        }
    }

    fn lost(&mut self, out: &Output, lost: &Lost) {
        self.failed.inc_by(lost.records);
        if !self.failing {
            self.failing = true;
            tracing::warn!(
                path = %out.path().display(),
                error = %lost.error,
                records = lost.records,
                "could not write the audit log; records are lost (and counted) until it recovers"
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

/// The writer thread: a batch at a time, written when the queue is momentarily empty.
pub(super) fn write_records(
    mut out: Output,
    format: &Formatter,
    mut records: mpsc::Receiver<AuditEvent>,
    write_failed: IntCounter,
) {
    let mut errors = WriteErrors::new(write_failed);
    while let Some(first) = records.blocking_recv() {
        let batch = std::iter::once(first).chain(std::iter::from_fn(|| records.try_recv().ok()));
        write_batch(&mut out, format, batch, &mut errors);
    }
}

/// Writes a batch of events, each as one whole line or not at all.
pub(super) fn write_batch(
    out: &mut Output,
    format: &Formatter,
    events: impl Iterator<Item = AuditEvent>,
    errors: &mut WriteErrors,
) {
    // One buffer for every record: a record is serialised whole before it is written, so that its
    // size is known before the file is rotated (a record is never split across files) and it is
    // handed to the file as one complete line.
    let mut line = Vec::with_capacity(1024);
    for event in events {
        line.clear();
        let written = match format.line(&event, &mut line) {
            Ok(()) => out.write_line(&line),
            Err(e) => Err(Lost {
                records: 1,
                error: io::Error::from(e),
            }),
        };
        if let Err(lost) = written {
            errors.lost(out, &lost);
        }
    }
    match out.flush() {
        Ok(()) => errors.flushed(out),
        Err(lost) => errors.lost(out, &lost),
    }
}
