//! `server`'s flags: the original agent's, with its defaults, then ours; and the
//! [`ServerConfig`] they describe.

use crate::backoff::Backoff;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Args, ValueEnum};

use super::parse::*;
use crate::config::{
    AttributionConfig, AuditFormat, AuditRotation, AuditSink, CacheConfig, KubernetesConfig,
    PodViewConfig, PodViewMode, RateLimit, ServerConfig, TokenBinding, UpstreamConfig,
};
use crate::kubernetes::taint::DEFAULT_STARTUP_TAINT;
use crate::validation::{self, ValidationConfig};

#[derive(Debug, Args)]
pub struct ServerArgs {
    /// The EKS cluster this node belongs to.
    #[arg(short = 'c', long)]
    pub cluster_name: String,
    /// Port of the credential endpoint.
    #[arg(short = 'p', long, default_value_t = 80)]
    pub port: u16,
    /// Port of /healthz and /readyz on localhost.
    #[arg(long, default_value_t = 2703)]
    pub probe_port: u16,
    /// Address of the metrics endpoint.
    #[arg(long, default_value = "0.0.0.0")]
    pub metrics_address: IpAddr,
    /// Port of /metrics (and the probes).
    #[arg(long, default_value_t = 2705)]
    pub metrics_port: u16,
    /// Addresses to serve credentials on (repeat the flag or separate with commas).
    #[arg(short = 'b', long, value_delimiter = ',', default_values = ["169.254.170.23", "[fd00:ec2::23]"], value_parser = parse_bind_host)]
    pub bind_hosts: Vec<IpAddr>,
    /// Longest time cached credentials are served before they are renewed (0 disables caching).
    #[arg(long, default_value = "3h", value_parser = parse_duration)]
    pub max_credential_retention_before_renewal: Duration,
    /// Most credentials cached (0 disables caching).
    #[arg(long, default_value_t = 2000)]
    pub max_cache_size: u64,
    /// Background renewals per second towards EKS Auth.
    #[arg(long, default_value_t = 3)]
    pub max_service_qps: u32,
    /// Re-read the agent's own shared credentials file so rotated keys are used without restart
    /// (`--rotate-credentials`, `--rotate-credentials true|false` or `--rotate-credentials=true`).
    #[arg(
        long,
        num_args = 0..=1,
        default_value = "false",
        default_missing_value = "true",
        value_parser = parse_bool,
        action = ArgAction::Set
    )]
    pub rotate_credentials: bool,
    /// EKS Auth endpoint URL instead of eks-auth.<region>.api.aws.
    #[arg(long)]
    pub endpoint: Option<String>,
    /// Connect timeout of one attempt to EKS Auth (the original's 500 ms).
    #[arg(long, default_value = "500ms", value_parser = parse_timeout)]
    pub eks_auth_connect_timeout: Duration,
    /// Timeout of one attempt to EKS Auth, connect included (the original's 1 s).
    #[arg(long, default_value = "1s", value_parser = parse_timeout)]
    pub eks_auth_attempt_timeout: Duration,
    /// Deadline of one call to EKS Auth, its (up to 3) attempts included. A pod's request waits
    /// 1.5 s at most; the call runs on and its answer is cached for the SDK's retry.
    #[arg(long, default_value = "3500ms", value_parser = parse_timeout)]
    pub eks_auth_call_timeout: Duration,

    /// cgroup v2 directory the eBPF programs attach to [default: the cgroup v2 mount root]; pods
    /// are recognised only in kubelet's hierarchy directly below it.
    #[arg(long)]
    pub cgroup_root: Option<PathBuf>,
    /// Kubelet's own --cgroup-root, if it sets one (e.g. /kubelet): pods are also recognised in
    /// kubelet's hierarchy below it (relative to --cgroup-root).
    #[arg(long, value_parser = parse_cgroup_subpath)]
    pub kubelet_cgroup_root: Option<PathBuf>,
    /// Most connections one pod may hold open at once; past it a new one is closed at once (0 =
    /// no cap).
    #[arg(long, default_value_t = 64)]
    pub pod_max_connections: u32,
    /// Pods this node runs at most (kubelet's --max-pods; EKS's default is 110): with
    /// --pod-max-connections it sizes the kernel's record maps, so that no caller can take the
    /// pods' share.
    #[arg(long, default_value_t = 110, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_pods: u32,
    /// Connections per second per pod, enforced in the kernel (0 = off).
    #[arg(long, default_value_t = 0)]
    pub pod_connect_rate: u32,
    /// Burst of connections per pod above the rate.
    #[arg(long, default_value_t = 50)]
    pub pod_connect_burst: u32,
    /// Credential requests per second per pod (0 = off); over it: 429 with Retry-After.
    #[arg(long, default_value_t = 0)]
    pub pod_request_rate: u32,
    /// Burst of requests per pod above the rate.
    #[arg(long, default_value_t = 20)]
    pub pod_request_burst: u32,
    /// Whether a token must come from the pod it names.
    #[arg(long, value_enum, default_value_t = BindingArg::Audit)]
    pub token_binding: BindingArg,
    /// This node's name, compared with the token's node claim.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// Audit log file, one JSON line per credential request ("-" for stdout).
    #[arg(long)]
    pub audit_log: Option<PathBuf>,
    /// The audit records' format: native (the agent's own JSON) or ocsf (one OCSF 1.5.0
    /// Authentication event per request, for SIEMs).
    #[arg(long, value_enum, default_value_t = AuditFormatArg::Native)]
    pub audit_format: AuditFormatArg,
    /// Rotate the audit log file once it reaches this size (bytes, or with a unit: 100Mi, 50MB,
    /// 10M); 0 never rotates.
    #[arg(long, default_value = "100Mi", value_parser = parse_size)]
    pub audit_log_max_size: u64,
    /// Rotated audit log files kept (audit.log.1 is the newest); older ones are removed.
    #[arg(long, default_value_t = 5)]
    pub audit_log_max_backups: u32,
    /// Credential requests per second for the whole node, as the original agent (0 = off).
    #[arg(long, default_value_t = 1000)]
    pub global_request_rate: u32,
    /// Burst of requests for the whole node above the rate.
    #[arg(long, default_value_t = 500)]
    pub global_request_burst: u32,

    /// Once serving, remove the taint --startup-taint-key (every effect) from this node
    /// (--node-name), so that pods are scheduled only once the agent can serve them. Needs the
    /// Kubernetes API (in-cluster service account, or KUBECONFIG): `get` and `patch` on nodes.
    #[arg(
        long,
        num_args = 0..=1,
        default_value = "false",
        default_missing_value = "true",
        value_parser = parse_bool,
        action = ArgAction::Set
    )]
    pub remove_startup_taint: bool,
    /// The startup taint's key, as the node registers with it.
    #[arg(long, default_value = DEFAULT_STARTUP_TAINT, value_parser = parse_taint_key)]
    pub startup_taint_key: String,
    /// Post a Warning Event on a pod whose credential request is refused or fails (no association,
    /// AccessDenied, token binding mismatch, throttling, expired token). Needs the Kubernetes API:
    /// `create` and `patch` on events.
    #[arg(
        long,
        num_args = 0..=1,
        default_value = "false",
        default_missing_value = "true",
        value_parser = parse_bool,
        action = ArgAction::Set
    )]
    pub pod_events: bool,
    /// Check new tokens' signatures with the cluster's signing keys (the API server's
    /// /openid/v1/jwks, Kubernetes 1.34+), so that a forged token is refused without a call to EKS
    /// Auth, and a pod's rotated token is served its cached credentials without one: auto
    /// (whenever the keys are at hand; otherwise EKS Auth alone checks, as with off), on (always;
    /// a token that cannot be checked is refused), off.
    #[arg(long, value_enum, default_value_t = ValidationArg::Auto)]
    pub token_validation: ValidationArg,
    /// Watch this node's pods (one watch, field selector spec.nodeName=--node-name) so that audit
    /// records name the pod, service account and container the kernel placed each caller in:
    /// auto (whenever a Kubernetes configuration is found and --node-name is set), on, off. Needs
    /// `get`, `list` and `watch` on pods.
    #[arg(long, value_enum, default_value_t = PodViewArg::Auto)]
    pub pod_view: PodViewArg,
    /// The audience a token must carry (another one only for a delegate behind --endpoint).
    #[arg(long, default_value = crate::token::AUDIENCE)]
    pub token_audience: String,
    /// Where the agent keeps state across restarts (the cluster's signing keys).
    #[arg(long, default_value = "/var/lib/eks-pod-identity-agent")]
    pub state_dir: PathBuf,
}

