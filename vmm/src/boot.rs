// SPDX-License-Identifier: Apache-2.0
//! Loading the guest: kernel (ELF or bzImage, through linux-loader), initrd,
//! command line and the Linux zero page (`boot_params` with e820).

use std::io::Cursor;

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::arch::{
    CMDLINE_ADDR, CMDLINE_MAX, EBDA_START, HIMEM_START, MMIO_HOLE_START, ZERO_PAGE, ram_ranges,
};

/// Errors while loading the guest.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file is empty.
    #[error("the kernel image is empty")]
    EmptyKernel,
    /// The kernel is bigger than the guest RAM it must be loaded into.
    #[error("the kernel image ({size} bytes) does not fit in {mem} bytes of guest memory")]
    KernelTooLarge {
        /// Image size.
        size: u64,
        /// Guest memory size.
        mem: u64,
    },
    /// Neither an ELF nor a bzImage.
    #[error("the kernel image is neither an ELF file nor a bzImage")]
    UnknownKernelFormat,
    /// linux-loader refused the ELF.
    #[error("cannot load the ELF kernel")]
    Elf(#[source] linux_loader::loader::Error),
    /// linux-loader refused the bzImage.
    #[error("cannot load the bzImage kernel")]
    BzImage(#[source] linux_loader::loader::Error),
    /// The kernel's segments (with their zero-filled tails) end past guest RAM.
    #[error(
        "the kernel image's segments end at {end:#x}, past the end of guest RAM at {ram_end:#x}"
    )]
    KernelPastRam {
        /// Where the last segment ends.
        end: u64,
        /// Where RAM ends.
        ram_end: u64,
    },
    /// The initrd file is empty.
    #[error("the initrd is empty")]
    EmptyInitrd,
    /// The initrd does not fit between the kernel and the end of low RAM.
    #[error(
        "the initrd ({size} bytes) does not fit in guest memory ({free} bytes free above the kernel)"
    )]
    InitrdTooLarge {
        /// Initrd size.
        size: u64,
        /// Bytes free between the kernel's end and the end of low RAM.
        free: u64,
    },
    /// Writing the initrd failed.
    #[error("cannot write the initrd into guest memory")]
    WriteInitrd(#[source] vm_memory::GuestMemoryError),
    /// The command line is too long.
    #[error(
        "the kernel command line is {len} bytes, over the limit of {CMDLINE_MAX} \
         ({added} of them added by cell0-vmm)"
    )]
    CmdlineTooLong {
        /// Its length.
        len: usize,
        /// Bytes the VMM appended to the one given.
        added: usize,
    },
    /// The command line has bad characters.
    #[error("invalid kernel command line")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// Writing the command line failed.
    #[error("cannot write the kernel command line into guest memory")]
    WriteCmdline(#[source] linux_loader::loader::Error),
    /// Writing boot_params failed.
    #[error("cannot write boot_params into guest memory")]
    WriteBootParams(#[source] linux_loader::configurator::Error),
}

type Result<T> = std::result::Result<T, BootError>;

/// What kind of image was loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// An ELF (vmlinux or the nano guest).
    Elf,
    /// A bzImage (entered at its 64-bit entry point, load address + 0x200).
    BzImage,
}

/// The result of loading a kernel.
#[derive(Debug, Clone)]
pub struct LoadedKernel {
    /// Image format.
    pub format: KernelFormat,
    /// Guest-physical entry point for the boot vCPU.
    pub entry: u64,
    /// First byte past the loaded image.
    pub end: u64,
    /// The bzImage's setup header, copied into boot_params.
    pub setup_header: Option<setup_header>,
    /// AP entry of the cell0 direct-SMP ELF note, when the image has one.
    pub smp_entry: Option<u64>,
}

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const BZIMAGE_MAGIC_OFFSET: usize = 0x202;
const BZIMAGE_MAGIC: &[u8; 4] = b"HdrS";
/// Offset of the 64-bit entry in a bzImage's protected-mode kernel.
const BZIMAGE_64BIT_ENTRY: u64 = 0x200;

