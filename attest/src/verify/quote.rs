// SPDX-License-Identifier: Apache-2.0
//! The quote checks, as one pure function from (trusted AK, expected nonce,
//! previous clock, quote, event log, manifest) to a verdict.

use sha2::{Digest as _, Sha256};
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::structures::{Attest, AttestInfo};
use tss_esapi::traits::UnMarshall;

use super::{ClockInfo, Failure, Verdict, crypto};
use crate::digest::Sha256Digest;
use crate::eventlog::{EventLog, EventType, MEASURED_PCRS, PcrValues};
use crate::formats::{Nonce, QuoteBundle};
use crate::manifest::Manifest;

/// What the verifier knows before looking at a quote.
pub(crate) struct Expectations<'a> {
    pub(crate) ak_key: &'a rsa::RsaPublicKey,
    pub(crate) ak_name: &'a [u8],
    pub(crate) nonce: &'a Nonce,
    pub(crate) previous_clock: Option<ClockInfo>,
}

/// The verdict, plus the quote's clock when its signature verified (so the
/// caller can remember it even when other checks failed). `events` checks
/// the event log's sequence and golden values: [`check_events`] for a VM's
/// boot, `crate::node::check_node_events` for a node's admission.
pub(crate) fn check(
    exp: &Expectations<'_>,
    quote: &QuoteBundle,
    log: &EventLog,
    events: &dyn Fn(&EventLog, &mut Vec<Failure>),
) -> (Verdict, Option<ClockInfo>) {
    let mut failures = Vec::new();

    // 1. The signature over the attest bytes, under the enrolled AK.
    let signature_ok = match crypto::check_signature(exp.ak_key, &quote.attest, &quote.signature) {
        Ok(()) => true,
        Err(reason) => {
            failures.push(Failure::BadSignature { reason });
            false
        }
    };
    if quote.ak_name != exp.ak_name {
        failures.push(Failure::WrongAk {
            expected: hex::encode(exp.ak_name),
            got: hex::encode(&quote.ak_name),
        });
    }

    // 2. Parse what was signed.
    let attest = match Attest::unmarshall(&quote.attest) {
        Ok(a) => a,
        Err(e) => {
            failures.push(Failure::MalformedQuote {
                reason: format!("TPMS_ATTEST does not parse: {e}"),
            });
            return (Verdict::Rejected { failures }, None);
        }
    };
    // qualifiedSigner is the AK's qualified name (it hashes in the EK's name);
    // the signature check above already binds the quote to the enrolled AK.
    let AttestInfo::Quote { info } = attest.attested() else {
        failures.push(Failure::MalformedQuote {
            reason: "the attestation is not a quote".to_string(),
        });
        return (Verdict::Rejected { failures }, None);
    };

    // 3. Freshness: the verifier's nonce is the qualifying data.
    if attest.extra_data().value() != exp.nonce.0.as_slice() {
        failures.push(Failure::NonceMismatch {
            expected: exp.nonce.to_string(),
            got: hex::encode(attest.extra_data().value()),
        });
    }

    // 4. Clock never goes backwards for this VM.
    let c = attest.clock_info();
    let clock = ClockInfo {
        clock: c.clock(),
        reset_count: c.reset_count(),
        restart_count: c.restart_count(),
    };
    if let Some(prev) = exp.previous_clock {
        if let Some(f) = clock.went_backwards_from(&prev) {
            failures.push(f);
        }
    }

    // 5. The PCR selection is exactly the measured SHA-256 PCRs.
    let mut selected: Vec<u8> = Vec::new();
    let mut other_bank = false;
    for s in info.pcr_selection().get_selections() {
        if s.hashing_algorithm() != HashingAlgorithm::Sha256 {
            other_bank = true;
        }
        selected.extend(
            s.selected()
                .iter()
                .map(|slot| u32::from(*slot).trailing_zeros() as u8),
        );
    }
    selected.sort_unstable();
    if other_bank || selected != MEASURED_PCRS {
        failures.push(Failure::WrongPcrSelection {
            expected: MEASURED_PCRS.to_vec(),
            got: selected,
        });
    }

    // 6. The PCR digest: the reported PCR values must be the signed ones; then
    //    event-log replay must reproduce each of them.
    let signed = info.pcr_digest().value();
    let replayed = log.replay();
    if composite(&quote.pcrs) != signed {
        failures.push(Failure::ReportedPcrsNotSigned {
            signed: hex::encode(signed),
            reported: hex::encode(composite(&quote.pcrs)),
        });
        if composite(&replayed) != signed {
            failures.push(Failure::ReplayDigestMismatch {
                signed: hex::encode(signed),
                replayed: hex::encode(composite(&replayed)),
            });
        }
    } else {
        for pcr in MEASURED_PCRS {
            let r = replayed.get(&pcr).copied().unwrap_or_default();
            let q = quote.pcrs.get(&pcr).copied().unwrap_or_default();
            if r != q {
                failures.push(Failure::PcrMismatch {
                    pcr,
                    replayed: r,
                    quoted: q,
                });
            }
        }
    }

    // 7. The events: the boot sequence of DESIGN.md §5 (or a node's
    //    binaries), each digest golden.
    events(log, &mut failures);

    let verdict = if failures.is_empty() {
        Verdict::Trusted {
            clock,
            pcrs: quote.pcrs.clone(),
        }
    } else {
        Verdict::Rejected { failures }
    };
    (verdict, signature_ok.then_some(clock))
}

