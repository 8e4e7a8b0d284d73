// SPDX-License-Identifier: Apache-2.0
//! Measured boot: what cell0-vmm hashes before the first vCPU runs, and which
//! PCR each hash goes into (DESIGN.md §5).
//!
//! This module only computes the events; [`crate::Vtpm::measure_boot`]
//! extends them into the vTPM.

use std::io::Read;
use std::path::Path;

use sha2::{Digest as _, Sha256};

use crate::config::{ConfigError, VmConfig, WorkloadSpec};
use crate::digest::Sha256Digest;
use crate::eventlog::{Event, EventLog, EventType};

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum MeasureError {
    /// The VM config cannot be encoded canonically.
    #[error("the VM config cannot be measured")]
    Config(#[from] ConfigError),
    /// Hashing a file failed.
    #[error("cannot hash {path}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// The cell0-vmm build that does the measuring (PCR 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmmIdentity {
    /// SHA-256 of the cell0-vmm executable, e.g. from [`hash_file`] on `/proc/self/exe`.
    pub binary: Sha256Digest,
    /// The version string, e.g. `env!("CARGO_PKG_VERSION")`.
    pub version: String,
}

impl VmmIdentity {
    /// Hashes the running executable (`/proc/self/exe`) and pairs it with `version`.
    pub fn of_current_exe(version: impl Into<String>) -> Result<Self, MeasureError> {
        Ok(VmmIdentity {
            binary: hash_file(Path::new("/proc/self/exe"))?,
            version: version.into(),
        })
    }
}

/// Everything cell0-vmm measures at boot.
#[derive(Debug, Clone, Copy)]
pub struct BootInputs<'a> {
    /// The VMM build (PCR 0).
    pub vmm: &'a VmmIdentity,
    /// The kernel image bytes as read from disk, before loading (PCR 4).
    pub kernel: &'a [u8],
    /// The full kernel command line the guest sees, including what the VMM
    /// appends (virtio_mmio.device=…), without the trailing NUL (PCR 8).
    pub cmdline: &'a [u8],
    /// The initrd bytes, if any (PCR 9).
    pub initrd: Option<&'a [u8]>,
    /// The VM configuration (PCR 11).
    pub config: &'a VmConfig,
    /// The agent workload (PCR 12).
    pub workload: &'a WorkloadSpec,
}

/// Hashes a file in 1 MiB chunks.
pub fn hash_file(path: &Path) -> Result<Sha256Digest, MeasureError> {
    let io = |source| MeasureError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(Sha256Digest(h.finalize().into()))
}

fn event(kind: EventType, digest: Sha256Digest, description: String) -> Event {
    Event {
        pcr: kind.pcr(),
        digest,
        kind,
        description,
    }
}

/// The events of a boot, in extend order: what [`crate::Vtpm::measure_boot`]
/// extends and what a verifier replays.
pub fn boot_events(inputs: &BootInputs<'_>) -> Result<EventLog, MeasureError> {
    let initrd = inputs.initrd.unwrap_or(&[]);
    let cmdline_text = String::from_utf8_lossy(inputs.cmdline);
    let events = vec![
        event(
            EventType::VmmBinary,
            inputs.vmm.binary,
            "cell0-vmm executable".to_string(),
        ),
        event(
            EventType::VmmVersion,
            Sha256Digest::of(inputs.vmm.version.as_bytes()),
            format!("cell0-vmm version {}", inputs.vmm.version),
        ),
        event(
            EventType::Kernel,
            Sha256Digest::of(inputs.kernel),
            format!("kernel image, {} bytes", inputs.kernel.len()),
        ),
        event(
            EventType::Cmdline,
            Sha256Digest::of(inputs.cmdline),
            format!("kernel cmdline {cmdline_text:?}"),
        ),
        event(
            EventType::Initrd,
            Sha256Digest::of(initrd),
            match inputs.initrd {
                Some(i) => format!("initrd, {} bytes", i.len()),
                None => "no initrd".to_string(),
            },
        ),
        event(
            EventType::VmConfig,
            inputs.config.digest()?,
            format!("VM config: {}", inputs.config.summary()),
        ),
        event(
            EventType::Workload,
            inputs.workload.digest(),
            format!(
                "workload of agent {:?}, {} args",
                inputs.workload.agent_id,
                inputs.workload.command.len()
            ),
        ),
    ];
    Ok(EventLog { events })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_follow_the_pcr_layout() {
        let vmm = VmmIdentity {
            binary: Sha256Digest::of(b"vmm"),
            version: "0.1.0".into(),
        };
        let config = VmConfig {
            vcpus: 1,
            memory_mib: 128,
            vsock_cid: Some(3),
            shm_mib: 0,
            devices: vec![],
        };
        let workload = WorkloadSpec::default();
        let inputs = BootInputs {
            vmm: &vmm,
            kernel: b"kernel",
            cmdline: b"console=ttyS0",
            initrd: None,
            config: &config,
            workload: &workload,
        };
        let log = boot_events(&inputs).unwrap_or_default();
        let layout: Vec<(u8, EventType)> = log.events.iter().map(|e| (e.pcr, e.kind)).collect();
        assert_eq!(
            layout,
            EventType::BOOT_ORDER
                .iter()
                .map(|t| (t.pcr(), *t))
                .collect::<Vec<_>>()
        );
        assert_eq!(log.events[2].digest, Sha256Digest::of(b"kernel"));
        assert_eq!(log.events[3].digest, Sha256Digest::of(b"console=ttyS0"));
        assert_eq!(log.events[4].digest, Sha256Digest::of(b""));
        assert_eq!(log.events[4].description, "no initrd");
        assert_eq!(log.events[1].digest, Sha256Digest::of(b"0.1.0"));
    }

    #[test]
    fn hash_file_matches_in_memory_hash() {
        let dir = tempfile::tempdir().ok();
        let Some(dir) = dir else { return };
        let p = dir.path().join("f");
        let data: Vec<u8> = (0..3_000_000u32).map(|i| i as u8).collect();
        std::fs::write(&p, &data).ok();
        assert_eq!(hash_file(&p).ok(), Some(Sha256Digest::of(&data)));
        assert!(matches!(
            hash_file(&dir.path().join("missing")),
            Err(MeasureError::Io { .. })
        ));
    }
}
