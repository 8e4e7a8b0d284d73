// SPDX-License-Identifier: Apache-2.0
//! Building an image: gather the tree (agent as `/init`, busybox and its
//! applet links, kernel modules, the user's `--add` files), write it as a
//! sorted, timestamp-free cpio newc archive, gzip it, and write the manifest.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::cpio::{self, Entry, Kind};
use crate::kernel::{self, Kernel, KernelError, ModuleTree};
use crate::manifest::{self, Contents, FileRecord};

/// The guest agent built for images (static, by build.rs).
pub static AGENT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/cell0-agent"));

/// cell0-vmm's default command line; images use the same start.
pub const BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off";
/// Where cell0-vmm places virtio-mmio devices (docs/ARCHITECTURE.md).
const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
const VIRTIO_IRQ_BASE: u32 = 5;

/// Errors of an image build.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The kernel could not be fetched or does not fit.
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// A file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// An output file could not be written.
    #[error("cannot write {path}")]
    Write {
        /// The file.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Not enough free space where the image goes.
    #[error(
        "not enough space in {dir}: the image needs about {need_mib} MiB, {free_mib} MiB are free"
    )]
    NoSpace {
        /// The output directory.
        dir: String,
        /// Needed.
        need_mib: u64,
        /// Free.
        free_mib: u64,
    },
    /// busybox is missing or unusable.
    #[error("busybox: {0}")]
    Busybox(String),
    /// An `--add` argument is not `SRC:DST` with an absolute DST.
    #[error("--add takes SRC:DST with an absolute DST, got {0:?}")]
    AddSyntax(String),
    /// Two files claim the same path.
    #[error("{0} is in the image twice")]
    Duplicate(String),
    /// The archive could not be written.
    #[error(transparent)]
    Cpio(#[from] cpio::CpioError),
}

fn read_file(path: &Path) -> Result<Vec<u8>, ImageError> {
    std::fs::read(path).map_err(|source| ImageError::Read {
        path: path.display().to_string(),
        source,
    })
}

fn write_err(path: &Path, dir: &Path) -> impl FnOnce(std::io::Error) -> ImageError {
    let path = path.display().to_string();
    let dir = dir.display().to_string();
    move |source| {
        if source.raw_os_error() == Some(libc::ENOSPC) {
            ImageError::NoSpace {
                dir,
                need_mib: 0,
                free_mib: 0,
            }
        } else {
            ImageError::Write { path, source }
        }
    }
}

/// Where the kernel comes from.
#[derive(Debug, Clone)]
pub enum KernelChoice {
    /// A Debian package (or metapackage), fetched with apt-get.
    Debian(String),
    /// Files on disk.
    Path {
        /// The image (bzImage or vmlinux).
        image: PathBuf,
        /// Its .config (checked when given).
        config: Option<PathBuf>,
        /// Its module tree (`/lib/modules/<version>`).
        modules_dir: Option<PathBuf>,
    },
}

/// Which cell0-vmm devices the VM will have: they decide the
/// `virtio_mmio.device=` entries cell0-vmm appends, so the manifest's cmdline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Devices {
    /// `--vsock-uds/--cid` (SYPAS).
    pub vsock: bool,
    /// Number of `--disk`s.
    pub disks: u32,
    /// `--rng`.
    pub rng: bool,
}

impl Devices {
    /// The entries cell0-vmm appends, in its order (vsock, disks, rng).
    pub fn cmdline_entries(&self) -> Vec<String> {
        let n = u32::from(self.vsock) + self.disks + u32::from(self.rng);
        (0..n)
            .map(|i| {
                format!(
                    "virtio_mmio.device=4K@{:#x}:{}",
                    VIRTIO_MMIO_BASE + u64::from(i) * 0x1000,
                    VIRTIO_IRQ_BASE + i
                )
            })
            .collect()
    }
}

/// Everything `cell0-rootfs build` takes.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Output directory.
    pub out: PathBuf,
    /// Image name (manifest `name`).
    pub name: String,
    /// The kernel.
    pub kernel: KernelChoice,
    /// Build even if the kernel lacks something cell0 guests need.
    pub allow_unsuitable_kernel: bool,
    /// busybox binary (static); default: the busybox-static package's.
    pub busybox: Option<PathBuf>,
    /// Agent binary; default: the one embedded at build time.
    pub agent: Option<PathBuf>,
    /// `--add SRC:DST` pairs.
    pub adds: Vec<(PathBuf, String)>,
    /// Words added to the base command line.
    pub append: String,
    /// The VM's devices.
    pub devices: Devices,
    /// Timestamp of every archive entry.
    pub mtime: u32,
    /// Draw progress bars.
    pub progress: bool,
}

