//! `lwk run`: the supervisor. It checks the program, creates the control
//! region, starts the proxy and the application process from the LWK image,
//! waits for them, and reports the application's exit exactly as a shell
//! would see it natively (a death by signal is re-raised on itself).

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicI32, AtomicPtr, AtomicU32, Ordering};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use lwk_abi::control::{
    Control, CONTROL_MAGIC, CONTROL_SIZE, OPT_HUGE_OFF, OPT_HUGE_REQUIRE, OPT_PREFAULT_ALL, OPT_VERBOSE,
};

use lwk_node::relay::{Handed, Handoff};

use crate::stats::Report;
use crate::{HugePages, RunArgs};

/// Why a program cannot be started, with the status a shell would give.
pub struct NotRunnable {
    pub status: i32,
    pub message: String,
}

fn not_runnable(status: i32, path: &OsStr, why: &str) -> NotRunnable {
    NotRunnable { status, message: format!("{}: {}", path.to_string_lossy(), why) }
}

/// Find PROGRAM as execvp would and check that the LWK can run it.
pub fn resolve(prog: &OsStr) -> Result<PathBuf, NotRunnable> {
    if prog.is_empty() {
        return Err(not_runnable(127, prog, "No such file or directory"));
    }
    let path = if prog.as_bytes().contains(&b'/') {
        PathBuf::from(prog)
    } else {
        let search = std::env::var_os("PATH").unwrap_or_else(|| OsString::from("/usr/local/bin:/usr/bin:/bin"));
        let mut denied = None;
        let mut found = None;
        for dir in std::env::split_paths(&search) {
            let cand = if dir.as_os_str().is_empty() { PathBuf::from(prog) } else { dir.join(prog) };
            match std::fs::metadata(&cand) {
                Ok(m) if m.is_file() && is_executable(&cand) => {
                    found = Some(cand);
                    break;
                }
                Ok(_) => denied = denied.or(Some(cand)),
                Err(_) => {}
            }
        }
        match (found, denied) {
            (Some(p), _) => p,
            (None, Some(p)) => p,
            (None, None) => return Err(not_runnable(127, prog, "command not found")),
        }
    };
    check(&path)?;
    Ok(path)
}

fn is_executable(p: &Path) -> bool {
    rustix::fs::access(p, rustix::fs::Access::EXEC_OK).is_ok()
}

fn check(path: &Path) -> Result<(), NotRunnable> {
    let p = path.as_os_str();
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(not_runnable(127, p, "No such file or directory"))
        }
        Err(e) => return Err(not_runnable(126, p, &e.to_string())),
    };
    if meta.is_dir() {
        return Err(not_runnable(126, p, "Is a directory"));
    }
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 || !is_executable(path) {
        return Err(not_runnable(126, p, "Permission denied"));
    }
    let mut head = [0u8; 64];
    let n = File::open(path).and_then(|mut f| f.read(&mut head)).map_err(|e| not_runnable(126, p, &e.to_string()))?;
    let head = &head[..n];
    if head.starts_with(b"#!") {
        return Ok(());
    }
    if !head.starts_with(b"\x7fELF") {
        return Err(not_runnable(126, p, "not an ELF executable and no #! line (Exec format error)"));
    }
    // The LWK's own check, so that lwk run refuses early exactly what the
    // loader would.
    let mut h = [0u8; 64];
    h[..head.len()].copy_from_slice(head);
    lwk_kernel::elf::check_header(&h).map_err(|e| not_runnable(126, p, e.reason))?;
    Ok(())
}

/// The LWK image: `lwk-kernel` next to this binary, or $LWK_KERNEL.
pub(crate) fn kernel_image() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("LWK_KERNEL") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("cannot find the lwk binary's own path")?;
    let img = exe.with_file_name("lwk-kernel");
    if !img.exists() {
        bail!("the LWK image {} is missing (build the whole workspace: cargo build)", img.display());
    }
    Ok(img)
}

/// The control region, mapped in the supervisor too.
pub struct ControlRegion {
    pub(crate) fd: OwnedFd,
    ptr: *mut Control,
}

