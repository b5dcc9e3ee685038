//! `cargo xtask bench`: the agent's request path under load, scenarios side by side in one run.
//!
//! A simulated node with one pod; `wrk` runs inside the pod (its netns and cgroup, so the eBPF
//! programs attribute its connections) against the agent on 169.254.170.23. Each scenario starts a
//! fresh agent with its own flags. The node-wide limit (1000 req/s by default, as the original) is
//! turned off so that the agent's capacity, not the limit, is measured.
//!
//! Then the connect path of connections that are NOT to the agent, which every process on a node
//! pays for once the programs are attached at the cgroup root: a loop inside the pod of TCP
//! connect/accept/close to a listener on the pod's loopback (connect4, sock_ops and sock_release
//! all run, and leave at their first compares) and of UDP `connect()`s (connect4 alone), with the
//! programs attached and with none; rounds alternate so that drift hits both alike.
//!
//! Then nginx serving the same body to the same pod, the cold bursts, and the footprint (start to
//! ready, RSS idle and with 2000 identities cached).
//!
//! Prints Markdown tables; `--out FILE` also writes them there. `BENCH_ONLY=footprint` measures
//! the footprint alone; `BENCH_ONLY=throughput` the wrk rows alone, and `BENCH_SCENARIOS` picks
//! rows by name.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd as _;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use e2e::agent::{AgentArgs, AgentProcess, start_fake_eks_auth_in};
use e2e::cluster_keys::ClusterKey;
use e2e::fake_kube_api;
use e2e::node::{Pod, PodSpec, SimNode};

const CLUSTER: &str = "bench-cluster";

/// Who serves a row: the agent, or nginx returning the agent's body from its configuration.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Server {
    Agent,
    Nginx,
}

/// One row of the comparison.
struct Scenario {
    name: &'static str,
    server: Server,
    /// Extra agent flags.
    agent: &'static [&'static str],
    /// `--audit-log` to a file in the node's directory (default rotation: 100 MiB, 5 backups).
    audit: bool,
    /// Attach the eBPF programs (at the node's cgroup root), or start the agent where they cannot attach.
    ebpf: bool,
    /// `Connection: close` on every request: one connection (and one attribution) per request.
    new_connection_per_request: bool,
    /// `--token-validation on`, with the cluster's keys from a Kubernetes API stand-in: new
    /// tokens' signatures are checked (every request's, without a cache).
    validation: bool,
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "cache hit, keep-alive, eBPF attribution on",
        server: Server::Agent,
        agent: &[],
        audit: false,
        ebpf: true,
        new_connection_per_request: false,
        validation: false,
    },
    Scenario {
        name: "cache hit, keep-alive, eBPF attribution off",
        server: Server::Agent,
        agent: &["--cgroup-root", "/nonexistent", "--token-binding", "off"],
        audit: false,
        ebpf: false,
        new_connection_per_request: false,
        validation: false,
    },
    Scenario {
        name: "cache hit, new connection per request, eBPF on",
        server: Server::Agent,
        agent: &[],
        audit: false,
        ebpf: true,
        new_connection_per_request: true,
        validation: false,
    },
    Scenario {
        name: "cache hit, new connection per request, eBPF off",
        server: Server::Agent,
        agent: &["--cgroup-root", "/nonexistent", "--token-binding", "off"],
        audit: false,
        ebpf: false,
        new_connection_per_request: true,
        validation: false,
    },
    Scenario {
        name: "no cache (--max-cache-size 0): EKS Auth every time, paced",
        server: Server::Agent,
        agent: &["--max-cache-size", "0"],
        audit: false,
        ebpf: true,
        new_connection_per_request: false,
        validation: false,
    },
    Scenario {
        name: "cache hit, keep-alive, eBPF on, token validation on",
        server: Server::Agent,
        agent: &[],
        audit: false,
        ebpf: true,
        new_connection_per_request: false,
        validation: true,
    },
    Scenario {
        name: "no cache, token validation on: a signature check and EKS Auth every time, paced",
        server: Server::Agent,
        agent: &["--max-cache-size", "0"],
        audit: false,
        ebpf: true,
        new_connection_per_request: false,
        validation: true,
    },
    Scenario {
        name: "cache hit, keep-alive, eBPF on, audit log on",
        server: Server::Agent,
        // The default size bound (100 MiB), with room for every rotated file of the run: all the
        // records are counted afterwards.
        agent: &["--audit-log-max-backups", "100"],
        audit: true,
        ebpf: true,
        new_connection_per_request: false,
        validation: false,
    },
    Scenario {
        name: "nginx, same body, keep-alive",
        server: Server::Nginx,
        agent: &[],
        audit: false,
        ebpf: false,
        new_connection_per_request: false,
        validation: false,
    },
    Scenario {
        name: "nginx, same body, new connection per request",
        server: Server::Nginx,
        agent: &[],
        audit: false,
        ebpf: false,
        new_connection_per_request: true,
        validation: false,
    },
];

