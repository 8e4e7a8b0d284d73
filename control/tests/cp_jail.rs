// SPDX-License-Identifier: Apache-2.0
#![allow(clippy::unwrap_used, clippy::print_stdout)]
//! VMs that a real `cell0d serve` launches are jailed by default: the VMM runs
//! as the unprivileged `--vm-uid`/`--vm-gid` with no capabilities, no_new_privs
//! and a seccomp filter on every thread, in its own mount, PID, network, IPC and
//! UTS namespaces and cgroup; stop, re-adoption after a cell0d SIGKILL and
//! delete work and leave neither the cgroup nor the jail directory behind.
//! `--no-jail` turns it off with a warning; uid 0 is refused.

mod cp_harness;

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cp_harness::{Daemon, LONG_RUNNING, proc_alive};
use serde_json::Value;

fn state(v: &Value) -> &str {
    v["status"]["state"].as_str().unwrap_or("")
}

/// `Key:\tvalue` lines of `/proc/<pid>/status` (or of a thread's).
fn status(path: &str) -> BTreeMap<String, String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

/// The one child of the jail's supervisor: the VMM (PID 1 of its namespace).
fn vmm_of(supervisor: i32) -> i32 {
    let t0 = Instant::now();
    loop {
        let c = std::fs::read_to_string(format!("/proc/{supervisor}/task/{supervisor}/children"))
            .unwrap_or_default();
        let kids: Vec<i32> = c.split_whitespace().map(|p| p.parse().unwrap()).collect();
        if kids.len() == 1 {
            return kids[0];
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the supervisor {supervisor} has children {kids:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn ns(pid: i32, kind: &str) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).unwrap()
}

/// The VM's cgroup directories, from the VMM's `/proc/<pid>/cgroup` (v1 and v2).
fn cgroup_dirs(vmm: i32) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for l in std::fs::read_to_string(format!("/proc/{vmm}/cgroup"))
        .unwrap()
        .lines()
    {
        let mut f = l.splitn(3, ':');
        let (_, ctrls, path) = (f.next(), f.next().unwrap(), f.next().unwrap());
        if !path.contains("/cell0-") {
            continue;
        }
        let rel = path.trim_start_matches('/');
        let mounts: Vec<PathBuf> = if ctrls.is_empty() {
            vec!["/sys/fs/cgroup/unified".into(), "/sys/fs/cgroup".into()]
        } else {
            vec![Path::new("/sys/fs/cgroup").join(ctrls)]
        };
        out.extend(
            mounts
                .into_iter()
                .map(|m| m.join(rel))
                .filter(|d| d.is_dir()),
        );
    }
    out
}

/// Checks from outside that `supervisor`'s VMM is jailed; returns the VMM's pid.
fn assert_jailed(d: &Daemon, supervisor: i32, uid: u32) -> i32 {
    let cell0d = d.child.as_ref().unwrap().id() as i32;
    assert_eq!(
        std::fs::read_to_string(format!("/proc/{supervisor}/comm"))
            .unwrap()
            .trim(),
        "cell0-vmm"
    );
    let vmm = vmm_of(supervisor);
    let st = status(&format!("/proc/{vmm}/status"));
    let ids = format!("{uid}\t{uid}\t{uid}\t{uid}");
    assert_eq!(st["Uid"], ids, "{st:?}");
    assert_eq!(st["Gid"], ids, "{st:?}");
    assert_eq!(st["NoNewPrivs"], "1");
    for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(st[cap], "0000000000000000", "{cap}");
    }
    // PID 1 of its own PID namespace.
    assert_eq!(st["NSpid"].split_whitespace().last(), Some("1"), "{st:?}");
    // Every thread (VMM, API, vCPUs) under its seccomp filter.
    let t0 = Instant::now();
    loop {
        let threads: Vec<_> = std::fs::read_dir(format!("/proc/{vmm}/task"))
            .unwrap()
            .flatten()
            .map(|t| status(&format!("{}/status", t.path().display())))
            .collect();
        let names: Vec<&str> = threads.iter().map(|t| t["Name"].as_str()).collect();
        if names.contains(&"vcpu0") && names.contains(&"api") {
            for t in &threads {
                assert_eq!(t["Seccomp"], "2", "thread {} is not filtered", t["Name"]);
            }
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "threads {names:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    for kind in ["mnt", "pid", "net", "ipc", "uts"] {
        assert_ne!(ns(vmm, kind), ns(cell0d, kind), "{kind} namespace shared");
    }
    assert!(
        !cgroup_dirs(vmm).is_empty(),
        "the VMM is in no cell0 cgroup"
    );
    vmm
}

#[test]
fn cell0d_launches_every_vm_jailed_by_default() {
    require_vms!();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP: cell0d can only jail VMs as root");
        return;
    }
    let mut d = Daemon::start(&["--health-ms", "200"]);
    d.ctl_ok(&["run", "--name", "j1", "--cmdline", LONG_RUNNING]);
    let v = d.get("j1");
    assert_eq!(state(&v), "running");
    let supervisor = v["status"]["pid"].as_i64().unwrap() as i32;
    let vmm = assert_jailed(&d, supervisor, 65534);
    let cgroups = cgroup_dirs(vmm);
    for c in &cgroups {
        assert!(c.is_dir(), "{}", c.display());
    }

    // The run dir: group-writable by the VM's gid, sticky; the VMM's files are its own.
    let run_dir = PathBuf::from(v["status"]["run_dir"].as_str().unwrap());
    let id = run_dir.file_name().unwrap().to_str().unwrap().to_string();
    let m = std::fs::metadata(&run_dir).unwrap();
    assert_eq!((m.uid(), m.gid()), (0, 65534));
    assert_eq!(m.permissions().mode() & 0o7777, 0o1770);
    for f in ["serial.log", "api.sock", "vsock.sock"] {
        let m = std::fs::metadata(run_dir.join(f)).unwrap();
        assert_eq!(m.uid(), 65534, "{f}");
    }
    let state_json = std::fs::metadata(run_dir.join("state.json")).unwrap();
    assert_eq!(state_json.uid(), 0);
    assert!(run_dir.join("jail").join(&id).is_dir());

    // Everything cell0d does through the run dir still works: the guest's
    // health over the hybrid vsock and its logs.
    let v = d.wait_vm("j1", "healthy over SYPAS", |v| {
        v["status"]["health"]
            .as_str()
            .is_some_and(|h| h.starts_with("sypas-ping ok"))
    });
    assert_eq!(state(&v), "running");
    assert!(d.ctl_ok(&["logs", "j1"]).contains("cell0-nano: ready"));

    // A cell0d SIGKILL: the VM keeps running and is re-adopted, still jailed.
    d.kill9();
    assert!(proc_alive(supervisor) && proc_alive(vmm));
    d.spawn();
    let v = d.wait_vm("j1", "re-adopted", |v| state(v) == "running");
    assert_eq!(v["status"]["pid"].as_i64().unwrap() as i32, supervisor);
    assert_eq!(assert_jailed(&d, supervisor, 65534), vmm);

    // Stop: the supervisor removes the cgroup and the jail directory.
    d.ctl_ok(&["stop", "j1"]);
    d.wait_vm("j1", "stopped", |v| state(v) == "stopped");
    wait_gone(supervisor, vmm, &cgroups);
    assert!(!run_dir.join("jail").join(&id).exists());

    d.ctl_ok(&["rm", "j1"]);

    // Delete while it runs: the run dir (with files owned by the VM's uid)
    // goes, and so do the cgroup and the processes.
    d.ctl_ok(&["run", "--name", "j2", "--cmdline", LONG_RUNNING]);
    let v = d.get("j2");
    let supervisor = v["status"]["pid"].as_i64().unwrap() as i32;
    let vmm = assert_jailed(&d, supervisor, 65534);
    let cgroups = cgroup_dirs(vmm);
    let run_dir2 = PathBuf::from(v["status"]["run_dir"].as_str().unwrap());
    d.ctl_ok(&["rm", "j2"]);
    wait_gone(supervisor, vmm, &cgroups);
    let t0 = Instant::now();
    while run_dir.exists() || run_dir2.exists() {
        assert!(t0.elapsed() < Duration::from_secs(30), "run dirs left");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_gone(supervisor: i32, vmm: i32, cgroups: &[PathBuf]) {
    let t0 = Instant::now();
    while proc_alive(supervisor) || proc_alive(vmm) || cgroups.iter().any(|c| c.exists()) {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "left behind: supervisor {} vmm {} cgroups {:?}",
            proc_alive(supervisor),
            proc_alive(vmm),
            cgroups.iter().filter(|c| c.exists()).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_sigkilled_vm_restarts_jailed_under_its_policy() {
    require_vms!();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP: cell0d can only jail VMs as root");
        return;
    }
    let d = Daemon::start(&["--backoff-ms", "20", "--vm-uid", "4242", "--vm-gid", "4343"]);
    d.ctl_ok(&[
        "run",
        "--name",
        "r1",
        "--cmdline",
        LONG_RUNNING,
        "--restart",
        "always",
    ]);
    let v = d.get("r1");
    let supervisor = v["status"]["pid"].as_i64().unwrap() as i32;
    let vmm = vmm_of(supervisor);
    let st = status(&format!("/proc/{vmm}/status"));
    assert_eq!(st["Uid"], "4242\t4242\t4242\t4242");
    assert_eq!(st["Gid"], "4343\t4343\t4343\t4343");
    // The guest's VMM (inside the jail) dies: the supervisor reports it and
    // exits, cell0d restarts the VM jailed again.
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(vmm, libc::SIGKILL) };
    let v = d.wait_vm("r1", "restarted", |v| {
        state(v) == "running" && v["status"]["restarts"].as_u64() >= Some(1)
    });
    let supervisor2 = v["status"]["pid"].as_i64().unwrap() as i32;
    assert_ne!(supervisor2, supervisor);
    let vmm2 = vmm_of(supervisor2);
    let st = status(&format!("/proc/{vmm2}/status"));
    assert_eq!(st["Uid"], "4242\t4242\t4242\t4242");
    d.ctl_ok(&["rm", "r1"]);
}

#[test]
fn no_jail_runs_the_vmm_as_cell0d_does_and_warns() {
    require_vms!();
    let d = Daemon::start(&["--no-jail"]);
    assert!(d.log().contains("--no-jail"), "{}", d.log());
    d.ctl_ok(&["run", "--name", "n1", "--cmdline", LONG_RUNNING]);
    let pid = d.get("n1")["status"]["pid"].as_i64().unwrap() as i32;
    let cell0d = d.child.as_ref().unwrap().id() as i32;
    // The VMM itself, in cell0d's namespaces, as cell0d's uid; seccomp stays on.
    assert_eq!(ns(pid, "mnt"), ns(cell0d, "mnt"));
    let me = status(&format!("/proc/{cell0d}/status"));
    let st = status(&format!("/proc/{pid}/status"));
    assert_eq!(st["Uid"], me["Uid"]);
    assert_eq!(st["Seccomp"], "2");
    d.ctl_ok(&["rm", "n1"]);
}

#[test]
fn uid_zero_and_conflicting_flags_are_refused() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cell0d"))
        .args(["serve", "--data-dir"])
        .arg(tempdir().path())
        .args(["--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0"])
        .args(["--vm-uid", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--vm-uid and --vm-gid must not be 0") || err.contains("must run as root"),
        "{err}"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cell0d"))
        .args(["serve", "--no-jail", "--vm-uid", "1000"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot be used with"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("c0j")
        .tempdir_in("/tmp")
        .unwrap()
}
