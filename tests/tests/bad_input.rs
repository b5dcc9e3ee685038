//! Requests no SDK would send, as raw HTTP to the agent: the agent refuses them with the right status,
//! before any upstream call, and keeps serving everyone else. Needs the agent binary
//! (`cargo build -p eks-pod-identity-agent`).

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use e2e::agent::{AgentArgs, AgentProcess, node_with_web_pods};
use e2e::clients::{RawRequest, RawResponse};
use e2e::fake_eks_auth::{FakeEksAuth, TokenSpec};
use e2e::node::{AGENT_V4, AGENT_V6, CREDENTIALS_URI_V4, CREDENTIALS_URI_V6, Pod, SimNode};

struct Setup {
    agent: AgentProcess,
    fake: FakeEksAuth,
    pod: Pod,
    _node: SimNode,
}

fn setup(cluster: &str) -> Setup {
    let (node, fake, [pod]) = node_with_web_pods(cluster, ["web-0"]).unwrap();
    let agent = AgentProcess::start(&node, &fake, AgentArgs::default()).unwrap();
    Setup {
        agent,
        fake,
        pod,
        _node: node,
    }
}

fn v4() -> SocketAddr {
    SocketAddr::from((AGENT_V4, 80))
}

fn send(pod: &Pod, addr: SocketAddr, request: &RawRequest) -> RawResponse {
    pod.raw_http(addr, &request.to_bytes(), Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("{} {}: {e:#}", request.method, request.path))
}

fn credentials_request(host: &str, token: &str) -> RawRequest {
    RawRequest::get("/v1/credentials")
        .host(host)
        .authorization(token)
}

/// A normal fetch by both SDKs still succeeds.
fn sdks_still_work(s: &Setup) {
    s.pod.refresh_token(&s.fake).unwrap();
    for uri in [CREDENTIALS_URI_V4, CREDENTIALS_URI_V6] {
        let creds = s.pod.fetch_with_rust_sdk(uri).unwrap().unwrap_or_else(|e| {
            panic!(
                "rust sdk via {uri} after the bad input: {e}\nagent log:\n{}",
                s.agent.logs().unwrap_or_default()
            )
        });
        assert!(creds.access_key_id.starts_with("ASIA"));
    }
    let creds = s
        .pod
        .fetch_with_botocore(CREDENTIALS_URI_V4)
        .unwrap()
        .expect("botocore after the bad input");
    assert!(creds.access_key_id.starts_with("ASIA"));
}

#[test]
fn a_host_that_is_not_a_bind_host_is_forbidden() {
    if !e2e::privileged("a_host_that_is_not_a_bind_host_is_forbidden") {
        return;
    }
    let s = setup("e2e-badhost");
    let token = s.pod.refresh_token(&s.fake).unwrap();
    for host in [
        "example.com",
        "localhost",
        "127.0.0.1",
        "169.254.170.2",
        "169.254.170.230",
        "169.254.170.23.nip.io",
        "169.254.170.23:notaport",
        "[fd00:ec2::24]",
        "fd00:ec2::23:80",
        "",
    ] {
        for addr in [v4(), SocketAddr::from((AGENT_V6, 80))] {
            let r = send(&s.pod, addr, &credentials_request(host, &token));
            assert_eq!(r.status, 403, "Host {host:?} via {addr}: {}", r.body_text());
        }
    }
    // No Host header at all.
    let r = send(
        &s.pod,
        v4(),
        &RawRequest::get("/v1/credentials").authorization(&token),
    );
    assert!(
        r.status == 403 || r.status == 400,
        "no Host: {} {}",
        r.status,
        r.body_text()
    );
    assert_eq!(s.fake.calls(), 0, "a refused Host reached EKS Auth");
    sdks_still_work(&s);
}

