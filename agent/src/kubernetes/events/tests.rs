//! The Events' message, and the Events task against a scripted API in paused time.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use super::correlator::{Correlator, Limits, Sent};
use super::*;
use crate::kubernetes::fake::FakeApi;
use crate::kubernetes::{ApiErrors, Operation};
use crate::metrics::Metrics;

const POD_A: &str = "0b5e3c2a-1111-4222-8333-444455556666";
const POD_B: &str = "7c1d2e3f-aaaa-4bbb-8ccc-ddddeeeeffff";

fn identity(uid: &str) -> PodIdentity {
    PodIdentity {
        namespace: "shop".into(),
        name: "cart-1".into(),
        uid: uid.into(),
        service_account: Some("cart".into()),
        role_arn: Some("arn:aws:iam::111122223333:role/cart".into()),
    }
}

#[test]
fn messages_name_namespace_service_account_and_role_and_nothing_unverified() {
    let pod = identity(POD_B);
    let m = message(
        Reason::TokenBindingMismatch,
        &Detail::Mismatch {
            refused: true,
            other_node: false,
            token_pod: Some(uid_chars("<script>evil</script>0b5e")),
        },
        &pod,
    );
    assert!(m.contains("service account shop/cart"), "{m}");
    assert!(m.contains("role/cart"), "{m}");
    assert!(m.contains("--token-binding enforce"), "{m}");
    assert!(!m.contains('<') && !m.contains("evil"), "{m}");
    let m = message(Reason::AssociationNotFound, &Detail::None, &pod);
    assert!(
        m.contains("No EKS Pod Identity association for service account shop/cart"),
        "{m}"
    );
}

#[test]
fn a_container_not_listed_is_named_with_the_verdict() {
    let pod = identity(POD_A);
    let m = message(
        Reason::ContainerNotListed,
        &Detail::Container {
            refused: true,
            name: Some("istio-proxy".into()),
        },
        &pod,
    );
    assert!(m.starts_with("Container istio-proxy of this pod"), "{m}");
    assert!(m.contains("service account shop/cart"), "{m}");
    assert!(m.contains("--token-binding enforce"), "{m}");
    let m = message(
        Reason::ContainerNotListed,
        &Detail::Container {
            refused: false,
            name: None,
        },
        &pod,
    );
    assert!(
        m.starts_with("A process of this pod in no container"),
        "{m}"
    );
    assert!(m.contains("--token-binding audit"), "{m}");
    assert_eq!(
        Reason::ContainerNotListed.as_str(),
        "PodIdentityContainerNotListed"
    );
}

// --- The task ---------------------------------------------------------------------------------

struct Harness {
    api: FakeApi,
    recorder: EventRecorder,
    metrics: Metrics,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

fn start(api: FakeApi, capacity: usize, names: PodNames) -> Harness {
    let metrics = Metrics::new().unwrap();
    let (recorder, inbox) = channel(capacity, &metrics);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run(
        api.clone(),
        inbox,
        Reporter {
            host: "ip-10-0-0-1".into(),
        },
        names,
        crate::backoff::Backoff::new(Duration::from_secs(1), Duration::from_secs(30)),
        ApiErrors::new(&metrics.kubernetes_api_errors),
        shutdown.clone(),
    ));
    Harness {
        api,
        recorder,
        metrics,
        shutdown,
        task,
    }
}

fn no_names() -> PodNames {
    Arc::new(|_| None)
}

fn verified(reason: Reason, uid: &str) -> Observation {
    let mut pod = identity(uid);
    pod.role_arn = None;
    Observation {
        reason,
        subject: Subject::Verified(pod),
        detail: Detail::None,
    }
}

fn outcome(m: &Metrics, o: &str) -> u64 {
    m.pod_events.with_label_values(&[o]).get()
}

async fn settle() {
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
}

