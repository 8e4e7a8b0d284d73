// SPDX-License-Identifier: Apache-2.0
//! libFuzzer entry for the `shm_ref` harness (`cell0_fuzz::sypas::shm_ref`); see docs/SECURITY.md.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| cell0_fuzz::sypas::shm_ref(data));
