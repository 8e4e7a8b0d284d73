// SPDX-License-Identifier: Apache-2.0
//! Running commands: the long-lived workload (stdout and stderr streamed as
//! they come) and one-shot `exec` (run to completion, output collected).

use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, oneshot};

use crate::api::{self, ExecReply, ExecRequest, ExitStatus};
use crate::process::{kill_group, reaper};

/// PATH given to commands whose environment has none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Default `exec` timeout.
pub const DEFAULT_EXEC_TIMEOUT: Duration = Duration::from_secs(60);

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    /// The command has no argv.
    #[error("the command is empty")]
    Empty,
    /// Starting the process failed.
    #[error("cannot start {program:?}")]
    Spawn {
        /// argv\[0\].
        program: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Setting up a pipe failed.
    #[error("cannot set up the process's pipes")]
    Pipe(#[source] std::io::Error),
}

fn build(cmd: &api::Command) -> Result<std::process::Command, WorkloadError> {
    let Some(program) = cmd.argv.first() else {
        return Err(WorkloadError::Empty);
    };
    let mut c = std::process::Command::new(program);
    c.args(&cmd.argv[1..]);
    c.env_clear();
    if !cmd.env.contains_key("PATH") {
        c.env("PATH", DEFAULT_PATH);
    }
    c.envs(&cmd.env);
    c.current_dir(if cmd.cwd.is_empty() { "/" } else { &cmd.cwd });
    // Its own process group, so a shutdown or timeout reaches its children too.
    c.process_group(0);
    Ok(c)
}

fn reader(fd: impl Into<OwnedFd>) -> Result<pipe::Receiver, WorkloadError> {
    pipe::Receiver::from_owned_fd(fd.into()).map_err(WorkloadError::Pipe)
}

/// Which output stream a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// A running workload.
#[derive(Debug)]
pub struct Workload {
    /// Its pid (and process group).
    pub pid: u32,
    /// Resolves when it exits.
    pub exit: oneshot::Receiver<ExitStatus>,
}

/// Starts the workload; its output arrives on `out` in chunks of at most
/// `chunk` bytes, in order per stream.
pub fn start(
    cmd: &api::Command,
    out: mpsc::Sender<(StreamKind, Bytes)>,
    chunk: usize,
) -> Result<Workload, WorkloadError> {
    let mut c = build(cmd)?;
    c.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let (mut child, exit) = reaper()
        .spawn(&mut c)
        .map_err(|source| WorkloadError::Spawn {
            program: cmd.argv[0].clone(),
            source,
        })?;
    let pid = child.id();
    for (kind, fd) in [
        (StreamKind::Stdout, child.stdout.take().map(OwnedFd::from)),
        (StreamKind::Stderr, child.stderr.take().map(OwnedFd::from)),
    ] {
        let Some(fd) = fd else { continue };
        let mut r = reader(fd)?;
        let out = out.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; chunk.max(1)];
            loop {
                match r.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if out
                            .send((kind, Bytes::copy_from_slice(&buf[..n])))
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                }
            }
        });
    }
    Ok(Workload { pid, exit })
}

async fn read_capped<R: AsyncRead + Unpin>(mut r: R, cap: usize) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut truncated = false;
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return (out, truncated),
            Ok(n) => {
                let room = cap.saturating_sub(out.len());
                if n > room {
                    truncated = true;
                }
                out.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
}

