//! `cargo xtask setup`: make a fresh Debian 12 machine (root, rustup with stable and a nightly,
//! gcc, python3 with pip) able to build the eBPF programs and run the tests. Idempotent.

use crate::util::{self, is_root, output};
use anyhow::{Context, Result, anyhow, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

const BPF_LINKER_VERSION: &str = "0.13.0";
/// Debian packages: `ip` for the simulated node, `promtool` for metrics and alert rules, wrk and
/// nginx (serving the same body, side by side) for the bench, buildah and musl's C toolchain for
/// the image, `setpriv` (util-linux) for the capability-limited runs.
const APT_PACKAGES: &[&str] = &[
    "iproute2",
    "prometheus",
    "wrk",
    "nginx",
    "buildah",
    "musl-tools",
    "util-linux",
];
/// Python packages: botocore is a pod's SDK in the tests; Helm's engine and the Kubernetes schema
/// validator check the chart offline.
const PIP_PACKAGES: &[(&str, &str)] = &[
    ("botocore", "botocore"),
    ("helm-python-sdk", "helm_python"),
    ("kubernetes-validate", "kubernetes_validate"),
];
/// The image's binary is static (musl).
pub const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";

fn run_step(name: &str, manual: &str, step: impl FnOnce() -> Result<&'static str>) -> Result<()> {
    match step() {
        Ok(outcome) => {
            println!("setup: {name}: {outcome}");
            Ok(())
        }
        Err(err) => Err(err.context(format!(
            "setup step `{name}` failed; to do it by hand: {manual}"
        ))),
    }
}

pub fn run() -> Result<()> {
    run_step(
        "nightly toolchain",
        "rustup toolchain install nightly --profile minimal",
        nightly,
    )?;
    run_step(
        "nightly rust-src",
        "rustup component add rust-src --toolchain nightly",
        rust_src,
    )?;
    run_step(
        "clippy and rustfmt",
        "rustup component add clippy rustfmt",
        lint_components,
    )?;
    run_step(
        &format!("bpf-linker {BPF_LINKER_VERSION}"),
        "see /work/shared/EBPF-NOTES.md: symlink $(rustc +nightly --print sysroot)/lib/libLLVM.so.* as \
         <dir>/libLLVM.so, then LLVM_PREFIX=$(rustc +nightly --print sysroot) RUSTFLAGS=\"-L native=<dir>\" \
         cargo install bpf-linker@0.13.0 --locked --no-default-features --features llvm-<major>",
        bpf_linker,
    )?;
    run_step(
        &format!("Debian packages ({})", APT_PACKAGES.join(" ")),
        &format!(
            "apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y {}",
            APT_PACKAGES.join(" ")
        ),
        apt_packages,
    )?;
    run_step(
        &format!("rust target {MUSL_TARGET}"),
        &format!("rustup target add {MUSL_TARGET}"),
        musl_target,
    )?;
    let pip_names: Vec<&str> = PIP_PACKAGES.iter().map(|(name, _)| *name).collect();
    run_step(
        &format!("Python packages ({})", pip_names.join(" ")),
        &format!(
            "python3 -m pip install --break-system-packages {}",
            pip_names.join(" ")
        ),
        python_packages,
    )?;
    Ok(())
}

/// The eBPF programs build on nightly (`-Z build-std`); rustup installs one when it has none.
fn nightly() -> Result<&'static str> {
    if output("rustc", &["+nightly", "--version"]).is_some() {
        return Ok("already present");
    }
    util::run(Command::new("rustup").args([
        "toolchain",
        "install",
        "nightly",
        "--profile",
        "minimal",
        "--component",
        "rust-src",
    ]))?;
    Ok("installed")
}

fn musl_target() -> Result<&'static str> {
    let installed = output("rustup", &["target", "list", "--installed"]).unwrap_or_default();
    if installed.lines().any(|l| l.trim() == MUSL_TARGET) {
        return Ok("already present");
    }
    util::run(Command::new("rustup").args(["target", "add", MUSL_TARGET]))?;
    Ok("installed")
}

fn rust_src() -> Result<&'static str> {
    let installed = output(
        "rustup",
        &["component", "list", "--toolchain", "nightly", "--installed"],
    )
    .ok_or_else(|| {
        anyhow!(
            "`rustup component list --toolchain nightly` failed: is a nightly toolchain installed?"
        )
    })?;
    if installed.lines().any(|l| l.trim().starts_with("rust-src")) {
        return Ok("already present");
    }
    util::run(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        "nightly",
    ]))?;
    Ok("installed")
}

