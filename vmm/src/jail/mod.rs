// SPDX-License-Identifier: Apache-2.0
//! The jail: `cell0-vmm launch --jail --uid U --gid G [--jail-root DIR]`.
//!
//! `cell0-vmm` starts as root and splits in two:
//!
//! - the **supervisor** (the process that was started) creates the VM's cgroup
//!   with its CPU, memory and PID limits, forks the VMM into a new PID namespace,
//!   moves it into the cgroup, waits for it, forwards SIGINT/SIGTERM/SIGHUP as
//!   SIGKILL, and removes the cgroup and the jail directory when it is gone. Its
//!   exit status is the VMM's (128 + N when the VMM died of signal N).
//! - the **VMM** (PID 1 of its namespace) enters the jail ([`enter`]) and then
//!   builds and runs the VM as usual.
//!
//! The steps inside, in order (each error names its step):
//!
//! 1. new mount, IPC, UTS and network namespaces (the VM has no network device,
//!    so the namespace holds only a loopback interface), hostname `cell0`;
//! 2. all mounts made private; a small tmpfs on the per-VM directory becomes the
//!    new root. It holds only what the VMM opens at run time, each bind-mounted at
//!    its host path: the kernel and initrd (read-only), disk images (read-only
//!    unless `,rw`), the serial output file, the directories of the API and vsock
//!    sockets, the `--run-dir` with `--tpm`, and `/dev/kvm` (a fresh device node
//!    owned by the VMM's uid). Nothing else: no `/etc`, no `/proc` (unless
//!    `--tpm`: measured boot hashes `/proc/self/exe`), no `/dev/net/tun`;
//! 3. with `--tpm`: swtpm is manufactured and started here, before `pivot_root`,
//!    because swtpm_setup needs host programs and the host CA. It runs in the
//!    VM's PID, network, IPC, UTS and mount namespaces and cgroup, under its own
//!    seccomp profile; after `pivot_root` it too sees only the jail and its state
//!    directory. It keeps running as root (see docs/SECURITY.md);
//! 4. `pivot_root` into the per-VM directory, the old root detached, the new
//!    root remounted read-only;
//! 5. rlimits: open files, file size, no core dumps;
//! 6. every capability dropped from the bounding set, supplementary groups
//!    cleared, gid and uid set to `--gid`/`--uid`, ambient and inheritable
//!    capabilities cleared, `PR_SET_NO_NEW_PRIVS`; then the result is checked.
//!
//! The seccomp filters of [`crate::seccomp`] are installed by each thread after
//! that, as without a jail.

pub mod cgroup;
mod enter;
mod selfcheck;

use std::collections::BTreeSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::config::{KernelSource, SerialOutput, VmConfig};
use crate::tpm::PendingVtpm;
pub use cgroup::{Cgroup, CgroupVersion, Limits};

/// Where per-VM jail directories go by default (`<this>/<pid>`).
pub const DEFAULT_JAIL_BASE: &str = "/run/cell0/jail";
/// Extra memory the cgroup allows beyond guest RAM and the shm window, in MiB.
pub const MEMORY_OVERHEAD_MIB: u64 = 256;
/// Threads and processes allowed beyond one per vCPU.
pub const EXTRA_PIDS: u64 = 16;
/// The CPU accounting period.
pub const CPU_PERIOD_US: u64 = 100_000;
/// Default `RLIMIT_NOFILE`.
pub const DEFAULT_NOFILE: u64 = 4096;
/// Default `RLIMIT_FSIZE` when no disk is bigger, in MiB.
pub const DEFAULT_FSIZE_MIB: u64 = 1024;
/// The hostname inside the jail.
pub const HOSTNAME: &str = "cell0";

