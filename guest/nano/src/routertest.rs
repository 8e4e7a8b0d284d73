// SPDX-License-Identifier: Apache-2.0
//! The self-tests against the SYPAS router (`cell0d router`, reached on
//! vsock port 1024 like any SYPAS host): `sypas-shm` (bulk data by shm refs
//! into the `cell0.shm=` window), `sypas-agents` (agent-to-agent CALLs
//! through the router, or a refusal), and `sypas-refusal` (one refused
//! request each, as the router answers it). README.md gives their keys and
//! exact output. Tokens come from `cell0.token=` (base64, as `cell0d token
//! mint` prints it): only the nano guest takes its token from the cmdline;
//! a real guest gets its token over the SYPAS channel (docs/SYPAS.md).

use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use cell0_nano::pattern;
use cell0_nano::text::Escaped;
use cell0_proto::bytes::Bytes;
use cell0_proto::code::ErrorCode;
use cell0_proto::msg::{Call, ErrorMsg, Reply, ShmRef};

use crate::nettest::{
    agent_id, cmdline_str, deadline, mode, open, opt, token, token_opt, tsc_rate, us1,
};
use crate::selftest::{Ctx, Fail};
use crate::session::{Answer, Session, call, code_name, describe_error, describe_rights, pause};
use crate::shmwin::{self, Shm};
use crate::vsock::{Mode, Vsock};
use crate::{say, time};

/// The router's vsock port.
const ROUTER_PORT: u64 = 1024;
/// Default `sypas-shm` sizes: 1 MiB and 64 MiB.
const SHM_SIZES: [u64; 2] = [1 << 20, 64 << 20];
/// Most sizes in `cell0.sizes` for `sypas-shm`.
const MAX_SHM_SIZES: usize = 8;

fn port(ctx: &Ctx<'_>) -> Result<u32, Fail> {
    Ok(opt(ctx, "cell0.port", ROUTER_PORT, 1, u64::from(u32::MAX))? as u32)
}

/// Until when (TSC) a refused connection to the router is retried:
/// `cell0.connect_wait` seconds (default 20; real seconds, since the router
/// tests calibrate the TSC first).
/// The router can attach a VM only once its VMM runs, so a guest may boot
/// before anyone listens on its `<vsock_uds>_1024`.
fn connect_wait(ctx: &Ctx<'_>) -> Result<u64, Fail> {
    let secs = opt(ctx, "cell0.connect_wait", 20, 0, 86_400)?;
    Ok(if secs == 0 {
        0
    } else {
        time::deadline_ms(secs * 1000)
    })
}

/// Prints the WELCOME line every router test starts with.
fn say_welcome(name: &str, agent: &str, s: &Session, m: Mode) {
    if let Some(w) = &s.welcome {
        say!(
            "{}: agent {} welcomed: session {}, rights {}, token expiry {}, mode {}",
            name,
            agent,
            w.session_id,
            describe_rights(&w.rights),
            w.token_expiry,
            m
        );
    }
}

/// Opens the device and a session to the router, says HELLO (welcomed).
fn connect(ctx: &Ctx<'_>, name: &str) -> Result<(Vsock, Session, String), Fail> {
    time::calibrate();
    let tok = token(ctx)?;
    let agent = agent_id(ctx)?;
    let port = port(ctx)?;
    let (_, at) = deadline(ctx)?;
    let mut vs = open(ctx, name)?;
    let mut s = Session::open(&mut vs, port, at, connect_wait(ctx)?)?;
    s.hello_ok(&mut vs, &agent, &tok)?;
    say_welcome(name, &agent, &s, vs.mode);
    Ok((vs, s, agent))
}

/// A CALL with shm refs and no inline payload.
fn shm_call(method: &str, payload: Bytes, refs: Vec<ShmRef>) -> Call {
    Call {
        service: String::from("echo"),
        method: String::from(method),
        payload,
        shm: refs,
    }
}

/// What went wrong with a reply, e.g. `differs at byte 17: expected 0x11, got 0x00`.
fn difference(got: &[u8], len: usize, k: u32) -> Option<String> {
    let at = pattern::first_difference_from(got, len, k)?;
    let want = if at < len {
        format!("{:#04x}", pattern::byte(at, k))
    } else {
        String::from("end")
    };
    let got_b = got
        .get(at)
        .map_or(String::from("end"), |b| format!("{b:#04x}"));
    Some(format!(
        "{} bytes differ from the {} sent at byte {}: expected {}, got {}",
        got.len(),
        len,
        at,
        want,
        got_b
    ))
}

