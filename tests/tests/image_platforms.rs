//! The image's platforms end to end: `localhost/eks-pod-identity-agent:latest` is one manifest list
//! of a linux/amd64 and a linux/arm64 image, as `cargo xtask image` builds them (this test builds
//! nothing), and the SBOM written beside them.
//!
//! The arm64 binary is run here, on x86_64, under qemu-user (`qemu-aarch64-static`, Debian
//! `qemu-user-static`): `version`, `initialize --help`, and `initialize` + `server` in a simulated
//! node serving a pod's botocore. qemu-user translates the binary's syscalls to this x86_64 kernel
//! and does not emulate `bpf()`, so the server runs as on a node without eBPF: it says so
//! (`pod_identity_ebpf_attached 0`) and serves without attribution, as the agent does wherever its
//! programs cannot be loaded (`--token-binding audit`, the default).
//!
//! What this cannot show without arm64 hardware (an arm64 kernel): the eBPF programs loaded,
//! verified, JIT-compiled and attached by the arm64 binary, and so attribution, `enforce` and the
//! per-pod kernel limits on Graviton; aya's `bpf()` calls through the arm64 syscall ABI; the arm64
//! kernel's netlink, cgroup and socket behaviour (qemu-user passes them to this kernel); and the
//! footprint and latency on arm64. What it does show about the eBPF side: both binaries embed the
//! same object, byte for byte in every program and map section, and the object carries no CO-RE
//! relocation — its programs read only the UAPI context structures (`bpf_sock_addr`,
//! `bpf_sock_ops`, `bpf_sock`), whose layout is the same on every architecture and whose accesses
//! the verifier rewrites for the running kernel — so nothing in it depends on the CPU's layouts.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use e2e::agent::{AgentArgs, AgentProcess, Verbatim, node_with_web_pods};
use e2e::image::{ImageRootfs, VERSION, manifest_platforms, sbom_path};
use object::{Object as _, ObjectSection as _, SectionKind};
use serde_json::Value;

const QEMU_ARM64: &str = "qemu-aarch64-static";
/// `e_machine` of arm64, x86_64 and BPF ELF files.
const EM_AARCH64: u16 = 183;
const EM_X86_64: u16 = 62;
const EM_BPF: u16 = 247;

#[test]
fn the_image_is_one_manifest_list_of_amd64_and_arm64_images_of_the_same_build() {
    if !e2e::privileged(
        "the_image_is_one_manifest_list_of_amd64_and_arm64_images_of_the_same_build",
    ) {
        return;
    }
    let platforms = manifest_platforms().unwrap();
    assert_eq!(
        platforms,
        [("linux", "amd64"), ("linux", "arm64")].map(|(o, a)| (o.to_owned(), a.to_owned())),
        "`buildah manifest inspect`"
    );
    let amd64 = ImageRootfs::open_platform("amd64").unwrap();
    let arm64 = ImageRootfs::open_platform("arm64").unwrap();
    // `buildah from` of the list without a platform picks this machine's.
    let host = if std::env::consts::ARCH == "aarch64" {
        "arm64"
    } else {
        "amd64"
    };
    assert_eq!(ImageRootfs::open().unwrap().arch(), host);
    for (rootfs, machine) in [(&amd64, EM_X86_64), (&arm64, EM_AARCH64)] {
        let elf = std::fs::read(rootfs.root.join("eks-pod-identity-agent")).unwrap();
        assert_eq!(elf_machine(&elf), Some(machine), "{}", rootfs.arch());
    }
    // Same config (entrypoint, command, environment, labels: one commit) and same files.
    let (a, b) = (amd64.config().unwrap(), arm64.config().unwrap());
    for key in ["Entrypoint", "Cmd", "Env", "Labels"] {
        assert_eq!(a[key], b[key], "{key}");
    }
    assert_eq!(listing(&amd64.root), listing(&arm64.root));
}

