// SPDX-License-Identifier: Apache-2.0
//! Guest↔host SYPAS benchmark over virtio-vsock: boots the nano guest running
//! `sypas-serve`, connects from the host through the VMM's hybrid vsock socket,
//! and reports the CALL/REPLY round trip (64 B payload, p50/p99), pipelined
//! calls per second, and MB/s with 64 KiB payloads.
//!
//! `cell0-bench-sypas-vm [--calls N] [--poll 0|1] [--inflight K] [--json]`
#![allow(clippy::print_stdout)]

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use cell0_proto::host::{Client, ClientConfig, Endpoint, ReconnectPolicy};
use cell0_tests::{ChildGuard, SERVE_LISTENING, vmm, wait_for_serial_line};

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

async fn pipelined(c: &Client, total: usize, inflight: usize, size: usize) -> anyhow::Result<f64> {
    let payload = vec![0x5au8; size];
    let t0 = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    let mut sent = 0;
    while sent < total || !set.is_empty() {
        while sent < total && set.len() < inflight {
            let c = c.clone();
            let p = payload.clone();
            set.spawn(async move { c.call("echo", "echo", p).await });
            sent += 1;
        }
        if let Some(r) = set.join_next().await {
            let reply = r??;
            if reply.payload.len() != size {
                bail!("short reply: {} of {size} bytes", reply.payload.len());
            }
        }
    }
    Ok(t0.elapsed().as_secs_f64())
}

fn main() -> anyhow::Result<()> {
    let mut calls = 10_000usize;
    let mut poll = 1u8;
    let mut inflight = 64usize;
    let mut json = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--calls" => calls = args.next().context("--calls N")?.parse()?,
            "--poll" => poll = args.next().context("--poll 0|1")?.parse()?,
            "--inflight" => inflight = args.next().context("--inflight K")?.parse()?,
            "--json" => json = true,
            other => bail!("unknown argument {other}"),
        }
    }
    if calls == 0 || inflight == 0 {
        bail!("--calls and --inflight must be positive");
    }
    let dir = tempfile::tempdir()?;
    let uds = dir.path().join("v.sock");
    let mut child = vmm()
        .arg("launch")
        .args(["--cid", "3", "--memory-mib", "256", "--vsock-uds"])
        .arg(&uds)
        .arg("--cmdline")
        .arg(format!(
            "cell0.test=sypas-serve cell0.port=5000 cell0.poll={poll}"
        ))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start cell0-vmm")?;
    let out = child.stdout.take().context("no stdout")?;
    let _guard = ChildGuard(child);
    wait_for_serial_line(out, SERVE_LISTENING, None)?;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (rtt, msgs, mbps) = rt.block_on(async {
        let cfg = ClientConfig {
            agent_id: "bench".into(),
            call_timeout: Duration::from_secs(60),
            ping_interval: None,
            reconnect: ReconnectPolicy::never(),
            ..ClientConfig::default()
        };
        let c = Client::connect(
            Endpoint::HybridVsock {
                uds: uds.clone(),
                port: 5000,
            },
            cfg,
        )
        .await?;
        for _ in 0..200 {
            c.call("echo", "echo", vec![1u8; 64]).await?;
        }
        let mut rtt = Vec::with_capacity(calls);
        for i in 0..calls {
            let t = Instant::now();
            let r = c.call("echo", "echo", vec![i as u8; 64]).await?;
            rtt.push(t.elapsed().as_secs_f64() * 1e6);
            if r.payload.len() != 64 {
                bail!("short reply");
            }
        }
        let secs = pipelined(&c, calls, inflight, 64).await?;
        let msgs = calls as f64 / secs;
        let bulk = 512usize;
        let secs = pipelined(&c, bulk, 8, 64 << 10).await?;
        let mbps = (bulk * (64 << 10)) as f64 / secs / 1e6;
        c.goodbye("done").await?;
        Ok::<_, anyhow::Error>((rtt, msgs, mbps))
    })?;
    let mut rtt = rtt;
    let (p50, p99) = (pct(&mut rtt, 0.5), pct(&mut rtt, 0.99));
    let mode = if poll == 1 { "busy-poll" } else { "interrupts" };
    if json {
        println!(
            "{}",
            serde_json::json!({"guest_mode": mode, "calls": calls, "rtt_us": {"p50": p50, "p99": p99},
                "pipelined_calls_per_s": msgs, "inflight": inflight, "mb_per_s_64k": mbps})
        );
    } else {
        println!("guest mode: {mode}; {calls} calls of 64 B");
        println!("round trip: p50 {p50:.1} us, p99 {p99:.1} us");
        println!("pipelined ({inflight} in flight): {msgs:.0} calls/s");
        println!("64 KiB payloads (8 in flight): {mbps:.1} MB/s");
    }
    Ok(())
}
