// SPDX-License-Identifier: Apache-2.0
//! Shared helpers of the control-plane tests (`cp_*.rs`): a real `cell0d
//! serve` process on a temporary data dir, `cell0ctl` runs, and cleanup of
//! every VMM the daemon started, whatever happens.
#![allow(dead_code, clippy::unwrap_used, clippy::print_stdout)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// `cell0-vmm` next to the test's `cell0d`, if built and usable.
pub fn vmm() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_BIN_EXE_cell0d")).with_file_name("cell0-vmm");
    p.is_file().then_some(p)
}

/// Why VM tests cannot run here, if they cannot.
pub fn no_vms() -> Option<String> {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        return Some(format!("/dev/kvm cannot be opened read-write: {e}"));
    }
    if vmm().is_none() {
        return Some(
            "cell0-vmm is not built next to cell0d (cargo build --workspace --bins)".into(),
        );
    }
    None
}

/// Skips the calling test when VMs cannot run.
#[macro_export]
macro_rules! require_vms {
    () => {
        if let Some(why) = $crate::cp_harness::no_vms() {
            eprintln!("SKIP {}: {why}", module_path!());
            return;
        }
    };
}

/// A `cell0d serve` process and its data dir.
pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub child: Option<Child>,
    pub grpc: String,
    pub metrics: String,
    pub args: Vec<String>,
}

impl Daemon {
    /// The data dir.
    pub fn data(&self) -> PathBuf {
        self.dir.path().join("d")
    }

    /// Starts cell0d with extra serve arguments.
    pub fn start(args: &[&str]) -> Daemon {
        let dir = tempfile::Builder::new()
            .prefix("c0t")
            .tempdir_in("/tmp")
            .unwrap();
        let mut d = Daemon {
            dir,
            child: None,
            grpc: String::new(),
            metrics: String::new(),
            args: args.iter().map(|s| s.to_string()).collect(),
        };
        d.spawn();
        d
    }

