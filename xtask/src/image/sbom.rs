//! The SBOM: a CycloneDX 1.5 JSON document of the crates in one platform's binary, written beside
//! the image.
//!
//! The crates are what cargo itself resolves for the build, not a guess from the lock file:
//! `cargo tree -p eks-pod-identity-agent --target <target> -e normal,no-proc-macro` (features as
//! `cargo build -p` resolves them; no build or dev dependencies, no procedural macros: none of
//! their code is in the binary), plus the eBPF crate's own tree for `bpfel-unknown-none`, whose
//! object the build script embeds in the binary (cargo does not see it as a dependency, so generic
//! tools such as cargo-cyclonedx leave aya-ebpf out). Each crate's licence and repository come from
//! `cargo metadata`, its SHA-256 from `Cargo.lock` (the checksum cargo verifies the download
//! against). No timestamp: the same tree gives the same document.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::{Context as _, Result, anyhow, bail};
use cargo_metadata::{MetadataCommand, Package};
use serde_json::{Value, json};

use super::platform::Platform;
use super::{AGENT, VERSION};
use crate::util;

/// The eBPF crate and its target: its object is embedded in the agent.
const EBPF_CRATE: &str = "agent-ebpf";
const EBPF_TARGET: &str = "bpfel-unknown-none";

/// Writes `platform`'s SBOM to `path`.
pub fn write(platform: Platform, path: &Path) -> Result<()> {
    let metadata = MetadataCommand::new()
        .manifest_path(util::workspace_root().join("Cargo.toml"))
        .exec()
        .context("cargo metadata")?;
    let by_id: BTreeMap<(String, String), &Package> = metadata
        .packages
        .iter()
        .map(|p| ((p.name.to_string(), p.version.to_string()), p))
        .collect();
    let lock = std::fs::read_to_string(util::workspace_root().join("Cargo.lock"))
        .context("reading Cargo.lock")?;
    let checksums = lock_checksums(&lock);

    let linked = tree(AGENT, platform.target)?;
    let embedded = tree(EBPF_CRATE, EBPF_TARGET)?;
    let mut components = Vec::new();
    for (crates, how) in [(&linked, "linked"), (&embedded, "embedded eBPF object")] {
        for key in crates.iter().filter(|k| k.0 != AGENT) {
            // A crate in both (agent-common) is listed once, as linked.
            if how != "linked" && linked.contains(key) {
                continue;
            }
            let package = by_id
                .get(key)
                .ok_or_else(|| anyhow!("{} {} is not in cargo metadata", key.0, key.1))?;
            components.push(component(package, checksums.get(key), how));
        }
    }
    let bom = json!({
        "bomFormat": "CycloneDX",
        "specVersion": "1.5",
        "version": 1,
        "metadata": {
            "tools": { "components": [{ "type": "application", "name": "cargo xtask image" }] },
            "component": {
                "type": "application",
                "bom-ref": purl(AGENT, VERSION),
                "name": AGENT,
                "version": VERSION,
                "purl": purl(AGENT, VERSION),
            },
            "properties": [
                { "name": "oci:platform", "value": format!("linux/{}", platform.arch) },
                { "name": "cargo:target", "value": platform.target },
            ],
        },
        "components": components,
    });
    let text = serde_json::to_string_pretty(&bom).context("serializing the SBOM")?;
    std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
}

/// One crate as a CycloneDX component.
fn component(package: &Package, sha256: Option<&String>, how: &str) -> Value {
    let purl = purl(&package.name, &package.version.to_string());
    let mut c = json!({
        "type": "library",
        "bom-ref": purl,
        "name": package.name.to_string(),
        "version": package.version.to_string(),
        "purl": purl,
        "properties": [{ "name": "agent:in-binary", "value": how }],
    });
    if let Some(license) = &package.license {
        c["licenses"] = json!([{ "expression": license }]);
    }
    if let Some(sha256) = sha256 {
        c["hashes"] = json!([{ "alg": "SHA-256", "content": sha256 }]);
    }
    if let Some(repository) = &package.repository {
        c["externalReferences"] = json!([{ "type": "vcs", "url": repository }]);
    }
    c
}

/// The package URL of a crate (`pkg:cargo/<name>@<version>`).
fn purl(name: &str, version: &str) -> String {
    format!("pkg:cargo/{name}@{version}")
}

