//! `cargo xtask setup`: make a fresh Debian 12 machine (root, rustup with stable and a nightly,
//! gcc, python3 with pip) able to build the eBPF programs and run the tests. Idempotent.

use crate::util::{self, is_root, output};
use anyhow::{Context, Result, anyhow, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

const BPF_LINKER_VERSION: &str = "0.13.0";
/// Debian packages: `ip` for the simulated node, `promtool` for metrics and alert rules, wrk and
/// nginx (serving the same body, side by side) for the bench, buildah and musl's C toolchain for
/// the image, qemu-user to run the image's binary for the other CPU, `setpriv` (util-linux) for
/// the capability-limited runs.
const APT_PACKAGES: &[&str] = &[
    "iproute2",
    "prometheus",
    "wrk",
    "nginx",
    "buildah",
    "musl-tools",
    "qemu-user-static",
    "util-linux",
];
/// Python packages: botocore is a pod's SDK in the tests; Helm's engine and the Kubernetes schema
/// validator check the chart offline; the OCSF releases' JSON schemas (ocsf-json-schema, offline)
/// and jsonschema check the audit log's `ocsf` format.
const PIP_PACKAGES: &[(&str, &str)] = &[
    ("botocore", "botocore"),
    ("helm-python-sdk", "helm_python"),
    ("kubernetes-validate", "kubernetes_validate"),
    ("ocsf-json-schema", "ocsf_json_schema"),
    ("jsonschema", "jsonschema"),
];
/// The cross C toolchain and linker for the image's other CPU (`cargo zigbuild`): PyPI wheels,
/// zig itself and cargo-zigbuild's binary (which finds zig through `python3 -m ziglang`).
const CROSS_PIP_PACKAGES: &[&str] = &["ziglang", "cargo-zigbuild"];
/// The eBPF crate's toolchain file, naming the dated nightly it is built with.
const EBPF_TOOLCHAIN_FILE: &str = "agent-ebpf/rust-toolchain.toml";

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
        "eBPF nightly (agent-ebpf/rust-toolchain.toml) with rust-src",
        "rustup toolchain install <channel> --profile minimal --component rust-src",
        ebpf_nightly,
    )?;
    run_step(
        "clippy and rustfmt",
        "rustup component add clippy rustfmt",
        lint_components,
    )?;
    run_step(
        &format!("bpf-linker {BPF_LINKER_VERSION}"),
        "with <channel> from agent-ebpf/rust-toolchain.toml: symlink $(rustc +<channel> --print sysroot)/lib/libLLVM.so.* \
         as <dir>/libLLVM.so, then LLVM_PREFIX=$(rustc +<channel> --print sysroot) RUSTFLAGS=\"-L native=<dir>\" \
         cargo install bpf-linker@0.13.0 --locked --force --no-default-features --features llvm-<major>",
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
    let targets = crate::image::PLATFORMS.map(|p| p.target).join(" ");
    run_step(
        &format!("rust targets {targets}"),
        &format!("rustup target add {targets}"),
        musl_targets,
    )?;
    run_step(
        &format!("cross toolchain ({})", CROSS_PIP_PACKAGES.join(" ")),
        &format!(
            "python3 -m pip install --break-system-packages {}",
            CROSS_PIP_PACKAGES.join(" ")
        ),
        cross_toolchain,
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

/// The fuzz targets build on nightly (cargo-fuzz); rustup installs one when it has none. (The eBPF
/// programs build on a dated nightly of their own: [`ebpf_nightly`].)
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

/// The image's static binaries: a musl target per platform.
fn musl_targets() -> Result<&'static str> {
    let installed = output("rustup", &["target", "list", "--installed"]).unwrap_or_default();
    let missing: Vec<&str> = crate::image::PLATFORMS
        .iter()
        .map(|p| p.target)
        .filter(|t| !installed.lines().any(|l| l.trim() == *t))
        .collect();
    if missing.is_empty() {
        return Ok("already present");
    }
    util::run(
        Command::new("rustup")
            .args(["target", "add"])
            .args(&missing),
    )?;
    Ok("installed")
}

fn cross_toolchain() -> Result<&'static str> {
    let works = || {
        output("cargo-zigbuild", &["--version"]).is_some()
            && output("python3", &["-m", "ziglang", "version"]).is_some()
    };
    if works() {
        return Ok("already present");
    }
    util::run(
        Command::new("python3")
            .args(["-m", "pip", "install", "--quiet"])
            .args(CROSS_PIP_PACKAGES)
            .env("PIP_BREAK_SYSTEM_PACKAGES", "1")
            .env("PIP_ROOT_USER_ACTION", "ignore"),
    )?;
    if !works() {
        bail!(
            "pip installed {} but `cargo-zigbuild --version` or `python3 -m ziglang version` fails: \
             is pip's script directory on PATH?",
            CROSS_PIP_PACKAGES.join(" ")
        );
    }
    Ok("installed")
}

