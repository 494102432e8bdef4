//! One table for every x86-64 system call, saying where it runs under the LWK.
//!
//! Every system call of the application is trapped (Syscall User Dispatch)
//! into the LWK, which looks its number up here:
//!
//! * **Local**: handled inside the LWK in the application process, either
//!   emulated or executed there with a raw system call. Memory, time,
//!   scheduling, identity and the application's own signals are local.
//! * **Delegated**: executed by the proxy with the application's raw
//!   arguments. The proxy owns every file descriptor of the application, its
//!   working directory and umask, and maps the application's memory at the
//!   same addresses, so pointers mean the same thing there. Everything that
//!   touches a descriptor, a path or system-wide state is delegated.
//! * **Special**: needs its own code path; the text says why (`lwk syscalls`
//!   shows it).
//!
//! Numbers and names follow `arch/x86/entry/syscalls/syscall_64.tbl` of
//! Linux 6.18 (the 64-bit ABI; x32 entries, 512 and up, are not here).
//! `lookup` is one load from a table built at compile time, so it can run in
//! the signal handler that receives every trapped call.

/// Where a system call runs under the LWK.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// Handled inside the LWK in the application process (emulated, or executed there directly).
    Local,
    /// Executed by the proxy process with the application's raw arguments.
    Delegated,
    /// Needs its own code path; the text says why (shown by `lwk syscalls`).
    Special(&'static str),
}

/// One x86-64 system call and where it runs.
#[derive(Clone, Copy, Debug)]
pub struct Syscall {
    pub nr: u32,
    pub name: &'static str,
    pub class: Class,
}

const LOCAL: Class = Class::Local;
const DELEGATED: Class = Class::Delegated;

// Why each special call cannot simply run in one of the two processes.
const NEW_TASK: Class = Class::Special("thread: own slot and proxy worker; process: copied memory, new proxy");
const EXEC: Class = Class::Special("replaces the image: the LWK restarts itself around the new program");
const WAIT: Class = Class::Special("children are the app process's own: waited for there");
const SIGNALFD: Class = Class::Special("a real signalfd in the app process, a pipe in the proxy for poll");
const OTHER_PID: Class = Class::Special("pid argument: app pid vs proxy pid");
const TRACE: Class = Class::Special("acts on a process: app process vs its proxy");
const FILTER: Class = Class::Special("acts on the calling process: app and proxy both issue its calls");
const RLIMIT: Class = Class::Special("limits split: NOFILE belongs to the proxy, the rest to the app");
const CREDS: Class = Class::Special("credentials must change in both processes");
const JOB: Class = Class::Special("job control: app process and proxy");
const NAMESPACE: Class = Class::Special("namespace of which process: app and proxy must agree");
const SYSV_MAP: Class = Class::Special("maps SysV memory into the address space: LWK must own it");
const RINGS: Class = Class::Special("shared rings mapped into the address space");
const UFFD: Class = Class::Special("watches the app's memory: must be created in the app process");
const SECRET: Class = Class::Special("secret memory mapped into the address space: LWK must own it");
const REMAP: Class = Class::Special("rearranges a file mapping: LWK must own the address space");
const PORT_IO: Class = Class::Special("port I/O privilege of the app process");
const UPROBE: Class = Class::Special("uprobe trampoline: valid only at the kernel's trampoline address");

const fn e(nr: u32, name: &'static str, class: Class) -> Syscall {
    Syscall { nr, name, class }
}

