// SPDX-License-Identifier: Apache-2.0
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
//! Writes the seed corpus under `fuzz/corpus/<target>/`:
//! `cargo test -p cell0-fuzz --test seeds -- --ignored`. The seeds are
//! reproducible; `tests/regressions.rs` replays them in every test run.

use std::path::Path;

use cell0_fuzz::boot::tiny_elf;
use cell0_proto::grpc;
use cell0_proto::msg::{Call, Reply, ShmRef};
use cell0_proto::prost::Message;

fn write(target: &str, name: &str, data: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), data).unwrap();
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

#[test]
#[ignore = "writes the seed corpus; run by hand"]
fn write_seed_corpus() {
    // Device targets: a selector byte per device, then a little structure.
    for (k, dev) in ["vsock", "blk", "blk-ro", "rng"].iter().enumerate() {
        let k = k as u8;
        write(
            "mmio",
            &format!("{dev}-init"),
            &cat(&[&[k, 1, 16], &[7; 32]]),
        );
        write(
            "mmio",
            &format!("{dev}-raw"),
            &[k, 0, 0, 0x70, 4, 1, 0, 0, 0],
        );
        let mut v = vec![k, 0, 0];
        v.extend((0u8..=255).cycle().take(512));
        write("virtq", &format!("{dev}-ramp"), &v);
        write(
            "virtq",
            &format!("{dev}-zeros"),
            &cat(&[&[k, 0, 1], &[0; 256]]),
        );
    }
    let mut v: Vec<u8> = (0u8..=255).collect();
    v.extend((0u8..=255).rev());
    write("vsock", "ramp", &v);
    write(
        "vsock",
        "connects",
        &[3, 1, 3, 0, 0, 0, 0, 0, 2, 0, 0, 4, 4, 4],
    );

    // SYPAS: a CALL frame with shm refs, the same frame truncated.
    let call = Call {
        service: "kv".into(),
        method: "get".into(),
        payload: cell0_proto::bytes::Bytes::from_static(b"key"),
        shm: vec![
            ShmRef {
                offset: 4096,
                length: 512,
            },
            ShmRef {
                offset: u64::MAX,
                length: 1,
            },
        ],
    };
    let call_bytes = call.encode_to_vec();
    let mut frame = vec![7u8];
    frame.extend(cell0_proto::MAGIC);
    frame.extend([
        cell0_proto::VERSION,
        3,
        0,
        0,
        1,
        0,
        0,
        0,
        9,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
    ]);
    frame.extend((call_bytes.len() as u32).to_le_bytes());
    frame.extend(&call_bytes);
    write("sypas_frame", "call", &frame);
    write("sypas_frame", "truncated", &frame[..20]);
    write("sypas_message", "call", &cat(&[&[3], &call_bytes]));
    write("shm_ref", "call", &cat(&[&[0], &call_bytes]));
    let reply = Reply {
        shm: vec![ShmRef {
            offset: 1 << 20,
            length: 1 << 20,
        }],
        ..Default::default()
    };
    write("shm_ref", "reply", &cat(&[&[0], &reply.encode_to_vec()]));
    write(
        "shm_ref",
        "raw",
        &[2, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 1],
    );

    // Boot: a loadable ELF with the SMP note, raw and as structured fields.
    let elf = tiny_elf(
        0x10_0000,
        &[(0x10_0000, vec![0xf4; 16], 0x1000)],
        Some((6, 0x10_0008u64.to_le_bytes().to_vec())),
    );
    write("boot", "elf-with-note", &cat(&[&[0], &elf]));
    write(
        "boot",
        "structured",
        &[1, 0, 0, 0x10, 0, 0, 0, 0, 0, 1, 0x10, 0, 0, 0, 0, 0, 0, 16],
    );
    let mut bz = vec![0u8; 0x400];
    bz[0x202..0x206].copy_from_slice(b"HdrS");
    bz[0x1f1] = 1;
    write("boot", "bzimage-header", &cat(&[&[0], &bz]));

    // Attestation: the captured quote, its event log, a manifest.
    let fx: serde_json::Value =
        serde_json::from_str(include_str!("../fixtures/quote.json")).unwrap();
    let log = fx["event_log"].as_str().unwrap();
    write("attest_eventlog", "log", log.as_bytes());
    let manifest = format!(
        r#"{{"format":"cell0-manifest/1","kernel_sha256":"{k}","cmdline_sha256":"{k}","vmm":[{{"version":"0.1.0","binary_sha256":"{k}"}}]}}"#,
        k = "ab".repeat(32)
    );
    write("attest_eventlog", "manifest", manifest.as_bytes());
    let quote = fx["quote"].to_string();
    write(
        "attest_quote",
        "bundle-json",
        &cat(&[&[0], quote.as_bytes()]),
    );
    write("attest_quote", "mutate", &[1, 0, 3, 4, 5, 6, 7, 8, 9]);
    let attest = cell0_fuzz::attest::fixture().quote.attest.clone();
    write("attest_quote", "raw-attest", &cat(&[&[2], &attest]));

    // Control plane: a valid VM spec, and the three token modes.
    let spec = grpc::VmSpec {
        name: "web-1".into(),
        vcpus: 2,
        memory_mib: 256,
        agent_id: "agent-1".into(),
        rights: vec![grpc::Right {
            service: "kv".into(),
            method: "get*".into(),
        }],
        labels: [("team".to_string(), "core".to_string())].into(),
        command: vec!["/bin/agent".into(), "--serve".into()],
        ..Default::default()
    };
    write("vm_spec", "valid", &spec.encode_to_vec());
    write("token", "raw", &[0, 1, 2, 3]);
    write("token", "mutate", &[1, 0, 5, 1, 7]);
    write("token", "attenuate", &[2, 1, 1, 0, 0, 1, 1, 0, 1, 0]);
}
