//! A cached token's entry ([`Entry`]): its claims, its current credentials, whether EKS Auth
//! verified it, and the handle of its renewal task; and whose credentials it holds
//! ([`Identity`]), so that a rotated token's newer entry supersedes the older one.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use super::{Identities, lock};
use crate::credentials::Issued;
use crate::proof::Proof;
use crate::token::Claims;

/// A cached token and its current credentials.
pub struct Entry {
    pub(super) token: Arc<str>,
    /// The token's claims, read once when it was first seen. Once the token is verified (EKS Auth
    /// accepted it, or its signature checked out), they are as good as verified.
    pub claims: Arc<Claims>,
    pub(super) issued: ArcSwap<Issued>,
    /// The cgroup of the last caller the kernel attributed (0: none), for the owner predicate.
    pub(super) owner_cgroup: AtomicU64,
    /// What verified this entry's own token ([`Proof`]'s bits: a signature, EKS Auth); none for a
    /// rotation alias served during an outage, until it renews.
    pub(super) proof: AtomicU8,
    /// Removed from the cache (evicted, invalidated or replaced): never renewed again.
    pub(super) retired: AtomicBool,
    /// A newer verified entry of the same pod, namespace and service account exists.
    pub(super) superseded: AtomicBool,
    pub(super) renewal: Mutex<Option<tokio::task::AbortHandle>>,
}

impl Entry {
    pub(super) fn new(
        token: Arc<str>,
        claims: Arc<Claims>,
        issued: Arc<Issued>,
        proof: Proof,
    ) -> Self {
        Entry {
            token,
            claims,
            issued: ArcSwap::new(issued),
            owner_cgroup: AtomicU64::new(0),
            proof: AtomicU8::new(proof.bits()),
            retired: AtomicBool::new(false),
            superseded: AtomicBool::new(false),
            renewal: Mutex::new(None),
        }
    }

    pub fn issued(&self) -> Arc<Issued> {
        self.issued.load_full()
    }

    /// Records the cgroup the entry was last served to.
    pub fn set_owner_cgroup(&self, cgroup_id: u64) {
        self.owner_cgroup.store(cgroup_id, Ordering::Relaxed);
    }

    pub fn owner_cgroup(&self) -> Option<u64> {
        match self.owner_cgroup.load(Ordering::Relaxed) {
            0 => None,
            id => Some(id),
        }
    }

    /// Whether this entry's own token is verified, by its signature or by EKS Auth (a rotation
    /// alias served during an outage is not, until it renews).
    pub fn is_verified(&self) -> bool {
        self.proof().token_verified()
    }

    /// What verified this entry's own token.
    pub fn proof(&self) -> Proof {
        Proof::from_bits_truncate(self.proof.load(Ordering::Relaxed))
    }

    /// Records that `proof` vouches for this entry's token too.
    pub(super) fn prove(&self, proof: Proof) {
        self.proof.fetch_or(proof.bits(), Ordering::Relaxed);
    }

    /// Whether a newer verified entry of the same pod has taken over its renewals.
    pub fn is_superseded(&self) -> bool {
        self.superseded.load(Ordering::Relaxed)
    }

    /// Still cached and not superseded: worth renewing.
    pub(super) fn renewable(&self) -> bool {
        !self.retired.load(Ordering::Relaxed) && !self.is_superseded()
    }

    pub(super) fn abort_renewal(&self) {
        if let Ok(mut renewal) = self.renewal.lock()
            && let Some(task) = renewal.take()
        {
            task.abort();
        }
    }

    /// Which of two tokens of a pod the kubelet issued later.
    pub(super) fn age_key(&self) -> (i64, i64) {
        (self.claims.iat.unwrap_or(i64::MIN), self.claims.exp)
    }
}

/// Evicted or dropped: its renewal task goes too.
impl Drop for Entry {
    fn drop(&mut self) {
        self.abort_renewal();
    }
}

/// Decides whether an entry is still worth renewing (policy, passed in by the caller).
pub type KeepPredicate = Arc<dyn Fn(&Entry) -> bool + Send + Sync>;

/// Whose credentials an entry holds: the pod its token names, and the namespace and service
/// account. Read from a verified entry's claims (EKS Auth accepted the token, or it verifies with
/// the cluster's keys, so they are genuine), shared rather than copied; compared and hashed by those three names.
#[derive(Debug, Clone)]
pub(super) struct Identity(Arc<Claims>);

impl Identity {
    /// The identity `claims` name, if they name a pod, a namespace and a service account.
    pub(super) fn of_claims(claims: &Arc<Claims>) -> Option<Identity> {
        let identity = Identity(claims.clone());
        identity.names()?;
        Some(identity)
    }

    pub(super) fn of(entry: &Entry) -> Option<Identity> {
        Identity::of_claims(&entry.claims)
    }

    /// Pod UID, namespace, service account.
    pub(super) fn names(&self) -> Option<(&str, &str, &str)> {
        Some((
            self.0.pod_uid()?,
            self.0.namespace()?,
            self.0.service_account()?,
        ))
    }
}

impl PartialEq for Identity {
    fn eq(&self, other: &Self) -> bool {
        self.names() == other.names()
    }
}

impl Eq for Identity {}

impl std::hash::Hash for Identity {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.names().hash(state);
    }
}

/// An evicted entry is no longer its identity's newest.
pub(super) fn forget_identity(identities: &Identities, entry: &Arc<Entry>) {
    let Some(identity) = Identity::of(entry) else {
        return;
    };
    let mut identities = lock(identities);
    if identities
        .get(&identity)
        .is_some_and(|newest| std::ptr::eq(newest.as_ptr(), Arc::as_ptr(entry)))
    {
        identities.remove(&identity);
    }
}
