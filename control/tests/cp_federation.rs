// SPDX-License-Identifier: Apache-2.0
//! Node agents on other hosts and failure handling (issue 7 items 2 and 4),
//! with real processes: one `cell0d serve` member (its own node `m1` takes no
//! test VM: every VM selects `role=worker`) and three `cell0d node` agents,
//! each with its own data dir, running real nano VMs through `cell0-vmm`.
//!
//! - A host dies (its agent and its VMMs SIGKILLed): the leader marks it
//!   suspect, then down; its restartable VMs run again on the other nodes
//!   (the time from the kill is printed), its `never` VM is marked lost, and
//!   no VM ever has a live VMM on two nodes.
//! - An agent dies but its host lives: its VMMs, whose lease nobody renews,
//!   end on their own (fencing rule 5) before any of its VMs runs on another
//!   node (the time from the kill to the VMMs' exit is printed); when the
//!   agent comes back it learns it was down and starts nothing stale.
//! - The control plane goes away: every agent terminates its VMs once its
//!   lease ends (self-fencing); when the member is back, they run again.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod cp_harness;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cp_harness::{Daemon, LONG_RUNNING, proc_alive, procs_with, tail};
use serde_json::Value;

/// A `cell0d node` agent process.
struct Node {
    name: String,
    dir: PathBuf,
    child: Option<Child>,
    args: Vec<String>,
}

impl Node {
    fn start(base: &Path, name: &str, zone: &str, join: &str) -> Node {
        let dir = base.join(name);
        let labels = format!("role=worker,host={name}");
        let args = cp_harness::node_args(name, join, zone, &labels, &dir, None);
        let mut n = Node {
            name: name.into(),
            dir,
            child: None,
            args,
        };
        n.spawn();
        n
    }

    fn log_path(&self) -> PathBuf {
        self.dir.with_extension("log")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn spawn(&mut self) {
        let mut c = cp_harness::node_command(&self.args, &self.log_path());
        self.child = Some(c.spawn().unwrap());
    }

    /// Live VMM processes of VM `id` on this node.
    fn vmm_of(&self, id: &str) -> Vec<i32> {
        procs_with(&format!("{}/node/vms/{id}/", self.dir.display()))
    }

    /// Every live process started for this node's VMs.
    fn vmms(&self) -> Vec<i32> {
        procs_with(&format!("{}/node/vms/", self.dir.display()))
    }

    /// SIGKILLs the agent only (its VMMs, in their own process groups, live on).
    fn kill_agent(&mut self) {
        if let Some(mut c) = self.child.take() {
            cp_harness::kill_group(&mut c);
        }
    }

    /// The host dies: the agent's process group and every VMM it started.
    fn kill_host(&mut self) {
        self.kill_agent();
        cp_harness::kill_procs_with(&format!("{}/node/vms/", self.dir.display()));
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill_host();
    }
}

fn state(v: &Value) -> &str {
    v["status"]["state"].as_str().unwrap_or("")
}

fn node_of(v: &Value) -> &str {
    v["status"]["node"].as_str().unwrap_or("")
}

fn node_list(d: &Daemon) -> Vec<Value> {
    let v: Value = serde_json::from_str(&d.ctl_ok(&["node", "list", "-o", "json"])).unwrap();
    v.as_array().unwrap().clone()
}

fn node_state(d: &Daemon, name: &str) -> String {
    node_list(d)
        .iter()
        .find(|n| n["id"] == name)
        .map(|n| n["state"].as_str().unwrap_or("").to_string())
        .unwrap_or_default()
}

struct Cluster {
    /// Members 1, 2, 3 (index = id - 1).
    ms: Vec<Daemon>,
    base: tempfile::TempDir,
    nodes: Vec<Node>,
}

impl Cluster {
    /// Three members (`--init --peers`, each with its own node `mI` that no
    /// test VM selects) and three node agents joined to all of them.
    fn start() -> Cluster {
        let (ms, addrs) = cp_harness::start_members(
            "c0t",
            &[
                "--node-suspect-ms",
                "1500",
                "--node-down-ms",
                "3000",
                // Admission by attestation is cp_tls's; here the nodes are
                // trusted so the test is about placement and failure.
                "--allow-unattested-nodes",
                "--insecure-plaintext",
            ],
            |_| Vec::new(),
        );
        let base = tempfile::Builder::new()
            .prefix("c0f")
            .tempdir_in("/tmp")
            .unwrap();
        let join = addrs.join(",");
        let nodes = ["n1", "n2", "n3"]
            .iter()
            .zip(["a", "b", "c"])
            .map(|(n, z)| Node::start(base.path(), n, z, &join))
            .collect();
        let c = Cluster { ms, base, nodes };
        c.wait(60, "three node agents registered and ready", || {
            let ns = node_list(c.d());
            ["n1", "n2", "n3"].iter().all(|n| {
                ns.iter().any(|x| {
                    x["id"] == *n && x["state"] == "ready" && x["labels"]["role"] == "worker"
                })
            })
        });
        c
    }

