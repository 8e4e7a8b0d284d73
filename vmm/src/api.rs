// SPDX-License-Identifier: Apache-2.0
//! The per-VM control socket: a small JSON-over-Unix-socket API.
//!
//! One request per line, one response per line. Requests are JSON objects with
//! an `op` field; responses are `{"ok":true,...}` or
//! `{"ok":false,"error":{"code":"...","message":"..."}}`.
//!
//! | op | served | request fields | response fields |
//! |---|---|---|---|
//! | `describe` | at once | — | `vm`: the config; `state`: `starting` while the VM is built, then `running`; `uptime_us` |
//! | `stop` | at once | — | — (the VM then stops; `cell0-vmm` exits 0, before any guest instruction if the VM is still being built) |
//! | `lease` | at once | `deadline_ns` (`CLOCK_MONOTONIC` ns) | `renewal` (`extended`, `unchanged`, `revoked`), `deadline_ns`; errors `bad_request`, `out_of_range`, `lease_expired`, `no_lease` (see [`crate::lease`]) |
//! | `shm` | once built | — | `size`, `gpa`, the window's memfd (SCM_RIGHTS; needs `--shm-mib`) |
//! | `ak`, `activate`, `quote`, `event_log` | once built | see [`crate::tpm`] and docs/ATTESTATION.md (needs `--tpm`) | |
//!
//! The socket is served from early in the build, before the vTPM is waited
//! for and the boot measured (1-3 s under load), so that a lease counted from
//! VMM start can be renewed meanwhile. Until the VM is built, every op but
//! `describe`, `stop` and `lease` answers the error `starting`
//! ([`STARTING`]): retry it.
//!
//! The API runs on its own thread so a slow request (a TPM quote) never stalls
//! the event loop or the vCPUs. Connections are served one at a time.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::RawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use serde_json::{Value, json};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::exit::{ExitSignal, StopReason};

/// Longest request line accepted.
pub const MAX_REQUEST: usize = 64 * 1024;

/// Errors of the API socket.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Binding the socket failed.
    #[error("cannot listen on the API socket {path}")]
    Bind {
        /// Path.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Spawning the API thread failed.
    #[error("cannot start the API thread")]
    Thread(#[source] std::io::Error),
    /// The API thread could not install its seccomp filter.
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
}

/// A request handler for ops beyond the built-in ones (e.g. `quote`).
pub trait ApiExtension: Send + Sync {
    /// Handles `op` with the full request; `None` if this extension does not know `op`.
    fn handle(&self, op: &str, req: &Value) -> Option<Value>;

    /// File descriptors to pass (SCM_RIGHTS) with a successful answer to `op`.
    fn fds(&self, _op: &str) -> Vec<RawFd> {
        Vec::new()
    }
}

/// The error code of an op that needs the VM built, asked while it is not yet.
pub const STARTING: &str = "starting";

/// The ops served once the VM is built; set once, by [`crate::vm::Vm::run`].
pub type ReadyExtensions = Arc<OnceLock<Vec<Box<dyn ApiExtension>>>>;

/// What the API reports and can act on.
pub struct ApiContext {
    /// Static description of the VM.
    pub describe: Value,
    /// Used by `stop`.
    pub exit: Arc<ExitSignal>,
    /// Extra ops served from the start (`lease`).
    pub extensions: Vec<Box<dyn ApiExtension>>,
    /// Extra ops served once the VM is built (`shm`, the TPM ops); until
    /// then other ops answer [`STARTING`].
    pub ready: ReadyExtensions,
}

impl ApiContext {
    /// A context whose VM is built: `extensions` are served at once.
    pub fn built(
        describe: Value,
        exit: Arc<ExitSignal>,
        extensions: Vec<Box<dyn ApiExtension>>,
    ) -> Self {
        Self {
            describe,
            exit,
            extensions: Vec::new(),
            ready: Arc::new(OnceLock::from(extensions)),
        }
    }
}

fn find_op(exts: &[Box<dyn ApiExtension>], op: &str, req: &Value) -> Option<(Value, Vec<RawFd>)> {
    exts.iter().find_map(|e| {
        e.handle(op, req).map(|v| {
            let fds = if v["ok"] == true { e.fds(op) } else { vec![] };
            (v, fds)
        })
    })
}

/// An error response.
pub fn error(code: &str, message: impl std::fmt::Display) -> Value {
    json!({"ok": false, "error": {"code": code, "message": message.to_string()}})
}

/// Answers one request line.
pub fn respond(ctx: &ApiContext, line: &str) -> Value {
    respond_with_fds(ctx, line).0
}

/// Answers one request line, with the descriptors to pass along.
pub fn respond_with_fds(ctx: &ApiContext, line: &str) -> (Value, Vec<RawFd>) {
    let req: Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => {
            return (
                error("bad_request", format_args!("request is not JSON: {e}")),
                vec![],
            );
        }
    };
    let Some(op) = req.get("op").and_then(Value::as_str) else {
        return (
            error("bad_request", "request has no string field \"op\""),
            vec![],
        );
    };
    match op {
        "describe" => (
            json!({
                "ok": true,
                "vm": ctx.describe.clone(),
                "uptime_us": crate::since_start_us(),
                "state": if ctx.ready.get().is_some() { "running" } else { STARTING },
            }),
            vec![],
        ),
        "stop" => {
            ctx.exit.signal(StopReason::Stopped);
            (json!({"ok": true}), vec![])
        }
        _ => find_op(&ctx.extensions, op, &req).unwrap_or_else(|| match ctx.ready.get() {
            Some(ready) => find_op(ready, op, &req).unwrap_or_else(|| {
                (
                    error("unknown_op", format_args!("unknown op {op:?}")),
                    vec![],
                )
            }),
            None => (
                error(
                    STARTING,
                    "the VM is still being set up (vTPM, measured boot); retry",
                ),
                vec![],
            ),
        }),
    }
}

