// SPDX-License-Identifier: Apache-2.0
//! The Unix-socket muxer: the production [`VsockBackend`].
//!
//! It owns one epoll set (the only descriptor the device's event handler
//! watches for it) holding the listening socket `<uds>`, a timer for
//! connection deadlines, host sockets that have not sent their `CONNECT` line
//! yet, and the host stream of every connection.

use std::cmp::Reverse;
use std::collections::HashSet;
use std::collections::{BinaryHeap, HashMap};
use std::io::{ErrorKind, Read};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::rxq::{MuxerRx, RxQueue};
use super::{LOCAL_PORT_BASE, connect_nonblocking};
use crate::virtio::count_and_warn;
use crate::virtio::vsock::csm::VsockConnection;
use crate::virtio::vsock::metrics::VsockMetrics;
use crate::virtio::vsock::packet::{Header, VsockPacket};
use crate::virtio::vsock::uapi::*;
use crate::virtio::vsock::{
    VSOCK_HOST_CID, VsockBackend, VsockChannel, VsockEpollListener, VsockError,
};

/// Default cap on concurrent connections per device (both directions).
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Cap on host sockets that connected but have not sent `CONNECT P\n` yet.
const MAX_PENDING_HOST: usize = 64;
/// Longest `CONNECT` line accepted (`CONNECT 4294967295` is 18 bytes).
const MAX_CONNECT_LINE: usize = 32;
/// Epoll events handled per wake-up (the set is level-triggered: the rest come next time).
const EVENTS_PER_WAKE: usize = 64;
/// How long the listening socket is left alone after `accept` failed (out of
/// descriptors, say): it stays readable, and watching it would spin the loop.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// A connection's identity: (host port, guest port). The guest CID is fixed per device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnKey {
    /// Host-side port (`P` for guest-initiated, an allocated port otherwise).
    pub local_port: u32,
    /// Guest-side port.
    pub peer_port: u32,
}

#[derive(Debug, Clone, Copy)]
enum Listener {
    HostSock,
    Timer,
    Conn(ConnKey),
    PendingHost,
}

#[derive(Debug)]
struct ConnEntry {
    conn: VsockConnection<UnixStream>,
    /// Events the host stream is registered for; `None` when it is not in the set.
    registered: Option<EventSet>,
    /// Whether the connection has an entry in the RX queue.
    queued: bool,
    /// Deadline already pushed to the kill queue.
    deadline: Option<Instant>,
    host_initiated: bool,
}

#[derive(Debug)]
struct PendingHost {
    stream: UnixStream,
    line: Vec<u8>,
}

/// The hybrid vsock backend over Unix sockets.
#[derive(Debug)]
pub struct UnixMuxer {
    cid: u64,
    host_sock: UnixListener,
    host_sock_path: PathBuf,
    epoll: Epoll,
    timer: TimerFd,
    timer_deadline: Option<Instant>,
    /// Set while the listening socket is out of the epoll set after a failed accept.
    accept_paused_until: Option<Instant>,
    conns: HashMap<ConnKey, ConnEntry>,
    pending_host: HashMap<RawFd, PendingHost>,
    fds: HashMap<RawFd, Listener>,
    rxq: RxQueue,
    killq: BinaryHeap<Reverse<(Instant, ConnKey)>>,
    local_ports: HashSet<u32>,
    last_local_port: u32,
    max_conns: usize,
    metrics: Arc<VsockMetrics>,
    /// Test hook: the next accept fails as if the process were out of descriptors.
    #[cfg(test)]
    pub(crate) fail_next_accept: bool,
}

impl UnixMuxer {
    /// Listens on `uds_path` for host connections, for the guest `cid`. The path
    /// must not exist yet (a stale socket from a crashed VMM must be removed by
    /// whoever owns the run directory). The socket file is removed on drop.
    pub fn new(
        cid: u64,
        uds_path: impl AsRef<Path>,
        metrics: Arc<VsockMetrics>,
    ) -> Result<Self, VsockError> {
        let path = uds_path.as_ref().to_path_buf();
        let bind_err = |source| VsockError::Bind {
            path: path.clone(),
            source,
        };
        let host_sock = UnixListener::bind(&path).map_err(bind_err)?;
        Self::with_listener(cid, host_sock, path.clone(), metrics).inspect_err(|_| {
            let _ = std::fs::remove_file(&path);
        })
    }

