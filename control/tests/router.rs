// SPDX-License-Identifier: Apache-2.0
//! The SYPAS router as a real `cell0d router` process over real Unix
//! sockets: every refusal with its own code, agents talking through the
//! router, host services, pub/sub back-pressure, key rotation, the audit log
//! and shared-memory refs against a memfd handed over like the VMM does.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use cell0_control::router::vmapi::MockVmApi;
use cell0_proto::ErrorCode;
use cell0_proto::frame::Kind;
use cell0_proto::host::{AgentClient, RefreshPolicy, TokenSourceError};
use cell0_proto::msg::{Call, Event, Hello, Reply, ShmRef, Subscribe, Welcome};
use common::{Raw, RouterProc, code, connect};

const ECHO: (&str, &str) = ("echo", "*");

fn hello(agent: &str, token: Bytes) -> Hello {
    Hello {
        versions: vec![1],
        agent_id: agent.into(),
        token,
    }
}

fn echo_call(payload: &'static [u8]) -> Call {
    Call {
        service: "echo".into(),
        method: "echo".into(),
        payload: Bytes::from_static(payload),
        shm: vec![],
    }
}

#[tokio::test]
async fn welcome_returns_the_granted_rights_and_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let r = RouterProc::start(dir.path(), &[]);
    let token = r.token("a1", "host", &[ECHO, ("agent/*", "ping")], 600);
    let c = connect(&r.socket, "a1", token).await.unwrap();
    let w = c.welcome().unwrap();
    assert_eq!(w.rights.len(), 2);
    assert_eq!(w.rights[1].service, "agent/*");
    let now = cell0_proto::host::unix_now();
    assert!(
        w.token_expiry > now + 500 && w.token_expiry <= now + 600,
        "{w:?}"
    );
    let reply = c.call("echo", "echo", &b"hi"[..]).await.unwrap();
    assert_eq!(&reply.payload[..], b"hi");
}

/// Which bad token a refusal test sends.
enum Bad {
    Expired,
    Forged,
    Garbage,
    AnotherRoot,
    Widening,
    AnotherAgent,
    AnotherVm,
}

