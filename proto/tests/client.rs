// SPDX-License-Identifier: Apache-2.0
//! Client and server over real Unix sockets: echo sizes, concurrency,
//! pipelining, timeouts, a dying server, reconnect, heartbeats, GOODBYE,
//! hybrid vsock, session rules through the hook, EVENTs and incoming CALLs.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use cell0_proto::host::server::{PushError, bind_unix};
use cell0_proto::host::{
    Client, ClientConfig, ClientError, Disconnect, EchoService, Endpoint, Grant, Handler,
    HelloHook, ReconnectPolicy, Server, ServiceError, Session, unix_now, vsock,
};
use cell0_proto::msg::{Call, Event, Hello, Refresh, Reply, Right, Welcome};
use cell0_proto::{ErrorCode, Frame, Kind};
use common::{Raw, TestServer, guard, quick_config};
use tokio::net::UnixListener;
use tokio::task::JoinSet;

fn pattern(len: usize, seed: u8) -> Bytes {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect::<Vec<u8>>()
        .into()
}

#[tokio::test]
async fn echo_returns_every_byte_for_each_size() {
    let server = TestServer::start(Server::new(EchoService::new())).await;
    let client = server.client().await;
    for (i, size) in [0usize, 1, 4096, 64 * 1024, 1024 * 1024]
        .into_iter()
        .enumerate()
    {
        let payload = pattern(size, i as u8);
        let reply = guard("echo", client.call("echo", "echo", payload.clone()))
            .await
            .unwrap();
        assert_eq!(reply.payload.len(), size);
        assert!(reply.payload == payload, "echo of {size} bytes differs");
    }
    let welcome = client.welcome().unwrap();
    assert_eq!(welcome.version, 1);
    assert_eq!(welcome.rights, vec![Right::all()]);
    guard("goodbye", client.goodbye("done")).await.unwrap();
}

#[tokio::test]
async fn sixty_four_concurrent_connections_each_get_their_own_bytes() {
    let echo = Server::new(EchoService::new());
    let handler = echo.handler().clone();
    let server = TestServer::start(echo).await;
    let mut tasks = JoinSet::new();
    for c in 0..64u8 {
        let endpoint = server.endpoint();
        tasks.spawn(async move {
            let client = Client::connect(endpoint, quick_config(&format!("agent-{c}")))
                .await
                .unwrap();
            for i in 0..20u8 {
                let payload = pattern(usize::from(i) * 37 + usize::from(c), c ^ i);
                let reply = client.call("echo", "echo", payload.clone()).await.unwrap();
                assert_eq!(reply.payload, payload);
            }
            client.welcome().unwrap().session_id
        });
    }
    let mut sessions = std::collections::HashSet::new();
    while let Some(r) = guard("64 connections", tasks.join_next()).await {
        assert!(sessions.insert(r.unwrap()), "session ids must be unique");
    }
    assert_eq!(sessions.len(), 64);
    assert_eq!(handler.calls(), 64 * 20);
}

#[tokio::test]
async fn a_thousand_pipelined_calls_on_one_connection_match_their_replies() {
    let server = TestServer::start(Server::new(EchoService::new())).await;
    let client = server.client().await;
    let mut tasks = JoinSet::new();
    for i in 0..1000u32 {
        let client = client.clone();
        tasks.spawn(async move {
            let payload = Bytes::from(i.to_le_bytes().repeat((i % 50) as usize + 1));
            let reply = client.call("echo", "echo", payload.clone()).await.unwrap();
            assert_eq!(reply.payload, payload);
        });
    }
    while let Some(r) = guard("pipelined calls", tasks.join_next()).await {
        r.unwrap();
    }
}

#[tokio::test]
async fn typed_errors_from_the_service_reach_the_caller() {
    let server = TestServer::start(Server::new(EchoService::new())).await;
    let client = server.client().await;
    let err = client.call("nope", "echo", Bytes::new()).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NoSuchService));
    let err = client.call("echo", "nope", Bytes::new()).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NoSuchMethod));
    let mut fail = ErrorCode::ShmOutOfBounds.as_u32().to_le_bytes().to_vec();
    fail.extend_from_slice(b"ref past the end");
    match client.call("echo", "fail", fail).await.unwrap_err() {
        ClientError::Remote(e) => {
            assert_eq!(e.error_code(), Some(ErrorCode::ShmOutOfBounds));
            assert_eq!(e.message, "ref past the end");
        }
        other => panic!("expected a remote error, got {other:?}"),
    }
    let err = client
        .call("echo", "echo", vec![0u8; cell0_proto::MAX_PAYLOAD + 1])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Oversize));
    // The connection is unharmed.
    assert!(client.ping().await.is_ok());
}

