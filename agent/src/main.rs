//! `eks-pod-identity-agent`: parses the command line and hands over to the library.

use std::process::ExitCode;

use clap::Parser as _;
use pod_identity_agent::cli::{AuditCommand, AuditWhoArgs, Cli, Command};
use pod_identity_agent::{audit_who, go_runner, netlink, server};

/// musl's malloc serialises every allocation on one lock and is slow on the request path; the
/// static (musl) build of the image uses mimalloc. glibc builds keep glibc's allocator.
#[cfg(target_env = "musl")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The agent's own logs at `level`; the SDK's and HTTP stack's at most at `info`, whatever the
/// verbosity: at `debug` and `trace` they log signing material and raw bodies, which carry tokens
/// and credentials.
fn log_filter(level: tracing::Level) -> tracing_subscriber::EnvFilter {
    const CAPPED: &[&str] = &[
        "aws_config",
        "aws_runtime",
        "aws_sigv4",
        "aws_smithy_runtime",
        "aws_smithy_runtime_api",
        "aws_smithy_http_client",
        "aws_smithy_http",
        "aws_sdk_eksauth",
        "aws_sdk_sts",
        "aws_sdk_sso",
        "aws_sdk_ssooidc",
        "hyper",
        "hyper_util",
        "h2",
        "rustls",
    ];
    let cap = level.min(tracing::Level::INFO);
    let mut filter = tracing_subscriber::EnvFilter::new(level.as_str());
    for target in CAPPED {
        if let Ok(directive) = format!("{target}={cap}").parse() {
            filter = filter.add_directive(directive);
        }
    }
    // kube-rs's watcher warns at every failed retry (a 403 every 30 s for ever); the pod view
    // logs once per spell of failures and counts each. Its own lines only at debug and trace.
    let watcher = if level >= tracing::Level::DEBUG {
        level
    } else {
        tracing::Level::ERROR
    };
    if let Ok(directive) = format!("kube_runtime={watcher}").parse() {
        filter = filter.add_directive(directive);
    }
    filter
}

fn main() -> ExitCode {
    // The image has this binary as `/go-runner` too: the entrypoint the original's chart and the
    // add-on put in front of every command.
    let mut args = std::env::args_os();
    if let Some(argv0) = args.next()
        && go_runner::invoked_as_go_runner(&argv0)
    {
        let error = match go_runner::parse(args) {
            Ok(options) => go_runner::exec(options),
            Err(e) => e,
        };
        eprintln!("go-runner: {}", pod_identity_agent::error_chain(&error));
        return ExitCode::from(2);
    }

    let cli = Cli::parse();
    match &cli.command {
        Command::Version => {
            println!("{}", pod_identity_agent::version_line());
            return ExitCode::SUCCESS;
        }
        Command::Audit(AuditCommand::Who(args)) => return audit_who(args),
        Command::Initialize(_) | Command::Server(_) => {}
    }
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(log_filter(cli.verbosity))
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
                .map_err(|e| pod_identity_agent::error_chain(&e)),
            Command::Server(args) => server::run(args.into_config())
                .await
                .map_err(|e| pod_identity_agent::error_chain(&e)),
            Command::Version | Command::Audit(_) => Ok(()),
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

/// `audit who`: prints the pods and processes that received the access key; exits 1 when none did.
fn audit_who(args: &AuditWhoArgs) -> ExitCode {
    match audit_who::who(&args.audit_log, &args.access_key_id) {
        Ok(found) if found.receivers.is_empty() => {
            eprintln!(
                "no allowed request received {} in {} file(s) of {}",
                args.access_key_id,
                found.files.len(),
                args.audit_log.display()
            );
            ExitCode::FAILURE
        }
        Ok(found) => {
            if args.json {
                for r in &found.receivers {
                    println!("{}", serde_json::to_string(r).unwrap_or_default());
                }
            } else {
                print!("{}", audit_who::table(&found.receivers));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("audit who: {}", pod_identity_agent::error_chain(&e));
            ExitCode::from(2)
        }
    }
}