/// Loads `image` into `mem`.
pub fn load_kernel(mem: &GuestMemoryMmap, mem_size: u64, image: &[u8]) -> Result<LoadedKernel> {
    if image.is_empty() {
        return Err(BootError::EmptyKernel);
    }
    let size = image.len() as u64;
    if size > mem_size.saturating_sub(HIMEM_START) {
        return Err(BootError::KernelTooLarge {
            size,
            mem: mem_size,
        });
    }
    let highmem = Some(GuestAddress(HIMEM_START));
    let kernel = if image.starts_with(ELF_MAGIC) {
        let r = Elf::load(mem, None, &mut Cursor::new(image), highmem).map_err(BootError::Elf)?;
        LoadedKernel {
            format: KernelFormat::Elf,
            entry: r.kernel_load.0,
            end: r.kernel_end,
            setup_header: None,
            smp_entry: find_smp_note(image),
        }
    } else if image.get(BZIMAGE_MAGIC_OFFSET..BZIMAGE_MAGIC_OFFSET + 4) == Some(BZIMAGE_MAGIC) {
        let r = BzImage::load(mem, None, &mut Cursor::new(image), highmem)
            .map_err(BootError::BzImage)?;
        LoadedKernel {
            format: KernelFormat::BzImage,
            entry: r.kernel_load.0 + BZIMAGE_64BIT_ENTRY,
            end: r.kernel_end,
            setup_header: r.setup_header,
            smp_entry: None,
        }
    } else {
        return Err(BootError::UnknownKernelFormat);
    };
    // linux-loader bounds the bytes it copies, not where the image says it
    // ends: an ELF segment's zero-filled tail (p_memsz) or a bzImage's header
    // can claim any address (both found by the `boot` fuzz target).
    let ram_end = ram_ranges(mem_size)
        .last()
        .map_or(0, |(start, len)| start + len);
    if kernel.end > ram_end {
        return Err(BootError::KernelPastRam {
            end: kernel.end,
            ram_end,
        });
    }
    Ok(kernel)
}

/// ELF note type of cell0's direct-SMP entry (owner "CELL0"): the descriptor is
/// the u64 guest-physical address where the VMM starts the APs in long mode.
pub const CELL0_NOTE_SMP_ENTRY: u32 = 0x100;

fn rd<const N: usize>(b: &[u8], off: u64) -> Option<[u8; N]> {
    let off = usize::try_from(off).ok()?;
    b.get(off..off.checked_add(N)?)?.try_into().ok()
}

/// Finds the cell0 SMP-entry note in the PT_NOTE segments of an ELF64 image.
/// Malformed headers simply yield `None`.
pub fn find_smp_note(elf: &[u8]) -> Option<u64> {
    const PT_NOTE: u32 = 4;
    let phoff = u64::from_le_bytes(rd(elf, 0x20)?);
    let phentsize = u64::from(u16::from_le_bytes(rd(elf, 0x36)?));
    let phnum = u64::from(u16::from_le_bytes(rd(elf, 0x38)?));
    for i in 0..phnum {
        let ph = phoff.checked_add(i.checked_mul(phentsize)?)?;
        if u32::from_le_bytes(rd(elf, ph)?) != PT_NOTE {
            continue;
        }
        let off = u64::from_le_bytes(rd(elf, ph + 8)?);
        let filesz = u64::from_le_bytes(rd(elf, ph + 0x20)?);
        let end = off.checked_add(filesz)?;
        let mut n = off;
        while n.checked_add(12)? <= end {
            let namesz = u64::from(u32::from_le_bytes(rd(elf, n)?));
            let descsz = u64::from(u32::from_le_bytes(rd(elf, n + 4)?));
            let ty = u32::from_le_bytes(rd(elf, n + 8)?);
            let name_off = n + 12;
            let desc_off = name_off.checked_add(namesz.checked_add(3)? & !3)?;
            let next = desc_off.checked_add(descsz.checked_add(3)? & !3)?;
            if next > end {
                break;
            }
            let name =
                elf.get(usize::try_from(name_off).ok()?..usize::try_from(name_off + namesz).ok()?)?;
            if name == b"CELL0\0" && ty == CELL0_NOTE_SMP_ENTRY && descsz == 8 {
                return Some(u64::from_le_bytes(rd(elf, desc_off)?));
            }
            n = next;
        }
    }
    None
}

