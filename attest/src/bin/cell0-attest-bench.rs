// SPDX-License-Identifier: Apache-2.0
//! `cell0-attest-bench`: prints attestation figures against a real swtpm. It
//! asserts nothing about time.
//!
//! - vTPM start: swtpm_setup (EK + certificate), swtpm start, AK creation;
//! - measured boot: hashing a 10 MiB kernel and a 20 MiB initrd, plus the six
//!   PCR extends (DESIGN.md §5);
//! - quote + verify latency, one VM;
//! - verifications per second for one verifier on one thread.
//!
//! `cargo run --release -p cell0-attest --bin cell0-attest-bench -- [--json]`

#![allow(clippy::print_stdout)]

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use cell0_attest::{
    BootInputs, DeviceSpec, LocalCa, Manifest, Nonce, Sha256Digest, Verifier, VmConfig,
    VmmIdentity, Vtpm, VtpmOptions, WorkloadSpec, boot_events,
};
use clap::Parser;
use serde::Serialize;

#[derive(Parser)]
#[command(
    name = "cell0-attest-bench",
    about = "Attestation figures against swtpm"
)]
struct Args {
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Quote + verify round trips to time.
    #[arg(long, default_value_t = 50)]
    quotes: usize,
    /// Verifications to time for the throughput figure.
    #[arg(long, default_value_t = 2000)]
    verifications: usize,
    /// Kernel size in MiB.
    #[arg(long, default_value_t = 10)]
    kernel_mib: usize,
    /// Initrd size in MiB.
    #[arg(long, default_value_t = 20)]
    initrd_mib: usize,
}

