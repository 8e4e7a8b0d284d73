// SPDX-License-Identifier: Apache-2.0
//! Boot benchmark: launches the built-in nano guest N times and prints, as
//! medians (and p90), the wall time from spawning `cell0-vmm` to
//! `cell0-nano: ready` on serial, the time to VM exit, and the VMM's peak RSS.
//!
//! `cell0-bench-boot [--runs N] [--memory-mib M] [--vmm PATH] [--json]`
#![allow(clippy::print_stdout)]

use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, bail};

struct Sample {
    ready_us: f64,
    exit_us: f64,
    maxrss_kib: u64,
}

fn wait_rusage(pid: i32) -> anyhow::Result<(i32, libc::rusage)> {
    let mut status = 0;
    // SAFETY: rusage is plain old data; zeroed is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: pid is our own child; status and ru point to live locals.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    if r != pid {
        bail!("wait4 failed: {}", std::io::Error::last_os_error());
    }
    Ok((status, ru))
}

fn one(vmm: &PathBuf, memory_mib: u64) -> anyhow::Result<Sample> {
    let t0 = Instant::now();
    let mut child = Command::new(vmm)
        .args(["launch", "--memory-mib", &memory_mib.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot spawn cell0-vmm")?;
    let out = child.stdout.take().context("no stdout")?;
    let mut ready = None;
    for line in BufReader::new(out).lines() {
        let line = line?;
        if ready.is_none() && line == "cell0-nano: ready" {
            ready = Some(t0.elapsed());
        }
    }
    let (status, ru) = wait_rusage(child.id() as i32)?;
    let exit = t0.elapsed();
    // The child was reaped by wait4; keep std from waiting on it again.
    std::mem::forget(child);
    let st = std::process::ExitStatus::from_raw(status);
    if !st.success() {
        bail!("cell0-vmm exited with {st}");
    }
    let ready = ready.context("the guest never printed `cell0-nano: ready`")?;
    Ok(Sample {
        ready_us: ready.as_secs_f64() * 1e6,
        exit_us: exit.as_secs_f64() * 1e6,
        maxrss_kib: ru.ru_maxrss as u64,
    })
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() - 1) as f64 * p).round() as usize;
    v[i]
}

fn main() -> anyhow::Result<()> {
    let mut runs = 30usize;
    let mut json = false;
    let mut memory_mib = 128u64;
    let mut vmm = cell0_tests::bin_dir().join("cell0-vmm");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--runs" => runs = args.next().context("--runs N")?.parse()?,
            "--memory-mib" => memory_mib = args.next().context("--memory-mib M")?.parse()?,
            "--vmm" => vmm = PathBuf::from(args.next().context("--vmm PATH")?),
            "--json" => json = true,
            "-h" | "--help" => {
                println!("cell0-bench-boot [--runs N] [--memory-mib M] [--vmm PATH] [--json]");
                return Ok(());
            }
            other => bail!("unknown argument {other}"),
        }
    }
    if runs < 1 {
        bail!("--runs must be at least 1");
    }
    // One warm-up run so page cache and KVM module state are settled.
    one(&vmm, memory_mib)?;
    let mut s = Vec::with_capacity(runs);
    for _ in 0..runs {
        s.push(one(&vmm, memory_mib)?);
    }
    let mut ready: Vec<f64> = s.iter().map(|x| x.ready_us).collect();
    let mut exit: Vec<f64> = s.iter().map(|x| x.exit_us).collect();
    let mut rss: Vec<f64> = s.iter().map(|x| x.maxrss_kib as f64).collect();
    let r = (pct(&mut ready, 0.5), pct(&mut ready, 0.9));
    let e = (pct(&mut exit, 0.5), pct(&mut exit, 0.9));
    let m = (pct(&mut rss, 0.5), pct(&mut rss, 1.0));
    if json {
        let v = serde_json::json!({
            "runs": runs,
            "memory_mib": memory_mib,
            "start_to_ready_us": {"p50": r.0, "p90": r.1},
            "start_to_exit_us": {"p50": e.0, "p90": e.1},
            "peak_rss_kib": {"p50": m.0, "max": m.1},
        });
        println!("{v}");
    } else {
        println!("runs: {runs} (nano guest, {memory_mib} MiB, 1 vCPU)");
        println!("start -> ready:  p50 {:8.0} us   p90 {:8.0} us", r.0, r.1);
        println!("start -> exit:   p50 {:8.0} us   p90 {:8.0} us", e.0, e.1);
        println!("peak RSS:        p50 {:8.0} KiB  max {:8.0} KiB", m.0, m.1);
    }
    Ok(())
}
