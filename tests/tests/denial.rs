//! Nobody on the node can take the kernel's records away from a pod (issue 16, item 1).
//!
//! - A node user (uid 1000) in its delegated subtree makes many cgroups and holds connections to
//!   the agent from each: every caller outside pods shares one budget, so the record maps, sized
//!   from `--max-pods` and `--pod-max-connections`, keep the pods' share; pods are served 200 on
//!   fresh connections under `--token-binding enforce` while the attack holds.
//! - A pod with its own user and network namespace makes a socket with another pod's 4-tuple,
//!   after the victim's connect or before it: the victim keeps or gets the record (only the socket
//!   that completes the handshake, which the attacker's never does, is handed out; only the
//!   socket that made a record deletes it), and is served. A connection left without a record is
//!   answered 403 and audited with the reason, never closed in silence.
//!
//! Needs root, cgroup v2, eBPF, unprivileged user namespaces, `setpriv`, `nsenter` and `unshare`
//! (util-linux), and the agent binary.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use e2e::agent::{AgentArgs, AgentProcess, node_with_web_pods, wait_audit_records};
use e2e::cgroup::{delegate, system_python};
use e2e::clients::Family;
use e2e::node::{Pod, SimNode};
use serde_json::Value;

/// The node user owning the delegated subtree (systemd's `user@1000.service`).
const USER: u32 = 1000;

/// Run by the node user in a user and network namespace of its own, where its SYNs go nowhere:
/// connections the agent never accepts. `workers` processes (a file-descriptor limit is per
/// process) each make `cgroups` new cgroups below `app`, move there one after the other, and from
/// each open `per` connections to the agent without waiting (non-blocking), holding every socket.
/// Each worker prints its outcomes as a JSON line, then all hold until stdin closes.
const HOARD: &str = r"
import errno, json, os, resource, socket, sys
app, workers, cgroups, per = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
for w in range(workers):
    if os.fork() == 0:
        break
else:
    sys.stdin.read()
    sys.exit(0)
held, out = [], {'connected': 0, 'eperm': 0, 'other': []}
for i in range(cgroups):
    leaf = os.path.join(app, 'atk%d-%d' % (w, i))
    os.makedirs(leaf, exist_ok=True)
    with open(os.path.join(leaf, 'cgroup.procs'), 'w') as f:
        f.write(str(os.getpid()))
    for _ in range(per):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.bind(('10.200.0.%d' % (1 + w), 0))
        e = s.connect_ex(('169.254.170.23', 80))
        if e in (0, errno.EINPROGRESS):
            out['connected'] += 1
            held.append(s)
        elif e == errno.EPERM:
            out['eperm'] += 1
            s.close()
        else:
            out['other'].append(e)
            s.close()
# One write(2) under PIPE_BUF: the workers' lines never interleave.
os.write(1, (json.dumps(out) + '\n').encode())
sys.stdin.read()
";

/// `user.slice/user-1000.slice/user@1000.service/app.slice` under the node's cgroup root,
/// delegated to the user as systemd does it.
fn delegated_app_slice(node: &SimNode) -> PathBuf {
    let service = node
        .cgroup_root()
        .join(format!("user.slice/user-{USER}.slice/user@{USER}.service"));
    let app = service.join("app.slice");
    delegate(&service, USER).unwrap();
    delegate(&app, USER).unwrap();
    app
}

/// What the eBPF programs counted of `event`, as the agent exports it.
fn kernel_event(agent: &AgentProcess, event: &str) -> f64 {
    agent
        .metric(&format!(
            "pod_identity_kernel_events_total{{event=\"{event}\"}}"
        ))
        .unwrap_or(0.0)
}

