// SPDX-License-Identifier: Apache-2.0
//! Measured boot (`cell0-vmm launch --tpm`): one swtpm per VM, PCRs extended
//! before the first vCPU runs, and the API ops a verifier uses.
//!
//! API ops (see [`crate::api`]):
//!
//! | op | request | response |
//! |---|---|---|
//! | `ak` | — | `ak`: the AK bundle (AK public, name, EK certificate) |
//! | `activate` | `challenge`: a credential challenge (JSON) | `response`: the activation response |
//! | `quote` | `nonce`: 64 hex digits | `quote`: the quote bundle; `event_log`: JSON lines |
//! | `event_log` | — | `event_log`: JSON lines |

use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;

use cell0_attest::{
    BootInputs, CredentialChallenge, DeviceSpec, EventLog, Nonce, VmmIdentity, Vtpm, VtpmError,
    VtpmOptions, Wire, WorkloadSpec,
};
use serde_json::{Value, json};

use crate::api::{ApiExtension, error};

/// Errors of measured boot.
#[derive(Debug, thiserror::Error)]
pub enum TpmError {
    /// The vTPM could not be started or used.
    #[error("vTPM failed")]
    Vtpm(#[from] VtpmError),
    /// The VMM could not hash its own executable.
    #[error("cannot measure the cell0-vmm executable")]
    Identity(#[source] cell0_attest::measure::MeasureError),
    /// The vTPM start-up thread died.
    #[error("the vTPM start-up thread panicked")]
    Thread,
}

/// What to measure besides the images: the workload (PCR 12).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TpmConfig {
    /// Run directory; the vTPM state lives in `<run_dir>/vtpm/`.
    pub run_dir: PathBuf,
    /// Agent id measured into PCR 12.
    pub agent_id: String,
    /// Workload command measured into PCR 12.
    pub command: Vec<String>,
}

/// A vTPM being started on its own thread while the VM is built (or, in the
/// jail, already started before `pivot_root`).
pub struct PendingVtpm(Pending);

enum Pending {
    Thread(JoinHandle<Result<Vtpm, VtpmError>>),
    Ready(Box<Vtpm>),
}

impl PendingVtpm {
    /// Starts swtpm (and manufactures its EK on first use) in the background.
    pub fn start(cfg: &TpmConfig) -> Self {
        let mut opts = VtpmOptions::with_default_ca(cfg.run_dir.clone());
        opts.worker_init = Some(crate::seccomp::vtpm_worker_init);
        Self(Pending::Thread(std::thread::spawn(move || {
            Vtpm::start(&opts)
        })))
    }

    /// Waits until the vTPM has started and keeps it for [`PendingVtpm::wait`].
    pub fn finish(self) -> Result<Self, TpmError> {
        Ok(Self(Pending::Ready(Box::new(self.wait()?))))
    }

    /// Whether [`PendingVtpm::wait`] returns at once (swtpm started or failed).
    pub fn is_ready(&self) -> bool {
        match &self.0 {
            Pending::Thread(t) => t.is_finished(),
            Pending::Ready(_) => true,
        }
    }

    /// Waits for the vTPM.
    pub fn wait(self) -> Result<Vtpm, TpmError> {
        match self.0 {
            Pending::Thread(t) => t
                .join()
                .map_err(|_| TpmError::Thread)?
                .map_err(TpmError::from),
            Pending::Ready(v) => Ok(*v),
        }
    }
}

/// The images and settings that were booted.
pub struct Measured<'a> {
    /// Kernel image bytes.
    pub kernel: &'a [u8],
    /// The full cmdline the guest sees.
    pub cmdline: &'a str,
    /// Initrd bytes.
    pub initrd: Option<&'a [u8]>,
    /// vCPUs.
    pub vcpus: u8,
    /// Memory.
    pub memory_mib: u64,
    /// Vsock CID.
    pub vsock_cid: Option<u64>,
    /// Shared-memory window size.
    pub shm_mib: u64,
    /// Guest-visible devices.
    pub devices: Vec<DeviceSpec>,
}

