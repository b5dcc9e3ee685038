//! A finished request, classified into what the Events on pods report ([`Observation`]): which
//! refusals and failures call for an Event, and whose pod it goes on. Cheap (a match on the
//! result), on the request path; the Events side ([`crate::kubernetes::events`]) never sees a
//! [`RequestError`] and so never imports HTTP.

use crate::attribution::scope::Scope;
use crate::attribution::{Binding, Caller, PodKey};
use crate::credentials::upstream_error::bare_code;
use crate::kubernetes::events::{
    Detail, Limiter, Observation, PodIdentity, Reason, Subject, uid_chars,
};
use crate::token::{Claims, TokenError};

use super::RequestError;

/// What a finished request calls for, if anything: cheap, and nothing for a served request
/// whose token matched its caller.
pub fn observation(
    result: Result<(), &RequestError>,
    binding: Option<&Binding>,
    claims: Option<&Claims>,
    caller: &Caller,
) -> Option<Observation> {
    let kernel = || match caller.pod_key() {
        PodKey::Pod(uid) => Some(uid),
        PodKey::Unplaced => None,
    };
    if let Some(Binding::Mismatch(_)) = binding {
        let presenting = kernel()?;
        let token_pod = claims.and_then(Claims::pod_uid);
        return Some(Observation {
            reason: Reason::TokenBindingMismatch,
            detail: Detail::Mismatch {
                refused: matches!(result, Err(RequestError::Binding(_))),
                other_node: token_pod == Some(&*presenting),
                token_pod: token_pod.map(uid_chars),
            },
            subject: Subject::Kernel(presenting),
        });
    }
    let (reason, detail, verified) = match result.err()? {
        RequestError::Token(TokenError::Expired) => (Reason::TokenExpired, Detail::None, false),
        RequestError::Throttled => (Reason::Throttled, Detail::Throttled(Limiter::Node), false),
        RequestError::PodThrottled { .. } => {
            (Reason::Throttled, Detail::Throttled(Limiter::Pod), false)
        }
        RequestError::Queued { throttled, .. } => {
            let limiter = match throttled {
                Some(_) => Limiter::EksAuth,
                None => Limiter::Queue,
            };
            (Reason::Throttled, Detail::Throttled(limiter), false)
        }
        RequestError::Upstream(e) => match bare_code(&e.code) {
            "ResourceNotFound" => (Reason::AssociationNotFound, Detail::None, true),
            "AccessDenied" => (Reason::AccessDenied, Detail::None, true),
            "ExpiredToken" => (Reason::TokenExpired, Detail::None, false),
            "Throttling" => (
                Reason::Throttled,
                Detail::Throttled(Limiter::EksAuth),
                false,
            ),
            _ => return None,
        },
        _ => return None,
    };
    let verified = verified
        .then(|| claims.and_then(PodIdentity::from_claims))
        .flatten()
        // The kernel's word wins: a verified token presented from another pod is that pod's
        // business (a mismatch, reported as such when binding is on).
        .filter(|p| kernel().is_none_or(|k| *k == *p.uid));
    let subject = match verified {
        Some(pod) => Subject::Verified(pod),
        None => Subject::Kernel(kernel()?),
    };
    Some(Observation {
        reason,
        subject,
        detail,
    })
}

/// A request from a container its pod does not list (per-container scoping), refused or only
/// recorded: an Event on the pod the kernel placed it in. A container not in the pod's status
/// yet calls for none (it is told to retry, and is named moments later).
pub fn scope_observation(
    result: Result<(), &RequestError>,
    scope: &Scope,
    caller: &Caller,
) -> Option<Observation> {
    let Scope::Unlisted(name) = scope else {
        return None;
    };
    let PodKey::Pod(uid) = caller.pod_key() else {
        return None;
    };
    Some(Observation {
        reason: Reason::ContainerNotListed,
        detail: Detail::Container {
            refused: matches!(result, Err(RequestError::ContainerNotAllowed(_))),
            name: name.as_deref().map(str::to_owned),
        },
        subject: Subject::Kernel(uid),
    })
}

#[cfg(test)]
mod tests;
