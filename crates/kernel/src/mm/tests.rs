//! Tests of the memory manager's operations: the real code of `ops`,
//! `backing` and the entry points, on a fake [`Host`] that records every
//! effect it is asked for (and maps nothing). Each test checks the table
//! of pieces, the offsets in the memory files, the effects and the ops that
//! went into the map log.

use std::cell::RefCell;
use std::ffi::CStr;

use lwk_abi::control::{
    MapOp, OP_MAP, OP_MOVE, OP_PROTECT, OP_UNMAP, SRC_APP_FD, SRC_APP_FD_PRIVATE, SRC_LWK_FD_PRIVATE, SRC_MEMFD_HUGE,
    SRC_MEMFD_SHARED, SRC_MEMFD_SMALL,
};
use lwk_abi::layout::{APP_END, APP_START, MMAP_TOP};

use super::*;

const P: u64 = 4096;
const MB: u64 = 1 << 20;
const RW: u64 = PROT_READ | PROT_WRITE;
const R: u64 = PROT_READ;
const ANON: u64 = MAP_PRIVATE | MAP_ANONYMOUS;
/// A 2 MiB-aligned address in the middle of the application's range.
const BASE: u64 = 0x1000_0000_0000;

/// One effect the memory manager asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Call {
    /// A memory file was made: a memfd (`huge`: of 2 MiB pages) or, in
    /// a partition, a file in its directory.
    Create {
        fd: i32,
        huge: bool,
        partition: bool,
    },
    Close(i32),
    Allocate {
        fd: i32,
        off: u64,
        len: u64,
    },
    Punch {
        fd: i32,
        off: u64,
        len: u64,
    },
    Copy {
        from_fd: i32,
        from_off: u64,
        to_fd: i32,
        to_off: u64,
        len: u64,
    },
    CopyToFile {
        addr: u64,
        len: u64,
        fd: i32,
        off: u64,
    },
    Mmap {
        addr: u64,
        len: u64,
        prot: u64,
        flags: u64,
        fd: i32,
        off: u64,
    },
    Munmap {
        addr: u64,
        len: u64,
    },
    Mprotect {
        addr: u64,
        len: u64,
        prot: u64,
    },
    Mremap {
        from: u64,
        len: u64,
        to: u64,
    },
    Madvise {
        addr: u64,
        len: u64,
        advice: u64,
    },
    Zero {
        addr: u64,
        len: u64,
    },
    Push(Op),
    Publish([i32; 3]),
    Reopen {
        fd: i32,
        flags: u64,
    },
    Pread {
        fd: i32,
        addr: u64,
        len: u64,
        off: u64,
    },
    NoteFallback,
    NotePartitionFull,
}

/// A map-log op, comparable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Op {
    kind: u32,
    addr: u64,
    len: u64,
    prot: u32,
    source: u32,
    fd: i32,
    offset: u64,
}

/// The fake world of one test (tests run on threads of their own).
struct World {
    calls: Vec<Call>,
    next_fd: i32,
    huge_fds: Vec<i32>,
    /// Can a memfd of 2 MiB pages be made?
    huge_pool: bool,
    /// Does mapping 2 MiB pages fail (the pool ran dry)?
    huge_dry: bool,
    /// Does copying between memory files fail?
    copy_fails: bool,
    /// The flags of every application descriptor, and its file's size.
    fd_flags: u64,
    file_size: u64,
    mem: u64,
    huge_mem: u64,
}

thread_local! {
    static WORLD: RefCell<World> = const { RefCell::new(World {
        calls: Vec::new(),
        next_fd: 10,
        huge_fds: Vec::new(),
        huge_pool: true,
        huge_dry: false,
        copy_fails: false,
        fd_flags: O_RDWR,
        file_size: u64::MAX,
        mem: 0,
        huge_mem: 0,
    }) };
}

fn world<R>(f: impl FnOnce(&mut World) -> R) -> R {
    WORLD.with(|w| f(&mut w.borrow_mut()))
}

fn record(c: Call) {
    world(|w| w.calls.push(c));
}

/// The effects asked for since the last call.
fn take() -> Vec<Call> {
    world(|w| std::mem::take(&mut w.calls))
}

/// The map-log ops among `calls`.
fn pushed(calls: &[Call]) -> Vec<Op> {
    calls.iter().filter_map(|c| if let Call::Push(op) = c { Some(*op) } else { None }).collect()
}

struct Fake;

impl Fake {
    fn new_fd(huge: bool, partition: bool) -> i64 {
        world(|w| {
            let fd = w.next_fd;
            w.next_fd += 1;
            if huge {
                w.huge_fds.push(fd);
            }
            w.calls.push(Call::Create { fd, huge, partition });
            fd as i64
        })
    }
}

impl Host for Fake {
    fn memfd_create(_name: &CStr, flags: u64) -> i64 {
        let huge = flags & MFD_HUGETLB != 0;
        if huge && !world(|w| w.huge_pool) {
            return -ENOMEM;
        }
        Fake::new_fd(huge, false)
    }
    fn tmpfile(_dir: i32) -> i64 {
        Fake::new_fd(false, true)
    }
    fn truncate(_fd: i32, _len: u64) -> i64 {
        0
    }
    fn close(fd: i32) {
        record(Call::Close(fd));
    }
    fn allocate(fd: i32, off: u64, len: u64) -> i64 {
        record(Call::Allocate { fd, off, len });
        0
    }
    fn punch(fd: i32, off: u64, len: u64) {
        record(Call::Punch { fd, off, len });
    }
    fn copy_extent(from_fd: i32, from_off: u64, to_fd: i32, to_off: u64, len: u64) -> Result<(), i64> {
        if world(|w| w.copy_fails) {
            return Err(-EIO);
        }
        record(Call::Copy { from_fd, from_off, to_fd, to_off, len });
        Ok(())
    }
    unsafe fn copy_to_file(addr: u64, len: u64, _prot: u32, fd: i32, off: u64) -> Result<(), i64> {
        record(Call::CopyToFile { addr, len, fd, off });
        Ok(())
    }
    unsafe fn mmap(addr: u64, len: u64, prot: u64, flags: u64, fd: i32, off: u64) -> i64 {
        if world(|w| w.huge_dry && w.huge_fds.contains(&fd)) {
            return -ENOMEM;
        }
        record(Call::Mmap { addr, len, prot, flags, fd, off });
        addr as i64
    }
    unsafe fn munmap(addr: u64, len: u64) {
        record(Call::Munmap { addr, len });
    }
    unsafe fn mprotect(addr: u64, len: u64, prot: u64) -> i64 {
        record(Call::Mprotect { addr, len, prot });
        0
    }
    unsafe fn mremap(from: u64, len: u64, to: u64) -> i64 {
        record(Call::Mremap { from, len, to });
        to as i64
    }
    unsafe fn madvise(addr: u64, len: u64, advice: u64) -> i64 {
        record(Call::Madvise { addr, len, advice });
        0
    }
    unsafe fn zero(addr: u64, len: u64, _prot: u32) {
        record(Call::Zero { addr, len });
    }
    fn push(op: MapOp) {
        let MapOp { kind, prot, addr, len, source, fd, offset } = op;
        record(Call::Push(Op { kind, addr, len, prot, source, fd, offset }));
    }
    fn publish_memfds(memfd: [i32; 3]) {
        record(Call::Publish(memfd));
    }
    fn fd_flags(_fd: i32) -> Result<u64, i64> {
        Ok(world(|w| w.fd_flags))
    }
    fn reopen(fd: i32, flags: u64) -> Result<i32, i64> {
        record(Call::Reopen { fd, flags });
        Ok(90 + fd)
    }
    fn pread(fd: i32, addr: u64, len: u64, off: u64) -> i64 {
        record(Call::Pread { fd, addr, len, off });
        world(|w| w.file_size.saturating_sub(off).min(len)) as i64
    }
    fn add_memory(len: u64, huge: bool) {
        world(|w| {
            w.mem += len;
            w.huge_mem += if huge { len } else { 0 };
        });
    }
    fn sub_memory(len: u64, huge: bool) {
        world(|w| {
            w.mem -= len;
            w.huge_mem -= if huge { len } else { 0 };
        });
    }
    fn note_huge_fallback(_verbose: bool) {
        record(Call::NoteFallback);
    }
    fn note_partition_full() {
        record(Call::NotePartitionFull);
    }
}

