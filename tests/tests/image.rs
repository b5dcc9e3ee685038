//! The container image end to end: this machine's platform of `localhost/eks-pod-identity-agent:latest`,
//! as `cargo xtask image` builds it (this test builds nothing; `image_platforms.rs` covers the
//! manifest list and the arm64 image).
//!
//! Containers cannot be run on these machines (podman/crun fail in hybrid cgroup mode), so the image
//! is tested through its root filesystem (`buildah from` + `buildah mount`): it holds the binary,
//! `/go-runner`, the CA bundle and root's home and nothing else, and the agent run from it with
//! `chroot`, through go-runner with the chart's command, with the image's environment only, serves
//! a pod's botocore — attributed by the kernel, with the mounts the DaemonSet gives the container
//! (its own /proc and /sys, the host's cgroup v2 tree at /sys/fs/cgroup read-only, the audit log
//! directory), set up in a private mount namespace that vanishes with the agent. As the original
//! chart runs it: trusting EKS Auth's certificate through the node's CA bundle mounted over the
//! image's, and on a hybrid node signing with `/root/.aws/credentials` found through `HOME`.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Result;
use e2e::agent::{
    AgentArgs, AgentProcess, Verbatim, node_with_web_pods, wait_audit_records,
    write_credentials_file,
};
use e2e::clients::RawRequest;
use e2e::fake_eks_auth::FakeEksAuth;
use e2e::image::{ImageRootfs, VERSION};
use e2e::node::{AGENT_V4, CREDENTIALS_URI_V4, Pod, SimNode};
use e2e::tls::{TestCa, TlsStandIn};

/// Where the image keeps its CA bundle (and where the original chart mounts the node's).
const CA_BUNDLE: &str = "etc/pki/tls/certs/ca-bundle.crt";
/// Debian's path of the bundle: a symbolic link to [`CA_BUNDLE`] in the image.
const LEGACY_CA_BUNDLE: &str = "etc/ssl/certs/ca-certificates.crt";
/// Where the DaemonSet mounts the audit log's host directory.
const AUDIT_DIR: &str = "var/log/eks-pod-identity-agent";

/// Every entry under `dir`, as paths relative to `root`.
fn walk(root: &Path, dir: &Path, out: &mut Vec<(PathBuf, std::fs::Metadata)>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let meta = std::fs::symlink_metadata(entry.path()).unwrap();
        let rel = entry.path().strip_prefix(root).unwrap().to_path_buf();
        if meta.is_dir() {
            walk(root, &entry.path(), out);
        }
        out.push((rel, meta));
    }
}

