// SPDX-License-Identifier: Apache-2.0
//! The members' own nodes in a multi-member cluster, and drains as handoffs
//! (issue 7 items 3 and 4), with real processes: three `cell0d serve`
//! members (`--init --peers`), each running real nano VMs through
//! `cell0-vmm` on its own node `m1`..`m3`.
//!
//! - A member host dies (its cell0d and its VMMs SIGKILLed): the leader marks
//!   its node suspect, then down; its restartable VMs run on the other
//!   members' nodes (the time from the kill is printed), its `never` VM is
//!   lost, and no VM ever has a live VMM on two hosts.
//! - A drain is a handoff: at no sampled moment do two hosts run a VMM of
//!   the same VM; `cell0ctl get` shows the wait; every VM ends on another
//!   node (the handoff time is printed).
//! - The leader and a follower show the same runtime status of a VM on a
//!   third member's node.
//! - A removed member's node is marked down and takes no VMs.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod cp_harness;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use cp_harness::{Daemon, LONG_RUNNING, tail};
use serde_json::Value;

fn state(v: &Value) -> &str {
    v["status"]["state"].as_str().unwrap_or("")
}

fn node_of(v: &Value) -> &str {
    v["status"]["node"].as_str().unwrap_or("")
}

struct Cluster {
    /// Members 1, 2, 3 (index = id - 1); member i's node is `m{i+1}`.
    ms: Vec<Daemon>,
}

impl Cluster {
    fn start() -> Cluster {
        let extra = [
            &["--region", "r1"][..],
            &cp_harness::NODE_RESOURCES,
            &[
                "--node-suspect-ms",
                "1500",
                "--node-down-ms",
                "3000",
                // Mutual TLS is cp_tls's; this test is about nodes.
                "--insecure-plaintext",
            ],
        ]
        .concat();
        let (ms, _) = cp_harness::start_members("c0m", &extra, |i| {
            vec!["--zone".into(), format!("z{}", i + 1)]
        });
        let c = Cluster { ms };
        c.wait(60, "the three members' nodes watched and ready", || {
            let ns = c.nodes();
            (1..=3).all(|i| {
                ns.iter().any(|n| {
                    n["id"] == format!("m{i}")
                        && n["state"] == "ready"
                        && n["labels"]["cell0.io/agent"] == "member"
                        && n["labels"]["cell0.io/member"].as_str() == Some(&*i.to_string())
                })
            })
        });
        c
    }

    /// The leader's index, as a live member sees it.
    fn leader(&self) -> Option<usize> {
        cp_harness::leader_id(&self.ms).map(|l| l - 1)
    }

    /// The leader: it holds every node's VM reports.
    fn d(&self) -> &Daemon {
        cp_harness::leader(&self.ms, || self.logs())
    }

    fn nodes(&self) -> Vec<Value> {
        let v: Value =
            serde_json::from_str(&self.d().ctl_ok(&["node", "list", "-o", "json"])).unwrap();
        v.as_array().unwrap().clone()
    }

    fn node_state(&self, name: &str) -> String {
        self.nodes()
            .iter()
            .find(|n| n["id"] == name)
            .map(|n| n["state"].as_str().unwrap_or("").to_string())
            .unwrap_or_default()
    }

    fn logs(&self) -> String {
        cp_harness::member_logs(&self.ms, 2500)
    }

    fn wait(&self, secs: u64, what: &str, f: impl FnMut() -> bool) {
        cp_harness::wait_until(secs, what, || self.logs(), f);
    }

    /// VM id → the members whose host runs a live VMM of it (one scan of
    /// /proc: a VMM's command line names its run dir).
    fn hosts(&self) -> BTreeMap<String, BTreeSet<usize>> {
        let prefixes: Vec<String> = self
            .ms
            .iter()
            .map(|m| format!("{}/node/vms/", m.data().display()))
            .collect();
        cp_harness::vmm_hosts(&prefixes)
    }

