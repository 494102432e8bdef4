//! The mapping operations the entry points are made of: forget a range,
//! back a range with fresh memory or with a file, change protection, move
//! pieces, zero a range, and give a forked child its own copy of memory.
//! Each keeps the table, the kernel's mappings and the proxy's mirror (the
//! map log) in step; every effect goes through [`Host`].

use lwk_abi::control::{
    memfd_slot, MapOp, OP_MOVE, OP_PROTECT, SRC_APP_FD, SRC_APP_FD_PRIVATE, SRC_MEMFD_HUGE, SRC_MEMFD_SHARED,
    SRC_MEMFD_SMALL,
};
use lwk_rt::*;

use super::backing::mirror_piece;
use super::host::Host;
use super::pieces::Piece;
use super::{huge_down, huge_up, Mm, HUGE, PAGE};

impl<H: Host> Mm<H> {
    /// Forget every piece inside [start, end), giving back its memory.
    /// The caller unmaps or maps over the range in the kernel.
    pub(super) fn forget(&mut self, start: u64, end: u64) -> Result<(), i64> {
        self.split_at(start)?;
        self.split_at(end)?;
        let i = self.pieces.find(start);
        while i < self.pieces.len() && self.pieces[i].start < end {
            let p = self.pieces.remove_at(i);
            if p.is_memfd() {
                self.release_extent(p.src, p.off, p.len());
                H::sub_memory(p.len(), p.src == SRC_MEMFD_HUGE);
            }
        }
        Ok(())
    }

    /// Back [start, end) with fresh zeroed memory: huge pages for the
    /// 2 MiB-aligned middle when possible, 4 KiB pages around it.
    pub(super) fn map_fresh(&mut self, start: u64, end: u64, prot: u32, lazy: bool) -> Result<(), i64> {
        self.map_fresh_as(start, end, prot, lazy, false)
    }

    /// As map_fresh; `shared` memory (MAP_SHARED|MAP_ANONYMOUS) goes to the
    /// shared memfd, which a fork does not copy.
    pub(super) fn map_fresh_as(
        &mut self,
        start: u64,
        end: u64,
        prot: u32,
        lazy: bool,
        shared: bool,
    ) -> Result<(), i64> {
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

    /// Back [start, end) with fresh memory of the memfd of `src`.
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
        if let Err(e) = self.pieces.insert(p) {
            // SAFETY: undo the mapping we just made.
            unsafe { H::munmap(start, len) };
            self.release_extent(src, off, len);
            return Err(e);
        }
        H::add_memory(len, src == SRC_MEMFD_HUGE);
        mirror_piece::<H>(&p);
        Ok(())
    }

