//! Local validation of projected service-account tokens with the cluster's own signing keys, so
//! that a forged token is refused at the door: no call to EKS Auth, no place in its queue.
//!
//! - [`keys`]: a JSON Web Key Set parsed into verification keys by `kid` (RS256, ES256), and the
//!   signature check of one token.
//! - [`source`]: where key sets come from, the Kubernetes API server (the seam tests fake).
//! - [`store`]: the last key set on disk, for a restart while the API server is away.
//! - [`outcome`]: what a check found, why a token was refused, and the counters of both.
//!
//! This module owns the policy: when keys are fetched (at start, and again when a token names a
//! key the agent does not know, at most once per [`RefreshPolicy::min_interval`], doubling after
//! each failed fetch up to [`RefreshPolicy::max_interval`], every waiting request sharing one
//! fetch and waiting for it at most [`RefreshPolicy::wait`]), and what a
//! missing key means in each [`Mode`]. `auto` never makes the agent less available than without
//! validation: with no keys, or keys it cannot refresh while the API server is away, a token it
//! cannot check goes to EKS Auth as before.

pub mod keys;
pub mod outcome;
pub mod source;
pub mod store;

use crate::backoff::Backoff;
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwapOption;
use futures::FutureExt as _;
use futures::future::{BoxFuture, Shared};
use tokio::time::Instant;

use crate::metrics::Metrics;
use crate::token::Claims;
pub use keys::{KeySet, SignatureError, TokenHeader};
use outcome::Counters;
pub use outcome::{Reason, ValidationError, Verification};
pub use source::{ApiServer, KeySource, SourceError};
pub use store::KeyStore;

/// The settings, plain data in [`crate::config`] (which imports nothing of the crate).
pub use crate::config::{RefreshPolicy, ValidationConfig, ValidationMode as Mode};

/// Why validation could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("--token-validation on needs the Kubernetes API (in-cluster or KUBECONFIG)")]
    NoKubernetes(#[source] crate::kubernetes::ClientError),
}

/// A fetch of the key set, shared by every request that waits for it.
type Fetch = Shared<BoxFuture<'static, ()>>;

#[derive(Default)]
struct RefreshState {
    last_attempt: Option<Instant>,
    /// Fetches failed in a row since the last success.
    failures: u32,
    /// Whether the last fetch brought the key set now in use from the API server.
    fresh: bool,
    /// The fetch under way, and its task (done when the task is, even if nobody polled the
    /// shared future).
    in_flight: Option<(Fetch, tokio::task::AbortHandle)>,
}

/// Checks tokens against the cluster's keys. Cheap to share (`Arc`).
pub struct Validator {
    mode: Mode,
    audience: String,
    keys: ArcSwapOption<KeySet>,
    source: Option<Box<dyn KeySource>>,
    store: Option<KeyStore>,
    policy: RefreshPolicy,
    refresh: Mutex<RefreshState>,
    counters: Option<Counters>,
}

impl Validator {
    /// A validator that checks nothing but the default audience (tests, and the agent before
    /// local validation).
    pub fn off() -> Arc<Self> {
        Arc::new(Validator {
            mode: Mode::Off,
            audience: crate::token::AUDIENCE.to_owned(),
            keys: ArcSwapOption::empty(),
            source: None,
            store: None,
            policy: RefreshPolicy::default(),
            refresh: Mutex::new(RefreshState::default()),
            counters: None,
        })
    }

    /// A validator with keys from `source` (none: `auto` checks nothing), kept in `store`.
    pub fn new(
        config: &ValidationConfig,
        source: Option<Box<dyn KeySource>>,
        store: Option<KeyStore>,
        metrics: &Metrics,
    ) -> Arc<Self> {
        Arc::new(Validator {
            mode: config.mode,
            audience: config.audience.clone(),
            keys: ArcSwapOption::empty(),
            source,
            store,
            policy: config.refresh,
            refresh: Mutex::new(RefreshState::default()),
            counters: Some(Counters::new(metrics)),
        })
    }

