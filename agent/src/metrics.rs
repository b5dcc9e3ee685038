//! Prometheus metrics. The original agent's names are kept exactly as its users scrape them
//! (no `_total` suffix on its counters); new metrics follow Prometheus naming.
//!
//! One [`Metrics`] is made per server and passed to the parts that count: nothing global.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};

use prometheus::{
    Encoder as _, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The label value for namespaces beyond the cardinality bound.
pub const OTHER_NAMESPACE: &str = "other";

/// Namespace label values, at most `limit` distinct ones; later namespaces count as `other`, so
/// a cluster with many namespaces cannot blow up the series count.
pub struct NamespaceLabels {
    seen: RwLock<HashSet<Arc<str>>>,
    limit: usize,
}

impl NamespaceLabels {
    pub fn new(limit: usize) -> Self {
        NamespaceLabels {
            seen: RwLock::new(HashSet::new()),
            limit,
        }
    }

    /// The label for `namespace` (`""` stays `""`: unknown).
    pub fn label(&self, namespace: &str) -> Arc<str> {
        if let Ok(seen) = self.seen.read()
            && let Some(known) = seen.get(namespace)
        {
            return known.clone();
        }
        let Ok(mut seen) = self.seen.write() else {
            return Arc::from(OTHER_NAMESPACE);
        };
        if seen.len() >= self.limit {
            return Arc::from(OTHER_NAMESPACE);
        }
        let label: Arc<str> = Arc::from(namespace);
        seen.insert(label.clone());
        label
    }
}

/// Every metric the agent exports. Cheap to clone (the metrics are shared handles).
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Responses of the credential endpoint by status code (original name).
    pub http_response: IntCounterVec,
    /// Cache outcomes: `hit`, `miss`, `coalesced`, `refresh`, `evicted` (original name).
    pub cache_state: IntCounterVec,
    /// Upstream errors by `type` (`fetch` for a pod's request, `refresh` for a renewal) and
    /// `code` (original name): EKS Auth's documented codes and the agent's own, any other
    /// counted as `UnknownError` ([`crate::credentials::UpstreamError::code_label`]).
    pub cache_errors: IntCounterVec,
    pub request_duration: Histogram,
    pub upstream_duration: HistogramVec,
    pub cache_entries: IntGauge,
    pub upstream_in_flight: IntGauge,
    /// The pace the admission path allows towards EKS Auth now (calls per second).
    pub upstream_rate: Gauge,
    /// Calls to EKS Auth waiting for their turn, by `type` (`fetch`, `refresh`).
    pub upstream_queued: IntGaugeVec,
    /// Requests answered 429 because their credentials could not be fetched before their
    /// deadline (queued behind EKS Auth's pace).
    pub upstream_deferred: IntCounter,
    /// Requests answered from the short-lived memory of tokens' permanent errors, with no
    /// upstream call.
    pub permanent_error_hits: IntCounter,
    pub ebpf_attached: IntGauge,
    /// 1 when the kernel enforces the per-pod connect limit (the kernel can run it), else 0.
    pub ebpf_connect_limiter: IntGauge,
    pub connections_denied: IntCounterVec,
    /// What the eBPF programs counted node-wide, by `event` (see `ebpf::KernelEvents::labelled`):
    /// refusals by reason, map-full failures, missing records, 4-tuple collisions.
    pub kernel_events: IntCounterVec,
    pub binding: IntCounterVec,
    pub requests_by_namespace: IntCounterVec,
    pub audit_dropped: IntCounter,
    /// Audit records lost because writing them failed (none of their bytes kept).
    pub audit_write_failed: IntCounter,
    pub pod_requests_limited: IntCounter,
    /// Connections closed at once because their pod held its maximum of open connections.
    pub pod_connections_refused: IntCounter,
    /// Always 1, labelled with the version and git commit of the binary.
    pub build_info: IntGaugeVec,
    /// Failed Kubernetes API calls by `operation` (see [`crate::kubernetes::Operation`]).
    pub kubernetes_api_errors: IntCounterVec,
    /// 1 once this node is without the startup taint (`key`), 0 until then; absent when
    /// `--remove-startup-taint` is off.
    pub startup_taint_removed: IntGaugeVec,
    /// Events on pods by `outcome`: `created`, `updated`, `queue_full`, `unnamed`, `abandoned`.
    pub pod_events: IntCounterVec,
    /// Local token validation by `result`: success, failure, skipped (upstream's name and labels).
    pub local_validation: IntCounterVec,
    /// Tokens refused by local checks, by `reason` ([`crate::validation::Reason`]).
    pub local_validation_failures: IntCounterVec,
    /// The cluster's signing keys in use for local validation.
    pub signing_keys: IntGauge,
    /// Fetches of the cluster's signing keys by `result`: ok, error.
    pub signing_key_fetches: IntCounterVec,
    /// Pods in the node-local pod view.
    pub pod_view_pods: IntGauge,
    /// 1 while the pod view follows the API server's (listed, and no error since), else 0.
    pub pod_view_synced: IntGauge,
    /// Failed lists and watches of the pod view by `reason`: forbidden, expired, unavailable.
    pub pod_view_errors: IntCounterVec,
    /// Pods left out of the view because it held its maximum.
    pub pod_view_left_out: IntCounter,
    /// Requests whose token names another pod, namespace or service account than the pod view
    /// has for the pod the kernel placed the caller in.
    pub pod_view_token_mismatch: IntCounter,
    /// Requests from pods that list their containers, by `result`: listed, unlisted, pending
    /// (see [`crate::attribution::scope::Scope`]).
    pub container_scope: IntCounterVec,
}

