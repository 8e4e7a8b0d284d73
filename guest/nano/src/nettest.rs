// SPDX-License-Identifier: Apache-2.0
//! The self-tests over virtio-vsock and SYPAS: `sypas-echo`, `sypas-serve`,
//! `vsock-flood` and `sypas-bench`. README.md gives their cmdline keys and
//! exact output. Every line they print ends with `, mode irq` or
//! `, mode poll`.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write as _;
use core::sync::atomic::Ordering;

use cell0_nano::cmdline::{self, MmioDevice};
use cell0_nano::text::Escaped;
use cell0_proto::bytes::Bytes;

use crate::selftest::{Ctx, Fail};
use crate::session::describe_rights;
use crate::sypas::{Client, Server};
use crate::vsock::{self, Mode, Vsock};
use crate::{galloc, say, time};

/// Default payload sizes of `sypas-echo`.
const DEFAULT_SIZES: [u64; 5] = [0, 1, 4096, 65536, 1_048_576];
/// Largest payload a test sends (the heap holds about three copies).
const MAX_SIZE: u64 = 8 << 20;
/// Most sizes in `cell0.sizes`.
const MAX_SIZES: usize = 16;
/// Most connections `vsock-flood` opens.
const MAX_CONNS: u64 = 1000;

/// A numeric `cell0.*` key: its value, or `default` when absent; a value
/// that is not a number in `min..=max` fails the test.
pub(crate) fn opt(ctx: &Ctx<'_>, key: &str, default: u64, min: u64, max: u64) -> Result<u64, Fail> {
    let Some(v) = cmdline::value(ctx.cmdline, key.as_bytes()) else {
        return Ok(default);
    };
    match cmdline::parse_number(v) {
        Some(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(Fail(format!(
            "bad {} value '{}': expected a number from {} to {}",
            key,
            Escaped(v),
            min,
            max
        ))),
    }
}

/// `cell0.poll=1` selects busy-polling, `cell0.poll=0` (the default) interrupts.
pub(crate) fn mode(ctx: &Ctx<'_>) -> Result<Mode, Fail> {
    Ok(match opt(ctx, "cell0.poll", 0, 0, 1)? {
        1 => Mode::Poll,
        _ => Mode::Irq,
    })
}

/// Brings up the vsock device in the mode the cmdline asks for and prints
/// the device line.
pub(crate) fn open(ctx: &Ctx<'_>, name: &str) -> Result<Vsock, Fail> {
    let m = mode(ctx)?;
    let mut devices: Vec<MmioDevice> = Vec::new();
    for d in cmdline::mmio_devices(ctx.cmdline) {
        match d {
            Ok(d) => devices.push(d),
            Err(v) => {
                return Err(Fail(format!(
                    "bad virtio_mmio.device value '{}': expected SIZE@BASE:IRQ, mode {}",
                    Escaped(v),
                    m
                )));
            }
        }
    }
    let with_mode = |e: Fail| Fail(format!("{e}, mode {m}"));
    let (index, dev) = vsock::find(&devices).map_err(with_mode)?;
    let vs = Vsock::open(&dev, index, m).map_err(with_mode)?;
    say!(
        "{}: virtio-vsock at {:#x} irq {}, guest cid {}, mode {}",
        name,
        vs.base(),
        vs.irq,
        vs.cid(),
        m
    );
    Ok(vs)
}

/// The deadline from `cell0.timeout` (seconds, default 120), counted with
/// the TSC at the conservative 1 GHz guess (see `time`): on a 2.6 GHz TSC
/// 120 nominal seconds are about 46 real ones.
pub(crate) fn deadline(ctx: &Ctx<'_>) -> Result<(u64, u64), Fail> {
    let secs = opt(ctx, "cell0.timeout", 120, 1, 86_400)?;
    Ok((secs, time::deadline_ms(secs * 1000)))
}

/// Runs `step` until it finishes or the deadline passes; maps a timeout to
/// a failure that says what `progress` reports.
fn run(
    vs: &mut Vsock,
    ctx: &Ctx<'_>,
    name: &str,
    mut step: impl FnMut(&mut Vsock) -> Result<Option<bool>, Fail>,
    progress: impl Fn() -> String,
) -> Result<(), Fail> {
    let (secs, at) = deadline(ctx)?;
    let reset_after = match cmdline::value(ctx.cmdline, b"cell0.reset_after") {
        None => None,
        Some(_) => Some(opt(ctx, "cell0.reset_after", 0, 1, u64::MAX)?),
    };
    let finished = vs.run_until(at, |vs| {
        if let Some(n) = reset_after {
            if vs.core.stats.rx_bytes >= n {
                say!(
                    "{}: resetting the VM after {} bytes received, mode {}",
                    name,
                    n,
                    vs.mode
                );
                crate::reset();
            }
        }
        step(vs)
    })?;
    if finished {
        Ok(())
    } else {
        Err(Fail(format!("timed out after {} s: {}", secs, progress())))
    }
}

/// "2600 MHz" or "uncalibrated".
pub(crate) fn tsc_rate() -> String {
    if time::calibrated() {
        format!("{} MHz", time::per_ms() / 1000)
    } else {
        String::from("uncalibrated")
    }
}

/// The token under `key` (`cell0.token`, `cell0.token2`): the base64 text
/// `cell0d token mint` prints, decoded; `None` when the key is absent.
pub(crate) fn token_opt(ctx: &Ctx<'_>, key: &str) -> Result<Option<Bytes>, Fail> {
    let Some(v) = cmdline::value(ctx.cmdline, key.as_bytes()) else {
        return Ok(None);
    };
    cmdline::parse_base64(v)
        .map(|b| Some(Bytes::from(b)))
        .ok_or_else(|| {
            Fail(format!(
                "bad {} value '{}': expected base64 (as `cell0d token mint` prints it)",
                key,
                Escaped(v)
            ))
        })
}

/// The value of `key` as UTF-8 text, `None` when absent.
pub(crate) fn cmdline_str<'a>(cmdline: &'a [u8], key: &str) -> Result<Option<&'a str>, Fail> {
    match cmdline::value(cmdline, key.as_bytes()) {
        None => Ok(None),
        Some(v) => core::str::from_utf8(v).map(Some).map_err(|_| {
            Fail(format!(
                "bad {} value '{}': expected UTF-8",
                key,
                Escaped(v)
            ))
        }),
    }
}

