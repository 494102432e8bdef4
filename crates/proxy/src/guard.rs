//! Keeping the proxy's own memory out of reach of delegated calls.
//!
//! Below APP_END the proxy has only the application's memory, so a bad
//! pointer there faults as it would natively. Above it live the proxy's own
//! image, stack and the control region. With memory protection keys the
//! proxy tags all of that with a key of its own and denies that key in
//! PKRU for exactly the duration of each delegated system call (see
//! `lwk_rt::pkey`): a pointer into proxy memory gets EFAULT, directly or
//! through an iovec, msghdr or any other structure.

use core::arch::asm;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};

use lwk_rt::pkey;
use lwk_rt::*;

const STACK_SIZE: u64 = 256 << 10;

/// PKRU values: with the proxy's key allowed, and denied. Equal when no
/// protection keys are available.
static PKRU_ALLOW: AtomicU32 = AtomicU32::new(0);
static PKRU_DENY: AtomicU32 = AtomicU32::new(0);
static STACK_TOP: AtomicU64 = AtomicU64::new(0);
/// The proxy's protection key (0: none).
static KEY: AtomicU64 = AtomicU64::new(0);

/// Tag the proxy's memory with a protection key and prepare a stack inside
/// it. Returns why not when the CPU or kernel cannot.
pub fn protect_own_memory() -> Result<(), &'static str> {
    // A stack of our own in tagged memory (the kernel's initial stack holds
    // only argv and the environment, which the application has anyway).
    // SAFETY: an anonymous mapping placed by the kernel, in the upper half.
    let stack = unsafe { mmap(0, STACK_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0) };
    if stack < 0 {
        return Err("cannot map a stack");
    }
    STACK_TOP.store(stack as u64 + STACK_SIZE, Relaxed);
    let key = pkey::alloc();
    if key < 0 {
        return Err("pkey_alloc failed");
    }
    let k = key as u64;
    let ok = pkey::mprotect(stack as u64, STACK_SIZE, PROT_READ | PROT_WRITE, k) == 0
        && pkey::tag_control(k)
        && pkey::tag_image(k);
    if !ok {
        return Err("pkey_mprotect failed");
    }
    // SAFETY: a key was allocated, so the CPU has PKRU.
    let allow = unsafe { pkey::rdpkru() };
    PKRU_ALLOW.store(allow, Relaxed);
    PKRU_DENY.store(allow | pkey::key_bits(key as u32), Relaxed);
    KEY.store(k, Relaxed);
    Ok(())
}

/// An alternate signal stack for the calling thread, outside the
/// protection key: the kernel enters handlers with its default PKRU.
pub fn setup_altstack() {
    const ALT_SIZE: u64 = 64 << 10;
    // SAFETY: a fresh anonymous mapping for the alternate stack.
    let alt = unsafe { mmap(0, ALT_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0) };
    if alt < 0 {
        return;
    }
    let ss = [alt as u64, 0, ALT_SIZE];
    // SAFETY: ss describes the mapping above.
    unsafe { syscall3(lwk_rt::nr::SIGALTSTACK, ss.as_ptr() as u64, 0, 0) };
}

/// A stack for a worker thread, in memory carrying the proxy's key.
/// Returns its (16-aligned) top.
pub fn alloc_stack(size: u64) -> Result<u64, i64> {
    // SAFETY: an anonymous mapping placed by the kernel, in the upper half.
    let s = unsafe { mmap(0, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0) };
    if s < 0 {
        return Err(s);
    }
    let key = KEY.load(Relaxed);
    if key > 0 {
        pkey::mprotect(s as u64, size, PROT_READ | PROT_WRITE, key);
    }
    Ok(s as u64 + size)
}

/// After a fork the control region is a new mapping: tag it too.
pub fn retag_control() {
    let key = KEY.load(Relaxed);
    if key > 0 {
        pkey::tag_control(key);
    }
}

/// Continue on the tagged stack (if there is one) in `f`.
///
/// # Safety
/// `f` never returns; nothing on the current stack is used afterwards.
pub unsafe fn switch_stack(f: extern "C" fn() -> !) -> ! {
    let top = STACK_TOP.load(Relaxed);
    if top == 0 {
        f()
    }
    // SAFETY: top is the 16-aligned end of a fresh read-write mapping.
    unsafe {
        asm!("mov rsp, {top}", "xor ebp, ebp", "call {f}", "ud2", top = in(reg) top, f = in(reg) f, options(noreturn))
    }
}

/// The application's call, with the proxy's memory locked away.
///
/// # Safety
/// The caller passes the application's raw system call.
#[inline(always)]
pub unsafe fn guarded_syscall(nr: u64, a: [u64; 6]) -> i64 {
    // SAFETY: as documented; the PKRU values come from this CPU.
    unsafe { pkey::guarded_syscall(nr, a, PKRU_DENY.load(Relaxed), PKRU_ALLOW.load(Relaxed)) }
}
