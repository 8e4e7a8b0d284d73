// SPDX-License-Identifier: Apache-2.0
//! `sypas-echo-server --socket PATH`: serves the `echo` service (methods
//! `echo`, `sleep`, `fail`; see `cell0_proto::host::echo`) on a Unix socket,
//! accepting every HELLO. Prints `listening on PATH` on stdout once it accepts
//! connections; exits cleanly on SIGINT or SIGTERM and removes the socket.
#![allow(clippy::print_stdout)]

mod common;

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use cell0_proto::host::server::bind_unix;
use cell0_proto::host::{EchoService, Server};
use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};

/// Serve the SYPAS echo service on a Unix socket.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Unix socket path to listen on (a stale socket file is replaced).
    #[arg(long)]
    socket: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    common::init_tracing();
    let args = Args::parse();
    let listener = bind_unix(&args.socket)
        .await
        .with_context(|| format!("binding {}", args.socket.display()))?;
    println!("listening on {}", args.socket.display());
    std::io::stdout().flush().context("flushing stdout")?;

    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    let server = Server::new(EchoService::new());
    let result = server.serve_until(listener, shutdown).await;
    let _ = std::fs::remove_file(&args.socket);
    result.context("serving")?;
    Ok(())
}
