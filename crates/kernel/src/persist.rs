//! Saving and restoring the LWK's state.
//!
//! Every subsystem of the LWK keeps its mutable state in one place and
//! implements [`Persist`]: `save` writes a snapshot of it, `restore`
//! replaces the subsystem's state by a snapshot. A snapshot is plain data:
//! `Copy`, `#[repr(C)]`, no pointers into the LWK (addresses of application
//! memory are fine: they mean the same after a restore), descriptors as
//! numbers in the application process. That is what a migration will send
//! to another node. (Fork and exec do not go through snapshots: a fork's
//! child starts from the kernel's copy of the LWK and resets what is the
//! parent's, an exec starts a fresh image; the memory manager's fork, exec
//! and restore share the code that makes and publishes memory files.)
//!
//! Snapshots can be large (the memory map has thousands of pieces) and the
//! LWK has no allocator and runs on the application's stack, so `save`
//! writes into a snapshot the caller placed, never onto the stack.
//!
//! Every piece of mutable state the LWK has, and where it is saved:
//!
//! | state | owner | in [`LwkState`] |
//! |---|---|---|
//! | memory map, memory files' descriptors and free offsets, brk (`MM`) | `mm` | `mm` (the bookkeeping: the memory is in the files) |
//! | thread table (`SLOTS`: slots in use, tids) | `thread` | `threads` |
//! | each thread's registers, mask, alternate stack, XSAVE area, FS base, robust list | `thread::Current` | `current` (the saving thread's; the others' when they can be parked, see below) |
//! | signal actions as Linux holds them, the application's actions for the LWK's own signals (SIGSYS, SIGRTMAX) and each handler's restorer (`SAVED`), interval timers | `signal` | `signals` |
//! | signalfds (`TABLE`) | `signalfd` | `signalfd` |
//! | program path for /proc/self/exe, comm (`EXE`) | `procfs` | `identity` |
//! | delegation channels (one per thread slot, each served by a proxy worker of its own) | the control region, shared with the proxy | through `threads`: a restore needs a worker for every slot in use. A channel holds a call while its thread waits in the LWK, and a save may find one: in the same process the call goes on; a migration must interrupt it and restart it after the restore, as a signal does |
//! | the map log, the statistics | the control region | no: the proxy drains the log at every delegated call; statistics are counters |
//! | a fork or exec in progress (`fork::START`, `fork::VFORK`, `exec::ARGS`), `thread::STOP` | `fork`, `exec`, `thread` | no: only inside one call |
//! | protection keys and the dispatch selector (`guard`, `trap::SELECTOR`), the control descriptor (`boot::CTL_FD`), the signalfd watcher (`WATCHER`, `WAKE`) | set up at start | no: made again by the image that restores |
//!
//! Pending signals stay with Linux and are delivered after a restore in the
//! same process; carrying them to another process (migration) is still to
//! do, as are the proxy's descriptors.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

use lwk_abi::layout::SNAPSHOT_ADDR;
use lwk_rt::*;

use crate::arch::UContext;
use crate::mm::{Mm, MmSnapshot, MM};
use crate::procfs::IdentitySnapshot;
use crate::signal::SignalsSnapshot;
use crate::signalfd::SignalfdSnapshot;
use crate::sync::Guard;
use crate::thread::{ContextSnapshot, Current, ThreadsSnapshot};
use crate::{procfs, signal, signalfd, thread};

/// In a forked child, whose only thread is the one that forked: release
/// every subsystem's lock, which another thread of the parent may have held
/// at the fork (the same list as the table above). Each subsystem then
/// resets what was the parent's (`thread::reset_for_fork`,
/// `signalfd::reset_for_fork`; the memory manager copies or borrows).
///
/// # Safety
/// Only in the single thread of a freshly forked child.
pub unsafe fn unlock_in_forked_child() {
    // SAFETY: as documented.
    unsafe {
        MM.force_unlock();
        signal::force_unlock();
        thread::force_unlock();
        signalfd::force_unlock();
        procfs::force_unlock();
    }
}

/// A subsystem whose state can be saved and restored.
pub trait Persist {
    /// The saved state: plain data.
    type Snapshot: Copy;
    /// Changes whenever the snapshot's layout or meaning changes; a
    /// snapshot of another version is refused.
    const VERSION: u32;
    /// Write the current state into `out`.
    fn save(&self, out: &mut Self::Snapshot);
    /// Replace the current state by `s`. On an error (-errno) the
    /// subsystem is left as it was.
    fn restore(&mut self, s: &Self::Snapshot) -> Result<(), i64>;
}

