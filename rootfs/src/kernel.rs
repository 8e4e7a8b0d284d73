// SPDX-License-Identifier: Apache-2.0
//! The kernel of an image: fetched from a Debian package (`apt-get download`,
//! unpacked with `dpkg-deb`), or given as files. Its config is checked for
//! what a cell0 guest needs, and the modules it needs are picked from its
//! `modules.dep`, dependencies first.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// apt-get does not know the package.
    #[error("package {package:?} is not available from apt (run `apt-get update`?): {detail}")]
    MissingPackage {
        /// The package.
        package: String,
        /// apt's own words.
        detail: String,
    },
    /// A tool could not be run.
    #[error("cannot run {tool} (is it installed?)")]
    Tool {
        /// The program.
        tool: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A tool ran and failed.
    #[error("{tool} failed: {detail}")]
    ToolFailed {
        /// The program.
        tool: &'static str,
        /// Its stderr.
        detail: String,
    },
    /// The package holds no kernel image.
    #[error("package {0} holds no /boot/vmlinuz-*")]
    NoKernelInPackage(String),
    /// A feature cell0 guests need is not in the kernel.
    #[error(
        "kernel {version} lacks CONFIG_{option} ({why}); use a kernel that has it \
         (`cell0-rootfs kernel` builds one, see docs/IMAGES.md) or pass --allow-unsuitable-kernel"
    )]
    MissingFeature {
        /// Kernel release.
        version: String,
        /// The config option, without `CONFIG_`.
        option: &'static str,
        /// What it is for.
        why: &'static str,
    },
    /// A module the config says exists is not in the module tree.
    #[error("kernel {version} is built with {module} as a module, but {module}.ko is not in {dir}")]
    MissingModule {
        /// Kernel release.
        version: String,
        /// Module name.
        module: String,
        /// Where it was looked for.
        dir: String,
    },
    /// A module is compressed; finit_module(2) would need the kernel to decompress it.
    #[error("module {0} is compressed; cell0 images need uncompressed .ko files")]
    CompressedModule(String),
    /// A file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

fn read(path: &Path) -> Result<String, KernelError> {
    std::fs::read_to_string(path).map_err(|source| KernelError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// One thing a cell0 guest needs from its kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Requirement {
    /// Config option without `CONFIG_`.
    pub option: &'static str,
    /// The module that provides it when it is `=m` (None: must be built in).
    pub module: Option<&'static str>,
    /// What it is for.
    pub why: &'static str,
}

/// What the kernel must have. Modules are listed in load order of the roots;
/// their own dependencies come from modules.dep.
pub const REQUIREMENTS: &[Requirement] = &[
    Requirement {
        option: "BLK_DEV_INITRD",
        module: None,
        why: "the initramfs",
    },
    Requirement {
        option: "RD_GZIP",
        module: None,
        why: "the gzip-compressed initramfs",
    },
    Requirement {
        option: "DEVTMPFS",
        module: None,
        why: "/dev",
    },
    Requirement {
        option: "SERIAL_8250_CONSOLE",
        module: None,
        why: "the console on ttyS0",
    },
    Requirement {
        option: "SERIO_I8042",
        module: None,
        why: "reset through the i8042 (reboot=k)",
    },
    Requirement {
        option: "VIRTIO_MMIO",
        module: Some("virtio_mmio"),
        why: "the virtio-mmio transport of every cell0 device",
    },
    Requirement {
        option: "VIRTIO_MMIO_CMDLINE_DEVICES",
        module: None,
        why: "finding cell0-vmm's devices from virtio_mmio.device= on the command line",
    },
    Requirement {
        option: "VSOCKETS",
        module: Some("vsock"),
        why: "AF_VSOCK for SYPAS",
    },
    Requirement {
        option: "VIRTIO_VSOCKETS",
        module: Some("vmw_vsock_virtio_transport"),
        why: "the virtio-vsock transport for SYPAS",
    },
    Requirement {
        option: "HW_RANDOM_VIRTIO",
        module: Some("virtio_rng"),
        why: "entropy from virtio-rng",
    },
    Requirement {
        option: "VIRTIO_BLK",
        module: Some("virtio_blk"),
        why: "virtio-blk disks",
    },
];

/// Parses a kernel .config into option → value (`y`, `m`, a string…).
pub fn parse_config(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("CONFIG_"))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Checks `config` against [`REQUIREMENTS`]; returns the modules to load
/// (roots only, in order). `allow` turns a missing feature into a warning.
pub fn check_config(
    version: &str,
    config: &BTreeMap<String, String>,
    allow: bool,
    warnings: &mut Vec<String>,
) -> Result<Vec<&'static str>, KernelError> {
    let mut modules = Vec::new();
    for r in REQUIREMENTS {
        match (config.get(r.option).map(String::as_str), r.module) {
            (Some("y"), _) => {}
            (Some("m"), Some(m)) => modules.push(m),
            _ => {
                let e = KernelError::MissingFeature {
                    version: version.to_string(),
                    option: r.option,
                    why: r.why,
                };
                if !allow {
                    return Err(e);
                }
                warnings.push(e.to_string());
            }
        }
    }
    Ok(modules)
}

