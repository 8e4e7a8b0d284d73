// SPDX-License-Identifier: Apache-2.0
//! `cell0ctl`: the agent VM lifecycle over cell0d's gRPC API.
#![allow(clippy::print_stdout)]

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use cell0_control::ctl::{self, Clients, CtlError, exit};
use cell0_proto::grpc;
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use tokio_stream::StreamExt;

const EXIT_CODES: &str = "Exit codes:
  0 success            1 other error         2 bad command line
  3 not found          4 invalid request     5 cell0d unreachable/unavailable
  6 VM failed / attestation rejected         7 timed out
  8 already exists     9 no capacity        10 not supported
 11 VM not in a state that allows it";

#[derive(Parser, Debug)]
#[command(
    name = "cell0ctl",
    version,
    about = "Run and manage cell0 agent VMs",
    after_help = concat!("Examples:
  cell0ctl run --name a1                       # nano guest, wait until ready
  cell0ctl run --name web --cmdline 'cell0.test=sypas-serve cell0.timeout=3600' --tpm
  cell0ctl ps                                  # table; -o json for scripts
  cell0ctl get a1 -o yaml
  cell0ctl logs -f a1
  cell0ctl logs --agent lx                     # a Linux agent's workload stdout/stderr
  cell0ctl attest web
  cell0ctl rm a1 web
  cell0ctl events
  source <(cell0ctl completion bash)

", "Exit codes:
  0 success            1 other error         2 bad command line
  3 not found          4 invalid request     5 cell0d unreachable/unavailable
  6 VM failed / attestation rejected         7 timed out
  8 already exists     9 no capacity        10 not supported
 11 VM not in a state that allows it")
)]
struct Cli {
    /// cell0d's gRPC endpoint.
    #[arg(
        long,
        global = true,
        env = "CELL0_ENDPOINT",
        default_value = "http://127.0.0.1:7070"
    )]
    endpoint: String,
    /// Mutual TLS: a dir with ca.pem, cert.pem and key.pem (`cell0d
    /// issue-cert`), for a cell0d served with --tls-dir.
    #[arg(long, global = true, env = "CELL0_TLS_DIR")]
    tls_dir: Option<std::path::PathBuf>,
    /// Dial another host over plain TCP (a cell0d served with
    /// --insecure-plaintext). Plain TCP to 127.0.0.1 needs no flag.
    #[arg(long, global = true, conflicts_with = "tls_dir")]
    insecure_plaintext: bool,
    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value = "table")]
    output: Output,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum Output {
    Table,
    Json,
    Yaml,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Restart {
    Never,
    OnFailure,
    Always,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Create a VM and wait until its guest is ready.
    #[command(
        after_help = "Examples:\n  cell0ctl run --name a1\n  cell0ctl run --name crashy --cmdline cell0.test=panic --restart on-failure --no-wait\n  cell0ctl run --kernel /boot/vmlinux --initrd /srv/agent.cpio --memory-mib 512 --label team=ml"
    )]
    Run(Box<RunArgs>),
    /// List VMs.
    #[command(alias = "list")]
    Ps {
        /// Only VMs with this label (KEY=VALUE; repeat).
        #[arg(short = 'l', long = "label")]
        labels: Vec<String>,
    },
    /// Show one VM.
    Get {
        /// VM name.
        name: String,
    },
    /// Print a VM's serial console, or with --agent its workload's output.
    Logs {
        /// VM name.
        name: String,
        /// Keep streaming until the VM ends.
        #[arg(short, long)]
        follow: bool,
        /// Only the last N bytes.
        #[arg(long, default_value_t = 0)]
        tail: u64,
        /// The guest agent's workload stdout and stderr instead of the serial console.
        #[arg(long)]
        agent: bool,
    },
    /// Run a command in the guest (needs a guest agent that serves exec).
    Exec {
        /// VM name.
        name: String,
        /// Command and arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Stop a VM (it keeps its record; `rm` deletes it).
    Stop {
        /// VM names.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Delete VMs: stop them and remove their run dirs.
    Rm {
        /// VM names.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Attest a VM (quote + verify against its golden values); exit 6 when rejected.
    Attest {
        /// VM name.
        name: String,
    },
    /// Stream VM events.
    Events {
        /// Only this VM.
        name: Option<String>,
    },
    /// Nodes.
    Node {
        #[command(subcommand)]
        cmd: NodeCmd,
    },
    /// The control plane's Raft cluster.
    Cluster {
        #[command(subcommand)]
        cmd: ClusterCmd,
    },
    /// Print a shell completion script.
    Completion {
        /// Shell.
        shell: clap_complete::Shell,
    },
    /// Print the exit codes.
    ExitCodes,
}

#[derive(Subcommand, Debug)]
enum NodeCmd {
    /// List nodes.
    List,
    /// Drain a node: it takes no new VMs, and its restartable VMs (restart
    /// on-failure or always) move to other nodes; the others stay and are
    /// listed. Exit 11 when some restartable VM could not move.
    Drain {
        /// Node id (see `node list`).
        node: String,
    },
    /// Let a drained node take new VMs again (moved VMs do not come back).
    Uncordon {
        /// Node id.
        node: String,
    },
}

#[derive(Subcommand, Debug)]
enum ClusterCmd {
    /// Raft state of the control plane: members, leader, term, log and applied index.
    Status,
    /// Add a member: it joins as a learner, catches up, then becomes a voter.
    #[command(after_help = "Examples:
  cell0d serve --data-dir /tmp/m2 --node-id 2 --listen 127.0.0.1:7072 --join &
  cell0ctl --endpoint 127.0.0.1:7071 cluster add 2 127.0.0.1:7072")]
    Add {
        /// Member id (as given to `cell0d serve --node-id`).
        id: u64,
        /// Its gRPC address, HOST:PORT.
        address: String,
    },
    /// Remove a member (voter or learner).
    Remove {
        /// Member id.
        id: u64,
    },
    /// Revoke a certificate of the cluster CA (committed through Raft): every
    /// member refuses requests made with it from its next request on.
    #[command(after_help = "Examples:
  cell0ctl --tls-dir ~/.cell0/tls cluster revoke --cert /etc/cell0/n1/cert.pem --reason 'host retired'
  cell0ctl --tls-dir ~/.cell0/tls cluster revoke --serial 3a:f2:09:...")]
    Revoke {
        /// The serial (hex, as `openssl x509 -noout -serial` prints it).
        #[arg(long, required_unless_present = "cert", conflicts_with = "cert")]
        serial: Option<String>,
        /// The certificate (PEM) to revoke: its serial, with its name.
        #[arg(long)]
        cert: Option<std::path::PathBuf>,
        /// Why (kept with it).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// List the revoked certificates.
    Revocations,
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// VM name (DNS label); generated when omitted.
    #[arg(long)]
    name: Option<String>,
    /// Kernel on the node (ELF or bzImage); the built-in nano guest when omitted.
    #[arg(long)]
    kernel: Option<String>,
    /// Initrd on the node.
    #[arg(long)]
    initrd: Option<String>,
    /// Kernel command line.
    #[arg(long)]
    cmdline: Option<String>,
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 64)]
    memory_mib: u64,
    /// Shared-memory window in MiB.
    #[arg(long, default_value_t = 0)]
    shm_mib: u64,
    /// Agent id (default: the name).
    #[arg(long)]
    agent_id: Option<String>,
    /// A SYPAS right SERVICE:METHOD to grant (patterns; repeat).
    #[arg(long = "right")]
    rights: Vec<String>,
    /// Restart policy.
    #[arg(long, value_enum, default_value = "never")]
    restart: Restart,
    /// A label KEY=VALUE (repeat).
    #[arg(short = 'l', long = "label")]
    labels: Vec<String>,
    /// Measured boot in a per-VM vTPM (needed for attest).
    #[arg(long)]
    tpm: bool,
    /// Workload command word, measured into PCR 12 (repeat).
    #[arg(long = "command")]
    command: Vec<String>,
    /// Only in this zone (repeat: any of them).
    #[arg(long = "zone")]
    zones: Vec<String>,
    /// Only in this region (repeat: any of them).
    #[arg(long = "region")]
    regions: Vec<String>,
    /// A label KEY=VALUE the node must carry (repeat).
    #[arg(long = "node-selector")]
    node_selector: Vec<String>,
    /// Only next to a VM with this label KEY=VALUE (repeat: all of them).
    #[arg(long = "affinity")]
    affinity: Vec<String>,
    /// Never next to a VM with this label KEY=VALUE (repeat: all of them).
    #[arg(long = "anti-affinity")]
    anti_affinity: Vec<String>,
    /// What "next to" means for --affinity and --anti-affinity: node or zone.
    #[arg(long, default_value = "node")]
    topology: String,
    /// Put it on the emptiest node that fits, not the fullest (bin-pack).
    #[arg(long)]
    spread: bool,
    /// Return once created, without waiting for ready.
    #[arg(long)]
    no_wait: bool,
    /// How long to wait for ready, in seconds.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
}

fn kv(v: &[String], what: &str) -> Result<std::collections::HashMap<String, String>, CtlError> {
    v.iter()
        .map(|s| {
            s.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| {
                    CtlError::from(tonic::Status::invalid_argument(format!(
                        "{what} {s:?}: expected KEY=VALUE"
                    )))
                })
        })
        .collect()
}

