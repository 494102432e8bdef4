//! Start-up of the application process: map the control region, create the
//! memory pools, load the program, build its stack, turn on the trap and
//! jump. Runs on the stack Linux gave the LWK image, before any
//! application code exists.

use core::sync::atomic::Ordering::{Relaxed, Release};

use lwk_abi::control::{CONTROL_MAGIC, OPT_HUGE_OFF, OPT_HUGE_REQUIRE, OPT_PREFAULT_ALL, OPT_VERBOSE};
use lwk_abi::layout::STACK_TOP;
use lwk_rt::mem::strlen;
use lwk_rt::nr;
use lwk_rt::*;

use crate::elf::{self, Image, LoadError};
use crate::mm::{page_up, MM};
use crate::stack::*;
use crate::{control, delegate, trap};

/// What Linux put on the initial stack.
pub struct Startup {
    pub argc: usize,
    pub argv: *const *const u8,
    pub envp: *const *const u8,
    pub auxv: *const [u64; 2],
}

impl Startup {
    /// # Safety
    /// `sp` is the initial stack pointer the kernel gave the process.
    pub unsafe fn parse(sp: *const u64) -> Startup {
        // SAFETY: the kernel's layout: argc, argv..., 0, envp..., 0, auxv.
        unsafe {
            let argc = *sp as usize;
            let argv = sp.add(1) as *const *const u8;
            let envp = argv.add(argc + 1);
            let mut e = envp;
            while !(*e).is_null() {
                e = e.add(1);
            }
            Startup { argc, argv, envp, auxv: e.add(1) as *const [u64; 2] }
        }
    }

    pub fn arg(&self, i: usize) -> &'static [u8] {
        // SAFETY: i < argc is checked by the callers; strings are NUL-terminated.
        unsafe { cstr(*self.argv.add(i)) }
    }

    pub fn aux(&self, key: u64) -> Option<u64> {
        let mut p = self.auxv;
        // SAFETY: the auxv ends with AT_NULL.
        unsafe {
            while (*p)[0] != AT_NULL {
                if (*p)[0] == key {
                    return Some((*p)[1]);
                }
                p = p.add(1);
            }
        }
        None
    }
}

/// # Safety
/// `p` points to a NUL-terminated string that lives forever.
pub unsafe fn cstr(p: *const u8) -> &'static [u8] {
    // SAFETY: as documented.
    unsafe { core::slice::from_raw_parts(p, strlen(p)) }
}

pub fn parse_int(s: &[u8]) -> Option<i64> {
    if s.is_empty() {
        return None;
    }
    let mut v: i64 = 0;
    for &c in s {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add((c - b'0') as i64)?;
    }
    Some(v)
}

/// Map the control region from `fd` at its fixed address. The descriptor
/// stays open (privately, in this process) for execve.
pub fn map_control(fd: i32) -> Result<(), &'static str> {
    if lwk_rt::map_control(fd, false) < 0 {
        return Err("cannot map the control region");
    }
    if control().header.magic.load(Relaxed) != CONTROL_MAGIC {
        return Err("control region has the wrong magic (lwk and lwk-kernel from different builds?)");
    }
    Ok(())
}

/// Die with the supervisor, whatever kills it; if it is already gone, go
/// now.
pub fn die_with_supervisor() -> Result<(), &'static str> {
    let h = &control().header;
    const PR_SET_PDEATHSIG: u64 = 1;
    const SIGKILL: u64 = 9;
    // SAFETY: plain prctl and getppid.
    let parent = unsafe {
        syscall3(nr::PRCTL, PR_SET_PDEATHSIG, SIGKILL, 0);
        syscall3(nr::GETPPID, 0, 0, 0)
    };
    // 0: the parent is outside this process's pid namespace (`lwk restore`,
    // which gives a restored application a namespace of its own).
    if parent != 0 && parent as i32 != h.supervisor_pid.load(Relaxed) {
        return Err("lwk run is gone");
    }
    Ok(())
}