/// Whether the API thread is answering a request, so that the VMM's teardown
/// lets a `stop` or a revoking `lease` answer go out before the process ends.
#[derive(Debug, Default)]
struct Answering {
    busy: Mutex<bool>,
    done: Condvar,
}

impl Answering {
    fn set(&self, busy: bool) {
        *self.busy.lock().unwrap_or_else(|p| p.into_inner()) = busy;
        if !busy {
            self.done.notify_all();
        }
    }

    /// Waits, at most `limit`, for the answer being written to be out.
    fn wait(&self, limit: Duration) {
        let g = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        let _ = self.done.wait_timeout_while(g, limit, |busy| *busy);
    }
}

/// The longest the teardown waits for an answer being written.
const ANSWER_WAIT: Duration = Duration::from_millis(500);

fn serve_conn(ctx: &ApiContext, stream: UnixStream, answering: &Answering) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream.take(u64::MAX));
    let mut line = String::new();
    loop {
        line.clear();
        reader.get_mut().set_limit(MAX_REQUEST as u64 + 1);
        let n = reader.read_line(&mut line)?;
        if n == 0 {
            return Ok(());
        }
        if n > MAX_REQUEST {
            let e = error(
                "too_large",
                format_args!("request over {MAX_REQUEST} bytes"),
            );
            writer.write_all(format!("{e}\n").as_bytes())?;
            return Ok(());
        }
        answering.set(true);
        let sent = answer(ctx, &mut writer, line.trim_end());
        answering.set(false);
        sent?;
    }
}

/// Answers one request. The line goes out in one write where it fits the
/// socket buffer (a `writeln!` of a JSON value is many small writes, and a
/// `stop` or revoking `lease` ends the process meanwhile).
fn answer(ctx: &ApiContext, writer: &mut UnixStream, request: &str) -> std::io::Result<()> {
    let (resp, fds) = respond_with_fds(ctx, request);
    let msg = format!("{resp}\n");
    if fds.is_empty() {
        return writer.write_all(msg.as_bytes());
    }
    let n = writer
        .send_with_fds(&[msg.as_bytes()], &fds)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
    // The descriptors went with the first byte; send any rest plainly.
    writer.write_all(&msg.as_bytes()[n..])
}

/// The API socket; removes its path on drop.
#[derive(Debug)]
pub struct ApiServer {
    path: PathBuf,
    answering: Arc<Answering>,
}

impl ApiServer {
    /// Binds `path` and serves it on a new thread.
    pub fn start(path: &Path, ctx: ApiContext) -> Result<Self, ApiError> {
        let listener = UnixListener::bind(path).map_err(|source| ApiError::Bind {
            path: path.display().to_string(),
            source,
        })?;
        let server = Self {
            path: path.to_path_buf(),
            answering: Arc::default(),
        };
        let answering = server.answering.clone();
        spawn_filtered("api", move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(s) => {
                        if let Err(e) = serve_conn(&ctx, s, &answering) {
                            tracing::debug!(error = %e, "API connection ended");
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "API accept failed"),
                }
            }
        })?;
        Ok(server)
    }
}

