//! Per-container scoping on the request path: the pod view's pod lists its containers, and the
//! kernel's container decides.

use std::collections::HashMap;

use super::*;
use crate::cgroup::{CgroupInfo, PodCgroup, Qos};

const APP: &str = "4f1c0e7d9a2b";
const SIDECAR: &str = "63fc2f5ea961";

/// A view with the pod [`POD`]: containers `app` and `istio-proxy`, and the containers
/// annotation `annotation`.
fn view(annotation: Option<&str>) -> PodView {
    let pod = PodInfo::app_and_sidecar(APP, SIDECAR, annotation);
    PodView::with_pods(HashMap::from([(Arc::from(POD), Arc::new(pod))]))
}

/// A process the kernel placed in the container `id` of [`POD`].
fn in_container(id: &str) -> Caller {
    let mut caller = Caller::in_test_pod(POD);
    caller.cgroup = Some(Arc::new(CgroupInfo {
        id: 9,
        path: format!("/kubepods.slice/pod.slice/cri-containerd-{id}.scope"),
        pod: Some(PodCgroup {
            pod_uid: Arc::from(POD),
            container_id: Some(id.to_owned()),
            qos: Qos::Burstable,
        }),
    }));
    caller
}

fn scoped_endpoint(
    up: &Arc<Upstream>,
    binding: TokenBinding,
    annotation: Option<&str>,
) -> Endpoint<Arc<Upstream>> {
    endpoint(up, policy(binding, no_limit()), no_limit()).with_pod_view(Some(view(annotation)))
}

fn scope_count(e: &Endpoint<Arc<Upstream>>, result: &str) -> u64 {
    e.metrics.container_scope.with_label_values(&[result]).get()
}

#[tokio::test]
async fn under_enforce_only_the_listed_containers_get_the_pods_credentials() {
    let up = Arc::new(Upstream::default());
    let e = scoped_endpoint(&up, TokenBinding::Enforce, Some("app"));
    let t = token(POD, "cart", "j1");
    let (status, _) = fetch(&e, &t, &in_container(SIDECAR)).await;
    assert_eq!(status, 403);
    let (_, body) = fetch(&e, &t, &in_container(SIDECAR)).await;
    assert!(body.contains("container istio-proxy"), "{body}");
    assert!(body.contains("lists: app"), "{body}");
    // Refused before any call: the sidecar cannot even warm the cache.
    assert_eq!(up.calls.load(Ordering::SeqCst), 0);
    assert_eq!(fetch(&e, &t, &in_container(APP)).await.0, 200);
    // A cached token is no way around it.
    assert_eq!(fetch(&e, &t, &in_container(SIDECAR)).await.0, 403);
    // A process of the pod in no container of it.
    let mut podless = Caller::in_test_pod(POD);
    podless.cgroup = Some(Arc::new(CgroupInfo {
        id: 9,
        path: "/kubepods.slice/pod.slice".into(),
        pod: Some(PodCgroup {
            pod_uid: Arc::from(POD),
            container_id: None,
            qos: Qos::Burstable,
        }),
    }));
    let (status, body) = fetch(&e, &t, &podless).await;
    assert_eq!(status, 403);
    assert!(body.contains("in no container"), "{body}");
    assert_eq!(scope_count(&e, "listed"), 1);
    assert_eq!(scope_count(&e, "unlisted"), 4);
}

#[tokio::test]
async fn a_container_not_in_the_pods_status_yet_is_told_to_retry() {
    let up = Arc::new(Upstream::default());
    let e = scoped_endpoint(&up, TokenBinding::Enforce, Some("app"));
    let r = e
        .handle(
            request(
                "GET",
                CREDENTIALS_PATH,
                "169.254.170.23",
                Some(&token(POD, "cart", "j1")),
            ),
            &in_container("5e6f70819a2b"),
        )
        .await;
    assert_eq!(r.status().as_u16(), 503);
    assert_eq!(r.headers().get("retry-after").unwrap(), "1");
    assert_eq!(scope_count(&e, "pending"), 1);
    assert_eq!(up.calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn audit_mode_and_pods_without_the_annotation_serve_every_container() {
    let up = Arc::new(Upstream::default());
    let t = token(POD, "cart", "j1");
    let audit = scoped_endpoint(&up, TokenBinding::Audit, Some("app"));
    assert_eq!(fetch(&audit, &t, &in_container(SIDECAR)).await.0, 200);
    assert_eq!(scope_count(&audit, "unlisted"), 1);
    let unscoped = scoped_endpoint(&up, TokenBinding::Enforce, None);
    assert_eq!(fetch(&unscoped, &t, &in_container(SIDECAR)).await.0, 200);
    assert_eq!(scope_count(&unscoped, "unlisted"), 0);
    // The view does not know the pod: served (and nothing counted).
    let unknown = endpoint(&up, policy(TokenBinding::Enforce, no_limit()), no_limit())
        .with_pod_view(Some(PodView::new()));
    assert_eq!(fetch(&unknown, &t, &in_container(SIDECAR)).await.0, 200);
}

/// The `namespace` labels of the `pod_identity_requests_total` series with `code`.
fn namespace_label(e: &Endpoint<Arc<Upstream>>, code: &str) -> Vec<String> {
    let text = String::from_utf8(e.metrics.render()).unwrap();
    text.lines()
        .filter(|l| l.starts_with("pod_identity_requests_total{") && l.contains(code))
        .filter_map(|l| {
            let rest = &l[l.find("namespace=\"")? + "namespace=\"".len()..];
            Some(rest[..rest.find('"')?].to_owned())
        })
        .collect()
}

#[tokio::test]
async fn requests_are_counted_under_the_namespace_of_the_pod_the_view_has() {
    let up = Arc::new(Upstream::default());
    let e = scoped_endpoint(&up, TokenBinding::Enforce, Some("app"));
    // Refused before EKS Auth could verify anything: still the pod's namespace, from the view.
    let t = token(POD, "cart", "j1");
    assert_eq!(fetch(&e, &t, &in_container(SIDECAR)).await.0, 403);
    assert_eq!(namespace_label(&e, r#"code="403""#), ["shop"]);
    // A token naming another namespace changes nothing: the kernel's pod is in `shop`.
    let now = Clock::System.unix_now();
    let claims_other = unsigned_token(&json!({
        "aud": ["pods.eks.amazonaws.com"], "exp": now + 86400, "iat": now, "nbf": now, "jti": "j2",
        "sub": "system:serviceaccount:forged:cart",
        "kubernetes.io": {"namespace": "forged", "pod": {"name": "cart", "uid": POD},
                          "serviceaccount": {"name": "cart", "uid": "s"}}
    }));
    fetch(&e, &claims_other, &in_container(APP)).await;
    let text = String::from_utf8(e.metrics.render()).unwrap();
    assert!(!text.contains("forged"), "{text}");
}