/// The log must be exactly `order`: each event in its place and its PCR, each
/// digest one of `golden(kind)`. Shared by a VM's boot and a node's admission.
pub(crate) fn check_sequence(
    log: &EventLog,
    order: &[EventType],
    golden: impl Fn(EventType) -> Vec<Sha256Digest>,
    failures: &mut Vec<Failure>,
) {
    for i in 0..order.len().max(log.events.len()) {
        let expected = order.get(i).copied();
        let Some(e) = log.events.get(i) else {
            if let Some(expected) = expected {
                failures.push(Failure::MissingEvent { index: i, expected });
            }
            continue;
        };
        if expected != Some(e.kind) {
            failures.push(Failure::UnexpectedEvent {
                index: i,
                expected,
                got: e.kind,
                pcr: e.pcr,
            });
        }
        if e.pcr != e.kind.pcr() {
            failures.push(Failure::WrongEventPcr {
                index: i,
                event: e.kind,
                expected: e.kind.pcr(),
                got: e.pcr,
            });
        }
        let accepted = golden(e.kind);
        if accepted.is_empty() {
            failures.push(Failure::NoGoldenValue {
                index: i,
                event: e.kind,
            });
        } else if !accepted.contains(&e.digest) {
            failures.push(Failure::EventMismatch {
                index: i,
                pcr: e.pcr,
                event: e.kind,
                description: e.description.clone(),
                expected: accepted,
                got: e.digest,
            });
        }
    }
}

/// SHA-256 over the measured PCR values in selection order (TPM2_Quote's
/// pcrDigest). A missing PCR makes the digest differ.
fn composite(pcrs: &PcrValues) -> Vec<u8> {
    let mut h = Sha256::new();
    for p in MEASURED_PCRS {
        match pcrs.get(&p) {
            Some(v) => h.update(v.as_bytes()),
            None => return Vec::new(),
        }
    }
    h.finalize().to_vec()
}

/// The boot sequence of DESIGN.md §5, each digest a golden value of `manifest`.
pub(crate) fn check_events(log: &EventLog, manifest: &Manifest, failures: &mut Vec<Failure>) {
    check_sequence(
        log,
        &EventType::BOOT_ORDER,
        |k| manifest.golden(k),
        failures,
    );
    // PCR 0 pairs binary and version: both must come from one accepted build.
    let bin = log.events.iter().find(|e| e.kind == EventType::VmmBinary);
    let ver = log.events.iter().find(|e| e.kind == EventType::VmmVersion);
    if let (Some(b), Some(v)) = (bin, ver) {
        let pair_known = manifest.vmm.iter().any(|m| {
            m.binary_sha256 == b.digest && Sha256Digest::of(m.version.as_bytes()) == v.digest
        });
        let each_known = manifest.golden(EventType::VmmBinary).contains(&b.digest)
            && manifest.golden(EventType::VmmVersion).contains(&v.digest);
        if each_known && !pair_known {
            failures.push(Failure::VmmBuildMismatch {
                binary: b.digest,
                version: v.description.clone(),
            });
        }
    }
}
