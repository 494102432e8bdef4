//! An lwk application seen from outside: found by pid, attached through its
//! control region, frozen and resumed (the requester's half of the
//! protocol in `lwk_kernel::freeze`).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use std::time::{Duration, Instant};

use lwk_abi::control::{
    Control, CONTROL_MAGIC, CONTROL_SIZE, FREEZE_FAILED, FREEZE_FROZEN, FREEZE_NONE, FREEZE_REQUESTED, FREEZE_RESUME,
    FREEZE_TAKEN,
};
use lwk_kernel::freeze::{FreezeExport, EXPORT_MAGIC, EXPORT_SIZE, EXPORT_VERSION, FREEZE_COOKIE};

/// The LWK's own signal (SIGRTMAX), with which a freeze is asked for.
const SIGLWK: i32 = 64;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("process {0} does not exist")]
    NoSuchProcess(i32),
    #[error("process {0} is not an lwk application (no lwk control region among its descriptors)")]
    NotLwk(i32),
    #[error("cannot {what} of process {pid}: {source}")]
    Sys { what: &'static str, pid: i32, source: std::io::Error },
    #[error("the control region of process {0} has the wrong magic (another lwk build?)")]
    BadControl(i32),
    #[error("a freeze of process {0} is already under way")]
    Busy(i32),
    #[error("process {pid} did not answer the freeze request within {ms} ms")]
    NoAnswer { pid: i32, ms: u128 },
    #[error("the freeze of process {pid} failed: {}; the application goes on", std::io::Error::from_raw_os_error(*.errno))]
    FreezeFailed { pid: i32, errno: i32 },
    #[error("the state process {0} exported is not one this lwk reads (magic or version)")]
    BadExport(i32),
    #[error("process {pid} did not resume within {ms} ms")]
    NoResume { pid: i32, ms: u128 },
    #[error("the process tree of {pid}: {what}")]
    Tree { pid: i32, what: String },
}

type Result<T> = std::result::Result<T, AppError>;

fn sys(what: &'static str, pid: i32) -> impl FnOnce(std::io::Error) -> AppError {
    move |source| AppError::Sys { what, pid, source }
}

/// A read-write shared mapping of a file, unmapped on drop.
struct Mapping {
    ptr: *mut libc::c_void,
    len: usize,
}

