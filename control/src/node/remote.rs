// SPDX-License-Identifier: Apache-2.0
//! `cell0d node`: a node agent on a host that runs no Raft member.
//!
//! It registers its node through `NodeService.Register` on any member, then
//! heartbeats to the Raft leader every `--heartbeat-ms`. A heartbeat carries
//! the status of every VM the agent runs, and its answer carries the node's
//! state and, when the state changed, the VM records placed on this node.
//! The agent reconciles those with the same code as the agent embedded in
//! `cell0d serve` ([`super::Agent`]).
//!
//! A member of a multi-member cluster runs its own node agent through the
//! same loop ([`Remote::run`], with [`Owner::Member`]): it registers its node
//! through its own store instead of `NodeService.Register`, and learns its
//! placements at start from its own state after a linearizable read.
//!
//! Fencing (docs/CLUSTER.md, "Nodes and failure handling"):
//! - told `down` in a heartbeat answer, the agent empties its placements
//!   (every VM it runs is terminated) before it registers again, and starts
//!   only what the fresh placements name;
//! - at start it adopts only the VMMs still placed here under the placement
//!   epoch they were launched with;
//! - with no acknowledged heartbeat for `--lease-ms` (sent time to now), it
//!   terminates its VMs on its own: the leader marks it down only after
//!   `--node-down-ms` of silence, later than the lease ends.

// Start-up errors are returned once; their size does not matter.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cell0_proto::grpc::{
    self, cluster_service_client::ClusterServiceClient, node_service_client::NodeServiceClient,
};
use tonic::transport::Channel;

use super::liveness::{MEMBER_ID_LABEL, MEMBER_VALUE, REMOTE_LABEL, REMOTE_VALUE, member_of};
use super::{Agent, NodeConfig, NodeError, Placements};
use crate::metrics::Metrics;
use crate::store::state::{NodeRecord, NodeState};
use crate::store::{Command, Store, VmRecord};

/// `cell0d node`'s command line.
#[derive(clap::Args, Debug)]
#[command(after_help = "Example (docs/CLUSTER.md):
  cell0d node --join 10.0.0.1:7070,10.0.0.2:7070 --node-name n1 --zone eu-1a --region eu \\
      --labels disk=nvme --data-dir /var/lib/cell0-node")]
pub struct NodeArgs {
    /// This host's node: name, capacity, VMM, jail.
    #[command(flatten)]
    pub host: super::HostArgs,
    /// Control-plane members to reach (any one is enough; the agent finds the leader).
    #[arg(long, value_name = "ADDR,...", value_delimiter = ',', required = true)]
    pub join: Vec<String>,
    /// Mutual TLS to the members: a dir with ca.pem, cert.pem and key.pem
    /// (`cell0d issue-cert --name NODE_NAME`); the certificate's name must be
    /// the node name.
    #[arg(long, env = "CELL0_TLS_DIR")]
    pub tls_dir: Option<PathBuf>,
    /// Dial the members over plain TCP (members started with
    /// --insecure-plaintext): no certificate is checked either way.
    #[arg(long, conflicts_with = "tls_dir")]
    pub insecure_plaintext: bool,
    /// Pass attestation before every registration (members need it unless
    /// started with --allow-unattested-nodes): a vTPM (swtpm, CA in
    /// $CELL0_TPM_CA_DIR) measures this cell0d and --vmm into PCR 0 and quotes
    /// it for the member (docs/CLUSTER.md, Security). swtpm proves only the
    /// software stack, not the host.
    #[arg(long)]
    pub attest: bool,
    /// Labels VMs select nodes by: `k=v,...`.
    #[arg(long, value_name = "K=V,...", value_delimiter = ',')]
    pub labels: Vec<String>,
    /// Data dir: VM run dirs under `node/vms/`.
    #[arg(long, env = "CELL0_DATA_DIR", default_value = "/var/lib/cell0-node")]
    pub data_dir: PathBuf,
    /// Heartbeat interval in ms.
    #[arg(long, default_value_t = 500)]
    pub heartbeat_ms: u64,
    /// Self-fencing lease in ms: with no acknowledged heartbeat for this long,
    /// the agent terminates its VMs. Keep it below the members'
    /// --node-down-ms (default 3000) minus the time a VMM takes to die. 0: never.
    #[arg(long, default_value_t = 2000)]
    pub lease_ms: u64,
    /// Serve this node's API on ADDR: Logs, Exec and Attest of its own VMs,
    /// which members proxy their clients' calls to (over --tls-dir's mutual
    /// TLS with this node's certificate, for members' certificates only).
    /// Default: no API, and members answer that this node serves none.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<std::net::SocketAddr>,
    /// The address members reach --listen at (default: the bound address).
    #[arg(long, value_name = "HOST:PORT", requires = "listen")]
    pub advertise: Option<String>,
}

