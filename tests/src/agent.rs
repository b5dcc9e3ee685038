//! The agent under test, run inside a [`SimNode`]'s network namespace.
//!
//! [`AgentProcess::start`] runs `<bin> initialize` (which creates `pod-id-link0` and the agent's addresses)
//! and then `<bin> server …` with `ip netns exec <node>`, the EKS Auth endpoint pointing at a
//! [`FakeEksAuth`] listening on the node's loopback, logs captured to a file, and waits for `/readyz`.

use std::ffi::OsString;
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::cgroup::CgroupDriver;
use crate::clients::{RawResponse, http_get_in};
use crate::fake_eks_auth::FakeEksAuth;
use crate::netns::NetNs;
use crate::node::{Pod, PodSpec, SimNode};

/// The agent binary: `$EKS_POD_IDENTITY_AGENT_BIN`, else `target/debug/eks-pod-identity-agent`.
pub fn agent_bin() -> Result<PathBuf> {
    crate::locate_binary(
        "EKS_POD_IDENTITY_AGENT_BIN",
        "eks-pod-identity-agent",
        "run `cargo build -p eks-pod-identity-agent` first",
    )
}

/// Starts a fake EKS Auth for `cluster` listening on `127.0.0.1:<ephemeral>` inside `netns`.
pub fn start_fake_eks_auth_in(netns: &NetNs, cluster: &str) -> Result<FakeEksAuth> {
    let listener = netns
        .run(|| std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))?
        .context("binding the fake EKS Auth inside the node")?;
    FakeEksAuth::start(listener, cluster)
}

/// Most tests' opening: a fresh node, a fake EKS Auth for `cluster` inside it with `shop`/`web-sa`
/// associated with `web-role`, and one pod of `shop`/`web-sa` per name in `pods`, added in order. The
/// first pod uses the systemd cgroup driver (kubelet's default), any later one cgroupfs, so two pods
/// cover both of kubelet's cgroup layouts. No tokens are written and no agent is started.
pub fn node_with_web_pods<const N: usize>(
    cluster: &str,
    pods: [&str; N],
) -> Result<(SimNode, FakeEksAuth, [Pod; N])> {
    let node = SimNode::new()?;
    let fake = start_fake_eks_auth_in(node.netns(), cluster)?;
    fake.associate("shop", "web-sa", "web-role");
    let mut added = Vec::with_capacity(N);
    for (i, name) in pods.into_iter().enumerate() {
        let driver = if i == 0 {
            CgroupDriver::Systemd
        } else {
            CgroupDriver::Cgroupfs
        };
        added.push(node.add_pod(PodSpec::new(name, "shop", "web-sa").driver(driver))?);
    }
    let Ok(pods) = added.try_into() else {
        unreachable!("one pod per name")
    };
    Ok((node, fake, pods))
}

/// How to run the agent's `server`.
#[derive(Debug, Clone)]
pub struct AgentArgs {
    /// `--probe-port` (the node namespace is private, so the default port never collides).
    pub probe_port: u16,
    /// `--metrics-port`.
    pub metrics_port: u16,
    /// `--audit-log PATH`, if set.
    pub audit_log: Option<PathBuf>,
    /// Pass `--cgroup-root <node's test root>` (default true; off only to run the agent with the anchor's flags).
    pub cgroup_root: bool,
    /// Pass `--node-name <node name>` (default true).
    pub node_name: bool,
    /// Further arguments, appended last (e.g. `["--token-binding", "enforce", "-v", "debug"]`).
    pub extra: Vec<String>,
    /// Extra environment for the agent process (after the defaults, so they override them).
    pub env: Vec<(String, String)>,
    /// Environment variables removed from the agent process last (e.g. the default
    /// `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, to make it use a shared credentials file).
    pub env_remove: Vec<String>,
    /// How long to wait for `/readyz`.
    pub ready_timeout: Duration,
    /// A command prefix run (inside the node's network namespace) in front of the agent, e.g.
    /// `["setpriv", "--bounding-set=-all,+bpf", "--"]` or `["chroot", "<rootfs>"]`.
    pub wrapper: Vec<OsString>,
    /// The agent's binary; `None`: [`agent_bin`] (`EKS_POD_IDENTITY_AGENT_BIN` or the workspace's
    /// debug build).
    pub bin: Option<PathBuf>,
    /// Run exactly these argvs (after `wrapper`) instead of `<bin> initialize` and
    /// `<bin> server <the flags above>`: a container's `command` + `args` as Kubernetes runs them.
    pub verbatim: Option<Verbatim>,
}

