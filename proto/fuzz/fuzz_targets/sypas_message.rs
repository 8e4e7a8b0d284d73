// SPDX-License-Identifier: Apache-2.0
//! Fuzzes message decoding for every kind, re-encoding round trips, and the
//! shm ref bounds check that the router applies to CALL and REPLY refs.
#![no_main]

use cell0_proto::bytes::Bytes;
use cell0_proto::msg::{Call, ShmRef};
use cell0_proto::{Body, Kind};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&k, rest)) = data.split_first() else {
        return;
    };
    let Some(kind) = Kind::from_u8(k % 13) else {
        return;
    };
    let payload = Bytes::copy_from_slice(rest);
    if let Ok(body) = Body::decode(kind, payload.clone()) {
        assert_eq!(body.kind(), kind);
        let again = Body::decode(kind, Bytes::from(body.encode_to_vec())).expect("re-decodes");
        assert_eq!(again, body);
    }
    if let Ok(call) = <Call as cell0_proto::prost::Message>::decode(payload) {
        let window = rest.len() as u64 * 4096;
        for r in &call.shm {
            check_ref(r, window);
            check_ref(r, u64::MAX);
            check_ref(r, 0);
        }
    }
});

fn check_ref(r: &ShmRef, window: u64) {
    match r.range_in(window) {
        Some(range) => {
            assert_eq!(range.start, r.offset);
            assert_eq!(range.end - range.start, r.length);
            assert!(range.end <= window);
        }
        None => assert!(r.offset.checked_add(r.length).is_none_or(|end| end > window)),
    }
}
