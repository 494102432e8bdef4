//! The control region: one memfd that the supervisor creates and that the
//! LWK (in the application process), the proxy and the supervisor all map.
//! It carries the delegation channel, the log of address-space changes the
//! proxy must mirror, and the statistics. Everything in it is plain data
//! with atomics, because three processes read and write it concurrently.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicI32, AtomicI64, AtomicU32, AtomicU64, Ordering};

pub const CONTROL_MAGIC: u64 = u64::from_le_bytes(*b"LWKCTL01");

/// System-call numbers are below this; statistics are kept per number.
pub const NR_SLOTS: usize = 512;

/// Requests on a channel that are not system calls (above any syscall nr).
/// Apply the map log, nothing else.
pub const REQ_SYNC: u64 = 0x1_0000;
/// Make sure a proxy worker serves channel `args[0]` (a new application
/// thread). Workers outlive their threads and serve the slot's next one.
pub const REQ_NEW_WORKER: u64 = 0x1_0001;
/// The application's image was replaced (execve): drop every mirrored
/// mapping and close the application's close-on-exec descriptors.
pub const REQ_EXEC_RESET: u64 = 0x1_0002;
/// The application forks: fork the proxy too, and let the child proxy take
/// the control region `args[0]`, a descriptor of application process `args[1]`.
/// Answers the child proxy's pid.
pub const REQ_FORK: u64 = 0x1_0003;

/// The signal that interrupts a proxy worker's call (SIGRTMIN+8; the proxy
/// has no libc that would claim it): the LWK sends it to the worker of a
/// thread that has a signal pending while it waits for a delegated call.
/// Nothing else interrupts a worker, so no other thread's call is disturbed.
pub const NUDGE_SIGNAL: u64 = 42;

/// One channel, and one proxy worker, per application thread.
pub const MAX_CHANNELS: usize = 256;

/// `Header::options` bits.
pub const OPT_HUGE_OFF: u64 = 1 << 0;
pub const OPT_HUGE_REQUIRE: u64 = 1 << 1;
/// Print a note on stderr when huge pages cannot be had.
pub const OPT_VERBOSE: u64 = 1 << 2;
/// Pre-fault 4 KiB-page memory too, not only huge pages.
pub const OPT_PREFAULT_ALL: u64 = 1 << 3;

