#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Runs cell0-vmm through every feature under `strace -f` and prints, per thread
# kind (vmm, vcpu, api, vtpm), the syscalls it made after the point where its
# seccomp filter is installed. Compare the output with vmm/src/seccomp/*.json
# when a device or feature is added (docs/SECURITY.md, "Seccomp").
#
#   scripts/seccomp-audit.sh [path/to/cell0-vmm]      # needs strace, /dev/kvm
#
# Set CELL0_TPM_CA_DIR to a scratch directory to include the --tpm scenario
# (needs swtpm). Filters are turned off (--no-seccomp) so that a syscall
# missing from a list shows up here instead of killing the run.
set -euo pipefail
V=${1:-target/debug/cell0-vmm}
ECHO=$(dirname "$V")/sypas-echo-server
PING=$(dirname "$V")/sypas-ping
W=$(mktemp -d /tmp/seccomp-audit.XXXX)
trap 'rm -rf "$W"' EXIT
mkdir -p "$W/s" "$W/t"

trace() { # name, launch args...
  local name=$1; shift
  mkdir -p "$W/t/$name"
  strace -f -ff -qq -o "$W/t/$name/t" "$V" launch --no-seccomp "$@" >"$W/t/$name/out" 2>&1 || true
  echo "scenario $name: $(tail -1 "$W/t/$name/out")" >&2
}

trace default
for t in serial irq serial-irq panic rust-panic; do trace "$t" --cmdline "cell0.test=$t"; done
trace smp --vcpus 4 --cmdline cell0.test=smp
trace shm --shm-mib 16
trace rng --rng --cmdline cell0.test=serial
truncate -s 1M "$W/s/disk.img"
trace disk --disk "$W/s/disk.img" --cmdline cell0.test=serial
trace serial-file --serial "$W/s/serial.txt" --cmdline cell0.test=serial
if [ -x "$ECHO" ]; then
  "$ECHO" --socket "$W/s/v.sock_1024" >/dev/null & echo_pid=$!
  sleep 0.5
  trace sypas-echo --vsock-uds "$W/s/v.sock" --cid 3 --memory-mib 256 \
    --cmdline "cell0.test=sypas-echo cell0.sizes=0,1,4096,65536,1048576 cell0.calls=4"
  trace vsock-flood --vsock-uds "$W/s/v.sock" --cid 3 --memory-mib 256 \
    --cmdline "cell0.test=vsock-flood cell0.conns=64 cell0.calls=4 cell0.size=65536"
  kill "$echo_pid"
fi
serve() { # name, extra args
  local name=$1; shift
  rm -f "$W/s/api.sock" "$W/s/v.sock"
  mkdir -p "$W/t/$name"
  strace -f -ff -qq -o "$W/t/$name/t" "$V" launch --no-seccomp "$@" --vsock-uds "$W/s/v.sock" --cid 3 \
    --memory-mib 256 --shm-mib 8 --api-sock "$W/s/api.sock" \
    --cmdline "cell0.test=sypas-serve cell0.port=5000" >"$W/t/$name/out" 2>&1 &
  local vm=$!
  for _ in $(seq 150); do [ -S "$W/s/api.sock" ] && grep -q "listening on port 5000" "$W/t/$name/out" && break; sleep 0.2; done
  python3 - "$W/s/api.sock" <<'PY'
import socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); f = s.makefile("rw")
for r in ['{"op":"describe"}', 'junk', '{"op":"ak"}', '{"op":"event_log"}',
          '{"op":"quote","nonce":"' + "ab" * 32 + '"}']:
    f.write(r + "\n"); f.flush(); f.readline()
s.sendall(b'{"op":"shm"}\n'); s.recvmsg(4096, socket.CMSG_LEN(4))
PY
  [ -x "$PING" ] && timeout 30 "$PING" --vsock-uds "$W/s/v.sock" --port 5000 -c 50 >/dev/null 2>&1 || true
  wait "$vm" || true
  echo "scenario $name: $(tail -1 "$W/t/$name/out")" >&2
}
serve api
if [ -n "${CELL0_TPM_CA_DIR:-}" ]; then mkdir -p "$W/rd"; serve tpm --tpm --run-dir "$W/rd"; fi

python3 - "$W/t" <<'PY'
import collections, glob, os, re, sys
# Per thread kind, the syscalls made after its filter would be installed.
root = sys.argv[1]
seen = collections.defaultdict(lambda: collections.defaultdict(set))
call = re.compile(r'^(\w+)\(')
for scen in sorted(os.listdir(root)):
    files = sorted(glob.glob(f'{root}/{scen}/t.*'), key=lambda p: int(p.rsplit('.', 1)[1]))
    if not files:
        continue
    pid = files[0].rsplit('.', 1)[1]
    for f in files:
        lines = open(f).read().splitlines()
        text = '\n'.join(lines)
        tid = f.rsplit('.', 1)[1]
        start = 0
        if 'execve(' in text and tid != pid:
            continue                      # swtpm, swtpm_setup: not cell0-vmm
        if tid == pid:
            kind = 'vmm'                  # filter goes in after the last thread is spawned
            idx = [i for i, l in enumerate(lines) if l.startswith(('clone3(', 'clone('))]
            start = idx[-1] + 1 if idx else 0
        elif 'KVM_RUN' in text:
            kind = 'vcpu'                 # filter goes in before the first KVM_RUN
            start = next(i for i, l in enumerate(lines) if 'KVM_RUN' in l)
        elif re.search(r'^accept4?\(', text, re.M):
            kind = 'api'
        elif 'AF_INET' in text:
            kind = 'vtpm'                 # includes start-up: an over-approximation
        else:
            continue                      # short-lived start-up threads
        for l in lines[start:]:
            m = call.match(l)
            if m:
                seen[kind][m.group(1)].add(scen)
for kind in ('vmm', 'vcpu', 'api', 'vtpm'):
    print(f'[{kind}]')
    for sc in sorted(seen[kind]):
        print(f'  {sc:20} {",".join(sorted(seen[kind][sc]))}')
PY
