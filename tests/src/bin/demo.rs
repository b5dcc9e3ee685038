//! A guided tour: a simulated node with three pods, a fake EKS Auth and the real agent; every pod fetches
//! credentials with a real SDK, then the audit log and metrics are shown.
//!
//! Run as root after building the agent: `cargo build -p eks-pod-identity-agent && cargo run -p e2e --bin demo`.
//! Exits non-zero if any scenario fails. To add a scenario, write a `fn(&mut Demo) -> Result<()>` and list
//! it in [`SCENARIOS`].

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use e2e::agent::{AgentArgs, AgentProcess, start_fake_eks_auth_in};
use e2e::cgroup::CgroupDriver;
use e2e::clients::FetchOutcome;
use e2e::fake_eks_auth::FakeEksAuth;
use e2e::node::{CREDENTIALS_URI_V4, CREDENTIALS_URI_V6, Pod, PodSpec, SimNode};

const CLUSTER: &str = "demo-cluster";

/// The scenarios, in order. Each prints its own lines; an error marks it failed and the tour goes on.
const SCENARIOS: &[(&str, Scenario)] = &[(
    "every pod fetches credentials with a real SDK",
    fetch_with_real_sdks,
)];

type Scenario = fn(&mut Demo) -> Result<()>;

/// Which real SDK a pod uses.
#[derive(Debug, Clone, Copy)]
enum Sdk {
    Botocore,
    Rust,
}

impl Sdk {
    fn name(self) -> &'static str {
        match self {
            Self::Botocore => "botocore",
            Self::Rust => "aws-sdk-rust",
        }
    }

    fn fetch(self, pod: &Pod, uri: &str) -> Result<FetchOutcome> {
        match self {
            Self::Botocore => pod.fetch_with_botocore(uri),
            Self::Rust => pod.fetch_with_rust_sdk(uri),
        }
    }
}

/// A pod of the tour with the client it runs and the address family it uses.
struct DemoPod {
    pod: Pod,
    sdk: Sdk,
    uri: &'static str,
}

/// Everything a scenario can use. Field order is drop order: the agent stops before the node goes.
struct Demo {
    agent: Option<AgentProcess>,
    pods: Vec<DemoPod>,
    fake: FakeEksAuth,
    node: SimNode,
    audit_log: PathBuf,
}