/// Parses `k=v` labels.
pub fn parse_labels(items: &[String]) -> Result<BTreeMap<String, String>, NodeError> {
    let mut out = BTreeMap::new();
    for it in items.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
        let (k, v) = it
            .split_once('=')
            .ok_or_else(|| NodeError::Usage(format!("--labels: {it:?} is not KEY=VALUE")))?;
        let (k, v) = (k.trim(), v.trim());
        if k.is_empty() || k == REMOTE_LABEL {
            return Err(NodeError::Usage(format!(
                "--labels: {k:?} is not a label key you can set"
            )));
        }
        if out.insert(k.to_string(), v.to_string()).is_some() {
            return Err(NodeError::Usage(format!("--labels: {k:?} is given twice")));
        }
    }
    Ok(out)
}

/// `--tls-dir`'s client configuration, set once by [`node_main`].
static TLS: std::sync::OnceLock<tonic::transport::ClientTlsConfig> = std::sync::OnceLock::new();

fn endpoint(addr: &str, timeout: Duration) -> Result<tonic::transport::Endpoint, String> {
    let uri = crate::tls::uri(addr, TLS.get().is_some());
    let mut ep = tonic::transport::Endpoint::from_shared(uri)
        .map_err(|e| format!("{addr:?} is not an address: {e}"))?;
    if let Some(t) = TLS.get() {
        ep = ep
            .tls_config(t.clone())
            .map_err(|e| format!("TLS for {addr}: {e}"))?;
    }
    Ok(ep
        .connect_timeout(timeout)
        .timeout(timeout)
        .tcp_nodelay(true))
}

/// The connection to the control plane: the members to try and the leader.
struct Conn {
    join: Vec<String>,
    timeout: Duration,
    leader: Option<(String, NodeServiceClient<Channel>)>,
    next: usize,
}

impl Conn {
    async fn client(addr: &str, timeout: Duration) -> Result<NodeServiceClient<Channel>, String> {
        let ch = endpoint(addr, timeout)?
            .connect()
            .await
            .map_err(|e| format!("cannot reach {addr}: {e}"))?;
        Ok(NodeServiceClient::new(ch))
    }

    /// A client of the leader, asking the members who it is.
    async fn leader(&mut self) -> Result<NodeServiceClient<Channel>, String> {
        if let Some((_, c)) = &self.leader {
            return Ok(c.clone());
        }
        let mut errs = Vec::new();
        for _ in 0..self.join.len() {
            let addr = self.join[self.next % self.join.len()].clone();
            self.next += 1;
            let st = async {
                let ch = endpoint(&addr, self.timeout)?
                    .connect()
                    .await
                    .map_err(|e| format!("cannot reach {addr}: {e}"))?;
                ClusterServiceClient::new(ch)
                    .status(grpc::ClusterStatusRequest {})
                    .await
                    .map(|r| r.into_inner())
                    .map_err(|e| format!("{addr}: {}", e.message()))
            }
            .await;
            match st {
                Ok(st) if !st.leader_address.is_empty() => {
                    let c = Self::client(&st.leader_address, self.timeout).await?;
                    self.leader = Some((st.leader_address, c.clone()));
                    return Ok(c);
                }
                Ok(_) => errs.push(format!("{addr}: no leader known")),
                Err(e) => errs.push(e),
            }
        }
        Err(errs.join("; "))
    }

    /// Any member (for Register, which members forward to the leader).
    async fn any(&mut self) -> Result<NodeServiceClient<Channel>, String> {
        if let Ok(c) = self.leader().await {
            return Ok(c);
        }
        let addr = self.join[self.next % self.join.len()].clone();
        self.next += 1;
        Self::client(&addr, self.timeout).await
    }

