//! Storing verified entries: the cache's map, the identity index (the newest verified entry of
//! each pod, namespace and service account), exact removal, and the aliases a pod's rotated token
//! is served from: adopted at once when its signature verifies, or while EKS Auth fails for it.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use moka::ops::compute::{CompResult, Op};

use super::entry::Identity;
use super::{CredentialCache, Entry, Inner, Lookup, Served, lock};
use crate::credentials::{Issued, Retriever};
use crate::proof::Proof;
use crate::token::Claims;

impl<R: Retriever> Inner<R> {
    /// A request served from `entry`.
    fn hit(&self, entry: Arc<Entry>) -> Served {
        self.states.hit.inc();
        Served {
            issued: entry.issued(),
            lookup: Lookup::Hit,
            entry: Some(entry),
        }
    }

    /// Stores a verified entry for `token` and starts its renewals.
    pub(super) async fn store(
        self: &Arc<Self>,
        token: Arc<str>,
        claims: Arc<Claims>,
        issued: Issued,
    ) -> Arc<Entry> {
        let entry = Arc::new(Entry::new(
            token.clone(),
            claims,
            Arc::new(issued),
            Proof::EKS_AUTH,
        ));
        if let Some(entries) = &self.entries {
            let put = entry.clone();
            let stored = entries
                .entry(token)
                .and_compute_with(|_| std::future::ready(Op::Put(put)))
                .await;
            if matches!(stored, CompResult::Inserted(_)) {
                self.metrics.cache_entries.inc();
            }
            self.schedule_renewal(&entry, self.renewal_delay(&entry.issued()));
            self.register(&entry);
            // Moka applies its bound (and the recency of buffered reads) in housekeeping: run it
            // now, on the miss path, so the cache never holds more than its size.
            entries.run_pending_tasks().await;
        }
        entry
    }

    /// Records a verified entry as its identity's newest, superseding an older one; or marks it
    /// superseded when a newer token of the pod is verified already.
    pub(super) fn register(&self, entry: &Arc<Entry>) {
        let Some(identity) = Identity::of(entry) else {
            return;
        };
        let mut identities = lock(&self.identities);
        let current = identities.get(&identity).and_then(Weak::upgrade);
        match current {
            Some(current) if Arc::ptr_eq(&current, entry) => {}
            Some(current) if current.age_key() > entry.age_key() && current.renewable() => {
                entry.superseded.store(true, Ordering::Relaxed);
            }
            _ => {
                identities.insert(identity, Arc::downgrade(entry));
                drop(identities);
                if let Some(older) = current {
                    older.superseded.store(true, Ordering::Relaxed);
                    older.abort_renewal();
                    tracing::debug!(
                        namespace = entry.claims.namespace(),
                        service_account = entry.claims.service_account(),
                        "a newer token of the pod is verified: the older entry is no longer renewed"
                    );
                }
            }
        }
    }

    /// Removes `entry` if it is still the one cached for its token: never a fresher one stored
    /// since under the same key.
    pub(super) async fn remove_exact(&self, entry: &Arc<Entry>) {
        if let Some(entries) = &self.entries {
            entries
                .entry(entry.token.clone())
                .and_compute_with(|cached| {
                    std::future::ready(match cached {
                        Some(cached) if Arc::ptr_eq(cached.value(), entry) => Op::Remove,
                        _ => Op::Nop,
                    })
                })
                .await;
        }
    }
}

impl<R: Retriever> CredentialCache<R> {
    /// A rotated token of a cached pod: the newest verified entry of the pod, namespace and service
    /// account that `claims` name, if its credentials are usable, stored under the new token with
    /// no call to EKS Auth. The caller vouches for `claims`: `proof` is [`Proof::SIGNATURE`] when the
    /// token verified with the cluster's keys (the new entry is verified, supersedes the older one,
    /// and renews with the new token when due), or empty when only the kernel vouches (it saw the
    /// connection come from the pod the token names): the new entry then renews with its token when
    /// due, which EKS Auth verifies, and supersedes nothing until it has.
    pub async fn adopt_rotated(
        &self,
        token: &str,
        claims: Arc<Claims>,
        proof: Proof,
    ) -> Option<Served> {
        let (entry, fresh) = self.alias(token, claims, proof).await?;
        if fresh {
            let inner = &self.inner;
            if entry.is_verified() {
                inner.register(&entry);
            }
            inner.schedule_renewal(&entry, inner.renewal_delay(&entry.issued()));
            tracing::debug!(
                namespace = entry.claims.namespace(),
                service_account = entry.claims.service_account(),
                verified = entry.is_verified(),
                "a rotated token of a cached pod: served from the cache"
            );
        }
        Some(self.inner.hit(entry))
    }

    /// The entry for `token` holding the credentials of the newest verified entry of the identity
    /// `claims` name (usable ones only), made with `proof` unless one is cached under `token`
    /// already; and whether it was made now.
    async fn alias(
        &self,
        token: &str,
        claims: Arc<Claims>,
        proof: Proof,
    ) -> Option<(Arc<Entry>, bool)> {
        let inner = &self.inner;
        let entries = inner.entries.as_ref()?;
        let identity = Identity::of_claims(&claims)?;
        let verified = lock(&inner.identities).get(&identity)?.upgrade()?;
        let issued = verified.issued();
        if verified.retired.load(Ordering::Relaxed) || !inner.usable(&issued) {
            return None;
        }
        let alias = Arc::new(Entry::new(Arc::from(token), claims, issued, proof));
        let stored = entries
            .entry(alias.token.clone())
            .or_insert_with(std::future::ready(alias.clone()))
            .await;
        let fresh = stored.is_fresh();
        if fresh {
            inner.metrics.cache_entries.inc();
        }
        Some((stored.into_value(), fresh))
    }

    /// A verified entry with usable credentials that `matches`. Walks the cache (without
    /// touching recency): not for the request path.
    pub fn find(&self, matches: impl Fn(&Entry) -> bool) -> Option<Arc<Entry>> {
        let entries = self.inner.entries.as_ref()?;
        entries.iter().map(|(_, entry)| entry).find(|entry| {
            entry.is_verified() && matches(entry) && self.inner.usable(&entry.issued())
        })
    }
}
