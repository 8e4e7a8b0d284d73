// SPDX-License-Identifier: Apache-2.0
//! PID 1 duties: mount the pseudo file systems, load the kernel modules the
//! image lists, read the kernel command line and uptime, and power off.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

/// The file rootfs writes: one module path per line, in load order
/// (dependencies first, as modules.dep orders them).
pub const MODULE_LIST: &str = "/lib/modules/cell0.load";

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// A mount failed.
    #[error("cannot mount {fstype} on {target}")]
    Mount {
        /// File system type.
        fstype: &'static str,
        /// Mount point.
        target: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Loading a module failed.
    #[error("cannot load kernel module {path}")]
    Module {
        /// The .ko file.
        path: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Reading a file failed.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

fn cstr(s: &str) -> CString {
    // Only called with constant strings without NUL bytes.
    CString::new(s).unwrap_or_default()
}

/// The mounts an init makes: (fstype, target, mode, flags).
const MOUNTS: &[(&str, &str, u32, libc::c_ulong)] = &[
    (
        "proc",
        "/proc",
        0o555,
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
    ),
    (
        "sysfs",
        "/sys",
        0o555,
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
    ),
    ("devtmpfs", "/dev", 0o755, libc::MS_NOSUID),
    (
        "devpts",
        "/dev/pts",
        0o755,
        libc::MS_NOSUID | libc::MS_NOEXEC,
    ),
    (
        "tmpfs",
        "/dev/shm",
        0o1777,
        libc::MS_NOSUID | libc::MS_NODEV,
    ),
    ("tmpfs", "/tmp", 0o1777, libc::MS_NOSUID | libc::MS_NODEV),
    ("tmpfs", "/run", 0o755, libc::MS_NOSUID | libc::MS_NODEV),
];

/// Mounts proc, sys, dev (devtmpfs, devpts, shm), tmp and run. A target that
/// is already mounted (EBUSY) is fine.
pub fn mount_all() -> Result<(), InitError> {
    for &(fstype, target, mode, flags) in MOUNTS {
        let _ = std::fs::create_dir_all(target);
        let (src, ty, dst) = (cstr(fstype), cstr(fstype), cstr(target));
        // SAFETY: all pointers are valid NUL-terminated strings; data is NULL.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                dst.as_ptr(),
                ty.as_ptr(),
                flags,
                std::ptr::null(),
            )
        };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EBUSY) {
                return Err(InitError::Mount {
                    fstype,
                    target,
                    source: e,
                });
            }
        }
        let _ =
            std::fs::set_permissions(target, std::os::unix::fs::PermissionsExt::from_mode(mode));
    }
    let _ = std::os::unix::fs::symlink("/proc/self/fd", "/dev/fd");
    Ok(())
}

/// Loads one module file with `finit_module(2)`. Already loaded (EEXIST) is fine.
pub fn load_module(path: &Path) -> Result<(), InitError> {
    let err = |source| InitError::Module {
        path: path.display().to_string(),
        source,
    };
    let f = File::open(path).map_err(err)?;
    let params = cstr("");
    // SAFETY: finit_module(2) with an open descriptor and a valid empty
    // parameter string; no memory of ours is written.
    let rc = unsafe { libc::syscall(libc::SYS_finit_module, f.as_raw_fd(), params.as_ptr(), 0) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EEXIST) {
            return Err(err(e));
        }
    }
    Ok(())
}

/// Loads every module of `list` (see [`MODULE_LIST`]) in order; a missing list
/// means the kernel has everything built in. Returns how many were loaded.
pub fn load_modules(list: &Path) -> Result<usize, InitError> {
    let text = match std::fs::read_to_string(list) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(source) => {
            return Err(InitError::Read {
                path: list.display().to_string(),
                source,
            });
        }
    };
    let mut n = 0;
    for line in text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        load_module(Path::new(line))?;
        n += 1;
    }
    Ok(n)
}

/// Guest uptime from `/proc/uptime`, in ns.
pub fn uptime_ns() -> Result<u64, InitError> {
    let text = std::fs::read_to_string("/proc/uptime").map_err(|source| InitError::Read {
        path: "/proc/uptime".into(),
        source,
    })?;
    Ok(parse_uptime(&text).unwrap_or(0))
}

