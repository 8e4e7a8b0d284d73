// SPDX-License-Identifier: Apache-2.0
//! Placement, in the manner of the Nomad and Kubernetes schedulers: filter
//! the nodes that can take a VM, then score the ones left.
//!
//! - Filter, in this order (a node is counted under the first check it
//!   fails): the node is ready and not drained; its region and zone are among
//!   the ones the spec allows; it carries the labels of the spec's node
//!   selector; affinity (a VM with the given labels already runs in the same
//!   node or zone) and anti-affinity (none does); and it has room for the
//!   VM's vCPUs and memory under its overcommit ratios.
//! - Score: bin-pack (the fullest node after placing) by default, spread (the
//!   emptiest) on request. Ties go to the node with the smallest id.
//!
//! Everything runs inside the state machine's apply ([`ClusterState::apply`]):
//! a decision is a pure function of the replicated state, computed in integer
//! arithmetic, so every member reaches the same one. When nothing fits, the
//! error says what was asked and why each node was left out, e.g. "no node
//! with 1 vCPU and 4096 MiB free in zone eu-1 (3 nodes: 2 lack memory, 1 in
//! another zone)".

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::spec::{PlacementPolicy, Topology, VmSpec};
use crate::store::state::{ClusterState, NodeRecord, NodeState, Rejection, Resources};

/// Why a VM cannot be placed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SchedError {
    /// No node is registered at all.
    #[error("no node is registered to take VMs")]
    NoNode,
    /// No node meets the spec's constraints (state, zone, labels, affinity).
    #[error("{0}")]
    Unschedulable(String),
    /// Some node meets the constraints but none has room.
    #[error("{0}")]
    NoRoom(String),
    /// The node named for the check is not registered.
    #[error("no node named {0:?}")]
    UnknownNode(String),
}

impl SchedError {
    /// The state machine's refusal for this error.
    pub fn rejection(&self) -> Rejection {
        match self {
            SchedError::NoRoom(_) => Rejection::NoCapacity {
                reason: self.to_string(),
            },
            _ => Rejection::Unschedulable {
                reason: self.to_string(),
            },
        }
    }
}

/// Why one node was left out, in filter order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    /// Its state is down.
    Down,
    /// Suspect: it missed its heartbeat deadline, not yet marked down.
    Suspect,
    /// Drained, or in the (older) draining state.
    Drained,
    /// Not in an allowed region.
    OtherRegion,
    /// Not in an allowed zone.
    OtherZone,
    /// Lacks a label of the node selector.
    Labels,
    /// No VM matching the affinity runs in its node or zone.
    NoAffinity,
    /// A VM matching the anti-affinity runs in its node or zone.
    AntiAffinity,
    /// Not enough vCPUs left.
    Cpu,
    /// Not enough memory left.
    Memory,
    /// Neither enough vCPUs nor memory.
    CpuAndMemory,
}

impl Reason {
    fn phrase(self, n: usize, spec: &VmSpec) -> String {
        let one = n == 1;
        let p = &spec.placement;
        let dom = match p.topology {
            Topology::Node => "",
            Topology::Zone => " in their zone",
        };
        match self {
            Reason::Down => format!("{n} down"),
            Reason::Suspect => format!(
                "{n} suspect (missed {} heartbeat deadline)",
                if one { "its" } else { "their" }
            ),
            Reason::Drained => format!("{n} drained"),
            Reason::OtherRegion => format!("{n} in another region"),
            Reason::OtherZone => format!("{n} in another zone"),
            Reason::Labels => format!(
                "{n} {} the labels {}",
                if one { "lacks" } else { "lack" },
                kv(&p.node_selector)
            ),
            Reason::NoAffinity => format!(
                "{n} {} no VM with {}{dom}",
                if one { "runs" } else { "run" },
                kv(&p.affinity)
            ),
            Reason::AntiAffinity => format!(
                "{n} already {} a VM with {}{dom}",
                if one { "runs" } else { "run" },
                kv(&p.anti_affinity)
            ),
            Reason::Cpu => format!("{n} {} vCPUs", if one { "lacks" } else { "lack" }),
            Reason::Memory => format!("{n} {} memory", if one { "lacks" } else { "lack" }),
            Reason::CpuAndMemory => {
                format!(
                    "{n} {} vCPUs and memory",
                    if one { "lacks" } else { "lack" }
                )
            }
        }
    }
}

