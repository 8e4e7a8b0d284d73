// SPDX-License-Identifier: Apache-2.0
//! Builds the guest agent (guest/agent) as a static executable and puts it in
//! OUT_DIR, so that `cell0-rootfs` embeds it as the image's `/init`.
//!
//! The static link needs `-C target-feature=+crt-static`, which only RUSTFLAGS
//! can set, and only for the target (build scripts and proc-macros must stay
//! dynamic). So this runs a child `cargo build --release --target
//! x86_64-unknown-linux-gnu` with its own RUSTFLAGS and target dir; with an
//! explicit `--target`, RUSTFLAGS apply to the target artifacts alone.
//!
//! `CELL0_AGENT_BIN=/path/to/static/cell0-agent` embeds that file instead.

use std::path::PathBuf;
use std::process::Command;

const TARGET: &str = "x86_64-unknown-linux-gnu";

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let dest = out.join("cell0-agent");
    println!("cargo:rerun-if-env-changed=CELL0_AGENT_BIN");
    if let Some(prebuilt) = std::env::var_os("CELL0_AGENT_BIN") {
        let prebuilt = PathBuf::from(prebuilt);
        println!("cargo:rerun-if-changed={}", prebuilt.display());
        std::fs::copy(&prebuilt, &dest)
            .unwrap_or_else(|e| panic!("cannot copy CELL0_AGENT_BIN {}: {e}", prebuilt.display()));
        return;
    }
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let root = manifest_dir.parent().expect("rootfs/ has a parent");
    for p in [
        "guest/agent/src",
        "guest/agent/Cargo.toml",
        "proto/src",
        "proto/Cargo.toml",
        "Cargo.lock",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(p).display());
    }

    let target_dir = out.join("agent-target");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.arg("build")
        .arg("--release")
        .arg("--package")
        .arg("cell0-agent")
        .arg("--bin")
        .arg("cell0-agent")
        .arg("--manifest-path")
        .arg(root.join("Cargo.toml"))
        .arg("--target")
        .arg(TARGET)
        .arg("--target-dir")
        .arg(&target_dir);
    // The outer build's settings (wrappers such as clippy-driver, the
    // jobserver, profile overrides, its own RUSTFLAGS) must not leak in.
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
    cmd.env("CARGO_ENCODED_RUSTFLAGS", "-Ctarget-feature=+crt-static");
    // Faster to build than the workspace's release profile (no LTO), and
    // smaller in the initramfs (no debug info, stripped).
    cmd.env("CARGO_PROFILE_RELEASE_LTO", "false")
        .env("CARGO_PROFILE_RELEASE_DEBUG", "false")
        .env("CARGO_PROFILE_RELEASE_STRIP", "symbols");
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run cargo to build the static guest agent: {e}"));
    assert!(
        status.success(),
        "building the static guest agent failed ({status}); see the output above"
    );
    let built = target_dir.join(TARGET).join("release/cell0-agent");
    std::fs::copy(&built, &dest).unwrap_or_else(|e| panic!("cannot copy {}: {e}", built.display()));
}
