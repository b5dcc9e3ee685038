//! The command line: the original agent's subcommands and flags, with their defaults, plus the
//! attribution flags. Parsing ends in plain [`crate::config`] values.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};

use crate::config::{
    AttributionConfig, AuditRotation, AuditSink, CacheConfig, InitializeConfig, KubernetesConfig,
    RateLimit, ServerConfig, TokenBinding, UpstreamConfig,
};
use crate::kubernetes::taint::DEFAULT_STARTUP_TAINT;
use crate::validation::{self, ValidationConfig};

/// The agent's address on IPv4, as in every pod's `AWS_CONTAINER_CREDENTIALS_FULL_URI`.
pub const AGENT_IPV4: Ipv4Addr = Ipv4Addr::new(169, 254, 170, 23);
/// The agent's address on IPv6 clusters.
pub const AGENT_IPV6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x23);

#[derive(Debug, Parser)]
#[command(
    name = "eks-pod-identity-agent",
    version,
    about = "Hands AWS credentials to Kubernetes pods, and knows which pod and process asked."
)]
pub struct Cli {
    /// Log level, before or after the subcommand: error, warn, info, debug, trace (also the
    /// original's panic, fatal and warning), or 0 error … 4 trace.
    #[arg(short = 'v', long, global = true, default_value = "info", value_parser = parse_verbosity)]
    pub verbosity: tracing::Level,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Put the agent's addresses on link pod-id-link0, with routes (idempotent).
    Initialize(InitializeArgs),
    /// Serve credentials to pods.
    Server(Box<ServerArgs>),
    /// Print the version and the git commit it was built from.
    Version,
    /// Questions the audit log answers.
    #[command(subcommand)]
    Audit(AuditCommand),
}

/// `audit …` subcommands.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Which pods and processes received an access key (CloudTrail's userIdentity.accessKeyId),
    /// and when: reads the audit log and its rotated files.
    Who(AuditWhoArgs),
}

#[derive(Debug, Args)]
pub struct AuditWhoArgs {
    /// The access key id to look for (ASIA…).
    #[arg(long)]
    pub access_key_id: String,
    /// The audit log; its rotated files (PATH.1, PATH.2, …) are read too.
    #[arg(long, default_value = "/var/log/eks-pod-identity-agent/audit.log")]
    pub audit_log: PathBuf,
    /// Print JSON lines instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct InitializeArgs {}

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
    /// Auth: auto (whenever the keys are at hand; otherwise EKS Auth alone checks, as with off),
    /// on (always; a token that cannot be checked is refused), off.
    #[arg(long, value_enum, default_value_t = ValidationArg::Auto)]
    pub token_validation: ValidationArg,
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
                retry_backoff: (Duration::from_secs(1), Duration::from_secs(30)),
                event_queue: 1024,
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

impl InitializeArgs {
    /// The configuration of `initialize`: the original's link name and addresses.
    pub fn into_config(self) -> InitializeConfig {
        InitializeConfig {
            link_name: "pod-id-link0".to_owned(),
            ipv4: AGENT_IPV4,
            ipv6: AGENT_IPV6,
        }
    }
}

/// `169.254.170.23`, `fd00:ec2::23` or `[fd00:ec2::23]`.
pub fn parse_bind_host(s: &str) -> Result<IpAddr, String> {
    let bare = s
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .unwrap_or(s);
    bare.parse()
        .map_err(|_| format!("{s:?} is not an IP address (IPv6 may be in brackets)"))
}

/// A cgroup path below another, as kubelet's `--cgroup-root` is written (`/kubelet`, `/a/b`,
/// `/kubelet.slice`): no `.` or `..`, not empty, not the root itself.
pub fn parse_cgroup_subpath(s: &str) -> Result<PathBuf, String> {
    use std::path::Component;
    let path = PathBuf::from(s);
    let mut names = 0;
    for c in path.components() {
        match c {
            Component::RootDir => {}
            Component::Normal(_) => names += 1,
            _ => return Err(format!("{s:?}: a cgroup path without . or ..")),
        }
    }
    if names == 0 {
        return Err(format!(
            "{s:?}: name a cgroup below the root, as kubelet's --cgroup-root (e.g. /kubelet)"
        ));
    }
    Ok(path)
}

/// Go-style durations as the original takes them: `3h`, `90m`, `1h30m`, `45s`, `0`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(s).map_err(|e| format!("{s:?} is not a duration like 3h or 90m: {e}"))
}

/// A timeout: a duration as [`parse_duration`] reads it (`500ms`, `1s`, `3s500ms`), never zero.
pub fn parse_timeout(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d.is_zero() => Err(format!("{s:?}: a timeout must be longer than 0")),
        d => Ok(d),
    }
}

