//! One platform's image: a buildah working container `FROM scratch`, its files written through
//! `buildah mount`, its config, and the commit under the per-platform tag.

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, anyhow, bail};

use super::platform::Platform;
use super::{AGENT, CA_BUNDLE, IMAGE, LEGACY_CA_BUNDLE, PROFILE_LABEL, Profile, VERSION};
use crate::util::output;

/// Where the build host's CA bundle is (Debian `ca-certificates`).
const HOST_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// The users the Go image's base (eks-distro-minimal-base) knows: root's home is `/root`.
const PASSWD: &str =
    "root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/:/sbin/nologin\n";
const GROUP: &str = "root:x:0:\nnobody:x:65534:\n";

/// The image's environment, as the Go image's: the AWS SDK finds `~/.aws` (hybrid nodes mount the
/// node's credentials at `/root/.aws`) through `HOME`, and the TLS client its trust roots through
/// `SSL_CERT_FILE`, at the path the original chart mounts the node's bundle over.
pub fn env() -> [String; 2] {
    [
        "HOME=/root".to_owned(),
        format!("SSL_CERT_FILE={CA_BUNDLE}"),
    ]
}

/// The per-platform tag: `<IMAGE>:<version>-<arch>`.
pub fn tag(platform: Platform) -> String {
    format!("{IMAGE}:{VERSION}-{}", platform.arch)
}

/// A buildah working container, removed on drop (also on error) unless committed.
struct WorkingContainer {
    name: String,
    committed: bool,
}

impl WorkingContainer {
    const PREFIX: &str = "xtask-image-";

    fn from_scratch(platform: Platform) -> Result<Self> {
        Self::remove_leftovers();
        let name = format!("{}{}-{}", Self::PREFIX, std::process::id(), platform.arch);
        buildah(&["from", "--quiet", "--name", &name, "scratch"])?;
        Ok(Self {
            name,
            committed: false,
        })
    }

    /// Working containers of earlier runs that were killed before they could remove theirs.
    fn remove_leftovers() {
        let names = output(
            "buildah",
            &[
                "containers",
                "--noheading",
                "--format",
                "{{.ContainerName}}",
            ],
        )
        .unwrap_or_default();
        for name in names.lines().map(str::trim) {
            let Some(rest) = name.strip_prefix(Self::PREFIX) else {
                continue;
            };
            let pid = rest.split('-').next().unwrap_or_default();
            if !Path::new("/proc").join(pid).exists() {
                let _ = output("buildah", &["rm", name]);
            }
        }
    }
}

impl Drop for WorkingContainer {
    fn drop(&mut self) {
        if !self.committed {
            let _ = output("buildah", &["rm", &self.name]);
        }
    }
}

/// Assembles `platform`'s image from `binary`, tags it [`tag`]`(platform)`, and returns its id.
pub fn assemble(
    platform: Platform,
    binary: &Path,
    commit: &str,
    timestamp: u64,
    profile: Profile,
) -> Result<String> {
    let tag = tag(platform);
    let previous = image_id(&tag);
    let mut container = WorkingContainer::from_scratch(platform)?;
    let root = PathBuf::from(buildah(&["mount", &container.name])?.trim());
    populate(&root, binary, timestamp)?;
    buildah(&["umount", &container.name])?;

    let revision = format!("org.opencontainers.image.revision={commit}");
    let version = format!("org.opencontainers.image.version={VERSION}");
    // What the executable was built with: `release` ships; `ci-image` is the tests' (unoptimised).
    let built_with = format!("{PROFILE_LABEL}={}", profile.name());
    let mut config = vec![
        "config",
        "--os",
        "linux",
        "--arch",
        platform.arch,
        "--entrypoint",
        r#"["/go-runner"]"#,
        "--cmd",
        r#"["/eks-pod-identity-agent","server"]"#,
    ];
    let env = env();
    for var in &env {
        config.extend(["--env", var]);
    }
    config.extend([
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
        "--label",
        &built_with,
        "--created-by",
        "cargo xtask image",
        &container.name,
    ]);
    buildah(&config)?;
    let id = buildah(&[
        "commit",
        "--quiet",
        "--rm",
        "--timestamp",
        &timestamp.to_string(),
        &container.name,
        &tag,
    ])?
    .trim()
    .to_owned();
    container.committed = true;
    if let Some(old) = previous.filter(|old| *old != id) {
        remove_if_dangling(&old);
    }
    Ok(id)
}

/// The id of the image `name` names, if any.
pub fn image_id(name: &str) -> Option<String> {
    output("buildah", &["images", "--quiet", "--no-trunc", name])
        .map(|s| s.trim().trim_start_matches("sha256:").to_owned())
        .filter(|id| !id.is_empty())
}