/// The HELLO token (`cell0.token`, empty when absent).
pub(crate) fn token(ctx: &Ctx<'_>) -> Result<Bytes, Fail> {
    Ok(token_opt(ctx, "cell0.token")?.unwrap_or_default())
}

/// The agent id HELLO names (`cell0.agent_id`, default `nano`).
pub(crate) fn agent_id(ctx: &Ctx<'_>) -> Result<String, Fail> {
    match cmdline::value(ctx.cmdline, b"cell0.agent_id") {
        None => Ok(String::from(crate::sypas::AGENT_ID)),
        Some(v) => match core::str::from_utf8(v) {
            Ok(s) if !s.is_empty() && s.len() <= 256 => Ok(String::from(s)),
            _ => Err(Fail(format!(
                "bad cell0.agent_id value '{}': expected 1 to 256 bytes of UTF-8",
                Escaped(v)
            ))),
        },
    }
}

/// Steps one client; the `run` step result for it.
fn step_client(c: &mut Client, vs: &mut Vsock) -> Result<Option<bool>, Fail> {
    let p = c.step(&mut vs.core)?;
    Ok(if c.is_done() {
        Some(true)
    } else if p {
        Some(false)
    } else {
        None
    })
}

/// `sypas-echo`: HELLO, `cell0.calls` echo CALLs per size of `cell0.sizes`,
/// each reply checked byte for byte, GOODBYE.
pub fn sypas_echo(ctx: &Ctx<'_>) -> Result<(), Fail> {
    const NAME: &str = "sypas-echo";
    let m = mode(ctx)?;
    let with_mode = |e: Fail| Fail(format!("{e}, mode {m}"));
    let port = opt(ctx, "cell0.port", 1024, 1, u64::from(u32::MAX)).map_err(with_mode)? as u32;
    let calls = opt(ctx, "cell0.calls", 4, 1, 1_000_000).map_err(with_mode)? as u32;
    let mut sizes = [0u64; MAX_SIZES];
    let n = match cmdline::value(ctx.cmdline, b"cell0.sizes") {
        None => {
            sizes[..DEFAULT_SIZES.len()].copy_from_slice(&DEFAULT_SIZES);
            DEFAULT_SIZES.len()
        }
        Some(v) => cmdline::parse_list(v, &mut sizes)
            .filter(|n| sizes[..*n].iter().all(|s| *s <= MAX_SIZE))
            .ok_or_else(|| {
                with_mode(Fail(format!(
                    "bad cell0.sizes value '{}': expected 1 to {} comma-separated sizes of at most {} bytes",
                    Escaped(v),
                    MAX_SIZES,
                    MAX_SIZE
                )))
            })?,
    };
    let plan: Vec<(usize, u32)> = sizes[..n].iter().map(|s| (*s as usize, calls)).collect();
    let tok = token(ctx).map_err(with_mode)?;
    let agent = agent_id(ctx).map_err(with_mode)?;
    let mut vs = open(ctx, NAME)?;
    let mut c = Client::connect(&mut vs.core, port, tok.clone(), plan.clone()).agent(agent);
    let r = run(
        &mut vs,
        ctx,
        NAME,
        |vs| step_client(&mut c, vs),
        || String::from("the echo session did not finish"),
    );
    // With a token, the grant the router gave (WELCOME's rights and expiry).
    if let (false, Some(w)) = (tok.is_empty(), &c.welcome) {
        say!(
            "{}: welcome: session {}, rights {}, token expiry {}, mode {}",
            NAME,
            w.session_id,
            describe_rights(&w.rights),
            w.token_expiry,
            m
        );
    }
    // Whatever happened, report the sizes that completed.
    let total: u32 = plan.iter().map(|p| p.1).sum();
    for (i, (size, n)) in plan.iter().enumerate() {
        if c.echoed[i] == *n {
            say!("{}: {} calls of {} bytes echoed, mode {}", NAME, n, size, m);
        }
    }
    r.map_err(|e| {
        with_mode(Fail(format!(
            "{} ({}/{} calls echoed)",
            e,
            c.calls(),
            total
        )))
    })?;
    say!(
        "{}: {} calls, {} payload bytes each way, goodbye exchanged, mode {}",
        NAME,
        c.calls(),
        c.bytes,
        m
    );
    // Measured after the work, so boot-to-first-call figures do not pay
    // for the few milliseconds it takes.
    time::calibrate();
    let ring3 = crate::RING3_TSC.load(Ordering::Relaxed);
    let mut t = String::new();
    for (i, (size, n)) in plan.iter().enumerate() {
        let (a, b) = c.step_time[i];
        let sep = if i == 0 { "" } else { ", " };
        let _ = write!(
            t,
            "{}{} B {}",
            sep,
            size,
            time::to_us(b - a) / u64::from(*n)
        );
    }
    let since = |t: Option<u64>| time::to_us(t.unwrap_or(0).saturating_sub(ring3));
    say!(
        "{}: timing: welcome {} us, first reply {} us after ring-3 entry; us per call: {}; tsc {}, mode {}",
        NAME,
        since(c.welcome_at),
        since(c.first_reply_at),
        t,
        tsc_rate(),
        m
    );
    vs.shutdown();
    Ok(())
}

