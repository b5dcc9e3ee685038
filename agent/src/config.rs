//! The agent's configuration: plain data, built from the command line by [`crate::cli`].
//!
//! Runtime things (the metrics registry, the shutdown signal, the eBPF programs) are not here:
//! they are made by [`crate::server::run`] and passed to the parts that need them.

use crate::backoff::Backoff;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

/// The `server` subcommand's settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The EKS cluster the node belongs to (the `{clusterName}` of `AssumeRoleForPodIdentity`).
    pub cluster_name: String,
    /// Port of the credential endpoint on every bind host.
    pub port: u16,
    /// Port of `/healthz` and `/readyz` on localhost.
    pub probe_port: u16,
    /// Address and port of `/metrics` (and the probes again).
    pub metrics_address: IpAddr,
    pub metrics_port: u16,
    /// Addresses the credential endpoint listens on; also the only `Host` values it accepts.
    pub bind_hosts: Vec<IpAddr>,
    pub cache: CacheConfig,
    pub upstream: UpstreamConfig,
    pub attribution: AttributionConfig,
    /// The Kubernetes API features (startup taint, Events on pods); both off by default.
    pub kubernetes: KubernetesConfig,
    /// Requests per second and burst for the whole node (the original's 1000/500), answered 429.
    pub global_rate: RateLimit,
    /// Local validation of tokens with the cluster's signing keys.
    pub validation: ValidationConfig,
    /// How long in-flight requests may take to finish after SIGTERM.
    pub drain_timeout: Duration,
}

/// A token-bucket limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Sustained rate per second; 0 turns the limit off.
    pub per_second: u32,
    pub burst: u32,
}

/// How credentials are cached and renewed.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// Most entries kept (least recently used evicted first); 0 disables caching.
    pub max_entries: u64,
    /// Longest time an entry is served before it is renewed; zero disables caching.
    pub max_retention: Duration,
    /// Renew this long before expiry, so that no SDK sees credentials it would refresh at once
    /// (Java refreshes up to 60 minutes ahead). Capped at half the credentials' lifetime.
    pub renew_before_expiry: Duration,
    /// Never hand out credentials with less life left than this.
    pub min_remaining: Duration,
    /// Background renewals per second towards EKS Auth.
    pub renewals_per_second: u32,
    /// Renewals are spread over up to this much time earlier than due, so that entries cached
    /// together are not renewed together.
    pub renewal_jitter: Duration,
    /// The wait between retries of a renewal that failed transiently.
    pub retry_backoff: Backoff,
    /// How calls to EKS Auth are paced, and how long a pod's first request waits for one.
    pub admission: AdmissionConfig,
}

/// The admission path to EKS Auth: calls paced to what EKS Auth accepts (the rate adapts to its
/// throttling), pods' first requests before renewals, and how long a request waits for its turn.
#[derive(Debug, Clone)]
pub struct AdmissionConfig {
    /// Calls per second at start, and again after a quiet spell without throttling.
    pub initial_rate: f64,
    /// The rate never falls below this, however much EKS Auth throttles.
    pub min_rate: f64,
    /// Nor rises above this (no more than the node-wide request limit could ever need).
    pub max_rate: f64,
    /// Calls that may go at once after an idle spell (never more than a second's worth).
    pub burst: f64,
    /// Once EKS Auth has throttled, how much the rate grows each second while calls queue.
    pub increase_per_second: f64,
    /// What a `ThrottlingException` multiplies the rate by.
    pub decrease_factor: f64,
    /// After this long without throttling, the rate starts afresh (EKS Auth's limit is shared
    /// with the cluster's other nodes, so what it accepts moves).
    pub quiet_reset: Duration,
    /// Most first fetches queued in all; past it a request is refused at once, unless it is the
    /// first of its pod's queue (so a pod's first request always gets a place).
    pub max_queued: usize,
    /// Most first fetches queued for one pod (by the pod the kernel saw): one pod's flood of
    /// distinct tokens fills its own queue, nobody else's.
    pub max_queued_per_pod: usize,
    /// Most first fetches queued for the callers the kernel could not place, together (with
    /// attribution off, every caller).
    pub max_queued_unplaced: usize,
    /// How long a request waits for credentials that are being fetched: less than the SDKs' 2 s
    /// client timeout, so that they get an answer rather than time out.
    pub wait_deadline: Duration,
    /// The fixed pause before the next attempt of the SDKs that ignore `Retry-After` (botocore,
    /// JS: 1 s): a request that cannot be served in time is answered so that the SDK's retry
    /// arrives when its credentials are expected.
    pub sdk_retry_delay: Duration,
    /// How often a throttled first fetch goes back to the head of the queue before the
    /// throttling is reported.
    pub throttle_retries: u32,
    /// How long a token's permanent error (invalid, expired, denied, no association) is
    /// remembered, so that an SDK retrying it costs one upstream call; and for how many tokens.
    pub permanent_error_ttl: Duration,
    pub permanent_error_entries: u64,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        AdmissionConfig {
            initial_rate: 20.0,
            min_rate: 2.0,
            max_rate: 1000.0,
            burst: 20.0,
            increase_per_second: 5.0,
            decrease_factor: 0.7,
            quiet_reset: Duration::from_secs(30),
            max_queued: 5000,
            max_queued_per_pod: 64,
            max_queued_unplaced: 2500,
            wait_deadline: Duration::from_millis(1500),
            sdk_retry_delay: Duration::from_secs(1),
            throttle_retries: 5,
            permanent_error_ttl: Duration::from_secs(15),
            permanent_error_entries: 4096,
        }
    }
}

