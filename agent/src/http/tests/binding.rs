//! Token binding against the kernel's caller, a rotated token during an outage, and namespace
//! labels only from what EKS Auth verified.

use super::*;

#[tokio::test]
async fn enforced_binding_refuses_another_pods_token_and_unattributed_callers() {
    let up = Arc::new(Upstream::default());
    let policy = policy(TokenBinding::Enforce, no_limit());
    let e = endpoint(&up, policy, no_limit());
    let t = token(POD, "cart", "j1");
    let (status, body) = fetch(&e, &t, &Caller::in_test_pod("another-pod")).await;
    assert_eq!(status, 403);
    assert!(body.contains("another-pod"), "{body}");
    assert_eq!(fetch(&e, &t, &anonymous()).await.0, 403);
    assert_eq!(fetch(&e, &t, &Caller::in_test_pod(POD)).await.0, 200);
}

#[tokio::test]
async fn a_rotated_token_is_served_the_pods_cached_credentials_while_upstream_fails() {
    let up = Arc::new(Upstream::default());
    let policy = policy(TokenBinding::Audit, no_limit());
    let e = endpoint(&up, policy, no_limit());
    let old = token(POD, "cart", "old");
    let (status, first) = fetch(&e, &old, &Caller::in_test_pod(POD)).await;
    assert_eq!(status, 200);
    up.script.lock().unwrap().extend([
        UpstreamError::new(503, "ServiceUnavailableException", "down"),
        UpstreamError::new(503, "ServiceUnavailableException", "down"),
        UpstreamError::new(503, "ServiceUnavailableException", "down"),
    ]);
    let new = token(POD, "cart", "new");
    let (status, body) = fetch(&e, &new, &Caller::in_test_pod(POD)).await;
    assert_eq!((status, &body), (200, &first));
    // Not for another service account of the pod, nor for a caller the kernel does not place in it.
    let other_sa = token(POD, "admin", "new2");
    assert_eq!(fetch(&e, &other_sa, &Caller::in_test_pod(POD)).await.0, 503);
    let new3 = token(POD, "cart", "new3");
    assert_eq!(fetch(&e, &new3, &anonymous()).await.0, 503);
}

#[tokio::test]
async fn namespace_labels_come_only_from_what_eks_auth_verified() {
    let up = Arc::new(Upstream::default());
    let e = endpoint(&up, Attribution::off(), no_limit());
    let now = Clock::System.unix_now();
    for i in 0..5 {
        up.script.lock().unwrap().push_back(UpstreamError::new(
            400,
            "InvalidTokenException",
            "forged",
        ));
        let forged = unsigned_token(&json!({
            "aud": "pods.eks.amazonaws.com", "exp": now + 3600, "iat": now,
            "kubernetes.io": {"namespace": format!("forged-{i}")}
        }));
        assert_eq!(fetch(&e, &forged, &anonymous()).await.0, 400);
    }
    assert_eq!(
        fetch(&e, &token(POD, "cart", "j1"), &anonymous()).await.0,
        200
    );
    let text = String::from_utf8(e.metrics.render()).unwrap();
    assert!(!text.contains("forged"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("pod_identity_requests_total{")
                && l.contains(r#"namespace="shop""#)
                && l.contains(r#"code="200""#)),
        "{text}"
    );
}