/// Errors of the jail. Each names the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// An OS call failed.
    #[error("jail: cannot {step}")]
    Step {
        /// What was being done.
        step: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// A step cannot be done here, for the reason given.
    #[error("jail: cannot {step}: {why}")]
    Refused {
        /// What was being done.
        step: String,
        /// Why it cannot be done.
        why: String,
    },
    /// The vTPM could not be started inside the jail's namespaces.
    #[error("jail: cannot start the vTPM before pivot_root")]
    Tpm(#[source] crate::tpm::TpmError),
}

pub(crate) fn step_err(step: impl Into<String>) -> impl FnOnce(std::io::Error) -> JailError {
    let step = step.into();
    move |source| JailError::Step { step, source }
}

pub(crate) fn refused(step: impl Into<String>, why: impl Into<String>) -> JailError {
    JailError::Refused {
        step: step.into(),
        why: why.into(),
    }
}

/// The jail options of `cell0-vmm launch`.
#[derive(clap::Args, Debug, Clone, Default, PartialEq, Eq)]
pub struct JailArgs {
    /// Run the VMM in a jail: new mount, PID, IPC, UTS and network namespaces,
    /// pivot_root into a per-VM directory, cgroup limits, rlimits, an
    /// unprivileged uid/gid and no capabilities (see docs/SECURITY.md). Must
    /// start as root.
    #[arg(long, requires_all = ["uid", "gid"])]
    pub jail: bool,
    /// With --jail: the uid the VMM runs as (not 0).
    #[arg(long, requires = "jail")]
    pub uid: Option<u32>,
    /// With --jail: the gid the VMM runs as (not 0).
    #[arg(long, requires = "jail")]
    pub gid: Option<u32>,
    /// With --jail: the per-VM jail directory (new, or empty), which becomes the
    /// VMM's root [default: /run/cell0/jail/<pid>].
    #[arg(long, requires = "jail")]
    pub jail_root: Option<PathBuf>,
    /// With --jail: the cgroup interface, 1 or 2 [default: 2 when it offers the
    /// cpu, memory and pids controllers, else 1].
    #[arg(long, requires = "jail")]
    pub cgroup_version: Option<CgroupVersion>,
    /// With --jail: the cgroup's memory limit in MiB [default: guest memory +
    /// shm window + 256].
    #[arg(long, requires = "jail")]
    pub jail_memory_mib: Option<u64>,
    /// With --jail: the cgroup's CPU limit, in percent of one CPU [default:
    /// 100 per vCPU plus 100 for the VMM thread].
    #[arg(long, requires = "jail")]
    pub jail_cpu_pct: Option<u64>,
    /// With --jail: the cgroup's limit on threads and processes [default:
    /// vCPUs + 16].
    #[arg(long, requires = "jail")]
    pub jail_pids: Option<u64>,
    /// With --jail: RLIMIT_NOFILE, the most open files [default: 4096].
    #[arg(long, requires = "jail")]
    pub jail_nofile: Option<u64>,
    /// With --jail: RLIMIT_FSIZE in MiB, the largest file the VMM may write
    /// [default: the largest disk, at least 1024].
    #[arg(long, requires = "jail")]
    pub jail_fsize_mib: Option<u64>,
    /// Tests and debugging: enter the jail, print what the VMM sees there as
    /// one JSON line, wait until stdin closes, and exit.
    #[arg(long, hide = true, requires = "jail")]
    pub jail_selfcheck: bool,
}

/// How a host path is shown inside the jail (always at the same path).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Exposure {
    /// A directory the VMM creates sockets in (read-write).
    Dir(PathBuf),
    /// The `--tpm` run directory (read-write): swtpm keeps its state there and
    /// the VMM writes the event log into `<dir>/vtpm/`.
    TpmDir(PathBuf),
    /// A file the VMM writes (read-write).
    FileRw(PathBuf),
    /// A file the VMM only reads.
    FileRo(PathBuf),
}

impl Exposure {
    /// The host path.
    pub fn path(&self) -> &Path {
        match self {
            Self::Dir(p) | Self::TpmDir(p) | Self::FileRw(p) | Self::FileRo(p) => p,
        }
    }
}

