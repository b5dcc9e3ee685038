//! Kubernetes API calls keep their deadline (issue 15, item 7): kube-rs's own retry of 429, 503
//! and 504 is off, so that an API server answering 503 costs one call per attempt, counted at
//! once, and a hung one ends at the 10 s deadline; the Events and taint tasks carry on, with
//! their own backoff.
//!
//! Needs root, cgroup v2, eBPF, and the agent binary (`cargo build -p eks-pod-identity-agent`).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use e2e::agent::{AgentArgs, AgentProcess, node_with_web_pods};
use e2e::clients::{RawRequest, raw_http_in};
use e2e::fake_kube_api::{self, FakeKubeApi, KubeFault, Op};
use e2e::node::{AGENT_V4, PodSpec, SimNode};

const KEY: &str = "eks-pod-identity-agent.amazonaws.com/agent-not-ready";
/// The README's deadline of one call.
const DEADLINE: Duration = Duration::from_secs(10);

fn kube_args(node: &SimNode, api: &FakeKubeApi) -> AgentArgs {
    fake_kube_api::agent_args(node, api).args(["--pod-events", "--remove-startup-taint"])
}

fn get(pod: &e2e::node::Pod, token: &str) -> u16 {
    let request = RawRequest::get("/v1/credentials")
        .host("169.254.170.23")
        .authorization(token)
        .to_bytes();
    raw_http_in(
        pod.netns(),
        SocketAddr::from((AGENT_V4, 80)),
        &request,
        Duration::from_secs(5),
    )
    .unwrap()
    .status
}

fn errors(agent: &AgentProcess, op: &str) -> f64 {
    agent
        .metric(&format!(
            "pod_identity_kubernetes_api_errors_total{{operation=\"{op}\"}}"
        ))
        .unwrap()
}

fn requests_for(api: &FakeKubeApi, op: Op) -> Vec<e2e::fake_kube_api::KubeRequest> {
    api.requests().into_iter().filter(|r| r.op == op).collect()
}

#[test]
fn an_api_answering_503_costs_one_counted_call_per_attempt() {
    if !e2e::privileged("an_api_answering_503_costs_one_counted_call_per_attempt") {
        return;
    }
    let (node, fake, [web]) = node_with_web_pods("e2e-kube-503", ["web"]).unwrap();
    let orphan = node
        .add_pod(PodSpec::new("orphan", "shop", "orphan-sa"))
        .unwrap();
    let api = fake_kube_api::start_in(node.netns()).unwrap();
    api.add_node(node.name(), &[(KEY, "NoExecute")]);
    api.set_fault(None, KubeFault::Status(503), None);
    let agent = AgentProcess::start(&node, &fake, kube_args(&node, &api)).unwrap();
    let good = web.refresh_token(&fake).unwrap();
    let bad = orphan.refresh_token(&fake).unwrap();
    assert_eq!(get(&web, &good), 200);
    let asked = Instant::now();
    assert_eq!(get(&orphan, &bad), 404);

    // Each 503 is an error counted at once: kube-rs's retry would hold the first call for
    // minutes (15 tries, backing off up to 1000 s) and count nothing.
    assert!(
        e2e::wait_for(Duration::from_secs(3), || errors(&agent, "create_event")
            >= 1.0),
        "the Event's 503 was not counted within 3 s; requests: {:?}",
        api.requests()
    );
    assert!(asked.elapsed() < DEADLINE);
    assert!(
        e2e::wait_for(Duration::from_secs(5), || errors(&agent, "get_node") >= 2.0),
        "the taint's 503s are counted and retried with the agent's backoff"
    );
    // The agent's backoff starts at 1 s: the calls it makes are its attempts, none hidden.
    let node_reads = requests_for(&api, Op::GetNode);
    let counted = errors(&agent, "get_node");
    assert!(
        node_reads.len() as f64 <= counted + 1.0,
        "{} node reads for {counted} counted errors: retries inside the client",
        node_reads.len()
    );
    for pair in node_reads.windows(2) {
        assert!(
            pair[1].at.duration_since(pair[0].at) >= Duration::from_millis(500),
            "two node reads {:?} apart: retried without the agent's backoff",
            pair[1].at.duration_since(pair[0].at)
        );
    }

    // Both tasks carry on: once the API is back the taint goes and the Event is posted.
    api.clear_fault();
    assert!(
        e2e::wait_for(Duration::from_secs(40), || {
            !api.taints(node.name()).iter().any(|(k, _)| k == KEY)
                && api
                    .events()
                    .iter()
                    .any(|e| e["involvedObject"]["uid"] == orphan.uid.as_str())
        }),
        "after the outage: taints {:?}, events {:?}\n{}",
        api.taints(node.name()),
        api.events(),
        agent.logs().unwrap()
    );
    assert!(agent.stop().unwrap().success());
}

#[test]
fn a_hung_call_ends_at_its_deadline_and_the_events_task_carries_on() {
    if !e2e::privileged("a_hung_call_ends_at_its_deadline_and_the_events_task_carries_on") {
        return;
    }
    let (node, fake, [_web]) = node_with_web_pods("e2e-kube-hang", ["web"]).unwrap();
    let orphan = node
        .add_pod(PodSpec::new("orphan", "shop", "orphan-sa"))
        .unwrap();
    let api = fake_kube_api::start_in(node.netns()).unwrap();
    api.add_node(node.name(), &[]);
    // The first Event hangs; what follows is answered.
    api.set_fault(Some(Op::CreateEvent), KubeFault::Hang, Some(1));
    let agent = AgentProcess::start(&node, &fake, kube_args(&node, &api)).unwrap();
    let bad = orphan.refresh_token(&fake).unwrap();
    assert_eq!(get(&orphan, &bad), 404);
    assert!(
        e2e::wait_for(Duration::from_secs(5), || !requests_for(
            &api,
            Op::CreateEvent
        )
        .is_empty()),
        "the Event was never sent"
    );
    let hung_at = requests_for(&api, Op::CreateEvent)[0].at;

    // The hung call ends at its deadline, counted then.
    assert!(
        e2e::wait_for(DEADLINE + Duration::from_secs(3), || errors(
            &agent,
            "create_event"
        ) >= 1.0),
        "the hung call was not ended and counted by {:?}",
        DEADLINE + Duration::from_secs(3)
    );
    let ended_after = hung_at.elapsed();
    assert!(
        ended_after >= DEADLINE - Duration::from_millis(500),
        "ended after {ended_after:?}, before its deadline"
    );
    // And the Events task goes on: the Event is sent again, and stored.
    assert!(
        e2e::wait_for(Duration::from_secs(20), || api
            .events()
            .iter()
            .any(|e| e["involvedObject"]["uid"] == orphan.uid.as_str())),
        "no Event after the hung call; requests {:?}\n{}",
        api.requests(),
        agent.logs().unwrap()
    );
    assert_eq!(errors(&agent, "create_event"), 1.0);
    assert!(agent.stop().unwrap().success());
}
