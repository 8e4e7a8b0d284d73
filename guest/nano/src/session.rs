// SPDX-License-Identifier: Apache-2.0
//! A sequential SYPAS session for the self-tests that talk to the router:
//! send one request, wait for its answer (WELCOME, REPLY, ERROR or PONG with
//! the same request id) while answering PINGs and keeping CALLs the router
//! sends us (`agent/<id>`) for later. Unlike `sypas::Client` (a state
//! machine that runs many echo sessions at once), each method here runs the
//! device until its answer is in, so a test reads as the exchange it checks.

use alloc::collections::VecDeque;
use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt::Write as _;

use cell0_nano::vsock_core::{CloseReason, ConnId, State};
use cell0_proto::bytes::Bytes;
use cell0_proto::code::ErrorCode;
use cell0_proto::frame::{Kind, VERSION};
use cell0_proto::msg::{
    Call, ErrorMsg, Goodbye, Hello, Ping, Refresh, Reply, Right, Welcome, permits,
};
use cell0_proto::prost::Message;

use crate::selftest::Fail;
use crate::sypas::{FrameReader, InFrame, encode};
use crate::time;
use crate::vsock::Vsock;

/// What answered a request.
#[derive(Debug)]
pub enum Answer<T> {
    /// The message the request wanted (WELCOME, REPLY, PONG).
    Ok(T),
    /// An ERROR with the request's id.
    Refused(ErrorMsg),
}

/// `NAME (CODE): MESSAGE` of an ERROR, e.g. `PERMISSION_DENIED (48): …`.
pub fn describe_error(e: &ErrorMsg) -> String {
    let name = e.error_code().map_or("UNKNOWN", ErrorCode::name);
    format!("{} ({}): {}", name, e.code, e.message)
}

/// The name of an ERROR's code (`UNKNOWN` for a code this build lacks).
pub fn code_name(e: &ErrorMsg) -> &'static str {
    e.error_code().map_or("UNKNOWN", ErrorCode::name)
}

/// `svc/method svc/method …` of a grant.
pub fn describe_rights(rights: &[Right]) -> String {
    let mut s = String::new();
    for (i, r) in rights.iter().enumerate() {
        let sep = if i == 0 { "" } else { " " };
        let _ = write!(s, "{}{}/{}", sep, r.service, r.method);
    }
    if s.is_empty() {
        s.push_str("(none)");
    }
    s
}

/// A CALL the router (or a peer) sent us.
pub struct Incoming {
    /// Its request id (the sender's id space).
    pub id: u64,
    /// Its channel.
    pub channel: u32,
    /// The call.
    pub call: Call,
}

/// One SYPAS connection to a host port, driven one exchange at a time.
pub struct Session {
    /// The connection.
    pub conn: ConnId,
    port: u32,
    reader: FrameReader,
    next_req: u64,
    /// CALLs from the peer not yet taken by `next_call`.
    backlog: VecDeque<Incoming>,
    /// TSC deadline of every wait.
    deadline: u64,
    /// The latest WELCOME.
    pub welcome: Option<Welcome>,
    /// PINGs answered.
    pub pings: u64,
}

impl Session {
    /// Connects to host `port`. A refusal (nobody listens on the host side
    /// yet: the router may attach this VM after it booted) is retried every
    /// 20 ms until `retry_until` (TSC; 0 = no retry); then, or when
    /// `deadline` passes first, it fails.
    pub fn open(vs: &mut Vsock, port: u32, deadline: u64, retry_until: u64) -> Result<Self, Fail> {
        let mut tries = 0u32;
        let conn = loop {
            tries += 1;
            let conn = vs.core.connect(port, time::now());
            let ok = vs.run_until(deadline, |vs| {
                Ok(match vs.core.state(conn) {
                    State::Connecting => None,
                    _ => Some(true),
                })
            })?;
            match vs.core.state(conn) {
                State::Established => break conn,
                State::Closed(CloseReason::Refused) => {
                    vs.core.release(conn);
                    if time::passed(retry_until) || time::passed(deadline) {
                        return Err(Fail(format!(
                            "connecting to host port {port} was refused (RST), {tries} tries"
                        )));
                    }
                    pause(vs, 20)?;
                }
                s if !ok => {
                    return Err(Fail(format!(
                        "timed out connecting to host port {port} ({s:?})"
                    )));
                }
                s => {
                    return Err(Fail(format!(
                        "connecting to host port {port} ended in state {s:?}"
                    )));
                }
            }
        };
        Ok(Self {
            conn,
            port,
            reader: FrameReader::new(cell0_proto::MAX_PAYLOAD),
            next_req: 1,
            backlog: VecDeque::new(),
            deadline,
            welcome: None,
            pings: 0,
        })
    }

