//! Application threads.
//!
//! Each application thread has a slot: a delegation channel of its own, a
//! proxy worker serving it (so one thread blocked in `read` never blocks
//! another), and a small LWK stack for its first moments. The SIGSYS
//! handler finds the slot of the thread it runs on through the GS base,
//! which x86-64 Linux programs leave alone (TLS is FS).
//!
//! A new thread starts on its LWK stack, switches Syscall User Dispatch on
//! for itself (the setting is per thread and not inherited), and enters the
//! application with rt_sigreturn on a frame built from the parent's trapped
//! context: all registers as the parent had them at its `syscall`, rax 0,
//! the new stack, the application's signal mask, fresh FPU state, and
//! the default PKRU, which denies the LWK's memory protection key.

use core::arch::asm;
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering::*};

use lwk_abi::control::{MAX_CHANNELS, REQ_NEW_WORKER};
use lwk_rt::thread::*;
use lwk_rt::*;

use crate::arch::{fpstate_intact, UContext, ARCH_GET_FS, ARCH_SET_FS, ARCH_SET_GS, FPSTATE_MAX, REG_RAX, REG_RSP};
use crate::delegate;
use crate::persist::Persist;
use crate::sync::SpinLock;
use crate::trap;

const STACK_SIZE: usize = 16 << 10;

/// What the GS base of an application thread points at.
#[repr(C)]
pub struct Thread {
    /// The slot index; first, so `gs:[0]` reads it.
    slot: u64,
    tid: AtomicI32,
    /// 1 while the thread runs LWK code (not application code).
    in_lwk: AtomicU32,
    /// 1 while the thread waits in the LWK with the application's signal
    /// mask (`signal::with_mask`), where the LWK's own signal interrupts it.
    waiting: AtomicU32,
    /// Set when the LWK's signal interrupted that wait: the call is run
    /// again rather than failed (see `trap::lwk_sigsys`).
    interrupted: AtomicU32,
    /// 1 while the thread is parked by a freeze, its context saved.
    parked: AtomicU32,
    /// A relative sleep the LWK interrupted: where its call returns to (0:
    /// none), and the nanoseconds it had left.
    sleep_at: AtomicU64,
    sleep_left: AtomicU64,
}

pub struct Slots {
    threads: [Thread; MAX_CHANNELS],
    used: [AtomicU64; MAX_CHANNELS / 64],
    /// The parent's trapped context, for the child to start from.
    start: [UnsafeCell<UContext>; MAX_CHANNELS],
    stacks: [UnsafeCell<[u8; STACK_SIZE]>; MAX_CHANNELS],
}

// SAFETY: `start` and `stacks` of a slot are touched only by the thread
// that owns the slot (the parent, until clone; then the child).
unsafe impl Sync for Slots {}

static SLOTS: Slots = Slots {
    threads: [const {
        Thread {
            slot: 0,
            tid: AtomicI32::new(0),
            in_lwk: AtomicU32::new(0),
            waiting: AtomicU32::new(0),
            interrupted: AtomicU32::new(0),
            parked: AtomicU32::new(0),
            sleep_at: AtomicU64::new(0),
            sleep_left: AtomicU64::new(0),
        }
    }; MAX_CHANNELS],
    used: [const { AtomicU64::new(0) }; MAX_CHANNELS / 64],
    start: [const { UnsafeCell::new(UContext::ZERO) }; MAX_CHANNELS],
    stacks: [const { UnsafeCell::new([0; STACK_SIZE]) }; MAX_CHANNELS],
};

/// The calling thread's slot.
#[inline(always)]
pub fn current_slot() -> usize {
    let s: u64;
    // SAFETY: every thread that runs LWK code has its GS base on its slot
    // (set by `init_main` or `thread_start` before anything else).
    unsafe { asm!("mov {}, qword ptr gs:[0]", out(reg) s, options(nostack, readonly, preserves_flags)) };
    s as usize
}

fn set_gs(slot: usize) {
    let t = &SLOTS.threads[slot] as *const Thread as *mut Thread;
    // SAFETY: the slot field is written once here, before the thread uses it.
    unsafe {
        (*t).slot = slot as u64;
        syscall3(lwk_rt::nr::ARCH_PRCTL, ARCH_SET_GS, t as u64, 0);
    }
}