fn fail(path: &[u8], what: &str, e: LoadError) -> ! {
    let p = core::str::from_utf8(path).unwrap_or("?");
    if e.reason.is_empty() {
        lwk_rt::diag!("{}: {}{}", p, what, errno_text(e.errno));
    } else {
        lwk_rt::diag!("{}: {}{}", p, what, e.reason);
    }
    exit_group(e.status)
}

pub fn errno_text(e: i64) -> &'static str {
    match -e {
        ENOENT => "No such file or directory",
        EACCES => "Permission denied",
        ENOEXEC => "Exec format error",
        ENOMEM => "Cannot allocate memory",
        EISDIR => "Is a directory",
        ELOOP => "Too many levels of symbolic links",
        E2BIG => "Argument list too long",
        _ => "I/O error",
    }
}

const MAX_SHEBANG: usize = 4;
const MAX_PREFIX: usize = 3 * MAX_SHEBANG + 1;

/// argv for the program: a prefix built by `#!` lines, then the
/// original arguments from index `rest`.
struct Argv<'a> {
    prefix: [&'a [u8]; MAX_PREFIX],
    n: usize,
    rest: usize,
}

/// The LWK's own descriptors in the application process (the control
/// region and a copy of the original stderr), kept across execve.
pub static CTL_FD: core::sync::atomic::AtomicI32 = core::sync::atomic::AtomicI32::new(-1);