/// What the jailed VMM needs to see: files and socket directories of `cfg`
/// (whose paths must be absolute). Directories first, parents before children.
pub fn exposures(cfg: &VmConfig) -> Vec<Exposure> {
    let mut dirs = BTreeSet::new();
    let mut files = Vec::new();
    if let KernelSource::Path(p) = &cfg.kernel {
        files.push(Exposure::FileRo(p.clone()));
    }
    if let Some(p) = &cfg.initrd {
        files.push(Exposure::FileRo(p.clone()));
    }
    for d in &cfg.disks {
        files.push(if d.read_only {
            Exposure::FileRo(d.path.clone())
        } else {
            Exposure::FileRw(d.path.clone())
        });
    }
    if let SerialOutput::File(p) = &cfg.serial {
        files.push(Exposure::FileRw(p.clone()));
    }
    let sockets = cfg
        .api_sock
        .iter()
        .chain(cfg.vsock.as_ref().map(|v| &v.uds));
    for s in sockets {
        if let Some(parent) = s.parent() {
            dirs.insert(parent.to_path_buf());
        }
    }
    // BTreeSet order puts a parent before its children.
    let mut out: Vec<Exposure> = dirs.into_iter().map(Exposure::Dir).collect();
    if let Some(t) = &cfg.tpm {
        out.push(Exposure::TpmDir(t.run_dir.clone()));
        out.sort_by(|a, b| a.path().cmp(b.path()));
    }
    files.sort();
    files.dedup();
    out.extend(files);
    out
}

/// Makes every path in `cfg` absolute (the jailed VMM's working directory is `/`).
pub fn absolutize(cfg: &VmConfig) -> Result<VmConfig, JailError> {
    let abs = |p: &Path| {
        std::path::absolute(p).map_err(step_err(format!("make {} absolute", p.display())))
    };
    let mut c = cfg.clone();
    if let KernelSource::Path(p) = &c.kernel {
        c.kernel = KernelSource::Path(abs(p)?);
    }
    if let Some(p) = &c.initrd {
        c.initrd = Some(abs(p)?);
    }
    for d in &mut c.disks {
        d.path = abs(&d.path)?;
    }
    if let SerialOutput::File(p) = &c.serial {
        c.serial = SerialOutput::File(abs(p)?);
    }
    if let Some(p) = &c.api_sock {
        c.api_sock = Some(abs(p)?);
    }
    if let Some(v) = &mut c.vsock {
        v.uds = abs(&v.uds)?;
    }
    if let Some(t) = &mut c.tpm {
        t.run_dir = abs(&t.run_dir)?;
    }
    Ok(c)
}

/// The validated jail settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailConfig {
    /// The VMM's uid.
    pub uid: u32,
    /// The VMM's gid.
    pub gid: u32,
    /// The per-VM directory that becomes the root.
    pub root: PathBuf,
    /// A name for the cgroup (`cell0-<id>`).
    pub id: String,
    /// Which cgroup interface to use (`None`: pick).
    pub cgroup_version: Option<CgroupVersion>,
    /// cgroup limits.
    pub limits: Limits,
    /// `RLIMIT_NOFILE`.
    pub nofile: u64,
    /// `RLIMIT_FSIZE` in bytes.
    pub fsize: u64,
    /// What the VMM sees of the host.
    pub exposures: Vec<Exposure>,
    /// Whether `/proc` is mounted inside (measured boot hashes `/proc/self/exe`).
    pub proc: bool,
    /// Whether the loopback interface must be up (the vTPM's TCP connection).
    pub loopback: bool,
    /// Print a self-check report instead of running the VM.
    pub selfcheck: bool,
}

