// SPDX-License-Identifier: Apache-2.0
//! The configuration of one VM, as given on the `cell0-vmm launch` command line.

use std::path::PathBuf;

use crate::arch::MAX_VCPUS;

/// Most guest memory accepted, in MiB (1 TiB).
pub const MAX_MEMORY_MIB: u64 = 1 << 20;

/// The cmdline used when none is given: a serial console, i8042 reset, no PCI.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off";

/// Where the kernel comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelSource {
    /// The nano guest embedded in this binary.
    Nano,
    /// A file: ELF (vmlinux, nano) or bzImage.
    Path(PathBuf),
}

/// Where serial output goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialOutput {
    /// The VMM's stdout.
    Stdout,
    /// A file, created or truncated.
    File(PathBuf),
}

impl std::str::FromStr for SerialOutput {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(if s == "stdout" || s == "-" {
            Self::Stdout
        } else {
            Self::File(PathBuf::from(s))
        })
    }
}

/// The vsock device: guest CID and the host Unix socket of the hybrid backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    /// Guest context id (3 ..= u32::MAX - 1).
    pub cid: u64,
    /// Host socket: host processes connect here and send `CONNECT <port>`;
    /// guest connections to port P go to `<uds>_P`.
    pub uds: PathBuf,
}

/// A virtio-blk disk: `--disk PATH[,ro]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// The image file (or block device).
    pub path: PathBuf,
    /// The guest may not write.
    pub read_only: bool,
}

impl std::str::FromStr for DiskConfig {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (path, read_only) = match s.rsplit_once(',') {
            Some((p, "ro")) => (p, true),
            Some((p, "rw")) => (p, false),
            // A comma inside a directory name is part of the path.
            Some((_, opt)) if !opt.contains('/') => {
                return Err(ConfigError::DiskOption(opt.to_string()));
            }
            _ => (s, false),
        };
        if path.is_empty() {
            return Err(ConfigError::DiskOption(s.to_string()));
        }
        Ok(Self {
            path: PathBuf::from(path),
            read_only,
        })
    }
}

/// Invalid configuration values.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// vCPU count out of range.
    #[error("--vcpus must be between 1 and {MAX_VCPUS}, got {0}")]
    Vcpus(u64),
    /// Memory size out of range.
    #[error("--memory-mib must be between 1 and {MAX_MEMORY_MIB}, got {0}")]
    Memory(u64),
    /// Vsock CID reserved or out of range.
    #[error("--cid must be between 3 and 4294967294, got {0}")]
    Cid(u64),
    /// Shared-memory window too large.
    #[error("--shm-mib must be at most {max}, got {0}", max = crate::shm::MAX_SHM_MIB)]
    Shm(u64),
    /// Only one of the vsock options was given.
    #[error("--vsock-uds and --cid go together")]
    VsockHalf,
    /// A `--disk` value that is not `PATH`, `PATH,ro` or `PATH,rw`.
    #[error("--disk takes PATH, PATH,ro or PATH,rw; got {0:?}")]
    DiskOption(String),
    /// A lease out of range.
    #[error("--lease-ms must be between 1 and {max}, got {0}", max = crate::lease::MAX_LEASE_MS)]
    Lease(u64),
}

/// The VM's lease (`--lease-ms`, see [`crate::lease`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseConfig {
    /// Its length at launch, in ms.
    pub ms: u64,
    /// When it ends unless renewed: VMM start + `ms` (`CLOCK_MONOTONIC` ns).
    pub deadline_ns: u64,
}

