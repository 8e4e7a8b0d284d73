// SPDX-License-Identifier: Apache-2.0
//! Target `boot`: the kernel and initrd loaders (`vmm::boot`): ELF and bzImage
//! through linux-loader, the direct-SMP note, the initrd placement and the
//! command line.
//!
//! Half the inputs are raw images; the other half are small ELF files built
//! from fuzzed fields (program headers, a note, entry), so the loader gets past
//! the header checks. Checks: no panic; a loaded kernel lies inside guest
//! memory, above the loader's floor; an initrd is placed inside RAM after the
//! kernel.

use std::cell::RefCell;

use arbitrary::Unstructured;
use cell0_vmm::boot::{build_cmdline, find_smp_note, load_initrd, load_kernel};
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// Guest RAM of the harness.
pub const MEM_SIZE: u64 = 8 << 20;

thread_local! {
    static MEM: RefCell<Option<GuestMemoryMmap>> = const { RefCell::new(None) };
}

/// The `CELL0` note type of the direct-SMP entry.
const NOTE_TYPE_SMP: u32 = 0x100;

/// A 64-bit little-endian x86-64 ELF: `loads` are (paddr, file bytes, memsz),
/// plus an optional `CELL0` note carrying `smp`.
pub fn tiny_elf(entry: u64, loads: &[(u64, Vec<u8>, u64)], smp: Option<(u32, Vec<u8>)>) -> Vec<u8> {
    let phnum = loads.len() + usize::from(smp.is_some());
    let mut ehdr = vec![0u8; 64];
    ehdr[..4].copy_from_slice(b"\x7fELF");
    ehdr[4] = 2; // 64-bit
    ehdr[5] = 1; // little endian
    ehdr[6] = 1; // version
    ehdr[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    ehdr[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    ehdr[20..24].copy_from_slice(&1u32.to_le_bytes());
    ehdr[24..32].copy_from_slice(&entry.to_le_bytes());
    ehdr[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
    ehdr[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
    ehdr[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
    ehdr[56..58].copy_from_slice(&(phnum as u16).to_le_bytes());
    let mut off = 64 + 56 * phnum as u64;
    let mut phdrs = Vec::new();
    let mut body = Vec::new();
    let mut ph = |p_type: u32, offset: u64, paddr: u64, filesz: u64, memsz: u64| {
        let mut p = vec![0u8; 56];
        p[..4].copy_from_slice(&p_type.to_le_bytes());
        p[4..8].copy_from_slice(&5u32.to_le_bytes());
        p[8..16].copy_from_slice(&offset.to_le_bytes());
        p[16..24].copy_from_slice(&paddr.to_le_bytes());
        p[24..32].copy_from_slice(&paddr.to_le_bytes());
        p[32..40].copy_from_slice(&filesz.to_le_bytes());
        p[40..48].copy_from_slice(&memsz.to_le_bytes());
        p[48..56].copy_from_slice(&16u64.to_le_bytes());
        phdrs.extend(p);
    };
    for (paddr, bytes, memsz) in loads {
        ph(1, off, *paddr, bytes.len() as u64, *memsz);
        body.extend_from_slice(bytes);
        off += bytes.len() as u64;
    }
    if let Some((name_len, desc)) = smp {
        let mut n = Vec::new();
        n.extend(name_len.to_le_bytes());
        n.extend((desc.len() as u32).to_le_bytes());
        n.extend(NOTE_TYPE_SMP.to_le_bytes());
        n.extend(b"CELL0\0\0\0");
        n.extend(&desc);
        ph(4, off, 0, n.len() as u64, n.len() as u64);
        body.extend(n);
    }
    let mut elf = ehdr;
    elf.extend(phdrs);
    elf.extend(body);
    elf
}

fn structured(u: &mut Unstructured<'_>) -> arbitrary::Result<Vec<u8>> {
    let entry = if u.ratio(3, 4)? {
        u.int_in_range(0x10_0000u64..=MEM_SIZE)?
    } else {
        u.arbitrary()?
    };
    let mut loads = Vec::new();
    for _ in 0..u.int_in_range(0u8..=3)? {
        let paddr = if u.ratio(3, 4)? {
            u.int_in_range(0u64..=MEM_SIZE + 0x1000)?
        } else {
            u.arbitrary()?
        };
        let n = u.int_in_range(0usize..=256)?;
        let bytes = u.bytes(n.min(u.len()))?.to_vec();
        let memsz = if u.ratio(3, 4)? {
            bytes.len() as u64 + u64::from(u.int_in_range(0u16..=4096)?)
        } else {
            u.arbitrary()?
        };
        loads.push((paddr, bytes, memsz));
    }
    let smp = if u.arbitrary()? {
        let name_len = if u.ratio(3, 4)? { 6 } else { u.arbitrary()? };
        let n = *u.choose(&[8usize, 8, 0, 4, 16])?;
        Some((name_len, u.bytes(n.min(u.len()))?.to_vec()))
    } else {
        None
    };
    let mut elf = tiny_elf(entry, &loads, smp);
    // A few raw byte flips in the headers.
    for _ in 0..u.int_in_range(0u8..=3)? {
        let i = u.int_in_range(0..=elf.len() - 1)?;
        elf[i] = u.arbitrary()?;
    }
    Ok(elf)
}

/// The target.
pub fn run(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(mode) = u.arbitrary::<u8>() else {
        return;
    };
    let image = if mode & 1 == 1 {
        structured(&mut u).unwrap_or_default()
    } else {
        u.take_rest().to_vec()
    };
    let note = find_smp_note(&image);
    MEM.with(|m| {
        let mut m = m.borrow_mut();
        let mem = m.get_or_insert_with(|| {
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
                .expect("guest memory")
        });
        if let Ok(k) = load_kernel(mem, MEM_SIZE, &image) {
            assert!(k.end <= MEM_SIZE, "kernel end {:#x} past RAM", k.end);
            if k.smp_entry.is_some() {
                assert_eq!(k.smp_entry, note);
            }
            let initrd = &data[..data.len().min(4096)];
            if let Ok(addr) = load_initrd(mem, MEM_SIZE, k.end, initrd) {
                assert!(addr >= k.end, "initrd at {addr:#x} overlaps the kernel");
                assert!(addr + initrd.len() as u64 <= MEM_SIZE);
            }
        }
    });
    if let Ok(text) = std::str::from_utf8(data) {
        let parts: Vec<&str> = text.split('\0').collect();
        let _ = build_cmdline(&parts);
    }
}
