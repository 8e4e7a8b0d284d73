// SPDX-License-Identifier: Apache-2.0
//! `cell0-rootfs`: builds cell0 agent images.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use cell0_rootfs::image::{self, BuildOptions, Devices, KernelChoice};
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "cell0-rootfs",
    version,
    about = "Builds cell0 agent images: kernel, initramfs, manifest"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Build an image: OUT/vmlinuz, OUT/initrd.img, OUT/cmdline, OUT/manifest.json, OUT/contents.json.
    #[command(after_help = "Examples:\n  \
        cell0-rootfs build --out img --kernel bzImage --kernel-config config\n  \
        cell0-rootfs build --out img --add ./tools:/opt/tools --append 'cell0.log=debug'\n  \
        cell0-rootfs build --out img                 # kernel from linux-image-cloud-amd64")]
    Build(Box<BuildArgs>),
    /// Build the minimal guest kernel from Debian's linux-source package.
    Kernel {
        /// Output directory (bzImage, config).
        #[arg(long)]
        out: PathBuf,
        /// Source package.
        #[arg(long, default_value = cell0_rootfs::minimal::DEFAULT_SOURCE)]
        source_package: String,
        /// Parallel make jobs (default: the number of CPUs).
        #[arg(long)]
        jobs: Option<usize>,
    },
}

#[derive(clap::Args, Debug)]
struct BuildArgs {
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// Image name (in the manifest and /etc/hostname).
    #[arg(long, default_value = "cell0-agent")]
    name: String,
    /// Kernel image file (bzImage or vmlinux) instead of a Debian package.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// The kernel's .config, to check it (with --kernel).
    #[arg(long, requires = "kernel")]
    kernel_config: Option<PathBuf>,
    /// The kernel's module tree, /lib/modules/VERSION (with --kernel).
    #[arg(long, requires = "kernel")]
    modules_dir: Option<PathBuf>,
    /// Debian kernel package (or metapackage) to fetch with apt-get download.
    #[arg(
        long,
        default_value = "linux-image-cloud-amd64",
        conflicts_with = "kernel"
    )]
    kernel_package: String,
    /// Build even if the kernel lacks what cell0 guests need (prints warnings).
    #[arg(long)]
    allow_unsuitable_kernel: bool,
    /// busybox binary (static). Default: the busybox-static package's.
    #[arg(long)]
    busybox: Option<PathBuf>,
    /// Guest agent binary (static). Default: the one built into cell0-rootfs.
    #[arg(long)]
    agent: Option<PathBuf>,
    /// Add a host file or directory at an absolute guest path (repeat).
    #[arg(long = "add", value_name = "SRC:DST")]
    adds: Vec<String>,
    /// Words appended to the command line ("console=ttyS0 reboot=k panic=1 pci=off").
    #[arg(long, default_value = "")]
    append: String,
    /// The VM will have no vsock device (no SYPAS).
    #[arg(long)]
    no_vsock: bool,
    /// The VM will have no virtio-rng device.
    #[arg(long)]
    no_rng: bool,
    /// The VM's number of --disk devices.
    #[arg(long, default_value_t = 0)]
    disks: u32,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
}

fn source_date_epoch() -> u32 {
    std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Build(a) => {
            let adds = a
                .adds
                .iter()
                .map(|s| image::parse_add(s))
                .collect::<Result<Vec<_>, _>>()?;
            let kernel = match a.kernel {
                Some(image) => KernelChoice::Path {
                    image,
                    config: a.kernel_config,
                    modules_dir: a.modules_dir,
                },
                None => KernelChoice::Debian(a.kernel_package),
            };
            let o = BuildOptions {
                out: a.out,
                name: a.name,
                kernel,
                allow_unsuitable_kernel: a.allow_unsuitable_kernel,
                busybox: a.busybox,
                agent: a.agent,
                adds,
                append: a.append,
                devices: Devices {
                    vsock: !a.no_vsock,
                    disks: a.disks,
                    rng: !a.no_rng,
                },
                mtime: source_date_epoch(),
                progress: !a.quiet && std::io::stderr().is_terminal(),
            };
            let b = image::build(&o)?;
            for w in &b.warnings {
                eprintln!("cell0-rootfs: warning: {w}");
            }
            let mut out = std::io::stdout().lock();
            use std::io::Write;
            writeln!(out, "kernel   {}", b.kernel.display())?;
            writeln!(out, "initrd   {}", b.initrd.display())?;
            writeln!(out, "manifest {}", b.manifest.display())?;
            writeln!(out, "contents {}", b.contents.display())?;
            writeln!(out, "cmdline  {}", b.cmdline)?;
            writeln!(out, "guest cmdline (measured) {}", b.full_cmdline)?;
            Ok(())
        }
        Cmd::Kernel {
            out,
            source_package,
            jobs,
        } => {
            let jobs =
                jobs.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
            std::fs::create_dir_all(&out)
                .with_context(|| format!("cannot create {}", out.display()))?;
            let work = tempfile::Builder::new()
                .prefix(".cell0-kernel-")
                .tempdir_in(&out)
                .context("cannot create a work directory")?;
            let k = cell0_rootfs::minimal::build(&source_package, work.path(), &out, jobs, &|m| {
                eprintln!("cell0-rootfs: {m}");
            })?;
            let mut out = std::io::stdout().lock();
            use std::io::Write;
            writeln!(out, "kernel {}", k.image.display())?;
            writeln!(out, "config {}", k.config.display())?;
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cell0-rootfs: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
