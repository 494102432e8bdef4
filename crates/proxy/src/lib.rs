//! The proxy: the Linux side of delegation (McKernel's mcexec).
//!
//! It is a freestanding process, started from the same image as the LWK,
//! whose lower address space holds nothing but the application's memory,
//! mapped at the same addresses from the LWK's memfds. It owns every file
//! descriptor of the application and executes each delegated system call
//! with the application's raw arguments. Because nothing of the proxy's own
//! lives in the application's range, a bad pointer faults here exactly as it
//! would in the application: EFAULT, never a read of proxy memory.
#![cfg_attr(not(test), no_std)]

use core::sync::atomic::AtomicBool;
use core::sync::atomic::Ordering::{Acquire, Relaxed, Release, SeqCst};

use lwk_abi::control::{
    Channel, Control, MapOp, CH_DONE, CH_REQUEST, OP_MAP, OP_MOVE, OP_PROTECT, OP_UNMAP, REQ_EXEC_RESET, REQ_FORK,
    REQ_NEW_WORKER, REQ_SYNC, SRC_APP_FD, SRC_APP_FD_PRIVATE, SRC_LWK_FD_PRIVATE,
};
use lwk_abi::layout::CONTROL_ADDR;
use lwk_rt::nr;
use lwk_rt::*;

mod guard;
mod workers;

fn control() -> &'static Control {
    // SAFETY: mapped by `run`'s caller before anything else.
    unsafe { &*(CONTROL_ADDR as *const Control) }
}

const SIGHUP: u64 = 1;
const SIGINT: u64 = 2;
const SIGQUIT: u64 = 3;
const SIGPIPE: u64 = 13;
const SIGTERM: u64 = 15;
const SIGTSTP: u64 = 20;
const SIGTTIN: u64 = 21;
const SIGTTOU: u64 = 22;
const SIGWINCH: u64 = 28;
const SIG_IGN: u64 = 1;
const SA_ONSTACK: u64 = 0x0800_0000;
const SA_RESTORER: u64 = 0x0400_0000;

extern "C" {
    /// `mov eax, 15; syscall`, defined by the LWK (crates/kernel/src/trap.rs).
    fn lwk_restorer();
}

/// Interrupts a blocking call; nothing else.
extern "C" fn interrupt(_sig: i32) {}

/// Signal set-up of the proxy. A broken pipe becomes EPIPE here and
/// SIGPIPE in the application. Signals sent to the whole process group,
/// which the proxy shares with the application (terminal signals, a
/// hang-up, a batch system's SIGTERM), are the application's: the proxy
/// ignores them, and the LWK of the thread they reach interrupts that
/// thread's worker with NUDGE_SIGNAL, the one signal that interrupts a
/// worker's call; the LWK then lets the signal run and restarts or fails the
/// call as Linux would. SIGTTIN and SIGTTOU also interrupt: the kernel sends
/// them when the worker touches the terminal from a background group, and
/// the call must come back to the (now stopped) application. The handler
/// runs on an alternate stack outside the protection key, because the
/// kernel enters handlers with the default PKRU, which denies the proxy's
/// key.
pub(crate) fn setup_signals() {
    let ign = [SIG_IGN, 0, 0, 0u64];
    // Forked proxies are reaped by the kernel: nobody waits for them.
    const SIGCHLD: u64 = 17;
    for sig in [SIGPIPE, SIGCHLD, SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGTSTP, SIGWINCH] {
        // SAFETY: a valid kernel sigaction.
        unsafe { syscall6(nr::RT_SIGACTION, sig, ign.as_ptr() as u64, 0, 8, 0, 0) };
    }
    guard::setup_altstack();
    let act = [interrupt as *const () as u64, SA_ONSTACK | SA_RESTORER, lwk_restorer as *const () as u64, !0u64];
    for sig in [SIGTTIN, SIGTTOU, lwk_abi::control::NUDGE_SIGNAL] {
        // SAFETY: a valid kernel sigaction with a restorer in our text.
        unsafe { syscall6(nr::RT_SIGACTION, sig, act.as_ptr() as u64, 0, 8, 0, 0) };
    }
}

/// Serve the application until it is gone. The supervisor kills the proxy
/// when the application exits.
pub fn run() -> ! {
    let protect = guard::protect_own_memory();
    if let Err(why) = protect {
        if ctl_verbose() {
            lwk_rt::diag!(
                "proxy: no memory protection keys ({}): pointers into the upper half reach proxy memory",
                why
            );
        }
    }
    // SAFETY: guard gave us a fresh stack (or none); serve never returns.
    unsafe { guard::switch_stack(serve_main) }
}

fn ctl_verbose() -> bool {
    control().header.options.load(Relaxed) & lwk_abi::control::OPT_VERBOSE != 0
}