/// Application memory in use, and of it on 2 MiB pages, as accounted.
fn memory() -> (u64, u64) {
    world(|w| (w.mem, w.huge_mem))
}

/// The memory files `Mm::init` makes in a fresh world: the shared memfd,
/// the 4 KiB one, the 2 MiB one.
const SHARED_FD: i32 = 10;
const SMALL_FD: i32 = 11;
const HUGE_FD: i32 = 12;

/// A memory manager as boot makes it, with 2 MiB pages or without
/// (`huge`: the pool has free pages); effects so far forgotten.
fn mm(huge: bool) -> Box<Mm<Fake>> {
    let mut m = blank();
    world(|w| w.huge_pool = huge);
    m.init(huge, false, false, false).unwrap();
    take();
    m
}

/// `Mm::new()`, on the heap (it is about 850 KiB).
fn blank() -> Box<Mm<Fake>> {
    // SAFETY: every field of Mm is an integer, a bool, an array of those,
    // or a PhantomData: all zero bytes is a valid Mm, and it is Mm::new().
    unsafe { Box::new_zeroed().assume_init() }
}

/// The table as (start, end, prot, src, off).
fn table(m: &Mm<Fake>) -> Vec<(u64, u64, u64, u32, u64)> {
    m.pieces().iter().map(|p| (p.start, p.end, p.prot as u64, p.src, p.off)).collect()
}

fn op_map(addr: u64, len: u64, prot: u64, source: u32, offset: u64) -> Op {
    Op { kind: OP_MAP, addr, len, prot: prot as u32, source, fd: -1, offset }
}

fn op_unmap(addr: u64, len: u64) -> Op {
    Op { kind: OP_UNMAP, addr, len, prot: 0, source: 0, fd: 0, offset: 0 }
}

fn op_protect(addr: u64, len: u64, prot: u64) -> Op {
    Op { kind: OP_PROTECT, addr, len, prot: prot as u32, source: 0, fd: 0, offset: 0 }
}

fn mmap_fixed(m: &mut Mm<Fake>, addr: u64, len: u64, prot: u64) {
    assert_eq!(m.mmap(addr, len, prot, ANON | MAP_FIXED, -1, 0), addr as i64);
}

/// The free ranges of memory file `k` (in pages).
fn free(m: &Mm<Fake>, k: usize) -> Vec<(u64, u64)> {
    m.extents[k].as_slice().iter().map(|e| (e.off / P, e.len / P)).collect()
}

#[test]
fn page_rounding() {
    assert_eq!(page_up(1), 4096);
    assert_eq!(page_up(4096), 4096);
    assert_eq!(huge_up(1), 2 << 20);
    assert_eq!(huge_down((2 << 20) + 5), 2 << 20);
}

#[test]
fn init_makes_the_memory_files_and_tells_the_proxy() {
    let mut m = blank();
    m.init(true, false, false, false).unwrap();
    assert_eq!(
        take(),
        [
            Call::Create { fd: SHARED_FD, huge: false, partition: false },
            Call::Create { fd: SMALL_FD, huge: false, partition: false },
            Call::Create { fd: HUGE_FD, huge: true, partition: false },
            Call::Publish([SMALL_FD, HUGE_FD, SHARED_FD]),
        ]
    );
    assert!(m.huge_ok);

    // No 2 MiB pages: 4 KiB ones, said once.
    world(|w| w.huge_pool = false);
    let mut m = blank();
    m.init(true, false, false, false).unwrap();
    let calls = take();
    assert!(calls.contains(&Call::NoteFallback), "{calls:?}");
    assert_eq!(calls.last(), Some(&Call::Publish([14, -1, 13])));
    assert!(!m.huge_ok);

    // In a partition of 4 KiB pages: the 4 KiB file is made there.
    let mut m = blank();
    m.set_partition(7, P);
    m.init(false, true, false, false).unwrap();
    assert!(take().contains(&Call::Create { fd: 16, huge: false, partition: true }));
}

#[test]
fn mmap_of_anonymous_memory_takes_the_highest_gap_and_is_mirrored() {
    let mut m = mm(false);
    let a = m.mmap(0, 3 * P, RW, ANON, -1, 0);
    assert_eq!(a as u64, MMAP_TOP - 3 * P);
    let a = a as u64;
    assert_eq!(table(&m), [(a, a + 3 * P, RW, SRC_MEMFD_SMALL, 0)]);
    let calls = take();
    assert_eq!(
        calls,
        [
            Call::Mmap { addr: a, len: 3 * P, prot: RW, flags: MAP_SHARED | MAP_FIXED, fd: SMALL_FD, off: 0 },
            Call::Push(op_map(a, 3 * P, RW, SRC_MEMFD_SMALL, 0)),
        ]
    );
    // The next one goes below, at the next offset of the memory file;
    // a length is rounded up to whole pages.
    let b = m.mmap(0, P + 1, R, ANON, -1, 0) as u64;
    assert_eq!(b, a - 2 * P);
    assert_eq!(table(&m)[0], (b, b + 2 * P, R, SRC_MEMFD_SMALL, 3 * P));
    assert_eq!(memory(), (5 * P, 0));
    // A hint is taken when free.
    assert_eq!(m.mmap(BASE, P, RW, ANON, -1, 0), BASE as i64);
    assert_eq!(m.mmap(BASE, P, RW, ANON, -1, 0), (b - P) as i64, "not when taken");
}

