// SPDX-License-Identifier: Apache-2.0
//! Node admission by attestation (issue 7): before the control plane
//! registers a node that runs on another host, the node proves with a TPM
//! quote which `cell0d` and `cell0-vmm` binaries it runs.
//!
//! The node side ([`NodeAttester`]) starts its own vTPM (swtpm), measures the
//! SHA-256 of both binaries into PCR 0 (`cell0_attest::node_events`), and
//! answers the control plane's challenge. The control plane side
//! ([`Admission`]) reuses cell0-attest's [`Verifier`]: the EK certificate
//! must chain to a trusted TPM CA, the AK is enrolled by make/activate
//! credential, the quote must carry the nonce the control plane issued for
//! this admission (single use: a replayed quote fails `nonce mismatch`), the
//! event log must replay to the quoted PCRs, and each binary digest must be on
//! the allow-list ([`NodeGolden`]; default: the digests of the control plane's
//! own `cell0d` and `cell0-vmm`). `AdmissionService.Admit` registers a node
//! that passes and refuses, with an audit entry naming every failed check, one
//! that does not.
//!
//! swtpm is not a hardware TPM: its quote proves only what the software stack
//! running swtpm measured. Anyone with root on the node can run other
//! binaries and still measure the golden ones. A hardware TPM, with measured
//! boot up to the process that measures, is what makes this evidence about
//! the host; `NodeAttester` does not drive one yet.

// tonic handlers return `tonic::Status` (~176 bytes) by design.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cell0_attest::formats::Wire as _;
use cell0_attest::{
    ActivationResponse, AkBundle, CredentialChallenge, EventLog, LocalCa, NodeGolden, Nonce,
    QuoteBundle, Sha256Digest, Verdict, Verifier, Vtpm, VtpmOptions,
};
use cell0_proto::grpc::{self, admission_service_server::AdmissionService};
use tonic::{Code, Request, Response, Status};

use crate::audit::{AuditLog, Entry};
use crate::metrics::Metrics;

/// How long a challenge stays open.
pub const CHALLENGE_TTL: Duration = Duration::from_secs(120);
/// Most admissions open at once on one member.
pub const MAX_OPEN: usize = 1024;
/// How long a passed attestation lets the node register on this member.
pub const ADMITTED_TTL: Duration = Duration::from_secs(60);

/// Errors of admission set-up and of the node side.
#[derive(Debug, thiserror::Error)]
pub enum AdmissionError {
    /// The TPM CA bundle could not be read.
    #[error("cannot read the TPM CA certificates (--node-tpm-ca): {0}")]
    Ca(String),
    /// A binary could not be hashed.
    #[error("cannot measure a binary: {0}")]
    Measure(#[from] cell0_attest::measure::MeasureError),
    /// The verifier refused its input.
    #[error("{0}")]
    Verify(#[from] cell0_attest::VerifyError),
    /// The vTPM failed.
    #[error("the vTPM failed: {0}")]
    Vtpm(#[from] cell0_attest::VtpmError),
    /// A golden digest is not 64 hex digits.
    #[error("bad golden digest {0:?}: expected 64 hex digits")]
    Digest(String),
}

/// The allow-list: the digests of `cell0d` (this executable) and the
/// `cell0-vmm` at `vmm`, plus `extra_*`.
pub fn golden_of(
    cell0d: &Path,
    vmm: &Path,
    extra_cell0d: &[String],
    extra_vmm: &[String],
) -> Result<NodeGolden, AdmissionError> {
    let parse = |v: &[String]| -> Result<Vec<Sha256Digest>, AdmissionError> {
        v.iter()
            .map(|s| s.parse().map_err(|_| AdmissionError::Digest(s.clone())))
            .collect()
    };
    let mut g = NodeGolden::default();
    if extra_cell0d.is_empty() {
        g.cell0d.push(cell0_attest::hash_file(cell0d)?);
    }
    if extra_vmm.is_empty() {
        g.cell0_vmm.push(cell0_attest::hash_file(vmm)?);
    }
    g.cell0d.extend(parse(extra_cell0d)?);
    g.cell0_vmm.extend(parse(extra_vmm)?);
    Ok(g)
}

/// The trusted TPM CA bundle: the host's swtpm local CA (`CELL0_TPM_CA_DIR`,
/// default `/var/lib/cell0/tpm-ca`), made on first use.
pub fn host_tpm_ca() -> Result<String, AdmissionError> {
    let opts = VtpmOptions::with_default_ca(PathBuf::new());
    let ca = LocalCa::open(&opts.ca_dir, &opts.swtpm_localca)
        .map_err(|e| AdmissionError::Ca(crate::tls::chain(&e)))?;
    ca.bundle_pem()
        .map_err(|e| AdmissionError::Ca(crate::tls::chain(&e)))
}

/// The control plane's side: one verifier for every node admission.
pub struct Admission {
    verifier: Mutex<Verifier>,
    golden: NodeGolden,
    opened: Mutex<HashMap<String, Instant>>,
    admitted: Mutex<HashMap<String, Instant>>,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission")
            .field("golden", &self.golden)
            .finish_non_exhaustive()
    }
}

/// Why a node was refused.
#[derive(Debug, Clone)]
pub struct Refusal {
    /// Every failed check, in words.
    pub reasons: Vec<String>,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.reasons.join("; "))
    }
}

