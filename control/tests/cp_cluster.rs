// SPDX-License-Identifier: Apache-2.0
//! A multi-member control plane (issue 7): real `cell0d serve` processes on
//! 127.0.0.1 that form a Raft cluster through `cell0ctl cluster add`, take
//! writes through any member, survive a SIGKILLed leader without losing an
//! acknowledged write, catch a stopped member up (by snapshot when the log
//! was compacted), and shrink with `cluster remove`.
//!
//! Each member runs its own node agent with `/bin/true` as the "VMM", so no
//! KVM is needed. Randomness (which member a writer uses, when the leader is
//! killed) comes from a printed seed; set CELL0_TEST_SEED to replay one.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod cp_harness;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cell0_control::ctl::{self, Clients};
use cell0_proto::grpc;
use cp_harness::{Rng, spec, tail, wait_for};
use serde_json::Value;

/// One cluster at a time: three members per test are enough load for a
/// shared two-core machine.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const ARGS: &[&str] = &[
    "--vmm",
    "/bin/true",
    "--cpu-overcommit",
    "100000",
    "--memory-overcommit",
    "100000",
    "--health-ms",
    "3600000",
];

/// A `cell0d serve` member process with its own data dir.
struct Member {
    id: u64,
    base: PathBuf,
    child: Option<Child>,
    /// Its gRPC address (fixed after the first start, so that the address in
    /// the membership stays right across restarts).
    addr: String,
    extra: Vec<String>,
}

impl Member {
    fn data(&self) -> PathBuf {
        self.base.join(format!("m{}", self.id))
    }

