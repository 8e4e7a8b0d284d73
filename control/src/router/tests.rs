// SPDX-License-Identifier: Apache-2.0
//! In-process router tests: VM attach and detach, and shm refs in answers
//! from agents, with memfds made here (the VMM path is in tests/router.rs).

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use cell0_proto::host::{Client, ClientConfig, Endpoint, ReconnectPolicy, ShmWindow};
use cell0_proto::msg::{Call, Reply, Right, ShmRef};

use super::*;
use crate::token::Claims;
use crate::token::keys::unix_now;

fn token(router: &Router, agent: &str, vm: &str, rights: &[(&str, &str)]) -> Bytes {
    let claims = Claims {
        agent: agent.into(),
        vm: vm.into(),
        rights: rights.iter().map(|(s, m)| Right::new(*s, *m)).collect(),
        expires: unix_now() + 600,
    };
    router.minter().unwrap().mint(&claims).unwrap().into()
}

async fn connect(path: &Path, agent: &str, token: Bytes) -> Client {
    let cfg = ClientConfig {
        agent_id: agent.into(),
        token,
        reconnect: ReconnectPolicy::never(),
        call_timeout: Duration::from_secs(20),
        ..ClientConfig::default()
    };
    Client::connect(Endpoint::Unix(path.to_path_buf()), cfg)
        .await
        .unwrap()
}

fn window_pair(size: u64) -> (ShmWindow, ShmWindow) {
    let guest = ShmWindow::create("test", size).unwrap();
    let fd = guest.fd().try_clone_to_owned().unwrap();
    let router = ShmWindow::map(fd, size).unwrap();
    (guest, router)
}

#[tokio::test]
async fn an_agents_reply_refs_are_read_from_its_own_window() {
    let dir = tempfile::tempdir().unwrap();
    let router = Router::new(RouterConfig::new(dir.path().join("data"))).unwrap();
    let (ga, ra) = window_pair(1 << 20);
    let (gb, rb) = window_pair(1 << 20);
    let (sa, sb) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
    router
        .attach_vm_with_window("vm-a", &sa, Some(ra), None)
        .await
        .unwrap();
    let info = router
        .attach_vm_with_window("vm-b", &sb, Some(rb), Some(1 << 32))
        .await
        .unwrap();
    assert_eq!(info.shm_size, Some(1 << 20));
    let a = connect(&sa, "a", token(&router, "a", "vm-a", &[("agent/b", "*")])).await;
    let b = connect(&sb, "b", token(&router, "b", "vm-b", &[])).await;
    let mut rx = b.incoming().unwrap();
    let answer = gb.write(5000, b"bulk answer from b").unwrap();
    tokio::spawn(async move {
        while let Some(inc) = rx.recv().await {
            // b received a's refs as inline bytes.
            assert!(inc.call.shm.is_empty());
            assert_eq!(&inc.call.payload[..], b">bulk question from a");
            let out = if inc.call.method == "bad" {
                ShmRef {
                    offset: (1 << 20) - 1,
                    length: 2,
                }
            } else {
                answer
            };
            let _ = inc
                .respond(Ok(Reply {
                    payload: Bytes::from_static(b"<"),
                    shm: vec![out],
                }))
                .await;
        }
    });
    let q = ga.write(100, b"bulk question from a").unwrap();
    let call = |method: &str| Call {
        service: "agent/b".into(),
        method: method.into(),
        payload: Bytes::from_static(b">"),
        shm: vec![q],
    };
    let reply = a
        .call_with(call("ask"), Duration::from_secs(20))
        .await
        .unwrap();
    assert!(reply.shm.is_empty());
    assert_eq!(&reply.payload[..], b"<bulk answer from b");
    // A ref outside the answering agent's window is refused, not read.
    let err = a
        .call_with(call("bad"), Duration::from_secs(20))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::ShmOutOfBounds));
    router.shutdown().await;
}

#[tokio::test]
async fn detaching_a_vm_ends_its_sessions_and_frees_its_id() {
    let dir = tempfile::tempdir().unwrap();
    let router = Router::new(RouterConfig::new(dir.path().join("data"))).unwrap();
    let s = dir.path().join("vm.sock");
    router.attach_vm("vm1", &s, None).await.unwrap();
    assert!(matches!(
        router
            .attach_vm("vm1", &dir.path().join("other.sock"), None)
            .await,
        Err(RouterError::VmExists(_))
    ));
    for bad in ["host", "*", "", "a b"] {
        assert!(matches!(
            router
                .attach_vm(bad, &dir.path().join("x.sock"), None)
                .await,
            Err(RouterError::BadVmId(_))
        ));
    }
    let c = connect(&s, "g", token(&router, "g", "vm1", &[("echo", "*")])).await;
    c.call("echo", "echo", &b"x"[..]).await.unwrap();
    assert_eq!(router.agents(), vec![("g".to_string(), "vm1".to_string())]);
    router.detach_vm("vm1").await.unwrap();
    assert!(router.agents().is_empty());
    assert!(!s.exists());
    let err = c.call("echo", "echo", &b"x"[..]).await.unwrap_err();
    assert!(
        err.code().is_none() || err.code() == Some(ErrorCode::ShuttingDown),
        "{err:?}"
    );
    // The id can be attached again.
    router.attach_vm("vm1", &s, None).await.unwrap();
    assert!(matches!(
        router.detach_vm("nope").await,
        Err(RouterError::NoSuchVm(_))
    ));
    router.shutdown().await;
}

#[tokio::test]
async fn local_services_register_once() {
    let dir = tempfile::tempdir().unwrap();
    let router = Router::new(RouterConfig::new(dir.path().join("data"))).unwrap();
    assert_eq!(router.services(), vec!["echo".to_string()]);
    assert!(
        router
            .register_local("echo", Arc::new(EchoService))
            .is_err()
    );
    assert!(
        router
            .register_local("agent/x", Arc::new(EchoService))
            .is_err()
    );
    router
        .register_local("echo2", Arc::new(EchoService))
        .unwrap();
    assert!(router.unregister("echo2"));
    assert!(!router.unregister("echo2"));
}