/// Writes the initrd at the top of low RAM, page-aligned, above the kernel.
/// Returns its guest address.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel_end: u64,
    initrd: &[u8],
) -> Result<u64> {
    if initrd.is_empty() {
        return Err(BootError::EmptyInitrd);
    }
    let size = initrd.len() as u64;
    let low_end = mem_size.min(MMIO_HOLE_START);
    // Checked: a kernel end near u64::MAX must not wrap the floor to zero.
    let floor = kernel_end
        .checked_add(0xfff)
        .map_or(u64::MAX, |e| e & !0xfff);
    let free = low_end.saturating_sub(floor);
    if size > free {
        return Err(BootError::InitrdTooLarge { size, free });
    }
    let addr = (low_end - size) & !0xfff;
    mem.write_slice(initrd, GuestAddress(addr))
        .map_err(BootError::WriteInitrd)?;
    Ok(addr)
}

/// Builds the command line from the user's part (first) and the parts the VMM
/// appends, checking the length limit.
pub fn build_cmdline(parts: &[&str]) -> Result<Cmdline> {
    let joined = parts
        .iter()
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    if joined.len() > CMDLINE_MAX {
        let user = parts.first().map_or(0, |s| s.trim().len());
        return Err(BootError::CmdlineTooLong {
            len: joined.len(),
            added: joined.len() - user,
        });
    }
    let mut c = Cmdline::new(CMDLINE_MAX + 1).map_err(BootError::Cmdline)?;
    if !joined.is_empty() {
        c.insert_str(&joined).map_err(BootError::Cmdline)?;
    }
    Ok(c)
}

/// The e820 RAM map for `mem_size` bytes of guest memory.
pub fn e820_map(mem_size: u64) -> Vec<boot_e820_entry> {
    const E820_RAM: u32 = 1;
    let mut v = vec![boot_e820_entry {
        addr: 0,
        size: EBDA_START,
        r#type: E820_RAM,
    }];
    for (start, len) in ram_ranges(mem_size) {
        let (s, l) = if start == 0 {
            (HIMEM_START, len.saturating_sub(HIMEM_START))
        } else {
            (start, len)
        };
        if l > 0 {
            v.push(boot_e820_entry {
                addr: s,
                size: l,
                r#type: E820_RAM,
            });
        }
    }
    v
}

