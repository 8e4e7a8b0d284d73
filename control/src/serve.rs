// SPDX-License-Identifier: Apache-2.0
//! `cell0d serve`: the embedded single-node control plane — Raft store,
//! gRPC API (with reflection), node agent, `/metrics` and the audit log in
//! one process, state in one data dir.
//!
//! Files in the data dir: `raft/` (log, snapshot), `node/vms/<id>/` (run dirs),
//! `audit.log`, `cell0d.lock` (one daemon per data dir), `cell0d.member` (the
//! member id and gRPC address, JSON, written as soon as Raft is served),
//! `cell0d.addr` (the bound addresses, JSON, written once the API serves).
//!
//! Start-up order: the gRPC server starts first with `RaftService` and
//! `ClusterService`, because members need each other to elect a leader; the
//! VM and node services answer UNAVAILABLE until this member knows a leader
//! and its node agent has registered (a member started with `--join` waits
//! there until `cell0ctl cluster add` adds it).

// Start-up errors are returned once; their size does not matter.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use cell0_proto::grpc::{
    admission_service_server::AdmissionServiceServer, cluster_service_server::ClusterServiceServer,
    node_service_server::NodeServiceServer, raft_service_server::RaftServiceServer,
    vm_service_server::VmServiceServer,
};
use tonic::body::Body;
use tonic::codegen::{BoxFuture, Context, Poll, Service, http};
use tonic::server::NamedService;

use crate::api::Api;
use crate::audit::AuditLog;
use crate::metrics::Metrics;
use crate::node::remote::{Owner, Remote};
use crate::node::{Agent, NodeConfig};
use crate::store::network::MAX_MESSAGE;
use crate::store::rpc::{ClusterApi, RaftRpc};
use crate::store::{Bootstrap, NodeId, Store, StoreConfig};

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
    /// A command-line value is wrong.
    #[error("{0}")]
    Usage(String),
    /// `--tls-dir` is not usable.
    #[error("--tls-dir: {0}")]
    Tls(#[from] crate::tls::TlsError),
}

/// Settings of `cell0d serve`.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Data dir.
    pub data_dir: PathBuf,
    /// gRPC listen address (port 0: any).
    pub listen: SocketAddr,
    /// Mutual TLS for gRPC, served and dialled (`--tls-dir`); `None`: plain TCP.
    pub tls: Option<crate::tls::TlsDir>,
    /// What `AdmissionService` admits (node attestation).
    pub admission: crate::node::admission::AdmissionSettings,
    /// Metrics listen address (port 0: any).
    pub metrics: SocketAddr,
    /// Raft member id.
    pub raft_id: u64,
    /// The address other members reach this one at (default: the bound gRPC address).
    pub advertise: Option<String>,
    /// What a fresh data dir does.
    pub bootstrap: Bootstrap,
    /// Log entries between snapshots.
    pub snapshot_every: u64,
    /// The node agent's settings (its data dir is `data_dir`).
    pub node: NodeConfig,
    /// Heartbeat deadlines of node agents on other hosts and of the
    /// members' own nodes (watched while this member leads).
    pub node_deadlines: crate::node::liveness::Deadlines,
    /// Heartbeat interval of this member's own node agent, in a
    /// multi-member cluster.
    pub heartbeat: Duration,
    /// Its self-fencing lease (`None`: never).
    pub lease: Option<Duration>,
    /// Started as (part of) a cluster: `--init`, `--join` or `--peers`. Its
    /// own node then heartbeats to the leader and is watched, even while the
    /// cluster has only this member, so that it is watched once `cluster
    /// add` grows it. The one-member default (none of the three) is not.
    pub clustered: bool,
}

