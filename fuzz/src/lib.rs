// SPDX-License-Identifier: Apache-2.0
//! Fuzz harnesses for every parser a guest, a client or an untrusted host can
//! reach (DESIGN.md §7, issue 9).
//!
//! Each target is a plain function from bytes. Three callers share it:
//!
//! - the coverage-guided targets in `fuzz/libfuzzer/` (cargo-fuzz; see
//!   docs/SECURITY.md for how to run them);
//! - the bounded property-test twins in `tests/twins.rs`;
//! - the replay of `fuzz/regressions/<target>/` (every crash input ever found)
//!   and `fuzz/corpus/<target>/` (seeds) in `tests/regressions.rs`.
//!
//! Both test files run in the normal `cargo test --workspace`.

pub mod attest;
pub mod boot;
pub mod control;
pub mod mmio;
pub mod rig;
pub mod sypas;
pub mod virtq;
pub mod vsock;

/// A target's entry point.
pub type Target = fn(&[u8]);

/// Every target, by the name its libfuzzer binary and corpus folders use.
pub const TARGETS: &[(&str, Target)] = &[
    ("mmio", mmio::run),
    ("virtq", virtq::run),
    ("vsock", vsock::run),
    ("sypas_frame", sypas::frame),
    ("sypas_message", sypas::message),
    ("shm_ref", sypas::shm_ref),
    ("boot", boot::run),
    ("attest_eventlog", attest::eventlog),
    ("attest_quote", attest::quote),
    ("vm_spec", control::vm_spec),
    ("token", control::token),
];

/// The target called `name`.
pub fn target(name: &str) -> Option<Target> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
}
