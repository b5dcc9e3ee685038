//! Builds `agent-ebpf` for the BPF target (nightly + bpf-linker, see `cargo xtask setup`) and leaves
//! the object in `OUT_DIR`, where `src/ebpf.rs` embeds it.
use anyhow::{Context as _, anyhow};

/// The toolchain file's reader, shared with `xtask`.
#[path = "../agent-ebpf/toolchain_channel.rs"]
mod toolchain_channel;

fn main() -> anyhow::Result<()> {
    git_commit();
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("MetadataCommand::exec")?;
    let package = packages
        .into_iter()
        .find(|p| p.name.as_str() == "agent-ebpf")
        .ok_or_else(|| anyhow!("agent-ebpf package not found"))?;
    let root_dir = package
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", package.manifest_path))?;
    // aya-build relays every line the nested eBPF `cargo build` prints as a `cargo:warning`: a
    // newcomer's first build would show hundreds of "warning: … Compiling …" lines. Quiet makes
    // that cargo print only what matters (compiler errors and warnings still come through).
    // SAFETY: the build script is single-threaded here; nothing else reads the environment
    // concurrently.
    unsafe { std::env::set_var("CARGO_TERM_QUIET", "true") };
    let channel = pinned_channel(root_dir.as_std_path())?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: package.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&channel),
    )
}

/// The dated nightly the eBPF crate pins in its `rust-toolchain.toml` (aya-build runs
/// `rustup run <channel>`, which a toolchain file cannot override).
fn pinned_channel(ebpf_dir: &std::path::Path) -> anyhow::Result<String> {
    let file = ebpf_dir.join("rust-toolchain.toml");
    println!("cargo:rerun-if-changed={}", file.display());
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    toolchain_channel::channel(&text).map_err(|e| anyhow!("{}: {e}", file.display()))
}

/// `EKS_POD_IDENTITY_AGENT_COMMIT` for `version` and the build-info metric: taken from the
/// environment when set (builds from a source tarball or a container context without `.git`),
/// else from git, else `unknown`.
fn git_commit() {
    println!("cargo:rerun-if-env-changed=EKS_POD_IDENTITY_AGENT_COMMIT");
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let commit = std::env::var("EKS_POD_IDENTITY_AGENT_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| git(&["rev-parse", "HEAD"]))
        .unwrap_or_else(|| "unknown".to_owned());
    // Rebuild when HEAD moves: HEAD itself, the branch it points at, and packed refs. Only paths
    // that exist: cargo treats a missing one as always stale and would rebuild the crate every time.
    if let Some(git_dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        let git_dir = std::path::Path::new(&git_dir);
        let mut watched = vec![git_dir.join("HEAD"), git_dir.join("packed-refs")];
        if let Some(reference) = git(&["symbolic-ref", "-q", "HEAD"]) {
            watched.push(git_dir.join(reference));
        }
        for path in watched.iter().filter(|p| p.exists()) {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
    println!("cargo:rustc-env=EKS_POD_IDENTITY_AGENT_COMMIT={commit}");
}
