//! A process's descriptors, captured from outside and rebuilt at the same
//! numbers in another process.
//!
//! Every descriptor of an lwk application lives in its proxy. [`capture`]
//! takes each descriptor of the (frozen) proxy with `pidfd_getfd`, reads
//! `/proc/PID/fdinfo/N`, and describes it in a plain, serialisable
//! [`FdTable`]. [`check`] runs on the destination before the freeze and says
//! whether the files the table names are there and unchanged. [`restore`]
//! rebuilds the table in the calling process (the restoring proxy, before it
//! starts), and [`apply_process_fs`] gives that process the cwd, umask and
//! resource limits of the original.
//!
//! Every entry says how it travels ([`Disposition`]):
//!
//! * **rebuilt** from its description: regular files and directories (by
//!   path, at their offset), pipes and FIFOs (with the bytes in their
//!   buffer), eventfd, timerfd, signalfd, epoll (after everything it
//!   watches), `/dev/null`, `/dev/zero`, `/dev/full`, `/dev/random`,
//!   `/dev/urandom`;
//! * **supplied** by whoever restores, because what it leads to is outside
//!   the application: a terminal, a pipe end whose other end is not in the
//!   table, a TCP or UDP socket (its state is [`crate::sockets`]'s job), a
//!   memory file (its contents are the memory image's);
//! * **cannot move**, with the reason: unix sockets, deleted files, inotify
//!   and the other kinds lwk does not rebuild. [`FdTable::unmovable`] lists
//!   them so a migration is refused before anything is stopped.
//!
//! Decisions, and why:
//!
//! * A deleted file (link count 0) cannot move, whatever its size: carrying
//!   contents would make the descriptor image unbounded and the file would
//!   come back as a different, unnamed inode anyway. Memory files (memfd) are
//!   the exception, because the memory image carries them.
//! * Descriptors that share one open file description (`dup`, or inherited)
//!   are found with `kcmp(KCMP_FILE)` and restored as duplicates again, so
//!   they keep sharing offset and status flags.
//! * A pipe's buffered bytes are peeked with `tee(2)` into a scratch pipe of
//!   the same capacity, never read from the pipe itself, so a capture for a
//!   live migration that is then rolled back leaves the application
//!   untouched. Packet mode (`O_DIRECT`) boundaries are not kept.
//! * Timers: a relative timerfd (and an absolute one on a monotonic or boot
//!   clock, which has no meaning on another machine) is re-armed with the
//!   time that remained at the capture, as if it had not run while the
//!   application was frozen. An absolute `CLOCK_REALTIME` timer keeps its
//!   wall-clock deadline. Expirations not yet read are put back with
//!   `TFD_IOC_SET_TICKS`.
//! * An epoll registration is keyed by (file, number); the table records it
//!   by number after checking that the file at that number is the one
//!   registered (the same inode). If it is not (the number was closed or
//!   reused after `epoll_ctl`), the epoll instance cannot move. The check
//!   is weak for anonymous-inode files (eventfd, timerfd, ...), which all
//!   share one inode: fdinfo names nothing finer.
//! * Shared descriptions need `kcmp` (CONFIG_KCMP); without it every
//!   descriptor is restored as a description of its own.
//! * Paths are kept as strings (the table is readable JSON); a descriptor
//!   whose path is not UTF-8 cannot move.
//! * `O_ASYNC` (signal-driven I/O) is not moved: its owner is a pid.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::event::{epoll, eventfd, EventfdFlags};
use rustix::fs::{Mode, OFlags, SeekFrom};
use rustix::pipe::{PipeFlags, SpliceFlags};
use rustix::process::{Pid, PidfdFlags, PidfdGetfdFlags};
use rustix::time::{Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags, Timespec};
use serde::{Deserialize, Serialize};

/// What went wrong, on which process or descriptor, and why.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("process {pid}: cannot open a pidfd (has it exited?): {source}")]
    PidfdOpen { pid: i32, source: io::Error },
    #[error(
        "process {pid}, fd {fd}: cannot take the descriptor with pidfd_getfd \
         (this needs ptrace access to the process: run as root): {source}"
    )]
    Take { pid: i32, fd: RawFd, source: io::Error },
    #[error(
        "process {pid}, fd {fd}: the descriptor was closed during the capture \
         (the process must be frozen while it is captured)"
    )]
    Vanished { pid: i32, fd: RawFd },
    #[error("reading {path}: {source}")]
    Proc { path: PathBuf, source: io::Error },
    #[error("{path}: cannot understand {what:?}")]
    ProcFormat { path: PathBuf, what: String },
    #[error("process {pid}, fd {fd}: {what}: {source}")]
    Inspect { pid: i32, fd: RawFd, what: &'static str, source: io::Error },
    #[error("process {pid}, fd {fd}: {what}")]
    PipeCapture { pid: i32, fd: RawFd, what: String },
    #[error("fd {fd} cannot be moved: {reason}")]
    CannotMove { fd: RawFd, reason: String },
    #[error("fd {fd} must be supplied by the caller ({why}), and was not")]
    NotSupplied { fd: RawFd, why: String },
    #[error("fd {fd} was supplied, but the table has no fd {fd}")]
    SuppliedUnknown { fd: RawFd },
    #[error("fd {fd}: {what}: {source}")]
    Rebuild { fd: RawFd, what: String, source: io::Error },
    #[error("moving the caller's fd {fd} out of the way: {source}")]
    MoveAside { fd: RawFd, source: io::Error },
    #[error("the destination does not match the captured descriptors:\n{}", list_problems(.0))]
    Mismatch(Vec<CheckProblem>),
    #[error("process settings: {what}: {source}")]
    ProcessSetting { what: String, source: io::Error },
}

/// `Result` with this module's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

fn list_problems(problems: &[CheckProblem]) -> String {
    let lines: Vec<String> = problems.iter().map(|p| format!("  {p}")).collect();
    lines.join("\n")
}

/// A process's descriptors, and the process settings that go with them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FdTable {
    /// The process they were captured from (for messages only).
    pub pid: i32,
    /// Every descriptor, by increasing number.
    pub fds: Vec<FdEntry>,
    /// The contents of each pipe or FIFO that is rebuilt, once per pipe
    /// (the ends in `fds` refer to it by inode).
    pub pipes: Vec<PipeContents>,
    /// cwd, umask and resource limits.
    pub process: ProcessFs,
}

/// One descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FdEntry {
    pub fd: RawFd,
    pub close_on_exec: bool,
    /// The file status flags of its open file description (`fcntl(F_GETFL)`).
    pub flags: OpenFlags,
    /// The lowest descriptor of the table that shares this one's open file
    /// description (a `dup` of it); restored as a `dup` of that one.
    pub same_description_as: Option<RawFd>,
    pub kind: FdKind,
    pub disposition: Disposition,
}

/// How a descriptor gets to the destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Disposition {
    /// [`restore`] opens it again from its description.
    Rebuild,
    /// What it leads to is outside the application: whoever restores hands
    /// it in ([`RestoreOptions::supplied`]).
    Supply { why: String },
    /// It cannot be moved, for this reason.
    CannotMove { reason: String },
    /// Its open file description is shared with other processes of the
    /// application's tree (`lwk_migrate::tree`): rebuilt once, by whoever
    /// restores the tree, and handed in to each ([`RestoreOptions::supplied`]).
    /// `id` is its place in the tree's list of shared descriptions.
    Shared { id: usize },
    /// The proxy's side of one of the LWK's signalfds (`lwk_kernel::signalfd`):
    /// the reading end of a pipe whose writing end the LWK process holds.
    /// [`restore`] makes a new, empty pipe and keeps only its reading end
    /// here; the restored LWK opens its own end through /proc and makes
    /// the real signalfd again (the signals themselves travel with the
    /// LWK's state).
    SignalfdPipe,
}

/// The file status flags of an open file description, as
/// `/proc/PID/fdinfo` shows them (without `O_CLOEXEC`, which is the
/// descriptor's, see [`FdEntry::close_on_exec`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct OpenFlags(pub u32);

/// How a description was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AccessMode {
    Read,
    Write,
    ReadWrite,
    /// `O_PATH`: a location, no I/O.
    Path,
}

/// The flags `fcntl(F_SETFL)` can give an existing description.
const SETTABLE_FLAGS: u32 = (libc::O_APPEND | libc::O_NONBLOCK | libc::O_NOATIME) as u32;
/// The flags a description is opened again with, beyond its access mode.
const REOPEN_FLAGS: u32 = (libc::O_APPEND
    | libc::O_NONBLOCK
    | libc::O_NOATIME
    | libc::O_DIRECT
    | libc::O_SYNC
    | libc::O_DSYNC
    | libc::O_LARGEFILE
    | libc::O_DIRECTORY
    | libc::O_NOFOLLOW) as u32;

impl OpenFlags {
    pub fn access_mode(self) -> AccessMode {
        if self.0 & libc::O_PATH as u32 != 0 {
            return AccessMode::Path;
        }
        match self.0 & libc::O_ACCMODE as u32 {
            0 => AccessMode::Read,
            1 => AccessMode::Write,
            _ => AccessMode::ReadWrite,
        }
    }
    pub fn append(self) -> bool {
        self.0 & libc::O_APPEND as u32 != 0
    }
    pub fn nonblocking(self) -> bool {
        self.0 & libc::O_NONBLOCK as u32 != 0
    }
    /// Signal-driven I/O (`O_ASYNC`), which is not moved.
    pub fn signal_driven(self) -> bool {
        self.0 & libc::O_ASYNC as u32 != 0
    }
    fn reopen(self) -> OFlags {
        let access = self.0 & (libc::O_ACCMODE | libc::O_PATH) as u32;
        OFlags::from_bits_retain(access | (self.0 & REOPEN_FLAGS)) | OFlags::CLOEXEC | OFlags::NOCTTY
    }
}

/// What a descriptor is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FdKind {
    /// A regular file.
    File {
        path: String,
        offset: u64,
        identity: FileIdentity,
    },
    Directory {
        path: String,
        offset: u64,
    },
    /// A memfd (as the LWK's memory files are); its contents travel in the
    /// memory image, not here.
    MemoryFile {
        name: String,
        size: u64,
    },
    /// One end of a pipe (`fifo` is `None`) or of a FIFO (its path).
    Pipe {
        inode: u64,
        end: PipeEnd,
        fifo: Option<String>,
    },
    EventFd {
        count: u64,
        semaphore: bool,
    },
    TimerFd(TimerFdState),
    Epoll {
        registrations: Vec<EpollRegistration>,
    },
    /// The signals it takes, bit `n - 1` for signal `n`.
    SignalFd {
        mask: u64,
    },
    /// A character device (`/dev/null`, a terminal, ...).
    CharDevice {
        path: String,
        rdev: u64,
    },
    Socket {
        inode: u64,
        family: SocketFamily,
        socket_type: SocketType,
        protocol: i32,
    },
    /// Anything else: what `/proc/PID/fd/N` links to (e.g.
    /// `anon_inode:inotify`).
    Other {
        link: String,
    },
}

/// A regular file as it was seen at the capture, to check that the
/// destination opens the same one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileIdentity {
    /// Device and inode: the same file on the same machine. Recorded, not
    /// checked by [`check`], since another node has the same contents under
    /// other numbers.
    pub dev: u64,
    pub inode: u64,
    pub size: u64,
    pub mtime_sec: i64,
    pub mtime_nsec: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PipeEnd {
    Read,
    Write,
    /// A FIFO (or a pipe reopened through `/proc`) opened `O_RDWR`.
    ReadWrite,
}

impl PipeEnd {
    pub fn reads(self) -> bool {
        matches!(self, PipeEnd::Read | PipeEnd::ReadWrite)
    }
    pub fn writes(self) -> bool {
        matches!(self, PipeEnd::Write | PipeEnd::ReadWrite)
    }
}

