//! Events on pods whose credential requests are refused or fail, so that `kubectl describe pod`
//! says why a pod gets no AWS credentials.
//!
//! The request path only classifies its outcome ([`observation`]: a match on the result, nothing
//! when the request was served) and queues it without waiting ([`EventRecorder::record`]: a full
//! queue drops and counts). A task of its own ([`run`]) names the pod, aggregates and
//! rate-limits per pod ([`super::correlator`]) and talks to the API, one call at a time with a
//! deadline: a slow or hung API fills the queue, never a request.
//!
//! **Which pod, and who says so.** The Event goes on the pod that asked, as the kernel placed the
//! caller — for a token-binding mismatch, the pod that presented another's token. Its name,
//! namespace and service account come only from tokens EKS Auth verified: from this request's
//! token when EKS Auth's answer proves it checked it (no association, AccessDenied), otherwise
//! from a token of that pod EKS Auth accepted earlier (the credential cache, keyed by the
//! kernel's pod UID: [`PodNames`]). Claims the agent could not verify never name the object or
//! the namespace of an Event — a forged token cannot make the agent write Events elsewhere.
//! A pod that cannot be named this way gets no Event (counted as `unnamed`).
//!
//! Messages name the namespace, service account and role where known; never a token or a
//! credential.

use std::sync::Arc;
use std::time::Duration;

use futures::future::OptionFuture;
use prometheus::IntCounter;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::correlator::{Call, Correlator, Limits, Sent};
use super::{ApiErrors, KubeApi, Operation};
use crate::attribution::{Binding, Caller, PodKey};
use crate::credentials::Retriever;
use crate::credentials::cache::CredentialCache;
use crate::credentials::upstream_error::bare_code;
use crate::http::RequestError;
use crate::metrics::Metrics;
use crate::token::{Claims, TokenError};

/// Why an Event is posted: its `reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// EKS Auth: `ResourceNotFoundException`, no association for the service account.
    AssociationNotFound,
    /// EKS Auth: `AccessDeniedException`.
    AccessDenied,
    /// The token names another pod (or node) than the caller's.
    TokenBindingMismatch,
    /// Requests answered 429, by the agent's limits or EKS Auth's throttling.
    Throttled,
    /// An expired token (the agent's check, or EKS Auth's `ExpiredTokenException`).
    TokenExpired,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::AssociationNotFound => "PodIdentityAssociationNotFound",
            Reason::AccessDenied => "PodIdentityAccessDenied",
            Reason::TokenBindingMismatch => "PodIdentityTokenBindingMismatch",
            Reason::Throttled => "PodIdentityThrottled",
            Reason::TokenExpired => "PodIdentityTokenExpired",
        }
    }
}

/// A pod as a verified token names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodIdentity {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub service_account: Option<String>,
    /// The role its association grants, when known.
    pub role_arn: Option<String>,
}

impl PodIdentity {
    /// The pod the claims name, when they name one fully.
    pub fn from_claims(claims: &Claims) -> Option<Self> {
        Some(PodIdentity {
            namespace: claims.namespace()?.to_owned(),
            name: claims.pod_name()?.to_owned(),
            uid: claims.pod_uid()?.to_owned(),
            service_account: claims.service_account().map(str::to_owned),
            role_arn: None,
        })
    }
}

/// Names the pod with this UID from a token of it EKS Auth verified, if the agent has one.
pub type PodNames = Arc<dyn Fn(&str) -> Option<PodIdentity> + Send + Sync>;

/// Names pods from the credential cache: an entry exists only for a token EKS Auth accepted, and
/// its claims name the pod (and its association the role). Walks the cache, so only for a pod the
/// Events task has no series of yet, off the request path.
pub fn names_from_cache<R: Retriever>(cache: &CredentialCache<R>) -> PodNames {
    let cache = cache.clone();
    Arc::new(move |uid: &str| {
        let entry = cache.find(|e| e.claims.pod_uid() == Some(uid))?;
        let mut pod = PodIdentity::from_claims(&entry.claims)?;
        pod.role_arn = Some(entry.issued().association.role_arn.clone()).filter(|r| !r.is_empty());
        Some(pod)
    })
}

/// Who the Event is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    /// EKS Auth checked this request's token: its claims name the pod.
    Verified(PodIdentity),
    /// The pod (UID) the kernel placed the caller in, to be named through [`PodNames`].
    Kernel(Arc<str>),
}

/// Which limit answered 429.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limiter {
    Pod,
    Node,
    EksAuth,
    /// The agent's queue towards EKS Auth (its pace) was too long for the request's deadline.
    Queue,
}

/// What the message says besides the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Detail {
    None,
    Mismatch {
        /// Refused (`enforce`), or only recorded (`audit`).
        refused: bool,
        /// The token names this very pod, but another node.
        other_node: bool,
        /// The pod UID the token names (unverified: only characters of a UID are kept).
        token_pod: Option<String>,
    },
    Throttled(Limiter),
}

