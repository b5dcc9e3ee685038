//! The server's kernel side: attaching the eBPF programs as configured (or carrying on without
//! them where the policy allows), and the background task that keeps the kernel's state in step
//! and reads its counters into the metrics.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::ServerError;
use crate::attribution::{Attribution, Policy};
use crate::cgroup::{self, CgroupResolver, KubeletLayout};
use crate::config::{RateLimit, ServerConfig, TokenBinding};
use crate::ebpf::{self, AttachConfig, EbpfError, Programs};
use crate::kubernetes::pod_view::PodView;
use crate::metrics::{Metrics, NamespaceLabels};

/// How often the kernel's counters are read into the metrics, and idle pods' request allowances
/// forgotten: in the background, so that a scrape only renders.
const BACKGROUND_EVERY: Duration = Duration::from_secs(5);

/// Why kernel attribution could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error(transparent)]
    Ebpf(#[from] EbpfError),
    #[error(
        "no cgroup v2 hierarchy on this node (cgroup v1 only, as on Amazon Linux 2): kernel \
         attribution needs cgroup v2"
    )]
    CgroupV1,
    #[error("--cgroup-root {}: not a directory below the cgroup2 mount {}", cgroup_root.display(), mount_root.display())]
    OutsideMount {
        cgroup_root: PathBuf,
        mount_root: PathBuf,
    },
}

pub(super) fn attach(
    config: &ServerConfig,
    targets: Vec<SocketAddr>,
    metrics: &Metrics,
) -> Result<(Option<Arc<Programs>>, Attribution), ServerError> {
    let a = &config.attribution;
    let policy = Policy {
        binding: a.token_binding,
        node_name: a.node_name.clone(),
        pod_request: a.pod_request,
        pod_max_connections: a.pod_max_connections,
    };
    let refused = metrics.pod_connections_refused.clone();
    match attach_programs(config, targets) {
        Ok((programs, resolver)) => {
            metrics.ebpf_attached.set(1);
            metrics
                .ebpf_connect_limiter
                .set(i64::from(programs.connect_limiter()));
            let attribution =
                Attribution::new(Some(programs.callers()), Some(resolver), policy, refused);
            Ok((Some(Arc::new(programs)), attribution))
        }
        Err(e) if a.token_binding == TokenBinding::Enforce => Err(ServerError::EbpfRequired(e)),
        Err(e) => {
            metrics.ebpf_attached.set(0);
            tracing::warn!(error = %crate::error_chain(&e), "eBPF attribution unavailable: serving without it (binding: unattributed)");
            // Without the kernel every caller is unplaced: per-pod limits would throttle the
            // whole node as one pod.
            if a.pod_request.per_second > 0 || a.pod_max_connections > 0 {
                tracing::warn!("per-pod request and connection limits need the eBPF programs: off");
            }
            let policy = Policy {
                pod_request: RateLimit {
                    per_second: 0,
                    burst: 0,
                },
                pod_max_connections: 0,
                ..policy
            };
            Ok((None, Attribution::new(None, None, policy, refused)))
        }
    }
}

/// The programs attached at `--cgroup-root`, and the resolver of the cgroups below it.
fn attach_programs(
    config: &ServerConfig,
    targets: Vec<SocketAddr>,
) -> Result<(Programs, Arc<CgroupResolver>), AttachError> {
    let a = &config.attribution;
    let mount_root = ebpf::cgroup2_mount_root().map_err(|e| match e {
        EbpfError::NoCgroup2Mount => AttachError::CgroupV1,
        e => AttachError::Ebpf(e),
    })?;
    let cgroup_root = a.cgroup_root.clone().unwrap_or_else(|| mount_root.clone());
    // Cgroup paths are relative to the mount; pods are recognised only at the attach point.
    let scope = cgroup::path_under_mount(&mount_root, &cgroup_root).ok_or_else(|| {
        AttachError::OutsideMount {
            cgroup_root: cgroup_root.clone(),
            mount_root: mount_root.clone(),
        }
    })?;
    let layout = KubeletLayout::new(&scope, a.kubelet_cgroup_root.as_deref());
    let pod_parents = cgroup::pod_parent_dirs(&layout, &mount_root);
    let programs = Programs::load_and_attach(&AttachConfig {
        cgroup_root: cgroup_root.clone(),
        targets,
        connect_rate: a.pod_connect.per_second,
        connect_burst: a.pod_connect.burst,
        pod_parents: pod_parents.clone(),
        max_open_per_pod: kernel_open_cap(a.pod_max_connections),
        max_pods: a.max_pods,
    })?;
    tracing::info!(cgroup_root = %cgroup_root.display(), pod_parents = pod_parents.len(), "eBPF attribution attached");
    let resolver = Arc::new(CgroupResolver::new(mount_root, scope, layout));
    Ok((programs, resolver))
}

/// The kernel's cap on one pod's open connections (and on all callers outside pods together),
/// from `--pod-max-connections` (the agent's own cap, at accept). Above it: the kernel counts a
/// connection from `connect()` to its close, including those the agent closes at once at its cap
/// and those closing meanwhile. With `--max-pods`, it sizes the record maps.
fn kernel_open_cap(pod_max_connections: u32) -> u32 {
    match pod_max_connections {
        0 => ebpf::DEFAULT_MAX_OPEN_PER_POD,
        cap => cap.saturating_mul(4).max(64),
    }
}

