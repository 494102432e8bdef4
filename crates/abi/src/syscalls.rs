//! One table for every x86-64 system call: how the LWK runs it, and how
//! much of Linux's behaviour it gives.
//!
//! Every system call of the application is trapped (Syscall User Dispatch)
//! into the LWK, which looks its number up here and does what the row's
//! [`Rule`] says; nothing else decides. The rules:
//!
//! * **Local**: executed as it is in the application process (time,
//!   scheduling, identity, signals to processes, calls whose pid argument
//!   names the application process itself).
//! * **Delegate**: executed by the proxy with the application's raw
//!   arguments. The proxy owns every file descriptor of the application, its
//!   working directory and umask, and maps the application's memory at the
//!   same addresses, so pointers mean the same thing there.
//!   **DelegatePath(i)** is the same for a call whose argument `i` is a
//!   path: one under `/proc/self` is rewritten to name the application.
//! * **Handler**: the LWK's own code (memory, signals, threads and
//!   processes, exec, signalfd, and the calls that must act in both
//!   processes); the kernel maps each [`Handler`] to one function.
//! * **Refuse**: not supported; the application gets the errno and the LWK
//!   says why on stderr.
//!
//! Each row also says how well the call is supported ([`Support`]: fully,
//! partially with what is missing, or not with why), and, for delegated
//! calls, what Linux does around them that the LWK must repeat: calls that
//! are never restarted after a signal handler, calls whose EPIPE raises
//! SIGPIPE, calls that wait with a signal mask of their own.
//!
//! Numbers come from `linux-raw-sys` (Linux's own headers); names are the
//! constants' names without `__NR_`. Rows follow
//! `arch/x86/entry/syscalls/syscall_64.tbl` of Linux 6.18 (the 64-bit ABI;
//! x32 entries, 512 and up, are not here). `lookup` is one load from a
//! table built at compile time, so it can run in the signal handler that
//! receives every trapped call. `docs/syscalls.md` is generated from this
//! table by `lwk syscalls --markdown`.

use linux_raw_sys::errno::ENOSYS;
use linux_raw_sys::general::*;

/// `uprobe` (Linux 6.18) is newer than the linux-raw-sys release we use.
#[allow(non_upper_case_globals)]
pub const __NR_uprobe: u32 = 336;

/// How the LWK runs a system call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    /// Executed as it is in the application process.
    Local,
    /// Executed by the proxy with the application's raw arguments.
    Delegate,
    /// Delegated; this argument is a path, rewritten when it names `/proc/self`.
    DelegatePath(u8),
    /// The LWK's own code.
    Handler(Handler),
    /// Not supported: this errno (positive), with a note on stderr.
    Refuse(u32),
}

/// The LWK's own implementations. The kernel maps each to one function
/// (`lwk_kernel::handlers`); a new variant does not compile until it has one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handler {
    Mmap,
    Munmap,
    Mprotect,
    Mremap,
    Brk,
    Madvise,
    RtSigaction,
    RtSigprocmask,
    RtSigsuspend,
    RtSigreturn,
    Pause,
    /// A blocking local call that must wait with the application's signal
    /// mask, so that a signal runs its handler and interrupts it.
    WaitWithAppMask,
    /// nanosleep and clock_nanosleep: as WaitWithAppMask, and a relative
    /// sleep the LWK interrupted (a freeze) goes on for the time it had
    /// left when it runs again, not for all of it.
    Sleep,
    /// futex: the waiting operations wait with the application's mask.
    Futex,
    Exit,
    ExitGroup,
    Execve,
    Execveat,
    Clone,
    Clone3,
    Fork,
    Vfork,
    Signalfd,
    Signalfd4,
    /// read: of a signalfd, the LWK's; of anything else, delegated.
    Read,
    /// close, dup2, dup3, close_range: delegated, and a signalfd closed
    /// (or replaced) is forgotten.
    CloseFds,
    ArchPrctl,
    /// The parent of `lwk run` is the application's parent.
    Getppid,
    /// RLIMIT_NOFILE is the proxy's (it holds the descriptors), the others
    /// the application process's.
    Rlimit,
    /// A change of credentials is made in both processes.
    Credentials,
    /// setitimer, alarm: in the application process, under the signal
    /// subsystem's lock (the timers are part of its saved state).
    Itimer,
}

/// How much of Linux's behaviour the LWK gives for a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Support {
    Full,
    /// Works, except for what the text says.
    Partial(&'static str),
    /// Refused; the text says why.
    Unsupported(&'static str),
}

impl Support {
    /// "supported", "partial" or "unsupported".
    pub fn level(&self) -> &'static str {
        match self {
            Support::Full => "supported",
            Support::Partial(_) => "partial",
            Support::Unsupported(_) => "unsupported",
        }
    }
    pub fn text(&self) -> Option<&'static str> {
        match *self {
            Support::Full => None,
            Support::Partial(t) | Support::Unsupported(t) => Some(t),
        }
    }
}

/// The signal mask a call waits with, when it has its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallMask {
    None,
    /// This argument points to a sigset (ppoll, epoll_pwait, epoll_pwait2).
    Arg(u8),
    /// pselect6: its 6th argument points to {sigset pointer, size}.
    Pselect,
}

/// Whether an EPIPE of the call raises SIGPIPE in the application (the
/// proxy, where it ran, ignores SIGPIPE).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sigpipe {
    No,
    Yes,
    /// Unless this argument (the flags) has MSG_NOSIGNAL.
    UnlessNoSignal(u8),
}