// ---------------------------------------------------------------------------
// sypas-shm

/// `sypas-shm`: for each size (default 1 MiB and 64 MiB) writes the pattern
/// into the window at offset 0 and CALLs the router's `echo` service with a
/// ref instead of inline bytes: `echo` (the ref comes back unchanged, the
/// bytes untouched), `fold` (the router read every byte: its checksum equals
/// ours) and `copy` (the router copies the ref to the middle of the window
/// and answers with a ref to the copy, checked byte for byte). Then refs
/// outside the window must be refused with SHM_OUT_OF_BOUNDS.
pub fn sypas_shm(ctx: &Ctx<'_>) -> Result<(), Fail> {
    const NAME: &str = "sypas-shm";
    let m = mode(ctx)?;
    let with_mode = |e: Fail| Fail(format!("{e}, mode {m}"));
    let mut sizes = [0u64; MAX_SHM_SIZES];
    let n = match cell0_nano::cmdline::value(ctx.cmdline, b"cell0.sizes") {
        None => {
            sizes[..SHM_SIZES.len()].copy_from_slice(&SHM_SIZES);
            SHM_SIZES.len()
        }
        Some(v) => cell0_nano::cmdline::parse_list(v, &mut sizes)
            .filter(|n| sizes[..*n].iter().all(|s| *s > 0))
            .ok_or_else(|| {
                with_mode(Fail(format!(
                    "bad cell0.sizes value '{}': expected 1 to {} comma-separated sizes above 0",
                    Escaped(v),
                    MAX_SHM_SIZES
                )))
            })?,
    };
    let sizes = &sizes[..n];
    let shm = shmwin::map_from_cmdline(ctx.cmdline)
        .map_err(with_mode)?
        .ok_or_else(|| {
            with_mode(Fail::from(
                "no cell0.shm= on the cmdline (start the VMM with --shm-mib)",
            ))
        })?;
    say!(
        "{}: window of {:#x} bytes at {:#x}, mapped with {} 2 MiB pages, mode {}",
        NAME,
        shm.size(),
        shm.window.gpa,
        shm.window.pages(),
        m
    );
    // Sources at 0, copies from the middle: each size must fit twice.
    let half = (shm.size() / 2) & !0xfff;
    if let Some(s) = sizes.iter().find(|s| **s > half) {
        return Err(with_mode(Fail(format!(
            "size {} does not fit twice in the {:#x}-byte window",
            s,
            shm.size()
        ))));
    }
    let (mut vs, mut s, _) = connect(ctx, NAME).map_err(with_mode)?;
    let mut timings = String::new();
    for (i, size) in sizes.iter().enumerate() {
        let k = i as u32 + 1;
        let t = shm_round(&mut vs, &mut s, &shm, *size, k, half)
            .map_err(|e| with_mode(Fail(format!("{size} bytes: {e}"))))?;
        say!(
            "{}: {} bytes: echo returned the ref unchanged, fold {:#018x} matches, copy to offset {:#x} checked byte for byte, mode {}",
            NAME,
            size,
            t.fold,
            half,
            m
        );
        let sep = if timings.is_empty() { "" } else { "; " };
        timings.push_str(&format!(
            "{sep}{size} B: echo {} fold {} copy {}",
            t.echo, t.fold_t, t.copy
        ));
    }
    // Refs the router must refuse without reading: past the end, and an
    // offset whose end overflows.
    for r in [
        ShmRef {
            offset: shm.size() - 4096,
            length: 8192,
        },
        ShmRef {
            offset: u64::MAX,
            length: 2,
        },
    ] {
        let c = shm_call("echo", Bytes::new(), vec![r]);
        match s.call(&mut vs, &c).map_err(with_mode)? {
            Answer::Refused(e) if e.error_code() == Some(ErrorCode::ShmOutOfBounds) => {
                say!(
                    "{}: ref ({:#x}, {:#x}) refused with {}, mode {}",
                    NAME,
                    r.offset,
                    r.length,
                    describe_error(&e),
                    m
                );
            }
            Answer::Refused(e) => {
                return Err(with_mode(Fail(format!(
                    "ref ({:#x}, {:#x}): expected ERROR SHM_OUT_OF_BOUNDS, got ERROR {}",
                    r.offset,
                    r.length,
                    describe_error(&e)
                ))));
            }
            Answer::Ok(_) => {
                return Err(with_mode(Fail(format!(
                    "ref ({:#x}, {:#x}) outside the {:#x}-byte window was answered with REPLY",
                    r.offset,
                    r.length,
                    shm.size()
                ))));
            }
        }
    }
    s.goodbye(&mut vs).map_err(with_mode)?;
    time::calibrate();
    say!(
        "{}: timing (us per call): {}; tsc {}, mode {}",
        NAME,
        timings,
        tsc_rate(),
        m
    );
    vs.shutdown();
    Ok(())
}