    /// A fresh request id.
    pub fn next_id(&mut self) -> u64 {
        let id = self.next_req;
        self.next_req += 1;
        id
    }

    /// Sends one frame.
    pub fn send(
        &mut self,
        vs: &mut Vsock,
        kind: Kind,
        id: u64,
        msg: &impl Message,
    ) -> Result<(), Fail> {
        self.send_raw(vs, encode(kind, id, 0, msg))
    }

    /// Sends bytes as they are (a frame, or anything else).
    pub fn send_raw(&mut self, vs: &mut Vsock, frame: Bytes) -> Result<(), Fail> {
        if vs.core.send(self.conn, frame) {
            Ok(())
        } else {
            Err(Fail(format!(
                "connection to host port {} is not open for sending",
                self.port
            )))
        }
    }

    /// Reads what has arrived: answers PINGs, queues CALLs, returns the
    /// first other frame. Fails when the connection ends.
    fn pump(&mut self, vs: &mut Vsock) -> Result<Option<InFrame>, Fail> {
        loop {
            let f = self.reader.next(&mut vs.core, self.conn).map_err(|e| {
                Fail(format!(
                    "bad frame from host port {}: {} ({})",
                    self.port,
                    e,
                    e.code().name()
                ))
            })?;
            let Some(f) = f else { break };
            match f.header.kind {
                Kind::Ping => {
                    self.pings += 1;
                    let p = Ping::decode(f.payload.clone()).unwrap_or_default();
                    self.send(vs, Kind::Pong, f.header.request_id, &p)?;
                }
                Kind::Call => {
                    let call = Call::decode(f.payload.clone())
                        .map_err(|e| Fail(format!("a CALL from the host is malformed: {e}")))?;
                    self.backlog.push_back(Incoming {
                        id: f.header.request_id,
                        channel: f.header.channel,
                        call,
                    });
                }
                _ => return Ok(Some(f)),
            }
        }
        match vs.core.state(self.conn) {
            State::Closed(why) => Err(Fail(format!(
                "the connection to host port {} was {}",
                self.port,
                why.describe()
            ))),
            _ if vs.core.peer_eof(self.conn) => Err(Fail(format!(
                "host port {} closed the connection",
                self.port
            ))),
            _ => Ok(None),
        }
    }

    /// Waits for the next frame that is not a PING or a CALL; with
    /// `or_call`, returns `None` as soon as a CALL is queued instead.
    fn next_frame(
        &mut self,
        vs: &mut Vsock,
        waiting_for: &str,
        or_call: bool,
    ) -> Result<Option<InFrame>, Fail> {
        let mut got = None;
        let ok = vs.run_until(self.deadline, |vs| {
            if or_call && !self.backlog.is_empty() {
                return Ok(Some(true));
            }
            match self.pump(vs)? {
                Some(f) => {
                    got = Some(f);
                    Ok(Some(true))
                }
                None if or_call && !self.backlog.is_empty() => Ok(Some(true)),
                None => Ok(None),
            }
        })?;
        if !ok {
            return Err(Fail(format!("timed out waiting for {waiting_for}")));
        }
        Ok(got)
    }

    /// Waits for the next frame that is not a PING or a CALL.
    fn next_answer_frame(&mut self, vs: &mut Vsock, waiting_for: &str) -> Result<InFrame, Fail> {
        self.next_frame(vs, waiting_for, false)?
            .ok_or_else(|| Fail(format!("no frame while waiting for {waiting_for}")))
    }

