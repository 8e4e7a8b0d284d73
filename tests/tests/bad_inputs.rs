// SPDX-License-Identifier: Apache-2.0
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
//! Bad launch inputs: each gives a clear one-line error, exit status 1, no panic.

use cell0_tests::{assert_clean_error, launch, require_kvm, write_nano_image};

#[test]
fn missing_kernel_file() {
    require_kvm!();
    let r = launch(&["--kernel", "/nonexistent/vmlinux"]);
    assert_clean_error(&r, "cannot read the kernel file /nonexistent/vmlinux");
}

#[test]
fn empty_kernel_file() {
    require_kvm!();
    let f = tempfile::NamedTempFile::new().unwrap();
    let r = launch(&["--kernel", f.path().to_str().unwrap()]);
    assert_clean_error(&r, "the kernel image is empty");
}

#[test]
fn truncated_elf() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let full = dir.path().join("nano.elf");
    write_nano_image(&full);
    let bytes = std::fs::read(&full).unwrap();
    // Inside the ELF header, inside the program headers, and inside the loaded segments.
    for cut in [16usize, 64, bytes.len() / 2] {
        let p = dir.path().join(format!("cut{cut}.elf"));
        std::fs::write(&p, &bytes[..cut]).unwrap();
        let r = launch(&["--kernel", p.to_str().unwrap()]);
        assert_clean_error(&r, "cannot load the ELF kernel");
    }
}

#[test]
fn random_bytes() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("random.bin");
    // A fixed pseudo-random pattern (xorshift) so the test is repeatable.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let data: Vec<u8> = (0..65536)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(&p, data).unwrap();
    let r = launch(&["--kernel", p.to_str().unwrap()]);
    assert_clean_error(&r, "neither an ELF file nor a bzImage");
}

#[test]
fn kernel_larger_than_memory() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("big.elf");
    let mut data = vec![0u8; 3 << 20];
    data[..4].copy_from_slice(b"\x7fELF");
    std::fs::write(&p, data).unwrap();
    let r = launch(&["--kernel", p.to_str().unwrap(), "--memory-mib", "2"]);
    assert_clean_error(&r, "does not fit in 2097152 bytes of guest memory");
}

#[test]
fn initrd_that_does_not_fit() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("initrd.img");
    std::fs::write(&p, vec![0x5a; 20 << 20]).unwrap();
    let r = launch(&["--initrd", p.to_str().unwrap(), "--memory-mib", "16"]);
    assert_clean_error(
        &r,
        "the initrd (20971520 bytes) does not fit in guest memory",
    );
}

#[test]
fn missing_and_empty_initrd() {
    require_kvm!();
    let r = launch(&["--initrd", "/nonexistent/initrd"]);
    assert_clean_error(&r, "cannot read the initrd file /nonexistent/initrd");
    let f = tempfile::NamedTempFile::new().unwrap();
    let r = launch(&["--initrd", f.path().to_str().unwrap()]);
    assert_clean_error(&r, "the initrd is empty");
}

#[test]
fn cmdline_over_the_limit() {
    require_kvm!();
    let long = "x".repeat(3000);
    let r = launch(&["--cmdline", &long]);
    assert_clean_error(&r, "over the limit of 2047");
    assert!(r.stderr.contains("added by cell0-vmm"), "{}", r.stderr);
}

#[test]
fn zero_vcpus_and_zero_memory() {
    // Refused before KVM is touched, so no KVM needed.
    let r = launch(&["--vcpus", "0"]);
    assert_clean_error(&r, "--vcpus must be between 1 and 32, got 0");
    let r = launch(&["--memory-mib", "0"]);
    assert_clean_error(&r, "--memory-mib must be between 1 and 1048576, got 0");
    let r = launch(&["--vcpus", "33"]);
    assert_clean_error(&r, "got 33");
}

#[test]
fn unwritable_serial_output() {
    require_kvm!();
    let r = launch(&["--serial", "/nonexistent/dir/serial.log"]);
    assert_clean_error(
        &r,
        "cannot open the serial output /nonexistent/dir/serial.log",
    );
}
