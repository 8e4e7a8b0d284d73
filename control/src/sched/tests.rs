// SPDX-License-Identifier: Apache-2.0
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;
use crate::spec::{Placement, RestartPolicy};
use crate::store::state::{Command, Desired, VmRecord};

fn node(id: &str, zone: &str, vcpus: u32, mem: u64) -> NodeRecord {
    NodeRecord {
        id: id.into(),
        address: String::new(),
        zone: zone.into(),
        region: format!("r-{}", zone.split('-').next().unwrap_or(zone)),
        capacity: Resources {
            vcpus,
            memory_mib: mem,
        },
        cpu_overcommit: 1.0,
        memory_overcommit: 1.0,
        state: NodeState::Ready,
        labels: BTreeMap::new(),
        drained: false,
    }
}

fn spec(name: &str, vcpus: u32, mem: u64) -> VmSpec {
    let mut s = VmSpec::from_proto(
        cell0_proto::grpc::VmSpec {
            name: name.into(),
            vcpus,
            memory_mib: mem,
            ..Default::default()
        },
        name,
    )
    .unwrap();
    s.restart = RestartPolicy::Always;
    s
}

fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn cluster(nodes: Vec<NodeRecord>) -> ClusterState {
    let mut s = ClusterState::default();
    for (i, n) in nodes.into_iter().enumerate() {
        s.apply(i as u64 + 1, &Command::PutNode { node: n });
    }
    s
}

fn create(s: &mut ClusterState, spec: VmSpec) -> Result<String, Rejection> {
    let r = s.apply(
        1000 + s.vms.len() as u64,
        &Command::CreateVm {
            spec,
            created_at_ms: 1,
        },
    );
    match r.rejected {
        Some(e) => Err(e),
        None => Ok(r.vm.unwrap().node),
    }
}

#[test]
fn bin_pack_fills_one_node_spread_uses_all() {
    let mut s = cluster(vec![
        node("a", "z-1", 4, 4096),
        node("b", "z-1", 4, 4096),
        node("c", "z-1", 4, 4096),
    ]);
    for i in 0..4 {
        assert_eq!(create(&mut s, spec(&format!("p{i}"), 1, 512)).unwrap(), "a");
    }
    let mut t = cluster(vec![
        node("a", "z-1", 4, 4096),
        node("b", "z-1", 4, 4096),
        node("c", "z-1", 4, 4096),
    ]);
    let mut got = Vec::new();
    for i in 0..3 {
        let mut sp = spec(&format!("s{i}"), 1, 512);
        sp.placement.policy = PlacementPolicy::Spread;
        got.push(create(&mut t, sp).unwrap());
    }
    assert_eq!(got, ["a", "b", "c"]);
}

#[test]
fn zone_region_and_node_selector_filter() {
    let mut gpu = node("c", "eu-2", 8, 8192);
    gpu.labels = labels(&[("gpu", "a100")]);
    let mut s = cluster(vec![
        node("a", "eu-1", 8, 8192),
        node("b", "us-1", 8, 8192),
        gpu,
    ]);
    let mut sp = spec("z", 1, 64);
    sp.placement.zones = vec!["us-1".into()];
    assert_eq!(create(&mut s, sp).unwrap(), "b");
    let mut sp = spec("r", 1, 64);
    sp.placement.regions = vec!["r-eu".into()];
    sp.placement.node_selector = labels(&[("gpu", "a100")]);
    assert_eq!(create(&mut s, sp).unwrap(), "c");
    let mut sp = spec("none", 1, 64);
    sp.placement.zones = vec!["eu-1".into()];
    sp.placement.node_selector = labels(&[("gpu", "a100")]);
    let e = create(&mut s, sp).unwrap_err();
    assert!(matches!(e, Rejection::Unschedulable { .. }), "{e:?}");
    assert_eq!(
        e.to_string(),
        "no node with 1 vCPU and 64 MiB free in zone eu-1 labelled gpu=a100 (3 nodes: 2 in \
         another zone, 1 lacks the labels gpu=a100)"
    );
}

