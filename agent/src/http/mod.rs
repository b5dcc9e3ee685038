//! The credential endpoint, `GET /v1/credentials`, step by step.
//!
//! The order matters: cheap refusals first (route, `Host`), then the caller's per-pod limit
//! *before* the node-wide one (a flooding pod spends its own allowance, and what is left of the
//! node's stays for its neighbours), then the token (its claims come from the cache entry on a
//! hit, so the hot path parses nothing), then the caller's binding, and only then credentials —
//! from the cache, or from one upstream call shared with concurrent requests for the same token.

pub mod error;
mod host;
pub mod observe;

use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, header};
use http_body_util::Full;

use crate::attribution::scope::Scope;
use crate::attribution::{Attribution, Binding, Caller, PodKey};
use crate::audit::{AuditEvent, AuditLog};
use crate::clock::Clock;
use crate::config::RateLimit;
use crate::credentials::admission::Share;
use crate::credentials::cache::{CredentialCache, Lookup, Served};
use crate::credentials::{Issued, Retriever};
use crate::kubernetes::events::EventRecorder;
use crate::kubernetes::pod_view::{PodInfo, PodView, ViewedPod};
use crate::limiter::Limiter;
use crate::metrics::{Metrics, NamespaceLabels};
use crate::proof::Proof;
use crate::token::{Claims, TokenError};
use crate::validation::{Validator, Verification};
use error::RefusalLog;
pub use error::RequestError;
pub use host::host_ip;

/// The path every SDK's container provider is given.
pub const CREDENTIALS_PATH: &str = "/v1/credentials";

/// At most one log line per kind of refusal this often (with a count of the lines left out).
const REFUSAL_LOG_PERIOD: std::time::Duration = std::time::Duration::from_secs(10);

/// What one request found out along the way, for metrics and the audit record.
#[derive(Default)]
struct Exchange {
    claims: Option<Arc<Claims>>,
    lookup: Option<Lookup>,
    binding: Option<Binding>,
    issued: Option<Arc<Issued>>,
    /// What vouched for the caller's identity.
    proof: Proof,
    /// The pod the kernel placed the caller in, as the pod view has it.
    pod: Option<Arc<PodInfo>>,
    /// The caller's container under its pod's list of containers.
    scope: Scope,
}

/// The credential endpoint and everything it consults.
pub struct Endpoint<R> {
    cache: CredentialCache<R>,
    hosts: Vec<IpAddr>,
    global_limit: Option<Limiter>,
    attribution: Arc<Attribution>,
    audit: Option<AuditLog>,
    metrics: Metrics,
    namespaces: Arc<NamespaceLabels>,
    clock: Clock,
    refusals: RefusalLog,
    /// Events on the pods whose requests are refused or fail (`--pod-events`).
    events: Option<EventRecorder>,
    /// Local validation of new tokens (the audience, and signatures with the cluster's keys).
    validator: Arc<Validator>,
    /// This node's pods, for the names of the pod the kernel placed each caller in
    /// (`--pod-view`).
    pod_view: Option<PodView>,
}

