// SPDX-License-Identifier: Apache-2.0
//! `cell0-vmm`: runs one micro-VM in the foreground.
//!
//! Exit status: 0 when the guest resets or powers off, 2 when the guest
//! crashes, 3 when the VM's lease (`--lease-ms`) ended and it was fenced, 1
//! on any VMM error (with a one-line reason on stderr).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use cell0_vmm::config::{DiskConfig, KernelSource, SerialOutput, VmConfig};
use cell0_vmm::exit::StopReason;
use cell0_vmm::jail::{JailArgs, Jailed};
use cell0_vmm::lease::EXIT_LEASE_EXPIRED;
use cell0_vmm::seccomp;
use cell0_vmm::tpm::TpmConfig;
use cell0_vmm::vm::{Vm, VmError};
use clap::{Parser, Subcommand};

/// Exit status when the guest crashed.
const EXIT_GUEST_CRASH: u8 = 2;

#[derive(Parser, Debug)]
#[command(
    name = "cell0-vmm",
    version,
    about = "The cell0 micro-VM monitor: one KVM VM per process"
)]
struct Cli {
    /// Log filter (error, warn, info, debug, trace, or a tracing EnvFilter directive).
    #[arg(long, global = true, default_value = "warn")]
    log_level: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Boot a VM and run it until the guest resets, powers off or crashes.
    #[command(
        after_help = "Examples:\n  cell0-vmm launch                                  # the built-in nano guest\n  cell0-vmm launch --cmdline cell0.test=smp --vcpus 2\n  cell0-vmm launch --kernel vmlinux --initrd initrd.img --memory-mib 512"
    )]
    Launch(Box<LaunchArgs>),
    /// Write the built-in nano guest ELF to a file.
    NanoImage {
        /// Output path.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(clap::Args, Debug)]
struct LaunchArgs {
    /// Kernel image (ELF or bzImage). Without it, the built-in nano guest boots.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line (default: "console=ttyS0 reboot=k panic=1 pci=off").
    #[arg(long)]
    cmdline: Option<String>,
    /// Number of vCPUs (1-32).
    #[arg(long, default_value_t = 1)]
    vcpus: u64,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 128)]
    memory_mib: u64,
    /// Serial console output: "stdout" or a file path.
    #[arg(long, default_value = "stdout")]
    serial: SerialOutput,
    /// Host Unix socket of the hybrid virtio-vsock device (with --cid). Host
    /// processes connect to it and send "CONNECT <port>"; guest connections to
    /// port P go to "<PATH>_P".
    #[arg(long, requires = "cid")]
    vsock_uds: Option<PathBuf>,
    /// Guest vsock context id (3 or more; with --vsock-uds).
    #[arg(long, requires = "vsock_uds")]
    cid: Option<u64>,
    /// Shared-memory window in MiB, mapped above guest RAM and passed to the router
    /// over the API socket (0: none).
    #[arg(long, default_value_t = 0)]
    shm_mib: u64,
    /// Per-VM API socket (JSON lines: describe, stop, lease, and with --tpm ak, activate, quote).
    #[arg(long)]
    api_sock: Option<PathBuf>,
    /// Measured boot: start a swtpm vTPM for this VM and extend PCRs 0/4/8/9/11/12
    /// before the first vCPU runs (needs --run-dir).
    #[arg(long, requires = "run_dir")]
    tpm: bool,
    /// The VM's run directory (vTPM state, event log).
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// Agent id, measured into PCR 12.
    #[arg(long, default_value = "")]
    agent_id: String,
    /// Workload command word, measured into PCR 12 (repeat for each argument).
    #[arg(long = "command", allow_hyphen_values = true)]
    command: Vec<String>,
    /// A virtio-blk disk backed by an image file: PATH, PATH,ro or PATH,rw
    /// (repeat for more disks; Linux names them vda, vdb, … in this order).
    #[arg(long = "disk", value_name = "PATH[,ro]")]
    disks: Vec<DiskConfig>,
    /// Give the guest a virtio-rng device (entropy from the host's getrandom).
    #[arg(long)]
    rng: bool,
    /// Fence the VM unless its lease is renewed: it ends this many ms after the
    /// VMM starts; `{"op":"lease","deadline_ns":D}` on --api-sock moves it to
    /// D (CLOCK_MONOTONIC ns). When it ends the guest stops and cell0-vmm
    /// exits 3 (1-3600000).
    #[arg(long, value_name = "MS")]
    lease_ms: Option<u64>,
    /// Debugging only: run without the per-thread seccomp filters (logs a warning).
    #[arg(long)]
    no_seccomp: bool,
    #[command(flatten)]
    jail: JailArgs,
}

