// SPDX-License-Identifier: Apache-2.0
//! cgroup limits for a jailed VMM: CPU, memory and PIDs, on cgroup v2 or on
//! the v1 controllers (`cpu`, `memory`, `pids`), as Firecracker's jailer does.
//!
//! The VM's cgroup is created *inside the supervisor's own cgroup* of each
//! hierarchy (`<mount>/<own path>/cell0-<id>`), so a VMM can never get more than
//! whatever already limits the process that launched it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::JailError;

/// Which cgroup interface to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CgroupVersion {
    /// The v1 controllers, one hierarchy each.
    #[value(name = "1")]
    V1,
    /// The unified v2 hierarchy.
    #[value(name = "2")]
    V2,
}

/// The limits of one VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// CPU time allowed per period, in µs (`cpu.max`'s quota).
    pub cpu_quota_us: u64,
    /// The CPU accounting period, in µs.
    pub cpu_period_us: u64,
    /// Memory limit in bytes.
    pub memory_bytes: u64,
    /// Most tasks (threads and processes).
    pub pids: u64,
}

impl Limits {
    /// The files to write and what to write, per controller, for `version`.
    fn files(&self, version: CgroupVersion) -> Vec<(&'static str, &'static str, String)> {
        match version {
            CgroupVersion::V1 => vec![
                ("cpu", "cpu.cfs_period_us", self.cpu_period_us.to_string()),
                ("cpu", "cpu.cfs_quota_us", self.cpu_quota_us.to_string()),
                (
                    "memory",
                    "memory.limit_in_bytes",
                    self.memory_bytes.to_string(),
                ),
                ("pids", "pids.max", self.pids.to_string()),
            ],
            CgroupVersion::V2 => vec![
                (
                    "cpu",
                    "cpu.max",
                    format!("{} {}", self.cpu_quota_us, self.cpu_period_us),
                ),
                ("memory", "memory.max", self.memory_bytes.to_string()),
                ("memory", "memory.swap.max", "0".to_string()),
                ("pids", "pids.max", self.pids.to_string()),
            ],
        }
    }
}

/// The controllers every VM cgroup uses.
pub const CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];

/// Where the hierarchies are mounted, from `/proc/self/mountinfo`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Mounts {
    /// The cgroup2 mount, if any.
    pub v2: Option<PathBuf>,
    /// v1 mounts by controller name.
    pub v1: HashMap<String, PathBuf>,
}

/// Parses `/proc/self/mountinfo`.
pub fn parse_mountinfo(text: &str) -> Mounts {
    let mut m = Mounts::default();
    for line in text.lines() {
        // ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTS
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let mount_point = left.split(' ').nth(4);
        let mut r = right.split(' ');
        let (Some(fstype), Some(_src), Some(superopts)) = (r.next(), r.next(), r.next()) else {
            continue;
        };
        let Some(mp) = mount_point else { continue };
        let mp = PathBuf::from(unescape_octal(mp));
        match fstype {
            "cgroup2" => {
                m.v2.get_or_insert(mp);
            }
            "cgroup" => {
                for opt in superopts.split(',') {
                    if CONTROLLERS.contains(&opt) {
                        m.v1.entry(opt.to_string()).or_insert_with(|| mp.clone());
                    }
                }
            }
            _ => {}
        }
    }
    m
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let octal = std::str::from_utf8(&b[i + 1..i + 4])
                .ok()
                .and_then(|o| u8::from_str_radix(o, 8).ok());
            if let Some(v) = octal {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// This process's cgroup paths, from `/proc/self/cgroup`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct OwnCgroups {
    /// The v2 path (`0::PATH`).
    pub v2: Option<String>,
    /// v1 paths by controller.
    pub v1: HashMap<String, String>,
}

/// Parses `/proc/self/cgroup`.
pub fn parse_proc_cgroup(text: &str) -> OwnCgroups {
    let mut own = OwnCgroups::default();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(ctrls), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        if id == "0" && ctrls.is_empty() {
            own.v2 = Some(path.to_string());
        } else {
            for c in ctrls.split(',') {
                own.v1.insert(c.to_string(), path.to_string());
            }
        }
    }
    own
}

/// A VM's cgroup, created with its limits. Not removed on drop: the
/// supervisor calls [`Cgroup::remove`] once the VMM has exited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup {
    /// The interface in use.
    pub version: CgroupVersion,
    /// One directory per hierarchy (v1: per controller; v2: one).
    pub dirs: Vec<PathBuf>,
}

fn step_io(step: String) -> impl FnOnce(std::io::Error) -> JailError {
    move |source| JailError::Step { step, source }
}

fn join_rel(mount: &Path, rel: &str) -> PathBuf {
    mount.join(rel.trim_start_matches('/'))
}

