// SPDX-License-Identifier: Apache-2.0
//! `sypas-router-bench`: figures for the SYPAS router (docs/PERFORMANCE.md,
//! "SYPAS router (issue 4)"). It prints what it measures and judges nothing.
//!
//! - token verification: µs per `Verifier::verify` (what HELLO runs), for a
//!   minted token and for one with an attenuation block; and a whole
//!   connect + HELLO + WELCOME over the socket;
//! - throughput: small CALLs/s to the built-in `echo` across 16 host clients,
//!   each with calls pipelined;
//! - bulk: GB/s of bytes that reach a service, through shm refs (the router
//!   maps the VM's memfd) and inline through the socket, at 1 MiB and 64 MiB;
//! - agent-to-agent: round-trip p50/p99 of `agent/<id>` CALLs between two
//!   host processes' sessions through the router.
//!
//! By default the router is a real `cell0d router` process (the binary next
//! to this one); `--in-process` runs it on this process's runtime instead.
#![allow(clippy::print_stdout)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use cell0_control::router::services::fold64;
use cell0_control::router::vmapi::MockVmApi;
use cell0_control::router::{Router, RouterConfig};
use cell0_control::token::keys::{KeyStore, unix_now};
use cell0_control::token::{Attenuation, Claims, Verifier, attenuate};
use cell0_proto::host::{Client, ClientConfig, Endpoint, ReconnectPolicy, ShmWindow};
use cell0_proto::msg::{Call, Reply, Right, ShmRef};
use clap::Parser;
use serde_json::json;

#[derive(Parser)]
#[command(about = "Benchmark the SYPAS router")]
struct Args {
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Run the router inside this process instead of as `cell0d router`.
    #[arg(long)]
    in_process: bool,
    /// The cell0d binary (default: next to this one).
    #[arg(long)]
    cell0d: Option<PathBuf>,
    /// Host clients for the throughput figure.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Calls in flight per client.
    #[arg(long, default_value_t = 64)]
    in_flight: usize,
    /// Total small calls for the throughput figure.
    #[arg(long, default_value_t = 400_000)]
    calls: usize,
    /// Round trips for the agent-to-agent figure.
    #[arg(long, default_value_t = 5_000)]
    round_trips: usize,
    /// Token verifications per figure.
    #[arg(long, default_value_t = 2_000)]
    verifies: usize,
    /// Worker threads of the `cell0d router` process (its `--threads`).
    #[arg(long, default_value_t = 1)]
    router_threads: usize,
    /// Worker threads of the clients' runtime (1: a current-thread runtime).
    #[arg(long, default_value_t = 1)]
    client_threads: usize,
}

/// CPU seconds this thread has used.
fn thread_cpu() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into `ts`, which lives for the call.
    unsafe {
        libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts);
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// CPU seconds (user + system) a process has used, from /proc.
fn proc_cpu(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command (which may hold spaces) start after ") ".
    let rest = &stat[stat.rfind(") ")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks / hz)
}

/// CPU seconds (user + system) this process has used.
fn self_cpu() -> f64 {
    proc_cpu(std::process::id()).unwrap_or(f64::NAN)
}

struct RouterProc(Child);

impl Drop for RouterProc {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe {
            libc::kill(self.0.id() as i32, libc::SIGTERM);
        }
        let _ = self.0.wait();
    }
}

fn start_process(
    bin: &Path,
    sock: &Path,
    data: &Path,
    vm: &str,
    threads: usize,
) -> anyhow::Result<RouterProc> {
    use std::io::BufRead;
    let mut child = Command::new(bin)
        .args(["router", "--socket"])
        .arg(sock)
        .arg("--data-dir")
        .arg(data)
        .args(["--vm", vm])
        .args(["--threads", &threads.to_string()])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let out = child.stdout.take().context("no stdout")?;
    let mut line = String::new();
    std::io::BufReader::new(out).read_line(&mut line)?;
    if !line.starts_with("listening on") {
        bail!("cell0d router said {line:?}");
    }
    Ok(RouterProc(child))
}

fn mint(data: &Path, agent: &str, vm: &str, rights: &[(&str, &str)]) -> anyhow::Result<Bytes> {
    let ks = KeyStore::open(data)?;
    let claims = Claims {
        agent: agent.into(),
        vm: vm.into(),
        rights: rights.iter().map(|(s, m)| Right::new(*s, *m)).collect(),
        expires: unix_now() + 3600,
    };
    Ok(ks.minter().mint(&claims)?.into())
}