fn init_logging(level: &str) -> anyhow::Result<()> {
    // tss-esapi logs every context open/close at info: keep it at warn unless asked.
    let directives = if level.contains("tss_esapi") {
        level.to_string()
    } else {
        format!("{level},tss_esapi=warn")
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&directives)
        .map_err(|e| anyhow::anyhow!("invalid --log-level {level:?}: {e}"))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    Ok(())
}

fn run(cli: Cli, start_ns: u64) -> anyhow::Result<ExitCode> {
    init_logging(&cli.log_level)?;
    tracing::info!(
        elapsed_us = cell0_vmm::since_start_us(),
        "milestone: process start"
    );
    match cli.cmd {
        Cmd::Launch(a) => {
            let LaunchArgs {
                kernel,
                initrd,
                cmdline,
                vcpus,
                memory_mib,
                serial,
                vsock_uds,
                cid,
                api_sock,
                shm_mib,
                tpm,
                run_dir,
                agent_id,
                command,
                disks,
                rng,
                lease_ms,
                no_seccomp,
                jail,
            } = *a;
            if no_seccomp {
                tracing::warn!(
                    "seccomp filters are off (--no-seccomp): use this for debugging only"
                );
                seccomp::disable();
            } else {
                // A data file that does not compile stops the VMM before it builds anything.
                seccomp::prepare()?;
            }
            let kernel = kernel.map_or(KernelSource::Nano, KernelSource::Path);
            let cfg = VmConfig::new(kernel, initrd, cmdline, vcpus, memory_mib, serial)?
                .with_vsock(vsock_uds, cid)?
                .with_shm(shm_mib)?
                .with_lease(lease_ms, start_ns)?;
            let tpm = match (tpm, run_dir) {
                (true, Some(run_dir)) => Some(TpmConfig {
                    run_dir,
                    agent_id,
                    command,
                }),
                _ => None,
            };
            let cfg = VmConfig {
                api_sock,
                shm_mib,
                tpm,
                disks,
                rng,
                ..cfg
            };
            let mut vtpm = None;
            let cfg = if jail.jail {
                let cfg = cell0_vmm::jail::absolutize(&cfg)?;
                match cell0_vmm::jail::launch(&jail, &cfg)? {
                    Jailed::Supervisor(code) | Jailed::Done(code) => return Ok(code),
                    Jailed::Inside(pending) => vtpm = pending,
                }
                cfg
            } else {
                cfg
            };
            // A stop or the end of the lease during the build ends the VMM
            // (before any guest instruction) as it would after.
            let reason = match Vm::build_with_vtpm(&cfg, vtpm) {
                Ok(vm) => vm.run()?,
                Err(VmError::EndedDuringBuild(r)) => r,
                Err(e) => return Err(e.into()),
            };
            if reason.is_clean() {
                Ok(ExitCode::SUCCESS)
            } else if reason == StopReason::LeaseExpired {
                eprintln!("cell0-vmm: {reason}");
                Ok(ExitCode::from(EXIT_LEASE_EXPIRED))
            } else {
                eprintln!("cell0-vmm: {reason}");
                Ok(ExitCode::from(EXIT_GUEST_CRASH))
            }
        }
        Cmd::NanoImage { out } => {
            std::fs::write(&out, cell0_vmm::nano::NANO_ELF)
                .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", out.display()))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn main() -> ExitCode {
    cell0_vmm::mark_start();
    // The lease (--lease-ms) counts from here.
    let start_ns = cell0_vmm::lease::monotonic_ns();
    // A usage error exits 1 like every other VMM error; 2 means the guest crashed.
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match run(cli, start_ns) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cell0-vmm: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
