// SPDX-License-Identifier: Apache-2.0
//! The Linux guest agent's SYPAS logic (`cell0_agent::session`, the code that
//! runs as PID 1 in a guest) against the real router, over Unix sockets: the
//! VM listener is the socket the VMM's hybrid vsock would connect the guest's
//! port 1024 to. Bootstrap → token → ready → workload output EVENTs → exec,
//! files, heartbeats → reconnect with the token → shutdown; and every way a
//! guest could reach for another VM's token or rights is refused, typed.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cell0_agent::api;
use cell0_agent::session::{self, AgentConfig, Outcome};
use cell0_agent::transport::Endpoint as AgentEndpoint;
use cell0_control::router::guest::{self, AgentBootstrap, GuestAgent, GuestAgentSource};
use cell0_control::router::{HOST_VM, Router, RouterConfig};
use cell0_control::token::Claims;
use cell0_control::token::keys::unix_now;
use cell0_proto::ErrorCode;
use cell0_proto::host::{Client, ClientConfig, Endpoint, ReconnectPolicy};
use cell0_proto::msg::{Event, Right};
use prost::Message;
use tokio::sync::mpsc;

struct Source(HashMap<String, GuestAgent>);

impl GuestAgentSource for Source {
    fn guest_agent(&self, vm: &str) -> Option<GuestAgent> {
        self.0.get(vm).cloned()
    }
}

fn cmd(argv: &[&str]) -> api::Command {
    api::Command {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn mint(router: &Router, agent: &str, vm: &str, rights: Vec<Right>) -> Bytes {
    let claims = Claims {
        agent: agent.into(),
        vm: vm.into(),
        rights,
        expires: unix_now() + 600,
    };
    router.minter().unwrap().mint(&claims).unwrap().into()
}

fn client_cfg(agent: &str, token: Bytes) -> ClientConfig {
    ClientConfig {
        agent_id: agent.into(),
        token,
        reconnect: ReconnectPolicy::never(),
        call_timeout: Duration::from_secs(20),
        connect_timeout: Duration::from_secs(10),
        ..ClientConfig::default()
    }
}

async fn connect(
    path: &Path,
    agent: &str,
    token: Bytes,
) -> Result<Client, cell0_proto::host::ClientError> {
    Client::connect(Endpoint::Unix(path.to_path_buf()), client_cfg(agent, token)).await
}

fn agent_cfg(path: &Path) -> AgentConfig {
    let mut c = AgentConfig::new(AgentEndpoint::Unix(path.to_path_buf()));
    c.max_connect_attempts = Some(50);
    c.backoff = (Duration::from_millis(10), Duration::from_millis(100));
    c
}

async fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn code(e: &cell0_proto::host::ClientError) -> Option<ErrorCode> {
    e.code()
}

/// EVENTs of the host client, gathered until `done` holds.
async fn gather(
    rx: &mut mpsc::Receiver<Event>,
    seen: &mut Vec<Event>,
    done: impl Fn(&[Event]) -> bool,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !done(seen) {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(e)) => seen.push(e),
            Ok(None) => panic!("the host client's event stream ended: {seen:?}"),
            Err(_) => panic!("timed out; events so far: {seen:?}"),
        }
    }
}

