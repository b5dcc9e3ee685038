//! Small helpers: the workspace root, running commands, root check.

use anyhow::{Context, Result, bail};
use std::ffi::OsStr;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};

/// The workspace root: the parent of this crate's manifest directory.
pub fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
}

/// Cargo's target directory (honours `CARGO_TARGET_DIR`).
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => workspace_root().join(dir),
        None => workspace_root().join("target"),
    }
}

pub fn is_root() -> bool {
    // /proc/self is owned by the process's effective uid.
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

pub fn require_root(why: &str) -> Result<()> {
    if !is_root() {
        bail!("this must run as root ({why}); re-run it as root, e.g. `sudo -E cargo xtask ...`");
    }
    Ok(())
}

/// Exit code to propagate for a finished child (128 + signal when it was killed).
pub fn exit_code(status: ExitStatus) -> i32 {
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1)
}

/// Runs a command to completion, failing on a non-zero exit.
pub fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {shown}"))?;
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
}

/// Runs a command and returns its stdout when it succeeds, `None` when it cannot start or fails.
pub fn output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `cargo <args>` in the workspace root.
pub fn cargo(args: &[&str], env: &[(&str, &OsStr)]) -> Result<()> {
    println!("==> cargo {}", args.join(" "));
    let mut cmd = Command::new("cargo");
    cmd.args(args).current_dir(workspace_root());
    for (key, value) in env {
        cmd.env(key, value);
    }
    let status = cmd.status().context("cannot start cargo")?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Builds the agent (plus `extra` cargo arguments) and returns the absolute path of its binary.
pub fn build_agent(extra: &[&str]) -> Result<PathBuf> {
    let mut args = vec!["build", "-p", "eks-pod-identity-agent"];
    args.extend_from_slice(extra);
    cargo(&args, &[])?;
    let bin = target_dir().join("debug").join("eks-pod-identity-agent");
    if !bin.is_file() {
        bail!("the build succeeded but {} is missing", bin.display());
    }
    Ok(bin)
}

/// Test totals over every `test result:` line of a `cargo test` run.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TestCounts {
    pub passed: u64,
    pub failed: u64,
}

impl TestCounts {
    /// Adds a line like `test result: ok. 12 passed; 0 failed; 0 ignored; …`.
    fn add_line(&mut self, line: &str) {
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(what), Some(n)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                _ => {}
            }
        }
    }
}

/// Runs `cargo <args>` (a `cargo test`), passing its output through, and counts its results.
pub fn cargo_test(args: &[&str], env: &[(&str, &OsStr)]) -> Result<TestCounts> {
    use std::io::BufRead as _;
    println!("==> cargo {}", args.join(" "));
    let mut cmd = Command::new("cargo");
    cmd.args(args)
        .current_dir(workspace_root())
        .stdout(std::process::Stdio::piped());
    for (key, value) in env {
        cmd.env(key, value);
    }
    let mut child = cmd.spawn().context("cannot start cargo")?;
    let mut counts = TestCounts::default();
    if let Some(stdout) = child.stdout.take() {
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line.context("reading cargo test's output")?;
            println!("{line}");
            counts.add_line(&line);
        }
    }
    let status = child.wait().context("waiting for cargo")?;
    if !status.success() {
        bail!(
            "`cargo {}` failed ({status}): {} passed, {} failed",
            args.join(" "),
            counts.passed,
            counts.failed
        );
    }
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::TestCounts;

    #[test]
    fn counts_test_result_lines() {
        let mut c = TestCounts::default();
        c.add_line("test result: ok. 12 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.03s");
        c.add_line("test result: FAILED. 3 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1s");
        c.add_line("test foo ... ok");
        assert_eq!(
            c,
            TestCounts {
                passed: 15,
                failed: 2
            }
        );
    }
}