pub const STATE_MAGIC: u64 = u64::from_le_bytes(*b"LWKSTATE");
/// The layout of [`LwkState`] itself.
pub const STATE_VERSION: u32 = 1;

/// The whole LWK of a process, saved at a trapped system call of one of
/// its threads: one snapshot per subsystem behind a header that says which
/// code wrote it.
///
/// Not yet in it (see the table above): the contexts of the other threads
/// (each must be parked at a known point and save its own), and the
/// proxy's side (descriptors).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct LwkState {
    pub magic: u64,
    /// STATE_VERSION, then each subsystem's `Persist::VERSION`, in the
    /// order of the fields below.
    pub versions: [u32; 7],
    pub mm: MmSnapshot,
    pub signals: SignalsSnapshot,
    pub threads: ThreadsSnapshot,
    /// The thread that saved the state.
    pub current: ContextSnapshot,
    pub signalfd: SignalfdSnapshot,
    pub identity: IdentitySnapshot,
}

fn versions() -> [u32; 7] {
    [
        STATE_VERSION,
        <crate::mm::Mm as Persist>::VERSION,
        <signal::Saved as Persist>::VERSION,
        <&thread::Slots as Persist>::VERSION,
        <Current as Persist>::VERSION,
        <[signalfd::Entry; signalfd::MAX] as Persist>::VERSION,
        <([u8; procfs::PATH_MAX], usize) as Persist>::VERSION,
    ]
}

/// Every subsystem's lock, held while the state is saved, wiped or
/// restored, so that no other thread changes a subsystem in between. Taken
/// in the order the LWK takes them elsewhere: the thread table first; a
/// signalfd's or the identity's before the memory manager's (copies of
/// application memory take it while holding them).
pub struct Held {
    _threads: Guard<'static, ()>,
    signalfd: Guard<'static, [signalfd::Entry; signalfd::MAX]>,
    identity: Guard<'static, ([u8; procfs::PATH_MAX], usize)>,
    signals: Guard<'static, signal::Saved>,
    mm: Guard<'static, Mm>,
}

/// Hold every subsystem (see [`Held`]).
pub fn hold() -> Held {
    let _threads = thread::freeze_table();
    let signalfd = signalfd::lock();
    let identity = procfs::lock();
    let signals = signal::lock();
    let mm = MM.lock();
    Held { _threads, signalfd, identity, signals, mm }
}

impl LwkState {
    /// Save every subsystem, and the calling thread's context `uc`. A
    /// snapshot when the process's other threads are stopped or wait in
    /// the LWK (`thread::stop_others`).
    pub fn save(&mut self, h: &Held, uc: &mut UContext) {
        self.magic = STATE_MAGIC;
        self.versions = versions();
        h.mm.save(&mut self.mm);
        h.signals.save(&mut self.signals);
        thread::save(&mut self.threads);
        Current(uc).save(&mut self.current);
        h.signalfd.save(&mut self.signalfd);
        h.identity.save(&mut self.identity);
    }

    /// Replace every subsystem, and the calling thread's context `uc`, by
    /// this state. A state of other code (another version) is refused
    /// before anything changes; a subsystem that refuses its snapshot
    /// stops the restore there (-errno), with the subsystems before it
    /// already restored. Call `signalfd::after_restore` once `h` is
    /// released.
    pub fn restore(&self, h: &mut Held, uc: &mut UContext) -> Result<(), i64> {
        self.restore_process(h)?;
        Current(uc).restore(&self.current)
    }

    /// Replace every subsystem by this state, but not a thread's context
    /// (a restore into a new process enters each thread from its own
    /// saved context). Refused, and nothing changed, for a state of other
    /// code.
    pub fn restore_process(&self, h: &mut Held) -> Result<(), i64> {
        if self.magic != STATE_MAGIC || self.versions != versions() {
            return Err(-EINVAL);
        }
        h.mm.restore(&self.mm)?;
        h.identity.restore(&self.identity)?;
        h.signalfd.restore(&self.signalfd)?;
        thread::restore(&self.threads)?;
        h.signals.restore(&self.signals)
    }