struct RoundTimes {
    fold: u64,
    echo: u64,
    fold_t: u64,
    copy: u64,
}

fn shm_round(
    vs: &mut Vsock,
    s: &mut Session,
    shm: &Shm,
    size: u64,
    k: u32,
    half: u64,
) -> Result<RoundTimes, Fail> {
    let len = size as usize;
    shm.fill_pattern(0, len, k);
    // Something else where the copy goes, so a copy that did not happen shows.
    shm.with_mut(half, len, |b| b.fill(0xa5));
    let src = ShmRef {
        offset: 0,
        length: size,
    };

    // echo: the ref comes back as it was; the bytes are untouched.
    let t0 = time::now();
    let r = s.call_ok(vs, &shm_call("echo", Bytes::new(), vec![src]))?;
    let echo = time::now() - t0;
    if r.shm != [src] || !r.payload.is_empty() {
        return Err(Fail(format!(
            "echo answered {} inline bytes and refs {:?}, not the ref (0, {:#x})",
            r.payload.len(),
            r.shm,
            size
        )));
    }
    if let Some(at) = shm.pattern_difference(0, len, k) {
        return Err(Fail(format!(
            "after echo the window differs from what was written at byte {at}"
        )));
    }

    // fold: the router read every byte we wrote.
    let t0 = time::now();
    let r = s.call_ok(vs, &shm_call("fold", Bytes::new(), vec![src]))?;
    let fold_t = time::now() - t0;
    let want = shm.fold(0, len);
    let got = r.payload.get(..8).map(|b| {
        let mut w = [0u8; 8];
        w.copy_from_slice(b);
        u64::from_le_bytes(w)
    });
    let total = r.payload.get(8..16).map(|b| {
        let mut w = [0u8; 8];
        w.copy_from_slice(b);
        u64::from_le_bytes(w)
    });
    if r.payload.len() != 16 || got != Some(want) || total != Some(size) {
        return Err(Fail(format!(
            "fold answered {:?} over {:?} bytes, the guest computed {:#018x} over {}",
            got, total, want, size
        )));
    }

    // copy: the router writes the ref's bytes at `half` and refers to them.
    let t0 = time::now();
    let r = s.call_ok(
        vs,
        &shm_call(
            "copy",
            Bytes::copy_from_slice(&half.to_le_bytes()),
            vec![src],
        ),
    )?;
    let copy = time::now() - t0;
    let dst = ShmRef {
        offset: half,
        length: size,
    };
    if r.shm != [dst] {
        return Err(Fail(format!(
            "copy answered refs {:?}, not ({:#x}, {:#x})",
            r.shm, half, size
        )));
    }
    if let Some(at) = shm.pattern_difference(half, len, k) {
        let got = shm.with(half + at as u64, 1, |b| b[0]);
        return Err(Fail(format!(
            "the copy at {:#x} differs at byte {}: expected {:#04x}, got {:#04x}",
            half,
            at,
            pattern::byte(at, k),
            got
        )));
    }
    Ok(RoundTimes {
        fold: want,
        echo: time::to_us(echo),
        fold_t: time::to_us(fold_t),
        copy: time::to_us(copy),
    })
}

// ---------------------------------------------------------------------------
// sypas-agents

