// SPDX-License-Identifier: Apache-2.0
//! The node agent: level-triggered reconciliation of the VMs the replicated
//! state places on this node against the `cell0-vmm` processes it runs.
//!
//! - Each VM gets a run dir `<data>/node/vms/<id>/` (API socket, vsock
//!   socket, serial log, VMM log, vTPM state, `state.json`); Delete removes it.
//! - Exits are seen through a pidfd at once; the restart policy is applied
//!   with exponential back-off.
//! - `state.json` records the pid and its start time, so that after a
//!   `cell0d` restart still-running VMMs are re-adopted (not killed, not
//!   launched twice); liveness is then checked through the API socket.
//! - Health: SYPAS PING over the hybrid vsock where the guest serves SYPAS
//!   (the nano guest's `sypas-serve` mode), else the API socket's `describe`.
//! - Every VMM runs jailed by default (`cell0-vmm launch --jail`, see
//!   docs/SECURITY.md): as an unprivileged uid/gid, in its own namespaces and
//!   cgroup, with its seccomp filters. The run dir is group-writable by that gid
//!   (sticky, so the VMM cannot remove cell0d's files), the router's listener
//!   for the guest is handed to it, and the jail's root is `<run dir>/jail/<id>`.

pub mod admission;
pub mod attest;
pub mod golden;
pub mod liveness;
pub mod local_api;
pub mod proc;
pub mod remote;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cell0_proto::grpc::{self, VmState};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::{Notify, broadcast, mpsc};

use crate::metrics::Metrics;
use crate::router::Router;
use crate::spec::RestartPolicy;
use crate::store::state::{NodeRecord, NodeState, Resources};
use crate::store::{Command, Desired, Store, VmRecord};
use proc::PidFd;

/// The line the nano guest prints once it runs.
pub const NANO_READY: &str = "cell0-nano: ready";
/// Longest Unix socket path.
const SUN_PATH_MAX: usize = 107;
/// Lifetime of the token minted for a nano guest's launch.
const TOKEN_TTL_S: u64 = 12 * 3600;
/// How long a stopped VMM gets before SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(3);
/// How long a VMM gets after SIGTERM before SIGKILL. A jailed VMM's supervisor
/// kills the VMM on SIGTERM and then removes its cgroup and jail directory, which
/// a SIGKILL would leave behind.
const TERM_GRACE: Duration = Duration::from_secs(2);
/// How long a fenced node's VMM gets after SIGTERM before SIGKILL: short, so
/// that a VM is gone well before the leader's down deadline.
const FENCE_GRACE: Duration = Duration::from_millis(500);
/// The uid and gid VMMs run as by default (`nobody`/`nogroup`).
pub const DEFAULT_VM_ID: u32 = 65534;
/// How long one lease renewal on a VMM's API socket may take.
const RENEW_TIMEOUT: Duration = Duration::from_millis(500);
/// `cell0-vmm`'s exit status when its lease ended (`vmm/src/lease.rs`).
pub const EXIT_LEASE_EXPIRED: i32 = 3;

/// Errors of the node agent.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// A file or directory operation failed.
    #[error("cannot {what} {path}")]
    Io {
        /// What was attempted.
        what: &'static str,
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The VM is not on this node.
    #[error("no VM named {0:?} on this node")]
    NoVm(String),
    /// The VM is not running.
    #[error("VM {id:?} is not running (state {state})")]
    NotRunning {
        /// Id.
        id: String,
        /// State.
        state: String,
    },
    /// Registering the node failed.
    #[error("cannot register the node")]
    Register(#[source] crate::store::StoreError),
    /// VMs cannot be jailed as configured.
    #[error("cannot jail VMs: {0}")]
    Jail(String),
    /// A command-line value is wrong (`cell0d node`).
    #[error("{0}")]
    Usage(String),
}

/// How the VMMs of this node are jailed (`cell0-vmm launch --jail`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmJail {
    /// The uid every VMM runs as (not 0).
    pub uid: u32,
    /// The gid every VMM runs as (not 0).
    pub gid: u32,
}

/// Node agent settings.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Node id.
    pub node_id: String,
    /// Address others reach its gRPC API at.
    pub address: String,
    /// Data dir (run dirs under `node/vms/`).
    pub data_dir: PathBuf,
    /// The cell0-vmm executable.
    pub vmm_bin: PathBuf,
    /// Physical capacity.
    pub capacity: Resources,
    /// vCPU overcommit ratio.
    pub cpu_overcommit: f64,
    /// Memory overcommit ratio.
    pub memory_overcommit: f64,
    /// First restart delay.
    pub backoff_initial: Duration,
    /// Longest restart delay.
    pub backoff_max: Duration,
    /// Interval of health checks.
    pub health_interval: Duration,
    /// Zone.
    pub zone: String,
    /// Region.
    pub region: String,
    /// The jail of every VMM; `None` only with `cell0d serve --no-jail`.
    pub jail: Option<VmJail>,
}

/// This host's node on the command line of `cell0d serve` (the embedded
/// node agent) and of `cell0d node` (an agent on another host).
#[derive(clap::Args, Debug, Clone)]
pub struct HostArgs {
    /// Node name (default: the host name).
    #[arg(long)]
    pub node_name: Option<String>,
    /// Zone of this node.
    #[arg(long, default_value = "local")]
    pub zone: String,
    /// Region of this node.
    #[arg(long, default_value = "local")]
    pub region: String,
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
    /// The uid every VMM runs as inside its jail (not 0).
    #[arg(long, default_value_t = DEFAULT_VM_ID)]
    pub vm_uid: u32,
    /// The gid every VMM runs as inside its jail (not 0).
    #[arg(long, default_value_t = DEFAULT_VM_ID)]
    pub vm_gid: u32,
    /// Debugging only: launch VMMs without the jail (namespaces, cgroup,
    /// unprivileged uid); logs a warning. The jail needs cell0d to run as root.
    #[arg(long, conflicts_with_all = ["vm_uid", "vm_gid"])]
    pub no_jail: bool,
}

impl HostArgs {
    /// The node agent's settings, with its data dir.
    pub fn config(self, data_dir: &Path) -> NodeConfig {
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1);
        NodeConfig {
            node_id: self.node_name.unwrap_or_else(crate::serve::host_name),
            address: String::new(),
            data_dir: data_dir.to_path_buf(),
            vmm_bin: self.vmm.unwrap_or_else(crate::serve::default_vmm),
            capacity: Resources {
                vcpus: self.vcpus.unwrap_or(cpus),
                memory_mib: self.memory_mib.unwrap_or_else(crate::serve::phys_mib),
            },
            cpu_overcommit: self.cpu_overcommit,
            memory_overcommit: self.memory_overcommit,
            backoff_initial: Duration::from_millis(self.backoff_ms),
            backoff_max: Duration::from_millis(self.backoff_max_ms),
            health_interval: Duration::from_millis(self.health_ms),
            zone: self.zone,
            region: self.region,
            jail: (!self.no_jail).then_some(VmJail {
                uid: self.vm_uid,
                gid: self.vm_gid,
            }),
        }
    }
}

/// What `state.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Persisted {
    /// VM id.
    pub id: String,
    /// cell0-vmm pid.
    pub pid: i32,
    /// Its start time (`/proc/PID/stat` field 22).
    pub start_time: u64,
    /// Launch time.
    pub launched_at_ms: u64,
    /// Restarts so far.
    pub restarts: u32,
    /// Launch counter.
    pub launch_seq: u64,
    /// Whether the guest was ready.
    pub ready: bool,
    /// Spawn → ready.
    pub ready_latency_us: u64,
    /// State name when written (a final state survives a cell0d restart).
    #[serde(default)]
    pub state: String,
    /// Last exit code.
    #[serde(default)]
    pub exit_code: i32,
    /// Last message.
    #[serde(default)]
    pub message: String,
    /// What cell0d appended to the cmdline of this launch.
    #[serde(default)]
    pub cmdline_extra: String,
    /// The placement epoch the VM was launched under (0: before epochs).
    #[serde(default)]
    pub epoch: u64,
}