#[repr(C)]
pub struct Header {
    pub magic: AtomicU64,
    pub options: AtomicU64,
    /// How long either side of a channel spins before sleeping, in TSC cycles.
    pub spin_cycles: AtomicU64,
    pub app_pid: AtomicI32,
    pub proxy_pid: AtomicI32,
    /// The parent of `lwk run`: the application's parent as the user sees it.
    pub parent_pid: AtomicI32,
    /// `lwk run` itself: both children die with it.
    pub supervisor_pid: AtomicI32,
    /// The signal mask the application had when it called execve.
    pub exec_sigmask: AtomicU64,
    /// Which of the LWK's signals (1: SIGSYS, 2: SIGLWK, see
    /// kernel::signal) the application had ignored at execve: they stay
    /// ignored, as an ignored signal does across exec.
    pub exec_own_ignored: AtomicU32,
    /// A child's control region: 0 while the child copies its memory, 1 when
    /// done, 2 when it failed. The parent waits on it.
    pub fork_state: AtomicU32,
    /// The memfds backing application memory, as fd numbers in the
    /// application process: [4 KiB pages, 2 MiB pages, shared with forked
    /// children]; -1 when absent.
    pub memfd: [AtomicI32; 3],
    /// Set by the LWK when it fell back to 4 KiB pages.
    pub huge_fallback: AtomicU32,
    /// Set by the proxy when it failed to mirror a mapping (errno).
    pub mirror_error: AtomicI32,
    /// Set by the LWK when the application is about to run (entry reached).
    pub started: AtomicU32,
    /// The partition the application runs in (`lwk run --partition`).
    pub partition: PartitionInfo,
    /// `lwk run --selftest-restore N`: every N-th trapped system call the
    /// LWK saves its whole state, wipes it and restores it (0: never).
    pub selftest_restore: AtomicU64,
    /// A freeze of the application (FREEZE_*): the state of the protocol
    /// between a requester outside (`lwk checkpoint`, the node daemon) and
    /// the LWK (`kernel::freeze`). Also the futex word both sides wait on.
    pub freeze: AtomicU32,
    /// Why the last freeze failed (errno), 0 if it did not.
    pub freeze_error: AtomicI32,
    /// Bumped by the requester while it holds the application frozen (every
    /// few tens of milliseconds): a freeze whose requester stopped bumping
    /// it for a second (it died, or hangs) is undone. A pid would not do:
    /// the requester may be outside the application's pid namespace.
    pub freeze_heartbeat: AtomicU64,
    /// While FREEZE_FROZEN: the memfd (a descriptor of the application
    /// process) holding the saved state, a `kernel::freeze::FreezeExport`.
    pub freeze_fd: AtomicI32,
    /// A restore's gate (RESTORE_*): the restored application waits there,
    /// every thread still parked, until its restorer opens it.
    pub restore_gate: AtomicU32,
    /// A userfaultfd of the application process (descriptor + 1; 0: none),
    /// and one of the proxy's, in the private table of the proxy thread
    /// `proxy_uffd_tid`: a migration takes them (pidfd_getfd) to find the
    /// pages each process writes while memory is copied ahead (pre-copy).
    pub app_uffd: AtomicI32,
    pub proxy_uffd: AtomicI32,
    pub proxy_uffd_tid: AtomicI32,
    /// The `app_uffd` and `proxy_uffd` values whose `UFFDIO_API` handshake
    /// a migration already made (it can be made once per userfaultfd): a
    /// second migration, after one rolled back, skips it.
    pub app_uffd_ready: AtomicI32,
    pub proxy_uffd_ready: AtomicI32,
    /// The supervisor's end for a relay (descriptor + 1 in the supervisor's
    /// table; 0: none): a unix socket on which a migration hands over its
    /// connection to the destination, so that the supervisor (`lwk run`)
    /// keeps standing for the application there (its standard streams,
    /// signals and exit status go over it).
    pub relay_fd: AtomicI32,
    /// Set by a migration once the destination runs the application, just
    /// before the copy here is killed: the supervisor then takes the
    /// application's end from the relay, not from that death.
    pub migrated: AtomicU32,
    /// Credentials every proxy thread takes before it next serves a call
    /// (a restore's: the proxy starts with root's rights, to reach into
    /// the application process while that still has them).
    pub proxy_credentials: HandedCredentials,
}

/// Most supplementary groups a restored application keeps.
pub const MAX_GROUPS: usize = 256;

/// Credentials handed to another process's threads (each kernel task has
/// its own: each thread takes them itself).
#[repr(C)]
pub struct HandedCredentials {
    /// Bumped once the ids below are to be taken (0: never).
    pub generation: AtomicU32,
    pub n_groups: AtomicU32,
    /// Real, effective and saved.
    pub uid: [AtomicU32; 3],
    pub gid: [AtomicU32; 3],
    pub groups: [AtomicU32; MAX_GROUPS],
}

impl HandedCredentials {
    /// Hand over these ids (real, effective, saved) and groups; false, and
    /// nothing handed, when there are more than MAX_GROUPS groups.
    pub fn set(&self, uid: [u32; 3], gid: [u32; 3], groups: &[u32]) -> bool {
        if groups.len() > MAX_GROUPS {
            return false;
        }
        for i in 0..3 {
            self.uid[i].store(uid[i], Ordering::Relaxed);
            self.gid[i].store(gid[i], Ordering::Relaxed);
        }
        for (to, &g) in self.groups.iter().zip(groups) {
            to.store(g, Ordering::Relaxed);
        }
        self.n_groups.store(groups.len() as u32, Ordering::Relaxed);
        self.generation.fetch_add(1, Ordering::Release);
        true
    }

    /// What was handed: the user ids, the group ids, and how many groups
    /// went into `groups`. (Read after `generation`, with Acquire.)
    pub fn read(&self, groups: &mut [u32; MAX_GROUPS]) -> ([u32; 3], [u32; 3], usize) {
        let n = (self.n_groups.load(Ordering::Relaxed) as usize).min(MAX_GROUPS);
        for (g, from) in groups.iter_mut().zip(&self.groups[..n]) {
            *g = from.load(Ordering::Relaxed);
        }
        let ids = |a: &[AtomicU32; 3]| a.each_ref().map(|x| x.load(Ordering::Relaxed));
        (ids(&self.uid), ids(&self.gid), n)
    }