impl<R: Retriever> Endpoint<R> {
    /// `hosts` are the bind hosts: the only `Host` values accepted.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cache: CredentialCache<R>,
        hosts: Vec<IpAddr>,
        global_rate: RateLimit,
        attribution: Arc<Attribution>,
        audit: Option<AuditLog>,
        metrics: Metrics,
        namespaces: Arc<NamespaceLabels>,
        clock: Clock,
    ) -> Self {
        let global_limit = Limiter::new(global_rate);
        Endpoint {
            cache,
            hosts,
            global_limit,
            attribution,
            audit,
            metrics,
            namespaces,
            clock,
            refusals: RefusalLog::new(REFUSAL_LOG_PERIOD),
            events: None,
            validator: Validator::off(),
            pod_view: None,
        }
    }

    /// Validates new tokens with `validator` (by default only their audience is checked).
    #[must_use]
    pub fn with_validator(mut self, validator: Arc<Validator>) -> Self {
        self.validator = validator;
        self
    }

    /// Reports refused and failed requests to `events` (queued, never waited for).
    #[must_use]
    pub fn with_events(mut self, events: Option<EventRecorder>) -> Self {
        self.events = events;
        self
    }

    /// Names callers after the pods of `view` (audit records; a token naming another pod than
    /// the view's is counted).
    #[must_use]
    pub fn with_pod_view(mut self, view: Option<PodView>) -> Self {
        self.pod_view = view;
        self
    }

    /// Answers one request from `caller`, and counts and audits it.
    pub async fn handle<B>(&self, req: Request<B>, caller: &Caller) -> Response<Full<Bytes>> {
        let started = tokio::time::Instant::now();
        // The pod the kernel saw, as the API server names it: a pointer load and a hash lookup.
        let pod = self
            .pod_view
            .as_ref()
            .and_then(|view| view.get(caller.pod_uid()?));
        // Which of the pod's containers may have its credentials (the pod's annotation).
        let scope = Scope::of(pod.as_deref(), caller);
        let mut exchange = Exchange {
            pod,
            scope,
            ..Exchange::default()
        };
        let result = self.serve(&req, caller, &mut exchange).await;
        let response = match &result {
            Ok(body) => error::credentials(body.clone()),
            Err(e) => e.to_response(),
        };
        let elapsed = started.elapsed();
        let status_code = response.status();
        let (status, code) = (status_code.as_u16(), status_code.as_str());
        self.metrics.http_response.with_label_values(&[code]).inc();
        self.metrics.request_duration.observe(elapsed.as_secs_f64());
        if req.uri().path() == CREDENTIALS_PATH {
            // The namespace of the pod the kernel saw, as the API server has it; else what EKS
            // Auth verified. Never a token's claims: they would let anyone fill the label set.
            let namespace = match (&exchange.pod, exchange.issued.as_deref()) {
                (Some(pod), _) => &*pod.namespace,
                (None, Some(issued)) => issued.association.namespace.as_str(),
                (None, None) => "",
            };
            self.metrics
                .requests_by_namespace
                .with_label_values(&[&self.namespaces.label(namespace), code])
                .inc();
            if let Some(binding) = &exchange.binding {
                self.metrics
                    .binding
                    .with_label_values(&[binding.as_str()])
                    .inc();
            }
            // Refusals come in bursts: one line per kind per period, with what was left out.
            if let Err(e) = &result
                && let Some(suppressed) = self.refusals.sample(e.kind())
            {
                tracing::info!(peer = %caller.peer, status, reason = %e, suppressed, "credential request refused");
            }
            if let Some(recorder) = &self.events
                && let Some(observation) = observe::observation(
                    result.as_ref().map(drop),
                    exchange.binding.as_ref(),
                    exchange.claims.as_deref(),
                    caller,
                )
                .or_else(|| {
                    observe::scope_observation(result.as_ref().map(drop), &exchange.scope, caller)
                })
            {
                recorder.record(observation);
            }
            // Compared with the token, if one was read: an `Arc` and a comparison.
            let pod = exchange
                .pod
                .clone()
                .zip(caller.pod_uid())
                .map(|(pod, uid)| ViewedPod::new(pod, uid, exchange.claims.as_deref()));
            if pod.as_ref().is_some_and(|p| p.token_matches == Some(false)) {
                self.metrics.pod_view_token_mismatch.inc();
            }
            if exchange.scope != Scope::Unscoped {
                self.metrics
                    .container_scope
                    .with_label_values(&[exchange.scope.as_str()])
                    .inc();
            }
            if let Some(audit) = &self.audit {
                audit.record(self.audit_event(&result, status, elapsed, caller, exchange, pod));
            }
        }
        response
    }

    async fn serve<B>(
        &self,
        req: &Request<B>,
        caller: &Caller,
        ex: &mut Exchange,
    ) -> Result<Bytes, RequestError> {
        if req.uri().path() != CREDENTIALS_PATH {
            return Err(RequestError::NotFound);
        }
        if req.method() != Method::GET {
            return Err(RequestError::MethodNotAllowed);
        }
        if !self.host_allowed(req.headers().get(header::HOST)) {
            return Err(RequestError::ForbiddenHost);
        }
        // Keyed by the pod the kernel saw, not by the token: checked before anything is parsed.
        if let Err(retry_after) = self.attribution.check_pod_rate(caller) {
            self.metrics.pod_requests_limited.inc();
            return Err(RequestError::PodThrottled { retry_after });
        }
        if self
            .global_limit
            .as_ref()
            .is_some_and(|l| l.check().is_err())
        {
            return Err(RequestError::Throttled);
        }
        let token = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .filter(|t| !t.is_empty())
            .ok_or(TokenError::Missing)?;

        // A cached token's claims were read when it was first seen.
        let cached = self.cache.lookup(token).await;
        let claims = match cached.as_ref().and_then(|s| s.entry.as_ref()) {
            Some(entry) => entry.claims.clone(),
            None => Arc::new(Claims::parse(token)?),
        };
        ex.claims = Some(claims.clone());
        claims
            .check_for(self.clock.unix_now(), self.validator.audience())
            .inspect_err(|e| {
                if *e == TokenError::WrongAudience {
                    self.validator.count_audience_refusal();
                }
            })?;
        // A new token's signature, before its claims decide anything (binding, the queue). A
        // cached token was verified when it was first seen, by this or by EKS Auth.
        if cached.is_none()
            && self.validator.verify(token, &claims).await? == Verification::Signature
        {
            ex.proof |= Proof::SIGNATURE;
        }

        let binding = self.attribution.bind(&claims, caller);
        let refusal = self.attribution.refusal(&binding);
        if binding == Binding::Match {
            ex.proof |= Proof::KERNEL;
        }
        ex.binding = Some(binding.clone());
        if let Some(reason) = refusal {
            return Err(RequestError::Binding(reason));
        }
        if self.attribution.refuses(&ex.scope) {
            return Err(match &ex.scope {
                Scope::Pending => RequestError::ContainerPending,
                scope => RequestError::ContainerNotAllowed(
                    scope
                        .reason(ex.pod.as_ref().and_then(|p| p.allowed_containers.as_ref()))
                        .unwrap_or_default(),
                ),
            });
        }

        let served = match cached {
            Some(served) => served,
            None => self.fetch(token, &claims, caller, ex).await?,
        };
        // What verified the token the credentials were issued with: EKS Auth when it answered
        // this request or cached its answer, a signature when the entry was adopted.
        ex.proof |= served.entry.as_ref().map_or(Proof::EKS_AUTH, |e| e.proof());
        if let (Some(entry), Some(process)) = (&served.entry, &caller.process) {
            entry.set_owner_cgroup(process.cgroup_id);
        }
        if binding == Binding::Match {
            self.attribution
                .learn_verified_namespace(caller, &served.issued.association.namespace);
        }
        ex.lookup = Some(served.lookup);
        ex.issued = Some(served.issued.clone());
        Ok(served.issued.body.clone())
    }

    /// A token not cached: a rotated token of a cached pod, when its signature verifies or the
    /// kernel saw the connection come from the pod it names, is served the pod's cached
    /// credentials with no call; any other gets an upstream call (shared).
    async fn fetch(
        &self,
        token: &str,
        claims: &Arc<Claims>,
        caller: &Caller,
        ex: &Exchange,
    ) -> Result<Served, RequestError> {
        // The signature proves the claims; the kernel proves the caller is the pod they name.
        let rotation = if ex.proof.contains(Proof::SIGNATURE) {
            Some(Proof::SIGNATURE)
        } else {
            ex.proof.contains(Proof::KERNEL).then_some(Proof::empty())
        };
        if let Some(proof) = rotation
            && let Some(served) = self.cache.adopt_rotated(token, claims.clone(), proof).await
        {
            return Ok(served);
        }
        Ok(self
            .cache
            .fetch(token, claims.clone(), share(caller))
            .await?)
    }

    /// `Host` must name a bind host, with or without port and brackets.
    fn host_allowed(&self, host: Option<&HeaderValue>) -> bool {
        host.and_then(|h| h.to_str().ok())
            .and_then(host_ip)
            .is_some_and(|ip| self.hosts.contains(&ip))
    }

    /// The request's audit event: shared references and plain values, nothing formatted but the
    /// reason of a refusal (the writer thread formats the record).
    fn audit_event(
        &self,
        result: &Result<Bytes, RequestError>,
        status: u16,
        elapsed: std::time::Duration,
        caller: &Caller,
        ex: Exchange,
        pod: Option<ViewedPod>,
    ) -> AuditEvent {
        let (outcome, reason) = match result {
            Ok(_) => ("allowed", None),
            Err(e) => (e.outcome(), Some(e.to_string())),
        };
        AuditEvent {
            reason,
            lookup: ex.lookup,
            latency: elapsed,
            process: caller.process.clone(),
            cgroup: caller.cgroup.clone(),
            claims: ex.claims,
            binding: ex.binding.as_ref().map_or("off", Binding::as_str),
            proof: ex.proof,
            issued: ex.issued,
            pod,
            scope: ex.scope,
            ..AuditEvent::new(self.clock.now(), caller.peer, outcome, status)
        }
    }
}

/// Whose queue a cold fetch waits in: the pod the kernel saw, never the token's claim.
fn share(caller: &Caller) -> Share {
    match caller.pod_key() {
        PodKey::Pod(pod) => Share::Pod(pod),
        PodKey::Unplaced => Share::Unplaced,
    }
}

#[cfg(test)]
mod tests;
