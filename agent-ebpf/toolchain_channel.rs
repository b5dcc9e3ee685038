//! The `channel` of `rust-toolchain.toml` beside this file: the dated nightly the eBPF programs are
//! built with. Not part of the eBPF crate: `agent/build.rs` (which hands it to aya-build) and
//! `xtask` (which installs it) include this one file with `#[path]`, so that both read it alike.

/// `[toolchain] channel` of the TOML `text`, when it is a string.
pub fn channel(text: &str) -> Result<String, String> {
    let toolchain: toml::Table = toml::from_str(text).map_err(|e| e.to_string())?;
    toolchain
        .get("toolchain")
        .and_then(|t| t.get("channel"))
        .and_then(toml::Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| "no `[toolchain] channel = \"…\"`".to_owned())
}
