//! Clients that run inside pods: the real SDKs' container credential providers, and raw HTTP for bad input.
//!
//! The SDK clients (`sdk-client`, this crate's binary on `aws-config`'s default chain, and
//! `clients/botocore_client.py` on botocore's `ContainerProvider`) read only
//! `AWS_CONTAINER_CREDENTIALS_FULL_URI` and `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE` and print one JSON line.
//! Everything else `AWS_*` is cleared so no other provider of the chain can answer.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::netns::NetNs;
use crate::node::Pod;

/// What both SDK clients print on success.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientCredentials {
    /// Access key id.
    pub access_key_id: String,
    /// Secret access key.
    pub secret_access_key: String,
    /// Session token.
    pub session_token: String,
    /// Account id, if the SDK exposes it.
    #[serde(default)]
    pub account_id: Option<String>,
    /// Expiry, RFC 3339.
    #[serde(default)]
    pub expiry: Option<String>,
}

/// An SDK client that exited non-zero (or printed something unparseable).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientFailure {
    /// Exit code, if the client exited normally.
    pub exit_code: Option<i32>,
    /// Its stderr (the SDK's error), or a note on what could not be parsed.
    pub stderr: String,
}

impl std::fmt::Display for ClientFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "client failed (exit {:?}): {}",
            self.exit_code,
            self.stderr.trim()
        )
    }
}

impl std::error::Error for ClientFailure {}

/// The outcome of one SDK fetch: credentials, or the client's error.
pub type FetchOutcome = std::result::Result<ClientCredentials, ClientFailure>;

/// The botocore client script.
#[must_use]
pub fn botocore_script() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/clients/botocore_client.py"
    ))
}

/// The `sdk-client` binary: `$E2E_SDK_CLIENT_BIN`, else next to the running executable.
pub fn sdk_client_bin() -> Result<PathBuf> {
    crate::locate_binary(
        "E2E_SDK_CLIENT_BIN",
        "sdk-client",
        "run `cargo build -p e2e` first",
    )
}

impl Pod {
    /// The environment a pod with a pod identity association gets, pointing at `uri`, plus what keeps
    /// every other credential source of the SDKs away.
    #[must_use]
    pub fn client_env(&self, uri: &str) -> Vec<(String, String)> {
        let missing = self.dir().join("no-such-aws-file");
        let missing = missing.to_string_lossy().into_owned();
        vec![
            ("AWS_CONTAINER_CREDENTIALS_FULL_URI".into(), uri.into()),
            (
                "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE".into(),
                self.token_path().to_string_lossy().into_owned(),
            ),
            ("AWS_EC2_METADATA_DISABLED".into(), "true".into()),
            ("AWS_CONFIG_FILE".into(), missing.clone()),
            ("AWS_SHARED_CREDENTIALS_FILE".into(), missing),
        ]
    }

    /// Fetches credentials from `uri` with botocore's `ContainerProvider`, as this pod.
    pub fn fetch_with_botocore(&self, uri: &str) -> Result<FetchOutcome> {
        let script = botocore_script();
        let mut cmd = self.command("python3");
        cmd.arg(&script).envs(self.client_env(uri));
        let out = cmd.output().context("running the botocore client")?;
        Ok(parse_client_output(&out))
    }

    /// Fetches credentials from `uri` with the Rust SDK's default chain (`sdk-client`), as this pod.
    pub fn fetch_with_rust_sdk(&self, uri: &str) -> Result<FetchOutcome> {
        let bin = sdk_client_bin()?;
        let mut cmd = self.command(&bin.to_string_lossy());
        cmd.envs(self.client_env(uri));
        let out = cmd.output().context("running sdk-client")?;
        Ok(parse_client_output(&out))
    }

    /// Sends `request` to `addr` from the *test process*, on a socket created inside this pod's network
    /// namespace (so the kernel sees the test process's cgroup, not the pod's). Reads until the response is
    /// complete, the peer closes, or `timeout`.
    pub fn raw_http(
        &self,
        addr: SocketAddr,
        request: &[u8],
        timeout: Duration,
    ) -> Result<RawResponse> {
        raw_http_in(self.netns(), addr, request, timeout)
    }

