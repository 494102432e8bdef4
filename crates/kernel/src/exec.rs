//! execve: the LWK starts again, in the same process (same pid, same
//! proxy, same file descriptors), with the new program. It checks what the
//! kernel would refuse first, so that a failing execve returns its error to
//! the application instead of ending the process.

use core::sync::atomic::Ordering::Relaxed;

use lwk_rt::nr;
use lwk_rt::*;

use crate::arch::UContext;
use crate::boot::CTL_FD;
use crate::sync::SpinLock;
use crate::uaccess::{read_app, read_cstr};
use crate::{control, delegate, elf};

const MAX_ARGS: usize = 1 << 16;
const PATH_MAX: usize = 4096;

/// The new image's argv: built here, read by the kernel's execve.
struct ExecArgs {
    argv: [u64; MAX_ARGS + 8],
    path: [u8; PATH_MAX],
    numbers: [[u8; 24]; 2],
}

static ARGS: SpinLock<ExecArgs> =
    SpinLock::new(ExecArgs { argv: [0; MAX_ARGS + 8], path: [0; PATH_MAX], numbers: [[0; 24]; 2] });

/// Make this process's working directory the application's (which lives
/// in the proxy), so relative paths mean the same here.
fn follow_cwd() -> Result<(), i64> {
    // On the application's stack (this handler runs there), which the
    // proxy sees, so the delegated getcwd can fill it.
    let mut cwd = [0u8; PATH_MAX];
    let r = delegate::call(nr::GETCWD, [cwd.as_mut_ptr() as u64, cwd.len() as u64, 0, 0, 0, 0]);
    if r < 0 {
        return Err(r);
    }
    // SAFETY: cwd is NUL-terminated by getcwd.
    let r = unsafe { syscall3(nr::CHDIR, cwd.as_ptr() as u64, 0, 0) };
    if r < 0 {
        Err(r)
    } else {
        Ok(())
    }
}

/// What execve would say about `path` (NUL-terminated), checked here.
fn check(path: &[u8]) -> Result<(), i64> {
    const X_OK: u64 = 1;
    // SAFETY: path is NUL-terminated.
    let r = unsafe { syscall6(nr::FACCESSAT, (-100i64) as u64, path.as_ptr() as u64, X_OK, 0, 0, 0) };
    if r < 0 {
        return Err(r);
    }
    let fd = open(path, O_RDONLY | O_CLOEXEC, 0);
    if fd < 0 {
        return Err(fd);
    }
    let mut h = [0u8; 64];
    let n = pread(fd as i32, &mut h, 0);
    close(fd as i32);
    if n == -EISDIR {
        return Err(-EACCES);
    }
    if n >= 2 && &h[..2] == b"#!" {
        return Ok(());
    }
    if n < 64 {
        return Err(if n < 0 { n } else { -ENOEXEC });
    }
    elf::check_header(&h).map(|_| ()).map_err(|e| e.errno)
}

/// execveat: a path relative to a directory descriptor, or (AT_EMPTY_PATH,
/// as fexecve) the file of a descriptor itself. The descriptors live in the
/// proxy, so they are reached through /proc/PROXY/fd/N.
pub fn execveat(dirfd: u64, path: u64, argv: u64, envp: u64, flags: u64, uc: &UContext) -> i64 {
    const AT_FDCWD: i32 = -100;
    const AT_EMPTY_PATH: u64 = 0x1000;
    const AT_SYMLINK_NOFOLLOW: u64 = 0x100;
    if flags & !(AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) != 0 {
        return -EINVAL;
    }
    let mut args = ARGS.lock();
    let a = &mut *args;
    let mut rel = [0u8; PATH_MAX];
    let len = match read_cstr(path, &mut rel) {
        Ok(n) => n,
        Err(e) => return e,
    };
    if dirfd as i32 == AT_FDCWD || rel[0] == b'/' {
        if len == 0 {
            return -ENOENT;
        }
        a.path[..=len].copy_from_slice(&rel[..=len]);
        return execve_at_path(a, len, argv, envp, uc);
    }
    if len == 0 && flags & AT_EMPTY_PATH == 0 {
        return -ENOENT;
    }
    let mut via = [0u8; 64];
    let proxy = control().header.proxy_pid.load(Relaxed);
    let n = lwk_rt::out::proc_fd_path(&mut via, proxy, dirfd as i32) - 1; // without the NUL
    let total = n + if len == 0 { 0 } else { 1 + len };
    if total >= PATH_MAX {
        return -ENAMETOOLONG;
    }
    a.path[..n].copy_from_slice(&via[..n]);
    if len > 0 {
        a.path[n] = b'/';
        a.path[n + 1..=total].copy_from_slice(&rel[..=len]);
    } else {
        a.path[n] = 0;
    }
    // The proxy closes close-on-exec descriptors before the new image opens
    // its program, so name the file by where it is, when it has a name.
    let mut real = [0u8; PATH_MAX];
    // SAFETY: both buffers are ours; readlink does not NUL-terminate.
    let r = unsafe {
        syscall6(
            nr::READLINKAT,
            (-100i64) as u64,
            a.path.as_ptr() as u64,
            real.as_mut_ptr() as u64,
            PATH_MAX as u64 - 1,
            0,
            0,
        )
    };
    if r > 0 && real[0] == b'/' && can_open(&real[..=r as usize]) {
        a.path[..=r as usize].copy_from_slice(&real[..=r as usize]);
        return execve_at_path(a, r as usize, argv, envp, uc);
    }
    execve_at_path(a, total, argv, envp, uc)
}