/// Entry of the application process:
/// `lwk-kernel app|exec CTLFD DIAGFD|- PATH ARGV0 ARGS...`. `app` is the
/// start by `lwk run` (DIAGFD `-`: stderr is copied); `exec` is the LWK
/// starting again in the same process for the application's execve.
pub fn app_main(st: &Startup) -> ! {
    if st.argc < 6 {
        lwk_rt::diag!("lwk-kernel is started by `lwk run`, not by hand");
        exit_group(2);
    }
    let exec = st.arg(1) == b"exec";
    let ctl = parse_int(st.arg(2)).unwrap_or(-1) as i32;
    // The first application process dies with `lwk run` (the setting
    // survives its execs; its forked children are the application's own and
    // outlive it as natively).
    if let Err(e) = map_control(ctl).and_then(|()| if exec { Ok(()) } else { die_with_supervisor() }) {
        lwk_rt::diag!("{}", e);
        exit_group(125);
    }
    CTL_FD.store(ctl, Relaxed);
    // The application's descriptors live in the proxy. Keep one private
    // copy of stderr for the LWK's own messages and the control region's,
    // and close the rest, so this process holds no pipe ends or files open
    // behind the proxy.
    // SAFETY: descriptor calls on our own table.
    unsafe {
        let diag = match parse_int(st.arg(3)) {
            Some(fd) => fd,
            None => syscall3(nr::FCNTL, 2, 0 /* F_DUPFD */, 100),
        };
        lwk_rt::out::DIAG_FD.store(diag as i32, Relaxed);
        let (lo, hi) = if (diag as i32) < ctl { (diag as u64, ctl as u64) } else { (ctl as u64, diag as u64) };
        if lo > 0 {
            syscall3(nr::CLOSE_RANGE, 0, lo - 1, 0);
        }
        if hi > lo + 1 {
            syscall3(nr::CLOSE_RANGE, lo + 1, hi - 1, 0);
        }
        syscall3(nr::CLOSE_RANGE, hi + 1, !0u32 as u64, 0);
    }
    crate::thread::init_main();
    if exec {
        // The proxy drops the old image's memory and close-on-exec files.
        let r = delegate::call(lwk_abi::control::REQ_EXEC_RESET, [0; 6]);
        if r < 0 {
            lwk_rt::diag!("the proxy could not reset for execve: {}", errno_text(r));
            exit_group(125);
        }
    }
    let h = &control().header;
    h.app_pid.store(getpid(), Release);
    // For a migration's pre-copy (a fork's child and an exec need their own).
    h.app_uffd.store(tracking_userfaultfd(), Release);
    if let Err(why) = crate::guard::protect() {
        if h.options.load(Relaxed) & OPT_VERBOSE != 0 {
            lwk_rt::diag!("LWK memory is not protected from the application: {}", why);
        }
    }
    crate::persist::set_selftest(h.selftest_restore.load(Relaxed));
    let mut opts = h.options.load(Relaxed);
    let part_page = open_partition_memory();
    let huge = match part_page {
        Some(page) => {
            // The partition's pages, and only those: no fallback.
            opts |= OPT_HUGE_REQUIRE;
            page == lwk_abi::layout::HUGE_PAGE_SIZE
        }
        None => opts & OPT_HUGE_OFF == 0 && huge_pages_available(),
    };
    if opts & OPT_HUGE_REQUIRE != 0 && !huge && part_page.is_none() {
        lwk_rt::diag!("no free 2 MiB huge pages (--hugepages require): reserve some in /proc/sys/vm/nr_hugepages");
        exit_group(125);
    }
    if let Err(e) =
        MM.lock().init(huge, opts & OPT_HUGE_REQUIRE != 0, opts & OPT_PREFAULT_ALL != 0, opts & OPT_VERBOSE != 0)
    {
        lwk_rt::diag!("cannot create the memory pool: {}", errno_text(e));
        exit_group(125);
    }
    if !huge && opts & OPT_HUGE_OFF == 0 && part_page.is_none() {
        MM.lock().note_fallback();
    }

    let mut argv = Argv { prefix: [&[]; MAX_PREFIX], n: 1, rest: 6 };
    argv.prefix[0] = st.arg(5);
    let execfn = st.arg(4);
    let mut path: &[u8] = execfn;
    let mut bufs = [[0u8; 258]; MAX_SHEBANG];
    let mut free_bufs = bufs.iter_mut();
    let mut pathz = [0u8; 4096];
    let mut depth = 0;
    let (fd, main) = loop {
        let fd = open_exec(path, &mut pathz).unwrap_or_else(|e| fail(path, "", e));
        let mut head = [0u8; 258];
        let n = pread(fd, &mut head[..256], 0);
        if n >= 2 && &head[..2] == b"#!" {
            if depth == MAX_SHEBANG {
                fail(path, "", LoadError { status: 126, reason: "too many levels of #! interpreters", errno: -ELOOP });
            }
            close(fd);
            let Some(buf) = free_bufs.next() else { exit_group(126) };
            buf.copy_from_slice(&head);
            let (interp, arg) = parse_shebang(buf, n as usize)
                .unwrap_or_else(|| fail(path, "", LoadError { status: 126, reason: "bad #! line", errno: -ENOEXEC }));
            // New argv: interpreter, optional argument, script path, old argv[1..].
            let mut p: [&[u8]; MAX_PREFIX] = [&[]; MAX_PREFIX];
            let mut k = 0;
            p[k] = interp;
            k += 1;
            if let Some(a) = arg {
                p[k] = a;
                k += 1;
            }
            p[k] = path;
            k += 1;
            for i in 1..argv.n {
                if k < MAX_PREFIX {
                    p[k] = argv.prefix[i];
                    k += 1;
                }
            }
            argv.prefix = p;
            argv.n = k;
            path = interp;
            depth += 1;
            continue;
        }
        crate::procfs::set_exe(fd, execfn);
        let mut mm = MM.lock();
        match elf::load(&mut mm, fd, false) {
            Ok(img) => break (fd, img),
            Err(e) => {
                drop(mm);
                fail(path, "", e)
            }
        }
    };
    let mut base = 0;
    let mut entry = main.entry;
    let mut ifd = -1;
    if main.interp_len > 0 {
        let ipath = &main.interp[..main.interp_len];
        ifd = open_exec(ipath, &mut pathz).unwrap_or_else(|e| fail(path, "cannot open ELF interpreter: ", e));
        let interp = elf::load(&mut MM.lock(), ifd, true).unwrap_or_else(|e| fail(ipath, "ELF interpreter: ", e));
        base = interp.bias;
        entry = interp.entry;
    }
    // The proxy maps the read-only segments from our descriptors: let it
    // do so before they close.
    delegate::sync();
    close(fd);
    if ifd >= 0 {
        close(ifd);
    }
    MM.lock().set_brk_start(main.end);

    let sp = build_stack(st, &argv, execfn, &main, base).unwrap_or_else(|e| {
        lwk_rt::diag!("cannot build the initial stack: {}", errno_text(e));
        exit_group(125)
    });
    if let Err(e) = trap::enable() {
        lwk_rt::diag!("cannot enable Syscall User Dispatch (needs Linux 5.11+): error {}", -e);
        exit_group(125);
    }
    control().stats.tsc_start.store(rdtsc(), Relaxed);
    h.started.store(1, Release);
    if exec {
        // execve keeps the signal mask the application had.
        let mask = h.exec_sigmask.load(Relaxed);
        // SAFETY: mask is our own word.
        unsafe { syscall6(nr::RT_SIGPROCMASK, 2, &mask as *const u64 as u64, 0, 8, 0, 0) };
        crate::signal::after_exec();
    }
    // SAFETY: entry and sp describe a fully loaded program and its stack.
    unsafe { jump(sp, entry, crate::guard::app_pkru()) }
}

