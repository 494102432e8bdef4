//! Pages written since the last look: userfaultfd write-protection in
//! async mode and the `PAGEMAP_SCAN` ioctl, for pre-copy.
//!
//! Application memory is MAP_SHARED memory-file memory mapped in two
//! processes at the same addresses: the application process and its proxy
//! (which writes into it for every `read`). A scan of one process sees only
//! the writes made through that process's own mappings, so the migration
//! side keeps one [`WriteTracker`] per process and joins what they find in
//! one [`DirtySet`].
//!
//! How a round goes:
//!
//! 1. each process created a userfaultfd at start, and left it alone (no
//!    `UFFDIO_API`: the tracker does the handshake); the migration side
//!    takes it with [`take_userfaultfd`] (`pidfd_getfd`) and builds
//!    [`WriteTracker::for_process`]. A userfaultfd acts on the address space
//!    of the process that created it, whoever makes the ioctl;
//! 2. [`WriteTracker::track`] registers each memory range in write-protect
//!    mode and write-protects it; from then on the first write to a page
//!    marks it written (the kernel resolves the fault itself: async mode);
//! 3. each round, [`WriteTracker::scan_and_reprotect`] on every tracker adds
//!    the written pages to the round's [`DirtySet`] and write-protects them
//!    again in the same walk, so a write racing with the scan is either in
//!    this round's set or in the next one's, never lost;
//! 4. ranges mapped or unmapped between rounds reach the trackers through
//!    [`WriteTracker::apply`] (see [`MappingChange`]).

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use rustix::mm::UserfaultfdFlags;
use rustix::process::{pidfd_getfd, pidfd_open, Pid, PidfdFlags, PidfdGetfdFlags};

/// The kernel interface: structs and constants from `<linux/userfaultfd.h>`
/// and `<linux/fs.h>` (the `PAGEMAP_SCAN` part). libc carries none of
/// them; linux-raw-sys 0.12 carries all but the two defined here.
mod uapi {
    pub use linux_raw_sys::general::{
        page_region, pm_scan_arg, uffdio_api, uffdio_range, uffdio_register, uffdio_writeprotect, PAGE_IS_WRITTEN,
        PM_SCAN_CHECK_WPASYNC, PM_SCAN_WP_MATCHING, UFFDIO_REGISTER_MODE_WP, UFFD_API, UFFD_FEATURE_WP_ASYNC,
        UFFD_FEATURE_WP_HUGETLBFS_SHMEM, UFFD_FEATURE_WP_UNPOPULATED,
    };
    pub use linux_raw_sys::ioctl::{UFFDIO_API, UFFDIO_REGISTER, UFFDIO_UNREGISTER, UFFDIO_WRITEPROTECT};

    /// `<linux/userfaultfd.h>`: `UFFDIO_WRITEPROTECT_MODE_WP` (protect; its
    /// absence unprotects).
    pub const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;

    /// `<linux/fs.h>`: `_IOWR(PAGEMAP_IOCTL_MAGIC = 'f', 16, struct pm_scan_arg)`.
    pub const PAGEMAP_SCAN: u32 = rustix::ioctl::opcode::read_write::<pm_scan_arg>(b'f', 16);
}

/// The userfaultfd features write tracking needs: write-protect faults
/// resolved by the kernel (`WP_ASYNC`), on shmem and hugetlb memory
/// (`WP_HUGETLBFS_SHMEM`), including pages not yet populated
/// (`WP_UNPOPULATED`: a page first written after the protection counts).
const TRACKING_FEATURES: u64 =
    (uapi::UFFD_FEATURE_WP_ASYNC | uapi::UFFD_FEATURE_WP_HUGETLBFS_SHMEM | uapi::UFFD_FEATURE_WP_UNPOPULATED) as u64;

/// Result regions asked of the kernel per `PAGEMAP_SCAN` call. The kernel
/// walks with a buffer of 512 regions of its own and copies out after each
/// walk; more than that per call saves calls when much is written.
const SCAN_BATCH: usize = 4096;

/// The size of the pages behind a range: 4 KiB, or a huge page size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PageSize(u64);

impl PageSize {
    /// The base page (memfd, anonymous memory).
    pub const BASE: PageSize = PageSize(4096);
    /// A 2 MiB huge page (`MFD_HUGETLB` memfd, hugetlbfs).
    pub const HUGE_2M: PageSize = PageSize(2 << 20);
    /// A 1 GiB huge page.
    pub const HUGE_1G: PageSize = PageSize(1 << 30);

    /// A page size of `bytes`: a power of two, at least 4 KiB.
    pub const fn new(bytes: u64) -> Option<PageSize> {
        if bytes >= 4096 && bytes.is_power_of_two() {
            Some(PageSize(bytes))
        } else {
            None
        }
    }

    pub const fn bytes(self) -> u64 {
        self.0
    }

    fn align_down(self, addr: u64) -> u64 {
        addr & !(self.0 - 1)
    }

    fn align_up(self, addr: u64) -> u64 {
        addr.saturating_add(self.0 - 1) & !(self.0 - 1)
    }
}

/// Addresses `[start, end)` made of whole pages of `page_size`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageRange {
    pub start: u64,
    pub end: u64,
    pub page_size: PageSize,
}

impl PageRange {
    pub fn bytes(&self) -> u64 {
        self.end - self.start
    }

    pub fn pages(&self) -> u64 {
        self.bytes() / self.page_size.bytes()
    }
}

/// Written pages, as disjoint address ranges sorted by address; neighbours
/// of one page size are merged. Joining the sets of several processes is
/// a union ([`DirtySet::join`]), so a page written through both the
/// application's and the proxy's mapping counts once.
///
/// Every range is whole pages: adding part of a 2 MiB page adds the whole
/// page, since a huge page is copied whole. An address has one page size
/// (the memory file behind it decides); if ranges of two sizes ever meet
/// (a range unmapped and mapped again with another page size while a set
/// was kept), the larger page wins where they overlap.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DirtySet {
    /// start -> (end, page size)
    ranges: BTreeMap<u64, (u64, PageSize)>,
}

impl DirtySet {
    pub fn new() -> DirtySet {
        DirtySet::default()
    }

    /// Add the pages of `page_size` that hold any byte of `range`.
    pub fn insert(&mut self, range: Range<u64>, page_size: PageSize) {
        let start = page_size.align_down(range.start);
        let end = page_size.align_up(range.end);
        if start >= end {
            return;
        }
        // What larger pages already cover stays theirs.
        let mut pieces = vec![(start, end)];
        for (s, e, p) in self.overlapping(start, end) {
            if p > page_size {
                pieces = subtract(&pieces, s, e);
            }
        }
        for (s, e) in pieces {
            self.insert_exact(s, e, page_size);
        }
    }