fn v2_controllers(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("cgroup.controllers"))
        .map(|s| s.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

/// Picks the interface: the one asked for, else v2 when its hierarchy offers
/// all three controllers, else v1 when each controller has a v1 mount.
pub fn choose(
    mounts: &Mounts,
    own: &OwnCgroups,
    want: Option<CgroupVersion>,
) -> Result<CgroupVersion, JailError> {
    let v2_ok = || -> Result<(), String> {
        let mount = mounts
            .v2
            .as_ref()
            .ok_or("no cgroup2 file system is mounted")?;
        let base = join_rel(mount, own.v2.as_deref().unwrap_or("/"));
        let have = v2_controllers(&base);
        let missing: Vec<&str> = CONTROLLERS
            .iter()
            .copied()
            .filter(|c| !have.iter().any(|h| h == c))
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{} does not offer the {} controller(s) (they may be bound to v1 hierarchies)",
                base.display(),
                missing.join(", ")
            ))
        }
    };
    let v1_ok = || -> Result<(), String> {
        let missing: Vec<&str> = CONTROLLERS
            .iter()
            .copied()
            .filter(|c| !mounts.v1.contains_key(*c))
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "no v1 hierarchy is mounted for {}",
                missing.join(", ")
            ))
        }
    };
    let refused = |why: String| JailError::Refused {
        step: "choose a cgroup version".into(),
        why,
    };
    match want {
        Some(CgroupVersion::V2) => v2_ok().map(|()| CgroupVersion::V2).map_err(refused),
        Some(CgroupVersion::V1) => v1_ok().map(|()| CgroupVersion::V1).map_err(refused),
        None => match v2_ok() {
            Ok(()) => Ok(CgroupVersion::V2),
            Err(v2_why) => v1_ok()
                .map(|()| CgroupVersion::V1)
                .map_err(|v1_why| refused(format!("cgroup v2: {v2_why}; cgroup v1: {v1_why}"))),
        },
    }
}

/// Removes the cgroups that supervisors which died without cleaning up (they
/// were SIGKILLed) left in `parent`: `cell0-<name>-<pid>` where no process
/// `<pid>` exists any more. `rmdir` refuses a cgroup that still holds a process,
/// so the cgroup of a running VM is never removed.
fn sweep_stale(parent: &Path) {
    let Ok(rd) = std::fs::read_dir(parent) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("cell0-"))
            .and_then(|n| n.rsplit_once('-'))
            .and_then(|(_, pid)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == 0 || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        if std::fs::remove_dir(e.path()).is_ok() {
            tracing::info!(cgroup = %e.path().display(), "removed the cgroup of a VM whose supervisor was killed");
        }
    }
}

impl Cgroup {
    /// Creates `cell0-<name>` in this process's own cgroup of each hierarchy and
    /// writes `limits`, reading the real mount table and `/proc/self/cgroup`.
    pub fn create(
        name: &str,
        limits: &Limits,
        want: Option<CgroupVersion>,
    ) -> Result<Self, JailError> {
        let read = |p: &str| {
            std::fs::read_to_string(p).map_err(step_io(format!("read {p} to find the cgroups")))
        };
        let mounts = parse_mountinfo(&read("/proc/self/mountinfo")?);
        let own = parse_proc_cgroup(&read("/proc/self/cgroup")?);
        Self::create_in(&mounts, &own, name, limits, want)
    }

    /// [`Cgroup::create`] with the mount table and own paths given (tests).
    pub fn create_in(
        mounts: &Mounts,
        own: &OwnCgroups,
        name: &str,
        limits: &Limits,
        want: Option<CgroupVersion>,
    ) -> Result<Self, JailError> {
        let version = choose(mounts, own, want)?;
        let leaf = format!("cell0-{name}");
        let mut cg = Cgroup {
            version,
            dirs: Vec::new(),
        };
        let result = cg.create_dirs(mounts, own, &leaf, limits);
        if result.is_err() {
            cg.remove();
        }
        result.map(|()| cg)
    }

