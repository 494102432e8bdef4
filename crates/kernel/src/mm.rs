//! The LWK memory manager.
//!
//! Every page of the application lives in one of two memfds owned by the
//! LWK (4 KiB pages, and 2 MiB hugetlb pages when the pool has them), mapped
//! MAP_SHARED into the application and, through the map log, at the same
//! addresses into the proxy. "Private" memory is private because nobody else
//! maps that part of the file. The exception is a MAP_SHARED mapping of a
//! real file, which maps that file in both processes.
//!
//! Huge-page memory is pre-faulted (MAP_POPULATE) unless the application
//! asked for MAP_NORESERVE or PROT_NONE: it has no demand-paging noise.
//! 4 KiB pages are pre-faulted only with `lwk run --prefault-all`.
//! A huge page that an operation must split at a 4 KiB boundary is copied
//! into 4 KiB pages first ("demoted").

use lwk_abi::control::{
    memfd_slot, MapOp, OP_MAP, OP_MOVE, OP_PROTECT, OP_UNMAP, SRC_APP_FD, SRC_APP_FD_PRIVATE, SRC_LWK_FD_PRIVATE,
    SRC_MEMFD_HUGE, SRC_MEMFD_SHARED, SRC_MEMFD_SMALL,
};
use lwk_abi::layout::{APP_END, APP_START, HUGE_PAGE_SIZE, MMAP_TOP, PAGE_SIZE, SCRATCH_ADDR};
use lwk_rt::nr;
use lwk_rt::*;

use crate::sync::SpinLock;
use crate::{control, delegate};

pub const MAX_PIECES: usize = 16384;
/// Address space of each memfd: sparse, only touched pages use memory.
const MEMFD_SPACE: u64 = 1 << 40;
const HUGE: u64 = HUGE_PAGE_SIZE;
const PAGE: u64 = PAGE_SIZE;

pub const fn page_up(x: u64) -> u64 {
    (x + PAGE - 1) & !(PAGE - 1)
}
pub const fn huge_up(x: u64) -> u64 {
    (x + HUGE - 1) & !(HUGE - 1)
}
pub const fn huge_down(x: u64) -> u64 {
    x & !(HUGE - 1)
}

/// A contiguous part of the address space with one backing.
#[derive(Clone, Copy, Debug, Default)]
pub struct Piece {
    pub start: u64,
    pub end: u64,
    pub prot: u32,
    /// SRC_MEMFD_SMALL, SRC_MEMFD_HUGE, or a file (SRC_APP_FD,
    /// SRC_APP_FD_PRIVATE, SRC_LWK_FD_PRIVATE).
    pub src: u32,
    /// For a file: the descriptor it was mapped from.
    pub fd: i32,
    /// Not pre-faulted (MAP_NORESERVE).
    pub lazy: bool,
    /// Offset in the memfd or file.
    pub off: u64,
}

impl Piece {
    fn len(&self) -> u64 {
        self.end - self.start
    }
    fn is_memfd(&self) -> bool {
        memfd_slot(self.src).is_some()
    }
    fn is_private_file(&self) -> bool {
        self.src == SRC_APP_FD_PRIVATE || self.src == SRC_LWK_FD_PRIVATE
    }
}

/// First-fit allocator of memfd offsets with coalescing.
pub struct Extents {
    ext: [(u64, u64); 4096],
    n: usize,
}

impl Extents {
    const fn new() -> Self {
        Extents { ext: [(0, 0); 4096], n: 0 }
    }

    fn init(&mut self, space: u64) {
        self.ext[0] = (0, space);
        self.n = 1;
    }

    fn alloc(&mut self, len: u64) -> Option<u64> {
        let i = (0..self.n).find(|&i| self.ext[i].1 >= len)?;
        let (off, l) = self.ext[i];
        if l == len {
            self.ext.copy_within(i + 1..self.n, i);
            self.n -= 1;
        } else {
            self.ext[i] = (off + len, l - len);
        }
        Some(off)
    }

    fn free(&mut self, off: u64, len: u64) {
        let i = (0..self.n).find(|&i| self.ext[i].0 > off).unwrap_or(self.n);
        let merge_prev = i > 0 && self.ext[i - 1].0 + self.ext[i - 1].1 == off;
        let merge_next = i < self.n && off + len == self.ext[i].0;
        match (merge_prev, merge_next) {
            (true, true) => {
                self.ext[i - 1].1 += len + self.ext[i].1;
                self.ext.copy_within(i + 1..self.n, i);
                self.n -= 1;
            }
            (true, false) => self.ext[i - 1].1 += len,
            (false, true) => self.ext[i] = (off, len + self.ext[i].1),
            (false, false) => {
                if self.n == self.ext.len() {
                    return; // fragmented beyond bookkeeping: leak the offsets, not memory (punched)
                }
                self.ext.copy_within(i..self.n, i + 1);
                self.ext[i] = (off, len);
                self.n += 1;
            }
        }
    }
}

pub struct Mm {
    pieces: [Piece; MAX_PIECES],
    n: usize,
    extents: [Extents; 3],
    memfd: [i32; 3],
    /// The partition's memory directory (a descriptor) and its page size:
    /// application memory files are made there instead of memfds.
    part_dir: i32,
    part_page: u64,
    /// A vfork child using its parent's memory (and memfds) as they are.
    borrowed: bool,
    huge_ok: bool,
    require_huge: bool,
    prefault_all: bool,
    verbose: bool,
    pub brk_start: u64,
    brk_cur: u64,
    brk_end: u64,
    brk_dirty: u64,
}

pub static MM: SpinLock<Mm> = SpinLock::new(Mm::new());

fn push(op: MapOp) {
    // SAFETY: the LWK is the only writer and holds the MM lock.
    if !unsafe { control().maplog.push(op) } {
        delegate::sync();
        // SAFETY: as above; the proxy just drained the ring.
        unsafe { control().maplog.push(op) };
    }
}

fn punch(fd: i32, off: u64, len: u64) {
    // SAFETY: fallocate on our own memfd.
    unsafe { syscall6(nr::FALLOCATE, fd as u64, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, len, 0, 0) };
}