/// Why the registry could not be built (a programming error: names and labels are constants).
pub type MetricsError = prometheus::Error;

impl Metrics {
    pub fn new() -> Result<Self, MetricsError> {
        let registry = Registry::new();
        let counter_vec =
            |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, MetricsError> {
                let c = IntCounterVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(c.clone()))?;
                Ok(c)
            };
        let gauge = |name: &str, help: &str| -> Result<IntGauge, MetricsError> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        // From 50 µs (a cache hit) to 2 s (the SDKs' timeout).
        let latency_buckets = vec![
            0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
            0.5, 1.0, 2.0,
        ];
        let request_duration = Histogram::with_opts(
            HistogramOpts::new(
                "pod_identity_request_duration_seconds",
                "Time to answer a credential request, from the request's arrival to its response.",
            )
            .buckets(latency_buckets.clone()),
        )?;
        registry.register(Box::new(request_duration.clone()))?;
        let upstream_duration = HistogramVec::new(
            HistogramOpts::new(
                "pod_identity_upstream_duration_seconds",
                "Duration of AssumeRoleForPodIdentity calls to EKS Auth, retries included, by outcome.",
            )
            .buckets(latency_buckets),
            &["outcome"],
        )?;
        registry.register(Box::new(upstream_duration.clone()))?;
        let audit_dropped = IntCounter::new(
            "pod_identity_audit_dropped_total",
            "Audit records dropped because the audit queue was full.",
        )?;
        registry.register(Box::new(audit_dropped.clone()))?;
        let audit_write_failed = IntCounter::new(
            "pod_identity_audit_write_failed_total",
            "Audit records lost because writing them failed (full disk, I/O error, the file removed and not reopened); each record is written whole or not at all.",
        )?;
        registry.register(Box::new(audit_write_failed.clone()))?;
        let pod_requests_limited = IntCounter::new(
            "pod_identity_pod_requests_limited_total",
            "Credential requests refused with 429 by the per-pod request limit.",
        )?;
        registry.register(Box::new(pod_requests_limited.clone()))?;
        let pod_connections_refused = IntCounter::new(
            "pod_identity_pod_connections_refused_total",
            "Connections closed at once because their pod held --pod-max-connections open already.",
        )?;
        registry.register(Box::new(pod_connections_refused.clone()))?;
        let upstream_rate = Gauge::new(
            "pod_identity_upstream_rate",
            "Calls per second to EKS Auth the admission path allows now; adapts to EKS Auth's throttling.",
        )?;
        registry.register(Box::new(upstream_rate.clone()))?;
        let upstream_queued = IntGaugeVec::new(
            Opts::new(
                "pod_identity_upstream_queued",
                "Calls to EKS Auth waiting for their turn, by type: fetch (a pod's first request), refresh (a renewal).",
            ),
            &["type"],
        )?;
        registry.register(Box::new(upstream_queued.clone()))?;
        let upstream_deferred = IntCounter::new(
            "pod_identity_upstream_deferred_total",
            "Credential requests answered 429 with Retry-After because EKS Auth's pace could not fetch their credentials before their deadline.",
        )?;
        registry.register(Box::new(upstream_deferred.clone()))?;
        let permanent_error_hits = IntCounter::new(
            "pod_identity_permanent_error_hits_total",
            "Credential requests answered with a permanent EKS Auth error remembered for their token, without an upstream call.",
        )?;
        registry.register(Box::new(permanent_error_hits.clone()))?;
        let build_info = IntGaugeVec::new(
            Opts::new(
                "pod_identity_build_info",
                "Always 1: the agent's version and the git commit it was built from.",
            ),
            &["version", "commit"],
        )?;
        registry.register(Box::new(build_info.clone()))?;
        let startup_taint_removed = IntGaugeVec::new(
            Opts::new(
                "pod_identity_startup_taint_removed",
                "1 once this node is without the startup taint (removed by the agent, or absent), 0 until then; only with --remove-startup-taint.",
            ),
            &["key"],
        )?;
        registry.register(Box::new(startup_taint_removed.clone()))?;
        let pod_view_left_out = IntCounter::new(
            "pod_identity_pod_view_left_out_total",
            "Pods of this node left out of the pod view because it held its maximum (4 x --max-pods).",
        )?;
        registry.register(Box::new(pod_view_left_out.clone()))?;
        let pod_view_token_mismatch = IntCounter::new(
            "pod_identity_pod_view_token_mismatch_total",
            "Credential requests whose token names another namespace, service account, pod name or pod UID than the pod view has for the pod the kernel placed the caller in.",
        )?;
        registry.register(Box::new(pod_view_token_mismatch.clone()))?;
        build_info
            .with_label_values(&[crate::VERSION, crate::COMMIT])
            .set(1);
        Ok(Metrics {
            http_response: counter_vec(
                "pod_identity_http_response",
                "Responses of the credential endpoint by HTTP status code.",
                &["code"],
            )?,
            cache_state: counter_vec(
                "pod_identity_cache_state",
                "Credential cache outcomes: hit, miss, coalesced, refresh, evicted.",
                &["state"],
            )?,
            cache_errors: counter_vec(
                "pod_identity_cache_errors",
                "Errors from EKS Auth by type (fetch, refresh) and error code.",
                &["type", "code"],
            )?,
            request_duration,
            upstream_duration,
            cache_entries: gauge(
                "pod_identity_cache_entries",
                "Credentials currently cached.",
            )?,
            upstream_in_flight: gauge(
                "pod_identity_upstream_in_flight",
                "AssumeRoleForPodIdentity calls to EKS Auth under way.",
            )?,
            ebpf_attached: gauge(
                "pod_identity_ebpf_attached",
                "1 when the attribution eBPF programs are attached, else 0.",
            )?,
            ebpf_connect_limiter: gauge(
                "pod_identity_ebpf_connect_limiter",
                "1 when the per-pod connect limit is enforced in the kernel, else 0 (programs not attached, or a kernel without 64-bit compare-and-swap in BPF).",
            )?,
            connections_denied: counter_vec(
                "pod_identity_connections_denied_total",
                "Connections to the agent refused in the kernel (EPERM) by the per-pod connect rate or open-connection cap, by the pod's namespace (the pod view's, else as EKS Auth verified it for a request from the pod, else unknown).",
                &["namespace"],
            )?,
            kernel_events: counter_vec(
                "pod_identity_kernel_events_total",
                "Events the eBPF programs counted, node-wide: connects refused (open_cap_refused, rate_refused, open_state_full, cookie_record_failed), connections left unrecorded (conn_record_failed, record_missing, tuple_collision), and others.",
                &["event"],
            )?,
            binding: counter_vec(
                "pod_identity_binding_total",
                "Token binding results: match, mismatch, unattributed, off.",
                &["result"],
            )?,
            requests_by_namespace: counter_vec(
                "pod_identity_requests_total",
                "Credential requests by the namespace of the caller's pod (the pod view's, else as EKS Auth verified it; never the token's claims) and HTTP status code.",
                &["namespace", "code"],
            )?,
            audit_dropped,
            audit_write_failed,
            pod_requests_limited,
            pod_connections_refused,
            upstream_rate,
            upstream_queued,
            upstream_deferred,
            permanent_error_hits,
            kubernetes_api_errors: counter_vec(
                "pod_identity_kubernetes_api_errors_total",
                "Failed Kubernetes API calls by operation: client (no usable configuration), get_node, patch_node (conflicts included), create_event, patch_event.",
                &["operation"],
            )?,
            startup_taint_removed,
            pod_events: counter_vec(
                "pod_identity_pod_events_total",
                "Events on pods for refused or failed credential requests, by outcome: created, updated (the count of an Event raised), queue_full (dropped on the request path), unnamed (no verified name for the pod), abandoned (not sent after retries, or evicted).",
                &["outcome"],
            )?,
            local_validation: counter_vec(
                "pod_identity_local_validation",
                "Outcome of local token validation: success, failure, or skipped (no key to check with, or validation off).",
                &["result"],
            )?,
            local_validation_failures: counter_vec(
                "pod_identity_local_validation_failures_total",
                "Tokens refused by the agent's local checks, without a call to EKS Auth, by reason: header, no_kid, algorithm, signature, unknown_key, claims, audience, no_keys.",
                &["reason"],
            )?,
            signing_keys: gauge(
                "pod_identity_signing_keys",
                "The cluster's signing keys the agent validates tokens with (0: none, tokens go to EKS Auth unchecked in auto mode).",
            )?,
            signing_key_fetches: counter_vec(
                "pod_identity_signing_key_fetches_total",
                "Fetches of the cluster's signing keys from the Kubernetes API, by result: ok, error.",
                &["result"],
            )?,
            pod_view_pods: gauge(
                "pod_identity_pod_view_pods",
                "Pods of this node in the pod view (the names audit records give the callers the kernel places in pods).",
            )?,
            pod_view_synced: gauge(
                "pod_identity_pod_view_synced",
                "1 while the pod view follows the API server (listed, no error since); 0 before the first list and while the API server is away (the last view is kept).",
            )?,
            pod_view_errors: counter_vec(
                "pod_identity_pod_view_errors_total",
                "Failed lists and watches of this node's pods, by reason: forbidden (no RBAC for pods), expired (410 Gone: listed again), unavailable (any other failure, retried with backoff).",
                &["reason"],
            )?,
            container_scope: counter_vec(
                "pod_identity_container_scope_total",
                "Credential requests from pods that list the containers allowed their credentials (annotation eks-pod-identity-agent.amazonaws.com/containers), by result: listed, unlisted (refused under --token-binding enforce), pending (the container not in the pod's status yet; 503 under enforce).",
                &["result"],
            )?,
            pod_view_left_out,
            pod_view_token_mismatch,
            build_info,
            registry,
        })
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // Encoding into a Vec only fails for malformed metrics, which the constructor rules out.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_labels_are_bounded() {
        let labels = NamespaceLabels::new(2);
        assert_eq!(&*labels.label("a"), "a");
        assert_eq!(&*labels.label("b"), "b");
        assert_eq!(&*labels.label("c"), OTHER_NAMESPACE);
        assert_eq!(&*labels.label("a"), "a");
    }

    #[test]
    fn original_names_have_no_total_suffix() {
        let m = Metrics::new().unwrap();
        m.http_response.with_label_values(&["200"]).inc();
        m.cache_state.with_label_values(&["hit"]).inc();
        m.cache_errors
            .with_label_values(&["fetch", "ThrottlingException"])
            .inc();
        let text = String::from_utf8(m.render()).unwrap();
        assert!(
            text.contains("pod_identity_http_response{code=\"200\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("pod_identity_cache_state{state=\"hit\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "pod_identity_cache_errors{code=\"ThrottlingException\",type=\"fetch\"} 1\n"
            ),
            "{text}"
        );
        assert!(!text.contains("pod_identity_http_response_total"));
    }
}