/// The runtime state of one VM on this node.
#[derive(Clone)]
pub struct Runtime {
    /// State.
    pub state: VmState,
    /// Pid (0 when none).
    pub pid: i32,
    /// Last exit code (-1 none/unknown).
    pub exit_code: i32,
    /// Guest ready.
    pub ready: bool,
    /// Last message.
    pub message: String,
    /// Restarts.
    pub restarts: u32,
    /// Launch time.
    pub started_at_ms: u64,
    /// Spawn → ready.
    pub ready_latency_us: u64,
    /// How health was last checked.
    pub health: String,
    /// Launch counter (distinguishes exits of earlier launches).
    pub launch_seq: u64,
    spawned_at: Option<Instant>,
    next_restart: Option<Instant>,
    backoff: Duration,
    pidfd: Option<Arc<PidFd>>,
    stop_requested: bool,
    start_time: u64,
    /// The record as last seen.
    pub record: VmRecord,
    /// What cell0d appended to the cmdline of the current launch (the nano
    /// guest's agent id and token); part of the measured cmdline.
    pub cmdline_extra: String,
    /// The placement epoch of the current launch.
    pub epoch: u64,
    /// Set while the VMM of an older placement epoch is terminated, to be
    /// launched again under the record's epoch.
    replacing: bool,
}

struct Exit {
    id: String,
    seq: u64,
    code: Option<i32>,
}

/// Where a node agent learns the VMs placed on its node.
enum Source {
    /// The replicated state of the member it runs in (`cell0d serve`).
    Local(Store),
    /// What the control plane last sent an agent on another host
    /// (`cell0d node`, see [`remote`]).
    Remote(Arc<Placements>),
}

/// The placements of a node agent on another host, as last received from the
/// control plane in a heartbeat answer. Emptied to fence the node.
pub struct Placements {
    vms: Mutex<BTreeMap<String, VmRecord>>,
    changed: tokio::sync::watch::Sender<u64>,
    events: broadcast::Sender<crate::store::StoreEvent>,
    /// The per-VMM lease (docs/CLUSTER.md, fencing rule 5): VMMs are launched
    /// with `--lease-ms` and renewed after each acknowledged heartbeat.
    lease: Option<Duration>,
    /// When the last acknowledged heartbeat was sent.
    acked: Mutex<Option<Instant>>,
}

impl Default for Placements {
    fn default() -> Self {
        Self::with_lease(None)
    }
}

impl Placements {
    /// Placements whose VMMs hold a lease of `lease` (`None`: no lease).
    pub fn with_lease(lease: Option<Duration>) -> Self {
        Self {
            vms: Mutex::new(BTreeMap::new()),
            changed: tokio::sync::watch::channel(0).0,
            events: broadcast::channel(256).0,
            lease: lease.filter(|l| !l.is_zero()),
            acked: Mutex::new(None),
        }
    }

    /// Passes on a change of the replicated state (a member's own agent:
    /// Watch's `created`, `desired` and `deleted` events of this node's VMs).
    pub fn publish(&self, ev: crate::store::StoreEvent) {
        let _ = self.events.send(ev);
    }

    /// Records that a heartbeat sent at `sent` was acknowledged (the lease
    /// then runs until `sent` + lease).
    pub fn acknowledged(&self, sent: Instant) {
        let mut a = lock(&self.acked);
        if a.is_none_or(|t| t < sent) {
            *a = Some(sent);
        }
    }

    /// The lease and when it ends (`None` when no heartbeat was acknowledged
    /// yet), or `None` without a lease.
    fn lease_end(&self) -> Option<(Duration, Option<Instant>)> {
        let l = self.lease?;
        Some((l, lock(&self.acked).map(|t| t + l)))
    }

    /// Replaces the placements with `vms` and wakes the agent.
    pub fn set(&self, vms: Vec<VmRecord>) {
        *lock(&self.vms) = vms.into_iter().map(|v| (v.id.clone(), v)).collect();
        self.changed.send_modify(|n| *n += 1);
    }

    /// The placements now.
    pub fn get(&self) -> BTreeMap<String, VmRecord> {
        lock(&self.vms).clone()
    }

    /// `f` of the record of VM `id`, if it is placed here.
    pub fn with_record<T>(&self, id: &str, f: impl FnOnce(&VmRecord) -> T) -> Option<T> {
        lock(&self.vms).get(id).map(f)
    }

    /// Whether nothing is placed.
    pub fn is_empty(&self) -> bool {
        lock(&self.vms).is_empty()
    }
}

/// The node agent.
pub struct Agent {
    cfg: NodeConfig,
    source: Source,
    /// Set while the node is fenced: VMs that leave are killed at once
    /// (SIGTERM, SIGKILL after a grace) instead of asked to stop.
    fencing: std::sync::atomic::AtomicBool,
    metrics: Arc<Metrics>,
    vms: Mutex<BTreeMap<String, Runtime>>,
    events: broadcast::Sender<grpc::VmEvent>,
    seq: AtomicU64,
    wake: Notify,
    exits: mpsc::UnboundedSender<Exit>,
    exits_rx: Mutex<Option<mpsc::UnboundedReceiver<Exit>>>,
    /// VM id → pid of the VMMs being stopped because their VM left this node:
    /// heartbeats report them `stopping` until they are gone, so that the
    /// leader ends a drain's handoff only then. Locked after `vms`.
    leaving: Mutex<BTreeMap<String, i32>>,
    /// VMs whose lease renewal is in flight (one at a time per VM).
    renewing: Mutex<std::collections::BTreeSet<String>>,
    /// Attestation state (verifier, enrolled AKs).
    pub attest: attest::AttestState,
    router: Option<Arc<Router>>,
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> NodeError + 'a {
    move |source| NodeError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// A state's lowercase name.
pub fn state_name(s: VmState) -> &'static str {
    match s {
        VmState::Unspecified => "unknown",
        VmState::Pending => "pending",
        VmState::Starting => "starting",
        VmState::Running => "running",
        VmState::Stopping => "stopping",
        VmState::Stopped => "stopped",
        VmState::Exited => "exited",
        VmState::Failed => "failed",
        VmState::Backoff => "backoff",
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Checks the jail settings: VMMs can only be jailed by a root cell0d
/// (`cell0-vmm --jail` starts as root), and never as uid or gid 0.
fn check_jail(jail: Option<VmJail>) -> Result<(), String> {
    let Some(j) = jail else {
        tracing::warn!(
            "--no-jail: VMMs run without the jail (no namespaces, cgroup limits or \
             unprivileged uid; seccomp stays on); for debugging only"
        );
        return Ok(());
    };
    if j.uid == 0 || j.gid == 0 {
        return Err("--vm-uid and --vm-gid must not be 0: the VMM would keep root's powers".into());
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(
            "cell0d must run as root: cell0-vmm --jail creates namespaces, cgroups and \
             device nodes before it drops to --vm-uid (use --no-jail for unjailed \
             debugging runs)"
                .into(),
        );
    }
    Ok(())
}

/// Makes the run dir usable by a jailed VMM: owned by root, group `gid`, mode
/// 01770 (the VMM creates its sockets there; the sticky bit keeps it from
/// removing or replacing cell0d's files such as `state.json`).
fn prepare_run_dir(dir: &Path, jail: Option<VmJail>) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let Some(j) = jail else { return Ok(()) };
    std::os::unix::fs::chown(dir, Some(0), Some(j.gid))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o1770))
}

/// Lets a jailed VMM connect to a host listener in its run dir (`<vsock>_P`):
/// connecting to a Unix socket needs write permission on it.
fn hand_socket_to_vm(sock: &Path, jail: Option<VmJail>) {
    let Some(j) = jail else { return };
    if let Err(e) = std::os::unix::fs::chown(sock, Some(j.uid), Some(j.gid)) {
        tracing::warn!(socket = %sock.display(), error = %e, "cannot hand the socket to the VM's uid");
    }
}

/// Ends a VMM: SIGTERM, then SIGKILL if it is still there after
/// [`TERM_GRACE`]. A jailed VMM's supervisor answers SIGTERM by killing the VMM
/// and removing its cgroup and jail directory.
async fn terminate(fd: &PidFd) {
    terminate_within(fd, TERM_GRACE).await;
}

/// SIGTERM, then SIGKILL after `grace`.
async fn terminate_within(fd: &PidFd, grace: Duration) {
    if fd.signal(libc::SIGTERM).is_ok() && tokio::time::timeout(grace, fd.exited()).await.is_ok() {
        return;
    }
    let _ = fd.signal(libc::SIGKILL);
    fd.exited().await;
}

/// Whether the serial log at `path` holds the nano guest's ready line.
fn serial_ready(path: &Path) -> bool {
    std::fs::read(path)
        .map(|b| {
            b.windows(NANO_READY.len())
                .any(|w| w == NANO_READY.as_bytes())
        })
        .unwrap_or(false)
}

