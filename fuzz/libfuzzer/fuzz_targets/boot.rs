// SPDX-License-Identifier: Apache-2.0
//! libFuzzer entry for the `boot` harness (`cell0_fuzz::boot::run`); see docs/SECURITY.md.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| cell0_fuzz::boot::run(data));
