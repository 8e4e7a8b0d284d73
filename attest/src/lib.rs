// SPDX-License-Identifier: Apache-2.0
//! cell0 attestation: one swtpm vTPM per VM, measured boot into its PCRs,
//! quotes, and a verifier that checks them against golden values.
//!
//! - [`Vtpm`]: start/stop swtpm for a VM, [`Vtpm::measure_boot`],
//!   [`Vtpm::quote`], [`Vtpm::activate_credential`].
//! - [`Verifier`]: enroll a VM's AK (EK certificate → make/activate credential),
//!   issue nonces, verify quotes into a typed [`Verdict`].
//! - Formats: [`EventLog`] (JSON Lines), [`Manifest`], [`QuoteBundle`],
//!   [`AkBundle`], canonical [`VmConfig`] and [`WorkloadSpec`] encodings.
//!
//! docs/ATTESTATION.md describes the threat model, PCR layout and formats.

pub mod config;
pub mod digest;
pub mod eventlog;
pub mod formats;
pub mod manifest;
pub mod measure;
pub mod node;
pub mod verify;
pub mod vtpm;

pub use config::{DeviceSpec, VmConfig, WorkloadSpec};
pub use digest::Sha256Digest;
pub use eventlog::{Event, EventLog, EventType, MEASURED_PCRS, PcrValues};
pub use formats::{ActivationResponse, AkBundle, CredentialChallenge, Nonce, QuoteBundle, Wire};
pub use manifest::{Manifest, VmmBuild};
pub use measure::{BootInputs, VmmIdentity, boot_events, hash_file};
pub use node::{NodeGolden, node_events};
pub use verify::{Failure, TrustedAk, Verdict, Verifier, VerifyError};
pub use vtpm::{LocalCa, StartTimings, Vtpm, VtpmError, VtpmOptions};
