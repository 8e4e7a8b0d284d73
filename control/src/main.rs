// SPDX-License-Identifier: Apache-2.0
//! `cell0d`: the host daemon. Subcommands: `router` (the SYPAS router),
//! `keys` (root key management) and `token` (mint, attenuate, verify).
#![allow(clippy::print_stdout)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use cell0_control::router::{HOST_VM, Router, RouterConfig};
use cell0_control::token::keys::{KeyStore, unix_now};
use cell0_control::token::{Attenuation, Claims, Verifier, attenuate};
use cell0_proto::host::ServerConfig;
use cell0_proto::msg::Right;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cell0d", version, about = "The cell0 host daemon")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the embedded single-node control plane: gRPC API, Raft store, node agent, metrics.
    Serve(Box<cell0_control::serve::ServeArgs>),
    /// Run a node agent on a host with no control-plane member: register with
    /// the members, heartbeat, run the VMs placed here.
    Node(Box<cell0_control::node::remote::NodeArgs>),
    /// Run the SYPAS router.
    Router(RouterArgs),
    /// Manage the root keys of the capability tokens.
    #[command(subcommand)]
    Keys(KeysCmd),
    /// Mint, attenuate or verify capability tokens.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Make a cluster CA for mutual TLS between members, nodes and cell0ctl:
    /// DIR/ca.pem and DIR/ca.key (keep ca.key off the members).
    #[command(after_help = "Example (docs/CLUSTER.md, Security):
  cell0d init-ca --out /etc/cell0/ca
  cell0d issue-cert --ca /etc/cell0/ca --name m1 --role member --san 10.0.0.1 --out /etc/cell0/m1
  cell0d serve --tls-dir /etc/cell0/m1 ...
A member started with `serve --init` and no --tls-dir makes its own CA in
<data-dir>/pki instead; issue certificates from it with --ca-dir <data-dir>/pki.")]
    InitCa {
        /// The CA dir (created; an existing CA is never overwritten).
        #[arg(long)]
        out: PathBuf,
        /// Lifetime in days.
        #[arg(long, default_value_t = cell0_control::tls::CA_DAYS)]
        days: u32,
    },
    /// Issue a certificate signed by the cluster CA (a member's, a node's or a
    /// client's): writes OUT/ca.pem, OUT/cert.pem and OUT/key.pem, a TLS dir
    /// for `serve --tls-dir` and `cell0ctl --tls-dir`.
    IssueCert {
        /// The CA dir of `cell0d init-ca`, or `<data-dir>/pki` of the member
        /// that created the cluster CA at `cell0d serve --init`.
        #[arg(long, visible_alias = "ca-dir")]
        ca: PathBuf,
        /// The subject's name (CN): member, node or client name. A node is
        /// admitted only under its own name.
        #[arg(long)]
        name: String,
        /// What the certificate may do: `member` (Raft and all), `node` (a
        /// node agent: admission, registration, the API), `client` (the API
        /// and cluster membership, e.g. cell0ctl).
        #[arg(long, value_enum)]
        role: cell0_control::tls::Role,
        /// An IP address or DNS name the holder is dialled at (repeatable or
        /// comma-separated): a member's --advertise/--listen host.
        #[arg(long, value_delimiter = ',')]
        san: Vec<String>,
        /// The TLS dir to write.
        #[arg(long)]
        out: PathBuf,
        /// Lifetime in days.
        #[arg(long, default_value_t = cell0_control::tls::CERT_DAYS)]
        days: u32,
    },
}

#[derive(clap::Args)]
struct RouterArgs {
    /// The host socket (VM `host`).
    #[arg(long)]
    socket: PathBuf,
    /// The data dir (root keys; audit.log by default).
    #[arg(long)]
    data_dir: PathBuf,
    /// A VM to serve: `ID=SOCKET[,api=API_SOCKET]` (SOCKET is normally
    /// `<vsock_uds>_1024`; the API socket hands over the shm window). Repeatable.
    #[arg(long = "vm", value_name = "ID=SOCKET[,api=PATH]")]
    vms: Vec<String>,
    /// The audit log (default `<data-dir>/audit.log`).
    #[arg(long)]
    audit_log: Option<PathBuf>,
    /// Frames queued per connection; a subscriber that falls this far behind is dropped.
    #[arg(long, default_value_t = 4096)]
    outbound_queue: usize,
    /// Timeout of CALLs forwarded to agents and host service processes, in ms.
    #[arg(long, default_value_t = 30_000)]
    forward_timeout_ms: u64,
    /// Do not register the built-in `echo` service.
    #[arg(long)]
    no_echo: bool,
    /// Worker threads (default: tokio's choice, one per core).
    #[arg(long)]
    threads: Option<usize>,
}