#[derive(Serialize)]
struct Stats {
    mean_ms: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

fn stats(mut d: Vec<Duration>) -> Stats {
    d.sort_unstable();
    let ms = |x: Duration| x.as_secs_f64() * 1e3;
    let pick = |q: f64| {
        d.get(((d.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .map_or(0.0, ms)
    };
    Stats {
        mean_ms: d.iter().map(|x| ms(*x)).sum::<f64>() / d.len().max(1) as f64,
        p50_ms: pick(0.5),
        p99_ms: pick(0.99),
        max_ms: d.last().copied().map_or(0.0, ms),
    }
}

#[derive(Serialize)]
struct Report {
    kernel_bytes: usize,
    initrd_bytes: usize,
    first_vtpm_start_with_ca_creation_ms: f64,
    vtpm_start_ms: f64,
    vtpm_start_manufacture_ms: f64,
    vtpm_start_swtpm_ready_ms: f64,
    vtpm_start_ak_ms: f64,
    measured_boot_hash_ms: f64,
    measured_boot_extend_ms: f64,
    measured_boot_total_ms: f64,
    enrollment_ms: f64,
    vtpm_stop_ms: f64,
    quote: Stats,
    verify: Stats,
    quote_plus_verify: Stats,
    verifications: usize,
    verifications_per_second: f64,
}

fn filler(len: usize, seed: u8) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(seed);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn main() -> Result<()> {
    let args = Args::parse();
    let run = tempfile::tempdir()?;
    let ca = tempfile::tempdir()?;
    let opts = VtpmOptions::new(run.path(), ca.path());

    // The first vTPM also creates the host-local CA (RSA-3072 keys); time a
    // second one, as every later VM start looks.
    let t = Instant::now();
    drop(Vtpm::start(&opts).context("cannot start a vTPM (is swtpm installed?)")?);
    let first_start = t.elapsed();
    let t = Instant::now();
    let vtpm = Vtpm::start(&opts)?;
    let vtpm_start = t.elapsed();
    let timings = vtpm.start_timings();

    let kernel = filler(args.kernel_mib << 20, 1);
    let initrd = filler(args.initrd_mib << 20, 2);
    let vmm = VmmIdentity::of_current_exe(env!("CARGO_PKG_VERSION"))?;
    let config = VmConfig {
        vcpus: 2,
        memory_mib: 512,
        vsock_cid: Some(3),
        shm_mib: 64,
        devices: vec![
            DeviceSpec::new("serial", Some(0x3f8), Some(4)),
            DeviceSpec::new("virtio-vsock", Some(0xd000_0000), Some(5)),
        ],
    };
    let workload = WorkloadSpec {
        agent_id: "bench".into(),
        image_manifest: Some(Sha256Digest::of(b"bench image")),
        command: vec!["/bin/agent".into()],
    };
    let inputs = BootInputs {
        vmm: &vmm,
        kernel: &kernel,
        cmdline: b"console=ttyS0 reboot=k panic=1",
        initrd: Some(&initrd),
        config: &config,
        workload: &workload,
    };

    // measure_boot = boot_events (hashing) + record_boot (extends + log write).
    let t = Instant::now();
    let log = boot_events(&inputs)?;
    let hash = t.elapsed();
    let t = Instant::now();
    vtpm.record_boot(&log)?;
    let extend = t.elapsed();
    let total = hash + extend;
    if vtpm.read_pcrs()? != log.replay() {
        bail!("the PCRs do not hold the replay of the event log");
    }

    let ca_pem = LocalCa::open(ca.path(), &opts.swtpm_localca)?.bundle_pem()?;
    let mut verifier = Verifier::new(&ca_pem)?;
    let t = Instant::now();
    let challenge = verifier.begin_enrollment("bench", vtpm.ak_bundle())?;
    let response = vtpm.activate_credential(&challenge)?;
    verifier.finish_enrollment("bench", &response)?;
    let enrollment = t.elapsed();

    let manifest = Manifest::for_boot(Some("bench".into()), &inputs)?;
    let (mut q, mut v, mut qv) = (Vec::new(), Vec::new(), Vec::new());
    let mut last = None;
    for _ in 0..args.quotes.max(1) {
        let t0 = Instant::now();
        let nonce = verifier.issue_nonce("bench");
        let quote = vtpm.quote(&nonce)?;
        let t1 = Instant::now();
        let verdict = verifier.verify("bench", &quote, &log, &manifest);
        let t2 = Instant::now();
        if !verdict.is_trusted() {
            bail!("an honest quote was rejected: {verdict}");
        }
        q.push(t1 - t0);
        v.push(t2 - t1);
        qv.push(t2 - t0);
        last = Some((nonce, quote));
    }

    // Throughput: one verifier, one thread, full verification each time.
    let (nonce, quote): (Nonce, _) = last.context("no quote")?;
    let n = args.verifications.max(1);
    let t = Instant::now();
    for _ in 0..n {
        let verdict = verifier.verify_with_nonce("bench", &nonce, &quote, &log, &manifest);
        if !verdict.is_trusted() {
            bail!("verification failed: {verdict}");
        }
    }
    let per_second = n as f64 / t.elapsed().as_secs_f64();

    let t = Instant::now();
    drop(vtpm);
    let stop = t.elapsed();

    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let report = Report {
        kernel_bytes: kernel.len(),
        initrd_bytes: initrd.len(),
        first_vtpm_start_with_ca_creation_ms: ms(first_start),
        vtpm_start_ms: ms(vtpm_start),
        vtpm_start_manufacture_ms: ms(timings.manufacture),
        vtpm_start_swtpm_ready_ms: ms(timings.swtpm_ready),
        vtpm_start_ak_ms: ms(timings.ak),
        measured_boot_hash_ms: ms(hash),
        measured_boot_extend_ms: ms(extend),
        measured_boot_total_ms: ms(total),
        enrollment_ms: ms(enrollment),
        vtpm_stop_ms: ms(stop),
        quote: stats(q),
        verify: stats(v),
        quote_plus_verify: stats(qv),
        verifications: n,
        verifications_per_second: per_second,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "first vTPM start, creating the local CA: {:.1} ms",
            report.first_vtpm_start_with_ca_creation_ms
        );
        println!(
            "vTPM start: {:.1} ms (swtpm_setup {:.1} ms, swtpm ready {:.1} ms, AK {:.1} ms)",
            report.vtpm_start_ms,
            report.vtpm_start_manufacture_ms,
            report.vtpm_start_swtpm_ready_ms,
            report.vtpm_start_ak_ms
        );
        println!(
            "measured boot, {} MiB kernel + {} MiB initrd: {:.1} ms (hash {:.1} ms, extends + log {:.1} ms)",
            args.kernel_mib,
            args.initrd_mib,
            report.measured_boot_total_ms,
            report.measured_boot_hash_ms,
            report.measured_boot_extend_ms
        );
        println!(
            "AK enrollment (make + activate credential): {:.1} ms",
            report.enrollment_ms
        );
        println!("vTPM stop: {:.1} ms", report.vtpm_stop_ms);
        for (name, s) in [
            ("quote", &report.quote),
            ("verify", &report.verify),
            ("quote + verify", &report.quote_plus_verify),
        ] {
            println!(
                "{name}: mean {:.2} ms, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                s.mean_ms, s.p50_ms, s.p99_ms, s.max_ms
            );
        }
        println!(
            "one verifier, one thread: {:.0} verifications/s ({n} verifications)",
            report.verifications_per_second
        );
    }
    Ok(())
}