#[tokio::test(start_paused = true)]
async fn repeats_make_one_event_whose_count_rises() {
    let h = start(FakeApi::default(), 16, no_names());
    for _ in 0..4 {
        h.recorder
            .record(verified(Reason::AssociationNotFound, POD_A));
        settle().await;
    }
    {
        let state = h.api.state();
        assert_eq!(state.created.len(), 1, "one Event");
        let e = &state.created[0];
        assert_eq!(e.involved_object.kind.as_deref(), Some("Pod"));
        assert_eq!(e.involved_object.uid.as_deref(), Some(POD_A));
        assert_eq!(e.involved_object.name.as_deref(), Some("cart-1"));
        assert_eq!(e.involved_object.namespace.as_deref(), Some("shop"));
        assert_eq!(e.metadata.namespace.as_deref(), Some("shop"));
        assert!(e.metadata.name.as_deref().unwrap().starts_with("cart-1."));
        assert_eq!(e.reason.as_deref(), Some("PodIdentityAssociationNotFound"));
        assert_eq!(e.type_.as_deref(), Some("Warning"));
        assert_eq!(e.count, Some(1));
        assert_eq!(
            e.source.as_ref().unwrap().host.as_deref(),
            Some("ip-10-0-0-1")
        );
        assert_eq!(state.event_patches.len(), 3);
        let (name, last) = state.event_patches.last().unwrap();
        assert_eq!(Some(name.as_str()), e.metadata.name.as_deref());
        assert_eq!(last["count"], 4);
        assert_eq!(last["series"]["count"], 4);
        assert!(
            last["lastTimestamp"].is_string() && last["series"]["lastObservedTime"].is_string()
        );
    }
    assert_eq!(outcome(&h.metrics, "created"), 1);
    assert_eq!(outcome(&h.metrics, "updated"), 3);
    h.shutdown.cancel();
    h.task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_pod_past_its_burst_waits_for_a_token_and_loses_no_count() {
    let h = start(FakeApi::default(), 1024, no_names());
    for _ in 0..40 {
        h.recorder
            .record(verified(Reason::AssociationNotFound, POD_A));
        settle().await;
    }
    let calls = |h: &Harness| {
        let s = h.api.state();
        s.created.len() + s.event_patches.len()
    };
    assert_eq!(calls(&h), 25, "the burst");
    tokio::time::sleep(Duration::from_secs(301)).await;
    settle().await;
    assert_eq!(calls(&h), 26, "one more after 5 minutes");
    assert_eq!(h.api.state().event_patches.last().unwrap().1["count"], 40);
    // Another pod has its own bucket.
    h.recorder.record(verified(Reason::AccessDenied, POD_B));
    settle().await;
    assert_eq!(h.api.state().created.len(), 2);
    h.shutdown.cancel();
    h.task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn throttling_is_reported_once_it_repeats() {
    let names: PodNames = Arc::new(|uid| (uid == POD_B).then(|| identity(POD_B)));
    let h = start(FakeApi::default(), 16, names);
    let throttled = || Observation {
        reason: Reason::Throttled,
        subject: Subject::Kernel(Arc::from(POD_B)),
        detail: Detail::Throttled(Limiter::Pod),
    };
    h.recorder.record(throttled());
    settle().await;
    tokio::time::sleep(Duration::from_secs(120)).await;
    h.recorder.record(throttled());
    settle().await;
    h.recorder.record(throttled());
    settle().await;
    assert!(
        h.api.state().created.is_empty(),
        "two within a minute are not repeated throttling"
    );
    h.recorder.record(throttled());
    settle().await;
    let state = h.api.state();
    assert_eq!(state.created.len(), 1);
    assert_eq!(state.created[0].count, Some(3));
    assert!(
        state.created[0]
            .message
            .as_deref()
            .unwrap()
            .contains("per-pod request limit")
    );
    h.shutdown.cancel();
}

#[tokio::test(start_paused = true)]
async fn pods_without_a_verified_name_get_no_event() {
    let h = start(FakeApi::default(), 16, no_names());
    h.recorder.record(Observation {
        reason: Reason::TokenExpired,
        subject: Subject::Kernel(Arc::from(POD_A)),
        detail: Detail::None,
    });
    settle().await;
    assert!(h.api.state().calls.is_empty());
    assert_eq!(outcome(&h.metrics, "unnamed"), 1);
    h.shutdown.cancel();
}

#[tokio::test(start_paused = true)]
async fn failures_are_retried_with_backoff_and_an_expired_event_is_recreated() {
    let api = FakeApi::default();
    api.fail(Operation::CreateEvent, 503, 2);
    let h = start(api, 16, no_names());
    h.recorder
        .record(verified(Reason::AssociationNotFound, POD_A));
    settle().await;
    assert!(h.api.state().created.is_empty());
    tokio::time::sleep(Duration::from_millis(3100)).await; // 1 s, then 2 s
    settle().await;
    assert_eq!(h.api.state().created.len(), 1);
    assert_eq!(
        h.metrics
            .kubernetes_api_errors
            .with_label_values(&["create_event"])
            .get(),
        2
    );
    // The Event expired in the API (its TTL): the next update creates it again, whole.
    h.api.state().created.clear();
    h.recorder
        .record(verified(Reason::AssociationNotFound, POD_A));
    settle().await;
    let state = h.api.state();
    assert_eq!(state.created.len(), 1);
    assert_eq!(state.created[0].count, Some(2));
    h.shutdown.cancel();
}

#[tokio::test(start_paused = true)]
async fn a_hung_api_never_blocks_the_request_path() {
    let api = FakeApi::default();
    api.state().hang = true;
    let h = start(api, 8, no_names());
    let started = std::time::Instant::now();
    for i in 0..1000 {
        let uid = format!("00000000-0000-4000-8000-{i:012}");
        h.recorder.record(verified(Reason::AccessDenied, &uid));
    }
    assert!(started.elapsed() < Duration::from_secs(1));
    settle().await;
    assert!(outcome(&h.metrics, "queue_full") > 900);
    assert_eq!(h.api.state().calls.len(), 1, "one call at a time");
    h.shutdown.cancel();
    h.task.await.unwrap();
}

/// A correlator with the kubelet's limits but at most 3 series.
fn three_series(metrics: &Metrics) -> Correlator {
    let (_recorder, inbox) = channel(1, metrics);
    let limits = Limits {
        max_series: 3,
        ..Limits::kubelet()
    };
    Correlator::new(
        limits,
        crate::backoff::Backoff::new(Duration::from_secs(1), Duration::from_secs(30)),
        Reporter {
            host: String::new(),
        },
        inbox.outcomes.clone(),
    )
}

#[test]
fn series_are_bounded() {
    let metrics = Metrics::new().unwrap();
    let mut c = three_series(&metrics);
    let now = tokio::time::Instant::now();
    for i in 0..10 {
        let uid = format!("00000000-0000-4000-8000-{i:012}");
        c.observe(
            verified(Reason::AccessDenied, &uid),
            &|_| None,
            now + Duration::from_secs(i),
            SystemTime::now(),
        );
    }
    assert_eq!(c.len(), 3);
    assert_eq!(outcome(&metrics, "abandoned"), 7);
}

#[tokio::test(start_paused = true)]
async fn allowances_are_bounded_with_the_series() {
    let metrics = Metrics::new().unwrap();
    let mut c = three_series(&metrics);
    for i in 0..10 {
        let uid = format!("00000000-0000-4000-8000-{i:012}");
        let now = tokio::time::Instant::now();
        c.observe(
            verified(Reason::AccessDenied, &uid),
            &|_| None,
            now,
            SystemTime::now(),
        );
        let call = c
            .next_call(now)
            .expect("a new pod's first call goes at once");
        c.finished(
            Sent {
                call,
                result: Ok(Default::default()),
            },
            now,
        );
        assert!(c.allowances() <= 3, "{} allowances", c.allowances());
        tokio::time::advance(Duration::from_secs(1)).await;
    }
    assert_eq!(c.len(), 3);
}