/// A size in bytes, bare or with a unit: `K`/`M`/`G` (powers of 1000, also `KB`, `MB`, `GB`)
/// or `Ki`/`Mi`/`Gi` (powers of 1024, also `KiB`, `MiB`, `GiB`).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let digits = s
        .trim()
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(s.trim().len());
    let (number, unit) = s.trim().split_at(digits);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 100Mi, 50MB or 1048576"))?;
    let factor: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "m" | "mb" => 1_000_000,
        "g" | "gb" => 1_000_000_000,
        "ki" | "kib" => 1 << 10,
        "mi" | "mib" => 1 << 20,
        "gi" | "gib" => 1 << 30,
        _ => {
            return Err(format!(
                "{s:?} has an unknown unit {unit:?} (use K, M, G, Ki, Mi or Gi)"
            ));
        }
    };
    number
        .checked_mul(factor)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// A taint key as Kubernetes takes it (a qualified name): an optional DNS subdomain prefix and `/`,
/// then a name of at most 63 characters, alphanumerics with `-`, `_` or `.` inside.
pub fn parse_taint_key(s: &str) -> Result<String, String> {
    let (prefix, name) = match s.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, s),
    };
    let name_ok = !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                    && label.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                    && label
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            })
    });
    if name_ok && prefix_ok {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "{s:?} is not a taint key (an optional DNS prefix and /, then a name like agent-not-ready)"
        ))
    }
}

/// A boolean as the original's flag library (Go's `strconv.ParseBool`) takes it.
pub fn parse_bool(s: &str) -> Result<bool, String> {
    match s {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => Err(format!("{s:?} is not a boolean (true or false)")),
    }
}

