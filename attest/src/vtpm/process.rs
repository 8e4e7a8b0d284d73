// SPDX-License-Identifier: Apache-2.0
//! The swtpm child process: port allocation, spawn, readiness, death checks and
//! stop.
//!
//! swtpm serves TPM commands on TCP port P on 127.0.0.1 and its control
//! channel on P+1: tss-esapi 7.x reaches swtpm only through the swtpm TCTI,
//! whose configuration is just host and port and which uses P+1 for control
//! commands. Readiness is a GET_CAPABILITY round trip on the control channel.
//!
//! No swtpm outlives its owner: `PR_SET_PDEATHSIG(SIGKILL)` is armed in the
//! child before exec. The kernel sends it when the thread that forked the child
//! ends, so swtpm is forked by the vTPM's worker thread, which lives exactly as
//! long as the `Vtpm`; if the whole process dies (even by SIGKILL) every thread
//! ends and swtpm is killed. (swtpm's `-t`, exit when the client disconnects,
//! cannot be used: the swtpm TCTI opens a new connection for every command.)

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{VtpmError, VtpmOptions};

/// swtpm control-channel command: get capabilities (used as a readiness probe).
const CMD_GET_CAPABILITY: u32 = 1;
/// swtpm control-channel command: shut down.
const CMD_SHUTDOWN: u32 = 3;
/// How often a port that turned out to be taken is replaced by another.
const PORT_ATTEMPTS: u32 = 8;

/// Kills one swtpm through a pidfd, so a recycled pid is never hit. Usable
/// from any thread while the worker owns the process.
#[derive(Clone, Debug, Default)]
pub(crate) struct Killer {
    pidfd: Option<Arc<OwnedFd>>,
}

impl Killer {
    fn for_pid(pid: u32) -> Self {
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if fd < 0 {
            tracing::warn!(
                pid,
                "pidfd_open failed; swtpm cannot be killed from other threads"
            );
            return Killer { pidfd: None };
        }
        // SAFETY: fd is a fresh pidfd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        Killer {
            pidfd: Some(Arc::new(fd)),
        }
    }

    /// Sends SIGKILL; a no-op once the process is gone.
    pub(crate) fn kill(&self) {
        if let Some(fd) = &self.pidfd {
            // SAFETY: pidfd_send_signal on a pidfd we own, with no siginfo.
            unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    fd.as_raw_fd(),
                    libc::SIGKILL,
                    std::ptr::null::<libc::siginfo_t>(),
                    0,
                );
            }
        }
    }
}

/// A running swtpm.
pub(crate) struct SwtpmProcess {
    child: Option<Child>,
    killer: Killer,
    port: u16,
    pid: u32,
    log_path: PathBuf,
}

/// How one spawn attempt failed.
enum Attempt {
    /// The port was taken between allocation and bind; try another.
    PortTaken,
    Failed(VtpmError),
}

impl SwtpmProcess {
    /// Starts swtpm on a free port with the state in `state_dir` and waits until
    /// it answers on its control channel, at most `opts.ready_timeout`.
    pub(crate) fn start(
        opts: &VtpmOptions,
        state_dir: &Path,
        log_path: &Path,
    ) -> Result<Self, VtpmError> {
        for _ in 0..PORT_ATTEMPTS {
            match Self::try_start(opts, state_dir, log_path) {
                Ok(p) => return Ok(p),
                Err(Attempt::PortTaken) => {
                    tracing::debug!("swtpm port was taken, retrying with another");
                    continue;
                }
                Err(Attempt::Failed(e)) => return Err(e),
            }
        }
        Err(VtpmError::NoFreePort {
            attempts: PORT_ATTEMPTS,
        })
    }

    fn try_start(opts: &VtpmOptions, state_dir: &Path, log_path: &Path) -> Result<Self, Attempt> {
        let port = free_port_pair().map_err(|source| Attempt::Failed(VtpmError::Port(source)))?;
        let io = |source| {
            Attempt::Failed(VtpmError::Io {
                path: log_path.to_path_buf(),
                source,
            })
        };
        let log = File::options()
            .create(true)
            .append(true)
            .open(log_path)
            .map_err(io)?;
        let log2 = log.try_clone().map_err(io)?;
        let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);

