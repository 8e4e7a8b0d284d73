// SPDX-License-Identifier: Apache-2.0
//! libFuzzer entry for the `token` harness (`cell0_fuzz::control::token`); see docs/SECURITY.md.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| cell0_fuzz::control::token(data));