    /// `[start, end)` overlaps no range of a larger page size.
    fn insert_exact(&mut self, mut start: u64, mut end: u64, page_size: PageSize) {
        let (old_start, old_end) = (start, end);
        for (s, e, p) in self.neighbours(start, end) {
            if p == page_size {
                self.ranges.remove(&s);
                start = start.min(s);
                end = end.max(e);
            } else if s < old_end && e > old_start {
                // A smaller page size gives way; what it had outside stays.
                self.ranges.remove(&s);
                if s < old_start {
                    self.ranges.insert(s, (old_start, p));
                }
                if e > old_end {
                    self.ranges.insert(old_end, (e, p));
                }
            }
        }
        self.ranges.insert(start, (end, page_size));
    }

    /// Drop `range` (memory unmapped: nothing there to copy any more).
    pub fn remove(&mut self, range: Range<u64>) {
        for (s, e, p) in self.overlapping(range.start, range.end) {
            self.ranges.remove(&s);
            if s < range.start {
                self.ranges.insert(s, (range.start, p));
            }
            if e > range.end {
                self.ranges.insert(range.end, (e, p));
            }
        }
    }

    /// Add every page of `other` (the set of another process's tracker).
    pub fn join(&mut self, other: &DirtySet) {
        for r in other.ranges() {
            self.insert(r.start..r.end, r.page_size);
        }
    }

    /// The merged ranges, by address.
    pub fn ranges(&self) -> impl Iterator<Item = PageRange> + '_ {
        self.ranges.iter().map(|(&start, &(end, page_size))| PageRange { start, end, page_size })
    }

    /// Whether the page holding `addr` is in the set.
    pub fn contains(&self, addr: u64) -> bool {
        self.ranges.range(..=addr).next_back().is_some_and(|(_, &(end, _))| addr < end)
    }

    /// Bytes to copy.
    pub fn bytes(&self) -> u64 {
        self.ranges().map(|r| r.bytes()).sum()
    }

    /// Pages to copy, each huge page counting one.
    pub fn pages(&self) -> u64 {
        self.ranges().map(|r| r.pages()).sum()
    }

    /// Number of merged ranges.
    pub fn range_count(&self) -> usize {
        self.ranges.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    pub fn clear(&mut self) {
        self.ranges.clear();
    }

    /// Ranges that overlap `[start, end)`, as (start, end, page size).
    fn overlapping(&self, start: u64, end: u64) -> Vec<(u64, u64, PageSize)> {
        self.neighbours(start, end).into_iter().filter(|&(s, e, _)| s < end && e > start).collect()
    }

    /// Ranges that overlap or touch `[start, end)`.
    fn neighbours(&self, start: u64, end: u64) -> Vec<(u64, u64, PageSize)> {
        let mut found = Vec::new();
        for (&s, &(e, p)) in self.ranges.range(..=end).rev() {
            // Disjoint and sorted: once one ends before `start`, all do.
            if e < start {
                break;
            }
            found.push((s, e, p));
        }
        found
    }
}

/// `pieces` without `[start, end)`.
fn subtract(pieces: &[(u64, u64)], start: u64, end: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::with_capacity(pieces.len() + 1);
    for &(s, e) in pieces {
        if e <= start || s >= end {
            out.push((s, e));
            continue;
        }
        if s < start {
            out.push((s, start));
        }
        if e > end {
            out.push((end, e));
        }
    }
    out
}

/// What one call of [`WriteTracker::scan_and_reprotect`] found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScanReport {
    /// Regions the kernel reported (after dropping repeats).
    pub regions: u64,
    /// Bytes reported written, each at most once.
    pub bytes: u64,
    /// `PAGEMAP_SCAN` calls made.
    pub calls: u64,
    /// Bytes the kernel reported a second time after a resumed walk, and
    /// that were dropped (see [`WriteTracker::scan_and_reprotect`]).
    pub repeated_bytes: u64,
}

/// A change of a process's memory map between rounds, as the memory
/// manager logs it.
///
/// The LWK logs every change of the application's address space in its
/// map log (`lwk_abi::control::MapLog`; the proxy replays it to mirror the
/// memory). The pre-copy driver turns the log's entries into these:
/// `OP_MAP` is `Mapped` (a `MAP_FIXED` over an old mapping replaces it,
/// registration included), `OP_UNMAP` is `Unmapped`, `OP_MOVE` is
/// `Unmapped` of the old range then `Mapped` of the new (mremap drops the
/// userfaultfd registration of what it moves); `OP_PROTECT` changes
/// nothing here. The log has one reader, the proxy, so the driver follows
/// it with a cursor of its own or has the proxy pass the entries on; this
/// module does not decide which.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MappingChange {
    Mapped { range: Range<u64>, page_size: PageSize },
    Unmapped { range: Range<u64> },
}

#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    #[error("userfaultfd(O_CLOEXEC|O_NONBLOCK): {0} (needs CAP_SYS_PTRACE or vm.unprivileged_userfaultfd=1)")]
    CreateUserfaultfd(#[source] io::Error),
    #[error("pidfd_open({pid}): {source} (has the process exited?)")]
    PidfdOpen {
        pid: i32,
        #[source]
        source: io::Error,
    },
    #[error("pidfd_getfd of descriptor {fd} of process {pid}: {source} (needs ptrace access to the process: root, or the same user with ptrace_scope 0)")]
    TakeUserfaultfd {
        pid: i32,
        fd: RawFd,
        #[source]
        source: io::Error,
    },
    #[error("UFFDIO_API on the userfaultfd of process {pid}: {source} (EINVAL: its creator already made the handshake, which must be left to the tracker, or the kernel lacks write-protect async mode, Linux 6.7+)")]
    Handshake {
        pid: i32,
        #[source]
        source: io::Error,
    },
    #[error("the userfaultfd of process {pid} lacks features {missing:#x} (write-protect async on shmem and hugetlb, Linux 6.7+)")]
    MissingFeatures { pid: i32, missing: u64 },
    #[error("open /proc/{pid}/pagemap: {source}")]
    OpenPagemap {
        pid: i32,
        #[source]
        source: io::Error,
    },
    #[error("range {start:#x}..{end:#x} of process {pid} is empty or not aligned to its {page_size}-byte pages")]
    Misaligned { pid: i32, start: u64, end: u64, page_size: u64 },
    #[error("range {start:#x}..{end:#x} of process {pid} overlaps a range already tracked; untrack that first")]
    AlreadyTracked { pid: i32, start: u64, end: u64 },
    #[error("UFFDIO_REGISTER (write-protect mode) of {start:#x}..{end:#x} in process {pid}: {source} (is all of it mapped?)")]
    Register {
        pid: i32,
        start: u64,
        end: u64,
        #[source]
        source: io::Error,
    },
    #[error("UFFDIO_WRITEPROTECT of {start:#x}..{end:#x} in process {pid}: {source}")]
    WriteProtect {
        pid: i32,
        start: u64,
        end: u64,
        #[source]
        source: io::Error,
    },
    #[error("UFFDIO_UNREGISTER of {start:#x}..{end:#x} in process {pid}: {source}")]
    Unregister {
        pid: i32,
        start: u64,
        end: u64,
        #[source]
        source: io::Error,
    },
    #[error("the userfaultfd given for process {pid} is not that process's: after registering {start:#x}..{end:#x} through it, /proc/{pid}/pagemap finds the range unregistered")]
    NotThisProcess { pid: i32, start: u64, end: u64 },
    #[error("PAGEMAP_SCAN of {start:#x}..{end:#x} in process {pid}: part of the range is no longer registered for write tracking (mapped again without WriteTracker::apply?)")]
    Unregistered { pid: i32, start: u64, end: u64 },
    #[error("PAGEMAP_SCAN of {start:#x}..{end:#x} in process {pid}: {source}")]
    Scan {
        pid: i32,
        start: u64,
        end: u64,
        #[source]
        source: io::Error,
    },
    #[error("PAGEMAP_SCAN of {start:#x}..{end:#x} in process {pid} made no progress (walk_end {walk_end:#x})")]
    NoProgress { pid: i32, start: u64, end: u64, walk_end: u64 },
}

