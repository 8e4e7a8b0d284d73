// SPDX-License-Identifier: Apache-2.0
//! Link as a freestanding static executable: no libc, no start files.
fn main() {
    println!("cargo:rustc-link-arg-bins=-nostdlib");
    println!("cargo:rustc-link-arg-bins=-static");
    println!("cargo:rustc-link-arg-bins=-no-pie");
}