/// A level name (ours, and the original's logrus names: panic and fatal log errors), or the
/// numbers 0 error, 1 warn, 2 info, 3 debug, 4 and up trace.
pub fn parse_verbosity(s: &str) -> Result<tracing::Level, String> {
    use tracing::Level;
    match s.to_ascii_lowercase().as_str() {
        "0" | "error" | "fatal" | "panic" => Ok(Level::ERROR),
        "1" | "warn" | "warning" => Ok(Level::WARN),
        "2" | "info" => Ok(Level::INFO),
        "3" | "debug" => Ok(Level::DEBUG),
        "trace" => Ok(Level::TRACE),
        n if n.parse::<u8>().is_ok_and(|n| n >= 4) => Ok(Level::TRACE),
        _ => Err(format!(
            "{s:?} is not a level (panic, fatal, error, warn, warning, info, debug, trace, or 0-4)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(args: &[&str]) -> Result<ServerConfig, clap::Error> {
        let argv = ["eks-pod-identity-agent", "server"].iter().chain(args);
        match Cli::try_parse_from(argv)?.command {
            Command::Server(args) => Ok(args.into_config()),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn defaults_match_the_original_agent() {
        let c = server(&["-c", "prod"]).unwrap();
        assert_eq!(c.cluster_name, "prod");
        assert_eq!(c.port, 80);
        assert_eq!(c.probe_port, 2703);
        assert_eq!(c.metrics_port, 2705);
        assert_eq!(c.metrics_address, IpAddr::from([0, 0, 0, 0]));
        assert_eq!(
            c.bind_hosts,
            vec![IpAddr::V4(AGENT_IPV4), IpAddr::V6(AGENT_IPV6)]
        );
        assert_eq!(c.cache.max_retention, Duration::from_secs(3 * 3600));
        assert_eq!(c.cache.max_entries, 2000);
        assert_eq!(c.cache.renewals_per_second, 3);
        assert!(c.cache.enabled());
        // `CacheConfig::default()` (what tests and fuzz targets start from) is what the flags give.
        let d = CacheConfig::default();
        assert_eq!(
            (d.max_entries, d.max_retention, d.renewals_per_second),
            (
                c.cache.max_entries,
                c.cache.max_retention,
                c.cache.renewals_per_second
            )
        );
        assert_eq!(c.attribution.token_binding, TokenBinding::Audit);
        assert_eq!(c.attribution.kubelet_cgroup_root, None);
        assert_eq!(c.attribution.pod_max_connections, 64);
        assert_eq!(c.attribution.max_pods, 110);
        assert_eq!(
            c.global_rate,
            RateLimit {
                per_second: 1000,
                burst: 500
            }
        );
    }

    #[test]
    fn eks_auth_timeouts_default_to_the_originals_and_can_be_changed() {
        let c = server(&["-c", "prod"]).unwrap();
        let d = UpstreamConfig::default();
        assert_eq!(
            (
                c.upstream.connect_timeout,
                c.upstream.attempt_timeout,
                c.upstream.call_timeout
            ),
            (
                Duration::from_millis(500),
                Duration::from_secs(1),
                Duration::from_millis(3500)
            )
        );
        assert_eq!(
            (d.connect_timeout, d.attempt_timeout, d.call_timeout),
            (
                c.upstream.connect_timeout,
                c.upstream.attempt_timeout,
                c.upstream.call_timeout
            )
        );
        let c = server(&[
            "-c",
            "prod",
            "--eks-auth-connect-timeout",
            "2s",
            "--eks-auth-attempt-timeout",
            "4s",
            "--eks-auth-call-timeout",
            "10s",
        ])
        .unwrap();
        assert_eq!(c.upstream.connect_timeout, Duration::from_secs(2));
        assert_eq!(c.upstream.attempt_timeout, Duration::from_secs(4));
        assert_eq!(c.upstream.call_timeout, Duration::from_secs(10));
        assert!(server(&["-c", "prod", "--eks-auth-call-timeout", "0"]).is_err());
    }

    #[test]
    fn cluster_name_is_required() {
        assert!(server(&[]).is_err());
    }

    #[test]
    fn original_flag_spellings_parse() {
        let c = server(&[
            "--cluster-name",
            "c",
            "-p",
            "8080",
            "-b",
            "127.0.0.1",
            "-b",
            "[::1]",
            "--max-credential-retention-before-renewal",
            "1h30m",
            "--max-cache-size",
            "0",
            "--max-service-qps",
            "7",
            "--rotate-credentials",
            "--endpoint",
            "http://127.0.0.1:9",
            "-v",
            "3",
        ])
        .unwrap();
        assert_eq!(c.port, 8080);
        assert_eq!(
            c.bind_hosts,
            vec![
                IpAddr::from([127, 0, 0, 1]),
                "::1".parse::<IpAddr>().unwrap()
            ]
        );
        assert_eq!(c.cache.max_retention, Duration::from_secs(5400));
        assert!(!c.cache.enabled());
        assert_eq!(c.cache.renewals_per_second, 7);
        assert!(c.upstream.rotate_credentials);
        assert_eq!(c.upstream.endpoint.as_deref(), Some("http://127.0.0.1:9"));
    }

    #[test]
    fn zero_retention_disables_the_cache() {
        let c = server(&["-c", "x", "--max-credential-retention-before-renewal", "0"]).unwrap();
        assert!(!c.cache.enabled());
    }

    #[test]
    fn bad_values_are_refused_with_a_reason() {
        let err = server(&["-c", "x", "-b", "not-an-ip"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("not an IP address"), "{err}");
        let err = server(&[
            "-c",
            "x",
            "--max-credential-retention-before-renewal",
            "soon",
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("not a duration"), "{err}");
        assert!(server(&["-c", "x", "-v", "loud"]).is_err());
    }

    #[test]
    fn audit_log_dash_means_stdout() {
        let c = server(&["-c", "x", "--audit-log", "-", "--token-binding", "enforce"]).unwrap();
        assert_eq!(c.attribution.audit, Some(AuditSink::Stdout));
        assert_eq!(c.attribution.token_binding, TokenBinding::Enforce);
    }

    fn parse(argv: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("eks-pod-identity-agent").chain(argv.iter().copied()))
    }

    #[test]
    fn boolean_flags_take_the_original_spellings() {
        for (args, expected) in [
            (&["--rotate-credentials"][..], true),
            (&["--rotate-credentials", "true"], true),
            (&["--rotate-credentials", "false"], false),
            (&["--rotate-credentials=true"], true),
            (&["--rotate-credentials=false"], false),
            (&["--rotate-credentials=1"], true),
            (&["--rotate-credentials", "-v", "trace"], true),
            (&[], false),
        ] {
            let mut argv = vec!["-c", "x"];
            argv.extend_from_slice(args);
            let c = server(&argv).unwrap_or_else(|e| panic!("{args:?}: {e}"));
            assert_eq!(c.upstream.rotate_credentials, expected, "{args:?}");
        }
        let err = server(&["-c", "x", "--rotate-credentials", "yes"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a boolean"), "{err}");
    }

    #[test]
    fn verbosity_goes_before_or_after_the_subcommand() {
        use tracing::Level;
        for (argv, level) in [
            (&["-v", "trace", "initialize"][..], Level::TRACE),
            (&["initialize", "-v", "trace"], Level::TRACE),
            (&["--verbosity", "debug", "server", "-c", "x"], Level::DEBUG),
            (&["server", "-c", "x", "--verbosity=warning"], Level::WARN),
            (&["server", "-c", "x"], Level::INFO),
            (&["version"], Level::INFO),
        ] {
            let cli = parse(argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
            assert_eq!(cli.verbosity, level, "{argv:?}");
        }
    }

    #[test]
    fn verbosity_takes_the_original_level_names_and_ours() {
        use tracing::Level;
        for (name, level) in [
            ("panic", Level::ERROR),
            ("fatal", Level::ERROR),
            ("error", Level::ERROR),
            ("warn", Level::WARN),
            ("warning", Level::WARN),
            ("info", Level::INFO),
            ("debug", Level::DEBUG),
            ("trace", Level::TRACE),
            ("TRACE", Level::TRACE),
            ("0", Level::ERROR),
            ("4", Level::TRACE),
        ] {
            assert_eq!(parse_verbosity(name), Ok(level), "{name}");
        }
        let err = parse(&["-v", "loud", "initialize"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a level"), "{err}");
    }

    #[test]
    fn kubelet_cgroup_root_and_pod_max_connections() {
        let c = server(&[
            "-c",
            "x",
            "--kubelet-cgroup-root",
            "/kubelet",
            "--pod-max-connections",
            "8",
            "--max-pods",
            "250",
        ])
        .unwrap();
        assert_eq!(c.attribution.max_pods, 250);
        assert_eq!(
            c.attribution.kubelet_cgroup_root.as_deref(),
            Some(std::path::Path::new("/kubelet"))
        );
        assert_eq!(c.attribution.pod_max_connections, 8);
        for bad in ["/", "", "/a/../b", "./x"] {
            assert!(
                server(&["-c", "x", "--kubelet-cgroup-root", bad]).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn sizes_take_units() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("100Mi"), Ok(100 << 20));
        assert_eq!(parse_size("100MiB"), Ok(100 << 20));
        assert_eq!(parse_size("50MB"), Ok(50_000_000));
        assert_eq!(parse_size("10M"), Ok(10_000_000));
        assert_eq!(parse_size("1Gi"), Ok(1 << 30));
        assert!(parse_size("ten").unwrap_err().contains("not a size"));
        assert!(parse_size("10Q").unwrap_err().contains("unknown unit"));
        assert!(
            parse_size("99999999999Gi")
                .unwrap_err()
                .contains("too large")
        );
        let c = server(&["-c", "x"]).unwrap();
        assert_eq!(c.attribution.audit_rotation.max_size, 100 << 20);
        assert_eq!(c.attribution.audit_rotation.max_backups, 5);
    }

    #[test]
    fn kubernetes_features_are_off_by_default_and_take_bool_values() {
        let c = server(&["-c", "x"]).unwrap();
        assert_eq!(c.kubernetes.startup_taint, None);
        assert!(!c.kubernetes.pod_events);
        assert!(!c.kubernetes.enabled());
        let c = server(&[
            "-c",
            "x",
            "--remove-startup-taint",
            "true",
            "--pod-events=true",
        ])
        .unwrap();
        assert_eq!(
            c.kubernetes.startup_taint.as_deref(),
            Some(DEFAULT_STARTUP_TAINT)
        );
        assert!(c.kubernetes.pod_events);
        let c = server(&[
            "-c",
            "x",
            "--remove-startup-taint",
            "--startup-taint-key",
            "example.com/agent-not-ready",
            "--pod-events",
            "false",
        ])
        .unwrap();
        assert_eq!(
            c.kubernetes.startup_taint.as_deref(),
            Some("example.com/agent-not-ready")
        );
        assert!(!c.kubernetes.pod_events);
        let c = server(&["-c", "x", "--startup-taint-key", "k"]).unwrap();
        assert_eq!(
            c.kubernetes.startup_taint, None,
            "the key alone is not the switch"
        );
    }

    #[test]
    fn taint_keys_are_qualified_names() {
        for good in [
            DEFAULT_STARTUP_TAINT,
            "agent-not-ready",
            "node.cilium.io/agent-not-ready",
            "a/b",
            "x_y.z",
        ] {
            assert_eq!(parse_taint_key(good).as_deref(), Ok(good), "{good}");
        }
        for bad in [
            "",
            "/x",
            "a/",
            "Example.com/x",
            "a/-x",
            "a/b/c",
            "a b",
            &"x".repeat(64),
        ] {
            assert!(parse_taint_key(bad).is_err(), "{bad:?}");
        }
    }
}