    fn log_path(&self) -> PathBuf {
        self.base.join(format!("m{}.log", self.id))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Starts member `id` in `base` with `mode` (`--join`, or nothing to
    /// initialize a one-member cluster) and extra serve arguments.
    fn start(base: &Path, id: u64, mode: &[&str], extra: &[&str]) -> Member {
        Member::start_at(base, id, "", mode, extra)
    }

    /// The same on a given address (empty: any free port).
    fn start_at(base: &Path, id: u64, addr: &str, mode: &[&str], extra: &[&str]) -> Member {
        let mut m = Member {
            id,
            base: base.to_path_buf(),
            child: None,
            addr: addr.to_string(),
            extra: mode.iter().chain(extra).map(|s| s.to_string()).collect(),
        };
        m.spawn();
        m
    }

    /// (Re)starts the process; returns once its Raft service listens.
    fn spawn(&mut self) {
        let data = self.data();
        let _ = std::fs::remove_file(data.join("cell0d.addr"));
        let _ = std::fs::remove_file(data.join("cell0d.member"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let listen = if self.addr.is_empty() {
            "127.0.0.1:0".to_string()
        } else {
            self.addr.clone()
        };
        let child = Command::new(env!("CARGO_BIN_EXE_cell0d"))
            .arg("serve")
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen", &listen, "--metrics", "127.0.0.1:0"])
            .args(["--node-id", &self.id.to_string()])
            .args(["--node-name", &format!("m{}", self.id)])
            .arg("--insecure-plaintext")
            .args(ARGS)
            .args(&self.extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let t0 = Instant::now();
        loop {
            if let Ok(t) = std::fs::read_to_string(data.join("cell0d.member")) {
                if let Ok(v) = serde_json::from_str::<Value>(&t) {
                    self.addr = v["grpc"].as_str().unwrap().to_string();
                    return;
                }
            }
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "member {} exited ({st}) before serving:\n{}",
                    self.id,
                    tail(&self.log(), 4000)
                );
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "member {} did not serve Raft within 60 s:\n{}",
                self.id,
                tail(&self.log(), 4000)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the member's API serves (it knows a leader and its node
    /// agent registered).
    fn wait_api(&self) {
        let t0 = Instant::now();
        while !self.data().join("cell0d.addr").exists() {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "member {}'s API did not come up within 60 s:\n{}",
                self.id,
                tail(&self.log(), 4000)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait (a clean stop).
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let t0 = Instant::now();
            while c.try_wait().unwrap().is_none() {
                if t0.elapsed() > Duration::from_secs(20) {
                    let _ = c.kill();
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    fn ctl(&self, args: &[&str]) -> Output {
        cp_harness::cell0ctl(&self.addr, args)
    }

    fn ctl_ok(&self, args: &[&str]) -> String {
        cp_harness::cell0ctl_ok(
            &self.addr,
            &format!("member {}", self.id),
            || self.log(),
            args,
        )
    }

    async fn client(&self) -> Clients {
        ctl::connect(&self.addr).await.unwrap()
    }

    /// This member's own view of Raft, if it answers.
    async fn status(&self) -> Option<grpc::ClusterStatus> {
        let mut c = ctl::connect(&self.addr).await.ok()?;
        c.cluster
            .status(grpc::ClusterStatusRequest {})
            .await
            .ok()
            .map(|r| r.into_inner())
    }

    /// VM names, read (linearizably) through this member.
    async fn names(&self) -> BTreeSet<String> {
        let mut c = self.client().await;
        c.vm.list(grpc::ListVmsRequest::default())
            .await
            .unwrap_or_else(|e| panic!("List through member {} failed: {e}", self.id))
            .into_inner()
            .vms
            .into_iter()
            .map(|v| v.id)
            .collect()
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("c0c")
        .tempdir_in("/tmp")
        .unwrap()
}

/// Member 1 initializes, 2..=n join through `cell0ctl cluster add` (member 2
/// through member 1, the rest through member 2, a follower, so the change is
/// forwarded to the leader).
async fn form(base: &Path, n: u64, extra: &[&str]) -> Vec<Member> {
    let first = Member::start(base, 1, &["--init"], extra);
    first.wait_api();
    let mut ms = vec![first];
    for id in 2..=n {
        let m = Member::start(base, id, &["--join"], extra);
        let via = if id == 2 { &ms[0] } else { &ms[1] };
        let out = via.ctl_ok(&["cluster", "add", &id.to_string(), &m.addr, "-o", "json"]);
        let v: Value = serde_json::from_str(&out).unwrap();
        let voters: Vec<u64> = v["members"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["voter"] == true)
            .map(|m| m["id"].as_u64().unwrap())
            .collect();
        assert!(voters.contains(&id), "member {id} is not a voter: {v:#}");
        m.wait_api();
        ms.push(m);
    }
    let want: BTreeSet<u64> = (1..=n).collect();
    let want = &want;
    for m in &ms {
        wait_for(
            &format!("member {} to see {n} voters and a leader", m.id),
            Duration::from_secs(30),
            || async move {
                let s = m.status().await?;
                let voters: BTreeSet<u64> =
                    s.members.iter().filter(|x| x.voter).map(|x| x.id).collect();
                (voters == *want && s.leader_id != 0).then_some(())
            },
        )
        .await;
    }
    ms
}

/// The leader as the members that answer see it (all must agree).
async fn leader(ms: &[&Member]) -> Option<u64> {
    let mut seen = BTreeSet::new();
    for m in ms {
        let s = m.status().await?;
        if s.leader_id == 0 || !ms.iter().any(|x| x.id == s.leader_id) {
            return None;
        }
        seen.insert(s.leader_id);
    }
    (seen.len() == 1).then(|| *seen.iter().next().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_form_and_any_member_takes_writes() {
    let _serial = SERIAL.lock().await;
    let dir = tempdir();
    let ms = form(dir.path(), 3, &[]).await;
    let refs: Vec<&Member> = ms.iter().collect();
    let l = wait_for("one leader", Duration::from_secs(30), || leader(&refs)).await;
    let follower = ms.iter().find(|m| m.id != l).unwrap();
    println!("leader {l}; writing through member {}", follower.id);

    // cell0ctl's view of the cluster, from a follower.
    let v: Value =
        serde_json::from_str(&follower.ctl_ok(&["cluster", "status", "-o", "json"])).unwrap();
    assert_eq!(v["leader_id"], l, "{v:#}");
    assert_eq!(v["members"].as_array().unwrap().len(), 3, "{v:#}");
    assert_eq!(v["state"], "follower", "{v:#}");
    let table = follower.ctl_ok(&["cluster", "status"]);
    assert!(
        table.contains("voter") && table.contains(&format!("leader {l}")),
        "{table}"
    );

    // Every member's own node is watched (heartbeats to the leader), the
    // first one too, though it was started alone with --init and the others
    // were added later.
    let nodes: Value =
        serde_json::from_str(&follower.ctl_ok(&["node", "list", "-o", "json"])).unwrap();
    let nodes = nodes.as_array().unwrap_or_else(|| panic!("{nodes:#}"));
    assert_eq!(nodes.len(), 3, "{nodes:#?}");
    for n in nodes {
        assert_eq!(n["labels"]["cell0.io/agent"], "member", "{n:#}");
    }

    // Writes through a follower are forwarded to the leader …
    let mut c = follower.client().await;
    let mut want = BTreeSet::new();
    for i in 0..20 {
        let name = format!("f{i}");
        let vm = c.vm.create(spec(&name)).await.unwrap().into_inner();
        assert_eq!(vm.id, name);
        want.insert(name);
    }
    // … and refusals come back as they would from the leader.
    let e = c.vm.create(spec("f0")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e}");
    // A stop and a delete through the other follower.
    let other = ms
        .iter()
        .find(|m| m.id != l && m.id != follower.id)
        .unwrap();
    let mut c2 = other.client().await;
    c2.vm
        .stop(grpc::StopVmRequest { id: "f1".into() })
        .await
        .unwrap();
    c2.vm
        .delete(grpc::DeleteVmRequest { id: "f2".into() })
        .await
        .unwrap();
    want.remove("f2");
    // Reads are linearizable on every member: each sees every write at once.
    for m in &ms {
        assert_eq!(m.names().await, want, "member {}'s view", m.id);
        let vm = m
            .client()
            .await
            .vm
            .get(grpc::GetVmRequest { id: "f1".into() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(vm.desired, "stopped", "member {}", m.id);
    }
    // Every member's node agent registered itself through the leader.
    let nodes = c
        .node
        .list(grpc::ListNodesRequest {})
        .await
        .unwrap()
        .into_inner()
        .nodes;
    let ids: BTreeSet<String> = nodes.into_iter().map(|n| n.id).collect();
    assert_eq!(ids, ["m1", "m2", "m3"].map(String::from).into());

    // Bad membership requests get their proper codes.
    let o = follower.ctl(&["cluster", "add", "0", "127.0.0.1:1"]);
    assert_eq!(
        o.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = follower.ctl(&["cluster", "add", "9", "not-an-address"]);
    assert_eq!(
        o.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = follower.ctl(&["cluster", "add", "2", "127.0.0.1:1"]);
    assert_eq!(
        o.status.code(),
        Some(11),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("already in the cluster"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // A member started as the one-member default (no --init) cannot grow:
    // its own node is not watched.
    let lone = Member::start(dir.path(), 7, &[], &[]);
    lone.wait_api();
    let o = lone.ctl(&["cluster", "add", "8", "127.0.0.1:1"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(11), "{err}");
    assert!(
        err.contains("one-member control plane") && err.contains("--init"),
        "{err}"
    );
    let s = lone.status().await.unwrap();
    assert_eq!(s.members.len(), 1, "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_leader_loses_no_acknowledged_write() {
    let _serial = SERIAL.lock().await;
    let mut rng = Rng::seeded("a_sigkilled_leader_loses_no_acknowledged_write");
    let dir = tempdir();
    let mut ms = form(dir.path(), 3, &[]).await;
    let refs: Vec<&Member> = ms.iter().collect();
    let old = wait_for("one leader", Duration::from_secs(30), || leader(&refs)).await;

    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let failed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4 {
        // Each writer talks to one member (the seed picks which).
        let m = &ms[rng.below(3) as usize];
        println!("writer {w} → member {}", m.id);
        let mut c = m.client().await;
        let (acked, failed, stop) = (acked.clone(), failed.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let name = format!("w{w}-{i}");
                i += 1;
                match c.vm.create(spec(&name)).await {
                    Ok(_) => {
                        acked.lock().unwrap().insert(name);
                    }
                    Err(_) => {
                        // Unacknowledged (the leader died, or an election):
                        // it may or may not be there; go on.
                        failed.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }));
    }
    let before_kill = 40 + rng.below(60) as usize;
    let acked_ref = &acked;
    wait_for(
        &format!("{before_kill} acknowledged writes"),
        Duration::from_secs(120),
        || async move { (acked_ref.lock().unwrap().len() >= before_kill).then_some(()) },
    )
    .await;
    let idx = ms.iter().position(|m| m.id == old).unwrap();
    let t_kill = Instant::now();
    ms[idx].kill9();
    let acked_at_kill = acked.lock().unwrap().len();
    println!("SIGKILLed leader {old} after {acked_at_kill} acknowledged writes");

    let survivors: Vec<&Member> = ms.iter().filter(|m| m.id != old).collect();
    let new = wait_for("a new leader", Duration::from_secs(60), || {
        leader(&survivors)
    })
    .await;
    assert_ne!(new, old);
    println!(
        "member {new} leads after {:.0} ms",
        t_kill.elapsed().as_secs_f64() * 1e3
    );
    // Writes go on with the new leader.
    wait_for(
        "30 more acknowledged writes after the kill",
        Duration::from_secs(120),
        || async move { (acked_ref.lock().unwrap().len() >= acked_at_kill + 30).then_some(()) },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    println!(
        "{} writes acknowledged, {} failed (not acknowledged)",
        acked.len(),
        failed.load(Ordering::Relaxed)
    );
    for m in &survivors {
        let have = m.names().await;
        let lost: Vec<_> = acked.difference(&have).collect();
        assert!(
            lost.is_empty(),
            "member {} lost acknowledged writes: {lost:?}",
            m.id
        );
    }
    // The killed member comes back as a follower and catches up.
    let target = survivors[0].status().await.unwrap().last_applied;
    let t_back = Instant::now();
    ms[idx].spawn();
    ms[idx].wait_api();
    let back = &ms[idx];
    wait_for(
        &format!("member {old} to apply up to {target}"),
        Duration::from_secs(60),
        || async move {
            back.status()
                .await
                .filter(|s| s.last_applied >= target)
                .map(|_| ())
        },
    )
    .await;
    println!(
        "member {old} caught up to index {target} {:.0} ms after its restart",
        t_back.elapsed().as_secs_f64() * 1e3
    );
    let have = back.names().await;
    let lost: Vec<_> = acked.difference(&have).collect();
    assert!(
        lost.is_empty(),
        "restarted member {old} misses acknowledged writes: {lost:?}"
    );
    let all: Vec<&Member> = ms.iter().collect();
    wait_for(
        "all three to agree on a leader",
        Duration::from_secs(30),
        || leader(&all),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_member_catches_up_by_snapshot() {
    let _serial = SERIAL.lock().await;
    let dir = tempdir();
    let mut ms = form(dir.path(), 3, &["--snapshot-every", "20"]).await;
    let refs: Vec<&Member> = ms.iter().collect();
    let l = wait_for("one leader", Duration::from_secs(30), || leader(&refs)).await;
    let lagger = ms.iter().position(|m| m.id != l).unwrap();
    let lid = ms[lagger].id;
    let mut c = ms.iter().find(|m| m.id == l).unwrap().client().await;
    for i in 0..5 {
        c.vm.create(spec(&format!("a{i}"))).await.unwrap();
    }
    let m = &ms[lagger];
    let applied = c
        .cluster
        .status(grpc::ClusterStatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .last_applied;
    wait_for(
        &format!("member {lid} to apply {applied}"),
        Duration::from_secs(30),
        || async move {
            m.status()
                .await
                .filter(|s| s.last_applied >= applied)
                .map(|_| ())
        },
    )
    .await;
    let had = m.status().await.unwrap().last_log_index;
    ms[lagger].stop();
    println!("stopped member {lid} at log index {had}");

    // With the member away, 120 writes: several snapshots, and the leader
    // purges its log past everything the stopped member has.
    let mut want: BTreeSet<String> = (0..5).map(|i| format!("a{i}")).collect();
    for i in 0..120 {
        let name = format!("b{i}");
        c.vm.create(spec(&name)).await.unwrap();
        want.insert(name);
    }
    let lead = ms.iter().find(|m| m.id == l).unwrap();
    let st = wait_for(
        &format!("the leader to purge its log past index {had}"),
        Duration::from_secs(60),
        || async move { lead.status().await.filter(|s| s.purged_index > had) },
    )
    .await;
    println!(
        "leader {l}: last {} snapshot {} purged {}",
        st.last_log_index, st.snapshot_index, st.purged_index
    );

    // Back: the entries it misses are gone from every log, so only a
    // snapshot can bring it up to date.
    let t0 = Instant::now();
    ms[lagger].spawn();
    ms[lagger].wait_api();
    let m = &ms[lagger];
    let target = st.last_applied;
    let s = wait_for(
        &format!("member {lid} to catch up to {target}"),
        Duration::from_secs(60),
        || async move { m.status().await.filter(|s| s.last_applied >= target) },
    )
    .await;
    println!(
        "member {lid} caught up {:.0} ms after its restart: applied {} snapshot {} purged {}",
        t0.elapsed().as_secs_f64() * 1e3,
        s.last_applied,
        s.snapshot_index,
        s.purged_index
    );
    assert!(
        s.snapshot_index > had,
        "member {lid} has no snapshot past its old log ({had}): {s:?}"
    );
    // openraft logs each snapshot it receives from the leader.
    assert!(
        m.log().contains("Raft::install_full_snapshot()"),
        "member {lid}'s log shows no snapshot received:\n{}",
        tail(&m.log(), 4000)
    );
    assert_eq!(m.names().await, want);
    // The installed snapshot is on its disk: after a SIGKILL it still has it all.
    ms[lagger].kill9();
    ms[lagger].spawn();
    ms[lagger].wait_api();
    let m = &ms[lagger];
    let st = m.status().await.unwrap();
    assert!(st.snapshot_index > had, "{st:?}");
    assert_eq!(m.names().await, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_are_removed_leader_included() {
    let _serial = SERIAL.lock().await;
    let dir = tempdir();
    let mut ms = form(dir.path(), 3, &[]).await;
    let refs: Vec<&Member> = ms.iter().collect();
    let l = wait_for("one leader", Duration::from_secs(30), || leader(&refs)).await;
    let f = ms.iter().find(|m| m.id != l).unwrap();
    ms[0]
        .client()
        .await
        .vm
        .create(spec("before"))
        .await
        .unwrap();

    // Remove the leader, through a follower.
    let out = f.ctl_ok(&["cluster", "remove", &l.to_string(), "-o", "json"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    let ids: BTreeMap<u64, bool> = v["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["id"].as_u64().unwrap(), m["voter"].as_bool().unwrap()))
        .collect();
    assert!(!ids.contains_key(&l), "{v:#}");
    assert_eq!(ids.len(), 2, "{v:#}");
    let idx = ms.iter().position(|m| m.id == l).unwrap();
    ms[idx].kill9();
    let rest: Vec<&Member> = ms.iter().filter(|m| m.id != l).collect();
    let new = wait_for(
        "a leader among the other two",
        Duration::from_secs(60),
        || leader(&rest),
    )
    .await;
    println!("removed leader {l}; member {new} leads");
    for m in &rest {
        let s = m.status().await.unwrap();
        let ids: BTreeSet<u64> = s.members.iter().map(|m| m.id).collect();
        assert!(!ids.contains(&l), "member {} still lists {l}: {s:?}", m.id);
    }
    // The two go on taking writes.
    let mut c = rest[0].client().await;
    c.vm.create(spec("after")).await.unwrap();
    for m in &rest {
        let names = m.names().await;
        assert!(
            names.contains("before") && names.contains("after"),
            "{names:?}"
        );
    }
    // Down to one, then the last voter cannot go.
    let (keep, drop_) = (rest[0], rest[1]);
    keep.ctl_ok(&["cluster", "remove", &drop_.id.to_string()]);
    let s = wait_for("one member left", Duration::from_secs(30), || async move {
        keep.status()
            .await
            .filter(|s| s.members.len() == 1 && s.leader_id == keep.id)
    })
    .await;
    assert_eq!(s.members[0].id, keep.id);
    let o = keep.ctl(&["cluster", "remove", &keep.id.to_string()]);
    assert_eq!(
        o.status.code(),
        Some(11),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("last voter"));
    let o = keep.ctl(&["cluster", "remove", "42"]);
    assert_eq!(
        o.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    keep.client().await.vm.create(spec("alone")).await.unwrap();
    assert!(keep.names().await.contains("alone"));
}

/// A free port on 127.0.0.1 (bound, then released for the member to take).
fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_peers_bootstrap_and_a_restart_of_every_member_keeps_all_state() {
    let _serial = SERIAL.lock().await;
    let dir = tempdir();
    let addrs: Vec<String> = (0..3).map(|_| free_addr()).collect();
    let peers = |me: usize| {
        (0..3)
            .filter(|i| *i != me)
            .map(|i| format!("{}={}", i + 1, addrs[i]))
            .collect::<Vec<_>>()
            .join(",")
    };
    // Members 2 and 3 wait (--peers without --init); member 1 initializes
    // the three-member cluster in one step.
    let mut ms = Vec::new();
    for i in [1usize, 2, 0] {
        let p = peers(i);
        let mode: Vec<&str> = if i == 0 {
            vec!["--init", "--peers", &p]
        } else {
            vec!["--peers", &p]
        };
        ms.push(Member::start_at(
            dir.path(),
            i as u64 + 1,
            &addrs[i],
            &mode,
            &[],
        ));
    }
    ms.sort_by_key(|m| m.id);
    for m in &ms {
        m.wait_api();
    }
    let refs: Vec<&Member> = ms.iter().collect();
    let l = wait_for("one leader", Duration::from_secs(30), || leader(&refs)).await;
    let s = ms[0].status().await.unwrap();
    assert_eq!(
        s.members.iter().filter(|m| m.voter).count(),
        3,
        "three voters from --peers: {s:?}"
    );
    println!("--peers cluster formed; leader {l}");
    let mut want = BTreeSet::new();
    for (i, m) in ms.iter().enumerate() {
        let mut c = m.client().await;
        for j in 0..10 {
            let name = format!("p{i}-{j}");
            c.vm.create(spec(&name)).await.unwrap();
            want.insert(name);
        }
    }
    // SIGKILL every member, then start them again in another order: the
    // members elect a leader among themselves before any of them serves the
    // API, and every acknowledged write is back.
    for m in ms.iter_mut() {
        m.kill9();
    }
    for i in [2usize, 0, 1] {
        ms[i].spawn();
    }
    for m in &ms {
        m.wait_api();
    }
    let refs: Vec<&Member> = ms.iter().collect();
    let l2 = wait_for(
        "a leader after the restart",
        Duration::from_secs(60),
        || leader(&refs),
    )
    .await;
    println!("all three restarted; leader {l2}");
    for m in &ms {
        assert_eq!(m.names().await, want, "member {} after the restart", m.id);
    }
    // A member restarted with different bootstrap flags keeps its cluster:
    // --init on a data dir that has a log does nothing.
    ms[2].extra = vec!["--init".into()];
    ms[2].kill9();
    ms[2].spawn();
    ms[2].wait_api();
    let s = ms[2].status().await.unwrap();
    assert_eq!(s.members.len(), 3, "{s:?}");
    assert_eq!(ms[2].names().await, want);
    // Bad --peers are refused at start, with a message.
    for bad in ["x=127.0.0.1:1", "2=nohostport", "1=127.0.0.1:1"] {
        let o = Command::new(env!("CARGO_BIN_EXE_cell0d"))
            .args(["serve", "--data-dir"])
            .arg(dir.path().join("bad"))
            .args(["--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0"])
            .args(["--node-id", "1", "--peers", bad])
            .args(ARGS)
            .output()
            .unwrap();
        assert!(!o.status.success(), "--peers {bad} was accepted");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("--peers"), "--peers {bad}: {err}");
    }
}