/// Every path under `root` (relative), with whether it is a directory.
fn listing(root: &Path) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let is_dir = std::fs::symlink_metadata(&path).unwrap().is_dir();
            if is_dir {
                dirs.push(path.clone());
            }
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            out.push((rel, is_dir));
        }
    }
    out.sort();
    out
}

/// `e_machine` of a 64-bit little-endian ELF file.
fn elf_machine(elf: &[u8]) -> Option<u16> {
    (elf.get(..6)? == b"\x7fELF\x02\x01")
        .then(|| Some(u16::from_le_bytes(elf.get(0x12..0x14)?.try_into().ok()?)))?
}

/// Runs the arm64 binary of the image's root filesystem under qemu-user, in the test's namespaces.
fn qemu(root: &Path, args: &[&str]) -> std::process::Output {
    Command::new(QEMU_ARM64)
        .arg(root.join("eks-pod-identity-agent"))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{QEMU_ARM64}: {e} (run `cargo xtask setup`)"))
}

#[test]
fn the_arm64_binary_runs_under_qemu_version_and_initialize_help() {
    if !e2e::privileged("the_arm64_binary_runs_under_qemu_version_and_initialize_help") {
        return;
    }
    let arm64 = ImageRootfs::open_platform("arm64").unwrap();
    let revision = arm64.config().unwrap()["Labels"]["org.opencontainers.image.revision"]
        .as_str()
        .unwrap()
        .to_owned();
    let version = qemu(&arm64.root, &["version"]);
    assert!(version.status.success(), "{version:?}");
    assert_eq!(
        String::from_utf8_lossy(&version.stdout).trim(),
        format!("eks-pod-identity-agent version {VERSION} (commit {revision})")
    );
    let help = qemu(&arm64.root, &["initialize", "--help"]);
    assert!(help.status.success(), "{help:?}");
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(
        text.contains("Usage:") && text.contains("initialize"),
        "{text}"
    );
}

/// The emulated server's credential port: it runs without capabilities (see below).
const UNPRIVILEGED_PORT: &str = "8080";

#[test]
fn the_arm64_agent_serves_a_pod_under_qemu_without_ebpf() {
    if !e2e::privileged("the_arm64_agent_serves_a_pod_under_qemu_without_ebpf") {
        return;
    }
    let arm64 = ImageRootfs::open_platform("arm64").unwrap();
    let (node, fake, [pod]) = node_with_web_pods("e2e-image-arm64", ["web-0"]).unwrap();
    // qemu-user runs threads of its own that never run the guest's code, so the server's drop of
    // its capabilities (every thread, checked in /proc) could never complete there: the emulated
    // server starts with no capability at all (an empty bounding set), so there is nothing to
    // drop, and serves on an unprivileged port. `initialize` (which needs CAP_NET_ADMIN) is the
    // native build's.
    let arm64_bin = arm64.root.join("eks-pod-identity-agent");
    let os = |s: &str| OsString::from(s);
    let args = AgentArgs {
        verbatim: Some(Verbatim {
            initialize: vec![e2e::agent::agent_bin().unwrap().into(), os("initialize")],
            server: vec![
                os("setpriv"),
                os("--bounding-set=-all"),
                os("--inh-caps=-all"),
                os("--"),
                os(QEMU_ARM64),
                arm64_bin.into(),
                os("server"),
                os("--cluster-name"),
                os(fake.cluster()),
                os("--endpoint"),
                os(&fake.endpoint()),
                os("--port"),
                os(UNPRIVILEGED_PORT),
                os("--cgroup-root"),
                node.cgroup_root().into(),
            ],
        }),
        // Emulated: slower to start than native.
        ready_timeout: Duration::from_secs(90),
        ..AgentArgs::default()
    };
    let agent = AgentProcess::start(&node, &fake, args).unwrap();
    let pid = agent.pid().unwrap();
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert!(
        exe.ends_with(QEMU_ARM64),
        "the server is the emulator running the arm64 binary: {}",
        exe.display()
    );
    assert_eq!(agent.metric("pod_identity_ebpf_attached").unwrap(), 0.0);
    let logs = agent.logs().unwrap();
    assert!(logs.contains("eBPF attribution unavailable"), "{logs}");

    pod.refresh_token(&fake).unwrap();
    let creds = pod
        .fetch_with_botocore(&format!(
            "http://169.254.170.23:{UNPRIVILEGED_PORT}/v1/credentials"
        ))
        .unwrap()
        .unwrap_or_else(|e| panic!("botocore: {e}\n{}", agent.logs().unwrap()));
    assert!(creds.access_key_id.starts_with("ASIA"), "{creds:?}");
    assert_eq!(fake.calls(), 1);
    let log_path = agent.log_path().to_owned();
    let status = agent.stop().unwrap();
    assert!(
        status.success(),
        "exits 0 on SIGTERM: {status}\n{}",
        std::fs::read_to_string(&log_path).unwrap_or_default()
    );
}

