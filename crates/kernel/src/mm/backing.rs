//! The memory files behind the application's memory: making them (memfds,
//! or files in a partition's memory directory), reserving, pre-faulting and
//! giving back their pages, mapping a piece from its file and mirroring it
//! to the proxy, and splitting a piece, which inside a huge page means
//! demoting that page to 4 KiB pages first.

use lwk_abi::control::{memfd_slot, MapOp, OP_MAP, SRC_MEMFD_HUGE, SRC_MEMFD_SHARED, SRC_MEMFD_SMALL};
use lwk_rt::*;

use super::host::Host;
use super::pieces::Piece;
use super::{huge_down, Mm, HUGE, MEMFD_SPACE, PAGE};

impl<H: Host> Mm<H> {
    /// New private memfds; the shared one is made once and kept (a forked
    /// child shares it with its parent).
    pub(super) fn create_memfds(&mut self, huge: bool) -> Result<(), i64> {
        self.memfd[0] = -1;
        self.memfd[1] = -1;
        self.huge_ok = false;
        if self.memfd[2] < 0 {
            let sfd = H::memfd_create(c"lwk-shared", MFD_CLOEXEC);
            if sfd < 0 || H::truncate(sfd as i32, MEMFD_SPACE) < 0 {
                return Err(if sfd < 0 { sfd } else { -ENOMEM });
            }
            self.memfd[2] = sfd as i32;
            self.extents[2].init(MEMFD_SPACE);
        }
        let fd = self.memory_file(c"lwk-mem", MFD_CLOEXEC, PAGE);
        if fd < 0 {
            return Err(fd);
        }
        self.memfd[0] = fd as i32;
        self.extents[0].init(MEMFD_SPACE);
        if huge {
            let hfd = self.memory_file(c"lwk-huge", MFD_CLOEXEC | MFD_HUGETLB | MFD_HUGE_2MB, HUGE);
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
    pub(super) fn publish_memfds(&self) {
        H::publish_memfds(self.memfd);
    }

    /// A new memory file of MEMFD_SPACE bytes for pages of `page` bytes: in
    /// the partition's directory if its pages are those, else a memfd
    /// `name` made with `flags`.
    fn memory_file(&self, name: &core::ffi::CStr, flags: u64, page: u64) -> i64 {
        let fd = if self.part_page == page { H::tmpfile(self.part_dir) } else { H::memfd_create(name, flags) };
        if fd < 0 {
            return fd;
        }
        let r = H::truncate(fd as i32, MEMFD_SPACE);
        if r < 0 {
            H::close(fd as i32);
            return r;
        }
        fd
    }

    /// In a partition on 4 KiB pages (a tmpfs, which allocates at first
    /// touch), allocate a piece's pages now, so that running out is ENOMEM
    /// from mmap or mprotect instead of SIGBUS at first touch.
    pub(super) fn reserve(&self, src: u32, off: u64, len: u64) -> Result<(), i64> {
        if self.part_page != PAGE || src != SRC_MEMFD_SMALL {
            return Ok(());
        }
        if H::allocate(self.memfd[0], off, len) < 0 {
            self.note_partition_full();
            return Err(-ENOMEM);
        }
        Ok(())
    }

    /// Say once that the partition's memory is used up; the application
    /// gets ENOMEM as it would from an exhausted machine.
    pub(super) fn note_partition_full(&self) {
        if self.part_page != 0 {
            H::note_partition_full();
        }
    }

    /// Pre-fault a piece now? Huge-page memory always (the pool has paid
    /// for it, and it makes first touch cheap); 4 KiB pages only with
    /// --prefault-all, because pre-faulting memory a program never touches
    /// costs more than it saves (CPython maps 1 MiB arenas it barely uses).
    /// In a partition every page is pre-faulted: that is what it reserved.
    pub(super) fn populate(&self, p: &Piece) -> u64 {
        if p.lazy || p.prot == 0 || !(p.src == SRC_MEMFD_HUGE || self.prefault_all || self.part_page != 0) {
            0
        } else {
            MAP_POPULATE
        }
    }

    /// Give back the pages and offsets of [off, off+len) of `src`'s file.
    pub(super) fn release_extent(&mut self, src: u32, off: u64, len: u64) {
        // Shared memory may still be mapped by a forked child (or parent):
        // its pages and offsets stay until every process is gone.
        if src == SRC_MEMFD_SHARED {
            return;
        }
        let k = src as usize;
        H::punch(self.memfd[k], off, len);
        self.extents[k].free(off, len);
    }

    /// Map memfd piece `p` at its own address in this process, pre-faulted
    /// by the policy of `populate`.
    pub(super) fn map_piece(&self, p: &Piece) -> i64 {
        let Some(k) = memfd_slot(p.src) else { return -EINVAL };
        // SAFETY: p lies in the application's range, whose layout the
        // caller owns.
        unsafe {
            H::mmap(p.start, p.len(), p.prot as u64, MAP_SHARED | MAP_FIXED | self.populate(p), self.memfd[k], p.off)
        }
    }

    /// Replace the 2 MiB page at `at` of huge piece `i` with 4 KiB pages
    /// holding the same bytes.
    pub(super) fn demote(&mut self, i: usize, at: u64) -> Result<(), i64> {
        let p = self.pieces[i];
        let off_h = p.off + (at - p.start);
        let off_s = self.extents[0].alloc(HUGE).ok_or(-ENOMEM)?;
        if let Err(e) = H::copy_extent(self.memfd[1], off_h, self.memfd[0], off_s, HUGE) {
            self.extents[0].free(off_s, HUGE);
            return Err(e);
        }
        // SAFETY: replaces the huge page at `at` with its 4 KiB copy;
        // pre-faulted as the huge page was (populate of the huge piece).
        let r = unsafe {
            H::mmap(at, HUGE, p.prot as u64, MAP_SHARED | MAP_FIXED | self.populate(&p), self.memfd[0], off_s)
        };
        if r < 0 {
            self.extents[0].free(off_s, HUGE);
            return Err(r);
        }
        self.pieces[i].end = at;
        let small = Piece { start: at, end: at + HUGE, src: SRC_MEMFD_SMALL, off: off_s, ..p };
        let after = Piece { start: at + HUGE, off: off_h + HUGE, ..p };
        if self.pieces[i].start == at {
            self.pieces[i] = small;
        } else {
            self.pieces.insert(small)?;
        }
        if after.start < after.end {
            self.pieces.insert(after)?;
        }
        self.release_extent(SRC_MEMFD_HUGE, off_h, HUGE);
        H::sub_memory(HUGE, true);
        H::add_memory(HUGE, false);
        mirror_piece::<H>(&small);
        Ok(())
    }

    /// Make `addr` a piece boundary, demoting the huge page it falls in
    /// when it is not 2 MiB-aligned.
    pub(super) fn split_at(&mut self, addr: u64) -> Result<(), i64> {
        let i = self.pieces.find(addr);
        if i == self.pieces.len() || self.pieces[i].start >= addr {
            return Ok(());
        }
        if self.pieces[i].src == SRC_MEMFD_HUGE && !addr.is_multiple_of(HUGE) {
            self.demote(i, huge_down(addr))?;
            return self.split_at(addr);
        }
        self.pieces.split(i, addr)
    }
}

/// Have the proxy map piece `p` at the same address, from the same source.
pub(super) fn mirror_piece<H: Host>(p: &Piece) {
    H::push(MapOp { kind: OP_MAP, prot: p.prot, addr: p.start, len: p.len(), source: p.src, fd: p.fd, offset: p.off });
}