/// `sypas-agents`, `cell0.role=serve`: answers the CALLs the router
/// delivers to `agent/<cell0.agent_id>` until one with method `done`;
/// `cell0.role=call`: calls `agent/<cell0.peer>` (round trips, payload
/// sizes inline and through shm refs, each checked byte for byte), or with
/// `cell0.expect=CODE` expects its first CALL to be refused with CODE.
pub fn sypas_agents(ctx: &Ctx<'_>) -> Result<(), Fail> {
    const NAME: &str = "sypas-agents";
    let m = mode(ctx)?;
    let with_mode = |e: Fail| Fail(format!("{e}, mode {m}"));
    let role = cmdline_str(ctx.cmdline, "cell0.role")
        .map_err(with_mode)?
        .unwrap_or("call");
    let shm = shmwin::map_from_cmdline(ctx.cmdline).map_err(with_mode)?;
    match role {
        "serve" => agents_serve(ctx, NAME, shm.as_ref()).map_err(with_mode),
        "call" => agents_call(ctx, NAME, shm.as_ref()).map_err(with_mode),
        other => Err(with_mode(Fail(format!(
            "bad cell0.role value '{}': expected serve or call",
            Escaped(other.as_bytes())
        )))),
    }
}

fn agents_serve(ctx: &Ctx<'_>, name: &str, shm: Option<&Shm>) -> Result<(), Fail> {
    let (mut vs, mut s, agent) = connect(ctx, name)?;
    let m = vs.mode;
    say!("{}: agent/{} serving, mode {}", name, agent, m);
    let (mut calls, mut bytes) = (0u64, 0u64);
    let mut from = String::new();
    loop {
        let inc = s.next_call(&mut vs)?;
        let Some(caller) = inc.call.service.strip_prefix("agent/") else {
            let e = ErrorMsg::new(
                ErrorCode::NoSuchService,
                "The nano agent serves agents only.",
            );
            s.refuse(&mut vs, &inc, &e)?;
            continue;
        };
        if from.is_empty() {
            from = String::from(caller);
        }
        calls += 1;
        bytes += inc.call.payload.len() as u64;
        match inc.call.method.as_str() {
            // Echoes inline.
            "echo" => {
                let r = Reply {
                    payload: inc.call.payload.clone(),
                    shm: Vec::new(),
                };
                s.reply(&mut vs, &inc, &r)?;
            }
            // Echoes through this VM's window: the router reads the ref and
            // hands the caller inline bytes.
            "echo-shm" => match shm {
                Some(w) if inc.call.payload.len() as u64 <= w.size() => {
                    w.write(0, &inc.call.payload);
                    let r = Reply {
                        payload: Bytes::new(),
                        shm: vec![ShmRef {
                            offset: 0,
                            length: inc.call.payload.len() as u64,
                        }],
                    };
                    s.reply(&mut vs, &inc, &r)?;
                }
                _ => {
                    let e = ErrorMsg::new(ErrorCode::ShmUnavailable, "This agent has no window.");
                    s.refuse(&mut vs, &inc, &e)?;
                }
            },
            "done" => {
                s.reply(&mut vs, &inc, &Reply::default())?;
                break;
            }
            other => {
                let e = ErrorMsg::new(
                    ErrorCode::NoSuchMethod,
                    format!("The nano agent has no method {other:?}."),
                );
                s.refuse(&mut vs, &inc, &e)?;
            }
        }
    }
    say!(
        "{}: served {} calls from agent/{} ({} payload bytes), mode {}",
        name,
        calls,
        from,
        bytes,
        m
    );
    s.goodbye(&mut vs)?;
    vs.shutdown();
    Ok(())
}

