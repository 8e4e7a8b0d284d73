// SPDX-License-Identifier: Apache-2.0
//! The replicated state: VM records (spec, placement, desired state) and
//! nodes. Only placement and intent are replicated; what a VMM is doing right
//! now stays on its node (see `node/`).
//!
//! [`ClusterState::apply`] is deterministic: every member applies the same
//! commands in the same order and reaches the same state, so checks that must
//! not race (names, capacity) happen here, not in the API handler.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::sched;
use crate::spec::VmSpec;

/// Least vsock CID handed out.
pub const FIRST_CID: u32 = 3;

/// What the VM should be doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Desired {
    /// Running (restarted per policy).
    Running,
    /// Stopped on request.
    Stopped,
}

impl Desired {
    /// "running" / "stopped".
    pub fn as_str(self) -> &'static str {
        match self {
            Desired::Running => "running",
            Desired::Stopped => "stopped",
        }
    }
}

/// A VM as the control plane knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    /// Id (= spec name).
    pub id: String,
    /// Spec.
    pub spec: VmSpec,
    /// Node it is placed on.
    pub node: String,
    /// Desired state.
    pub desired: Desired,
    /// Creation time (Unix ms, chosen by the proposer).
    pub created_at_ms: u64,
    /// Log index of the last change.
    pub revision: u64,
    /// Vsock CID, unique in the cluster.
    pub cid: u32,
    /// Placement epoch: 1 when created, +1 each time the VM is re-placed on
    /// another node (drain, node down). A node agent runs a VM only under the
    /// epoch of its current record (fencing, docs/CLUSTER.md).
    #[serde(default)]
    pub epoch: u64,
    /// Why the VM was lost (its node went down and it could not move); it is
    /// then desired stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost: Option<String>,
    /// Set while a drained VM waits for its old node to stop it: the node
    /// agent of [`VmRecord::node`] does not start it until the leader commits
    /// [`Command::ReleaseHandoff`] (docs/CLUSTER.md, "Drain").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handoff: Option<Handoff>,
}

/// A drained VM's move that waits for the old node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handoff {
    /// The node the VM moves from, which may still run it.
    pub from: String,
    /// The placement epoch it ran under there.
    pub epoch: u64,
}

impl VmRecord {
    /// What a VM waiting for its handoff is doing, for Get and List.
    pub fn handoff_message(&self) -> Option<String> {
        self.handoff
            .as_ref()
            .map(|h| format!("waiting for {} to stop it (handoff)", h.from))
    }
}

/// Compute resources.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Resources {
    /// vCPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
}

/// Node state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NodeState {
    /// Takes new VMs.
    Ready,
    /// Takes no new VMs.
    Draining,
    /// Missed its first heartbeat deadline: takes no new VMs, keeps its VMs.
    Suspect,
    /// Missed its heartbeat deadline.
    Down,
}

impl NodeState {
    /// Lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Ready => "ready",
            NodeState::Draining => "draining",
            NodeState::Suspect => "suspect",
            NodeState::Down => "down",
        }
    }
}

/// A node that runs VMs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Id (host name by default).
    pub id: String,
    /// gRPC address of its agent.
    pub address: String,
    /// Zone.
    pub zone: String,
    /// Region.
    pub region: String,
    /// Physical capacity.
    pub capacity: Resources,
    /// Allowed vCPU overcommit (allocated ≤ capacity × ratio).
    pub cpu_overcommit: f64,
    /// Allowed memory overcommit.
    pub memory_overcommit: f64,
    /// State.
    pub state: NodeState,
    /// Labels a VM's `placement.node_selector` matches.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Drained (cordoned) by an operator: takes no new VMs. Kept when the
    /// node registers again.
    #[serde(default)]
    pub drained: bool,
}