pub type Result<T> = std::result::Result<T, DirtyError>;

/// A userfaultfd for the calling process, as each tracked process makes one
/// at start (the LWK and the proxy, which are freestanding, make the same
/// call raw: `userfaultfd(O_CLOEXEC | O_NONBLOCK)`, no handshake).
pub fn create_userfaultfd() -> Result<OwnedFd> {
    // SAFETY: the descriptor only gives power over this process's memory
    // through ioctls that this module makes with ranges the caller chose.
    unsafe { rustix::mm::userfaultfd(UserfaultfdFlags::CLOEXEC | UserfaultfdFlags::NONBLOCK) }
        .map_err(|e| DirtyError::CreateUserfaultfd(e.into()))
}

/// Take descriptor `fd` (its userfaultfd) from process `pid`.
pub fn take_userfaultfd(pid: i32, fd: RawFd) -> Result<OwnedFd> {
    take(pid, fd, PidfdFlags::empty())
}

/// [`take_userfaultfd`] from the private descriptor table of thread `tid`
/// (a thread made without CLONE_FILES, as the proxy's watcher is).
pub fn take_userfaultfd_of_thread(tid: i32, fd: RawFd) -> Result<OwnedFd> {
    // PIDFD_THREAD (include/uapi/linux/pidfd.h; Linux 6.9), which rustix
    // does not name: O_EXCL.
    take(tid, fd, PidfdFlags::from_bits_retain(libc::O_EXCL as u32))
}

fn take(pid: i32, fd: RawFd, flags: PidfdFlags) -> Result<OwnedFd> {
    let source = |e: rustix::io::Errno| io::Error::from(e);
    let process =
        Pid::from_raw(pid).ok_or(DirtyError::PidfdOpen { pid, source: io::Error::from_raw_os_error(libc::ESRCH) })?;
    let pidfd = pidfd_open(process, flags).map_err(|e| DirtyError::PidfdOpen { pid, source: source(e) })?;
    pidfd_getfd(&pidfd, fd, PidfdGetfdFlags::empty()).map_err(|e| DirtyError::TakeUserfaultfd {
        pid,
        fd,
        source: source(e),
    })
}

/// `ioctl(fd, request, arg)`, its non-negative result or the error.
///
/// # Safety
/// `T` must be the struct the kernel reads and writes for `request`, and
/// any pointer inside `arg` must be valid for what the kernel does with it.
unsafe fn ioctl<T>(fd: BorrowedFd<'_>, request: u32, arg: &mut T) -> io::Result<i64> {
    // SAFETY: the caller vouches for the request and the argument's type;
    // `arg` is a live, exclusive reference for the call's duration.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), request as libc::c_ulong, arg as *mut T) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as i64)
    }
}

/// Finds the pages one process wrote through its own mappings.
///
/// Built on a userfaultfd of that process: ioctls on a userfaultfd act on
/// the address space of its creator, whoever calls them, so a tracker in
/// the migration tool registers and protects the application's (or the
/// proxy's) ranges through the descriptor it took. Scans read
/// `/proc/PID/pagemap` of the same process.
///
/// Dropping the tracker unregisters what it tracks, so a process left
/// running (a migration rolled back) stops paying for the faults.
pub struct WriteTracker {
    pid: i32,
    uffd: OwnedFd,
    pagemap: File,
    /// start -> (end, page size), one entry per registration.
    tracked: BTreeMap<u64, (u64, PageSize)>,
    /// Regions per `PAGEMAP_SCAN` call.
    scan_batch: usize,
}

impl WriteTracker {
    /// Track process `pid` through `uffd`, a userfaultfd that process
    /// created (taken with [`take_userfaultfd`]) and on which nobody made
    /// the `UFFDIO_API` handshake yet.
    pub fn for_process(pid: i32, uffd: OwnedFd) -> Result<WriteTracker> {
        Self::with_handshake(pid, uffd, true)
    }

    /// Track process `pid` through `uffd`, on which an earlier tracker
    /// already made the handshake (with these features: it can be made only
    /// once).
    pub fn for_process_again(pid: i32, uffd: OwnedFd) -> Result<WriteTracker> {
        Self::with_handshake(pid, uffd, false)
    }

    fn with_handshake(pid: i32, uffd: OwnedFd, handshake: bool) -> Result<WriteTracker> {
        if handshake {
            let mut api = uapi::uffdio_api { api: uapi::UFFD_API as u64, features: TRACKING_FEATURES, ioctls: 0 };
            // SAFETY: UFFDIO_API takes a struct uffdio_api, which `api` is.
            unsafe { ioctl(uffd.as_fd(), uapi::UFFDIO_API, &mut api) }
                .map_err(|source| DirtyError::Handshake { pid, source })?;
            // The kernel answers with every feature it has; the ones asked
            // for are on when the call succeeds, but say so plainly if not.
            let missing = TRACKING_FEATURES & !api.features;
            if missing != 0 {
                return Err(DirtyError::MissingFeatures { pid, missing });
            }
        }
        let pagemap =
            File::open(format!("/proc/{pid}/pagemap")).map_err(|source| DirtyError::OpenPagemap { pid, source })?;
        Ok(WriteTracker { pid, uffd, pagemap, tracked: BTreeMap::new(), scan_batch: SCAN_BATCH })
    }

    /// Track the calling process, with a userfaultfd of its own.
    pub fn for_self() -> Result<WriteTracker> {
        WriteTracker::for_process(std::process::id() as i32, create_userfaultfd()?)
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The ranges tracked, by address.
    pub fn tracked(&self) -> impl Iterator<Item = PageRange> + '_ {
        self.tracked.iter().map(|(&start, &(end, page_size))| PageRange { start, end, page_size })
    }

