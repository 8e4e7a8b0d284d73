// SPDX-License-Identifier: Apache-2.0
//! Canonical encodings of the measured VM configuration (PCR 11) and agent
//! workload spec (PCR 12).
//!
//! Both encodings are versioned UTF-8 text, one `key value` item per line, LF
//! line ends, fixed item order. The same value always encodes to the same bytes,
//! so the same configuration always gives the same digest; docs/ATTESTATION.md
//! specifies the format byte for byte. Changing it requires a new version line.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::digest::Sha256Digest;

/// First line of a canonical VM config.
pub const VM_CONFIG_VERSION: &str = "cell0-vm-config v1";
/// First line of a canonical workload spec.
pub const WORKLOAD_VERSION: &str = "cell0-workload v1";

/// Errors of this module.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A device kind or option name uses a character outside `[a-z0-9_-]`.
    #[error("invalid {what} {value:?}: use 1 to 64 characters of a-z, 0-9, '_' and '-'")]
    BadIdentifier {
        /// Which field.
        what: &'static str,
        /// The rejected value.
        value: String,
    },
    /// Two devices encode to the same line.
    #[error("device {line:?} is listed twice")]
    DuplicateDevice {
        /// The duplicated device line.
        line: String,
    },
}

/// One guest-visible device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceSpec {
    /// Device kind, e.g. `serial`, `i8042`, `virtio-vsock`, `virtio-blk`, `shm`.
    pub kind: String,
    /// Guest-physical MMIO base (virtio-mmio devices) or I/O port base.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<u64>,
    /// Guest interrupt line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub irq: Option<u32>,
    /// Guest-visible options (e.g. `read_only`, `size_mib`). Host paths do not
    /// belong here: they differ between hosts and say nothing about the guest.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub options: BTreeMap<String, String>,
}

impl DeviceSpec {
    /// A device with a kind, base and IRQ and no options.
    pub fn new(kind: impl Into<String>, base: Option<u64>, irq: Option<u32>) -> Self {
        DeviceSpec {
            kind: kind.into(),
            base,
            irq,
            options: BTreeMap::new(),
        }
    }

    /// Adds an option.
    pub fn with_option(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.options.insert(key.into(), value.into());
        self
    }

    fn encode_line(&self) -> Result<String, ConfigError> {
        check_identifier("device kind", &self.kind)?;
        let mut line = format!("device {}", self.kind);
        match self.base {
            Some(b) => write!(line, " base=0x{b:x}"),
            None => write!(line, " base=none"),
        }
        .ok();
        match self.irq {
            Some(i) => write!(line, " irq={i}"),
            None => write!(line, " irq=none"),
        }
        .ok();
        for (k, v) in &self.options {
            check_identifier("device option", k)?;
            write!(line, " {k}={}", json_string(v)).ok();
        }
        Ok(line)
    }
}

/// The measured VM configuration: everything about the machine that the guest
/// can observe and that a verifier may want to pin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// The guest's vsock context ID, if it has a vsock device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_cid: Option<u64>,
    /// Size of the shared-memory window in MiB (0 when there is none).
    #[serde(default)]
    pub shm_mib: u64,
    /// Devices; their order does not matter (the encoding sorts them).
    #[serde(default)]
    pub devices: Vec<DeviceSpec>,
}

impl VmConfig {
    /// The canonical encoding (see the module docs and docs/ATTESTATION.md).
    pub fn canonical_bytes(&self) -> Result<Vec<u8>, ConfigError> {
        let mut lines = self
            .devices
            .iter()
            .map(DeviceSpec::encode_line)
            .collect::<Result<Vec<_>, _>>()?;
        lines.sort();
        if let Some(w) = lines.windows(2).find(|w| w[0] == w[1]) {
            return Err(ConfigError::DuplicateDevice { line: w[0].clone() });
        }
        let mut out = String::new();
        out.push_str(VM_CONFIG_VERSION);
        out.push('\n');
        writeln!(out, "vcpus {}", self.vcpus).ok();
        writeln!(out, "memory_mib {}", self.memory_mib).ok();
        match self.vsock_cid {
            Some(c) => writeln!(out, "vsock_cid {c}"),
            None => writeln!(out, "vsock_cid none"),
        }
        .ok();
        writeln!(out, "shm_mib {}", self.shm_mib).ok();
        for l in lines {
            out.push_str(&l);
            out.push('\n');
        }
        Ok(out.into_bytes())
    }