#[tokio::test]
async fn a_call_times_out_and_the_connection_keeps_working() {
    let server = TestServer::start(Server::new(EchoService::new())).await;
    let client = server.client().await;
    let call = Call {
        service: "echo".into(),
        method: "sleep".into(),
        payload: 2_000u32.to_le_bytes().to_vec().into(),
        shm: vec![],
    };
    let err = guard(
        "timeout",
        client.call_with(call, Duration::from_millis(100)),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, ClientError::Timeout), "got {err:?}");
    assert_eq!(err.code(), Some(ErrorCode::Timeout));
    let reply = client.call("echo", "echo", &b"after"[..]).await.unwrap();
    assert_eq!(&reply.payload[..], b"after");
}

#[tokio::test]
async fn a_server_that_dies_mid_call_fails_the_call_with_a_typed_error() {
    let server = TestServer::start(Server::new(EchoService::new())).await;
    let client = server.client().await;
    let slow = {
        let client = client.clone();
        tokio::spawn(async move {
            let call = Call {
                service: "echo".into(),
                method: "sleep".into(),
                payload: 20_000u32.to_le_bytes().to_vec().into(),
                shm: vec![],
            };
            client.call_with(call, Duration::from_secs(25)).await
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.kill().await;
    let err = guard("the in-flight call", slow)
        .await
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Disconnected(Disconnect::PeerClosed | Disconnect::Io(_))
        ),
        "got {err:?}"
    );
    // Without a reconnect policy the client is closed and says so at once.
    let err = guard(
        "a call after the loss",
        client.call("echo", "echo", Bytes::new()),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, ClientError::Disconnected(_)), "got {err:?}");
}

#[tokio::test]
async fn a_killed_echo_server_process_fails_the_call_without_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("echo.sock");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sypas-echo-server"))
        .arg("--socket")
        .arg(&path)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut line = [0u8; 12];
    guard(
        "server start",
        tokio::io::AsyncReadExt::read_exact(&mut stdout, &mut line),
    )
    .await
    .unwrap();
    assert_eq!(&line, b"listening on");
    let client = Client::connect(Endpoint::Unix(path.clone()), quick_config("k"))
        .await
        .unwrap();
    assert_eq!(
        &client
            .call("echo", "echo", &b"x"[..])
            .await
            .unwrap()
            .payload[..],
        b"x"
    );
    let slow = {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .call("echo", "sleep", 20_000u32.to_le_bytes().to_vec())
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    child.start_kill().unwrap();
    let _ = child.wait().await;
    let err = guard("the in-flight call", slow)
        .await
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, ClientError::Disconnected(_)), "got {err:?}");
}

/// Grants echo plus a marker right naming the server, and records HELLO tokens.
struct Marked {
    name: &'static str,
    tokens: Arc<Mutex<Vec<Bytes>>>,
}

impl Marked {
    fn grant(&self) -> Grant {
        Grant {
            rights: vec![Right::new("echo", "*"), Right::new("marker", self.name)],
            token_expiry: 0,
        }
    }
}

impl HelloHook for Marked {
    async fn hello(&self, hello: &Hello) -> Result<Grant, ServiceError> {
        self.tokens.lock().unwrap().push(hello.token.clone());
        Ok(self.grant())
    }

    async fn refresh(&self, _session: &Session, _refresh: &Refresh) -> Result<Grant, ServiceError> {
        Ok(self.grant())
    }
}