    /// Sends `request` to `addr` from a process running *as this pod* (its cgroup and network namespace),
    /// through a small Python sender. Connection errors (e.g. `PermissionError` when refused by eBPF) come
    /// back as the error, with the sender's stderr.
    pub fn raw_http_as_pod(
        &self,
        addr: SocketAddr,
        request: &[u8],
        timeout: Duration,
    ) -> Result<RawResponse> {
        let mut cmd = self.command("python3");
        cmd.args([
            "-c",
            RAW_SENDER,
            &addr.ip().to_string(),
            &addr.port().to_string(),
        ])
        .arg(timeout.as_secs_f64().to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd.spawn().context("spawning the raw HTTP sender")?;
        if let Some(mut stdin) = child.stdin.take() {
            // The sender reads all of stdin before it connects, so this cannot deadlock on stdout.
            stdin
                .write_all(request)
                .context("writing the request to the sender")?;
        }
        let out = child
            .wait_with_output()
            .context("waiting for the raw HTTP sender")?;
        if !out.status.success() {
            bail!(
                "raw HTTP sender failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        RawResponse::parse(&out.stdout)
    }
}

fn parse_client_output(out: &Output) -> FetchOutcome {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        return Err(ClientFailure {
            exit_code: out.status.code(),
            stderr,
        });
    }
    let line = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_default();
    serde_json::from_str(line).map_err(|e| ClientFailure {
        exit_code: out.status.code(),
        stderr: format!("unparseable client output ({e}): {stdout:?}; stderr: {stderr}"),
    })
}

const RAW_SENDER: &str = r"
import socket, sys
host, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
data = sys.stdin.buffer.read()
family = socket.AF_INET6 if ':' in host else socket.AF_INET
s = socket.socket(family, socket.SOCK_STREAM)
s.settimeout(timeout)
s.connect((host, port))
s.sendall(data)
out = b''
try:
    while True:
        b = s.recv(65536)
        if not b:
            break
        out += b
except (socket.timeout, ConnectionResetError):
    pass
sys.stdout.buffer.write(out)
";

/// Sends raw bytes to `addr` on a socket created inside `netns` (from this process) and reads the response.
pub fn raw_http_in(
    netns: &NetNs,
    addr: SocketAddr,
    request: &[u8],
    timeout: Duration,
) -> Result<RawResponse> {
    netns.run(|| raw_http(addr, request, timeout))?
}

/// Sends raw bytes to `addr` from the current network namespace and reads the response (until it is
/// complete, the peer closes, or `timeout`).
pub fn raw_http(addr: SocketAddr, request: &[u8], timeout: Duration) -> Result<RawResponse> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_millis(200)))?;
    stream.write_all(request).context("sending the request")?;
    let raw = read_response(&mut stream, timeout)?;
    RawResponse::parse(&raw)
}

/// A `GET path` with `Host` = the address and `Connection: close`, sent from inside `netns`.
pub fn http_get_in(
    netns: &NetNs,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<RawResponse> {
    let request = RawRequest::get(path).host(&addr.to_string()).to_bytes();
    raw_http_in(netns, addr, &request, timeout)
}

fn read_response(stream: &mut TcpStream, timeout: Duration) -> Result<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    while Instant::now() < deadline {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if RawResponse::is_complete(&buf) {
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset && !buf.is_empty() => break,
            Err(e) => return Err(e).context("reading the response"),
        }
    }
    Ok(buf)
}

/// A hand-built HTTP/1.1 request, for inputs no SDK would send.
#[derive(Debug, Clone)]
pub struct RawRequest {
    /// Method.
    pub method: String,
    /// Request target.
    pub path: String,
    /// Headers in order (duplicates allowed).
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
}

