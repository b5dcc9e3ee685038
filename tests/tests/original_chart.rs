//! Drop-in compatibility with the original agent's Helm chart: the argv of every container it
//! renders (vendored in `tests/fixtures/original-chart/`, one file per DaemonSet variant) is
//! accepted by our command line, and run unchanged — through `/go-runner` — in the simulated node
//! it brings up `initialize` and `server`, healthy, serving a pod.
//!
//! The chart passes no `--cgroup-root` and no `--node-name`, so the server attaches at the cgroup2
//! mount's root, as it does on a node.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::Parser as _;
use e2e::agent::{AgentArgs, AgentProcess, Verbatim, node_with_web_pods, write_credentials_file};
use e2e::node::CREDENTIALS_URI_V4;
use pod_identity_agent::cli::{Cli, Command};
use pod_identity_agent::go_runner;
use yaml_rust2::{Yaml, YamlLoader};

const VARIANTS: [&str; 3] = ["cloud", "hybrid", "hybrid-bottlerocket"];

/// One container of a rendered DaemonSet: its name and `command` + `args`.
#[derive(Debug)]
struct Container {
    daemonset: String,
    name: String,
    init: bool,
    argv: Vec<String>,
}

fn fixture(variant: &str) -> PathBuf {
    e2e::workspace_root()
        .join("tests/fixtures/original-chart")
        .join(format!("{variant}.yaml"))
}

/// Every container of every DaemonSet in the rendered chart.
fn containers(variant: &str) -> Vec<Container> {
    let text = std::fs::read_to_string(fixture(variant)).unwrap();
    let docs = YamlLoader::load_from_str(&text).unwrap();
    let strings = |y: &Yaml| -> Vec<String> {
        y.as_vec()
            .map(|v| v.iter().map(|s| s.as_str().unwrap().to_owned()).collect())
            .unwrap_or_default()
    };
    let mut out = Vec::new();
    for doc in docs
        .iter()
        .filter(|d| d["kind"].as_str() == Some("DaemonSet"))
    {
        let daemonset = doc["metadata"]["name"].as_str().unwrap().to_owned();
        let spec = &doc["spec"]["template"]["spec"];
        for (key, init) in [("initContainers", true), ("containers", false)] {
            for c in spec[key].as_vec().into_iter().flatten() {
                let mut argv = strings(&c["command"]);
                argv.extend(strings(&c["args"]));
                out.push(Container {
                    daemonset: daemonset.clone(),
                    name: c["name"].as_str().unwrap().to_owned(),
                    init,
                    argv,
                });
            }
        }
    }
    out
}

/// What go-runner hands to the agent: the argv after go-runner's own flags.
fn agent_argv(c: &Container) -> Vec<OsString> {
    assert_eq!(c.argv[0], "/go-runner", "{c:?}");
    go_runner::parse(c.argv[1..].iter().map(OsString::from))
        .unwrap_or_else(|e| panic!("go-runner refuses {c:?}: {e}"))
        .command
}

#[test]
fn every_container_argv_of_the_original_chart_parses() {
    for variant in VARIANTS {
        let containers = containers(variant);
        assert_eq!(
            containers.len(),
            2,
            "{variant}: an init container and a server"
        );
        for c in &containers {
            let argv = agent_argv(c);
            assert_eq!(argv[0], "/eks-pod-identity-agent", "{c:?}");
            let cli = Cli::try_parse_from(&argv)
                .unwrap_or_else(|e| panic!("{variant} {}/{}: {e}", c.daemonset, c.name));
            assert_eq!(cli.verbosity, tracing::Level::TRACE, "{c:?}");
            match (c.init, cli.command) {
                (true, Command::Initialize(_)) => {}
                (false, Command::Server(args)) => {
                    let config = args.into_config();
                    assert_eq!(config.cluster_name, "my-cluster");
                    assert_eq!(config.port, 80);
                    assert_eq!(config.probe_port, 2703);
                    assert_eq!(config.metrics_port, 2705);
                    assert_eq!(
                        config.upstream.rotate_credentials,
                        variant != "cloud",
                        "{variant}: hybrid nodes pass --rotate-credentials true"
                    );
                }
                (_, other) => panic!("{c:?} parsed as {other:?}"),
            }
        }
    }
}

#[test]
fn the_original_chart_runs_our_binary_in_every_variant() {
    if !e2e::privileged("the_original_chart_runs_our_binary_in_every_variant") {
        return;
    }
    for variant in VARIANTS {
        serve_a_pod_with_the_charts_argv(variant);
    }
}

