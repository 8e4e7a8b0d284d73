// SPDX-License-Identifier: Apache-2.0
//! `cell0-bench-linux-boot`: time from starting `cell0-vmm` to the guest
//! agent's boot marker (`cell0-agent: init start`, the first line /init
//! writes, timed on the host as it arrives on the serial pipe) and to the
//! agent's `ready` over SYPAS, for an image from `cell0-rootfs build`.
//! Firecracker measures its boot the same way: a marker the guest writes at
//! init start. The target is under 125 ms to the marker.
//!
//! It needs a host whose KVM runs guest kernels on hardware; elsewhere it
//! prints why it cannot measure and exits 0 (`--force` tries anyway). It
//! prints figures and never judges them.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "cell0-bench-linux-boot",
    about = "Linux guest boot time to the agent's init marker and ready"
)]
struct Args {
    /// Image directory from `cell0-rootfs build` (vmlinuz, initrd.img, cmdline).
    #[arg(long)]
    image: PathBuf,
    /// Boots to measure.
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    memory_mib: u64,
    /// Measure even where the host looks unable to boot Linux.
    #[arg(long)]
    force: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let p = exe.parent().context("no directory")?.join(name);
    if !p.is_file() {
        bail!(
            "{} is missing: build the workspace's binaries first (cargo build --release --workspace --bins)",
            p.display()
        );
    }
    Ok(p)
}

/// Why this host cannot boot stock Linux, or None.
fn unbootable() -> Option<String> {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return Some("/dev/kvm cannot be opened read-write".into());
    }
    let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hw = cpu
        .lines()
        .find(|l| l.starts_with("flags"))
        .is_some_and(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if !hw || Path::new("/sys/module/kvm_pvm").exists() {
        return Some(
            "KVM here is not hardware-backed (no vmx/svm in the CPU flags, or kvm_pvm): its instruction \
             emulator runs guest ring-0 code and stock Linux kernels die in it (DESIGN.md §3)"
                .into(),
        );
    }
    None
}

struct Guard(Child);
impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn lines(r: impl std::io::Read + Send + 'static) -> mpsc::Receiver<(Instant, String)> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(r).lines().map_while(Result::ok) {
            if tx.send((Instant::now(), l)).is_err() {
                break;
            }
        }
    });
    rx
}

/// One boot: (to marker, to ready).
fn boot(a: &Args, vmm: &Path, agent: &Path, i: usize) -> anyhow::Result<(Duration, Duration)> {
    let dir = tempfile::tempdir()?;
    let uds = dir.path().join("vsock.sock");
    let mut host = Guard(
        Command::new(agent)
            .args(["host", "--agent-id", "bench", "--socket"])
            .arg(dir.path().join("vsock.sock_1024"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?,
    );
    let host_out = lines(host.0.stdout.take().context("host stdout")?);
    let (_, first) = host_out.recv_timeout(Duration::from_secs(10))?;
    if !first.contains("listening") {
        bail!("agent host: {first}");
    }
    let cmdline = std::fs::read_to_string(a.image.join("cmdline"))?
        .trim()
        .to_string();
    let t0 = Instant::now();
    let mut vm = Guard(
        Command::new(vmm)
            .args(["launch", "--kernel"])
            .arg(a.image.join("vmlinuz"))
            .arg("--initrd")
            .arg(a.image.join("initrd.img"))
            .args([
                "--cmdline",
                &cmdline,
                "--memory-mib",
                &a.memory_mib.to_string(),
                "--rng",
                "--cid",
                &(3 + i).to_string(),
            ])
            .arg("--vsock-uds")
            .arg(&uds)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let serial = lines(vm.0.stdout.take().context("serial")?);
    let deadline = t0 + Duration::from_secs(60);
    let mut marker = None;
    let mut ready = None;
    while marker.is_none() || ready.is_none() {
        if Instant::now() > deadline {
            bail!("run {i}: no marker or ready within 60 s");
        }
        if let Some(st) = vm.0.try_wait()? {
            bail!("run {i}: cell0-vmm exited ({st}) before the agent was ready");
        }
        if let Ok((t, l)) = serial.recv_timeout(Duration::from_millis(1)) {
            if marker.is_none() && l.contains("cell0-agent: init start") {
                marker = Some(t - t0);
            }
        }
        if let Ok((t, l)) = host_out.try_recv() {
            if ready.is_none() && l.contains("\"ready\"") {
                ready = Some(t - t0);
            }
        }
    }
    writeln!(host.0.stdin.as_mut().context("host stdin")?, "shutdown")?;
    let end = Instant::now() + Duration::from_secs(30);
    while vm.0.try_wait()?.is_none() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok((marker.unwrap_or_default(), ready.unwrap_or_default()))
}

fn pct(v: &[Duration], p: f64) -> f64 {
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)].as_secs_f64() * 1e3
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let mut out = std::io::stdout().lock();
    if let Some(why) = unbootable() {
        if !a.force {
            writeln!(out, "cannot measure Linux boot on this host: {why}")?;
            return Ok(());
        }
    }
    let vmm = sibling("cell0-vmm")?;
    let agent = sibling("cell0-agent")?;
    let mut to_marker = Vec::new();
    let mut to_ready = Vec::new();
    for i in 0..a.runs {
        let (m, r) = boot(&a, &vmm, &agent, i)?;
        to_marker.push(m);
        to_ready.push(r);
    }
    to_marker.sort();
    to_ready.sort();
    if a.json {
        writeln!(
            out,
            "{}",
            serde_json::json!({
                "runs": a.runs,
                "to_init_marker_ms": {"min": pct(&to_marker, 0.0), "p50": pct(&to_marker, 0.5), "p99": pct(&to_marker, 0.99), "max": pct(&to_marker, 1.0)},
                "to_agent_ready_ms": {"min": pct(&to_ready, 0.0), "p50": pct(&to_ready, 0.5), "p99": pct(&to_ready, 0.99), "max": pct(&to_ready, 1.0)},
            })
        )?;
    } else {
        writeln!(out, "{} boots of {}", a.runs, a.image.display())?;
        for (name, v) in [
            ("cell0-vmm start -> init marker", &to_marker),
            ("cell0-vmm start -> agent ready", &to_ready),
        ] {
            writeln!(
                out,
                "{name:32} min {:8.2} ms  p50 {:8.2} ms  p99 {:8.2} ms  max {:8.2} ms",
                pct(v, 0.0),
                pct(v, 0.5),
                pct(v, 0.99),
                pct(v, 1.0)
            )?;
        }
    }
    Ok(())
}
