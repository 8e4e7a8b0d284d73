// SPDX-License-Identifier: Apache-2.0
//! Targets `attest_eventlog` and `attest_quote`: what a verifier reads from a
//! host it does not trust.
//!
//! `attest_eventlog` parses event logs (JSON lines) and manifests: whatever
//! parses round-trips and replays. `attest_quote` verifies quotes against a
//! real enrolled AK (a fixture captured from swtpm): mutated quote bundles,
//! raw TPMS_ATTEST bytes, signatures, PCR values and event logs. The property:
//! the verdict is "trusted" only for the signed attest bytes and signature of
//! the fixture with an event log that measures exactly what it measured.

use std::sync::OnceLock;

use arbitrary::Unstructured;
use cell0_attest::verify::VerifierState;
use cell0_attest::{
    EventLog, EventType, Manifest, Nonce, QuoteBundle, Sha256Digest, Verifier, VmmBuild,
};
use serde_json::Value;

/// Event logs and manifests: parse, round-trip, replay.
pub fn eventlog(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(log) = EventLog::from_jsonl(text) {
        let again = EventLog::from_jsonl(&log.to_jsonl()).expect("a parsed log re-parses");
        assert_eq!(again, log);
        assert_eq!(again.replay(), log.replay());
    }
    if let Ok(m) = Manifest::from_json(text) {
        let again = Manifest::from_json(&m.to_json()).expect("a parsed manifest re-parses");
        assert_eq!(again, m);
        for k in EventType::BOOT_ORDER {
            let _ = m.golden(k);
        }
    }
}

/// The captured quote: an enrolled AK, the nonce it signed, its event log.
pub struct Fixture {
    state: VerifierState,
    nonce: Nonce,
    /// The quote as swtpm produced it.
    pub quote: QuoteBundle,
    /// The boot's event log.
    pub log: EventLog,
    manifest: Manifest,
}

/// The fixture (fuzz/fixtures/quote.json), parsed once.
pub fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let v: Value = serde_json::from_str(include_str!("../fixtures/quote.json"))
            .expect("the fixture is JSON");
        let log = EventLog::from_jsonl(v["event_log"].as_str().expect("an event log"))
            .expect("the fixture's log parses");
        let state: VerifierState = serde_json::from_value(serde_json::json!({
            "vms": {"vm": {"ak": {
                "ak_public": v["ak"]["ak_public"],
                "ak_name": v["ak"]["ak_name"],
                "ek_cert_sha256": Sha256Digest::of(b"").to_hex(),
            }}}
        }))
        .expect("an enrolled verifier state");
        let nonce_bytes = hex_decode(v["nonce"].as_str().expect("a nonce"));
        let nonce = Nonce(nonce_bytes.try_into().expect("a 32-byte nonce"));
        let quote: QuoteBundle =
            serde_json::from_value(v["quote"].clone()).expect("the fixture's quote parses");
        let manifest = manifest_for(&log);
        Fixture {
            state,
            nonce,
            quote,
            log,
            manifest,
        }
    })
}

fn hex_decode(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .filter_map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok())
        .collect()
}

/// The manifest whose golden values are exactly the log's measurements.
fn manifest_for(log: &EventLog) -> Manifest {
    let d = |k: EventType| {
        log.events
            .iter()
            .find(|e| e.kind == k)
            .map(|e| e.digest)
            .unwrap_or_else(|| Sha256Digest::of(b""))
    };
    Manifest {
        format: cell0_attest::manifest::MANIFEST_FORMAT.to_string(),
        name: None,
        kernel_sha256: d(EventType::Kernel),
        initrd_sha256: Some(d(EventType::Initrd)),
        cmdline_sha256: d(EventType::Cmdline),
        cmdline: None,
        vm_config_sha256: Some(d(EventType::VmConfig)),
        workload_sha256: Some(d(EventType::Workload)),
        vmm: vec![VmmBuild {
            version: env!("CARGO_PKG_VERSION").to_string(),
            binary_sha256: d(EventType::VmmBinary),
        }],
    }
}

