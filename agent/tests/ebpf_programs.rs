//! The eBPF programs on the real kernel: attribution of v4, v6 and v4-mapped connects, filtering of
//! other destinations, the per-pod token bucket (shared by a pod's containers and their nested
//! cgroups), records that never outlive their connection nor go stale, the per-pod cap on open
//! connections, the limiter-less fallback, another sock_ops program's reply, and detaching on drop.
//!
//! Each test builds its own "node": a cgroup directory under the cgroup2 mount (the programs attach
//! there) with pod cgroups below it, and a network namespace holding an `ifb` link with the agent's
//! addresses and the test's listeners. Clients are `python3` processes that join a pod cgroup and
//! then `ip netns exec` into the node namespace. Needs root; under `CI=true` a missing privilege or
//! tool fails the test instead of skipping it. Every wait is bounded.

// Test helpers outside #[test] functions set up the kernel fixtures: failing loudly is their job.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{
    fs::File,
    io::{BufRead as _, BufReader, ErrorKind},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Output, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use nix::sched::{CloneFlags, setns};
use pod_identity_agent::ebpf::{
    AttachConfig, Callers, ConnectCounters, ConnectPrograms, DEFAULT_MAX_OPEN_PER_POD, Programs,
    TestSockOps, cgroup2_mount_root,
};

const AGENT_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 170, 23);
const AGENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x23);
/// Every name this suite creates starts with this, followed by the test process's pid.
const PREFIX: &str = "ebpf-test-";
/// The longest any client line or accept is waited for.
const WAIT: Duration = Duration::from_secs(10);

/// Connects `count` times and prints, per connect, `ok <local port>`, `eperm` or `refused`. Then,
/// by `mode`: `exit` (sockets close as the process exits), `server` (waits for the server to close
/// the first connection, or a minute), `stdin` (holds every socket until stdin closes).
const CLIENT: &str = r#"
import socket, sys
fam, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
count, mode = int(sys.argv[4]), sys.argv[5]
held = []
for _ in range(count):
    s = socket.socket(socket.AF_INET if fam == "4" else socket.AF_INET6, socket.SOCK_STREAM)
    try:
        s.connect((host, port))
        held.append(s)
        print("ok", s.getsockname()[1], flush=True)
    except PermissionError:
        print("eperm", flush=True)
    except ConnectionRefusedError:
        held.append(s)
        print("refused", flush=True)
if mode == "server" and held:
    held[0].settimeout(60)
    try:
        held[0].recv(1)
    except OSError:
        pass
elif mode == "stdin":
    sys.stdin.read()
"#;

/// Whether this test can run. Outside CI it may skip (returning false); under `CI=true` it fails.
fn privileged() -> bool {
    let missing = if nix::unistd::geteuid().is_root() {
        ["ip", "python3", "ss"]
            .into_iter()
            .find(|tool| Command::new(tool).arg("-V").output().is_err())
            .map(|tool| format!("{tool} not installed"))
    } else {
        Some("not root".to_owned())
    };
    match missing {
        None => true,
        Some(why) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("privileged eBPF test cannot run under CI: {why}")
        }
        Some(why) => {
            eprintln!("skipping privileged eBPF test: {why}");
            false
        }
    }
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn ip(args: &[&str]) {
    run(Command::new("ip").args(args));
}

/// Where a client connects: family (`4` or `6`), host, port.
type Dest<'a> = (&'a str, &'a str, u16);

/// One test's node: a cgroup subtree and a network namespace, removed on drop.
struct Node {
    name: String,
    cgroup: PathBuf,
    listeners: Listeners,
}

struct Listeners {
    /// The agent's port on both addresses.
    port: u16,
    v4: TcpListener,
    v6: TcpListener,
    /// Same address, another port: not watched.
    other_port: TcpListener,
    /// Another address (127.0.0.1), the agent's port: not watched.
    loopback: TcpListener,
}