fn agents_call(ctx: &Ctx<'_>, name: &str, shm: Option<&Shm>) -> Result<(), Fail> {
    let peer = cmdline_str(ctx.cmdline, "cell0.peer")?
        .ok_or_else(|| Fail::from("cell0.role=call needs cell0.peer=<agent id>"))?;
    let rounds = opt(ctx, "cell0.calls", 100, 1, 1_000_000)? as usize;
    let expect = cmdline_str(ctx.cmdline, "cell0.expect")?;
    let (mut vs, mut s, _agent) = connect(ctx, name)?;
    let m = vs.mode;
    let target = format!("agent/{peer}");
    let granted = s.granted(&target, "echo");

    if let Some(want) = expect {
        // The refusal case: the very first CALL must get `want`.
        let c = call(&target, "echo", Bytes::from_static(b"may I?"));
        return match s.call(&mut vs, &c)? {
            Answer::Refused(e)
                if granted && e.error_code() == Some(ErrorCode::PermissionDenied) =>
            {
                Err(Fail(format!(
                    "CALL {target}/echo was refused with PERMISSION_DENIED although the WELCOME grants it"
                )))
            }
            Answer::Refused(e) if code_name(&e) == want => {
                say!(
                    "{}: CALL {}/echo, which the WELCOME's rights {}, refused with {}, mode {}",
                    name,
                    target,
                    cover(granted),
                    describe_error(&e),
                    m
                );
                s.ping(&mut vs)?;
                say!(
                    "{}: the session stays open: PING answered, mode {}",
                    name,
                    m
                );
                s.goodbye(&mut vs)?;
                vs.shutdown();
                Ok(())
            }
            Answer::Refused(e) => Err(Fail(format!(
                "CALL {}/echo: expected ERROR {}, got ERROR {}",
                target,
                want,
                describe_error(&e)
            ))),
            Answer::Ok(_) => Err(Fail(format!(
                "CALL {target}/echo: expected ERROR {want}, got REPLY"
            ))),
        };
    }
    if !granted {
        return Err(Fail(format!(
            "the WELCOME's rights ({}) do not cover {}/echo",
            s.welcome
                .as_ref()
                .map_or(String::from("none"), |w| describe_rights(&w.rights)),
            target
        )));
    }

    // Wait until the peer is connected: AGENT_UNREACHABLE until then.
    let mut tries = 0u32;
    loop {
        tries += 1;
        match s.call(
            &mut vs,
            &call(&target, "echo", Bytes::from_static(b"hello")),
        )? {
            Answer::Ok(r) if r.payload.as_ref() == b"hello" => break,
            Answer::Ok(r) => {
                return Err(Fail(format!(
                    "agent/{peer} answered {} bytes to a 5-byte echo",
                    r.payload.len()
                )));
            }
            Answer::Refused(e) if e.error_code() == Some(ErrorCode::AgentUnreachable) => {
                pause(&mut vs, 20)?;
            }
            Answer::Refused(e) => {
                return Err(Fail(format!(
                    "host sent ERROR {} for CALL {}/echo",
                    describe_error(&e),
                    target
                )));
            }
        }
    }
    say!(
        "{}: {} reachable after {} tries, mode {}",
        name,
        target,
        tries,
        m
    );

    // Round trips of 64 bytes, one at a time.
    let mut rtts = Vec::with_capacity(rounds);
    let mut p = vec![0u8; 64];
    for i in 0..rounds {
        pattern::fill(&mut p, i as u32);
        let t0 = time::now();
        let r = s.call_ok(&mut vs, &call(&target, "echo", Bytes::copy_from_slice(&p)))?;
        rtts.push(time::now() - t0);
        if let Some(d) = difference(&r.payload, 64, i as u32) {
            return Err(Fail(format!("round trip {i}: {d}")));
        }
    }
    // Bigger payloads, inline both ways.
    let mut k = rounds as u32;
    for size in [4096usize, 1 << 20] {
        k += 1;
        let mut v = vec![0u8; size];
        pattern::fill(&mut v, k);
        let r = s.call_ok(&mut vs, &call(&target, "echo", Bytes::from(v)))?;
        if let Some(d) = difference(&r.payload, size, k) {
            return Err(Fail(format!("inline echo of {size} bytes: {d}")));
        }
    }
    say!(
        "{}: {} round trips of 64 bytes and echoes of 4096 and 1048576 bytes checked byte for byte, mode {}",
        name,
        rounds,
        m
    );
    // Through the windows: our ref goes out inline; the peer answers with a
    // ref into its own window, which the router delivers inline.
    if let Some(w) = shm {
        let size = (1usize << 20).min(w.size() as usize);
        k += 1;
        w.fill_pattern(0, size, k);
        let c = Call {
            service: target.clone(),
            method: String::from("echo"),
            payload: Bytes::new(),
            shm: vec![ShmRef {
                offset: 0,
                length: size as u64,
            }],
        };
        let r = s.call_ok(&mut vs, &c)?;
        if let Some(d) = difference(&r.payload, size, k) {
            return Err(Fail(format!("echo of a {size}-byte shm ref: {d}")));
        }
        k += 1;
        let mut v = vec![0u8; size];
        pattern::fill(&mut v, k);
        let r = s.call_ok(&mut vs, &call(&target, "echo-shm", Bytes::from(v)))?;
        if let Some(d) = difference(&r.payload, size, k) {
            return Err(Fail(format!("echo-shm of {size} bytes: {d}")));
        }
        say!(
            "{}: {} bytes sent as a ref into our window and answered as a ref into the peer's, checked byte for byte, mode {}",
            name,
            size,
            m
        );
    }
    s.call_ok(&mut vs, &call(&target, "done", Bytes::new()))?;
    s.goodbye(&mut vs)?;
    time::calibrate();
    rtts.sort_unstable();
    let pct = |q: usize| rtts[(rtts.len() * q / 100).min(rtts.len() - 1)];
    say!(
        "{}: agent-to-agent round trip, 64 B, {} calls: p50 {} us, p99 {} us; tsc {}, mode {}",
        name,
        rounds,
        us1(pct(50)),
        us1(pct(99)),
        tsc_rate(),
        m
    );
    vs.shutdown();
    Ok(())
}