    /// Forgets the leader (after an error), or switches to the one a member named.
    async fn reset(&mut self, hint: Option<&str>) {
        self.leader = None;
        if let Some(a) = hint.filter(|a| !a.is_empty()) {
            if let Ok(c) = Self::client(a, self.timeout).await {
                self.leader = Some((a.to_string(), c));
            }
        }
    }
}

/// Whose node an agent runs, and how it registers.
pub(crate) enum Owner {
    /// `cell0d node`: `NodeService.Register` on any member (after passing
    /// attestation with `--attest`).
    Agent {
        /// Labels VMs select the node by.
        labels: BTreeMap<String, String>,
        /// `--attest`: this node's vTPM with its binaries measured.
        attester: Option<Arc<super::admission::NodeAttester>>,
    },
    /// A member's own node in a multi-member cluster: `PutNode` through the
    /// member's own store (a member is trusted: it is a Raft voter), and
    /// heartbeats that carry the member id.
    Member {
        /// The member's store.
        store: Store,
        /// The member's Raft id.
        id: u64,
    },
}

/// A node agent fed by heartbeat answers: `cell0d node`, or a member's own
/// agent in a multi-member cluster.
pub(crate) struct Remote {
    cfg: NodeConfig,
    owner: Owner,
    conn: Conn,
    placements: Arc<Placements>,
    heartbeat: Duration,
    lease: Option<Duration>,
    /// The cluster's revocation list, from the heartbeat answers.
    revocations: crate::tls::KnownRevocations,
}

/// What a heartbeat answered.
enum Beat {
    /// Answered: the node's state and, if sent, the placements at a revision.
    Ok {
        state: String,
        placements: Option<(u64, Vec<VmRecord>)>,
    },
    /// The node is not registered.
    Unknown,
    /// No answer.
    Failed(String),
    /// The name is not this agent's to use (a member's own node), or this
    /// member was removed from the cluster.
    Refused(String),
}

impl Remote {
    /// An agent of `cfg`'s node that reaches the control plane through the
    /// members at `join`, heartbeating every `heartbeat`, fencing itself
    /// after `lease` without an acknowledged heartbeat.
    pub(crate) fn new(
        cfg: NodeConfig,
        owner: Owner,
        join: Vec<String>,
        heartbeat: Duration,
        lease: Option<Duration>,
    ) -> Self {
        Self {
            cfg,
            owner,
            conn: Conn {
                join,
                timeout: heartbeat.max(Duration::from_millis(500)),
                leader: None,
                next: 0,
            },
            placements: Arc::new(Placements::with_lease(lease)),
            heartbeat,
            lease,
            revocations: Default::default(),
        }
    }

    /// The revocation list as the heartbeat answers last gave it (the
    /// node's API checks member certificates against it).
    pub(crate) fn revocations(&self) -> crate::tls::KnownRevocations {
        self.revocations.clone()
    }

    /// The placements the agent runs (pass to [`Agent::start_remote`]).
    pub(crate) fn placements(&self) -> Arc<Placements> {
        self.placements.clone()
    }

    fn node(&self) -> grpc::Node {
        let mut labels: std::collections::HashMap<String, String> = match &self.owner {
            Owner::Agent { labels, .. } => labels.clone().into_iter().collect(),
            Owner::Member { .. } => Default::default(),
        };
        labels.insert(REMOTE_LABEL.into(), REMOTE_VALUE.into());
        grpc::Node {
            id: self.cfg.node_id.clone(),
            address: self.cfg.address.clone(),
            zone: self.cfg.zone.clone(),
            region: self.cfg.region.clone(),
            capacity: Some(grpc::Resources {
                vcpus: self.cfg.capacity.vcpus,
                memory_mib: self.cfg.capacity.memory_mib,
            }),
            cpu_overcommit: self.cfg.cpu_overcommit,
            memory_overcommit: self.cfg.memory_overcommit,
            labels,
            ..Default::default()
        }
    }

