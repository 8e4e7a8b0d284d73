// SPDX-License-Identifier: Apache-2.0
//! `sypas-ping`: connects to a SYPAS server, says HELLO, and measures round
//! trips: PING/PONG (default) or `echo.echo` CALLs of `--size` bytes. Prints
//! min/p50/p90/p99/max, or one JSON object with `--json`.
#![allow(clippy::print_stdout)]

mod common;

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use cell0_proto::host::{Client, ClientConfig, ReconnectPolicy};
use clap::{Parser, ValueEnum};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
enum Mode {
    /// PING → PONG.
    Ping,
    /// CALL echo.echo → REPLY, checking the bytes.
    Echo,
}

/// Measure SYPAS round trips.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    #[command(flatten)]
    endpoint: common::EndpointArgs,
    /// Round trips to measure.
    #[arg(long, short = 'c', default_value_t = 1000)]
    count: usize,
    /// Unmeasured round trips first.
    #[arg(long, default_value_t = 100)]
    warmup: usize,
    /// What to send.
    #[arg(long, value_enum, default_value_t = Mode::Ping)]
    mode: Mode,
    /// Payload bytes for `--mode echo`.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Agent id for HELLO.
    #[arg(long, default_value = "sypas-ping")]
    agent_id: String,
    /// Per round-trip timeout in milliseconds.
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(serde::Serialize)]
struct Report {
    endpoint: String,
    mode: Mode,
    size: usize,
    #[serde(flatten)]
    latency: common::Latency,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    common::init_tracing();
    let args = Args::parse();
    let Some(endpoint) = args.endpoint.endpoint() else {
        bail!("give --socket PATH or --vsock-uds PATH [--port N]");
    };
    let config = ClientConfig {
        call_timeout: Duration::from_millis(args.timeout_ms),
        ping_interval: None,
        reconnect: ReconnectPolicy::never(),
        ..ClientConfig::new(args.agent_id.clone())
    };
    let client = Client::connect(endpoint.clone(), config)
        .await
        .with_context(|| format!("connecting to {endpoint:?}"))?;
    let payload = bytes::Bytes::from((0..args.size).map(|i| i as u8).collect::<Vec<u8>>());
    let mut samples = Vec::with_capacity(args.count);
    for i in 0..args.warmup + args.count {
        let start = Instant::now();
        match args.mode {
            Mode::Ping => {
                client.ping().await.context("ping")?;
            }
            Mode::Echo => {
                let reply = client
                    .call("echo", "echo", payload.clone())
                    .await
                    .context("echo call")?;
                if reply.payload != payload {
                    bail!("echo reply {i} differs from the request");
                }
            }
        }
        if i >= args.warmup {
            samples.push(start.elapsed());
        }
    }
    client.goodbye("done").await.context("goodbye")?;
    let latency = common::Latency::from_samples(&mut samples).context("no samples (--count 0)")?;
    let report = Report {
        endpoint: format!("{endpoint:?}"),
        mode: args.mode,
        size: args.size,
        latency,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "{:?} round trips to {}: {}",
            report.mode, report.endpoint, report.latency
        );
    }
    Ok(())
}
