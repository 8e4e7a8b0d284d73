// SPDX-License-Identifier: Apache-2.0
//! The verifier's side of measured boot, for tests and the demo: golden values
//! from a VM's spec, AK enrollment (make/activate credential) and quotes over
//! the VM's API socket.

use std::path::Path;

use anyhow::{Context, bail};
use cell0_attest::{
    AkBundle, DeviceSpec, EventLog, LocalCa, Manifest, Nonce, QuoteBundle, Sha256Digest, Verifier,
    VmConfig, VmmBuild, WorkloadSpec,
};
use serde_json::json;

use crate::api_request;

/// What a control plane knows about a VM it launched: enough to compute the
/// golden values of its boot.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// Kernel image bytes.
    pub kernel: Vec<u8>,
    /// The full cmdline the guest sees (what cell0-vmm appends included).
    pub cmdline: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Vsock CID, with the device's MMIO base and IRQ.
    pub vsock: Option<(u64, u64, u32)>,
    /// Agent id.
    pub agent_id: String,
    /// Workload command.
    pub command: Vec<String>,
}

impl VmSpec {
    /// The golden-value manifest for this spec booted by the `cell0-vmm` at `vmm_binary`.
    pub fn manifest(&self, vmm_binary: &Path) -> anyhow::Result<Manifest> {
        let mut devices = vec![
            DeviceSpec::new("serial", Some(0x3f8), Some(4)),
            DeviceSpec::new("i8042", Some(0x60), None),
        ];
        if let Some((_, base, irq)) = self.vsock {
            devices.push(DeviceSpec::new("virtio-vsock", Some(base), Some(irq)));
        }
        let config = VmConfig {
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            vsock_cid: self.vsock.map(|v| v.0),
            shm_mib: 0,
            devices,
        };
        let workload = WorkloadSpec {
            agent_id: self.agent_id.clone(),
            image_manifest: None,
            command: self.command.clone(),
        };
        Ok(Manifest {
            format: cell0_attest::manifest::MANIFEST_FORMAT.to_string(),
            name: None,
            kernel_sha256: Sha256Digest::of(&self.kernel),
            initrd_sha256: None,
            cmdline_sha256: Sha256Digest::of(self.cmdline.as_bytes()),
            cmdline: Some(self.cmdline.clone()),
            vm_config_sha256: Some(config.digest()?),
            workload_sha256: Some(workload.digest()),
            vmm: vec![VmmBuild {
                version: env!("CARGO_PKG_VERSION").into(),
                binary_sha256: Sha256Digest::of(
                    &std::fs::read(vmm_binary).context("cannot read the cell0-vmm binary")?,
                ),
            }],
        })
    }
}

/// A verifier trusting the EK certificates signed by the local CA in `ca_dir`.
pub fn verifier(ca_dir: &Path) -> anyhow::Result<Verifier> {
    let bundle = LocalCa::open(ca_dir, Path::new("swtpm_localca"))?.bundle_pem()?;
    Ok(Verifier::new(&bundle)?)
}

fn ok(r: serde_json::Value, what: &str) -> anyhow::Result<serde_json::Value> {
    if r["ok"] != true {
        bail!("{what} failed: {}", r["error"]);
    }
    Ok(r)
}

/// Enrolls the VM's AK: its EK certificate must chain to the CA, and its vTPM
/// must recover the secret sealed to the EK for that AK's name.
pub fn enroll(v: &mut Verifier, id: &str, api: &Path) -> anyhow::Result<()> {
    let r = ok(api_request(api, &json!({"op": "ak"})), "ak")?;
    let ak: AkBundle = serde_json::from_value(r["ak"].clone())?;
    let challenge = v.begin_enrollment(id, &ak)?;
    let r = ok(
        api_request(api, &json!({"op": "activate", "challenge": challenge})),
        "activate",
    )?;
    v.finish_enrollment(id, &serde_json::from_value(r["response"].clone())?)?;
    Ok(())
}

/// Asks the VM for a quote over `nonce`; returns it with the event log.
pub fn quote(api: &Path, nonce: &Nonce) -> anyhow::Result<(QuoteBundle, EventLog)> {
    let r = ok(
        api_request(api, &json!({"op": "quote", "nonce": hex::encode(nonce.0)})),
        "quote",
    )?;
    let q: QuoteBundle = serde_json::from_value(r["quote"].clone())?;
    let log = EventLog::from_jsonl(r["event_log"].as_str().context("no event_log")?)?;
    Ok((q, log))
}
