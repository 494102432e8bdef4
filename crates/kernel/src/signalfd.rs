//! signalfd(2). The application's signals are this process's, but its file
//! descriptors live in the proxy, where poll, select and epoll run. So a
//! signalfd is two things:
//!
//! * a real signalfd here, owned by the LWK, which `read` of the
//!   application's descriptor reads (the kernel fills in the
//!   signalfd_siginfo records and dequeues the signals, as natively);
//! * in the proxy, at the number the application gets, the read end of a
//!   pipe, which is readable while a signal of the mask is pending, so that
//!   poll/select/epoll in the proxy see what they would see natively.
//!
//! A watcher thread of the LWK (it runs no application code and blocks
//! every signal) polls the real signalfds and writes a byte into the pipe
//! of each that became readable; a read by the application drains the
//! pipe and re-arms the watcher. The watcher sees signals pending for the
//! process and for itself, not those sent to one other thread with tgkill:
//! those are read by `read` as natively but do not wake a poll.

use core::sync::atomic::{AtomicBool, AtomicU32, Ordering::*};

use lwk_rt::nr;
use lwk_rt::thread::*;
use lwk_rt::*;

use crate::arch::UContext;
use crate::persist::Persist;
use crate::sync::SpinLock;
use crate::{control, delegate, signal};

pub const MAX: usize = 32;
const SFD_NONBLOCK: u64 = 0o4000;
const SFD_CLOEXEC: u64 = 0o2000000;
const SIGINFO_SIZE: u64 = 128;
const POLLIN: i16 = 1;
const EFD_CLOEXEC: u64 = 0o2000000;
const EFD_NONBLOCK: u64 = 0o4000;
const O_NONBLOCK: u64 = 0o4000;
const EMFILE: i64 = 24;

#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// The application's descriptor (in the proxy); -1: free entry.
    pub app_fd: i32,
    /// The real signalfd, here.
    pub sfd: i32,
    /// The pipe behind app_fd, opened here read-write.
    pub pipe: i32,
    /// The watcher reported this one and waits for a read to re-arm it.
    pub reported: bool,
    /// The signals it takes (bit `n - 1` for signal `n`): what a restore
    /// into a new process makes the real signalfd again with.
    pub mask: u64,
}

const FREE: Entry = Entry { app_fd: -1, sfd: -1, pipe: -1, reported: false, mask: 0 };

static TABLE: SpinLock<[Entry; MAX]> = SpinLock::new([FREE; MAX]);
/// Entries in use: the fast check on every read and close.
static USED: AtomicU32 = AtomicU32::new(0);
static WATCHER: AtomicBool = AtomicBool::new(false);
/// The watcher's wake-up eventfd.
static WAKE: core::sync::atomic::AtomicI32 = core::sync::atomic::AtomicI32::new(-1);

const WATCH_STACK: usize = 32 << 10;
#[repr(align(16))]
struct Stack(core::cell::UnsafeCell<[u8; WATCH_STACK]>);
// SAFETY: only the watcher thread uses it.
unsafe impl Sync for Stack {}
static STACK: Stack = Stack(core::cell::UnsafeCell::new([0; WATCH_STACK]));

/// Is `fd` one of the application's signalfds?
#[inline]
pub fn is_signalfd(fd: u64) -> bool {
    USED.load(Relaxed) != 0 && TABLE.lock().iter().any(|e| e.app_fd >= 0 && e.app_fd as u64 == fd)
}

/// signalfd(2) and signalfd4(2).
pub fn signalfd4(fd: u64, mask: u64, size: u64, flags: u64) -> i64 {
    if size != 8 || flags & !(SFD_NONBLOCK | SFD_CLOEXEC) != 0 {
        return -EINVAL;
    }
    let set = match crate::uaccess::read_app::<1>(mask) {
        Ok(v) => v[0],
        Err(e) => return e,
    };
    if fd as i32 != -1 {
        return change_mask(fd as i32, set);
    }
    create(set, flags)
}