impl RawRequest {
    /// `GET path` with no headers yet.
    #[must_use]
    pub fn get(path: &str) -> Self {
        Self {
            method: "GET".into(),
            path: path.into(),
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    /// Sets the method.
    #[must_use]
    pub fn method(mut self, method: &str) -> Self {
        method.clone_into(&mut self.method);
        self
    }

    /// Adds a header (any bytes the caller likes, within a `String`).
    #[must_use]
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Adds `Host`.
    #[must_use]
    pub fn host(self, host: &str) -> Self {
        self.header("Host", host)
    }

    /// Adds `Authorization` (the raw token, as the SDKs send it).
    #[must_use]
    pub fn authorization(self, value: &str) -> Self {
        self.header("Authorization", value)
    }

    /// Sets a body (and `Content-Length`).
    #[must_use]
    pub fn body(mut self, body: &[u8]) -> Self {
        self.body = body.to_vec();
        self
    }

    /// Serializes, adding `Connection: close` (unless a `Connection` header is present) and
    /// `Content-Length` when there is a body.
    #[must_use]
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = format!("{} {} HTTP/1.1\r\n", self.method, self.path).into_bytes();
        for (k, v) in &self.headers {
            out.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
        }
        if !self
            .headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("connection"))
        {
            out.extend_from_slice(b"Connection: close\r\n");
        }
        if !self.body.is_empty() {
            out.extend_from_slice(format!("Content-Length: {}\r\n", self.body.len()).as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&self.body);
        out
    }
}

/// A parsed HTTP/1.x response.
#[derive(Debug, Clone)]
pub struct RawResponse {
    /// Status code.
    pub status: u16,
    /// Headers in order (names as sent).
    pub headers: Vec<(String, String)>,
    /// Body (de-chunked).
    pub body: Vec<u8>,
}

impl RawResponse {
    /// Parses a response; fails if there is none (e.g. the server closed without answering).
    pub fn parse(raw: &[u8]) -> Result<Self> {
        let Some(end) = find(raw, b"\r\n\r\n") else {
            bail!(
                "no complete HTTP response (got {} bytes: {:?})",
                raw.len(),
                String::from_utf8_lossy(raw)
            );
        };
        let head = String::from_utf8_lossy(&raw[..end]);
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("bad status line {status_line:?}"))?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect();
        let rest = &raw[end + 4..];
        let chunked = headers.iter().any(|(k, v)| {
            k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
        });
        let body = if chunked {
            dechunk(rest).0
        } else {
            rest.to_vec()
        };
        Ok(Self {
            status,
            headers,
            body,
        })
    }

    /// The first header of that (case-insensitive) name.
    #[must_use]
    pub fn header(&self, name: &str) -> Option<&str> {
        crate::find_header(&self.headers, name)
    }

    /// The body as text (lossy).
    #[must_use]
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON.
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_slice(&self.body)
            .with_context(|| format!("response body is not JSON: {}", self.body_text()))
    }

    /// Whether `raw` holds a whole response (headers plus the body its framing announces).
    fn is_complete(raw: &[u8]) -> bool {
        let Some(end) = find(raw, b"\r\n\r\n") else {
            return false;
        };
        let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
        let rest = &raw[end + 4..];
        if head.contains("transfer-encoding: chunked") {
            return dechunk(rest).1;
        }
        let length = head
            .split("\r\n")
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok());
        length.is_some_and(|n| rest.len() >= n)
    }
}

/// Decodes a chunked body; also says whether the terminating chunk was seen.
fn dechunk(mut raw: &[u8]) -> (Vec<u8>, bool) {
    let mut body = Vec::new();
    while let Some(line_end) = find(raw, b"\r\n") {
        let size_text = String::from_utf8_lossy(&raw[..line_end]);
        let Ok(size) = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
        else {
            return (body, false);
        };
        if size == 0 {
            return (body, true);
        }
        let start = line_end + 2;
        if raw.len() < start + size {
            body.extend_from_slice(&raw[start..]);
            return (body, false);
        }
        body.extend_from_slice(&raw[start..start + size]);
        raw = raw.get(start + size + 2..).unwrap_or_default();
    }
    (body, false)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// How a python client reaches the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `AF_INET` to `169.254.170.23`.
    V4,
    /// `AF_INET6` to `fd00:ec2::23`.
    V6,
    /// `AF_INET6` to `::ffff:169.254.170.23` (IPv4 on an IPv6 socket).
    V4Mapped,
}

