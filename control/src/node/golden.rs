// SPDX-License-Identifier: Apache-2.0
//! Golden values for a VM's attestation, computed by the control plane from
//! what it asked for: the kernel and initrd it named (or the built-in nano
//! image, written out by `cell0-vmm nano-image`), the cell0-vmm build it
//! launches, the VM config and the workload in the spec.
//!
//! The command line and device set the guest sees follow the VMM's layout
//! contract (DESIGN.md §3): the user's cmdline (or the VMM default), then
//! `virtio_mmio.device=4K@0xd0000000:5` for the vsock device, then
//! `cell0.shm=<size>@<gpa>` when there is a window, then `cell0.cpus=N` for
//! images with the SMP note (the nano guest). If the VMM departs from that
//! contract, the verdict names the PCR that differs.

use std::path::Path;

use cell0_attest::{BootInputs, DeviceSpec, Manifest, VmConfig, VmmIdentity, WorkloadSpec};

use crate::spec::VmSpec;

/// The VMM's default command line.
pub const VMM_DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off";
/// First virtio-mmio slot.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Its IRQ.
pub const VIRTIO_IRQ_BASE: u32 = 5;

/// Errors computing golden values.
#[derive(Debug, thiserror::Error)]
pub enum GoldenError {
    /// An image file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// Path.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The manifest could not be built.
    #[error("cannot build the manifest")]
    Manifest(#[from] cell0_attest::manifest::ManifestError),
}

/// Guest address of the shared-memory window for `memory_mib` of RAM.
pub fn shm_gpa(memory_mib: u64) -> u64 {
    let g = 1u64 << 30;
    let mem = memory_mib << 20;
    let hole_start = 3 * g;
    let ram_end = if mem <= hole_start {
        mem
    } else {
        4 * g + (mem - hole_start)
    };
    ram_end.max(4 * g).div_ceil(g) * g
}

/// The command line cell0d passes to cell0-vmm: the spec's (or the VMM
/// default), then `extra` (what cell0d adds per launch, such as the nano
/// guest's token), if any.
pub fn launch_cmdline(spec: &VmSpec, extra: &str) -> Option<String> {
    match (&spec.cmdline, extra.is_empty()) {
        (c, true) => c.clone(),
        (c, false) => Some(format!(
            "{} {extra}",
            c.as_deref().unwrap_or(VMM_DEFAULT_CMDLINE)
        )),
    }
}

/// The full command line the guest sees, for a launch with `extra`.
pub fn expected_cmdline(spec: &VmSpec, extra: &str) -> String {
    let mut parts = vec![
        launch_cmdline(spec, extra).unwrap_or_else(|| VMM_DEFAULT_CMDLINE.to_string()),
        format!("virtio_mmio.device=4K@{VIRTIO_MMIO_BASE:#x}:{VIRTIO_IRQ_BASE}"),
    ];
    if spec.shm_mib > 0 {
        parts.push(format!(
            "cell0.shm={:#x}@{:#x}",
            spec.shm_mib << 20,
            shm_gpa(spec.memory_mib)
        ));
    }
    if spec.is_nano() {
        parts.push(format!("cell0.cpus={}", spec.vcpus));
    }
    parts
        .iter()
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The canonical VM config the VMM measures into PCR 11.
pub fn expected_config(spec: &VmSpec, cid: u32) -> VmConfig {
    let mut devices = vec![
        DeviceSpec::new("serial", Some(0x3f8), Some(4)),
        DeviceSpec::new("i8042", Some(0x60), None),
        DeviceSpec::new(
            "virtio-vsock",
            Some(VIRTIO_MMIO_BASE),
            Some(VIRTIO_IRQ_BASE),
        ),
    ];
    if spec.shm_mib > 0 {
        devices.push(DeviceSpec::new("shm", Some(shm_gpa(spec.memory_mib)), None));
    }
    VmConfig {
        vcpus: spec.vcpus,
        memory_mib: spec.memory_mib,
        vsock_cid: Some(u64::from(cid)),
        shm_mib: spec.shm_mib,
        devices,
    }
}

fn read(path: &Path) -> Result<Vec<u8>, GoldenError> {
    std::fs::read(path).map_err(|source| GoldenError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// The manifest a VM launched from `spec` with vsock `cid` by `vmm` must match.
/// `nano_elf` is the built-in image (used when the spec names no kernel).
pub fn manifest(
    spec: &VmSpec,
    cid: u32,
    extra: &str,
    vmm: &VmmIdentity,
    nano_elf: &[u8],
) -> Result<Manifest, GoldenError> {
    let kernel = match &spec.kernel {
        Some(k) => read(k)?,
        None => nano_elf.to_vec(),
    };
    let initrd = spec.initrd.as_deref().map(read).transpose()?;
    let cmdline = expected_cmdline(spec, extra);
    let config = expected_config(spec, cid);
    let workload = WorkloadSpec {
        agent_id: spec.agent_id.clone(),
        image_manifest: None,
        command: spec.command.clone(),
    };
    Ok(Manifest::for_boot(
        Some(spec.name.clone()),
        &BootInputs {
            vmm,
            kernel: &kernel,
            cmdline: cmdline.as_bytes(),
            initrd: initrd.as_deref(),
            config: &config,
            workload: &workload,
        },
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cell0_proto::grpc;

    #[test]
    fn cmdline_follows_the_layout_contract() {
        let mut s = VmSpec::from_proto(grpc::VmSpec::default(), "a").unwrap();
        assert_eq!(
            expected_cmdline(&s, ""),
            "console=ttyS0 reboot=k panic=1 pci=off virtio_mmio.device=4K@0xd0000000:5 cell0.cpus=1"
        );
        assert_eq!(
            expected_cmdline(&s, "cell0.token=t"),
            "console=ttyS0 reboot=k panic=1 pci=off cell0.token=t virtio_mmio.device=4K@0xd0000000:5 cell0.cpus=1"
        );
        s.shm_mib = 16;
        s.cmdline = Some("cell0.test=sypas-serve".into());
        assert_eq!(
            expected_cmdline(&s, ""),
            "cell0.test=sypas-serve virtio_mmio.device=4K@0xd0000000:5 cell0.shm=0x1000000@0x100000000 cell0.cpus=1"
        );
        assert_eq!(shm_gpa(128), 4 << 30);
        assert_eq!(shm_gpa(4096), 5 << 30);
    }
}