fn change_mask(fd: i32, set: u64) -> i64 {
    let mut t = TABLE.lock();
    let Some(e) = t.iter_mut().find(|e| e.app_fd == fd && fd >= 0) else {
        // Natively: EBADF for no descriptor, EINVAL for one that is not a signalfd.
        return if delegate::call(nr::FCNTL, [fd as u64, F_GETFL, 0, 0, 0, 0]) < 0 { -EBADF } else { -EINVAL };
    };
    // SAFETY: set is the LWK's own word.
    let r = unsafe { syscall6(nr::SIGNALFD4, e.sfd as u64, &set as *const u64 as u64, 8, SFD_NONBLOCK, 0, 0) };
    if r >= 0 {
        e.mask = set;
    }
    drop(t);
    wake_watcher();
    if r < 0 {
        r
    } else {
        fd as i64
    }
}

fn create(set: u64, flags: u64) -> i64 {
    let Some(slot) = TABLE.lock().iter().position(|e| e.app_fd < 0) else { return -EMFILE };
    // SAFETY: set is the LWK's own word.
    let sfd = unsafe { syscall6(nr::SIGNALFD4, !0u64, &set as *const u64 as u64, 8, SFD_NONBLOCK | SFD_CLOEXEC, 0, 0) };
    if sfd < 0 {
        return sfd;
    }
    // The pipe is made by the proxy (its ends are the application's
    // descriptors); the array is on this, the application's, stack.
    let mut ends = [0i32; 2];
    let r = delegate::call(nr::PIPE2, [ends.as_mut_ptr() as u64, flags & (SFD_NONBLOCK | SFD_CLOEXEC), 0, 0, 0, 0]);
    if r < 0 {
        close(sfd as i32);
        return r;
    }
    let pipe = open_proxy_fd(ends[1]);
    delegate::call(nr::CLOSE, [ends[1] as u64, 0, 0, 0, 0, 0]);
    if pipe < 0 {
        delegate::call(nr::CLOSE, [ends[0] as u64, 0, 0, 0, 0, 0]);
        close(sfd as i32);
        return pipe;
    }
    let e = Entry { app_fd: ends[0], sfd: sfd as i32, pipe: pipe as i32, reported: false, mask: set };
    TABLE.lock()[slot] = e;
    USED.fetch_add(1, Relaxed);
    start_watcher();
    wake_watcher();
    ends[0] as i64
}

/// Open the proxy's descriptor `fd` (a pipe end) here, read-write.
fn open_proxy_fd(fd: i32) -> i64 {
    let mut path = [0u8; 64];
    let n = lwk_rt::out::proc_fd_path(&mut path, control().header.proxy_pid.load(Relaxed), fd);
    open(&path[..n], O_RDWR | O_CLOEXEC | O_NONBLOCK, 0)
}

/// read(2) of a signalfd: the real one's records, blocking as the
/// application's descriptor says, interrupted by signals as natively.
pub fn read(fd: u64, buf: u64, count: u64, uc: &UContext) -> i64 {
    let Some(e) = TABLE.lock().iter().copied().find(|e| e.app_fd as u64 == fd) else { return -EBADF };
    if count < SIGINFO_SIZE {
        return -EINVAL;
    }
    let blocking = delegate::call(nr::FCNTL, [fd, F_GETFL, 0, 0, 0, 0]) & O_NONBLOCK as i64 == 0;
    let r = loop {
        // SAFETY: the application's buffer is checked by the kernel, with
        // the LWK's memory out of reach.
        let r = unsafe { crate::guard::syscall_for_app(nr::READ, [e.sfd as u64, buf, count, 0, 0, 0]) };
        if r != -EAGAIN || !blocking {
            break r;
        }
        // Wait for one, with the application's mask: a signal it lets
        // through runs its handler and ends the wait, restarting the read
        // if every handler that could have run asked for SA_RESTART.
        let restart = !signal::any_without_restart(!uc.sigmask);
        let mut p = PollFd { fd: e.sfd, events: POLLIN, revents: 0 };
        let w = signal::with_app_mask(uc, || poll(&mut p, 1, -1));
        if w == -EINTR && !restart {
            break -EINTR;
        }
    };
    rearm(fd as i32);
    r
}