/// Where nginx listens in the node (on every address, so also on the agent's).
const NGINX_PORT: u16 = 8080;

/// What wrk reported.
struct Measured {
    requests_per_sec: f64,
    p50: String,
    p99: String,
    non_2xx: u64,
    errors: String,
}

/// Connect-path rounds per mode (attached, not attached), and connects per round.
const CONNECT_ROUNDS: usize = 3;
const TCP_CONNECTS: u32 = 20_000;
const UDP_CONNECTS: u32 = 200_000;

/// The hidden subcommand the bench runs inside the pod for the connect path.
const CONNECT_LOOP_ARG: &str = "--connect-loop";

fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some(CONNECT_LOOP_ARG) {
        return match connect_loop() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("connect loop failed: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
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
    // Every row's token is signed with the cluster's key (RS256), which the EKS Auth stand-in
    // verifies, and which a Kubernetes API stand-in publishes for the rows that validate.
    let cluster_key = ClusterKey::fixture("rsa-1")?;
    fake.use_cluster_key(cluster_key.clone());
    let kube_api = fake_kube_api::start_in(node.netns())?;
    kube_api.set_jwks(Some(vec![cluster_key.jwk.clone()]));
    let kubeconfig = node.dir().join("bench-kubeconfig");
    kube_api.write_kubeconfig(&kubeconfig)?;
    let pod = node.add_pod(PodSpec::new("load-0", "bench", "loader"))?;
    fake.associate("bench", "loader", "loader-role");
    let token = fake.issue_token(&pod.token_spec())?;
    // `BENCH_ONLY=footprint`: that part alone, printed and not written (for working on memory).
    if std::env::var("BENCH_ONLY").as_deref() == Ok("footprint") {
        println!(
            "{}",
            footprint_table(&measure_footprints(&node, &fake, &pod)?)
        );
        return Ok(());
    }

    let mut rows = Vec::new();
    let mut nginx: Option<Nginx> = None;
    // `BENCH_SCENARIOS=nginx,audit`: only the rows whose names contain one of these (when working
    // on one path); the whole table otherwise.
    let only = std::env::var("BENCH_SCENARIOS").ok();
    let chosen = |s: &&Scenario| {
        only.as_deref()
            .is_none_or(|only| only.split(',').any(|part| s.name.contains(part)))
    };
    for scenario in SCENARIOS.iter().filter(chosen) {
        eprintln!("== {} ({seconds} s)", scenario.name);
        let url = match scenario.server {
            Server::Agent => "http://169.254.170.23/v1/credentials".to_owned(),
            Server::Nginx => {
                if nginx.is_none() {
                    nginx = Some(Nginx::start(&node, &pod, &fake, &token)?);
                }
                format!("http://169.254.170.23:{NGINX_PORT}/v1/credentials")
            }
        };
        let audit_path = node.dir().join("bench-audit.log");
        let agent = match scenario.server {
            Server::Nginx => None,
            Server::Agent => {
                let mut args = AgentArgs {
                    cgroup_root: scenario.ebpf,
                    ..AgentArgs::default()
                };
                if scenario.audit {
                    args = args.audit_log(&audit_path);
                }
                if scenario.validation {
                    args.env
                        .push(("KUBECONFIG".into(), kubeconfig.display().to_string()));
                    args = args
                        .args(["--token-validation", "on", "--state-dir"])
                        .args([node.dir().join("bench-state").display().to_string()]);
                }
                Some(AgentProcess::start(
                    &node,
                    &fake,
                    args.args(["--global-request-rate", "0"])
                        .args(scenario.agent.iter().copied()),
                )?)
            }
        };
        let calls_before = fake.calls();
        // Warm the cache (and the connection path) before measuring.
        wrk(&pod, &token, &url, scenario, 1)?;
        let measured = wrk(&pod, &token, &url, scenario, seconds)?;
        let upstream_calls = fake.calls() - calls_before;
        if let Some(agent) = agent {
            let dropped = agent
                .metric("pod_identity_audit_dropped_total")
                .unwrap_or(0.0);
            if scenario.validation {
                let verified = agent
                    .metric("pod_identity_local_validation{result=\"success\"}")
                    .unwrap_or(0.0);
                eprintln!("   signatures verified: {verified}");
            }
            agent.stop()?;
            if scenario.audit {
                let written = audit_lines(&audit_path)?;
                eprintln!("   audit: {written} records written, {dropped} dropped");
                remove_audit_files(&audit_path);
            }
        }
        rows.push((scenario, measured, upstream_calls));
    }
    drop(nginx);
    if std::env::var("BENCH_ONLY").as_deref() == Ok("throughput") {
        println!("{}", throughput_table(&rows, seconds));
        return Ok(());
    }

    eprintln!("== connect path of unrelated connections ({CONNECT_ROUNDS} rounds per mode)");
    let connect_path = measure_connect_path(&node, &fake, &pod)?;
    eprintln!("== time inside each program (kernel BPF run-time statistics, one more round)");
    let per_program = measure_program_run_time(&node, &fake, &pod)?;
    eprintln!(
        "== cold bursts: pods' first requests at once, EKS Auth limited to {BURST_EKS_AUTH_RATE}/s"
    );
    let bursts = measure_bursts(&node)?;
    eprintln!(
        "== footprint: start to ready, RSS idle and with {FOOTPRINT_IDENTITIES} identities cached ({FOOTPRINT_ROUNDS} rounds)"
    );
    let footprint = measure_footprints(&node, &fake, &pod)?;

    let mut table = throughput_table(&rows, seconds);
    table.push_str(&connect_path_table(&connect_path));
    table.push_str(&program_run_time_table(&per_program));
    table.push_str(&burst_table(&bursts));
    table.push_str(&footprint_table(&footprint));
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

/// The wrk rows, with each agent row's ratio to nginx in the same connection mode.
fn throughput_table(rows: &[(&Scenario, Measured, u64)], seconds: u64) -> String {
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
         nginx ({nginx_version}, {} worker processes, `return 200` of the agent's body from its configuration, no access log) \
         serves the same bytes from the same node to the same pod; \"vs nginx\" is the row's requests/s over nginx's in the same connection mode.\n\n\
         | scenario | requests/s | vs nginx | p50 | p99 | non-2xx | socket errors | EKS Auth calls |\n|---|---:|---:|---:|---:|---:|---|---:|\n",
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        nginx_version = nginx_version(),
    );
    let nginx_rps = |per_request: bool| {
        rows.iter()
            .find(|(s, _, _)| {
                s.server == Server::Nginx && s.new_connection_per_request == per_request
            })
            .map(|(_, m, _)| m.requests_per_sec)
    };
    for (scenario, m, calls) in rows {
        let ratio = match (
            scenario.server,
            nginx_rps(scenario.new_connection_per_request),
        ) {
            (Server::Agent, Some(n)) if n > 0.0 => format!("{:.2}×", m.requests_per_sec / n),
            (Server::Nginx, _) => "1.00×".to_owned(),
            _ => "-".to_owned(),
        };
        let calls = match scenario.server {
            Server::Agent => calls.to_string(),
            Server::Nginx => "-".to_owned(),
        };
        table.push_str(&format!(
            "| {} | {:.0} | {ratio} | {} | {} | {} | {} | {calls} |\n",
            scenario.name, m.requests_per_sec, m.p50, m.p99, m.non_2xx, m.errors
        ));
    }
    table
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

fn wrk(pod: &Pod, token: &str, url: &str, scenario: &Scenario, seconds: u64) -> Result<Measured> {
    let mut cmd = pod.command("wrk");
    cmd.args(["-t1", "-c16", "--latency", "--timeout", "2s"])
        .arg(format!("-d{seconds}s"))
        .arg("-H")
        .arg(format!("Authorization: {token}"));
    if scenario.new_connection_per_request {
        cmd.args(["-H", "Connection: close"]);
    }
    cmd.arg(url);
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

/// Median nanoseconds per operation, with the programs attached and without.
struct ConnectPath {
    tcp_on: Vec<u64>,
    tcp_off: Vec<u64>,
    udp_on: Vec<u64>,
    udp_off: Vec<u64>,
}

/// Runs the connect loop in the pod, alternating an agent with its programs attached at the
/// node's cgroup root and one without them.
fn measure_connect_path(
    node: &SimNode,
    fake: &e2e::fake_eks_auth::FakeEksAuth,
    pod: &Pod,
) -> Result<ConnectPath> {
    let exe = std::env::current_exe().context("the bench's own path")?;
    let exe = exe.to_string_lossy().into_owned();
    let mut path = ConnectPath {
        tcp_on: Vec::new(),
        tcp_off: Vec::new(),
        udp_on: Vec::new(),
        udp_off: Vec::new(),
    };
    for round in 0..CONNECT_ROUNDS * 2 {
        let attached = round % 2 == 0;
        let args = AgentArgs {
            cgroup_root: attached,
            ..AgentArgs::default()
        };
        let args = if attached {
            args
        } else {
            args.args(["--cgroup-root", "/nonexistent", "--token-binding", "off"])
        };
        let agent = AgentProcess::start(node, fake, args)?;
        let out = pod
            .command(&exe)
            .arg(CONNECT_LOOP_ARG)
            .output()
            .context("running the connect loop in the pod")?;
        agent.stop()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!(
                "connect loop failed: {}{text}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let mut numbers = text.split_whitespace().map(str::parse::<u64>);
        let (Some(Ok(tcp)), Some(Ok(udp))) = (numbers.next(), numbers.next()) else {
            bail!("unreadable connect loop output: {text}");
        };
        eprintln!(
            "   {}: TCP {tcp} ns, UDP {udp} ns",
            if attached { "attached" } else { "not attached" }
        );
        if attached {
            path.tcp_on.push(tcp);
            path.udp_on.push(udp);
        } else {
            path.tcp_off.push(tcp);
            path.udp_off.push(udp);
        }
    }
    Ok(path)
}

/// One attached program's average time per run, from the kernel's BPF run-time statistics.
struct ProgramRunTime {
    attach_type: &'static str,
    name: String,
    runs: u64,
    ns_per_run: u64,
}

/// One more round of the connect loop, with the programs attached and the kernel's BPF run-time
/// statistics on (`BPF_ENABLE_STATS`, for as long as its fd is open; they cost a clock read per
/// run, which is why the rounds above run without them): time spent inside each program.
fn measure_program_run_time(
    node: &SimNode,
    fake: &e2e::fake_eks_auth::FakeEksAuth,
    pod: &Pod,
) -> Result<Vec<ProgramRunTime>> {
    let exe = std::env::current_exe().context("the bench's own path")?;
    let agent = AgentProcess::start(node, fake, AgentArgs::default())?;
    let stats = bpf::enable_run_time_stats()?;
    let out = pod
        .command(&exe.to_string_lossy())
        .arg(CONNECT_LOOP_ARG)
        .output()
        .context("running the connect loop in the pod")?;
    if !out.status.success() {
        bail!(
            "connect loop failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut programs = Vec::new();
    for (attach_type, raw) in bpf::ATTACH_TYPES {
        for id in bpf::attached_program_ids(node.cgroup_root(), raw)? {
            let (name, run_time_ns, runs) = bpf::run_time(id)?;
            programs.push(ProgramRunTime {
                attach_type,
                name,
                runs,
                ns_per_run: run_time_ns.checked_div(runs).unwrap_or(0),
            });
        }
    }
    drop(stats);
    agent.stop()?;
    Ok(programs)
}

fn program_run_time_table(programs: &[ProgramRunTime]) -> String {
    let mut table = String::from(
        "\nTime inside each program over one more round of that loop (kernel BPF run-time \
         statistics; almost every run is an unrelated socket leaving at the first compares):\n\n\
         | attach point | program | runs | ns per run |\n|---|---|---:|---:|\n",
    );
    for p in programs {
        table.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            p.attach_type, p.name, p.runs, p.ns_per_run
        ));
    }
    table
}

/// Raw `bpf(2)` calls for the run-time statistics (the bench has no BPF library of its own).
mod bpf {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    use std::path::Path;

    use anyhow::{Context as _, Result, bail};

    /// `enum bpf_attach_type` values of the agent's programs.
    pub const ATTACH_TYPES: [(&str, u32); 4] = [
        ("cgroup/connect4", 10),
        ("cgroup/connect6", 11),
        ("sockops", 3),
        ("cgroup/sock_release", 34),
    ];

    const BPF_PROG_QUERY: libc::c_long = 16;
    const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    const BPF_ENABLE_STATS: libc::c_long = 32;

    /// `union bpf_attr`, large enough for every command used here (the kernel wants the rest 0).
    #[repr(C, align(8))]
    struct Attr([u8; 128]);

    impl Attr {
        fn new() -> Attr {
            Attr([0; 128])
        }
        fn put_u32(&mut self, at: usize, v: u32) -> &mut Self {
            self.0[at..at + 4].copy_from_slice(&v.to_ne_bytes());
            self
        }
        fn put_u64(&mut self, at: usize, v: u64) -> &mut Self {
            self.0[at..at + 8].copy_from_slice(&v.to_ne_bytes());
            self
        }
        fn u32_at(&self, at: usize) -> u32 {
            u32::from_ne_bytes(self.0[at..at + 4].try_into().unwrap_or_default())
        }
    }

    fn bpf(cmd: libc::c_long, attr: &mut Attr) -> Result<libc::c_long> {
        // SAFETY: `attr` is a live, zero-padded `bpf_attr` of the size passed; pointers in it point
        // to live buffers of the sizes given.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                std::ptr::from_mut(attr),
                std::mem::size_of::<Attr>(),
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error()).with_context(|| format!("bpf({cmd})"));
        }
        Ok(rc)
    }

    fn owned(fd: libc::c_long) -> Result<OwnedFd> {
        let fd = i32::try_from(fd).context("fd")?;
        // SAFETY: the kernel just returned this fd to us.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Statistics on until the returned fd is closed.
    pub fn enable_run_time_stats() -> Result<OwnedFd> {
        let mut attr = Attr::new();
        attr.put_u32(0, 0); // BPF_STATS_RUN_TIME
        owned(bpf(BPF_ENABLE_STATS, &mut attr)?)
    }

    /// Ids of the programs of one attach type attached directly at `dir`.
    pub fn attached_program_ids(dir: &Path, attach_type: u32) -> Result<Vec<u32>> {
        let cgroup = std::fs::File::open(dir).with_context(|| format!("{}", dir.display()))?;
        let mut ids = [0u32; 16];
        let mut attr = Attr::new();
        attr.put_u32(0, u32::try_from(cgroup.as_raw_fd())?)
            .put_u32(4, attach_type)
            .put_u64(16, ids.as_mut_ptr() as u64)
            .put_u32(24, 16);
        bpf(BPF_PROG_QUERY, &mut attr)?;
        let count = attr.u32_at(24) as usize;
        if count > ids.len() {
            bail!("{count} programs attached");
        }
        Ok(ids[..count].to_vec())
    }

    /// A program's name, total run time and run count.
    pub fn run_time(id: u32) -> Result<(String, u64, u64)> {
        let mut attr = Attr::new();
        attr.put_u32(0, id);
        let fd = owned(bpf(BPF_PROG_GET_FD_BY_ID, &mut attr)?)?;
        // `struct bpf_prog_info`: name at 64 (16 bytes), run_time_ns at 192, run_cnt at 200.
        let mut info = [0u8; 232];
        let mut attr = Attr::new();
        attr.put_u32(0, u32::try_from(fd.as_raw_fd())?)
            .put_u32(4, info.len() as u32)
            .put_u64(8, info.as_mut_ptr() as u64);
        bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
        let name = String::from_utf8_lossy(&info[64..80])
            .trim_end_matches('\0')
            .to_owned();
        let u64_at =
            |at: usize| u64::from_ne_bytes(info[at..at + 8].try_into().unwrap_or_default());
        Ok((name, u64_at(192), u64_at(200)))
    }
}

fn median(v: &[u64]) -> u64 {
    let mut v = v.to_vec();
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

fn connect_path_table(p: &ConnectPath) -> String {
    let row = |what: &str, on: &[u64], off: &[u64]| {
        let (m_on, m_off) = (median(on), median(off));
        let diff = i128::from(m_on) - i128::from(m_off);
        format!("| {what} | {m_off} | {m_on} | {diff:+} | {on:?} / {off:?} |\n")
    };
    format!(
        "\nConnect path of connections not to the agent, from the pod (ns per operation, median of \
         {CONNECT_ROUNDS} rounds; programs attached at the node's cgroup root, or none):\n\n\
         | operation | no programs | programs attached | difference | rounds (attached / none) |\n\
         |---|---:|---:|---:|---|\n{}{}",
        row(
            &format!(
                "TCP connect + accept + close to the pod's loopback ({TCP_CONNECTS} per round)"
            ),
            &p.tcp_on,
            &p.tcp_off
        ),
        row(
            &format!("UDP connect() ({UDP_CONNECTS} per round)"),
            &p.udp_on,
            &p.udp_off
        ),
    )
}

/// Inside the pod: a listener on the pod's loopback, then TCP connect/accept/close (the client
/// resets, so no TIME_WAIT piles up) and UDP `connect()`s. Prints ns per TCP cycle and per UDP
/// connect.
fn connect_loop() -> Result<()> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding a listener")?;
    let addr: SocketAddr = listener.local_addr()?;
    let tcp_round = |n: u32| -> Result<Duration> {
        let started = Instant::now();
        for _ in 0..n {
            let client = TcpStream::connect(addr).context("connect")?;
            let (server, _) = listener.accept().context("accept")?;
            reset_on_close(&client);
            drop(client);
            drop(server);
        }
        Ok(started.elapsed())
    };
    // Warm up caches and the socket allocator before measuring.
    tcp_round(1000)?;
    let tcp = tcp_round(TCP_CONNECTS)?;
    let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).context("binding a UDP socket")?;
    for _ in 0..1000 {
        udp.connect(addr)?;
    }
    let started = Instant::now();
    for _ in 0..UDP_CONNECTS {
        udp.connect(addr)?;
    }
    let udp_elapsed = started.elapsed();
    println!(
        "{} {}",
        tcp.as_nanos() / u128::from(TCP_CONNECTS),
        udp_elapsed.as_nanos() / u128::from(UDP_CONNECTS)
    );
    Ok(())
}

/// `SO_LINGER` 0: close sends a reset and leaves no TIME_WAIT socket holding the port.
fn reset_on_close(stream: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a `linger` of the size passed.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            std::ptr::from_ref(&linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// The cold bursts: pods at once.
const BURST_PODS: [usize; 2] = [300, 1000];
/// EKS Auth's limit in the bursts (calls per second, and its bucket) and its time per call.
const BURST_EKS_AUTH_RATE: f64 = 50.0;
const BURST_EKS_AUTH_BUCKET: f64 = 50.0;
const BURST_EKS_AUTH_LATENCY: Duration = Duration::from_millis(50);

/// Each burst on a fresh agent (the bench's flags: node-wide limit off) and a fresh EKS Auth
/// stand-in that throttles past [`BURST_EKS_AUTH_RATE`]; the pods are tokens fetched by botocore's
/// own container provider, one thread each (see `e2e::burst`).
fn measure_bursts(node: &SimNode) -> Result<Vec<e2e::burst::BurstReport>> {
    let most = BURST_PODS.iter().copied().max().unwrap_or(0);
    let clients: Vec<Pod> = (0..e2e::burst::client_pods_for(most))
        .map(|i| {
            node.add_pod(PodSpec::new(
                &format!("burst-client-{i}"),
                "burst",
                "client",
            ))
        })
        .collect::<Result<_>>()?;
    let mut reports = Vec::new();
    for (run, pods) in BURST_PODS.into_iter().enumerate() {
        let fake = start_fake_eks_auth_in(node.netns(), CLUSTER)?;
        fake.associate("burst", "burst-sa", "burst-role");
        let tokens = e2e::burst::write_burst_tokens(
            &fake,
            node,
            "burst",
            "burst-sa",
            pods,
            &node.dir().join(format!("burst-{run}")),
        )?;
        let agent = AgentProcess::start(
            node,
            &fake,
            AgentArgs::default().args(["--global-request-rate", "0"]),
        )?;
        fake.set_delay(BURST_EKS_AUTH_LATENCY);
        fake.set_rate_limit(Some((BURST_EKS_AUTH_RATE, BURST_EKS_AUTH_BUCKET)));
        let report = e2e::burst::run_burst(&clients, &fake, &tokens, Duration::from_secs(60))?;
        eprintln!("   {}", report.summary());
        agent.stop()?;
        reports.push(report);
    }
    Ok(reports)
}

fn burst_table(reports: &[e2e::burst::BurstReport]) -> String {
    let ms =
        |d: Option<Duration>| d.map_or_else(|| "-".to_owned(), |d| format!("{} ms", d.as_millis()));
    let mut table = format!(
        "\n\nCold bursts: that many pods ask for their first credentials at once, each with botocore's container \
         provider and its retry policy (3 attempts, 2 s timeout, 1 s apart; one thread, provider and token per pod, \
         {} pods per client process and client pod); EKS Auth accepts {BURST_EKS_AUTH_RATE}/s (a bucket of \
         {BURST_EKS_AUTH_BUCKET}) and takes {} ms a call, and answers `ThrottlingException` past its limit. \
         Calls and throttling are counted until the last SDK is done; the agent goes on fetching the tokens of pods \
         whose SDK gave up, so that their next attempt is a hit (\"every token issued\").\n\n\
         | pods | got credentials | attempts 1 / 2 / 3 | EKS Auth calls | throttled | p50 to credentials | p99 | max | every token issued after |\n\
         |---:|---:|---|---:|---:|---:|---:|---:|---:|\n",
        e2e::burst::THREADS_PER_CLIENT_POD,
        BURST_EKS_AUTH_LATENCY.as_millis(),
    );
    for r in reports {
        let [one, two, three] = r.attempts();
        table.push_str(&format!(
            "| {} | {} ({:.0}%) | {one} / {two} / {three} | {} | {} ({:.1}%) | {} | {} | {} | {} |\n",
            r.outcomes.len(),
            r.served(),
            100.0 * r.served() as f64 / r.outcomes.len().max(1) as f64,
            r.upstream_calls,
            r.throttled,
            100.0 * r.throttled_share(),
            ms(r.percentile(50)),
            ms(r.percentile(99)),
            ms(r.percentile(100)),
            ms(r.all_issued_after),
        ));
    }
    table
}

/// nginx in the node's network namespace, answering `GET /v1/credentials` with the body the agent
/// serves the bench pod (fetched once from the agent), as fast as nginx can: from its
/// configuration, no file, no access log, one worker per core.
struct Nginx {
    child: std::process::Child,
}

impl Nginx {
    fn start(
        node: &SimNode,
        pod: &Pod,
        fake: &e2e::fake_eks_auth::FakeEksAuth,
        token: &str,
    ) -> Result<Nginx> {
        which("nginx")?;
        let body = {
            let agent = AgentProcess::start(node, fake, AgentArgs::default())?;
            let request = e2e::clients::RawRequest::get("/v1/credentials")
                .host("169.254.170.23")
                .authorization(token)
                .to_bytes();
            let addr = SocketAddr::from((e2e::node::AGENT_V4, 80));
            let response = pod
                .netns()
                .run(|| e2e::clients::raw_http(addr, &request, Duration::from_secs(5)))??;
            agent.stop()?;
            if response.status != 200 {
                bail!("the agent answered {} to the bench pod", response.status);
            }
            response.body_text()
        };
        if body.contains('\'') || body.contains('\\') {
            bail!("the body cannot be quoted in nginx's configuration: {body:?}");
        }
        let dir = node.dir().join("nginx");
        std::fs::create_dir_all(dir.join("tmp"))?;
        let workers = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        let d = dir.display();
        let conf = format!(
            "daemon off;\nworker_processes {workers};\nuser root;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n  keepalive_requests 100000000;\n  keepalive_timeout 75s;\n\
             client_body_temp_path {d}/tmp; proxy_temp_path {d}/tmp; fastcgi_temp_path {d}/tmp;\n\
             uwsgi_temp_path {d}/tmp; scgi_temp_path {d}/tmp;\n\
             server {{\n    listen {NGINX_PORT};\n\
             location = /v1/credentials {{ default_type application/json; return 200 '{body}'; }}\n  }}\n}}\n"
        );
        std::fs::write(dir.join("nginx.conf"), conf)?;
        // The agent's address stays on the node's link after the agent stops.
        let child = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                node.netns().name(),
                "nginx",
                "-e",
                "stderr",
                "-p",
            ])
            .arg(&dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .stderr(std::fs::File::create(dir.join("stderr.log"))?)
            .spawn()
            .context("starting nginx")?;
        let nginx = Nginx { child };
        let addr = SocketAddr::from((e2e::node::AGENT_V4, NGINX_PORT));
        let request = e2e::clients::RawRequest::get("/v1/credentials")
            .host("169.254.170.23")
            .to_bytes();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let answer = pod
                .netns()
                .run(|| e2e::clients::raw_http(addr, &request, Duration::from_secs(1)))?;
            match answer {
                Ok(r) if r.status == 200 && r.body_text() == body => return Ok(nginx),
                Ok(r) => bail!("nginx answered {}: {}", r.status, r.body_text()),
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => {
                    let log = std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default();
                    return Err(e.context(format!("nginx did not answer; its log:\n{log}")));
                }
            }
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: fast shutdown of the master and its workers.
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let _ = self.child.wait();
    }
}

fn nginx_version() -> String {
    std::process::Command::new("nginx")
        .arg("-v")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stderr)
                .trim()
                .strip_prefix("nginx version: ")
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "nginx".to_owned())
}

/// The audit log and its rotated files (`PATH`, `PATH.1`, … up to the first missing one).
fn audit_files(path: &std::path::Path) -> Vec<std::path::PathBuf> {
    std::iter::once(path.to_path_buf())
        .chain((1..).map(|n| std::path::PathBuf::from(format!("{}.{n}", path.display()))))
        .take_while(|file| file.exists())
        .collect()
}

/// Lines in the audit log and its rotated files.
fn audit_lines(path: &std::path::Path) -> Result<usize> {
    let mut lines = 0;
    for file in audit_files(path) {
        let bytes = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
        lines += bytes.iter().filter(|b| **b == b'\n').count();
    }
    Ok(lines)
}

fn remove_audit_files(path: &std::path::Path) {
    for file in audit_files(path) {
        let _ = std::fs::remove_file(file);
    }
}

/// Identities cached for the loaded footprint, and rounds of the footprint measurement.
const FOOTPRINT_IDENTITIES: usize = 2000;
const FOOTPRINT_ROUNDS: usize = 3;

/// `/proc/<pid>/status` memory lines, in KiB.
#[derive(Clone, Copy, Default)]
struct Rss {
    total: u64,
    anon: u64,
    file: u64,
}

impl Rss {
    fn of(pid: u32) -> Result<Rss> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let kib = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .with_context(|| format!("no {key} in /proc/{pid}/status"))
        };
        Ok(Rss {
            total: kib("VmRSS:")?,
            anon: kib("RssAnon:")?,
            file: kib("RssFile:")?,
        })
    }
}