    fn with_listener(
        cid: u64,
        host_sock: UnixListener,
        host_sock_path: PathBuf,
        metrics: Arc<VsockMetrics>,
    ) -> Result<Self, VsockError> {
        host_sock
            .set_nonblocking(true)
            .map_err(VsockError::EventSource)?;
        let epoll = Epoll::new().map_err(VsockError::EventSource)?;
        let timer = TimerFd::new().map_err(|e| VsockError::EventSource(e.into()))?;
        let mut fds = HashMap::new();
        for (fd, l) in [
            (host_sock.as_raw_fd(), Listener::HostSock),
            (timer.as_raw_fd(), Listener::Timer),
        ] {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, fd as u64),
                )
                .map_err(VsockError::EventSource)?;
            fds.insert(fd, l);
        }
        Ok(Self {
            cid,
            host_sock,
            host_sock_path,
            epoll,
            timer,
            timer_deadline: None,
            accept_paused_until: None,
            conns: HashMap::new(),
            pending_host: HashMap::new(),
            fds,
            rxq: RxQueue::default(),
            killq: BinaryHeap::new(),
            local_ports: HashSet::new(),
            last_local_port: LOCAL_PORT_BASE - 1,
            max_conns: DEFAULT_MAX_CONNECTIONS,
            metrics,
            #[cfg(test)]
            fail_next_accept: false,
        })
    }

    /// Sets the connection limit (default [`DEFAULT_MAX_CONNECTIONS`]).
    pub fn with_max_connections(mut self, max: usize) -> Self {
        self.max_conns = max;
        self
    }

    /// Path of the host listening socket.
    pub fn uds_path(&self) -> &Path {
        &self.host_sock_path
    }

    /// Number of live connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    fn enq_rst(&mut self, local_port: u32, peer_port: u32) {
        // send_pkt checked for room before getting here.
        self.rxq.push(MuxerRx::Rst {
            local_port,
            peer_port,
        });
    }

    fn set_watch(&mut self, fd: RawFd, old: Option<EventSet>, new: Option<EventSet>) -> bool {
        let ev = |s: EventSet| EpollEvent::new(s, fd as u64);
        let res = match (old, new) {
            (None, Some(n)) => self.epoll.ctl(ControlOperation::Add, fd, ev(n)),
            (Some(o), Some(n)) if o != n => self.epoll.ctl(ControlOperation::Modify, fd, ev(n)),
            (Some(_), None) => self
                .epoll
                .ctl(ControlOperation::Delete, fd, ev(EventSet::empty())),
            _ => Ok(()),
        };
        if let Err(e) = res {
            tracing::warn!(error = %e, fd, "vsock muxer: cannot update the epoll set");
            return false;
        }
        true
    }

    /// Brings a connection's queueing, watching and deadline up to date after
    /// anything happened to it, and drops it once it is finished.
    fn after_conn_op(&mut self, key: ConnKey) {
        let Some(e) = self.conns.get_mut(&key) else {
            return;
        };
        if e.conn.is_killed() {
            return self.remove_conn(key);
        }
        if e.conn.has_pending_rx() && !e.queued {
            if self.rxq.push(MuxerRx::Conn(key)) {
                e.queued = true;
            } else {
                VsockMetrics::inc(&self.metrics.rxq_overflows);
            }
        }
        if let Some(t) = e.conn.expiry() {
            if e.deadline != Some(t) {
                e.deadline = Some(t);
                self.killq.push(Reverse((t, key)));
            }
        }
        let (fd, old, new) = (
            e.conn.stream().as_raw_fd(),
            e.registered,
            e.conn.polled_evset(),
        );
        if self.set_watch(fd, old, new) {
            match new {
                Some(_) => self.fds.insert(fd, Listener::Conn(key)),
                None => self.fds.remove(&fd),
            };
            if let Some(e) = self.conns.get_mut(&key) {
                e.registered = new;
            }
        } else if let Some(e) = self.conns.get_mut(&key) {
            // Unwatchable: reset it rather than leave it stuck.
            e.conn.kill();
            e.registered = old;
            if !e.queued && self.rxq.push(MuxerRx::Conn(key)) {
                e.queued = true;
            }
        }
        self.arm_timer();
    }

    fn add_conn(&mut self, key: ConnKey, conn: VsockConnection<UnixStream>, host_initiated: bool) {
        VsockMetrics::inc(&self.metrics.conns_added);
        self.conns.insert(
            key,
            ConnEntry {
                conn,
                registered: None,
                queued: false,
                deadline: None,
                host_initiated,
            },
        );
        self.after_conn_op(key);
    }

    fn remove_conn(&mut self, key: ConnKey) {
        let Some(e) = self.conns.remove(&key) else {
            return;
        };
        VsockMetrics::inc(&self.metrics.conns_removed);
        let fd = e.conn.stream().as_raw_fd();
        if e.registered.is_some() {
            self.set_watch(fd, e.registered, None);
            self.fds.remove(&fd);
        }
        if e.host_initiated {
            self.local_ports.remove(&key.local_port);
        }
        // Dropping the entry closes the host stream.
    }

    fn allocate_local_port(&mut self, peer_port: u32) -> Option<u32> {
        for _ in 0..=self.max_conns {
            self.last_local_port = match self.last_local_port {
                p if p >= u32::MAX - 1 => LOCAL_PORT_BASE,
                p => p + 1,
            };
            let p = self.last_local_port;
            let key = ConnKey {
                local_port: p,
                peer_port,
            };
            if !self.conns.contains_key(&key) && self.local_ports.insert(p) {
                return Some(p);
            }
        }
        None
    }

    /// The guest asks to connect to host port `key.local_port`.
    fn peer_request(&mut self, key: ConnKey, buf_alloc: u32) {
        if self.conns.len() >= self.max_conns {
            count_and_warn(
                &self.metrics.conn_limit_rejected,
                "vsock: guest connection refused, connection limit reached",
            );
            return self.enq_rst(key.local_port, key.peer_port);
        }
        let mut path = self.host_sock_path.clone().into_os_string();
        path.push(format!("_{}", key.local_port));
        match connect_nonblocking(Path::new(&path)) {
            Ok(stream) => {
                let conn = VsockConnection::new_peer_init(
                    stream,
                    self.cid,
                    key.local_port,
                    key.peer_port,
                    buf_alloc,
                );
                self.add_conn(key, conn, false);
            }
            Err(e) => {
                VsockMetrics::inc(&self.metrics.conns_refused);
                tracing::debug!(port = key.local_port, error = %e, "vsock: guest connection refused");
                self.enq_rst(key.local_port, key.peer_port);
            }
        }
    }

    fn accept(&mut self) -> std::io::Result<UnixStream> {
        #[cfg(test)]
        if std::mem::take(&mut self.fail_next_accept) {
            return Err(std::io::Error::from_raw_os_error(libc::EMFILE));
        }
        self.host_sock.accept().map(|(s, _)| s)
    }

    fn accept_host(&mut self) {
        for _ in 0..EVENTS_PER_WAKE {
            let stream = match self.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "vsock: accept on the host socket failed, pausing");
                    let fd = self.host_sock.as_raw_fd();
                    if self.set_watch(fd, Some(EventSet::IN), None) {
                        self.fds.remove(&fd);
                        self.accept_paused_until = Some(Instant::now() + ACCEPT_BACKOFF);
                        self.arm_timer();
                    }
                    return;
                }
            };
            VsockMetrics::inc(&self.metrics.host_conns_accepted);
            if self.pending_host.len() >= MAX_PENDING_HOST || self.conns.len() >= self.max_conns {
                count_and_warn(
                    &self.metrics.conn_limit_rejected,
                    "vsock: host connection refused, connection limit reached",
                );
                continue;
            }
            let fd = stream.as_raw_fd();
            if stream.set_nonblocking(true).is_err()
                || !self.set_watch(fd, None, Some(EventSet::IN))
            {
                continue;
            }
            self.fds.insert(fd, Listener::PendingHost);
            self.pending_host.insert(
                fd,
                PendingHost {
                    stream,
                    line: Vec::new(),
                },
            );
        }
    }

    /// Reads the `CONNECT P\n` line one byte at a time, so that data the host
    /// sends right after it stays in the socket for the guest.
    fn read_connect_line(&mut self, fd: RawFd, evset: EventSet) {
        let Some(p) = self.pending_host.get_mut(&fd) else {
            return;
        };
        let mut outcome: Option<Result<u32, &'static str>> = None;
        while outcome.is_none() {
            let mut b = [0u8; 1];
            match p.stream.read(&mut b) {
                Ok(0) => outcome = Some(Err("closed")),
                Ok(_) if b[0] == b'\n' => outcome = Some(parse_connect(&p.line).ok_or("malformed")),
                Ok(_) if p.line.len() >= MAX_CONNECT_LINE => outcome = Some(Err("malformed")),
                Ok(_) => p.line.push(b[0]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => outcome = Some(Err("closed")),
            }
        }
        if outcome.is_none() && evset.intersects(EventSet::HANG_UP | EventSet::ERROR) {
            outcome = Some(Err("closed"));
        }
        let Some(outcome) = outcome else {
            return;
        };
        self.set_watch(fd, Some(EventSet::IN), None);
        self.fds.remove(&fd);
        let Some(p) = self.pending_host.remove(&fd) else {
            return;
        };
        let port = match outcome {
            Ok(port) => port,
            Err("malformed") => {
                return count_and_warn(
                    &self.metrics.host_connect_bad,
                    "vsock: host connection sent a malformed CONNECT line",
                );
            }
            Err(_) => return,
        };
        if self.conns.len() >= self.max_conns {
            return count_and_warn(
                &self.metrics.conn_limit_rejected,
                "vsock: host connection refused, connection limit reached",
            );
        }
        let Some(local_port) = self.allocate_local_port(port) else {
            return;
        };
        let conn = VsockConnection::new_local_init(p.stream, self.cid, local_port, port);
        self.add_conn(
            ConnKey {
                local_port,
                peer_port: port,
            },
            conn,
            true,
        );
    }

    fn arm_timer(&mut self) {
        let next = match (
            self.killq.peek().map(|Reverse((t, _))| *t),
            self.accept_paused_until,
        ) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if next == self.timer_deadline {
            return;
        }
        self.timer_deadline = next;
        let res = match next {
            Some(t) => {
                let d = t
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1));
                self.timer.reset(d, None)
            }
            None => self.timer.clear(),
        };
        if let Err(e) = res {
            tracing::warn!(error = %e, "vsock muxer: cannot arm the timer");
        }
    }

    fn sweep_timeouts(&mut self) {
        let now = Instant::now();
        if self.accept_paused_until.is_some_and(|t| t <= now) {
            let fd = self.host_sock.as_raw_fd();
            if self.set_watch(fd, None, Some(EventSet::IN)) {
                self.fds.insert(fd, Listener::HostSock);
                self.accept_paused_until = None;
            } else {
                self.accept_paused_until = Some(now + ACCEPT_BACKOFF);
            }
        }
        while let Some(&Reverse((t, key))) = self.killq.peek() {
            if t > now {
                break;
            }
            self.killq.pop();
            let Some(e) = self.conns.get_mut(&key) else {
                continue;
            };
            if e.deadline == Some(t) {
                e.deadline = None;
                e.conn.check_timeout(now, &self.metrics);
                self.after_conn_op(key);
            }
        }
        self.arm_timer();
    }

    /// Re-queues every connection with pending RX after the queue overflowed.
    fn resync(&mut self) {
        let keys: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, e)| e.conn.has_pending_rx() && !e.queued)
            .map(|(k, _)| *k)
            .collect();
        let mut all = true;
        for k in keys {
            if self.rxq.push(MuxerRx::Conn(k)) {
                if let Some(e) = self.conns.get_mut(&k) {
                    e.queued = true;
                }
            } else {
                all = false;
                break;
            }
        }
        if all {
            self.rxq.mark_synced();
        }
    }
}

fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?;
    let mut words = line.trim_end_matches('\r').split(' ');
    match (words.next(), words.next(), words.next()) {
        (Some("CONNECT"), Some(port), None) => port.parse().ok(),
        _ => None,
    }
}

impl Drop for UnixMuxer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.host_sock_path);
    }
}

impl VsockChannel for UnixMuxer {
    fn recv_pkt(&mut self, pkt: &mut VsockPacket<'_>) -> Result<(), VsockError> {
        loop {
            if self.rxq.is_empty() && !self.rxq.is_synced() {
                self.resync();
            }
            let Some(item) = self.rxq.pop() else {
                return Err(VsockError::NoData);
            };
            match item {
                MuxerRx::Rst {
                    local_port,
                    peer_port,
                } => {
                    VsockMetrics::inc(&self.metrics.rst_sent);
                    let h = Header {
                        src_cid: VSOCK_HOST_CID,
                        dst_cid: self.cid,
                        src_port: local_port,
                        dst_port: peer_port,
                        type_: VSOCK_TYPE_STREAM,
                        op: VSOCK_OP_RST,
                        ..Header::default()
                    };
                    return h.write_to(pkt).map_err(VsockError::Packet);
                }
                MuxerRx::Conn(key) => {
                    let Some(e) = self.conns.get_mut(&key) else {
                        continue;
                    };
                    e.queued = false;
                    let res = e.conn.recv_pkt(pkt, &self.metrics);
                    self.after_conn_op(key);
                    if res.is_ok() {
                        return Ok(());
                    }
                }
            }
        }
    }