/// In a partition, thread `slot` runs on the partition's slot-th CPU
/// (round robin past the last), and only there.
fn pin(slot: usize) {
    let Some(cpu) = crate::control().header.partition.nth_cpu(slot) else { return };
    let mut mask = [0u64; lwk_abi::control::PARTITION_CPU_WORDS];
    mask[cpu / 64] = 1 << (cpu % 64);
    // SAFETY: the mask is ours; 0 is the calling thread.
    let r = unsafe {
        syscall3(lwk_rt::nr::SCHED_SETAFFINITY, 0, core::mem::size_of_val(&mask) as u64, mask.as_ptr() as u64)
    };
    if r < 0 {
        lwk_rt::diag!("cannot pin a thread to the partition's CPU {}: error {}", cpu, -r);
    }
}

/// The main thread takes slot 0.
pub fn init_main() {
    init_as(0);
}

/// The calling thread takes `slot` (a restore gives each thread the slot it
/// had).
pub fn init_as(slot: usize) {
    SLOTS.used[slot / 64].fetch_or(1 << (slot % 64), SeqCst);
    set_gs(slot);
    pin(slot);
    SLOTS.threads[slot].tid.store(gettid(), Relaxed);
}

/// Start a thread in `slot` (which a restored table says is in use) that
/// runs `entry(slot)` on the slot's LWK stack, with the FS base `tls` and
/// the clear-tid address `clear_tid`, and a proxy worker for it. The new
/// thread calls [`begin`] first. Returns its tid or -errno.
/// With `tid` not 0 the thread gets that id (the one it had before a
/// restore; the pid namespace must have it free).
pub fn start_in_slot(slot: usize, tls: u64, clear_tid: u64, tid: i32, entry: extern "C" fn(u64) -> !) -> i64 {
    let r = delegate::call(REQ_NEW_WORKER, [slot as u64, 0, 0, 0, 0, 0]);
    if r < 0 {
        return r;
    }
    let flags = THREAD | CLONE_SETTLS | if clear_tid != 0 { CLONE_CHILD_CLEARTID } else { 0 };
    let top = (SLOTS.stacks[slot].get() as u64 + STACK_SIZE as u64) & !15;
    // SAFETY: the slot's LWK stack is free: no thread of this new process
    // ran in the slot yet.
    let tid = unsafe {
        if tid != 0 {
            spawn_with_tid(flags, top, clear_tid, tls, entry, slot as u64, tid)
        } else {
            spawn(flags, top, 0, clear_tid, tls, entry, slot as u64)
        }
    };
    if tid > 0 {
        SLOTS.threads[slot].tid.store(tid as i32, SeqCst);
    }
    tid
}

/// First steps of a thread started by [`start_in_slot`]: its slot, its CPU,
/// Syscall User Dispatch.
pub fn begin(slot: usize) {
    set_gs(slot);
    entered();
    pin(slot);
    if let Err(e) = trap::enable_thread() {
        lwk_rt::diag!("cannot enable Syscall User Dispatch in a restored thread: error {}", -e);
        exit_group(125);
    }
}

/// Enter the application with a saved context: its registers, mask and
/// alternate stack, its FPU and vector state (PKRU included), its FS base
/// and robust list, through rt_sigreturn on a frame built below its stack
/// pointer (past the red zone).
pub fn enter_saved(ctx: &ContextSnapshot) -> ! {
    // SAFETY: this thread's own FS base and robust list; a bad value
    // faults the application, as it would have where it was saved.
    unsafe {
        syscall3(lwk_rt::nr::ARCH_PRCTL, ARCH_SET_FS, ctx.fs_base, 0);
        syscall3(lwk_rt::nr::SET_ROBUST_LIST, ctx.robust_list[0], ctx.robust_list[1], 0);
    }
    let mut uc = ctx.uc;
    let n = (ctx.fp_len as usize).min(FPSTATE_MAX);
    let fp_at = (uc.gregs[REG_RSP] - 256 - n as u64) & !63; // XRSTOR wants 64-byte alignment
    let at = (fp_at - core::mem::size_of::<UContext>() as u64) & !15;
    // SAFETY: below the saved stack pointer and its red zone nothing of the
    // application's is in use (a signal frame would go there too).
    unsafe {
        if n > 0 {
            core::ptr::copy_nonoverlapping(ctx.fpstate.as_ptr(), fp_at as *mut u8, n);
        }
        uc.fpregs = if n > 0 { fp_at } else { 0 };
        (at as *mut UContext).write(uc);
        sigreturn_at(at)
    }
}