    /// Start tracking writes to `range` (mapped, aligned to `page_size`).
    ///
    /// The range is write-protected before its first scan: without it a
    /// 4 KiB mapping reports every page as written once, and hugetlb
    /// reports pages that were only read. Writes before this call are not
    /// seen: see [`WriteTracker::apply`] for new mappings.
    pub fn track(&mut self, range: Range<u64>, page_size: PageSize) -> Result<()> {
        let (pid, start, end) = (self.pid, range.start, range.end);
        let ps = page_size.bytes();
        if start >= end || start % ps != 0 || end % ps != 0 {
            return Err(DirtyError::Misaligned { pid, start, end, page_size: ps });
        }
        if self.tracked_overlapping(start, end).next().is_some() {
            return Err(DirtyError::AlreadyTracked { pid, start, end });
        }
        let mut register = uapi::uffdio_register {
            range: uapi::uffdio_range { start, len: end - start },
            mode: uapi::UFFDIO_REGISTER_MODE_WP as u64,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER takes a struct uffdio_register. It changes
        // only how faults in the range are handled, not its contents.
        unsafe { ioctl(self.uffd.as_fd(), uapi::UFFDIO_REGISTER, &mut register) }
            .map_err(|source| DirtyError::Register { pid, start, end, source })?;
        let protected = self.write_protect(start, end);
        let checked = protected.and_then(|()| self.check_registered(start, end));
        if let Err(e) = checked {
            // Leave nothing half done (best effort: the error says more).
            let _ = self.unregister(start, end);
            return Err(e);
        }
        self.tracked.insert(start, (end, page_size));
        Ok(())
    }

    /// Stop tracking `range` (any part of what is tracked): unregister it.
    /// For a range that is no longer mapped, see [`WriteTracker::forget`].
    pub fn untrack(&mut self, range: Range<u64>) -> Result<()> {
        for (s, e) in self.take_tracked(range.start, range.end) {
            self.unregister(s, e)?;
        }
        Ok(())
    }

    /// Stop tracking `range` without unregistering: its mapping is gone
    /// (unmapped or mapped over), and its registration with it.
    pub fn forget(&mut self, range: Range<u64>) {
        self.take_tracked(range.start, range.end);
    }

    /// Follow a change of the process's memory map (see [`MappingChange`]).
    ///
    /// A new mapping is tracked and, all of it, added to `dirty`: whatever
    /// was written there before the registration cannot be seen, so the
    /// whole range is copied once. Its protection comes first, so a write
    /// after it is found by the next scan, and one before it is in this
    /// copy. An unmapped range is forgotten and dropped from `dirty`.
    pub fn apply(&mut self, change: &MappingChange, dirty: &mut DirtySet) -> Result<()> {
        match change {
            MappingChange::Mapped { range, page_size } => {
                self.forget(range.clone());
                self.track(range.clone(), *page_size)?;
                dirty.insert(range.clone(), *page_size);
            }
            MappingChange::Unmapped { range } => {
                self.forget(range.clone());
                dirty.remove(range.clone());
            }
        }
        Ok(())
    }

    /// Add to `dirty` every page written through this process's mappings
    /// since it was tracked or last scanned, and write-protect those pages
    /// again in the same walk.
    ///
    /// A scan stops early when its result buffer is full and gives where it
    /// stopped (`walk_end`), from where the next call resumes. When one call
    /// produced more than 512 regions (the kernel's own buffer), `walk_end`
    /// can come back short of where the walk really got, and a resumed walk
    /// would report pages again; so a call that returned fewer regions than
    /// it had room for ends the scan, and anything reported below what an
    /// earlier call of the same scan reached is dropped (counted in
    /// [`ScanReport::repeated_bytes`]).
    pub fn scan_and_reprotect(&mut self, dirty: &mut DirtySet) -> Result<ScanReport> {
        let mut report = ScanReport::default();
        let mut buffer = vec![uapi::page_region { start: 0, end: 0, categories: 0 }; self.scan_batch];
        let ranges: Vec<PageRange> = self.tracked().collect();
        for range in ranges {
            self.scan_range(range, &mut buffer, dirty, &mut report)?;
        }
        Ok(report)
    }

    fn scan_range(
        &self,
        range: PageRange,
        buffer: &mut [uapi::page_region],
        dirty: &mut DirtySet,
        report: &mut ScanReport,
    ) -> Result<()> {
        let (pid, start, end) = (self.pid, range.start, range.end);
        let mut from = start;
        let mut reported_to = start;
        loop {
            let (count, walk_end) = self.pagemap_scan(from, end, buffer, true)?;
            report.calls += 1;
            for region in &buffer[..count] {
                let region_start = region.start.max(reported_to);
                report.repeated_bytes += region_start.min(region.end) - region.start;
                if region.end <= region_start {
                    continue;
                }
                dirty.insert(region_start..region.end, range.page_size);
                report.regions += 1;
                report.bytes += region.end - region_start;
                reported_to = region.end;
            }
            if count < buffer.len() || walk_end >= end {
                return Ok(());
            }
            if walk_end <= from {
                return Err(DirtyError::NoProgress { pid, start, end, walk_end });
            }
            from = walk_end;
        }
    }

    /// One `PAGEMAP_SCAN` of `[start, end)` for written pages, re-protecting
    /// them if `reprotect`: (regions in `buffer`, walk_end).
    fn pagemap_scan(
        &self,
        start: u64,
        end: u64,
        buffer: &mut [uapi::page_region],
        reprotect: bool,
    ) -> Result<(usize, u64)> {
        let pid = self.pid;
        let wp = if reprotect { uapi::PM_SCAN_WP_MATCHING } else { 0 };
        let mut arg = uapi::pm_scan_arg {
            size: std::mem::size_of::<uapi::pm_scan_arg>() as u64,
            // CHECK_WPASYNC: fail rather than report nothing when part of
            // the range is not registered in async write-protect mode.
            flags: (wp | uapi::PM_SCAN_CHECK_WPASYNC) as u64,
            start,
            end,
            walk_end: 0,
            vec: buffer.as_mut_ptr() as u64,
            vec_len: buffer.len() as u64,
            max_pages: 0,
            category_inverted: 0,
            category_mask: uapi::PAGE_IS_WRITTEN as u64,
            category_anyof_mask: 0,
            return_mask: uapi::PAGE_IS_WRITTEN as u64,
        };
        // SAFETY: PAGEMAP_SCAN takes a struct pm_scan_arg; its `vec` points
        // to `buffer`, valid for `vec_len` page_regions, exclusively ours.
        let count = unsafe { ioctl(self.pagemap.as_fd(), uapi::PAGEMAP_SCAN, &mut arg) }.map_err(|source| {
            if source.raw_os_error() == Some(libc::EPERM) {
                DirtyError::Unregistered { pid, start, end }
            } else {
                DirtyError::Scan { pid, start, end, source }
            }
        })?;
        Ok((count as usize, arg.walk_end))
    }

    fn write_protect(&self, start: u64, end: u64) -> Result<()> {
        let mut protect = uapi::uffdio_writeprotect {
            range: uapi::uffdio_range { start, len: end - start },
            mode: uapi::UFFDIO_WRITEPROTECT_MODE_WP,
        };
        // SAFETY: UFFDIO_WRITEPROTECT takes a struct uffdio_writeprotect; it
        // changes page protections, never contents.
        unsafe { ioctl(self.uffd.as_fd(), uapi::UFFDIO_WRITEPROTECT, &mut protect) }
            .map(|_| ())
            .map_err(|source| DirtyError::WriteProtect { pid: self.pid, start, end, source })
    }

    /// The registration must show in the tracked process's pagemap: if the
    /// userfaultfd was another process's, it registered that one's memory.
    fn check_registered(&self, start: u64, end: u64) -> Result<()> {
        let mut one = [uapi::page_region { start: 0, end: 0, categories: 0 }];
        match self.pagemap_scan(start, end, &mut one, false) {
            Err(DirtyError::Unregistered { .. }) => Err(DirtyError::NotThisProcess { pid: self.pid, start, end }),
            other => other.map(|_| ()),
        }
    }

    fn unregister(&self, start: u64, end: u64) -> Result<()> {
        let mut range = uapi::uffdio_range { start, len: end - start };
        // SAFETY: UFFDIO_UNREGISTER takes a struct uffdio_range; it removes
        // the range's registration and protection, never contents.
        unsafe { ioctl(self.uffd.as_fd(), uapi::UFFDIO_UNREGISTER, &mut range) }
            .map(|_| ())
            .map_err(|source| DirtyError::Unregister { pid: self.pid, start, end, source })
    }

    fn tracked_overlapping(&self, start: u64, end: u64) -> impl Iterator<Item = (u64, u64, PageSize)> + '_ {
        self.tracked.range(..end).rev().take_while(move |(_, &(e, _))| e > start).map(|(&s, &(e, p))| (s, e, p))
    }

