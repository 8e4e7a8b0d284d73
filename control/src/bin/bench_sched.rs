// SPDX-License-Identifier: Apache-2.0
//! `cell0-bench-sched`: the scheduler at scale (issue 7, item 6;
//! docs/PERFORMANCE.md, "Scheduler at scale"). It reports, never judges.
//!
//! In-process, on a temporary data dir:
//!
//! 1. a real one-member Raft store ([`cell0_control::store::Store`]: openraft,
//!    the redb log fsynced on each write, snapshots every 1000 entries) — or,
//!    with `--direct`, a bare [`ClusterState`] and its `apply`;
//! 2. `--nodes` node agents as tokio tasks that run no VMs: each registers its
//!    node (zones `z-0`…, regions by pairs of zones, every fifth node labelled
//!    `gpu=yes`) through a Raft write, then follows the applied changes and
//!    counts the VMs placed on it;
//! 3. `--vms` VM creations, one at a time, with a seeded mix of sizes and
//!    constraints (a zone, a node selector, anti-affinity groups, spread).
//!    Each one is first decided on the current state with
//!    [`sched::place`] (timed: the scheduling decision latency) and then
//!    committed with `CreateVm` (timed: commit latency, which includes the
//!    fsync and the apply that decides again); the two decisions must agree;
//! 4. the node with the most VMs is lost: `SetNodeState down` re-places its
//!    restartable VMs in one Raft command. Timed: the evacuation decision
//!    alone (on a copy of the state), the commit, and until every node agent
//!    that got a VM has seen it.
#![allow(clippy::print_stdout)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use cell0_control::metrics::Metrics;
use cell0_control::sched;
use cell0_control::spec::{RestartPolicy, VmSpec};
use cell0_control::store::state::{NodeRecord, NodeState, Resources};
use cell0_control::store::{Bootstrap, ClusterState, Command, Store, StoreConfig};
use cell0_proto::grpc;
use clap::Parser;
use serde_json::json;

#[derive(Parser)]
#[command(
    name = "cell0-bench-sched",
    about = "Scheduler at scale: N node agents (tasks), M placements through Raft, one lost node"
)]
struct Args {
    /// Node agents.
    #[arg(long, default_value_t = 100)]
    nodes: usize,
    /// Zones the nodes are spread over.
    #[arg(long, default_value_t = 4)]
    zones: usize,
    /// VM placements.
    #[arg(long, default_value_t = 10_000)]
    vms: usize,
    /// vCPUs per node (overcommit 4).
    #[arg(long, default_value_t = 128)]
    node_vcpus: u32,
    /// Memory per node in MiB (no overcommit).
    #[arg(long, default_value_t = 262_144)]
    node_memory_mib: u64,
    /// Seed of the VM mix.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Apply to a bare ClusterState instead of through Raft.
    #[arg(long)]
    direct: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// xorshift64*: a seeded, reproducible mix.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn node(a: &Args, i: usize) -> NodeRecord {
    let zone = i % a.zones.max(1);
    let mut labels = BTreeMap::new();
    if i % 5 == 0 {
        labels.insert("gpu".to_string(), "yes".to_string());
    }
    NodeRecord {
        id: format!("n{i:03}"),
        address: String::new(),
        zone: format!("z-{zone}"),
        region: format!("r-{}", zone / 2),
        capacity: Resources {
            vcpus: a.node_vcpus,
            memory_mib: a.node_memory_mib,
        },
        cpu_overcommit: 4.0,
        memory_overcommit: 1.0,
        state: NodeState::Ready,
        labels,
        drained: false,
    }
}