impl ControlRegion {
    pub(crate) fn create(options: u64, spin_cycles: u64) -> Result<Self> {
        use rustix::fs::{ftruncate, memfd_create, MemfdFlags};
        use rustix::mm::{mmap, MapFlags, ProtFlags};
        let fd = memfd_create("lwk-control", MemfdFlags::CLOEXEC).context("memfd_create for the control region")?;
        ftruncate(&fd, CONTROL_SIZE as u64).context("sizing the control region")?;
        // SAFETY: a fresh shared mapping of our own memfd.
        let ptr = unsafe {
            mmap(std::ptr::null_mut(), CONTROL_SIZE, ProtFlags::READ | ProtFlags::WRITE, MapFlags::SHARED, &fd, 0)
        }
        .context("mapping the control region")? as *mut Control;
        let region = ControlRegion { fd, ptr };
        let h = &region.get().header;
        h.options.store(options, Ordering::Relaxed);
        h.spin_cycles.store(spin_cycles, Ordering::Relaxed);
        h.parent_pid.store(rustix::process::getppid().map_or(0, |p| p.as_raw_nonzero().get()), Ordering::Relaxed);
        h.supervisor_pid.store(rustix::process::getpid().as_raw_nonzero().get(), Ordering::Relaxed);
        h.memfd[0].store(-1, Ordering::Relaxed);
        h.memfd[1].store(-1, Ordering::Relaxed);
        h.magic.store(CONTROL_MAGIC, Ordering::Release);
        Ok(region)
    }

    pub fn get(&self) -> &Control {
        // SAFETY: mapped for the life of self; Control is all atomics.
        unsafe { &*self.ptr }
    }
}

impl Drop for ControlRegion {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping; no references outlive self.
        unsafe { rustix::mm::munmap(self.ptr.cast(), CONTROL_SIZE).ok() };
    }
}

/// Start the LWK image in `mode`, passing down `ctl_fd` (a descriptor
/// without close-on-exec). Without a partition no code runs between fork
/// and exec, so std can use posix_spawn; the image itself arranges to die
/// with the supervisor.
pub(crate) fn spawn(
    kernel: &Path,
    argv0: &OsStr,
    mode: &str,
    ctl_fd: i32,
    rest: &[&OsStr],
    part: Option<&InPartition>,
) -> Result<Child> {
    let mut cmd = Command::new(kernel);
    cmd.arg0(argv0).arg(mode).arg(ctl_fd.to_string()).args(rest);
    if let Some(p) = part {
        // Into the partition's cpuset before the image runs, so that the
        // LWK can pin each thread to one of its CPUs. `lwk run` has no
        // other thread, so the child may allocate here.
        let procs = p.procs_file.try_clone().context("duplicating the partition's cgroup.procs descriptor")?;
        // SAFETY: only a write(2) to an open descriptor runs in the child.
        unsafe {
            cmd.pre_exec(move || {
                use std::io::Write;
                (&procs).write_all(b"0")
            })
        };
    }
    cmd.spawn().with_context(|| format!("cannot start the LWK image {}", kernel.display()))
}

/// A run in a partition: the partition held for this run (a second
/// `lwk run` gets "busy"), its cpuset's cgroup.procs open for the
/// application process.
pub struct InPartition {
    pub(crate) part: lwk_partition::Partition,
    _lock: lwk_partition::RunLock,
    pub(crate) procs_file: File,
}

impl InPartition {
    pub(crate) fn enter(name: &str) -> Result<Self> {
        let part = lwk_partition::open(name)?;
        if part.page_size > lwk_abi::layout::HUGE_PAGE_SIZE {
            bail!(
                "partition {name} has 1 GiB pages, which lwk run cannot use yet (it maps memory in 2 MiB pieces): \
                 create it with --hugepages 2M or none"
            );
        }
        if part.cpus.is_empty() {
            bail!("partition {name} has no CPUs");
        }
        let lock = part.lock_for_run()?;
        let procs = part.cgroup_dir.join("cgroup.procs");
        let procs_file = std::fs::OpenOptions::new()
            .write(true)
            .open(&procs)
            .with_context(|| format!("cannot open {} of partition {name}", procs.display()))?;
        // The supervisor, and so the proxy and its workers, run on the
        // Linux CPUs.
        if !part.linux_cpus.is_empty() {
            // SAFETY: a plain cpu_set_t of ours, for this process.
            let r = unsafe {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                part.linux_cpus.iter().for_each(|&c| libc::CPU_SET(c, &mut set));
                libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set)
            };
            if r != 0 {
                let e = std::io::Error::last_os_error();
                bail!("cannot move lwk run to the Linux CPUs {:?}: {e}", part.linux_cpus);
            }
        }
        Ok(InPartition { part, _lock: lock, procs_file })
    }

    fn describe(&self) -> String {
        format!(
            "partition {}: CPUs {:?}, {} MiB on {} KiB pages",
            self.part.name,
            self.part.cpus,
            self.part.mem_bytes >> 20,
            self.part.page_size >> 10
        )
    }
}

