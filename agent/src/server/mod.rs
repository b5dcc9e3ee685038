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
//!
//! The kernel side (attaching the programs, and the background task reading their state) is in
//! [`kernel`].

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::audit::{AuditCounters, AuditError, AuditLog, Formatter};
use crate::capabilities::{self, CapabilityError};
use crate::clock::Clock;
use crate::config::ServerConfig;
use crate::credentials::cache::CredentialCache;
use crate::credentials::eks_auth::{EksAuth, EksAuthSetupError};
use crate::http::Endpoint;
use crate::kubernetes::events::names_from_view_or_cache;
use crate::kubernetes::{Handles, Kubernetes};
use crate::listener::{self, Accepting, BindError, Readiness};
use crate::metrics::{Metrics, MetricsError, NamespaceLabels};
use crate::probe_listener;
use crate::probes::Probes;
use crate::shutdown;
use crate::validation::{StartError, Validator};

mod kernel;

pub use kernel::AttachError;
use kernel::{attach, background};

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
                Formatter {
                    format: config.attribution.audit_format,
                    cluster: Some(config.cluster_name.clone()),
                    node: config.attribution.node_name.clone(),
                },
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
    // With every feature off (the pod view's `auto` finds no configuration or node name),
    // nothing of the Kubernetes client exists.
    let (kubernetes, handles) = match Kubernetes::new(
        &config.kubernetes,
        config.attribution.node_name.clone(),
        &metrics,
    ) {
        Some((kubernetes, handles)) => {
            // Events name pods as the pod view has them, else from tokens EKS Auth accepted.
            let names = names_from_view_or_cache(handles.pod_view.clone(), &cache);
            (Some((kubernetes, names)), handles)
        }
        None => (None, Handles::default()),
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
        .with_events(handles.events)
        .with_pod_view(handles.pod_view.clone())
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
                async move { attribution.attribute(peer, local).await }
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
        handles.pod_view,
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
