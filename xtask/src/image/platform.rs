//! The platforms the image is built for: each one's OCI architecture, Rust target and ELF machine,
//! and how this machine builds and runs its executables.

/// One platform of the image (`linux/<arch>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Platform {
    /// The OCI architecture: `buildah config --arch`, the manifest list's entry, and the suffix of
    /// the per-platform tag (`<version>-<arch>`).
    pub arch: &'static str,
    /// The Rust target of the static binary.
    pub target: &'static str,
    /// The target's CPU as Rust names it (`std::env::consts::ARCH`).
    rust_arch: &'static str,
    /// `e_machine` of its ELF executables.
    pub elf_machine: u16,
    /// The qemu-user emulator that runs its executables on another CPU (Debian `qemu-user-static`).
    qemu: &'static str,
}

/// linux/amd64.
pub const AMD64: Platform = Platform {
    arch: "amd64",
    target: "x86_64-unknown-linux-musl",
    rust_arch: "x86_64",
    elf_machine: 62, // EM_X86_64
    qemu: "qemu-x86_64-static",
};

/// linux/arm64 (Graviton).
pub const ARM64: Platform = Platform {
    arch: "arm64",
    target: "aarch64-unknown-linux-musl",
    rust_arch: "aarch64",
    elf_machine: 183, // EM_AARCH64
    qemu: "qemu-aarch64-static",
};

/// Every platform of the image, in the manifest list's order.
pub const PLATFORMS: [Platform; 2] = [AMD64, ARM64];

impl Platform {
    /// Whether this machine's CPU runs the platform's executables natively.
    pub fn is_native(&self) -> bool {
        self.rust_arch == std::env::consts::ARCH
    }

    /// The command prefix that runs one of its executables here: nothing on the same CPU, else
    /// qemu-user (explicitly: binfmt_misc is not registered on every machine).
    pub fn runner(&self) -> Option<&'static str> {
        (!self.is_native()).then_some(self.qemu)
    }

    /// The platform of this machine's CPU (what `cargo xtask bench` measures).
    pub fn host() -> Option<Self> {
        PLATFORMS.into_iter().find(Self::is_native)
    }
}

#[cfg(test)]
mod tests {
    use super::{PLATFORMS, Platform};

    #[test]
    fn exactly_one_platform_is_this_machines_and_it_needs_no_emulator() {
        let native: Vec<_> = PLATFORMS.iter().filter(|p| p.is_native()).collect();
        assert_eq!(native.len(), 1, "{native:?}");
        assert_eq!(native[0].runner(), None);
        assert_eq!(Platform::host(), Some(*native[0]));
        for other in PLATFORMS.iter().filter(|p| !p.is_native()) {
            assert!(other.runner().is_some_and(|q| q.starts_with("qemu-")));
        }
    }
}
