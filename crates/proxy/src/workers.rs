//! Proxy workers: one thread per application thread, each serving that
//! thread's channel, so a call blocked for one thread blocks no other.
//! They share the proxy's address space and its fd table (the
//! application's); each has its own stack in protected memory and its own
//! alternate signal stack.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering::*};

use lwk_abi::control::MAX_CHANNELS;
use lwk_rt::thread::*;
use lwk_rt::*;

const STACK_SIZE: u64 = 128 << 10;

struct Worker {
    /// Top of this slot's stack, mapped on first use and kept for reuse.
    stack_top: AtomicU64,
    /// The worker's tid while it runs; the kernel clears it (and wakes the
    /// futex) when the thread is gone, so the stack can be reused.
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
    // A previous worker of this slot may still be leaving its stack.
    loop {
        let t = tid.load(Acquire);
        if t == 0 {
            break;
        }
        futex_wait(tid, t);
    }
    let mut top = w.stack_top.load(Relaxed);
    if top == 0 {
        match crate::guard::alloc_stack(STACK_SIZE) {
            Ok(t) => top = t,
            Err(e) => return e,
        }
        w.stack_top.store(top, Relaxed);
    }
    let flags = CLONE_VM
        | CLONE_FS
        | CLONE_FILES
        | CLONE_SIGHAND
        | CLONE_THREAD
        | CLONE_SYSVSEM
        | CLONE_CHILD_SETTID
        | CLONE_CHILD_CLEARTID;
    // SAFETY: the slot's stack is unused (its last worker is gone).
    unsafe { lwk_rt::thread::spawn(flags, top, 0, tid.as_ptr() as u64, 0, worker_main, slot as u64) }
}

extern "C" fn worker_main(slot: u64) -> ! {
    // The alternate stack is per thread and not inherited.
    crate::guard::setup_altstack();
    crate::serve(slot as usize)
}
