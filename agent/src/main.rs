//! `eks-pod-identity-agent`: parses the command line and hands over to the library.

use std::process::ExitCode;

use clap::Parser as _;
use pod_identity_agent::cli::{Cli, Command};
use pod_identity_agent::{netlink, server};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = match &cli.command {
        Command::Initialize(args) => args.verbosity,
        Command::Server(args) => args.verbosity,
        Command::Version => {
            println!("eks-pod-identity-agent {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
    };
    tracing_subscriber::fmt()
        .json()
        .with_max_level(level)
        .with_current_span(false)
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Initialize(args) => netlink::initialize(&args.into_config())
                .await
                .map(drop)
                .map_err(|e| server::error_chain(&e)),
            Command::Server(args) => server::run(args.into_config())
                .await
                .map_err(|e| server::error_chain(&e)),
            Command::Version => Ok(()),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "exiting");
            ExitCode::FAILURE
        }
    }
}