impl Family {
    fn arg(self) -> &'static str {
        match self {
            Self::V4 => "v4",
            Self::V6 => "v6",
            Self::V4Mapped => "v4mapped",
        }
    }
}

/// One request of [`Pod::python_requests`]: the response, or the socket error.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct PyExchange {
    /// HTTP status, when a response came.
    pub status: Option<u16>,
    /// Response headers (names lowercase).
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    /// Response body.
    #[serde(default)]
    pub body: String,
    /// The client's local port for this request (same port = same connection).
    pub local_port: Option<u16>,
    /// The error, if the request failed at the socket level.
    pub error: Option<String>,
    /// Its errno (1 = `EPERM`, what a refusal by the agent's eBPF program looks like).
    pub errno: Option<i32>,
}

impl PyExchange {
    /// The first header of that (case-insensitive) name.
    #[must_use]
    pub fn header(&self, name: &str) -> Option<&str> {
        crate::find_header(&self.headers, name)
    }
}

/// What [`Pod::python_requests`] did: the client's pid and each request.
#[derive(Debug, Clone, Deserialize)]
pub struct PyRequests {
    /// `os.getpid()` of the client (the pid the kernel saw).
    pub pid: u32,
    /// Each request, in order.
    pub exchanges: Vec<PyExchange>,
}

impl PyRequests {
    /// Parses the client's output.
    pub fn parse(out: &Output) -> Result<Self> {
        parse_py_json(out, "python credential client")
    }
}

/// One connect of [`Pod::connect_flood`].
#[derive(Debug, Clone, Deserialize)]
pub struct ConnectAttempt {
    /// `v4`, `v6` or `v4mapped`.
    pub family: String,
    /// 0 when connected, else the errno (1 = `EPERM`).
    pub errno: i32,
    /// How long `connect()` took, in microseconds.
    pub elapsed_us: u64,
}

/// What [`Pod::connect_flood`] did.
#[derive(Debug, Clone, Deserialize)]
pub struct FloodReport {
    /// The flooder's pid.
    pub pid: u32,
    /// Every connect, in order.
    pub attempts: Vec<ConnectAttempt>,
}

impl FloodReport {
    /// Parses the flooder's output.
    pub fn parse(out: &Output) -> Result<Self> {
        parse_py_json(out, "connect flooder")
    }

    /// Connects that succeeded.
    #[must_use]
    pub fn connected(&self) -> usize {
        self.attempts.iter().filter(|a| a.errno == 0).count()
    }

    /// Connects refused with `errno`.
    #[must_use]
    pub fn failed_with(&self, errno: i32) -> usize {
        self.attempts.iter().filter(|a| a.errno == errno).count()
    }
}

fn parse_py_json<T: serde::de::DeserializeOwned>(out: &Output, what: &str) -> Result<T> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let line = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_default();
    serde_json::from_str(line).with_context(|| format!("{what} printed {stdout:?}"))
}

const PY_REQUESTS: &str = r"
import http.client, json, os, sys
family, token_file, count, keep_alive = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == '1'
target = {'v4': '169.254.170.23', 'v6': 'fd00:ec2::23', 'v4mapped': '::ffff:169.254.170.23'}[family]
host = {'v4': '169.254.170.23', 'v6': '[fd00:ec2::23]', 'v4mapped': '169.254.170.23'}[family]
out = {'pid': os.getpid(), 'exchanges': []}
conn = None
for _ in range(count):
    ex = {}
    try:
        if conn is None:
            conn = http.client.HTTPConnection(target, 80, timeout=5)
        with open(token_file) as f:
            token = f.read()
        headers = {'Host': host, 'Authorization': token}
        if not keep_alive:
            headers['Connection'] = 'close'
        conn.request('GET', '/v1/credentials', headers=headers)
        ex['local_port'] = conn.sock.getsockname()[1]
        r = conn.getresponse()
        ex['status'] = r.status
        ex['headers'] = [[k.lower(), v] for k, v in r.getheaders()]
        ex['body'] = r.read().decode('utf-8', 'replace')
        if not keep_alive:
            conn.close()
            conn = None
    except OSError as e:
        ex['error'] = repr(e)
        ex['errno'] = e.errno
        conn = None
    out['exchanges'].append(ex)
