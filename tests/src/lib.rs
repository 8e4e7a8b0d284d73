// SPDX-License-Identifier: Apache-2.0
//! Shared helpers for the integration tests in `tests/tests/` and the benchmarks.
//!
//! Tests that need something the machine lacks (such as `/dev/kvm`) print why
//! and return early; [`require_kvm!`] does that in one line.

pub mod attest;

use std::fs::OpenOptions;
use std::path::PathBuf;
use std::process::{Command, Output};

/// Why KVM is unusable here, or `None` when `/dev/kvm` opens read-write.
pub fn kvm_unavailable() -> Option<String> {
    match OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => None,
        Err(e) => Some(format!("/dev/kvm cannot be opened read-write: {e}")),
    }
}

/// Skips the calling test (with a printed reason) when KVM is unusable.
#[macro_export]
macro_rules! require_kvm {
    () => {
        if let Some(why) = $crate::kvm_unavailable() {
            eprintln!("SKIP {}: {why}", module_path!());
            return;
        }
    };
}

/// The directory that holds the workspace's built binaries (`target/<profile>`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test knows its own path");
    let mut dir = exe
        .parent()
        .expect("test binary has a directory")
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// Path to a workspace binary, built by `cargo build --workspace --bins` (or by
/// `cargo test --workspace`, which builds the bins of packages with integration tests).
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.is_file(),
        "{} is missing: run `cargo build --workspace --bins` first",
        p.display()
    );
    p
}

/// A `cell0-vmm` command.
pub fn vmm() -> Command {
    Command::new(bin("cell0-vmm"))
}

