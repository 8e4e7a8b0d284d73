// SPDX-License-Identifier: Apache-2.0
//! Replicated state through openraft: a one-member cluster by default
//! (`initialize` with itself); more members join by membership changes (add
//! a learner, then promote it). Raft RPCs between members go over gRPC
//! ([`network`], [`rpc`]). A member that is not the leader forwards writes,
//! membership changes and read-index requests to the leader, so any member
//! accepts any API call; reads are linearizable ([`Store::linearize`]).
//!
//! Files under `<data>/raft/`: `log.redb` (log entries, vote, committed id,
//! purge mark; fsynced before a write is acknowledged) and `snapshot.json`
//! (the state machine at a log index; the log before it is purged).

pub mod log;
pub mod network;
pub mod rpc;
pub mod sm;
pub mod state;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Cursor;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::{BasicNode, ChangeMembers, Config, Raft, ServerState, SnapshotPolicy};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};

pub use sm::{Shared, StoreEvent};
pub use state::{Applied, ClusterState, Command, Desired, Rejection, VmRecord};

use crate::metrics::Metrics;

/// Raft node ids.
pub type NodeId = u64;
/// Raft member addresses.
pub type Node = BasicNode;

openraft::declare_raft_types!(
    /// The control plane's Raft types.
    pub TypeConfig:
        D = Command,
        R = Applied,
        NodeId = NodeId,
        Node = Node,
);

/// Log entries between snapshots (default of `--snapshot-every`).
pub const SNAPSHOT_EVERY: u64 = 1000;
/// Entries kept after a snapshot (for lagging followers).
pub const KEEP_AFTER_SNAPSHOT: u64 = 200;

/// How long a write, read or membership change waits for a leader (an
/// election, or a leader that is being restarted) before it fails.
pub const LEADER_WAIT: Duration = Duration::from_secs(10);
/// How long a write may take to commit once the leader has it.
pub const COMMIT_WAIT: Duration = Duration::from_secs(30);
/// How long a new member may take to catch up before it is promoted.
pub const CATCH_UP_WAIT: Duration = Duration::from_secs(60);

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The data dir could not be created.
    #[error("cannot create the data dir {path}")]
    DataDir {
        /// Path.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The log could not be opened.
    #[error("cannot open the Raft log")]
    Log(#[from] log::LogError),
    /// The state machine could not be loaded.
    #[error("cannot load the state machine: {0}")]
    StateMachine(String),
    /// openraft refused its configuration or failed to start.
    #[error("cannot start Raft: {0}")]
    Start(String),
    /// A write failed in Raft (no leader, shutting down, storage error); it
    /// was not applied.
    #[error("the write was not committed: {0}")]
    Write(String),
    /// No leader could be reached in time; nothing was changed.
    #[error("no leader: {0}")]
    NoLeader(String),
    /// A request was handed to the leader and no answer came back: it may or
    /// may not have been applied.
    #[error("the outcome is unknown: {0}")]
    Unknown(String),
    /// A membership change was refused.
    #[error("{0}")]
    Membership(String),
    /// A membership request names a bad member id or address.
    #[error("{0}")]
    InvalidMember(String),
    /// The state machine refused the command.
    #[error(transparent)]
    Rejected(#[from] Rejection),
}

/// How a fresh data dir starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bootstrap {
    /// Initialize a new cluster of this member plus these (id → address).
    Init(BTreeMap<NodeId, String>),
    /// Wait to be added by the leader of an existing cluster.
    Join,
}

/// Settings of [`Store::open`].
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// This member's id (≥ 1).
    pub node_id: NodeId,
    /// The gRPC address other members reach this one at.
    pub addr: String,
    /// Log entries between snapshots.
    pub snapshot_every: u64,
    /// What a fresh data dir does.
    pub bootstrap: Bootstrap,
    /// Mutual TLS to the other members (`--tls-dir`); `None`: plain TCP.
    pub tls: Option<crate::tls::TlsDir>,
}

/// The store: Raft, its log, and the shared state machine.
#[derive(Clone)]
pub struct Store {
    raft: Raft<TypeConfig>,
    shared: Arc<Shared>,
    node_id: NodeId,
    metrics: Arc<Metrics>,
    net: network::Network,
}

