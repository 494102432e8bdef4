//! The memory manager's bookkeeping, and nothing else: which pieces of the
//! application's address space are mapped from where, and which offsets of
//! each memory file are free. No system call is made here; everything in
//! this file is plain logic on two tables, tested as such.

use core::ops::{Index, IndexMut};

use lwk_abi::control::{memfd_slot, SRC_APP_FD_PRIVATE, SRC_LWK_FD_PRIVATE};
use lwk_abi::layout::{APP_END, APP_START, MMAP_TOP};
use lwk_rt::{ENOMEM, PROT_READ, PROT_WRITE};

/// The most pieces the table holds; one more mapping is ENOMEM, as
/// Linux's vm.max_map_count limit is.
pub const MAX_PIECES: usize = 16384;
/// The most free ranges an offset allocator keeps track of.
pub const MAX_EXTENTS: usize = 4096;

/// A contiguous part of the address space with one backing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Piece {
    pub start: u64,
    pub end: u64,
    pub prot: u32,
    /// SRC_MEMFD_SMALL, SRC_MEMFD_HUGE, SRC_MEMFD_SHARED, or a file
    /// (SRC_APP_FD, SRC_APP_FD_PRIVATE, SRC_LWK_FD_PRIVATE).
    pub src: u32,
    /// For a file: the descriptor it was mapped from.
    pub fd: i32,
    /// Not pre-faulted (MAP_NORESERVE).
    pub lazy: bool,
    /// Offset in the memfd or file.
    pub off: u64,
}

impl Piece {
    pub(super) fn len(&self) -> u64 {
        self.end - self.start
    }
    /// Backed by one of the LWK's memory files (not a file of the
    /// application's or the program's).
    pub(super) fn is_memfd(&self) -> bool {
        memfd_slot(self.src).is_some()
    }
    pub(super) fn is_private_file(&self) -> bool {
        self.src == SRC_APP_FD_PRIVATE || self.src == SRC_LWK_FD_PRIVATE
    }
}

/// How the LWK may copy to or from a range of the application's memory
/// (see `uaccess`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Not (entirely) application memory with the needed protection:
    /// EFAULT.
    Denied,
    /// LWK memory whose pages are present or can always be made present:
    /// an ordinary copy cannot fault.
    Direct,
    /// Mapped, but a page may be missing when touched (a file that was
    /// truncated under its mapping, memory the partition did not reserve):
    /// copy with the kernel's fault-safe copy.
    FaultSafe,
}

/// The pieces of the application's address space, sorted by address,
/// never overlapping.
pub struct Pieces {
    list: [Piece; MAX_PIECES],
    n: usize,
}

impl Index<usize> for Pieces {
    type Output = Piece;
    fn index(&self, i: usize) -> &Piece {
        &self.list[i]
    }
}

impl IndexMut<usize> for Pieces {
    fn index_mut(&mut self, i: usize) -> &mut Piece {
        &mut self.list[i]
    }
}

impl Pieces {
    pub const fn new() -> Self {
        Pieces { list: [Piece { start: 0, end: 0, prot: 0, src: 0, fd: 0, lazy: false, off: 0 }; MAX_PIECES], n: 0 }
    }

    pub fn len(&self) -> usize {
        self.n
    }

    pub fn as_slice(&self) -> &[Piece] {
        &self.list[..self.n]
    }

