// SPDX-License-Identifier: Apache-2.0
//! Network namespaces for the fault tests (`cp_faults.rs`): every member runs
//! in its own namespace, and a test-owned "hub" namespace holds two bridges:
//!
//! - the *Raft net* 10.213.0.0/24 (member `k` is 10.213.0.k, its `--advertise`
//!   address): members reach each other only through it;
//! - the *client net* 10.213.1.0/24 (member `k` is 10.213.1.k): the test's
//!   clients, which run in the hub namespace, reach the members through it.
//!
//! A partition takes the hub end of a member's Raft-net veth down: packets to
//! and from that member are dropped silently (no RST, no ICMP), as on a cut
//! cable, while the test can still call it. Everything lives in namespaces this
//! test creates (named with its pid), so the addresses cannot clash with
//! anything on the host; `Drop` deletes them, even after a panic.
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Runs `ip ARGS`, panicking with its stderr on failure.
pub fn ip(args: &[&str]) {
    let o = Command::new("ip").args(args).output().unwrap_or_else(|e| {
        panic!("cannot run ip (iproute2) for {args:?}: {e}");
    });
    assert!(
        o.status.success(),
        "ip {} failed ({}): {}",
        args.join(" "),
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Why network namespaces cannot be used here, if they cannot.
pub fn unusable() -> Option<String> {
    let name = format!("c0fprobe{}", std::process::id());
    let o = Command::new("ip").args(["netns", "add", &name]).output();
    match o {
        Err(e) => Some(format!("iproute2's ip cannot run: {e}")),
        Ok(o) if !o.status.success() => Some(format!(
            "ip netns add fails (root and CAP_SYS_ADMIN are needed): {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Ok(_) => {
            let _ = Command::new("ip").args(["netns", "del", &name]).output();
            None
        }
    }
}

/// The namespaces and links of one test.
pub struct Net {
    prefix: String,
    members: Vec<u64>,
}

impl Net {
    /// Creates the hub namespace and its two bridges.
    pub fn new() -> Net {
        let prefix = format!(
            "c0f{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let net = Net {
            prefix,
            members: Vec::new(),
        };
        let hub = net.hub();
        ip(&["netns", "add", &hub]);
        ip(&["-n", &hub, "link", "set", "lo", "up"]);
        for (br, a) in [("raft", "10.213.0.254/24"), ("cli", "10.213.1.254/24")] {
            ip(&["-n", &hub, "link", "add", br, "type", "bridge"]);
            ip(&["-n", &hub, "addr", "add", a, "dev", br]);
            ip(&["-n", &hub, "link", "set", br, "up"]);
        }
        net
    }

    /// The hub namespace's name.
    pub fn hub(&self) -> String {
        format!("{}-hub", self.prefix)
    }

    /// Member `id`'s namespace.
    pub fn ns(&self, id: u64) -> String {
        format!("{}-m{id}", self.prefix)
    }

    /// Member `id`'s Raft-net address (`--advertise`).
    pub fn raft_addr(id: u64) -> String {
        format!("10.213.0.{id}:7070")
    }

    /// Member `id`'s client-net address.
    pub fn client_addr(id: u64) -> String {
        format!("10.213.1.{id}:7070")
    }

    /// Creates member `id`'s namespace, wired to both bridges.
    pub fn add_member(&mut self, id: u64) {
        assert!((1..=200).contains(&id), "member id {id} out of range");
        let (hub, ns) = (self.hub(), self.ns(id));
        ip(&["netns", "add", &ns]);
        self.members.push(id);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        for (br, side, dev, net) in [("raft", "r", "eth0", 0), ("cli", "c", "eth1", 1)] {
            let host = format!("{side}{id}");
            ip(&[
                "-n", &hub, "link", "add", &host, "type", "veth", "peer", "name", dev, "netns", &ns,
            ]);
            ip(&["-n", &hub, "link", "set", &host, "master", br, "up"]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("10.213.{net}.{id}/24"),
                "dev",
                dev,
            ]);
            ip(&["-n", &ns, "link", "set", dev, "up"]);
        }
    }

    /// Cuts member `id` off the Raft net (silent drops both ways).
    pub fn partition(&self, id: u64) {
        ip(&["-n", &self.hub(), "link", "set", &format!("r{id}"), "down"]);
    }

    /// Reconnects member `id` to the Raft net.
    pub fn heal(&self, id: u64) {
        ip(&["-n", &self.hub(), "link", "set", &format!("r{id}"), "up"]);
    }

    /// Makes `cmd` start in member `id`'s network namespace (setns(2) between
    /// fork and exec). Unlike `ip netns exec`, the child keeps the host's
    /// mount namespace and so its `/sys` (cgroups), which a jailed VMM needs.
    /// The returned file is the namespace; keep it until `spawn` returns.
    pub fn enter_in(&self, id: u64, cmd: &mut Command) -> std::fs::File {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let path = format!("/run/netns/{}", self.ns(id));
        let f = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        let fd = f.as_raw_fd();
        // SAFETY: the closure runs in the forked child before exec and calls
        // only setns(2), which is async-signal-safe; `fd` stays open in the
        // parent (and so in the child) until the caller drops the file after
        // spawn.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        f
    }

    /// Moves the calling thread (and the threads it starts later) into the
    /// hub namespace, where the clients run.
    pub fn enter_hub(&self) {
        let path = format!("/run/netns/{}", self.hub());
        let f = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        use std::os::fd::AsRawFd;
        // SAFETY: setns(2) on a namespace fd we own; it changes only the
        // calling thread's network namespace.
        let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(
            r,
            0,
            "setns into {path}: {}",
            std::io::Error::last_os_error()
        );
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // Deleting a namespace deletes its veth ends, and their peers with them.
        for id in &self.members {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(*id)])
                .output();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.hub()])
            .output();
    }
}
