// SPDX-License-Identifier: Apache-2.0
//! Replicated state through openraft: a one-member cluster by default
//! (`initialize` with itself), so that growing to several members (issue 7)
//! is a membership change.
//!
//! Files under `<data>/raft/`: `log.redb` (log entries, vote, committed id,
//! purge mark; fsynced before a write is acknowledged) and `snapshot.json`
//! (the state machine at a log index; the log before it is purged).

pub mod log;
pub mod network;
pub mod sm;
pub mod state;

use std::collections::BTreeMap;
use std::io::Cursor;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::{BasicNode, Config, Raft, ServerState, SnapshotPolicy};
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
    /// A write failed in Raft (no leader, shutting down, storage error).
    #[error("the write was not committed: {0}")]
    Write(String),
    /// The state machine refused the command.
    #[error(transparent)]
    Rejected(#[from] Rejection),
}

/// The store: Raft, its log, and the shared state machine.
#[derive(Clone)]
pub struct Store {
    raft: Raft<TypeConfig>,
    shared: Arc<Shared>,
    node_id: NodeId,
    metrics: Arc<Metrics>,
}

/// A summary of Raft's state, for ClusterService.Status.
#[derive(Debug, Clone, Default)]
pub struct RaftStatus {
    /// This member.
    pub node_id: NodeId,
    /// Leader, if known.
    pub leader: Option<NodeId>,
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

impl Store {
    /// Opens (or creates) the store in `<data_dir>/raft` and starts Raft as
    /// member `node_id` at `addr`; a fresh store initializes a one-member cluster.
    pub async fn open(
        data_dir: &Path,
        node_id: NodeId,
        addr: &str,
        snapshot_every: u64,
        metrics: Arc<Metrics>,
    ) -> Result<Self, StoreError> {
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
        let config = Config {
            cluster_name: "cell0".into(),
            heartbeat_interval: 250,
            election_timeout_min: 600,
            election_timeout_max: 1200,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(snapshot_every.max(2)),
            max_in_snapshot_log_to_keep: KEEP_AFTER_SNAPSHOT.min(snapshot_every / 2),
            ..Default::default()
        }
        .validate()
        .map_err(|e| StoreError::Start(e.to_string()))?;
        let raft = Raft::new(node_id, Arc::new(config), network::Network, log, sm)
            .await
            .map_err(|e| StoreError::Start(e.to_string()))?;
        if fresh {
            let mut members = BTreeMap::new();
            members.insert(node_id, BasicNode::new(addr));
            raft.initialize(members)
                .await
                .map_err(|e| StoreError::Start(e.to_string()))?;
        }
        let store = Self {
            raft,
            shared,
            node_id,
            metrics,
        };
        store.wait_leader(Duration::from_secs(30)).await?;
        Ok(store)
    }

    /// Waits until this member knows a leader.
    pub async fn wait_leader(&self, timeout: Duration) -> Result<(), StoreError> {
        let mut m = self.raft.metrics();
        let r = tokio::time::timeout(timeout, async {
            loop {
                if m.borrow().current_leader.is_some() {
                    return;
                }
                if m.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
        r.map_err(|_| StoreError::Start(format!("no leader elected within {timeout:?}")))
    }

    /// Commits `cmd` and returns what applying it gave; a refusal of the state
    /// machine is [`StoreError::Rejected`].
    pub async fn write(&self, cmd: Command) -> Result<(u64, Applied), StoreError> {
        let name = cmd.name();
        let t0 = Instant::now();
        let r = self
            .raft
            .client_write(cmd)
            .await
            .map_err(|e| StoreError::Write(e.to_string()))?;
        self.metrics.raft_commit(name, t0.elapsed());
        match r.data.rejected {
            Some(rej) => Err(StoreError::Rejected(rej)),
            None => Ok((r.log_id.index, r.data)),
        }
    }

    /// The shared state.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Runs `f` on the current state.
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

    /// This member's id.
    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    /// Raft's state now.
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
        RaftStatus {
            node_id: self.node_id,
            leader: m.current_leader,
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