const ENTRIES: &[Syscall] = &[
    e(0, "read", DELEGATED),
    e(1, "write", DELEGATED),
    e(2, "open", DELEGATED),
    e(3, "close", DELEGATED),
    e(4, "stat", DELEGATED),
    e(5, "fstat", DELEGATED),
    e(6, "lstat", DELEGATED),
    e(7, "poll", DELEGATED),
    e(8, "lseek", DELEGATED),
    e(9, "mmap", LOCAL),
    e(10, "mprotect", LOCAL),
    e(11, "munmap", LOCAL),
    e(12, "brk", LOCAL),
    e(13, "rt_sigaction", LOCAL),
    e(14, "rt_sigprocmask", LOCAL),
    e(15, "rt_sigreturn", LOCAL),
    e(16, "ioctl", DELEGATED),
    e(17, "pread64", DELEGATED),
    e(18, "pwrite64", DELEGATED),
    e(19, "readv", DELEGATED),
    e(20, "writev", DELEGATED),
    e(21, "access", DELEGATED),
    e(22, "pipe", DELEGATED),
    e(23, "select", DELEGATED),
    e(24, "sched_yield", LOCAL),
    e(25, "mremap", LOCAL),
    e(26, "msync", LOCAL),
    e(27, "mincore", LOCAL),
    e(28, "madvise", LOCAL),
    e(29, "shmget", DELEGATED),
    e(30, "shmat", SYSV_MAP),
    e(31, "shmctl", DELEGATED),
    e(32, "dup", DELEGATED),
    e(33, "dup2", DELEGATED),
    e(34, "pause", LOCAL),
    e(35, "nanosleep", LOCAL),
    e(36, "getitimer", LOCAL),
    e(37, "alarm", LOCAL),
    e(38, "setitimer", LOCAL),
    e(39, "getpid", LOCAL),
    e(40, "sendfile", DELEGATED),
    e(41, "socket", DELEGATED),
    e(42, "connect", DELEGATED),
    e(43, "accept", DELEGATED),
    e(44, "sendto", DELEGATED),
    e(45, "recvfrom", DELEGATED),
    e(46, "sendmsg", DELEGATED),
    e(47, "recvmsg", DELEGATED),
    e(48, "shutdown", DELEGATED),
    e(49, "bind", DELEGATED),
    e(50, "listen", DELEGATED),
    e(51, "getsockname", DELEGATED),
    e(52, "getpeername", DELEGATED),
    e(53, "socketpair", DELEGATED),
    e(54, "setsockopt", DELEGATED),
    e(55, "getsockopt", DELEGATED),
    e(56, "clone", NEW_TASK),
    e(57, "fork", NEW_TASK),
    e(58, "vfork", NEW_TASK),
    e(59, "execve", EXEC),
    e(60, "exit", LOCAL),
    e(61, "wait4", WAIT),
    e(62, "kill", LOCAL),
    e(63, "uname", LOCAL),
    e(64, "semget", DELEGATED),
    e(65, "semop", DELEGATED),
    e(66, "semctl", DELEGATED),
    e(67, "shmdt", SYSV_MAP),
    e(68, "msgget", DELEGATED),
    e(69, "msgsnd", DELEGATED),
    e(70, "msgrcv", DELEGATED),
    e(71, "msgctl", DELEGATED),
    e(72, "fcntl", DELEGATED),
    e(73, "flock", DELEGATED),
    e(74, "fsync", DELEGATED),
    e(75, "fdatasync", DELEGATED),
    e(76, "truncate", DELEGATED),
    e(77, "ftruncate", DELEGATED),
    e(78, "getdents", DELEGATED),
    e(79, "getcwd", DELEGATED),
    e(80, "chdir", DELEGATED),
    e(81, "fchdir", DELEGATED),
    e(82, "rename", DELEGATED),
    e(83, "mkdir", DELEGATED),
    e(84, "rmdir", DELEGATED),
    e(85, "creat", DELEGATED),
    e(86, "link", DELEGATED),
    e(87, "unlink", DELEGATED),
    e(88, "symlink", DELEGATED),
    e(89, "readlink", DELEGATED),
    e(90, "chmod", DELEGATED),
    e(91, "fchmod", DELEGATED),
    e(92, "chown", DELEGATED),
    e(93, "fchown", DELEGATED),
    e(94, "lchown", DELEGATED),
    e(95, "umask", DELEGATED),
    e(96, "gettimeofday", LOCAL),
    e(97, "getrlimit", RLIMIT),
    e(98, "getrusage", LOCAL),
    e(99, "sysinfo", LOCAL),
    e(100, "times", LOCAL),
    e(101, "ptrace", TRACE),
    e(102, "getuid", LOCAL),
    e(103, "syslog", DELEGATED),
    e(104, "getgid", LOCAL),
    e(105, "setuid", CREDS),
    e(106, "setgid", CREDS),
    e(107, "geteuid", LOCAL),
    e(108, "getegid", LOCAL),
    e(109, "setpgid", JOB),
    e(110, "getppid", LOCAL),
    e(111, "getpgrp", LOCAL),
    e(112, "setsid", JOB),
    e(113, "setreuid", CREDS),
    e(114, "setregid", CREDS),
    e(115, "getgroups", LOCAL),
    e(116, "setgroups", CREDS),
    e(117, "setresuid", CREDS),
    e(118, "getresuid", LOCAL),
    e(119, "setresgid", CREDS),
    e(120, "getresgid", LOCAL),
    e(121, "getpgid", LOCAL),
    e(122, "setfsuid", CREDS),
    e(123, "setfsgid", CREDS),
    e(124, "getsid", LOCAL),
    e(125, "capget", LOCAL),
    e(126, "capset", CREDS),
    e(127, "rt_sigpending", LOCAL),
    e(128, "rt_sigtimedwait", LOCAL),
    e(129, "rt_sigqueueinfo", LOCAL),
    e(130, "rt_sigsuspend", LOCAL),
    e(131, "sigaltstack", LOCAL),
    e(132, "utime", DELEGATED),
    e(133, "mknod", DELEGATED),
    e(134, "uselib", LOCAL),
    e(135, "personality", LOCAL),
    e(136, "ustat", DELEGATED),
    e(137, "statfs", DELEGATED),
    e(138, "fstatfs", DELEGATED),
    e(139, "sysfs", DELEGATED),
    e(140, "getpriority", LOCAL),
    e(141, "setpriority", LOCAL),
    e(142, "sched_setparam", LOCAL),
    e(143, "sched_getparam", LOCAL),
    e(144, "sched_setscheduler", LOCAL),
    e(145, "sched_getscheduler", LOCAL),
    e(146, "sched_get_priority_max", LOCAL),
    e(147, "sched_get_priority_min", LOCAL),
    e(148, "sched_rr_get_interval", LOCAL),
    e(149, "mlock", LOCAL),
    e(150, "munlock", LOCAL),
    e(151, "mlockall", LOCAL),
    e(152, "munlockall", LOCAL),
    e(153, "vhangup", DELEGATED),
    e(154, "modify_ldt", LOCAL),
    e(155, "pivot_root", DELEGATED),
    e(156, "_sysctl", DELEGATED),
    e(157, "prctl", LOCAL),
    e(158, "arch_prctl", LOCAL),
    e(159, "adjtimex", LOCAL),
    e(160, "setrlimit", RLIMIT),
    e(161, "chroot", DELEGATED),
    e(162, "sync", DELEGATED),
    e(163, "acct", DELEGATED),
    e(164, "settimeofday", LOCAL),
    e(165, "mount", DELEGATED),
    e(166, "umount2", DELEGATED),
    e(167, "swapon", DELEGATED),
    e(168, "swapoff", DELEGATED),
    e(169, "reboot", DELEGATED),
    e(170, "sethostname", DELEGATED),
    e(171, "setdomainname", DELEGATED),
    e(172, "iopl", PORT_IO),
    e(173, "ioperm", PORT_IO),
    // create_module, get_kernel_syms, query_module, nfsservctl and 181-185 are
    // removed or were never implemented: Linux answers ENOSYS.
    e(174, "create_module", LOCAL),
    e(175, "init_module", DELEGATED),
    e(176, "delete_module", DELEGATED),
    e(177, "get_kernel_syms", LOCAL),
    e(178, "query_module", LOCAL),
    e(179, "quotactl", DELEGATED),
    e(180, "nfsservctl", DELEGATED),
    e(181, "getpmsg", LOCAL),
    e(182, "putpmsg", LOCAL),
    e(183, "afs_syscall", LOCAL),
    e(184, "tuxcall", LOCAL),
    e(185, "security", LOCAL),
    e(186, "gettid", LOCAL),
    e(187, "readahead", DELEGATED),
    e(188, "setxattr", DELEGATED),
    e(189, "lsetxattr", DELEGATED),
    e(190, "fsetxattr", DELEGATED),
    e(191, "getxattr", DELEGATED),
    e(192, "lgetxattr", DELEGATED),
    e(193, "fgetxattr", DELEGATED),
    e(194, "listxattr", DELEGATED),
    e(195, "llistxattr", DELEGATED),
    e(196, "flistxattr", DELEGATED),
    e(197, "removexattr", DELEGATED),
    e(198, "lremovexattr", DELEGATED),
    e(199, "fremovexattr", DELEGATED),
    e(200, "tkill", LOCAL),
    e(201, "time", LOCAL),
    e(202, "futex", LOCAL),
    e(203, "sched_setaffinity", LOCAL),
    e(204, "sched_getaffinity", LOCAL),
    e(205, "set_thread_area", LOCAL),
    e(206, "io_setup", DELEGATED),
    e(207, "io_destroy", DELEGATED),
    e(208, "io_getevents", DELEGATED),
    e(209, "io_submit", DELEGATED),
    e(210, "io_cancel", DELEGATED),
    e(211, "get_thread_area", LOCAL),
    e(212, "lookup_dcookie", DELEGATED),
    e(213, "epoll_create", DELEGATED),
    e(214, "epoll_ctl_old", LOCAL),
    e(215, "epoll_wait_old", LOCAL),
    e(216, "remap_file_pages", REMAP),
    e(217, "getdents64", DELEGATED),
    e(218, "set_tid_address", LOCAL),
    e(219, "restart_syscall", LOCAL),
    e(220, "semtimedop", DELEGATED),
    e(221, "fadvise64", DELEGATED),
    e(222, "timer_create", LOCAL),
    e(223, "timer_settime", LOCAL),
    e(224, "timer_gettime", LOCAL),
    e(225, "timer_getoverrun", LOCAL),
    e(226, "timer_delete", LOCAL),
    e(227, "clock_settime", LOCAL),
    e(228, "clock_gettime", LOCAL),
    e(229, "clock_getres", LOCAL),
    e(230, "clock_nanosleep", LOCAL),
    e(231, "exit_group", LOCAL),
    e(232, "epoll_wait", DELEGATED),
    e(233, "epoll_ctl", DELEGATED),
    e(234, "tgkill", LOCAL),
    e(235, "utimes", DELEGATED),
    e(236, "vserver", LOCAL),
    e(237, "mbind", LOCAL),
    e(238, "set_mempolicy", LOCAL),
    e(239, "get_mempolicy", LOCAL),
    e(240, "mq_open", DELEGATED),
    e(241, "mq_unlink", DELEGATED),
    e(242, "mq_timedsend", DELEGATED),
    e(243, "mq_timedreceive", DELEGATED),
    e(244, "mq_notify", DELEGATED),
    e(245, "mq_getsetattr", DELEGATED),
    e(246, "kexec_load", DELEGATED),
    e(247, "waitid", WAIT),
    e(248, "add_key", DELEGATED),
    e(249, "request_key", DELEGATED),
    e(250, "keyctl", DELEGATED),
    e(251, "ioprio_set", LOCAL),
    e(252, "ioprio_get", LOCAL),
    e(253, "inotify_init", DELEGATED),
    e(254, "inotify_add_watch", DELEGATED),
    e(255, "inotify_rm_watch", DELEGATED),
    e(256, "migrate_pages", LOCAL),
    e(257, "openat", DELEGATED),
    e(258, "mkdirat", DELEGATED),
    e(259, "mknodat", DELEGATED),
    e(260, "fchownat", DELEGATED),
    e(261, "futimesat", DELEGATED),
    e(262, "newfstatat", DELEGATED),
    e(263, "unlinkat", DELEGATED),
    e(264, "renameat", DELEGATED),
    e(265, "linkat", DELEGATED),
    e(266, "symlinkat", DELEGATED),
    e(267, "readlinkat", DELEGATED),
    e(268, "fchmodat", DELEGATED),
    e(269, "faccessat", DELEGATED),
    e(270, "pselect6", DELEGATED),
    e(271, "ppoll", DELEGATED),
    e(272, "unshare", NAMESPACE),
    e(273, "set_robust_list", LOCAL),
    e(274, "get_robust_list", LOCAL),
    e(275, "splice", DELEGATED),
    e(276, "tee", DELEGATED),
    e(277, "sync_file_range", DELEGATED),
    e(278, "vmsplice", DELEGATED),
    e(279, "move_pages", LOCAL),
    e(280, "utimensat", DELEGATED),
    e(281, "epoll_pwait", DELEGATED),
    e(282, "signalfd", SIGNALFD),
    e(283, "timerfd_create", DELEGATED),
    e(284, "eventfd", DELEGATED),
    e(285, "fallocate", DELEGATED),
    e(286, "timerfd_settime", DELEGATED),
    e(287, "timerfd_gettime", DELEGATED),
    e(288, "accept4", DELEGATED),
    e(289, "signalfd4", SIGNALFD),
    e(290, "eventfd2", DELEGATED),
    e(291, "epoll_create1", DELEGATED),
    e(292, "dup3", DELEGATED),
    e(293, "pipe2", DELEGATED),
    e(294, "inotify_init1", DELEGATED),
    e(295, "preadv", DELEGATED),
    e(296, "pwritev", DELEGATED),
    e(297, "rt_tgsigqueueinfo", LOCAL),
    e(298, "perf_event_open", DELEGATED),
    e(299, "recvmmsg", DELEGATED),
    e(300, "fanotify_init", DELEGATED),
    e(301, "fanotify_mark", DELEGATED),
    e(302, "prlimit64", RLIMIT),
    e(303, "name_to_handle_at", DELEGATED),
    e(304, "open_by_handle_at", DELEGATED),
    e(305, "clock_adjtime", LOCAL),
    e(306, "syncfs", DELEGATED),
    e(307, "sendmmsg", DELEGATED),
    e(308, "setns", NAMESPACE),
    e(309, "getcpu", LOCAL),
    e(310, "process_vm_readv", OTHER_PID),
    e(311, "process_vm_writev", OTHER_PID),
    e(312, "kcmp", OTHER_PID),
    e(313, "finit_module", DELEGATED),
    e(314, "sched_setattr", LOCAL),
    e(315, "sched_getattr", LOCAL),
    e(316, "renameat2", DELEGATED),
    e(317, "seccomp", FILTER),
    e(318, "getrandom", LOCAL),
    e(319, "memfd_create", DELEGATED),
    e(320, "kexec_file_load", DELEGATED),
    e(321, "bpf", DELEGATED),
    e(322, "execveat", EXEC),
    e(323, "userfaultfd", UFFD),
    e(324, "membarrier", LOCAL),
    e(325, "mlock2", LOCAL),
    e(326, "copy_file_range", DELEGATED),
    e(327, "preadv2", DELEGATED),
    e(328, "pwritev2", DELEGATED),
    e(329, "pkey_mprotect", LOCAL),
    e(330, "pkey_alloc", LOCAL),
    e(331, "pkey_free", LOCAL),
    e(332, "statx", DELEGATED),
    e(333, "io_pgetevents", DELEGATED),
    e(334, "rseq", LOCAL),
    // 335-336: called only from the kernel's uprobe trampolines (Linux 6.11, 6.18).
    e(335, "uretprobe", UPROBE),
    e(336, "uprobe", UPROBE),
    // From 424 on, numbers are shared by every architecture.
    e(424, "pidfd_send_signal", DELEGATED), // the pidfd is a descriptor: the proxy's
    e(425, "io_uring_setup", RINGS),
    e(426, "io_uring_enter", RINGS),
    e(427, "io_uring_register", RINGS),
    e(428, "open_tree", DELEGATED),
    e(429, "move_mount", DELEGATED),
    e(430, "fsopen", DELEGATED),
    e(431, "fsconfig", DELEGATED),
    e(432, "fsmount", DELEGATED),
    e(433, "fspick", DELEGATED),
    e(434, "pidfd_open", DELEGATED), // pids are the same in the proxy
    e(435, "clone3", NEW_TASK),
    e(436, "close_range", DELEGATED),
    e(437, "openat2", DELEGATED),
    e(438, "pidfd_getfd", OTHER_PID),
    e(439, "faccessat2", DELEGATED),
    e(440, "process_madvise", OTHER_PID),
    e(441, "epoll_pwait2", DELEGATED),
    e(442, "mount_setattr", DELEGATED),
    e(443, "quotactl_fd", DELEGATED),
    e(444, "landlock_create_ruleset", DELEGATED),
    e(445, "landlock_add_rule", DELEGATED),
    e(446, "landlock_restrict_self", DELEGATED),
    e(447, "memfd_secret", SECRET),
    e(448, "process_mrelease", OTHER_PID),
    e(449, "futex_waitv", LOCAL),
    e(450, "set_mempolicy_home_node", LOCAL),
    // Newer than Debian's asm/unistd_64.h, which ends at 450: Linux 6.5 to 6.17.
    e(451, "cachestat", DELEGATED),
    e(452, "fchmodat2", DELEGATED),
    e(453, "map_shadow_stack", LOCAL),
    e(454, "futex_wake", LOCAL),
    e(455, "futex_wait", LOCAL),
    e(456, "futex_requeue", LOCAL),
    e(457, "statmount", DELEGATED),
    e(458, "listmount", DELEGATED),
    e(459, "lsm_get_self_attr", DELEGATED),
    e(460, "lsm_set_self_attr", DELEGATED),
    e(461, "lsm_list_modules", DELEGATED),
    e(462, "mseal", LOCAL),
    e(463, "setxattrat", DELEGATED),
    e(464, "getxattrat", DELEGATED),
    e(465, "listxattrat", DELEGATED),
    e(466, "removexattrat", DELEGATED),
    e(467, "open_tree_attr", DELEGATED),
    e(468, "file_getattr", DELEGATED),
    e(469, "file_setattr", DELEGATED),
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

/// Class of `nr`, None if no such x86-64 system call.
#[inline]
pub fn class(nr: usize) -> Option<Class> {
    lookup(nr).map(|s| s.class)
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
                    assert_eq!(got.nr, want.nr);
                    assert_eq!(got.name, want.name);
                    assert_eq!(got.class, want.class);
                    assert_eq!(name(n), want.name);
                    assert_eq!(class(n), Some(want.class));
                }
                (got, want) => panic!("{n}: lookup {got:?}, table {want:?}"),
            }
        }
        assert!(lookup(usize::MAX).is_none());
    }

    #[test]
    fn spot_checks() {
        let check = |nr: usize, name: &str, class: Class| {
            let s = lookup(nr).unwrap();
            assert_eq!((s.name, s.class), (name, class), "{nr}");
        };
        check(0, "read", Class::Delegated);
        check(9, "mmap", Class::Local);
        check(59, "execve", EXEC);
        check(231, "exit_group", Class::Local);
        check(469, "file_setattr", Class::Delegated);
        check(56, "clone", NEW_TASK);
        check(435, "clone3", NEW_TASK);
        assert!(lookup(335).is_some() && lookup(336).is_some());
        assert!(lookup(337).is_none() && lookup(423).is_none());
    }

    #[test]
    fn count_and_reasons() {
        // 362 calls in Debian's header, plus uretprobe, uprobe and 451..=469.
        assert_eq!(TABLE.len(), 383);
        for s in TABLE {
            if let Class::Special(why) = s.class {
                assert!(!why.is_empty() && why.len() <= 70, "{}: {why:?}", s.name);
                assert!(!why.starts_with(|c: char| c.is_ascii_uppercase()), "{}", s.name);
            }
        }
    }
}