/// The agent's two commands, verbatim (see [`AgentArgs::verbatim`]).
#[derive(Debug, Clone)]
pub struct Verbatim {
    pub initialize: Vec<OsString>,
    pub server: Vec<OsString>,
}

impl Default for AgentArgs {
    fn default() -> Self {
        Self {
            probe_port: 2703,
            metrics_port: 2705,
            audit_log: None,
            cgroup_root: true,
            node_name: true,
            extra: Vec::new(),
            env: Vec::new(),
            env_remove: Vec::new(),
            ready_timeout: Duration::from_secs(20),
            wrapper: Vec::new(),
            bin: None,
            verbatim: None,
        }
    }
}

impl AgentArgs {
    /// Appends arguments.
    #[must_use]
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.extra.extend(args.into_iter().map(Into::into));
        self
    }

    /// The agent's own AWS credentials from the shared credentials file `path` only (as on hybrid
    /// nodes): no key in the environment, no config file.
    #[must_use]
    pub fn shared_credentials_file(mut self, path: &std::path::Path) -> Self {
        self.env.push((
            "AWS_SHARED_CREDENTIALS_FILE".into(),
            path.to_string_lossy().into_owned(),
        ));
        self.env.push((
            "AWS_CONFIG_FILE".into(),
            path.with_extension("no-config")
                .to_string_lossy()
                .into_owned(),
        ));
        self.env_remove = vec!["AWS_ACCESS_KEY_ID".into(), "AWS_SECRET_ACCESS_KEY".into()];
        self
    }

    /// Sets `--audit-log`.
    #[must_use]
    pub fn audit_log(mut self, path: impl Into<PathBuf>) -> Self {
        self.audit_log = Some(path.into());
        self
    }
}

static LOG_COUNTER: AtomicU32 = AtomicU32::new(0);

/// A running agent. `Drop` kills it (SIGKILL); [`AgentProcess::stop`] stops it gracefully.
#[derive(Debug)]
pub struct AgentProcess {
    child: Option<Child>,
    node: SimNode,
    log_path: PathBuf,
    probe_port: u16,
    metrics_port: u16,
}

