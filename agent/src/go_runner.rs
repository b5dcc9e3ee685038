//! `/go-runner`: the entrypoint the original agent's Helm chart and the EKS add-on put in front of
//! every command (`/go-runner /eks-pod-identity-agent server …`).
//!
//! Kubernetes' go-runner runs a command, optionally sending its output to a file. The image ships
//! this binary a second time under that name: when started as `go-runner` it reads go-runner's
//! own flags (`-log-file`, `-also-stdout`, `-redirect-stderr`, with one or two dashes and an
//! optional `=value`), points stdout/stderr at the log file if one is given, and `exec`s the
//! command in its place, so signals and the exit code are the command's own.

use std::ffi::{CString, OsString};
use std::fs::OpenOptions;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::OpenOptionsExt as _;

/// The name this binary answers to as the wrapper.
pub const NAME: &str = "go-runner";

/// go-runner's options, before the command.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Options {
    /// Append the command's stdout (and stderr, unless `redirect_stderr` is off) to this file.
    pub log_file: Option<OsString>,
    /// With a log file: also copy output to stdout. Not supported by an `exec` (it needs a tee
    /// process), so it is refused rather than silently ignored.
    pub also_stdout: bool,
    pub redirect_stderr: bool,
    /// The command and its arguments.
    pub command: Vec<OsString>,
}

