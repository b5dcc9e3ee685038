//! `cargo xtask image`: the container image for linux/amd64 and linux/arm64, built offline.
//!
//! For each platform ([`platform::PLATFORMS`]) the agent is built as one static binary (musl,
//! [`Profile::Release`], or [`Profile::Ci`] in `cargo xtask test`; cross-compiled with `cargo zigbuild` for the CPU this machine is not) and put in an
//! image `FROM scratch` with buildah, tagged `<version>-<arch>`: no base image is pulled, so no
//! registry is needed. Each image holds exactly:
//!
//! - `/eks-pod-identity-agent`, the binary;
//! - `/go-runner`, a hard link to it (started under that name it acts as Kubernetes' go-runner,
//!   the entrypoint the original's chart and the add-on put in front of every command);
//! - `/etc/pki/tls/certs/ca-bundle.crt`, the build host's CA bundle (Debian `ca-certificates`),
//!   for EKS Auth over TLS: where the original chart mounts the node's bundle (the Go agent reads it
//!   as its system roots), named by `SSL_CERT_FILE`, so that the mount replaces it; and
//!   `/etc/ssl/certs/ca-certificates.crt`, a symbolic link to it;
//! - `/etc/passwd`, `/etc/group` and `/root`: root's home, as in the Go image's base; `HOME=/root`
//!   in the environment, where the AWS SDK finds `~/.aws` (hybrid nodes mount theirs there).
//!
//! Entrypoint `["/go-runner"]`, command `["/eks-pod-identity-agent", "server"]`: what the chart
//! passes (`/go-runner /eks-pod-identity-agent server …`) works as a `command`, and `args` alone
//! run the server. The two images are assembled into one manifest list under each of the tags
//! `localhost/eks-pod-identity-agent:<version>` and `:latest` (a pull, or `buildah from`, picks the
//! node's platform). Beside them, in `target/image/`, a CycloneDX SBOM per platform of the crates
//! in its binary ([`sbom`]).

mod binary;
mod manifest;
mod platform;
mod rootfs;
mod sbom;

use std::path::PathBuf;
use std::time::{Instant, SystemTime};

use anyhow::{Context as _, Result, bail};

pub use platform::PLATFORMS;

use crate::setup;
use crate::util::{self, output};

/// The image's repository in local container storage.
pub const IMAGE: &str = "localhost/eks-pod-identity-agent";
/// The workspace's version (xtask inherits `workspace.package.version`).
const VERSION: &str = env!("CARGO_PKG_VERSION");
/// Where the CA bundle is in the image (and `SSL_CERT_FILE`).
const CA_BUNDLE: &str = "/etc/pki/tls/certs/ca-bundle.crt";
/// Debian's path of the bundle, a symbolic link to [`CA_BUNDLE`] in the image.
const LEGACY_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// The image label naming the cargo profile its executable was built with ([`Profile::name`]).
pub const PROFILE_LABEL: &str = "io.eks-pod-identity-agent.build-profile";
/// The binary's name, in `target/` and at the image's root.
const AGENT: &str = "eks-pod-identity-agent";

/// The cargo profile the image's executables are built with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// `release`: what ships (`cargo xtask image`, the benches).
    Release,
    /// `ci-image` (Cargo.toml): the same code without the whole-program optimisation, for
    /// `cargo xtask test`, whose image tests check what the image holds and that it runs.
    Ci,
}

impl Profile {
    /// The largest image accepted, per platform: the sum of its (uncompressed) layers. The
    /// shipped image's bound is the one that matters; the test image's only catches a runaway.
    pub fn max_image_bytes(self) -> u64 {
        match self {
            Profile::Release => 40 * 1000 * 1000,
            Profile::Ci => 200 * 1000 * 1000,
        }
    }

    /// Its name for cargo's `--profile`, and its directory under `target/<triple>/`.
    pub fn name(self) -> &'static str {
        match self {
            Profile::Release => "release",
            Profile::Ci => "ci-image",
        }
    }
}

pub fn run() -> Result<()> {
    util::require_root("buildah keeps images in root's container storage and mounts them")?;
    setup::run()?;
    build(Profile::Release)
}

/// Builds every platform's image with `profile`, once each, and the manifest lists (root and
/// setup already checked by the caller).
pub fn build(profile: Profile) -> Result<()> {
    let started = Instant::now();
    let commit = commit();
    let timestamp = timestamp();
    let out_dir = util::target_dir().join("image");
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let mut summary = Vec::new();
    for platform in PLATFORMS {
        let platform_started = Instant::now();
        let binary = binary::build(platform, &commit, profile)?;
        binary::check(platform, &binary, &commit)?;
        let id = rootfs::assemble(platform, &binary, &commit, timestamp, profile)?;
        let size = rootfs::image_size(&id)?;
        let sbom = out_dir.join(format!("{AGENT}-{VERSION}-{}.cdx.json", platform.arch));
        sbom::write(platform, &sbom)?;
        summary.push(format!(
            "  linux/{}: {} image {}, {size} bytes ({:.1} MB), in {:.0?}; SBOM {}",
            platform.arch,
            rootfs::tag(platform),
            &id[..id.len().min(12)],
            size as f64 / 1e6,
            platform_started.elapsed(),
            sbom.display()
        ));
        if size > profile.max_image_bytes() {
            bail!(
                "the linux/{} image is {size} bytes, more than the {} allowed: what \
                 grew? (`buildah inspect {}`)",
                platform.arch,
                profile.max_image_bytes(),
                rootfs::tag(platform)
            );
        }
    }
    let lists = [format!("{IMAGE}:{VERSION}"), format!("{IMAGE}:latest")];
    for list in &lists {
        manifest::publish(list, &PLATFORMS)?;
    }
    println!(
        "xtask image: {} (manifest lists of {}), commit {commit}, profile {}, in {:.0?}",
        lists.join(" and "),
        PLATFORMS.map(|p| format!("linux/{}", p.arch)).join(", "),
        profile.name(),
        started.elapsed()
    );
    for line in summary {
        println!("{line}");
    }
    Ok(())
}

/// The commit baked into the binary and the image's revision label: `EKS_POD_IDENTITY_AGENT_COMMIT`
/// when set (as the agent's build script takes it), else git's HEAD. Resolved once here so that the
/// binary and the label cannot disagree.
fn commit() -> String {
    std::env::var("EKS_POD_IDENTITY_AGENT_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| git(&["rev-parse", "HEAD"]))
        .unwrap_or_else(|| "unknown".to_owned())
}

fn git(args: &[&str]) -> Option<String> {
    let mut full = vec!["-C", util::workspace_root().to_str()?];
    full.extend_from_slice(args);
    output("git", &full).map(|s| s.trim().to_owned())
}

/// The image's creation time, and the files' modification times: `SOURCE_DATE_EPOCH` when set,
/// else the commit's time, so that rebuilding an unchanged tree gives the same image (same id, no
/// dangling copies piling up in storage); now when neither is known.
fn timestamp() -> u64 {
    let from_env = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.trim().parse().ok());
    from_env
        .or_else(|| git(&["log", "-1", "--format=%ct"]).and_then(|s| s.parse().ok()))
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        })
}

/// The image's binary for this machine's CPU, built (for the bench's footprint of what the image
/// runs).
pub fn static_agent() -> Result<PathBuf> {
    let Some(host) = platform::Platform::host() else {
        bail!(
            "the image has no platform for this machine's CPU ({})",
            std::env::consts::ARCH
        );
    };
    binary::build(host, &commit(), Profile::Release)
}
