// SPDX-License-Identifier: Apache-2.0
//! Attestation of a running VM: enrollment of its AK (the VMM's `ak` op →
//! `Verifier::begin_enrollment` (software MakeCredential) → the VMM's
//! `activate` op → `finish_enrollment`), then a quote over a fresh nonce,
//! verified against the golden values of [`super::golden`].
//!
//! Each launch of a VM has a new vTPM, so the verifier's key for a VM is
//! `<id>#<launch>`: a restarted VM is enrolled again.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cell0_attest::{
    ActivationResponse, AkBundle, EventLog, LocalCa, QuoteBundle, Verdict, Verifier, VmmIdentity,
    VtpmOptions,
};
use serde_json::{Value, json};

use super::proc;

/// Errors of attestation.
#[derive(Debug, thiserror::Error)]
pub enum AttestError {
    /// The VM was launched without a vTPM.
    #[error("VM {0:?} has no vTPM: create it with tpm=true (cell0ctl run --tpm)")]
    NoTpm(String),
    /// The host CA could not be read.
    #[error("cannot read the vTPM CA certificates")]
    Ca(#[source] cell0_attest::VtpmError),
    /// The verifier refused the CA bundle or the AK.
    #[error("verifier error")]
    Verify(#[from] cell0_attest::VerifyError),
    /// The VM's API failed.
    #[error("VM API failed")]
    Api(#[from] proc::ProcError),
    /// The VM answered something unparsable.
    #[error("bad {what} from the VM: {reason}")]
    Bad {
        /// What was parsed.
        what: &'static str,
        /// Why it failed.
        reason: String,
    },
    /// Golden values could not be computed.
    #[error("cannot compute golden values")]
    Golden(#[from] super::golden::GoldenError),
    /// The nano image could not be written out.
    #[error("cannot get the built-in nano image from {vmm}: {reason}")]
    NanoImage {
        /// cell0-vmm path.
        vmm: String,
        /// Why.
        reason: String,
    },
    /// The VMM binary could not be hashed.
    #[error("cannot hash the cell0-vmm binary")]
    Measure(#[from] cell0_attest::measure::MeasureError),
}

/// What an attestation found.
#[derive(Debug, Clone)]
pub struct Attestation {
    /// The verdict.
    pub verdict: Verdict,
    /// The nonce.
    pub nonce: [u8; 32],
    /// The AK name (hex).
    pub ak_name: String,
    /// Quoted PCRs (hex).
    pub pcrs: Vec<(u32, String)>,
    /// Whether this call enrolled the AK.
    pub enrolled: bool,
}

#[derive(Default)]
struct Inner {
    verifier: Option<Verifier>,
    enrolled: BTreeSet<String>,
    nano_elf: Option<Vec<u8>>,
    vmm: Option<VmmIdentity>,
}

/// The VM to attest.
#[derive(Clone, Copy)]
pub struct Target<'a> {
    /// VM id.
    pub id: &'a str,
    /// Launch counter (a new launch has a new vTPM).
    pub launch: u64,
    /// The VM's API socket.
    pub sock: &'a Path,
    /// Its spec.
    pub spec: &'a crate::spec::VmSpec,
    /// Its vsock CID.
    pub cid: u32,
    /// What cell0d appended to its cmdline for this launch.
    pub cmdline_extra: &'a str,
    /// The cell0-vmm executable that launched it.
    pub vmm_bin: &'a Path,
}

/// The node's verifier state.
pub struct AttestState {
    inner: tokio::sync::Mutex<Inner>,
    dir: PathBuf,
}

fn parse<T: serde::de::DeserializeOwned>(what: &'static str, v: &Value) -> Result<T, AttestError> {
    serde_json::from_value(v.clone()).map_err(|e| AttestError::Bad {
        what,
        reason: e.to_string(),
    })
}

impl AttestState {
    /// State for a node whose data dir is `data_dir`.
    pub fn new(data_dir: &Path) -> Self {
        Self {
            inner: tokio::sync::Mutex::new(Inner::default()),
            dir: data_dir.join("node"),
        }
    }

    /// Forgets a deleted VM's enrollments.
    pub fn forget(&self, id: &str) {
        if let Ok(mut g) = self.inner.try_lock() {
            let prefix = format!("{id}#");
            g.enrolled.retain(|k| !k.starts_with(&prefix));
        }
    }

    /// Enrolls (once per launch) and verifies a fresh quote of the VM whose
    /// API socket is `sock`.
    pub async fn attest(&self, t: &Target<'_>) -> Result<Attestation, AttestError> {
        let Target {
            id,
            launch,
            sock,
            spec,
            cid,
            cmdline_extra,
            vmm_bin,
        } = *t;
        if !spec.tpm {
            return Err(AttestError::NoTpm(id.to_string()));
        }
        let key = format!("{id}#{launch}");
        let t = Duration::from_secs(30);
        let mut g = self.inner.lock().await;
        if g.verifier.is_none() {
            let opts = VtpmOptions::with_default_ca(self.dir.clone());
            let ca = LocalCa::open(&opts.ca_dir, &opts.swtpm_localca).map_err(AttestError::Ca)?;
            let pem = ca.bundle_pem().map_err(AttestError::Ca)?;
            g.verifier = Some(Verifier::new(&pem)?);
        }
        if g.vmm.is_none() {
            // Hashing a large binary takes seconds: not on a runtime worker,
            // where it would hold up the heartbeats (and the VMs' leases).
            let bin = vmm_bin.to_path_buf();
            let binary = tokio::task::spawn_blocking(move || cell0_attest::hash_file(&bin))
                .await
                .map_err(|e| cell0_attest::measure::MeasureError::Io {
                    path: vmm_bin.to_path_buf(),
                    source: std::io::Error::other(e.to_string()),
                })??;
            g.vmm = Some(VmmIdentity {
                binary,
                version: env!("CARGO_PKG_VERSION").to_string(),
            });
        }
        if g.nano_elf.is_none() && spec.is_nano() {
            g.nano_elf = Some(nano_image(vmm_bin).await?);
        }
        let mut enrolled = false;
        if !g.enrolled.contains(&key) {
            let ak = proc::api_call_async(sock, json!({"op": "ak"}), t).await?;
            let bundle: AkBundle = parse("AK bundle", &ak["ak"])?;
            let Some(verifier) = g.verifier.as_mut() else {
                return Err(AttestError::Bad {
                    what: "verifier",
                    reason: "not initialized".into(),
                });
            };
            let challenge = verifier.begin_enrollment(&key, &bundle)?;
            let resp =
                proc::api_call_async(sock, json!({"op": "activate", "challenge": challenge}), t)
                    .await?;
            let resp: ActivationResponse = parse("activation response", &resp["response"])?;
            let Some(verifier) = g.verifier.as_mut() else {
                return Err(AttestError::Bad {
                    what: "verifier",
                    reason: "not initialized".into(),
                });
            };
            verifier.finish_enrollment(&key, &resp)?;
            g.enrolled.insert(key.clone());
            enrolled = true;
        }
        let Inner {
            verifier,
            nano_elf,
            vmm,
            ..
        } = &mut *g;
        let (Some(verifier), Some(vmm)) = (verifier.as_mut(), vmm.as_ref()) else {
            return Err(AttestError::Bad {
                what: "verifier",
                reason: "not initialized".into(),
            });
        };
        let manifest = super::golden::manifest(
            spec,
            cid,
            cmdline_extra,
            vmm,
            nano_elf.as_deref().unwrap_or_default(),
        )?;
        let nonce = verifier.issue_nonce(&key);
        let q = proc::api_call_async(
            sock,
            json!({"op": "quote", "nonce": hex::encode(nonce.0)}),
            t,
        )
        .await?;
        let quote: QuoteBundle = parse("quote", &q["quote"])?;
        let log = EventLog::from_jsonl(q["event_log"].as_str().unwrap_or("")).map_err(|e| {
            AttestError::Bad {
                what: "event log",
                reason: e.to_string(),
            }
        })?;
        let verdict = verifier.verify(&key, &quote, &log, &manifest);
        Ok(Attestation {
            verdict,
            nonce: nonce.0,
            ak_name: hex::encode(&quote.ak_name),
            pcrs: quote
                .pcrs
                .iter()
                .map(|(k, v)| (u32::from(*k), v.to_string()))
                .collect(),
            enrolled,
        })
    }
}

async fn nano_image(vmm_bin: &Path) -> Result<Vec<u8>, AttestError> {
    let err = |reason: String| AttestError::NanoImage {
        vmm: vmm_bin.display().to_string(),
        reason,
    };
    let dir = std::env::temp_dir().join(format!("cell0d-nano-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| err(e.to_string()))?;
    let out = dir.join("nano.elf");
    let st = tokio::process::Command::new(vmm_bin)
        .arg("nano-image")
        .arg("--out")
        .arg(&out)
        .status()
        .await
        .map_err(|e| err(e.to_string()))?;
    if !st.success() {
        return Err(err(format!("exit status {st}")));
    }
    let b = std::fs::read(&out).map_err(|e| err(e.to_string()));
    let _ = std::fs::remove_dir_all(&dir);
    b
}
