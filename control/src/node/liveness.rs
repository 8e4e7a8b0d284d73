// SPDX-License-Identifier: Apache-2.0
//! Failure detection on the Raft leader: the heartbeats of node agents on
//! other hosts (`cell0d node`), and the deadlines that mark a silent node
//! suspect and then down through Raft commands.
//!
//! Only the leader watches. It keeps the time it last heard each node in
//! memory (heartbeats are not replicated); a member that becomes leader
//! starts every node's clock at that moment, so a change of leader never
//! marks a node down by itself. `SetNodeState { down }` re-places the node's
//! restartable VMs with a new placement epoch and marks the others lost, in
//! the same entry (`store/state.rs`). Only nodes registered through
//! `NodeService.Register` (label [`REMOTE_LABEL`]) are watched: a member's
//! embedded node agent lives and dies with its member.
//!
//! The leader also keeps the last VM status each node reported, for Get and
//! List (runtime state stays on its node and is not replicated).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cell0_proto::grpc;

use crate::store::state::NodeState;
use crate::store::{Command, Store};

/// The label every node registered by a `cell0d node` agent carries; the
/// leader watches its heartbeats.
pub const REMOTE_LABEL: &str = "cell0.io/agent";
/// Its value.
pub const REMOTE_VALUE: &str = "remote";

/// Heartbeat deadlines.
#[derive(Debug, Clone, Copy)]
pub struct Deadlines {
    /// Silent this long: suspect (no new VMs).
    pub suspect: Duration,
    /// Silent this long: down (VMs re-placed).
    pub down: Duration,
}

impl Default for Deadlines {
    fn default() -> Self {
        Self {
            suspect: Duration::from_millis(1500),
            down: Duration::from_millis(3000),
        }
    }
}

#[derive(Default)]
struct Inner {
    /// The term this member leads in, and since when.
    leading: Option<(u64, Instant)>,
    /// When each node was last heard (by this member).
    seen: HashMap<String, Instant>,
    /// Node states as last seen by the monitor.
    states: HashMap<String, NodeState>,
    /// VM id → (node, status), as last reported.
    reports: HashMap<String, (String, grpc::VmStatus)>,
}

/// The leader's view of node liveness.
pub struct Liveness {
    deadlines: Deadlines,
    inner: Mutex<Inner>,
}