#[test]
fn every_spelling_of_a_bind_host_is_accepted() {
    if !e2e::privileged("every_spelling_of_a_bind_host_is_accepted") {
        return;
    }
    let s = setup("e2e-goodhost");
    let token = s.pod.refresh_token(&s.fake).unwrap();
    let v6 = SocketAddr::from((AGENT_V6, 80));
    for (addr, host) in [
        (v4(), "169.254.170.23"),
        (v4(), "169.254.170.23:80"),
        (v6, "[fd00:ec2::23]"),
        (v6, "[fd00:ec2::23]:80"),
        // Host names the other bind host: still one of the agent's addresses.
        (v4(), "[fd00:ec2::23]"),
        (v6, "169.254.170.23"),
    ] {
        let r = send(&s.pod, addr, &credentials_request(host, &token));
        assert_eq!(r.status, 200, "Host {host:?} via {addr}: {}", r.body_text());
    }
    assert_eq!(s.fake.calls(), 1, "one token, one upstream call");
}

#[test]
fn bad_tokens_are_refused_before_any_upstream_call() {
    if !e2e::privileged("bad_tokens_are_refused_before_any_upstream_call") {
        return;
    }
    let s = setup("e2e-badtoken");
    let spec = s.pod.token_spec();
    let expired = s.fake.issue_token(&spec.clone().expired()).unwrap();
    let not_yet = s.fake.issue_token(&spec.clone().not_yet_valid()).unwrap();
    let wrong_aud = s
        .fake
        .issue_token(&spec.clone().audience("sts.amazonaws.com"))
        .unwrap();
    let no_aud_claims = s
        .fake
        .issue_token(&TokenSpec::new("shop", "web-sa").audience(""))
        .unwrap();
    let cases: Vec<(&str, RawRequest)> = vec![
        (
            "no Authorization",
            RawRequest::get("/v1/credentials").host("169.254.170.23"),
        ),
        (
            "empty Authorization",
            credentials_request("169.254.170.23", ""),
        ),
        (
            "not a JWT",
            credentials_request("169.254.170.23", "not-a-jwt"),
        ),
        (
            "two parts",
            credentials_request("169.254.170.23", "abc.def"),
        ),
        (
            "payload not base64",
            credentials_request("169.254.170.23", "eyJhbGciOiJIUzI1NiJ9.!!!.sig"),
        ),
        (
            "payload not JSON",
            credentials_request("169.254.170.23", "eyJhbGciOiJIUzI1NiJ9.bm90IGpzb24.sig"),
        ),
        ("expired", credentials_request("169.254.170.23", &expired)),
        (
            "not yet valid",
            credentials_request("169.254.170.23", &not_yet),
        ),
        (
            "wrong audience",
            credentials_request("169.254.170.23", &wrong_aud),
        ),
        (
            "empty audience",
            credentials_request("169.254.170.23", &no_aud_claims),
        ),
    ];
    for (what, request) in &cases {
        let r = send(&s.pod, v4(), request);
        assert_eq!(r.status, 400, "{what}: {}", r.body_text());
        assert!(!r.body.is_empty(), "{what}: the 400 names no reason");
    }
    assert_eq!(s.fake.calls(), 0, "a bad token reached EKS Auth");
    assert!(
        s.agent
            .metric(r#"pod_identity_http_response{code="400"}"#)
            .unwrap()
            >= cases.len() as f64
    );
    sdks_still_work(&s);
}

#[test]
fn other_paths_are_404_and_other_methods_405() {
    if !e2e::privileged("other_paths_are_404_and_other_methods_405") {
        return;
    }
    let s = setup("e2e-paths");
    let token = s.pod.refresh_token(&s.fake).unwrap();
    for path in [
        "/",
        "/v1/credentials/",
        "/v1/credential",
        "/v2/credentials",
        "/latest/meta-data/iam/security-credentials/",
        "/healthz",
        "/metrics",
    ] {
        let mut request = credentials_request("169.254.170.23", &token);
        request.path = path.to_owned();
        let r = send(&s.pod, v4(), &request);
        assert_eq!(r.status, 404, "GET {path}: {}", r.body_text());
    }
    for method in ["POST", "PUT", "DELETE", "PATCH"] {
        let request = credentials_request("169.254.170.23", &token)
            .method(method)
            .body(b"{}");
        let r = send(&s.pod, v4(), &request);
        assert_eq!(r.status, 405, "{method}: {}", r.body_text());
        assert_eq!(r.header("allow"), Some("GET"), "{method}: {:?}", r.headers);
    }
    assert_eq!(s.fake.calls(), 0, "a wrong path or method reached EKS Auth");
    sdks_still_work(&s);
}

#[test]
fn an_oversized_header_is_refused_and_the_agent_stays_up() {
    if !e2e::privileged("an_oversized_header_is_refused_and_the_agent_stays_up") {
        return;
    }
    let mut s = setup("e2e-bighead");
    let token = s.pod.refresh_token(&s.fake).unwrap();
    let pad = "x".repeat(64 * 1024);
    let huge_token = format!("{token}{pad}");
    // `may_reset`: a 64 KiB head is more than the agent reads (16 KiB), so it may close with
    // unread bytes, which resets the connection and can lose the 431 on its way. 200 short headers
    // (a few KiB) are read whole, so nothing can reset that connection: the 431 must arrive.
    for (what, request, may_reset) in [
        (
            "64 KiB X-Pad header",
            credentials_request("169.254.170.23", &token).header("X-Pad", &pad),
            true,
        ),
        (
            "64 KiB Authorization",
            credentials_request("169.254.170.23", &huge_token),
            true,
        ),
        (
            "200 headers",
            (0..200).fold(credentials_request("169.254.170.23", &token), |r, i| {
                r.header(&format!("X-H{i}"), "v")
            }),
            false,
        ),
    ] {
        match s
            .pod
            .raw_http(v4(), &request.to_bytes(), Duration::from_secs(5))
        {
            Ok(r) => assert_eq!(r.status, 431, "{what}: {}", r.body_text()),
            Err(e) if may_reset => eprintln!("{what}: no response ({e:#})"),
            Err(e) => panic!("{what}: no response ({e:#})"),
        }
        assert!(
            s.agent.try_exit_status().unwrap().is_none(),
            "{what}: the agent exited"
        );
        assert_eq!(s.agent.probe("/healthz").unwrap().status, 200, "{what}");
    }
    assert_eq!(s.fake.calls(), 0, "an oversized request reached EKS Auth");
    sdks_still_work(&s);
}

#[test]
fn silent_and_slow_clients_do_not_block_others() {
    if !e2e::privileged("silent_and_slow_clients_do_not_block_others") {
        return;
    }
    let s = setup("e2e-silent");
    let token = s.pod.refresh_token(&s.fake).unwrap();
    // Connections that send nothing, and some that send half a request head, held open.
    let mut idle: Vec<TcpStream> = Vec::new();
    for i in 0..20 {
        let mut stream = s
            .pod
            .netns()
            .run(|| TcpStream::connect_timeout(&v4(), Duration::from_secs(2)))
            .unwrap()
            .expect("connect");
        if i % 2 == 1 {
            stream
                .write_all(b"GET /v1/credentials HTTP/1.1\r\nHost: 169.254")
                .unwrap();
        }
        idle.push(stream);
    }
    assert_eq!(s.fake.calls(), 0);
    // A request queued behind the silent clients would wait for the agent's header-read timeout
    // (5 s) to drop them; the bound sits well under that and well over a loaded machine's latency.
    for _ in 0..3 {
        let started = Instant::now();
        let r = send(&s.pod, v4(), &credentials_request("169.254.170.23", &token));
        assert_eq!(r.status, 200, "{}", r.body_text());
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "a request behind silent clients took {:?}",
            started.elapsed()
        );
    }
    assert_eq!(s.agent.probe("/readyz").unwrap().status, 200);
    sdks_still_work(&s);
    drop(idle);
}
