//! The LWK memory manager.
//!
//! Every page of the application lives in one of two memfds owned by the
//! LWK (4 KiB pages, and 2 MiB hugetlb pages when the pool has them), mapped
//! MAP_SHARED into the application and, through the map log, at the same
//! addresses into the proxy. "Private" memory is private because nobody else
//! maps that part of the file. The exceptions are MAP_SHARED|MAP_ANONYMOUS
//! memory, which lives in a third memfd that a fork shares instead of
//! copying, and a MAP_SHARED mapping of a real file, which maps that file in
//! both processes.
//!
//! Huge-page memory is pre-faulted (MAP_POPULATE) unless the application
//! asked for MAP_NORESERVE or PROT_NONE: it has no demand-paging noise.
//! 4 KiB pages are pre-faulted only with `lwk run --prefault-all`.
//! A huge page that an operation must split at a 4 KiB boundary is copied
//! into 4 KiB pages first ("demoted").
//!
//! The module is cut by concern:
//! * `pieces`: the bookkeeping, pure logic: the sorted table of pieces of
//!   the address space and the allocator of memory-file offsets;
//! * `host`: every effect outside that bookkeeping (system calls, the map
//!   log, the proxy, statistics), the methods of one trait, [`Host`]; its
//!   implementation [`Linux`] is the only place here with system calls, and
//!   the unit tests put a recording fake in its place;
//! * `backing`: the memory files: making them, reserving, pre-faulting and
//!   giving back their pages, mapping and mirroring a piece, demoting a huge
//!   page;
//! * `ops`: the operations on ranges (forget, map fresh memory or a file,
//!   protect, move, zero, the fork copy) that the entry points are made of;
//! * `snapshot`: saving and restoring the memory manager ([`MmSnapshot`]);
//! * this file: the [`Mm`] type and its one instance [`MM`], and the entry
//!   points: the system calls (mmap, munmap, mprotect, mremap, brk,
//!   madvise) with their argument checks, and what boot, the loader and
//!   fork call.
//!
//! Copies to and from application memory are in `crate::uaccess`.

mod backing;
mod host;
mod ops;
mod pieces;
mod snapshot;
#[cfg(test)]
mod tests;

use core::marker::PhantomData;

use lwk_abi::control::{MapOp, OP_UNMAP};
use lwk_abi::layout::{APP_END, APP_START, HUGE_PAGE_SIZE, PAGE_SIZE};
use lwk_rt::*;

pub use host::{Host, Linux};
pub use pieces::{Access, Extent, Piece, MAX_EXTENTS, MAX_PIECES};
pub use snapshot::{
    ExtentsRecord, MmSnapshot, PieceRecord, MM_BORROWED, MM_HUGE_OK, MM_PREFAULT_ALL, MM_REQUIRE_HUGE, MM_VERBOSE,
    PIECE_LAZY,
};

use crate::sync::SpinLock;
use pieces::{Extents, Pieces};

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

/// The application's address space as the LWK manages it. `H` carries out
/// its effects: [`Linux`] in the LWK, a fake in unit tests.
pub struct Mm<H: Host = Linux> {
    pieces: Pieces,
    /// Free offsets of each memfd (`memfd_slot`: 4 KiB, 2 MiB, shared).
    extents: [Extents; 3],
    memfd: [i32; 3],
    /// The partition's memory directory (a descriptor) and its page size:
    /// application memory files are made there instead of memfds. Without
    /// a partition the page size is 0 and the directory is not used.
    part_dir: i32,
    part_page: u64,
    /// A vfork child using its parent's memory (and memfds) as they are.
    borrowed: bool,
    huge_ok: bool,
    require_huge: bool,
    prefault_all: bool,
    verbose: bool,
    brk_start: u64,
    brk_cur: u64,
    brk_end: u64,
    brk_dirty: u64,
    host: PhantomData<fn() -> H>,
}

pub static MM: SpinLock<Mm> = SpinLock::new(Mm::new());

impl<H: Host> Mm<H> {
    /// Forget all bookkeeping, as a fresh memory manager has none (for a
    /// test of restore; the memory and the mappings stay).
    pub fn wipe(&mut self) {
        *self = Self::new();
    }