/// What was in a pipe when it was captured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipeContents {
    pub inode: u64,
    /// `F_GETPIPE_SZ`.
    pub capacity: usize,
    /// The bytes it held, oldest first.
    pub buffered: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimerFdState {
    pub clock: TimerClock,
    /// Armed with `TFD_TIMER_ABSTIME`.
    pub absolute: bool,
    /// Armed with `TFD_TIMER_CANCEL_ON_SET`.
    pub cancel_on_set: bool,
    /// Time to the next expiration (zero: disarmed).
    pub remaining: Duration,
    pub interval: Duration,
    /// Expirations not yet read.
    pub ticks: u64,
    /// For an absolute `CLOCK_REALTIME` timer, its deadline in wall-clock
    /// time (since the epoch), which it keeps on the destination.
    pub realtime_deadline: Option<Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TimerClock {
    Realtime,
    Monotonic,
    Boottime,
    RealtimeAlarm,
    BoottimeAlarm,
}

impl TimerClock {
    fn from_clockid(id: i32) -> Option<Self> {
        Some(match id {
            libc::CLOCK_REALTIME => TimerClock::Realtime,
            libc::CLOCK_MONOTONIC => TimerClock::Monotonic,
            libc::CLOCK_BOOTTIME => TimerClock::Boottime,
            libc::CLOCK_REALTIME_ALARM => TimerClock::RealtimeAlarm,
            libc::CLOCK_BOOTTIME_ALARM => TimerClock::BoottimeAlarm,
            _ => return None,
        })
    }
    fn timerfd_clock(self) -> TimerfdClockId {
        match self {
            TimerClock::Realtime => TimerfdClockId::Realtime,
            TimerClock::Monotonic => TimerfdClockId::Monotonic,
            TimerClock::Boottime => TimerfdClockId::Boottime,
            TimerClock::RealtimeAlarm => TimerfdClockId::RealtimeAlarm,
            TimerClock::BoottimeAlarm => TimerfdClockId::BoottimeAlarm,
        }
    }
    fn is_wall_clock(self) -> bool {
        matches!(self, TimerClock::Realtime | TimerClock::RealtimeAlarm)
    }
}

/// One file an epoll instance watches, by its descriptor number in the same
/// table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpollRegistration {
    pub fd: RawFd,
    /// The `epoll_event.events` bits, including `EPOLLET`, `EPOLLONESHOT`, ...
    pub events: u32,
    pub data: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SocketFamily {
    Unix,
    Inet,
    Inet6,
    Other(u16),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SocketType {
    Stream,
    Datagram,
    SeqPacket,
    Raw,
    Other(u32),
}

/// The process settings that belong with its descriptors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessFs {
    pub cwd: String,
    pub umask: u32,
    pub limits: Vec<ResourceLimit>,
}

/// A process's credentials: real, effective and saved user and group ids,
/// and supplementary groups.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    pub uid: [u32; 3],
    pub gid: [u32; 3],
    pub groups: Vec<u32>,
}

impl Credentials {
    /// Those of process `pid` (from /proc/PID/status).
    pub fn of(pid: i32) -> Result<Credentials> {
        let path = proc_path(pid, "status");
        let status = read_proc(&path)?;
        let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).unwrap_or_default();
        let ids = |name: &str| -> Result<[u32; 3]> {
            let v: Vec<u32> = field(name).split_whitespace().filter_map(|x| x.parse().ok()).collect();
            match v[..] {
                [r, e, s, ..] => Ok([r, e, s]),
                _ => Err(Error::ProcFormat { path: path.clone(), what: format!("no {name} line") }),
            }
        };
        let groups = field("Groups:").split_whitespace().filter_map(|x| x.parse().ok()).collect();
        Ok(Credentials { uid: ids("Uid:")?, gid: ids("Gid:")?, groups })
    }
}

/// One resource limit; `None` is unlimited.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceLimit {
    /// `RLIMIT_NOFILE` and so on, without the prefix: `NOFILE`.
    pub resource: String,
    pub soft: Option<u64>,
    pub hard: Option<u64>,
}

/// A descriptor that cannot be moved, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unmovable {
    pub fd: RawFd,
    pub reason: String,
}

impl std::fmt::Display for Unmovable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "fd {}: {}", self.fd, self.reason)
    }
}

impl FdTable {
    pub fn entry(&self, fd: RawFd) -> Option<&FdEntry> {
        self.fds.iter().find(|e| e.fd == fd)
    }

    /// Every descriptor that cannot be moved: a migration with any of these
    /// is refused before the application is stopped.
    pub fn unmovable(&self) -> Vec<Unmovable> {
        self.fds
            .iter()
            .filter_map(|e| match &e.disposition {
                Disposition::CannotMove { reason } => Some(Unmovable { fd: e.fd, reason: reason.clone() }),
                _ => None,
            })
            .collect()
    }

    /// The descriptors [`restore`] needs handed in, with what each is.
    pub fn to_supply(&self) -> Vec<(RawFd, &str)> {
        self.fds
            .iter()
            .filter_map(|e| match &e.disposition {
                Disposition::Supply { why } => Some((e.fd, why.as_str())),
                _ => None,
            })
            .collect()
    }

    fn pipe_contents(&self, inode: u64) -> Option<&PipeContents> {
        self.pipes.iter().find(|p| p.inode == inode)
    }
}

// ---------------------------------------------------------------- capture

/// A descriptor taken from the captured process, with what /proc says of it.
struct Taken {
    fd: RawFd,
    file: File,
    meta: std::fs::Metadata,
    /// What `/proc/PID/fd/N` links to (lossily UTF-8).
    link: String,
    link_is_utf8: bool,
    info: FdInfo,
}

/// The lines of `/proc/PID/fdinfo/N`.
#[derive(Debug, Default)]
struct FdInfo {
    pos: u64,
    flags: u32,
    /// `key: value` lines other than `tfd:` ones, first occurrence.
    fields: HashMap<String, String>,
    /// The epoll `tfd:` lines.
    epoll: Vec<EpollWatch>,
}

/// An epoll `tfd:` line: the registration and the inode of the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct EpollWatch {
    registration: EpollRegistration,
    inode: u64,
}

fn parse_fdinfo(text: &str) -> Result<FdInfo, String> {
    let mut info = FdInfo::default();
    for line in text.lines() {
        if line.starts_with("tfd:") {
            info.epoll.push(parse_epoll_line(line).ok_or_else(|| line.to_string())?);
            continue;
        }
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let (key, value) = (key.trim(), value.trim());
        match key {
            "pos" => info.pos = value.parse().map_err(|_| line.to_string())?,
            "flags" => {
                info.flags = u32::from_str_radix(value, 8).map_err(|_| line.to_string())?;
            }
            _ => {
                info.fields.entry(key.to_string()).or_insert_with(|| value.to_string());
            }
        }
    }
    Ok(info)
}

/// `tfd:        3 events:       19 data:                3  pos:0 ino:1a sdev:10`
/// (events, data and ino in hexadecimal).
fn parse_epoll_line(line: &str) -> Option<EpollWatch> {
    let mut words = line.split_whitespace();
    let mut fd = None;
    let mut events = None;
    let mut data = None;
    let mut inode = None;
    while let Some(word) = words.next() {
        let (key, inline) = match word.split_once(':') {
            Some((k, v)) => (k, v),
            None => continue,
        };
        let value = if inline.is_empty() { words.next()? } else { inline };
        match key {
            "tfd" => fd = value.parse().ok(),
            "events" => events = u32::from_str_radix(value, 16).ok(),
            "data" => data = u64::from_str_radix(value, 16).ok(),
            "ino" => inode = u64::from_str_radix(value, 16).ok(),
            _ => {}
        }
    }
    Some(EpollWatch { registration: EpollRegistration { fd: fd?, events: events?, data: data? }, inode: inode? })
}

fn proc_path(pid: i32, rest: &str) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/{rest}"))
}

fn read_proc(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| Error::Proc { path: path.to_path_buf(), source })
}

/// Describe every descriptor of process `pid`, which should be frozen (its
/// descriptors must not change while they are read).
pub fn capture(pid: i32) -> Result<FdTable> {
    capture_with(pid, Contents::Read)
}

/// Whether [`capture_with`] reads what the pipes hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Contents {
    Read,
    /// Only what the descriptors are (to see whether they can move, while
    /// the process runs and its pipes change): every pipe listed empty,
    /// and epoll registrations not checked against the descriptors (one
    /// may be closed between the two looks).
    Skip,
}

