// SPDX-License-Identifier: Apache-2.0
//! The Raft state machine: [`ClusterState`] in memory, snapshots on disk.
//!
//! The state is rebuilt on start from the latest snapshot
//! (`<data>/raft/snapshot.json`, written to a temporary file, fsynced, renamed
//! and the directory fsynced) plus the committed log entries after it, which
//! openraft re-applies. Applying publishes [`StoreEvent`]s and the applied
//! index for the node agent and Watch.

// openraft's storage traits fix the error type (`StorageError`, ~224 bytes).
#![allow(clippy::result_large_err)]

use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    EntryPayload, LogId, RaftSnapshotBuilder, SnapshotMeta, StorageError, StorageIOError,
    StoredMembership,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};

use super::state::{Applied, ClusterState, Command, VmRecord};
use super::{Node, NodeId, TypeConfig};

/// A change of the replicated state, as applied.
#[derive(Debug, Clone)]
pub struct StoreEvent {
    /// Log index.
    pub index: u64,
    /// The VM id the command names (empty for node commands).
    pub vm_id: String,
    /// "created", "desired", "deleted", "node".
    pub kind: &'static str,
    /// The VM after the change (before, for deletes).
    pub vm: Option<VmRecord>,
}

/// What the state machine shares with the API and the node agent.
pub struct Shared {
    /// The replicated state.
    pub state: RwLock<ClusterState>,
    /// The last applied log index.
    pub applied: watch::Sender<u64>,
    /// Applied changes.
    pub events: broadcast::Sender<StoreEvent>,
}

impl Shared {
    fn new(state: ClusterState) -> Arc<Self> {
        Arc::new(Self {
            state: RwLock::new(state),
            applied: watch::channel(0).0,
            events: broadcast::channel(4096).0,
        })
    }

    /// A copy of the state.
    pub fn snapshot(&self) -> ClusterState {
        match self.state.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Runs `f` on the state under the read lock.
    pub fn read<T>(&self, f: impl FnOnce(&ClusterState) -> T) -> T {
        match self.state.read() {
            Ok(g) => f(&g),
            Err(p) => f(&p.into_inner()),
        }
    }
}

#[derive(Serialize, Deserialize)]
struct SnapshotFile {
    meta: SnapshotMeta<NodeId, Node>,
    state: ClusterState,
}

/// The state machine.
pub struct StateMachine {
    shared: Arc<Shared>,
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, Node>,
    dir: PathBuf,
    snapshot_seq: u64,
    disk: OnDisk,
}

/// The last log id of the snapshot file on disk. Writers of the file hold
/// its lock, and a snapshot never replaces a newer one: openraft builds
/// snapshots in a task of its own, so a build begun at index 1000 can end
/// after the leader's snapshot of index 1500 was installed (and the log purged
/// up to it); writing the older one then would lose entries 1001–1500 at the
/// next start.
#[derive(Clone, Default)]
struct OnDisk(Arc<std::sync::Mutex<Option<LogId<NodeId>>>>);

impl OnDisk {
    /// Writes `file` unless the snapshot on disk is as new or newer.
    fn write(&self, dir: &Path, file: &SnapshotFile) -> Result<(), StorageError<NodeId>> {
        let mut cur = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if cur.is_some() && file.meta.last_log_id <= *cur {
            tracing::debug!(
                snapshot = ?file.meta.last_log_id,
                on_disk = ?*cur,
                "a newer snapshot is on disk already; not replacing it"
            );
            return Ok(());
        }
        let bytes = serde_json::to_vec(file).map_err(snap_err)?;
        write_atomic(&snapshot_path(dir), &bytes).map_err(snap_err)?;
        *cur = file.meta.last_log_id;
        Ok(())
    }
}

fn sm_err<E: std::error::Error + 'static>(e: E) -> StorageError<NodeId> {
    StorageIOError::write_state_machine(&e).into()
}

