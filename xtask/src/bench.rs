//! `cargo xtask bench`: the agent under load in a simulated node, side by side with nginx
//! (`tests/src/bin/bench.rs`, which writes BENCHMARKS.md), then the cost of a new token's
//! signature check and of the pod view per request (`agent/benches/signature.rs`,
//! `agent/benches/pod_view.rs`, criterion), appended to it.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result, bail};

use crate::{image, setup, util};

pub fn run(seconds: u64) -> Result<()> {
    util::require_root("the bench creates network namespaces, links and cgroups")?;
    setup::run()?;
    util::cargo(
        &[
            "build",
            "--release",
            "-p",
            "eks-pod-identity-agent",
            "-p",
            "e2e",
        ],
        &[],
    )?;
    // The image's static binary too: the footprint is measured for both.
    let image_agent = image::static_agent()?;
    let release = util::target_dir().join("release");
    let agent = release.join("eks-pod-identity-agent");
    let out = util::workspace_root().join("BENCHMARKS.md");
    let status = std::process::Command::new(release.join("bench"))
        .arg("--out")
        .arg(&out)
        .env("EKS_POD_IDENTITY_AGENT_BIN", &agent)
        .env("EKS_POD_IDENTITY_AGENT_IMAGE_BIN", &image_agent)
        .env("BENCH_SECONDS", seconds.to_string())
        .current_dir(util::workspace_root())
        .status()
        .context("cannot run the bench")?;
    if !status.success() {
        std::process::exit(util::exit_code(status));
    }
    // Criterion keeps its last estimates: a fresh run's only.
    let criterion = util::target_dir().join("criterion");
    let _ = std::fs::remove_dir_all(&criterion);
    util::cargo(
        &[
            "bench",
            "-p",
            "eks-pod-identity-agent",
            "--bench",
            "signature",
            "--bench",
            "pod_view",
        ],
        &[],
    )?;
    let section = signature_section(&criterion.join("new token"))?
        + &pod_view_section(&criterion.join("pod view"))?;
    let mut text = std::fs::read_to_string(&out)?;
    text.push_str(&section);
    std::fs::write(&out, text)?;
    println!("{section}");
    Ok(())
}

/// BENCHMARKS.md's section on the pod view's cost per request, from criterion's estimates.
fn pod_view_section(dir: &Path) -> Result<String> {
    let mut estimates = Vec::new();
    collect(dir, &mut estimates)?;
    if estimates.is_empty() {
        bail!("criterion wrote no estimates under {}", dir.display());
    }
    estimates.sort_by(|a, b| a.median_ns.total_cmp(&b.median_ns));
    let mut s = String::from(
        "\nThe pod view's cost per request (criterion, `agent/benches/pod_view.rs`, one core): finding the caller's pod \
         by the UID the kernel saw, placing its container under the pod's list of containers, and comparing the \
         token's claims with the pod, for every credential request while `--pod-view` is on.\n\n\
         | work | median | 95% interval |\n|---|---:|---:|\n",
    );
    for e in &estimates {
        let _ = writeln!(
            s,
            "| {} | {:.0} ns | {:.0}–{:.0} ns |",
            e.title, e.median_ns, e.low_ns, e.high_ns
        );
    }
    Ok(s)
}

/// One benchmark's median, from criterion's files.
struct Estimate {
    title: String,
    median_ns: f64,
    low_ns: f64,
    high_ns: f64,
}

/// BENCHMARKS.md's section on the signature check, from criterion's estimates under `dir`.
fn signature_section(dir: &Path) -> Result<String> {
    let mut estimates = Vec::new();
    collect(dir, &mut estimates)?;
    if estimates.is_empty() {
        bail!("criterion wrote no estimates under {}", dir.display());
    }
    estimates.sort_by(|a, b| a.median_ns.total_cmp(&b.median_ns));
    let base = estimates[0].median_ns;
    let mut s = String::from(
        "\nA new token's local checks (criterion, `agent/benches/signature.rs`, one core): reading and checking its claims \
         as the agent always did, and with `--token-validation` the `kubernetes.io` claims, the header and the signature \
         with the cluster's key (RS256 with a 2048-bit key, as EKS signs; ES256 with P-256). Once per new token: a cached \
         token is never checked again, so the cache-hit rows above do not change.\n\n\
         | check | median | 95% interval | over claims only |\n|---|---:|---:|---:|\n",
    );
    for e in &estimates {
        let _ = writeln!(
            s,
            "| {} | {:.1} µs | {:.1}–{:.1} µs | +{:.1} µs |",
            e.title,
            e.median_ns / 1000.0,
            e.low_ns / 1000.0,
            e.high_ns / 1000.0,
            (e.median_ns - base) / 1000.0
        );
    }
    Ok(s)
}

/// Every `new/estimates.json` (with its `benchmark.json`) below `dir`.
fn collect(dir: &Path, out: &mut Vec<Estimate>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if !path.is_dir() {
            continue;
        }
        let estimates = path.join("new/estimates.json");
        if estimates.is_file() {
            let read = |p: &Path| -> Result<serde_json::Value> {
                Ok(serde_json::from_str(&std::fs::read_to_string(p)?)?)
            };
            let e = read(&estimates)?;
            let b = read(&path.join("new/benchmark.json"))?;
            let median = &e["median"];
            let ns = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN);
            out.push(Estimate {
                title: b["function_id"].as_str().unwrap_or("?").to_owned(),
                median_ns: ns(&median["point_estimate"]),
                low_ns: ns(&median["confidence_interval"]["lower_bound"]),
                high_ns: ns(&median["confidence_interval"]["upper_bound"]),
            });
        } else {
            collect(&path, out)?;
        }
    }
    Ok(())
}
