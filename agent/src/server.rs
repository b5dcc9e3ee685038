//! `server`: assembles the agent from its parts and runs it until a shutdown signal.
//!
//! Order: metrics first (everything counts into them); the credential listeners next, so the
//! eBPF programs can watch exactly the addresses that are up; then the programs (before serving,
//! so the first requests are attributed); then EKS Auth, the cache and the endpoint; and last the
//! probe and metrics ports, whose `/readyz` reports the credential listeners.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::attribution::Attribution;
use crate::audit::{AuditError, AuditLog};
use crate::cgroup::CgroupResolver;
use crate::clock::Clock;
use crate::config::{ServerConfig, TokenBinding};
use crate::credentials::cache::CredentialCache;
use crate::credentials::eks_auth::{EksAuth, EksAuthSetupError};
use crate::ebpf::{self, AttachConfig, EbpfError, Programs};
use crate::http::Endpoint;
use crate::listener::{self, Accepting, BindError};
use crate::metrics::{Metrics, MetricsError, NamespaceLabels};
use crate::probes::{OnScrape, Probes, Readiness};
use crate::shutdown;

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
    EbpfRequired(#[source] EbpfError),
    #[error(transparent)]
    EksAuth(#[from] EksAuthSetupError),
    #[error(transparent)]
    Audit(#[from] AuditError),
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

    let mut credential_listeners = Vec::new();
    for host in &config.bind_hosts {
        let addr = SocketAddr::new(*host, config.port);
        match listener::bind(addr) {
            Ok(l) => credential_listeners.push(l),
            Err(e) if e.address_missing() => {
                tracing::warn!(%addr, error = %e.source, "bind host is not on this host; skipping it");
            }
            Err(e) => return Err(e.into()),
        }
    }
    if credential_listeners.is_empty() {
        return Err(ServerError::NoListener(config.bind_hosts.clone()));
    }
    let targets: Vec<SocketAddr> = credential_listeners
        .iter()
        .filter_map(|l| l.local_addr().ok())
        .collect();

    let (programs, attribution) = attach(&config, targets, &metrics)?;
    let attribution = Arc::new(attribution);

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
                metrics.audit_dropped.clone(),
            )?;
            (Some(log), Some(writer))
        }
        None => (None, None),
    };
    let namespaces = Arc::new(NamespaceLabels::new(
        config.attribution.namespace_label_limit,
    ));
    let endpoint = Arc::new(Endpoint::new(
        cache,
        config.bind_hosts.clone(),
        config.global_rate,
        attribution.clone(),
        audit,
        metrics.clone(),
        namespaces.clone(),
        clock,
    ));

    let mut tasks = JoinSet::new();
    let mut accepting = Vec::new();
    for l in credential_listeners {
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
                async move { attribution.identify(peer, local).await }
            },
            move |req, caller| {
                let endpoint = endpoint.clone();
                async move { endpoint.handle(req, &caller).await }
            },
            ready,
            shutdown.clone(),
            config.drain_timeout,
        ));
    }
    drop(endpoint);

    let readiness = Readiness::new(accepting);
    let on_scrape = programs
        .as_ref()
        .map(|p| kernel_counters_sync(p.clone(), attribution.clone(), namespaces, metrics.clone()));
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
            metrics: Some((metrics.clone(), on_scrape)),
        },
        &shutdown,
    )?;
    tracing::info!(%probe_addr, %metrics_addr, "serving probes and metrics");

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
    let l = listener::bind(addr)?;
    tasks.spawn(listener::serve(
        l,
        |_, _| std::future::ready(()),
        move |req, _| {
            let response = probes.handle(&req);
            async move { response }
        },
        Accepting::default(),
        shutdown.clone(),
        std::time::Duration::from_secs(1),
    ));
    Ok(())
}

/// Loads and attaches the eBPF programs. Without them the agent serves unattributed, unless
/// binding is enforced: then it refuses to start, since it could not keep its promise.
fn attach(
    config: &ServerConfig,
    targets: Vec<SocketAddr>,
    metrics: &Metrics,
) -> Result<(Option<Arc<Programs>>, Attribution), ServerError> {
    let a = &config.attribution;
    let loaded = ebpf::cgroup2_mount_root().and_then(|mount_root| {
        let cgroup_root = a.cgroup_root.clone().unwrap_or_else(|| mount_root.clone());
        let programs = Programs::load_and_attach(&AttachConfig {
            cgroup_root: cgroup_root.clone(),
            targets,
            connect_rate: a.pod_connect.per_second,
            connect_burst: a.pod_connect.burst,
        })?;
        tracing::info!(cgroup_root = %cgroup_root.display(), "eBPF attribution attached");
        Ok((programs, mount_root))
    });
    match loaded {
        Ok((programs, mount_root)) => {
            metrics.ebpf_attached.set(1);
            let attribution = Attribution::new(
                Some(programs.callers()),
                Some(Arc::new(CgroupResolver::new(mount_root))),
                a.token_binding,
                a.node_name.clone(),
                a.pod_request,
            );
            Ok((Some(Arc::new(programs)), attribution))
        }
        Err(e) if a.token_binding == TokenBinding::Enforce => Err(ServerError::EbpfRequired(e)),
        Err(e) => {
            metrics.ebpf_attached.set(0);
            tracing::warn!(error = %crate::error_chain(&e), "eBPF attribution unavailable: serving without it (binding: unattributed)");
            let attribution = Attribution::new(
                None,
                None,
                a.token_binding,
                a.node_name.clone(),
                a.pod_request,
            );
            Ok((None, attribution))
        }
    }
}

/// Adds the kernel's per-cgroup refusal counts to `pod_identity_connections_denied_total`,
/// labelled with the pod's namespace where a request from it has shown it (else `unknown`).
fn kernel_counters_sync(
    programs: Arc<Programs>,
    attribution: Arc<Attribution>,
    namespaces: Arc<NamespaceLabels>,
    metrics: Metrics,
) -> OnScrape {
    let seen = Mutex::new(std::collections::HashMap::<u64, u64>::new());
    Arc::new(move || {
        let Ok(counters) = programs.connect_counters() else {
            return;
        };
        let Ok(mut seen) = seen.lock() else {
            return;
        };
        for (cgroup_id, c) in counters {
            let before = seen.insert(cgroup_id, c.denied).unwrap_or(0);
            if c.denied > before {
                let namespace = attribution.namespace_of_cgroup(cgroup_id);
                let label = namespaces.label(namespace.as_deref().unwrap_or("unknown"));
                metrics
                    .connections_denied
                    .with_label_values(&[&label])
                    .inc_by(c.denied - before);
            }
        }
    })
}
