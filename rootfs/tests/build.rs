// SPDX-License-Identifier: Apache-2.0
//! `cell0-rootfs build` as a user runs it: reproducible bytes, a manifest the
//! attestation verifier accepts, an archive the system's cpio reads, and
//! clear errors (bad kernel, missing package, no space).
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sha2::{Digest, Sha256};

fn rootfs() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cell0-rootfs"))
}

fn build(out: &Path, extra: &[&str]) -> Output {
    rootfs()
        .args(["build", "--quiet", "--out"])
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

fn ok(o: &Output) {
    assert!(
        o.status.success(),
        "cell0-rootfs failed: {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        String::from_utf8_lossy(&o.stdout)
    );
}

fn err(o: &Output) -> String {
    assert!(!o.status.success(), "expected a failure");
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(e.starts_with("cell0-rootfs: error: "), "{e}");
    assert!(!e.contains("panicked"), "{e}");
    e
}

/// A fake kernel: the build only hashes and copies it.
fn fake_kernel(dir: &Path) -> PathBuf {
    let k = dir.join("bzImage");
    std::fs::write(
        &k,
        (0..200_000u32).map(|i| (i * 7) as u8).collect::<Vec<u8>>(),
    )
    .unwrap();
    k
}

fn extra_tree(dir: &Path) -> PathBuf {
    let t = dir.join("tools");
    std::fs::create_dir_all(t.join("lib")).unwrap();
    std::fs::write(t.join("run.sh"), "#!/bin/sh\necho hi\n").unwrap();
    std::fs::write(t.join("lib/data.bin"), [1u8, 2, 3]).unwrap();
    std::os::unix::fs::symlink("run.sh", t.join("link")).unwrap();
    t
}

fn sha(p: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(p).unwrap()))
}

#[test]
fn the_same_inputs_give_the_same_bytes() {
    let d = tempfile::tempdir().unwrap();
    let k = fake_kernel(d.path());
    let t = extra_tree(d.path());
    let add = format!("{}:/opt/tools", t.display());
    let args = [
        "--kernel",
        k.to_str().unwrap(),
        "--add",
        &add,
        "--name",
        "repro",
    ];
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    ok(&build(&a, &args));
    // Touch the inputs: new mtimes must not change the output.
    std::fs::write(t.join("run.sh"), "#!/bin/sh\necho hi\n").unwrap();
    ok(&build(&b, &args));
    for f in [
        "initrd.img",
        "vmlinuz",
        "manifest.json",
        "contents.json",
        "cmdline",
    ] {
        assert_eq!(
            std::fs::read(a.join(f)).unwrap(),
            std::fs::read(b.join(f)).unwrap(),
            "{f} differs between two builds"
        );
    }
    // A different input gives a different initrd.
    std::fs::write(t.join("run.sh"), "#!/bin/sh\necho changed\n").unwrap();
    let c = d.path().join("c");
    ok(&build(&c, &args));
    assert_ne!(sha(&a.join("initrd.img")), sha(&c.join("initrd.img")));
}

#[test]
fn the_manifest_is_what_the_verifier_takes_and_matches_the_files() {
    let d = tempfile::tempdir().unwrap();
    let k = fake_kernel(d.path());
    let out = d.path().join("img");
    ok(&build(
        &out,
        &[
            "--kernel",
            k.to_str().unwrap(),
            "--disks",
            "1",
            "--append",
            "cell0.log=debug",
        ],
    ));
    let text = std::fs::read_to_string(out.join("manifest.json")).unwrap();
    let m = cell0_attest::Manifest::from_json(&text).unwrap();
    assert_eq!(m.kernel_sha256.to_string(), sha(&k));
    assert_eq!(
        m.initrd_sha256.unwrap().to_string(),
        sha(&out.join("initrd.img"))
    );
    assert_eq!(
        m.cmdline.as_deref(),
        Some(
            "console=ttyS0 reboot=k panic=1 pci=off cell0.log=debug \
             virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6 \
             virtio_mmio.device=4K@0xd0002000:7"
        )
    );
    assert_eq!(
        std::fs::read_to_string(out.join("cmdline")).unwrap(),
        "console=ttyS0 reboot=k panic=1 pci=off cell0.log=debug\n"
    );
    let c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("contents.json")).unwrap()).unwrap();
    assert_eq!(c["manifest_sha256"], sha(&out.join("manifest.json")));
    let files = c["files"].as_array().unwrap();
    let init = files.iter().find(|f| f["path"] == "/init").unwrap();
    assert_eq!(init["mode"], "0755");
    assert!(
        files
            .iter()
            .any(|f| f["path"] == "/bin/sh" && f["target"] == "/bin/busybox")
    );
    assert!(
        files
            .iter()
            .any(|f| f["path"] == "/dev/console" && f["kind"] == "char")
    );
    let paths: Vec<&str> = files.iter().map(|f| f["path"].as_str().unwrap()).collect();
    let mut sorted = paths.clone();
    sorted.sort();
    assert_eq!(paths, sorted, "entries are sorted");
}