pub(crate) static APP_PID: AtomicI32 = AtomicI32::new(0);
/// Once the application moved to another node: the control region's
/// `migrated` word, and the pipe on which signals go to its relay.
static MIGRATED: AtomicPtr<AtomicU32> = AtomicPtr::new(std::ptr::null_mut());
static RELAY_SIGNALS: AtomicI32 = AtomicI32::new(-1);
/// SIGINT and SIGQUIT were ignored when `lwk run` started (bit per signal).
static IGNORED_ON_ENTRY: AtomicU32 = AtomicU32::new(0);

/// Forward a signal to the application. If it waits for a delegated call,
/// its LWK interrupts that call's proxy worker and the signal is delivered
/// as natively. Once it moved to another node, the signal goes there.
extern "C" fn forward_signal(sig: libc::c_int) {
    let migrated = MIGRATED.load(Ordering::Relaxed);
    // SAFETY: set from the control region, mapped for our whole life.
    if !migrated.is_null() && unsafe { (*migrated).load(Ordering::SeqCst) } != 0 {
        let byte = sig as u8;
        // SAFETY: write is async-signal-safe; the pipe is ours.
        unsafe { libc::write(RELAY_SIGNALS.load(Ordering::Relaxed), (&byte as *const u8).cast(), 1) };
        return;
    }
    let app = APP_PID.load(Ordering::Relaxed);
    if app > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe { libc::kill(app, sig) };
    }
}

/// Terminal signals reach the application through its process group;
/// the supervisor survives them to report the exit. Signals sent to the
/// supervisor's pid are forwarded to the application. Called after both
/// children exist, so they inherit the dispositions `lwk run` was started
/// with (a shell ignores SIGINT for background jobs, and so must they).
pub(crate) fn setup_signals() {
    // SAFETY: changing our own dispositions; no other thread exists.
    unsafe {
        let mut ignored = 0;
        for (bit, sig) in [(1, libc::SIGINT), (2, libc::SIGQUIT)] {
            if libc::signal(sig, libc::SIG_IGN) == libc::SIG_IGN {
                ignored |= bit;
            }
        }
        IGNORED_ON_ENTRY.store(ignored, Ordering::Relaxed);
        for sig in [libc::SIGTERM, libc::SIGHUP, libc::SIGUSR1, libc::SIGUSR2] {
            if libc::signal(sig, forward_signal as *const () as libc::sighandler_t) == libc::SIG_IGN {
                libc::signal(sig, libc::SIG_IGN); // ignored on entry: stays ignored
            }
        }
    }
}

/// A supervisor standing for its application wherever it runs: it
/// publishes the end of a hand-over socket in the control region, on
/// which a migration gives it the connection to the destination
/// ([`lwk_node::relay`]), and waits there.
pub(crate) struct Standing {
    _handoff: Handoff,
    waiting: std::thread::JoinHandle<std::io::Result<Handed>>,
    signals: OwnedFd,
}