pub(crate) fn lock_data_dir(dir: &Path) -> Result<std::fs::File, ServeError> {
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

/// Answers UNAVAILABLE until the service behind it is set: the API of a
/// member that has not joined a cluster yet, or whose node agent is starting.
#[derive(Clone)]
struct Gate<S> {
    inner: Arc<OnceLock<S>>,
}

impl<S> Gate<S> {
    fn new() -> Self {
        Self {
            inner: Arc::new(OnceLock::new()),
        }
    }
}

impl<S: NamedService> NamedService for Gate<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<http::Request<Body>> for Gate<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        match self.inner.get() {
            Some(s) => {
                let mut s = s.clone();
                Box::pin(async move {
                    std::future::poll_fn(|cx| s.poll_ready(cx)).await?;
                    s.call(req).await
                })
            }
            None => Box::pin(async {
                Ok(tonic::Status::unavailable(
                    "this cell0d member is starting: it knows no Raft leader yet (a member \
                     started with --join waits for `cell0ctl cluster add`), or its node agent \
                     is registering; try again, or ask another member",
                )
                .into_http())
            }),
        }
    }
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
    let advertise = cfg
        .advertise
        .clone()
        .unwrap_or_else(|| grpc_addr.to_string());
    let store = Store::open(
        &cfg.data_dir,
        StoreConfig {
            node_id: cfg.raft_id,
            addr: advertise.clone(),
            snapshot_every: cfg.snapshot_every,
            bootstrap: cfg.bootstrap.clone(),
            tls: cfg.tls.clone(),
        },
        metrics.clone(),
    )
    .await?;

    // Shutdown: SIGINT or SIGTERM, seen by every phase below.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
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
        let _ = stop_tx.send(true);
    });
    let stopped = {
        let rx = stop_rx.clone();
        move || {
            let mut rx = rx.clone();
            async move {
                let _ = rx.wait_for(|s| *s).await;
            }
        }
    };

    // Raft and ClusterService serve at once; the API once this member has a
    // leader and a node agent.
    let cluster_api = ClusterApi::new(store.clone(), metrics.clone(), audit.clone())
        .with_own_serial(cfg.tls.as_ref().map(|t| t.serial()));
    let alone = cluster_api.alone_flag();
    let vm_gate = Gate::<VmServiceServer<Api>>::new();
    let node_gate = Gate::<NodeServiceServer<Api>>::new();
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(cell0_proto::grpc::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    match &cfg.tls {
        Some(t) => {
            tracing::info!(dir = %t.dir().display(), name = t.name(), "gRPC over mutual TLS: clients need a certificate of the cluster CA")
        }
        None if !cfg.listen.ip().is_loopback()
            || cfg.bootstrap != Bootstrap::Init(BTreeMap::new()) =>
        {
            tracing::warn!(
                "INSECURE: gRPC is plain TCP (--insecure-plaintext): anyone who reaches {} can send Raft messages and API calls, and no certificate is checked; give the members --tls-dir (docs/CLUSTER.md, Security)",
                cfg.listen
            )
        }
        None => {}
    }
    if !cfg.admission.required {
        tracing::warn!(
            "--allow-unattested-nodes: node agents on other hosts register without proving their cell0d and cell0-vmm"
        );
    }
    let admission = crate::node::admission::AdmissionApi::new(
        cfg.admission.clone(),
        audit.clone(),
        metrics.clone(),
    );
    // Over TLS every request is checked against the replicated revocation
    // list and its certificate's role (tls::roles_for): only members may
    // send Raft messages, a node only registers, heartbeats and is admitted.
    let access = {
        let store = store.clone();
        crate::tls::Access::new(
            move |serial| store.read(|s| s.revoked.get(serial).cloned()),
            Some(audit.clone()),
        )
    };
    let router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(access.guard(reflection))
        .add_service(
            access.guard(
                RaftServiceServer::new(RaftRpc::new(store.clone()))
                    .max_decoding_message_size(MAX_MESSAGE)
                    .max_encoding_message_size(MAX_MESSAGE),
            ),
        )
        .add_service(access.guard(ClusterServiceServer::new(cluster_api)))
        .add_service(access.guard(vm_gate.clone()))
        .add_service(access.guard(node_gate.clone()))
        .add_service(access.guard(AdmissionServiceServer::new(admission.clone())));
    // No Nagle on accepted connections: small gRPC replies (Raft
    // acknowledgements, forwarded writes) must not wait for the peer's
    // delayed ACK. With --tls-dir every connection must complete a TLS
    // handshake with a client certificate of the cluster CA first.
    let mut server = match &cfg.tls {
        Some(t) => tokio::spawn(router.serve_with_incoming_shutdown(
            crate::tls::incoming(listener, t.server_config()?),
            stopped(),
        )),
        None => tokio::spawn(router.serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            stopped(),
        )),
    };
    let member_file = cfg.data_dir.join("cell0d.member");
    let member = serde_json::json!({
        "id": cfg.raft_id,
        "grpc": grpc_addr.to_string(),
        "advertise": advertise,
        "pid": std::process::id(),
    });
    crate::store::sm::write_atomic(&member_file, member.to_string().as_bytes()).map_err(
        |source| ServeError::Io {
            path: member_file.clone(),
            source,
        },
    )?;
    tracing::info!(id = cfg.raft_id, grpc = %grpc_addr, %advertise, "Raft member serving; waiting for a leader");

    let started = async {
        loop {
            match store.wait_leader(Some(Duration::from_secs(10))).await {
                Ok(()) => break,
                Err(_) => tracing::info!(
                    id = cfg.raft_id,
                    "no Raft leader known yet (a --join member waits for: cell0ctl cluster add {} {advertise})",
                    cfg.raft_id
                ),
            }
        }
        // The SYPAS router: root keys and its refusal log under the data dir, a
        // host socket, and one listener per VM (attached by the node agent).
        let (router, router_sock) = crate::router::Router::for_host(&cfg.data_dir).await?;
        // In a multi-member cluster this member's own node is watched like a
        // `cell0d node` agent's: it heartbeats to the leader, which marks it
        // down when it goes silent, and it fences itself when its lease ends.
        // So is a member started with --init alone (the cluster may grow),
        // and one whose node was watched before (it must keep heartbeating,
        // or its leader would mark it down). The one-member default (no
        // --init, --join or --peers) reads its placements from its own state
        // and sends no heartbeats.
        let watched_before = store.read(|s| {
            s.nodes.get(&node_cfg.node_id).is_some_and(|n| {
                n.labels
                    .get(crate::node::liveness::REMOTE_LABEL)
                    .map(String::as_str)
                    == Some(crate::node::liveness::MEMBER_VALUE)
            })
        });
        let clustered = cfg.clustered || store.status().members.len() > 1 || watched_before;
        if !clustered {
            alone.store(true, std::sync::atomic::Ordering::Relaxed);
            let agent = Agent::start(
                node_cfg,
                store.clone(),
                metrics.clone(),
                Some(router.clone()),
            )
            .await?;
            return Ok::<_, ServeError>((router, router_sock, agent, None));
        }
        if let Some(t) = &cfg.tls {
            crate::node::remote::set_tls(t.client_config());
        }
        let mut remote = Remote::new(
            node_cfg.clone(),
            Owner::Member {
                store: store.clone(),
                id: cfg.raft_id,
            },
            vec![advertise.clone()],
            cfg.heartbeat,
            cfg.lease,
        );
        let (_, revision) = remote.start().await?;
        let agent = Agent::start_remote(
            node_cfg,
            remote.placements(),
            metrics.clone(),
            Some(router.clone()),
        )
        .await?;
        // Registered before the API serves, as the one-member default is.
        remote.register_first().await?;
        // Watch's events of this node's VMs come from the member's own state.
        let (placements, mut events) = (remote.placements(), store.subscribe());
        tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(ev) => placements.publish(ev),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                }
            }
        });
        tracing::info!(node = %agent.node_id(), "this member's node heartbeats to the leader (watched)");
        Ok((router, router_sock, agent, Some((remote, revision))))
    };
    let (router, router_sock, agent, remote) = tokio::select! {
        r = started => r?,
        () = stopped() => {
            store.shutdown().await;
            let _ = (&mut server).await;
            let _ = std::fs::remove_file(&member_file);
            return Ok(());
        }
        r = &mut server => {
            store.shutdown().await;
            return match r {
                Ok(r) => r.map_err(ServeError::from),
                Err(e) => Err(ServeError::Usage(format!("the gRPC server task failed: {e}"))),
            };
        }
    };
    let agent_task = tokio::spawn(agent.clone().run());
    // Failure detection of node agents on other hosts (`cell0d node`).
    let liveness = crate::node::liveness::Liveness::new(cfg.node_deadlines);
    let liveness_task = tokio::spawn(liveness.clone().run(store.clone()));
    let (metrics_addr, metrics_task) = crate::metrics::serve(cfg.metrics, metrics.clone()).await?;

    let api =
        Api::new(store.clone(), agent.clone(), metrics.clone(), audit).with_liveness(liveness);
    // A node registers only after Admit, unless --allow-unattested-nodes.
    let api = match cfg.admission.required {
        true => api.with_admission(admission),
        false => api,
    };
    let _ = vm_gate.inner.set(VmServiceServer::new(api.clone()));
    let _ = node_gate.inner.set(NodeServiceServer::new(api));
    // This member's own node heartbeats once the API serves (the leader may
    // be this member).
    let remote_task = remote.map(|(r, revision)| {
        let agent = agent.clone();
        let stop = stopped();
        tokio::spawn(async move {
            if let Err(e) = r.run(agent, true, revision, stop).await {
                tracing::error!(error = %e, "this member's node agent stopped heartbeating; its node runs no VM");
            }
        })
    });
    let addr_file = cfg.data_dir.join("cell0d.addr");
    let info = serde_json::json!({
        "grpc": grpc_addr.to_string(),
        "metrics": metrics_addr.to_string(),
        "router": router_sock.display().to_string(),
        "pid": std::process::id(),
        "member": cfg.raft_id,
    });
    crate::store::sm::write_atomic(&addr_file, info.to_string().as_bytes()).map_err(|source| {
        ServeError::Io {
            path: addr_file.clone(),
            source,
        }
    })?;
    tracing::info!(grpc = %grpc_addr, metrics = %metrics_addr, data = %cfg.data_dir.display(), "cell0d serving");
    let r = server.await;
    agent_task.abort();
    if let Some(t) = remote_task {
        t.abort();
    }
    liveness_task.abort();
    metrics_task.abort();
    router.shutdown().await;
    store.shutdown().await;
    let _ = std::fs::remove_file(&addr_file);
    let _ = std::fs::remove_file(&member_file);
    match r {
        Ok(r) => Ok(r?),
        Err(e) => Err(ServeError::Usage(format!(
            "the gRPC server task failed: {e}"
        ))),
    }
}

