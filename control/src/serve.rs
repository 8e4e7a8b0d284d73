// SPDX-License-Identifier: Apache-2.0
//! `cell0d serve`: the embedded single-node control plane — Raft store,
//! gRPC API (with reflection), node agent, `/metrics` and the audit log in
//! one process, state in one data dir.
//!
//! Files in the data dir: `raft/` (log, snapshot), `node/vms/<id>/` (run dirs),
//! `audit.log`, `cell0d.lock` (one daemon per data dir), `cell0d.addr` (the
//! bound addresses, JSON, written once serving).

// Start-up errors are returned once; their size does not matter.
#![allow(clippy::result_large_err)]

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cell0_proto::grpc::{
    cluster_service_server::ClusterServiceServer, node_service_server::NodeServiceServer,
    vm_service_server::VmServiceServer,
};

use crate::api::Api;
use crate::audit::AuditLog;
use crate::metrics::Metrics;
use crate::node::{Agent, NodeConfig};
use crate::store::Store;

/// Errors of `cell0d serve`.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A file in the data dir could not be used.
    #[error("cannot use {path}")]
    Io {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Another cell0d holds the data dir.
    #[error("another cell0d is serving the data dir {0} (its cell0d.lock is held)")]
    Locked(PathBuf),
    /// The store failed.
    #[error("the Raft store failed")]
    Store(#[from] crate::store::StoreError),
    /// The node agent failed.
    #[error("the node agent failed")]
    Node(#[from] crate::node::NodeError),
    /// The audit log failed.
    #[error("the audit log failed")]
    Audit(#[from] crate::audit::AuditError),
    /// The metrics endpoint failed.
    #[error("the metrics endpoint failed")]
    Metrics(#[from] crate::metrics::MetricsError),
    /// The gRPC listener failed.
    #[error("cannot listen for gRPC on {addr}")]
    Listen {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("the gRPC server failed")]
    Grpc(#[from] tonic::transport::Error),
    /// The SYPAS router could not start.
    #[error("the SYPAS router failed")]
    Router(#[from] crate::router::RouterError),
    /// Reflection could not be set up.
    #[error("cannot set up gRPC reflection")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// Settings of `cell0d serve`.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Data dir.
    pub data_dir: PathBuf,
    /// gRPC listen address (port 0: any).
    pub listen: SocketAddr,
    /// Metrics listen address (port 0: any).
    pub metrics: SocketAddr,
    /// Raft member id.
    pub raft_id: u64,
    /// Log entries between snapshots.
    pub snapshot_every: u64,
    /// The node agent's settings (its data dir is `data_dir`).
    pub node: NodeConfig,
}

fn lock_data_dir(dir: &Path) -> Result<std::fs::File, ServeError> {
    let p = dir.join("cell0d.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&p)
        .map_err(|source| ServeError::Io {
            path: p.clone(),
            source,
        })?;
    // SAFETY: flock on a descriptor we own; the lock lives as long as the file.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r != 0 {
        return Err(ServeError::Locked(dir.to_path_buf()));
    }
    Ok(f)
}

/// Runs the daemon until SIGINT or SIGTERM. VMs keep running when it exits;
/// the next `cell0d serve` on the same data dir re-adopts them.
pub async fn run(cfg: ServeConfig) -> Result<(), ServeError> {
    std::fs::create_dir_all(&cfg.data_dir).map_err(|source| ServeError::Io {
        path: cfg.data_dir.clone(),
        source,
    })?;
    let _lock = lock_data_dir(&cfg.data_dir)?;
    let metrics = Arc::new(Metrics::new());
    let audit = Arc::new(AuditLog::open(&cfg.data_dir.join("audit.log"))?);
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| ServeError::Listen {
            addr: cfg.listen,
            source,
        })?;
    let grpc_addr = listener.local_addr().map_err(|source| ServeError::Listen {
        addr: cfg.listen,
        source,
    })?;
    let mut node_cfg = cfg.node.clone();
    if node_cfg.address.is_empty() {
        node_cfg.address = grpc_addr.to_string();
    }
    let store = Store::open(
        &cfg.data_dir,
        cfg.raft_id,
        &grpc_addr.to_string(),
        cfg.snapshot_every,
        metrics.clone(),
    )
    .await?;
    // The SYPAS router: root keys and its refusal log under the data dir, a
    // host socket, and one listener per VM (attached by the node agent).
    let router = Arc::new(crate::router::Router::new(crate::router::RouterConfig {
        audit_log: Some(cfg.data_dir.join("router-audit.log")),
        ..crate::router::RouterConfig::new(cfg.data_dir.join("router"))
    })?);
    let router_sock = cfg.data_dir.join("router.sock");
    router.listen_host(&router_sock).await?;
    let agent = Agent::start(
        node_cfg,
        store.clone(),
        metrics.clone(),
        Some(router.clone()),
    )
    .await?;
    let agent_task = tokio::spawn(agent.clone().run());
    let (metrics_addr, metrics_task) = crate::metrics::serve(cfg.metrics, metrics.clone()).await?;

    let api = Api::new(store.clone(), agent.clone(), metrics.clone(), audit);
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(cell0_proto::grpc::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let addr_file = cfg.data_dir.join("cell0d.addr");
    let info = serde_json::json!({
        "grpc": grpc_addr.to_string(),
        "metrics": metrics_addr.to_string(),
        "router": router_sock.display().to_string(),
        "pid": std::process::id(),
    });
    crate::store::sm::write_atomic(&addr_file, info.to_string().as_bytes()).map_err(|source| {
        ServeError::Io {
            path: addr_file.clone(),
            source,
        }
    })?;
    tracing::info!(grpc = %grpc_addr, metrics = %metrics_addr, data = %cfg.data_dir.display(), "cell0d serving");
    let shutdown = async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async {
                match term.as_mut() {
                    Some(t) => { t.recv().await; }
                    None => std::future::pending::<()>().await,
                }
            } => {}
        }
        tracing::info!("shutting down; VMs keep running and are re-adopted at the next start");
    };
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(reflection)
        .add_service(VmServiceServer::new(api.clone()))
        .add_service(NodeServiceServer::new(api.clone()))
        .add_service(ClusterServiceServer::new(api))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown,
        )
        .await?;
    agent_task.abort();
    metrics_task.abort();
    router.shutdown().await;
    store.shutdown().await;
    let _ = std::fs::remove_file(&addr_file);
    Ok(())
}

/// `cell0d serve`'s command line.
#[derive(clap::Args, Debug)]
#[command(after_help = "Examples:
  cell0d serve --data-dir /var/lib/cell0
  cell0d serve --data-dir /tmp/c0 --listen 127.0.0.1:0 --metrics 127.0.0.1:0
  cell0d serve --data-dir /tmp/c0 --cpu-overcommit 256   # many small nano VMs

Logs: RUST_LOG (e.g. RUST_LOG=info,cell0_control=debug).")]
pub struct ServeArgs {
    /// Data dir: Raft log and snapshots, VM run dirs, audit log.
    #[arg(long, env = "CELL0_DATA_DIR", default_value = "/var/lib/cell0")]
    pub data_dir: PathBuf,
    /// gRPC listen address.
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// Prometheus /metrics listen address.
    #[arg(long, default_value = "127.0.0.1:9070")]
    pub metrics: SocketAddr,
    /// Raft member id.
    #[arg(long, default_value_t = 1)]
    pub node_id: u64,
    /// Raft log entries between snapshots (the log before a snapshot is purged).
    #[arg(long, default_value_t = crate::store::SNAPSHOT_EVERY)]
    pub snapshot_every: u64,
    /// Node name (default: the host name).
    #[arg(long)]
    pub node_name: Option<String>,
    /// The cell0-vmm executable (default: next to cell0d, else on PATH).
    #[arg(long, env = "CELL0_VMM")]
    pub vmm: Option<PathBuf>,
    /// vCPUs this node offers (default: online CPUs).
    #[arg(long)]
    pub vcpus: Option<u32>,
    /// Memory this node offers in MiB (default: physical memory).
    #[arg(long)]
    pub memory_mib: Option<u64>,
    /// vCPU overcommit: placed vCPUs ≤ vcpus × ratio.
    #[arg(long, default_value_t = 16.0)]
    pub cpu_overcommit: f64,
    /// Memory overcommit: placed memory ≤ memory × ratio.
    #[arg(long, default_value_t = 1.5)]
    pub memory_overcommit: f64,
    /// First restart delay in ms (doubles up to --backoff-max-ms).
    #[arg(long, default_value_t = 200)]
    pub backoff_ms: u64,
    /// Longest restart delay in ms.
    #[arg(long, default_value_t = 30_000)]
    pub backoff_max_ms: u64,
    /// Health check interval in ms.
    #[arg(long, default_value_t = 5_000)]
    pub health_ms: u64,
    /// Zone of this node.
    #[arg(long, default_value = "local")]
    pub zone: String,
    /// Region of this node.
    #[arg(long, default_value = "local")]
    pub region: String,
}

fn default_vmm() -> PathBuf {
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            let p = dir.join("cell0-vmm");
            if p.is_file() {
                return p;
            }
        }
    }
    PathBuf::from("cell0-vmm")
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_lowercase())
        .ok()
        .filter(|s| crate::spec::is_dns_label(s))
        .unwrap_or_else(|| "node-1".into())
}

