// SPDX-License-Identifier: Apache-2.0
//! The verifier: AK enrollment (EK certificate → MakeCredential →
//! ActivateCredential), nonces, and quote verification into a typed
//! [`Verdict`].
//!
//! A [`Verifier`] keeps per-VM state: the trusted AK, a pending enrollment,
//! the outstanding nonce and the last clock seen. [`VerifierState`] is that
//! state as JSON, so a CLI or a control plane can persist it.

mod crypto;
mod ekcert;
pub(crate) mod quote;

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::time::SystemTime;

use rand_core::{OsRng, RngCore};
use serde::{Deserialize, Serialize};

pub use ekcert::TrustAnchors;

use crate::digest::Sha256Digest;
use crate::eventlog::{EventLog, EventType, PcrValues};
use crate::formats::{
    ActivationResponse, AkBundle, CHALLENGE_FORMAT, CredentialChallenge, FormatError, Nonce,
    QuoteBundle, b64, hexbytes,
};
use crate::manifest::Manifest;

/// Errors of enrollment and verifier state (a quote that fails a check is not
/// an error: it is a [`Verdict::Rejected`]).
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The trust bundle cannot be used.
    #[error("the CA bundle is not usable: {reason}")]
    Anchors {
        /// Why.
        reason: String,
    },
    /// The EK certificate is not acceptable.
    #[error("the EK certificate is not trusted: {reason}")]
    EkCert {
        /// Why.
        reason: String,
    },
    /// The AK public area is not an acceptable attestation key.
    #[error("the AK is not acceptable: {reason}")]
    BadAk {
        /// Why.
        reason: String,
    },
    /// The AK bundle's name is not the name of its public area.
    #[error("the AK bundle's name {claimed} is not its public area's name {computed}")]
    AkNameMismatch {
        /// The name in the bundle (hex).
        claimed: String,
        /// The name computed from the public area (hex).
        computed: String,
    },
    /// A cryptographic primitive failed.
    #[error("{what}")]
    Crypto {
        /// What failed.
        what: &'static str,
    },
    /// The attester did not recover the credential: its AK is not in the TPM
    /// that holds the certified EK.
    #[error("credential activation for VM {vm} failed: the AK is not bound to the certified EK")]
    ActivationFailed {
        /// The VM.
        vm: String,
    },
    /// No enrollment is in progress for the VM.
    #[error("no enrollment is in progress for VM {vm}")]
    NoPendingEnrollment {
        /// The VM.
        vm: String,
    },
    /// A serialized object is malformed.
    #[error("malformed input")]
    Format(#[from] FormatError),
    /// The state file cannot be read or written.
    #[error("cannot access verifier state {path}")]
    State {
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The state file is not valid JSON state.
    #[error("the verifier state is not valid")]
    StateParse(#[source] serde_json::Error),
}

/// The TPM clock fields a quote carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClockInfo {
    /// Milliseconds the TPM has been powered since its last TPM2_Clear.
    pub clock: u64,
    /// TPM resets (power cycles without orderly shutdown).
    pub reset_count: u32,
    /// TPM restarts/resumes.
    pub restart_count: u32,
}

impl ClockInfo {
    /// The failure if `self` is earlier than `prev`: the reset count must not
    /// fall; within one reset the restart count must not fall; within one
    /// restart the clock must not fall.
    pub fn went_backwards_from(&self, prev: &ClockInfo) -> Option<Failure> {
        let field = if self.reset_count < prev.reset_count {
            (
                "reset_count",
                u64::from(prev.reset_count),
                u64::from(self.reset_count),
            )
        } else if self.reset_count == prev.reset_count && self.restart_count < prev.restart_count {
            (
                "restart_count",
                u64::from(prev.restart_count),
                u64::from(self.restart_count),
            )
        } else if self.reset_count == prev.reset_count
            && self.restart_count == prev.restart_count
            && self.clock < prev.clock
        {
            ("clock", prev.clock, self.clock)
        } else {
            return None;
        };
        Some(Failure::ClockWentBackwards {
            field: field.0.to_string(),
            previous: field.1,
            got: field.2,
        })
    }
}

/// One failed check, naming what differs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "check", rename_all = "kebab-case")]
pub enum Failure {
    /// The VM has no enrolled (activated) AK.
    NotEnrolled {
        /// The VM.
        vm: String,
    },
    /// No nonce was issued to the VM (or it was used already).
    NoNonceIssued {
        /// The VM.
        vm: String,
    },
    /// The quote does not parse.
    MalformedQuote {
        /// Why.
        reason: String,
    },
    /// The quote's signature does not verify under the enrolled AK.
    BadSignature {
        /// Why.
        reason: String,
    },
    /// The quote names another AK than the VM's enrolled one.
    WrongAk {
        /// The enrolled AK's name (hex).
        expected: String,
        /// The AK name in the quote (hex).
        got: String,
    },
    /// The qualifying data is not the verifier's nonce.
    NonceMismatch {
        /// The nonce issued (hex).
        expected: String,
        /// The qualifying data in the quote (hex).
        got: String,
    },
    /// The TPM clock is earlier than in a previous quote of the VM.
    ClockWentBackwards {
        /// `reset_count`, `restart_count` or `clock`.
        field: String,
        /// The value in the previous quote.
        previous: u64,
        /// The value in this quote.
        got: u64,
    },
    /// The quote covers other PCRs than the measured SHA-256 PCRs.
    WrongPcrSelection {
        /// The measured PCRs.
        expected: Vec<u8>,
        /// The PCRs the quote covers.
        got: Vec<u8>,
    },
    /// The PCR values sent with the quote are not the ones it signed.
    ReportedPcrsNotSigned {
        /// The signed PCR digest (hex).
        signed: String,
        /// The digest of the reported values (hex).
        reported: String,
    },
    /// Event-log replay does not give the signed PCR digest (reported values
    /// were unusable, so the PCR cannot be named).
    ReplayDigestMismatch {
        /// The signed PCR digest (hex).
        signed: String,
        /// The digest of the replayed values (hex).
        replayed: String,
    },
    /// Event-log replay gives another value for a quoted PCR.
    PcrMismatch {
        /// The PCR.
        pcr: u8,
        /// What the event log replays to.
        replayed: Sha256Digest,
        /// What the TPM quoted.
        quoted: Sha256Digest,
    },
    /// The event log lacks an event of the boot sequence.
    MissingEvent {
        /// Its position.
        index: usize,
        /// The event expected there.
        expected: EventType,
    },
    /// The event log has an event out of the boot sequence.
    UnexpectedEvent {
        /// Its position.
        index: usize,
        /// The event expected there, if any.
        expected: Option<EventType>,
        /// The event found.
        got: EventType,
        /// The PCR it extended.
        pcr: u8,
    },
    /// An event extended another PCR than its type belongs to.
    WrongEventPcr {
        /// Its position.
        index: usize,
        /// The event.
        event: EventType,
        /// The PCR of that type.
        expected: u8,
        /// The PCR it names.
        got: u8,
    },
    /// An event's digest is not the golden value.
    EventMismatch {
        /// Its position.
        index: usize,
        /// Its PCR.
        pcr: u8,
        /// The event.
        event: EventType,
        /// The event's description (from the attester).
        description: String,
        /// The golden value(s) from the manifest.
        expected: Vec<Sha256Digest>,
        /// The measured digest.
        got: Sha256Digest,
    },
    /// The manifest has no golden value for an event.
    NoGoldenValue {
        /// Its position.
        index: usize,
        /// The event.
        event: EventType,
    },
    /// The cell0-vmm binary and version are each accepted but not as one build.
    VmmBuildMismatch {
        /// The measured binary digest.
        binary: Sha256Digest,
        /// The measured version's description.
        version: String,
    },
}

fn join(d: &[Sha256Digest]) -> String {
    d.iter()
        .map(|x| x.to_hex())
        .collect::<Vec<_>>()
        .join(" or ")
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::NotEnrolled { vm } => write!(f, "VM {vm} has no activated AK"),
            Failure::NoNonceIssued { vm } => write!(f, "no unused nonce was issued to VM {vm}"),
            Failure::MalformedQuote { reason } => write!(f, "malformed quote: {reason}"),
            Failure::BadSignature { reason } => write!(f, "bad quote signature: {reason}"),
            Failure::WrongAk { expected, got } => {
                write!(
                    f,
                    "quote signed by AK {got}, expected the VM's AK {expected}"
                )
            }
            Failure::NonceMismatch { expected, got } => {
                write!(f, "nonce mismatch: expected {expected}, got {got}")
            }
            Failure::ClockWentBackwards {
                field,
                previous,
                got,
            } => write!(
                f,
                "TPM {field} went backwards: previous quote {previous}, this quote {got}"
            ),
            Failure::WrongPcrSelection { expected, got } => {
                write!(
                    f,
                    "quote covers SHA-256 PCRs {got:?}, expected {expected:?}"
                )
            }
            Failure::ReportedPcrsNotSigned { signed, reported } => write!(
                f,
                "reported PCR values digest to {reported}, the quote signed {signed}"
            ),
            Failure::ReplayDigestMismatch { signed, replayed } => write!(
                f,
                "event-log replay digests to {replayed}, the quote signed {signed}"
            ),
            Failure::PcrMismatch {
                pcr,
                replayed,
                quoted,
            } => write!(
                f,
                "PCR {pcr}: event-log replay gives {replayed}, the TPM quoted {quoted}"
            ),
            Failure::MissingEvent { index, expected } => {
                write!(f, "event {index}: missing, expected a {expected} event")
            }
            Failure::UnexpectedEvent {
                index,
                expected,
                got,
                pcr,
            } => match expected {
                Some(e) => write!(f, "event {index}: expected {e}, got {got} (PCR {pcr})"),
                None => write!(f, "event {index}: unexpected extra {got} event (PCR {pcr})"),
            },
            Failure::WrongEventPcr {
                index,
                event,
                expected,
                got,
            } => write!(
                f,
                "event {index} ({event}): extends PCR {got}, expected PCR {expected}"
            ),
            Failure::EventMismatch {
                index,
                pcr,
                event,
                description,
                expected,
                got,
            } => write!(
                f,
                "PCR {pcr} event {index} ({event}: {description}): expected {}, got {got}",
                join(expected)
            ),
            Failure::NoGoldenValue { index, event } => {
                write!(
                    f,
                    "event {index} ({event}): the manifest has no golden value"
                )
            }
            Failure::VmmBuildMismatch { binary, version } => write!(
                f,
                "cell0-vmm binary {binary} and {version} are not one accepted build"
            ),
        }
    }
}

