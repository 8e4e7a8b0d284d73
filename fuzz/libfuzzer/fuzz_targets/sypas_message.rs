// SPDX-License-Identifier: Apache-2.0
//! libFuzzer entry for the `sypas_message` harness (`cell0_fuzz::sypas::message`); see docs/SECURITY.md.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| cell0_fuzz::sypas::message(data));