#[tokio::test]
async fn the_client_reconnects_after_the_server_restarts() {
    let tokens = Arc::new(Mutex::new(Vec::new()));
    let first = Server::new(EchoService::new()).with_hello_hook(Marked {
        name: "first",
        tokens: tokens.clone(),
    });
    let server = TestServer::start(first).await;
    let config = ClientConfig {
        reconnect: ReconnectPolicy {
            max_attempts: None,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(100),
        },
        call_timeout: Duration::from_secs(20),
        token: Bytes::from_static(b"tok1"),
        ..quick_config("re")
    };
    let client = Client::connect(server.endpoint(), config).await.unwrap();
    assert!(
        client
            .welcome()
            .unwrap()
            .rights
            .contains(&Right::new("marker", "first"))
    );
    client.call("echo", "echo", &b"1"[..]).await.unwrap();
    client.refresh(Bytes::from_static(b"tok2")).await.unwrap();
    let (dir, path) = server.kill().await;
    guard("noticing the loss", async {
        while client.is_connected() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    // A call made while the server is down waits for the reconnect.
    let pending = {
        let client = client.clone();
        tokio::spawn(async move { client.call("echo", "echo", &b"2"[..]).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let second = Server::new(EchoService::new()).with_hello_hook(Marked {
        name: "second",
        tokens: tokens.clone(),
    });
    let _server = TestServer::start_at(second, dir, path).await;
    let reply = guard("call across the restart", pending)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&reply.payload[..], b"2");
    assert!(client.is_connected());
    // The reconnect said HELLO again, with the refreshed token, and the
    // client holds the new server's WELCOME.
    assert!(
        client
            .welcome()
            .unwrap()
            .rights
            .contains(&Right::new("marker", "second"))
    );
    assert_eq!(
        *tokens.lock().unwrap(),
        vec![Bytes::from_static(b"tok1"), Bytes::from_static(b"tok2")]
    );
}

#[tokio::test]
async fn subscriptions_survive_a_reconnect() {
    let server = TestServer::start(Server::new(Topics::default())).await;
    let config = ClientConfig {
        reconnect: ReconnectPolicy {
            max_attempts: None,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(50),
        },
        ..quick_config("sub")
    };
    let subscriber = Client::connect(server.endpoint(), config).await.unwrap();
    let mut events = subscriber.events().unwrap();
    subscriber.subscribe("t").await.unwrap();
    let (dir, path) = server.kill().await;
    guard("noticing the loss", async {
        while subscriber.is_connected() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let server = TestServer::start_at(Server::new(Topics::default()), dir, path).await;
    guard("reconnecting", async {
        while !subscriber.is_connected() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let publisher = server.client().await;
    // The re-SUBSCRIBE races the publisher's first EVENT; publish until delivered.
    let event = guard("event after reconnect", async {
        loop {
            publisher.publish("t", &b"again"[..]).await.unwrap();
            if let Ok(Some(e)) =
                tokio::time::timeout(Duration::from_millis(50), events.recv()).await
            {
                break e;
            }
        }
    })
    .await;
    assert_eq!(&event.payload[..], b"again");
}

#[tokio::test]
async fn a_client_runs_over_any_stream() {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let server = Server::new(EchoService::new());
    let serving = tokio::spawn(async move { server.serve_connection(b).await });
    let client = Client::from_stream(a, quick_config("duplex"))
        .await
        .unwrap();
    let payload = pattern(200_000, 9);
    let reply = client.call("echo", "echo", payload.clone()).await.unwrap();
    assert_eq!(reply.payload, payload);
    guard("goodbye", client.goodbye("done")).await.unwrap();
    guard("server side", serving).await.unwrap();
}

#[tokio::test]
async fn a_server_that_breaks_framing_fails_the_call_and_is_told_why() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let fake = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let (r, mut w) = stream.into_split();
        let mut reader = cell0_proto::host::conn::FrameReader::new(r, 1 << 20);
        let hello = reader.next().await.unwrap().unwrap();
        let welcome = Frame::from_message(Kind::Welcome, hello.request_id, &Welcome::default());
        tokio::io::AsyncWriteExt::write_all(&mut w, &welcome.to_vec().unwrap())
            .await
            .unwrap();
        let call = reader.next().await.unwrap().unwrap();
        assert_eq!(call.kind, Kind::Call);
        tokio::io::AsyncWriteExt::write_all(&mut w, b"HTTP/1.1 400 Bad Request\r\n\r\n")
            .await
            .unwrap();
        // The client answers with ERROR(BAD_MAGIC) and closes.
        loop {
            match reader.next().await {
                Ok(Some(f)) if f.kind == Kind::Error => {
                    return f.decode_message::<cell0_proto::msg::ErrorMsg>().unwrap();
                }
                Ok(Some(_)) => {}
                other => panic!("no ERROR from the client: {other:?}"),
            }
        }
    });
    let client = Client::connect(Endpoint::Unix(path), quick_config("b"))
        .await
        .unwrap();
    let err = guard("call", client.call("echo", "echo", Bytes::new()))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ClientError::Disconnected(Disconnect::Protocol(_))),
        "got {err:?}"
    );
    assert_eq!(err.code(), Some(ErrorCode::BadMagic));
    let told = guard("fake server", fake).await.unwrap();
    assert_eq!(told.error_code(), Some(ErrorCode::BadMagic));
}

#[tokio::test]
async fn reconnect_gives_up_after_max_attempts() {
    let server = TestServer::start(Server::new(EchoService::new())).await;
    let config = ClientConfig {
        reconnect: ReconnectPolicy {
            max_attempts: Some(3),
            initial_backoff: Duration::from_millis(5),
            max_backoff: Duration::from_millis(20),
        },
        ..quick_config("gu")
    };
    let client = Client::connect(server.endpoint(), config).await.unwrap();
    server.kill().await;
    let err = guard("giving up", async {
        loop {
            match client.call("echo", "echo", Bytes::new()).await {
                Err(ClientError::GaveUp { attempts }) => break attempts,
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                Ok(_) => panic!("no server, yet a reply"),
            }
        }
    })
    .await;
    assert_eq!(err, 3);
}

#[tokio::test]
async fn a_silent_peer_is_declared_dead_and_calls_fail() {
    // A fake server that answers HELLO and then never says anything again.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("silent.sock");
    let listener = UnixListener::bind(&path).unwrap();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let (r, mut w) = stream.into_split();
        let mut reader = cell0_proto::host::conn::FrameReader::new(r, 1 << 20);
        let hello = reader.next().await.unwrap().unwrap();
        let welcome = Frame::from_message(Kind::Welcome, hello.request_id, &Welcome::default());
        tokio::io::AsyncWriteExt::write_all(&mut w, &welcome.to_vec().unwrap())
            .await
            .unwrap();
        // Read and ignore everything, including PINGs.
        while let Ok(Some(_)) = reader.next().await {}
        drop(w);
    });
    let config = ClientConfig {
        ping_interval: Some(Duration::from_millis(20)),
        dead_peer_timeout: Duration::from_millis(200),
        call_timeout: Duration::from_secs(20),
        ..quick_config("hb")
    };
    let client = Client::connect(Endpoint::Unix(path), config).await.unwrap();
    let err = guard("dead peer", client.call("echo", "echo", Bytes::new()))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ClientError::Disconnected(Disconnect::PeerDead(_))),
        "got {err:?}"
    );
}

