// SPDX-License-Identifier: Apache-2.0
//! `--jail-selfcheck`: what the VMM sees from inside its jail, as one JSON
//! line on stdout. Tests compare it with what the jail promises, and inspect
//! the process from outside while it waits for stdin to close.

use std::io::{Read, Write};
use std::path::Path;
use std::process::ExitCode;

use serde_json::{Value, json};

/// Every path under `dir`, depth first, without following symlinks or
/// entering `/proc`.
fn walk(dir: &Path, out: &mut Vec<String>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = rd.filter_map(Result::ok).map(|e| e.path()).collect();
    entries.sort();
    for p in entries {
        out.push(p.display().to_string());
        let is_dir = p.symlink_metadata().is_ok_and(|m| m.is_dir());
        if is_dir && p != Path::new("/proc") {
            walk(&p, out);
        }
    }
}

fn rlimit(resource: libc::__rlimit_resource_t) -> Value {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into `l`.
    unsafe { libc::getrlimit(resource, &mut l) };
    json!([l.rlim_cur, l.rlim_max])
}

fn bounding_set_count() -> u32 {
    (0..64u32)
        .filter(|&c| {
            // SAFETY: prctl(PR_CAPBSET_READ) takes a capability number only.
            let r = unsafe { libc::prctl(libc::PR_CAPBSET_READ, c as libc::c_ulong, 0, 0, 0) };
            r == 1
        })
        .count() as u32
}

fn ambient_count() -> u32 {
    (0..64u32)
        .filter(|&c| {
            // SAFETY: prctl(PR_CAP_AMBIENT, IS_SET) takes numbers only.
            let r = unsafe {
                libc::prctl(
                    libc::PR_CAP_AMBIENT,
                    libc::PR_CAP_AMBIENT_IS_SET as libc::c_ulong,
                    c as libc::c_ulong,
                    0,
                    0,
                )
            };
            r == 1
        })
        .count() as u32
}

fn interfaces() -> Vec<String> {
    let mut names = Vec::new();
    // SAFETY: if_nameindex returns a list ending in a zero entry, or null.
    let list = unsafe { libc::if_nameindex() };
    if list.is_null() {
        return names;
    }
    let mut p = list;
    // SAFETY: `p` walks the array if_nameindex returned, up to its zero entry;
    // each name is a NUL-terminated string inside it.
    unsafe {
        while (*p).if_index != 0 {
            names.push(
                std::ffi::CStr::from_ptr((*p).if_name)
                    .to_string_lossy()
                    .into_owned(),
            );
            p = p.add(1);
        }
        libc::if_freenameindex(list);
    }
    names
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into `buf`.
    unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Whether signal 0 reaches `pid` (it exists in this PID namespace).
fn pid_visible(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence and permission.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// The report.
pub fn report(supervisor_pid: u32) -> Value {
    let (mut ru, mut eu, mut su) = (0, 0, 0);
    let (mut rg, mut eg, mut sg) = (0, 0, 0);
    // SAFETY: each call writes three ids into valid locals.
    unsafe {
        libc::getresuid(&mut ru, &mut eu, &mut su);
        libc::getresgid(&mut rg, &mut eg, &mut sg);
    }
    // SAFETY: getgroups with a zero size only counts.
    let groups = unsafe { libc::getgroups(0, std::ptr::null_mut()) };
    let caps = super::enter::capget().unwrap_or((u64::MAX, u64::MAX, u64::MAX));
    // SAFETY: prctl(PR_GET_NO_NEW_PRIVS) takes no pointers.
    let nnp = unsafe { libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) };
    let mut files = Vec::new();
    walk(Path::new("/"), &mut files);
    let host_files: serde_json::Map<String, Value> = [
        "/etc/passwd",
        "/etc/hostname",
        "/home",
        "/root",
        "/sys",
        "/usr/bin",
        "/dev/null",
        "/dev/net/tun",
    ]
    .iter()
    .map(|p| {
        (
            p.to_string(),
            json!(Path::new(p).symlink_metadata().is_ok()),
        )
    })
    .collect();
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| e.to_string());
    // SAFETY: kill(-1, 0) only checks whether any other process can be signalled.
    let others = unsafe { libc::kill(-1, 0) } == 0;
    json!({
        // SAFETY: getpid has no preconditions.
        "pid": unsafe { libc::getpid() },
        "uid": [ru, eu, su],
        "gid": [rg, eg, sg],
        "groups": groups,
        "cap_effective": caps.0,
        "cap_permitted": caps.1,
        "cap_inheritable": caps.2,
        "cap_bounding_count": bounding_set_count(),
        "cap_ambient_count": ambient_count(),
        "no_new_privs": nnp,
        "hostname": hostname(),
        "interfaces": interfaces(),
        "files": files,
        "host_files_visible": host_files,
        "supervisor_pid_visible": pid_visible(supervisor_pid as i32),
        "other_processes_visible": others,
        "kvm_opens": kvm.is_ok(),
        "kvm_error": kvm.err(),
        "rlimit_nofile": rlimit(libc::RLIMIT_NOFILE),
        "rlimit_fsize": rlimit(libc::RLIMIT_FSIZE),
        "rlimit_core": rlimit(libc::RLIMIT_CORE),
    })
}

/// Prints the report, then waits until stdin closes (so a test can inspect the
/// process from outside meanwhile).
pub fn run(supervisor_pid: u32) -> ExitCode {
    let line = report(supervisor_pid).to_string();
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
        return ExitCode::FAILURE;
    }
    drop(out);
    let mut sink = [0u8; 64];
    while matches!(std::io::stdin().read(&mut sink), Ok(n) if n > 0) {}
    ExitCode::SUCCESS
}
