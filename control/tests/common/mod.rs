// SPDX-License-Identifier: Apache-2.0
//! Helpers for the router tests: a real `cell0d router` process, tokens from
//! its data dir, clients, and raw frames.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use cell0_control::token::Claims;
use cell0_control::token::keys::{KeyStore, unix_now};
use cell0_proto::ErrorCode;
use cell0_proto::frame::{Frame, Kind};
use cell0_proto::host::conn::FrameReader;
use cell0_proto::host::{Client, ClientConfig, ClientError, Endpoint, ReconnectPolicy};
use cell0_proto::msg::{ErrorMsg, Right};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

/// A `cell0d router` child; SIGTERM and wait on drop.
pub struct RouterProc {
    pub child: Child,
    pub socket: PathBuf,
    pub data: PathBuf,
    pub dir: PathBuf,
}

impl Drop for RouterProc {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let _ = self.child.wait();
    }
}

impl RouterProc {
    /// Starts `cell0d router` in `dir` with extra arguments; waits until it listens.
    pub fn start(dir: &Path, extra: &[&str]) -> RouterProc {
        let data = dir.join("data");
        // Create the keys first so tests can mint before the router runs.
        KeyStore::open(&data).unwrap();
        let socket = dir.join("router.sock");
        let mut child = Command::new(env!("CARGO_BIN_EXE_cell0d"))
            .arg("router")
            .arg("--socket")
            .arg(&socket)
            .arg("--data-dir")
            .arg(&data)
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert!(line.starts_with("listening on"), "router said {line:?}");
        RouterProc {
            child,
            socket,
            data,
            dir: dir.to_path_buf(),
        }
    }

    /// Mints a token with the router's root key.
    pub fn token(&self, agent: &str, vm: &str, rights: &[(&str, &str)], ttl: u64) -> Bytes {
        let ks = KeyStore::open(&self.data).unwrap();
        let claims = Claims {
            agent: agent.into(),
            vm: vm.into(),
            rights: rights.iter().map(|(s, m)| Right::new(*s, *m)).collect(),
            expires: unix_now() + ttl,
        };
        ks.minter().mint(&claims).unwrap().into()
    }

    /// The audit log's lines as JSON.
    pub fn audit(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(self.data.join("audit.log")).unwrap_or_default();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Waits until the audit log has a line matching `pred` (it is written
    /// by a thread of its own).
    pub async fn wait_audit(&self, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        for _ in 0..200 {
            if let Some(v) = self.audit().into_iter().find(|v| pred(v)) {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("no such audit line in {:#?}", self.audit());
    }
}

pub fn config(agent: &str, token: Bytes) -> ClientConfig {
    ClientConfig {
        agent_id: agent.into(),
        token,
        reconnect: ReconnectPolicy::never(),
        call_timeout: Duration::from_secs(20),
        ..ClientConfig::default()
    }
}

pub async fn connect(path: &Path, agent: &str, token: Bytes) -> Result<Client, ClientError> {
    Client::connect(Endpoint::Unix(path.to_path_buf()), config(agent, token)).await
}

/// The code of a refused HELLO or CALL.
pub fn code<T: std::fmt::Debug>(r: Result<T, ClientError>) -> ErrorCode {
    match r {
        Ok(v) => panic!("expected a refusal, got {v:?}"),
        Err(e) => e.code().unwrap_or_else(|| panic!("no code in {e:?}")),
    }
}

/// A raw SYPAS connection: frames in, frames out.
pub struct Raw {
    rd: FrameReader<tokio::io::ReadHalf<UnixStream>>,
    wr: tokio::io::WriteHalf<UnixStream>,
}

impl Raw {
    pub async fn connect(path: &Path) -> Raw {
        let s = UnixStream::connect(path).await.unwrap();
        let (rd, wr) = tokio::io::split(s);
        Raw {
            rd: FrameReader::new(rd, cell0_proto::MAX_PAYLOAD),
            wr,
        }
    }

    pub async fn send(&mut self, kind: Kind, id: u64, msg: &impl prost::Message) {
        let bytes = Frame::from_message(kind, id, msg).to_vec().unwrap();
        self.wr.write_all(&bytes).await.unwrap();
    }

    pub async fn next(&mut self) -> Option<Frame> {
        tokio::time::timeout(Duration::from_secs(20), self.rd.next())
            .await
            .expect("no frame within 20 s")
            .unwrap()
    }

    /// The next frame that answers `id`.
    pub async fn answer(&mut self, id: u64) -> Frame {
        loop {
            let f = self.next().await.expect("connection closed");
            if f.request_id == id {
                return f;
            }
        }
    }

    /// The code of the ERROR answering `id`.
    pub async fn error_code(&mut self, id: u64) -> u32 {
        let f = self.answer(id).await;
        assert_eq!(f.kind, Kind::Error, "{f:?}");
        f.decode_message::<ErrorMsg>().unwrap().code
    }
}