/// The SYPAS port the guest serves, where it speaks SYPAS (nano `sypas-serve`).
pub fn sypas_port(rec: &VmRecord) -> Option<u32> {
    let c = rec.spec.cmdline.as_deref()?;
    if !c.split_whitespace().any(|t| t == "cell0.test=sypas-serve") {
        return None;
    }
    Some(
        c.split_whitespace()
            .find_map(|t| t.strip_prefix("cell0.port="))
            .and_then(|p| p.parse().ok())
            .unwrap_or(5000),
    )
}

impl Agent {
    /// Creates the agent, registers the node and re-adopts running VMMs.
    pub async fn start(
        cfg: NodeConfig,
        store: Store,
        metrics: Arc<Metrics>,
        router: Option<Arc<Router>>,
    ) -> Result<Arc<Self>, NodeError> {
        Self::start_with(cfg, Source::Local(store), metrics, router).await
    }

    /// Creates the agent of a node on another host (`cell0d node`), whose
    /// placements come from the control plane through `placements`, and
    /// re-adopts the running VMMs that `placements` still name with the same
    /// epoch (the others are stopped). The caller registers the node.
    pub async fn start_remote(
        cfg: NodeConfig,
        placements: Arc<Placements>,
        metrics: Arc<Metrics>,
        router: Option<Arc<Router>>,
    ) -> Result<Arc<Self>, NodeError> {
        Self::start_with(cfg, Source::Remote(placements), metrics, router).await
    }

    async fn start_with(
        cfg: NodeConfig,
        source: Source,
        metrics: Arc<Metrics>,
        router: Option<Arc<Router>>,
    ) -> Result<Arc<Self>, NodeError> {
        check_jail(cfg.jail).map_err(NodeError::Jail)?;
        let vms_dir = cfg.data_dir.join("node").join("vms");
        std::fs::create_dir_all(&vms_dir).map_err(io_err("create", &vms_dir))?;
        let (tx, rx) = mpsc::unbounded_channel();
        let attest = attest::AttestState::new(&cfg.data_dir);
        let agent = Arc::new(Self {
            cfg,
            source,
            fencing: std::sync::atomic::AtomicBool::new(false),
            metrics,
            vms: Mutex::new(BTreeMap::new()),
            events: broadcast::channel(8192).0,
            seq: AtomicU64::new(0),
            wake: Notify::new(),
            exits: tx,
            exits_rx: Mutex::new(Some(rx)),
            leaving: Mutex::new(BTreeMap::new()),
            renewing: Mutex::new(Default::default()),
            attest,
            router,
        });
        agent.register().await?;
        agent.adopt();
        // Adopted VMMs hold the lease of the agent that launched them: renew
        // it at once when a heartbeat was acknowledged before they were adopted.
        agent.renew_leases();
        Ok(agent)
    }

    async fn register(&self) -> Result<(), NodeError> {
        let Source::Local(store) = &self.source else {
            // `cell0d node` registers through NodeService.Register.
            return Ok(());
        };
        let me = NodeRecord {
            id: self.cfg.node_id.clone(),
            address: self.cfg.address.clone(),
            zone: self.cfg.zone.clone(),
            region: self.cfg.region.clone(),
            capacity: self.cfg.capacity,
            cpu_overcommit: self.cfg.cpu_overcommit,
            memory_overcommit: self.cfg.memory_overcommit,
            state: NodeState::Ready,
            labels: Default::default(),
            drained: false,
        };
        let same = store.read(|s| s.nodes.get(&me.id) == Some(&me));
        if !same {
            store
                .write(Command::PutNode { node: me })
                .await
                .map_err(NodeError::Register)?;
        }
        Ok(())
    }

    /// The node id.
    pub fn node_id(&self) -> &str {
        &self.cfg.node_id
    }

    /// The settings.
    pub fn config(&self) -> &NodeConfig {
        &self.cfg
    }

    /// The SYPAS router the VMs are attached to, if any.
    pub fn router(&self) -> Option<&Arc<Router>> {
        self.router.as_ref()
    }

    /// The run dir of VM `id`.
    pub fn run_dir(&self, id: &str) -> PathBuf {
        self.cfg.data_dir.join("node").join("vms").join(id)
    }

    /// Events of this node's VMs.
    pub fn subscribe(&self) -> broadcast::Receiver<grpc::VmEvent> {
        self.events.subscribe()
    }

    fn emit(&self, id: &str, kind: &str, state: VmState, message: impl Into<String>) {
        let ev = grpc::VmEvent {
            seq: self.seq.fetch_add(1, Ordering::Relaxed) + 1,
            time_ms: crate::now_ms(),
            vm_id: id.to_string(),
            kind: kind.to_string(),
            state: state as i32,
            message: message.into(),
            node: self.cfg.node_id.clone(),
        };
        tracing::debug!(vm = id, kind, state = state_name(state), msg = %ev.message, "event");
        let _ = self.events.send(ev);
    }

    fn set_state(&self, id: &str, rt: &mut Runtime, state: VmState, message: impl Into<String>) {
        let message = message.into();
        rt.state = state;
        rt.message = message.clone();
        self.emit(id, "state", state, message);
    }

    /// The runtime status of VM `id`, if it is on this node.
    pub fn status(&self, id: &str) -> Option<grpc::VmStatus> {
        let vms = lock(&self.vms);
        let rt = vms.get(id)?;
        Some(grpc::VmStatus {
            state: rt.state as i32,
            node: self.cfg.node_id.clone(),
            pid: i64::from(rt.pid),
            run_dir: self.run_dir(id).display().to_string(),
            ready: rt.ready,
            exit_code: rt.exit_code,
            message: rt.message.clone(),
            restarts: rt.restarts,
            started_at_ms: rt.started_at_ms,
            ready_latency_us: rt.ready_latency_us,
            vsock_cid: rt.record.cid,
            health: rt.health.clone(),
        })
    }

    /// A copy of the runtime of VM `id`.
    pub fn runtime(&self, id: &str) -> Option<Runtime> {
        lock(&self.vms).get(id).cloned()
    }

    fn new_runtime(&self, rec: &VmRecord) -> Runtime {
        Runtime {
            state: VmState::Pending,
            pid: 0,
            exit_code: -1,
            ready: false,
            message: String::new(),
            restarts: 0,
            started_at_ms: 0,
            ready_latency_us: 0,
            health: String::new(),
            launch_seq: 0,
            spawned_at: None,
            next_restart: None,
            backoff: self.cfg.backoff_initial,
            pidfd: None,
            stop_requested: false,
            start_time: 0,
            record: rec.clone(),
            cmdline_extra: String::new(),
            epoch: 0,
            replacing: false,
        }
    }

    /// The VM records the agent knows: every VM for an agent in a member, the
    /// ones placed here for an agent on another host.
    fn records(&self) -> BTreeMap<String, VmRecord> {
        match &self.source {
            Source::Local(s) => s.read(|s| s.vms.clone()),
            Source::Remote(p) => p.get(),
        }
    }

    /// Fences the node (`on`): from now on VMs that leave are terminated at
    /// once rather than asked to stop. [`remote`] turns it on before it
    /// empties the placements, and off when placements come again.
    pub fn set_fencing(&self, on: bool) {
        self.fencing.store(on, Ordering::SeqCst);
        self.wake.notify_one();
    }

    /// A heartbeat sent at `sent` was acknowledged: the lease runs until
    /// `sent` + lease. VMs wait for it to launch, and the running VMMs get
    /// their lease renewed (fencing rule 5, docs/CLUSTER.md). Returns at once.
    pub fn lease_acknowledged(self: &Arc<Self>, sent: Instant) {
        let Source::Remote(p) = &self.source else {
            return;
        };
        if p.lease.is_none() {
            return;
        }
        p.acknowledged(sent);
        self.wake.notify_one();
        self.renew_leases();
    }

