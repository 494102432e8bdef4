//! The LWK image started to restore a frozen application into a new
//! process: `lwk-kernel restore CTLFD DIAGFD INPUTFD`, started by
//! `lwk restore` (or the node daemon), which created the control region
//! and the proxy, filled the application's memory files and passed them at
//! the descriptor numbers the saved state names, and wrote a
//! [`RestoreInput`] into the memory file INPUTFD.
//!
//! The image puts back, in order: the LWK's subsystems (`LwkState`, with
//! the memory manager's bookkeeping, the thread table, the signal actions
//! and interval timers); every mapping, in this process and in the proxy
//! (`Mm::rebuild`: memory-file pieces from the files, file pieces from
//! the files opened again by path); the vDSO and vvar at the addresses the
//! program knows; one thread per saved thread, in the slot it had, each
//! entering the application from its own saved context; and last itself,
//! as the thread of the lowest saved slot (the main thread's, 0, unless it
//! had ended).
//!
//! Every signal stays blocked until each thread enters the application
//! with its own mask: a timer restored early cannot run an application
//! handler on the LWK's stack.

use core::sync::atomic::{AtomicU32, Ordering::*};

use lwk_abi::control::{HandedCredentials, MAX_CHANNELS, RESTORE_CLOSED, RESTORE_OPEN, RESTORE_PARKED};
use lwk_abi::layout::{FREEZE_EXPORT_ADDR, SCRATCH_ADDR};
use lwk_rt::nr;
use lwk_rt::*;

use crate::boot::{errno_text, map_control, parse_int, Startup, CTL_FD};
use crate::freeze::{FreezeExport, EXPORT_MAGIC, EXPORT_VERSION};
use crate::mm::MM;
use crate::{control, delegate, persist, thread, trap};

/// Room for a file mapping's path, NUL included.
pub const FILE_PATH_MAX: usize = 496;
/// The most file mappings a restore rebuilds.
pub const MAX_FILE_MAPPINGS: usize = 2048;
pub const INPUT_MAGIC: u64 = u64::from_le_bytes(*b"LWKTHAW1");

/// A piece of the address space mapped from a file: the file's path, to
/// be opened again (`path` NUL-terminated).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FileMapping {
    pub start: u64,
    pub end: u64,
    pub path: [u8; FILE_PATH_MAX],
}

/// Special mappings of the kernel's that the program knows by address:
/// `[vdso]`, `[vvar]`, `[vvar_vclock]`, as [start, end) (0, 0 when absent).
pub const SPECIAL_NAMES: [&[u8]; 3] = [b"[vdso]", b"[vvar]", b"[vvar_vclock]"];

/// What a restore is given: the frozen state, where the program's files
/// and the kernel's special mappings were.
#[repr(C)]
pub struct RestoreInput {
    pub magic: u64,
    /// 1: every thread gets the id it had (the process runs in a pid
    /// namespace of its own, where the restorer gave it its old pid).
    pub same_ids: u32,
    pub reserved: u32,
    pub n_files: u64,
    pub specials: [[u64; 2]; 3],
    /// The credentials the application had (none handed: keep the
    /// restorer's): each thread takes them before it runs the program
    /// (restoring needs root's).
    pub credentials: HandedCredentials,
    pub export: FreezeExport,
    pub files: [FileMapping; MAX_FILE_MAPPINGS],
}

pub const INPUT_SIZE: u64 = (core::mem::size_of::<RestoreInput>() as u64).next_multiple_of(4096);
const _: () = assert!(INPUT_SIZE <= lwk_abi::layout::SNAPSHOT_SIZE / 2);

fn input() -> &'static RestoreInput {
    // SAFETY: mapped by restore_main before anything reads it, unmapped
    // only after every thread took what it needs (STARTED).
    unsafe { &*(FREEZE_EXPORT_ADDR as *const RestoreInput) }
}

fn fail(what: &str, e: i64) -> ! {
    lwk_rt::diag!("restore: {}: {} (error {})", what, errno_text(e), -e);
    exit_group(125)
}

/// Restored threads that have left the input behind.
static STARTED: AtomicU32 = AtomicU32::new(0);