#[test]
fn mmap_refuses_what_linux_refuses() {
    let mut m = mm(false);
    assert_eq!(m.mmap(0, 0, RW, ANON, -1, 0), -EINVAL);
    assert_eq!(m.mmap(0, P, RW, MAP_ANONYMOUS, -1, 0), -EINVAL, "neither shared nor private");
    assert_eq!(m.mmap(0, P, 8, ANON, -1, 0), -EINVAL, "unknown protection");
    assert_eq!(m.mmap(BASE + 1, P, RW, ANON | MAP_FIXED, -1, 0), -EINVAL);
    assert_eq!(m.mmap(APP_END, P, RW, ANON | MAP_FIXED, -1, 0), -ENOMEM, "outside the application's range");
    assert_eq!(m.mmap(0, APP_END + 1, RW, ANON, -1, 0), -ENOMEM);
    mmap_fixed(&mut m, BASE, 4 * P, RW);
    assert_eq!(m.mmap(BASE + P, P, RW, ANON | MAP_FIXED_NOREPLACE, -1, 0), -EEXIST);
    take();
    world(|w| w.fd_flags = O_WRONLY);
    assert_eq!(m.mmap(0, P, R, MAP_PRIVATE, 3, 0), -EACCES, "a write-only file");
    assert_eq!(m.mmap(0, P, R, MAP_SHARED, 3, 0), -EACCES);
    world(|w| w.fd_flags = O_RDONLY);
    assert_eq!(m.mmap(0, P, RW, MAP_SHARED, 3, 0), -EACCES, "shared and writable, a read-only file");
    assert_eq!(table(&m).len(), 1);
}

#[test]
fn huge_pages_back_the_aligned_middle_and_4k_pages_the_ends() {
    let mut m = mm(true);
    mmap_fixed(&mut m, BASE + MB, 6 * MB, RW);
    assert_eq!(
        table(&m),
        [
            (BASE + MB, BASE + 2 * MB, RW, SRC_MEMFD_SMALL, 0),
            (BASE + 2 * MB, BASE + 6 * MB, RW, SRC_MEMFD_HUGE, 0),
            (BASE + 6 * MB, BASE + 7 * MB, RW, SRC_MEMFD_SMALL, MB),
        ]
    );
    let calls = take();
    // Huge pages are pre-faulted, 4 KiB ones not (no --prefault-all).
    assert!(calls.contains(&Call::Mmap {
        addr: BASE + 2 * MB,
        len: 4 * MB,
        prot: RW,
        flags: MAP_SHARED | MAP_FIXED | MAP_POPULATE,
        fd: HUGE_FD,
        off: 0
    }));
    assert_eq!(
        pushed(&calls),
        [
            op_map(BASE + 2 * MB, 4 * MB, RW, SRC_MEMFD_HUGE, 0),
            op_map(BASE + MB, MB, RW, SRC_MEMFD_SMALL, 0),
            op_map(BASE + 6 * MB, MB, RW, SRC_MEMFD_SMALL, MB),
        ]
    );
    assert_eq!(memory(), (6 * MB, 4 * MB));

    // Placed by the LWK, 2 MiB or more: aligned to 2 MiB, all huge.
    let a = m.mmap(0, 4 * MB, RW, ANON, -1, 0) as u64;
    assert_eq!(a % (2 * MB), 0);
    assert_eq!(table(&m).last(), Some(&(a, a + 4 * MB, RW, SRC_MEMFD_HUGE, 4 * MB)));
    // MAP_NORESERVE and PROT_NONE memory stays on 4 KiB pages, unfaulted.
    let b = m.mmap(0, 4 * MB, RW, ANON | MAP_NORESERVE, -1, 0) as u64;
    let c = m.mmap(0, 4 * MB, 0, ANON, -1, 0) as u64;
    let t = table(&m);
    assert!(t.contains(&(b, b + 4 * MB, RW, SRC_MEMFD_SMALL, 2 * MB)), "{t:x?}");
    assert!(t.contains(&(c, c + 4 * MB, 0, SRC_MEMFD_SMALL, 6 * MB)), "{t:x?}");
    assert!(m.pieces().iter().any(|p| p.start == b && p.lazy));
    assert!(take().iter().all(|c| !matches!(c, Call::Mmap { flags, fd: SMALL_FD, .. } if flags & MAP_POPULATE != 0)));
}

#[test]
fn without_huge_pages_left_memory_falls_back_to_4k_unless_they_are_required() {
    let mut m = mm(true);
    world(|w| w.huge_dry = true);
    mmap_fixed(&mut m, BASE, 4 * MB, RW);
    assert_eq!(table(&m), [(BASE, BASE + 4 * MB, RW, SRC_MEMFD_SMALL, 0)]);
    assert!(take().contains(&Call::NoteFallback));
    assert_eq!(free(&m, 1), [(0, MEMFD_SPACE / P)], "the huge offsets were given back");

    m.require_huge = true;
    assert_eq!(m.mmap(BASE + 4 * MB, 4 * MB, RW, ANON | MAP_FIXED, -1, 0), -ENOMEM);
    assert_eq!(table(&m).len(), 1);
    assert!(take().is_empty(), "nothing mapped, nothing said");
    assert_eq!(free(&m, 1), [(0, MEMFD_SPACE / P)]);
}

#[test]
fn munmap_at_the_start_in_the_middle_and_at_the_end_of_a_piece() {
    let mut m = mm(false);
    mmap_fixed(&mut m, BASE, 16 * P, RW);
    take();

    assert_eq!(m.munmap(BASE, 4 * P), 0);
    assert_eq!(table(&m), [(BASE + 4 * P, BASE + 16 * P, RW, SRC_MEMFD_SMALL, 4 * P)]);
    assert_eq!(
        take(),
        [
            Call::Punch { fd: SMALL_FD, off: 0, len: 4 * P },
            Call::Munmap { addr: BASE, len: 4 * P },
            Call::Push(op_unmap(BASE, 4 * P)),
        ]
    );

    assert_eq!(m.munmap(BASE + 6 * P, 2 * P), 0);
    assert_eq!(
        table(&m),
        [
            (BASE + 4 * P, BASE + 6 * P, RW, SRC_MEMFD_SMALL, 4 * P),
            (BASE + 8 * P, BASE + 16 * P, RW, SRC_MEMFD_SMALL, 8 * P),
        ]
    );
    assert_eq!(take()[0], Call::Punch { fd: SMALL_FD, off: 6 * P, len: 2 * P });

    assert_eq!(m.munmap(BASE + 14 * P, 2 * P), 0);
    assert_eq!(table(&m)[1], (BASE + 8 * P, BASE + 14 * P, RW, SRC_MEMFD_SMALL, 8 * P));
    assert_eq!(take()[0], Call::Punch { fd: SMALL_FD, off: 14 * P, len: 2 * P });
    assert_eq!(memory(), (8 * P, 0));
    assert_eq!(free(&m, 0), [(0, 4), (6, 2), (14, MEMFD_SPACE / P - 14)]);
}