    /// The leader's id, as a live member sees it.
    fn leader_id(&self) -> Option<usize> {
        cp_harness::leader_id(&self.ms)
    }

    /// The leader: it holds the node agents' VM reports, so Get there shows
    /// the runtime status of VMs on other hosts.
    fn d(&self) -> &Daemon {
        cp_harness::leader(&self.ms, || self.logs())
    }

    fn logs(&self) -> String {
        let mut s = cp_harness::member_logs(&self.ms, 2000);
        for n in &self.nodes {
            s.push_str(&format!("--- {}:\n{}\n", n.name, tail(&n.log(), 2000)));
        }
        s
    }

    fn wait(&self, secs: u64, what: &str, f: impl FnMut() -> bool) {
        cp_harness::wait_until(secs, what, || self.logs(), f);
    }

    fn node(&self, name: &str) -> &Node {
        self.nodes.iter().find(|n| n.name == name).unwrap()
    }

    fn run(&self, name: &str, extra: &[&str]) {
        self.run_on(self.d(), name, extra);
    }

    fn run_on(&self, m: &Daemon, name: &str, extra: &[&str]) {
        let mut a = vec![
            "run",
            "--name",
            name,
            "--cmdline",
            LONG_RUNNING,
            "--node-selector",
            "role=worker",
            "--no-wait",
        ];
        a.extend_from_slice(extra);
        m.ctl_ok(&a);
    }

