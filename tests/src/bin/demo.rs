//! A guided tour: a simulated node with three pods, a fake EKS Auth and the real agent; every pod fetches
//! credentials with a real SDK and the audit log names each caller's pod, container, pid and comm; then,
//! with the agent restarted under `--token-binding enforce` and a per-pod connect limit, a token replayed
//! from another pod is refused, a forged token is refused at the door (the cluster's signing key, from a
//! Kubernetes API stand-in) without a call to EKS Auth, and a pod flooding the agent with connections is
//! refused in the kernel while its neighbour is served. The API stand-in also serves the pods (the agent's
//! pod view names each caller's container), and one pod lists the containers that may have its credentials:
//! its sidecar is refused. Then the whole audit log and the metrics are shown, and the agent is restarted with
//! `--audit-format ocsf` to show one request's record as an OCSF event, checked against the OCSF schema.
//!
//! Run as root after building the agent: `cargo build -p eks-pod-identity-agent && cargo run -p e2e --bin demo`.
//! Exits non-zero if any scenario fails. To add a scenario, write a `fn(&mut Demo) -> Result<()>` and list
//! it in [`SCENARIOS`].

use std::path::PathBuf;
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use e2e::agent::{AgentArgs, AgentProcess, start_fake_eks_auth_in, wait_audit_records};
use e2e::cgroup::CgroupDriver;
use e2e::clients::{Family, FetchOutcome, FloodReport, PyExchange};
use e2e::cluster_keys::ClusterKey;
use e2e::fake_eks_auth::FakeEksAuth;
use e2e::fake_kube_api::{self, FakeKubeApi, SIDECAR_ID};
use e2e::node::{CREDENTIALS_URI_V4, CREDENTIALS_URI_V6, Pod, PodSpec, SimNode};

const CLUSTER: &str = "demo-cluster";

/// The scenarios, in order. Each prints its own lines; an error marks it failed and the tour goes on.
const SCENARIOS: &[(&str, Scenario)] = &[
    (
        "every pod fetches credentials with a real SDK",
        fetch_with_real_sdks,
    ),
    (
        "the audit log names each caller's pod, container, pid and comm",
        audit_names_each_caller,
    ),
    (
        "the agent restarts with --token-binding enforce and a per-pod connect limit",
        restart_enforcing,
    ),
    (
        "a token replayed from another pod is refused",
        replayed_token_refused,
    ),
    (
        "a forged token is refused at the door, without asking EKS Auth",
        forged_token_refused,
    ),
    (
        "a sidecar of a pod that lists its containers is refused",
        sidecar_refused,
    ),
    (
        "a pod flooding the agent is refused in the kernel while its neighbour is served",
        flood_refused_in_kernel,
    ),
];

/// The annotation listing the containers that may have a pod's credentials.
const CONTAINERS_ANNOTATION: &str = "eks-pod-identity-agent.amazonaws.com/containers";

/// The flags of the restarted agent.
const ENFORCING: [&str; 6] = [
    "--token-binding",
    "enforce",
    "--pod-connect-rate",
    "1",
    "--pod-connect-burst",
    "3",
];

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
    api: FakeKubeApi,
    node: SimNode,
    audit_log: PathBuf,
}

impl Demo {
    /// The agent's arguments: the audit log, and the Kubernetes API stand-in (for the cluster's
    /// signing keys) with a state directory in the node.
    fn agent_args(&self) -> Result<AgentArgs> {
        agent_args(&self.node, &self.api, &self.audit_log)
    }
}

fn agent_args(node: &SimNode, api: &FakeKubeApi, audit_log: &std::path::Path) -> Result<AgentArgs> {
    let kubeconfig = node.dir().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig)?;
    let mut args = AgentArgs::default().audit_log(audit_log).args([
        "--state-dir".to_owned(),
        node.dir().join("state").display().to_string(),
    ]);
    args.env
        .push(("KUBECONFIG".into(), kubeconfig.display().to_string()));
    Ok(args)
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
    println!("\n== the audit log for a SIEM: the agent restarted with --audit-format ocsf");
    if let Err(e) = ocsf_record(&mut demo) {
        println!("   FAILED: {e:#}");
        failed += 1;
    }
    teardown(demo)?;
    Ok(failed)
}