fn stream(events: &[Event], topic: &str) -> Vec<u8> {
    events
        .iter()
        .filter(|e| e.topic == topic)
        .flat_map(|e| e.payload.to_vec())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guest_agent_bootstraps_reports_ready_streams_and_serves_exec_through_the_router() {
    let dir = tempfile::tempdir().unwrap();
    let router = Router::new(RouterConfig::new(dir.path().join("data"))).unwrap();
    let host_sock = dir.path().join("router.sock");
    router.listen_host(&host_sock).await.unwrap();
    let vm1 = dir.path().join("vm1.sock_1024");
    let vm2 = dir.path().join("vm2.sock_1024");
    let vm3 = dir.path().join("vm3.sock_1024");
    for (vm, p) in [("vm1", &vm1), ("vm2", &vm2), ("vm3", &vm3)] {
        router
            .attach_vm_with_window(vm, p, None, None)
            .await
            .unwrap();
    }
    // vm1: an explicit registration (fast heartbeats); vm2: from the source,
    // as cell0d does it from the VM records; vm3: no guest agent (nano).
    let mut rights = guest::agent_rights("a1");
    rights.push(Right::new("echo", "*"));
    let a1_token = mint(&router, "a1", "vm1", rights);
    router
        .set_agent_bootstrap(
            "vm1",
            AgentBootstrap {
                agent_id: "a1".into(),
                token: a1_token.clone(),
                workload: Some(cmd(&[
                    "sh",
                    "-c",
                    "echo hello; echo oops >&2; sleep 0.2; exit 4",
                ])),
                heartbeat_ms: 100,
            },
        )
        .unwrap();
    router.set_guest_agent_source(Arc::new(Source(HashMap::from([(
        "vm2".to_string(),
        GuestAgent {
            agent_id: "a2".into(),
            rights: vec![],
            workload: None,
        },
    )]))));

    // The host side: a process on the router's host socket that may call any
    // agent and read the agents' streams.
    let ctl_token = mint(
        &router,
        "ctl",
        HOST_VM,
        vec![
            Right::new("agent/*", "*"),
            Right::new("event/agent/*", "subscribe"),
        ],
    );
    let ctl = connect(&host_sock, "ctl", ctl_token).await.unwrap();
    let mut events = ctl.events().unwrap();
    for t in ["stdout", "stderr", "exit", "heartbeat"] {
        ctl.subscribe(&api::topic("a1", t)).await.unwrap();
    }

    // The agent, as PID 1 would run it, with no agent id on its cmdline.
    let agent = tokio::spawn(session::run(agent_cfg(&vm1)));

    let st = wait_for("ready", || {
        router.agent_status("vm1").filter(|s| s.ready.is_some())
    })
    .await;
    assert_eq!(st.bootstraps, 1);
    let ready = st.ready.unwrap();
    assert_eq!(ready.agent_id, "a1");
    assert!(ready.kernel.starts_with("Linux "), "{ready:?}");
    assert!(ready.ready_ns > 0);
    assert_eq!(
        router.agents(),
        vec![
            ("a1".to_string(), "vm1".to_string()),
            ("ctl".to_string(), HOST_VM.to_string())
        ]
    );

    // The workload's output, then its exit, then heartbeats.
    let mut seen = Vec::new();
    gather(&mut events, &mut seen, |s| {
        s.iter().any(|e| e.topic == "agent/a1/exit")
            && s.iter().filter(|e| e.topic == "agent/a1/heartbeat").count() >= 2
    })
    .await;
    assert_eq!(stream(&seen, "agent/a1/stdout"), b"hello\n");
    assert_eq!(stream(&seen, "agent/a1/stderr"), b"oops\n");
    let exit_at = seen
        .iter()
        .position(|e| e.topic == "agent/a1/exit")
        .unwrap();
    assert_eq!(
        api::ExitStatus::decode(seen[exit_at].payload.clone()).unwrap(),
        api::ExitStatus { code: 4, signal: 0 }
    );
    let last_out = seen
        .iter()
        .rposition(|e| e.topic.ends_with("/stdout") || e.topic.ends_with("/stderr"))
        .unwrap();
    assert!(last_out < exit_at, "{seen:?}");
    assert!(seen.iter().all(|e| e.source == "a1"));
    let hb = seen
        .iter()
        .rev()
        .find(|e| e.topic == "agent/a1/heartbeat")
        .unwrap();
    assert!(api::Heartbeat::decode(hb.payload.clone()).unwrap().seq >= 2);
    assert!(router.agent_status("vm1").unwrap().heartbeats >= 2);

    // exec from a host process, routed to agent/a1.
    let exec = |argv: &[&str]| {
        api::ExecRequest {
            command: Some(cmd(argv)),
            ..Default::default()
        }
        .encode_to_vec()
    };
    let r = ctl
        .call("agent/a1", api::M_EXEC, exec(&["uname", "-a"]))
        .await
        .unwrap();
    let r = api::ExecReply::decode(r.payload).unwrap();
    assert_eq!(r.status, Some(api::ExitStatus { code: 0, signal: 0 }));
    assert!(String::from_utf8_lossy(&r.stdout).starts_with("Linux "));
    // exec from the control plane (what VmService.Exec does).
    let r = router
        .call_vm_agent(
            "vm1",
            api::M_EXEC,
            exec(&["sh", "-c", "echo $((6*7)); exit 3"]).into(),
            Duration::from_secs(20),
        )
        .await
        .unwrap();
    let r = api::ExecReply::decode(r.payload).unwrap();
    assert_eq!(&r.stdout[..], b"42\n");
    assert_eq!(r.status.unwrap().code, 3);
    // Files.
    let f = dir.path().join("put/f.bin").display().to_string();
    let put = api::PutFile {
        path: f.clone(),
        data: Bytes::from(vec![7u8; 100_000]),
        mode: 0o640,
        mkdirs: true,
    };
    ctl.call("agent/a1", api::M_PUT_FILE, put.encode_to_vec())
        .await
        .unwrap();
    let got = ctl
        .call(
            "agent/a1",
            api::M_GET_FILE,
            api::GetFile { path: f }.encode_to_vec(),
        )
        .await
        .unwrap();
    let got = api::FileData::decode(got.payload).unwrap();
    assert_eq!(got.data.len(), 100_000);
    assert_eq!(got.mode, 0o640);
    // The agent's own typed errors come back through the router.
    let e = ctl
        .call("agent/a1", api::M_EXEC, exec(&["/no/such/prog"]))
        .await
        .unwrap_err();
    assert_eq!(code(&e), Some(ErrorCode::BadRequest), "{e:?}");
    // vm2's agent is not connected; vm3 has none.
    let e = router
        .call_vm_agent("vm2", api::M_EXEC, Bytes::new(), Duration::from_secs(5))
        .await
        .unwrap_err();
    assert_eq!(e.error_code(), Some(ErrorCode::AgentUnreachable));
    let e = router
        .call_vm_agent("vm3", api::M_EXEC, Bytes::new(), Duration::from_secs(5))
        .await
        .unwrap_err();
    assert_eq!(e.error_code(), Some(ErrorCode::AgentUnreachable));
    assert!(e.message.contains("no cell0 guest agent"), "{}", e.message);

    // ---- What a guest cannot do.
    // A token-less HELLO where the VM has no guest agent: refused, typed.
    let e = connect(&vm3, "x", Bytes::new()).await.unwrap_err();
    assert_eq!(code(&e), Some(ErrorCode::PermissionDenied), "{e:?}");
    // ... and on the host socket.
    let e = connect(&host_sock, "x", Bytes::new()).await.unwrap_err();
    assert_eq!(code(&e), Some(ErrorCode::TokenInvalid), "{e:?}");
    // A bootstrap session, even one that claims to be "a1" and to want vm2's
    // token, gets vm1's registration: the listener decides, not the caller.
    let boot = connect(&vm1, "a1", Bytes::new()).await.unwrap();
    let req = api::BootstrapRequest {
        agent_version: "x".into(),
        kernel_release: "vm2".into(),
    };
    let r = boot
        .call(api::NODE_SERVICE, api::M_BOOTSTRAP, req.encode_to_vec())
        .await
        .unwrap();
    let b = api::BootstrapReply::decode(r.payload).unwrap();
    assert_eq!((b.agent_id.as_str(), &b.token), ("a1", &a1_token));
    // It may do nothing else: no CALL, no REFRESH into a full session, and it
    // does not take over `agent/a1`.
    for (svc, m) in [
        ("echo", "echo"),
        ("agent/a1", "exec"),
        (api::NODE_SERVICE, "ready"),
        ("router", "whoami"),
    ] {
        let e = boot.call(svc, m, Vec::new()).await.unwrap_err();
        assert_eq!(
            code(&e),
            Some(ErrorCode::PermissionDenied),
            "{svc}/{m}: {e:?}"
        );
    }
    let e = boot.publish("agent/a1/stdout", "forged").await.unwrap_err();
    assert_eq!(code(&e), Some(ErrorCode::PermissionDenied), "{e:?}");
    let e = boot.refresh(a1_token.clone()).await.unwrap_err();
    assert_eq!(code(&e), Some(ErrorCode::PermissionDenied), "{e:?}");
    let r = ctl
        .call("agent/a1", api::M_EXEC, exec(&["true"]))
        .await
        .unwrap();
    assert_eq!(
        api::ExecReply::decode(r.payload)
            .unwrap()
            .status
            .unwrap()
            .code,
        0
    );
    drop(boot);
    // vm2's bootstrap mints a token bound to vm2 ...
    let boot2 = connect(&vm2, "", Bytes::new()).await.unwrap();
    let r = boot2
        .call(api::NODE_SERVICE, api::M_BOOTSTRAP, req.encode_to_vec())
        .await
        .unwrap();
    let b2 = api::BootstrapReply::decode(r.payload).unwrap();
    assert_eq!(b2.agent_id, "a2");
    let claims = router.verifier().verify(&b2.token).unwrap().claims;
    assert_eq!((claims.agent.as_str(), claims.vm.as_str()), ("a2", "vm2"));
    assert!(cell0_proto::msg::permits(
        &claims.rights,
        "event/agent/a2/stdout",
        "publish"
    ));
    assert!(!cell0_proto::msg::permits(
        &claims.rights,
        "event/agent/a1/stdout",
        "publish"
    ));
    // A second bootstrap there gets the same token (no signing per bootstrap).
    let r = boot2
        .call(api::NODE_SERVICE, api::M_BOOTSTRAP, req.encode_to_vec())
        .await
        .unwrap();
    assert_eq!(
        api::BootstrapReply::decode(r.payload).unwrap().token,
        b2.token
    );
    // ... which is refused on any other VM's listener.
    let e = connect(&vm1, "a2", b2.token.clone()).await.unwrap_err();
    assert_eq!(code(&e), Some(ErrorCode::AgentMismatch), "{e:?}");
    let e = connect(&vm3, "a2", b2.token.clone()).await.unwrap_err();
    assert_eq!(code(&e), Some(ErrorCode::AgentMismatch), "{e:?}");
    // and on its own VM it works (and may not publish on a1's topics).
    let a2 = connect(&vm2, "a2", b2.token.clone()).await.unwrap();
    let e = a2.publish("agent/a1/stdout", "forged").await.unwrap_err();
    assert_eq!(code(&e), Some(ErrorCode::PermissionDenied), "{e:?}");
    drop(a2);
    drop(boot2);

    // Counters moved: CALLs to cell0.node and to agents; refusals by code.
    let stats = router.stats();
    let calls: HashMap<_, _> = stats.calls().into_iter().collect();
    assert!(calls["node"] >= 4, "{calls:?}");
    assert!(calls["agent"] >= 5, "{calls:?}");
    let denials: HashMap<_, _> = stats.denials().into_iter().collect();
    assert!(denials["PERMISSION_DENIED"] >= 7, "{denials:?}");
    assert!(denials["AGENT_MISMATCH"] >= 2, "{denials:?}");

    // The router drops the VM's connections (as at a cell0d restart): the
    // agent comes back with its token, without bootstrapping again.
    router.detach_vm("vm1").await.unwrap();
    router
        .attach_vm_with_window("vm1", &vm1, None, None)
        .await
        .unwrap();
    let st = wait_for("ready again", || {
        router.agent_status("vm1").filter(|s| s.ready.is_some())
    })
    .await;
    assert_eq!(st.bootstraps, 0, "the reconnect used the token");
    let r = ctl
        .call("agent/a1", api::M_EXEC, exec(&["echo", "back"]))
        .await
        .unwrap();
    assert_eq!(
        &api::ExecReply::decode(r.payload).unwrap().stdout[..],
        b"back\n"
    );

    // Shutdown through the router ends the agent.
    let sd = api::Shutdown {
        grace_ms: 1000,
        reason: "test over".into(),
    };
    ctl.call("agent/a1", api::M_SHUTDOWN, sd.encode_to_vec())
        .await
        .unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(20), agent)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        outcome,
        Outcome::Shutdown {
            reason: "test over".into()
        }
    );
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_handed_a_token_for_another_vm_never_gets_a_session() {
    // A registration whose token is bound to another VM (a control-plane
    // bug, or a forged reply) cannot be used: HELLO with it is refused on
    // this VM's listener, and the agent starts over and finally gives up.
    let dir = tempfile::tempdir().unwrap();
    let router = Router::new(RouterConfig::new(dir.path().join("data"))).unwrap();
    let vm1 = dir.path().join("vm1.sock_1024");
    router
        .attach_vm_with_window("vm1", &vm1, None, None)
        .await
        .unwrap();
    let other = mint(&router, "a1", "vm2", guest::agent_rights("a1"));
    router
        .set_agent_bootstrap(
            "vm1",
            AgentBootstrap {
                agent_id: "a1".into(),
                token: other,
                workload: None,
                heartbeat_ms: 0,
            },
        )
        .unwrap();
    let mut cfg = agent_cfg(&vm1);
    cfg.max_connect_attempts = Some(3);
    let outcome = tokio::time::timeout(Duration::from_secs(30), session::run(cfg))
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::GaveUp { attempts: 3 });
    assert!(router.agents().is_empty());
    assert_eq!(router.agent_status("vm1").unwrap().bootstraps, 3);
    let denials: HashMap<_, _> = router.stats().denials().into_iter().collect();
    assert_eq!(denials.get("AGENT_MISMATCH"), Some(&3), "{denials:?}");
    router.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_whose_token_expires_bootstraps_again_and_keeps_streaming() {
    let dir = tempfile::tempdir().unwrap();
    let router = Router::new(RouterConfig::new(dir.path().join("data"))).unwrap();
    let host_sock = dir.path().join("router.sock");
    router.listen_host(&host_sock).await.unwrap();
    let vm1 = dir.path().join("vm1.sock_1024");
    router
        .attach_vm_with_window("vm1", &vm1, None, None)
        .await
        .unwrap();
    let short = Claims {
        agent: "a1".into(),
        vm: "vm1".into(),
        rights: guest::agent_rights("a1"),
        expires: unix_now() + 2,
    };
    let short: Bytes = router.minter().unwrap().mint(&short).unwrap().into();
    let boot = |token: Bytes| AgentBootstrap {
        agent_id: "a1".into(),
        token,
        workload: None,
        heartbeat_ms: 100,
    };
    router.set_agent_bootstrap("vm1", boot(short)).unwrap();
    let ctl_token = mint(
        &router,
        "ctl",
        HOST_VM,
        vec![
            Right::new("agent/*", "*"),
            Right::new("event/agent/*", "subscribe"),
        ],
    );
    let ctl = connect(&host_sock, "ctl", ctl_token).await.unwrap();
    let mut events = ctl.events().unwrap();
    ctl.subscribe("agent/a1/heartbeat").await.unwrap();
    let agent = tokio::spawn(session::run(agent_cfg(&vm1)));
    wait_for("ready", || {
        router.agent_status("vm1").filter(|s| s.ready.is_some())
    })
    .await;
    // The next bootstrap hands out a token that lasts.
    router
        .set_agent_bootstrap(
            "vm1",
            boot(mint(&router, "a1", "vm1", guest::agent_rights("a1"))),
        )
        .unwrap();
    wait_for("a second bootstrap", || {
        router.agent_status("vm1").filter(|s| s.bootstraps == 2)
    })
    .await;
    let denials: HashMap<_, _> = router.stats().denials().into_iter().collect();
    assert!(denials.contains_key("TOKEN_EXPIRED"), "{denials:?}");
    // Heartbeats flow again, with the new token, and none was lost: their
    // sequence numbers run on without a gap.
    let mut seen = Vec::new();
    gather(&mut events, &mut seen, |s| s.len() >= 40).await;
    let seqs: Vec<u64> = seen
        .iter()
        .map(|e| api::Heartbeat::decode(e.payload.clone()).unwrap().seq)
        .collect();
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "heartbeats were lost or reordered: {seqs:?}"
    );
    assert_eq!(router.agent_status("vm1").unwrap().bootstraps, 2);
    let sd = api::Shutdown {
        grace_ms: 100,
        reason: "done".into(),
    };
    ctl.call("agent/a1", api::M_SHUTDOWN, sd.encode_to_vec())
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(20), agent)
        .await
        .unwrap()
        .unwrap();
    router.shutdown().await;
}