impl Mm {
    const fn new() -> Self {
        Mm {
            pieces: [Piece { start: 0, end: 0, prot: 0, src: 0, fd: 0, lazy: false, off: 0 }; MAX_PIECES],
            n: 0,
            extents: [Extents::new(), Extents::new(), Extents::new()],
            memfd: [0, 0, 0], // zero so the whole table is .bss; set by init
            part_dir: -1,
            part_page: 0,
            borrowed: false,
            huge_ok: false,
            require_huge: false,
            prefault_all: false,
            verbose: false,
            brk_start: 0,
            brk_cur: 0,
            brk_end: 0,
            brk_dirty: 0,
        }
    }

    /// Create the memfds. `huge` says whether to try 2 MiB pages.
    pub fn init(&mut self, huge: bool, require_huge: bool, prefault_all: bool, verbose: bool) -> Result<(), i64> {
        self.verbose = verbose;
        self.prefault_all = prefault_all;
        self.require_huge = require_huge;
        self.memfd = [-1, -1, -1];
        self.create_memfds(huge)
    }

    /// New private memfds; the shared one is made once and kept (a forked
    /// child shares it with its parent).
    fn create_memfds(&mut self, huge: bool) -> Result<(), i64> {
        self.memfd[0] = -1;
        self.memfd[1] = -1;
        self.huge_ok = false;
        if self.memfd[2] < 0 {
            // SAFETY: the name is NUL-terminated; ftruncate of our new memfd.
            let sfd = unsafe { syscall3(nr::MEMFD_CREATE, b"lwk-shared\0".as_ptr() as u64, MFD_CLOEXEC, 0) };
            if sfd < 0 || unsafe { syscall3(nr::FTRUNCATE, sfd as u64, MEMFD_SPACE, 0) } < 0 {
                return Err(if sfd < 0 { sfd } else { -ENOMEM });
            }
            self.memfd[2] = sfd as i32;
            self.extents[2].init(MEMFD_SPACE);
        }
        let fd = self.memory_file(b"lwk-mem\0", MFD_CLOEXEC, PAGE);
        if fd < 0 {
            return Err(fd);
        }
        self.memfd[0] = fd as i32;
        self.extents[0].init(MEMFD_SPACE);
        if huge {
            let hfd = self.memory_file(b"lwk-huge\0", MFD_CLOEXEC | MFD_HUGETLB | MFD_HUGE_2MB, HUGE);
            if hfd >= 0 {
                self.memfd[1] = hfd as i32;
                self.extents[1].init(MEMFD_SPACE);
                self.huge_ok = true;
            } else {
                self.note_fallback();
            }
        }
        self.publish_memfds();
        Ok(())
    }

    /// Tell the proxy (through the control region) which descriptors of
    /// this process hold application memory.
    fn publish_memfds(&self) {
        let h = &control().header;
        for (k, fd) in self.memfd.iter().enumerate() {
            h.memfd[k].store(*fd, core::sync::atomic::Ordering::Release);
        }
    }

    /// Take application memory from a partition: its directory (a
    /// hugetlbfs whose pages are reserved for it, or a tmpfs) and page size.
    pub fn set_partition(&mut self, dir: i32, page: u64) {
        self.part_dir = dir;
        self.part_page = page;
    }

    /// A new memory file of MEMFD_SPACE bytes for pages of `page` bytes: in
    /// the partition's directory if its pages are those, else a memfd
    /// `name` (NUL-terminated) made with `flags`.
    fn memory_file(&self, name: &[u8], flags: u64, page: u64) -> i64 {
        let fd = if self.part_page == page {
            self.partition_file()
        } else {
            // SAFETY: the name is NUL-terminated.
            unsafe { syscall3(nr::MEMFD_CREATE, name.as_ptr() as u64, flags, 0) }
        };
        if fd < 0 {
            return fd;
        }
        // SAFETY: ftruncate on our new file.
        let r = unsafe { syscall3(nr::FTRUNCATE, fd as u64, MEMFD_SPACE, 0) };
        if r < 0 {
            close(fd as i32);
            return r;
        }
        fd
    }

    /// A new, unnamed file in the partition's memory directory.
    fn partition_file(&self) -> i64 {
        // SAFETY: openat of a NUL-terminated name relative to our directory.
        unsafe {
            syscall6(
                nr::OPENAT,
                self.part_dir as u64,
                b".\0".as_ptr() as u64,
                O_TMPFILE | O_RDWR | O_CLOEXEC,
                0o600,
                0,
                0,
            )
        }
    }

    /// In a partition on 4 KiB pages (a tmpfs, which allocates at first
    /// touch), allocate a piece's pages now, so that running out is ENOMEM
    /// from mmap or mprotect instead of SIGBUS at first touch.
    fn reserve(&self, src: u32, off: u64, len: u64) -> Result<(), i64> {
        if self.part_page != PAGE || src != SRC_MEMFD_SMALL {
            return Ok(());
        }
        // SAFETY: fallocate on our own memory file.
        let r = unsafe { syscall6(nr::FALLOCATE, self.memfd[0] as u64, 0, off, len, 0, 0) };
        if r < 0 {
            self.note_partition_full();
            return Err(-ENOMEM);
        }
        Ok(())
    }

