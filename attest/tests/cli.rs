// SPDX-License-Identifier: Apache-2.0
//! The `cell0-attest` command line end to end: enroll, nonce, verify (trusted,
//! tampered, wrong nonce, malformed input) and manifest generation.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::{Command, Output};

use cell0_attest::{CredentialChallenge, Verdict, Vtpm, Wire};
use common::{Boot, ca_bundle, options, swtpm_available};

fn cli(args: &[&str], state: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cell0-attest"))
        .args(args)
        .env("CELL0_ATTEST_STATE", state)
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn cli_enrolls_and_verifies() {
    if !swtpm_available("cli_enrolls_and_verifies") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name);
    let s = |name: &str| p(name).display().to_string();
    let state = p("state.json");
    std::fs::write(p("ca.pem"), ca_bundle()).unwrap();

    let run = tempfile::tempdir().unwrap();
    let vtpm = Vtpm::start(&options(run.path())).unwrap();
    let boot = Boot::honest();
    let log = vtpm.measure_boot(&boot.inputs()).unwrap();

    // Enrollment.
    std::fs::write(p("ak.json"), vtpm.ak_bundle().to_json()).unwrap();
    let out = cli(
        &[
            "enroll-challenge",
            "--vm",
            "vm1",
            "--ak",
            &s("ak.json"),
            "--ca",
            &s("ca.pem"),
        ],
        &state,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let challenge = CredentialChallenge::from_json(&text(&out.stdout)).unwrap();
    let response = vtpm.activate_credential(&challenge).unwrap();
    std::fs::write(p("response.json"), response.to_json()).unwrap();
    let out = cli(
        &[
            "enroll-finish",
            "--vm",
            "vm1",
            "--response",
            &s("response.json"),
            "--ca",
            &s("ca.pem"),
        ],
        &state,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with("enrolled AK 000b"));

    // Golden manifest from files.
    std::fs::write(p("kernel"), &boot.kernel).unwrap();
    std::fs::write(p("initrd"), boot.initrd.as_deref().unwrap()).unwrap();
    std::fs::write(p("vmm"), b"cell0-vmm test build").unwrap();
    std::fs::write(
        p("config.json"),
        serde_json::to_string(&boot.config).unwrap(),
    )
    .unwrap();
    std::fs::write(
        p("workload.json"),
        serde_json::to_string(&boot.workload).unwrap(),
    )
    .unwrap();
    let cmdline = String::from_utf8(boot.cmdline.clone()).unwrap();
    let out = cli(
        &[
            "manifest",
            "--kernel",
            &s("kernel"),
            "--initrd",
            &s("initrd"),
            "--cmdline",
            &cmdline,
            "--vm-config",
            &s("config.json"),
            "--workload",
            &s("workload.json"),
            "--vmm-binary",
            &s("vmm"),
            "--vmm-version",
            "0.1.0",
            "--name",
            "test image",
        ],
        &state,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    std::fs::write(p("manifest.json"), &out.stdout).unwrap();
    assert_eq!(
        cell0_attest::Manifest::read_file(&p("manifest.json")).unwrap(),
        boot.manifest()
    );

    // Quote with a nonce from the CLI; verify.
    let out = cli(&["nonce"], &state);
    let nonce = text(&out.stdout).trim().to_string();
    assert_eq!(nonce.len(), 64);
    let quote = vtpm.quote(&nonce.parse().unwrap()).unwrap();
    std::fs::write(p("quote.json"), quote.to_json()).unwrap();
    log.write_file(&p("log.jsonl")).unwrap();
    let verify = |manifest: &str, nonce: &str, extra: &[&str]| {
        let mut args = vec![
            "verify",
            "--vm",
            "vm1",
            "--quote",
            "QUOTE",
            "--event-log",
            "LOG",
            "--manifest",
            manifest,
            "--nonce",
            nonce,
        ];
        args.extend_from_slice(extra);
        let q = s("quote.json");
        let l = s("log.jsonl");
        let args: Vec<&str> = args
            .into_iter()
            .map(|a| match a {
                "QUOTE" => q.as_str(),
                "LOG" => l.as_str(),
                other => other,
            })
            .collect();
        cli(&args, &state)
    };
    let out = verify(&s("manifest.json"), &nonce, &[]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(text(&out.stdout).starts_with("trusted"));

    // A manifest for another kernel: exit 1, the verdict names PCR 4.
    let mut other = boot.manifest();
    other.kernel_sha256 = cell0_attest::Sha256Digest::of(b"another kernel");
    std::fs::write(p("other.json"), other.to_json()).unwrap();
    let out = verify(&s("other.json"), &nonce, &["--json"]);
    assert_eq!(out.status.code(), Some(1));
    let verdict: Verdict = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        matches!(
            verdict.failures(),
            [cell0_attest::Failure::EventMismatch { pcr: 4, .. }]
        ),
        "{verdict}"
    );

    // Another nonce: exit 1, nonce mismatch.
    let out = verify(&s("manifest.json"), &"ab".repeat(32), &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stdout).contains("nonce mismatch"),
        "{}",
        text(&out.stdout)
    );

    // Malformed input: exit 2 with a message.
    std::fs::write(p("quote.json"), "{}").unwrap();
    let out = verify(&s("manifest.json"), &nonce, &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("not a valid quote bundle"),
        "{}",
        text(&out.stderr)
    );
}
