//! EKS Auth throttling, ridden out: many pods' first requests at once against an EKS Auth that
//! accepts 50 calls/s, each pod's SDK with botocore's retry policy; permanent errors remembered; and
//! the agent's EKS Auth client leaving throttled calls to the admission path. Needs the agent binary
//! (`cargo build -p eks-pod-identity-agent`) and, for the burst, botocore.

use std::time::{Duration, Instant};

use aws_config::Region;
use aws_sdk_eksauth::config::Credentials;
use e2e::agent::{AgentArgs, AgentProcess, node_with_web_pods, start_fake_eks_auth_in};
use e2e::burst::{client_pods_for, run_burst, write_burst_tokens};
use e2e::fake_eks_auth::{ApiError, FakeEksAuth, Fault, FaultTimes, TokenSpec};
use e2e::node::{CREDENTIALS_URI_V4, PodSpec, SimNode};
use pod_identity_agent::config::UpstreamConfig;
use pod_identity_agent::credentials::Retriever as _;
use pod_identity_agent::credentials::eks_auth::EksAuth;

/// The issue's scenario: 300 pods at once; EKS Auth accepts 50 calls/s (a bucket of 50) and takes
/// 50 ms per call; botocore's policy in every pod (3 attempts, 2 s timeout, 1 s apart).
#[test]
fn three_hundred_pods_at_once_all_get_credentials_from_an_eks_auth_limited_to_50_per_second() {
    if !e2e::privileged(
        "three_hundred_pods_at_once_all_get_credentials_from_an_eks_auth_limited_to_50_per_second",
    ) {
        return;
    }
    const PODS: usize = 300;
    let started = Instant::now();
    let node = SimNode::new().unwrap();
    let fake = start_fake_eks_auth_in(node.netns(), "e2e-burst").unwrap();
    fake.associate("burst", "burst-sa", "burst-role");
    let clients: Vec<_> = (0..client_pods_for(PODS))
        .map(|i| {
            node.add_pod(PodSpec::new(&format!("client-{i}"), "burst", "client"))
                .unwrap()
        })
        .collect();
    let tokens = write_burst_tokens(
        &fake,
        &node,
        "burst",
        "burst-sa",
        PODS,
        &node.dir().join("burst"),
    )
    .unwrap();
    // The agent as deployed: default flags.
    let agent = AgentProcess::start(&node, &fake, AgentArgs::default()).unwrap();
    fake.set_delay(Duration::from_millis(50));
    fake.set_rate_limit(Some((50.0, 50.0)));

    let report = run_burst(&clients, &fake, &tokens, Duration::from_secs(5)).unwrap();
    eprintln!("{}", report.summary());
    let failures: Vec<_> = report
        .outcomes
        .iter()
        .filter_map(|o| o.error.as_deref())
        .take(5)
        .collect();
    assert_eq!(
        report.served(),
        PODS,
        "{}; first failures: {failures:?}\nagent log (tail):\n{}",
        report.summary(),
        tail(&agent.logs().unwrap_or_default(), 30)
    );
    assert!(
        report.throttled_share() < 0.10,
        "throttled calls over 10%: {}",
        report.summary()
    );
    // One call per token, plus the throttled ones retried: nothing amplified.
    assert!(
        report.upstream_calls <= PODS as u64 + report.throttled,
        "{}",
        report.summary()
    );
    assert!(
        e2e::wait_for(Duration::from_secs(3), || agent
            .metric("pod_identity_upstream_in_flight")
            .unwrap()
            == 0.0),
        "pod_identity_upstream_in_flight did not return to 0"
    );
    assert_eq!(
        agent.metric("pod_identity_cache_entries").unwrap(),
        PODS as f64
    );
    assert!(agent.metric("pod_identity_upstream_rate").unwrap() >= 2.0);
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn a_bad_token_retried_by_the_sdk_costs_one_upstream_call() {
    if !e2e::privileged("a_bad_token_retried_by_the_sdk_costs_one_upstream_call") {
        return;
    }
    let (node, fake, [pod]) = node_with_web_pods("e2e-badtoken", ["web-0"]).unwrap();
    let agent = AgentProcess::start(&node, &fake, AgentArgs::default()).unwrap();
    // No association for the pod's service account: ResourceNotFound, permanent for the token.
    fake.disassociate("shop", "web-sa");
    let token = pod.refresh_token(&fake).unwrap();
    let outcome = pod.fetch_with_botocore(CREDENTIALS_URI_V4).unwrap();
    let err = outcome.expect_err("botocore got credentials without an association");
    assert!(
        err.stderr.contains("ResourceNotFoundException"),
        "{}",
        err.stderr
    );
    assert_eq!(
        fake.calls_for_token(&token),
        1,
        "botocore's 3 attempts went upstream more than once"
    );
    assert!(
        agent
            .metric("pod_identity_permanent_error_hits_total")
            .unwrap()
            >= 2.0
    );
    // Another token (the kubelet's next rotation, after the association is made) is asked afresh.
    fake.associate("shop", "web-sa", "web-role");
    pod.refresh_token(&fake).unwrap();
    assert!(pod.fetch_with_botocore(CREDENTIALS_URI_V4).unwrap().is_ok());
}

/// The agent's EKS Auth client, alone: a throttled call is not retried by the SDK (the admission
/// path paces and retries), a server error still is.
#[tokio::test]
async fn the_eks_auth_client_leaves_throttled_calls_to_the_admission_path() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let fake = FakeEksAuth::start(listener, "e2e-client").unwrap();
    fake.associate("shop", "web-sa", "web-role");
    let token = fake.issue_token(&TokenSpec::new("shop", "web-sa")).unwrap();
    let upstream = UpstreamConfig {
        endpoint: Some(fake.endpoint()),
        rotate_credentials: false,
        connect_timeout: Duration::from_millis(300),
        attempt_timeout: Duration::from_millis(400),
        call_timeout: Duration::from_millis(900),
        max_attempts: 3,
    };
    let sdk_config = EksAuth::loader(&upstream)
        .region(Region::new("us-west-2"))
        .credentials_provider(Credentials::new("AKIAE2E", "secret", None, None, "test"))
        .load()
        .await;
    let client = EksAuth::from_sdk_config(&sdk_config, fake.cluster().to_owned());

    fake.set_fault(Fault::Error(ApiError::Throttling), FaultTimes::Always);
    let err = client.fetch(&token).await.unwrap_err();
    assert_eq!(
        (err.status, err.code.as_str()),
        (429, "ThrottlingException")
    );
    assert_eq!(fake.calls(), 1, "the SDK retried a throttled call");

    fake.set_fault(Fault::Error(ApiError::InternalServer), FaultTimes::Always);
    let err = client.fetch(&token).await.unwrap_err();
    assert_eq!(err.status, 500);
    assert_eq!(fake.calls(), 4, "server errors are retried: 3 attempts");

    fake.clear_fault();
    assert!(client.fetch(&token).await.is_ok());
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
