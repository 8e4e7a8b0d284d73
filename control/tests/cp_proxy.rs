// SPDX-License-Identifier: Apache-2.0
//! Node-local calls through any member (docs/CLUSTER.md, "Node-local
//! calls"), with real processes: three `cell0d serve` members and two
//! `cell0d node` agents running real nano VMs, `na` with `--listen` (its
//! API) and `nb` without.
//!
//! - Get and ps on every member, followers included, show `running` for a VM
//!   on a `cell0d node` host (followers ask the leader).
//! - Logs (also `--follow`, until the VM stops) and Attest through a
//!   follower give what the node's own API gives, and the serial log on the
//!   node; Exec on a nano VM gives the node's FAILED_PRECONDITION.
//! - A VM on another member's own node: its logs come through any member.
//! - Watch on a follower and on the leader sees a remote VM stop.
//! - Refusals: a node without `--listen` (the member says so), a VM the
//!   node API does not run, a node API call that only members serve, and a
//!   node that is gone (UNAVAILABLE with its address).
#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod cp_harness;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cp_harness::{Daemon, LONG_RUNNING, cell0ctl, cell0ctl_ok, free_addr, tail};
use serde_json::Value;

/// A `cell0d node` agent process.
struct Agent {
    name: String,
    dir: PathBuf,
    child: Child,
    /// Its API address (`--listen`), if any.
    api: Option<String>,
}

impl Agent {
    /// `tls`: the node's --tls-dir (`None`: --insecure-plaintext).
    fn start(base: &Path, name: &str, join: &str, listen: bool, tls: Option<&Path>) -> Agent {
        Self::start_with(
            base,
            name,
            join,
            listen,
            tls,
            &cp_harness::vmm().unwrap(),
            |_| {},
        )
    }

    /// [`Agent::start`] with `vmm` as its VMM, its flags changed by `edit`.
    fn start_with(
        base: &Path,
        name: &str,
        join: &str,
        listen: bool,
        tls: Option<&Path>,
        vmm: &Path,
        edit: impl FnOnce(&mut Vec<String>),
    ) -> Agent {
        let dir = base.join(name);
        let api = listen.then(free_addr);
        let mut args = cp_harness::node_args_with_vmm(
            name,
            join,
            "a",
            &format!("host={name}"),
            &dir,
            tls,
            vmm,
        );
        edit(&mut args);
        if let Some(a) = &api {
            args.extend(["--listen".into(), a.clone()]);
        }
        let mut c = cp_harness::node_command(&args, &dir.with_extension("log"));
        Agent {
            name: name.into(),
            child: c.spawn().unwrap(),
            dir,
            api,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.with_extension("log")).unwrap_or_default()
    }

    fn serial(&self, id: &str) -> String {
        std::fs::read_to_string(self.dir.join("node/vms").join(id).join("serial.log"))
            .unwrap_or_default()
    }

    /// SIGKILLs the agent (its VMMs, in their own process groups, live on).
    fn kill_agent(&mut self) {
        cp_harness::kill_group(&mut self.child);
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill_agent();
        cp_harness::kill_procs_with(&format!("{}/node/vms/", self.dir.display()));
    }
}

struct Cluster {
    ms: Vec<Daemon>,
    agents: Vec<Agent>,
    _base: tempfile::TempDir,
}

impl Cluster {
    /// Three members (`--init --peers`; their own nodes `m1`..`m3` are in
    /// zone `local`) and the agents `na` (with an API) and `nb` (without).
    fn start() -> Cluster {
        let (ms, addrs) = cp_harness::start_members(
            "c0p",
            &[
                "--allow-unattested-nodes",
                "--insecure-plaintext",
                "--cpu-overcommit",
                "100",
            ],
            |_| Vec::new(),
        );
        let base = tempfile::Builder::new()
            .prefix("c0p")
            .tempdir_in("/tmp")
            .unwrap();
        let join = addrs.join(",");
        let agents = vec![
            Agent::start(base.path(), "na", &join, true, None),
            Agent::start(base.path(), "nb", &join, false, None),
        ];
        let c = Cluster {
            ms,
            agents,
            _base: base,
        };
        c.wait(60, "na and nb registered and ready", || {
            let v: Value =
                serde_json::from_str(&c.leader().ctl_ok(&["node", "list", "-o", "json"])).unwrap();
            ["na", "nb"].iter().all(|n| {
                v.as_array()
                    .unwrap()
                    .iter()
                    .any(|x| x["id"] == *n && x["state"] == "ready")
            })
        });
        c
    }

