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
    call_on(crate::thread::current_slot(), nr, args)
}

/// Delegate a call on channel `slot` (owned by the calling thread).
pub fn call_on(slot: usize, nr: u64, args: [u64; 6]) -> i64 {
    let ctl = control();
    let ch = &ctl.channels[slot];
    ch.nr.store(nr, Relaxed);
    for (slot, a) in ch.args.iter().zip(args) {
        slot.store(a, Relaxed);
    }
    ch.state.store(CH_REQUEST, SeqCst);
    if ch.server_sleeping.load(SeqCst) != 0 {
        rt::futex_wake(&ch.state, 1);
    }
    let mut wait = rt::SpinWait::new(ctl.header.spin_cycles.load(Relaxed));
    while ch.state.load(Acquire) != CH_DONE {
        if !wait.spin() {
            ch.client_sleeping.store(1, SeqCst);
            if ch.state.load(SeqCst) != CH_DONE {
                rt::futex_wait(&ch.state, CH_REQUEST);
            }
            ch.client_sleeping.store(0, Relaxed);
        }
    }
    let ret = ch.ret.load(Relaxed);
    ch.state.store(CH_IDLE, Release);
    ret
}

/// Make the proxy apply every pending address-space change now.
pub fn sync() {
    call(lwk_abi::control::REQ_SYNC, [0; 6]);
}
