//! System-call entry: Syscall User Dispatch sends every system call the
//! application makes from outside the LWK's text as SIGSYS to
//! [`lwk_sigsys`], which routes it by the one syscall table.

use lwk_abi::control::NR_SLOTS;
use lwk_abi::syscalls::{self, Rule, Syscall};
use lwk_rt::nr;
use lwk_rt::*;

use crate::arch::{restorer_addr, UContext, REG_RAX};
use crate::signal::{SA_RESTORER, SIGLWK, SIGSYS};
use crate::{control, delegate, handlers, signal, thread};

const SA_SIGINFO: u64 = 4;
/// si_code of a SIGSYS from Syscall User Dispatch.
const SYS_USER_DISPATCH: i32 = 2;
const PR_SET_SYSCALL_USER_DISPATCH: u64 = 59;
const PR_SYS_DISPATCH_ON: u64 = 1;
const SYSCALL_DISPATCH_FILTER_BLOCK: u8 = 1;

extern "C" {
    static __ehdr_start: u8;
    static etext: u8;
}

/// Read by the kernel on every system call of this thread.
static SELECTOR: core::sync::atomic::AtomicU8 = core::sync::atomic::AtomicU8::new(SYSCALL_DISPATCH_FILTER_BLOCK);

/// Install the handler of the LWK's signals (SIGSYS and SIGLWK, both
/// arrive in [`lwk_sigsys`], every other signal blocked) and switch
/// dispatch on for this thread.
pub fn enable() -> Result<(), i64> {
    let entry = crate::guard::sigsys_entry(lwk_sigsys as *const () as u64);
    let act: [u64; 4] = [entry, SA_SIGINFO | SA_RESTORER, restorer_addr(), !0];
    for sig in [SIGSYS, SIGLWK] {
        // SAFETY: act is a valid kernel sigaction.
        let r = unsafe { syscall6(nr::RT_SIGACTION, sig, act.as_ptr() as u64, 0, 8, 0, 0) };
        if r < 0 {
            return Err(r);
        }
    }
    enable_thread()
}

/// Switch Syscall User Dispatch on for the calling thread (the setting is
/// per thread: every new thread must do it before running application code).
pub fn enable_thread() -> Result<(), i64> {
    // SAFETY: linker-defined symbols; only their addresses are used.
    let (start, end) = unsafe { (&__ehdr_start as *const u8 as u64, &etext as *const u8 as u64) };
    let selector = match crate::guard::selector() {
        0 => SELECTOR.as_ptr() as u64,
        page => {
            // SAFETY: the guard's selector page is ours and stays mapped.
            unsafe { (page as *mut u8).write(SYSCALL_DISPATCH_FILTER_BLOCK) };
            page
        }
    };
    // SAFETY: the selector lives as long as the process.
    let r = unsafe {
        syscall6(nr::PRCTL, PR_SET_SYSCALL_USER_DISPATCH, PR_SYS_DISPATCH_ON, start, end - start, selector, 0)
    };
    if r < 0 {
        return Err(r);
    }
    Ok(())
}

/// Where a call ran, for the statistics.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Ran {
    Local,
    Delegated,
}

/// The handler of the LWK's signals: a trapped system call (SIGSYS), or a
/// request to stop while another thread of the process forks or saves the
/// LWK's state (SIGLWK).
///
/// # Safety
/// Called by the kernel with a valid siginfo and ucontext.
#[no_mangle]
pub unsafe extern "C" fn lwk_sigsys(sig: i32, info: *mut u8, ctx: *mut UContext) {
    // SAFETY: the kernel passes the frame it built for this signal.
    let uc = unsafe { &mut *ctx };
    // si_code: a trapped system call, or a SIGSYS someone sent (kill,
    // tgkill, a seccomp filter), which is the application's.
    // SAFETY: info points to the siginfo_t of this signal.
    let code = unsafe { (info.add(8) as *const i32).read() };
    // SAFETY: as above.
    let request = sig as u64 == SIGLWK && unsafe { thread::is_stop_request(info) || crate::freeze::is_request(info) };
    if sig as u64 == SIGLWK && thread::waiting() {
        // Inside a wait of the LWK's (with the application's mask): a
        // request ends the wait with EINTR, and its call runs again when
        // the thread leaves the LWK, where it stops.
        if request {
            thread::mark_interrupted();
        } else {
            signal::app_own_signal(SIGLWK);
        }
        return;
    }
    thread::entered();
    if sig as u64 == SIGLWK {
        // A stop or freeze request waits in `leaving` until it is over; a
        // SIGLWK someone else sent is the application's.
        if !request {
            signal::app_own_signal(SIGLWK);
        }
        thread::leaving(uc);
        return;
    }
    if code != SYS_USER_DISPATCH {
        signal::app_own_signal(SIGSYS);
        thread::leaving(uc);
        return;
    }
    crate::persist::maybe_selftest(uc);
    let (nr, a) = uc.syscall();
    let t0 = rdtsc();
    thread::take_interrupted();
    let (mut ret, ran) = dispatch(nr, a, uc);
    if ret == -EINTR && thread::take_interrupted() {
        // Interrupted for the LWK's sake (a freeze), not by a signal of the
        // application's: the call runs again when the thread goes on, here
        // or wherever the process is restored, as after a signal with
        // SA_RESTART. (A relative sleep goes on for what it had left,
        // `handlers::sleep`; other relative timeouts start again in full.)
        uc.restart_syscall(nr);
        ret = nr as i64;
    }
    let dt = rdtsc().wrapping_sub(t0);
    if (nr as usize) < NR_SLOTS {
        let s = &control().stats;
        let c = if ran == Ran::Local { &s.local[nr as usize] } else { &s.delegated[nr as usize] };
        c.add(dt);
    }
    uc.gregs[REG_RAX] = ret as u64;
    thread::leaving(uc);
}

/// One lookup in the syscall table, and what its row says.
fn dispatch(nr: u64, a: [u64; 6], uc: &mut UContext) -> (i64, Ran) {
    let Some(call) = syscalls::lookup(nr as usize) else {
        return (-ENOSYS, Ran::Local); // as Linux answers an unknown number
    };
    match call.rule {
        Rule::Local => (passthrough(nr, a), Ran::Local),
        Rule::Delegate => delegate::syscall(call, a, uc),
        Rule::DelegatePath(i) => delegate::syscall_with_path(call, i as usize, a, uc),
        Rule::Handler(h) => handlers::run(h, call, a, uc),
        Rule::Refuse(errno) => (refuse(call, errno), Ran::Local),
    }
}

/// Run the application's call as it is in its own process.
pub fn passthrough(nr: u64, a: [u64; 6]) -> i64 {
    // SAFETY: the application asked for exactly this call on its own
    // process; its pointers are checked by the kernel as natively, with the
    // LWK's memory out of reach.
    unsafe { crate::guard::syscall_for_app(nr, a) }
}

fn refuse(call: &Syscall, errno: u32) -> i64 {
    let why = call.support.text().unwrap_or("");
    if errno == ENOSYS as u32 {
        lwk_rt::diag!("{} is not supported ({}): returning ENOSYS", call.name, why);
    } else {
        lwk_rt::diag!("{} is not supported ({}): returning error {}", call.name, why, errno);
    }
    -(errno as i64)
}
