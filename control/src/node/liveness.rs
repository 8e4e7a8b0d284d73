// SPDX-License-Identifier: Apache-2.0
//! Failure detection on the Raft leader: the heartbeats of node agents on
//! other hosts (`cell0d node`) and of the members' own node agents in a
//! multi-member cluster, and the deadlines that mark a silent node suspect
//! and then down through Raft commands.
//!
//! Only the leader watches. It keeps the time it last heard each node in
//! memory (heartbeats are not replicated); a member that becomes leader
//! starts every node's clock at that moment, so a change of leader never
//! marks a node down by itself. `SetNodeState { down }` re-places the node's
//! restartable VMs with a new placement epoch and marks the others lost, in
//! the same entry (`store/state.rs`). Only nodes with the label
//! [`REMOTE_LABEL`] are watched: `remote` for a `cell0d node` agent
//! (`NodeService.Register`), `member` for a member's own node. The node of a
//! member started alone (the one-member default) has no label and lives and
//! dies with its member. A member's node whose member was removed from the
//! cluster is drained (its VMs handed off); its silence then marks it down.
//!
//! The leader also keeps the last VM status each node reported, for Get and
//! List (runtime state stays on its node and is not replicated), and ends the
//! handoff of a drained VM (`Command::ReleaseHandoff`) once its old node
//! reported, with the placements that no longer name it, that it no longer
//! runs it.

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
/// [`REMOTE_LABEL`]'s value on a member's own node (multi-member cluster).
pub const MEMBER_VALUE: &str = "member";
/// The label of a member's own node that names the member's Raft id.
pub const MEMBER_ID_LABEL: &str = "cell0.io/member";

/// Whether the leader watches `n`'s heartbeats.
pub fn watched(n: &crate::store::state::NodeRecord) -> bool {
    n.labels.contains_key(REMOTE_LABEL)
}

/// The member whose own node `n` is, if it heartbeats as one.
pub fn member_of(n: &crate::store::state::NodeRecord) -> Option<u64> {
    if n.labels.get(REMOTE_LABEL).map(String::as_str) != Some(MEMBER_VALUE) {
        return None;
    }
    n.labels.get(MEMBER_ID_LABEL)?.parse().ok()
}