/// `cell0d serve`'s command line.
#[derive(clap::Args, Debug)]
#[command(after_help = "Examples:
  cell0d serve --data-dir /var/lib/cell0
  cell0d serve --data-dir /tmp/c0 --listen 127.0.0.1:0 --metrics 127.0.0.1:0
  cell0d serve --data-dir /tmp/c0 --cpu-overcommit 256   # many small nano VMs
  # a three-member control plane (docs/CLUSTER.md):
  cell0d serve --data-dir /tmp/m1 --node-id 1 --listen 127.0.0.1:7071 --node-name m1
  cell0d serve --data-dir /tmp/m2 --node-id 2 --listen 127.0.0.1:7072 --node-name m2 --join
  cell0ctl --endpoint 127.0.0.1:7071 cluster add 2 127.0.0.1:7072

Logs: RUST_LOG (e.g. RUST_LOG=info,cell0_control=debug).")]
pub struct ServeArgs {
    /// This host's node: name, capacity, VMM, jail.
    #[command(flatten)]
    pub host: crate::node::HostArgs,
    /// Data dir: Raft log and snapshots, VM run dirs, audit log.
    #[arg(long, env = "CELL0_DATA_DIR", default_value = "/var/lib/cell0")]
    pub data_dir: PathBuf,
    /// gRPC listen address.
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// Prometheus /metrics listen address.
    #[arg(long, default_value = "127.0.0.1:9070")]
    pub metrics: SocketAddr,
    /// Raft member id (1 or more; unique in the cluster).
    #[arg(long, default_value_t = 1)]
    pub node_id: u64,
    /// The address other members reach this one at (default: the bound --listen address).
    #[arg(long)]
    pub advertise: Option<String>,
    /// Mutual TLS: a dir with ca.pem (the cluster CA), cert.pem and key.pem
    /// (`cell0d issue-cert`). gRPC then requires a client certificate of the
    /// cluster CA, and this member dials the others with its own.
    /// Without --tls-dir, `--init` on a fresh data dir creates the cluster CA
    /// and this member's certificate in `<data-dir>/pki` and serves mutual TLS
    /// with them (later starts reuse them); --join and --peers members need
    /// --tls-dir. A one-member control plane on loopback stays plain TCP.
    #[arg(long, env = "CELL0_TLS_DIR")]
    pub tls_dir: Option<PathBuf>,
    /// Serve plain TCP where mutual TLS is otherwise required (--init,
    /// --join, --peers, or a non-loopback --listen/--advertise): anyone who
    /// reaches the port can send Raft messages and API calls. For tests and
    /// isolated networks only.
    #[arg(long, conflicts_with = "tls_dir")]
    pub insecure_plaintext: bool,
    /// Node admission: PEM bundle of the CAs that certify node TPMs (default:
    /// this host's swtpm local CA, $CELL0_TPM_CA_DIR or /var/lib/cell0/tpm-ca).
    #[arg(long)]
    pub node_tpm_ca: Option<PathBuf>,
    /// Node admission: an accepted SHA-256 of cell0d (repeatable; default:
    /// this cell0d's own digest).
    #[arg(long, value_name = "HEX")]
    pub node_golden_cell0d: Vec<String>,
    /// Node admission: an accepted SHA-256 of cell0-vmm (repeatable; default:
    /// the digest of this member's --vmm).
    #[arg(long, value_name = "HEX")]
    pub node_golden_vmm: Vec<String>,
    /// Let node agents on other hosts register without attestation. By
    /// default a node (`NodeService.Register`) must first pass attestation of
    /// its cell0d and cell0-vmm (`AdmissionService`, `cell0d node --attest`)
    /// on the member it registers with; this opt-out logs a warning.
    #[arg(long)]
    pub allow_unattested_nodes: bool,
    /// On a fresh data dir, initialize a new cluster of this member plus --peers
    /// (the default when neither --join nor --peers is given: a one-member cluster).
    #[arg(long, conflicts_with = "join")]
    pub init: bool,
    /// On a fresh data dir, wait to be added to an existing cluster
    /// (`cell0ctl cluster add ID ADDR` on any member).
    #[arg(long)]
    pub join: bool,
    /// The other initial members, `ID=HOST:PORT,...`. With --init this member
    /// initializes the cluster with them; without it, it waits for the member
    /// that does.
    #[arg(long, value_name = "ID=ADDR,...", value_delimiter = ',')]
    pub peers: Vec<String>,
    /// Raft log entries between snapshots (the log before a snapshot is purged).
    #[arg(long, default_value_t = crate::store::SNAPSHOT_EVERY)]
    pub snapshot_every: u64,
    /// A watched node (a `cell0d node` agent, or a member's own node in a
    /// multi-member cluster) silent this long (ms) is marked suspect: it
    /// takes no new VMs.
    #[arg(long, default_value_t = 1500)]
    pub node_suspect_ms: u64,
    /// A watched node silent this long (ms) is marked down: its restartable
    /// VMs are placed elsewhere, the others marked lost.
    #[arg(long, default_value_t = 3000)]
    pub node_down_ms: u64,
    /// In a multi-member cluster: this member's own node heartbeats to the
    /// leader every this many ms (like `cell0d node`).
    #[arg(long, default_value_t = 500)]
    pub heartbeat_ms: u64,
    /// In a multi-member cluster: self-fencing lease in ms of this member's
    /// own node; with no acknowledged heartbeat for this long it terminates
    /// its VMs. Keep it below --node-down-ms minus the time a VMM takes to
    /// die. 0: never.
    #[arg(long, default_value_t = 2000)]
    pub lease_ms: u64,
}

