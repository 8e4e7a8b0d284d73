// SPDX-License-Identifier: Apache-2.0
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
//! `cell0-vmm launch --jail`: what the jailed VMM sees from inside
//! (`--jail-selfcheck`), what the host sees of it from outside (`/proc`, the
//! cgroup files), a real VM in the jail with every thread filtered, and errors
//! that name their step. Needs root and cgroups; the VM tests need /dev/kvm.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cell0_vmm::jail::cgroup::{choose, parse_mountinfo, parse_proc_cgroup};
use serde_json::Value;

const NOBODY: u32 = 65534;

fn vmm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cell0-vmm"))
}

/// Why the jail cannot be tested here, if it cannot.
fn jail_unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root: the jail needs namespaces, cgroups and mknod".into());
    }
    let mounts = parse_mountinfo(&std::fs::read_to_string("/proc/self/mountinfo").ok()?);
    let own = parse_proc_cgroup(&std::fs::read_to_string("/proc/self/cgroup").ok()?);
    if let Err(e) = choose(&mounts, &own, None) {
        return Some(format!("no usable cgroups: {e}"));
    }
    None
}

fn kvm_unavailable() -> Option<String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .err()
        .map(|e| format!("/dev/kvm: {e}"))
}

macro_rules! require {
    ($($check:expr),+) => {
        $(if let Some(why) = $check {
            eprintln!("SKIP {}: {why}", module_path!());
            return;
        })+
    };
}

/// A directory the jailed VMM (uid/gid 65534) can create sockets in.
fn nobody_dir() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::chown(d.path(), Some(NOBODY), Some(NOBODY)).unwrap();
    d
}