/// Held while the thread table changes (a thread made or gone), and while
/// it is saved or restored, so that a saved table is never half-changed.
static TABLE: SpinLock<()> = SpinLock::new(());

/// # Safety
/// Only in the single thread of a freshly forked child.
pub unsafe fn force_unlock() {
    // SAFETY: as documented.
    unsafe { TABLE.force_unlock() };
}

/// Keep the thread table as it is until the guard goes: no thread is
/// made or ends meanwhile (they wait). For saving and restoring it.
pub fn freeze_table() -> crate::sync::Guard<'static, ()> {
    TABLE.lock()
}

/// The slots in use by threads other than the calling one.
pub fn others() -> impl Iterator<Item = usize> {
    let me = current_slot();
    (0..MAX_CHANNELS).filter(move |&s| s != me && SLOTS.used[s / 64].load(SeqCst) & (1 << (s % 64)) != 0)
}

/// Is the calling thread the only one of the process?
pub fn alone() -> bool {
    others().next().is_none()
}

fn alloc_slot() -> Option<usize> {
    for (w, word) in SLOTS.used.iter().enumerate() {
        let mut cur = word.load(Relaxed);
        while cur != u64::MAX {
            let bit = (!cur).trailing_zeros() as u64;
            match word.compare_exchange(cur, cur | (1 << bit), SeqCst, Relaxed) {
                Ok(_) => return Some(w * 64 + bit as usize),
                Err(now) => cur = now,
            }
        }
    }
    None
}

fn free_slot(slot: usize) {
    SLOTS.used[slot / 64].fetch_and(!(1 << (slot % 64)), SeqCst);
}

/// Flags glibc and musl pass for a pthread; anything without CLONE_VM and
/// CLONE_THREAD is a new process, which comes later.
const THREAD_FLAGS: u64 = CLONE_VM | CLONE_THREAD | CLONE_SIGHAND;

/// clone(2) or clone3(2) of the application that makes a thread.
/// Returns None when the call is not a thread creation.
pub fn clone(flags: u64, newsp: u64, ptid: u64, ctid: u64, tls: u64, uc: &UContext) -> Option<i64> {
    if flags & THREAD_FLAGS != THREAD_FLAGS || flags & CLONE_VFORK != 0 {
        return None;
    }
    if newsp == 0 || flags & CLONE_PIDFD != 0 {
        return Some(-EINVAL);
    }
    let _table = TABLE.lock();
    let Some(slot) = alloc_slot() else { return Some(-EAGAIN) };
    let r = delegate::call(REQ_NEW_WORKER, [slot as u64, 0, 0, 0, 0, 0]);
    if r < 0 {
        free_slot(slot);
        return Some(-EAGAIN);
    }
    let mut start = *uc;
    start.gregs[REG_RSP] = newsp;
    start.gregs[REG_RAX] = 0;
    // SAFETY: the slot is ours until the child takes it over at clone.
    unsafe { *SLOTS.start[slot].get() = start };
    let top = (SLOTS.stacks[slot].get() as u64 + STACK_SIZE as u64) & !15;
    // SAFETY: the slot's LWK stack is free (its previous thread left it
    // before exiting); the kernel gets the application's own pointers.
    let tid = unsafe { spawn(flags & !0xff, top, ptid, ctid, tls, thread_start, slot as u64) };
    if tid < 0 {
        free_slot(slot);
        return Some(tid);
    }
    SLOTS.threads[slot].tid.store(tid as i32, Relaxed);
    Some(tid)
}

/// clone3(2): the same, from its argument structure.
pub fn clone3(args: u64, size: u64, uc: &UContext) -> Option<i64> {
    // Smaller than the first version of struct clone_args: as Linux says.
    if size < 64 {
        return Some(-EINVAL);
    }
    let a = match crate::uaccess::read_app::<8>(args) {
        Ok(a) => a,
        Err(e) => return Some(e),
    };
    let (flags, _pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls) =
        (a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]);
    if flags & THREAD_FLAGS == THREAD_FLAGS && exit_signal != 0 {
        return Some(-EINVAL);
    }
    clone(flags, stack.wrapping_add(stack_size), parent_tid, child_tid, tls, uc)
}

