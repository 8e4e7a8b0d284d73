// SPDX-License-Identifier: Apache-2.0
//! Measured boot, quotes and verdicts against a real swtpm: an honest boot
//! verifies, and each tampering is caught with a verdict that names it.

#![allow(clippy::unwrap_used)]

mod common;

use cell0_attest::verify::{VerifyError, quote_clock};
use cell0_attest::{
    EventLog, EventType, Failure, Nonce, QuoteBundle, Sha256Digest, Verdict, Verifier, Wire,
};
use common::{Boot, ca_bundle, start_enrolled, swtpm_available};

/// Boots `boot` into an enrolled vTPM and verifies a fresh quote against the
/// honest manifest.
fn verdict_for(boot: &Boot) -> Verdict {
    let mut v = Verifier::new(&ca_bundle()).unwrap();
    let a = start_enrolled(&mut v, "vm", boot);
    let n = v.issue_nonce("vm");
    let q = a.vtpm.quote(&n).unwrap();
    v.verify("vm", &q, &a.log, &Boot::honest().manifest())
}

fn only_event_mismatch(v: &Verdict, event: EventType, pcr: u8) {
    let failures = v.failures();
    assert_eq!(failures.len(), 1, "{v}");
    match &failures[0] {
        Failure::EventMismatch {
            event: e,
            pcr: p,
            expected,
            got,
            ..
        } => {
            assert_eq!((*e, *p), (event, pcr), "{v}");
            assert!(!expected.contains(got));
        }
        other => panic!("expected an event mismatch for {event}, got {other}"),
    }
}

#[test]
fn honest_boot_verifies_and_quotes_stay_fresh() {
    if !swtpm_available("honest_boot_verifies_and_quotes_stay_fresh") {
        return;
    }
    let boot = Boot::honest();
    let mut v = Verifier::new(&ca_bundle()).unwrap();
    let a = start_enrolled(&mut v, "vm", &boot);
    let manifest = boot.manifest();

    // The PCRs hold exactly what the event log replays to.
    assert_eq!(a.vtpm.read_pcrs().unwrap(), a.log.replay());
    // The event log on disk is the one returned.
    assert_eq!(
        EventLog::read_file(&a.vtpm.event_log_path()).unwrap(),
        a.log
    );

    // Quotes travel as JSON.
    let mut previous = None;
    for _ in 0..3 {
        let n = v.issue_nonce("vm");
        let q = QuoteBundle::from_json(&a.vtpm.quote(&n).unwrap().to_json()).unwrap();
        let verdict = v.verify("vm", &q, &a.log, &manifest);
        let Verdict::Trusted { clock, pcrs } = &verdict else {
            panic!("honest boot rejected: {verdict}");
        };
        assert_eq!(pcrs, &a.log.replay());
        if let Some(p) = previous {
            assert!(clock.went_backwards_from(&p).is_none());
        }
        previous = Some(*clock);
    }
    // A nonce is good for one verification only.
    let verdict = v.verify(
        "vm",
        &a.vtpm.quote(&Nonce::random()).unwrap(),
        &a.log,
        &manifest,
    );
    assert!(matches!(
        verdict.failures(),
        [Failure::NoNonceIssued { .. }]
    ));
    // Measuring a second boot into the same vTPM is refused.
    assert!(matches!(
        a.vtpm.measure_boot(&boot.inputs()),
        Err(cell0_attest::VtpmError::AlreadyMeasured)
    ));
}

#[test]
fn changed_kernel_byte_is_caught_in_pcr_4() {
    if !swtpm_available("changed_kernel_byte_is_caught_in_pcr_4") {
        return;
    }
    let mut boot = Boot::honest();
    boot.kernel[1000] ^= 1;
    only_event_mismatch(&verdict_for(&boot), EventType::Kernel, 4);
}