#[test]
fn munmap_across_several_pieces_and_holes() {
    let mut m = mm(false);
    mmap_fixed(&mut m, BASE, 4 * P, RW);
    mmap_fixed(&mut m, BASE + 4 * P, 4 * P, R);
    mmap_fixed(&mut m, BASE + 10 * P, 4 * P, RW);
    take();
    assert_eq!(m.munmap(BASE + 2 * P, 10 * P), 0);
    assert_eq!(
        table(&m),
        [(BASE, BASE + 2 * P, RW, SRC_MEMFD_SMALL, 0), (BASE + 12 * P, BASE + 14 * P, RW, SRC_MEMFD_SMALL, 10 * P)]
    );
    assert_eq!(
        take(),
        [
            Call::Punch { fd: SMALL_FD, off: 2 * P, len: 2 * P },
            Call::Punch { fd: SMALL_FD, off: 4 * P, len: 4 * P },
            Call::Punch { fd: SMALL_FD, off: 8 * P, len: 2 * P },
            Call::Munmap { addr: BASE + 2 * P, len: 10 * P },
            Call::Push(op_unmap(BASE + 2 * P, 10 * P)),
        ]
    );
    // Everything back: the offsets coalesce into one free range again.
    assert_eq!(m.munmap(BASE, 16 * P), 0);
    assert!(m.pieces().is_empty());
    assert_eq!(free(&m, 0), [(0, MEMFD_SPACE / P)]);
    assert_eq!(memory(), (0, 0));
}

#[test]
fn munmap_checks_its_arguments_and_stays_in_the_application_range() {
    let mut m = mm(false);
    assert_eq!(m.munmap(BASE + 1, P), -EINVAL);
    assert_eq!(m.munmap(BASE, 0), -EINVAL);
    assert!(take().is_empty());
    assert_eq!(m.munmap(BASE, P), 0, "nothing there: fine, as natively");
    assert_eq!(take(), [Call::Munmap { addr: BASE, len: P }, Call::Push(op_unmap(BASE, P))]);
    assert_eq!(m.munmap(0, APP_START + P), 0);
    assert_eq!(take()[0], Call::Munmap { addr: APP_START, len: P }, "never below the application's range");
    assert_eq!(m.munmap(APP_END - P, 4 * P), 0);
    assert_eq!(take()[0], Call::Munmap { addr: APP_END - P, len: P }, "nor above");
    assert_eq!(m.munmap(APP_END, P), 0);
    assert!(take().is_empty());
}

#[test]
fn mprotect_splits_pieces_and_is_mirrored() {
    let mut m = mm(false);
    mmap_fixed(&mut m, BASE, 16 * P, RW);
    take();
    assert_eq!(m.mprotect(BASE + 4 * P, 4 * P, R), 0);
    assert_eq!(
        table(&m),
        [
            (BASE, BASE + 4 * P, RW, SRC_MEMFD_SMALL, 0),
            (BASE + 4 * P, BASE + 8 * P, R, SRC_MEMFD_SMALL, 4 * P),
            (BASE + 8 * P, BASE + 16 * P, RW, SRC_MEMFD_SMALL, 8 * P),
        ]
    );
    assert_eq!(
        take(),
        [Call::Mprotect { addr: BASE + 4 * P, len: 4 * P, prot: R }, Call::Push(op_protect(BASE + 4 * P, 4 * P, R))]
    );
    // Across pieces, from inside one to inside another.
    assert_eq!(m.mprotect(BASE + 2 * P, 4 * P, 0), 0);
    assert_eq!(table(&m).iter().map(|t| (t.0 - BASE) / P).collect::<Vec<_>>(), [0, 2, 4, 6, 8], "split at both ends");
    assert_eq!(table(&m)[1].2, 0);
    assert_eq!(table(&m)[2].2, 0);
    assert_eq!(table(&m)[3].2, R);
    // Not all mapped: ENOMEM, nothing changed.
    take();
    assert_eq!(m.mprotect(BASE + 12 * P, 8 * P, R), -ENOMEM);
    assert_eq!(m.mprotect(BASE + 1, P, R), -EINVAL);
    assert_eq!(m.mprotect(BASE, P, PROT_READ | 0x0100_0000), -EINVAL, "PROT_GROWSDOWN");
    assert_eq!(m.mprotect(BASE, 0, R), 0);
    assert!(take().is_empty());
}

#[test]
fn in_a_partition_mprotect_reserves_and_prefaults_what_becomes_accessible() {
    let mut m = blank();
    m.set_partition(7, P);
    m.init(false, true, false, false).unwrap();
    let small = m.memfd[0];
    take();
    mmap_fixed(&mut m, BASE, 4 * P, 0);
    assert!(take().iter().all(|c| !matches!(c, Call::Allocate { .. })), "PROT_NONE: nothing reserved");
    assert_eq!(m.mprotect(BASE, 4 * P, RW), 0);
    assert_eq!(
        take(),
        [
            Call::Allocate { fd: small, off: 0, len: 4 * P },
            Call::Mprotect { addr: BASE, len: 4 * P, prot: RW },
            Call::Madvise { addr: BASE, len: 4 * P, advice: MADV_POPULATE_WRITE },
            Call::Push(op_protect(BASE, 4 * P, RW)),
        ]
    );
    // Accessible memory is reserved and pre-faulted when mapped.
    mmap_fixed(&mut m, BASE + 4 * P, 4 * P, R);
    let calls = take();
    assert_eq!(calls[0], Call::Allocate { fd: small, off: 4 * P, len: 4 * P });
    assert!(matches!(calls[1], Call::Mmap { flags, .. } if flags & MAP_POPULATE != 0));
}

#[test]
fn splitting_a_huge_page_demotes_it_to_4k_pages_with_the_same_bytes() {
    let mut m = mm(true);
    mmap_fixed(&mut m, BASE, 6 * MB, RW);
    assert_eq!(table(&m), [(BASE, BASE + 6 * MB, RW, SRC_MEMFD_HUGE, 0)]);
    take();
    let at = BASE + 2 * MB + P;
    assert_eq!(m.munmap(at, P), 0);
    assert_eq!(
        table(&m),
        [
            (BASE, BASE + 2 * MB, RW, SRC_MEMFD_HUGE, 0),
            (BASE + 2 * MB, at, RW, SRC_MEMFD_SMALL, 0),
            (at + P, BASE + 4 * MB, RW, SRC_MEMFD_SMALL, 2 * P),
            (BASE + 4 * MB, BASE + 6 * MB, RW, SRC_MEMFD_HUGE, 4 * MB),
        ]
    );
    let calls = take();
    assert_eq!(
        calls,
        [
            // The 2 MiB page holding `at` is copied into 4 KiB pages,
            Call::Copy { from_fd: HUGE_FD, from_off: 2 * MB, to_fd: SMALL_FD, to_off: 0, len: 2 * MB },
            // mapped in its place (pre-faulted as the huge page was),
            Call::Mmap {
                addr: BASE + 2 * MB,
                len: 2 * MB,
                prot: RW,
                flags: MAP_SHARED | MAP_FIXED | MAP_POPULATE,
                fd: SMALL_FD,
                off: 0
            },
            // and the huge page is given back;
            Call::Punch { fd: HUGE_FD, off: 2 * MB, len: 2 * MB },
            Call::Push(op_map(BASE + 2 * MB, 2 * MB, RW, SRC_MEMFD_SMALL, 0)),
            // then the page is unmapped as from any 4 KiB piece.
            Call::Punch { fd: SMALL_FD, off: P, len: P },
            Call::Munmap { addr: at, len: P },
            Call::Push(op_unmap(at, P)),
        ]
    );
    assert_eq!(memory(), (6 * MB - P, 4 * MB));
    assert_eq!(free(&m, 1), [(512, 512), (1536, MEMFD_SPACE / P - 1536)]);
}

