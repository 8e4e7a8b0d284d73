// SPDX-License-Identifier: Apache-2.0
//! `cell0-vmm` processes: spawning, exit watching through a pidfd (which
//! works for processes this daemon did not spawn, i.e. re-adopted ones),
//! liveness checks and the per-VM JSON-lines API socket.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use tokio::io::unix::AsyncFd;

/// Errors of process handling.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    /// pidfd_open failed (the process is gone, or the kernel is older than 5.3).
    #[error("cannot open a pidfd for process {pid}")]
    Pidfd {
        /// Pid.
        pid: i32,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The API socket could not be reached.
    #[error("cannot reach the VM API socket {path}")]
    Api {
        /// Path.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The API answered with an error or an unparsable line.
    #[error("the VM API refused {op:?}: {message}")]
    ApiRefused {
        /// The op.
        op: String,
        /// What it said.
        message: String,
    },
}

/// A process watched through its pidfd.
pub struct PidFd {
    fd: AsyncFd<OwnedFd>,
    /// The process id.
    pub pid: i32,
}

impl PidFd {
    /// Opens a pidfd for `pid`.
    pub fn open(pid: i32) -> Result<Self, ProcError> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return Err(ProcError::Pidfd {
                pid,
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: the kernel just returned this descriptor and nothing else owns it.
        let owned = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        // SAFETY: `owned` is a valid, open pidfd that the AsyncFd owns from
        // here on, so its descriptor stays the same until the AsyncFd drops.
        let fd = unsafe { AsyncFd::register_with_interest(owned, tokio::io::Interest::READABLE) }
            .map_err(|e| ProcError::Pidfd {
            pid,
            source: std::io::Error::from(e),
        })?;
        Ok(Self { fd, pid })
    }

    /// Waits until the process has exited.
    pub async fn exited(&self) {
        loop {
            match self.fd.readable().await {
                // A pidfd becomes readable when the process exits.
                Ok(_guard) => return,
                Err(e) => {
                    tracing::warn!(pid = self.pid, error = %e, "pidfd wait failed; polling");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    if !alive(self.pid) {
                        return;
                    }
                }
            }
        }
    }

    /// Sends `sig` to the process (never to a recycled pid).
    pub fn signal(&self, sig: i32) -> std::io::Result<()> {
        // SAFETY: pidfd_send_signal with a valid pidfd, a signal number, no siginfo, no flags.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.get_ref().as_raw_fd(),
                sig,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
}

/// Reaps `pid` if it is our exited child: `Some(exit code)` (128 + signal
/// for a signal), `None` when it is not our child (re-adopted) or unknown.
pub fn reap(pid: i32) -> Option<i32> {
    let mut status = 0;
    // SAFETY: waitpid with a valid out pointer.
    let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    if r != pid {
        return None;
    }
    if libc::WIFEXITED(status) {
        Some(libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        Some(128 + libc::WTERMSIG(status))
    } else {
        None
    }
}

/// Whether a process with `pid` exists (it may be a zombie).
pub fn alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence and permission.
    unsafe { libc::kill(pid, 0) == 0 }
}

/// The start time of `pid` (clock ticks after boot, field 22 of
/// `/proc/PID/stat`), to tell a re-used pid from the process we launched.
pub fn start_time(pid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces; fields resume after ")".
    let rest = &s[s.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
}

/// Whether `pid`'s executable is named like `exe_name`.
pub fn exe_matches(pid: i32, exe_name: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|c| exe_name.starts_with(c.trim()))
        .unwrap_or(false)
}

/// `CLOCK_MONOTONIC` now in nanoseconds: the clock of a VMM's lease
/// (`cell0-vmm launch --lease-ms`), which a VMM on this host reads too.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    // It cannot fail for CLOCK_MONOTONIC on Linux; 0 would only make deadlines early.
    debug_assert_eq!(r, 0);
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// One request over the VM's API socket (blocking; call from a blocking task).
///
/// A VMM serves `describe`, `stop` and `lease` from early in its build and
/// answers the other ops (`ak`, `activate`, `quote`, `shm`) with the error
/// `starting` until its vTPM is set up and the boot measured: those are
/// retried for up to `timeout`, then refused with a message that says so.
pub fn api_call(sock: &Path, req: &Value, timeout: Duration) -> Result<Value, ProcError> {
    let give_up = std::time::Instant::now() + timeout;
    loop {
        match api_call_once(sock, req, timeout)? {
            Ok(v) => return Ok(v),
            Err(v) if v["error"]["code"] == "starting" && std::time::Instant::now() < give_up => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(v) => {
                let starting = v["error"]["code"] == "starting";
                let message = v["error"]["message"]
                    .as_str()
                    .unwrap_or("no message")
                    .to_string();
                return Err(ProcError::ApiRefused {
                    op: req["op"].as_str().unwrap_or("?").to_string(),
                    message: if starting {
                        format!(
                            "{message} (still starting after {} ms)",
                            timeout.as_millis()
                        )
                    } else {
                        message
                    },
                });
            }
        }
    }
}

/// One request; `Ok(Err(answer))` when the VMM answered with an error.
fn api_call_once(
    sock: &Path,
    req: &Value,
    timeout: Duration,
) -> Result<Result<Value, Value>, ProcError> {
    let err = |source| ProcError::Api {
        path: sock.display().to_string(),
        source,
    };
    let s = UnixStream::connect(sock).map_err(err)?;
    s.set_read_timeout(Some(timeout)).map_err(err)?;
    s.set_write_timeout(Some(timeout)).map_err(err)?;
    let mut w = s.try_clone().map_err(err)?;
    let mut line = req.to_string();
    line.push('\n');
    w.write_all(line.as_bytes()).map_err(err)?;
    let mut r = BufReader::new(s);
    let mut resp = String::new();
    r.read_line(&mut resp).map_err(err)?;
    let op = req["op"].as_str().unwrap_or("?").to_string();
    let v: Value = serde_json::from_str(&resp).map_err(|e| ProcError::ApiRefused {
        op: op.clone(),
        message: format!("unparsable answer: {e}"),
    })?;
    Ok(if v["ok"] == true { Ok(v) } else { Err(v) })
}

/// [`api_call`] on tokio's blocking pool.
pub async fn api_call_async(
    sock: &Path,
    req: Value,
    timeout: Duration,
) -> Result<Value, ProcError> {
    let sock = sock.to_path_buf();
    let p = sock.display().to_string();
    tokio::task::spawn_blocking(move || api_call(&sock, &req, timeout))
        .await
        .map_err(|e| ProcError::Api {
            path: p,
            source: std::io::Error::other(e.to_string()),
        })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    #[allow(clippy::zombie_processes)] // reaped through `reap`
    async fn pidfd_sees_a_child_exit_and_reap_gets_its_code() {
        let child = std::process::Command::new("sh")
            .args(["-c", "sleep 0.05; exit 7"])
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let st = start_time(pid).unwrap();
        assert!(st > 0);
        let fd = PidFd::open(pid).unwrap();
        fd.exited().await;
        assert_eq!(reap(pid), Some(7));
        assert!(!alive(pid));
    }

    #[tokio::test]
    #[allow(clippy::zombie_processes)] // reaped through `reap`
    async fn signal_goes_through_the_pidfd() {
        let child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        // /proc/<pid>/comm can lag the exec for a moment on a loaded host: poll, bounded.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !exe_matches(pid, "sleep") {
            assert!(
                std::time::Instant::now() < deadline,
                "comm never became sleep"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let fd = PidFd::open(pid).unwrap();
        fd.signal(libc::SIGKILL).unwrap();
        fd.exited().await;
        assert_eq!(reap(pid), Some(128 + libc::SIGKILL));
    }
}
