//! Everything the memory manager does outside its own bookkeeping: system
//! calls on memory files and on the address space, the map log and the
//! proxy, statistics and notes. They are the methods of one trait, [`Host`],
//! so that the memory manager's decisions (which pieces, which offsets,
//! which map-log ops) are made by the same code whether it runs in the LWK,
//! on [`Linux`], or in a unit test, on a fake that records what was asked.
//! [`Linux`] is the only place in the memory manager with system calls.

use core::ffi::CStr;
use core::sync::atomic::{AtomicBool, Ordering};

use lwk_abi::control::MapOp;
use lwk_abi::layout::SCRATCH_ADDR;
use lwk_rt::nr;
use lwk_rt::*;

use super::huge_up;
use crate::{control, delegate};

/// What the memory manager asks of the world. Errors are -errno.
pub trait Host {
    // Memory files.

    /// A new memfd named `name`.
    fn memfd_create(name: &CStr, flags: u64) -> i64;
    /// A new unnamed file in the directory `dir` (a partition's memory).
    fn tmpfile(dir: i32) -> i64;
    fn truncate(fd: i32, len: u64) -> i64;
    fn close(fd: i32);
    /// Allocate the pages of [off, off+len) of `fd` now.
    fn allocate(fd: i32, off: u64, len: u64) -> i64;
    /// Give back the pages of [off, off+len) of `fd`: they read as zero.
    fn punch(fd: i32, off: u64, len: u64);
    /// Copy `len` bytes of file `from_fd` at `from_off` to `to_fd` at
    /// `to_off`, where the source has data.
    fn copy_extent(from_fd: i32, from_off: u64, to_fd: i32, to_off: u64, len: u64) -> Result<(), i64>;

    // The application's address space. The callers own its layout: these
    // are unsafe because they change or touch application memory, which
    // the LWK itself may be using (its frames lie on the application's
    // stack).

    /// Copy the application's [addr, addr+len), mapped with `prot`, into
    /// file `fd` at `off` (making it readable first if it is not).
    ///
    /// # Safety
    /// [addr, addr+len) is mapped application memory.
    unsafe fn copy_to_file(addr: u64, len: u64, prot: u32, fd: i32, off: u64) -> Result<(), i64>;
    /// # Safety
    /// [addr, addr+len) is application memory the caller may remap.
    unsafe fn mmap(addr: u64, len: u64, prot: u64, flags: u64, fd: i32, off: u64) -> i64;
    /// # Safety
    /// As for `mmap`.
    unsafe fn munmap(addr: u64, len: u64);
    /// # Safety
    /// As for `mmap`.
    unsafe fn mprotect(addr: u64, len: u64, prot: u64) -> i64;
    /// Move [from, from+len) to `to`, keeping the pages.
    ///
    /// # Safety
    /// Both ranges are application memory the caller may remap.
    unsafe fn mremap(from: u64, len: u64, to: u64) -> i64;
    /// # Safety
    /// As for `mmap`.
    unsafe fn madvise(addr: u64, len: u64, advice: u64) -> i64;
    /// Zero [addr, addr+len), mapped with `prot` (kept).
    ///
    /// # Safety
    /// [addr, addr+len) is mapped application memory.
    unsafe fn zero(addr: u64, len: u64, prot: u32);

    // The proxy.

    /// Append one op to the map log, which the proxy applies to its
    /// mirror of the application's memory.
    fn push(op: MapOp);
    /// Tell the proxy which descriptors hold application memory.
    fn publish_memfds(memfd: [i32; 3]);
    /// The flags of the application's descriptor `fd` (which lives in the
    /// proxy).
    fn fd_flags(fd: i32) -> Result<u64, i64>;
    /// Open here the file behind the application's `fd`.
    fn reopen(fd: i32, flags: u64) -> Result<i32, i64>;
    /// pread(2) of the application's `fd` into application memory.
    fn pread(fd: i32, addr: u64, len: u64, off: u64) -> i64;

    // Accounting and notes.

    fn add_memory(len: u64, huge: bool);
    fn sub_memory(len: u64, huge: bool);
    /// 2 MiB pages could not be had: application memory falls back to
    /// 4 KiB pages (said once, with `verbose`).
    fn note_huge_fallback(verbose: bool);
    /// The partition's memory is used up (said once).
    fn note_partition_full();
}

/// The memory manager's effects in the LWK.
pub struct Linux;

