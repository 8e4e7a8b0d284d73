// SPDX-License-Identifier: Apache-2.0
//! Helpers for the SYPAS integration tests: a server on a temporary Unix
//! socket, raw frame I/O, and a hang guard.
#![allow(dead_code, clippy::unwrap_used)]

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use cell0_proto::host::conn::FrameReader;
use cell0_proto::host::server::bind_unix;
use cell0_proto::host::{
    Client, ClientConfig, Endpoint, Handler, HelloHook, ReconnectPolicy, Server,
};
use cell0_proto::msg::{ErrorMsg, Hello};
use cell0_proto::{Frame, Kind};
use tempfile::TempDir;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Fails the test instead of hanging: no test may wait longer than this.
pub const HANG_GUARD: Duration = Duration::from_secs(30);

pub async fn guard<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(HANG_GUARD, fut).await {
        Ok(v) => v,
        Err(_) => panic!("{what} hung"),
    }
}

/// A server on a socket in a temporary directory.
pub struct TestServer {
    pub path: PathBuf,
    pub dir: TempDir,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl TestServer {
    pub async fn start<H: Handler, A: HelloHook>(server: Server<H, A>) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sypas.sock");
        Self::start_at(server, dir, path).await
    }

    pub async fn start_at<H: Handler, A: HelloHook>(
        server: Server<H, A>,
        dir: TempDir,
        path: PathBuf,
    ) -> TestServer {
        let listener = bind_unix(&path).await.unwrap();
        let (stop, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            server
                .serve_until(listener, async {
                    let _ = rx.await;
                })
                .await
                .unwrap();
        });
        TestServer {
            path,
            dir,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Stops accepting and aborts every connection, like a killed server.
    pub async fn kill(mut self) -> (TempDir, PathBuf) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            guard("server shutdown", task).await.unwrap();
        }
        let _ = std::fs::remove_file(&self.path);
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        (dir, self.path.clone())
    }

    pub fn endpoint(&self) -> Endpoint {
        Endpoint::Unix(self.path.clone())
    }

    pub async fn client(&self) -> Client {
        Client::connect(self.endpoint(), quick_config("test"))
            .await
            .unwrap()
    }
}

/// A config with short timeouts and no reconnect.
pub fn quick_config(agent: &str) -> ClientConfig {
    ClientConfig {
        call_timeout: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(5),
        reconnect: ReconnectPolicy::never(),
        ..ClientConfig::new(agent)
    }
}

/// A raw connection for sending arbitrary bytes.
pub struct Raw {
    pub reader: FrameReader<tokio::net::unix::OwnedReadHalf>,
    pub writer: tokio::net::unix::OwnedWriteHalf,
}

/// What the server did after our bytes.
#[derive(Debug)]
pub enum Next {
    Frame(Frame),
    Closed,
    Reset,
}

impl Raw {
    pub async fn connect(path: &std::path::Path) -> Raw {
        let (r, w) = UnixStream::connect(path).await.unwrap().into_split();
        Raw {
            reader: FrameReader::new(r, cell0_proto::MAX_PAYLOAD),
            writer: w,
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).await.unwrap();
    }

    pub async fn send_frame(&mut self, frame: &Frame) {
        self.send(&frame.to_vec().unwrap()).await;
    }

    pub async fn hello(&mut self) {
        let hello = Hello {
            versions: vec![1],
            agent_id: "raw".into(),
            token: Default::default(),
        };
        self.send_frame(&Frame::from_message(Kind::Hello, 1, &hello))
            .await;
        let f = self.next_frame().await;
        assert_eq!(f.kind, Kind::Welcome);
        assert_eq!(f.request_id, 1);
    }

    pub async fn next(&mut self) -> Next {
        match guard("reading from the server", self.reader.next()).await {
            Ok(Some(f)) => Next::Frame(f),
            Ok(None) => Next::Closed,
            Err(e) => {
                let text = format!("{e:?}");
                assert!(
                    text.contains("ConnectionReset") || text.contains("BrokenPipe"),
                    "unexpected read error {e:?}"
                );
                Next::Reset
            }
        }
    }

    pub async fn next_frame(&mut self) -> Frame {
        match self.next().await {
            Next::Frame(f) => f,
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    /// Expects ERROR(code) for `request_id`.
    pub async fn expect_error(
        &mut self,
        request_id: u64,
        code: cell0_proto::ErrorCode,
    ) -> ErrorMsg {
        let f = self.next_frame().await;
        assert_eq!(f.kind, Kind::Error, "expected ERROR, got {f:?}");
        assert_eq!(f.request_id, request_id);
        let msg: ErrorMsg = f.decode_message().unwrap();
        assert_eq!(msg.error_code(), Some(code), "got {msg:?}");
        msg
    }

    /// Expects the connection to end (clean close or reset) with no more frames.
    pub async fn expect_closed(&mut self) {
        match self.next().await {
            Next::Closed | Next::Reset => {}
            Next::Frame(f) => panic!("expected a close, got {f:?}"),
        }
    }
}