    /// Does `other` hold the same state? The interval timers' remaining
    /// time runs on between two saves and is left out.
    pub fn same_as(&self, other: &LwkState) -> Result<(), &'static str> {
        let timers = |s: &SignalsSnapshot| s.itimers.map(|t| [t[0], t[1]]);
        let checks: [(&'static str, bool); 10] = [
            ("header", self.magic == other.magic && self.versions == other.versions),
            ("memory map", self.mm == other.mm),
            ("signal actions", self.signals.actions == other.signals.actions),
            ("signal restorers", self.signals.restorer == other.signals.restorer),
            (
                "SIGSYS and SIGLWK actions",
                self.signals.sigsys == other.signals.sigsys && self.signals.siglwk == other.signals.siglwk,
            ),
            ("interval timers", timers(&self.signals) == timers(&other.signals)),
            ("threads", self.threads.used == other.threads.used && self.threads.tids == other.threads.tids),
            ("calling thread's context", self.current == other.current),
            ("signalfds", self.signalfd.entries == other.signalfd.entries),
            ("identity", self.identity == other.identity),
        ];
        match checks.iter().find(|c| !c.1) {
            Some((what, _)) => Err(what),
            None => Ok(()),
        }
    }
}

/// Forget the state of every subsystem and scramble the calling thread's
/// context: what a restore must rebuild. The signal actions too when the
/// caller is `alone` (see `signal::wipe`).
fn wipe(h: &mut Held, uc: &mut UContext, alone: bool) {
    h.mm.wipe();
    procfs::wipe(&mut h.identity);
    signalfd::wipe(&mut h.signalfd);
    thread::wipe();
    signal::wipe(&mut h.signals, alone);
    thread::wipe_current(uc);
}

/// `lwk run --selftest-restore N`: every N-th trapped call.
static EVERY: AtomicU64 = AtomicU64::new(0);
static CALLS: AtomicU64 = AtomicU64::new(0);
static BUSY: AtomicBool = AtomicBool::new(false);

/// Restore the LWK's state onto itself every `n`-th trapped call (0: never).
pub fn set_selftest(n: u64) {
    EVERY.store(n, Relaxed);
}

/// Called at every trapped call, before it runs: at every N-th (see
/// [`set_selftest`]) the whole state is saved, wiped and restored, and
/// saved again to check that the restore rebuilt it. The application must
/// not notice; a restore that fails, or rebuilds something else, ends it
/// with status 125 and a message saying which part.
#[inline]
pub fn maybe_selftest(uc: &mut UContext) {
    let every = EVERY.load(Relaxed);
    if every == 0 || CALLS.fetch_add(1, Relaxed) % every != every - 1 {
        return;
    }
    if BUSY.swap(true, Relaxed) {
        return; // another thread is at it
    }
    restore_onto_itself(uc);
    BUSY.store(false, Relaxed);
}

/// Every subsystem is held throughout (no thread is made or ends), and the
/// other threads are stopped: those in application code wait at their
/// return; those in the LWK keep their call and wait for the subsystems'
/// locks if they need one.
#[inline(never)]
fn restore_onto_itself(uc: &mut UContext) {
    let Some((saved, again)) = buffers() else { return };
    let mut h = hold();
    let alone = thread::alone();
    if !alone {
        thread::stop_others();
    }
    saved.save(&h, uc);
    wipe(&mut h, uc, alone);
    if let Err(e) = saved.restore(&mut h, uc) {
        lwk_rt::diag!("restore of the LWK's state onto itself failed: error {}", -e);
        exit_group(125);
    }
    again.save(&h, uc);
    if let Err(what) = saved.same_as(again) {
        lwk_rt::diag!("restore of the LWK's state onto itself rebuilt another state: {} differ", what);
        exit_group(125);
    }
    drop(h);
    signalfd::after_restore();
    if !alone {
        thread::resume_others();
    }
    crate::control().stats.restores.fetch_add(1, Relaxed);
}

