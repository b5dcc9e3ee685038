//! The removal against a scripted API, in paused time.

use super::*;
use crate::kubernetes::ApiErrors;
use crate::kubernetes::fake::{FakeApi, taint};
use crate::listener::Accepting;
use crate::metrics::Metrics;

const NODE: &str = "ip-10-0-0-1";
const KEY: &str = DEFAULT_STARTUP_TAINT;

fn removal() -> Removal {
    Removal {
        node: NODE.to_owned(),
        key: KEY.to_owned(),
        backoff: crate::backoff::Backoff::new(Duration::from_secs(1), Duration::from_secs(30)),
    }
}

fn metrics() -> (Metrics, TaintMetrics) {
    let m = Metrics::new().unwrap();
    let t = TaintMetrics {
        removed: m.startup_taint_removed.with_label_values(&[KEY]),
        errors: ApiErrors::new(&m.kubernetes_api_errors),
    };
    (m, t)
}

fn errors(m: &Metrics, op: Operation) -> u64 {
    m.kubernetes_api_errors
        .with_label_values(&[op.as_str()])
        .get()
}

fn ready() -> (Accepting, Readiness) {
    let accepting = Accepting::default();
    accepting.set(true);
    (accepting.clone(), Readiness::new(vec![accepting]))
}

#[tokio::test(start_paused = true)]
async fn waits_for_readiness_then_removes_every_effect_of_the_key_only() {
    let api = FakeApi::with_node(
        NODE,
        vec![
            taint("node.kubernetes.io/not-ready", "NoSchedule"),
            taint(KEY, "NoExecute"),
            taint("ebs.csi.aws.com/agent-not-ready", "NoExecute"),
            taint(KEY, "NoSchedule"),
        ],
    );
    let accepting = Accepting::default();
    let readiness = Readiness::new(vec![accepting.clone()]);
    let (m, t) = metrics();
    let task = tokio::spawn(remove_when_ready(
        api.clone(),
        removal(),
        readiness,
        t.clone(),
        CancellationToken::new(),
    ));
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(api.state().calls.is_empty(), "no API call before ready");
    assert_eq!(t.removed.get(), 0);

    accepting.set(true);
    task.await.unwrap();
    let keys: Vec<String> = api.taints().into_iter().map(|t| t.key).collect();
    assert_eq!(
        keys,
        [
            "node.kubernetes.io/not-ready",
            "ebs.csi.aws.com/agent-not-ready"
        ]
    );
    assert_eq!(t.removed.get(), 1);
    let state = api.state();
    assert_eq!(state.calls, [Operation::GetNode, Operation::PatchNode]);
    assert_eq!(
        state.node_patches[0]["metadata"]["resourceVersion"], "1",
        "the patch is conditional on what was read"
    );
    assert_eq!(errors(&m, Operation::PatchNode), 0);
}

#[tokio::test(start_paused = true)]
async fn a_conflict_is_read_again_and_keeps_the_concurrent_change() {
    let api = FakeApi::with_node(NODE, vec![taint(KEY, "NoExecute")]);
    api.state().concurrent_writes = 1;
    let (m, t) = metrics();
    let (_accepting, readiness) = ready();
    let started = tokio::time::Instant::now();
    remove_when_ready(
        api.clone(),
        removal(),
        readiness,
        t,
        CancellationToken::new(),
    )
    .await;
    let state = api.state();
    assert_eq!(
        state.calls,
        [
            Operation::GetNode,
            Operation::PatchNode,
            Operation::GetNode,
            Operation::PatchNode
        ]
    );
    drop(state);
    let keys: Vec<String> = api.taints().into_iter().map(|t| t.key).collect();
    assert_eq!(keys, ["other.example.com/added-meanwhile"]);
    assert_eq!(errors(&m, Operation::PatchNode), 1);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "a conflict is retried at once"
    );
}

#[tokio::test(start_paused = true)]
async fn failures_back_off_and_retry_until_the_api_answers() {
    let api = FakeApi::with_node(NODE, vec![taint(KEY, "NoExecute")]);
    api.fail(Operation::GetNode, 503, 3);
    api.fail(Operation::PatchNode, 403, 1);
    let (m, t) = metrics();
    let (_accepting, readiness) = ready();
    let started = tokio::time::Instant::now();
    remove_when_ready(
        api.clone(),
        removal(),
        readiness,
        t.clone(),
        CancellationToken::new(),
    )
    .await;
    assert!(api.taints().is_empty());
    assert_eq!(t.removed.get(), 1);
    assert_eq!(errors(&m, Operation::GetNode), 3);
    assert_eq!(errors(&m, Operation::PatchNode), 1);
    // 1 + 2 + 4 + 8 s, each with up to a fifth of jitter.
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(15) && waited <= Duration::from_secs(18),
        "{waited:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_node_without_the_taint_is_left_alone() {
    let api = FakeApi::with_node(NODE, vec![taint("other/key", "NoSchedule")]);
    let (_m, t) = metrics();
    let (_accepting, readiness) = ready();
    remove_when_ready(
        api.clone(),
        removal(),
        readiness,
        t.clone(),
        CancellationToken::new(),
    )
    .await;
    assert_eq!(api.state().calls, [Operation::GetNode]);
    assert_eq!(api.taints().len(), 1);
    assert_eq!(t.removed.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn shutdown_ends_the_task_while_the_api_hangs() {
    let api = FakeApi::with_node(NODE, vec![taint(KEY, "NoExecute")]);
    api.state().hang = true;
    let (_m, t) = metrics();
    let (_accepting, readiness) = ready();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(remove_when_ready(
        api.clone(),
        removal(),
        readiness,
        t.clone(),
        shutdown.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(60)).await;
    shutdown.cancel();
    task.await.unwrap();
    assert_eq!(t.removed.get(), 0);
    assert_eq!(api.taints().len(), 1);
}
