//! Saving and restoring the memory manager ([`Persist`]).
//!
//! The snapshot is the memory manager's bookkeeping: the table of pieces,
//! the free offsets of each memory file, the memory files' descriptor
//! numbers, the partition's directory and page size, the heap, and the
//! options. Not the memory itself, nor the kernel's mappings: those live in
//! the memory files and in the process, which a restore expects to match
//! (the same process, as after a restore onto itself; or one whose files
//! and mappings were rebuilt from the same snapshot).
//!
//! Every field is an integer and the layout has no padding, so every bit
//! pattern is a value and a snapshot can be sent as bytes; `restore`
//! checks what the values mean before it changes anything.

use lwk_abi::control::{
    memfd_slot, SRC_APP_FD, SRC_APP_FD_PRIVATE, SRC_LWK_FD_PRIVATE, SRC_MEMFD_HUGE, SRC_MEMFD_SHARED, SRC_MEMFD_SMALL,
};
use lwk_abi::layout::{APP_END, APP_START};
use lwk_rt::{EINVAL, MAP_FIXED, MAP_PRIVATE, PROT_EXEC, PROT_READ, PROT_WRITE};

use super::host::Host;
use super::pieces::{Extent, Piece, MAX_EXTENTS, MAX_PIECES};
use super::{Mm, HUGE, MEMFD_SPACE, PAGE};
use crate::persist::Persist;

/// A piece of the address space, as saved.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PieceRecord {
    pub start: u64,
    pub end: u64,
    /// Offset in the memory file or file.
    pub off: u64,
    pub prot: u32,
    /// SRC_* of `lwk_abi::control`.
    pub src: u32,
    /// For a file: the descriptor it was mapped from.
    pub fd: i32,
    /// PIECE_LAZY.
    pub flags: u32,
}

/// Not pre-faulted (MAP_NORESERVE).
pub const PIECE_LAZY: u32 = 1;

/// The free offsets of one memory file, as saved: `free[..n]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExtentsRecord {
    pub n: u64,
    pub free: [Extent; MAX_EXTENTS],
}

/// The memory manager's state. 852,064 bytes: a caller keeps it in static
/// memory (or on the heap), never on the stack.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmSnapshot {
    /// Pieces in use in `pieces`, sorted by address; the rest are zero.
    pub n_pieces: u64,
    pub pieces: [PieceRecord; MAX_PIECES],
    /// For each memory file (4 KiB pages, 2 MiB pages, shared): its free
    /// offsets.
    pub extents: [ExtentsRecord; 3],
    /// The memory files' descriptors in the application process (-1: none).
    pub memfd: [i32; 3],
    /// The partition's memory directory and its page size (0: no
    /// partition, and the directory is not used).
    pub part_dir: i32,
    pub part_page: u64,
    pub brk_start: u64,
    pub brk_cur: u64,
    pub brk_end: u64,
    /// The heap above brk_cur up to here was used and must be zeroed when
    /// given again.
    pub brk_dirty: u64,
    /// MM_* flags.
    pub flags: u32,
    /// Zero.
    pub reserved: u32,
}

/// A vfork child still using its parent's memory.
pub const MM_BORROWED: u32 = 1;
/// 2 MiB pages are available.
pub const MM_HUGE_OK: u32 = 2;
/// Options: `--hugepages 2M`, `--prefault-all`, `-v`.
pub const MM_REQUIRE_HUGE: u32 = 4;
pub const MM_PREFAULT_ALL: u32 = 8;
pub const MM_VERBOSE: u32 = 16;
const MM_FLAGS: u32 = MM_BORROWED | MM_HUGE_OK | MM_REQUIRE_HUGE | MM_PREFAULT_ALL | MM_VERBOSE;

// The layout has no padding: the sizes of the fields add up.
const _: () = assert!(core::mem::size_of::<PieceRecord>() == 40);
const _: () = assert!(core::mem::size_of::<ExtentsRecord>() == 8 + 16 * MAX_EXTENTS);
const _: () = assert!(
    core::mem::size_of::<MmSnapshot>()
        == 8 + 40 * MAX_PIECES + 3 * (8 + 16 * MAX_EXTENTS) + 3 * 4 + 4 + 8 + 4 * 8 + 4 + 4
);

