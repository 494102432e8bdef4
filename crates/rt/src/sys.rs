//! Raw x86-64 system calls and the few wrappers the LWK and proxy share.
//! Every function returns the kernel's raw result: negative errno on error.

use core::arch::asm;

use crate::nr;

/// # Safety
/// The caller makes sure the arguments are what the kernel expects for `n`.
#[inline(always)]
pub unsafe fn syscall6(n: u64, a: u64, b: u64, c: u64, d: u64, e: u64, f: u64) -> i64 {
    let ret: i64;
    // SAFETY: a raw syscall; rcx and r11 are clobbered by the instruction.
    unsafe {
        asm!("syscall",
            inlateout("rax") n as i64 => ret,
            in("rdi") a, in("rsi") b, in("rdx") c, in("r10") d, in("r8") e, in("r9") f,
            lateout("rcx") _, lateout("r11") _,
            options(nostack));
    }
    ret
}

/// # Safety
/// See [`syscall6`].
#[inline(always)]
pub unsafe fn syscall3(n: u64, a: u64, b: u64, c: u64) -> i64 {
    // SAFETY: the caller keeps syscall6's contract.
    unsafe { syscall6(n, a, b, c, 0, 0, 0) }
}

pub fn write(fd: i32, buf: &[u8]) -> i64 {
    // SAFETY: buf is a valid slice.
    unsafe { syscall3(nr::WRITE, fd as u64, buf.as_ptr() as u64, buf.len() as u64) }
}

pub fn write_all(fd: i32, mut buf: &[u8]) {
    while !buf.is_empty() {
        let n = write(fd, buf);
        if n == -4 {
            continue; // EINTR
        }
        if n <= 0 {
            return;
        }
        buf = &buf[n as usize..];
    }
}

pub fn close(fd: i32) -> i64 {
    // SAFETY: closing a descriptor touches no memory.
    unsafe { syscall3(nr::CLOSE, fd as u64, 0, 0) }
}

pub fn getpid() -> i32 {
    // SAFETY: no arguments.
    unsafe { syscall3(nr::GETPID, 0, 0, 0) as i32 }
}

pub fn getuid() -> u32 {
    // SAFETY: no arguments.
    unsafe { syscall3(nr::GETUID, 0, 0, 0) as u32 }
}

pub fn gettid() -> i32 {
    // SAFETY: no arguments.
    unsafe { syscall3(nr::GETTID, 0, 0, 0) as i32 }
}

pub fn exit_group(code: i32) -> ! {
    loop {
        // SAFETY: terminates the process.
        unsafe { syscall3(nr::EXIT_GROUP, code as u64, 0, 0) };
    }
}

/// Open a NUL-terminated path.
pub fn open(path: &[u8], flags: u64, mode: u64) -> i64 {
    debug_assert!(path.last() == Some(&0));
    // SAFETY: path is NUL-terminated.
    unsafe { syscall6(nr::OPENAT, (-100i64) as u64, path.as_ptr() as u64, flags, mode, 0, 0) }
}

pub fn pread(fd: i32, buf: &mut [u8], off: u64) -> i64 {
    // SAFETY: buf is a valid writable slice.
    unsafe { syscall6(nr::PREAD64, fd as u64, buf.as_mut_ptr() as u64, buf.len() as u64, off, 0, 0) }
}

/// # Safety
/// Mapping at a fixed address replaces whatever was there.
pub unsafe fn mmap(addr: u64, len: u64, prot: u64, flags: u64, fd: i32, off: u64) -> i64 {
    // SAFETY: the caller vouches for the range (see above).
    unsafe { syscall6(nr::MMAP, addr, len, prot, flags, fd as i64 as u64, off) }
}

/// # Safety
/// The range must not hold memory anyone still uses.
pub unsafe fn munmap(addr: u64, len: u64) -> i64 {
    // SAFETY: the caller vouches for the range (see above).
    unsafe { syscall3(nr::MUNMAP, addr, len, 0) }
}

/// # Safety
/// Changing protection can make live memory inaccessible.
pub unsafe fn mprotect(addr: u64, len: u64, prot: u64) -> i64 {
    // SAFETY: the caller vouches for the range (see above).
    unsafe { syscall3(nr::MPROTECT, addr, len, prot) }
}

pub const FUTEX_WAIT: u64 = 0;
pub const FUTEX_WAKE: u64 = 1;

/// Sleep while `*word == val`. Not FUTEX_PRIVATE: the word is in memory
/// shared with another process.
pub fn futex_wait(word: &core::sync::atomic::AtomicU32, val: u32) -> i64 {
    // SAFETY: word is a valid u32 for the duration of the call.
    unsafe { syscall6(nr::FUTEX, word.as_ptr() as u64, FUTEX_WAIT, val as u64, 0, 0, 0) }
}

