// SPDX-License-Identifier: Apache-2.0
//! Helpers shared by the SYPAS command-line tools (each uses a subset).
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use cell0_proto::host::Endpoint;

/// Where to connect, from `--socket` or `--vsock-uds`/`--port`.
#[derive(Debug, Clone, clap::Args)]
pub struct EndpointArgs {
    /// Unix socket of a SYPAS server (the router, or `sypas-echo-server`).
    #[arg(long, conflicts_with = "vsock_uds")]
    pub socket: Option<PathBuf>,
    /// A VMM's hybrid vsock socket: connect, then `CONNECT <port>`.
    #[arg(long)]
    pub vsock_uds: Option<PathBuf>,
    /// The guest vsock port for `--vsock-uds`.
    #[arg(long, default_value_t = cell0_proto::ROUTER_VSOCK_PORT)]
    pub port: u32,
}

impl EndpointArgs {
    /// The endpoint, if one was given.
    pub fn endpoint(&self) -> Option<Endpoint> {
        match (&self.socket, &self.vsock_uds) {
            (Some(path), _) => Some(Endpoint::Unix(path.clone())),
            (None, Some(uds)) => Some(Endpoint::HybridVsock {
                uds: uds.clone(),
                port: self.port,
            }),
            (None, None) => None,
        }
    }
}

/// Latency summary in microseconds (nearest-rank percentiles).
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Latency {
    pub samples: usize,
    pub min_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    pub mean_us: f64,
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

impl Latency {
    /// Summarises `samples` (sorted in place). `None` when empty.
    pub fn from_samples(samples: &mut [Duration]) -> Option<Latency> {
        samples.sort_unstable();
        let n = samples.len();
        let rank = |q: f64| -> f64 {
            let idx = ((q * n as f64).ceil() as usize).clamp(1, n) - 1;
            us(samples[idx])
        };
        let first = *samples.first()?;
        let last = *samples.last()?;
        let total: Duration = samples.iter().sum();
        Some(Latency {
            samples: n,
            min_us: us(first),
            p50_us: rank(0.50),
            p90_us: rank(0.90),
            p99_us: rank(0.99),
            p999_us: rank(0.999),
            max_us: us(last),
            mean_us: us(total) / n as f64,
        })
    }
}

impl std::fmt::Display for Latency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "n={} min {:.1} µs · p50 {:.1} µs · p90 {:.1} µs · p99 {:.1} µs · p99.9 {:.1} µs · max {:.1} µs · mean {:.1} µs",
            self.samples,
            self.min_us,
            self.p50_us,
            self.p90_us,
            self.p99_us,
            self.p999_us,
            self.max_us,
            self.mean_us
        )
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (default `warn`).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