/// The BPF ELF objects embedded in an executable: each starts at an ELF header for `EM_BPF` and
/// ends with its section header table.
fn embedded_bpf_objects(exe: &[u8]) -> Vec<&[u8]> {
    let mut found = Vec::new();
    let mut at = 0;
    while let Some(i) = exe[at..].windows(4).position(|w| w == b"\x7fELF") {
        let start = at + i;
        at = start + 4;
        let obj = &exe[start..];
        if elf_machine(obj) != Some(EM_BPF) {
            continue;
        }
        let u16_at = |o: usize| usize::from(u16::from_le_bytes([obj[o], obj[o + 1]]));
        let shoff =
            usize::try_from(u64::from_le_bytes(obj[0x28..0x30].try_into().unwrap())).unwrap();
        let end = shoff + u16_at(0x3a) * u16_at(0x3c);
        found.push(&obj[..end]);
        at = start + end;
    }
    found
}

/// `(section name → bytes)` of the sections that make up what the kernel loads: programs (text),
/// maps, read-only data and the licence.
fn loaded_sections(obj: &[u8]) -> BTreeMap<String, Vec<u8>> {
    let file = object::File::parse(obj).unwrap();
    file.sections()
        .filter(|s| {
            let name = s.name().unwrap_or_default();
            s.kind() == SectionKind::Text
                || name == "maps"
                || name.starts_with(".rodata")
                || name == "license"
        })
        .map(|s| (s.name().unwrap().to_owned(), s.data().unwrap().to_vec()))
        .collect()
}

/// `core_relo_len` of a `.BTF.ext` section (0 when its header predates CO-RE records).
fn core_relocation_bytes(btf_ext: &[u8]) -> u32 {
    let u32_at = |o: usize| u32::from_le_bytes(btf_ext[o..o + 4].try_into().unwrap());
    assert_eq!(&btf_ext[..2], &0xeb9f_u16.to_le_bytes(), "BTF.ext magic");
    if u32_at(4) < 32 { 0 } else { u32_at(28) }
}

#[test]
fn both_binaries_embed_the_same_ebpf_bytecode_without_co_re_relocations() {
    if !e2e::privileged("both_binaries_embed_the_same_ebpf_bytecode_without_co_re_relocations") {
        return;
    }
    let read = |arch: &str| {
        let rootfs = ImageRootfs::open_platform(arch).unwrap();
        std::fs::read(rootfs.root.join("eks-pod-identity-agent")).unwrap()
    };
    let (amd64, arm64) = (read("amd64"), read("arm64"));
    let (a, b) = (embedded_bpf_objects(&amd64), embedded_bpf_objects(&arm64));
    assert_eq!(a.len(), 1, "one eBPF object in the amd64 binary");
    assert_eq!(b.len(), 1, "one eBPF object in the arm64 binary");
    let (a_sections, b_sections) = (loaded_sections(a[0]), loaded_sections(b[0]));
    assert!(
        a_sections.keys().any(|n| n.contains("connect4")) && a_sections.contains_key("maps"),
        "{:?}",
        a_sections.keys()
    );
    assert_eq!(a_sections, b_sections, "the same programs, maps and data");

    for obj in [a[0], b[0]] {
        let file = object::File::parse(obj).unwrap();
        if let Some(ext) = file.section_by_name(".BTF.ext") {
            assert_eq!(
                core_relocation_bytes(ext.data().unwrap()),
                0,
                "CO-RE records"
            );
        }
    }
}