/// In a partition, the directory its memory comes from: give it to the
/// memory manager; the partition's page size.
pub(crate) fn open_partition_memory() -> Option<u64> {
    let p = &control().header.partition;
    if !p.is_set() {
        return None;
    }
    let page = p.page_size.load(Relaxed);
    if page != lwk_abi::layout::PAGE_SIZE && page != lwk_abi::layout::HUGE_PAGE_SIZE {
        lwk_rt::diag!("the partition has pages of {} KiB; the LWK maps 4 KiB or 2 MiB pages", page >> 10);
        exit_group(125);
    }
    let mut path = [0u8; lwk_abi::control::PARTITION_PATH_WORDS * 8];
    p.mem_dir_into(&mut path);
    let fd = open(&path, O_PATH | O_DIRECTORY | O_CLOEXEC, 0);
    if fd < 0 {
        // SAFETY: mem_dir_into wrote a NUL-terminated path.
        let n = unsafe { strlen(path.as_ptr()) };
        let shown = core::str::from_utf8(&path[..n]).unwrap_or("?");
        lwk_rt::diag!("cannot open the partition's memory directory {}: {}", shown, errno_text(fd));
        exit_group(125);
    }
    MM.lock().set_partition(fd as i32, page);
    Some(page)
}

fn huge_pages_available() -> bool {
    let mut buf = [0u8; 32];
    let fd = open(b"/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages\0", O_RDONLY | O_CLOEXEC, 0);
    if fd < 0 {
        return false;
    }
    let n = pread(fd as i32, &mut buf, 0);
    close(fd as i32);
    n > 0 && parse_int(buf[..n as usize].trim_ascii()).unwrap_or(0) > 0
}

/// Open a program for loading, after checking it may be executed.
fn open_exec(path: &[u8], z: &mut [u8; 4096]) -> Result<i32, LoadError> {
    if path.len() >= z.len() {
        return Err(LoadError::io(-ENOENT));
    }
    z[..path.len()].copy_from_slice(path);
    z[path.len()] = 0;
    const X_OK: u64 = 1;
    // SAFETY: z is NUL-terminated.
    let r = unsafe { syscall6(nr::FACCESSAT, (-100i64) as u64, z.as_ptr() as u64, X_OK, 0, 0, 0) };
    if r < 0 {
        return Err(LoadError::io(r));
    }
    let fd = open(&z[..=path.len()], O_RDONLY | O_CLOEXEC, 0);
    if fd < 0 {
        return Err(LoadError::io(fd));
    }
    let mut st = [0u64; 18];
    // SAFETY: st is large enough for struct stat.
    unsafe { syscall3(nr::FSTAT, fd as u64, st.as_mut_ptr() as u64, 0) };
    const S_IFMT: u64 = 0o170000;
    const S_IFREG: u64 = 0o100000;
    if (st[3] & 0xffff_ffff) & S_IFMT != S_IFREG {
        close(fd as i32);
        return Err(LoadError { status: 126, reason: "", errno: -EACCES });
    }
    Ok(fd as i32)
}