impl Standing {
    /// Called once both children exist (it starts a thread).
    pub(crate) fn start(region: &ControlRegion) -> Result<Standing> {
        let handoff = Handoff::new().context("a socket pair for the relay")?;
        let mine = handoff.receiver().context("a socket pair for the relay")?;
        let waiting = std::thread::spawn(move || lwk_node::relay::receive(&mine));
        let (signals, to_relay) =
            rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).context("a pipe for the relay's signals")?;
        RELAY_SIGNALS.store(std::mem::ManuallyDrop::new(to_relay).as_raw_fd(), Ordering::Relaxed);
        let h = &region.get().header;
        MIGRATED.store(std::ptr::from_ref(&h.migrated).cast_mut(), Ordering::Relaxed);
        h.relay_fd.store(handoff.published() + 1, Ordering::SeqCst);
        Ok(Standing { _handoff: handoff, waiting, signals })
    }

    /// How the application ended: `here` (its process here ended so), or,
    /// if it moved to another node, as it ends there, standing for it
    /// until then.
    pub(crate) fn outcome(self, region: &ControlRegion, here: ExitStatus) -> Result<ExitStatus> {
        if region.get().header.migrated.load(Ordering::SeqCst) == 0 {
            return Ok(here);
        }
        // The hand-over came before the word was set.
        let t0 = Instant::now();
        while !self.waiting.is_finished() {
            if t0.elapsed() > std::time::Duration::from_secs(5) {
                bail!("the application moved to another node, but its relay never came");
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let handed = self.waiting.join().expect("no panic").context("receiving the relay")?;
        // Terminal signals no longer reach it through the process group:
        // they go to it as the others do.
        let ignored = IGNORED_ON_ENTRY.load(Ordering::Relaxed);
        for (bit, sig) in [(1, libc::SIGINT), (2, libc::SIGQUIT)] {
            if ignored & bit == 0 {
                // SAFETY: changing our own disposition to our handler.
                unsafe { libc::signal(sig, forward_signal as *const () as libc::sighandler_t) };
            }
        }
        lwk_node::relay::stand_for(handed, Some(self.signals)).map_err(anyhow::Error::msg)
    }
}

pub(crate) fn spin_cycles() -> u64 {
    if let Some(v) = std::env::var("LWK_SPIN_CYCLES").ok().and_then(|v| v.parse().ok()) {
        return v;
    }
    // Spinning only helps when the proxy has a CPU of its own.
    match std::thread::available_parallelism() {
        Ok(n) if n.get() > 1 => 300_000,
        _ => 2_000,
    }
}

pub fn run(args: RunArgs) -> Result<i32> {
    let (prog, rest) = args.command.split_first().context("no program given")?;
    if lwk_node::drain::drained().is_some() {
        eprintln!("lwk: {}", lwk_node::drain::refusal());
        return Ok(125);
    }
    let path = match resolve(prog) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("lwk: {}", e.message);
            return Ok(e.status);
        }
    };
    let kernel = kernel_image()?;
    let mut options = match args.hugepages {
        HugePages::Auto => 0,
        HugePages::Require => OPT_HUGE_REQUIRE,
        HugePages::Off => OPT_HUGE_OFF,
    };
    if args.verbose {
        options |= OPT_VERBOSE;
    }
    if args.prefault_all {
        options |= OPT_PREFAULT_ALL;
    }
    let part = match &args.partition {
        Some(name) => Some(InPartition::enter(name)?),
        None => None,
    };
    let region = ControlRegion::create(options, spin_cycles())?;
    region.get().header.selftest_restore.store(args.selftest_restore, Ordering::Relaxed);
    if let Some(p) = &part {
        let dir = p.part.mem_dir.as_os_str().as_bytes();
        if !region.get().header.partition.set(&p.part.cpus, p.part.page_size, dir) {
            bail!("partition {}: its CPU numbers or memory path do not fit the LWK's control region", p.part.name);
        }
        if args.verbose {
            eprintln!("lwk: {}", p.describe());
        }
    }

    // The children's copy of the control descriptor: not close-on-exec.
    // SAFETY: duplicating our own descriptor; closed after both spawns.
    let ctl_fd = unsafe { libc::fcntl(region.fd.as_raw_fd(), libc::F_DUPFD, 3) };
    if ctl_fd < 0 {
        bail!("cannot pass the control region on: {}", std::io::Error::last_os_error());
    }
    // SAFETY: ctl_fd is ours alone from here.
    let ctl_fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(ctl_fd) };
    let t0 = Instant::now();
    let tsc0 = rdtsc();
    let mut proxy = spawn(&kernel, OsStr::new("lwk-proxy"), "proxy", ctl_fd.as_raw_fd(), &[], None)?;
    let mut app_args: Vec<&OsStr> = vec![OsStr::new("-"), path.as_os_str(), prog.as_os_str()];
    app_args.extend(rest.iter().map(|s| s.as_os_str()));
    let app = match spawn(&kernel, prog, "app", ctl_fd.as_raw_fd(), &app_args, part.as_ref()) {
        Ok(c) => c,
        Err(e) => {
            proxy.kill().ok();
            proxy.wait().ok();
            return Err(e);
        }
    };
    drop(ctl_fd);
    APP_PID.store(app.id() as i32, Ordering::Relaxed);
    setup_signals();
    let standing = Standing::start(&region)?;
    if let Some(p) = &part {
        let what = format!("pid {} {}", app.id(), path.display());
        p.part.log_event("started", &what).ok();
    }
    let mut outcome = wait_both(app.id() as i32, proxy.id() as i32)?;
    outcome.status = standing.outcome(&region, outcome.status)?;
    if let Some(p) = &part {
        let how = match outcome.status {
            ExitStatus::Code(c) => format!("pid {} status {c}", app.id()),
            ExitStatus::Signal(s) => format!("pid {} killed by signal {s}", app.id()),
        };
        p.part.log_event("exited", &how).ok();
    }
    let elapsed = t0.elapsed();
    let tsc1 = rdtsc();
    APP_PID.store(0, Ordering::Relaxed);

    if args.stats || args.stats_json.is_some() {
        let hz = tsc_hz(tsc0, tsc1, elapsed.as_secs_f64());
        let report = Report::collect(region.get(), hz, elapsed, &path, outcome.status);
        if args.stats {
            eprint!("{}", report.text());
        }
        if let Some(file) = &args.stats_json {
            std::fs::write(file, report.json()?)
                .with_context(|| format!("writing statistics to {}", file.display()))?;
        }
    }
    if let Some(e) = outcome.proxy_failure {
        bail!("the proxy process failed ({e}); the application was stopped");
    }
    Ok(match outcome.status {
        ExitStatus::Code(c) => c,
        ExitStatus::Signal(sig) => reraise(sig),
    })
}