    fn create_dirs(
        &mut self,
        mounts: &Mounts,
        own: &OwnCgroups,
        leaf: &str,
        limits: &Limits,
    ) -> Result<(), JailError> {
        let mut by_ctrl: HashMap<&str, PathBuf> = HashMap::new();
        match self.version {
            CgroupVersion::V1 => {
                for c in CONTROLLERS {
                    let mount = &mounts.v1[c];
                    let parent = join_rel(mount, own.v1.get(c).map_or("/", String::as_str));
                    let dir = parent.join(leaf);
                    // Co-mounted controllers (cpu,cpuacct) share one directory.
                    if !self.dirs.contains(&dir) {
                        sweep_stale(&parent);
                        std::fs::create_dir(&dir)
                            .map_err(step_io(format!("create the {c} cgroup {}", dir.display())))?;
                        self.dirs.push(dir.clone());
                    }
                    by_ctrl.insert(c, dir);
                }
            }
            CgroupVersion::V2 => {
                let mount = mounts.v2.as_ref().ok_or_else(|| JailError::Refused {
                    step: "create the cgroup".into(),
                    why: "no cgroup2 file system is mounted".into(),
                })?;
                let parent = join_rel(mount, own.v2.as_deref().unwrap_or("/"));
                let ctl = parent.join("cgroup.subtree_control");
                // Children get the controllers only if the parent hands them down;
                // a non-root parent that holds processes cannot ("no internal
                // processes"), which is the usual missing-delegation error.
                std::fs::write(&ctl, "+cpu +memory +pids").map_err(step_io(format!(
                    "enable cpu, memory and pids for child cgroups in {} \
                     (cgroup v2 needs a delegated parent cgroup without processes)",
                    ctl.display()
                )))?;
                sweep_stale(&parent);
                let dir = parent.join(leaf);
                std::fs::create_dir(&dir)
                    .map_err(step_io(format!("create the cgroup {}", dir.display())))?;
                self.dirs.push(dir.clone());
                for c in CONTROLLERS {
                    by_ctrl.insert(c, dir.clone());
                }
            }
        }
        for (ctrl, file, value) in limits.files(self.version) {
            let p = by_ctrl[ctrl].join(file);
            std::fs::write(&p, &value).map_err(step_io(format!(
                "set the {ctrl} limit: write {value:?} to {}",
                p.display()
            )))?;
        }
        Ok(())
    }

    /// Moves process `pid` (and all its threads) into the cgroup.
    pub fn add_process(&self, pid: u32) -> Result<(), JailError> {
        for d in &self.dirs {
            let p = d.join("cgroup.procs");
            std::fs::write(&p, pid.to_string()).map_err(step_io(format!(
                "move the VMM (pid {pid}) into {}",
                p.display()
            )))?;
        }
        Ok(())
    }