    /// Hand what these hold on to `to` (nothing, if nothing was handed).
    pub fn hand_to(&self, to: &HandedCredentials) {
        if self.generation.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut groups = [0u32; MAX_GROUPS];
        let (uid, gid, n) = self.read(&mut groups);
        to.set(uid, gid, &groups[..n]);
    }
}

/// The gate is closed: the restoring LWK parks there when it is ready.
pub const RESTORE_CLOSED: u32 = 0;
/// The restoring LWK is ready and waits at the gate.
pub const RESTORE_PARKED: u32 = 1;
/// The restorer opened the gate: the application runs.
pub const RESTORE_OPEN: u32 = 2;

/// No freeze: the application runs.
pub const FREEZE_NONE: u32 = 0;
/// The requester asks for a freeze (and signals the application's threads).
pub const FREEZE_REQUESTED: u32 = 1;
/// A thread of the application took the request and is parking the others.
pub const FREEZE_TAKEN: u32 = 2;
/// Every thread is parked and the state is in `freeze_fd`: the requester
/// reads it (and the application's memory) and then says FREEZE_RESUME.
pub const FREEZE_FROZEN: u32 = 3;
/// The requester lets the application go on.
pub const FREEZE_RESUME: u32 = 4;
/// The freeze could not be done (`freeze_error` says why); the
/// application runs on. The requester sets FREEZE_NONE when it has read it.
pub const FREEZE_FAILED: u32 = 5;

/// Where the application's CPUs and memory come from when it runs in a
/// partition. Written by the supervisor before the application starts,
/// copied into a forked child's region, read-only otherwise.
#[repr(C)]
pub struct PartitionInfo {
    /// Set bits: the partition's CPUs. All zero: no partition.
    pub cpus: [AtomicU64; PARTITION_CPU_WORDS],
    /// Page size of the partition's memory: 4096 (a tmpfs), 2 MiB or 1 GiB
    /// (a hugetlbfs mount whose pages are reserved for it).
    pub page_size: AtomicU64,
    /// NUL-terminated path of the directory in which the LWK creates the
    /// application's memory files (O_TMPFILE), packed in little-endian words.
    pub mem_dir: [AtomicU64; PARTITION_PATH_WORDS],
}

pub const PARTITION_CPU_WORDS: usize = 16;
pub const PARTITION_PATH_WORDS: usize = 32;

impl PartitionInfo {
    pub fn is_set(&self) -> bool {
        self.cpus.iter().any(|w| w.load(Ordering::Relaxed) != 0)
    }

    /// The `n`-th set CPU, round robin past the last one.
    pub fn nth_cpu(&self, n: usize) -> Option<usize> {
        let count: usize = self.cpus.iter().map(|w| w.load(Ordering::Relaxed).count_ones() as usize).sum();
        if count == 0 {
            return None;
        }
        let mut k = n % count;
        for (i, w) in self.cpus.iter().enumerate() {
            let mut bits = w.load(Ordering::Relaxed);
            while bits != 0 {
                let b = bits.trailing_zeros() as usize;
                if k == 0 {
                    return Some(i * 64 + b);
                }
                k -= 1;
                bits &= bits - 1;
            }
        }
        None
    }

    /// Record the partition; false if a CPU or the path does not fit.
    pub fn set(&self, cpus: &[usize], page_size: u64, mem_dir: &[u8]) -> bool {
        if mem_dir.len() >= PARTITION_PATH_WORDS * 8 || mem_dir.contains(&0) {
            return false;
        }
        let mut words = [0u64; PARTITION_CPU_WORDS];
        for &c in cpus {
            match words.get_mut(c / 64) {
                Some(w) => *w |= 1 << (c % 64),
                None => return false,
            }
        }
        let mut path = [0u8; PARTITION_PATH_WORDS * 8];
        path[..mem_dir.len()].copy_from_slice(mem_dir);
        for (i, w) in self.cpus.iter().enumerate() {
            w.store(words[i], Ordering::Relaxed);
        }
        for (i, w) in self.mem_dir.iter().enumerate() {
            w.store(u64::from_le_bytes(path[i * 8..i * 8 + 8].try_into().unwrap()), Ordering::Relaxed);
        }
        self.page_size.store(page_size, Ordering::Relaxed);
        true
    }

    /// The memory directory, NUL-terminated, into `buf`.
    pub fn mem_dir_into(&self, buf: &mut [u8; PARTITION_PATH_WORDS * 8]) {
        for (i, w) in self.mem_dir.iter().enumerate() {
            buf[i * 8..i * 8 + 8].copy_from_slice(&w.load(Ordering::Relaxed).to_le_bytes());
        }
    }

