// SPDX-License-Identifier: Apache-2.0
//! Mutual TLS of the control plane (issue 7): a cluster CA (rcgen), the
//! certificates it issues to members, nodes and clients, and the rustls
//! configurations of `cell0d serve --tls-dir`, the Raft and forwarding
//! clients between members, and `cell0ctl --tls-dir`.
//!
//! A TLS dir holds `ca.pem` (the cluster CA's certificate), `cert.pem` and
//! `key.pem` (this party's certificate and key, mode 0600). `cell0d init-ca`
//! makes a CA dir (`ca.pem`, `ca.key`); `cell0d issue-cert` fills a TLS dir.
//! Every certificate is both a server and a client certificate: a member
//! serves gRPC and calls the other members.
//!
//! The server requires a client certificate signed by the cluster CA; a
//! client verifies the server's certificate against the same CA and the
//! address it dials (the certificate's subject alternative names).

// Start-up errors are returned once; their size does not matter.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cell0_proto::grpc;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime, pem::PemObject as _};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

/// The cluster CA's certificate, in a CA dir and in every TLS dir.
pub const CA_CERT: &str = "ca.pem";
/// The cluster CA's private key, in the CA dir only.
pub const CA_KEY: &str = "ca.key";
/// This party's certificate, in a TLS dir.
pub const CERT: &str = "cert.pem";
/// This party's private key, in a TLS dir.
pub const KEY: &str = "key.pem";
/// Default lifetime of the CA, in days.
pub const CA_DAYS: u32 = 3650;
/// Default lifetime of an issued certificate, in days.
pub const CERT_DAYS: u32 = 365;
/// Longest TLS handshake a server waits for.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most TLS handshakes a server runs at once; further connections are closed.
pub const MAX_HANDSHAKES: usize = 256;

/// Errors of the cluster CA and TLS set-up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or written.
    #[error("cannot use {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A file the TLS dir needs is missing.
    #[error("{path} is missing: {hint}")]
    Missing {
        /// The file.
        path: PathBuf,
        /// What makes it.
        hint: &'static str,
    },
    /// `init-ca` or `issue-cert` would overwrite a file.
    #[error("{0} exists already; refusing to overwrite it (remove it first)")]
    Exists(PathBuf),
    /// A PEM file does not hold what it should.
    #[error("{path} is not a usable {what}: {reason}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What it should hold.
        what: &'static str,
        /// Why it is not.
        reason: String,
    },
    /// This party's certificate is not valid under the cluster CA now.
    #[error(
        "the certificate {cert} is not valid for the cluster CA {ca}: {reason} (issue a new one: cell0d issue-cert)"
    )]
    Invalid {
        /// Its certificate.
        cert: PathBuf,
        /// The CA certificate.
        ca: PathBuf,
        /// Why (expired, signed by another CA, ...).
        reason: String,
    },
    /// Certificate generation failed.
    #[error("certificate generation failed: {0}")]
    Gen(#[from] rcgen::Error),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// A bad argument.
    #[error("{0}")]
    Usage(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn read(path: &Path, hint: &'static str) -> Result<String, TlsError> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(s),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(TlsError::Missing {
            path: path.to_path_buf(),
            hint,
        }),
        Err(e) => Err(io(path)(e)),
    }
}

/// Writes a new file (never replacing one) with `mode`.
fn write_new(path: &Path, data: &str, mode: u32) -> Result<(), TlsError> {
    use std::io::Write as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                TlsError::Exists(path.to_path_buf())
            } else {
                io(path)(e)
            }
        })?;
    f.write_all(data.as_bytes()).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

fn days(n: u32) -> time::Duration {
    time::Duration::days(i64::from(n))
}

/// The distinguished name of the cluster CA: `CN=cell0 cluster CA <id>`.
fn ca_params(cn: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p
}

/// `cell0d init-ca`: makes a cluster CA (ECDSA P-256) in `dir`: `ca.pem` and
/// `ca.key` (0600). Refuses to overwrite an existing CA.
pub fn init_ca(dir: &Path, valid_days: u32) -> Result<PathBuf, TlsError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    for f in [CA_CERT, CA_KEY] {
        if dir.join(f).exists() {
            return Err(TlsError::Exists(dir.join(f)));
        }
    }
    let mut id = [0u8; 4];
    getrandom(&mut id);
    let cn = format!("cell0 cluster CA {}", hex::encode(id));
    let mut params = ca_params(&cn);
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + days(valid_days);
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    write_new(&dir.join(CA_KEY), &key.serialize_pem(), 0o600)?;
    write_new(&dir.join(CA_CERT), &cert.pem(), 0o644)?;
    Ok(dir.join(CA_CERT))
}

fn getrandom(buf: &mut [u8]) {
    use std::io::Read as _;
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(buf);
    }
}

/// What a certificate may do, written as its subject's OU
/// (`cell0-member`, `cell0-node`, `cell0-client`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// A control-plane member: Raft (`RaftService`) and everything else.
    Member,
    /// A node agent on another host: admission and registration of its own
    /// node (`AdmissionService`, `NodeService`), and the API.
    Node,
    /// An operator or program (cell0ctl): the API and `ClusterService`, not
    /// Raft, not node admission.
    Client,
}

impl Role {
    /// The OU value.
    pub const fn ou(self) -> &'static str {
        match self {
            Role::Member => "cell0-member",
            Role::Node => "cell0-node",
            Role::Client => "cell0-client",
        }
    }

    fn from_ou(s: &str) -> Option<Role> {
        [Role::Member, Role::Node, Role::Client]
            .into_iter()
            .find(|r| r.ou() == s)
    }

    /// Lowercase name.
    pub const fn name(self) -> &'static str {
        match self {
            Role::Member => "member",
            Role::Node => "node",
            Role::Client => "client",
        }
    }
}

