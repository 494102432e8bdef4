//! fork, vfork, and clone without CLONE_THREAD: a new application process.
//!
//! The application's memory is shared memfd memory, so a plain kernel
//! fork would leave parent and child sharing it. Instead:
//! 1. the parent makes a control region for the child and asks its proxy
//!    to fork too: the proxy's child holds a copy of the application's file
//!    descriptor table, as the application's child must;
//! 2. the parent forks itself; the child starts on an LWK stack (private
//!    after the fork), takes the new control region, gives every piece of
//!    LWK memory a private copy in new memfds (`Mm::fork_copy`), has its
//!    proxy mirror them, and enters the application with fork's 0;
//! 3. the parent waits until the child says the copy is done, so the
//!    memory it copies does not change under it.
//!
//! vfork and clone(CLONE_VM|CLONE_VFORK) (posix_spawn) copy nothing: the
//! child shares the parent's memory as natively (LWK memory is shared memfd
//! memory, and the LWK's own memory is private after the kernel's fork) and
//! the kernel holds the parent until the child execs or exits
//! (CLONE_VFORK). One thing differs from Linux: the parent is not in the
//! kernel but in the LWK's SIGSYS handler, whose frames lie on the
//! application's stack just below the child's starting stack pointer,
//! where the child's own calls will write. So the parent saves that piece
//! of stack, waits for the child on a private stack, and puts the piece
//! back before it returns. A vfork child that changes its address space
//! (mmap, munmap...) first gets a private copy of everything, as after fork.

use core::arch::asm;
use core::cell::UnsafeCell;
use core::sync::atomic::Ordering::*;

use lwk_abi::control::{Control, CONTROL_MAGIC, CONTROL_SIZE, REQ_FORK};
use lwk_abi::layout::CHILD_CONTROL_ADDR;
use lwk_rt::nr;
use lwk_rt::thread::*;
use lwk_rt::*;

use crate::arch::{UContext, REG_RAX, REG_RSP};
use crate::boot::CTL_FD;
use crate::mm::MM;
use crate::sync::SpinLock;
use crate::{control, delegate, thread};

const STACK_SIZE: usize = 64 << 10;

const FORK_DONE: u32 = 1;
const FORK_FAILED: u32 = 2;

struct ForkStart {
    uc: UContext,
    ctl_fd: i32,
    /// vfork: the child shares the parent's memory.
    share: bool,
    stack: [u8; STACK_SIZE],
}

static START: SpinLock<ForkStart> =
    SpinLock::new(ForkStart { uc: UContext::ZERO, ctl_fd: -1, share: false, stack: [0; STACK_SIZE] });

/// The most of the parent's stack a vfork saves (its SIGSYS frame with
/// the FPU state, and the LWK's frames below); more falls back to a copy.
const VFORK_SAVE: usize = 64 << 10;

/// A vfork parent's saved stack piece, and the private stack it waits on.
/// Used under the START lock.
struct VforkParent {
    saved: UnsafeCell<[u8; VFORK_SAVE]>,
    stack: UnsafeCell<[u8; STACK_SIZE]>,
}
// SAFETY: only used by the thread holding the START lock.
unsafe impl Sync for VforkParent {}
static VFORK: VforkParent =
    VforkParent { saved: UnsafeCell::new([0; VFORK_SAVE]), stack: UnsafeCell::new([0; STACK_SIZE]) };

/// What the parent's private-stack part of a vfork needs.
#[repr(C)]
struct VforkCall {
    flags: u64,
    child_top: u64,
    ptid: u64,
    ctid: u64,
    tls: u64,
    /// The piece of application stack to put back: [from, from + len).
    from: u64,
    len: u64,
}

/// Flags this path understands (beyond the exit signal in the low byte).
const OK_FLAGS: u64 =
    CLONE_VM | CLONE_VFORK | CLONE_CHILD_SETTID | CLONE_CHILD_CLEARTID | CLONE_PARENT_SETTID | CLONE_SETTLS;

pub fn fork(flags: u64, newsp: u64, ptid: u64, ctid: u64, tls: u64, uc: &UContext) -> Option<i64> {
    if flags & CLONE_THREAD != 0 {
        return None;
    }
    if flags & !(OK_FLAGS | 0xff) != 0 {
        lwk_rt::diag!("clone with flags {:#x} is not supported yet: returning ENOSYS", flags);
        return Some(-ENOSYS);
    }
    Some(match fork_inner(flags, newsp, ptid, ctid, tls, uc) {
        Ok(pid) => pid,
        Err(e) => e,
    })
}

