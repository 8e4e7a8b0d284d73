// SPDX-License-Identifier: Apache-2.0
//! The OS calls of the jail: fork into a PID namespace, supervise, and the
//! steps the VMM takes to enter its jail. See the module docs of [`super`].

use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use super::{Cgroup, Exposure, HOSTNAME, JailConfig, JailError, refused, step_err};
use crate::config::VmConfig;
use crate::tpm::PendingVtpm;

/// The highest capability number this code knows of; the kernel's own
/// (`/proc/sys/kernel/cap_last_cap`) is used when it is readable.
const CAP_LAST_CAP_FALLBACK: u32 = 63;

fn last_os_error(step: impl Into<String>) -> JailError {
    step_err(step)(std::io::Error::last_os_error())
}

fn cstr(p: &Path) -> Result<CString, JailError> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| {
        refused(
            format!("use the path {}", p.display()),
            "it holds a NUL byte",
        )
    })
}

/// Which side of the fork this is.
pub(super) enum Forked {
    /// The supervisor, with the VMM's host pid and the pipe that releases it.
    Parent {
        /// The VMM's pid (in the supervisor's namespace).
        child: libc::pid_t,
        /// Writing one byte lets the VMM go on.
        go: File,
    },
    /// The VMM, PID 1 of a new PID namespace.
    Child {
        /// Reads the supervisor's go byte.
        ready: File,
    },
}

const FORWARDED: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

fn signal_set(sigs: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t owned by this frame.
    unsafe { libc::sigemptyset(&mut set) };
    for &s in sigs {
        // SAFETY: as above; `s` is a valid signal number.
        unsafe { libc::sigaddset(&mut set, s) };
    }
    set
}

/// Forks the VMM into a new PID namespace. The supervisor blocks the signals it
/// forwards and SIGCHLD (it collects them with `sigwaitinfo`); the VMM gets the
/// old mask back and dies with the supervisor (`PR_SET_PDEATHSIG`).
pub(super) fn fork_into_pid_namespace() -> Result<Forked, JailError> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into `fds`, which has room for them.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(last_os_error("create the supervisor's pipe"));
    }
    // SAFETY: both descriptors are fresh and owned by nothing else.
    let (read_end, write_end) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
    // SAFETY: unshare takes flags only; CLONE_NEWPID applies to children created later.
    if unsafe { libc::unshare(libc::CLONE_NEWPID) } != 0 {
        return Err(last_os_error(
            "create a PID namespace (unshare CLONE_NEWPID)",
        ));
    }
    let mut blocked = FORWARDED.to_vec();
    blocked.push(libc::SIGCHLD);
    let set = signal_set(&blocked);
    // SAFETY: a zeroed sigset_t is a valid out-parameter.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: both sets are valid; the process has one thread (checked in preflight).
    if unsafe { libc::sigprocmask(libc::SIG_BLOCK, &set, &mut old) } != 0 {
        return Err(last_os_error("block signals in the supervisor"));
    }
    // SAFETY: the process has exactly one thread (preflight checked it), so the
    // child is a consistent copy; it goes on in Rust code we control.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(last_os_error("fork the VMM into its PID namespace"));
    }
    if pid > 0 {
        drop(read_end);
        return Ok(Forked::Parent {
            child: pid,
            go: write_end,
        });
    }
    drop(write_end);
    // SAFETY: `old` is the mask saved above.
    unsafe { libc::sigprocmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes a signal number only.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) } != 0 {
        return Err(last_os_error(
            "tie the VMM's life to the supervisor (PR_SET_PDEATHSIG)",
        ));
    }
    Ok(Forked::Child { ready: read_end })
}

/// The VMM waits until the supervisor has put it in its cgroup.
pub(super) fn wait_for_go(mut ready: File) -> Result<(), JailError> {
    let mut b = [0u8; 1];
    match ready.read(&mut b) {
        Ok(1) => Ok(()),
        Ok(_) => Err(refused(
            "wait for the supervisor",
            "it exited before placing the VMM in its cgroup",
        )),
        Err(e) => Err(step_err("wait for the supervisor")(e)),
    }
}

fn signal_name(sig: libc::c_int) -> &'static str {
    match sig {
        libc::SIGSYS => " (SIGSYS: a seccomp filter stopped a forbidden syscall)",
        libc::SIGKILL => " (SIGKILL)",
        libc::SIGSEGV => " (SIGSEGV)",
        libc::SIGABRT => " (SIGABRT)",
        _ => "",
    }
}