    /// Sets up validation as configured: the Kubernetes client, the keys stored by an earlier
    /// run (so that a restart while the API server is away still validates), and a first fetch
    /// in the background. With `auto` and no Kubernetes configuration, checks nothing.
    pub async fn start(
        config: &ValidationConfig,
        kubernetes: &crate::config::KubernetesConfig,
        metrics: &Metrics,
    ) -> Result<Arc<Self>, StartError> {
        if config.mode == Mode::Off {
            return Ok(Validator::new(config, None, None, metrics));
        }
        let client = match crate::kubernetes::client(kubernetes).await {
            Ok(client) => client,
            Err(e) if config.mode == Mode::Auto => {
                tracing::info!(
                    reason = %crate::error_chain(&e),
                    "token validation: no Kubernetes API; tokens are checked by EKS Auth alone"
                );
                return Ok(Validator::new(config, None, None, metrics));
            }
            Err(e) => return Err(StartError::NoKubernetes(e)),
        };
        let store = KeyStore::new(&config.state_dir);
        let validator = Validator::new(
            config,
            Some(Box::new(ApiServer::new(client.api))),
            Some(store.clone()),
            metrics,
        );
        match tokio::task::spawn_blocking(move || store.load()).await {
            Ok(Ok(Some(json))) => match KeySet::parse(&json) {
                Ok(set) => {
                    tracing::info!(
                        keys = set.len(),
                        "token validation: keys of an earlier run loaded"
                    );
                    validator.install(set);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "token validation: the stored key set is not readable")
                }
            },
            Ok(Ok(None)) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %crate::error_chain(&e), "token validation: reading the stored key set")
            }
            Err(e) => tracing::warn!(error = %e, "token validation: reading the stored key set"),
        }
        // The first fetch runs on its own: the start-up never waits for the API.
        drop(validator.start_fetch());
        Ok(validator)
    }

    /// The audience tokens must carry.
    pub fn audience(&self) -> &str {
        &self.audience
    }

    /// Checks `token` (whose `claims` are already read and checked for time and audience).
    pub async fn verify(
        self: &Arc<Self>,
        token: &str,
        claims: &Claims,
    ) -> Result<Verification, ValidationError> {
        let result = self.check(token, claims).await;
        if let Some(c) = &self.counters {
            match &result {
                Ok(Verification::Signature) => c.success.inc(),
                Ok(Verification::Unchecked) => c.skipped.inc(),
                Err(e) => {
                    c.failure.inc();
                    c.reasons[e.reason() as usize].inc();
                }
            }
        }
        result
    }

    /// Counts a token refused for its audience: a local check too.
    pub fn count_audience_refusal(&self) {
        if let Some(c) = &self.counters {
            c.failure.inc();
            c.reasons[Reason::Audience as usize].inc();
        }
    }

    async fn check(
        self: &Arc<Self>,
        token: &str,
        claims: &Claims,
    ) -> Result<Verification, ValidationError> {
        if self.mode == Mode::Off {
            return Ok(Verification::Unchecked);
        }
        if self.keys.load().is_none() {
            self.refresh().await;
        }
        let Some(keys) = self.keys.load_full() else {
            return match self.mode {
                Mode::On => Err(ValidationError::NoKeys),
                _ => Ok(Verification::Unchecked),
            };
        };
        claims
            .check_kubernetes_claims()
            .map_err(ValidationError::Claims)?;
        let header = TokenHeader::parse(token)?;
        if let Some(verdict) = keys.verify(token, &header) {
            return verdict
                .map(|()| Verification::Signature)
                .map_err(Into::into);
        }
        // A key the agent does not know: the API server may have rotated its keys.
        let fresh = self.refresh().await;
        let keys = self.keys.load_full();
        match keys.as_deref().and_then(|k| k.verify(token, &header)) {
            Some(verdict) => verdict
                .map(|()| Verification::Signature)
                .map_err(Into::into),
            // The API server's own set does not have it: a forgery.
            None if fresh || self.mode == Mode::On => Err(ValidationError::UnknownKey),
            // The API server is away: EKS Auth decides, as without validation.
            None => Ok(Verification::Unchecked),
        }
    }

    /// Waits (at most [`RefreshPolicy::wait`]) for a fetch of the keys, starting one unless one
    /// ran within [`RefreshPolicy::min_interval`]. Whether the keys in use are the API server's
    /// latest.
    async fn refresh(self: &Arc<Self>) -> bool {
        if let Some(fetch) = self.start_fetch() {
            let _ = tokio::time::timeout(self.policy.wait, fetch).await;
        }
        self.state().fresh
    }

    fn state(&self) -> std::sync::MutexGuard<'_, RefreshState> {
        self.refresh.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The fetch under way, or a new one; `None` when there is no source or one ran too recently.
    fn start_fetch(self: &Arc<Self>) -> Option<Fetch> {
        self.source.as_ref()?;
        let mut state = self.state();
        if let Some((fetch, task)) = &state.in_flight
            && !task.is_finished()
        {
            return Some(fetch.clone());
        }
        // The usual interval, doubling after each failed fetch.
        let interval = Backoff::new(self.policy.min_interval, self.policy.max_interval)
            .after(state.failures + 1);
        if state.last_attempt.is_some_and(|at| at.elapsed() < interval) {
            return None;
        }
        state.last_attempt = Some(Instant::now());
        let task = tokio::spawn(self.clone().fetch());
        let abort = task.abort_handle();
        let fetch = async move {
            let _ = task.await;
        }
        .boxed()
        .shared();
        state.in_flight = Some((fetch.clone(), abort));
        Some(fetch)
    }

    /// Fetches the key set, installs it and stores it on disk.
    async fn fetch(self: Arc<Self>) {
        let Some(source) = &self.source else { return };
        let fetched = match tokio::time::timeout(self.policy.fetch_timeout, source.fetch()).await {
            Ok(Ok(json)) => KeySet::parse(&json)
                .map(|set| (json, set))
                .map_err(|e| e.to_string()),
            Ok(Err(e)) => Err(crate::error_chain(&e)),
            Err(_) => Err(SourceError::Timeout.to_string()),
        };
        let (json, set) = match fetched {
            Ok(fetched) => fetched,
            Err(error) => {
                let failures = {
                    let mut state = self.state();
                    state.fresh = false;
                    state.failures = state.failures.saturating_add(1);
                    state.failures
                };
                // Once per streak of failures (each one is counted, and retried ever more rarely).
                if failures == 1 {
                    tracing::warn!(%error, retry_in = ?self.policy.min_interval.saturating_mul(2),
                        "token validation: fetching the cluster's signing keys failed; retrying with backoff");
                } else {
                    tracing::debug!(%error, failures, "token validation: fetching the cluster's signing keys failed again");
                }
                if let Some(c) = &self.counters {
                    c.fetch_failed.inc();
                }
                return;
            }
        };
        tracing::info!(
            keys = set.len(),
            skipped = set.skipped,
            "token validation: the cluster's signing keys fetched"
        );
        if let Some(c) = &self.counters {
            c.fetched.inc();
        }
        self.install(set);
        {
            let mut state = self.state();
            state.fresh = true;
            state.failures = 0;
        }
        if let Some(store) = self.store.clone() {
            match tokio::task::spawn_blocking(move || store.save(&json)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %crate::error_chain(&e), "token validation: storing the key set")
                }
                Err(e) => tracing::warn!(error = %e, "token validation: storing the key set"),
            }
        }
    }

    fn install(&self, set: KeySet) {
        if let Some(c) = &self.counters {
            c.keys.set(i64::try_from(set.len()).unwrap_or(i64::MAX));
        }
        self.keys.store(Some(Arc::new(set)));
    }
}

#[cfg(test)]
mod tests;