/// The dated nightly the eBPF programs are built with: `channel` in [`EBPF_TOOLCHAIN_FILE`].
pub fn ebpf_toolchain() -> Result<String> {
    let file = util::workspace_root().join(EBPF_TOOLCHAIN_FILE);
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    let channel =
        toolchain_channel::channel(&text).map_err(|e| anyhow!("{}: {e}", file.display()))?;
    if !channel.starts_with("nightly-") {
        bail!(
            "{}: `channel = \"{channel}\"` is not a dated `nightly-YYYY-MM-DD`",
            file.display()
        );
    }
    Ok(channel)
}

/// The channel's reader, shared with `agent/build.rs`.
#[path = "../../agent-ebpf/toolchain_channel.rs"]
mod toolchain_channel;

/// Installs the eBPF crate's pinned nightly with rust-src (`-Z build-std=core`), idempotently.
fn ebpf_nightly() -> Result<&'static str> {
    let channel = ebpf_toolchain()?;
    let has_src = || {
        output(
            "rustup",
            &["component", "list", "--toolchain", &channel, "--installed"],
        )
        .is_some_and(|l| l.lines().any(|l| l.trim().starts_with("rust-src")))
    };
    if output("rustc", &[&format!("+{channel}"), "--version"]).is_some() && has_src() {
        return Ok("already present");
    }
    util::run(Command::new("rustup").args([
        "toolchain",
        "install",
        &channel,
        "--profile",
        "minimal",
        "--component",
        "rust-src",
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

/// bpf-linker of the right version, linked against (and finding) the very libLLVM of the eBPF
/// nightly: it reads the bitcode that nightly's rustc writes.
fn bpf_linker_ok(libllvm: &Path) -> bool {
    let version_ok = output("bpf-linker", &["--version"])
        .is_some_and(|v| v.split_whitespace().last() == Some(BPF_LINKER_VERSION));
    let Some(soname) = libllvm.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    let linked_ok = which_bpf_linker()
        .and_then(|bin| output("ldd", &[&bin]))
        .is_some_and(|ldd| {
            ldd.lines().any(|l| {
                let l = l.trim();
                l.starts_with(soname) && !l.contains("not found")
            })
        });
    version_ok && linked_ok
}

/// bpf-linker's path on PATH.
fn which_bpf_linker() -> Option<String> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("bpf-linker"))
        .find(|p| p.is_file())
        .and_then(|p| p.to_str().map(str::to_owned))
}

fn bpf_linker() -> Result<&'static str> {
    let channel = ebpf_toolchain()?;
    let sysroot = output("rustc", &[&format!("+{channel}"), "--print", "sysroot"])
        .ok_or_else(|| anyhow!("`rustc +{channel} --print sysroot` failed: is it installed?"))?;
    let sysroot = PathBuf::from(sysroot.trim());
    let (libllvm, major) = find_libllvm(&sysroot.join("lib"))?;
    if bpf_linker_ok(&libllvm) {
        return Ok("already present");
    }
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

    if !bpf_linker_ok(&libllvm) {
        bail!(
            "bpf-linker was installed but `bpf-linker --version` does not report {BPF_LINKER_VERSION} \
             or it does not link {}: is ~/.cargo/bin on PATH?",
            libllvm.display()
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
