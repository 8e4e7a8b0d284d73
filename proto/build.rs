// SPDX-License-Identifier: Apache-2.0
//! Generates the control-plane gRPC code from `grpc/control.proto` when the
//! `grpc` feature is on; does nothing otherwise (the `no_std` core and the
//! nano guest never run tonic-build).

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "grpc")]
    grpc();
}

#[cfg(feature = "grpc")]
fn grpc() {
    let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    println!("cargo:rerun-if-changed=grpc/control.proto");
    if let Err(e) = tonic_build::configure()
        .file_descriptor_set_path(out.join("control_descriptor.bin"))
        .compile_protos(&["grpc/control.proto"], &["grpc"])
    {
        panic!(
            "cannot compile grpc/control.proto ({e}); protoc comes with Debian's protobuf-compiler (scripts/deps.sh)"
        );
    }
}