/// The outcome of one VM run.
#[derive(Debug)]
pub struct Run {
    /// Exit code (None if killed by a signal).
    pub code: Option<i32>,
    /// Serial console output.
    pub serial: String,
    /// VMM stderr (logs and error line).
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(o: Output) -> Self {
        Self {
            code: o.status.code(),
            serial: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

/// Runs `cell0-vmm launch ARGS` with serial on stdout and returns the outcome.
pub fn launch(args: &[&str]) -> Run {
    vmm()
        .arg("launch")
        .args(args)
        .output()
        .expect("cell0-vmm runs")
        .into()
}

/// Runs the built-in nano guest's self-test `test` with extra launch arguments.
pub fn nano_test(test: &str, extra: &[&str]) -> Run {
    let cmdline = format!("cell0.test={test}");
    let mut args = vec!["--cmdline", cmdline.as_str()];
    args.extend_from_slice(extra);
    launch(&args)
}

/// Writes the built-in nano ELF to `path`.
pub fn write_nano_image(path: &std::path::Path) {
    let st = vmm()
        .arg("nano-image")
        .arg("--out")
        .arg(path)
        .status()
        .expect("cell0-vmm runs");
    assert!(st.success(), "cell0-vmm nano-image failed");
}

/// Asserts that a run failed the way a VMM error must: exit status 1, one
/// `cell0-vmm: error:` line on stderr containing `needle`, and no panic.
pub fn assert_clean_error(r: &Run, needle: &str) {
    assert_eq!(r.code, Some(1), "exit status: {r:#?}");
    assert!(
        !r.stderr.contains("panicked"),
        "the VMM panicked: {}",
        r.stderr
    );
    let errs: Vec<&str> = r
        .stderr
        .lines()
        .filter(|l| l.starts_with("cell0-vmm: error:"))
        .collect();
    assert_eq!(errs.len(), 1, "one error line expected: {}", r.stderr);
    assert!(
        errs[0].contains(needle),
        "error line {:?} does not mention {needle:?}",
        errs[0]
    );
}

/// A host process the test owns; killed and reaped on drop.
#[derive(Debug)]
pub struct ChildGuard(pub std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits (bounded) until `path` exists.
pub fn wait_for_path(path: &std::path::Path, timeout: std::time::Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if path.exists() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    false
}

/// Starts `sypas-echo-server` on `socket` and waits until it listens.
pub fn start_echo_server(socket: &std::path::Path) -> ChildGuard {
    let child = Command::new(bin("sypas-echo-server"))
        .arg("--socket")
        .arg(socket)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("sypas-echo-server starts");
    let g = ChildGuard(child);
    assert!(
        wait_for_path(socket, std::time::Duration::from_secs(10)),
        "sypas-echo-server did not create {}",
        socket.display()
    );
    g
}

/// A minimal ELF kernel that loads at 1 MiB and halts forever with interrupts
/// off (`cli; hlt; jmp .-1`): a guest that stays up until the VMM stops it.
/// `tweak` is written into an unused byte, to make kernels that differ by one byte.
pub fn idle_elf(tweak: u8) -> Vec<u8> {
    let mut e = vec![0u8; 0x200];
    e[0..4].copy_from_slice(b"\x7fELF");
    e[4] = 2; // 64-bit
    e[5] = 1; // little endian
    e[6] = 1;
    e[0x10..0x12].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e[0x12..0x14].copy_from_slice(&62u16.to_le_bytes()); // x86_64
    e[0x14..0x18].copy_from_slice(&1u32.to_le_bytes());
    e[0x18..0x20].copy_from_slice(&0x10_0000u64.to_le_bytes()); // entry
    e[0x20..0x28].copy_from_slice(&0x40u64.to_le_bytes()); // phoff
    e[0x34..0x36].copy_from_slice(&0x40u16.to_le_bytes());
    e[0x36..0x38].copy_from_slice(&0x38u16.to_le_bytes());
    e[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
    let ph = 0x40;
    e[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    e[ph + 4..ph + 8].copy_from_slice(&5u32.to_le_bytes()); // R+X
    e[ph + 8..ph + 16].copy_from_slice(&0x100u64.to_le_bytes());
    e[ph + 16..ph + 24].copy_from_slice(&0x10_0000u64.to_le_bytes());
    e[ph + 24..ph + 32].copy_from_slice(&0x10_0000u64.to_le_bytes());
    e[ph + 32..ph + 40].copy_from_slice(&0x10u64.to_le_bytes());
    e[ph + 40..ph + 48].copy_from_slice(&0x10u64.to_le_bytes());
    e[0x100..0x104].copy_from_slice(&[0xfa, 0xf4, 0xeb, 0xfd]);
    e[0x1ff] = tweak;
    e
}

/// Connects to a VM's API socket. The path exists from `bind(2)` on, a moment
/// before `listen(2)`: refusals are retried until `timeout` (a VMM that has
/// exited keeps refusing, and the error says so).
pub fn connect_api(
    api: &std::path::Path,
    timeout: std::time::Duration,
) -> std::io::Result<std::os::unix::net::UnixStream> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match std::os::unix::net::UnixStream::connect(api) {
            Err(e)
                if e.kind() == std::io::ErrorKind::ConnectionRefused
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            r => return r,
        }
    }
}

/// One request on a VM's JSON-lines API socket. An answer `starting` (a VMM
/// serves its socket while it sets up its vTPM; only `describe`, `stop` and
/// `lease` are served then) is retried for up to 60 s.
pub fn api_request(api: &std::path::Path, req: &serde_json::Value) -> serde_json::Value {
    let give_up = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let r = api_request_once(api, req);
        if r["error"]["code"] != "starting" {
            return r;
        }
        assert!(
            std::time::Instant::now() < give_up,
            "the VMM still answers {req} with `starting` after 60 s: {r}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Waits until the VMM's `describe` says `state: running` (its vTPM set up,
/// its boot measured, its vCPUs started): the API socket exists earlier.
/// False if it is not by `timeout` or the VMM stopped answering.
pub fn wait_api_running(api: &std::path::Path, timeout: std::time::Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        let Ok(s) = connect_api(api, std::time::Duration::from_secs(1)) else {
            return false;
        };
        let mut l = String::new();
        {
            use std::io::{BufRead, Write};
            if writeln!(&s, r#"{{"op":"describe"}}"#).is_err()
                || std::io::BufReader::new(&s).read_line(&mut l).is_err()
            {
                return false;
            }
        }
        match serde_json::from_str::<serde_json::Value>(&l) {
            Ok(d) if d["state"] == "running" => return true,
            Ok(d) if d["state"] == "starting" => {}
            _ => return false,
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    false
}

/// One request on a VM's JSON-lines API socket, answered as it comes.
pub fn api_request_once(api: &std::path::Path, req: &serde_json::Value) -> serde_json::Value {
    use std::io::{BufRead, Write};
    let s = connect_api(api, std::time::Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("API socket {} does not accept: {e}", api.display()));
    let mut w = s.try_clone().expect("clone");
    writeln!(w, "{req}").expect("request written");
    let mut l = String::new();
    std::io::BufReader::new(s)
        .read_line(&mut l)
        .expect("response read");
    serde_json::from_str(&l).expect("response is JSON")
}

/// Pids of live swtpm processes whose command line mentions `needle`.
pub fn swtpm_pids_with(needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        let state = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        // Zombies (state Z) are dead; their parent just has not reaped them.
        let zombie = state
            .rsplit(')')
            .next()
            .is_some_and(|s| s.trim_start().starts_with('Z'));
        if cmd.starts_with("swtpm ") && cmd.contains(needle) && !zombie {
            out.push(pid);
        }
    }
    out
}

/// The line the nano guest's `sypas-serve` prints once it listens on port 5000.
pub const SERVE_LISTENING: &str = "cell0-nano: sypas-serve: listening on port 5000, mode ";

/// Reads serial output until a line starts with `prefix`, then keeps draining the
/// rest on a thread (so the VMM never blocks on a full pipe), printing it when
/// `echo` is set with `tag` before each line. Lines before `prefix` are printed too.
#[allow(clippy::print_stdout)] // echoing the guest's console is the point
pub fn wait_for_serial_line(
    out: std::process::ChildStdout,
    prefix: &str,
    echo: Option<&'static str>,
) -> anyhow::Result<()> {
    use std::io::BufRead;
    let mut lines = std::io::BufReader::new(out).lines();
    loop {
        let Some(line) = lines.next() else {
            anyhow::bail!("the guest stopped before printing {prefix:?}");
        };
        let line = line?;
        if let Some(tag) = echo {
            println!("{tag}{line}");
        }
        if line.starts_with(prefix) {
            break;
        }
    }
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            if let Some(tag) = echo {
                println!("{tag}{line}");
            }
        }
    });
    Ok(())
}

/// A `cell0-vmm launch` running in the background, its serial output and
/// stderr collected by threads (so the VMM never blocks on a full pipe).
#[derive(Debug)]
pub struct BgVm {
    /// The VMM process (killed and reaped on drop).
    pub child: ChildGuard,
    out: Option<std::thread::JoinHandle<String>>,
    err: Option<std::thread::JoinHandle<String>>,
}

impl BgVm {
    /// Starts `cell0-vmm launch ARGS`.
    pub fn spawn(args: &[&str]) -> BgVm {
        use std::io::Read;
        let mut child = vmm()
            .arg("launch")
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("cell0-vmm runs");
        let mut so = child.stdout.take().expect("piped stdout");
        let mut se = child.stderr.take().expect("piped stderr");
        let out = std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = so.read_to_end(&mut v);
            String::from_utf8_lossy(&v).into_owned()
        });
        let err = std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = se.read_to_end(&mut v);
            String::from_utf8_lossy(&v).into_owned()
        });
        BgVm {
            child: ChildGuard(child),
            out: Some(out),
            err: Some(err),
        }
    }

