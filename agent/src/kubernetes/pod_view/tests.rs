//! The pod view without an API server: pods read as the API serves them, the watcher's events
//! applied, lookups, the bound, and the watch client's timeouts.

use std::time::Duration;

use kube::runtime::watcher::Event;
use serde_json::{Value, json};

use super::pod::{Update, WatchedPod};
use super::reflect::{Reflector, ViewMetrics};
use super::*;
use crate::metrics::Metrics;

const UID: &str = "0b5e3c2a-1f0e-4c4e-9a51-3f1d2c7e8a90";
const APP_ID: &str = "4f1c0e7d9a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5";
const SIDECAR_ID: &str = "63fc2f5ea961a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a";
const INIT_ID: &str = "aa00000000000000000000000000000000000000000000000000000000000001";
const DEBUG_ID: &str = "bb00000000000000000000000000000000000000000000000000000000000002";

/// A pod as the API server serves it, `managedFields` and all.
fn pod_json(uid: &str, name: &str, phase: &str) -> Value {
    json!({
        "kind": "Pod", "apiVersion": "v1",
        "metadata": {
            "name": name, "namespace": "shop", "uid": uid, "resourceVersion": "41",
            "labels": {"app": "checkout"},
            "annotations": {
                "eks-pod-identity-agent.amazonaws.com/containers": "app",
                "kubectl.kubernetes.io/last-applied-configuration": "x".repeat(10_000),
            },
            "managedFields": [{"manager": "kubelet", "operation": "Update",
                               "fieldsType": "FieldsV1", "fieldsV1": {"f:status": {}}}],
        },
        "spec": {
            "serviceAccountName": "checkout", "nodeName": "ip-10-0-0-1",
            "containers": [{"name": "app", "image": "app:1"}, {"name": "istio-proxy", "image": "proxy:1"}],
        },
        "status": {
            "phase": phase,
            "containerStatuses": [
                {"name": "app", "containerID": format!("containerd://{APP_ID}"), "ready": true,
                 "restartCount": 0, "image": "app:1", "imageID": "sha256:1"},
                {"name": "istio-proxy", "containerID": format!("containerd://{SIDECAR_ID}"),
                 "ready": true, "restartCount": 0, "image": "proxy:1", "imageID": "sha256:2"},
                {"name": "waiting", "ready": false, "restartCount": 0, "image": "w:1", "imageID": ""},
            ],
            "initContainerStatuses": [
                {"name": "init", "containerID": format!("cri-o://{INIT_ID}"), "ready": true,
                 "restartCount": 0, "image": "i:1", "imageID": "sha256:3"},
            ],
            "ephemeralContainerStatuses": [
                {"name": "debugger", "containerID": format!("containerd://{DEBUG_ID}"),
                 "ready": false, "restartCount": 0, "image": "busybox", "imageID": "sha256:4"},
            ],
        },
    })
}

fn watched(value: Value) -> WatchedPod {
    serde_json::from_value(value).unwrap()
}