    fn send_pkt(&mut self, pkt: &VsockPacket<'_>) -> Result<(), VsockError> {
        if self.rxq.is_full() {
            return Err(VsockError::Backpressure);
        }
        if pkt.src_cid() != self.cid || pkt.dst_cid() != VSOCK_HOST_CID {
            count_and_warn(
                &self.metrics.bogus_cid,
                &format!(
                    "vsock: dropped a packet from CID {} to CID {}",
                    pkt.src_cid(),
                    pkt.dst_cid()
                ),
            );
            return Ok(());
        }
        let (op, local_port, peer_port) = (pkt.op(), pkt.dst_port(), pkt.src_port());
        if pkt.type_() != VSOCK_TYPE_STREAM {
            count_and_warn(
                &self.metrics.bogus_type,
                &format!("vsock: guest sent socket type {}", pkt.type_()),
            );
            if op != VSOCK_OP_RST {
                self.enq_rst(local_port, peer_port);
            }
            return Ok(());
        }
        let key = ConnKey {
            local_port,
            peer_port,
        };
        if let Some(e) = self.conns.get_mut(&key) {
            e.conn.send_pkt(pkt, &self.metrics);
            self.after_conn_op(key);
            return Ok(());
        }
        match op {
            VSOCK_OP_REQUEST => self.peer_request(key, pkt.buf_alloc()),
            VSOCK_OP_RST => {}
            VSOCK_OP_RESPONSE
            | VSOCK_OP_RW
            | VSOCK_OP_SHUTDOWN
            | VSOCK_OP_CREDIT_UPDATE
            | VSOCK_OP_CREDIT_REQUEST => self.enq_rst(local_port, peer_port),
            _ => {
                count_and_warn(
                    &self.metrics.bogus_op,
                    &format!("vsock: guest sent op {op}"),
                );
                self.enq_rst(local_port, peer_port);
            }
        }
        Ok(())
    }