/// One x86-64 system call and how the LWK runs it.
#[derive(Clone, Copy, Debug)]
pub struct Syscall {
    pub nr: u32,
    pub name: &'static str,
    pub rule: Rule,
    pub support: Support,
    /// Why the call runs where it does, when that is not obvious.
    pub note: Option<&'static str>,
    /// Linux never restarts it after a signal handler, SA_RESTART or not
    /// (signal(7)): interrupted, it fails with EINTR.
    pub never_restarted: bool,
    pub sigpipe: Sigpipe,
    pub mask: CallMask,
}

impl Syscall {
    const fn new(nr: u32, name: &'static str, rule: Rule) -> Self {
        Syscall {
            nr,
            name: strip_nr(name),
            rule,
            support: Support::Full,
            note: None,
            never_restarted: false,
            sigpipe: Sigpipe::No,
            mask: CallMask::None,
        }
    }
    const fn note(mut self, why: &'static str) -> Self {
        self.note = Some(why);
        self
    }
    const fn partial(mut self, missing: &'static str) -> Self {
        self.support = Support::Partial(missing);
        self
    }
    const fn unsupported(mut self, why: &'static str) -> Self {
        self.support = Support::Unsupported(why);
        self
    }
    const fn never_restarted(mut self) -> Self {
        self.never_restarted = true;
        self
    }
    const fn sigpipe(mut self) -> Self {
        self.sigpipe = Sigpipe::Yes;
        self
    }
    const fn sigpipe_unless_flag_in(mut self, arg: u8) -> Self {
        self.sigpipe = Sigpipe::UnlessNoSignal(arg);
        self
    }
    const fn mask_in(mut self, arg: u8) -> Self {
        self.mask = CallMask::Arg(arg);
        self
    }
    const fn pselect_mask(mut self) -> Self {
        self.mask = CallMask::Pselect;
        self
    }
    /// Where the call runs, for people: "local", "delegated", "lwk" or "refused".
    pub fn place(&self) -> &'static str {
        match self.rule {
            Rule::Local => "local",
            Rule::Delegate | Rule::DelegatePath(_) => "delegated",
            Rule::Handler(_) => "lwk",
            Rule::Refuse(_) => "refused",
        }
    }
}

