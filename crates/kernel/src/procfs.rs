//! /proc/self for the application.
//!
//! Delegated calls run in the proxy, where /proc/self would name the proxy.
//! Paths under /proc/self and /proc/thread-self are rewritten to name the
//! application process (/proc/PID, /proc/PID/task/TID), except its
//! descriptors, which live in the proxy (/proc/self/fd and fdinfo name the
//! proxy's). /proc/self/exe, which would name the LWK image, answers the
//! program instead.

use core::sync::atomic::Ordering::Relaxed;

use lwk_rt::nr;
use lwk_rt::out::fmt_u64;
use lwk_rt::*;

use crate::control;
use crate::persist::Persist;
use crate::sync::SpinLock;
use crate::uaccess::{copy_to_app, read_cstr};

pub const PATH_MAX: usize = 4096;

/// The program's canonical path, for /proc/self/exe.
static EXE: SpinLock<([u8; PATH_MAX], usize)> = SpinLock::new(([0; PATH_MAX], 0));

/// # Safety
/// Only in the single thread of a freshly forked child.
pub unsafe fn force_unlock() {
    // SAFETY: as documented.
    unsafe { EXE.force_unlock() };
}

/// Remember the program open on `fd` (at load time) as /proc/self/exe,
/// and name the process after `execfn`, the path it was started by.
pub fn set_exe(fd: i32, execfn: &[u8]) {
    let mut link = [0u8; 64];
    let n = lwk_rt::out::proc_fd_path(&mut link, getpid(), fd);
    let mut e = EXE.lock();
    // SAFETY: both buffers are ours.
    let r = unsafe {
        syscall6(
            nr::READLINKAT,
            (-100i64) as u64,
            link[..n].as_ptr() as u64,
            e.0.as_mut_ptr() as u64,
            PATH_MAX as u64,
            0,
            0,
        )
    };
    e.1 = if r > 0 { r as usize } else { 0 };
    // The process's name (comm, what ps shows) is the program's, as after
    // a native exec, not the LWK image's.
    let base = execfn.rsplit(|&c| c == b'/').next().unwrap_or(&[]);
    let mut name = [0u8; 16];
    let k = base.len().min(15);
    name[..k].copy_from_slice(&base[..k]);
    // SAFETY: name is NUL-terminated.
    unsafe { syscall3(nr::PRCTL, PR_SET_NAME, name.as_ptr() as u64, 0) };
}

/// Does the path at `path` start with /proc/? A cheap test (7 bytes read)
/// that keeps the full rewrite, with its path-sized buffers, off the path
/// of every other delegated call.
pub fn names_proc(path: u64) -> bool {
    let mut head = [0u8; 7];
    let r = read_cstr(path, &mut head);
    (r.is_ok() || r == Err(-ENAMETOOLONG)) && head.starts_with(b"/proc/")
}

/// A rewritten path, in a buffer the caller keeps on the application's
/// stack (the proxy sees it there).
pub struct Rewrite {
    pub buf: [u8; PATH_MAX],
}

pub enum Outcome {
    /// Not a /proc/self path: delegate as it is.
    Unchanged,
    /// Delegate with the path argument replaced by the rewritten path.
    Path,
    /// Answered here.
    Done(i64),
}

/// Rewrite argument `i` of call `nr`, a path, if it names the proxy's
/// /proc/self where Linux would name the application's.
pub fn rewrite(nr: u64, i: usize, a: &[u64; 6], out: &mut Rewrite) -> Outcome {
    let mut path = [0u8; PATH_MAX];
    let Ok(len) = read_cstr(a[i], &mut path) else { return Outcome::Unchanged };
    let p = &path[..len];
    let h = &control().header;
    let is_readlink = nr == nr::READLINK || nr == nr::READLINKAT;
    // /proc/self itself is a symlink (to the proxy, there): readlink must
    // give the application's pid, and /proc/PID/exe the program.
    if is_readlink {
        let mut pid = [0u8; 20];
        let pid = fmt_u64(&mut pid, h.app_pid.load(Relaxed) as u64);
        if p == b"/proc/self" {
            return Outcome::Done(copy_out(pid, a[i + 1], a[i + 2]));
        }
        if p.strip_prefix(b"/proc/").and_then(|r| r.strip_prefix(pid)) == Some(b"/exe".as_slice()) {
            return Outcome::Done(readlink_exe(a[i + 1], a[i + 2]));
        }
    }
    if p == b"/proc/self" || p == b"/proc/thread-self" {
        return Outcome::Unchanged;
    }
    let (rest, thread) = if let Some(r) = strip_dir(p, b"/proc/self") {
        (r, false)
    } else if let Some(r) = strip_dir(p, b"/proc/thread-self") {
        (r, true)
    } else {
        return Outcome::Unchanged;
    };
    if !thread && rest == b"/exe" {
        if is_readlink {
            return Outcome::Done(readlink_exe(a[i + 1], a[i + 2]));
        }
        let e = EXE.lock();
        if e.1 == 0 {
            return Outcome::Unchanged;
        }
        out.buf[..e.1].copy_from_slice(&e.0[..e.1]);
        out.buf[e.1] = 0;
        return Outcome::Path;
    }
    let mut w = Writer { buf: &mut out.buf, n: 0 };
    w.put(b"/proc/");
    let fds = !thread && (strip_dir(rest, b"/fd").is_some() || strip_dir(rest, b"/fdinfo").is_some());
    if fds {
        w.put(fmt_u64(&mut [0; 20], h.proxy_pid.load(Relaxed) as u64));
    } else {
        w.put(fmt_u64(&mut [0; 20], h.app_pid.load(Relaxed) as u64));
        if thread {
            w.put(b"/task/");
            w.put(fmt_u64(&mut [0; 20], gettid() as u64));
        }
    }
    w.put(rest);
    if w.n >= PATH_MAX {
        return Outcome::Unchanged;
    }
    out.buf[w.n] = 0;
    Outcome::Path
}