impl Mapping {
    fn new(file: &File, len: usize, writable: bool) -> std::io::Result<Mapping> {
        let prot = if writable { libc::PROT_READ | libc::PROT_WRITE } else { libc::PROT_READ };
        // SAFETY: a fresh shared mapping of an open file, at an address
        // the kernel chooses.
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, file.as_raw_fd(), 0) };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Mapping { ptr, len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: our own mapping; nothing borrowed from it outlives self.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

/// An lwk application process, attached through its control region.
pub struct App {
    /// The application process (the one that runs the program), as this
    /// process sees it (a restored application runs in a pid namespace of
    /// its own, where its pid is another).
    pub pid: i32,
    control: Mapping,
}

// SAFETY: the control region is atomics only, shared by design.
unsafe impl Send for App {}

impl App {
    /// Attach to the application whose application process, or whose
    /// `lwk run`, is `pid`.
    pub fn attach(pid: i32) -> Result<App> {
        let dir = PathBuf::from(format!("/proc/{pid}/fd"));
        let entries = std::fs::read_dir(&dir).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => AppError::NoSuchProcess(pid),
            _ => AppError::Sys { what: "list the descriptors", pid, source: e },
        })?;
        // An application process holds its own region, and while it forks
        // also its child's; `lwk run` holds the one of its application;
        // `lwk restore` of a process tree holds one per process, and stands
        // for the one that is its child (the tree's first).
        let kids = children(pid);
        let mut found: Option<App> = None;
        for e in entries.flatten() {
            let Ok(target) = std::fs::read_link(e.path()) else { continue };
            if !target.to_string_lossy().starts_with("/memfd:lwk-control") {
                continue;
            }
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(e.path())
                .map_err(sys("open the control region", pid))?;
            let control = Mapping::new(&file, CONTROL_SIZE, true).map_err(sys("map the control region", pid))?;
            let mut app = App { pid, control };
            if app.control().header.magic.load(SeqCst) != CONTROL_MAGIC {
                return Err(AppError::BadControl(pid));
            }
            let app_pid = app.control().header.app_pid.load(SeqCst);
            if app_pid == pid || (app_pid > 0 && pid_in_namespace(pid) == Some(app_pid)) {
                return Ok(app); // the application process itself
            }
            // `lwk run` or `lwk restore`: the application is its child
            // (whose pid in its own namespace the region holds).
            if let Some(&child) = kids.iter().find(|&&c| app_pid > 0 && pid_in_namespace(c) == Some(app_pid)) {
                app.pid = child;
                return Ok(app);
            }
            if found.is_none() {
                if app_pid > 0 {
                    app.pid = app_pid;
                }
                found = Some(app);
            }
        }
        found.ok_or(AppError::NotLwk(pid))
    }

    pub fn control(&self) -> &Control {
        // SAFETY: mapped for the life of self; Control is atomics and
        // plain data shared by design.
        unsafe { &*(self.control.ptr as *const Control) }
    }

    /// The proxy process that holds the application's descriptors, as this
    /// process sees it (the region holds its pid in the application's pid
    /// namespace).
    pub fn proxy_pid(&self) -> i32 {
        let in_ns = self.control().header.proxy_pid.load(SeqCst);
        if pid_in_namespace(self.pid) == Some(self.pid) {
            return in_ns; // no namespace of its own
        }
        let Ok(ns) = std::fs::read_link(format!("/proc/{}/ns/pid", self.pid)) else { return in_ns };
        let Ok(dir) = std::fs::read_dir("/proc") else { return in_ns };
        dir.flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .find(|&p| {
                pid_in_namespace(p) == Some(in_ns)
                    && std::fs::read_link(format!("/proc/{p}/ns/pid")).ok() == Some(ns.clone())
            })
            .unwrap_or(in_ns)
    }

    /// The application's threads, by tid.
    pub fn threads(&self) -> Result<Vec<i32>> {
        let dir = std::fs::read_dir(format!("/proc/{}/task", self.pid)).map_err(sys("list the threads", self.pid))?;
        Ok(dir.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect())
    }

    /// Freeze the application: every thread parked in the LWK, its whole
    /// state exported. It goes on when the returned [`Frozen`] is resumed
    /// or dropped.
    pub fn freeze(&self, answer_within: Duration) -> Result<Frozen<'_>> {
        let h = &self.control().header;
        // The heartbeat goes from the request on: the freezer may take the
        // request at once.
        let beat = Heartbeat::start(self);
        let took = [FREEZE_NONE, FREEZE_FAILED]
            .iter()
            .any(|&from| h.freeze.compare_exchange(from, FREEZE_REQUESTED, SeqCst, SeqCst).is_ok());
        if !took {
            return Err(AppError::Busy(self.pid));
        }
        for tid in self.threads()? {
            // Threads of the LWK's own (which block every signal) keep it
            // pending, harmlessly.
            queue_signal(self.pid, tid, FREEZE_COOKIE);
        }
        let start = Instant::now();
        loop {
            match h.freeze.load(SeqCst) {
                FREEZE_FROZEN => break,
                FREEZE_FAILED => {
                    let errno = h.freeze_error.load(SeqCst);
                    let _ = h.freeze.compare_exchange(FREEZE_FAILED, FREEZE_NONE, SeqCst, SeqCst);
                    return Err(AppError::FreezeFailed { pid: self.pid, errno });
                }
                FREEZE_REQUESTED if start.elapsed() > answer_within => {
                    // Nobody took it: take it back (unless it was taken
                    // just now).
                    if h.freeze.compare_exchange(FREEZE_REQUESTED, FREEZE_NONE, SeqCst, SeqCst).is_ok() {
                        return Err(AppError::NoAnswer { pid: self.pid, ms: answer_within.as_millis() });
                    }
                }
                FREEZE_REQUESTED | FREEZE_TAKEN => {}
                _ => return Err(AppError::NoAnswer { pid: self.pid, ms: start.elapsed().as_millis() }),
            }
            futex_wait(&h.freeze, h.freeze.load(SeqCst), Duration::from_millis(10));
        }
        let fd = h.freeze_fd.load(SeqCst);
        // From here, a failure resumes the application (Drop).
        let mut frozen = Frozen { app: self, export: None, resumed: false, heartbeat: Some(beat) };
        let file =
            File::open(format!("/proc/{}/fd/{fd}", self.pid)).map_err(sys("open the exported state", self.pid))?;
        let export =
            Mapping::new(&file, EXPORT_SIZE as usize, false).map_err(sys("map the exported state", self.pid))?;
        frozen.export = Some(export);
        let x = frozen.export();
        if x.magic != EXPORT_MAGIC || x.version != EXPORT_VERSION {
            return Err(AppError::BadExport(self.pid));
        }
        Ok(frozen)
    }
}