    /// Panics if a VM has a live VMM on two hosts.
    fn no_doubles(&self) {
        for (id, hs) in self.hosts() {
            assert!(
                hs.len() <= 1,
                "VM {id} has live VMMs on members {hs:?}\n{}",
                self.logs()
            );
        }
    }

    /// Runs `f` while a second thread checks every 10 ms that no VM has a
    /// live VMM on two hosts; returns what `f` gave and how many samples
    /// were taken. Panics with the first double seen.
    fn sampled<T>(&self, f: impl FnOnce() -> T) -> (T, u64) {
        let stop = std::sync::atomic::AtomicBool::new(false);
        let (r, (n, bad)) = std::thread::scope(|sc| {
            let h = sc.spawn(|| {
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    n += 1;
                    if let Some((id, hs)) = self.hosts().into_iter().find(|(_, h)| h.len() > 1) {
                        return (n, Some(format!("VM {id} has live VMMs on members {hs:?}")));
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                (n, None)
            });
            // Stops the sampler also when `f` panics.
            struct Stop<'a>(&'a std::sync::atomic::AtomicBool);
            impl Drop for Stop<'_> {
                fn drop(&mut self) {
                    self.0.store(true, std::sync::atomic::Ordering::SeqCst);
                }
            }
            let g = Stop(&stop);
            let r = f();
            drop(g);
            (r, h.join().unwrap())
        });
        if let Some(b) = bad {
            panic!("{b}\n{}", self.logs());
        }
        (r, n)
    }

    /// The host of member `i` dies: its cell0d and every VMM it started.
    fn kill_host(&mut self, i: usize) {
        self.ms[i].kill9();
        let needle = format!("{}/node/vms/", self.ms[i].data().display());
        for pid in cp_harness::procs_with(&needle) {
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }

    fn run(&self, name: &str, extra: &[&str]) {
        let mut a = vec![
            "run",
            "--name",
            name,
            "--cmdline",
            LONG_RUNNING,
            "--no-wait",
        ];
        a.extend_from_slice(extra);
        self.d().ctl_ok(&a);
    }
}