/// The outcome of verifying a quote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "verdict", rename_all = "kebab-case")]
pub enum Verdict {
    /// Every check passed.
    Trusted {
        /// The quote's TPM clock.
        clock: ClockInfo,
        /// The verified PCR values.
        pcrs: PcrValues,
    },
    /// At least one check failed; all failures found are listed.
    Rejected {
        /// What differs.
        failures: Vec<Failure>,
    },
}

impl Verdict {
    /// True for [`Verdict::Trusted`].
    pub fn is_trusted(&self) -> bool {
        matches!(self, Verdict::Trusted { .. })
    }

    /// The failures (empty when trusted).
    pub fn failures(&self) -> &[Failure] {
        match self {
            Verdict::Trusted { .. } => &[],
            Verdict::Rejected { failures } => failures,
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Trusted { clock, .. } => {
                write!(f, "trusted (TPM clock {} ms)", clock.clock)
            }
            Verdict::Rejected { failures } => {
                writeln!(f, "rejected: {} check(s) failed", failures.len())?;
                for x in failures {
                    writeln!(f, "  - {x}")?;
                }
                Ok(())
            }
        }
    }
}

/// An AK the verifier trusts for one VM, after credential activation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustedAk {
    /// The AK's TPMT_PUBLIC.
    #[serde(with = "b64")]
    pub ak_public: Vec<u8>,
    /// Its TPM name.
    #[serde(with = "hexbytes")]
    pub ak_name: Vec<u8>,
    /// SHA-256 of the EK certificate it was activated against.
    pub ek_cert_sha256: Sha256Digest,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct PendingEnrollment {
    ak: TrustedAk,
    #[serde(with = "b64")]
    secret: Vec<u8>,
}