fn cfg(agent: &str, token: Bytes) -> ClientConfig {
    ClientConfig {
        agent_id: agent.into(),
        token,
        reconnect: ReconnectPolicy::never(),
        call_timeout: Duration::from_secs(60),
        outbound_queue: 8192,
        ..ClientConfig::default()
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)].as_secs_f64() * 1e6
}

fn bench_verify(data: &Path, n: usize) -> anyhow::Result<serde_json::Value> {
    let ks = KeyStore::open(data)?;
    let verifier = Verifier::new(cell0_control::token::keys::RingSource::watch(
        &KeyStore::ring_path(data),
    )?);
    let claims = Claims {
        agent: "a1".into(),
        vm: "vm1".into(),
        rights: vec![
            Right::new("echo", "*"),
            Right::new("agent/*", "*"),
            Right::new("event/news", "publish"),
        ],
        expires: unix_now() + 3600,
    };
    let token = ks.minter().mint(&claims)?;
    let narrow = attenuate(
        &token,
        &Attenuation {
            rights: Some(vec![Right::new("echo", "echo")]),
            expires: Some(unix_now() + 600),
            agent: Some("a1/sub".into()),
            vm: None,
        },
    )?;
    let mut out = serde_json::Map::new();
    for (name, t) in [("minted", &token), ("attenuated", &narrow)] {
        for _ in 0..n / 10 {
            verifier.verify(t)?;
        }
        let start = Instant::now();
        let cpu = thread_cpu();
        for _ in 0..n {
            verifier.verify(t)?;
        }
        let cpu_us = (thread_cpu() - cpu) * 1e6 / n as f64;
        let us = start.elapsed().as_secs_f64() * 1e6 / n as f64;
        out.insert(format!("verify_{name}_us"), json!(us));
        out.insert(format!("verify_{name}_cpu_us"), json!(cpu_us));
        out.insert(format!("token_{name}_bytes"), json!(t.len()));
    }
    Ok(out.into())
}

async fn bench_hello(sock: &Path, token: &Bytes, n: usize) -> anyhow::Result<serde_json::Value> {
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        let c = Client::connect(
            Endpoint::Unix(sock.to_path_buf()),
            cfg("bench", token.clone()),
        )
        .await?;
        times.push(start.elapsed());
        drop(c);
    }
    times.sort();
    Ok(json!({"hello_p50_us": percentile(&times, 0.5), "hello_p99_us": percentile(&times, 0.99)}))
}

async fn bench_throughput(
    sock: &Path,
    token: &Bytes,
    a: &Args,
    router_pid: Option<u32>,
) -> anyhow::Result<serde_json::Value> {
    let mut clients = Vec::new();
    for _ in 0..a.clients {
        clients.push(
            Client::connect(
                Endpoint::Unix(sock.to_path_buf()),
                cfg("bench", token.clone()),
            )
            .await?,
        );
    }
    let per_task = (a.calls / (a.clients * a.in_flight)).max(1);
    let run = |count: usize| {
        let mut set = tokio::task::JoinSet::new();
        for c in &clients {
            for _ in 0..a.in_flight {
                let c = c.clone();
                set.spawn(async move {
                    let payload = Bytes::from_static(b"0123456789abcdef");
                    for _ in 0..count {
                        c.call("echo", "echo", payload.clone()).await?;
                    }
                    Ok::<(), anyhow::Error>(())
                });
            }
        }
        set
    };
    let mut warm = run((per_task / 10).max(1));
    while let Some(r) = warm.join_next().await {
        r??;
    }
    let start = Instant::now();
    let router_cpu = router_pid.and_then(proc_cpu);
    let client_cpu = self_cpu();
    let mut set = run(per_task);
    while let Some(r) = set.join_next().await {
        r??;
    }
    let secs = start.elapsed().as_secs_f64();
    let total = per_task * a.clients * a.in_flight;
    let per_call = |before: Option<f64>, after: Option<f64>| match (before, after) {
        (Some(b), Some(a)) => json!((a - b) * 1e6 / total as f64),
        _ => serde_json::Value::Null,
    };
    Ok(json!({
        "throughput_calls": total, "throughput_clients": a.clients,
        "throughput_in_flight_per_client": a.in_flight,
        "throughput_calls_per_s": total as f64 / secs,
        "throughput_router_cpu_us_per_call": per_call(router_cpu, router_pid.and_then(proc_cpu)),
        "throughput_clients_cpu_us_per_call": per_call(Some(client_cpu), Some(self_cpu())),
    }))
}