#[tokio::test]
async fn heartbeats_keep_an_idle_connection_alive() {
    let server = TestServer::start(Server::new(EchoService::new())).await;
    let config = ClientConfig {
        ping_interval: Some(Duration::from_millis(20)),
        dead_peer_timeout: Duration::from_millis(800),
        ..quick_config("alive")
    };
    let client = Client::connect(server.endpoint(), config).await.unwrap();
    // Idle for more than twice the dead-peer deadline: only PONGs arrive.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert!(client.is_connected());
    assert!(client.call("echo", "echo", Bytes::new()).await.is_ok());
}

#[tokio::test]
async fn goodbye_waits_for_in_flight_calls_then_closes() {
    let echo = Server::new(EchoService::new());
    let handler = echo.handler().clone();
    let server = TestServer::start(echo).await;
    let client = server.client().await;
    let slow = {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .call("echo", "sleep", 100u32.to_le_bytes().to_vec())
                .await
        })
    };
    guard("the call reaching the server", async {
        while handler.calls() == 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await;
    let other = client.clone();
    guard("goodbye", client.goodbye("bye")).await.unwrap();
    assert!(guard("slow call", slow).await.unwrap().is_ok());
    assert!(!other.is_connected());
    let err = other.call("echo", "echo", Bytes::new()).await.unwrap_err();
    assert!(matches!(err, ClientError::Closed), "got {err:?}");
}

#[tokio::test]
async fn dropping_the_client_says_goodbye() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bye.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let fake = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let (r, mut w) = stream.into_split();
        let mut reader = cell0_proto::host::conn::FrameReader::new(r, 1 << 20);
        let hello = reader.next().await.unwrap().unwrap();
        let welcome = Frame::from_message(Kind::Welcome, hello.request_id, &Welcome::default());
        tokio::io::AsyncWriteExt::write_all(&mut w, &welcome.to_vec().unwrap())
            .await
            .unwrap();
        let mut kinds = Vec::new();
        while let Ok(Some(f)) = reader.next().await {
            kinds.push(f.kind);
        }
        kinds
    });
    let client = Client::connect(Endpoint::Unix(path), quick_config("drop"))
        .await
        .unwrap();
    drop(client);
    let kinds = guard("the fake server", fake).await.unwrap();
    assert_eq!(kinds, vec![Kind::Goodbye], "then a clean EOF");
}

