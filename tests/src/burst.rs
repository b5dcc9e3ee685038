//! A burst of pods' first credential requests, each made by botocore's own container provider (its
//! retry policy untouched: 3 attempts, 2 s timeout, 1 s apart), for the throttling end-to-end test and
//! the bench.
//!
//! Hundreds of real pods (network namespaces, veths, cgroups) would measure the harness more than the
//! agent, and a node holds at most 254. Instead each of the `n` pods is a token of its own (a distinct
//! pod name and UID, one association), fetched by a thread of its own — its own `ContainerProvider`,
//! fetcher and connection — in a few python processes, each running as one of the node's client pods with
//! at most [`THREADS_PER_CLIENT_POD`] threads, under the agent's default `--pod-max-connections` (64).
//! Every process is set up first and all start together.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use crate::fake_eks_auth::{FakeEksAuth, TokenSpec};
use crate::node::{CREDENTIALS_URI_V4, Pod, SimNode};

/// Pods (threads) per client process and client pod: under the agent's default cap of 64 open
/// connections per pod.
pub const THREADS_PER_CLIENT_POD: usize = 60;

/// The burst client script.
#[must_use]
pub fn botocore_burst_script() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/clients/botocore_burst.py"
    ))
}

/// What one pod's SDK got.
#[derive(Debug, Clone, Deserialize)]
pub struct PodOutcome {
    /// Credentials at the end.
    pub ok: bool,
    /// Seconds from the first attempt to the end (credentials or the SDK's error).
    pub elapsed: f64,
    /// Attempts botocore made.
    pub attempts: u32,
    /// The SDK's error, when it failed.
    pub error: Option<String>,
}

/// A burst's result.
#[derive(Debug, Clone)]
pub struct BurstReport {
    /// Each pod's outcome.
    pub outcomes: Vec<PodOutcome>,
    /// Calls EKS Auth received from the start of the burst until the last pod's SDK was done.
    pub upstream_calls: u64,
    /// Of those, answered `ThrottlingException` by its rate limit.
    pub throttled: u64,
    /// From the start until the last pod's SDK was done.
    pub wall: Duration,
    /// When EKS Auth had issued credentials for every pod's token (the agent goes on fetching the
    /// tokens of pods whose SDK gave up, so that a retry is a hit), if it did within the settle time.
    pub all_issued_after: Option<Duration>,
    /// Calls, and throttled calls, until then.
    pub settled_calls: u64,
    pub settled_throttled: u64,
}

impl BurstReport {
    /// Pods whose SDK got credentials.
    #[must_use]
    pub fn served(&self) -> usize {
        self.outcomes.iter().filter(|o| o.ok).count()
    }

    /// Throttled calls as a share of all calls, during the burst.
    #[must_use]
    pub fn throttled_share(&self) -> f64 {
        if self.upstream_calls == 0 {
            0.0
        } else {
            self.throttled as f64 / self.upstream_calls as f64
        }
    }

    /// The `p`th percentile (0–100) of the served pods' time to credentials.
    #[must_use]
    pub fn percentile(&self, p: usize) -> Option<Duration> {
        let mut times: Vec<f64> = self
            .outcomes
            .iter()
            .filter(|o| o.ok)
            .map(|o| o.elapsed)
            .collect();
        times.sort_by(f64::total_cmp);
        let i = (times.len() * p / 100).min(times.len().checked_sub(1)?);
        times.get(i).map(|s| Duration::from_secs_f64(*s))
    }

    /// How many served pods needed 1, 2 and 3 attempts.
    #[must_use]
    pub fn attempts(&self) -> [usize; 3] {
        let mut by = [0; 3];
        for o in self.outcomes.iter().filter(|o| o.ok) {
            if let Some(slot) = by.get_mut(o.attempts.saturating_sub(1) as usize) {
                *slot += 1;
            }
        }
        by
    }