/// A frozen application: its threads parked, its state readable. Dropped
/// without [`Frozen::resume`], it resumes (and ignores errors).
pub struct Frozen<'a> {
    pub app: &'a App,
    export: Option<Mapping>,
    resumed: bool,
    /// Keeps the freeze alive: the LWK undoes a freeze whose requester
    /// stops beating.
    heartbeat: Option<Heartbeat>,
}

/// A thread that bumps the control region's `freeze_heartbeat` every
/// 50 ms until dropped.
struct Heartbeat {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Heartbeat {
    fn start(app: &App) -> Heartbeat {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        // The word lives in the App's mapping, which outlives the heartbeat
        // (dropped with the Frozen that borrows the App).
        let word = &app.control().header.freeze_heartbeat as *const std::sync::atomic::AtomicU64 as usize;
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(SeqCst) {
                // SAFETY: see above: mapped until this thread is joined.
                unsafe { &*(word as *const std::sync::atomic::AtomicU64) }.fetch_add(1, SeqCst);
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        Heartbeat { stop, thread: Some(thread) }
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.stop.store(true, SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Frozen<'_> {
    /// The LWK's whole state and every thread's context.
    pub fn export(&self) -> &FreezeExport {
        let m = self.export.as_ref().expect("mapped while frozen");
        // SAFETY: a read-only mapping of EXPORT_SIZE bytes that the LWK
        // wrote before it said FREEZE_FROZEN and does not change until the
        // resume. FreezeExport is plain data; its magic and version were
        // checked.
        unsafe { &*(m.ptr as *const FreezeExport) }
    }

    /// Let the application go on; returns when its threads run again.
    pub fn resume(mut self) -> Result<()> {
        self.resume_inner()
    }

    /// End the application where it stands (it runs elsewhere now, or its
    /// image is all that is wanted): SIGKILL, no resume.
    pub fn kill(mut self) {
        self.resumed = true;
        self.export = None;
        // SAFETY: plain kill of the application process.
        unsafe { libc::kill(self.app.pid, libc::SIGKILL) };
    }

    fn resume_inner(&mut self) -> Result<()> {
        if self.resumed {
            return Ok(());
        }
        self.resumed = true;
        self.export = None;
        let h = &self.app.control().header;
        h.freeze.store(FREEZE_RESUME, SeqCst);
        futex_wake(&h.freeze);
        self.heartbeat = None;
        let start = Instant::now();
        let limit = Duration::from_secs(5);
        while h.freeze.load(SeqCst) == FREEZE_RESUME {
            if start.elapsed() > limit {
                return Err(AppError::NoResume { pid: self.app.pid, ms: limit.as_millis() });
            }
            futex_wait(&h.freeze, FREEZE_RESUME, Duration::from_millis(10));
        }
        Ok(())
    }
}

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        let _ = self.resume_inner();
    }
}

/// Queue SIGLWK with `value` to thread `tid` of process `pid`.
fn queue_signal(pid: i32, tid: i32, value: u64) {
    // siginfo_t: signo, errno, code; then pid and uid; the value at 24.
    let mut info = [0u64; 16];
    info[0] = SIGLWK as u64;
    info[1] = (-1i32) as u32 as u64; // SI_QUEUE
                                     // SAFETY: plain getuid.
    info[2] = std::process::id() as u64 | (unsafe { libc::getuid() } as u64) << 32;
    info[3] = value;
    // SAFETY: rt_tgsigqueueinfo with a siginfo of ours.
    unsafe { libc::syscall(libc::SYS_rt_tgsigqueueinfo, pid, tid, SIGLWK, info.as_ptr()) };
}

/// Sleep while `*word == val`, at most `limit` (a shared futex: the word is
/// in the application's control region).
fn futex_wait(word: &AtomicU32, val: u32, limit: Duration) {
    let ts = libc::timespec { tv_sec: limit.as_secs() as i64, tv_nsec: limit.subsec_nanos() as i64 };
    // SAFETY: the word is mapped for the duration of the call.
    unsafe { libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAIT, val, &ts as *const libc::timespec) };
}

fn futex_wake(word: &AtomicU32) {
    // SAFETY: as above.
    unsafe { libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, i32::MAX) };
}