    /// SHA-256 of the canonical encoding: the PCR 11 measurement.
    pub fn digest(&self) -> Result<Sha256Digest, ConfigError> {
        Ok(Sha256Digest::of(&self.canonical_bytes()?))
    }

    /// A one-line summary for event-log descriptions.
    pub fn summary(&self) -> String {
        let cid = self
            .vsock_cid
            .map_or_else(|| "no vsock".to_string(), |c| format!("vsock CID {c}"));
        format!(
            "{} vCPUs, {} MiB memory, {cid}, {} MiB shm, {} devices",
            self.vcpus,
            self.memory_mib,
            self.shm_mib,
            self.devices.len()
        )
    }
}

/// The agent workload a VM runs (PCR 12).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct WorkloadSpec {
    /// The agent's identity as the control plane knows it.
    pub agent_id: String,
    /// Digest of the image manifest that rootfs/ wrote, if the VM boots one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_manifest: Option<Sha256Digest>,
    /// The command the guest agent runs, argv style.
    #[serde(default)]
    pub command: Vec<String>,
}

impl WorkloadSpec {
    /// The canonical encoding (see docs/ATTESTATION.md).
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let mut out = String::new();
        out.push_str(WORKLOAD_VERSION);
        out.push('\n');
        writeln!(out, "agent_id {}", json_string(&self.agent_id)).ok();
        match &self.image_manifest {
            Some(d) => writeln!(out, "image_manifest {d}"),
            None => writeln!(out, "image_manifest none"),
        }
        .ok();
        writeln!(out, "argc {}", self.command.len()).ok();
        for a in &self.command {
            writeln!(out, "arg {}", json_string(a)).ok();
        }
        out.into_bytes()
    }

    /// SHA-256 of the canonical encoding: the PCR 12 measurement.
    pub fn digest(&self) -> Sha256Digest {
        Sha256Digest::of(&self.canonical_bytes())
    }
}

/// A JSON string literal as serde_json writes it: `"` and `\` escaped, control
/// characters as `\n`, `\t`, `\r`, `\b`, `\f` or `\u00xx`, everything else
/// verbatim UTF-8.
fn json_string(s: &str) -> String {
    // Serializing a &str cannot fail.
    serde_json::to_string(s).unwrap_or_default()
}