/// `(name, version)` → checksum of the registry packages in the workspace's `Cargo.lock`.
fn lock_checksums() -> BTreeMap<(String, String), String> {
    let lock = std::fs::read_to_string(e2e::workspace_root().join("Cargo.lock")).unwrap();
    let mut sums = BTreeMap::new();
    for block in lock.split("[[package]]").skip(1) {
        let field = |key: &str| {
            block.lines().find_map(|l| {
                let v = l.strip_prefix(key)?.trim_start().strip_prefix('=')?;
                Some(v.trim().trim_matches('"').to_owned())
            })
        };
        if let (Some(n), Some(v), Some(c)) = (field("name"), field("version"), field("checksum")) {
            sums.insert((n, v), c);
        }
    }
    sums
}

#[test]
fn the_sbom_beside_each_image_lists_the_crates_in_its_binary() {
    let sums = lock_checksums();
    for (arch, target) in [
        ("amd64", "x86_64-unknown-linux-musl"),
        ("arm64", "aarch64-unknown-linux-musl"),
    ] {
        let path = sbom_path(arch);
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (run `cargo xtask image`)", path.display()));
        let bom: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(bom["bomFormat"], "CycloneDX");
        assert_eq!(bom["specVersion"], "1.5");
        let meta = &bom["metadata"];
        assert_eq!(meta["component"]["name"], "eks-pod-identity-agent");
        assert_eq!(meta["component"]["version"], VERSION);
        let props = meta["properties"].as_array().unwrap();
        assert!(props.contains(
            &serde_json::json!({"name": "oci:platform", "value": format!("linux/{arch}")})
        ));
        assert!(props.contains(&serde_json::json!({"name": "cargo:target", "value": target})));

        let components = bom["components"].as_array().unwrap();
        let by_name: BTreeMap<&str, &Value> = components
            .iter()
            .map(|c| (c["name"].as_str().unwrap(), c))
            .collect();
        let how = |name: &str| by_name[name]["properties"][0]["value"].as_str().unwrap();
        for linked in [
            "aya",
            "aws-sdk-eksauth",
            "aws-config",
            "tokio",
            "hyper",
            "rustls",
            "aws-lc-sys",
            "mimalloc",
            "agent-common",
        ] {
            assert!(by_name.contains_key(linked), "{arch}: {linked} missing");
            assert_eq!(how(linked), "linked", "{arch}: {linked}");
        }
        for embedded in ["agent-ebpf", "aya-ebpf"] {
            assert!(by_name.contains_key(embedded), "{arch}: {embedded} missing");
            assert_eq!(how(embedded), "embedded eBPF object", "{arch}: {embedded}");
        }
        // Not in the binary: dev and build dependencies, procedural macros, the test harness.
        for absent in [
            "proptest",
            "aya-build",
            "cargo_metadata",
            "serde_derive",
            "thiserror-impl",
            "e2e",
            "xtask",
        ] {
            assert!(!by_name.contains_key(absent), "{arch}: {absent} listed");
        }
        // Every registry crate is pinned by the checksum cargo verified it against.
        for c in components {
            let (name, version) = (c["name"].as_str().unwrap(), c["version"].as_str().unwrap());
            assert_eq!(c["purl"], format!("pkg:cargo/{name}@{version}"));
            let hash = c["hashes"][0]["content"].as_str();
            assert_eq!(
                hash,
                sums.get(&(name.to_owned(), version.to_owned()))
                    .map(String::as_str),
                "{arch}: {name} {version}"
            );
        }
    }
}
