//! `cargo xtask image`: the container image, built offline.
//!
//! The agent is built as one static binary (`x86_64-unknown-linux-musl`, release) and put in an
//! image `FROM scratch` with buildah: no base image is pulled, so no registry is needed. The image
//! holds exactly:
//!
//! - `/eks-pod-identity-agent`, the binary;
//! - `/go-runner`, a hard link to it (started under that name it acts as Kubernetes' go-runner,
//!   the entrypoint the original's chart and the add-on put in front of every command);
//! - `/etc/ssl/certs/ca-certificates.crt`, the build host's CA bundle (Debian `ca-certificates`),
//!   for EKS Auth over TLS. That path is the first file rustls-native-certs (through
//!   openssl-probe) looks for, and `SSL_CERT_FILE` names it as well.
//!
//! Entrypoint `["/go-runner"]`, command `["/eks-pod-identity-agent", "server"]`: what the chart
//! passes (`/go-runner /eks-pod-identity-agent server …`) works as a `command`, and `args` alone
//! run the server. Tagged `localhost/eks-pod-identity-agent:latest` and `:<version>`.

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, anyhow, bail};

use crate::setup::{self, MUSL_TARGET};
use crate::util::{self, output};

/// The image's repository in local container storage.
pub const IMAGE: &str = "localhost/eks-pod-identity-agent";
/// The workspace's version (xtask inherits `workspace.package.version`).
const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The largest image accepted: the sum of its (uncompressed) layers.
const MAX_IMAGE_BYTES: u64 = 40 * 1000 * 1000;
/// Where the CA bundle is on the build host and in the image.
const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// The binary's name, in `target/` and at the image's root.
const AGENT: &str = "eks-pod-identity-agent";

pub fn run() -> Result<()> {
    util::require_root("buildah keeps images in root's container storage and mounts them")?;
    setup::run()?;
    build()
}