#[test]
fn the_archive_reads_with_the_system_cpio_and_holds_a_static_init() {
    if Command::new("cpio").arg("--version").output().is_err() {
        eprintln!("SKIP: no cpio tool to cross-check with (scripts/deps.sh installs it)");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let k = fake_kernel(d.path());
    let t = extra_tree(d.path());
    let out = d.path().join("img");
    ok(&build(
        &out,
        &[
            "--kernel",
            k.to_str().unwrap(),
            "--add",
            &format!("{}:/opt/tools", t.display()),
        ],
    ));
    let x = d.path().join("x");
    std::fs::create_dir(&x).unwrap();
    let mut gz = flate2::read::GzDecoder::new(std::fs::File::open(out.join("initrd.img")).unwrap());
    let mut raw = Vec::new();
    std::io::Read::read_to_end(&mut gz, &mut raw).unwrap();
    let mut child = Command::new("cpio")
        .args(["-i", "-d", "--quiet", "--no-absolute-filenames"])
        .current_dir(&x)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Device nodes need privileges; everything else must extract.
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), &raw).unwrap();
    drop(child.stdin.take());
    child.wait().unwrap();
    let init = std::fs::read(x.join("init")).unwrap();
    assert!(
        cell0_rootfs::image::is_static_elf(&init),
        "/init must be static"
    );
    assert_eq!(init, cell0_rootfs::image::AGENT);
    assert_eq!(
        std::fs::read(x.join("opt/tools/lib/data.bin")).unwrap(),
        [1, 2, 3]
    );
    assert_eq!(
        std::fs::read_link(x.join("opt/tools/link")).unwrap(),
        Path::new("run.sh")
    );
    assert_eq!(
        std::fs::read_link(x.join("bin/sh")).unwrap(),
        Path::new("/bin/busybox")
    );
    // The agent starts and says what it is, as the guest will run it.
    let v = Command::new(x.join("init"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&v.stdout).starts_with("cell0-agent "));
}

#[test]
fn a_kernel_without_what_guests_need_is_refused_with_the_option_named() {
    let d = tempfile::tempdir().unwrap();
    let k = fake_kernel(d.path());
    let cfg = d.path().join("config");
    // Debian's cloud kernel: virtio as modules, no cmdline devices.
    std::fs::write(&cfg, "CONFIG_BLK_DEV_INITRD=y\nCONFIG_RD_GZIP=y\nCONFIG_DEVTMPFS=y\nCONFIG_SERIAL_8250_CONSOLE=y\nCONFIG_SERIO_I8042=y\nCONFIG_VIRTIO_MMIO=m\n# CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES is not set\nCONFIG_VSOCKETS=m\nCONFIG_VIRTIO_VSOCKETS=m\nCONFIG_HW_RANDOM_VIRTIO=m\nCONFIG_VIRTIO_BLK=m\n").unwrap();
    let out = d.path().join("img");
    let e = err(&build(
        &out,
        &[
            "--kernel",
            k.to_str().unwrap(),
            "--kernel-config",
            cfg.to_str().unwrap(),
        ],
    ));
    assert!(
        e.contains("lacks CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES"),
        "{e}"
    );
    // Allowed, it still needs the modules the config names.
    let e = err(&build(
        &out,
        &[
            "--kernel",
            k.to_str().unwrap(),
            "--kernel-config",
            cfg.to_str().unwrap(),
            "--allow-unsuitable-kernel",
        ],
    ));
    assert!(e.contains("virtio_mmio"), "{e}");
    let mods = d.path().join("modules");
    std::fs::create_dir_all(&mods).unwrap();
    let e = err(&build(
        &out,
        &[
            "--kernel",
            k.to_str().unwrap(),
            "--kernel-config",
            cfg.to_str().unwrap(),
            "--modules-dir",
            mods.to_str().unwrap(),
            "--allow-unsuitable-kernel",
        ],
    ));
    assert!(
        e.contains("built with virtio_mmio as a module, but virtio_mmio.ko is not in"),
        "{e}"
    );
}

