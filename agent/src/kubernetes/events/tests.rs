//! Classification on the request path, and the Events task against a scripted API in paused time.

use std::time::SystemTime;

use serde_json::json;

use super::*;
use crate::credentials::UpstreamError;
use crate::kubernetes::fake::FakeApi;
use crate::token::unsigned_token;

const POD_A: &str = "0b5e3c2a-1111-4222-8333-444455556666";
const POD_B: &str = "7c1d2e3f-aaaa-4bbb-8ccc-ddddeeeeffff";

fn claims(pod_uid: &str) -> Claims {
    let now = 1_900_000_000;
    Claims::parse(&unsigned_token(&json!({
        "aud": ["pods.eks.amazonaws.com"], "exp": now + 86400, "iat": now, "jti": "j",
        "sub": "system:serviceaccount:shop:cart",
        "kubernetes.io": {"namespace": "shop", "pod": {"name": "cart-1", "uid": pod_uid},
                          "serviceaccount": {"name": "cart", "uid": "s"}}
    })))
    .unwrap()
}

fn anonymous() -> Caller {
    Caller::unattributed("169.254.200.1:40000".parse().unwrap())
}

fn upstream(code: &str, status: u16) -> RequestError {
    RequestError::Upstream(Arc::new(UpstreamError::new(status, code, "m")))
}

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
fn served_requests_call_for_nothing() {
    let c = claims(POD_A);
    assert_eq!(
        observation(
            Ok(()),
            Some(&Binding::Match),
            Some(&c),
            &Caller::in_test_pod(POD_A)
        ),
        None
    );
    assert_eq!(observation(Ok(()), None, None, &anonymous()), None);
    assert_eq!(
        observation(
            Err(&upstream("InternalServerException", 500)),
            Some(&Binding::Match),
            Some(&c),
            &Caller::in_test_pod(POD_A)
        ),
        None,
        "a transient EKS Auth failure is not the pod's business"
    );
}

#[test]
fn errors_that_prove_eks_auth_checked_the_token_name_the_pod_from_its_claims() {
    let c = claims(POD_A);
    for (code, reason) in [
        ("ResourceNotFoundException", Reason::AssociationNotFound),
        ("AccessDeniedException", Reason::AccessDenied),
    ] {
        // Even unattributed (no eBPF): EKS Auth vouched for the claims.
        let o = observation(Err(&upstream(code, 404)), None, Some(&c), &anonymous()).unwrap();
        assert_eq!(o.reason, reason);
        let Subject::Verified(pod) = &o.subject else {
            panic!("{o:?}")
        };
        assert_eq!(
            (&*pod.namespace, &*pod.name, &*pod.uid),
            ("shop", "cart-1", POD_A)
        );
        assert_eq!(pod.service_account.as_deref(), Some("cart"));
    }
}

#[test]
fn unverified_outcomes_go_on_the_kernels_pod_or_nowhere() {
    let c = claims(POD_A);
    let expired = RequestError::Token(TokenError::Expired);
    let o = observation(Err(&expired), None, Some(&c), &Caller::in_test_pod(POD_A)).unwrap();
    assert_eq!(o.reason, Reason::TokenExpired);
    assert_eq!(o.subject, Subject::Kernel(Arc::from(POD_A)));
    assert_eq!(
        observation(Err(&expired), None, Some(&c), &anonymous()),
        None,
        "claims the agent cannot verify never name a pod"
    );
    let o = observation(
        Err(&RequestError::PodThrottled {
            retry_after: Duration::from_secs(1),
        }),
        None,
        None,
        &Caller::in_test_pod(POD_B),
    )
    .unwrap();
    assert_eq!(o.reason, Reason::Throttled);
    assert_eq!(o.detail, Detail::Throttled(Limiter::Pod));
    assert_eq!(o.subject, Subject::Kernel(Arc::from(POD_B)));
}

#[test]
fn a_mismatch_goes_on_the_presenting_pod() {
    let c = claims(POD_A);
    let mismatch = Binding::Mismatch("the token is for another pod".into());
    let refused = RequestError::Binding("x".into());
    let o = observation(
        Err(&refused),
        Some(&mismatch),
        Some(&c),
        &Caller::in_test_pod(POD_B),
    )
    .unwrap();
    assert_eq!(o.reason, Reason::TokenBindingMismatch);
    assert_eq!(o.subject, Subject::Kernel(Arc::from(POD_B)));
    assert_eq!(
        o.detail,
        Detail::Mismatch {
            refused: true,
            other_node: false,
            token_pod: Some(POD_A.into())
        }
    );
    // Under audit it is served, and still reported.
    let o = observation(
        Ok(()),
        Some(&mismatch),
        Some(&c),
        &Caller::in_test_pod(POD_B),
    )
    .unwrap();
    assert!(matches!(o.detail, Detail::Mismatch { refused: false, .. }));
    // A verified error for a token presented from another pod is about the presenting pod too.
    let o = observation(
        Err(&upstream("ResourceNotFoundException", 404)),
        None,
        Some(&c),
        &Caller::in_test_pod(POD_B),
    )
    .unwrap();
    assert_eq!(o.subject, Subject::Kernel(Arc::from(POD_B)));
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
        (Duration::from_secs(1), Duration::from_secs(30)),
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

#[test]
fn series_are_bounded() {
    let metrics = Metrics::new().unwrap();
    let (_recorder, inbox) = channel(1, &metrics);
    let limits = Limits {
        max_series: 3,
        ..Limits::kubelet()
    };
    let mut c = super::super::correlator::Correlator::new(
        limits,
        (Duration::from_secs(1), Duration::from_secs(30)),
        Reporter {
            host: String::new(),
        },
        inbox.outcomes.clone(),
    );
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
