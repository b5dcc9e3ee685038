//! The eBPF programs on the real kernel: attribution of v4, v6 and v4-mapped connects, filtering of
//! other destinations, the per-cgroup token bucket, and detaching on drop.
//!
//! Each test builds its own "node": a cgroup directory under the cgroup2 mount (the programs attach
//! there) with pod cgroups below it, and a network namespace holding an `ifb` link with the agent's
//! addresses and the test's listeners. Clients are `python3` processes that join a pod cgroup and
//! then `ip netns exec` into the node namespace. Needs root; under `CI=true` a missing privilege or
//! tool fails the test instead of skipping it.

// Test helpers outside #[test] functions set up the kernel fixtures: failing loudly is their job.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{
    fs::File,
    io::ErrorKind,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use nix::sched::{CloneFlags, setns};
use pod_identity_agent::ebpf::{
    AttachConfig, Callers, ConnectCounters, Programs, cgroup2_mount_root,
};

const AGENT_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 170, 23);
const AGENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x23);
/// Every name this suite creates starts with this, followed by the test process's pid.
const PREFIX: &str = "ebpf-test-";

/// Connects `count` times, printing `ok` or `eperm` for each; with `hold` = 1, then waits for the
/// server to close the first connection (or a minute), so the test can accept it first.
const CLIENT: &str = r#"
import socket, sys
fam, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
count, hold = int(sys.argv[4]), sys.argv[5] == "1"
held = []
for _ in range(count):
    s = socket.socket(socket.AF_INET if fam == "4" else socket.AF_INET6, socket.SOCK_STREAM)
    try:
        s.connect((host, port))
        held.append(s)
        print("ok", flush=True)
    except PermissionError:
        print("eperm", flush=True)
if hold and held:
    held[0].settimeout(60)
    try:
        held[0].recv(1)
    except OSError:
        pass
"#;

/// Whether this test can run. Outside CI it may skip (returning false); under `CI=true` it fails.
fn privileged() -> bool {
    let missing = if nix::unistd::geteuid().is_root() {
        ["ip", "python3"]
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

    fn pod(&self, pod: &str) -> PathBuf {
        self.cgroup.join(pod)
    }

    fn attach(&self, rate: u32, burst: u32) -> Programs {
        let port = self.listeners.port;
        Programs::load_and_attach(&AttachConfig {
            cgroup_root: self.cgroup.clone(),
            targets: vec![
                SocketAddr::from((AGENT_V4, port)),
                SocketAddr::from((AGENT_V6, port)),
            ],
            connect_rate: rate,
            connect_burst: burst,
        })
        .expect("load and attach")
    }

    /// A `python3` client in `pod`'s cgroup and this node's netns (see [`CLIENT`]).
    fn client(&self, pod: &str, (family, host, port): Dest, count: u32, hold: bool) -> Child {
        let procs = self.pod(pod).join("cgroup.procs");
        // Join the cgroup first, then exec: the pid (and so the cgroup) survives both execs.
        let script = format!(
            "echo $$ > {} && exec ip netns exec {} python3 -c \"$0\" {family} {host} {port} {count} {}",
            procs.display(),
            self.name,
            u8::from(hold),
        );
        Command::new("sh")
            .args(["-c", &script, CLIENT])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn client")
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
    let deadline = Instant::now() + Duration::from_secs(10);
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

/// The client's `ok`/`eperm` lines, after it exits.
fn outcomes(child: Child) -> Vec<String> {
    let out = child.wait_with_output().expect("wait client");
    assert!(
        out.status.success(),
        "client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Connect once from `pod`, accept on `listener`, and return what `Callers::take` says.
fn connect_and_take(
    node: &Node,
    callers: &Callers,
    pod: &str,
    dest: Dest,
    listener: &TcpListener,
) -> (u32, Option<pod_identity_agent::ebpf::Caller>) {
    let child = node.client(pod, dest, 1, true);
    let pid = child.id();
    let (stream, peer) = accept(listener);
    let local = stream.local_addr().expect("local addr");
    let caller = callers.take(peer, local);
    // Consumed: a second take finds nothing.
    assert_eq!(callers.take(peer, local), None, "record not consumed");
    drop(stream);
    assert_eq!(outcomes(child), ["ok"]);
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
    let pod_a = inode(&node.pod("pod-a"));

    for (dest, listener) in [
        (("4", "169.254.170.23", l.port), &l.v4),
        (("6", "fd00:ec2::23", l.port), &l.v6),
        (("6", "::ffff:169.254.170.23", l.port), &l.v4),
    ] {
        let (pid, caller) = connect_and_take(&node, &callers, "pod-a", dest, listener);
        let caller = caller.unwrap_or_else(|| panic!("no caller recorded for {dest:?}"));
        assert_eq!(caller.cgroup_id, pod_a, "{dest:?}");
        assert_eq!(caller.pid, pid, "{dest:?}");
        assert_eq!(caller.tid, pid, "single-threaded client: {dest:?}");
        assert_eq!(caller.uid, 0, "{dest:?}");
        assert_eq!(caller.comm, "python3", "{dest:?}");
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
}

#[test]
fn token_bucket_refuses_a_flood_but_not_another_cgroup() {
    if !privileged() {
        return;
    }
    let node = Node::new();
    let programs = node.attach(1, 3);

    let flood = outcomes(node.client(
        "pod-a",
        ("4", "169.254.170.23", node.listeners.port),
        10,
        false,
    ));
    let ok = flood.iter().filter(|o| *o == "ok").count() as u64;
    let eperm = flood.iter().filter(|o| *o == "eperm").count() as u64;
    assert_eq!(ok + eperm, 10, "{flood:?}");
    // The burst, plus one more if the flood straddled a one-second refill.
    assert!((3..=4).contains(&ok), "{flood:?}");

    let other = outcomes(node.client(
        "pod-b",
        ("6", "fd00:ec2::23", node.listeners.port),
        1,
        false,
    ));
    assert_eq!(other, ["ok"], "another cgroup has its own bucket");

    let counters = programs.connect_counters().expect("counters");
    let of = |pod: &str| {
        let id = inode(&node.pod(pod));
        counters.iter().find(|(c, _)| *c == id).map(|(_, n)| *n)
    };
    assert_eq!(
        of("pod-a"),
        Some(ConnectCounters {
            allowed: ok,
            denied: eperm
        })
    );
    assert_eq!(
        of("pod-b"),
        Some(ConnectCounters {
            allowed: 1,
            denied: 0
        })
    );
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
    let dest = ("4", "169.254.170.23", l.port);

    let (_, caller) = connect_and_take(&node, &callers, "pod-b", dest, &l.v4);
    assert_eq!(caller.map(|c| c.cgroup_id), Some(inode(&node.pod("pod-b"))));

    drop(programs);
    let (_, caller) = connect_and_take(&node, &callers, "pod-b", dest, &l.v4);
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
    let l = &node.listeners;
    let (pid, caller) = connect_and_take(
        &node,
        &callers,
        "pod-a",
        ("6", "fd00:ec2::23", l.port),
        &l.v6,
    );
    assert_eq!(caller.map(|c| c.pid), Some(pid));
}