/// A new application thread, on its slot's LWK stack, signals blocked.
extern "C" fn thread_start(slot: u64) -> ! {
    let slot = slot as usize;
    set_gs(slot);
    entered();
    pin(slot);
    if let Err(e) = trap::enable_thread() {
        lwk_rt::diag!("cannot enable Syscall User Dispatch in a new thread: error {}", -e);
        exit_group(125);
    }
    // SAFETY: written by the parent before clone, ours now.
    let start = unsafe { &mut *SLOTS.start[slot].get() };
    // A freeze may park it here: its context is the start context, with
    // fresh FPU state (as `enter` gives it).
    start.fpregs = 0;
    leaving(start);
    enter(start, false)
}

/// In the child of a fork: only the forking thread exists, and it is the
/// main thread (slot 0) of a new process.
pub fn reset_for_fork() {
    for w in &SLOTS.used {
        w.store(0, SeqCst);
    }
    for t in &SLOTS.threads {
        t.in_lwk.store(0, SeqCst);
        t.waiting.store(0, SeqCst);
        t.interrupted.store(0, SeqCst);
        t.parked.store(0, SeqCst);
        t.sleep_at.store(0, SeqCst);
    }
    STOP.store(0, SeqCst);
    STOPPER.store(0, SeqCst);
    init_main();
    SLOTS.threads[0].in_lwk.store(1, SeqCst);
}

/// Set while a fork copies memory: threads returning to application code
/// wait.
static STOP: AtomicU32 = AtomicU32::new(0);

/// The calling thread enters the LWK from application code (a trapped
/// call, or a signal the LWK handles).
#[inline]
pub fn entered() {
    SLOTS.threads[current_slot()].in_lwk.store(1, SeqCst);
}

/// The calling thread is about to return to application code with the
/// context `uc`: not while a fork copies memory or the process is frozen.
/// (With `stop_others`, a Dekker pair: the thread clears `in_lwk` and then
/// looks at STOP; the forker sets STOP and then looks at `in_lwk`. Either
/// the thread sees STOP, or the forker sees it in application code and
/// signals it.) A freeze requested from outside is taken here, by the
/// first thread that comes by (`freeze::take`); the others park here,
/// saving `uc` first.
#[inline]
pub fn leaving(uc: &mut UContext) {
    let slot = current_slot();
    let t = &SLOTS.threads[slot];
    loop {
        t.in_lwk.store(0, SeqCst);
        if STOP.load(SeqCst) == 0 && !crate::freeze::requested() {
            return;
        }
        t.in_lwk.store(1, SeqCst);
        if crate::freeze::take(uc) {
            continue;
        }
        if STOP.load(SeqCst) == 0 {
            // Another thread took the freeze and is about to stop us.
            futex_wait_timeout(&STOP, 0, 1_000_000);
            continue;
        }
        let parked = crate::freeze::park(slot, uc);
        if parked {
            t.parked.store(1, SeqCst);
            futex_wake(&STOP, u32::MAX >> 1); // the freezer waits on it too
        }
        while STOP.load(Acquire) != 0 {
            futex_wait_timeout(&STOP, 1, 10_000_000);
        }
        t.parked.store(0, SeqCst);
    }
}

/// A restored thread is about to enter the application for the first
/// time (a stop or freeze that comes now reaches it there, by signal).
pub fn leaving_restored() {
    SLOTS.threads[current_slot()].in_lwk.store(0, SeqCst);
}

/// Is the thread of `slot` parked by the freeze?
pub fn is_parked(slot: usize) -> bool {
    SLOTS.threads[slot].parked.load(SeqCst) != 0
}

/// The tid of the thread of `slot` (0: none yet).
pub fn tid_of(slot: usize) -> i32 {
    SLOTS.threads[slot].tid.load(SeqCst)
}

/// Wait until STOP changes from `seen` or `ns` pass (for the freezer).
pub fn wait_stop_change(ns: u64) {
    futex_wait_timeout(&STOP, 1, ns);
}