/// Starts [`HOARD`] as the node user, from the delegated `app` slice, in a new user and network
/// namespace (its own addresses, a route to the agent's address that leads nowhere, the whole port
/// range); returns the process (holding its sockets until its stdin closes) and the workers'
/// reports summed.
fn hoard(app: &Path, workers: usize, cgroups: usize, per: usize) -> (Child, Value) {
    let addrs: String = (1..=workers)
        .map(|w| format!("ip addr add 10.200.0.{w}/32 dev lo && "))
        .collect();
    let setup = format!(
        "ip link set lo up && {addrs}ip route add 169.254.170.23/32 dev lo && \
         echo '1024 65535' > /proc/sys/net/ipv4/ip_local_port_range && \
         exec \"$0\" -c \"$1\" \"$2\" {workers} {cgroups} {per}"
    );
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(r#"echo $$ > "$0/cgroup.procs" && exec setpriv --reuid "$1" --regid "$1" --clear-groups -- unshare --user --map-root-user --net -- sh -c "$2" "$3" "$4" "$0""#)
        .arg(app)
        .arg(USER.to_string())
        .arg(setup)
        .arg(system_python())
        .arg(HOARD)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let (mut connected, mut eperm, mut other) = (0, 0, Vec::new());
    for _ in 0..workers {
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let report: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("{e}: {line:?} (alive? {:?})", child.try_wait()));
        connected += report["connected"].as_u64().unwrap_or(0);
        eperm += report["eperm"].as_u64().unwrap_or(0);
        other.extend(report["other"].as_array().cloned().unwrap_or_default());
    }
    let report = serde_json::json!({"connected": connected, "eperm": eperm, "other": other});
    (child, report)
}

/// `count` requests, each on a fresh connection: their statuses.
fn fresh_requests(pod: &Pod, count: usize) -> Vec<Option<u16>> {
    let run = pod
        .python_requests(Family::V4, &pod.token_path(), count, false)
        .unwrap();
    run.exchanges.iter().map(|e| e.status).collect()
}

#[test]
fn a_node_user_with_many_cgroups_cannot_exhaust_the_record_maps() {
    if !e2e::privileged("a_node_user_with_many_cgroups_cannot_exhaust_the_record_maps") {
        return;
    }
    let (node, fake, [first, second]) =
        node_with_web_pods("e2e-denial-maps", ["web-0", "web-1"]).unwrap();
    first.refresh_token(&fake).unwrap();
    second.refresh_token(&fake).unwrap();
    let app = delegated_app_slice(&node);
    // Kernel cap per key: 64 (4 × 2, at least 64); record maps: (4 + 1) × 64 × 2 = 640 entries.
    let agent = AgentProcess::start(
        &node,
        &fake,
        AgentArgs::default().args([
            "--token-binding",
            "enforce",
            "--max-pods",
            "4",
            "--pod-max-connections",
            "2",
        ]),
    )
    .unwrap();

    // 4 processes × 72 cgroups × 256 connects, all held, never accepted: more than a record map
    // of 65 536 entries (keyed per cgroup, 256 of the user's cgroups at a cap of 256 would
    // fill one).
    let (mut attacker, report) = hoard(&app, 4, 72, 256);
    println!("node user, 4 × 72 cgroups × 256 connects: {report}");
    // While the attacker holds its sockets, pods are served on fresh connections.
    let served: Vec<Vec<Option<u16>>> = [&first, &second]
        .iter()
        .map(|pod| fresh_requests(pod, 10))
        .collect();
    println!("pods, 2 × 10 fresh requests: {served:?}");
    assert!(
        served.iter().flatten().all(|s| *s == Some(200)),
        "{served:?}"
    );
    assert_eq!(report["other"], serde_json::json!([]), "{report}");
    let connected = report["connected"].as_u64().unwrap_or(0);
    assert!(
        connected <= 64,
        "the user's cgroups share one budget of 64: {report}"
    );
    assert_eq!(
        report["eperm"].as_u64().unwrap_or(0),
        4 * 72 * 256 - connected,
        "the rest is refused in connect(): {report}"
    );

    assert!(
        attacker.try_wait().unwrap().is_none(),
        "the attack held throughout"
    );
    let event = |name: &str| kernel_event(&agent, name);
    assert!(
        e2e::wait_for(Duration::from_secs(15), || event("open_cap_refused") >= 1.0),
        "refusals are exported:\n{}",
        agent.metrics().unwrap()
    );
    assert_eq!(event("conn_record_failed"), 0.0, "no record map filled up");
    assert_eq!(event("record_missing"), 0.0);
    drop(attacker.stdin.take());
    attacker.wait().unwrap();
}