    /// Waits for the answer to request `id` (of kind `want`, or ERROR).
    fn answer(&mut self, vs: &mut Vsock, id: u64, want: Kind) -> Result<Answer<InFrame>, Fail> {
        let f = self.next_answer_frame(vs, &format!("the answer to request {id}"))?;
        let (kind, rid) = (f.header.kind, f.header.request_id);
        if kind == Kind::Error && rid == id {
            let e = ErrorMsg::decode(f.payload.clone())
                .map_err(|e| Fail(format!("a malformed ERROR for request {id}: {e}")))?;
            return Ok(Answer::Refused(e));
        }
        if kind == Kind::Error {
            let text = ErrorMsg::decode(f.payload.clone()).map_or_else(
                |_| String::from("a malformed ERROR"),
                |e| describe_error(&e),
            );
            return Err(Fail(format!(
                "host sent ERROR {text} for request {rid} while waiting for request {id}"
            )));
        }
        if kind == want && rid == id {
            return Ok(Answer::Ok(f));
        }
        Err(Fail(format!(
            "unexpected {kind} (request {rid}) from the host while waiting for the {want} to request {id}"
        )))
    }

    fn decode<M: Message + Default>(f: &InFrame) -> Result<M, Fail> {
        M::decode(f.payload.clone()).map_err(|e| {
            Fail(format!(
                "{} payload (request {}) is malformed: {}",
                f.header.kind, f.header.request_id, e
            ))
        })
    }

    /// Sends `kind` with a fresh id and waits for its `want` answer or ERROR.
    fn request<M: Message + Default>(
        &mut self,
        vs: &mut Vsock,
        kind: Kind,
        msg: &impl Message,
        want: Kind,
    ) -> Result<Answer<M>, Fail> {
        let id = self.next_id();
        self.send(vs, kind, id, msg)?;
        Ok(match self.answer(vs, id, want)? {
            Answer::Ok(f) => Answer::Ok(Self::decode(&f)?),
            Answer::Refused(e) => Answer::Refused(e),
        })
    }

    /// HELLO as `agent` with `token`; a WELCOME is kept in `welcome`.
    pub fn hello(
        &mut self,
        vs: &mut Vsock,
        agent: &str,
        token: &Bytes,
    ) -> Result<Answer<Welcome>, Fail> {
        let hello = Hello {
            versions: vec![u32::from(VERSION)],
            agent_id: agent.into(),
            token: token.clone(),
        };
        let a: Answer<Welcome> = self.request(vs, Kind::Hello, &hello, Kind::Welcome)?;
        if let Answer::Ok(w) = &a {
            if w.version != u32::from(VERSION) {
                return Err(Fail(format!("WELCOME chose version {}", w.version)));
            }
            self.welcome = Some(w.clone());
        }
        Ok(a)
    }

    /// HELLO that must be welcomed; a refusal fails with its code name.
    pub fn hello_ok(
        &mut self,
        vs: &mut Vsock,
        agent: &str,
        token: &Bytes,
    ) -> Result<Welcome, Fail> {
        match self.hello(vs, agent, token)? {
            Answer::Ok(w) => Ok(w),
            Answer::Refused(e) => Err(Fail(format!(
                "host sent ERROR {} for HELLO as agent {agent:?}",
                describe_error(&e)
            ))),
        }
    }

    /// REFRESH with `token`; a WELCOME replaces `welcome`.
    pub fn refresh(&mut self, vs: &mut Vsock, token: &Bytes) -> Result<Answer<Welcome>, Fail> {
        let r = Refresh {
            token: token.clone(),
        };
        let a: Answer<Welcome> = self.request(vs, Kind::Refresh, &r, Kind::Welcome)?;
        if let Answer::Ok(w) = &a {
            self.welcome = Some(w.clone());
        }
        Ok(a)
    }

    /// CALL and wait for REPLY or ERROR.
    pub fn call(&mut self, vs: &mut Vsock, call: &Call) -> Result<Answer<Reply>, Fail> {
        self.request(vs, Kind::Call, call, Kind::Reply)
    }

    /// CALL that must be answered with REPLY; an ERROR fails with its code.
    pub fn call_ok(&mut self, vs: &mut Vsock, call: &Call) -> Result<Reply, Fail> {
        match self.call(vs, call)? {
            Answer::Ok(r) => Ok(r),
            Answer::Refused(e) => Err(Fail(format!(
                "host sent ERROR {} for CALL {}/{}",
                describe_error(&e),
                call.service,
                call.method
            ))),
        }
    }