/// Where the image's static binary is, when the bench is given it (`cargo xtask bench` does).
const IMAGE_BIN_ENV: &str = "EKS_POD_IDENTITY_AGENT_IMAGE_BIN";

/// The footprint of the release binary (glibc), and of the image's (musl, mimalloc) when given.
fn measure_footprints(
    node: &SimNode,
    fake: &e2e::fake_eks_auth::FakeEksAuth,
    pod: &Pod,
) -> Result<Vec<(&'static str, Footprint)>> {
    let mut all = vec![(
        "release build (glibc, its malloc)",
        measure_footprint(node, fake, pod, None)?,
    )];
    if let Some(image_bin) = std::env::var_os(IMAGE_BIN_ENV) {
        let image = measure_footprint(node, fake, pod, Some(image_bin.into()))?;
        all.push(("image's binary (musl, static, mimalloc)", image));
    }
    Ok(all)
}

struct Footprint {
    ready_ms: Vec<f64>,
    idle: Vec<Rss>,
    loaded: Vec<Rss>,
    /// Tasks (threads) of the agent once loaded.
    threads: u64,
}

/// Start to ready (spawn of `server` to the first 200 of `/readyz`, polled every 2 ms), RSS once
/// ready and settled, and RSS with [`FOOTPRINT_IDENTITIES`] pods' tokens cached (each a distinct
/// pod of one association, fetched through the agent from the bench pod, 16 at a time).
fn measure_footprint(
    node: &SimNode,
    fake: &e2e::fake_eks_auth::FakeEksAuth,
    pod: &Pod,
    bin: Option<std::path::PathBuf>,
) -> Result<Footprint> {
    let tokens: Vec<Vec<u8>> = (0..FOOTPRINT_IDENTITIES)
        .map(|i| {
            let spec = e2e::fake_eks_auth::TokenSpec::new("bench", "loader")
                .pod(
                    &format!("footprint-{i}"),
                    &format!("00000000-0000-4000-8000-{i:012}"),
                )
                .node(node.name(), node.uid());
            let token = fake.issue_token(&spec)?;
            Ok(e2e::clients::RawRequest::get("/v1/credentials")
                .host("169.254.170.23")
                .authorization(&token)
                .to_bytes())
        })
        .collect::<Result<_>>()?;
    let mut footprint = Footprint {
        ready_ms: Vec::new(),
        idle: Vec::new(),
        loaded: Vec::new(),
        threads: 0,
    };
    for _ in 0..FOOTPRINT_ROUNDS {
        let args = AgentArgs {
            bin: bin.clone(),
            ..AgentArgs::default()
        };
        let (agent, ready) =
            AgentProcess::start_timed(node, fake, args.args(["--global-request-rate", "0"]))?;
        footprint.ready_ms.push(ready.as_secs_f64() * 1e3);
        let pid = agent.pid().context("the agent's pid")?;
        std::thread::sleep(Duration::from_secs(2));
        footprint.idle.push(Rss::of(pid)?);

        let next = std::sync::atomic::AtomicUsize::new(0);
        let addr = SocketAddr::from((e2e::node::AGENT_V4, 80));
        let failures: usize = pod.netns().run(|| {
            std::thread::scope(|scope| {
                let workers: Vec<_> = (0..16)
                    .map(|_| {
                        scope.spawn(|| {
                            let mut failed = 0;
                            loop {
                                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                let Some(request) = tokens.get(i) else {
                                    return failed;
                                };
                                // 429 while the admission path paces the cold fetches: ask again.
                                let deadline = Instant::now() + Duration::from_secs(60);
                                loop {
                                    match e2e::clients::raw_http(
                                        addr,
                                        request,
                                        Duration::from_secs(5),
                                    ) {
                                        Ok(r) if r.status == 200 => break,
                                        _ if Instant::now() < deadline => {
                                            std::thread::sleep(Duration::from_millis(100));
                                        }
                                        _ => {
                                            failed += 1;
                                            break;
                                        }
                                    }
                                }
                            }
                        })
                    })
                    .collect();
                workers.into_iter().map(|w| w.join().unwrap_or(1)).sum()
            })
        })?;
        if failures > 0 {
            bail!("{failures} of {FOOTPRINT_IDENTITIES} identities got no credentials");
        }
        let cached = agent.metric("pod_identity_cache_entries")?;
        if cached < FOOTPRINT_IDENTITIES as f64 {
            bail!("only {cached} of {FOOTPRINT_IDENTITIES} identities are cached");
        }
        std::thread::sleep(Duration::from_secs(2));
        footprint.loaded.push(Rss::of(pid)?);
        footprint.threads = std::fs::read_dir(format!("/proc/{pid}/task"))?.count() as u64;
        agent.stop()?;
    }
    Ok(footprint)
}

