// SPDX-License-Identifier: Apache-2.0
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
//! Measured boot through `cell0-vmm launch --tpm` on real VMs with a real swtpm:
//! enrollment over the API socket, quotes, and verdicts from cell0-attest's verifier.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use cell0_attest::{EventLog, EventType, Failure, Manifest, QuoteBundle, Verdict, Verifier};
use cell0_tests::attest::{self, VmSpec};
use cell0_tests::{
    ChildGuard, api_request, bin, idle_elf, require_kvm, swtpm_pids_with, vmm, wait_for_path,
};
use serde_json::json;

const CMDLINE: &str = "console=ttyS0 cell0.agent=test";

struct Vm {
    child: ChildGuard,
    api: PathBuf,
    run: PathBuf,
}

/// Launches an idle guest with --tpm; `kernel` is written into `dir`.
fn launch(dir: &Path, name: &str, ca: &Path, kernel: &[u8], cmdline: &str, mem: u64) -> Vm {
    launch_with_initrd(dir, name, ca, kernel, cmdline, mem, None)
}

fn launch_with_initrd(
    dir: &Path,
    name: &str,
    ca: &Path,
    kernel: &[u8],
    cmdline: &str,
    mem: u64,
    initrd: Option<&[u8]>,
) -> Vm {
    let k = dir.join(format!("{name}.elf"));
    std::fs::write(&k, kernel).unwrap();
    let mut extra = Vec::new();
    if let Some(data) = initrd {
        let p = dir.join(format!("{name}.initrd"));
        std::fs::write(&p, data).unwrap();
        extra = vec!["--initrd".to_string(), p.display().to_string()];
    }
    let api = dir.join(format!("{name}.api"));
    let run = dir.join(format!("{name}.run"));
    let child = vmm()
        .env("CELL0_TPM_CA_DIR", ca)
        .arg("launch")
        .arg("--kernel")
        .arg(&k)
        .args(["--cmdline", cmdline, "--memory-mib", &mem.to_string()])
        .args([
            "--tpm",
            "--agent-id",
            "agent-1",
            "--command",
            "python3",
            "--command",
            "agent.py",
        ])
        .arg("--run-dir")
        .arg(&run)
        .arg("--api-sock")
        .arg(&api)
        .args(&extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = ChildGuard(child);
    // The socket is served while the vTPM is set up (`starting`): wait for `running`.
    let opened = wait_for_path(&api, Duration::from_secs(60))
        && cell0_tests::wait_api_running(&api, Duration::from_secs(60));
    if !opened {
        // Say why: a VMM that exited (swtpm_setup failing, say) left its reason on stderr.
        use std::io::Read;
        let _ = child.0.kill();
        let status = child.0.wait().unwrap();
        let mut err = String::new();
        if let Some(mut e) = child.0.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        panic!("the VMM did not serve its API socket ({status}): {err}");
    }
    Vm { child, api, run }
}

/// What the verifier expects of an honest boot of `kernel` with `cmdline` and `mem`.
fn manifest(kernel: &[u8], cmdline: &str, mem: u64) -> Manifest {
    VmSpec {
        kernel: kernel.to_vec(),
        cmdline: cmdline.into(),
        vcpus: 1,
        memory_mib: mem,
        vsock: None,
        agent_id: "agent-1".into(),
        command: vec!["python3".into(), "agent.py".into()],
    }
    .manifest(&bin("cell0-vmm"))
    .unwrap()
}

fn verifier(ca: &Path) -> Verifier {
    attest::verifier(ca).unwrap()
}

fn enroll(v: &mut Verifier, id: &str, vm: &Vm) {
    attest::enroll(v, id, &vm.api).unwrap();
}

fn quote(vm: &Vm, nonce: &cell0_attest::Nonce) -> (QuoteBundle, EventLog) {
    attest::quote(&vm.api, nonce).unwrap()
}

/// Enrolls `vm` as `id`, asks it for a quote over a fresh nonce, and verifies it.
fn enroll_and_verify(v: &mut Verifier, id: &str, vm: &Vm, golden: &Manifest) -> Verdict {
    enroll(v, id, vm);
    let n = v.issue_nonce(id);
    let (q, log) = quote(vm, &n);
    v.verify(id, &q, &log, golden)
}

fn stop(mut vm: Vm) -> PathBuf {
    assert_eq!(api_request(&vm.api, &json!({"op": "stop"}))["ok"], true);
    let st = vm.child.0.wait().unwrap();
    assert_eq!(st.code(), Some(0));
    vm.run.clone()
}

fn only_mismatch(v: &Verdict, event: EventType, pcr: u8) {
    let f = v.failures();
    assert_eq!(f.len(), 1, "{v}");
    assert!(
        matches!(&f[0], Failure::EventMismatch { event: e, pcr: p, .. } if *e == event && *p == pcr),
        "expected a mismatch of {event} in PCR {pcr}: {v}"
    );
}

#[test]
fn honest_boot_verifies_and_each_tampered_input_is_named() {
    require_kvm!();
    if cell0_tests::swtpm_missing() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    let kernel = idle_elf(0);
    let golden = manifest(&kernel, CMDLINE, 64);

    // Honest boot.
    let honest = launch(dir.path(), "honest", &ca, &kernel, CMDLINE, 64);
    let mut v = verifier(&ca);
    enroll(&mut v, "honest", &honest);
    let n = v.issue_nonce("honest");
    let (q, log) = quote(&honest, &n);
    let verdict = v.verify("honest", &q, &log, &golden);
    assert!(verdict.is_trusted(), "{verdict}");
    // The same quote again: its nonce is used up.
    let again = v.verify("honest", &q, &log, &golden);
    assert!(!again.is_trusted(), "a replayed quote must not verify");
    // A stale nonce: the VM quotes an old nonce while the verifier issued a new one.
    let _fresh = v.issue_nonce("honest");
    let (q_old, log_old) = quote(&honest, &n);
    assert!(!v.verify("honest", &q_old, &log_old, &golden).is_trusted());

    // A changed kernel byte (PCR 4), cmdline (PCR 8) and memory size (PCR 11).
    // (name, kernel, cmdline, memory MiB, event that differs, its PCR)
    type Case<'a> = (&'a str, Vec<u8>, &'a str, u64, EventType, u8);
    let cases: [Case<'_>; 3] = [
        ("kernel", idle_elf(1), CMDLINE, 64, EventType::Kernel, 4),
        (
            "cmdline",
            kernel.clone(),
            "console=ttyS0 cell0.agent=evil",
            64,
            EventType::Cmdline,
            8,
        ),
        (
            "memory",
            kernel.clone(),
            CMDLINE,
            128,
            EventType::VmConfig,
            11,
        ),
    ];
    for (name, k, cmdline, mem, event, pcr) in cases {
        let vm = launch(dir.path(), name, &ca, &k, cmdline, mem);
        only_mismatch(&enroll_and_verify(&mut v, name, &vm, &golden), event, pcr);
        stop(vm);
    }

    // An initrd the manifest does not have (PCR 9).
    let vm = launch_with_initrd(
        dir.path(),
        "initrd",
        &ca,
        &kernel,
        CMDLINE,
        64,
        Some(b"extra"),
    );
    only_mismatch(
        &enroll_and_verify(&mut v, "initrd", &vm, &golden),
        EventType::Initrd,
        9,
    );
    stop(vm);

    // A quote signed by another VM's AK does not verify for this VM.
    let other = launch(dir.path(), "other", &ca, &kernel, CMDLINE, 64);
    let n = v.issue_nonce("honest");
    let (q_other, log_other) = quote(&other, &n);
    assert!(
        !v.verify("honest", &q_other, &log_other, &golden)
            .is_trusted()
    );
    stop(other);

    let run = stop(honest);
    // The VMM stops its swtpm before it exits; under load the kernel may
    // take a moment to tear the process down, so poll (bounded).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !swtpm_pids_with(&run.display().to_string()).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "swtpm left running after the VMM stopped"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn no_swtpm_survives_a_sigkilled_vmm() {
    require_kvm!();
    if cell0_tests::swtpm_missing() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    let mut vm = launch(dir.path(), "victim", &ca, &idle_elf(0), CMDLINE, 64);
    let needle = vm.run.display().to_string();
    assert_eq!(
        api_request(&vm.api, &json!({"op": "describe"}))["vm"]["tpm"],
        true
    );
    assert_eq!(swtpm_pids_with(&needle).len(), 1, "one swtpm per VM");
    vm.child.0.kill().unwrap();
    vm.child.0.wait().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !swtpm_pids_with(&needle).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "swtpm outlived its SIGKILLed VMM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn quote_with_a_bad_nonce_is_a_clear_error() {
    require_kvm!();
    if cell0_tests::swtpm_missing() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    let vm = launch(dir.path(), "n", &ca, &idle_elf(0), CMDLINE, 64);
    let r = api_request(&vm.api, &json!({"op": "quote", "nonce": "abcd"}));
    assert_eq!(r["error"]["code"], "bad_request", "{r}");
    assert!(r["error"]["message"].as_str().unwrap().contains("32 bytes"));
    stop(vm);
}

#[test]
fn twenty_vms_with_vtpms_in_parallel_all_verify() {
    require_kvm!();
    if cell0_tests::swtpm_missing() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    let kernel = idle_elf(0);
    let golden = manifest(&kernel, CMDLINE, 64);
    // Create the CA once before the parallel launches share it.
    let first = launch(dir.path(), "vm0", &ca, &kernel, CMDLINE, 64);
    let mut vms = vec![first];
    let rest: Vec<Vm> = std::thread::scope(|s| {
        let hs: Vec<_> = (1..20)
            .map(|i| {
                let (d, ca, k) = (dir.path(), &ca, &kernel);
                s.spawn(move || launch(d, &format!("vm{i}"), ca, k, CMDLINE, 64))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    vms.extend(rest);
    let mut v = verifier(&ca);
    for (i, vm) in vms.iter().enumerate() {
        let id = format!("vm{i}");
        let verdict = enroll_and_verify(&mut v, &id, vm, &golden);
        assert!(verdict.is_trusted(), "{id}: {verdict}");
    }
    let runs: Vec<PathBuf> = vms.into_iter().map(stop).collect();
    for run in runs {
        assert!(
            swtpm_pids_with(&run.display().to_string()).is_empty(),
            "swtpm left for {}",
            run.display()
        );
    }
}