/// What `issue-cert` puts in a certificate.
#[derive(Debug, Clone)]
pub struct CertRequest {
    /// The subject's common name: the member, node or client name.
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// Subject alternative names: IP addresses or DNS names the party is
    /// dialled at (a member's `--advertise`/`--listen` host).
    pub sans: Vec<String>,
    /// Valid from.
    pub not_before: time::OffsetDateTime,
    /// Valid until.
    pub not_after: time::OffsetDateTime,
}

impl CertRequest {
    /// Valid from now (minus 5 minutes of clock skew) for `valid_days`.
    pub fn new(name: &str, role: Role, sans: &[String], valid_days: u32) -> Self {
        let now = time::OffsetDateTime::now_utc();
        Self {
            name: name.to_string(),
            role,
            sans: sans.to_vec(),
            not_before: now - time::Duration::minutes(5),
            not_after: now + days(valid_days),
        }
    }
}

/// An attribute (`CN`, `OU`) of a certificate's subject (the first one).
fn subject_attr(der: &[u8], attr: &str) -> Option<String> {
    use x509_cert::der::Decode as _;
    let c = x509_cert::Certificate::from_der(der).ok()?;
    let prefix = format!("{attr}=");
    c.tbs_certificate
        .subject
        .to_string()
        .split(',')
        .find_map(|rdn| rdn.trim().strip_prefix(&prefix).map(str::to_string))
}

/// The CN of a certificate's subject, if any.
fn subject_cn(der: &[u8]) -> Option<String> {
    subject_attr(der, "CN")
}

/// The role of a certificate (its subject's OU), if it has one.
fn subject_role(der: &[u8]) -> Option<Role> {
    Role::from_ou(&subject_attr(der, "OU")?)
}

/// `cell0d issue-cert`: signs a certificate for `req` with the CA in `ca_dir`
/// and writes `ca.pem`, `cert.pem` and `key.pem` (0600) to `out`.
pub fn issue_cert(ca_dir: &Path, req: &CertRequest, out: &Path) -> Result<(), TlsError> {
    if req.name.is_empty() || req.name.len() > 64 || req.name.contains(['\n', ',', '=']) {
        return Err(TlsError::Usage(format!(
            "--name {:?} is not a usable certificate name (1-64 characters, no ',' '=' or newline)",
            req.name
        )));
    }
    let ca_path = ca_dir.join(CA_CERT);
    let ca_pem = read(&ca_path, "make a cluster CA with: cell0d init-ca --out DIR")?;
    let key_path = ca_dir.join(CA_KEY);
    let ca_key_pem = read(
        &key_path,
        "issue-cert needs the CA dir made by cell0d init-ca",
    )?;
    let ca_der = CertificateDer::from_pem_slice(ca_pem.as_bytes()).map_err(|e| TlsError::Pem {
        path: ca_path.clone(),
        what: "certificate",
        reason: e.to_string(),
    })?;
    let cn = subject_cn(&ca_der).ok_or_else(|| TlsError::Pem {
        path: ca_path.clone(),
        what: "cluster CA certificate",
        reason: "it has no subject CN".into(),
    })?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|e| TlsError::Pem {
        path: key_path.clone(),
        what: "private key",
        reason: e.to_string(),
    })?;
    // The issuer is the CA's name and key; the AKI comes from the key.
    let issuer = Issuer::new(ca_params(&cn), ca_key);

    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::OrganizationalUnitName, req.role.ou());
    params
        .distinguished_name
        .push(DnType::CommonName, req.name.as_str());
    for s in &req.sans {
        let san =
            match s.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(s.clone().try_into().map_err(|_| {
                    TlsError::Usage(format!("--san {s:?} is not an IP or DNS name"))
                })?),
            };
        params.subject_alt_names.push(san);
    }
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.not_before = req.not_before;
    params.not_after = req.not_after;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    std::fs::create_dir_all(out).map_err(io(out))?;
    for f in [CERT, KEY] {
        if out.join(f).exists() {
            return Err(TlsError::Exists(out.join(f)));
        }
    }
    let out_ca = out.join(CA_CERT);
    match std::fs::read_to_string(&out_ca) {
        Ok(existing) if existing == ca_pem => {}
        Ok(_) => return Err(TlsError::Exists(out_ca)),
        Err(_) => write_new(&out_ca, &ca_pem, 0o644)?,
    }
    write_new(&out.join(KEY), &key.serialize_pem(), 0o600)?;
    write_new(&out.join(CERT), &cert.pem(), 0o644)?;
    Ok(())
}

/// A loaded TLS dir: the cluster CA and this party's certificate and key,
/// checked against each other.
#[derive(Clone)]
pub struct TlsDir {
    dir: PathBuf,
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
    ca: CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    name: String,
}

