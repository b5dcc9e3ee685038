//! EKS Auth over TLS, for tests: a test CA and a certificate for `127.0.0.1` signed by it (made with
//! the openssl CLI), and a TLS-terminating stand-in inside a node's network namespace that passes
//! each connection on to a [`crate::fake_eks_auth::FakeEksAuth`] (real rustls on the server side).

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result, bail};
use nix::sched::{CloneFlags, setns};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::netns::NetNs;

/// A test certificate authority and one server certificate it signed, for `IP:127.0.0.1`.
pub struct TestCa {
    /// The CA's certificate (PEM): the bundle a client must trust.
    pub ca_pem: PathBuf,
    cert_pem: PathBuf,
    key_pem: PathBuf,
}

impl TestCa {
    /// Makes the CA and the server certificate in `dir` (EC P-256, valid for a day).
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let p = |name: &str| dir.join(name);
        let ext = p("server.ext");
        std::fs::write(
            &ext,
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n\
             keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
        )?;
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        openssl(
            &[
                &["req", "-x509"],
                &ec[..],
                &["-days", "1", "-subj", "/CN=e2e test CA"],
            ]
            .concat(),
            &[("-keyout", &p("ca.key")), ("-out", &p("ca.pem"))],
            &[
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        )?;
        openssl(
            &[&["req"], &ec[..], &["-subj", "/CN=eks-auth stand-in"]].concat(),
            &[("-keyout", &p("server.key")), ("-out", &p("server.csr"))],
            &[],
        )?;
        openssl(
            &["x509", "-req", "-days", "1", "-set_serial", "2"],
            &[
                ("-in", &p("server.csr")),
                ("-CA", &p("ca.pem")),
                ("-CAkey", &p("ca.key")),
                ("-extfile", &ext),
                ("-out", &p("server.pem")),
            ],
            &[],
        )?;
        Ok(Self {
            ca_pem: p("ca.pem"),
            cert_pem: p("server.pem"),
            key_pem: p("server.key"),
        })
    }

    fn server_config(&self) -> Result<rustls::ServerConfig> {
        let certs = CertificateDer::pem_file_iter(&self.cert_pem)
            .context("reading the server certificate")?
            .collect::<Result<Vec<_>, _>>()
            .context("parsing the server certificate")?;
        let key = PrivateKeyDer::from_pem_file(&self.key_pem).context("reading the server key")?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS versions")?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .context("the server certificate")
    }
}

/// `openssl <args> <paths…> <tail…>`, failing with its stderr.
fn openssl(args: &[&str], paths: &[(&str, &Path)], tail: &[&str]) -> Result<()> {
    let mut cmd = Command::new("openssl");
    cmd.args(args);
    for (flag, path) in paths {
        cmd.arg(flag).arg(path);
    }
    let out = cmd.args(tail).output().context("running openssl")?;
    if !out.status.success() {
        bail!(
            "openssl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// A TLS front for an HTTP server, listening on `127.0.0.1:<ephemeral>` inside a network
/// namespace; stops when dropped.
pub struct TlsStandIn {
    addr: SocketAddr,
    handshakes: Arc<AtomicU64>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl TlsStandIn {
    /// Serves TLS with `ca`'s server certificate inside `netns`, passing every connection on to
    /// `upstream` (plain TCP, in the same namespace).
    pub fn start(netns: &NetNs, ca: &TestCa, upstream: SocketAddr) -> Result<Self> {
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(ca.server_config()?));
        let ns = File::open(netns.path()).context("opening the namespace")?;
        let handshakes = Arc::new(AtomicU64::new(0));
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let counter = Arc::clone(&handshakes);
        // Its own thread, for good: the listener and every upstream connection it opens are in the
        // namespace it joined.
        std::thread::spawn(move || {
            let setup = || -> Result<(tokio::runtime::Runtime, std::net::TcpListener)> {
                setns(&ns, CloneFlags::CLONE_NEWNET).context("setns(CLONE_NEWNET)")?;
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
                listener.set_nonblocking(true)?;
                Ok((rt, listener))
            };
            let (rt, listener) = match setup() {
                Ok(ok) => ok,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let _ = ready_tx.send(listener.local_addr().map_err(Into::into));
            rt.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                    return;
                };
                let serve = async {
                    while let Ok((tcp, _)) = listener.accept().await {
                        let (acceptor, counter) = (acceptor.clone(), Arc::clone(&counter));
                        tokio::spawn(async move {
                            let Ok(mut tls) = acceptor.accept(tcp).await else {
                                return;
                            };
                            counter.fetch_add(1, Ordering::Relaxed);
                            if let Ok(mut up) = tokio::net::TcpStream::connect(upstream).await {
                                let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
                            }
                        });
                    }
                };
                tokio::select! {
                    () = serve => {}
                    _ = stopped => {}
                }
            });
        });
        let addr = ready_rx
            .recv()
            .context("the TLS stand-in's thread ended")??;
        Ok(Self {
            addr,
            handshakes,
            stop: Some(stop),
        })
    }

    /// `https://127.0.0.1:<port>`: an EKS Auth endpoint for the agent in that namespace.
    #[must_use]
    pub fn endpoint(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// TLS handshakes completed so far (clients that trusted the certificate).
    #[must_use]
    pub fn handshakes(&self) -> u64 {
        self.handshakes.load(Ordering::Relaxed)
    }
}

impl Drop for TlsStandIn {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
