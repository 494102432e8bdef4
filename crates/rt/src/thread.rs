//! Raw thread creation for freestanding code: clone(2) onto a stack that
//! carries the entry point and its argument, so the child needs nothing
//! from the parent's stack or registers.

use core::arch::global_asm;

// lwk_rt_clone(flags, stack, ptid, ctid, tls) -> tid in the parent, and
// lwk_rt_clone3(args, size) -> the same through clone3(2), whose child
// starts with the stack pointer at the end of the stack the arguments give.
// The child starts on `stack`, where the caller left [arg][entry]: it pops
// them and calls entry(arg), which never returns.
global_asm!(
    ".globl lwk_rt_clone",
    "lwk_rt_clone:",
    "mov r10, rcx",
    "mov eax, {clone}",
    "jmp 1f",
    ".globl lwk_rt_clone3",
    "lwk_rt_clone3:",
    "mov eax, {clone3}",
    "1:",
    "syscall",
    "test rax, rax",
    "jnz 2f",
    "xor ebp, ebp",
    "pop rdi",
    "pop rax",
    "call rax",
    "ud2",
    "2:",
    "ret",
    clone = const crate::nr::CLONE,
    clone3 = const crate::nr::CLONE3,
);

extern "C" {
    fn lwk_rt_clone(flags: u64, stack: u64, ptid: u64, ctid: u64, tls: u64) -> i64;
    fn lwk_rt_clone3(args: *const u64, size: u64) -> i64;
}

pub const CLONE_VM: u64 = 0x100;
pub const CLONE_FS: u64 = 0x200;
pub const CLONE_FILES: u64 = 0x400;
pub const CLONE_SIGHAND: u64 = 0x800;
pub const CLONE_PIDFD: u64 = 0x1000;
pub const CLONE_VFORK: u64 = 0x4000;
pub const CLONE_PARENT: u64 = 0x8000;
pub const CLONE_THREAD: u64 = 0x10000;
pub const CLONE_SYSVSEM: u64 = 0x40000;
/// What a thread shares with the others of its process (pthread's flags).
pub const THREAD: u64 = CLONE_VM | CLONE_FS | CLONE_FILES | CLONE_SIGHAND | CLONE_THREAD | CLONE_SYSVSEM;
pub const CLONE_SETTLS: u64 = 0x80000;
pub const CLONE_PARENT_SETTID: u64 = 0x100000;
pub const CLONE_CHILD_CLEARTID: u64 = 0x200000;
pub const CLONE_CHILD_SETTID: u64 = 0x1000000;

/// Start a thread (or process, by `flags`) running `entry(arg)` on the
/// stack whose top is `stack_top` (16-aligned). Returns the child's tid or
/// -errno.
///
/// # Safety
/// The stack is valid, unused and stays so until the child is gone; the
/// flags make sense for code that shares nothing but what they say.
pub unsafe fn spawn(
    flags: u64,
    stack_top: u64,
    ptid: u64,
    ctid: u64,
    tls: u64,
    entry: extern "C" fn(u64) -> !,
    arg: u64,
) -> i64 {
    let sp = stack_top - 16;
    // SAFETY: the caller's stack has room for two words below its top.
    unsafe {
        (sp as *mut u64).write(arg);
        ((sp + 8) as *mut u64).write(entry as *const () as u64);
        lwk_rt_clone(flags, sp, ptid, ctid, tls)
    }
}

/// [`spawn`], giving the new thread (or process) the id `tid` in the
/// caller's pid namespace (clone3's set_tid; needs CAP_SYS_ADMIN there).
///
/// # Safety
/// As for [`spawn`].
pub unsafe fn spawn_with_tid(
    flags: u64,
    stack_top: u64,
    ctid: u64,
    tls: u64,
    entry: extern "C" fn(u64) -> !,
    arg: u64,
    tid: i32,
) -> i64 {
    let sp = stack_top - 16;
    let ids = [tid];
    // struct clone_args: flags, pidfd, child_tid, parent_tid, exit_signal,
    // stack, stack_size, tls, set_tid, set_tid_size, cgroup. The child's
    // stack pointer is stack + stack_size: `sp`, where [arg][entry] are.
    let args: [u64; 11] = [flags & !0xff, 0, ctid, 0, flags & 0xff, sp - 4096, 4096, tls, ids.as_ptr() as u64, 1, 0];
    // SAFETY: the caller's stack has room for two words below its top; the
    // kernel reads `args` and `ids` before it returns.
    unsafe {
        (sp as *mut u64).write(arg);
        ((sp + 8) as *mut u64).write(entry as *const () as u64);
        lwk_rt_clone3(args.as_ptr(), core::mem::size_of_val(&args) as u64)
    }
}

/// End the calling thread only.
pub fn exit_thread(code: i32) -> ! {
    loop {
        // SAFETY: ends this thread.
        unsafe { crate::sys::syscall3(crate::nr::EXIT, code as u64, 0, 0) };
    }
}