/// Builds and tags the image (root and setup already checked by the caller).
pub fn build() -> Result<()> {
    let started = std::time::Instant::now();
    let commit = commit();
    let binary = build_static_agent(&commit)?;
    check_binary(&binary, &commit)?;
    let id = assemble(&binary, &commit)?;
    let size = image_size(&id)?;
    println!(
        "xtask image: {IMAGE}:{VERSION} and :latest, image {}, {} bytes ({:.1} MB), commit {commit}, in {:.0?}",
        &id[..id.len().min(12)],
        size,
        size as f64 / 1e6,
        started.elapsed()
    );
    if size > MAX_IMAGE_BYTES {
        bail!(
            "the image is {size} bytes, more than the {MAX_IMAGE_BYTES} allowed: what grew? \
             (`buildah inspect {IMAGE}:latest`)"
        );
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

/// The image's binary, built (for the bench's footprint of what the image runs).
pub fn static_agent() -> Result<PathBuf> {
    build_static_agent(&commit())
}

/// `cargo build --release --target x86_64-unknown-linux-musl -p eks-pod-identity-agent`.
///
/// Rust's musl target links statically by default (`+crt-static`, with its own copy of musl's
/// libc and crt objects); the C code in the tree (aws-lc-sys for rustls' crypto, libmimalloc-sys)
/// is compiled by cc-rs, which needs a C compiler for musl: Debian's `musl-gcc` (musl-tools).
/// The eBPF object is target-independent (the build script builds it on nightly for the BPF
/// target).
fn build_static_agent(commit: &str) -> Result<PathBuf> {
    let cc_var = format!("CC_{}", MUSL_TARGET.replace('-', "_"));
    let cc = std::env::var_os(&cc_var).unwrap_or_else(|| "musl-gcc".into());
    if std::env::var_os(&cc_var).is_none() && output("musl-gcc", &["--version"]).is_none() {
        bail!("musl-gcc not found: run `cargo xtask setup` (Debian package musl-tools)");
    }
    let env: [(&str, &OsStr); 2] = [
        (&cc_var, &cc),
        ("EKS_POD_IDENTITY_AGENT_COMMIT", OsStr::new(commit)),
    ];
    util::cargo(
        &[
            "build",
            "--release",
            "--target",
            MUSL_TARGET,
            "-p",
            "eks-pod-identity-agent",
        ],
        &env,
    )?;
    let bin = util::target_dir()
        .join(MUSL_TARGET)
        .join("release")
        .join(AGENT);
    if !bin.is_file() {
        bail!("the build succeeded but {} is missing", bin.display());
    }
    Ok(bin)
}

/// The binary must need nothing from the image (no dynamic loader, no libc) and must run.
fn check_binary(bin: &Path, commit: &str) -> Result<()> {
    let elf = fs::read(bin).with_context(|| format!("reading {}", bin.display()))?;
    match elf_interpreter(&elf) {
        Some(false) => {}
        Some(true) => bail!(
            "{} asks for a dynamic loader (PT_INTERP): not a static executable",
            bin.display()
        ),
        None => bail!("{} is not a 64-bit little-endian ELF file", bin.display()),
    }
    let path = bin.to_str().context("binary path is not UTF-8")?;
    let version = output(path, &["version"]).context("`eks-pod-identity-agent version` failed")?;
    if !version.contains(VERSION) || !version.contains(commit) {
        bail!("`{path} version` says {version:?}, expected version {VERSION} and commit {commit}");
    }
    println!("==> {}: static ({} bytes)", bin.display(), elf.len());
    println!("==> {}", version.trim());
    Ok(())
}

/// Whether a 64-bit little-endian ELF executable names an interpreter (`PT_INTERP`, the dynamic
/// loader): a static (or static-pie) executable has none. `None` when `elf` is not such a file.
/// (What `file` reports as "dynamically linked", without needing `file`.)
fn elf_interpreter(elf: &[u8]) -> Option<bool> {
    const PT_INTERP: u32 = 3;
    let u16_at = |at: usize| Some(u16::from_le_bytes(elf.get(at..at + 2)?.try_into().ok()?));
    let u32_at = |at: usize| Some(u32::from_le_bytes(elf.get(at..at + 4)?.try_into().ok()?));
    let u64_at = |at: usize| Some(u64::from_le_bytes(elf.get(at..at + 8)?.try_into().ok()?));
    // ELFCLASS64, ELFDATA2LSB.
    if elf.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let phoff = usize::try_from(u64_at(0x20)?).ok()?;
    let phentsize = usize::from(u16_at(0x36)?);
    let phnum = usize::from(u16_at(0x38)?);
    let mut interp = false;
    for i in 0..phnum {
        interp |= u32_at(phoff.checked_add(i.checked_mul(phentsize)?)?)? == PT_INTERP;
    }
    Some(interp)
}

/// A buildah working container, removed on drop (also on error) unless committed.
struct WorkingContainer {
    name: String,
    committed: bool,
}

impl WorkingContainer {
    const PREFIX: &str = "xtask-image-";

    fn from_scratch() -> Result<Self> {
        Self::remove_leftovers();
        let name = format!("{}{}", Self::PREFIX, std::process::id());
        buildah(&["from", "--quiet", "--name", &name, "scratch"])?;
        Ok(Self {
            name,
            committed: false,
        })
    }

    /// Working containers of earlier runs that were killed before they could remove theirs.
    fn remove_leftovers() {
        let names = buildah_quiet(&[
            "containers",
            "--noheading",
            "--format",
            "{{.ContainerName}}",
        ])
        .unwrap_or_default();
        for name in names.lines().map(str::trim) {
            let Some(pid) = name.strip_prefix(Self::PREFIX) else {
                continue;
            };
            if !Path::new("/proc").join(pid).exists() {
                let _ = buildah_quiet(&["rm", name]);
            }
        }
    }
}

impl Drop for WorkingContainer {
    fn drop(&mut self) {
        if !self.committed {
            let _ = buildah_quiet(&["rm", &self.name]);
        }
    }
}

/// Assembles the image and tags it; returns its id.
fn assemble(binary: &Path, commit: &str) -> Result<String> {
    let previous = buildah_quiet(&[
        "images",
        "--quiet",
        "--no-trunc",
        &format!("{IMAGE}:latest"),
    ])
    .map(|s| s.trim().trim_start_matches("sha256:").to_owned());
    let timestamp = timestamp();
    let mut container = WorkingContainer::from_scratch()?;
    let root = PathBuf::from(buildah(&["mount", &container.name])?.trim());
    populate(&root, binary, timestamp)?;
    buildah(&["umount", &container.name])?;

    let revision = format!("org.opencontainers.image.revision={commit}");
    let version = format!("org.opencontainers.image.version={VERSION}");
    let ssl_cert_file = format!("SSL_CERT_FILE={CA_BUNDLE}");
    buildah(&[
        "config",
        "--os",
        "linux",
        "--arch",
        "amd64",
        "--entrypoint",
        r#"["/go-runner"]"#,
        "--cmd",
        r#"["/eks-pod-identity-agent","server"]"#,
        "--env",
        &ssl_cert_file,
        "--label",
        "org.opencontainers.image.title=eks-pod-identity-agent",
        "--label",
        "org.opencontainers.image.description=Drop-in EKS Pod Identity Agent with eBPF attribution",
        "--label",
        "org.opencontainers.image.licenses=Apache-2.0",
        "--label",
        &version,
        "--label",
        &revision,
        "--created-by",
        "cargo xtask image",
        &container.name,
    ])?;
    let versioned = format!("{IMAGE}:{VERSION}");
    let latest = format!("{IMAGE}:latest");
    let id = buildah(&[
        "commit",
        "--quiet",
        "--rm",
        "--timestamp",
        &timestamp.to_string(),
        &container.name,
        &versioned,
    ])?
    .trim()
    .to_owned();
    container.committed = true;
    buildah(&["tag", &versioned, &latest])?;

    // The image these tags named before, if nothing names it any more (a test may still use it:
    // then it stays).
    if let Some(old) = previous.filter(|old| !old.is_empty() && *old != id) {
        let dangling = buildah_quiet(&[
            "images",
            "--quiet",
            "--no-trunc",
            "--filter",
            "dangling=true",
        ])
        .unwrap_or_default();
        if dangling
            .lines()
            .any(|l| l.trim().trim_start_matches("sha256:") == old)
        {
            let _ = buildah_quiet(&["rmi", &old]);
        }
    }
    Ok(id)
}

/// Writes the image's files into the mounted root filesystem `root`.
fn populate(root: &Path, binary: &Path, timestamp: u64) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let mtime = SystemTime::UNIX_EPOCH + Duration::from_secs(timestamp);

    let agent = root.join(AGENT);
    fs::copy(binary, &agent)
        .with_context(|| format!("copying the binary to {}", agent.display()))?;
    fs::set_permissions(&agent, fs::Permissions::from_mode(0o755))?;
    set_mtime(&agent, mtime)?;
    // A hard link: one file, stored once in the layer.
    fs::hard_link(&agent, root.join("go-runner")).context("linking /go-runner")?;

    let host_bundle = Path::new(CA_BUNDLE);
    if !host_bundle.is_file() {
        bail!("{CA_BUNDLE} not found on this host: install Debian's ca-certificates");
    }
    let bundle = root.join(CA_BUNDLE.trim_start_matches('/'));
    let dir = bundle
        .parent()
        .ok_or_else(|| anyhow!("{CA_BUNDLE} has no parent"))?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    fs::copy(host_bundle, &bundle).context("copying the CA bundle")?;
    fs::set_permissions(&bundle, fs::Permissions::from_mode(0o644))?;
    set_mtime(&bundle, mtime)?;
    for dir in ["etc/ssl/certs", "etc/ssl", "etc"] {
        set_mtime(&root.join(dir), mtime)?;
    }
    Ok(())
}

fn set_mtime(path: &Path, mtime: SystemTime) -> Result<()> {
    fs::File::open(path)
        .and_then(|f| f.set_modified(mtime))
        .with_context(|| format!("setting the modification time of {}", path.display()))
}

/// The image's size: the sum of its layers as stored (uncompressed tar), from its manifest.
fn image_size(id: &str) -> Result<u64> {
    let manifest = buildah(&[
        "inspect",
        "--type",
        "image",
        "--format",
        "{{.Manifest}}",
        id,
    ])?;
    layers_size(&manifest)
        .ok_or_else(|| anyhow!("no layer sizes in the manifest of {id}: {manifest}"))
}

/// The sum of `layers[].size` in an OCI image manifest (compact JSON, as buildah prints it).
fn layers_size(manifest: &str) -> Option<u64> {
    let layers = manifest.split_once(r#""layers":["#)?.1;
    let layers = &layers[..layers.find(']')?];
    let mut total = 0;
    let mut found = false;
    for part in layers.split(r#""size":"#).skip(1) {
        let digits: String = part.chars().take_while(char::is_ascii_digit).collect();
        total += digits.parse::<u64>().ok()?;
        found = true;
    }
    found.then_some(total)
}

/// Runs `buildah <args>`, returns its stdout; on failure, an error with its stderr.
fn buildah(args: &[&str]) -> Result<String> {
    let out = Command::new("buildah")
        .args(args)
        .output()
        .context("cannot run buildah: run `cargo xtask setup` (Debian package buildah)")?;
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

/// `buildah <args>` whose failure is expected or harmless: its output when it succeeds.
fn buildah_quiet(args: &[&str]) -> Option<String> {
    output("buildah", args)
}

#[cfg(test)]
mod tests {
    use super::{elf_interpreter, layers_size};

    /// An ELF64 LE header with `types.len()` program headers of those types.
    fn elf(types: &[u32]) -> Vec<u8> {
        let mut e = vec![0u8; 64];
        e[..6].copy_from_slice(b"\x7fELF\x02\x01");
        e[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        e[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        e[0x38..0x3a].copy_from_slice(&u16::try_from(types.len()).unwrap().to_le_bytes());
        for t in types {
            let mut ph = vec![0u8; 56];
            ph[..4].copy_from_slice(&t.to_le_bytes());
            e.extend(ph);
        }
        e
    }

    #[test]
    fn a_loader_program_header_means_dynamic() {
        // PT_PHDR, PT_INTERP, PT_LOAD: a dynamically linked executable.
        assert_eq!(elf_interpreter(&elf(&[6, 3, 1])), Some(true));
        // PT_LOAD, PT_DYNAMIC, PT_TLS: static-pie (it relocates itself, no loader).
        assert_eq!(elf_interpreter(&elf(&[1, 2, 7])), Some(false));
        assert_eq!(elf_interpreter(b"#!/bin/sh\n"), None);
        // Program headers past the end of the file.
        let mut truncated = elf(&[1, 3]);
        truncated.truncate(100);
        assert_eq!(elf_interpreter(&truncated), None);
    }

    #[test]
    fn the_host_ld_so_linked_cargo_is_dynamic() {
        let cargo = std::fs::read(std::env::var_os("CARGO").unwrap()).unwrap();
        assert_eq!(elf_interpreter(&cargo), Some(true));
    }

    #[test]
    fn sums_the_layers_of_a_manifest_not_its_config() {
        let manifest = r#"{"schemaVersion":2,"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:af","size":326},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:a0","size":2048},{"mediaType":"x","digest":"sha256:b1","size":1000}],"annotations":{}}"#;
        assert_eq!(layers_size(manifest), Some(3048));
        assert_eq!(layers_size(r#"{"layers":[]}"#), None);
        assert_eq!(layers_size("not json"), None);
    }
}