/// Sends HELLO with a bad token on the host socket, expects `want` (also
/// through the client library), then shows nothing was disturbed: the same
/// connection says HELLO with a good token and calls, and the refusal is in
/// the audit log.
async fn refused_hello(bad: Bad, want: ErrorCode) {
    let dir = tempfile::tempdir().unwrap();
    let vm7 = dir.path().join("vm7.sock");
    let r = RouterProc::start(dir.path(), &["--vm", &format!("vm7={}", vm7.display())]);
    let good = r.token("a1", "host", &[ECHO], 600);
    let ks = cell0_control::token::keys::KeyStore::open(&r.data).unwrap();
    let (agent, token): (&str, Bytes) = match bad {
        Bad::Expired => ("a1", r.token("a1", "host", &[ECHO], 0)),
        // The right key id, another key's signature.
        Bad::Forged => (
            "a1",
            biscuit_auth::Biscuit::builder()
                .root_key_id(ks.signing_key_id())
                .code(r#"agent("a1"); vm("host"); right("*", "*"); expires(4000000000);"#)
                .unwrap()
                .build(&biscuit_auth::KeyPair::new())
                .unwrap()
                .to_vec()
                .unwrap()
                .into(),
        ),
        Bad::Garbage => ("a1", Bytes::from_static(b"not a token")),
        // Signed by the root key of a whole other data dir.
        Bad::AnotherRoot => {
            let other = tempfile::tempdir().unwrap();
            let t = cell0_control::token::keys::KeyStore::open(other.path())
                .unwrap()
                .minter()
                .mint(&cell0_control::token::Claims {
                    agent: "a1".into(),
                    vm: "host".into(),
                    rights: vec![cell0_proto::msg::Right::all()],
                    expires: cell0_proto::host::unix_now() + 600,
                })
                .unwrap();
            ("a1", t.into())
        }
        // A holder's block that claims everything.
        Bad::Widening => (
            "a1",
            biscuit_auth::UnverifiedBiscuit::from(&good[..])
                .unwrap()
                .append(
                    biscuit_auth::BlockBuilder::new()
                        .code(r#"right("*", "*");"#)
                        .unwrap(),
                )
                .unwrap()
                .to_vec()
                .unwrap()
                .into(),
        ),
        Bad::AnotherAgent => ("a2", good.clone()),
        Bad::AnotherVm => ("a1", r.token("a1", "vm7", &[ECHO], 600)),
    };
    let mut raw = Raw::connect(&r.socket).await;
    raw.send(Kind::Hello, 1, &hello(agent, token.clone())).await;
    assert_eq!(raw.error_code(1).await, want.as_u32());
    assert_eq!(code(connect(&r.socket, agent, token).await), want);
    // Nothing was disturbed: the same connection says HELLO and calls.
    raw.send(Kind::Hello, 2, &hello("a1", good)).await;
    let w = raw.answer(2).await;
    assert_eq!(w.kind, Kind::Welcome);
    let welcome: Welcome = w.decode_message().unwrap();
    assert_eq!(welcome.rights.len(), 1);
    raw.send(Kind::Call, 3, &echo_call(b"still here")).await;
    let f = raw.answer(3).await;
    assert_eq!(f.kind, Kind::Reply);
    assert_eq!(
        &f.decode_message::<Reply>().unwrap().payload[..],
        b"still here"
    );
    let line = r.wait_audit(|v| v["code"] == want.name()).await;
    assert_eq!(line["kind"], "HELLO");
    assert_eq!(line["vm"], "host");
    assert_eq!(line["agent"], agent);
}

#[tokio::test]
async fn an_expired_token_is_token_expired() {
    refused_hello(Bad::Expired, ErrorCode::TokenExpired).await;
}

#[tokio::test]
async fn a_forged_signature_is_token_invalid() {
    refused_hello(Bad::Forged, ErrorCode::TokenInvalid).await;
}

#[tokio::test]
async fn bytes_that_are_no_token_are_token_invalid() {
    refused_hello(Bad::Garbage, ErrorCode::TokenInvalid).await;
}

#[tokio::test]
async fn a_token_of_another_root_is_wrong_root() {
    refused_hello(Bad::AnotherRoot, ErrorCode::WrongRoot).await;
}

#[tokio::test]
async fn a_widening_attenuation_is_attenuation_widens() {
    refused_hello(Bad::Widening, ErrorCode::AttenuationWidens).await;
}

#[tokio::test]
async fn a_token_of_another_agent_is_agent_mismatch() {
    refused_hello(Bad::AnotherAgent, ErrorCode::AgentMismatch).await;
}

#[tokio::test]
async fn a_token_of_another_vm_is_agent_mismatch() {
    refused_hello(Bad::AnotherVm, ErrorCode::AgentMismatch).await;
}

/// A router and a raw connection that has said HELLO as `a1` with (echo, echo).
async fn helloed(dir: &std::path::Path) -> (RouterProc, Raw) {
    let r = RouterProc::start(dir, &[]);
    let token = r.token("a1", "host", &[("echo", "echo")], 600);
    let mut raw = Raw::connect(&r.socket).await;
    raw.send(Kind::Hello, 1, &hello("a1", token)).await;
    assert_eq!(raw.answer(1).await.kind, Kind::Welcome);
    (r, raw)
}

#[tokio::test]
async fn a_call_before_hello_is_not_hello() {
    let dir = tempfile::tempdir().unwrap();
    let r = RouterProc::start(dir.path(), &[]);
    let mut raw = Raw::connect(&r.socket).await;
    raw.send(Kind::Call, 1, &echo_call(b"x")).await;
    assert_eq!(raw.error_code(1).await, ErrorCode::NotHello.as_u32());
    // The connection stays open for HELLO and calls.
    let token = r.token("a1", "host", &[ECHO], 600);
    raw.send(Kind::Hello, 2, &hello("a1", token)).await;
    assert_eq!(raw.answer(2).await.kind, Kind::Welcome);
    raw.send(Kind::Call, 3, &echo_call(b"ok")).await;
    assert_eq!(raw.answer(3).await.kind, Kind::Reply);
    let line = r.wait_audit(|v| v["code"] == "NOT_HELLO").await;
    assert!(line["agent"].is_null());
    assert_eq!(line["service"], "echo");
}

#[tokio::test]
async fn hello_twice_is_already_hello() {
    let dir = tempfile::tempdir().unwrap();
    let (r, mut raw) = helloed(dir.path()).await;
    let token = r.token("a2", "host", &[ECHO], 600);
    raw.send(Kind::Hello, 2, &hello("a2", token)).await;
    assert_eq!(raw.error_code(2).await, ErrorCode::AlreadyHello.as_u32());
    // The session is unchanged: still a1 with (echo, echo) only, not a2's echo/*.
    raw.send(Kind::Call, 3, &echo_call(b"ok")).await;
    assert_eq!(raw.answer(3).await.kind, Kind::Reply);
    let mut fold = echo_call(b"x");
    fold.method = "fold".into();
    raw.send(Kind::Call, 4, &fold).await;
    assert_eq!(
        raw.error_code(4).await,
        ErrorCode::PermissionDenied.as_u32()
    );
    let line = r.wait_audit(|v| v["code"] == "ALREADY_HELLO").await;
    assert_eq!(line["agent"], "a1");
}

#[tokio::test]
async fn a_missing_right_is_permission_denied() {
    let dir = tempfile::tempdir().unwrap();
    let (r, mut raw) = helloed(dir.path()).await;
    let mut fold = echo_call(b"x");
    fold.method = "fold".into();
    raw.send(Kind::Call, 2, &fold).await;
    assert_eq!(
        raw.error_code(2).await,
        ErrorCode::PermissionDenied.as_u32()
    );
    // The session still works for what it may do.
    raw.send(Kind::Call, 3, &echo_call(b"ok")).await;
    assert_eq!(raw.answer(3).await.kind, Kind::Reply);
    let line = r
        .wait_audit(|v| v["code"] == "PERMISSION_DENIED" && v["method"] == "fold")
        .await;
    assert_eq!(line["agent"], "a1");
    assert_eq!(line["vm"], "host");
    assert_eq!(line["service"], "echo");
    assert_eq!(line["kind"], "CALL");
    assert!(line["time"].as_str().unwrap().ends_with('Z'));
    assert!(line["reason"].as_str().unwrap().contains("echo/fold"));
}

#[tokio::test]
async fn an_expired_session_gets_token_expired_and_refresh_revives_it() {
    let dir = tempfile::tempdir().unwrap();
    let r = RouterProc::start(dir.path(), &[]);
    let short = r.token("a1", "host", &[ECHO], 2);
    let c = connect(&r.socket, "a1", short).await.unwrap();
    c.call("echo", "echo", &b"1"[..]).await.unwrap();
    let expiry = c.welcome().unwrap().token_expiry;
    while cell0_proto::host::unix_now() < expiry {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        code(c.call("echo", "echo", &b"2"[..]).await),
        ErrorCode::TokenExpired
    );
    r.wait_audit(|v| v["code"] == "TOKEN_EXPIRED" && v["kind"] == "CALL")
        .await;
    // REFRESH with a token for another agent is refused; with a good one it works.
    let other = r.token("a2", "host", &[ECHO], 600);
    assert_eq!(code(c.refresh(other).await), ErrorCode::AgentMismatch);
    let w = c
        .refresh(r.token("a1", "host", &[ECHO], 600))
        .await
        .unwrap();
    assert!(w.token_expiry > expiry);
    c.call("echo", "echo", &b"3"[..]).await.unwrap();
}

#[tokio::test]
async fn agents_in_different_vms_talk_and_a_third_without_the_right_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = |n: &str| dir.path().join(n);
    let r = RouterProc::start(
        dir.path(),
        &[
            "--vm",
            &format!("vm-a={}", s("a.sock").display()),
            "--vm",
            &format!("vm-b={}", s("b.sock").display()),
            "--vm",
            &format!("vm-c={}", s("c.sock").display()),
        ],
    );
    let ta = r.token("alice", "vm-a", &[("agent/bob", "*")], 600);
    let tb = r.token("bob", "vm-b", &[("agent/alice", "*")], 600);
    let tc = r.token("carol", "vm-c", &[ECHO], 600);
    let alice = connect(&s("a.sock"), "alice", ta).await.unwrap();
    let bob = connect(&s("b.sock"), "bob", tb).await.unwrap();
    let carol = connect(&s("c.sock"), "carol", tc).await.unwrap();
    // Each answers CALLs with "<me> got <payload> from <caller address>".
    for (name, c) in [("alice", &alice), ("bob", &bob)] {
        let mut rx = c.incoming().unwrap();
        let name = name.to_owned();
        tokio::spawn(async move {
            while let Some(inc) = rx.recv().await {
                let text = format!(
                    "{name} got {} from {}",
                    String::from_utf8_lossy(&inc.call.payload),
                    inc.call.service
                );
                let _ = inc
                    .respond(Ok(Reply {
                        payload: text.into(),
                        shm: vec![],
                    }))
                    .await;
            }
        });
    }
    let reply = alice
        .call("agent/bob", "hello", &b"hi bob"[..])
        .await
        .unwrap();
    assert_eq!(&reply.payload[..], b"bob got hi bob from agent/alice");
    let reply = bob
        .call("agent/alice", "hello", &b"hi alice"[..])
        .await
        .unwrap();
    assert_eq!(&reply.payload[..], b"alice got hi alice from agent/bob");
    // Many in flight at once, answers matched by request id.
    let calls = (0..50).map(|i| {
        let alice = alice.clone();
        async move {
            let p = format!("m{i}");
            let reply = alice.call("agent/bob", "hello", p.clone()).await.unwrap();
            assert_eq!(
                reply.payload,
                format!("bob got {p} from agent/alice").into_bytes()
            );
        }
    });
    futures_join_all(calls).await;
    // Carol has no agent rights.
    assert_eq!(
        code(carol.call("agent/alice", "hello", &b"psst"[..]).await),
        ErrorCode::PermissionDenied
    );
    let line = r
        .wait_audit(|v| v["agent"] == "carol" && v["code"] == "PERMISSION_DENIED")
        .await;
    assert_eq!(line["vm"], "vm-c");
    assert_eq!(line["service"], "agent/alice");
    // An agent that is not connected.
    drop(bob);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        code(alice.call("agent/bob", "hello", &b"anyone?"[..]).await),
        ErrorCode::AgentUnreachable
    );
}