/// `sypas-serve`: listens on `cell0.port`, serves host clients until one says
/// GOODBYE with reason "done".
pub fn sypas_serve(ctx: &Ctx<'_>) -> Result<(), Fail> {
    const NAME: &str = "sypas-serve";
    let m = mode(ctx)?;
    let with_mode = |e: Fail| Fail(format!("{e}, mode {m}"));
    let port = opt(ctx, "cell0.port", 5000, 1, u64::from(u32::MAX)).map_err(with_mode)? as u32;
    let mut vs = open(ctx, NAME)?;
    vs.core.listen(port);
    say!("{}: listening on port {}, mode {}", NAME, port, m);
    let mut live: Vec<Server> = Vec::new();
    let (mut conns, mut calls, mut pings, mut errors) = (0u64, 0u64, 0u64, 0u64);
    let mut done = false;
    let r = run(
        &mut vs,
        ctx,
        NAME,
        |vs| {
            let mut progress = false;
            while let Some(id) = vs.core.accept() {
                conns += 1;
                live.push(Server::new(id, conns));
                progress = true;
            }
            for s in &mut live {
                progress |= s.step(&mut vs.core);
            }
            live.retain(|s| {
                if s.finished {
                    calls += s.calls;
                    pings += s.pings;
                    errors += s.errors;
                    done |= s.done;
                }
                !s.finished
            });
            Ok(if done {
                Some(true)
            } else if progress {
                Some(false)
            } else {
                None
            })
        },
        || String::from("no client said GOODBYE \"done\""),
    );
    for s in &live {
        calls += s.calls;
        pings += s.pings;
        errors += s.errors;
    }
    r.map_err(|e| {
        with_mode(Fail(format!(
            "{e} ({conns} connections, {calls} calls served)"
        )))
    })?;
    say!(
        "{}: served {} calls on {} connections, goodbye \"done\", mode {}",
        NAME,
        calls,
        conns,
        m
    );
    say!(
        "{}: answered {} pings, sent {} errors, mode {}",
        NAME,
        pings,
        errors,
        m
    );
    vs.shutdown();
    Ok(())
}