/// Two states in the LWK's snapshot window, mapped at first use; zeroed.
fn buffers() -> Option<(&'static mut LwkState, &'static mut LwkState)> {
    static MAPPED: AtomicBool = AtomicBool::new(false);
    let size = core::mem::size_of::<LwkState>().next_multiple_of(4096) as u64;
    if !MAPPED.load(Relaxed) {
        // SAFETY: a private mapping of our own in the LWK's window, above
        // the application's range (layout.rs).
        let r = unsafe {
            mmap(
                SNAPSHOT_ADDR,
                2 * size,
                PROT_READ | PROT_WRITE,
                MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE,
                -1,
                0,
            )
        };
        if r < 0 {
            lwk_rt::diag!("cannot map the LWK's snapshot window: error {}", -r);
            return None;
        }
        MAPPED.store(true, Relaxed);
    }
    // SAFETY: the window holds two states; only the thread that set BUSY
    // uses them; LwkState is plain data, valid when zeroed.
    unsafe {
        core::ptr::write_bytes(SNAPSHOT_ADDR as *mut u8, 0, 2 * size as usize);
        Some((&mut *(SNAPSHOT_ADDR as *mut LwkState), &mut *((SNAPSHOT_ADDR + size) as *mut LwkState)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signalfd::{Entry, MAX};

    // A snapshot is refused before anything changes (these are checked
    // without touching the test process).

    #[test]
    fn a_signal_snapshot_with_a_bad_timer_or_action_is_refused() {
        let mut saved = signal::Saved { sigsys: [0; 4], siglwk: [0; 4], restorer: [(0, 0); 65] };
        // SAFETY: plain data, valid when zeroed.
        let mut s: Box<SignalsSnapshot> = Box::new(unsafe { core::mem::zeroed() });
        s.sigsys = [1, 2, 3, 4];
        s.itimers[0][1] = 1_000_000; // a microsecond field of a whole second
        assert_eq!(saved.restore(&s), Err(-EINVAL));
        s.itimers[0][1] = 0;
        s.actions[9] = [1, 0, 0, 0]; // SIGKILL's action is not the application's to set
        assert_eq!(saved.restore(&s), Err(-EINVAL));
        assert_eq!(saved.sigsys, [0; 4], "left as it was");
    }

    #[test]
    fn a_thread_table_with_a_thread_in_a_free_slot_is_refused() {
        let mut t = ThreadsSnapshot { used: [0; 4], tids: [0; 256] };
        t.tids[3] = 1234; // slot 3 is not in use
        assert_eq!(thread::restore(&t), Err(-EINVAL));
        t.used[0] = 1 << 3;
        t.tids[5] = -1;
        assert_eq!(thread::restore(&t), Err(-EINVAL));
    }

    #[test]
    fn signalfd_and_identity_snapshots_are_checked() {
        let mut table = [Entry { app_fd: -1, sfd: -1, pipe: -1, reported: false, mask: 0 }; MAX];
        let mut s = SignalfdSnapshot { entries: table };
        s.entries[0] = Entry { app_fd: 5, sfd: -1, pipe: 7, reported: false, mask: 0 }; // no signalfd behind it
        assert_eq!(table.restore(&s), Err(-EINVAL));
        s.entries[0].sfd = 6;
        assert_eq!(table.restore(&s), Ok(()));
        let mut again = SignalfdSnapshot { entries: [s.entries[1]; MAX] };
        table.save(&mut again);
        assert!(again.entries == s.entries, "what was restored is saved again");

        let mut exe = ([0u8; procfs::PATH_MAX], 0usize);
        let mut id = IdentitySnapshot { exe: [0; procfs::PATH_MAX], exe_len: 0, comm: [b'x'; 16] };
        assert_eq!(exe.restore(&id), Err(-EINVAL), "a name without its NUL");
        id.comm[15] = 0;
        id.exe_len = procfs::PATH_MAX as u64;
        assert_eq!(exe.restore(&id), Err(-EINVAL), "a path as long as the buffer");
    }

    #[test]
    fn the_whole_state_says_which_code_wrote_it() {
        // SAFETY: plain data, valid when zeroed; boxed, it is too large for a stack.
        let mut s: Box<LwkState> = Box::new(unsafe { core::mem::zeroed() });
        let mut uc = UContext::ZERO;
        let mut h = hold();
        assert_eq!(s.restore(&mut h, &mut uc), Err(-EINVAL), "no magic");
        s.magic = STATE_MAGIC;
        s.versions = versions();
        s.versions[1] += 1; // a memory snapshot of another version
        assert_eq!(s.restore(&mut h, &mut uc), Err(-EINVAL));
        drop(h);
        let t = s.clone();
        assert_eq!(s.same_as(&t), Ok(()));
        let mut u = s.clone();
        u.signals.itimers[0][2] = 5; // the time left runs on: not a difference
        assert_eq!(s.same_as(&u), Ok(()));
        u.threads.tids[0] = 42;
        assert_eq!(s.same_as(&u), Err("threads"));
    }
}