impl Host for Linux {
    fn memfd_create(name: &CStr, flags: u64) -> i64 {
        // SAFETY: the name is NUL-terminated.
        unsafe { syscall3(nr::MEMFD_CREATE, name.as_ptr() as u64, flags, 0) }
    }

    fn tmpfile(dir: i32) -> i64 {
        // SAFETY: openat of a NUL-terminated name relative to our directory.
        unsafe { syscall6(nr::OPENAT, dir as u64, c".".as_ptr() as u64, O_TMPFILE | O_RDWR | O_CLOEXEC, 0o600, 0, 0) }
    }

    fn truncate(fd: i32, len: u64) -> i64 {
        // SAFETY: ftruncate of our own file.
        unsafe { syscall3(nr::FTRUNCATE, fd as u64, len, 0) }
    }

    fn close(fd: i32) {
        close(fd);
    }

    fn allocate(fd: i32, off: u64, len: u64) -> i64 {
        // SAFETY: fallocate on our own memory file.
        unsafe { syscall6(nr::FALLOCATE, fd as u64, 0, off, len, 0, 0) }
    }

    fn punch(fd: i32, off: u64, len: u64) {
        // SAFETY: fallocate on our own memfd.
        unsafe { syscall6(nr::FALLOCATE, fd as u64, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, len, 0, 0) };
    }

    fn copy_extent(from_fd: i32, from_off: u64, to_fd: i32, to_off: u64, len: u64) -> Result<(), i64> {
        copy_extent(from_fd, from_off, to_fd, to_off, len)
    }

    unsafe fn copy_to_file(addr: u64, len: u64, prot: u32, fd: i32, off: u64) -> Result<(), i64> {
        // SAFETY: the scratch window is the LWK's own; [addr, addr+len) is
        // mapped application memory (the caller's promise), made readable
        // for the copy if it was not.
        unsafe {
            let a = mmap(SCRATCH_ADDR, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, off);
            if a < 0 {
                return Err(a);
            }
            if prot as u64 & PROT_READ == 0 {
                mprotect(addr, len, PROT_READ);
            }
            core::ptr::copy_nonoverlapping(addr as *const u8, SCRATCH_ADDR as *mut u8, len as usize);
            munmap(SCRATCH_ADDR, len);
        }
        Ok(())
    }

    unsafe fn mmap(addr: u64, len: u64, prot: u64, flags: u64, fd: i32, off: u64) -> i64 {
        // SAFETY: the caller's promise.
        unsafe { mmap(addr, len, prot, flags, fd, off) }
    }

    unsafe fn munmap(addr: u64, len: u64) {
        // SAFETY: the caller's promise.
        unsafe { munmap(addr, len) };
    }

    unsafe fn mprotect(addr: u64, len: u64, prot: u64) -> i64 {
        // SAFETY: the caller's promise.
        unsafe { mprotect(addr, len, prot) }
    }

    unsafe fn mremap(from: u64, len: u64, to: u64) -> i64 {
        // SAFETY: the caller's promise.
        unsafe { syscall6(nr::MREMAP, from, len, len, MREMAP_MAYMOVE | MREMAP_FIXED, to, 0) }
    }

    unsafe fn madvise(addr: u64, len: u64, advice: u64) -> i64 {
        // SAFETY: the caller's promise.
        unsafe { syscall3(nr::MADVISE, addr, len, advice) }
    }

    unsafe fn zero(addr: u64, len: u64, prot: u32) {
        let writable = prot as u64 & PROT_WRITE != 0;
        if !writable {
            // SAFETY: briefly writable to clear, then restored.
            unsafe { mprotect(addr, len, PROT_READ | PROT_WRITE) };
        }
        // SAFETY: [addr, addr+len) is mapped application memory (the
        // caller's promise), writable now.
        unsafe { core::ptr::write_bytes(addr as *mut u8, 0, len as usize) };
        if !writable {
            // SAFETY: restore the application's protection.
            unsafe { mprotect(addr, len, prot as u64) };
        }
    }

    fn push(op: MapOp) {
        // SAFETY: the LWK is the only writer: the only Mm<Linux> is MM,
        // and its callers hold its lock.
        if !unsafe { control().maplog.push(op) } {
            delegate::sync();
            // SAFETY: as above; the proxy just drained the ring.
            unsafe { control().maplog.push(op) };
        }
    }

    fn publish_memfds(memfd: [i32; 3]) {
        let h = &control().header;
        for (k, fd) in memfd.iter().enumerate() {
            h.memfd[k].store(*fd, Ordering::Release);
        }
    }