/// What a build produced.
#[derive(Debug, Clone)]
pub struct Built {
    /// `vmlinuz`.
    pub kernel: PathBuf,
    /// `initrd.img`.
    pub initrd: PathBuf,
    /// `manifest.json`.
    pub manifest: PathBuf,
    /// `contents.json`.
    pub contents: PathBuf,
    /// What to give `cell0-vmm launch --cmdline`.
    pub cmdline: String,
    /// The command line the guest will see (measured into PCR 8).
    pub full_cmdline: String,
    /// Warnings for people.
    pub warnings: Vec<String>,
}

/// Parses `SRC:DST`.
pub fn parse_add(s: &str) -> Result<(PathBuf, String), ImageError> {
    let (src, dst) = s
        .rsplit_once(':')
        .ok_or_else(|| ImageError::AddSyntax(s.into()))?;
    if src.is_empty() || !dst.starts_with('/') || dst.contains("/../") || dst.ends_with("/..") {
        return Err(ImageError::AddSyntax(s.into()));
    }
    Ok((PathBuf::from(src), dst.to_string()))
}

/// Whether an ELF executable is statically linked (has no PT_INTERP).
pub fn is_static_elf(b: &[u8]) -> bool {
    let rd16 = |o: usize| b.get(o..o + 2).map(|s| u16::from_le_bytes([s[0], s[1]]));
    let rd32 = |o: usize| {
        b.get(o..o + 4)
            .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    };
    let rd64 = |o: usize| {
        b.get(o..o + 8)
            .and_then(|s| <[u8; 8]>::try_from(s).ok())
            .map(u64::from_le_bytes)
    };
    if !b.starts_with(b"\x7fELF") || b.get(4) != Some(&2) {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (rd64(0x20), rd16(0x36), rd16(0x38)) else {
        return false;
    };
    (0..u64::from(phnum)).all(|i| {
        let o = phoff + i * u64::from(phentsize);
        usize::try_from(o).ok().and_then(rd32) != Some(3)
    })
}

struct Tree {
    entries: BTreeMap<String, Entry>,
}

impl Tree {
    fn new() -> Self {
        Self {
            entries: BTreeMap::new(),
        }
    }

    fn parents(&mut self, path: &str) {
        let mut p = path;
        while let Some((parent, _)) = p.rsplit_once('/') {
            self.entries.entry(parent.to_string()).or_insert(Entry {
                path: parent.to_string(),
                kind: Kind::Dir,
                perm: 0o755,
            });
            p = parent;
        }
    }

    fn add(&mut self, path: &str, kind: Kind, perm: u32) -> Result<(), ImageError> {
        let path = path.trim_start_matches('/').to_string();
        self.parents(&path);
        if let Some(old) = self.entries.get(&path) {
            if !(matches!(old.kind, Kind::Dir) && matches!(kind, Kind::Dir)) {
                return Err(ImageError::Duplicate(format!("/{path}")));
            }
        }
        self.entries
            .insert(path.clone(), Entry { path, kind, perm });
        Ok(())
    }

    /// Adds a file or a directory tree from the host.
    fn add_host(&mut self, src: &Path, dst: &str) -> Result<(), ImageError> {
        let meta = std::fs::symlink_metadata(src).map_err(|source| ImageError::Read {
            path: src.display().to_string(),
            source,
        })?;
        use std::os::unix::fs::PermissionsExt;
        let perm = meta.permissions().mode() & 0o7777;
        if meta.file_type().is_symlink() {
            let t = std::fs::read_link(src).map_err(|source| ImageError::Read {
                path: src.display().to_string(),
                source,
            })?;
            self.add(dst, Kind::Symlink(t.display().to_string()), 0o777)
        } else if meta.is_dir() {
            self.add(dst, Kind::Dir, perm)?;
            let mut children: Vec<_> = std::fs::read_dir(src)
                .map_err(|source| ImageError::Read {
                    path: src.display().to_string(),
                    source,
                })?
                .flatten()
                .map(|e| e.file_name())
                .collect();
            children.sort();
            for c in children {
                let name = c.to_string_lossy();
                self.add_host(
                    &src.join(&c),
                    &format!("{}/{name}", dst.trim_end_matches('/')),
                )?;
            }
            Ok(())
        } else {
            self.add(dst, Kind::File(read_file(src)?), perm)
        }
    }
}

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

fn free_bytes(dir: &Path) -> Option<u64> {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statvfs is plain old data; all-zero is valid.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid NUL-terminated path and a pointer to a local statvfs.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return None;
    }
    Some(s.f_bavail as u64 * s.f_frsize as u64)
}