    /// Removes the cgroup directories (they must be empty: the VMM has exited).
    /// Retries briefly, since a v1 memory cgroup can stay busy for a moment.
    pub fn remove(&self) {
        for d in self.dirs.iter().rev() {
            let mut last = None;
            for _ in 0..50 {
                match std::fs::remove_dir(d) {
                    Ok(()) => {
                        last = None;
                        break;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        last = None;
                        break;
                    }
                    Err(e) => last = Some(e),
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            if let Some(e) = last {
                tracing::warn!(dir = %d.display(), error = %e, "cannot remove the VM's cgroup");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const MOUNTINFO: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime shared:5 - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/un\\040ified rw,relatime - cgroup2 cgroup2 rw
";

    const PROC_CGROUP: &str = "\
9:name=systemd:/
8:pids:/
4:memory:/process_api/abc
1:cpu,cpuacct:/
0::/
";

    fn limits() -> Limits {
        Limits {
            cpu_quota_us: 200_000,
            cpu_period_us: 100_000,
            memory_bytes: 256 << 20,
            pids: 20,
        }
    }

    #[test]
    fn parses_hybrid_mounts_and_own_paths() {
        let m = parse_mountinfo(MOUNTINFO);
        assert_eq!(m.v2, Some(PathBuf::from("/sys/fs/cgroup/un ified")));
        assert_eq!(m.v1["cpu"], PathBuf::from("/sys/fs/cgroup/cpu,cpuacct"));
        assert_eq!(m.v1["memory"], PathBuf::from("/sys/fs/cgroup/memory"));
        assert_eq!(m.v1["pids"], PathBuf::from("/sys/fs/cgroup/pids"));
        assert!(!m.v1.contains_key("name=systemd"));
        let own = parse_proc_cgroup(PROC_CGROUP);
        assert_eq!(own.v2.as_deref(), Some("/"));
        assert_eq!(own.v1["memory"], "/process_api/abc");
        assert_eq!(own.v1["cpuacct"], "/");
    }

    /// A fake cgroup tree: v1 controllers and a v2 mount, in a temp dir.
    fn fake(v2_controllers: &str) -> (tempfile::TempDir, Mounts, OwnCgroups) {
        let d = tempfile::tempdir().unwrap();
        let mut m = Mounts::default();
        for c in CONTROLLERS {
            let p = d.path().join("v1").join(c);
            std::fs::create_dir_all(p.join("parent")).unwrap();
            m.v1.insert(c.into(), p);
        }
        let v2 = d.path().join("v2");
        std::fs::create_dir_all(&v2).unwrap();
        std::fs::write(v2.join("cgroup.controllers"), v2_controllers).unwrap();
        m.v2 = Some(v2);
        let mut own = OwnCgroups {
            v2: Some("/".into()),
            ..Default::default()
        };
        own.v1.insert("memory".into(), "/parent".into());
        (d, m, own)
    }

    #[test]
    fn v1_writes_each_controllers_files_under_the_own_cgroup() {
        let (_d, m, own) = fake("hugetlb");
        let cg = Cgroup::create_in(&m, &own, "vm1", &limits(), None).unwrap();
        assert_eq!(cg.version, CgroupVersion::V1);
        let mem = m.v1["memory"].join("parent/cell0-vm1");
        assert_eq!(
            std::fs::read_to_string(mem.join("memory.limit_in_bytes")).unwrap(),
            (256u64 << 20).to_string()
        );
        let cpu = m.v1["cpu"].join("cell0-vm1");
        assert_eq!(
            std::fs::read_to_string(cpu.join("cpu.cfs_quota_us")).unwrap(),
            "200000"
        );
        assert_eq!(
            std::fs::read_to_string(cpu.join("cpu.cfs_period_us")).unwrap(),
            "100000"
        );
        let pids = m.v1["pids"].join("cell0-vm1");
        assert_eq!(
            std::fs::read_to_string(pids.join("pids.max")).unwrap(),
            "20"
        );
        cg.add_process(42).unwrap();
        assert_eq!(
            std::fs::read_to_string(pids.join("cgroup.procs")).unwrap(),
            "42"
        );
        // A real cgroupfs removes the files with the directory; here, clear them first.
        for d in &cg.dirs {
            for f in std::fs::read_dir(d).unwrap() {
                std::fs::remove_file(f.unwrap().path()).unwrap();
            }
        }
        cg.remove();
        assert!(!mem.exists() && !cpu.exists() && !pids.exists());
    }

    #[test]
    fn v2_is_preferred_when_it_has_every_controller() {
        let (_d, m, own) = fake("cpuset cpu io memory pids");
        let cg = Cgroup::create_in(&m, &own, "vm2", &limits(), None).unwrap();
        assert_eq!(cg.version, CgroupVersion::V2);
        let v2 = m.v2.clone().unwrap();
        assert_eq!(
            std::fs::read_to_string(v2.join("cgroup.subtree_control")).unwrap(),
            "+cpu +memory +pids"
        );
        let dir = v2.join("cell0-vm2");
        assert_eq!(
            std::fs::read_to_string(dir.join("cpu.max")).unwrap(),
            "200000 100000"
        );
        assert_eq!(
            std::fs::read_to_string(dir.join("memory.max")).unwrap(),
            (256u64 << 20).to_string()
        );
        assert_eq!(std::fs::read_to_string(dir.join("pids.max")).unwrap(), "20");
        assert_eq!(cg.dirs, vec![dir]);
    }

    #[test]
    fn a_version_that_cannot_work_is_refused_with_the_reason() {
        let (_d, m, own) = fake("hugetlb");
        let e = Cgroup::create_in(&m, &own, "x", &limits(), Some(CgroupVersion::V2)).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("choose a cgroup version"), "{msg}");
        assert!(msg.contains("cpu, memory, pids controller"), "{msg}");
        let none = Mounts::default();
        let e = Cgroup::create_in(&none, &own, "x", &limits(), None).unwrap_err();
        assert!(e.to_string().contains("no v1 hierarchy is mounted"), "{e}");
    }

    #[test]
    fn cgroups_of_dead_supervisors_are_swept_and_live_ones_kept() {
        let (_d, m, own) = fake("hugetlb");
        let pids = m.v1["pids"].clone();
        // pid_max is at most 2^22: this supervisor never existed.
        let dead = pids.join("cell0-gone-999999999");
        let live = pids.join(format!("cell0-live-{}", std::process::id()));
        let other = pids.join("not-ours-999999999");
        for d in [&dead, &live, &other] {
            std::fs::create_dir(d).unwrap();
        }
        Cgroup::create_in(&m, &own, "new-1", &limits(), None).unwrap();
        assert!(!dead.exists());
        assert!(live.exists() && other.exists());
        assert!(pids.join("cell0-new-1").exists());
    }

    #[test]
    fn a_failed_step_names_the_file_and_leaves_nothing_behind() {
        let (_d, m, own) = fake("hugetlb");
        // The memory parent is missing: creating its cgroup fails after cpu's exists.
        std::fs::remove_dir(m.v1["memory"].join("parent")).unwrap();
        let e = Cgroup::create_in(&m, &own, "x", &limits(), None).unwrap_err();
        assert!(e.to_string().contains("create the memory cgroup"), "{e}");
        assert!(!m.v1["cpu"].join("cell0-x").exists());
    }
}