async fn futures_join_all<F: std::future::Future<Output = ()> + Send + 'static>(
    futs: impl Iterator<Item = F>,
) {
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    for h in handles {
        h.await.unwrap();
    }
}

#[tokio::test]
async fn a_host_process_registers_a_service_that_agents_call() {
    let dir = tempfile::tempdir().unwrap();
    let vm = dir.path().join("vm.sock");
    let r = RouterProc::start(dir.path(), &["--vm", &format!("vm1={}", vm.display())]);
    let svc_token = r.token("kv-server", "host", &[("router", "register/kv")], 600);
    let svc = connect(&r.socket, "kv-server", svc_token).await.unwrap();
    let mut rx = svc.incoming().unwrap();
    tokio::spawn(async move {
        while let Some(inc) = rx.recv().await {
            let out = match inc.call.method.as_str() {
                "get" => Ok(Reply {
                    payload: [b"value of ".as_slice(), &inc.call.payload].concat().into(),
                    shm: vec![],
                }),
                _ => Err(cell0_proto::host::ServiceError::new(
                    ErrorCode::NoSuchMethod,
                    "No.",
                )),
            };
            let _ = inc.respond(out).await;
        }
    });
    svc.call("router", "register/kv", Bytes::new())
        .await
        .unwrap();
    // Another process may not take the name, nor register without the right.
    let t2 = r.token("squatter", "host", &[("router", "register/*")], 600);
    let squatter = connect(&r.socket, "squatter", t2).await.unwrap();
    assert_eq!(
        code(squatter.call("router", "register/kv", Bytes::new()).await),
        ErrorCode::BadRequest
    );
    assert_eq!(
        code(squatter.call("router", "register/echo", Bytes::new()).await),
        ErrorCode::BadRequest
    );
    assert_eq!(
        code(svc.call("router", "register/other", Bytes::new()).await),
        ErrorCode::PermissionDenied
    );
    let agent = connect(&vm, "agent1", r.token("agent1", "vm1", &[("kv", "*")], 600))
        .await
        .unwrap();
    let reply = agent.call("kv", "get", &b"k1"[..]).await.unwrap();
    assert_eq!(&reply.payload[..], b"value of k1");
    // The service's own typed errors pass through.
    assert_eq!(
        code(agent.call("kv", "put", &b""[..]).await),
        ErrorCode::NoSuchMethod
    );
    assert_eq!(
        code(agent.call("nosuch", "x", &b""[..]).await),
        ErrorCode::PermissionDenied
    );
    // When the service's process goes away, so does the service.
    drop(svc);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t3 = r.token("agent1", "vm1", &[("*", "*")], 600);
    let agent = connect(&vm, "agent1", t3).await.unwrap();
    assert_eq!(
        code(agent.call("kv", "get", &b"k1"[..]).await),
        ErrorCode::NoSuchService
    );
}

