//! The metrics and probe ports (issue 15 item 6, issue 16 item 3): dual-stack by default, one
//! address when told, and as hard as the credential port — a flood of slow partial heads neither
//! grows the agent's memory nor keeps a scrape out.
//!
//! Needs root (network namespaces) and the agent binary.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use e2e::agent::{AgentArgs, AgentProcess, node_with_web_pods};
use e2e::clients::http_get_in;
use e2e::netns::NetNs;

const METRICS_PORT: u16 = 2705;
const PROBE_PORT: u16 = 2703;

fn v4(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

fn v6(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv6Addr::LOCALHOST, port))
}

fn scrape(netns: &NetNs, addr: SocketAddr) -> anyhow::Result<(u16, String)> {
    let r = http_get_in(netns, addr, "/metrics", Duration::from_secs(2))?;
    Ok((r.status, r.body_text()))
}

#[test]
fn metrics_are_served_over_ipv4_and_ipv6_by_default_and_on_one_address_when_told() {
    if !e2e::privileged(
        "metrics_are_served_over_ipv4_and_ipv6_by_default_and_on_one_address_when_told",
    ) {
        return;
    }
    let (node, fake, []) = node_with_web_pods("e2e-metrics-dual", []).unwrap();
    let agent = AgentProcess::start(&node, &fake, AgentArgs::default()).unwrap();
    for addr in [v4(METRICS_PORT), v6(METRICS_PORT)] {
        let (status, body) = scrape(node.netns(), addr).unwrap();
        assert_eq!(status, 200, "{addr}: {body}");
        assert!(body.contains("pod_identity_ebpf_attached"), "{addr}");
    }
    // The probe port stays on 127.0.0.1.
    assert_eq!(
        http_get_in(
            node.netns(),
            v4(PROBE_PORT),
            "/readyz",
            Duration::from_secs(2)
        )
        .unwrap()
        .status,
        200
    );
    assert!(
        http_get_in(
            node.netns(),
            v6(PROBE_PORT),
            "/readyz",
            Duration::from_secs(2)
        )
        .is_err()
    );
    assert!(agent.stop().unwrap().success());

    // An explicit address is the only one served.
    for (address, served, refused) in [
        ("127.0.0.1", v4(METRICS_PORT), v6(METRICS_PORT)),
        ("::1", v6(METRICS_PORT), v4(METRICS_PORT)),
    ] {
        let agent = AgentProcess::start(
            &node,
            &fake,
            AgentArgs::default().args(["--metrics-address", address]),
        )
        .unwrap();
        assert_eq!(scrape(node.netns(), served).unwrap().0, 200, "{address}");
        assert!(
            scrape(node.netns(), refused).is_err(),
            "--metrics-address {address} also serves {refused}"
        );
        assert!(agent.stop().unwrap().success());
    }
}

/// Connections held open by the flood, and connections the agent closed under it.
#[derive(Default)]
struct Flood {
    stop: AtomicBool,
    open: AtomicU64,
    dropped: AtomicU64,
}

/// `n` clients that each send a partial head of about 8 KiB to `addr` and hold it; when the agent
/// closes one, it comes back at once. Runs on a runtime of its own, on threads in `netns`.
fn start_flood(
    netns: &NetNs,
    addr: SocketAddr,
    n: usize,
) -> (Arc<Flood>, std::thread::JoinHandle<()>) {
    let flood = Arc::new(Flood::default());
    let runner = {
        let flood = flood.clone();
        netns
            .run(move || {
                // Spawned from the thread inside the namespace: it and the runtime's threads
                // are in it too.
                std::thread::spawn(move || {
                    let runtime = tokio::runtime::Builder::new_multi_thread()
                        .worker_threads(1)
                        .enable_all()
                        .build()
                        .unwrap();
                    runtime.block_on(flood_clients(flood, addr, n));
                })
            })
            .unwrap()
    };
    (flood, runner)
}