/// Run as the victim: binds `port` on its own address, connects to the agent (its SYN is held
/// back meanwhile), prints `connecting`, then asks for credentials on that connection.
const VICTIM: &str = r"
import http.client, json, socket, sys
ip, port, token_file = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((ip, port))
s.settimeout(20)
print('connecting', flush=True)
s.connect(('169.254.170.23', 80))
conn = http.client.HTTPConnection('169.254.170.23', 80, timeout=10)
conn.sock = s
conn.request('GET', '/v1/credentials', headers={'Authorization': open(token_file).read()})
r = conn.getresponse()
print(json.dumps({'status': r.status, 'body': r.read().decode('utf-8', 'replace')}), flush=True)
";

/// Run by the attacking pod as uid 1000 in a user and network namespace of its own: gives itself
/// the victim's address (and, when `local_agent`, the agent's, so that its connect is refused at
/// once and its socket closes), and connects from the victim's 4-tuple. Prints the outcome.
const COLLIDE: &str = r"
import socket, sys
ip, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.bind((ip, port))
s.settimeout(3)
try:
    s.connect(('169.254.170.23', 80))
    print('connected', flush=True)
except OSError as e:
    print(type(e).__name__, flush=True)
s.close()
";

/// Runs [`COLLIDE`] as `pod`'s process, uid 1000, in a new user and network namespace.
fn collide(pod: &Pod, ip: &str, port: u16, local_agent: bool) -> String {
    let setup = format!(
        "ip link set lo up && ip addr add {ip}/32 dev lo && {} && exec \"$0\" -c \"$1\" {ip} {port}",
        if local_agent {
            "ip addr add 169.254.170.23/32 dev lo"
        } else {
            "ip route add 169.254.170.23/32 dev lo"
        }
    );
    let out = Command::new("sh")
        .arg("-c")
        .arg(r#"echo $$ > "$0/cgroup.procs" && exec setpriv --reuid "$1" --regid "$1" --clear-groups -- unshare --user --map-root-user --net -- sh -c "$2" "$3" "$4""#)
        .arg(&pod.cgroup)
        .arg(USER.to_string())
        .arg(setup)
        .arg(system_python())
        .arg(COLLIDE)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the colliding pod failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn a_pod_cannot_take_another_pods_record_with_its_4_tuple() {
    if !e2e::privileged("a_pod_cannot_take_another_pods_record_with_its_4_tuple") {
        return;
    }
    let (node, fake, [victim, attacker, bystander]) = node_with_web_pods(
        "e2e-denial-tuple",
        ["victim-0", "attacker-0", "bystander-0"],
    )
    .unwrap();
    for pod in [&victim, &attacker, &bystander] {
        pod.refresh_token(&fake).unwrap();
    }
    let audit = node.dir().join("audit.log");
    let agent = AgentProcess::start(
        &node,
        &fake,
        AgentArgs::default().audit_log(&audit).args([
            "--token-binding",
            "enforce",
            "--pod-max-connections",
            "2",
        ]),
    )
    .unwrap();
    let victim_ip = victim.ipv4.to_string();
    let node_side = format!("veth{}", victim.index);

    // 1. The victim connects first; its SYN is held back (its link down) so the agent has not
    // read its record yet. The attacker then connects from the victim's 4-tuple in its own
    // namespace, is refused at once, and its socket closes.
    node.netns()
        .ip(&["link", "set", &node_side, "down"])
        .unwrap();
    let mut v = victim
        .command("python3")
        .args(["-c", VICTIM, &victim_ip, "41001"])
        .arg(victim.token_path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(v.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "connecting");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        collide(&attacker, &victim_ip, 41001, true),
        "ConnectionRefusedError"
    );
    // Up again, with the route to the victim that going down removed: its SYN is retransmitted.
    node.netns().ip(&["link", "set", &node_side, "up"]).unwrap();
    let route = format!("{victim_ip}/32");
    node.netns()
        .ip(&["route", "replace", &route, "dev", &node_side])
        .unwrap();
    let line = lines.next().and_then(Result::ok).unwrap_or_default();
    let out = v.wait_with_output().unwrap();
    let answer: Value = serde_json::from_str(&line).unwrap_or_else(|e| {
        panic!(
            "{e}: {line:?}, the victim said {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(
        answer["status"], 200,
        "the victim keeps its record: {answer}"
    );

    // 2. The attacker holds the 4-tuple first (its SYN goes nowhere): the victim, the newcomer
    // from another namespace, completes the handshake the attacker never can, and takes it over.
    let (attacker_said, victim_said) = std::thread::scope(|s| {
        let t = s.spawn(|| collide(&attacker, &victim_ip, 41002, false));
        std::thread::sleep(Duration::from_millis(500));
        let out = victim
            .command("python3")
            .args(["-c", VICTIM, &victim_ip, "41002"])
            .arg(victim.token_path())
            .output()
            .unwrap();
        (
            t.join().unwrap(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    });
    assert_eq!(
        attacker_said, "TimeoutError",
        "the attacker's SYN went nowhere"
    );
    let newcomer: Value = serde_json::from_str(victim_said.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{e}: {victim_said}"));
    assert_eq!(newcomer["status"], 200, "{newcomer}");

    // 3. A connection with no record (a process the kernel did not see: outside the attached
    // cgroup tree, in the victim's network namespace) while callers outside pods fill their
    // slots in the agent: answered 403 with the reason and audited, not closed in silence.
    let host = node.add_non_pod_caller("idle-session").unwrap();
    let mut idle = host
        .command("python3")
        .args([
            "-c",
            "import socket, sys\nh = [socket.create_connection(('169.254.170.23', 80)) for _ in range(2)]\nprint('held', flush=True)\nsys.stdin.read()",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut held = String::new();
    BufReader::new(idle.stdout.take().unwrap())
        .read_line(&mut held)
        .unwrap();
    assert_eq!(held.trim(), "held");
    let out = Command::new("ip")
        .args(["netns", "exec", victim.netns().name(), system_python()])
        .args(["-c", VICTIM, &victim_ip, "41003"])
        .arg(victim.token_path())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    let unrecorded: Value = serde_json::from_str(said.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| {
            panic!(
                "{e}: {said} {}: closed without an answer?",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    assert_eq!(unrecorded["status"], 403, "{unrecorded}");
    drop(idle.stdin.take());
    idle.wait().unwrap();

    // Meanwhile and after, a bystander is served on fresh connections.
    let statuses = fresh_requests(&bystander, 5);
    assert!(statuses.iter().all(|s| *s == Some(200)), "{statuses:?}");

    let records = wait_audit_records(&audit, 8, Duration::from_secs(10)).unwrap();
    let refused: Vec<_> = records.iter().filter(|r| r["http_status"] == 403).collect();
    assert_eq!(refused.len(), 1, "{records:#?}");
    assert_eq!(refused[0]["binding"], "unattributed", "{}", refused[0]);
    assert!(
        refused[0].to_string().contains("no kernel record"),
        "the audit record says why: {}",
        refused[0]
    );
    let event = |name: &str| kernel_event(&agent, name);
    assert!(
        e2e::wait_for(Duration::from_secs(15), || event("tuple_collision") >= 2.0),
        "{}",
        agent.metrics().unwrap()
    );
    assert!(event("foreign_release") >= 1.0);
}
