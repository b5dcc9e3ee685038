//! `cargo xtask bench`: the agent's request path under load, scenarios side by side in one run.
//!
//! A simulated node with one pod; `wrk` runs inside the pod (its netns and cgroup, so the eBPF
//! programs attribute its connections) against the agent on 169.254.170.23. Each scenario starts a
//! fresh agent with its own flags. The node-wide limit (1000 req/s by default, as the original) is
//! turned off so that the agent's capacity, not the limit, is measured.
//!
//! Prints a Markdown table; `--out FILE` also writes it there.

use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use e2e::agent::{AgentArgs, AgentProcess, start_fake_eks_auth_in};
use e2e::node::{Pod, PodSpec, SimNode};

const CLUSTER: &str = "bench-cluster";

/// One row of the comparison.
struct Scenario {
    name: &'static str,
    /// Extra agent flags.
    agent: &'static [&'static str],
    /// Attach the eBPF programs (at the node's cgroup root), or start the agent where they cannot attach.
    ebpf: bool,
    /// `Connection: close` on every request: one connection (and one attribution) per request.
    new_connection_per_request: bool,
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "cache hit, keep-alive, eBPF attribution on",
        agent: &[],
        ebpf: true,
        new_connection_per_request: false,
    },
    Scenario {
        name: "cache hit, keep-alive, eBPF attribution off",
        agent: &["--cgroup-root", "/nonexistent", "--token-binding", "off"],
        ebpf: false,
        new_connection_per_request: false,
    },
    Scenario {
        name: "cache hit, new connection per request, eBPF on",
        agent: &[],
        ebpf: true,
        new_connection_per_request: true,
    },
    Scenario {
        name: "cache hit, new connection per request, eBPF off",
        agent: &["--cgroup-root", "/nonexistent", "--token-binding", "off"],
        ebpf: false,
        new_connection_per_request: true,
    },
    Scenario {
        name: "no cache (--max-cache-size 0): EKS Auth every time",
        agent: &["--max-cache-size", "0"],
        ebpf: true,
        new_connection_per_request: false,
    },
];

/// What wrk reported.
struct Measured {
    requests_per_sec: f64,
    p50: String,
    p99: String,
    non_2xx: u64,
    errors: String,
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let out = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let seconds: u64 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    if !nix::unistd::geteuid().is_root() {
        bail!("the bench needs root (network namespaces, cgroups, eBPF)");
    }
    which("wrk")?;
    let node = SimNode::new()?;
    let fake = start_fake_eks_auth_in(node.netns(), CLUSTER)?;
    let pod = node.add_pod(PodSpec::new("load-0", "bench", "loader"))?;
    fake.associate("bench", "loader", "loader-role");
    let token = fake.issue_token(&pod.token_spec())?;

    let mut rows = Vec::new();
    for scenario in SCENARIOS {
        eprintln!("== {} ({seconds} s)", scenario.name);
        let args = AgentArgs {
            cgroup_root: scenario.ebpf,
            ..AgentArgs::default()
        };
        let agent = AgentProcess::start(
            &node,
            &fake,
            args.args(["--global-request-rate", "0"])
                .args(scenario.agent.iter().copied()),
        )?;
        let calls_before = fake.calls();
        // Warm the cache (and the connection path) before measuring.
        wrk(&pod, &token, scenario, 1)?;
        let measured = wrk(&pod, &token, scenario, seconds)?;
        let upstream_calls = fake.calls() - calls_before;
        agent.stop()?;
        rows.push((scenario.name, measured, upstream_calls));
    }

    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    let mut table = format!(
        "wrk, 1 thread, 16 connections, {seconds} s per scenario, from a pod's netns and cgroup; agent and wrk share {} cores ({cpu}).\n\n\
         | scenario | requests/s | p50 | p99 | non-2xx | socket errors | EKS Auth calls |\n|---|---:|---:|---:|---:|---|---:|\n",
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get)
    );
    for (name, m, calls) in &rows {
        table.push_str(&format!(
            "| {name} | {:.0} | {} | {} | {} | {} | {calls} |\n",
            m.requests_per_sec, m.p50, m.p99, m.non_2xx, m.errors
        ));
    }
    println!("{table}");
    if let Some(out) = out {
        let date = std::process::Command::new("date")
            .args(["-u", "+%Y-%m-%d"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default();
        let page = format!(
            "# Benchmarks\n\nWritten by `cargo xtask bench` (release build) on {date}. Each scenario starts a fresh agent in a \
             simulated node; wrk runs inside a pod (its network namespace and cgroup). The node-wide limit \
             (`--global-request-rate`, 1000/s by default as in the original agent) is off so that capacity is measured.\n\n{table}"
        );
        std::fs::write(&out, page).with_context(|| format!("writing {out}"))?;
    }
    Ok(())
}

fn which(program: &str) -> Result<()> {
    let found = std::process::Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !found {
        bail!("`{program}` is not installed: run `cargo xtask setup`");
    }
    Ok(())
}

fn wrk(pod: &Pod, token: &str, scenario: &Scenario, seconds: u64) -> Result<Measured> {
    let mut cmd = pod.command("wrk");
    cmd.args(["-t1", "-c16", "--latency", "--timeout", "2s"])
        .arg(format!("-d{seconds}s"))
        .arg("-H")
        .arg(format!("Authorization: {token}"));
    if scenario.new_connection_per_request {
        cmd.args(["-H", "Connection: close"]);
    }
    cmd.arg("http://169.254.170.23/v1/credentials");
    let output = cmd.output().context("running wrk")?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        bail!(
            "wrk failed: {}\n{text}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    parse_wrk(&text).with_context(|| format!("reading wrk's output:\n{text}"))
}

fn parse_wrk(text: &str) -> Result<Measured> {
    let field = |prefix: &str| {
        text.lines()
            .map(str::trim)
            .find(|l| l.starts_with(prefix))
            .map(|l| l[prefix.len()..].trim().to_owned())
    };
    let requests_per_sec = field("Requests/sec:").context("no Requests/sec")?.parse()?;
    let p50 = field("50%").context("no p50")?;
    let p99 = field("99%").context("no p99")?;
    let non_2xx = field("Non-2xx or 3xx responses:").map_or(Ok(0), |n| n.parse())?;
    let errors = field("Socket errors:").unwrap_or_else(|| "none".to_owned());
    Ok(Measured {
        requests_per_sec,
        p50,
        p99,
        non_2xx,
        errors,
    })
}