#[tokio::test]
async fn hybrid_vsock_connect_reaches_the_server() {
    let server = TestServer::start(Server::new(EchoService::new())).await;
    // A fake VMM muxer: accept on <uds>, read CONNECT, answer OK, splice to the server.
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("vsock.sock");
    let listener = UnixListener::bind(&uds).unwrap();
    let target = server.path.clone();
    let ports = Arc::new(Mutex::new(Vec::new()));
    let seen = ports.clone();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            let port = vsock::read_connect(&mut stream).await.unwrap();
            seen.lock().unwrap().push(port);
            if port != 1024 {
                let _ =
                    tokio::io::AsyncWriteExt::write_all(&mut stream, b"ERR no listener\n").await;
                continue;
            }
            vsock::write_ok(&mut stream, 1_073_741_825).await.unwrap();
            let mut upstream = tokio::net::UnixStream::connect(&target).await.unwrap();
            tokio::spawn(async move {
                let _ = tokio::io::copy_bidirectional(&mut stream, &mut upstream).await;
            });
        }
    });
    let endpoint = Endpoint::HybridVsock {
        uds: uds.clone(),
        port: 1024,
    };
    let client = Client::connect(endpoint, quick_config("vs")).await.unwrap();
    let reply = client.call("echo", "echo", pattern(4096, 3)).await.unwrap();
    assert_eq!(reply.payload, pattern(4096, 3));
    let refused = Client::connect(Endpoint::HybridVsock { uds, port: 7 }, quick_config("vs"))
        .await
        .unwrap_err();
    assert!(matches!(refused, ClientError::Vsock(_)), "got {refused:?}");
    assert_eq!(*ports.lock().unwrap(), vec![1024, 7]);
}

/// A hook that grants only echo.echo, with a chosen expiry, and checks tokens.
struct Strict {
    expiry: u64,
}

impl HelloHook for Strict {
    async fn hello(&self, hello: &Hello) -> Result<Grant, ServiceError> {
        if hello.token.as_ref() != b"good" {
            return Err(ServiceError::new(ErrorCode::TokenInvalid, "Bad token."));
        }
        Ok(Grant {
            rights: vec![Right::new("echo", "echo")],
            token_expiry: self.expiry,
        })
    }

    async fn refresh(&self, _session: &Session, refresh: &Refresh) -> Result<Grant, ServiceError> {
        if refresh.token.as_ref() != b"fresh" {
            return Err(ServiceError::new(ErrorCode::TokenInvalid, "Bad token."));
        }
        Ok(Grant {
            rights: vec![Right::new("echo", "*")],
            token_expiry: unix_now() + 3600,
        })
    }
}

