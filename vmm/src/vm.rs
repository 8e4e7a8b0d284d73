// SPDX-License-Identifier: Apache-2.0
//! Building and running one VM: KVM VM, guest memory, irqchip/PIT, boot image,
//! legacy devices, vCPU threads and the event loop.

use std::fs::File;
use std::io::{LineWriter, Write};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cell0_devices::Bus;
use cell0_devices::virtio::blk::Block;
use cell0_devices::virtio::rng::Rng;
use cell0_devices::virtio::vsock::Vsock;
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{
    KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, kvm_mp_state, kvm_pit_config,
    kvm_userspace_memory_region,
};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::api::{ApiContext, ApiExtension, ApiServer, ReadyExtensions};
use crate::arch::{self, KVM_TSS_ADDR, SERIAL_IRQ, cpu, mptable};
use crate::boot::{self, BootError};
use crate::config::{DEFAULT_CMDLINE, KernelSource, SerialOutput, VmConfig};
use crate::device_manager::{DeviceManager, DeviceManagerError};
use crate::exit::{ExitCounters, ExitSignal, StopReason};
use crate::lease::{self, BuildWatchdog, Lease, LeaseApi, LeaseWatchdog, NoLeaseApi};
use crate::legacy::{
    I8042, I8042_PORT, I8042_PORT_LEN, SERIAL_PORT, SERIAL_PORT_LEN, SerialDevice,
};
use crate::seccomp::{self, StartGate, ThreadKind};
use crate::shm::{ShmApi, ShmWindow};
use crate::tpm::{self, Measured, PendingVtpm, TpmApi};
use crate::vcpu::{self, Vcpu, VcpuHandle};
use cell0_attest::DeviceSpec;

