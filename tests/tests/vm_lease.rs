// SPDX-License-Identifier: Apache-2.0
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
//! The VM's lease (`cell0-vmm launch --lease-ms`): a real nano VM (sypas-serve,
//! which runs until stopped) is fenced when nobody renews its lease, lives on
//! while renewals come over its API socket, and refuses bad renewals with a
//! typed error that changes nothing. With `--tpm`, the lease is renewable
//! while the VMM sets up its vTPM (the API socket is served from early in
//! the build), and an unrenewed one fences the VM before its guest runs.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cell0_tests::{BgVm, ChildGuard, api_request, require_kvm, wait_for_path};
use serde_json::{Value, json};

/// `cell0-vmm`'s exit status when its lease ended (docs: vmm/src/lease.rs).
const EXIT_LEASE_EXPIRED: i32 = 3;

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(r, 0);
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

struct LeasedVm {
    vm: BgVm,
    api: PathBuf,
    spawned: Instant,
    _dir: tempfile::TempDir,
}

/// A serving nano VM with its API socket, and `--lease-ms` when given.
fn start(lease_ms: Option<u64>) -> LeasedVm {
    let dir = tempfile::tempdir().unwrap();
    let api = dir.path().join("api.sock");
    let uds = dir.path().join("v.sock");
    let lease = lease_ms.map(|m| m.to_string());
    let mut args = vec![
        "--vsock-uds",
        uds.to_str().unwrap(),
        "--cid",
        "3",
        "--cmdline",
        "cell0.test=sypas-serve cell0.port=5000",
        "--api-sock",
        api.to_str().unwrap(),
    ];
    if let Some(l) = &lease {
        args.extend(["--lease-ms", l.as_str()]);
    }
    let spawned = Instant::now();
    let vm = BgVm::spawn(&args);
    assert!(
        wait_for_path(&api, Duration::from_secs(20)),
        "the VMM never opened its API socket"
    );
    LeasedVm {
        vm,
        api,
        spawned,
        _dir: dir,
    }
}

fn lease(api: &std::path::Path, deadline_ns: Value) -> Value {
    api_request(api, &json!({"op": "lease", "deadline_ns": deadline_ns}))
}

#[test]
fn an_unrenewed_lease_fences_the_vm_with_its_own_exit_status() {
    require_kvm!();
    let v = start(Some(800));
    let d = api_request(&v.api, &json!({"op": "describe"}));
    assert_eq!(d["vm"]["lease_ms"], 800, "{d}");
    let spawned = v.spawned;
    let r = v.vm.wait(Duration::from_secs(60));
    let lived = spawned.elapsed();
    assert_eq!(r.code, Some(EXIT_LEASE_EXPIRED), "{r:#?}");
    assert!(r.stderr.contains("lease expired: fenced"), "{}", r.stderr);
    assert!(
        r.serial.contains("sypas-serve: listening"),
        "the guest ran: {}",
        r.serial
    );
    // The lease counts from the VMM's start, after the spawn: it cannot end sooner.
    assert!(lived >= Duration::from_millis(800), "ended after {lived:?}");
    println!(
        "lease 800 ms, not renewed: the VMM exited {} ms after its spawn",
        lived.as_millis()
    );
}

