use std::net::IpAddr;
use std::time::Duration;

use super::*;
use crate::config::{
    AuditFormat, AuditSink, CacheConfig, PodViewMode, RateLimit, ServerConfig, TokenBinding,
    UpstreamConfig,
};
use crate::kubernetes::taint::DEFAULT_STARTUP_TAINT;

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
    assert_eq!(c.attribution.audit_format, AuditFormat::Native);
    let c = server(&["-c", "x", "--audit-log", "-", "--audit-format", "ocsf"]).unwrap();
    assert_eq!(c.attribution.audit_format, AuditFormat::Ocsf);
    assert!(server(&["-c", "x", "--audit-format", "cef"]).is_err());
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
    // The pod view's `auto` may use the API, but nothing requires it.
    assert_eq!(c.kubernetes.pod_view.mode, PodViewMode::Auto);
    assert!(c.kubernetes.enabled());
    assert!(!c.kubernetes.required());
    assert_eq!(c.kubernetes.pod_view.capacity, 440, "4 x --max-pods");
    for (arg, mode) in [
        ("on", PodViewMode::On),
        ("off", PodViewMode::Off),
        ("auto", PodViewMode::Auto),
    ] {
        let c = server(&["-c", "x", "--pod-view", arg]).unwrap();
        assert_eq!(c.kubernetes.pod_view.mode, mode);
    }
    assert!(
        !server(&["-c", "x", "--pod-view", "off"])
            .unwrap()
            .kubernetes
            .enabled()
    );
    assert!(
        server(&["-c", "x", "--pod-view", "on"])
            .unwrap()
            .kubernetes
            .required()
    );
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