fn setup() -> Result<Demo> {
    println!("== setting up a simulated node");
    let node = SimNode::new()?;
    let fake = start_fake_eks_auth_in(node.netns(), CLUSTER)?;
    // The cluster signs tokens with its key; the API server publishes it.
    let key = ClusterKey::fixture("rsa-1")?;
    fake.use_cluster_key(key.clone());
    let api = fake_kube_api::start_in(node.netns())?;
    api.set_jwks(Some(vec![key.jwk.clone()]));
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
    println!(
        "   Kubernetes API stand-in at {} publishing the cluster's signing key {}",
        api.addr(),
        key.kid
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
        // The API server has the pod: its app container (where its processes run) and a
        // sidecar. The first pod lets only its app have its credentials.
        let mut object = fake_kube_api::served_with_sidecar(&node, &pod);
        if pods.is_empty() {
            object["metadata"]["annotations"][CONTAINERS_ANNOTATION] = "app".into();
        }
        api.add_pod(object);
        println!(
            "   pod {}/{} (sa {}, {:?} cgroup) at {} / {} -> role {role}",
            pod.namespace, pod.name, pod.service_account, pod.driver, pod.ipv4, pod.ipv6
        );
        pods.push(DemoPod { pod, sdk, uri });
    }

    let audit_log = node.dir().join("audit.log");
    let agent = AgentProcess::start(&node, &fake, agent_args(&node, &api, &audit_log)?)?;
    println!("   agent ready (pid {})", agent.pid().unwrap_or_default());
    Ok(Demo {
        agent: Some(agent),
        pods,
        fake,
        api,
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

fn audit_names_each_caller(demo: &mut Demo) -> Result<()> {
    let records = wait_audit_records(&demo.audit_log, demo.pods.len(), Duration::from_secs(5))?;
    let mut wrong = Vec::new();
    for p in &demo.pods {
        let mine: Vec<_> = records
            .iter()
            .filter(|r| r["token"]["pod_uid"] == p.pod.uid.as_str())
            .collect();
        println!("   {}/{}:", p.pod.namespace, p.pod.name);
        for r in &mine {
            println!("     {}", summarize_audit_line(&r.to_string()));
            if r["caller"]["pod_uid"] != p.pod.uid.as_str()
                || r["caller"]["container_id"] != p.pod.container_id.as_str()
                || r["binding"] != "match"
                || !r["caller"]["pid"].is_u64()
                || !r["caller"]["comm"].is_string()
            {
                wrong.push(format!("{}: {r}", p.pod.name));
            }
        }
        if mine.is_empty() {
            wrong.push(format!("{}: no audit record", p.pod.name));
        }
    }
    if wrong.is_empty() {
        println!("   every record names the pod, container and process the kernel saw connect");
        Ok(())
    } else {
        bail!("wrong or missing attribution: {}", wrong.join("; "))
    }
}

fn restart_enforcing(demo: &mut Demo) -> Result<()> {
    if let Some(agent) = demo.agent.take() {
        agent.stop().context("stopping the agent")?;
    }
    let agent = AgentProcess::start(&demo.node, &demo.fake, demo.agent_args()?.args(ENFORCING))?;
    println!(
        "   agent ready again (pid {}) with {}",
        agent.pid().unwrap_or_default(),
        ENFORCING.join(" ")
    );
    demo.agent = Some(agent);
    Ok(())
}

fn forged_token_refused(demo: &mut Demo) -> Result<()> {
    let pod = &demo.pods[0].pod;
    let key = ClusterKey::fixture("rsa-1")?;
    let stranger = ClusterKey::fixture("rsa-2")?;
    let forged = demo
        .fake
        .issue_token_signed(&pod.token_spec(), &stranger, &key.kid)?;
    let forged_path = pod.dir().join("forged-token");
    std::fs::write(&forged_path, forged.as_bytes())?;
    let calls_before = demo.fake.calls();
    println!(
        "   pod {} presents a token with its own claims, naming the cluster's key {} but signed with another",
        pod.name, key.kid
    );
    let r = pod.python_requests(Family::V4, &forged_path, 1, false)?;
    let ex = &r.exchanges[0];
    println!(
        "   -> {} {}",
        ex.status
            .map_or_else(|| "no response".to_owned(), |s| s.to_string()),
        ex.body.trim()
    );
    let calls = demo.fake.calls() - calls_before;
    println!("   EKS Auth calls for the forgery: {calls}");
    let records = wait_audit_records(&demo.audit_log, 1, Duration::from_secs(5))?;
    if let Some(rec) = records.iter().find(|rec| rec["caller"]["pid"] == r.pid) {
        println!("   audit: {}", summarize_audit_line(&rec.to_string()));
    }
    if ex.status != Some(400) || !ex.body.contains("signature") {
        bail!("the forgery was answered {:?}: {}", ex.status, ex.body);
    }
    if calls != 0 {
        bail!("EKS Auth was called for a forged token");
    }
    Ok(())
}

fn replayed_token_refused(demo: &mut Demo) -> Result<()> {
    let (victim, thief) = (&demo.pods[0].pod, &demo.pods[2].pod);
    let calls_before = demo.fake.calls();
    println!(
        "   pod {} presents the token of pod {} (uid {})",
        thief.name, victim.name, victim.uid
    );
    let replay = thief.python_requests(Family::V4, &victim.token_path(), 1, false)?;
    let ex = &replay.exchanges[0];
    show_answer(ex);
    let records = wait_audit_records(&demo.audit_log, 1, Duration::from_secs(5))?;
    let record = records.iter().find(|r| r["caller"]["pid"] == replay.pid);
    if let Some(r) = record {
        println!("   audit: {}", summarize_audit_line(&r.to_string()));
    }
    let calls_after = demo.fake.calls();
    println!(
        "   EKS Auth calls for the replay: {}",
        calls_after - calls_before
    );
    let own = thief.python_requests(Family::V4, &thief.token_path(), 1, false)?;
    println!(
        "   pod {} with its own token -> {}",
        thief.name,
        own.exchanges[0].status.unwrap_or_default()
    );
    if ex.status != Some(403) {
        bail!("the replay was answered {:?}, expected 403", ex.status);
    }
    if !record.is_some_and(|r| r["binding"] == "mismatch" && r["outcome"] == "denied") {
        bail!("no audit record with binding mismatch, outcome denied for the replay");
    }
    if calls_after != calls_before {
        bail!("EKS Auth was called for a refused replay");
    }
    if own.exchanges[0].status != Some(200) {
        bail!("the pod's own token was not served: {:?}", own.exchanges[0]);
    }
    Ok(())
}

fn sidecar_refused(demo: &mut Demo) -> Result<()> {
    if let Some(agent) = &demo.agent {
        let synced = e2e::wait_for(Duration::from_secs(30), || {
            agent
                .metric("pod_identity_pod_view_synced")
                .is_ok_and(|v| v == 1.0)
        });
        if !synced {
            bail!("the agent's pod view did not list the node's pods");
        }
    }
    let pod = &mut demo.pods[0].pod;
    let app = pod.container_id.clone();
    println!(
        "   pod {} lists its containers ({CONTAINERS_ANNOTATION}: app); its istio-proxy sidecar asks with the pod's token",
        pod.name
    );
    pod.enter_container(SIDECAR_ID)?;
    let asked = pod.python_requests(Family::V4, &pod.token_path(), 1, false);
    pod.enter_container(&app)?;
    let asked = asked?;
    let ex = &asked.exchanges[0];
    show_answer(ex);
    let records = wait_audit_records(&demo.audit_log, 1, Duration::from_secs(5))?;
    let record = records.iter().find(|r| r["caller"]["pid"] == asked.pid);
    if let Some(r) = record {
        println!("   audit: {}", summarize_audit_line(&r.to_string()));
    }
    let own = pod.python_requests(Family::V4, &pod.token_path(), 1, false)?;
    println!(
        "   its app container -> {}",
        own.exchanges[0].status.unwrap_or_default()
    );
    if ex.status != Some(403) {
        bail!("the sidecar was answered {:?}, expected 403", ex.status);
    }
    if !record.is_some_and(|r| {
        r["pod"]["container"] == "istio-proxy" && r["pod"]["container_scope"] == "unlisted"
    }) {
        bail!("no audit record naming the sidecar as unlisted");
    }
    if own.exchanges[0].status != Some(200) {
        bail!("the app container was not served: {:?}", own.exchanges[0]);
    }
    Ok(())
}

fn flood_refused_in_kernel(demo: &mut Demo) -> Result<()> {
    let (flooder, neighbour) = (&demo.pods[1], &demo.pods[0]);
    // One real request first, so the agent knows the flooder's namespace for its metric label.
    if let Err(e) = flooder.sdk.fetch(&flooder.pod, flooder.uri)? {
        bail!("{} could not fetch before flooding: {e}", flooder.pod.name);
    }
    println!(
        "   {} fetched once (1 connection of its burst of 3), then floods for 2 s; {} fetches meanwhile",
        flooder.pod.name, neighbour.pod.name
    );
    let all = [Family::V4, Family::V6, Family::V4Mapped];
    let child = flooder
        .pod
        .connect_flood_command(&all, 0, Duration::from_secs(2), Duration::from_millis(5))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting the flood")?;
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let served = neighbour.sdk.fetch(&neighbour.pod, neighbour.uri)?;
    let took = started.elapsed();
    let flood = FloodReport::parse(&child.wait_with_output()?)?;
    let refused = flood.failed_with(1);
    let slowest = flood
        .attempts
        .iter()
        .filter(|a| a.errno == 1)
        .map(|a| a.elapsed_us)
        .max()
        .unwrap_or_default();
    println!(
        "   {}: {} connects, {} passed, {refused} refused with EPERM (slowest refusal {slowest} µs)",
        flooder.pod.name,
        flood.attempts.len(),
        flood.connected()
    );
    match &served {
        Ok(creds) => println!(
            "   {}: served {} in {took:?} during the flood",
            neighbour.pod.name, creds.access_key_id
        ),
        Err(e) => println!("   {}: FAILED {}", neighbour.pod.name, e.stderr.trim()),
    }
    // The agent reads the kernel's counters every few seconds, off the scrape.
    let agent = demo.agent.as_ref().context("no agent")?;
    let series = format!(
        "pod_identity_connections_denied_total{{namespace=\"{}\"}}",
        flooder.pod.namespace
    );
    e2e::wait_for(Duration::from_secs(15), || {
        agent.metric(&series).is_ok_and(|d| d >= refused as f64)
    });
    let denied = agent.metric(&series)?;
    println!(
        "   pod_identity_connections_denied_total{{namespace=\"{}\"}} {denied}",
        flooder.pod.namespace
    );
    if served.is_err() {
        bail!("the neighbour was not served during the flood");
    }
    // "At once": well under the 1 s of a first SYN retransmission, as in tests/limits.rs.
    if refused < 50 || flood.connected() > 5 || slowest > 500_000 {
        bail!(
            "expected most connects refused with EPERM at once, got {} passed, {refused} refused, slowest {slowest} µs",
            flood.connected()
        );
    }
    if denied < refused as f64 {
        bail!("the metric counts {denied} refusals, the flooder saw {refused}");
    }
    Ok(())
}

/// The agent restarted with `--audit-format ocsf`: one request's record as an OCSF
/// Authentication event, checked against the OCSF schema (tests/fixtures/ocsf_validate.py).
fn ocsf_record(demo: &mut Demo) -> Result<()> {
    if let Some(agent) = demo.agent.take() {
        agent.stop().context("stopping the agent")?;
    }
    let path = demo.node.dir().join("audit.ocsf.log");
    let args = agent_args(&demo.node, &demo.api, &path)?
        .args(ENFORCING)
        .args(["--audit-format", "ocsf"]);
    demo.agent = Some(AgentProcess::start(&demo.node, &demo.fake, args)?);
    let pod = &demo.pods[0].pod;
    let r = pod.python_requests(Family::V4, &pod.token_path(), 1, false)?;
    if r.exchanges[0].status != Some(200) {
        bail!("pod {} was not served: {:?}", pod.name, r.exchanges[0]);
    }
    let event = wait_audit_records(&path, 1, Duration::from_secs(5))?
        .pop()
        .context("no OCSF record")?;
    let at = |pointer: &str| event.pointer(pointer).cloned().unwrap_or_default();
    println!(
        "   class {} ({}), OCSF {}, status {}",
        at("/class_uid"),
        at("/class_name"),
        at("/metadata/version"),
        at("/status")
    );
    println!(
        "   actor: process {} pid {} (exec_id {}), container {}, user {}",
        at("/actor/process/name"),
        at("/actor/process/pid"),
        at("/actor/process/uid"),
        at("/actor/process/container/name"),
        at("/actor/user/uid")
    );
    println!(
        "   user: {} ({}), node {}",
        at("/user/uid"),
        at("/user/credential_uid"),
        at("/device/hostname")
    );
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/ocsf_validate.py");
    let out = std::process::Command::new("python3")
        .arg(script)
        .arg(&path)
        .output()
        .context("running the OCSF validator")?;
    let said = String::from_utf8_lossy(&out.stdout);
    println!("   schema check: {}", said.trim());
    if !out.status.success() {
        bail!("the OCSF event does not validate: {said}");
    }
    Ok(())
}

/// The status and body of an answer, but never credentials: a 200 where a scenario expects a
/// refusal carries a secret key and a session token.
fn show_answer(ex: &PyExchange) {
    let body = if ex.status == Some(200) {
        "(credentials, not shown)"
    } else {
        ex.body.trim()
    };
    println!(
        "   -> {} {body}",
        ex.status
            .map_or_else(|| "no response".to_owned(), |s| s.to_string())
    );
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
                .filter(|l| !l.ends_with(" 0"))
                .take(40);
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
    // The container's name, when the pod view gave it; else the start of its id.
    let container = match field(&["pod", "container"]) {
        name if name != "-" => name,
        _ => field(&["caller", "container_id"])
            .chars()
            .take(12)
            .collect(),
    };
    let reason = match field(&["reason"]) {
        r if r == "-" => String::new(),
        r => format!(" ({r})"),
    };
    format!(
        "{} {} from {} pod {} container {} pid {} comm {} as {}/{}: binding {}, cache {}, role {}{reason}",
        field(&["outcome"]),
        field(&["http_status"]),
        field(&["caller", "peer"]),
        field(&["caller", "pod_uid"]),
        container,
        field(&["caller", "pid"]),
        field(&["caller", "comm"]),
        field(&["token", "namespace"]),
        field(&["token", "service_account"]),
        field(&["binding"]),
        field(&["cache"]),
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
