#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# The main command: start `cell0d serve` on a temporary data dir, run an agent
# micro-VM through it (the built-in nano guest, or the Linux agent image given
# by CELL0_KERNEL and CELL0_INITRD), attest it and print the verdict, SYPAS-ping
# it and print the latency, show `cell0ctl ps`, and clean up everything it
# started (cell0d, cell0-vmm, swtpm, the temporary directory).
#
#   scripts/demo.sh                          # installs Debian packages, builds release binaries
#   CELL0_BIN=target/debug scripts/demo.sh   # use binaries built already
#   CELL0_KERNEL=/srv/img/vmlinuz CELL0_INITRD=/srv/img/initrd.img scripts/demo.sh
#
# The same flow without cell0d (cell0-vmm driven directly): target/release/cell0-demo.
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

# Short: the VM sockets live under it and Unix socket paths are limited.
WORK="$(mktemp -d /tmp/c0demo.XXXXXX)"
DATA="$WORK/d"
CELL0D_PID=""
cleanup() {
  set +e
  if [ -n "${CELL0_ENDPOINT:-}" ]; then
    "$BIN/cell0ctl" rm agent1 >/dev/null 2>&1
    # The node agent stops the VMM and removes its run dir.
    for _ in $(seq 80); do [ -d "$DATA/node/vms/agent1" ] || break; sleep 0.1; done
  fi
  if [ -n "$CELL0D_PID" ]; then
    kill "$CELL0D_PID" 2>/dev/null
    wait "$CELL0D_PID" 2>/dev/null
  fi
  # Whatever still runs from this demo's directory (a VMM or swtpm left by a
  # failure above) is ended by its pid.
  for p in /proc/[0-9]*; do
    if tr '\0' ' ' <"$p/cmdline" 2>/dev/null | grep -qF "$WORK"; then
      kill -9 "${p#/proc/}" 2>/dev/null
    fi
  done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

SERVE=(serve --data-dir "$DATA" --listen 127.0.0.1:0 --metrics 127.0.0.1:0 --vmm "$BIN/cell0-vmm")
if [ "$(id -u)" != 0 ]; then
  # Jailing a VMM (its own uid, namespaces, cgroup) needs a root cell0d.
  echo "== not root: VMMs run without the jail (--no-jail); seccomp stays on"
  SERVE+=(--no-jail)
fi
echo "== cell0d serve --data-dir $DATA"
RUST_LOG=warn "$BIN/cell0d" "${SERVE[@]}" 2>"$WORK/cell0d.log" &
CELL0D_PID=$!
for _ in $(seq 300); do [ -s "$DATA/cell0d.addr" ] && break; sleep 0.1; done
[ -s "$DATA/cell0d.addr" ] || { echo "demo: cell0d did not start:"; cat "$WORK/cell0d.log"; exit 1; }
CELL0_ENDPOINT="$(sed -e 's/.*"grpc":"\([^"]*\)".*/\1/' "$DATA/cell0d.addr")"
METRICS="$(sed -e 's/.*"metrics":"\([^"]*\)".*/\1/' "$DATA/cell0d.addr")"
export CELL0_ENDPOINT
echo "   gRPC $CELL0_ENDPOINT, metrics http://$METRICS/metrics"

RUN=(run --name agent1 --tpm)
if [ -n "${CELL0_KERNEL:-}" ]; then
  echo "== cell0ctl run (Linux agent image $CELL0_KERNEL)"
  RUN+=(--kernel "$CELL0_KERNEL" --memory-mib 256)
  if [ -n "${CELL0_INITRD:-}" ]; then RUN+=(--initrd "$CELL0_INITRD"); fi
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
  echo "== SYPAS ping over the VM's vsock (200 round trips; the GOODBYE at the end stops the nano guest's serve loop)"
  "$BIN/sypas-ping" --vsock-uds "$DATA/node/vms/agent1/vsock.sock" --port 5000 --count 200
  sleep 0.2
else
  echo "== cell0ctl exec agent1 -- uname -a (SYPAS to the guest agent, through the router)"
  # Exit 11 until the agent has bootstrapped and connected.
  for i in $(seq 60); do
    rc=0; "$BIN/cell0ctl" exec agent1 -- uname -a || rc=$?
    [ "$rc" = 11 ] && [ "$i" != 60 ] || break
    sleep 0.5
  done
  [ "$rc" = 0 ] || exit "$rc"
fi
echo "== cell0ctl ps"
"$BIN/cell0ctl" ps
echo "== cleaning up"