fn refuse(r: impl Into<String>) -> Refusal {
    Refusal {
        reasons: vec![r.into()],
    }
}

impl Admission {
    /// Trusts EK certificates signed by a CA of `tpm_ca_pem`; admits binaries
    /// in `golden`.
    pub fn new(tpm_ca_pem: &str, golden: NodeGolden) -> Result<Self, AdmissionError> {
        Ok(Self {
            verifier: Mutex::new(Verifier::new(tpm_ca_pem)?),
            golden,
            opened: Mutex::new(HashMap::new()),
            admitted: Mutex::new(HashMap::new()),
        })
    }

    /// The allow-list.
    pub fn golden(&self) -> &NodeGolden {
        &self.golden
    }

    fn key(node: &str) -> String {
        format!("node:{node}")
    }

    /// Step 1: checks the EK certificate and AK; returns a credential
    /// challenge and a fresh nonce (replacing any earlier one for the node).
    pub fn challenge(
        &self,
        node: &str,
        ak: &AkBundle,
    ) -> Result<(CredentialChallenge, Nonce), Refusal> {
        let key = Self::key(node);
        {
            // Expired challenges go; a flood of open ones is refused.
            let mut opened = self.opened.lock().unwrap_or_else(|p| p.into_inner());
            opened.retain(|_, t| t.elapsed() <= CHALLENGE_TTL);
            if opened.len() >= MAX_OPEN && !opened.contains_key(&key) {
                return Err(refuse(format!(
                    "{MAX_OPEN} admissions are open already; try again later"
                )));
            }
        }
        let mut v = self.verifier.lock().unwrap_or_else(|p| p.into_inner());
        let ch = v
            .begin_enrollment(&key, ak)
            .map_err(|e| refuse(crate::tls::chain(&e)))?;
        let nonce = v.issue_nonce(&key);
        self.opened
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, Instant::now());
        Ok((ch, nonce))
    }

    /// Step 2: the credential answer binds the AK to the certified EK; then
    /// the quote over this admission's nonce, the event log and the
    /// allow-list. The nonce is used up either way.
    pub fn verify(
        &self,
        node: &str,
        activation: &ActivationResponse,
        quote: &QuoteBundle,
        log: &EventLog,
    ) -> Result<(), Refusal> {
        let key = Self::key(node);
        let opened = self
            .opened
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
        let mut v = self.verifier.lock().unwrap_or_else(|p| p.into_inner());
        match opened {
            Some(t) if t.elapsed() <= CHALLENGE_TTL => {}
            Some(_) => {
                // Use the nonce up.
                let _ = v.verify_node(&key, quote, log, &self.golden);
                return Err(refuse(format!(
                    "the challenge is older than {}s: ask for a new one",
                    CHALLENGE_TTL.as_secs()
                )));
            }
            None => {
                return Err(refuse(
                    "no open challenge for this node (call Challenge first; each one admits once)",
                ));
            }
        }
        if let Err(e) = v.finish_enrollment(&key, activation) {
            let _ = v.verify_node(&key, quote, log, &self.golden);
            return Err(refuse(crate::tls::chain(&e)));
        }
        match v.verify_node(&key, quote, log, &self.golden) {
            Verdict::Trusted { .. } => {
                self.admitted
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(node.to_string(), Instant::now());
                Ok(())
            }
            Verdict::Rejected { failures } => Err(Refusal {
                reasons: failures.iter().map(ToString::to_string).collect(),
            }),
        }
    }
}

impl Admission {
    /// Uses up the node's passed attestation: true when it passed on this
    /// member within [`ADMITTED_TTL`].
    pub fn take_admitted(&self, node: &str) -> bool {
        self.admitted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(node)
            .is_some_and(|t| t.elapsed() <= ADMITTED_TTL)
    }
}

