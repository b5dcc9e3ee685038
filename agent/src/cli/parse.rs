//! The value parsers the flags share.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

/// `169.254.170.23`, `fd00:ec2::23` or `[fd00:ec2::23]`.
pub fn parse_bind_host(s: &str) -> Result<IpAddr, String> {
    let bare = s
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .unwrap_or(s);
    bare.parse()
        .map_err(|_| format!("{s:?} is not an IP address (IPv6 may be in brackets)"))
}

/// A cgroup path below another, as kubelet's `--cgroup-root` is written (`/kubelet`, `/a/b`,
/// `/kubelet.slice`): no `.` or `..`, not empty, not the root itself.
pub fn parse_cgroup_subpath(s: &str) -> Result<PathBuf, String> {
    use std::path::Component;
    let path = PathBuf::from(s);
    let mut names = 0;
    for c in path.components() {
        match c {
            Component::RootDir => {}
            Component::Normal(_) => names += 1,
            _ => return Err(format!("{s:?}: a cgroup path without . or ..")),
        }
    }
    if names == 0 {
        return Err(format!(
            "{s:?}: name a cgroup below the root, as kubelet's --cgroup-root (e.g. /kubelet)"
        ));
    }
    Ok(path)
}

/// Go-style durations as the original takes them: `3h`, `90m`, `1h30m`, `45s`, `0`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(s).map_err(|e| format!("{s:?} is not a duration like 3h or 90m: {e}"))
}

/// A timeout: a duration as [`parse_duration`] reads it (`500ms`, `1s`, `3s500ms`), never zero.
pub fn parse_timeout(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d.is_zero() => Err(format!("{s:?}: a timeout must be longer than 0")),
        d => Ok(d),
    }
}

/// A size in bytes, bare or with a unit: `K`/`M`/`G` (powers of 1000, also `KB`, `MB`, `GB`)
/// or `Ki`/`Mi`/`Gi` (powers of 1024, also `KiB`, `MiB`, `GiB`).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let digits = s
        .trim()
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(s.trim().len());
    let (number, unit) = s.trim().split_at(digits);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 100Mi, 50MB or 1048576"))?;
    let factor: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "m" | "mb" => 1_000_000,
        "g" | "gb" => 1_000_000_000,
        "ki" | "kib" => 1 << 10,
        "mi" | "mib" => 1 << 20,
        "gi" | "gib" => 1 << 30,
        _ => {
            return Err(format!(
                "{s:?} has an unknown unit {unit:?} (use K, M, G, Ki, Mi or Gi)"
            ));
        }
    };
    number
        .checked_mul(factor)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// A taint key as Kubernetes takes it (a qualified name): an optional DNS subdomain prefix and `/`,
/// then a name of at most 63 characters, alphanumerics with `-`, `_` or `.` inside.
pub fn parse_taint_key(s: &str) -> Result<String, String> {
    let (prefix, name) = match s.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, s),
    };
    let name_ok = !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                    && label.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                    && label
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            })
    });
    if name_ok && prefix_ok {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "{s:?} is not a taint key (an optional DNS prefix and /, then a name like agent-not-ready)"
        ))
    }
}

/// A boolean as the original's flag library (Go's `strconv.ParseBool`) takes it.
pub fn parse_bool(s: &str) -> Result<bool, String> {
    match s {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => Err(format!("{s:?} is not a boolean (true or false)")),
    }
}

/// A level name (ours, and the original's logrus names: panic and fatal log errors), or the
/// numbers 0 error, 1 warn, 2 info, 3 debug, 4 and up trace.
pub fn parse_verbosity(s: &str) -> Result<tracing::Level, String> {
    use tracing::Level;
    match s.to_ascii_lowercase().as_str() {
        "0" | "error" | "fatal" | "panic" => Ok(Level::ERROR),
        "1" | "warn" | "warning" => Ok(Level::WARN),
        "2" | "info" => Ok(Level::INFO),
        "3" | "debug" => Ok(Level::DEBUG),
        "trace" => Ok(Level::TRACE),
        n if n.parse::<u8>().is_ok_and(|n| n >= 4) => Ok(Level::TRACE),
        _ => Err(format!(
            "{s:?} is not a level (panic, fatal, error, warn, warning, info, debug, trace, or 0-4)"
        )),
    }
}
