//! Freezing the application for a checkpoint or a migration.
//!
//! A requester outside the process (`lwk checkpoint`, the node daemon)
//! sets the control region's `freeze` word to FREEZE_REQUESTED and sends
//! every thread the LWK's signal with [`FREEZE_COOKIE`]. The first thread
//! that comes by `thread::leaving` takes the request ([`take`]) and becomes
//! the freezer:
//!
//! 1. it creates a memory file for the export ([`FreezeExport`]), maps it
//!    and stops every other thread (`thread::stop_for_freeze`, then the
//!    LWK's signal to each);
//! 2. each other thread parks in `thread::leaving`, saving its own context
//!    first ([`park`]): a thread in application code is stopped by the
//!    signal; one waiting in the LWK with the application's mask (futex,
//!    nanosleep, sigsuspend, ...) is interrupted by it, and one waiting for
//!    a delegated call has its proxy worker nudged: both calls are rewound
//!    to their `syscall` instruction, so they run again after the resume
//!    or the restore, as after a signal with SA_RESTART;
//! 3. with every thread parked, it holds every subsystem and saves the
//!    whole LWK ([`LwkState`]) into the export, publishes the memory file's
//!    descriptor (`freeze_fd`) and says FREEZE_FROZEN;
//! 4. it waits for the requester's verdict. FREEZE_RESUME, or the
//!    requester silent for [`REQUESTER_TIMEOUT_MS`] (its heartbeat in the
//!    control region stopped: it died or hangs), lets every thread go on.
//!    (A migration that succeeded ends the process instead.)
//!
//! A thread that does not park within [`PARK_TIMEOUT_MS`] (a call that no
//! signal interrupts, such as `wait4`) fails the freeze: FREEZE_FAILED with
//! EBUSY, and every thread goes on.
//!
//! Pending signals stay with Linux (they are delivered after the resume;
//! for a migration their masks are in the export, their siginfo not yet).

use core::sync::atomic::{AtomicBool, AtomicU32, Ordering::*};

use lwk_abi::control::{
    FREEZE_FAILED, FREEZE_FROZEN, FREEZE_NONE, FREEZE_REQUESTED, FREEZE_RESUME, FREEZE_TAKEN, MAX_CHANNELS,
};
use lwk_abi::layout::FREEZE_EXPORT_ADDR;
use lwk_rt::*;

use crate::arch::UContext;
use crate::control;
use crate::persist::{self, LwkState, Persist};
use crate::thread::{self, ContextSnapshot, Current};

/// The value (si_value) of the LWK's signal that asks for a freeze.
pub const FREEZE_COOKIE: u64 = u64::from_le_bytes(*b"LWKFRZE\0");
pub const EXPORT_MAGIC: u64 = u64::from_le_bytes(*b"LWKFROZN");
/// The layout of [`FreezeExport`] and [`ThreadRecord`].
pub const EXPORT_VERSION: u32 = 3;
/// How long the freezer waits for the other threads to park.
pub const PARK_TIMEOUT_MS: u64 = 2000;
/// A requester silent this long (no heartbeat) is taken for gone.
pub const REQUESTER_TIMEOUT_MS: u64 = 1000;

/// One thread, saved by itself when it parked.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ThreadRecord {
    /// 1 when this slot's thread is saved here.
    pub saved: u32,
    pub tid: i32,
    /// The address the kernel clears and wakes when the thread ends
    /// (set_tid_address, CLONE_CHILD_CLEARTID).
    pub clear_tid: u64,
    /// Signals pending for the thread or the process when it parked.
    pub pending: u64,
    /// A relative sleep the freeze interrupted: where its call returns to
    /// (0: none) and the nanoseconds it had left (`thread::sleep_left_of`).
    pub sleep_at: u64,
    pub sleep_left_ns: u64,
    pub ctx: ContextSnapshot,
}

/// What a freeze exports: the whole LWK and every thread's context.
#[repr(C)]
pub struct FreezeExport {
    pub magic: u64,
    pub version: u32,
    /// The slot of the thread that saved `state`.
    pub freezer_slot: u32,
    /// How many threads are saved in `threads` (by slot).
    pub n_threads: u32,
    pub reserved: u32,
    pub state: LwkState,
    pub threads: [ThreadRecord; MAX_CHANNELS],
}