pub fn execve(path: u64, argv: u64, envp: u64, uc: &UContext) -> i64 {
    let mut args = ARGS.lock();
    let a = &mut *args;
    let len = match read_cstr(path, &mut a.path) {
        Ok(0) => return -ENOENT,
        Ok(n) => n,
        Err(e) => return e,
    };
    execve_at_path(a, len, argv, envp, uc)
}

/// Can this process open `path` (NUL-terminated, possibly not: readlink's
/// result gets its NUL from the zeroed buffer)?
fn can_open(path: &[u8]) -> bool {
    let fd = open(path, O_RDONLY | O_CLOEXEC, 0);
    if fd >= 0 {
        close(fd as i32);
    }
    fd >= 0
}

/// execve of `a.path` (length `len`, NUL-terminated).
fn execve_at_path(a: &mut ExecArgs, len: usize, argv: u64, envp: u64, uc: &UContext) -> i64 {
    if let Err(e) = follow_cwd() {
        return e;
    }
    if let Err(e) = check(&a.path[..=len]) {
        return e;
    }
    // argv of the image: NAME exec CTLFD DIAGFD PATH ARGV0 ARGS...
    let mut app_argc = 0;
    if argv != 0 {
        loop {
            if app_argc == MAX_ARGS {
                return -E2BIG;
            }
            match read_app::<1>(argv + 8 * app_argc as u64) {
                Ok([0]) => break,
                Ok([p]) => a.argv[5 + app_argc] = p,
                Err(e) => return e,
            }
            app_argc += 1;
        }
    }
    let fmt = |buf: &mut [u8; 24], v: u64| {
        let mut d = [0u8; 20];
        let s = lwk_rt::out::fmt_u64(&mut d, v);
        buf[..s.len()].copy_from_slice(s);
        buf[s.len()] = 0;
    };
    fmt(&mut a.numbers[0], CTL_FD.load(Relaxed) as u64);
    fmt(&mut a.numbers[1], lwk_rt::out::DIAG_FD.load(Relaxed) as u64);
    let empty = b"\0";
    if app_argc == 0 {
        // Linux gives a program started with no argv an empty argv[0].
        a.argv[5] = empty.as_ptr() as u64;
        app_argc = 1;
    }
    a.argv[0] = a.argv[5];
    a.argv[1] = c"exec".as_ptr() as u64;
    a.argv[2] = a.numbers[0].as_ptr() as u64;
    a.argv[3] = a.numbers[1].as_ptr() as u64;
    a.argv[4] = a.path.as_ptr() as u64;
    a.argv[5 + app_argc] = 0;
    // The new image restores the mask the application had; the proxy must
    // have mirrored everything before this address space goes away.
    control().header.exec_sigmask.store(uc.sigmask, Relaxed);
    crate::signal::before_exec();
    delegate::sync();
    let s = &control().stats;
    s.local[nr::EXECVE as usize].add(0);
    // SAFETY: argv and its strings stay valid until the kernel has copied
    // them; envp is the application's, checked by the kernel.
    let r = unsafe { syscall3(nr::EXECVE, c"/proc/self/exe".as_ptr() as u64, a.argv.as_ptr() as u64, envp) };
    // Only reached on failure (E2BIG, ENOMEM...): this process goes on.
    r
}