/// Entry of the restoring process.
pub fn restore_main(st: &Startup) -> ! {
    if st.argc < 5 {
        lwk_rt::diag!("lwk-kernel restore is started by `lwk restore`, not by hand");
        exit_group(2);
    }
    let arg = |i| parse_int(st.arg(i)).unwrap_or(-1) as i32;
    let (ctl, diag, input_fd) = (arg(2), arg(3), arg(4));
    // Nothing may interrupt the restore: each thread's own mask comes back
    // as it enters the application.
    let all = !0u64;
    // SAFETY: our own mask word.
    unsafe { syscall6(nr::RT_SIGPROCMASK, 2, &all as *const u64 as u64, 0, 8, 0, 0) };
    if let Err(e) = map_control(ctl).and_then(|()| stand_by_parent()) {
        lwk_rt::diag!("{}", e);
        exit_group(125);
    }
    CTL_FD.store(ctl, Relaxed);
    lwk_rt::out::DIAG_FD.store(diag, Relaxed);
    // SAFETY: a shared read-only mapping of the input in the LWK's window.
    let r = unsafe { mmap(FREEZE_EXPORT_ADDR, INPUT_SIZE, PROT_READ, MAP_SHARED | MAP_FIXED_NOREPLACE, input_fd, 0) };
    if r < 0 {
        fail("cannot map the restore input", r);
    }
    close(input_fd);
    let inp = input();
    let x = &inp.export;
    if inp.magic != INPUT_MAGIC || x.magic != EXPORT_MAGIC || x.version != EXPORT_VERSION {
        lwk_rt::diag!("restore: the input is not a frozen state of this lwk build");
        exit_group(125);
    }
    // The application's descriptors live in the proxy: this process keeps
    // only the control region, stderr for the LWK's messages, and the
    // memory files (at the numbers the saved state names).
    let keep = [ctl, diag, x.state.mm.memfd[0], x.state.mm.memfd[1], x.state.mm.memfd[2]];
    let top = keep.iter().copied().max().unwrap_or(0).max(0);
    for fd in (0..top).filter(|fd| !keep.contains(fd)) {
        close(fd);
    }
    // SAFETY: closes descriptors of our own table above every kept one.
    unsafe { syscall3(nr::CLOSE_RANGE, top as u64 + 1, !0u32 as u64, 0) };
    let Some(me) = (0..MAX_CHANNELS).find(|&s| x.threads[s].saved != 0) else {
        lwk_rt::diag!("restore: the state holds no thread");
        exit_group(125)
    };
    let h = &control().header;
    h.app_pid.store(getpid(), Release);
    // For a migration's pre-copy (a fork's child and an exec need their own).
    h.app_uffd.store(tracking_userfaultfd(), Release);
    if inp.same_ids != 0 && x.threads[me].tid != getpid() {
        lwk_rt::diag!("restore: this process is {}, the saved thread {}", getpid(), x.threads[me].tid);
        exit_group(125);
    }
    thread::init_as(me);
    if let Err(why) = crate::guard::protect() {
        if h.options.load(Relaxed) & lwk_abi::control::OPT_VERBOSE != 0 {
            lwk_rt::diag!("LWK memory is not protected from the application: {}", why);
        }
    }
    persist::set_selftest(h.selftest_restore.load(Relaxed));

    let mut held = persist::hold();
    if let Err(e) = x.state.restore_process(&mut held) {
        drop(held);
        fail("the saved state is refused", e);
    }
    drop(held);
    // Memory to come is the partition's made here (the saved directory
    // descriptor was the source's), with pages of the size it had.
    let part_page = x.state.mm.part_page;
    match crate::boot::open_partition_memory() {
        Some(page) if page == part_page => {}
        None if part_page == 0 => {}
        _ => {
            lwk_rt::diag!(
                "restore: the application ran in a partition of {} KiB pages; restore it into one",
                part_page >> 10
            );
            exit_group(125);
        }
    }
    // The other threads' slots are the restored table's; their tids are
    // set as they start. This thread's is its own.
    thread::init_as(me);

    let mut files = [-1i32; MAX_FILE_MAPPINGS];
    let n = (inp.n_files as usize).min(MAX_FILE_MAPPINGS);
    for (fd, f) in files.iter_mut().zip(&inp.files[..n]) {
        let r = open(&f.path, O_RDONLY | O_CLOEXEC, 0);
        if r < 0 {
            let len = f.path.iter().position(|&c| c == 0).unwrap_or(0);
            lwk_rt::diag!(
                "restore: cannot open {}, mapped by the program: {}",
                core::str::from_utf8(&f.path[..len]).unwrap_or("?"),
                errno_text(r)
            );
            exit_group(125);
        }
        *fd = r as i32;
    }
    let file_of = |start: u64| inp.files[..n].iter().position(|f| f.start == start).map(|i| files[i]);
    if let Err(e) = MM.lock().rebuild(file_of) {
        fail("cannot map the application's memory again", e);
    }
    // The proxy maps the files from our descriptors: let it before they
    // close. (Both processes still have root's rights here: the proxy
    // reaches into this one.)
    delegate::sync();
    for &fd in &files[..n] {
        close(fd);
    }
    if h.mirror_error.load(Relaxed) != 0 {
        fail("the proxy could not map the application's memory", -(h.mirror_error.load(Relaxed) as i64));
    }
    // The signalfds, while this process may still open the proxy's
    // descriptors.
    if let Err((what, e)) = crate::signalfd::remake_in_new_process() {
        fail(what, e);
    }
    // The LWK's handlers first: a thread runs with Syscall User Dispatch on
    // from its start.
    if let Err(e) = trap::enable() {
        fail("cannot enable Syscall User Dispatch", e);
    }
    // The other threads start now, while this process has root's rights
    // (they get their old ids with set_tid); each takes the application's
    // credentials and waits at the gate. Then this one takes them, and
    // hands them to the proxy's threads, which take them before they next
    // serve a call (the next sync, for the one serving this thread).
    let others = (0..MAX_CHANNELS).filter(|&s| s != me && x.threads[s].saved != 0);
    let mut count = 0;
    for s in others {
        let t = &x.threads[s];
        let tid = if inp.same_ids != 0 { t.tid } else { 0 };
        let r = thread::start_in_slot(s, t.ctx.fs_base, t.clear_tid, tid, restored_thread);
        if r < 0 {
            lwk_rt::diag!("restore: cannot start thread {} again: error {}", t.tid, -r);
            exit_group(125);
        }
        count += 1;
    }
    while STARTED.load(Acquire) != count {
        futex_wait_timeout(&STARTED, STARTED.load(Acquire), 1_000_000);
    }
    take_handed_credentials(&inp.credentials, &mut 0);
    inp.credentials.hand_to(&h.proxy_credentials);
    delegate::sync();
    move_specials(&inp.specials);
    crate::signalfd::after_restore();
    // Everything is back, the other threads waiting: wait at the gate until the
    // restorer opens it (at once on the same node; when the source let go,
    // in a migration).
    let gate = &h.restore_gate;
    if gate.compare_exchange(RESTORE_CLOSED, RESTORE_PARKED, SeqCst, SeqCst).is_ok() {
        futex_wake(gate, u32::MAX >> 1);
    }
    wait_at_gate();
    let mine = x.threads[me];
    let (process, own) = pending_at_freeze(x, me);
    thread::set_sleep_left(me, mine.sleep_at, mine.sleep_left_ns);
    // SAFETY: the input is ours; every thread copied what it needed.
    unsafe { munmap(FREEZE_EXPORT_ADDR, INPUT_SIZE) };
    control().stats.tsc_start.store(rdtsc(), Relaxed);
    h.started.store(1, Release);
    // SAFETY: this thread's clear-tid address, as it was.
    unsafe { syscall3(nr::SET_TID_ADDRESS, mine.clear_tid, 0, 0) };
    raise_again(process, true);
    raise_again(own, false);
    thread::leaving_restored();
    thread::enter_saved(&mine.ctx)
}