fn kv(m: &BTreeMap<String, String>) -> String {
    let v: Vec<String> = m.iter().map(|(k, v)| format!("{k}={v}")).collect();
    v.join(",")
}

fn matches(labels: &BTreeMap<String, String>, sel: &BTreeMap<String, String>) -> bool {
    sel.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// What one pass over the VMs tells about the nodes.
struct Index<'a> {
    used: HashMap<&'a str, Resources>,
    affinity_nodes: HashSet<&'a str>,
    affinity_zones: HashSet<&'a str>,
    anti_nodes: HashSet<&'a str>,
    anti_zones: HashSet<&'a str>,
}

impl<'a> Index<'a> {
    /// Scans `state`'s VMs, leaving out `exclude` (the VM being re-placed).
    fn build(state: &'a ClusterState, spec: &VmSpec, exclude: Option<&str>) -> Index<'a> {
        let p = &spec.placement;
        let mut ix = Index {
            used: HashMap::with_capacity(state.nodes.len()),
            affinity_nodes: HashSet::new(),
            affinity_zones: HashSet::new(),
            anti_nodes: HashSet::new(),
            anti_zones: HashSet::new(),
        };
        let zone_of = |node: &str| state.nodes.get(node).map(|n| n.zone.as_str());
        for vm in state.vms.values() {
            if exclude == Some(vm.id.as_str()) {
                continue;
            }
            let node = vm.node.as_str();
            if vm.desired == crate::store::state::Desired::Running {
                let u = ix.used.entry(node).or_default();
                u.vcpus += vm.spec.vcpus;
                u.memory_mib += vm.spec.memory_mib;
            }
            if !p.affinity.is_empty() && matches(&vm.spec.labels, &p.affinity) {
                ix.affinity_nodes.insert(node);
                if let Some(z) = zone_of(node) {
                    ix.affinity_zones.insert(z);
                }
            }
            if !p.anti_affinity.is_empty() && matches(&vm.spec.labels, &p.anti_affinity) {
                ix.anti_nodes.insert(node);
                if let Some(z) = zone_of(node) {
                    ix.anti_zones.insert(z);
                }
            }
        }
        ix
    }

    fn used(&self, node: &str) -> Resources {
        self.used.get(node).copied().unwrap_or_default()
    }
}

/// A node's limits under its overcommit ratios (floored, as integers).
pub fn limits(n: &NodeRecord) -> Resources {
    Resources {
        // `as` saturates: a NaN or negative ratio gives 0, never a panic.
        vcpus: (f64::from(n.capacity.vcpus) * n.cpu_overcommit).floor() as u32,
        memory_mib: (n.capacity.memory_mib as f64 * n.memory_overcommit).floor() as u64,
    }
}

fn room(n: &NodeRecord, used: Resources, spec: &VmSpec) -> Result<u64, Reason> {
    let lim = limits(n);
    let cpu_after = u64::from(used.vcpus) + u64::from(spec.vcpus);
    let mem_after = used.memory_mib.saturating_add(spec.memory_mib);
    let cpu_ok = cpu_after <= u64::from(lim.vcpus);
    let mem_ok = mem_after <= lim.memory_mib;
    match (cpu_ok, mem_ok) {
        (true, true) => {}
        (false, true) => return Err(Reason::Cpu),
        (true, false) => return Err(Reason::Memory),
        (false, false) => return Err(Reason::CpuAndMemory),
    }
    // Fullness after placing, in millionths per resource (0..=2_000_000).
    let frac = |a: u64, l: u64| (u128::from(a) * 1_000_000 / u128::from(l.max(1))) as u64;
    Ok(frac(cpu_after, u64::from(lim.vcpus)) + frac(mem_after, lim.memory_mib))
}

fn filter(n: &NodeRecord, spec: &VmSpec, ix: &Index<'_>) -> Result<u64, Reason> {
    let p = &spec.placement;
    match n.state {
        NodeState::Ready => {}
        // A suspect node missed a heartbeat: no new VMs until it is back.
        NodeState::Down => return Err(Reason::Down),
        NodeState::Suspect => return Err(Reason::Suspect),
        NodeState::Draining => return Err(Reason::Drained),
    }
    if n.drained {
        return Err(Reason::Drained);
    }
    if !p.regions.is_empty() && !p.regions.contains(&n.region) {
        return Err(Reason::OtherRegion);
    }
    if !p.zones.is_empty() && !p.zones.contains(&n.zone) {
        return Err(Reason::OtherZone);
    }
    if !matches(&n.labels, &p.node_selector) {
        return Err(Reason::Labels);
    }
    let (aff, anti) = match p.topology {
        Topology::Node => (
            ix.affinity_nodes.contains(n.id.as_str()),
            ix.anti_nodes.contains(n.id.as_str()),
        ),
        Topology::Zone => (
            ix.affinity_zones.contains(n.zone.as_str()),
            ix.anti_zones.contains(n.zone.as_str()),
        ),
    };
    if !p.affinity.is_empty() && !aff {
        return Err(Reason::NoAffinity);
    }
    if !p.anti_affinity.is_empty() && anti {
        return Err(Reason::AntiAffinity);
    }
    room(n, ix.used(&n.id), spec)
}

fn names(v: &[String]) -> String {
    v.join(", ")
}

/// "no node with 1 vCPU and 4096 MiB free in zone eu-1 (3 nodes: 2 lack
/// memory, 1 in another zone)".
fn explain(
    state: &ClusterState,
    spec: &VmSpec,
    ix: &Index<'_>,
    counts: &BTreeMap<Reason, usize>,
) -> String {
    let p = &spec.placement;
    let mut s = format!(
        "no node with {} vCPU{} and {} MiB free",
        spec.vcpus,
        if spec.vcpus == 1 { "" } else { "s" },
        spec.memory_mib
    );
    match p.regions.len() {
        0 => {}
        1 => {
            let _ = write!(s, " in region {}", p.regions[0]);
        }
        _ => {
            let _ = write!(s, " in regions {}", names(&p.regions));
        }
    }
    match p.zones.len() {
        0 => {}
        1 => {
            let _ = write!(s, " in zone {}", p.zones[0]);
        }
        _ => {
            let _ = write!(s, " in zones {}", names(&p.zones));
        }
    }
    if !p.node_selector.is_empty() {
        let _ = write!(s, " labelled {}", kv(&p.node_selector));
    }
    let dom = match p.topology {
        Topology::Node => "node",
        Topology::Zone => "zone",
    };
    if !p.affinity.is_empty() {
        let _ = write!(s, " in a {dom} with a VM with {}", kv(&p.affinity));
    }
    if !p.anti_affinity.is_empty() {
        let _ = write!(s, " in a {dom} without a VM with {}", kv(&p.anti_affinity));
    }
    let total: usize = counts.values().sum();
    let parts: Vec<String> = counts.iter().map(|(r, n)| r.phrase(*n, spec)).collect();
    let _ = write!(
        s,
        " ({total} node{}: {})",
        if total == 1 { "" } else { "s" },
        parts.join(", ")
    );
    // Among the nodes that met every constraint, the one with the most free
    // memory: what the caller could still ask for.
    let roomiest = state
        .nodes
        .values()
        .filter(|n| {
            matches!(
                filter(n, spec, ix),
                Err(Reason::Cpu | Reason::Memory | Reason::CpuAndMemory)
            )
        })
        .map(|n| {
            let lim = limits(n);
            let u = ix.used(&n.id);
            (
                lim.memory_mib.saturating_sub(u.memory_mib),
                lim.vcpus.saturating_sub(u.vcpus),
                &n.id,
            )
        })
        .max_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)).then(b.2.cmp(a.2)));
    if let Some((mem, cpu, id)) = roomiest {
        let _ = write!(
            s,
            "; the most free is {mem} MiB and {cpu} vCPU{} on {id}",
            if cpu == 1 { "" } else { "s" }
        );
    }
    s
}

