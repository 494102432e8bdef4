//! The LWK's own implementations of system calls: one function for each
//! [`Handler`] of the syscall table. The table decides which call comes
//! here; this module only says what each handler does.

use core::sync::atomic::Ordering::Relaxed;

use lwk_abi::syscalls::{Handler, Syscall};
use lwk_rt::nr;
use lwk_rt::*;

use lwk_rt::thread::{CLONE_VFORK, CLONE_VM};

use crate::arch::{UContext, ARCH_GET_GS, ARCH_SET_GS};
use crate::mm::MM;
use crate::trap::{passthrough, Ran};
use crate::{control, delegate, exec, fork, signal, signalfd, thread};

const RLIMIT_NOFILE: u64 = 7;
const SIGCHLD: u64 = 17;
const CLOSE_RANGE_CLOEXEC: u64 = 4;
const PR_SET_DUMPABLE: u64 = 4;
/// futex operations that wait (FUTEX_WAIT, _LOCK_PI, _WAIT_BITSET,
/// _WAIT_REQUEUE_PI, _LOCK_PI2), without the private/clock flags.
const FUTEX_WAITS: [u64; 5] = [0, 6, 9, 11, 13];
const FUTEX_CMD_MASK: u64 = 0x7f;

/// Run handler `h` for the application's call `call` with arguments `a`.
pub fn run(h: Handler, call: &Syscall, a: [u64; 6], uc: &mut UContext) -> (i64, Ran) {
    use Ran::Local;
    let nr = call.nr as u64;
    let r = match h {
        Handler::Mmap => MM.lock().mmap(a[0], a[1], a[2], a[3], a[4] as i64, a[5]),
        Handler::Munmap => MM.lock().munmap(a[0], a[1]),
        Handler::Mprotect => MM.lock().mprotect(a[0], a[1], a[2]),
        Handler::Mremap => MM.lock().mremap(a[0], a[1], a[2], a[3], a[4]),
        Handler::Brk => MM.lock().brk(a[0]),
        Handler::Madvise => MM.lock().madvise(a[0], a[1], a[2]),
        Handler::RtSigaction => signal::rt_sigaction(a[0], a[1], a[2], a[3]),
        Handler::RtSigprocmask => signal::rt_sigprocmask(a[0], a[1], a[2], a[3], uc),
        Handler::RtSigsuspend => signal::rt_sigsuspend(a[0], a[1]),
        Handler::Pause => signal::pause(uc),
        // Blocking local calls: with the application's mask, so that a
        // signal runs its handler and interrupts them as natively.
        Handler::WaitWithAppMask => signal::with_app_mask(uc, || passthrough(nr, a)),
        Handler::Sleep => sleep(nr, a, uc),
        Handler::Futex if FUTEX_WAITS.contains(&(a[1] & FUTEX_CMD_MASK)) => {
            signal::with_app_mask(uc, || passthrough(nr, a))
        }
        Handler::Futex => passthrough(nr, a),
        Handler::RtSigreturn => {
            lwk_rt::diag!("rt_sigreturn from application code is not supported yet");
            exit_group(128 + crate::signal::SIGSYS as i32)
        }
        Handler::Exit | Handler::ExitGroup => {
            // Counted here: the call does not return to lwk_sigsys.
            let s = &control().stats;
            s.local[nr as usize].add(0);
            s.tsc_end.store(rdtsc(), Relaxed);
            if h == Handler::Exit {
                thread::exit(a[0]);
            }
            passthrough(nr, a)
        }
        Handler::Execve => exec::execve(a[0], a[1], a[2], uc),
        Handler::Execveat => exec::execveat(a[0], a[1], a[2], a[3], a[4], uc),
        Handler::Clone => match thread::clone(a[0], a[1], a[2], a[3], a[4], uc) {
            Some(r) => r,
            None => fork::fork(a[0], a[1], a[2], a[3], a[4], uc).unwrap_or(-ENOSYS),
        },
        // clone3 for processes: glibc falls back to clone on ENOSYS.
        Handler::Clone3 => thread::clone3(a[0], a[1], uc).unwrap_or(-ENOSYS),
        Handler::Fork => fork::fork(SIGCHLD, 0, 0, 0, 0, uc).unwrap_or(-ENOSYS),
        Handler::Vfork => fork::fork(CLONE_VM | CLONE_VFORK | SIGCHLD, 0, 0, 0, 0, uc).unwrap_or(-ENOSYS),
        Handler::Signalfd => signalfd::signalfd4(a[0], a[1], a[2], 0),
        Handler::Signalfd4 => signalfd::signalfd4(a[0], a[1], a[2], a[3]),
        Handler::Read if signalfd::is_signalfd(a[0]) => signalfd::read(a[0], a[1], a[2], uc),
        Handler::Read => return delegate::syscall(call, a, uc),
        Handler::CloseFds => return close_fds(call, a, uc),
        // GS is the LWK's: it finds each thread's slot through it.
        Handler::ArchPrctl if a[0] == ARCH_SET_GS || a[0] == ARCH_GET_GS => {
            lwk_rt::diag!("arch_prctl(ARCH_SET_GS/ARCH_GET_GS) is reserved by the LWK");
            -EPERM
        }
        Handler::ArchPrctl => passthrough(nr, a),
        Handler::Getppid => getppid(),
        Handler::Rlimit => return rlimit(nr, a),
        Handler::Credentials => return (credentials(nr, a), Ran::Delegated),
        // Not while the signal subsystem, which holds the timers, is saved
        // or restored.
        Handler::Itimer => {
            let _signals = signal::lock();
            passthrough(nr, a)
        }
    };
    (r, Local)
}

