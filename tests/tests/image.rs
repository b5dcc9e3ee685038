//! The container image end to end: `localhost/eks-pod-identity-agent:latest`, as `cargo xtask image`
//! builds it (this test builds nothing).
//!
//! Containers cannot be run on these machines (podman/crun fail in hybrid cgroup mode), so the image
//! is tested through its root filesystem (`buildah from` + `buildah mount`): it holds the binary,
//! `/go-runner` and the CA bundle and nothing else, and the agent run from it with `chroot`, through
//! go-runner with the chart's command, serves a pod's botocore — attributed by the kernel, with the
//! mounts the DaemonSet gives the container (its own /proc and /sys, the host's cgroup v2 tree at
//! /sys/fs/cgroup read-only, the audit log directory), set up in a private mount namespace that
//! vanishes with the agent.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use e2e::agent::{AgentArgs, AgentProcess, Verbatim, node_with_web_pods, wait_audit_records};
use e2e::clients::RawRequest;
use e2e::fake_eks_auth::FakeEksAuth;
use e2e::node::{AGENT_V4, CREDENTIALS_URI_V4, Pod, SimNode};
use serde_json::Value;

const IMAGE: &str = "localhost/eks-pod-identity-agent:latest";
/// The workspace's version, which `cargo xtask image` labels and tags the image with.
const VERSION: &str = env!("CARGO_PKG_VERSION");
const CA_BUNDLE: &str = "etc/ssl/certs/ca-certificates.crt";
/// Where the DaemonSet mounts the audit log's host directory.
const AUDIT_DIR: &str = "var/log/eks-pod-identity-agent";
/// Working containers of this test: `<prefix><pid>-<n>`.
const CONTAINER_PREFIX: &str = "e2e-image-";

/// The image's root filesystem: a buildah working container, mounted. Unmounted and removed on drop.
struct ImageRootfs {
    container: String,
    root: PathBuf,
}

impl ImageRootfs {
    /// `buildah from` + `buildah mount` of [`IMAGE`]. Fails (never skips) when buildah or the image
    /// is missing.
    fn open() -> Result<Self> {
        if Command::new("buildah").arg("--version").output().is_err() {
            bail!("buildah not found: run `cargo xtask setup` (Debian package buildah)");
        }
        if buildah(&["inspect", "--type", "image", IMAGE]).is_err() {
            bail!("the image {IMAGE} is missing: run `cargo xtask image` first");
        }
        remove_leftover_containers();
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let container = format!("{CONTAINER_PREFIX}{}-{n}", std::process::id());
        buildah(&[
            "from",
            "--quiet",
            "--pull-never",
            "--name",
            &container,
            IMAGE,
        ])?;
        // From here on, drop removes the container whatever fails.
        let mut rootfs = Self {
            container,
            root: PathBuf::new(),
        };
        rootfs.root = PathBuf::from(buildah(&["mount", &rootfs.container])?.trim());
        Ok(rootfs)
    }

    /// The image's config (`.OCIv1.config`: Entrypoint, Cmd, Env, Labels).
    fn config(&self) -> Result<Value> {
        // buildah 1.28's templates have no `json` function: the whole inspection, then the part.
        let text = buildah(&["inspect", "--type", "image", IMAGE])?;
        let inspect: Value =
            serde_json::from_str(&text).context("`buildah inspect` did not print JSON")?;
        Ok(inspect["OCIv1"]["config"].clone())
    }

