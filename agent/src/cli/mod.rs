//! The command line: the original agent's subcommands and flags, with their defaults, plus the
//! attribution flags. Parsing ends in plain [`crate::config`] values.
//!
//! - this file: the subcommands, and `initialize`'s (empty) flags;
//! - [`server`]: `server`'s flags and the [`crate::config::ServerConfig`] they describe;
//! - [`parse`]: the value parsers the flags share (durations, sizes, booleans as the original
//!   spells them, log levels).

mod parse;
mod server;

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::InitializeConfig;
pub use parse::*;
pub use server::{BindingArg, ServerArgs, ValidationArg};

/// The agent's address on IPv4, as in every pod's `AWS_CONTAINER_CREDENTIALS_FULL_URI`.
pub const AGENT_IPV4: Ipv4Addr = Ipv4Addr::new(169, 254, 170, 23);
/// The agent's address on IPv6 clusters.
pub const AGENT_IPV6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x23);

#[derive(Debug, Parser)]
#[command(
    name = "eks-pod-identity-agent",
    version,
    about = "Hands AWS credentials to Kubernetes pods, and knows which pod and process asked."
)]
pub struct Cli {
    /// Log level, before or after the subcommand: error, warn, info, debug, trace (also the
    /// original's panic, fatal and warning), or 0 error … 4 trace.
    #[arg(short = 'v', long, global = true, default_value = "info", value_parser = parse_verbosity)]
    pub verbosity: tracing::Level,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Put the agent's addresses on link pod-id-link0, with routes (idempotent).
    Initialize(InitializeArgs),
    /// Serve credentials to pods.
    Server(Box<ServerArgs>),
    /// Print the version and the git commit it was built from.
    Version,
    /// Questions the audit log answers.
    #[command(subcommand)]
    Audit(AuditCommand),
}

/// `audit …` subcommands.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Which pods and processes received an access key (CloudTrail's userIdentity.accessKeyId),
    /// and when: reads the audit log and its rotated files.
    Who(AuditWhoArgs),
}

#[derive(Debug, Args)]
pub struct AuditWhoArgs {
    /// The access key id to look for (ASIA…).
    #[arg(long)]
    pub access_key_id: String,
    /// The audit log; its rotated files (PATH.1, PATH.2, …) are read too.
    #[arg(long, default_value = "/var/log/eks-pod-identity-agent/audit.log")]
    pub audit_log: PathBuf,
    /// Print JSON lines instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct InitializeArgs {}

impl InitializeArgs {
    /// The configuration of `initialize`: the original's link name and addresses.
    pub fn into_config(self) -> InitializeConfig {
        InitializeConfig {
            link_name: "pod-id-link0".to_owned(),
            ipv4: AGENT_IPV4,
            ipv6: AGENT_IPV6,
        }
    }
}

#[cfg(test)]
mod tests;
