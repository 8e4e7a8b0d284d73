// SPDX-License-Identifier: Apache-2.0
//! `cell0-agent`: the guest agent. As PID 1 (no arguments) it is the init of
//! an agent image; `run` runs the agent logic alone; `host` is the host end
//! for one agent (tests and the Linux end-to-end test).

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use cell0_agent::api;
use cell0_agent::host::{self, HostConfig, HostEvent};
use cell0_agent::init;
use cell0_agent::session::{self, AgentConfig, Outcome};
use cell0_agent::transport::Endpoint;
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "cell0-agent", version, about = "The cell0 Linux guest agent")]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Be the init of the guest (what PID 1 does with no arguments).
    Init,
    /// Run the agent logic without init duties (connect, bootstrap, serve).
    Run {
        /// Connect to this Unix socket instead of vsock.
        #[arg(long)]
        unix: Option<PathBuf>,
        /// vsock CID of the host.
        #[arg(long, default_value_t = cell0_proto::HOST_CID)]
        cid: u32,
        /// vsock port of the router.
        #[arg(long, default_value_t = cell0_proto::ROUTER_VSOCK_PORT)]
        port: u32,
        /// Agent id to say in HELLO before bootstrap.
        #[arg(long, default_value = "")]
        agent_id: String,
    },
    /// Serve one agent on a Unix socket (such as a VM's `<vsock_uds>_1024`),
    /// print what it sends as JSON lines, and take commands on stdin:
    /// `exec SHELL-COMMAND`, `put PATH TEXT`, `get PATH`, `shutdown`.
    Host {
        /// The socket to listen on.
        #[arg(long)]
        socket: PathBuf,
        /// The agent's id.
        #[arg(long, default_value = "agent-0")]
        agent_id: String,
        /// The token handed out at bootstrap.
        #[arg(long, default_value = "cell0-test-token")]
        token: String,
        /// Workload argv word (repeat; words may start with `-`).
        #[arg(long = "workload", allow_hyphen_values = true)]
        workload: Vec<String>,
        /// Seconds to wait for the agent's ready.
        #[arg(long, default_value_t = 60)]
        ready_timeout: u64,
    },
}