/// Writes the command line and the zero page.
pub fn write_boot_params(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel: &LoadedKernel,
    cmdline: &Cmdline,
    initrd: Option<(u64, u64)>,
) -> Result<()> {
    linux_loader::loader::load_cmdline(mem, GuestAddress(CMDLINE_ADDR), cmdline)
        .map_err(BootError::WriteCmdline)?;
    let cmdline_len = cmdline
        .as_cstring()
        .map_err(BootError::Cmdline)?
        .as_bytes()
        .len();

    let mut params = boot_params::default();
    if let Some(hdr) = kernel.setup_header {
        params.hdr = hdr;
    } else {
        params.hdr.kernel_alignment = 0x0100_0000;
    }
    params.hdr.type_of_loader = 0xff;
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    let e820 = e820_map(mem_size);
    params.e820_entries = e820.len() as u8;
    params.e820_table[..e820.len()].copy_from_slice(&e820);
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE)),
        mem,
    )
    .map_err(BootError::WriteBootParams)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    fn mem(size: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap()
    }

    /// A minimal ELF64 with one PT_LOAD at 1 MiB and, optionally, a CELL0 note.
    fn tiny_elf(with_note: bool) -> Vec<u8> {
        let mut e = vec![0u8; 0x200];
        e[0..4].copy_from_slice(ELF_MAGIC);
        e[4] = 2; // 64-bit
        e[5] = 1; // little endian
        e[6] = 1;
        e[0x10..0x12].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        e[0x12..0x14].copy_from_slice(&62u16.to_le_bytes()); // x86_64
        e[0x14..0x18].copy_from_slice(&1u32.to_le_bytes());
        e[0x18..0x20].copy_from_slice(&0x10_0000u64.to_le_bytes()); // entry
        e[0x20..0x28].copy_from_slice(&0x40u64.to_le_bytes()); // phoff
        e[0x34..0x36].copy_from_slice(&0x40u16.to_le_bytes());
        e[0x36..0x38].copy_from_slice(&0x38u16.to_le_bytes());
        let phnum: u16 = if with_note { 2 } else { 1 };
        e[0x38..0x3a].copy_from_slice(&phnum.to_le_bytes());
        // PT_LOAD: offset 0x100, paddr 1 MiB, 0x10 bytes.
        let ph = 0x40;
        e[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes());
        e[ph + 8..ph + 16].copy_from_slice(&0x100u64.to_le_bytes());
        e[ph + 16..ph + 24].copy_from_slice(&0x10_0000u64.to_le_bytes());
        e[ph + 24..ph + 32].copy_from_slice(&0x10_0000u64.to_le_bytes());
        e[ph + 32..ph + 40].copy_from_slice(&0x10u64.to_le_bytes());
        e[ph + 40..ph + 48].copy_from_slice(&0x10u64.to_le_bytes());
        e[0x100..0x110].copy_from_slice(&[0xf4; 16]);
        if with_note {
            let ph = 0x40 + 0x38;
            e[ph..ph + 4].copy_from_slice(&4u32.to_le_bytes());
            e[ph + 8..ph + 16].copy_from_slice(&0x180u64.to_le_bytes());
            e[ph + 32..ph + 40].copy_from_slice(&28u64.to_le_bytes());
            let n = 0x180;
            e[n..n + 4].copy_from_slice(&6u32.to_le_bytes());
            e[n + 4..n + 8].copy_from_slice(&8u32.to_le_bytes());
            e[n + 8..n + 12].copy_from_slice(&CELL0_NOTE_SMP_ENTRY.to_le_bytes());
            e[n + 12..n + 18].copy_from_slice(b"CELL0\0");
            e[n + 20..n + 28].copy_from_slice(&0x10_0008u64.to_le_bytes());
        }
        e
    }

    #[test]
    fn loads_an_elf_and_finds_the_smp_note() {
        let m = mem(16 << 20);
        let k = load_kernel(&m, 16 << 20, &tiny_elf(true)).unwrap();
        assert_eq!(k.format, KernelFormat::Elf);
        assert_eq!(k.entry, 0x10_0000);
        assert_eq!(k.smp_entry, Some(0x10_0008));
        let b: u8 = m.read_obj(GuestAddress(0x10_0000)).unwrap();
        assert_eq!(b, 0xf4);
        let k = load_kernel(&m, 16 << 20, &tiny_elf(false)).unwrap();
        assert_eq!(k.smp_entry, None);
    }

    #[test]
    fn segments_past_ram_and_huge_kernel_ends_are_errors_not_panics() {
        // Found by the `boot` fuzz target (fuzz/regressions/boot/).
        let m = mem(16 << 20);
        let mut elf = tiny_elf(false);
        // p_memsz of the PT_LOAD: far past 16 MiB of RAM.
        elf[0x40 + 40..0x40 + 48].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
        assert!(matches!(
            load_kernel(&m, 16 << 20, &elf),
            Err(BootError::KernelPastRam { ram_end, .. }) if ram_end == 16 << 20
        ));
        assert!(matches!(
            load_initrd(&m, 16 << 20, u64::MAX - 10, b"initrd"),
            Err(BootError::InitrdTooLarge { free: 0, .. })
        ));
        // A bzImage with an empty protected-mode kernel "loads" anywhere its
        // header's code32_start says (fuzz/regressions/boot/crash-4ae3…).
        let mut bz = vec![0u8; 1024];
        bz[0x1f1] = 1; // setup_sects: the whole image is setup
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        bz[0x206..0x208].copy_from_slice(&0x20cu16.to_le_bytes());
        bz[0x211] = 1; // LOADED_HIGH
        bz[0x214..0x218].copy_from_slice(&0xffff_ff00u32.to_le_bytes());
        assert!(matches!(
            load_kernel(&m, 16 << 20, &bz),
            Err(BootError::KernelPastRam {
                end: 0xffff_ff00,
                ..
            })
        ));
    }

    #[test]
    fn bad_images_get_typed_errors() {
        let m = mem(16 << 20);
        assert!(matches!(
            load_kernel(&m, 16 << 20, &[]),
            Err(BootError::EmptyKernel)
        ));
        assert!(matches!(
            load_kernel(&m, 16 << 20, &[0x55; 4096]),
            Err(BootError::UnknownKernelFormat)
        ));
        let elf = tiny_elf(false);
        assert!(matches!(
            load_kernel(&m, 16 << 20, &elf[..0x30]),
            Err(BootError::Elf(_))
        ));
        assert!(matches!(
            load_kernel(&m, 2 << 20, &vec![0u8; 3 << 20]),
            Err(BootError::KernelTooLarge { .. })
        ));
        let mut bz = vec![0u8; 0x1000];
        bz[0x202..0x206].copy_from_slice(BZIMAGE_MAGIC);
        assert!(matches!(
            load_kernel(&m, 16 << 20, &bz),
            Err(BootError::BzImage(_))
        ));
    }

    #[test]
    fn note_parser_survives_garbage() {
        let mut e = tiny_elf(true);
        // namesz pointing far past the segment
        e[0x180..0x184].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(find_smp_note(&e), None);
        let mut e = tiny_elf(true);
        e[0x20..0x28].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(find_smp_note(&e), None);
        assert_eq!(find_smp_note(b"\x7fELF"), None);
    }

    #[test]
    fn initrd_goes_to_the_top_of_low_ram() {
        let m = mem(16 << 20);
        let addr = load_initrd(&m, 16 << 20, 0x20_0000, &[7u8; 5000]).unwrap();
        assert_eq!(addr, ((16 << 20) - 5000) & !0xfff);
        assert!(matches!(
            load_initrd(&m, 16 << 20, 0x20_0000, &vec![1u8; 15 << 20]),
            Err(BootError::InitrdTooLarge { .. })
        ));
        assert!(matches!(
            load_initrd(&m, 16 << 20, 0x20_0000, &[]),
            Err(BootError::EmptyInitrd)
        ));
    }

    #[test]
    fn cmdline_limit() {
        let ok = "a".repeat(CMDLINE_MAX);
        assert!(build_cmdline(&[&ok]).is_ok());
        let long = "a".repeat(CMDLINE_MAX + 1);
        assert!(matches!(
            build_cmdline(&[&long]),
            Err(BootError::CmdlineTooLong { len, added: 0 }) if len == CMDLINE_MAX + 1
        ));
        assert!(matches!(
            build_cmdline(&[&ok, "cell0.cpus=2"]),
            Err(BootError::CmdlineTooLong { added: 13, .. })
        ));
        let c = build_cmdline(&["console=ttyS0", "", " cell0.cpus=2 "]).unwrap();
        assert_eq!(
            c.as_cstring().unwrap().to_str().unwrap(),
            "console=ttyS0 cell0.cpus=2"
        );
    }

    #[test]
    fn e820_reports_low_ram_and_high_ram() {
        let e = e820_map(5 << 30);
        let v: Vec<(u64, u64)> = e.iter().map(|x| (x.addr, x.size)).collect();
        assert_eq!(
            v,
            vec![
                (0, EBDA_START),
                (HIMEM_START, (3 << 30) - HIMEM_START),
                (4 << 30, 2 << 30)
            ]
        );
    }

    #[test]
    fn boot_params_carry_cmdline_and_initrd() {
        let m = mem(16 << 20);
        let k = load_kernel(&m, 16 << 20, &tiny_elf(false)).unwrap();
        let c = build_cmdline(&["console=ttyS0"]).unwrap();
        write_boot_params(&m, 16 << 20, &k, &c, Some((0xf0_0000, 1234))).unwrap();
        let p: boot_params = m.read_obj(GuestAddress(ZERO_PAGE)).unwrap();
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_ADDR as u32);
        assert_eq!({ p.hdr.cmdline_size }, 13);
        assert_eq!({ p.hdr.ramdisk_image }, 0xf0_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 1234);
        assert_eq!(p.e820_entries, 2);
        let mut s = [0u8; 14];
        m.read_slice(&mut s, GuestAddress(CMDLINE_ADDR)).unwrap();
        assert_eq!(&s, b"console=ttyS0\0");
    }
}
