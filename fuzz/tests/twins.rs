// SPDX-License-Identifier: Apache-2.0
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
//! The bounded property-test twin of every fuzz target: the same harness,
//! fed by proptest instead of libFuzzer, so the normal test suite exercises
//! each property on a few hundred inputs per run.

use cell0_fuzz::{attest, boot, control, mmio, sypas, virtq, vsock};
use proptest::collection::vec;
use proptest::prelude::*;

fn cases(n: u32) -> ProptestConfig {
    ProptestConfig {
        cases: n,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Bytes that start with a selector byte the harness maps to a mode or device.
fn with_selector(sel: std::ops::Range<u8>, max: usize) -> impl Strategy<Value = Vec<u8>> {
    (sel, vec(any::<u8>(), 0..max)).prop_map(|(s, mut v)| {
        v.insert(0, s);
        v
    })
}

proptest! {
    #![proptest_config(cases(96))]

    #[test]
    fn mmio_register_sequences(data in with_selector(0..4, 2048)) {
        mmio::run(&data);
    }

    #[test]
    fn virtq_descriptor_chains(data in with_selector(0..4, 2048)) {
        virtq::run(&data);
    }

    #[test]
    fn boot_images(data in vec(any::<u8>(), 0..2048)) {
        boot::run(&data);
    }

    #[test]
    fn boot_structured_elfs(data in with_selector(1..2, 1024)) {
        boot::run(&data);
    }
}

proptest! {
    #![proptest_config(cases(24))]

    #[test]
    fn vsock_packets_and_connections(data in vec(any::<u8>(), 0..4096)) {
        vsock::run(&data);
    }
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn sypas_frames(data in vec(any::<u8>(), 0..512)) {
        sypas::frame(&data);
    }

    #[test]
    fn sypas_frames_with_a_valid_header(
        chunk in any::<u8>(),
        kind in 1u8..13,
        payload in vec(any::<u8>(), 0..64),
        tail in vec(any::<u8>(), 0..32),
    ) {
        let mut data = vec![chunk];
        data.extend(cell0_proto::MAGIC);
        data.extend([cell0_proto::VERSION, kind, 0, 0, 1, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0]);
        data.extend((payload.len() as u32).to_le_bytes());
        data.extend(&payload);
        data.extend(&tail);
        sypas::frame(&data);
    }

    #[test]
    fn sypas_messages(data in vec(any::<u8>(), 0..512)) {
        sypas::message(&data);
    }

    #[test]
    fn shm_refs(data in vec(any::<u8>(), 0..256)) {
        sypas::shm_ref(&data);
    }

    #[test]
    fn shm_refs_near_the_edges(offset in prop_oneof![Just(0u64), Just(u64::MAX), any::<u64>()],
                               length in prop_oneof![Just(0u64), Just(u64::MAX), any::<u64>()],
                               window in any::<u64>()) {
        sypas::check_ref(&cell0_proto::msg::ShmRef { offset, length }, window);
    }

    #[test]
    fn attest_event_logs(text in "(\\{\"pcr\":[0-9]{1,2},\"digest\":\"[0-9a-f]{64}\",\"type\":\"(kernel|cmdline|initrd|vm-config|workload|vmm-binary|vmm-version)\",\"description\":\"[a-z ]{0,8}\"\\}\n){0,8}") {
        attest::eventlog(text.as_bytes());
    }

    #[test]
    fn attest_arbitrary_text(data in vec(any::<u8>(), 0..512)) {
        attest::eventlog(&data);
    }
}

proptest! {
    #![proptest_config(cases(128))]

    #[test]
    fn attest_mutated_quotes_are_never_trusted(data in with_selector(1..2, 512)) {
        attest::quote(&data);
    }

    #[test]
    fn attest_raw_quotes(data in with_selector(0..3, 512)) {
        attest::quote(&data);
    }
}

#[test]
fn the_quote_fixture_itself_is_trusted() {
    // Without this, "never trusted" above would hold for a broken oracle too.
    let f = attest::fixture();
    assert!(attest::verify(&f.quote, &f.log));
    let mut tampered = f.quote.clone();
    tampered.attest[10] ^= 1;
    assert!(!attest::verify(&tampered, &f.log));
}

proptest! {
    #![proptest_config(cases(64))]

    #[test]
    fn vm_specs(data in vec(any::<u8>(), 0..512)) {
        control::vm_spec(&data);
    }

    #[test]
    fn tokens_never_widen(data in with_selector(0..3, 256)) {
        control::token(&data);
    }
}

#[test]
fn the_token_oracle_is_live() {
    control::token_oracle_is_live();
}
