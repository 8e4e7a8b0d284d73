// SPDX-License-Identifier: Apache-2.0
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::PathBuf;

use super::*;
use crate::config::{DiskConfig, VsockConfig};
use crate::tpm::TpmConfig;

fn cfg() -> VmConfig {
    let c = VmConfig::new(
        KernelSource::Path("/img/vmlinux".into()),
        Some("/img/initrd".into()),
        None,
        2,
        512,
        SerialOutput::File("/run/vm/serial.log".into()),
    )
    .unwrap();
    VmConfig {
        api_sock: Some("/run/vm/api.sock".into()),
        vsock: Some(VsockConfig {
            cid: 3,
            uds: "/run/vm/v.sock".into(),
        }),
        disks: vec![
            DiskConfig {
                path: "/img/root.ext4".into(),
                read_only: true,
            },
            DiskConfig {
                path: "/data/scratch.img".into(),
                read_only: false,
            },
        ],
        shm_mib: 64,
        tpm: Some(TpmConfig {
            run_dir: "/run/vm/tpm".into(),
            ..Default::default()
        }),
        ..c
    }
}

fn args() -> JailArgs {
    JailArgs {
        jail: true,
        uid: Some(1000),
        gid: Some(1000),
        jail_root: Some("/srv/jail/vm7".into()),
        ..Default::default()
    }
}

#[test]
fn exposes_exactly_what_the_vmm_opens() {
    let e = exposures(&cfg());
    assert_eq!(
        e,
        vec![
            Exposure::Dir("/run/vm".into()),
            Exposure::TpmDir("/run/vm/tpm".into()),
            Exposure::FileRw("/data/scratch.img".into()),
            Exposure::FileRw("/run/vm/serial.log".into()),
            Exposure::FileRo("/img/initrd".into()),
            Exposure::FileRo("/img/root.ext4".into()),
            Exposure::FileRo("/img/vmlinux".into()),
        ]
    );
    // The built-in guest on stdout needs nothing but /dev/kvm.
    let bare = VmConfig::new(KernelSource::Nano, None, None, 1, 16, SerialOutput::Stdout).unwrap();
    assert!(exposures(&bare).is_empty());
}

#[test]
fn limits_follow_the_vm_and_can_be_overridden() {
    let jc = JailConfig::new(&args(), &cfg()).unwrap();
    assert_eq!(jc.root, PathBuf::from("/srv/jail/vm7"));
    assert!(jc.id.starts_with("vm7-"));
    assert_eq!(
        jc.limits.memory_bytes,
        (512 + 64 + MEMORY_OVERHEAD_MIB) << 20
    );
    assert_eq!(jc.limits.cpu_quota_us, 3 * CPU_PERIOD_US);
    assert_eq!(jc.limits.pids, 2 + EXTRA_PIDS);
    assert_eq!(jc.nofile, DEFAULT_NOFILE);
    assert!(jc.proc && jc.loopback, "--tpm needs /proc and loopback");
    let a = JailArgs {
        jail_memory_mib: Some(100),
        jail_cpu_pct: Some(50),
        jail_pids: Some(7),
        jail_nofile: Some(64),
        jail_fsize_mib: Some(3),
        ..args()
    };
    let jc = JailConfig::new(&a, &cfg()).unwrap();
    assert_eq!(jc.limits.memory_bytes, 100 << 20);
    assert_eq!(jc.limits.cpu_quota_us, CPU_PERIOD_US / 2);
    assert_eq!(jc.limits.pids, 7);
    assert_eq!((jc.nofile, jc.fsize), (64, 3 << 20));
}

#[test]
fn root_ids_and_zero_limits_are_refused_with_the_step() {
    for a in [
        JailArgs {
            uid: Some(0),
            ..args()
        },
        JailArgs {
            gid: Some(0),
            ..args()
        },
    ] {
        let e = JailConfig::new(&a, &cfg()).unwrap_err().to_string();
        assert!(e.contains("check the jail options"), "{e}");
        assert!(e.contains("must not be 0"), "{e}");
    }
    let e = JailConfig::new(
        &JailArgs {
            jail_cpu_pct: Some(0),
            ..args()
        },
        &cfg(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("above zero"), "{e}");
}

#[test]
fn relative_paths_become_absolute() {
    let c = VmConfig {
        api_sock: Some("rel/api.sock".into()),
        ..VmConfig::new(
            KernelSource::Path("k".into()),
            None,
            None,
            1,
            16,
            SerialOutput::Stdout,
        )
        .unwrap()
    };
    let a = absolutize(&c).unwrap();
    let cwd = std::env::current_dir().unwrap();
    assert_eq!(a.kernel, KernelSource::Path(cwd.join("k")));
    assert_eq!(a.api_sock, Some(cwd.join("rel/api.sock")));
}

#[test]
fn socket_directories_must_be_writable_by_the_jail_user() {
    let d = tempfile::tempdir().unwrap();
    let set = |mode| std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(mode));
    let m = || std::fs::metadata(d.path()).unwrap();
    let (uid, gid) = (m().uid(), m().gid());
    set(0o700).unwrap();
    assert!(writable_by(&m(), uid, 12345));
    assert!(!writable_by(&m(), uid + 1, gid));
    set(0o770).unwrap();
    assert!(writable_by(&m(), uid + 1, gid));
    set(0o1733).unwrap();
    assert!(writable_by(&m(), uid + 1, gid + 1));
}