#[test]
fn the_reason_counts_every_node() {
    let mut s = cluster(vec![
        node("a", "eu-1", 8, 2048),
        node("b", "eu-1", 8, 2048),
        node("c", "us-1", 8, 8192),
    ]);
    let mut sp = spec("big", 1, 4096);
    sp.placement.zones = vec!["eu-1".into()];
    let e = create(&mut s, sp).unwrap_err();
    assert!(matches!(e, Rejection::NoCapacity { .. }), "{e:?}");
    assert_eq!(
        e.to_string(),
        "no node with 1 vCPU and 4096 MiB free in zone eu-1 (3 nodes: 1 in another zone, 2 lack \
         memory); the most free is 2048 MiB and 8 vCPUs on a"
    );
    s.apply(
        50,
        &Command::SetNodeState {
            id: "c".into(),
            state: NodeState::Down,
        },
    );
    s.apply(51, &Command::DrainNode { id: "a".into() });
    let e = create(&mut s, spec("x", 16, 64)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "no node with 16 vCPUs and 64 MiB free (3 nodes: 1 down, 1 drained, 1 lacks vCPUs); the \
         most free is 2048 MiB and 8 vCPUs on b"
    );
    // A suspect node is named as such, apart from the down ones.
    s.apply(
        52,
        &Command::SetNodeState {
            id: "b".into(),
            state: NodeState::Suspect,
        },
    );
    let e = create(&mut s, spec("x", 1, 64)).unwrap_err().to_string();
    assert!(
        e.contains("(3 nodes: 1 down, 1 suspect (missed its heartbeat deadline), 1 drained)"),
        "{e}"
    );
    let e = create(&mut ClusterState::default(), spec("x", 1, 64)).unwrap_err();
    assert!(e.to_string().contains("no node"), "{e}");
}

#[test]
fn anti_affinity_spreads_replicas_and_affinity_co_locates() {
    let mut s = cluster(vec![
        node("a", "z-1", 8, 8192),
        node("b", "z-1", 8, 8192),
        node("c", "z-2", 8, 8192),
    ]);
    let web = |i: usize| {
        let mut sp = spec(&format!("web{i}"), 1, 64);
        sp.labels = labels(&[("app", "web")]);
        sp.placement.anti_affinity = labels(&[("app", "web")]);
        sp
    };
    let mut got: Vec<String> = (0..3).map(|i| create(&mut s, web(i)).unwrap()).collect();
    got.sort();
    assert_eq!(got, ["a", "b", "c"]);
    let e = create(&mut s, web(3)).unwrap_err();
    assert!(
        e.to_string()
            .contains("(3 nodes: 3 already run a VM with app=web)"),
        "{e}"
    );
    // Zone topology: one per zone.
    let mut t = cluster(vec![
        node("a", "z-1", 8, 8192),
        node("b", "z-1", 8, 8192),
        node("c", "z-2", 8, 8192),
    ]);
    let db = |i: usize| {
        let mut sp = web(i);
        sp.placement.topology = Topology::Zone;
        sp
    };
    assert_eq!(create(&mut t, db(0)).unwrap(), "a");
    assert_eq!(create(&mut t, db(1)).unwrap(), "c");
    assert!(create(&mut t, db(2)).is_err());
    // Affinity: next to web0, on node a.
    let mut sp = spec("cache", 1, 64);
    sp.placement.affinity = labels(&[("app", "web")]);
    sp.placement.policy = PlacementPolicy::Spread;
    assert_eq!(create(&mut t, sp).unwrap(), "a");
    let mut sp = spec("lonely", 1, 64);
    sp.placement.affinity = labels(&[("app", "db")]);
    let e = create(&mut t, sp).unwrap_err();
    assert!(e.to_string().contains("3 run no VM with app=db"), "{e}");
}