/// Size of the export's memory file.
pub const EXPORT_SIZE: u64 = (core::mem::size_of::<FreezeExport>() as u64).next_multiple_of(4096);

/// Set by the freezer while the export is mapped and threads park into it.
static FREEZING: AtomicBool = AtomicBool::new(false);
/// Threads between their look at FREEZING and the end of their save: the
/// export stays mapped until there are none.
static SAVING: AtomicU32 = AtomicU32::new(0);

/// Is a freeze asked for or under way (not yet frozen)?
#[inline]
pub fn requested() -> bool {
    matches!(control().header.freeze.load(Relaxed), FREEZE_REQUESTED | FREEZE_TAKEN)
}

/// Is the LWK's signal whose siginfo is `info` a freeze request?
///
/// # Safety
/// `info` points to a siginfo_t.
pub unsafe fn is_request(info: *const u8) -> bool {
    // SAFETY: si_code at 8, si_value at 24 (the _rt member).
    let (code, value) = unsafe { ((info.add(8) as *const i32).read(), (info.add(24) as *const u64).read()) };
    code == -1 /* SI_QUEUE */ && value == FREEZE_COOKIE
}

fn export() -> &'static mut FreezeExport {
    // SAFETY: mapped by the freezer before FREEZING is set, unmapped after
    // it is cleared; each thread writes only its own record, the freezer
    // the rest, once the others are parked.
    unsafe { &mut *(FREEZE_EXPORT_ADDR as *mut FreezeExport) }
}

/// Park the calling thread of `slot` for a freeze: save its context `uc`
/// into the export. False when no freeze is under way (a fork's stop).
pub fn park(slot: usize, uc: &mut UContext) -> bool {
    SAVING.fetch_add(1, SeqCst);
    let freezing = FREEZING.load(SeqCst);
    if freezing {
        save_thread(&mut export().threads[slot], uc);
    }
    SAVING.fetch_sub(1, SeqCst);
    freezing
}

fn save_thread(r: &mut ThreadRecord, uc: &mut UContext) {
    const PR_GET_TID_ADDRESS: u64 = 40;
    Current(uc).save(&mut r.ctx);
    r.tid = gettid();
    let mut clear_tid = 0u64;
    // SAFETY: the kernel writes the address into our own word.
    unsafe { syscall3(lwk_rt::nr::PRCTL, PR_GET_TID_ADDRESS, &mut clear_tid as *mut u64 as u64, 0) };
    r.clear_tid = clear_tid;
    r.pending = crate::signal::pending();
    (r.sleep_at, r.sleep_left_ns) = thread::sleep_left_of(thread::current_slot());
    r.saved = 1;
}

/// Take a requested freeze, if there is one and no other thread took it:
/// run it to the end (see the module's documentation) and say true.
pub fn take(uc: &mut UContext) -> bool {
    let h = &control().header;
    if h.freeze.compare_exchange(FREEZE_REQUESTED, FREEZE_TAKEN, SeqCst, Relaxed).is_err() {
        return false;
    }
    if let Err(e) = freeze(uc) {
        h.freeze_error.store(-e as i32, SeqCst);
        h.freeze.store(FREEZE_FAILED, SeqCst);
        futex_wake(&h.freeze, u32::MAX >> 1);
    }
    true
}

