#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Installs the Debian packages cell0 needs to build and test (idempotent).
# Needs root (or sudo) only when something is missing.
set -euo pipefail

PACKAGES=(
  gcc pkg-config            # C toolchain for -sys crates
  libtss2-dev               # tss-esapi (attest/)
  swtpm swtpm-tools         # per-VM vTPM (attest/)
  busybox-static cpio       # guest images (rootfs/)
  make flex bison bc libelf-dev libssl-dev xz-utils  # cell0-rootfs kernel (the minimal guest kernel)
  protobuf-compiler         # protoc for the gRPC API (proto/ feature grpc)
  iproute2                  # ip netns/veth/bridge for the control-plane fault tests (control/tests/cp_faults)
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "deps: installing ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null; then
  echo "deps: cargo is missing; install a Rust toolchain (rustup, stable >= 1.85)" >&2
  exit 1
fi