/// A state-changing command, the payload of a Raft log entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Command {
    /// Revokes a certificate of the cluster CA (docs/CLUSTER.md, Security).
    RevokeCert {
        /// The revocation.
        revocation: crate::tls::Revocation,
    },
    /// Creates and places a VM (`node` and `cid` are chosen on apply).
    CreateVm {
        /// The spec.
        spec: VmSpec,
        /// Creation time.
        created_at_ms: u64,
    },
    /// Changes the desired state.
    SetDesired {
        /// VM id.
        id: String,
        /// New desired state.
        desired: Desired,
    },
    /// Removes a VM.
    DeleteVm {
        /// VM id.
        id: String,
    },
    /// Adds or replaces a node.
    PutNode {
        /// The node.
        node: NodeRecord,
    },
    /// Marks a node drained and moves its restartable VMs elsewhere.
    DrainNode {
        /// Node id.
        id: String,
    },
    /// Lets a drained node take new VMs again.
    UncordonNode {
        /// Node id.
        id: String,
    },
    /// Sets a node's state; `down` moves its restartable VMs elsewhere.
    SetNodeState {
        /// Node id.
        id: String,
        /// New state.
        state: NodeState,
    },
    /// Ends a drained VM's handoff: its old node no longer runs it (the
    /// leader saw that node report it gone), so its new node may start it.
    /// Applies only while the VM is still under `epoch` with a handoff.
    ReleaseHandoff {
        /// VM id.
        id: String,
        /// The VM's placement epoch the release is for (its new one).
        epoch: u64,
    },
}

impl Command {
    /// A short name for metrics and the audit log.
    pub fn name(&self) -> &'static str {
        match self {
            Command::RevokeCert { .. } => "revoke-cert",
            Command::CreateVm { .. } => "create-vm",
            Command::SetDesired { .. } => "set-desired",
            Command::DeleteVm { .. } => "delete-vm",
            Command::PutNode { .. } => "put-node",
            Command::DrainNode { .. } => "drain-node",
            Command::UncordonNode { .. } => "uncordon-node",
            Command::SetNodeState { .. } => "set-node-state",
            Command::ReleaseHandoff { .. } => "release-handoff",
        }
    }
}

/// Why a command was refused on apply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Rejection {
    /// A VM with that id exists.
    #[error("a VM named {id:?} already exists")]
    AlreadyExists {
        /// Id.
        id: String,
    },
    /// No such VM.
    #[error("no VM named {id:?}")]
    NotFound {
        /// Id.
        id: String,
    },
    /// No node can take the VM.
    #[error("{reason}")]
    NoCapacity {
        /// What the scheduler found.
        reason: String,
    },
    /// No node meets the VM's constraints (zone, labels, affinity, state),
    /// whatever its free room.
    #[error("{reason}")]
    Unschedulable {
        /// What the scheduler found.
        reason: String,
    },
    /// No such node.
    #[error("no node named {id:?}")]
    NodeNotFound {
        /// Id.
        id: String,
    },
}

/// The result of applying a command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Applied {
    /// The VM after the change (none for deletes, node commands and membership entries).
    pub vm: Option<VmRecord>,
    /// The refusal, if any.
    pub rejected: Option<Rejection>,
    /// What a drain or a node going down moved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evacuation: Option<sched::Evacuation>,
}

/// Everything that is replicated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ClusterState {
    /// VMs by id.
    pub vms: BTreeMap<String, VmRecord>,
    /// Nodes by id.
    pub nodes: BTreeMap<String, NodeRecord>,
    /// Next vsock CID to try.
    pub next_cid: u32,
    /// Revoked certificates of the cluster CA, by serial.
    #[serde(default)]
    pub revoked: BTreeMap<String, crate::tls::Revocation>,
}

impl ClusterState {
    /// Resources placed on `node` by VMs that should run.
    pub fn allocated(&self, node: &str) -> (Resources, u32) {
        let mut r = Resources::default();
        let mut n = 0;
        for vm in self.vms.values().filter(|v| v.node == node) {
            n += 1;
            if vm.desired == Desired::Running {
                r.vcpus += vm.spec.vcpus;
                r.memory_mib += vm.spec.memory_mib;
            }
        }
        (r, n)
    }

    fn alloc_cid(&mut self) -> u32 {
        let used: std::collections::BTreeSet<u32> = self.vms.values().map(|v| v.cid).collect();
        let mut c = self.next_cid.max(FIRST_CID);
        while used.contains(&c) {
            c = if c == u32::MAX - 1 { FIRST_CID } else { c + 1 };
        }
        self.next_cid = if c == u32::MAX - 1 { FIRST_CID } else { c + 1 };
        c
    }