impl std::fmt::Debug for TlsDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsDir")
            .field("dir", &self.dir)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TlsDir {
    /// Loads `ca.pem`, `cert.pem` and `key.pem` from `dir`, and checks that the
    /// certificate is valid under the CA now (not expired, signed by it).
    pub fn load(dir: &Path) -> Result<Self, TlsError> {
        const HINT: &str = "a TLS dir holds ca.pem, cert.pem and key.pem: cell0d issue-cert --ca CA_DIR --name NAME --out DIR";
        let ca_path = dir.join(CA_CERT);
        let cert_path = dir.join(CERT);
        let key_path = dir.join(KEY);
        let ca_pem = read(&ca_path, HINT)?;
        let cert_pem = read(&cert_path, HINT)?;
        let key_pem = read(&key_path, HINT)?;
        let pem_err = |path: &Path, what: &'static str| {
            let path = path.to_path_buf();
            move |e: rustls::pki_types::pem::Error| TlsError::Pem {
                path,
                what,
                reason: e.to_string(),
            }
        };
        let ca = CertificateDer::from_pem_slice(ca_pem.as_bytes())
            .map_err(pem_err(&ca_path, "certificate"))?;
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(cert_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(pem_err(&cert_path, "certificate"))?;
        let Some(leaf) = chain.first() else {
            return Err(TlsError::Pem {
                path: cert_path,
                what: "certificate",
                reason: "it holds no certificate".into(),
            });
        };
        PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(pem_err(&key_path, "private key"))?;
        let verifier = client_verifier(&ca).map_err(|e| TlsError::Pem {
            path: ca_path.clone(),
            what: "CA certificate",
            reason: e.to_string(),
        })?;
        verifier
            .verify_client_cert(leaf, &chain[1..], UnixTime::now())
            .map_err(|e| TlsError::Invalid {
                cert: cert_path.clone(),
                ca: ca_path.clone(),
                reason: describe(&e.to_string()),
            })?;
        let name = subject_cn(leaf).unwrap_or_default();
        Ok(Self {
            dir: dir.to_path_buf(),
            ca_pem,
            cert_pem,
            key_pem,
            ca,
            chain,
            name,
        })
    }

    /// The dir it was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// This party's name (its certificate's CN).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// This party's certificate serial ([`cert_serial`]).
    pub fn serial(&self) -> String {
        self.chain
            .first()
            .and_then(|c| cert_serial(c))
            .unwrap_or_default()
    }

    /// This party's role (its certificate's OU), if it has one.
    pub fn role(&self) -> Option<Role> {
        self.chain.first().and_then(|c| subject_role(c))
    }

    /// The server side: this certificate, and a client certificate signed by
    /// the cluster CA required from every peer. ALPN h2 (gRPC).
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let verifier = client_verifier(&self.ca)?;
        let key =
            PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).map_err(|e| TlsError::Pem {
                path: self.dir.join(KEY),
                what: "private key",
                reason: e.to_string(),
            })?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), key)?;
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(cfg))
    }

    /// The client side (tonic): trust only the cluster CA, present this
    /// certificate.
    pub fn client_config(&self) -> tonic::transport::ClientTlsConfig {
        tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&self.ca_pem))
            .identity(tonic::transport::Identity::from_pem(
                &self.cert_pem,
                &self.key_pem,
            ))
    }
}

fn client_verifier(
    ca: &CertificateDer<'static>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone())?;
    rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| TlsError::Usage(format!("cannot build the client verifier: {e}")))
}

/// A URI for `addr` (`HOST:PORT` or a URI): `https://` with TLS, else
/// `http://`.
pub fn uri(addr: &str, tls: bool) -> String {
    if addr.contains("://") {
        addr.to_string()
    } else if tls {
        format!("https://{addr}")
    } else {
        format!("http://{addr}")
    }
}

/// Says in words what a TLS failure means (the text of an error chain).
pub fn describe(text: &str) -> String {
    let t = text.to_ascii_lowercase();
    let hint = if t.contains("expired") {
        "a certificate has expired"
    } else if t.contains("notvalidyet") || t.contains("not valid yet") {
        "a certificate is not valid yet (check the clocks)"
    } else if t.contains("unknownissuer")
        || t.contains("unknown issuer")
        || t.contains("badsignature")
    {
        "the peer's certificate is not signed by this cluster CA"
    } else if t.contains("unknownca") || t.contains("unknown ca") || t.contains("badcertificate") {
        "the server refused this client's certificate: it is not signed by the cluster CA"
    } else if t.contains("certificaterequired") || t.contains("certificate required") {
        "the server requires a client certificate signed by the cluster CA (pass --tls-dir)"
    } else if t.contains("notvalidforname") || t.contains("not valid for name") {
        "the server's certificate does not name the address dialled (issue it with --san HOST)"
    } else if t.contains("broken pipe")
        || t.contains("connection reset")
        || t.contains("connection closed")
        || t.contains("stream closed")
    {
        "the server closed the connection: a server that speaks only TLS does so to a plain-TCP client (give --tls-dir), and over TLS it means the server refused this client's certificate (none, expired, or not signed by the cluster CA; the server's log names the reason)"
    } else if t.contains("invalidcontenttype")
        || t.contains("corrupt message")
        || t.contains("invalid http version")
        || t.contains("frame with invalid size")
    {
        "one side speaks TLS and the other plain TCP: give both --tls-dir, or neither"
    } else {
        return text.to_string();
    };
    format!("{hint} ({text})")
}

/// The text of an error and its sources.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        let t = x.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = x.source();
    }
    s
}