fn snap_err<E: std::error::Error + 'static>(e: E) -> StorageError<NodeId> {
    StorageIOError::write_snapshot(None, &e).into()
}

fn snapshot_path(dir: &Path) -> PathBuf {
    dir.join("snapshot.json")
}

/// Writes `bytes` to `path` crash-safely: temporary file, fsync, rename, fsync dir.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(d) = path.parent() {
        std::fs::File::open(d)?.sync_all()?;
    }
    Ok(())
}

impl StateMachine {
    /// Opens the state machine in `dir`, loading its snapshot if there is one.
    pub fn open(dir: &Path) -> Result<Self, StorageError<NodeId>> {
        let path = snapshot_path(dir);
        let current: Option<SnapshotFile> = match std::fs::read(&path) {
            Ok(b) => Some(
                serde_json::from_slice(&b)
                    .map_err(|e| StorageError::from(StorageIOError::read_snapshot(None, &e)))?,
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(StorageIOError::read_snapshot(None, &e).into()),
        };
        let (state, last_applied, membership) = match &current {
            Some(s) => (
                s.state.clone(),
                s.meta.last_log_id,
                s.meta.last_membership.clone(),
            ),
            None => (ClusterState::default(), None, StoredMembership::default()),
        };
        let shared = Shared::new(state);
        shared
            .applied
            .send_replace(last_applied.map_or(0, |l| l.index));
        Ok(Self {
            shared,
            last_applied,
            membership,
            dir: dir.to_path_buf(),
            snapshot_seq: 0,
            disk: OnDisk(Arc::new(std::sync::Mutex::new(last_applied))),
        })
    }

    /// The shared handle.
    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    fn install(&mut self, file: SnapshotFile) -> Result<(), StorageError<NodeId>> {
        self.disk.write(&self.dir, &file)
    }
}

/// Builds a snapshot of the state as it was when the builder was made.
pub struct Builder {
    file: Option<SnapshotFile>,
    dir: PathBuf,
    shared: Arc<Shared>,
    seq: u64,
    disk: OnDisk,
}

impl RaftSnapshotBuilder<TypeConfig> for Builder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let Some(mut file) = self.file.take() else {
            return Err(snap_err(std::io::Error::other("snapshot built twice")));
        };
        let last = file.meta.last_log_id;
        file.meta.snapshot_id = format!(
            "{}-{}-{}",
            last.map_or(0, |l| l.leader_id.term),
            last.map_or(0, |l| l.index),
            self.seq
        );
        self.disk.write(&self.dir, &file)?;
        let bytes = serde_json::to_vec(&file).map_err(snap_err)?;
        let _ = &self.shared;
        Ok(Snapshot {
            meta: file.meta,
            snapshot: Box::new(Cursor::new(bytes)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Builder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, Node>), StorageError<NodeId>> {
        Ok((self.last_applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Applied>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = openraft::Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut out = Vec::new();
        let mut events = Vec::new();
        {
            let mut st = self
                .shared
                .state
                .write()
                .map_err(|_| sm_err(std::io::Error::other("state lock poisoned")))?;
            for e in entries {
                self.last_applied = Some(e.log_id);
                match e.payload {
                    EntryPayload::Blank => out.push(Applied::default()),
                    EntryPayload::Membership(m) => {
                        self.membership = StoredMembership::new(Some(e.log_id), m);
                        out.push(Applied::default());
                    }
                    EntryPayload::Normal(cmd) => {
                        let before = match &cmd {
                            Command::DeleteVm { id } => st.vms.get(id).cloned(),
                            _ => None,
                        };
                        let r = st.apply(e.log_id.index, &cmd);
                        if r.rejected.is_none() {
                            let (vm_id, kind) = match &cmd {
                                Command::CreateVm { spec, .. } => (spec.name.clone(), "created"),
                                Command::SetDesired { id, .. } => (id.clone(), "desired"),
                                Command::DeleteVm { id } => (id.clone(), "deleted"),
                                Command::RevokeCert { .. } => (String::new(), "revoke-cert"),
                                Command::PutNode { .. }
                                | Command::DrainNode { .. }
                                | Command::UncordonNode { .. }
                                | Command::SetNodeState { .. } => (String::new(), "node"),
                                Command::ReleaseHandoff { id, .. } => (id.clone(), "handoff"),
                            };
                            events.push(StoreEvent {
                                index: e.log_id.index,
                                vm_id,
                                kind,
                                vm: r.vm.clone().or(before),
                            });
                        }
                        out.push(r);
                    }
                }
            }
        }
        for ev in events {
            let _ = self.shared.events.send(ev);
        }
        self.shared
            .applied
            .send_replace(self.last_applied.map_or(0, |l| l.index));
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.snapshot_seq += 1;
        Builder {
            file: Some(SnapshotFile {
                meta: SnapshotMeta {
                    last_log_id: self.last_applied,
                    last_membership: self.membership.clone(),
                    snapshot_id: String::new(),
                },
                state: self.shared.snapshot(),
            }),
            dir: self.dir.clone(),
            shared: self.shared.clone(),
            seq: self.snapshot_seq,
            disk: self.disk.clone(),
        }
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Node>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let file: SnapshotFile = serde_json::from_slice(snapshot.get_ref()).map_err(snap_err)?;
        let file = SnapshotFile {
            meta: meta.clone(),
            state: file.state,
        };
        {
            let mut st = self
                .shared
                .state
                .write()
                .map_err(|_| sm_err(std::io::Error::other("state lock poisoned")))?;
            *st = file.state.clone();
        }
        self.last_applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        self.install(file)?;
        self.shared
            .applied
            .send_replace(self.last_applied.map_or(0, |l| l.index));
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        // Builders and installs write the file, never over a newer one, so the
        // file is always the latest snapshot.
        let bytes = match std::fs::read(snapshot_path(&self.dir)) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StorageIOError::read_snapshot(None, &e).into()),
        };
        let f: SnapshotFile = serde_json::from_slice(&bytes).map_err(snap_err)?;
        Ok(Some(Snapshot {
            meta: f.meta,
            snapshot: Box::new(Cursor::new(bytes)),
        }))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use openraft::CommittedLeaderId;

    fn meta(index: u64) -> SnapshotMeta<NodeId, Node> {
        SnapshotMeta {
            last_log_id: Some(LogId::new(CommittedLeaderId::new(2, 1), index)),
            last_membership: StoredMembership::default(),
            snapshot_id: format!("s{index}"),
        }
    }

    fn payload(index: u64) -> Box<Cursor<Vec<u8>>> {
        let f = SnapshotFile {
            meta: meta(index),
            state: ClusterState::default(),
        };
        Box::new(Cursor::new(serde_json::to_vec(&f).unwrap()))
    }

    #[tokio::test]
    async fn a_slow_build_never_replaces_a_newer_installed_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = StateMachine::open(dir.path()).unwrap();
        sm.install_snapshot(&meta(10), payload(10)).await.unwrap();
        // A build begins at index 10 ...
        let mut builder = sm.get_snapshot_builder().await;
        // ... the leader's snapshot of index 20 is installed meanwhile ...
        sm.install_snapshot(&meta(20), payload(20)).await.unwrap();
        // ... and the build ends: it must not put index 10 back on disk.
        let built = builder.build_snapshot().await.unwrap();
        assert_eq!(built.meta.last_log_id.unwrap().index, 10);
        let current = sm.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(current.meta.last_log_id.unwrap().index, 20);
        let (applied, _) = StateMachine::open(dir.path())
            .unwrap()
            .applied_state()
            .await
            .unwrap();
        assert_eq!(
            applied.unwrap().index,
            20,
            "a restart lost the installed snapshot"
        );
    }
}