#[tokio::test]
async fn the_hello_hook_decides_rights_and_expiry() {
    let server =
        TestServer::start(Server::new(EchoService::new()).with_hello_hook(Strict { expiry: 0 }))
            .await;
    let bad = ClientConfig {
        token: Bytes::from_static(b"bad"),
        ..quick_config("s")
    };
    let err = Client::connect(server.endpoint(), bad).await.unwrap_err();
    assert!(matches!(&err, ClientError::HelloRefused(_)), "got {err:?}");
    assert_eq!(err.code(), Some(ErrorCode::TokenInvalid));

    let good = ClientConfig {
        token: Bytes::from_static(b"good"),
        ..quick_config("s")
    };
    let client = Client::connect(server.endpoint(), good.clone())
        .await
        .unwrap();
    assert_eq!(
        client.welcome().unwrap().rights,
        vec![Right::new("echo", "echo")]
    );
    assert!(client.call("echo", "echo", Bytes::new()).await.is_ok());
    let err = client
        .call("echo", "sleep", 1u32.to_le_bytes().to_vec())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::PermissionDenied));
    let err = client
        .refresh(Bytes::from_static(b"stale"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::TokenInvalid));
    let welcome = client.refresh(Bytes::from_static(b"fresh")).await.unwrap();
    assert_eq!(welcome.rights, vec![Right::new("echo", "*")]);
    assert!(
        client
            .call("echo", "sleep", 1u32.to_le_bytes().to_vec())
            .await
            .is_ok()
    );

    let expired = TestServer::start(Server::new(EchoService::new()).with_hello_hook(Strict {
        expiry: unix_now() - 1,
    }))
    .await;
    let client = Client::connect(expired.endpoint(), good).await.unwrap();
    let err = client.call("echo", "echo", Bytes::new()).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::TokenExpired));
    client.refresh(Bytes::from_static(b"fresh")).await.unwrap();
    assert!(client.call("echo", "echo", Bytes::new()).await.is_ok());
}

/// A tiny pub/sub handler: topics → subscribers, pushed without blocking.
#[derive(Default)]
struct Topics {
    subs: Mutex<HashMap<String, Vec<Arc<Session>>>>,
}

impl Handler for Topics {
    async fn call(&self, _s: Arc<Session>, _c: Call) -> Result<Reply, ServiceError> {
        Err(ServiceError::new(ErrorCode::NoSuchService, "No services."))
    }

    async fn publish(&self, session: Arc<Session>, mut event: Event) -> Result<(), ServiceError> {
        event.source = session.agent_id().to_owned();
        let subs = self
            .subs
            .lock()
            .unwrap()
            .get(&event.topic)
            .cloned()
            .unwrap_or_default();
        for s in subs {
            match s.push_event(&event) {
                Ok(()) | Err(PushError::SlowConsumer | PushError::Closed) => {}
            }
        }
        Ok(())
    }

    async fn subscribe(&self, session: Arc<Session>, topic: String) -> Result<(), ServiceError> {
        self.subs
            .lock()
            .unwrap()
            .entry(topic)
            .or_default()
            .push(session);
        Ok(())
    }

    fn session_closed(&self, session: &Arc<Session>) {
        for subs in self.subs.lock().unwrap().values_mut() {
            subs.retain(|s| s.id() != session.id());
        }
    }
}

#[tokio::test]
async fn events_reach_subscribers_and_a_slow_subscriber_is_dropped() {
    let server = TestServer::start(Server::new(Topics::default())).await;
    let subscriber = server.client().await;
    let mut events = subscriber.events().unwrap();
    assert!(subscriber.events().is_none());
    subscriber.subscribe("news").await.unwrap();
    let publisher = Client::connect(server.endpoint(), quick_config("pub"))
        .await
        .unwrap();
    publisher.publish("news", &b"hello"[..]).await.unwrap();
    publisher.publish("other", &b"nobody"[..]).await.unwrap();
    let event = guard("event", events.recv()).await.unwrap();
    assert_eq!(
        (
            event.topic.as_str(),
            &event.payload[..],
            event.source.as_str()
        ),
        ("news", &b"hello"[..], "pub")
    );

    // EVENT to a plain server is UNSUPPORTED.
    let plain = TestServer::start(Server::new(EchoService::new())).await;
    let c = plain.client().await;
    assert_eq!(
        c.publish("t", Bytes::new()).await.unwrap_err().code(),
        Some(ErrorCode::Unsupported)
    );
    assert_eq!(
        c.subscribe("t").await.unwrap_err().code(),
        Some(ErrorCode::Unsupported)
    );

    // A raw subscriber that never reads: the server drops it with SLOW_CONSUMER
    // and the publisher is never blocked.
    let small = TestServer::start(Server::new(Topics::default()).with_config(
        cell0_proto::host::ServerConfig {
            outbound_queue: 4,
            ..Default::default()
        },
    ))
    .await;
    let mut raw = Raw::connect(&small.path).await;
    raw.hello().await;
    let sub = cell0_proto::msg::Subscribe {
        topic: "flood".into(),
    };
    raw.send_frame(&Frame::from_message(Kind::Subscribe, 2, &sub))
        .await;
    assert_eq!(raw.next_frame().await.kind, Kind::Reply);
    let publisher = Client::connect(small.endpoint(), quick_config("flood"))
        .await
        .unwrap();
    let big = Bytes::from(vec![7u8; 256 * 1024]);
    guard("publishing into a stalled subscriber", async {
        for _ in 0..64 {
            publisher.publish("flood", big.clone()).await.unwrap();
        }
    })
    .await;
    let mut saw_slow = false;
    loop {
        match raw.next().await {
            common::Next::Frame(f) if f.kind == Kind::Error => {
                let msg: cell0_proto::msg::ErrorMsg = f.decode_message().unwrap();
                assert_eq!(msg.error_code(), Some(ErrorCode::SlowConsumer));
                saw_slow = true;
            }
            common::Next::Frame(f) => assert_eq!(f.kind, Kind::Event),
            common::Next::Closed | common::Next::Reset => break,
        }
    }
    assert!(
        saw_slow,
        "the stalled subscriber was not told SLOW_CONSUMER"
    );
}