    /// Say once that the partition's memory is used up; the application
    /// gets ENOMEM as it would from an exhausted machine.
    fn note_partition_full(&self) {
        static SAID: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);
        if self.part_page != 0 && !SAID.swap(true, core::sync::atomic::Ordering::Relaxed) {
            lwk_rt::diag!("the partition's memory is used up: the application gets ENOMEM");
        }
    }

    /// Pre-fault a piece now? Huge-page memory always (the pool has paid
    /// for it, and it makes first touch cheap); 4 KiB pages only with
    /// --prefault-all, because pre-faulting memory a program never touches
    /// costs more than it saves (CPython maps 1 MiB arenas it barely uses).
    /// In a partition every page is pre-faulted: that is what it reserved.
    fn populate(&self, p: &Piece) -> u64 {
        if p.lazy || p.prot == 0 || !(p.src == SRC_MEMFD_HUGE || self.prefault_all || self.part_page != 0) {
            0
        } else {
            MAP_POPULATE
        }
    }

    pub fn note_fallback(&mut self) {
        let h = &control().header;
        if h.huge_fallback.swap(1, core::sync::atomic::Ordering::Relaxed) == 0 && self.verbose {
            lwk_rt::diag!("no free 2 MiB huge pages: application memory falls back to 4 KiB pages");
        }
    }

    /// Index of the first piece whose end is above `addr`.
    fn find(&self, addr: u64) -> usize {
        let (mut lo, mut hi) = (0, self.n);
        while lo < hi {
            let mid = (lo + hi) / 2;
            if self.pieces[mid].end <= addr {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo
    }

    pub fn is_free(&self, start: u64, end: u64) -> bool {
        let i = self.find(start);
        i == self.n || self.pieces[i].start >= end
    }

    /// Is [start, end) entirely mapped?
    fn covered(&self, start: u64, end: u64) -> bool {
        let mut at = start;
        let mut i = self.find(start);
        while at < end {
            if i == self.n || self.pieces[i].start > at {
                return false;
            }
            at = self.pieces[i].end;
            i += 1;
        }
        true
    }

    /// May the LWK itself read (or write) [addr, addr+len) of the application?
    pub fn accessible(&self, addr: u64, len: u64, write: bool) -> bool {
        let Some(end) = addr.checked_add(len) else {
            return false;
        };
        if !self.covered(addr, end) {
            return false;
        }
        let need = if write { PROT_WRITE } else { PROT_READ } as u32;
        let mut i = self.find(addr);
        while i < self.n && self.pieces[i].start < end {
            if self.pieces[i].prot & need == 0 {
                return false;
            }
            i += 1;
        }
        true
    }

    fn insert(&mut self, p: Piece) -> Result<(), i64> {
        if self.n == MAX_PIECES {
            return Err(-ENOMEM);
        }
        let i = self.find(p.start);
        self.pieces.copy_within(i..self.n, i + 1);
        self.pieces[i] = p;
        self.n += 1;
        Ok(())
    }

    fn remove_at(&mut self, i: usize) -> Piece {
        let p = self.pieces[i];
        self.pieces.copy_within(i + 1..self.n, i);
        self.n -= 1;
        p
    }

    /// Make `addr` a piece boundary.
    fn split_at(&mut self, addr: u64) -> Result<(), i64> {
        let i = self.find(addr);
        if i == self.n || self.pieces[i].start >= addr {
            return Ok(());
        }
        if self.pieces[i].src == SRC_MEMFD_HUGE && addr % HUGE != 0 {
            self.demote(i, huge_down(addr))?;
            return self.split_at(addr);
        }
        if self.n == MAX_PIECES {
            return Err(-ENOMEM);
        }
        let mut tail = self.pieces[i];
        tail.off += addr - tail.start;
        tail.start = addr;
        self.pieces[i].end = addr;
        self.pieces.copy_within(i + 1..self.n, i + 2);
        self.pieces[i + 1] = tail;
        self.n += 1;
        Ok(())
    }

    /// Replace the 2 MiB page at `at` of huge piece `i` with 4 KiB pages
    /// holding the same bytes.
    fn demote(&mut self, i: usize, at: u64) -> Result<(), i64> {
        let p = self.pieces[i];
        let off_h = p.off + (at - p.start);
        let off_s = self.extents[0].alloc(HUGE).ok_or(-ENOMEM)?;
        if let Err(e) = copy_extent(self.memfd[1], off_h, self.memfd[0], off_s, HUGE) {
            self.extents[0].free(off_s, HUGE);
            return Err(e);
        }
        // SAFETY: replaces the huge page at `at` with its 4 KiB copy;
        // pre-faulted as the huge page was (populate of the huge piece).
        unsafe {
            let r = mmap(at, HUGE, p.prot as u64, MAP_SHARED | MAP_FIXED | self.populate(&p), self.memfd[0], off_s);
            if r < 0 {
                self.extents[0].free(off_s, HUGE);
                return Err(r);
            }
        }
        self.pieces[i].end = at;
        let small = Piece { start: at, end: at + HUGE, src: SRC_MEMFD_SMALL, off: off_s, ..p };
        let after = Piece { start: at + HUGE, off: off_h + HUGE, ..p };
        if self.pieces[i].start == at {
            self.pieces[i] = small;
        } else {
            self.insert(small)?;
        }
        if after.start < after.end {
            self.insert(after)?;
        }
        self.release_extent(SRC_MEMFD_HUGE, off_h, HUGE);
        control().stats.sub_memory(HUGE, true);
        control().stats.add_memory(HUGE, false);
        mirror_piece(&small);
        Ok(())
    }

    fn release_extent(&mut self, src: u32, off: u64, len: u64) {
        // Shared memory may still be mapped by a forked child (or parent):
        // its pages and offsets stay until every process is gone.
        if src == SRC_MEMFD_SHARED {
            return;
        }
        let k = src as usize;
        punch(self.memfd[k], off, len);
        self.extents[k].free(off, len);
    }

    /// Forget every piece inside [start, end), giving back its memory.
    /// The caller unmaps or maps over the range in the kernel.
    fn forget(&mut self, start: u64, end: u64) -> Result<(), i64> {
        self.split_at(start)?;
        self.split_at(end)?;
        let i = self.find(start);
        while i < self.n && self.pieces[i].start < end {
            let p = self.remove_at(i);
            if p.is_memfd() {
                self.release_extent(p.src, p.off, p.len());
                control().stats.sub_memory(p.len(), p.src == SRC_MEMFD_HUGE);
            }
        }
        Ok(())
    }

    /// Back [start, end) with fresh zeroed memory: huge pages for the
    /// 2 MiB-aligned middle when possible, 4 KiB pages around it.
    fn map_fresh(&mut self, start: u64, end: u64, prot: u32, lazy: bool) -> Result<(), i64> {
        self.map_fresh_as(start, end, prot, lazy, false)
    }

    /// As map_fresh; `shared` memory (MAP_SHARED|MAP_ANONYMOUS) goes to the
    /// shared memfd, which a fork does not copy.
    fn map_fresh_as(&mut self, start: u64, end: u64, prot: u32, lazy: bool, shared: bool) -> Result<(), i64> {
        if shared {
            return self.map_extent(start, end, prot, lazy, SRC_MEMFD_SHARED);
        }
        let (hs, he) = (huge_up(start), huge_down(end));
        if self.huge_ok && !lazy && prot != 0 && hs < he {
            match self.map_extent(hs, he, prot, lazy, SRC_MEMFD_HUGE) {
                Ok(()) => {
                    if start < hs {
                        self.map_extent(start, hs, prot, lazy, SRC_MEMFD_SMALL)?;
                    }
                    if he < end {
                        self.map_extent(he, end, prot, lazy, SRC_MEMFD_SMALL)?;
                    }
                    return Ok(());
                }
                Err(e) if e == -ENOMEM && !self.require_huge => self.note_fallback(),
                Err(e) => return Err(e),
            }
        }
        self.map_extent(start, end, prot, lazy, SRC_MEMFD_SMALL)
    }

    fn map_extent(&mut self, start: u64, end: u64, prot: u32, lazy: bool, src: u32) -> Result<(), i64> {
        let len = end - start;
        let Some(k) = memfd_slot(src) else { return Err(-EINVAL) };
        let off = self.extents[k].alloc(len).ok_or(-ENOMEM)?;
        let p = Piece { start, end, prot, src, fd: -1, lazy, off };
        if !lazy && prot != 0 {
            if let Err(e) = self.reserve(src, off, len) {
                self.release_extent(src, off, len);
                return Err(e);
            }
        }
        // [start, end) was forgotten by the caller; mapping over it is what
        // the call asks.
        let r = self.map_piece(&p);
        if r < 0 {
            self.extents[k].free(off, len);
            if r == -ENOMEM && (self.part_page == PAGE || (self.part_page == HUGE && src == SRC_MEMFD_HUGE)) {
                self.note_partition_full();
            }
            return Err(r);
        }
        if let Err(e) = self.insert(p) {
            // SAFETY: undo the mapping we just made.
            unsafe { munmap(start, len) };
            self.release_extent(src, off, len);
            return Err(e);
        }
        control().stats.add_memory(len, src == SRC_MEMFD_HUGE);
        mirror_piece(&p);
        Ok(())
    }

    /// Map memfd piece `p` at its own address in this process, pre-faulted
    /// by the policy of `populate`.
    fn map_piece(&self, p: &Piece) -> i64 {
        let Some(k) = memfd_slot(p.src) else { return -EINVAL };
        // SAFETY: p lies in the application's range, whose layout the
        // caller owns.
        unsafe {
            mmap(p.start, p.len(), p.prot as u64, MAP_SHARED | MAP_FIXED | self.populate(p), self.memfd[k], p.off)
        }
    }

    /// Highest free, aligned gap of `len` bytes below MMAP_TOP; the start
    /// is congruent to `phase` modulo `align`.
    fn find_gap(&self, len: u64, align: u64, phase: u64) -> Option<u64> {
        let fit = |lo: u64, hi: u64| -> Option<u64> {
            let s = hi.checked_sub(len)?;
            let s = (s & !(align - 1)) + phase;
            let s = if s + len > hi { s.checked_sub(align)? } else { s };
            (s >= lo).then_some(s)
        };
        let mut hi = MMAP_TOP;
        for i in (0..self.n).rev() {
            let p = &self.pieces[i];
            if p.start >= hi {
                continue;
            }
            if p.end < hi {
                if let Some(s) = fit(p.end, hi) {
                    return Some(s);
                }
            }
            hi = p.start;
        }
        fit(APP_START.max(self.brk_start + (1 << 30)), hi)
    }

    fn in_app_range(start: u64, len: u64) -> bool {
        start >= APP_START && start.checked_add(len).is_some_and(|e| e <= APP_END)
    }

    pub fn mmap(&mut self, addr: u64, len: u64, prot: u64, flags: u64, fd: i64, off: u64) -> i64 {
        if let Err(e) = self.own() {
            return e;
        }
        match self.mmap_inner(addr, len, prot, flags, fd as i32, off) {
            Ok(a) => a as i64,
            Err(e) => e,
        }
    }

    fn mmap_inner(&mut self, addr: u64, len: u64, prot: u64, flags: u64, fd: i32, off: u64) -> Result<u64, i64> {
        if len == 0 || off % PAGE != 0 {
            return Err(-EINVAL);
        }
        let len = if len > APP_END {
            return Err(-ENOMEM);
        } else {
            page_up(len)
        };
        let typ = flags & MAP_TYPE;
        if typ != MAP_SHARED && typ != MAP_PRIVATE && typ != MAP_SHARED_VALIDATE {
            return Err(-EINVAL);
        }
        if prot & !(PROT_READ | PROT_WRITE | PROT_EXEC) != 0 {
            return Err(-EINVAL);
        }
        let anon = flags & MAP_ANONYMOUS != 0;
        let lazy = flags & MAP_NORESERVE != 0;
        let start = if flags & (MAP_FIXED | MAP_FIXED_NOREPLACE) != 0 {
            if addr % PAGE != 0 {
                return Err(-EINVAL);
            }
            if !Self::in_app_range(addr, len) {
                return Err(-ENOMEM);
            }
            if flags & MAP_FIXED == 0 && !self.is_free(addr, addr + len) {
                return Err(-EEXIST);
            }
            addr
        } else if addr != 0 && addr % PAGE == 0 && Self::in_app_range(addr, len) && self.is_free(addr, addr + len) {
            addr
        } else {
            let align = if anon && typ == MAP_PRIVATE && !lazy && self.huge_ok && len >= HUGE { HUGE } else { PAGE };
            self.find_gap(len, align, 0).ok_or(-ENOMEM)?
        };
        let end = start + len;
        if anon {
            self.forget(start, end)?;
            self.map_fresh_as(start, end, prot as u32, lazy, typ != MAP_PRIVATE)?;
        } else if typ == MAP_PRIVATE {
            self.map_private_file(start, end, prot as u32, fd, off)?;
        } else {
            self.map_shared_file(start, end, prot as u32, flags, fd, off)?;
        }
        Ok(start)
    }

    /// The application's file descriptor flags, from the proxy.
    fn fd_flags(fd: i32) -> Result<u64, i64> {
        let fl = delegate::call(nr::FCNTL, [fd as u64, F_GETFL, 0, 0, 0, 0]);
        if fl < 0 {
            Err(-EBADF)
        } else {
            Ok(fl as u64)
        }
    }

    /// MAP_PRIVATE of a file. Read-only: the file itself, as natively (the
    /// page cache is shared, nothing is copied). Writable: a private copy of
    /// its contents in LWK memory, which differs from Linux only in that
    /// later writes to the file by others are not seen through pages the
    /// application has not written. A read-only one made writable later is
    /// copied then (see `privatize`).
    fn map_private_file(&mut self, start: u64, end: u64, prot: u32, fd: i32, off: u64) -> Result<(), i64> {
        let acc = Self::fd_flags(fd)? & O_ACCMODE;
        if acc == O_WRONLY {
            return Err(-EACCES);
        }
        if prot as u64 & PROT_WRITE == 0 {
            let lfd = Self::reopen(fd, O_RDONLY)?;
            let r = self.map_file(start, end, prot, lfd, off, SRC_APP_FD_PRIVATE, fd);
            close(lfd);
            return r;
        }
        self.forget(start, end)?;
        self.map_fresh(start, end, (PROT_READ | PROT_WRITE) as u32, false)?;
        let len = end - start;
        let mut done = 0;
        while done < len {
            let r = delegate::call(nr::PREAD64, [fd as u64, start + done, len - done, off + done, 0, 0]);
            if r == -EINTR {
                continue;
            }
            if r < 0 {
                let _ = self.munmap(start, len);
                return Err(if r == -EISDIR || r == -ESPIPE || r == -EINVAL { -ENODEV } else { r });
            }
            if r == 0 {
                break;
            }
            done += r as u64;
        }
        if prot != (PROT_READ | PROT_WRITE) as u32 {
            self.protect(start, end, prot)?;
        }
        Ok(())
    }

    /// MAP_SHARED of a file: the real file, opened again through the
    /// proxy's descriptor, in both processes.
    fn map_shared_file(&mut self, start: u64, end: u64, prot: u32, flags: u64, fd: i32, off: u64) -> Result<(), i64> {
        let acc = Self::fd_flags(fd)? & O_ACCMODE;
        if acc == O_WRONLY || (prot as u64 & PROT_WRITE != 0 && acc != O_RDWR) {
            return Err(-EACCES);
        }
        let lfd = Self::reopen(fd, if acc == O_RDWR { O_RDWR } else { O_RDONLY })?;
        self.forget(start, end)?;
        let keep = flags & (MAP_LOCKED | MAP_POPULATE | MAP_NONBLOCK | MAP_SYNC | MAP_NORESERVE);
        // SAFETY: the range is the application's and was forgotten above.
        let r = unsafe { mmap(start, end - start, prot as u64, MAP_SHARED | MAP_FIXED | keep, lfd, off) };
        close(lfd);
        if r < 0 {
            return Err(r);
        }
        let p = Piece { start, end, prot, src: SRC_APP_FD, fd, lazy: true, off };
        self.insert(p)?;
        mirror_piece(&p);
        Ok(())
    }

    /// Open, in this process, the file behind the application's `fd` (which
    /// lives in the proxy) through /proc.
    fn reopen(fd: i32, flags: u64) -> Result<i32, i64> {
        let mut path = [0u8; 64];
        let proxy = control().header.proxy_pid.load(core::sync::atomic::Ordering::Acquire);
        let n = lwk_rt::out::proc_fd_path(&mut path, proxy, fd);
        let lfd = open(&path[..n], flags | O_CLOEXEC, 0);
        if lfd < 0 {
            return Err(if lfd == -ENXIO { -ENODEV } else { lfd });
        }
        Ok(lfd as i32)
    }

    /// Map a file MAP_PRIVATE, read-only, from `lfd` (open in this
    /// process); the proxy maps the same file from `src`/`fd`.
    pub fn map_file(
        &mut self,
        start: u64,
        end: u64,
        prot: u32,
        lfd: i32,
        off: u64,
        src: u32,
        fd: i32,
    ) -> Result<(), i64> {
        self.forget(start, end)?;
        let p = Piece { start, end, prot, src, fd, lazy: false, off };
        // SAFETY: the range is the application's and was forgotten above.
        let r = unsafe { mmap(start, end - start, prot as u64, MAP_PRIVATE | MAP_FIXED | self.populate(&p), lfd, off) };
        if r < 0 {
            return Err(r);
        }
        self.insert(p)?;
        mirror_piece(&p);
        Ok(())
    }

    /// Turn read-only file piece `i` into LWK memory with the same bytes,
    /// before it becomes writable: every writable page is the LWK's.
    fn privatize(&mut self, i: usize) -> Result<(), i64> {
        let p = self.pieces[i];
        let len = p.len();
        let off = self.extents[0].alloc(len).ok_or(-ENOMEM)?;
        // SAFETY: the scratch window is the LWK's own; the piece is mapped
        // application memory, made readable for the copy if it was not.
        unsafe {
            let a = mmap(SCRATCH_ADDR, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, self.memfd[0], off);
            if a < 0 {
                self.extents[0].free(off, len);
                return Err(a);
            }
            if p.prot as u64 & PROT_READ == 0 {
                mprotect(p.start, len, PROT_READ);
            }
            core::ptr::copy_nonoverlapping(p.start as *const u8, SCRATCH_ADDR as *mut u8, len as usize);
            munmap(SCRATCH_ADDR, len);
        }
        let q = Piece { src: SRC_MEMFD_SMALL, off, fd: -1, lazy: false, ..p };
        let r = self.map_piece(&q);
        if r < 0 {
            self.release_extent(SRC_MEMFD_SMALL, off, len);
            return Err(r);
        }
        self.pieces[i] = q;
        control().stats.add_memory(len, false);
        mirror_piece(&q);
        Ok(())
    }

    pub fn munmap(&mut self, addr: u64, len: u64) -> i64 {
        if let Err(e) = self.own() {
            return e;
        }
        if addr % PAGE != 0 || len == 0 {
            return -EINVAL;
        }
        let start = addr.max(APP_START);
        let end = addr.saturating_add(page_up(len)).min(APP_END);
        if start >= end {
            return 0;
        }
        if let Err(e) = self.forget(start, end) {
            return e;
        }
        // SAFETY: the range is inside the application's range.
        unsafe { munmap(start, end - start) };
        push(MapOp { kind: OP_UNMAP, addr: start, len: end - start, ..Default::default() });
        0
    }

    pub fn mprotect(&mut self, addr: u64, len: u64, prot: u64) -> i64 {
        if let Err(e) = self.own() {
            return e;
        }
        if addr % PAGE != 0 {
            return -EINVAL;
        }
        if prot & !(PROT_READ | PROT_WRITE | PROT_EXEC) != 0 {
            // PROT_GROWSUP/DOWN: not supported on LWK memory.
            return -EINVAL;
        }
        let len = page_up(len);
        if len == 0 {
            return 0;
        }
        let Some(end) = addr.checked_add(len) else {
            return -ENOMEM;
        };
        if !self.covered(addr, end) {
            return -ENOMEM;
        }
        match self.protect(addr, end, prot as u32) {
            Ok(()) => 0,
            Err(e) => e,
        }
    }

    fn protect(&mut self, start: u64, end: u64, prot: u32) -> Result<(), i64> {
        self.split_at(start)?;
        self.split_at(end)?;
        if prot as u64 & PROT_WRITE != 0 {
            let mut i = self.find(start);
            while i < self.n && self.pieces[i].start < end {
                if self.pieces[i].is_private_file() {
                    self.privatize(i)?;
                }
                i += 1;
            }
        }
        if prot != 0 {
            let mut i = self.find(start);
            while i < self.n && self.pieces[i].start < end {
                let p = self.pieces[i];
                if p.prot == 0 && !p.lazy {
                    self.reserve(p.src, p.off, p.len())?;
                }
                i += 1;
            }
        }
        // SAFETY: the range is covered by application pieces.
        let r = unsafe { mprotect(start, end - start, prot as u64) };
        if r < 0 {
            return Err(r);
        }
        let mut i = self.find(start);
        while i < self.n && self.pieces[i].start < end {
            let now = Piece { prot, ..self.pieces[i] };
            let fault_in = self.pieces[i].prot == 0 && prot != 0 && now.is_memfd() && self.populate(&now) != 0;
            let p = &mut self.pieces[i];
            if fault_in {
                let advice = if prot as u64 & PROT_WRITE != 0 { MADV_POPULATE_WRITE } else { MADV_POPULATE_READ };
                // SAFETY: pre-faulting our own mapping.
                unsafe { syscall3(nr::MADVISE, p.start, p.end - p.start, advice) };
            }
            p.prot = prot;
            i += 1;
        }
        push(MapOp { kind: OP_PROTECT, prot, addr: start, len: end - start, ..Default::default() });
        Ok(())
    }

    pub fn mremap(&mut self, old: u64, old_len: u64, new_len: u64, flags: u64, new_addr: u64) -> i64 {
        if let Err(e) = self.own() {
            return e;
        }
        match self.mremap_inner(old, old_len, new_len, flags, new_addr) {
            Ok(a) => a as i64,
            Err(e) => e,
        }
    }

    fn mremap_inner(&mut self, old: u64, old_len: u64, new_len: u64, flags: u64, new_addr: u64) -> Result<u64, i64> {
        if old % PAGE != 0 || flags & !(MREMAP_MAYMOVE | MREMAP_FIXED | MREMAP_DONTUNMAP) != 0 {
            return Err(-EINVAL);
        }
        if flags & MREMAP_FIXED != 0 && flags & MREMAP_MAYMOVE == 0 {
            return Err(-EINVAL);
        }
        if flags & MREMAP_DONTUNMAP != 0 {
            return Err(-EINVAL); // not supported on LWK memory
        }
        let (old_len, new_len) = (page_up(old_len), page_up(new_len));
        if new_len == 0 || old_len == 0 || new_len > APP_END {
            return Err(-EINVAL);
        }
        let old_end = old.checked_add(old_len).ok_or(-EINVAL)?;
        if !self.covered(old, old_end) {
            return Err(-EFAULT);
        }
        if flags & MREMAP_FIXED != 0 {
            if new_addr % PAGE != 0 || !Self::in_app_range(new_addr, new_len) {
                return Err(-EINVAL);
            }
            if new_addr < old_end && old < new_addr + new_len {
                return Err(-EINVAL);
            }
            let keep = old_len.min(new_len);
            if keep < old_len {
                self.munmap(old + keep, old_len - keep);
            }
            self.munmap(new_addr, new_len);
            self.move_range(old, old + keep, new_addr)?;
            if keep < new_len {
                self.grow_tail(new_addr + keep, new_addr + new_len)?;
            }
            return Ok(new_addr);
        }
        if new_len <= old_len {
            if new_len < old_len {
                self.munmap(old + new_len, old_len - new_len);
            }
            return Ok(old);
        }
        let new_end = old.checked_add(new_len).ok_or(-ENOMEM)?;
        if new_end <= APP_END && self.is_free(old_end, new_end) {
            self.grow_tail(old_end, new_end)?;
            return Ok(old);
        }
        if flags & MREMAP_MAYMOVE == 0 {
            return Err(-ENOMEM);
        }
        let dst = self.find_gap(new_len, HUGE, old % HUGE).ok_or(-ENOMEM)?;
        self.move_range(old, old_end, dst)?;
        self.grow_tail(dst + old_len, dst + new_len)?;
        Ok(dst)
    }

    /// New memory after a growing mremap: the protection of the last piece.
    fn grow_tail(&mut self, start: u64, end: u64) -> Result<(), i64> {
        let i = self.find(start - 1);
        let (prot, lazy) = (self.pieces[i].prot, self.pieces[i].lazy);
        self.map_fresh(start, end, prot, lazy)
    }

    /// Move the pieces of [start, end) to `dst`, keeping their pages.
    fn move_range(&mut self, start: u64, end: u64, dst: u64) -> Result<(), i64> {
        self.split_at(start)?;
        self.split_at(end)?;
        // SAFETY: kernel mremap of whole application pieces to a free,
        // suitably aligned part of the application's range.
        let r = unsafe { syscall6(nr::MREMAP, start, end - start, end - start, MREMAP_MAYMOVE | MREMAP_FIXED, dst, 0) };
        if r < 0 {
            return Err(r);
        }
        push(MapOp { kind: OP_MOVE, addr: start, len: end - start, offset: dst, ..Default::default() });
        let mut moved = [Piece::default(); 64];
        let mut k = 0;
        while let Some(i) =
            (self.find(start) < self.n && self.pieces[self.find(start)].start < end).then(|| self.find(start))
        {
            let mut p = self.remove_at(i);
            p.end = p.end - start + dst;
            p.start = p.start - start + dst;
            if k == moved.len() {
                self.insert(p)?;
            } else {
                moved[k] = p;
                k += 1;
            }
        }
        for p in &moved[..k] {
            self.insert(*p)?;
        }
        Ok(())
    }

    pub fn madvise(&mut self, addr: u64, len: u64, advice: u64) -> i64 {
        if let Err(e) = self.own() {
            return e;
        }
        const MADV_FREE: u64 = 8;
        if addr % PAGE != 0 {
            return -EINVAL;
        }
        let end = addr.saturating_add(page_up(len));
        match advice {
            MADV_DONTNEED | MADV_REMOVE => {
                if !self.covered(addr, end) {
                    return -ENOMEM;
                }
                self.zero(addr, end);
                0
            }
            // Keeping the contents is a valid MADV_FREE.
            MADV_FREE => {
                if self.covered(addr, end) {
                    0
                } else {
                    -ENOMEM
                }
            }
            // SAFETY: other advice does not change contents or mappings.
            _ => unsafe { syscall3(nr::MADVISE, addr, len, advice) },
        }
    }

    /// Give [start, end) fresh zero pages, as MADV_DONTNEED does for
    /// private anonymous memory on Linux.
    fn zero(&mut self, start: u64, end: u64) {
        let mut i = self.find(start);
        while i < self.n && self.pieces[i].start < end {
            let p = self.pieces[i];
            let (s, e) = (p.start.max(start), p.end.min(end));
            match p.src {
                SRC_MEMFD_SMALL => punch(self.memfd[0], p.off + (s - p.start), e - s),
                SRC_MEMFD_HUGE => {
                    let (hs, he) = (huge_up(s), huge_down(e));
                    if hs < he {
                        punch(self.memfd[1], p.off + (hs - p.start), he - hs);
                    }
                    for (a, b) in [(s, hs.min(e)), (he.max(s), e)] {
                        if a < b {
                            self.fill_zero(p, a, b);
                        }
                    }
                }
                _ => {
                    // A file: same as native (shared pages stay, private
                    // ones refault from the file).
                    // SAFETY: drops page-table entries of application memory.
                    unsafe { syscall3(nr::MADVISE, s, e - s, MADV_DONTNEED) };
                }
            }
            i += 1;
        }
    }

    fn fill_zero(&self, p: Piece, a: u64, b: u64) {
        if p.prot as u64 & PROT_WRITE == 0 {
            // SAFETY: briefly writable to clear, then restored.
            unsafe { mprotect(a, b - a, PROT_READ | PROT_WRITE) };
        }
        // SAFETY: [a, b) is mapped application memory of piece p.
        unsafe { core::ptr::write_bytes(a as *mut u8, 0, (b - a) as usize) };
        if p.prot as u64 & PROT_WRITE == 0 {
            // SAFETY: restore the application's protection.
            unsafe { mprotect(a, b - a, p.prot as u64) };
        }
    }

    /// In the child of a fork: the memory is still the parent's (the memfds
    /// are shared); give every piece of LWK memory a private copy in new
    /// memfds, at the same address, and have the (new) proxy mirror it.
    /// The parent waits meanwhile, so its memory does not change under the
    /// copy (its other threads excepted: see the README).
    /// In a vfork child: go on with the parent's memory as it is, shared,
    /// until the child changes its address space (`own`), execs or exits.
    pub fn borrow(&mut self) {
        self.borrowed = true;
        self.publish_memfds();
    }

    /// Before a change of the address space: a vfork child that still
    /// uses its parent's memory takes a private copy of it first, so the
    /// change (and the memory it frees) is its own.
    fn own(&mut self) -> Result<(), i64> {
        if self.borrowed {
            self.borrowed = false;
            self.fork_copy()?;
        }
        Ok(())
    }

    pub fn fork_copy(&mut self) -> Result<(), i64> {
        let old = self.memfd;
        let huge = old[1] >= 0;
        self.create_memfds(huge)?;
        for i in 0..self.n {
            let p = self.pieces[i];
            if !p.is_memfd() || p.src == SRC_MEMFD_SHARED {
                // Files, and shared memory: the kernel's fork already did
                // the right thing (the proxy keeps its inherited mirror).
                continue;
            }
            let len = p.len();
            let mut src = p.src;
            let off = match self.extents[src as usize].alloc(len) {
                Some(o) if src == SRC_MEMFD_SMALL || self.huge_ok => o,
                _ => {
                    src = SRC_MEMFD_SMALL;
                    self.extents[0].alloc(len).ok_or(-ENOMEM)?
                }
            };
            // The old extent is read through its memfd, so the piece's
            // protection does not matter.
            copy_extent(old[p.src as usize], p.off, self.memfd[src as usize], off, len)?;
            let q = Piece { src, off, ..p };
            let r = self.map_piece(&q);
            if r < 0 {
                return Err(r);
            }
            self.pieces[i] = q;
            control().stats.add_memory(len, src == SRC_MEMFD_HUGE);
            mirror_piece(&q);
        }
        for fd in &old[..2] {
            if *fd >= 0 {
                close(*fd);
            }
        }
        Ok(())
    }

    /// Set the start of the heap (end of the program's image).
    pub fn set_brk_start(&mut self, at: u64) {
        self.brk_start = page_up(at);
        self.brk_cur = at;
        self.brk_end = page_up(at);
        self.brk_dirty = at;
    }

    pub fn brk(&mut self, new: u64) -> i64 {
        if let Err(e) = self.own() {
            return e;
        }
        if new < self.brk_start || new > APP_END {
            return self.brk_cur as i64;
        }
        let need = page_up(new);
        if need > self.brk_end {
            // Grow in whole 2 MiB steps once aligned, so the heap can sit on
            // huge pages.
            let to = if self.huge_ok { huge_up(need) } else { need };
            let to = if self.is_free(self.brk_end, to) { to } else { need };
            if !self.is_free(self.brk_end, to)
                || self.map_fresh(self.brk_end, to, (PROT_READ | PROT_WRITE) as u32, false).is_err()
            {
                return self.brk_cur as i64;
            }
            self.brk_end = to;
        }
        if new > self.brk_cur && self.brk_dirty > self.brk_cur {
            let z = new.min(self.brk_dirty);
            // SAFETY: [brk_cur, z) is mapped heap memory.
            unsafe { core::ptr::write_bytes(self.brk_cur as *mut u8, 0, (z - self.brk_cur) as usize) };
        }
        if new < self.brk_cur {
            self.brk_dirty = self.brk_dirty.max(self.brk_cur);
        }
        self.brk_cur = new;
        new as i64
    }

    /// Map [start, end) as a private copy filled by `fill`, then set `prot`.
    /// Used by the loader for program segments.
    pub fn map_copy(
        &mut self,
        start: u64,
        end: u64,
        prot: u32,
        fill: impl FnOnce() -> Result<(), i64>,
    ) -> Result<(), i64> {
        self.forget(start, end)?;
        self.map_extent(start, end, (PROT_READ | PROT_WRITE) as u32, false, SRC_MEMFD_SMALL)?;
        fill()?;
        if prot != (PROT_READ | PROT_WRITE) as u32 {
            self.protect(start, end, prot)?;
        }
        Ok(())
    }

    /// Map fresh anonymous memory at a fixed place (the stack); `lazy`
    /// leaves it to be faulted in on first touch.
    pub fn map_anon_fixed(&mut self, start: u64, end: u64, prot: u32, lazy: bool) -> Result<(), i64> {
        self.forget(start, end)?;
        self.map_fresh(start, end, prot, lazy)
    }

    /// Reserve a free range for an image of `len` bytes (the interpreter).
    pub fn find_free(&self, len: u64) -> Option<u64> {
        self.find_gap(page_up(len), HUGE, 0)
    }

    pub fn pieces(&self) -> &[Piece] {
        &self.pieces[..self.n]
    }
}

/// Read N words of the application's memory, EFAULT unless readable.
pub fn read_app<const N: usize>(addr: u64) -> Result<[u64; N], i64> {
    if !MM.lock().accessible(addr, 8 * N as u64, false) {
        return Err(-EFAULT);
    }
    // SAFETY: the range is mapped readable application memory.
    Ok(unsafe { core::ptr::read_unaligned(addr as *const [u64; N]) })
}

/// Write N words into the application's memory, EFAULT unless writable.
pub fn write_app<const N: usize>(addr: u64, v: [u64; N]) -> Result<(), i64> {
    if !MM.lock().accessible(addr, 8 * N as u64, true) {
        return Err(-EFAULT);
    }
    // SAFETY: the range is mapped writable application memory.
    unsafe { core::ptr::write_unaligned(addr as *mut [u64; N], v) };
    Ok(())
}

/// Have the proxy map piece `p` at the same address, from the same source.
fn mirror_piece(p: &Piece) {
    push(MapOp { kind: OP_MAP, prot: p.prot, addr: p.start, len: p.len(), source: p.src, fd: p.fd, offset: p.off });
}

/// Copy `len` bytes at `from_off` of memfd `from_fd` to `to_off` of memfd
/// `to_fd`, through the LWK's scratch window (only where the source has
/// data, see `copy_data`). Both scratch mappings are gone on return.
fn copy_extent(from_fd: i32, from_off: u64, to_fd: i32, to_off: u64, len: u64) -> Result<(), i64> {
    let to_at = SCRATCH_ADDR + huge_up(len);
    // SAFETY: the scratch window is the LWK's own, outside the
    // application's range, and large enough for both mappings.
    unsafe {
        let from = mmap(SCRATCH_ADDR, len, PROT_READ, MAP_SHARED | MAP_FIXED, from_fd, from_off);
        let to = mmap(to_at, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, to_fd, to_off);
        let r = if from < 0 {
            Err(from)
        } else if to < 0 {
            Err(to)
        } else {
            copy_data(from_fd, from_off, len, SCRATCH_ADDR, to_at);
            Ok(())
        };
        munmap(SCRATCH_ADDR, huge_up(len) + len);
        r
    }
}

/// Copy the bytes of memfd range [off, off+len) from `from` to `to` (both
/// mappings of `len` bytes), only where the file has data: holes are
/// zero in the fresh destination already, and copying them would give the
/// copy pages the original never had (arena reservations, stack tails).
///
/// # Safety
/// `from` and `to` map `len` bytes, readable and writable respectively.
unsafe fn copy_data(fd: i32, off: u64, len: u64, from: u64, to: u64) {
    const SEEK_DATA: u64 = 3;
    const SEEK_HOLE: u64 = 4;
    let end = off + len;
    let mut at = off;
    while at < end {
        // SAFETY: lseek on our own memfd.
        let d = unsafe { syscall3(nr::LSEEK, fd as u64, at, SEEK_DATA) };
        if d < 0 {
            if d == -ENXIO {
                return; // no data after `at`
            }
            // SEEK_DATA unsupported (hugetlbfs): copy everything.
            // SAFETY: as documented.
            unsafe {
                core::ptr::copy_nonoverlapping(
                    (from + (at - off)) as *const u8,
                    (to + (at - off)) as *mut u8,
                    (end - at) as usize,
                )
            };
            return;
        }
        let d = (d as u64).min(end);
        // SAFETY: as above.
        let h = unsafe { syscall3(nr::LSEEK, fd as u64, d, SEEK_HOLE) };
        let h = if h < 0 { end } else { (h as u64).min(end) };
        if d < h {
            // SAFETY: [d, h) is inside both mappings.
            unsafe {
                core::ptr::copy_nonoverlapping(
                    (from + (d - off)) as *const u8,
                    (to + (d - off)) as *mut u8,
                    (h - d) as usize,
                )
            };
        }
        at = h.max(d + 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_allocate_first_fit_and_coalesce() {
        let mut e = Box::new(Extents::new());
        e.init(1 << 20);
        let a = e.alloc(4096).unwrap();
        let b = e.alloc(8192).unwrap();
        let c = e.alloc(4096).unwrap();
        assert_eq!((a, b, c), (0, 4096, 12288));
        e.free(b, 8192);
        // The hole is reused first.
        assert_eq!(e.alloc(4096), Some(4096));
        e.free(4096, 4096);
        e.free(a, 4096);
        e.free(c, 4096);
        // Everything merged back into one extent.
        assert_eq!(e.n, 1);
        assert_eq!(e.ext[0], (0, 1 << 20));
        assert_eq!(e.alloc(2 << 20), None);
    }

    #[test]
    fn page_rounding() {
        assert_eq!(page_up(1), 4096);
        assert_eq!(page_up(4096), 4096);
        assert_eq!(huge_up(1), 2 << 20);
        assert_eq!(huge_down((2 << 20) + 5), 2 << 20);
    }
}