#[test]
fn huge_pages_split_at_2m_boundaries_stay_huge() {
    let mut m = mm(true);
    mmap_fixed(&mut m, BASE, 6 * MB, RW);
    take();
    assert_eq!(m.mprotect(BASE + 2 * MB, 2 * MB, R), 0);
    assert_eq!(
        table(&m),
        [
            (BASE, BASE + 2 * MB, RW, SRC_MEMFD_HUGE, 0),
            (BASE + 2 * MB, BASE + 4 * MB, R, SRC_MEMFD_HUGE, 2 * MB),
            (BASE + 4 * MB, BASE + 6 * MB, RW, SRC_MEMFD_HUGE, 4 * MB),
        ]
    );
    assert!(take().iter().all(|c| !matches!(c, Call::Copy { .. })));
    // The first page of a piece: demoted in place.
    assert_eq!(m.mprotect(BASE, P, R), 0);
    assert_eq!(table(&m)[0], (BASE, BASE + P, R, SRC_MEMFD_SMALL, 0));
    assert_eq!(table(&m)[1], (BASE + P, BASE + 2 * MB, RW, SRC_MEMFD_SMALL, P));
    assert_eq!(table(&m)[2].3, SRC_MEMFD_HUGE);
}

#[test]
fn a_failed_demotion_leaves_everything_as_it_was() {
    let mut m = mm(true);
    mmap_fixed(&mut m, BASE, 4 * MB, RW);
    take();
    world(|w| w.copy_fails = true);
    assert_eq!(m.munmap(BASE + P, P), -EIO);
    assert_eq!(table(&m), [(BASE, BASE + 4 * MB, RW, SRC_MEMFD_HUGE, 0)]);
    assert!(take().is_empty());
    assert_eq!(free(&m, 0), [(0, MEMFD_SPACE / P)], "the 4 KiB offsets were given back");
}

#[test]
fn mremap_grows_in_place_when_the_range_after_is_free() {
    let mut m = mm(false);
    mmap_fixed(&mut m, BASE, 4 * P, RW);
    take();
    assert_eq!(m.mremap(BASE, 4 * P, 8 * P, 0, 0), BASE as i64);
    assert_eq!(
        table(&m),
        [(BASE, BASE + 4 * P, RW, SRC_MEMFD_SMALL, 0), (BASE + 4 * P, BASE + 8 * P, RW, SRC_MEMFD_SMALL, 4 * P)]
    );
    assert_eq!(pushed(&take()), [op_map(BASE + 4 * P, 4 * P, RW, SRC_MEMFD_SMALL, 4 * P)]);
    // Shrinking unmaps the tail.
    assert_eq!(m.mremap(BASE, 8 * P, 2 * P, 0, 0), BASE as i64);
    assert_eq!(table(&m), [(BASE, BASE + 2 * P, RW, SRC_MEMFD_SMALL, 0)]);
    assert_eq!(pushed(&take()), [op_unmap(BASE + 2 * P, 6 * P)]);
}

#[test]
fn mremap_moves_the_pages_when_it_may_and_must() {
    let mut m = mm(false);
    mmap_fixed(&mut m, BASE, 4 * P, RW);
    mmap_fixed(&mut m, BASE + 4 * P, 4 * P, R);
    take();
    assert_eq!(m.mremap(BASE, 4 * P, 8 * P, 0, 0), -ENOMEM, "blocked, and may not move");
    assert!(take().is_empty());
    let dst = m.mremap(BASE, 4 * P, 8 * P, MREMAP_MAYMOVE, 0) as u64;
    assert_eq!(dst % (2 * MB), BASE % (2 * MB), "same place in a 2 MiB page, so huge pages can move");
    assert_eq!(
        table(&m),
        [
            (BASE + 4 * P, BASE + 8 * P, R, SRC_MEMFD_SMALL, 4 * P),
            (dst, dst + 4 * P, RW, SRC_MEMFD_SMALL, 0),
            (dst + 4 * P, dst + 8 * P, RW, SRC_MEMFD_SMALL, 8 * P),
        ]
    );
    let calls = take();
    assert_eq!(calls[0], Call::Mremap { from: BASE, len: 4 * P, to: dst });
    assert_eq!(
        pushed(&calls),
        [
            Op { kind: OP_MOVE, addr: BASE, len: 4 * P, prot: 0, source: 0, fd: 0, offset: dst },
            op_map(dst + 4 * P, 4 * P, RW, SRC_MEMFD_SMALL, 8 * P),
        ]
    );
    assert_eq!(m.mremap(BASE, 4 * P, 8 * P, MREMAP_MAYMOVE, 0), -EFAULT, "not mapped any more");
}

#[test]
fn mremap_to_a_fixed_place_replaces_what_was_there() {
    let mut m = mm(false);
    mmap_fixed(&mut m, BASE, 2 * P, RW);
    mmap_fixed(&mut m, BASE + 2 * P, 2 * P, R);
    let to = BASE + 64 * P;
    mmap_fixed(&mut m, to, 8 * P, RW);
    take();
    assert_eq!(m.mremap(BASE, 4 * P, 3 * P, MREMAP_MAYMOVE | MREMAP_FIXED, to), to as i64);
    assert_eq!(
        table(&m),
        [
            (to, to + 2 * P, RW, SRC_MEMFD_SMALL, 0),
            (to + 2 * P, to + 3 * P, R, SRC_MEMFD_SMALL, 2 * P),
            (to + 3 * P, to + 8 * P, RW, SRC_MEMFD_SMALL, 7 * P),
        ],
        "both pieces moved with their offsets over the start of the old mapping at `to`; the cut tail gone"
    );
    let ops = pushed(&take());
    assert_eq!(
        ops,
        [
            op_unmap(BASE + 3 * P, P),
            op_unmap(to, 3 * P),
            Op { kind: OP_MOVE, addr: BASE, len: 3 * P, prot: 0, source: 0, fd: 0, offset: to },
        ]
    );
    assert_eq!(m.mremap(to, 3 * P, 3 * P, MREMAP_FIXED, BASE), -EINVAL, "FIXED needs MAYMOVE");
    assert_eq!(m.mremap(to, 3 * P, 3 * P, MREMAP_MAYMOVE | MREMAP_FIXED, to + P), -EINVAL, "overlapping");
    assert_eq!(m.mremap(to, 3 * P, 3 * P, MREMAP_MAYMOVE | MREMAP_DONTUNMAP, 0), -EINVAL);
}

