//! Copies between the LWK and the application's memory: the structures of
//! the calls the LWK handles itself (sigaction's, signal masks, clone3's
//! arguments), paths, and answers such as readlink's.
//!
//! On Linux a bad pointer makes copy_from_user return EFAULT; it never
//! crashes the kernel. The same holds here, for three reasons:
//!
//! * **Only application memory is touched.** The copy runs in LWK code,
//!   where PKRU allows the LWK's own memory (see `guard`): a pointer into
//!   the LWK's image or control region would be read or written, not
//!   refused. So every range is checked against the memory manager's table
//!   first: below APP_END, entirely mapped, every piece readable (or
//!   writable). A range that is not is EFAULT.
//! * **The check and the copy are one step.** They happen under one hold
//!   of the MM lock. Every change of the address space (mmap, munmap,
//!   mprotect, mremap, madvise, brk, and the fork copy) takes that lock, so
//!   the table describes the kernel's mappings exactly while it is held:
//!   another thread that unmaps the range waits until the copy is done, and
//!   the answer is the one Linux gives when the copy comes first. (The lock
//!   used to be dropped between the check and the copy; an unmap in between
//!   made the LWK fault where Linux returns EFAULT.) Holding a spin lock
//!   for a copy of a few words, or of a path, is cheap; a fault-safe copy
//!   of every range (the other way to be safe) would cost a system call
//!   each time.
//! * **Pages that can vanish are copied fault-safe.** A mapped page of the
//!   LWK's memory files is present or can always be made present. A file's
//!   page cannot, if the file was truncated under its mapping (SIGBUS), nor
//!   one of memory a partition did not reserve (MAP_NORESERVE): those ranges
//!   ([`Access::FaultSafe`]) are copied by the kernel, with
//!   process_vm_readv/writev on this process, which answers EFAULT where a
//!   plain copy would fault.
//!
//! Every function here takes the MM lock. The lock is not reentrant: code
//! that holds it (the memory manager itself, the loader) must not call
//! them. None does; the callers (signal, thread, signalfd, exec, procfs)
//! hold at most their own locks, which the memory manager never takes.

use lwk_abi::layout::PAGE_SIZE;
use lwk_rt::nr;
use lwk_rt::*;

use crate::mm::{Access, Mm, MM};

/// Read N words of the application's memory, EFAULT unless readable.
pub fn read_app<const N: usize>(addr: u64) -> Result<[u64; N], i64> {
    let mut v = [0u64; N];
    // SAFETY: v is N words, writable.
    unsafe { copy(&MM.lock(), addr, v.as_mut_ptr() as *mut u8, 8 * N, false) }?;
    Ok(v)
}

/// Write N words into the application's memory, EFAULT unless writable.
pub fn write_app<const N: usize>(addr: u64, v: [u64; N]) -> Result<(), i64> {
    // SAFETY: v is N words, readable (and only read: `write`).
    unsafe { copy(&MM.lock(), addr, v.as_ptr() as *mut u8, 8 * N, true) }
}

/// Write `data` into the application's memory at `addr`, EFAULT unless
/// writable.
pub fn copy_to_app(addr: u64, data: &[u8]) -> Result<(), i64> {
    // SAFETY: data is readable for its length (and only read: `write`).
    unsafe { copy(&MM.lock(), addr, data.as_ptr() as *mut u8, data.len(), true) }
}

/// Copy a NUL-terminated string of the application into `buf` (with its
/// NUL; what follows the NUL in `buf` is unspecified). Returns its length:
/// EFAULT if it runs into memory that is not readable, ENAMETOOLONG if
/// `buf` holds no NUL.
pub fn read_cstr(addr: u64, buf: &mut [u8]) -> Result<usize, i64> {
    let mm = MM.lock();
    let mut i = 0;
    while i < buf.len() {
        let a = addr.checked_add(i as u64).ok_or(-EFAULT)?;
        // A page at a time: the string may end before a page that is not
        // readable.
        let chunk = ((PAGE_SIZE - (a & (PAGE_SIZE - 1))) as usize).min(buf.len() - i);
        let dst = &mut buf[i..i + chunk];
        // SAFETY: dst is writable for chunk bytes.
        unsafe { copy(&mm, a, dst.as_mut_ptr(), chunk, false) }?;
        if let Some(z) = dst.iter().position(|&c| c == 0) {
            return Ok(i + z);
        }
        i += chunk;
    }
    Err(-ENAMETOOLONG)
}

