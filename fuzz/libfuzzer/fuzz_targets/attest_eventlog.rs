// SPDX-License-Identifier: Apache-2.0
//! libFuzzer entry for the `attest_eventlog` harness (`cell0_fuzz::attest::eventlog`); see docs/SECURITY.md.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| cell0_fuzz::attest::eventlog(data));
