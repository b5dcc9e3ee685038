//! Events on pods end to end, through the stand-in Kubernetes API: a pod whose service account has
//! no association gets one Event whose count rises with its requests; a token-binding mismatch
//! goes on the pod that presented the token, an expired token on its pod; and a hung API never
//! slows a credential answer.
//!
//! Needs root, cgroup v2, eBPF, and the agent binary (`cargo build -p eks-pod-identity-agent`).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use e2e::agent::{AgentArgs, AgentProcess, node_with_web_pods};
use e2e::clients::{Family, RawRequest, raw_http_in};
use e2e::fake_kube_api::{self, FakeKubeApi, KubeFault, Op};
use e2e::node::{AGENT_V4, PodSpec, SimNode};
use k8s_openapi::api::core::v1::Event;
use serde_json::Value;

fn kube_args(node: &SimNode, api: &FakeKubeApi) -> AgentArgs {
    fake_kube_api::agent_args(node, api)
}

/// The stored Events about the pod with this UID.
fn events_on(api: &FakeKubeApi, uid: &str) -> Vec<Value> {
    api.events()
        .into_iter()
        .filter(|e| e["involvedObject"]["uid"] == uid)
        .collect()
}

fn wait_event(api: &FakeKubeApi, uid: &str, done: impl Fn(&Value) -> bool) -> Value {
    let mut found = None;
    let ok = e2e::wait_for(Duration::from_secs(10), || {
        found = events_on(api, uid).into_iter().find(|e| done(e));
        found.is_some()
    });
    assert!(
        ok,
        "no such Event on pod {uid}; Events: {:#?}",
        api.events()
    );
    found.unwrap()
}

#[test]
fn a_pod_without_association_gets_one_event_counting_its_requests() {
    if !e2e::privileged("a_pod_without_association_gets_one_event_counting_its_requests") {
        return;
    }
    let (node, fake, [_web]) = node_with_web_pods("e2e-events", ["web"]).unwrap();
    let orphan = node
        .add_pod(PodSpec::new("orphan", "shop", "orphan-sa"))
        .unwrap();
    let api = fake_kube_api::start_in(node.netns()).unwrap();
    let agent = AgentProcess::start(
        &node,
        &fake,
        kube_args(&node, &api).args(["--pod-events", "true"]),
    )
    .unwrap();
    let token = orphan.refresh_token(&fake).unwrap();
    let r = orphan
        .python_requests(Family::V4, &orphan.token_path(), 3, false)
        .unwrap();
    assert!(r.exchanges.iter().all(|e| e.status == Some(404)), "{r:?}");

    let event = wait_event(&api, &orphan.uid, |e| e["count"] == 3);
    assert_eq!(
        events_on(&api, &orphan.uid).len(),
        1,
        "one Event, aggregated"
    );
    assert_eq!(api.events().len(), 1);
    let typed: Event = serde_json::from_value(event.clone()).unwrap();
    let object = &typed.involved_object;
    assert_eq!(object.kind.as_deref(), Some("Pod"));
    assert_eq!(object.api_version.as_deref(), Some("v1"));
    assert_eq!(object.name.as_deref(), Some(orphan.name.as_str()));
    assert_eq!(object.namespace.as_deref(), Some("shop"));
    assert_eq!(typed.metadata.namespace.as_deref(), Some("shop"));
    assert_eq!(
        typed.reason.as_deref(),
        Some("PodIdentityAssociationNotFound")
    );
    assert_eq!(typed.type_.as_deref(), Some("Warning"));
    assert_eq!(typed.series.as_ref().and_then(|s| s.count), Some(3));
    assert!(typed.first_timestamp.is_some() && typed.last_timestamp.is_some());
    assert_eq!(
        typed.source.as_ref().and_then(|s| s.host.as_deref()),
        Some(node.name())
    );
    let message = typed.message.unwrap();
    assert!(
        message.contains("service account shop/orphan-sa"),
        "{message}"
    );
    assert!(
        !message.contains(&token) && !message.contains("eyJ"),
        "never the token: {message}"
    );

    let requests = api.requests();
    let ops: Vec<(Op, u16)> = requests.iter().map(|r| (r.op, r.status)).collect();
    // Requests that come while a call is under way are counted into the next one.
    assert_eq!(ops[0], (Op::CreateEvent, 201), "{ops:?}");
    assert!(
        (2..=3).contains(&ops.len()) && ops[1..].iter().all(|o| *o == (Op::PatchEvent, 200)),
        "one create, then patches; no node calls without --remove-startup-taint: {ops:?}"
    );
    assert_eq!(requests[0].path, "/api/v1/namespaces/shop/events");
    assert_eq!(
        requests[1].content_type.as_deref(),
        Some("application/strategic-merge-patch+json")
    );
    let _: Event = serde_json::from_str(&requests[0].body).unwrap();
    for r in &requests {
        assert!(!r.body.contains(&token));
    }
    assert_eq!(
        agent
            .metric("pod_identity_pod_events_total{outcome=\"created\"}")
            .unwrap(),
        1.0
    );
    assert_eq!(
        agent
            .metric("pod_identity_pod_events_total{outcome=\"updated\"}")
            .unwrap(),
        (ops.len() - 1) as f64
    );
}