/// Around a wait with the application's signal mask: the LWK's signal
/// may arrive inside it (see `interrupt_wait`).
pub fn set_waiting(on: bool) {
    SLOTS.threads[current_slot()].waiting.store(on as u32, SeqCst);
}

/// Does the calling thread wait in the LWK with the application's mask
/// (so a signal arriving now arrived inside that wait)?
pub fn waiting() -> bool {
    SLOTS.threads[current_slot()].waiting.load(SeqCst) != 0
}

/// Note that the calling thread's call was interrupted for the LWK's own
/// sake (a freeze), not the application's: it is run again.
pub fn mark_interrupted() {
    SLOTS.threads[current_slot()].interrupted.store(1, SeqCst);
}

/// Has the calling thread's call been interrupted for the LWK's sake
/// (the note [`take_interrupted`] clears)?
pub fn is_interrupted() -> bool {
    SLOTS.threads[current_slot()].interrupted.load(SeqCst) != 0
}

/// The calling thread's sleep, whose call returns to `at`, was interrupted
/// for the LWK's sake with `left_ns` to go: its next run sleeps that long.
pub fn note_sleep_left(at: u64, left_ns: u64) {
    set_sleep_left(current_slot(), at, left_ns);
}

/// What the interrupted sleep of the calling thread whose call returns to
/// `at` has left, if that is the call it runs again. Clears the note.
pub fn take_sleep_left(at: u64) -> Option<u64> {
    let t = &SLOTS.threads[current_slot()];
    let noted = t.sleep_at.swap(0, SeqCst);
    (noted != 0 && noted == at).then(|| t.sleep_left.load(SeqCst))
}

/// The interrupted sleep of `slot`'s thread: (where its call returns to,
/// nanoseconds left); (0, 0) for none. (A freeze saves it.)
pub fn sleep_left_of(slot: usize) -> (u64, u64) {
    let t = &SLOTS.threads[slot];
    match t.sleep_at.load(SeqCst) {
        0 => (0, 0),
        at => (at, t.sleep_left.load(SeqCst)),
    }
}

/// Note an interrupted sleep for `slot`'s thread (a restore puts back
/// what the freeze saved).
pub fn set_sleep_left(slot: usize, at: u64, left_ns: u64) {
    let t = &SLOTS.threads[slot];
    t.sleep_left.store(left_ns, SeqCst);
    t.sleep_at.store(at, SeqCst);
}

/// Was the calling thread's call interrupted for the LWK's sake since
/// the last look? Clears the note.
pub fn take_interrupted() -> bool {
    SLOTS.threads[current_slot()].interrupted.swap(0, SeqCst) != 0
}

/// A stop request is a SIGLWK queued by this process with this value.
const STOP_COOKIE: u64 = u64::from_le_bytes(*b"LWKSTOP\0");
/// si_code of a signal sent with sigqueue or rt_tgsigqueueinfo.
const SI_QUEUE: i32 = -1;

/// Is the SIGLWK whose siginfo is `info` a stop request of `stop_others`?
///
/// # Safety
/// `info` points to a siginfo_t.
pub unsafe fn is_stop_request(info: *const u8) -> bool {
    // SAFETY: si_code at 8, si_pid at 16, si_value at 24 (the _rt member).
    let (code, pid, value) = unsafe {
        ((info.add(8) as *const i32).read(), (info.add(16) as *const i32).read(), (info.add(24) as *const u64).read())
    };
    code == SI_QUEUE && pid == getpid() && value == STOP_COOKIE
}