    /// Re-placed VMs get a new placement epoch. With `handoff` (a drain of a
    /// node that heartbeats, so the leader hears when it stopped the VM) each
    /// one waits for its old node: [`VmRecord::handoff`]. A VM moved again
    /// before its handoff ended keeps waiting for the node that may still run
    /// it; one moved back there needs none.
    fn moved(&mut self, ev: &sched::Evacuation, handoff: bool) {
        for m in &ev.moved {
            if let Some(vm) = self.vms.get_mut(&m.id) {
                let old = vm.epoch;
                vm.epoch += 1;
                vm.handoff = match vm.handoff.take() {
                    Some(h) if h.from == vm.node => None,
                    Some(h) => Some(h),
                    None if handoff => Some(Handoff {
                        from: m.from.clone(),
                        epoch: old,
                    }),
                    None => None,
                };
            }
        }
    }

    /// Whether the leader hears `node`'s heartbeats (a `cell0d node` agent or
    /// a member's own node in a multi-member cluster), so that a handoff from
    /// it can end.
    pub fn watched(&self, node: &str) -> bool {
        self.nodes
            .get(node)
            .is_some_and(crate::node::liveness::watched)
    }

    /// The VMs with restart policy never that stayed on a node that went down
    /// are lost: desired stopped, with the reason, so that the node does not
    /// start them again if it comes back. Restartable VMs that fit nowhere
    /// else stay placed there (listed in the evacuation).
    fn mark_lost(&mut self, node: &str, ev: &sched::Evacuation, index: u64) {
        for st in &ev.stayed {
            if let Some(vm) = self.vms.get_mut(&st.id) {
                if vm.desired == Desired::Running && !vm.spec.restart.restarts(true) {
                    vm.desired = Desired::Stopped;
                    vm.lost = Some(format!("lost: node {node} went down; {}", st.reason));
                    vm.revision = index;
                }
            }
        }
    }