fn jail_args_as(root: &Path, uid: &str) -> Vec<String> {
    [
        "launch",
        "--jail",
        "--uid",
        uid,
        "--gid",
        "65534",
        "--jail-root",
        root.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec()
}

fn jail_args(root: &Path) -> Vec<String> {
    jail_args_as(root, "65534")
}

/// The supervisor's only child: the jailed VMM, by its host pid.
fn vmm_child(supervisor: u32) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let c = std::fs::read_to_string(format!("/proc/{supervisor}/task/{supervisor}/children"))
            .unwrap_or_default();
        if let Some(pid) = c.split_whitespace().next() {
            return pid.parse().unwrap();
        }
        assert!(Instant::now() < deadline, "the supervisor has no child");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn status_field(pid: u32, task: Option<u32>, field: &str) -> String {
    let p = match task {
        Some(t) => format!("/proc/{pid}/task/{t}/status"),
        None => format!("/proc/{pid}/status"),
    };
    let s = std::fs::read_to_string(&p).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("{field} missing from {p}"))
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// The cgroup directories of `pid` whose path holds `needle`, by controller
/// list (v1) or "" (v2).
fn cgroup_dirs(pid: u32, needle: &str) -> Vec<(String, PathBuf)> {
    let mounts = parse_mountinfo(&std::fs::read_to_string("/proc/self/mountinfo").unwrap());
    let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let mut out = Vec::new();
    for line in own.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, ctrls, path) = (parts.next(), parts.next().unwrap(), parts.next().unwrap());
        if !path.contains(needle) {
            continue;
        }
        let mount = if ctrls.is_empty() {
            mounts.v2.clone().unwrap()
        } else {
            let c = ctrls.split(',').next().unwrap();
            mounts.v1[c].clone()
        };
        out.push((ctrls.to_string(), mount.join(path.trim_start_matches('/'))));
    }
    out
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .trim()
        .to_string()
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn selfcheck_from_inside_and_outside() {
    require!(jail_unavailable());
    let base = tempfile::tempdir().unwrap();
    let root = base.path().join("vm-selfcheck");
    let mut args = jail_args(&root);
    args.extend(
        [
            "--jail-selfcheck",
            "--jail-memory-mib",
            "300",
            "--jail-cpu-pct",
            "150",
            "--jail-pids",
            "40",
            "--jail-nofile",
            "100",
            "--jail-fsize-mib",
            "5",
        ]
        .map(String::from),
    );
    let child = vmm()
        .args(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut sup = Killed(child);
    let supervisor = sup.0.id();
    let mut lines = BufReader::new(sup.0.stdout.take().unwrap()).lines();
    let line = lines.next().expect("a report line").unwrap();
    let r: Value = serde_json::from_str(&line).unwrap();

    // Inside: its own PID namespace, the given ids, no capabilities at all.
    assert_eq!(r["pid"], 1, "{r}");
    assert_eq!(r["uid"], serde_json::json!([NOBODY, NOBODY, NOBODY]));
    assert_eq!(r["gid"], serde_json::json!([NOBODY, NOBODY, NOBODY]));
    assert_eq!(r["groups"], 0);
    for k in [
        "cap_effective",
        "cap_permitted",
        "cap_inheritable",
        "cap_bounding_count",
        "cap_ambient_count",
    ] {
        assert_eq!(r[k], 0, "{k}: {r}");
    }
    assert_eq!(r["no_new_privs"], 1);
    // Only the jail's files: /dev/kvm and nothing of the host.
    assert_eq!(r["files"], serde_json::json!(["/dev", "/dev/kvm"]), "{r}");
    for (path, seen) in r["host_files_visible"].as_object().unwrap() {
        assert_eq!(seen, false, "{path} is visible inside the jail");
    }
    assert_eq!(r["kvm_opens"], true, "{r}");
    // No other process: neither the supervisor nor anything else.
    assert_eq!(r["supervisor_pid_visible"], false);
    assert_eq!(r["other_processes_visible"], false);
    assert_eq!(r["hostname"], "cell0");
    assert_eq!(r["interfaces"], serde_json::json!(["lo"]));
    assert_eq!(r["rlimit_nofile"], serde_json::json!([100, 100]));
    assert_eq!(r["rlimit_fsize"], serde_json::json!([5 << 20, 5 << 20]));
    assert_eq!(r["rlimit_core"], serde_json::json!([0, 0]));

    // Outside: the kernel's view of the same process.
    let pid = vmm_child(supervisor);
    assert_eq!(status_field(pid, None, "Uid"), "65534 65534 65534 65534");
    assert_eq!(status_field(pid, None, "Gid"), "65534 65534 65534 65534");
    for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(status_field(pid, None, cap), "0000000000000000", "{cap}");
    }
    assert_eq!(status_field(pid, None, "NoNewPrivs"), "1");
    assert_eq!(status_field(pid, None, "NSpid"), format!("{pid} 1"));
    for ns in ["mnt", "pid", "net", "ipc", "uts"] {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        assert_ne!(theirs, ours, "{ns} namespace is shared with the host");
    }
    let dirs = cgroup_dirs(pid, "cell0-vm-selfcheck-");
    assert!(!dirs.is_empty(), "the VMM is in no cell0 cgroup");
    let mut seen = Vec::new();
    for (ctrls, dir) in &dirs {
        let has = |c: &str| ctrls.is_empty() || ctrls.split(',').any(|x| x == c);
        if has("cpu") {
            let q = if ctrls.is_empty() {
                read(&dir.join("cpu.max"))
            } else {
                format!(
                    "{} {}",
                    read(&dir.join("cpu.cfs_quota_us")),
                    read(&dir.join("cpu.cfs_period_us"))
                )
            };
            assert_eq!(q, "150000 100000");
            seen.push("cpu");
        }
        if has("memory") {
            let f = if ctrls.is_empty() {
                "memory.max"
            } else {
                "memory.limit_in_bytes"
            };
            assert_eq!(read(&dir.join(f)), (300u64 << 20).to_string());
            seen.push("memory");
        }
        if has("pids") {
            assert_eq!(read(&dir.join("pids.max")), "40");
            seen.push("pids");
        }
    }
    seen.sort();
    assert_eq!(seen, ["cpu", "memory", "pids"], "{dirs:?}");

    // Closing stdin ends it; the supervisor removes the cgroups and the jail dir.
    drop(sup.0.stdin.take());
    let st = sup.0.wait().unwrap();
    assert!(st.success(), "{st:?}");
    for (_, d) in &dirs {
        assert!(!d.exists(), "{} was left behind", d.display());
    }
    assert!(!root.exists(), "the jail directory was left behind");
}

