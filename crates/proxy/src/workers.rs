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
    let flags = CLONE_VM
        | CLONE_FS
        | CLONE_FILES
        | CLONE_SIGHAND
        | CLONE_THREAD
        | CLONE_SYSVSEM
        | CLONE_CHILD_SETTID
        | CLONE_CHILD_CLEARTID;
    // SAFETY: the slot's stack is unused: no worker runs for this slot.
    unsafe { lwk_rt::thread::spawn(flags, top, 0, tid.as_ptr() as u64, 0, worker_main, slot as u64) }
}

extern "C" fn worker_main(slot: u64) -> ! {
    // The alternate stack is per thread and not inherited.
    crate::guard::setup_altstack();
    crate::serve(slot as usize)
}