#[test]
fn drain_moves_restartable_vms_and_reports_the_rest() {
    let mut s = cluster(vec![node("a", "z-1", 8, 8192)]);
    let mut never = spec("never", 1, 256);
    never.restart = RestartPolicy::Never;
    create(&mut s, never).unwrap();
    create(&mut s, spec("big", 1, 2048)).unwrap();
    create(&mut s, spec("small", 1, 512)).unwrap();
    let mut on_fail = spec("onfail", 1, 256);
    on_fail.restart = RestartPolicy::OnFailure;
    create(&mut s, on_fail).unwrap();
    assert!(s.vms.values().all(|v| v.node == "a"));
    s.apply(
        99,
        &Command::PutNode {
            node: node("b", "z-1", 8, 1024),
        },
    );
    let r = s.apply(100, &Command::DrainNode { id: "a".into() });
    let ev = r.evacuation.unwrap();
    let moved: Vec<(&str, &str)> = ev
        .moved
        .iter()
        .map(|m| (m.id.as_str(), m.to.as_str()))
        .collect();
    assert_eq!(moved, [("small", "b"), ("onfail", "b")]);
    assert_eq!(ev.stayed.len(), 2);
    assert_eq!(ev.stayed[0].id, "big");
    assert!(
        ev.stayed[0]
            .reason
            .starts_with("nowhere else fits: no node with 1 vCPU and 2048 MiB free (2 nodes: 1 drained, 1 lacks memory)"),
        "{}",
        ev.stayed[0].reason
    );
    assert_eq!(ev.stayed[1].id, "never");
    assert!(ev.stayed[1].reason.contains("restart policy never"));
    assert_eq!(
        (s.vms["small"].node.as_str(), s.vms["small"].revision),
        ("b", 100)
    );
    assert!(s.nodes["a"].drained);
    // Drained nodes take no new VMs; registering again keeps the drain.
    assert_eq!(create(&mut s, spec("new", 1, 64)).unwrap(), "b");
    s.apply(
        101,
        &Command::PutNode {
            node: node("a", "z-1", 8, 8192),
        },
    );
    assert!(s.nodes["a"].drained);
    s.apply(102, &Command::UncordonNode { id: "a".into() });
    assert!(!s.nodes["a"].drained);
    // b is fuller (bin-pack would pick it); spread picks a, now allowed.
    let mut sp = spec("new2", 1, 64);
    sp.placement.policy = PlacementPolicy::Spread;
    assert_eq!(create(&mut s, sp).unwrap(), "a");
    assert_eq!(
        s.apply(103, &Command::DrainNode { id: "zz".into() })
            .rejected,
        Some(Rejection::NodeNotFound { id: "zz".into() })
    );
}

#[test]
fn a_vm_in_handoff_takes_room_on_its_new_node_only() {
    let watched = |id: &str| {
        let mut n = node(id, "z-1", 2, 4096);
        n.labels.insert(
            crate::node::liveness::REMOTE_LABEL.into(),
            crate::node::liveness::REMOTE_VALUE.into(),
        );
        n
    };
    let mut s = cluster(vec![watched("a")]);
    create(&mut s, spec("x", 2, 64)).unwrap();
    s.apply(10, &Command::PutNode { node: watched("b") });
    let ev = s
        .apply(11, &Command::DrainNode { id: "a".into() })
        .evacuation
        .unwrap();
    assert_eq!(ev.moved[0].to, "b");
    let x = &s.vms["x"];
    assert_eq!(x.handoff.as_ref().map(|h| h.from.as_str()), Some("a"));
    // b is full with x although x does not run there yet; a counts nothing
    // (its agent is stopping x), and it is drained anyway.
    assert_eq!(s.allocated("b").0.vcpus, 2);
    assert_eq!(s.allocated("a").0.vcpus, 0);
    let e = create(&mut s, spec("y", 1, 64)).unwrap_err();
    assert!(e.to_string().contains("1 drained, 1 lacks vCPUs"), "{e}");
}

#[test]
fn single_node_drain_says_nowhere_else_fits() {
    let mut s = cluster(vec![node("only", "local", 4, 4096)]);
    create(&mut s, spec("a", 1, 64)).unwrap();
    let ev = s
        .apply(10, &Command::DrainNode { id: "only".into() })
        .evacuation
        .unwrap();
    assert!(ev.moved.is_empty());
    assert_eq!(
        ev.stayed[0].reason,
        "nowhere else fits: no node with 1 vCPU and 64 MiB free (1 node: 1 drained)"
    );
    assert_eq!(s.vms["a"].node, "only");
}

