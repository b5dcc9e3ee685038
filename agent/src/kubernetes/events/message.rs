//! The Event's message: the reason in words, naming the namespace, service account and role
//! where known, never a token or a credential.

use super::observation::{Detail, Limiter, PodIdentity, Reason};

/// The Event's message (at most 1 KiB, the API's limit for a note).
pub fn message(reason: Reason, detail: &Detail, pod: &PodIdentity) -> String {
    let sa = match &pod.service_account {
        Some(sa) => format!("service account {}/{sa}", pod.namespace),
        None => format!("namespace {}", pod.namespace),
    };
    let role = pod
        .role_arn
        .as_deref()
        .map(|r| format!(", role {r}"))
        .unwrap_or_default();
    let mut text = match (reason, detail) {
        (Reason::AssociationNotFound, _) => format!(
            "No EKS Pod Identity association for {sa}: EKS Auth answered ResourceNotFoundException, so the pod gets no AWS credentials"
        ),
        (Reason::AccessDenied, _) => format!(
            "EKS Auth denied AWS credentials to {sa}{role} (AccessDeniedException): check the association and the role's trust policy"
        ),
        (
            Reason::TokenBindingMismatch,
            Detail::Mismatch {
                refused,
                other_node,
                token_pod,
            },
        ) => {
            let whose = match (other_node, token_pod.as_deref()) {
                (true, _) => "issued for this pod on another node".to_owned(),
                (false, Some(uid)) if !uid.is_empty() => format!("of another pod ({uid})"),
                (false, _) => "of another pod".to_owned(),
            };
            let verdict = if *refused {
                "refused (--token-binding enforce)"
            } else {
                "recorded, not refused (--token-binding audit)"
            };
            format!(
                "This pod ({sa}{role}) presented a service-account token {whose} to the EKS Pod Identity Agent: {verdict}"
            )
        }
        (Reason::Throttled, Detail::Throttled(limiter)) => {
            let by = match limiter {
                Limiter::Pod => "the agent's per-pod request limit (--pod-request-rate)",
                Limiter::Node => "the agent's node-wide request limit (--global-request-rate)",
                Limiter::EksAuth => "EKS Auth (ThrottlingException)",
                Limiter::Queue => {
                    "the agent's pace towards EKS Auth (requests queued past their deadline)"
                }
            };
            format!("Credential requests of {sa}{role} are being throttled by {by}")
        }
        (Reason::Throttled, _) => format!("Credential requests of {sa}{role} are being throttled"),
        (Reason::TokenExpired, _) => format!(
            "The pod presented an expired service-account token ({sa}): the kubelet rotates it before it expires; is the projected token mounted and refreshed?"
        ),
        (Reason::ContainerNotListed, Detail::Container { refused, name }) => {
            let who = match name {
                Some(name) => format!("Container {name} of this pod"),
                None => "A process of this pod in no container".to_owned(),
            };
            let verdict = if *refused {
                "refused (--token-binding enforce)"
            } else {
                "recorded, not refused (--token-binding audit)"
            };
            format!(
                "{who} asked for the credentials of {sa}{role}, but the pod's annotation eks-pod-identity-agent.amazonaws.com/containers does not list it: {verdict}"
            )
        }
        (Reason::ContainerNotListed, _) => format!(
            "A container of this pod that its annotation eks-pod-identity-agent.amazonaws.com/containers does not list asked for the credentials of {sa}{role}"
        ),
        (Reason::TokenBindingMismatch, _) => format!(
            "This pod ({sa}{role}) presented a service-account token of another pod to the EKS Pod Identity Agent"
        ),
    };
    if text.len() > 1024 {
        let mut end = 1024;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}