        let parent = std::process::id();
        let mut cmd = Command::new(&opts.swtpm);
        cmd.arg("socket")
            .arg("--tpm2")
            .arg("--tpmstate")
            .arg(format!("dir={}", state_dir.display()))
            .arg("--server")
            .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
            .arg("--ctrl")
            .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
            .arg("--flags")
            .arg("not-need-init,startup-clear")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .process_group(0);
        // SAFETY: the closure runs in the forked child before exec and calls only
        // async-signal-safe functions (prctl, getppid); it allocates nothing.
        unsafe {
            cmd.pre_exec(move || child_setup(None, parent));
        }
        let child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Attempt::Failed(VtpmError::NotInstalled {
                    program: opts.swtpm.clone(),
                }));
            }
            Err(source) => return Err(Attempt::Failed(VtpmError::Spawn { source })),
        };
        let pid = child.id();
        let mut p = SwtpmProcess {
            killer: Killer::for_pid(pid),
            child: Some(child),
            port,
            pid,
            log_path: log_path.to_path_buf(),
        };

        // Ready once the control channel answers: swtpm binds both sockets
        // before it serves either.
        let deadline = Instant::now() + opts.ready_timeout;
        loop {
            if let Some(status) = p.exited() {
                let log = read_log_tail(log_path, log_start);
                p.child = None;
                if log.contains("Address already in use") {
                    return Err(Attempt::PortTaken);
                }
                return Err(Attempt::Failed(VtpmError::Exited {
                    status: describe_status(status),
                    log,
                }));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                p.kill_and_reap();
                return Err(Attempt::Failed(VtpmError::NotReady {
                    waited: opts.ready_timeout,
                }));
            }
            if ctrl_command(
                port + 1,
                CMD_GET_CAPABILITY,
                left.min(Duration::from_secs(1)),
            )
            .is_ok()
                && p.exited().is_none()
            {
                return Ok(p);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The TCP port of the TPM command channel on 127.0.0.1.
    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    /// The swtpm process id.
    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// A handle that kills this swtpm from another thread.
    pub(crate) fn killer(&self) -> Killer {
        self.killer.clone()
    }

    /// `Ok` while swtpm runs; the typed error once it has exited.
    pub(crate) fn check_alive(&mut self) -> Result<(), VtpmError> {
        let Some(child) = self.child.as_mut() else {
            return Err(VtpmError::Exited {
                status: "stopped".to_string(),
                log: String::new(),
            });
        };
        match child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(VtpmError::Exited {
                status: describe_status(status),
                log: read_log_tail(&self.log_path, 0),
            }),
            Err(source) => Err(VtpmError::Spawn { source }),
        }
    }

    /// Stops swtpm: asks it to shut down on the control channel, then kills it
    /// if it has not exited within 2 s.
    pub(crate) fn stop(&mut self) {
        if self.exited().is_some() {
            self.child = None;
            return;
        }
        let _ = ctrl_command(self.port + 1, CMD_SHUTDOWN, Duration::from_millis(500));
        if self.wait_for(Duration::from_secs(2)).is_some() {
            self.child = None;
            return;
        }
        tracing::warn!(pid = self.pid, "swtpm did not stop, killing it");
        self.kill_and_reap();
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    fn wait_for(&mut self, limit: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let end = Instant::now() + limit;
        loop {
            match child.try_wait() {
                Ok(Some(s)) => return Some(s),
                Ok(None) if Instant::now() < end => std::thread::sleep(Duration::from_millis(5)),
                _ => return None,
            }
        }
    }

    fn kill_and_reap(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for SwtpmProcess {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.stop();
        }
    }
}

/// Runs in the forked child before exec: keeps `inherit_fd` open across exec
/// and arms PDEATHSIG. Only async-signal-safe calls.
pub(crate) fn child_setup(inherit_fd: Option<i32>, parent: u32) -> std::io::Result<()> {
    if let Some(fd) = inherit_fd {
        // SAFETY: fcntl on an fd this process owns; clears FD_CLOEXEC so the
        // control socket survives exec.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes a signal number and touches no memory.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: getppid has no preconditions.
    let ppid = unsafe { libc::getppid() };
    if ppid as u32 != parent {
        // The parent died before PDEATHSIG was armed; do not start an orphan.
        return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
    }
    Ok(())
}

/// Sends one command on swtpm's TCP control channel (127.0.0.1:`port`) and
/// reads the 4-byte result (and, for GET_CAPABILITY, the capability word).
fn ctrl_command(port: u16, cmd: u32, timeout: Duration) -> std::io::Result<u32> {
    let timeout = timeout.max(Duration::from_millis(1));
    let mut s = TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(&cmd.to_be_bytes())?;
    let mut res = [0u8; 4];
    s.read_exact(&mut res)?;
    if cmd == CMD_GET_CAPABILITY {
        let mut caps = [0u8; 4];
        s.read_exact(&mut caps)?;
    }
    Ok(u32::from_be_bytes(res))
}

/// A port P such that P and P+1 were free a moment ago (swtpm's TCP TCTI
/// needs the control channel on P+1). Another process may take one before
/// swtpm binds it; [`SwtpmProcess::start`] then retries with another.
fn free_port_pair() -> std::io::Result<u16> {
    let mut last = None;
    for _ in 0..32 {
        let a = TcpListener::bind(("127.0.0.1", 0))?;
        let p = a.local_addr()?.port();
        if p == u16::MAX {
            continue;
        }
        match TcpListener::bind(("127.0.0.1", p + 1)) {
            Ok(_) => return Ok(p),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::from(std::io::ErrorKind::AddrInUse)))
}

fn describe_status(s: ExitStatus) -> String {
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(sig)) => format!("signal {sig}"),
        _ => s.to_string(),
    }
}

/// The last 2 KiB of the log from `from` on, for error messages.
fn read_log_tail(path: &Path, from: u64) -> String {
    let data = std::fs::read(path).unwrap_or_default();
    let start = usize::try_from(from).unwrap_or(0).min(data.len());
    let tail = &data[start..];
    let tail = &tail[tail.len().saturating_sub(2048)..];
    String::from_utf8_lossy(tail).trim().to_string()
}