/// Steps every client, lets them call once all are welcomed; finished when
/// all are done.
fn step_all(
    clients: &mut [Client],
    vs: &mut Vsock,
    started: &mut Option<u64>,
) -> Result<Option<bool>, Fail> {
    let mut progress = false;
    for (i, c) in clients.iter_mut().enumerate() {
        progress |= c
            .step(&mut vs.core)
            .map_err(|e| Fail(format!("connection {}: {}", i, e)))?;
    }
    if started.is_none() && clients.iter().all(Client::is_ready) {
        *started = Some(time::now());
        for c in clients.iter_mut() {
            c.start(&mut vs.core);
        }
        progress = true;
    }
    Ok(if clients.iter().all(Client::is_done) {
        Some(true)
    } else if progress {
        Some(false)
    } else {
        None
    })
}

/// `vsock-flood`: `cell0.conns` SYPAS sessions at once, each doing
/// `cell0.calls` echo CALLs of `cell0.size` bytes.
pub fn vsock_flood(ctx: &Ctx<'_>) -> Result<(), Fail> {
    const NAME: &str = "vsock-flood";
    let m = mode(ctx)?;
    let with_mode = |e: Fail| Fail(format!("{e}, mode {m}"));
    let port = opt(ctx, "cell0.port", 1024, 1, u64::from(u32::MAX)).map_err(with_mode)? as u32;
    let conns = opt(ctx, "cell0.conns", 64, 1, MAX_CONNS).map_err(with_mode)? as usize;
    let calls = opt(ctx, "cell0.calls", 4, 1, 1_000_000).map_err(with_mode)? as u32;
    let size = opt(ctx, "cell0.size", 65536, 0, MAX_SIZE).map_err(with_mode)? as usize;
    let tok = token(ctx).map_err(with_mode)?;
    let agent = agent_id(ctx).map_err(with_mode)?;
    let mut vs = open(ctx, NAME)?;
    let mut clients: Vec<Client> = (0..conns)
        .map(|i| {
            Client::connect(&mut vs.core, port, tok.clone(), alloc::vec![(size, calls)])
                .agent(agent.clone())
                .pattern_base(i as u32 * calls)
                .hold()
        })
        .collect();
    let mut started = None;
    let r = run(
        &mut vs,
        ctx,
        NAME,
        |vs| step_all(&mut clients, vs, &mut started),
        || String::from("not every connection finished"),
    );
    let welcomed = clients.iter().filter(|c| c.welcome_at.is_some()).count();
    let echoed: u64 = clients.iter().map(Client::calls).sum();
    if started.is_some() {
        say!(
            "{}: {}/{} connections open at once, mode {}",
            NAME,
            conns,
            conns,
            m
        );
    }
    r.map_err(|e| {
        with_mode(Fail(format!(
            "{e} ({welcomed}/{conns} connections welcomed, {echoed}/{} calls echoed)",
            conns as u64 * u64::from(calls)
        )))
    })?;
    time::calibrate();
    let end = clients.iter().map(|c| c.step_time[0].1).max().unwrap_or(0);
    let us = time::to_us(end.saturating_sub(started.unwrap_or(end))).max(1);
    let bytes: u64 = clients.iter().map(|c| c.bytes).sum();
    say!(
        "{}: {} calls of {} bytes echoed on {} connections, every byte checked, mode {}",
        NAME,
        echoed,
        size,
        conns,
        m
    );
    say!(
        "{}: timing: {} calls in {} us, {} calls/s, {} MB/s each way; tsc {}, mode {}",
        NAME,
        echoed,
        us,
        echoed * 1_000_000 / us,
        bytes / us,
        tsc_rate(),
        m
    );
    driver_line(NAME, &vs);
    vs.shutdown();
    Ok(())
}

/// The driver's and the heap's counters (they vary from run to run).
fn driver_line(name: &str, vs: &Vsock) {
    let s = vs.stats;
    let c = vs.core.stats;
    let h = galloc::stats();
    say!(
        "{}: driver: {} packets in, {} out, {} kicks, {} interrupts, {} sleeps ({} ended by the timer), heap peak {} KiB of {} KiB, mode {}",
        name,
        c.rx_packets,
        c.tx_packets,
        s.kicks,
        s.irqs,
        s.sleeps,
        s.timer_wakeups,
        h.peak / 1024,
        h.arena / 1024,
        vs.mode
    );
}