fn print_value(out: Output, v: &serde_json::Value) {
    match out {
        Output::Yaml => print!("{}", serde_yaml::to_string(v).unwrap_or_default()),
        _ => println!("{}", serde_json::to_string_pretty(v).unwrap_or_default()),
    }
}

fn spinner(msg: &str) -> Option<indicatif::ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let pb = indicatif::ProgressBar::new_spinner();
    pb.enable_steady_tick(Duration::from_millis(80));
    pb.set_message(msg.to_string());
    Some(pb)
}

async fn run(c: &mut Clients, out: Output, a: RunArgs) -> Result<(), CtlError> {
    let right = a
        .rights
        .iter()
        .map(|r| {
            let (s, m) = r.split_once(':').unwrap_or((r.as_str(), "*"));
            grpc::Right {
                service: s.to_string(),
                method: m.to_string(),
            }
        })
        .collect();
    let spec = grpc::VmSpec {
        name: a.name.unwrap_or_default(),
        image: Some(grpc::Image {
            kernel: a.kernel.unwrap_or_default(),
            initrd: a.initrd.unwrap_or_default(),
            cmdline: a.cmdline.unwrap_or_default(),
        }),
        vcpus: a.vcpus,
        memory_mib: a.memory_mib,
        shm_mib: a.shm_mib,
        agent_id: a.agent_id.unwrap_or_default(),
        rights: right,
        restart_policy: match a.restart {
            Restart::Never => grpc::RestartPolicy::Never,
            Restart::OnFailure => grpc::RestartPolicy::OnFailure,
            Restart::Always => grpc::RestartPolicy::Always,
        } as i32,
        labels: kv(&a.labels, "label")?,
        tpm: a.tpm,
        command: a.command,
        placement: Some(grpc::Placement {
            zones: a.zones,
            regions: a.regions,
            node_selector: kv(&a.node_selector, "node selector")?,
            affinity: kv(&a.affinity, "affinity")?,
            anti_affinity: kv(&a.anti_affinity, "anti-affinity")?,
            topology: a.topology,
            policy: if a.spread {
                grpc::PlacementPolicy::Spread
            } else {
                grpc::PlacementPolicy::BinPack
            } as i32,
        }),
    };
    let t0 = Instant::now();
    let pb = if a.no_wait { None } else { spinner("creating") };
    let vm =
        c.vm.create(grpc::CreateVmRequest { spec: Some(spec) })
            .await?
            .into_inner();
    let id = vm.id.clone();
    if !a.no_wait {
        if let Some(pb) = &pb {
            pb.set_message(format!("{id}: waiting for the guest"));
        }
        let mut events =
            c.vm.watch(grpc::WatchRequest { id: id.clone() })
                .await?
                .into_inner();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(a.timeout);
        loop {
            // The status is the truth; events only wake us up.
            let cur =
                c.vm.get(grpc::GetVmRequest { id: id.clone() })
                    .await?
                    .into_inner();
            let st = cur.status.clone().unwrap_or_default();
            if let Some(pb) = &pb {
                pb.set_message(format!("{id}: {}", ctl::state_name(st.state)));
            }
            if st.ready {
                break;
            }
            if ctl::is_terminal(st.state) {
                if let Some(pb) = &pb {
                    pb.finish_and_clear();
                }
                return Err(CtlError::Failed(format!(
                    "VM {id} did not become ready: {} ({})",
                    ctl::state_name(st.state),
                    st.message
                )));
            }
            tokio::select! {
                _ = events.next() => {}
                () = tokio::time::sleep_until(deadline) => {
                    if let Some(pb) = &pb { pb.finish_and_clear(); }
                    return Err(CtlError::Timeout(format!(
                        "VM {id} was not ready after {} s (state {})", a.timeout, ctl::state_name(st.state))));
                }
                () = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    }
    if let Some(pb) = &pb {
        pb.finish_and_clear();
    }
    let vm =
        c.vm.get(grpc::GetVmRequest { id: id.clone() })
            .await?
            .into_inner();
    match out {
        Output::Table => {
            let st = vm.status.clone().unwrap_or_default();
            if a.no_wait {
                println!("{id} created");
            } else {
                println!(
                    "{id} ready in {:.1} ms (guest {:.1} ms after spawn), pid {}",
                    t0.elapsed().as_secs_f64() * 1e3,
                    st.ready_latency_us as f64 / 1e3,
                    st.pid
                );
            }
        }
        o => print_value(o, &ctl::vm_json(&vm)),
    }
    Ok(())
}

/// `cluster revoke` and `cluster revocations`: the revocation list after
/// the change.
async fn revocations(c: &mut Clients, out: Output, cmd: ClusterCmd) -> Result<(), CtlError> {
    let l = match cmd {
        ClusterCmd::Revoke {
            serial,
            cert,
            reason,
        } => {
            let (serial, name) = match (serial, cert) {
                (_, Some(p)) => {
                    let id = cell0_control::tls::CertId::of_pem_file(&p)?;
                    (id.serial, id.name)
                }
                (Some(s), None) => (s, String::new()),
                (None, None) => {
                    return Err(CtlError::Tls(cell0_control::tls::TlsError::Usage(
                        "cluster revoke: give --serial HEX or --cert PATH".into(),
                    )));
                }
            };
            c.cluster
                .revoke_cert(grpc::RevokeCertRequest {
                    serial,
                    name,
                    reason,
                })
                .await?
        }
        _ => {
            c.cluster
                .list_revocations(grpc::ListRevocationsRequest {})
                .await?
        }
    }
    .into_inner();
    match out {
        Output::Table => {
            let rows: Vec<Vec<String>> = l
                .revocations
                .iter()
                .map(|r| {
                    vec![
                        r.serial.clone(),
                        r.name.clone(),
                        ctl::age(r.revoked_at_ms),
                        r.revoked_by.clone(),
                        r.reason.clone(),
                    ]
                })
                .collect();
            print!(
                "{}",
                ctl::table(&["SERIAL", "NAME", "AGE", "BY", "REASON"], &rows)
            );
        }
        o => print_value(o, &ctl::revocations_json(&l)),
    }
    Ok(())
}

async fn dispatch(cli: Cli) -> Result<(), CtlError> {
    let out = cli.output;
    match cli.cmd {
        Cmd::Completion { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "cell0ctl",
                &mut std::io::stdout(),
            );
            return Ok(());
        }
        Cmd::ExitCodes => {
            println!("{EXIT_CODES}");
            return Ok(());
        }
        _ => {}
    }
    ctl::check_transport(
        &cli.endpoint,
        cli.tls_dir.as_deref(),
        cli.insecure_plaintext,
    )?;
    let mut c = ctl::connect_tls(&cli.endpoint, cli.tls_dir.as_deref()).await?;
    match cli.cmd {
        Cmd::Run(a) => run(&mut c, out, *a).await?,
        Cmd::Ps { labels } => {
            let vms =
                c.vm.list(grpc::ListVmsRequest {
                    label_selector: kv(&labels, "label")?,
                })
                .await?
                .into_inner()
                .vms;
            match out {
                Output::Table => print!("{}", ctl::vm_table(&vms)),
                o => print_value(
                    o,
                    &serde_json::Value::Array(vms.iter().map(ctl::vm_json).collect()),
                ),
            }
        }
        Cmd::Get { name } => {
            let vm =
                c.vm.get(grpc::GetVmRequest { id: name })
                    .await?
                    .into_inner();
            match out {
                Output::Table => {
                    print!("{}", ctl::vm_table(std::slice::from_ref(&vm)));
                    let st = vm.status.unwrap_or_default();
                    println!(
                        "message: {}\nhealth:  {}\nrun dir: {}",
                        st.message, st.health, st.run_dir
                    );
                }
                o => print_value(o, &ctl::vm_json(&vm)),
            }
        }
        Cmd::Logs {
            name,
            follow,
            tail,
            agent,
        } => {
            let source = if agent {
                grpc::LogSource::Agent
            } else {
                grpc::LogSource::Serial
            };
            let mut s =
                c.vm.logs(grpc::LogsRequest {
                    id: name,
                    follow,
                    tail_bytes: tail,
                    source: source.into(),
                })
                .await?
                .into_inner();
            let mut stdout = std::io::stdout();
            while let Some(chunk) = s.next().await {
                let chunk = chunk?;
                let _ = stdout.write_all(&chunk.data);
                let _ = stdout.flush();
            }
        }
        Cmd::Exec { name, command } => {
            let r =
                c.vm.exec(grpc::ExecRequest { id: name, command })
                    .await?
                    .into_inner();
            let _ = std::io::stdout().write_all(&r.stdout);
            let _ = std::io::stderr().write_all(&r.stderr);
            if r.exit_code != 0 {
                return Err(CtlError::Failed(format!(
                    "the command exited with {}",
                    r.exit_code
                )));
            }
        }
        Cmd::Stop { names } => {
            for n in names {
                let vm =
                    c.vm.stop(grpc::StopVmRequest { id: n.clone() })
                        .await?
                        .into_inner();
                match out {
                    Output::Table => println!("{n} stopping"),
                    o => print_value(o, &ctl::vm_json(&vm)),
                }
            }
        }
        Cmd::Rm { names } => {
            for n in &names {
                c.vm.delete(grpc::DeleteVmRequest { id: n.clone() }).await?;
                if out == Output::Table {
                    println!("{n} deleted");
                }
            }
        }
        Cmd::Attest { name } => {
            let r =
                c.vm.attest(grpc::AttestRequest { id: name.clone() })
                    .await?
                    .into_inner();
            match out {
                Output::Table => {
                    if r.trusted {
                        println!("{name}: trusted");
                    } else {
                        println!("{name}: REJECTED");
                        for f in &r.failures {
                            println!("  - {f}");
                        }
                    }
                    println!(
                        "nonce {}  AK {}{}",
                        hex::encode(&r.nonce),
                        r.ak_name,
                        if r.enrolled { "  (enrolled now)" } else { "" }
                    );
                    let mut pcrs: Vec<_> = r.pcrs.iter().collect();
                    pcrs.sort();
                    for (k, v) in pcrs {
                        println!("  PCR {k:>2} {v}");
                    }
                }
                o => {
                    let verdict: serde_json::Value =
                        serde_json::from_str(&r.verdict_json).unwrap_or_default();
                    print_value(
                        o,
                        &serde_json::json!({
                            "vm": name, "trusted": r.trusted, "failures": r.failures,
                            "nonce": hex::encode(&r.nonce), "ak_name": r.ak_name,
                            "pcrs": r.pcrs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect::<std::collections::BTreeMap<_, _>>(),
                            "enrolled": r.enrolled, "verdict": verdict,
                        }),
                    );
                }
            }
            if !r.trusted {
                return Err(CtlError::Failed(format!(
                    "attestation of {name} was rejected"
                )));
            }
        }
        Cmd::Events { name } => {
            let mut s =
                c.vm.watch(grpc::WatchRequest {
                    id: name.unwrap_or_default(),
                })
                .await?
                .into_inner();
            while let Some(ev) = s.next().await {
                let ev = ev?;
                match out {
                    Output::Table => println!(
                        "{}  {:<12} {:<9} {:<9} {}",
                        ev.time_ms,
                        ev.vm_id,
                        ev.kind,
                        ctl::state_name(ev.state),
                        ev.message
                    ),
                    _ => println!("{}", ctl::event_json(&ev)),
                }
            }
        }
        Cmd::Node { cmd: NodeCmd::List } => {
            let nodes = c
                .node
                .list(grpc::ListNodesRequest {})
                .await?
                .into_inner()
                .nodes;
            match out {
                Output::Table => {
                    let rows: Vec<Vec<String>> = nodes
                        .iter()
                        .map(|n| {
                            let cap = n.capacity.unwrap_or_default();
                            let used = n.allocated.unwrap_or_default();
                            vec![
                                n.id.clone(),
                                if n.drained {
                                    format!("{},drained", n.state)
                                } else {
                                    n.state.clone()
                                },
                                n.vms.to_string(),
                                format!("{}/{} (x{})", used.vcpus, cap.vcpus, n.cpu_overcommit),
                                format!(
                                    "{}/{} (x{})",
                                    used.memory_mib, cap.memory_mib, n.memory_overcommit
                                ),
                                format!("{}/{}", n.zone, n.region),
                                n.address.clone(),
                            ]
                        })
                        .collect();
                    print!(
                        "{}",
                        ctl::table(
                            &[
                                "NODE",
                                "STATE",
                                "VMS",
                                "VCPUS",
                                "MEMORY MIB",
                                "ZONE/REGION",
                                "ADDRESS"
                            ],
                            &rows
                        )
                    );
                }
                o => print_value(
                    o,
                    &serde_json::Value::Array(nodes.iter().map(ctl::node_json).collect()),
                ),
            }
        }
        Cmd::Node {
            cmd: NodeCmd::Drain { node },
        } => {
            let r = c
                .node
                .drain(grpc::DrainNodeRequest { id: node.clone() })
                .await?
                .into_inner();
            match out {
                Output::Table => {
                    println!("node {node} drained: it takes no new VMs");
                    for m in &r.moved {
                        println!("  moved {} -> {}", m.id, m.to);
                    }
                    for s in &r.stayed {
                        println!("  stays {}: {}", s.id, s.reason);
                    }
                    if r.moved.is_empty() && r.stayed.is_empty() {
                        println!("  no VMs were on it");
                    }
                }
                o => print_value(
                    o,
                    &serde_json::json!({
                        "node": r.node.as_ref().map(ctl::node_json),
                        "moved": r.moved.iter().map(|m| serde_json::json!({"id": m.id, "from": m.from, "to": m.to})).collect::<Vec<_>>(),
                        "stayed": r.stayed.iter().map(|s| serde_json::json!({"id": s.id, "reason": s.reason})).collect::<Vec<_>>(),
                    }),
                ),
            }
            let stuck: Vec<&str> = r
                .stayed
                .iter()
                .filter(|s| s.reason.starts_with("nowhere else fits"))
                .map(|s| s.id.as_str())
                .collect();
            if !stuck.is_empty() {
                return Err(CtlError::from(tonic::Status::failed_precondition(format!(
                    "node {node} is drained, but {} restartable VM{} could not move (nowhere else \
                     fits): {}",
                    stuck.len(),
                    if stuck.len() == 1 { "" } else { "s" },
                    stuck.join(", ")
                ))));
            }
        }
        Cmd::Node {
            cmd: NodeCmd::Uncordon { node },
        } => {
            let n = c
                .node
                .uncordon(grpc::UncordonNodeRequest { id: node.clone() })
                .await?
                .into_inner();
            match out {
                Output::Table => println!("node {node} takes new VMs again"),
                o => print_value(o, &ctl::node_json(&n)),
            }
        }
        Cmd::Cluster { cmd } => {
            let s = match cmd {
                ClusterCmd::Status => c.cluster.status(grpc::ClusterStatusRequest {}).await?,
                ClusterCmd::Add { id, address } => {
                    c.cluster
                        .add_member(grpc::AddMemberRequest { id, address })
                        .await?
                }
                ClusterCmd::Remove { id } => {
                    c.cluster
                        .remove_member(grpc::RemoveMemberRequest { id })
                        .await?
                }
                cmd @ (ClusterCmd::Revoke { .. } | ClusterCmd::Revocations) => {
                    return revocations(&mut c, out, cmd).await;
                }
            }
            .into_inner();
            match out {
                Output::Table => {
                    println!(
                        "member {} ({}), leader {} {}, term {}\nlog: last {}, applied {}, snapshot {}, purged {}\nstate: {} VMs, {} nodes",
                        s.node_id,
                        s.state,
                        s.leader_id,
                        s.leader_address,
                        s.term,
                        s.last_log_index,
                        s.last_applied,
                        s.snapshot_index,
                        s.purged_index,
                        s.vms,
                        s.nodes
                    );
                    for m in &s.members {
                        println!(
                            "  member {} {} {}",
                            m.id,
                            m.address,
                            if m.voter { "voter" } else { "learner" }
                        );
                    }
                }
                o => print_value(o, &ctl::cluster_json(&s)),
            }
        }
        Cmd::Completion { .. } | Cmd::ExitCodes => {}
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cell0ctl: error: cannot start the runtime: {e}");
            return ExitCode::from(exit::ERROR);
        }
    };
    match rt.block_on(dispatch(cli)) {
        Ok(()) => ExitCode::from(exit::OK),
        Err(e) => {
            eprintln!("cell0ctl: error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
