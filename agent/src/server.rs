//! `server`: assembles the agent from its parts and runs it until a shutdown signal.
//!
//! Order: metrics first (everything counts into them); the credential sockets next, bound but not
//! listening (connections are refused), so the eBPF programs can watch exactly the addresses that
//! are up; then the programs; then EKS Auth, the cache and the endpoint; then the credential
//! sockets listen — so no connection is accepted, nor even queued, before attribution is in place
//! (under `enforce`, a restart refuses connections for a moment, never requests with 403); and
//! last the probe and metrics ports, whose `/readyz` reports the credential listeners. With
//! every socket bound and the programs attached, the server gives up all its capabilities
//! ([`capabilities`]).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::attribution::{Attribution, Policy};
use crate::audit::{AuditCounters, AuditError, AuditLog};
use crate::capabilities::{self, CapabilityError};
use crate::cgroup::{self, CgroupResolver, KubeletLayout};
use crate::clock::Clock;
use crate::config::{RateLimit, ServerConfig, TokenBinding};
use crate::credentials::cache::CredentialCache;
use crate::credentials::eks_auth::{EksAuth, EksAuthSetupError};
use crate::ebpf::{self, AttachConfig, EbpfError, Programs};
use crate::http::Endpoint;
use crate::kubernetes::Kubernetes;
use crate::kubernetes::events::names_from_cache;
use crate::listener::{self, Accepting, BindError};
use crate::metrics::{Metrics, MetricsError, NamespaceLabels};
use crate::probe_listener;
use crate::probes::{Probes, Readiness};
use crate::shutdown;
use crate::validation::{StartError, Validator};

/// How often the kernel's counters are read into the metrics, and idle pods' request allowances
/// forgotten: in the background, so that a scrape only renders.
const BACKGROUND_EVERY: Duration = Duration::from_secs(5);

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("building the metrics registry")]
    Metrics(#[from] MetricsError),
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error("none of the bind hosts {0:?} is on this host: run `initialize` first")]
    NoListener(Vec<IpAddr>),
    #[error("--token-binding enforce needs the eBPF programs, and they could not be attached")]
    EbpfRequired(#[source] AttachError),
    #[error(transparent)]
    EksAuth(#[from] EksAuthSetupError),
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error("dropping the capabilities once set up")]
    Capabilities(#[source] CapabilityError),
    #[error(transparent)]
    Validation(#[from] StartError),
}

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

/// Runs the server until SIGTERM or SIGINT.
pub async fn run(config: ServerConfig) -> Result<(), ServerError> {
    serve(config, shutdown::on_signal()).await
}

/// Runs the server until `shutdown` is cancelled, then drains and returns.
pub async fn serve(config: ServerConfig, shutdown: CancellationToken) -> Result<(), ServerError> {
    tracing::info!(
        version = crate::VERSION,
        commit = crate::COMMIT,
        cluster = %config.cluster_name,
        "starting the EKS Pod Identity Agent"
    );
    let metrics = Metrics::new()?;

    // Bound, not listening: until attribution is in place, connections are refused.
    let mut credential_sockets = Vec::new();
    for host in &config.bind_hosts {
        let addr = SocketAddr::new(*host, config.port);
        match listener::bind(addr) {
            Ok(bound) => credential_sockets.push(bound),
            Err(e) if e.address_missing() => {
                tracing::warn!(%addr, error = %e.source, "bind host is not on this host; skipping it");
            }
            Err(e) => return Err(e.into()),
        }
    }
    if credential_sockets.is_empty() {
        return Err(ServerError::NoListener(config.bind_hosts.clone()));
    }
    let targets: Vec<SocketAddr> = credential_sockets
        .iter()
        .map(listener::Bound::local_addr)
        .collect();

    let (programs, attribution) = attach(&config, targets, &metrics)?;
    let attribution = Arc::new(attribution);
    release_freed_memory();

    let eks_auth = EksAuth::new(config.cluster_name.clone(), &config.upstream).await?;
    let clock = Clock::System;
    let cache = CredentialCache::new(
        eks_auth,
        config.cache.clone(),
        clock,
        metrics.clone(),
        attribution.keep_predicate(),
    );
    let (audit, audit_writer) = match &config.attribution.audit {
        Some(sink) => {
            let (log, writer) = AuditLog::start(
                sink.clone(),
                config.attribution.audit_rotation,
                config.attribution.audit_queue,
                AuditCounters::new(&metrics),
            )?;
            (Some(log), Some(writer))
        }
        None => (None, None),
    };
    let namespaces = Arc::new(NamespaceLabels::new(
        config.attribution.namespace_label_limit,
    ));
    // Off by default: with both features off, nothing of the Kubernetes client exists.
    let (kubernetes, event_recorder) = match Kubernetes::new(
        &config.kubernetes,
        config.attribution.node_name.clone(),
        &metrics,
    ) {
        Some((kubernetes, recorder)) => (Some((kubernetes, names_from_cache(&cache))), recorder),
        None => (None, None),
    };
    let validator = Validator::start(&config.validation, &config.kubernetes, &metrics).await?;
    let endpoint = Arc::new(
        Endpoint::new(
            cache,
            config.bind_hosts.clone(),
            config.global_rate,
            attribution.clone(),
            audit,
            metrics.clone(),
            namespaces.clone(),
            clock,
        )
        .with_events(event_recorder)
        .with_validator(validator),
    );

    let mut tasks = JoinSet::new();
    let mut accepting = Vec::new();
    for bound in credential_sockets {
        // Attribution is in place: from here on every connection has its kernel record.
        let l = bound.listen()?;
        let ready = Accepting::default();
        accepting.push(ready.clone());
        let endpoint = endpoint.clone();
        let attribution = attribution.clone();
        if let Ok(addr) = l.local_addr() {
            tracing::info!(%addr, "serving credentials");
        }
        tasks.spawn(listener::serve(
            l,
            move |peer, local| {
                let attribution = attribution.clone();
                async move { attribution.admit(peer, local).await }
            },
            move |req, connection| {
                let endpoint = endpoint.clone();
                async move { endpoint.handle(req, &connection.caller).await }
            },
            ready,
            shutdown.clone(),
            config.drain_timeout,
        ));
    }
    drop(endpoint);

    tasks.spawn(background(
        programs.clone(),
        attribution.clone(),
        namespaces,
        metrics.clone(),
        shutdown.clone(),
    ));

    let readiness = Readiness::new(accepting);
    // In the background: the start-up never waits for the Kubernetes API.
    if let Some((kubernetes, names)) = kubernetes {
        tasks.spawn(kubernetes.run(readiness.clone(), names, shutdown.clone()));
    }
    let probe_addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), config.probe_port);
    let metrics_addr = SocketAddr::new(config.metrics_address, config.metrics_port);
    spawn_probes(
        &mut tasks,
        probe_addr,
        Probes {
            readiness: readiness.clone(),
            metrics: None,
        },
        &shutdown,
    )?;
    spawn_probes(
        &mut tasks,
        metrics_addr,
        Probes {
            readiness,
            metrics: Some(metrics.clone()),
        },
        &shutdown,
    )?;
    tracing::info!(%probe_addr, %metrics_addr, "serving probes and metrics");
    // Everything is attached and bound: nothing from here on needs a capability.
    match tokio::task::spawn_blocking(capabilities::drop_all).await {
        Ok(Ok(())) => tracing::info!("dropped every capability"),
        Ok(Err(e)) => return Err(ServerError::Capabilities(e)),
        Err(e) => tracing::error!(error = %e, "the capability drop did not finish"),
    }

    while let Some(done) = tasks.join_next().await {
        if let Err(e) = done {
            tracing::error!(error = %e, "a listener task failed");
        }
    }
    // Every request is finished: the audit queue has all its records.
    if let Some(writer) = audit_writer {
        writer.finish().await;
    }
    drop(programs);
    tracing::info!("stopped");
    Ok(())
}

