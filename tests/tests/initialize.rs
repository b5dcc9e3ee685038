//! `eks-pod-identity-agent initialize` in fresh network namespaces: the link, both addresses and the
//! main-table routes; idempotence; a conflicting route; a node without IPv6. Needs the agent binary
//! (`cargo build -p eks-pod-identity-agent`).

use std::net::SocketAddr;
use std::process::Output;
use std::time::Duration;

use e2e::agent::{AgentArgs, AgentProcess, run_initialize, start_fake_eks_auth_in};
use e2e::clients::{RawRequest, raw_http_in};
use e2e::netns::NetNs;
use e2e::node::{AGENT_V4, SimNode};
use serde_json::Value;

const LINK: &str = "pod-id-link0";

/// `ip -n <ns> -j <args>`, parsed.
fn ip_json(ns: &NetNs, args: &[&str]) -> Value {
    let out = std::process::Command::new("ip")
        .args(["-n", ns.name(), "-j"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    if text.trim().is_empty() {
        return Value::Array(Vec::new());
    }
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("ip {args:?}: {e}: {text}"))
}

fn describe(out: &Output) -> String {
    format!(
        "{}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The link's kind, index and flags; its addresses (`addr/prefixlen`, sorted); main-table routes
/// through it (`dst dev <link> proto <p> metric <m>`, sorted, both families; the kernel adds a prefix
/// route of its own for an IPv6 /128).
#[derive(Debug, PartialEq, Eq)]
struct State {
    kind: String,
    index: u64,
    up: bool,
    addresses: Vec<String>,
    routes: Vec<String>,
}

fn state(ns: &NetNs) -> State {
    let links = ip_json(ns, &["-d", "link", "show", "dev", LINK]);
    let link = &links[0];
    let kind = link["linkinfo"]["info_kind"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let index = link["ifindex"].as_u64().unwrap();
    let up = link["flags"].as_array().unwrap().iter().any(|f| f == "UP");
    let addrs = ip_json(ns, &["addr", "show", "dev", LINK]);
    let mut addresses: Vec<String> = addrs[0]["addr_info"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["scope"] != "link")
        .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
        .collect();
    addresses.sort();
    let mut routes = Vec::new();
    for family in ["-4", "-6"] {
        for r in ip_json(ns, &[family, "route", "show", "table", "main"])
            .as_array()
            .unwrap()
        {
            if r["dev"] == LINK && r["dst"].as_str().is_some_and(|d| !d.starts_with("fe80")) {
                routes.push(format!(
                    "{} dev {LINK} proto {} metric {}",
                    r["dst"].as_str().unwrap(),
                    r["protocol"].as_str().unwrap_or("boot"),
                    r["metric"]
                ));
            }
        }
    }
    routes.sort();
    State {
        kind,
        index,
        up,
        addresses,
        routes,
    }
}

#[test]
fn initialize_creates_the_link_addresses_and_routes_idempotently() {
    if !e2e::privileged("initialize_creates_the_link_addresses_and_routes_idempotently") {
        return;
    }
    let ns = NetNs::create().unwrap();
    let out = run_initialize(&ns, &[]).unwrap();
    assert!(out.status.success(), "initialize: {}", describe(&out));
    let first = state(&ns);
    assert!(
        first.kind == "dummy" || first.kind == "ifb",
        "link kind {:?}",
        first.kind
    );
    assert!(first.up, "{LINK} is not up: {first:?}");
    assert_eq!(
        first.addresses,
        ["169.254.170.23/32", "fd00:ec2::23/128"],
        "{first:?}"
    );
    for dst in ["169.254.170.23 ", "fd00:ec2::23 "] {
        assert!(
            first.routes.iter().any(|r| r.starts_with(dst)),
            "no main-table route for {dst}via {LINK}: {first:?}"
        );
    }
    assert!(
        first
            .routes
            .iter()
            .all(|r| r.starts_with("169.254.170.23 ") || r.starts_with("fd00:ec2::23 ")),
        "unexpected routes: {first:?}"
    );

    for run in 2..=3 {
        let out = run_initialize(&ns, &[]).unwrap();
        assert!(
            out.status.success(),
            "initialize run {run}: {}",
            describe(&out)
        );
        assert_eq!(state(&ns), first, "initialize run {run} changed something");
    }
}

#[test]
fn initialize_refuses_a_conflicting_route_and_names_the_address() {
    if !e2e::privileged("initialize_refuses_a_conflicting_route_and_names_the_address") {
        return;
    }
    let ns = NetNs::create().unwrap();
    ns.ip(&["link", "add", "other0", "type", "ifb"]).unwrap();
    ns.ip(&["link", "set", "other0", "up"]).unwrap();
    ns.ip(&["route", "add", "169.254.170.23/32", "dev", "other0"])
        .unwrap();
    let out = run_initialize(&ns, &[]).unwrap();
    assert!(
        !out.status.success(),
        "initialize succeeded despite a route for 169.254.170.23/32 on other0: {}",
        describe(&out)
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("169.254.170.23"),
        "the error does not name the address: {}",
        describe(&out)
    );
    // The other link's route is left alone.
    let routes = ip_json(&ns, &["-4", "route", "show", "table", "main"]);
    assert!(
        routes
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["dst"] == "169.254.170.23" && r["dev"] == "other0"),
        "{routes}"
    );
}

fn disable_ipv6(ns: &NetNs) {
    ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1").unwrap();
    ns.sysctl("net.ipv6.conf.default.disable_ipv6", "1")
        .unwrap();
}

#[test]
fn initialize_without_ipv6_sets_up_ipv4_and_warns() {
    if !e2e::privileged("initialize_without_ipv6_sets_up_ipv4_and_warns") {
        return;
    }
    let ns = NetNs::create().unwrap();
    disable_ipv6(&ns);
    for run in 1..=2 {
        let out = run_initialize(&ns, &[]).unwrap();
        assert!(
            out.status.success(),
            "initialize run {run} without IPv6: {}",
            describe(&out)
        );
        let s = state(&ns);
        assert_eq!(s.addresses, ["169.254.170.23/32"], "run {run}: {s:?}");
        assert!(
            s.routes.len() == 1 && s.routes[0].starts_with("169.254.170.23 dev "),
            "run {run}: {s:?}"
        );
        let log = String::from_utf8_lossy(&out.stderr);
        let warned = log
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .any(|r| r["level"] == "WARN" && r.to_string().to_ascii_lowercase().contains("ipv6"));
        assert!(
            warned,
            "run {run}: no warning about IPv6 in the log:\n{log}"
        );
    }
}

#[test]
fn the_server_starts_and_serves_ipv4_on_a_node_without_ipv6() {
    if !e2e::privileged("the_server_starts_and_serves_ipv4_on_a_node_without_ipv6") {
        return;
    }
    let node = SimNode::new().unwrap();
    disable_ipv6(node.netns());
    let fake = start_fake_eks_auth_in(node.netns(), "e2e-nov6").unwrap();
    fake.associate("shop", "web-sa", "web-role");
    let agent = AgentProcess::start(&node, &fake, AgentArgs::default())
        .expect("the agent must start (not crash loop) on a node without IPv6");
    let token = fake
        .issue_token(&e2e::fake_eks_auth::TokenSpec::new("shop", "web-sa"))
        .unwrap();
    let request = RawRequest::get("/v1/credentials")
        .host("169.254.170.23")
        .authorization(&token)
        .to_bytes();
    let r = raw_http_in(
        node.netns(),
        SocketAddr::from((AGENT_V4, 80)),
        &request,
        Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body_text());
    let logs = agent.logs().unwrap();
    assert!(
        logs.lines()
            .any(|l| l.contains("WARN") && l.contains("fd00:ec2::23") && l.contains("skipping")),
        "no warning about skipping the missing IPv6 bind host:\n{logs}"
    );
}