/// Accepted TLS connections for tonic's `serve_with_incoming_shutdown`. Each
/// handshake runs in its own task (at most [`HANDSHAKE_TIMEOUT`]); a refused
/// one is logged with its peer and reason and never reaches a service.
pub fn incoming(
    listener: TcpListener,
    cfg: Arc<rustls::ServerConfig>,
) -> ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            // Ends (closing the listener) once the server stops taking
            // connections.
            let accepted = tokio::select! {
                () = tx.closed() => return,
                a = listener.accept() => a,
            };
            let (tcp, peer) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!("gRPC accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                refused(peer, "too many TLS handshakes in progress");
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => {
                        let _ = tx.send(Ok(s)).await;
                    }
                    Ok(Err(e)) => refused(peer, &describe(&chain(&e))),
                    Err(_) => refused(peer, "no TLS handshake within 10 s"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

fn refused(peer: SocketAddr, why: &str) {
    tracing::warn!(%peer, "refused a gRPC connection: {why}");
}

/// The CN of the client certificate of a request served over TLS.
pub fn peer_name<T>(req: &tonic::Request<T>) -> Option<String> {
    let certs = req.peer_certs()?;
    subject_cn(certs.first()?)
}

/// Over TLS, the client certificate must have one of `allowed` roles
/// (PERMISSION_DENIED otherwise); over plain TCP there is nothing to check.
pub fn require_role<T>(
    req: &tonic::Request<T>,
    allowed: &[Role],
    what: &str,
) -> Result<(), tonic::Status> {
    let Some(certs) = req.peer_certs() else {
        return Ok(());
    };
    let leaf = certs.first();
    let role = leaf.and_then(|c| subject_role(c));
    if role.is_some_and(|r| allowed.contains(&r)) {
        return Ok(());
    }
    let name = leaf.and_then(|c| subject_cn(c)).unwrap_or_default();
    let want: Vec<&str> = allowed.iter().map(|r| r.name()).collect();
    Err(tonic::Status::permission_denied(format!(
        "{what} needs a {} certificate; {name:?} has {}",
        want.join(" or "),
        role.map_or("no cell0 role (OU)".to_string(), |r| format!(
            "a {} certificate",
            r.name()
        ))
    )))
}

/// The dir under a member's data dir where `cell0d serve --init` keeps the
/// cluster CA it created (`ca.pem`, `ca.key`) and its own certificate
/// (`cert.pem`, `key.pem`): both a CA dir for `issue-cert --ca-dir` and a TLS
/// dir.
pub const PKI_DIR: &str = "pki";

/// The serial number of a certificate (DER) as lowercase hex without
/// leading zero bytes, the form the revocation list keeps.
pub fn cert_serial(der: &[u8]) -> Option<String> {
    use x509_cert::der::Decode as _;
    let c = x509_cert::Certificate::from_der(der).ok()?;
    Some(serial_hex(c.tbs_certificate.serial_number.as_bytes()))
}

fn serial_hex(bytes: &[u8]) -> String {
    let first = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    match &bytes[first..] {
        [] => "00".into(),
        b => hex::encode(b),
    }
}

/// A serial as an operator types it (`0x`, `:` separators, either case,
/// as `openssl x509 -serial` prints it) in the form [`cert_serial`] gives.
pub fn normalize_serial(s: &str) -> Result<String, TlsError> {
    let t = s.trim();
    let t = t
        .strip_prefix("serial=")
        .or_else(|| t.strip_prefix("0x"))
        .unwrap_or(t);
    let mut h: String = t.chars().filter(|c| *c != ':').collect();
    if h.len() % 2 == 1 {
        h.insert(0, '0');
    }
    match hex::decode(&h) {
        Ok(b) if !b.is_empty() && b.iter().skip_while(|x| **x == 0).count() <= 20 => {
            Ok(serial_hex(&b))
        }
        _ => Err(TlsError::Usage(format!(
            "--serial {s:?} is not a certificate serial (hex, at most 20 bytes, as `openssl x509 -noout -serial` prints it)"
        ))),
    }
}

/// Who a certificate names: its CN, role (OU) and serial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertId {
    /// Subject CN.
    pub name: String,
    /// Role, if it has one.
    pub role: Option<Role>,
    /// Serial ([`cert_serial`]).
    pub serial: String,
}

impl CertId {
    /// The identity of a certificate (DER).
    pub fn of(der: &[u8]) -> Option<CertId> {
        Some(CertId {
            serial: cert_serial(der)?,
            name: subject_cn(der).unwrap_or_default(),
            role: subject_role(der),
        })
    }

    /// The first certificate of a PEM file (`cell0ctl cluster revoke --cert`).
    pub fn of_pem_file(path: &Path) -> Result<CertId, TlsError> {
        let pem = read(path, "give the certificate (cert.pem) to revoke")?;
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| TlsError::Pem {
            path: path.to_path_buf(),
            what: "certificate",
            reason: e.to_string(),
        })?;
        CertId::of(&der).ok_or_else(|| TlsError::Pem {
            path: path.to_path_buf(),
            what: "certificate",
            reason: "it does not parse as X.509".into(),
        })
    }

    fn role_name(&self) -> String {
        self.role.map_or("no cell0 role (OU)".to_string(), |r| {
            format!("a {} certificate", r.name())
        })
    }
}

/// A revoked certificate, kept in the replicated state.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Revocation {
    /// Serial ([`cert_serial`]).
    pub serial: String,
    /// Its CN, when the operator gave the certificate (else empty).
    #[serde(default)]
    pub name: String,
    /// Why.
    #[serde(default)]
    pub reason: String,
    /// When (Unix ms, chosen by the member that proposed it).
    pub revoked_at_ms: u64,
    /// The certificate (CN) or peer address that asked.
    #[serde(default)]
    pub revoked_by: String,
}

impl From<&Revocation> for grpc::Revocation {
    fn from(r: &Revocation) -> Self {
        Self {
            serial: r.serial.clone(),
            name: r.name.clone(),
            reason: r.reason.clone(),
            revoked_at_ms: r.revoked_at_ms,
            revoked_by: r.revoked_by.clone(),
        }
    }
}

impl From<grpc::Revocation> for Revocation {
    fn from(r: grpc::Revocation) -> Self {
        Self {
            serial: r.serial,
            name: r.name,
            reason: r.reason,
            revoked_at_ms: r.revoked_at_ms,
            revoked_by: r.revoked_by,
        }
    }
}

/// The version of a revocation list of `len` entries: the list only grows
/// (a revocation is never taken back), so its length is its version; plus
/// one, so that 0 means "none yet".
pub fn revocations_version(len: usize) -> u64 {
    len as u64 + 1
}

/// The cluster's revocation list as a `cell0d node` last heard it in a
/// heartbeat answer; its own API checks member certificates against it.
#[derive(Debug, Clone, Default)]
pub struct KnownRevocations(Arc<std::sync::RwLock<Option<VersionedRevocations>>>);