impl JailConfig {
    /// Checks `args` and derives the limits and exposures from `cfg` (whose
    /// paths must be absolute, see [`absolutize`]).
    pub fn new(args: &JailArgs, cfg: &VmConfig) -> Result<Self, JailError> {
        let step = "check the jail options";
        let (Some(uid), Some(gid)) = (args.uid, args.gid) else {
            return Err(refused(step, "--jail needs --uid and --gid"));
        };
        if uid == 0 || gid == 0 {
            return Err(refused(
                step,
                "--uid and --gid must not be 0: the VMM would keep root's powers",
            ));
        }
        let pid = std::process::id();
        let root = match &args.jail_root {
            Some(r) => std::path::absolute(r).map_err(step_err("make --jail-root absolute"))?,
            None => Path::new(DEFAULT_JAIL_BASE).join(pid.to_string()),
        };
        let id = root
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .filter(|n| !n.is_empty() && !n.contains('/'))
            .ok_or_else(|| refused(step, "--jail-root must name a directory"))?;
        let id = format!("{id}-{pid}");
        let vcpus = u64::from(cfg.vcpus);
        let memory_mib = args
            .jail_memory_mib
            .unwrap_or(cfg.memory_mib + cfg.shm_mib + MEMORY_OVERHEAD_MIB);
        let cpu_pct = args.jail_cpu_pct.unwrap_or(100 * (vcpus + 1));
        if cpu_pct == 0 || memory_mib == 0 || args.jail_pids == Some(0) {
            return Err(refused(step, "cgroup limits must be above zero"));
        }
        let limits = Limits {
            cpu_quota_us: CPU_PERIOD_US * cpu_pct / 100,
            cpu_period_us: CPU_PERIOD_US,
            memory_bytes: memory_mib << 20,
            pids: args.jail_pids.unwrap_or(vcpus + EXTRA_PIDS),
        };
        let largest_disk = cfg
            .disks
            .iter()
            .filter_map(|d| std::fs::metadata(&d.path).ok())
            .map(|m| m.len())
            .max()
            .unwrap_or(0);
        let fsize = match args.jail_fsize_mib {
            Some(m) => m << 20,
            None => largest_disk.max(DEFAULT_FSIZE_MIB << 20),
        };
        Ok(Self {
            uid,
            gid,
            root,
            id,
            cgroup_version: args.cgroup_version,
            limits,
            nofile: args.jail_nofile.unwrap_or(DEFAULT_NOFILE),
            fsize,
            exposures: exposures(cfg),
            proc: cfg.tpm.is_some(),
            loopback: cfg.tpm.is_some(),
            selfcheck: args.jail_selfcheck,
        })
    }
}

/// What [`launch`] returns.
pub enum Jailed {
    /// This is the supervisor; the VMM has exited with this status.
    Supervisor(ExitCode),
    /// This is the VMM, inside the jail: build and run the VM (with the vTPM
    /// started before `pivot_root`, if any).
    Inside(Option<PendingVtpm>),
    /// This is the VMM, and it has nothing left to do (`--jail-selfcheck`).
    Done(ExitCode),
}

static JAILED: AtomicBool = AtomicBool::new(false);

/// Whether this process is a jailed VMM.
pub fn is_jailed() -> bool {
    JAILED.load(Ordering::Acquire)
}

/// Whether `uid`/`gid` may create entries in a directory with `meta`.
fn writable_by(meta: &std::fs::Metadata, uid: u32, gid: u32) -> bool {
    let mode = meta.permissions().mode();
    (meta.uid() == uid && mode & 0o300 == 0o300)
        || (meta.gid() == gid && mode & 0o030 == 0o030)
        || mode & 0o003 == 0o003
}