    /// VM ids with a live VMM on more than one node.
    fn doubles(&self, ids: &[String]) -> Vec<String> {
        ids.iter()
            .filter(|id| {
                self.nodes
                    .iter()
                    .filter(|n| !n.vmm_of(id).is_empty())
                    .count()
                    > 1
            })
            .cloned()
            .collect()
    }
}

#[test]
fn node_agents_on_other_hosts_recover_a_lost_host_and_fence() {
    require_vms!();
    let c = Cluster::start();
    let mut c = c;
    // Six restartable VMs spread over the three nodes, and one `never` VM on n1.
    let ids: Vec<String> = (0..6).map(|i| format!("v{i}")).collect();
    // A member's own node name is not an agent's to take: it exits.
    let dir = c.base.path().join("m1-taken");
    let mut taken = Command::new(env!("CARGO_BIN_EXE_cell0d"))
        .args([
            "node",
            "--insecure-plaintext",
            "--join",
            &c.d().grpc,
            "--node-name",
            "m1",
            "--no-jail",
        ])
        .arg("--data-dir")
        .arg(&dir)
        .args(["--vmm", "/bin/true"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let st = loop {
        if let Some(st) = taken.try_wait().unwrap() {
            break st;
        }
        if t0.elapsed() > Duration::from_secs(30) {
            let _ = taken.kill();
            panic!("cell0d node --node-name m1 did not exit within 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut taken.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!st.success(), "{err}");
    assert!(err.contains("node of a control-plane member"), "{err}");

    // Federation sync: a create through each member in turn (followers
    // forward it), until the node agent it was placed on has its run dir.
    let mut sync = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let t = Instant::now();
        c.run_on(&c.ms[i % 3], id, &["--restart", "always", "--spread"]);
        c.wait(30, &format!("a node agent saw {id}"), || {
            c.nodes
                .iter()
                .any(|n| n.dir.join("node/vms").join(id).exists())
        });
        sync.push(t.elapsed().as_millis());
    }
    sync.sort_unstable();
    println!(
        "federation sync: cell0ctl run through a member -> the node agent has the VM's run dir: {sync:?} ms (heartbeat 0.5 s)"
    );
    c.run("plain", &["--node-selector", "host=n1"]);
    let all: Vec<String> = ids.iter().cloned().chain(["plain".to_string()]).collect();
    c.wait(90, "every VM running", || {
        all.iter().all(|id| state(&c.d().get(id)) == "running")
    });
    for id in &all {
        let v = c.d().get(id);
        let n = node_of(&v).to_string();
        assert!(n.starts_with('n'), "{id} placed on a worker: {v:#}");
        assert_eq!(c.node(&n).vmm_of(id).len().min(1), 1, "{id} runs on {n}");
    }
    assert!(c.doubles(&all).is_empty());

    // 1. Host n1 dies: agent and VMMs.
    let on_n1: Vec<String> = ids
        .iter()
        .filter(|id| node_of(&c.d().get(id)) == "n1")
        .cloned()
        .collect();
    println!("n1 runs {on_n1:?} and plain");
    let t_kill = Instant::now();
    c.nodes[0].kill_host();
    let mut saw_suspect = false;
    let mut recovered = None;
    c.wait(60, "n1's restartable VMs running on other nodes", || {
        assert!(c.doubles(&all).is_empty(), "a VM runs on two nodes");
        saw_suspect |= node_state(c.d(), "n1") == "suspect";
        let done = on_n1.iter().all(|id| {
            let v = c.d().get(id);
            state(&v) == "running" && node_of(&v) != "n1"
        });
        if done && recovered.is_none() {
            recovered = Some(t_kill.elapsed());
        }
        done
    });
    let rec = recovered.unwrap();
    println!(
        "recovery: n1 SIGKILLed -> its {} restartable VMs running on other nodes in {} ms (suspect 1.5 s, down 3 s, heartbeat 0.5 s)",
        on_n1.len(),
        rec.as_millis()
    );
    assert_eq!(node_state(c.d(), "n1"), "down");
    assert!(saw_suspect, "n1 went through suspect before down");
    let plain = c.d().get("plain");
    cp_harness::assert_lost(&plain, "n1");
    assert_eq!(plain["desired"], "stopped");
    // Each moved VM runs on exactly one node, under a new epoch.
    for id in &on_n1 {
        let v = c.d().get(id);
        let n = node_of(&v).to_string();
        assert!(!c.node(&n).vmm_of(id).is_empty(), "{id} has a VMM on {n}");
    }
    assert!(c.doubles(&all).is_empty());

    // n1 comes back (empty host): it registers again and is ready; nothing
    // it ran starts there again.
    c.nodes[0].spawn();
    c.wait(30, "n1 ready again", || node_state(c.d(), "n1") == "ready");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(c.node("n1").vmms().is_empty(), "n1 runs nothing");

    // An agent restarted at once (well within the deadlines) re-adopts its
    // running VMMs: same pids, same placements.
    let on_n3: Vec<(String, Vec<i32>)> = ids
        .iter()
        .filter(|id| node_of(&c.d().get(id)) == "n3")
        .map(|id| (id.clone(), c.node("n3").vmm_of(id)))
        .collect();
    assert!(!on_n3.is_empty(), "VMs run on n3");
    let adopted = |c: &Cluster| {
        c.node("n3")
            .log()
            .matches("re-adopted a running cell0-vmm")
            .count()
    };
    let before = adopted(&c);
    c.nodes[2].kill_agent();
    c.nodes[2].spawn();
    c.wait(30, "n3's agent re-adopted its VMMs", || {
        adopted(&c) >= before + on_n3.len()
    });
    std::thread::sleep(Duration::from_millis(1000));
    for (id, pids) in &on_n3 {
        let v = c.d().get(id);
        assert_eq!((state(&v), node_of(&v)), ("running", "n3"), "{v:#}");
        assert_eq!(&c.node("n3").vmm_of(id), pids, "{id} kept its VMM");
    }
    assert_eq!(node_state(c.d(), "n3"), "ready");

    // 2. Only n2's agent dies; its host lives. Nobody renews its VMMs'
    // leases: they end on their own (exit 3, "lease expired: fenced")
    // before the leader marks n2 down, so before any of its VMs runs on
    // another node, which the loop checks by process presence.
    let on_n2: Vec<String> = ids
        .iter()
        .filter(|id| node_of(&c.d().get(id)) == "n2")
        .cloned()
        .collect();
    assert!(!on_n2.is_empty(), "spread put VMs on n2");
    let stale: Vec<i32> = on_n2
        .iter()
        .flat_map(|id| c.node("n2").vmm_of(id))
        .collect();
    assert!(!stale.is_empty());
    let t_agent = Instant::now();
    c.nodes[1].kill_agent();
    let mut vmms_gone = None;
    let mut moved = None;
    c.wait(60, "n2's VMs running elsewhere", || {
        // Process presence elsewhere first, then n2's: an overlap seen is real.
        let elsewhere: Vec<&String> = on_n2
            .iter()
            .filter(|id| {
                c.nodes
                    .iter()
                    .any(|n| n.name != "n2" && !n.vmm_of(id).is_empty())
            })
            .collect();
        let alive: Vec<i32> = stale.iter().copied().filter(|p| proc_alive(*p)).collect();
        assert!(
            elsewhere.is_empty() || alive.is_empty(),
            "{elsewhere:?} run on another node while n2's VMMs {alive:?} still run"
        );
        if !alive.is_empty() {
            // Poll fast (no cell0ctl) until they are gone, for the time.
            return false;
        }
        if vmms_gone.is_none() {
            vmms_gone = Some(t_agent.elapsed());
        }
        let done = on_n2.iter().all(|id| {
            let v = c.d().get(id);
            state(&v) == "running" && node_of(&v) != "n2"
        });
        if done && moved.is_none() {
            moved = Some(t_agent.elapsed());
        }
        done
    });
    let (vmms_gone, moved) = (vmms_gone.unwrap(), moved.unwrap());
    println!(
        "dead agent: n2's agent SIGKILLed (host alive) -> the VMMs of its {} VMs ({} processes) \
         exited (lease expired) in {} ms; its VMs running on other nodes in {} ms (lease 2 s, down 3 s)",
        on_n2.len(),
        stale.len(),
        vmms_gone.as_millis(),
        moved.as_millis()
    );
    assert_eq!(node_state(c.d(), "n2"), "down");
    for id in &on_n2 {
        let log =
            std::fs::read_to_string(c.node("n2").dir.join("node/vms").join(id).join("vmm.log"))
                .unwrap_or_default();
        assert!(
            log.contains("lease expired: fenced"),
            "{id}'s VMM on n2: {log}"
        );
    }
    // The agent comes back: it learns it was down and starts nothing stale.
    c.nodes[1].spawn();
    c.wait(30, "n2's stale VMMs terminated", || {
        stale.iter().all(|p| !proc_alive(*p)) && c.node("n2").vmms().is_empty()
    });
    c.wait(30, "n2 ready again", || node_state(c.d(), "n2") == "ready");
    assert!(c.doubles(&all).is_empty());
    for id in &on_n2 {
        let v = c.d().get(id);
        assert_eq!(state(&v), "running", "{v:#}");
        assert_ne!(node_of(&v), "n2");
    }

    // 3. The leader dies: the agents find the new one. A failover longer
    // than an agent's lease makes it fence itself (safe, but its VMs restart).
    let fenced = |c: &Cluster| -> usize {
        c.nodes
            .iter()
            .map(|n| n.log().matches("fencing: terminating").count())
            .sum()
    };
    let before = fenced(&c);
    let old = c.leader_id().unwrap();
    let t_l = Instant::now();
    c.ms[old - 1].kill9();
    c.wait(60, "every VM running after the leader died", || {
        assert!(c.doubles(&all).is_empty(), "a VM runs on two nodes");
        ids.iter().all(|id| state(&c.d().get(id)) == "running")
            && c.leader_id().is_some_and(|l| l != old)
    });
    println!(
        "leader failover: member {old} SIGKILLed -> new leader {}, every VM reported running in {} ms; \
         agents that fenced themselves meanwhile: {}",
        c.leader_id().unwrap(),
        t_l.elapsed().as_millis(),
        fenced(&c) - before
    );

    for n in &c.nodes {
        for l in n
            .log()
            .lines()
            .filter(|l| l.contains("fencing: terminating"))
        {
            println!(
                "  {}: {}",
                n.name,
                l.rsplit("fencing: ").next().unwrap_or(l)
            );
        }
    }

    // 4. The whole control plane goes away: each agent's lease ends and it
    // terminates its VMs; the members back, they run again where placed.
    let placed: Vec<(String, String)> = ids
        .iter()
        .map(|id| (id.clone(), node_of(&c.d().get(id)).to_string()))
        .collect();
    for m in &mut c.ms {
        m.kill9();
    }
    let t_cp = Instant::now();
    cp_harness::wait_until(
        30,
        "every node self-fenced",
        || c.logs(),
        || c.nodes.iter().all(|n| n.vmms().is_empty()),
    );
    println!(
        "self-fencing: every member SIGKILLed -> every VMM of the three nodes gone in {} ms (lease 2 s)",
        t_cp.elapsed().as_millis()
    );
    // Back on the same addresses, which the agents were given.
    cp_harness::spawn_all(&mut c.ms.iter_mut().collect::<Vec<_>>());
    c.wait(
        90,
        "the VMs running again after the members came back",
        || {
            placed.iter().all(|(id, n)| {
                let v = c.d().get(id);
                state(&v) == "running" && node_of(&v) == n
            })
        },
    );
    assert!(c.doubles(&all).is_empty());
    for (id, _) in &placed {
        c.d().ctl_ok(&["rm", id]);
    }
    c.d().ctl_ok(&["rm", "plain"]);
    c.wait(30, "every VMM gone after rm", || {
        c.nodes.iter().all(|n| n.vmms().is_empty())
    });
    drop(c.base);
}

#[test]
fn node_agent_refuses_bad_arguments() {
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_cell0d"))
            .arg("node")
            .args(args)
            .output()
            .unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    for (args, needle) in [
        (
            vec![
                "--join",
                "127.0.0.1:1",
                "--node-name",
                "Bad Name",
                "--data-dir",
                d,
            ],
            "not a name",
        ),
        (
            vec![
                "--join",
                "127.0.0.1:1",
                "--labels",
                "novalue",
                "--data-dir",
                d,
            ],
            "KEY=VALUE",
        ),
        (
            vec![
                "--join",
                "127.0.0.1:1",
                "--lease-ms",
                "100",
                "--data-dir",
                d,
            ],
            "--lease-ms",
        ),
        (
            vec![
                "--join",
                "127.0.0.1:1",
                "--cpu-overcommit",
                "0.5",
                "--data-dir",
                d,
            ],
            "1.0 or more",
        ),
    ] {
        let o = run(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} was accepted");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}