/// The supervisor: moves the VMM into the cgroup, lets it go, forwards
/// termination signals as SIGKILL and returns the VMM's exit status.
pub(super) fn supervise(
    child: libc::pid_t,
    mut go: File,
    cg: &Cgroup,
) -> Result<ExitCode, JailError> {
    let kill_child = || {
        // SAFETY: kill takes a pid and a signal; `child` is our own child.
        unsafe { libc::kill(child, libc::SIGKILL) };
    };
    if let Err(e) = cg.add_process(child as u32) {
        kill_child();
        reap(child);
        return Err(e);
    }
    if let Err(e) = go.write_all(&[1]) {
        kill_child();
        reap(child);
        return Err(step_err("release the VMM")(e));
    }
    drop(go);
    let mut waited = FORWARDED.to_vec();
    waited.push(libc::SIGCHLD);
    let set = signal_set(&waited);
    loop {
        // SAFETY: a zeroed siginfo_t is a valid out-parameter.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` and `info` are valid for the call.
        let sig = unsafe { libc::sigwaitinfo(&set, &mut info) };
        if sig < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            kill_child();
            reap(child);
            return Err(step_err("wait for signals in the supervisor")(e));
        }
        if FORWARDED.contains(&sig) {
            tracing::info!(signal = sig, "stopping the jailed VMM");
            kill_child();
        }
        let mut status = 0;
        // SAFETY: waitpid on our own child with a valid status pointer.
        let r = unsafe { libc::waitpid(child, &mut status, libc::WNOHANG) };
        if r == child {
            if libc::WIFEXITED(status) {
                return Ok(ExitCode::from(libc::WEXITSTATUS(status) as u8));
            }
            if libc::WIFSIGNALED(status) {
                let s = libc::WTERMSIG(status);
                eprintln!(
                    "cell0-vmm: the jailed VMM was killed by signal {s}{}",
                    signal_name(s)
                );
                return Ok(ExitCode::from((128 + s) as u8));
            }
        }
    }
}

fn reap(child: libc::pid_t) {
    let mut status = 0;
    // SAFETY: waitpid on our own child with a valid status pointer.
    unsafe { libc::waitpid(child, &mut status, 0) };
}

fn mount(
    src: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
    step: impl Into<String>,
) -> Result<(), JailError> {
    let step = step.into();
    let src = src.map(cstr).transpose()?;
    let target = cstr(target)?;
    let fstype = fstype.map(|f| CString::new(f).unwrap_or_default());
    let data = data.map(|d| CString::new(d).unwrap_or_default());
    let p = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is null or a NUL-terminated string that outlives the call.
    let r = unsafe { libc::mount(p(&src), target.as_ptr(), p(&fstype), flags, p(&data).cast()) };
    if r != 0 {
        return Err(last_os_error(step));
    }
    Ok(())
}

/// `inside`: where host path `p` appears under the new root before pivot_root.
fn inside(root: &Path, p: &Path) -> PathBuf {
    root.join(p.strip_prefix("/").unwrap_or(p))
}

/// Creates a mount point for `e` under `root` if nothing is there yet (a path
/// inside an already bind-mounted directory exists through that mount).
fn make_mount_point(root: &Path, e: &Exposure) -> Result<PathBuf, JailError> {
    let target = inside(root, e.path());
    if target.symlink_metadata().is_ok() {
        return Ok(target);
    }
    let step = format!("create the mount point for {}", e.path().display());
    match e {
        Exposure::Dir(_) | Exposure::TpmDir(_) => {
            std::fs::create_dir_all(&target).map_err(step_err(step))?
        }
        Exposure::FileRw(_) | Exposure::FileRo(_) => {
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent).map_err(step_err(step.clone()))?;
            }
            File::create(&target).map_err(step_err(step))?;
        }
    }
    Ok(target)
}

fn bind(root: &Path, e: &Exposure) -> Result<(), JailError> {
    let target = make_mount_point(root, e)?;
    let host = e.path();
    mount(
        Some(host),
        &target,
        None,
        libc::MS_BIND,
        None,
        format!("bind-mount {} into the jail", host.display()),
    )?;
    let mut flags =
        libc::MS_BIND | libc::MS_REMOUNT | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    if matches!(e, Exposure::FileRo(_)) {
        flags |= libc::MS_RDONLY;
    }
    mount(
        None,
        &target,
        None,
        flags,
        None,
        format!(
            "restrict the bind mount of {} (nosuid, nodev, noexec)",
            host.display()
        ),
    )
}

