//! The delegation client: post a system call on the channel, wake the
//! proxy if it sleeps, spin for the answer, then sleep on the futex.
//! The proxy executes the call in its own process, where the application's
//! memory is mapped at the same addresses, so arguments go as they are.

use core::sync::atomic::Ordering::{Acquire, Relaxed, Release, SeqCst};

use lwk_abi::control::{CH_DONE, CH_IDLE, CH_REQUEST};
use lwk_rt as rt;

use crate::control;

/// Delegate a call on the calling thread's channel.
pub fn call(nr: u64, args: [u64; 6]) -> i64 {
    call_on(nr, args, None)
}

/// Delegate an application's call that a signal may interrupt: while it
/// waits, a signal pending for the application and not blocked by
/// `app_mask` makes the LWK interrupt the proxy worker's call
/// (NUDGE_SIGNAL), which then returns EINTR here; the
/// caller restarts it or fails it as Linux would. Signals are blocked while
/// the LWK runs, so the wait checks for them every 2 ms.
pub fn call_interruptible(nr: u64, args: [u64; 6], app_mask: u64) -> i64 {
    call_on(nr, args, Some(app_mask))
}

/// Delegate a call on the calling thread's channel.
fn call_on(nr: u64, args: [u64; 6], app_mask: Option<u64>) -> i64 {
    let ctl = control();
    let ch = &ctl.channels[crate::thread::current_slot()];
    ch.nr.store(nr, Relaxed);
    for (slot, a) in ch.args.iter().zip(args) {
        slot.store(a, Relaxed);
    }
    ch.state.store(CH_REQUEST, SeqCst);
    if ch.server_sleeping.load(SeqCst) != 0 {
        rt::futex_wake(&ch.state, 1);
    }
    let mut wait = rt::SpinWait::new(ctl.header.spin_cycles.load(Relaxed));
    let mut waited_ms = 0u64;
    while ch.state.load(Acquire) != CH_DONE {
        if !wait.spin() {
            ch.client_sleeping.store(1, SeqCst);
            if ch.state.load(SeqCst) != CH_DONE {
                match app_mask {
                    None => {
                        if rt::futex_wait_timeout(&ch.state, CH_REQUEST, 1_000_000_000) == -rt::ETIMEDOUT {
                            check_proxy_alive();
                        }
                    }
                    Some(mask) => {
                        rt::futex_wait_timeout(&ch.state, CH_REQUEST, 2_000_000);
                        // Nudge on every check while the signal stays
                        // pending: a nudge can land just before the worker
                        // enters its blocking call and be lost.
                        if ch.state.load(SeqCst) != CH_DONE && crate::signal::pending() & !mask != 0 {
                            nudge(ch);
                        }
                        waited_ms += 2;
                        if waited_ms % 1000 == 0 {
                            check_proxy_alive();
                        }
                    }
                }
            }
            ch.client_sleeping.store(0, Relaxed);
        }
    }
    let ret = ch.ret.load(Relaxed);
    ch.state.store(CH_IDLE, Release);
    ret
}

/// An application whose proxy is gone cannot go on: say so and end,
/// rather than wait forever. (The supervisor notices this for the first
/// process; a forked child has only this.)
fn check_proxy_alive() {
    let proxy = control().header.proxy_pid.load(Relaxed);
    if rt::process_gone(proxy) {
        lwk_rt::diag!("the proxy process {} is gone; the application cannot continue", proxy);
        rt::exit_group(125);
    }
}

/// Interrupt the proxy worker serving `ch`.
fn nudge(ch: &lwk_abi::control::Channel) {
    let proxy = control().header.proxy_pid.load(Relaxed);
    let worker = ch.server_tid.load(Relaxed);
    if proxy > 0 && worker > 0 {
        // SAFETY: signals a thread of our own proxy.
        unsafe { rt::syscall3(lwk_rt::nr::TGKILL, proxy as u64, worker as u64, lwk_abi::control::NUDGE_SIGNAL) };
    }
}

/// Make the proxy apply every pending address-space change now.
pub fn sync() {
    call(lwk_abi::control::REQ_SYNC, [0; 6]);
}