fn phys_mib() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let (pages, size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    if pages > 0 && size > 0 {
        (pages as u64 * size as u64) >> 20
    } else {
        1024
    }
}

/// Runs `cell0d serve` with its command-line arguments.
pub async fn serve_main(a: ServeArgs) -> Result<(), ServeError> {
    let vmm = a.vmm.unwrap_or_else(default_vmm);
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    let node = NodeConfig {
        node_id: a.node_name.unwrap_or_else(host_name),
        address: String::new(),
        data_dir: a.data_dir.clone(),
        vmm_bin: vmm,
        capacity: crate::store::state::Resources {
            vcpus: a.vcpus.unwrap_or(cpus),
            memory_mib: a.memory_mib.unwrap_or_else(phys_mib),
        },
        cpu_overcommit: a.cpu_overcommit,
        memory_overcommit: a.memory_overcommit,
        backoff_initial: Duration::from_millis(a.backoff_ms),
        backoff_max: Duration::from_millis(a.backoff_max_ms),
        health_interval: Duration::from_millis(a.health_ms),
        zone: a.zone,
        region: a.region,
    };
    run(ServeConfig {
        data_dir: a.data_dir,
        listen: a.listen,
        metrics: a.metrics,
        raft_id: a.node_id,
        snapshot_every: a.snapshot_every,
        node,
    })
    .await
}