/// Makes `/dev/kvm` under `root`: a new node with the host node's device
/// number, owned by the VMM's uid and gid, mode 0600.
fn make_kvm_node(root: &Path, uid: u32, gid: u32) -> Result<(), JailError> {
    use std::os::unix::fs::MetadataExt;
    let host = std::fs::metadata("/dev/kvm").map_err(step_err("find /dev/kvm on the host"))?;
    let dev = root.join("dev");
    std::fs::create_dir_all(&dev).map_err(step_err("create /dev in the jail"))?;
    let node = cstr(&dev.join("kvm"))?;
    // SAFETY: `node` is a NUL-terminated path; mode and device are plain numbers.
    if unsafe { libc::mknod(node.as_ptr(), libc::S_IFCHR | 0o600, host.rdev()) } != 0 {
        return Err(last_os_error("create /dev/kvm in the jail (mknod)"));
    }
    // SAFETY: `node` is a NUL-terminated path.
    if unsafe { libc::chown(node.as_ptr(), uid, gid) } != 0 {
        return Err(last_os_error("give /dev/kvm in the jail to the VMM's uid"));
    }
    Ok(())
}

/// Brings the loopback interface of the new network namespace up (the vTPM
/// speaks TCP to swtpm on 127.0.0.1).
fn loopback_up() -> Result<(), JailError> {
    let step = "bring up the loopback interface in the network namespace";
    // SAFETY: socket takes plain arguments; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(last_os_error(step));
    }
    // SAFETY: fd is a fresh socket that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *d = *s as libc::c_char;
    }
    use std::os::fd::AsRawFd;
    // SAFETY: SIOCGIFFLAGS reads into `req`, a valid ifreq that outlives the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } != 0 {
        return Err(last_os_error(step));
    }
    // SAFETY: the union's flags member was just filled in by SIOCGIFFLAGS.
    unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: SIOCSIFFLAGS reads `req`, a valid ifreq.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } != 0 {
        return Err(last_os_error(step));
    }
    Ok(())
}

fn cap_last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(CAP_LAST_CAP_FALLBACK)
}

/// Drops every capability from the calling thread's bounding set.
pub(super) fn drop_bounding_set() -> Result<(), JailError> {
    static LAST: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let last = *LAST.get_or_init(cap_last_cap);
    for cap in 0..=last {
        // SAFETY: prctl(PR_CAPBSET_DROP) takes a capability number only.
        let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            // EINVAL: the kernel knows no capability with this number.
            if e.raw_os_error() != Some(libc::EINVAL) {
                return Err(step_err(format!(
                    "drop capability {cap} from the bounding set"
                ))(e));
            }
        }
    }
    Ok(())
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAP_V3: u32 = 0x2008_0522;