    /// The image's `Env`, as `(name, value)` pairs.
    fn env(&self) -> Result<Vec<(String, String)>> {
        let config = self.config()?;
        Ok(config["Env"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .filter_map(|e| e.as_str()?.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect())
    }
}

impl Drop for ImageRootfs {
    fn drop(&mut self) {
        let _ = buildah(&["umount", &self.container]);
        let _ = buildah(&["rm", &self.container]);
    }
}

/// Removes working containers of test processes that no longer exist.
fn remove_leftover_containers() {
    let Ok(names) = buildah(&[
        "containers",
        "--noheading",
        "--format",
        "{{.ContainerName}}",
    ]) else {
        return;
    };
    for name in names.lines().map(str::trim) {
        let pid = name
            .strip_prefix(CONTAINER_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok());
        if let Some(pid) = pid
            && pid != std::process::id()
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = buildah(&["rm", name]);
        }
    }
}

/// Runs `buildah <args>`: its stdout, or an error with its stderr.
fn buildah(args: &[&str]) -> Result<String> {
    let out = Command::new("buildah")
        .args(args)
        .output()
        .context("running buildah")?;
    if !out.status.success() {
        bail!(
            "`buildah {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

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
fn the_image_holds_the_static_binary_go_runner_and_the_ca_bundle_only() {
    if !e2e::privileged("the_image_holds_the_static_binary_go_runner_and_the_ca_bundle_only") {
        return;
    }
    let rootfs = ImageRootfs::open().unwrap();
    let root = &rootfs.root;

    let mut entries = Vec::new();
    walk(root, root, &mut entries);
    let files: BTreeSet<String> = entries
        .iter()
        .filter(|(_, m)| !m.is_dir())
        .map(|(p, _)| p.display().to_string())
        .collect();
    assert_eq!(
        files,
        BTreeSet::from([
            "eks-pod-identity-agent".to_owned(),
            "go-runner".to_owned(),
            CA_BUNDLE.to_owned(),
        ]),
        "the image's files (besides directories)"
    );
    let dirs: BTreeSet<String> = entries
        .iter()
        .filter(|(_, m)| m.is_dir())
        .map(|(p, _)| p.display().to_string())
        .collect();
    assert_eq!(
        dirs,
        BTreeSet::from(["etc".into(), "etc/ssl".into(), "etc/ssl/certs".into()]),
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
    let size: u64 = agent.len() + bundle.len() as u64;
    assert!(size < 40_000_000, "the image's content is {size} bytes");

    // Static: it runs in a root filesystem with no loader and no libc, as itself and as go-runner.
    let config = rootfs.config().unwrap();
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
    assert!(
        rootfs
            .env()
            .unwrap()
            .contains(&("SSL_CERT_FILE".into(), format!("/{CA_BUNDLE}"))),
        "{config}"
    );
}

/// `sh` + `unshare` + `sh` + `chroot` in front of the image's argv, as a DaemonSet container runs:
/// in a cgroup of its own (`<node root>/agent-container`) and a private cgroup namespace rooted
/// there, as containerd starts containers on cgroup v2, and in a private mount namespace with the
/// mounts the chart gives the container (proc, sys, the node's cgroup2 hierarchy read-only at
/// /sys/fs/cgroup — which the agent then sees through its namespace as `/..`-rooted — and the
/// audit directory), then `chroot` into the image. The mounts go with the namespace when the agent
/// exits; the mount points are created in the working container only.
fn container_wrapper(rootfs: &ImageRootfs, node: &SimNode, audit_dir: &Path) -> Vec<OsString> {
    const ENTER: &str = r#"echo $$ > "$0" &&
exec unshare --cgroup --mount --propagation private -- sh -c "$@""#;
    const SCRIPT: &str = r#"root="$0" cgroup2="$1" audit="$2"; shift 2
mount -t proc proc "$root/proc" &&
mount -t sysfs sysfs "$root/sys" &&
mount --bind "$cgroup2" "$root/sys/fs/cgroup" &&
mount -o remount,bind,ro "$root/sys/fs/cgroup" &&
mount --bind "$audit" "$root/var/log/eks-pod-identity-agent" &&
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

/// Runs `initialize` and `server` from the image as the chart does, in the container's mounts, with
/// the environment `env` (the image's config, or a variation of it) instead of the test's `SSL_*`.
fn start_from_image(
    rootfs: &ImageRootfs,
    node: &SimNode,
    fake: &FakeEksAuth,
    endpoint: &str,
    extra: &[&str],
    env: Vec<(String, String)>,
) -> Result<(AgentProcess, PathBuf)> {
    let audit_dir = node.dir().join(format!("audit-{}", rootfs.container));
    std::fs::create_dir_all(&audit_dir)?;
    let env_remove = ["SSL_CERT_FILE", "SSL_CERT_DIR"]
        .into_iter()
        .filter(|var| !env.iter().any(|(k, _)| k == var))
        .map(str::to_owned)
        .collect();
    let args = AgentArgs {
        wrapper: container_wrapper(rootfs, node, &audit_dir),
        verbatim: Some(chart_argv(node, fake.cluster(), endpoint, extra)),
        env,
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
    let (agent, audit_log) = start_from_image(
        &rootfs,
        &node,
        &fake,
        &fake.endpoint(),
        &["--token-binding", "enforce"],
        rootfs.env().unwrap(),
    )
    .unwrap();

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

/// What the SDK's HTTPS client logs when it finds no CA certificate to trust.
const NO_ROOTS: &[&str] = &[
    "no native root CA certificates found",
    "native root CA certificate loading errors",
];

/// Has the agent call EKS Auth over TLS once (at the fake's port, which answers in plain HTTP: the
/// handshake fails after the client loaded its roots) and returns the agent's log.
fn tls_call_log(
    rootfs: &ImageRootfs,
    node: &SimNode,
    fake: &FakeEksAuth,
    pod: &Pod,
    env: Vec<(String, String)>,
) -> String {
    let endpoint = format!("https://{}", fake.addr());
    let (agent, _) = start_from_image(rootfs, node, fake, &endpoint, &[], env).unwrap();
    let token = pod.refresh_token(fake).unwrap();
    let request = RawRequest::get("/v1/credentials")
        .host("169.254.170.23")
        .authorization(&token)
        .to_bytes();
    let r = pod
        .raw_http(
            SocketAddr::from((AGENT_V4, 80)),
            &request,
            Duration::from_secs(5),
        )
        .unwrap();
    let logs = agent.logs().unwrap();
    assert!(
        r.status >= 500,
        "EKS Auth over TLS to a plain-HTTP port fails: {} {}\n{logs}",
        r.status,
        r.body_text()
    );
    assert_eq!(fake.calls_for_token(&token), 0, "no call got through");
    logs
}

#[test]
fn the_agent_from_the_image_finds_the_ca_bundle_for_eks_auth_over_tls() {
    if !e2e::privileged("the_agent_from_the_image_finds_the_ca_bundle_for_eks_auth_over_tls") {
        return;
    }
    let rootfs = ImageRootfs::open().unwrap();
    let (node, fake, [pod]) = node_with_web_pods("e2e-image-tls", ["web-0"]).unwrap();
    let image_env = rootfs.env().unwrap();

    // With the image's SSL_CERT_FILE, and without it (where rustls-native-certs looks by itself).
    let without: Vec<_> = image_env
        .iter()
        .filter(|(k, _)| k != "SSL_CERT_FILE")
        .cloned()
        .collect();
    for (case, env) in [
        ("image env", image_env.clone()),
        ("no SSL_CERT_FILE", without),
    ] {
        let logs = tls_call_log(&rootfs, &node, &fake, &pod, env);
        for warning in NO_ROOTS {
            assert!(!logs.contains(warning), "{case}: {warning}:\n{logs}");
        }
    }

    // The control: the same with the bundle taken out of this working container (not the image).
    std::fs::remove_file(rootfs.root.join(CA_BUNDLE)).unwrap();
    let logs = tls_call_log(&rootfs, &node, &fake, &pod, image_env);
    assert!(
        NO_ROOTS.iter().any(|w| logs.contains(w)),
        "without the bundle the SDK says it found no CA certificate:\n{logs}"
    );
}