/// The node's side: its own vTPM with its binaries measured into PCR 0.
pub struct NodeAttester {
    vtpm: Vtpm,
    log: EventLog,
}

impl std::fmt::Debug for NodeAttester {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeAttester")
            .field("log", &self.log)
            .finish_non_exhaustive()
    }
}

impl NodeAttester {
    /// Starts a vTPM under `run_dir` (EK certified by the swtpm local CA in
    /// `opts.ca_dir`) and measures `cell0d` and `cell0_vmm` into it. Blocking
    /// (swtpm_setup takes about a second).
    pub fn start(
        opts: &VtpmOptions,
        cell0d: &Path,
        cell0_vmm: &Path,
    ) -> Result<Self, AdmissionError> {
        let log = cell0_attest::node_events(cell0d, cell0_vmm)?;
        let vtpm = Vtpm::start(opts)?;
        vtpm.record_boot(&log)?;
        Ok(Self { vtpm, log })
    }

    /// The AK bundle for [`Admission::challenge`].
    pub fn ak(&self) -> &AkBundle {
        self.vtpm.ak_bundle()
    }

    /// The measured event log.
    pub fn log(&self) -> &EventLog {
        &self.log
    }

    /// Answers a challenge: the credential activation and a quote over `nonce`.
    pub fn answer(
        &self,
        challenge: &CredentialChallenge,
        nonce: &Nonce,
    ) -> Result<(ActivationResponse, QuoteBundle), AdmissionError> {
        let act = self.vtpm.activate_credential(challenge)?;
        let quote = self.vtpm.quote(nonce)?;
        Ok((act, quote))
    }

    /// The whole exchange over gRPC: Challenge, answer, Admit. Returns the
    /// registered node, or the control plane's refusal.
    pub async fn admit(
        &self,
        client: &mut grpc::admission_service_client::AdmissionServiceClient<
            tonic::transport::Channel,
        >,
        node: grpc::Node,
    ) -> Result<grpc::Node, Status> {
        let ch = client
            .challenge(grpc::AdmissionChallengeRequest {
                node_id: node.id.clone(),
                ak_json: self.ak().to_json(),
            })
            .await?
            .into_inner();
        let challenge = CredentialChallenge::from_json(&ch.credential_json)
            .map_err(|e| Status::internal(format!("bad challenge: {e}")))?;
        let nonce: Nonce = ch
            .nonce
            .parse()
            .map_err(|e| Status::internal(format!("bad nonce: {e}")))?;
        let (act, quote) = self
            .answer(&challenge, &nonce)
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(client
            .admit(grpc::AdmitNodeRequest {
                node: Some(node),
                activation_json: act.to_json(),
                quote_json: quote.to_json(),
                event_log: self.log.to_jsonl(),
            })
            .await?
            .into_inner())
    }
}

/// What the control plane admits: `cell0d serve --node-tpm-ca`,
/// `--node-golden-cell0d`, `--node-golden-vmm`.
#[derive(Debug, Clone, Default)]
pub struct AdmissionSettings {
    /// PEM bundle of the CAs that certify node TPMs' EKs (default: this host's
    /// swtpm local CA, [`host_tpm_ca`]).
    pub tpm_ca: Option<PathBuf>,
    /// This `cell0d` (its digest is the default golden value).
    pub cell0d: PathBuf,
    /// This node's `cell0-vmm` (likewise).
    pub vmm: PathBuf,
    /// Accepted `cell0d` digests (hex), instead of this `cell0d`'s.
    pub golden_cell0d: Vec<String>,
    /// Accepted `cell0-vmm` digests (hex), instead of this `cell0-vmm`'s.
    pub golden_vmm: Vec<String>,
    /// `NodeService.Register` needs a passed attestation (the default;
    /// `cell0d serve --allow-unattested-nodes` turns it off).
    pub required: bool,
    /// Set the verifier up at start rather than at the first challenge (a
    /// member of a multi-member cluster, where nodes are expected).
    pub warm_up: bool,
}

impl AdmissionSettings {
    /// Reads the CA bundle and computes the allow-list.
    pub fn build(&self) -> Result<Admission, AdmissionError> {
        let pem = match &self.tpm_ca {
            Some(p) => std::fs::read_to_string(p)
                .map_err(|e| AdmissionError::Ca(format!("{}: {e}", p.display())))?,
            None => host_tpm_ca()?,
        };
        let golden = golden_of(
            &self.cell0d,
            &self.vmm,
            &self.golden_cell0d,
            &self.golden_vmm,
        )?;
        tracing::info!(
            cell0d = ?golden.cell0d.iter().map(|d| d.to_hex()).collect::<Vec<_>>(),
            cell0_vmm = ?golden.cell0_vmm.iter().map(|d| d.to_hex()).collect::<Vec<_>>(),
            "node admission: allow-list"
        );
        Admission::new(&pem, golden)
    }
}