/// Off the request path, every [`BACKGROUND_EVERY`] until shutdown: adds the kernel's
/// per-cgroup refusal counts to `pod_identity_connections_denied_total` (labelled with the pod's
/// namespace as the pod view has it, else as a request from it has shown it, else `unknown`),
/// keeps the kernel's pod parents and per-pod state current, and forgets idle pods' request
/// allowances. Map reads and cgroup
/// resolution are blocking: on the blocking pool.
pub(super) async fn background(
    programs: Option<Arc<Programs>>,
    attribution: Arc<Attribution>,
    pod_view: Option<PodView>,
    namespaces: Arc<NamespaceLabels>,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    let mut seen: HashMap<u64, u64> = HashMap::new();
    let mut events_seen = ebpf::KernelEvents::default();
    let mut tick = tokio::time::interval(BACKGROUND_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let (programs, attribution, pod_view, namespaces, metrics) = (
            programs.clone(),
            attribution.clone(),
            pod_view.clone(),
            namespaces.clone(),
            metrics.clone(),
        );
        let before = std::mem::take(&mut seen);
        let events_before = events_seen;
        let work = tokio::task::spawn_blocking(move || {
            attribution.prune();
            match &programs {
                Some(programs) => {
                    // Counted first: pruning drops the counters of pods that are gone.
                    let labels = Labels {
                        attribution: &attribution,
                        pod_view: pod_view.as_ref(),
                        namespaces: &namespaces,
                    };
                    let after = count_denied(programs, &labels, &metrics, before);
                    let events = count_kernel_events(programs, &metrics, events_before);
                    maintain_kernel_state(programs, &attribution);
                    (after, events)
                }
                None => (before, events_before),
            }
        });
        match work.await {
            Ok((after, events)) => (seen, events_seen) = (after, events),
            Err(e) => tracing::warn!(error = %e, "refreshing the kernel counters failed"),
        }
    }
}

/// Gives the programs pod parents that appeared since the start, and drops their per-pod state
/// of cgroups that are gone. Blocking: map walks and `stat`s.
fn maintain_kernel_state(programs: &Programs, attribution: &Attribution) {
    if let Err(e) = programs.refresh_pod_parents() {
        tracing::warn!(error = %crate::error_chain(&e), "refreshing the eBPF pod parents");
    }
    match programs.prune_connect_state(|id| attribution.cgroup_exists(id)) {
        Ok(pruned) if pruned != ebpf::Pruned::default() => {
            tracing::debug!(
                buckets = pruned.buckets,
                open_counters = pruned.open_counters,
                orphan_records = pruned.orphan_records,
                "pruned the kernel's per-pod state"
            );
        }
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(error = %crate::error_chain(&e), "pruning the kernel's per-pod state")
        }
    }
}

/// Adds to `pod_identity_kernel_events_total` what the programs counted since `before`; returns
/// the new totals.
fn count_kernel_events(
    programs: &Programs,
    metrics: &Metrics,
    before: ebpf::KernelEvents,
) -> ebpf::KernelEvents {
    let now = match programs.kernel_events() {
        Ok(now) => now,
        Err(e) => {
            tracing::warn!(error = %crate::error_chain(&e), "reading the kernel's event counters");
            return before;
        }
    };
    // Every series, zeros too, so that alerts on `increase()` see them from the start.
    for ((event, total), (_, counted)) in now.labelled().into_iter().zip(before.labelled()) {
        metrics
            .kernel_events
            .with_label_values(&[event])
            .inc_by(total.saturating_sub(counted));
    }
    now
}

/// What names a cgroup's namespace in the metrics.
struct Labels<'a> {
    attribution: &'a Attribution,
    pod_view: Option<&'a PodView>,
    namespaces: &'a NamespaceLabels,
}

/// Adds what each cgroup was refused since `before` (cgroup id → refusals already counted);
/// returns the new counts, of the cgroups the kernel still has.
fn count_denied(
    programs: &Programs,
    labels: &Labels<'_>,
    metrics: &Metrics,
    before: HashMap<u64, u64>,
) -> HashMap<u64, u64> {
    let counters = match programs.connect_counters() {
        Ok(counters) => counters,
        Err(e) => {
            tracing::warn!(error = %crate::error_chain(&e), "reading the kernel's connect counters");
            return before;
        }
    };
    let mut after = HashMap::with_capacity(counters.len());
    for (cgroup_id, c) in counters {
        let counted = before.get(&cgroup_id).copied().unwrap_or(0);
        if c.denied > counted {
            let namespace = labels
                .attribution
                .namespace_of_cgroup(cgroup_id, labels.pod_view);
            let label = labels
                .namespaces
                .label(namespace.as_deref().unwrap_or("unknown"));
            metrics
                .connections_denied
                .with_label_values(&[&label])
                .inc_by(c.denied - counted);
        }
        after.insert(cgroup_id, c.denied);
    }
    after
}
