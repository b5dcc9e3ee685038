//! End-to-end harness for the EKS Pod Identity Agent.
//!
//! Map of the modules:
//! - [`netns`]: network namespaces (create, delete, run code inside one), veth pairs, leftover cleanup;
//! - [`cgroup`]: the cgroup2 mount, kubelet-shaped pod cgroup paths, per-node test roots;
//! - [`node`]: [`node::SimNode`] (a node namespace) and [`node::Pod`]s joined to it, run commands as a pod;
//! - [`fake_eks_auth`]: EKS Auth's wire format, the token issuer, fault injection, call observation;
//! - [`fake_kube_api`]: a stand-in Kubernetes API (nodes and Events, real JSON, bearer token, faults);
//! - [`clients`]: the real SDK clients run as a pod, and raw HTTP for inputs no SDK would send;
//! - [`burst`]: many pods' first credential requests at once, each with botocore's own retry policy;
//! - [`agent`]: the agent binary run inside a node, its probes, metrics and logs; and
//!   [`agent::node_with_web_pods`], the node + fake EKS Auth + pods most tests open with;
//! - [`image`]: the container image's root filesystem per platform, its config, the manifest list;
//! - [`tls`]: a test CA and a TLS stand-in for EKS Auth in front of the fake.
//!
//! Privileged tests start with `if !e2e::privileged("name") { return; }`: outside CI a machine without root
//! or the kernel features skips them; under `CI=true` the same situation fails the test.

pub mod agent;
pub mod burst;
pub mod cgroup;
pub mod clients;
pub mod cluster_keys;
pub mod fake_eks_auth;
pub mod fake_kube_api;
pub mod image;
pub mod netns;
pub mod node;
pub mod tls;

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

/// Whether privileged end-to-end tests can run here.
///
/// Returns `false` (after printing why) when they cannot and `CI` is not `true`; panics when they cannot and
/// `CI=true`, because CI must never silently skip them.
///
/// # Panics
/// When something is missing and `CI=true`.
#[must_use]
pub fn privileged(test: &str) -> bool {
    let problems = missing_privileges();
    if problems.is_empty() {
        return true;
    }
    let why = problems.join("; ");
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: cannot run privileged end-to-end test under CI=true: {why}");
    }
    eprintln!("SKIPPED {test}: {why} (set CI=true to make this a failure)");
    false
}

fn missing_privileges() -> Vec<String> {
    let mut problems = Vec::new();
    if !nix::unistd::geteuid().is_root() {
        problems.push("not root".to_owned());
    }
    if let Err(e) = cgroup::cgroup2_mount() {
        problems.push(format!("{e:#}"));
    }
    if std::process::Command::new("ip").arg("-V").output().is_err() {
        problems.push("`ip` (iproute2) not found".to_owned());
    }
    problems
}

/// Finds a binary: `$<env_var>` if set, else `<name>` in the target directory of the running executable
/// (`target/<profile>/` for both binaries and tests), else `<workspace>/target/debug/<name>`.
pub fn locate_binary(env_var: &str, name: &str, hint: &str) -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(env_var) {
        let path = PathBuf::from(path);
        if path.is_file() {
            return Ok(path);
        }
        bail!(
            "${env_var} points at {}, which does not exist",
            path.display()
        );
    }
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        // target/debug/demo, or target/debug/deps/<test>-<hash>
        for dir in exe.ancestors().skip(1).take(2) {
            candidates.push(dir.join(name));
        }
    }
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        candidates.push(Path::new(&dir).join("debug").join(name));
    }
    candidates.push(workspace_root().join("target/debug").join(name));
    match candidates.iter().find(|p| p.is_file()) {
        Some(found) => Ok(found.clone()),
        None => bail!("{name} not found (looked at {candidates:?}; or set ${env_var}): {hint}"),
    }
}

/// The workspace root (the parent of this crate's directory).
#[must_use]
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map_or_else(|| manifest.to_path_buf(), Path::to_path_buf)
}

/// Polls `condition` every 20 ms until it holds or `timeout` passes; returns whether it held.
pub fn wait_for(timeout: std::time::Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The first header of that name (case-insensitive) in a list of `(name, value)` pairs.
#[must_use]
pub fn find_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}