/// Split "#!interp [arg]\n" as Linux does: one optional argument with the
/// rest of the line.
fn parse_shebang(buf: &mut [u8; 258], n: usize) -> Option<(&[u8], Option<&[u8]>)> {
    let line_end = buf[2..n].iter().position(|&c| c == b'\n').map(|p| p + 2).unwrap_or(n);
    let line = &buf[2..line_end];
    let is_ws = |c: &u8| *c == b' ' || *c == b'\t';
    let start = line.iter().position(|c| !is_ws(c))?;
    let line = &line[start..];
    let end = line.iter().rposition(|c| !is_ws(c))? + 1;
    let line = &line[..end];
    let split = line.iter().position(is_ws);
    let (interp, arg) = match split {
        None => (line, None),
        Some(i) => {
            let rest = &line[i..];
            let a = rest.iter().position(|c| !is_ws(c)).map(|j| &rest[j..]);
            (&line[..i], a)
        }
    };
    if interp.is_empty() {
        return None;
    }
    Some((interp, arg))
}

fn build_stack(st: &Startup, argv: &Argv, execfn: &[u8], main: &Image, base: u64) -> Result<u64, i64> {
    let mut lim = [0u64; 2];
    const RLIMIT_STACK: u64 = 3;
    // SAFETY: lim is the LWK's own.
    unsafe { syscall6(nr::PRLIMIT64, 0, RLIMIT_STACK, 0, lim.as_mut_ptr() as u64, 0, 0) };
    let size = if lim[0] == u64::MAX || lim[0] == 0 { 8 << 20 } else { page_up(lim[0]).clamp(256 << 10, 1 << 30) };
    // The top of the stack is pre-faulted; the rest of the rlimit (8 MiB
    // by default, which few programs use) is faulted in when touched:
    // pre-faulting all of it cost more than the rest of start-up together.
    const HOT: u64 = 256 << 10;
    let rw = (PROT_READ | PROT_WRITE) as u32;
    let hot = size.min(HOT);
    let mut mm = MM.lock();
    if size > hot {
        mm.map_anon_fixed(STACK_TOP - size, STACK_TOP - hot, rw, true)?;
    }
    mm.map_anon_fixed(STACK_TOP - hot, STACK_TOP, rw, false)?;
    drop(mm);

    let mut w = StackWriter::new();
    let random = st.aux(AT_RANDOM).unwrap_or(0);
    let mut rnd = [0u8; 16];
    if random != 0 {
        // SAFETY: AT_RANDOM points to 16 bytes on our own initial stack.
        rnd.copy_from_slice(unsafe { core::slice::from_raw_parts(random as *const u8, 16) });
    }
    let at_random = w.push_bytes(&rnd);
    let at_platform = w.push_cstr(b"x86_64");
    let at_execfn = w.push_cstr(execfn);

    let mut envc = 0;
    // SAFETY: envp is NULL-terminated.
    while unsafe { !(*st.envp.add(envc)).is_null() } {
        envc += 1;
    }
    let nargs = argv.n + st.argc.saturating_sub(argv.rest);
    // Strings first (highest), remember where the pointer arrays go.
    for i in (0..envc).rev() {
        // SAFETY: i < envc.
        let s = unsafe { cstr(*st.envp.add(i)) };
        w.push_cstr(s);
    }
    let env_strings = w.sp;
    for i in (argv.rest..st.argc).rev() {
        w.push_cstr(st.arg(i));
    }
    for i in (0..argv.n).rev() {
        w.push_cstr(argv.prefix[i]);
    }
    let arg_strings = w.sp;

    let mut aux: [[u64; 2]; 40] = [[0; 2]; 40];
    let mut na = 0;
    let mut put = |k: u64, v: u64| {
        if na < aux.len() - 1 {
            aux[na] = [k, v];
            na += 1;
        }
    };
    put(AT_PHDR, main.phdr);
    put(AT_PHENT, main.phent);
    put(AT_PHNUM, main.phnum);
    put(AT_BASE, base);
    put(AT_ENTRY, main.entry);
    put(AT_RANDOM, at_random);
    put(AT_PLATFORM, at_platform);
    put(AT_EXECFN, at_execfn);
    let mut p = st.auxv;
    // SAFETY: the kernel's auxv ends with AT_NULL.
    unsafe {
        while (*p)[0] != AT_NULL {
            let (k, v) = ((*p)[0], (*p)[1]);
            if !matches!(k, AT_PHDR | AT_PHENT | AT_PHNUM | AT_BASE | AT_ENTRY | AT_RANDOM | AT_PLATFORM | AT_EXECFN) {
                put(k, v);
            }
            p = p.add(1);
        }
    }
    put(AT_NULL, 0);

    let words = 1 + (nargs + 1) + (envc + 1) + 2 * na;
    let sp = ((w.sp & !15) - 8 * words as u64) & !15;
    let mut at = sp;
    let mut put_word = |v: u64| {
        // SAFETY: [sp, strings) is mapped stack memory below the strings.
        unsafe { (at as *mut u64).write(v) };
        at += 8;
    };
    put_word(nargs as u64);
    for s in [(arg_strings, nargs), (env_strings, envc)] {
        let (mut p, n) = s;
        for _ in 0..n {
            put_word(p);
            // SAFETY: the strings were just written, each NUL-terminated.
            p += unsafe { strlen(p as *const u8) } as u64 + 1;
        }
        put_word(0);
    }
    for pair in &aux[..na] {
        put_word(pair[0]);
        put_word(pair[1]);
    }
    Ok(sp)
}