    const fn new() -> Self {
        Mm {
            pieces: Pieces::new(),
            extents: [Extents::new(), Extents::new(), Extents::new()],
            // All zero, so that the whole table is .bss, not 850 KiB of the
            // image: memfd is set by init, part_dir by set_partition.
            memfd: [0, 0, 0],
            part_dir: 0,
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
            host: PhantomData,
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

    /// Take application memory from a partition: its directory (a
    /// hugetlbfs whose pages are reserved for it, or a tmpfs) and page size.
    pub fn set_partition(&mut self, dir: i32, page: u64) {
        self.part_dir = dir;
        self.part_page = page;
    }

    pub fn note_fallback(&mut self) {
        H::note_huge_fallback(self.verbose);
    }

    pub fn is_free(&self, start: u64, end: u64) -> bool {
        self.pieces.is_free(start, end)
    }

    /// May the LWK itself read (or write) [addr, addr+len) of the
    /// application, and how (see `crate::uaccess`)?
    pub fn access(&self, addr: u64, len: u64, write: bool) -> Access {
        self.pieces.access(addr, len, write, self.part_page != 0)
    }

    pub fn pieces(&self) -> &[Piece] {
        self.pieces.as_slice()
    }

    /// Reserve a free range for an image of `len` bytes (the interpreter).
    pub fn find_free(&self, len: u64) -> Option<u64> {
        self.find_gap(page_up(len), HUGE, 0)
    }

    /// Highest free, aligned gap of `len` bytes for a new mapping; the
    /// start is congruent to `phase` modulo `align`. It stays 1 GiB above
    /// the start of the heap, for the heap to grow.
    fn find_gap(&self, len: u64, align: u64, phase: u64) -> Option<u64> {
        self.pieces.find_gap(len, align, phase, self.brk_start + (1 << 30))
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
        if len == 0 || !off.is_multiple_of(PAGE) {
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
            if !addr.is_multiple_of(PAGE) {
                return Err(-EINVAL);
            }
            if !Self::in_app_range(addr, len) {
                return Err(-ENOMEM);
            }
            if flags & MAP_FIXED == 0 && !self.is_free(addr, addr + len) {
                return Err(-EEXIST);
            }
            addr
        } else if addr != 0
            && addr.is_multiple_of(PAGE)
            && Self::in_app_range(addr, len)
            && self.is_free(addr, addr + len)
        {
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

    pub fn munmap(&mut self, addr: u64, len: u64) -> i64 {
        if let Err(e) = self.own() {
            return e;
        }
        if !addr.is_multiple_of(PAGE) || len == 0 {
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
        unsafe { H::munmap(start, end - start) };
        H::push(MapOp { kind: OP_UNMAP, addr: start, len: end - start, ..Default::default() });
        0
    }

    pub fn mprotect(&mut self, addr: u64, len: u64, prot: u64) -> i64 {
        if let Err(e) = self.own() {
            return e;
        }
        if !addr.is_multiple_of(PAGE) {
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
        if !self.pieces.covered(addr, end) {
            return -ENOMEM;
        }
        match self.protect(addr, end, prot as u32) {
            Ok(()) => 0,
            Err(e) => e,
        }
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
        if !old.is_multiple_of(PAGE) || flags & !(MREMAP_MAYMOVE | MREMAP_FIXED | MREMAP_DONTUNMAP) != 0 {
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
        if !self.pieces.covered(old, old_end) {
            return Err(-EFAULT);
        }
        if flags & MREMAP_FIXED != 0 {
            if !new_addr.is_multiple_of(PAGE) || !Self::in_app_range(new_addr, new_len) {
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

    pub fn madvise(&mut self, addr: u64, len: u64, advice: u64) -> i64 {
        if let Err(e) = self.own() {
            return e;
        }
        const MADV_FREE: u64 = 8;
        if !addr.is_multiple_of(PAGE) {
            return -EINVAL;
        }
        let end = addr.saturating_add(page_up(len));
        match advice {
            MADV_DONTNEED | MADV_REMOVE => {
                if !self.pieces.covered(addr, end) {
                    return -ENOMEM;
                }
                self.zero(addr, end);
                0
            }
            // Keeping the contents is a valid MADV_FREE.
            MADV_FREE => {
                if self.pieces.covered(addr, end) {
                    0
                } else {
                    -ENOMEM
                }
            }
            // SAFETY: other advice does not change contents or mappings.
            _ => unsafe { H::madvise(addr, len, advice) },
        }
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
            unsafe { H::zero(self.brk_cur, z - self.brk_cur, (PROT_READ | PROT_WRITE) as u32) };
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
        self.map_fresh(start, end, (PROT_READ | PROT_WRITE) as u32, false)?;
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
}