    /// PING and wait for its PONG: the connection is still open and served.
    pub fn ping(&mut self, vs: &mut Vsock) -> Result<(), Fail> {
        let p = Ping {
            nonce: 0x6e61_6e6f,
            timestamp_ns: 0,
        };
        match self.request::<cell0_proto::msg::Pong>(vs, Kind::Ping, &p, Kind::Pong)? {
            Answer::Ok(pong) if pong.nonce == p.nonce => Ok(()),
            Answer::Ok(pong) => Err(Fail(format!("PONG with nonce {:#x}", pong.nonce))),
            Answer::Refused(e) => Err(Fail(format!(
                "host sent ERROR {} for PING",
                describe_error(&e)
            ))),
        }
    }

    /// Waits for the next CALL the peer sends us.
    pub fn next_call(&mut self, vs: &mut Vsock) -> Result<Incoming, Fail> {
        if self.backlog.is_empty() {
            if let Some(f) = self.next_frame(vs, "a CALL", true)? {
                return Err(Fail(format!(
                    "unexpected {} (request {}) from the host while waiting for a CALL",
                    f.header.kind, f.header.request_id
                )));
            }
        }
        self.backlog
            .pop_front()
            .ok_or_else(|| Fail::from("no CALL while waiting for one"))
    }

    /// Answers an incoming CALL with REPLY.
    pub fn reply(&mut self, vs: &mut Vsock, to: &Incoming, reply: &Reply) -> Result<(), Fail> {
        self.send_raw(vs, encode(Kind::Reply, to.id, to.channel, reply))
    }

    /// Answers an incoming CALL with ERROR.
    pub fn refuse(&mut self, vs: &mut Vsock, to: &Incoming, e: &ErrorMsg) -> Result<(), Fail> {
        self.send_raw(vs, encode(Kind::Error, to.id, to.channel, e))
    }

    /// Whether the latest WELCOME's rights cover (service, method).
    pub fn granted(&self, service: &str, method: &str) -> bool {
        self.welcome
            .as_ref()
            .is_some_and(|w| permits(&w.rights, service, method))
    }

    /// GOODBYE "done", waits for the peer's GOODBYE, closes, and waits until
    /// the connection is closed.
    pub fn goodbye(mut self, vs: &mut Vsock) -> Result<(), Fail> {
        let bye = Goodbye {
            reason: crate::sypas::DONE.into(),
        };
        self.send(vs, Kind::Goodbye, 0, &bye)?;
        loop {
            let f = self.next_answer_frame(vs, "GOODBYE")?;
            match f.header.kind {
                Kind::Goodbye => break,
                // Answers to requests we gave up on, and events, are dropped.
                Kind::Reply | Kind::Pong | Kind::Event | Kind::Welcome => {}
                Kind::Error => {
                    let text = ErrorMsg::decode(f.payload.clone()).map_or_else(
                        |_| String::from("a malformed ERROR"),
                        |e| describe_error(&e),
                    );
                    return Err(Fail(format!(
                        "host sent ERROR {text} for request {} after GOODBYE",
                        f.header.request_id
                    )));
                }
                k => {
                    return Err(Fail(format!(
                        "unexpected {k} (request {}) after GOODBYE",
                        f.header.request_id
                    )));
                }
            }
        }
        vs.core.close(self.conn, time::now());
        let conn = self.conn;
        let ok = vs.run_until(self.deadline, |vs| {
            Ok(match vs.core.state(conn) {
                State::Closed(_) => Some(true),
                _ => None,
            })
        })?;
        if !ok {
            return Err(Fail(format!(
                "timed out closing the connection to host port {}",
                self.port
            )));
        }
        vs.core.release(conn);
        Ok(())
    }
}

/// Sleeps about `ms` milliseconds (TSC; calibrated, or the 1 GHz guess)
/// while the device keeps running; frames that arrive meanwhile wait in
/// their connections until a session reads them.
pub fn pause(vs: &mut Vsock, ms: u64) -> Result<(), Fail> {
    let until = time::deadline_ms(ms);
    vs.run_until(until, |_| Ok(None)).map(|_| ())
}

/// A CALL message.
pub fn call(service: &str, method: &str, payload: Bytes) -> Call {
    Call {
        service: service.into(),
        method: method.into(),
        payload,
        shm: Vec::new(),
    }
}
