//! Storing verified entries: the cache's map, the identity index (the newest verified entry of
//! each pod, namespace and service account), exact removal, and the rotation alias served while
//! EKS Auth fails for a pod's new token.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use moka::ops::compute::{CompResult, Op};

use super::entry::Identity;
use super::{CredentialCache, Entry, Inner, Lookup, Served, lock};
use crate::credentials::{Issued, Retriever};
use crate::token::Claims;

impl<R: Retriever> Inner<R> {
    /// Stores a verified entry for `token` and starts its renewals.
    pub(super) async fn store(
        self: &Arc<Self>,
        token: Arc<str>,
        claims: Arc<Claims>,
        issued: Issued,
    ) -> Arc<Entry> {
        let entry = Arc::new(Entry::new(token.clone(), claims, Arc::new(issued), true));
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
    /// Token rotation during an EKS Auth failure: the newest verified entry of the pod, namespace
    /// and service account that `claims` name (`pod_uid` is the caller's pod, from the kernel),
    /// if its credentials are usable. It is stored under the new token too — an alias, renewed
    /// (and so verified) with the new token once EKS Auth answers — so the pod's next requests
    /// are hits. The caller decides when this applies.
    pub async fn serve_rotated(
        &self,
        token: &str,
        claims: Arc<Claims>,
        pod_uid: &str,
    ) -> Option<Served> {
        let inner = &self.inner;
        let entries = inner.entries.as_ref()?;
        // The pod the kernel saw must be the one the token names.
        if claims.pod_uid() != Some(pod_uid) {
            return None;
        }
        let identity = Identity::of_claims(&claims)?;
        let verified = lock(&inner.identities).get(&identity)?.upgrade()?;
        let issued = verified.issued();
        if verified.retired.load(Ordering::Relaxed) || !inner.usable(&issued) {
            return None;
        }
        // Not verified: it does not supersede anything until its own token renews it.
        let alias = Arc::new(Entry::new(Arc::from(token), claims, issued, false));
        let stored = entries
            .entry(alias.token.clone())
            .or_insert_with(std::future::ready(alias.clone()))
            .await;
        if stored.is_fresh() {
            inner.metrics.cache_entries.inc();
            inner.schedule_renewal(&alias, inner.backoff(0));
            tracing::warn!(
                pod_uid,
                namespace = alias.claims.namespace(),
                service_account = alias.claims.service_account(),
                "EKS Auth failed for a rotated token; serving the pod's cached credentials"
            );
        }
        let entry = stored.into_value();
        inner.states.hit.inc();
        Some(Served {
            issued: entry.issued(),
            lookup: Lookup::Hit,
            entry: Some(entry),
        })
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
