//! Per-pod fairness end to end: a pod flooding the agent over keep-alive connections spends its own
//! request allowance, not the node's, so its neighbour is served every time; and a pod holding
//! connections open gets no more than `--pod-max-connections` of the listener's slots.
//!
//! Needs root, cgroup v2, eBPF, and the agent binary (`cargo build -p eks-pod-identity-agent`).

use std::process::Stdio;
use std::time::Duration;

use e2e::agent::{AgentArgs, AgentProcess, node_with_web_pods};
use e2e::clients::Family;

/// What wrk reported: requests completed, and how many of them were not 2xx.
struct WrkRun {
    requests: u64,
    non_2xx: u64,
    seconds: f64,
}

fn parse_wrk(text: &str) -> WrkRun {
    let line = |prefix: &str| {
        text.lines()
            .map(str::trim)
            .find(|l| l.contains(prefix))
            .map(str::to_owned)
    };
    // `12345 requests in 4.00s, 1.23MB read`
    let summary =
        line(" requests in ").unwrap_or_else(|| panic!("no summary in wrk's output:\n{text}"));
    let mut words = summary.split_whitespace();
    let requests = words.next().and_then(|n| n.parse().ok()).unwrap();
    let seconds = words
        .nth(2)
        .and_then(|d| d.trim_end_matches(',').strip_suffix('s'))
        .and_then(|d| d.parse().ok())
        .unwrap_or(0.0);
    let non_2xx = line("Non-2xx or 3xx responses:")
        .and_then(|l| l.rsplit(' ').next().and_then(|n| n.parse().ok()))
        .unwrap_or(0);
    WrkRun {
        requests,
        non_2xx,
        seconds,
    }
}

#[test]
fn a_keep_alive_flood_does_not_starve_the_neighbour() {
    if !e2e::privileged("a_keep_alive_flood_does_not_starve_the_neighbour") {
        return;
    }
    assert!(
        std::process::Command::new("wrk")
            .arg("--version")
            .output()
            .is_ok(),
        "wrk is not installed: run `cargo xtask setup`"
    );
    let (node, fake, [flooder, neighbour]) =
        node_with_web_pods("e2e-fairness", ["flood-0", "calm-0"]).unwrap();
    let flooder_token = flooder.refresh_token(&fake).unwrap();
    neighbour.refresh_token(&fake).unwrap();
    // The node-wide limit at its default (1000/s, burst 500), plus a per-pod rate.
    let agent = AgentProcess::start(
        &node,
        &fake,
        AgentArgs::default().args(["--pod-request-rate", "5", "--pod-request-burst", "10"]),
    )
    .unwrap();

    // wrk as the flooding pod: 8 keep-alive connections, as fast as it can, for 4 s.
    let mut flood = flooder
        .command("wrk")
        .args(["-t1", "-c8", "-d4s", "--timeout", "2s", "-H"])
        .arg(format!("Authorization: {flooder_token}"))
        .arg("http://169.254.170.23/v1/credentials")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The neighbour asks about 3 times a second (within its own rate) while the flood lasts.
    let mut neighbour_statuses = Vec::new();
    while flood.try_wait().unwrap().is_none() {
        std::thread::sleep(Duration::from_millis(300));
        let run = neighbour
            .python_requests(Family::V6, &neighbour.token_path(), 1, false)
            .unwrap();
        neighbour_statuses.push(run.exchanges[0].status);
    }
    let out = flood.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "wrk failed: {text}");
    let wrk = parse_wrk(&text);
    let served = wrk.requests - wrk.non_2xx;
    let limited = agent
        .metric("pod_identity_pod_requests_limited_total")
        .unwrap();
    let node_wide = agent
        .metric("pod_identity_http_response{code=\"429\"}")
        .unwrap()
        - limited;
    println!(
        "flood: {} requests in {:.1} s ({:.0}/s) on keep-alive: {served} served, {} answered 429 \
         ({limited} by the pod's limit, {node_wide} by the node's); neighbour: {} requests, {} served",
        wrk.requests,
        wrk.seconds,
        wrk.requests as f64 / wrk.seconds.max(0.001),
        wrk.non_2xx,
        neighbour_statuses.len(),
        neighbour_statuses
            .iter()
            .filter(|s| **s == Some(200))
            .count()
    );
    assert!(
        neighbour_statuses.len() >= 3,
        "the neighbour asked during the flood"
    );
    assert!(
        neighbour_statuses.iter().all(|s| *s == Some(200)),
        "the neighbour is served every time: {neighbour_statuses:?}"
    );
    // The flooder gets its burst and its rate over the flood, with a second of slack; every
    // other request of its is refused by its own limit, none by the node's.
    let allowance = 10.0 + 5.0 * (wrk.seconds + 1.0);
    assert!(
        (served as f64) <= allowance,
        "{served} served to the flooder in {} s",
        wrk.seconds
    );
    assert!(wrk.non_2xx > 0, "the flood was limited");
    assert_eq!(node_wide, 0.0, "the node-wide bucket was never drained");
}