async fn bench_bulk(
    vm_sock: &Path,
    token: &Bytes,
    window: &ShmWindow,
) -> anyhow::Result<serde_json::Value> {
    let c = Client::connect(
        Endpoint::Unix(vm_sock.to_path_buf()),
        cfg("guest", token.clone()),
    )
    .await?;
    let mut out = serde_json::Map::new();
    for (label, size, reps) in [("1mib", 1usize << 20, 200usize), ("64mib", 64 << 20, 6)] {
        let data: Vec<u8> = (0..size).map(|i| (i * 31 + 7) as u8).collect();
        let want = fold64(&data);
        let check = |r: &Reply, what: &str| -> anyhow::Result<()> {
            let got = u64::from_le_bytes(r.payload[..8].try_into()?);
            if got != want {
                bail!("{what}: the router folded {got:#x}, want {want:#x}");
            }
            Ok(())
        };
        let shm_call = |r: ShmRef| Call {
            service: "echo".into(),
            method: "fold".into(),
            payload: Bytes::new(),
            shm: vec![r],
        };
        // shm, the client writing the window each time.
        let start = Instant::now();
        for _ in 0..reps {
            let r = window.write(0, &data)?;
            let reply = c.call_with(shm_call(r), Duration::from_secs(60)).await?;
            check(&reply, "shm")?;
        }
        let shm_write = (size * reps) as f64 / start.elapsed().as_secs_f64() / 1e9;
        // shm, the bytes already in the window.
        let r = window.write(0, &data)?;
        let start = Instant::now();
        for _ in 0..reps {
            let reply = c.call_with(shm_call(r), Duration::from_secs(60)).await?;
            check(&reply, "shm")?;
        }
        let shm_read = (size * reps) as f64 / start.elapsed().as_secs_f64() / 1e9;
        // inline, in frames of at most 8 MiB (the frame limit is 16 MiB).
        let chunks: Vec<Bytes> = data.chunks(8 << 20).map(Bytes::copy_from_slice).collect();
        let start = Instant::now();
        for _ in 0..reps {
            let mut acc = 0u64;
            for ch in &chunks {
                let call = Call {
                    service: "echo".into(),
                    method: "fold".into(),
                    payload: ch.clone(),
                    shm: vec![],
                };
                let reply = c.call_with(call, Duration::from_secs(60)).await?;
                acc ^= u64::from_le_bytes(reply.payload[..8].try_into()?);
            }
            if acc != want {
                bail!("inline: the router folded {acc:#x}, want {want:#x}");
            }
        }
        let inline = (size * reps) as f64 / start.elapsed().as_secs_f64() / 1e9;
        out.insert(
            format!("bulk_{label}_shm_write_and_call_gbps"),
            json!(shm_write),
        );
        out.insert(format!("bulk_{label}_shm_call_gbps"), json!(shm_read));
        out.insert(format!("bulk_{label}_inline_gbps"), json!(inline));
    }
    Ok(out.into())
}

async fn bench_agents(sock: &Path, data: &Path, n: usize) -> anyhow::Result<serde_json::Value> {
    let ta = mint(data, "bench-a", "host", &[("agent/bench-b", "*")])?;
    let tb = mint(data, "bench-b", "host", &[("agent/bench-a", "*")])?;
    let a = Client::connect(Endpoint::Unix(sock.to_path_buf()), cfg("bench-a", ta)).await?;
    let b = Client::connect(Endpoint::Unix(sock.to_path_buf()), cfg("bench-b", tb)).await?;
    let mut rx = b.incoming().context("incoming taken")?;
    tokio::spawn(async move {
        while let Some(inc) = rx.recv().await {
            let payload = inc.call.payload.clone();
            let _ = inc
                .respond(Ok(Reply {
                    payload,
                    shm: vec![],
                }))
                .await;
        }
    });
    let payload = Bytes::from(vec![1u8; 64]);
    for _ in 0..n / 10 {
        a.call("agent/bench-b", "ping", payload.clone()).await?;
    }
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        a.call("agent/bench-b", "ping", payload.clone()).await?;
        times.push(start.elapsed());
    }
    times.sort();
    drop(b);
    Ok(
        json!({"agent_rtt_p50_us": percentile(&times, 0.5), "agent_rtt_p99_us": percentile(&times, 0.99)}),
    )
}

