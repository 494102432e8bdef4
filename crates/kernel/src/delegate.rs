//! The delegation client: post a system call on the channel, wake the
//! proxy if it sleeps, spin for the answer, then sleep on the futex.
//! The proxy executes the call in its own process, where the application's
//! memory is mapped at the same addresses, so arguments go as they are.

use core::sync::atomic::Ordering::{Acquire, Relaxed, Release, SeqCst};

use lwk_abi::control::{CH_DONE, CH_IDLE, CH_REQUEST};
use lwk_abi::syscalls::{Sigpipe, Syscall};
use lwk_rt as rt;
use lwk_rt::{nr, EINTR, EPIPE};

use crate::arch::UContext;
use crate::trap::Ran;
use crate::{control, procfs, signal};

const SIGPIPE: u64 = 13;

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
                        if ch.state.load(SeqCst) != CH_DONE
                            && (crate::signal::pending() & !mask != 0 || crate::freeze::requested())
                        {
                            nudge(ch);
                        }
                        waited_ms += 2;
                        if waited_ms.is_multiple_of(1000) {
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

/// The application's delegated call `call`, as Linux would run it: a
/// signal interrupts it (EINTR or restart), and an EPIPE raises SIGPIPE.
pub fn syscall(call: &Syscall, a: [u64; 6], uc: &mut UContext) -> (i64, Ran) {
    let r = interruptible(call, a, uc);
    if r == -EPIPE && raises_sigpipe(call, a) {
        // The proxy ignores SIGPIPE; the application gets it as it would
        // natively (delivered when we return).
        // SAFETY: signals this process's own thread.
        unsafe { rt::syscall3(nr::TGKILL, rt::getpid() as u64, rt::gettid() as u64, SIGPIPE) };
    }
    (r, Ran::Delegated)
}

/// A delegated call whose argument `i` is a path: one under /proc/self
/// must name the application, not the proxy (see procfs).
pub fn syscall_with_path(call: &Syscall, i: usize, a: [u64; 6], uc: &mut UContext) -> (i64, Ran) {
    if procfs::names_proc(a[i]) {
        syscall_proc(call, i, a, uc)
    } else {
        syscall(call, a, uc)
    }
}

/// Kept out of line so that its path buffer is on the stack only for
/// /proc paths.
#[inline(never)]
fn syscall_proc(call: &Syscall, i: usize, mut a: [u64; 6], uc: &mut UContext) -> (i64, Ran) {
    // On this (the application's) stack, where the proxy sees it.
    let mut path = procfs::Rewrite { buf: [0; 4096] };
    match procfs::rewrite(call.nr as u64, i, &a, &mut path) {
        procfs::Outcome::Done(r) => return (r, Ran::Local),
        procfs::Outcome::Path => a[i] = path.buf.as_ptr() as u64,
        procfs::Outcome::Unchanged => {}
    }
    syscall(call, a, uc)
}

/// A delegated call that a signal may interrupt. The proxy's call returns
/// EINTR when a terminal signal (or the LWK's nudge) arrives; the
/// application's own copy of the signal is pending here, blocked while the
/// LWK runs. As Linux does: if a handler without SA_RESTART will run (or
/// the call is never restarted), the application gets EINTR; otherwise the
/// call is restarted after the signal, by returning to the `syscall`
/// instruction. An EINTR for no signal of the application's is repeated.
fn interruptible(call: &Syscall, a: [u64; 6], uc: &mut UContext) -> i64 {
    let nr = call.nr as u64;
    // ppoll, pselect6 and epoll_pwait(2) wait with a mask of their own.
    let call_mask = signal::call_sigmask(call.mask, a);
    let mask = call_mask.unwrap_or(uc.sigmask);
    loop {
        let r = call_interruptible(nr, a, mask);
        if r != -EINTR {
            return r;
        }
        let pending = signal::pending() & !mask;
        if pending == 0 {
            if crate::freeze::requested() {
                // Interrupted for a freeze: the call runs again after it.
                crate::thread::mark_interrupted();
                return -EINTR;
            }
            continue;
        }
        if let Some(m) = call_mask {
            // As Linux does: the handlers run with the call's mask, and the
            // application's own mask is back when they return.
            signal::run_handlers_with(m);
            return -EINTR;
        }
        if call.never_restarted || signal::any_without_restart(pending) {
            return -EINTR;
        }
        uc.restart_syscall(nr);
        return nr as i64; // the result goes to rax, which must hold the number again
    }
}

fn raises_sigpipe(call: &Syscall, a: [u64; 6]) -> bool {
    const MSG_NOSIGNAL: u64 = 0x4000;
    match call.sigpipe {
        Sigpipe::No => false,
        Sigpipe::Yes => true,
        Sigpipe::UnlessNoSignal(i) => a[i as usize] & MSG_NOSIGNAL == 0,
    }
}