/// After a read: empty the pipe and let the watcher look again.
fn rearm(app_fd: i32) {
    let mut t = TABLE.lock();
    if let Some(e) = t.iter_mut().find(|e| e.app_fd == app_fd) {
        let mut junk = [0u8; 64];
        // SAFETY: reading into our own buffer from our non-blocking pipe.
        while unsafe { syscall3(nr::READ, e.pipe as u64, junk.as_mut_ptr() as u64, junk.len() as u64) } > 0 {}
        e.reported = false;
    }
    drop(t);
    wake_watcher();
}

/// The application closed (or replaced by dup2/dup3, or close_range'd)
/// descriptors [lo, hi]: forget the signalfds among them.
pub fn forget(lo: u64, hi: u64) {
    if USED.load(Relaxed) == 0 {
        return;
    }
    let mut t = TABLE.lock();
    for e in t.iter_mut() {
        if e.app_fd >= 0 && (lo..=hi).contains(&(e.app_fd as u64)) {
            close(e.sfd);
            close(e.pipe);
            *e = FREE;
            USED.fetch_sub(1, Relaxed);
        }
    }
    drop(t);
    wake_watcher();
}

/// # Safety
/// Only in the single thread of a freshly forked child.
pub unsafe fn force_unlock() {
    // SAFETY: as documented.
    unsafe { TABLE.force_unlock() };
}

/// In a forked child: the watcher thread is not there; the real signalfds
/// now read the child's signals, as natively. The pipes are shared with
/// the parent (the proxy forked its descriptors), so a poll in one may see
/// the other's signals.
pub fn reset_for_fork() {
    WATCHER.store(false, Relaxed);
    WAKE.store(-1, Relaxed);
    if USED.load(Relaxed) != 0 {
        start_watcher();
    }
}

#[repr(C)]
struct PollFd {
    fd: i32,
    events: i16,
    revents: i16,
}

fn poll(fds: *mut PollFd, n: u64, timeout_ms: i64) -> i64 {
    // SAFETY: fds points to n entries of ours.
    unsafe { syscall3(nr::POLL, fds as u64, n, timeout_ms as u64) }
}

fn wake_watcher() {
    let w = WAKE.load(Relaxed);
    if w >= 0 {
        let one = 1u64;
        // SAFETY: writing our own word into our own eventfd.
        unsafe { syscall3(nr::WRITE, w as u64, &one as *const u64 as u64, 8) };
    }
}

fn start_watcher() {
    if WATCHER.swap(true, AcqRel) {
        return;
    }
    // SAFETY: plain eventfd creation.
    let w = unsafe { syscall3(nr::EVENTFD2, 0, EFD_CLOEXEC | EFD_NONBLOCK, 0) };
    if w < 0 {
        WATCHER.store(false, Relaxed);
        return;
    }
    WAKE.store(w as i32, Relaxed);
    let top = (STACK.0.get() as u64 + WATCH_STACK as u64) & !15;
    let flags = CLONE_VM | CLONE_FS | CLONE_FILES | CLONE_SIGHAND | CLONE_THREAD | CLONE_SYSVSEM;
    // SAFETY: the stack is the watcher's alone; it shares everything and
    // runs only the code below. It inherits the all-blocked signal mask of
    // the SIGSYS handler and is not under Syscall User Dispatch.
    let r = unsafe { spawn(flags, top, 0, 0, 0, watch, 0) };
    if r < 0 {
        WATCHER.store(false, Relaxed);
    }
}

extern "C" fn watch(_: u64) -> ! {
    let wake = WAKE.load(Relaxed);
    loop {
        let mut fds = [const { PollFd { fd: -1, events: POLLIN, revents: 0 } }; MAX + 1];
        let mut which = [0usize; MAX + 1];
        fds[0].fd = wake;
        let mut n = 1;
        for (i, e) in TABLE.lock().iter().enumerate() {
            if e.app_fd >= 0 && !e.reported {
                fds[n].fd = e.sfd;
                which[n] = i;
                n += 1;
            }
        }
        if poll(fds.as_mut_ptr(), n as u64, -1) < 0 {
            continue;
        }
        if fds[0].revents != 0 {
            let mut v = 0u64;
            // SAFETY: draining our own eventfd into our own word.
            unsafe { syscall3(nr::READ, wake as u64, &mut v as *mut u64 as u64, 8) };
        }
        let mut t = TABLE.lock();
        for k in 1..n {
            let e = &mut t[which[k]];
            if fds[k].revents != 0 && e.sfd == fds[k].fd && !e.reported {
                e.reported = true;
                // SAFETY: one byte into our own pipe.
                unsafe { syscall3(nr::WRITE, e.pipe as u64, b"s".as_ptr() as u64, 1) };
            }
        }
    }
}