#[test]
fn a_jailed_vm_runs_with_every_thread_unprivileged_and_filtered() {
    require!(jail_unavailable(), kvm_unavailable());
    let base = tempfile::tempdir().unwrap();
    let socks = nobody_dir();
    let api = socks.path().join("api.sock");
    let mut args = jail_args(&base.path().join("vm-run"));
    args.extend(
        [
            "--vcpus",
            "2",
            "--vsock-uds",
            socks.path().join("v.sock").to_str().unwrap(),
            "--cid",
            "3",
            "--memory-mib",
            "64",
            "--api-sock",
            api.to_str().unwrap(),
            "--cmdline",
            "cell0.test=sypas-serve cell0.port=5000",
        ]
        .map(String::from),
    );
    let child = vmm()
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut sup = Killed(child);
    let mut lines = BufReader::new(sup.0.stdout.take().unwrap()).lines();
    loop {
        let l = lines.next().expect("the guest started serving").unwrap();
        if l.contains("sypas-serve: listening on port 5000") {
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    let pid = vmm_child(sup.0.id());
    let mut names = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let tid: u32 = t.unwrap().file_name().to_str().unwrap().parse().unwrap();
        let name = read(Path::new(&format!("/proc/{pid}/task/{tid}/comm")));
        if name.starts_with("kvm-") {
            continue; // KVM's own kernel worker
        }
        assert_eq!(status_field(pid, Some(tid), "Seccomp"), "2", "{name}");
        assert_eq!(
            status_field(pid, Some(tid), "Uid"),
            "65534 65534 65534 65534",
            "{name}"
        );
        assert_eq!(
            status_field(pid, Some(tid), "CapEff"),
            "0000000000000000",
            "{name}"
        );
        assert_eq!(status_field(pid, Some(tid), "NoNewPrivs"), "1", "{name}");
        names.push(name);
    }
    names.sort();
    assert_eq!(names, ["api", "cell0-vmm", "vcpu0", "vcpu1"]);
    // The API works from the host, through the bind-mounted socket directory.
    let s = std::os::unix::net::UnixStream::connect(&api).unwrap();
    writeln!(&s, r#"{{"op":"stop"}}"#).unwrap();
    let mut resp = String::new();
    BufReader::new(&s).read_line(&mut resp).unwrap();
    assert!(resp.contains(r#""ok":true"#), "{resp}");
    let st = sup.0.wait().unwrap();
    assert!(st.success(), "{st:?}");
}

#[test]
fn the_pids_limit_is_enforced() {
    require!(jail_unavailable(), kvm_unavailable());
    let base = tempfile::tempdir().unwrap();
    let mut args = jail_args(&base.path().join("vm-pids"));
    args.extend(["--vcpus", "8", "--jail-pids", "4"].map(String::from));
    let o = vmm().args(&args).output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("cannot spawn a vCPU thread"), "{e}");
}

#[test]
fn errors_name_the_step_that_failed() {
    require!(jail_unavailable());
    let base = tempfile::tempdir().unwrap();
    let run = |extra: &[&str], as_nobody: bool| {
        let uid = if extra == ["uid0"] { "0" } else { "65534" };
        let extra = if uid == "0" { &[][..] } else { extra };
        let mut args = jail_args_as(&base.path().join("vm-err"), uid);
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut c = vmm();
        c.args(&args);
        if as_nobody {
            c.uid(NOBODY).gid(NOBODY);
        }
        let o = c.output().unwrap();
        assert_eq!(o.status.code(), Some(1), "{o:?}");
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let e = run(&[], true);
    assert!(
        e.contains("jail: cannot start the jail: cell0-vmm must start as root"),
        "{e}"
    );
    let e = run(&["uid0"], false);
    assert!(e.contains("must not be 0"), "{e}");
    // A socket directory the VMM's uid cannot write to.
    let closed = tempfile::tempdir().unwrap();
    let api = closed.path().join("api.sock");
    let e = run(&["--api-sock", api.to_str().unwrap()], false);
    assert!(
        e.contains(&format!(
            "jail: cannot expose {} to the VMM",
            closed.path().display()
        )) && e.contains("not writable"),
        "{e}"
    );
    // A jail directory that is in use.
    std::fs::create_dir_all(base.path().join("vm-err/stale")).unwrap();
    let e = run(&[], false);
    assert!(e.contains("exists and is not empty"), "{e}");
}