/// `AdmissionService`. The verifier is set up at the first call (the TPM CA
/// and the binaries' digests), so a daemon that admits no node never needs
/// swtpm.
#[derive(Clone)]
pub struct AdmissionApi {
    settings: Arc<AdmissionSettings>,
    admission: Arc<tokio::sync::OnceCell<Arc<Admission>>>,
    audit: Arc<AuditLog>,
    metrics: Arc<Metrics>,
}

impl AdmissionApi {
    /// The service.
    /// The service. With `settings.required` the verifier is set up at once
    /// in the background (call it inside a tokio runtime).
    pub fn new(settings: AdmissionSettings, audit: Arc<AuditLog>, metrics: Arc<Metrics>) -> Self {
        let api = Self {
            settings: Arc::new(settings),
            admission: Arc::default(),
            audit,
            metrics,
        };
        if api.settings.required && api.settings.warm_up {
            let a = api.clone();
            tokio::spawn(async move {
                if let Err(e) = a.admission().await {
                    tracing::warn!("{}", e.message());
                }
            });
        }
        api
    }

    /// The registration hook (`NodeService.Register`, unless
    /// `--allow-unattested-nodes`): the node must have passed `Admit` on
    /// this member within [`ADMITTED_TTL`]; that admission is used up.
    pub fn require_admitted(&self, node: &str) -> Result<(), Status> {
        if self.admission.get().is_some_and(|a| a.take_admitted(node)) {
            return Ok(());
        }
        Err(Status::permission_denied(format!(
            "node {node} refused: it has not passed attestation on this member in the last {}s \
             (AdmissionService.Challenge and Admit, then Register on the same member: \
             cell0d node --attest)",
            ADMITTED_TTL.as_secs()
        )))
    }

    /// The verifier, set up once (reading the TPM CA, hashing the binaries:
    /// a second or so) in a task of its own, so that a caller that gives up
    /// does not cancel it.
    async fn admission(&self) -> Result<Arc<Admission>, Status> {
        let (s, cell) = (self.settings.clone(), self.admission.clone());
        let init = tokio::spawn(async move {
            cell.get_or_try_init(|| async move {
                tokio::task::spawn_blocking(move || s.build().map(Arc::new))
                    .await
                    .map_err(|e| AdmissionError::Ca(e.to_string()))?
            })
            .await
            .cloned()
        });
        match init.await {
            Ok(r) => r.map_err(|e| {
                Status::failed_precondition(format!("node admission is not available: {e}"))
            }),
            Err(e) => Err(Status::internal(format!(
                "node admission set-up failed: {e}"
            ))),
        }
    }

    fn record(&self, method: &str, peer: Option<String>, node: &str, st: &Result<(), Status>) {
        let (code, msg) = match st {
            Ok(()) => (Code::Ok, String::new()),
            Err(s) => (s.code(), s.message().to_string()),
        };
        if code != Code::Ok {
            tracing::warn!(node, %code, "node admission refused: {msg}");
        }
        self.audit.record(&Entry {
            method,
            peer,
            target: &format!("node/{node}"),
            code,
            message: &msg,
            revision: 0,
        });
        self.metrics.api(method, code);
    }
}

/// With mutual TLS, a node must ask for itself: with a node certificate
/// (`issue-cert --role node`) whose name is its node id.
pub fn check_cert_name<T>(req: &Request<T>, node: &str) -> Result<(), Status> {
    crate::tls::require_role(
        req,
        &[crate::tls::Role::Node],
        "node admission and registration",
    )?;
    match crate::tls::peer_name(req) {
        Some(n) if n != node => Err(Status::permission_denied(format!(
            "node {node} refused: the client certificate names {n:?}; a node is admitted only under its own certificate's name"
        ))),
        _ => Ok(()),
    }
}

fn peer_of<T>(req: &Request<T>) -> Option<String> {
    req.remote_addr().map(|a| a.to_string())
}

