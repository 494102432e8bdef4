//! An application's process tree: the application process that `lwk run`
//! started and every process it forked, each an lwk application process
//! with its own control region, memory files and proxy (`lwk_kernel::fork`).
//! They are frozen together, written as one image, and restored with the
//! same parents, pids and shared objects:
//!
//! * **Memory**: a fork gives the child private copies of the LWK memory
//!   files but keeps the shared one (MAP_SHARED|MAP_ANONYMOUS memory):
//!   [`MemberRecord::shares_memory_with`] says whose it is.
//! * **Descriptors**: a forked proxy holds copies of its parent's
//!   descriptors, sharing their open file descriptions (offsets, flags,
//!   pipe buffers). [`share_across`] finds the descriptions held by more
//!   than one proxy and lists them once ([`Shared`]); each table names them
//!   by [`Disposition::Shared`], and the restorer builds each once and
//!   hands it to every holder.

use std::collections::HashMap;
use std::os::fd::RawFd;
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use crate::app::{children, stat_field, App, AppError, AppInfo, Frozen};
use crate::fds::{self, Disposition, FdKind, FdTable, PipeContents, PipeEnd};

/// One process of the tree.
pub struct Member {
    pub app: App,
    pub info: AppInfo,
    /// Its parent's place in [`Tree::members`] (None: the first process).
    pub parent: Option<usize>,
}

/// The processes of one application, parents before their children.
pub struct Tree {
    pub members: Vec<Member>,
}

/// What the image says of the tree (record `Processes`, before the first
/// process's manifest; each process's records then follow in this order).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct TreeRecord {
    pub members: Vec<MemberRecord>,
    /// The open file descriptions the proxies share.
    pub shared: Vec<Shared>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct MemberRecord {
    /// Its pid as the application knows it.
    pub pid_in_namespace: i32,
    pub parent: Option<usize>,
    /// The signal its parent gets when it ends (SIGCHLD, as a rule).
    pub exit_signal: i32,
    /// The member whose shared memory file (MAP_SHARED|MAP_ANONYMOUS
    /// memory) this one maps too.
    pub shares_memory_with: Option<usize>,
}

/// An open file description that several proxies of the tree hold.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Shared {
    pub what: SharedWhat,
    /// Who holds it: (member, descriptor number).
    pub holders: Vec<(usize, RawFd)>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum SharedWhat {
    /// An anonymous pipe whose ends are all in the tree, with its bytes;
    /// each holder's entry says which end it holds.
    Pipe(PipeContents),
    /// Anything else rebuilt from its description (a file, a directory, a
    /// device, an eventfd, a timerfd): the first holder's entry.
    Description(fds::FdEntry),
    /// A TCP socket several processes hold: a listener, as a pre-forked
    /// server's workers share it (its image is taken in the freeze,
    /// `checkpoint::capture_tree_sockets`; a connection shared so is
    /// refused there).
    TcpSocket { listener: Option<crate::sockets::TcpListenerImage> },
}

impl Tree {
    /// The application one of whose application processes (or whose
    /// `lwk run`) is `pid`: its first process, with every process it
    /// forked, and theirs.
    pub fn attach(pid: i32) -> Result<Tree, AppError> {
        let mut root = App::attach(pid)?;
        // A forked process names its application too: go up to the first.
        while let Some(parent) = crate::app::parent_of(root.pid).filter(|&p| p > 0) {
            match App::attach(parent) {
                Ok(up) if up.pid == parent => root = up,
                _ => break,
            }
        }
        let info = root.info();
        let mut members = vec![Member { app: root, info, parent: None }];
        let mut i = 0;
        while i < members.len() {
            for child in children(members[i].app.pid) {
                let app = App::attach(child).map_err(|e| AppError::Tree {
                    pid: members[0].app.pid,
                    what: format!("its child process {child} is not an lwk application process ({e})"),
                })?;
                let info = app.info();
                members.push(Member { app, info, parent: Some(i) });
            }
            i += 1;
        }
        Ok(Tree { members })
    }

    /// The application processes, by pid as this process sees them.
    pub fn pids(&self) -> Vec<i32> {
        self.members.iter().map(|m| m.app.pid).collect()
    }