fn footprint_table(footprints: &[(&str, Footprint)]) -> String {
    let median = |mut v: Vec<f64>| -> f64 {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    let mib = |v: &[Rss], pick: fn(&Rss) -> u64| {
        median(v.iter().map(|r| pick(r) as f64 / 1024.0).collect())
    };
    let mut table = format!(
        "\n\nFootprint: the agent started by the harness with default flags and eBPF attached; medians of \
         {FOOTPRINT_ROUNDS} fresh agents per binary. Start to ready: `server` spawned to the first 200 of \
         `/readyz` (polled every 2 ms). RSS is `VmRSS` of `/proc/<pid>/status` 2 s after ready, and 2 s after \
         {FOOTPRINT_IDENTITIES} pods' tokens (one association, 1 KiB session tokens as STS issues) were fetched \
         and cached; in parentheses, anonymous memory (heap, stacks) + file-backed pages (the executable's \
         pages mapped, clean and shared with the page cache).\n\n\
         | binary | start to ready | RSS idle (anon + file) | RSS, {FOOTPRINT_IDENTITIES} identities cached (anon + file) | threads | rounds, idle / loaded (MiB) |\n\
         |---|---:|---:|---:|---:|---|\n"
    );
    for (name, f) in footprints {
        let rounds = |v: &[Rss]| {
            v.iter()
                .map(|r| format!("{:.1}", r.total as f64 / 1024.0))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let rss = |v: &[Rss]| {
            format!(
                "{:.1} MiB ({:.1} + {:.1})",
                mib(v, |r| r.total),
                mib(v, |r| r.anon),
                mib(v, |r| r.file)
            )
        };
        table.push_str(&format!(
            "| {name} | {:.0} ms | {} | {} | {} | {} / {} |\n",
            median(f.ready_ms.clone()),
            rss(&f.idle),
            rss(&f.loaded),
            f.threads,
            rounds(&f.idle),
            rounds(&f.loaded),
        ));
    }
    table
}