/// `"__NR_read"` -> `"read"`.
const fn strip_nr(s: &'static str) -> &'static str {
    match s.as_bytes().split_first_chunk::<5>() {
        Some((b"__NR_", rest)) => match core::str::from_utf8(rest) {
            Ok(name) => name,
            Err(_) => panic!("syscall name is not UTF-8"),
        },
        _ => panic!("syscall constant without __NR_"),
    }
}

/// A row: the number from linux-raw-sys, the name from the constant's.
macro_rules! sys {
    ($nr:ident, $rule:expr) => {
        Syscall::new($nr, stringify!($nr), $rule)
    };
}

// Why a call runs where it does (shown by `lwk syscalls`).
const NEW_TASK: &str = "thread: own slot and proxy worker; process: copied memory, new proxy";
const EXEC: &str = "replaces the image: the LWK restarts itself around the new program";
const WAIT: &str = "children are the app process's own: waited for there";
const SIGNALFD: &str = "a real signalfd in the app process, a pipe in the proxy for poll";
const OTHER_PID: &str = "pid argument: the application process is this one";
const RLIMIT: &str = "limits split: NOFILE belongs to the proxy, the rest to the app";
const CREDS: &str = "credentials must change in both processes";
const JOB: &str = "job control: acts on the application process";
const PORT_IO: &str = "port I/O privilege of the app process";
const ITIMER: &str = "the interval timers are saved with the signals: changed under their lock";
const UPROBE: &str = "uprobe trampoline: valid only at the kernel's trampoline address";
// Why a call is refused.
const TRACE: &str = "acts on a process: app process vs its proxy";
const FILTER: &str = "acts on the calling process: app and proxy both issue its calls";
const NAMESPACE: &str = "namespace of which process: app and proxy must agree";
const SYSV_MAP: &str = "maps SysV memory into the address space: LWK must own it";
const RINGS: &str = "shared rings mapped into the address space";
const UFFD: &str = "watches the app's memory: must be created in the app process";
const SECRET: &str = "secret memory mapped into the address space: LWK must own it";
const REMAP: &str = "rearranges a file mapping: LWK must own the address space";

const ENTRIES: &[Syscall] = &[
    sys!(__NR_read, Rule::Handler(Handler::Read)),
    sys!(__NR_write, Rule::Delegate).sigpipe(),
    sys!(__NR_open, Rule::DelegatePath(0)),
    sys!(__NR_close, Rule::Handler(Handler::CloseFds)),
    sys!(__NR_stat, Rule::DelegatePath(0)),
    sys!(__NR_fstat, Rule::Delegate),
    sys!(__NR_lstat, Rule::DelegatePath(0)),
    sys!(__NR_poll, Rule::Delegate).never_restarted(),
    sys!(__NR_lseek, Rule::Delegate),
    sys!(__NR_mmap, Rule::Handler(Handler::Mmap))
        .partial("writable MAP_PRIVATE file mappings are copies taken at mmap time"),
    sys!(__NR_mprotect, Rule::Handler(Handler::Mprotect)),
    sys!(__NR_munmap, Rule::Handler(Handler::Munmap)),
    sys!(__NR_brk, Rule::Handler(Handler::Brk)),
    sys!(__NR_rt_sigaction, Rule::Handler(Handler::RtSigaction))
        .partial("SIGSYS and SIGRTMAX are the LWK's: a handler for them is recorded, never run"),
    sys!(__NR_rt_sigprocmask, Rule::Handler(Handler::RtSigprocmask))
        .partial("SIGSYS and SIGRTMAX cannot be blocked (as SIGKILL and SIGSTOP)"),
    sys!(__NR_rt_sigreturn, Rule::Handler(Handler::RtSigreturn))
        .partial("only through the LWK's restorer; from application code the program dies"),
    sys!(__NR_ioctl, Rule::Delegate),
    sys!(__NR_pread64, Rule::Delegate),
    sys!(__NR_pwrite64, Rule::Delegate).sigpipe(),
    sys!(__NR_readv, Rule::Delegate),
    sys!(__NR_writev, Rule::Delegate).sigpipe(),
    sys!(__NR_access, Rule::DelegatePath(0)),
    sys!(__NR_pipe, Rule::Delegate),
    sys!(__NR_select, Rule::Delegate).never_restarted(),
    sys!(__NR_sched_yield, Rule::Local),
    sys!(__NR_mremap, Rule::Handler(Handler::Mremap)),
    sys!(__NR_msync, Rule::Local),
    sys!(__NR_mincore, Rule::Local),
    sys!(__NR_madvise, Rule::Handler(Handler::Madvise)),
    sys!(__NR_shmget, Rule::Delegate),
    sys!(__NR_shmat, Rule::Refuse(ENOSYS)).unsupported(SYSV_MAP),
    sys!(__NR_shmctl, Rule::Delegate),
    sys!(__NR_dup, Rule::Delegate),
    sys!(__NR_dup2, Rule::Handler(Handler::CloseFds)),
    sys!(__NR_pause, Rule::Handler(Handler::Pause)).never_restarted(),
    sys!(__NR_nanosleep, Rule::Handler(Handler::Sleep)).never_restarted(),
    sys!(__NR_getitimer, Rule::Local),
    sys!(__NR_alarm, Rule::Handler(Handler::Itimer)).note(ITIMER),
    sys!(__NR_setitimer, Rule::Handler(Handler::Itimer)).note(ITIMER),
    sys!(__NR_getpid, Rule::Local),
    sys!(__NR_sendfile, Rule::Delegate).sigpipe(),
    sys!(__NR_socket, Rule::Delegate),
    sys!(__NR_connect, Rule::Delegate),
    sys!(__NR_accept, Rule::Delegate),
    sys!(__NR_sendto, Rule::Delegate).sigpipe_unless_flag_in(3),
    sys!(__NR_recvfrom, Rule::Delegate),
    sys!(__NR_sendmsg, Rule::Delegate).sigpipe_unless_flag_in(2),
    sys!(__NR_recvmsg, Rule::Delegate),
    sys!(__NR_shutdown, Rule::Delegate),
    sys!(__NR_bind, Rule::Delegate),
    sys!(__NR_listen, Rule::Delegate),
    sys!(__NR_getsockname, Rule::Delegate),
    sys!(__NR_getpeername, Rule::Delegate),
    sys!(__NR_socketpair, Rule::Delegate),
    sys!(__NR_setsockopt, Rule::Delegate),
    sys!(__NR_getsockopt, Rule::Delegate),
    sys!(__NR_clone, Rule::Handler(Handler::Clone))
        .note(NEW_TASK)
        .partial("threads, fork and vfork; other flag sets (CLONE_PARENT...) give ENOSYS"),
    sys!(__NR_fork, Rule::Handler(Handler::Fork)).note(NEW_TASK),
    sys!(__NR_vfork, Rule::Handler(Handler::Vfork)).note(NEW_TASK),
    sys!(__NR_execve, Rule::Handler(Handler::Execve)).note(EXEC),
    sys!(__NR_exit, Rule::Handler(Handler::Exit)),
    sys!(__NR_wait4, Rule::Handler(Handler::WaitWithAppMask)).note(WAIT),
    sys!(__NR_kill, Rule::Local),
    sys!(__NR_uname, Rule::Local),
    sys!(__NR_semget, Rule::Delegate),
    sys!(__NR_semop, Rule::Delegate).never_restarted(),
    sys!(__NR_semctl, Rule::Delegate),
    sys!(__NR_shmdt, Rule::Refuse(ENOSYS)).unsupported(SYSV_MAP),
    sys!(__NR_msgget, Rule::Delegate),
    sys!(__NR_msgsnd, Rule::Delegate).never_restarted(),
    sys!(__NR_msgrcv, Rule::Delegate).never_restarted(),
    sys!(__NR_msgctl, Rule::Delegate),
    sys!(__NR_fcntl, Rule::Delegate),
    sys!(__NR_flock, Rule::Delegate),
    sys!(__NR_fsync, Rule::Delegate),
    sys!(__NR_fdatasync, Rule::Delegate),
    sys!(__NR_truncate, Rule::Delegate),
    sys!(__NR_ftruncate, Rule::Delegate),
    sys!(__NR_getdents, Rule::Delegate),
    sys!(__NR_getcwd, Rule::Delegate),
    sys!(__NR_chdir, Rule::DelegatePath(0)),
    sys!(__NR_fchdir, Rule::Delegate),
    sys!(__NR_rename, Rule::Delegate),
    sys!(__NR_mkdir, Rule::Delegate),
    sys!(__NR_rmdir, Rule::Delegate),
    sys!(__NR_creat, Rule::Delegate),
    sys!(__NR_link, Rule::Delegate),
    sys!(__NR_unlink, Rule::Delegate),
    sys!(__NR_symlink, Rule::Delegate),
    sys!(__NR_readlink, Rule::DelegatePath(0)),
    sys!(__NR_chmod, Rule::Delegate),
    sys!(__NR_fchmod, Rule::Delegate),
    sys!(__NR_chown, Rule::Delegate),
    sys!(__NR_fchown, Rule::Delegate),
    sys!(__NR_lchown, Rule::Delegate),
    sys!(__NR_umask, Rule::Delegate),
    sys!(__NR_gettimeofday, Rule::Local),
    sys!(__NR_getrlimit, Rule::Handler(Handler::Rlimit)).note(RLIMIT),
    sys!(__NR_getrusage, Rule::Local),
    sys!(__NR_sysinfo, Rule::Local),
    sys!(__NR_times, Rule::Local),
    sys!(__NR_ptrace, Rule::Refuse(ENOSYS)).unsupported(TRACE),
    sys!(__NR_getuid, Rule::Local),
    sys!(__NR_syslog, Rule::Delegate),
    sys!(__NR_getgid, Rule::Local),
    sys!(__NR_setuid, Rule::Handler(Handler::Credentials))
        .note(CREDS)
        .partial("after a uid change both processes stay dumpable, to reach each other"),
    sys!(__NR_setgid, Rule::Handler(Handler::Credentials))
        .note(CREDS)
        .partial("after a uid change both processes stay dumpable, to reach each other"),
    sys!(__NR_geteuid, Rule::Local),
    sys!(__NR_getegid, Rule::Local),
    sys!(__NR_setpgid, Rule::Local).note(JOB),
    sys!(__NR_getppid, Rule::Handler(Handler::Getppid)),
    sys!(__NR_getpgrp, Rule::Local),
    sys!(__NR_setsid, Rule::Local).note(JOB),
    sys!(__NR_setreuid, Rule::Handler(Handler::Credentials))
        .note(CREDS)
        .partial("after a uid change both processes stay dumpable, to reach each other"),
    sys!(__NR_setregid, Rule::Handler(Handler::Credentials))
        .note(CREDS)
        .partial("after a uid change both processes stay dumpable, to reach each other"),
    sys!(__NR_getgroups, Rule::Local),
    sys!(__NR_setgroups, Rule::Handler(Handler::Credentials))
        .note(CREDS)
        .partial("after a uid change both processes stay dumpable, to reach each other"),
    sys!(__NR_setresuid, Rule::Handler(Handler::Credentials))
        .note(CREDS)
        .partial("after a uid change both processes stay dumpable, to reach each other"),
    sys!(__NR_getresuid, Rule::Local),
    sys!(__NR_setresgid, Rule::Handler(Handler::Credentials))
        .note(CREDS)
        .partial("after a uid change both processes stay dumpable, to reach each other"),
    sys!(__NR_getresgid, Rule::Local),
    sys!(__NR_getpgid, Rule::Local),
    sys!(__NR_setfsuid, Rule::Handler(Handler::Credentials))
        .note(CREDS)
        .partial("after a uid change both processes stay dumpable, to reach each other"),
    sys!(__NR_setfsgid, Rule::Handler(Handler::Credentials))
        .note(CREDS)
        .partial("after a uid change both processes stay dumpable, to reach each other"),
    sys!(__NR_getsid, Rule::Local),
    sys!(__NR_capget, Rule::Local),
    sys!(__NR_capset, Rule::Handler(Handler::Credentials))
        .note(CREDS)
        .partial("after a uid change both processes stay dumpable, to reach each other"),
    sys!(__NR_rt_sigpending, Rule::Local),
    sys!(__NR_rt_sigtimedwait, Rule::Handler(Handler::WaitWithAppMask)).never_restarted(),
    sys!(__NR_rt_sigqueueinfo, Rule::Local),
    sys!(__NR_rt_sigsuspend, Rule::Handler(Handler::RtSigsuspend)).never_restarted(),
    sys!(__NR_sigaltstack, Rule::Local),
    sys!(__NR_utime, Rule::Delegate),
    sys!(__NR_mknod, Rule::Delegate),
    sys!(__NR_uselib, Rule::Local),
    sys!(__NR_personality, Rule::Local),
    sys!(__NR_ustat, Rule::Delegate),
    sys!(__NR_statfs, Rule::Delegate),
    sys!(__NR_fstatfs, Rule::Delegate),
    sys!(__NR_sysfs, Rule::Delegate),
    sys!(__NR_getpriority, Rule::Local),
    sys!(__NR_setpriority, Rule::Local),
    sys!(__NR_sched_setparam, Rule::Local),
    sys!(__NR_sched_getparam, Rule::Local),
    sys!(__NR_sched_setscheduler, Rule::Local),
    sys!(__NR_sched_getscheduler, Rule::Local),
    sys!(__NR_sched_get_priority_max, Rule::Local),
    sys!(__NR_sched_get_priority_min, Rule::Local),
    sys!(__NR_sched_rr_get_interval, Rule::Local),
    sys!(__NR_mlock, Rule::Local),
    sys!(__NR_munlock, Rule::Local),
    sys!(__NR_mlockall, Rule::Local),
    sys!(__NR_munlockall, Rule::Local),
    sys!(__NR_vhangup, Rule::Delegate),
    sys!(__NR_modify_ldt, Rule::Local),
    sys!(__NR_pivot_root, Rule::Delegate),
    sys!(__NR__sysctl, Rule::Delegate),
    sys!(__NR_prctl, Rule::Local),
    sys!(__NR_arch_prctl, Rule::Handler(Handler::ArchPrctl))
        .partial("ARCH_SET_GS and ARCH_GET_GS give EPERM: GS is the LWK's"),
    sys!(__NR_adjtimex, Rule::Local),
    sys!(__NR_setrlimit, Rule::Handler(Handler::Rlimit)).note(RLIMIT),
    sys!(__NR_chroot, Rule::Delegate),
    sys!(__NR_sync, Rule::Delegate),
    sys!(__NR_acct, Rule::Delegate),
    sys!(__NR_settimeofday, Rule::Local),
    sys!(__NR_mount, Rule::Delegate),
    sys!(__NR_umount2, Rule::Delegate),
    sys!(__NR_swapon, Rule::Delegate),
    sys!(__NR_swapoff, Rule::Delegate),
    sys!(__NR_reboot, Rule::Delegate),
    sys!(__NR_sethostname, Rule::Delegate),
    sys!(__NR_setdomainname, Rule::Delegate),
    sys!(__NR_iopl, Rule::Local).note(PORT_IO),
    sys!(__NR_ioperm, Rule::Local).note(PORT_IO),
    // create_module, get_kernel_syms, query_module, nfsservctl and 181-185 are
    // removed or were never implemented: Linux answers ENOSYS.
    sys!(__NR_create_module, Rule::Local),
    sys!(__NR_init_module, Rule::Delegate),
    sys!(__NR_delete_module, Rule::Delegate),
    sys!(__NR_get_kernel_syms, Rule::Local),
    sys!(__NR_query_module, Rule::Local),
    sys!(__NR_quotactl, Rule::Delegate),
    sys!(__NR_nfsservctl, Rule::Delegate),
    sys!(__NR_getpmsg, Rule::Local),
    sys!(__NR_putpmsg, Rule::Local),
    sys!(__NR_afs_syscall, Rule::Local),
    sys!(__NR_tuxcall, Rule::Local),
    sys!(__NR_security, Rule::Local),
    sys!(__NR_gettid, Rule::Local),
    sys!(__NR_readahead, Rule::Delegate),
    sys!(__NR_setxattr, Rule::Delegate),
    sys!(__NR_lsetxattr, Rule::Delegate),
    sys!(__NR_fsetxattr, Rule::Delegate),
    sys!(__NR_getxattr, Rule::Delegate),
    sys!(__NR_lgetxattr, Rule::Delegate),
    sys!(__NR_fgetxattr, Rule::Delegate),
    sys!(__NR_listxattr, Rule::Delegate),
    sys!(__NR_llistxattr, Rule::Delegate),
    sys!(__NR_flistxattr, Rule::Delegate),
    sys!(__NR_removexattr, Rule::Delegate),
    sys!(__NR_lremovexattr, Rule::Delegate),
    sys!(__NR_fremovexattr, Rule::Delegate),
    sys!(__NR_tkill, Rule::Local),
    sys!(__NR_time, Rule::Local),
    sys!(__NR_futex, Rule::Handler(Handler::Futex)),
    sys!(__NR_sched_setaffinity, Rule::Local),
    sys!(__NR_sched_getaffinity, Rule::Local),
    sys!(__NR_set_thread_area, Rule::Local),
    sys!(__NR_io_setup, Rule::Delegate),
    sys!(__NR_io_destroy, Rule::Delegate),
    sys!(__NR_io_getevents, Rule::Delegate).never_restarted(),
    sys!(__NR_io_submit, Rule::Delegate),
    sys!(__NR_io_cancel, Rule::Delegate),
    sys!(__NR_get_thread_area, Rule::Local),
    sys!(__NR_lookup_dcookie, Rule::Delegate),
    sys!(__NR_epoll_create, Rule::Delegate),
    sys!(__NR_epoll_ctl_old, Rule::Local),
    sys!(__NR_epoll_wait_old, Rule::Local),
    sys!(__NR_remap_file_pages, Rule::Refuse(ENOSYS)).unsupported(REMAP),
    sys!(__NR_getdents64, Rule::Delegate),
    sys!(__NR_set_tid_address, Rule::Local),
    sys!(__NR_restart_syscall, Rule::Local),
    sys!(__NR_semtimedop, Rule::Delegate).never_restarted(),
    sys!(__NR_fadvise64, Rule::Delegate),
    sys!(__NR_timer_create, Rule::Local),
    sys!(__NR_timer_settime, Rule::Local),
    sys!(__NR_timer_gettime, Rule::Local),
    sys!(__NR_timer_getoverrun, Rule::Local),
    sys!(__NR_timer_delete, Rule::Local),
    sys!(__NR_clock_settime, Rule::Local),
    sys!(__NR_clock_gettime, Rule::Local),
    sys!(__NR_clock_getres, Rule::Local),
    sys!(__NR_clock_nanosleep, Rule::Handler(Handler::Sleep)).never_restarted(),
    sys!(__NR_exit_group, Rule::Handler(Handler::ExitGroup)),
    sys!(__NR_epoll_wait, Rule::Delegate).never_restarted(),
    sys!(__NR_epoll_ctl, Rule::Delegate),
    sys!(__NR_tgkill, Rule::Local),
    sys!(__NR_utimes, Rule::Delegate),
    sys!(__NR_vserver, Rule::Local),
    sys!(__NR_mbind, Rule::Local),
    sys!(__NR_set_mempolicy, Rule::Local),
    sys!(__NR_get_mempolicy, Rule::Local),
    sys!(__NR_mq_open, Rule::Delegate),
    sys!(__NR_mq_unlink, Rule::Delegate),
    sys!(__NR_mq_timedsend, Rule::Delegate),
    sys!(__NR_mq_timedreceive, Rule::Delegate),
    sys!(__NR_mq_notify, Rule::Delegate),
    sys!(__NR_mq_getsetattr, Rule::Delegate),
    sys!(__NR_kexec_load, Rule::Delegate),
    sys!(__NR_waitid, Rule::Handler(Handler::WaitWithAppMask)).note(WAIT),
    sys!(__NR_add_key, Rule::Delegate),
    sys!(__NR_request_key, Rule::Delegate),
    sys!(__NR_keyctl, Rule::Delegate),
    sys!(__NR_ioprio_set, Rule::Local),
    sys!(__NR_ioprio_get, Rule::Local),
    sys!(__NR_inotify_init, Rule::Delegate),
    sys!(__NR_inotify_add_watch, Rule::Delegate),
    sys!(__NR_inotify_rm_watch, Rule::Delegate),
    sys!(__NR_migrate_pages, Rule::Local),
    sys!(__NR_openat, Rule::DelegatePath(1)),
    sys!(__NR_mkdirat, Rule::Delegate),
    sys!(__NR_mknodat, Rule::Delegate),
    sys!(__NR_fchownat, Rule::Delegate),
    sys!(__NR_futimesat, Rule::Delegate),
    sys!(__NR_newfstatat, Rule::DelegatePath(1)),
    sys!(__NR_unlinkat, Rule::Delegate),
    sys!(__NR_renameat, Rule::Delegate),
    sys!(__NR_linkat, Rule::Delegate),
    sys!(__NR_symlinkat, Rule::Delegate),
    sys!(__NR_readlinkat, Rule::DelegatePath(1)),
    sys!(__NR_fchmodat, Rule::Delegate),
    sys!(__NR_faccessat, Rule::DelegatePath(1)),
    sys!(__NR_pselect6, Rule::Delegate).never_restarted().pselect_mask(),
    sys!(__NR_ppoll, Rule::Delegate).never_restarted().mask_in(3),
    sys!(__NR_unshare, Rule::Refuse(ENOSYS)).unsupported(NAMESPACE),
    sys!(__NR_set_robust_list, Rule::Local),
    sys!(__NR_get_robust_list, Rule::Local),
    sys!(__NR_splice, Rule::Delegate).sigpipe(),
    sys!(__NR_tee, Rule::Delegate),
    sys!(__NR_sync_file_range, Rule::Delegate),
    sys!(__NR_vmsplice, Rule::Delegate).sigpipe(),
    sys!(__NR_move_pages, Rule::Local),
    sys!(__NR_utimensat, Rule::Delegate),
    sys!(__NR_epoll_pwait, Rule::Delegate).never_restarted().mask_in(3),
    sys!(__NR_signalfd, Rule::Handler(Handler::Signalfd))
        .note(SIGNALFD)
        .partial("a tgkill to another thread does not wake poll; after dup or exec: a pipe"),
    sys!(__NR_timerfd_create, Rule::Delegate),
    sys!(__NR_eventfd, Rule::Delegate),
    sys!(__NR_fallocate, Rule::Delegate),
    sys!(__NR_timerfd_settime, Rule::Delegate),
    sys!(__NR_timerfd_gettime, Rule::Delegate),
    sys!(__NR_accept4, Rule::Delegate),
    sys!(__NR_signalfd4, Rule::Handler(Handler::Signalfd4))
        .note(SIGNALFD)
        .partial("a tgkill to another thread does not wake poll; after dup or exec: a pipe"),
    sys!(__NR_eventfd2, Rule::Delegate),
    sys!(__NR_epoll_create1, Rule::Delegate),
    sys!(__NR_dup3, Rule::Handler(Handler::CloseFds)),
    sys!(__NR_pipe2, Rule::Delegate),
    sys!(__NR_inotify_init1, Rule::Delegate),
    sys!(__NR_preadv, Rule::Delegate),
    sys!(__NR_pwritev, Rule::Delegate).sigpipe(),
    sys!(__NR_rt_tgsigqueueinfo, Rule::Local),
    sys!(__NR_perf_event_open, Rule::Delegate),
    sys!(__NR_recvmmsg, Rule::Delegate),
    sys!(__NR_fanotify_init, Rule::Delegate),
    sys!(__NR_fanotify_mark, Rule::Delegate),
    sys!(__NR_prlimit64, Rule::Handler(Handler::Rlimit)).note(RLIMIT),
    sys!(__NR_name_to_handle_at, Rule::Delegate),
    sys!(__NR_open_by_handle_at, Rule::Delegate),
    sys!(__NR_clock_adjtime, Rule::Local),
    sys!(__NR_syncfs, Rule::Delegate),
    sys!(__NR_sendmmsg, Rule::Delegate).sigpipe_unless_flag_in(2),
    sys!(__NR_setns, Rule::Refuse(ENOSYS)).unsupported(NAMESPACE),
    sys!(__NR_getcpu, Rule::Local),
    sys!(__NR_process_vm_readv, Rule::Local).note(OTHER_PID),
    sys!(__NR_process_vm_writev, Rule::Local).note(OTHER_PID),
    sys!(__NR_kcmp, Rule::Local)
        .note(OTHER_PID)
        .partial("descriptors compared are the app process's; the app's own are in the proxy"),
    sys!(__NR_finit_module, Rule::Delegate),
    sys!(__NR_sched_setattr, Rule::Local),
    sys!(__NR_sched_getattr, Rule::Local),
    sys!(__NR_renameat2, Rule::Delegate),
    sys!(__NR_seccomp, Rule::Refuse(ENOSYS)).unsupported(FILTER),
    sys!(__NR_getrandom, Rule::Local),
    sys!(__NR_memfd_create, Rule::Delegate),
    sys!(__NR_kexec_file_load, Rule::Delegate),
    sys!(__NR_bpf, Rule::Delegate),
    sys!(__NR_execveat, Rule::Handler(Handler::Execveat)).note(EXEC),
    sys!(__NR_userfaultfd, Rule::Refuse(ENOSYS)).unsupported(UFFD),
    sys!(__NR_membarrier, Rule::Local),
    sys!(__NR_mlock2, Rule::Local),
    sys!(__NR_copy_file_range, Rule::Delegate),
    sys!(__NR_preadv2, Rule::Delegate),
    sys!(__NR_pwritev2, Rule::Delegate).sigpipe(),
    sys!(__NR_pkey_mprotect, Rule::Local),
    sys!(__NR_pkey_alloc, Rule::Local),
    sys!(__NR_pkey_free, Rule::Local),
    sys!(__NR_statx, Rule::DelegatePath(1)),
    sys!(__NR_io_pgetevents, Rule::Delegate),
    sys!(__NR_rseq, Rule::Local),
    // 335-336: called only from the kernel's uprobe trampolines (Linux 6.11, 6.18).
    sys!(__NR_uretprobe, Rule::Local).note(UPROBE),
    sys!(__NR_uprobe, Rule::Local).note(UPROBE),
    // From 424 on, numbers are shared by every architecture.
    sys!(__NR_pidfd_send_signal, Rule::Delegate).note("the pidfd is a descriptor: the proxy's"),
    sys!(__NR_io_uring_setup, Rule::Refuse(ENOSYS)).unsupported(RINGS),
    sys!(__NR_io_uring_enter, Rule::Refuse(ENOSYS)).unsupported(RINGS),
    sys!(__NR_io_uring_register, Rule::Refuse(ENOSYS)).unsupported(RINGS),
    sys!(__NR_open_tree, Rule::Delegate),
    sys!(__NR_move_mount, Rule::Delegate),
    sys!(__NR_fsopen, Rule::Delegate),
    sys!(__NR_fsconfig, Rule::Delegate),
    sys!(__NR_fsmount, Rule::Delegate),
    sys!(__NR_fspick, Rule::Delegate),
    sys!(__NR_pidfd_open, Rule::Delegate).note("pids are the same in the proxy"),
    sys!(__NR_clone3, Rule::Handler(Handler::Clone3))
        .note(NEW_TASK)
        .partial("threads only; a new process gives ENOSYS (glibc then uses clone)"),
    sys!(__NR_close_range, Rule::Handler(Handler::CloseFds)),
    sys!(__NR_openat2, Rule::DelegatePath(1)),
    sys!(__NR_pidfd_getfd, Rule::Local)
        .note(OTHER_PID)
        .partial("the descriptor lands in the app process, not in the proxy with the others"),
    sys!(__NR_faccessat2, Rule::DelegatePath(1)),
    sys!(__NR_process_madvise, Rule::Local).note(OTHER_PID),
    sys!(__NR_epoll_pwait2, Rule::Delegate).never_restarted().mask_in(3),
    sys!(__NR_mount_setattr, Rule::Delegate),
    sys!(__NR_quotactl_fd, Rule::Delegate),
    sys!(__NR_landlock_create_ruleset, Rule::Delegate),
    sys!(__NR_landlock_add_rule, Rule::Delegate),
    sys!(__NR_landlock_restrict_self, Rule::Delegate),
    sys!(__NR_memfd_secret, Rule::Refuse(ENOSYS)).unsupported(SECRET),
    sys!(__NR_process_mrelease, Rule::Local).note(OTHER_PID),
    sys!(__NR_futex_waitv, Rule::Handler(Handler::WaitWithAppMask)),
    sys!(__NR_set_mempolicy_home_node, Rule::Local),
    // Newer than Debian's asm/unistd_64.h, which ends at 450: Linux 6.5 to 6.17.
    sys!(__NR_cachestat, Rule::Delegate),
    sys!(__NR_fchmodat2, Rule::Delegate),
    sys!(__NR_map_shadow_stack, Rule::Local),
    sys!(__NR_futex_wake, Rule::Local),
    sys!(__NR_futex_wait, Rule::Handler(Handler::WaitWithAppMask)),
    sys!(__NR_futex_requeue, Rule::Local),
    sys!(__NR_statmount, Rule::Delegate),
    sys!(__NR_listmount, Rule::Delegate),
    sys!(__NR_lsm_get_self_attr, Rule::Delegate),
    sys!(__NR_lsm_set_self_attr, Rule::Delegate),
    sys!(__NR_lsm_list_modules, Rule::Delegate),
    sys!(__NR_mseal, Rule::Local),
    sys!(__NR_setxattrat, Rule::Delegate),
    sys!(__NR_getxattrat, Rule::Delegate),
    sys!(__NR_listxattrat, Rule::Delegate),
    sys!(__NR_removexattrat, Rule::Delegate),
    sys!(__NR_open_tree_attr, Rule::Delegate),
    sys!(__NR_file_getattr, Rule::Delegate),
    sys!(__NR_file_setattr, Rule::Delegate),
];

/// Every x86-64 (64-bit ABI, not x32) system call of Linux 6.18, sorted by number.
pub static TABLE: &[Syscall] = ENTRIES;

/// Highest number in TABLE + 1.
pub const NR_LIMIT: usize = ENTRIES[ENTRIES.len() - 1].nr as usize + 1;

/// `ROUTE[nr]` is the entry for `nr`, built at compile time. Building it
/// also checks that the table is sorted strictly by number.
static ROUTE: [Option<&'static Syscall>; NR_LIMIT] = route();

const fn route() -> [Option<&'static Syscall>; NR_LIMIT] {
    let mut out: [Option<&'static Syscall>; NR_LIMIT] = [None; NR_LIMIT];
    let mut i = 0;
    while i < ENTRIES.len() {
        let s: &'static Syscall = &ENTRIES[i];
        if i > 0 && ENTRIES[i - 1].nr >= s.nr {
            panic!("syscall table not sorted strictly by number");
        }
        out[s.nr as usize] = Some(s);
        i += 1;
    }
    out
}

/// The entry for `nr`, None if no such x86-64 system call.
#[inline]
pub fn lookup(nr: usize) -> Option<&'static Syscall> {
    ROUTE.get(nr).copied().flatten()
}

/// Name of `nr`, "unknown" when there is no such x86-64 system call.
pub fn name(nr: usize) -> &'static str {
    lookup(nr).map_or("unknown", |s| s.name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sorted_strictly_by_number() {
        for w in TABLE.windows(2) {
            assert!(w[0].nr < w[1].nr, "{} ({}) before {} ({})", w[0].name, w[0].nr, w[1].name, w[1].nr);
        }
        assert_eq!(NR_LIMIT, TABLE[TABLE.len() - 1].nr as usize + 1);
        assert!(TABLE.iter().all(|s| s.nr < 512), "x32 entries do not belong here");
    }

    #[test]
    fn no_duplicate_names() {
        for (i, a) in TABLE.iter().enumerate() {
            for b in &TABLE[i + 1..] {
                assert_ne!(a.name, b.name, "numbers {} and {}", a.nr, b.nr);
            }
        }
    }

    #[test]
    fn lookup_agrees_with_table() {
        for n in 0..NR_LIMIT + 10 {
            let want = TABLE.iter().find(|s| s.nr as usize == n);
            match (lookup(n), want) {
                (None, None) => assert_eq!(name(n), "unknown"),
                (Some(got), Some(want)) => {
                    assert_eq!((got.nr, got.name, got.rule), (want.nr, want.name, want.rule));
                    assert_eq!(name(n), want.name);
                }
                (got, want) => panic!("{n}: lookup {got:?}, table {want:?}"),
            }
        }
        assert!(lookup(usize::MAX).is_none());
    }

    /// The table against the kernel's own header, an independent source
    /// (Debian's is older than linux-raw-sys: every call it names must be
    /// here, with its number).
    #[test]
    fn every_call_of_the_system_header_is_here() {
        let path = "/usr/include/x86_64-linux-gnu/asm/unistd_64.h";
        let text = std::fs::read_to_string(path)
            .unwrap_or_else(|e| panic!("{path}: {e} (Debian package linux-libc-dev, which libc6-dev brings)"));
        let mut seen = 0;
        for line in text.lines() {
            let mut w = line.split_whitespace();
            let (Some("#define"), Some(c), Some(n)) = (w.next(), w.next(), w.next()) else { continue };
            let (Some(name), Ok(nr)) = (c.strip_prefix("__NR_"), n.parse::<usize>()) else { continue };
            let s = lookup(nr).unwrap_or_else(|| panic!("{name} ({nr}) of {path} is not in the table"));
            assert_eq!(s.name, name, "number {nr}");
            seen += 1;
        }
        assert!(seen > 300, "only {seen} calls read from {path}");
    }

    #[test]
    fn spot_checks() {
        let rule = |nr: u32| lookup(nr as usize).unwrap().rule;
        assert_eq!(rule(__NR_read), Rule::Handler(Handler::Read));
        assert_eq!(rule(__NR_write), Rule::Delegate);
        assert_eq!(rule(__NR_openat), Rule::DelegatePath(1));
        assert_eq!(rule(__NR_mmap), Rule::Handler(Handler::Mmap));
        assert_eq!(rule(__NR_getpid), Rule::Local);
        assert_eq!(rule(__NR_io_uring_setup), Rule::Refuse(ENOSYS));
        assert_eq!(name(0), "read");
        assert_eq!(name(469), "file_setattr");
        assert_eq!(name(336), "uprobe");
        assert!(lookup(337).is_none() && lookup(423).is_none());
        let sendto = lookup(__NR_sendto as usize).unwrap();
        assert_eq!(sendto.sigpipe, Sigpipe::UnlessNoSignal(3));
        assert!(lookup(__NR_ppoll as usize).unwrap().never_restarted);
    }

    #[test]
    fn every_handler_has_a_row() {
        // Exhaustive: a new Handler variant must be added here and used.
        let all = |h: Handler| match h {
            Handler::Mmap
            | Handler::Munmap
            | Handler::Mprotect
            | Handler::Mremap
            | Handler::Brk
            | Handler::Madvise
            | Handler::RtSigaction
            | Handler::RtSigprocmask
            | Handler::RtSigsuspend
            | Handler::RtSigreturn
            | Handler::Pause
            | Handler::WaitWithAppMask
            | Handler::Sleep
            | Handler::Futex
            | Handler::Exit
            | Handler::ExitGroup
            | Handler::Execve
            | Handler::Execveat
            | Handler::Clone
            | Handler::Clone3
            | Handler::Fork
            | Handler::Vfork
            | Handler::Signalfd
            | Handler::Signalfd4
            | Handler::Read
            | Handler::CloseFds
            | Handler::ArchPrctl
            | Handler::Getppid
            | Handler::Rlimit
            | Handler::Credentials
            | Handler::Itimer => (),
        };
        let used: Vec<Handler> = TABLE
            .iter()
            .filter_map(|s| match s.rule {
                Rule::Handler(h) => Some(h),
                _ => None,
            })
            .collect();
        used.iter().for_each(|&h| all(h));
        assert_eq!(
            used.iter()
                .fold(Vec::new(), |mut v, h| {
                    if !v.contains(h) {
                        v.push(*h)
                    }
                    v
                })
                .len(),
            31
        );
    }

    #[test]
    fn rules_and_support_agree() {
        // 362 calls in Debian's header, plus uretprobe, uprobe and 451..=469.
        assert_eq!(TABLE.len(), 383);
        for s in TABLE {
            let refused = matches!(s.rule, Rule::Refuse(_));
            assert_eq!(refused, matches!(s.support, Support::Unsupported(_)), "{}", s.name);
            let delegated = matches!(s.rule, Rule::Delegate | Rule::DelegatePath(_));
            if s.sigpipe != Sigpipe::No || s.mask != CallMask::None {
                assert!(delegated, "{}: signal traits on a call that is not delegated", s.name);
            }
            for t in s.note.iter().chain(s.support.text().iter()) {
                assert!(!t.is_empty() && t.len() <= 80, "{}: {t:?}", s.name);
                // Lower case, unless it starts with a constant's name.
                let first = t.split_whitespace().next().unwrap_or("");
                let constant = first.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
                assert!(!t.starts_with(|c: char| c.is_ascii_uppercase()) || constant, "{}: {t:?}", s.name);
            }
        }
    }
}