/// [`capture`], reading the pipes' bytes or not.
pub fn capture_with(pid: i32, contents: Contents) -> Result<FdTable> {
    let raw_pid = Pid::from_raw(pid)
        .ok_or_else(|| Error::PidfdOpen { pid, source: io::Error::from(io::ErrorKind::InvalidInput) })?;
    let pidfd = rustix::process::pidfd_open(raw_pid, PidfdFlags::empty())
        .map_err(|e| Error::PidfdOpen { pid, source: e.into() })?;

    // Each descriptor is taken and described on its own: spread over the
    // CPUs (the proxy is frozen; a thousand sockets take tens of ms).
    let numbers = list_fds(pid)?;
    // (This very process, as a test does, in order: each take adds a
    // descriptor to the table being read, at the lowest free number.)
    let workers = match pid == std::process::id() as i32 {
        true => 1,
        false => std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 8),
    };
    let chunk = numbers.len().div_ceil(workers).max(1);
    let parts: Vec<Result<Vec<(Taken, FdEntry)>>> = std::thread::scope(|scope| {
        let pidfd = &pidfd;
        let handles: Vec<_> = numbers
            .chunks(chunk)
            .map(|part| {
                scope.spawn(move || {
                    part.iter()
                        .filter_map(|&fd| {
                            let taken = take(pid, pidfd, fd).and_then(|t| Ok((describe(pid, &t)?, t)));
                            match taken {
                                Ok((e, t)) => Some(Ok((t, e))),
                                // While the process runs (Skip), a descriptor
                                // closed since the list is just gone.
                                Err(_)
                                    if contents == Contents::Skip
                                        && !std::path::Path::new(&proc_path(pid, &format!("fd/{fd}"))).exists() =>
                                {
                                    None
                                }
                                Err(e) => Some(Err(e)),
                            }
                        })
                        .collect()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("a capture thread does not panic")).collect()
    });
    let mut taken = Vec::with_capacity(numbers.len());
    let mut fds = Vec::with_capacity(numbers.len());
    for part in parts {
        for (t, e) in part? {
            taken.push(t);
            fds.push(e);
        }
    }
    mark_shared_descriptions(pid, &taken, &mut fds);
    mark_external_pipe_ends(&mut fds);
    let pipes = match contents {
        Contents::Read => capture_pipe_contents(pid, &taken, &fds)?,
        Contents::Skip => Vec::new(),
    };
    // While the process runs (Skip), a descriptor closed between the list
    // and the epoll instance's own is no sign of anything: the capture in
    // the freeze looks again.
    if contents == Contents::Read {
        check_epoll_registrations(&taken, &mut fds);
    }

    Ok(FdTable { pid, fds, pipes, process: capture_process_fs(pid)? })
}

fn list_fds(pid: i32) -> Result<Vec<RawFd>> {
    let dir = proc_path(pid, "fd");
    let proc_err = |source| Error::Proc { path: dir.clone(), source };
    let mut fds = Vec::new();
    for entry in std::fs::read_dir(&dir).map_err(proc_err)? {
        let entry = entry.map_err(proc_err)?;
        if let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse().ok()) {
            fds.push(fd);
        }
    }
    fds.sort_unstable();
    Ok(fds)
}

fn take(pid: i32, pidfd: &OwnedFd, fd: RawFd) -> Result<Taken> {
    let owned = rustix::process::pidfd_getfd(pidfd, fd, PidfdGetfdFlags::empty()).map_err(|e| {
        if e == rustix::io::Errno::BADF {
            Error::Vanished { pid, fd }
        } else {
            Error::Take { pid, fd, source: e.into() }
        }
    })?;
    let file = File::from(owned);
    let meta = file.metadata().map_err(|source| Error::Inspect { pid, fd, what: "fstat", source })?;
    let link_path = proc_path(pid, &format!("fd/{fd}"));
    let target = std::fs::read_link(&link_path).map_err(|source| Error::Proc { path: link_path, source })?;
    // The table keeps paths as strings, so that it stays readable JSON: a
    // path that is not UTF-8 cannot be kept.
    let link_is_utf8 = target.to_str().is_some();
    let link = target.to_string_lossy().into_owned();
    let info_path = proc_path(pid, &format!("fdinfo/{fd}"));
    let info =
        parse_fdinfo(&read_proc(&info_path)?).map_err(|line| Error::ProcFormat { path: info_path, what: line })?;
    Ok(Taken { fd, file, meta, link, link_is_utf8, info })
}

/// The well-known character devices that are the same on every machine and
/// hold no state: opened again by path.
const PLAIN_DEVICES: [&str; 5] = ["/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom"];

fn is_terminal(rdev: u64) -> bool {
    // 4: virtual consoles and serial ports, 5: /dev/tty, /dev/console,
    // /dev/ptmx, 136-143: pseudo-terminal slaves.
    matches!(libc::major(rdev), 4 | 5 | 136..=143)
}

fn describe(pid: i32, t: &Taken) -> Result<FdEntry> {
    let flags = OpenFlags(t.info.flags & !(libc::O_CLOEXEC as u32));
    let close_on_exec = t.info.flags & libc::O_CLOEXEC as u32 != 0;
    let (kind, mut disposition) = classify(pid, t)?;
    if flags.signal_driven() && disposition == Disposition::Rebuild {
        disposition = cannot_move("signal-driven I/O (O_ASYNC) is not moved");
    }
    Ok(FdEntry { fd: t.fd, close_on_exec, flags, same_description_as: None, kind, disposition })
}

fn cannot_move(reason: impl Into<String>) -> Disposition {
    Disposition::CannotMove { reason: reason.into() }
}

fn supply(why: impl Into<String>) -> Disposition {
    Disposition::Supply { why: why.into() }
}

fn classify(pid: i32, t: &Taken) -> Result<(FdKind, Disposition)> {
    let file_type = t.meta.file_type();
    if let Some(anon) = t.link.strip_prefix("anon_inode:") {
        return classify_anon(pid, t, anon);
    }
    if file_type.is_file() {
        if t.meta.nlink() == 0 {
            if let Some(name) = t.link.strip_prefix("/memfd:") {
                let name = name.strip_suffix(" (deleted)").unwrap_or(name).to_string();
                return Ok((
                    FdKind::MemoryFile { name, size: t.meta.size() },
                    supply("a memory file: its contents travel in the memory image"),
                ));
            }
        }
        let identity = FileIdentity {
            dev: t.meta.dev(),
            inode: t.meta.ino(),
            size: t.meta.size(),
            mtime_sec: t.meta.mtime(),
            mtime_nsec: t.meta.mtime_nsec(),
        };
        let disposition = if t.meta.nlink() == 0 {
            cannot_move(format!("{} is a deleted file: its contents are not carried", t.link))
        } else if !t.link_is_utf8 {
            cannot_move(format!("the path {:?} is not UTF-8", t.link))
        } else {
            Disposition::Rebuild
        };
        return Ok((FdKind::File { path: t.link.clone(), offset: t.info.pos, identity }, disposition));
    }
    if file_type.is_dir() {
        let disposition = if t.meta.nlink() == 0 {
            cannot_move(format!("{} is a deleted directory", t.link))
        } else if !t.link_is_utf8 {
            cannot_move(format!("the path {:?} is not UTF-8", t.link))
        } else {
            Disposition::Rebuild
        };
        return Ok((FdKind::Directory { path: t.link.clone(), offset: t.info.pos }, disposition));
    }
    if file_type.is_fifo() {
        let end = match OpenFlags(t.info.flags).access_mode() {
            AccessMode::Read => PipeEnd::Read,
            AccessMode::Write => PipeEnd::Write,
            AccessMode::ReadWrite => PipeEnd::ReadWrite,
            AccessMode::Path => {
                return Ok((FdKind::Other { link: t.link.clone() }, cannot_move("an O_PATH descriptor of a pipe")))
            }
        };
        let fifo = (!t.link.starts_with("pipe:[")).then(|| t.link.clone());
        let disposition = match &fifo {
            Some(path) if t.meta.nlink() == 0 => cannot_move(format!("{path} is a deleted FIFO")),
            _ => Disposition::Rebuild,
        };
        return Ok((FdKind::Pipe { inode: t.meta.ino(), end, fifo }, disposition));
    }
    if file_type.is_char_device() {
        let rdev = t.meta.rdev();
        let disposition = if is_terminal(rdev) {
            supply(format!("a terminal ({})", t.link))
        } else if PLAIN_DEVICES.contains(&t.link.as_str()) {
            Disposition::Rebuild
        } else {
            cannot_move(format!("the character device {} is not moved", t.link))
        };
        return Ok((FdKind::CharDevice { path: t.link.clone(), rdev }, disposition));
    }
    if file_type.is_socket() {
        return classify_socket(pid, t);
    }
    let what = if file_type.is_block_device() { "a block device" } else { "a descriptor of a kind lwk does not move" };
    Ok((FdKind::Other { link: t.link.clone() }, cannot_move(format!("{} is {what}", t.link))))
}

fn classify_anon(pid: i32, t: &Taken, anon: &str) -> Result<(FdKind, Disposition)> {
    let format_error =
        |what: &str| Error::ProcFormat { path: proc_path(pid, &format!("fdinfo/{}", t.fd)), what: what.to_string() };
    let field =
        |key: &str| t.info.fields.get(key).map(String::as_str).ok_or_else(|| format_error(&format!("no {key} line")));
    let kind = match anon {
        "[eventfd]" => {
            let count = u64::from_str_radix(field("eventfd-count")?, 16).map_err(|_| format_error("eventfd-count"))?;
            // Only kernels since 6.6 say whether an eventfd is a semaphore.
            let Some(semaphore) = t.info.fields.get("eventfd-semaphore") else {
                return Ok((
                    FdKind::Other { link: t.link.clone() },
                    cannot_move("an eventfd on a kernel that does not report semaphore mode"),
                ));
            };
            FdKind::EventFd { count, semaphore: semaphore == "1" }
        }
        "[timerfd]" => FdKind::TimerFd(describe_timer(pid, t, &field)?),
        "[eventpoll]" => FdKind::Epoll { registrations: t.info.epoll.iter().map(|w| w.registration).collect() },
        "[signalfd]" => {
            FdKind::SignalFd { mask: u64::from_str_radix(field("sigmask")?, 16).map_err(|_| format_error("sigmask"))? }
        }
        other => {
            let name = other.trim_start_matches('[').trim_end_matches(']');
            return Ok((
                FdKind::Other { link: t.link.clone() },
                cannot_move(format!("an {name} descriptor: lwk does not move these")),
            ));
        }
    };
    Ok((kind, Disposition::Rebuild))
}

fn describe_timer<'a>(pid: i32, t: &Taken, field: &dyn Fn(&str) -> Result<&'a str>) -> Result<TimerFdState> {
    let format_error =
        |what: &str| Error::ProcFormat { path: proc_path(pid, &format!("fdinfo/{}", t.fd)), what: what.to_string() };
    let clock =
        field("clockid")?.parse().ok().and_then(TimerClock::from_clockid).ok_or_else(|| format_error("clockid"))?;
    let ticks = field("ticks")?.parse().map_err(|_| format_error("ticks"))?;
    let settime_flags = u32::from_str_radix(field("settime flags")?, 8).map_err(|_| format_error("settime flags"))?;
    // The time left, from the timer itself rather than fdinfo: the same
    // value, at nanosecond precision and without parsing.
    let now = rustix::time::timerfd_gettime(&t.file).map_err(|e| Error::Inspect {
        pid,
        fd: t.fd,
        what: "timerfd_gettime",
        source: e.into(),
    })?;
    let remaining = duration_of(now.it_value);
    let interval = duration_of(now.it_interval);
    let absolute = settime_flags & TimerfdTimerFlags::ABSTIME.bits() != 0;
    let realtime_deadline = (absolute && clock.is_wall_clock() && !remaining.is_zero())
        .then(|| duration_of(rustix::time::clock_gettime(rustix::time::ClockId::Realtime)) + remaining);
    Ok(TimerFdState {
        clock,
        absolute,
        cancel_on_set: settime_flags & TimerfdTimerFlags::CANCEL_ON_SET.bits() != 0,
        remaining,
        interval,
        ticks,
        realtime_deadline,
    })
}

fn duration_of(ts: Timespec) -> Duration {
    Duration::new(u64::try_from(ts.tv_sec).unwrap_or(0), u32::try_from(ts.tv_nsec).unwrap_or(0))
}

fn timespec_of(d: Duration) -> Timespec {
    Timespec { tv_sec: i64::try_from(d.as_secs()).unwrap_or(i64::MAX), tv_nsec: i64::from(d.subsec_nanos()) }
}

fn classify_socket(pid: i32, t: &Taken) -> Result<(FdKind, Disposition)> {
    use rustix::net::{sockopt, AddressFamily, SocketType as RxType};
    let inspect = |what, e: rustix::io::Errno| Error::Inspect { pid, fd: t.fd, what, source: e.into() };
    let domain = sockopt::socket_domain(&t.file).map_err(|e| inspect("SO_DOMAIN", e))?;
    let raw_type = sockopt::socket_type(&t.file).map_err(|e| inspect("SO_TYPE", e))?;
    let protocol = sockopt::socket_protocol(&t.file)
        .map_err(|e| inspect("SO_PROTOCOL", e))?
        .map_or(0, |p| p.as_raw().get() as i32);
    let family = match domain {
        AddressFamily::UNIX => SocketFamily::Unix,
        AddressFamily::INET => SocketFamily::Inet,
        AddressFamily::INET6 => SocketFamily::Inet6,
        other => SocketFamily::Other(other.as_raw()),
    };
    let socket_type = match raw_type {
        RxType::STREAM => SocketType::Stream,
        RxType::DGRAM => SocketType::Datagram,
        RxType::SEQPACKET => SocketType::SeqPacket,
        RxType::RAW => SocketType::Raw,
        other => SocketType::Other(other.as_raw()),
    };
    let disposition = match (family, socket_type) {
        (SocketFamily::Unix, _) => {
            cannot_move("a unix socket: its peer is a process on this machine, which cannot follow")
        }
        (SocketFamily::Inet | SocketFamily::Inet6, SocketType::Stream) if protocol == libc::IPPROTO_TCP => {
            supply("a TCP socket: rebuilt by lwk_migrate::sockets")
        }
        (SocketFamily::Inet | SocketFamily::Inet6, SocketType::Datagram) if protocol == libc::IPPROTO_UDP => {
            supply("a UDP socket: rebuilt by lwk_migrate::sockets")
        }
        _ => cannot_move(format!(
            "a socket of family {family:?}, type {socket_type:?}, protocol {protocol}: \
             only TCP and UDP sockets are moved"
        )),
    };
    Ok((FdKind::Socket { inode: t.meta.ino(), family, socket_type, protocol }, disposition))
}

const KCMP_FILE: libc::c_int = 0;

/// Whether descriptor `a` of process `p` and descriptor `b` of process `q`
/// are one open file description: `None` if the kernel cannot say (no
/// `kcmp`, or a descriptor is gone).
pub fn same_description(p: i32, a: RawFd, q: i32, b: RawFd) -> Option<bool> {
    // SAFETY: kcmp takes integers only and reads no memory of ours.
    let r = unsafe { libc::syscall(libc::SYS_kcmp, p, q, KCMP_FILE, a, b) };
    (r >= 0).then_some(r == 0)
}

/// Record which descriptors are `dup`s of an earlier one. Only descriptors
/// of one inode can share a description, so only those are compared.
fn mark_shared_descriptions(pid: i32, taken: &[Taken], fds: &mut [FdEntry]) {
    let mut by_inode: HashMap<(u64, u64), Vec<usize>> = HashMap::new();
    for (i, t) in taken.iter().enumerate() {
        by_inode.entry((t.meta.dev(), t.meta.ino())).or_default().push(i);
    }
    for group in by_inode.values() {
        let mut primaries: Vec<usize> = Vec::new();
        for &i in group {
            let shared =
                primaries.iter().find(|&&p| same_description(pid, taken[p].fd, pid, taken[i].fd) == Some(true));
            match shared {
                Some(&p) => fds[i].same_description_as = Some(taken[p].fd),
                None => primaries.push(i),
            }
        }
    }
}

/// An anonymous pipe is rebuilt only if both its reading and its writing
/// side are in the table; otherwise its ends lead outside the application
/// and must be supplied. (A FIFO is rebuilt by path: that is how anyone
/// outside reaches it.)
fn mark_external_pipe_ends(fds: &mut [FdEntry]) {
    let mut sides: HashMap<u64, (bool, bool)> = HashMap::new();
    for e in fds.iter() {
        if let FdKind::Pipe { inode, end, fifo: None } = e.kind {
            let s = sides.entry(inode).or_default();
            s.0 |= end.reads();
            s.1 |= end.writes();
        }
    }
    for e in fds.iter_mut() {
        if let FdKind::Pipe { inode, end, fifo: None } = e.kind {
            if sides.get(&inode) != Some(&(true, true)) && e.disposition == Disposition::Rebuild {
                let other = if end.reads() { "writing" } else { "reading" };
                e.disposition = supply(format!("a pipe whose {other} end is outside the application"));
            }
        }
    }
}

fn capture_pipe_contents(pid: i32, taken: &[Taken], fds: &[FdEntry]) -> Result<Vec<PipeContents>> {
    let mut done = BTreeSet::new();
    let mut pipes = Vec::new();
    for (t, e) in taken.iter().zip(fds) {
        let FdKind::Pipe { inode, .. } = e.kind else {
            continue;
        };
        if e.disposition != Disposition::Rebuild || !done.insert(inode) {
            continue;
        }
        // A reading end to peek through: one of the table's if it has one,
        // otherwise the pipe opened again for reading through /proc.
        let reader = taken.iter().zip(fds).find_map(|(t, e)| match e.kind {
            FdKind::Pipe { inode: i, end, .. } if i == inode && end.reads() => Some(t),
            _ => None,
        });
        let reopened;
        let reader_fd = match reader {
            Some(r) => r.file.as_fd(),
            None => {
                let path = proc_path(pid, &format!("fd/{}", t.fd));
                reopened = rustix::fs::open(&path, OFlags::RDONLY | OFlags::NONBLOCK | OFlags::CLOEXEC, Mode::empty())
                    .map_err(|e| Error::Inspect {
                        pid,
                        fd: t.fd,
                        what: "opening the pipe for reading through /proc",
                        source: e.into(),
                    })?;
                reopened.as_fd()
            }
        };
        pipes.push(peek_pipe(pid, t.fd, inode, reader_fd)?);
    }
    Ok(pipes)
}

