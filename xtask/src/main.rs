//! Scripted work for the workspace: `cargo xtask setup | test | demo | bench | image | deploy-check | modules | fuzz`.

mod bench;
mod deploy;
mod fuzz;
mod idle;
mod image;
mod modules;
mod setup;
mod util;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "xtask",
    about = "Scripted work for the eks-pod-identity-agent workspace"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install the toolchain pieces and tools the build and tests need (idempotent).
    Setup,
    /// Setup, check the chart and alert rules, build the image and the agent, run every test,
    /// clippy and rustfmt (needs root).
    Test {
        /// Extra arguments passed to `cargo test` (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Setup, build, and run the end-to-end demo (needs root).
    Demo {
        /// Extra arguments passed to the demo binary (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Setup, build in release mode, and load the agent with wrk, scenarios side by side (needs
    /// root); time a new token's signature check (criterion). Writes BENCHMARKS.md.
    Bench {
        /// Seconds per scenario.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// Setup, build the agent as a static (musl) release binary for linux/amd64 and linux/arm64
    /// and an image FROM scratch for each with buildah, offline, under one manifest list:
    /// `localhost/eks-pod-identity-agent:latest` and `:<version>`; a CycloneDX SBOM of each
    /// binary's crates in target/image/ (needs root).
    Image,
    /// Run every fuzz target (or one) for a while from its checked-in corpus, with cargo-fuzz on
    /// nightly (installed when missing); fails on a crash. Inputs found go to fuzz/work, crashes
    /// to fuzz/artifacts.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Only this target.
        #[arg(long)]
        target: Option<String>,
    },
    /// Lint, render and validate the Helm chart against its golden renders and the original
    /// chart, and check the alert rules and the dashboard (offline; no root).
    DeployCheck {
        /// Rewrite the golden renders from the chart instead of comparing them.
        #[arg(long)]
        bless: bool,
    },
    /// The agent's module graph from its sources: fails on a cycle between modules, or when
    /// the module map in docs/architecture.md is not the code's (no root).
    Modules {
        /// Rewrite the module map in docs/architecture.md from the code.
        #[arg(long)]
        bless: bool,
    },
}

fn main() {
    let result = match Cli::parse().command {
        Command::Setup => setup::run(),
        Command::Test { args } => test(&args),
        Command::Demo { args } => demo(&args),
        Command::Bench { seconds } => bench::run(seconds),
        Command::Image => image::run(),
        Command::DeployCheck { bless } => deploy::check(bless),
        Command::Modules { bless } => modules::run(bless),
        Command::Fuzz { seconds, target } => {
            fuzz::run(seconds, target.as_deref(), fuzz::Build::Optimized)
        }
    };
    if let Err(err) = result {
        eprintln!("xtask: error: {err:#}");
        std::process::exit(1);
    }
}

fn test(args: &[String]) -> Result<()> {
    util::require_root("the end-to-end tests create network namespaces, links and cgroups")?;
    setup::run()?;
    modules::run(false)?;
    deploy::check(false)?;
    // The fuzz targets' build and clippy need nothing the rest builds, and each compiles the
    // whole dependency graph its own way (nightly with coverage; check-only): at idle priority
    // from the start, they use what the image builds and the tests leave of the CPUs. Clippy has
    // a target directory of its own, so that it never waits for the tests' build lock.
    fuzz::ensure_cargo_fuzz()?;
    let fuzz_build =
        idle::IdleJob::start("fuzz build", "cargo", &fuzz::build_args(fuzz::Build::Dev))?;
    let clippy_dir = util::target_dir().join("clippy");
    let clippy_dir = clippy_dir.to_string_lossy();
    let clippy = idle::IdleJob::start(
        "clippy",
        "cargo",
        &[
            "clippy",
            "--all-targets",
            "--target-dir",
            &clippy_dir,
            "--",
            "-D",
            "warnings",
        ],
    )?;
    // The image tests run the agent from the image's root filesystems: build both platforms from
    // this tree, once per run (the tests only read them), without the release profile's
    // whole-program optimisation (half of CI's time otherwise).
    image::build(image::Profile::Ci)?;
    let agent = util::build_agent(&[])?;
    // This command runs everything for real: a privileged test that cannot run fails, as in CI.
    let env = [
        ("EKS_POD_IDENTITY_AGENT_BIN", agent.as_os_str()),
        ("CI", std::ffi::OsStr::new("true")),
    ];
    // The workspace's default members: everything but the eBPF crate, which only builds for the
    // BPF target (the agent's build script builds it).
    let mut test_args = vec!["test"];
    if !args.is_empty() {
        test_args.push("--");
        test_args.extend(args.iter().map(String::as_str));
    }
    let counts = util::cargo_test(&test_args, &env)?;
    fuzz_build.wait()?;
    fuzz::run_built(&fuzz::TARGETS, fuzz::CI_SECONDS, fuzz::Build::Dev)?;
    clippy.wait()?;
    util::cargo(&["fmt", "--all", "--", "--check"], &[])?;
    println!("xtask test: tests, clippy and rustfmt all passed");
    // The totals over every test binary, last: cargo's own last line is one binary's.
    println!("{} passed, {} failed", counts.passed, counts.failed);
    Ok(())
}

fn demo(args: &[String]) -> Result<()> {
    util::require_root("the demo creates network namespaces, links and cgroups")?;
    setup::run()?;
    let agent = util::build_agent(&["-p", "e2e"])?;
    let demo = util::target_dir().join("debug").join("demo");
    println!("==> {}", demo.display());
    let status = std::process::Command::new(&demo)
        .args(args)
        .env("EKS_POD_IDENTITY_AGENT_BIN", &agent)
        .current_dir(util::workspace_root())
        .status()
        .map_err(|e| anyhow::anyhow!("cannot run {}: {e}", demo.display()))?;
    std::process::exit(util::exit_code(status));
}
