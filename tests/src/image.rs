//! The container image as `cargo xtask image` builds it, opened for tests: a platform's root
//! filesystem (a buildah working container, mounted), its config, and the manifest list.
//!
//! Containers cannot be run on these machines (podman/crun fail in hybrid cgroup mode), so the
//! image is tested through its root filesystem. Nothing here builds the image.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// The image's manifest list (one image per platform), as `cargo xtask image` tags it.
pub const IMAGE: &str = "localhost/eks-pod-identity-agent:latest";
/// The workspace's version, which `cargo xtask image` labels and tags the image with.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// Working containers of these tests: `<prefix><pid>-<n>`.
const CONTAINER_PREFIX: &str = "e2e-image-";

/// One platform's root filesystem of [`IMAGE`]: a buildah working container, mounted. Unmounted and
/// removed on drop, so a test may change it (add or remove files) without touching the image.
pub struct ImageRootfs {
    container: String,
    /// Where the root filesystem is mounted.
    pub root: PathBuf,
    arch: String,
}

impl ImageRootfs {
    /// This machine's platform of [`IMAGE`] (what `buildah from` picks from the list).
    pub fn open() -> Result<Self> {
        Self::open_arch(None)
    }

    /// The `linux/<arch>` image of [`IMAGE`]'s manifest list (`buildah from --arch`).
    pub fn open_platform(arch: &str) -> Result<Self> {
        Self::open_arch(Some(arch))
    }

    /// `buildah from` + `buildah mount`. Fails (never skips) when buildah or the image is missing.
    fn open_arch(arch: Option<&str>) -> Result<Self> {
        if Command::new("buildah").arg("--version").output().is_err() {
            bail!("buildah not found: run `cargo xtask setup` (Debian package buildah)");
        }
        if buildah(&["inspect", "--type", "image", IMAGE]).is_err() {
            bail!("the image {IMAGE} is missing: run `cargo xtask image` first");
        }
        remove_leftover_containers();
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let container = format!("{CONTAINER_PREFIX}{}-{n}", std::process::id());
        let mut args = vec!["from", "--quiet", "--pull-never", "--name", &container];
        if let Some(arch) = arch {
            args.extend(["--arch", arch]);
        }
        args.push(IMAGE);
        buildah(&args)?;
        // From here on, drop removes the container whatever fails.
        let mut rootfs = Self {
            container,
            root: PathBuf::new(),
            arch: String::new(),
        };
        rootfs.root = PathBuf::from(buildah(&["mount", &rootfs.container])?.trim());
        rootfs.arch = rootfs.config_and_platform()?.1;
        if let Some(arch) = arch
            && rootfs.arch != arch
        {
            bail!(
                "`buildah from --arch {arch} {IMAGE}` gave a linux/{} image",
                rootfs.arch
            );
        }
        Ok(rootfs)
    }

    /// The working container's name (unique per test process and call).
    #[must_use]
    pub fn name(&self) -> &str {
        &self.container
    }

    /// The image's platform architecture (`amd64`, `arm64`).
    #[must_use]
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// The image's config (`.OCIv1.config`: Entrypoint, Cmd, Env, Labels) for this container's
    /// image.
    pub fn config(&self) -> Result<Value> {
        Ok(self.config_and_platform()?.0)
    }

    fn config_and_platform(&self) -> Result<(Value, String)> {
        // buildah 1.28's templates have no `json` function: the whole inspection, then the part.
        let text = buildah(&["inspect", "--type", "container", &self.container])?;
        let inspect: Value =
            serde_json::from_str(&text).context("`buildah inspect` did not print JSON")?;
        let oci = &inspect["OCIv1"];
        let arch = oci["architecture"].as_str().unwrap_or_default().to_owned();
        Ok((oci["config"].clone(), arch))
    }

    /// The image's `Env`, as `(name, value)` pairs.
    pub fn env(&self) -> Result<Vec<(String, String)>> {
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

/// The `(os, architecture)` of every entry of [`IMAGE`]'s manifest list
/// (`buildah manifest inspect`).
pub fn manifest_platforms() -> Result<Vec<(String, String)>> {
    let text = buildah(&["manifest", "inspect", IMAGE])?;
    let list: Value =
        serde_json::from_str(&text).context("`buildah manifest inspect` did not print JSON")?;
    let Some(entries) = list["manifests"].as_array() else {
        bail!("{IMAGE} is not a manifest list: {text}");
    };
    Ok(entries
        .iter()
        .map(|m| {
            let field = |k: &str| m["platform"][k].as_str().unwrap_or_default().to_owned();
            (field("os"), field("architecture"))
        })
        .collect())
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
pub fn buildah(args: &[&str]) -> Result<String> {
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

/// Where `cargo xtask image` writes the SBOM of the `linux/<arch>` binary.
#[must_use]
pub fn sbom_path(arch: &str) -> PathBuf {
    // As cargo (and xtask) read it: relative to the workspace root.
    let target = crate::workspace_root()
        .join(std::env::var_os("CARGO_TARGET_DIR").unwrap_or_else(|| "target".into()));
    target
        .join("image")
        .join(format!("eks-pod-identity-agent-{VERSION}-{arch}.cdx.json"))
}