/// Picks the node for `spec`; `exclude` names a VM already in `state` that is
/// being re-placed (its own resources and labels do not count).
pub fn place(
    state: &ClusterState,
    spec: &VmSpec,
    exclude: Option<&str>,
) -> Result<String, SchedError> {
    if state.nodes.is_empty() {
        return Err(SchedError::NoNode);
    }
    let ix = Index::build(state, spec, exclude);
    let spread = spec.placement.policy == PlacementPolicy::Spread;
    let mut best: Option<(u64, &str)> = None;
    let mut counts: BTreeMap<Reason, usize> = BTreeMap::new();
    // Nodes in id order, and only a strictly better score replaces the best:
    // ties go to the smallest id.
    for n in state.nodes.values() {
        match filter(n, spec, &ix) {
            Ok(score) => {
                let better = match best {
                    None => true,
                    Some((b, _)) if spread => score < b,
                    Some((b, _)) => score > b,
                };
                if better {
                    best = Some((score, &n.id));
                }
            }
            Err(r) => *counts.entry(r).or_default() += 1,
        }
    }
    if let Some((_, id)) = best {
        return Ok(id.to_string());
    }
    let msg = explain(state, spec, &ix, &counts);
    if counts
        .keys()
        .any(|r| matches!(r, Reason::Cpu | Reason::Memory | Reason::CpuAndMemory))
    {
        Err(SchedError::NoRoom(msg))
    } else {
        Err(SchedError::Unschedulable(msg))
    }
}