    /// One line for logs.
    #[must_use]
    pub fn summary(&self) -> String {
        let ms = |d: Option<Duration>| {
            d.map_or_else(|| "-".to_owned(), |d| format!("{} ms", d.as_millis()))
        };
        format!(
            "{} pods: {} got credentials (attempts 1/2/3: {:?}); {} EKS Auth calls, {} throttled ({:.1}%); \
             time to credentials p50 {}, p99 {}, max {}; burst over in {} ms; every token issued after {}",
            self.outcomes.len(),
            self.served(),
            self.attempts(),
            self.upstream_calls,
            self.throttled,
            100.0 * self.throttled_share(),
            ms(self.percentile(50)),
            ms(self.percentile(99)),
            ms(self.percentile(100)),
            self.wall.as_millis(),
            ms(self.all_issued_after),
        )
    }
}

/// Mints `n` pod tokens of `namespace`/`service_account` (distinct pod names and UIDs, this node's node
/// claims) and writes them, as the kubelet does, into `dir`.
pub fn write_burst_tokens(
    fake: &FakeEksAuth,
    node: &SimNode,
    namespace: &str,
    service_account: &str,
    n: usize,
    dir: &Path,
) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    (0..n)
        .map(|i| {
            let spec = TokenSpec::new(namespace, service_account)
                .pod(&format!("burst-{i}"), &uuid::Uuid::new_v4().to_string())
                .node(node.name(), node.uid());
            let token = fake.issue_token(&spec)?;
            let path = dir.join(format!("token-{i}"));
            std::fs::write(&path, token.as_bytes())
                .with_context(|| format!("writing {}", path.display()))?;
            Ok(path)
        })
        .collect()
}

/// Client pods needed for `n` pods' tokens.
#[must_use]
pub fn client_pods_for(n: usize) -> usize {
    n.div_ceil(THREADS_PER_CLIENT_POD)
}

/// Fetches every token at once from the agent on 169.254.170.23, [`THREADS_PER_CLIENT_POD`] per
/// client pod, then waits up to `settle` for EKS Auth to have issued every token.
pub fn run_burst(
    clients: &[Pod],
    fake: &FakeEksAuth,
    token_files: &[PathBuf],
    settle: Duration,
) -> Result<BurstReport> {
    let groups: Vec<&[PathBuf]> = token_files.chunks(THREADS_PER_CLIENT_POD).collect();
    if groups.len() > clients.len() {
        bail!(
            "{} tokens need {} client pods, got {}",
            token_files.len(),
            groups.len(),
            clients.len()
        );
    }
    let script = botocore_burst_script();
    let mut children: Vec<(Child, std::thread::JoinHandle<String>)> = Vec::new();
    for (pod, files) in clients.iter().zip(&groups) {
        let mut cmd = pod.command("python3");
        cmd.arg(&script)
            .arg(CREDENTIALS_URI_V4)
            .args(*files)
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().context("spawning a burst client")?;
        let stderr = child.stderr.take().context("the client's stderr")?;
        let mut stderr = BufReader::new(stderr);
        let mut line = String::new();
        stderr
            .read_line(&mut line)
            .context("waiting for a burst client to be ready")?;
        if line.trim() != "ready" {
            let mut rest = String::new();
            let _ = stderr.read_to_string(&mut rest);
            bail!("a burst client did not start: {line}{rest}");
        }
        // Drain the rest, so that a chatty client never blocks on a full pipe.
        let drain = std::thread::spawn(move || {
            let mut rest = String::new();
            let _ = stderr.read_to_string(&mut rest);
            rest
        });
        children.push((child, drain));
    }
    let (calls_before, throttled_before) = (fake.calls(), fake.throttled());
    let issued_before = fake.issued().len();
    let started = Instant::now();
    for (child, _) in &mut children {
        let stdin = child.stdin.as_mut().context("the client's stdin")?;
        stdin
            .write_all(b"go\n")
            .context("starting a burst client")?;
        stdin.flush()?;
    }
    let mut outcomes = Vec::with_capacity(token_files.len());
    for (child, drain) in children {
        let out = child
            .wait_with_output()
            .context("waiting for a burst client")?;
        let stderr = drain.join().unwrap_or_default();
        if !out.status.success() {
            bail!("a burst client failed ({}): {stderr}", out.status);
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or_default();
        let mut got: Vec<PodOutcome> = serde_json::from_str(line)
            .with_context(|| format!("a burst client printed {stdout:?}; stderr: {stderr}"))?;
        outcomes.append(&mut got);
    }
    let wall = started.elapsed();
    let upstream_calls = fake.calls() - calls_before;
    let throttled = fake.throttled() - throttled_before;
    let deadline = started + wall + settle;
    let mut all_issued_after = None;
    loop {
        if fake.issued().len() - issued_before >= token_files.len() {
            all_issued_after = Some(started.elapsed());
            break;
        }
        if Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(BurstReport {
        outcomes,
        upstream_calls,
        throttled,
        wall,
        all_issued_after,
        settled_calls: fake.calls() - calls_before,
        settled_throttled: fake.throttled() - throttled_before,
    })
}

/// The forged-token flood's client script.
#[must_use]
pub fn forged_flood_script() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/clients/forged_flood.py"
    ))
}

