// SPDX-License-Identifier: Apache-2.0
//! SYPAS v1 over vsock stream connections, with `cell0-proto`'s no_std core:
//! a frame reader, frame encoding, a client session (HELLO, CALLs checked
//! byte for byte, GOODBYE) and a server session (HELLO → WELCOME, echo/echo,
//! PING → PONG, GOODBYE). Sessions are state machines that the self-tests
//! step from one poll loop, so any number run at once.

use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use cell0_nano::pattern;
use cell0_nano::vsock_core::{CloseReason, ConnId, Core, State};
use cell0_proto::bytes::Bytes;
use cell0_proto::code::ErrorCode;
use cell0_proto::frame::{Decoded, FrameError, HEADER_LEN, Header, Kind, VERSION, decode_slice};
use cell0_proto::msg::{Body, Call, ErrorMsg, Goodbye, Hello, Reply, Right, Welcome};
use cell0_proto::prost::Message;

use crate::selftest::Fail;
use crate::time;

/// The echo service and method the tests call.
pub const ECHO: &str = "echo";
/// The GOODBYE reason that ends `sypas-serve`.
pub const DONE: &str = "done";
/// The agent id the guest client sends in HELLO.
pub const AGENT_ID: &str = "nano";

/// Encodes a frame (header and message) into one buffer.
pub fn encode(kind: Kind, request_id: u64, channel: u32, msg: &impl Message) -> Bytes {
    let len = msg.encoded_len();
    let mut v = Vec::with_capacity(HEADER_LEN + len);
    let h = Header {
        kind,
        flags: 0,
        channel,
        request_id,
        payload_len: len as u32,
    };
    v.extend_from_slice(&h.to_bytes());
    // Encoding into a Vec cannot run out of room.
    let _ = msg.encode(&mut v);
    Bytes::from(v)
}

/// A frame as read: its header and payload (sharing one buffer).
pub struct InFrame {
    /// The header.
    pub header: Header,
    /// The payload.
    pub payload: Bytes,
}

/// Cuts frames out of a connection's received bytes, in place: it claims
/// every byte as it arrives (the host gets its credit back even while a
/// large frame is incomplete), makes room for a whole frame once its header
/// is in, and splits each complete frame off without copying.
pub struct FrameReader {
    max_payload: usize,
}

impl FrameReader {
    /// A reader that accepts payloads up to `max_payload` bytes.
    pub fn new(max_payload: usize) -> Self {
        Self { max_payload }
    }

    /// The next complete frame, if the connection has delivered one.
    pub fn next(&mut self, core: &mut Core, id: ConnId) -> Result<Option<InFrame>, FrameError> {
        core.claim(id);
        let buf = core.received(id);
        match decode_slice(buf, self.max_payload)? {
            Decoded::NeedMore { needed } => {
                if buf.len() >= HEADER_LEN {
                    core.reserve_received(id, needed);
                }
                Ok(None)
            }
            Decoded::Frame {
                header, consumed, ..
            } => {
                let frame = core.split_received(id, consumed);
                Ok(Some(InFrame {
                    header,
                    payload: frame.slice(HEADER_LEN..),
                }))
            }
        }
    }
}

fn decode<M: Message + Default>(f: &InFrame) -> Result<M, Fail> {
    M::decode(f.payload.clone()).map_err(|e| {
        Fail(format!(
            "{} payload (request {}) is malformed: {}",
            f.header.kind, f.header.request_id, e
        ))
    })
}

fn error_text(f: &InFrame) -> String {
    match ErrorMsg::decode(f.payload.clone()) {
        Ok(e) => {
            let name = e.error_code().map_or("UNKNOWN", |c| c.name());
            format!("ERROR {} ({}): {}", name, e.code, e.message)
        }
        Err(_) => String::from("a malformed ERROR"),
    }
}