#[test]
fn bad_arguments_and_missing_inputs_are_clear_errors() {
    let d = tempfile::tempdir().unwrap();
    let k = fake_kernel(d.path());
    let out = d.path().join("img");
    let e = err(&build(
        &out,
        &["--kernel", k.to_str().unwrap(), "--add", "x:relative"],
    ));
    assert!(e.contains("--add takes SRC:DST"), "{e}");
    let e = err(&build(
        &out,
        &[
            "--kernel",
            k.to_str().unwrap(),
            "--add",
            "/nonexistent/src:/x",
        ],
    ));
    assert!(e.contains("cannot read /nonexistent/src"), "{e}");
    let e = err(&build(&out, &["--kernel", "/nonexistent/bzImage"]));
    assert!(e.contains("cannot read /nonexistent/bzImage"), "{e}");
    let e = err(&build(
        &out,
        &["--kernel", k.to_str().unwrap(), "--busybox", "/bin/sh"],
    ));
    assert!(e.contains("is not a static executable"), "{e}");
    let e = err(&build(
        &out,
        &[
            "--kernel",
            k.to_str().unwrap(),
            "--add",
            &format!("{}:/init", k.display()),
        ],
    ));
    assert!(e.contains("/init is in the image twice"), "{e}");
}

#[test]
fn no_space_is_reported_before_writing() {
    let d = tempfile::tempdir().unwrap();
    let small = d.path().join("small");
    std::fs::create_dir(&small).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
        .arg(&small)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("SKIP: cannot mount a small tmpfs here (needs root)");
        return;
    }
    let k = fake_kernel(d.path());
    let o = build(&small.join("img"), &["--kernel", k.to_str().unwrap()]);
    let _ = Command::new("umount").arg(&small).status();
    let e = err(&o);
    assert!(e.contains("not enough space in"), "{e}");
}

#[test]
fn debian_kernel_packages_are_fetched_checked_and_their_modules_ordered() {
    if Command::new("apt-get").arg("--version").output().is_err() {
        eprintln!("SKIP: no apt-get on this machine");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("img");
    let e = err(&build(
        &out,
        &["--kernel-package", "linux-image-cell0-does-not-exist"],
    ));
    assert!(e.contains("is not available from apt"), "{e}");
    // Debian's cloud kernel cannot find virtio-mmio devices from the cmdline.
    let o = build(&out, &[]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    if stderr.contains("apt-get failed") || stderr.contains("is not available from apt") {
        eprintln!("SKIP: apt-get cannot download linux-image-cloud-amd64 here: {stderr}");
        return;
    }
    let e = err(&o);
    assert!(
        e.contains("lacks CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES"),
        "{e}"
    );
    ok(&build(&out, &["--allow-unsuitable-kernel"]));
    let c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("contents.json")).unwrap()).unwrap();
    let mods: Vec<String> = c["modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap().rsplit('/').next().unwrap().to_string())
        .collect();
    let pos = |m: &str| {
        mods.iter()
            .position(|x| x == m)
            .unwrap_or_else(|| panic!("{m} missing from {mods:?}"))
    };
    assert!(pos("virtio_ring.ko") < pos("virtio.ko"));
    assert!(pos("virtio.ko") < pos("virtio_mmio.ko"));
    assert!(pos("vsock.ko") < pos("vmw_vsock_virtio_transport_common.ko"));
    assert!(pos("vmw_vsock_virtio_transport_common.ko") < pos("vmw_vsock_virtio_transport.ko"));
    assert!(
        mods.contains(&"virtio-rng.ko".to_string()) && mods.contains(&"virtio_blk.ko".to_string())
    );
    assert!(
        c["kernel"]["source"]
            .as_str()
            .unwrap()
            .starts_with("linux-image-")
    );
    assert!(!c["warnings"].as_array().unwrap().is_empty());
}
