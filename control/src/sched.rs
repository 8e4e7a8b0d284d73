// SPDX-License-Identifier: Apache-2.0
//! Placement: filter the nodes that can take a VM, then score them (bin-pack:
//! the fullest node that fits). Runs inside the state machine's apply, so it
//! is a pure function of the replicated state.

use crate::spec::VmSpec;
use crate::store::state::{ClusterState, NodeRecord, NodeState};

/// Why a VM cannot be placed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SchedError {
    /// No node is registered or ready.
    #[error("no node is ready to take VMs")]
    NoNode,
    /// Nodes exist but none fits; the reason of the closest one.
    #[error("no node has room: {0}")]
    NoRoom(String),
}

/// Whether `spec` fits on `node` given what is already placed.
pub fn fits(state: &ClusterState, node: &str, spec: &VmSpec) -> Result<(), SchedError> {
    let n = state.nodes.get(node).ok_or(SchedError::NoNode)?;
    check(state, n, spec)
        .map(|_| ())
        .map_err(SchedError::NoRoom)
}

fn check(state: &ClusterState, n: &NodeRecord, spec: &VmSpec) -> Result<f64, String> {
    let (used, _) = state.allocated(&n.id);
    let cpu_limit = (f64::from(n.capacity.vcpus) * n.cpu_overcommit).floor();
    let mem_limit = (n.capacity.memory_mib as f64 * n.memory_overcommit).floor();
    let cpu_after = f64::from(used.vcpus + spec.vcpus);
    let mem_after = (used.memory_mib + spec.memory_mib) as f64;
    if cpu_after > cpu_limit {
        return Err(format!(
            "node {} has {} of {} vCPUs placed ({} × overcommit {}), {} more asked",
            n.id, used.vcpus, cpu_limit, n.capacity.vcpus, n.cpu_overcommit, spec.vcpus
        ));
    }
    if mem_after > mem_limit {
        return Err(format!(
            "node {} has {} of {} MiB placed ({} MiB × overcommit {}), {} MiB more asked",
            n.id,
            used.memory_mib,
            mem_limit,
            n.capacity.memory_mib,
            n.memory_overcommit,
            spec.memory_mib
        ));
    }
    // Bin-pack: prefer the node that is fullest after placing.
    Ok(cpu_after / cpu_limit.max(1.0) + mem_after / mem_limit.max(1.0))
}

/// Picks the node for `spec`.
pub fn place(state: &ClusterState, spec: &VmSpec) -> Result<String, SchedError> {
    let mut best: Option<(f64, &str)> = None;
    let mut why = None;
    for n in state.nodes.values().filter(|n| n.state == NodeState::Ready) {
        match check(state, n, spec) {
            Ok(score) => {
                if best.is_none_or(|(s, _)| score > s) {
                    best = Some((score, &n.id));
                }
            }
            Err(e) => why = Some(e),
        }
    }
    match (best, why) {
        (Some((_, id)), _) => Ok(id.to_string()),
        (None, Some(w)) => Err(SchedError::NoRoom(w)),
        (None, None) => Err(SchedError::NoNode),
    }
}