/// Before a fork copies memory, or the LWK's state is saved: have every
/// other thread of the process wait inside the LWK, so the copy is a
/// snapshot, as a kernel fork's is. A thread running application code gets
/// a SIGLWK (the LWK's, which it cannot block) and stops on its way back;
/// one in the LWK stops when it leaves. Gives up after a second.
///
/// Not SIGSYS: a second SIGSYS while one is pending is dropped by the
/// kernel, and a stop request arriving as the thread traps a system call
/// made the kernel drop the trap, losing the call. SIGLWK is a real-time
/// signal, which queues, and the LWK's handler of SIGSYS blocks it, so it
/// arrives after the trapped call is done.
pub fn stop_others() {
    STOP.store(1, SeqCst);
    let pid = getpid();
    // The tid of the thread of slot s, if it runs application code.
    let in_app = |s: usize| {
        let t = &SLOTS.threads[s];
        let tid = t.tid.load(SeqCst);
        (tid != 0 && t.in_lwk.load(SeqCst) == 0).then_some(tid)
    };
    // siginfo_t: signo, errno, code; pid and uid at 16; the value at 24.
    let mut info = [0u64; 16];
    info[0] = crate::signal::SIGLWK;
    info[1] = SI_QUEUE as u32 as u64;
    info[2] = pid as u32 as u64 | (getuid() as u64) << 32;
    info[3] = STOP_COOKIE;
    for tid in others().filter_map(in_app) {
        // SAFETY: queues a signal to a thread of this process, with a
        // siginfo of ours.
        unsafe { syscall6(lwk_rt::nr::RT_TGSIGQUEUEINFO, pid as u64, tid as u64, info[0], info.as_ptr() as u64, 0, 0) };
    }
    for _ in 0..10_000 {
        if others().all(|s| in_app(s).is_none()) {
            return;
        }
        let ts = [0u64, 100_000];
        // SAFETY: a 100 µs sleep on our own timespec.
        unsafe { syscall3(lwk_rt::nr::NANOSLEEP, ts.as_ptr() as u64, 0, 0) };
    }
    lwk_rt::diag!("fork: other threads did not stop within a second; copying memory while they run");
}

/// Queue the LWK's signal with `cookie` to every other thread of the
/// process, in application code or not (a thread waiting in the LWK with
/// the application's mask is interrupted; one in a delegated call takes it
/// when it returns).
pub fn signal_others(cookie: u64) {
    let pid = getpid();
    let mut info = [0u64; 16];
    info[0] = crate::signal::SIGLWK;
    info[1] = SI_QUEUE as u32 as u64;
    info[2] = pid as u32 as u64 | (getuid() as u64) << 32;
    info[3] = cookie;
    for tid in others().map(tid_of).filter(|&t| t != 0) {
        // SAFETY: queues a signal to a thread of this process, with a
        // siginfo of ours.
        unsafe { syscall6(lwk_rt::nr::RT_TGSIGQUEUEINFO, pid as u64, tid as u64, info[0], info.as_ptr() as u64, 0, 0) };
    }
}

/// Stop every other thread for a freeze: they park in `leaving`.
pub fn stop_for_freeze() {
    STOP.store(1, SeqCst);
}

/// One stop of the other threads at a time: a fork's copy or a freeze.
/// They share STOP, and each must be over before the other starts.
static STOPPER: AtomicU32 = AtomicU32::new(0);

/// The right to stop the other threads, given back on drop.
pub struct StopClaim(());

impl Drop for StopClaim {
    fn drop(&mut self) {
        STOPPER.store(0, SeqCst);
    }
}

/// Claim the stop for a fork's copy. None while a freeze is asked for or
/// under way: the fork gives way (its call runs again after the freeze).
pub fn claim_stop_for_fork() -> Option<StopClaim> {
    loop {
        if crate::freeze::requested() {
            return None;
        }
        if STOPPER.compare_exchange(0, 1, SeqCst, Relaxed).is_ok() {
            return Some(StopClaim(()));
        }
        futex_wait_timeout(&STOPPER, 1, 100_000);
    }
}

/// Claim the stop for a freeze, waiting for a fork's copy to end; None
/// after `ms` milliseconds.
pub fn claim_stop_for_freeze(ms: u64) -> Option<StopClaim> {
    // Measured time, as the freeze's own park timeout: counted 1 ms waits
    // stretch on a loaded machine.
    let t0 = crate::handlers::monotonic_ns();
    loop {
        if STOPPER.compare_exchange(0, 1, SeqCst, Relaxed).is_ok() {
            return Some(StopClaim(()));
        }
        if crate::handlers::monotonic_ns() - t0 > ms * 1_000_000 {
            return None;
        }
        futex_wait_timeout(&STOPPER, 1, 1_000_000);
    }
}

/// After the fork's copy: let the other threads go on.
pub fn resume_others() {
    STOP.store(0, SeqCst);
    futex_wake(&STOP, u32::MAX >> 1);
}