/// Microseconds with one decimal, from TSC cycles.
pub(crate) fn us1(cycles: u64) -> String {
    let tenths = (u128::from(cycles) * 10_000 / u128::from(time::per_ms())) as u64;
    format!("{}.{}", tenths / 10, tenths % 10)
}

/// `sypas-bench`: round-trip latency (64 B, one call at a time), pipelined
/// small calls, and 64 KiB bulk calls against the host echo server.
pub fn sypas_bench(ctx: &Ctx<'_>) -> Result<(), Fail> {
    const NAME: &str = "sypas-bench";
    let m = mode(ctx)?;
    let with_mode = |e: Fail| Fail(format!("{e}, mode {m}"));
    let port = opt(ctx, "cell0.port", 1024, 1, u64::from(u32::MAX)).map_err(with_mode)? as u32;
    let calls = opt(ctx, "cell0.calls", 10_000, 1, 10_000_000).map_err(with_mode)? as u32;
    let size = opt(ctx, "cell0.size", 64, 0, MAX_SIZE).map_err(with_mode)? as usize;
    let window = opt(ctx, "cell0.window", 64, 1, 4096).map_err(with_mode)? as usize;
    let pipelined = opt(ctx, "cell0.pipelined", 20_000, 1, 10_000_000).map_err(with_mode)? as u32;
    let bulk_mib = opt(ctx, "cell0.bulk_mib", 64, 1, 65536).map_err(with_mode)? as u32;
    let tok = token(ctx).map_err(with_mode)?;
    let agent = agent_id(ctx).map_err(with_mode)?;
    let mut vs = open(ctx, NAME)?;

    // 1. Round trips, one at a time.
    let mut c = Client::connect(&mut vs.core, port, tok.clone(), alloc::vec![(size, calls)])
        .agent(agent.clone())
        .record_rtts();
    run(
        &mut vs,
        ctx,
        NAME,
        |vs| step_client(&mut c, vs),
        || String::from("the round-trip session did not finish"),
    )
    .map_err(with_mode)?;
    time::calibrate();
    let mut rtts = c.rtts.take().unwrap_or_default();
    rtts.sort_unstable();
    let pct = |p: usize| u64::from(rtts[(rtts.len() * p / 100).min(rtts.len() - 1)]);
    let mean = rtts.iter().map(|r| u64::from(*r)).sum::<u64>() / rtts.len() as u64;
    say!(
        "{}: round trip, {} B, {} calls: p50 {} us, p99 {} us, mean {} us, mode {}",
        NAME,
        size,
        calls,
        us1(pct(50)),
        us1(pct(99)),
        us1(mean),
        m
    );

    // 2. Pipelined: `window` calls in flight on one connection.
    let mut c = Client::connect(
        &mut vs.core,
        port,
        tok.clone(),
        alloc::vec![(size, pipelined)],
    )
    .agent(agent.clone())
    .window(window);
    run(
        &mut vs,
        ctx,
        NAME,
        |vs| step_client(&mut c, vs),
        || String::from("the pipelined session did not finish"),
    )
    .map_err(with_mode)?;
    let (a, b) = c.step_time[0];
    let us = time::to_us(b - a).max(1);
    say!(
        "{}: pipelined, {} B, window {}, {} calls: {} calls/s ({} messages/s), mode {}",
        NAME,
        size,
        window,
        pipelined,
        u64::from(pipelined) * 1_000_000 / us,
        2 * u64::from(pipelined) * 1_000_000 / us,
        m
    );

    // 3. Bulk: 64 KiB calls, 8 in flight.
    const BULK: usize = 64 * 1024;
    let bulk_calls = bulk_mib * 16;
    let mut c = Client::connect(&mut vs.core, port, tok, alloc::vec![(BULK, bulk_calls)])
        .agent(agent)
        .window(8);
    run(
        &mut vs,
        ctx,
        NAME,
        |vs| step_client(&mut c, vs),
        || String::from("the bulk session did not finish"),
    )
    .map_err(with_mode)?;
    let (a, b) = c.step_time[0];
    let us = time::to_us(b - a).max(1);
    say!(
        "{}: bulk, {} B, window 8, {} calls: {} MB/s each way; tsc {}, mode {}",
        NAME,
        BULK,
        bulk_calls,
        c.bytes / us,
        tsc_rate(),
        m
    );
    driver_line(NAME, &vs);
    vs.shutdown();
    Ok(())
}