#[test]
fn changed_initrd_is_caught_in_pcr_9() {
    if !swtpm_available("changed_initrd_is_caught_in_pcr_9") {
        return;
    }
    let mut boot = Boot::honest();
    if let Some(i) = boot.initrd.as_mut() {
        i.push(0);
    }
    only_event_mismatch(&verdict_for(&boot), EventType::Initrd, 9);
    // Dropping the initrd altogether is caught too.
    let mut boot = Boot::honest();
    boot.initrd = None;
    only_event_mismatch(&verdict_for(&boot), EventType::Initrd, 9);
}

#[test]
fn changed_cmdline_is_caught_in_pcr_8() {
    if !swtpm_available("changed_cmdline_is_caught_in_pcr_8") {
        return;
    }
    let mut boot = Boot::honest();
    boot.cmdline.extend_from_slice(b" init=/bin/sh");
    let v = verdict_for(&boot);
    only_event_mismatch(&v, EventType::Cmdline, 8);
    assert!(v.failures()[0].to_string().contains("init=/bin/sh"), "{v}");
}

#[test]
fn changed_memory_size_is_caught_in_pcr_11() {
    if !swtpm_available("changed_memory_size_is_caught_in_pcr_11") {
        return;
    }
    let mut boot = Boot::honest();
    boot.config.memory_mib = 512;
    let v = verdict_for(&boot);
    only_event_mismatch(&v, EventType::VmConfig, 11);
    assert!(v.failures()[0].to_string().contains("512 MiB"), "{v}");
}

#[test]
fn changed_workload_is_caught_in_pcr_12() {
    if !swtpm_available("changed_workload_is_caught_in_pcr_12") {
        return;
    }
    let mut boot = Boot::honest();
    boot.workload.command.push("--debug".into());
    only_event_mismatch(&verdict_for(&boot), EventType::Workload, 12);
}

#[test]
fn replayed_old_nonce_is_rejected() {
    if !swtpm_available("replayed_old_nonce_is_rejected") {
        return;
    }
    let boot = Boot::honest();
    let mut v = Verifier::new(&ca_bundle()).unwrap();
    let a = start_enrolled(&mut v, "vm", &boot);
    let n1 = v.issue_nonce("vm");
    let q1 = a.vtpm.quote(&n1).unwrap();
    assert!(v.verify("vm", &q1, &a.log, &boot.manifest()).is_trusted());
    // The attacker replays the old quote against the next challenge.
    let n2 = v.issue_nonce("vm");
    let verdict = v.verify("vm", &q1, &a.log, &boot.manifest());
    assert_eq!(
        verdict.failures(),
        &[Failure::NonceMismatch {
            expected: n2.to_string(),
            got: n1.to_string(),
        }],
        "{verdict}"
    );
}

#[test]
fn quote_from_another_vms_ak_is_rejected() {
    if !swtpm_available("quote_from_another_vms_ak_is_rejected") {
        return;
    }
    let boot = Boot::honest();
    let mut v = Verifier::new(&ca_bundle()).unwrap();
    let a = start_enrolled(&mut v, "vm-a", &boot);
    let b = start_enrolled(&mut v, "vm-b", &boot);
    let n = v.issue_nonce("vm-a");
    // VM B answers VM A's challenge with its own (honest) vTPM.
    let q = b.vtpm.quote(&n).unwrap();
    let verdict = v.verify("vm-a", &q, &b.log, &boot.manifest());
    let f = verdict.failures();
    assert!(
        f.iter().any(|x| matches!(x, Failure::BadSignature { .. })),
        "{verdict}"
    );
    assert!(
        f.iter()
            .any(|x| matches!(x, Failure::WrongAk { expected, got }
            if *expected == hex::encode(&a.vtpm.ak_bundle().ak_name)
            && *got == hex::encode(&b.vtpm.ak_bundle().ak_name))),
        "{verdict}"
    );
    // Relabelling the quote with VM A's AK name does not help.
    let mut forged = q.clone();
    forged.ak_name = a.vtpm.ak_bundle().ak_name.clone();
    let n = v.issue_nonce("vm-a");
    let mut forged_n = b.vtpm.quote(&n).unwrap();
    forged_n.ak_name = forged.ak_name;
    let verdict = v.verify("vm-a", &forged_n, &b.log, &boot.manifest());
    assert!(
        matches!(verdict.failures(), [Failure::BadSignature { .. }]),
        "{verdict}"
    );
}

