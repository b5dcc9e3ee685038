//! The EKS Pod Identity Agent, with kernel attribution.
//!
//! A request follows the modules in this order:
//!
//! - [`listener`]: binds the credential endpoints, accepts connections, caps and limits them, and
//!   drains them on shutdown.
//! - [`http`]: routes and validates a request (`Host`, method, path, token), and is the one place
//!   that turns errors into HTTP responses ([`http::error`]).
//! - [`attribution`]: who is calling, from the kernel: the eBPF record of the connection
//!   ([`ebpf`]), the caller's cgroup and pod ([`cgroup`]), token binding and per-pod limits.
//! - [`token`]: the projected service-account token's claims, read but not verified.
//! - [`validation`]: new tokens' signatures checked with the cluster's keys, when at hand.
//! - [`proof`]: what vouches for a request's identity: the kernel, a signature, EKS Auth.
//! - [`credentials`]: the retriever trait, the EKS Auth client, and the cache that wraps it.
//! - [`audit`] and [`metrics`]: what happened, for security teams and for Prometheus;
//!   [`audit_who`] answers from the audit log which pod and process got an access key.
//!
//! Words used throughout, one meaning each:
//!
//! - **caller**: who made a connection, as the kernel saw it: the process that called `connect()`,
//!   its cgroup, and the pod and container that cgroup belongs to ([`attribution::Caller`]).
//! - **record**: the eBPF programs' note of one connection, made at `connect()` and looked up
//!   after `accept()` by its 4-tuple ([`ebpf::Callers::lookup`]); deleted when the connection
//!   ends, by the socket that made it.
//! - **pod key**: whose allowance a caller spends: the pod the kernel placed it in, or one key
//!   for every caller placed in no pod ([`attribution::PodKey`]); never what a token claims.
//! - **limiter**: a per-pod or node-wide cap: open connections and connects (in the kernel),
//!   requests per second and each pod's Events ([`limiter`]). A limiter refuses; it never queues.
//! - **admission**: the queue and pace of calls to EKS Auth ([`credentials::admission`]): pods'
//!   first requests before renewals, each pod in its own queue, at a pace that follows EKS
//!   Auth's answers (congestion control, not a limiter). Only that.
//! - **binding**: comparing a token's pod and node claims with the caller's pod
//!   ([`attribution::Binding`]); refused under `--token-binding enforce`.
//! - **scope**: which containers of a pod may receive its credentials (the pod's annotation,
//!   [`attribution::scope`]).
//! - **proof**: what vouched for a caller's identity: the kernel (binding), a signature, EKS Auth
//!   ([`proof::Proof`]).
//! - **pod view**: this node's pods as the API server has them ([`kubernetes::pod_view`]): the
//!   names of the pod UIDs and container ids the kernel reports.
//!
//! Beside them: [`netlink`] (the `initialize` subcommand), [`probes`] (health and readiness, and
//! the metrics port), [`capabilities`] (given up once the server is set up),
//! [`kubernetes`] (the startup taint and Events on pods, only when switched on),
//! [`shutdown`], [`go_runner`] (the image's entrypoint), [`backoff`] (the one retry policy), and [`config`] (plain data, built by the command line in `main.rs`).

pub mod attribution;
pub mod audit;
pub mod audit_who;
pub mod backoff;
pub mod capabilities;
pub mod cgroup;
pub mod cli;
pub mod clock;
pub mod config;
pub mod credentials;
pub mod ebpf;
pub mod go_runner;
pub mod http;
pub mod kubernetes;
pub mod limiter;
pub mod listener;
pub mod metrics;
pub mod netlink;
pub mod probe_listener;
pub mod probes;
pub mod proof;
pub mod server;
pub mod shutdown;
pub mod token;
pub mod validation;

/// The agent's version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The git commit the binary was built from (`EKS_POD_IDENTITY_AGENT_COMMIT` at build time, else
/// `git rev-parse HEAD`, else `unknown`).
pub const COMMIT: &str = env!("EKS_POD_IDENTITY_AGENT_COMMIT");

/// What `version` prints.
pub fn version_line() -> String {
    format!("eks-pod-identity-agent version {VERSION} (commit {COMMIT})")
}

/// An error and its causes on one line, for logs and exit messages.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