    fn has_pending_rx(&self) -> bool {
        !self.rxq.is_empty() || !self.rxq.is_synced()
    }
}

impl VsockEpollListener for UnixMuxer {
    fn get_polled_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    fn get_polled_evset(&self) -> EventSet {
        EventSet::IN
    }

    fn notify(&mut self, _evset: EventSet) {
        let mut events = [EpollEvent::default(); EVENTS_PER_WAKE];
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "vsock muxer: epoll_wait failed");
                return;
            }
        };
        for ev in &events[..n] {
            let fd = ev.data() as RawFd;
            match self.fds.get(&fd).copied() {
                Some(Listener::HostSock) => self.accept_host(),
                Some(Listener::Timer) => {
                    // Readable means expired; the count does not matter.
                    let _ = self.timer.wait();
                    self.timer_deadline = None;
                    self.sweep_timeouts();
                }
                Some(Listener::PendingHost) => self.read_connect_line(fd, ev.event_set()),
                Some(Listener::Conn(key)) => {
                    if let Some(e) = self.conns.get_mut(&key) {
                        e.conn.notify(ev.event_set(), &self.metrics);
                        self.after_conn_op(key);
                    }
                }
                // Deregistered while this batch was pending; anything else in
                // the set that nobody owns must go, or it would wake us forever.
                None => {
                    let _ = self
                        .epoll
                        .ctl(ControlOperation::Delete, fd, EpollEvent::default());
                }
            }
        }
        self.sweep_timeouts();
    }
}

impl VsockBackend for UnixMuxer {
    fn reset(&mut self) {
        let n = self.conns.len() as u64;
        VsockMetrics::add(&self.metrics.conns_removed, n);
        // Dropping the streams closes them (and takes them out of the epoll set).
        self.conns.clear();
        self.pending_host.clear();
        self.fds
            .retain(|_, l| matches!(l, Listener::HostSock | Listener::Timer));
        self.rxq.clear();
        self.killq.clear();
        self.local_ports.clear();
        self.arm_timer();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_line_parsing() {
        assert_eq!(parse_connect(b"CONNECT 1024"), Some(1024));
        assert_eq!(parse_connect(b"CONNECT 52\r"), Some(52));
        assert_eq!(parse_connect(b"CONNECT 4294967295"), Some(u32::MAX));
        assert_eq!(parse_connect(b"CONNECT 4294967296"), None);
        assert_eq!(parse_connect(b"CONNECT"), None);
        assert_eq!(parse_connect(b"connect 5"), None);
        assert_eq!(parse_connect(b"CONNECT 5 6"), None);
        assert_eq!(parse_connect(b"CONNECT -1"), None);
        assert_eq!(parse_connect(&[0xff, 0xfe]), None);
    }
}