/// The frame of CALL echo/echo number `req` whose payload is the `size`-byte
/// pattern of call `k`, written straight into the frame: the message is
/// service and method (fields 1 and 2, from prost), then field 3 (payload,
/// length-delimited) appended by hand, which is the same encoding.
fn echo_call(req: u64, size: usize, k: u32) -> Bytes {
    let head = Call {
        service: ECHO.into(),
        method: ECHO.into(),
        payload: Bytes::new(),
        shm: Vec::new(),
    };
    let mut field = [0u8; 11];
    field[0] = 0x1a; // field 3, wire type 2
    let mut n = 1;
    let mut len = size as u64;
    loop {
        let b = (len & 0x7f) as u8;
        len >>= 7;
        if len == 0 {
            field[n] = b;
            n += 1;
            break;
        }
        field[n] = b | 0x80;
        n += 1;
    }
    let field = if size == 0 { &field[..0] } else { &field[..n] };
    let msg_len = head.encoded_len() + field.len() + size;
    let mut v = Vec::with_capacity(HEADER_LEN + msg_len);
    let h = Header {
        kind: Kind::Call,
        flags: 0,
        channel: 0,
        request_id: req,
        payload_len: msg_len as u32,
    };
    v.extend_from_slice(&h.to_bytes());
    // Encoding into a Vec cannot run out of room.
    let _ = head.encode(&mut v);
    v.extend_from_slice(field);
    let start = v.len();
    v.resize(start + size, 0);
    pattern::fill(&mut v[start..], k);
    Bytes::from(v)
}

/// A CALL in flight.
struct Pending {
    step: usize,
    k: u32,
    size: usize,
    sent_at: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientState {
    Connecting,
    AwaitWelcome,
    /// Welcomed; waiting for `start`.
    Ready,
    Calling,
    AwaitGoodbye,
    Closing,
    Done,
}

/// A client session: connect, HELLO → WELCOME, the planned echo CALLs
/// (`window` in flight at most), every reply checked byte for byte, then
/// GOODBYE and close.
pub struct Client {
    /// The connection.
    pub conn: ConnId,
    port: u32,
    reader: FrameReader,
    state: ClientState,
    token: Bytes,
    /// (payload size, calls) in order.
    plan: Vec<(usize, u32)>,
    step: usize,
    issued_in_step: u32,
    window: usize,
    next_req: u64,
    /// Pattern number of this session's first call.
    k_base: u32,
    k: u32,
    pending: BTreeMap<u64, Pending>,
    /// Calls echoed correctly, per plan step.
    pub echoed: Vec<u32>,
    /// TSC at the first CALL and at the last reply of each plan step.
    pub step_time: Vec<(u64, u64)>,
    /// Round-trip times (TSC cycles) of every call, when recording.
    pub rtts: Option<Vec<u32>>,
    /// Payload bytes echoed (each way).
    pub bytes: u64,
    /// TSC when the WELCOME arrived, and when the first REPLY did.
    pub welcome_at: Option<u64>,
    /// TSC of the first REPLY.
    pub first_reply_at: Option<u64>,
    /// Whether to wait for `start` after WELCOME.
    hold: bool,
    /// The agent id HELLO names.
    agent: String,
    /// The WELCOME: the granted rights and the token's expiry.
    pub welcome: Option<Welcome>,
}

impl Client {
    /// A session on a new connection to host `port`.
    pub fn connect(core: &mut Core, port: u32, token: Bytes, plan: Vec<(usize, u32)>) -> Self {
        let conn = core.connect(port, time::now());
        let steps = plan.len();
        Self {
            conn,
            port,
            reader: FrameReader::new(cell0_proto::MAX_PAYLOAD),
            state: ClientState::Connecting,
            token,
            plan,
            step: 0,
            issued_in_step: 0,
            window: 1,
            next_req: 1,
            k_base: 0,
            k: 0,
            pending: BTreeMap::new(),
            echoed: vec![0; steps],
            step_time: vec![(0, 0); steps],
            rtts: None,
            bytes: 0,
            welcome_at: None,
            first_reply_at: None,
            hold: false,
            agent: String::from(AGENT_ID),
            welcome: None,
        }
    }

    /// HELLO names `agent` (the token's agent) instead of `nano`.
    #[must_use]
    pub fn agent(mut self, agent: String) -> Self {
        self.agent = agent;
        self
    }

    /// Up to `window` CALLs in flight at once.
    #[must_use]
    pub fn window(mut self, window: usize) -> Self {
        self.window = window.max(1);
        self
    }

    /// The first call's pattern number (calls are numbered on from there).
    #[must_use]
    pub fn pattern_base(mut self, k: u32) -> Self {
        self.k_base = k;
        self
    }

    /// Records each call's round trip in `rtts`.
    #[must_use]
    pub fn record_rtts(mut self) -> Self {
        self.rtts = Some(Vec::new());
        self
    }

    /// After WELCOME, waits for `start` before calling.
    #[must_use]
    pub fn hold(mut self) -> Self {
        self.hold = true;
        self
    }

    /// Whether the session is welcomed and waiting for `start`.
    pub fn is_ready(&self) -> bool {
        self.state == ClientState::Ready
    }

