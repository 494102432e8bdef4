//! Signals of the application. The LWK keeps two signals for itself:
//! SIGSYS, as which every trapped system call arrives, and SIGRTMAX
//! ([`SIGLWK`]), with which it stops the process's other threads (a
//! real-time signal queues, so a stop request never displaces a trapped
//! call's SIGSYS, as a second SIGSYS would). The application's view of both
//! is virtual: it can never block them, its actions for them are recorded
//! but not installed. Every handler it installs returns through the LWK's
//! restorer (inside the allowed region), so rt_sigreturn never traps.
//!
//! Inside the SIGSYS handler every other signal is blocked; the mask the
//! application sees is the one saved in the signal frame, which is what
//! rt_sigprocmask reads and changes.

use core::sync::atomic::Ordering::Relaxed;

use lwk_rt::nr;
use lwk_rt::*;

use lwk_abi::syscalls::CallMask;

use crate::arch::restorer_addr;
use crate::arch::UContext;
use crate::persist::Persist;
use crate::sync::SpinLock;
use crate::uaccess::{read_app, write_app};

/// The LWK's own signal: every trapped system call arrives as one.
pub const SIGSYS: u64 = 31;
const SIG_DFL: u64 = 0;
const SIG_IGN: u64 = 1;
pub const SA_RESTORER: u64 = 0x0400_0000;
/// The LWK's other signal (SIGRTMAX): stop requests to other threads.
pub const SIGLWK: u64 = 64;
const SIGSYS_BIT: u64 = 1 << (SIGSYS - 1);
pub const SIGLWK_BIT: u64 = 1 << (SIGLWK - 1);
/// SIGKILL, SIGSTOP, and the LWK's two signals.
const UNBLOCKABLE: u64 = (1 << 8) | (1 << 18) | SIGSYS_BIT | SIGLWK_BIT;

/// What the application asked for that the kernel does not hold: its
/// actions for the LWK's signals (SIGSYS, SIGLWK), and each signal's own
/// restorer and flags.
pub struct Saved {
    pub sigsys: [u64; 4],
    pub siglwk: [u64; 4],
    pub restorer: [(u64, u64); 65],
}

static SAVED: SpinLock<Saved> = SpinLock::new(Saved { sigsys: [0; 4], siglwk: [0; 4], restorer: [(0, 0); 65] });

impl Saved {
    /// The application's recorded action for one of the LWK's signals.
    fn own(&mut self, sig: u64) -> &mut [u64; 4] {
        if sig == SIGSYS {
            &mut self.sigsys
        } else {
            &mut self.siglwk
        }
    }
}

const SIGKILL: u64 = 9;
const SIGSTOP: u64 = 19;
const ITIMERS: usize = 3; // ITIMER_REAL, ITIMER_VIRTUAL, ITIMER_PROF

/// The signal subsystem saved: what the LWK keeps ([`Saved`]) and what
/// Linux holds for the process (each signal's action as installed, with
/// the LWK's restorer, and the interval timers). Per-thread parts (masks,
/// alternate stacks) are the threads'.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SignalsSnapshot {
    pub sigsys: [u64; 4],
    pub siglwk: [u64; 4],
    pub restorer: [(u64, u64); 65],
    /// Linux's `struct sigaction` of signals 1..=64 (index 0 unused; SIGKILL,
    /// SIGSTOP and the LWK's signals, which are not the application's to
    /// set, zero).
    pub actions: [[u64; 4]; 65],
    /// getitimer(2) of each timer: interval and value, as two timevals.
    pub itimers: [[u64; 4]; ITIMERS],
}

/// Signals whose action the application sets through the kernel.
fn settable(sig: u64) -> bool {
    sig != SIGKILL && sig != SIGSTOP && sig != SIGSYS && sig != SIGLWK
}

fn kernel_sigaction(sig: u64, new: Option<&[u64; 4]>, old: Option<&mut [u64; 4]>) -> i64 {
    let new = new.map_or(0, |n| n.as_ptr() as u64);
    let old = old.map_or(0, |o| o.as_mut_ptr() as u64);
    // SAFETY: both are 0 or the LWK's own kernel sigactions.
    unsafe { syscall6(nr::RT_SIGACTION, sig, new, old, 8, 0, 0) }
}

