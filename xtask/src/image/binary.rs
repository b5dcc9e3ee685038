//! The image's executable: one static (musl) build of the agent per platform, checked to be
//! a static ELF executable for that CPU that runs and reports the commit.

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use super::platform::Platform;
use super::{AGENT, Profile, VERSION};
use crate::util::{self, output};

/// Builds the agent for `platform` (static, with `profile`) and returns the executable's path.
///
/// Rust's musl targets link statically by default (`+crt-static`, with their own copy of musl's
/// libc and crt objects). The C code in the tree (aws-lc-sys for rustls' crypto, libmimalloc-sys)
/// is compiled by cc-rs, which needs a C compiler for musl on that CPU:
/// - this machine's CPU: Debian's `musl-gcc` (musl-tools), as always;
/// - another CPU: `cargo zigbuild` (cargo-zigbuild and ziglang from PyPI), whose `zig cc` carries
///   musl's headers and libc for every CPU and also links the executable.
///
/// The eBPF object is target-independent: the build script builds it on the pinned nightly for the
/// BPF target, the same bytecode in every platform's binary.
pub fn build(platform: Platform, commit: &str, profile: Profile) -> Result<PathBuf> {
    let started = std::time::Instant::now();
    let commit_env = ("EKS_POD_IDENTITY_AGENT_COMMIT", OsStr::new(commit));
    let args = [
        "--profile",
        profile.name(),
        "--target",
        platform.target,
        "-p",
        "eks-pod-identity-agent",
    ];
    if platform.is_native() {
        let cc_var = format!("CC_{}", platform.target.replace('-', "_"));
        let cc = std::env::var_os(&cc_var).unwrap_or_else(|| "musl-gcc".into());
        if std::env::var_os(&cc_var).is_none() && output("musl-gcc", &["--version"]).is_none() {
            bail!("musl-gcc not found: run `cargo xtask setup` (Debian package musl-tools)");
        }
        let mut full = vec!["build"];
        full.extend_from_slice(&args);
        util::cargo(&full, &[(&cc_var, &cc), commit_env])?;
    } else {
        if output("cargo-zigbuild", &["--version"]).is_none() {
            bail!(
                "cargo-zigbuild not found: run `cargo xtask setup` (PyPI packages cargo-zigbuild and ziglang)"
            );
        }
        let mut full = vec!["zigbuild"];
        full.extend_from_slice(&args);
        util::cargo(&full, &[commit_env])?;
    }
    let bin = util::target_dir()
        .join(platform.target)
        .join(profile.name())
        .join(AGENT);
    if !bin.is_file() {
        bail!("the build succeeded but {} is missing", bin.display());
    }
    println!(
        "==> linux/{}: built in {:.0?}",
        platform.arch,
        started.elapsed()
    );
    Ok(bin)
}

/// The binary must be an executable for `platform`'s CPU that needs nothing from the image (no
/// dynamic loader, no libc), and must run (under qemu-user on another CPU) and say its commit.
pub fn check(platform: Platform, bin: &Path, commit: &str) -> Result<()> {
    let elf = fs::read(bin).with_context(|| format!("reading {}", bin.display()))?;
    let Some(info) = elf_info(&elf) else {
        bail!("{} is not a 64-bit little-endian ELF file", bin.display());
    };
    if info.machine != platform.elf_machine {
        bail!(
            "{} is for ELF machine {}, not {} (linux/{})",
            bin.display(),
            info.machine,
            platform.elf_machine,
            platform.arch
        );
    }
    if info.interpreter {
        bail!(
            "{} asks for a dynamic loader (PT_INTERP): not a static executable",
            bin.display()
        );
    }
    let path = bin.to_str().context("binary path is not UTF-8")?;
    let version = match platform.runner() {
        None => output(path, &["version"]),
        Some(qemu) => output(qemu, &[path, "version"]),
    }
    .with_context(|| {
        format!(
            "`{} version` failed{}",
            bin.display(),
            platform.runner().map_or(String::new(), |q| format!(
                " under {q} (Debian package qemu-user-static)"
            ))
        )
    })?;
    if !version.contains(VERSION) || !version.contains(commit) {
        bail!("`{path} version` says {version:?}, expected version {VERSION} and commit {commit}");
    }
    println!(
        "==> {}: static, linux/{} ({} bytes): {}",
        bin.display(),
        platform.arch,
        elf.len(),
        version.trim()
    );
    Ok(())
}

/// What the image build checks in an ELF executable's headers.
#[derive(Debug, PartialEq, Eq)]
struct ElfInfo {
    /// `e_machine`: the CPU.
    machine: u16,
    /// Whether it names an interpreter (`PT_INTERP`, the dynamic loader): a static (or static-pie)
    /// executable has none. (What `file` reports as "dynamically linked", without needing `file`.)
    interpreter: bool,
}

/// The headers of a 64-bit little-endian ELF file; `None` when `elf` is not one.
fn elf_info(elf: &[u8]) -> Option<ElfInfo> {
    const PT_INTERP: u32 = 3;
    let u16_at = |at: usize| Some(u16::from_le_bytes(elf.get(at..at + 2)?.try_into().ok()?));
    let u32_at = |at: usize| Some(u32::from_le_bytes(elf.get(at..at + 4)?.try_into().ok()?));
    let u64_at = |at: usize| Some(u64::from_le_bytes(elf.get(at..at + 8)?.try_into().ok()?));
    // ELFCLASS64, ELFDATA2LSB.
    if elf.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let machine = u16_at(0x12)?;
    let phoff = usize::try_from(u64_at(0x20)?).ok()?;
    let phentsize = usize::from(u16_at(0x36)?);
    let phnum = usize::from(u16_at(0x38)?);
    let mut interpreter = false;
    for i in 0..phnum {
        interpreter |= u32_at(phoff.checked_add(i.checked_mul(phentsize)?)?)? == PT_INTERP;
    }
    Some(ElfInfo {
        machine,
        interpreter,
    })
}

#[cfg(test)]
mod tests {
    use super::{ElfInfo, elf_info};

    /// An ELF64 LE header for `machine` with `types.len()` program headers of those types.
    fn elf(machine: u16, types: &[u32]) -> Vec<u8> {
        let mut e = vec![0u8; 64];
        e[..6].copy_from_slice(b"\x7fELF\x02\x01");
        e[0x12..0x14].copy_from_slice(&machine.to_le_bytes());
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
        let dynamic = elf_info(&elf(62, &[6, 3, 1])).unwrap();
        assert!(dynamic.interpreter);
        // PT_LOAD, PT_DYNAMIC, PT_TLS: static-pie (it relocates itself, no loader).
        assert_eq!(
            elf_info(&elf(183, &[1, 2, 7])),
            Some(ElfInfo {
                machine: 183,
                interpreter: false
            })
        );
        assert_eq!(elf_info(b"#!/bin/sh\n"), None);
        // Program headers past the end of the file.
        let mut truncated = elf(62, &[1, 3]);
        truncated.truncate(100);
        assert_eq!(elf_info(&truncated), None);
    }

    #[test]
    fn the_host_ld_so_linked_cargo_is_dynamic_and_for_this_cpu() {
        let cargo = std::fs::read(std::env::var_os("CARGO").unwrap()).unwrap();
        let info = elf_info(&cargo).unwrap();
        assert!(info.interpreter);
        let host = super::super::platform::Platform::host().unwrap();
        assert_eq!(info.machine, host.elf_machine);
    }
}