/// `/go-runner` and `/eks-pod-identity-agent` as the image has them: the agent binary under both
/// names, in a directory of the node's.
fn image_like_bin_dir(dir: &Path) -> PathBuf {
    let bin = e2e::agent::agent_bin().unwrap();
    std::fs::create_dir_all(dir).unwrap();
    for name in ["go-runner", "eks-pod-identity-agent"] {
        let link = dir.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&bin, &link).unwrap();
    }
    dir.to_path_buf()
}

fn serve_a_pod_with_the_charts_argv(variant: &str) {
    let (node, fake, [pod]) = node_with_web_pods("my-cluster", ["web-0"]).unwrap();
    let bin_dir = image_like_bin_dir(&node.dir().join("image-bin"));
    // The chart's absolute paths, pointed at the directory standing in for the image's root.
    let localise = |c: &Container| -> Vec<OsString> {
        c.argv
            .iter()
            .map(|a| match a.strip_prefix('/') {
                Some(name @ ("go-runner" | "eks-pod-identity-agent")) => {
                    bin_dir.join(name).into_os_string()
                }
                _ => OsString::from(a),
            })
            .collect()
    };
    let containers = containers(variant);
    let init = containers.iter().find(|c| c.init).unwrap();
    let server = containers.iter().find(|c| !c.init).unwrap();

    let mut args = AgentArgs {
        verbatim: Some(Verbatim {
            initialize: localise(init),
            server: localise(server),
        }),
        ..AgentArgs::default()
    };
    // What the chart leaves to the environment: EKS Auth's endpoint (the SDK's own variable), and on
    // hybrid nodes the agent's credentials in the shared credentials file it re-reads.
    args.env
        .push(("AWS_ENDPOINT_URL_EKS_AUTH".into(), fake.endpoint()));
    if variant != "cloud" {
        let file = node.dir().join("hybrid-credentials");
        write_credentials_file(&file, "AKIAE2EHYBRIDNODE001", "hybrid-secret").unwrap();
        args = args.shared_credentials_file(&file);
    }
    let agent = AgentProcess::start(&node, &fake, args)
        .unwrap_or_else(|e| panic!("{variant}: the chart's argv does not come up: {e:#}"));
    assert_eq!(agent.probe("/healthz").unwrap().status, 200, "{variant}");
    assert_eq!(agent.probe("/readyz").unwrap().status, 200, "{variant}");

    pod.refresh_token(&fake).unwrap();
    let creds = pod
        .fetch_with_botocore(CREDENTIALS_URI_V4)
        .unwrap()
        .unwrap_or_else(|e| panic!("{variant}: botocore: {e}\n{}", agent.logs().unwrap()));
    assert!(creds.access_key_id.starts_with("ASIA"), "{variant}");
    if variant != "cloud" {
        let signed_with = fake
            .last_request()
            .and_then(|r| r.header("authorization").map(str::to_owned))
            .unwrap_or_default();
        assert!(
            signed_with.contains("AKIAE2EHYBRIDNODE001"),
            "{variant}: signed with the node's shared credentials file: {signed_with}"
        );
    }
    // `-v trace` took: the agent logs at debug level and below.
    let logs = agent.logs().unwrap();
    assert!(
        logs.contains("\"level\":\"DEBUG\"") || logs.contains("\"level\":\"TRACE\""),
        "{variant}: -v trace gives debug logs:\n{logs}"
    );
    let build_info = format!(
        "pod_identity_build_info{{commit=\"{}\",version=\"{}\"}} 1",
        pod_identity_agent::COMMIT,
        pod_identity_agent::VERSION
    );
    let metrics = agent.metrics().unwrap();
    assert!(metrics.contains(&build_info), "{build_info} in:\n{metrics}");
    let status = agent.stop().unwrap();
    assert!(status.success(), "{variant}: exits 0 on SIGTERM: {status}");
}

#[test]
fn version_names_the_git_commit_it_was_built_from() {
    let out = std::process::Command::new(e2e::agent::agent_bin().unwrap())
        .arg("version")
        .output()
        .unwrap();
    assert!(out.status.success());
    let printed = String::from_utf8(out.stdout).unwrap();
    let head = std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(e2e::workspace_root())
        .output()
        .unwrap();
    let head = String::from_utf8(head.stdout).unwrap();
    assert_eq!(
        printed.trim(),
        format!(
            "eks-pod-identity-agent version {} (commit {})",
            env!("CARGO_PKG_VERSION"),
            head.trim()
        )
    );
}
