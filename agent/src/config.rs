//! The agent's configuration: plain data, built from the command line by [`crate::cli`].
//!
//! Runtime things (the metrics registry, the shutdown signal, the eBPF programs) are not here:
//! they are made by [`crate::server::run`] and passed to the parts that need them.

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
    /// Requests per second and burst for the whole node (the original's 1000/500), answered 429.
    pub global_rate: RateLimit,
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
    /// First and longest wait between retries of a renewal that failed transiently.
    pub retry_backoff: (Duration, Duration),
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
    /// Connect timeout for one attempt.
    pub connect_timeout: Duration,
    /// Timeout of one attempt.
    pub attempt_timeout: Duration,
    /// Deadline of a whole call, retries included: shorter than the SDKs' 1–2 s client timeouts.
    pub call_timeout: Duration,
    /// Attempts per call (first try included) for transient errors.
    pub max_attempts: u32,
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
    pub cgroup_root: Option<PathBuf>,
    /// Connections per second per pod cgroup, enforced in the kernel (rate 0 = off).
    pub pod_connect: RateLimit,
    /// Requests per second per pod, enforced by the agent (rate 0 = off).
    pub pod_request: RateLimit,
    pub token_binding: TokenBinding,
    /// This node's name, compared with the token's node claim.
    pub node_name: Option<String>,
    pub audit: Option<AuditSink>,
    /// When the audit log file is rotated, and how many rotated files are kept.
    pub audit_rotation: AuditRotation,
    /// Room in the audit queue; records beyond it are dropped and counted.
    pub audit_queue: usize,
    /// Most distinct namespaces labelled in per-namespace metrics; the rest count as `other`.
    pub namespace_label_limit: usize,
}

/// The `initialize` subcommand's settings.
#[derive(Debug, Clone)]
pub struct InitializeConfig {
    pub link_name: String,
    pub ipv4: std::net::Ipv4Addr,
    pub ipv6: std::net::Ipv6Addr,
}