    pub fn copy_from(&self, other: &PartitionInfo) {
        for (a, b) in self.cpus.iter().zip(&other.cpus) {
            a.store(b.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        for (a, b) in self.mem_dir.iter().zip(&other.mem_dir) {
            a.store(b.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        self.page_size.store(other.page_size.load(Ordering::Relaxed), Ordering::Relaxed);
    }
}

pub const CH_IDLE: u32 = 0;
pub const CH_REQUEST: u32 = 1;
pub const CH_DONE: u32 = 2;

/// One request slot: the LWK posts (nr, args), the proxy answers ret.
/// `state` is also the futex word both sides sleep on.
#[repr(C, align(64))]
pub struct Channel {
    pub state: AtomicU32,
    pub client_sleeping: AtomicU32,
    pub server_sleeping: AtomicU32,
    /// The proxy worker's thread id, for interrupting its call.
    pub server_tid: AtomicI32,
    pub nr: AtomicU64,
    pub args: [AtomicU64; 6],
    pub ret: AtomicI64,
}

/// Where a mirrored mapping's pages come from.
pub const SRC_MEMFD_SMALL: u32 = 0;
pub const SRC_MEMFD_HUGE: u32 = 1;
/// A file descriptor of the application (which lives in the proxy),
/// mapped MAP_SHARED.
pub const SRC_APP_FD: u32 = 2;
/// A file descriptor of the application, mapped MAP_PRIVATE (read-only
/// file mappings: program text and data that is never written).
pub const SRC_APP_FD_PRIVATE: u32 = 3;
/// A file the LWK itself has open in the application process (the program
/// and its interpreter), mapped MAP_PRIVATE; `fd` is the LWK's descriptor.
pub const SRC_LWK_FD_PRIVATE: u32 = 4;
/// The memfd of MAP_SHARED|MAP_ANONYMOUS memory, which a fork shares with
/// the child instead of copying.
pub const SRC_MEMFD_SHARED: u32 = 5;

/// Which of `Header::memfd` a memfd source uses.
pub const fn memfd_slot(src: u32) -> Option<usize> {
    match src {
        SRC_MEMFD_SMALL => Some(0),
        SRC_MEMFD_HUGE => Some(1),
        SRC_MEMFD_SHARED => Some(2),
        _ => None,
    }
}

pub const OP_MAP: u32 = 1;
pub const OP_UNMAP: u32 = 2;
pub const OP_PROTECT: u32 = 3;
/// Move [addr, addr+len) to `offset` (an address), keeping the pages.
pub const OP_MOVE: u32 = 4;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct MapOp {
    pub kind: u32,
    pub prot: u32,
    pub addr: u64,
    pub len: u64,
    pub source: u32,
    pub fd: i32,
    pub offset: u64,
}

pub const MAPLOG_LEN: usize = 4096;

/// A single-producer ring of address-space changes. The LWK appends; the
/// proxy applies everything up to `head` before it executes a request, so
/// its view of the application's memory is current whenever it matters.
#[repr(C)]
pub struct MapLog {
    pub head: AtomicU64,
    pub tail: AtomicU64,
    pub ops: [UnsafeCell<MapOp>; MAPLOG_LEN],
}

#[repr(C)]
pub struct Counter {
    pub count: AtomicU64,
    pub cycles: AtomicU64,
}

#[repr(C)]
pub struct Stats {
    pub tsc_start: AtomicU64,
    pub tsc_end: AtomicU64,
    pub local: [Counter; NR_SLOTS],
    pub delegated: [Counter; NR_SLOTS],
    /// Application memory currently mapped and its high-water mark, bytes.
    pub mem_current: AtomicU64,
    pub mem_peak: AtomicU64,
    /// Of which on 2 MiB pages.
    pub huge_current: AtomicU64,
    pub huge_peak: AtomicU64,
    /// Restores of the LWK's state onto itself (`selftest_restore`).
    pub restores: AtomicU64,
}

#[repr(C)]
pub struct Control {
    pub header: Header,
    pub channels: [Channel; MAX_CHANNELS],
    pub maplog: MapLog,
    pub stats: Stats,
}

// SAFETY: every field is an atomic except the map-log entries, which have a
// single writer (the LWK) and are published to the reader (the proxy) by a
// release store of `head` and consumed only below an acquire load of it.
unsafe impl Sync for Control {}

/// Size of the control memfd, rounded to whole pages.
pub const CONTROL_SIZE: usize = (core::mem::size_of::<Control>() + 4095) & !4095;

impl Counter {
    pub fn add(&self, cycles: u64) {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.cycles.fetch_add(cycles, Ordering::Relaxed);
    }
}

impl Stats {
    pub fn add_memory(&self, bytes: u64, huge: bool) {
        let now = self.mem_current.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.mem_peak.fetch_max(now, Ordering::Relaxed);
        if huge {
            let now = self.huge_current.fetch_add(bytes, Ordering::Relaxed) + bytes;
            self.huge_peak.fetch_max(now, Ordering::Relaxed);
        }
    }
    pub fn sub_memory(&self, bytes: u64, huge: bool) {
        self.mem_current.fetch_sub(bytes, Ordering::Relaxed);
        if huge {
            self.huge_current.fetch_sub(bytes, Ordering::Relaxed);
        }
    }
}

impl MapLog {
    /// Append one op. Returns false when the ring is full (the caller must
    /// make the proxy drain it first).
    ///
    /// # Safety
    /// Only one writer at a time (the LWK holds its memory lock).
    pub unsafe fn push(&self, op: MapOp) -> bool {
        let head = self.head.load(Ordering::Relaxed);
        if head - self.tail.load(Ordering::Acquire) >= MAPLOG_LEN as u64 {
            return false;
        }
        // SAFETY: the slot is not visible to the reader until head moves.
        unsafe { *self.ops[(head % MAPLOG_LEN as u64) as usize].get() = op };
        self.head.store(head + 1, Ordering::Release);
        true
    }

    /// Take every published op, oldest first.
    ///
    /// # Safety
    /// Only one reader at a time.
    pub unsafe fn drain(&self, mut apply: impl FnMut(&MapOp)) {
        let head = self.head.load(Ordering::Acquire);
        let mut tail = self.tail.load(Ordering::Relaxed);
        while tail < head {
            // SAFETY: slots below head are published and not rewritten
            // until tail passes them.
            let op = unsafe { *self.ops[(tail % MAPLOG_LEN as u64) as usize].get() };
            apply(&op);
            tail += 1;
            self.tail.store(tail, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Checked when the crate compiles.
    const _: () = assert!(CONTROL_SIZE.is_multiple_of(4096) && CONTROL_SIZE < 4 << 20);
    const _: () = assert!(crate::syscalls::NR_LIMIT <= NR_SLOTS);

    #[test]
    fn partition_cpus_round_robin_and_path_round_trips() {
        // SAFETY: PartitionInfo is atomics only, valid when zeroed.
        let p: Box<PartitionInfo> = unsafe { Box::new(core::mem::zeroed()) };
        assert!(!p.is_set());
        assert_eq!(p.nth_cpu(0), None);
        assert!(p.set(&[3, 70, 5], 2 << 20, b"/run/lwk/partitions/a/mem"));
        assert!(p.is_set());
        let order: Vec<_> = (0..5).map(|n| p.nth_cpu(n).unwrap()).collect();
        assert_eq!(order, [3, 5, 70, 3, 5]);
        let mut buf = [0u8; PARTITION_PATH_WORDS * 8];
        p.mem_dir_into(&mut buf);
        assert_eq!(&buf[..26], b"/run/lwk/partitions/a/mem\0");
        assert!(!p.set(&[4096], 4096, b"/x"), "a CPU beyond the bitmap is refused");
        assert!(!p.set(&[1], 4096, &[b'a'; 256]), "a path without room for its NUL is refused");
    }

    #[test]
    fn maplog_preserves_order_and_reports_full() {
        // SAFETY: MapLog is plain data and atomics, valid when zeroed; this
        // test is its only writer and reader (push's and drain's contract).
        unsafe {
            let log: Box<MapLog> = Box::new(core::mem::zeroed());
            for i in 0..MAPLOG_LEN as u64 {
                assert!(log.push(MapOp { addr: i, ..Default::default() }));
            }
            assert!(!log.push(MapOp::default()));
            let mut seen = Vec::new();
            log.drain(|op| seen.push(op.addr));
            assert_eq!(seen, (0..MAPLOG_LEN as u64).collect::<Vec<_>>());
            assert!(log.push(MapOp::default()));
        }
    }
}
