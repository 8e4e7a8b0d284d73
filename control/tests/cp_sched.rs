// SPDX-License-Identifier: Apache-2.0
//! The scheduler through real `cell0d` processes (issue 7, item 3).
//!
//! Nodes come from the members themselves: each `cell0d serve` member runs
//! its own node agent, which registers its node (name, zone, capacity)
//! through Raft. (`NodeService.Register` for agents on hosts that are not
//! members is not built yet, so a node here is always a member.) Three
//! members on 127.0.0.1, in zones a, b, b, with `/bin/true` as the "VMM" (no
//! KVM needed), take VMs with zone constraints and anti-affinity, refuse the
//! ones that fit nowhere with a reason counted over the nodes, and move
//! restartable VMs off a drained node: the new node's agent creates the run
//! dir, the old one removes it. A one-member daemon shows that draining the
//! only node says where nothing fits instead of failing.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod cp_harness;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use cp_harness::{Daemon, tail};
use serde_json::Value;

/// Each member's node: 4 vCPUs, 2048 MiB, no overcommit.
const ARGS: &[&str] = &[
    "--vmm",
    "/bin/true",
    "--vcpus",
    "4",
    "--memory-mib",
    "2048",
    "--cpu-overcommit",
    "1",
    "--memory-overcommit",
    "1",
    "--health-ms",
    "3600000",
];

/// A `cell0d serve` member whose node is `m<id>`.
struct Member {
    id: u64,
    base: PathBuf,
    child: Option<Child>,
    addr: String,
}