impl Persist for Saved {
    type Snapshot = SignalsSnapshot;
    const VERSION: u32 = 2;

    fn save(&self, out: &mut SignalsSnapshot) {
        out.sigsys = self.sigsys;
        out.siglwk = self.siglwk;
        out.restorer = self.restorer;
        out.actions = [[0; 4]; 65];
        for sig in (1..=64).filter(|&s| settable(s)) {
            kernel_sigaction(sig, None, Some(&mut out.actions[sig as usize]));
        }
        for (which, t) in out.itimers.iter_mut().enumerate() {
            // SAFETY: t is ours, the size of struct itimerval.
            unsafe { syscall3(nr::GETITIMER, which as u64, t.as_mut_ptr() as u64, 0) };
        }
    }

    fn restore(&mut self, s: &SignalsSnapshot) -> Result<(), i64> {
        // Linux takes an action or refuses it whole: check what can be
        // checked before changing anything.
        if s.actions[0] != [0; 4] || (1..=64).any(|sig| !settable(sig) && s.actions[sig as usize] != [0; 4]) {
            return Err(-EINVAL);
        }
        // Two timevals each, microseconds below a second.
        if s.itimers.iter().any(|t| t[1] >= 1_000_000 || t[3] >= 1_000_000 || (t[0] | t[2]) >> 63 != 0) {
            return Err(-EINVAL);
        }
        for sig in (1..=64).filter(|&s| settable(s)) {
            let r = kernel_sigaction(sig, Some(&s.actions[sig as usize]), None);
            if r < 0 {
                return Err(r);
            }
        }
        for (which, t) in s.itimers.iter().enumerate() {
            // A periodic timer that has expired reads as stopped (value 0)
            // until its signal is taken, which re-arms it; setitimer with
            // value 0 would stop it for good. Arm it for one period: its
            // pending signal is delivered as before, the next one comes
            // about when it would have.
            let mut t = *t;
            if t[2] == 0 && t[3] == 0 {
                (t[2], t[3]) = (t[0], t[1]);
            }
            // SAFETY: t is a struct itimerval of ours.
            let r = unsafe { syscall3(nr::SETITIMER, which as u64, t.as_ptr() as u64, 0) };
            if r < 0 {
                return Err(r);
            }
        }
        self.sigsys = s.sigsys;
        self.siglwk = s.siglwk;
        self.restorer = s.restorer;
        Ok(())
    }
}

/// What execve keeps of the signal subsystem that the kernel does not
/// keep for the LWK: an ignored SIGSYS or SIGLWK stays ignored (a handled
/// one goes back to the default, as every handled signal does). Recorded
/// for the new image, which takes it with [`after_exec`].
pub fn before_exec() {
    let s = SAVED.lock();
    let ignored = (s.sigsys[0] == SIG_IGN) as u32 | ((s.siglwk[0] == SIG_IGN) as u32) << 1;
    crate::control().header.exec_own_ignored.store(ignored, Relaxed);
}

/// In the image that execve started: take what [`before_exec`] recorded.
pub fn after_exec() {
    let ignored = crate::control().header.exec_own_ignored.load(Relaxed);
    let mut s = SAVED.lock();
    if ignored & 1 != 0 {
        s.sigsys = [SIG_IGN, 0, 0, 0];
    }
    if ignored & 2 != 0 {
        s.siglwk = [SIG_IGN, 0, 0, 0];
    }
}

/// The signal subsystem, locked (to save or restore it).
pub fn lock() -> crate::sync::Guard<'static, Saved> {
    SAVED.lock()
}

/// Forget the signal subsystem's state (for a test of restore): the LWK's
/// part zeroed, the timers stopped, and with `actions` every settable
/// action replaced by one that would crash if it ran (a handler at the
/// LWK's restorer, which never discards a pending signal, as SIG_IGN
/// would). Signals are blocked while the LWK runs, so nothing is delivered
/// before the restore; but a thread that waits with the application's mask
/// would take them, so `actions` only when the caller is alone.
pub fn wipe(s: &mut Saved, actions: bool) {
    s.sigsys = [0; 4];
    s.siglwk = [0; 4];
    s.restorer = [(0, 0); 65];
    if actions {
        let poison = [restorer_addr(), SA_RESTORER, restorer_addr(), 0];
        for sig in (1..=64).filter(|&s| settable(s)) {
            kernel_sigaction(sig, Some(&poison), None);
        }
    }
    for which in 0..ITIMERS as u64 {
        let zero = [0u64; 4];
        // SAFETY: a zero struct itimerval of ours stops the timer.
        unsafe { syscall3(nr::SETITIMER, which, zero.as_ptr() as u64, 0) };
    }
}