fn main() -> ExitCode {
    match run() {
        Ok(0) => ExitCode::SUCCESS,
        Ok(failed) => {
            eprintln!("\n{failed} scenario(s) failed");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("demo setup failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<usize> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the demo needs root (network namespaces, cgroups, eBPF)");
    }
    let mut demo = setup()?;
    let mut failed = 0;
    for (title, scenario) in SCENARIOS {
        println!("\n== {title}");
        if let Err(e) = scenario(&mut demo) {
            println!("   FAILED: {e:#}");
            failed += 1;
        }
    }
    show_audit_log(&demo);
    show_metrics(&demo);
    teardown(demo)?;
    Ok(failed)
}

fn setup() -> Result<Demo> {
    println!("== setting up a simulated node");
    let node = SimNode::new()?;
    let fake = start_fake_eks_auth_in(node.netns(), CLUSTER)?;
    println!(
        "   node {} (netns {}), cgroup root {}",
        node.name(),
        node.netns().name(),
        node.cgroup_root().display()
    );
    println!(
        "   fake EKS Auth for cluster {CLUSTER} at {} inside the node",
        fake.addr()
    );

    let specs = [
        (
            PodSpec::new("checkout-7d9f", "shop", "checkout"),
            Sdk::Botocore,
            CREDENTIALS_URI_V4,
        ),
        (
            PodSpec::new("reports-0", "analytics", "reporter").driver(CgroupDriver::Cgroupfs),
            Sdk::Rust,
            CREDENTIALS_URI_V6,
        ),
        (
            PodSpec::new("cart-5c4b", "shop", "cart"),
            Sdk::Rust,
            CREDENTIALS_URI_V4,
        ),
    ];
    let mut pods = Vec::new();
    for (spec, sdk, uri) in specs {
        let role = format!("{}-role", spec.service_account);
        fake.associate(&spec.namespace, &spec.service_account, &role);
        let pod = node.add_pod(spec)?;
        pod.refresh_token(&fake)?;
        println!(
            "   pod {}/{} (sa {}, {:?} cgroup) at {} / {} -> role {role}",
            pod.namespace, pod.name, pod.service_account, pod.driver, pod.ipv4, pod.ipv6
        );
        pods.push(DemoPod { pod, sdk, uri });
    }

    let audit_log = node.dir().join("audit.log");
    let agent = AgentProcess::start(&node, &fake, AgentArgs::default().audit_log(&audit_log))?;
    println!("   agent ready (pid {})", agent.pid().unwrap_or_default());
    Ok(Demo {
        agent: Some(agent),
        pods,
        fake,
        node,
        audit_log,
    })
}

fn fetch_with_real_sdks(demo: &mut Demo) -> Result<()> {
    let mut failures = Vec::new();
    println!(
        "   {:<24} {:<13} {:<5} {:<21} expiration",
        "pod", "sdk", "via", "access key"
    );
    for p in &demo.pods {
        let family = if p.uri == CREDENTIALS_URI_V6 {
            "IPv6"
        } else {
            "IPv4"
        };
        let who = format!("{}/{}", p.pod.namespace, p.pod.name);
        match p.sdk.fetch(&p.pod, p.uri)? {
            Ok(creds) => {
                let prefix = &creds.access_key_id;
                let expiry = creds.expiry.as_deref().unwrap_or("-");
                println!(
                    "   {who:<24} {:<13} {family:<5} {prefix:<21} {expiry}",
                    p.sdk.name()
                );
            }
            Err(e) => {
                println!(
                    "   {who:<24} {:<13} {family:<5} FAILED: {}",
                    p.sdk.name(),
                    e.stderr.trim()
                );
                failures.push(who);
            }
        }
    }
    println!("   EKS Auth was called {} time(s)", demo.fake.calls());
    if failures.is_empty() {
        Ok(())
    } else {
        bail!("fetch failed for {}", failures.join(", "))
    }
}

fn show_audit_log(demo: &Demo) {
    match std::fs::read_to_string(&demo.audit_log) {
        Ok(text) if !text.trim().is_empty() => {
            println!("\n== audit log ({})", demo.audit_log.display());
            for line in text.lines() {
                println!("   {}", summarize_audit_line(line));
            }
        }
        _ => println!("\n== audit log: empty or not written"),
    }
}

fn show_metrics(demo: &Demo) {
    let Some(agent) = &demo.agent else { return };
    println!("\n== metrics (pod_identity_*)");
    match agent.metrics() {
        Ok(text) => {
            // Histogram buckets would drown the rest; their _sum and _count lines stay.
            let interesting = text
                .lines()
                .filter(|l| l.starts_with("pod_identity_") && !l.contains("_bucket{"))
                .take(20);
            for line in interesting {
                println!("   {line}");
            }
        }
        Err(e) => println!("   could not read /metrics: {e:#}"),
    }
}

/// One audit record in a line: outcome, caller, token subject, binding, role. Raw text if not JSON.
fn summarize_audit_line(line: &str) -> String {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
        return line.to_owned();
    };
    let field = |path: &[&str]| {
        let mut cur = &v;
        for key in path {
            cur = &cur[*key];
        }
        match cur {
            serde_json::Value::Null => "-".to_owned(),
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        }
    };
    format!(
        "{} {} from {} (pod uid {}) as {}/{}: binding {}, role {}",
        field(&["outcome"]),
        field(&["http_status"]),
        field(&["caller", "peer"]),
        field(&["caller", "pod_uid"]),
        field(&["token", "namespace"]),
        field(&["token", "service_account"]),
        field(&["binding"]),
        field(&["role_arn"]),
    )
}

fn teardown(mut demo: Demo) -> Result<()> {
    println!("\n== tearing down");
    if let Some(agent) = demo.agent.take() {
        let status = agent.stop().context("stopping the agent")?;
        println!("   agent stopped: {status}");
    }
    let node = demo.node.name().to_owned();
    drop(demo);
    println!("   node {node} and its pods removed");
    Ok(())
}