extern "C" fn serve_main() -> ! {
    setup_signals();
    control().header.proxy_pid.store(getpid(), Release);
    workers::spawn_watcher();
    serve(0)
}

/// Serve channel `slot` (one application thread) until told to stop.
fn serve(slot: usize) -> ! {
    let ctl = control();
    let ch = &ctl.channels[slot];
    // SAFETY: no arguments.
    ch.server_tid.store(unsafe { syscall3(nr::GETTID, 0, 0, 0) } as i32, Release);
    // The credentials this thread took from the control region (a restore
    // hands the application's over once the LWK no longer needs root's).
    let mut credentials = 0;
    loop {
        wait_request(ch, ctl.header.spin_cycles.load(Relaxed));
        take_handed_credentials(&ctl.header.proxy_credentials, &mut credentials);
        apply_map_log(ctl);
        let nr = ch.nr.load(Relaxed);
        let a: [u64; 6] = core::array::from_fn(|i| ch.args[i].load(Relaxed));
        let ret = match nr {
            REQ_SYNC => 0,
            REQ_NEW_WORKER => workers::spawn(a[0] as usize),
            REQ_EXEC_RESET => exec_reset(),
            REQ_FORK => fork_proxy(a[0] as i32, a[1] as i32),
            // SAFETY: the generic path: the application's own call with its
            // raw arguments, in a process whose only user memory below
            // APP_END is the application's, and whose own memory is locked
            // by its protection key for the duration of the call.
            _ => unsafe { guard::guarded_syscall(nr, a) },
        };
        ch.ret.store(ret, Relaxed);
        ch.state.store(CH_DONE, SeqCst);
        if ch.client_sleeping.load(SeqCst) != 0 {
            futex_wake(&ch.state, 1);
        }
    }
}

/// A proxy whose application is gone has nothing left to do. (The
/// supervisor kills the first proxy; those of forked children notice here.)
fn exit_if_orphaned() {
    let app = control().header.app_pid.load(Acquire);
    if process_gone(app) {
        exit_group(0);
    }
}

fn wait_request(ch: &Channel, spin: u64) {
    let mut wait = SpinWait::new(spin);
    while ch.state.load(Acquire) != CH_REQUEST {
        if !wait.spin() {
            ch.server_sleeping.store(1, SeqCst);
            // Sleep only on the value just seen: re-reading it here would
            // miss a request posted in between (whose wake-up came before
            // this wait) and sleep on it forever.
            let seen = ch.state.load(SeqCst);
            if seen != CH_REQUEST && futex_wait_timeout(&ch.state, seen, 1_000_000_000) == -ETIMEDOUT {
                exit_if_orphaned();
            }
            ch.server_sleeping.store(0, Relaxed);
            wait.restart();
        }
    }
}

/// The application forks: so does the proxy, here, in the worker of the
/// forking thread (the only thread the child proxy will have). The child
/// proxy holds a copy of the application's descriptor table, as the
/// application's child must; it takes the child's control region and
/// serves its main thread. The parent proxy answers the child's pid.
fn fork_proxy(ctl_fd: i32, app_pid: i32) -> i64 {
    const SIGCHLD: u64 = 17;
    // SAFETY: a plain fork of this process.
    let pid = unsafe { syscall6(nr::CLONE, SIGCHLD, 0, 0, 0, 0, 0) };
    if pid != 0 {
        return pid;
    }
    let mut path = [0u8; 64];
    let n = lwk_rt::out::proc_fd_path(&mut path, app_pid, ctl_fd);
    let fd = open(&path[..n], O_RDWR | O_CLOEXEC, 0);
    // In place of the inherited mapping of the parent's region.
    let r = if fd < 0 { fd } else { map_control(fd as i32, true) };
    if r < 0 {
        exit_group(125);
    }
    close(fd as i32);
    guard::retag_control();
    // Only this thread exists here: no other worker, no lock holder.
    MAP_LOG_LOCK.store(false, Release);
    workers::reset_for_fork();
    control().header.proxy_pid.store(getpid(), Release);
    workers::spawn_watcher();
    serve(0)
}

/// The application ran execve: its old memory is gone, and so are its
/// close-on-exec descriptors, which live here.
fn exec_reset() -> i64 {
    use lwk_abi::layout::{APP_END, APP_START};
    // SAFETY: the application's range holds nothing of the proxy's own.
    let r = unsafe { munmap(APP_START, APP_END - APP_START) };
    if r < 0 {
        return r;
    }
    close_cloexec_fds()
}