/// # Safety
/// Only in the single thread of a freshly forked child.
pub unsafe fn force_unlock() {
    // SAFETY: as documented.
    unsafe { SAVED.force_unlock() };
}

pub fn rt_sigaction(sig: u64, act: u64, oact: u64, size: u64) -> i64 {
    match sigaction(sig, act, oact, size) {
        Ok(()) => 0,
        Err(e) => e,
    }
}

fn sigaction(sig: u64, act: u64, oact: u64, size: u64) -> Result<(), i64> {
    if size != 8 || sig == 0 || sig > 64 {
        return Err(-EINVAL);
    }
    let new: Option<[u64; 4]> = if act != 0 { Some(read_app(act)?) } else { None };
    if sig == SIGSYS || sig == SIGLWK {
        let mut s = SAVED.lock();
        let old = *s.own(sig);
        if let Some(n) = new {
            *s.own(sig) = n;
        }
        drop(s);
        if oact != 0 {
            write_app(oact, old)?;
        }
        return Ok(());
    }
    let mut k = new.unwrap_or_default();
    if new.is_some() && k[0] != SIG_DFL && k[0] != SIG_IGN {
        SAVED.lock().restorer[sig as usize] = (k[1] & SA_RESTORER, k[2]);
        k[1] |= SA_RESTORER;
        k[2] = restorer_addr();
    }
    k[3] &= !(SIGSYS_BIT | SIGLWK_BIT);
    let mut old = [0u64; 4];
    // SAFETY: both buffers are the LWK's own.
    let r = unsafe {
        syscall6(
            nr::RT_SIGACTION,
            sig,
            if new.is_some() { k.as_ptr() as u64 } else { 0 },
            old.as_mut_ptr() as u64,
            8,
            0,
            0,
        )
    };
    if r < 0 {
        return Err(r);
    }
    if old[2] == restorer_addr() {
        let (flag, restorer) = SAVED.lock().restorer[sig as usize];
        old[1] = (old[1] & !SA_RESTORER) | flag;
        old[2] = restorer;
    }
    if oact != 0 {
        write_app(oact, old)?;
    }
    Ok(())
}

/// A SIGSYS that is no trapped call, or a SIGLWK that is no stop request,
/// arrived: the application's, whose action the LWK keeps. Default: the
/// process dies of it, as natively (the kernel's action becomes the default
/// and the signal is sent again; it is delivered when the LWK's handler
/// returns). Ignored: nothing. A handler of the application's cannot run
/// there (the signal must stay the LWK's), so it is reported and the
/// signal dropped.
pub fn app_own_signal(sig: u64) {
    let action = SAVED.lock().own(sig)[0];
    match action {
        SIG_IGN => {}
        SIG_DFL => {
            let dfl = [SIG_DFL, 0, 0, 0u64];
            // SAFETY: a valid kernel sigaction; then a signal to this thread.
            unsafe {
                syscall6(nr::RT_SIGACTION, sig, dfl.as_ptr() as u64, 0, 8, 0, 0);
                syscall3(nr::TGKILL, getpid() as u64, gettid() as u64, sig);
            }
        }
        _ => lwk_rt::diag!(
            "the application's handler of signal {} cannot run under the LWK (the signal is the LWK's): \
             a signal {} it was sent is dropped",
            sig,
            sig
        ),
    }
}

pub fn rt_sigprocmask(how: u64, set: u64, oset: u64, size: u64, uc: &mut UContext) -> i64 {
    if size != 8 {
        return -EINVAL;
    }
    let old = uc.sigmask;
    if set != 0 {
        let s = match read_app::<1>(set) {
            Ok(v) => v[0],
            Err(e) => return e,
        };
        let m = match how {
            0 => old | s,
            1 => old & !s,
            2 => s,
            _ => return -EINVAL,
        };
        uc.sigmask = m & !UNBLOCKABLE;
    }
    if oset != 0 {
        if let Err(e) = write_app(oset, [old]) {
            return e;
        }
    }
    0
}