    /// Renews the lease of every running VMM that the latest placements still
    /// name on this node under the epoch it was launched with, to the end of
    /// the agent's lease (the acknowledged heartbeat's send time + lease).
    /// Each renewal runs on its own task, bounded by [`RENEW_TIMEOUT`];
    /// failures are logged.
    fn renew_leases(self: &Arc<Self>) {
        let Source::Remote(p) = &self.source else {
            return;
        };
        let Some((_, Some(end))) = p.lease_end() else {
            return;
        };
        // The same clock: Instant is CLOCK_MONOTONIC, which the VMM reads.
        // Read the clock first, so that the deadline errs early, not late.
        let now_ns = proc::monotonic_ns();
        let now = Instant::now();
        let Some(left) = end.checked_duration_since(now) else {
            // Ended already: the VMMs' own deadlines, no later, have passed too.
            return;
        };
        let deadline_ns = now_ns + left.as_nanos() as u64;
        let placed = p.get();
        let targets: Vec<(String, i32, u64, VmState)> = lock(&self.vms)
            .iter()
            .filter(|(id, rt)| {
                rt.pid > 0
                    && !rt.replacing
                    && placed
                        .get(*id)
                        .is_some_and(|r| r.node == self.cfg.node_id && r.epoch == rt.epoch)
            })
            .map(|(id, rt)| (id.clone(), rt.pid, rt.epoch, rt.state))
            .collect();
        for (id, pid, epoch, state) in targets {
            if !lock(&self.renewing).insert(id.clone()) {
                tracing::debug!(vm = %id, "the previous lease renewal is still in flight");
                continue;
            }
            let sock = self.run_dir(&id).join("api.sock");
            let me = self.clone();
            tokio::spawn(async move {
                let req = json!({"op": "lease", "deadline_ns": deadline_ns});
                let r = tokio::time::timeout(
                    RENEW_TIMEOUT,
                    proc::api_call_async(&sock, req, RENEW_TIMEOUT),
                )
                .await;
                lock(&me.renewing).remove(&id);
                let err = match r {
                    Ok(Ok(_)) => return,
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => format!("no answer in {} ms", RENEW_TIMEOUT.as_millis()),
                };
                // A VMM launched without a lease (by an agent before leases)
                // says so at every renewal: not worth a warning each time.
                if state == VmState::Running && !err.contains("holds no lease") {
                    tracing::warn!(vm = %id, pid, epoch, "cannot renew the VMM's lease: {err}");
                } else {
                    // Starting (its socket may not be there yet) or stopping.
                    tracing::debug!(vm = %id, pid, epoch, "cannot renew the VMM's lease: {err}");
                }
            });
        }
    }

    /// The runtime status of every VM on this node, by id, and of the VMMs
    /// still being stopped after their VM left it (`stopping`).
    pub fn statuses(&self) -> std::collections::HashMap<String, grpc::VmStatus> {
        let ids: Vec<String> = lock(&self.vms).keys().cloned().collect();
        let mut out: std::collections::HashMap<String, grpc::VmStatus> = ids
            .into_iter()
            .filter_map(|id| self.status(&id).map(|s| (id, s)))
            .collect();
        // Read after the VMs: one that left meanwhile is in `leaving` by now.
        for (id, pid) in lock(&self.leaving).iter() {
            out.entry(id.clone()).or_insert_with(|| grpc::VmStatus {
                state: VmState::Stopping as i32,
                node: self.cfg.node_id.clone(),
                pid: i64::from(*pid),
                exit_code: -1,
                message: "stopping: no longer placed on this node".into(),
                ..Default::default()
            });
        }
        out
    }

    /// Pids of the VMMs this agent runs now.
    pub fn pids(&self) -> Vec<i32> {
        lock(&self.vms)
            .values()
            .filter(|r| r.pid > 0)
            .map(|r| r.pid)
            .collect()
    }

    fn persist(&self, id: &str, rt: &Runtime) {
        let p = Persisted {
            id: id.to_string(),
            pid: rt.pid,
            start_time: rt.start_time,
            launched_at_ms: rt.started_at_ms,
            restarts: rt.restarts,
            launch_seq: rt.launch_seq,
            ready: rt.ready,
            ready_latency_us: rt.ready_latency_us,
            state: state_name(rt.state).to_string(),
            exit_code: rt.exit_code,
            message: rt.message.clone(),
            cmdline_extra: rt.cmdline_extra.clone(),
            epoch: rt.epoch,
        };
        let path = self.run_dir(id).join("state.json");
        match serde_json::to_vec(&p) {
            Ok(b) => {
                if let Err(e) = crate::store::sm::write_atomic(&path, &b) {
                    tracing::warn!(vm = id, error = %e, "cannot write state.json");
                }
            }
            Err(e) => tracing::warn!(vm = id, error = %e, "cannot encode state.json"),
        }
    }