#[derive(Subcommand)]
enum KeysCmd {
    /// Create the root key and the key ring if they do not exist.
    Init {
        #[arg(long)]
        data_dir: PathBuf,
        /// The longest lifetime of a token, in seconds (only when creating).
        #[arg(long, default_value_t = cell0_control::token::keys::DEFAULT_MAX_TOKEN_TTL)]
        max_token_ttl: u64,
    },
    /// Make a new signing key; the old one verifies its tokens until they expire.
    Rotate {
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Print the key ring (public keys) as JSON.
    Show {
        #[arg(long)]
        data_dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Mint a token with the data dir's root key.
    Mint {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        agent: String,
        /// The VM id, `host` for the router's own socket, or `*`.
        #[arg(long, default_value = HOST_VM)]
        vm: String,
        /// A right `SERVICE,METHOD` (patterns: `*`, `prefix*`). Repeatable.
        #[arg(long = "right", value_name = "SERVICE,METHOD")]
        rights: Vec<String>,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
        /// Write the raw token here instead of base64 to stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Append an attenuation block (no key needed).
    Attenuate {
        /// The token (raw or base64).
        #[arg(long)]
        token: PathBuf,
        #[arg(long = "right", value_name = "SERVICE,METHOD")]
        rights: Vec<String>,
        /// New lifetime from now, in seconds (must not outlive the token).
        #[arg(long)]
        ttl: Option<u64>,
        /// A sub-agent id `<agent>/<suffix>`.
        #[arg(long)]
        agent: Option<String>,
        #[arg(long)]
        vm: Option<String>,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Verify a token against the data dir's key ring and print its claims.
    Verify {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        token: PathBuf,
    },
}

fn parse_right(s: &str) -> anyhow::Result<Right> {
    let (service, method) = s
        .split_once(',')
        .with_context(|| format!("right {s:?} is not SERVICE,METHOD"))?;
    Ok(Right::new(service, method))
}

fn read_token(path: &Path) -> anyhow::Result<Vec<u8>> {
    let raw = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    if let Ok(text) = std::str::from_utf8(&raw) {
        if let Ok(t) = biscuit_auth::UnverifiedBiscuit::from_base64(text.trim()) {
            return t.to_vec().map_err(|e| anyhow::anyhow!("{e}"));
        }
    }
    Ok(raw)
}

fn write_token(token: &[u8], out: Option<&Path>) -> anyhow::Result<()> {
    match out {
        Some(p) => {
            std::fs::write(p, token).with_context(|| format!("cannot write {}", p.display()))
        }
        None => {
            let b64 = biscuit_auth::UnverifiedBiscuit::from(token)
                .and_then(|t| t.to_base64())
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            println!("{b64}");
            Ok(())
        }
    }
}

/// `ID=SOCKET[,api=PATH]`.
fn parse_vm(s: &str) -> anyhow::Result<(String, PathBuf, Option<PathBuf>)> {
    let (id, rest) = s
        .split_once('=')
        .with_context(|| format!("--vm {s:?} is not ID=SOCKET[,api=PATH]"))?;
    let mut parts = rest.split(',');
    let socket = parts
        .next()
        .filter(|p| !p.is_empty())
        .context("--vm needs a socket path")?;
    let mut api = None;
    for p in parts {
        match p.split_once('=') {
            Some(("api", path)) if !path.is_empty() => api = Some(PathBuf::from(path)),
            _ => bail!("--vm {s:?}: unknown option {p:?}"),
        }
    }
    Ok((id.to_owned(), PathBuf::from(socket), api))
}

async fn run_router(args: RouterArgs) -> anyhow::Result<()> {
    let mut config = RouterConfig::new(args.data_dir.clone());
    config.audit_log = args.audit_log;
    config.forward_timeout = Duration::from_millis(args.forward_timeout_ms);
    config.server = ServerConfig {
        outbound_queue: args.outbound_queue.max(1),
        ..ServerConfig::default()
    };
    config.echo = !args.no_echo;
    let router = Router::new(config).context("cannot start the router")?;
    router
        .listen_host(&args.socket)
        .await
        .context("cannot listen on the host socket")?;
    for vm in &args.vms {
        let (id, socket, api) = parse_vm(vm)?;
        let info = router
            .attach_vm(&id, &socket, api.as_deref())
            .await
            .with_context(|| format!("cannot attach VM {id}"))?;
        tracing::info!(?info, "serving VM");
    }
    println!("listening on {}", args.socket.display());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    router.shutdown().await;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Serve(args) => Ok(tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(cell0_control::serve::serve_main(*args))?),
        Cmd::Node(args) => Ok(tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(cell0_control::node::remote::node_main(*args))?),
        Cmd::Router(args) => {
            let mut rt = tokio::runtime::Builder::new_multi_thread();
            if let Some(n) = args.threads {
                rt.worker_threads(n.max(1));
            }
            rt.enable_all().build()?.block_on(run_router(args))
        }
        Cmd::Keys(KeysCmd::Init {
            data_dir,
            max_token_ttl,
        }) => {
            let ks = KeyStore::open_with(&data_dir, max_token_ttl, unix_now())?;
            println!("{:#010x}", ks.signing_key_id());
            Ok(())
        }
        Cmd::Keys(KeysCmd::Rotate { data_dir }) => {
            let mut ks = KeyStore::open(&data_dir)?;
            let id = ks.rotate(unix_now())?;
            println!("{id:#010x}");
            Ok(())
        }
        Cmd::Keys(KeysCmd::Show { data_dir }) => {
            let ks = KeyStore::open(&data_dir)?;
            let keys: Vec<_> = ks.ring().entries().cloned().collect();
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({
                    "signing_key_id": ks.signing_key_id(),
                    "max_token_ttl": ks.ring().max_token_ttl(),
                    "keys": keys,
                }))?
            );
            Ok(())
        }
        Cmd::Token(TokenCmd::Mint {
            data_dir,
            agent,
            vm,
            rights,
            ttl,
            out,
        }) => {
            let ks = KeyStore::open(&data_dir)?;
            let rights = rights
                .iter()
                .map(|r| parse_right(r))
                .collect::<Result<_, _>>()?;
            let claims = Claims {
                agent,
                vm,
                rights,
                expires: unix_now() + ttl,
            };
            let token = ks.minter().mint(&claims)?;
            write_token(&token, out.as_deref())
        }
        Cmd::Token(TokenCmd::Attenuate {
            token,
            rights,
            ttl,
            agent,
            vm,
            out,
        }) => {
            let token = read_token(&token)?;
            let rights: Vec<Right> = rights
                .iter()
                .map(|r| parse_right(r))
                .collect::<Result<_, _>>()?;
            let a = Attenuation {
                rights: (!rights.is_empty()).then_some(rights),
                expires: ttl.map(|t| unix_now() + t),
                agent,
                vm,
            };
            let narrower = attenuate(&token, &a)?;
            write_token(&narrower, out.as_deref())
        }
        Cmd::Token(TokenCmd::Verify { data_dir, token }) => {
            let token = read_token(&token)?;
            let ring =
                cell0_control::token::keys::RingSource::watch(&KeyStore::ring_path(&data_dir))?;
            let verifier = Arc::new(Verifier::new(ring));
            match verifier.verify(&token) {
                Ok(v) => {
                    let c = v.claims;
                    println!(
                        "{}",
                        serde_json::json!({
                            "agent": c.agent, "vm": c.vm, "expires": c.expires,
                            "rights": c.rights.iter().map(|r| [&r.service, &r.method]).collect::<Vec<_>>(),
                            "root_key_id": v.root_key_id, "blocks": v.blocks,
                        })
                    );
                    Ok(())
                }
                Err(e) => bail!("{} ({})", e, e.code().name()),
            }
        }
        Cmd::InitCa { out, days } => {
            let p = cell0_control::tls::init_ca(&out, days)?;
            println!("{}", p.display());
            Ok(())
        }
        Cmd::IssueCert {
            ca,
            name,
            role,
            san,
            out,
            days,
        } => {
            let req = cell0_control::tls::CertRequest::new(&name, role, &san, days);
            cell0_control::tls::issue_cert(&ca, &req, &out)?;
            println!("{}", out.display());
            Ok(())
        }
    }
}