/// Whether `spec` has room on `node` (capacity only: for a VM that is already
/// placed there and starts again). `exclude` is that VM.
pub fn fits(
    state: &ClusterState,
    node: &str,
    spec: &VmSpec,
    exclude: Option<&str>,
) -> Result<(), SchedError> {
    let n = state
        .nodes
        .get(node)
        .ok_or_else(|| SchedError::UnknownNode(node.to_string()))?;
    let mut used = Resources::default();
    for vm in state.vms.values() {
        if vm.node == node
            && exclude != Some(vm.id.as_str())
            && vm.desired == crate::store::state::Desired::Running
        {
            used.vcpus += vm.spec.vcpus;
            used.memory_mib += vm.spec.memory_mib;
        }
    }
    room(n, used, spec).map(|_| ()).map_err(|r| {
        let lim = limits(n);
        SchedError::NoRoom(format!(
            "node {} {} for {} vCPU{} and {} MiB: {} of {} vCPUs and {} of {} MiB are placed",
            n.id,
            match r {
                Reason::Cpu => "lacks vCPUs",
                Reason::Memory => "lacks memory",
                _ => "lacks vCPUs and memory",
            },
            spec.vcpus,
            if spec.vcpus == 1 { "" } else { "s" },
            spec.memory_mib,
            used.vcpus,
            lim.vcpus,
            used.memory_mib,
            lim.memory_mib
        ))
    })
}

/// A VM moved off a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Moved {
    /// VM id.
    pub id: String,
    /// The node it left.
    pub from: String,
    /// The node it goes to.
    pub to: String,
}

/// A VM that stayed on its node, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stayed {
    /// VM id.
    pub id: String,
    /// Why it did not move.
    pub reason: String,
}

/// What moving the VMs off a node did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Evacuation {
    /// The node.
    pub node: String,
    /// VMs placed elsewhere.
    pub moved: Vec<Moved>,
    /// VMs still on the node.
    pub stayed: Vec<Stayed>,
}

/// Re-places the restartable VMs (restart policy on-failure or always) of
/// `node`, which the caller has marked drained or down, at log index `index`:
/// the largest first, each where [`place`] puts it. The node agents follow
/// the records (the old node stops the VM, the new one starts it). VMs with
/// restart policy never, and those that fit nowhere, stay and are listed.
pub fn evacuate(state: &mut ClusterState, node: &str, index: u64) -> Evacuation {
    let mut out = Evacuation {
        node: node.to_string(),
        ..Evacuation::default()
    };
    let mut todo: Vec<(u64, u32, String)> = Vec::new();
    for vm in state.vms.values().filter(|v| v.node == node) {
        if vm.spec.restart.restarts(true) {
            todo.push((vm.spec.memory_mib, vm.spec.vcpus, vm.id.clone()));
        } else {
            out.stayed.push(Stayed {
                id: vm.id.clone(),
                reason: "restart policy never: only restartable VMs (on-failure, always) are \
                         moved; delete it, or recreate it elsewhere"
                    .into(),
            });
        }
    }
    // Largest first (memory, then vCPUs), then by id: deterministic.
    todo.sort_by(|a, b| b.0.cmp(&a.0).then(b.1.cmp(&a.1)).then(a.2.cmp(&b.2)));
    for (_, _, id) in todo {
        let Some(spec) = state.vms.get(&id).map(|v| v.spec.clone()) else {
            continue;
        };
        match place(state, &spec, Some(&id)) {
            Ok(to) => {
                if let Some(vm) = state.vms.get_mut(&id) {
                    vm.node = to.clone();
                    vm.revision = index;
                }
                out.moved.push(Moved {
                    id,
                    from: node.to_string(),
                    to,
                });
            }
            Err(e) => out.stayed.push(Stayed {
                id,
                reason: format!("nowhere else fits: {e}"),
            }),
        }
    }
    out.stayed.sort_by(|a, b| a.id.cmp(&b.id));
    out
}

#[cfg(test)]
mod tests;