#[test]
fn truncated_event_log_is_rejected() {
    if !swtpm_available("truncated_event_log_is_rejected") {
        return;
    }
    let boot = Boot::honest();
    let mut v = Verifier::new(&ca_bundle()).unwrap();
    let a = start_enrolled(&mut v, "vm", &boot);
    let mut log = a.log.clone();
    let dropped = log.events.pop().unwrap();
    assert_eq!(dropped.kind, EventType::Workload);
    let n = v.issue_nonce("vm");
    let verdict = v.verify("vm", &a.vtpm.quote(&n).unwrap(), &log, &boot.manifest());
    let f = verdict.failures();
    assert!(
        f.contains(&Failure::MissingEvent {
            index: 6,
            expected: EventType::Workload
        }),
        "{verdict}"
    );
    assert!(
        f.iter()
            .any(|x| matches!(x, Failure::PcrMismatch { pcr: 12, replayed, .. } if *replayed == Sha256Digest::ZERO)),
        "{verdict}"
    );
    assert_eq!(f.len(), 2, "{verdict}");
}

#[test]
fn reordered_event_log_is_rejected() {
    if !swtpm_available("reordered_event_log_is_rejected") {
        return;
    }
    let boot = Boot::honest();
    let mut v = Verifier::new(&ca_bundle()).unwrap();
    let a = start_enrolled(&mut v, "vm", &boot);
    let quote = |v: &mut Verifier| {
        let n = v.issue_nonce("vm");
        a.vtpm.quote(&n).unwrap()
    };

    // Swapping the two PCR 0 events changes the replayed PCR 0.
    let mut log = a.log.clone();
    log.events.swap(0, 1);
    let q = quote(&mut v);
    let verdict = v.verify("vm", &q, &log, &boot.manifest());
    let f = verdict.failures();
    assert!(
        f.iter()
            .any(|x| matches!(x, Failure::PcrMismatch { pcr: 0, .. })),
        "{verdict}"
    );
    assert!(
        f.contains(&Failure::UnexpectedEvent {
            index: 0,
            expected: Some(EventType::VmmBinary),
            got: EventType::VmmVersion,
            pcr: 0,
        }),
        "{verdict}"
    );

    // Swapping events of different PCRs replays to the same PCRs, but the
    // boot sequence is wrong.
    let mut log = a.log.clone();
    log.events.swap(2, 3);
    let q = quote(&mut v);
    let verdict = v.verify("vm", &q, &log, &boot.manifest());
    assert_eq!(
        verdict.failures(),
        &[
            Failure::UnexpectedEvent {
                index: 2,
                expected: Some(EventType::Kernel),
                got: EventType::Cmdline,
                pcr: 8,
            },
            Failure::UnexpectedEvent {
                index: 3,
                expected: Some(EventType::Cmdline),
                got: EventType::Kernel,
                pcr: 4,
            },
        ],
        "{verdict}"
    );
}

#[test]
fn event_log_that_lies_about_the_kernel_is_rejected() {
    if !swtpm_available("event_log_that_lies_about_the_kernel_is_rejected") {
        return;
    }
    // An evil kernel boots, then the log is edited to show the golden digest.
    let honest = Boot::honest();
    let mut evil = Boot::honest();
    evil.kernel[0] ^= 0xff;
    let mut v = Verifier::new(&ca_bundle()).unwrap();
    let a = start_enrolled(&mut v, "vm", &evil);
    let mut log = a.log.clone();
    log.events[2].digest = honest.manifest().kernel_sha256;
    let n = v.issue_nonce("vm");
    let verdict = v.verify("vm", &a.vtpm.quote(&n).unwrap(), &log, &honest.manifest());
    assert!(
        matches!(verdict.failures(), [Failure::PcrMismatch { pcr: 4, .. }]),
        "{verdict}"
    );
}