/// Starts a thread named `name` that installs the API thread's seccomp
/// filter, then runs `body`. Returns once the filter is in place, or with
/// the reason it could not be installed (the thread then ends at once).
pub(crate) fn spawn_filtered(
    name: &str,
    body: impl FnOnce() + Send + 'static,
) -> Result<(), ApiError> {
    let (filtered_tx, filtered_rx) = std::sync::mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let installed = crate::seccomp::install(crate::seccomp::ThreadKind::Api);
            let ok = installed.is_ok();
            let _ = filtered_tx.send(installed);
            if ok {
                body();
            }
        })
        .map_err(ApiError::Thread)?;
    filtered_rx.recv().map_err(|_| {
        ApiError::Thread(std::io::Error::other(format!("the {name} thread died")))
    })??;
    Ok(())
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        // The VM is ending: an answer being written (the `stop` or `lease`
        // that ended it, most often) goes out first.
        self.answering.wait(ANSWER_WAIT);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo;
    impl ApiExtension for Echo {
        fn handle(&self, op: &str, req: &Value) -> Option<Value> {
            (op == "echo").then(|| json!({"ok": true, "got": req["x"].clone()}))
        }
    }

    fn ctx() -> ApiContext {
        ApiContext::built(
            json!({"vcpus": 2}),
            Arc::new(ExitSignal::new().unwrap()),
            vec![Box::new(Echo)],
        )
    }

    struct Lease;
    impl ApiExtension for Lease {
        fn handle(&self, op: &str, _req: &Value) -> Option<Value> {
            (op == "lease").then(|| json!({"ok": true}))
        }
    }

    #[test]
    fn while_building_only_describe_stop_and_the_early_ops_are_served() {
        let c = ApiContext {
            describe: json!({"vcpus": 1}),
            exit: Arc::new(ExitSignal::new().unwrap()),
            extensions: vec![Box::new(Lease)],
            ready: ReadyExtensions::default(),
        };
        assert_eq!(respond(&c, r#"{"op":"describe"}"#)["ok"], true);
        assert_eq!(respond(&c, r#"{"op":"lease"}"#)["ok"], true);
        for op in ["echo", "quote", "shm"] {
            let r = respond(&c, &format!(r#"{{"op":"{op}"}}"#));
            assert_eq!(r["error"]["code"], STARTING, "{op}");
        }
        assert!(c.ready.set(vec![Box::new(Echo)]).is_ok());
        assert_eq!(respond(&c, r#"{"op":"echo","x":1}"#)["got"], 1);
        assert_eq!(respond(&c, r#"{"op":"lease"}"#)["ok"], true);
        assert_eq!(
            respond(&c, r#"{"op":"quote"}"#)["error"]["code"],
            "unknown_op"
        );
        assert_eq!(respond(&c, r#"{"op":"stop"}"#)["ok"], true);
        assert_eq!(c.exit.reason(), Some(StopReason::Stopped));
    }

    #[test]
    fn ops_and_errors() {
        let c = ctx();
        assert_eq!(respond(&c, r#"{"op":"describe"}"#)["vm"]["vcpus"], 2);
        assert_eq!(respond(&c, r#"{"op":"echo","x":7}"#)["got"], 7);
        assert_eq!(respond(&c, "{nope")["error"]["code"], "bad_request");
        assert_eq!(respond(&c, r#"{"op":3}"#)["error"]["code"], "bad_request");
        assert_eq!(
            respond(&c, r#"{"op":"fly"}"#)["error"]["code"],
            "unknown_op"
        );
        assert_eq!(c.exit.reason(), None);
        assert_eq!(respond(&c, r#"{"op":"stop"}"#)["ok"], true);
        assert_eq!(c.exit.reason(), Some(StopReason::Stopped));
    }

    #[test]
    fn teardown_waits_for_the_answer_being_written() {
        let a = Arc::new(Answering::default());
        // Idle: no wait.
        a.wait(Duration::from_secs(30));
        a.set(true);
        let (tx, rx) = std::sync::mpsc::channel();
        let b = a.clone();
        let t = std::thread::spawn(move || {
            b.wait(Duration::from_secs(30));
            tx.send(()).unwrap();
        });
        assert!(
            rx.recv_timeout(Duration::from_millis(100)).is_err(),
            "the teardown went on while an answer was being written"
        );
        a.set(false);
        rx.recv_timeout(Duration::from_secs(30))
            .expect("the teardown goes on once the answer is out");
        t.join().unwrap();
    }

    #[test]
    fn serves_a_socket_line_by_line_and_refuses_huge_requests() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("api.sock");
        let srv = ApiServer::start(&p, ctx()).unwrap();
        let s = UnixStream::connect(&p).unwrap();
        let mut w = s.try_clone().unwrap();
        let mut r = BufReader::new(s);
        writeln!(w, r#"{{"op":"describe"}}"#).unwrap();
        writeln!(w, r#"{{"op":"echo","x":"y"}}"#).unwrap();
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        assert_eq!(serde_json::from_str::<Value>(&l).unwrap()["ok"], true);
        l.clear();
        r.read_line(&mut l).unwrap();
        assert_eq!(serde_json::from_str::<Value>(&l).unwrap()["got"], "y");
        // A request over the limit gets an error and the connection closes.
        let big = "x".repeat(MAX_REQUEST + 10);
        // The server may answer and close before it has taken every byte, so the
        // tail of this write can meet a closed socket (EPIPE); its answer is
        // already queued for us either way.
        if let Err(e) = writeln!(w, "{big}") {
            assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "{e}");
        }
        l.clear();
        r.read_line(&mut l).unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(&l).unwrap()["error"]["code"],
            "too_large"
        );
        l.clear();
        // Closed: EOF, or a reset because the rest of the request was never read.
        assert!(matches!(r.read_line(&mut l), Ok(0) | Err(_)));
        drop(srv);
        assert!(!p.exists(), "the socket path is removed");
    }
}