impl Node {
    fn new() -> Node {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "{PREFIX}{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let mount = cgroup2_mount_root().expect("cgroup2 mount");
        remove_leftovers(&mount);

        let cgroup = mount.join(&name);
        std::fs::create_dir(&cgroup).expect("create test cgroup");
        for pod in ["pod-a", "pod-b"] {
            std::fs::create_dir(cgroup.join(pod)).expect("create pod cgroup");
        }
        ip(&["netns", "add", &name]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        ip(&["-n", &name, "link", "add", "agent0", "type", "ifb"]);
        ip(&["-n", &name, "link", "set", "agent0", "up"]);
        ip(&[
            "-n",
            &name,
            "addr",
            "add",
            "169.254.170.23/32",
            "dev",
            "agent0",
        ]);
        ip(&[
            "-n",
            &name,
            "addr",
            "add",
            "fd00:ec2::23/128",
            "dev",
            "agent0",
            "nodad",
        ]);
        let listeners = in_netns(&name, bind_listeners);
        Node {
            name,
            cgroup,
            listeners,
        }
    }

    /// A cgroup below the node's root (`a/b/c` creates the missing levels).
    fn cgroup(&self, path: &str) -> PathBuf {
        let dir = self.cgroup.join(path);
        std::fs::create_dir_all(&dir).expect("create cgroup");
        dir
    }

    fn config(&self, rate: u32, burst: u32) -> AttachConfig {
        let port = self.listeners.port;
        AttachConfig {
            cgroup_root: self.cgroup.clone(),
            targets: vec![
                SocketAddr::from((AGENT_V4, port)),
                SocketAddr::from((AGENT_V6, port)),
            ],
            connect_rate: rate,
            connect_burst: burst,
            // Each cgroup directly below the node's root is a pod; callers in the root itself
            // are outside pods.
            pod_parents: vec![self.cgroup.clone()],
            max_open_per_pod: DEFAULT_MAX_OPEN_PER_POD,
            max_pods: 16,
        }
    }

    fn attach(&self, rate: u32, burst: u32) -> Programs {
        attach(&self.config(rate, burst))
    }

    /// A `python3` client in the cgroup at `cgroup` (relative to the node's root) and this node's
    /// netns (see [`CLIENT`]).
    fn client(&self, cgroup: &str, (family, host, port): Dest, count: u32, mode: &str) -> Client {
        let procs = self.cgroup(cgroup).join("cgroup.procs");
        // Join the cgroup first, then exec: the pid (and so the cgroup) survives both execs.
        let script = format!(
            "echo $$ > {} && exec ip netns exec {} python3 -c \"$0\" {family} {host} {port} {count} {mode}",
            procs.display(),
            self.name,
        );
        let mut child = Command::new("sh")
            .args(["-c", &script, CLIENT])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn client");
        let stdout = child.stdout.take().expect("client stdout");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Client {
            stdin: child.stdin.take(),
            child,
            lines,
        }
    }

    fn v4(&self) -> Dest<'static> {
        ("4", "169.254.170.23", self.listeners.port)
    }

    fn v6(&self) -> Dest<'static> {
        ("6", "fd00:ec2::23", self.listeners.port)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        remove_cgroup_tree(&self.cgroup);
    }
}

fn attach(cfg: &AttachConfig) -> Programs {
    Programs::load_and_attach(cfg).expect("load and attach")
}

/// A running client; its stdout lines arrive on a channel so that every read is bounded.
struct Client {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl Client {
    /// The client's next `ok <port>` / `eperm` / `refused` line.
    fn line(&self) -> String {
        self.lines
            .recv_timeout(WAIT)
            .unwrap_or_else(|e| panic!("no line from the client within {WAIT:?}: {e}"))
    }

    /// The next `count` outcomes, first word only.
    fn outcomes(&self, count: usize) -> Vec<String> {
        (0..count)
            .map(|_| self.line().split(' ').next().unwrap_or("").to_owned())
            .collect()
    }

