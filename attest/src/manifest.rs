// SPDX-License-Identifier: Apache-2.0
//! The golden-value manifest a verifier compares event digests with.
//!
//! rootfs/ writes the image part (kernel, initrd, cmdline); whoever creates the
//! VM (the control plane) adds the per-VM part (VM config, workload) and the
//! cell0-vmm builds it accepts. The JSON format is in docs/ATTESTATION.md.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::digest::Sha256Digest;
use crate::eventlog::EventType;
use crate::measure::{BootInputs, MeasureError};

/// The value of the `format` field.
pub const MANIFEST_FORMAT: &str = "cell0-manifest/1";

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The JSON does not parse as a manifest.
    #[error("the manifest is not valid")]
    Parse(#[from] serde_json::Error),
    /// The `format` field names another format.
    #[error("unsupported manifest format {0:?} (expected {MANIFEST_FORMAT:?})")]
    Format(String),
    /// The informational cmdline does not hash to `cmdline_sha256`.
    #[error("the manifest's cmdline does not hash to its cmdline_sha256")]
    CmdlineDigest,
    /// Reading the file failed.
    #[error("cannot read manifest {path}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Computing a digest for the manifest failed.
    #[error("cannot compute the golden values")]
    Measure(#[from] MeasureError),
}

/// One accepted cell0-vmm build.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmmBuild {
    /// The version string it reports.
    pub version: String,
    /// SHA-256 of its executable.
    pub binary_sha256: Sha256Digest,
}

/// Golden values for every measured event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always [`MANIFEST_FORMAT`].
    pub format: String,
    /// A name for people (image name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// SHA-256 of the kernel image file.
    pub kernel_sha256: Sha256Digest,
    /// SHA-256 of the initrd file; absent means the VM boots without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_sha256: Option<Sha256Digest>,
    /// SHA-256 of the full kernel command line the guest sees.
    pub cmdline_sha256: Sha256Digest,
    /// That command line, for people; checked against `cmdline_sha256` on load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    /// SHA-256 of the canonical VM config (per VM; added by the control plane).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_config_sha256: Option<Sha256Digest>,
    /// SHA-256 of the canonical workload spec (per VM; added by the control plane).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_sha256: Option<Sha256Digest>,
    /// The cell0-vmm builds accepted.
    #[serde(default)]
    pub vmm: Vec<VmmBuild>,
}

impl Manifest {
    /// The manifest that exactly matches a boot of `inputs`.
    pub fn for_boot(name: Option<String>, inputs: &BootInputs<'_>) -> Result<Self, ManifestError> {
        Ok(Manifest {
            format: MANIFEST_FORMAT.to_string(),
            name,
            kernel_sha256: Sha256Digest::of(inputs.kernel),
            initrd_sha256: inputs.initrd.map(Sha256Digest::of),
            cmdline_sha256: Sha256Digest::of(inputs.cmdline),
            cmdline: std::str::from_utf8(inputs.cmdline).ok().map(str::to_string),
            vm_config_sha256: Some(inputs.config.digest().map_err(MeasureError::from)?),
            workload_sha256: Some(inputs.workload.digest()),
            vmm: vec![VmmBuild {
                version: inputs.vmm.version.clone(),
                binary_sha256: inputs.vmm.binary,
            }],
        })
    }

    /// Parses and checks a manifest.
    pub fn from_json(text: &str) -> Result<Self, ManifestError> {
        let m: Manifest = serde_json::from_str(text)?;
        if m.format != MANIFEST_FORMAT {
            return Err(ManifestError::Format(m.format));
        }
        if let Some(c) = &m.cmdline {
            if Sha256Digest::of(c.as_bytes()) != m.cmdline_sha256 {
                return Err(ManifestError::CmdlineDigest);
            }
        }
        Ok(m)
    }

    /// Reads and checks a manifest file.
    pub fn read_file(path: &Path) -> Result<Self, ManifestError> {
        let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&text)
    }

    /// Pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// The accepted digests for an event type; empty when the manifest has no
    /// golden value for it.
    pub fn golden(&self, kind: EventType) -> Vec<Sha256Digest> {
        match kind {
            EventType::VmmBinary => self.vmm.iter().map(|b| b.binary_sha256).collect(),
            EventType::VmmVersion => self
                .vmm
                .iter()
                .map(|b| Sha256Digest::of(b.version.as_bytes()))
                .collect(),
            EventType::Kernel => vec![self.kernel_sha256],
            EventType::Cmdline => vec![self.cmdline_sha256],
            EventType::Initrd => vec![self.initrd_sha256.unwrap_or_else(|| Sha256Digest::of(b""))],
            EventType::VmConfig => self.vm_config_sha256.into_iter().collect(),
            EventType::Workload => self.workload_sha256.into_iter().collect(),
            // A node's binaries are checked against a NodeGolden, never a VM manifest.
            EventType::NodeDaemon | EventType::NodeVmm => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal() -> String {
        format!(
            r#"{{"format":"cell0-manifest/1","kernel_sha256":"{k}","cmdline_sha256":"{c}","cmdline":"console=ttyS0"}}"#,
            k = Sha256Digest::of(b"k"),
            c = Sha256Digest::of(b"console=ttyS0")
        )
    }

    #[test]
    fn minimal_image_manifest_parses_and_defaults() {
        let m = Manifest::from_json(&minimal());
        let Ok(m) = m else {
            panic!("parse failed: {m:?}")
        };
        assert_eq!(m.golden(EventType::Initrd), vec![Sha256Digest::of(b"")]);
        assert!(m.golden(EventType::VmConfig).is_empty());
        assert!(m.golden(EventType::VmmBinary).is_empty());
        assert_eq!(m.golden(EventType::Kernel), vec![Sha256Digest::of(b"k")]);
    }

    #[test]
    fn wrong_format_unknown_fields_and_bad_cmdline_are_rejected() {
        let bad = minimal().replace("cell0-manifest/1", "cell0-manifest/9");
        assert!(matches!(
            Manifest::from_json(&bad),
            Err(ManifestError::Format(_))
        ));
        let bad = minimal().replace("\"cmdline\":", "\"kernel\":\"x\",\"cmdline\":");
        assert!(matches!(
            Manifest::from_json(&bad),
            Err(ManifestError::Parse(_))
        ));
        let bad = minimal().replace("console=ttyS0\"}", "console=ttyS1\"}");
        assert!(matches!(
            Manifest::from_json(&bad),
            Err(ManifestError::CmdlineDigest)
        ));
    }
}