impl AgentProcess {
    /// Starts the agent as [`AgentProcess::start`] does, and measures its start: from the spawn of
    /// `server` (stamped by a shell put in front of `args`' wrapper) to the first 200 of `/readyz`,
    /// polled every 2 ms from another thread while the harness waits.
    pub fn start_timed(
        node: &SimNode,
        fake: &FakeEksAuth,
        args: AgentArgs,
    ) -> Result<(Self, Duration)> {
        let n = LOG_COUNTER.fetch_add(1, Ordering::Relaxed);
        let stamp = node.dir().join(format!("agent-{n}.spawned"));
        let mut wrapper: Vec<OsString> = vec![
            "sh".into(),
            "-c".into(),
            format!("date +%s%N > {}; exec \"$@\"", stamp.display()).into(),
            "--".into(),
        ];
        wrapper.extend(args.wrapper.iter().cloned());
        let probe = SocketAddr::from((Ipv4Addr::LOCALHOST, args.probe_port));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let poller = {
            let (stop, node) = (stop.clone(), node.clone());
            std::thread::spawn(move || -> Option<u128> {
                while !stop.load(Ordering::Relaxed) {
                    if http_get_in(node.netns(), probe, "/readyz", Duration::from_millis(200))
                        .is_ok_and(|r| r.status == 200)
                    {
                        return std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .ok()
                            .map(|d| d.as_nanos());
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                None
            })
        };
        let agent = Self::start(node, fake, AgentArgs { wrapper, ..args });
        stop.store(true, Ordering::Relaxed);
        let ready_at = poller.join().ok().flatten();
        let agent = agent?;
        let spawned: u128 = std::fs::read_to_string(&stamp)
            .context("reading the spawn stamp")?
            .trim()
            .parse()
            .context("the spawn stamp")?;
        let ready_at = ready_at.context("/readyz was never seen answering 200")?;
        let took = u64::try_from(ready_at.saturating_sub(spawned)).unwrap_or(u64::MAX);
        Ok((agent, Duration::from_nanos(took)))
    }

    /// Runs `initialize` then `server` inside the node, pointed at `fake`, and waits until `/readyz` is 200.
    pub fn start(node: &SimNode, fake: &FakeEksAuth, args: AgentArgs) -> Result<Self> {
        let ns = node.netns().name();
        let n = LOG_COUNTER.fetch_add(1, Ordering::Relaxed);
        let log_path = node.dir().join(format!("agent-{n}.log"));

        let (init_argv, server_argv) = match &args.verbatim {
            Some(v) => (v.initialize.clone(), v.server.clone()),
            // The binary is only needed (and looked for) when the argvs are not given.
            None => {
                let bin = match &args.bin {
                    Some(bin) => bin.clone().into_os_string(),
                    None => agent_bin()?.into_os_string(),
                };
                (
                    vec![bin.clone(), "initialize".into()],
                    vec![bin, "server".into()],
                )
            }
        };
        let init = base_command(ns, &args.wrapper, &init_argv, &args)
            .output()
            .context("running `eks-pod-identity-agent initialize`")?;
        if !init.status.success() {
            bail!(
                "`eks-pod-identity-agent initialize` failed ({}):\nstdout: {}\nstderr: {}",
                init.status,
                String::from_utf8_lossy(&init.stdout),
                String::from_utf8_lossy(&init.stderr)
            );
        }

        let log = File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .context("creating the agent log")?;
        let mut cmd = base_command(ns, &args.wrapper, &server_argv, &args);
        if args.verbatim.is_none() {
            cmd.args(["--cluster-name", fake.cluster()])
                .args(["--endpoint", &fake.endpoint()])
                .args(["--probe-port", &args.probe_port.to_string()])
                .args(["--metrics-port", &args.metrics_port.to_string()]);
            if args.cgroup_root {
                cmd.arg("--cgroup-root").arg(node.cgroup_root());
            }
            if args.node_name {
                cmd.args(["--node-name", node.name()]);
            }
            if let Some(audit) = &args.audit_log {
                cmd.arg("--audit-log").arg(audit);
            }
            cmd.args(&args.extra);
        }
        cmd.stdout(log.try_clone().context("cloning the log handle")?)
            .stderr(log);
        let child = cmd
            .spawn()
            .context("spawning `eks-pod-identity-agent server`")?;

        let mut agent = Self {
            child: Some(child),
            node: node.clone(),
            log_path,
            probe_port: args.probe_port,
            metrics_port: args.metrics_port,
        };
        agent.wait_ready(args.ready_timeout)?;
        Ok(agent)
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last = String::from("no answer yet");
        while Instant::now() < deadline {
            if let Some(status) = self.exited()? {
                bail!(
                    "the agent exited ({status}) before becoming ready; log tail:\n{}",
                    self.log_tail(40)
                );
            }
            match self.probe("/readyz") {
                Ok(r) if r.status == 200 => return Ok(()),
                Ok(r) => last = format!("/readyz answered {}: {}", r.status, r.body_text()),
                Err(e) => last = format!("/readyz: {e:#}"),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!(
            "the agent was not ready after {timeout:?} ({last}); log tail:\n{}",
            self.log_tail(40)
        )
    }

    fn exited(&mut self) -> Result<Option<ExitStatus>> {
        match &mut self.child {
            Some(child) => child
                .try_wait()
                .context("checking whether the agent exited"),
            None => Ok(None),
        }
    }

    /// GET `path` on the probe port (`127.0.0.1:<probe-port>` inside the node).
    pub fn probe(&self, path: &str) -> Result<RawResponse> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.probe_port));
        http_get_in(self.node.netns(), addr, path, Duration::from_secs(2))
    }

    /// GET `/metrics` on the metrics port inside the node; fails unless 200.
    pub fn metrics(&self) -> Result<String> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.metrics_port));
        let r = http_get_in(self.node.netns(), addr, "/metrics", Duration::from_secs(2))?;
        if r.status != 200 {
            bail!("/metrics answered {}: {}", r.status, r.body_text());
        }
        Ok(r.body_text())
    }

    /// The value of one series of `/metrics` (see [`metric_value`]); 0 when the series is absent.
    pub fn metric(&self, series: &str) -> Result<f64> {
        Ok(metric_value(&self.metrics()?, series).unwrap_or(0.0))
    }

    /// GET `path` on the metrics port (`127.0.0.1:<metrics-port>` inside the node).
    pub fn metrics_port_get(&self, path: &str) -> Result<RawResponse> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.metrics_port));
        http_get_in(self.node.netns(), addr, path, Duration::from_secs(2))
    }

    /// Whether the agent process has exited (reaping it if so), with its status.
    pub fn try_exit_status(&mut self) -> Result<Option<ExitStatus>> {
        self.exited()
    }

    /// The agent's pid.
    #[must_use]
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Everything the agent wrote to stdout and stderr so far (JSON log lines).
    pub fn logs(&self) -> Result<String> {
        std::fs::read_to_string(&self.log_path)
            .with_context(|| format!("reading {}", self.log_path.display()))
    }

    /// The log's lines parsed as JSON (lines that are not JSON are skipped).
    pub fn log_records(&self) -> Result<Vec<serde_json::Value>> {
        Ok(self
            .logs()?
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect())
    }

    /// The log file's path.
    #[must_use]
    pub fn log_path(&self) -> &std::path::Path {
        &self.log_path
    }

    fn log_tail(&self, lines: usize) -> String {
        let logs = self.logs().unwrap_or_default();
        let all: Vec<&str> = logs.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Sends SIGTERM and waits (up to 10 s) for the agent to exit; returns its exit status.
    pub fn stop(mut self) -> Result<ExitStatus> {
        let Some(mut child) = self.child.take() else {
            bail!("the agent was already stopped")
        };
        let pid = Pid::from_raw(i32::try_from(child.id()).context("pid")?);
        kill(pid, Signal::SIGTERM).context("sending SIGTERM to the agent")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().context("waiting for the agent")? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "the agent did not exit within 10 s of SIGTERM; log tail:\n{}",
                    self.log_tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `nsenter --net=/run/netns/<ns> <wrapper…> <argv…>` with the agent's environment: test AWS credentials and
/// region, IMDS off, and nothing else `AWS_*` from the test process.
///
/// Not `ip netns exec`: that remounts /sys in a private mount namespace, which hides the cgroup2
/// mount the agent finds its cgroups (and attaches its programs) through. A host-network
/// DaemonSet pod sees the node's cgroup mount, and so does the agent here.
fn base_command(ns: &str, wrapper: &[OsString], argv: &[OsString], args: &AgentArgs) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{ns}"))
        .arg("--")
        .args(wrapper)
        .args(argv)
        .stdin(Stdio::null());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("AWS_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("AWS_REGION", crate::fake_eks_auth::REGION)
        .env("AWS_ACCESS_KEY_ID", "AKIAE2EAGENTTESTKEY0")
        .env("AWS_SECRET_ACCESS_KEY", "e2e-agent-test-secret")
        .env("AWS_EC2_METADATA_DISABLED", "true");
    cmd.envs(args.env.iter().map(|(k, v)| (k, v)));
    for key in &args.env_remove {
        cmd.env_remove(key);
    }
    cmd
}

/// Runs `<agent> initialize [args]` alone inside `netns` (with the agent's usual environment) and
/// returns its output, whatever its exit status.
pub fn run_initialize(netns: &NetNs, args: &[&str]) -> Result<std::process::Output> {
    let argv = [agent_bin()?.into_os_string(), "initialize".into()];
    base_command(netns.name(), &[], &argv, &AgentArgs::default())
        .args(args)
        .output()
        .context("running `eks-pod-identity-agent initialize`")
}

/// The value of one series in a Prometheus text exposition: `series` is the metric name with its
/// labels exactly as the exposition writes them (e.g. `pod_identity_cache_state{state="hit"}`).
/// `None` when the series is absent.
#[must_use]
pub fn metric_value(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let rest = line.strip_prefix(series)?;
        let value = rest.strip_prefix(' ')?;
        value.split_whitespace().next()?.parse().ok()
    })
}