// ---------------------------------------------------------------------------
// sypas-refusal

/// `sypas-refusal`: sends exactly one request the router must refuse
/// (`cell0.case`) and passes only if the ERROR's code is `cell0.expect`;
/// then shows that the session is undisturbed.
///
/// - `hello`: HELLO with `cell0.token` (an expired, forged, foreign-root or
///   widening token); then PING is still answered;
/// - `hello-twice`: HELLO (welcomed), HELLO again; then `echo` still works;
/// - `call-first`: CALL before HELLO; then HELLO and `echo` work;
/// - `call`: HELLO, then CALL `cell0.service`/`cell0.method` (default
///   `echo`/`echo`), which the WELCOME's rights must not cover either;
/// - `expire`: HELLO with a short-lived token, `echo` every 250 ms until it
///   is refused; then REFRESH with `cell0.token2` and `echo` works again.
pub fn sypas_refusal(ctx: &Ctx<'_>) -> Result<(), Fail> {
    const NAME: &str = "sypas-refusal";
    let m = mode(ctx)?;
    let with_mode = |e: Fail| Fail(format!("{e}, mode {m}"));
    refusal(ctx, NAME).map_err(with_mode)
}

fn refusal(ctx: &Ctx<'_>, name: &str) -> Result<(), Fail> {
    let case = cmdline_str(ctx.cmdline, "cell0.case")?
        .ok_or_else(|| Fail::from("cell0.case= is required"))?;
    let want = cmdline_str(ctx.cmdline, "cell0.expect")?
        .ok_or_else(|| Fail::from("cell0.expect=<ERROR CODE NAME> is required"))?;
    time::calibrate();
    let tok = token(ctx)?;
    let agent = agent_id(ctx)?;
    let port = port(ctx)?;
    let (_, at) = deadline(ctx)?;
    let mut vs = open(ctx, name)?;
    let m = vs.mode;
    let mut s = Session::open(&mut vs, port, at, connect_wait(ctx)?)?;
    let check = |what: &str, a: Answer<()>| -> Result<ErrorMsg, Fail> {
        match a {
            Answer::Refused(e) if code_name(&e) == want => Ok(e),
            Answer::Refused(e) => Err(Fail(format!(
                "{}: expected ERROR {}, got ERROR {}",
                what,
                want,
                describe_error(&e)
            ))),
            Answer::Ok(()) => Err(Fail(format!(
                "{what}: expected ERROR {want}, got an answer"
            ))),
        }
    };
    let echo = |s: &mut Session, vs: &mut Vsock| -> Result<(), Fail> {
        let r = s.call_ok(vs, &call("echo", "echo", Bytes::from_static(b"still here")))?;
        if r.payload.as_ref() != b"still here" {
            return Err(Fail(format!("echo answered {:?}", r.payload)));
        }
        Ok(())
    };
    match case {
        "hello" => {
            let e = match s.hello(&mut vs, &agent, &tok)? {
                Answer::Ok(w) => {
                    return Err(Fail(format!(
                        "HELLO as agent {agent}: expected ERROR {want}, got WELCOME (session {})",
                        w.session_id
                    )));
                }
                Answer::Refused(e) => {
                    check(&format!("HELLO as agent {agent}"), Answer::Refused(e))?
                }
            };
            say!(
                "{}: HELLO as agent {} refused with {}, mode {}",
                name,
                agent,
                describe_error(&e),
                m
            );
            s.ping(&mut vs)?;
            say!(
                "{}: the connection stays open: PING answered after the refusal, mode {}",
                name,
                m
            );
        }
        "hello-twice" => {
            s.hello_ok(&mut vs, &agent, &tok)?;
            say_welcome(name, &agent, &s, m);
            let a = s.hello(&mut vs, &agent, &tok)?;
            let e = check("the second HELLO", unit(a))?;
            say!(
                "{}: second HELLO refused with {}, mode {}",
                name,
                describe_error(&e),
                m
            );
            echo(&mut s, &mut vs)?;
            say!(
                "{}: the session is unchanged: echo answered, mode {}",
                name,
                m
            );
        }
        "call-first" => {
            let a = s.call(&mut vs, &call("echo", "echo", Bytes::from_static(b"early")))?;
            let e = check("CALL before HELLO", unit(a))?;
            say!(
                "{}: CALL before HELLO refused with {}, mode {}",
                name,
                describe_error(&e),
                m
            );
            s.hello_ok(&mut vs, &agent, &tok)?;
            say_welcome(name, &agent, &s, m);
            echo(&mut s, &mut vs)?;
            say!(
                "{}: after HELLO the same connection works: echo answered, mode {}",
                name,
                m
            );
        }
        "call" => {
            let service = cmdline_str(ctx.cmdline, "cell0.service")?.unwrap_or("echo");
            let method = cmdline_str(ctx.cmdline, "cell0.method")?.unwrap_or("echo");
            s.hello_ok(&mut vs, &agent, &tok)?;
            say_welcome(name, &agent, &s, m);
            let granted = s.granted(service, method);
            let a = s.call(&mut vs, &call(service, method, Bytes::from_static(b"x")))?;
            let e = check(&format!("CALL {service}/{method}"), unit(a))?;
            if granted && e.error_code() == Some(ErrorCode::PermissionDenied) {
                return Err(Fail(format!(
                    "CALL {service}/{method} was refused with PERMISSION_DENIED although the WELCOME grants it"
                )));
            }
            say!(
                "{}: CALL {}/{}, which the WELCOME's rights {}, refused with {}, mode {}",
                name,
                service,
                method,
                cover(granted),
                describe_error(&e),
                m
            );
            s.ping(&mut vs)?;
            say!(
                "{}: the session stays open: PING answered after the refusal, mode {}",
                name,
                m
            );
        }
        "expire" => {
            let fresh = token_opt(ctx, "cell0.token2")?
                .ok_or_else(|| Fail::from("cell0.case=expire needs cell0.token2=<token>"))?;
            let w = s.hello_ok(&mut vs, &agent, &tok)?;
            say_welcome(name, &agent, &s, m);
            let mut calls = 0u32;
            let e = loop {
                match s.call(&mut vs, &call("echo", "echo", Bytes::from_static(b"tick")))? {
                    Answer::Ok(_) => calls += 1,
                    Answer::Refused(e) => break e,
                }
                pause(&mut vs, 250)?;
            };
            let e = check("CALL echo/echo", Answer::Refused(e))?;
            say!(
                "{}: after {} calls answered, CALL echo/echo refused with {}, mode {}",
                name,
                calls,
                describe_error(&e),
                m
            );
            match s.refresh(&mut vs, &fresh)? {
                Answer::Ok(n) if n.session_id == w.session_id => {
                    say!(
                        "{}: REFRESH welcomed: session {}, token expiry {}, mode {}",
                        name,
                        n.session_id,
                        n.token_expiry,
                        m
                    );
                }
                Answer::Ok(n) => {
                    return Err(Fail(format!(
                        "REFRESH answered session {}, not {}",
                        n.session_id, w.session_id
                    )));
                }
                Answer::Refused(e) => {
                    return Err(Fail(format!(
                        "host sent ERROR {} for REFRESH",
                        describe_error(&e)
                    )));
                }
            }
            echo(&mut s, &mut vs)?;
            say!("{}: after REFRESH echo is answered again, mode {}", name, m);
        }
        other => {
            return Err(Fail(format!(
                "bad cell0.case value '{}': expected hello, hello-twice, call-first, call or expire",
                Escaped(other.as_bytes())
            )));
        }
    }
    s.goodbye(&mut vs)?;
    vs.shutdown();
    Ok(())
}

/// "cover" or "do not cover".
fn cover(granted: bool) -> &'static str {
    if granted { "cover" } else { "do not cover" }
}

fn unit<T>(a: Answer<T>) -> Answer<()> {
    match a {
        Answer::Ok(_) => Answer::Ok(()),
        Answer::Refused(e) => Answer::Refused(e),
    }
}