/// What `lwk ps` shows of one application process.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AppInfo {
    /// The application process.
    pub pid: i32,
    /// Its proxy, which holds its descriptors.
    pub proxy_pid: i32,
    /// The process that started it: `lwk run` for the first process of an
    /// application, the forking application process for a forked one.
    pub parent_pid: i32,
    /// The command line (arguments joined by spaces).
    pub command: String,
    /// Application memory mapped now, bytes.
    pub memory_bytes: u64,
    /// Of which on 2 MiB pages.
    pub huge_bytes: u64,
    /// Linux threads of the application process.
    pub threads: usize,
    /// The proxy's descriptors by kind (file, directory, pipe, socket,
    /// eventfd, timerfd, epoll, signalfd, device, other).
    pub descriptors: std::collections::BTreeMap<String, usize>,
    /// Established TCP connections among them.
    pub tcp_established: usize,
}

impl App {
    /// Every lwk application process on this machine that this user may
    /// look at, by pid.
    pub fn list() -> Vec<App> {
        let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
        let mut pids: Vec<i32> = dir.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect();
        pids.sort_unstable();
        // The application process itself, not its `lwk run` or its proxy
        // (which hold the same region).
        pids.into_iter().filter_map(|pid| App::attach(pid).ok().filter(|a| a.pid == pid)).collect()
    }

