//! `cargo xtask deploy-check [--bless]`: the Helm chart (golden renders, schemas, the original's
//! values file, no phantom image, empty values, flag values), the alert rules and their runbooks, and
//! the Grafana dashboard, checked offline by `deploy/check.py` (Helm's engine from helm-python-sdk,
//! kubernetes-validate, promtool; `cargo xtask setup` installs them). No root, no cluster, no network.

use anyhow::Result;
use std::process::Command;

use crate::util;

/// The check script, relative to the workspace root.
const SCRIPT: &str = "deploy/check.py";

/// Runs the checks; with `bless`, rewrites the chart's golden renders instead of comparing them.
pub fn check(bless: bool) -> Result<()> {
    println!(
        "==> python3 {SCRIPT}{}",
        if bless { " --bless" } else { "" }
    );
    let mut cmd = Command::new("python3");
    cmd.arg(SCRIPT).current_dir(util::workspace_root());
    if bless {
        cmd.arg("--bless");
    }
    util::run(&mut cmd)
}