    /// Lets a held session start calling.
    pub fn start(&mut self, core: &mut Core) {
        if self.state == ClientState::Ready {
            self.state = ClientState::Calling;
            self.issue(core);
        }
    }

    /// Whether the session finished (GOODBYE exchanged, connection closed).
    pub fn is_done(&self) -> bool {
        self.state == ClientState::Done
    }

    /// Calls echoed correctly in all.
    pub fn calls(&self) -> u64 {
        self.echoed.iter().map(|c| u64::from(*c)).sum()
    }

    fn send(&self, core: &mut Core, frame: Bytes) -> Result<(), Fail> {
        if core.send(self.conn, frame) {
            Ok(())
        } else {
            Err(Fail(format!(
                "connection to host port {} is not open for sending",
                self.port
            )))
        }
    }

    /// Sends CALLs until the window is full or the plan is done; sends
    /// GOODBYE once every call is answered.
    fn issue(&mut self, core: &mut Core) {
        while self.pending.len() < self.window && self.step < self.plan.len() {
            let (size, calls) = self.plan[self.step];
            if self.issued_in_step == calls {
                self.step += 1;
                self.issued_in_step = 0;
                continue;
            }
            let k = self.k_base.wrapping_add(self.k);
            self.k += 1;
            let req = self.next_req;
            self.next_req += 1;
            let now = time::now();
            if self.issued_in_step == 0 {
                self.step_time[self.step].0 = now;
            }
            core.send(self.conn, echo_call(req, size, k));
            self.pending.insert(
                req,
                Pending {
                    step: self.step,
                    k,
                    size,
                    sent_at: now,
                },
            );
            self.issued_in_step += 1;
        }
        if self.pending.is_empty() && self.step >= self.plan.len() {
            let bye = Goodbye {
                reason: DONE.into(),
            };
            core.send(self.conn, encode(Kind::Goodbye, 0, 0, &bye));
            self.state = ClientState::AwaitGoodbye;
        }
    }

    fn on_reply(&mut self, core: &mut Core, f: &InFrame) -> Result<(), Fail> {
        let id = f.header.request_id;
        let Some(p) = self.pending.remove(&id) else {
            return Err(Fail(format!(
                "REPLY for request {id}, which is not in flight"
            )));
        };
        let now = time::now();
        let reply: Reply = decode(f)?;
        let size = p.size;
        if let Some(at) = pattern::first_difference_from(&reply.payload, size, p.k) {
            let want = if at < size {
                format!("{:#04x}", pattern::byte(at, p.k))
            } else {
                String::from("end")
            };
            let got = reply
                .payload
                .get(at)
                .map_or(String::from("end"), |b| format!("{b:#04x}"));
            return Err(Fail(format!(
                "call {} ({} bytes, request {}): reply of {} bytes differs at byte {}: expected {}, got {}",
                p.k,
                size,
                id,
                reply.payload.len(),
                at,
                want,
                got
            )));
        }
        if !reply.shm.is_empty() {
            return Err(Fail(format!("call {}: the reply carries shm refs", p.k)));
        }
        self.first_reply_at.get_or_insert(now);
        self.echoed[p.step] += 1;
        self.step_time[p.step].1 = now;
        self.bytes += size as u64;
        if let Some(r) = &mut self.rtts {
            r.push(u32::try_from(now - p.sent_at).unwrap_or(u32::MAX));
        }
        self.issue(core);
        Ok(())
    }