    /// MAP_PRIVATE of a file. Read-only: the file itself, as natively (the
    /// page cache is shared, nothing is copied). Writable: a private copy of
    /// its contents in LWK memory, which differs from Linux only in that
    /// later writes to the file by others are not seen through pages the
    /// application has not written. A read-only one made writable later is
    /// copied then (see `privatize`).
    pub(super) fn map_private_file(&mut self, start: u64, end: u64, prot: u32, fd: i32, off: u64) -> Result<(), i64> {
        let acc = H::fd_flags(fd)? & O_ACCMODE;
        if acc == O_WRONLY {
            return Err(-EACCES);
        }
        if prot as u64 & PROT_WRITE == 0 {
            let lfd = H::reopen(fd, O_RDONLY)?;
            let r = self.map_file(start, end, prot, lfd, off, SRC_APP_FD_PRIVATE, fd);
            H::close(lfd);
            return r;
        }
        self.forget(start, end)?;
        self.map_fresh(start, end, (PROT_READ | PROT_WRITE) as u32, false)?;
        let len = end - start;
        let mut done = 0;
        while done < len {
            let r = H::pread(fd, start + done, len - done, off + done);
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
    pub(super) fn map_shared_file(
        &mut self,
        start: u64,
        end: u64,
        prot: u32,
        flags: u64,
        fd: i32,
        off: u64,
    ) -> Result<(), i64> {
        let acc = H::fd_flags(fd)? & O_ACCMODE;
        if acc == O_WRONLY || (prot as u64 & PROT_WRITE != 0 && acc != O_RDWR) {
            return Err(-EACCES);
        }
        let lfd = H::reopen(fd, if acc == O_RDWR { O_RDWR } else { O_RDONLY })?;
        self.forget(start, end)?;
        let keep = flags & (MAP_LOCKED | MAP_POPULATE | MAP_NONBLOCK | MAP_SYNC | MAP_NORESERVE);
        // SAFETY: the range is the application's and was forgotten above.
        let r = unsafe { H::mmap(start, end - start, prot as u64, MAP_SHARED | MAP_FIXED | keep, lfd, off) };
        H::close(lfd);
        if r < 0 {
            return Err(r);
        }
        let p = Piece { start, end, prot, src: SRC_APP_FD, fd, lazy: true, off };
        self.pieces.insert(p)?;
        mirror_piece::<H>(&p);
        Ok(())
    }

    /// Map a file MAP_PRIVATE, read-only, from `lfd` (open in this
    /// process); the proxy maps the same file from `src`/`fd`.
    #[allow(clippy::too_many_arguments)] // mmap's six, plus the two descriptors it needs
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
        let r =
            unsafe { H::mmap(start, end - start, prot as u64, MAP_PRIVATE | MAP_FIXED | self.populate(&p), lfd, off) };
        if r < 0 {
            return Err(r);
        }
        self.pieces.insert(p)?;
        mirror_piece::<H>(&p);
        Ok(())
    }

    /// Turn read-only file piece `i` into LWK memory with the same bytes,
    /// before it becomes writable: every writable page is the LWK's.
    fn privatize(&mut self, i: usize) -> Result<(), i64> {
        let p = self.pieces[i];
        let len = p.len();
        let off = self.extents[0].alloc(len).ok_or(-ENOMEM)?;
        // SAFETY: the piece is mapped application memory.
        if let Err(e) = unsafe { H::copy_to_file(p.start, len, p.prot, self.memfd[0], off) } {
            self.extents[0].free(off, len);
            return Err(e);
        }
        let q = Piece { src: SRC_MEMFD_SMALL, off, fd: -1, lazy: false, ..p };
        let r = self.map_piece(&q);
        if r < 0 {
            self.release_extent(SRC_MEMFD_SMALL, off, len);
            return Err(r);
        }
        self.pieces[i] = q;
        H::add_memory(len, false);
        mirror_piece::<H>(&q);
        Ok(())
    }

    /// Give [start, end), which is covered, protection `prot`.
    pub(super) fn protect(&mut self, start: u64, end: u64, prot: u32) -> Result<(), i64> {
        self.split_at(start)?;
        self.split_at(end)?;
        if prot as u64 & PROT_WRITE != 0 {
            let mut i = self.pieces.find(start);
            while i < self.pieces.len() && self.pieces[i].start < end {
                if self.pieces[i].is_private_file() {
                    self.privatize(i)?;
                }
                i += 1;
            }
        }
        if prot != 0 {
            let mut i = self.pieces.find(start);
            while i < self.pieces.len() && self.pieces[i].start < end {
                let p = self.pieces[i];
                if p.prot == 0 && !p.lazy {
                    self.reserve(p.src, p.off, p.len())?;
                }
                i += 1;
            }
        }
        // SAFETY: the range is covered by application pieces.
        let r = unsafe { H::mprotect(start, end - start, prot as u64) };
        if r < 0 {
            return Err(r);
        }
        let mut i = self.pieces.find(start);
        while i < self.pieces.len() && self.pieces[i].start < end {
            let now = Piece { prot, ..self.pieces[i] };
            let fault_in = self.pieces[i].prot == 0 && prot != 0 && now.is_memfd() && self.populate(&now) != 0;
            let p = &mut self.pieces[i];
            if fault_in {
                let advice = if prot as u64 & PROT_WRITE != 0 { MADV_POPULATE_WRITE } else { MADV_POPULATE_READ };
                // SAFETY: pre-faulting our own mapping.
                unsafe { H::madvise(p.start, p.end - p.start, advice) };
            }
            p.prot = prot;
            i += 1;
        }
        H::push(MapOp { kind: OP_PROTECT, prot, addr: start, len: end - start, ..Default::default() });
        Ok(())
    }

    /// New memory after a growing mremap: the protection of the last piece.
    pub(super) fn grow_tail(&mut self, start: u64, end: u64) -> Result<(), i64> {
        let i = self.pieces.find(start - 1);
        let (prot, lazy) = (self.pieces[i].prot, self.pieces[i].lazy);
        self.map_fresh(start, end, prot, lazy)
    }

    /// Move the pieces of [start, end) to `dst`, keeping their pages.
    pub(super) fn move_range(&mut self, start: u64, end: u64, dst: u64) -> Result<(), i64> {
        self.split_at(start)?;
        self.split_at(end)?;
        // SAFETY: kernel mremap of whole application pieces to a free,
        // suitably aligned part of the application's range.
        let r = unsafe { H::mremap(start, end - start, dst) };
        if r < 0 {
            return Err(r);
        }
        H::push(MapOp { kind: OP_MOVE, addr: start, len: end - start, offset: dst, ..Default::default() });
        let mut moved = [Piece::default(); 64];
        let mut k = 0;
        let inside = |m: &Self| {
            let i = m.pieces.find(start);
            (i < m.pieces.len() && m.pieces[i].start < end).then_some(i)
        };
        while let Some(i) = inside(self) {
            let mut p = self.pieces.remove_at(i);
            p.end = p.end - start + dst;
            p.start = p.start - start + dst;
            if k == moved.len() {
                self.pieces.insert(p)?;
            } else {
                moved[k] = p;
                k += 1;
            }
        }
        for p in &moved[..k] {
            self.pieces.insert(*p)?;
        }
        Ok(())
    }

    /// Give [start, end) fresh zero pages, as MADV_DONTNEED does for
    /// private anonymous memory on Linux.
    pub(super) fn zero(&mut self, start: u64, end: u64) {
        let mut i = self.pieces.find(start);
        while i < self.pieces.len() && self.pieces[i].start < end {
            let p = self.pieces[i];
            let (s, e) = (p.start.max(start), p.end.min(end));
            match p.src {
                SRC_MEMFD_SMALL => H::punch(self.memfd[0], p.off + (s - p.start), e - s),
                SRC_MEMFD_HUGE => {
                    let (hs, he) = (huge_up(s), huge_down(e));
                    if hs < he {
                        H::punch(self.memfd[1], p.off + (hs - p.start), he - hs);
                    }
                    for (a, b) in [(s, hs.min(e)), (he.max(s), e)] {
                        if a < b {
                            // SAFETY: [a, b) is mapped application memory of piece p.
                            unsafe { H::zero(a, b - a, p.prot) };
                        }
                    }
                }
                _ => {
                    // A file: same as native (shared pages stay, private
                    // ones refault from the file).
                    // SAFETY: drops page-table entries of application memory.
                    unsafe { H::madvise(s, e - s, MADV_DONTNEED) };
                }
            }
            i += 1;
        }
    }

    /// In the child of a fork: the memory is still the parent's (the memfds
    /// are shared); give every piece of LWK memory a private copy in new
    /// memfds, at the same address, and have the (new) proxy mirror it.
    /// The parent waits meanwhile, so its memory does not change under the
    /// copy (its other threads excepted: see the README).
    pub fn fork_copy(&mut self) -> Result<(), i64> {
        let old = self.memfd;
        let huge = old[1] >= 0;
        self.create_memfds(huge)?;
        for i in 0..self.pieces.len() {
            let p = self.pieces[i];
            if !p.is_memfd() || p.src == SRC_MEMFD_SHARED {
                // Files, and shared memory: the kernel's fork already did
                // the right thing (the proxy keeps its inherited mirror).
                continue;
            }
            let q = self.rehome(&p)?;
            // The old extent is read through its memfd, so the piece's
            // protection does not matter.
            H::copy_extent(old[p.src as usize], p.off, self.memfd[q.src as usize], q.off, p.len())?;
            let r = self.map_piece(&q);
            if r < 0 {
                return Err(r);
            }
            self.pieces[i] = q;
            H::add_memory(q.len(), q.src == SRC_MEMFD_HUGE);
            mirror_piece::<H>(&q);
        }
        for fd in &old[..2] {
            if *fd >= 0 {
                H::close(*fd);
            }
        }
        Ok(())
    }

    /// Where piece `p` of the old memory files goes in the new ones: the
    /// same kind of pages at a newly allocated offset, or 4 KiB pages when
    /// huge pages are not to be had.
    fn rehome(&mut self, p: &Piece) -> Result<Piece, i64> {
        let len = p.len();
        let mut src = p.src;
        let off = match self.extents[src as usize].alloc(len) {
            Some(o) if src == SRC_MEMFD_SMALL || self.huge_ok => o,
            _ => {
                src = SRC_MEMFD_SMALL;
                self.extents[0].alloc(len).ok_or(-ENOMEM)?
            }
        };
        Ok(Piece { src, off, ..*p })
    }
}
