#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# The main job on one host: boot an agent micro-VM (the built-in nano guest)
# with measured boot into its own vTPM, enroll and verify its attestation,
# talk SYPAS to it over virtio-vsock, and shut it down.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
cargo build --release --bins -q
exec target/release/cell0-demo