    /// Registers the node. `Err(Some(_))`: refused for good (the name is a
    /// member's own node, or this member left the cluster); `Err(None)`: try
    /// again.
    async fn register(&mut self) -> Result<(), Option<String>> {
        if let Owner::Member { store, id } = &self.owner {
            return register_member(&self.cfg, store, *id).await;
        }
        let mut c = match self.conn.any().await {
            Ok(c) => c,
            Err(e) => {
                tracing::info!(error = %e, "cannot register yet");
                return Err(None);
            }
        };
        if let Owner::Agent {
            attester: Some(att),
            ..
        } = &self.owner
        {
            let att = att.clone();
            // Attest to the member that takes the registration.
            let addr = match &self.conn.leader {
                Some((a, _)) => a.clone(),
                None => {
                    let n = self.conn.join.len();
                    self.conn.join[(self.conn.next + n - 1) % n].clone()
                }
            };
            // The member's first admission sets its verifier up (about a second).
            let ch = endpoint(&addr, self.conn.timeout)?
                .timeout(Duration::from_secs(30))
                .connect()
                .await
                .map_err(|e| format!("cannot reach {addr}: {e}"))?;
            let mut ac = grpc::admission_service_client::AdmissionServiceClient::new(ch);
            att.admit(&mut ac, self.node())
                .await
                .map_err(|s| format!("attestation refused by {addr}: {}", s.message()))?;
            tracing::info!(node = %self.cfg.node_id, member = %addr, "attestation passed");
        }
        match c
            .register(grpc::RegisterNodeRequest {
                node: Some(self.node()),
            })
            .await
        {
            Ok(_) => {
                tracing::info!(node = %self.cfg.node_id, "node registered");
                Ok(())
            }
            Err(s) if s.code() == tonic::Code::AlreadyExists => {
                Err(Some(format!("registration refused: {}", s.message())))
            }
            Err(s) => {
                self.conn.reset(None).await;
                tracing::info!(error = %s.message(), "cannot register yet");
                Err(None)
            }
        }
    }

    async fn beat(&mut self, revision: u64, agent: Option<&Agent>) -> Beat {
        let mut c = match self.conn.leader().await {
            Ok(c) => c,
            Err(e) => return Beat::Failed(e),
        };
        let mut req = tonic::Request::new(grpc::HeartbeatRequest {
            id: self.cfg.node_id.clone(),
            revision,
            vms: agent.map(|a| a.statuses()).unwrap_or_default(),
            revocations_version: self.revocations.version(),
        });
        if let Owner::Member { id, .. } = &self.owner {
            if let Ok(v) = id.to_string().parse() {
                req.metadata_mut().insert(crate::api::MEMBER_HEADER, v);
            }
        }
        match c.heartbeat(req).await {
            Ok(r) => {
                let r = r.into_inner();
                if r.revocations_version != self.revocations.version() {
                    let n = r.revocations.len();
                    self.revocations.set(
                        r.revocations_version,
                        r.revocations.into_iter().map(Into::into),
                    );
                    tracing::info!(
                        node = %self.cfg.node_id,
                        revoked = n,
                        "the cluster's certificate revocation list changed"
                    );
                }
                let placements = if r.has_placements {
                    match serde_json::from_slice::<Vec<VmRecord>>(&r.placements_json) {
                        Ok(v) => Some((r.revision, v)),
                        Err(e) => return Beat::Failed(format!("bad placements: {e}")),
                    }
                } else {
                    None
                };
                Beat::Ok {
                    state: r.state,
                    placements,
                }
            }
            Err(s) if s.code() == tonic::Code::NotFound => Beat::Unknown,
            Err(s)
                if matches!(
                    s.code(),
                    tonic::Code::AlreadyExists | tonic::Code::PermissionDenied
                ) =>
            {
                Beat::Refused(s.message().into())
            }
            Err(s) => {
                let hint = s
                    .metadata()
                    .get("cell0-leader")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                self.conn.reset(hint.as_deref()).await;
                Beat::Failed(s.message().to_string())
            }
        }
    }

    /// Terminates every VM: the node holds no lease, or was marked down.
    fn fence(&self, agent: &Agent, why: &str) {
        if !self.placements.is_empty() || !agent.pids().is_empty() {
            tracing::warn!(node = %self.cfg.node_id, "fencing: terminating every VM of this node: {why}");
        }
        agent.set_fencing(true);
        self.placements.set(Vec::new());
    }