/// A revocation list at a version ([`revocations_version`]), by serial.
type VersionedRevocations = (u64, BTreeMap<String, Revocation>);

impl KnownRevocations {
    /// The version held (0: none yet).
    pub fn version(&self) -> u64 {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map_or(0, |(v, _)| *v)
    }

    /// Replaces the list with `list` at `version`.
    pub fn set(&self, version: u64, list: impl IntoIterator<Item = Revocation>) {
        let list = list.into_iter().map(|r| (r.serial.clone(), r)).collect();
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Some((version, list));
    }

    /// Whether a list was heard at all.
    pub fn known(&self) -> bool {
        self.version() != 0
    }

    /// The revocation of `serial`, if any.
    pub fn get(&self, serial: &str) -> Option<Revocation> {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .and_then(|(_, l)| l.get(serial).cloned())
    }
}

/// The client certificate of a request served over TLS.
pub fn peer_cert<T>(req: &tonic::Request<T>) -> Option<CertId> {
    let certs = req.peer_certs()?;
    CertId::of(certs.first()?)
}

/// The request header with which a member's own node agent says which
/// member sends its heartbeat (`api::MEMBER_HEADER`).
const MEMBER_HEADER: &str = "cell0-member";

/// With mutual TLS, a `node` certificate may act only for the node its CN
/// names (heartbeats), and only a `member` certificate may speak for a
/// member (the member header); members' and clients' certificates are not
/// bound to a node.
pub fn require_own_node<T>(req: &tonic::Request<T>, node: &str) -> Result<(), tonic::Status> {
    let cert = peer_cert(req);
    if let Some(c) = &cert {
        if req.metadata().get(MEMBER_HEADER).is_some() && c.role != Some(Role::Member) {
            return Err(tonic::Status::permission_denied(format!(
                "node {node} refused: only a member certificate may send a member's heartbeat; {:?} has {}",
                c.name,
                c.role_name()
            )));
        }
    }
    match cert {
        Some(c) if c.role == Some(Role::Node) && c.name != node => {
            Err(tonic::Status::permission_denied(format!(
                "node {node} refused: the client certificate names {:?}; a node certificate acts only for its own node",
                c.name
            )))
        }
        _ => Ok(()),
    }
}

/// The roles that may call `method` of `service` (a gRPC service's full
/// name) over mutual TLS:
///
/// - `RaftService`, `NodeService.VmStatuses` and `.WatchCluster`: members
///   only (Raft, forwarding and VM status between members);
/// - `AdmissionService`: nodes only (the handler checks the name too);
/// - `NodeService.Register` and `.Heartbeat`, `ClusterService.Status` (a
///   node agent finds the leader with it) and reflection: any role;
/// - everything else (the VM API, node listing and drains, membership
///   changes, revocation): members and clients, not nodes.
pub fn roles_for(service: &str, method: &str) -> &'static [Role] {
    const ALL: &[Role] = &[Role::Member, Role::Node, Role::Client];
    const MEMBER_CLIENT: &[Role] = &[Role::Member, Role::Client];
    let short = service.rsplit('.').next().unwrap_or(service);
    match (short, method) {
        ("RaftService", _) => &[Role::Member],
        // Between members: the leader's VM statuses and events (api/proxy.rs).
        ("NodeService", "VmStatuses" | "WatchCluster") => &[Role::Member],
        ("AdmissionService", _) => &[Role::Node],
        ("NodeService", "Register" | "Heartbeat") | ("ClusterService", "Status") => ALL,
        ("ServerReflection", _) => ALL,
        _ => MEMBER_CLIENT,
    }
}

/// Answers the revocation of a serial, if any.
type RevokedFn = dyn Fn(&str) -> Option<Revocation> + Send + Sync;

/// What [`Guard`] checks on every request over mutual TLS: the role of the
/// client certificate ([`roles_for`]) and the replicated revocation list.
/// Refusals are logged and written to the audit log.
#[derive(Clone)]
pub struct Access {
    revoked: Arc<RevokedFn>,
    audit: Option<Arc<crate::audit::AuditLog>>,
    /// Parsed client certificates by their DER: a connection sends the same
    /// one with every request.
    ids: Arc<std::sync::Mutex<std::collections::HashMap<Vec<u8>, CertId>>>,
}

/// Most parsed certificates [`Access`] keeps (it starts over when full).
const MAX_CACHED_IDS: usize = 1024;

impl Access {
    /// `revoked(serial)` answers the revocation of a serial, if any.
    pub fn new(
        revoked: impl Fn(&str) -> Option<Revocation> + Send + Sync + 'static,
        audit: Option<Arc<crate::audit::AuditLog>>,
    ) -> Self {
        Self {
            revoked: Arc::new(revoked),
            audit,
            ids: Arc::default(),
        }
    }

    /// The identity of a client certificate, parsed once.
    fn id_of(&self, der: &[u8]) -> Option<CertId> {
        let mut ids = self.ids.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(id) = ids.get(der) {
            return Some(id.clone());
        }
        let id = CertId::of(der)?;
        if ids.len() >= MAX_CACHED_IDS {
            ids.clear();
        }
        ids.insert(der.to_vec(), id.clone());
        Some(id)
    }

    /// Wraps a service.
    pub fn guard<S>(&self, inner: S) -> Guard<S> {
        Guard {
            inner,
            access: self.clone(),
        }
    }