#[test]
fn node_down_moves_vms_and_stopped_vms_take_no_room() {
    let mut s = cluster(vec![node("a", "z-1", 2, 4096), node("b", "z-2", 2, 4096)]);
    create(&mut s, spec("x", 2, 64)).unwrap();
    create(&mut s, spec("y", 2, 64)).unwrap();
    let (x, y) = (s.vms["x"].node.clone(), s.vms["y"].node.clone());
    assert_ne!(x, y);
    s.apply(
        20,
        &Command::SetDesired {
            id: "y".into(),
            desired: Desired::Stopped,
        },
    );
    let ev = s
        .apply(
            21,
            &Command::SetNodeState {
                id: x.clone(),
                state: NodeState::Down,
            },
        )
        .evacuation
        .unwrap();
    assert_eq!(ev.moved.len(), 1);
    assert_eq!(s.vms["x"].node, y);
    // y cannot start again: x took its vCPUs on its node.
    let r = s.apply(
        22,
        &Command::SetDesired {
            id: "y".into(),
            desired: Desired::Running,
        },
    );
    let e = r.rejected.unwrap();
    assert!(
        e.to_string().contains("lacks vCPUs") && matches!(e, Rejection::NoCapacity { .. }),
        "{e}"
    );
    // Ready again with no drain: nothing moves back by itself.
    s.apply(
        23,
        &Command::SetNodeState {
            id: x.clone(),
            state: NodeState::Ready,
        },
    );
    assert_eq!(s.vms["x"].node, y);
}

#[test]
fn old_records_without_the_new_fields_load() {
    let n = r#"{"id":"n1","address":"","zone":"z","region":"r","capacity":{"vcpus":2,"memory_mib":64},
        "cpu_overcommit":1.0,"memory_overcommit":1.0,"state":"ready"}"#;
    let n: NodeRecord = serde_json::from_str(n).unwrap();
    assert!(!n.drained && n.labels.is_empty());
    let sp = spec("a", 1, 64);
    let mut j = serde_json::to_value(&sp).unwrap();
    assert!(
        j.get("placement").is_none(),
        "empty placement is not written"
    );
    j.as_object_mut().unwrap().remove("placement");
    let back: VmSpec = serde_json::from_value(j).unwrap();
    assert_eq!(*back.placement, Placement::default());
}

// --- properties ---

#[derive(Debug, Clone)]
struct World {
    nodes: Vec<NodeRecord>,
    vms: Vec<VmSpec>,
    ops: Vec<Op>,
}

#[derive(Debug, Clone)]
enum Op {
    Drain(usize),
    Down(usize),
    Uncordon(usize),
    Stop(usize),
}

fn arb_node(i: usize) -> impl Strategy<Value = NodeRecord> {
    (
        1u32..16,
        prop::sample::select(vec![512u64, 1024, 4096]),
        0usize..3,
        prop::sample::select(vec![1.0f64, 1.5, 4.0]),
        prop::bool::weighted(0.2),
        prop::bool::weighted(0.1),
        prop::bool::weighted(0.3),
        prop::bool::ANY,
    )
        .prop_map(move |(c, m, z, oc, drained, down, gpu, watched)| {
            let mut n = node(&format!("n{i:02}"), &format!("z-{z}"), c, m);
            n.cpu_overcommit = oc;
            n.drained = drained;
            if down {
                n.state = NodeState::Down;
            }
            if gpu {
                n.labels = labels(&[("gpu", "yes")]);
            }
            if watched {
                // A node that heartbeats: a drain of it is a handoff.
                n.labels.insert(
                    crate::node::liveness::REMOTE_LABEL.into(),
                    crate::node::liveness::REMOTE_VALUE.into(),
                );
            }
            n
        })
}

fn arb_vm(i: usize) -> impl Strategy<Value = VmSpec> {
    (
        1u32..6,
        prop::sample::select(vec![16u64, 64, 256, 1024]),
        prop::option::of(0usize..3),
        prop::bool::weighted(0.2),
        prop::option::of(0usize..3),
        prop::bool::ANY,
        prop::bool::ANY,
        prop::sample::select(vec![
            RestartPolicy::Never,
            RestartPolicy::OnFailure,
            RestartPolicy::Always,
        ]),
    )
        .prop_map(move |(c, m, zone, gpu, app, spread, zone_topo, restart)| {
            let mut s = spec(&format!("v{i:03}"), c, m);
            s.restart = restart;
            if let Some(z) = zone {
                s.placement.zones = vec![format!("z-{z}")];
            }
            if gpu {
                s.placement.node_selector = labels(&[("gpu", "yes")]);
            }
            if let Some(a) = app {
                let l = labels(&[("app", &format!("a{a}"))]);
                s.labels = l.clone();
                s.placement.anti_affinity = l;
            }
            if spread {
                s.placement.policy = PlacementPolicy::Spread;
            }
            if zone_topo {
                s.placement.topology = Topology::Zone;
            }
            s
        })
}