fn fork_inner(flags: u64, newsp: u64, ptid: u64, ctid: u64, tls: u64, uc: &UContext) -> Result<i64, i64> {
    // vfork shares the memory if the piece of stack the child may
    // overwrite (see below) fits the save area, with room for the frames
    // still to come.
    let app_sp = uc.gregs[REG_RSP];
    let deepest = stack_pointer() - 8192;
    let share = flags & (CLONE_VM | CLONE_VFORK) == CLONE_VM | CLONE_VFORK
        && app_sp > deepest
        && app_sp - deepest <= VFORK_SAVE as u64;
    // A copy stops the other threads: not while a freeze does. The fork
    // then gives way, and runs again after it.
    let _claim = if share {
        None
    } else {
        match thread::claim_stop_for_fork() {
            Some(c) => Some(c),
            None => {
                thread::mark_interrupted();
                return Err(-EINTR);
            }
        }
    };
    // The child's control region, prepared here.
    // SAFETY: the name is NUL-terminated; not close-on-exec: the child keeps
    // it across its own execs.
    let cfd = unsafe { syscall3(nr::MEMFD_CREATE, c"lwk-control".as_ptr() as u64, 0, 0) };
    if cfd < 0 {
        return Err(cfd);
    }
    let cfd = cfd as i32;
    let r = prepare_child_control(cfd);
    if let Err(e) = r {
        close(cfd);
        return Err(e);
    }
    // SAFETY: mapped by prepare_child_control, unmapped before returning.
    let child_ctl = unsafe { &*(CHILD_CONTROL_ADDR as *const Control) };
    let result = (|| {
        let proxy = delegate::call(REQ_FORK, [cfd as u64, getpid() as u64, 0, 0, 0, 0]);
        if proxy < 0 {
            return Err(proxy);
        }
        child_ctl.header.proxy_pid.store(proxy as i32, Release);
        let mut start = START.lock();
        start.uc = *uc;
        start.uc.gregs[REG_RAX] = 0;
        if newsp != 0 {
            start.uc.gregs[REG_RSP] = newsp;
        }
        start.ctl_fd = cfd;
        let top = (start.stack.as_ptr() as u64 + STACK_SIZE as u64) & !15;
        // The kernel's part: a plain fork (never CLONE_VM: LWK memory must
        // be the child's own), with the settid/cleartid/tls the caller
        // asked for; vfork also keeps the parent waiting (CLONE_VFORK).
        let kflags = flags & (CLONE_CHILD_SETTID | CLONE_CHILD_CLEARTID | CLONE_PARENT_SETTID | CLONE_SETTLS | 0xff);
        // The piece of stack the vfork child may overwrite: from a little
        // below where we are now up to the application's stack pointer.
        let here = stack_pointer() - 512;
        if share && app_sp - here > VFORK_SAVE as u64 {
            return Err(-ENOMEM); // the frames went deeper than `deepest` allowed for
        }
        start.share = share;
        // A copy must be a snapshot: the other threads wait meanwhile.
        if !share {
            thread::stop_others();
        }
        let pid = if share {
            let call = VforkCall {
                flags: kflags | CLONE_VFORK,
                child_top: top,
                ptid,
                ctid,
                tls,
                from: here,
                len: app_sp - here,
            };
            // SAFETY: [here, app_sp) is this thread's stack (the trapped
            // context and the LWK's frames), readable; VFORK is ours under
            // the START lock.
            unsafe {
                core::ptr::copy_nonoverlapping(here as *const u8, VFORK.saved.get() as *mut u8, call.len as usize);
                let ptop = (VFORK.stack.get() as u64 + STACK_SIZE as u64) & !15;
                on_stack(ptop, vfork_and_restore, &call as *const VforkCall as u64) as i64
            }
        } else {
            // SAFETY: the child starts on the LWK stack in START, which is
            // private to it after the fork (LWK memory is the image's, not
            // a shared memfd); the pointers are the application's own.
            unsafe { spawn(kflags, top, ptid, ctid, tls, child_start, 0) }
        };
        drop(start);
        if pid < 0 {
            // The child proxy would wait for an application that never comes.
            // SAFETY: signals the proxy we just had forked.
            unsafe { syscall3(nr::KILL, proxy as u64, 9, 0) };
            if !share {
                thread::resume_others();
            }
            return Err(pid);
        }
        let r = wait_for_child(child_ctl, pid as i32);
        if !share {
            thread::resume_others();
        }
        r?;
        Ok(pid)
    })();
    // SAFETY: our own temporary mapping.
    unsafe { munmap(CHILD_CONTROL_ADDR, CONTROL_SIZE as u64) };
    close(cfd);
    result
}

fn stack_pointer() -> u64 {
    let sp: u64;
    // SAFETY: reads a register.
    unsafe { asm!("mov {}, rsp", out(reg) sp, options(nomem, nostack, preserves_flags)) };
    sp
}

/// Call `f(arg)` on the stack whose top is `top`, and come back.
///
/// # Safety
/// The stack is free and large enough for `f`.
unsafe fn on_stack(top: u64, f: extern "C" fn(u64) -> u64, arg: u64) -> u64 {
    let r: u64;
    // SAFETY: r12 is callee-saved, so it holds our stack pointer across the
    // call; the new stack is 16-aligned as the ABI wants at a call.
    unsafe {
        asm!(
            "mov r12, rsp",
            "mov rsp, {top}",
            "call {f}",
            "mov rsp, r12",
            top = in(reg) top,
            f = in(reg) f,
            inout("r12") 0u64 => _,
            inout("rdi") arg => _,
            lateout("rax") r,
            clobber_abi("C"),
        )
    };
    r
}