    /// Re-adopts the VMMs recorded on disk that still run.
    fn adopt(self: &Arc<Self>) {
        let dir = self.cfg.data_dir.join("node").join("vms");
        let Ok(rd) = std::fs::read_dir(&dir) else {
            return;
        };
        let records = self.records();
        let vmm_name = self
            .cfg
            .vmm_bin
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "cell0-vmm".into());
        for ent in rd.flatten() {
            let id = ent.file_name().to_string_lossy().into_owned();
            let Ok(bytes) = std::fs::read(ent.path().join("state.json")) else {
                continue;
            };
            let Ok(p) = serde_json::from_slice::<Persisted>(&bytes) else {
                continue;
            };
            let rec = match records.get(&id) {
                // Fencing: only a VM still placed here, under the epoch it was
                // launched with, is adopted (epoch 0: launched before epochs).
                Some(r)
                    if r.node == self.cfg.node_id
                        && (p.epoch == 0 || r.epoch == 0 || r.epoch == p.epoch) =>
                {
                    r.clone()
                }
                _ => {
                    // Deleted, or placed elsewhere, while we were down: stop it
                    // if it runs, drop the dir.
                    if p.pid > 0
                        && proc::start_time(p.pid) == Some(p.start_time)
                        && proc::exe_matches(p.pid, &vmm_name)
                    {
                        if let Ok(fd) = PidFd::open(p.pid) {
                            // Wait (bounded) so that a jailed VMM's supervisor
                            // cleans up before its jail root goes with the run dir.
                            let dir = ent.path();
                            lock(&self.leaving).insert(id.clone(), p.pid);
                            let me = self.clone();
                            tokio::spawn(async move {
                                terminate(&fd).await;
                                let _ = std::fs::remove_dir_all(dir);
                                lock(&me.leaving).remove(&id);
                            });
                            continue;
                        }
                    }
                    let _ = std::fs::remove_dir_all(ent.path());
                    continue;
                }
            };
            let mut rt = self.new_runtime(&rec);
            rt.restarts = p.restarts;
            rt.launch_seq = p.launch_seq;
            rt.started_at_ms = p.launched_at_ms;
            rt.ready_latency_us = p.ready_latency_us;
            rt.cmdline_extra = p.cmdline_extra.clone();
            rt.epoch = p.epoch;
            let running = p.pid > 0
                && proc::start_time(p.pid) == Some(p.start_time)
                && proc::exe_matches(p.pid, &vmm_name);
            let fd = if running {
                PidFd::open(p.pid).ok()
            } else {
                None
            };
            match fd {
                Some(fd) => {
                    let fd = Arc::new(fd);
                    rt.pid = p.pid;
                    rt.start_time = p.start_time;
                    rt.ready = p.ready || serial_ready(&ent.path().join("serial.log"));
                    rt.pidfd = Some(fd.clone());
                    rt.state = VmState::Running;
                    rt.message = "re-adopted after a cell0d restart".into();
                    rt.health = "process".into();
                    tracing::info!(vm = %id, pid = p.pid, "re-adopted a running cell0-vmm");
                    self.emit(&id, "adopted", VmState::Running, rt.message.clone());
                    let seq = rt.launch_seq;
                    lock(&self.vms).insert(id.clone(), rt);
                    self.watch_exit(id.clone(), seq, fd, None);
                    if let Some(r) = self.router.clone() {
                        let sock = PathBuf::from(format!(
                            "{}_{}",
                            ent.path().join("vsock.sock").display(),
                            cell0_proto::ROUTER_VSOCK_PORT
                        ));
                        let api = ent.path().join("api.sock");
                        let id = id.clone();
                        let jail = self.cfg.jail;
                        tokio::spawn(async move {
                            match r.attach_vm_lazy(&id, &sock, &api).await {
                                Ok(_) => hand_socket_to_vm(&sock, jail),
                                Err(e) => {
                                    tracing::warn!(vm = %id, error = %e, "cannot re-attach the VM to the SYPAS router");
                                }
                            }
                        });
                    }
                }
                None if p.pid == 0 => {
                    // It had ended before we went down: keep what we knew.
                    rt.state = match p.state.as_str() {
                        "exited" => VmState::Exited,
                        "stopped" => VmState::Stopped,
                        "backoff" => VmState::Backoff,
                        _ => VmState::Failed,
                    };
                    rt.stop_requested = rt.state == VmState::Stopped;
                    rt.exit_code = p.exit_code;
                    rt.message = p.message.clone();
                    rt.ready = p.ready;
                    lock(&self.vms).insert(id.clone(), rt);
                }
                None => {
                    // It exited while we were down: exit status unknown.
                    lock(&self.vms).insert(id.clone(), rt);
                    let _ = self.exits.send(Exit {
                        id: id.clone(),
                        seq: p.launch_seq,
                        code: None,
                    });
                }
            }
        }
    }

    /// Runs the reconciliation loop forever.
    pub async fn run(self: Arc<Self>) {
        let Some(mut exits) = lock(&self.exits_rx).take() else {
            return;
        };
        let (mut applied, mut store_events) = match &self.source {
            Source::Local(s) => (s.applied(), s.subscribe()),
            Source::Remote(p) => (p.changed.subscribe(), p.events.subscribe()),
        };
        let health = {
            let a = self.clone();
            tokio::spawn(async move { a.health_loop().await })
        };
        loop {
            let next = self.next_deadline();
            tokio::select! {
                r = applied.changed() => if r.is_err() { break },
                Some(x) = exits.recv() => self.on_exit(x),
                ev = store_events.recv() => match ev {
                    Ok(ev) => self.on_store_event(&ev),
                    Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => break,
                },
                () = self.wake.notified() => {}
                () = tokio::time::sleep(next) => {}
            }
            while let Ok(x) = exits.try_recv() {
                self.on_exit(x);
            }
            self.reconcile();
        }
        health.abort();
    }

    fn on_store_event(&self, ev: &crate::store::StoreEvent) {
        let Some(vm) = &ev.vm else { return };
        if vm.node != self.cfg.node_id {
            return;
        }
        let (kind, msg) = match ev.kind {
            "created" => ("created", format!("placed on node {}", vm.node)),
            "deleted" => ("deleted", "deleted".to_string()),
            "desired" => ("desired", format!("desired state {}", vm.desired.as_str())),
            _ => return,
        };
        self.emit(&ev.vm_id, kind, VmState::Unspecified, msg);
    }

    fn next_deadline(&self) -> Duration {
        let now = Instant::now();
        lock(&self.vms)
            .values()
            .filter_map(|r| r.next_restart)
            .map(|t| t.saturating_duration_since(now))
            .min()
            .unwrap_or(Duration::from_secs(1))
            .min(Duration::from_secs(1))
    }

    /// One reconciliation pass.
    pub fn reconcile(self: &Arc<Self>) {
        let me = self.cfg.node_id.clone();
        let desired: BTreeMap<String, VmRecord> = match &self.source {
            Source::Local(store) => store.read(|s| {
                s.vms
                    .values()
                    .filter(|v| v.node == me)
                    .map(|v| (v.id.clone(), v.clone()))
                    .collect()
            }),
            Source::Remote(p) => {
                let mut m = p.get();
                m.retain(|_, v| v.node == me);
                m
            }
        };
        let now = Instant::now();
        let mut vms = lock(&self.vms);
        for (id, rec) in &desired {
            let rt = vms
                .entry(id.clone())
                .or_insert_with(|| self.new_runtime(rec));
            rt.record = rec.clone();
            match rec.desired {
                Desired::Running => {
                    // Placed here again under another epoch (moved away and
                    // back): the running VMM is the old placement's. It is
                    // terminated, and the VM launched again under this epoch.
                    if let Some(fd) = rt.pidfd.clone().filter(|_| {
                        // Epoch 0: launched or recorded before epochs (as in `adopt`).
                        !rt.replacing
                            && !rt.stop_requested
                            && rt.epoch != 0
                            && rec.epoch != 0
                            && rt.epoch != rec.epoch
                    }) {
                        let m = format!(
                            "placed here again under epoch {}: terminating the VMM of epoch {}",
                            rec.epoch, rt.epoch
                        );
                        tracing::warn!(vm = %id, pid = fd.pid, "{m}");
                        rt.replacing = true;
                        self.set_state(id, rt, VmState::Stopping, m);
                        tokio::spawn(async move { terminate_within(&fd, FENCE_GRACE).await });
                    }
                    if rt.replacing {
                        continue;
                    }
                    if rt.stop_requested {
                        rt.stop_requested = false;
                        if matches!(
                            rt.state,
                            VmState::Stopped | VmState::Exited | VmState::Failed
                        ) {
                            rt.restarts = 0;
                            rt.backoff = self.cfg.backoff_initial;
                            rt.state = VmState::Pending;
                        }
                    }
                    // A drained VM starts only once its old node stopped it.
                    if let Some(m) = rec.handoff_message() {
                        if rt.state == VmState::Pending && rt.message != m {
                            self.set_state(id, rt, VmState::Pending, m);
                        }
                        continue;
                    }
                    let due = match rt.state {
                        VmState::Pending => true,
                        VmState::Backoff => rt.next_restart.is_none_or(|t| t <= now),
                        _ => false,
                    };
                    if due {
                        let restart = rt.state == VmState::Backoff;
                        if restart {
                            rt.restarts += 1;
                            self.metrics.restarted();
                        }
                        rt.next_restart = None;
                        self.launch(id, rt);
                    }
                }
                Desired::Stopped => {
                    if !rt.stop_requested {
                        rt.stop_requested = true;
                        rt.next_restart = None;
                        match rt.pidfd.clone() {
                            Some(fd) => {
                                self.set_state(id, rt, VmState::Stopping, "stopping on request");
                                self.stop_process(id, fd, false);
                            }
                            None => self.set_state(id, rt, VmState::Stopped, "stopped on request"),
                        }
                    }
                }
            }
        }
        let gone: Vec<String> = vms
            .keys()
            .filter(|k| !desired.contains_key(*k))
            .cloned()
            .collect();
        for id in gone {
            if let Some(rt) = vms.remove(&id) {
                match rt.pidfd {
                    Some(fd) => self.stop_process(&id, fd, true),
                    None => {
                        if rt.state == VmState::Starting {
                            // Its launch is in flight: `stopping` (pid 0)
                            // until finish_launch has terminated the VMM.
                            lock(&self.leaving).insert(id.clone(), 0);
                        }
                        self.remove_run_dir(&id)
                    }
                }
            }
        }
        let mut counts: BTreeMap<&str, i64> = BTreeMap::new();
        for s in [
            VmState::Pending,
            VmState::Starting,
            VmState::Running,
            VmState::Stopping,
            VmState::Stopped,
            VmState::Exited,
            VmState::Failed,
            VmState::Backoff,
        ] {
            counts.insert(state_name(s), 0);
        }
        for rt in vms.values() {
            *counts.entry(state_name(rt.state)).or_default() += 1;
        }
        drop(vms);
        let counts: Vec<(&str, i64)> = counts.into_iter().collect();
        self.metrics.set_vms(&counts);
    }

    fn remove_run_dir(&self, id: &str) {
        let d = self.run_dir(id);
        if let Err(e) = std::fs::remove_dir_all(&d) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(vm = id, error = %e, "cannot remove the run dir");
            }
        }
        self.attest.forget(id);
        if let Some(r) = self.router.clone() {
            let id = id.to_string();
            tokio::spawn(async move {
                let _ = r.detach_vm(&id).await;
            });
        }
    }

    /// Stops a VMM: `stop` over its API socket, SIGKILL after the grace time;
    /// with `remove`, then deletes its run dir.
    fn stop_process(self: &Arc<Self>, id: &str, fd: Arc<PidFd>, remove: bool) {
        let me = self.clone();
        let id = id.to_string();
        let sock = self.run_dir(&id).join("api.sock");
        // A fenced node does not ask: it terminates at once.
        let fencing = self.fencing.load(Ordering::SeqCst);
        if remove {
            lock(&self.leaving).insert(id.clone(), fd.pid);
        }
        tokio::spawn(async move {
            let asked = !fencing
                && proc::api_call_async(&sock, json!({"op": "stop"}), Duration::from_secs(1))
                    .await
                    .is_ok();
            let grace = if asked { STOP_GRACE } else { Duration::ZERO };
            if tokio::time::timeout(grace, fd.exited()).await.is_err() || !asked {
                terminate_within(&fd, if fencing { FENCE_GRACE } else { TERM_GRACE }).await;
            }
            if remove {
                proc::reap(fd.pid);
                me.remove_run_dir(&id);
                let mut l = lock(&me.leaving);
                if l.get(&id) == Some(&fd.pid) {
                    l.remove(&id);
                }
            }
        });
    }

    fn vmm_command(
        &self,
        id: &str,
        rec: &VmRecord,
        extra: &str,
        lease_ms: Option<u64>,
    ) -> Result<std::process::Command, String> {
        let dir = self.run_dir(id);
        let api = dir.join("api.sock");
        let vsock = dir.join("vsock.sock");
        // The guest's connections to port P go to "<vsock>_P".
        let longest = format!("{}_4294967295", vsock.display());
        if longest.len() > SUN_PATH_MAX {
            return Err(format!(
                "the run dir path is too long for Unix sockets ({} bytes; use a shorter --data-dir)",
                longest.len()
            ));
        }
        let s = &rec.spec;
        let mut c = std::process::Command::new(&self.cfg.vmm_bin);
        c.arg("launch")
            .arg("--vcpus")
            .arg(s.vcpus.to_string())
            .arg("--memory-mib")
            .arg(s.memory_mib.to_string())
            .arg("--serial")
            .arg(dir.join("serial.log"))
            .arg("--vsock-uds")
            .arg(&vsock)
            .arg("--cid")
            .arg(rec.cid.to_string())
            .arg("--api-sock")
            .arg(&api)
            .arg(format!("--agent-id={}", s.agent_id));
        if s.shm_mib > 0 {
            c.arg("--shm-mib").arg(s.shm_mib.to_string());
        }
        if let Some(ms) = lease_ms {
            c.arg("--lease-ms").arg(ms.to_string());
        }
        if let Some(k) = &s.kernel {
            c.arg("--kernel").arg(k);
        }
        if let Some(i) = &s.initrd {
            c.arg("--initrd").arg(i);
        }
        if let Some(cmd) = golden::launch_cmdline(s, extra) {
            c.arg(format!("--cmdline={cmd}"));
        }
        if let Some(j) = self.cfg.jail {
            c.arg("--jail")
                .arg("--uid")
                .arg(j.uid.to_string())
                .arg("--gid")
                .arg(j.gid.to_string())
                .arg("--jail-root")
                .arg(dir.join("jail").join(id));
        }
        if s.tpm {
            c.arg("--tpm").arg("--run-dir").arg(&dir);
            // `=` form: a word may start with '-'.
            for w in &s.command {
                c.arg(format!("--command={w}"));
            }
        }
        Ok(c)
    }

    /// The nano guest's SYPAS identity for this launch: `cell0.agent_id=` and a
    /// fresh capability token (`cell0.token=`, biscuit, base64) minted for the
    /// VM's agent id, VM id and rights. Other guests get nothing on their
    /// cmdline: a token never goes on a Linux guest's cmdline.
    fn cmdline_extra(&self, id: &str, rec: &VmRecord) -> String {
        let Some(r) = &self.router else {
            return String::new();
        };
        if !rec.spec.is_nano() {
            return String::new();
        }
        let minted = r.minter().map_err(|e| e.to_string()).and_then(|m| {
            let claims = crate::token::Claims {
                agent: rec.spec.agent_id.clone(),
                vm: id.to_string(),
                rights: rec
                    .spec
                    .rights
                    .iter()
                    .map(|x| cell0_proto::msg::Right {
                        service: x.service.clone(),
                        method: x.method.clone(),
                    })
                    .collect(),
                expires: crate::token::keys::unix_now() + TOKEN_TTL_S,
            };
            let t = m.mint(&claims).map_err(|e| e.to_string())?;
            biscuit_auth::UnverifiedBiscuit::from(t)
                .and_then(|b| b.to_base64())
                .map_err(|e| e.to_string())
        });
        match minted {
            Ok(tok) => format!("cell0.agent_id={} cell0.token={tok}", rec.spec.agent_id),
            Err(e) => {
                tracing::warn!(vm = id, error = %e, "cannot mint the VM's token");
                String::new()
            }
        }
    }

    /// Prepares the run dir and starts `cell0-vmm` on the blocking pool, so
    /// that neither the reconciliation loop nor the API waits for fork/exec.
    fn launch(self: &Arc<Self>, id: &str, rt: &mut Runtime) {
        // With a lease, a VMM gets what is left of the agent's (fencing rule 5),
        // and none starts while the agent holds none.
        let lease_ms = match &self.source {
            Source::Remote(p) => match p.lease_end() {
                None => None,
                Some((_, end)) => {
                    let left = end.and_then(|e| e.checked_duration_since(Instant::now()));
                    match left.map(|l| l.as_millis() as u64).filter(|ms| *ms > 0) {
                        Some(ms) => Some(ms),
                        None => {
                            let m =
                                "waiting for an acknowledged heartbeat: this node holds no lease";
                            if rt.state != VmState::Pending || rt.message != m {
                                self.set_state(id, rt, VmState::Pending, m);
                            }
                            return;
                        }
                    }
                }
            },
            Source::Local(_) => None,
        };
        let dir = self.run_dir(id);
        if let Err(e) =
            std::fs::create_dir_all(&dir).and_then(|()| prepare_run_dir(&dir, self.cfg.jail))
        {
            self.metrics.launch_failed();
            self.set_state(
                id,
                rt,
                VmState::Failed,
                format!("cannot create the run dir: {e}"),
            );
            return;
        }
        for f in ["api.sock", "vsock.sock"] {
            let _ = std::fs::remove_file(dir.join(f));
        }
        let serial = dir.join("serial.log");
        if serial.exists() {
            let _ = std::fs::rename(&serial, dir.join("serial.prev.log"));
        }
        let extra = self.cmdline_extra(id, &rt.record);
        let mut cmd = match self.vmm_command(id, &rt.record, &extra, lease_ms) {
            Ok(c) => c,
            Err(e) => {
                self.metrics.launch_failed();
                self.set_state(id, rt, VmState::Failed, e);
                return;
            }
        };
        let log = std::fs::File::create(dir.join("vmm.log"));
        cmd.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(match log {
                Ok(f) => std::process::Stdio::from(f),
                Err(_) => std::process::Stdio::null(),
            })
            .env("TSS2_LOG", "all+NONE");
        // Its own process group: a signal to cell0d's group (Ctrl-C) does not
        // reach the VMs, and the VMs outlive a cell0d crash.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        rt.launch_seq += 1;
        rt.pid = 0;
        rt.pidfd = None;
        rt.ready = false;
        rt.ready_latency_us = 0;
        rt.exit_code = -1;
        rt.started_at_ms = crate::now_ms();
        rt.cmdline_extra = extra;
        rt.epoch = rt.record.epoch;
        self.set_state(id, rt, VmState::Starting, "launching cell0-vmm");
        let seq = rt.launch_seq;
        let me = self.clone();
        let id = id.to_string();
        let guest_sock = PathBuf::from(format!(
            "{}_{}",
            dir.join("vsock.sock").display(),
            cell0_proto::ROUTER_VSOCK_PORT
        ));
        let api_sock = dir.join("api.sock");
        tokio::spawn(async move {
            // The router listens on the guest's port-1024 socket before the
            // guest can connect to it, and takes the window at its HELLO.
            if let Some(r) = me.router.clone() {
                let _ = r.detach_vm(&id).await;
                match r.attach_vm_lazy(&id, &guest_sock, &api_sock).await {
                    Ok(_) => hand_socket_to_vm(&guest_sock, me.cfg.jail),
                    Err(e) => {
                        tracing::warn!(vm = %id, error = %e, "cannot attach the VM to the SYPAS router");
                    }
                }
            }
            let spawned = tokio::task::spawn_blocking(move || {
                let t0 = Instant::now();
                cmd.spawn().map(|c| (c.id() as i32, t0))
            })
            .await;
            let r = match spawned {
                Ok(r) => r.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            me.finish_launch(&id, seq, r);
        });
    }

    /// A launch of a VM that left this node while it was in flight is over
    /// (its VMM, if any, is gone).
    fn launch_left(&self, id: &str) {
        let mut l = lock(&self.leaving);
        if l.get(id) == Some(&0) {
            l.remove(id);
        }
    }

    fn finish_launch(self: &Arc<Self>, id: &str, seq: u64, r: Result<(i32, Instant), String>) {
        let mut vms = lock(&self.vms);
        let (pid, t0) = match r {
            Ok(x) => x,
            Err(e) => {
                self.metrics.launch_failed();
                if let Some(rt) = vms.get_mut(id).filter(|rt| rt.launch_seq == seq) {
                    let msg = format!("cannot start {}: {e}", self.cfg.vmm_bin.display());
                    self.set_state(id, rt, VmState::Failed, msg);
                }
                self.launch_left(id);
                return;
            }
        };
        self.metrics.launched();
        let fd = match PidFd::open(pid) {
            Ok(fd) => Arc::new(fd),
            Err(e) => {
                proc::reap(pid);
                if let Some(rt) = vms.get_mut(id).filter(|rt| rt.launch_seq == seq) {
                    self.set_state(id, rt, VmState::Failed, e.to_string());
                }
                self.launch_left(id);
                return;
            }
        };
        let Some(rt) = vms
            .get_mut(id)
            .filter(|rt| rt.launch_seq == seq && !rt.stop_requested)
        else {
            // Deleted or stopped while it was being spawned.
            let deleted = !vms.contains_key(id);
            drop(vms);
            let me = self.clone();
            let id = id.to_string();
            tokio::spawn(async move {
                terminate(&fd).await;
                proc::reap(fd.pid);
                if deleted {
                    me.remove_run_dir(&id);
                    me.launch_left(&id);
                }
            });
            return;
        };
        rt.pid = pid;
        rt.start_time = proc::start_time(pid).unwrap_or(0);
        rt.spawned_at = Some(t0);
        rt.health = "process".into();
        rt.pidfd = Some(fd.clone());
        let msg = if rt.restarts > 0 {
            format!("cell0-vmm started (pid {pid}, restart {})", rt.restarts)
        } else {
            format!("cell0-vmm started (pid {pid})")
        };
        self.set_state(id, rt, VmState::Starting, msg);
        let rt = rt.clone();
        drop(vms);
        self.persist(id, &rt);
        self.watch_exit(id.to_string(), seq, fd, Some(t0));
    }

    /// Waits for readiness (when `spawned` is set) and then for the exit.
    fn watch_exit(
        self: &Arc<Self>,
        id: String,
        seq: u64,
        fd: Arc<PidFd>,
        spawned: Option<Instant>,
    ) {
        let me = self.clone();
        tokio::spawn(async move {
            if let Some(t0) = spawned {
                tokio::select! {
                    () = fd.exited() => {}
                    () = me.wait_ready(&id, seq, t0) => {}
                }
            }
            fd.exited().await;
            let code = proc::reap(fd.pid);
            let _ = me.exits.send(Exit { id, seq, code });
        });
    }

    async fn wait_ready(&self, id: &str, seq: u64, t0: Instant) {
        let dir = self.run_dir(id);
        let nano = self.runtime(id).is_some_and(|r| r.record.spec.is_nano());
        // Fine-grained at first (a nano guest is ready within milliseconds),
        // then backing off.
        let mut delay = Duration::from_micros(250);
        loop {
            let ready = if nano {
                serial_ready(&dir.join("serial.log"))
            } else if let Some(r) = &self.router {
                // Its guest agent said `cell0.node/ready` (docs/GUEST-AGENT.md).
                r.agent_status(id).is_some_and(|s| s.ready.is_some())
            } else {
                // (`state` is `starting` while the VMM sets up its vTPM.)
                dir.join("api.sock").exists()
                    && proc::api_call_async(
                        &dir.join("api.sock"),
                        json!({"op": "describe"}),
                        Duration::from_secs(2),
                    )
                    .await
                    .is_ok_and(|d| d["state"] != "starting")
            };
            if ready {
                self.mark_ready(id, seq, t0.elapsed());
                return;
            }
            tokio::time::sleep(delay).await;
            if t0.elapsed() > Duration::from_millis(25) {
                delay = (delay * 2).min(Duration::from_millis(50));
            }
            if t0.elapsed() > Duration::from_secs(120) {
                return;
            }
        }
    }

    fn mark_ready(&self, id: &str, seq: u64, d: Duration) {
        let mut vms = lock(&self.vms);
        let Some(rt) = vms.get_mut(id) else { return };
        if rt.launch_seq != seq || rt.ready {
            return;
        }
        rt.ready = true;
        rt.ready_latency_us = d.as_micros() as u64;
        self.metrics.ready(d);
        if rt.state == VmState::Starting {
            let msg = format!("guest ready in {:.1} ms", d.as_secs_f64() * 1e3);
            self.set_state(id, rt, VmState::Running, msg);
        }
        // A VM that ran for a while earns a fresh back-off.
        rt.backoff = self.cfg.backoff_initial;
        let rt = rt.clone();
        drop(vms);
        self.persist(id, &rt);
    }

    fn on_exit(&self, x: Exit) {
        let mut vms = lock(&self.vms);
        let Some(rt) = vms.get_mut(&x.id) else { return };
        if rt.launch_seq != x.seq {
            return;
        }
        let id = x.id.clone();
        rt.pid = 0;
        rt.pidfd = None;
        if !rt.ready && serial_ready(&self.run_dir(&id).join("serial.log")) {
            // Ready and gone before the readiness poll saw it: the latency is
            // an upper bound (spawn → exit).
            rt.ready = true;
            if let Some(t0) = rt.spawned_at {
                rt.ready_latency_us = t0.elapsed().as_micros() as u64;
                self.metrics.ready(t0.elapsed());
            }
        }
        rt.exit_code = x.code.unwrap_or(-1);
        // clap also exits 2, on a command line cell0-vmm refuses.
        let vmm_log =
            std::fs::read_to_string(self.run_dir(&id).join("vmm.log")).unwrap_or_default();
        let usage = x.code == Some(2) && vmm_log.contains("Usage:");
        let reason = match x.code {
            Some(2) if usage => "error",
            Some(0) => "clean",
            Some(2) => "crash",
            Some(1) => "error",
            Some(EXIT_LEASE_EXPIRED) => "lease",
            Some(c) if c > 128 => "killed",
            Some(_) => "error",
            None => "unknown",
        };
        self.metrics.exited(reason);
        let what = match x.code {
            Some(2) if usage => format!(
                "cell0-vmm refused its command line: {}",
                vmm_log.lines().next().unwrap_or_default()
            ),
            Some(0) => "the guest reset or powered off (exit 0)".to_string(),
            Some(2) => "the guest crashed (exit 2)".to_string(),
            Some(EXIT_LEASE_EXPIRED) => {
                "lease expired: cell0-vmm fenced the VM (exit 3), its lease was not renewed in time"
                    .to_string()
            }
            Some(1) => {
                let last = vmm_log
                    .lines()
                    .rev()
                    .find(|l| l.contains("error"))
                    .unwrap_or("")
                    .to_string();
                format!("cell0-vmm failed (exit 1) {last}")
                    .trim()
                    .to_string()
            }
            Some(c) if c > 128 => format!("cell0-vmm was killed by signal {}", c - 128),
            Some(c) => format!("cell0-vmm exited with status {c}"),
            None => "cell0-vmm exited while cell0d was down (status unknown)".to_string(),
        };
        let replaced = std::mem::take(&mut rt.replacing);
        if rt.stop_requested {
            self.set_state(
                &id,
                rt,
                VmState::Stopped,
                format!("stopped on request: {what}"),
            );
        } else if replaced {
            // Launched again under the record's epoch by the next pass.
            rt.next_restart = None;
            let m = format!(
                "the VMM of epoch {} is gone; launching under epoch {}",
                rt.epoch, rt.record.epoch
            );
            self.set_state(&id, rt, VmState::Pending, m);
        } else {
            let failed = x.code != Some(0);
            let policy: RestartPolicy = rt.record.spec.restart;
            if rt.record.desired == Desired::Running && policy.restarts(failed) {
                let delay = rt.backoff;
                rt.backoff = (rt.backoff * 2).min(self.cfg.backoff_max);
                rt.next_restart = Some(Instant::now() + delay);
                let msg = format!(
                    "{what}; restarting in {} ms (policy {:?})",
                    delay.as_millis(),
                    policy
                );
                self.set_state(&id, rt, VmState::Backoff, msg);
            } else {
                let st = if failed {
                    VmState::Failed
                } else {
                    VmState::Exited
                };
                self.set_state(&id, rt, st, what);
            }
        }
        let rt = rt.clone();
        drop(vms);
        self.persist(&id, &rt);
        self.wake.notify_one();
    }

    async fn health_loop(self: Arc<Self>) {
        loop {
            tokio::time::sleep(self.cfg.health_interval).await;
            let running: Vec<(String, VmRecord)> = lock(&self.vms)
                .iter()
                .filter(|(_, r)| r.state == VmState::Running && r.pid > 0)
                .map(|(k, r)| (k.clone(), r.record.clone()))
                .collect();
            for (id, rec) in running {
                let health = self.check_health(&id, &rec).await;
                if let Some(rt) = lock(&self.vms).get_mut(&id) {
                    rt.health = health;
                }
            }
        }
    }

    /// One health check: a guest agent's SYPAS heartbeats, SYPAS PING where
    /// the guest serves SYPAS, else `describe`.
    pub async fn check_health(&self, id: &str, rec: &VmRecord) -> String {
        if let Some(h) = self.router.as_ref().and_then(|r| agent_health(r, id, rec)) {
            return h;
        }
        let dir = self.run_dir(id);
        if let Some(port) = sypas_port(rec) {
            match sypas_ping(&dir.join("vsock.sock"), port).await {
                Ok(d) => return format!("sypas-ping ok ({} µs)", d.as_micros()),
                Err(e) => return format!("sypas-ping failed: {e}"),
            }
        }
        match proc::api_call_async(
            &dir.join("api.sock"),
            json!({"op": "describe"}),
            Duration::from_secs(2),
        )
        .await
        {
            Ok(_) => "api-describe ok".into(),
            Err(e) => format!("api-describe failed: {e}"),
        }
    }

    /// Whether every VM placed here has a runtime entry (for tests and `run --wait`).
    pub fn known(&self) -> usize {
        lock(&self.vms).len()
    }
}