#[tokio::test]
async fn a_slow_subscriber_is_dropped_and_nobody_else_waits() {
    let dir = tempfile::tempdir().unwrap();
    let r = RouterProc::start(dir.path(), &["--outbound-queue", "256"]);
    let rights = [("event/news", "publish"), ("event/news", "subscribe")];
    // The slow one subscribes and then never reads.
    let mut slow = Raw::connect(&r.socket).await;
    slow.send(
        Kind::Hello,
        1,
        &hello("slow", r.token("slow", "host", &rights, 600)),
    )
    .await;
    assert_eq!(slow.answer(1).await.kind, Kind::Welcome);
    slow.send(
        Kind::Subscribe,
        2,
        &Subscribe {
            topic: "news".into(),
        },
    )
    .await;
    assert_eq!(slow.answer(2).await.kind, Kind::Reply);
    // The fast one reads everything.
    let fast = connect(&r.socket, "fast", r.token("fast", "host", &rights, 600))
        .await
        .unwrap();
    let mut events = fast.events().unwrap();
    fast.subscribe("news").await.unwrap();
    let n = 3000usize;
    let reader = tokio::spawn(async move {
        let mut got = 0usize;
        while got < n {
            let e: Event = tokio::time::timeout(Duration::from_secs(30), events.recv())
                .await
                .expect("the fast subscriber starved")
                .unwrap();
            assert_eq!(e.source, "pub");
            assert_eq!(e.payload.len(), 4096);
            got += 1;
        }
        got
    });
    let publisher = connect(&r.socket, "pub", r.token("pub", "host", &rights, 600))
        .await
        .unwrap();
    let payload = Bytes::from(vec![7u8; 4096]);
    for _ in 0..n {
        tokio::time::timeout(
            Duration::from_secs(10),
            publisher.publish("news", payload.clone()),
        )
        .await
        .expect("a publish was held up")
        .unwrap();
    }
    assert_eq!(reader.await.unwrap(), n);
    assert_eq!(fast.dropped_events(), 0);
    // The slow one finds, after the events that fitted, SLOW_CONSUMER and the end.
    let mut saw = None;
    while let Some(f) = slow.next().await {
        if f.kind == Kind::Error {
            saw = Some(
                f.decode_message::<cell0_proto::msg::ErrorMsg>()
                    .unwrap()
                    .code,
            );
        }
    }
    assert_eq!(saw, Some(ErrorCode::SlowConsumer.as_u32()));
    // Subscribing needs the right.
    let nosub = connect(&r.socket, "nosub", r.token("nosub", "host", &[ECHO], 600))
        .await
        .unwrap();
    assert_eq!(
        code(nosub.subscribe("news").await),
        ErrorCode::PermissionDenied
    );
    r.wait_audit(|v| v["kind"] == "SUBSCRIBE" && v["agent"] == "nosub")
        .await;
}