    /// PERMISSION_DENIED when the request's certificate is revoked or its
    /// role may not call `path` (`/package.Service/Method`); over plain TCP
    /// there is nothing to check.
    pub fn check<B>(&self, req: &tonic::codegen::http::Request<B>) -> Result<(), tonic::Status> {
        use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
        let Some(info) = req.extensions().get::<TlsConnectInfo<TcpConnectInfo>>() else {
            return Ok(());
        };
        let peer = info.get_ref().remote_addr();
        let path = req.uri().path().trim_start_matches('/');
        let (service, method) = path.split_once('/').unwrap_or((path, ""));
        let short = service.rsplit('.').next().unwrap_or(service);
        let Some(id) = info
            .peer_certs()
            .and_then(|c| c.first().and_then(|c| self.id_of(c)))
        else {
            // The verifier requires a certificate; this is not reached.
            return Err(self.refuse(
                short,
                method,
                peer,
                "?",
                "the connection has no usable client certificate".into(),
            ));
        };
        if let Some(r) = (self.revoked)(&id.serial) {
            let why = if r.reason.is_empty() {
                String::new()
            } else {
                format!(": {}", r.reason)
            };
            return Err(self.refuse(
                short,
                method,
                peer,
                &id.name,
                format!(
                    "the client certificate {:?} (serial {}) is revoked{why}; it may no longer call {short}.{method}",
                    id.name, id.serial
                ),
            ));
        }
        let allowed = roles_for(service, method);
        if id.role.is_some_and(|r| allowed.contains(&r)) {
            return Ok(());
        }
        let want: Vec<&str> = allowed.iter().map(|r| r.name()).collect();
        Err(self.refuse(
            short,
            method,
            peer,
            &id.name,
            format!(
                "{short}.{method} needs a {} certificate; {:?} has {}",
                want.join(" or "),
                id.name,
                id.role_name()
            ),
        ))
    }

    fn refuse(
        &self,
        service: &str,
        method: &str,
        peer: Option<SocketAddr>,
        name: &str,
        msg: String,
    ) -> tonic::Status {
        tracing::warn!(peer = ?peer, "refused a gRPC request: {msg}");
        let s = tonic::Status::permission_denied(msg);
        if let Some(a) = &self.audit {
            a.record_outcome::<()>(
                &format!("{service}.{method}"),
                peer,
                &format!("cert/{name}"),
                &Err(s.clone()),
                0,
            );
        }
        s
    }
}

/// A gRPC service behind [`Access::check`]: a refused request never reaches
/// it.
#[derive(Clone)]
pub struct Guard<S> {
    inner: S,
    access: Access,
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for Guard<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> tonic::codegen::Service<tonic::codegen::http::Request<tonic::body::Body>> for Guard<S>
where
    S: tonic::codegen::Service<
            tonic::codegen::http::Request<tonic::body::Body>,
            Response = tonic::codegen::http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = tonic::codegen::http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = tonic::codegen::BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: tonic::codegen::http::Request<tonic::body::Body>) -> Self::Future {
        match self.access.check(&req) {
            Ok(()) => Box::pin(self.inner.call(req)),
            Err(s) => Box::pin(async move { Ok(s.into_http()) }),
        }
    }
}

/// How `cell0d serve` speaks gRPC, from its flags and data dir.
#[derive(Debug)]
pub enum ServeTls {
    /// Mutual TLS with this TLS dir (`--tls-dir`, or `<data-dir>/pki`).
    Tls(TlsDir),
    /// Plain TCP.
    Plain,
}

/// What [`serve_tls`] decides from.
#[derive(Debug, Clone)]
pub struct ServeTlsFlags<'a> {
    /// The data dir.
    pub data_dir: &'a Path,
    /// `--tls-dir`.
    pub tls_dir: Option<&'a Path>,
    /// `--insecure-plaintext`.
    pub insecure_plaintext: bool,
    /// Whether this member initializes a new cluster on a fresh data dir
    /// with no other initial member (`--init`, or neither --join nor --peers).
    pub init_alone: bool,
    /// Whether the member is part of (or starting) a multi-member cluster:
    /// `--init`, `--join` or `--peers` given.
    pub clustered: bool,
    /// `--peers` given.
    pub peers: bool,
    /// `--listen`.
    pub listen: SocketAddr,
    /// `--advertise`.
    pub advertise: Option<&'a str>,
    /// This member's Raft id (the certificate's name is `member-<id>`).
    pub member_id: u64,
}

fn is_loopback_host(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    h.eq_ignore_ascii_case("localhost") || h.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The host of `HOST:PORT` (an IPv6 literal in brackets too).
fn host_of(addr: &str) -> &str {
    let a = addr.split_once("://").map_or(addr, |(_, r)| r);
    match a.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => {
            h.trim_start_matches('[').trim_end_matches(']')
        }
        _ => a,
    }
}

/// Whether a client dialling `endpoint` (`HOST:PORT` or a URI) stays on this
/// host.
pub fn endpoint_is_loopback(endpoint: &str) -> bool {
    is_loopback_host(host_of(endpoint))
}