/// `p` without the directory `dir` when `p` is `dir` or inside it.
fn strip_dir<'a>(p: &'a [u8], dir: &[u8]) -> Option<&'a [u8]> {
    let r = p.strip_prefix(dir)?;
    (r.is_empty() || r[0] == b'/').then_some(r)
}

struct Writer<'a> {
    buf: &'a mut [u8; PATH_MAX],
    n: usize,
}

impl Writer<'_> {
    fn put(&mut self, s: &[u8]) {
        let end = (self.n + s.len()).min(PATH_MAX);
        self.buf[self.n..end].copy_from_slice(&s[..end - self.n]);
        self.n += s.len();
    }
}

/// readlink("/proc/self/exe", buf, size): the program, as natively.
fn readlink_exe(buf: u64, size: u64) -> i64 {
    let e = EXE.lock();
    if e.1 == 0 {
        return -ENOENT;
    }
    copy_out(&e.0[..e.1], buf, size)
}

/// readlink's answer: `s` into the application's `buf` of `size` bytes.
fn copy_out(s: &[u8], buf: u64, size: u64) -> i64 {
    if (size as i64) <= 0 {
        return -EINVAL;
    }
    let n = s.len().min(size as usize);
    match copy_to_app(buf, &s[..n]) {
        Ok(()) => n as i64,
        Err(e) => e,
    }
}

/// The process's identity as /proc shows it, saved: the program's path
/// (for /proc/self/exe) and its name (comm).
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct IdentitySnapshot {
    pub exe: [u8; PATH_MAX],
    pub exe_len: u64,
    pub comm: [u8; 16],
}

const PR_SET_NAME: u64 = 15;
const PR_GET_NAME: u64 = 16;

impl Persist for ([u8; PATH_MAX], usize) {
    type Snapshot = IdentitySnapshot;
    const VERSION: u32 = 1;

    fn save(&self, out: &mut IdentitySnapshot) {
        out.exe = self.0;
        out.exe_len = self.1 as u64;
        out.comm = [0; 16];
        // SAFETY: a 16-byte buffer of ours, as PR_GET_NAME wants.
        unsafe { syscall3(nr::PRCTL, PR_GET_NAME, out.comm.as_mut_ptr() as u64, 0) };
    }

    fn restore(&mut self, s: &IdentitySnapshot) -> Result<(), i64> {
        if s.exe_len as usize >= PATH_MAX || s.comm[15] != 0 {
            return Err(-EINVAL);
        }
        // SAFETY: NUL-terminated (checked above).
        unsafe { syscall3(nr::PRCTL, PR_SET_NAME, s.comm.as_ptr() as u64, 0) };
        *self = (s.exe, s.exe_len as usize);
        Ok(())
    }
}

/// The identity, locked (to save or restore it).
pub fn lock() -> crate::sync::Guard<'static, ([u8; PATH_MAX], usize)> {
    EXE.lock()
}

/// Forget the identity (for a test of restore).
pub fn wipe(e: &mut ([u8; PATH_MAX], usize)) {
    *e = ([0; PATH_MAX], 0);
    // SAFETY: a NUL-terminated name.
    unsafe { syscall3(nr::PRCTL, PR_SET_NAME, c"wiped".as_ptr() as u64, 0) };
}