#[test]
fn fork_copy_gives_the_child_its_own_memory_files_with_the_same_layout() {
    let mut m = mm(true);
    mmap_fixed(&mut m, BASE, 2 * MB, RW); // huge
    mmap_fixed(&mut m, BASE + 2 * MB, 4 * P, R); // 4 KiB, after a hole in the file:
    m.munmap(BASE + 2 * MB, P);
    let shared = m.mmap(0, 2 * P, RW, MAP_SHARED | MAP_ANONYMOUS, -1, 0) as u64;
    m.map_file(BASE + 4 * MB, BASE + 4 * MB + 2 * P, R as u32, 3, 0, SRC_LWK_FD_PRIVATE, 3).unwrap();
    let before = table(&m);
    assert_eq!(before[1], (BASE + 2 * MB + P, BASE + 2 * MB + 4 * P, R, SRC_MEMFD_SMALL, P));
    take();

    m.fork_copy().unwrap();
    let (small, huge) = (13, 14);
    assert_eq!(
        table(&m),
        [
            (BASE, BASE + 2 * MB, RW, SRC_MEMFD_HUGE, 0),
            (BASE + 2 * MB + P, BASE + 2 * MB + 4 * P, R, SRC_MEMFD_SMALL, 0),
            (BASE + 4 * MB, BASE + 4 * MB + 2 * P, R, SRC_LWK_FD_PRIVATE, 0),
            (shared, shared + 2 * P, RW, SRC_MEMFD_SHARED, 0),
        ],
        "same places, new offsets; the file and the shared memory as they were"
    );
    let calls = take();
    assert_eq!(
        calls,
        [
            Call::Create { fd: small, huge: false, partition: false },
            Call::Create { fd: huge, huge: true, partition: false },
            Call::Publish([small, huge, SHARED_FD]),
            Call::Copy { from_fd: HUGE_FD, from_off: 0, to_fd: huge, to_off: 0, len: 2 * MB },
            Call::Mmap {
                addr: BASE,
                len: 2 * MB,
                prot: RW,
                flags: MAP_SHARED | MAP_FIXED | MAP_POPULATE,
                fd: huge,
                off: 0
            },
            Call::Push(op_map(BASE, 2 * MB, RW, SRC_MEMFD_HUGE, 0)),
            Call::Copy { from_fd: SMALL_FD, from_off: P, to_fd: small, to_off: 0, len: 3 * P },
            Call::Mmap {
                addr: BASE + 2 * MB + P,
                len: 3 * P,
                prot: R,
                flags: MAP_SHARED | MAP_FIXED,
                fd: small,
                off: 0
            },
            Call::Push(op_map(BASE + 2 * MB + P, 3 * P, R, SRC_MEMFD_SMALL, 0)),
            Call::Close(SMALL_FD),
            Call::Close(HUGE_FD),
        ]
    );
    assert_eq!(m.memfd, [small, huge, SHARED_FD]);
    assert_eq!(free(&m, 0), [(3, MEMFD_SPACE / P - 3)]);
}

#[test]
fn fork_copy_without_huge_pages_puts_huge_memory_on_4k_pages() {
    let mut m = mm(true);
    mmap_fixed(&mut m, BASE, 2 * MB, RW);
    mmap_fixed(&mut m, BASE + 2 * MB, 4 * P, RW);
    take();
    world(|w| w.huge_pool = false);
    m.fork_copy().unwrap();
    assert_eq!(
        table(&m),
        [
            (BASE, BASE + 2 * MB, RW, SRC_MEMFD_SMALL, 0),
            (BASE + 2 * MB, BASE + 2 * MB + 4 * P, RW, SRC_MEMFD_SMALL, 2 * MB)
        ]
    );
    let calls = take();
    assert!(calls.contains(&Call::NoteFallback));
    assert!(calls.contains(&Call::Copy { from_fd: HUGE_FD, from_off: 0, to_fd: 13, to_off: 0, len: 2 * MB }));
    assert!(calls.contains(&Call::Close(HUGE_FD)));
}

#[test]
fn a_vfork_child_copies_the_memory_before_its_first_change() {
    let mut m = mm(false);
    mmap_fixed(&mut m, BASE, 4 * P, RW);
    take();
    m.borrow();
    assert_eq!(take(), [Call::Publish([SMALL_FD, -1, SHARED_FD])], "the parent's memory, as it is");
    mmap_fixed(&mut m, BASE + 8 * P, P, RW);
    let calls = take();
    assert_eq!(calls[0], Call::Create { fd: 12, huge: false, partition: false }, "first its own copy");
    assert!(calls.contains(&Call::Copy { from_fd: SMALL_FD, from_off: 0, to_fd: 12, to_off: 0, len: 4 * P }));
    assert!(calls.contains(&Call::Close(SMALL_FD)));
    assert_eq!(
        calls.last(),
        Some(&Call::Push(op_map(BASE + 8 * P, P, RW, SRC_MEMFD_SMALL, 4 * P))),
        "then the change, in its own memory file"
    );
    mmap_fixed(&mut m, BASE + 9 * P, P, RW);
    assert!(take().iter().all(|c| !matches!(c, Call::Create { .. })), "once");
}

#[test]
fn brk_grows_in_2m_steps_and_zeroes_what_it_gives_again() {
    let mut m = mm(true);
    let start = BASE + 0x1234;
    m.set_brk_start(start);
    let heap = page_up(start);
    assert_eq!(m.brk(0), start as i64, "a query");
    assert_eq!(m.brk(heap + 10), (heap + 10) as i64);
    // Up to the next 2 MiB boundary, on 4 KiB pages.
    assert_eq!(table(&m), [(heap, BASE + 2 * MB, RW, SRC_MEMFD_SMALL, 0)]);
    assert_eq!(m.brk(BASE + 3 * MB), (BASE + 3 * MB) as i64);
    assert_eq!(table(&m)[1], (BASE + 2 * MB, BASE + 4 * MB, RW, SRC_MEMFD_HUGE, 0), "then whole huge pages");
    take();
    // Shrink, grow again: what comes back reads as zero, as from the kernel.
    assert_eq!(m.brk(heap + 10), (heap + 10) as i64);
    assert_eq!(m.brk(heap + 100), (heap + 100) as i64);
    assert_eq!(take(), [Call::Zero { addr: heap + 10, len: 90 }]);
    assert_eq!(m.brk(heap - 1), (heap + 100) as i64, "below the start: unchanged");
    mmap_fixed(&mut m, BASE + 4 * MB, P, RW);
    assert_eq!(m.brk(BASE + 5 * MB), (heap + 100) as i64, "into a mapping: unchanged");
    assert_eq!(table(&m).len(), 3);
}