/// A VM to launch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// Kernel image.
    pub kernel: KernelSource,
    /// Optional initrd.
    pub initrd: Option<PathBuf>,
    /// Kernel command line; `None` means [`DEFAULT_CMDLINE`].
    pub cmdline: Option<String>,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Serial console output.
    pub serial: SerialOutput,
    /// Optional virtio-vsock device.
    pub vsock: Option<VsockConfig>,
    /// Optional per-VM API socket.
    pub api_sock: Option<PathBuf>,
    /// Measured boot into a per-VM vTPM.
    pub tpm: Option<crate::tpm::TpmConfig>,
    /// Shared-memory window size in MiB (0: none).
    pub shm_mib: u64,
    /// virtio-blk disks, in the order given.
    pub disks: Vec<DiskConfig>,
    /// Whether the guest gets a virtio-rng device.
    pub rng: bool,
    /// The lease that fences the VM unless renewed (none: it runs until it stops).
    pub lease: Option<LeaseConfig>,
}

impl VmConfig {
    /// Checks the numeric limits and returns a config.
    pub fn new(
        kernel: KernelSource,
        initrd: Option<PathBuf>,
        cmdline: Option<String>,
        vcpus: u64,
        memory_mib: u64,
        serial: SerialOutput,
    ) -> Result<Self, ConfigError> {
        let vcpus = u8::try_from(vcpus)
            .ok()
            .filter(|v| (1..=MAX_VCPUS).contains(v))
            .ok_or(ConfigError::Vcpus(vcpus))?;
        if !(1..=MAX_MEMORY_MIB).contains(&memory_mib) {
            return Err(ConfigError::Memory(memory_mib));
        }
        Ok(Self {
            kernel,
            initrd,
            cmdline,
            vcpus,
            memory_mib,
            serial,
            vsock: None,
            api_sock: None,
            tpm: None,
            shm_mib: 0,
            disks: Vec::new(),
            rng: false,
            lease: None,
        })
    }

    /// Sets the lease: `ms` from `start_ns` (`CLOCK_MONOTONIC`); `None`: no lease.
    pub fn with_lease(mut self, ms: Option<u64>, start_ns: u64) -> Result<Self, ConfigError> {
        self.lease = match ms {
            None => None,
            Some(ms) if (1..=crate::lease::MAX_LEASE_MS).contains(&ms) => Some(LeaseConfig {
                ms,
                deadline_ns: start_ns.saturating_add(ms * 1_000_000),
            }),
            Some(ms) => return Err(ConfigError::Lease(ms)),
        };
        Ok(self)
    }

    /// Sets the shared-memory window size.
    pub fn with_shm(mut self, mib: u64) -> Result<Self, ConfigError> {
        if mib > crate::shm::MAX_SHM_MIB {
            return Err(ConfigError::Shm(mib));
        }
        self.shm_mib = mib;
        Ok(self)
    }

