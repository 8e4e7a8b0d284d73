#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# The main job on the embedded single-node default: build cell0 and boot the
# built-in nano guest in a KVM micro-VM, showing its boot milestones.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
cargo build --release --bins -q
echo "== booting the nano guest (cell0-vmm launch) =="
target/release/cell0-vmm --log-level info launch --vcpus 2 --cmdline "cell0.test=smp"
echo "== guest exited cleanly =="