/// The agent's defaults: `--max-cache-size 2000`, `--max-credential-retention-before-renewal 3h`,
/// `--max-service-qps 3`, and the fixed renewal schedule.
impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            max_entries: 2000,
            max_retention: Duration::from_secs(3 * 3600),
            renew_before_expiry: Duration::from_secs(70 * 60),
            min_remaining: Duration::from_secs(15),
            renewals_per_second: 3,
            renewal_jitter: Duration::from_secs(5 * 60),
            retry_backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(60)),
            admission: AdmissionConfig::default(),
        }
    }
}

impl CacheConfig {
    /// Whether the configuration asks for a cache at all (`--max-cache-size 0` or a zero
    /// retention turn it off, as in the original agent).
    pub fn enabled(&self) -> bool {
        self.max_entries > 0 && !self.max_retention.is_zero()
    }
}

/// How the agent talks to EKS Auth.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// A custom endpoint URL (plain http allowed) instead of `eks-auth.<region>.api.aws`.
    pub endpoint: Option<String>,
    /// Re-read the agent's own shared credentials file, so rotated keys are used without restart.
    pub rotate_credentials: bool,
    /// Connect timeout for one attempt (`--eks-auth-connect-timeout`).
    pub connect_timeout: Duration,
    /// Timeout of one attempt (`--eks-auth-attempt-timeout`).
    pub attempt_timeout: Duration,
    /// Deadline of a whole call, retries included (`--eks-auth-call-timeout`). A pod's request
    /// does not wait for all of it: it waits `AdmissionConfig::wait_deadline` at most, and the
    /// call runs on, so that the SDK's retry finds the credentials cached.
    pub call_timeout: Duration,
    /// Attempts per call (first try included) for transient errors.
    pub max_attempts: u32,
}

/// The original agent's budgets (`internal/cloud/eksauth/service.go`: a 500 ms dial timeout, a
/// 1 s `http.Client` timeout per attempt, the Go SDK's 3 attempts), so that a region where EKS
/// Auth answers in 600–900 ms is served as the original serves it; the whole call is bounded
/// by 3.5 s (three attempts and the short backoffs between them), where the original's is
/// bounded only by its retryer's backoff.
impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            endpoint: None,
            rotate_credentials: false,
            connect_timeout: Duration::from_millis(500),
            attempt_timeout: Duration::from_secs(1),
            call_timeout: Duration::from_millis(3500),
            max_attempts: 3,
        }
    }
}

/// Token binding: whether a token must come from the pod it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TokenBinding {
    /// No check.
    Off,
    /// Check and record, never refuse.
    #[default]
    Audit,
    /// Refuse (403) a token presented from another pod or from outside any pod.
    Enforce,
}

/// Where the audit log goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditSink {
    Stdout,
    File(PathBuf),
}

/// How each audit record is written: one JSON line either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AuditFormat {
    /// The agent's own record (`docs/audit-log.md`, "The native format").
    #[default]
    Native,
    /// One OCSF Authentication event (class 3002) per request, for SIEMs.
    Ocsf,
}

/// Size-based rotation of the audit log file, so that it can never fill the node's disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditRotation {
    /// Rotate once the file would grow past this many bytes; 0 turns rotation off.
    pub max_size: u64,
    /// Rotated files kept (`audit.log.1` … `audit.log.N`, newest first); older ones are removed.
    pub max_backups: u32,
}