/// Removes the image `id` if nothing names it any more (a test may still use it: then it stays).
pub fn remove_if_dangling(id: &str) {
    let dangling = output(
        "buildah",
        &[
            "images",
            "--quiet",
            "--no-trunc",
            "--filter",
            "dangling=true",
        ],
    )
    .unwrap_or_default();
    if dangling
        .lines()
        .any(|l| l.trim().trim_start_matches("sha256:") == id)
    {
        let _ = output("buildah", &["rmi", id]);
    }
}

/// Writes the image's files into the mounted root filesystem `root`.
fn populate(root: &Path, binary: &Path, timestamp: u64) -> Result<()> {
    let mtime = SystemTime::UNIX_EPOCH + Duration::from_secs(timestamp);

    let agent = root.join(AGENT);
    fs::copy(binary, &agent)
        .with_context(|| format!("copying the binary to {}", agent.display()))?;
    fs::set_permissions(&agent, fs::Permissions::from_mode(0o755))?;
    set_mtime(&agent, mtime)?;
    // A hard link: one file, stored once in the layer.
    fs::hard_link(&agent, root.join("go-runner")).context("linking /go-runner")?;

    // The CA bundle where the original chart mounts the node's (and Amazon Linux keeps its own),
    // so that such a mount replaces it; Debian's path, where rustls-native-certs looks first
    // without SSL_CERT_FILE, is a symbolic link to it, so the mount replaces that one too.
    let host_bundle = Path::new(HOST_CA_BUNDLE);
    if !host_bundle.is_file() {
        bail!("{HOST_CA_BUNDLE} not found on this host: install Debian's ca-certificates");
    }
    let bundle = root.join(CA_BUNDLE.trim_start_matches('/'));
    create_parent(&bundle)?;
    fs::copy(host_bundle, &bundle).context("copying the CA bundle")?;
    fs::set_permissions(&bundle, fs::Permissions::from_mode(0o644))?;
    set_mtime(&bundle, mtime)?;
    let legacy = root.join(LEGACY_CA_BUNDLE.trim_start_matches('/'));
    create_parent(&legacy)?;
    std::os::unix::fs::symlink("../../pki/tls/certs/ca-bundle.crt", &legacy)
        .context("linking the CA bundle at Debian's path")?;

    // root's home, as the Go image's /etc/passwd gives it; HOME names it.
    for (path, text) in [("etc/passwd", PASSWD), ("etc/group", GROUP)] {
        let file = root.join(path);
        fs::write(&file, text).with_context(|| format!("writing {}", file.display()))?;
        fs::set_permissions(&file, fs::Permissions::from_mode(0o644))?;
        set_mtime(&file, mtime)?;
    }
    let home = root.join("root");
    fs::create_dir_all(&home).context("creating /root")?;
    fs::set_permissions(&home, fs::Permissions::from_mode(0o700))?;

    for dir in [
        "etc/pki/tls/certs",
        "etc/pki/tls",
        "etc/pki",
        "etc/ssl/certs",
        "etc/ssl",
        "etc",
        "root",
    ] {
        set_mtime(&root.join(dir), mtime)?;
    }
    Ok(())
}

fn create_parent(path: &Path) -> Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent", path.display()))?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))
}

fn set_mtime(path: &Path, mtime: SystemTime) -> Result<()> {
    fs::File::open(path)
        .and_then(|f| f.set_modified(mtime))
        .with_context(|| format!("setting the modification time of {}", path.display()))
}

/// The image's size: the sum of its layers as stored (uncompressed tar), from its manifest.
pub fn image_size(id: &str) -> Result<u64> {
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
pub fn buildah(args: &[&str]) -> Result<String> {
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

#[cfg(test)]
mod tests {
    use super::{PASSWD, layers_size};

    #[test]
    fn sums_the_layers_of_a_manifest_not_its_config() {
        let manifest = r#"{"schemaVersion":2,"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:af","size":326},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:a0","size":2048},{"mediaType":"x","digest":"sha256:b1","size":1000}],"annotations":{}}"#;
        assert_eq!(layers_size(manifest), Some(3048));
        assert_eq!(layers_size(r#"{"layers":[]}"#), None);
        assert_eq!(layers_size("not json"), None);
    }

    #[test]
    fn roots_home_is_slash_root() {
        let root: Vec<&str> = PASSWD.lines().next().unwrap().split(':').collect();
        assert_eq!((root[0], root[2], root[5]), ("root", "0", "/root"));
    }
}
