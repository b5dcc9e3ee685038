//! Renewal pacing: when an entry is due (retention limit or expiry minus a lead, spread by
//! jitter), the renewal loop that sleeps on weak references until then, `--max-service-qps` and
//! the admission path's renewal queue, and the backoff after transient failures.

use std::sync::{Arc, Weak};
use std::time::Duration;

use rand::Rng as _;

use super::{Entry, Inner, Kind};
use crate::credentials::admission::Class;
use crate::credentials::{ErrorClass, Issued, Retriever};
use crate::proof::Proof;

impl<R: Retriever> Inner<R> {
    /// When fresh credentials are due for renewal: the earlier of the retention limit and
    /// expiry minus a lead (capped at half their life), less a random share of the jitter.
    pub(super) fn renewal_delay(&self, issued: &Issued) -> Duration {
        let life = self.clock.until(issued.credentials.expiration);
        let lead = self.config.renew_before_expiry.min(life / 2);
        let due = self.config.max_retention.min(life - lead);
        let jitter = self.config.renewal_jitter.min(due / 4);
        let spread = rand::rng().random_range(Duration::ZERO..=jitter);
        due - spread
    }

    pub(super) fn schedule_renewal(self: &Arc<Self>, entry: &Arc<Entry>, first: Duration) {
        let task = tokio::spawn(renew(Arc::downgrade(self), Arc::downgrade(entry), first));
        if let Ok(mut renewal) = entry.renewal.lock() {
            *renewal = Some(task.abort_handle());
        }
    }
}

/// An entry's renewal loop. Holds only weak references while it sleeps, so that an evicted
/// entry or a dropped cache is not kept alive by it. Reads the entry itself, never through the
/// cache, so renewals do not count as use.
///
/// A renewal ([`renew_once`]) is boxed, allocated only once the entry is due, and within it what
/// is large — the SDK's call, several KiB of state, and the cache's removal — only once it runs:
/// otherwise every entry's task would carry all of it while it sleeps, and every renewal waiting
/// for its turn during an outage (all of them, at worst) the SDK's share. A sleeping task is the
/// timer and two weak references.
pub(super) async fn renew<R: Retriever>(
    inner: Weak<Inner<R>>,
    entry: Weak<Entry>,
    first: Duration,
) {
    let mut next = Next::After(first);
    let mut failures = 0;
    while let Next::After(delay) = next {
        tokio::time::sleep(delay).await;
        let (Some(inner), Some(entry)) = (inner.upgrade(), entry.upgrade()) else {
            return;
        };
        next = Box::pin(renew_once(&inner, &entry, &mut failures)).await;
    }
}

/// What a renewal loop does next.
pub(super) enum Next {
    /// Renew again after this long.
    After(Duration),
    /// Stop: the entry is gone, superseded or refused, or the cache is shutting down.
    Stop,
}

/// One renewal of `entry`, when it is due: paced by `--max-service-qps` and the admission path.
/// `failures`: transient failures in a row so far (for the backoff).
pub(super) async fn renew_once<R: Retriever>(
    inner: &Arc<Inner<R>>,
    entry: &Arc<Entry>,
    failures: &mut u32,
) -> Next {
    if !entry.renewable() {
        return Next::Stop;
    }
    let token_expired = inner.clock.unix_now() >= entry.claims.exp;
    let owner_gone = inner.keep.as_ref().is_some_and(|keep| !keep(entry));
    if token_expired || owner_gone {
        tracing::info!(
            namespace = entry.claims.namespace(),
            service_account = entry.claims.service_account(),
            reason = if token_expired {
                "token expired"
            } else {
                "owner gone"
            },
            "cached credentials no longer renewed"
        );
        Box::pin(inner.remove_exact(entry)).await;
        return Next::Stop;
    }
    inner.renewal_pace.lock().await.tick().await;
    let Ok(ticket) = inner.admission.enqueue(Class::Renewal) else {
        return Next::Stop;
    };
    let Some(permit) = ticket.admitted().await else {
        return Next::Stop;
    };
    // Evicted or superseded while it waited for its turn.
    if !entry.renewable() {
        inner.admission.refund(permit);
        return Next::Stop;
    }
    match Box::pin(inner.call_upstream(&entry.token, Kind::Refresh, permit)).await {
        Ok(issued) => {
            let delay = inner.renewal_delay(&issued);
            entry.issued.store(Arc::new(issued));
            entry.prove(Proof::EKS_AUTH);
            inner.states.refresh.inc();
            inner.register(entry);
            *failures = 0;
            Next::After(delay)
        }
        Err(e) if e.class() == ErrorClass::Permanent => {
            tracing::warn!(code = %e.code, message = %e.message, namespace = entry.claims.namespace(),
                "renewal refused permanently; evicting cached credentials");
            Box::pin(inner.remove_exact(entry)).await;
            Next::Stop
        }
        Err(e) => {
            *failures += 1;
            let delay = inner.config.retry_backoff.after(*failures);
            tracing::warn!(code = %e.code, message = %e.message, retry_in = ?delay,
                "renewal failed; keeping the cached credentials");
            Next::After(delay)
        }
    }
}