fn arb_world() -> impl Strategy<Value = World> {
    (1usize..8, 0usize..40).prop_flat_map(|(nn, nv)| {
        let nodes: Vec<_> = (0..nn).map(arb_node).collect();
        let vms: Vec<_> = (0..nv).map(arb_vm).collect();
        let ops = prop::collection::vec(
            prop_oneof![
                (0..nn).prop_map(Op::Drain),
                (0..nn).prop_map(Op::Down),
                (0..nn).prop_map(Op::Uncordon),
                (0..nv.max(1)).prop_map(Op::Stop),
            ],
            0..6,
        );
        (nodes, vms, ops).prop_map(|(nodes, vms, ops)| World { nodes, vms, ops })
    })
}

/// Runs the world through apply; returns the final state.
fn run(w: &World) -> ClusterState {
    let mut s = cluster(w.nodes.clone());
    let mut idx = 100;
    let mut ops = w.ops.iter();
    for (i, v) in w.vms.iter().enumerate() {
        idx += 1;
        s.apply(
            idx,
            &Command::CreateVm {
                spec: v.clone(),
                created_at_ms: 0,
            },
        );
        if i % 7 == 3 {
            if let Some(op) = ops.next() {
                idx += 1;
                let name = |n: usize| w.nodes[n].id.clone();
                let cmd = match op {
                    Op::Drain(n) => Command::DrainNode { id: name(*n) },
                    Op::Down(n) => Command::SetNodeState {
                        id: name(*n),
                        state: NodeState::Down,
                    },
                    Op::Uncordon(n) => Command::UncordonNode { id: name(*n) },
                    Op::Stop(v) => Command::SetDesired {
                        id: format!("v{v:03}"),
                        desired: Desired::Stopped,
                    },
                };
                s.apply(idx, &cmd);
            }
        }
    }
    s
}