fn kept(value: Value) -> PodInfo {
    match Update::of(&watched(value)) {
        Update::Keep(uid, info) => {
            assert_eq!(&*uid, UID);
            info
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_pod_keeps_its_names_containers_and_the_agents_annotations_only() {
    let info = kept(pod_json(UID, "checkout-7d9f", "Running"));
    assert_eq!(&*info.namespace, "shop");
    assert_eq!(&*info.name, "checkout-7d9f");
    assert_eq!(&*info.service_account, "checkout");
    assert_eq!(
        info.annotations,
        vec![(
            "eks-pod-identity-agent.amazonaws.com/containers".to_owned(),
            "app".to_owned()
        )],
        "never kubectl's last-applied-configuration"
    );
    let name = |id: &str| info.container_name(id).map(|n| n.to_string());
    assert_eq!(name(APP_ID).as_deref(), Some("app"));
    assert_eq!(name(SIDECAR_ID).as_deref(), Some("istio-proxy"));
    assert_eq!(name(INIT_ID).as_deref(), Some("init"), "init containers");
    assert_eq!(
        name(DEBUG_ID).as_deref(),
        Some("debugger"),
        "ephemeral ones"
    );
    assert_eq!(
        info.containers.len(),
        4,
        "a container not started has no id"
    );
    assert_eq!(name("containerd://x"), None);
}

#[test]
fn a_pod_without_a_service_account_name_runs_as_default_and_odd_pods_are_handled() {
    let mut pod = pod_json(UID, "p", "Pending");
    pod["spec"] = json!({});
    pod["status"] = Value::Null;
    let info = kept(pod);
    assert_eq!(&*info.service_account, "default");
    assert!(info.containers.is_empty());
    for phase in ["Succeeded", "Failed"] {
        assert_eq!(
            Update::of(&watched(pod_json(UID, "p", phase))),
            Update::Finished(UID.into())
        );
    }
    let mut anonymous = pod_json(UID, "p", "Running");
    anonymous["metadata"].as_object_mut().unwrap().remove("uid");
    assert_eq!(Update::of(&watched(anonymous)), Update::Unusable);
}

fn reflector(capacity: usize) -> (PodView, Reflector, Metrics) {
    let metrics = Metrics::new().unwrap();
    let view = PodView::new();
    let reflector = Reflector::new(view.clone(), capacity, ViewMetrics::new(&metrics));
    (view, reflector, metrics)
}

fn uid(n: u32) -> String {
    format!("00000000-0000-4000-8000-{n:012}")
}

#[test]
fn a_list_replaces_the_view_only_once_complete_and_watch_events_change_it() {
    let (view, mut r, metrics) = reflector(100);
    r.apply(Event::Init);
    r.apply(Event::InitApply(watched(pod_json(&uid(1), "a", "Running"))));
    r.apply(Event::InitApply(watched(pod_json(&uid(2), "b", "Running"))));
    assert!(
        view.is_empty(),
        "nothing published before the list is complete"
    );
    assert_eq!(metrics.pod_view_synced.get(), 0);
    r.apply(Event::InitDone);
    assert_eq!(view.len(), 2);
    assert_eq!(metrics.pod_view_pods.get(), 2);
    assert_eq!(metrics.pod_view_synced.get(), 1);
    let before = view.get(&uid(1)).unwrap();

    // A relabel: the view's pod changes, and a lookup taken before keeps what it had.
    let mut renamed = pod_json(&uid(1), "a", "Running");
    renamed["spec"]["serviceAccountName"] = json!("other-sa");
    r.apply(Event::Apply(watched(renamed)));
    assert_eq!(&*view.get(&uid(1)).unwrap().service_account, "other-sa");
    assert_eq!(&*before.service_account, "checkout");

    // The watch fails: the last view stays.
    r.failed();
    assert_eq!(metrics.pod_view_synced.get(), 0);
    assert_eq!(view.len(), 2);

    // A re-list (after 410 Gone) in which b is gone and c is new: b leaves only at its end.
    r.apply(Event::Init);
    r.apply(Event::InitApply(watched(pod_json(&uid(1), "a", "Running"))));
    r.apply(Event::InitApply(watched(pod_json(&uid(3), "c", "Running"))));
    assert!(
        view.get(&uid(2)).is_some(),
        "the last view until the list ends"
    );
    r.apply(Event::InitDone);
    assert!(view.get(&uid(2)).is_none());
    assert!(view.get(&uid(3)).is_some());
    assert_eq!(metrics.pod_view_synced.get(), 1);

    r.apply(Event::Delete(watched(pod_json(&uid(3), "c", "Running"))));
    assert!(view.get(&uid(3)).is_none());
    r.apply(Event::Apply(watched(pod_json(&uid(1), "a", "Succeeded"))));
    assert!(view.is_empty(), "a finished pod leaves");
    assert_eq!(metrics.pod_view_pods.get(), 0);
}

#[test]
fn the_view_is_bounded_and_known_pods_keep_their_place() {
    let (view, mut r, metrics) = reflector(2);
    r.apply(Event::Init);
    for n in 1..=3 {
        r.apply(Event::InitApply(watched(pod_json(&uid(n), "p", "Running"))));
    }
    r.apply(Event::InitDone);
    assert_eq!(view.len(), 2);
    assert_eq!(metrics.pod_view_left_out.get(), 1);
    r.apply(Event::Apply(watched(pod_json(&uid(4), "p", "Running"))));
    assert_eq!(view.len(), 2);
    assert_eq!(metrics.pod_view_left_out.get(), 2);
    // A known pod's update still applies when the view is full.
    let mut renamed = pod_json(&uid(1), "p", "Running");
    renamed["metadata"]["name"] = json!("renamed");
    r.apply(Event::Apply(watched(renamed)));
    assert_eq!(&*view.get(&uid(1)).unwrap().name, "renamed");
}

#[test]
fn an_unchanged_pod_is_not_published_again() {
    let (view, mut r, _metrics) = reflector(10);
    r.apply(Event::Apply(watched(pod_json(UID, "p", "Running"))));
    let first = view.get(UID).unwrap();
    let mut status_only = pod_json(UID, "p", "Running");
    status_only["status"]["containerStatuses"][0]["restartCount"] = json!(1);
    r.apply(Event::Apply(watched(status_only)));
    assert!(Arc::ptr_eq(&first, &view.get(UID).unwrap()));
}

#[test]
fn a_token_matches_only_its_own_pod() {
    use base64::Engine as _;
    let info = kept(pod_json(UID, "checkout-7d9f", "Running"));
    let claims = |ns: &str, sa: &str, pod: &str, uid: &str| {
        let b64 = |v: Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
        let token = format!(
            "{}.{}.c2ln",
            b64(json!({"alg": "RS256"})),
            b64(
                json!({"exp": 4_000_000_000_i64, "aud": "pods.eks.amazonaws.com",
                "kubernetes.io": {"namespace": ns, "serviceaccount": {"name": sa, "uid": "s"},
                                  "pod": {"name": pod, "uid": uid}}})
            )
        );
        crate::token::Claims::parse(&token).unwrap()
    };
    assert!(token_matches(
        UID,
        &info,
        &claims("shop", "checkout", "checkout-7d9f", UID)
    ));
    for other in [
        claims("other", "checkout", "checkout-7d9f", UID),
        claims("shop", "admin", "checkout-7d9f", UID),
        claims("shop", "checkout", "another", UID),
        claims("shop", "checkout", "checkout-7d9f", &uid(9)),
    ] {
        assert!(!token_matches(UID, &info, &other));
    }
    let view = PodView::new();
    view.publish(Pods::from([(Arc::from(UID), Arc::new(info))]));
    let pod = view.get(UID).unwrap();
    let found = ViewedPod::new(pod.clone(), UID, Some(&claims("shop", "admin", "x", UID)));
    assert_eq!(found.token_matches, Some(false));
    assert_eq!(ViewedPod::new(pod, UID, None).token_matches, None);
    assert!(view.get(&uid(9)).is_none());
}

/// The watch runs on a client that reads longer than a watch call lasts (and longer than the
/// watcher's own idle timeout, the call's and 5 s); the other features' 10 s would cut every
/// quiet watch.
#[test]
fn the_watch_client_outlasts_a_watch_call() {
    let config = crate::config::KubernetesConfig {
        startup_taint: None,
        pod_events: false,
        call_timeout: Duration::from_secs(10),
        retry_backoff: crate::backoff::Backoff::new(
            Duration::from_secs(1),
            Duration::from_secs(30),
        ),
        event_queue: 8,
        pod_view: crate::config::PodViewConfig {
            mode: crate::config::PodViewMode::Auto,
            capacity: 440,
            watch_timeout: Duration::from_secs(290),
        },
    };
    let kube_config = kube::Config::new("https://10.100.0.1:443".parse().unwrap());
    let c = watch::client_config(kube_config, &config);
    assert!(c.read_timeout.unwrap() > Duration::from_secs(290 + 5));
    assert_eq!(c.connect_timeout, Some(config.call_timeout));
    assert!(!c.default_retry);
    let wc = watch::watcher_config("ip-10-0-0-1", config.pod_view.watch_timeout);
    assert_eq!(
        wc.field_selector.as_deref(),
        Some("spec.nodeName=ip-10-0-0-1")
    );
    assert_eq!(wc.timeout, Some(290));
    assert!(wc.bookmarks);
}

/// The audit record's `pod`: the view's names, the container's name from the kernel's container
/// id, and whether the token agrees; formatted from shared references on the writer's side.
#[test]
fn the_audit_record_names_the_callers_pod_and_container() {
    use crate::audit::{AuditEvent, to_line};
    use crate::cgroup::{CgroupInfo, PodCgroup, Qos};
    let info = Arc::new(kept(pod_json(UID, "checkout-7d9f", "Running")));
    let cgroup = |container: Option<&str>| {
        Arc::new(CgroupInfo {
            id: 41234,
            path: "/kubepods.slice/…".to_owned(),
            pod: Some(PodCgroup {
                pod_uid: Arc::from(UID),
                container_id: container.map(str::to_owned),
                qos: Qos::Burstable,
            }),
        })
    };
    let event = |container: Option<&str>, token_matches: Option<bool>| AuditEvent {
        cgroup: Some(cgroup(container)),
        pod: Some(ViewedPod {
            pod: info.clone(),
            token_matches,
        }),
        ..AuditEvent::new(
            std::time::SystemTime::UNIX_EPOCH,
            "169.254.200.1:1234".parse().unwrap(),
            "allowed",
            200,
        )
    };
    let json = |e: AuditEvent| {
        let mut line = Vec::new();
        to_line(&e.to_record(), &mut line).unwrap();
        serde_json::from_slice::<Value>(&line).unwrap()
    };
    assert_eq!(
        json(event(Some(SIDECAR_ID), Some(false)))["pod"],
        json!({"namespace": "shop", "name": "checkout-7d9f", "service_account": "checkout",
               "container": "istio-proxy", "token_matches": false})
    );
    let pod_level = json(event(None, None));
    assert_eq!(
        pod_level["pod"],
        json!({"namespace": "shop", "name": "checkout-7d9f", "service_account": "checkout",
               "container": null}),
        "no container: null; no token: no token_matches"
    );
    let unknown = AuditEvent {
        pod: None,
        ..event(Some(APP_ID), None)
    };
    assert!(json(unknown).get("pod").is_none(), "absent when unknown");
}

/// A watch that resumes quietly after a failure says nothing: the task calls `resumed` once no
/// failure has come for a while, which counts only for a view that was listed.
#[test]
fn a_quiet_resumption_puts_a_listed_view_in_step_again() {
    let (_view, mut r, metrics) = reflector(10);
    r.failed();
    assert!(!r.resumed(), "never listed");
    assert_eq!(metrics.pod_view_synced.get(), 0);
    r.apply(Event::Init);
    r.apply(Event::InitDone);
    r.failed();
    assert_eq!(metrics.pod_view_synced.get(), 0);
    assert!(r.resumed());
    assert_eq!(metrics.pod_view_synced.get(), 1);
    r.apply(Event::Init);
    assert!(!r.resumed(), "a list under way");
}