#[test]
fn madvise_dontneed_gives_back_pages_and_zeroes_partial_huge_pages() {
    let mut m = mm(true);
    mmap_fixed(&mut m, BASE, 4 * MB, RW);
    mmap_fixed(&mut m, BASE + 4 * MB, 4 * P, RW);
    take();
    assert_eq!(m.madvise(BASE + 4 * MB + P, 2 * P, MADV_DONTNEED), 0);
    assert_eq!(take(), [Call::Punch { fd: SMALL_FD, off: P, len: 2 * P }]);
    assert_eq!(m.madvise(BASE + MB, 2 * MB, MADV_DONTNEED), 0);
    assert_eq!(
        take(),
        [Call::Zero { addr: BASE + MB, len: MB }, Call::Zero { addr: BASE + 2 * MB, len: MB }],
        "no whole huge page inside: zeroed in place"
    );
    assert_eq!(m.madvise(BASE + MB, 3 * MB + P, MADV_DONTNEED), 0);
    assert_eq!(
        take(),
        [
            Call::Punch { fd: HUGE_FD, off: 2 * MB, len: 2 * MB },
            Call::Zero { addr: BASE + MB, len: MB },
            Call::Punch { fd: SMALL_FD, off: 0, len: P },
        ]
    );
    assert_eq!(table(&m).len(), 2, "the layout stays");
    const MADV_FREE: u64 = 8;
    assert_eq!(m.madvise(BASE, P, MADV_FREE), 0);
    assert_eq!(m.madvise(BASE + 8 * MB, P, MADV_DONTNEED), -ENOMEM);
    assert!(take().is_empty());
}

#[test]
fn a_read_only_file_mapping_becomes_lwk_memory_where_it_is_made_writable() {
    let mut m = mm(false);
    m.map_file(BASE, BASE + 4 * P, R as u32, 3, 8 * P, SRC_LWK_FD_PRIVATE, 3).unwrap();
    assert_eq!(
        take(),
        [
            Call::Mmap { addr: BASE, len: 4 * P, prot: R, flags: MAP_PRIVATE | MAP_FIXED, fd: 3, off: 8 * P },
            Call::Push(Op {
                kind: OP_MAP,
                addr: BASE,
                len: 4 * P,
                prot: R as u32,
                source: SRC_LWK_FD_PRIVATE,
                fd: 3,
                offset: 8 * P
            }),
        ]
    );
    assert_eq!(m.mprotect(BASE + P, P, RW), 0);
    assert_eq!(
        table(&m),
        [
            (BASE, BASE + P, R, SRC_LWK_FD_PRIVATE, 8 * P),
            (BASE + P, BASE + 2 * P, RW, SRC_MEMFD_SMALL, 0),
            (BASE + 2 * P, BASE + 4 * P, R, SRC_LWK_FD_PRIVATE, 10 * P),
        ]
    );
    let calls = take();
    assert_eq!(calls[0], Call::CopyToFile { addr: BASE + P, len: P, fd: SMALL_FD, off: 0 });
    assert_eq!(
        pushed(&calls),
        [op_map(BASE + P, P, R, SRC_MEMFD_SMALL, 0), op_protect(BASE + P, P, RW)],
        "the proxy maps the copy, then protects it as asked"
    );
    assert_eq!(memory(), (P, 0), "the file's pages are not the LWK's memory");
}

#[test]
fn a_writable_private_file_mapping_is_a_copy_read_through_the_proxy() {
    let mut m = mm(false);
    world(|w| w.file_size = 5 * P + 100);
    assert_eq!(m.mmap(BASE, 8 * P, R, MAP_PRIVATE | MAP_FIXED, 4, 2 * P), BASE as i64);
    assert_eq!(m.mmap(BASE + 8 * P, 8 * P, RW, MAP_PRIVATE | MAP_FIXED, 4, 2 * P), (BASE + 8 * P) as i64);
    assert_eq!(
        table(&m),
        [(BASE, BASE + 8 * P, R, SRC_APP_FD_PRIVATE, 2 * P), (BASE + 8 * P, BASE + 16 * P, RW, SRC_MEMFD_SMALL, 0)]
    );
    let calls = take();
    assert!(calls.contains(&Call::Reopen { fd: 4, flags: O_RDONLY }));
    assert!(calls.contains(&Call::Close(94)), "the descriptor opened for the read-only mapping");
    // The writable one: read until the end of the file.
    let reads: Vec<_> = calls.iter().filter(|c| matches!(c, Call::Pread { .. })).collect();
    assert_eq!(
        reads,
        [
            &Call::Pread { fd: 4, addr: BASE + 8 * P, len: 8 * P, off: 2 * P },
            &Call::Pread { fd: 4, addr: BASE + 11 * P + 100, len: 5 * P - 100, off: 5 * P + 100 },
        ]
    );
}

#[test]
fn a_shared_file_mapping_maps_the_file_in_both_processes() {
    let mut m = mm(false);
    let a = m.mmap(0, 2 * P, RW, MAP_SHARED | MAP_POPULATE, 5, 0) as u64;
    assert_eq!(table(&m), [(a, a + 2 * P, RW, SRC_APP_FD, 0)]);
    assert!(m.pieces()[0].lazy && m.pieces()[0].fd == 5);
    let calls = take();
    assert_eq!(
        calls,
        [
            Call::Reopen { fd: 5, flags: O_RDWR },
            Call::Mmap { addr: a, len: 2 * P, prot: RW, flags: MAP_SHARED | MAP_FIXED | MAP_POPULATE, fd: 95, off: 0 },
            Call::Close(95),
            Call::Push(Op { kind: OP_MAP, addr: a, len: 2 * P, prot: RW as u32, source: SRC_APP_FD, fd: 5, offset: 0 }),
        ]
    );
    assert_eq!(m.access(a, 8, true), Access::FaultSafe);
}

#[test]
fn mapping_over_memory_gives_the_old_pages_back() {
    let mut m = mm(false);
    mmap_fixed(&mut m, BASE, 8 * P, RW);
    take();
    mmap_fixed(&mut m, BASE + 2 * P, 2 * P, R);
    assert_eq!(
        table(&m),
        [
            (BASE, BASE + 2 * P, RW, SRC_MEMFD_SMALL, 0),
            (BASE + 2 * P, BASE + 4 * P, R, SRC_MEMFD_SMALL, 2 * P),
            (BASE + 4 * P, BASE + 8 * P, RW, SRC_MEMFD_SMALL, 4 * P),
        ],
        "the pages given back are the first to be taken again"
    );
    assert_eq!(take()[0], Call::Punch { fd: SMALL_FD, off: 2 * P, len: 2 * P });
    assert_eq!(free(&m, 0), [(8, MEMFD_SPACE / P - 8)]);
    assert_eq!(memory(), (8 * P, 0));
}

/// A snapshot on the heap (it is about 850 KiB), all zeros.
fn snapshot() -> Box<MmSnapshot> {
    // SAFETY: every field of MmSnapshot is an integer or an array of
    // integers: all zero bytes is a valid value.
    unsafe { Box::new_zeroed().assume_init() }
}