/// As futex_wait, giving up after `ns` nanoseconds.
pub fn futex_wait_timeout(word: &core::sync::atomic::AtomicU32, val: u32, ns: u64) -> i64 {
    let ts = [ns / 1_000_000_000, ns % 1_000_000_000];
    // SAFETY: word and ts are valid for the duration of the call.
    unsafe { syscall6(nr::FUTEX, word.as_ptr() as u64, FUTEX_WAIT, val as u64, ts.as_ptr() as u64, 0, 0) }
}

pub fn futex_wake(word: &core::sync::atomic::AtomicU32, n: u32) -> i64 {
    // SAFETY: as above.
    unsafe { syscall6(nr::FUTEX, word.as_ptr() as u64, FUTEX_WAKE, n as u64, 0, 0, 0) }
}

#[inline(always)]
pub fn rdtsc() -> u64 {
    // SAFETY: rdtsc has no memory effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

#[inline(always)]
pub fn cpu_relax() {
    core::hint::spin_loop();
}

// Constants the LWK and the proxy use, written out because Debian's headers
// are older than the kernel and there is no libc here.
pub const PROT_NONE: u64 = 0;
pub const PROT_READ: u64 = 1;
pub const PROT_WRITE: u64 = 2;
pub const PROT_EXEC: u64 = 4;
pub const MAP_SHARED: u64 = 0x01;
pub const MAP_PRIVATE: u64 = 0x02;
pub const MAP_SHARED_VALIDATE: u64 = 0x03;
pub const MAP_TYPE: u64 = 0x0f;
pub const MAP_FIXED: u64 = 0x10;
pub const MAP_ANONYMOUS: u64 = 0x20;
pub const MAP_GROWSDOWN: u64 = 0x100;
pub const MAP_DENYWRITE: u64 = 0x800;
pub const MAP_EXECUTABLE: u64 = 0x1000;
pub const MAP_LOCKED: u64 = 0x2000;
pub const MAP_NORESERVE: u64 = 0x4000;
pub const MAP_POPULATE: u64 = 0x8000;
pub const MAP_NONBLOCK: u64 = 0x10000;
pub const MAP_STACK: u64 = 0x20000;
pub const MAP_HUGETLB: u64 = 0x40000;
pub const MAP_SYNC: u64 = 0x80000;
pub const MAP_FIXED_NOREPLACE: u64 = 0x100000;
pub const MAP_UNINITIALIZED: u64 = 0x4000000;
pub const MREMAP_MAYMOVE: u64 = 1;
pub const MREMAP_FIXED: u64 = 2;
pub const MREMAP_DONTUNMAP: u64 = 4;
pub const O_RDONLY: u64 = 0;
pub const O_WRONLY: u64 = 1;
pub const O_RDWR: u64 = 2;
pub const O_ACCMODE: u64 = 3;
pub const O_CLOEXEC: u64 = 0o2000000;
/// An unnamed file in a directory (includes O_DIRECTORY, as Linux defines it).
pub const O_TMPFILE: u64 = 0o20200000;
pub const O_DIRECTORY: u64 = 0o200000;
pub const O_PATH: u64 = 0o10000000;
pub const MFD_CLOEXEC: u64 = 1;
pub const MFD_HUGETLB: u64 = 4;
pub const MFD_HUGE_2MB: u64 = 21 << 26;
pub const FALLOC_FL_KEEP_SIZE: u64 = 1;
pub const FALLOC_FL_PUNCH_HOLE: u64 = 2;
pub const MADV_DONTNEED: u64 = 4;
pub const MADV_REMOVE: u64 = 9;
pub const MADV_POPULATE_READ: u64 = 22;
pub const MADV_POPULATE_WRITE: u64 = 23;
pub const F_GETFL: u64 = 3;

pub const EPERM: i64 = 1;
pub const ENOENT: i64 = 2;
pub const ESRCH: i64 = 3;
pub const EINTR: i64 = 4;
pub const EIO: i64 = 5;
pub const E2BIG: i64 = 7;
pub const ENXIO: i64 = 6;
pub const ENOEXEC: i64 = 8;
pub const ECHILD: i64 = 10;
pub const EBADF: i64 = 9;
pub const EAGAIN: i64 = 11;
pub const EBUSY: i64 = 16;
pub const ENOTSUP: i64 = 95;
pub const ENOMEM: i64 = 12;
pub const EACCES: i64 = 13;
pub const EFAULT: i64 = 14;
pub const EEXIST: i64 = 17;
pub const ENODEV: i64 = 19;
pub const EISDIR: i64 = 21;
pub const EINVAL: i64 = 22;
pub const ENFILE: i64 = 23;
pub const ENOTTY: i64 = 25;
pub const ESPIPE: i64 = 29;
pub const EPIPE: i64 = 32;
pub const ETIMEDOUT: i64 = 110;
pub const ENOSYS: i64 = 38;
pub const ENAMETOOLONG: i64 = 36;
pub const ELOOP: i64 = 40;
pub const EOVERFLOW: i64 = 75;
pub const ELIBBAD: i64 = 80;
pub const F_DUPFD_CLOEXEC: u64 = 1030;
pub const F_SETFD: u64 = 2;
pub const F_GETFD: u64 = 1;

pub fn sched_yield() {
    // SAFETY: no arguments.
    unsafe { syscall3(crate::nr::SCHED_YIELD, 0, 0, 0) };
}

/// How a channel side waits: a short pure spin (the other side is on
/// another CPU and answers within microseconds), then spinning with
/// sched_yield (if both sides share a CPU, the other one gets to run), then
/// sleeping on the futex once `budget` TSC cycles have passed.
pub struct SpinWait {
    start: u64,
    budget: u64,
}

/// Cycles of pure spinning before yielding (about 2 µs at 2-3 GHz).
const PURE_SPIN: u64 = 5_000;

impl SpinWait {
    pub fn new(budget: u64) -> Self {
        SpinWait { start: rdtsc(), budget }
    }

    /// One step of waiting; false once it is time to sleep.
    #[inline(always)]
    pub fn spin(&mut self) -> bool {
        let t = rdtsc().wrapping_sub(self.start);
        if t > self.budget {
            return false;
        }
        if t > PURE_SPIN {
            sched_yield();
        } else {
            cpu_relax();
        }
        true
    }

    pub fn restart(&mut self) {
        self.start = rdtsc();
    }
}

/// Map the control region from `fd` at its fixed address, over an
/// inherited one (`replace`, after a fork) or where nothing is yet.
pub fn map_control(fd: i32, replace: bool) -> i64 {
    use lwk_abi::control::CONTROL_SIZE;
    use lwk_abi::layout::CONTROL_ADDR;
    let place = if replace { MAP_FIXED } else { MAP_FIXED_NOREPLACE };
    // SAFETY: CONTROL_ADDR is reserved for the control region in every
    // lwk process; `replace` is only asked for when the old one is done with.
    unsafe { mmap(CONTROL_ADDR, CONTROL_SIZE as u64, PROT_READ | PROT_WRITE, MAP_SHARED | place, fd, 0) }
}

/// Has process `pid` ended (and been reaped)?
pub fn process_gone(pid: i32) -> bool {
    // SAFETY: a signal-0 probe.
    pid > 0 && unsafe { syscall3(nr::KILL, pid as u64, 0, 0) } == -ESRCH
}

/// A userfaultfd of the calling process (close-on-exec, non-blocking), for
/// an outside tracker of written pages (`lwk_migrate::dirty`), which does
/// the API handshake itself. Its descriptor + 1, or 0 when the kernel
/// refuses (no CAP_SYS_PTRACE and unprivileged userfaultfd off).
pub fn tracking_userfaultfd() -> i32 {
    const O_CLOEXEC: u64 = 0o2000000;
    const O_NONBLOCK: u64 = 0o4000;
    // SAFETY: plain userfaultfd.
    let fd = unsafe { syscall3(nr::USERFAULTFD, O_CLOEXEC | O_NONBLOCK, 0, 0) };
    if fd < 0 {
        0
    } else {
        fd as i32 + 1
    }
}

/// Give the calling thread (a kernel task's credentials are its own) these
/// user ids (real, effective, saved), group ids and supplementary groups,
/// and keep the process reachable through /proc by its own user, as a
/// process that never changed ids is (the proxy and the LWK reach into
/// each other there).
pub fn take_credentials(uid: [u32; 3], gid: [u32; 3], groups: &[u32]) -> Result<(), i64> {
    const PR_SET_DUMPABLE: u64 = 4;
    // SAFETY: the calls read only `groups`, which outlives them.
    unsafe {
        let calls = [
            (nr::SETGROUPS, groups.len() as u64, groups.as_ptr() as u64, 0),
            (nr::SETRESGID, gid[0] as u64, gid[1] as u64, gid[2] as u64),
            (nr::SETRESUID, uid[0] as u64, uid[1] as u64, uid[2] as u64),
            (nr::PRCTL, PR_SET_DUMPABLE, 1, 0),
        ];
        for (what, a, b, c) in calls {
            let r = syscall3(what, a, b, c);
            if r < 0 {
                return Err(r);
            }
        }
    }
    Ok(())
}

/// Take the credentials handed in `h` if their generation is not `seen`
/// (which then becomes it). A thread that cannot must not go on serving.
pub fn take_handed_credentials(h: &lwk_abi::control::HandedCredentials, seen: &mut u32) {
    use core::sync::atomic::Ordering::Acquire;
    let generation = h.generation.load(Acquire);
    if generation == *seen {
        return;
    }
    let mut groups = [0u32; lwk_abi::control::MAX_GROUPS];
    let (uid, gid, n) = h.read(&mut groups);
    if let Err(e) = take_credentials(uid, gid, &groups[..n]) {
        crate::diag!("cannot take the application's credentials (error {})", -e);
        exit_group(125);
    }
    *seen = generation;
}