/// Copy `len` bytes between the application's `app` and the LWK's `lwk`:
/// into the application when `write`, else out of it. `mm` is the memory
/// manager, locked by the caller for the whole copy.
///
/// # Safety
/// `lwk` is valid for `len` bytes: readable when `write`, else writable.
unsafe fn copy(mm: &Mm, app: u64, lwk: *mut u8, len: usize, write: bool) -> Result<(), i64> {
    match mm.access(app, len as u64, write) {
        Access::Denied => Err(-EFAULT),
        Access::Direct => {
            // SAFETY: [app, app+len) is mapped application memory with the
            // protection needed, whose pages cannot fail to appear, and
            // stays so while `mm` is locked; `lwk` as the caller promised.
            // `copy`, not `copy_nonoverlapping`: the LWK's buffers may lie on
            // the application's stack (the handler runs there), where a
            // pointer of the application may reach them.
            unsafe {
                if write {
                    core::ptr::copy(lwk as *const u8, app as *mut u8, len);
                } else {
                    core::ptr::copy(app as *const u8, lwk, len);
                }
            }
            Ok(())
        }
        // SAFETY: as the caller promised.
        Access::FaultSafe => unsafe { copy_fault_safe(app, lwk, len, write) },
    }
}

/// As `copy`, by the kernel (process_vm_readv/writev on this process):
/// a page that cannot be had gives EFAULT instead of a fault. The caller
/// has checked that [app, app+len) is application memory: these calls
/// ignore protection keys, so they would reach the LWK's memory too.
///
/// # Safety
/// As for `copy`.
unsafe fn copy_fault_safe(app: u64, lwk: *mut u8, len: usize, write: bool) -> Result<(), i64> {
    let local = [lwk as u64, len as u64];
    let remote = [app, len as u64];
    let n = if write { nr::PROCESS_VM_WRITEV } else { nr::PROCESS_VM_READV };
    // SAFETY: one iovec each side; the kernel checks `remote` and copies
    // to or from `lwk`, valid as the caller promised.
    let r = unsafe { syscall6(n, getpid() as u64, local.as_ptr() as u64, 1, remote.as_ptr() as u64, 1, 0) };
    if r == len as i64 {
        Ok(())
    } else {
        Err(-EFAULT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_outside_the_application_table_is_copied() {
        // MM's table is empty here: this test's own memory, readable and
        // writable as it is, is not application memory.
        let mut mine = [7u64; 2];
        let at = mine.as_mut_ptr() as u64;
        assert_eq!(read_app::<2>(at), Err(-EFAULT));
        assert_eq!(write_app(at, [1, 2]), Err(-EFAULT));
        assert_eq!(copy_to_app(at, b"x"), Err(-EFAULT));
        let text = b"/proc/self\0";
        let mut buf = [0u8; 16];
        assert_eq!(read_cstr(text.as_ptr() as u64, &mut buf), Err(-EFAULT));
        assert_eq!(read_cstr(u64::MAX - 2, &mut buf), Err(-EFAULT));
        assert_eq!(mine, [7, 7], "untouched");
        assert_eq!(buf, [0; 16]);
    }

    #[test]
    fn the_fault_safe_copy_copies_and_answers_efault_where_nothing_is_mapped() {
        let from = *b"fault-safe copy!";
        let mut to = [0u8; 16];
        // SAFETY: `to` is writable, 16 bytes.
        assert_eq!(unsafe { copy_fault_safe(from.as_ptr() as u64, to.as_mut_ptr(), 16, false) }, Ok(()));
        assert_eq!(&to, b"fault-safe copy!");
        let mut back = *b"................";
        // SAFETY: `from` is readable, 16 bytes.
        assert_eq!(unsafe { copy_fault_safe(back.as_mut_ptr() as u64, from.as_ptr() as *mut u8, 16, true) }, Ok(()));
        assert_eq!(&back, b"fault-safe copy!");
        // The first page is never mapped (mmap_min_addr).
        // SAFETY: as above.
        assert_eq!(unsafe { copy_fault_safe(16, to.as_mut_ptr(), 16, false) }, Err(-EFAULT));
        // SAFETY: as above.
        assert_eq!(unsafe { copy_fault_safe(16, from.as_ptr() as *mut u8, 16, true) }, Err(-EFAULT));
        // Past the end of the address space.
        // SAFETY: as above.
        assert_eq!(unsafe { copy_fault_safe(u64::MAX - 7, to.as_mut_ptr(), 16, false) }, Err(-EFAULT));
    }
}