pub(crate) fn default_vmm() -> PathBuf {
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

pub(crate) fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_lowercase())
        .ok()
        .filter(|s| crate::spec::is_dns_label(s))
        .unwrap_or_else(|| "node-1".into())
}

pub(crate) fn phys_mib() -> u64 {
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
    let node = a.host.config(&a.data_dir);
    let admission = crate::node::admission::AdmissionSettings {
        tpm_ca: a.node_tpm_ca,
        cell0d: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe")),
        vmm: node.vmm_bin.clone(),
        golden_cell0d: a.node_golden_cell0d,
        golden_vmm: a.node_golden_vmm,
        required: !a.allow_unattested_nodes,
        warm_up: a.join || !a.peers.is_empty(),
    };
    if a.node_id == 0 {
        return Err(ServeError::Usage(
            "--node-id 0 is reserved (it means \"no leader\"); use 1 or more".into(),
        ));
    }
    if a.node_suspect_ms == 0 || a.node_down_ms <= a.node_suspect_ms {
        return Err(ServeError::Usage(format!(
            "--node-down-ms ({}) must be longer than --node-suspect-ms ({}), which must be 1 or more",
            a.node_down_ms, a.node_suspect_ms
        )));
    }
    crate::node::remote::check_timing(a.heartbeat_ms, a.lease_ms)?;
    if a.lease_ms != 0 && a.lease_ms + 500 > a.node_down_ms {
        tracing::warn!(
            "--lease-ms {} ends after --node-down-ms {} minus 0.5 s: a node cut off from the \
             leader may still run its VMs when they start elsewhere",
            a.lease_ms,
            a.node_down_ms
        );
    }
    let node_deadlines = crate::node::liveness::Deadlines {
        suspect: Duration::from_millis(a.node_suspect_ms),
        down: Duration::from_millis(a.node_down_ms),
    };
    let peers = parse_peers(&a.peers)?;
    if peers.contains_key(&a.node_id) {
        return Err(ServeError::Usage(format!(
            "--peers lists this member's own id {}; list only the others",
            a.node_id
        )));
    }
    // Started as (part of) a cluster rather than as the one-member default.
    let clustered = a.init || a.join || !peers.is_empty();
    let bootstrap = if a.join || (!a.init && !peers.is_empty()) {
        Bootstrap::Join
    } else {
        Bootstrap::Init(peers)
    };
    // Mutual TLS: --tls-dir, the CA this data dir created at --init, or a
    // new one; plain TCP only on loopback alone or with --insecure-plaintext.
    let tls = match crate::tls::serve_tls(&crate::tls::ServeTlsFlags {
        data_dir: &a.data_dir,
        tls_dir: a.tls_dir.as_deref(),
        insecure_plaintext: a.insecure_plaintext,
        init_alone: matches!(&bootstrap, Bootstrap::Init(p) if p.is_empty()),
        clustered,
        peers: !a.peers.is_empty(),
        listen: a.listen,
        advertise: a.advertise.as_deref(),
        member_id: a.node_id,
    })? {
        crate::tls::ServeTls::Tls(t) => Some(t),
        crate::tls::ServeTls::Plain => None,
    };
    run(ServeConfig {
        data_dir: a.data_dir,
        tls,
        admission,
        listen: a.listen,
        metrics: a.metrics,
        raft_id: a.node_id,
        advertise: a.advertise,
        bootstrap,
        snapshot_every: a.snapshot_every,
        node,
        node_deadlines,
        heartbeat: Duration::from_millis(a.heartbeat_ms),
        lease: (a.lease_ms > 0).then(|| Duration::from_millis(a.lease_ms)),
        clustered,
    })
    .await
}