/// How `cell0d serve` speaks gRPC:
///
/// 1. `--tls-dir`: mutual TLS with it.
/// 2. A `<data-dir>/pki` made at an earlier start: mutual TLS with it.
/// 3. `--insecure-plaintext`: plain TCP (the caller warns).
/// 4. A one-member control plane on loopback (the embedded daemon, no
///    --init/--join/--peers): plain TCP, as only this host reaches it.
/// 5. `--init` (or the default one-member init) on a fresh data dir: a new
///    cluster CA and this member's certificate in `<data-dir>/pki`.
/// 6. Anything else (--join, --peers, an existing data dir): an error that
///    says what to do.
pub fn serve_tls(f: &ServeTlsFlags<'_>) -> Result<ServeTls, TlsError> {
    let pki = f.data_dir.join(PKI_DIR);
    if let Some(d) = f.tls_dir {
        return Ok(ServeTls::Tls(TlsDir::load(d)?));
    }
    if pki.join(CERT).exists() {
        if f.insecure_plaintext {
            return Err(TlsError::Usage(format!(
                "--insecure-plaintext: this data dir has the cluster CA and certificate this member serves mutual TLS with ({}); drop --insecure-plaintext",
                pki.display()
            )));
        }
        return Ok(ServeTls::Tls(TlsDir::load(&pki)?));
    }
    if f.insecure_plaintext {
        return Ok(ServeTls::Plain);
    }
    let local = f.listen.ip().is_loopback() && f.advertise.is_none_or(endpoint_is_loopback);
    if local && !f.clustered {
        return Ok(ServeTls::Plain);
    }
    let fresh = !f.data_dir.join("raft").exists();
    if f.init_alone && fresh {
        return init_member_pki(f, &pki).map(ServeTls::Tls);
    }
    let what = if f.peers {
        "a cluster initialized from --peers needs one cluster CA for all its members: run `cell0d init-ca --out CA_DIR` once, then for each member `cell0d issue-cert --ca-dir CA_DIR --name mN --role member --san HOST --out DIR` and start it with --tls-dir DIR"
    } else if f.init_alone {
        "this data dir already holds a cluster that was served over plain TCP: start it with --insecure-plaintext as before, or issue it a certificate (`cell0d init-ca`, `cell0d issue-cert --role member`) and give --tls-dir"
    } else {
        "a member that joins a cluster needs a certificate of that cluster's CA: on the host of the member that created it, run `cell0d issue-cert --ca-dir <its data dir>/pki --name mN --role member --san HOST --out DIR`, copy DIR here and give --tls-dir DIR"
    };
    Err(TlsError::Usage(format!(
        "gRPC on {} without TLS material: {what}. To run without TLS anyway (anyone who reaches the port can send Raft messages and API calls), pass --insecure-plaintext",
        f.listen
    )))
}

/// `cell0d node`: mutual TLS (`--tls-dir`) or, said out loud,
/// `--insecure-plaintext`; neither is an error that says what to do.
pub fn node_transport(tls_dir: Option<&Path>, insecure_plaintext: bool) -> Result<(), TlsError> {
    match (tls_dir, insecure_plaintext) {
        (Some(_), _) => Ok(()),
        (None, true) => {
            tracing::warn!(
                "INSECURE: --insecure-plaintext: this node agent dials the members over plain TCP; anyone on the path can read and change its registration, heartbeats and placements"
            );
            Ok(())
        }
        (None, false) => Err(TlsError::Usage(
            "a node agent dials the members over mutual TLS: give --tls-dir DIR with a node certificate of the cluster CA (on the host of the member that created the CA: cell0d issue-cert --ca-dir <its data dir>/pki --name NODE_NAME --role node --out DIR), or --insecure-plaintext for members served without TLS".into(),
        )),
    }
}