/// Per-VM verifier state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmState {
    /// The activated AK.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ak: Option<TrustedAk>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pending: Option<PendingEnrollment>,
    /// The nonce issued and not yet used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonce: Option<Nonce>,
    /// The clock of the last quote whose signature verified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_clock: Option<ClockInfo>,
}

/// Everything a verifier remembers, by VM id.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifierState {
    /// Per-VM state.
    pub vms: BTreeMap<String, VmState>,
}

impl VerifierState {
    /// Reads a state file; a missing file is an empty state.
    pub fn load(path: &Path) -> Result<Self, VerifyError> {
        match std::fs::read_to_string(path) {
            Ok(t) => serde_json::from_str(&t).map_err(VerifyError::StateParse),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(VerifyError::State {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// Writes the state file atomically, readable by its owner only.
    pub fn save(&self, path: &Path) -> Result<(), VerifyError> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let io = |source| VerifyError::State {
            path: path.to_path_buf(),
            source,
        };
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io)?;
        let text = serde_json::to_string_pretty(self).unwrap_or_default();
        f.write_all(text.as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }
}

/// A stateful verifier for many VMs.
#[derive(Debug, Clone)]
pub struct Verifier {
    anchors: TrustAnchors,
    state: VerifierState,
}

impl Verifier {
    /// A verifier trusting EK certificates signed by a CA in `ca_bundle_pem`.
    pub fn new(ca_bundle_pem: &str) -> Result<Self, VerifyError> {
        Ok(Verifier {
            anchors: TrustAnchors::from_pem(ca_bundle_pem)?,
            state: VerifierState::default(),
        })
    }

    /// A verifier resuming from saved state.
    pub fn with_state(ca_bundle_pem: &str, state: VerifierState) -> Result<Self, VerifyError> {
        Ok(Verifier {
            anchors: TrustAnchors::from_pem(ca_bundle_pem)?,
            state,
        })
    }

    /// A verifier that trusts no CA: it verifies quotes of VMs already
    /// enrolled in `state` but cannot enroll new ones.
    pub fn for_enrolled(state: VerifierState) -> Self {
        Verifier {
            anchors: TrustAnchors::none(),
            state,
        }
    }

    /// The state, for saving.
    pub fn state(&self) -> &VerifierState {
        &self.state
    }

    /// Step 1 of enrollment: checks the EK certificate against the CA bundle
    /// and the AK's attributes, then seals a fresh secret to the EK for the AK's
    /// name (software TPM2_MakeCredential). Replaces any earlier AK of the VM
    /// once finished.
    pub fn begin_enrollment(
        &mut self,
        vm: &str,
        bundle: &AkBundle,
    ) -> Result<CredentialChallenge, VerifyError> {
        let ek = self
            .anchors
            .verify_ek_cert(&bundle.ek_cert, SystemTime::now())?;
        crypto::parse_ak_public(&bundle.ak_public)?;
        let name = crypto::tpm_name(&bundle.ak_public);
        if name != bundle.ak_name {
            return Err(VerifyError::AkNameMismatch {
                claimed: hex::encode(&bundle.ak_name),
                computed: hex::encode(&name),
            });
        }
        let mut secret = vec![0u8; 32];
        OsRng.fill_bytes(&mut secret);
        let (credential_blob, encrypted_secret) = crypto::make_credential(&ek, &name, &secret)?;
        self.state.vms.entry(vm.to_string()).or_default().pending = Some(PendingEnrollment {
            ak: TrustedAk {
                ak_public: bundle.ak_public.clone(),
                ak_name: name.clone(),
                ek_cert_sha256: Sha256Digest::of(&bundle.ek_cert),
            },
            secret,
        });
        Ok(CredentialChallenge {
            format: CHALLENGE_FORMAT.to_string(),
            ak_name: name,
            credential_blob,
            encrypted_secret,
        })
    }

    /// Step 2 of enrollment: the AK is trusted if the attester recovered the
    /// secret, which only the TPM holding the certified EK, with the named AK
    /// loaded, can do.
    pub fn finish_enrollment(
        &mut self,
        vm: &str,
        response: &ActivationResponse,
    ) -> Result<TrustedAk, VerifyError> {
        let st = self.state.vms.entry(vm.to_string()).or_default();
        let pending = st
            .pending
            .take()
            .ok_or_else(|| VerifyError::NoPendingEnrollment { vm: vm.to_string() })?;
        if !constant_time_eq(&pending.secret, &response.secret)
            || response.ak_name != pending.ak.ak_name
        {
            return Err(VerifyError::ActivationFailed { vm: vm.to_string() });
        }
        st.ak = Some(pending.ak.clone());
        st.last_clock = None;
        Ok(pending.ak)
    }

    /// A fresh nonce for the VM's next quote; replaces any unused one.
    pub fn issue_nonce(&mut self, vm: &str) -> Nonce {
        let n = Nonce::random();
        self.state.vms.entry(vm.to_string()).or_default().nonce = Some(n);
        n
    }

    /// Verifies a quote against the nonce issued to the VM (which is used up).
    pub fn verify(
        &mut self,
        vm: &str,
        quote: &QuoteBundle,
        log: &EventLog,
        manifest: &Manifest,
    ) -> Verdict {
        let Some(nonce) = self.state.vms.get_mut(vm).and_then(|s| s.nonce.take()) else {
            return Verdict::Rejected {
                failures: vec![Failure::NoNonceIssued { vm: vm.to_string() }],
            };
        };
        self.verify_with_nonce(vm, &nonce, quote, log, manifest)
    }

    /// Verifies a quote against a nonce the caller chose and tracks itself.
    pub fn verify_with_nonce(
        &mut self,
        vm: &str,
        nonce: &Nonce,
        quote: &QuoteBundle,
        log: &EventLog,
        manifest: &Manifest,
    ) -> Verdict {
        self.verify_events(vm, nonce, quote, log, &|l, f| {
            quote::check_events(l, manifest, f)
        })
    }

    /// Verifies a node's admission quote (enrolled under the name `node`, like
    /// a VM) against the nonce issued to it, which is used up: the quote's
    /// signature, nonce, clock and PCRs as for a VM, then the event log must be
    /// exactly the node's binaries ([`crate::node::node_events`]), each digest
    /// in `golden`.
    pub fn verify_node(
        &mut self,
        node: &str,
        quote: &QuoteBundle,
        log: &EventLog,
        golden: &crate::node::NodeGolden,
    ) -> Verdict {
        let Some(nonce) = self.state.vms.get_mut(node).and_then(|s| s.nonce.take()) else {
            return Verdict::Rejected {
                failures: vec![Failure::NoNonceIssued {
                    vm: node.to_string(),
                }],
            };
        };
        self.verify_events(node, &nonce, quote, log, &|l, f| {
            crate::node::check_node_events(l, golden, f)
        })
    }

    fn verify_events(
        &mut self,
        vm: &str,
        nonce: &Nonce,
        quote: &QuoteBundle,
        log: &EventLog,
        events: &dyn Fn(&EventLog, &mut Vec<Failure>),
    ) -> Verdict {
        let st = self.state.vms.entry(vm.to_string()).or_default();
        let Some(ak) = st.ak.as_ref() else {
            return Verdict::Rejected {
                failures: vec![Failure::NotEnrolled { vm: vm.to_string() }],
            };
        };
        let key = match crypto::parse_ak_public(&ak.ak_public) {
            Ok(k) => k,
            Err(e) => {
                return Verdict::Rejected {
                    failures: vec![Failure::BadSignature {
                        reason: e.to_string(),
                    }],
                };
            }
        };
        let exp = quote::Expectations {
            ak_key: &key,
            ak_name: &ak.ak_name,
            nonce,
            previous_clock: st.last_clock,
        };
        let (verdict, clock) = quote::check(&exp, quote, log, events);
        if let Some(c) = clock {
            // Only a clock that moved forward replaces the high-water mark.
            if st
                .last_clock
                .is_none_or(|p| c.went_backwards_from(&p).is_none())
            {
                st.last_clock = Some(c);
            }
        }
        verdict
    }
}

/// The clock fields of a quote, unauthenticated (for diagnostics; verification
/// checks them under the signature).
pub fn quote_clock(quote: &QuoteBundle) -> Option<ClockInfo> {
    use tss_esapi::traits::UnMarshall;
    let a = tss_esapi::structures::Attest::unmarshall(&quote.attest).ok()?;
    let c = a.clock_info();
    Some(ClockInfo {
        clock: c.clock(),
        reset_count: c.reset_count(),
        restart_count: c.restart_count(),
    })
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_ordering_rules() {
        let base = ClockInfo {
            clock: 100,
            reset_count: 1,
            restart_count: 0,
        };
        let later = ClockInfo { clock: 150, ..base };
        assert_eq!(later.went_backwards_from(&base), None);
        assert_eq!(base.went_backwards_from(&base), None);
        let earlier = ClockInfo { clock: 50, ..base };
        assert!(matches!(
            earlier.went_backwards_from(&base),
            Some(Failure::ClockWentBackwards { ref field, previous: 100, got: 50 }) if field == "clock"
        ));
        let fewer_resets = ClockInfo {
            reset_count: 0,
            clock: 500,
            ..base
        };
        assert!(matches!(
            fewer_resets.went_backwards_from(&base),
            Some(Failure::ClockWentBackwards { ref field, .. }) if field == "reset_count"
        ));
        let after_reset = ClockInfo {
            reset_count: 2,
            clock: 10,
            ..base
        };
        assert_eq!(after_reset.went_backwards_from(&base), None);
    }

    #[test]
    fn failures_render_what_differs() {
        let f = Failure::EventMismatch {
            index: 2,
            pcr: 4,
            event: EventType::Kernel,
            description: "kernel image, 10 bytes".into(),
            expected: vec![Sha256Digest::of(b"a")],
            got: Sha256Digest::of(b"b"),
        };
        let s = f.to_string();
        assert!(s.starts_with("PCR 4 event 2 (kernel: kernel image, 10 bytes): expected "));
        assert!(s.contains(&Sha256Digest::of(b"b").to_hex()));
        let json = serde_json::to_value(&f).unwrap_or_default();
        assert_eq!(json["check"], "event-mismatch");
        assert_eq!(json["event"], "kernel");
    }

    #[test]
    fn verify_without_enrollment_or_nonce_is_rejected_by_name() {
        let mut v = Verifier {
            anchors: TrustAnchors::none(),
            state: VerifierState::default(),
        };
        let q = QuoteBundle {
            format: crate::formats::QUOTE_FORMAT.into(),
            ak_name: vec![],
            attest: vec![],
            signature: vec![],
            pcrs: PcrValues::new(),
        };
        let m = Manifest {
            format: crate::manifest::MANIFEST_FORMAT.into(),
            name: None,
            kernel_sha256: Sha256Digest::ZERO,
            initrd_sha256: None,
            cmdline_sha256: Sha256Digest::ZERO,
            cmdline: None,
            vm_config_sha256: None,
            workload_sha256: None,
            vmm: vec![],
        };
        let verdict = v.verify("vm1", &q, &EventLog::default(), &m);
        assert_eq!(
            verdict.failures(),
            &[Failure::NoNonceIssued { vm: "vm1".into() }]
        );
        v.issue_nonce("vm1");
        let verdict = v.verify("vm1", &q, &EventLog::default(), &m);
        assert_eq!(
            verdict.failures(),
            &[Failure::NotEnrolled { vm: "vm1".into() }]
        );
    }
}