    /// Closes stdin (a `stdin` client lets go of its sockets and exits) and waits for the exit.
    fn finish(mut self) -> Vec<String> {
        drop(self.stdin.take());
        let deadline = Instant::now() + WAIT;
        loop {
            match self.child.try_wait().expect("wait client") {
                Some(status) => {
                    let mut stderr = String::new();
                    if let Some(mut e) = self.child.stderr.take() {
                        let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
                    }
                    assert!(status.success(), "client failed: {stderr}");
                    return self.lines.try_iter().collect();
                }
                None if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
                None => {
                    let _ = self.child.kill();
                    panic!("client still running after {WAIT:?}");
                }
            }
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The outcomes of a client that connects `count` times and exits.
fn outcomes_of(client: Client, count: usize) -> Vec<String> {
    let outcomes = client.outcomes(count);
    client.finish();
    outcomes
}

fn bind_listeners() -> Listeners {
    let v4 = TcpListener::bind((AGENT_V4, 0)).expect("bind v4 listener");
    let port = v4.local_addr().expect("local addr").port();
    let listeners = Listeners {
        port,
        v4,
        v6: TcpListener::bind((AGENT_V6, port)).expect("bind v6 listener"),
        other_port: TcpListener::bind((AGENT_V4, 0)).expect("bind other-port listener"),
        loopback: TcpListener::bind((Ipv4Addr::LOCALHOST, port)).expect("bind loopback listener"),
    };
    for l in [
        &listeners.v4,
        &listeners.v6,
        &listeners.other_port,
        &listeners.loopback,
    ] {
        l.set_nonblocking(true).expect("nonblocking listener");
    }
    listeners
}

/// Run `f` on a thread that entered the named netns: sockets it creates stay in that netns.
fn in_netns<T: Send + 'static>(name: &str, f: fn() -> T) -> T {
    let path = Path::new("/run/netns").join(name);
    thread::spawn(move || {
        let ns = File::open(&path).expect("open netns");
        setns(&ns, CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
    .join()
    .expect("netns thread")
}

/// Remove what a crashed earlier run of this suite left: names with our prefix and a dead pid.
fn remove_leftovers(mount: &Path) {
    let stale = |name: &str| {
        name.strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_some_and(|pid| {
                pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists()
            })
    };
    for entry in std::fs::read_dir(mount).into_iter().flatten().flatten() {
        if stale(&entry.file_name().to_string_lossy()) {
            remove_cgroup_tree(&entry.path());
        }
    }
    for entry in std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        if stale(&name) {
            let _ = Command::new("ip").args(["netns", "del", &name]).output();
        }
    }
}

/// Kill what is left in a cgroup subtree and remove it, deepest first.
fn remove_cgroup_tree(dir: &Path) {
    let _ = std::fs::write(dir.join("cgroup.kill"), "1");
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_cgroup_tree(&entry.path());
        }
    }
    // Killed processes take a moment to leave the cgroup.
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::remove_dir(dir).is_err() && Instant::now() < deadline && dir.exists() {
        thread::sleep(Duration::from_millis(20));
    }
}

fn accept(listener: &TcpListener) -> (TcpStream, SocketAddr) {
    let deadline = Instant::now() + WAIT;
    loop {
        match listener.accept() {
            Ok(accepted) => return accepted,
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

fn inode(path: &Path) -> u64 {
    std::fs::metadata(path).expect("stat cgroup").ino()
}

/// Polls `f` until it holds or [`WAIT`] passes.
fn eventually(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within {WAIT:?}");
        thread::sleep(Duration::from_millis(10));
    }
}

fn counters_of(programs: &Programs, cgroup: &Path) -> Option<ConnectCounters> {
    let id = inode(cgroup);
    programs
        .connect_counters()
        .expect("counters")
        .into_iter()
        .find(|(key, _)| *key == id)
        .map(|(_, c)| c)
}

/// Connect once from `cgroup`, accept on `listener`, and return what `Callers::lookup` says. Then
/// the connection ends, and its record with it.
fn connect_and_take(
    node: &Node,
    callers: &Callers,
    cgroup: &str,
    dest: Dest,
    listener: &TcpListener,
) -> (u32, Option<pod_identity_agent::ebpf::Caller>) {
    let client = node.client(cgroup, dest, 1, "server");
    let pid = client.child.id();
    let (stream, peer) = accept(listener);
    let local = stream.local_addr().expect("local addr");
    let caller = callers.lookup(peer, local);
    assert_eq!(client.outcomes(1), ["ok"]);
    drop(stream);
    client.finish();
    // The client closed its socket: the kernel deleted the record.
    eventually("record released after close", || {
        callers.lookup(peer, local).is_none()
    });
    (pid, caller)
}

#[test]
fn records_the_caller_of_v4_v6_and_v4_mapped_connects() {
    if !privileged() {
        return;
    }
    let node = Node::new();
    let programs = node.attach(0, 0);
    let callers = programs.callers();
    let l = &node.listeners;
    let pod_a = inode(&node.cgroup("pod-a"));

    for (dest, listener) in [
        (node.v4(), &l.v4),
        (node.v6(), &l.v6),
        (("6", "::ffff:169.254.170.23", l.port), &l.v4),
    ] {
        let (pid, caller) = connect_and_take(&node, &callers, "pod-a", dest, listener);
        let caller = caller.unwrap_or_else(|| panic!("no caller recorded for {dest:?}"));
        assert_eq!(caller.cgroup_id, pod_a, "{dest:?}");
        assert_eq!(caller.pid, pid, "{dest:?}");
        assert_eq!(caller.tid, pid, "single-threaded client: {dest:?}");
        assert_eq!(caller.uid, 0, "{dest:?}");
        assert_eq!(&*caller.comm, "python3", "{dest:?}");
        assert_ne!(caller.netns_cookie, 0, "{dest:?}");
    }

    let other = l.other_port.local_addr().expect("addr").port();
    for (dest, listener) in [
        (("4", "169.254.170.23", other), &l.other_port),
        (("4", "127.0.0.1", l.port), &l.loopback),
    ] {
        let (_, caller) = connect_and_take(&node, &callers, "pod-a", dest, listener);
        assert_eq!(caller, None, "{dest:?} is not the agent");
    }
    assert!(programs.connect_limiter(), "this kernel runs the limiter");
    assert_eq!(
        counters_of(&programs, &node.cgroup("pod-a")),
        Some(ConnectCounters::default()),
        "every connection closed, none counted open; rate 0: no token bucket state"
    );
}

#[test]
fn token_bucket_refuses_a_flood_but_not_another_cgroup() {
    if !privileged() {
        return;
    }
    let node = Node::new();
    let programs = node.attach(1, 3);

    let flood = outcomes_of(node.client("pod-a", node.v4(), 10, "exit"), 10);
    let ok = flood.iter().filter(|o| *o == "ok").count() as u64;
    let eperm = flood.iter().filter(|o| *o == "eperm").count() as u64;
    assert_eq!(ok + eperm, 10, "{flood:?}");
    // The burst, plus one more if the flood straddled a one-second refill.
    assert!((3..=4).contains(&ok), "{flood:?}");

    let other = outcomes_of(node.client("pod-b", node.v6(), 1, "exit"), 1);
    assert_eq!(other, ["ok"], "another cgroup has its own bucket");

    let of = |pod: &str| counters_of(&programs, &node.cgroup(pod));
    assert_eq!(
        of("pod-a"),
        Some(ConnectCounters {
            allowed: ok,
            denied: eperm,
            open: 0,
        })
    );
    assert_eq!(
        of("pod-b"),
        Some(ConnectCounters {
            allowed: 1,
            denied: 0,
            open: 0,
        })
    );
}

/// Kubelet's shape (cgroupfs driver names) under the node root: `kubepods/burstable/pod-a` with two
/// containers and a cgroup nested in one, `kubepods/burstable/pod-b`, and a Guaranteed pod
/// `kubepods/pod-g` directly under `kubepods`. `besteffort` does not exist when the programs attach.
#[test]
fn a_pods_containers_and_their_nested_cgroups_share_one_connect_budget() {
    if !privileged() {
        return;
    }
    let node = Node::new();
    let kubepods = node.cgroup("kubepods");
    let burstable = node.cgroup("kubepods/burstable");
    for c in [
        "kubepods/burstable/pod-a/c1/nested",
        "kubepods/burstable/pod-a/c2",
        "kubepods/burstable/pod-b/c1",
        "kubepods/pod-g/c1",
        "kubepods/pod-g/c2",
    ] {
        node.cgroup(c);
    }
    let besteffort = node.cgroup.join("kubepods/besteffort");
    let programs = attach(&AttachConfig {
        // Shallow first on purpose: the mechanism orders them deepest first.
        pod_parents: vec![kubepods.clone(), burstable.clone(), besteffort.clone()],
        ..node.config(1, 3)
    });

    // Six connects from pod-a's three cgroups: the pod's burst of 3 (4 across a refill), no more.
    let mut pod_a = Vec::new();
    for c in [
        "kubepods/burstable/pod-a/c1",
        "kubepods/burstable/pod-a/c2",
        "kubepods/burstable/pod-a/c1/nested",
    ] {
        pod_a.extend(outcomes_of(node.client(c, node.v4(), 2, "exit"), 2));
    }
    let ok = pod_a.iter().filter(|o| *o == "ok").count();
    assert!((3..=4).contains(&ok), "pod-a shares one budget: {pod_a:?}");
    assert_eq!(
        pod_a.iter().filter(|o| *o == "eperm").count(),
        6 - ok,
        "{pod_a:?}"
    );

    // Its neighbours have their own: a Burstable pod, and a Guaranteed one (not charged to
    // `kubepods` as a whole, and its two containers shared).
    let pod_b = outcomes_of(
        node.client("kubepods/burstable/pod-b/c1", node.v6(), 1, "exit"),
        1,
    );
    assert_eq!(pod_b, ["ok"]);
    let mut pod_g = outcomes_of(node.client("kubepods/pod-g/c1", node.v4(), 2, "exit"), 2);
    pod_g.extend(outcomes_of(
        node.client("kubepods/pod-g/c2", node.v4(), 2, "exit"),
        2,
    ));
    let ok_g = pod_g.iter().filter(|o| *o == "ok").count();
    assert!(
        (3..=4).contains(&ok_g),
        "pod-g shares one budget: {pod_g:?}"
    );

    // The kernel's counters are the pods', not the containers'.
    let of = |p: &str| counters_of(&programs, &node.cgroup.join(p));
    let a = of("kubepods/burstable/pod-a").expect("pod-a counted");
    assert_eq!((a.allowed, a.denied), (ok as u64, 6 - ok as u64));
    assert!(of("kubepods/burstable/pod-a/c1").is_none());
    assert!(of("kubepods/burstable/pod-a/c1/nested").is_none());
    assert!(of("kubepods/burstable").is_none());
    assert_eq!(of("kubepods/burstable/pod-b").map(|c| c.allowed), Some(1));
    assert_eq!(of("kubepods/pod-g").map(|c| c.allowed), Some(ok_g as u64));

    // A parent that appears later is picked up: before the refresh a BestEffort pod would be
    // charged as `kubepods/besteffort` (a child of `kubepods`), after it as itself.
    assert!(!programs.refresh_pod_parents().unwrap(), "nothing new yet");
    node.cgroup("kubepods/besteffort/pod-e/c1");
    node.cgroup("kubepods/besteffort/pod-e/c2");
    assert!(programs.refresh_pod_parents().unwrap());
    let mut pod_e = outcomes_of(
        node.client("kubepods/besteffort/pod-e/c1", node.v4(), 2, "exit"),
        2,
    );
    pod_e.extend(outcomes_of(
        node.client("kubepods/besteffort/pod-e/c2", node.v4(), 2, "exit"),
        2,
    ));
    assert!(
        (3..=4).contains(&pod_e.iter().filter(|o| *o == "ok").count()),
        "{pod_e:?}"
    );
    assert!(of("kubepods/besteffort/pod-e").is_some());
    assert!(of("kubepods/besteffort").is_none());
}

#[test]
fn a_record_never_outlives_its_connection_nor_its_ttl() {
    if !privileged() {
        return;
    }
    let node = Node::new();
    let programs = node.attach(0, 0);
    let callers = programs.callers();
    let l = &node.listeners;
    let pod_a = node.cgroup("pod-a");

    // Too old when read: refused by the TTL, though the connection is live and the record there.
    let client = node.client("pod-a", node.v4(), 1, "stdin");
    assert_eq!(client.outcomes(1), ["ok"]);
    let (stream, peer) = accept(&l.v4);
    let local = stream.local_addr().unwrap();
    thread::sleep(Duration::from_millis(300));
    let short = callers.clone().with_ttl(Duration::from_millis(100));
    assert_eq!(
        short.lookup(peer, local),
        None,
        "a stale record is not handed out"
    );
    assert!(
        callers.lookup(peer, local).is_some(),
        "within the default TTL"
    );
    assert_eq!(counters_of(&programs, &pod_a).map(|c| c.open), Some(1));
    client.finish();
    drop(stream);
    eventually("record released", || callers.lookup(peer, local).is_none());

    // Closed before the agent accepted it: released at close(), before the handshake's end is
    // even done, so a later connection on the same 4-tuple cannot inherit it.
    let client = node.client("pod-a", node.v4(), 1, "exit");
    let line = client.line();
    let port: u16 = line
        .strip_prefix("ok ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    client.finish();
    let peer = SocketAddr::from((AGENT_V4, port));
    let local = SocketAddr::from((AGENT_V4, l.port));
    assert_eq!(callers.lookup(peer, local), None, "released at close");
    let (stream, accepted_peer) = accept(&l.v4);
    assert_eq!(accepted_peer, peer);
    assert_eq!(callers.lookup(accepted_peer, local), None);
    drop(stream);
    assert_eq!(counters_of(&programs, &pod_a).map(|c| c.open), Some(0));

    // Never reached a listener (refused): released when the socket entered TCP_CLOSE, while the
    // client still holds it.
    let closed = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).unwrap();
    let free_port = closed.local_addr().unwrap().port();
    drop(closed);
    let refused_node = attach(&AttachConfig {
        targets: vec![SocketAddr::from((AGENT_V4, free_port))],
        ..node.config(0, 0)
    });
    let client = node.client("pod-b", ("4", "169.254.170.23", free_port), 3, "stdin");
    assert_eq!(client.outcomes(3), ["refused", "refused", "refused"]);
    assert_eq!(
        counters_of(&refused_node, &node.cgroup("pod-b")).map(|c| c.open),
        Some(0),
        "refused connections are not left counted (nor recorded) while their sockets live"
    );
    let events = refused_node.kernel_events().unwrap();
    assert_eq!(events.conn_record_failed, 0, "{events:?}");
    client.finish();
}

/// The state callback that releases records at TCP_CLOSE is a per-socket flag; a careless
/// sock_ops program can clear it. Records are then still released when the socket is released.
#[test]
fn records_are_released_at_close_even_when_another_program_clears_our_callback() {
    if !privileged() {
        return;
    }
    let node = Node::new();
    let _theirs = TestSockOps::attach(&node.cgroup).expect("attach the test sock_ops program");
    let programs = node.attach(0, 0);
    let callers = programs.callers();
    let l = &node.listeners;
    let pod_a = node.cgroup("pod-a");

    let client = node.client("pod-a", node.v4(), 2, "stdin");
    assert_eq!(client.outcomes(2), ["ok", "ok"]);
    let (first, peer) = accept(&l.v4);
    let local = first.local_addr().unwrap();
    assert!(callers.lookup(peer, local).is_some());
    assert_eq!(counters_of(&programs, &pod_a).map(|c| c.open), Some(2));
    // Both close (one accepted, one not): no TCP_CLOSE callback any more, the release sees them.
    client.finish();
    assert_eq!(callers.lookup(peer, local), None);
    assert_eq!(counters_of(&programs, &pod_a).map(|c| c.open), Some(0));
    drop(first);
}

#[test]
fn a_pod_at_its_open_connection_cap_is_refused_alone() {
    if !privileged() {
        return;
    }
    let node = Node::new();
    let programs = attach(&AttachConfig {
        max_open_per_pod: 3,
        ..node.config(0, 0)
    });
    let callers = programs.callers();
    let l = &node.listeners;

    // pod-a holds 3 connections the agent never accepts; its 4th and 5th connects are refused.
    let hog = node.client("pod-a", node.v4(), 5, "stdin");
    assert_eq!(hog.outcomes(5), ["ok", "ok", "ok", "eperm", "eperm"]);
    let a = counters_of(&programs, &node.cgroup("pod-a")).unwrap();
    assert_eq!((a.open, a.denied), (3, 2));

    // Its neighbour is unaffected, and its record is there (pod-a's cannot push it out).
    let neighbour = node.client("pod-b", node.v6(), 1, "stdin");
    assert_eq!(neighbour.outcomes(1), ["ok"]);
    let (stream, peer) = accept(&l.v6);
    let local = stream.local_addr().unwrap();
    let caller = callers
        .lookup(peer, local)
        .expect("pod-b's connection is attributed");
    assert_eq!(caller.cgroup_id, inode(&node.cgroup("pod-b")));
    drop(stream);

    // pod-a lets go: it may connect again.
    hog.finish();
    eventually("pod-a's connections uncounted", || {
        counters_of(&programs, &node.cgroup("pod-a")).map(|c| c.open) == Some(0)
    });
    assert_eq!(
        outcomes_of(node.client("pod-a", node.v4(), 1, "exit"), 1),
        ["ok"]
    );
    neighbour.finish();
    assert!(programs.kernel_events().unwrap().open_cap_refused >= 2);
}

/// A node user's many cgroups are one key: together they hold at most one cap of connections.
#[test]
fn callers_outside_pods_share_one_open_connection_cap() {
    if !privileged() {
        return;
    }
    let node = Node::new();
    let programs = attach(&AttachConfig {
        pod_parents: vec![node.cgroup("kubepods")],
        max_open_per_pod: 3,
        ..node.config(0, 0)
    });
    let first = node.client("user.slice/app.slice/atk0", node.v4(), 2, "stdin");
    assert_eq!(first.outcomes(2), ["ok", "ok"]);
    let second = node.client("user.slice/app.slice/atk1", node.v6(), 2, "stdin");
    assert_eq!(second.outcomes(2), ["ok", "eperm"], "one budget for both");
    let third = node.client("system.slice/other", node.v4(), 1, "stdin");
    assert_eq!(third.outcomes(1), ["eperm"]);
    // A pod has its own.
    let pod = node.client("kubepods/pod-x", node.v4(), 3, "stdin");
    assert_eq!(pod.outcomes(3), ["ok", "ok", "ok"]);
    let shared = programs
        .connect_counters()
        .unwrap()
        .into_iter()
        .find(|(key, _)| *key == agent_common::NON_POD_KEY)
        .map(|(_, c)| c)
        .expect("the non-pod key is counted");
    assert_eq!((shared.open, shared.denied), (3, 2));
    assert!(
        programs
            .prune_connect_state(|_| false)
            .unwrap()
            .open_counters
            >= 1,
        "the pod's counter is pruned when it looks gone"
    );
    assert!(
        programs
            .connect_counters()
            .unwrap()
            .iter()
            .any(|(key, _)| *key == agent_common::NON_POD_KEY),
        "the non-pod key never is"
    );
    for c in [first, second, third, pod] {
        c.finish();
    }
}

/// The agent closing its end ends the connection for the record, whatever the client does with
/// its socket (`CLOSE_WAIT`).
#[test]
fn a_record_goes_when_the_agent_closes_while_the_client_holds_its_socket() {
    if !privileged() {
        return;
    }
    let node = Node::new();
    let programs = node.attach(0, 0);
    let callers = programs.callers();
    let pod_a = node.cgroup("pod-a");
    let client = node.client("pod-a", node.v4(), 1, "stdin");
    assert_eq!(client.outcomes(1), ["ok"]);
    let (stream, peer) = accept(&node.listeners.v4);
    let local = stream.local_addr().unwrap();
    assert!(callers.lookup(peer, local).is_some());
    drop(stream);
    eventually("record released at CLOSE_WAIT", || {
        callers.lookup(peer, local).is_none()
    });
    assert_eq!(counters_of(&programs, &pod_a).map(|c| c.open), Some(0));
    client.finish();
}

#[test]
fn pruning_a_live_pods_counter_never_drives_it_below_zero() {
    if !privileged() {
        return;
    }
    let node = Node::new();
    let programs = node.attach(0, 0);
    let pod_a = node.cgroup("pod-a");

    let first = node.client("pod-a", node.v4(), 2, "stdin");
    assert_eq!(first.outcomes(2), ["ok", "ok"]);
    assert_eq!(counters_of(&programs, &pod_a).map(|c| c.open), Some(2));
    // A wrong answer from userspace: every pod "gone".
    let pruned = programs.prune_connect_state(|_| false).unwrap();
    assert_eq!(pruned.open_counters, 1);
    assert_eq!(counters_of(&programs, &pod_a), None);

    let second = node.client("pod-a", node.v4(), 1, "stdin");
    assert_eq!(second.outcomes(1), ["ok"]);
    assert_eq!(counters_of(&programs, &pod_a).map(|c| c.open), Some(1));
    // The two older connections close: they were counted in the removed counter, not this one.
    first.finish();
    thread::sleep(Duration::from_millis(100));
    assert_eq!(counters_of(&programs, &pod_a).map(|c| c.open), Some(1));
    second.finish();
    eventually("the new counter back to 0", || {
        counters_of(&programs, &pod_a).map(|c| c.open) == Some(0)
    });
    // A right answer keeps it.
    let pruned = programs.prune_connect_state(|_| true).unwrap();
    assert_eq!((pruned.buckets, pruned.open_counters), (0, 0));
}

#[test]
fn the_limiter_less_fallback_loads_and_attributes() {
    if !privileged() {
        return;
    }
    let node = Node::new();
    let programs =
        Programs::load_and_attach_with(&node.config(1, 1), ConnectPrograms::NoLimiter).unwrap();
    assert!(!programs.connect_limiter());
    let flood = outcomes_of(node.client("pod-a", node.v4(), 5, "exit"), 5);
    assert_eq!(flood, ["ok"; 5], "no token bucket in the fallback");
    let callers = programs.callers();
    let (pid, caller) = connect_and_take(&node, &callers, "pod-b", node.v6(), &node.listeners.v6);
    let caller = caller.expect("attributed");
    assert_eq!(
        (caller.pid, caller.cgroup_id),
        (pid, inode(&node.cgroup("pod-b")))
    );
    assert_eq!(
        counters_of(&programs, &node.cgroup("pod-a")).map(|c| (c.allowed, c.denied)),
        Some((0, 0)),
        "no bucket state kept, only the open-connection counter"
    );
}

/// A sock_ops program of someone else's sets the initial SYN timeout (the `reply` of
/// `BPF_SOCK_OPS_TIMEOUT_INIT`); ours, attached at the same cgroup, must not void it. Seen from
/// userspace as the RTO of a connect that gets no answer: 120 s (`TCP_RTO_MAX`) instead of 1 s.
#[test]
fn another_sock_ops_programs_reply_is_honoured() {
    if !privileged() {
        return;
    }
    let node = Node::new();
    // Packets to this prefix leave through the ifb link, which drops them: the SYN goes unanswered.
    ip(&[
        "-n",
        &node.name,
        "route",
        "add",
        "10.253.0.0/24",
        "dev",
        "agent0",
    ]);
    let _theirs = TestSockOps::attach(&node.cgroup).expect("attach the test sock_ops program");
    let _ours = node.attach(0, 0);

    let client = node.client("pod-a", ("4", "10.253.0.1", 9), 1, "exit");
    let rto = {
        let deadline = Instant::now() + WAIT;
        loop {
            let out = run(Command::new("ip").args([
                "netns",
                "exec",
                &node.name,
                "ss",
                "-tin",
                "state",
                "syn-sent",
                "dst",
                "10.253.0.1",
            ]));
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            if let Some(rto) = text.split_whitespace().find_map(|w| w.strip_prefix("rto:")) {
                break rto.to_owned();
            }
            assert!(Instant::now() < deadline, "no SYN_SENT socket: {text}");
            thread::sleep(Duration::from_millis(20));
        }
    };
    assert_eq!(rto, "120000", "the other program's SYN timeout applies");
    drop(client);
}

#[test]
fn dropping_programs_detaches_them() {
    if !privileged() {
        return;
    }
    let node = Node::new();
    let programs = node.attach(0, 0);
    let callers = programs.callers();
    let l = &node.listeners;

    let (_, caller) = connect_and_take(&node, &callers, "pod-b", node.v4(), &l.v4);
    assert_eq!(
        caller.map(|c| c.cgroup_id),
        Some(inode(&node.cgroup("pod-b")))
    );

    drop(programs);
    let (_, caller) = connect_and_take(&node, &callers, "pod-b", node.v4(), &l.v4);
    assert_eq!(caller, None, "still recording after drop");
}

#[test]
fn attaching_twice_then_dropping_one_leaves_the_other_working() {
    if !privileged() {
        return;
    }
    // A restart overlaps the old agent with the new one: both attach through links, and the old
    // one going away must not take the new one's programs with it.
    let node = Node::new();
    let old = node.attach(0, 0);
    let new = node.attach(0, 0);
    drop(old);
    let callers = new.callers();
    let (pid, caller) = connect_and_take(&node, &callers, "pod-a", node.v6(), &node.listeners.v6);
    assert_eq!(caller.map(|c| c.pid), Some(pid));
}