#[tokio::test]
async fn rotation_keeps_old_tokens_and_trusts_new_ones_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let r = RouterProc::start(dir.path(), &[]);
    let old = r.token("a1", "host", &[ECHO], 600);
    connect(&r.socket, "a1", old.clone()).await.unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cell0d"))
        .args(["keys", "rotate", "--data-dir"])
        .arg(&r.data)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let new = r.token("a2", "host", &[ECHO], 600);
    let c = connect(&r.socket, "a2", new).await.unwrap();
    c.call("echo", "echo", &b"new key"[..]).await.unwrap();
    let c = connect(&r.socket, "a1", old).await.unwrap();
    c.call("echo", "echo", &b"old key"[..]).await.unwrap();
    let ring = cell0_control::token::keys::KeyRing::load(
        &cell0_control::token::keys::KeyStore::ring_path(&r.data),
    )
    .unwrap();
    let entries: Vec<_> = ring.entries().collect();
    assert_eq!(entries.len(), 2);
    assert!(entries[0].retired_at.is_some() && entries[0].trusted_until.is_some());
    assert!(entries[1].retired_at.is_none());
}

#[tokio::test]
async fn the_cli_mints_attenuates_and_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let r = RouterProc::start(dir.path(), &[]);
    let bin = env!("CARGO_BIN_EXE_cell0d");
    let t = dir.path().join("t");
    let st = std::process::Command::new(bin)
        .args([
            "token",
            "mint",
            "--agent",
            "a1",
            "--right",
            "echo,*",
            "--ttl",
            "600",
            "--data-dir",
        ])
        .arg(&r.data)
        .arg("--out")
        .arg(&t)
        .status()
        .unwrap();
    assert!(st.success());
    let n = dir.path().join("n");
    let st = std::process::Command::new(bin)
        .args([
            "token",
            "attenuate",
            "--right",
            "echo,echo",
            "--agent",
            "a1/sub",
            "--token",
        ])
        .arg(&t)
        .arg("--out")
        .arg(&n)
        .status()
        .unwrap();
    assert!(st.success());
    let out = std::process::Command::new(bin)
        .args(["token", "verify", "--data-dir"])
        .arg(&r.data)
        .arg("--token")
        .arg(&n)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["agent"], "a1/sub");
    assert_eq!(v["rights"], serde_json::json!([["echo", "echo"]]));
    // The sub-agent connects with its narrower token.
    let token = std::fs::read(&n).unwrap();
    let c = connect(&r.socket, "a1/sub", token.into()).await.unwrap();
    c.call("echo", "echo", &b"x"[..]).await.unwrap();
    assert_eq!(
        code(c.call("echo", "fold", &b"x"[..]).await),
        ErrorCode::PermissionDenied
    );
    // Widening on the command line is refused before any token is written.
    let out = std::process::Command::new(bin)
        .args(["token", "attenuate", "--right", "*,*", "--token"])
        .arg(&t)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("widens"),
        "{out:?}"
    );
}

