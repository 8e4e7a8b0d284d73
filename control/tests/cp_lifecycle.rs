// SPDX-License-Identifier: Apache-2.0
//! The VM lifecycle through `cell0ctl` against a real `cell0d serve`, with
//! real nano-guest VMs: one VM, 50 VMs, restart policies, re-adoption after
//! `cell0d` is SIGKILLed, a SIGKILLed `cell0-vmm`, metrics and the audit log.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod cp_harness;

use std::time::{Duration, Instant};

use cp_harness::{Daemon, LONG_RUNNING, proc_alive, procs_with};
use serde_json::Value;

fn state(v: &Value) -> &str {
    v["status"]["state"].as_str().unwrap_or("")
}

#[test]
fn one_vm_full_lifecycle() {
    require_vms!();
    let d = Daemon::start(&[]);
    // A guest that boots, prints ready and resets: run returns once it was ready.
    let out = d.ctl_ok(&["run", "--name", "once"]);
    assert!(out.starts_with("once ready in"), "{out}");
    let v = d.wait_vm("once", "exited", |v| state(v) == "exited");
    assert_eq!(v["status"]["exit_code"], 0);
    assert_eq!(v["status"]["ready"], true);
    assert!(d.ctl_ok(&["logs", "once"]).contains("cell0-nano: ready"));

    // A long-running guest.
    d.ctl_ok(&[
        "run",
        "--name",
        "web",
        "--cmdline",
        LONG_RUNNING,
        "-l",
        "tier=front",
    ]);
    let v = d.get("web");
    assert_eq!(state(&v), "running");
    let pid = v["status"]["pid"].as_i64().unwrap() as i32;
    assert!(proc_alive(pid));
    let run_dir = v["status"]["run_dir"].as_str().unwrap().to_string();
    assert!(std::path::Path::new(&run_dir).join("api.sock").exists());
    // Table, JSON and YAML forms.
    let table = d.ctl_ok(&["ps"]);
    assert!(table.lines().next().unwrap().starts_with("NAME"), "{table}");
    assert!(
        table.contains("web") && table.contains("running"),
        "{table}"
    );
    let yaml = d.ctl_ok(&["get", "web", "-o", "yaml"]);
    assert!(yaml.contains("state: running"), "{yaml}");
    let only_front = d.ctl_ok(&["ps", "-l", "tier=front", "-o", "json"]);
    let only_front: Value = serde_json::from_str(&only_front).unwrap();
    assert_eq!(only_front.as_array().unwrap().len(), 1);

    // Stop: the VMM exits, the record stays.
    d.ctl_ok(&["stop", "web"]);
    d.wait_vm("web", "stopped", |v| state(v) == "stopped");
    assert!(!proc_alive(pid));
    assert_eq!(d.get("web")["desired"], "stopped");

    // Delete both: records gone, run dirs removed.
    d.ctl_ok(&["rm", "web", "once"]);
    let o = d.ctl(&["get", "web"]);
    assert_eq!(
        o.status.code(),
        Some(3),
        "get of a deleted VM exits 3 (not found)"
    );
    let t0 = Instant::now();
    while !d.run_dirs().is_empty() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "run dirs left: {:?}",
            d.run_dirs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(d.ps().is_empty());
}