/// A summary of Raft's state, for ClusterService.Status.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RaftStatus {
    /// This member.
    pub node_id: NodeId,
    /// Leader, if known.
    pub leader: Option<NodeId>,
    /// The leader's address, if known.
    pub leader_addr: Option<String>,
    /// Term.
    pub term: u64,
    /// Last log index.
    pub last_log_index: u64,
    /// Last applied index.
    pub last_applied: u64,
    /// Index of the latest snapshot.
    pub snapshot_index: u64,
    /// Last purged index.
    pub purged_index: u64,
    /// "leader", "follower", …
    pub state: String,
    /// Members: id → (address, voter).
    pub members: BTreeMap<NodeId, (String, bool)>,
}

/// Where a request that this member cannot serve itself must go.
enum Route {
    /// To the leader at this address.
    Leader(NodeId, String),
    /// No leader is known yet: wait and try again.
    Wait,
}

fn route<E>(me: NodeId, e: &openraft::error::RaftError<NodeId, E>) -> Option<Route>
where
    E: std::error::Error + openraft::TryAsRef<openraft::error::ForwardToLeader<NodeId, Node>>,
{
    let f = e.forward_to_leader::<Node>()?;
    Some(match (f.leader_id, &f.leader_node) {
        (Some(id), Some(n)) if id != me => Route::Leader(id, n.addr.clone()),
        _ => Route::Wait,
    })
}

