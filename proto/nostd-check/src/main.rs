// SPDX-License-Identifier: Apache-2.0
//! Proves that cell0-proto without default features needs nothing but `core`
//! and `alloc`: the only symbols supplied here are the ones any freestanding
//! Rust binary supplies (allocator, panic handler, mem* functions, and the two
//! unwinding symbols that the prebuilt `alloc` references).
#![no_std]
#![no_main]

extern crate alloc;

use core::alloc::{GlobalAlloc, Layout};
use core::sync::atomic::{AtomicUsize, Ordering};

use cell0_proto::bytes::BytesMut;
use cell0_proto::msg::Call;
use cell0_proto::{Body, Decoded, ErrorCode, FrameDecoder, Kind, decode_slice};

const HEAP_SIZE: usize = 1 << 20;
static mut HEAP: [u8; HEAP_SIZE] = [0; HEAP_SIZE];
static NEXT: AtomicUsize = AtomicUsize::new(0);

struct Bump;

// SAFETY: hands out disjoint, aligned ranges of HEAP and never reuses them.
unsafe impl GlobalAlloc for Bump {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let start = (NEXT.load(Ordering::Relaxed) + l.align() - 1) & !(l.align() - 1);
        if start + l.size() > HEAP_SIZE {
            return core::ptr::null_mut();
        }
        NEXT.store(start + l.size(), Ordering::Relaxed);
        // SAFETY: start + size lies inside HEAP.
        unsafe { (&raw mut HEAP as *mut u8).add(start) }
    }

    unsafe fn dealloc(&self, _: *mut u8, _: Layout) {}
}

#[global_allocator]
static ALLOC: Bump = Bump;

fn exit(code: i32) -> ! {
    // SAFETY: the Linux exit syscall; it does not return.
    unsafe { core::arch::asm!("syscall", in("rax") 60, in("rdi") code, options(noreturn)) }
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    exit(101)
}

#[unsafe(no_mangle)]
extern "C" fn _Unwind_Resume() -> ! {
    exit(102)
}

#[unsafe(no_mangle)]
extern "C" fn rust_eh_personality() {}

#[unsafe(no_mangle)]
unsafe extern "C" fn memcpy(d: *mut u8, s: *const u8, n: usize) -> *mut u8 {
    // SAFETY: memmove handles any overlap; callers pass valid ranges.
    unsafe { memmove(d, s, n) }
}

#[unsafe(no_mangle)]
unsafe extern "C" fn memmove(d: *mut u8, s: *const u8, n: usize) -> *mut u8 {
    if (d as usize) < (s as usize) {
        for i in 0..n {
            // SAFETY: callers pass valid ranges of n bytes.
            unsafe { d.add(i).write_volatile(s.add(i).read_volatile()) };
        }
    } else {
        for i in (0..n).rev() {
            // SAFETY: as above.
            unsafe { d.add(i).write_volatile(s.add(i).read_volatile()) };
        }
    }
    d
}

#[unsafe(no_mangle)]
unsafe extern "C" fn memset(d: *mut u8, c: i32, n: usize) -> *mut u8 {
    for i in 0..n {
        // SAFETY: callers pass a valid range of n bytes.
        unsafe { d.add(i).write_volatile(c as u8) };
    }
    d
}

#[unsafe(no_mangle)]
unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: callers pass valid ranges of n bytes.
        let (x, y) = unsafe { (a.add(i).read_volatile(), b.add(i).read_volatile()) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
    }
    0
}

#[unsafe(no_mangle)]
unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}

core::arch::global_asm!(".globl _start", "_start:", "and rsp, -16", "call check_main");

#[unsafe(no_mangle)]
extern "C" fn check_main() -> ! {
    let call = Call {
        service: "echo".into(),
        method: "echo".into(),
        payload: alloc::vec![1u8, 2, 3].into(),
        shm: alloc::vec![],
    };
    let Ok(wire) = Body::Call(call.clone()).to_frame(7).to_vec() else {
        exit(2)
    };
    // Byte by byte through the incremental decoder.
    let mut dec = FrameDecoder::new();
    let mut buf = BytesMut::new();
    let mut frame = None;
    for b in &wire {
        buf.extend_from_slice(&[*b]);
        match dec.decode(&mut buf) {
            Ok(Some(f)) => frame = Some(f),
            Ok(None) => {}
            Err(_) => exit(3),
        }
    }
    let Some(frame) = frame else { exit(4) };
    if frame.kind != Kind::Call || frame.request_id != 7 {
        exit(5);
    }
    if Body::from_frame(&frame) != Ok(Body::Call(call)) {
        exit(6);
    }
    // The allocation-free decoder rejects garbage with a typed code.
    match decode_slice(b"GET /", 1024) {
        Err(e) if e.code() == ErrorCode::BadMagic => {}
        _ => exit(7),
    }
    if !matches!(decode_slice(&wire[..10], 1024), Ok(Decoded::NeedMore { needed: 14 })) {
        exit(8);
    }
    exit(0)
}
