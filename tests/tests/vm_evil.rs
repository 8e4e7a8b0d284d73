// SPDX-License-Identifier: Apache-2.0
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
//! The malicious-guest suite (issue 9, item 4): the nano guest's `evil` mode
//! attacks every virtio device of a real VM (virtio-vsock, virtio-blk,
//! virtio-rng). After each attack:
//!
//! - the guest found no device behaviour the virtio spec forbids, and each
//!   device works again after a reset (`evil: NAME done, 0 findings`);
//! - the VMM noticed (its warning for the attack is on stderr), is still
//!   running, answers its API socket, and ends cleanly (exit 0) when stopped;
//! - the host is unharmed: the VMM's fd and thread counts and its RSS, read
//!   from /proc before, during and after the attack, stay within a bound;
//! - a second, honest VM on the same host passes `sypas-echo` meanwhile.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::Stdio;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cell0_tests::{
    ChildGuard, ProcUsage, api_request, launch, proc_usage, require_kvm, start_echo_server, vmm,
    wait_for_path,
};

/// Sectors of the test disk: sector s holds, at byte i, `(i mod 251) ^ s`
/// (the nano guest's payload pattern of call s).
const DISK_SECTORS: usize = 64;
/// How long the guest waits after `armed`, so the baseline is taken first.
const DELAY_MS: u32 = 1500;
/// Bounds on the VMM while it is attacked, over the baseline.
const MAX_EXTRA_FDS: usize = 8;
const MAX_EXTRA_THREADS: usize = 2;
/// The guest has 32 MiB of RAM; the VMM may fault all of it in, not more.
const MAX_EXTRA_RSS_KIB: u64 = 48 * 1024;

fn write_disk(path: &Path) {
    let mut v = Vec::with_capacity(DISK_SECTORS * 512);
    for s in 0..DISK_SECTORS {
        v.extend((0..512).map(|i| ((i % 251) as u8) ^ (s as u8)));
    }
    std::fs::write(path, v).unwrap();
}

/// A VMM whose serial lines arrive on a channel as they are printed.
struct Streamed {
    child: ChildGuard,
    lines: mpsc::Receiver<String>,
    serial: Arc<Mutex<Vec<String>>>,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl Streamed {
    fn spawn(args: &[&str]) -> Streamed {
        let mut child = vmm()
            .arg("launch")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let mut err = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let serial = Arc::new(Mutex::new(Vec::new()));
        let keep = serial.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                keep.lock().unwrap().push(l.clone());
                let _ = tx.send(l);
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        Streamed {
            child: ChildGuard(child),
            lines: rx,
            serial,
            stderr: Some(stderr),
        }
    }

    fn pid(&self) -> u32 {
        self.child.0.id()
    }

    fn serial(&self) -> String {
        self.serial.lock().unwrap().join("\n")
    }

    /// The first line from now on that starts with `prefix`, or a panic
    /// with the serial so far after `timeout`.
    fn wait_line(&self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.starts_with(prefix) => return l,
                Ok(_) => {}
                Err(_) => panic!(
                    "no line starting {prefix:?} within {timeout:?}:\n{}",
                    self.serial()
                ),
            }
        }
    }

    /// Waits for the exit; returns the code and the stderr.
    fn wait(mut self, timeout: Duration) -> (Option<i32>, String) {
        let deadline = Instant::now() + timeout;
        let code = loop {
            if let Some(st) = self.child.0.try_wait().unwrap() {
                break st.code();
            }
            assert!(
                Instant::now() < deadline,
                "the VMM did not exit within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let err = self.stderr.take().unwrap().join().unwrap_or_default();
        (code, err)
    }
}

/// Samples `pid` every few ms until told to stop; the largest values seen.
struct Sampler {
    stop: Arc<std::sync::atomic::AtomicBool>,
    handle: std::thread::JoinHandle<ProcUsage>,
}

impl Sampler {
    fn start(pid: u32, first: ProcUsage) -> Sampler {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut max = first;
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some(u) = proc_usage(pid) {
                    max.fds = max.fds.max(u.fds);
                    max.threads = max.threads.max(u.threads);
                    max.rss_kib = max.rss_kib.max(u.rss_kib);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            max
        });
        Sampler { stop, handle }
    }

    fn stop(self) -> ProcUsage {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.handle.join().unwrap()
    }
}

