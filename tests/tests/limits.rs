//! Per-pod limits end to end: the connect limit enforced in the kernel (`EPERM` at `connect()`), the
//! request limit in the agent (429 with `Retry-After`, on a keep-alive connection), each without
//! hurting a neighbouring pod; and no more renewals for a pod that is gone.
//!
//! Needs root, cgroup v2, eBPF, and the agent binary (`cargo build -p eks-pod-identity-agent`).

use std::process::Stdio;
use std::time::{Duration, Instant};

use e2e::agent::{AgentArgs, AgentProcess, node_with_web_pods, start_fake_eks_auth_in};
use e2e::cgroup::CgroupDriver;
use e2e::clients::{Family, FloodReport};
use e2e::fake_eks_auth::decode_unverified;
use e2e::fake_kube_api;
use e2e::node::{CREDENTIALS_URI_V4, CREDENTIALS_URI_V6, PodSpec, SimNode};

const EPERM: i32 = 1;

fn jti(token: &str) -> String {
    decode_unverified(token).unwrap().jti
}

/// Checks that every connect of `flood` either succeeded or was refused with `EPERM` at once: well
/// under the 1 s a first SYN retransmission would take, with room for a loaded machine's scheduling.
fn assert_refusals_are_eperm_at_once(flood: &FloodReport) {
    for a in &flood.attempts {
        assert!(a.errno == 0 || a.errno == EPERM, "unexpected errno: {a:?}");
        if a.errno == EPERM {
            assert!(
                a.elapsed_us < 500_000,
                "a refused connect fails at once, not after SYN retries: {a:?}"
            );
        }
    }
}

#[test]
fn a_connect_flood_is_refused_in_the_kernel_while_a_neighbour_is_served() {
    if !e2e::privileged("a_connect_flood_is_refused_in_the_kernel_while_a_neighbour_is_served") {
        return;
    }
    let node = SimNode::new().unwrap();
    let fake = start_fake_eks_auth_in(node.netns(), "e2e-connect-limit").unwrap();
    fake.associate("noisy", "flood-sa", "flood-role");
    fake.associate("quiet", "calm-sa", "calm-role");
    let flooder = node
        .add_pod(PodSpec::new("flooder-0", "noisy", "flood-sa"))
        .unwrap();
    let neighbour = node
        .add_pod(PodSpec::new("calm-0", "quiet", "calm-sa").driver(CgroupDriver::Cgroupfs))
        .unwrap();
    flooder.refresh_token(&fake).unwrap();
    neighbour.refresh_token(&fake).unwrap();
    let agent = AgentProcess::start(
        &node,
        &fake,
        AgentArgs::default().args(["--pod-connect-rate", "1", "--pod-connect-burst", "3"]),
    )
    .unwrap();

    // One real request first (it takes one connection of the burst), so the agent learns the pod's
    // namespace and can label the kernel's refusals with it.
    let first = flooder
        .python_requests(Family::V4, &flooder.token_path(), 1, false)
        .unwrap();
    assert_eq!(
        first.exchanges[0].status,
        Some(200),
        "{:?}",
        first.exchanges[0]
    );

    // 20 connects in a tight loop, over all three ways in: the 2 left of the burst pass, the rest
    // are refused in connect() itself.
    let all = [Family::V4, Family::V6, Family::V4Mapped];
    let burst = flooder
        .connect_flood(&all, 20, Duration::ZERO, Duration::ZERO)
        .unwrap();
    assert_refusals_are_eperm_at_once(&burst);
    assert!(
        burst.connected() <= 3,
        "at most the burst passes: {} connected of {:?}",
        burst.connected(),
        burst.attempts
    );
    assert!(burst.failed_with(EPERM) >= 17, "{:?}", burst.attempts);
    for family in ["v4", "v6", "v4mapped"] {
        assert!(
            burst
                .attempts
                .iter()
                .any(|a| a.family == family && a.errno == EPERM),
            "{family} connects are limited too: {:?}",
            burst.attempts
        );
    }

    // A longer flood, with the neighbour fetching through both addresses meanwhile.
    let started = Instant::now();
    let mut child = flooder
        .connect_flood_command(&all, 0, Duration::from_secs(4), Duration::from_millis(5))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    for uri in [CREDENTIALS_URI_V4, CREDENTIALS_URI_V6] {
        let served = neighbour.fetch_with_botocore(uri).unwrap();
        assert!(
            served.is_ok(),
            "the neighbour is served via {uri}: {served:?}"
        );
    }
    let neighbour_done = started.elapsed();
    assert!(
        child.try_wait().unwrap().is_none(),
        "the neighbour was served while the flood went on (it took {neighbour_done:?}, the flood 4 s)"
    );
    let long = FloodReport::parse(&child.wait_with_output().unwrap()).unwrap();
    assert_refusals_are_eperm_at_once(&long);
    // 1 connection a second over ~4 s, plus at most one whole token of slack.
    assert!(
        long.connected() <= 6,
        "{} connects passed in 4 s at 1/s",
        long.connected()
    );
    assert!(long.failed_with(EPERM) >= 100, "{}", long.attempts.len());

    // The agent reads the kernel's counters every few seconds, off the scrape.
    let refused = burst.failed_with(EPERM) + long.failed_with(EPERM);
    let denied = "pod_identity_connections_denied_total{namespace=\"noisy\"}";
    e2e::wait_for(Duration::from_secs(15), || {
        agent.metric(denied).unwrap() >= refused as f64
    });
    assert_eq!(
        agent.metric(denied).unwrap(),
        refused as f64,
        "every refusal is counted, under the pod's namespace:\n{}",
        agent.metrics().unwrap()
    );
    assert_eq!(
        agent
            .metric("pod_identity_connections_denied_total{namespace=\"quiet\"}")
            .unwrap(),
        0.0
    );
}