impl PieceRecord {
    fn of(p: &Piece) -> Self {
        PieceRecord {
            start: p.start,
            end: p.end,
            off: p.off,
            prot: p.prot,
            src: p.src,
            fd: p.fd,
            flags: if p.lazy { PIECE_LAZY } else { 0 },
        }
    }

    fn piece(&self) -> Piece {
        Piece {
            start: self.start,
            end: self.end,
            prot: self.prot,
            src: self.src,
            fd: self.fd,
            lazy: self.flags & PIECE_LAZY != 0,
            off: self.off,
        }
    }
}

impl MmSnapshot {
    /// The flags of `m`.
    fn flags_of<H: Host>(m: &Mm<H>) -> u32 {
        [
            (m.borrowed, MM_BORROWED),
            (m.huge_ok, MM_HUGE_OK),
            (m.require_huge, MM_REQUIRE_HUGE),
            (m.prefault_all, MM_PREFAULT_ALL),
            (m.verbose, MM_VERBOSE),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .fold(0, |f, (_, bit)| f | bit)
    }

    /// Does the snapshot describe a state the memory manager can be in?
    /// What the code relies on: the pieces sorted, apart, page-aligned,
    /// inside the application's range, with known sources, huge ones on
    /// 2 MiB boundaries, each memfd piece in a file that exists and at
    /// offsets that are not free; free offsets sorted, apart and inside the
    /// files; the heap's bounds in order.
    fn check(&self) -> Result<(), i64> {
        if self.check_values() {
            Ok(())
        } else {
            Err(-EINVAL)
        }
    }

    fn check_values(&self) -> bool {
        let aligned = |x: u64, a: u64| x & (a - 1) == 0; // a: a power of two
        if self.flags & !MM_FLAGS != 0 || self.reserved != 0 {
            return false;
        }
        if ![0, PAGE, HUGE].contains(&self.part_page) || self.part_dir < -1 || self.memfd.iter().any(|&fd| fd < -1) {
            return false;
        }
        if !(aligned(self.brk_start, PAGE)
            && aligned(self.brk_end, PAGE)
            && self.brk_start <= self.brk_end
            && self.brk_end <= APP_END
            && self.brk_cur <= self.brk_end
            && self.brk_dirty <= self.brk_end)
        {
            return false;
        }
        for e in &self.extents {
            if e.n > MAX_EXTENTS as u64 {
                return false;
            }
            let mut after = 0; // where the previous free range ended, plus one
            for (i, x) in e.free[..e.n as usize].iter().enumerate() {
                let Some(end) = x.off.checked_add(x.len) else { return false };
                if x.len == 0 || end > MEMFD_SPACE || (i > 0 && x.off < after) {
                    return false;
                }
                after = end + 1; // adjacent ranges would have been merged
            }
        }
        if self.n_pieces > MAX_PIECES as u64 {
            return false;
        }
        let mut prev_end = APP_START;
        for r in &self.pieces[..self.n_pieces as usize] {
            let known_src = matches!(
                r.src,
                SRC_MEMFD_SMALL
                    | SRC_MEMFD_HUGE
                    | SRC_MEMFD_SHARED
                    | SRC_APP_FD
                    | SRC_APP_FD_PRIVATE
                    | SRC_LWK_FD_PRIVATE
            );
            if !(known_src
                && r.flags & !PIECE_LAZY == 0
                && r.prot as u64 & !(PROT_READ | PROT_WRITE | PROT_EXEC) == 0
                && r.start < r.end
                && prev_end <= r.start
                && r.end <= APP_END
                && aligned(r.start, PAGE)
                && aligned(r.end, PAGE)
                && aligned(r.off, PAGE))
            {
                return false;
            }
            prev_end = r.end;
            let Some(k) = memfd_slot(r.src) else { continue };
            let len = r.end - r.start;
            let e = &self.extents[k];
            if self.memfd[k] < 0
                || r.off.checked_add(len).is_none_or(|end| end > MEMFD_SPACE)
                || overlaps(&e.free[..e.n as usize], r.off, len)
                || (r.src == SRC_MEMFD_HUGE
                    && !(aligned(r.start, HUGE) && aligned(r.end, HUGE) && aligned(r.off, HUGE)))
            {
                return false;
            }
        }
        true
    }
}

/// Is any byte of [off, off+len) among the free ranges `free` (sorted,
/// apart)?
fn overlaps(free: &[Extent], off: u64, len: u64) -> bool {
    // The first free range that ends after `off` is the only candidate.
    let i = free.partition_point(|e| e.off + e.len <= off);
    i < free.len() && free[i].off < off + len
}

impl<H: Host> Persist for Mm<H> {
    type Snapshot = MmSnapshot;
    const VERSION: u32 = 1;