/// Runs `req` to completion (or its timeout) and collects its output.
pub async fn exec(req: &ExecRequest) -> Result<ExecReply, WorkloadError> {
    let cmd = req.command.clone().unwrap_or_default();
    let mut c = build(&cmd)?;
    c.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let (mut child, exit) = reaper()
        .spawn(&mut c)
        .map_err(|source| WorkloadError::Spawn {
            program: cmd.argv[0].clone(),
            source,
        })?;
    let pid = child.id();
    let stdin = child.stdin.take().map(OwnedFd::from);
    let stdout = reader(child.stdout.take().map(OwnedFd::from).ok_or_else(no_pipe)?)?;
    let stderr = reader(child.stderr.take().map(OwnedFd::from).ok_or_else(no_pipe)?)?;
    if let Some(fd) = stdin {
        let mut w = pipe::Sender::from_owned_fd(fd).map_err(WorkloadError::Pipe)?;
        let data = req.stdin.clone();
        tokio::spawn(async move {
            // A command that does not read its stdin gets EPIPE here: fine.
            let _ = w.write_all(&data).await;
        });
    }
    let timeout = match req.timeout_ms {
        0 => DEFAULT_EXEC_TIMEOUT,
        ms => Duration::from_millis(u64::from(ms)),
    };
    let out_task = tokio::spawn(read_capped(stdout, api::MAX_EXEC_OUTPUT));
    let err_task = tokio::spawn(read_capped(stderr, api::MAX_EXEC_OUTPUT));
    let (status, timed_out) = match tokio::time::timeout(timeout, exit).await {
        Ok(Ok(s)) => (s, false),
        Ok(Err(_)) => (
            ExitStatus {
                code: -1,
                signal: 0,
            },
            false,
        ),
        Err(_) => {
            kill_group(pid, libc::SIGKILL);
            (
                ExitStatus {
                    code: -1,
                    signal: libc::SIGKILL,
                },
                true,
            )
        }
    };
    // Background children that keep the pipes open must not hold the reply.
    kill_group_if(timed_out, pid);
    let (stdout, t1) = tokio::time::timeout(Duration::from_secs(2), out_task)
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    let (stderr, t2) = tokio::time::timeout(Duration::from_secs(2), err_task)
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    Ok(ExecReply {
        status: Some(status),
        stdout: stdout.into(),
        stderr: stderr.into(),
        timed_out,
        truncated: t1 || t2,
    })
}

fn kill_group_if(cond: bool, pid: u32) {
    if cond {
        kill_group(pid, libc::SIGKILL);
    }
}

fn no_pipe() -> WorkloadError {
    WorkloadError::Pipe(std::io::Error::other("the pipe was not created"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn cmd(argv: &[&str]) -> api::Command {
        api::Command {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn exec_collects_output_status_env_and_cwd() {
        let mut c = cmd(&[
            "sh",
            "-c",
            "echo out; echo err >&2; echo $FOO; pwd; cat; exit 3",
        ]);
        c.env.insert("FOO".into(), "bar".into());
        c.cwd = "/tmp".into();
        let r = exec(&ExecRequest {
            command: Some(c),
            stdin: Bytes::from_static(b"from-stdin\n"),
            timeout_ms: 10_000,
        })
        .await
        .unwrap();
        assert_eq!(r.status, Some(ExitStatus { code: 3, signal: 0 }));
        assert_eq!(&r.stdout[..], b"out\nbar\n/tmp\nfrom-stdin\n");
        assert_eq!(&r.stderr[..], b"err\n");
        assert!(!r.timed_out);
    }

    #[tokio::test]
    async fn exec_kills_on_timeout_and_reports_bad_programs() {
        let r = exec(&ExecRequest {
            command: Some(cmd(&["sleep", "30"])),
            stdin: Bytes::new(),
            timeout_ms: 200,
        })
        .await
        .unwrap();
        assert!(r.timed_out);
        assert_eq!(r.status.unwrap().signal, libc::SIGKILL);
        let e = exec(&ExecRequest {
            command: Some(cmd(&["/nonexistent/prog"])),
            ..Default::default()
        })
        .await;
        assert!(matches!(e, Err(WorkloadError::Spawn { .. })));
        let e = exec(&ExecRequest::default()).await;
        assert!(matches!(e, Err(WorkloadError::Empty)));
    }

    #[tokio::test]
    async fn workload_streams_output_and_exit() {
        let (tx, mut rx) = mpsc::channel(16);
        let w = start(
            &cmd(&["sh", "-c", "printf abc; printf xyz >&2; exit 7"]),
            tx,
            4096,
        )
        .unwrap();
        let status = w.exit.await.unwrap();
        assert_eq!(status, ExitStatus { code: 7, signal: 0 });
        let mut out = Vec::new();
        let mut err = Vec::new();
        while let Some((k, b)) = rx.recv().await {
            match k {
                StreamKind::Stdout => out.extend_from_slice(&b),
                StreamKind::Stderr => err.extend_from_slice(&b),
            }
        }
        assert_eq!(out, b"abc");
        assert_eq!(err, b"xyz");
    }
}