/// The i-th VM of the mix: 1-4 vCPUs, 256-4096 MiB; 25% pinned to a zone,
/// 5% needing gpu=yes, 10% in anti-affinity groups of 8, 10% spread; half
/// restartable.
fn vm(rng: &mut Rng, a: &Args, i: usize) -> anyhow::Result<VmSpec> {
    let mut p = grpc::Placement::default();
    let mut labels = std::collections::HashMap::new();
    let r = rng.below(100);
    if r < 25 {
        p.zones = vec![format!("z-{}", rng.below(a.zones as u64))];
    } else if r < 30 {
        p.node_selector.insert("gpu".into(), "yes".into());
    } else if r < 40 {
        let g = format!("g{}", i / 80);
        labels.insert("app".to_string(), g.clone());
        p.anti_affinity.insert("app".into(), g);
    }
    if rng.below(10) == 0 {
        p.policy = grpc::PlacementPolicy::Spread as i32;
    }
    let restart = if rng.below(2) == 0 {
        grpc::RestartPolicy::Always
    } else {
        grpc::RestartPolicy::Never
    };
    let spec = grpc::VmSpec {
        name: format!("vm-{i:05}"),
        vcpus: 1 + rng.below(4) as u32,
        memory_mib: 256 << rng.below(5),
        restart_policy: restart as i32,
        labels,
        placement: Some(p),
        ..Default::default()
    };
    VmSpec::from_proto(spec, "x").context("the generated spec")
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// The state behind either backend.
enum Backend {
    Raft(Store),
    Direct(ClusterState, u64),
}

impl Backend {
    fn read<T>(&self, f: impl FnOnce(&ClusterState) -> T) -> T {
        match self {
            Backend::Raft(s) => s.read(f),
            Backend::Direct(s, _) => f(s),
        }
    }

    async fn write(&mut self, cmd: Command) -> anyhow::Result<cell0_control::store::Applied> {
        match self {
            Backend::Raft(s) => Ok(s.write(cmd).await.map(|(_, a)| a)?),
            Backend::Direct(s, i) => {
                *i += 1;
                let a = s.apply(*i, &cmd);
                match &a.rejected {
                    Some(r) => Err(anyhow::anyhow!("{r}")),
                    None => Ok(a),
                }
            }
        }
    }
}

/// A node agent that runs no VMs: it follows the applied changes and keeps
/// the count of VMs placed on it.
fn spawn_agent(store: Store, id: String, seen: Arc<AtomicU64>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut events = store.subscribe();
        loop {
            match events.recv().await {
                Ok(ev) if ev.kind == "created" => {
                    if ev.vm.is_some_and(|v| v.node == id) {
                        seen.fetch_add(1, Ordering::Relaxed);
                    }
                }
                // A node command (drain, node down) moves VMs; a lagged
                // receiver missed some: count again from the state.
                Ok(ev) if ev.kind == "node" => {
                    let n = store.read(|s| s.vms.values().filter(|v| v.node == id).count());
                    seen.store(n as u64, Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    let n = store.read(|s| s.vms.values().filter(|v| v.node == id).count());
                    seen.store(n as u64, Ordering::Relaxed);
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    if a.nodes == 0 || a.zones == 0 {
        bail!("--nodes and --zones must be at least 1");
    }
    let dir = tempfile::Builder::new()
        .prefix("c0sched")
        .tempdir_in("/tmp")?;
    let mut backend = if a.direct {
        Backend::Direct(ClusterState::default(), 0)
    } else {
        let store = Store::open(
            dir.path(),
            StoreConfig {
                node_id: 1,
                addr: "127.0.0.1:1".into(),
                snapshot_every: cell0_control::store::SNAPSHOT_EVERY,
                bootstrap: Bootstrap::Init(BTreeMap::new()),
                tls: None,
            },
            Arc::new(Metrics::new()),
        )
        .await?;
        store.wait_leader(Some(Duration::from_secs(30))).await?;
        Backend::Raft(store)
    };

    // Node agents register (concurrently, through Raft).
    let t_reg = Instant::now();
    let mut seen: BTreeMap<String, Arc<AtomicU64>> = BTreeMap::new();
    let mut agents = Vec::new();
    match &mut backend {
        Backend::Raft(store) => {
            let mut regs = Vec::new();
            for i in 0..a.nodes {
                let n = node(&a, i);
                let c = Arc::new(AtomicU64::new(0));
                agents.push(spawn_agent(store.clone(), n.id.clone(), c.clone()));
                seen.insert(n.id.clone(), c);
                let s = store.clone();
                regs.push(tokio::spawn(async move {
                    s.write(Command::PutNode { node: n }).await
                }));
            }
            for r in regs {
                r.await??;
            }
        }
        Backend::Direct(..) => {
            for i in 0..a.nodes {
                backend
                    .write(Command::PutNode { node: node(&a, i) })
                    .await?;
            }
        }
    }
    let register_ms = t_reg.elapsed().as_secs_f64() * 1e3;

    // Placements.
    let mut rng = Rng(a.seed | 1);
    let mut decide = Vec::with_capacity(a.vms);
    let mut commit = Vec::with_capacity(a.vms);
    let (mut placed, mut refused, mut disagree) = (0u64, 0u64, 0u64);
    let mut refusals: BTreeMap<String, u64> = BTreeMap::new();
    let t_all = Instant::now();
    for i in 0..a.vms {
        let spec = vm(&mut rng, &a, i)?;
        let t0 = Instant::now();
        let predicted = backend.read(|s| sched::place(s, &spec, None));
        decide.push(us(t0.elapsed()));
        let t1 = Instant::now();
        let r = backend
            .write(Command::CreateVm {
                spec,
                created_at_ms: i as u64,
            })
            .await;
        commit.push(us(t1.elapsed()));
        match (r, predicted) {
            (Ok(applied), Ok(want)) => {
                placed += 1;
                if applied.vm.map(|v| v.node) != Some(want) {
                    disagree += 1;
                }
            }
            (Err(e), Err(_)) => {
                refused += 1;
                let msg = e.to_string();
                // "no node with 2 vCPUs and 512 MiB free in zone z-1 (…)":
                // grouped by the constraint part.
                let head = msg.split(" (").next().unwrap_or(&msg);
                let kind = match head.split_once(" free") {
                    Some((_, rest)) => format!("no node with room{rest}"),
                    None => head.to_string(),
                };
                *refusals.entry(kind).or_default() += 1;
            }
            _ => disagree += 1,
        }
    }
    let place_s = t_all.elapsed().as_secs_f64();

    // Lose the node with the most VMs.
    let (victim, on_victim, restartable) = backend.read(|s| {
        let mut count: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
        for v in s.vms.values() {
            let e = count.entry(v.node.as_str()).or_default();
            e.0 += 1;
            if v.spec.restart != RestartPolicy::Never {
                e.1 += 1;
            }
        }
        let (id, (n, r)) = count
            .into_iter()
            .max_by(|x, y| x.1.0.cmp(&y.1.0).then(y.0.cmp(x.0)))
            .unwrap_or(("", (0, 0)));
        (id.to_string(), n, r)
    });
    if victim.is_empty() {
        bail!("no VM was placed");
    }
    // The decision alone, on a copy.
    let mut copy = backend.read(Clone::clone);
    if let Some(n) = copy.nodes.get_mut(&victim) {
        n.state = NodeState::Down;
    }
    let t0 = Instant::now();
    let ev = sched::evacuate(&mut copy, &victim, u64::MAX);
    let evac_decide_ms = t0.elapsed().as_secs_f64() * 1e3;
    let expect: BTreeMap<String, usize> = {
        let mut m = BTreeMap::new();
        for v in copy.vms.values() {
            *m.entry(v.node.clone()).or_insert(0) += 1;
        }
        m
    };
    drop(copy);
    let t1 = Instant::now();
    let applied = backend
        .write(Command::SetNodeState {
            id: victim.clone(),
            state: NodeState::Down,
        })
        .await?;
    let evac_commit_ms = t1.elapsed().as_secs_f64() * 1e3;
    let got = applied.evacuation.unwrap_or_default();
    if got != ev {
        disagree += 1;
    }
    // Until every agent that got a VM has seen it.
    let mut evac_seen_ms = None;
    if matches!(backend, Backend::Raft(_)) {
        let receivers: Vec<&String> = got.moved.iter().map(|m| &m.to).collect();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let all = receivers.iter().all(|n| {
                seen.get(*n).map(|c| c.load(Ordering::Relaxed) as usize) == expect.get(*n).copied()
            });
            if all {
                evac_seen_ms = Some(t1.elapsed().as_secs_f64() * 1e3);
                break;
            }
            if Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
    }
    let vms_after = backend.read(|s| s.vms.len());
    for h in agents {
        h.abort();
    }
    if let Backend::Raft(s) = &backend {
        s.shutdown().await;
    }

    // The decisions made with 9,000+ VMs already placed (the cost grows with
    // the VM count: one pass over the VMs per decision).
    let mut tail_decide = decide[decide.len().saturating_sub(1000)..].to_vec();
    let (t50, t99) = (pct(&mut tail_decide, 0.5), pct(&mut tail_decide, 0.99));
    let (d50, d99, dmax) = (
        pct(&mut decide, 0.5),
        pct(&mut decide, 0.99),
        pct(&mut decide, 1.0),
    );
    let (c50, c99) = (pct(&mut commit, 0.5), pct(&mut commit, 0.99));
    let out = json!({
        "backend": if a.direct { "direct apply (no Raft)" } else { "one-member openraft store, redb log fsynced per write" },
        "nodes": a.nodes, "zones": a.zones, "vms_asked": a.vms, "seed": a.seed,
        "register_nodes_ms": register_ms,
        "placed": placed, "refused": refused, "refusals": refusals,
        "decisions_disagreeing_with_apply": disagree,
        "decision_us": {"p50": d50, "p99": d99, "max": dmax},
        "decision_us_last_1000": {"p50": t50, "p99": t99},
        "commit_us": {"p50": c50, "p99": c99},
        "placements_per_s": a.vms as f64 / place_s,
        "lost_node": {
            "node": victim, "vms": on_victim, "restartable": restartable,
            "moved": got.moved.len(), "stayed": got.stayed.len(),
            "decision_ms": evac_decide_ms, "commit_ms": evac_commit_ms,
            "all_agents_saw_ms": evac_seen_ms,
        },
        "vms_after": vms_after,
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "{} nodes in {} zones, {} placements ({}): {placed} placed, {refused} refused",
            a.nodes,
            a.zones,
            a.vms,
            out["backend"].as_str().unwrap_or("")
        );
        for (k, n) in &refusals {
            println!("  {n} x {k}");
        }
        println!(
            "node registration: {register_ms:.1} ms for {} nodes",
            a.nodes
        );
        println!("scheduling decision: p50 {d50:.1} us, p99 {d99:.1} us, max {dmax:.1} us");
        println!("  the last 1000 decisions: p50 {t50:.1} us, p99 {t99:.1} us");
        println!(
            "commit (write -> applied): p50 {c50:.1} us, p99 {c99:.1} us; {:.0} placements/s",
            a.vms as f64 / place_s
        );
        println!(
            "lost node {victim} ({on_victim} VMs, {restartable} restartable): {} moved, {} stayed; \
             decision {evac_decide_ms:.2} ms, commit {evac_commit_ms:.2} ms, all agents saw it {}",
            got.moved.len(),
            got.stayed.len(),
            evac_seen_ms.map_or("n/a".to_string(), |m| format!("{m:.2} ms"))
        );
        println!("decisions that disagreed with the applied one: {disagree}");
    }
    if disagree > 0 {
        bail!("{disagree} decisions differed between the scheduler and the state machine");
    }
    Ok(())
}
