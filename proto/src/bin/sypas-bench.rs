// SPDX-License-Identifier: Apache-2.0
//! `sypas-bench`: host-only SYPAS figures over a Unix socket.
//!
//! 1. CALL/REPLY round trip, 64 B payload, one call at a time: p50/p99.
//! 2. Pipelined small CALLs (`--window` in flight on one connection): messages/s.
//! 3. Bulk: 64 KiB CALLs, `--bulk-window` in flight: MB/s of payload each way.
//!
//! Without `--socket` it serves `echo` in-process on a temporary socket (same
//! process, same runtime, so client and server share the CPUs). It prints
//! figures, or one JSON object with `--json`; it never judges them.
#![allow(clippy::print_stdout)]

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use cell0_proto::host::server::bind_unix;
use cell0_proto::host::{Client, ClientConfig, EchoService, Endpoint, ReconnectPolicy, Server};
use clap::Parser;
use tokio::task::JoinSet;

/// SYPAS host benchmark.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Use this echo server instead of an in-process one.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Round trips measured for the latency figure.
    #[arg(long, default_value_t = 10_000)]
    calls: usize,
    /// Payload bytes for the latency and pipelined figures.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Messages for the pipelined figure.
    #[arg(long, default_value_t = 200_000)]
    pipelined: usize,
    /// Calls in flight for the pipelined figure.
    #[arg(long, default_value_t = 256)]
    window: usize,
    /// MiB of payload sent for the bulk figure.
    #[arg(long, default_value_t = 256)]
    bulk_mib: usize,
    /// Payload bytes per bulk call.
    #[arg(long, default_value_t = 64 * 1024)]
    bulk_size: usize,
    /// Calls in flight for the bulk figure.
    #[arg(long, default_value_t = 8)]
    bulk_window: usize,
    /// Run everything on one thread (tokio current-thread runtime) instead of
    /// the multi-thread runtime.
    #[arg(long)]
    current_thread: bool,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(serde::Serialize)]
struct Report {
    transport: &'static str,
    server: &'static str,
    runtime: &'static str,
    payload_bytes: usize,
    round_trip: common::Latency,
    pipelined_messages: usize,
    pipelined_window: usize,
    pipelined_calls_per_s: f64,
    pipelined_messages_per_s: f64,
    bulk_payload_bytes: usize,
    bulk_window: usize,
    bulk_calls: usize,
    bulk_mb_per_s: f64,
}

/// Runs `total` echo calls of `payload` with `window` callers, checking replies.
async fn pipelined(
    client: &Client,
    total: usize,
    window: usize,
    payload: Bytes,
) -> anyhow::Result<Duration> {
    let window = window.clamp(1, total.max(1));
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for w in 0..window {
        let n = total / window + usize::from(w < total % window);
        let client = client.clone();
        let payload = payload.clone();
        tasks.spawn(async move {
            for _ in 0..n {
                let reply = client.call("echo", "echo", payload.clone()).await?;
                if reply.payload.len() != payload.len() {
                    bail!("short echo reply");
                }
            }
            Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.context("caller task")??;
    }
    Ok(start.elapsed())
}

fn main() -> anyhow::Result<()> {
    common::init_tracing();
    let args = Args::parse();
    let runtime = if args.current_thread {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    }
    .enable_all()
    .build()
    .context("starting the tokio runtime")?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let dir = tempfile::tempdir().context("temporary directory")?;
    let (path, server_kind) = match &args.socket {
        Some(p) => (p.clone(), "external"),
        None => {
            let path = dir.path().join("echo.sock");
            let listener = bind_unix(&path).await?;
            let server = Arc::new(Server::new(EchoService::new()));
            tokio::spawn(async move { server.serve(listener).await });
            (path, "in-process")
        }
    };
    let config = ClientConfig {
        ping_interval: None,
        reconnect: ReconnectPolicy::never(),
        call_timeout: Duration::from_secs(60),
        ..ClientConfig::new("sypas-bench")
    };
    let client = Client::connect(Endpoint::Unix(path), config)
        .await
        .context("connecting")?;

    let small = Bytes::from(vec![0x5a; args.size]);
    for _ in 0..1000 {
        client.call("echo", "echo", small.clone()).await?;
    }
    let mut samples = Vec::with_capacity(args.calls);
    for _ in 0..args.calls {
        let start = Instant::now();
        let reply = client.call("echo", "echo", small.clone()).await?;
        samples.push(start.elapsed());
        if reply.payload != small {
            bail!("echo reply differs");
        }
    }
    let round_trip = common::Latency::from_samples(&mut samples).context("--calls 0")?;

    let elapsed = pipelined(&client, args.pipelined, args.window, small.clone()).await?;
    let calls_per_s = args.pipelined as f64 / elapsed.as_secs_f64();

    let bulk = Bytes::from(vec![0xa5; args.bulk_size]);
    let bulk_calls = (args.bulk_mib * 1024 * 1024).div_ceil(args.bulk_size.max(1));
    let elapsed = pipelined(&client, bulk_calls, args.bulk_window, bulk).await?;
    let mb_per_s = (bulk_calls * args.bulk_size) as f64 / 1e6 / elapsed.as_secs_f64();
    client.goodbye("bench done").await?;

    let report = Report {
        transport: "unix",
        server: server_kind,
        runtime: if args.current_thread {
            "current-thread"
        } else {
            "multi-thread"
        },
        payload_bytes: args.size,
        round_trip,
        pipelined_messages: args.pipelined,
        pipelined_window: args.window,
        pipelined_calls_per_s: calls_per_s,
        pipelined_messages_per_s: calls_per_s * 2.0,
        bulk_payload_bytes: args.bulk_size,
        bulk_window: args.bulk_window,
        bulk_calls,
        bulk_mb_per_s: mb_per_s,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "SYPAS host benchmark (Unix socket, {} echo server, {} runtime)",
            report.server, report.runtime
        );
        println!(
            "  round trip, {} B CALL/REPLY: {}",
            report.payload_bytes, report.round_trip
        );
        println!(
            "  pipelined, {} calls, window {}: {:.0} calls/s ({:.0} messages/s counting both directions)",
            report.pipelined_messages,
            report.pipelined_window,
            report.pipelined_calls_per_s,
            report.pipelined_messages_per_s
        );
        println!(
            "  bulk, {} calls of {} B, window {}: {:.1} MB/s of payload each way",
            report.bulk_calls, report.bulk_payload_bytes, report.bulk_window, report.bulk_mb_per_s
        );
    }
    Ok(())
}