fn norm(name: &str) -> String {
    name.replace('-', "_")
}

fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    norm(stem)
}

/// A kernel's module tree: where each module is, what it depends on, and
/// which modules are built in.
#[derive(Debug, Clone, Default)]
pub struct ModuleTree {
    /// Module name → path relative to the tree.
    pub paths: BTreeMap<String, String>,
    /// Module name → the modules it needs directly (`depends=` of its modinfo,
    /// or `modules.dep`).
    pub deps: BTreeMap<String, Vec<String>>,
    /// Names of built-in modules.
    pub builtin: BTreeSet<String>,
    /// The tree's directory, when modinfo is read from the files.
    pub dir: Option<PathBuf>,
}

/// The `depends=` list of a module's `.modinfo` ELF section.
pub fn modinfo_depends(ko: &[u8]) -> Option<Vec<String>> {
    let rd16 = |o: usize| {
        ko.get(o..o + 2)
            .map(|s| u16::from_le_bytes([s[0], s[1]]) as usize)
    };
    let rd32 = |o: usize| {
        ko.get(o..o + 4)
            .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]) as usize)
    };
    let rd64 = |o: usize| {
        ko.get(o..o + 8)
            .and_then(|s| <[u8; 8]>::try_from(s).ok())
            .and_then(|b| usize::try_from(u64::from_le_bytes(b)).ok())
    };
    if !ko.starts_with(b"\x7fELF") || ko.get(4) != Some(&2) {
        return None;
    }
    let (shoff, shentsize, shnum, shstrndx) = (rd64(0x28)?, rd16(0x3a)?, rd16(0x3c)?, rd16(0x3e)?);
    let sh = |i: usize| shoff.checked_add(i.checked_mul(shentsize)?);
    let strtab = rd64(sh(shstrndx)? + 24)?;
    for i in 0..shnum {
        let h = sh(i)?;
        let name_off = strtab.checked_add(rd32(h)?)?;
        let name = ko.get(name_off..)?.split(|b| *b == 0).next()?;
        if name != b".modinfo" {
            continue;
        }
        let (off, size) = (rd64(h + 24)?, rd64(h + 32)?);
        let data = ko.get(off..off.checked_add(size)?)?;
        for kv in data.split(|b| *b == 0) {
            if let Some(v) = kv.strip_prefix(b"depends=") {
                return Some(
                    String::from_utf8_lossy(v)
                        .split(',')
                        .filter(|d| !d.is_empty())
                        .map(norm)
                        .collect(),
                );
            }
        }
        return Some(Vec::new());
    }
    Some(Vec::new())
}

impl ModuleTree {
    /// Parses `modules.dep` and `modules.builtin` texts.
    pub fn parse(dep: &str, builtin: &str) -> Self {
        let mut t = Self::default();
        for line in dep.lines() {
            let Some((m, rest)) = line.split_once(':') else {
                continue;
            };
            let name = module_name(m);
            // modules.dep lists the whole closure; the first entry of each
            // dependency's own line covers the rest, so direct is enough.
            t.deps.insert(
                name.clone(),
                rest.split_whitespace().map(module_name).collect(),
            );
            t.paths.insert(name, m.to_string());
        }
        t.builtin = builtin
            .lines()
            .map(module_name)
            .filter(|s| !s.is_empty())
            .collect();
        t
    }