fn merge(into: &mut serde_json::Map<String, serde_json::Value>, v: serde_json::Value) {
    if let serde_json::Value::Object(m) = v {
        into.extend(m);
    }
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let rt = if a.client_threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(a.client_threads)
            .enable_all()
            .build()?
    };
    rt.block_on(run(a))
}

async fn run(a: Args) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    KeyStore::open(&data)?;
    let sock = dir.path().join("router.sock");
    let vm_sock = dir.path().join("vm.sock");
    let api = MockVmApi::start(&dir.path().join("api.sock"), 128 << 20)?;
    let vm_arg = format!(
        "bench-vm={},api={}",
        vm_sock.display(),
        api.path().display()
    );

    let mut results = serde_json::Map::new();
    merge(&mut results, bench_verify(&data, a.verifies)?);

    let mut proc = None;
    let _router;
    if a.in_process {
        let r = Router::new(RouterConfig::new(data.clone()))?;
        r.listen_host(&sock).await?;
        r.attach_vm("bench-vm", &vm_sock, Some(api.path())).await?;
        _router = Some(r);
        results.insert("router".into(), json!("in-process"));
    } else {
        let bin = match &a.cell0d {
            Some(b) => b.clone(),
            None => std::env::current_exe()?
                .parent()
                .context("no folder")?
                .join("cell0d"),
        };
        proc = Some(start_process(
            &bin,
            &sock,
            &data,
            &vm_arg,
            a.router_threads,
        )?);
        results.insert(
            "router".into(),
            json!(format!(
                "cell0d router process, {} thread(s)",
                a.router_threads
            )),
        );
    }
    results.insert("client_threads".into(), json!(a.client_threads));
    let router_pid = proc.as_ref().map(|p: &RouterProc| p.0.id());
    let host_token = mint(&data, "bench", "host", &[("echo", "*")])?;
    merge(&mut results, bench_hello(&sock, &host_token, 200).await?);
    merge(
        &mut results,
        bench_throughput(&sock, &host_token, &a, router_pid).await?,
    );
    let vm_token = mint(&data, "guest", "bench-vm", &[("echo", "*")])?;
    merge(
        &mut results,
        bench_bulk(&vm_sock, &vm_token, api.window()).await?,
    );
    merge(
        &mut results,
        bench_agents(&sock, &data, a.round_trips).await?,
    );
    results.insert(
        "cpus".into(),
        json!(std::thread::available_parallelism().map_or(0, usize::from)),
    );

    if a.json {
        println!("{}", serde_json::Value::Object(results));
        return Ok(());
    }
    let f = |k: &str| {
        results
            .get(k)
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(f64::NAN)
    };
    println!("router: {}", results["router"]);
    println!("client threads: {}", a.client_threads);
    println!(
        "token verify: {:.1} µs minted ({} B; {:.1} µs CPU), {:.1} µs attenuated ({} B; {:.1} µs CPU)",
        f("verify_minted_us"),
        results["token_minted_bytes"],
        f("verify_minted_cpu_us"),
        f("verify_attenuated_us"),
        results["token_attenuated_bytes"],
        f("verify_attenuated_cpu_us")
    );
    println!(
        "connect + HELLO + WELCOME: p50 {:.1} µs, p99 {:.1} µs",
        f("hello_p50_us"),
        f("hello_p99_us")
    );
    println!(
        "small CALLs: {:.0} calls/s ({} clients x {} in flight); CPU per call: router {:.2} µs, clients {:.2} µs",
        f("throughput_calls_per_s"),
        a.clients,
        a.in_flight,
        f("throughput_router_cpu_us_per_call"),
        f("throughput_clients_cpu_us_per_call")
    );
    for l in ["1mib", "64mib"] {
        println!(
            "bulk {l}: shm {:.2} GB/s (with the client's write {:.2} GB/s), inline {:.2} GB/s",
            f(&format!("bulk_{l}_shm_call_gbps")),
            f(&format!("bulk_{l}_shm_write_and_call_gbps")),
            f(&format!("bulk_{l}_inline_gbps"))
        );
    }
    println!(
        "agent-to-agent RTT: p50 {:.1} µs, p99 {:.1} µs",
        f("agent_rtt_p50_us"),
        f("agent_rtt_p99_us")
    );
    Ok(())
}