#[test]
fn fifty_vms_through_cell0ctl() {
    require_vms!();
    let d = Daemon::start(&["--cpu-overcommit", "64"]);
    for i in 0..50 {
        d.ctl_ok(&["run", "--name", &format!("f{i}"), "--cmdline", LONG_RUNNING]);
    }
    let vms = d.ps();
    assert_eq!(vms.len(), 50);
    for v in &vms {
        assert_eq!(state(v), "running", "{v:#}");
        assert_eq!(v["status"]["ready"], true);
    }
    let pids = d.vmm_pids();
    assert_eq!(pids.len(), 50, "one cell0-vmm per VM");
    let names: Vec<String> = (0..50).map(|i| format!("f{i}")).collect();
    let mut args = vec!["rm"];
    args.extend(names.iter().map(String::as_str));
    d.ctl_ok(&args);
    let t0 = Instant::now();
    while !d.run_dirs().is_empty() || pids.iter().any(|p| proc_alive(*p)) {
        assert!(t0.elapsed() < Duration::from_secs(60), "VMs left behind");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(d.ps().is_empty());
}

#[test]
fn restart_policies_follow_the_exit_status() {
    require_vms!();
    let d = Daemon::start(&["--backoff-ms", "20", "--backoff-max-ms", "100"]);
    // cell0.test=panic crashes the guest: cell0-vmm exits 2.
    d.ctl_ok(&[
        "run",
        "--name",
        "crash-never",
        "--cmdline",
        "cell0.test=panic",
        "--no-wait",
    ]);
    d.ctl_ok(&[
        "run",
        "--name",
        "crash-again",
        "--cmdline",
        "cell0.test=panic",
        "--restart",
        "on-failure",
        "--no-wait",
    ]);
    // A clean exit (reset) is not restarted under on-failure, but is under always.
    d.ctl_ok(&[
        "run",
        "--name",
        "clean-onfail",
        "--restart",
        "on-failure",
        "--no-wait",
    ]);
    d.ctl_ok(&[
        "run",
        "--name",
        "clean-always",
        "--restart",
        "always",
        "--no-wait",
    ]);

    let v = d.wait_vm("crash-never", "failed", |v| state(v) == "failed");
    assert_eq!(v["status"]["exit_code"], 2);
    assert_eq!(v["status"]["restarts"], 0);
    // Between two launches (state backoff) the last exit status shows.
    let v = d.wait_vm("crash-again", "restarted 3 times", |v| {
        v["status"]["restarts"].as_u64().unwrap_or(0) >= 3 && state(v) == "backoff"
    });
    assert_eq!(v["status"]["exit_code"], 2, "{v:#}");
    let v = d.wait_vm("clean-onfail", "exited", |v| state(v) == "exited");
    assert_eq!(v["status"]["restarts"], 0);
    d.wait_vm("clean-always", "restarted", |v| {
        v["status"]["restarts"].as_u64().unwrap_or(0) >= 2
    });
    // Stopping ends the restarts.
    d.ctl_ok(&["stop", "crash-again", "clean-always"]);
    d.wait_vm("crash-again", "stopped", |v| state(v) == "stopped");
    let r1 = d.wait_vm("clean-always", "stopped", |v| state(v) == "stopped")["status"]["restarts"]
        .clone();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(d.get("clean-always")["status"]["restarts"], r1);
    assert_eq!(d.get("clean-always")["status"]["state"], "stopped");
}

#[test]
fn sigkilled_cell0d_readopts_running_vms_and_keeps_state() {
    require_vms!();
    let mut d = Daemon::start(&[]);
    d.ctl_ok(&["run", "--name", "keep", "--cmdline", LONG_RUNNING]);
    d.ctl_ok(&["run", "--name", "done"]);
    d.wait_vm("done", "exited", |v| state(v) == "exited");
    let pid = d.get("keep")["status"]["pid"].as_i64().unwrap() as i32;

    d.kill9();
    std::thread::sleep(Duration::from_millis(200));
    assert!(proc_alive(pid), "the VMM outlives cell0d");
    d.spawn();

    let v = d.get("keep");
    assert_eq!(state(&v), "running", "{v:#}");
    assert_eq!(
        v["status"]["pid"].as_i64().unwrap() as i32,
        pid,
        "re-adopted, not relaunched"
    );
    assert_eq!(
        d.get("done")["status"]["state"],
        "exited",
        "a final state survives"
    );
    let needle = d.data().join("node/vms/keep").display().to_string();
    // Jailed, a launch is a supervisor and its VMM (its child): count launches.
    let procs = procs_with(&needle);
    let ppid = |p: i32| {
        let s = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
        s.rsplit_once(')')
            .and_then(|(_, r)| r.split_whitespace().nth(1)?.parse::<i32>().ok())
            .unwrap_or(0)
    };
    let launches = procs.iter().filter(|p| !procs.contains(&ppid(**p)));
    assert_eq!(launches.count(), 1, "not launched twice: {procs:?}");
    assert!(d.log().contains("re-adopted a running cell0-vmm"));

    // The re-adopted VM is still under control: a SIGKILL of it is seen.
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let v = d.wait_vm("keep", "failed", |v| state(v) == "failed");
    assert!(
        v["status"]["message"].as_str().unwrap().contains("killed")
            || v["status"]["exit_code"] == -1,
        "{v:#}"
    );
    d.ctl_ok(&["rm", "keep", "done"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_vmm_is_noticed_at_once() {
    require_vms!();
    let d = Daemon::start(&[]);
    d.ctl_ok(&["run", "--name", "victim", "--cmdline", LONG_RUNNING]);
    let pid = d.get("victim")["status"]["pid"].as_i64().unwrap() as i32;
    let mut c = d.client().await;
    let mut events =
        c.vm.watch(cell0_proto::grpc::WatchRequest {
            id: "victim".into(),
        })
        .await
        .unwrap()
        .into_inner();
    // The first event is the current state.
    let first = tokio_stream::StreamExt::next(&mut events)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.kind, "current");
    let t0 = Instant::now();
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let ev = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let ev = tokio_stream::StreamExt::next(&mut events)
                .await
                .unwrap()
                .unwrap();
            if ev.kind == "state" && cell0_control::ctl::state_name(ev.state) == "failed" {
                return ev;
            }
        }
    })
    .await
    .expect("the kill was noticed");
    println!(
        "a SIGKILLed cell0-vmm was noticed after {:.2} ms: {}",
        t0.elapsed().as_secs_f64() * 1e3,
        ev.message
    );
    assert!(ev.message.contains("killed by signal 9"), "{}", ev.message);
}

