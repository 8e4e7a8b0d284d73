// SPDX-License-Identifier: Apache-2.0
//! Shared fixtures for the tests that run a real swtpm.

#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use cell0_attest::{
    BootInputs, DeviceSpec, EventLog, LocalCa, Manifest, Sha256Digest, Verifier, VmConfig,
    VmmIdentity, Vtpm, VtpmOptions, WorkloadSpec,
};

/// Whether swtpm, swtpm_setup and swtpm_localca are installed; prints why a
/// test skips when they are not.
pub fn swtpm_available(test: &str) -> bool {
    let missing: Vec<&str> = ["swtpm", "swtpm_setup", "swtpm_localca"]
        .into_iter()
        .filter(|p| !in_path(p))
        .collect();
    if missing.is_empty() {
        return true;
    }
    eprintln!(
        "skipping {test}: {} not installed (apt-get install swtpm swtpm-tools)",
        missing.join(", ")
    );
    false
}

fn in_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
        .unwrap_or(false)
}

/// One CA directory for all tests of a test binary run (swtpm_localca locks it).
pub fn ca_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cell0-attest-test-ca")
}

pub fn options(run_dir: &Path) -> VtpmOptions {
    VtpmOptions::new(run_dir, ca_dir())
}

/// The test CA's certificates; the CA is created by the first vTPM
/// manufactured with it, so one is started if needed.
pub fn ca_bundle() -> String {
    let ca = LocalCa::open(&ca_dir(), Path::new("swtpm_localca")).unwrap();
    if let Ok(b) = ca.bundle_pem() {
        return b;
    }
    let run = tempfile::tempdir().unwrap();
    drop(Vtpm::start(&options(run.path())).unwrap());
    ca.bundle_pem().unwrap()
}

/// Deterministic pseudo-random bytes.
pub fn bytes(seed: u8, len: usize) -> Vec<u8> {
    let mut x = u64::from(seed).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Everything a boot measures, owned.
#[derive(Clone)]
pub struct Boot {
    pub vmm: VmmIdentity,
    pub kernel: Vec<u8>,
    pub cmdline: Vec<u8>,
    pub initrd: Option<Vec<u8>>,
    pub config: VmConfig,
    pub workload: WorkloadSpec,
}

impl Boot {
    /// The honest reference boot.
    pub fn honest() -> Self {
        Boot {
            vmm: VmmIdentity {
                binary: Sha256Digest::of(b"cell0-vmm test build"),
                version: "0.1.0".into(),
            },
            kernel: bytes(1, 64 * 1024),
            cmdline: b"console=ttyS0 reboot=k panic=1 virtio_mmio.device=4K@0xd0000000:5".to_vec(),
            initrd: Some(bytes(2, 32 * 1024)),
            config: VmConfig {
                vcpus: 2,
                memory_mib: 256,
                vsock_cid: Some(3),
                shm_mib: 16,
                devices: vec![
                    DeviceSpec::new("serial", Some(0x3f8), Some(4)),
                    DeviceSpec::new("virtio-vsock", Some(0xd000_0000), Some(5)),
                ],
            },
            workload: WorkloadSpec {
                agent_id: "agent-1".into(),
                image_manifest: Some(Sha256Digest::of(b"image manifest")),
                command: vec!["/bin/agent".into(), "--serve".into()],
            },
        }
    }

    pub fn inputs(&self) -> BootInputs<'_> {
        BootInputs {
            vmm: &self.vmm,
            kernel: &self.kernel,
            cmdline: &self.cmdline,
            initrd: self.initrd.as_deref(),
            config: &self.config,
            workload: &self.workload,
        }
    }

    pub fn manifest(&self) -> Manifest {
        Manifest::for_boot(Some("test image".into()), &self.inputs()).unwrap()
    }
}

/// A started vTPM whose AK is enrolled with `verifier` under `vm`, after
/// measuring `boot`.
pub struct Attested {
    pub vtpm: Vtpm,
    pub log: EventLog,
    pub run: tempfile::TempDir,
}

pub fn start_enrolled(verifier: &mut Verifier, vm: &str, boot: &Boot) -> Attested {
    let run = tempfile::tempdir().unwrap();
    let vtpm = Vtpm::start(&options(run.path())).unwrap();
    let challenge = verifier.begin_enrollment(vm, vtpm.ak_bundle()).unwrap();
    let response = vtpm.activate_credential(&challenge).unwrap();
    verifier.finish_enrollment(vm, &response).unwrap();
    let log = vtpm.measure_boot(&boot.inputs()).unwrap();
    Attested { vtpm, log, run }
}

/// Pids of live (non-zombie) processes whose command line mentions `needle`.
pub fn live_processes_mentioning(needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if !String::from_utf8_lossy(&cmdline).contains(needle) {
            continue;
        }
        if is_alive(pid) {
            out.push(pid);
        }
    }
    out
}

/// True while `pid` exists and is not a zombie.
pub fn is_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesized command name.
        Ok(stat) => stat
            .rsplit_once(") ")
            .map(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X'))
            .unwrap_or(false),
        Err(_) => false,
    }
}