/// The first process of a tree dies with `lwk restore`, whose child it is
/// (outside its pid namespace: getppid says 0), as it would with its
/// `lwk run`. A process it forked is restored as its child again, and
/// outlives it as a forked process does.
fn stand_by_parent() -> Result<(), &'static str> {
    // SAFETY: plain getppid.
    let parent = unsafe { syscall3(nr::GETPPID, 0, 0, 0) } as i32;
    if parent == 0 {
        return crate::boot::die_with_supervisor();
    }
    if parent != control().header.parent_pid.load(Relaxed) {
        return Err("restore: this process is not the child of the process that forked it");
    }
    Ok(())
}

/// A restored thread other than the first: enter the application from its
/// saved context, after telling the first thread it no longer needs the
/// input.
extern "C" fn restored_thread(slot: u64) -> ! {
    let slot = slot as usize;
    thread::begin(slot);
    // Copied out of the input (onto this slot's LWK stack) before the
    // first thread may unmap it.
    let ctx = input().export.threads[slot].ctx;
    let t = &input().export.threads[slot];
    let (_, own) = pending_at_freeze(&input().export, slot);
    thread::set_sleep_left(slot, t.sleep_at, t.sleep_left_ns);
    take_handed_credentials(&input().credentials, &mut 0);
    STARTED.fetch_add(1, Release);
    futex_wake(&STARTED, 1);
    wait_at_gate();
    raise_again(own, false);
    thread::leaving_restored();
    thread::enter_saved(&ctx)
}

/// The signals pending at the freeze for thread `slot`: those pending for
/// the process (every thread's set held them), and those for the thread
/// alone. The kernel's records (who sent them, an RT signal's count and
/// value) stayed with the old process.
fn pending_at_freeze(x: &FreezeExport, slot: usize) -> (u64, u64) {
    let saved = || x.threads.iter().filter(|t| t.saved != 0);
    let process = saved().fold(!0u64, |all, t| all & t.pending);
    (process, x.threads[slot].pending & !process)
}