#[test]
fn the_request_limit_answers_429_with_retry_after_on_a_keep_alive_connection() {
    if !e2e::privileged("the_request_limit_answers_429_with_retry_after_on_a_keep_alive_connection")
    {
        return;
    }
    let (node, fake, [busy, other]) =
        node_with_web_pods("e2e-request-limit", ["busy-0", "other-0"]).unwrap();
    busy.refresh_token(&fake).unwrap();
    other.refresh_token(&fake).unwrap();
    let agent = AgentProcess::start(
        &node,
        &fake,
        AgentArgs::default().args(["--pod-request-rate", "1", "--pod-request-burst", "2"]),
    )
    .unwrap();

    let run = busy
        .python_requests(Family::V4, &busy.token_path(), 6, true)
        .unwrap();
    let served = other
        .python_requests(Family::V6, &other.token_path(), 2, true)
        .unwrap();

    let statuses: Vec<Option<u16>> = run.exchanges.iter().map(|e| e.status).collect();
    assert_eq!(statuses[..3], [Some(200), Some(200), Some(429)], "{run:#?}");
    let limited: Vec<_> = run
        .exchanges
        .iter()
        .filter(|e| e.status == Some(429))
        .collect();
    assert!(limited.len() >= 3, "{statuses:?}");
    for e in &limited {
        let retry_after: u64 = e
            .header("retry-after")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("429 without a numeric Retry-After: {e:?}"));
        assert!((1..=2).contains(&retry_after), "{e:?}");
        assert!(!e.body.contains("ASIA"), "{e:?}");
    }
    let port = run.exchanges[0].local_port;
    assert!(
        run.exchanges.iter().all(|e| e.local_port == port),
        "all on one keep-alive connection: {run:#?}"
    );
    for e in &served.exchanges {
        assert_eq!(e.status, Some(200), "another pod is served: {e:?}");
    }

    // The pod's allowance refills.
    std::thread::sleep(Duration::from_millis(1100));
    let later = busy
        .python_requests(Family::V4, &busy.token_path(), 1, false)
        .unwrap();
    assert_eq!(later.exchanges[0].status, Some(200), "{later:#?}");

    let n = limited.len() as f64;
    assert_eq!(
        agent
            .metric("pod_identity_http_response{code=\"429\"}")
            .unwrap(),
        n
    );
    assert_eq!(
        agent
            .metric("pod_identity_pod_requests_limited_total")
            .unwrap(),
        n,
        "the per-pod limit's refusals are counted"
    );
}

