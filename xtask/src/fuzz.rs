//! `cargo xtask fuzz`: runs every fuzz target (the `fuzz/` crate: cargo-fuzz, libFuzzer, on
//! nightly) for a given time from its checked-in seeds, and fails on a crash, a timeout, a leak
//! or running out of memory.
//!
//! The seeds in `fuzz/corpus/<target>` are only read: what a run adds goes to
//! `fuzz/work/<target>` (kept between runs, ignored by git), and an input that breaks a target to
//! `fuzz/artifacts/<target>` (ignored too), named in the error with the command that replays it.
//! One process per target, one target at a time: a run takes one core.

use std::io::BufRead as _;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context as _, Result, bail};

use crate::util;

/// The targets, as `fuzz/Cargo.toml` names them.
pub const TARGETS: [&str; 6] = [
    "token",
    "http_validation",
    "request",
    "cgroup_path",
    "upstream_reply",
    "audit_record",
];

/// Seconds per target when `cargo xtask test` runs them.
pub const CI_SECONDS: u64 = 10;

/// How the targets are built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Build {
    /// cargo-fuzz's default: optimised, with debug assertions (`cargo xtask fuzz`: long runs).
    Optimized,
    /// Unoptimised (`--dev`), debug assertions too: half the build time for `cargo xtask
    /// test`'s brief runs, where the build is most of the time and the inputs' speed matters little.
    Dev,
}

/// No AddressSanitizer: the agent's code the targets reach is safe Rust, where the compiler's own
/// checks (bounds, and overflow: cargo-fuzz builds with debug assertions) catch what it would;
/// without it the endpoint targets run several times faster and the build is lighter.
const SANITIZER: &str = "none";

/// An input libFuzzer gives up on after this long counts as a hang.
const INPUT_TIMEOUT_SECS: u32 = 30;

/// What one target's run did.
struct Outcome {
    target: &'static str,
    runs: u64,
    seconds: u64,
    /// Inputs in libFuzzer's corpus at the end (what it keeps of seeds and finds, deduplicated).
    corpus: Option<u64>,
}

/// The arguments of the command that builds every target (`cargo` + these).
pub fn build_args(build: Build) -> Vec<&'static str> {
    let mut args = vec!["+nightly", "fuzz", "build", "--sanitizer", SANITIZER];
    if build == Build::Dev {
        args.push("--dev");
    }
    args
}

/// Runs `only` (or every target) for `seconds` each, built as `build` says.
pub fn run(seconds: u64, only: Option<&str>, build: Build) -> Result<()> {
    let targets: Vec<&'static str> = match only {
        None => TARGETS.to_vec(),
        Some(name) => match TARGETS.iter().find(|t| **t == name) {
            Some(t) => vec![*t],
            None => bail!(
                "no fuzz target {name}: the targets are {}",
                TARGETS.join(", ")
            ),
        },
    };
    ensure_cargo_fuzz()?;
    // One build for all of them, timed: the first is a full nightly build of the agent with
    // coverage instrumentation (and its eBPF programs).
    let started = Instant::now();
    util::run(
        Command::new("cargo")
            .args(build_args(build))
            .current_dir(util::workspace_root()),
    )?;
    println!(
        "==> fuzz targets built in {} s",
        started.elapsed().as_secs()
    );
    run_built(&targets, seconds, build)
}

