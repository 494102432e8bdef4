//! System-call entry: Syscall User Dispatch sends every system call the
//! application makes from outside the LWK's text as SIGSYS to
//! [`lwk_sigsys`], which routes it by the one syscall table.

use core::arch::global_asm;
use core::sync::atomic::Ordering::Relaxed;

use lwk_abi::control::NR_SLOTS;
use lwk_abi::syscalls::{self, Class};
use lwk_rt::nr;
use lwk_rt::*;

use crate::mm::MM;
use crate::{control, delegate, signal, thread};

pub const REG_R8: usize = 0;
pub const REG_R9: usize = 1;
pub const REG_R10: usize = 2;
pub const REG_RDI: usize = 8;
pub const REG_RSI: usize = 9;
pub const REG_RDX: usize = 12;
pub const REG_RAX: usize = 13;
pub const REG_RSP: usize = 15;
pub const REG_RIP: usize = 16;

/// The kernel's `struct ucontext` on x86-64 (the parts we touch).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct UContext {
    pub flags: u64,
    pub link: u64,
    pub ss_sp: u64,
    pub ss_flags: u32,
    pub _pad: u32,
    pub ss_size: u64,
    pub gregs: [u64; 23],
    pub fpregs: u64,
    pub reserved: [u64; 8],
    /// The signal mask restored by rt_sigreturn: the application's mask.
    pub sigmask: u64,
}

const _: () = assert!(core::mem::offset_of!(UContext, sigmask) == 296);

impl UContext {
    pub const ZERO: UContext = UContext {
        flags: 0,
        link: 0,
        ss_sp: 0,
        ss_flags: 0,
        _pad: 0,
        ss_size: 0,
        gregs: [0; 23],
        fpregs: 0,
        reserved: [0; 8],
        sigmask: 0,
    };
}

pub const SIGSYS: u64 = 31;
const SA_SIGINFO: u64 = 4;
/// si_code of a SIGSYS from Syscall User Dispatch.
const SYS_USER_DISPATCH: i32 = 2;
const SA_RESTORER: u64 = 0x0400_0000;
const PR_SET_SYSCALL_USER_DISPATCH: u64 = 59;
const PR_SYS_DISPATCH_ON: u64 = 1;
const SYSCALL_DISPATCH_FILTER_BLOCK: u8 = 1;

// The signal return path must be inside the allowed region, or the
// rt_sigreturn would itself trap.
global_asm!(".globl lwk_restorer", "lwk_restorer:", "mov eax, 15", "syscall", "ud2",);

extern "C" {
    fn lwk_restorer();
    static __ehdr_start: u8;
    static etext: u8;
}

pub fn restorer_addr() -> u64 {
    lwk_restorer as *const () as u64
}

/// Read by the kernel on every system call of this thread.
static SELECTOR: core::sync::atomic::AtomicU8 = core::sync::atomic::AtomicU8::new(SYSCALL_DISPATCH_FILTER_BLOCK);

