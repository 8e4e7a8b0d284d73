#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# The full test suite: unit tests, and integration tests that boot real VMs on
# /dev/kvm (tests that need something missing print SKIP and why).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
cargo build --workspace --bins
cargo test --workspace --no-fail-fast