print(json.dumps(out))
";

const PY_FLOOD: &str = r"
import json, os, socket, sys, time
families, min_attempts, duration, pause = sys.argv[1].split(','), int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
targets = {
    'v4': (socket.AF_INET, ('169.254.170.23', 80)),
    'v6': (socket.AF_INET6, ('fd00:ec2::23', 80)),
    'v4mapped': (socket.AF_INET6, ('::ffff:169.254.170.23', 80)),
}
attempts = []
end = time.monotonic() + duration
i = 0
while i < min_attempts or time.monotonic() < end:
    family = families[i % len(families)]
    i += 1
    af, addr = targets[family]
    s = socket.socket(af, socket.SOCK_STREAM)
    s.settimeout(3)
    t0 = time.monotonic()
    try:
        s.connect(addr)
        err = 0
    except OSError as e:
        err = e.errno or -1
    elapsed = time.monotonic() - t0
    s.close()
    attempts.append({'family': family, 'errno': err, 'elapsed_us': int(elapsed * 1e6)})
    if pause > 0:
        time.sleep(pause)
print(json.dumps({'pid': os.getpid(), 'attempts': attempts}))
";

impl Pod {
    /// A python client (`http.client`, comm `python3`) that sends `count` credential requests with the
    /// token read from `token_file` (on one keep-alive connection, or one connection each), as this pod.
    /// Spawn it for concurrency; [`PyRequests::parse`] its output.
    #[must_use]
    pub fn python_requests_command(
        &self,
        family: Family,
        token_file: &std::path::Path,
        count: usize,
        keep_alive: bool,
    ) -> std::process::Command {
        let mut cmd = self.command("python3");
        cmd.args(["-c", PY_REQUESTS, family.arg()])
            .arg(token_file)
            .arg(count.to_string())
            .arg(if keep_alive { "1" } else { "0" });
        cmd
    }

    /// Runs [`Pod::python_requests_command`] and waits for it.
    pub fn python_requests(
        &self,
        family: Family,
        token_file: &std::path::Path,
        count: usize,
        keep_alive: bool,
    ) -> Result<PyRequests> {
        let out = self
            .python_requests_command(family, token_file, count, keep_alive)
            .output()
            .context("running the python credential client")?;
        PyRequests::parse(&out)
    }

    /// A python process that opens TCP connections to the agent (cycling through `families`) as fast as
    /// it can (`pause` between them), at least `min_attempts` times and for at least `duration`, closing
    /// each at once. Spawn it for concurrency; [`FloodReport::parse`] its output.
    #[must_use]
    pub fn connect_flood_command(
        &self,
        families: &[Family],
        min_attempts: usize,
        duration: Duration,
        pause: Duration,
    ) -> std::process::Command {
        let families: Vec<&str> = families.iter().map(|f| f.arg()).collect();
        let mut cmd = self.command("python3");
        cmd.args(["-c", PY_FLOOD, &families.join(",")])
            .arg(min_attempts.to_string())
            .arg(duration.as_secs_f64().to_string())
            .arg(pause.as_secs_f64().to_string());
        cmd
    }

    /// Runs [`Pod::connect_flood_command`] and waits for it.
    pub fn connect_flood(
        &self,
        families: &[Family],
        min_attempts: usize,
        duration: Duration,
        pause: Duration,
    ) -> Result<FloodReport> {
        let out = self
            .connect_flood_command(families, min_attempts, duration, pause)
            .output()
            .context("running the connect flooder")?;
        FloodReport::parse(&out)
    }
}