fn bar(enabled: bool, len: u64, msg: &str) -> indicatif::ProgressBar {
    if !enabled {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(len);
    pb.set_style(
        indicatif::ProgressStyle::with_template("{msg:>12} [{bar:40}] {bytes}/{total_bytes}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_message(msg.to_string());
    pb
}

fn spinner(enabled: bool) -> indicatif::ProgressBar {
    if !enabled {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new_spinner();
    pb.enable_steady_tick(std::time::Duration::from_millis(100));
    pb
}

/// Writes `bytes` through a progress bar.
struct Counting<W> {
    inner: W,
    pb: indicatif::ProgressBar,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(b)?;
        self.pb.inc(n as u64);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn busybox_applets(busybox: &Path) -> Result<Vec<String>, ImageError> {
    let out = std::process::Command::new(busybox)
        .arg("--list-full")
        .output()
        .map_err(|e| ImageError::Busybox(format!("cannot run {}: {e}", busybox.display())))?;
    if !out.status.success() {
        return Err(ImageError::Busybox(format!(
            "{} --list-full failed",
            busybox.display()
        )));
    }
    let mut v: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().trim_start_matches('/').to_string())
        .filter(|l| !l.is_empty() && l.contains('/') && l != "bin/busybox")
        .collect();
    v.sort();
    v.dedup();
    Ok(v)
}

/// The busybox to use: `--busybox`, else the busybox-static package's.
fn find_busybox(opt: Option<&Path>) -> Result<PathBuf, ImageError> {
    let p = match opt {
        Some(p) => p.to_path_buf(),
        None => ["/bin/busybox", "/usr/bin/busybox"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
            .ok_or_else(|| {
                ImageError::Busybox(
                    "not found: install the busybox-static package (scripts/deps.sh) or pass --busybox".into(),
                )
            })?,
    };
    let head = read_file(&p)?;
    if !is_static_elf(&head) {
        return Err(ImageError::Busybox(format!(
            "{} is not a static executable: install busybox-static (not busybox) or pass --busybox",
            p.display()
        )));
    }
    Ok(p)
}

/// Builds the image.
pub fn build(o: &BuildOptions) -> Result<Built, ImageError> {
    let mut warnings = Vec::new();
    std::fs::create_dir_all(&o.out).map_err(write_err(&o.out, &o.out))?;
    let work = tempfile::Builder::new()
        .prefix(".cell0-rootfs-")
        .tempdir_in(&o.out)
        .map_err(write_err(&o.out, &o.out))?;

    // Kernel.
    let sp = spinner(o.progress);
    let kernel: Kernel = match &o.kernel {
        KernelChoice::Debian(pkg) => {
            kernel::fetch_debian(pkg, work.path(), &|m| sp.set_message(m.to_string()))?
        }
        KernelChoice::Path {
            image,
            config,
            modules_dir,
        } => {
            let bytes = read_file(image)?;
            Kernel {
                version: kernel::bzimage_version(&bytes).unwrap_or_else(|| "unknown".into()),
                source: image.display().to_string(),
                image: image.clone(),
                config: config.clone(),
                modules_dir: modules_dir.clone(),
            }
        }
    };
    sp.finish_and_clear();
    let kernel_bytes = read_file(&kernel.image)?;
    let roots = match &kernel.config {
        Some(c) => {
            let text = std::fs::read_to_string(c).map_err(|source| ImageError::Read {
                path: c.display().to_string(),
                source,
            })?;
            kernel::check_config(
                &kernel.version,
                &kernel::parse_config(&text),
                o.allow_unsuitable_kernel,
                &mut warnings,
            )?
        }
        None => {
            warnings.push(format!(
                "the kernel's config is unknown (no --kernel-config): cannot check that {} has what cell0 guests need",
                kernel.source
            ));
            match &kernel.modules_dir {
                Some(_) => kernel::REQUIREMENTS
                    .iter()
                    .filter_map(|r| r.module)
                    .collect(),
                None => Vec::new(),
            }
        }
    };
    let mut modules = Vec::new();
    if !roots.is_empty() {
        let dir = kernel
            .modules_dir
            .clone()
            .ok_or_else(|| KernelError::MissingModule {
                version: kernel.version.clone(),
                module: roots[0].to_string(),
                dir: "(no module tree; pass --modules-dir)".into(),
            })?;
        let mut tree = ModuleTree::read(&dir)?;
        modules = tree.load_order(&kernel.version, &dir.display().to_string(), &roots)?;
        for m in &modules {
            if !dir.join(m).is_file() {
                return Err(KernelError::MissingModule {
                    version: kernel.version.clone(),
                    module: m.clone(),
                    dir: dir.display().to_string(),
                }
                .into());
            }
        }
    }

    // The tree.
    let mut t = Tree::new();
    for d in [
        "proc",
        "sys",
        "dev",
        "tmp",
        "run",
        "root",
        "etc",
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "var",
        "lib/modules",
    ] {
        t.add(d, Kind::Dir, 0o755)?;
    }
    t.add("tmp", Kind::Dir, 0o1777)?;
    t.add("root", Kind::Dir, 0o700)?;
    // The kernel opens /dev/console for init before anything is mounted.
    t.add("dev/console", Kind::Char(5, 1), 0o600)?;
    t.add("dev/null", Kind::Char(1, 3), 0o666)?;
    let agent = match &o.agent {
        Some(p) => read_file(p)?,
        None => AGENT.to_vec(),
    };
    t.add("init", Kind::File(agent), 0o755)?;
    let busybox = find_busybox(o.busybox.as_deref())?;
    t.add("bin/busybox", Kind::File(read_file(&busybox)?), 0o755)?;
    for applet in busybox_applets(&busybox)? {
        if applet == "init" || applet == "linuxrc" || applet == "sbin/init" {
            continue;
        }
        t.add(&applet, Kind::Symlink("/bin/busybox".into()), 0o777)?;
    }
    t.add(
        "etc/passwd",
        Kind::File(b"root:x:0:0:root:/root:/bin/sh\n".to_vec()),
        0o644,
    )?;
    t.add("etc/group", Kind::File(b"root:x:0:\n".to_vec()), 0o644)?;
    t.add(
        "etc/hosts",
        Kind::File(b"127.0.0.1 localhost\n".to_vec()),
        0o644,
    )?;
    t.add(
        "etc/hostname",
        Kind::File(format!("{}\n", o.name).into_bytes()),
        0o644,
    )?;
    let mut load_list = String::from("# Kernel modules /init loads, in order (cell0-rootfs).\n");
    if let Some(dir) = &kernel.modules_dir {
        for m in &modules {
            let dst = format!("lib/modules/{}/{m}", kernel.version);
            t.add(&dst, Kind::File(read_file(&dir.join(m))?), 0o644)?;
            load_list.push_str(&format!("/{dst}\n"));
        }
    }
    t.add(
        "lib/modules/cell0.load",
        Kind::File(load_list.into_bytes()),
        0o644,
    )?;
    for (src, dst) in &o.adds {
        t.add_host(src, dst)?;
    }

    // Space: the kernel, the archive (at most its uncompressed size), slack.
    let raw: u64 = t
        .entries
        .values()
        .map(|e| match &e.kind {
            Kind::File(d) => d.len() as u64 + 512,
            _ => 512,
        })
        .sum();
    let need = kernel_bytes.len() as u64 + raw + (1 << 20);
    if let Some(free) = free_bytes(&o.out) {
        if free < need {
            return Err(ImageError::NoSpace {
                dir: o.out.display().to_string(),
                need_mib: need.div_ceil(1 << 20),
                free_mib: free >> 20,
            });
        }
    }

    // Pack: cpio newc, sorted, fixed mtime and owner, gzip with a fixed header.
    let pb = bar(o.progress, raw, "packing");
    let tmp_initrd = work.path().join("initrd.img");
    let f = std::fs::File::create(&tmp_initrd).map_err(write_err(&tmp_initrd, &o.out))?;
    let gz = flate2::GzBuilder::new()
        .mtime(0)
        .operating_system(3)
        .write(std::io::BufWriter::new(f), flate2::Compression::default());
    let mut w = cpio::Writer::new(
        Counting {
            inner: gz,
            pb: pb.clone(),
        },
        o.mtime,
    );
    let mut records = Vec::new();
    for e in t.entries.values() {
        w.add(e).map_err(|err| match err {
            cpio::CpioError::Io(source) => write_err(&tmp_initrd, &o.out)(source),
            other => other.into(),
        })?;
        records.push(FileRecord::of(e));
    }
    let (counting, _) = w.finish().map_err(|err| match err {
        cpio::CpioError::Io(source) => write_err(&tmp_initrd, &o.out)(source),
        other => other.into(),
    })?;
    let mut bufw = counting
        .inner
        .finish()
        .map_err(write_err(&tmp_initrd, &o.out))?;
    bufw.flush().map_err(write_err(&tmp_initrd, &o.out))?;
    drop(bufw);
    pb.finish_and_clear();

    // Outputs.
    let initrd_bytes = read_file(&tmp_initrd)?;
    let initrd = o.out.join("initrd.img");
    std::fs::rename(&tmp_initrd, &initrd).map_err(write_err(&initrd, &o.out))?;
    let kpath = o.out.join("vmlinuz");
    std::fs::write(&kpath, &kernel_bytes).map_err(write_err(&kpath, &o.out))?;
    let cmdline = [BASE_CMDLINE, o.append.trim()]
        .iter()
        .filter(|s| !s.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join(" ");
    let full_cmdline = std::iter::once(cmdline.clone())
        .chain(o.devices.cmdline_entries())
        .collect::<Vec<_>>()
        .join(" ");
    let m = manifest::ImageManifest::new(
        &o.name,
        sha256_hex(&kernel_bytes),
        sha256_hex(&initrd_bytes),
        &full_cmdline,
    );
    let mpath = o.out.join("manifest.json");
    std::fs::write(&mpath, m.to_json()).map_err(write_err(&mpath, &o.out))?;
    let contents = Contents {
        format: manifest::CONTENTS_FORMAT.into(),
        name: o.name.clone(),
        manifest_sha256: sha256_hex(m.to_json().as_bytes()),
        kernel: manifest::KernelRecord {
            file: "vmlinuz".into(),
            sha256: m.kernel_sha256.clone(),
            version: kernel.version.clone(),
            source: kernel.source.clone(),
        },
        initrd: manifest::InitrdRecord {
            file: "initrd.img".into(),
            sha256: m.initrd_sha256.clone(),
            compression: "gzip".into(),
        },
        cmdline: cmdline.clone(),
        full_cmdline: full_cmdline.clone(),
        modules: modules
            .iter()
            .map(|m| format!("/lib/modules/{}/{m}", kernel.version))
            .collect(),
        files: records,
        warnings: warnings.clone(),
    };
    let cpath = o.out.join("contents.json");
    std::fs::write(&cpath, contents.to_json()).map_err(write_err(&cpath, &o.out))?;
    let lpath = o.out.join("cmdline");
    std::fs::write(&lpath, format!("{cmdline}\n")).map_err(write_err(&lpath, &o.out))?;
    Ok(Built {
        kernel: kpath,
        initrd,
        manifest: mpath,
        contents: cpath,
        cmdline,
        full_cmdline,
        warnings,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn device_entries_follow_cell0_vmm_placement() {
        let d = Devices {
            vsock: true,
            disks: 1,
            rng: true,
        };
        assert_eq!(
            d.cmdline_entries(),
            [
                "virtio_mmio.device=4K@0xd0000000:5",
                "virtio_mmio.device=4K@0xd0001000:6",
                "virtio_mmio.device=4K@0xd0002000:7"
            ]
        );
        assert!(
            Devices {
                vsock: false,
                disks: 0,
                rng: false
            }
            .cmdline_entries()
            .is_empty()
        );
    }

    #[test]
    fn add_syntax() {
        assert_eq!(
            parse_add("a/b:/opt/b").unwrap(),
            (PathBuf::from("a/b"), "/opt/b".to_string())
        );
        assert_eq!(parse_add("c:d:/x").unwrap().0, PathBuf::from("c:d"));
        for bad in ["nocolon", "src:relative", ":/x", "s:/a/../b"] {
            assert!(
                matches!(parse_add(bad), Err(ImageError::AddSyntax(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn the_embedded_agent_is_a_static_executable() {
        assert!(AGENT.starts_with(b"\x7fELF"));
        assert!(
            is_static_elf(AGENT),
            "the agent must be built with +crt-static"
        );
        let sh = std::fs::read("/bin/sh").unwrap();
        assert!(!is_static_elf(&sh), "/bin/sh is dynamic");
    }
}