    /// Reads the tree at `dir` (`/lib/modules/<version>`): `modules.dep` when
    /// it exists, else (a tree straight from a .deb, before depmod ran) every
    /// `*.ko` file's modinfo, read as needed.
    pub fn read(dir: &Path) -> Result<Self, KernelError> {
        let builtin = std::fs::read_to_string(dir.join("modules.builtin")).unwrap_or_default();
        if dir.join("modules.dep").is_file() {
            return Ok(Self::parse(&read(&dir.join("modules.dep"))?, &builtin));
        }
        let mut t = Self {
            builtin: builtin
                .lines()
                .map(module_name)
                .filter(|s| !s.is_empty())
                .collect(),
            ..Self::default()
        };
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            let rd = std::fs::read_dir(&d).map_err(|source| KernelError::Read {
                path: d.display().to_string(),
                source,
            })?;
            for e in rd.flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if let Some(rel) = p.strip_prefix(dir).ok().and_then(|r| r.to_str()) {
                    if rel.contains(".ko") {
                        t.paths.insert(module_name(rel), rel.to_string());
                    }
                }
            }
        }
        t.dir = Some(dir.to_path_buf());
        Ok(t)
    }

    fn deps_of(&mut self, name: &str) -> Result<Vec<String>, KernelError> {
        if let Some(d) = self.deps.get(name) {
            return Ok(d.clone());
        }
        let (Some(dir), Some(rel)) = (self.dir.clone(), self.paths.get(name).cloned()) else {
            return Ok(Vec::new());
        };
        if !rel.ends_with(".ko") {
            return Err(KernelError::CompressedModule(rel));
        }
        let ko = std::fs::read(dir.join(&rel)).map_err(|source| KernelError::Read {
            path: rel.clone(),
            source,
        })?;
        let d = modinfo_depends(&ko).unwrap_or_default();
        self.deps.insert(name.to_string(), d.clone());
        Ok(d)
    }

    /// The module files to load for `roots`, in load order: every module
    /// after all of its dependencies, each once. Built-in modules need nothing.
    pub fn load_order(
        &mut self,
        version: &str,
        dir: &str,
        roots: &[&str],
    ) -> Result<Vec<String>, KernelError> {
        let mut order: Vec<String> = Vec::new();
        let mut done: BTreeSet<String> = BTreeSet::new();
        // Iterative depth-first post-order: (name, children pushed).
        for root in roots {
            let mut stack = vec![(norm(root), false)];
            while let Some((name, expanded)) = stack.pop() {
                if done.contains(&name) || self.builtin.contains(&name) {
                    continue;
                }
                let Some(path) = self.paths.get(&name).cloned() else {
                    return Err(KernelError::MissingModule {
                        version: version.to_string(),
                        module: name,
                        dir: dir.to_string(),
                    });
                };
                if path.ends_with(".xz") || path.ends_with(".zst") || path.ends_with(".gz") {
                    return Err(KernelError::CompressedModule(path));
                }
                if expanded {
                    done.insert(name);
                    order.push(path);
                    continue;
                }
                if stack.len() > 4096 {
                    break;
                }
                stack.push((name.clone(), true));
                for d in self.deps_of(&name)?.into_iter().rev() {
                    if !done.contains(&d) {
                        stack.push((d, false));
                    }
                }
            }
        }
        Ok(order)
    }
}

/// A kernel ready to go into an image.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// Release string (`6.1.0-56-cloud-amd64`), or "unknown".
    pub version: String,
    /// Where it came from, for people (`linux-image-6.1.0-56-cloud-amd64 6.1.192-2`).
    pub source: String,
    /// The image file (bzImage or ELF).
    pub image: PathBuf,
    /// Its .config, when known.
    pub config: Option<PathBuf>,
    /// Its module tree (`/lib/modules/<version>`), when it has one.
    pub modules_dir: Option<PathBuf>,
}

fn run(tool: &'static str, cmd: &mut Command) -> Result<String, KernelError> {
    let out = cmd
        .output()
        .map_err(|source| KernelError::Tool { tool, source })?;
    if !out.status.success() {
        return Err(KernelError::ToolFailed {
            tool,
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `apt-get download PACKAGE` into `dir`; returns the .deb.
pub fn apt_download(package: &str, dir: &Path) -> Result<PathBuf, KernelError> {
    let out = Command::new("apt-get")
        .args(["download", "-q", package])
        .current_dir(dir)
        .output()
        .map_err(|source| KernelError::Tool {
            tool: "apt-get",
            source,
        })?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let detail = stderr
            .lines()
            .find(|l| l.starts_with("E:"))
            .unwrap_or(stderr.trim())
            .to_string();
        if detail.contains("Unable to locate package")
            || detail.contains("has no installation candidate")
            || detail.contains("Can't select")
        {
            return Err(KernelError::MissingPackage {
                package: package.to_string(),
                detail,
            });
        }
        return Err(KernelError::ToolFailed {
            tool: "apt-get",
            detail,
        });
    }
    let prefix = format!("{}_", package.split(['=', ':']).next().unwrap_or(package));
    let mut debs: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|source| KernelError::Read {
            path: dir.display().to_string(),
            source,
        })?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
        })
        .collect();
    debs.sort();
    debs.pop().ok_or_else(|| KernelError::MissingPackage {
        package: package.to_string(),
        detail: "apt-get reported success but wrote no .deb".into(),
    })
}

