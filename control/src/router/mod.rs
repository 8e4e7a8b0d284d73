// SPDX-License-Identifier: Apache-2.0
//! The SYPAS router (docs/SYPAS.md §16): capability tokens checked at HELLO
//! and REFRESH, CALL→REPLY routing to host services and between agents,
//! EVENT pub/sub with back-pressure, shared-memory refs checked against the
//! caller's window, and an audit log of every refusal.
//!
//! One router listens on several Unix sockets. The host socket
//! ([`Router::listen_host`]) serves host processes: their connections
//! belong to VM [`HOST_VM`]. Each VM gets a socket of its own
//! ([`Router::attach_vm`]), normally `<vsock_uds>_1024`, where the VMM's
//! hybrid vsock turns the guest's connections to port 1024 into Unix
//! connections; the router therefore knows the VM of every session, and a
//! token whose VM id is another VM's is refused with `AGENT_MISMATCH`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use cell0_control::router::{Router, RouterConfig};
//! let router = Router::new(RouterConfig::new("/var/lib/cell0".into()))?;
//! router.listen_host("/run/cell0/sypas.sock".as_ref()).await?;
//! router.attach_vm("vm7", "/run/cell0/vm7/vsock.sock_1024".as_ref(),
//!                  Some("/run/cell0/vm7/api.sock".as_ref())).await?;
//! # Ok(()) }
//! ```

pub mod audit;
pub mod guest;
mod handler;
pub mod pubsub;
pub mod services;
pub mod stats;
pub mod vmapi;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use cell0_proto::ErrorCode;
use cell0_proto::host::server::{ServerError, bind_unix};
use cell0_proto::host::{AcceptAll, ServiceError, Session, ShmWindow};
use cell0_proto::host::{Server, ServerConfig};
use cell0_proto::msg::ErrorMsg;
use tokio::sync::Notify;
use tokio::task::JoinSet;

pub use handler::{AGENT_PREFIX, EVENT_PREFIX, ROUTER_SERVICE};

use self::audit::{AuditError, AuditLog};
use self::guest::{AgentBootstrap, AgentStatus, GuestAgentSource, VmAgent};
use self::handler::{RouterHandler, TokenHook};
use self::pubsub::Topics;
use self::services::{EchoService, LocalService};
use self::stats::SypasStats;
use self::vmapi::VmApiError;
use crate::token::keys::{KeyError, KeyStore, RingSource};
use crate::token::{ANY_VM, Claims, Minter, TokenError, Verifier, valid_name};

/// The VM id of connections on the router's host socket.
pub const HOST_VM: &str = "host";

/// Router settings.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// The data dir: `keys/` (created on first use) and, by default, `audit.log`.
    pub data_dir: PathBuf,
    /// The audit log (default `<data-dir>/audit.log`).
    pub audit_log: Option<PathBuf>,
    /// How long a CALL forwarded to an agent or a host service process may take.
    pub forward_timeout: Duration,
    /// Per-connection tunables (outbound queue = EVENT back-pressure limit).
    pub server: ServerConfig,
    /// Register the built-in `echo` service.
    pub echo: bool,
    /// How long the VMM's API socket may take to hand over the window.
    pub vm_api_timeout: Duration,
}

impl RouterConfig {
    /// Defaults for a data dir.
    pub fn new(data_dir: PathBuf) -> RouterConfig {
        RouterConfig {
            data_dir,
            audit_log: None,
            forward_timeout: Duration::from_secs(30),
            server: ServerConfig::default(),
            echo: true,
            vm_api_timeout: Duration::from_secs(5),
        }
    }
}