#[tokio::test]
async fn shm_refs_are_checked_against_the_callers_window() {
    let dir = tempfile::tempdir().unwrap();
    let api = MockVmApi::start(&dir.path().join("api.sock"), 4 << 20).unwrap();
    let vm = dir.path().join("vm.sock");
    let r = RouterProc::start(
        dir.path(),
        &[
            "--vm",
            &format!("vms={},api={}", vm.display(), api.path().display()),
        ],
    );
    let token = r.token("g1", "vms", &[ECHO, ("agent/*", "*")], 600);
    let c = connect(&vm, "g1", token).await.unwrap();
    let who = c.call("router", "whoami", Bytes::new()).await;
    assert_eq!(code(who), ErrorCode::PermissionDenied);
    let window = api.window();
    let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
    let src = window.write(0, &data).unwrap();
    // The router reads the guest's bytes through its own mapping...
    let call = |method: &str, payload: Vec<u8>, shm: Vec<ShmRef>| Call {
        service: "echo".into(),
        method: method.into(),
        payload: payload.into(),
        shm,
    };
    let reply = c
        .call_with(call("sha256", vec![], vec![src]), Duration::from_secs(20))
        .await
        .unwrap();
    use sha2::Digest;
    assert_eq!(&reply.payload[..], &sha2::Sha256::digest(&data)[..]);
    // ...and writes into it: the copy is checked byte for byte.
    let reply = c
        .call_with(
            call("copy", (2u64 << 20).to_le_bytes().to_vec(), vec![src]),
            Duration::from_secs(20),
        )
        .await
        .unwrap();
    assert_eq!(
        reply.shm,
        vec![ShmRef {
            offset: 2 << 20,
            length: 1 << 20
        }]
    );
    assert_eq!(window.read(&reply.shm[0]).unwrap(), data);
    // A ref outside the window is refused and never read.
    for bad in [
        ShmRef {
            offset: 4 << 20,
            length: 1,
        },
        ShmRef {
            offset: (4 << 20) - 10,
            length: 11,
        },
        ShmRef {
            offset: u64::MAX,
            length: 2,
        },
    ] {
        let r2 = c
            .call_with(call("echo", vec![], vec![bad]), Duration::from_secs(20))
            .await;
        assert_eq!(code(r2), ErrorCode::ShmOutOfBounds, "{bad:?}");
    }
    let line = r.wait_audit(|v| v["code"] == "SHM_OUT_OF_BOUNDS").await;
    assert_eq!(line["vm"], "vms");
    assert_eq!(line["agent"], "g1");
    // A host session has no window.
    let host = connect(
        &r.socket,
        "h1",
        r.token("h1", "host", &[ECHO, ("agent/*", "*")], 600),
    )
    .await
    .unwrap();
    let r3 = host
        .call_with(
            call(
                "echo",
                vec![],
                vec![ShmRef {
                    offset: 0,
                    length: 1,
                }],
            ),
            Duration::from_secs(20),
        )
        .await;
    assert_eq!(code(r3), ErrorCode::ShmUnavailable);
    // To an agent outside the router's process, refs arrive as inline bytes.
    let mut rx = host.incoming().unwrap();
    tokio::spawn(async move {
        while let Some(inc) = rx.recv().await {
            let len = inc.call.payload.len() as u64;
            let first = inc.call.payload.first().copied().unwrap_or(0);
            let ok = inc.call.shm.is_empty();
            let _ = inc
                .respond(Ok(Reply {
                    payload: format!("{len} {first} {ok}").into(),
                    shm: vec![],
                }))
                .await;
        }
    });
    let part = ShmRef {
        offset: 1000,
        length: 5000,
    };
    let reply = c
        .call_with(
            Call {
                service: "agent/h1".into(),
                method: "bulk".into(),
                payload: Bytes::from_static(b"xy"),
                shm: vec![part],
            },
            Duration::from_secs(20),
        )
        .await
        .unwrap();
    assert_eq!(&reply.payload[..], format!("5002 {} true", b'x').as_bytes());
}