/// Install the SIGSYS handler and switch dispatch on for this thread.
pub fn enable() -> Result<(), i64> {
    let entry = crate::guard::sigsys_entry(lwk_sigsys as *const () as u64);
    let act: [u64; 4] = [entry, SA_SIGINFO | SA_RESTORER, restorer_addr(), !0];
    // SAFETY: act is a valid kernel sigaction for SIGSYS.
    let r = unsafe { syscall6(nr::RT_SIGACTION, SIGSYS, act.as_ptr() as u64, 0, 8, 0, 0) };
    if r < 0 {
        return Err(r);
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

#[derive(Clone, Copy, PartialEq, Eq)]
enum Ran {
    Local,
    Delegated,
}

/// The SIGSYS handler: one trapped system call.
///
/// # Safety
/// Called by the kernel with a valid ucontext.
#[no_mangle]
pub unsafe extern "C" fn lwk_sigsys(_sig: i32, info: *mut u8, ctx: *mut UContext) {
    // SAFETY: the kernel passes the frame it built for this signal.
    let uc = unsafe { &mut *ctx };
    // si_code: a trapped system call, or a SIGSYS someone sent (kill,
    // tgkill, a seccomp filter), which is the application's.
    // SAFETY: info points to the siginfo_t of this signal.
    let code = unsafe { (info.add(8) as *const i32).read() };
    thread::entered();
    if code != SYS_USER_DISPATCH {
        if !thread::take_stop_request() {
            signal::app_sigsys();
        }
        thread::leaving();
        return;
    }
    let g = &uc.gregs;
    let nr = g[REG_RAX];
    let a = [g[REG_RDI], g[REG_RSI], g[REG_RDX], g[REG_R10], g[REG_R8], g[REG_R9]];
    let t0 = rdtsc();
    let (ret, ran) = dispatch(nr, a, uc);
    let dt = rdtsc().wrapping_sub(t0);
    if (nr as usize) < NR_SLOTS {
        let s = &control().stats;
        let c = if ran == Ran::Local { &s.local[nr as usize] } else { &s.delegated[nr as usize] };
        c.add(dt);
    }
    uc.gregs[REG_RAX] = ret as u64;
    thread::leaving();
}

fn passthrough(nr: u64, a: [u64; 6]) -> i64 {
    // SAFETY: the application asked for exactly this call on its own
    // process; its pointers are checked by the kernel as natively, with the
    // LWK's memory out of reach.
    unsafe { crate::guard::syscall_for_app(nr, a) }
}

fn unsupported(nr: u64, why: &str) -> i64 {
    lwk_rt::diag!("{} is not supported yet ({}): returning ENOSYS", syscalls::name(nr as usize), why);
    -ENOSYS
}

const RLIMIT_NOFILE: u64 = 7;
const CLONE_VM_VFORK: u64 = 0x100 | 0x4000;
const SIGPIPE: u64 = 13;
const MSG_NOSIGNAL: u64 = 0x4000;
const CLOSE_RANGE_CLOEXEC: u64 = 4;

fn dispatch(nr: u64, a: [u64; 6], uc: &mut UContext) -> (i64, Ran) {
    use Ran::*;
    let local = |r: i64| (r, Local);
    match nr {
        nr::MMAP => local(MM.lock().mmap(a[0], a[1], a[2], a[3], a[4] as i64, a[5])),
        nr::MUNMAP => local(MM.lock().munmap(a[0], a[1])),
        nr::MPROTECT => local(MM.lock().mprotect(a[0], a[1], a[2])),
        nr::MREMAP => local(MM.lock().mremap(a[0], a[1], a[2], a[3], a[4])),
        nr::BRK => local(MM.lock().brk(a[0])),
        nr::MADVISE => local(MM.lock().madvise(a[0], a[1], a[2])),
        nr::RT_SIGACTION => local(signal::rt_sigaction(a[0], a[1], a[2], a[3])),
        nr::RT_SIGPROCMASK => local(signal::rt_sigprocmask(a[0], a[1], a[2], a[3], uc)),
        nr::RT_SIGSUSPEND => local(signal::rt_sigsuspend(a[0], a[1])),
        nr::PAUSE => local(signal::pause(uc)),
        // Blocking local calls: with the application's mask, so that a
        // signal runs its handler and interrupts them as natively.
        nr::NANOSLEEP | nr::CLOCK_NANOSLEEP | nr::RT_SIGTIMEDWAIT | 449 | 455 => {
            local(signal::with_app_mask(uc, || passthrough(nr, a)))
        }
        nr::FUTEX if matches!(a[1] & 0x7f, 0 | 6 | 9 | 11 | 13) => {
            local(signal::with_app_mask(uc, || passthrough(nr, a)))
        }
        nr::RT_SIGRETURN => {
            lwk_rt::diag!("rt_sigreturn from application code is not supported yet");
            exit_group(128 + SIGSYS as i32)
        }
        nr::EXIT_GROUP | nr::EXIT => {
            // Counted here: the call does not return to lwk_sigsys.
            let s = &control().stats;
            s.local[nr as usize].add(0);
            s.tsc_end.store(rdtsc(), Relaxed);
            if nr == nr::EXIT {
                thread::exit(a[0]);
            }
            local(passthrough(nr, a))
        }
        nr::EXECVE => local(crate::exec::execve(a[0], a[1], a[2], uc)),
        nr::EXECVEAT => local(crate::exec::execveat(a[0], a[1], a[2], a[3], a[4], uc)),
        nr::CLONE => match thread::clone(a[0], a[1], a[2], a[3], a[4], uc) {
            Some(r) => local(r),
            None => local(crate::fork::fork(a[0], a[1], a[2], a[3], a[4], uc).unwrap_or(-ENOSYS)),
        },
        // clone3 for processes: glibc falls back to clone on ENOSYS.
        nr::CLONE3 => local(thread::clone3(a[0], a[1], uc).unwrap_or(-ENOSYS)),
        nr::FORK => local(crate::fork::fork(17 /* SIGCHLD */, 0, 0, 0, 0, uc).unwrap_or(-ENOSYS)),
        nr::VFORK => {
            let flags = CLONE_VM_VFORK | 17;
            local(crate::fork::fork(flags, 0, 0, 0, 0, uc).unwrap_or(-ENOSYS))
        }
        nr::SIGNALFD => local(crate::signalfd::signalfd4(a[0], a[1], a[2], 0)),
        nr::SIGNALFD4 => local(crate::signalfd::signalfd4(a[0], a[1], a[2], a[3])),
        nr::READ if crate::signalfd::is_signalfd(a[0]) => local(crate::signalfd::read(a[0], a[1], a[2], uc)),
        // Descriptors going away may be signalfds, which the LWK forgets.
        nr::CLOSE | nr::DUP2 | nr::DUP3 | nr::CLOSE_RANGE => {
            let r = delegated(nr, a, uc);
            if r.0 >= 0 {
                match nr {
                    nr::CLOSE => crate::signalfd::forget(a[0], a[0]),
                    nr::CLOSE_RANGE if a[2] & CLOSE_RANGE_CLOEXEC == 0 => crate::signalfd::forget(a[0], a[1]),
                    nr::CLOSE_RANGE => {}
                    _ if a[0] != a[1] => crate::signalfd::forget(a[1], a[1]),
                    _ => {}
                }
            }
            r
        }
        // GS is the LWK's: it finds each thread's slot through it.
        nr::ARCH_PRCTL if a[0] == 0x1001 || a[0] == 0x1004 => {
            lwk_rt::diag!("arch_prctl(ARCH_SET_GS/ARCH_GET_GS) is reserved by the LWK");
            local(-EPERM)
        }
        // The process that ran `lwk run` is the application's parent.
        nr::GETPPID => local(control().header.parent_pid.load(Relaxed) as i64),
        nr::GETRLIMIT | nr::SETRLIMIT if a[0] == RLIMIT_NOFILE => (delegate::call(nr, a), Delegated),
        nr::PRLIMIT64 if a[1] == RLIMIT_NOFILE && (a[0] == 0 || a[0] as i32 == getpid()) => {
            (delegate::call(nr, [0, a[1], a[2], a[3], 0, 0]), Delegated)
        }
        nr::GETRLIMIT | nr::SETRLIMIT | nr::PRLIMIT64 => local(passthrough(nr, a)),
        // Credentials: the proxy opens files for the application, the
        // application process sends signals; both must change.
        105 | 106 | 113 | 114 | 116 | 117 | 119 | 122 | 123 | 126 => {
            let r = delegate::call(nr, a);
            if r < 0 {
                return (r, Delegated);
            }
            let r = passthrough(nr, a);
            // A change of uid makes both processes non-dumpable, which
            // closes each one's /proc/PID/fd to the other (the LWK maps
            // files through the proxy's, the proxy mirrors the LWK's
            // memfds). Keep them reachable, at the cost of what
            // non-dumpable protects: the new uid may read the memory the
            // old one left (ptrace, /proc/PID/mem).
            const PR_SET_DUMPABLE: u64 = 4;
            delegate::call(nr::PRCTL, [PR_SET_DUMPABLE, 1, 0, 0, 0, 0]);
            // SAFETY: changes only this process's dumpable flag.
            unsafe { syscall3(nr::PRCTL, PR_SET_DUMPABLE, 1, 0) };
            (r, Delegated)
        }
        // Job control and children act on the application process itself.
        nr::WAIT4 | nr::WAITID | 109 | 112 => local(passthrough(nr, a)),
        // Calls whose pid argument names the application process, which
        // is this process: correct when done here.
        438 | 310 | 311 | 312 | 440 | 448 | 172 | 173 | 335 | 336 => local(passthrough(nr, a)),
        _ => match syscalls::class(nr as usize) {
            None => local(-ENOSYS),
            Some(Class::Local) => local(passthrough(nr, a)),
            Some(Class::Special(why)) => local(unsupported(nr, why)),
            Some(Class::Delegated) if crate::procfs::names_proc(nr, &a) => delegated_proc(nr, a, uc),
            Some(Class::Delegated) => delegated(nr, a, uc),
        },
    }
}

/// A delegated call, and the SIGPIPE Linux would raise with its EPIPE.
fn delegated(nr: u64, a: [u64; 6], uc: &mut UContext) -> (i64, Ran) {
    let r = delegate_interruptible(nr, a, uc);
    if r == -EPIPE && raises_sigpipe(nr, a) {
        // The proxy ignores SIGPIPE; the application gets it as it would
        // natively (delivered when we return).
        // SAFETY: signals this process's own thread.
        unsafe { syscall3(nr::TGKILL, getpid() as u64, gettid() as u64, SIGPIPE) };
    }
    (r, Ran::Delegated)
}

/// A delegated call whose path is under /proc: /proc/self must name the
/// application, not the proxy (see procfs). Kept out of line so that its
/// path buffer is on the stack only for these calls.
#[inline(never)]
fn delegated_proc(nr: u64, mut a: [u64; 6], uc: &mut UContext) -> (i64, Ran) {
    // On this (the application's) stack, where the proxy sees it.
    let mut path = crate::procfs::Rewrite { buf: [0; 4096] };
    match crate::procfs::rewrite(nr, &a, &mut path) {
        crate::procfs::Outcome::Done(r) => return (r, Ran::Local),
        crate::procfs::Outcome::Path(i) => a[i] = path.buf.as_ptr() as u64,
        crate::procfs::Outcome::Unchanged => {}
    }
    delegated(nr, a, uc)
}

/// Calls Linux never restarts after a signal handler (signal(7)).
fn never_restarted(nr: u64) -> bool {
    matches!(nr, 7 | 23 | 270 | 271 | 232 | 281 | 441 | 35 | 230 | 69 | 70 | 65 | 220 | 208 | 128 | 34 | 130)
}

/// A delegated call that a signal may interrupt. The proxy's call returns
/// EINTR when a terminal signal (or the supervisor's nudge) arrives; the
/// application's own copy of the signal is pending here, blocked while the
/// LWK runs. As Linux does: if a handler without SA_RESTART will run (or
/// the call is never restarted), the application gets EINTR; otherwise the
/// call is restarted after the signal, by returning to the `syscall`
/// instruction. An EINTR for no signal of the application's is repeated.
fn delegate_interruptible(nr: u64, a: [u64; 6], uc: &mut UContext) -> i64 {
    // ppoll, pselect6 and epoll_pwait(2) wait with a mask of their own.
    let call_mask = signal::call_sigmask(nr, a);
    let mask = call_mask.unwrap_or(uc.sigmask);
    loop {
        let r = delegate::call_interruptible(nr, a, mask);
        if r != -EINTR {
            return r;
        }
        let pending = signal::pending() & !mask;
        if pending == 0 {
            continue;
        }
        if let Some(m) = call_mask {
            // As Linux does: the handlers run with the call's mask, and the
            // application's own mask is back when they return.
            signal::run_handlers_with(m);
            return -EINTR;
        }
        if never_restarted(nr) || signal::any_without_restart(pending) {
            return -EINTR;
        }
        uc.gregs[REG_RIP] -= 2; // back onto the 2-byte `syscall`
        return nr as i64; // rax must hold the number again
    }
}

fn raises_sigpipe(nr: u64, a: [u64; 6]) -> bool {
    match nr {
        nr::SENDTO | nr::SENDMSG | nr::SENDMMSG => {
            let flags = if nr == nr::SENDTO { a[3] } else { a[2] };
            flags & MSG_NOSIGNAL == 0
        }
        nr::WRITE
        | nr::WRITEV
        | nr::PWRITE64
        | nr::PWRITEV
        | nr::PWRITEV2
        | nr::SPLICE
        | nr::VMSPLICE
        | nr::SENDFILE => true,
        _ => false,
    }
}

pub fn gettid() -> i32 {
    // SAFETY: no arguments.
    unsafe { syscall3(nr::GETTID, 0, 0, 0) as i32 }
}