/// The usage of `pid` once its fds and threads are back at `base` or
/// below, or the last one read after `timeout`.
fn settle(pid: u32, base: ProcUsage, timeout: Duration) -> ProcUsage {
    let deadline = Instant::now() + timeout;
    loop {
        let u = proc_usage(pid).unwrap();
        if (u.fds <= base.fds && u.threads <= base.threads) || Instant::now() >= deadline {
            return u;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An honest VM on the same host: `sypas-echo` against its own echo server.
fn honest_vm_passes() {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("h.sock");
    let _srv = start_echo_server(&dir.path().join("h.sock_1024"));
    let r = launch(&[
        "--vsock-uds",
        uds.to_str().unwrap(),
        "--cid",
        "3",
        "--cmdline",
        "cell0.test=sypas-echo cell0.sizes=0,4096,65536,1048576 cell0.calls=2",
    ]);
    assert_eq!(r.code, Some(0), "the honest VM failed: {r:#?}");
    assert_eq!(
        r.serial.lines().last(),
        Some("cell0-nano: test sypas-echo passed"),
        "{}",
        r.serial
    );
}

/// Runs attack `name` against a VM with virtio-vsock, virtio-blk and
/// virtio-rng, and checks everything the module docs promise; `noticed`
/// are stderr fragments the VMM must have logged.
fn attack(name: &str, noticed: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("e.sock");
    let api = dir.path().join("e.api");
    let disk = dir.path().join("disk.img");
    write_disk(&disk);
    let mut echo = start_echo_server(&dir.path().join("e.sock_1024"));
    let cmdline = format!(
        "cell0.test=evil cell0.attack={name} cell0.evil_hold=1 cell0.evil_delay={DELAY_MS}"
    );
    let vm = Streamed::spawn(&[
        "--vsock-uds",
        uds.to_str().unwrap(),
        "--cid",
        "3",
        "--disk",
        disk.to_str().unwrap(),
        "--rng",
        "--memory-mib",
        "32",
        "--api-sock",
        api.to_str().unwrap(),
        "--cmdline",
        &cmdline,
    ]);
    vm.wait_line(
        "cell0-nano: evil: devices: virtio-vsock at 0xd0000000, virtio-blk at 0xd0001000, virtio-rng at 0xd0002000",
        Duration::from_secs(30),
    );
    vm.wait_line(
        &format!("cell0-nano: evil: armed: {name} in {DELAY_MS} ms"),
        Duration::from_secs(30),
    );
    assert!(wait_for_path(&api, Duration::from_secs(10)));
    let base = proc_usage(vm.pid()).unwrap();
    let sampler = Sampler::start(vm.pid(), base);

    let done = vm.wait_line(
        &format!("cell0-nano: evil: {name} done, "),
        Duration::from_secs(180),
    );
    let peak = sampler.stop();
    let serial = vm.serial();
    assert_eq!(
        done,
        format!("cell0-nano: evil: {name} done, 0 findings"),
        "the guest found device misbehaviour:\n{serial}"
    );
    vm.wait_line(
        "cell0-nano: evil: holding until the host stops the VM",
        Duration::from_secs(10),
    );
    // Every device was attacked and then worked again.
    for dev in ["virtio-vsock", "virtio-blk", "virtio-rng"] {
        assert!(
            serial.contains(&format!(
                "cell0-nano: evil: {name}: {dev}: recovered after a reset: "
            )),
            "{dev} did not recover:\n{serial}"
        );
    }

    // The VMM lives and answers its API; the host is unharmed.
    let mut vm = vm;
    assert!(
        vm.child.0.try_wait().unwrap().is_none(),
        "the VMM died during {name}:\n{serial}"
    );
    // Connections the device reset dropped are closed by the VMM's event
    // thread a moment later: give the counts up to 3 s to come back.
    let after = settle(vm.pid(), base, Duration::from_secs(3));
    let d = api_request(&api, &serde_json::json!({"op": "describe"}));
    assert_eq!(d["ok"], true, "{d}");
    eprintln!("{name}: VMM before {base:?}, peak {peak:?}, after {after:?}");
    assert!(
        peak.fds <= base.fds + MAX_EXTRA_FDS && after.fds <= base.fds,
        "fds grew: before {base:?}, peak {peak:?}, after {after:?}"
    );
    assert!(
        peak.threads <= base.threads + MAX_EXTRA_THREADS && after.threads <= base.threads,
        "threads grew: before {base:?}, peak {peak:?}, after {after:?}"
    );
    assert!(
        peak.rss_kib <= base.rss_kib + MAX_EXTRA_RSS_KIB,
        "RSS grew: before {base:?}, peak {peak:?}, after {after:?}"
    );
    assert!(
        echo.0.try_wait().unwrap().is_none(),
        "the evil VM's host echo server died"
    );

    // Another VM on the same host works while the evil one is still up.
    honest_vm_passes();

    // Stopped through the API, the VMM ends cleanly.
    let st = api_request(&api, &serde_json::json!({"op": "stop"}));
    assert_eq!(st["ok"], true, "{st}");
    let (code, stderr) = vm.wait(Duration::from_secs(30));
    assert_eq!(code, Some(0), "the VMM did not end cleanly:\n{stderr}");
    assert!(!stderr.contains("panicked"), "the VMM panicked:\n{stderr}");
    for n in noticed {
        assert!(
            stderr.contains(n),
            "the VMM did not log {n:?} for {name}:\n{stderr}"
        );
    }
}

#[test]
fn chain_loops() {
    require_kvm!();
    attack(
        "chain-loop",
        &[
            "vsock: TX descriptor chain loops or is too long",
            "virtio-blk: unusable chain: descriptor chain loops or is too long",
            "virtio-rng: chain loops, is too long or holds a device-readable buffer",
        ],
    );
}

#[test]
fn buffers_outside_guest_memory() {
    require_kvm!();
    attack(
        "oob-buffers",
        &[
            "vsock: TX packet dropped, buffer outside guest memory",
            "vsock: unusable RX buffer",
            "virtio-blk: unusable chain: descriptor buffer outside guest memory",
            "virtio-rng: buffer outside guest memory",
        ],
    );
}

#[test]
fn overlapping_buffers() {
    require_kvm!();
    attack(
        "overlapping-buffers",
        &[
            "virtio-rng: the queue is corrupt",
            "virtio device needs a reset",
        ],
    );
}

#[test]
fn queue_sizes_past_max() {
    require_kvm!();
    attack(
        "queue-size",
        &[
            "virtio-mmio: invalid QueueNum value",
            "virtio-mmio: queue 0 is set up outside guest memory or badly",
        ],
    );
}

#[test]
fn rings_at_unaligned_addresses() {
    require_kvm!();
    attack(
        "unaligned-rings",
        &[
            "virtio-mmio: invalid QueueDesc value",
            "virtio-mmio: queue 0 is set up outside guest memory or badly",
        ],
    );
}

#[test]
fn used_ring_in_mmio_space() {
    require_kvm!();
    attack(
        "used-in-mmio",
        &[
            "virtio queue used ring is not accessible: start:0xd0000000",
            "virtio queue used ring is not accessible: start:0xfee00000",
            "virtio-mmio: QueueUsed written in device status 0xf",
        ],
    );
}

#[test]
fn notification_floods() {
    require_kvm!();
    attack(
        "notify-flood",
        &["virtio-mmio: guest notified a queue that does not exist"],
    );
}

#[test]
fn driver_ok_before_features_ok() {
    require_kvm!();
    attack(
        "status-abuse",
        &[
            "virtio-mmio: invalid status transition 0x3 -> 0x7",
            "virtio-mmio: driver features 0x8000000100000000 refused",
        ],
    );
}

#[test]
fn config_space_out_of_range() {
    require_kvm!();
    attack(
        "config-oob",
        &[
            "virtio-mmio: register read that is not 32-bit and aligned",
            "virtio-mmio: guest read a write-only or unknown register",
            "virtio-mmio: config space written in device status 0x0",
        ],
    );
}

#[test]
fn reset_in_the_middle_of_a_transfer() {
    require_kvm!();
    attack("reset-mid-transfer", &[]);
}

#[test]
fn an_unknown_attack_fails_the_guest() {
    require_kvm!();
    let r = launch(&["--rng", "--cmdline", "cell0.test=evil cell0.attack=nope"]);
    assert_ne!(r.code, Some(0), "{r:#?}");
    assert!(
        r.serial.contains(
            "cell0-nano: test evil failed: bad cell0.attack value 'nope': expected one of chain-loop, "
        ),
        "{}",
        r.serial
    );
}