    fn fd_flags(fd: i32) -> Result<u64, i64> {
        let fl = delegate::call(nr::FCNTL, [fd as u64, F_GETFL, 0, 0, 0, 0]);
        if fl < 0 {
            Err(-EBADF)
        } else {
            Ok(fl as u64)
        }
    }

    fn reopen(fd: i32, flags: u64) -> Result<i32, i64> {
        let mut path = [0u8; 64];
        let proxy = control().header.proxy_pid.load(Ordering::Acquire);
        let n = lwk_rt::out::proc_fd_path(&mut path, proxy, fd);
        let lfd = open(&path[..n], flags | O_CLOEXEC, 0);
        if lfd < 0 {
            return Err(if lfd == -ENXIO { -ENODEV } else { lfd });
        }
        Ok(lfd as i32)
    }

    fn pread(fd: i32, addr: u64, len: u64, off: u64) -> i64 {
        delegate::call(nr::PREAD64, [fd as u64, addr, len, off, 0, 0])
    }

    fn add_memory(len: u64, huge: bool) {
        control().stats.add_memory(len, huge);
    }

    fn sub_memory(len: u64, huge: bool) {
        control().stats.sub_memory(len, huge);
    }

    fn note_huge_fallback(verbose: bool) {
        let h = &control().header;
        if h.huge_fallback.swap(1, Ordering::Relaxed) == 0 && verbose {
            lwk_rt::diag!("no free 2 MiB huge pages: application memory falls back to 4 KiB pages");
        }
    }

    fn note_partition_full() {
        static SAID: AtomicBool = AtomicBool::new(false);
        if !SAID.swap(true, Ordering::Relaxed) {
            lwk_rt::diag!("the partition's memory is used up: the application gets ENOMEM");
        }
    }
}

/// Copy `len` bytes at `from_off` of memfd `from_fd` to `to_off` of memfd
/// `to_fd`, through the LWK's scratch window (only where the source has
/// data, see `copy_data`). Both scratch mappings are gone on return.
fn copy_extent(from_fd: i32, from_off: u64, to_fd: i32, to_off: u64, len: u64) -> Result<(), i64> {
    let to_at = SCRATCH_ADDR + huge_up(len);
    // SAFETY: the scratch window is the LWK's own, outside the
    // application's range, and large enough for both mappings.
    unsafe {
        let from = mmap(SCRATCH_ADDR, len, PROT_READ, MAP_SHARED | MAP_FIXED, from_fd, from_off);
        let to = mmap(to_at, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, to_fd, to_off);
        let r = if from < 0 {
            Err(from)
        } else if to < 0 {
            Err(to)
        } else {
            copy_data(from_fd, from_off, len, SCRATCH_ADDR, to_at);
            Ok(())
        };
        munmap(SCRATCH_ADDR, huge_up(len) + len);
        r
    }
}

/// Copy the bytes of memfd range [off, off+len) from `from` to `to` (both
/// mappings of `len` bytes), only where the file has data: holes are
/// zero in the fresh destination already, and copying them would give the
/// copy pages the original never had (arena reservations, stack tails).
///
/// # Safety
/// `from` and `to` map `len` bytes, readable and writable respectively.
unsafe fn copy_data(fd: i32, off: u64, len: u64, from: u64, to: u64) {
    const SEEK_DATA: u64 = 3;
    const SEEK_HOLE: u64 = 4;
    let end = off + len;
    let mut at = off;
    while at < end {
        // SAFETY: lseek on our own memfd.
        let d = unsafe { syscall3(nr::LSEEK, fd as u64, at, SEEK_DATA) };
        if d < 0 {
            if d == -ENXIO {
                return; // no data after `at`
            }
            // SEEK_DATA unsupported (hugetlbfs): copy everything.
            // SAFETY: as documented.
            unsafe {
                core::ptr::copy_nonoverlapping(
                    (from + (at - off)) as *const u8,
                    (to + (at - off)) as *mut u8,
                    (end - at) as usize,
                )
            };
            return;
        }
        let d = (d as u64).min(end);
        // SAFETY: as above.
        let h = unsafe { syscall3(nr::LSEEK, fd as u64, d, SEEK_HOLE) };
        let h = if h < 0 { end } else { (h as u64).min(end) };
        if d < h {
            // SAFETY: [d, h) is inside both mappings.
            unsafe {
                core::ptr::copy_nonoverlapping(
                    (from + (d - off)) as *const u8,
                    (to + (d - off)) as *mut u8,
                    (h - d) as usize,
                )
            };
        }
        at = h.max(d + 1);
    }
}