/// Why the router could not do something.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// The root key or the key ring cannot be used.
    #[error("cannot use the root keys")]
    Keys(#[from] KeyError),
    /// The audit log cannot be opened.
    #[error("cannot open the audit log")]
    Audit(#[from] AuditError),
    /// A listening socket cannot be bound.
    #[error("cannot listen")]
    Listen(#[from] ServerError),
    /// The VMM did not hand over the window.
    #[error("cannot get the VM's shared-memory window")]
    VmApi(#[from] VmApiError),
    /// The VM id is not acceptable.
    #[error("{0:?} cannot be a VM id (1 to 256 of A-Z a-z 0-9 . _ - / : @ + =, not `host`)")]
    BadVmId(String),
    /// That VM is already attached.
    #[error("VM {0:?} is already attached")]
    VmExists(String),
    /// No such VM is attached.
    #[error("VM {0:?} is not attached")]
    NoSuchVm(String),
    /// That service name is taken or not acceptable.
    #[error("service {name:?}: {reason}")]
    Service {
        /// The name.
        name: String,
        /// Why.
        reason: String,
    },
    /// A blocking task failed.
    #[error("a router task failed: {0}")]
    Task(String),
    /// A token could not be minted.
    #[error("cannot mint the token")]
    Token(#[from] TokenError),
}

/// Where a session's connection comes from.
#[derive(Debug)]
pub(crate) struct Origin {
    pub(crate) vm: String,
    /// The VM's window, once known (`None` inside: the VM has none).
    window: std::sync::OnceLock<Option<Arc<ShmWindow>>>,
    /// The VMM's API socket to take the window from at the first HELLO, for
    /// a VM attached before its VMM ran ([`Router::attach_vm_lazy`]).
    api: Option<PathBuf>,
    /// Where the VM's agent's workload output goes ([`guest::AGENT_LOG`]
    /// beside the VM's listener); none for the host socket.
    pub(crate) agent_log: Option<PathBuf>,
}

impl Origin {
    fn new(vm: &str, window: Option<Option<Arc<ShmWindow>>>, api: Option<PathBuf>) -> Origin {
        let cell = std::sync::OnceLock::new();
        if let Some(w) = window {
            let _ = cell.set(w);
        }
        Origin {
            vm: vm.into(),
            window: cell,
            api,
            agent_log: None,
        }
    }

    /// The connection's VM window, if it has one (and it is known).
    pub(crate) fn window(&self) -> Option<&Arc<ShmWindow>> {
        self.window.get().and_then(Option::as_ref)
    }

    /// Takes the window from the VMM's API socket if it is not known yet. A
    /// failure is logged and tried again at the next HELLO; until then refs
    /// get SHM_UNAVAILABLE.
    pub(crate) async fn resolve_window(&self, timeout: Duration) {
        let Some(api) = self.api.clone() else {
            return;
        };
        if self.window.get().is_some() {
            return;
        }
        let got = tokio::task::spawn_blocking(move || vmapi::fetch_window(&api, timeout)).await;
        match got {
            Ok(Ok(w)) => {
                let _ = self.window.set(w.map(|w| Arc::new(w.window)));
            }
            Ok(Err(e)) => {
                tracing::warn!(vm = %self.vm, error = %e, "cannot take the VM's shared-memory window yet");
            }
            Err(e) => tracing::warn!(vm = %self.vm, error = %e, "window task failed"),
        }
    }
}

/// A session the router can CALL.
#[derive(Debug, Clone)]
pub(crate) struct Peer {
    pub(crate) session: Arc<Session>,
    pub(crate) origin: Arc<Origin>,
}

#[derive(Clone)]
pub(crate) enum Service {
    Local(Arc<dyn LocalService>),
    Remote(Peer),
}

/// State shared by every listener.
pub(crate) struct Core {
    pub(crate) verifier: Verifier,
    pub(crate) audit: AuditLog,
    pub(crate) topics: Topics,
    pub(crate) config: RouterConfig,
    agents: RwLock<HashMap<String, Peer>>,
    services: RwLock<HashMap<String, Service>>,
    /// Guest-agent registrations and status, by VM id.
    vm_agents: RwLock<HashMap<String, VmAgent>>,
    guest_source: RwLock<Option<Arc<dyn GuestAgentSource>>>,
    pub(crate) stats: Arc<SypasStats>,
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Core {
    pub(crate) fn agent(&self, id: &str) -> Option<Peer> {
        read(&self.agents).get(id).cloned()
    }

    pub(crate) fn service(&self, name: &str) -> Option<Service> {
        read(&self.services).get(name).cloned()
    }

    fn source(&self) -> Option<Arc<dyn GuestAgentSource>> {
        read(&self.guest_source).clone()
    }

    /// Whether VM `vm` runs a guest agent that may bootstrap.
    pub(crate) fn has_bootstrap(&self, vm: &str) -> bool {
        read(&self.vm_agents)
            .get(vm)
            .is_some_and(|a| a.boot.is_some())
            || self.source().is_some_and(|s| s.guest_agent(vm).is_some())
    }

    /// The agent id of VM `vm`'s guest agent, if it has one.
    pub(crate) fn vm_agent_id(&self, vm: &str) -> Option<String> {
        if let Some(b) = read(&self.vm_agents).get(vm).and_then(|a| a.boot.as_ref()) {
            return Some(b.agent_id.clone());
        }
        self.source()?.guest_agent(vm).map(|g| g.agent_id)
    }

    /// The bootstrap answer for `vm` (counted): the explicit registration, or
    /// a token minted now from the source's answer. `None`: no guest agent.
    pub(crate) fn bootstrap(&self, vm: &str) -> Option<Result<AgentBootstrap, ServiceError>> {
        let (explicit, minted) = read(&self.vm_agents)
            .get(vm)
            .map(|a| (a.boot.clone(), a.minted.clone()))
            .unwrap_or_default();
        let boot = match (explicit, minted) {
            (Some(b), _) => Ok(b),
            // A token minted for this VM's agent earlier is handed out again
            // while it has more than half its life left: repeated bootstraps
            // cost no signing.
            (None, Some((b, at))) if at.elapsed() < guest::GUEST_TOKEN_TTL / 2 => {
                // The VM must still run a guest agent.
                self.source()?.guest_agent(vm)?;
                Ok(b)
            }
            (None, _) => {
                let g = self.source()?.guest_agent(vm)?;
                let b = mint_bootstrap(&self.config.data_dir, vm, g).map_err(|e| {
                    ServiceError::new(
                        ErrorCode::Internal,
                        format!("Cannot mint the guest agent's token: {}.", error_chain(&e)),
                    )
                });
                if let Ok(b) = &b {
                    write(&self.vm_agents)
                        .entry(vm.to_owned())
                        .or_default()
                        .minted = Some((b.clone(), std::time::Instant::now()));
                }
                b
            }
        };
        if let Ok(b) = &boot {
            self.with_agent_status(vm, &b.agent_id, |s| s.bootstraps += 1);
        }
        Some(boot)
    }

    /// Applies `f` to `vm`'s agent status (made on first use, for `agent`).
    pub(crate) fn with_agent_status(
        &self,
        vm: &str,
        agent: &str,
        f: impl FnOnce(&mut AgentStatus),
    ) {
        let mut m = write(&self.vm_agents);
        let a = m.entry(vm.to_owned()).or_default();
        if a.status.agent_id.is_empty() {
            a.status.agent_id = agent.to_owned();
        }
        f(&mut a.status);
    }

    /// The newest session of an agent wins (a reconnect replaces the old one).
    pub(crate) fn add_agent(&self, peer: Peer) {
        let id = peer.session.agent_id().to_owned();
        tracing::debug!(agent = %id, vm = %peer.origin.vm, session = peer.session.id(), "agent connected");
        write(&self.agents).insert(id, peer);
    }

    pub(crate) fn remove_session(&self, session: &Session) {
        let sid = session.id();
        {
            let mut agents = write(&self.agents);
            if agents
                .get(session.agent_id())
                .is_some_and(|p| p.session.id() == sid)
            {
                agents.remove(session.agent_id());
            }
        }
        write(&self.services).retain(|name, s| match s {
            Service::Remote(p) if p.session.id() == sid => {
                tracing::info!(service = %name, "service unregistered: its session closed");
                false
            }
            _ => true,
        });
        self.topics.remove_session(sid);
    }

    pub(crate) fn register_remote(&self, name: &str, peer: Peer) -> Result<(), ServiceError> {
        let mut services = write(&self.services);
        match services.get(name) {
            Some(Service::Remote(p)) if p.session.id() == peer.session.id() => Ok(()),
            // A registration left by a connection that ended without a clean
            // close (cut at shutdown) does not hold the name.
            Some(Service::Remote(p)) if p.session.is_closed() => {
                services.insert(name.to_owned(), Service::Remote(peer));
                Ok(())
            }
            Some(_) => Err(ServiceError::new(
                ErrorCode::BadRequest,
                format!("Service {name:?} is already registered."),
            )),
            None => {
                tracing::info!(service = %name, agent = peer.session.agent_id(), "service registered");
                services.insert(name.to_owned(), Service::Remote(peer));
                Ok(())
            }
        }
    }

    pub(crate) fn unregister_remote(&self, name: &str, session: u64) -> Result<(), ServiceError> {
        let mut services = write(&self.services);
        match services.get(name) {
            Some(Service::Remote(p)) if p.session.id() == session => {
                services.remove(name);
                Ok(())
            }
            _ => Err(ServiceError::new(
                ErrorCode::BadRequest,
                format!("This session has not registered service {name:?}."),
            )),
        }
    }

    /// Forgets every session of a VM, and every closed session's subscriptions.
    fn purge(&self, origin: &Arc<Origin>) {
        write(&self.agents).retain(|_, p| !Arc::ptr_eq(&p.origin, origin));
        write(&self.services).retain(|_, s| match s {
            Service::Remote(p) => !Arc::ptr_eq(&p.origin, origin) && !p.session.is_closed(),
            Service::Local(_) => true,
        });
        self.topics.remove_closed();
    }

    /// Every session of a VM (to end them when the VM is detached).
    fn sessions_of(&self, origin: &Arc<Origin>) -> Vec<Arc<Session>> {
        read(&self.agents)
            .values()
            .filter(|p| Arc::ptr_eq(&p.origin, origin))
            .map(|p| p.session.clone())
            .collect()
    }
}

struct Listener {
    origin: Arc<Origin>,
    path: PathBuf,
    stop: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

/// A running router. Cheap to clone; every clone is the same router.
#[derive(Clone)]
pub struct Router {
    core: Arc<Core>,
    base: Server<RouterHandler, AcceptAll>,
    host: Arc<Origin>,
    listeners: Arc<Mutex<HashMap<String, Listener>>>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("data_dir", &self.core.config.data_dir)
            .finish_non_exhaustive()
    }
}

/// What [`Router::attach_vm`] set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmInfo {
    /// The VM id.
    pub vm: String,
    /// The socket the router listens on for it.
    pub listen: PathBuf,
    /// The window size, if the VM has one.
    pub shm_size: Option<u64>,
    /// The window's guest address, if known.
    pub shm_gpa: Option<u64>,
}

impl Router {
    /// Opens (or creates) the root keys in the data dir, the key ring for
    /// verification (reloaded when another process rotates it), and the
    /// audit log. Needs a tokio runtime only once it listens.
    pub fn new(config: RouterConfig) -> Result<Router, RouterError> {
        KeyStore::open(&config.data_dir)?;
        let ring = RingSource::watch(&KeyStore::ring_path(&config.data_dir))?;
        let audit_path = config
            .audit_log
            .clone()
            .unwrap_or_else(|| config.data_dir.join("audit.log"));
        let audit = AuditLog::open(&audit_path)?;
        Ok(Self::with_parts(config, Verifier::new(ring), audit))
    }

    /// A router over a given verifier and audit log (for verifiers that
    /// trust only public keys, and for tests).
    pub fn with_parts(config: RouterConfig, verifier: Verifier, audit: AuditLog) -> Router {
        let echo = config.echo;
        let server_config = config.server.clone();
        let core = Arc::new(Core {
            verifier,
            audit,
            topics: Topics::default(),
            config,
            agents: RwLock::new(HashMap::new()),
            services: RwLock::new(HashMap::new()),
            vm_agents: RwLock::new(HashMap::new()),
            guest_source: RwLock::new(None),
            stats: Arc::new(SypasStats::default()),
        });
        if echo {
            write(&core.services).insert("echo".into(), Service::Local(Arc::new(EchoService)));
        }
        let host = Arc::new(Origin::new(HOST_VM, Some(None), None));
        let base = Server::new(RouterHandler {
            core: core.clone(),
            origin: host.clone(),
        })
        .with_config(server_config);
        Router {
            core,
            base,
            host,
            listeners: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// A minter with the data dir's current signing key (read from disk, so
    /// a rotation by another process is seen).
    pub fn minter(&self) -> Result<Minter, RouterError> {
        Ok(KeyStore::open(&self.core.config.data_dir)?.minter())
    }

    /// The token verifier.
    pub fn verifier(&self) -> &Verifier {
        &self.core.verifier
    }

    /// The audit log.
    pub fn audit(&self) -> &AuditLog {
        &self.core.audit
    }

    /// Registers an in-process service under `name`.
    pub fn register_local(
        &self,
        name: &str,
        service: Arc<dyn LocalService>,
    ) -> Result<(), RouterError> {
        if !valid_name(name, false)
            || name == ROUTER_SERVICE
            || name == guest::NODE_SERVICE
            || name.starts_with(AGENT_PREFIX)
        {
            return Err(RouterError::Service {
                name: name.into(),
                reason: "not a valid service name".into(),
            });
        }
        let mut s = write(&self.core.services);
        if s.contains_key(name) {
            return Err(RouterError::Service {
                name: name.into(),
                reason: "already registered".into(),
            });
        }
        s.insert(name.into(), Service::Local(service));
        Ok(())
    }

    /// Removes a service (in-process or registered by a host process).
    pub fn unregister(&self, name: &str) -> bool {
        write(&self.core.services).remove(name).is_some()
    }

    /// The services registered now, sorted.
    pub fn services(&self) -> Vec<String> {
        let mut v: Vec<String> = read(&self.core.services).keys().cloned().collect();
        v.sort();
        v
    }

    /// The agents connected now, sorted, with their VM.
    pub fn agents(&self) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = read(&self.core.agents)
            .iter()
            .map(|(a, p)| (a.clone(), p.origin.vm.clone()))
            .collect();
        v.sort();
        v
    }

    /// Subscribers dropped as too slow so far.
    pub fn slow_consumers_dropped(&self) -> u64 {
        self.core.topics.slow_dropped()
    }

    /// The router's counters (CALLs routed, refusals).
    pub fn stats(&self) -> Arc<SypasStats> {
        self.core.stats.clone()
    }

    /// Tells the router which VMs run a guest agent (`cell0d serve`: the
    /// replicated VM records). Consulted at each token-less HELLO and
    /// bootstrap on a VM's listener; the token is minted at bootstrap.
    pub fn set_guest_agent_source(&self, source: Arc<dyn GuestAgentSource>) {
        *write(&self.core.guest_source) = Some(source);
    }

    /// Registers what VM `vm`'s guest agent gets at bootstrap
    /// (docs/GUEST-AGENT.md), overriding the source: a token-less HELLO on
    /// that VM's listener is then granted the bootstrap right, and
    /// `cell0.node/bootstrap` there answers with `boot`.
    /// [`detach_vm`](Self::detach_vm) removes it.
    pub fn set_agent_bootstrap(&self, vm: &str, boot: AgentBootstrap) -> Result<(), RouterError> {
        check_vm_id(vm)?;
        if !valid_name(&boot.agent_id, false) {
            return Err(RouterError::Service {
                name: boot.agent_id,
                reason: "not a valid agent id".into(),
            });
        }
        let mut m = write(&self.core.vm_agents);
        let a = m.entry(vm.into()).or_default();
        a.status.agent_id = boot.agent_id.clone();
        a.boot = Some(boot);
        Ok(())
    }

    /// What the router has seen of VM `vm`'s guest agent, if anything.
    pub fn agent_status(&self, vm: &str) -> Option<AgentStatus> {
        read(&self.core.vm_agents).get(vm).map(|a| a.status.clone())
    }

    /// CALLs `method` of VM `vm`'s guest agent (the agent registered for it,
    /// connected on that VM's own listener) and waits at most `timeout`.
    /// `AGENT_UNREACHABLE` when the VM has no guest agent or it is not connected.
    pub async fn call_vm_agent(
        &self,
        vm: &str,
        method: &str,
        payload: bytes::Bytes,
        timeout: Duration,
    ) -> Result<cell0_proto::msg::Reply, ServiceError> {
        let unreachable = |m: String| ServiceError::new(ErrorCode::AgentUnreachable, m);
        let agent = self
            .core
            .vm_agent_id(vm)
            .ok_or_else(|| unreachable(format!("VM {vm:?} has no cell0 guest agent.")))?;
        let peer = self
            .core
            .agent(&agent)
            .filter(|p| p.origin.vm == vm)
            .ok_or_else(|| {
                unreachable(format!(
                    "The guest agent {agent:?} of VM {vm:?} is not connected."
                ))
            })?;
        let call = cell0_proto::msg::Call {
            // The callee learns who calls: the node.
            service: guest::NODE_SERVICE.into(),
            method: method.into(),
            payload,
            shm: Vec::new(),
        };
        self.core.stats.call(stats::Target::Agent);
        match peer.session.call(&call, timeout).await {
            Ok(r) if r.shm.is_empty() => Ok(r),
            Ok(_) => Err(ServiceError::new(
                ErrorCode::Internal,
                "The guest agent answered with shm refs.",
            )),
            Err(cell0_proto::host::SessionCallError::Remote(e)) => Err(e),
            Err(cell0_proto::host::SessionCallError::Timeout) => Err(ServiceError::new(
                ErrorCode::Timeout,
                "The guest agent did not answer in time.",
            )),
            Err(e) => Err(unreachable(format!(
                "The guest agent of VM {vm:?} did not answer: {e}."
            ))),
        }
    }

    /// Listens for host processes on `path` (VM [`HOST_VM`]).
    /// The router of a host's VMs (`cell0d serve`'s node and `cell0d node`):
    /// keys and audit log under `data_dir`, the host socket `router.sock`.
    pub async fn for_host(data_dir: &Path) -> Result<(Arc<Router>, PathBuf), RouterError> {
        let router = Arc::new(Router::new(RouterConfig {
            audit_log: Some(data_dir.join("router-audit.log")),
            ..RouterConfig::new(data_dir.join("router"))
        })?);
        let sock = data_dir.join("router.sock");
        router.listen_host(&sock).await?;
        Ok((router, sock))
    }

    pub async fn listen_host(&self, path: &Path) -> Result<(), RouterError> {
        self.listen(HOST_VM, path, self.host.clone()).await
    }

    /// Attaches a VM: gets its window from the VMM's API socket `api` (if
    /// given), and listens on `listen` (normally `<vsock_uds>_1024`) for its
    /// guest's connections. Sessions there belong to `vm`.
    pub async fn attach_vm(
        &self,
        vm: &str,
        listen: &Path,
        api: Option<&Path>,
    ) -> Result<VmInfo, RouterError> {
        check_vm_id(vm)?;
        let (window, gpa) = match api {
            Some(api) => {
                let api = api.to_path_buf();
                let timeout = self.core.config.vm_api_timeout;
                let got = tokio::task::spawn_blocking(move || vmapi::fetch_window(&api, timeout))
                    .await
                    .map_err(|e| RouterError::Task(e.to_string()))??;
                match got {
                    Some(w) => (Some(w.window), Some(w.gpa)),
                    None => (None, None),
                }
            }
            None => (None, None),
        };
        self.attach_vm_with_window(vm, listen, window, gpa).await
    }

    /// Attaches a VM before its VMM runs: listens on `listen` at once, and
    /// takes the window from the VMM's API socket `api` at the first HELLO
    /// from the guest (by then the VMM is up). What the node agent uses.
    pub async fn attach_vm_lazy(
        &self,
        vm: &str,
        listen: &Path,
        api: &Path,
    ) -> Result<VmInfo, RouterError> {
        check_vm_id(vm)?;
        let origin = Arc::new(Origin {
            agent_log: listen.parent().map(|d| d.join(guest::AGENT_LOG)),
            ..Origin::new(vm, None, Some(api.to_path_buf()))
        });
        self.listen(vm, listen, origin).await?;
        tracing::info!(vm, listen = %listen.display(), api = %api.display(), "VM attached; window at first HELLO");
        Ok(VmInfo {
            vm: vm.into(),
            listen: listen.to_path_buf(),
            shm_size: None,
            shm_gpa: None,
        })
    }

    /// [`attach_vm`](Self::attach_vm) with a window the caller mapped itself.
    pub async fn attach_vm_with_window(
        &self,
        vm: &str,
        listen: &Path,
        window: Option<ShmWindow>,
        gpa: Option<u64>,
    ) -> Result<VmInfo, RouterError> {
        check_vm_id(vm)?;
        let shm_size = window.as_ref().map(ShmWindow::len);
        let origin = Arc::new(Origin {
            agent_log: listen.parent().map(|d| d.join(guest::AGENT_LOG)),
            ..Origin::new(vm, Some(window.map(Arc::new)), None)
        });
        self.listen(vm, listen, origin).await?;
        tracing::info!(vm, listen = %listen.display(), shm = ?shm_size, "VM attached");
        Ok(VmInfo {
            vm: vm.into(),
            listen: listen.to_path_buf(),
            shm_size,
            shm_gpa: gpa,
        })
    }

    async fn listen(&self, key: &str, path: &Path, origin: Arc<Origin>) -> Result<(), RouterError> {
        if self.lock_listeners().contains_key(key) {
            return Err(RouterError::VmExists(key.into()));
        }
        let listener = bind_unix(path).await?;
        let server = self
            .base
            .with_handler(RouterHandler {
                core: self.core.clone(),
                origin: origin.clone(),
            })
            .with_hello_hook(TokenHook {
                core: self.core.clone(),
                origin: origin.clone(),
            });
        let stop = Arc::new(Notify::new());
        let stop2 = stop.clone();
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    () = stop2.notified() => break,
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => {
                            let server = server.clone();
                            conns.spawn(async move { server.serve_connection(stream).await });
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "accept failed; retrying");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    },
                }
            }
            // The sessions were told to end (SHUTTING_DOWN); give them a moment
            // to close cleanly, then cut the rest.
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                while conns.join_next().await.is_some() {}
            })
            .await;
            conns.shutdown().await;
        });
        let mut l = self.lock_listeners();
        if l.contains_key(key) {
            task.abort();
            return Err(RouterError::VmExists(key.into()));
        }
        l.insert(
            key.into(),
            Listener {
                origin,
                path: path.to_path_buf(),
                stop,
                task,
            },
        );
        Ok(())
    }

    fn lock_listeners(&self) -> std::sync::MutexGuard<'_, HashMap<String, Listener>> {
        self.listeners
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Stops listening for a VM, ends its sessions (`SHUTTING_DOWN`) and
    /// removes its socket.
    pub async fn detach_vm(&self, vm: &str) -> Result<(), RouterError> {
        write(&self.core.vm_agents).remove(vm);
        let l = self
            .lock_listeners()
            .remove(vm)
            .ok_or_else(|| RouterError::NoSuchVm(vm.into()))?;
        self.stop_listener(l).await;
        Ok(())
    }

    async fn stop_listener(&self, l: Listener) {
        for s in self.core.sessions_of(&l.origin) {
            s.disconnect(ErrorMsg::new(
                ErrorCode::ShuttingDown,
                "The router stops serving this VM.",
            ));
        }
        l.stop.notify_one();
        let _ = l.task.await;
        // Sessions cut before they could close cleanly leave no trace behind.
        self.core.purge(&l.origin);
        let _ = std::fs::remove_file(&l.path);
    }

    /// Stops every listener and ends every session.
    pub async fn shutdown(&self) {
        let all: Vec<Listener> = self.lock_listeners().drain().map(|(_, l)| l).collect();
        for l in all {
            self.stop_listener(l).await;
        }
    }
}

/// A token for `g`, bound to VM `vm`, with `g`'s rights and the agent's own
/// ([`guest::agent_rights`]), living [`guest::GUEST_TOKEN_TTL`].
fn mint_bootstrap(
    data_dir: &Path,
    vm: &str,
    g: guest::GuestAgent,
) -> Result<AgentBootstrap, RouterError> {
    let mut rights = g.rights;
    rights.extend(guest::agent_rights(&g.agent_id));
    let claims = Claims {
        agent: g.agent_id.clone(),
        vm: vm.into(),
        rights,
        expires: crate::token::keys::unix_now() + guest::GUEST_TOKEN_TTL.as_secs(),
    };
    let token = KeyStore::open(data_dir)?.minter().mint(&claims)?;
    Ok(AgentBootstrap {
        agent_id: g.agent_id,
        token: token.into(),
        workload: g.workload,
        heartbeat_ms: 0,
    })
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn check_vm_id(vm: &str) -> Result<(), RouterError> {
    if vm == HOST_VM || vm == ANY_VM || !valid_name(vm, false) {
        return Err(RouterError::BadVmId(vm.into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