#[tonic::async_trait]
impl AdmissionService for AdmissionApi {
    async fn challenge(
        &self,
        request: Request<grpc::AdmissionChallengeRequest>,
    ) -> Result<Response<grpc::AdmissionChallenge>, Status> {
        let peer = peer_of(&request);
        let node = request.get_ref().node_id.clone();
        let adm = self.admission().await;
        let r = (|| {
            let adm = adm?;
            if !crate::spec::is_dns_label(&node) {
                return Err(Status::invalid_argument(format!(
                    "node id {node:?} is not a DNS label"
                )));
            }
            check_cert_name(&request, &node)?;
            let ak = AkBundle::from_json(&request.get_ref().ak_json)
                .map_err(|e| Status::invalid_argument(format!("bad AK bundle: {e}")))?;
            adm.challenge(&node, &ak)
                .map_err(|r| Status::permission_denied(format!("node {node} refused: {r}")))
        })();
        self.record(
            "AdmissionChallenge",
            peer,
            &node,
            &r.as_ref().map(|_| ()).map_err(Clone::clone),
        );
        let (ch, nonce) = r?;
        Ok(Response::new(grpc::AdmissionChallenge {
            credential_json: ch.to_json(),
            nonce: nonce.to_string(),
        }))
    }

    async fn admit(
        &self,
        request: Request<grpc::AdmitNodeRequest>,
    ) -> Result<Response<grpc::Node>, Status> {
        let peer = peer_of(&request);
        let cert_ok = request
            .get_ref()
            .node
            .as_ref()
            .map(|n| check_cert_name(&request, &n.id));
        let req = request.into_inner();
        let node = req.node.clone().unwrap_or_default();
        let adm = self.admission().await;
        let checked = (|| {
            let adm = adm?;
            cert_ok.unwrap_or_else(|| Err(Status::invalid_argument("the request has no node")))?;
            let bad = |what: &str, e: &dyn std::fmt::Display| {
                Status::invalid_argument(format!("bad {what}: {e}"))
            };
            let act = ActivationResponse::from_json(&req.activation_json)
                .map_err(|e| bad("credential answer", &e))?;
            let quote = QuoteBundle::from_json(&req.quote_json).map_err(|e| bad("quote", &e))?;
            let log = EventLog::from_jsonl(&req.event_log).map_err(|e| bad("event log", &e))?;
            adm.verify(&node.id, &act, &quote, &log)
                .map_err(|r| Status::permission_denied(format!("node {} refused: {r}", node.id)))
        })();
        self.record("NodeAdmit", peer, &node.id, &checked);
        checked?;
        Ok(Response::new(node))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission() -> Admission {
        // Any CA certificate will do: no EK is checked here.
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::default();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = p.self_signed(&key).unwrap();
        Admission::new(&ca.pem(), NodeGolden::default()).unwrap()
    }

    fn ak() -> AkBundle {
        AkBundle {
            format: cell0_attest::formats::AK_FORMAT.into(),
            ak_public: vec![],
            ak_name: vec![],
            ek_cert: vec![1, 2, 3],
        }
    }

    #[test]
    fn open_admissions_are_bounded_and_verify_needs_a_challenge() {
        let a = admission();
        // A bad EK certificate is a refusal that names it.
        let r = a.challenge("n1", &ak()).unwrap_err();
        assert!(r.to_string().contains("EK certificate"), "{r}");
        {
            let mut o = a.opened.lock().unwrap();
            for i in 0..MAX_OPEN {
                o.insert(format!("node:x{i}"), Instant::now());
            }
        }
        let r = a.challenge("n1", &ak()).unwrap_err();
        assert!(r.to_string().contains("admissions are open already"), "{r}");
        // Expired ones make room again.
        {
            let mut o = a.opened.lock().unwrap();
            let old = Instant::now() - CHALLENGE_TTL - Duration::from_secs(1);
            for t in o.values_mut() {
                *t = old;
            }
        }
        let r = a.challenge("n1", &ak()).unwrap_err();
        assert!(r.to_string().contains("EK certificate"), "{r}");
        assert!(a.opened.lock().unwrap().is_empty());
        // Admit without a challenge, and registration without an admission.
        let q = QuoteBundle {
            format: cell0_attest::formats::QUOTE_FORMAT.into(),
            ak_name: vec![],
            attest: vec![],
            signature: vec![],
            pcrs: Default::default(),
        };
        let act = ActivationResponse {
            format: cell0_attest::formats::RESPONSE_FORMAT.into(),
            ak_name: vec![],
            secret: vec![],
        };
        let r = a.verify("n1", &act, &q, &EventLog::default()).unwrap_err();
        assert!(r.to_string().contains("no open challenge"), "{r}");
        assert!(!a.take_admitted("n1"));
    }
}
