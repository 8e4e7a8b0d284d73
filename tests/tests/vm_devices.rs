// SPDX-License-Identifier: Apache-2.0
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
//! virtio-blk and virtio-rng on real VMs, driven by the nano guest's `blk`
//! and `rng` self-tests (`cell0-vmm launch --disk PATH[,ro] --rng`).

use std::path::Path;

use cell0_tests::{Run, launch, require_kvm};

const SECTORS: usize = 64;

/// Sector s holds, at byte i, `(i mod 251) ^ s`: the guest checks it.
fn write_disk(path: &Path) {
    let mut v = Vec::with_capacity(SECTORS * 512);
    for s in 0..SECTORS {
        v.extend((0..512).map(|i| ((i % 251) as u8) ^ (s as u8)));
    }
    std::fs::write(path, v).unwrap();
}

fn assert_passed(r: &Run, test: &str) {
    assert_eq!(r.code, Some(0), "{r:#?}");
    assert_eq!(
        r.serial.lines().last(),
        Some(format!("cell0-nano: test {test} passed").as_str()),
        "{}",
        r.serial
    );
}

fn assert_line(r: &Run, line: &str) {
    assert!(
        r.serial.lines().any(|l| l == line),
        "no line {line:?} in:\n{}",
        r.serial
    );
}

#[test]
fn blk_reads_checks_writes_and_flushes_sectors_and_the_file_holds_them() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    write_disk(&disk);
    let r = launch(&[
        "--disk",
        disk.to_str().unwrap(),
        "--cmdline",
        "cell0.test=blk",
    ]);
    assert_passed(&r, "blk");
    assert_line(
        &r,
        "cell0-nano: blk: virtio-blk at 0xd0000000 irq 5, 64 sectors of 512 bytes, read-write",
    );
    assert_line(
        &r,
        "cell0-nano: blk: read sectors 0..8 (4096 bytes), checked byte for byte",
    );
    assert_line(
        &r,
        "cell0-nano: blk: wrote sectors 8..16, flushed, read back and checked byte for byte",
    );
    assert_line(
        &r,
        "cell0-nano: blk: read past the end (sector 64) refused with status IOERR (1)",
    );
    // The host file holds what the guest wrote (pattern of call s + 0x55),
    // and nothing else changed.
    let d = std::fs::read(&disk).unwrap();
    assert_eq!(d.len(), SECTORS * 512);
    for s in 0..SECTORS {
        let k = if (8..16).contains(&s) { s + 0x55 } else { s } as u8;
        for i in 0..512 {
            assert_eq!(
                d[s * 512 + i],
                ((i % 251) as u8) ^ k,
                "sector {s} byte {i} of the disk file"
            );
        }
    }
}

#[test]
fn blk_on_a_read_only_disk_refuses_the_write_and_leaves_the_file_alone() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    write_disk(&disk);
    let before = std::fs::read(&disk).unwrap();
    let arg = format!("{},ro", disk.display());
    let r = launch(&["--disk", &arg, "--cmdline", "cell0.test=blk"]);
    assert_passed(&r, "blk");
    assert_line(
        &r,
        "cell0-nano: blk: virtio-blk at 0xd0000000 irq 5, 64 sectors of 512 bytes, read-only",
    );
    assert_line(
        &r,
        "cell0-nano: blk: write to the read-only disk refused with status IOERR (1), sectors 8..16 unchanged",
    );
    assert_eq!(std::fs::read(&disk).unwrap(), before);
}

#[test]
fn blk_with_other_bytes_on_the_disk_fails_the_guest() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    write_disk(&disk);
    let mut d = std::fs::read(&disk).unwrap();
    d[3 * 512 + 100] ^= 0xff;
    std::fs::write(&disk, d).unwrap();
    let r = launch(&[
        "--disk",
        disk.to_str().unwrap(),
        "--cmdline",
        "cell0.test=blk",
    ]);
    assert_ne!(r.code, Some(0), "{}", r.serial);
    assert!(
        r.serial
            .contains("cell0-nano: test blk failed: sector 3 differs at byte 100: expected "),
        "{}",
        r.serial
    );
}

#[test]
fn rng_fills_every_read_with_random_bytes() {
    require_kvm!();
    let r = launch(&["--rng", "--cmdline", "cell0.test=rng"]);
    assert_passed(&r, "rng");
    assert_line(&r, "cell0-nano: rng: virtio-rng at 0xd0000000 irq 5");
    assert!(
        r.serial.contains(
            "cell0-nano: rng: 8 reads of 64 bytes and 1 of 4096 bytes, all filled, no two alike, "
        ),
        "{}",
        r.serial
    );
}

#[test]
fn blk_and_rng_without_their_device_fail_with_the_flag_to_add() {
    require_kvm!();
    let r = launch(&["--rng", "--cmdline", "cell0.test=blk"]);
    assert_ne!(r.code, Some(0));
    assert!(
        r.serial.contains(
            "cell0-nano: test blk failed: no virtio-blk device on the cmdline (start the VMM with --disk PATH)"
        ),
        "{}",
        r.serial
    );
    let r = launch(&["--cmdline", "cell0.test=rng"]);
    assert_ne!(r.code, Some(0));
    assert!(
        r.serial.contains(
            "cell0-nano: test rng failed: no virtio-rng device on the cmdline (start the VMM with --rng)"
        ),
        "{}",
        r.serial
    );
}