/// Parses the first field of `/proc/uptime` ("12.34 56.78") into ns.
pub fn parse_uptime(text: &str) -> Option<u64> {
    let first = text.split_whitespace().next()?;
    let (secs, frac) = first.split_once('.').unwrap_or((first, ""));
    let secs: u64 = secs.parse().ok()?;
    let mut ns: u64 = 0;
    let mut scale = 100_000_000;
    for c in frac.chars().take(9) {
        ns += u64::from(c.to_digit(10)?) * scale;
        scale /= 10;
    }
    secs.checked_mul(1_000_000_000)?.checked_add(ns)
}

/// The agent's settings from the kernel command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootArgs {
    /// `cell0.agent_id=` (the host's bootstrap reply is authoritative).
    pub agent_id: String,
    /// `cell0.vsock_port=` (default 1024).
    pub vsock_port: u32,
    /// `cell0.log=` tracing filter (default `info`).
    pub log: String,
}

/// Parses the `cell0.*` keys of a kernel command line; other words are ignored.
pub fn parse_cmdline(cmdline: &str) -> BootArgs {
    let mut a = BootArgs {
        agent_id: String::new(),
        vsock_port: cell0_proto::ROUTER_VSOCK_PORT,
        log: "info".into(),
    };
    for word in cmdline.split_whitespace() {
        if let Some(v) = word.strip_prefix("cell0.agent_id=") {
            a.agent_id = v.to_string();
        } else if let Some(v) = word.strip_prefix("cell0.vsock_port=") {
            if let Ok(p) = v.parse() {
                a.vsock_port = p;
            }
        } else if let Some(v) = word.strip_prefix("cell0.log=") {
            a.log = v.to_string();
        }
    }
    a
}

/// `uname -a`-like text for the running kernel.
pub fn kernel_description() -> (String, String) {
    // SAFETY: utsname is plain old data; uname fills it.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a local utsname.
    if unsafe { libc::uname(&mut u) } < 0 {
        return (String::new(), String::new());
    }
    let field = |f: &[libc::c_char]| {
        let bytes: Vec<u8> = f
            .iter()
            .take_while(|c| **c != 0)
            .map(|c| *c as u8)
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    };
    let release = field(&u.release);
    let all = format!(
        "{} {} {} {} {}",
        field(&u.sysname),
        field(&u.nodename),
        release,
        field(&u.version),
        field(&u.machine)
    );
    (release, all)
}

/// Flushes file systems and resets the machine: `reboot(LINUX_REBOOT_CMD_RESTART)`.
/// With `reboot=k` on the cmdline Linux resets through the i8042, and
/// cell0-vmm exits 0. Only returns if the call fails.
pub fn power_off() -> io::Error {
    // SAFETY: sync(2) takes no arguments.
    unsafe { libc::sync() };
    // SAFETY: reboot(2) with a valid command; it does not return on success.
    unsafe { libc::reboot(libc::LINUX_REBOOT_CMD_RESTART) };
    io::Error::last_os_error()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn uptime_parses_to_ns() {
        assert_eq!(parse_uptime("0.07 0.01\n"), Some(70_000_000));
        assert_eq!(parse_uptime("12.34 56.78"), Some(12_340_000_000));
        assert_eq!(parse_uptime("5 1"), Some(5_000_000_000));
        assert_eq!(parse_uptime(""), None);
        assert_eq!(parse_uptime("x.1 2"), None);
        assert!(uptime_ns().unwrap() > 0);
    }

    #[test]
    fn cmdline_keys() {
        let a = parse_cmdline(
            "console=ttyS0 reboot=k cell0.agent_id=a7 cell0.vsock_port=2000 cell0.log=debug virtio_mmio.device=4K@0xd0000000:5",
        );
        assert_eq!(a.agent_id, "a7");
        assert_eq!(a.vsock_port, 2000);
        assert_eq!(a.log, "debug");
        let d = parse_cmdline("cell0.vsock_port=x");
        assert_eq!(d.vsock_port, 1024);
    }

    #[test]
    fn module_list_missing_is_nothing_and_bad_entries_are_typed() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load_modules(&dir.path().join("none")).unwrap(), 0);
        let list = dir.path().join("list");
        std::fs::write(&list, "# comment\n\n/nonexistent/x.ko\n").unwrap();
        assert!(matches!(load_modules(&list), Err(InitError::Module { .. })));
    }

    #[test]
    fn kernel_is_described() {
        let (release, all) = kernel_description();
        assert!(!release.is_empty());
        assert!(all.starts_with("Linux "));
    }
}