    /// Remove `[start, end)` from the tracked ranges (keeping what lies
    /// outside it), returning the parts removed.
    fn take_tracked(&mut self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let hit: Vec<_> = self.tracked_overlapping(start, end).collect();
        let mut taken = Vec::with_capacity(hit.len());
        for (s, e, p) in hit {
            self.tracked.remove(&s);
            if s < start {
                self.tracked.insert(s, (start, p));
            }
            if e > end {
                self.tracked.insert(end, (e, p));
            }
            taken.push((s.max(start), e.min(end)));
        }
        taken
    }
}

impl Drop for WriteTracker {
    fn drop(&mut self) {
        for (&start, &(end, _)) in &self.tracked {
            // Best effort: the process may have exited or unmapped it.
            let _ = self.unregister(start, end);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::sync::Mutex;
    use std::time::Instant;

    const KIB4: u64 = 4096;
    const MIB2: u64 = 2 << 20;

    #[test]
    fn pagemap_scan_opcode_is_the_kernels() {
        // _IOWR('f', 16, 96 bytes), as <linux/fs.h> of Linux 6.7+ computes it.
        assert_eq!(std::mem::size_of::<uapi::pm_scan_arg>(), 96);
        assert_eq!(uapi::PAGEMAP_SCAN, 0xc060_6610);
    }

    #[test]
    fn dirty_set_merges_neighbours_and_rounds_to_pages() {
        let mut set = DirtySet::new();
        set.insert(0x1000..0x2000, PageSize::BASE);
        set.insert(0x3000..0x4000, PageSize::BASE);
        assert_eq!(set.range_count(), 2);
        set.insert(0x2000..0x3000, PageSize::BASE);
        assert_eq!(
            set.ranges().collect::<Vec<_>>(),
            [PageRange { start: 0x1000, end: 0x4000, page_size: PageSize::BASE }]
        );
        // One byte of a huge page dirties the whole page.
        set.insert(0x40_0001..0x40_0002, PageSize::HUGE_2M);
        assert_eq!(set.bytes(), 3 * KIB4 + MIB2);
        assert_eq!(set.pages(), 3 + 1);
        assert!(set.contains(0x5f_ffff) && !set.contains(0x60_0000) && !set.contains(0x4000));
        set.clear();
        assert!(set.is_empty());
    }

    #[test]
    fn dirty_set_join_is_a_union() {
        let mut app = DirtySet::new();
        let mut proxy = DirtySet::new();
        app.insert(0x10000..0x14000, PageSize::BASE);
        proxy.insert(0x12000..0x18000, PageSize::BASE);
        proxy.insert(0x30000..0x31000, PageSize::BASE);
        app.join(&proxy);
        let ranges: Vec<_> = app.ranges().map(|r| (r.start, r.end)).collect();
        assert_eq!(ranges, [(0x10000, 0x18000), (0x30000, 0x31000)]);
        assert_eq!(app.pages(), 9);
    }

    #[test]
    fn dirty_set_remove_and_mixed_page_sizes() {
        let mut set = DirtySet::new();
        set.insert(0..0x80_0000, PageSize::BASE);
        set.remove(0x1000..0x2000);
        assert_eq!(set.pages(), 0x800 - 1);
        // A huge page over small ones takes its place; small pages around it stay.
        set.insert(0x20_0000..0x40_0000, PageSize::HUGE_2M);
        let ranges: Vec<_> = set.ranges().map(|r| (r.start, r.end, r.page_size)).collect();
        assert_eq!(
            ranges,
            [
                (0, 0x1000, PageSize::BASE),
                (0x2000, 0x20_0000, PageSize::BASE),
                (0x20_0000, 0x40_0000, PageSize::HUGE_2M),
                (0x40_0000, 0x80_0000, PageSize::BASE),
            ]
        );
        // Small pages inside a huge one add nothing.
        set.insert(0x30_0000..0x30_1000, PageSize::BASE);
        assert_eq!(set.bytes(), 0x80_0000 - 0x1000);
        assert_eq!(set.pages(), 0x1ff + 1 + 0x400);
    }

    /// A MAP_SHARED mapping of a new memfd, unmapped on drop.
    struct SharedMapping {
        _memfd: OwnedFd,
        addr: u64,
        len: u64,
    }

    impl SharedMapping {
        fn new(len: u64, huge: bool, noreserve: bool) -> SharedMapping {
            use rustix::fs::MemfdFlags;
            let flags = if huge {
                MemfdFlags::CLOEXEC | MemfdFlags::HUGETLB | MemfdFlags::HUGE_2MB
            } else {
                MemfdFlags::CLOEXEC
            };
            let memfd = rustix::fs::memfd_create("lwk-dirty-test", flags).expect("memfd_create");
            rustix::fs::ftruncate(&memfd, len).expect("ftruncate");
            let extra = if noreserve { libc::MAP_NORESERVE } else { 0 };
            // SAFETY: a new mapping at an address the kernel picks; nothing
            // else is there.
            let addr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | extra,
                    memfd.as_raw_fd(),
                    0,
                )
            };
            assert_ne!(addr, libc::MAP_FAILED, "mmap: {}", io::Error::last_os_error());
            SharedMapping { _memfd: memfd, addr: addr as u64, len }
        }

        fn range(&self) -> Range<u64> {
            self.addr..self.addr + self.len
        }

        fn write(&self, offset: u64) {
            assert!(offset < self.len);
            // SAFETY: inside our own mapping, which lives as long as self.
            unsafe { std::ptr::write_volatile((self.addr + offset) as *mut u8, 0xa5) }
        }

        fn read(&self, offset: u64) -> u8 {
            assert!(offset < self.len);
            // SAFETY: inside our own mapping, which lives as long as self.
            unsafe { std::ptr::read_volatile((self.addr + offset) as *const u8) }
        }
    }