impl Store {
    /// Opens (or creates) the store in `<data_dir>/raft` and starts Raft. A
    /// fresh data dir with [`Bootstrap::Init`] initializes a new cluster; one
    /// with [`Bootstrap::Join`] waits to be added. It does not wait for a
    /// leader: the Raft service must be serving first ([`Store::wait_leader`]).
    pub async fn open(
        data_dir: &Path,
        cfg: StoreConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Self, StoreError> {
        if cfg.node_id == 0 {
            return Err(StoreError::InvalidMember(
                "member id 0 is reserved (it means \"no leader\"); use 1 or more".into(),
            ));
        }
        let dir = data_dir.join("raft");
        std::fs::create_dir_all(&dir).map_err(|source| StoreError::DataDir {
            path: dir.display().to_string(),
            source,
        })?;
        let log = log::LogStore::open(&dir.join("log.redb"))?;
        let fresh = log
            .is_empty()
            .map_err(|e| StoreError::StateMachine(e.to_string()))?
            && !dir.join("snapshot.json").exists();
        let sm =
            sm::StateMachine::open(&dir).map_err(|e| StoreError::StateMachine(e.to_string()))?;
        let shared = sm.shared();
        let snapshot_every = cfg.snapshot_every.max(2);
        let config = Config {
            cluster_name: "cell0".into(),
            // A follower campaigns after the leader lease (the largest
            // election timeout) plus a random election timeout without a
            // heartbeat: 1.0-2.0 s after a leader dies, and never for a
            // heartbeat that is merely late by a second on a loaded host.
            heartbeat_interval: 150,
            election_timeout_min: 500,
            election_timeout_max: 1000,
            install_snapshot_timeout: 5000,
            // JSON carries bytes as numbers (≤ 4 bytes each): keep chunks
            // well under a gRPC message.
            snapshot_max_chunk_size: 1 << 20,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(snapshot_every),
            max_in_snapshot_log_to_keep: KEEP_AFTER_SNAPSHOT.min(snapshot_every / 2),
            ..Default::default()
        }
        .validate()
        .map_err(|e| StoreError::Start(e.to_string()))?;
        let net = network::Network::new(cfg.tls.as_ref());
        let raft = Raft::new(cfg.node_id, Arc::new(config), net.clone(), log, sm)
            .await
            .map_err(|e| StoreError::Start(e.to_string()))?;
        if fresh {
            if let Bootstrap::Init(peers) = &cfg.bootstrap {
                let mut members = BTreeMap::new();
                for (id, addr) in peers {
                    members.insert(*id, BasicNode::new(addr));
                }
                members.insert(cfg.node_id, BasicNode::new(&cfg.addr));
                tracing::info!(members = ?members.keys().collect::<Vec<_>>(), "initializing a new cluster");
                raft.initialize(members)
                    .await
                    .map_err(|e| StoreError::Start(e.to_string()))?;
            } else {
                tracing::info!(
                    id = cfg.node_id,
                    addr = %cfg.addr,
                    "fresh member waiting to be added: cell0ctl cluster add {} {}",
                    cfg.node_id,
                    cfg.addr
                );
            }
        }
        Ok(Self {
            raft,
            shared,
            node_id: cfg.node_id,
            metrics,
            net,
        })
    }

    /// Waits until this member knows a leader (`None`: for ever).
    pub async fn wait_leader(&self, timeout: Option<Duration>) -> Result<(), StoreError> {
        let mut m = self.raft.metrics();
        let wait = async {
            loop {
                if m.borrow().current_leader.is_some() {
                    return;
                }
                if m.changed().await.is_err() {
                    return;
                }
            }
        };
        match timeout {
            None => {
                wait.await;
                Ok(())
            }
            Some(t) => tokio::time::timeout(t, wait)
                .await
                .map_err(|_| StoreError::NoLeader(format!("no leader elected within {t:?}"))),
        }
    }

    /// Commits `cmd` and returns what applying it gave; a refusal of the state
    /// machine is [`StoreError::Rejected`]. On a member that is not the leader
    /// the command is handed to the leader.
    pub async fn write(&self, cmd: Command) -> Result<(u64, Applied), StoreError> {
        let name = cmd.name();
        let t0 = Instant::now();
        let deadline = t0 + LEADER_WAIT;
        let (index, applied) = loop {
            let r = tokio::time::timeout(COMMIT_WAIT, self.raft.client_write(cmd.clone()))
                .await
                .map_err(|_| {
                    StoreError::Unknown(format!(
                        "not committed within {COMMIT_WAIT:?} (no quorum of members reachable?)"
                    ))
                })?;
            let e = match r {
                Ok(r) => break (r.log_id.index, r.data),
                Err(e) => e,
            };
            // Only a refusal before the entry was appended (or after it was
            // truncated) comes back as ForwardToLeader: a retry is safe.
            match route(self.node_id, &e) {
                None => return Err(StoreError::Write(e.to_string())),
                Some(Route::Leader(id, addr)) => {
                    match self
                        .forward(id, &addr, &rpc::Forwarded::Write(cmd.clone()), COMMIT_WAIT)
                        .await?
                    {
                        rpc::ForwardReply::Written { index, applied } => break (index, *applied),
                        rpc::ForwardReply::Failed(m) => return Err(StoreError::Write(m)),
                        rpc::ForwardReply::NotLeader => {}
                        other => {
                            return Err(StoreError::Unknown(format!(
                                "the leader answered a write with {other:?}"
                            )));
                        }
                    }
                }
                Some(Route::Wait) => {}
            }
            if Instant::now() >= deadline {
                return Err(StoreError::NoLeader(format!(
                    "no leader accepted the write within {LEADER_WAIT:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        self.metrics.raft_commit(name, t0.elapsed());
        match applied.rejected {
            Some(rej) => Err(StoreError::Rejected(rej)),
            None => Ok((index, applied)),
        }
    }

    /// Sends `req` to the leader `id` at `addr`. A request that certainly did
    /// not reach it is [`rpc::ForwardReply::NotLeader`] (retry); one that may
    /// have is [`StoreError::Unknown`].
    async fn forward(
        &self,
        id: NodeId,
        addr: &str,
        req: &rpc::Forwarded,
        timeout: Duration,
    ) -> Result<rpc::ForwardReply, StoreError> {
        let payload =
            network::encode(req).map_err(|e| StoreError::Write(format!("forwarding: {e}")))?;
        let mut client = self
            .net
            .client(addr)
            .map_err(|e| StoreError::NoLeader(e.to_string()))?;
        let mut request = tonic::Request::new(payload);
        request.set_timeout(timeout);
        let r = tokio::time::timeout(timeout, client.forward(request)).await;
        match r {
            Err(_) => Err(StoreError::Unknown(format!(
                "the leader (member {id} at {addr}) did not answer within {timeout:?}"
            ))),
            Ok(Err(s)) if network::never_sent(&s) => {
                tracing::debug!(leader = id, %addr, "leader unreachable: {}", s.message());
                Ok(rpc::ForwardReply::NotLeader)
            }
            Ok(Err(s)) => Err(StoreError::Unknown(format!(
                "handing the request to the leader (member {id} at {addr}) failed: {}",
                s.message()
            ))),
            Ok(Ok(reply)) => network::decode(reply.get_ref())
                .map_err(|e| StoreError::Unknown(format!("the leader's answer: {e}"))),
        }
    }

    /// Makes the next read of the local state linearizable: the leader
    /// confirms its leadership with a quorum and this member waits until it
    /// has applied everything committed before the read (read index; a
    /// follower asks the leader for the index).
    pub async fn linearize(&self) -> Result<(), StoreError> {
        let deadline = Instant::now() + LEADER_WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let r = tokio::time::timeout(left, self.raft.ensure_linearizable())
                .await
                .map_err(|_| {
                    StoreError::NoLeader(format!(
                        "the leader could not confirm its leadership within {LEADER_WAIT:?}"
                    ))
                })?;
            let e = match r {
                Ok(_) => return Ok(()),
                Err(e) => e,
            };
            match route(self.node_id, &e) {
                None => return Err(StoreError::NoLeader(e.to_string())),
                Some(Route::Leader(id, addr)) => {
                    match self
                        .forward(id, &addr, &rpc::Forwarded::ReadIndex, left)
                        .await
                    {
                        Ok(rpc::ForwardReply::ReadIndex { index }) => {
                            return self.wait_applied(index, left).await;
                        }
                        Ok(rpc::ForwardReply::Failed(m)) => return Err(StoreError::NoLeader(m)),
                        // A read changes nothing: any other outcome is retried.
                        Ok(_) | Err(StoreError::Unknown(_)) => {}
                        Err(e) => return Err(e),
                    }
                }
                Some(Route::Wait) => {}
            }
            if Instant::now() >= deadline {
                return Err(StoreError::NoLeader(format!(
                    "no leader answered a read within {LEADER_WAIT:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn wait_applied(&self, index: u64, timeout: Duration) -> Result<(), StoreError> {
        self.raft
            .wait(Some(timeout.max(Duration::from_millis(100))))
            .applied_index_at_least(Some(index), "read index")
            .await
            .map(|_| ())
            .map_err(|e| StoreError::NoLeader(format!("this member did not catch up: {e}")))
    }

    /// Adds member `id` at `addr`: as a learner, which the leader brings up to
    /// date, then as a voter. Adding a voter again at the same address does
    /// nothing.
    pub async fn add_member(&self, id: NodeId, addr: &str) -> Result<RaftStatus, StoreError> {
        if id == 0 {
            return Err(StoreError::InvalidMember(
                "id: member id 0 is reserved; use 1 or more".into(),
            ));
        }
        let a = addr.trim();
        if a.is_empty() || a.contains(char::is_whitespace) || !a.contains(':') {
            return Err(StoreError::InvalidMember(format!(
                "address: {addr:?} is not HOST:PORT"
            )));
        }
        self.membership(rpc::Forwarded::AddMember {
            id,
            addr: a.to_string(),
        })
        .await
    }

    /// Removes member `id` (voter or learner).
    pub async fn remove_member(&self, id: NodeId) -> Result<RaftStatus, StoreError> {
        self.membership(rpc::Forwarded::RemoveMember { id }).await
    }

    async fn membership(&self, req: rpc::Forwarded) -> Result<RaftStatus, StoreError> {
        let deadline = Instant::now() + LEADER_WAIT;
        loop {
            if self.is_leader() {
                match self.change_membership_here(&req).await {
                    Err(StoreError::NoLeader(_)) if Instant::now() < deadline => {}
                    r => return r,
                }
            } else {
                let leader = self.status();
                if let (Some(id), Some(addr)) = (leader.leader, leader.leader_addr) {
                    match self.forward(id, &addr, &req, CATCH_UP_WAIT * 2).await? {
                        rpc::ForwardReply::Status(s) => return Ok(*s),
                        rpc::ForwardReply::Failed(m) => return Err(StoreError::Membership(m)),
                        rpc::ForwardReply::Invalid(m) => return Err(StoreError::InvalidMember(m)),
                        _ => {}
                    }
                }
            }
            if Instant::now() >= deadline {
                return Err(StoreError::NoLeader(format!(
                    "no leader took the membership change within {LEADER_WAIT:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().current_leader == Some(self.node_id)
    }

    /// Runs a membership change on this member, which should be the leader.
    async fn change_membership_here(&self, req: &rpc::Forwarded) -> Result<RaftStatus, StoreError> {
        let cm = |e: openraft::error::RaftError<
            NodeId,
            openraft::error::ClientWriteError<NodeId, Node>,
        >| match e.forward_to_leader::<Node>() {
            Some(_) => StoreError::NoLeader(e.to_string()),
            None => StoreError::Membership(e.to_string()),
        };
        let st = self.status();
        match req {
            rpc::Forwarded::AddMember { id, addr } => {
                match st.members.get(id) {
                    Some((a, true)) if a == addr => return Ok(st),
                    Some((a, _)) if a != addr => {
                        return Err(StoreError::Membership(format!(
                            "member {id} is already in the cluster at {a}; remove it first to \
                             give it another address"
                        )));
                    }
                    _ => {}
                }
                if let Some((other, _)) =
                    st.members.iter().find(|(i, (a, _))| *i != id && a == addr)
                {
                    return Err(StoreError::Membership(format!(
                        "{addr} is already the address of member {other}"
                    )));
                }
                if !st.members.contains_key(id) {
                    tracing::info!(id, %addr, "adding a learner");
                    tokio::time::timeout(
                        CATCH_UP_WAIT,
                        self.raft.add_learner(*id, BasicNode::new(addr), true),
                    )
                    .await
                    .map_err(|_| {
                        StoreError::Membership(format!(
                            "member {id} at {addr} did not catch up within {CATCH_UP_WAIT:?}; is \
                             it running (cell0d serve --node-id {id} --join)? It stays a learner \
                             until added again or removed"
                        ))
                    })?
                    .map_err(cm)?;
                }
                tracing::info!(id, "promoting the learner to a voter");
                let mut ids = BTreeSet::new();
                ids.insert(*id);
                self.raft
                    .change_membership(ChangeMembers::AddVoterIds(ids), false)
                    .await
                    .map_err(cm)?;
            }
            rpc::Forwarded::RemoveMember { id } => {
                let Some((_, voter)) = st.members.get(id) else {
                    return Err(StoreError::InvalidMember(format!(
                        "id: member {id} is not in the cluster (members: {:?})",
                        st.members.keys().collect::<Vec<_>>()
                    )));
                };
                let voters = st.members.values().filter(|(_, v)| *v).count();
                if *voter && voters == 1 {
                    return Err(StoreError::Membership(format!(
                        "member {id} is the last voter; a cluster needs at least one"
                    )));
                }
                let mut ids = BTreeSet::new();
                ids.insert(*id);
                let change = if *voter {
                    ChangeMembers::RemoveVoters(ids)
                } else {
                    ChangeMembers::RemoveNodes(ids)
                };
                tracing::info!(id, "removing a member");
                self.raft
                    .change_membership(change, false)
                    .await
                    .map_err(cm)?;
            }
            _ => {
                return Err(StoreError::Membership(
                    "not a membership change".to_string(),
                ));
            }
        }
        Ok(self.status())
    }

    /// The shared state.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Runs `f` on the current state of this member (not linearizable by
    /// itself: call [`Store::linearize`] first for that).
    pub fn read<T>(&self, f: impl FnOnce(&ClusterState) -> T) -> T {
        self.shared.read(f)
    }

    /// Applied changes from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<StoreEvent> {
        self.shared.events.subscribe()
    }

    /// The applied index, updated on each apply.
    pub fn applied(&self) -> watch::Receiver<u64> {
        self.shared.applied.subscribe()
    }

    /// A channel to `addr` (another member, or a node agent's API) over this
    /// member's TLS, if it has one; shared with Raft's connections to it.
    pub fn channel(&self, addr: &str) -> Result<tonic::transport::Channel, network::WireError> {
        self.net.channel(addr)
    }

    /// This member's id.
    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    /// Raft's state now, as this member sees it.
    pub fn status(&self) -> RaftStatus {
        let m = self.raft.metrics().borrow().clone();
        let mut members = BTreeMap::new();
        let mem = m.membership_config.membership();
        for (id, node) in mem.nodes() {
            members.insert(*id, (node.addr.clone(), false));
        }
        for id in mem.voter_ids() {
            if let Some(e) = members.get_mut(&id) {
                e.1 = true;
            }
        }
        let leader_addr = m
            .current_leader
            .and_then(|l| members.get(&l).map(|(a, _)| a.clone()));
        RaftStatus {
            node_id: self.node_id,
            leader: m.current_leader,
            leader_addr,
            term: m.current_term,
            last_log_index: m.last_log_index.unwrap_or(0),
            last_applied: m.last_applied.map_or(0, |l| l.index),
            snapshot_index: m.snapshot.map_or(0, |l| l.index),
            purged_index: m.purged.map_or(0, |l| l.index),
            state: match m.state {
                ServerState::Leader => "leader",
                ServerState::Follower => "follower",
                ServerState::Candidate => "candidate",
                ServerState::Learner => "learner",
                ServerState::Shutdown => "shutdown",
            }
            .to_string(),
            members,
        }
    }

    /// Builds a snapshot now (and purges the log before it).
    pub async fn snapshot_now(&self) -> Result<(), StoreError> {
        self.raft
            .trigger()
            .snapshot()
            .await
            .map_err(|e| StoreError::Write(e.to_string()))
    }

    /// Stops Raft.
    pub async fn shutdown(&self) {
        let _ = self.raft.shutdown().await;
    }
}