#[test]
fn swapped_manifest_is_rejected() {
    if !swtpm_available("swapped_manifest_is_rejected") {
        return;
    }
    let boot = Boot::honest();
    let mut v = Verifier::new(&ca_bundle()).unwrap();
    let a = start_enrolled(&mut v, "vm", &boot);
    // The manifest of another image.
    let mut other = Boot::honest();
    other.kernel = common::bytes(9, 4096);
    other.initrd = Some(common::bytes(10, 4096));
    other.cmdline = b"console=ttyS0 quiet".to_vec();
    let n = v.issue_nonce("vm");
    let verdict = v.verify("vm", &a.vtpm.quote(&n).unwrap(), &a.log, &other.manifest());
    let mut named: Vec<(EventType, u8)> = verdict
        .failures()
        .iter()
        .map(|f| match f {
            Failure::EventMismatch { event, pcr, .. } => (*event, *pcr),
            other => panic!("unexpected failure {other}"),
        })
        .collect();
    named.sort();
    assert_eq!(
        named,
        vec![
            (EventType::Kernel, 4),
            (EventType::Cmdline, 8),
            (EventType::Initrd, 9)
        ]
    );
    // A manifest without the per-VM golden values cannot vouch for them.
    let mut partial = boot.manifest();
    partial.vm_config_sha256 = None;
    let n = v.issue_nonce("vm");
    let verdict = v.verify("vm", &a.vtpm.quote(&n).unwrap(), &a.log, &partial);
    assert_eq!(
        verdict.failures(),
        &[Failure::NoGoldenValue {
            index: 5,
            event: EventType::VmConfig
        }]
    );
}

#[test]
fn clock_going_backwards_is_rejected() {
    if !swtpm_available("clock_going_backwards_is_rejected") {
        return;
    }
    let boot = Boot::honest();
    let mut v = Verifier::new(&ca_bundle()).unwrap();
    let a = start_enrolled(&mut v, "vm", &boot);
    let n1 = Nonce::random();
    let q1 = a.vtpm.quote(&n1).unwrap();
    let c1 = quote_clock(&q1).unwrap();
    // Quote again until the TPM clock (milliseconds) has moved on.
    let mut later = None;
    for _ in 0..400 {
        std::thread::sleep(std::time::Duration::from_millis(5));
        let n2 = Nonce::random();
        let q2 = a.vtpm.quote(&n2).unwrap();
        if quote_clock(&q2).unwrap().clock > c1.clock {
            later = Some((n2, q2));
            break;
        }
    }
    let (n2, q2) = later.expect("the TPM clock did not advance in 2 s");
    // The newer quote first, then the older one.
    assert!(
        v.verify_with_nonce("vm", &n2, &q2, &a.log, &boot.manifest())
            .is_trusted()
    );
    let verdict = v.verify_with_nonce("vm", &n1, &q1, &a.log, &boot.manifest());
    assert!(
        matches!(verdict.failures(), [Failure::ClockWentBackwards { field, previous, got }]
            if field == "clock" && previous > got),
        "{verdict}"
    );
}