/// Raise `set` again: for this thread alone, or for the process. Every
/// signal is still blocked here; each is taken when a thread enters the
/// application with a mask that lets it through, as it would have been.
fn raise_again(set: u64, process: bool) {
    for sig in (1..=64u64).filter(|s| set & (1 << (s - 1)) != 0) {
        // SAFETY: plain signals to this process or thread.
        unsafe {
            if process {
                syscall3(nr::KILL, getpid() as u64, sig, 0);
            } else {
                syscall3(nr::TGKILL, getpid() as u64, gettid() as u64, sig);
            }
        }
    }
}

/// Wait until the restorer opens the gate.
fn wait_at_gate() {
    let gate = &control().header.restore_gate;
    while gate.load(SeqCst) != RESTORE_OPEN {
        futex_wait_timeout(gate, gate.load(SeqCst), 100_000_000);
    }
}

/// Put the kernel's special mappings (`[vdso]`, `[vvar]`, `[vvar_vclock]`) back
/// where the program knows them. Each is moved to the scratch window first,
/// so that none lands on another that has not moved yet. The kernel built
/// here must be the one the program ran on (same sizes), and the targets
/// must be free.
fn move_specials(saved: &[[u64; 2]; 3]) {
    let fd = open(b"/proc/self/maps\0", O_RDONLY | O_CLOEXEC, 0);
    if fd < 0 {
        fail("cannot read /proc/self/maps", fd);
    }
    // Read in pieces, a line at a time: a program's map can be far longer
    // than any buffer here, and the specials come near its end.
    let mut now = [[0u64; 2]; 3];
    let mut buf = [0u8; 8192];
    let mut len = 0;
    loop {
        // SAFETY: reading into our own buffer, after what it holds.
        let r = unsafe { syscall3(nr::READ, fd as u64, buf[len..].as_mut_ptr() as u64, (buf.len() - len) as u64) };
        if r <= 0 {
            break;
        }
        len += r as usize;
        let done = buf[..len].iter().rposition(|&c| c == b'\n').map_or(0, |i| i + 1);
        for line in buf[..done].split(|&c| c == b'\n') {
            let Some((k, _)) = SPECIAL_NAMES.iter().enumerate().find(|(_, n)| line.ends_with(n)) else { continue };
            let Some(range) = line.split(|&c| c == b' ').next() else { continue };
            let mut ends = range.split(|&c| c == b'-').map(parse_hex);
            now[k] = [ends.next().flatten().unwrap_or(0), ends.next().flatten().unwrap_or(0)];
        }
        buf.copy_within(done..len, 0);
        len -= done;
        if len == buf.len() {
            len = 0; // a line longer than the buffer: no special's
        }
    }
    close(fd as i32);
    for k in 0..3 {
        let (want, have) = (saved[k], now[k]);
        if (want[0] == 0) != (have[0] == 0) || want[1] - want[0] != have[1] - have[0] {
            lwk_rt::diag!(
                "restore: the kernel's {} differs from the one the program ran with (another kernel build?)",
                core::str::from_utf8(SPECIAL_NAMES[k]).unwrap_or("?")
            );
            exit_group(125);
        }
    }
    let mut scratch = SCRATCH_ADDR;
    let mut parked = [0u64; 3];
    for k in 0..3 {
        let [s, e] = now[k];
        if s == 0 {
            continue;
        }
        // SAFETY: the kernel's own special mapping of this process, moved
        // into the LWK's scratch window, where nothing else is yet.
        let r = unsafe { syscall6(nr::MREMAP, s, e - s, e - s, MREMAP_MAYMOVE | MREMAP_FIXED, scratch, 0) };
        if r < 0 {
            fail("cannot move the vDSO", r);
        }
        parked[k] = scratch;
        scratch += (e - s).next_multiple_of(1 << 20);
    }
    for k in 0..3 {
        let [s, e] = saved[k];
        if s == 0 {
            continue;
        }
        // Only into free space: MREMAP_FIXED would replace whatever is there.
        // SAFETY: a probe that maps nothing (MAP_FIXED_NOREPLACE fails on a
        // mapped range; on success it is unmapped at once).
        let probe = unsafe { mmap(s, e - s, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0) };
        if probe < 0 {
            fail("the vDSO's old place is taken in this process", probe);
        }
        // SAFETY: [s, e) is the probe just made, and the special mapping
        // replaces it.
        let r = unsafe { syscall6(nr::MREMAP, parked[k], e - s, e - s, MREMAP_MAYMOVE | MREMAP_FIXED, s, 0) };
        if r < 0 {
            fail("cannot move the vDSO back to its place", r);
        }
    }
}

fn parse_hex(s: &[u8]) -> Option<u64> {
    let mut v: u64 = 0;
    if s.is_empty() {
        return None;
    }
    for &c in s {
        let d = (c as char).to_digit(16)? as u64;
        v = v.checked_mul(16)?.checked_add(d)?;
    }
    Some(v)
}
