// SPDX-License-Identifier: Apache-2.0
//! Mutual TLS and node admission (issue 7): real `cell0d serve` processes on
//! 127.0.0.1 with certificates of a cluster CA made by `cell0d init-ca` and
//! `cell0d issue-cert`, and real swtpm vTPMs as the nodes' TPMs.
//!
//! - three members form a cluster over mutual TLS and commit writes made
//!   through any member; plain TCP, a TLS client without a certificate, one
//!   with a certificate of another CA and an expired certificate are refused
//!   with a message that says so;
//! - a node whose quote shows the control plane's own `cell0d` and
//!   `cell0-vmm` digests is admitted and registered; one that measured
//!   another `cell0-vmm` is refused and the refusal is in the audit log; an
//!   old quote (old nonce) and a replayed Admit are refused.
//!
//! The members' "VMM" is `/bin/true`, so no KVM is needed.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod cp_harness;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use cell0_attest::VtpmOptions;
use cell0_attest::formats::Wire as _;
use cell0_control::ctl::{self, Clients};
use cell0_control::node::admission::NodeAttester;
use cell0_control::tls::{self, CertRequest, Role, TlsDir};
use cell0_proto::grpc::{self, admission_service_client::AdmissionServiceClient};
use cp_harness::{spec, tail};
use serde_json::Value;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

/// One cluster at a time on a shared two-core machine.
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

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("c0tls")
        .tempdir_in("/tmp")
        .unwrap()
}