async fn flood_clients(flood: Arc<Flood>, addr: SocketAddr, n: usize) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut head = b"GET /metrics HTTP/1.1\r\nHost: node\r\nX-Pad: ".to_vec();
    head.resize(8000, b'a');
    let head: Arc<[u8]> = head.into();
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..n {
        let (flood, head) = (flood.clone(), head.clone());
        clients.spawn(async move {
            while !flood.stop.load(Ordering::Relaxed) {
                let Ok(Ok(mut stream)) = tokio::time::timeout(
                    Duration::from_secs(2),
                    tokio::net::TcpStream::connect(addr),
                )
                .await
                else {
                    continue;
                };
                if stream.write_all(&head).await.is_err() {
                    flood.dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                flood.open.fetch_add(1, Ordering::Relaxed);
                // Hold it until the agent closes it (or the flood ends).
                let mut buf = [0u8; 512];
                loop {
                    tokio::select! {
                        read = stream.read(&mut buf) => match read {
                            Ok(0) | Err(_) => break,
                            Ok(_) => {}
                        },
                        () = tokio::time::sleep(Duration::from_millis(200)) => {
                            if flood.stop.load(Ordering::Relaxed) {
                                break;
                            }
                        }
                    }
                }
                flood.open.fetch_sub(1, Ordering::Relaxed);
                flood.dropped.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    while clients.join_next().await.is_some() {}
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn slow_partial_heads_neither_grow_memory_nor_keep_a_scrape_out() {
    if !e2e::privileged("slow_partial_heads_neither_grow_memory_nor_keep_a_scrape_out") {
        return;
    }
    let (node, fake, []) = node_with_web_pods("e2e-metrics-flood", []).unwrap();
    let agent = AgentProcess::start(&node, &fake, AgentArgs::default()).unwrap();
    let pid = agent.pid().unwrap();
    let (flood, runner) = start_flood(node.netns(), v4(METRICS_PORT), 5000);

    // Let the flood reach its strength: thousands of heads sent and held or reopened.
    assert!(
        e2e::wait_for(Duration::from_secs(20), || flood
            .dropped
            .load(Ordering::Relaxed)
            + flood.open.load(Ordering::Relaxed)
            >= 5000),
        "the flood never got going"
    );
    let mut most_rss = 0;
    let mut slowest = Duration::ZERO;
    let until = Instant::now() + Duration::from_secs(15);
    let mut scrapes = 0;
    while Instant::now() < until {
        most_rss = most_rss.max(rss_kib(pid));
        for addr in [v4(METRICS_PORT), v6(METRICS_PORT)] {
            let started = Instant::now();
            let r = http_get_in(node.netns(), addr, "/metrics", Duration::from_secs(1));
            let took = started.elapsed();
            let r = r.unwrap_or_else(|e| panic!("scrape of {addr} under the flood: {e:#}"));
            assert_eq!(r.status, 200, "{addr}: {}", r.body_text());
            assert!(r.body_text().contains("pod_identity_ebpf_attached"));
            slowest = slowest.max(took);
            scrapes += 1;
        }
        let probe = agent.probe("/readyz").unwrap();
        assert_eq!(probe.status, 200);
        std::thread::sleep(Duration::from_millis(200));
    }
    flood.stop.store(true, Ordering::Relaxed);
    let (open, dropped) = (
        flood.open.load(Ordering::Relaxed),
        flood.dropped.load(Ordering::Relaxed),
    );
    runner.join().unwrap();
    eprintln!(
        "flood: {dropped} connections closed by the agent, {open} held at the end; {scrapes} scrapes, \
         slowest {slowest:?}; agent RSS at most {most_rss} KiB"
    );
    assert!(
        dropped > 0,
        "the agent closed none of the flood's connections"
    );
    assert!(
        slowest < Duration::from_secs(1),
        "a scrape took {slowest:?} under the flood"
    );
    assert!(
        most_rss < 64 * 1024,
        "the agent reached {most_rss} KiB under the flood"
    );
    assert!(agent.stop().unwrap().success());
}