/// One refused or failed request, as the request path reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    pub reason: Reason,
    pub subject: Subject,
    pub detail: Detail,
}

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

/// At most a UID's characters (hex digits and dashes, 36 of them) of an unverified claim.
fn uid_chars(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_hexdigit() || *c == '-')
        .take(36)
        .collect()
}

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

/// The request path's handle: queues observations without waiting. Cheap to clone.
#[derive(Clone)]
pub struct EventRecorder {
    queue: mpsc::Sender<Observation>,
    queue_full: IntCounter,
}

impl EventRecorder {
    /// Queues `observation` for the Events task; drops and counts it when the queue is full.
    pub fn record(&self, observation: Observation) {
        // Closed: the task is gone (no usable Kubernetes configuration, counted as such).
        if let Err(mpsc::error::TrySendError::Full(_)) = self.queue.try_send(observation) {
            self.queue_full.inc();
        }
    }
}

/// The Events task's end of the queue.
pub struct EventInbox {
    queue: mpsc::Receiver<Observation>,
    outcomes: Outcomes,
}

/// `pod_identity_pod_events_total` by outcome, resolved once.
#[derive(Clone)]
pub struct Outcomes {
    pub created: IntCounter,
    pub updated: IntCounter,
    pub unnamed: IntCounter,
    pub abandoned: IntCounter,
}

/// A queue of `capacity` observations between the request path and the Events task.
pub fn channel(capacity: usize, metrics: &Metrics) -> (EventRecorder, EventInbox) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let outcome = |o: &str| metrics.pod_events.with_label_values(&[o]);
    (
        EventRecorder {
            queue: tx,
            queue_full: outcome("queue_full"),
        },
        EventInbox {
            queue: rx,
            outcomes: Outcomes {
                created: outcome("created"),
                updated: outcome("updated"),
                unnamed: outcome("unnamed"),
                abandoned: outcome("abandoned"),
            },
        },
    )
}

/// Who posts the Events (`source`, `reportingComponent`, `reportingInstance`).
#[derive(Debug, Clone)]
pub struct Reporter {
    /// This node's name.
    pub host: String,
}

/// The Events task: takes observations, and sends what the correlator calls for, one call at a
/// time, each within the client's deadline. Observations keep being taken while a call is under
/// way, so a slow API delays Events, never the queue's consumer. Ends at shutdown.
pub async fn run<A: KubeApi>(
    api: A,
    inbox: EventInbox,
    reporter: Reporter,
    names: PodNames,
    backoff: (Duration, Duration),
    errors: ApiErrors,
    shutdown: CancellationToken,
) {
    let EventInbox {
        queue: mut inbox,
        outcomes,
    } = inbox;
    let mut correlator = Correlator::new(Limits::kubelet(), backoff, reporter, outcomes);
    let mut in_flight: Option<std::pin::Pin<Box<dyn Future<Output = Sent> + Send>>> = None;
    loop {
        let due = correlator.next_due(tokio::time::Instant::now());
        tokio::select! {
            () = shutdown.cancelled() => break,
            observation = inbox.recv() => match observation {
                Some(o) => correlator.observe(o, &*names, tokio::time::Instant::now(), std::time::SystemTime::now()),
                None => break,
            },
            Some(sent) = OptionFuture::from(in_flight.as_mut()), if in_flight.is_some() => {
                in_flight = None;
                if let Err(e) = &sent.result {
                    errors.count(sent.operation());
                    tracing::debug!(error = %e, operation = sent.operation().as_str(), "posting an Event failed");
                }
                correlator.finished(sent, tokio::time::Instant::now());
            }
            () = sleep_until(due), if in_flight.is_none() && due.is_some() => {}
        }
        if in_flight.is_none()
            && let Some(call) = correlator.next_call(tokio::time::Instant::now())
        {
            in_flight = Some(Box::pin(send(api.clone(), call)));
        }
    }
}

async fn sleep_until(due: Option<tokio::time::Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due).await,
        None => std::future::pending().await,
    }
}

/// One API call the correlator asked for.
async fn send<A: KubeApi>(api: A, call: Call) -> Sent {
    let result = match &call {
        Call::Create {
            namespace, event, ..
        } => api.create_event(namespace, event).await,
        Call::Patch {
            namespace,
            name,
            patch,
            ..
        } => api.patch_event(namespace, name, patch).await,
    };
    Sent { call, result }
}

impl Sent {
    fn operation(&self) -> Operation {
        match self.call {
            Call::Create { .. } => Operation::CreateEvent,
            Call::Patch { .. } => Operation::PatchEvent,
        }
    }
}

#[cfg(test)]
mod tests;