fn logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(false)
        .without_time()
        .try_init();
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// PID 1: never returns normally; on any end it powers off.
fn init_main() -> ExitCode {
    // The boot marker: the first thing on the console, with the guest uptime.
    let start = init::uptime_ns().unwrap_or(0);
    let mounted = init::mount_all();
    let start = if start == 0 {
        init::uptime_ns().unwrap_or(0)
    } else {
        start
    };
    eprintln!("cell0-agent: init start uptime_ns={start}");
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let args = init::parse_cmdline(&cmdline);
    logging(&args.log);
    if let Err(e) = mounted {
        tracing::error!(error = %e, "mounting failed");
    }
    match init::load_modules(std::path::Path::new(init::MODULE_LIST)) {
        Ok(n) => tracing::info!(modules = n, "kernel modules loaded"),
        Err(e) => tracing::error!(error = %e, "loading kernel modules failed"),
    }
    let mut cfg = AgentConfig::new(Endpoint::Vsock {
        cid: cell0_proto::HOST_CID,
        port: args.vsock_port,
    });
    cfg.agent_id = args.agent_id;
    cfg.init_start_ns = start;
    match runtime() {
        Ok(rt) => {
            let outcome = rt.block_on(session::run(cfg));
            tracing::info!(?outcome, "agent done; powering off");
        }
        Err(e) => tracing::error!(error = %e, "cannot run the agent"),
    }
    let e = init::power_off();
    eprintln!("cell0-agent: reboot failed: {e}");
    // PID 1 must not exit; the kernel would panic (and with panic=1 reset).
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// An agent EVENT as a JSON line: output as text, exit and heartbeat decoded.
fn event_json(topic: &str, payload: &[u8]) -> serde_json::Value {
    use prost::Message;
    if topic.ends_with("/exit") {
        if let Ok(s) = api::ExitStatus::decode(payload) {
            return serde_json::json!({"event": topic, "exit": {"code": s.code, "signal": s.signal}});
        }
    } else if topic.ends_with("/heartbeat") {
        if let Ok(h) = api::Heartbeat::decode(payload) {
            return serde_json::json!({"event": topic, "heartbeat": {"seq": h.seq, "uptime_ns": h.uptime_ns, "workload_running": h.workload_running}});
        }
    }
    serde_json::json!({"event": topic, "data": String::from_utf8_lossy(payload)})
}

fn emit(v: serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

fn host_main(
    socket: PathBuf,
    agent_id: String,
    token: String,
    workload: Vec<String>,
    ready_timeout: u64,
) -> anyhow::Result<()> {
    let rt = runtime()?;
    rt.block_on(async move {
        let _ = std::fs::remove_file(&socket);
        let listener = tokio::net::UnixListener::bind(&socket)
            .with_context(|| format!("cannot listen on {}", socket.display()))?;
        emit(serde_json::json!({"listening": socket.display().to_string()}));
        let cfg = HostConfig {
            agent_id: agent_id.clone(),
            token: token.into_bytes().into(),
            workload: (!workload.is_empty()).then(|| api::Command { argv: workload, ..Default::default() }),
            heartbeat_ms: 0,
        };
        let mut conn = host::accept(&listener, cfg).await?;
        let (ready, _) = conn.wait_ready(Duration::from_secs(ready_timeout)).await?;
        emit(serde_json::json!({"ready": {
            "agent_id": ready.agent_id, "init_start_ns": ready.init_start_ns, "ready_ns": ready.ready_ns,
            "kernel": ready.kernel, "agent_version": ready.agent_version, "workload_pid": ready.workload_pid,
        }}));
        let (line_tx, mut line_rx) = tokio::sync::mpsc::channel::<String>(16);
        std::thread::spawn(move || {
            for line in std::io::stdin().lock().lines().map_while(Result::ok) {
                if line_tx.blocking_send(line).is_err() {
                    break;
                }
            }
        });
        loop {
            tokio::select! {
                ev = conn.events.recv() => match ev {
                    Some(HostEvent::Event { topic, payload }) => emit(event_json(&topic, &payload)),
                    Some(HostEvent::Ready(_)) => emit(serde_json::json!({"reconnected": true})),
                    Some(HostEvent::Closed) | None => { emit(serde_json::json!({"closed": true})); return Ok(()); }
                },
                line = line_rx.recv() => {
                    let line = line.unwrap_or_else(|| "shutdown".into());
                    let (verb, rest) = line.trim().split_once(' ').unwrap_or((line.trim(), ""));
                    match verb {
                        "exec" => {
                            let req = api::ExecRequest {
                                command: Some(api::Command { argv: vec!["/bin/sh".into(), "-c".into(), rest.into()], ..Default::default() }),
                                ..Default::default()
                            };
                            match conn.exec(&agent_id, &req, Duration::from_secs(120)).await {
                                Ok(r) => {
                                    let s = r.status.unwrap_or_default();
                                    emit(serde_json::json!({"exec": {"code": s.code, "signal": s.signal,
                                        "stdout": String::from_utf8_lossy(&r.stdout), "stderr": String::from_utf8_lossy(&r.stderr), "timed_out": r.timed_out}}));
                                }
                                Err(e) => emit(serde_json::json!({"error": format!("{e:#}")})),
                            }
                        }
                        "put" => {
                            let (path, text) = rest.split_once(' ').unwrap_or((rest, ""));
                            let req = api::PutFile { path: path.into(), data: text.as_bytes().to_vec().into(), mode: 0, mkdirs: true };
                            match conn.put_file(&agent_id, &req).await {
                                Ok(()) => emit(serde_json::json!({"put": path})),
                                Err(e) => emit(serde_json::json!({"error": format!("{e:#}")})),
                            }
                        }
                        "get" => match conn.get_file(&agent_id, rest).await {
                            Ok(f) => emit(serde_json::json!({"get": rest, "data": String::from_utf8_lossy(&f.data), "mode": f.mode})),
                            Err(e) => emit(serde_json::json!({"error": format!("{e:#}")})),
                        },
                        "shutdown" => {
                            if let Err(e) = conn.shutdown(&agent_id, 5000, "requested on the host").await {
                                emit(serde_json::json!({"error": format!("{e:#}")}));
                            }
                            for ev in conn.wait_closed(Duration::from_secs(30)).await.unwrap_or_default() {
                                if let HostEvent::Event { topic, payload } = ev {
                                    emit(event_json(&topic, &payload));
                                }
                            }
                            emit(serde_json::json!({"closed": true}));
                            return Ok(());
                        }
                        other => emit(serde_json::json!({"error": format!("unknown command {other:?}")})),
                    }
                }
            }
        }
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // SAFETY: getpid(2) has no preconditions.
    let pid1 = unsafe { libc::getpid() } == 1;
    let result = match cli.cmd {
        None if pid1 => return init_main(),
        Some(Cmd::Init) => return init_main(),
        None => Err(anyhow::anyhow!(
            "not PID 1: use `cell0-agent run` or `cell0-agent init`"
        )),
        Some(Cmd::Run {
            unix,
            cid,
            port,
            agent_id,
        }) => {
            logging(&std::env::var("CELL0_LOG").unwrap_or_else(|_| "info".into()));
            let endpoint = match unix {
                Some(p) => Endpoint::Unix(p),
                None => Endpoint::Vsock { cid, port },
            };
            let mut cfg = AgentConfig::new(endpoint);
            cfg.agent_id = agent_id;
            cfg.init_start_ns = init::uptime_ns().unwrap_or(0);
            runtime().map(|rt| match rt.block_on(session::run(cfg)) {
                Outcome::Shutdown { reason } => tracing::info!(%reason, "shut down"),
                Outcome::GaveUp { attempts } => tracing::error!(attempts, "gave up connecting"),
            })
        }
        Some(Cmd::Host {
            socket,
            agent_id,
            token,
            workload,
            ready_timeout,
        }) => {
            logging(&std::env::var("CELL0_LOG").unwrap_or_else(|_| "warn".into()));
            host_main(socket, agent_id, token, workload, ready_timeout)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cell0-agent: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
