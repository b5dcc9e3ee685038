//! Work that runs beside the rest of `cargo xtask test` at the lowest CPU priority (`nice -n 19`),
//! so that it takes only what the foreground leaves idle: linking, buildah, and the end-to-end
//! tests' waits. A test never loses a CPU to it. Its output goes to a file under
//! `target/xtask-logs/`, shown when it fails; dropped unfinished (the foreground failed), it is
//! killed.

use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use anyhow::{Context as _, Result, bail};

use crate::util;

/// One command running at idle priority.
pub struct IdleJob {
    name: &'static str,
    child: Option<Child>,
    log: PathBuf,
    started: Instant,
}

impl IdleJob {
    /// Starts `program args…` under `nice -n 19` in the workspace root; `name` names it in what
    /// is printed and in its log file's name.
    pub fn start(name: &'static str, program: &str, args: &[&str]) -> Result<Self> {
        let dir = util::target_dir().join("xtask-logs");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let log = dir.join(format!("{}.log", name.replace(' ', "-")));
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone().context("duplicating the log file")?;
        println!(
            "==> at idle priority, beside the rest: {program} {} (log: {})",
            args.join(" "),
            log.display()
        );
        let child = Command::new("nice")
            .args(["-n", "19", program])
            .args(args)
            .current_dir(util::workspace_root())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        Ok(IdleJob {
            name,
            child: Some(child),
            log,
            started: Instant::now(),
        })
    }

    /// Waits for the job; fails with the end of its log when it failed.
    pub fn wait(mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let status = child
            .wait()
            .with_context(|| format!("waiting for {}", self.name))?;
        if !status.success() {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(60)..].join("\n");
            bail!(
                "{} failed ({status}); the end of {}:\n{tail}",
                self.name,
                self.log.display()
            );
        }
        println!(
            "==> {}: ok, done {} s after it started",
            self.name,
            self.started.elapsed().as_secs()
        );
        Ok(())
    }
}

impl Drop for IdleJob {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
