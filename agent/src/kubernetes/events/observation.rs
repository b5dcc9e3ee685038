//! What the request path reports of a refused or failed request ([`Observation`]: the reason,
//! the pod it is about, the detail of the message), and how a pod the kernel placed is named from
//! tokens EKS Auth verified ([`PodNames`], [`names_from_cache`]). Plain data; reads the credential
//! cache, nothing else.

use std::sync::Arc;

use crate::credentials::Retriever;
use crate::credentials::cache::CredentialCache;
use crate::kubernetes::pod_view::PodView;
use crate::token::Claims;

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
    /// A container the pod does not list asked for its credentials (per-container scoping).
    ContainerNotListed,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::AssociationNotFound => "PodIdentityAssociationNotFound",
            Reason::AccessDenied => "PodIdentityAccessDenied",
            Reason::TokenBindingMismatch => "PodIdentityTokenBindingMismatch",
            Reason::Throttled => "PodIdentityThrottled",
            Reason::TokenExpired => "PodIdentityTokenExpired",
            Reason::ContainerNotListed => "PodIdentityContainerNotListed",
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

/// Names pods from the pod view when it has them (the API server's names for the UID the kernel
/// saw), else from the credential cache; the role, from the cache either way.
pub fn names_from_view_or_cache<R: Retriever>(
    view: Option<PodView>,
    cache: &CredentialCache<R>,
) -> PodNames {
    let from_cache = names_from_cache(cache);
    let Some(view) = view else {
        return from_cache;
    };
    Arc::new(move |uid: &str| {
        let cached = from_cache(uid);
        let Some(pod) = view.get(uid) else {
            return cached;
        };
        Some(PodIdentity {
            namespace: pod.namespace.to_string(),
            name: pod.name.to_string(),
            uid: uid.to_owned(),
            service_account: Some(pod.service_account.to_string()),
            role_arn: cached.and_then(|c| c.role_arn),
        })
    })
}

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
    /// A container the pod does not list, by its name in the pod's status (`None`: a process of
    /// the pod in no container).
    Container {
        /// Refused (`enforce`), or only recorded (`audit`).
        refused: bool,
        name: Option<String>,
    },
}

/// One refused or failed request, as the request path reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    pub reason: Reason,
    pub subject: Subject,
    pub detail: Detail,
}

/// At most a UID's characters (hex digits and dashes, 36 of them) of an unverified claim.
pub fn uid_chars(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_hexdigit() || *c == '-')
        .take(36)
        .collect()
}