/// Runs a program of the image in its root filesystem (nothing else mounted), returning stdout.
fn run_in(root: &Path, argv: &[&str]) -> String {
    let out = Command::new("chroot")
        .arg(root)
        .args(argv)
        // Nothing from the test's environment, but the PATH to find chroot itself.
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "chroot {argv:?}: {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_image_holds_the_static_binary_go_runner_the_ca_bundle_and_roots_home_only() {
    if !e2e::privileged(
        "the_image_holds_the_static_binary_go_runner_the_ca_bundle_and_roots_home_only",
    ) {
        return;
    }
    let rootfs = ImageRootfs::open().unwrap();
    let root = &rootfs.root;

    let mut entries = Vec::new();
    walk(root, root, &mut entries);
    let of_kind = |keep: fn(&std::fs::Metadata) -> bool| -> BTreeSet<String> {
        entries
            .iter()
            .filter(|(_, m)| keep(m))
            .map(|(p, _)| p.display().to_string())
            .collect()
    };
    let names =
        |list: &[&str]| -> BTreeSet<String> { list.iter().map(|s| (*s).to_owned()).collect() };
    assert_eq!(
        of_kind(std::fs::Metadata::is_file),
        names(&[
            "eks-pod-identity-agent",
            "go-runner",
            CA_BUNDLE,
            "etc/passwd",
            "etc/group"
        ]),
        "the image's files"
    );
    assert_eq!(
        of_kind(std::fs::Metadata::is_symlink),
        names(&[LEGACY_CA_BUNDLE]),
        "the image's symbolic links"
    );
    assert_eq!(
        of_kind(std::fs::Metadata::is_dir),
        names(&[
            "etc",
            "etc/pki",
            "etc/pki/tls",
            "etc/pki/tls/certs",
            "etc/ssl",
            "etc/ssl/certs",
            "root"
        ]),
        "the image's directories"
    );

    let agent = std::fs::metadata(root.join("eks-pod-identity-agent")).unwrap();
    let go_runner = std::fs::metadata(root.join("go-runner")).unwrap();
    assert!(agent.is_file() && go_runner.is_file());
    assert_eq!(agent.permissions().mode() & 0o777, 0o755);
    assert_eq!(
        (agent.dev(), agent.ino()),
        (go_runner.dev(), go_runner.ino()),
        "/go-runner is a hard link to the binary"
    );
    let bundle = std::fs::read_to_string(root.join(CA_BUNDLE)).unwrap();
    assert!(
        bundle.matches("-----BEGIN CERTIFICATE-----").count() > 10,
        "the CA bundle holds the CA certificates"
    );
    // Relative, so that it resolves inside the container (and here, inside the mounted root).
    assert_eq!(
        std::fs::read_link(root.join(LEGACY_CA_BUNDLE)).unwrap(),
        Path::new("../../pki/tls/certs/ca-bundle.crt")
    );
    assert_eq!(
        std::fs::read_to_string(root.join(LEGACY_CA_BUNDLE)).unwrap(),
        bundle
    );
    // root's home is /root, as in the Go image's /etc/passwd, and it exists.
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap();
    assert!(
        passwd
            .lines()
            .any(|l| l.starts_with("root:x:0:0:") && l.split(':').nth(5) == Some("/root")),
        "{passwd}"
    );
    assert_eq!(
        std::fs::metadata(root.join("root"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o700
    );
    // Static: it runs in a root filesystem with no loader and no libc, as itself and as go-runner.
    let config = rootfs.config().unwrap();
    // The shipped build (`cargo xtask image`) stays small; the tests' unoptimised one (`cargo xtask
    // test`) only may not run away.
    let bound = match config["Labels"]["io.eks-pod-identity-agent.build-profile"].as_str() {
        Some("release") => 40_000_000,
        Some("ci-image") => 200_000_000,
        other => panic!("the image names no build profile it was built with: {other:?}"),
    };
    let size: u64 = agent.len() + bundle.len() as u64;
    assert!(size < bound, "the image's content is {size} bytes");

    let revision = config["Labels"]["org.opencontainers.image.revision"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let version = run_in(root, &["/eks-pod-identity-agent", "version"]);
    assert_eq!(
        version.trim(),
        format!("eks-pod-identity-agent version {VERSION} (commit {revision})"),
        "the binary's version and commit agree with the image's labels"
    );
    assert_eq!(
        run_in(root, &["/go-runner", "/eks-pod-identity-agent", "version"]),
        version
    );

    assert_eq!(
        config["Entrypoint"],
        serde_json::json!(["/go-runner"]),
        "{config}"
    );
    assert_eq!(
        config["Cmd"],
        serde_json::json!(["/eks-pod-identity-agent", "server"]),
        "{config}"
    );
    assert_eq!(
        config["Labels"]["org.opencontainers.image.version"], VERSION,
        "{config}"
    );
    assert!(!revision.is_empty() && revision != "unknown", "{config}");
    let env = rootfs.env().unwrap();
    for (var, value) in [
        ("HOME", "/root".to_owned()),
        ("SSL_CERT_FILE", format!("/{CA_BUNDLE}")),
    ] {
        assert!(env.contains(&(var.into(), value)), "{var}: {config}");
    }
}

/// `sh` + `unshare` + `sh` + `chroot` in front of the image's argv, as a DaemonSet container runs:
/// in a cgroup of its own (`<node root>/agent-container`) and a private cgroup namespace rooted
/// there, as containerd starts containers on cgroup v2, and in a private mount namespace with the
/// mounts the chart gives the container (proc, sys, the node's cgroup2 hierarchy read-only at
/// /sys/fs/cgroup — which the agent then sees through its namespace as `/..`-rooted — and the
/// audit directory), then `chroot` into the image. The mounts go with the namespace when the agent
/// exits; the mount points are created in the working container only.
/// `binds` are further read-only bind mounts `(host path, path in the container)`, as the chart's
/// hostPath volumes (the node's CA bundle over the image's).
fn container_wrapper(
    rootfs: &ImageRootfs,
    node: &SimNode,
    audit_dir: &Path,
    binds: &[(PathBuf, &str)],
) -> Vec<OsString> {
    const ENTER: &str = r#"echo $$ > "$0" &&
exec unshare --cgroup --mount --propagation private -- sh -c "$@""#;
    const SCRIPT: &str = r#"root="$0" cgroup2="$1" audit="$2" binds="$3"; shift 3
mount -t proc proc "$root/proc" &&
mount -t sysfs sysfs "$root/sys" &&
mount --bind "$cgroup2" "$root/sys/fs/cgroup" &&
mount -o remount,bind,ro "$root/sys/fs/cgroup" &&
mount --bind "$audit" "$root/var/log/eks-pod-identity-agent" &&
printf '%s' "$binds" | while IFS='|' read -r src dst; do
  mount --bind "$src" "$root$dst" && mount -o remount,bind,ro "$root$dst" || exit 1
done &&
exec chroot "$root" "$@""#;
    for dir in ["proc", "sys", AUDIT_DIR] {
        std::fs::create_dir_all(rootfs.root.join(dir)).unwrap();
    }
    let container_cgroup = node.cgroup_root().join("agent-container");
    std::fs::create_dir_all(&container_cgroup).unwrap();
    let cgroup2 = e2e::cgroup::cgroup2_mount().unwrap();
    vec![
        "sh".into(),
        "-c".into(),
        ENTER.into(),
        container_cgroup.join("cgroup.procs").into_os_string(),
        SCRIPT.into(),
        rootfs.root.clone().into_os_string(),
        cgroup2.into_os_string(),
        audit_dir.into(),
        binds
            .iter()
            .map(|(src, dst)| format!("{}|{dst}\n", src.display()))
            .collect::<String>()
            .into(),
    ]
}

/// The chart's command for the image (`/go-runner /eks-pod-identity-agent <subcommand>`), with this
/// node's flags for `server`. The node's test cgroup root, seen at /sys/fs/cgroup in the container.
fn chart_argv(node: &SimNode, cluster: &str, endpoint: &str, extra: &[&str]) -> Verbatim {
    let mount = e2e::cgroup::cgroup2_mount().unwrap();
    let in_container =
        Path::new("/sys/fs/cgroup").join(node.cgroup_root().strip_prefix(&mount).unwrap());
    let command = |sub: &str| -> Vec<OsString> {
        vec![
            "/go-runner".into(),
            "/eks-pod-identity-agent".into(),
            sub.into(),
        ]
    };
    let mut server = command("server");
    let audit_log = format!("/{AUDIT_DIR}/audit.log");
    let flags = [
        "--cluster-name",
        cluster,
        "--endpoint",
        endpoint,
        "--node-name",
        node.name(),
        "--audit-log",
        &audit_log,
    ];
    server.extend(flags.iter().chain(extra).map(OsString::from));
    server.push("--cgroup-root".into());
    server.push(in_container.into_os_string());
    Verbatim {
        initialize: command("initialize"),
        server,
    }
}

/// How a test runs the image: what the chart would vary.
struct Launch<'a> {
    /// `--endpoint`.
    endpoint: String,
    /// Further `server` flags.
    extra: &'a [&'a str],
    /// The container's environment (the image's config, or a variation of it): nothing of the
    /// test's `HOME` or `SSL_*` gets through.
    env: Vec<(String, String)>,
    /// Read-only bind mounts into the container.
    binds: Vec<(PathBuf, &'a str)>,
    /// Whether the harness's AWS key pair is in the environment (`false`: the agent must find its
    /// own credentials, as on a hybrid node).
    env_credentials: bool,
}

impl Launch<'_> {
    fn new(endpoint: String, env: Vec<(String, String)>) -> Self {
        Self {
            endpoint,
            extra: &[],
            env,
            binds: Vec::new(),
            env_credentials: true,
        }
    }
}

/// Runs `initialize` and `server` from the image as the chart does, in the container's mounts.
fn start_from_image(
    rootfs: &ImageRootfs,
    node: &SimNode,
    fake: &FakeEksAuth,
    launch: Launch<'_>,
) -> Result<(AgentProcess, PathBuf)> {
    let audit_dir = node.dir().join(format!("audit-{}", rootfs.name()));
    std::fs::create_dir_all(&audit_dir)?;
    let mut env_remove: Vec<String> = ["SSL_CERT_FILE", "SSL_CERT_DIR", "HOME"]
        .into_iter()
        .filter(|var| !launch.env.iter().any(|(k, _)| k == var))
        .map(str::to_owned)
        .collect();
    if !launch.env_credentials {
        env_remove.extend(["AWS_ACCESS_KEY_ID".into(), "AWS_SECRET_ACCESS_KEY".into()]);
    }
    let args = AgentArgs {
        wrapper: container_wrapper(rootfs, node, &audit_dir, &launch.binds),
        verbatim: Some(chart_argv(
            node,
            fake.cluster(),
            &launch.endpoint,
            launch.extra,
        )),
        env: launch.env,
        env_remove,
        ..AgentArgs::default()
    };
    let agent = AgentProcess::start(node, fake, args)?;
    Ok((agent, audit_dir.join("audit.log")))
}

#[test]
fn the_agent_from_the_image_serves_a_pods_botocore_attributed() {
    if !e2e::privileged("the_agent_from_the_image_serves_a_pods_botocore_attributed") {
        return;
    }
    // Declared first, dropped last: after the agent.
    let rootfs = ImageRootfs::open().unwrap();
    let (node, fake, [pod]) = node_with_web_pods("e2e-image", ["web-0"]).unwrap();
    // `enforce` refuses to start without the eBPF programs: ready means attached.
    let launch = Launch {
        extra: &["--token-binding", "enforce"],
        ..Launch::new(fake.endpoint(), rootfs.env().unwrap())
    };
    let (agent, audit_log) = start_from_image(&rootfs, &node, &fake, launch).unwrap();

    // It is the image's binary that runs, in the image's root, exec'd by go-runner.
    let pid = agent.pid().unwrap();
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/root")).unwrap(),
        rootfs.root
    );
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(
        cmdline.starts_with(b"/eks-pod-identity-agent\0server\0"),
        "{}",
        String::from_utf8_lossy(&cmdline)
    );
    assert_eq!(agent.metric("pod_identity_ebpf_attached").unwrap(), 1.0);
    // As in a DaemonSet container: a private cgroup namespace, in which the node's hierarchy
    // mounted at /sys/fs/cgroup shows a root above the namespace's (`/..`) — and is attached at.
    // (mountinfo renders a cgroup2 root relative to the READER's cgroup namespace: read it from
    // inside the agent's namespaces.)
    let seen = std::process::Command::new("nsenter")
        .args([
            "-t",
            &pid.to_string(),
            "--cgroup",
            "--mount",
            "cat",
            "/proc/self/mountinfo",
        ])
        .output()
        .unwrap();
    let mountinfo = String::from_utf8(seen.stdout).unwrap();
    let cgroup2 = mountinfo
        .lines()
        .find(|l| {
            l.contains(" - cgroup2 ")
                && l.split(' ').nth(4)
                    == Some(&*rootfs.root.join("sys/fs/cgroup").to_string_lossy())
        })
        .unwrap_or_else(|| panic!("no cgroup2 mount at /sys/fs/cgroup:\n{mountinfo}"));
    assert!(
        cgroup2
            .split(' ')
            .nth(3)
            .is_some_and(|root| root.starts_with("/..")),
        "{cgroup2}"
    );

    pod.refresh_token(&fake).unwrap();
    let creds = pod
        .fetch_with_botocore(CREDENTIALS_URI_V4)
        .unwrap()
        .unwrap_or_else(|e| panic!("botocore: {e}\n{}", agent.logs().unwrap_or_default()));
    assert!(creds.access_key_id.starts_with("ASIA"), "{creds:?}");

    let records = wait_audit_records(&audit_log, 1, Duration::from_secs(5)).unwrap();
    let r = &records[0];
    assert_eq!(r["outcome"], "allowed", "{r}");
    assert_eq!(r["binding"], "match", "{r}");
    assert_eq!(r["caller"]["pod_uid"], pod.uid.as_str(), "{r}");
    assert_eq!(
        r["caller"]["container_id"],
        pod.container_id.as_str(),
        "{r}"
    );
    assert_eq!(r["caller"]["comm"], "python3", "{r}");
    assert_eq!(
        r["caller"]["cgroup_path"],
        pod.cgroup_v2_path().unwrap().as_str(),
        "{r}"
    );

    let status = agent.stop().unwrap();
    assert!(status.success(), "the agent exits 0 on SIGTERM: {status}");
}