    impl Drop for SharedMapping {
        fn drop(&mut self) {
            // SAFETY: our mapping; nothing refers to it any more.
            unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len as usize) };
        }
    }

    /// Every page of `set`, by address.
    fn pages_of(set: &DirtySet) -> BTreeSet<u64> {
        set.ranges().flat_map(|r| (r.start..r.end).step_by(r.page_size.bytes() as usize)).collect()
    }

    fn addrs(map: &SharedMapping, pages: &[u64], page: u64) -> BTreeSet<u64> {
        pages.iter().map(|p| map.addr + p * page).collect()
    }

    fn scan(tracker: &mut WriteTracker) -> DirtySet {
        let mut set = DirtySet::new();
        tracker.scan_and_reprotect(&mut set).expect("scan_and_reprotect");
        set
    }

    #[test]
    #[ignore = "needs root (userfaultfd)"]
    fn own_4k_memfd_mapping_reports_exactly_the_written_pages() {
        let map = SharedMapping::new(256 * KIB4, false, false);
        // Some pages already there before tracking starts, written and read.
        map.write(0);
        map.write(7 * KIB4);
        let _ = map.read(9 * KIB4);
        let mut tracker = WriteTracker::for_self().unwrap();
        tracker.track(map.range(), PageSize::BASE).unwrap();
        assert!(scan(&mut tracker).is_empty(), "nothing written since tracking started");

        let written = [0, 1, 2, 7, 100, 255];
        for p in written {
            map.write(p * KIB4 + 5);
        }
        let _ = map.read(50 * KIB4);
        let set = scan(&mut tracker);
        assert_eq!(pages_of(&set), addrs(&map, &written, KIB4));
        assert_eq!((set.pages(), set.bytes(), set.range_count()), (6, 6 * KIB4, 4));
        assert!(scan(&mut tracker).is_empty(), "a second scan finds nothing");

        map.write(100 * KIB4);
        map.write(3 * KIB4);
        assert_eq!(pages_of(&scan(&mut tracker)), addrs(&map, &[3, 100], KIB4));

        // Untracked, nothing is reported; tracked again, writes are.
        tracker.untrack(map.range()).unwrap();
        map.write(4 * KIB4);
        assert!(scan(&mut tracker).is_empty());
        tracker.track(map.range(), PageSize::BASE).unwrap();
        assert!(scan(&mut tracker).is_empty());
        map.write(4 * KIB4);
        assert_eq!(pages_of(&scan(&mut tracker)), addrs(&map, &[4], KIB4));

        // Refusals.
        let unaligned = map.addr + 1..map.addr + KIB4;
        assert!(matches!(tracker.track(unaligned, PageSize::BASE), Err(DirtyError::Misaligned { .. })));
        let twice = tracker.track(map.addr..map.addr + KIB4, PageSize::BASE);
        assert!(matches!(twice, Err(DirtyError::AlreadyTracked { .. })));
    }

    #[test]
    #[ignore = "needs root (userfaultfd)"]
    fn mapping_changes_track_new_ranges_whole() {
        let map = SharedMapping::new(64 * KIB4, false, false);
        let mut tracker = WriteTracker::for_self().unwrap();
        let mut dirty = DirtySet::new();
        map.write(3 * KIB4); // before the memory manager's log reaches us
        tracker.apply(&MappingChange::Mapped { range: map.range(), page_size: PageSize::BASE }, &mut dirty).unwrap();
        assert_eq!(dirty.bytes(), map.len, "a new mapping is copied whole");
        dirty.clear();
        assert!(scan(&mut tracker).is_empty());
        map.write(5 * KIB4);
        tracker.scan_and_reprotect(&mut dirty).unwrap();
        assert_eq!(pages_of(&dirty), addrs(&map, &[5], KIB4));

        // Part of it unmapped: forgotten, and dropped from the set.
        let half = map.addr + 32 * KIB4;
        map.write(40 * KIB4);
        tracker.scan_and_reprotect(&mut dirty).unwrap();
        tracker.apply(&MappingChange::Unmapped { range: half..map.addr + map.len }, &mut dirty).unwrap();
        assert_eq!(pages_of(&dirty), addrs(&map, &[5], KIB4));
        assert_eq!(tracker.tracked().map(|r| (r.start, r.end)).collect::<Vec<_>>(), [(map.addr, half)]);

        // Mapped over (MAP_FIXED) without being told: the scan says so.
        let memfd = rustix::fs::memfd_create("lwk-dirty-over", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&memfd, KIB4).unwrap();
        // SAFETY: replaces one page of our own test mapping.
        let r = unsafe {
            libc::mmap(
                map.addr as *mut libc::c_void,
                KIB4 as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED,
                memfd.as_raw_fd(),
                0,
            )
        };
        assert_ne!(r, libc::MAP_FAILED);
        let err = tracker.scan_and_reprotect(&mut dirty).unwrap_err();
        assert!(matches!(err, DirtyError::Unregistered { .. }), "{err}");
        println!("a range mapped over, unreported: {err}");
        let change = MappingChange::Mapped { range: map.addr..map.addr + KIB4, page_size: PageSize::BASE };
        tracker.apply(&change, &mut dirty).unwrap();
        tracker.scan_and_reprotect(&mut dirty).unwrap();
    }

    /// Huge pages added to the 2 MiB pool for a test, given back on drop.
    struct HugePagePool {
        added: u64,
        set_to: u64,
        old: u64,
    }

    const NR_HUGEPAGES: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages";
    static HUGE_POOL_LOCK: Mutex<()> = Mutex::new(());

    fn nr_hugepages() -> u64 {
        std::fs::read_to_string(NR_HUGEPAGES).expect("read nr_hugepages").trim().parse().expect("nr_hugepages")
    }

    impl HugePagePool {
        /// `count` more 2 MiB huge pages, or a message saying why not.
        fn grow(count: u64) -> std::result::Result<HugePagePool, String> {
            let old = nr_hugepages();
            std::fs::write(NR_HUGEPAGES, (old + count).to_string())
                .map_err(|e| format!("write {NR_HUGEPAGES}: {e}"))?;
            let now = nr_hugepages();
            let pool = HugePagePool { added: now.saturating_sub(old), set_to: now, old };
            if now < old + count {
                return Err(format!(
                    "asked for {count} more 2 MiB huge pages, the kernel gave {} (memory too fragmented?)",
                    pool.added
                ));
            }
            Ok(pool)
        }
    }

    impl Drop for HugePagePool {
        fn drop(&mut self) {
            // Someone else may have changed the pool meanwhile: give back
            // only what we added.
            let now = nr_hugepages();
            let back = if now == self.set_to { self.old } else { now.saturating_sub(self.added) };
            let _ = std::fs::write(NR_HUGEPAGES, back.to_string());
        }
    }

    #[test]
    #[ignore = "needs root (userfaultfd, nr_hugepages)"]
    fn own_hugetlb_memfd_mapping_reports_whole_huge_pages() {
        let _one_at_a_time = HUGE_POOL_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let _pool = HugePagePool::grow(16).unwrap_or_else(|why| panic!("no huge pages for this test: {why}"));
        {
            let map = SharedMapping::new(8 * MIB2, true, false);
            map.write(6 * MIB2); // populated before tracking
            let mut tracker = WriteTracker::for_self().unwrap();
            let misaligned = tracker.track(map.addr..map.addr + KIB4, PageSize::HUGE_2M);
            assert!(matches!(misaligned, Err(DirtyError::Misaligned { .. })));
            tracker.track(map.range(), PageSize::HUGE_2M).unwrap();
            let _ = map.read(2 * MIB2);
            let _ = map.read(6 * MIB2);
            assert!(scan(&mut tracker).is_empty(), "reads are not writes once protected");

            map.write(MIB2 + 12345);
            map.write(4 * MIB2);
            map.write(5 * MIB2 + MIB2 - 1);
            let set = scan(&mut tracker);
            assert_eq!(pages_of(&set), addrs(&map, &[1, 4, 5], MIB2));
            assert_eq!((set.pages(), set.bytes()), (3, 3 * MIB2));
            assert!(scan(&mut tracker).is_empty());
            map.write(4 * MIB2 + 7);
            map.write(6 * MIB2 + 7);
            assert_eq!(pages_of(&scan(&mut tracker)), addrs(&map, &[4, 6], MIB2));
        }

        // 1 GiB of huge pages, 1% written, without reserving the whole GiB.
        let map = SharedMapping::new(512 * MIB2, true, true);
        let mut tracker = WriteTracker::for_self().unwrap();
        tracker.track(map.range(), PageSize::HUGE_2M).unwrap();
        let written: Vec<u64> = (0..512).step_by(100).collect();
        for &p in &written {
            map.write(p * MIB2);
        }
        let mut set = DirtySet::new();
        let t = Instant::now();
        tracker.scan_and_reprotect(&mut set).unwrap();
        let first = t.elapsed();
        for &p in &written {
            map.write(p * MIB2 + 1);
        }
        set.clear();
        let t = Instant::now();
        tracker.scan_and_reprotect(&mut set).unwrap();
        let again = t.elapsed();
        assert_eq!(pages_of(&set), addrs(&map, &written, MIB2));
        println!(
            "1 GiB of 2 MiB pages, {} written: scan + re-protect {:.3} ms (first touch) and {:.3} ms (written again)",
            written.len(),
            first.as_secs_f64() * 1e3,
            again.as_secs_f64() * 1e3
        );
    }

    /// Pages the child writes directly; and the one it fills by read()
    /// from a pipe, a kernel-mode write as the proxy makes for the LWK.
    const CHILD_PAGES: [u64; 4] = [1, 2, 40, 63];
    const CHILD_READ_PAGE: u64 = 20;
    const PARENT_PAGES: [u64; 3] = [2, 3, 50];

    /// A forked child that maps the parent's memfd at the same address (by
    /// inheritance), makes two userfaultfds, sends their numbers and writes
    /// its pages on command. Only raw calls after the fork: the test
    /// harness has other threads.
    struct Child {
        pid: i32,
        commands: OwnedFd,
        answers: OwnedFd,
    }

    impl Child {
        fn fork(map: &SharedMapping) -> Child {
            let (cmd_read, cmd_write) = rustix::pipe::pipe().unwrap();
            let (ans_read, ans_write) = rustix::pipe::pipe().unwrap();
            let (data_read, data_write) = rustix::pipe::pipe().unwrap();
            let addr = map.addr;
            // SAFETY: the child below makes only async-signal-safe raw calls
            // and leaves with _exit.
            let pid = unsafe { libc::fork() };
            assert!(pid >= 0, "fork: {}", io::Error::last_os_error());
            if pid == 0 {
                // SAFETY: in the child: raw calls on descriptors and memory it owns.
                unsafe {
                    child_main(
                        addr,
                        cmd_read.as_raw_fd(),
                        ans_write.as_raw_fd(),
                        [data_read.as_raw_fd(), data_write.as_raw_fd()],
                    )
                }
            }
            Child { pid, commands: cmd_write, answers: ans_read }
        }

        fn userfaultfds(&self) -> [RawFd; 2] {
            let mut buf = [0u8; 8];
            rustix::io::read(&self.answers, &mut buf).unwrap();
            [i32::from_ne_bytes(buf[..4].try_into().unwrap()), i32::from_ne_bytes(buf[4..].try_into().unwrap())]
        }

        fn command(&self, c: u8) {
            rustix::io::write(&self.commands, &[c]).unwrap();
            if c == b'w' {
                let mut ok = [0u8];
                rustix::io::read(&self.answers, &mut ok).unwrap();
                assert_eq!(&ok, b"k", "the child failed to write its pages");
            }
        }

        fn wait(self) {
            self.command(b'q');
            let mut status = 0;
            // SAFETY: our own child.
            unsafe { libc::waitpid(self.pid, &mut status, 0) };
            assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "child status {status:#x}");
        }
    }

    /// # Safety
    /// Only in a freshly forked child; `addr` maps 64 pages.
    unsafe fn child_main(addr: u64, commands: RawFd, answers: RawFd, data: [RawFd; 2]) -> ! {
        static FILL: [u8; 4096] = [0x5a; 4096];
        // SAFETY: raw calls on this process's own descriptors and its
        // inherited mapping of 64 pages at `addr`; the pages are in range.
        unsafe {
            let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
            let uffds = [
                libc::syscall(libc::SYS_userfaultfd, flags) as i32,
                libc::syscall(libc::SYS_userfaultfd, flags) as i32,
            ];
            if uffds[0] < 0 || uffds[1] < 0 {
                libc::_exit(2);
            }
            let mut numbers = [0u8; 8];
            numbers[..4].copy_from_slice(&uffds[0].to_ne_bytes());
            numbers[4..].copy_from_slice(&uffds[1].to_ne_bytes());
            libc::write(answers, numbers.as_ptr().cast(), 8);
            loop {
                let mut c = 0u8;
                if libc::read(commands, (&mut c as *mut u8).cast(), 1) != 1 || c != b'w' {
                    libc::_exit(0);
                }
                for p in CHILD_PAGES {
                    std::ptr::write_volatile((addr + p * 4096 + 9) as *mut u8, 0xc1);
                }
                let page = (addr + CHILD_READ_PAGE * 4096) as *mut libc::c_void;
                if libc::write(data[1], FILL.as_ptr().cast(), 4096) != 4096 || libc::read(data[0], page, 4096) != 4096 {
                    libc::_exit(3);
                }
                libc::write(answers, b"k".as_ptr().cast(), 1);
            }
        }
    }

    #[test]
    #[ignore = "needs root (pidfd_getfd)"]
    fn two_processes_each_tracked_through_their_own_userfaultfd_and_joined() {
        let map = SharedMapping::new(64 * KIB4, false, false);
        let child = Child::fork(&map);
        let [uffd, other_uffd] = child.userfaultfds();

        // The child's userfaultfd registers the child's memory: given as
        // ours, it is caught (our pagemap shows no registration).
        let me = std::process::id() as i32;
        let mut wrong = WriteTracker::for_process(me, take_userfaultfd(child.pid, other_uffd).unwrap()).unwrap();
        let err = wrong.track(map.range(), PageSize::BASE).unwrap_err();
        assert!(matches!(err, DirtyError::NotThisProcess { .. }), "{err}");
        drop(wrong);

        let mut child_tracker =
            WriteTracker::for_process(child.pid, take_userfaultfd(child.pid, uffd).unwrap()).unwrap();
        child_tracker.track(map.range(), PageSize::BASE).unwrap();
        let mut own_tracker = WriteTracker::for_self().unwrap();
        own_tracker.track(map.range(), PageSize::BASE).unwrap();

        child.command(b'w');
        for p in PARENT_PAGES {
            map.write(p * KIB4);
        }
        let by_child = scan(&mut child_tracker);
        let by_parent = scan(&mut own_tracker);
        let mut child_pages = CHILD_PAGES.to_vec();
        child_pages.push(CHILD_READ_PAGE);
        // Each sees only the writes through its own process's mapping...
        assert_eq!(pages_of(&by_child), addrs(&map, &child_pages, KIB4));
        assert_eq!(pages_of(&by_parent), addrs(&map, &PARENT_PAGES, KIB4));
        // ...and joined they are every write, a page written by both once.
        let mut joined = by_child.clone();
        joined.join(&by_parent);
        let all: BTreeSet<u64> = pages_of(&by_child).union(&pages_of(&by_parent)).copied().collect();
        assert_eq!(pages_of(&joined), all);
        assert_eq!(joined.pages(), 7);

        assert!(scan(&mut child_tracker).is_empty() && scan(&mut own_tracker).is_empty());
        child.command(b'w');
        assert_eq!(pages_of(&scan(&mut child_tracker)), addrs(&map, &child_pages, KIB4));
        assert!(scan(&mut own_tracker).is_empty(), "the child's writes are not the parent's");
        child.wait();
    }

    /// `count` distinct page numbers below `pages`, spread pseudo-randomly.
    fn sparse_pages(pages: u64, count: usize, mut seed: u64) -> BTreeSet<u64> {
        let mut chosen = BTreeSet::new();
        while chosen.len() < count {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            chosen.insert(seed % pages);
        }
        chosen
    }

    /// Runs of consecutive pages: the regions a scan reports.
    fn runs(pages: &BTreeSet<u64>) -> usize {
        pages.iter().filter(|&&p| p == 0 || !pages.contains(&(p - 1))).count()
    }

    #[test]
    #[ignore = "needs root (userfaultfd)"]
    fn one_gib_sparse_every_written_page_once_past_the_512_region_stop() {
        const PAGES: u64 = (1 << 30) / KIB4;
        let map = SharedMapping::new(PAGES * KIB4, false, false);
        let mut tracker = WriteTracker::for_self().unwrap();
        let t = Instant::now();
        tracker.track(map.range(), PageSize::BASE).unwrap();
        let track_time = t.elapsed();
        let count = (PAGES / 100) as usize;

        for (round, (seed, batch)) in
            [(0x9e37_79b9_7f4a_7c15, SCAN_BATCH), (0x2545_f491_4f6c_dd1d, 100), (7, SCAN_BATCH)].into_iter().enumerate()
        {
            let written = sparse_pages(PAGES, count, seed);
            assert!(runs(&written) > 512, "the early-stop case needs more than 512 regions");
            for p in &written {
                map.write(p * KIB4);
            }
            if round == 0 {
                // What the kernel does with one large buffer, without re-protecting.
                let mut buffer = vec![uapi::page_region { start: 0, end: 0, categories: 0 }; SCAN_BATCH];
                let (n, walk_end) = tracker.pagemap_scan(map.addr, map.addr + map.len, &mut buffer, false).unwrap();
                println!(
                    "one PAGEMAP_SCAN call, {} regions written: {n} returned, walk_end at {:#x} of {:#x}",
                    runs(&written),
                    walk_end - map.addr,
                    map.len
                );
            }
            tracker.scan_batch = batch;
            let mut set = DirtySet::new();
            let t = Instant::now();
            let report = tracker.scan_and_reprotect(&mut set).unwrap();
            let elapsed = t.elapsed();
            let expected: BTreeSet<u64> = written.iter().map(|p| map.addr + p * KIB4).collect();
            assert_eq!(pages_of(&set), expected, "round {round}");
            assert_eq!(report.bytes, count as u64 * KIB4, "round {round}: every page reported once ({report:?})");
            assert_eq!(report.regions as usize, runs(&written));
            println!(
                "1 GiB of 4 KiB pages, {count} written in {} regions, batch {batch}: scan + re-protect {:.3} ms, {} calls, {} bytes reported twice and dropped",
                runs(&written),
                elapsed.as_secs_f64() * 1e3,
                report.calls,
                report.repeated_bytes
            );
            assert!(scan(&mut tracker).is_empty(), "round {round}: all re-protected");
        }
        let mut set = DirtySet::new();
        let t = Instant::now();
        tracker.scan_and_reprotect(&mut set).unwrap();
        println!(
            "1 GiB of 4 KiB pages: track {:.3} ms; scan with nothing written {:.3} ms",
            track_time.as_secs_f64() * 1e3,
            t.elapsed().as_secs_f64() * 1e3
        );
    }
}