    fn leader(&self) -> &Daemon {
        cp_harness::leader(&self.ms, || self.logs())
    }

    /// A member that is not the leader.
    fn follower(&self) -> &Daemon {
        let l = self.leader().grpc.clone();
        self.ms.iter().find(|m| m.grpc != l).unwrap()
    }

    fn agent(&self, name: &str) -> &Agent {
        self.agents.iter().find(|a| a.name == name).unwrap()
    }

    fn logs(&self) -> String {
        let mut s = cp_harness::member_logs(&self.ms, 2000);
        for a in &self.agents {
            s.push_str(&format!("--- {}:\n{}\n", a.name, tail(&a.log(), 8000)));
        }
        s
    }

    fn wait(&self, secs: u64, what: &str, f: impl FnMut() -> bool) {
        cp_harness::wait_until(secs, what, || self.logs(), f);
    }
}

fn state(v: &Value) -> &str {
    v["status"]["state"].as_str().unwrap_or("")
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn node_local_calls_reach_the_vms_node_through_any_member() {
    require_vms!();
    let tpm = Command::new("swtpm").arg("--version").output().is_ok();
    if !tpm {
        println!("swtpm is not installed: the Attest checks are skipped (scripts/deps.sh)");
    }
    let mut c = Cluster::start();
    let l = c.leader();
    let mut p1 = vec!["run", "--name", "p1", "--cmdline", LONG_RUNNING];
    p1.extend(["--node-selector", "host=na", "--no-wait"]);
    if tpm {
        p1.push("--tpm");
    }
    l.ctl_ok(&p1);
    l.ctl_ok(&[
        "run",
        "--name",
        "p2",
        "--cmdline",
        LONG_RUNNING,
        "--node-selector",
        "host=nb",
        "--no-wait",
    ]);
    // On a member's own node (zone `local`), created through a follower.
    c.follower().ctl_ok(&[
        "run",
        "--name",
        "p3",
        "--cmdline",
        LONG_RUNNING,
        "--zone",
        "local",
        "--no-wait",
    ]);
    let t0 = Instant::now();
    loop {
        let vms: Vec<Value> = ["p1", "p2", "p3"]
            .iter()
            .map(|id| c.leader().get(id))
            .collect();
        if vms.iter().all(|v| state(v) == "running") {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "p1, p2 and p3 not running within 90 s (seen on the leader): {vms:#?}\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // Status: every member, followers included, shows the remote VMs running.
    for (i, m) in c.ms.iter().enumerate() {
        for id in ["p1", "p2", "p3"] {
            let v = m.get(id);
            assert_eq!(state(&v), "running", "get {id} on member {}: {v:#}", i + 1);
        }
        let ps = m.ps();
        let p1 = ps.iter().find(|v| v["id"] == "p1").unwrap();
        assert_eq!(state(p1), "running", "ps on member {}: {p1:#}", i + 1);
        assert_eq!(p1["status"]["node"], "na");
    }

    let f = c.follower();
    // Figure (printed, not asserted): Get of a VM on a `cell0d node` through
    // the leader (its heartbeat reports) and through a follower (read index
    // plus VmStatuses from the leader).
    {
        let rt = tokio::runtime::Runtime::new().unwrap();
        for (who, m) in [("leader", c.leader()), ("follower", f)] {
            let mut cl = rt.block_on(m.client());
            let mut us: Vec<u128> = (0..50)
                .map(|_| {
                    let t = Instant::now();
                    let v = rt
                        .block_on(
                            cl.vm
                                .get(cell0_proto::grpc::GetVmRequest { id: "p1".into() }),
                        )
                        .unwrap()
                        .into_inner();
                    assert_eq!(
                        v.status.unwrap().state,
                        cell0_proto::grpc::VmState::Running as i32
                    );
                    t.elapsed().as_micros()
                })
                .collect();
            us.sort_unstable();
            println!(
                "Get of a VM on a cell0d node through the {who}: p50 {} us, p99 {} us (50 calls, debug build)",
                us[25], us[49]
            );
        }
    }
    let na = c.agent("na");
    let api = na.api.clone().unwrap();

    // Logs through a follower = the node API's = the serial log on the node.
    let via = f.ctl_ok(&["logs", "p1"]);
    let direct = cell0ctl_ok(&api, "na", || na.log(), &["logs", "p1"]);
    let file = na.serial("p1");
    assert!(!via.is_empty(), "no serial output through the follower");
    assert!(file.starts_with(&via), "follower: {via:?}\nfile: {file:?}");
    assert!(
        direct.starts_with(&via) || via.starts_with(&direct),
        "{via:?} vs {direct:?}"
    );
    let tail8 = f.ctl_ok(&["logs", "p1", "--tail", "8"]);
    assert_eq!(tail8.len(), 8, "{tail8:?}");

    // p3 is on a member's own node: its logs come through any other member.
    let p3_node = f.get("p3")["status"]["node"].as_str().unwrap().to_string();
    let owner: usize = p3_node.trim_start_matches('m').parse().unwrap();
    let other =
        c.ms.iter()
            .enumerate()
            .find(|(i, _)| i + 1 != owner)
            .unwrap()
            .1;
    let p3_logs = other.ctl_ok(&["logs", "p3"]);
    let p3_file =
        std::fs::read_to_string(c.ms[owner - 1].data().join("node/vms/p3/serial.log")).unwrap();
    assert!(
        !p3_logs.is_empty() && p3_file.starts_with(&p3_logs),
        "{p3_logs:?}"
    );

    // Attest through a follower and through the leader = on the node.
    if tpm {
        let att = |out: String| -> Value { serde_json::from_str(&out).unwrap() };
        let o = f.ctl(&["attest", "p1", "-o", "json"]);
        assert!(
            o.status.success(),
            "attest through a follower: {}\n--- vmm.log of p1:\n{}\n{}",
            stderr(&o),
            std::fs::read_to_string(na.dir.join("node/vms/p1/vmm.log")).unwrap_or_default(),
            c.logs()
        );
        let a = att(String::from_utf8(o.stdout).unwrap());
        let b = att(cell0ctl_ok(
            &api,
            "na",
            || na.log(),
            &["attest", "p1", "-o", "json"],
        ));
        let lead = att(c.leader().ctl_ok(&["attest", "p1", "-o", "json"]));
        for v in [&a, &b, &lead] {
            assert_eq!(v["trusted"], true, "{v:#}");
        }
        assert_eq!(a["pcrs"], b["pcrs"]);
        assert_eq!(a["pcrs"], lead["pcrs"]);
        assert_eq!(a["ak_name"], b["ak_name"]);
        assert_eq!(a["pcrs"].as_object().unwrap().len(), 6, "{a:#}");
    }

    // Exec: the nano guest has no agent; the node says so, through the proxy.
    let o = f.ctl(&["exec", "p1", "--", "true"]);
    assert_eq!(o.status.code(), Some(11), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("node \"na\" at") && e.contains("nano guest"),
        "{e}"
    );

    // A node without --listen: the member says it serves no API.
    for cmd in [&["logs", "p2"][..], &["exec", "p2", "--", "true"]] {
        let o = f.ctl(cmd);
        assert_eq!(o.status.code(), Some(11), "{cmd:?}: {}", stderr(&o));
        let e = stderr(&o);
        assert!(e.contains("serves no API") && e.contains("--listen"), "{e}");
    }
    // The node API: only its own VMs, only Logs/Exec/Attest.
    let o = cell0ctl(&api, &["logs", "p2"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("node \"na\" runs no VM named \"p2\""),
        "{}",
        stderr(&o)
    );
    let o = cell0ctl(&api, &["get", "p1"]);
    assert_eq!(o.status.code(), Some(10), "{}", stderr(&o));
    assert!(stderr(&o).contains("ask a member"), "{}", stderr(&o));

    // Follow p1's log through a follower and watch it there and on the
    // leader; stopping p1 ends the stream and reaches both watchers.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut watches = Vec::new();
    for m in [f, c.leader()] {
        let mut cl = rt.block_on(m.client());
        let mut s = rt
            .block_on(
                cl.vm
                    .watch(cell0_proto::grpc::WatchRequest { id: "p1".into() }),
            )
            .unwrap()
            .into_inner();
        let first = rt.block_on(s.message()).unwrap().unwrap();
        assert_eq!(first.kind, "current");
        assert_eq!(first.state, cell0_proto::grpc::VmState::Running as i32);
        assert_eq!(first.node, "na");
        watches.push(s);
    }
    let mut follow = Command::new(env!("CARGO_BIN_EXE_cell0ctl"))
        .args([
            "--endpoint",
            &f.grpc,
            "--insecure-plaintext",
            "logs",
            "-f",
            "p1",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        follow.try_wait().unwrap().is_none(),
        "logs -f ended while p1 runs"
    );
    f.ctl_ok(&["stop", "p1"]);
    for (who, s) in ["follower", "leader"].iter().zip(watches.iter_mut()) {
        let ev = rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(60), async {
                loop {
                    let ev = s.message().await.unwrap().unwrap();
                    if ev.state == cell0_proto::grpc::VmState::Stopped as i32 {
                        return ev;
                    }
                }
            })
            .await
        });
        let ev = ev.unwrap_or_else(|_| panic!("the {who}'s Watch saw no stop\n{}", c.logs()));
        assert_eq!(ev.node, "na", "{ev:?}");
    }
    let t0 = Instant::now();
    let st = loop {
        if let Some(st) = follow.try_wait().unwrap() {
            break st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "logs -f did not end after the stop\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = follow.wait_with_output().unwrap();
    assert!(st.success(), "{}", stderr(&out));
    let followed = String::from_utf8_lossy(&out.stdout);
    assert!(!followed.is_empty() && na.serial("p1").starts_with(&*followed));
    assert_eq!(state(&f.get("p1")), "stopped");

    // The node is gone: UNAVAILABLE, naming its API address.
    let api_addr = api.clone();
    c.agents[0].kill_agent();
    let o = c.follower().ctl(&["logs", "p1"]);
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains("unreachable") && e.contains(&api_addr), "{e}");
}

/// `cell0ctl --tls-dir TLS --endpoint ENDPOINT ARGS`.
fn ctl_tls(endpoint: &str, tls: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_cell0ctl"))
        .args(["--endpoint", endpoint, "--tls-dir"])
        .arg(tls)
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn the_node_api_serves_members_only_over_mutual_tls() {
    require_vms!();
    // `serve --init` makes the cluster CA in <data>/pki and serves mutual TLS.
    let m = Daemon::start(&["--init", "--allow-unattested-nodes", "--node-name", "m1"]);
    let pki = m.data().join("pki");
    let base = tempfile::Builder::new()
        .prefix("c0p")
        .tempdir_in("/tmp")
        .unwrap();
    let issue = |name: &str, role: &str| {
        let out = base.path().join(format!("{name}.tls"));
        cp_harness::issue_cert(&pki, name, role, &out);
        out
    };
    let (na_tls, admin) = (issue("na", "node"), issue("admin", "client"));
    let na = Agent::start(base.path(), "na", &m.grpc, true, Some(&na_tls));
    let api = na.api.clone().unwrap();
    let ok = |endpoint: &str, args: &[&str]| {
        let o = ctl_tls(endpoint, &admin, args);
        assert!(
            o.status.success(),
            "{args:?}: {}\n--- member:\n{}\n--- na:\n{}",
            stderr(&o),
            tail(&m.log(), 3000),
            tail(&na.log(), 3000)
        );
        String::from_utf8(o.stdout).unwrap()
    };
    let t0 = Instant::now();
    while !ok(&m.grpc, &["node", "list"]).contains(&api) {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "na never registered\n{}",
            na.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    ok(
        &m.grpc,
        &[
            "run",
            "--name",
            "t1",
            "--cmdline",
            LONG_RUNNING,
            "--node-selector",
            "host=na",
        ],
    );

    // The member dials the node's API with its member certificate.
    let logs = ok(&m.grpc, &["logs", "t1"]);
    assert!(
        !logs.is_empty() && na.serial("t1").starts_with(&logs),
        "{logs:?}"
    );
    // A client certificate is refused by the node itself, and so is plain TCP.
    let o = ctl_tls(&api, &admin, &["logs", "t1"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("needs a member certificate"),
        "{}",
        stderr(&o)
    );
    println!(
        "t1's log through the member: {} bytes; a client certificate at the node API: {}",
        logs.len(),
        stderr(&o).trim()
    );
    let o = cell0ctl(&api, &["logs", "t1"]);
    assert!(!o.status.success(), "plain TCP to the node API: {o:?}");

    // A member certificate that the cluster revokes is refused by the node
    // too, from a heartbeat answer after the revocation was committed.
    let rogue = issue("rogue", "member");
    let direct = ctl_tls(&api, &rogue, &["logs", "t1"]);
    assert!(direct.status.success(), "{}", stderr(&direct));
    ok(
        &m.grpc,
        &[
            "cluster",
            "revoke",
            "--cert",
            rogue.join("cert.pem").to_str().unwrap(),
            "--reason",
            "member host decommissioned",
        ],
    );
    let t0 = Instant::now();
    let refused = loop {
        let o = ctl_tls(&api, &rogue, &["logs", "t1"]);
        if !o.status.success() {
            break o;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the node still serves a revoked member certificate\n{}",
            tail(&na.log(), 3000)
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let why = stderr(&refused);
    assert!(
        why.contains("is revoked: member host decommissioned"),
        "{why}"
    );
    println!(
        "a revoked member certificate at the node API, {} ms after the revoke: {}",
        t0.elapsed().as_millis(),
        why.trim()
    );
    // The member's own certificate still reaches the node.
    assert!(!ok(&m.grpc, &["logs", "t1"]).is_empty());
}

/// Not a test: the guest agent for [`cp_harness::GuestAgent`].
#[tokio::test]
#[ignore = "a helper process that cp_harness::GuestAgent starts"]
async fn guest_agent_helper_process() {
    cp_harness::guest_agent_helper_main().await;
}

/// A `cell0d node` runs the SYPAS router of its VMs: a guest agent on a
/// node's VM bootstraps through it (token, ready, heartbeats), and Exec
/// through a member reaches it (member → node API → router → agent). As in
/// `cp_api`, a script stands in for cell0-vmm and a cell0-agent process on
/// the host plays the Linux guest on the VM's port-1024 socket (no Linux
/// guest boots on this machine's nested KVM); the rest is real.
#[test]
fn exec_reaches_a_guest_agent_through_a_cell0d_nodes_sypas_router() {
    let base = tempfile::Builder::new()
        .prefix("c0p")
        .tempdir_in("/tmp")
        .unwrap();
    let (vmm, kernel) = cp_harness::vmm_stand_in(base.path());
    let m = Daemon::start(&[
        "--init",
        "--insecure-plaintext",
        "--allow-unattested-nodes",
        "--node-name",
        "m1",
    ]);
    // Unjailed (the stand-in is a script), health checks every 200 ms.
    let mut na = Agent::start_with(base.path(), "na", &m.grpc, true, None, &vmm, |a| {
        let h = a.iter().position(|f| f == "--health-ms").unwrap();
        a[h + 1] = "200".into();
        a.push("--no-jail".into());
    });
    let t0 = Instant::now();
    while !m.ctl_ok(&["node", "list"]).contains("na") {
        if let Some(st) = na.child.try_wait().unwrap() {
            panic!("na exited ({st}):\n{}", tail(&na.log(), 3000));
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "na never registered\n{}",
            tail(&na.log(), 3000)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    m.ctl_ok(&[
        "run",
        "--name",
        "lx",
        "--kernel",
        kernel.to_str().unwrap(),
        "--node-selector",
        "host=na",
        "--no-wait",
        "--command=sh",
        "--command=-c",
        "--command=echo workload-ran; sleep 600",
    ]);
    // The node's router listens for the VM on its port-1024 socket.
    let sock = na.dir.join("node/vms/lx/vsock.sock_1024");
    let na_log = || tail(&na.log(), 3000).to_string();
    cp_harness::wait_until(30, "the node's router listening for lx", na_log, || {
        sock.exists()
    });
    let _guest = cp_harness::GuestAgent::start(&sock);

    // Until the agent has bootstrapped and connected, Exec says so (exit 11).
    let t0 = Instant::now();
    let o = loop {
        let o = m.ctl(&[
            "exec",
            "lx",
            "--",
            "sh",
            "-c",
            "echo out; echo err >&2; exit 3",
        ]);
        if o.status.code() != Some(11) {
            break o;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the agent never connected: {}\n{}",
            stderr(&o),
            tail(&na.log(), 3000)
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    println!(
        "Exec through the member reached the agent on na {} ms after it started",
        t0.elapsed().as_millis()
    );
    assert_eq!(o.status.code(), Some(6), "{}", stderr(&o));
    assert_eq!(o.stdout, b"out\n");
    assert!(stderr(&o).contains("err"), "{}", stderr(&o));
    // The agent's `ready` reached the leader through the node's heartbeats,
    // and so did its health, from its SYPAS heartbeats to the node's router.
    m.wait_vm("lx", "ready and healthy by SYPAS heartbeat", |v| {
        v["status"]["state"] == "running"
            && v["status"]["ready"] == true
            && v["status"]["health"]
                .as_str()
                .is_some_and(|h| h.starts_with("sypas-heartbeat ok"))
    });
    // The workload's stdout EVENTs land in the VM's agent log on the node,
    // and come back through the member.
    cp_harness::wait_until(
        30,
        "the workload's output in `cell0ctl logs --agent`",
        na_log,
        || {
            m.ctl_ok(&["logs", "lx", "--agent"])
                .contains("workload-ran\n")
        },
    );
}
