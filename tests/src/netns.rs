//! Network namespaces for the simulated node and its pods.
//!
//! Namespaces are created with `ip netns add` (so they are visible under `/run/netns` and usable with
//! `ip netns exec`), named `e2e-<pid>-<counter>` so that parallel tests and parallel test processes never
//! collide, and deleted on drop. [`cleanup_leftovers`] removes what a crashed earlier run left behind.
//!
//! [`NetNs::run`] runs a closure on a fresh thread that has `setns()`'d into the namespace: the test process
//! can bind a listener or connect a socket *inside* the namespace, and the socket keeps its namespace after
//! the thread ends.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result, bail};
use nix::sched::{CloneFlags, setns};

/// Prefix of every namespace, cgroup and temporary directory the harness creates.
pub const PREFIX: &str = "e2e-";

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A name unique across threads of this process and across processes: `e2e-<pid>-<counter>`.
#[must_use]
pub fn unique_name() -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{PREFIX}{}-{n}", std::process::id())
}

/// The pid encoded in a name made by [`unique_name`], if any.
fn owner_pid(name: &str) -> Option<u32> {
    name.strip_prefix(PREFIX)?.split('-').next()?.parse().ok()
}

/// Whether a name made by [`unique_name`] belongs to a process that no longer exists.
pub(crate) fn is_leftover(name: &str) -> bool {
    match owner_pid(name) {
        Some(pid) => pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists(),
        None => false,
    }
}

/// Runs `ip <args>` and fails with its stderr if it exits non-zero.
pub fn ip(args: &[&str]) -> Result<()> {
    run_checked(Command::new("ip").args(args))
}

/// Runs a command to completion and fails with its stderr if it exits non-zero.
pub(crate) fn run_checked(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A network namespace created with `ip netns add`, deleted on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates a namespace with a unique name and brings its loopback up.
    pub fn create() -> Result<Self> {
        let name = unique_name();
        ip(&["netns", "add", &name]).context("creating a network namespace (are you root?)")?;
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name, as `ip netns` knows it.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bind-mounted namespace file, `/run/netns/<name>`.
    #[must_use]
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// Runs `ip -n <name> <args>`.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// Sets a sysctl inside the namespace (`key` in dotted form, e.g. `net.ipv6.conf.all.accept_dad`).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let setting = format!("{key}={value}");
        run_checked(
            Command::new("ip").args(["netns", "exec", &self.name, "sysctl", "-q", "-w", &setting]),
        )
    }

    /// Runs `f` on a new thread that has joined this namespace, and returns its result.
    ///
    /// Sockets created by `f` stay in this namespace for their whole life, so a listener bound here can be
    /// served from any thread or task afterwards.
    pub fn run<F, T>(&self, f: F) -> Result<T>
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        let file = File::open(self.path())
            .with_context(|| format!("opening {}", self.path().display()))?;
        std::thread::scope(|scope| {
            scope
                .spawn(move || -> Result<T> {
                    // Only this thread changes namespace; the CLONE_NEWNET setns is per thread.
                    setns(&file, CloneFlags::CLONE_NEWNET).context("setns(CLONE_NEWNET)")?;
                    Ok(f())
                })
                .join()
                .map_err(|_| {
                    anyhow::anyhow!("the thread running inside netns {} panicked", self.name)
                })?
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace also deletes the veth ends inside it, and so their peers.
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// Creates a veth pair with one end in each namespace (`ip link add .. netns .. type veth peer ..`).
///
/// Both ends are created directly in their namespaces, so their names only need to be unique there.
pub fn veth_pair(a: &NetNs, a_name: &str, b: &NetNs, b_name: &str) -> Result<()> {
    ip(&[
        "link",
        "add",
        a_name,
        "netns",
        a.name(),
        "type",
        "veth",
        "peer",
        "name",
        b_name,
        "netns",
        b.name(),
    ])
    .with_context(|| {
        format!(
            "creating veth {a_name}@{} <-> {b_name}@{}",
            a.name(),
            b.name()
        )
    })
}

/// Removes namespaces, cgroups and temporary directories left by harness processes that no longer exist.
///
/// Safe to call from every test: objects of live processes (including this one) are left alone.
pub fn cleanup_leftovers() {
    if let Ok(entries) = std::fs::read_dir("/run/netns") {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if is_leftover(&name) {
                let _ = ip(&["netns", "del", &name]);
            }
        }
    }
    crate::cgroup::cleanup_leftovers();
    if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
        for entry in entries.flatten() {
            if is_leftover(&entry.file_name().to_string_lossy()) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}