/// Enter the application with `ctx` through rt_sigreturn: registers,
/// signal mask and (with `keep_altstack`, as after fork) the alternate
/// signal stack from `ctx`; fresh FPU state and the default PKRU.
pub fn enter(ctx: &UContext, keep_altstack: bool) -> ! {
    const SS_DISABLE: u32 = 2;
    let mut uc = *ctx;
    uc.fpregs = 0; // fresh FPU state (and the default PKRU)
    if !keep_altstack {
        uc.ss_sp = 0;
        uc.ss_flags = SS_DISABLE;
        uc.ss_size = 0;
    }
    // The frame goes below the new stack pointer, in application memory,
    // with room for the return-address word the kernel skips.
    let size = core::mem::size_of::<UContext>() as u64;
    let at = (uc.gregs[REG_RSP] - 256 - size) & !15;
    // SAFETY: below the application's fresh stack pointer nothing is in use.
    unsafe {
        (at as *mut UContext).write(uc);
        sigreturn_at(at)
    }
}

/// rt_sigreturn with the frame (a UContext) at `at`, which becomes the
/// stack pointer.
///
/// # Safety
/// A complete frame is at `at`, on memory the thread may use as stack.
unsafe fn sigreturn_at(at: u64) -> ! {
    // SAFETY: as documented.
    unsafe {
        asm!(
            "mov rsp, {at}",
            "mov eax, {nr}",
            "syscall",
            "ud2",
            at = in(reg) at,
            nr = const lwk_rt::nr::RT_SIGRETURN,
            options(noreturn)
        )
    }
}

/// exit(2) of one application thread. Its slot (and the proxy worker,
/// which stays, idle, for the slot's next thread) is free again.
pub fn exit(code: u64) -> ! {
    let slot = current_slot();
    let table = TABLE.lock();
    SLOTS.threads[slot].tid.store(0, Relaxed);
    free_slot(slot);
    drop(table);
    exit_thread(code as i32)
}

/// The threads saved: which slots are in use and by which thread.
/// Each thread's own context is a [`ContextSnapshot`].
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ThreadsSnapshot {
    pub used: [u64; MAX_CHANNELS / 64],
    pub tids: [i32; MAX_CHANNELS],
}

// The table is shared atomics: it is saved and restored through a shared
// reference (`restore` takes `&mut self`, here a `&mut &Slots`).
impl Persist for &Slots {
    type Snapshot = ThreadsSnapshot;
    const VERSION: u32 = 1;

    fn save(&self, out: &mut ThreadsSnapshot) {
        for (o, w) in out.used.iter_mut().zip(&self.used) {
            *o = w.load(SeqCst);
        }
        for (o, t) in out.tids.iter_mut().zip(&self.threads) {
            *o = t.tid.load(SeqCst);
        }
    }

    fn restore(&mut self, s: &ThreadsSnapshot) -> Result<(), i64> {
        // A free slot has no thread; a used one has one, or is being given
        // one (a clone in flight sets the tid when the kernel returns it).
        let used = |i: usize| s.used[i / 64] & (1 << (i % 64)) != 0;
        if (0..MAX_CHANNELS).any(|i| (!used(i) && s.tids[i] != 0) || s.tids[i] < 0) {
            return Err(-EINVAL);
        }
        for (w, &v) in self.used.iter().zip(&s.used) {
            w.store(v, SeqCst);
        }
        for (t, &tid) in self.threads.iter().zip(&s.tids) {
            t.tid.store(tid, SeqCst);
        }
        Ok(())
    }
}

/// Save the thread table into `out`, with the table frozen
/// ([`freeze_table`]).
pub fn save(out: &mut ThreadsSnapshot) {
    (&SLOTS).save(out)
}

/// Replace the thread table by `s`, with the table frozen.
pub fn restore(s: &ThreadsSnapshot) -> Result<(), i64> {
    (&SLOTS).restore(s)
}

/// Forget the thread table (for a test of restore).
pub fn wipe() {
    for w in &SLOTS.used {
        w.store(0, SeqCst);
    }
    for t in &SLOTS.threads {
        t.tid.store(0, SeqCst);
    }
}

