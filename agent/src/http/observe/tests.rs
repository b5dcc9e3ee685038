//! Classification on the request path: which outcomes call for an Event, and whose pod it names.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use super::observation;
use crate::attribution::{Binding, Caller};
use crate::credentials::UpstreamError;
use crate::http::RequestError;
use crate::kubernetes::events::{Detail, Limiter, Reason, Subject};
use crate::token::{Claims, TokenError, unsigned_token};

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
fn an_unlisted_container_calls_for_an_event_on_the_kernels_pod() {
    use super::scope_observation;
    use crate::attribution::scope::Scope;
    let sidecar = Scope::Unlisted(Some("istio-proxy".into()));
    let refused = RequestError::ContainerNotAllowed("x".into());
    let o = scope_observation(Err(&refused), &sidecar, &Caller::in_test_pod(POD_A)).unwrap();
    assert_eq!(o.reason, Reason::ContainerNotListed);
    assert_eq!(o.subject, Subject::Kernel(POD_A.into()));
    assert_eq!(
        o.detail,
        Detail::Container {
            refused: true,
            name: Some("istio-proxy".into())
        }
    );
    // Served under audit: recorded.
    let o = scope_observation(Ok(()), &sidecar, &Caller::in_test_pod(POD_A)).unwrap();
    assert!(matches!(o.detail, Detail::Container { refused: false, .. }));
    // A listed or pending container, or a caller in no pod: nothing.
    let caller = Caller::in_test_pod(POD_A);
    assert_eq!(
        scope_observation(Ok(()), &Scope::Listed("app".into()), &caller),
        None
    );
    assert_eq!(
        scope_observation(Err(&refused), &Scope::Pending, &caller),
        None
    );
    assert_eq!(
        scope_observation(Err(&refused), &sidecar, &anonymous()),
        None
    );
}
