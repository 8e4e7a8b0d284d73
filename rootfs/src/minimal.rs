// SPDX-License-Identifier: Apache-2.0
//! `cell0-rootfs kernel`: the minimal cell0 guest kernel, built from Debian's
//! `linux-source-*` package with `make allnoconfig` plus
//! `kernel/cell0-minimal.config`, everything built in (no modules). Debian's
//! own kernels lack `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`, so they cannot find
//! cell0-vmm's devices; this one can, and boots fastest.
//!
//! Needs the kernel build tools: `make gcc flex bison bc libelf-dev libssl-dev`
//! (scripts/deps.sh installs them).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::kernel::{self, KernelError};

/// The config fragment, as shipped.
pub const FRAGMENT: &str = include_str!("../kernel/cell0-minimal.config");
/// The default source package (Debian 12).
pub const DEFAULT_SOURCE: &str = "linux-source-6.1";

/// What a kernel build produced.
#[derive(Debug, Clone)]
pub struct MinimalKernel {
    /// `bzImage`.
    pub image: PathBuf,
    /// `config` (the full .config).
    pub config: PathBuf,
}

fn make(src: &Path, args: &[&str], env: &[(&str, &Path)]) -> Result<(), KernelError> {
    let mut c = Command::new("make");
    c.current_dir(src).args(args);
    // The same source and config give the same image: no build date, user or host in it.
    let epoch = std::env::var("SOURCE_DATE_EPOCH").unwrap_or_else(|_| "0".into());
    c.env("KBUILD_BUILD_TIMESTAMP", format!("@{epoch}"))
        .env("KBUILD_BUILD_USER", "cell0")
        .env("KBUILD_BUILD_HOST", "cell0")
        .env("KBUILD_BUILD_VERSION", "1");
    for (k, v) in env {
        c.env(k, v);
    }
    let st = c.status().map_err(|source| KernelError::Tool {
        tool: "make",
        source,
    })?;
    if !st.success() {
        return Err(KernelError::ToolFailed {
            tool: "make",
            detail: format!("make {} exited with {st}", args.join(" ")),
        });
    }
    Ok(())
}

/// Downloads the source package into `work`, configures and builds it with
/// `jobs` jobs, and copies `bzImage` and `config` into `out`.
pub fn build(
    source_pkg: &str,
    work: &Path,
    out: &Path,
    jobs: usize,
    say: &dyn Fn(&str),
) -> Result<MinimalKernel, KernelError> {
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| KernelError::Read { path, source }
    };
    say(&format!("apt-get download {source_pkg}"));
    let deb = kernel::apt_download(source_pkg, work)?;
    say("unpacking the source package");
    let root = work.join("pkg");
    let st = Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(&root)
        .status()
        .map_err(|source| KernelError::Tool {
            tool: "dpkg-deb",
            source,
        })?;
    if !st.success() {
        return Err(KernelError::ToolFailed {
            tool: "dpkg-deb",
            detail: format!("exited with {st}"),
        });
    }
    let tarball = std::fs::read_dir(root.join("usr/src"))
        .map_err(io(&root.join("usr/src")))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with(".tar.xz"))
        .ok_or_else(|| KernelError::NoKernelInPackage(source_pkg.to_string()))?;
    say("unpacking the kernel tree");
    let st = Command::new("tar")
        .arg("-xf")
        .arg(&tarball)
        .arg("-C")
        .arg(work)
        .status()
        .map_err(|source| KernelError::Tool {
            tool: "tar",
            source,
        })?;
    if !st.success() {
        return Err(KernelError::ToolFailed {
            tool: "tar",
            detail: format!("exited with {st}"),
        });
    }
    let stem = tarball
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_suffix(".tar.xz"))
        .unwrap_or("linux-source");
    let src = work.join(stem);
    let fragment = work.join("cell0-minimal.config");
    std::fs::write(&fragment, FRAGMENT).map_err(io(&fragment))?;
    say("configuring (allnoconfig + cell0-minimal.config)");
    make(&src, &["allnoconfig"], &[("KCONFIG_ALLCONFIG", &fragment)])?;
    // Every option of the fragment must have survived Kconfig's dependency rules.
    let config_path = src.join(".config");
    let config =
        kernel::parse_config(&std::fs::read_to_string(&config_path).map_err(io(&config_path))?);
    for (k, v) in kernel::parse_config(FRAGMENT) {
        if config.get(&k) != Some(&v) {
            return Err(KernelError::ToolFailed {
                tool: "make allnoconfig",
                detail: format!("CONFIG_{k}={v} did not take (got {:?})", config.get(&k)),
            });
        }
    }
    say(&format!("building bzImage with {jobs} jobs"));
    make(&src, &[&format!("-j{jobs}"), "bzImage"], &[])?;
    std::fs::create_dir_all(out).map_err(io(out))?;
    let image = out.join("bzImage");
    let built = src.join("arch/x86/boot/bzImage");
    std::fs::copy(&built, &image).map_err(io(&built))?;
    let cfg = out.join("config");
    std::fs::copy(&config_path, &cfg).map_err(io(&config_path))?;
    Ok(MinimalKernel { image, config: cfg })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fragment_meets_every_requirement_built_in() {
        let cfg = kernel::parse_config(FRAGMENT);
        let mut w = Vec::new();
        let modules = kernel::check_config("minimal", &cfg, false, &mut w);
        assert!(matches!(modules.as_deref(), Ok([])), "{modules:?}");
        assert!(w.is_empty());
    }
}