/// A control field of a .deb (`dpkg-deb -f DEB FIELD`).
pub fn deb_field(deb: &Path, field: &str) -> Result<String, KernelError> {
    Ok(run(
        "dpkg-deb",
        Command::new("dpkg-deb").arg("-f").arg(deb).arg(field),
    )?
    .trim()
    .to_string())
}

/// The first `linux-image-*` package a metapackage depends on.
pub fn image_dependency(depends: &str) -> Option<String> {
    depends
        .split(',')
        .flat_map(|alt| alt.split('|'))
        .map(|d| d.trim().split([' ', '(']).next().unwrap_or("").to_string())
        .find(|d| {
            d.strip_prefix("linux-image-")
                .is_some_and(|v| v.starts_with(|c: char| c.is_ascii_digit()))
        })
}

/// Downloads and unpacks a Debian kernel package (or a metapackage such as
/// `linux-image-cloud-amd64`, whose image dependency is followed) into `work`.
pub fn fetch_debian(
    package: &str,
    work: &Path,
    progress: &dyn Fn(&str),
) -> Result<Kernel, KernelError> {
    progress(&format!("apt-get download {package}"));
    let mut deb = apt_download(package, work)?;
    let mut name = deb_field(&deb, "Package")?;
    let listing = run("dpkg-deb", Command::new("dpkg-deb").arg("-c").arg(&deb))?;
    if !listing.contains("./boot/vmlinuz-") {
        let depends = deb_field(&deb, "Depends")?;
        let Some(dep) = image_dependency(&depends) else {
            return Err(KernelError::NoKernelInPackage(name));
        };
        progress(&format!("apt-get download {dep}"));
        deb = apt_download(&dep, work)?;
        name = dep;
    }
    let version = deb_field(&deb, "Version")?;
    let root = work.join("pkg");
    progress(&format!("unpacking {name} {version}"));
    run(
        "dpkg-deb",
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root),
    )?;
    let boot = root.join("boot");
    let vmlinuz = std::fs::read_dir(&boot)
        .map_err(|source| KernelError::Read {
            path: boot.display().to_string(),
            source,
        })?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .ok_or_else(|| KernelError::NoKernelInPackage(name.clone()))?;
    let release = vmlinuz
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .unwrap_or("unknown")
        .to_string();
    let config = boot.join(format!("config-{release}"));
    let modules = root.join("lib/modules").join(&release);
    Ok(Kernel {
        source: format!("{name} {version}"),
        image: vmlinuz,
        config: config.is_file().then_some(config),
        modules_dir: modules.is_dir().then_some(modules),
        version: release,
    })
}

