// SPDX-License-Identifier: Apache-2.0
//! `cell0-bench-cp`: control-plane figures (docs/PERFORMANCE.md, "Control
//! plane (issue 6)"). It starts its own `cell0d serve` on a temporary data
//! dir and reports, never judges:
//!
//! - `cell0ctl run` → guest ready, p50/p99 (the whole cell0ctl process, and
//!   cell0d's own spawn → ready);
//! - VM creations per second, sustained, until every VM is ready;
//! - Raft commit latency on one node (client-side Create round trips against
//!   a daemon whose "VMM" is /bin/true, and cell0d's own histogram mean);
//! - cell0d's memory with N VMs running.
//!
//! `--cluster N` instead starts N `cell0d` members on loopback (member 1
//! initializes, the others join through ClusterService.AddMember) and
//! reports Raft commit latency through the leader and through a follower
//! (one forwarding hop), write throughput from concurrent clients,
//! linearizable read latency, and the time from SIGKILLing the leader to the
//! next acknowledged write.
#![allow(clippy::print_stdout)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use cell0_control::ctl;
use cell0_proto::grpc;
use clap::Parser;
use serde_json::json;

const LONG_RUNNING: &str = "cell0.test=sypas-serve cell0.timeout=3600";

#[derive(Parser)]
#[command(
    name = "cell0-bench-cp",
    about = "Control-plane benchmarks (cell0d + cell0ctl + nano VMs)"
)]
struct Args {
    /// `cell0ctl run` → ready samples.
    #[arg(long, default_value_t = 30)]
    runs: usize,
    /// VMs for the creation-rate and memory figures.
    #[arg(long, default_value_t = 256)]
    vms: usize,
    /// Concurrent clients creating VMs.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Sequential Raft writes for the commit latency.
    #[arg(long, default_value_t = 500)]
    writes: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// Instead: the control-plane figures with this many cell0d members on
    /// loopback (1 gives the one-member baseline on the same machine and load).
    #[arg(long)]
    cluster: Option<u64>,
    /// With --cluster: members and clients over mutual TLS, with a throwaway
    /// cluster CA (compare with the same run without it).
    #[arg(long, requires = "cluster")]
    tls: bool,
}

struct Daemon {
    child: Child,
    dir: tempfile::TempDir,
    grpc: String,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Kill whatever VMMs are left under our data dir.
        let needle = self.dir.path().display().to_string();
        if let Ok(rd) = std::fs::read_dir("/proc") {
            for e in rd.flatten() {
                let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                    continue;
                };
                if let Ok(c) = std::fs::read(format!("/proc/{pid}/cmdline")) {
                    if String::from_utf8_lossy(&c).contains(&needle) {
                        // SAFETY: kill has no memory-safety preconditions.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                }
            }
        }
    }
}

fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let p = exe.with_file_name(name);
    if !p.is_file() {
        bail!(
            "{} is missing: cargo build --release --workspace --bins",
            p.display()
        );
    }
    Ok(p)
}

fn start(extra: &[&str]) -> anyhow::Result<Daemon> {
    start_until(extra, "cell0d.addr")
}

/// Starts cell0d and waits until `file` (cell0d.addr: the API serves;
/// cell0d.member: Raft serves) appears in its data dir.
fn start_until(extra: &[&str], file: &str) -> anyhow::Result<Daemon> {
    let dir = tempfile::Builder::new().prefix("c0b").tempdir_in("/tmp")?;
    let data = dir.path().join("d");
    let extra: Vec<String> = if extra.contains(&"--vmm") {
        extra.iter().map(|s| s.to_string()).collect()
    } else {
        let vmm = sibling("cell0-vmm")?.display().to_string();
        ["--vmm".to_string(), vmm]
            .into_iter()
            .chain(extra.iter().map(|s| s.to_string()))
            .collect()
    };
    let mut child = Command::new(sibling("cell0d")?)
        .arg("serve")
        .arg("--data-dir")
        .arg(&data)
        .args(["--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0"])
        .args(["--cpu-overcommit", "4096", "--health-ms", "3600000"])
        .args(&extra)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("cell0d.log"))?)
        .spawn()
        .context("cannot start cell0d")?;
    let t0 = Instant::now();
    loop {
        if let Ok(t) = std::fs::read_to_string(data.join(file)) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&t) {
                let grpc = v["grpc"].as_str().unwrap_or_default().to_string();
                return Ok(Daemon { child, dir, grpc });
            }
        }
        let log = || std::fs::read_to_string(dir.path().join("cell0d.log")).unwrap_or_default();
        if let Some(st) = child.try_wait()? {
            bail!("cell0d exited ({st}) before serving:\n{}", log());
        }
        if t0.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            bail!("cell0d did not serve within 60 s:\n{}", log());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