#[tokio::test]
async fn the_sdk_refreshes_before_expiry_and_after_token_expired() {
    let dir = tempfile::tempdir().unwrap();
    let r = RouterProc::start(dir.path(), &[]);
    let data = r.data.clone();
    let mints = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let m2 = mints.clone();
    let source = move || {
        let data = data.clone();
        let mints = m2.clone();
        async move {
            mints.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let ks = cell0_control::token::keys::KeyStore::open(&data)?;
            let claims = cell0_control::token::Claims {
                agent: "sdk".into(),
                vm: "host".into(),
                rights: vec![cell0_proto::msg::Right::new("echo", "*")],
                expires: cell0_proto::host::unix_now() + 3,
            };
            Ok::<Bytes, TokenSourceError>(ks.minter().mint(&claims)?.into())
        }
    };
    let policy = RefreshPolicy {
        margin: Duration::from_secs(1),
        min_interval: Duration::from_millis(200),
        retry: Duration::from_millis(200),
    };
    // A second client whose timer never fires in time: its token expires,
    // the router refuses the CALL with TOKEN_EXPIRED, and the SDK refreshes
    // and sends it again.
    let lazy = AgentClient::connect(
        cell0_proto::host::Endpoint::Unix(r.socket.clone()),
        common::config("sdk", Bytes::new()),
        source.clone(),
        RefreshPolicy {
            margin: Duration::ZERO,
            min_interval: Duration::from_secs(600),
            retry: Duration::from_secs(600),
        },
    )
    .await
    .unwrap();
    let sdk = AgentClient::connect(
        cell0_proto::host::Endpoint::Unix(r.socket.clone()),
        common::config("sdk", Bytes::new()),
        source,
        policy,
    )
    .await
    .unwrap();
    let first = sdk.welcome().unwrap().token_expiry;
    // Calls keep working across several token lifetimes.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while tokio::time::Instant::now() < deadline {
        sdk.call("echo", "echo", &b"x"[..]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(sdk.refreshes() >= 2, "refreshes: {}", sdk.refreshes());
    assert_eq!(lazy.refreshes(), 0);
    lazy.call("echo", "echo", &b"after expiry"[..])
        .await
        .unwrap();
    assert_eq!(lazy.refreshes(), 1);
    r.wait_audit(|v| v["code"] == "TOKEN_EXPIRED" && v["agent"] == "sdk")
        .await;
    assert!(sdk.welcome().unwrap().token_expiry > first);
    // A refusal it cannot fix stays typed.
    let e = sdk.call("kv", "get", &b""[..]).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::PermissionDenied));
    assert!(mints.load(std::sync::atomic::Ordering::SeqCst) >= 3);
}