/// Kernel attribution settings.
#[derive(Debug, Clone)]
pub struct AttributionConfig {
    /// The cgroup v2 directory the eBPF programs attach to; `None`: the cgroup v2 mount root.
    /// Pods are recognised only in kubelet's hierarchy directly below it.
    pub cgroup_root: Option<PathBuf>,
    /// Kubelet's own `--cgroup-root`, relative to `cgroup_root`, when kubelet uses one: pods are
    /// also recognised in the hierarchy below it.
    pub kubelet_cgroup_root: Option<PathBuf>,
    /// Most connections one pod holds open to a listener at once (0: no cap).
    pub pod_max_connections: u32,
    /// Pods the node runs at most: sizes the kernel's record maps with the per-pod cap.
    pub max_pods: u32,
    /// Connections per second per pod cgroup, enforced in the kernel (rate 0 = off).
    pub pod_connect: RateLimit,
    /// Requests per second per pod, enforced by the agent (rate 0 = off).
    pub pod_request: RateLimit,
    pub token_binding: TokenBinding,
    /// This node's name, compared with the token's node claim.
    pub node_name: Option<String>,
    pub audit: Option<AuditSink>,
    /// The records' format.
    pub audit_format: AuditFormat,
    /// When the audit log file is rotated, and how many rotated files are kept.
    pub audit_rotation: AuditRotation,
    /// Room in the audit queue; records beyond it are dropped and counted.
    pub audit_queue: usize,
    /// Most distinct namespaces labelled in per-namespace metrics; the rest count as `other`.
    pub namespace_label_limit: usize,
}

/// `--pod-view`: whether the agent watches this node's pods for their names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PodViewMode {
    /// Never.
    Off,
    /// Whenever a Kubernetes configuration is found and the node's name is known; quietly not
    /// otherwise.
    #[default]
    Auto,
    /// Always; a missing configuration or node name is an error in the log (the agent serves on).
    On,
}

/// The node-local pod view: which pods, how many at most, and how long each watch call lasts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodViewConfig {
    pub mode: PodViewMode,
    /// Most pods kept: the node's `--max-pods` with room for pods still terminating and for pods
    /// that completed (a pod past the bound is left out, and counted).
    pub capacity: usize,
    /// `timeoutSeconds` of each watch call (the API server ends the watch then, and the watcher
    /// resumes it from the last version seen). The view's client reads for longer than this.
    pub watch_timeout: Duration,
}

/// What the agent asks of the Kubernetes API. With every feature off no client is created and
/// nothing here is used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubernetesConfig {
    /// The key of the startup taint to remove from this node once the agent is ready (every effect
    /// of it; other taints are kept); `None`: leave the node's taints alone.
    pub startup_taint: Option<String>,
    /// Post Events on pods whose credential requests are refused or fail.
    pub pod_events: bool,
    /// Deadline of one API call.
    pub call_timeout: Duration,
    /// The wait between attempts when the API fails (the startup taint, and Events that could
    /// not be sent).
    pub retry_backoff: Backoff,
    /// Room in the queue between the request path and the Events task; beyond it observations
    /// are dropped and counted.
    pub event_queue: usize,
    /// The pods of this node, for the names of the callers the kernel places in them.
    pub pod_view: PodViewConfig,
}

impl KubernetesConfig {
    /// Whether any feature may need the Kubernetes API (the pod view's `auto` only if a
    /// configuration is found).
    pub fn enabled(&self) -> bool {
        self.startup_taint.is_some() || self.pod_events || self.pod_view.mode != PodViewMode::Off
    }

    /// Whether a missing Kubernetes configuration is an error: a feature asked for by name needs
    /// it (`auto` goes without).
    pub fn required(&self) -> bool {
        self.startup_taint.is_some() || self.pod_events || self.pod_view.mode == PodViewMode::On
    }
}

/// The `initialize` subcommand's settings.
#[derive(Debug, Clone)]
pub struct InitializeConfig {
    pub link_name: String,
    pub ipv4: std::net::Ipv4Addr,
    pub ipv6: std::net::Ipv6Addr,
}

/// `--token-validation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValidationMode {
    /// Never check signatures: EKS Auth does (the agent before local validation).
    Off,
    /// Check signatures whenever the cluster's keys are at hand; otherwise as `off`.
    Auto,
    /// Always check: a token that cannot be checked is refused.
    On,
}

/// How local validation is set up (plain data, from the command line).
#[derive(Debug, Clone)]
pub struct ValidationConfig {
    pub mode: ValidationMode,
    /// The audience a token must carry (`--token-audience`).
    pub audience: String,
    /// Where the last key set is kept across restarts (`--state-dir`).
    pub state_dir: PathBuf,
    pub refresh: RefreshPolicy,
}

/// When keys are fetched again.
#[derive(Debug, Clone, Copy)]
pub struct RefreshPolicy {
    /// At most one fetch this often, however many unknown keys are presented.
    pub min_interval: Duration,
    /// After failed fetches in a row, the interval doubles up to this (an API server older than
    /// 1.34, or away for long, is asked this rarely; one success resets it).
    pub max_interval: Duration,
    /// The longest a request waits for a fetch (it goes on after that, for later requests).
    pub wait: Duration,
    /// The longest one fetch may take.
    pub fetch_timeout: Duration,
}

impl Default for RefreshPolicy {
    fn default() -> Self {
        RefreshPolicy {
            min_interval: Duration::from_secs(10),
            max_interval: Duration::from_secs(600),
            wait: Duration::from_secs(1),
            fetch_timeout: Duration::from_secs(10),
        }
    }
}