#[test]
fn a_binding_mismatch_goes_on_the_presenting_pod_and_an_expired_token_on_its_pod() {
    if !e2e::privileged(
        "a_binding_mismatch_goes_on_the_presenting_pod_and_an_expired_token_on_its_pod",
    ) {
        return;
    }
    let (node, fake, [a, b]) = node_with_web_pods("e2e-events-bind", ["web-a", "web-b"]).unwrap();
    let api = fake_kube_api::start_in(node.netns()).unwrap();
    let _agent = AgentProcess::start(
        &node,
        &fake,
        kube_args(&node, &api).args(["--pod-events", "--token-binding", "enforce"]),
    )
    .unwrap();
    for pod in [&a, &b] {
        pod.refresh_token(&fake).unwrap();
        let r = pod
            .python_requests(Family::V4, &pod.token_path(), 1, false)
            .unwrap();
        assert_eq!(r.exchanges[0].status, Some(200), "{r:?}");
    }
    // B presents A's token.
    let r = b
        .python_requests(Family::V4, &a.token_path(), 1, false)
        .unwrap();
    assert_eq!(r.exchanges[0].status, Some(403));
    let event = wait_event(&api, &b.uid, |e| {
        e["reason"] == "PodIdentityTokenBindingMismatch"
    });
    assert_eq!(event["involvedObject"]["name"], b.name.as_str());
    let message = event["message"].as_str().unwrap();
    assert!(message.contains(&a.uid), "{message}");
    assert!(
        message.contains("refused (--token-binding enforce)"),
        "{message}"
    );
    assert!(message.contains("role/web-role"), "{message}");
    assert!(
        events_on(&api, &a.uid).is_empty(),
        "nothing on the pod whose token it was"
    );

    // A presents an expired token of its own: refused before EKS Auth, on A.
    let expired = fake.issue_token(&a.token_spec().expired()).unwrap();
    a.write_token(&expired).unwrap();
    let r = a
        .python_requests(Family::V4, &a.token_path(), 1, false)
        .unwrap();
    assert_eq!(r.exchanges[0].status, Some(400));
    let event = wait_event(&api, &a.uid, |e| e["reason"] == "PodIdentityTokenExpired");
    assert_eq!(event["metadata"]["namespace"], "shop");
    let _: Event = serde_json::from_value(event).unwrap();
}

fn timed_get(pod: &e2e::node::Pod, token: &str) -> (u16, Duration) {
    let addr = SocketAddr::from((AGENT_V4, 80));
    let request = RawRequest::get("/v1/credentials")
        .host("169.254.170.23")
        .authorization(token)
        .to_bytes();
    let started = Instant::now();
    let r = raw_http_in(pod.netns(), addr, &request, Duration::from_secs(5)).unwrap();
    (r.status, started.elapsed())
}

#[test]
fn a_hung_api_does_not_slow_credential_answers() {
    if !e2e::privileged("a_hung_api_does_not_slow_credential_answers") {
        return;
    }
    let (node, fake, [web]) = node_with_web_pods("e2e-events-hung", ["web"]).unwrap();
    let orphan = node
        .add_pod(PodSpec::new("orphan", "shop", "orphan-sa"))
        .unwrap();
    let api = fake_kube_api::start_in(node.netns()).unwrap();
    api.add_node(
        node.name(),
        &[(
            "eks-pod-identity-agent.amazonaws.com/agent-not-ready",
            "NoExecute",
        )],
    );
    api.set_fault(None, KubeFault::Hang, None);
    let agent = AgentProcess::start(
        &node,
        &fake,
        kube_args(&node, &api).args(["--pod-events", "--remove-startup-taint"]),
    )
    .unwrap();
    let good = web.refresh_token(&fake).unwrap();
    let bad = orphan.refresh_token(&fake).unwrap();
    assert_eq!(timed_get(&web, &good).0, 200);
    assert!(
        e2e::wait_for(Duration::from_secs(5), || !api.requests().is_empty()),
        "the agent called the API"
    );

    let mut slowest = Duration::ZERO;
    for _ in 0..100 {
        let (status, took) = timed_get(&orphan, &bad);
        assert_eq!(status, 404);
        slowest = slowest.max(took);
        let (status, took) = timed_get(&web, &good);
        assert_eq!(status, 200);
        slowest = slowest.max(took);
    }
    // A call to the hung API would take its 10 s deadline; the SDKs give up after 1-2 s.
    eprintln!("slowest credential answer while the API hangs: {slowest:?}");
    assert!(
        slowest < Duration::from_secs(1),
        "a credential answer took {slowest:?} while the API hangs"
    );
    // One call at a time, and each hangs: the node read and at most one Event.
    let requests = api.requests();
    assert!(requests.len() <= 2, "{requests:?}");
    assert!(requests.iter().all(|r| r.status == 0));
    assert_eq!(
        agent
            .metric("pod_identity_pod_events_total{outcome=\"queue_full\"}")
            .unwrap(),
        0.0,
        "the queue is drained into the series while the API hangs"
    );
    assert_eq!(
        agent
            .metric("pod_identity_startup_taint_removed{key=\"eks-pod-identity-agent.amazonaws.com/agent-not-ready\"}")
            .unwrap(),
        0.0
    );
}