/// Runs `targets`, built already as `build` says, for `seconds` each.
pub fn run_built(targets: &[&'static str], seconds: u64, build: Build) -> Result<()> {
    let mut outcomes = Vec::new();
    for &target in targets {
        outcomes.push(run_target(target, seconds, build)?);
    }
    println!("xtask fuzz: no crash");
    for o in &outcomes {
        println!(
            "  {:<16} {:>10} runs in {:>4} s, corpus {} inputs",
            o.target,
            o.runs,
            o.seconds,
            o.corpus.map_or_else(|| "?".to_owned(), |n| n.to_string())
        );
    }
    Ok(())
}

fn run_target(target: &'static str, seconds: u64, build: Build) -> Result<Outcome> {
    let root = util::workspace_root();
    let seeds = root.join("fuzz").join("corpus").join(target);
    let work = root.join("fuzz").join("work").join(target);
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let mut cmd = cargo_fuzz(&["run", target], build);
    // The first directory is where libFuzzer writes what it finds.
    cmd.arg(&work)
        .arg(&seeds)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-timeout={INPUT_TIMEOUT_SECS}"))
        .stderr(Stdio::piped());
    println!("==> {cmd:?}");
    let mut child = cmd.spawn().context("cannot start cargo fuzz")?;
    // libFuzzer reports on stderr; its last words are `#<runs> DONE … corp: <inputs>/<size> …`
    // and `Done <runs> runs in <seconds> second(s)`.
    let (mut done, mut corpus) = (None, None);
    if let Some(stderr) = child.stderr.take() {
        for line in std::io::BufReader::new(stderr).lines() {
            let line = line.context("reading libFuzzer's output")?;
            eprintln!("{line}");
            if let Some(d) = parse_done(&line) {
                done = Some(d);
            }
            if let Some(n) = parse_corpus(&line) {
                corpus = Some(n);
            }
        }
    }
    let status = child.wait().context("waiting for cargo fuzz")?;
    if !status.success() {
        bail!(
            "fuzz target {target} failed ({status}): the input is in fuzz/artifacts/{target}/; \
             replay it with `cargo +nightly fuzz run -s {SANITIZER}{} {target} fuzz/artifacts/{target}/<file>`",
            if build == Build::Dev { " --dev" } else { "" }
        );
    }
    let (runs, seconds) = done.unwrap_or_default();
    Ok(Outcome {
        target,
        runs,
        seconds,
        corpus,
    })
}

/// `cargo +nightly fuzz <command> --sanitizer none <args>` in the workspace root.
fn cargo_fuzz(command_and_args: &[&str], build: Build) -> Command {
    let (command, args) = command_and_args.split_first().unwrap_or((&"build", &[]));
    let mut cmd = Command::new("cargo");
    cmd.args(["+nightly", "fuzz", command, "--sanitizer", SANITIZER]);
    if build == Build::Dev {
        cmd.arg("--dev");
    }
    cmd.args(args).current_dir(util::workspace_root());
    cmd
}

/// cargo-fuzz, installed when missing; a nightly toolchain is `cargo xtask setup`'s job.
pub fn ensure_cargo_fuzz() -> Result<()> {
    if util::output("rustc", &["+nightly", "--version"]).is_none() {
        bail!("no nightly toolchain: run `cargo xtask setup` first");
    }
    if util::output("cargo", &["+nightly", "fuzz", "--version"]).is_none() {
        println!("==> installing cargo-fuzz");
        util::run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    }
    Ok(())
}

/// `Done 1048576 runs in 31 second(s)` → (1048576, 31).
fn parse_done(line: &str) -> Option<(u64, u64)> {
    let rest = line.trim().strip_prefix("Done ")?;
    let (runs, rest) = rest.split_once(" runs in ")?;
    let (seconds, _) = rest.split_once(' ')?;
    Some((runs.parse().ok()?, seconds.parse().ok()?))
}

/// `#1048576 DONE cov: 1 ft: 2 corp: 455/107Kb …` → 455.
fn parse_corpus(line: &str) -> Option<u64> {
    let (_, rest) = line.split_once(" corp: ")?;
    rest.split('/').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::{parse_corpus, parse_done};

    #[test]
    fn reads_libfuzzers_last_line() {
        assert_eq!(
            parse_done("Done 1048576 runs in 31 second(s)"),
            Some((1_048_576, 31))
        );
        assert_eq!(
            parse_done("#1048576\tDONE   cov: 1 ft: 2 corp: 3/4b exec/s: 5 rss: 6Mb"),
            None
        );
        assert_eq!(
            parse_corpus("#1048576\tDONE   cov: 1 ft: 2 corp: 455/107Kb exec/s: 5 rss: 6Mb"),
            Some(455)
        );
        assert_eq!(parse_corpus("Done 1048576 runs in 31 second(s)"), None);
    }
}
