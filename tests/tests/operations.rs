//! Running the agent: graceful shutdown, probes, metrics (names and `promtool`), secrets kept out of the
//! logs, a missing bind host, and `--rotate-credentials`. Needs the agent binary
//! (`cargo build -p eks-pod-identity-agent`) and, for the metrics lint, `promtool` (Debian `prometheus`).

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use e2e::agent::{AgentArgs, AgentProcess, node_with_web_pods, write_credentials_file};
use e2e::clients::{RawRequest, RawResponse};
use e2e::fake_eks_auth::{ApiError, FakeEksAuth, Fault, FaultTimes};
use e2e::node::{AGENT_V4, AGENT_V6, CREDENTIALS_URI_V4, CREDENTIALS_URI_V6, Pod};

/// The original agent's counters, whose names must stay exactly as they are (no `_total`), and the
/// one its next release adds (local validation).
const ORIGINAL_COUNTERS: [&str; 4] = [
    "pod_identity_http_response",
    "pod_identity_cache_state",
    "pod_identity_cache_errors",
    "pod_identity_local_validation",
];

fn get(pod: &Pod, addr: SocketAddr, token: &str) -> anyhow::Result<RawResponse> {
    let host = match addr {
        SocketAddr::V4(a) => a.ip().to_string(),
        SocketAddr::V6(a) => format!("[{}]", a.ip()),
    };
    let request = RawRequest::get("/v1/credentials")
        .host(&host)
        .authorization(token)
        .to_bytes();
    pod.raw_http(addr, &request, Duration::from_secs(5))
}

fn v4() -> SocketAddr {
    SocketAddr::from((AGENT_V4, 80))
}

#[test]
fn sigterm_lets_a_request_in_flight_finish_and_exits_0() {
    if !e2e::privileged("sigterm_lets_a_request_in_flight_finish_and_exits_0") {
        return;
    }
    let (_node, fake, [pod]) = node_with_web_pods("e2e-sigterm", ["web-0"]).unwrap();
    let agent = AgentProcess::start(&_node, &fake, AgentArgs::default()).unwrap();
    // Slow, but inside the agent's own per-attempt timeout (1 s), so the call itself succeeds.
    fake.set_delay(Duration::from_millis(250));
    let token = pod.refresh_token(&fake).unwrap();
    std::thread::scope(|scope| {
        let in_flight = scope.spawn(|| get(&pod, v4(), &token));
        assert!(
            e2e::wait_for(Duration::from_secs(3), || fake.calls() >= 1),
            "the request never reached EKS Auth"
        );
        let started = Instant::now();
        let logs_path = agent.log_path().to_path_buf();
        let status = agent.stop().unwrap();
        let log = std::fs::read_to_string(&logs_path).unwrap_or_default();
        assert!(status.success(), "exit status on SIGTERM: {status}\n{log}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "shutdown took {:?}",
            started.elapsed()
        );
        let r = in_flight
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("the in-flight request got no answer: {e:#}\n{log}"));
        assert_eq!(r.status, 200, "in-flight request: {}\n{log}", r.body_text());
        assert_eq!(
            r.json().unwrap()["AccessKeyId"],
            fake.issued()[0].access_key_id.as_str()
        );
    });
    // Nothing listens any more.
    let after = get(&pod, v4(), &token);
    assert!(
        after.is_err(),
        "the agent still answers after exiting: {after:?}"
    );
}

#[test]
fn probes_answer_on_the_probe_port_and_the_metrics_port() {
    if !e2e::privileged("probes_answer_on_the_probe_port_and_the_metrics_port") {
        return;
    }
    let (node, fake, [_pod]) = node_with_web_pods("e2e-probes", ["web-0"]).unwrap();
    let agent = AgentProcess::start(&node, &fake, AgentArgs::default()).unwrap();
    for path in ["/healthz", "/readyz"] {
        let r = agent.probe(path).unwrap();
        assert_eq!(r.status, 200, "probe port {path}: {}", r.body_text());
        let r = agent.metrics_port_get(path).unwrap();
        assert_eq!(r.status, 200, "metrics port {path}: {}", r.body_text());
    }
    let r = agent.metrics_port_get("/metrics").unwrap();
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type")
            .is_some_and(|t| t.starts_with("text/plain")),
        "{:?}",
        r.headers
    );
    assert_eq!(agent.probe("/nope").unwrap().status, 404);
    assert_eq!(fake.calls(), 0, "probes must not call EKS Auth");
}

