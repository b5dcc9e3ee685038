//! The agent's credential cache end to end: hits, coalescing, renewal, eviction, the size bound, and
//! serving cached credentials through EKS Auth outages; and how a cold token's upstream errors reach the
//! pod. Needs the agent binary (`cargo build -p eks-pod-identity-agent`).

use std::net::SocketAddr;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use e2e::agent::{AgentArgs, AgentProcess, node_with_web_pods};
use e2e::clients::{RawRequest, RawResponse};
use e2e::fake_eks_auth::{ApiError, FakeEksAuth, Fault, FaultTimes};
use e2e::node::{AGENT_V4, CREDENTIALS_URI_V4, Pod, SimNode};

const HIT: &str = r#"pod_identity_cache_state{state="hit"}"#;
const MISS: &str = r#"pod_identity_cache_state{state="miss"}"#;
const EVICTED: &str = r#"pod_identity_cache_state{state="evicted"}"#;
const ENTRIES: &str = "pod_identity_cache_entries";

struct Setup {
    // Field order is drop order: the agent goes before the pod and the node.
    agent: AgentProcess,
    fake: FakeEksAuth,
    pod: Pod,
    _node: SimNode,
}

fn setup(cluster: &str, extra: &[&str]) -> Setup {
    let (node, fake, [pod]) = node_with_web_pods(cluster, ["web-0"]).unwrap();
    let agent = AgentProcess::start(
        &node,
        &fake,
        AgentArgs::default().args(extra.iter().copied()),
    )
    .unwrap();
    Setup {
        agent,
        fake,
        pod,
        _node: node,
    }
}

/// `GET /v1/credentials` with `token`, from the pod's namespace, over IPv4.
fn get(pod: &Pod, token: &str) -> RawResponse {
    let request = RawRequest::get("/v1/credentials")
        .host("169.254.170.23")
        .authorization(token)
        .to_bytes();
    pod.raw_http(
        SocketAddr::from((AGENT_V4, 80)),
        &request,
        Duration::from_secs(5),
    )
    .unwrap()
}

