// SPDX-License-Identifier: Apache-2.0
//! The Raft log and vote, in a redb database (`<data>/raft/log.redb`).
//!
//! Every write transaction commits with redb's default durability (fsync
//! before `commit` returns), and openraft is told an append is flushed only
//! after that, so a write is acknowledged to a client only once its entry is on
//! disk. Blocking redb calls run on tokio's blocking pool.

// openraft's storage traits fix the error type (`StorageError`, ~224 bytes).
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{LogId, RaftLogReader, StorageError, StorageIOError, Vote};
use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};

use super::{NodeId, TypeConfig};

type Entry = openraft::Entry<TypeConfig>;

const LOG: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("meta");
const KEY_VOTE: &str = "vote";
const KEY_COMMITTED: &str = "committed";
const KEY_PURGED: &str = "last_purged";

/// Errors opening the log.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// redb could not open or create the database.
    #[error("cannot open the Raft log {path}")]
    Open {
        /// Path.
        path: String,
        /// Cause.
        #[source]
        source: redb::DatabaseError,
    },
    /// A redb transaction failed.
    #[error("Raft log transaction failed")]
    Txn(#[from] redb::Error),
}

/// The log store; clones share the database.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
}

fn io_err<E: std::error::Error + 'static>(e: E) -> StorageError<NodeId> {
    StorageIOError::write_logs(&e).into()
}

fn read_err<E: std::error::Error + 'static>(e: E) -> StorageError<NodeId> {
    StorageIOError::read_logs(&e).into()
}

impl LogStore {
    /// Opens (creating) the log at `path`.
    pub fn open(path: &Path) -> Result<Self, LogError> {
        let db = Database::create(path).map_err(|source| LogError::Open {
            path: path.display().to_string(),
            source,
        })?;
        let w = db.begin_write().map_err(redb::Error::from)?;
        {
            w.open_table(LOG).map_err(redb::Error::from)?;
            w.open_table(META).map_err(redb::Error::from)?;
        }
        w.commit().map_err(redb::Error::from)?;
        Ok(Self { db: Arc::new(db) })
    }

    fn get_meta<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<T>, StorageError<NodeId>> {
        let r = self.db.begin_read().map_err(read_err)?;
        let t = r.open_table(META).map_err(read_err)?;
        match t.get(key).map_err(read_err)? {
            Some(v) => Ok(Some(serde_json::from_slice(v.value()).map_err(read_err)?)),
            None => Ok(None),
        }
    }

    /// Writes a meta key; `durable` false skips the fsync (redb makes it
    /// durable with the next durable commit).
    async fn put_meta<T: serde::Serialize>(
        &self,
        key: &'static str,
        v: &T,
        durable: bool,
    ) -> Result<(), StorageError<NodeId>> {
        let bytes = serde_json::to_vec(v).map_err(io_err)?;
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || -> Result<(), StorageError<NodeId>> {
            let mut w = db.begin_write().map_err(io_err)?;
            if !durable {
                w.set_durability(redb::Durability::None);
            }
            {
                let mut t = w.open_table(META).map_err(io_err)?;
                t.insert(key, bytes.as_slice()).map_err(io_err)?;
            }
            w.commit().map_err(io_err)
        })
        .await
        .map_err(io_err)?
    }

    fn last_entry_id(&self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        let r = self.db.begin_read().map_err(read_err)?;
        let t = r.open_table(LOG).map_err(read_err)?;
        match t.last().map_err(read_err)? {
            Some((_, v)) => {
                let e: Entry = serde_json::from_slice(v.value()).map_err(read_err)?;
                Ok(Some(e.log_id))
            }
            None => Ok(None),
        }
    }

    /// Number of entries held (for status and tests).
    pub fn len(&self) -> Result<u64, StorageError<NodeId>> {
        let r = self.db.begin_read().map_err(read_err)?;
        let t = r.open_table(LOG).map_err(read_err)?;
        t.len().map_err(read_err)
    }

    /// Whether the log holds no entry.
    pub fn is_empty(&self) -> Result<bool, StorageError<NodeId>> {
        Ok(self.len()? == 0)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError<NodeId>> {
        let r = self.db.begin_read().map_err(read_err)?;
        let t = r.open_table(LOG).map_err(read_err)?;
        let mut out = Vec::new();
        for item in t.range(range).map_err(read_err)? {
            let (_, v) = item.map_err(read_err)?;
            out.push(serde_json::from_slice(v.value()).map_err(read_err)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let last_purged: Option<LogId<NodeId>> = self.get_meta(KEY_PURGED)?;
        let last = self.last_entry_id()?.or(last_purged);
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        // A vote must be on disk before it is answered.
        self.put_meta(KEY_VOTE, vote, true).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        self.get_meta(KEY_VOTE)
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError<NodeId>> {
        // The committed id is a hint that saves re-applying after a restart;
        // losing the latest one is safe (the entries are in the log), so it
        // rides on the next durable commit instead of costing an fsync.
        self.put_meta(KEY_COMMITTED, &committed, false).await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        Ok(self
            .get_meta::<Option<LogId<NodeId>>>(KEY_COMMITTED)?
            .flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut rows = Vec::new();
        for e in entries {
            rows.push((e.log_id.index, serde_json::to_vec(&e).map_err(io_err)?));
        }
        let db = self.db.clone();
        let r = tokio::task::spawn_blocking(move || -> Result<(), redb::Error> {
            let w = db.begin_write()?;
            {
                let mut t = w.open_table(LOG)?;
                for (i, bytes) in &rows {
                    t.insert(*i, bytes.as_slice())?;
                }
            }
            // Durability::Immediate (redb's default): fsync before returning.
            w.commit()?;
            Ok(())
        })
        .await
        .map_err(io_err)?;
        match r {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(io_err(e))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || -> Result<(), redb::Error> {
            let w = db.begin_write()?;
            {
                let mut t = w.open_table(LOG)?;
                t.retain_in(log_id.index.., |_, _| false)?;
            }
            w.commit()?;
            Ok(())
        })
        .await
        .map_err(io_err)?
        .map_err(io_err)
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let bytes = serde_json::to_vec(&log_id).map_err(io_err)?;
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || -> Result<(), redb::Error> {
            let w = db.begin_write()?;
            {
                let mut m = w.open_table(META)?;
                m.insert(KEY_PURGED, bytes.as_slice())?;
                let mut t = w.open_table(LOG)?;
                t.retain_in(..=log_id.index, |_, _| false)?;
            }
            w.commit()?;
            Ok(())
        })
        .await
        .map_err(io_err)?
        .map_err(io_err)
    }
}