fn check_invariants(s: &ClusterState, created: &[VmRecord]) -> Result<(), TestCaseError> {
    for n in s.nodes.values() {
        let (used, _) = s.allocated(&n.id);
        let lim = limits(n);
        prop_assert!(
            used.vcpus <= lim.vcpus && used.memory_mib <= lim.memory_mib,
            "node {} over capacity: {used:?} > {lim:?}",
            n.id
        );
    }
    // Every VM as created went to a ready, undrained node that met its
    // constraints at the time (checked on the record of its creation).
    for v in created {
        let p = &v.spec.placement;
        let n = &s.nodes[&v.node];
        prop_assert!(p.zones.is_empty() || p.zones.contains(&n.zone));
        prop_assert!(matches(&n.labels, &p.node_selector));
    }
    // Anti-affinity: each VM, placed after the earlier ones, shares no
    // node (or zone, with zone topology) with an earlier VM it must avoid.
    for (j, later) in created.iter().enumerate() {
        let p = &later.spec.placement;
        if p.anti_affinity.is_empty() {
            continue;
        }
        for earlier in &created[..j] {
            if matches(&earlier.spec.labels, &p.anti_affinity) {
                let same = match p.topology {
                    Topology::Node => later.node == earlier.node,
                    Topology::Zone => s.nodes[&later.node].zone == s.nodes[&earlier.node].zone,
                };
                prop_assert!(!same, "{} placed next to {}", later.id, earlier.id);
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    #[test]
    fn placements_respect_every_filter(w in arb_world()) {
        let mut s = cluster(w.nodes.clone());
        let mut created = Vec::new();
        for (i, v) in w.vms.iter().enumerate() {
            let before = s.clone();
            let r = s.apply(200 + i as u64, &Command::CreateVm { spec: v.clone(), created_at_ms: 0 });
            match (r.vm, r.rejected) {
                (Some(vm), None) => {
                    let n = &s.nodes[&vm.node];
                    prop_assert_eq!(n.state, NodeState::Ready);
                    prop_assert!(!n.drained, "placed on drained {}", n.id);
                    created.push(vm);
                }
                (None, Some(rej)) => {
                    prop_assert_eq!(&before, &s, "a refusal changed the state");
                    let msg = rej.to_string();
                    prop_assert!(msg.starts_with("no node"), "{}", msg);
                    // Every node is counted once in the reason.
                    let want = format!("({} node", s.nodes.len());
                    prop_assert!(msg.contains(&want), "{}", msg);
                }
                other => prop_assert!(false, "bad apply result {:?}", other),
            }
        }
        check_invariants(&s, &created)?;
    }

    #[test]
    fn decisions_are_deterministic_and_drains_keep_invariants(w in arb_world()) {
        let a = run(&w);
        let b = run(&w);
        prop_assert_eq!(&a, &b);
        // Capacity holds after drains and node losses too, and nothing that
        // should have moved stays on a drained or down node unless reported.
        for n in a.nodes.values() {
            let (used, _) = a.allocated(&n.id);
            let lim = limits(n);
            prop_assert!(used.vcpus <= lim.vcpus && used.memory_mib <= lim.memory_mib);
        }
        // A VM waits for a handoff only from a watched node that is not down
        // (it may still run the VM there), never from its own node, and
        // under an older epoch.
        for v in a.vms.values() {
            if let Some(h) = &v.handoff {
                prop_assert_ne!(&h.from, &v.node);
                prop_assert!(a.watched(&h.from), "{} waits for unwatched {}", v.id, h.from);
                prop_assert_ne!(a.nodes[&h.from].state, NodeState::Down);
                prop_assert!(h.epoch < v.epoch);
            }
        }
        // The decision does not depend on the order the nodes were
        // registered in.
        let mut rev = w.clone();
        rev.nodes.reverse();
        let last = w.nodes.len() - 1;
        for op in &mut rev.ops {
            match op {
                Op::Drain(n) | Op::Down(n) | Op::Uncordon(n) => *n = last - *n,
                Op::Stop(_) => {}
            }
        }
        let c = run(&rev);
        let placed = |s: &ClusterState| -> Vec<(String, String)> {
            s.vms.values().map(|v| (v.id.clone(), v.node.clone())).collect()
        };
        prop_assert_eq!(placed(&a), placed(&c));
    }
}

#[test]
fn placement_is_checked_and_round_trips() {
    use cell0_proto::grpc;
    let base = |p: grpc::Placement| grpc::VmSpec {
        name: "p".into(),
        placement: Some(p),
        ..Default::default()
    };
    let field = |p: grpc::Placement| VmSpec::from_proto(base(p), "x").unwrap_err().field;
    assert_eq!(
        field(grpc::Placement {
            zones: vec!["eu 1".into()],
            ..Default::default()
        }),
        "spec.placement.zones[0]"
    );
    assert_eq!(
        field(grpc::Placement {
            regions: vec![String::new()],
            ..Default::default()
        }),
        "spec.placement.regions[0]"
    );
    assert_eq!(
        field(grpc::Placement {
            topology: "rack".into(),
            ..Default::default()
        }),
        "spec.placement.topology"
    );
    assert_eq!(
        field(grpc::Placement {
            policy: 7,
            ..Default::default()
        }),
        "spec.placement.policy"
    );
    let mut bad = std::collections::HashMap::new();
    bad.insert("Bad Key".to_string(), "v".to_string());
    assert_eq!(
        field(grpc::Placement {
            anti_affinity: bad,
            ..Default::default()
        }),
        "spec.placement.anti_affinity[\"Bad Key\"]"
    );
    assert_eq!(
        field(grpc::Placement {
            zones: (0..40).map(|i| format!("z{i}")).collect(),
            ..Default::default()
        }),
        "spec.placement.zones"
    );
    let mut sel = std::collections::HashMap::new();
    sel.insert("gpu".to_string(), "a100".to_string());
    let s = VmSpec::from_proto(
        base(grpc::Placement {
            zones: vec!["b".into(), "a".into(), "b".into()],
            node_selector: sel,
            topology: "zone".into(),
            policy: grpc::PlacementPolicy::Spread as i32,
            ..Default::default()
        }),
        "x",
    )
    .unwrap();
    assert_eq!(s.placement.zones, ["a", "b"], "sorted, without duplicates");
    assert_eq!(s.placement.topology, Topology::Zone);
    assert_eq!(s.placement.policy, PlacementPolicy::Spread);
    assert_eq!(VmSpec::from_proto(s.to_proto(), "x").unwrap(), s);
    // No placement: none is sent back.
    let plain = VmSpec::from_proto(grpc::VmSpec::default(), "x").unwrap();
    assert!(plain.to_proto().placement.is_none());
}