    /// (Re)starts the process on the same data dir.
    pub fn spawn(&mut self) {
        let data = self.data();
        let _ = std::fs::remove_file(data.join("cell0d.addr"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("cell0d.log"))
            .unwrap();
        let mut c = Command::new(env!("CARGO_BIN_EXE_cell0d"));
        c.arg("serve")
            .arg("--data-dir")
            .arg(&data)
            .args(["--metrics", "127.0.0.1:0"])
            .args(&self.args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        // Any free port unless the test fixed one (a restart on the same address).
        if !self.args.iter().any(|a| a == "--listen") {
            c.args(["--listen", "127.0.0.1:0"]);
        }
        if let Some(v) = vmm() {
            if !self.args.iter().any(|a| a == "--vmm") {
                c.arg("--vmm").arg(v);
            }
        }
        self.child = Some(c.spawn().unwrap());
        let addr = data.join("cell0d.addr");
        let t0 = Instant::now();
        loop {
            if let Ok(t) = std::fs::read_to_string(&addr) {
                if let Ok(v) = serde_json::from_str::<Value>(&t) {
                    self.grpc = v["grpc"].as_str().unwrap().to_string();
                    self.metrics = v["metrics"].as_str().unwrap().to_string();
                    return;
                }
            }
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("cell0d exited ({st}) before serving:\n{}", self.log());
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "cell0d did not serve within 60 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The daemon's stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("cell0d.log")).unwrap_or_default()
    }

    /// SIGKILLs cell0d (VMs keep running).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Runs cell0ctl against this daemon.
    pub fn ctl(&self, args: &[&str]) -> Output {
        cell0ctl(&self.grpc, args)
    }

    /// Runs cell0ctl, asserts success, returns stdout.
    pub fn ctl_ok(&self, args: &[&str]) -> String {
        cell0ctl_ok(&self.grpc, "cell0d", || self.log(), args)
    }

    /// `cell0ctl ps -o json`.
    pub fn ps(&self) -> Vec<Value> {
        let v: Value = serde_json::from_str(&self.ctl_ok(&["ps", "-o", "json"])).unwrap();
        v.as_array().unwrap().clone()
    }

    /// `cell0ctl get NAME -o json`.
    pub fn get(&self, name: &str) -> Value {
        serde_json::from_str(&self.ctl_ok(&["get", name, "-o", "json"])).unwrap()
    }

    /// Polls `get NAME` until `f` holds (bounded).
    pub fn wait_vm(&self, name: &str, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        let t0 = Instant::now();
        loop {
            let v = self.get(name);
            if f(&v) {
                return v;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "VM {name} never became {what}: {v:#}\n--- cell0d log:\n{}",
                tail(&self.log(), 3000)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A gRPC client.
    pub async fn client(&self) -> cell0_control::ctl::Clients {
        cell0_control::ctl::connect(&self.grpc).await.unwrap()
    }

    /// Pids of the VMMs recorded in the data dir that still run.
    pub fn vmm_pids(&self) -> Vec<i32> {
        let mut out = Vec::new();
        let Ok(rd) = std::fs::read_dir(self.data().join("node/vms")) else {
            return out;
        };
        for e in rd.flatten() {
            if let Ok(t) = std::fs::read_to_string(e.path().join("state.json")) {
                if let Ok(v) = serde_json::from_str::<Value>(&t) {
                    let pid = v["pid"].as_i64().unwrap_or(0) as i32;
                    if pid > 0 && proc_alive(pid) {
                        out.push(pid);
                    }
                }
            }
        }
        out
    }

    /// The run dirs that exist.
    pub fn run_dirs(&self) -> Vec<String> {
        let Ok(rd) = std::fs::read_dir(self.data().join("node/vms")) else {
            return Vec::new();
        };
        rd.flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    }
}

/// Whether `pid` runs and is not a zombie.
pub fn proc_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rsplit_once(')')
            .is_some_and(|(_, r)| !r.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Processes whose command line mentions `needle`.
pub fn procs_with(needle: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(c) = std::fs::read(format!("/proc/{pid}/cmdline")) {
            if String::from_utf8_lossy(&c).contains(needle) && proc_alive(pid) {
                out.push(pid);
            }
        }
    }
    out
}

/// One scan of /proc: VM id -> host index -> the live processes whose
/// command line names that VM's run dir under `prefixes[host]` (each a host's
/// `<data-dir>/node/vms/`, with the trailing slash).
pub fn vmm_procs(prefixes: &[String]) -> BTreeMap<String, BTreeMap<usize, Vec<i32>>> {
    let mut out: BTreeMap<String, BTreeMap<usize, Vec<i32>>> = BTreeMap::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(c) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let c = String::from_utf8_lossy(&c);
        for (i, p) in prefixes.iter().enumerate() {
            if let Some(rest) = c.split(p.as_str()).nth(1) {
                let id = rest.split(['/', '\0']).next().unwrap_or("");
                if !id.is_empty() && proc_alive(pid) {
                    out.entry(id.to_string())
                        .or_default()
                        .entry(i)
                        .or_default()
                        .push(pid);
                }
            }
        }
    }
    out
}

/// VM id -> the hosts (indexes into `prefixes`, see [`vmm_procs`]) with a
/// live process of it.
pub fn vmm_hosts(prefixes: &[String]) -> BTreeMap<String, BTreeSet<usize>> {
    vmm_procs(prefixes)
        .into_iter()
        .map(|(id, hs)| (id, hs.into_keys().collect()))
        .collect()
}

/// A VM with live processes on two hosts at one instant, from one scan of
/// [`vmm_procs`]: a scan reads /proc one process after another, so a VM that
/// moved during the scan may show its old and new process; a double counts
/// only if every process seen is still alive after the scan (then all were
/// alive together at the moment the first of them was checked again).
pub fn vmm_double(prefixes: &[String]) -> Option<(String, BTreeMap<usize, Vec<i32>>)> {
    vmm_procs(prefixes)
        .into_iter()
        .find(|(_, hs)| hs.len() > 1 && hs.values().all(|ps| ps.iter().any(|p| proc_alive(*p))))
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
        // Every VMM this daemon started: killed, whatever the test did.
        kill_procs_with(&self.data().join("node/vms").display().to_string());
    }
}

/// SIGKILLs every live process whose command line mentions `needle`.
pub fn kill_procs_with(needle: &str) {
    for pid in procs_with(needle) {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// The last `n` bytes of `s`.
pub fn tail(s: &str, n: usize) -> &str {
    let mut i = s.len().saturating_sub(n);
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}

/// A cmdline that keeps a nano guest running (it serves SYPAS on port 5000).
pub const LONG_RUNNING: &str = "cell0.test=sypas-serve cell0.timeout=600";

/// A small deterministic generator (xorshift64*), seeded and printed.
pub struct Rng(pub u64);

impl Rng {
    pub fn seeded(test: &str) -> Rng {
        let seed = std::env::var("CELL0_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            })
            | 1;
        println!("{test}: seed {seed} (replay with CELL0_TEST_SEED={seed})");
        Rng(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// A duration from `lo` to `hi` ms.
    pub fn ms(&mut self, lo: u64, hi: u64) -> std::time::Duration {
        std::time::Duration::from_millis(lo + self.below(hi - lo))
    }
}

/// Polls `f` until it gives a value (bounded, with a clear message).
pub async fn wait_for<T, F, Fut>(what: &str, limit: std::time::Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let t0 = std::time::Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            t0.elapsed() < limit,
            "gave up after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A Create of a VM named `name` with the defaults (never launched by a
/// `/bin/true` VMM).
pub fn spec(name: &str) -> cell0_proto::grpc::CreateVmRequest {
    cell0_proto::grpc::CreateVmRequest {
        spec: Some(cell0_proto::grpc::VmSpec {
            name: name.into(),
            ..Default::default()
        }),
    }
}

/// Runs `cell0ctl --endpoint ENDPOINT ARGS`.
pub fn cell0ctl(endpoint: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cell0ctl"))
        .arg("--endpoint")
        .arg(endpoint)
        // The cluster tests' members serve plain TCP, some on other addresses.
        .arg("--insecure-plaintext")
        .args(args)
        .output()
        .unwrap()
}

/// [`cell0ctl`], asserting success; returns stdout. A failure shows its
/// output and the tail of `log` (read only then) of the daemon `who`.
pub fn cell0ctl_ok(
    endpoint: &str,
    who: &str,
    log: impl FnOnce() -> String,
    args: &[&str],
) -> String {
    let o = cell0ctl(endpoint, args);
    assert!(
        o.status.success(),
        "cell0ctl {args:?} via {who} failed ({}): {}{}\n--- its log:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
        tail(&log(), 4000)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// A free port on 127.0.0.1 (bound, then released for a member to take).
pub fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// Starts (or restarts) members at once: each waits for a leader, which needs
/// a majority of them.
pub fn spawn_all(ms: &mut [&mut Daemon]) {
    std::thread::scope(|s| {
        for m in ms.iter_mut() {
            s.spawn(move || m.spawn());
        }
    });
}

impl Daemon {
    /// A member on a fresh data dir (`/tmp/<prefix>*`) with `args`, not yet
    /// started.
    pub fn unstarted(prefix: &str, args: Vec<String>) -> Daemon {
        Daemon {
            dir: tempfile::Builder::new()
                .prefix(prefix)
                .tempdir_in("/tmp")
                .unwrap(),
            child: None,
            grpc: String::new(),
            metrics: String::new(),
            args,
        }
    }
}

/// The resources and health probing of a test node (an agent's or a
/// member's own): 4 vCPUs, 4 GiB, 100x CPU overcommit, no health probes.
pub const NODE_RESOURCES: [&str; 8] = [
    "--vcpus",
    "4",
    "--memory-mib",
    "4096",
    "--cpu-overcommit",
    "100",
    "--health-ms",
    "3600000",
];

/// Starts three members of one cluster (`--init` on member 1, `--peers` the
/// others), member `i` (0-based) with id `i + 1`, node name `m{i+1}`, a free
/// address, `extra` and `each(i)`. Returns them (index = id - 1) and their
/// addresses (a node agent's `--join`).
pub fn start_members(
    prefix: &str,
    extra: &[&str],
    each: impl Fn(usize) -> Vec<String>,
) -> (Vec<Daemon>, Vec<String>) {
    let addrs: Vec<String> = (0..3).map(|_| free_addr()).collect();
    let mut ms: Vec<Daemon> = (0..3)
        .map(|i| {
            let peers: Vec<String> = (0..3)
                .filter(|j| *j != i)
                .map(|j| format!("{}={}", j + 1, addrs[j]))
                .collect();
            let mut args: Vec<String> = vec![
                "--node-id".into(),
                (i + 1).to_string(),
                "--node-name".into(),
                format!("m{}", i + 1),
                "--listen".into(),
                addrs[i].clone(),
                "--peers".into(),
                peers.join(","),
            ];
            args.extend(extra.iter().map(|s| s.to_string()));
            args.extend(each(i));
            if i == 0 {
                args.push("--init".into());
            }
            Daemon::unstarted(prefix, args)
        })
        .collect();
    spawn_all(&mut ms.iter_mut().collect::<Vec<_>>());
    (ms, addrs)
}

/// The leader's id as a live member (one with a process) of `ms` (index =
/// id - 1) sees it, if a live member knows a live leader.
pub fn leader_id(ms: &[Daemon]) -> Option<usize> {
    for m in ms.iter().filter(|m| m.child.is_some()) {
        let o = m.ctl(&["cluster", "status", "-o", "json"]);
        if !o.status.success() {
            continue;
        }
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        let l = v["leader_id"].as_u64().unwrap_or(0) as usize;
        if l > 0 && ms[l - 1].child.is_some() {
            return Some(l);
        }
    }
    None
}

/// The leader among `ms` (index = id - 1), waited for at most 30 s; panics
/// with `logs` if there is none.
pub fn leader(ms: &[Daemon], logs: impl Fn() -> String) -> &Daemon {
    let t0 = Instant::now();
    loop {
        if let Some(l) = leader_id(ms) {
            return &ms[l - 1];
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no leader among the live members within 30 s\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The last `n` bytes of each member's log, headed `--- member <id>:`.
pub fn member_logs(ms: &[Daemon], n: usize) -> String {
    let mut s = String::new();
    for (i, m) in ms.iter().enumerate() {
        s.push_str(&format!("--- member {}:\n{}\n", i + 1, tail(&m.log(), n)));
    }
    s
}

/// Polls `f` every 20 ms for at most `secs`; panics with `what` and `logs`.
pub fn wait_until(secs: u64, what: &str, logs: impl Fn() -> String, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < Duration::from_secs(secs),
            "{what}: not within {secs} s\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The `cell0d node` arguments the cluster tests' agents share: node `name`
/// joined to `join`, in `zone` of region `r1` with `labels`,
/// [`NODE_RESOURCES`], data dir `dir`, the built VMM;
/// `tls` its `--tls-dir` (`None`: `--insecure-plaintext`).
pub fn node_args(
    name: &str,
    join: &str,
    zone: &str,
    labels: &str,
    dir: &Path,
    tls: Option<&Path>,
) -> Vec<String> {
    node_args_with_vmm(name, join, zone, labels, dir, tls, &vmm().unwrap())
}

/// [`node_args`] with `vmm` as its `--vmm`.
pub fn node_args_with_vmm(
    name: &str,
    join: &str,
    zone: &str,
    labels: &str,
    dir: &Path,
    tls: Option<&Path>,
    vmm: &Path,
) -> Vec<String> {
    let mut a: Vec<String> = ["node", "--join", join, "--node-name", name]
        .iter()
        .map(|s| s.to_string())
        .collect();
    match tls {
        Some(t) => a.extend(["--tls-dir".into(), t.display().to_string()]),
        None => a.push("--insecure-plaintext".into()),
    }
    a.extend(
        ["--zone", zone, "--region", "r1", "--labels", labels]
            .iter()
            .chain(&NODE_RESOURCES)
            .map(|s| s.to_string()),
    );
    a.extend([
        "--data-dir".into(),
        dir.display().to_string(),
        "--vmm".into(),
        vmm.display().to_string(),
    ]);
    a
}

/// A process playing a Linux guest's agent: `cell0-agent run --unix SOCK`
/// connected to a VM's port-1024 socket, where the hybrid vsock would put a
/// guest's connection (no Linux guest boots on this machine's nested KVM,
/// DESIGN.md §3). Killed and reaped on drop.
pub struct GuestAgent(Child);

impl GuestAgent {
    /// Starts `cell0-agent` if it is built next to `cell0d`; otherwise the
    /// same agent code in a process of this test binary, through its test
    /// `guest_agent_helper_process` (see [`guest_agent_helper_main`]). It
    /// cannot run in the test's own process: its reaper (it is PID 1 in a
    /// guest) reaps every child, the test's cell0ctl processes too.
    pub fn start(sock: &Path) -> GuestAgent {
        let agent_bin = Path::new(env!("CARGO_BIN_EXE_cell0d")).with_file_name("cell0-agent");
        let mut c = if agent_bin.is_file() {
            let mut c = Command::new(&agent_bin);
            c.arg("run").arg("--unix").arg(sock);
            c
        } else {
            eprintln!(
                "cell0-agent is not built next to cell0d; running the same agent code in a \
                 process of this test binary (guest_agent_helper_process)"
            );
            let mut c = Command::new(std::env::current_exe().unwrap());
            c.args([
                "--ignored",
                "--exact",
                "guest_agent_helper_process",
                "--nocapture",
            ])
            .env("CELL0_TEST_AGENT_SOCK", sock);
            c
        };
        GuestAgent(
            c.env("CELL0_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .unwrap(),
        )
    }
}

impl Drop for GuestAgent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The body of a test binary's `guest_agent_helper_process` (an ignored
/// test that [`GuestAgent::start`] runs in a process of its own): the
/// guest agent's session on `$CELL0_TEST_AGENT_SOCK`.
pub async fn guest_agent_helper_main() {
    let sock = std::env::var_os("CELL0_TEST_AGENT_SOCK")
        .expect("started by GuestAgent::start with CELL0_TEST_AGENT_SOCK");
    let mut cfg =
        cell0_agent::session::AgentConfig::new(cell0_agent::transport::Endpoint::Unix(sock.into()));
    cfg.max_connect_attempts = Some(100);
    let outcome = cell0_agent::session::run(cfg).await;
    panic!("the agent session ended: {outcome:?}");
}

/// For VMs whose guest a [`GuestAgent`] plays, in `dir`: a stand-in for
/// `cell0-vmm` (a script that runs until killed) and a "kernel" file that
/// makes a VM spec a Linux guest's (never booted).
pub fn vmm_stand_in(dir: &Path) -> (PathBuf, PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let vmm = dir.join("vmm-stand-in");
    std::fs::write(&vmm, "#!/bin/sh\nwhile :; do sleep 1; done\n").unwrap();
    std::fs::set_permissions(&vmm, std::fs::Permissions::from_mode(0o755)).unwrap();
    let kernel = dir.join("vmlinux");
    std::fs::write(&kernel, b"not booted here").unwrap();
    (vmm, kernel)
}

/// A `cell0d` command with `args`, its stderr appended to `log`, in a
/// process group of its own: a kill of that group ([`kill_group`]) reaches
/// no VMM, which runs in a group of its own.
pub fn node_command(args: &[String], log: &Path) -> Command {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let mut c = Command::new(env!("CARGO_BIN_EXE_cell0d"));
    c.args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    std::os::unix::process::CommandExt::process_group(&mut c, 0);
    c
}

/// SIGKILLs the process group of `c` (started by [`node_command`]) and
/// reaps `c`.
pub fn kill_group(c: &mut Child) {
    // SAFETY: kill(2) on our own child's process group.
    unsafe { libc::kill(-(c.id() as i32), libc::SIGKILL) };
    let _ = c.wait();
}

/// `cell0d issue-cert --ca-dir CA_DIR --name NAME --role ROLE --san
/// 127.0.0.1 --out OUT`, asserting success.
pub fn issue_cert(ca_dir: &Path, name: &str, role: &str, out: &Path) {
    let o = Command::new(env!("CARGO_BIN_EXE_cell0d"))
        .args(["issue-cert", "--ca-dir"])
        .arg(ca_dir)
        .args([
            "--name",
            name,
            "--role",
            role,
            "--san",
            "127.0.0.1",
            "--out",
        ])
        .arg(out)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "issue-cert {name} failed ({}): {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Asserts that VM `v` (`cell0ctl get -o json`) was lost with node `node`:
/// failed, with the message `lost: node NODE went down`.
pub fn assert_lost(v: &Value, node: &str) {
    assert_eq!(v["status"]["state"], "failed", "{v:#}");
    assert!(
        v["status"]["message"]
            .as_str()
            .unwrap_or("")
            .contains(&format!("lost: node {node} went down")),
        "{v:#}"
    );
}