/// The bytes in a pipe, read without taking them: `tee` them into a scratch
/// pipe of the same capacity (tee is bounded by the scratch pipe's slots,
/// and the same capacity has as many) and read that.
fn peek_pipe(pid: i32, fd: RawFd, inode: u64, reader: std::os::fd::BorrowedFd<'_>) -> Result<PipeContents> {
    let inspect = |what, e: rustix::io::Errno| Error::Inspect { pid, fd, what, source: e.into() };
    let capacity = rustix::pipe::fcntl_getpipe_size(reader).map_err(|e| inspect("F_GETPIPE_SZ", e))?;
    let queued = rustix::io::ioctl_fionread(reader).map_err(|e| inspect("FIONREAD", e))?;
    let queued = usize::try_from(queued).unwrap_or(usize::MAX);
    let mut buffered = Vec::with_capacity(queued);
    if queued > 0 {
        let (scratch_r, scratch_w) = rustix::pipe::pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)
            .map_err(|e| inspect("creating a scratch pipe", e))?;
        rustix::pipe::fcntl_setpipe_size(&scratch_w, capacity).map_err(|e| inspect("sizing the scratch pipe", e))?;
        let copied =
            rustix::pipe::tee(reader, &scratch_w, queued, SpliceFlags::NONBLOCK).map_err(|e| inspect("tee", e))?;
        if copied != queued {
            return Err(Error::PipeCapture {
                pid,
                fd,
                what: format!("tee copied {copied} of the {queued} bytes in the pipe"),
            });
        }
        drop(scratch_w);
        let mut scratch = File::from(scratch_r);
        io::Read::read_to_end(&mut scratch, &mut buffered).map_err(|source| Error::Inspect {
            pid,
            fd,
            what: "reading the scratch pipe",
            source,
        })?;
    }
    Ok(PipeContents { inode, capacity, buffered })
}

/// An epoll registration is kept only if the file at its number is still
/// the one registered.
fn check_epoll_registrations(taken: &[Taken], fds: &mut [FdEntry]) {
    for (t, e) in taken.iter().zip(fds.iter_mut()) {
        for watch in &t.info.epoll {
            let target = taken.iter().find(|o| o.fd == watch.registration.fd);
            let same = target.is_some_and(|o| o.meta.ino() == watch.inode);
            if !same && !matches!(e.disposition, Disposition::CannotMove { .. }) {
                e.disposition = cannot_move(format!(
                    "an epoll instance watching a file that is no longer at fd {} \
                     (closed or replaced after it was registered)",
                    watch.registration.fd
                ));
            }
        }
    }
}

/// `RLIMIT_*` names, by resource number.
const RESOURCES: [(&str, libc::__rlimit_resource_t); 16] = [
    ("CPU", libc::RLIMIT_CPU),
    ("FSIZE", libc::RLIMIT_FSIZE),
    ("DATA", libc::RLIMIT_DATA),
    ("STACK", libc::RLIMIT_STACK),
    ("CORE", libc::RLIMIT_CORE),
    ("RSS", libc::RLIMIT_RSS),
    ("NPROC", libc::RLIMIT_NPROC),
    ("NOFILE", libc::RLIMIT_NOFILE),
    ("MEMLOCK", libc::RLIMIT_MEMLOCK),
    ("AS", libc::RLIMIT_AS),
    ("LOCKS", libc::RLIMIT_LOCKS),
    ("SIGPENDING", libc::RLIMIT_SIGPENDING),
    ("MSGQUEUE", libc::RLIMIT_MSGQUEUE),
    ("NICE", libc::RLIMIT_NICE),
    ("RTPRIO", libc::RLIMIT_RTPRIO),
    ("RTTIME", libc::RLIMIT_RTTIME),
];

fn capture_process_fs(pid: i32) -> Result<ProcessFs> {
    let cwd_path = proc_path(pid, "cwd");
    let cwd = std::fs::read_link(&cwd_path)
        .map_err(|source| Error::Proc { path: cwd_path, source })?
        .to_string_lossy()
        .into_owned();
    let status_path = proc_path(pid, "status");
    let status = read_proc(&status_path)?;
    let umask = status
        .lines()
        .find_map(|l| l.strip_prefix("Umask:"))
        .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        .ok_or_else(|| Error::ProcFormat { path: status_path, what: "no Umask line".to_string() })?;
    // From /proc/PID/limits, which anyone may read (prlimit on a process of
    // another user needs CAP_SYS_RESOURCE): one row per resource, in the
    // kernel's order, which RESOURCES follows; fixed columns.
    let limits_path = proc_path(pid, "limits");
    let table = read_proc(&limits_path)?;
    let bad = |what: &str| Error::ProcFormat { path: limits_path.clone(), what: what.to_string() };
    let value = |v: &str| -> Result<Option<u64>> {
        match v.trim() {
            "unlimited" => Ok(None),
            n => n.parse().map(Some).map_err(|_| bad(&format!("a limit of {n:?}"))),
        }
    };
    let rows: Vec<&str> = table.lines().skip(1).collect();
    if rows.len() < RESOURCES.len() {
        return Err(bad("fewer rows than resource limits"));
    }
    let mut limits = Vec::with_capacity(RESOURCES.len());
    for ((name, _), row) in RESOURCES.iter().zip(rows) {
        let (Some(soft), Some(hard)) = (row.get(26..47), row.get(47..68)) else {
            return Err(bad(&format!("a short row: {row:?}")));
        };
        limits.push(ResourceLimit { resource: name.to_string(), soft: value(soft)?, hard: value(hard)? });
    }
    Ok(ProcessFs { cwd, umask, limits })
}

// ------------------------------------------------------------------ check

/// One way the destination differs from the captured table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckProblem {
    pub fd: RawFd,
    pub path: String,
    pub problem: String,
}

impl std::fmt::Display for CheckProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "fd {} ({}): {}", self.fd, self.path, self.problem)
    }
}

/// On the destination, before the freeze: is every file, directory, FIFO
/// and device the table reopens by path there, and the same?
///
/// A file opened only for reading must have the captured size and
/// modification time: the application has read from it and may read on,
/// so it must be the same contents. A file open for writing only has to
/// exist as a regular file: the application itself changes its size and
/// mtime, and in a live migration `check` runs while it still runs.
/// Device and inode numbers are not compared (another node's copy of the
/// file has other numbers). Entries that cannot move are not checked here:
/// see [`FdTable::unmovable`].
pub fn check(table: &FdTable) -> Result<()> {
    let mut problems = Vec::new();
    for e in &table.fds {
        if e.disposition != Disposition::Rebuild || e.same_description_as.is_some() {
            continue;
        }
        let (path, want): (&str, Want) = match &e.kind {
            FdKind::File { path, identity, .. } => {
                let read_only = matches!(e.flags.access_mode(), AccessMode::Read | AccessMode::Path);
                (path, Want::File(read_only.then_some(identity)))
            }
            FdKind::Directory { path, .. } => (path, Want::Directory),
            FdKind::Pipe { fifo: Some(path), .. } => (path, Want::Fifo),
            FdKind::CharDevice { path, rdev } => (path, Want::CharDevice(*rdev)),
            _ => continue,
        };
        if let Some(problem) = check_path(path, want) {
            problems.push(CheckProblem { fd: e.fd, path: path.to_string(), problem });
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::Mismatch(problems))
    }
}

enum Want<'a> {
    /// A regular file; with the identity if it must be unchanged.
    File(Option<&'a FileIdentity>),
    Directory,
    Fifo,
    CharDevice(u64),
}

fn check_path(path: &str, want: Want<'_>) -> Option<String> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) => return Some(format!("cannot be found: {e}")),
    };
    let ft = meta.file_type();
    match want {
        Want::File(_) if !ft.is_file() => Some("is no longer a regular file".into()),
        Want::File(Some(id)) if meta.size() != id.size => {
            Some(format!("opened read-only, and its size is now {} bytes, not {}", meta.size(), id.size))
        }
        Want::File(Some(id)) if (meta.mtime(), meta.mtime_nsec()) != (id.mtime_sec, id.mtime_nsec) => {
            Some("opened read-only, and it was modified since the capture".into())
        }
        Want::Directory if !ft.is_dir() => Some("is no longer a directory".into()),
        Want::Fifo if !ft.is_fifo() => Some("is no longer a FIFO".into()),
        Want::CharDevice(rdev) if !ft.is_char_device() || meta.rdev() != rdev => {
            Some("is not the same character device".into())
        }
        _ => None,
    }
}

// ---------------------------------------------------------------- restore

/// How [`restore`] gets what it cannot rebuild.
#[derive(Debug, Default)]
pub struct RestoreOptions {
    /// Descriptors handed in instead of rebuilt, by the number they take:
    /// every entry the table marks [`Disposition::Supply`] (a terminal, a
    /// pipe to outside, a socket, a memory file), and any other the caller
    /// wants to give itself. They are installed with the entry's
    /// close-on-exec flag; their status flags are left as they are.
    pub supplied: BTreeMap<RawFd, OwnedFd>,
}

/// What [`restore`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Restored {
    /// The caller's own descriptors that were in the way, and where they
    /// are now.
    pub moved_aside: Vec<MovedAside>,
    /// The numbers rebuilt from the table.
    pub rebuilt: Vec<RawFd>,
    /// The numbers installed from [`RestoreOptions::supplied`].
    pub supplied: Vec<RawFd>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MovedAside {
    pub was: RawFd,
    pub now: RawFd,
}

/// Rebuild every descriptor of `table` in the calling process, at its
/// number, with its flags, offsets and contents.
///
/// Descriptors of the caller at the table's numbers are first moved above
/// the highest of them (see [`Restored::moved_aside`]). Call it while no
/// other thread of the caller opens or closes descriptors. On an error the
/// caller is left half restored: it is meant to be a fresh process that is
/// given up on failure.
pub fn restore(table: &FdTable, options: RestoreOptions) -> Result<Restored> {
    for e in &table.fds {
        let supplied = options.supplied.contains_key(&e.fd);
        match &e.disposition {
            Disposition::CannotMove { reason } if !supplied => {
                return Err(Error::CannotMove { fd: e.fd, reason: reason.clone() })
            }
            Disposition::Supply { why } if !supplied => return Err(Error::NotSupplied { fd: e.fd, why: why.clone() }),
            Disposition::Shared { id } if !supplied => {
                return Err(Error::NotSupplied {
                    fd: e.fd,
                    why: format!("shared with another process (description {id})"),
                })
            }
            _ => {}
        }
    }
    if let Some(&fd) = options.supplied.keys().find(|&&fd| table.entry(fd).is_none()) {
        return Err(Error::SuppliedUnknown { fd });
    }
    let Some(highest) = table.fds.iter().map(|e| e.fd).max() else {
        return Ok(Restored::default());
    };
    let mut restorer = Restorer { floor: highest + 1, restored: Restored::default() };

    // The supplied descriptors go above the table first, so that moving
    // the caller's descriptors aside cannot close one of them.
    let mut supplied = BTreeMap::new();
    for (fd, given) in options.supplied {
        supplied.insert(fd, restorer.above(given, fd)?);
    }
    restorer.move_aside(table)?;

    let is_epoll = |e: &&FdEntry| matches!(e.kind, FdKind::Epoll { .. });
    let primaries = || table.fds.iter().filter(|e| e.same_description_as.is_none());
    let duplicates = || table.fds.iter().filter(|e| e.same_description_as.is_some());

    for e in table.fds.iter() {
        if let Some(given) = supplied.remove(&e.fd) {
            restorer.install(given, e.fd, e.close_on_exec)?;
            restorer.restored.supplied.push(e.fd);
        }
    }
    let installed: BTreeSet<RawFd> = restorer.restored.supplied.iter().copied().collect();
    let pending = |e: &&FdEntry| !installed.contains(&e.fd);

    restorer.rebuild_pipes(table, &installed)?;
    for e in primaries().filter(pending).filter(|e| !is_epoll(e)) {
        if e.disposition == Disposition::SignalfdPipe {
            let (r, _w) = rustix::pipe::pipe_with(PipeFlags::CLOEXEC).map_err(rebuild_error(e.fd, "pipe2"))?;
            let r = restorer.above(r, e.fd)?;
            restorer.install(r, e.fd, e.close_on_exec)?;
            restorer.set_status_flags(e)?;
            restorer.restored.rebuilt.push(e.fd);
            continue;
        }
        if matches!(e.kind, FdKind::Pipe { .. }) {
            continue;
        }
        let rebuilt = restorer.rebuild(e)?;
        restorer.install(rebuilt, e.fd, e.close_on_exec)?;
        restorer.set_status_flags(e)?;
        restorer.restored.rebuilt.push(e.fd);
    }
    // Epoll instances are created empty, then the duplicates, and only
    // then the registrations: every number they watch (an epoll instance
    // too) is in place by then.
    for e in primaries().filter(pending).filter(is_epoll) {
        let created = epoll::create(epoll::CreateFlags::CLOEXEC).map_err(rebuild_error(e.fd, "epoll_create"))?;
        let created = restorer.above(created, e.fd)?;
        restorer.install(created, e.fd, e.close_on_exec)?;
        restorer.restored.rebuilt.push(e.fd);
    }
    for e in duplicates().filter(pending) {
        let Some(original) = e.same_description_as else {
            continue;
        };
        // SAFETY: dup3 takes numbers and reads no memory; the target is one
        // of the table's numbers, kept free for it.
        let r = unsafe { libc::dup3(original, e.fd, cloexec_flag(e.close_on_exec)) };
        if r < 0 {
            return Err(Error::Rebuild {
                fd: e.fd,
                what: format!("dup3 of fd {original}"),
                source: io::Error::last_os_error(),
            });
        }
        restorer.restored.rebuilt.push(e.fd);
    }
    for e in primaries().filter(pending) {
        if let FdKind::Epoll { registrations } = &e.kind {
            register_epoll(e, registrations)?;
            restorer.set_status_flags(e)?;
        }
    }
    restorer.restored.rebuilt.sort_unstable();
    Ok(restorer.restored)
}