/// Asks the agent for credentials once with a fresh token, raw (no SDK retries): the status, and
/// how many EKS Auth calls that token made.
fn one_request(pod: &Pod, fake: &FakeEksAuth) -> (u16, u64) {
    let token = pod.refresh_token(fake).unwrap();
    let request = RawRequest::get("/v1/credentials")
        .host("169.254.170.23")
        .authorization(&token)
        .to_bytes();
    let r = pod
        .raw_http(
            SocketAddr::from((AGENT_V4, 80)),
            &request,
            Duration::from_secs(10),
        )
        .unwrap();
    (r.status, fake.calls_for_token(&token))
}

/// ISO regions and private CAs: the original chart mounts the node's CA bundle over
/// `/etc/pki/tls/certs/ca-bundle.crt`, which the Go agent reads as its system roots. EKS Auth here
/// is a real TLS server whose certificate a test CA signed: with that CA's bundle mounted where the
/// chart mounts it, the agent from the image trusts it and the pod is served — with the image's
/// `SSL_CERT_FILE`, and without it (rustls-native-certs then finds Debian's path, a link to the
/// mounted file). Without the mount, the image's own bundle does not know the test CA, and the call
/// fails: the mount is what is trusted.
#[test]
fn eks_auth_behind_the_nodes_ca_is_trusted_through_the_bundle_mounted_over_the_images() {
    if !e2e::privileged(
        "eks_auth_behind_the_nodes_ca_is_trusted_through_the_bundle_mounted_over_the_images",
    ) {
        return;
    }
    let rootfs = ImageRootfs::open().unwrap();
    let (node, fake, [pod]) = node_with_web_pods("e2e-image-tls", ["web-0"]).unwrap();
    let ca = TestCa::create(&node.dir().join("test-ca")).unwrap();
    let tls = TlsStandIn::start(node.netns(), &ca, fake.addr()).unwrap();
    let image_env = rootfs.env().unwrap();
    let without_ssl_cert_file: Vec<_> = image_env
        .iter()
        .filter(|(k, _)| k != "SSL_CERT_FILE")
        .cloned()
        .collect();
    let node_bundle = || vec![(ca.ca_pem.clone(), "/etc/pki/tls/certs/ca-bundle.crt")];

    for (case, env) in [
        ("image env", image_env.clone()),
        ("no SSL_CERT_FILE", without_ssl_cert_file),
    ] {
        let launch = Launch {
            binds: node_bundle(),
            ..Launch::new(tls.endpoint(), env)
        };
        let (agent, _) = start_from_image(&rootfs, &node, &fake, launch).unwrap();
        pod.refresh_token(&fake).unwrap();
        let creds = pod
            .fetch_with_botocore(CREDENTIALS_URI_V4)
            .unwrap()
            .unwrap_or_else(|e| panic!("{case}: botocore: {e}\n{}", agent.logs().unwrap()));
        assert!(creds.access_key_id.starts_with("ASIA"), "{case}: {creds:?}");
        assert!(agent.stop().unwrap().success(), "{case}");
    }
    let handshakes = tls.handshakes();
    assert!(
        handshakes >= 2,
        "EKS Auth was reached over TLS: {handshakes} handshakes"
    );

    // The control: the image's own bundle, no mount.
    let (agent, _) = start_from_image(
        &rootfs,
        &node,
        &fake,
        Launch::new(tls.endpoint(), image_env),
    )
    .unwrap();
    let (status, calls) = one_request(&pod, &fake);
    let logs = agent.logs().unwrap();
    assert!(status >= 500, "an unknown CA is refused: {status}\n{logs}");
    assert_eq!(calls, 0, "no call got through:\n{logs}");
    assert_eq!(tls.handshakes(), handshakes, "no handshake completed");
}