/// Switch to the application's stack and enter it with clean registers.
///
/// # Safety
/// `sp` and `entry` describe a loaded program.
unsafe fn jump(sp: u64, entry: u64, pkru: Option<u32>) -> ! {
    // With protection keys, PKRU denies the LWK's key from the jump on; no
    // LWK memory is touched after it (sp and entry are in registers, the
    // stack is the application's).
    let (has_pkru, v) = (pkru.is_some() as u64, pkru.unwrap_or(0));
    // SAFETY: as documented; v denies only the LWK's key; rdx = 0 means no
    // exit handler for libc.
    unsafe {
        core::arch::asm!(
            "test r8, r8",
            "jz 2f",
            "wrpkru",
            "2:",
            "mov rsp, rdi",
            "xor eax, eax", "xor ebx, ebx", "xor ecx, ecx", "xor edx, edx",
            "xor ebp, ebp", "xor esi, esi", "xor edi, edi",
            "xor r8d, r8d", "xor r9d, r9d", "xor r10d, r10d", "xor r12d, r12d",
            "xor r13d, r13d", "xor r14d, r14d", "xor r15d, r15d",
            "jmp r11",
            in("eax") v, in("ecx") 0, in("edx") 0, in("r8") has_pkru,
            in("rdi") sp, in("r11") entry, options(noreturn)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shebang(line: &[u8]) -> Option<(Vec<u8>, Option<Vec<u8>>)> {
        let mut buf = [0u8; 258];
        buf[..line.len()].copy_from_slice(line);
        parse_shebang(&mut buf, line.len()).map(|(i, a)| (i.to_vec(), a.map(|a| a.to_vec())))
    }

    #[test]
    fn shebang_lines_split_as_linux_does() {
        assert_eq!(shebang(b"#!/bin/sh\necho"), Some((b"/bin/sh".to_vec(), None)));
        assert_eq!(shebang(b"#! /bin/sh -e \n"), Some((b"/bin/sh".to_vec(), Some(b"-e".to_vec()))));
        // Linux passes everything after the interpreter as one argument.
        assert_eq!(
            shebang(b"#!/usr/bin/env python3 -u\n"),
            Some((b"/usr/bin/env".to_vec(), Some(b"python3 -u".to_vec())))
        );
        assert_eq!(shebang(b"#!   \n"), None);
    }

    #[test]
    fn integers_parse_strictly() {
        assert_eq!(parse_int(b"42"), Some(42));
        assert_eq!(parse_int(b""), None);
        assert_eq!(parse_int(b"4x"), None);
        assert_eq!(parse_int(b"99999999999999999999999"), None);
    }
}