fn spawn_probes(
    tasks: &mut JoinSet<()>,
    addr: SocketAddr,
    probes: Probes,
    shutdown: &CancellationToken,
) -> Result<(), BindError> {
    let l = probe_listener::bind(addr)?;
    tasks.spawn(probe_listener::serve(
        l,
        probes,
        probe_listener::LIMITS,
        shutdown.clone(),
    ));
    Ok(())
}

/// Loads and attaches the eBPF programs. Without them the agent serves unattributed, unless
/// binding is enforced: then it refuses to start, since it could not keep its promise.
/// Gives back to the system the memory the start-up freed: loading the eBPF programs parses the
/// kernel's BTF (about 19 MB of heap for a few milliseconds), and both allocators would keep much
/// of it for the life of the agent — glibc's in its arenas, mimalloc (the image's) in this
/// thread's heap, which it purges only when the thread allocates again, and this one goes idle.
fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks and shrinks the allocator's own free lists; it is
    // thread-safe and takes no pointer.
    unsafe {
        libc::malloc_trim(0);
    }
    #[cfg(target_env = "musl")]
    // SAFETY: mi_collect frees and purges the calling thread's heap (and abandoned segments);
    // it takes no pointer and is safe to call at any time.
    unsafe {
        libmimalloc_sys::mi_collect(true);
    }
}

fn attach(
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
/// namespace where a request from it has shown it, else `unknown`), keeps the kernel's pod parents
/// and per-pod state current, and forgets idle pods' request allowances. Map reads and cgroup
/// resolution are blocking: on the blocking pool.
async fn background(
    programs: Option<Arc<Programs>>,
    attribution: Arc<Attribution>,
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
        let (programs, attribution, namespaces, metrics) = (
            programs.clone(),
            attribution.clone(),
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
                    let after = count_denied(programs, &attribution, &namespaces, &metrics, before);
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

/// Adds what each cgroup was refused since `before` (cgroup id → refusals already counted);
/// returns the new counts, of the cgroups the kernel still has.
fn count_denied(
    programs: &Programs,
    attribution: &Attribution,
    namespaces: &NamespaceLabels,
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
            let namespace = attribution.namespace_of_cgroup(cgroup_id);
            let label = namespaces.label(namespace.as_deref().unwrap_or("unknown"));
            metrics
                .connections_denied
                .with_label_values(&[&label])
                .inc_by(c.denied - counted);
        }
        after.insert(cgroup_id, c.denied);
    }
    after
}