/// Opens `count` connections to the agent and keeps them all open, then sends a credential request
/// on each; prints how many got an answer (and their statuses) and how many were closed unanswered.
const HOLD_CONNECTIONS: &str = r"
import json, socket, sys, time
count, token_file = int(sys.argv[1]), sys.argv[2]
token = open(token_file).read()
socks = []
for _ in range(count):
    s = socket.create_connection(('169.254.170.23', 80), timeout=5)
    socks.append(s)
time.sleep(1.0)
out = {'answered': [], 'closed': 0}
req = ('GET /v1/credentials HTTP/1.1\r\nHost: 169.254.170.23\r\nAuthorization: ' + token + '\r\n\r\n').encode()
for s in socks:
    try:
        s.sendall(req)
        data = s.recv(65536)
        if data:
            out['answered'].append(int(data.split(b' ')[1]))
        else:
            out['closed'] += 1
    except OSError:
        out['closed'] += 1
print(json.dumps(out), flush=True)
sys.stdin.read()
";

#[test]
fn a_pod_holds_at_most_its_maximum_of_open_connections() {
    if !e2e::privileged("a_pod_holds_at_most_its_maximum_of_open_connections") {
        return;
    }
    let (node, fake, [hog, neighbour]) =
        node_with_web_pods("e2e-pod-connections", ["hog-0", "calm-0"]).unwrap();
    hog.refresh_token(&fake).unwrap();
    neighbour.refresh_token(&fake).unwrap();
    let agent = AgentProcess::start(
        &node,
        &fake,
        AgentArgs::default().args(["--pod-max-connections", "4"]),
    )
    .unwrap();

    let mut holder = hog
        .command("python3")
        .args(["-c", HOLD_CONNECTIONS, "10"])
        .arg(hog.token_path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(holder.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    let held: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| {
        panic!(
            "{e}: {line:?} (is the holder alive? {:?})",
            holder.try_wait()
        )
    });
    println!("10 connections held open by one pod, cap 4: {held}");
    assert_eq!(
        held["answered"],
        serde_json::json!([200, 200, 200, 200]),
        "{held}"
    );
    assert_eq!(held["closed"], 6, "{held}");
    assert_eq!(
        agent
            .metric("pod_identity_pod_connections_refused_total")
            .unwrap(),
        6.0
    );

    // While the hog holds its four, the neighbour is served.
    let run = neighbour
        .python_requests(Family::V4, &neighbour.token_path(), 3, true)
        .unwrap();
    assert!(
        run.exchanges.iter().all(|e| e.status == Some(200)),
        "{run:?}"
    );
    // And the hog itself, once it lets go.
    drop(holder.stdin.take());
    holder.wait().unwrap();
    let again = hog
        .python_requests(Family::V4, &hog.token_path(), 1, false)
        .unwrap();
    assert_eq!(again.exchanges[0].status, Some(200), "{again:?}");
}