/// Hybrid nodes: the original's hybrid DaemonSets pass `--rotate-credentials true` and mount the
/// node's `.aws` directory at `/root/.aws`, and set no `AWS_SHARED_CREDENTIALS_FILE` nor any key in
/// the environment. The agent from the image finds `/root/.aws/credentials` through the image's
/// `HOME` and signs EKS Auth calls with that key. Without `HOME` (the image before it had one) the
/// SDK looks for `/.aws/credentials` and the pod is not served.
#[test]
fn on_a_hybrid_node_the_agent_from_the_image_signs_with_roots_aws_credentials() {
    if !e2e::privileged(
        "on_a_hybrid_node_the_agent_from_the_image_signs_with_roots_aws_credentials",
    ) {
        return;
    }
    const NODE_KEY: &str = "AKIAE2EHYBRIDIMAGE01";
    let rootfs = ImageRootfs::open().unwrap();
    let (node, fake, [pod]) = node_with_web_pods("e2e-image-hybrid", ["web-0"]).unwrap();
    let aws = rootfs.root.join("root/.aws");
    std::fs::create_dir_all(&aws).unwrap();
    write_credentials_file(&aws.join("credentials"), NODE_KEY, "hybrid-image-secret").unwrap();
    let image_env = rootfs.env().unwrap();
    assert!(
        !image_env.iter().any(|(k, _)| k.starts_with("AWS_")),
        "{image_env:?}"
    );
    let hybrid = |env| Launch {
        extra: &["--rotate-credentials", "true"],
        env_credentials: false,
        ..Launch::new(fake.endpoint(), env)
    };

    let (agent, _) = start_from_image(&rootfs, &node, &fake, hybrid(image_env.clone())).unwrap();
    pod.refresh_token(&fake).unwrap();
    let creds = pod
        .fetch_with_botocore(CREDENTIALS_URI_V4)
        .unwrap()
        .unwrap_or_else(|e| panic!("botocore: {e}\n{}", agent.logs().unwrap()));
    assert!(creds.access_key_id.starts_with("ASIA"), "{creds:?}");
    let signed_with = fake
        .last_request()
        .and_then(|r| r.header("authorization").map(str::to_owned))
        .unwrap_or_default();
    assert!(
        signed_with.contains(&format!("Credential={NODE_KEY}/")),
        "signed with the node's key: {signed_with}"
    );
    assert!(agent.stop().unwrap().success());

    // The control: the same container without HOME.
    let without_home = image_env.into_iter().filter(|(k, _)| k != "HOME").collect();
    let (agent, _) = start_from_image(&rootfs, &node, &fake, hybrid(without_home)).unwrap();
    let (status, calls) = one_request(&pod, &fake);
    assert!(
        status >= 500,
        "no credentials without HOME: {status}\n{}",
        agent.logs().unwrap()
    );
    assert_eq!(calls, 0);
}