#[test]
fn metrics_and_audit_log_record_the_calls() {
    require_vms!();
    let d = Daemon::start(&[]);
    d.ctl_ok(&["run", "--name", "m1", "--cmdline", LONG_RUNNING]);
    let _ = d.ctl(&["run", "--name", "m1"]); // already exists
    d.ctl_ok(&["rm", "m1"]);
    let body = http_get(&d.metrics, "/metrics");
    for m in [
        "cell0_vm_launches_total 1",
        "cell0_vm_launch_latency_seconds_count 1",
        "cell0_raft_commit_latency_seconds_count{op=\"create-vm\"}",
        "cell0_api_requests_total{method=\"Create\",code=\"AlreadyExists\"} 1",
        "cell0_vms{state=",
    ] {
        assert!(body.contains(m), "{m} missing from /metrics:\n{body}");
    }
    let audit = std::fs::read_to_string(d.data().join("audit.log")).unwrap();
    let lines: Vec<Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let methods: Vec<(&str, &str)> = lines
        .iter()
        .map(|l| (l["method"].as_str().unwrap(), l["code"].as_str().unwrap()))
        .collect();
    assert_eq!(
        methods,
        [
            ("Create", "Ok"),
            ("Create", "AlreadyExists"),
            ("Delete", "Ok")
        ],
        "{audit}"
    );
}

fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn nano_agents_reach_the_embedded_router_with_their_minted_token() {
    require_vms!();
    let d = Daemon::start(&[]);
    // The guest's token grants echo: its echo calls go through the router.
    d.ctl_ok(&[
        "run",
        "--name",
        "granted",
        "--right",
        "echo:*",
        "--no-wait",
        "--cmdline",
        "cell0.test=sypas-echo cell0.sizes=0,4096 cell0.calls=2",
    ]);
    // No right: the router refuses the CALL and the guest's self-test fails.
    d.ctl_ok(&[
        "run",
        "--name",
        "denied",
        "--no-wait",
        "--cmdline",
        "cell0.test=sypas-echo cell0.sizes=0 cell0.calls=1",
    ]);
    let v = d.wait_vm("granted", "exited", |v| {
        state(v) == "exited" || state(v) == "failed"
    });
    let serial = d.ctl_ok(&["logs", "granted"]);
    assert_eq!(state(&v), "exited", "{serial}");
    assert!(
        serial.contains("cell0-nano: test sypas-echo passed"),
        "{serial}"
    );
    d.wait_vm("denied", "failed", |v| state(v) == "failed");
    let serial = d.ctl_ok(&["logs", "denied"]);
    assert!(serial.contains("PERMISSION_DENIED"), "{serial}");
    let refusals = std::fs::read_to_string(d.data().join("router-audit.log")).unwrap();
    assert!(
        refusals.contains("\"vm\":\"denied\"") && refusals.contains("PERMISSION_DENIED"),
        "{refusals}"
    );
}

#[test]
fn a_routed_vm_gets_its_shared_memory_window_at_hello() {
    require_vms!();
    let d = Daemon::start(&[]);
    // The router listens before the VMM runs, so it takes the window from the
    // VMM's API socket at the guest's HELLO: shm refs of 1 and 64 MiB are
    // echoed and checked byte for byte, and a ref past the end is refused.
    d.ctl_ok(&[
        "run",
        "--name",
        "shm",
        "--right",
        "echo:*",
        "--shm-mib",
        "128",
        "--no-wait",
        "--cmdline",
        "cell0.test=sypas-shm",
    ]);
    let v = d.wait_vm("shm", "exited", |v| {
        state(v) == "exited" || state(v) == "failed"
    });
    let serial = d.ctl_ok(&["logs", "shm"]);
    assert_eq!(state(&v), "exited", "{serial}");
    assert!(
        serial.contains("cell0-nano: test sypas-shm passed"),
        "{serial}"
    );
    assert!(
        serial.contains("64 MiB")
            || serial.contains("67108864 bytes: echo returned the ref unchanged"),
        "{serial}"
    );
    assert!(
        serial.contains("refused with SHM_OUT_OF_BOUNDS"),
        "{serial}"
    );
}
