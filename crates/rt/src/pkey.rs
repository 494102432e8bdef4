//! Memory protection keys, used by both halves of lwk to keep their own
//! memory out of reach of the application's system calls: the memory is
//! tagged with a key that PKRU denies while an application's call runs.
//! The kernel honours PKRU in its copies to and from user space, so such a
//! call gets EFAULT, exactly as it would natively for an unmapped address.
//! PKRU never stops instruction fetches, so code can be tagged too.

use core::arch::asm;

use crate::sys::syscall6;

pub const SYS_PKEY_MPROTECT: u64 = 329;
pub const SYS_PKEY_ALLOC: u64 = 330;
pub const SYS_PKEY_FREE: u64 = 331;

/// Both access-disable and write-disable bits of `key`.
pub const fn key_bits(key: u32) -> u32 {
    3 << (2 * key)
}

pub fn alloc() -> i64 {
    // SAFETY: plain pkey_alloc.
    unsafe { syscall6(SYS_PKEY_ALLOC, 0, 0, 0, 0, 0, 0) }
}

pub fn free(key: i64) {
    // SAFETY: plain pkey_free.
    unsafe { syscall6(SYS_PKEY_FREE, key as u64, 0, 0, 0, 0, 0) };
}

pub fn mprotect(addr: u64, len: u64, prot: u64, key: u64) -> i64 {
    // SAFETY: changes the key of our own mappings.
    unsafe { syscall6(SYS_PKEY_MPROTECT, addr, len, prot, key, 0, 0) }
}

/// # Safety
/// The CPU and kernel support protection keys (a key was allocated).
pub unsafe fn rdpkru() -> u32 {
    let v: u32;
    // SAFETY: rdpkru with ecx = 0.
    unsafe { asm!("rdpkru", in("ecx") 0, out("eax") v, out("edx") _, options(nomem, nostack)) };
    v
}

/// # Safety
/// Protection keys are supported; `v` must not deny memory the caller
/// is about to use.
pub unsafe fn wrpkru(v: u32) {
    // SAFETY: wrpkru with ecx = edx = 0.
    unsafe { asm!("wrpkru", in("eax") v, in("ecx") 0, in("edx") 0, options(nostack)) };
}

extern "C" {
    static __ehdr_start: u8;
}

/// Tag the control region (at its fixed address) with `key`.
pub fn tag_control(key: u64) -> bool {
    use lwk_abi::control::CONTROL_SIZE;
    use lwk_abi::layout::CONTROL_ADDR;
    mprotect(CONTROL_ADDR, CONTROL_SIZE as u64, crate::sys::PROT_READ | crate::sys::PROT_WRITE, key) == 0
}

/// Tag every loadable segment of this image with `key`, keeping each
/// segment's protection. False if any failed.
pub fn tag_image(key: u64) -> bool {
    let mut ok = true;
    // SAFETY: the ELF header and program headers are in the image's first,
    // read-only segment, which the kernel mapped.
    unsafe {
        let base = &__ehdr_start as *const u8;
        let phoff = core::ptr::read_unaligned(base.add(32) as *const u64);
        let phnum = core::ptr::read_unaligned(base.add(56) as *const u16) as usize;
        for i in 0..phnum {
            let ph = base.add(phoff as usize + i * 56);
            let ptype = core::ptr::read_unaligned(ph as *const u32);
            let flags = core::ptr::read_unaligned(ph.add(4) as *const u32) as u64;
            let vaddr = core::ptr::read_unaligned(ph.add(16) as *const u64);
            let memsz = core::ptr::read_unaligned(ph.add(40) as *const u64);
            if ptype == 1 {
                let start = vaddr & !4095;
                let end = (vaddr + memsz + 4095) & !4095;
                let prot = ((flags & 4) >> 2) | (flags & 2) | ((flags & 1) << 2);
                ok &= mprotect(start, end - start, prot, key) == 0;
            }
        }
    }
    ok
}

/// A system call with PKRU set to `deny` from just before the `syscall`
/// until just after it, then back to `allow`. No memory is touched in
/// between. With `deny == allow` (no protection keys) a plain call.
///
/// # Safety
/// The caller passes a system call it means to make, and PKRU values that
/// are valid on this CPU.
#[inline(always)]
pub unsafe fn guarded_syscall(nr: u64, a: [u64; 6], deny: u32, allow: u32) -> i64 {
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