fn rss_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

fn spec(name: String, long: bool) -> grpc::CreateVmRequest {
    grpc::CreateVmRequest {
        spec: Some(grpc::VmSpec {
            name,
            memory_mib: 16,
            image: Some(grpc::Image {
                cmdline: if long {
                    LONG_RUNNING.into()
                } else {
                    String::new()
                },
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

/// Creates `n` VMs from `clients` concurrent clients; seconds until created
/// and until all were ready.
async fn create_many(
    c: &ctl::Clients,
    n: usize,
    clients: usize,
    long: bool,
) -> anyhow::Result<(f64, f64)> {
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..clients {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            for i in (w..n).step_by(clients) {
                c.vm.create(spec(format!("m{i}"), long)).await?;
            }
            Ok::<(), tonic::Status>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let created = t0.elapsed().as_secs_f64();
    let mut c2 = c.clone();
    all_ready(&mut c2, n, Duration::from_secs(600)).await?;
    Ok((created, t0.elapsed().as_secs_f64()))
}

async fn all_ready(c: &mut ctl::Clients, n: usize, deadline: Duration) -> anyhow::Result<()> {
    let t0 = Instant::now();
    loop {
        let vms =
            c.vm.list(grpc::ListVmsRequest::default())
                .await?
                .into_inner()
                .vms;
        let ready = vms
            .iter()
            .filter(|v| v.status.as_ref().is_some_and(|s| s.ready))
            .count();
        if ready >= n {
            return Ok(());
        }
        if t0.elapsed() > deadline {
            bail!("only {ready}/{n} VMs ready after {deadline:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn bench(a: &Args) -> anyhow::Result<serde_json::Value> {
    let cell0ctl = sibling("cell0ctl")?;
    // 1. cell0ctl run → ready.
    let d = start(&[])?;
    let mut c = ctl::connect(&d.grpc).await?;
    let (mut total, mut guest) = (Vec::new(), Vec::new());
    for i in 0..=a.runs {
        let name = format!("r{i}");
        let t0 = Instant::now();
        let o = Command::new(&cell0ctl)
            .args([
                "--endpoint",
                &d.grpc,
                "run",
                "--name",
                &name,
                "--cmdline",
                LONG_RUNNING,
                "-o",
                "json",
            ])
            .output()?;
        let el = t0.elapsed().as_secs_f64() * 1e3;
        if !o.status.success() {
            bail!(
                "cell0ctl run failed: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        let v: serde_json::Value = serde_json::from_slice(&o.stdout)?;
        if i > 0 {
            // The first run is a warm-up.
            total.push(el);
            guest.push(v["status"]["ready_latency_us"].as_f64().unwrap_or(0.0) / 1e3);
        }
        c.vm.delete(grpc::DeleteVmRequest { id: name }).await?;
    }
    drop(d);

    // 2a. Creations/s with guests that exit once ready (the default nano guest).
    let d = start(&[])?;
    let c = ctl::connect(&d.grpc).await?;
    let (short_created, short_ready) = create_many(&c, a.vms, a.clients, false).await?;
    drop(d);

    // 2b. The same with guests that keep running, then 4. memory with N VMs.
    let d = start(&[])?;
    let c = ctl::connect(&d.grpc).await?;
    let rss_idle = rss_kib(d.child.id(), "VmRSS");
    let (created, ready) = create_many(&c, a.vms, a.clients, true).await?;
    let mut c2 = c.clone();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_n = rss_kib(d.child.id(), "VmRSS");
    let hwm_n = rss_kib(d.child.id(), "VmHWM");
    let t1 = Instant::now();
    for i in 0..a.vms {
        c2.vm
            .delete(grpc::DeleteVmRequest {
                id: format!("m{i}"),
            })
            .await?;
    }
    let deleted = t1.elapsed().as_secs_f64();
    drop(d);

    // 3. Raft commit latency: Create round trips with /bin/true as the VMM.
    let d = start(&["--vmm", "/bin/true", "--memory-overcommit", "100000"])?;
    let mut c = ctl::connect(&d.grpc).await?;
    let mut lat = Vec::new();
    for i in 0..a.writes {
        let t0 = Instant::now();
        c.vm.create(grpc::CreateVmRequest {
            spec: Some(grpc::VmSpec {
                name: format!("w{i}"),
                ..Default::default()
            }),
        })
        .await?;
        lat.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    let status = c
        .cluster
        .status(grpc::ClusterStatusRequest {})
        .await?
        .into_inner();
    drop(d);
    let disk = data_dir_fs(Path::new("/tmp"));

    Ok(json!({
        "run_to_ready_ms": {"samples": total.len(), "p50": pct(&mut total, 0.5), "p99": pct(&mut total, 0.99)},
        "spawn_to_ready_ms": {"p50": pct(&mut guest, 0.5), "p99": pct(&mut guest, 0.99)},
    "creations": {"vms": a.vms, "clients": a.clients, "create_s": created, "all_ready_s": ready,
                      "creations_per_s": a.vms as f64 / ready, "delete_all_s": deleted},
        "short_lived_creations": {"vms": a.vms, "create_s": short_created, "all_ready_s": short_ready,
                      "creations_per_s": a.vms as f64 / short_ready},
        "cell0d_rss_kib": {"idle": rss_idle, "with_vms": rss_n, "hwm_with_vms": hwm_n, "vms": a.vms},
        "raft_commit_ms": {"writes": lat.len(), "p50": pct(&mut lat, 0.5), "p99": pct(&mut lat, 0.99),
                           "last_log_index": status.last_log_index, "snapshot_index": status.snapshot_index,
                           "filesystem": disk},
    }))
}

fn wait_file(d: &Daemon, file: &str) -> anyhow::Result<()> {
    let t0 = Instant::now();
    while !d.dir.path().join("d").join(file).exists() {
        if t0.elapsed() > Duration::from_secs(60) {
            bail!(
                "member at {} did not write {file} within 60 s:\n{}",
                d.grpc,
                std::fs::read_to_string(d.dir.path().join("cell0d.log")).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

fn stats(v: &mut [f64]) -> serde_json::Value {
    let mean = if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    };
    json!({"samples": v.len(), "p50": pct(v, 0.5), "p99": pct(v, 0.99), "mean": mean})
}

/// `n` sequential Creates named `{prefix}{i}`; their latencies in ms.
async fn sequential(c: &mut ctl::Clients, prefix: &str, n: usize) -> anyhow::Result<Vec<f64>> {
    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        let t0 = Instant::now();
        c.vm.create(grpc::CreateVmRequest {
            spec: Some(grpc::VmSpec {
                name: format!("{prefix}{i}"),
                ..Default::default()
            }),
        })
        .await?;
        lat.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    Ok(lat)
}

async fn failover(
    leader: &Daemon,
    fc: &mut ctl::Clients,
    old_leader: u64,
) -> anyhow::Result<serde_json::Value> {
    let t_kill = Instant::now();
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(leader.child.id() as i32, libc::SIGKILL) };
    let mut new_leader_ms = None;
    let mut k = 0;
    let write_ms = loop {
        let r = fc
            .vm
            .create(grpc::CreateVmRequest {
                spec: Some(grpc::VmSpec {
                    name: format!("x{k}"),
                    ..Default::default()
                }),
            })
            .await;
        k += 1;
        if new_leader_ms.is_none() {
            if let Ok(s) = fc.cluster.status(grpc::ClusterStatusRequest {}).await {
                let s = s.into_inner();
                if s.leader_id != 0 && s.leader_id != old_leader {
                    new_leader_ms = Some(t_kill.elapsed().as_secs_f64() * 1e3);
                }
            }
        }
        if r.is_ok() {
            break t_kill.elapsed().as_secs_f64() * 1e3;
        }
        if t_kill.elapsed() > Duration::from_secs(60) {
            bail!("no write was acknowledged within 60 s of killing the leader");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    Ok(json!({"leader_seen_ms": new_leader_ms, "first_write_ms": write_ms, "attempts": k}))
}

/// The multi-member figures: `n` members on loopback.
async fn bench_cluster(a: &Args, n: u64) -> anyhow::Result<serde_json::Value> {
    if n < 1 {
        bail!("--cluster needs at least 1 member");
    }
    // /bin/true as the "VMM": each member's node agent runs it for the VMs
    // placed on it, as in the one-member figure.
    let common = ["--vmm", "/bin/true", "--memory-overcommit", "100000"];
    // --tls: a cluster CA, one member certificate each, one client's.
    let pki = tempfile::Builder::new()
        .prefix("c0bpki")
        .tempdir_in("/tmp")?;
    let tls_of = |who: &str| pki.path().join(who).display().to_string();
    if a.tls {
        use cell0_control::tls::{CertRequest, Role, init_ca, issue_cert};
        let ca = pki.path().join("ca");
        init_ca(&ca, 1)?;
        for id in 1..=n {
            let req = CertRequest::new(&format!("m{id}"), Role::Member, &["127.0.0.1".into()], 1);
            issue_cert(&ca, &req, &pki.path().join(format!("m{id}")))?;
        }
        issue_cert(
            &ca,
            &CertRequest::new("bench", Role::Client, &[], 1),
            &pki.path().join("bench"),
        )?;
    }
    let tls_args = |id: u64| -> Vec<String> {
        if a.tls {
            vec!["--tls-dir".into(), tls_of(&format!("m{id}"))]
        } else {
            vec!["--insecure-plaintext".into()]
        }
    };
    let client_tls = a.tls.then(|| PathBuf::from(tls_of("bench")));
    let connect = |addr: String| {
        let t = client_tls.clone();
        async move { ctl::connect_tls(&addr, t.as_deref()).await }
    };
    let t_form = Instant::now();
    let t1 = tls_args(1);
    let first = start_until(
        &[
            &common[..],
            &["--node-id", "1", "--node-name", "m1"],
            // A member that will grow into a cluster starts with --init (its
            // own node is then watched); the one-member baseline does not.
            if n > 1 { &["--init"][..] } else { &[][..] },
            &t1.iter().map(String::as_str).collect::<Vec<_>>(),
        ]
        .concat(),
        "cell0d.addr",
    )?;
    let mut c1 = connect(first.grpc.clone()).await?;
    let mut ms = vec![first];
    for id in 2..=n {
        let (ids, name) = (id.to_string(), format!("m{id}"));
        let ti = tls_args(id);
        let d = start_until(
            &[
                &common[..],
                &["--node-id", &ids, "--node-name", &name, "--join"],
                &ti.iter().map(String::as_str).collect::<Vec<_>>(),
            ]
            .concat(),
            "cell0d.member",
        )?;
        c1.cluster
            .add_member(grpc::AddMemberRequest {
                id,
                address: d.grpc.clone(),
            })
            .await?;
        wait_file(&d, "cell0d.addr")?;
        ms.push(d);
    }
    let formed_s = t_form.elapsed().as_secs_f64();
    let st = c1
        .cluster
        .status(grpc::ClusterStatusRequest {})
        .await?
        .into_inner();
    let li = usize::try_from(st.leader_id)?
        .checked_sub(1)
        .filter(|i| *i < ms.len())
        .context("no leader")?;
    let fi = (li + 1) % ms.len();
    let mut lc = connect(ms[li].grpc.clone()).await?;
    let mut fc = connect(ms[fi].grpc.clone()).await?;

    sequential(&mut lc, "warm", 20).await?;
    // 1. Commit latency: sequential Creates through the leader, then through
    // a follower (which forwards each to the leader).
    let mut via_leader = sequential(&mut lc, "l", a.writes).await?;
    let mut via_follower = sequential(&mut fc, "f", a.writes).await?;
    // 2. Throughput: concurrent clients, half on the leader, half on followers.
    let total = a.writes * 2;
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    let clients = a.clients.max(1);
    for w in 0..clients {
        let mut c = if w % 2 == 0 { lc.clone() } else { fc.clone() };
        tasks.push(tokio::spawn(async move {
            for i in (w..total).step_by(clients) {
                c.vm.create(grpc::CreateVmRequest {
                    spec: Some(grpc::VmSpec {
                        name: format!("t{i}"),
                        ..Default::default()
                    }),
                })
                .await?;
            }
            Ok::<(), tonic::Status>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let tput_s = t0.elapsed().as_secs_f64();
    // 3. Linearizable reads (Get): on the leader, and on a follower (read
    // index from the leader, then the local state).
    let mut reads_leader = Vec::new();
    let mut reads_follower = Vec::new();
    for i in 0..a.writes {
        let id = format!("l{}", i % a.writes.max(1));
        let t = Instant::now();
        lc.vm.get(grpc::GetVmRequest { id: id.clone() }).await?;
        reads_leader.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        fc.vm.get(grpc::GetVmRequest { id }).await?;
        reads_follower.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let before = fc
        .cluster
        .status(grpc::ClusterStatusRequest {})
        .await?
        .into_inner();
    // 4. Failover: SIGKILL the leader, then write through a follower until a
    // write is acknowledged again (with three members or more: fewer lose
    // their majority with the leader).
    let failover = if ms.len() >= 3 {
        failover(&ms[li], &mut fc, st.leader_id).await?
    } else {
        serde_json::Value::Null
    };
    drop(ms);
    Ok(json!({
        "members": n,
        "tls": a.tls,
        "formed_s": formed_s,
        "commit_via_leader_ms": stats(&mut via_leader),
        "commit_via_follower_ms": stats(&mut via_follower),
        "throughput": {"writes": total, "clients": clients, "seconds": tput_s,
                       "writes_per_s": total as f64 / tput_s},
        "linearizable_get_leader_ms": stats(&mut reads_leader),
        "linearizable_get_follower_ms": stats(&mut reads_follower),
        "failover": failover,
        "log": {"last_log_index": before.last_log_index, "snapshot_index": before.snapshot_index},
        "filesystem": data_dir_fs(Path::new("/tmp")),
    }))
}

fn data_dir_fs(p: &Path) -> String {
    std::fs::read_to_string("/proc/mounts")
        .ok()
        .and_then(|m| {
            m.lines()
                .filter_map(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    (f.len() > 2 && p.starts_with(f[1])).then(|| (f[1].len(), f[2].to_string()))
                })
                .max()
                .map(|(_, fs)| fs)
        })
        .unwrap_or_default()
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if let Some(n) = a.cluster {
        let v = rt.block_on(bench_cluster(&a, n))?;
        if a.json {
            println!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            print_cluster(&v);
        }
        return Ok(());
    }
    let v = rt.block_on(bench(&a))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let f = |p: &str| {
        v.pointer(p)
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(0.0)
    };
    println!(
        "cell0ctl run → ready ({} runs): p50 {:.1} ms, p99 {:.1} ms",
        a.runs,
        f("/run_to_ready_ms/p50"),
        f("/run_to_ready_ms/p99")
    );
    println!(
        "  of which cell0d spawn → guest ready: p50 {:.2} ms, p99 {:.2} ms",
        f("/spawn_to_ready_ms/p50"),
        f("/spawn_to_ready_ms/p99")
    );
    println!(
        "{} long-running VMs by {} clients: created in {:.2} s, all ready in {:.2} s → {:.1} VM creations/s; deleted in {:.2} s",
        a.vms,
        a.clients,
        f("/creations/create_s"),
        f("/creations/all_ready_s"),
        f("/creations/creations_per_s"),
        f("/creations/delete_all_s")
    );
    println!(
        "{} VMs whose guest exits once ready: created in {:.2} s, all ready in {:.2} s → {:.1} VM creations/s",
        a.vms,
        f("/short_lived_creations/create_s"),
        f("/short_lived_creations/all_ready_s"),
        f("/short_lived_creations/creations_per_s")
    );
    println!(
        "cell0d RSS: {:.1} MiB idle, {:.1} MiB with {} VMs (peak {:.1} MiB)",
        f("/cell0d_rss_kib/idle") / 1024.0,
        f("/cell0d_rss_kib/with_vms") / 1024.0,
        a.vms,
        f("/cell0d_rss_kib/hwm_with_vms") / 1024.0
    );
    println!(
        "Raft commit (Create round trip, one member, fsync on {}): p50 {:.2} ms, p99 {:.2} ms over {} writes",
        v["raft_commit_ms"]["filesystem"].as_str().unwrap_or("?"),
        f("/raft_commit_ms/p50"),
        f("/raft_commit_ms/p99"),
        a.writes
    );
    Ok(())
}

fn print_cluster(v: &serde_json::Value) {
    let f = |p: &str| {
        v.pointer(p)
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(0.0)
    };
    println!(
        "{} members on loopback{} (fsync on {}), formed in {:.2} s",
        v["members"],
        if v["tls"] == true {
            " over mutual TLS"
        } else {
            ""
        },
        v["filesystem"].as_str().unwrap_or("?"),
        f("/formed_s")
    );
    for (what, key) in [
        ("Raft commit via the leader", "commit_via_leader_ms"),
        (
            "Raft commit via a follower (forwarded)",
            "commit_via_follower_ms",
        ),
        (
            "linearizable Get on the leader",
            "linearizable_get_leader_ms",
        ),
        (
            "linearizable Get on a follower",
            "linearizable_get_follower_ms",
        ),
    ] {
        println!(
            "{what} ({} sequential): p50 {:.2} ms, p99 {:.2} ms, mean {:.2} ms",
            v[key]["samples"],
            f(&format!("/{key}/p50")),
            f(&format!("/{key}/p99")),
            f(&format!("/{key}/mean"))
        );
    }
    println!(
        "throughput: {} Creates from {} clients in {:.2} s → {:.0} writes/s",
        v["throughput"]["writes"],
        v["throughput"]["clients"],
        f("/throughput/seconds"),
        f("/throughput/writes_per_s")
    );
    if !v["failover"].is_null() {
        println!(
            "leader SIGKILLed: new leader seen after {:.0} ms, first acknowledged write after {:.0} ms",
            f("/failover/leader_seen_ms"),
            f("/failover/first_write_ms")
        );
    }
}