    /// Freeze every process, parents first; on any failure those already
    /// frozen go on. Then the tree must be as it was attached: no process
    /// forked or ended meanwhile (a process that ended is a zombie until
    /// its parent reaps it, and a zombie cannot be restored).
    pub fn freeze(&self, answer_within: Duration) -> Result<Vec<Frozen<'_>>, AppError> {
        let mut frozen = Vec::with_capacity(self.members.len());
        for m in &self.members {
            frozen.push(m.app.freeze(answer_within)?);
        }
        self.check_unchanged()?;
        Ok(frozen)
    }

    /// The tree still is what was attached, and no member has ended.
    pub fn check_unchanged(&self) -> Result<(), AppError> {
        let root = self.members[0].app.pid;
        let pids = self.pids();
        for (i, m) in self.members.iter().enumerate() {
            if state_of(m.app.pid) == Some('Z') {
                return Err(AppError::Tree {
                    pid: root,
                    what: format!("process {} has ended and its parent has not reaped it yet; try again", m.app.pid),
                });
            }
            let mut have = children(m.app.pid);
            have.sort_unstable();
            let mut want: Vec<i32> = self.members.iter().filter(|c| c.parent == Some(i)).map(|c| c.app.pid).collect();
            want.sort_unstable();
            if have != want {
                let new: Vec<i32> = have.iter().copied().filter(|p| !pids.contains(p)).collect();
                return Err(AppError::Tree {
                    pid: root,
                    what: format!(
                        "process {} forked or reaped a process while it was being frozen ({new:?} new); try again",
                        m.app.pid
                    ),
                });
            }
        }
        Ok(())
    }

    /// What the image says of the tree's processes (without the shared
    /// descriptions): pids, parents, exit signals, and which memory files
    /// they share, from their frozen states. Two processes that share a
    /// private memory file (a vfork child that has not yet called exec)
    /// cannot be moved.
    pub fn records(&self, frozen: &[Frozen<'_>]) -> Result<Vec<MemberRecord>, AppError> {
        let root = self.members[0].app.pid;
        let file_id = |pid: i32, fd: i32| {
            (fd >= 0)
                .then(|| std::fs::metadata(format!("/proc/{pid}/fd/{fd}")).ok().map(|m| (m.dev(), m.ino())))
                .flatten()
        };
        let ids: Vec<[Option<(u64, u64)>; 3]> = self
            .members
            .iter()
            .zip(frozen)
            .map(|(m, f)| {
                let fds = f.export().state.mm.memfd;
                [file_id(m.app.pid, fds[0]), file_id(m.app.pid, fds[1]), file_id(m.app.pid, fds[2])]
            })
            .collect();
        let mut out = Vec::with_capacity(self.members.len());
        for (i, m) in self.members.iter().enumerate() {
            for (j, other) in ids[..i].iter().enumerate() {
                let private = |k: usize| ids[i][k].is_some() && (ids[i][k] == other[0] || ids[i][k] == other[1]);
                if private(0) || private(1) {
                    return Err(AppError::Tree {
                        pid: root,
                        what: format!(
                            "process {} still runs on the memory of process {} (a vfork child before its exec); \
                             try again",
                            m.app.pid, self.members[j].app.pid
                        ),
                    });
                }
            }
            let shares = ids[i][2].and_then(|me| (0..i).find(|&j| ids[j][2] == Some(me)));
            out.push(MemberRecord {
                pid_in_namespace: crate::app::pid_in_namespace(m.app.pid).unwrap_or(m.app.pid),
                parent: m.parent,
                exit_signal: exit_signal(m.app.pid).unwrap_or(libc::SIGCHLD),
                shares_memory_with: shares,
            });
        }
        Ok(out)
    }
}

/// The state letter of process `pid` (R, S, D, Z, ...).
fn state_of(pid: i32) -> Option<char> {
    stat_field(pid, 3)?.chars().next()
}

/// The signal process `pid` sends its parent when it ends.
fn exit_signal(pid: i32) -> Option<i32> {
    stat_field(pid, 38)?.parse().ok()
}