/// A memory manager with a bit of everything: 4 KiB, huge, shared and
/// file pieces, split protections, a hole in a memory file, a heap.
fn busy() -> Box<Mm<Fake>> {
    let mut m = mm(true);
    m.set_brk_start(BASE + 0x1234);
    m.brk(BASE + 3 * MB);
    mmap_fixed(&mut m, BASE + 8 * MB, 4 * MB, RW);
    mmap_fixed(&mut m, BASE + 12 * MB, 8 * P, RW);
    m.mprotect(BASE + 12 * MB + 2 * P, 2 * P, R);
    m.munmap(BASE + 12 * MB + 6 * P, P);
    m.mmap(0, 2 * P, RW, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    m.mmap(0, 4 * P, RW, ANON | MAP_NORESERVE, -1, 0);
    m.map_file(BASE + 16 * MB, BASE + 16 * MB + 2 * P, R as u32, 3, 0, SRC_LWK_FD_PRIVATE, 3).unwrap();
    take();
    m
}

/// Everything `Mm` holds, comparable.
#[allow(clippy::type_complexity)]
fn state(m: &Mm<Fake>) -> (Vec<Piece>, Vec<Vec<Extent>>, [i32; 3], i32, u64, [bool; 5], [u64; 4]) {
    (
        m.pieces().to_vec(),
        m.extents.iter().map(|e| e.as_slice().to_vec()).collect(),
        m.memfd,
        m.part_dir,
        m.part_page,
        [m.borrowed, m.huge_ok, m.require_huge, m.prefault_all, m.verbose],
        [m.brk_start, m.brk_cur, m.brk_end, m.brk_dirty],
    )
}

#[test]
fn save_then_restore_into_a_fresh_memory_manager_gives_the_same_state() {
    use crate::persist::Persist;
    let mut m = busy();
    m.borrowed = true;
    m.verbose = true;
    let mut s = snapshot();
    m.save(&mut s);
    assert_eq!(s.n_pieces as usize, m.pieces().len());
    assert!(s.n_pieces >= 8, "{}", s.n_pieces);
    assert_eq!(s.flags, MM_BORROWED | MM_HUGE_OK | MM_VERBOSE);
    assert!(s.pieces.iter().any(|p| p.flags == PIECE_LAZY));

    let mut fresh = blank();
    assert_eq!(fresh.restore(&s), Ok(()));
    assert_eq!(state(&fresh), state(&m));
    assert_eq!(take(), [Call::Publish(m.memfd)], "bookkeeping only, and the proxy told of the memory files");
    let mut again = snapshot();
    fresh.save(&mut again);
    assert!(*again == *s, "equal states, equal snapshots");

    // The restored one goes on as the original would.
    m.borrowed = false;
    fresh.borrowed = false;
    let a = m.mmap(0, 3 * MB, RW, ANON, -1, 0);
    let original = take();
    assert_eq!(fresh.mmap(0, 3 * MB, RW, ANON, -1, 0), a);
    assert_eq!(take(), original);
    assert_eq!(state(&fresh), state(&m));
}

#[test]
fn save_zeroes_what_the_state_does_not_use() {
    use crate::persist::Persist;
    let m = busy();
    let mut s = snapshot();
    s.pieces[MAX_PIECES - 1].start = 12345;
    s.extents[2].free[MAX_EXTENTS - 1].len = 1;
    s.reserved = 7;
    m.save(&mut s);
    let mut clean = snapshot();
    m.save(&mut clean);
    assert!(*s == *clean);
}

#[test]
fn a_bad_snapshot_is_refused_and_changes_nothing() {
    use crate::persist::Persist;
    let mut good = snapshot();
    let saved = busy();
    saved.save(&mut good);
    let n = good.n_pieces as usize;
    let huge = good.pieces[..n].iter().position(|p| p.src == SRC_MEMFD_HUGE).unwrap();
    let small = good.pieces[..n].iter().position(|p| p.src == SRC_MEMFD_SMALL).unwrap();
    type Corruption = (&'static str, Box<dyn Fn(&mut MmSnapshot)>);
    let corruptions: Vec<Corruption> = vec![
        ("more pieces than fit", Box::new(|s| s.n_pieces = MAX_PIECES as u64 + 1)),
        ("unsorted pieces", Box::new(move |s| s.pieces.swap(0, n - 1))),
        ("overlapping pieces", Box::new(|s| s.pieces[1].start = s.pieces[0].end - P)),
        ("an empty piece", Box::new(|s| s.pieces[0].end = s.pieces[0].start)),
        ("a piece not on a page boundary", Box::new(|s| s.pieces[0].end -= 1)),
        ("a piece below the application's range", Box::new(|s| s.pieces[0].start = 0)),
        ("a piece above it", Box::new(move |s| s.pieces[n - 1].end = APP_END + P)),
        ("an unknown source", Box::new(|s| s.pieces[0].src = 6)),
        ("unknown piece flags", Box::new(|s| s.pieces[0].flags = 2)),
        ("unknown protection", Box::new(|s| s.pieces[0].prot = 8)),
        ("a huge piece off a 2 MiB boundary", Box::new(move |s| s.pieces[huge].off += P)),
        ("memory at a free offset", Box::new(move |s| s.pieces[small].off = s.extents[0].free[0].off)),
        ("memory past the end of its file", Box::new(move |s| s.pieces[small].off = MEMFD_SPACE)),
        ("memory in a file that is not there", Box::new(|s| s.memfd[1] = -1)),
        ("more free ranges than fit", Box::new(|s| s.extents[0].n = MAX_EXTENTS as u64 + 1)),
        (
            "unsorted free ranges",
            Box::new(|s| {
                s.extents[1].n = 2;
                s.extents[1].free[1] = Extent { off: 0, len: P };
            }),
        ),
        ("an empty free range", Box::new(|s| s.extents[0].free[0].len = 0)),
        ("a free range past the end of its file", Box::new(|s| s.extents[2].free[0].len = MEMFD_SPACE)),
        ("a bad partition page size", Box::new(|s| s.part_page = 8192)),
        ("a bad descriptor", Box::new(|s| s.memfd[2] = -2)),
        ("a heap ending past its limit", Box::new(|s| s.brk_cur = s.brk_end + 1)),
        ("a heap past the application's range", Box::new(|s| s.brk_end = APP_END + 2 * MB)),
        ("unknown flags", Box::new(|s| s.flags |= 1 << 31)),
        ("the reserved word", Box::new(|s| s.reserved = 1)),
    ];
    let mut m = busy();
    let before = state(&m);
    let mut bad = snapshot();
    for (what, corrupt) in &corruptions {
        *bad = *good;
        corrupt(&mut bad);
        assert!(*bad != *good, "{what}: the corruption changes something");
        assert_eq!(m.restore(&bad), Err(-EINVAL), "{what}");
        assert!(state(&m) == before, "{what}: the memory manager changed");
    }
    assert!(take().is_empty(), "nothing done");
    // The good one is taken.
    let mut other = blank();
    assert_eq!(other.restore(&good), Ok(()));
    assert!(state(&other) == state(&saved));
}