fn freeze(uc: &mut UContext) -> Result<(), i64> {
    let h = &control().header;
    // A fork that is copying memory ends first (it stops the other threads
    // too); one that has not started gives way.
    let Some(_claim) = thread::claim_stop_for_freeze(PARK_TIMEOUT_MS) else {
        lwk_rt::diag!("freeze: a fork did not end within {} ms; the application goes on", PARK_TIMEOUT_MS);
        return Err(-EBUSY);
    };
    let fd = map_export()?;
    let me = thread::current_slot();
    FREEZING.store(true, SeqCst);
    thread::stop_for_freeze();
    thread::signal_others(FREEZE_COOKIE);
    // Measured, not counted in waits: on a loaded machine a 1 ms wait
    // takes longer, and 2000 of them outlasted a vfork child's 3 s (the
    // freeze then succeeded where it must fail).
    let t0 = crate::handlers::monotonic_ns();
    while !thread::others().all(thread::is_parked) {
        let waited = (crate::handlers::monotonic_ns() - t0) / 1_000_000;
        if waited >= PARK_TIMEOUT_MS {
            let stuck = thread::others().find(|&s| !thread::is_parked(s)).map_or(0, thread::tid_of);
            lwk_rt::diag!("freeze: thread {} did not stop within {} ms; the application goes on", stuck, waited);
            end(fd);
            return Err(-EBUSY);
        }
        thread::wait_stop_change(1_000_000);
    }
    let x = export();
    save_thread(&mut x.threads[me], uc);
    let held = persist::hold();
    x.state.save(&held, uc);
    drop(held);
    x.magic = EXPORT_MAGIC;
    x.version = EXPORT_VERSION;
    x.freezer_slot = me as u32;
    x.n_threads = x.threads.iter().filter(|t| t.saved != 0).count() as u32;
    h.freeze_error.store(0, SeqCst);
    h.freeze_fd.store(fd, SeqCst);
    h.freeze.store(FREEZE_FROZEN, SeqCst);
    futex_wake(&h.freeze, u32::MAX >> 1);
    // The verdict; a requester that stopped answering gives none: go on.
    let mut beat = h.freeze_heartbeat.load(SeqCst);
    let mut silent_ms = 0;
    while h.freeze.load(SeqCst) == FREEZE_FROZEN {
        futex_wait_timeout(&h.freeze, FREEZE_FROZEN, 100_000_000);
        let now = h.freeze_heartbeat.load(SeqCst);
        if now != beat {
            (beat, silent_ms) = (now, 0);
        } else {
            silent_ms += 100;
            if silent_ms >= REQUESTER_TIMEOUT_MS {
                lwk_rt::diag!("freeze: the requester stopped answering; the application goes on");
                break;
            }
        }
    }
    let verdict = h.freeze.load(SeqCst);
    if verdict != FREEZE_RESUME && verdict != FREEZE_FROZEN {
        lwk_rt::diag!("freeze: unexpected verdict {}; the application goes on", verdict);
    }
    end(fd);
    h.freeze.store(FREEZE_NONE, SeqCst);
    futex_wake(&h.freeze, u32::MAX >> 1);
    Ok(())
}

/// Create the export's memory file and map it; its descriptor.
fn map_export() -> Result<i32, i64> {
    // SAFETY: plain memfd_create with our own NUL-terminated name.
    let fd = unsafe { syscall3(lwk_rt::nr::MEMFD_CREATE, c"lwk-freeze".as_ptr() as u64, MFD_CLOEXEC, 0) };
    if fd < 0 {
        return Err(fd);
    }
    // SAFETY: sizing our own memfd.
    let r = unsafe { syscall3(lwk_rt::nr::FTRUNCATE, fd as u64, EXPORT_SIZE, 0) };
    if r < 0 {
        close(fd as i32);
        return Err(r);
    }
    // SAFETY: the LWK's own window above the application's range (layout.rs).
    let r = unsafe {
        mmap(FREEZE_EXPORT_ADDR, EXPORT_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED_NOREPLACE, fd as i32, 0)
    };
    if r < 0 {
        close(fd as i32);
        return Err(r);
    }
    Ok(fd as i32)
}

/// Let the other threads go on and drop the export (the requester keeps
/// its own descriptor of it if it wants it).
fn end(fd: i32) {
    let h = &control().header;
    FREEZING.store(false, SeqCst);
    while SAVING.load(SeqCst) != 0 {
        cpu_relax();
    }
    h.freeze_fd.store(-1, SeqCst);
    thread::resume_others();
    // SAFETY: our own mapping of the export; no thread writes it now
    // (FREEZING is clear, and parked threads saved before they parked).
    unsafe { munmap(FREEZE_EXPORT_ADDR, EXPORT_SIZE) };
    close(fd);
}

const _: () = assert!(EXPORT_SIZE <= lwk_abi::layout::SNAPSHOT_SIZE / 2);
