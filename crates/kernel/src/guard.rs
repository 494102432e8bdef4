//! Keeping the LWK's own memory out of reach of the application.
//!
//! The LWK lives in the application's process, above its address range:
//! the image at 0x6f.., the control region at 0x6e... Where the CPU has
//! memory protection keys, the LWK tags all of it with key 1 and the
//! application runs with that key denied in PKRU. Then:
//! * a stray store of the application into LWK memory faults (SEGV_PKUERR)
//!   instead of corrupting the LWK;
//! * a system call the LWK executes for the application in this process
//!   (a local pass-through such as clock_gettime or nanosleep) runs with the
//!   key denied, so a pointer into LWK memory gets EFAULT, as natively.
//!
//! The kernel enters signal handlers with its default PKRU, which denies
//! every key but 0, so the SIGSYS entry stub allows key 1 before any LWK
//! code touches LWK memory; rt_sigreturn restores the application's PKRU.
//! The Syscall User Dispatch selector byte, which the kernel reads on every
//! system call with the application's PKRU, lives on its own untagged page.

use core::arch::global_asm;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};

use lwk_rt::pkey;
use lwk_rt::*;

/// The key the entry stub allows without reading memory. The first key a
/// fresh process allocates is 1; if we get another, protection stays off.
pub const LWK_KEY: u32 = 1;

static ON: AtomicBool = AtomicBool::new(false);
static PKRU_ALLOW: AtomicU32 = AtomicU32::new(0);
static PKRU_DENY: AtomicU32 = AtomicU32::new(0);
static SELECTOR: AtomicU64 = AtomicU64::new(0);

// SIGSYS entry when protection is on: allow LWK_KEY (rdpkru clobbers edx,
// which holds the ucontext argument), then the Rust handler.
global_asm!(
    ".globl lwk_sigsys_pku",
    "lwk_sigsys_pku:",
    "mov r11, rdx",
    "xor ecx, ecx",
    "rdpkru",
    "and eax, {mask}",
    "xor ecx, ecx",
    "xor edx, edx",
    "wrpkru",
    "mov rdx, r11",
    "jmp lwk_sigsys",
    mask = const !pkey::key_bits(LWK_KEY),
);

extern "C" {
    fn lwk_sigsys_pku();
}

/// Tag the LWK's memory. Called once at boot, after the control region is
/// mapped and before the program is loaded. Returns why not on failure.
pub fn protect() -> Result<(), &'static str> {
    // SAFETY: a fresh anonymous page, placed by the kernel in the upper half.
    let sel = unsafe { mmap(0, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0) };
    if sel < 0 {
        return Err("cannot map the selector page");
    }
    SELECTOR.store(sel as u64, Relaxed);
    let key = pkey::alloc();
    if key < 0 {
        return Err("no memory protection keys on this CPU or kernel");
    }
    if key != LWK_KEY as i64 {
        pkey::free(key);
        return Err("protection key 1 is taken");
    }
    if !pkey::tag_control(key as u64) || !pkey::tag_image(key as u64) {
        return Err("pkey_mprotect failed");
    }
    // SAFETY: a key was allocated, so the CPU has PKRU.
    let allow = unsafe { pkey::rdpkru() } & !pkey::key_bits(LWK_KEY);
    PKRU_ALLOW.store(allow, Relaxed);
    PKRU_DENY.store(allow | pkey::key_bits(LWK_KEY), Relaxed);
    ON.store(true, Relaxed);
    Ok(())
}

/// After a fork the control region is a new mapping: tag it too.
pub fn retag_control() {
    if ON.load(Relaxed) {
        pkey::tag_control(LWK_KEY as u64);
    }
}

/// The SIGSYS handler to install: the stub when protection is on.
pub fn sigsys_entry(plain: u64) -> u64 {
    if ON.load(Relaxed) {
        lwk_sigsys_pku as *const () as u64
    } else {
        plain
    }
}

/// Where the dispatch selector byte lives (0: the caller's fallback).
pub fn selector() -> u64 {
    SELECTOR.load(Relaxed)
}

/// PKRU for the application: the LWK's key denied (0 when off).
pub fn app_pkru() -> Option<u32> {
    ON.load(Relaxed).then(|| PKRU_DENY.load(Relaxed))
}

/// A system call executed here on the application's behalf, with the LWK's
/// memory locked away for its duration.
///
/// # Safety
/// The caller passes the application's raw system call.
pub unsafe fn syscall_for_app(nr: u64, a: [u64; 6]) -> i64 {
    // SAFETY: as documented; deny == allow when protection is off.
    unsafe { pkey::guarded_syscall(nr, a, PKRU_DENY.load(Relaxed), PKRU_ALLOW.load(Relaxed)) }
}