/// Checks the host side before anything is created: root, one thread, the
/// exposed paths. Creates (and hands to the VMM's uid) the serial output file.
fn preflight(jc: &JailConfig) -> Result<(), JailError> {
    let step = "start the jail";
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(refused(
            step,
            "cell0-vmm must start as root (euid 0) to create namespaces, cgroups and device nodes",
        ));
    }
    let threads = std::fs::read_dir("/proc/self/task")
        .map_err(step_err("count this process's threads in /proc/self/task"))?
        .count();
    if threads != 1 {
        return Err(refused(
            step,
            format!(
                "the process has {threads} threads; namespaces and credentials must change while it has one"
            ),
        ));
    }
    for e in &jc.exposures {
        let p = e.path();
        let what = format!("expose {} to the VMM", p.display());
        match e {
            Exposure::Dir(d) => {
                let m = std::fs::metadata(d).map_err(step_err(what.clone()))?;
                if !m.is_dir() {
                    return Err(refused(what, "it is not a directory"));
                }
                if !writable_by(&m, jc.uid, jc.gid) {
                    return Err(refused(
                        what,
                        format!(
                            "the VMM creates its sockets there as uid {} gid {}, and the directory is not writable by them",
                            jc.uid, jc.gid
                        ),
                    ));
                }
            }
            Exposure::TpmDir(d) => {
                std::fs::create_dir_all(d).map_err(step_err(what.clone()))?;
            }
            Exposure::FileRw(f) if !f.exists() => {
                // The serial output file: create it for the VMM's uid.
                let file = std::fs::File::create(f).map_err(step_err(what.clone()))?;
                std::os::unix::fs::fchown(&file, Some(jc.uid), Some(jc.gid))
                    .map_err(step_err(format!("hand {} to the VMM's uid", f.display())))?;
            }
            Exposure::FileRw(f) | Exposure::FileRo(f) => {
                let m = std::fs::metadata(f).map_err(step_err(what.clone()))?;
                if m.is_dir() {
                    return Err(refused(what, "it is a directory, not a file"));
                }
            }
        }
    }
    Ok(())
}

/// Creates the per-VM directory (new, or existing and empty).
fn make_root_dir(root: &Path) -> Result<(), JailError> {
    let what = format!("create the jail directory {}", root.display());
    if let Some(parent) = root.parent() {
        std::fs::create_dir_all(parent).map_err(step_err(what.clone()))?;
    }
    match std::fs::create_dir(root) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let mut entries = std::fs::read_dir(root).map_err(step_err(what.clone()))?;
            if entries.next().is_some() {
                return Err(refused(what, "it exists and is not empty"));
            }
        }
        Err(e) => return Err(step_err(what)(e)),
    }
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700))
        .map_err(step_err(format!("restrict {}", root.display())))
}

/// Starts the jail. In the supervisor this returns once the VMM has exited;
/// in the VMM it returns inside the jail.
pub fn launch(args: &JailArgs, cfg: &VmConfig) -> Result<Jailed, JailError> {
    let jc = JailConfig::new(args, cfg)?;
    preflight(&jc)?;
    make_root_dir(&jc.root)?;
    let cg = match Cgroup::create(&jc.id, &jc.limits, jc.cgroup_version) {
        Ok(cg) => cg,
        Err(e) => {
            let _ = std::fs::remove_dir(&jc.root);
            return Err(e);
        }
    };
    tracing::info!(
        root = %jc.root.display(),
        cgroup = ?cg.dirs,
        version = ?cg.version,
        uid = jc.uid,
        gid = jc.gid,
        "jail prepared"
    );
    let supervisor = std::process::id();
    match enter::fork_into_pid_namespace() {
        Err(e) => {
            cg.remove();
            let _ = std::fs::remove_dir(&jc.root);
            Err(e)
        }
        Ok(enter::Forked::Parent { child, go }) => {
            let code = enter::supervise(child, go, &cg);
            cg.remove();
            if let Err(e) = std::fs::remove_dir(&jc.root) {
                tracing::warn!(dir = %jc.root.display(), error = %e, "cannot remove the jail directory");
            }
            code.map(Jailed::Supervisor)
        }
        Ok(enter::Forked::Child { ready }) => {
            enter::wait_for_go(ready)?;
            JAILED.store(true, Ordering::Release);
            let pending = enter::enter(&jc, cfg)?;
            if jc.selfcheck {
                return Ok(Jailed::Done(selfcheck::run(supervisor)));
            }
            Ok(Jailed::Inside(pending))
        }
    }
}

/// Drops every capability from the calling thread's bounding set (a no-op
/// outside the jail). The vTPM worker thread calls it: it exists before the
/// VMM drops its own privileges, and the bounding set is per thread.
pub fn drop_bounding_set_if_jailed() -> Result<(), String> {
    if !is_jailed() {
        return Ok(());
    }
    enter::drop_bounding_set().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests;