/// Runs `promtool check metrics` on `exposition`; returns (success, combined output).
fn promtool_check(exposition: &str) -> (bool, String) {
    use std::io::Write as _;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package `prometheus`) must be installed");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(exposition.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn metrics_pass_promtool_and_keep_the_original_names() {
    if !e2e::privileged("metrics_pass_promtool_and_keep_the_original_names") {
        return;
    }
    let (node, fake, [pod]) = node_with_web_pods("e2e-metrics", ["web-0"]).unwrap();
    let agent = AgentProcess::start(&node, &fake, AgentArgs::default()).unwrap();
    // Traffic of every kind: a miss, a hit, a refusal, an upstream error.
    let token = pod.refresh_token(&fake).unwrap();
    assert_eq!(get(&pod, v4(), &token).unwrap().status, 200);
    assert_eq!(get(&pod, v4(), &token).unwrap().status, 200);
    assert_eq!(get(&pod, v4(), "not-a-jwt").unwrap().status, 400);
    fake.set_fault(Fault::Error(ApiError::AccessDenied), FaultTimes::Next(1));
    let denied = pod.refresh_token(&fake).unwrap();
    assert_eq!(get(&pod, v4(), &denied).unwrap().status, 400);

    let text = agent.metrics().unwrap();
    let (ok, output) = promtool_check(&text);
    let allowed: Vec<String> = ORIGINAL_COUNTERS
        .iter()
        .map(|name| format!("{name} counter metrics should have \"_total\" suffix"))
        .collect();
    let problems: Vec<&str> = output
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !allowed.iter().any(|a| a == l))
        .collect();
    assert!(
        problems.is_empty(),
        "promtool check metrics (ok={ok}) found problems other than the original names' missing _total:\n{output}\n--- exposition ---\n{text}"
    );

    for (name, kind) in [
        ("pod_identity_http_response", "counter"),
        ("pod_identity_cache_state", "counter"),
        ("pod_identity_cache_errors", "counter"),
        ("pod_identity_request_duration_seconds", "histogram"),
        ("pod_identity_upstream_duration_seconds", "histogram"),
        ("pod_identity_cache_entries", "gauge"),
        ("pod_identity_upstream_in_flight", "gauge"),
    ] {
        let declaration = format!("# TYPE {name} {kind}");
        assert!(
            text.lines().any(|l| l == declaration),
            "missing `{declaration}`:\n{text}"
        );
    }
    for name in ORIGINAL_COUNTERS {
        assert!(
            !text.contains(&format!("{name}_total")),
            "{name} got a _total suffix:\n{text}"
        );
    }
    let value = |series: &str| e2e::agent::metric_value(&text, series).unwrap_or(0.0);
    assert_eq!(
        value(r#"pod_identity_http_response{code="200"}"#),
        2.0,
        "{text}"
    );
    assert_eq!(
        value(r#"pod_identity_http_response{code="400"}"#),
        2.0,
        "{text}"
    );
    assert_eq!(
        value(r#"pod_identity_cache_state{state="hit"}"#),
        1.0,
        "{text}"
    );
    assert_eq!(
        value(r#"pod_identity_cache_state{state="miss"}"#),
        1.0,
        "{text}"
    );
    assert_eq!(
        value(r#"pod_identity_cache_errors{code="AccessDeniedException",type="fetch"}"#),
        1.0,
        "{text}"
    );
    assert!(
        value("pod_identity_request_duration_seconds_count") >= 4.0,
        "{text}"
    );
    assert_eq!(value("pod_identity_cache_entries"), 1.0, "{text}");
    assert_eq!(value("pod_identity_upstream_in_flight"), 0.0, "{text}");
}

/// Where in `log` any of `secrets` appears (the secret itself is not repeated in the message).
fn leaks(log: &str, secrets: &[(String, String)]) -> Vec<String> {
    secrets
        .iter()
        .filter(|(_, secret)| log.contains(secret.as_str()))
        .map(|(what, secret)| {
            let line = log
                .lines()
                .position(|l| l.contains(secret.as_str()))
                .unwrap_or(0);
            format!("{what} (log line {})", line + 1)
        })
        .collect()
}

#[test]
fn no_secret_appears_in_the_logs_even_at_trace() {
    if !e2e::privileged("no_secret_appears_in_the_logs_even_at_trace") {
        return;
    }
    let (node, fake, [pod]) = node_with_web_pods("e2e-secrets", ["web-0"]).unwrap();
    let agent = AgentProcess::start(
        &node,
        &fake,
        AgentArgs::default().args([
            "-v",
            "trace",
            "--max-credential-retention-before-renewal",
            "3s",
        ]),
    )
    .unwrap();
    let mut tokens = Vec::new();
    // Cold fetches by both SDKs over both families, a hit, an error, and a renewal.
    for uri in [CREDENTIALS_URI_V4, CREDENTIALS_URI_V6] {
        tokens.push(pod.refresh_token(&fake).unwrap());
        pod.fetch_with_rust_sdk(uri).unwrap().unwrap();
        pod.fetch_with_botocore(uri).unwrap().unwrap();
    }
    // The pod's newest verified token: older ones stop renewing once a newer one is verified.
    let renewing = tokens[1].clone();
    fake.set_fault(Fault::Error(ApiError::InvalidToken), FaultTimes::Next(1));
    tokens.push(pod.refresh_token(&fake).unwrap());
    assert_eq!(
        get(
            &pod,
            SocketAddr::from((AGENT_V6, 80)),
            tokens.last().unwrap()
        )
        .unwrap()
        .status,
        400
    );
    assert!(
        e2e::wait_for(Duration::from_secs(8), || fake.calls_for_token(&renewing)
            >= 2),
        "no renewal within 8 s"
    );

    let mut secrets: Vec<(String, String)> = vec![(
        "the agent's own AWS_SECRET_ACCESS_KEY".into(),
        "e2e-agent-test-secret".into(),
    )];
    for (i, token) in tokens.iter().enumerate() {
        secrets.push((format!("token {i}"), token.clone()));
        let signature = token.rsplit('.').next().unwrap().to_owned();
        secrets.push((format!("token {i}'s signature"), signature));
    }
    for c in fake.issued() {
        secrets.push((
            format!("secret access key of {}", c.access_key_id),
            c.secret_access_key.clone(),
        ));
        secrets.push((
            format!("session token of {}", c.access_key_id),
            c.session_token.clone(),
        ));
    }
    let log = agent.logs().unwrap();
    assert!(
        log.contains("TRACE") || log.contains("DEBUG"),
        "the agent logged nothing below INFO at -v trace: is the level honoured?"
    );
    let found = leaks(&log, &secrets);
    assert!(
        found.is_empty(),
        "secrets in the agent's log at -v trace ({} lines, at {}): {found:?}",
        log.lines().count(),
        agent.log_path().display()
    );
}

#[test]
fn a_bind_host_that_is_not_on_the_node_is_skipped_with_a_warning() {
    if !e2e::privileged("a_bind_host_that_is_not_on_the_node_is_skipped_with_a_warning") {
        return;
    }
    let (node, fake, [pod]) = node_with_web_pods("e2e-missinghost", ["web-0"]).unwrap();
    let agent = AgentProcess::start(
        &node,
        &fake,
        AgentArgs::default().args(["-b", "169.254.170.23", "-b", "169.254.170.99"]),
    )
    .expect("the agent must start when one bind host is missing");
    let token = pod.refresh_token(&fake).unwrap();
    let r = get(&pod, v4(), &token).unwrap();
    assert_eq!(r.status, 200, "{}", r.body_text());
    let warned = agent
        .log_records()
        .unwrap()
        .into_iter()
        .any(|r| r["level"] == "WARN" && r.to_string().contains("169.254.170.99"));
    assert!(
        warned,
        "no warning naming 169.254.170.99:\n{}",
        agent.logs().unwrap()
    );
    // Only the given hosts are served: not the default IPv6 one.
    assert!(
        get(&pod, SocketAddr::from((AGENT_V6, 80)), &token).is_err(),
        "the agent serves [fd00:ec2::23] although -b did not name it"
    );
}

/// The access key id in the SigV4 `Credential=` of the fake's last request.
fn signing_key(fake: &FakeEksAuth) -> String {
    let request = fake.last_request().expect("a request reached the fake");
    let authorization = request.header("authorization").unwrap_or_default();
    authorization
        .split("Credential=")
        .nth(1)
        .and_then(|c| c.split('/').next())
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn rotate_credentials_signs_with_the_rewritten_key_without_a_restart() {
    if !e2e::privileged("rotate_credentials_signs_with_the_rewritten_key_without_a_restart") {
        return;
    }
    let (node, fake, [pod]) = node_with_web_pods("e2e-rotate", ["web-0"]).unwrap();
    let file = node.dir().join("agent-credentials");
    write_credentials_file(&file, "AKIAE2EROTATED000001", "rotated-secret-one").unwrap();
    let args = AgentArgs::default()
        .args(["--rotate-credentials"])
        .shared_credentials_file(&file);
    let mut agent = AgentProcess::start(&node, &fake, args).unwrap();
    let pid = agent.pid();

    let first = pod.refresh_token(&fake).unwrap();
    let r = get(&pod, v4(), &first).unwrap();
    assert_eq!(
        r.status,
        200,
        "{}\n{}",
        r.body_text(),
        agent.logs().unwrap()
    );
    assert_eq!(signing_key(&fake), "AKIAE2EROTATED000001");

    write_credentials_file(&file, "AKIAE2EROTATED000002", "rotated-secret-two").unwrap();
    let second = pod.refresh_token(&fake).unwrap();
    let r = get(&pod, v4(), &second).unwrap();
    assert_eq!(r.status, 200, "{}", r.body_text());
    assert_eq!(fake.calls(), 2);
    assert_eq!(
        signing_key(&fake),
        "AKIAE2EROTATED000002",
        "the call after the file was rewritten was not signed with the new key"
    );
    assert_eq!(agent.pid(), pid);
    assert!(
        agent.try_exit_status().unwrap().is_none(),
        "the agent restarted or exited"
    );
    // The first token is still served from the cache.
    assert_eq!(get(&pod, v4(), &first).unwrap().status, 200);
    assert_eq!(fake.calls(), 2);
    let log = agent.logs().unwrap();
    for secret in ["rotated-secret-one", "rotated-secret-two"] {
        assert!(!log.contains(secret), "the agent logged its own secret key");
    }
}