/// `(name, version)` of every crate `cargo tree` shows for `package` on `target`: normal
/// dependencies only, without procedural macros.
fn tree(package: &str, target: &str) -> Result<BTreeSet<(String, String)>> {
    let root = util::workspace_root()
        .to_str()
        .ok_or_else(|| anyhow!("the workspace path is not UTF-8"))?;
    let args = [
        "tree",
        "--manifest-path",
        &format!("{root}/Cargo.toml"),
        "--locked",
        "-p",
        package,
        "--target",
        target,
        "-e",
        "normal,no-proc-macro",
        "--prefix",
        "none",
        "-f",
        "{p}",
    ];
    let Some(out) = util::output("cargo", &args) else {
        bail!("`cargo {}` failed", args.join(" "));
    };
    let crates = parse_tree(&out);
    if !crates.iter().any(|(name, _)| name == package) {
        bail!("`cargo tree -p {package}` does not list {package}:\n{out}");
    }
    Ok(crates)
}

/// `(name, version)` of each line `name vX.Y.Z[ (path)][ (*)]` of `cargo tree --prefix none`.
fn parse_tree(out: &str) -> BTreeSet<(String, String)> {
    out.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let name = words.next()?;
            let version = words.next()?.strip_prefix('v')?;
            Some((name.to_owned(), version.to_owned()))
        })
        .collect()
}

/// `(name, version)` → `checksum` of every registry package in a `Cargo.lock`.
fn lock_checksums(lock: &str) -> BTreeMap<(String, String), String> {
    let value = |line: &str, key: &str| -> Option<String> {
        let rest = line.strip_prefix(key)?.trim_start().strip_prefix('=')?;
        Some(rest.trim().trim_matches('"').to_owned())
    };
    let mut checksums = BTreeMap::new();
    for block in lock.split("[[package]]").skip(1) {
        let (mut name, mut version, mut checksum) = (None, None, None);
        for line in block.lines() {
            name = name.or_else(|| value(line, "name"));
            version = version.or_else(|| value(line, "version"));
            checksum = checksum.or_else(|| value(line, "checksum"));
        }
        if let (Some(n), Some(v), Some(c)) = (name, version, checksum) {
            checksums.insert((n, v), c);
        }
    }
    checksums
}

#[cfg(test)]
mod tests {
    use super::{lock_checksums, parse_tree};

    #[test]
    fn reads_cargo_trees_lines() {
        let out = "eks-pod-identity-agent v0.1.0 (/w/agent)\naya v0.14.0\nlibc v0.2.170\n\
                   agent-common v0.1.0 (/w/agent-common)\nlibc v0.2.170 (*)\n\n";
        let crates: Vec<_> = parse_tree(out).into_iter().collect();
        assert_eq!(
            crates,
            [
                ("agent-common", "0.1.0"),
                ("aya", "0.14.0"),
                ("eks-pod-identity-agent", "0.1.0"),
                ("libc", "0.2.170"),
            ]
            .map(|(n, v)| (n.to_owned(), v.to_owned()))
        );
    }

    #[test]
    fn reads_the_lock_files_checksums_of_registry_packages_only() {
        let lock = "version = 4\n\n[[package]]\nname = \"agent-common\"\nversion = \"0.1.0\"\n\
                    dependencies = [\n \"aya\",\n]\n\n[[package]]\nname = \"aya\"\nversion = \"0.14.0\"\n\
                    source = \"registry+https://github.com/rust-lang/crates.io-index\"\n\
                    checksum = \"ab12\"\n";
        let sums = lock_checksums(lock);
        assert_eq!(sums.len(), 1);
        assert_eq!(sums[&("aya".to_owned(), "0.14.0".to_owned())], "ab12");
    }
}

#[cfg(test)]
mod workspace_tests {
    use super::super::platform::ARM64;

    /// The SBOM of this workspace's arm64 binary, as `cargo xtask image` writes it (cargo tree and
    /// cargo metadata run for real; nothing is built).
    #[test]
    fn the_arm64_sbom_lists_linked_and_embedded_crates_but_no_build_or_dev_dependency() {
        let path = std::env::temp_dir().join(format!("xtask-sbom-{}.json", std::process::id()));
        super::write(ARM64, &path).unwrap();
        let bom: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let _ = std::fs::remove_file(&path);
        let how = |name: &str| {
            bom["components"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["name"] == name)
                .map(|c| c["properties"][0]["value"].as_str().unwrap().to_owned())
        };
        assert_eq!(how("aws-sdk-eksauth").as_deref(), Some("linked"));
        assert_eq!(how("mimalloc").as_deref(), Some("linked"));
        assert_eq!(how("aya-ebpf").as_deref(), Some("embedded eBPF object"));
        for absent in ["proptest", "aya-build", "serde_derive", "xtask"] {
            assert_eq!(how(absent), None, "{absent}");
        }
    }
}