/// The signalfds saved: the table of the application's signalfds (the
/// descriptors are numbers in the application process and the proxy).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SignalfdSnapshot {
    pub entries: [Entry; MAX],
}

impl Persist for [Entry; MAX] {
    type Snapshot = SignalfdSnapshot;
    const VERSION: u32 = 2;

    fn save(&self, out: &mut SignalfdSnapshot) {
        out.entries = *self;
    }

    fn restore(&mut self, s: &SignalfdSnapshot) -> Result<(), i64> {
        let valid = |e: &Entry| *e == FREE || (e.app_fd >= 0 && e.sfd >= 0 && e.pipe >= 0);
        if !s.entries.iter().all(valid) {
            return Err(-EINVAL);
        }
        *self = s.entries;
        USED.store(s.entries.iter().filter(|e| e.app_fd >= 0).count() as u32, Relaxed);
        Ok(())
    }
}

/// The signalfd table, locked (to save or restore it).
pub fn lock() -> crate::sync::Guard<'static, [Entry; MAX]> {
    TABLE.lock()
}

/// In a process restored from a saved state (not the frozen one resumed):
/// the saved table names descriptors of the old process. Make each
/// signalfd again at the numbers it names, as the table lists it: the real
/// signalfd with its mask, and this process's end of the pipe that the
/// restorer left, empty, in the proxy at the application's number
/// (`Disposition::SignalfdPipe` in `lwk_migrate::fds`). The numbers must
/// be free (the restorer keeps its own descriptors above them). Signals
/// pending at the freeze are raised again later, by each thread as it
/// enters the application. Needs the right to open the proxy's
/// descriptors through /proc.
pub fn remake_in_new_process() -> Result<(), (&'static str, i64)> {
    let mut t = TABLE.lock();
    for e in t.iter_mut().filter(|e| e.app_fd >= 0) {
        // SAFETY: the mask is the LWK's own word.
        let sfd = unsafe {
            syscall6(nr::SIGNALFD4, !0u64, &e.mask as *const u64 as u64, 8, SFD_NONBLOCK | SFD_CLOEXEC, 0, 0)
        };
        if sfd < 0 {
            return Err(("cannot make a signalfd again", sfd));
        }
        move_to(sfd as i32, e.sfd).map_err(|r| ("cannot put a signalfd back at its number", r))?;
        let pipe = open_proxy_fd(e.app_fd);
        if pipe < 0 {
            return Err(("cannot open a signalfd's pipe in the proxy", pipe));
        }
        move_to(pipe as i32, e.pipe).map_err(|r| ("cannot put a signalfd's pipe back at its number", r))?;
        e.reported = false;
    }
    Ok(())
}

/// Give descriptor `fd` the number `at` (close-on-exec), closing `fd`.
fn move_to(fd: i32, at: i32) -> Result<(), i64> {
    if fd == at {
        return Ok(());
    }
    // SAFETY: plain dup3 and close of descriptors of the LWK's own.
    let r = unsafe { syscall3(nr::DUP3, fd as u64, at as u64, O_CLOEXEC) };
    close(fd);
    if r < 0 {
        Err(r)
    } else {
        Ok(())
    }
}

/// After a restore of the table, with its lock released: a watcher thread
/// serves it, the running one or one started now (after a restore into a
/// new process).
pub fn after_restore() {
    if USED.load(Relaxed) != 0 && !WATCHER.load(Relaxed) {
        start_watcher();
    }
    wake_watcher();
}

/// Forget the table (for a test of restore); the descriptors stay open.
pub fn wipe(t: &mut [Entry; MAX]) {
    *t = [FREE; MAX];
    USED.store(0, Relaxed);
}