/// Errors that stop a VM from being built or run.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm could not be opened.
    #[error("cannot open /dev/kvm (is KVM available and accessible?)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// A VM-level KVM ioctl failed.
    #[error("KVM {what} failed")]
    Kvm {
        /// Which operation.
        what: &'static str,
        /// Cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be allocated.
    #[error("cannot allocate {mib} MiB of guest memory")]
    Memory {
        /// Size asked for.
        mib: u64,
        /// Cause.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    /// A file could not be read.
    #[error("cannot read the {what} file {path}")]
    ReadFile {
        /// kernel or initrd.
        what: &'static str,
        /// Path.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Loading the boot image failed.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// Setting up vCPU state failed.
    #[error(transparent)]
    Cpu(#[from] cpu::CpuError),
    /// Writing the MP table failed.
    #[error(transparent)]
    MpTable(#[from] mptable::MpTableError),
    /// Opening the serial output failed.
    #[error("cannot open the serial output {path}")]
    SerialOutput {
        /// Path.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A device could not be placed on a bus.
    #[error("cannot register a device")]
    Bus(#[from] cell0_devices::BusError),
    /// An OS call failed (eventfd, thread, signal handler).
    #[error("cannot {what}")]
    Os {
        /// What was being done.
        what: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A virtio device could not be placed.
    #[error(transparent)]
    Device(#[from] DeviceManagerError),
    /// The vsock device could not be created.
    #[error("cannot create the vsock device")]
    Vsock(#[from] cell0_devices::virtio::vsock::VsockError),
    /// A virtio-blk disk could not be opened.
    #[error("cannot create the virtio-blk device")]
    Block(#[from] cell0_devices::virtio::blk::BlockError),
    /// The virtio-rng device could not be created.
    #[error("cannot create the virtio-rng device")]
    Rng(#[from] cell0_devices::virtio::rng::RngError),
    /// The API socket could not be started.
    #[error(transparent)]
    Api(#[from] crate::api::ApiError),
    /// The shared-memory window could not be set up.
    #[error(transparent)]
    Shm(#[from] crate::shm::ShmError),
    /// Measured boot failed.
    #[error(transparent)]
    Tpm(#[from] crate::tpm::TpmError),
    /// The event loop failed.
    #[error("the event loop failed")]
    EventLoop(#[source] event_manager::Error),
    /// A seccomp filter could not be installed.
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    /// The VM was stopped (`stop` op) or fenced (its lease ended) while it
    /// was being built: no guest instruction ran. Not a failure of the VMM:
    /// `cell0-vmm` exits as for the same reason after the guest ran.
    #[error("the VM ended before its guest started: {0}")]
    EndedDuringBuild(StopReason),
}

type Result<T> = std::result::Result<T, VmError>;

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

fn os_err(what: &'static str) -> impl FnOnce(std::io::Error) -> VmError {
    move |source| VmError::Os { what, source }
}

/// Wakes the event loop when the VM must stop.
struct ExitWatcher {
    exit: Arc<ExitSignal>,
}

impl MutEventSubscriber for ExitWatcher {
    fn process(&mut self, events: Events, _ops: &mut EventOps<'_>) {
        if events.event_set().contains(EventSet::IN) {
            // Drain the counter; the reason is read by the loop.
            let _ = self.exit.eventfd().read();
        }
    }

    fn init(&mut self, ops: &mut EventOps<'_>) {
        if let Err(e) = ops.add(Events::new(self.exit.eventfd(), EventSet::IN)) {
            tracing::error!(error = ?e, "cannot watch the exit eventfd");
        }
    }
}

/// Subscribers the event loop drives (devices, exit watcher).
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// A VM that is built and ready to run.
pub struct Vm {
    _kvm: Kvm,
    vm: VmFd,
    _mem: GuestMemoryMmap,
    vcpus: Vec<Vcpu>,
    serial: Arc<Mutex<SerialDevice>>,
    exit: Arc<ExitSignal>,
    events: EventManager<Subscriber>,
    // Served from early in the build; removes the socket path on drop.
    _api: Option<ApiServer>,
    // The ops the API serves once the VM runs (set by `run`).
    ready: ReadyExtensions,
    extensions: Vec<Box<dyn ApiExtension>>,
    // Dropped with the VM: stops swtpm and removes its state.
    _vtpm: Option<Arc<cell0_attest::Vtpm>>,
    _shm: Option<ShmWindow>,
    lease: Option<Arc<Lease>>,
    build_watchdog: Option<BuildWatchdog>,
}

fn read_file(what: &'static str, path: &std::path::Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| VmError::ReadFile {
        what,
        path: path.display().to_string(),
        source,
    })
}

/// Ends the build when the VM was stopped or its lease ended meanwhile.
fn check_not_ended(exit: &ExitSignal, lease: Option<&Lease>) -> Result<()> {
    if let Some(l) = lease {
        // Fences (signals `exit`) when the deadline has passed.
        let _ = l.check(lease::monotonic_ns());
    }
    match exit.reason() {
        Some(r) => Err(VmError::EndedDuringBuild(r)),
        None => Ok(()),
    }
}

/// Waits for the vTPM, ending the build as soon as a `stop` or the end of
/// the lease comes meanwhile (swtpm's start takes seconds under load). An
/// abandoned swtpm dies with its start-up thread (PDEATHSIG) when the VMM exits.
fn wait_vtpm(
    pending: PendingVtpm,
    exit: &ExitSignal,
    lease: Option<&Lease>,
) -> Result<cell0_attest::Vtpm> {
    while !pending.is_ready() {
        check_not_ended(exit, lease)?;
        std::thread::sleep(Duration::from_millis(10));
    }
    check_not_ended(exit, lease)?;
    Ok(pending.wait()?)
}

fn register_memory(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<()> {
    for (slot, region) in mem.iter().enumerate() {
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the region is a live mapping owned by `mem`, which the `Vm` keeps
        // for as long as the KVM VM exists; slots are distinct and do not overlap.
        unsafe { vm.set_user_memory_region(r) }.map_err(kvm_err("set user memory region"))?;
    }
    Ok(())
}

impl Vm {
    /// Builds the VM: everything up to, but not including, the first vCPU entry.
    pub fn build(cfg: &VmConfig) -> Result<Self> {
        Self::build_with_vtpm(cfg, None)
    }

    /// [`Vm::build`] with a vTPM started earlier (the jail starts it before
    /// `pivot_root`); `None` starts one here if `cfg.tpm` asks for it.
    pub fn build_with_vtpm(cfg: &VmConfig, vtpm: Option<PendingVtpm>) -> Result<Self> {
        // swtpm takes the longest to start: begin it first, join before measuring.
        let pending_tpm = vtpm.or_else(|| cfg.tpm.as_ref().map(PendingVtpm::start));

        // The lease counts from VMM start: serve the API (describe, stop,
        // lease) now, so that it can be renewed while swtpm starts and the
        // boot is measured. The other ops wait for `run` (`starting` until then).
        let exit = Arc::new(ExitSignal::new().map_err(os_err("create the exit eventfd"))?);
        let lease = cfg
            .lease
            .as_ref()
            .map(|l| Arc::new(Lease::new(l.deadline_ns, exit.clone())));
        let early: Vec<Box<dyn ApiExtension>> = match &lease {
            Some(l) => vec![Box::new(LeaseApi(l.clone()))],
            None => vec![Box::new(NoLeaseApi)],
        };
        let ready = ReadyExtensions::default();
        let api = match &cfg.api_sock {
            Some(path) => Some(ApiServer::start(
                path,
                ApiContext {
                    describe: cfg.describe(),
                    exit: exit.clone(),
                    extensions: early,
                    ready: ready.clone(),
                },
            )?),
            None => None,
        };
        // Until `run`'s event loop watches the lease, this thread does.
        let build_watchdog = lease.clone().map(BuildWatchdog::start).transpose()?;
        check_not_ended(&exit, lease.as_deref())?;
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let vm = kvm.create_vm().map_err(kvm_err("create VM"))?;
        vm.set_tss_address(KVM_TSS_ADDR)
            .map_err(kvm_err("set TSS address"))?;

        // Memory before the irqchip: the other order costs ~7 ms on nested KVM.
        let mem_size = cfg.memory_bytes();
        let ranges: Vec<(GuestAddress, usize)> = arch::ram_ranges(mem_size)
            .into_iter()
            .map(|(a, l)| (GuestAddress(a), l as usize))
            .collect();
        let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(|source| VmError::Memory {
            mib: cfg.memory_mib,
            source,
        })?;
        register_memory(&vm, &mem)?;
        let shm = if cfg.shm_mib > 0 {
            let slot = mem.num_regions() as u32;
            let gpa = crate::shm::window_gpa(&arch::ram_ranges(mem_size));
            Some(ShmWindow::new(&vm, slot, gpa, cfg.shm_mib)?)
        } else {
            None
        };
        vm.create_irq_chip().map_err(kvm_err("create irqchip"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit).map_err(kvm_err("create PIT"))?;
        tracing::info!(
            elapsed_us = crate::since_start_us(),
            memory_mib = cfg.memory_mib,
            vcpus = cfg.vcpus,
            "milestone: VM created"
        );

        // Boot image.
        let image_buf;
        let image: &[u8] = match &cfg.kernel {
            KernelSource::Nano => crate::nano::NANO_ELF,
            KernelSource::Path(p) => {
                image_buf = read_file("kernel", p)?;
                &image_buf
            }
        };
        let kernel = boot::load_kernel(&mem, mem_size, image)?;
        let initrd_data = match &cfg.initrd {
            Some(p) => Some(read_file("initrd", p)?),
            None => None,
        };
        let initrd = match &initrd_data {
            Some(data) => {
                let addr = boot::load_initrd(&mem, mem_size, kernel.end, data)?;
                Some((addr, data.len() as u64))
            }
            None => None,
        };
        cpu::write_boot_tables(&mem)?;
        mptable::write(&mem, cfg.vcpus)?;
        tracing::debug!(
            format = ?kernel.format,
            entry = format_args!("{:#x}", kernel.entry),
            smp_entry = ?kernel.smp_entry,
            "kernel loaded"
        );

        // Devices.
        let out: Box<dyn Write + Send> = match &cfg.serial {
            SerialOutput::Stdout => Box::new(LineWriter::new(std::io::stdout())),
            SerialOutput::File(p) => {
                Box::new(LineWriter::new(File::create(p).map_err(|source| {
                    VmError::SerialOutput {
                        path: p.display().to_string(),
                        source,
                    }
                })?))
            }
        };
        let serial_irq = EventFd::new(0).map_err(os_err("create the serial irqfd"))?;
        vm.register_irqfd(&serial_irq, SERIAL_IRQ)
            .map_err(kvm_err("register the serial irqfd"))?;
        let serial = Arc::new(Mutex::new(SerialDevice::new(serial_irq, out)));
        let mut pio = Bus::new();
        pio.insert(serial.clone(), SERIAL_PORT, SERIAL_PORT_LEN)?;
        pio.insert(
            Arc::new(Mutex::new(I8042::new(exit.clone()))),
            I8042_PORT,
            I8042_PORT_LEN,
        )?;
        let mut mmio = Bus::new();
        let mut events = EventManager::<Subscriber>::new().map_err(VmError::EventLoop)?;
        events.add_subscriber(Arc::new(Mutex::new(ExitWatcher { exit: exit.clone() })));
        let mut devices = DeviceManager::new();
        let mut measured_devices = vec![
            DeviceSpec::new("serial", Some(SERIAL_PORT), Some(SERIAL_IRQ)),
            DeviceSpec::new("i8042", Some(I8042_PORT), None),
        ];
        if let Some(v) = &cfg.vsock {
            let dev = Arc::new(Mutex::new(Vsock::new(v.cid, &v.uds)?));
            let slot = devices.add_virtio(&vm, &mem, &mut mmio, dev.clone())?;
            measured_devices.push(DeviceSpec::new(
                "virtio-vsock",
                Some(slot.base),
                Some(slot.irq),
            ));
            events.add_subscriber(dev);
            tracing::debug!(cid = v.cid, uds = %v.uds.display(), base = format_args!("{:#x}", slot.base), irq = slot.irq, "virtio-vsock added");
        }
        for d in &cfg.disks {
            let dev = Arc::new(Mutex::new(Block::open(&d.path, d.read_only)?));
            let slot = devices.add_virtio(&vm, &mem, &mut mmio, dev.clone())?;
            measured_devices.push(
                DeviceSpec::new("virtio-blk", Some(slot.base), Some(slot.irq))
                    .with_option("read_only", d.read_only.to_string()),
            );
            events.add_subscriber(dev);
            tracing::debug!(path = %d.path.display(), read_only = d.read_only, base = format_args!("{:#x}", slot.base), irq = slot.irq, "virtio-blk added");
        }
        if cfg.rng {
            let dev = Arc::new(Mutex::new(Rng::new()?));
            let slot = devices.add_virtio(&vm, &mem, &mut mmio, dev.clone())?;
            measured_devices.push(DeviceSpec::new(
                "virtio-rng",
                Some(slot.base),
                Some(slot.irq),
            ));
            events.add_subscriber(dev);
            tracing::debug!(
                base = format_args!("{:#x}", slot.base),
                irq = slot.irq,
                "virtio-rng added"
            );
        }

        // The watchdog fires in `run`'s event loop; until then the build
        // checks the lease itself (`check_not_ended`).
        if let Some(l) = &lease {
            let watchdog =
                LeaseWatchdog::new(l.clone()).map_err(os_err("create the lease timerfd"))?;
            events.add_subscriber(Arc::new(Mutex::new(watchdog)));
        }
        let mut extensions: Vec<Box<dyn ApiExtension>> = Vec::new();
        if let Some(w) = &shm {
            measured_devices.push(DeviceSpec::new("shm", Some(w.gpa), None));
            let file = w
                .file()
                .try_clone()
                .map_err(os_err("duplicate the shm memfd"))?;
            extensions.push(Box::new(ShmApi {
                size: w.size,
                gpa: w.gpa,
                file,
            }));
        }

        // Command line: the user's (or the default), then what the VMM adds.
        let mut parts = vec![
            cfg.cmdline
                .clone()
                .unwrap_or_else(|| DEFAULT_CMDLINE.to_string()),
        ];
        parts.extend(devices.cmdline_entries());
        if let Some(w) = &shm {
            parts.push(w.cmdline_entry());
        }
        if kernel.smp_entry.is_some() {
            parts.push(format!("cell0.cpus={}", cfg.vcpus));
        }
        let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
        let cmdline = boot::build_cmdline(&parts)?;
        boot::write_boot_params(&mem, mem_size, &kernel, &cmdline, initrd)?;

        // Measured boot, before any vCPU exists.
        let vtpm = match (pending_tpm, &cfg.tpm) {
            (Some(pending), Some(tcfg)) => {
                let vtpm = Arc::new(wait_vtpm(pending, &exit, lease.as_deref())?);
                let cmdline_str = cmdline.as_cstring().map_err(BootError::Cmdline)?;
                let log = tpm::measure(
                    &vtpm,
                    tcfg,
                    &Measured {
                        kernel: image,
                        cmdline: &cmdline_str.to_string_lossy(),
                        initrd: initrd_data.as_deref(),
                        vcpus: cfg.vcpus,
                        memory_mib: cfg.memory_mib,
                        vsock_cid: cfg.vsock.as_ref().map(|v| v.cid),
                        shm_mib: cfg.shm_mib,
                        devices: measured_devices,
                    },
                )?;
                tracing::info!(
                    elapsed_us = crate::since_start_us(),
                    events = log.events.len(),
                    "milestone: boot measured into the vTPM"
                );
                extensions.push(Box::new(TpmApi {
                    vtpm: vtpm.clone(),
                    log,
                }));
                check_not_ended(&exit, lease.as_deref())?;
                Some(vtpm)
            }
            _ => None,
        };

        // vCPUs.
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("get supported CPUID"))?;
        let counters = Arc::new(ExitCounters::default());
        let mut vcpus = Vec::with_capacity(cfg.vcpus as usize);
        for i in 0..cfg.vcpus {
            let fd = vm
                .create_vcpu(u64::from(i))
                .map_err(kvm_err("create vCPU"))?;
            let mut cpuid = supported.clone();
            cpu::filter_cpuid(&mut cpuid, i, cfg.vcpus);
            fd.set_cpuid2(&cpuid).map_err(kvm_err("set CPUID"))?;
            let entry = match (i, kernel.smp_entry) {
                (0, _) | (_, None) => kernel.entry,
                (_, Some(ap)) => ap,
            };
            cpu::setup_entry(&fd, entry, u64::from(i))?;
            cpu::setup_lint(&fd)?;
            if i > 0 && kernel.smp_entry.is_some() {
                // Direct SMP entry: the AP runs at once instead of waiting for INIT/SIPI.
                fd.set_mp_state(kvm_mp_state { mp_state: 0 })
                    .map_err(kvm_err("set AP runnable"))?;
            }
            vcpus.push(Vcpu {
                index: i,
                fd,
                pio: pio.clone(),
                mmio: mmio.clone(),
                exit: exit.clone(),
                counters: counters.clone(),
            });
        }

        Ok(Self {
            _kvm: kvm,
            vm,
            _mem: mem,
            vcpus,
            serial,
            exit,
            events,
            _api: api,
            ready,
            extensions,
            _vtpm: vtpm,
            _shm: shm,
            lease,
            build_watchdog,
        })
    }

    /// The KVM VM (for registering device eventfds).
    pub fn vm_fd(&self) -> &VmFd {
        &self.vm
    }

    /// Adds ops to the API socket (such as `quote`).
    pub fn add_api_extension(&mut self, ext: Box<dyn ApiExtension>) {
        self.extensions.push(ext);
    }

    /// Runs the guest until it stops; returns why.
    pub fn run(mut self) -> Result<StopReason> {
        // The full API from now on (it has served describe, stop and lease
        // since early in the build). Set once: `run` consumes the VM.
        let _ = self.ready.set(std::mem::take(&mut self.extensions));
        // A stop or the end of the lease that came during the build (after
        // its last check) ends the VM before any vCPU exists.
        if let Some(r) = self.exit.reason() {
            tracing::info!(%r, "the VM ended before its guest started");
            return Ok(r);
        }
        vcpu::install_kick_handler().map_err(os_err("install the vCPU kick handler"))?;
        let mut handles: Vec<VcpuHandle> = Vec::with_capacity(self.vcpus.len());
        // Each vCPU thread installs its seccomp filter and waits at the gate; this
        // thread installs its own once they all have, then lets them into the guest.
        let gate = Arc::new(StartGate::new());
        for v in std::mem::take(&mut self.vcpus) {
            match v.start_gated(gate.clone()) {
                Ok(h) => handles.push(h),
                Err(e) => {
                    gate.release(false);
                    stop_all(&mut handles);
                    return Err(os_err("spawn a vCPU thread")(e));
                }
            }
        }
        let filtered = gate
            .wait_arrivals(handles.len(), Duration::from_secs(10))
            .and_then(|()| seccomp::install(ThreadKind::Vmm));
        // The last look before the guest runs: a stop, or a lease that ended
        // (the watchdog only fires in the event loop below), keeps the gate shut.
        let ended = match &filtered {
            Ok(()) => {
                if let Some(l) = &self.lease {
                    // Fences (signals `exit`) when the deadline has passed.
                    let _ = l.check(lease::monotonic_ns());
                }
                self.exit.reason()
            }
            Err(_) => None,
        };
        gate.release(filtered.is_ok() && ended.is_none());
        if let Err(e) = filtered {
            stop_all(&mut handles);
            return Err(VmError::Seccomp(e));
        }
        if let Some(r) = ended {
            tracing::info!(%r, "the VM ended before its guest started");
            stop_all(&mut handles);
            return Ok(r);
        }
        // The event loop's watchdog (its timerfd armed since the build) takes over.
        self.build_watchdog = None;
        let reason = loop {
            if let Some(r) = self.exit.reason() {
                break r;
            }
            if let Err(e) = self.events.run() {
                stop_all(&mut handles);
                return Err(VmError::EventLoop(e));
            }
        };
        tracing::info!(elapsed_us = crate::since_start_us(), %reason, "milestone: guest exit");
        stop_all(&mut handles);
        let flushed = self
            .serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .flush();
        if let Err(e) = flushed {
            tracing::warn!(error = %e, "cannot flush serial output");
        }
        tracing::debug!(exit_fd = self.exit.eventfd().as_raw_fd(), "VM torn down");
        Ok(reason)
    }
}

fn stop_all(handles: &mut [VcpuHandle]) {
    for h in handles.iter_mut() {
        h.stop(Duration::from_secs(2));
    }
}
