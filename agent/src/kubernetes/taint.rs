//! The startup taint: nodes register with it (Karpenter `startupTaints`, a node group's taints,
//! kubelet `--register-with-taints`), the agent tolerates it, and removes it from its own node
//! once it serves, so that pods land only where credentials can be had.
//!
//! "Serves" is what `/readyz` reports: every credential listener accepts, which the server lets
//! happen only after the eBPF programs are attached (or have degraded as configured). Then:
//! GET the node; if it carries the key (with any effect), PATCH the taints without it — the
//! other taints as they were — with the node's `resourceVersion` as a precondition, so that a
//! taint another controller added in between is never lost: on a conflict, read again and
//! retry. Any other failure (API down, forbidden, node not found) is retried with backoff until
//! shutdown; credentials are served all along.

use crate::backoff::Backoff;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Taint};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::{KubeApi, Operation, TaintMetrics, status_code};
use crate::listener::Readiness;

/// The default `--startup-taint-key`, after the CSI drivers' and Cilium's `<component>/agent-not-ready`.
pub const DEFAULT_STARTUP_TAINT: &str = "eks-pod-identity-agent.amazonaws.com/agent-not-ready";

/// How often readiness is looked at before the taint goes.
const READY_POLL: Duration = Duration::from_millis(50);
/// Conflicts retried at once (a fresh read each) before backing off like any failure.
const MAX_QUICK_CONFLICTS: u32 = 5;

/// Which taint to remove from which node, and how long to wait between failed attempts.
#[derive(Debug, Clone)]
pub struct Removal {
    pub node: String,
    pub key: String,
    /// The wait between failed attempts.
    pub backoff: Backoff,
}

/// What one attempt found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The taint was there and is gone.
    Removed,
    /// The node does not carry the taint (any more).
    Absent,
}

/// Why one attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum AttemptError {
    #[error("reading node {node}")]
    Get {
        node: String,
        #[source]
        source: kube::Error,
    },
    #[error("node {node} changed since it was read (resourceVersion {resource_version})")]
    Conflict {
        node: String,
        resource_version: String,
    },
    #[error("patching the taints of node {node}")]
    Patch {
        node: String,
        #[source]
        source: kube::Error,
    },
    #[error("node {node} has no resourceVersion")]
    NoResourceVersion { node: String },
}

/// Waits until `readiness` holds, then removes the taint (retrying as described above) and
/// sets `metrics.removed` to 1. Returns when done or at shutdown.
pub async fn remove_when_ready<A: KubeApi>(
    api: A,
    removal: Removal,
    readiness: Readiness,
    metrics: TaintMetrics,
    shutdown: CancellationToken,
) {
    metrics.removed.set(0);
    while !readiness.is_ready() {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(READY_POLL) => {}
        }
    }
    let mut failures = 0;
    let mut conflicts = 0;
    loop {
        let attempt = tokio::select! {
            () = shutdown.cancelled() => return,
            attempt = attempt(&api, &removal.node, &removal.key) => attempt,
        };
        match attempt {
            Ok(outcome) => {
                metrics.removed.set(1);
                match outcome {
                    Outcome::Removed => {
                        tracing::info!(node = %removal.node, key = %removal.key, "removed the startup taint");
                    }
                    Outcome::Absent => {
                        tracing::info!(node = %removal.node, key = %removal.key, "the node has no startup taint to remove");
                    }
                }
                return;
            }
            Err(e @ AttemptError::Conflict { .. }) if conflicts < MAX_QUICK_CONFLICTS => {
                conflicts += 1;
                metrics.errors.count(Operation::PatchNode);
                tracing::debug!(reason = %e, "the node changed meanwhile: reading it again");
                continue;
            }
            Err(e) => {
                metrics.errors.count(match e {
                    AttemptError::Get { .. } => Operation::GetNode,
                    _ => Operation::PatchNode,
                });
                failures += 1;
                tracing::warn!(error = %crate::error_chain(&e), retry_in_s = removal.backoff.after(failures).as_secs_f64(), "removing the startup taint failed; serving on and retrying");
            }
        }
        conflicts = 0;
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(jittered(removal.backoff.after(failures))) => {}
        }
    }
}

/// One read and, if the taint is there, one conditional patch.
pub async fn attempt<A: KubeApi>(api: &A, node: &str, key: &str) -> Result<Outcome, AttemptError> {
    let current = api
        .get_node(node)
        .await
        .map_err(|source| AttemptError::Get {
            node: node.to_owned(),
            source,
        })?;
    if !carries(&current, key) {
        return Ok(Outcome::Absent);
    }
    let resource_version = current.metadata.resource_version.clone().ok_or_else(|| {
        AttemptError::NoResourceVersion {
            node: node.to_owned(),
        }
    })?;
    let patch = removal_patch(&current, key, &resource_version);
    match api.patch_node(node, &patch).await {
        Ok(_) => Ok(Outcome::Removed),
        Err(e) if status_code(&e) == Some(409) => Err(AttemptError::Conflict {
            node: node.to_owned(),
            resource_version,
        }),
        Err(source) => Err(AttemptError::Patch {
            node: node.to_owned(),
            source,
        }),
    }
}

fn taints(node: &Node) -> &[Taint] {
    node.spec
        .as_ref()
        .and_then(|s| s.taints.as_deref())
        .unwrap_or_default()
}

/// Whether `node` carries a taint with `key` (whatever its effect).
pub fn carries(node: &Node, key: &str) -> bool {
    taints(node).iter().any(|t| t.key == key)
}

/// The merge patch that removes every taint with `key` from `node` and keeps the others as they
/// are, in order, conditional on `resource_version`.
///
/// A merge patch replaces the whole list (taints have no merge key), so the precondition is what
/// keeps a taint added concurrently: the API refuses the patch with 409 if the node changed.
pub fn removal_patch(node: &Node, key: &str, resource_version: &str) -> serde_json::Value {
    let kept: Vec<&Taint> = taints(node).iter().filter(|t| t.key != key).collect();
    json!({
        "metadata": {"resourceVersion": resource_version},
        "spec": {"taints": kept},
    })
}

/// `wait` plus up to a fifth more, so that the agents of many nodes whose API calls failed
/// together do not retry together.
fn jittered(wait: Duration) -> Duration {
    wait + wait.mul_f64(rand::random::<f64>() / 5.0)
}

#[cfg(test)]
mod tests;