fn lock(m: &Mutex<Inner>) -> std::sync::MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Liveness {
    /// A tracker with these deadlines.
    pub fn new(deadlines: Deadlines) -> Arc<Self> {
        Arc::new(Self {
            deadlines,
            inner: Mutex::new(Inner::default()),
        })
    }

    /// The deadlines.
    pub fn deadlines(&self) -> Deadlines {
        self.deadlines
    }

    /// Records a heartbeat (or a registration) of `node` with the status of
    /// its VMs.
    pub fn heartbeat(&self, node: &str, vms: HashMap<String, grpc::VmStatus>) {
        let mut g = lock(&self.inner);
        g.seen.insert(node.to_string(), Instant::now());
        g.reports.retain(|_, (n, _)| n != node);
        for (id, st) in vms {
            g.reports.insert(id, (node.to_string(), st));
        }
    }

    /// The status of VM `id` as `node` last reported it.
    pub fn status(&self, id: &str, node: &str) -> Option<grpc::VmStatus> {
        lock(&self.inner)
            .reports
            .get(id)
            .filter(|(n, _)| n == node)
            .map(|(_, s)| s.clone())
    }

    /// When `node` was last heard, in ms ago, if this member heard it.
    pub fn last_heard_ms(&self, node: &str) -> Option<u64> {
        lock(&self.inner)
            .seen
            .get(node)
            .map(|t| t.elapsed().as_millis() as u64)
    }

    /// What the monitor should do now: the state changes to commit.
    fn due(
        &self,
        term: Option<u64>,
        nodes: &BTreeMap<String, NodeState>,
        now: Instant,
    ) -> Vec<(String, NodeState)> {
        let mut g = lock(&self.inner);
        let Some(term) = term else {
            g.leading = None;
            g.states.clear();
            return Vec::new();
        };
        let since = match g.leading {
            Some((t, since)) if t == term => since,
            _ => {
                // Newly leader: every node's clock starts now.
                g.leading = Some((term, now));
                g.seen.clear();
                now
            }
        };
        let mut out = Vec::new();
        for (id, st) in nodes {
            let prev = g.states.insert(id.clone(), *st);
            let back = prev == Some(NodeState::Down) && *st != NodeState::Down;
            let new = prev.is_none() && *st == NodeState::Ready && !g.seen.contains_key(id);
            if back || new {
                // Registered again after being down, or new to this leader
                // (registered through another member): a fresh clock.
                g.seen.insert(id.clone(), now);
            }
            let last = g.seen.get(id).copied().unwrap_or(since).max(since);
            let silent = now.saturating_duration_since(last);
            match st {
                NodeState::Down => {}
                _ if silent >= self.deadlines.down => out.push((id.clone(), NodeState::Down)),
                NodeState::Ready if silent >= self.deadlines.suspect => {
                    out.push((id.clone(), NodeState::Suspect));
                }
                // Back only when heard again (not on a new leader's grace).
                NodeState::Suspect
                    if g.seen.contains_key(id) && silent < self.deadlines.suspect =>
                {
                    out.push((id.clone(), NodeState::Ready));
                }
                _ => {}
            }
        }
        g.states.retain(|k, _| nodes.contains_key(k));
        out
    }

    /// Watches the deadlines while this member leads, forever.
    pub async fn run(self: Arc<Self>, store: Store) {
        let tick = (self.deadlines.suspect / 10)
            .clamp(Duration::from_millis(20), Duration::from_millis(100));
        loop {
            tokio::time::sleep(tick).await;
            let st = store.status();
            let term = (st.state == "leader").then_some(st.term);
            let nodes: BTreeMap<String, NodeState> = store.read(|s| {
                s.nodes
                    .values()
                    .filter(|n| {
                        n.labels.get(REMOTE_LABEL).map(String::as_str) == Some(REMOTE_VALUE)
                    })
                    .map(|n| (n.id.clone(), n.state))
                    .collect()
            });
            for (id, state) in self.due(term, &nodes, Instant::now()) {
                let silent = self.last_heard_ms(&id);
                match store
                    .write(Command::SetNodeState {
                        id: id.clone(),
                        state,
                    })
                    .await
                {
                    Ok((index, applied)) => {
                        if let Some(ev) = applied.evacuation {
                            tracing::warn!(
                                node = %id, index, silent_ms = ?silent,
                                moved = ?ev.moved.iter().map(|m| format!("{}->{}", m.id, m.to)).collect::<Vec<_>>(),
                                stayed = ?ev.stayed.iter().map(|s| format!("{}: {}", s.id, s.reason)).collect::<Vec<_>>(),
                                "node missed its heartbeat deadline: marked down, its VMs re-placed"
                            );
                        } else {
                            tracing::info!(node = %id, index, silent_ms = ?silent, state = state.as_str(), "node state changed");
                        }
                        let mut g = lock(&self.inner);
                        if state == NodeState::Down {
                            // Its reports are stale now.
                            g.reports.retain(|_, (n, _)| *n != id);
                        }
                        g.states.insert(id, state);
                    }
                    Err(e) => {
                        tracing::warn!(node = %id, error = %e, state = state.as_str(), "cannot commit the node's state");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn deadlines_mark_suspect_then_down_and_a_new_leader_gives_grace() {
        let l = Liveness::new(Deadlines::default());
        let t0 = Instant::now();
        let mut nodes = BTreeMap::from([("n1".to_string(), NodeState::Ready)]);
        // Not leader: nothing.
        assert!(l.due(None, &nodes, t0).is_empty());
        // Leader from t0: quiet for 1 s is fine, 1.5 s suspect, 3 s down.
        assert!(l.due(Some(1), &nodes, t0).is_empty());
        assert!(
            l.due(Some(1), &nodes, t0 + Duration::from_secs(1))
                .is_empty()
        );
        assert_eq!(
            l.due(Some(1), &nodes, t0 + Duration::from_millis(1600)),
            vec![("n1".to_string(), NodeState::Suspect)]
        );
        nodes.insert("n1".into(), NodeState::Suspect);
        assert_eq!(
            l.due(Some(1), &nodes, t0 + Duration::from_millis(3100)),
            vec![("n1".to_string(), NodeState::Down)]
        );
        nodes.insert("n1".into(), NodeState::Down);
        assert!(
            l.due(Some(1), &nodes, t0 + Duration::from_secs(9))
                .is_empty()
        );
        // A new term: a fresh clock for every node.
        nodes.insert("n1".into(), NodeState::Ready);
        let t1 = t0 + Duration::from_secs(10);
        assert!(l.due(Some(2), &nodes, t1).is_empty());
        assert!(
            l.due(Some(2), &nodes, t1 + Duration::from_secs(1))
                .is_empty()
        );
        // A node registered through another member, seen by this leader's
        // monitor only now, gets the whole deadline too.
        nodes.insert("n2".into(), NodeState::Ready);
        let t2 = t1 + Duration::from_secs(20);
        assert!(l.due(Some(2), &nodes, t2).iter().all(|(n, _)| n != "n2"));
        assert!(
            l.due(Some(2), &nodes, t2 + Duration::from_secs(1))
                .iter()
                .all(|(n, _)| n != "n2")
        );
    }

    #[test]
    fn a_heartbeat_brings_a_suspect_back_and_reports_are_per_node() {
        let l = Liveness::new(Deadlines::default());
        let t0 = Instant::now();
        let nodes = BTreeMap::from([("n1".to_string(), NodeState::Suspect)]);
        assert!(l.due(Some(1), &nodes, t0).is_empty());
        let st = grpc::VmStatus {
            state: grpc::VmState::Running as i32,
            ..Default::default()
        };
        l.heartbeat("n1", HashMap::from([("a".to_string(), st)]));
        assert_eq!(
            l.due(Some(1), &nodes, Instant::now()),
            vec![("n1".to_string(), NodeState::Ready)]
        );
        assert!(l.status("a", "n1").is_some());
        assert!(l.status("a", "n2").is_none(), "moved: n1's report is stale");
    }
}