    /// The VMM's pid.
    pub fn pid(&self) -> u32 {
        self.child.0.id()
    }

    /// Whether the VMM is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.0.try_wait(), Ok(None))
    }

    /// Waits at most `timeout` for the VMM to exit and returns the outcome;
    /// past the timeout it is killed, and the outcome says so (`code: None`).
    pub fn wait(mut self, timeout: std::time::Duration) -> Run {
        let deadline = std::time::Instant::now() + timeout;
        let mut code = None;
        loop {
            match self.child.0.try_wait() {
                Ok(Some(st)) => {
                    code = st.code();
                    break;
                }
                Ok(None) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                _ => {
                    let _ = self.child.0.kill();
                    let _ = self.child.0.wait();
                    break;
                }
            }
        }
        let join = |h: Option<std::thread::JoinHandle<String>>| {
            h.map(|h| h.join().unwrap_or_default()).unwrap_or_default()
        };
        Run {
            code,
            serial: join(self.out.take()),
            stderr: join(self.err.take()),
        }
    }
}

/// What `/proc/<pid>` says about a process: open fds, threads, resident KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcUsage {
    /// Entries of `/proc/<pid>/fd`.
    pub fds: usize,
    /// `Threads:` of `/proc/<pid>/status`.
    pub threads: usize,
    /// `VmRSS:` of `/proc/<pid>/status`, in KiB.
    pub rss_kib: u64,
}

/// Reads `ProcUsage` of `pid`; `None` once the process is gone.
pub fn proc_usage(pid: u32) -> Option<ProcUsage> {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    Some(ProcUsage {
        fds,
        threads: field("Threads:")? as usize,
        rss_kib: field("VmRSS:")?,
    })
}

/// Whether swtpm or its tools are missing from PATH (then the `--tpm` tests
/// skip, saying so on stderr).
pub fn swtpm_missing() -> bool {
    let missing = ["swtpm", "swtpm_setup", "swtpm_localca"].iter().any(|p| {
        !std::env::var_os("PATH")
            .map(|path| std::env::split_paths(&path).any(|d| d.join(p).is_file()))
            .unwrap_or(false)
    });
    if missing {
        eprintln!("SKIP: swtpm is not installed (apt-get install swtpm swtpm-tools)");
    }
    missing
}