/// Find the open file descriptions that the proxies `proxies` (one per
/// member, frozen) share, given their captured `tables`; mark each holder's
/// entry [`Disposition::Shared`] and return the list.
///
/// * An anonymous pipe with ends in more than one table, whose reading and
///   writing ends are all in the tree, is shared with its bytes. One that
///   leads outside the tree stays as each table has it (a standard stream
///   handed over, say).
/// * A file, directory, device, eventfd or timerfd held by several
///   proxies is rebuilt once.
/// * A TCP socket held by several is shared (a listener; see
///   [`SharedWhat::TcpSocket`]). Another socket, an epoll instance, a
///   signalfd or a FIFO held by several is refused (not movable yet).
///
/// With [`fds::Contents::Skip`] the pipes are listed empty (a check while
/// the processes run).
pub fn share_across(
    tables: &mut [FdTable],
    proxies: &[i32],
    contents: fds::Contents,
) -> Result<Vec<Shared>, fds::Error> {
    let mut shared: Vec<Shared> = Vec::new();
    // Anonymous pipes by inode: which tables hold them, and which sides.
    let mut pipes: HashMap<u64, (Vec<usize>, bool, bool)> = HashMap::new();
    for (m, t) in tables.iter().enumerate() {
        for e in &t.fds {
            if let FdKind::Pipe { inode, end, fifo: None } = e.kind {
                let p = pipes.entry(inode).or_default();
                if !p.0.contains(&m) {
                    p.0.push(m);
                }
                p.1 |= end.reads();
                p.2 |= end.writes();
            }
        }
    }
    let mut pipe_inodes: Vec<u64> =
        pipes.iter().filter(|(_, (holders, r, w))| holders.len() > 1 && *r && *w).map(|(&i, _)| i).collect();
    pipe_inodes.sort_unstable();
    for inode in pipe_inodes {
        let mut holders = Vec::new();
        let mut bytes = None;
        for (m, t) in tables.iter_mut().enumerate() {
            for e in t.fds.iter_mut() {
                if matches!(e.kind, FdKind::Pipe { inode: i, fifo: None, .. } if i == inode) {
                    if bytes.is_none() {
                        bytes = Some(match contents {
                            fds::Contents::Read => fds::pipe_contents_at(proxies[m], e.fd, inode)?,
                            fds::Contents::Skip => PipeContents { inode, capacity: 0, buffered: Vec::new() },
                        });
                    }
                    if e.same_description_as.is_none() {
                        holders.push((m, e.fd));
                        e.disposition = Disposition::Shared { id: shared.len() };
                    }
                }
            }
            t.pipes.retain(|p| p.inode != inode);
        }
        let bytes = bytes.expect("a pipe held by more than one table has an entry");
        shared.push(Shared { what: SharedWhat::Pipe(bytes), holders });
    }

    // Everything else: grouped by what /proc/PID/fd/N leads to, then
    // compared with kcmp across the proxies.
    let mut by_file: HashMap<(u64, u64), Vec<(usize, usize)>> = HashMap::new();
    for (m, t) in tables.iter().enumerate() {
        for (k, e) in t.fds.iter().enumerate() {
            if e.same_description_as.is_some() || matches!(e.disposition, Disposition::Shared { .. }) {
                continue;
            }
            if let Ok(meta) = std::fs::metadata(format!("/proc/{}/fd/{}", proxies[m], e.fd)) {
                by_file.entry((meta.dev(), meta.ino())).or_default().push((m, k));
            }
        }
    }
    let mut groups: Vec<Vec<(usize, usize)>> = by_file.into_values().filter(|g| g.len() > 1).collect();
    groups.sort();
    for group in groups {
        // Each description once: the first holder of each, then the others
        // that kcmp finds the same.
        let mut left = group;
        while let Some(first) = left.first().copied() {
            let (m0, k0) = first;
            let fd0 = tables[m0].fds[k0].fd;
            let (same, rest): (Vec<_>, Vec<_>) = left.into_iter().partition(|&(m, k)| {
                (m, k) == first
                    || (m != m0
                        && fds::same_description(proxies[m0], fd0, proxies[m], tables[m].fds[k].fd) == Some(true))
            });
            left = rest;
            let holders: Vec<(usize, RawFd)> = same.iter().map(|&(m, k)| (m, tables[m].fds[k].fd)).collect();
            let mut tables_holding: Vec<usize> = same.iter().map(|&(m, _)| m).collect();
            tables_holding.dedup();
            if tables_holding.len() < 2 {
                continue;
            }
            let entry = tables[m0].fds[k0].clone();
            let tcp = matches!(
                entry.kind,
                FdKind::Socket {
                    family: fds::SocketFamily::Inet | fds::SocketFamily::Inet6,
                    socket_type: fds::SocketType::Stream,
                    protocol: libc::IPPROTO_TCP,
                    ..
                }
            );
            let refuse = match (&entry.kind, &entry.disposition) {
                (FdKind::Socket { .. }, _) if tcp => {
                    let id = shared.len();
                    for &(m, k) in &same {
                        tables[m].fds[k].disposition = Disposition::Shared { id };
                    }
                    shared.push(Shared { what: SharedWhat::TcpSocket { listener: None }, holders });
                    None
                }
                (FdKind::Socket { .. }, _) => Some("a socket other than a TCP listener"),
                (FdKind::Epoll { .. }, _) => Some("an epoll instance"),
                (FdKind::SignalFd { .. }, _) => Some("a signalfd"),
                (FdKind::Pipe { fifo: Some(_), .. }, _) => Some("a FIFO"),
                // Handed over (a terminal, a pipe to outside, lwk run's
                // own streams): each table keeps its own hand-over.
                (_, Disposition::Supply { .. } | Disposition::CannotMove { .. }) => None,
                // Each process's LWK makes its own again.
                (_, Disposition::SignalfdPipe) => None,
                (_, _) => {
                    let id = shared.len();
                    for &(m, k) in &same {
                        tables[m].fds[k].disposition = Disposition::Shared { id };
                    }
                    shared.push(Shared { what: SharedWhat::Description(entry.clone()), holders });
                    None
                }
            };
            if let Some(what) = refuse {
                let names: Vec<String> =
                    same.iter().map(|&(m, k)| format!("fd {} of proxy {}", tables[m].fds[k].fd, proxies[m])).collect();
                for &(m, k) in &same {
                    tables[m].fds[k].disposition = Disposition::CannotMove {
                        reason: format!(
                            "{what} shared by several processes of the application ({}): not movable yet",
                            names.join(", ")
                        ),
                    };
                }
            }
        }
    }
    Ok(shared)
}

/// Which end of a shared pipe entry `e` holds.
pub fn pipe_end(e: &fds::FdEntry) -> Option<PipeEnd> {
    match e.kind {
        FdKind::Pipe { end, .. } => Some(end),
        _ => None,
    }
}