fn check_identifier(what: &'static str, v: &str) -> Result<(), ConfigError> {
    let ok = !v.is_empty()
        && v.len() <= 64
        && v.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(ConfigError::BadIdentifier {
            what,
            value: v.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VmConfig {
        VmConfig {
            vcpus: 2,
            memory_mib: 256,
            vsock_cid: Some(3),
            shm_mib: 16,
            devices: vec![
                DeviceSpec::new("virtio-vsock", Some(0xd000_0000), Some(5)),
                DeviceSpec::new("serial", Some(0x3f8), Some(4)),
                DeviceSpec::new("virtio-blk", Some(0xd000_1000), Some(6))
                    .with_option("read_only", "true"),
            ],
        }
    }

    #[test]
    fn canonical_vm_config_text_is_exact() {
        let text = String::from_utf8(sample().canonical_bytes().unwrap_or_default());
        assert_eq!(
            text.as_deref().unwrap_or_default(),
            "cell0-vm-config v1\n\
             vcpus 2\n\
             memory_mib 256\n\
             vsock_cid 3\n\
             shm_mib 16\n\
             device serial base=0x3f8 irq=4\n\
             device virtio-blk base=0xd0001000 irq=6 read_only=\"true\"\n\
             device virtio-vsock base=0xd0000000 irq=5\n"
        );
    }

    #[test]
    fn canonical_vm_config_digest_is_fixed() {
        // Pinned: if this changes, every golden manifest breaks. Bump
        // VM_CONFIG_VERSION instead of editing this value.
        assert_eq!(
            sample().digest().map(|d| d.to_hex()).unwrap_or_default(),
            "27e6dc807458ca8c96dfe5800c1a306caf5a667fdce5588059a91506dff8117b"
        );
    }

    #[test]
    fn device_order_does_not_change_digest_but_memory_does() {
        let a = sample();
        let mut b = sample();
        b.devices.reverse();
        assert_eq!(a.digest(), b.digest());
        let mut c = sample();
        c.memory_mib = 512;
        assert_ne!(a.digest(), c.digest());
        let mut d = sample();
        d.vsock_cid = None;
        assert_ne!(a.digest(), d.digest());
    }

    proptest::proptest! {
        #[test]
        fn device_order_never_matters_and_every_field_counts(
            vcpus in 1u32..64,
            memory_mib in 1u64..65536,
            cid in proptest::option::of(3u64..1000),
            shm_mib in 0u64..1024,
            n in 0usize..6,
            rot in 0usize..6,
            value in "\\PC{0,20}",
        ) {
            let devices: Vec<DeviceSpec> = (0..n)
                .map(|i| {
                    DeviceSpec::new("virtio-blk", Some(0xd000_0000 + 0x1000 * i as u64), Some(5 + i as u32))
                        .with_option("serial", value.clone())
                })
                .collect();
            let a = VmConfig { vcpus, memory_mib, vsock_cid: cid, shm_mib, devices: devices.clone() };
            let mut b = a.clone();
            b.devices.rotate_left(rot.min(n));
            proptest::prop_assert_eq!(a.digest(), b.digest());
            let mut c = a.clone();
            c.memory_mib += 1;
            proptest::prop_assert_ne!(a.digest(), c.digest());
            let mut d = a.clone();
            d.vcpus += 1;
            proptest::prop_assert_ne!(a.digest(), d.digest());
            let mut e = a.clone();
            e.shm_mib += 1;
            proptest::prop_assert_ne!(a.digest(), e.digest());
            // Every encoding has exactly one line per item.
            let text = String::from_utf8(a.canonical_bytes().unwrap_or_default()).unwrap_or_default();
            proptest::prop_assert_eq!(text.lines().count(), 5 + n);
        }
    }

    #[test]
    fn bad_identifiers_and_duplicates_are_rejected() {
        let mut c = sample();
        c.devices.push(DeviceSpec::new("Bad Kind", None, None));
        assert!(matches!(
            c.canonical_bytes(),
            Err(ConfigError::BadIdentifier { .. })
        ));
        let mut c = sample();
        c.devices
            .push(DeviceSpec::new("serial", Some(0x3f8), Some(4)));
        assert!(matches!(
            c.canonical_bytes(),
            Err(ConfigError::DuplicateDevice { .. })
        ));
        let mut c = sample();
        c.devices[0] = c.devices[0].clone().with_option("a=b", "x");
        assert!(c.canonical_bytes().is_err());
    }

    #[test]
    fn option_values_cannot_inject_lines() {
        let mut a = sample();
        a.devices[0] = a.devices[0].clone().with_option("note", "x\ndevice evil");
        let text = String::from_utf8(a.canonical_bytes().unwrap_or_default()).unwrap_or_default();
        assert!(text.contains("note=\"x\\ndevice evil\""));
        assert_eq!(text.lines().count(), 8);
    }

    #[test]
    fn canonical_workload_text_and_digest_are_fixed() {
        let w = WorkloadSpec {
            agent_id: "agent-7".into(),
            image_manifest: Some(Sha256Digest::of(b"manifest")),
            command: vec!["/bin/agent".into(), "--say".into(), "hi \"there\"".into()],
        };
        let text = String::from_utf8(w.canonical_bytes()).unwrap_or_default();
        assert_eq!(
            text,
            format!(
                "cell0-workload v1\nagent_id \"agent-7\"\nimage_manifest {}\nargc 3\n\
                 arg \"/bin/agent\"\narg \"--say\"\narg \"hi \\\"there\\\"\"\n",
                Sha256Digest::of(b"manifest")
            )
        );
        assert_eq!(
            w.digest().to_hex(),
            "9504c0d584cebdedf07b029c7780b816f38c154d949fca4ff571cc411b1d69c2"
        );
        let mut w2 = w.clone();
        w2.command = vec!["/bin/agent --say".into(), "hi \"there\"".into()];
        assert_ne!(w.digest(), w2.digest());
    }
}