fn init_member_pki(f: &ServeTlsFlags<'_>, pki: &Path) -> Result<TlsDir, TlsError> {
    let mut sans: Vec<String> = Vec::new();
    let mut push = |s: String| {
        if !s.is_empty() && !sans.contains(&s) {
            sans.push(s);
        }
    };
    if let Some(a) = f.advertise {
        push(host_of(a).to_string());
    }
    if !f.listen.ip().is_unspecified() {
        push(f.listen.ip().to_string());
    }
    push("127.0.0.1".into());
    push("localhost".into());
    // Private dir: ca.key lives here.
    {
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(pki)
            .map_err(io(pki))?;
    }
    init_ca(pki, CA_DAYS)?;
    let name = format!("member-{}", f.member_id);
    issue_cert(
        pki,
        &CertRequest::new(&name, Role::Member, &sans, CERT_DAYS),
        pki,
    )?;
    let t = TlsDir::load(pki)?;
    tracing::info!(
        pki = %pki.display(),
        sans = %sans.join(","),
        "created the cluster CA and this member's certificate ({name}); issue certificates for other members, nodes and clients with: cell0d issue-cert --ca-dir {} --name NAME --role member|node|client [--san HOST] --out DIR (a member's --san: the host others dial it at). Keep ca.key secret; cell0ctl --tls-dir {} works from this host",
        pki.display(),
        pki.display()
    );
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_issue_load_and_refusals() {
        let d = tempfile::tempdir().unwrap();
        let ca = d.path().join("ca");
        init_ca(&ca, 30).unwrap();
        assert!(matches!(init_ca(&ca, 30), Err(TlsError::Exists(_))));
        let m1 = d.path().join("m1");
        issue_cert(
            &ca,
            &CertRequest::new("m1", Role::Member, &["127.0.0.1".into()], 1),
            &m1,
        )
        .unwrap();
        let t = TlsDir::load(&m1).unwrap();
        assert_eq!(t.name(), "m1");
        assert_eq!(t.role(), Some(Role::Member));
        t.server_config().unwrap();
        assert!(matches!(
            issue_cert(&ca, &CertRequest::new("m1", Role::Member, &[], 1), &m1),
            Err(TlsError::Exists(_))
        ));

        // Expired.
        let old = d.path().join("old");
        let mut req = CertRequest::new("old", Role::Client, &[], 1);
        req.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(10);
        req.not_after = time::OffsetDateTime::now_utc() - time::Duration::days(1);
        issue_cert(&ca, &req, &old).unwrap();
        let e = TlsDir::load(&old).unwrap_err().to_string();
        assert!(e.contains("expired"), "{e}");

        // Another CA's certificate with this CA's ca.pem.
        let ca2 = d.path().join("ca2");
        init_ca(&ca2, 30).unwrap();
        let other = d.path().join("other");
        issue_cert(&ca2, &CertRequest::new("x", Role::Client, &[], 1), &other).unwrap();
        std::fs::remove_file(other.join(CA_CERT)).unwrap();
        std::fs::copy(ca.join(CA_CERT), other.join(CA_CERT)).unwrap();
        let e = TlsDir::load(&other).unwrap_err().to_string();
        assert!(e.contains("not signed by this cluster CA"), "{e}");

        // Missing.
        let e = TlsDir::load(&d.path().join("none"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("is missing") && e.contains("issue-cert"), "{e}");
        assert!(issue_cert(&ca, &CertRequest::new("a,b", Role::Client, &[], 1), &old).is_err());
    }

    #[test]
    fn serials_roles_and_endpoints() {
        assert_eq!(normalize_serial("0A:fF:01").unwrap(), "0aff01");
        assert_eq!(normalize_serial("serial=00ABC").unwrap(), "0abc");
        assert_eq!(normalize_serial("0x1").unwrap(), "01");
        for bad in ["", "xyz", "0x", &"ab".repeat(21)] {
            assert!(normalize_serial(bad).is_err(), "{bad:?}");
        }
        assert_eq!(serial_hex(&[0, 0x80, 1]), "8001");
        let d = tempfile::tempdir().unwrap();
        init_ca(&d.path().join("ca"), 1).unwrap();
        issue_cert(
            &d.path().join("ca"),
            &CertRequest::new("c", Role::Client, &[], 1),
            &d.path().join("c"),
        )
        .unwrap();
        let t = TlsDir::load(&d.path().join("c")).unwrap();
        let id = CertId::of_pem_file(&d.path().join("c").join(CERT)).unwrap();
        assert_eq!((id.name.as_str(), id.role), ("c", Some(Role::Client)));
        assert_eq!(id.serial, t.serial());
        assert_eq!(normalize_serial(&id.serial).unwrap(), id.serial);

        let svc = "cell0.control.v1.";
        assert_eq!(
            roles_for(&format!("{svc}RaftService"), "Vote"),
            [Role::Member]
        );
        assert!(!roles_for(&format!("{svc}VmService"), "List").contains(&Role::Node));
        assert!(roles_for(&format!("{svc}NodeService"), "Heartbeat").contains(&Role::Node));
        assert!(!roles_for(&format!("{svc}NodeService"), "Drain").contains(&Role::Node));
        assert!(roles_for(&format!("{svc}ClusterService"), "Status").contains(&Role::Node));
        assert!(!roles_for(&format!("{svc}ClusterService"), "AddMember").contains(&Role::Node));
        assert_eq!(
            roles_for(&format!("{svc}AdmissionService"), "Admit"),
            [Role::Node]
        );

        for (e, local) in [
            ("127.0.0.1:7070", true),
            ("http://localhost:1", true),
            ("[::1]:7070", true),
            ("https://10.0.0.1:7070", false),
            ("m1.example:7070", false),
        ] {
            assert_eq!(endpoint_is_loopback(e), local, "{e}");
        }
    }

    #[test]
    fn serve_tls_start_up_rule() {
        let d = tempfile::tempdir().unwrap();
        let data = d.path().join("m1");
        let flags = |init_alone, clustered, peers, listen: &str| ServeTlsFlags {
            data_dir: &data,
            tls_dir: None,
            insecure_plaintext: false,
            init_alone,
            clustered,
            peers,
            listen: listen.parse().unwrap(),
            advertise: None,
            member_id: 1,
        };
        // The one-member daemon on loopback: plain, no CA.
        let f = flags(true, false, false, "127.0.0.1:0");
        assert!(matches!(serve_tls(&f).unwrap(), ServeTls::Plain));
        assert!(!data.join(PKI_DIR).exists());
        // ... unless it is dialled from elsewhere.
        let f = ServeTlsFlags {
            advertise: Some("10.0.0.1:7070"),
            ..flags(true, false, false, "127.0.0.1:0")
        };
        let ServeTls::Tls(t) = serve_tls(&f).unwrap() else {
            panic!("plain")
        };
        assert_eq!((t.name(), t.role()), ("member-1", Some(Role::Member)));
        let ca = std::fs::read_to_string(data.join(PKI_DIR).join(CA_CERT)).unwrap();
        // A later start reuses it, and refuses to go plain.
        let f = flags(false, true, false, "127.0.0.1:0");
        assert!(matches!(serve_tls(&f).unwrap(), ServeTls::Tls(_)));
        assert_eq!(
            std::fs::read_to_string(data.join(PKI_DIR).join(CA_CERT)).unwrap(),
            ca
        );
        let f = ServeTlsFlags {
            insecure_plaintext: true,
            ..flags(true, true, false, "127.0.0.1:0")
        };
        assert!(
            serve_tls(&f)
                .unwrap_err()
                .to_string()
                .contains("drop --insecure-plaintext")
        );

        // Join and --peers without material: refused, saying what to do.
        let data2 = d.path().join("m2");
        let mut f = flags(false, true, false, "127.0.0.1:0");
        f.data_dir = &data2;
        let e = serve_tls(&f).unwrap_err().to_string();
        assert!(
            e.contains("issue-cert --ca-dir") && e.contains("--insecure-plaintext"),
            "{e}"
        );
        f.peers = true;
        let e = serve_tls(&f).unwrap_err().to_string();
        assert!(e.contains("cell0d init-ca"), "{e}");
        f.insecure_plaintext = true;
        assert!(matches!(serve_tls(&f).unwrap(), ServeTls::Plain));
        assert!(!data2.join(PKI_DIR).exists());
        // An existing plain data dir is not switched to TLS behind its back.
        std::fs::create_dir_all(data2.join("raft")).unwrap();
        let mut f = flags(true, true, false, "0.0.0.0:7070");
        f.data_dir = &data2;
        let e = serve_tls(&f).unwrap_err().to_string();
        assert!(e.contains("served over plain TCP"), "{e}");
    }
}