    /// Advances the session; `Ok(true)` when it did something.
    pub fn step(&mut self, core: &mut Core) -> Result<bool, Fail> {
        if self.state == ClientState::Done {
            return Ok(false);
        }
        let conn_state = core.state(self.conn);
        if conn_state == State::Connecting {
            return Ok(false);
        }
        let mut progress = false;
        if self.state == ClientState::Connecting && conn_state == State::Established {
            let hello = Hello {
                versions: vec![u32::from(VERSION)],
                agent_id: self.agent.clone(),
                token: self.token.clone(),
            };
            self.send(core, encode(Kind::Hello, 0, 0, &hello))?;
            self.state = ClientState::AwaitWelcome;
            progress = true;
        }
        while let Some(f) = self.reader.next(core, self.conn).map_err(|e| {
            Fail(format!(
                "bad frame from host port {}: {} ({})",
                self.port,
                e,
                e.code().name()
            ))
        })? {
            progress = true;
            match (self.state, f.header.kind) {
                (_, Kind::Error) => {
                    return Err(Fail(format!(
                        "host sent {} for request {}",
                        error_text(&f),
                        f.header.request_id
                    )));
                }
                (ClientState::AwaitWelcome, Kind::Welcome) => {
                    let w: Welcome = decode(&f)?;
                    if w.version != u32::from(VERSION) {
                        return Err(Fail(format!("WELCOME chose version {}", w.version)));
                    }
                    self.welcome_at = Some(time::now());
                    self.welcome = Some(w);
                    if self.hold {
                        self.state = ClientState::Ready;
                    } else {
                        self.state = ClientState::Calling;
                        self.issue(core);
                    }
                }
                (ClientState::Calling, Kind::Reply) => self.on_reply(core, &f)?,
                (_, Kind::Ping) => self.send(core, pong(&f))?,
                (ClientState::AwaitGoodbye, Kind::Goodbye) => {
                    core.close(self.conn, time::now());
                    self.state = ClientState::Closing;
                }
                (state, kind) => {
                    return Err(Fail(format!(
                        "unexpected {} (request {}) from the host while {:?}",
                        kind, f.header.request_id, state
                    )));
                }
            }
        }
        // Frames that arrived before a close were read above; now the close.
        match core.state(self.conn) {
            State::Closed(CloseReason::Done) if self.state == ClientState::Closing => {
                self.state = ClientState::Done;
                core.release(self.conn);
                return Ok(true);
            }
            State::Closed(CloseReason::Refused) => {
                return Err(Fail(format!(
                    "connecting to host port {} was refused (RST)",
                    self.port
                )));
            }
            State::Closed(why) => {
                return Err(Fail(format!(
                    "the connection to host port {} was {} while {:?}",
                    self.port,
                    why.describe(),
                    self.state
                )));
            }
            _ => {}
        }
        if core.peer_eof(self.conn)
            && !matches!(self.state, ClientState::Closing | ClientState::Done)
        {
            let partial = if !core.received(self.conn).is_empty() {
                " inside a frame"
            } else {
                ""
            };
            return Err(Fail(format!(
                "host port {} closed the connection{} while {:?}",
                self.port, partial, self.state
            )));
        }
        Ok(progress)
    }
}

/// The PONG for a PING: its fields echoed, i.e. the same payload bytes.
fn pong(ping: &InFrame) -> Bytes {
    let mut v = Vec::with_capacity(HEADER_LEN + ping.payload.len());
    let h = Header {
        kind: Kind::Pong,
        flags: 0,
        channel: ping.header.channel,
        request_id: ping.header.request_id,
        payload_len: ping.payload.len() as u32,
    };
    v.extend_from_slice(&h.to_bytes());
    v.extend_from_slice(&ping.payload);
    Bytes::from(v)
}

/// A server session on a connection a host opened: HELLO → WELCOME,
/// CALL echo/echo → REPLY, PING → PONG, GOODBYE → GOODBYE and close. Other
/// kinds are answered like `cell0-proto`'s host server answers them.
pub struct Server {
    /// The connection.
    pub conn: ConnId,
    reader: FrameReader,
    session_id: u64,
    hello: bool,
    /// CALLs answered with REPLY.
    pub calls: u64,
    /// PINGs answered.
    pub pings: u64,
    /// Frames answered with ERROR.
    pub errors: u64,
    /// The client said GOODBYE with reason "done".
    pub done: bool,
    /// The connection is closed and released.
    pub finished: bool,
    closing: bool,
}

impl Server {
    /// A session for accepted connection `conn`.
    pub fn new(conn: ConnId, session_id: u64) -> Self {
        Self {
            conn,
            reader: FrameReader::new(cell0_proto::MAX_PAYLOAD),
            session_id,
            hello: false,
            calls: 0,
            pings: 0,
            errors: 0,
            done: false,
            finished: false,
            closing: false,
        }
    }

    fn error(&mut self, core: &mut Core, f: &InFrame, code: ErrorCode, message: &str) {
        self.errors += 1;
        let msg = ErrorMsg::new(code, message);
        core.send(
            self.conn,
            encode(Kind::Error, f.header.request_id, f.header.channel, &msg),
        );
    }

    fn close(&mut self, core: &mut Core) {
        if !self.closing {
            self.closing = true;
            core.close(self.conn, time::now());
        }
    }