/// `eks-pod-identity-agent audit who --json --access-key-id KEY --audit-log PATH`: each pod and
/// process that received the key, as the command prints them (one JSON object a line).
pub fn audit_who(
    audit_log: &std::path::Path,
    access_key_id: &str,
) -> Result<Vec<serde_json::Value>> {
    let out = std::process::Command::new(agent_bin()?)
        .args(["audit", "who", "--json", "--access-key-id", access_key_id])
        .arg("--audit-log")
        .arg(audit_log)
        .output()
        .context("running audit who")?;
    if !out.status.success() {
        bail!("audit who failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).context("an audit who line"))
        .collect()
}

/// The audit log's records (one JSON object a line); empty when the file does not exist yet.
pub fn read_audit_log(path: &std::path::Path) -> Result<Vec<serde_json::Value>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("audit line is not JSON: {l}")))
        .collect()
}

/// Waits until the audit log holds at least `count` records (the agent writes them from a queue,
/// a moment after the response), and returns them all.
pub fn wait_audit_records(
    path: &std::path::Path,
    count: usize,
    timeout: Duration,
) -> Result<Vec<serde_json::Value>> {
    let deadline = Instant::now() + timeout;
    loop {
        let records = read_audit_log(path)?;
        if records.len() >= count {
            return Ok(records);
        }
        if Instant::now() >= deadline {
            bail!(
                "the audit log {} holds {} record(s) after {timeout:?}, expected at least {count}",
                path.display(),
                records.len()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Writes (atomically, by rename) a shared credentials file with one `[default]` key pair.
pub fn write_credentials_file(path: &std::path::Path, key: &str, secret: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(
        &tmp,
        format!("[default]\naws_access_key_id = {key}\naws_secret_access_key = {secret}\n"),
    )
    .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}