fn cloexec_flag(close_on_exec: bool) -> libc::c_int {
    if close_on_exec {
        libc::O_CLOEXEC
    } else {
        0
    }
}

fn rebuild_error(fd: RawFd, what: &str) -> impl Fn(rustix::io::Errno) -> Error + '_ {
    move |e| Error::Rebuild { fd, what: what.to_string(), source: e.into() }
}

/// A descriptor number of the calling process, borrowed.
fn borrow(fd: RawFd) -> std::os::fd::BorrowedFd<'static> {
    // SAFETY: used only on numbers restore has just installed and that stay
    // open for the rest of the process (they are the application's), and
    // only for the duration of one call.
    unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }
}

struct Restorer {
    /// The lowest number above every number of the table: scratch
    /// descriptors and moved-aside ones live from here up.
    floor: RawFd,
    restored: Restored,
}

impl Restorer {
    /// `fd` moved to a number above the table's, so that installing other
    /// entries cannot close it.
    fn above(&self, fd: OwnedFd, for_fd: RawFd) -> Result<OwnedFd> {
        if fd.as_raw_fd() >= self.floor {
            return Ok(fd);
        }
        rustix::io::fcntl_dupfd_cloexec(&fd, self.floor)
            .map_err(rebuild_error(for_fd, "F_DUPFD_CLOEXEC above the table"))
    }