/// Close every descriptor marked close-on-exec, found in /proc/self/fd.
fn close_cloexec_fds() -> i64 {
    const FD_CLOEXEC: i64 = 1;
    let dir = open(b"/proc/self/fd\0", O_RDONLY | O_CLOEXEC | 0o200000 /* O_DIRECTORY */, 0);
    if dir < 0 {
        return dir;
    }
    let mut buf = [0u8; 4096];
    loop {
        // SAFETY: buf is ours.
        let n = unsafe { syscall3(nr::GETDENTS64, dir as u64, buf.as_mut_ptr() as u64, buf.len() as u64) };
        if n <= 0 {
            close(dir as i32);
            return n.min(0);
        }
        let mut at = 0usize;
        while at < n as usize {
            // linux_dirent64: ino u64, off i64, reclen u16, type u8, name.
            let reclen = u16::from_le_bytes([buf[at + 16], buf[at + 17]]) as usize;
            let name = &buf[at + 19..at + reclen];
            let name = &name[..name.iter().position(|&c| c == 0).unwrap_or(name.len())];
            if let Some(fd) = lwk_rt::out::parse_u64(name) {
                let fd = fd as i32;
                // SAFETY: querying and closing descriptors of our own table.
                if fd != dir as i32 && unsafe { syscall3(nr::FCNTL, fd as u64, F_GETFD, 0) } & FD_CLOEXEC != 0 {
                    close(fd);
                }
            }
            at += reclen;
        }
    }
}

/// Workers share the map log: one drains it at a time.
static MAP_LOG_LOCK: AtomicBool = AtomicBool::new(false);

/// Mirror every address-space change the LWK made since the last request.
fn apply_map_log(ctl: &Control) {
    if ctl.maplog.tail.load(Acquire) == ctl.maplog.head.load(Acquire) {
        return;
    }
    while MAP_LOG_LOCK.compare_exchange_weak(false, true, Acquire, Relaxed).is_err() {
        cpu_relax();
    }
    drain_map_log(ctl);
    MAP_LOG_LOCK.store(false, Release);
}

fn drain_map_log(ctl: &Control) {
    let mut memfd = [-1i32; 3];
    // SAFETY: the proxy is the only reader of the map log.
    unsafe {
        ctl.maplog.drain(|op| {
            let r = apply(ctl, op, &mut memfd);
            if r < 0 {
                ctl.header.mirror_error.store(-r as i32, Relaxed);
                lwk_rt::diag!(
                    "proxy: cannot mirror application memory at {:#x}+{:#x} (op {}): error {}",
                    op.addr,
                    op.len,
                    op.kind,
                    -r
                );
            }
        })
    };
    for fd in memfd {
        if fd >= 0 {
            close(fd);
        }
    }
}

/// # Safety
/// `op` comes from the LWK and names application memory only.
unsafe fn apply(ctl: &Control, op: &MapOp, memfd: &mut [i32; 3]) -> i64 {
    // SAFETY: every range is inside the application's range, where the
    // proxy has nothing of its own.
    unsafe {
        match op.kind {
            OP_MAP => match op.source {
                SRC_APP_FD => mmap(op.addr, op.len, op.prot as u64, MAP_SHARED | MAP_FIXED, op.fd, op.offset),
                SRC_APP_FD_PRIVATE => mmap(op.addr, op.len, op.prot as u64, MAP_PRIVATE | MAP_FIXED, op.fd, op.offset),
                SRC_LWK_FD_PRIVATE => {
                    let fd = open_in_app(ctl, op.fd, O_RDONLY);
                    if fd < 0 {
                        return fd;
                    }
                    let r = mmap(op.addr, op.len, op.prot as u64, MAP_PRIVATE | MAP_FIXED, fd as i32, op.offset);
                    close(fd as i32);
                    r
                }
                src => {
                    let Some(k) = lwk_abi::control::memfd_slot(src) else { return -EINVAL };
                    if memfd[k] < 0 {
                        // Opened per batch and closed after it: the
                        // application's fd table never sees it.
                        let fd = open_in_app(ctl, ctl.header.memfd[k].load(Acquire), O_RDWR);
                        if fd < 0 {
                            return fd;
                        }
                        memfd[k] = fd as i32;
                    }
                    mmap(op.addr, op.len, op.prot as u64, MAP_SHARED | MAP_FIXED, memfd[k], op.offset)
                }
            },
            OP_UNMAP => munmap(op.addr, op.len),
            OP_PROTECT => mprotect(op.addr, op.len, op.prot as u64),
            OP_MOVE => syscall6(nr::MREMAP, op.addr, op.len, op.len, MREMAP_MAYMOVE | MREMAP_FIXED, op.offset, 0),
            _ => -EINVAL,
        }
    }
}

/// Open a descriptor of the application process through /proc.
fn open_in_app(ctl: &Control, fd: i32, flags: u64) -> i64 {
    let mut path = [0u8; 64];
    let n = lwk_rt::out::proc_fd_path(&mut path, ctl.header.app_pid.load(Acquire), fd);
    open(&path[..n], flags | O_CLOEXEC, 0)
}
