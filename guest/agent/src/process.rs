// SPDX-License-Identifier: Apache-2.0
//! Child processes and the reaper.
//!
//! As PID 1 the agent inherits every orphan in the guest, so one reaper owns
//! all `waitpid` calls: on each SIGCHLD it reaps every zombie, hands the
//! status of the processes the agent started to their waiters, and discards
//! the rest. Spawning holds the reaper's lock, so a child that exits at once
//! cannot be reaped before its waiter is registered.

use std::collections::HashMap;
use std::io;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, Once, OnceLock};

use tokio::sync::oneshot;

use crate::api::ExitStatus;

/// The process-wide reaper.
#[derive(Debug, Default)]
pub struct Reaper {
    waiters: Mutex<HashMap<libc::pid_t, oneshot::Sender<ExitStatus>>>,
    orphans: AtomicU64,
}

static REAPER: OnceLock<Reaper> = OnceLock::new();
static STARTED: Once = Once::new();

/// The reaper. Its thread starts on first use: it sleeps in `waitid(WNOWAIT)`
/// until some child is a zombie, then reaps every zombie under the lock.
pub fn reaper() -> &'static Reaper {
    let r = REAPER.get_or_init(Reaper::default);
    STARTED.call_once(|| {
        let spawned = std::thread::Builder::new()
            .name("reaper".into())
            .spawn(move || {
                loop {
                    // SAFETY: siginfo_t is plain old data; all-zero is valid.
                    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
                    // SAFETY: waitid with a valid pointer; WNOWAIT leaves the
                    // zombie in place for `reap_all` to collect under the lock.
                    let rc = unsafe {
                        libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOWAIT)
                    };
                    if rc < 0 {
                        // ECHILD: no children yet. EINTR: try again.
                        std::thread::sleep(std::time::Duration::from_millis(20));
                        continue;
                    }
                    r.reap_all();
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the reaper; zombies will not be reaped");
        }
    });
    r
}

/// Decodes a `waitpid` status.
pub fn decode_status(status: libc::c_int) -> ExitStatus {
    if libc::WIFEXITED(status) {
        ExitStatus {
            code: libc::WEXITSTATUS(status),
            signal: 0,
        }
    } else if libc::WIFSIGNALED(status) {
        ExitStatus {
            code: -1,
            signal: libc::WTERMSIG(status),
        }
    } else {
        ExitStatus {
            code: -1,
            signal: 0,
        }
    }
}

impl Reaper {
    /// Starts `cmd` and returns the child with a receiver of its exit status.
    pub fn spawn(&self, cmd: &mut Command) -> io::Result<(Child, oneshot::Receiver<ExitStatus>)> {
        let mut waiters = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        let child = cmd.spawn()?;
        let (tx, rx) = oneshot::channel();
        waiters.insert(child.id() as libc::pid_t, tx);
        Ok((child, rx))
    }

    /// Reaps every zombie child now.
    pub fn reap_all(&self) {
        let mut waiters = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let mut status: libc::c_int = 0;
            // SAFETY: waitpid with a valid pointer to a local int.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                break;
            }
            match waiters.remove(&pid) {
                Some(tx) => {
                    let _ = tx.send(decode_status(status));
                }
                None => {
                    self.orphans.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(pid, "reaped an orphan");
                }
            }
        }
    }

    /// Zombies reaped that the agent did not start.
    pub fn orphans_reaped(&self) -> u64 {
        self.orphans.load(Ordering::Relaxed)
    }
}

/// Sends `sig` to the process group `pgid` (the agent starts every command in
/// a group of its own).
pub fn kill_group(pgid: u32, sig: libc::c_int) {
    if pgid == 0 {
        return;
    }
    // SAFETY: kill(2) with a negative pid signals a process group; no memory is touched.
    unsafe {
        libc::kill(-(pgid as libc::pid_t), sig);
    }
}
