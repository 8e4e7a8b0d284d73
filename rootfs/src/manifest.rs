// SPDX-License-Identifier: Apache-2.0
//! What a build writes next to the image:
//!
//! - `manifest.json`: the image part of attest's `cell0-manifest/1` (kernel,
//!   initrd and full cmdline digests). The verifier takes these as golden
//!   values (docs/ATTESTATION.md); it refuses unknown fields, so the file
//!   list does not go in it.
//! - `contents.json` (`cell0-image-contents/1`): every file of the initramfs
//!   with its SHA-256, the kernel's origin and the modules, and the digest of
//!   `manifest.json`. The initrd digest in the manifest covers every byte of
//!   every file; this list says which files those are.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::cpio::{Entry, Kind};

/// attest's manifest format.
pub const MANIFEST_FORMAT: &str = "cell0-manifest/1";
/// The contents list's format.
pub const CONTENTS_FORMAT: &str = "cell0-image-contents/1";

/// The image part of a `cell0-manifest/1`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageManifest {
    /// Always [`MANIFEST_FORMAT`].
    pub format: String,
    /// Image name.
    pub name: String,
    /// SHA-256 of the kernel image file.
    pub kernel_sha256: String,
    /// SHA-256 of the initrd file.
    pub initrd_sha256: String,
    /// SHA-256 of the full command line the guest sees.
    pub cmdline_sha256: String,
    /// That command line.
    pub cmdline: String,
}

impl ImageManifest {
    /// A manifest for these digests and command line.
    pub fn new(name: &str, kernel_sha256: String, initrd_sha256: String, cmdline: &str) -> Self {
        Self {
            format: MANIFEST_FORMAT.into(),
            name: name.into(),
            kernel_sha256,
            initrd_sha256,
            cmdline_sha256: hex::encode(Sha256::digest(cmdline.as_bytes())),
            cmdline: cmdline.into(),
        }
    }

    /// Pretty JSON with a final newline.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default() + "\n"
    }
}

/// The kernel, as recorded in `contents.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelRecord {
    /// File name in the image directory.
    pub file: String,
    /// SHA-256.
    pub sha256: String,
    /// Release.
    pub version: String,
    /// Package and version, or the path it came from.
    pub source: String,
}

/// The initrd, as recorded in `contents.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitrdRecord {
    /// File name in the image directory.
    pub file: String,
    /// SHA-256.
    pub sha256: String,
    /// Compression.
    pub compression: String,
}

/// One initramfs entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    /// Absolute path in the guest.
    pub path: String,
    /// `file`, `dir`, `symlink` or `char`.
    pub kind: String,
    /// Permission bits, octal.
    pub mode: String,
    /// Bytes (files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// SHA-256 (files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Link target (symlinks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

impl FileRecord {
    /// The record of an archive entry.
    pub fn of(e: &Entry) -> Self {
        let (kind, size, sha256, target) = match &e.kind {
            Kind::Dir => ("dir", None, None, None),
            Kind::File(d) => (
                "file",
                Some(d.len() as u64),
                Some(hex::encode(Sha256::digest(d))),
                None,
            ),
            Kind::Symlink(t) => ("symlink", None, None, Some(t.clone())),
            Kind::Char(a, b) => ("char", None, None, Some(format!("{a}:{b}"))),
        };
        Self {
            path: format!("/{}", e.path),
            kind: kind.into(),
            mode: format!("{:04o}", e.perm),
            size,
            sha256,
            target,
        }
    }
}

/// `contents.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Contents {
    /// Always [`CONTENTS_FORMAT`].
    pub format: String,
    /// Image name.
    pub name: String,
    /// SHA-256 of `manifest.json`.
    pub manifest_sha256: String,
    /// The kernel.
    pub kernel: KernelRecord,
    /// The initrd.
    pub initrd: InitrdRecord,
    /// What to pass to `cell0-vmm launch --cmdline`.
    pub cmdline: String,
    /// The command line the guest sees (with cell0-vmm's device entries).
    pub full_cmdline: String,
    /// Kernel modules /init loads, in order.
    pub modules: Vec<String>,
    /// Every entry of the initramfs, sorted by path.
    pub files: Vec<FileRecord>,
    /// Warnings from the build.
    pub warnings: Vec<String>,
}

impl Contents {
    /// Pretty JSON with a final newline.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default() + "\n"
    }
}