    /// Index of the first piece whose end is above `addr`.
    pub fn find(&self, addr: u64) -> usize {
        let (mut lo, mut hi) = (0, self.n);
        while lo < hi {
            let mid = (lo + hi) / 2;
            if self.list[mid].end <= addr {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo
    }

    /// Is no part of [start, end) mapped?
    pub fn is_free(&self, start: u64, end: u64) -> bool {
        let i = self.find(start);
        i == self.n || self.list[i].start >= end
    }

    /// Is [start, end) entirely mapped?
    pub fn covered(&self, start: u64, end: u64) -> bool {
        let mut at = start;
        let mut i = self.find(start);
        while at < end {
            if i == self.n || self.list[i].start > at {
                return false;
            }
            at = self.list[i].end;
            i += 1;
        }
        true
    }

    /// May the LWK itself read (or write) [addr, addr+len) of the
    /// application, and how? Only application memory qualifies: below
    /// APP_END (the LWK's own memory lies above it), entirely mapped, every
    /// piece readable (writable). `partition`: memory comes from a
    /// partition, where lazy pieces have no pages reserved.
    pub fn access(&self, addr: u64, len: u64, write: bool, partition: bool) -> Access {
        let Some(end) = addr.checked_add(len) else {
            return Access::Denied;
        };
        if end > APP_END || !self.covered(addr, end) {
            return Access::Denied;
        }
        let need = if write { PROT_WRITE } else { PROT_READ } as u32;
        let mut how = Access::Direct;
        let mut i = self.find(addr);
        while i < self.n && self.list[i].start < end {
            let p = &self.list[i];
            if p.prot & need == 0 {
                return Access::Denied;
            }
            if !p.is_memfd() || (p.lazy && partition) {
                how = Access::FaultSafe;
            }
            i += 1;
        }
        how
    }

    /// Put `p` in its place. The caller made room for it (nothing it
    /// overlaps is left).
    pub fn insert(&mut self, p: Piece) -> Result<(), i64> {
        if self.n == MAX_PIECES {
            return Err(-ENOMEM);
        }
        let i = self.find(p.start);
        self.list.copy_within(i..self.n, i + 1);
        self.list[i] = p;
        self.n += 1;
        Ok(())
    }

    pub fn remove_at(&mut self, i: usize) -> Piece {
        let p = self.list[i];
        self.list.copy_within(i + 1..self.n, i);
        self.n -= 1;
        p
    }

    /// Cut piece `i` in two at `addr` (strictly inside it); the second
    /// half keeps its place in the backing.
    pub fn split(&mut self, i: usize, addr: u64) -> Result<(), i64> {
        if self.n == MAX_PIECES {
            return Err(-ENOMEM);
        }
        let mut tail = self.list[i];
        tail.off += addr - tail.start;
        tail.start = addr;
        self.list[i].end = addr;
        self.list.copy_within(i + 1..self.n, i + 2);
        self.list[i + 1] = tail;
        self.n += 1;
        Ok(())
    }

    /// Highest free, aligned gap of `len` bytes below MMAP_TOP and not
    /// below `floor`; the start is congruent to `phase` modulo `align`.
    pub fn find_gap(&self, len: u64, align: u64, phase: u64, floor: u64) -> Option<u64> {
        let fit = |lo: u64, hi: u64| -> Option<u64> {
            let s = hi.checked_sub(len)?;
            let s = (s & !(align - 1)) + phase;
            let s = if s + len > hi { s.checked_sub(align)? } else { s };
            (s >= lo).then_some(s)
        };
        let mut hi = MMAP_TOP;
        for i in (0..self.n).rev() {
            let p = &self.list[i];
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
        fit(APP_START.max(floor), hi)
    }

    /// Replace the whole table by `pieces`: sorted, not overlapping, at
    /// most MAX_PIECES.
    pub fn set(&mut self, pieces: impl Iterator<Item = Piece>) {
        self.n = 0;
        for p in pieces {
            self.list[self.n] = p;
            self.n += 1;
        }
    }
}

/// A free range of a memory file: `len` bytes from `off`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Extent {
    pub off: u64,
    pub len: u64,
}

/// First-fit allocator of memfd offsets with coalescing: the free ranges,
/// sorted, never adjacent.
pub struct Extents {
    ext: [Extent; MAX_EXTENTS],
    n: usize,
}

impl Extents {
    pub const fn new() -> Self {
        Extents { ext: [Extent { off: 0, len: 0 }; MAX_EXTENTS], n: 0 }
    }

    /// Everything free: one range of `space` bytes.
    pub fn init(&mut self, space: u64) {
        self.ext[0] = Extent { off: 0, len: space };
        self.n = 1;
    }

    pub fn as_slice(&self) -> &[Extent] {
        &self.ext[..self.n]
    }

    /// Replace the free ranges by `free`: sorted, not adjacent, at most
    /// MAX_EXTENTS.
    pub fn set(&mut self, free: &[Extent]) {
        self.ext[..free.len()].copy_from_slice(free);
        self.n = free.len();
    }

    pub fn alloc(&mut self, len: u64) -> Option<u64> {
        let i = (0..self.n).find(|&i| self.ext[i].len >= len)?;
        let Extent { off, len: l } = self.ext[i];
        if l == len {
            self.ext.copy_within(i + 1..self.n, i);
            self.n -= 1;
        } else {
            self.ext[i] = Extent { off: off + len, len: l - len };
        }
        Some(off)
    }

    pub fn free(&mut self, off: u64, len: u64) {
        let i = (0..self.n).find(|&i| self.ext[i].off > off).unwrap_or(self.n);
        let merge_prev = i > 0 && self.ext[i - 1].off + self.ext[i - 1].len == off;
        let merge_next = i < self.n && off + len == self.ext[i].off;
        match (merge_prev, merge_next) {
            (true, true) => {
                self.ext[i - 1].len += len + self.ext[i].len;
                self.ext.copy_within(i + 1..self.n, i);
                self.n -= 1;
            }
            (true, false) => self.ext[i - 1].len += len,
            (false, true) => self.ext[i] = Extent { off, len: len + self.ext[i].len },
            (false, false) => {
                if self.n == self.ext.len() {
                    return; // fragmented beyond bookkeeping: leak the offsets, not memory (punched)
                }
                self.ext.copy_within(i..self.n, i + 1);
                self.ext[i] = Extent { off, len };
                self.n += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lwk_abi::control::{SRC_APP_FD, SRC_MEMFD_HUGE, SRC_MEMFD_SMALL};

    const RW: u32 = (PROT_READ | PROT_WRITE) as u32;
    const R: u32 = PROT_READ as u32;
    const MB: u64 = 1 << 20;

    fn piece(start: u64, end: u64, prot: u32) -> Piece {
        Piece { start, end, prot, src: SRC_MEMFD_SMALL, fd: -1, lazy: false, off: start }
    }

    /// A table holding `ps`, inserted in the order given.
    fn table(ps: &[Piece]) -> Box<Pieces> {
        let mut t = Box::new(Pieces::new());
        for p in ps {
            t.insert(*p).unwrap();
        }
        t
    }

    fn starts(t: &Pieces) -> Vec<(u64, u64)> {
        t.as_slice().iter().map(|p| (p.start, p.end)).collect()
    }

    #[test]
    fn insert_keeps_the_table_sorted_and_find_gives_the_first_piece_ending_above() {
        let t = table(&[piece(0x30000, 0x40000, RW), piece(0x10000, 0x20000, RW), piece(0x20000, 0x28000, R)]);
        assert_eq!(starts(&t), [(0x10000, 0x20000), (0x20000, 0x28000), (0x30000, 0x40000)]);
        assert_eq!(t.find(0), 0);
        assert_eq!(t.find(0x1ffff), 0);
        assert_eq!(t.find(0x20000), 1);
        assert_eq!(t.find(0x2c000), 2, "in the hole: the next piece");
        assert_eq!(t.find(0x40000), 3, "past the end: len()");
    }

    #[test]
    fn covered_and_is_free_see_holes() {
        let t = table(&[piece(0x10000, 0x20000, RW), piece(0x20000, 0x28000, R), piece(0x30000, 0x40000, RW)]);
        assert!(t.covered(0x10000, 0x28000), "two adjacent pieces");
        assert!(t.covered(0x18000, 0x19000));
        assert!(!t.covered(0x10000, 0x30000), "the hole at 0x28000");
        assert!(!t.covered(0x8000, 0x10000));
        assert!(t.covered(0x50000, 0x50000), "an empty range");
        assert!(t.is_free(0x28000, 0x30000));
        assert!(!t.is_free(0x28000, 0x30001));
        assert!(t.is_free(0x40000, 0x1000000));
        assert!(!t.is_free(0, 0x10001));
    }

    #[test]
    fn split_keeps_the_tail_at_its_offset_in_the_backing() {
        let mut t = table(&[Piece { off: 0x5000, ..piece(0x10000, 0x20000, RW) }, piece(0x30000, 0x40000, R)]);
        t.split(0, 0x14000).unwrap();
        assert_eq!(starts(&t), [(0x10000, 0x14000), (0x14000, 0x20000), (0x30000, 0x40000)]);
        assert_eq!((t[0].off, t[1].off), (0x5000, 0x9000));
        assert_eq!(t[1].prot, RW);
        let p = t.remove_at(1);
        assert_eq!((p.start, p.off), (0x14000, 0x9000));
        assert_eq!(starts(&t), [(0x10000, 0x14000), (0x30000, 0x40000)]);
    }

    #[test]
    fn a_full_table_refuses_more_pieces() {
        let mut t = Box::new(Pieces::new());
        for i in 0..MAX_PIECES as u64 {
            t.insert(piece(APP_START + 2 * i * 4096, APP_START + (2 * i + 1) * 4096, RW)).unwrap();
        }
        assert_eq!(t.insert(piece(APP_END - 8192, APP_END - 4096, RW)), Err(-ENOMEM));
        assert_eq!(t.split(0, APP_START + 2048), Err(-ENOMEM));
        assert_eq!(t.len(), MAX_PIECES);
    }

    #[test]
    fn access_needs_application_memory_with_the_protection_asked() {
        let file = Piece { src: SRC_APP_FD, fd: 5, lazy: true, ..piece(0x40000, 0x50000, RW) };
        let lazy = Piece { lazy: true, ..piece(0x50000, 0x60000, RW) };
        let t = table(&[
            piece(0x10000, 0x20000, RW),
            piece(0x20000, 0x28000, R),
            piece(0x28000, 0x30000, 0),
            file,
            lazy,
            Piece { src: SRC_MEMFD_HUGE, ..piece(0x200000, 0x400000, RW) },
        ]);
        use Access::*;
        assert_eq!(t.access(0x10000, 8, true, false), Direct);
        assert_eq!(t.access(0x1fffc, 8, false, false), Direct, "across two readable pieces");
        assert_eq!(t.access(0x1fffc, 8, true, false), Denied, "the second is read-only");
        assert_eq!(t.access(0x27ffc, 8, false, false), Denied, "into PROT_NONE");
        assert_eq!(t.access(0x30000, 8, false, false), Denied, "a hole");
        assert_eq!(t.access(0x0fffc, 8, false, false), Denied, "from below the first piece");
        assert_eq!(t.access(0x3fffc, 8, false, false), Denied, "into a piece from a hole");
        assert_eq!(t.access(0x40000, 8, true, false), FaultSafe, "a file can shrink under its mapping");
        assert_eq!(t.access(0x4fffc, 8, true, false), FaultSafe, "partly a file");
        assert_eq!(t.access(0x50000, 8, true, false), Direct, "lazy 4 KiB memfd pages: allocated at a fault");
        assert_eq!(t.access(0x50000, 8, true, true), FaultSafe, "lazy in a partition: nothing reserved");
        assert_eq!(t.access(0x3ffff8, 8, true, true), Direct, "huge pages");
        assert_eq!(t.access(u64::MAX - 3, 8, false, false), Denied, "wraps around");
        assert_eq!(t.access(0x10000, 0, false, false), Direct, "nothing to copy");
    }

    #[test]
    fn access_never_reaches_above_the_application_range() {
        // A piece outside the application's range (which the memory
        // manager never makes) still gives no access to the LWK's memory.
        let t = table(&[piece(APP_END - 0x1000, APP_END + 0x1000, RW)]);
        assert_eq!(t.access(APP_END - 0x10, 8, true, false), Access::Direct);
        assert_eq!(t.access(APP_END - 4, 8, true, false), Access::Denied);
        assert_eq!(t.access(APP_END, 8, false, false), Access::Denied);
    }

    #[test]
    fn find_gap_takes_the_highest_aligned_hole_above_the_floor() {
        let empty = table(&[]);
        let g = empty.find_gap(3 * MB, 2 * MB, 0, 0).unwrap();
        assert_eq!(g % (2 * MB), 0);
        assert!(g + 3 * MB <= MMAP_TOP && g + 3 * MB + 2 * MB > MMAP_TOP, "highest: {g:#x}");
        let g = empty.find_gap(3 * MB, 2 * MB, 0x5000, 0).unwrap();
        assert_eq!(g % (2 * MB), 0x5000, "with the phase asked");
        assert!(g + 3 * MB <= MMAP_TOP);

        // Pieces at the top: the hole between them when it fits.
        let top = MMAP_TOP - 4 * MB;
        let t = table(&[piece(top - 16 * MB, top - 6 * MB, RW), piece(top, MMAP_TOP, RW)]);
        assert_eq!(t.find_gap(4 * MB, 4096, 0, 0), Some(top - 4 * MB), "just below the top piece");
        assert_eq!(t.find_gap(4 * MB, 2 * MB, 0, 0), Some(top - 4 * MB));
        assert_eq!(t.find_gap(8 * MB, 4096, 0, 0), Some(top - 24 * MB), "too big for the hole");
        let g = t.find_gap(4 * MB, 2 * MB, 4096, 0).unwrap();
        assert_eq!(g, top - 6 * MB + 4096, "a phase that does not fit at the top of the hole");

        // Nothing above the floor.
        assert_eq!(empty.find_gap(2 * MB, 4096, 0, MMAP_TOP - MB), None);
        assert_eq!(empty.find_gap(MB, 4096, 0, MMAP_TOP - MB), Some(MMAP_TOP - MB));
        let low = table(&[piece(APP_START, MMAP_TOP, RW)]);
        assert_eq!(low.find_gap(4096, 4096, 0, 0), None, "everything taken");
    }

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
        assert_eq!(e.ext[0], Extent { off: 0, len: 1 << 20 });
        assert_eq!(e.alloc(2 << 20), None);
    }

    #[test]
    fn extents_merge_with_either_neighbour_or_both() {
        let mut e = Box::new(Extents::new());
        e.init(10 * 4096);
        for _ in 0..10 {
            e.alloc(4096).unwrap();
        }
        assert_eq!(e.n, 0, "an exact fit removes the range");
        assert_eq!(e.alloc(4096), None);
        let ranges = |e: &Extents| e.ext[..e.n].iter().map(|x| (x.off / 4096, x.len / 4096)).collect::<Vec<_>>();
        e.free(2 * 4096, 4096);
        e.free(6 * 4096, 4096);
        assert_eq!(ranges(&e), [(2, 1), (6, 1)], "apart");
        e.free(3 * 4096, 4096);
        assert_eq!(ranges(&e), [(2, 2), (6, 1)], "with the previous");
        e.free(5 * 4096, 4096);
        assert_eq!(ranges(&e), [(2, 2), (5, 2)], "with the next");
        e.free(4 * 4096, 4096);
        assert_eq!(ranges(&e), [(2, 5)], "with both");
        e.free(0, 4096);
        assert_eq!(ranges(&e), [(0, 1), (2, 5)], "before the first");
        assert_eq!(e.alloc(2 * 4096), Some(2 * 4096), "first fit skips what is too small");
        assert_eq!(ranges(&e), [(0, 1), (4, 3)]);
    }

    #[test]
    fn a_full_extent_table_leaks_offsets_rather_than_corrupt() {
        let mut e = Box::new(Extents::new());
        let n = MAX_EXTENTS as u64;
        e.init(2 * (n + 1) * 4096);
        e.alloc(2 * (n + 1) * 4096).unwrap();
        // Free every other page: MAX_EXTENTS separate ranges.
        for i in 0..n {
            e.free(2 * i * 4096, 4096);
        }
        assert_eq!(e.n, MAX_EXTENTS);
        e.free(2 * n * 4096, 4096);
        assert_eq!(e.n, MAX_EXTENTS, "no room: the range is not recorded");
        e.free(4096, 4096);
        assert_eq!(e.n, MAX_EXTENTS - 1, "merging still works");
        assert_eq!(e.ext[0], Extent { off: 0, len: 3 * 4096 });
    }
}
