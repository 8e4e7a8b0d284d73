#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# The control-plane demo: start `cell0d serve` on a temporary data dir, run an
# agent VM (the nano guest, or a Linux image given by CELL0_KERNEL and
# CELL0_INITRD), attest it, SYPAS-ping it, show `cell0ctl ps`, clean up.
#
#   scripts/demo-cp.sh                 # builds release binaries first
#   CELL0_BIN=target/debug scripts/demo-cp.sh
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${CELL0_BIN:-}" ]; then
  scripts/deps.sh
  echo "== building cell0d, cell0ctl, cell0-vmm, sypas-ping (release)"
  cargo build --release -q -p cell0-control -p cell0-vmm -p cell0-proto --bins
  CELL0_BIN="${CARGO_TARGET_DIR:-target}/release"
fi
BIN="$(cd "$CELL0_BIN" && pwd)"
for b in cell0d cell0ctl cell0-vmm sypas-ping; do
  [ -x "$BIN/$b" ] || { echo "demo: $BIN/$b is missing" >&2; exit 1; }
done

WORK="$(mktemp -d /tmp/cell0-demo.XXXXXX)"
DATA="$WORK/d"
CELL0D_PID=""
cleanup() {
  set +e
  if [ -n "${CELL0_ENDPOINT:-}" ]; then
    "$BIN/cell0ctl" rm agent1 >/dev/null 2>&1
    # The node agent stops the VMM and removes its run dir.
    for _ in $(seq 50); do [ -d "$DATA/node/vms/agent1" ] || break; sleep 0.1; done
  fi
  [ -n "$CELL0D_PID" ] && kill "$CELL0D_PID" 2>/dev/null && wait "$CELL0D_PID" 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT

echo "== cell0d serve --data-dir $DATA"
RUST_LOG=warn "$BIN/cell0d" serve --data-dir "$DATA" --listen 127.0.0.1:0 --metrics 127.0.0.1:0 \
  --vmm "$BIN/cell0-vmm" 2>"$WORK/cell0d.log" &
CELL0D_PID=$!
for _ in $(seq 300); do [ -s "$DATA/cell0d.addr" ] && break; sleep 0.1; done
[ -s "$DATA/cell0d.addr" ] || { echo "demo: cell0d did not start:"; cat "$WORK/cell0d.log"; exit 1; }
CELL0_ENDPOINT="$(sed -e 's/.*"grpc":"\([^"]*\)".*/\1/' "$DATA/cell0d.addr")"
METRICS="$(sed -e 's/.*"metrics":"\([^"]*\)".*/\1/' "$DATA/cell0d.addr")"
export CELL0_ENDPOINT
echo "   gRPC $CELL0_ENDPOINT, metrics http://$METRICS/metrics"

RUN=(run --name agent1 --tpm)
if [ -n "${CELL0_KERNEL:-}" ]; then
  echo "== cell0ctl run (Linux image $CELL0_KERNEL)"
  RUN+=(--kernel "$CELL0_KERNEL" --memory-mib 256)
  [ -n "${CELL0_INITRD:-}" ] && RUN+=(--initrd "$CELL0_INITRD")
else
  echo "== cell0ctl run (nano guest, serving SYPAS on vsock port 5000)"
  RUN+=(--cmdline "cell0.test=sypas-serve cell0.timeout=600")
fi
"$BIN/cell0ctl" "${RUN[@]}"

echo "== cell0ctl attest agent1"
"$BIN/cell0ctl" attest agent1

echo "== cell0ctl ps"
"$BIN/cell0ctl" ps

if [ -z "${CELL0_KERNEL:-}" ]; then
  echo "== SYPAS ping over the VM's vsock (sypas-ping; its GOODBYE \"done\" ends the nano guest's serve loop)"
  "$BIN/sypas-ping" --vsock-uds "$DATA/node/vms/agent1/vsock.sock" --port 5000 --count 200
  sleep 0.2
  echo "== cell0ctl ps"
  "$BIN/cell0ctl" ps
else
  echo "== SYPAS ping skipped: it needs a guest that serves SYPAS on vsock port 5000"
fi
echo "== cleaning up"