#[test]
fn renewals_keep_the_vm_alive_past_several_lease_periods() {
    require_kvm!();
    const LEASE_MS: u64 = 1_500;
    let mut v = start(Some(LEASE_MS));
    let t0 = Instant::now();
    let mut renewals = 0;
    // Four lease periods, renewed every 100 ms for a lease from now.
    while t0.elapsed() < Duration::from_millis(4 * LEASE_MS) {
        let deadline = monotonic_ns() + LEASE_MS * 1_000_000;
        let r = lease(&v.api, json!(deadline));
        assert_eq!(r["ok"], true, "{r}");
        assert_eq!(r["renewal"], "extended", "{r}");
        assert_eq!(r["deadline_ns"], deadline, "{r}");
        renewals += 1;
        assert!(v.vm.running(), "the VMM ended although renewed");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(v.vm.running());
    // A deadline earlier than the current one changes nothing.
    let current = lease(&v.api, json!(monotonic_ns() + LEASE_MS * 1_000_000))["deadline_ns"]
        .as_u64()
        .unwrap();
    let r = lease(&v.api, json!(monotonic_ns() + 700_000_000));
    assert_eq!(r["renewal"], "unchanged", "{r}");
    assert_eq!(r["deadline_ns"], current, "{r}");
    // Renewals stop: the lease ends and the VM with it.
    let kept = t0.elapsed();
    let r = v.vm.wait(Duration::from_secs(60));
    assert_eq!(r.code, Some(EXIT_LEASE_EXPIRED), "{r:#?}");
    assert!(r.stderr.contains("lease expired: fenced"), "{}", r.stderr);
    println!(
        "{renewals} renewals kept a {LEASE_MS} ms lease for {} ms; then it ended",
        kept.as_millis()
    );
}

#[test]
fn bad_lease_requests_get_typed_errors_and_change_nothing() {
    require_kvm!();
    let mut v = start(Some(120_000));
    // A deadline in the future but before the current one: unchanged; tells the deadline.
    // (10 s ahead: well after the request arrives, well before the 120 s lease ends.)
    let before = lease(&v.api, json!(monotonic_ns() + 10_000_000_000));
    assert_eq!(before["renewal"], "unchanged", "{before}");
    let deadline = before["deadline_ns"].as_u64().unwrap();
    let far = monotonic_ns() + 2 * 3_600_000 * 1_000_000;
    for (req, code) in [
        (json!({"op": "lease"}), "bad_request"),
        (json!({"op": "lease", "deadline_ns": -1}), "bad_request"),
        (json!({"op": "lease", "deadline_ns": 1.5e18}), "bad_request"),
        (json!({"op": "lease", "deadline_ns": "soon"}), "bad_request"),
        (json!({"op": "lease", "deadline_ns": null}), "bad_request"),
        (json!({"op": "lease", "deadline_ns": far}), "out_of_range"),
    ] {
        let r = api_request(&v.api, &req);
        assert_eq!(r["ok"], false, "{req}: {r}");
        assert_eq!(r["error"]["code"], code, "{req}: {r}");
        assert!(
            !r["error"]["message"].as_str().unwrap().is_empty(),
            "{req}: {r}"
        );
    }
    let after = lease(&v.api, json!(monotonic_ns() + 10_000_000_000));
    assert_eq!(after["deadline_ns"], deadline, "{after}");
    assert!(v.vm.running(), "a bad request ended the VM");

    // A deadline that has passed revokes the lease: the VM ends at once.
    let r = lease(&v.api, json!(1));
    assert_eq!(r["renewal"], "revoked", "{r}");
    let r = v.vm.wait(Duration::from_secs(30));
    assert_eq!(r.code, Some(EXIT_LEASE_EXPIRED), "{r:#?}");
    assert!(r.stderr.contains("lease expired: fenced"), "{}", r.stderr);
}

#[test]
fn without_lease_ms_there_is_no_lease_and_nothing_changes() {
    require_kvm!();
    let mut v = start(None);
    let r = lease(&v.api, json!(1));
    assert_eq!(r["error"]["code"], "no_lease", "{r}");
    let d = api_request(&v.api, &json!({"op": "describe"}));
    assert_eq!(d["vm"]["lease_ms"], Value::Null, "{d}");
    assert!(v.vm.running(), "a lease op ended an unleased VM");
    assert_eq!(api_request(&v.api, &json!({"op": "stop"}))["ok"], true);
    let r = v.vm.wait(Duration::from_secs(30));
    assert_eq!(r.code, Some(0), "{r:#?}");
}

#[test]
fn a_lease_out_of_range_is_a_clean_error() {
    for bad in ["0", "3600001"] {
        let r = cell0_tests::launch(&["--lease-ms", bad]);
        cell0_tests::assert_clean_error(&r, "--lease-ms must be between 1 and 3600000");
    }
    let r = cell0_tests::launch(&["--lease-ms", "soon"]);
    assert_eq!(r.code, Some(1), "{r:#?}");
    assert!(r.stderr.contains("--lease-ms"), "{}", r.stderr);
}

/// One request, or `None` when the VMM does not answer (gone, or not yet listening).
fn try_request(api: &std::path::Path, req: &Value) -> Option<Value> {
    use std::io::{BufRead, Write};
    let s = std::os::unix::net::UnixStream::connect(api).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    writeln!(&s, "{req}").ok()?;
    let mut l = String::new();
    std::io::BufReader::new(s).read_line(&mut l).ok()?;
    serde_json::from_str(&l).ok()
}

/// A serving nano VM with `--tpm` (its own CA in `dir`) and `--lease-ms`; its
/// serial output and stderr go to files in `dir`.
fn start_tpm(dir: &std::path::Path, lease_ms: u64) -> (ChildGuard, PathBuf) {
    let api = dir.join("api.sock");
    let out = |name: &str| std::fs::File::create(dir.join(name)).unwrap();
    let child = cell0_tests::vmm()
        .env("CELL0_TPM_CA_DIR", dir.join("ca"))
        .arg("launch")
        .args(["--cmdline", "cell0.test=sypas-serve cell0.port=5000"])
        .arg("--vsock-uds")
        .arg(dir.join("v.sock"))
        .args(["--cid", "3", "--tpm", "--run-dir"])
        .arg(dir.join("run"))
        .arg("--api-sock")
        .arg(&api)
        .args(["--lease-ms", &lease_ms.to_string()])
        .stdin(std::process::Stdio::null())
        .stdout(out("serial.log"))
        .stderr(out("stderr.log"))
        .spawn()
        .unwrap();
    (ChildGuard(child), api)
}

/// Waits for the VMM to exit; its status code.
fn wait_exit(child: &mut ChildGuard, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.0.try_wait().unwrap() {
            return st.code();
        }
        assert!(Instant::now() < deadline, "the VMM did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_tpm_vm_renewed_from_the_moment_its_socket_appears_comes_up_and_quotes() {
    require_kvm!();
    if cell0_tests::swtpm_missing() {
        return;
    }
    const LEASE_MS: u64 = 1_500;
    let dir = tempfile::tempdir().unwrap();
    let (mut child, api) = start_tpm(dir.path(), LEASE_MS);
    assert!(
        wait_for_path(&api, Duration::from_secs(60)),
        "the VMM never opened its API socket"
    );
    let t0 = Instant::now();
    // The node agent's part: renew every 300 ms for a lease from now, from the
    // moment the socket exists (the VMM is still setting up its vTPM then).
    let done = Arc::new(AtomicBool::new(false));
    let renewer = {
        let (api, done) = (api.clone(), done.clone());
        std::thread::spawn(move || {
            let (mut renewed, mut while_starting) = (0, 0);
            while !done.load(Ordering::SeqCst) {
                let state = try_request(&api, &json!({"op": "describe"}))
                    .map(|d| d["state"].as_str().unwrap_or("").to_string());
                let deadline = monotonic_ns() + LEASE_MS * 1_000_000;
                if let Some(r) = try_request(&api, &json!({"op": "lease", "deadline_ns": deadline}))
                {
                    assert_eq!(r["ok"], true, "{r}");
                    assert_eq!(r["renewal"], "extended", "{r}");
                    renewed += 1;
                    if state.as_deref() == Some("starting") {
                        while_starting += 1;
                    }
                }
                std::thread::sleep(Duration::from_millis(300));
            }
            (renewed, while_starting)
        })
    };
    // The attester's part: ask for a quote until the VM is built.
    let nonce = "ab".repeat(32);
    let mut starting = 0;
    let q = loop {
        match try_request(&api, &json!({"op": "quote", "nonce": nonce})) {
            Some(r) if r["error"]["code"] == "starting" => {
                assert!(
                    r["error"]["message"]
                        .as_str()
                        .unwrap()
                        .contains("still being set up"),
                    "{r}"
                );
                starting += 1;
            }
            Some(r) => break r,
            None => {}
        }
        assert!(
            child.0.try_wait().unwrap().is_none(),
            "the VMM ended before it served a quote: {}",
            std::fs::read_to_string(dir.path().join("stderr.log")).unwrap()
        );
        assert!(t0.elapsed() < Duration::from_secs(120), "no quote");
        std::thread::sleep(Duration::from_millis(50));
    };
    let up = t0.elapsed();
    assert_eq!(q["ok"], true, "{q}");
    assert!(q["quote"].is_object(), "{q}");
    assert!(!q["event_log"].as_str().unwrap().is_empty(), "{q}");
    let d = api_request(&api, &json!({"op": "describe"}));
    assert_eq!(d["state"], "running", "{d}");
    // The guest runs, past several lease periods while renewed.
    let serial = dir.path().join("serial.log");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&serial)
        .unwrap()
        .contains(cell0_tests::SERVE_LISTENING)
    {
        assert!(Instant::now() < deadline, "the guest never ran");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(2 * LEASE_MS));
    assert!(
        child.0.try_wait().unwrap().is_none(),
        "fenced although renewed"
    );
    done.store(true, Ordering::SeqCst);
    let (renewed, while_starting) = renewer.join().unwrap();
    assert!(
        while_starting >= 1,
        "no renewal was served while the VM was being set up ({renewed} renewals)"
    );
    assert_eq!(api_request(&api, &json!({"op": "stop"}))["ok"], true);
    assert_eq!(wait_exit(&mut child, Duration::from_secs(30)), Some(0));
    println!(
        "--tpm --lease-ms {LEASE_MS}: {while_starting} of {renewed} renewals served while the vTPM was set up; \
         {starting} quote requests answered `starting`; quote served {} ms after the socket appeared",
        up.as_millis()
    );
}

#[test]
fn a_tpm_vm_whose_lease_is_not_renewed_is_fenced_during_its_setup_before_its_guest_runs() {
    require_kvm!();
    if cell0_tests::swtpm_missing() {
        return;
    }
    // 500 ms: well short of swtpm's start plus the measured boot (over 2 s
    // for the debug build here), so the lease ends while the VM is being set up.
    let dir = tempfile::tempdir().unwrap();
    let (mut child, api) = start_tpm(dir.path(), 500);
    let mut saw_starting = false;
    let code = loop {
        if let Some(st) = child.0.try_wait().unwrap() {
            break st.code();
        }
        if let Some(d) = try_request(&api, &json!({"op": "describe"})) {
            assert_eq!(d["state"], "starting", "the VM came up unrenewed: {d}");
            saw_starting = true;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stderr = std::fs::read_to_string(dir.path().join("stderr.log")).unwrap();
    let serial = std::fs::read_to_string(dir.path().join("serial.log")).unwrap();
    assert_eq!(code, Some(EXIT_LEASE_EXPIRED), "{stderr}");
    assert!(stderr.contains("lease expired: fenced"), "{stderr}");
    assert!(serial.is_empty(), "the guest ran: {serial}");
    // No swtpm outlives the fenced VMM.
    let needle = dir.path().join("run").display().to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cell0_tests::swtpm_pids_with(&needle).is_empty() {
        assert!(Instant::now() < deadline, "swtpm outlived the fenced VMM");
        std::thread::sleep(Duration::from_millis(20));
    }
    println!(
        "--tpm --lease-ms 500, not renewed: fenced during the setup (describe seen `starting`: {saw_starting})"
    );
}

#[test]
fn a_stop_while_the_vtpm_is_set_up_ends_the_vmm_before_its_guest_runs() {
    require_kvm!();
    if cell0_tests::swtpm_missing() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (mut child, api) = start_tpm(dir.path(), 120_000);
    assert!(
        wait_for_path(&api, Duration::from_secs(60)),
        "the VMM never opened its API socket"
    );
    // Stop it as soon as it answers, while it says it is still being set up.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(d) = try_request(&api, &json!({"op": "describe"})) {
            assert_eq!(d["state"], "starting", "the VM came up first: {d}");
            break;
        }
        assert!(Instant::now() < deadline, "the VMM never answered");
        std::thread::sleep(Duration::from_millis(5));
    }
    let r = try_request(&api, &json!({"op": "stop"})).unwrap();
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(wait_exit(&mut child, Duration::from_secs(60)), Some(0));
    let serial = std::fs::read_to_string(dir.path().join("serial.log")).unwrap();
    assert!(serial.is_empty(), "the guest ran: {serial}");
    assert!(!api.exists(), "the socket path is removed");
}