    /// Applies `cmd` at log index `index`.
    pub fn apply(&mut self, index: u64, cmd: &Command) -> Applied {
        let reject = |r| Applied {
            rejected: Some(r),
            ..Applied::default()
        };
        match cmd {
            Command::RevokeCert { revocation } => {
                let r = revocation.clone();
                self.revoked.entry(r.serial.clone()).or_insert(r);
                Applied::default()
            }
            Command::CreateVm {
                spec,
                created_at_ms,
            } => {
                if self.vms.contains_key(&spec.name) {
                    return reject(Rejection::AlreadyExists {
                        id: spec.name.clone(),
                    });
                }
                let node = match sched::place(self, spec, None) {
                    Ok(n) => n,
                    Err(e) => return reject(e.rejection()),
                };
                let cid = self.alloc_cid();
                let vm = VmRecord {
                    id: spec.name.clone(),
                    spec: spec.clone(),
                    node,
                    desired: Desired::Running,
                    created_at_ms: *created_at_ms,
                    revision: index,
                    cid,
                    epoch: 1,
                    lost: None,
                    handoff: None,
                };
                self.vms.insert(vm.id.clone(), vm.clone());
                Applied {
                    vm: Some(vm),
                    ..Applied::default()
                }
            }
            Command::SetDesired { id, desired } => {
                let Some(vm) = self.vms.get(id).cloned() else {
                    return reject(Rejection::NotFound { id: id.clone() });
                };
                if *desired == Desired::Running && vm.desired == Desired::Stopped {
                    // Starting again takes the resources back: check them.
                    if let Err(e) = sched::fits(self, &vm.node, &vm.spec, Some(id)) {
                        return reject(e.rejection());
                    }
                }
                let Some(vm) = self.vms.get_mut(id) else {
                    return reject(Rejection::NotFound { id: id.clone() });
                };
                vm.desired = *desired;
                vm.revision = index;
                if *desired == Desired::Running {
                    vm.lost = None;
                }
                Applied {
                    vm: Some(vm.clone()),
                    ..Applied::default()
                }
            }
            Command::DeleteVm { id } => match self.vms.remove(id) {
                Some(vm) => Applied {
                    vm: Some(vm),
                    ..Applied::default()
                },
                None => reject(Rejection::NotFound { id: id.clone() }),
            },
            Command::PutNode { node } => {
                let mut node = node.clone();
                // A drain is an operator's decision: registering again keeps it.
                node.drained |= self.nodes.get(&node.id).is_some_and(|n| n.drained);
                self.nodes.insert(node.id.clone(), node);
                Applied::default()
            }
            Command::DrainNode { id } => {
                let Some(n) = self.nodes.get_mut(id) else {
                    return reject(Rejection::NodeNotFound { id: id.clone() });
                };
                n.drained = true;
                let ev = sched::evacuate(self, id, index);
                let handoff = self.watched(id);
                self.moved(&ev, handoff);
                Applied {
                    evacuation: Some(ev),
                    ..Applied::default()
                }
            }
            Command::UncordonNode { id } => {
                let Some(n) = self.nodes.get_mut(id) else {
                    return reject(Rejection::NodeNotFound { id: id.clone() });
                };
                n.drained = false;
                Applied::default()
            }
            Command::SetNodeState { id, state } => {
                let Some(n) = self.nodes.get_mut(id) else {
                    return reject(Rejection::NodeNotFound { id: id.clone() });
                };
                let was = n.state;
                n.state = *state;
                let evacuation = (*state == NodeState::Down && was != NodeState::Down).then(|| {
                    // A down node fenced itself: the handoffs from it are over.
                    for vm in self.vms.values_mut() {
                        if vm.handoff.as_ref().is_some_and(|h| h.from == *id) {
                            vm.handoff = None;
                            vm.revision = index;
                        }
                    }
                    let ev = sched::evacuate(self, id, index);
                    self.moved(&ev, false);
                    self.mark_lost(id, &ev, index);
                    ev
                });
                Applied {
                    evacuation,
                    ..Applied::default()
                }
            }
            Command::ReleaseHandoff { id, epoch } => {
                let Some(vm) = self.vms.get_mut(id) else {
                    return reject(Rejection::NotFound { id: id.clone() });
                };
                // A stale release (moved again meanwhile, or released
                // already) changes nothing.
                if vm.epoch == *epoch && vm.handoff.is_some() {
                    vm.handoff = None;
                    vm.revision = index;
                }
                Applied {
                    vm: Some(vm.clone()),
                    ..Applied::default()
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cell0_proto::grpc;

    pub(crate) fn node(id: &str, vcpus: u32, mem: u64, ratio: f64) -> NodeRecord {
        NodeRecord {
            id: id.into(),
            address: String::new(),
            zone: String::new(),
            region: String::new(),
            capacity: Resources {
                vcpus,
                memory_mib: mem,
            },
            cpu_overcommit: ratio,
            memory_overcommit: 1.0,
            state: NodeState::Ready,
            labels: BTreeMap::new(),
            drained: false,
        }
    }

    fn create(name: &str, vcpus: u32) -> Command {
        let spec = VmSpec::from_proto(
            grpc::VmSpec {
                name: name.into(),
                vcpus,
                ..Default::default()
            },
            name,
        )
        .unwrap();
        Command::CreateVm {
            spec,
            created_at_ms: 1,
        }
    }

    #[test]
    fn create_places_allocates_cids_and_refuses_duplicates_and_overcommit() {
        let mut s = ClusterState::default();
        s.apply(
            1,
            &Command::PutNode {
                node: node("n1", 2, 1024, 2.0),
            },
        );
        let a = s.apply(2, &create("a", 2)).vm.unwrap();
        assert_eq!((a.node.as_str(), a.cid, a.revision), ("n1", 3, 2));
        let b = s.apply(3, &create("b", 2)).vm.unwrap();
        assert_eq!(b.cid, 4);
        assert_eq!(
            s.apply(4, &create("a", 1)).rejected,
            Some(Rejection::AlreadyExists { id: "a".into() })
        );
        // 4 of 2×2.0 vCPUs are placed: one more is overcommit.
        let r = s.apply(5, &create("c", 1)).rejected.unwrap();
        assert!(r.to_string().contains("vCPUs"), "{r}");
        // Stopping frees the vCPUs, starting again needs them back.
        s.apply(
            6,
            &Command::SetDesired {
                id: "b".into(),
                desired: Desired::Stopped,
            },
        );
        assert!(s.apply(7, &create("c", 1)).rejected.is_none());
        let r = s.apply(
            8,
            &Command::SetDesired {
                id: "b".into(),
                desired: Desired::Running,
            },
        );
        assert!(matches!(r.rejected, Some(Rejection::NoCapacity { .. })));
        assert!(
            s.apply(9, &Command::DeleteVm { id: "b".into() })
                .vm
                .is_some()
        );
        assert_eq!(
            s.apply(10, &Command::DeleteVm { id: "b".into() }).rejected,
            Some(Rejection::NotFound { id: "b".into() })
        );
    }

    #[test]
    fn no_node_is_a_clear_refusal() {
        let mut s = ClusterState::default();
        let r = s.apply(1, &create("a", 1)).rejected.unwrap();
        assert!(r.to_string().contains("no node"), "{r}");
    }
}

#[cfg(test)]
mod failure_tests {
    #![allow(clippy::unwrap_used)]
    use super::tests::node;
    use super::*;
    use cell0_proto::grpc;

    fn create(name: &str, policy: grpc::RestartPolicy) -> Command {
        let spec = VmSpec::from_proto(
            grpc::VmSpec {
                name: name.into(),
                vcpus: 1,
                restart_policy: policy as i32,
                ..Default::default()
            },
            name,
        )
        .unwrap();
        Command::CreateVm {
            spec,
            created_at_ms: 1,
        }
    }

    #[test]
    fn a_down_node_moves_restartable_vms_with_a_new_epoch_and_loses_the_others() {
        let mut s = ClusterState::default();
        s.apply(
            1,
            &Command::PutNode {
                node: node("n1", 4, 4096, 1.0),
            },
        );
        let a = s
            .apply(2, &create("a", grpc::RestartPolicy::Always))
            .vm
            .unwrap();
        let b = s
            .apply(3, &create("b", grpc::RestartPolicy::Never))
            .vm
            .unwrap();
        assert_eq!((a.epoch, b.epoch), (1, 1));
        s.apply(
            4,
            &Command::PutNode {
                node: node("n2", 4, 4096, 1.0),
            },
        );
        let down = Command::SetNodeState {
            id: "n1".into(),
            state: NodeState::Down,
        };
        let ev = s.apply(5, &down).evacuation.unwrap();
        assert_eq!(ev.moved.len(), 1);
        let a = &s.vms["a"];
        assert_eq!((a.node.as_str(), a.epoch, a.revision), ("n2", 2, 5));
        let b = &s.vms["b"];
        assert_eq!(
            (b.node.as_str(), b.desired, b.epoch),
            ("n1", Desired::Stopped, 1)
        );
        assert!(
            b.lost.as_deref().unwrap().contains("node n1 went down"),
            "{b:?}"
        );
        // Down again: nothing more happens.
        assert!(s.apply(6, &down).evacuation.is_none());
        // Suspect takes no new VMs and moves nothing.
        let r = s.apply(
            7,
            &Command::SetNodeState {
                id: "n2".into(),
                state: NodeState::Suspect,
            },
        );
        assert!(r.evacuation.is_none());
        assert!(
            s.apply(8, &create("c", grpc::RestartPolicy::Always))
                .rejected
                .is_some()
        );
        // Starting a lost VM again clears the reason.
        s.apply(
            9,
            &Command::SetDesired {
                id: "b".into(),
                desired: Desired::Running,
            },
        );
        assert!(s.vms["b"].lost.is_none());
    }

    fn watched(id: &str) -> NodeRecord {
        let mut n = node(id, 4, 4096, 1.0);
        n.labels.insert(
            crate::node::liveness::REMOTE_LABEL.into(),
            crate::node::liveness::REMOTE_VALUE.into(),
        );
        n
    }

    /// Watched nodes n1 and n2; VM `a` (restart always) placed on n1, then
    /// n1 drained (indexes 1 to 4): `a` moves to n2 as a handoff from n1.
    fn a_on_n1_drained_to_n2() -> ClusterState {
        let mut s = ClusterState::default();
        s.apply(
            1,
            &Command::PutNode {
                node: watched("n1"),
            },
        );
        s.apply(2, &create("a", grpc::RestartPolicy::Always));
        s.apply(
            3,
            &Command::PutNode {
                node: watched("n2"),
            },
        );
        s.apply(4, &Command::DrainNode { id: "n1".into() });
        s
    }

    #[test]
    fn a_drain_of_a_watched_node_is_a_handoff_released_once() {
        let mut s = a_on_n1_drained_to_n2();
        let a = s.vms["a"].clone();
        assert_eq!((a.node.as_str(), a.epoch, a.revision), ("n2", 2, 4));
        assert_eq!(
            a.handoff,
            Some(Handoff {
                from: "n1".into(),
                epoch: 1
            })
        );
        assert_eq!(
            a.handoff_message().unwrap(),
            "waiting for n1 to stop it (handoff)"
        );
        // A release for another epoch is stale: nothing changes.
        let r = s.apply(
            5,
            &Command::ReleaseHandoff {
                id: "a".into(),
                epoch: 1,
            },
        );
        assert!(r.rejected.is_none());
        assert_eq!(s.vms["a"], a);
        // The right one ends it, with a new revision (the agent learns it).
        s.apply(
            6,
            &Command::ReleaseHandoff {
                id: "a".into(),
                epoch: 2,
            },
        );
        assert_eq!(
            (s.vms["a"].handoff.as_ref(), s.vms["a"].revision),
            (None, 6)
        );
        // Again: no change.
        s.apply(
            7,
            &Command::ReleaseHandoff {
                id: "a".into(),
                epoch: 2,
            },
        );
        assert_eq!(s.vms["a"].revision, 6);
        assert_eq!(
            s.apply(
                8,
                &Command::ReleaseHandoff {
                    id: "zz".into(),
                    epoch: 1
                }
            )
            .rejected,
            Some(Rejection::NotFound { id: "zz".into() })
        );
    }

    #[test]
    fn a_handoff_ends_when_the_old_node_goes_down_and_survives_a_second_move() {
        let mut s = a_on_n1_drained_to_n2();
        // Moved on before n1 stopped it: it still waits for n1, not n2.
        s.apply(
            5,
            &Command::PutNode {
                node: watched("n3"),
            },
        );
        s.apply(6, &Command::DrainNode { id: "n2".into() });
        let a = &s.vms["a"];
        assert_eq!((a.node.as_str(), a.epoch), ("n3", 3));
        assert_eq!(a.handoff.as_ref().unwrap().from, "n1");
        // n1 goes down (it fenced itself): the handoff is over.
        s.apply(
            7,
            &Command::SetNodeState {
                id: "n1".into(),
                state: NodeState::Down,
            },
        );
        assert_eq!(
            (s.vms["a"].handoff.as_ref(), s.vms["a"].revision),
            (None, 7)
        );
        // A node going down hands nothing off: its VMs move at once.
        s.apply(8, &Command::UncordonNode { id: "n2".into() });
        s.apply(
            9,
            &Command::SetNodeState {
                id: "n3".into(),
                state: NodeState::Down,
            },
        );
        let a = &s.vms["a"];
        assert_eq!(
            (a.node.as_str(), a.epoch, a.handoff.as_ref()),
            ("n2", 4, None)
        );
    }

    #[test]
    fn a_move_back_to_the_old_node_and_an_unwatched_node_need_no_handoff() {
        let mut s = a_on_n1_drained_to_n2();
        s.apply(5, &Command::UncordonNode { id: "n1".into() });
        s.apply(6, &Command::DrainNode { id: "n2".into() });
        let a = &s.vms["a"];
        assert_eq!((a.node.as_str(), a.handoff.as_ref()), ("n1", None));
        // A member's node in a one-member daemon sends no heartbeats: the
        // leader could never hear it stop the VM, so nothing waits.
        let mut t = ClusterState::default();
        t.apply(
            1,
            &Command::PutNode {
                node: node("m1", 4, 4096, 1.0),
            },
        );
        t.apply(2, &create("b", grpc::RestartPolicy::Always));
        t.apply(
            3,
            &Command::PutNode {
                node: watched("n1"),
            },
        );
        t.apply(4, &Command::DrainNode { id: "m1".into() });
        let b = &t.vms["b"];
        assert_eq!(
            (b.node.as_str(), b.epoch, b.handoff.as_ref()),
            ("n1", 2, None)
        );
    }
}