    /// Everything, with the unused parts of the tables zeroed: equal
    /// states give equal snapshots.
    fn save(&self, out: &mut MmSnapshot) {
        let pieces = self.pieces.as_slice();
        out.n_pieces = pieces.len() as u64;
        for (r, p) in out.pieces.iter_mut().zip(pieces) {
            *r = PieceRecord::of(p);
        }
        out.pieces[pieces.len()..].fill(PieceRecord::default());
        for (r, e) in out.extents.iter_mut().zip(&self.extents) {
            let free = e.as_slice();
            r.n = free.len() as u64;
            r.free[..free.len()].copy_from_slice(free);
            r.free[free.len()..].fill(Extent::default());
        }
        out.memfd = self.memfd;
        out.part_dir = self.part_dir;
        out.part_page = self.part_page;
        out.brk_start = self.brk_start;
        out.brk_cur = self.brk_cur;
        out.brk_end = self.brk_end;
        out.brk_dirty = self.brk_dirty;
        out.flags = MmSnapshot::flags_of(self);
        out.reserved = 0;
    }

    /// Replace the bookkeeping by `s`, after checking it (EINVAL, and no
    /// change, for a snapshot that describes no state the memory manager
    /// can be in), and tell the proxy which descriptors hold application
    /// memory now.
    fn restore(&mut self, s: &MmSnapshot) -> Result<(), i64> {
        s.check()?;
        self.pieces.set(s.pieces[..s.n_pieces as usize].iter().map(PieceRecord::piece));
        for (e, r) in self.extents.iter_mut().zip(&s.extents) {
            e.set(&r.free[..r.n as usize]);
        }
        self.memfd = s.memfd;
        self.part_dir = s.part_dir;
        self.part_page = s.part_page;
        self.brk_start = s.brk_start;
        self.brk_cur = s.brk_cur;
        self.brk_end = s.brk_end;
        self.brk_dirty = s.brk_dirty;
        let on = |bit| s.flags & bit != 0;
        self.borrowed = on(MM_BORROWED);
        self.huge_ok = on(MM_HUGE_OK);
        self.require_huge = on(MM_REQUIRE_HUGE);
        self.prefault_all = on(MM_PREFAULT_ALL);
        self.verbose = on(MM_VERBOSE);
        self.publish_memfds();
        Ok(())
    }
}

impl<H: Host> Mm<H> {
    /// After a restore into a new process (whose memory files the restorer
    /// filled and passed at the descriptor numbers the snapshot names): map
    /// every piece again, here and in the proxy. A file piece is mapped
    /// privately from the descriptor `file(start)` gives (the same file,
    /// opened again by path) and becomes the LWK's own file mapping; a
    /// shared mapping of a file cannot be rebuilt this way (ENOTSUP).
    pub fn rebuild(&mut self, file: impl Fn(u64) -> Option<i32>) -> Result<(), i64> {
        for i in 0..self.pieces.len() {
            let p = self.pieces[i];
            if p.is_memfd() {
                let r = self.map_piece(&p);
                if r < 0 {
                    return Err(r);
                }
                H::add_memory(p.len(), p.src == SRC_MEMFD_HUGE);
            } else if p.src == SRC_APP_FD && p.prot as u64 & PROT_WRITE != 0 {
                // Read-only ones come back private (see lwk_migrate's
                // checkpoint); written ones cannot yet.
                return Err(-lwk_rt::ENOTSUP);
            } else {
                let fd = file(p.start).ok_or(-EINVAL)?;
                // SAFETY: the piece lies in the application's range, which
                // holds nothing else in a process being restored.
                let r = unsafe { H::mmap(p.start, p.len(), p.prot as u64, MAP_PRIVATE | MAP_FIXED, fd, p.off) };
                if r < 0 {
                    return Err(r);
                }
                self.pieces[i].src = SRC_LWK_FD_PRIVATE;
                self.pieces[i].fd = fd;
            }
            super::backing::mirror_piece::<H>(&self.pieces[i]);
        }
        Ok(())
    }
}