#[test]
fn renewals_stop_once_a_pod_is_deleted() {
    if !e2e::privileged("renewals_stop_once_a_pod_is_deleted") {
        return;
    }
    let (node, fake, [doomed, live]) =
        node_with_web_pods("e2e-lifecycle", ["doomed-0", "live-0"]).unwrap();
    let doomed_jti = jti(&doomed.refresh_token(&fake).unwrap());
    let live_jti = jti(&live.refresh_token(&fake).unwrap());
    let agent = AgentProcess::start(
        &node,
        &fake,
        AgentArgs::default().args(["--max-credential-retention-before-renewal", "2s"]),
    )
    .unwrap();
    for pod in [&doomed, &live] {
        let run = pod
            .python_requests(Family::V4, &pod.token_path(), 1, false)
            .unwrap();
        assert_eq!(run.exchanges[0].status, Some(200), "{run:#?}");
    }

    // Both are renewed while both pods live.
    let deadline = Instant::now() + Duration::from_secs(8);
    while fake.calls_for_jti(&doomed_jti) < 2 || fake.calls_for_jti(&live_jti) < 2 {
        assert!(
            Instant::now() < deadline,
            "no renewal within 8 s at a 2 s retention: doomed {} live {}",
            fake.calls_for_jti(&doomed_jti),
            fake.calls_for_jti(&live_jti)
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // The pod is deleted: its processes and its cgroup go.
    let cgroup = doomed.pod_cgroup.clone();
    drop(doomed);
    assert!(!cgroup.exists(), "the pod's cgroup is removed");
    let at_delete = fake.calls_for_jti(&doomed_jti);
    let live_at_delete = fake.calls_for_jti(&live_jti);

    // One renewal already under way may still land; none after that.
    std::thread::sleep(Duration::from_secs(3));
    let settled = fake.calls_for_jti(&doomed_jti);
    std::thread::sleep(Duration::from_secs(3));
    let end = fake.calls_for_jti(&doomed_jti);
    assert!(
        settled <= at_delete + 1,
        "renewals went on after deletion: {at_delete} -> {settled}"
    );
    assert_eq!(
        end, settled,
        "the deleted pod's token is still renewed 3 s (1.5 retention periods) later"
    );
    assert!(
        fake.calls_for_jti(&live_jti) >= live_at_delete + 2,
        "the live pod's token keeps being renewed: {live_at_delete} -> {}",
        fake.calls_for_jti(&live_jti)
    );
    assert!(
        agent.logs().unwrap().contains("owner gone"),
        "the agent says why it stopped renewing"
    );
}

#[test]
fn with_the_pod_view_kernel_refusals_name_the_pods_namespace_before_any_request() {
    if !e2e::privileged(
        "with_the_pod_view_kernel_refusals_name_the_pods_namespace_before_any_request",
    ) {
        return;
    }
    let node = SimNode::new().unwrap();
    let fake = start_fake_eks_auth_in(node.netns(), "e2e-connect-limit-view").unwrap();
    let flooder = node
        .add_pod(PodSpec::new("flooder-0", "noisy", "flood-sa"))
        .unwrap();
    let api = fake_kube_api::start_in(node.netns()).unwrap();
    api.add_pod(fake_kube_api::served_with_sidecar(&node, &flooder));
    let args = fake_kube_api::agent_args_with_view(&node, &api).args([
        "--pod-connect-rate",
        "1",
        "--pod-connect-burst",
        "1",
    ]);
    let agent = AgentProcess::start(&node, &fake, args).unwrap();
    fake_kube_api::wait_view_synced(&agent, 1.0);

    // No request has shown the agent this pod's namespace; the API server has.
    let flood = flooder
        .connect_flood(&[Family::V4], 10, Duration::ZERO, Duration::ZERO)
        .unwrap();
    assert_refusals_are_eperm_at_once(&flood);
    let refused = flood.failed_with(EPERM) as f64;
    assert!(refused >= 8.0, "{:?}", flood.attempts);
    let denied = "pod_identity_connections_denied_total{namespace=\"noisy\"}";
    e2e::wait_for(Duration::from_secs(15), || {
        agent.metric(denied).unwrap() >= refused
    });
    let text = agent.metrics().unwrap();
    assert_eq!(agent.metric(denied).unwrap(), refused, "{text}");
    assert!(
        !text.contains("pod_identity_connections_denied_total{namespace=\"unknown\"}"),
        "{text}"
    );
}