    /// A JSON description of the VM, as the API's `describe` returns it.
    pub fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "kernel": match &self.kernel {
                KernelSource::Nano => "nano".to_string(),
                KernelSource::Path(p) => p.display().to_string(),
            },
            "initrd": self.initrd.as_ref().map(|p| p.display().to_string()),
            "cmdline": self.cmdline,
            "vcpus": self.vcpus,
            "memory_mib": self.memory_mib,
            "vsock": self.vsock.as_ref().map(|v| serde_json::json!({
                "cid": v.cid, "uds": v.uds.display().to_string()
            })),
            "tpm": self.tpm.is_some(),
            "shm_mib": self.shm_mib,
            "disks": self.disks.iter().map(|d| serde_json::json!({
                "path": d.path.display().to_string(), "read_only": d.read_only
            })).collect::<Vec<_>>(),
            "rng": self.rng,
            "lease_ms": self.lease.map(|l| l.ms),
        })
    }

    /// Adds a vsock device from the `--vsock-uds`/`--cid` pair (both or neither).
    pub fn with_vsock(
        mut self,
        uds: Option<PathBuf>,
        cid: Option<u64>,
    ) -> Result<Self, ConfigError> {
        self.vsock = match (uds, cid) {
            (None, None) => None,
            (Some(uds), Some(cid)) => {
                if !(3..u64::from(u32::MAX)).contains(&cid) {
                    return Err(ConfigError::Cid(cid));
                }
                Some(VsockConfig { cid, uds })
            }
            _ => return Err(ConfigError::VsockHalf),
        };
        Ok(self)
    }

    /// Guest memory in bytes.
    pub fn memory_bytes(&self) -> u64 {
        self.memory_mib << 20
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(vcpus: u64, mem: u64) -> Result<VmConfig, ConfigError> {
        VmConfig::new(
            KernelSource::Nano,
            None,
            None,
            vcpus,
            mem,
            SerialOutput::Stdout,
        )
    }

    #[test]
    fn limits() {
        assert!(cfg(1, 16).is_ok());
        assert!(cfg(32, 1024).is_ok());
        assert_eq!(cfg(0, 16), Err(ConfigError::Vcpus(0)));
        assert_eq!(cfg(33, 16), Err(ConfigError::Vcpus(33)));
        assert_eq!(cfg(300, 16), Err(ConfigError::Vcpus(300)));
        assert_eq!(cfg(1, 0), Err(ConfigError::Memory(0)));
        assert_eq!(
            cfg(1, MAX_MEMORY_MIB + 1),
            Err(ConfigError::Memory(MAX_MEMORY_MIB + 1))
        );
        assert_eq!(cfg(1, 16).unwrap().memory_bytes(), 16 << 20);
    }

    #[test]
    fn vsock_options() {
        let c = cfg(1, 16).unwrap();
        assert_eq!(c.clone().with_vsock(None, None).unwrap().vsock, None);
        let v = c
            .clone()
            .with_vsock(Some("/tmp/v.sock".into()), Some(3))
            .unwrap();
        assert_eq!(v.vsock.unwrap().cid, 3);
        assert_eq!(
            c.clone().with_vsock(Some("/x".into()), Some(2)),
            Err(ConfigError::Cid(2))
        );
        assert_eq!(
            c.clone()
                .with_vsock(Some("/x".into()), Some(u64::from(u32::MAX))),
            Err(ConfigError::Cid(u64::from(u32::MAX)))
        );
        assert_eq!(
            c.clone().with_vsock(None, Some(3)),
            Err(ConfigError::VsockHalf)
        );
        assert_eq!(
            c.with_vsock(Some("/x".into()), None),
            Err(ConfigError::VsockHalf)
        );
    }

    #[test]
    fn lease_options() {
        let c = cfg(1, 16).unwrap();
        assert_eq!(c.clone().with_lease(None, 5).unwrap().lease, None);
        let l = c.clone().with_lease(Some(2000), 7).unwrap().lease.unwrap();
        assert_eq!(l.deadline_ns, 7 + 2_000_000_000);
        assert_eq!(c.clone().with_lease(Some(0), 7), Err(ConfigError::Lease(0)));
        let over = crate::lease::MAX_LEASE_MS + 1;
        assert_eq!(c.with_lease(Some(over), 7), Err(ConfigError::Lease(over)));
    }

    #[test]
    fn disk_options_parse() {
        let d: DiskConfig = "/img/root.ext4,ro".parse().unwrap();
        assert_eq!(d.path, PathBuf::from("/img/root.ext4"));
        assert!(d.read_only);
        let d: DiskConfig = "/a,b/disk.img".parse().unwrap();
        assert_eq!(
            d,
            DiskConfig {
                path: PathBuf::from("/a,b/disk.img"),
                read_only: false
            }
        );
        assert!(!"x.img,rw".parse::<DiskConfig>().unwrap().read_only);
        assert_eq!(
            "x.img,rx".parse::<DiskConfig>(),
            Err(ConfigError::DiskOption("rx".into()))
        );
        assert!(",ro".parse::<DiskConfig>().is_err());
    }

    #[test]
    fn serial_output_parses() {
        assert_eq!(
            "stdout".parse::<SerialOutput>().unwrap(),
            SerialOutput::Stdout
        );
        assert_eq!(
            "/tmp/x".parse::<SerialOutput>().unwrap(),
            SerialOutput::File(PathBuf::from("/tmp/x"))
        );
    }
}