impl Member {
    fn data(&self) -> PathBuf {
        self.base.join(format!("m{}", self.id))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.base.join(format!("m{}.log", self.id))).unwrap_or_default()
    }

    /// Starts member `id` in `zone`; returns once its Raft service listens.
    fn start(base: &Path, id: u64, zone: &str, join: bool) -> Member {
        let mut m = Member {
            id,
            base: base.to_path_buf(),
            child: None,
            addr: String::new(),
        };
        let log = std::fs::File::create(base.join(format!("m{id}.log"))).unwrap();
        let mut c = Command::new(env!("CARGO_BIN_EXE_cell0d"));
        c.arg("serve")
            .arg("--data-dir")
            .arg(m.data())
            .args(["--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0"])
            .args(["--node-id", &id.to_string()])
            .args(["--node-name", &format!("m{id}")])
            .args(["--zone", zone, "--region", "r1"])
            .arg("--insecure-plaintext")
            .args(ARGS)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        c.arg(if join { "--join" } else { "--init" });
        m.child = Some(c.spawn().unwrap());
        let t0 = Instant::now();
        loop {
            if let Ok(t) = std::fs::read_to_string(m.data().join("cell0d.member")) {
                if let Ok(v) = serde_json::from_str::<Value>(&t) {
                    m.addr = v["grpc"].as_str().unwrap().to_string();
                    return m;
                }
            }
            if let Some(st) = m.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("member {id} exited ({st}):\n{}", tail(&m.log(), 4000));
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "member {id} did not serve within 60 s:\n{}",
                tail(&m.log(), 4000)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until its API serves (a leader is known, its node registered).
    fn wait_api(&self) {
        let t0 = Instant::now();
        while !self.data().join("cell0d.addr").exists() {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "member {}'s API did not come up:\n{}",
                self.id,
                tail(&self.log(), 4000)
            );
            std::thread::sleep(Duration::from_millis(20));
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

    /// The node a VM is placed on, as the replicated record says.
    fn node_of(&self, vm: &str) -> String {
        let v: Value = serde_json::from_str(&self.ctl_ok(&["get", vm, "-o", "json"])).unwrap();
        v["status"]["node"].as_str().unwrap().to_string()
    }

    fn run_dir(&self, vm: &str) -> PathBuf {
        self.data().join("node/vms").join(vm)
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let needle = self.data().join("node/vms").display().to_string();
        for pid in cp_harness::procs_with(&needle) {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "gave up waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn zones_anti_affinity_reasons_and_drain_across_three_cell0d() {
    let base = tempfile::Builder::new()
        .prefix("c0s")
        .tempdir_in("/tmp")
        .unwrap();
    let m1 = Member::start(base.path(), 1, "a", false);
    m1.wait_api();
    let m2 = Member::start(base.path(), 2, "b", true);
    m1.ctl_ok(&["cluster", "add", "2", &m2.addr]);
    m2.wait_api();
    let m3 = Member::start(base.path(), 3, "b", true);
    m1.ctl_ok(&["cluster", "add", "3", &m3.addr]);
    m3.wait_api();
    let members = [&m1, &m2, &m3];
    let nodes: Value = serde_json::from_str(&m1.ctl_ok(&["node", "list", "-o", "json"])).unwrap();
    let zones: Vec<(String, String)> = nodes
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["id"].as_str().unwrap().to_string(),
                n["zone"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        zones,
        [("m1", "a"), ("m2", "b"), ("m3", "b")].map(|(n, z)| (n.to_string(), z.to_string()))
    );

    // A zone constraint.
    m1.ctl_ok(&[
        "run",
        "--name",
        "z1",
        "--zone",
        "b",
        "--memory-mib",
        "512",
        "--restart",
        "always",
        "--no-wait",
    ]);
    let z1_node = m1.node_of("z1");
    assert!(z1_node == "m2" || z1_node == "m3", "z1 on {z1_node}");

    // Anti-affinity: one `web` per node, then none fits.
    let mut web_nodes = Vec::new();
    for i in 1..=3 {
        let name = format!("web{i}");
        m1.ctl_ok(&[
            "run",
            "--name",
            &name,
            "-l",
            "app=web",
            "--anti-affinity",
            "app=web",
            "--no-wait",
        ]);
        web_nodes.push(m1.node_of(&name));
    }
    web_nodes.sort();
    assert_eq!(web_nodes, ["m1", "m2", "m3"]);
    let o = m2.ctl(&[
        "run",
        "--name",
        "web4",
        "-l",
        "app=web",
        "--anti-affinity",
        "app=web",
        "--no-wait",
    ]);
    assert_eq!(o.status.code(), Some(11), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(
            "no node with 1 vCPU and 64 MiB free in a node without a VM with app=web (3 nodes: 3 \
             already run a VM with app=web)"
        ),
        "{}",
        stderr(&o)
    );

    // Capacity in a zone: the reason counts every node.
    let o = m1.ctl(&[
        "run",
        "--name",
        "big",
        "--zone",
        "a",
        "--memory-mib",
        "4096",
        "--no-wait",
    ]);
    assert_eq!(o.status.code(), Some(9), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(
            "no node with 1 vCPU and 4096 MiB free in zone a (3 nodes: 2 in another zone, 1 lacks \
             memory); the most free is 1984 MiB and 3 vCPUs on m1"
        ),
        "{}",
        stderr(&o)
    );
    let o = m1.ctl(&["run", "--name", "nowhere", "--zone", "mars", "--no-wait"]);
    assert_eq!(o.status.code(), Some(11), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("(3 nodes: 3 in another zone)"),
        "{}",
        stderr(&o)
    );

    // Drain z1's node (through a member that is not the leader): z1 is
    // restartable and moves to the other zone-b node; the web VM there has
    // restart policy never and stays.
    let (from, to) = if z1_node == "m2" {
        (&m2, &m3)
    } else {
        (&m3, &m2)
    };
    wait_until("z1's run dir on its first node", || {
        from.run_dir("z1").is_dir()
    });
    let out = m2.ctl_ok(&["node", "drain", &z1_node]);
    let to_name = format!("m{}", to.id);
    assert!(
        out.contains(&format!("moved z1 -> {to_name}")),
        "drain output:\n{out}"
    );
    assert!(out.contains("restart policy never"), "drain output:\n{out}");
    assert_eq!(m1.node_of("z1"), to_name);
    // The agents follow the record: the new node launches z1 (its run dir
    // appears), the drained one stops it and removes its run dir.
    wait_until("z1's run dir on the new node", || to.run_dir("z1").is_dir());
    wait_until("z1's run dir gone from the drained node", || {
        !from.run_dir("z1").exists()
    });
    let nodes: Value = serde_json::from_str(&m3.ctl_ok(&["node", "list", "-o", "json"])).unwrap();
    let drained: Vec<&str> = nodes
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["drained"] == true)
        .map(|n| n["id"].as_str().unwrap())
        .collect();
    assert_eq!(drained, [z1_node.as_str()]);
    let table = m1.ctl_ok(&["node", "list"]);
    assert!(table.contains("ready,drained"), "{table}");

    // New VMs avoid the drained node.
    m1.ctl_ok(&[
        "run",
        "--name",
        "z2",
        "--zone",
        "b",
        "--restart",
        "on-failure",
        "--no-wait",
    ]);
    assert_eq!(m1.node_of("z2"), to_name);

    // Draining the other zone-b node: z1 and z2 are pinned to zone b and fit
    // nowhere else; the drain says so and exits 11 (failed precondition).
    let o = m1.ctl(&["node", "drain", &to_name]);
    assert_eq!(o.status.code(), Some(11), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains(
            "stays z1: nowhere else fits: no node with 1 vCPU and 512 MiB free in zone b (3 nodes: \
             2 drained, 1 in another zone)"
        ),
        "{out}"
    );
    assert!(
        stderr(&o).contains("2 restartable VMs could not move (nowhere else fits): z1, z2"),
        "{}",
        stderr(&o)
    );
    assert_eq!(m1.node_of("z1"), to_name);

    // Uncordon: the first node takes VMs again.
    m1.ctl_ok(&["node", "uncordon", &z1_node]);
    m1.ctl_ok(&["run", "--name", "z3", "--zone", "b", "--no-wait"]);
    assert_eq!(m1.node_of("z3"), z1_node);
    let o = m1.ctl(&["node", "drain", "no-such-node"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));

    // Every member agrees on every placement.
    let placements = |m: &Member| -> Vec<(String, String)> {
        let v: Value = serde_json::from_str(&m.ctl_ok(&["ps", "-o", "json"])).unwrap();
        let mut p: Vec<(String, String)> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|vm| {
                (
                    vm["id"].as_str().unwrap().to_string(),
                    vm["status"]["node"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        p.sort();
        p
    };
    let want = placements(&m1);
    for m in members {
        wait_until(&format!("member {} to agree", m.id), || {
            placements(m) == want
        });
    }
    println!("placements: {want:?}");
}

#[test]
fn draining_the_only_node_says_nowhere_else_fits() {
    let d = Daemon::start(&[
        "--vmm",
        "/bin/true",
        "--node-name",
        "solo",
        "--health-ms",
        "3600000",
    ]);
    d.ctl_ok(&["run", "--name", "keep", "--restart", "always", "--no-wait"]);
    d.ctl_ok(&["run", "--name", "plain", "--no-wait"]);
    let o = d.ctl(&["node", "drain", "solo", "-o", "json"]);
    assert_eq!(o.status.code(), Some(11), "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["moved"], serde_json::json!([]));
    let stayed = v["stayed"].as_array().unwrap();
    assert_eq!(stayed.len(), 2);
    assert_eq!(stayed[0]["id"], "keep");
    assert_eq!(
        stayed[0]["reason"],
        "nowhere else fits: no node with 1 vCPU and 64 MiB free (1 node: 1 drained)"
    );
    assert!(
        stayed[1]["reason"]
            .as_str()
            .unwrap()
            .contains("restart policy never")
    );
    assert_eq!(v["node"]["drained"], true);
    // New VMs: nowhere to go, a clear refusal; the daemon is still up.
    let o = d.ctl(&["run", "--name", "late", "--no-wait"]);
    assert_eq!(o.status.code(), Some(11), "{}", stderr(&o));
    assert!(stderr(&o).contains("(1 node: 1 drained)"), "{}", stderr(&o));
    d.ctl_ok(&["node", "uncordon", "solo"]);
    d.ctl_ok(&["run", "--name", "late", "--no-wait"]);
    assert_eq!(d.get("keep")["status"]["node"], "solo");
}
