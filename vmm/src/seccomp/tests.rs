// SPDX-License-Identifier: Apache-2.0
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use super::test_hook::ENV;
use super::*;

#[test]
fn every_data_file_compiles_to_a_non_empty_program() {
    let f = compile().unwrap();
    for kind in ThreadKind::ALL {
        assert!(!f.program(kind).is_empty(), "{kind}");
    }
}

#[test]
fn every_rule_says_why_and_mismatches_kill_the_process() {
    for kind in ThreadKind::ALL {
        let v: Value = serde_json::from_str(kind.json()).unwrap();
        let obj = v.as_object().unwrap();
        assert_eq!(obj.len(), 1, "{kind}: one filter per file");
        let f = &obj[kind.name()];
        assert_eq!(f["mismatch_action"], "kill_process", "{kind}");
        assert_eq!(f["match_action"], "allow", "{kind}");
        let rules = f["filter"].as_array().unwrap();
        assert!(!rules.is_empty());
        for r in rules {
            let comment = r["comment"].as_str().unwrap_or("");
            assert!(
                comment.len() > 10,
                "{kind}: rule {} has no justification",
                r["syscall"]
            );
            for a in r["args"].as_array().into_iter().flatten() {
                assert!(a["comment"].is_string(), "{kind}: {} arg", r["syscall"]);
            }
        }
    }
}

#[test]
fn dangerous_syscalls_are_on_no_list() {
    for kind in ThreadKind::ALL {
        let v: Value = serde_json::from_str(kind.json()).unwrap();
        let rules = v[kind.name()]["filter"].as_array().unwrap().clone();
        let names: Vec<&str> = rules.iter().filter_map(|r| r["syscall"].as_str()).collect();
        for bad in [
            "execve",
            "execveat",
            "fork",
            "vfork",
            "clone",
            "clone3",
            "ptrace",
            "seccomp",
            "prctl",
            "open",
            "openat",
            "mount",
            "setuid",
            "bpf",
            "process_vm_writev",
        ] {
            assert!(!names.contains(&bad), "{kind} allows {bad}");
        }
        // Every socket() is pinned to one address family.
        for r in rules.iter().filter(|r| r["syscall"] == "socket") {
            assert_eq!(r["args"][0]["index"], 0, "{kind}");
        }
    }
}

#[test]
fn the_kick_signal_is_the_one_the_vmm_filter_lets_through() {
    // vmm.json allows tgkill only with SIGABRT and SIGRTMIN as glibc numbers it.
    assert_eq!(crate::vcpu::kick_signal(), 34);
}

#[test]
fn gate_reports_failures_and_holds_threads_until_released() {
    let gate = Arc::new(StartGate::new());
    let g = gate.clone();
    let t = std::thread::spawn(move || g.arrive(Ok(())));
    gate.wait_arrivals(1, Duration::from_secs(10)).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert!(!t.is_finished(), "the thread waits for the release");
    gate.release(true);
    assert!(t.join().unwrap());

    let gate = Arc::new(StartGate::new());
    let g = gate.clone();
    let t = std::thread::spawn(move || g.arrive(Err(SeccompError::Missing(ThreadKind::Vcpu))));
    let e = gate.wait_arrivals(2, Duration::from_secs(10)).unwrap_err();
    assert!(matches!(e, SeccompError::Missing(ThreadKind::Vcpu)), "{e}");
    gate.release(false);
    assert!(!t.join().unwrap(), "a released-to-stop thread does not run");

    let gate = StartGate::new();
    let e = gate.wait_arrivals(1, Duration::from_millis(1)).unwrap_err();
    assert!(matches!(e, SeccompError::VcpuTimeout { missing: 1 }), "{e}");
    assert!(StartGate::opened().arrive(Ok(())));
}

fn kvm_missing() -> Option<String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .err()
        .map(|e| format!("/dev/kvm cannot be opened read-write: {e}"))
}

/// Runs [`sigsys_child`] in a fresh copy of this test binary, with the hook
/// set to `kind` (or unset).
fn run_child(kind: Option<&str>) -> std::process::ExitStatus {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "seccomp::tests::sigsys_child",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ]);
    match kind {
        Some(k) => cmd.env(ENV, k),
        None => cmd.env_remove(ENV),
    };
    cmd.output().unwrap().status
}

/// Not a test of its own: the body of the child process the SIGSYS tests start.
/// Boots the nano guest (with an API socket) under the filters.
#[test]
#[ignore = "run by the seccomp SIGSYS tests in a child process"]
fn sigsys_child() {
    use crate::config::{KernelSource, SerialOutput, VmConfig};
    let dir = tempfile::tempdir().unwrap();
    let cfg = VmConfig::new(
        KernelSource::Nano,
        None,
        Some("cell0.test=serial".into()),
        2,
        16,
        SerialOutput::File(dir.path().join("serial.txt")),
    )
    .unwrap();
    let cfg = VmConfig {
        api_sock: Some(dir.path().join("api.sock")),
        ..cfg
    };
    assert!(prepare().unwrap(), "filters are on by default");
    // The VM runs on a thread of its own: the VMM filter stays on the thread
    // that ran it, and this one still has to read the serial file.
    let reason = std::thread::spawn(move || crate::vm::Vm::build(&cfg).unwrap().run().unwrap())
        .join()
        .unwrap();
    assert!(reason.is_clean(), "{reason}");
    let serial = std::fs::read_to_string(dir.path().join("serial.txt")).unwrap();
    assert!(serial.contains("test serial passed"), "{serial}");
}

#[test]
fn filtered_vm_runs_and_a_forbidden_syscall_kills_it_with_sigsys() {
    if let Some(why) = kvm_missing() {
        eprintln!("SKIP {}: {why}", module_path!());
        return;
    }
    // Control: with every filter in place and no hook, the guest runs its test.
    let ok = run_child(None);
    assert!(ok.success(), "the filtered VM did not run cleanly: {ok:?}");
    // A vCPU thread, the VMM thread and the API thread each call socket(AF_INET6)
    // right after installing their filter: the kernel kills the process.
    for kind in ["vcpu", "vmm", "api"] {
        let st = run_child(Some(kind));
        assert_eq!(
            st.signal(),
            Some(libc::SIGSYS),
            "{kind}: expected death by SIGSYS, got {st:?}"
        );
    }
}