    /// Put `fd` at `target`, replacing whatever is there.
    fn install(&self, fd: OwnedFd, target: RawFd, close_on_exec: bool) -> Result<()> {
        // SAFETY: dup3 takes numbers and reads no memory; `target` is one of
        // the table's numbers, which nothing of the caller holds any more.
        let r = unsafe { libc::dup3(fd.as_raw_fd(), target, cloexec_flag(close_on_exec)) };
        if r < 0 {
            return Err(Error::Rebuild {
                fd: target,
                what: "dup3 onto its number".into(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Move every descriptor of the caller that sits on one of the table's
    /// numbers above them, keeping its close-on-exec flag.
    fn move_aside(&mut self, table: &FdTable) -> Result<()> {
        let wanted: BTreeSet<RawFd> = table.fds.iter().map(|e| e.fd).collect();
        let dir = "/proc/self/fd";
        let listing: Vec<RawFd> = std::fs::read_dir(dir)
            .map_err(|source| Error::Proc { path: dir.into(), source })?
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect();
        for fd in listing {
            if !wanted.contains(&fd) {
                continue;
            }
            // The listing's own descriptor is closed by now: skip it.
            let Ok(fd_flags) = rustix::io::fcntl_getfd(borrow(fd)) else {
                continue;
            };
            let cmd =
                if fd_flags.contains(rustix::io::FdFlags::CLOEXEC) { libc::F_DUPFD_CLOEXEC } else { libc::F_DUPFD };
            // SAFETY: fcntl(F_DUPFD*) takes numbers only.
            let now = unsafe { libc::fcntl(fd, cmd, self.floor) };
            if now < 0 {
                return Err(Error::MoveAside { fd, source: io::Error::last_os_error() });
            }
            // SAFETY: `fd` is the caller's descriptor we just duplicated;
            // the caller learns its new number from `moved_aside`.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
            self.restored.moved_aside.push(MovedAside { was: fd, now });
        }
        Ok(())
    }

    /// Status flags the description had that opening it did not give
    /// (`O_NONBLOCK` of a pipe or an eventfd, `O_APPEND`, ...).
    fn set_status_flags(&self, e: &FdEntry) -> Result<()> {
        set_status_flags(borrow(e.fd), e)
    }

    /// A new open file description for `e` (not a pipe, not epoll).
    fn rebuild(&self, e: &FdEntry) -> Result<OwnedFd> {
        let fd = e.fd;
        let new = match &e.kind {
            FdKind::File { path, offset, .. } => self.reopen(fd, path, e.flags.reopen(), *offset)?,
            FdKind::Directory { path, offset } => {
                let flags = e.flags.reopen() | OFlags::DIRECTORY;
                self.reopen(fd, path, flags, *offset)?
            }
            FdKind::CharDevice { path, .. } => rustix::fs::open(path.as_str(), e.flags.reopen(), Mode::empty())
                .map_err(rebuild_error(fd, &format!("opening {path}")))?,
            FdKind::EventFd { count, semaphore } => {
                let mut flags = EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK;
                if *semaphore {
                    flags |= EventfdFlags::SEMAPHORE;
                }
                let efd = eventfd(0, flags).map_err(rebuild_error(fd, "eventfd"))?;
                // Written rather than given to eventfd(): a count can be
                // wider than eventfd's u32 initial value.
                if *count > 0 {
                    rustix::io::write(&efd, &count.to_ne_bytes())
                        .map_err(rebuild_error(fd, "writing the eventfd count"))?;
                }
                efd
            }
            FdKind::TimerFd(timer) => rebuild_timer(fd, timer)?,
            FdKind::SignalFd { mask } => rebuild_signalfd(fd, *mask)?,
            FdKind::Pipe { .. }
            | FdKind::Epoll { .. }
            | FdKind::MemoryFile { .. }
            | FdKind::Socket { .. }
            | FdKind::Other { .. } => {
                return Err(Error::NotSupplied { fd, why: format!("{:?} is not rebuilt from the table", e.kind) })
            }
        };
        self.above(new, fd)
    }

    fn reopen(&self, fd: RawFd, path: &str, flags: OFlags, offset: u64) -> Result<OwnedFd> {
        let file =
            rustix::fs::open(path, flags, Mode::empty()).map_err(rebuild_error(fd, &format!("opening {path}")))?;
        if offset != 0 && !flags.contains(OFlags::PATH) {
            rustix::fs::seek(&file, SeekFrom::Start(offset))
                .map_err(rebuild_error(fd, &format!("seeking to {offset}")))?;
        }
        Ok(file)
    }

    /// Each pipe once: a new pipe (or the FIFO opened again), its capacity,
    /// its bytes, then every end of it at its number.
    fn rebuild_pipes(&mut self, table: &FdTable, installed: &BTreeSet<RawFd>) -> Result<()> {
        let mut done = BTreeSet::new();
        for e in &table.fds {
            let FdKind::Pipe { inode, fifo, .. } = &e.kind else {
                continue;
            };
            if installed.contains(&e.fd)
                || e.same_description_as.is_some()
                || e.disposition != Disposition::Rebuild
                || !done.insert(*inode)
            {
                continue;
            }
            let ends: Vec<&FdEntry> = table
                .fds
                .iter()
                .filter(|o| {
                    matches!(&o.kind, FdKind::Pipe { inode: i, .. } if i == inode)
                        && o.same_description_as.is_none()
                        && !installed.contains(&o.fd)
                })
                .collect();
            let contents = table.pipe_contents(*inode);
            let (reader, writer) = match fifo {
                None => {
                    let (r, w) = rustix::pipe::pipe_with(PipeFlags::CLOEXEC).map_err(rebuild_error(e.fd, "pipe2"))?;
                    (self.above(r, e.fd)?, self.above(w, e.fd)?)
                }
                // O_RDWR never blocks on a FIFO: it holds both sides open
                // while the ends are opened and the bytes written back.
                Some(path) => {
                    let both = rustix::fs::open(
                        path.as_str(),
                        OFlags::RDWR | OFlags::CLOEXEC | OFlags::NONBLOCK,
                        Mode::empty(),
                    )
                    .map_err(rebuild_error(e.fd, &format!("opening the FIFO {path}")))?;
                    let both = self.above(both, e.fd)?;
                    let other = rustix::io::fcntl_dupfd_cloexec(&both, self.floor)
                        .map_err(rebuild_error(e.fd, "F_DUPFD_CLOEXEC"))?;
                    (both, other)
                }
            };
            if let Some(c) = contents {
                let size = rustix::pipe::fcntl_getpipe_size(&writer).map_err(rebuild_error(e.fd, "F_GETPIPE_SZ"))?;
                if size != c.capacity {
                    rustix::pipe::fcntl_setpipe_size(&writer, c.capacity)
                        .map_err(rebuild_error(e.fd, &format!("F_SETPIPE_SZ to {} bytes", c.capacity)))?;
                }
                write_all(&writer, &c.buffered).map_err(|source| Error::Rebuild {
                    fd: e.fd,
                    what: format!("writing back the {} bytes the pipe held", c.buffered.len()),
                    source,
                })?;
            }
            for end in ends {
                let FdKind::Pipe { end: side, .. } = &end.kind else {
                    continue;
                };
                let new = match (fifo, side) {
                    (None, PipeEnd::Read) => rustix::io::fcntl_dupfd_cloexec(&reader, self.floor),
                    (None, PipeEnd::Write) => rustix::io::fcntl_dupfd_cloexec(&writer, self.floor),
                    // An anonymous pipe has no path; /proc opens it again
                    // (as it did for the original).
                    (None, PipeEnd::ReadWrite) => rustix::fs::open(
                        format!("/proc/self/fd/{}", reader.as_raw_fd()).as_str(),
                        OFlags::RDWR | OFlags::CLOEXEC,
                        Mode::empty(),
                    ),
                    (Some(path), _) => {
                        rustix::fs::open(path.as_str(), end.flags.reopen() | OFlags::NONBLOCK, Mode::empty())
                    }
                }
                .map_err(rebuild_error(end.fd, "opening its end of the pipe"))?;
                let new = self.above(new, end.fd)?;
                self.install(new, end.fd, end.close_on_exec)?;
                self.set_status_flags(end)?;
                self.restored.rebuilt.push(end.fd);
            }
        }
        Ok(())
    }
}

/// Give `fd` the status flags `e`'s description had that opening it did
/// not give (`O_NONBLOCK` of a pipe or an eventfd, `O_APPEND`, ...).
pub fn set_status_flags(fd: std::os::fd::BorrowedFd<'_>, e: &FdEntry) -> Result<()> {
    if e.flags.access_mode() == AccessMode::Path {
        return Ok(());
    }
    let now = rustix::fs::fcntl_getfl(fd).map_err(rebuild_error(e.fd, "F_GETFL"))?;
    let settable = OFlags::from_bits_retain(SETTABLE_FLAGS);
    let want = (now - settable) | (OFlags::from_bits_retain(e.flags.0) & settable);
    if want != now {
        rustix::fs::fcntl_setfl(fd, want).map_err(rebuild_error(e.fd, "F_SETFL"))?;
    }
    Ok(())
}

/// A new open file description like `e`'s, with its offset and status
/// flags, at a number of its own (close-on-exec): for a description that
/// several processes share, rebuilt once and handed to each. Not for a
/// pipe ([`rebuild_pipe`]), an epoll instance, a socket or a memory file.
pub fn rebuild_description(e: &FdEntry) -> Result<OwnedFd> {
    let fd = Restorer { floor: 0, restored: Restored::default() }.rebuild(e)?;
    set_status_flags(fd.as_fd(), e)?;
    Ok(fd)
}

/// A new anonymous pipe of the capacity `contents` says, holding its bytes:
/// (reading end, writing end), close-on-exec, without status flags. `fd`
/// is a number one of its ends will have (for messages).
pub fn rebuild_pipe(contents: &PipeContents, fd: RawFd) -> Result<(OwnedFd, OwnedFd)> {
    let (r, w) = rustix::pipe::pipe_with(PipeFlags::CLOEXEC).map_err(rebuild_error(fd, "pipe2"))?;
    let size = rustix::pipe::fcntl_getpipe_size(&w).map_err(rebuild_error(fd, "F_GETPIPE_SZ"))?;
    if size != contents.capacity {
        rustix::pipe::fcntl_setpipe_size(&w, contents.capacity)
            .map_err(rebuild_error(fd, &format!("F_SETPIPE_SZ to {} bytes", contents.capacity)))?;
    }
    write_all(&w, &contents.buffered).map_err(|source| Error::Rebuild {
        fd,
        what: format!("writing back the {} bytes the pipe held", contents.buffered.len()),
        source,
    })?;
    Ok((r, w))
}

/// The bytes in the pipe at descriptor `fd` of process `pid` (which
/// should be frozen), read without taking them, through a reading end
/// opened again by /proc.
pub fn pipe_contents_at(pid: i32, fd: RawFd, inode: u64) -> Result<PipeContents> {
    let path = proc_path(pid, &format!("fd/{fd}"));
    let reader =
        rustix::fs::open(&path, OFlags::RDONLY | OFlags::NONBLOCK | OFlags::CLOEXEC, Mode::empty()).map_err(|e| {
            Error::Inspect { pid, fd, what: "opening the pipe for reading through /proc", source: e.into() }
        })?;
    peek_pipe(pid, fd, inode, reader.as_fd())
}

fn write_all(fd: &OwnedFd, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        let n = rustix::io::write(fd, bytes)?;
        bytes = &bytes[n..];
    }
    Ok(())
}

const TFD_IOC_SET_TICKS: libc::c_ulong = 0x4008_5400; // _IOW('T', 0, u64)

fn rebuild_timer(fd: RawFd, timer: &TimerFdState) -> Result<OwnedFd> {
    let tfd = rustix::time::timerfd_create(timer.clock.timerfd_clock(), TimerfdFlags::CLOEXEC)
        .map_err(rebuild_error(fd, "timerfd_create"))?;
    if !timer.remaining.is_zero() {
        let (flags, value) = match timer.realtime_deadline {
            Some(deadline) => {
                let mut flags = TimerfdTimerFlags::ABSTIME;
                if timer.cancel_on_set {
                    flags |= TimerfdTimerFlags::CANCEL_ON_SET;
                }
                (flags, deadline)
            }
            None => (TimerfdTimerFlags::empty(), timer.remaining),
        };
        let spec = Itimerspec { it_interval: timespec_of(timer.interval), it_value: timespec_of(value) };
        rustix::time::timerfd_settime(&tfd, flags, &spec).map_err(rebuild_error(fd, "timerfd_settime"))?;
    }
    if timer.ticks > 0 {
        // SAFETY: TFD_IOC_SET_TICKS reads one u64 from the pointer, which
        // points at a live u64.
        let r = unsafe { libc::ioctl(tfd.as_raw_fd(), TFD_IOC_SET_TICKS, &timer.ticks) };
        if r < 0 {
            return Err(Error::Rebuild {
                fd,
                what: format!(
                    "putting back {} unread expirations (TFD_IOC_SET_TICKS needs \
                     CONFIG_CHECKPOINT_RESTORE)",
                    timer.ticks
                ),
                source: io::Error::last_os_error(),
            });
        }
    }
    Ok(tfd)
}

fn rebuild_signalfd(fd: RawFd, mask: u64) -> Result<OwnedFd> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it fully.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t we own.
    unsafe { libc::sigemptyset(&mut set) };
    for bit in 0..64 {
        if mask & (1 << bit) != 0 {
            // SAFETY: as above; an invalid signal number only fails.
            unsafe { libc::sigaddset(&mut set, bit + 1) };
        }
    }
    // SAFETY: -1 asks for a new signalfd; `set` is initialised.
    let r = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC) };
    if r < 0 {
        return Err(Error::Rebuild { fd, what: "signalfd".into(), source: io::Error::last_os_error() });
    }
    // SAFETY: signalfd returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(r) })
}

fn register_epoll(e: &FdEntry, registrations: &[EpollRegistration]) -> Result<()> {
    let epfd = borrow(e.fd);
    for r in registrations {
        // EPOLLERR and EPOLLHUP are always reported: fdinfo shows them, and
        // giving them back is harmless.
        epoll::add(
            epfd,
            borrow(r.fd),
            epoll::EventData::new_u64(r.data),
            epoll::EventFlags::from_bits_retain(r.events),
        )
        .map_err(rebuild_error(e.fd, &format!("registering fd {}", r.fd)))?;
    }
    Ok(())
}

/// Give the calling process the captured cwd, umask and resource limits.
/// Separate from [`restore`] because they belong to the process that will
/// run the application, which is not always the one that rebuilds the
/// descriptors. Raising a hard limit needs `CAP_SYS_RESOURCE`.
pub fn apply_process_fs(settings: &ProcessFs) -> Result<()> {
    std::env::set_current_dir(&settings.cwd)
        .map_err(|source| Error::ProcessSetting { what: format!("changing directory to {}", settings.cwd), source })?;
    rustix::process::umask(Mode::from_bits_retain(settings.umask));
    for limit in &settings.limits {
        let Some(&(_, resource)) = RESOURCES.iter().find(|(n, _)| *n == limit.resource) else {
            return Err(Error::ProcessSetting {
                what: format!("unknown resource limit {}", limit.resource),
                source: io::Error::from(io::ErrorKind::InvalidInput),
            });
        };
        let new = libc::rlimit {
            rlim_cur: limit.soft.unwrap_or(libc::RLIM_INFINITY),
            rlim_max: limit.hard.unwrap_or(libc::RLIM_INFINITY),
        };
        // SAFETY: `new` is a valid rlimit; a null old limit is not written.
        let r = unsafe { libc::prlimit(0, resource, &new, std::ptr::null_mut()) };
        if r != 0 {
            return Err(Error::ProcessSetting {
                what: format!("setting RLIMIT_{}", limit.resource),
                source: io::Error::last_os_error(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Read};
    use std::process::{Child, Command, Stdio};

    // ------------------------------------------------------------ units

    #[test]
    fn fdinfo_of_an_epoll_instance() {
        let text = "pos:\t0\nflags:\t02000002\nmnt_id:\t17\nino:\t26\n\
                    tfd:        3 events:       19 data:                3  pos:0 ino:1a sdev:10\n\
                    tfd:        4 events: 80000019 data:     deadbeef0004  pos:0 ino:8a729 sdev:f\n";
        let info = parse_fdinfo(text).unwrap();
        assert_eq!(info.flags, 0o2000002);
        assert_eq!(
            info.epoll,
            vec![
                EpollWatch { registration: EpollRegistration { fd: 3, events: 0x19, data: 3 }, inode: 0x1a },
                EpollWatch {
                    registration: EpollRegistration { fd: 4, events: 0x8000_0019, data: 0xdead_beef_0004 },
                    inode: 0x8a729,
                },
            ]
        );
    }

    #[test]
    fn fdinfo_of_an_eventfd_and_a_timerfd() {
        let eventfd = parse_fdinfo(
            "pos:\t0\nflags:\t04002\nmnt_id:\t17\nino:\t26\n\
             eventfd-count:               11\neventfd-id: 1\neventfd-semaphore: 1\n",
        )
        .unwrap();
        assert_eq!(eventfd.fields["eventfd-count"], "11");
        assert_eq!(eventfd.fields["eventfd-semaphore"], "1");
        let flags = OpenFlags(eventfd.flags);
        assert!(flags.nonblocking() && !flags.append());
        assert_eq!(flags.access_mode(), AccessMode::ReadWrite);

        let timer = parse_fdinfo(
            "pos:\t0\nflags:\t02\nmnt_id:\t17\nino:\t26\nclockid: 1\nticks: 0\n\
             settime flags: 01\nit_value: (9, 999335690)\nit_interval: (1, 0)\n",
        )
        .unwrap();
        assert_eq!(timer.fields["settime flags"], "01");
        assert_eq!(timer.fields["it_value"], "(9, 999335690)");
    }

    #[test]
    fn unmovable_entries_are_named_by_number() {
        let entry = |fd, disposition| FdEntry {
            fd,
            close_on_exec: false,
            flags: OpenFlags(2),
            same_description_as: None,
            kind: FdKind::Other { link: "x".into() },
            disposition,
        };
        let table = FdTable {
            pid: 1,
            fds: vec![
                entry(3, Disposition::Rebuild),
                entry(7, cannot_move("a unix socket")),
                entry(8, supply("a terminal")),
            ],
            pipes: vec![],
            process: ProcessFs { cwd: "/".into(), umask: 0o22, limits: vec![] },
        };
        let unmovable: Vec<String> = table.unmovable().iter().map(|u| u.to_string()).collect();
        assert_eq!(unmovable, ["fd 7: a unix socket"]);
        assert_eq!(table.to_supply(), [(8, "a terminal")]);
        let json = serde_json::to_string(&table).unwrap();
        assert_eq!(serde_json::from_str::<FdTable>(&json).unwrap(), table);
    }

    #[test]
    fn check_wants_read_only_files_unchanged_and_written_ones_present() {
        let dir = tempfile::tempdir().unwrap();
        let read_only = dir.path().join("ro");
        let written = dir.path().join("rw");
        std::fs::write(&read_only, b"contents").unwrap();
        std::fs::write(&written, b"contents").unwrap();
        let file = |fd, path: &Path, flags| {
            let meta = std::fs::metadata(path).unwrap();
            FdEntry {
                fd,
                close_on_exec: true,
                flags: OpenFlags(flags),
                same_description_as: None,
                kind: FdKind::File {
                    path: path.to_str().unwrap().into(),
                    offset: 0,
                    identity: FileIdentity {
                        dev: meta.dev(),
                        inode: meta.ino(),
                        size: meta.size(),
                        mtime_sec: meta.mtime(),
                        mtime_nsec: meta.mtime_nsec(),
                    },
                },
                disposition: Disposition::Rebuild,
            }
        };
        let table = FdTable {
            pid: 1,
            fds: vec![file(3, &read_only, libc::O_RDONLY as u32), file(4, &written, libc::O_WRONLY as u32)],
            pipes: vec![],
            process: ProcessFs { cwd: "/".into(), umask: 0o22, limits: vec![] },
        };
        check(&table).unwrap();

        // The application's own writes: fine.
        std::fs::write(&written, b"longer contents").unwrap();
        check(&table).unwrap();

        std::fs::write(&read_only, b"other contents").unwrap();
        let Err(Error::Mismatch(problems)) = check(&table) else {
            panic!("a changed read-only file must fail the check");
        };
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].fd, 3);
        assert!(problems[0].problem.contains("size"), "{}", problems[0]);

        std::fs::remove_file(&written).unwrap();
        let Err(Error::Mismatch(problems)) = check(&table) else {
            panic!("a missing file must fail the check");
        };
        assert_eq!(problems.iter().map(|p| p.fd).collect::<Vec<_>>(), [3, 4]);
    }

    // ------------------------------------------------ helper processes

    /// The tests start helper processes that are this test binary again,
    /// running only this test, with the role in this variable; without it
    /// this test does nothing.
    const ROLE: &str = "LWK_FDS_TEST_ROLE";
    const WORK_DIR: &str = "LWK_FDS_TEST_DIR";
    const TABLE_FILE: &str = "LWK_FDS_TEST_TABLE";

    #[test]
    fn helper_process() {
        let Ok(role) = std::env::var(ROLE) else {
            return;
        };
        let code = match role.as_str() {
            "hold" => hold(HeldSet::Movable),
            "hold-unmovable" => hold(HeldSet::Unmovable),
            "restore" => match restore_and_verify() {
                Ok(()) => 0,
                Err(message) => {
                    eprintln!("restore helper: {message}");
                    1
                }
            },
            other => {
                eprintln!("unknown helper role {other}");
                2
            }
        };
        std::process::exit(code);
    }

    fn helper(role: &str) -> Command {
        let mut command = Command::new(std::env::current_exe().unwrap());
        command.args(["--exact", "fds::tests::helper_process", "--nocapture", "--test-threads=1"]).env(ROLE, role);
        command
    }

    /// A helper holding descriptors, started and ready to be captured.
    struct Holder {
        child: Child,
    }

    impl Holder {
        fn start(role: &str, dir: &Path) -> Holder {
            let mut child =
                // Its stderr is not the test runner's, which may be a file
                // that grows between two captures.
                helper(role)
                    .env(WORK_DIR, dir)
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap();
            // The test harness of the helper prints its own lines first.
            let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
            let ready = lines.any(|line| line.is_ok_and(|l| l.ends_with("ready")));
            assert!(ready, "the helper did not get ready");
            Holder { child }
        }
        fn pid(&self) -> i32 {
            self.child.id() as i32
        }
    }

    impl Drop for Holder {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// Put `fd` at number `n`.
    fn place(fd: OwnedFd, n: RawFd, close_on_exec: bool) {
        // SAFETY: dup3 takes numbers; `n` is free in the helper, which
        // closed everything above 2.
        let r = unsafe { libc::dup3(fd.as_raw_fd(), n, cloexec_flag(close_on_exec)) };
        assert_eq!(r, n, "dup3 to {n}: {}", io::Error::last_os_error());
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    const DATA_FILE: RawFd = 10;
    const DATA_FILE_DUP: RawFd = 11;
    const DIRECTORY: RawFd = 12;
    const PIPE_READ: RawFd = 13;
    const PIPE_WRITE: RawFd = 14;
    const EVENTFD: RawFd = 15;
    const SEMAPHORE: RawFd = 16;
    const TIMERFD: RawFd = 17;
    const EPOLL: RawFd = 18;
    const DEV_NULL: RawFd = 19;
    const SIGNALFD: RawFd = 20;
    const READ_ONLY_FILE: RawFd = 21;
    const FIFO_BOTH: RawFd = 22;
    const FIFO_READ: RawFd = 23;
    const WALL_CLOCK_TIMER: RawFd = 24;
    const LAST: RawFd = WALL_CLOCK_TIMER;

    const FIFO_BYTES: &[u8] = b"in the fifo";
    const UMASK: u32 = 0o027;
    const NOFILE_SOFT: u64 = 1000;

    const PIPE_BYTES: usize = 10 * 1024;
    const PIPE_CAPACITY: usize = 128 * 1024;
    const PIPE_DATA: u64 = 0x1111_0013;
    const EVENTFD_DATA: u64 = 0x2222_0015;
    const SIGNAL_MASK: u64 = (1 << (libc::SIGUSR1 - 1)) | (1 << (libc::SIGUSR2 - 1));

    const UNIX_A: RawFd = 10;
    const UNIX_B: RawFd = 11;
    const INOTIFY: RawFd = 12;
    const DELETED_FILE: RawFd = 13;
    const TCP_LISTENER: RawFd = 14;

    enum HeldSet {
        Movable,
        Unmovable,
    }

    /// The helper that holds descriptors: sets them up at known numbers,
    /// says "ready" and waits for its stdin to close.
    fn hold(set: HeldSet) -> i32 {
        // Nothing but the descriptors of the test (and stdio).
        // SAFETY: close_range takes numbers; this process uses none above 2.
        unsafe { libc::syscall(libc::SYS_close_range, 3, u32::MAX, 0) };
        let dir = PathBuf::from(std::env::var_os(WORK_DIR).unwrap());
        match set {
            HeldSet::Movable => hold_movable(&dir),
            HeldSet::Unmovable => hold_unmovable(&dir),
        }
        rustix::io::write(std::io::stdout().as_fd(), b"ready\n").unwrap();
        let mut rest = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut rest);
        0
    }

    fn hold_movable(dir: &Path) {
        let data = rustix::fs::open(
            dir.join("data"),
            OFlags::RDWR | OFlags::CREATE | OFlags::APPEND | OFlags::CLOEXEC,
            Mode::from_bits_truncate(0o644),
        )
        .unwrap();
        rustix::io::write(&data, &pattern(100)).unwrap();
        rustix::fs::seek(&data, SeekFrom::Start(40)).unwrap();
        place(data.try_clone().unwrap(), DATA_FILE, true);
        place(data, DATA_FILE_DUP, true);

        let directory =
            rustix::fs::open(dir, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty()).unwrap();
        place(directory, DIRECTORY, true);

        let (r, w) = rustix::pipe::pipe_with(PipeFlags::CLOEXEC).unwrap();
        rustix::pipe::fcntl_setpipe_size(&w, PIPE_CAPACITY).unwrap();
        write_all(&w, &pattern(PIPE_BYTES)).unwrap();
        rustix::fs::fcntl_setfl(&w, OFlags::NONBLOCK).unwrap();
        place(r, PIPE_READ, true);
        place(w, PIPE_WRITE, true);

        let counter = eventfd(5, EventfdFlags::NONBLOCK).unwrap();
        place(counter, EVENTFD, true);
        let semaphore = eventfd(17, EventfdFlags::SEMAPHORE).unwrap();
        place(semaphore, SEMAPHORE, true);

        let timer = rustix::time::timerfd_create(TimerfdClockId::Monotonic, TimerfdFlags::empty()).unwrap();
        let spec = Itimerspec {
            it_interval: timespec_of(Duration::from_secs(1)),
            it_value: timespec_of(Duration::from_secs(10)),
        };
        rustix::time::timerfd_settime(&timer, TimerfdTimerFlags::empty(), &spec).unwrap();
        place(timer, TIMERFD, true);

        let ep = epoll::create(epoll::CreateFlags::empty()).unwrap();
        epoll::add(&ep, borrow(PIPE_READ), epoll::EventData::new_u64(PIPE_DATA), epoll::EventFlags::IN).unwrap();
        epoll::add(
            &ep,
            borrow(EVENTFD),
            epoll::EventData::new_u64(EVENTFD_DATA),
            epoll::EventFlags::IN | epoll::EventFlags::ET,
        )
        .unwrap();
        place(ep, EPOLL, true);

        let null = rustix::fs::open("/dev/null", OFlags::RDWR, Mode::empty()).unwrap();
        place(null, DEV_NULL, false);

        let sfd = rebuild_signalfd(SIGNALFD, SIGNAL_MASK).unwrap();
        place(sfd, SIGNALFD, true);

        std::fs::write(dir.join("ro"), b"read only").unwrap();
        let ro = rustix::fs::open(dir.join("ro"), OFlags::RDONLY, Mode::empty()).unwrap();
        place(ro, READ_ONLY_FILE, true);

        let fifo = dir.join("fifo");
        rustix::fs::mkfifoat(rustix::fs::CWD, &fifo, Mode::from_bits_truncate(0o600)).unwrap();
        let both = rustix::fs::open(&fifo, OFlags::RDWR, Mode::empty()).unwrap();
        let reader = rustix::fs::open(&fifo, OFlags::RDONLY | OFlags::NONBLOCK, Mode::empty()).unwrap();
        write_all(&both, FIFO_BYTES).unwrap();
        place(both, FIFO_BOTH, true);
        place(reader, FIFO_READ, true);

        // Twenty seconds from now, in wall-clock time.
        let wall = rustix::time::timerfd_create(TimerfdClockId::Realtime, TimerfdFlags::empty()).unwrap();
        let now = duration_of(rustix::time::clock_gettime(rustix::time::ClockId::Realtime));
        let spec = Itimerspec {
            it_interval: timespec_of(Duration::ZERO),
            it_value: timespec_of(now + Duration::from_secs(20)),
        };
        rustix::time::timerfd_settime(&wall, TimerfdTimerFlags::ABSTIME, &spec).unwrap();
        place(wall, WALL_CLOCK_TIMER, true);

        std::env::set_current_dir(dir).unwrap();
        rustix::process::umask(Mode::from_bits_truncate(UMASK));
        let nofile = libc::rlimit { rlim_cur: NOFILE_SOFT, rlim_max: NOFILE_SOFT * 2 };
        // SAFETY: `nofile` is a valid rlimit.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &nofile) }, 0);
    }

    fn hold_unmovable(dir: &Path) {
        use rustix::net::{AddressFamily, SocketFlags, SocketType as RxType};
        let (a, b) = rustix::net::socketpair(AddressFamily::UNIX, RxType::STREAM, SocketFlags::empty(), None).unwrap();
        place(a, UNIX_A, true);
        place(b, UNIX_B, true);
        let inotify = rustix::fs::inotify::init(rustix::fs::inotify::CreateFlags::empty()).unwrap();
        place(inotify, INOTIFY, true);
        let path = dir.join("deleted");
        let deleted = rustix::fs::open(&path, OFlags::RDWR | OFlags::CREATE, Mode::from_bits_truncate(0o600)).unwrap();
        std::fs::remove_file(&path).unwrap();
        place(deleted, DELETED_FILE, true);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        place(OwnedFd::from(listener), TCP_LISTENER, true);
    }

    // --------------------------------------------------------- capture

    fn kind_of(table: &FdTable, fd: RawFd) -> &FdKind {
        &table.entry(fd).unwrap_or_else(|| panic!("no fd {fd} in {table:#?}")).kind
    }

    #[test]
    #[ignore = "needs root (pidfd_getfd of another process)"]
    fn capture_check_and_restore_in_another_process() {
        let dir = tempfile::tempdir().unwrap();
        let holder = Holder::start("hold", dir.path());
        let table = capture(holder.pid()).unwrap();
        let again = capture(holder.pid()).unwrap();
        drop(holder);

        // Peeking left the pipe as it was.
        assert_eq!(table.pipes, again.pipes);
        assert_captured_as_set_up(&table, dir.path());
        check(&table).unwrap();
        let json = serde_json::to_string_pretty(&table).unwrap();
        assert_eq!(serde_json::from_str::<FdTable>(&json).unwrap(), table);

        let table_file = dir.path().join("table.json");
        std::fs::write(&table_file, &json).unwrap();
        let output = helper("restore")
            .env(TABLE_FILE, &table_file)
            .env(WORK_DIR, dir.path())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "the restore helper failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );

        // The file opened read-only changes: the next check says so.
        std::fs::write(dir.path().join("ro"), b"changed since").unwrap();
        let Err(Error::Mismatch(problems)) = check(&table) else {
            panic!("check must see the changed read-only file");
        };
        assert_eq!(problems.iter().map(|p| p.fd).collect::<Vec<_>>(), [READ_ONLY_FILE]);
    }

    fn assert_captured_as_set_up(table: &FdTable, dir: &Path) {
        let numbers: Vec<RawFd> = table.fds.iter().map(|e| e.fd).filter(|&fd| fd > 2).collect();
        assert_eq!(numbers, (DATA_FILE..=LAST).collect::<Vec<_>>());
        // stdin and stdout are pipes to the test: outside the application.
        for fd in [0, 1] {
            let e = table.entry(fd).unwrap();
            assert!(matches!(e.kind, FdKind::Pipe { fifo: None, .. }), "{e:?}");
            assert!(matches!(&e.disposition, Disposition::Supply { why } if why.contains("outside")), "{e:?}");
        }
        for e in table.fds.iter().filter(|e| e.fd > 2) {
            assert_eq!(e.disposition, Disposition::Rebuild, "{e:?}");
            assert_eq!(e.close_on_exec, e.fd != DEV_NULL, "{e:?}");
        }

        let data = table.entry(DATA_FILE).unwrap();
        let FdKind::File { path, offset, identity } = &data.kind else {
            panic!("{data:?}");
        };
        assert_eq!(Path::new(path), dir.join("data"));
        assert_eq!((*offset, identity.size), (40, 100));
        assert!(data.flags.append());
        assert_eq!(data.flags.access_mode(), AccessMode::ReadWrite);
        assert_eq!(table.entry(DATA_FILE_DUP).unwrap().same_description_as, Some(DATA_FILE));

        assert!(matches!(kind_of(table, DIRECTORY), FdKind::Directory { path, .. } if Path::new(path) == dir));

        let (
            FdKind::Pipe { inode: read_inode, end: PipeEnd::Read, fifo: None },
            FdKind::Pipe { inode: write_inode, end: PipeEnd::Write, fifo: None },
        ) = (kind_of(table, PIPE_READ), kind_of(table, PIPE_WRITE))
        else {
            panic!("pipe ends: {table:#?}");
        };
        assert_eq!(read_inode, write_inode);
        assert!(table.entry(PIPE_WRITE).unwrap().flags.nonblocking());
        let contents = table.pipe_contents(*read_inode).unwrap();
        assert_eq!(contents.capacity, PIPE_CAPACITY);
        assert!(contents.buffered == pattern(PIPE_BYTES), "the pipe's bytes differ");
        // Once per pipe (and FIFO): the stdio pipes to the test are not
        // captured.
        assert_eq!(table.pipes.len(), 2);

        assert_eq!(*kind_of(table, EVENTFD), FdKind::EventFd { count: 5, semaphore: false });
        assert!(table.entry(EVENTFD).unwrap().flags.nonblocking());
        assert_eq!(*kind_of(table, SEMAPHORE), FdKind::EventFd { count: 17, semaphore: true });

        let FdKind::TimerFd(timer) = kind_of(table, TIMERFD) else {
            panic!("{table:#?}");
        };
        assert_eq!(timer.clock, TimerClock::Monotonic);
        assert!(!timer.absolute && timer.realtime_deadline.is_none());
        assert_eq!(timer.interval, Duration::from_secs(1));
        assert!(timer.remaining > Duration::from_secs(5) && timer.remaining <= Duration::from_secs(10), "{timer:?}");

        let FdKind::Epoll { registrations } = kind_of(table, EPOLL) else {
            panic!("{table:#?}");
        };
        let mut registrations = registrations.clone();
        registrations.sort_by_key(|r| r.fd);
        let hup_err = (libc::EPOLLERR | libc::EPOLLHUP) as u32;
        assert_eq!(
            registrations,
            [
                EpollRegistration { fd: PIPE_READ, events: libc::EPOLLIN as u32 | hup_err, data: PIPE_DATA },
                EpollRegistration {
                    fd: EVENTFD,
                    events: (libc::EPOLLIN | libc::EPOLLET) as u32 | hup_err,
                    data: EVENTFD_DATA
                },
            ]
        );

        assert!(matches!(kind_of(table, DEV_NULL), FdKind::CharDevice { path, .. } if path == "/dev/null"));
        assert_eq!(*kind_of(table, SIGNALFD), FdKind::SignalFd { mask: SIGNAL_MASK });
        assert!(matches!(kind_of(table, READ_ONLY_FILE), FdKind::File { .. }));
        assert_eq!(table.entry(READ_ONLY_FILE).unwrap().flags.access_mode(), AccessMode::Read);

        let FdKind::Pipe { inode, end: PipeEnd::ReadWrite, fifo: Some(path) } = kind_of(table, FIFO_BOTH) else {
            panic!("{table:#?}");
        };
        assert_eq!(Path::new(path), dir.join("fifo"));
        assert!(matches!(kind_of(table, FIFO_READ), FdKind::Pipe { end: PipeEnd::Read, fifo: Some(_), .. }));
        assert_eq!(table.pipe_contents(*inode).unwrap().buffered, FIFO_BYTES);

        let FdKind::TimerFd(wall) = kind_of(table, WALL_CLOCK_TIMER) else {
            panic!("{table:#?}");
        };
        assert!(wall.absolute && wall.clock == TimerClock::Realtime && wall.realtime_deadline.is_some(), "{wall:?}");

        assert_eq!(Path::new(&table.process.cwd), dir);
        assert_eq!(table.process.umask, UMASK);
        let nofile = table.process.limits.iter().find(|l| l.resource == "NOFILE").unwrap();
        assert_eq!((nofile.soft, nofile.hard), (Some(NOFILE_SOFT), Some(NOFILE_SOFT * 2)));
        assert!(table.process.limits.iter().any(|l| l.resource == "NOFILE" && l.soft.is_some()));
    }

    #[test]
    #[ignore = "needs root (pidfd_getfd of another process)"]
    fn unmovable_descriptors_are_named_before_anything_stops() {
        let dir = tempfile::tempdir().unwrap();
        let holder = Holder::start("hold-unmovable", dir.path());
        let table = capture(holder.pid()).unwrap();
        drop(holder);

        let unmovable = table.unmovable();
        let numbers: Vec<RawFd> = unmovable.iter().map(|u| u.fd).filter(|&fd| fd > 2).collect();
        assert_eq!(numbers, [UNIX_A, UNIX_B, INOTIFY, DELETED_FILE], "{unmovable:?}");
        let said = |fd: RawFd| unmovable.iter().find(|u| u.fd == fd).unwrap().to_string();
        assert!(said(UNIX_A).starts_with("fd 10: a unix socket"), "{}", said(UNIX_A));
        assert!(said(INOTIFY).contains("inotify"), "{}", said(INOTIFY));
        assert!(said(DELETED_FILE).contains("deleted"), "{}", said(DELETED_FILE));
        assert!(matches!(
            kind_of(&table, UNIX_A),
            FdKind::Socket { family: SocketFamily::Unix, socket_type: SocketType::Stream, .. }
        ));

        // A TCP socket travels, but through lwk_migrate::sockets.
        let listener = table.entry(TCP_LISTENER).unwrap();
        assert!(matches!(
            listener.kind,
            FdKind::Socket {
                family: SocketFamily::Inet,
                socket_type: SocketType::Stream,
                protocol: libc::IPPROTO_TCP,
                ..
            }
        ));
        assert!(table.to_supply().iter().any(|&(fd, why)| fd == TCP_LISTENER && why.contains("TCP")));
    }

    // --------------------------------------------------------- restore

    /// The restore helper: rebuilds the table in itself, then looks at
    /// every descriptor. Its own stdio is handed in for the table's.
    fn restore_and_verify() -> Result<(), String> {
        let table_file = std::env::var_os(TABLE_FILE).ok_or("no table")?;
        let dir = PathBuf::from(std::env::var_os(WORK_DIR).ok_or("no work dir")?);
        let json = std::fs::read_to_string(table_file).map_err(|e| e.to_string())?;
        let table: FdTable = serde_json::from_str(&json).map_err(|e| e.to_string())?;

        // Something of ours in the way, to be moved aside.
        let zero = rustix::fs::open("/dev/zero", OFlags::RDONLY, Mode::empty()).map_err(|e| e.to_string())?;
        place(zero, PIPE_READ, false);

        let mut options = RestoreOptions::default();
        for (fd, own) in [(0, 0), (1, 1), (2, 2)] {
            let dup = borrow(own).try_clone_to_owned().map_err(|e| e.to_string())?;
            options.supplied.insert(fd, dup);
        }
        let restored = restore(&table, options).map_err(|e| e.to_string())?;

        let expect = |ok: bool, what: String| if ok { Ok(()) } else { Err(what) };
        expect(restored.supplied == [0, 1, 2], format!("supplied {:?}", restored.supplied))?;
        let rebuilt: Vec<RawFd> = (DATA_FILE..=LAST).collect();
        expect(restored.rebuilt == rebuilt, format!("rebuilt {:?}", restored.rebuilt))?;
        let moved = restored.moved_aside.iter().find(|m| m.was == PIPE_READ).ok_or("fd 13 was not moved aside")?;
        let moved_meta = File::from(borrow(moved.now).try_clone_to_owned().map_err(|e| e.to_string())?)
            .metadata()
            .map_err(|e| e.to_string())?;
        expect(moved_meta.rdev() == libc::makedev(1, 5), "fd 13 moved aside is not /dev/zero".into())?;

        // Before anything is read: what the process looks like from
        // outside is what was captured.
        let mine = capture(std::process::id() as i32).map_err(|e| e.to_string())?;
        // Standard streams are this helper's own (supplied above).
        for original in table.fds.iter().filter(|e| e.fd > 2 && e.disposition == Disposition::Rebuild) {
            let now = mine.entry(original.fd).ok_or(format!("fd {} is missing", original.fd))?;
            expect(
                comparable(original, &table) == comparable(now, &mine),
                format!("fd {}: captured\n{original:#?}\nrestored\n{now:#?}", original.fd),
            )?;
        }

        verify_by_use(&dir)?;

        apply_process_fs(&table.process).map_err(|e| e.to_string())?;
        let cwd = std::env::current_dir().map_err(|e| e.to_string())?;
        expect(cwd == dir, format!("cwd {cwd:?}"))?;
        let umask = rustix::process::umask(Mode::empty());
        expect(umask.bits() == UMASK, format!("umask {umask:?}"))?;
        let nofile = rustix::process::getrlimit(rustix::process::Resource::Nofile);
        expect(nofile.current == Some(NOFILE_SOFT), format!("RLIMIT_NOFILE {nofile:?}"))?;
        Ok(())
    }

    /// An entry with what may differ between two captures taken apart
    /// (pipe inode, time left, epoll registration order) made equal.
    fn comparable(entry: &FdEntry, table: &FdTable) -> (FdEntry, Option<PipeContents>) {
        let mut entry = entry.clone();
        let mut contents = None;
        match &mut entry.kind {
            FdKind::Pipe { inode, .. } => {
                contents = table.pipe_contents(*inode).cloned().map(|c| PipeContents { inode: 0, ..c });
                *inode = 0;
            }
            FdKind::TimerFd(timer) => {
                timer.remaining = Duration::ZERO;
                timer.realtime_deadline = timer.realtime_deadline.map(|_| Duration::ZERO);
            }
            FdKind::Epoll { registrations } => registrations.sort_by_key(|r| r.fd),
            _ => {}
        }
        (entry, contents)
    }

    fn verify_by_use(dir: &Path) -> Result<(), String> {
        let fail = |what: &'static str| move |e: rustix::io::Errno| format!("{what}: {e}");
        let expect = |ok: bool, what: String| if ok { Ok(()) } else { Err(what) };

        // epoll first, while the pipe still holds its bytes.
        let mut events = Vec::with_capacity(8);
        let zero = timespec_of(Duration::ZERO);
        epoll::wait(borrow(EPOLL), rustix::buffer::spare_capacity(&mut events), Some(&zero))
            .map_err(fail("epoll_wait"))?;
        let mut data: Vec<u64> = events.iter().map(|e| e.data.u64()).collect();
        data.sort_unstable();
        expect(data == [PIPE_DATA, EVENTFD_DATA], format!("epoll reported {data:x?}"))?;

        let flags = rustix::fs::fcntl_getfl(borrow(DATA_FILE)).map_err(fail("F_GETFL"))?;
        expect(flags.contains(OFlags::APPEND | OFlags::RDWR), format!("data file flags {flags:?}"))?;
        let offset = rustix::fs::seek(borrow(DATA_FILE), SeekFrom::Current(0)).map_err(fail("lseek"))?;
        expect(offset == 40, format!("data file offset {offset}"))?;
        let mut rest = [0u8; 100];
        let n = rustix::io::read(borrow(DATA_FILE), &mut rest).map_err(fail("read"))?;
        expect(rest[..n] == pattern(100)[40..], "data file contents from the offset".into())?;
        let shared = rustix::fs::seek(borrow(DATA_FILE_DUP), SeekFrom::Current(0)).map_err(fail("lseek"))?;
        expect(shared == 100, format!("the dup's offset is {shared}: not shared"))?;
        let cloexec = rustix::io::fcntl_getfd(borrow(DATA_FILE)).map_err(fail("F_GETFD"))?;
        expect(cloexec.contains(rustix::io::FdFlags::CLOEXEC), "data file close-on-exec".into())?;

        let dir_meta = rustix::fs::fstat(borrow(DIRECTORY)).map_err(fail("fstat"))?;
        let want_dir = std::fs::metadata(dir).map_err(|e| e.to_string())?;
        expect(dir_meta.st_ino == want_dir.ino(), "the directory is another one".into())?;

        let size = rustix::pipe::fcntl_getpipe_size(borrow(PIPE_WRITE)).map_err(fail("F_GETPIPE_SZ"))?;
        expect(size == PIPE_CAPACITY, format!("pipe capacity {size}"))?;
        let flags = rustix::fs::fcntl_getfl(borrow(PIPE_WRITE)).map_err(fail("F_GETFL"))?;
        expect(flags.contains(OFlags::NONBLOCK), "pipe write end not O_NONBLOCK".into())?;
        rustix::io::write(borrow(PIPE_WRITE), b"!").map_err(fail("write to the pipe"))?;
        let mut bytes = vec![0u8; PIPE_BYTES + 1];
        let mut got = 0;
        while got < bytes.len() {
            got += rustix::io::read(borrow(PIPE_READ), &mut bytes[got..]).map_err(fail("read the pipe"))?;
        }
        let mut want = pattern(PIPE_BYTES);
        want.push(b'!');
        expect(bytes == want, "the pipe's bytes differ".into())?;

        let mut count = [0u8; 8];
        rustix::io::read(borrow(EVENTFD), &mut count).map_err(fail("read the eventfd"))?;
        expect(u64::from_ne_bytes(count) == 5, format!("eventfd count {}", u64::from_ne_bytes(count)))?;
        rustix::io::read(borrow(SEMAPHORE), &mut count).map_err(fail("read the semaphore"))?;
        expect(u64::from_ne_bytes(count) == 1, "the semaphore eventfd gave more than 1".into())?;

        let timer = rustix::time::timerfd_gettime(borrow(TIMERFD)).map_err(fail("timerfd_gettime"))?;
        let (value, interval) = (duration_of(timer.it_value), duration_of(timer.it_interval));
        expect(
            interval == Duration::from_secs(1) && value > Duration::from_secs(5) && value <= Duration::from_secs(10),
            format!("timer {value:?} every {interval:?}"),
        )?;

        let mut fifo = [0u8; 64];
        let n = rustix::io::read(borrow(FIFO_READ), &mut fifo).map_err(fail("read the FIFO"))?;
        expect(&fifo[..n] == FIFO_BYTES, "the FIFO's bytes differ".into())?;

        let wall = rustix::time::timerfd_gettime(borrow(WALL_CLOCK_TIMER)).map_err(fail("timerfd_gettime"))?;
        let left = duration_of(wall.it_value);
        expect(
            left > Duration::from_secs(15) && left <= Duration::from_secs(20),
            format!("wall-clock timer {left:?}"),
        )?;

        let null = rustix::fs::fstat(borrow(DEV_NULL)).map_err(fail("fstat"))?;
        expect(null.st_rdev == libc::makedev(1, 3), "fd 19 is not /dev/null".into())?;
        let cloexec = rustix::io::fcntl_getfd(borrow(DEV_NULL)).map_err(fail("F_GETFD"))?;
        expect(cloexec.is_empty(), "/dev/null got close-on-exec".into())?;
        Ok(())
    }

    #[test]
    fn restore_refuses_an_unsupplied_descriptor_before_touching_anything() {
        let table = FdTable {
            pid: 1,
            fds: vec![FdEntry {
                fd: 0,
                close_on_exec: false,
                flags: OpenFlags(0),
                same_description_as: None,
                kind: FdKind::CharDevice { path: "/dev/pts/0".into(), rdev: libc::makedev(136, 0) },
                disposition: supply("a terminal"),
            }],
            pipes: vec![],
            process: ProcessFs { cwd: "/".into(), umask: 0o22, limits: vec![] },
        };
        let before = rustix::fs::fstat(std::io::stdin().as_fd()).map(|s| s.st_ino);
        let err = restore(&table, RestoreOptions::default()).unwrap_err();
        assert!(matches!(err, Error::NotSupplied { fd: 0, .. }), "{err}");
        assert_eq!(rustix::fs::fstat(std::io::stdin().as_fd()).map(|s| s.st_ino), before);

        // A descriptor handed in for a number the table does not have is a
        // mistake of the caller's, not something to drop silently.
        let mut options = RestoreOptions::default();
        let null = rustix::fs::open("/dev/null", OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty()).unwrap();
        options.supplied.insert(0, null.try_clone().unwrap());
        options.supplied.insert(9, null);
        let err = restore(&table, options).unwrap_err();
        assert!(matches!(err, Error::SuppliedUnknown { fd: 9 }), "{err}");
        assert_eq!(rustix::fs::fstat(std::io::stdin().as_fd()).map(|s| s.st_ino), before);
    }
}