fn lint_components() -> Result<&'static str> {
    let present = |sub: &str| output("cargo", &[sub, "--version"]).is_some();
    if present("clippy") && present("fmt") {
        return Ok("already present");
    }
    util::run(Command::new("rustup").args(["component", "add", "clippy", "rustfmt"]))?;
    Ok("installed")
}

fn bpf_linker_ok() -> bool {
    output("bpf-linker", &["--version"])
        .is_some_and(|v| v.split_whitespace().last() == Some(BPF_LINKER_VERSION))
}

fn bpf_linker() -> Result<&'static str> {
    if bpf_linker_ok() {
        return Ok("already present");
    }
    let sysroot = output("rustc", &["+nightly", "--print", "sysroot"]).ok_or_else(|| {
        anyhow!("`rustc +nightly --print sysroot` failed: is a nightly toolchain installed?")
    })?;
    let sysroot = PathBuf::from(sysroot.trim());
    let (libllvm, major) = find_libllvm(&sysroot.join("lib"))?;
    println!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against {} (about a minute)",
        libllvm.display()
    );

    let link_dir = std::env::temp_dir().join(format!("xtask-bpf-linker-{}", std::process::id()));
    std::fs::create_dir_all(&link_dir)
        .with_context(|| format!("cannot create {}", link_dir.display()))?;
    let link = link_dir.join("libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&libllvm, &link)
        .with_context(|| format!("cannot symlink {} to {}", link.display(), libllvm.display()))?;

    let result = util::run(
        Command::new("cargo")
            .args(["install", &format!("bpf-linker@{BPF_LINKER_VERSION}")])
            .args(["--locked", "--force", "--no-default-features", "--features"])
            .arg(format!("llvm-{major}"))
            .env("LLVM_PREFIX", &sysroot)
            .env("RUSTFLAGS", format!("-L native={}", link_dir.display())),
    );
    let _ = std::fs::remove_dir_all(&link_dir);
    result?;

    if !bpf_linker_ok() {
        bail!(
            "bpf-linker was installed but `bpf-linker --version` does not report {BPF_LINKER_VERSION}: \
             is ~/.cargo/bin on PATH?"
        );
    }
    Ok("installed")
}

/// Finds the nightly's own `libLLVM.so.<major>.<minor>-rust-...` and its LLVM major version.
fn find_libllvm(lib: &Path) -> Result<(PathBuf, u32)> {
    let entries =
        std::fs::read_dir(lib).with_context(|| format!("cannot read {}", lib.display()))?;
    let mut found: Vec<(PathBuf, u32)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let rest = name.strip_prefix("libLLVM.so.")?;
            let major = rest
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()?;
            Some((e.path(), major))
        })
        .collect();
    found.sort();
    found
        .pop()
        .ok_or_else(|| anyhow!("no libLLVM.so.* in {}", lib.display()))
}

fn apt_packages() -> Result<&'static str> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|pkg| {
            output("dpkg-query", &["-W", "-f=${Status}", pkg])
                .is_none_or(|status| !status.ends_with("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok("already present");
    }
    if !is_root() {
        bail!("missing {} and not root", missing.join(" "));
    }
    println!("setup: installing {}", missing.join(" "));
    util::run(
        Command::new("apt-get")
            .arg("update")
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    util::run(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    Ok("installed")
}

fn python_packages() -> Result<&'static str> {
    let importable =
        |module: &str| output("python3", &["-c", &format!("import {module}")]).is_some();
    let missing: Vec<&str> = PIP_PACKAGES
        .iter()
        .filter(|(_, module)| !importable(module))
        .map(|(name, _)| *name)
        .collect();
    if missing.is_empty() {
        return Ok("already present");
    }
    util::run(
        Command::new("python3")
            .args(["-m", "pip", "install", "--quiet"])
            .args(&missing)
            // Debian's system python refuses pip installs (PEP 668) without this; older pips ignore it.
            .env("PIP_BREAK_SYSTEM_PACKAGES", "1")
            .env("PIP_ROOT_USER_ACTION", "ignore"),
    )?;
    if let Some((name, module)) = PIP_PACKAGES.iter().find(|(_, module)| !importable(module)) {
        bail!("pip installed {name} but `python3 -c 'import {module}'` still fails");
    }
    Ok("installed")
}