#[test]
fn members_nodes_fail_over_drain_as_a_handoff_and_leave_with_their_member() {
    require_vms!();
    let mut c = Cluster::start();
    let ids: Vec<String> = (0..6).map(|i| format!("v{i}")).collect();
    for id in &ids {
        c.run(id, &["--restart", "always", "--spread"]);
    }
    // The victim: a follower (the leader keeps watching). Its `never` VM.
    let l = c.leader().unwrap();
    let victim = (0..3).find(|i| *i != l).unwrap();
    let vnode = format!("m{}", victim + 1);
    c.run("plain", &["--zone", &format!("z{}", victim + 1)]);
    let all: Vec<String> = ids.iter().cloned().chain(["plain".to_string()]).collect();
    c.wait(90, "every VM running", || {
        all.iter().all(|id| state(&c.d().get(id)) == "running")
    });
    for id in &all {
        let v = c.d().get(id);
        let n: usize = node_of(&v)[1..].parse().unwrap();
        assert_eq!(
            c.hosts().get(id).cloned().unwrap_or_default(),
            BTreeSet::from([n - 1]),
            "{id} runs on its node's host only: {v:#}"
        );
    }

    // (a) The victim's host dies.
    let on_victim: Vec<String> = ids
        .iter()
        .filter(|id| node_of(&c.d().get(id)) == vnode)
        .cloned()
        .collect();
    assert!(!on_victim.is_empty(), "spread put VMs on {vnode}");
    println!(
        "member {} ({vnode}) runs {on_victim:?} and plain",
        victim + 1
    );
    let t_kill = Instant::now();
    c.kill_host(victim);
    let mut saw_suspect = false;
    let mut recovered = None;
    let ((), samples) = c.sampled(|| {
        c.wait(
            60,
            "the dead member's restartable VMs running elsewhere",
            || {
                saw_suspect |= c.node_state(&vnode) == "suspect";
                let done = on_victim.iter().all(|id| {
                    let v = c.d().get(id);
                    state(&v) == "running" && node_of(&v) != vnode
                });
                if done && recovered.is_none() {
                    recovered = Some(t_kill.elapsed());
                }
                done
            },
        )
    });
    println!(
        "member host SIGKILLed -> its {} restartable VMs running on the other members' nodes in {} ms \
         (suspect 1.5 s, down 3 s, heartbeat 0.5 s); {samples} process samples, no VM on two hosts",
        on_victim.len(),
        recovered.unwrap().as_millis()
    );
    assert_eq!(c.node_state(&vnode), "down");
    assert!(saw_suspect, "{vnode} went through suspect before down");
    let plain = c.d().get("plain");
    cp_harness::assert_lost(&plain, &vnode);
    // The member comes back: its node registers again, ready and empty.
    c.ms[victim].spawn();
    c.wait(30, "the restarted member's node ready", || {
        c.node_state(&vnode) == "ready"
    });
    std::thread::sleep(Duration::from_millis(1000));
    assert!(
        c.hosts().values().all(|h| !h.contains(&victim)),
        "{vnode} runs nothing after coming back"
    );
    c.no_doubles();

    // (b) A drain is a handoff. Drain the node that runs the most VMs,
    // through a member that is not the leader.
    let placed = |c: &Cluster| -> BTreeMap<String, String> {
        ids.iter()
            .map(|id| (id.clone(), node_of(&c.d().get(id)).to_string()))
            .collect()
    };
    let before = placed(&c);
    let mut count: BTreeMap<&str, usize> = BTreeMap::new();
    for n in before.values() {
        *count.entry(n).or_default() += 1;
    }
    let drained = count
        .iter()
        .max_by_key(|(n, k)| (**k, std::cmp::Reverse(**n)))
        .map(|(n, _)| n.to_string())
        .unwrap();
    let moving: Vec<String> = before
        .iter()
        .filter(|(_, n)| **n == drained)
        .map(|(id, _)| id.clone())
        .collect();
    let via = (0..3).find(|i| Some(*i) != c.leader()).unwrap();
    let t_drain = Instant::now();
    let out = c.ms[via].ctl_ok(&["node", "drain", &drained]);
    println!("drain {drained} ({moving:?}):\n{out}");
    let mut waited = BTreeSet::new();
    let mut done_at = None;
    let ((), samples) = c.sampled(|| {
        c.wait(60, "every drained VM running on another node", || {
            let mut done = true;
            for id in &moving {
                let v = c.d().get(id);
                if v["status"]["message"]
                    .as_str()
                    .unwrap_or("")
                    .contains(&format!("waiting for {drained} to stop it (handoff)"))
                {
                    waited.insert(id.clone());
                }
                done &= state(&v) == "running" && node_of(&v) != drained;
            }
            if done && done_at.is_none() {
                done_at = Some(t_drain.elapsed());
            }
            done
        })
    });
    println!(
        "drain handoff: {} VMs off {drained} -> running on other nodes in {} ms; {samples} process samples, \
         never two hosts with a VMM of one VM; get showed the handoff wait for {waited:?}",
        moving.len(),
        done_at.unwrap().as_millis()
    );
    assert!(
        !waited.is_empty(),
        "cell0ctl get never showed a drained VM waiting for its handoff"
    );
    let di: usize = drained[1..].parse::<usize>().unwrap() - 1;
    c.wait(10, "the drained node runs no VMM", || {
        c.hosts().values().all(|h| !h.contains(&di))
    });
    c.no_doubles();

    // (c) The leader and a follower report the same runtime status of a VM
    // on a third member's node.
    let l = c.leader().unwrap();
    let (vm, owner) = ids
        .iter()
        .map(|id| (id.clone(), node_of(&c.d().get(id)).to_string()))
        .find(|(_, n)| *n != format!("m{}", l + 1))
        .expect("a VM on a follower's node");
    let oi: usize = owner[1..].parse::<usize>().unwrap() - 1;
    let f = (0..3).find(|i| *i != l && *i != oi).unwrap();
    let (a, b) = (c.ms[l].get(&vm), c.ms[f].get(&vm));
    let key = |v: &Value| {
        (
            state(v).to_string(),
            node_of(v).to_string(),
            v["status"]["pid"].clone(),
        )
    };
    println!(
        "{vm} on {owner}: leader m{} says {:?}, follower m{} says {:?}",
        l + 1,
        key(&a),
        f + 1,
        key(&b)
    );
    assert_eq!(key(&a).0, "running", "{a:#}");
    assert_eq!(key(&a), key(&b), "leader {a:#}\nfollower {b:#}");

    // Watch on a member tells of the VMs placed on its own node (the events
    // of the replicated state, passed to its agent).
    let w = (0..3).find(|i| *i != di).unwrap();
    let wnode = format!("m{}", w + 1);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let kinds = rt.block_on(async {
        let mut cl = c.ms[w].client().await;
        let mut s = cl
            .vm
            .watch(cell0_proto::grpc::WatchRequest { id: String::new() })
            .await
            .unwrap()
            .into_inner();
        c.run("ev", &["--zone", &format!("z{}", w + 1)]);
        let mut kinds = Vec::new();
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(20) {
            let next = tokio::time::timeout(Duration::from_secs(1), s.message()).await;
            if let Ok(Ok(Some(ev))) = next {
                if ev.vm_id != "ev" {
                    continue;
                }
                kinds.push((ev.kind.clone(), ev.message.clone()));
                if ev.kind == "created" {
                    break;
                }
            }
        }
        kinds
    });
    println!("watch on {wnode}: {kinds:?}");
    assert!(
        kinds
            .iter()
            .any(|(k, m)| k == "created" && *m == format!("placed on node {wnode}")),
        "{kinds:?}"
    );
    c.d().ctl_ok(&["rm", "ev"]);

    // (d) A removed member's node takes no VMs: it is drained in the same
    // call, and its VMs are handed off. Its heartbeats are refused now: it
    // terminates its VMs and goes silent, its node goes down, and the VMs
    // run on the two members left; never on two hosts at once.
    let gone = (0..3).find(|i| *i != l).unwrap();
    let gnode = format!("m{}", gone + 1);
    let moving: Vec<String> = ids
        .iter()
        .filter(|id| node_of(&c.d().get(id)) == gnode)
        .cloned()
        .collect();
    let t_rm = Instant::now();
    let mut fenced = None;
    let ((), samples) = c.sampled(|| {
        c.d()
            .ctl_ok(&["cluster", "remove", &(gone + 1).to_string()]);
        let n = c.nodes().into_iter().find(|n| n["id"] == gnode).unwrap();
        assert_eq!(n["drained"], true, "drained in the same call: {n:#}");
        c.wait(30, "the removed member's node down", || {
            if fenced.is_none() && c.hosts().values().all(|h| !h.contains(&gone)) {
                fenced = Some(t_rm.elapsed());
            }
            c.node_state(&gnode) == "down"
        });
        c.run("after", &["--restart", "always", "--spread"]);
        c.wait(60, "every VM running on the two members left", || {
            ids.iter()
                .chain(std::iter::once(&"after".to_string()))
                .all(|id| {
                    let v = c.d().get(id);
                    state(&v) == "running" && node_of(&v) != gnode
                })
        });
    });
    println!(
        "member {} removed: its host ran no VMM after {:?} ms, its VMs {moving:?} and a new one \
         running on the others after {} ms; {samples} process samples, no VM on two hosts",
        gone + 1,
        fenced.map(|d| d.as_millis()),
        t_rm.elapsed().as_millis()
    );
    assert!(
        c.ms[gone].log().contains("was removed from the cluster"),
        "{}",
        tail(&c.ms[gone].log(), 3000)
    );
    assert!(c.hosts().values().all(|h| !h.contains(&gone)));
    c.ms[gone].kill9();
    for id in ids
        .iter()
        .chain(["after".to_string(), "plain".to_string()].iter())
    {
        c.d().ctl_ok(&["rm", id]);
    }
    c.wait(30, "every VMM gone after rm", || c.hosts().is_empty());
}