async fn answer(
    reader: &mut cell0_proto::host::conn::FrameReader<tokio::net::unix::OwnedReadHalf>,
    id: u64,
) -> Frame {
    loop {
        let f = reader.next().await.unwrap().unwrap();
        if f.request_id == id {
            return f;
        }
    }
}

#[tokio::test]
async fn the_peer_can_call_the_client() {
    // A raw "router" that HELLOs the client in and then CALLs it twice: once
    // before the client serves incoming CALLs, once after.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("router.sock");
    let listener = bind_unix(&path).await.unwrap();
    let (refused_tx, refused_rx) = tokio::sync::oneshot::channel();
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let router = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let (r, mut w) = stream.into_split();
        let mut reader = cell0_proto::host::conn::FrameReader::new(r, 1 << 20);
        let hello = reader.next().await.unwrap().unwrap();
        let welcome = Frame::from_message(Kind::Welcome, hello.request_id, &Welcome::default());
        let call = Call {
            service: "agent/me".into(),
            method: "greet".into(),
            payload: Bytes::from_static(b"hi"),
            shm: vec![],
        };
        let mut out = welcome.to_vec().unwrap();
        out.extend(
            Frame::from_message(Kind::Call, 800, &call)
                .to_vec()
                .unwrap(),
        );
        tokio::io::AsyncWriteExt::write_all(&mut w, &out)
            .await
            .unwrap();
        refused_tx.send(answer(&mut reader, 800).await).unwrap();
        go_rx.await.unwrap();
        let frame = Frame::from_message(Kind::Call, 900, &call)
            .to_vec()
            .unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut w, &frame)
            .await
            .unwrap();
        answer(&mut reader, 900).await
    });
    let client = Client::connect(Endpoint::Unix(path), quick_config("me"))
        .await
        .unwrap();
    let refused = guard("first answer", refused_rx).await.unwrap();
    assert_eq!(refused.kind, Kind::Error);
    let msg: cell0_proto::msg::ErrorMsg = refused.decode_message().unwrap();
    assert_eq!(msg.error_code(), Some(ErrorCode::NoSuchService));

    let mut incoming = client.incoming().unwrap();
    assert!(client.incoming().is_none());
    go_tx.send(()).unwrap();
    let call = guard("incoming call", incoming.recv()).await.unwrap();
    assert_eq!(
        (call.call.method.as_str(), &call.call.payload[..]),
        ("greet", &b"hi"[..])
    );
    call.respond(Ok(Reply {
        payload: Bytes::from_static(b"hello back"),
        shm: vec![],
    }))
    .await
    .unwrap();
    let f = guard("router", router).await.unwrap();
    assert_eq!(f.kind, Kind::Reply);
    let reply: Reply = f.decode_message().unwrap();
    assert_eq!(&reply.payload[..], b"hello back");
}