    /// What `lwk ps` shows of it.
    pub fn info(&self) -> AppInfo {
        let h = &self.control().header;
        let s = &self.control().stats;
        // The image's command line: ARGV0 app|exec CTLFD DIAGFD PATH
        // ARGV0 ARGS... (boot::app_main); the program's is from the 6th on.
        let args: Vec<String> = std::fs::read(format!("/proc/{}/cmdline", self.pid))
            .map(|b| b.split(|&c| c == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect())
            .unwrap_or_default();
        let program_args = match args.get(1).map(String::as_str) {
            Some("app" | "exec") if args.len() > 5 => &args[5..],
            _ => &args[..],
        };
        let command = program_args.iter().filter(|a| !a.is_empty()).cloned().collect::<Vec<_>>().join(" ");
        let proxy = self.proxy_pid();
        let (descriptors, tcp_established) = proxy_descriptors(proxy);
        // The first application process's parent as the user sees it is
        // `lwk run`'s parent; its real parent is `lwk run`.
        let supervisor = h.supervisor_pid.load(SeqCst);
        let parent_pid = if parent_of(self.pid) == Some(supervisor) { supervisor } else { h.parent_pid.load(SeqCst) };
        AppInfo {
            pid: self.pid,
            proxy_pid: proxy,
            parent_pid,
            command,
            memory_bytes: s.mem_current.load(SeqCst),
            huge_bytes: s.huge_current.load(SeqCst),
            threads: self.threads().map_or(0, |t| t.len()),
            descriptors,
            tcp_established,
        }
    }
}

/// The parent of process `pid`, as this process sees it (0: outside its
/// pid namespace).
pub fn parent_of(pid: i32) -> Option<i32> {
    stat_field(pid, 4)?.parse().ok()
}

/// Has the process whose proc(5) stat file is `stat` ended: gone, or a
/// zombie its parent has not reaped yet?
pub fn ended(stat: &str) -> bool {
    match std::fs::read_to_string(stat) {
        // pid (comm) state ...: comm may hold spaces and parentheses.
        Ok(s) => s.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => true,
    }
}

/// Field `n` (counted from 1, as proc(5) does) of /proc/PID/stat, from the
/// state (3) on.
pub fn stat_field(pid: i32, n: usize) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // pid (comm) state ppid ...: comm may hold spaces and parentheses.
    Some(stat.rsplit_once(')')?.1.split_whitespace().nth(n.checked_sub(3)?)?.to_string())
}

/// The proxy's descriptors by kind, and how many are established TCP
/// connections.
fn proxy_descriptors(proxy: i32) -> (std::collections::BTreeMap<String, usize>, usize) {
    let mut kinds = std::collections::BTreeMap::new();
    let mut sockets = Vec::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{proxy}/fd")) else { return (kinds, 0) };
    for e in dir.flatten() {
        let Ok(target) = std::fs::read_link(e.path()) else { continue };
        let t = target.to_string_lossy();
        let kind = if let Some(inode) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
            sockets.push(inode.to_string());
            "socket"
        } else if t.starts_with("pipe:") {
            "pipe"
        } else if let Some(anon) = t.strip_prefix("anon_inode:") {
            match anon.trim_matches(|c| c == '[' || c == ']') {
                "eventfd" => "eventfd",
                "timerfd" => "timerfd",
                "eventpoll" => "epoll",
                "signalfd" => "signalfd",
                _ => "other",
            }
        } else if t.starts_with("/dev/") {
            "device"
        } else if t.starts_with('/') {
            match std::fs::metadata(e.path()) {
                Ok(m) if m.is_dir() => "directory",
                _ => "file",
            }
        } else {
            "other"
        };
        *kinds.entry(kind.to_string()).or_insert(0) += 1;
    }
    // /proc/PID/net/tcp{,6}: "sl local rem st ... inode"; state 01 is
    // ESTABLISHED. Read in the proxy's network namespace.
    let mut established = 0;
    for table in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{proxy}/net/{table}")) else { continue };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() > 9 && f[3] == "01" && sockets.iter().any(|s| s == f[9]) {
                established += 1;
            }
        }
    }
    (kinds, established)
}

/// The children of process `pid` (of all its threads).
pub fn children(pid: i32) -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|c| c.split_whitespace().filter_map(|p| p.parse().ok()).collect::<Vec<i32>>())
        .collect()
}

/// The pid of process `pid` in its own pid namespace (the last NSpid).
pub fn pid_in_namespace(pid: i32) -> Option<i32> {
    last_nspid(&format!("/proc/{pid}/status"))
}

/// The last NSpid of a /proc status file.
fn last_nspid(status: &str) -> Option<i32> {
    let status = std::fs::read_to_string(status).ok()?;
    let line = status.lines().find(|l| l.starts_with("NSpid:"))?;
    line.split_whitespace().last()?.parse().ok()
}

/// The id of thread `tid` of process `pid` in its own pid namespace.
pub fn pid_in_namespace_of_task(pid: i32, tid: i32) -> Option<i32> {
    last_nspid(&format!("/proc/{pid}/task/{tid}/status"))
}