/// Health from a guest agent's heartbeats (every 5 s; late after 15 s), for
/// VMs that run one.
fn agent_health(router: &Router, id: &str, rec: &VmRecord) -> Option<String> {
    if rec.spec.is_nano() {
        return None;
    }
    let st = router.agent_status(id)?;
    Some(match (st.heartbeat_age(), st.ready_at) {
        (Some(age), _) if age <= Duration::from_secs(15) => format!(
            "sypas-heartbeat ok ({} seen, last {} ms ago)",
            st.heartbeats,
            age.as_millis()
        ),
        (Some(age), _) => format!("sypas-heartbeat late: none for {} s", age.as_secs()),
        (None, Some(t)) => format!(
            "guest agent ready {} ms ago, no heartbeat yet",
            t.elapsed().as_millis()
        ),
        (None, None) => "guest agent not ready".to_string(),
    })
}

/// One SYPAS PING to the guest's `port` over the VM's hybrid vsock.
pub async fn sypas_ping(uds: &Path, port: u32) -> Result<Duration, String> {
    use cell0_proto::host::{Client, ClientConfig, Endpoint, ReconnectPolicy};
    let cfg = ClientConfig {
        agent_id: "cell0d-health".into(),
        connect_timeout: Duration::from_secs(2),
        call_timeout: Duration::from_secs(2),
        ping_interval: None,
        reconnect: ReconnectPolicy::never(),
        ..ClientConfig::default()
    };
    let c = Client::connect(
        Endpoint::HybridVsock {
            uds: uds.to_path_buf(),
            port,
        },
        cfg,
    )
    .await
    .map_err(|e| e.to_string())?;
    let d = c.ping().await.map_err(|e| e.to_string())?;
    let _ = c.goodbye("health check").await;
    Ok(d)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// `cell0-vmm` next to the test binary (built with the workspace), when
    /// KVM is usable; else the test is skipped.
    fn vmm_bin() -> Option<PathBuf> {
        if std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_err()
        {
            eprintln!("SKIP: /dev/kvm cannot be opened");
            return None;
        }
        let exe = std::env::current_exe().unwrap();
        let mut dir = exe.parent().unwrap().to_path_buf();
        if dir.ends_with("deps") {
            dir.pop();
        }
        let p = dir.join("cell0-vmm");
        if !p.is_file() {
            eprintln!(
                "SKIP: {} is missing (cargo build -p cell0-vmm)",
                p.display()
            );
            return None;
        }
        Some(p)
    }

    fn record(id: &str, epoch: u64) -> VmRecord {
        let mut spec = crate::spec::VmSpec::from_proto(
            grpc::VmSpec {
                name: id.into(),
                vcpus: 1,
                memory_mib: 32,
                ..Default::default()
            },
            id,
        )
        .unwrap();
        spec.cmdline = Some("cell0.test=sypas-serve".into());
        spec.restart = RestartPolicy::Always;
        serde_json::from_value(json!({
            "id": id,
            "spec": spec,
            "node": "n1",
            "desired": "running",
            "created_at_ms": 1,
            "revision": 1,
            "cid": 7,
            "epoch": epoch,
        }))
        .unwrap()
    }

    async fn agent(dir: &Path, vmm: PathBuf, lease: Duration) -> (Arc<Agent>, Arc<Placements>) {
        let cfg = NodeConfig {
            node_id: "n1".into(),
            address: String::new(),
            data_dir: dir.to_path_buf(),
            vmm_bin: vmm,
            capacity: Resources {
                vcpus: 4,
                memory_mib: 1024,
            },
            cpu_overcommit: 1.0,
            memory_overcommit: 1.0,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(1),
            health_interval: Duration::from_secs(60),
            zone: "a".into(),
            region: "r".into(),
            jail: None,
        };
        let p = Arc::new(Placements::with_lease(Some(lease)));
        let a = Agent::start_with(
            cfg,
            Source::Remote(p.clone()),
            Arc::new(Metrics::new()),
            None,
        )
        .await
        .unwrap();
        tokio::spawn(a.clone().run());
        (a, p)
    }

    /// Waits (bounded) until `f` holds for VM `id`'s runtime.
    async fn until(a: &Agent, id: &str, what: &str, f: impl Fn(&Runtime) -> bool) -> Runtime {
        let t0 = Instant::now();
        loop {
            if let Some(rt) = a.runtime(id).filter(|rt| f(rt)) {
                return rt;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "{id}: never {what}; now {:?}",
                a.runtime(id)
                    .map(|r| (state_name(r.state), r.message, r.pid))
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn vmm_cmdline(pid: i32) -> String {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn leased_vmms_start_only_with_a_lease_are_renewed_and_fence_without_one() {
        let Some(vmm) = vmm_bin() else { return };
        let dir = tempfile::tempdir().unwrap();
        let lease = Duration::from_millis(1500);
        let (a, p) = agent(dir.path(), vmm, lease).await;
        p.set(vec![record("lv1", 1)]);
        a.wake.notify_one();
        // No acknowledged heartbeat yet: nothing starts.
        let rt = until(&a, "lv1", "pending for want of a lease", |r| {
            r.state == VmState::Pending && r.message.contains("holds no lease")
        })
        .await;
        assert_eq!(rt.pid, 0);
        // Heartbeats acknowledged every 200 ms for four lease periods: it
        // starts with the lease left, and lives on.
        let t0 = Instant::now();
        let mut pid = 0;
        while t0.elapsed() < lease * 4 {
            a.lease_acknowledged(Instant::now());
            if let Some(rt) = a.runtime("lv1").filter(|r| r.pid > 0) {
                if pid == 0 {
                    pid = rt.pid;
                    let c = vmm_cmdline(pid);
                    assert!(c.contains(" --lease-ms "), "{c}");
                }
                assert_eq!(rt.pid, pid, "the VMM was replaced although renewed");
                assert_eq!(rt.launch_seq, 1, "{}", rt.message);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(pid > 0, "it never started");
        assert!(proc::alive(pid));
        // Heartbeats stop being acknowledged: the VMM fences itself (exit 3)
        // and the VM does not start again without a lease.
        let rt = until(&a, "lv1", "fenced by its lease", |r| {
            r.exit_code == EXIT_LEASE_EXPIRED
        })
        .await;
        assert!(rt.message.contains("lease expired"), "{}", rt.message);
        assert!(!proc::alive(pid), "the fenced VMM is gone");
        until(&a, "lv1", "waiting for a lease again", |r| {
            r.state == VmState::Pending && r.pid == 0
        })
        .await;
        p.set(Vec::new());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_vm_placed_again_under_a_new_epoch_gets_a_new_vmm() {
        let Some(vmm) = vmm_bin() else { return };
        let dir = tempfile::tempdir().unwrap();
        let (a, p) = agent(dir.path(), vmm, Duration::from_secs(60)).await;
        a.lease_acknowledged(Instant::now());
        p.set(vec![record("ep1", 1)]);
        let old = until(&a, "ep1", "running", |r| {
            r.state == VmState::Running && r.pid > 0
        })
        .await;
        assert_eq!(old.epoch, 1);
        // Moved away and back within one heartbeat: the agent sees only the
        // same node, with the epoch two higher.
        p.set(vec![record("ep1", 3)]);
        let new = until(&a, "ep1", "running under epoch 3", |r| {
            r.state == VmState::Running && r.pid > 0 && r.epoch == 3
        })
        .await;
        assert_ne!(new.pid, old.pid, "the old epoch's VMM was kept");
        assert!(!proc::alive(old.pid), "the old VMM still runs");
        assert_eq!(new.launch_seq, old.launch_seq + 1);
        assert_eq!(new.restarts, old.restarts, "a replacement is not a restart");
        // The same epoch again changes nothing.
        p.set(vec![record("ep1", 3)]);
        a.wake.notify_one();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(a.runtime("ep1").unwrap().pid, new.pid);
        p.set(Vec::new());
        let t0 = Instant::now();
        while proc::alive(new.pid) && t0.elapsed() < Duration::from_secs(30) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(!proc::alive(new.pid), "the VMM outlived its placement");
    }
}