/// The access key of a 200, failing with the response and the agent's log otherwise.
fn key_of(r: &RawResponse, agent: &AgentProcess, what: &str) -> String {
    assert_eq!(
        r.status,
        200,
        "{what}: {}\nagent log:\n{}",
        r.body_text(),
        agent.logs().unwrap_or_default()
    );
    r.json().unwrap()["AccessKeyId"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[test]
fn a_second_fetch_of_the_same_token_is_served_from_the_cache() {
    if !e2e::privileged("a_second_fetch_of_the_same_token_is_served_from_the_cache") {
        return;
    }
    let s = setup("e2e-hit", &[]);
    let token = s.pod.refresh_token(&s.fake).unwrap();
    let first = key_of(&get(&s.pod, &token), &s.agent, "first fetch");
    assert_eq!(s.fake.calls(), 1);
    let hits = s.agent.metric(HIT).unwrap();

    // An SDK's fetch of the same token, then a raw one.
    let creds = s
        .pod
        .fetch_with_rust_sdk(CREDENTIALS_URI_V4)
        .unwrap()
        .unwrap();
    assert_eq!(creds.access_key_id, first);
    let second = key_of(&get(&s.pod, &token), &s.agent, "second fetch");
    assert_eq!(second, first);
    assert_eq!(s.fake.calls(), 1, "the cached token went upstream again");
    let hits_after = s.agent.metric(HIT).unwrap();
    assert!(
        hits_after >= hits + 2.0,
        "{HIT} went from {hits} to {hits_after}, expected +2"
    );
    assert_eq!(s.agent.metric(MISS).unwrap(), 1.0);
    assert_eq!(s.agent.metric(ENTRIES).unwrap(), 1.0);
}

#[test]
fn fifty_concurrent_cold_requests_share_one_upstream_call() {
    if !e2e::privileged("fifty_concurrent_cold_requests_share_one_upstream_call") {
        return;
    }
    let s = setup("e2e-coalesce", &[]);
    // Slow upstream, so all 50 requests arrive while the first call is under way.
    s.fake.set_delay(Duration::from_millis(300));
    let token = s.pod.refresh_token(&s.fake).unwrap();
    let barrier = Arc::new(Barrier::new(50));
    let results: Vec<RawResponse> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..50)
            .map(|_| {
                let barrier = Arc::clone(&barrier);
                let (pod, token) = (&s.pod, &token);
                scope.spawn(move || {
                    barrier.wait();
                    get(pod, token)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let keys: Vec<String> = results
        .iter()
        .map(|r| key_of(r, &s.agent, "concurrent fetch"))
        .collect();
    assert_eq!(
        s.fake.calls_for_token(&token),
        1,
        "50 concurrent requests for one token made more than one upstream call"
    );
    assert!(
        keys.iter().all(|k| *k == keys[0]),
        "different keys: {keys:?}"
    );
    assert_eq!(keys[0], s.fake.issued()[0].access_key_id);
}

#[test]
fn credentials_are_renewed_before_the_retention_limit() {
    if !e2e::privileged("credentials_are_renewed_before_the_retention_limit") {
        return;
    }
    let s = setup(
        "e2e-renew",
        &["--max-credential-retention-before-renewal", "3s"],
    );
    let token = s.pod.refresh_token(&s.fake).unwrap();
    let first = key_of(&get(&s.pod, &token), &s.agent, "first fetch");
    // A call is recorded when it arrives, its credentials when they are issued: wait for those.
    let renewed_keys = || -> Vec<String> {
        s.fake
            .issued()
            .into_iter()
            .map(|c| c.access_key_id)
            .filter(|k| *k != first)
            .collect()
    };
    assert!(
        e2e::wait_for(Duration::from_secs(8), || !renewed_keys().is_empty()),
        "no renewal issued a new key within 8 s of a 3 s retention (calls for the token: {}); agent log:\n{}",
        s.fake.calls_for_token(&token),
        s.agent.logs().unwrap_or_default()
    );
    let renewed = renewed_keys();
    let misses = s.agent.metric(MISS).unwrap();
    let next = key_of(&get(&s.pod, &token), &s.agent, "fetch after renewal");
    assert_ne!(next, first, "still the old key after the renewal");
    assert!(
        renewed.contains(&next),
        "{next} is not a renewed key ({renewed:?})"
    );
    assert_eq!(
        s.agent.metric(MISS).unwrap(),
        misses,
        "the fetch after renewal went upstream itself"
    );
    assert!(
        s.agent
            .metric(r#"pod_identity_cache_state{state="refresh"}"#)
            .unwrap()
            >= 1.0
    );
}

#[test]
fn a_permanent_error_at_renewal_evicts_the_entry() {
    if !e2e::privileged("a_permanent_error_at_renewal_evicts_the_entry") {
        return;
    }
    let s = setup(
        "e2e-evict",
        &["--max-credential-retention-before-renewal", "3s"],
    );
    let token = s.pod.refresh_token(&s.fake).unwrap();
    key_of(&get(&s.pod, &token), &s.agent, "first fetch");
    let evicted = s.agent.metric(EVICTED).unwrap();
    s.fake
        .set_fault(Fault::Error(ApiError::AccessDenied), FaultTimes::Always);
    assert!(
        e2e::wait_for(Duration::from_secs(8), || s.agent.metric(EVICTED).unwrap()
            > evicted),
        "{EVICTED} did not rise within 8 s after renewals were denied; calls for the token: {}; log:\n{}",
        s.fake.calls_for_token(&token),
        s.agent.logs().unwrap_or_default()
    );
    let calls = s.fake.calls_for_token(&token);
    let r = get(&s.pod, &token);
    assert_eq!(
        s.fake.calls_for_token(&token),
        calls + 1,
        "the evicted token's next request did not go upstream"
    );
    assert_eq!(r.status, 400, "{}", r.body_text());
    assert!(
        r.body_text().starts_with("(AccessDeniedException): "),
        "{}",
        r.body_text()
    );
    assert_eq!(s.agent.metric(ENTRIES).unwrap(), 0.0);
}

#[test]
fn the_cache_is_bounded_and_evicts_the_least_recently_used() {
    if !e2e::privileged("the_cache_is_bounded_and_evicts_the_least_recently_used") {
        return;
    }
    let s = setup("e2e-lru", &["--max-cache-size", "2"]);
    let tokens: Vec<String> = (0..3)
        .map(|_| s.pod.refresh_token(&s.fake).unwrap())
        .collect();
    let (a, b, c) = (&tokens[0], &tokens[1], &tokens[2]);
    let mut over_bound = Vec::new();
    for (name, t) in [("a", a), ("b", b), ("c", c)] {
        key_of(&get(&s.pod, t), &s.agent, name);
        let entries = s.agent.metric(ENTRIES).unwrap();
        if entries > 2.0 {
            over_bound.push(format!("{ENTRIES} = {entries} after {name}"));
        }
    }
    assert_eq!(s.fake.calls(), 3);
    // c is the most recent: still cached.
    key_of(&get(&s.pod, c), &s.agent, "c again");
    assert_eq!(s.fake.calls_for_token(c), 1, "c was evicted, not a");
    // a was the least recently used: evicted, so it goes upstream again.
    key_of(&get(&s.pod, a), &s.agent, "a again");
    assert_eq!(
        s.fake.calls_for_token(a),
        2,
        "a, the least recently used of three tokens in a cache of 2, was still cached (over the bound: {over_bound:?})"
    );
    let entries = s.agent.metric(ENTRIES).unwrap();
    if entries > 2.0 {
        over_bound.push(format!("{ENTRIES} = {entries} at the end"));
    }
    assert!(s.agent.metric(EVICTED).unwrap() >= 1.0);
    assert!(
        over_bound.is_empty(),
        "the cache held more than --max-cache-size 2 entries: {over_bound:?}"
    );
}

#[test]
fn max_cache_size_zero_calls_upstream_for_every_request() {
    if !e2e::privileged("max_cache_size_zero_calls_upstream_for_every_request") {
        return;
    }
    let s = setup("e2e-nocache", &["--max-cache-size", "0"]);
    let token = s.pod.refresh_token(&s.fake).unwrap();
    let mut keys = Vec::new();
    for i in 1..=3 {
        keys.push(key_of(&get(&s.pod, &token), &s.agent, "uncached fetch"));
        assert_eq!(s.fake.calls_for_token(&token), i, "fetch {i}");
    }
    keys.sort_unstable();
    keys.dedup();
    assert_eq!(keys.len(), 3, "each call hands out fresh credentials");
    assert_eq!(s.agent.metric(HIT).unwrap(), 0.0);
    assert_eq!(s.agent.metric(ENTRIES).unwrap(), 0.0);
}

/// Warms the cache, then makes every upstream call fail with `fault`; once a renewal has failed, the
/// pod must still get the cached credentials, fast.
fn cached_credentials_survive(cluster: &str, fault: Fault) {
    let s = setup(
        cluster,
        &["--max-credential-retention-before-renewal", "3s"],
    );
    let token = s.pod.refresh_token(&s.fake).unwrap();
    let cached = key_of(&get(&s.pod, &token), &s.agent, "warming fetch");
    s.fake.set_fault(fault, FaultTimes::Always);
    assert!(
        e2e::wait_for(Duration::from_secs(8), || s.fake.calls_for_token(&token)
            >= 2),
        "{fault:?}: no renewal attempt within 8 s; log:\n{}",
        s.agent.logs().unwrap_or_default()
    );
    // Let the failing renewal finish (a hang takes the agent's whole call timeout).
    let call_timeout = pod_identity_agent::config::UpstreamConfig::default().call_timeout;
    assert!(
        e2e::wait_for(call_timeout + Duration::from_secs(2), || {
            s.agent.metric("pod_identity_upstream_in_flight").unwrap() == 0.0
        }),
        "{fault:?}: the renewal call never ended"
    );
    for _ in 0..3 {
        let started = Instant::now();
        let r = get(&s.pod, &token);
        let elapsed = started.elapsed();
        let key = key_of(&r, &s.agent, &format!("{fault:?}: fetch during the outage"));
        assert_eq!(key, cached, "{fault:?}: not the cached key");
        assert!(
            elapsed < Duration::from_millis(500),
            "{fault:?}: a cached answer took {elapsed:?}"
        );
    }
    let metrics = s.agent.metrics().unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("pod_identity_cache_errors{") && l.contains(r#"type="refresh""#)),
        "{fault:?}: no refresh error counted:\n{metrics}"
    );
    assert_eq!(s.agent.probe("/healthz").unwrap().status, 200);
}

#[test]
fn cached_credentials_are_served_while_eks_auth_returns_500() {
    if !e2e::privileged("cached_credentials_are_served_while_eks_auth_returns_500") {
        return;
    }
    cached_credentials_survive("e2e-out500", Fault::Error(ApiError::InternalServer));
}

#[test]
fn cached_credentials_are_served_while_eks_auth_returns_503() {
    if !e2e::privileged("cached_credentials_are_served_while_eks_auth_returns_503") {
        return;
    }
    cached_credentials_survive("e2e-out503", Fault::Error(ApiError::ServiceUnavailable));
}

#[test]
fn cached_credentials_are_served_while_eks_auth_throttles() {
    if !e2e::privileged("cached_credentials_are_served_while_eks_auth_throttles") {
        return;
    }
    cached_credentials_survive("e2e-out429", Fault::Error(ApiError::Throttling));
}

#[test]
fn cached_credentials_are_served_while_eks_auth_hangs() {
    if !e2e::privileged("cached_credentials_are_served_while_eks_auth_hangs") {
        return;
    }
    cached_credentials_survive("e2e-outhang", Fault::Hang);
}

#[test]
fn cached_credentials_are_served_while_eks_auth_sends_garbage() {
    if !e2e::privileged("cached_credentials_are_served_while_eks_auth_sends_garbage") {
        return;
    }
    cached_credentials_survive("e2e-outgarbage", Fault::Garbage);
}

#[test]
fn cold_token_upstream_errors_reach_the_pod_with_their_status_and_code() {
    if !e2e::privileged("cold_token_upstream_errors_reach_the_pod_with_their_status_and_code") {
        return;
    }
    let s = setup("e2e-coldfail", &[]);
    for (error, status) in [
        (ApiError::InvalidToken, 400),
        (ApiError::ExpiredToken, 400),
        (ApiError::AccessDenied, 400),
        (ApiError::ResourceNotFound, 404),
        (ApiError::Throttling, 429),
    ] {
        s.fake.set_fault(Fault::Error(error), FaultTimes::Always);
        let token = s.pod.refresh_token(&s.fake).unwrap();
        let r = get(&s.pod, &token);
        assert_eq!(r.status, status, "{error:?}: {}", r.body_text());
        let expected = format!("({}): ", error.type_name());
        assert!(
            r.body_text().starts_with(&expected),
            "{error:?}: body {:?}, expected `{expected}message`",
            r.body_text()
        );
        assert!(
            r.header("content-type")
                .is_some_and(|t| t.starts_with("text/plain")),
            "{error:?}: {:?}",
            r.headers
        );
        assert!(s.fake.calls_for_token(&token) >= 1);
        // A real SDK sees an error (botocore retries every non-200, so this takes a few seconds).
        if error != ApiError::InvalidToken {
            let outcome = s.pod.fetch_with_botocore(CREDENTIALS_URI_V4).unwrap();
            assert!(outcome.is_err(), "{error:?}: botocore got {outcome:?}");
        }
        assert_eq!(
            s.agent.probe("/healthz").unwrap().status,
            200,
            "{error:?}: the agent is not healthy"
        );
    }
    s.fake.clear_fault();
    let creds = s
        .pod
        .fetch_with_botocore(CREDENTIALS_URI_V4)
        .unwrap()
        .expect("a normal fetch after the errors");
    assert!(creds.access_key_id.starts_with("ASIA"));
}