    /// Advances the session; `true` when it did something.
    pub fn step(&mut self, core: &mut Core) -> bool {
        if self.finished {
            return false;
        }
        if let State::Closed(_) = core.state(self.conn) {
            self.finished = true;
            core.release(self.conn);
            return true;
        }
        let mut progress = false;
        while !self.closing {
            let f = match self.reader.next(core, self.conn) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    // Like the host server: ERROR with the typed code, close.
                    self.errors += 1;
                    let msg = ErrorMsg::new(e.code(), format!("{e}"));
                    core.send(self.conn, encode(Kind::Error, 0, 0, &msg));
                    self.close(core);
                    return true;
                }
            };
            progress = true;
            self.on_frame(core, &f);
        }
        if !self.closing && core.peer_eof(self.conn) {
            // The client stopped sending; a partial frame is left over.
            let have = core.received(self.conn).len();
            if have > 0 {
                self.errors += 1;
                let msg = ErrorMsg::new(
                    ErrorCode::Truncated,
                    format!("stream ended after {have} bytes of a frame"),
                );
                core.send(self.conn, encode(Kind::Error, 0, 0, &msg));
            }
            self.close(core);
            progress = true;
        }
        progress
    }

    /// Answers one frame, in the order cell0-proto's host server checks:
    /// kinds answered at any time, then the payload, then the session.
    fn on_frame(&mut self, core: &mut Core, f: &InFrame) {
        let (id, ch) = (f.header.request_id, f.header.channel);
        match f.header.kind {
            Kind::Ping => {
                self.pings += 1;
                core.send(self.conn, pong(f));
                return;
            }
            Kind::Pong | Kind::Error => return,
            Kind::Goodbye => {
                if let Ok(g) = Goodbye::decode(f.payload.clone()) {
                    self.done |= g.reason == DONE;
                }
                let bye = Goodbye {
                    reason: "goodbye".into(),
                };
                core.send(self.conn, encode(Kind::Goodbye, 0, ch, &bye));
                self.close(core);
                return;
            }
            Kind::Welcome | Kind::Reply => {
                let m = "Servers do not accept this kind.";
                return self.error(core, f, ErrorCode::UnexpectedKind, m);
            }
            _ => {}
        }
        let body = match Body::decode(f.header.kind, f.payload.clone()) {
            Ok(b) => b,
            Err(e) => return self.error(core, f, e.code(), &format!("{e}")),
        };
        if !self.hello {
            match body {
                Body::Hello(h)
                    if !h.versions.is_empty() && !h.versions.contains(&u32::from(VERSION)) =>
                {
                    let m = format!(
                        "No common protocol version: offered {:?}, this server speaks {}.",
                        h.versions, VERSION
                    );
                    self.error(core, f, ErrorCode::UnknownVersion, &m);
                }
                Body::Hello(_) => {
                    self.hello = true;
                    self.send_welcome(core, id, ch);
                }
                _ => self.error(core, f, ErrorCode::NotHello, "Send HELLO first."),
            }
            return;
        }
        match body {
            Body::Hello(_) => {
                let m = "This session has already said HELLO.";
                self.error(core, f, ErrorCode::AlreadyHello, m);
            }
            Body::Refresh(_) => self.send_welcome(core, id, ch),
            Body::Call(c) if c.service != ECHO => {
                let m = format!("No service named {:?}.", c.service);
                self.error(core, f, ErrorCode::NoSuchService, &m);
            }
            Body::Call(c) if c.method != ECHO => {
                let m = format!("No method {:?} in service {:?}.", c.method, c.service);
                self.error(core, f, ErrorCode::NoSuchMethod, &m);
            }
            Body::Call(c) => {
                self.calls += 1;
                let reply = Reply {
                    payload: c.payload,
                    shm: c.shm,
                };
                core.send(self.conn, encode(Kind::Reply, id, ch, &reply));
            }
            Body::Event(_) | Body::Subscribe(_) | Body::Unsubscribe(_) => {
                let m = format!("{} is not supported here.", f.header.kind);
                self.error(core, f, ErrorCode::Unsupported, &m);
            }
            Body::Welcome(_)
            | Body::Reply(_)
            | Body::Error(_)
            | Body::Ping(_)
            | Body::Pong(_)
            | Body::Goodbye(_) => {}
        }
    }

    fn send_welcome(&mut self, core: &mut Core, id: u64, ch: u32) {
        let w = Welcome {
            session_id: self.session_id,
            rights: vec![Right::all()],
            token_expiry: 0,
            version: u32::from(VERSION),
        };
        core.send(self.conn, encode(Kind::Welcome, id, ch, &w));
    }
}