#[test]
fn ak_cannot_be_enrolled_against_another_tpms_ek() {
    if !swtpm_available("ak_cannot_be_enrolled_against_another_tpms_ek") {
        return;
    }
    let mut v = Verifier::new(&ca_bundle()).unwrap();
    let ra = tempfile::tempdir().unwrap();
    let rb = tempfile::tempdir().unwrap();
    let a = cell0_attest::Vtpm::start(&common::options(ra.path())).unwrap();
    let b = cell0_attest::Vtpm::start(&common::options(rb.path())).unwrap();
    // A's AK presented with B's certified EK.
    let mut bundle = a.ak_bundle().clone();
    bundle.ek_cert = b.ak_bundle().ek_cert.clone();
    let challenge = v.begin_enrollment("vm", &bundle).unwrap();
    // A holds the AK but not B's EK; B holds the EK but not the AK.
    assert!(a.activate_credential(&challenge).is_err());
    assert!(b.activate_credential(&challenge).is_err());
    // A response with a guessed secret is refused, and the AK stays untrusted.
    let guess = cell0_attest::ActivationResponse {
        format: cell0_attest::formats::RESPONSE_FORMAT.into(),
        ak_name: bundle.ak_name.clone(),
        secret: vec![0; 32],
    };
    assert!(matches!(
        v.finish_enrollment("vm", &guess),
        Err(VerifyError::ActivationFailed { .. })
    ));
    assert!(
        v.state()
            .vms
            .get("vm")
            .and_then(|s| s.ak.as_ref())
            .is_none()
    );

    // A bundle whose name does not match its public area is refused.
    let mut bundle = a.ak_bundle().clone();
    bundle.ak_name = b.ak_bundle().ak_name.clone();
    assert!(matches!(
        v.begin_enrollment("vm", &bundle),
        Err(VerifyError::AkNameMismatch { .. })
    ));
    // An EK certificate whose signature does not verify is refused.
    let mut bundle = a.ak_bundle().clone();
    let last = bundle.ek_cert.len() - 1;
    bundle.ek_cert[last] ^= 1;
    assert!(matches!(
        v.begin_enrollment("vm", &bundle),
        Err(VerifyError::EkCert { .. })
    ));
    // A key that is not restricted (objectAttributes bit 16) is not an AK.
    let mut bundle = a.ak_bundle().clone();
    bundle.ak_public[5] ^= 0x01;
    assert!(matches!(
        v.begin_enrollment("vm", &bundle),
        Err(VerifyError::BadAk { .. })
    ));
}

#[test]
fn ek_certificate_from_an_untrusted_ca_is_refused() {
    if !swtpm_available("ek_certificate_from_an_untrusted_ca_is_refused") {
        return;
    }
    let mut v = Verifier::new(&ca_bundle()).unwrap();
    let other_ca = tempfile::tempdir().unwrap();
    let run = tempfile::tempdir().unwrap();
    let vtpm =
        cell0_attest::Vtpm::start(&cell0_attest::VtpmOptions::new(run.path(), other_ca.path()))
            .unwrap();
    let err = v.begin_enrollment("vm", vtpm.ak_bundle()).unwrap_err();
    assert!(
        matches!(&err, VerifyError::EkCert { reason } if reason.contains("not signed by a trusted CA")),
        "{err}"
    );
}

#[test]
fn no_mutation_of_a_real_quote_verifies() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};

    if !swtpm_available("no_mutation_of_a_real_quote_verifies") {
        return;
    }
    let boot = Boot::honest();
    let mut v = Verifier::new(&ca_bundle()).unwrap();
    let a = start_enrolled(&mut v, "vm", &boot);
    let manifest = boot.manifest();
    let nonce = Nonce::random();
    let quote = a.vtpm.quote(&nonce).unwrap();
    assert!(
        v.clone()
            .verify_with_nonce("vm", &nonce, &quote, &a.log, &manifest)
            .is_trusted()
    );

    // Which part to corrupt, where, and how.
    let strategy = (0usize..4, any::<prop::sample::Index>(), 1u8..=255);
    let mut runner = TestRunner::new(Config::with_cases(256));
    runner
        .run(&strategy, |(part, at, xor)| {
            let mut q = quote.clone();
            let mut log = a.log.clone();
            match part {
                0 => {
                    let i = at.index(q.attest.len());
                    q.attest[i] ^= xor;
                }
                1 => {
                    let i = at.index(q.signature.len());
                    q.signature[i] ^= xor;
                }
                2 => {
                    let e = at.index(log.events.len());
                    log.events[e].digest.0[at.index(32)] ^= xor;
                }
                _ => {
                    let pcr = cell0_attest::MEASURED_PCRS[at.index(6)];
                    if let Some(d) = q.pcrs.get_mut(&pcr) {
                        d.0[0] ^= xor;
                    }
                }
            }
            let verdict = v
                .clone()
                .verify_with_nonce("vm", &nonce, &q, &log, &manifest);
            prop_assert!(!verdict.is_trusted(), "a corrupted quote verified");
            prop_assert!(!verdict.failures().is_empty());
            Ok(())
        })
        .unwrap();
}