/// The members' own nodes whose member is no longer in the cluster
/// (`cell0ctl cluster remove`) and that are neither drained nor down yet.
fn retired(
    state: &crate::store::state::ClusterState,
    members: &std::collections::BTreeSet<u64>,
) -> Vec<String> {
    state
        .nodes
        .values()
        .filter(|n| n.state != NodeState::Down && !n.drained)
        .filter(|n| member_of(n).is_some_and(|m| !members.contains(&m)))
        .map(|n| n.id.clone())
        .collect()
}

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
    /// VM id → the placement epoch of a handoff whose old node reported the
    /// VM gone: to release.
    gone: HashMap<String, u64>,
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

    /// Records that the old node of VM `id`, in handoff under placement
    /// `epoch`, reported it no longer runs it (with up-to-date placements).
    pub fn handoff_gone(&self, id: &str, epoch: u64) {
        lock(&self.inner).gone.insert(id.to_string(), epoch);
    }

    /// The handoffs to release among `pending` (VM id, epoch); forgets the
    /// reports of handoffs no longer pending.
    fn releases(&self, pending: &BTreeMap<String, u64>) -> Vec<(String, u64)> {
        let mut g = lock(&self.inner);
        g.gone.retain(|id, e| pending.get(id) == Some(e));
        let mut out: Vec<(String, u64)> = g.gone.iter().map(|(k, v)| (k.clone(), *v)).collect();
        out.sort();
        out
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
            let members: std::collections::BTreeSet<u64> = st.members.keys().copied().collect();
            let (nodes, gone, pending) = store.read(|s| {
                let nodes: BTreeMap<String, NodeState> = s
                    .nodes
                    .values()
                    .filter(|n| watched(n))
                    .map(|n| (n.id.clone(), n.state))
                    .collect();
                let pending: BTreeMap<String, u64> = s
                    .vms
                    .values()
                    .filter(|v| v.handoff.is_some())
                    .map(|v| (v.id.clone(), v.epoch))
                    .collect();
                (nodes, retired(s, &members), pending)
            });
            if term.is_some() {
                self.release(&store, &pending).await;
            }
            if term.is_some() {
                for id in gone {
                    // Drained, not down: the removed member may still run
                    // its VMs until its refused heartbeat fences it, so they
                    // are handed off; its silence marks the node down.
                    tracing::warn!(node = %id, "its member was removed from the cluster: draining the node");
                    if let Err(e) = store.write(Command::DrainNode { id: id.clone() }).await {
                        tracing::warn!(node = %id, error = %e, "cannot drain the removed member's node");
                    }
                }
            }
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

impl Liveness {
    /// Commits the releases of the handoffs whose old node reported the VM
    /// gone.
    async fn release(&self, store: &Store, pending: &BTreeMap<String, u64>) {
        for (id, epoch) in self.releases(pending) {
            match store
                .write(Command::ReleaseHandoff {
                    id: id.clone(),
                    epoch,
                })
                .await
            {
                Ok((index, _)) => {
                    tracing::info!(vm = %id, epoch, index, "handoff released: the old node stopped the VM");
                    lock(&self.inner).gone.remove(&id);
                }
                Err(e) => {
                    tracing::warn!(vm = %id, error = %e, "cannot commit the handoff's release")
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

    fn node(
        id: &str,
        labels: &[(&str, &str)],
        state: NodeState,
    ) -> crate::store::state::NodeRecord {
        crate::store::state::NodeRecord {
            id: id.into(),
            address: String::new(),
            zone: "z".into(),
            region: "r".into(),
            capacity: Default::default(),
            cpu_overcommit: 1.0,
            memory_overcommit: 1.0,
            state,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            drained: false,
        }
    }

    #[test]
    fn members_nodes_are_watched_and_a_removed_members_node_is_retired() {
        let agent = node("n1", &[(REMOTE_LABEL, REMOTE_VALUE)], NodeState::Ready);
        let m1 = node(
            "m1",
            &[(REMOTE_LABEL, MEMBER_VALUE), (MEMBER_ID_LABEL, "1")],
            NodeState::Ready,
        );
        let m2 = node(
            "m2",
            &[(REMOTE_LABEL, MEMBER_VALUE), (MEMBER_ID_LABEL, "2")],
            NodeState::Suspect,
        );
        let m3 = node(
            "m3",
            &[(REMOTE_LABEL, MEMBER_VALUE), (MEMBER_ID_LABEL, "3")],
            NodeState::Down,
        );
        // The one-member default: no label, not watched.
        let solo = node("solo", &[], NodeState::Ready);
        assert!(watched(&agent) && watched(&m1) && !watched(&solo));
        assert_eq!((member_of(&agent), member_of(&m1)), (None, Some(1)));
        let mut s = crate::store::state::ClusterState::default();
        for n in [agent, m1, m2, m3, solo] {
            s.nodes.insert(n.id.clone(), n);
        }
        let members = |ids: &[u64]| ids.iter().copied().collect();
        assert!(retired(&s, &members(&[1, 2, 3])).is_empty());
        // Member 2 removed: its node is drained; member 3's is down already.
        assert_eq!(retired(&s, &members(&[1])), vec!["m2".to_string()]);
        s.nodes.get_mut("m2").unwrap().drained = true;
        assert!(retired(&s, &members(&[1])).is_empty());
    }

    #[test]
    fn a_handoff_is_released_once_its_old_node_reported_it_gone() {
        let l = Liveness::new(Deadlines::default());
        let mut pending = BTreeMap::from([("a".to_string(), 2), ("b".to_string(), 5)]);
        assert!(l.releases(&pending).is_empty());
        l.handoff_gone("a", 2);
        // A report for an older epoch (moved again since) releases nothing.
        l.handoff_gone("b", 4);
        assert_eq!(l.releases(&pending), vec![("a".to_string(), 2)]);
        assert!(
            !lock(&l.inner).gone.contains_key("b"),
            "stale report forgotten"
        );
        // Released (no longer pending): forgotten.
        pending.remove("a");
        assert!(l.releases(&pending).is_empty());
        assert!(lock(&l.inner).gone.is_empty());
    }
}