/// How the application ended: the relay's word for it too.
pub use lwk_node::relay::Exit as ExitStatus;

pub(crate) struct Outcome {
    pub(crate) status: ExitStatus,
    pub(crate) proxy_failure: Option<String>,
}

fn decode(status: i32) -> ExitStatus {
    ExitStatus::from_wait(std::os::unix::process::ExitStatusExt::from_raw(status))
}

/// Wait for the application; the proxy goes when it goes. If the proxy dies
/// first, the application cannot continue: stop it.
pub(crate) fn wait_both(app_pid: i32, proxy_pid: i32) -> Result<Outcome> {
    let mut app_status = None;
    let mut proxy_failure = None;
    let mut proxy_alive = true;
    while app_status.is_none() || proxy_alive {
        let mut status = 0;
        // SAFETY: plain waitpid on our own children.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e).context("waiting for the application");
        }
        if pid == app_pid {
            app_status = Some(decode(status));
            // SAFETY: signalling our own child.
            unsafe { libc::kill(proxy_pid, libc::SIGKILL) };
        } else if pid == proxy_pid {
            proxy_alive = false;
            // The proxy ends itself when the application ends; only a proxy
            // gone while the application still runs is a failure.
            if app_status.is_none() && !has_terminated(app_pid) {
                proxy_failure = Some(match decode(status) {
                    ExitStatus::Code(c) => format!("exited with status {c}"),
                    ExitStatus::Signal(s) => format!("killed by signal {s}"),
                });
                // SAFETY: signalling our own child.
                unsafe { libc::kill(app_pid, libc::SIGKILL) };
            }
        }
    }
    Ok(Outcome { status: app_status.unwrap_or(ExitStatus::Code(125)), proxy_failure })
}

/// Has `pid` (our child) terminated? Leaves it to be reaped.
pub(crate) fn has_terminated(pid: i32) -> bool {
    // SAFETY: waitid with WNOWAIT only looks; info is ours.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        let r = libc::waitid(libc::P_PID, pid as libc::id_t, &mut info, libc::WEXITED | libc::WNOHANG | libc::WNOWAIT);
        r == 0 && info.si_pid() != 0
    }
}

/// Die of the same signal as the application, so the calling shell sees
/// what it would see natively; without a core dump of our own.
pub(crate) fn reraise(sig: i32) -> i32 {
    // SAFETY: resetting our own dispositions and signalling ourselves.
    unsafe {
        let rl = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        libc::setrlimit(libc::RLIMIT_CORE, &rl);
        libc::signal(sig, libc::SIG_DFL);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, sig);
        libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        libc::kill(libc::getpid(), sig);
    }
    128 + sig
}

fn rdtsc() -> u64 {
    // SAFETY: rdtsc has no memory effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// TSC frequency from the run itself; short runs get a short calibration.
fn tsc_hz(tsc0: u64, tsc1: u64, secs: f64) -> f64 {
    if secs >= 0.05 {
        return (tsc1 - tsc0) as f64 / secs;
    }
    let (t, c) = (Instant::now(), rdtsc());
    std::thread::sleep(std::time::Duration::from_millis(50));
    (rdtsc() - c) as f64 / t.elapsed().as_secs_f64()
}
