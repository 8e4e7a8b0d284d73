// SPDX-License-Identifier: Apache-2.0
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
//! Boots the built-in nano guest on /dev/kvm and checks exactly what it printed.
//! The expected outputs are those documented in guest/nano/README.md.

use cell0_tests::{launch, nano_test, require_kvm};

const READY: &str = "cell0-nano: ready\n";

fn serial_expected() -> String {
    let printable: String = (0x20u8..0x7f).map(char::from).collect();
    let digits: String = (0..300)
        .map(|i| char::from(b'0' + (i % 10) as u8))
        .collect();
    format!(
        "{READY}cell0-nano: serial: The quick brown fox jumps over the lazy dog.\n\
         cell0-nano: serial: [{printable}]\n\
         cell0-nano: serial: {digits}\n\
         cell0-nano: test serial passed\n"
    )
}

#[test]
fn boots_to_ready_with_1_and_2_vcpus_and_16_mib_and_1_gib() {
    require_kvm!();
    for vcpus in ["1", "2"] {
        for mem in ["16", "1024"] {
            let r = launch(&["--vcpus", vcpus, "--memory-mib", mem]);
            assert_eq!(r.code, Some(0), "vcpus {vcpus} mem {mem}: {r:#?}");
            assert_eq!(r.serial, READY, "vcpus {vcpus} mem {mem}");
        }
    }
}

#[test]
fn serial_self_test_prints_the_exact_text() {
    require_kvm!();
    let r = nano_test("serial", &[]);
    assert_eq!(r.code, Some(0), "{r:#?}");
    assert_eq!(r.serial, serial_expected());
}

#[test]
fn serial_output_can_go_to_a_file() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("serial.log");
    let r = nano_test("serial", &["--serial", log.to_str().unwrap()]);
    assert_eq!(r.code, Some(0), "{r:#?}");
    assert_eq!(r.serial, "", "nothing on stdout when serial goes to a file");
    assert_eq!(std::fs::read_to_string(&log).unwrap(), serial_expected());
}

#[test]
fn irq_self_test_takes_timer_interrupts() {
    require_kvm!();
    let r = nano_test("irq", &[]);
    assert_eq!(r.code, Some(0), "{r:#?}");
    assert_eq!(
        r.serial,
        format!(
            "{READY}cell0-nano: irq: lapic timer, one-shot, vector 0x40: 5/5 interrupts\n\
             cell0-nano: test irq passed\n"
        )
    );
}

#[test]
fn smp_self_test_every_vcpu_reports_in() {
    require_kvm!();
    for n in [1usize, 2, 4] {
        let r = nano_test("smp", &["--vcpus", &n.to_string()]);
        assert_eq!(r.code, Some(0), "{n} vCPUs: {r:#?}");
        let lines: Vec<&str> = r.serial.lines().collect();
        assert_eq!(lines.len(), n + 3, "{n} vCPUs: {}", r.serial);
        assert_eq!(lines[0], "cell0-nano: ready");
        // The order in which vCPUs report in is not deterministic.
        let mut online: Vec<&str> = lines[1..=n].to_vec();
        online.sort_unstable();
        let mut want: Vec<String> = (0..n)
            .map(|k| format!("cell0-nano: cpu {k} online"))
            .collect();
        want.sort_unstable();
        assert_eq!(online, want);
        assert_eq!(lines[n + 1], format!("cell0-nano: smp {n}/{n} cpus online"));
        assert_eq!(lines[n + 2], "cell0-nano: test smp passed");
    }
}

#[test]
fn panic_self_test_ends_the_vmm_with_a_crash_status() {
    require_kvm!();
    let r = nano_test("panic", &[]);
    assert_eq!(r.code, Some(2), "a guest crash exits with status 2: {r:#?}");
    assert!(
        r.stderr.contains("cell0-vmm: guest crashed: triple fault"),
        "stderr: {}",
        r.stderr
    );
    assert!(
        !r.stderr.contains("panicked"),
        "the VMM itself must not panic"
    );
    let s = &r.serial;
    assert!(
        s.starts_with(&format!(
            "{READY}cell0-nano: panic: writing to unmapped address 0x100000000\n"
        )),
        "{s}"
    );
    assert!(
        s.contains("cell0-nano: fault: vector 14 (#PF) error 0x6 on cpu 0\n"),
        "{s}"
    );
    assert!(s.contains("cell0-nano: cr2 0x0000000100000000\n"), "{s}");
    for reg in ["rip 0x", "rflags 0x", "rax 0x", "r15 0x"] {
        assert!(s.contains(reg), "register dump lacks {reg}: {s}");
    }
    assert!(
        s.ends_with("cell0-nano: crashing the VM (triple fault)\n"),
        "{s}"
    );
}

#[test]
fn serial_irq_self_test_takes_the_uart_interrupt() {
    require_kvm!();
    let r = nano_test("serial-irq", &[]);
    assert_eq!(r.code, Some(0), "{r:#?}");
    assert_eq!(
        r.serial,
        format!(
            "{READY}cell0-nano: serial-irq: THR-empty interrupt on IRQ 4, vector 0x41\n\
             cell0-nano: test serial-irq passed\n"
        )
    );
}

#[test]
fn rust_panic_in_the_guest_is_a_crash() {
    require_kvm!();
    let r = nano_test("rust-panic", &[]);
    assert_eq!(r.code, Some(2), "{r:#?}");
    let lines: Vec<&str> = r.serial.lines().collect();
    assert_eq!(lines.len(), 3, "{}", r.serial);
    assert_eq!(lines[0], "cell0-nano: ready");
    assert!(
        lines[1].starts_with("cell0-nano: panic at src/"),
        "{}",
        lines[1]
    );
    assert!(
        lines[1].ends_with(": deliberate panic from test rust-panic"),
        "{}",
        lines[1]
    );
    assert_eq!(lines[2], "cell0-nano: crashing the VM (triple fault)");
}

#[test]
fn smp_with_32_vcpus() {
    require_kvm!();
    let r = nano_test("smp", &["--vcpus", "32"]);
    assert_eq!(r.code, Some(0), "{r:#?}");
    assert!(
        r.serial
            .ends_with("cell0-nano: smp 32/32 cpus online\ncell0-nano: test smp passed\n")
    );
    assert_eq!(r.serial.matches(" online\n").count(), 33);
}

#[test]
fn unknown_self_test_is_a_crash() {
    require_kvm!();
    let r = nano_test("bogus", &[]);
    assert_eq!(r.code, Some(2), "{r:#?}");
    assert!(
        r.serial.contains("cell0-nano: unknown test 'bogus'"),
        "{}",
        r.serial
    );
}

#[test]
fn boot_milestones_are_logged() {
    require_kvm!();
    let r = launch(&["--log-level", "info"]);
    assert_eq!(r.code, Some(0), "{r:#?}");
    for m in [
        "milestone: process start",
        "milestone: VM created",
        "milestone: vCPU first entry",
        "milestone: first serial byte",
        "milestone: guest exit",
    ] {
        assert!(r.stderr.contains(m), "{m} missing from: {}", r.stderr);
    }
}