/// The calling thread's (effective, permitted, inheritable) sets, 64 bits each.
pub(super) fn capget() -> std::io::Result<(u64, u64, u64)> {
    let mut h = CapHeader {
        version: CAP_V3,
        pid: 0,
    };
    let mut d = [CapData::default(); 2];
    // SAFETY: capget writes two CapData records (version 3) into `d`.
    if unsafe { libc::syscall(libc::SYS_capget, &mut h, d.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let join = |lo: u32, hi: u32| u64::from(lo) | (u64::from(hi) << 32);
    Ok((
        join(d[0].effective, d[1].effective),
        join(d[0].permitted, d[1].permitted),
        join(d[0].inheritable, d[1].inheritable),
    ))
}

fn clear_capabilities() -> Result<(), JailError> {
    let mut h = CapHeader {
        version: CAP_V3,
        pid: 0,
    };
    let d = [CapData::default(); 2];
    // SAFETY: capset reads two CapData records (version 3) from `d`.
    if unsafe { libc::syscall(libc::SYS_capset, &mut h, d.as_ptr()) } != 0 {
        return Err(last_os_error(
            "clear the effective, permitted and inheritable capabilities",
        ));
    }
    Ok(())
}

fn set_rlimit(
    resource: libc::__rlimit_resource_t,
    value: u64,
    name: &str,
) -> Result<(), JailError> {
    let lim = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: setrlimit reads `lim`, a valid rlimit.
    if unsafe { libc::setrlimit(resource, &lim) } != 0 {
        return Err(last_os_error(format!("set {name} to {value}")));
    }
    Ok(())
}

/// The VMM enters its jail; see the module docs of [`super`] for the steps.
/// Returns the vTPM started before `pivot_root`, if `--tpm` asked for one.
pub(super) fn enter(jc: &JailConfig, cfg: &VmConfig) -> Result<Option<PendingVtpm>, JailError> {
    // 1. Namespaces.
    let flags = libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS | libc::CLONE_NEWNET;
    // SAFETY: unshare takes flags only; the process has one thread.
    if unsafe { libc::unshare(flags) } != 0 {
        return Err(last_os_error(
            "create mount, IPC, UTS and network namespaces (unshare)",
        ));
    }
    // SAFETY: the name pointer and length describe a valid byte string.
    if unsafe { libc::sethostname(HOSTNAME.as_ptr().cast(), HOSTNAME.len()) } != 0 {
        return Err(last_os_error("set the hostname in the UTS namespace"));
    }
    if jc.loopback {
        loopback_up()?;
    }

    // 2. The new root.
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
        "make every mount private to the VMM's mount namespace",
    )?;
    let root = jc.root.as_path();
    mount(
        Some(Path::new("tmpfs")),
        root,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("mode=0755,size=1m,nr_inodes=1024"),
        format!("mount the jail's tmpfs on {}", root.display()),
    )?;
    for e in &jc.exposures {
        bind(root, e)?;
    }
    make_kvm_node(root, jc.uid, jc.gid)?;
    if jc.proc {
        let p = root.join("proc");
        std::fs::create_dir_all(&p).map_err(step_err("create /proc in the jail"))?;
        mount(
            Some(Path::new("proc")),
            &p,
            Some("proc"),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC | libc::MS_RDONLY,
            Some("hidepid=2"),
            "mount /proc (of the VMM's PID namespace) in the jail",
        )?;
    }

    // 3. The vTPM, while the host's programs and CA are still reachable.
    let pending = match &cfg.tpm {
        Some(t) => {
            let p = PendingVtpm::start(t).finish().map_err(JailError::Tpm)?;
            // The VMM writes the event log into <run_dir>/vtpm as its own uid;
            // swtpm's state (seeds, keys) stays root's alone.
            let dir = t.run_dir.join("vtpm");
            let give = step_err(format!("hand {} to the VMM's uid", dir.display()));
            std::os::unix::fs::chown(&dir, Some(jc.uid), Some(jc.gid)).map_err(give)?;
            let state = dir.join("state");
            std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).map_err(
                step_err(format!("keep {} private to swtpm", state.display())),
            )?;
            Some(p)
        }
        None => None,
    };

    // 4. pivot_root.
    let croot = cstr(root)?;
    // SAFETY: `croot` is a NUL-terminated path.
    if unsafe { libc::chdir(croot.as_ptr()) } != 0 {
        return Err(last_os_error("enter the jail directory"));
    }
    // pivot_root(".", "."): the old root is stacked under the new one, then detached.
    // SAFETY: both arguments are the NUL-terminated string ".".
    if unsafe { libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) } != 0 {
        return Err(last_os_error(format!("pivot_root into {}", root.display())));
    }
    // SAFETY: "." is NUL-terminated; MNT_DETACH is a plain flag.
    if unsafe { libc::umount2(c".".as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(last_os_error("detach the host's root file system"));
    }
    // SAFETY: "/" is NUL-terminated.
    if unsafe { libc::chdir(c"/".as_ptr()) } != 0 {
        return Err(last_os_error("change to the new root"));
    }
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NOEXEC,
        None,
        "make the jail's root read-only",
    )?;

    // 5. rlimits.
    set_rlimit(libc::RLIMIT_NOFILE, jc.nofile, "RLIMIT_NOFILE")?;
    set_rlimit(libc::RLIMIT_FSIZE, jc.fsize, "RLIMIT_FSIZE")?;
    set_rlimit(
        libc::RLIMIT_CORE,
        0,
        "RLIMIT_CORE (no core dumps of guest memory)",
    )?;

    // 6. Credentials and capabilities.
    drop_bounding_set()?;
    // SAFETY: setgroups with a zero count reads no memory. glibc applies the
    // set*id calls to every thread of the process.
    if unsafe { libc::setgroups(0, std::ptr::null()) } != 0 {
        return Err(last_os_error("clear the supplementary groups"));
    }
    // SAFETY: plain numeric arguments.
    if unsafe { libc::setresgid(jc.gid, jc.gid, jc.gid) } != 0 {
        return Err(last_os_error(format!("change to gid {}", jc.gid)));
    }
    // SAFETY: plain numeric arguments.
    if unsafe { libc::setresuid(jc.uid, jc.uid, jc.uid) } != 0 {
        return Err(last_os_error(format!("change to uid {}", jc.uid)));
    }
    // SAFETY: prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL) takes no pointers.
    if unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    } != 0
    {
        return Err(last_os_error("clear the ambient capabilities"));
    }
    clear_capabilities()?;
    // SAFETY: prctl(PR_SET_NO_NEW_PRIVS) takes no pointers.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(last_os_error("set no_new_privs"));
    }

    // Check what the kernel now says.
    let caps = capget().map_err(step_err("read the capabilities back"))?;
    let mut ids = [0u32; 3];
    // SAFETY: getresuid writes three uids into `ids`.
    unsafe { libc::getresuid(&mut ids[0], &mut ids[1], &mut ids[2]) };
    if caps != (0, 0, 0) || ids != [jc.uid; 3] {
        return Err(refused(
            "drop privileges",
            format!("capabilities {caps:x?} and uids {ids:?} remain"),
        ));
    }
    tracing::debug!(uid = jc.uid, gid = jc.gid, "inside the jail");
    Ok(pending)
}
