//! Keeping the proxy's own memory out of reach of delegated calls.
//!
//! Below APP_END the proxy has only the application's memory, so a bad
//! pointer there faults as it would natively. Above it live the proxy's own
//! image, stack and the control region. With memory protection keys the
//! proxy tags all of that with a key of its own and denies that key in
//! PKRU for exactly the duration of each delegated system call: the kernel
//! honours PKRU in its user copies, so a pointer into proxy memory gets
//! EFAULT, directly or through an iovec, msghdr or any other structure.

use core::arch::asm;
use core::sync::atomic::{AtomicU32, Ordering::Relaxed};

use lwk_abi::control::CONTROL_SIZE;
use lwk_abi::layout::CONTROL_ADDR;
use lwk_rt::*;

const SYS_PKEY_MPROTECT: u64 = 329;
const SYS_PKEY_ALLOC: u64 = 330;
const STACK_SIZE: u64 = 256 << 10;

/// PKRU values: with the proxy's key allowed, and denied. Equal when no
/// protection keys are available.
static PKRU_ALLOW: AtomicU32 = AtomicU32::new(0);
static PKRU_DENY: AtomicU32 = AtomicU32::new(0);
static STACK_TOP: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

extern "C" {
    static __ehdr_start: u8;
}

fn rdpkru() -> u32 {
    let v: u32;
    // SAFETY: rdpkru with ecx = 0 reads PKRU; only called when PKU exists.
    unsafe { asm!("rdpkru", in("ecx") 0, out("eax") v, out("edx") _, options(nomem, nostack)) };
    v
}

fn pkey_mprotect(addr: u64, len: u64, prot: u64, key: u64) -> i64 {
    // SAFETY: changes only the key of the proxy's own mappings.
    unsafe { syscall6(SYS_PKEY_MPROTECT, addr, len, prot, key, 0, 0) }
}

/// Tag the proxy's writable memory with a protection key and prepare a
/// stack inside it. Returns why not when the CPU or kernel cannot.
pub fn protect_own_memory() -> Result<(), &'static str> {
    // A stack of our own in tagged memory (the kernel's initial stack holds
    // only argv and the environment, which the application has anyway).
    // SAFETY: an anonymous mapping placed by the kernel, in the upper half.
    let stack = unsafe { mmap(0, STACK_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0) };
    if stack < 0 {
        return Err("cannot map a stack");
    }
    STACK_TOP.store(stack as u64 + STACK_SIZE, Relaxed);
    // SAFETY: plain pkey_alloc.
    let key = unsafe { syscall3(SYS_PKEY_ALLOC, 0, 0, 0) };
    if key < 0 {
        return Err("pkey_alloc failed");
    }
    let key = key as u64;
    let mut ok = pkey_mprotect(stack as u64, STACK_SIZE, PROT_READ | PROT_WRITE, key) == 0;
    ok &= pkey_mprotect(CONTROL_ADDR, CONTROL_SIZE as u64, PROT_READ | PROT_WRITE, key) == 0;
    // The image's segments, from its own program headers.
    // SAFETY: the ELF header and program headers are in the image's first,
    // read-only segment.
    unsafe {
        let base = &__ehdr_start as *const u8;
        let phoff = core::ptr::read_unaligned(base.add(32) as *const u64);
        let phnum = core::ptr::read_unaligned(base.add(56) as *const u16) as usize;
        for i in 0..phnum {
            let ph = base.add(phoff as usize + i * 56);
            let (ptype, flags) =
                (core::ptr::read_unaligned(ph as *const u32), core::ptr::read_unaligned(ph.add(4) as *const u32));
            let (vaddr, memsz) = (
                core::ptr::read_unaligned(ph.add(16) as *const u64),
                core::ptr::read_unaligned(ph.add(40) as *const u64),
            );
            if ptype == 1 {
                // Every segment, code included: PKRU stops data reads and
                // writes, never instruction fetches.
                let start = vaddr & !4095;
                let end = (vaddr + memsz + 4095) & !4095;
                let prot = ((flags as u64 & 4) >> 2) | (flags as u64 & 2) | ((flags as u64 & 1) << 2);
                ok &= pkey_mprotect(start, end - start, prot, key) == 0;
            }
        }
    }
    if !ok {
        return Err("pkey_mprotect failed");
    }
    let allow = rdpkru();
    PKRU_ALLOW.store(allow, Relaxed);
    PKRU_DENY.store(allow | (3 << (2 * key)), Relaxed);
    Ok(())
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

/// A system call with the proxy's own memory locked away: PKRU denies the
/// proxy's key from just before the `syscall` until just after it. No
/// memory is touched in between.
///
/// # Safety
/// The caller passes the application's raw system call.
#[inline(always)]
pub unsafe fn guarded_syscall(nr: u64, a: [u64; 6]) -> i64 {
    let (deny, allow) = (PKRU_DENY.load(Relaxed), PKRU_ALLOW.load(Relaxed));
    if deny == allow {
        // SAFETY: as documented.
        return unsafe { syscall6(nr, a[0], a[1], a[2], a[3], a[4], a[5]) };
    }
    let ret: i64;
    // SAFETY: wrpkru needs ecx = edx = 0; the syscall arguments go in the
    // registers the ABI names; rcx and r11 are clobbered by `syscall`.
    unsafe {
        asm!(
            "xor ecx, ecx",
            "xor edx, edx",
            "mov eax, {deny:e}",
            "wrpkru",
            "mov rax, {nr}",
            "mov rdx, {a2}",
            "syscall",
            "mov {ret}, rax",
            "xor ecx, ecx",
            "xor edx, edx",
            "mov eax, {allow:e}",
            "wrpkru",
            deny = in(reg) deny,
            allow = in(reg) allow,
            nr = in(reg) nr,
            a2 = in(reg) a[2],
            ret = out(reg) ret,
            in("rdi") a[0],
            in("rsi") a[1],
            in("r10") a[3],
            in("r8") a[4],
            in("r9") a[5],
            out("rax") _,
            out("rcx") _,
            out("rdx") _,
            out("r11") _,
            options(nostack),
        );
    }
    ret
}