/// Descriptors going away may be signalfds, which the LWK forgets.
fn close_fds(call: &Syscall, a: [u64; 6], uc: &mut UContext) -> (i64, Ran) {
    let r = delegate::syscall(call, a, uc);
    if r.0 >= 0 {
        match call.nr as u64 {
            nr::CLOSE => signalfd::forget(a[0], a[0]),
            nr::CLOSE_RANGE if a[2] & CLOSE_RANGE_CLOEXEC == 0 => signalfd::forget(a[0], a[1]),
            nr::CLOSE_RANGE => {}
            // dup2, dup3: the target descriptor is replaced.
            _ if a[0] != a[1] => signalfd::forget(a[1], a[1]),
            _ => {}
        }
    }
    r
}

/// RLIMIT_NOFILE belongs to the proxy, which holds the descriptors; the
/// other limits to the application process.
fn rlimit(nr: u64, a: [u64; 6]) -> (i64, Ran) {
    match nr {
        nr::GETRLIMIT | nr::SETRLIMIT if a[0] == RLIMIT_NOFILE => (delegate::call(nr, a), Ran::Delegated),
        nr::PRLIMIT64 if a[1] == RLIMIT_NOFILE && (a[0] == 0 || a[0] as i32 == getpid()) => {
            (delegate::call(nr, [0, a[1], a[2], a[3], 0, 0]), Ran::Delegated)
        }
        _ => (passthrough(nr, a), Ran::Local),
    }
}

/// Credentials: the proxy opens files for the application, the
/// application process sends signals; both must change.
fn credentials(nr: u64, a: [u64; 6]) -> i64 {
    let r = delegate::call(nr, a);
    if r < 0 {
        return r;
    }
    let r = passthrough(nr, a);
    // A change of uid makes both processes non-dumpable, which closes each
    // one's /proc/PID/fd to the other (the LWK maps files through the
    // proxy's, the proxy mirrors the LWK's memfds). Keep them reachable, at
    // the cost of what non-dumpable protects: the new uid may read the
    // memory the old one left (ptrace, /proc/PID/mem).
    delegate::call(nr::PRCTL, [PR_SET_DUMPABLE, 1, 0, 0, 0, 0]);
    // SAFETY: changes only this process's dumpable flag.
    unsafe { syscall3(nr::PRCTL, PR_SET_DUMPABLE, 1, 0) };
    r
}

/// nanosleep, and clock_nanosleep: with the application's mask, as any
/// wait. A relative sleep that the LWK's own signal interrupts (a freeze)
/// runs again when the thread goes on, here or wherever the process is
/// restored: for the time it had left, as Linux's restart of an
/// interrupted sleep does, not for all of it again.
fn sleep(nr: u64, a: [u64; 6], uc: &UContext) -> i64 {
    const TIMER_ABSTIME: u64 = 1;
    const NS: u64 = 1_000_000_000;
    let (i, relative) = if nr == nr::NANOSLEEP { (0, true) } else { (2, a[1] & TIMER_ABSTIME == 0) };
    if !relative {
        return signal::with_app_mask(uc, || passthrough(nr, a));
    }
    let at = uc.gregs[crate::arch::REG_RIP];
    let mut args = a;
    // On this stack (the application's), where the call may read it; it
    // lives until the function returns.
    let left: [u64; 2];
    let total = match thread::take_sleep_left(at) {
        Some(ns) => {
            left = [ns / NS, ns % NS];
            args[i] = left.as_ptr() as u64;
            ns
        }
        // A request the kernel would refuse is the kernel's to refuse.
        None => match crate::uaccess::read_app::<2>(a[i]) {
            Ok([s, n]) if s < (i64::MAX as u64) / NS && n < NS => s * NS + n,
            _ => return signal::with_app_mask(uc, || passthrough(nr, a)),
        },
    };
    let t0 = monotonic_ns();
    let r = signal::with_app_mask(uc, || passthrough(nr, args));
    if r == -EINTR && thread::is_interrupted() {
        thread::note_sleep_left(at, total.saturating_sub(monotonic_ns().saturating_sub(t0)));
    }
    r
}

/// CLOCK_MONOTONIC, in nanoseconds.
pub(crate) fn monotonic_ns() -> u64 {
    const CLOCK_MONOTONIC: u64 = 1;
    let mut ts = [0u64; 2];
    // SAFETY: the kernel writes one timespec into our own array.
    unsafe { syscall3(nr::CLOCK_GETTIME, CLOCK_MONOTONIC, ts.as_mut_ptr() as u64, 0) };
    ts[0] * 1_000_000_000 + ts[1]
}

/// getppid(2). The first process's parent is the process that ran `lwk
/// run` (whose child it really is: `lwk run`, or `lwk restore` outside
/// its pid namespace, which getppid shows as 0). A forked process's is the
/// process that forked it (the recorded pid) until that one ends; then,
/// as natively, whoever it was given to (init, a subreaper, or in a
/// restored application the keeper of its pid namespace, 1).
fn getppid() -> i64 {
    let h = &control().header;
    let recorded = h.parent_pid.load(Relaxed);
    // SAFETY: plain getppid.
    let real = unsafe { syscall3(nr::GETPPID, 0, 0, 0) } as i32;
    if real == 0 || real == h.supervisor_pid.load(Relaxed) {
        recorded as i64
    } else {
        real as i64
    }
}