    /// Before the agent adopts the VMMs left running: learns what is still
    /// placed here, with a first heartbeat. Unknown or down: nothing is
    /// (fencing); unreachable past the lease: the same. Returns whether the
    /// node must register, and the placements' revision.
    pub(crate) async fn start(&mut self) -> Result<(bool, u64), NodeError> {
        let t0 = Instant::now();
        loop {
            // A member that leads cannot heartbeat to itself yet (its API
            // serves once its agent runs): it reads its own state after a
            // linearizable read. Its monitor started every node's clock when
            // it became leader, so the read need not restart its own. So does
            // a member whose heartbeats failed for a lease: the leader, just
            // started itself, may not serve its API yet (all members
            // restarting at once).
            let read_own = match &self.owner {
                Owner::Member { store, id } => {
                    let st = store.status();
                    (st.state == "leader" && st.leader == Some(*id))
                        || self.lease.is_some_and(|l| t0.elapsed() > l)
                }
                Owner::Agent { .. } => false,
            };
            if let (Owner::Member { store, .. }, true) = (&self.owner, read_own) {
                match store.linearize().await {
                    Ok(()) => {
                        let me = self.cfg.node_id.clone();
                        let (state, vms) = store.read(|s| {
                            let vms: Vec<VmRecord> =
                                s.vms.values().filter(|v| v.node == me).cloned().collect();
                            (s.nodes.get(&me).map(|n| n.state), vms)
                        });
                        let down = matches!(state, None | Some(NodeState::Down));
                        if !down {
                            // No lease yet: that comes with the first
                            // acknowledged heartbeat.
                            self.placements.set(vms);
                        }
                        return Ok((down, 0));
                    }
                    Err(e) => {
                        if self.lease.is_some_and(|l| t0.elapsed() > l * 2) {
                            tracing::warn!(error = %e, "no leader confirms this member's state: starting with no VM (fenced)");
                            return Ok((true, 0));
                        }
                        tracing::info!(error = %e, "waiting for the control plane");
                        tokio::time::sleep(self.heartbeat).await;
                        continue;
                    }
                }
            }
            let sent = Instant::now();
            match self.beat(0, None).await {
                Beat::Ok { state, placements } => {
                    let down = state == "down";
                    let mut revision = 0;
                    if let Some((rev, vms)) = placements.filter(|_| !down) {
                        self.placements.set(vms);
                        revision = rev;
                    }
                    if !down {
                        // The lease runs: re-adopted VMMs are renewed at once.
                        self.placements.acknowledged(sent);
                    }
                    return Ok((down, revision));
                }
                Beat::Unknown => return Ok((true, 0)),
                Beat::Refused(e) => {
                    return Err(NodeError::Usage(format!("heartbeat refused: {e}")));
                }
                Beat::Failed(e) => {
                    if self.lease.is_some_and(|l| t0.elapsed() > l) {
                        tracing::warn!(error = %e, "the control plane is unreachable: starting with no VM (fenced)");
                        return Ok((true, 0));
                    }
                    tracing::info!(error = %e, "waiting for the control plane");
                    tokio::time::sleep(self.heartbeat).await;
                }
            }
        }
    }

    /// Registers the node, trying again every heartbeat interval until it
    /// is registered or refused for good.
    pub(crate) async fn register_first(&mut self) -> Result<(), NodeError> {
        loop {
            match self.register().await {
                Ok(()) => return Ok(()),
                Err(Some(e)) => return Err(NodeError::Usage(e)),
                Err(None) => tokio::time::sleep(self.heartbeat).await,
            }
        }
    }

