// SPDX-License-Identifier: Apache-2.0
//! cell0-rootfs: builds agent images (DESIGN.md §2): a kernel, an initramfs
//! (cpio newc, gzip) with the guest agent as `/init`, busybox and the user's
//! files, and a manifest of content hashes for attestation.
//!
//! - [`cpio`]: the newc writer.
//! - [`kernel`]: Debian kernel packages, config checks, module load order,
//!   and the minimal kernel build.
//! - [`image`]: the build itself.
//! - [`manifest`]: `manifest.json` (attest's format) and `contents.json`.

pub mod cpio;
pub mod image;
pub mod kernel;
pub mod manifest;
pub mod minimal;