/// Why go-runner could not run the command.
#[derive(Debug, thiserror::Error)]
pub enum GoRunnerError {
    #[error("usage: go-runner [-log-file=FILE] [-redirect-stderr=true|false] COMMAND [ARG...]")]
    NoCommand,
    #[error("go-runner flag {0:?} is not known")]
    UnknownFlag(String),
    #[error("go-runner flag {flag} takes true or false, not {value:?}")]
    NotABool { flag: String, value: String },
    #[error("go-runner flag -log-file needs a file name")]
    NoLogFile,
    #[error(
        "-also-stdout is not supported: the command replaces go-runner (exec), nothing is left to copy its output"
    )]
    AlsoStdout,
    #[error("opening the log file {path:?}")]
    LogFile {
        path: OsString,
        #[source]
        source: std::io::Error,
    },
    #[error("redirecting output to the log file")]
    Redirect(#[source] nix::Error),
    #[error("an argument contains a NUL byte")]
    Nul(#[from] std::ffi::NulError),
    #[error("executing {0:?}")]
    Exec(OsString, #[source] nix::Error),
}

/// Whether this process was started as go-runner (by the name in `argv[0]`).
pub fn invoked_as_go_runner(argv0: &std::ffi::OsStr) -> bool {
    std::path::Path::new(argv0)
        .file_name()
        .is_some_and(|name| name == NAME)
}

/// Parses go-runner's flags (everything before the first argument that is not a flag, or after
/// a `--`) and the command.
pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Options, GoRunnerError> {
    let mut options = Options {
        redirect_stderr: true,
        ..Options::default()
    };
    let mut args = args.into_iter().peekable();
    while let Some(arg) = args.next_if(|a| a.as_bytes().starts_with(b"-")) {
        let text = arg.to_string_lossy().into_owned();
        if text == "--" {
            break;
        }
        let flag = text.trim_start_matches('-');
        let (name, value) = match flag.split_once('=') {
            Some((name, value)) => (name, Some(value.to_owned())),
            None => (flag, None),
        };
        let boolean = |value: Option<String>| match value.as_deref() {
            None | Some("true" | "1" | "t" | "T" | "TRUE" | "True") => Ok(true),
            Some("false" | "0" | "f" | "F" | "FALSE" | "False") => Ok(false),
            Some(other) => Err(GoRunnerError::NotABool {
                flag: name.to_owned(),
                value: other.to_owned(),
            }),
        };
        match name {
            "log-file" => {
                let file = match value {
                    Some(v) => OsString::from(v),
                    None => args.next().ok_or(GoRunnerError::NoLogFile)?,
                };
                options.log_file = Some(file);
            }
            "also-stdout" => options.also_stdout = boolean(value)?,
            "redirect-stderr" => options.redirect_stderr = boolean(value)?,
            _ => return Err(GoRunnerError::UnknownFlag(text)),
        }
    }
    options.command = args.collect();
    if options.command.is_empty() {
        return Err(GoRunnerError::NoCommand);
    }
    Ok(options)
}

/// Sets up the output and replaces this process with the command. Returns only on failure.
pub fn exec(options: Options) -> GoRunnerError {
    match try_exec(options) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

fn try_exec(options: Options) -> Result<std::convert::Infallible, GoRunnerError> {
    if let Some(path) = &options.log_file {
        if options.also_stdout {
            return Err(GoRunnerError::AlsoStdout);
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o644)
            .open(path)
            .map_err(|source| GoRunnerError::LogFile {
                path: path.clone(),
                source,
            })?;
        nix::unistd::dup2_stdout(&file).map_err(GoRunnerError::Redirect)?;
        if options.redirect_stderr {
            nix::unistd::dup2_stderr(&file).map_err(GoRunnerError::Redirect)?;
        }
    }
    let argv = options
        .command
        .iter()
        .map(|a| CString::new(a.as_bytes()))
        .collect::<Result<Vec<_>, _>>()?;
    let program = argv.first().ok_or(GoRunnerError::NoCommand)?;
    nix::unistd::execvp(program, &argv)
        .map_err(|e| GoRunnerError::Exec(options.command[0].clone(), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<OsString> {
        a.iter().map(OsString::from).collect()
    }

    #[test]
    fn the_charts_form_is_the_command_unchanged() {
        let o = parse(args(&["/eks-pod-identity-agent", "server", "-v", "trace"])).unwrap();
        assert_eq!(
            o.command,
            args(&["/eks-pod-identity-agent", "server", "-v", "trace"])
        );
        assert_eq!(o.log_file, None);
        assert!(o.redirect_stderr);
    }

    #[test]
    fn go_runner_flags_in_every_spelling() {
        let o = parse(args(&[
            "-log-file=/tmp/x",
            "--redirect-stderr=false",
            "cmd",
            "-v",
        ]))
        .unwrap();
        assert_eq!(o.log_file, Some(OsString::from("/tmp/x")));
        assert!(!o.redirect_stderr);
        assert_eq!(o.command, args(&["cmd", "-v"]));
        let o = parse(args(&["--log-file", "/tmp/y", "--", "-dash-cmd"])).unwrap();
        assert_eq!(o.log_file, Some(OsString::from("/tmp/y")));
        assert_eq!(o.command, args(&["-dash-cmd"]));
    }

    #[test]
    fn bad_invocations_say_why() {
        assert!(matches!(parse(args(&[])), Err(GoRunnerError::NoCommand)));
        assert!(matches!(
            parse(args(&["-log-file=/x"])),
            Err(GoRunnerError::NoCommand)
        ));
        assert!(matches!(
            parse(args(&["-frobnicate", "cmd"])),
            Err(GoRunnerError::UnknownFlag(_))
        ));
        assert!(matches!(
            parse(args(&["-redirect-stderr=maybe", "cmd"])),
            Err(GoRunnerError::NotABool { .. })
        ));
        assert!(invoked_as_go_runner("/go-runner".as_ref()));
        assert!(invoked_as_go_runner("go-runner".as_ref()));
        assert!(!invoked_as_go_runner("/eks-pod-identity-agent".as_ref()));
    }

    #[test]
    fn exec_failure_names_the_command() {
        let e = exec(parse(args(&["/nonexistent/command"])).unwrap());
        assert!(matches!(e, GoRunnerError::Exec(..)), "{e}");
        assert!(e.to_string().contains("/nonexistent/command"));
    }
}