    /// Heartbeats until `stop` resolves, registering first unless
    /// `registered`: the loop of `cell0d node` and of a member's own agent.
    /// Returns an error when the node is refused for good; its VMs are then
    /// fenced.
    pub(crate) async fn run(
        mut self,
        agent: Arc<Agent>,
        mut registered: bool,
        mut revision: u64,
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<(), NodeError> {
        tokio::pin!(stop);
        tracing::info!(node = %self.cfg.node_id, "node agent heartbeating");
        let mut last_ok = Instant::now();
        let mut fenced_for_lease = false;
        loop {
            if !registered {
                match self.register().await {
                    Ok(()) => {
                        registered = true;
                        revision = 0;
                    }
                    Err(Some(e)) => {
                        self.fence(&agent, &e);
                        return Err(NodeError::Usage(e));
                    }
                    Err(None) => {}
                }
            }
            let sent = Instant::now();
            let mut failed = false;
            match self.beat(revision, Some(&agent)).await {
                Beat::Ok { state, placements } => {
                    last_ok = sent;
                    if state == "down" {
                        // Marked down: its VMs run elsewhere now. Terminate
                        // everything, then register again.
                        self.fence(&agent, "the control plane marked this node down");
                        registered = false;
                        revision = 0;
                    } else if let Some((rev, vms)) = placements {
                        agent.set_fencing(false);
                        fenced_for_lease = false;
                        self.placements.set(vms);
                        revision = rev;
                    }
                    // Fencing rule 5: renew the VMMs still placed here.
                    agent.lease_acknowledged(sent);
                }
                Beat::Refused(e) => {
                    self.fence(&agent, &e);
                    return Err(NodeError::Usage(format!("heartbeat refused: {e}")));
                }
                Beat::Unknown => {
                    self.fence(&agent, "the control plane does not know this node");
                    registered = false;
                    revision = 0;
                }
                Beat::Failed(e) => {
                    failed = true;
                    tracing::debug!(error = %e, "heartbeat failed");
                    if let Some(l) = self.lease {
                        if last_ok.elapsed() > l && !fenced_for_lease {
                            self.fence(
                                &agent,
                                &format!(
                                    "no acknowledged heartbeat for {} ms (lease {} ms): {e}",
                                    last_ok.elapsed().as_millis(),
                                    l.as_millis()
                                ),
                            );
                            fenced_for_lease = true;
                            // Placements come again with the next answer.
                            revision = 0;
                        }
                    }
                }
            }
            // After a failure (a leader change, most often), try again soon:
            // the lease runs.
            let next = if failed {
                self.heartbeat.min(Duration::from_millis(100))
            } else {
                self.heartbeat
            };
            let wait = next.saturating_sub(sent.elapsed());
            tokio::select! {
                () = &mut stop => return Ok(()),
                () = tokio::time::sleep(wait) => {}
            }
        }
    }
}

/// Registers a member's own node through the member's store: watched
/// (`cell0.io/agent=member`, with the member id), ready, capacity and zone
/// as configured. A drain is kept (the state machine's rule).
async fn register_member(cfg: &NodeConfig, store: &Store, id: u64) -> Result<(), Option<String>> {
    let st = member_status(store, id, &cfg.node_id, MEMBERSHIP_WAIT).await?;
    let other = store.read(|s| s.nodes.get(&cfg.node_id).and_then(member_of));
    if let Some(o) = other.filter(|o| *o != id && st.members.contains_key(o)) {
        return Err(Some(format!(
            "node {:?} is member {o}'s own node; give this member another --node-name",
            cfg.node_id
        )));
    }
    let mut labels = BTreeMap::new();
    labels.insert(REMOTE_LABEL.to_string(), MEMBER_VALUE.to_string());
    labels.insert(MEMBER_ID_LABEL.to_string(), id.to_string());
    let me = NodeRecord {
        id: cfg.node_id.clone(),
        address: cfg.address.clone(),
        zone: cfg.zone.clone(),
        region: cfg.region.clone(),
        capacity: cfg.capacity,
        cpu_overcommit: cfg.cpu_overcommit,
        memory_overcommit: cfg.memory_overcommit,
        state: NodeState::Ready,
        labels,
        drained: false,
    };
    // Registered as it is (a restart): no Raft entry.
    if store.read(|s| s.nodes.get(&me.id) == Some(&me)) {
        return Ok(());
    }
    match store.write(Command::PutNode { node: me }).await {
        Ok(_) => {
            tracing::info!(node = %cfg.node_id, member = id, "member's own node registered (watched)");
            Ok(())
        }
        Err(e) => {
            tracing::info!(error = %e, "cannot register the member's node yet");
            Err(None)
        }
    }
}

/// How long a member whose store does not list it waits to see itself added
/// before its own node agent gives up.
const MEMBERSHIP_WAIT: Duration = Duration::from_secs(10);

/// The store's status once it lists member `id`. A member that is joining
/// can know the leader before it has applied its own addition (it installed
/// a snapshot taken before it), so it catches up (a linearizable read) and
/// looks again, for up to `wait` ([`MEMBERSHIP_WAIT`]). `Err(None)`: no leader
/// answered, try again later; `Err(Some(_))`: not a member (its node `node`
/// takes no VMs).
async fn member_status(
    store: &Store,
    id: u64,
    node: &str,
    wait: Duration,
) -> Result<crate::store::RaftStatus, Option<String>> {
    let deadline = Instant::now() + wait;
    let mut told = false;
    loop {
        let st = store.status();
        if st.members.contains_key(&id) {
            return Ok(st);
        }
        if Instant::now() >= deadline {
            return Err(Some(format!(
                "member {id} is not in the cluster (removed with cell0ctl cluster remove?): \
                 its node {node} takes no VMs"
            )));
        }
        if !std::mem::replace(&mut told, true) {
            tracing::info!(
                member = id,
                "this member is not in the membership it has applied yet; catching up"
            );
        }
        if let Err(e) = store.linearize().await {
            tracing::info!(error = %e, "cannot check this member's membership yet");
            return Err(None);
        }
        if !store.status().members.contains_key(&id) {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Sets the client TLS configuration the agent dials the members with (a
/// member's own agent: its member certificate).
pub(crate) fn set_tls(t: tonic::transport::ClientTlsConfig) {
    let _ = TLS.set(t);
}

/// Runs `cell0d node` until SIGINT or SIGTERM (VMs keep running then, and are
/// re-adopted at the next start if still placed here).
pub async fn node_main(a: NodeArgs) -> Result<(), NodeError> {
    let labels = parse_labels(&a.labels)?;
    let join: Vec<String> = a
        .join
        .iter()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    if join.is_empty() {
        return Err(NodeError::Usage(
            "--join: name at least one member (HOST:PORT)".into(),
        ));
    }
    let cfg = a.host.clone().config(&a.data_dir);
    let node_id = &cfg.node_id;
    if !crate::spec::is_dns_label(node_id) {
        return Err(NodeError::Usage(format!(
            "--node-name {node_id:?} is not a name (1-63 of a-z 0-9 -)"
        )));
    }
    check_timing(a.heartbeat_ms, a.lease_ms)?;
    for (what, r) in [
        ("--cpu-overcommit", a.host.cpu_overcommit),
        ("--memory-overcommit", a.host.memory_overcommit),
    ] {
        if !r.is_finite() || r < 1.0 {
            return Err(NodeError::Usage(format!("{what} must be 1.0 or more")));
        }
    }
    std::fs::create_dir_all(&a.data_dir).map_err(|source| NodeError::Io {
        what: "create",
        path: a.data_dir.clone(),
        source,
    })?;
    let _lock =
        crate::serve::lock_data_dir(&a.data_dir).map_err(|e| NodeError::Usage(format!("{e}")))?;
    crate::tls::node_transport(a.tls_dir.as_deref(), a.insecure_plaintext)
        .map_err(|e| NodeError::Usage(e.to_string()))?;
    if let Some(dir) = &a.tls_dir {
        let t = crate::tls::TlsDir::load(dir)
            .map_err(|e| NodeError::Usage(format!("--tls-dir: {e}")))?;
        set_tls(t.client_config());
    }
    let attester = match a.attest {
        true => {
            let opts = cell0_attest::VtpmOptions::with_default_ca(a.data_dir.join("node-tpm"));
            let (exe, vmm) = (
                std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe")),
                cfg.vmm_bin.clone(),
            );
            let att = tokio::task::spawn_blocking(move || {
                super::admission::NodeAttester::start(&opts, &exe, &vmm)
            })
            .await
            .map_err(|e| NodeError::Usage(format!("--attest: {e}")))?
            .map_err(|e| NodeError::Usage(format!("--attest: {e}")))?;
            Some(Arc::new(att))
        }
        false => None,
    };
    let mut r = Remote::new(
        cfg,
        Owner::Agent { labels, attester },
        join,
        Duration::from_millis(a.heartbeat_ms),
        (a.lease_ms > 0).then(|| Duration::from_millis(a.lease_ms)),
    );
    let (must_register, revision) = r.start().await?;
    let metrics = Arc::new(Metrics::new());
    // The SYPAS router of this host's VMs (a Linux agent's bootstrap, token,
    // events and Exec), as on a member's node.
    let (router, _) = crate::router::Router::for_host(&a.data_dir)
        .await
        .map_err(|e| NodeError::Usage(format!("cannot start the SYPAS router: {e}")))?;
    // Which VMs run a guest agent that may bootstrap: those placed here.
    router.set_guest_agent_source(r.placements());
    let agent = Agent::start_remote(r.cfg.clone(), r.placements(), metrics, Some(router)).await?;
    // The node's API, registered as the node's address for members to proxy to.
    match a.listen {
        Some(l) => {
            let bound =
                super::local_api::serve(l, a.tls_dir.as_deref(), agent.clone(), r.revocations())
                    .await?;
            r.cfg.address = a.advertise.clone().unwrap_or_else(|| bound.to_string());
        }
        None => tracing::info!(
            "no --listen: this node serves no API, so members cannot proxy Logs, Exec or Attest of its VMs"
        ),
    }
    let agent_task = tokio::spawn(agent.clone().run());
    tracing::info!(node = %r.cfg.node_id, "cell0d node running");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|source| NodeError::Io {
            what: "handle SIGTERM for",
            path: a.data_dir.clone(),
            source,
        })?;
    let stop = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    // Known and not down: registering again updates capacity and labels.
    let registered = !must_register
        && match r.register().await {
            Ok(()) => true,
            Err(Some(e)) => {
                r.fence(&agent, &e);
                agent_task.abort();
                return Err(NodeError::Usage(e));
            }
            Err(None) => false,
        };
    let res = r.run(agent, registered, revision, stop).await;
    if res.is_ok() {
        tracing::info!("shutting down; VMs keep running and are re-adopted at the next start");
    }
    agent_task.abort();
    res
}

/// Checks `--heartbeat-ms` and `--lease-ms` (of `cell0d node` and of
/// `cell0d serve`'s own agent).
pub fn check_timing(heartbeat_ms: u64, lease_ms: u64) -> Result<(), NodeError> {
    if heartbeat_ms == 0 {
        return Err(NodeError::Usage("--heartbeat-ms must be 1 or more".into()));
    }
    if lease_ms != 0 && lease_ms <= heartbeat_ms {
        return Err(NodeError::Usage(format!(
            "--lease-ms {lease_ms} must be longer than --heartbeat-ms {heartbeat_ms} (or 0: no self-fencing)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn labels_parse_and_bad_ones_are_refused() {
        let l = parse_labels(&["disk=nvme".into(), " gpu = a100 ".into()]).unwrap();
        assert_eq!(l["gpu"], "a100");
        for bad in [&["x"][..], &["=v"], &["a=1", "a=2"], &["cell0.io/agent=x"]] {
            let items: Vec<String> = bad.iter().map(|s| s.to_string()).collect();
            assert!(parse_labels(&items).is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn a_member_missing_from_the_membership_is_refused_after_the_wait() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = crate::store::StoreConfig {
            node_id: 1,
            addr: "127.0.0.1:1".into(),
            snapshot_every: 100,
            bootstrap: crate::store::Bootstrap::Init(BTreeMap::new()),
            tls: None,
        };
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let store = Store::open(dir.path(), cfg, metrics).await.unwrap();
        store
            .wait_leader(Some(Duration::from_secs(30)))
            .await
            .unwrap();
        let wait = Duration::from_millis(300);
        let st = member_status(&store, 1, "m1", wait).await.unwrap();
        assert!(st.members.contains_key(&1));
        // Member 2 never appears: after catching up and looking again for
        // the whole wait, it is refused for good, naming its node.
        let t0 = Instant::now();
        let e = member_status(&store, 2, "m2", wait).await.unwrap_err();
        let e = e.expect("refused for good, not 'try again'");
        assert!(t0.elapsed() >= wait, "refused before the wait ended");
        assert!(
            e.contains("member 2 is not in the cluster") && e.contains("node m2"),
            "{e}"
        );
        store.shutdown().await;
    }
}