/// Verifies `quote` and `log` as the fixture's VM; returns whether trusted.
pub fn verify(quote: &QuoteBundle, log: &EventLog) -> bool {
    let f = fixture();
    let mut v = Verifier::for_enrolled(f.state.clone());
    v.verify_with_nonce("vm", &f.nonce, quote, log, &f.manifest)
        .is_trusted()
}

fn mutate_bytes(u: &mut Unstructured<'_>, b: &mut Vec<u8>) -> arbitrary::Result<()> {
    for _ in 0..u.int_in_range(1u8..=4)? {
        match u.int_in_range(0u8..=3)? {
            0 if !b.is_empty() => {
                let i = u.int_in_range(0..=b.len() - 1)?;
                b[i] = u.arbitrary()?;
            }
            1 => {
                let i = u.int_in_range(0..=b.len())?;
                b.truncate(i);
            }
            2 => {
                let i = u.int_in_range(0..=b.len())?;
                let n = u.int_in_range(0usize..=16)?;
                let ins = u.bytes(n.min(u.len()))?.to_vec();
                b.splice(i..i, ins);
            }
            _ => {
                let n = u.int_in_range(0usize..=256)?;
                *b = u.bytes(n.min(u.len()))?.to_vec();
            }
        }
    }
    Ok(())
}

fn mutated(u: &mut Unstructured<'_>) -> arbitrary::Result<(QuoteBundle, EventLog)> {
    let f = fixture();
    let mut q = f.quote.clone();
    let mut log = f.log.clone();
    for _ in 0..u.int_in_range(1u8..=3)? {
        match u.int_in_range(0u8..=5)? {
            0 => mutate_bytes(u, &mut q.attest)?,
            1 => mutate_bytes(u, &mut q.signature)?,
            2 => mutate_bytes(u, &mut q.ak_name)?,
            3 => {
                let pcr = *u.choose(&[0u8, 4, 8, 9, 11, 12, 23])?;
                let mut b = [0u8; 32];
                u.fill_buffer(&mut b)?;
                if u.ratio(1, 4)? {
                    q.pcrs.remove(&pcr);
                } else {
                    q.pcrs.insert(pcr, Sha256Digest(b));
                }
            }
            4 if !log.events.is_empty() => {
                let i = u.int_in_range(0..=log.events.len() - 1)?;
                match u.int_in_range(0u8..=3)? {
                    0 => {
                        log.events.remove(i);
                    }
                    1 => log.events[i].pcr = u.arbitrary()?,
                    2 => u.fill_buffer(&mut log.events[i].digest.0)?,
                    _ => {
                        let e = log.events[i].clone();
                        log.events.push(e);
                    }
                }
            }
            _ => {
                // Descriptions are not measured: changing one must not matter.
                if let Some(e) = log.events.first_mut() {
                    e.description = String::from_utf8_lossy(u.bytes(8.min(u.len()))?).into();
                }
            }
        }
    }
    Ok((q, log))
}

/// Quotes: JSON bundles, mutated fixtures and raw attest bytes.
pub fn quote(data: &[u8]) {
    let f = fixture();
    let mut u = Unstructured::new(data);
    let Ok(mode) = u.arbitrary::<u8>() else {
        return;
    };
    let (q, log) = match mode % 3 {
        0 => {
            let Ok(q) = serde_json::from_slice::<QuoteBundle>(u.take_rest()) else {
                return;
            };
            let _ = cell0_attest::verify::quote_clock(&q);
            (q, f.log.clone())
        }
        1 => match mutated(&mut u) {
            Ok(v) => v,
            Err(_) => return,
        },
        _ => {
            let mut q = f.quote.clone();
            q.attest = u.take_rest().to_vec();
            let _ = cell0_attest::verify::quote_clock(&q);
            (q, f.log.clone())
        }
    };
    if verify(&q, &log) {
        assert_eq!(
            q.attest, f.quote.attest,
            "trusted a quote the AK never signed"
        );
        assert_eq!(q.signature, f.quote.signature, "trusted a forged signature");
        let measured = |l: &EventLog| -> Vec<(u8, Sha256Digest, EventType)> {
            l.events.iter().map(|e| (e.pcr, e.digest, e.kind)).collect()
        };
        assert_eq!(
            measured(&log),
            measured(&f.log),
            "trusted an event log that measures something else"
        );
    }
}
