// SPDX-License-Identifier: Apache-2.0
//! Getting a VM's shared-memory window from its VMM: the per-VM JSON API
//! socket (`cell0-vmm --api-sock PATH`) answers `{"op":"shm"}` with
//! `{"ok":true,"size":N,"gpa":G}` and passes the memfd with SCM_RIGHTS on
//! that answer. A VMM started without `--shm-mib` answers
//! `{"ok":false,"error":{"code":"unknown_op",...}}`: the VM has no window.
//!
//! [`MockVmApi`] serves the same protocol over a memfd of its own, for tests
//! and benchmarks that play a VM on the host.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cell0_proto::host::ShmWindow;
use cell0_proto::host::shm::ShmError;
use serde_json::{Value, json};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Longest answer line read from the API socket.
const MAX_LINE: usize = 64 * 1024;

/// Why the window could not be had from the VMM.
#[derive(Debug, thiserror::Error)]
pub enum VmApiError {
    /// Talking to the API socket failed.
    #[error("cannot talk to the VMM API socket {}", .path.display())]
    Io {
        /// The socket.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The answer is not what the protocol says.
    #[error("the VMM API socket {} answered {answer:?}: {reason}", .path.display())]
    BadAnswer {
        /// The socket.
        path: PathBuf,
        /// The answer line (cut at 200 bytes).
        answer: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The memfd cannot be mapped.
    #[error("cannot map the shared-memory window of {}", .path.display())]
    Map {
        /// The socket.
        path: PathBuf,
        /// The cause.
        #[source]
        source: ShmError,
    },
}

/// The window a VMM handed over.
#[derive(Debug)]
pub struct VmWindow {
    /// The mapping.
    pub window: ShmWindow,
    /// Where the guest sees it.
    pub gpa: u64,
}

/// Asks the VMM behind `api` for its shared-memory window (blocking; at most
/// `timeout` per read and write). `Ok(None)`: the VM has none.
pub fn fetch_window(api: &Path, timeout: Duration) -> Result<Option<VmWindow>, VmApiError> {
    let io_err = |source| VmApiError::Io {
        path: api.to_path_buf(),
        source,
    };
    let bad = |answer: &[u8], reason| VmApiError::BadAnswer {
        path: api.to_path_buf(),
        answer: String::from_utf8_lossy(&answer[..answer.len().min(200)]).into_owned(),
        reason,
    };
    let mut s = UnixStream::connect(api).map_err(io_err)?;
    s.set_read_timeout(Some(timeout)).map_err(io_err)?;
    s.set_write_timeout(Some(timeout)).map_err(io_err)?;
    s.write_all(b"{\"op\":\"shm\"}\n").map_err(io_err)?;
    // The descriptor comes with the first bytes of the answer.
    let mut buf = vec![0u8; 4096];
    let (n, file) = s
        .recv_with_fd(&mut buf)
        .map_err(|e| io_err(io::Error::from_raw_os_error(e.errno())))?;
    let fd: Option<OwnedFd> = file.map(OwnedFd::from);
    let mut line = buf[..n].to_vec();
    while !line.contains(&b'\n') {
        if n == 0 || line.len() > MAX_LINE {
            return Err(bad(&line, "no complete answer line"));
        }
        let m = s.read(&mut buf).map_err(io_err)?;
        if m == 0 {
            return Err(bad(&line, "the socket closed before the end of the line"));
        }
        line.extend_from_slice(&buf[..m]);
    }
    let end = line.iter().position(|b| *b == b'\n').unwrap_or(line.len());
    let answer: Value = serde_json::from_slice(&line[..end]).map_err(|_| bad(&line, "not JSON"))?;
    if answer["ok"] != true {
        if answer["error"]["code"] == "unknown_op" {
            return Ok(None);
        }
        return Err(bad(&line, "the VMM refused the shm op"));
    }
    let (Some(size), Some(gpa)) = (answer["size"].as_u64(), answer["gpa"].as_u64()) else {
        return Err(bad(&line, "no numeric size and gpa"));
    };
    let fd = fd.ok_or_else(|| bad(&line, "no file descriptor came with the answer"))?;
    let window = ShmWindow::map(fd, size).map_err(|source| VmApiError::Map {
        path: api.to_path_buf(),
        source,
    })?;
    Ok(Some(VmWindow { window, gpa }))
}

/// A stand-in for a VMM's API socket that serves `{"op":"shm"}` with a memfd
/// of its own (and `unknown_op` for anything else). For tests and benchmarks.
#[derive(Debug)]
pub struct MockVmApi {
    path: PathBuf,
    window: Arc<ShmWindow>,
}

impl MockVmApi {
    /// Creates a `size`-byte window and serves it on `path` from a thread.
    pub fn start(path: &Path, size: u64) -> io::Result<MockVmApi> {
        let window = Arc::new(ShmWindow::create("cell0-mock-shm", size).map_err(io::Error::other)?);
        let listener = UnixListener::bind(path)?;
        let w = window.clone();
        std::thread::Builder::new()
            .name("mock-vm-api".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    let Ok(conn) = conn else { continue };
                    let _ = serve(conn, &w);
                }
            })?;
        Ok(MockVmApi {
            path: path.to_path_buf(),
            window,
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The window, as the "guest" sees it.
    pub fn window(&self) -> &Arc<ShmWindow> {
        &self.window
    }
}

impl Drop for MockVmApi {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve(conn: UnixStream, window: &ShmWindow) -> io::Result<()> {
    let mut reader = io::BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    loop {
        line.clear();
        if io::BufRead::read_line(&mut reader, &mut line)? == 0 {
            return Ok(());
        }
        let req: Value = serde_json::from_str(line.trim_end()).unwrap_or(Value::Null);
        if req["op"] == "shm" {
            let msg = format!(
                "{}\n",
                json!({"ok": true, "size": window.len(), "gpa": 1u64 << 32})
            );
            let n = conn
                .send_with_fds(&[msg.as_bytes()], &[window.fd().as_raw_fd()])
                .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
            (&conn).write_all(&msg.as_bytes()[n..])?;
        } else {
            let msg =
                json!({"ok": false, "error": {"code": "unknown_op", "message": "unknown op"}});
            writeln!(&conn, "{msg}")?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cell0_proto::msg::ShmRef;

    #[test]
    fn the_window_comes_with_the_answer_and_is_shared() {
        let dir = tempfile::tempdir().unwrap();
        let api = MockVmApi::start(&dir.path().join("api.sock"), 1 << 20).unwrap();
        let got = fetch_window(api.path(), Duration::from_secs(5))
            .unwrap()
            .unwrap();
        assert_eq!(got.window.len(), 1 << 20);
        assert_eq!(got.gpa, 1 << 32);
        api.window().write(4096, b"from the guest").unwrap();
        let r = ShmRef {
            offset: 4096,
            length: 14,
        };
        assert_eq!(got.window.read(&r).unwrap(), b"from the guest");
    }

    #[test]
    fn a_vmm_without_a_window_answers_unknown_op() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (mut c, _) = listener.accept().unwrap();
            let mut buf = [0u8; 64];
            let _ = c.read(&mut buf).unwrap();
            c.write_all(b"{\"ok\":false,\"error\":{\"code\":\"unknown_op\",\"message\":\"x\"}}\n")
                .unwrap();
        });
        assert!(
            fetch_window(&path, Duration::from_secs(5))
                .unwrap()
                .is_none()
        );
    }
}