pub fn rt_sigsuspend(set: u64, size: u64) -> i64 {
    if size != 8 {
        return -EINVAL;
    }
    match read_app::<1>(set) {
        Ok(v) => suspend(v[0]),
        Err(e) => e,
    }
}

pub fn pause(uc: &UContext) -> i64 {
    suspend(uc.sigmask)
}

/// Wait for a signal with `mask` (never blocking the unblockable ones:
/// the LWK's own signal interrupts the wait, which then runs again, see
/// `thread::interrupt_wait`).
fn suspend(mask: u64) -> i64 {
    let m = mask & !UNBLOCKABLE;
    crate::thread::set_waiting(true);
    // SAFETY: m is the LWK's own.
    let r = unsafe { syscall3(nr::RT_SIGSUSPEND, &m as *const u64 as u64, 8, 0) };
    crate::thread::set_waiting(false);
    r
}

/// Run a blocking call with the application's signal mask, so a signal
/// interrupts it with EINTR after its handler ran, as natively.
pub fn with_app_mask(uc: &UContext, f: impl FnOnce() -> i64) -> i64 {
    with_mask(uc.sigmask, f)
}

/// Run `f` with `mask` in force (the unblockable signals never blocked,
/// as in `suspend`): pending signals it lets through are delivered, their
/// handlers run on this stack. The LWK's all-blocked mask is back
/// afterwards.
fn with_mask(mask: u64, f: impl FnOnce() -> i64) -> i64 {
    let m = mask & !UNBLOCKABLE;
    let mut saved = 0u64;
    crate::thread::set_waiting(true);
    // SAFETY: masks are the LWK's own words.
    unsafe { syscall6(nr::RT_SIGPROCMASK, 2, &m as *const u64 as u64, &mut saved as *mut u64 as u64, 8, 0, 0) };
    let r = f();
    // SAFETY: as above.
    unsafe { syscall6(nr::RT_SIGPROCMASK, 2, &saved as *const u64 as u64, 0, 8, 0, 0) };
    crate::thread::set_waiting(false);
    r
}

/// Signals pending for this thread or process, but for the LWK's own
/// requests (SIGLWK: a stop or freeze request waits for the thread to
/// leave the LWK, and interrupts no call of the application's).
pub fn pending() -> u64 {
    let mut set = 0u64;
    // SAFETY: set is the LWK's own.
    unsafe { syscall3(nr::RT_SIGPENDING, &mut set as *mut u64 as u64, 8, 0) };
    set & !SIGLWK_BIT
}

/// Will any signal of `set` run a handler installed without SA_RESTART?
pub fn any_without_restart(set: u64) -> bool {
    const SA_RESTART: u64 = 0x1000_0000;
    (1..=64u64).filter(|s| set & (1 << (s - 1)) != 0).any(|sig| {
        let mut old = [0u64; 4];
        // SAFETY: queries the disposition into our own buffer.
        unsafe { syscall6(nr::RT_SIGACTION, sig, 0, old.as_mut_ptr() as u64, 8, 0, 0) };
        old[0] != SIG_DFL && old[0] != SIG_IGN && old[1] & SA_RESTART == 0
    })
}

/// The signal mask a call waits with, if it has its own (the table's
/// `mask`: ppoll's and epoll_pwait's 4th argument, pselect6's through its 6th). None without one
/// (or if it cannot be read: the proxy's call will say EFAULT).
pub fn call_sigmask(mask: CallMask, a: [u64; 6]) -> Option<u64> {
    let set = match mask {
        CallMask::Arg(i) => a[i as usize],
        CallMask::Pselect if a[5] != 0 => read_app::<1>(a[5]).ok()?[0],
        CallMask::Pselect | CallMask::None => return None,
    };
    if set == 0 {
        return None;
    }
    read_app::<1>(set).ok().map(|m| m[0] & !UNBLOCKABLE)
}

/// Deliver the pending signals that `mask` does not block, now, with
/// `mask` in force; the LWK's all-blocked mask is back afterwards.
pub fn run_handlers_with(mask: u64) {
    with_mask(mask, || 0);
}