/// `--token-validation` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ValidationArg {
    Auto,
    On,
    Off,
}

/// `--pod-view` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PodViewArg {
    Auto,
    On,
    Off,
}

/// `--audit-format` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AuditFormatArg {
    Native,
    Ocsf,
}

/// `--token-binding` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BindingArg {
    Off,
    Audit,
    Enforce,
}

impl ServerArgs {
    /// The configuration these flags describe.
    pub fn into_config(self) -> ServerConfig {
        ServerConfig {
            cluster_name: self.cluster_name,
            port: self.port,
            probe_port: self.probe_port,
            metrics_address: self.metrics_address,
            metrics_port: self.metrics_port,
            bind_hosts: self.bind_hosts,
            cache: CacheConfig {
                max_entries: self.max_cache_size,
                max_retention: self.max_credential_retention_before_renewal,
                renewals_per_second: self.max_service_qps,
                ..CacheConfig::default()
            },
            upstream: UpstreamConfig {
                endpoint: self.endpoint,
                rotate_credentials: self.rotate_credentials,
                connect_timeout: self.eks_auth_connect_timeout,
                attempt_timeout: self.eks_auth_attempt_timeout,
                call_timeout: self.eks_auth_call_timeout,
                ..UpstreamConfig::default()
            },
            attribution: AttributionConfig {
                cgroup_root: self.cgroup_root,
                kubelet_cgroup_root: self.kubelet_cgroup_root,
                pod_max_connections: self.pod_max_connections,
                max_pods: self.max_pods,
                pod_connect: RateLimit {
                    per_second: self.pod_connect_rate,
                    burst: self.pod_connect_burst,
                },
                pod_request: RateLimit {
                    per_second: self.pod_request_rate,
                    burst: self.pod_request_burst,
                },
                token_binding: match self.token_binding {
                    BindingArg::Off => TokenBinding::Off,
                    BindingArg::Audit => TokenBinding::Audit,
                    BindingArg::Enforce => TokenBinding::Enforce,
                },
                node_name: self.node_name.filter(|n| !n.is_empty()),
                audit: self.audit_log.map(|p| {
                    if p.as_os_str() == "-" {
                        AuditSink::Stdout
                    } else {
                        AuditSink::File(p)
                    }
                }),
                audit_format: match self.audit_format {
                    AuditFormatArg::Native => AuditFormat::Native,
                    AuditFormatArg::Ocsf => AuditFormat::Ocsf,
                },
                audit_rotation: AuditRotation {
                    max_size: self.audit_log_max_size,
                    max_backups: self.audit_log_max_backups,
                },
                audit_queue: 4096,
                namespace_label_limit: 100,
            },
            global_rate: RateLimit {
                per_second: self.global_request_rate,
                burst: self.global_request_burst,
            },
            kubernetes: KubernetesConfig {
                startup_taint: self.remove_startup_taint.then_some(self.startup_taint_key),
                pod_events: self.pod_events,
                call_timeout: Duration::from_secs(10),
                retry_backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(30)),
                event_queue: 1024,
                pod_view: PodViewConfig {
                    mode: match self.pod_view {
                        PodViewArg::Auto => PodViewMode::Auto,
                        PodViewArg::On => PodViewMode::On,
                        PodViewArg::Off => PodViewMode::Off,
                    },
                    // Room for pods still terminating beside their replacements.
                    capacity: usize::try_from(self.max_pods)
                        .unwrap_or(usize::MAX)
                        .saturating_mul(4),
                    watch_timeout: Duration::from_secs(290),
                },
            },
            validation: ValidationConfig {
                mode: match self.token_validation {
                    ValidationArg::Auto => validation::Mode::Auto,
                    ValidationArg::On => validation::Mode::On,
                    ValidationArg::Off => validation::Mode::Off,
                },
                audience: self.token_audience,
                state_dir: self.state_dir,
                refresh: validation::RefreshPolicy::default(),
            },
            drain_timeout: Duration::from_secs(10),
        }
    }
}