/// Parses `--peers` (`ID=HOST:PORT` items).
pub fn parse_peers(items: &[String]) -> Result<BTreeMap<NodeId, String>, ServeError> {
    let mut out = BTreeMap::new();
    for it in items.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
        let (id, addr) = it
            .split_once('=')
            .ok_or_else(|| ServeError::Usage(format!("--peers: {it:?} is not ID=HOST:PORT")))?;
        let id: NodeId = id.trim().parse().ok().filter(|i| *i > 0).ok_or_else(|| {
            ServeError::Usage(format!("--peers: {id:?} is not a member id (1 or more)"))
        })?;
        let addr = addr.trim();
        if !addr.contains(':') || addr.contains(char::is_whitespace) {
            return Err(ServeError::Usage(format!(
                "--peers: {addr:?} is not HOST:PORT"
            )));
        }
        if out.insert(id, addr.to_string()).is_some() {
            return Err(ServeError::Usage(format!(
                "--peers: member {id} is listed twice"
            )));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_parse_and_bad_ones_are_refused() {
        let p = parse_peers(&["2=127.0.0.1:7072".into(), " 3=h:1 ".into()]).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p[&3], "h:1");
        for bad in ["2", "x=h:1", "0=h:1", "2=nohostport", "2=h:1,2=h:2"] {
            let items: Vec<String> = bad.split(',').map(String::from).collect();
            assert!(parse_peers(&items).is_err(), "{bad}");
        }
    }
}