/// The release string a bzImage carries (`6.1.0-56-cloud-amd64 (debian-kernel@…) #1 SMP …`),
/// first word only; None for other images.
pub fn bzimage_version(image: &[u8]) -> Option<String> {
    if image.get(0x202..0x206)? != b"HdrS" {
        return None;
    }
    let off = u16::from_le_bytes([*image.get(0x20e)?, *image.get(0x20f)?]) as usize + 0x200;
    let s = image.get(off..off + 256)?;
    let end = s.iter().position(|b| *b == 0 || *b == b' ')?;
    String::from_utf8(s[..end].to_vec()).ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const DEP: &str = "\
kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/virtio/virtio_ring.ko: kernel/drivers/virtio/virtio.ko
kernel/drivers/virtio/virtio.ko:
kernel/net/vmw_vsock/vsock.ko:
kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko: kernel/net/vmw_vsock/vsock.ko
kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko: kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko kernel/net/vmw_vsock/vsock.ko
kernel/drivers/char/hw_random/virtio-rng.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
";

    #[test]
    fn load_order_puts_dependencies_first_and_each_once() {
        let mut t = ModuleTree::parse(DEP, "kernel/drivers/char/hw_random/rng-core.ko\n");
        let order = t
            .load_order(
                "v",
                "d",
                &[
                    "virtio_mmio",
                    "vsock",
                    "vmw_vsock_virtio_transport",
                    "virtio_rng",
                    "virtio_blk",
                ],
            )
            .unwrap();
        let names: Vec<String> = order.iter().map(|p| module_name(p)).collect();
        assert_eq!(
            names,
            [
                "virtio",
                "virtio_ring",
                "virtio_mmio",
                "vsock",
                "vmw_vsock_virtio_transport_common",
                "vmw_vsock_virtio_transport",
                "virtio_rng",
                "virtio_blk"
            ]
        );
        // Every module comes after all of its dependencies.
        for (i, p) in order.iter().enumerate() {
            for d in &t.deps[&module_name(p)] {
                let dp = &t.paths[d];
                assert!(order[..i].contains(dp), "{d} must precede {p}");
            }
        }
    }

    #[test]
    fn builtin_and_missing_modules() {
        let mut t = ModuleTree::parse(DEP, "kernel/drivers/block/virtio_blk.ko\n");
        assert_eq!(
            t.load_order("v", "d", &["virtio_blk"]).unwrap(),
            Vec::<String>::new()
        );
        assert!(matches!(
            t.load_order("6.1", "/lib/modules/6.1", &["nope"]),
            Err(KernelError::MissingModule { module, .. }) if module == "nope"
        ));
        let mut z = ModuleTree::parse("kernel/a.ko.xz:\n", "");
        assert!(matches!(
            z.load_order("v", "d", &["a"]),
            Err(KernelError::CompressedModule(_))
        ));
    }

    #[test]
    fn config_check_names_the_missing_option() {
        let mut w = Vec::new();
        let all_y: String = REQUIREMENTS
            .iter()
            .map(|r| format!("CONFIG_{}=y\n", r.option))
            .collect();
        assert!(
            check_config("v", &parse_config(&all_y), false, &mut w)
                .unwrap()
                .is_empty()
        );
        let debian_cloud = all_y
            .replace("CONFIG_VIRTIO_MMIO=y", "CONFIG_VIRTIO_MMIO=m")
            .replace("CONFIG_VIRTIO_BLK=y", "CONFIG_VIRTIO_BLK=m")
            .replace(
                "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y",
                "# CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES is not set",
            );
        let e = check_config(
            "6.1.0-56-cloud-amd64",
            &parse_config(&debian_cloud),
            false,
            &mut w,
        )
        .unwrap_err();
        assert!(matches!(
            e,
            KernelError::MissingFeature {
                option: "VIRTIO_MMIO_CMDLINE_DEVICES",
                ..
            }
        ));
        assert!(e.to_string().contains("CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES"));
        let m = check_config("v", &parse_config(&debian_cloud), true, &mut w).unwrap();
        assert_eq!(m, ["virtio_mmio", "virtio_blk"]);
        assert_eq!(w.len(), 1);
        // A bool option built as a module is still missing.
        let bad = all_y.replace("CONFIG_DEVTMPFS=y", "CONFIG_DEVTMPFS=m");
        assert!(check_config("v", &parse_config(&bad), false, &mut Vec::new()).is_err());
    }

    #[test]
    fn metapackage_dependency_is_found() {
        assert_eq!(
            image_dependency("linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)").as_deref(),
            Some("linux-image-6.1.0-56-cloud-amd64")
        );
        assert_eq!(
            image_dependency("foo, linux-image-6.1.0-1-amd64-unsigned | linux-image-6.1.0-1-amd64")
                .as_deref(),
            Some("linux-image-6.1.0-1-amd64-unsigned")
        );
        assert_eq!(image_dependency("linux-image-amd64"), None);
    }

    #[test]
    fn bzimage_version_is_read_from_the_header() {
        let mut img = vec![0u8; 0x1000];
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x20e..0x210].copy_from_slice(&0x300u16.to_le_bytes());
        img[0x500..0x51a].copy_from_slice(b"6.1.0-56-cloud-amd64 (deb)");
        assert_eq!(
            bzimage_version(&img).as_deref(),
            Some("6.1.0-56-cloud-amd64")
        );
        assert_eq!(bzimage_version(b"\x7fELF"), None);
    }
}