/// One thread's context saved: its trapped registers, signal mask and
/// alternate stack (the ucontext, which rt_sigreturn puts back), its FPU
/// and vector state (the XSAVE area, PKRU included), and what Linux holds
/// for it outside the frame: the FS base (TLS) and the robust futex list.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ContextSnapshot {
    pub uc: UContext,
    pub fp_len: u64,
    pub fpstate: [u8; FPSTATE_MAX],
    pub fs_base: u64,
    /// get_robust_list(2): head and length.
    pub robust_list: [u64; 2],
}

/// sizeof(struct robust_list_head): the only length set_robust_list takes.
const ROBUST_LIST_HEAD_SIZE: u64 = 24;

/// The calling thread, stopped in the LWK at a trapped call whose frame is
/// `uc`.
pub struct Current<'a>(pub &'a mut UContext);

impl Persist for Current<'_> {
    type Snapshot = ContextSnapshot;
    const VERSION: u32 = 1;

    fn save(&self, out: &mut ContextSnapshot) {
        out.uc = *self.0;
        // SAFETY: the frame is the kernel's for the signal being handled.
        let fp = unsafe { self.0.fpstate() }.unwrap_or(&[]);
        out.fp_len = fp.len() as u64;
        out.fpstate[..fp.len()].copy_from_slice(fp);
        // SAFETY: the LWK's own output words; 0 is the calling thread.
        unsafe {
            syscall3(lwk_rt::nr::ARCH_PRCTL, ARCH_GET_FS, &mut out.fs_base as *mut u64 as u64, 0);
            let (head, len) = (&mut out.robust_list[0] as *mut u64, &mut out.robust_list[1] as *mut u64);
            syscall3(lwk_rt::nr::GET_ROBUST_LIST, 0, head as u64, len as u64);
        }
    }

    fn restore(&mut self, s: &ContextSnapshot) -> Result<(), i64> {
        // SAFETY: as in save.
        let have = unsafe { self.0.fpstate() }.map_or(0, |f| f.len());
        let n = s.fp_len as usize;
        if n != have || n > FPSTATE_MAX || !fpstate_intact(&s.fpstate[..n]) || (n == 0) != (s.uc.fpregs == 0) {
            return Err(-EINVAL); // another CPU's state layout: not this frame's
        }
        if s.robust_list[1] != ROBUST_LIST_HEAD_SIZE {
            return Err(-EINVAL);
        }
        // SAFETY: the robust list and FS base are this thread's own; a bad
        // value faults the application, as natively.
        let r = unsafe { syscall3(lwk_rt::nr::SET_ROBUST_LIST, s.robust_list[0], s.robust_list[1], 0) };
        if r < 0 {
            return Err(r);
        }
        // SAFETY: as above.
        unsafe { syscall3(lwk_rt::nr::ARCH_PRCTL, ARCH_SET_FS, s.fs_base, 0) };
        let fpregs = self.0.fpregs;
        *self.0 = s.uc;
        // The frame's FPU state stays where the kernel put it.
        self.0.fpregs = fpregs;
        if n > 0 {
            // SAFETY: the frame's FPU area is `n` bytes (checked above).
            unsafe { core::ptr::copy_nonoverlapping(s.fpstate.as_ptr(), fpregs as *mut u8, n) };
        }
        Ok(())
    }
}

/// Scramble the calling thread's context (for a test of restore): every
/// general register, the XMM registers, the FS base and the robust list.
pub fn wipe_current(uc: &mut UContext) {
    uc.gregs = [0x5a5a_5a5a_5a5a_5a5a; crate::arch::NGREG];
    uc.sigmask = 0;
    if uc.fpregs != 0 {
        // XMM0-15 in the legacy area: bytes 160..416.
        // SAFETY: the frame's FPU state is at least the 512-byte legacy area.
        unsafe { core::ptr::write_bytes((uc.fpregs + 160) as *mut u8, 0xa5, 256) };
    }
    // SAFETY: this thread's own FS base and robust list.
    unsafe {
        syscall3(lwk_rt::nr::ARCH_PRCTL, ARCH_SET_FS, 0, 0);
        syscall3(lwk_rt::nr::SET_ROBUST_LIST, 0, ROBUST_LIST_HEAD_SIZE, 0);
    }
}
