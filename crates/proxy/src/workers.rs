//! Proxy workers: one thread per application thread slot, each serving
//! that slot's channel, so a call blocked for one thread blocks no other.
//! A worker outlives its application thread and serves the slot's next one
//! (starting a thread is most of the cost of creating one under lwk). They
//! share the proxy's address space and its fd table (the application's);
//! each has its own stack in protected memory and its own alternate signal
//! stack.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering::*};

use lwk_abi::control::MAX_CHANNELS;
use lwk_rt::thread::*;
use lwk_rt::*;

const STACK_SIZE: u64 = 128 << 10;

struct Worker {
    /// Top of this slot's stack, mapped on first use and kept for reuse.
    stack_top: AtomicU64,
    /// The worker's tid while it runs (set and, should it ever end,
    /// cleared by the kernel).
    tid: UnsafeCell<AtomicU32>,
}

// SAFETY: the tid word is only accessed atomically (by us and the kernel).
unsafe impl Sync for Worker {}

static WORKERS: [Worker; MAX_CHANNELS] =
    [const { Worker { stack_top: AtomicU64::new(0), tid: UnsafeCell::new(AtomicU32::new(0)) } }; MAX_CHANNELS];

/// Start the worker for channel `slot`. Returns its tid or -errno.
pub fn spawn(slot: usize) -> i64 {
    if slot == 0 || slot >= MAX_CHANNELS {
        return -EINVAL;
    }
    let w = &WORKERS[slot];
    // SAFETY: only read atomically.
    let tid = unsafe { &*w.tid.get() };
    let running = tid.load(Acquire);
    if running != 0 {
        return running as i64;
    }
    let mut top = w.stack_top.load(Relaxed);
    if top == 0 {
        match crate::guard::alloc_stack(STACK_SIZE) {
            Ok(t) => top = t,
            Err(e) => return e,
        }
        w.stack_top.store(top, Relaxed);
    }
    let flags = THREAD | CLONE_CHILD_SETTID | CLONE_CHILD_CLEARTID;
    // SAFETY: the slot's stack is unused: no worker runs for this slot.
    unsafe { lwk_rt::thread::spawn(flags, top, 0, tid.as_ptr() as u64, 0, worker_main, slot as u64) }
}

extern "C" fn worker_main(slot: u64) -> ! {
    // The alternate stack is per thread and not inherited.
    crate::guard::setup_altstack();
    crate::serve(slot as usize)
}

/// In a forked proxy: no worker of the parent exists here. Their stacks
/// (copies) are reused for the child's workers.
pub fn reset_for_fork() {
    for w in &WORKERS {
        // SAFETY: only read and written atomically.
        unsafe { &*w.tid.get() }.store(0, Release);
    }
}

/// A thread that ends the proxy the moment its application process ends
/// (exit, or death by a signal; a zombie counts as ended). Without it, the
/// proxy of a finished child would keep the child's descriptors open, and a
/// parent reading a pipe until EOF before it reaps the child would wait
/// forever.
pub fn spawn_watcher() {
    const STACK: u64 = 64 << 10;
    // SAFETY: an anonymous mapping for the watcher's stack; it never does
    // an application's call, so it needs no protection key.
    let stack = unsafe { mmap(0, STACK, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0) };
    if stack < 0 {
        return;
    }
    // Not CLONE_FILES: its pidfd must not take a number in the
    // application's descriptor table (see `watch`).
    let flags = CLONE_VM | CLONE_FS | CLONE_SIGHAND | CLONE_THREAD | CLONE_SYSVSEM;
    // SAFETY: a fresh stack, used only by the new thread.
    unsafe { lwk_rt::thread::spawn(flags, stack as u64 + STACK, 0, 0, 0, watch, 0) };
}

extern "C" fn watch(_: u64) -> ! {
    // Its own descriptor table started as a copy of the application's:
    // drop the copies, or they would keep pipes open behind the application.
    // SAFETY: closes descriptors of this thread's private table only.
    unsafe { syscall3(lwk_rt::nr::CLOSE_RANGE, 0, !0u32 as u64, 0) };
    const SYS_PIDFD_OPEN: u64 = 434;
    const POLLIN: u64 = 1;
    let h = &crate::control().header;
    // A userfaultfd for a migration's pre-copy, kept in this thread's
    // private table, where the application never sees it.
    h.proxy_uffd_tid.store(gettid(), Release);
    h.proxy_uffd.store(tracking_userfaultfd(), Release);
    // The application writes its pid when it starts (or after its fork).
    // A forked child killed before it got that far never will: once the
    // process that forked it is gone too, nobody needs this proxy. (The
    // first proxy, `lwk run`'s child, dies with it instead.)
    // (A parent outside the proxy's pid namespace, 0 here, is `lwk
    // restore`, which also starts the first proxy.)
    // SAFETY: plain getppid.
    let parent = unsafe { syscall3(lwk_rt::nr::GETPPID, 0, 0, 0) } as i32;
    let first = parent == 0 || parent == h.supervisor_pid.load(Acquire);
    let pid = loop {
        let p = h.app_pid.load(Acquire);
        if p > 0 {
            break p;
        }
        if !first && process_gone(h.parent_pid.load(Acquire)) && h.app_pid.load(Acquire) == 0 {
            exit_group(0);
        }
        // SAFETY: the i32 pid word, read as the u32 futex word it is.
        let word = unsafe { &*(h.app_pid.as_ptr() as *const AtomicU32) };
        futex_wait_timeout(word, 0, 1_000_000);
    };
    // SAFETY: plain pidfd_open.
    let fd = unsafe { syscall3(SYS_PIDFD_OPEN, pid as u64, 0, 0) };
    if fd == -ESRCH {
        exit_group(0); // gone (and reaped) already: a short-lived child
    }
    if fd < 0 {
        lwk_rt::thread::exit_thread(0); // the supervisor or the orphan check will do
    }
    let mut pfd = [fd as u64 | (POLLIN << 32)];
    let mut credentials = 0;
    loop {
        // This thread serves no call, but holds no more rights than the
        // others either (see serve): a restore's proxy (its parent outside
        // its pid namespace) looks every second until it has taken them.
        take_handed_credentials(&h.proxy_credentials, &mut credentials);
        let timeout = if parent == 0 && credentials == 0 { 1000 } else { -1i64 as u64 };
        // SAFETY: pfd is one struct pollfd (fd i32, events i16, revents i16).
        let r = unsafe { syscall3(lwk_rt::nr::POLL, pfd.as_mut_ptr() as u64, 1, timeout) };
        if r > 0 {
            exit_group(0);
        }
    }
}