/// Writes `n` distinct forged tokens of `spec`, one a line, to `path`: well shaped, with valid
/// claims (each its own `jti`), so that they pass every check the agent can make, but signed with
/// a key EKS Auth does not know — it answers `InvalidTokenException`.
pub fn write_forged_tokens(
    fake: &FakeEksAuth,
    spec: &TokenSpec,
    n: usize,
    path: &Path,
) -> Result<()> {
    let key = jsonwebtoken::EncodingKey::from_secret(b"not the issuer's key");
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some("e2e".to_owned());
    let genuine = crate::fake_eks_auth::decode_unverified(&fake.issue_token(spec)?)?;
    let mut out = String::new();
    for i in 0..n {
        let mut claims = genuine.clone();
        claims.jti = format!("forged-{i}-{}", uuid::Uuid::new_v4());
        out.push_str(&jsonwebtoken::encode(&header, &claims, &key).context("forging a token")?);
        out.push('\n');
    }
    std::fs::write(path, out).with_context(|| format!("writing {}", path.display()))
}

/// What the flooding pod saw.
#[derive(Debug, Clone, Deserialize)]
pub struct FloodReport {
    /// Tokens fired (each on a connection of its own).
    pub attempted: u64,
    /// Requests sent.
    pub sent: u64,
    /// Connections refused or failed.
    pub connect_failed: u64,
    /// Failed connections by the error's kind (`PermissionError`: refused by the kernel).
    pub errors: std::collections::BTreeMap<String, u64>,
    /// Answers within the hold, by status (`unanswered` when none came).
    pub statuses: std::collections::BTreeMap<String, u64>,
    /// How long the flood took.
    pub seconds: f64,
}

/// A flood running in the background as `pod`: every token of `tokens` on a new connection to
/// `host`, `rate` a second, each connection dropped after `hold`.
pub struct Flood(Child);

impl Flood {
    pub fn start(pod: &Pod, host: &str, tokens: &Path, rate: u32, hold: Duration) -> Result<Flood> {
        let mut cmd = pod.command("python3");
        cmd.arg(forged_flood_script())
            .arg(host)
            .arg(tokens)
            .arg(rate.to_string())
            .arg(hold.as_secs_f64().to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd.spawn().map(Flood).context("spawning the flood")
    }

    /// Waits for the flood to end.
    pub fn finish(self) -> Result<FloodReport> {
        let out = self.0.wait_with_output().context("waiting for the flood")?;
        if !out.status.success() {
            bail!(
                "the flood failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        serde_json::from_slice(&out.stdout).context("the flood's report")
    }
}
