// SPDX-License-Identifier: Apache-2.0
//! Command-line surface of `cell0-vmm` (no KVM needed). Its presence also makes
//! `cargo test` build the `cell0-vmm` binary that tests/ launches.

use std::process::Command;

fn vmm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cell0-vmm"))
}

#[test]
fn help_lists_launch_options() {
    let o = vmm().args(["launch", "--help"]).output().unwrap();
    assert!(o.status.success());
    let s = String::from_utf8_lossy(&o.stdout);
    for opt in [
        "--kernel",
        "--initrd",
        "--cmdline",
        "--vcpus",
        "--memory-mib",
        "--serial",
        "--log-level",
    ] {
        assert!(s.contains(opt), "{opt} missing from help:\n{s}");
    }
}

#[test]
fn bad_log_level_is_a_clean_error() {
    let o = vmm()
        .args(["--log-level", "lo[ud", "launch"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.starts_with("cell0-vmm: error: invalid --log-level"),
        "{e}"
    );
}

#[test]
fn nano_image_is_an_elf_with_the_smp_note() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("nano.elf");
    let o = vmm()
        .args(["nano-image", "--out"])
        .arg(&p)
        .output()
        .unwrap();
    assert!(o.status.success());
    let b = std::fs::read(&p).unwrap();
    assert_eq!(&b[..4], b"\x7fELF");
    assert!(
        cell0_vmm::boot::find_smp_note(&b).is_some(),
        "nano guest lacks the CELL0 SMP note"
    );
}

#[test]
fn command_words_may_start_with_a_hyphen() {
    // `--vcpus 0` is refused after parsing, so reaching that error shows `-c` was taken
    // as the value of `--command` rather than as an unknown flag.
    let o = vmm()
        .args([
            "launch",
            "--vcpus",
            "0",
            "--command",
            "/bin/sh",
            "--command",
            "-c",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("--vcpus must be between 1 and 32, got 0"), "{e}");
}

#[test]
fn usage_errors_exit_1_not_the_guest_crash_status() {
    let o = vmm().args(["launch", "--no-such-flag"]).output().unwrap();
    assert_eq!(
        o.status.code(),
        Some(1),
        "exit 2 is reserved for guest crashes"
    );
    let o = vmm().args(["launch", "--help"]).output().unwrap();
    assert_eq!(o.status.code(), Some(0));
}