fn cell0d(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cell0d"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(o: Output) -> String {
    assert!(
        o.status.success(),
        "failed ({}): {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// `cell0d init-ca` and `cell0d issue-cert` for each (name, role), SAN
/// 127.0.0.1.
fn pki(base: &Path, ca: &str, names: &[(&str, &str)]) -> PathBuf {
    let ca_dir = base.join(ca);
    ok(cell0d(&["init-ca", "--out", ca_dir.to_str().unwrap()]));
    for (n, role) in names {
        ok(cell0d(&[
            "issue-cert",
            "--ca",
            ca_dir.to_str().unwrap(),
            "--name",
            n,
            "--role",
            role,
            "--san",
            "127.0.0.1",
            "--out",
            base.join(n).to_str().unwrap(),
        ]));
    }
    ca_dir
}

/// A `cell0d serve --tls-dir` member.
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

    fn start(base: &Path, id: u64, extra: &[&str], env: &[(&str, &Path)]) -> Member {
        let tls = base.join(format!("m{id}")).with_extension("tls");
        Member::start_with(base, id, Some(&tls), "127.0.0.1:0", extra, env)
    }

    /// A member with `tls_dir` (`None`: no --tls-dir, as `serve --init`
    /// that makes its own CA) on `listen`.
    fn start_with(
        base: &Path,
        id: u64,
        tls_dir: Option<&Path>,
        listen: &str,
        extra: &[&str],
        env: &[(&str, &Path)],
    ) -> Member {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(base.join(format!("m{id}.log")))
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cell0d"));
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(base.join(format!("m{id}")))
            .args(["--listen", listen, "--metrics", "127.0.0.1:0"])
            .args(["--node-id", &id.to_string()])
            .args(["--node-name", &format!("m{id}")]);
        if let Some(t) = tls_dir {
            cmd.arg("--tls-dir").arg(t);
        }
        cmd.args(ARGS)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut m = Member {
            id,
            base: base.to_path_buf(),
            child: Some(cmd.spawn().unwrap()),
            addr: String::new(),
        };
        let t0 = Instant::now();
        let _ = std::fs::remove_file(m.data().join("cell0d.addr"));
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

    fn ctl(&self, tls_dir: Option<&Path>, args: &[&str]) -> Output {
        let mut c = Command::new(env!("CARGO_BIN_EXE_cell0ctl"));
        c.arg("--endpoint").arg(&self.addr);
        if let Some(d) = tls_dir {
            c.arg("--tls-dir").arg(d);
        }
        c.args(args).env_remove("CELL0_TLS_DIR").output().unwrap()
    }

    async fn client(&self, tls_dir: &Path) -> Clients {
        ctl::connect_tls(&self.addr, Some(tls_dir)).await.unwrap()
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A member's TLS dir is `<base>/m<id>.tls`.
fn member_certs(base: &Path, ca: &Path, ids: &[u64]) {
    for id in ids {
        tls::issue_cert(
            ca,
            &CertRequest::new(&format!("m{id}"), Role::Member, &["127.0.0.1".into()], 1),
            &base.join(format!("m{id}.tls")),
        )
        .unwrap();
    }
}

async fn names(c: &mut Clients) -> Vec<String> {
    let mut v: Vec<String> =
        c.vm.list(grpc::ListVmsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .vms
            .into_iter()
            .map(|v| v.id)
            .collect();
    v.sort();
    v
}

/// A raw channel to `addr` over TLS, trusting `ca_pem`, with `identity`
/// (cert, key) if any.
async fn raw_tls(addr: &str, ca_pem: &str, identity: Option<(&str, &str)>) -> Channel {
    let mut cfg =
        ClientTlsConfig::new().ca_certificate(tonic::transport::Certificate::from_pem(ca_pem));
    if let Some((c, k)) = identity {
        cfg = cfg.identity(tonic::transport::Identity::from_pem(c, k));
    }
    Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(cfg)
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect_lazy()
}

/// Waits until a refused connection with `why` is in the member's log.
async fn wait_log(m: &Member, why: &str) {
    let t0 = Instant::now();
    loop {
        let log = m.log();
        if log
            .lines()
            .any(|l| l.contains("refused a gRPC connection") && l.contains(why))
        {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no refusal naming {why:?} in the log:\n{}",
            tail(&log, 3000)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_cluster_forms_commits_and_refuses_strangers() {
    let _g = SERIAL.lock().await;
    let d = tempdir();
    let base = d.path();
    let ca = pki(base, "ca", &[("admin", "client")]);
    member_certs(base, &ca, &[1, 2, 3]);
    let admin = base.join("admin");

    let m1 = Member::start(base, 1, &["--init"], &[]);
    let m2 = Member::start(base, 2, &["--join"], &[]);
    let m3 = Member::start(base, 3, &["--join"], &[]);
    m1.wait_api();
    // Membership changes over mutual TLS: the second through a follower,
    // which forwards it to the leader with its own certificate.
    let o = m1.ctl(Some(&admin), &["cluster", "add", "2", &m2.addr]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = m2.ctl(Some(&admin), &["cluster", "add", "3", &m3.addr]);
    assert!(
        o.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&o.stderr),
        tail(&m2.log(), 3000)
    );
    m2.wait_api();
    m3.wait_api();
    let st: Value = serde_json::from_slice(
        &m3.ctl(Some(&admin), &["cluster", "status", "-o", "json"])
            .stdout,
    )
    .unwrap();
    assert_eq!(st["members"].as_array().unwrap().len(), 3, "{st:#}");

    // Writes through every member commit; every member reads all of them.
    for (i, m) in [&m1, &m2, &m3].iter().enumerate() {
        let mut c = m.client(&admin).await;
        c.vm.create(spec(&format!("v{i}"))).await.unwrap();
    }
    for m in [&m1, &m2, &m3] {
        let mut c = m.client(&admin).await;
        assert_eq!(names(&mut c).await, ["v0", "v1", "v2"]);
    }

    // Plain TCP to a TLS member: refused, and cell0ctl says why.
    let o = m1.ctl(None, &["cluster", "status"]);
    assert_eq!(o.status.code(), Some(5), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    println!("plain TCP: {err}");
    assert!(
        err.contains("plain TCP") || err.contains("server closed the connection"),
        "{err}"
    );

    // TLS without a client certificate: the server requires one.
    let ca_pem = std::fs::read_to_string(ca.join("ca.pem")).unwrap();
    let mut c = grpc::cluster_service_client::ClusterServiceClient::new(
        raw_tls(&m1.addr, &ca_pem, None).await,
    );
    let e = c.status(grpc::ClusterStatusRequest {}).await.unwrap_err();
    // (TLS 1.3: the client learns of the refusal only as a closed
    // connection; the member's log names the reason.)
    println!("no client certificate: {}", tls::chain(&e));
    wait_log(&m1, "peer sent no certificates").await;

    // A client's certificate of the cluster CA may use the API but not
    // send Raft messages: only members' certificates may.
    let (cert, key) = (
        std::fs::read_to_string(admin.join("cert.pem")).unwrap(),
        std::fs::read_to_string(admin.join("key.pem")).unwrap(),
    );
    let mut raft = grpc::raft_service_client::RaftServiceClient::new(
        raw_tls(&m1.addr, &ca_pem, Some((&cert, &key))).await,
    );
    let e = raft
        .vote(grpc::RaftPayload {
            json: b"{}".to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains("needs a member certificate") && e.message().contains("client"),
        "{}",
        e.message()
    );

    // A client certificate of another CA: the member refuses the handshake
    // and logs it; a Raft message with it never reaches the store.
    let other = base.join("other");
    pki(base, "ca2", &[]);
    tls::issue_cert(
        &base.join("ca2"),
        &CertRequest::new("m9", Role::Member, &["127.0.0.1".into()], 1),
        &other,
    )
    .unwrap();
    let (cert, key) = (
        std::fs::read_to_string(other.join("cert.pem")).unwrap(),
        std::fs::read_to_string(other.join("key.pem")).unwrap(),
    );
    let mut raft = grpc::raft_service_client::RaftServiceClient::new(
        raw_tls(&m1.addr, &ca_pem, Some((&cert, &key))).await,
    );
    let e = raft
        .vote(grpc::RaftPayload {
            json: b"{}".to_vec(),
        })
        .await
        .unwrap_err();
    println!("another CA's client certificate: {}", tls::chain(&e));
    wait_log(&m1, "not signed by this cluster CA").await;
    // cell0ctl with that TLS dir (its own CA): it refuses the member's
    // certificate first.
    let o = m1.ctl(Some(&other), &["cluster", "status"]);
    assert_eq!(o.status.code(), Some(5), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    println!("cell0ctl with another CA: {err}");
    assert!(err.contains("not signed by this cluster CA"), "{err}");

    // An expired certificate: cell0ctl and cell0d serve refuse to use it.
    let expired = base.join("expired");
    let mut req = CertRequest::new("old", Role::Client, &["127.0.0.1".into()], 1);
    req.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(30);
    req.not_after = time::OffsetDateTime::now_utc() - time::Duration::days(1);
    tls::issue_cert(&ca, &req, &expired).unwrap();
    let o = m1.ctl(Some(&expired), &["cluster", "status"]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    println!("expired: {err}");
    assert!(err.contains("expired"), "{err}");
    let o = cell0d(&[
        "serve",
        "--data-dir",
        base.join("mx").to_str().unwrap(),
        "--tls-dir",
        expired.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--metrics",
        "127.0.0.1:0",
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("expired") && err.contains("--tls-dir"),
        "{err}"
    );
    // A missing TLS dir.
    let o = m1.ctl(Some(&base.join("nowhere")), &["cluster", "status"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("is missing"));

    // The cluster still commits after all that.
    let mut c = m3.client(&admin).await;
    c.vm.create(spec("after")).await.unwrap();
    assert_eq!(names(&mut c).await, ["after", "v0", "v1", "v2"]);
}

fn swtpm_missing() -> bool {
    Command::new("swtpm").arg("--version").output().is_err()
}

fn node(id: &str) -> grpc::Node {
    grpc::Node {
        id: id.into(),
        address: "127.0.0.1:1".into(),
        zone: "z".into(),
        region: "r".into(),
        capacity: Some(grpc::Resources {
            vcpus: 4,
            memory_mib: 4096,
        }),
        cpu_overcommit: 1.0,
        memory_overcommit: 1.0,
        ..Default::default()
    }
}

async fn admission_client(addr: &str, dir: &Path) -> AdmissionServiceClient<Channel> {
    let t = TlsDir::load(dir).unwrap();
    let ch = Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(t.client_config())
        .unwrap()
        .connect()
        .await
        .unwrap();
    AdmissionServiceClient::new(ch)
}

fn audit_lines(m: &Member) -> Vec<Value> {
    std::fs::read_to_string(m.data().join("audit.log"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_are_admitted_by_attestation() {
    if swtpm_missing() {
        eprintln!("SKIP nodes_are_admitted_by_attestation: swtpm is not installed");
        return;
    }
    let _g = SERIAL.lock().await;
    let d = tempdir();
    let base = d.path();
    let ca = pki(
        base,
        "ca",
        &[("admin", "client"), ("good", "node"), ("evil", "node")],
    );
    member_certs(base, &ca, &[1]);
    // The nodes' TPMs and the member trust one swtpm local CA.
    let tpm_ca = base.join("tpm-ca");
    let m1 = Member::start(base, 1, &[], &[("CELL0_TPM_CA_DIR", &tpm_ca)]);
    m1.wait_api();
    let cell0d_bin = Path::new(env!("CARGO_BIN_EXE_cell0d"));

    // A node that runs the control plane's cell0d and cell0-vmm (/bin/true
    // here): admitted and registered.
    let good = {
        let opts = VtpmOptions::new(base.join("good-tpm"), &tpm_ca);
        tokio::task::spawn_blocking(move || {
            NodeAttester::start(&opts, cell0d_bin, Path::new("/bin/true"))
        })
        .await
        .unwrap()
        .unwrap()
    };
    let mut gc = admission_client(&m1.addr, &base.join("good")).await;
    let mut good_node = m1.client(&base.join("good")).await.node;
    // Registration needs a passed attestation first.
    let e = good_node
        .register(grpc::RegisterNodeRequest {
            node: Some(node("good")),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert!(
        e.message().contains("has not passed attestation"),
        "{}",
        e.message()
    );
    let n = good.admit(&mut gc, node("good")).await.unwrap();
    assert_eq!(n.id, "good");
    good_node
        .register(grpc::RegisterNodeRequest {
            node: Some(node("good")),
        })
        .await
        .unwrap();
    // The admission is used up by that registration.
    let e = good_node
        .register(grpc::RegisterNodeRequest {
            node: Some(node("good")),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    let mut admin = m1.client(&base.join("admin")).await;
    let list = admin
        .node
        .list(grpc::ListNodesRequest {})
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<_> = list.nodes.iter().map(|n| n.id.as_str()).collect();
    assert!(ids.contains(&"good"), "{ids:?}");

    // A node whose measured cell0-vmm is not on the allow-list: refused,
    // named in the refusal and in the audit log, not registered.
    let fake_vmm = base.join("cell0-vmm");
    std::fs::write(&fake_vmm, b"#!/bin/sh\necho a different cell0-vmm\n").unwrap();
    let evil = {
        let opts = VtpmOptions::new(base.join("evil-tpm"), &tpm_ca);
        let v = fake_vmm.clone();
        tokio::task::spawn_blocking(move || NodeAttester::start(&opts, cell0d_bin, &v))
            .await
            .unwrap()
            .unwrap()
    };
    let mut ec = admission_client(&m1.addr, &base.join("evil")).await;
    let e = evil.admit(&mut ec, node("evil")).await.unwrap_err();
    println!("bad binary: {}", e.message());
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert!(
        e.message().contains("node-vmm") && e.message().contains("node evil refused"),
        "{}",
        e.message()
    );
    let audit = audit_lines(&m1);
    let entry = audit
        .iter()
        .find(|l| l["method"] == "NodeAdmit" && l["target"] == "node/evil")
        .unwrap_or_else(|| panic!("no refusal in the audit log: {audit:?}"));
    assert_eq!(entry["code"], "PermissionDenied");
    assert!(entry["message"].as_str().unwrap().contains("node-vmm"));
    // ... and it cannot register.
    let e = m1
        .client(&base.join("evil"))
        .await
        .node
        .register(grpc::RegisterNodeRequest {
            node: Some(node("evil")),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    let ids: Vec<_> = admin
        .node
        .list(grpc::ListNodesRequest {})
        .await
        .unwrap()
        .into_inner()
        .nodes
        .into_iter()
        .map(|n| n.id)
        .collect();
    assert!(!ids.contains(&"evil".to_string()), "{ids:?}");

    // A node cannot ask for another name than its certificate's, neither to
    // be admitted nor to register.
    let e = evil.admit(&mut ec, node("good")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert!(e.message().contains("certificate names"), "{}", e.message());
    let e = m1
        .client(&base.join("evil"))
        .await
        .node
        .register(grpc::RegisterNodeRequest {
            node: Some(node("good")),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert!(e.message().contains("certificate names"), "{}", e.message());

    // Replay: the good node's old evidence with a new challenge (old nonce)
    // is refused, and so is its old Admit request sent again as is.
    let ch = gc
        .challenge(grpc::AdmissionChallengeRequest {
            node_id: "good".into(),
            ak_json: good.ak().to_json(),
        })
        .await
        .unwrap()
        .into_inner();
    let old_nonce = cell0_attest::Nonce::random();
    let challenge = cell0_attest::CredentialChallenge::from_json(&ch.credential_json).unwrap();
    let (act, old_quote) = good.answer(&challenge, &old_nonce).unwrap();
    let old = grpc::AdmitNodeRequest {
        node: Some(node("good")),
        activation_json: act.to_json(),
        quote_json: old_quote.to_json(),
        event_log: good.log().to_jsonl(),
    };
    let e = gc.admit(old.clone()).await.unwrap_err();
    println!("old nonce: {}", e.message());
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert!(e.message().contains("nonce mismatch"), "{}", e.message());
    let e = gc.admit(old).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert!(e.message().contains("no open challenge"), "{}", e.message());
    // Every refusal is audited: registrations without attestation, the bad
    // binary, the borrowed name, the old nonce and the replay.
    let audit = audit_lines(&m1);
    let refused: Vec<_> = audit
        .iter()
        .filter(|l| l["code"] == "PermissionDenied")
        .map(|l| {
            format!(
                "{} {} {}",
                l["method"].as_str().unwrap(),
                l["target"].as_str().unwrap(),
                l["message"].as_str().unwrap()
            )
        })
        .collect();
    let want = [
        "NodeRegister good node good refused: it has not passed attestation",
        "NodeRegister good node good refused: it has not passed attestation",
        "NodeAdmit node/evil node evil refused: PCR 0 event 1 (node-vmm",
        "NodeRegister evil node evil refused: it has not passed attestation",
        "AdmissionChallenge node/good node good refused: the client certificate names \"evil\"",
        "NodeRegister good node good refused: the client certificate names \"evil\"",
        "NodeAdmit node/good node good refused: nonce mismatch",
        "NodeAdmit node/good node good refused: no open challenge",
    ];
    assert_eq!(refused.len(), want.len(), "{refused:#?}");
    for (i, w) in want.iter().enumerate() {
        assert!(refused[i].starts_with(w), "{i}: {}", refused[i]);
    }
}

/// A `cell0d node` process, killed on drop.
struct NodeProc(Child, PathBuf);

impl NodeProc {
    fn start(base: &Path, name: &str, join: &str, vmm: &Path, tpm_ca: &Path) -> NodeProc {
        let log_path = base.join(format!("{name}.log"));
        let log = std::fs::File::create(&log_path).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_cell0d"))
            .args(["node", "--join", join, "--node-name", name, "--attest"])
            .arg("--tls-dir")
            .arg(base.join(name))
            .arg("--data-dir")
            .arg(base.join(format!("{name}-data")))
            .arg("--vmm")
            .arg(vmm)
            .args([
                "--vcpus",
                "4",
                "--memory-mib",
                "4096",
                "--health-ms",
                "3600000",
            ])
            .env("CELL0_TPM_CA_DIR", tpm_ca)
            .env("RUST_LOG", "info")
            .env_remove("CELL0_TLS_DIR")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        NodeProc(child, log_path)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.1).unwrap_or_default()
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cell0d_node_attests_before_it_registers() {
    if swtpm_missing() {
        eprintln!("SKIP cell0d_node_attests_before_it_registers: swtpm is not installed");
        return;
    }
    let _g = SERIAL.lock().await;
    let d = tempdir();
    let base = d.path();
    let ca = pki(
        base,
        "ca",
        &[("admin", "client"), ("n-good", "node"), ("n-evil", "node")],
    );
    member_certs(base, &ca, &[1]);
    let tpm_ca = base.join("tpm-ca");
    let m1 = Member::start(base, 1, &[], &[("CELL0_TPM_CA_DIR", &tpm_ca)]);
    m1.wait_api();
    let fake_vmm = base.join("cell0-vmm");
    std::fs::write(&fake_vmm, b"#!/bin/sh\necho a different cell0-vmm\n").unwrap();
    // The real node agent, over mutual TLS: one runs the members' cell0-vmm
    // (/bin/true here), one another build.
    let good = NodeProc::start(base, "n-good", &m1.addr, Path::new("/bin/true"), &tpm_ca);
    let evil = NodeProc::start(base, "n-evil", &m1.addr, &fake_vmm, &tpm_ca);
    let mut admin = m1.client(&base.join("admin")).await;
    let t0 = Instant::now();
    loop {
        let ids: Vec<String> = admin
            .node
            .list(grpc::ListNodesRequest {})
            .await
            .unwrap()
            .into_inner()
            .nodes
            .into_iter()
            .map(|n| n.id)
            .collect();
        assert!(!ids.contains(&"n-evil".to_string()), "{ids:?}");
        if ids.contains(&"n-good".to_string()) && evil.log().contains("attestation refused") {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "n-good not registered or n-evil not refused within 60 s: {ids:?}\n--- n-good:\n{}\n--- n-evil:\n{}\n--- m1:\n{}",
            tail(&good.log(), 3000),
            tail(&evil.log(), 3000),
            tail(&m1.log(), 3000)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log = evil.log();
    assert!(log.contains("node-vmm"), "{}", tail(&log, 3000));
    assert!(good.log().contains("attestation passed"), "{}", good.log());
}

fn denied<T: std::fmt::Debug>(r: Result<T, tonic::Status>, needle: &str) -> String {
    let e = r.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains(needle), "{}", e.message());
    e.message().to_string()
}

/// Polls until `f` gives true (bounded: 30 s).
async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let t0 = Instant::now();
    while !f().await {
        assert!(t0.elapsed() < Duration::from_secs(30), "never: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether a VM list through `c` is refused as revoked.
async fn revoked(c: &mut Clients) -> bool {
    match c.vm.list(grpc::ListVmsRequest::default()).await {
        Err(e) => e.code() == tonic::Code::PermissionDenied && e.message().contains("is revoked"),
        Ok(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_makes_the_cluster_ca_roles_are_enforced_and_revocation_is_replicated() {
    let _g = SERIAL.lock().await;
    let d = tempdir();
    let base = d.path();
    // `serve --init` without --tls-dir: the member makes the cluster CA and
    // its own certificate under <data-dir>/pki and serves mutual TLS.
    let m1 = Member::start_with(base, 1, None, "127.0.0.1:0", &["--init"], &[]);
    m1.wait_api();
    let pki = m1.data().join("pki");
    for f in ["ca.pem", "ca.key", "cert.pem", "key.pem"] {
        assert!(pki.join(f).is_file(), "{f} missing in {}", pki.display());
    }
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(pki.join("ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "ca.key mode {mode:o}");
    }
    let ca_pem = std::fs::read_to_string(pki.join("ca.pem")).unwrap();
    let log = m1.log();
    assert!(
        log.contains("created the cluster CA") && log.contains("cell0d issue-cert --ca-dir"),
        "{}",
        tail(&log, 3000)
    );

    // A plain-TCP client is refused.
    let o = m1.ctl(None, &["cluster", "status"]);
    assert_eq!(o.status.code(), Some(5), "{o:?}");
    println!("plain TCP: {}", String::from_utf8_lossy(&o.stderr));

    // Certificates from `cell0d issue-cert --ca-dir <data-dir>/pki`.
    for (n, role) in [
        ("admin", "client"),
        ("ops", "client"),
        ("n1", "node"),
        ("m2", "member"),
        ("m3", "member"),
    ] {
        let out = if role == "member" {
            base.join(format!("{n}.tls"))
        } else {
            base.join(n)
        };
        cp_harness::issue_cert(&pki, n, role, &out);
    }
    let (admin, ops, n1) = (base.join("admin"), base.join("ops"), base.join("n1"));
    let o = m1.ctl(Some(&admin), &["cluster", "status", "-o", "json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // Two more members with certificates of that CA.
    let m2 = Member::start(base, 2, &["--join"], &[]);
    let m3 = Member::start(base, 3, &["--join"], &[]);
    for (id, m) in [(2, &m2), (3, &m3)] {
        let o = m1.ctl(Some(&admin), &["cluster", "add", &id.to_string(), &m.addr]);
        assert!(
            o.status.success(),
            "{}\n{}",
            String::from_utf8_lossy(&o.stderr),
            tail(&m1.log(), 3000)
        );
    }
    m2.wait_api();
    m3.wait_api();
    let mut a1 = m1.client(&admin).await;
    a1.vm.create(spec("v1")).await.unwrap();

    // A node certificate: node registration and heartbeats (its own),
    // cluster status (to find the leader); not the VM API, not node
    // listing, not membership, not revocation.
    let mut nc = m1.client(&n1).await;
    let msg = denied(
        nc.vm.list(grpc::ListVmsRequest::default()).await,
        "VmService.List needs a member or client certificate",
    );
    assert!(msg.contains("\"n1\" has a node certificate"), "{msg}");
    denied(
        nc.cluster
            .add_member(grpc::AddMemberRequest {
                id: 9,
                address: "127.0.0.1:1".into(),
            })
            .await,
        "ClusterService.AddMember needs a member or client certificate",
    );
    denied(
        nc.cluster
            .remove_member(grpc::RemoveMemberRequest { id: 3 })
            .await,
        "ClusterService.RemoveMember",
    );
    denied(
        nc.cluster
            .revoke_cert(grpc::RevokeCertRequest {
                serial: "01".into(),
                ..Default::default()
            })
            .await,
        "ClusterService.RevokeCert",
    );
    denied(
        nc.node.list(grpc::ListNodesRequest {}).await,
        "NodeService.List",
    );
    nc.cluster
        .status(grpc::ClusterStatusRequest {})
        .await
        .unwrap();
    denied(
        nc.node
            .heartbeat(grpc::HeartbeatRequest {
                id: "someone-else".into(),
                ..Default::default()
            })
            .await,
        "the client certificate names \"n1\"",
    );
    // cell0ctl with the node certificate says so too.
    let o = m2.ctl(Some(&n1), &["ps"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("needs a member or client certificate"),
        "{o:?}"
    );
    // The refusals are in the member's log and audit log.
    assert!(m1.log().contains("refused a gRPC request: VmService.List"));
    let audit = audit_lines(&m1);
    assert!(
        audit.iter().any(|l| l["method"] == "VmService.List"
            && l["target"] == "cert/n1"
            && l["code"] == "PermissionDenied"),
        "{audit:#?}"
    );

    // Revocation: `ops` revokes `admin` through a follower; the leader
    // commits it and every member refuses admin's next request, on its
    // open connection too, while `ops` goes on.
    let mut a2 = m2.client(&admin).await;
    let mut a3 = m3.client(&admin).await;
    assert!(!revoked(&mut a2).await && !revoked(&mut a3).await);
    let follower = [&m1, &m2, &m3]
        .into_iter()
        .find(|m| {
            let o = m.ctl(Some(&ops), &["cluster", "status", "-o", "json"]);
            let v: Value = serde_json::from_slice(&o.stdout).unwrap();
            v["leader_id"] != v["node_id"]
        })
        .unwrap();
    let admin_cert = admin.join("cert.pem");
    let o = follower.ctl(
        Some(&ops),
        &[
            "cluster",
            "revoke",
            "--cert",
            admin_cert.to_str().unwrap(),
            "--reason",
            "laptop lost",
            "-o",
            "json",
        ],
    );
    assert!(
        o.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&o.stderr),
        tail(&follower.log(), 3000)
    );
    let list: Value = serde_json::from_slice(&o.stdout).unwrap();
    let serial = TlsDir::load(&admin).unwrap().serial();
    assert_eq!(list[0]["serial"], serial.as_str(), "{list:#}");
    assert_eq!(list[0]["name"], "admin");
    assert_eq!(list[0]["revoked_by"], "ops");
    assert_eq!(list[0]["reason"], "laptop lost");
    for c in [&mut a1, &mut a2, &mut a3] {
        eventually("admin refused", || {
            let mut c = c.clone();
            async move { revoked(&mut c).await }
        })
        .await;
    }
    let msg = denied(
        a1.vm.create(spec("v2")).await,
        &format!("(serial {serial}) is revoked: laptop lost"),
    );
    println!("revoked: {msg}");
    let o = m3.ctl(Some(&admin), &["ps"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("is revoked"));
    // Another client goes on.
    let mut oc = m1.client(&ops).await;
    assert_eq!(names(&mut oc).await, ["v1"]);
    assert!(
        audit_lines(&m1)
            .iter()
            .any(|l| l["method"] == "RevokeCert" && l["code"] == "Ok")
            || audit_lines(follower)
                .iter()
                .any(|l| l["method"] == "RevokeCert" && l["code"] == "Ok")
    );
    assert!(
        audit_lines(&m1).iter().any(|l| l["target"] == "cert/admin"
            && l["message"].as_str().unwrap_or("").contains("revoked")),
        "the refusal is audited"
    );

    // A member refuses to revoke its own certificate, and a client its own.
    let own = pki.join("cert.pem");
    let o = m1.ctl(
        Some(&ops),
        &["cluster", "revoke", "--cert", own.to_str().unwrap()],
    );
    assert_eq!(o.status.code(), Some(11), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("member 1 itself"));
    let o = m1.ctl(
        Some(&ops),
        &[
            "cluster",
            "revoke",
            "--cert",
            ops.join("cert.pem").to_str().unwrap(),
        ],
    );
    assert_eq!(o.status.code(), Some(11), "{o:?}");
    let o = m1.ctl(Some(&ops), &["cluster", "revoke", "--serial", "xyz"]);
    assert_eq!(o.status.code(), Some(4), "{o:?}");

    // Restart every member: the CA in m1's pki is reused, and the
    // revocation is still there, on every member.
    drop((a1, a2, a3, oc, nc));
    let mut ms = vec![m1, m2, m3];
    for m in &mut ms {
        let mut c = m.child.take().unwrap();
        c.kill().unwrap();
        c.wait().unwrap();
    }
    let m1 = Member::start_with(base, 1, None, &ms[0].addr, &["--init"], &[]);
    let m2 = Member::start_with(base, 2, Some(&base.join("m2.tls")), &ms[1].addr, &[], &[]);
    let m3 = Member::start_with(base, 3, Some(&base.join("m3.tls")), &ms[2].addr, &[], &[]);
    drop(ms);
    assert_eq!(
        std::fs::read_to_string(pki.join("ca.pem")).unwrap(),
        ca_pem,
        "a restart reuses the CA"
    );
    m1.wait_api();
    m2.wait_api();
    m3.wait_api();
    for m in [&m1, &m2, &m3] {
        let mut c = m.client(&admin).await;
        eventually("admin refused after restart", || {
            let mut c = c.clone();
            async move { revoked(&mut c).await }
        })
        .await;
        let o = m.ctl(Some(&ops), &["cluster", "revocations", "-o", "json"]);
        assert!(o.status.success(), "{o:?}");
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v[0]["serial"], serial.as_str(), "{v:#}");
        let mut oc = m.client(&ops).await;
        assert_eq!(names(&mut oc).await, ["v1"]);
        let _ = &mut c;
    }
    let table = m2.ctl_ok_table(&ops);
    assert!(
        table.contains("admin") && table.contains("laptop lost"),
        "{table}"
    );
}

impl Member {
    fn ctl_ok_table(&self, tls: &Path) -> String {
        let o = self.ctl(Some(tls), &["cluster", "revocations"]);
        assert!(o.status.success(), "{o:?}");
        String::from_utf8(o.stdout).unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_and_nodes_without_tls_material_refuse_to_start() {
    let _g = SERIAL.lock().await;
    let d = tempdir();
    let base = d.path();
    let serve = |name: &str, extra: &[&str]| {
        let data = base.join(name);
        let mut args = vec![
            "serve",
            "--data-dir",
            data.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
            "--node-id",
            "2",
        ];
        args.extend_from_slice(ARGS);
        args.extend_from_slice(extra);
        let o = Command::new(env!("CARGO_BIN_EXE_cell0d"))
            .args(&args)
            .env_remove("CELL0_TLS_DIR")
            .output()
            .unwrap();
        (o, data)
    };
    // A joining member needs a certificate of the cluster's CA.
    let (o, data) = serve("join", &["--join"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    println!("--join: {err}");
    assert!(
        err.contains("without TLS material")
            && err.contains("cell0d issue-cert --ca-dir")
            && err.contains("--insecure-plaintext"),
        "{err}"
    );
    assert!(!data.join("pki").exists());
    // Static --peers init: one CA for all, made with init-ca.
    let (o, _) = serve("peers", &["--init", "--peers", "1=127.0.0.1:1"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("cell0d init-ca") && err.contains("--insecure-plaintext"),
        "{err}"
    );
    // --insecure-plaintext with a --tls-dir is a contradiction.
    let (o, _) = serve(
        "both",
        &["--join", "--insecure-plaintext", "--tls-dir", "/x"],
    );
    assert!(!o.status.success());
    // A node agent too.
    let o = cell0d(&[
        "node",
        "--join",
        "127.0.0.1:1",
        "--node-name",
        "n1",
        "--data-dir",
        base.join("node").to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--tls-dir") && err.contains("--insecure-plaintext"),
        "{err}"
    );
    // cell0ctl to another host over plain TCP: only when told so.
    let o = Command::new(env!("CARGO_BIN_EXE_cell0ctl"))
        .args(["--endpoint", "10.255.255.1:7070", "cluster", "status"])
        .env_remove("CELL0_TLS_DIR")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("--insecure-plaintext"));

    // --insecure-plaintext starts, saying so; the one-member loopback
    // default stays plain TCP and makes no CA.
    let m = Member::start_with(
        base,
        4,
        None,
        "127.0.0.1:0",
        &["--join", "--insecure-plaintext"],
        &[],
    );
    assert!(m.log().contains("INSECURE"), "{}", m.log());
    let o = m.ctl(None, &["cluster", "status", "-o", "json"]);
    assert!(o.status.success(), "{o:?}");
    assert!(!m.data().join("pki").exists());
    drop(m);
    let m = Member::start_with(base, 5, None, "127.0.0.1:0", &[], &[]);
    m.wait_api();
    assert!(!m.data().join("pki").exists());
    let o = m.ctl(None, &["ps"]);
    assert!(o.status.success(), "{o:?}");
}
