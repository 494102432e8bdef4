//! The memory functions the compiler emits calls to. Written with `rep`
//! string instructions so LLVM cannot turn them back into calls to
//! themselves. Not compiled for unit tests, where libc provides them.

#[cfg(not(test))]
mod imp {
    use core::arch::asm;

    /// # Safety
    /// Standard memcpy contract.
    #[no_mangle]
    pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
        // SAFETY: caller guarantees both ranges are valid and disjoint.
        unsafe {
            asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _, inout("rsi") src => _,
                options(nostack, preserves_flags));
        }
        dst
    }

    /// # Safety
    /// Standard memmove contract.
    #[no_mangle]
    pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
        if (dst as usize).wrapping_sub(src as usize) >= n {
            // SAFETY: forward copy is safe when dst is not inside (src, src+n).
            return unsafe { memcpy(dst, src, n) };
        }
        // SAFETY: copy backwards with the direction flag set, then clear it.
        unsafe {
            asm!("std", "rep movsb", "cld",
                inout("rcx") n => _, inout("rdi") dst.add(n).wrapping_sub(1) => _,
                inout("rsi") src.add(n).wrapping_sub(1) => _, options(nostack));
        }
        dst
    }

    /// # Safety
    /// Standard memset contract.
    #[no_mangle]
    pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
        // SAFETY: caller guarantees the range is valid.
        unsafe {
            asm!("rep stosb", inout("rcx") n => _, inout("rdi") dst => _, in("al") c as u8,
                options(nostack, preserves_flags));
        }
        dst
    }

    /// # Safety
    /// Standard memcmp contract.
    #[no_mangle]
    pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
        let mut i = 0;
        while i < n {
            // SAFETY: i < n, both ranges valid for n bytes.
            let (x, y) = unsafe { (core::ptr::read_volatile(a.add(i)), core::ptr::read_volatile(b.add(i))) };
            if x != y {
                return x as i32 - y as i32;
            }
            i += 1;
        }
        0
    }

    /// # Safety
    /// Standard bcmp contract.
    #[no_mangle]
    pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
        // SAFETY: the caller's bcmp contract is memcmp's.
        unsafe { memcmp(a, b, n) }
    }
}

/// Length of a NUL-terminated string.
///
/// # Safety
/// `p` points to a NUL-terminated string.
pub unsafe fn strlen(p: *const u8) -> usize {
    let mut n = 0;
    // SAFETY: the string is terminated.
    // Volatile so LLVM does not turn the loop into a call to strlen.
    while unsafe { core::ptr::read_volatile(p.add(n)) } != 0 {
        n += 1;
    }
    n
}