/// Extends the boot PCRs and returns the event log.
pub fn measure(vtpm: &Vtpm, cfg: &TpmConfig, m: &Measured<'_>) -> Result<EventLog, TpmError> {
    let vmm = VmmIdentity::of_current_exe(env!("CARGO_PKG_VERSION")).map_err(TpmError::Identity)?;
    let config = cell0_attest::VmConfig {
        vcpus: u32::from(m.vcpus),
        memory_mib: m.memory_mib,
        vsock_cid: m.vsock_cid,
        shm_mib: m.shm_mib,
        devices: m.devices.clone(),
    };
    let workload = WorkloadSpec {
        agent_id: cfg.agent_id.clone(),
        image_manifest: None,
        command: cfg.command.clone(),
    };
    let log = vtpm.measure_boot(&BootInputs {
        vmm: &vmm,
        kernel: m.kernel,
        cmdline: m.cmdline.as_bytes(),
        initrd: m.initrd,
        config: &config,
        workload: &workload,
    })?;
    Ok(log)
}

/// The TPM ops of the API socket.
pub struct TpmApi {
    /// The VM's vTPM.
    pub vtpm: Arc<Vtpm>,
    /// The boot event log.
    pub log: EventLog,
}

fn parse_nonce(v: &Value) -> Result<Nonce, String> {
    let s = v
        .as_str()
        .ok_or("\"nonce\" must be a string of 64 hex digits")?;
    let b = hex::decode(s).map_err(|e| format!("\"nonce\" is not hex: {e}"))?;
    let a: [u8; 32] = b
        .try_into()
        .map_err(|b: Vec<u8>| format!("\"nonce\" must be 32 bytes, got {}", b.len()))?;
    Ok(Nonce(a))
}

fn to_value<T: Wire>(w: &T) -> Value {
    serde_json::to_value(w).unwrap_or(Value::Null)
}

impl ApiExtension for TpmApi {
    fn handle(&self, op: &str, req: &Value) -> Option<Value> {
        let r = match op {
            "ak" => json!({"ok": true, "ak": to_value(self.vtpm.ak_bundle())}),
            "event_log" => json!({"ok": true, "event_log": self.log.to_jsonl()}),
            "quote" => match parse_nonce(&req["nonce"]) {
                Err(e) => error("bad_request", e),
                Ok(n) => match self.vtpm.quote(&n) {
                    Ok(q) => {
                        json!({"ok": true, "quote": to_value(&q), "event_log": self.log.to_jsonl()})
                    }
                    Err(e) => error("tpm", format_args!("{:#}", anyhow_chain(&e))),
                },
            },
            "activate" => {
                match serde_json::from_value::<CredentialChallenge>(req["challenge"].clone()) {
                    Err(e) => error("bad_request", format_args!("bad \"challenge\": {e}")),
                    Ok(c) => match self.vtpm.activate_credential(&c) {
                        Ok(resp) => json!({"ok": true, "response": to_value(&resp)}),
                        Err(e) => error("tpm", format_args!("{:#}", anyhow_chain(&e))),
                    },
                }
            }
            _ => return None,
        };
        Some(r)
    }
}

/// Formats an error with its sources, one line.
fn anyhow_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonce_parsing() {
        let ok = "ab".repeat(32);
        assert_eq!(parse_nonce(&json!(ok)).unwrap().0, [0xab; 32]);
        assert!(parse_nonce(&json!("zz")).unwrap_err().contains("not hex"));
        assert!(
            parse_nonce(&json!("abcd"))
                .unwrap_err()
                .contains("32 bytes, got 2")
        );
        assert!(
            parse_nonce(&json!(5))
                .unwrap_err()
                .contains("must be a string")
        );
    }
}
