// SPDX-License-Identifier: Apache-2.0
//! Builds the freestanding nano guest (guest/nano, its own cargo project) and
//! puts its ELF in OUT_DIR so that `cell0-vmm` embeds it as its default image.
//!
//! `CELL0_NANO_ELF=/path/to/elf` skips the build and embeds that file instead.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let dest = out.join("cell0-nano.elf");
    println!("cargo:rerun-if-env-changed=CELL0_NANO_ELF");
    if let Some(prebuilt) = std::env::var_os("CELL0_NANO_ELF") {
        let prebuilt = PathBuf::from(prebuilt);
        println!("cargo:rerun-if-changed={}", prebuilt.display());
        std::fs::copy(&prebuilt, &dest)
            .unwrap_or_else(|e| panic!("cannot copy CELL0_NANO_ELF {}: {e}", prebuilt.display()));
        return;
    }

    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let root = manifest_dir.parent().expect("vmm/ has a parent");
    let nano = root.join("guest/nano");
    for p in ["src", "Cargo.toml", "Cargo.lock", "build.rs"] {
        println!("cargo:rerun-if-changed={}", nano.join(p).display());
    }
    // The nano guest shares the SYPAS codec with the host.
    println!(
        "cargo:rerun-if-changed={}",
        root.join("proto/src").display()
    );
    println!(
        "cargo:rerun-if-changed={}",
        root.join("proto/Cargo.toml").display()
    );

    let target_dir = out.join("nano-target");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.arg("build")
        .arg("--release")
        .arg("--manifest-path")
        .arg(nano.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir);
    // The outer build's settings (rustflags, wrappers such as clippy-driver, the
    // jobserver, profile overrides) must not leak into the freestanding build.
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        let keep = matches!(k.as_str(), "CARGO_HOME" | "CARGO_NET_OFFLINE");
        if !keep
            && (k.starts_with("CARGO_")
                || k.starts_with("RUSTC")
                || k == "RUSTFLAGS"
                || k == "RUSTDOCFLAGS"
                || k == "MAKEFLAGS"
                || k == "MFLAGS"
                || k == "DEBUG"
                || k == "OPT_LEVEL"
                || k == "PROFILE"
                || k == "TARGET"
                || k == "HOST")
        {
            cmd.env_remove(&k);
        }
    }
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run cargo to build guest/nano: {e}"));
    assert!(
        status.success(),
        "building guest/nano failed ({status}); see the output above"
    );
    let built = find_elf(&target_dir);
    std::fs::copy(&built, &dest).unwrap_or_else(|e| panic!("cannot copy {}: {e}", built.display()));
}

fn find_elf(target_dir: &Path) -> PathBuf {
    let p = target_dir.join("release/cell0-nano");
    assert!(
        p.is_file(),
        "guest/nano built, but {} is missing",
        p.display()
    );
    p
}