/// The parent's side of a vfork, on its private stack: start the child,
/// which runs on the shared memory until it execs or exits while the
/// kernel holds us here, then put back the piece of stack it overwrote.
extern "C" fn vfork_and_restore(arg: u64) -> u64 {
    // SAFETY: arg is the VforkCall on the caller's frame, which waits. It
    // is read before the child runs: the child overwrites that frame.
    let c = unsafe { (arg as *const VforkCall).read() };
    // SAFETY: as for fork's spawn; the child no longer runs on this
    // memory when the call returns (CLONE_VFORK).
    let pid = unsafe { spawn(c.flags, c.child_top, c.ptid, c.ctid, c.tls, child_start, 0) };
    // SAFETY: the saved bytes go back where they came from.
    unsafe { core::ptr::copy_nonoverlapping(VFORK.saved.get() as *const u8, c.from as *mut u8, c.len as usize) };
    pid as u64
}

/// Size the child's control memfd, map it here and fill in its header
/// from ours.
fn prepare_child_control(cfd: i32) -> Result<(), i64> {
    // SAFETY: ftruncate and a mapping of our own new memfd in the LWK's
    // scratch area.
    unsafe {
        let r = syscall3(nr::FTRUNCATE, cfd as u64, CONTROL_SIZE as u64, 0);
        if r < 0 {
            return Err(r);
        }
        let r = mmap(CHILD_CONTROL_ADDR, CONTROL_SIZE as u64, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, cfd, 0);
        if r < 0 {
            return Err(r);
        }
    }
    // SAFETY: just mapped.
    let c = unsafe { &*(CHILD_CONTROL_ADDR as *const Control) };
    let h = &control().header;
    c.header.options.store(h.options.load(Relaxed), Relaxed);
    c.header.spin_cycles.store(h.spin_cycles.load(Relaxed), Relaxed);
    c.header.selftest_restore.store(h.selftest_restore.load(Relaxed), Relaxed);
    c.header.partition.copy_from(&h.partition);
    c.header.supervisor_pid.store(h.supervisor_pid.load(Relaxed), Relaxed);
    // The child's parent is this process.
    c.header.parent_pid.store(getpid(), Relaxed);
    c.header.memfd[0].store(-1, Relaxed);
    c.header.memfd[1].store(-1, Relaxed);
    c.header.magic.store(CONTROL_MAGIC, Release);
    Ok(())
}

/// Wait until the child has its own memory, or is gone.
fn wait_for_child(c: &Control, pid: i32) -> Result<(), i64> {
    let state = &c.header.fork_state;
    loop {
        let s = state.load(Acquire);
        if s == FORK_DONE {
            return Ok(());
        }
        if s == FORK_FAILED {
            return Err(-ENOMEM);
        }
        futex_wait_timeout(state, s, 10_000_000);
        // A child that died before it was done (killed, say).
        let mut info = [0u64; 16];
        const P_PID: u64 = 1;
        const WEXITED: u64 = 4;
        const WNOHANG: u64 = 1;
        const WNOWAIT: u64 = 0x0100_0000;
        // SAFETY: info is ours; WNOWAIT leaves the child to the application.
        let r = unsafe {
            syscall6(nr::WAITID, P_PID, pid as u64, info.as_mut_ptr() as u64, WEXITED | WNOHANG | WNOWAIT, 0, 0)
        };
        // ECHILD: already reaped (the application ignores SIGCHLD).
        if r == -ECHILD || (r == 0 && info[1] as u32 != 0 && state.load(Acquire) != FORK_DONE) {
            // si_pid set: it has exited. fork succeeded as far as the
            // application can tell; the child's exit status says the rest.
            return Ok(());
        }
    }
}

/// The child, on the LWK fork stack, with every signal blocked.
extern "C" fn child_start(_: u64) -> ! {
    // SAFETY: this thread is the only one in the new process.
    unsafe {
        START.force_unlock();
        crate::persist::unlock_in_forked_child();
    }
    let (uc, cfd, share) = {
        let s = START.lock();
        (s.uc, s.ctl_fd, s.share)
    };
    // Take the child's control region in place of the parent's.
    if map_control(cfd, true) < 0 {
        exit_group(125);
    }
    crate::guard::retag_control();
    let old = CTL_FD.swap(cfd, Relaxed);
    if old >= 0 {
        close(old);
    }
    thread::reset_for_fork();
    crate::signalfd::reset_for_fork();
    let h = &control().header;
    h.app_pid.store(getpid(), Release);
    // For a migration's pre-copy (a fork's child and an exec need their own).
    h.app_uffd.store(tracking_userfaultfd(), Release);
    let state = &h.fork_state;
    let copied = if share {
        MM.lock().borrow();
        Ok(())
    } else {
        MM.lock().fork_copy()
    };
    if crate::trap::enable_thread().is_err() || copied.is_err() {
        state.store(FORK_FAILED, Release);
        futex_wake(state, 1);
        exit_group(125);
    }
    // The new proxy mirrors the copies now, before the parent goes on.
    delegate::sync();
    state.store(FORK_DONE, Release);
    futex_wake(state, 1);
    thread::enter(&uc, true)
}
