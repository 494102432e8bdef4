//! A frozen application written as an image (`image`): what
//! `lwk checkpoint` writes to disk and what a migration streams.
//!
//! The records, in order:
//!
//! | record | payload |
//! |---|---|
//! | Processes | (an application that forked) JSON [`tree::TreeRecord`]: its processes, their parents, and what they share; then the records below for each process |
//! | Manifest | JSON [`Manifest`]: what the image holds, from which process |
//! | LwkState | the LWK's whole state, `lwk_kernel::persist::LwkState` as its bytes |
//! | ThreadContexts | each saved thread: its slot (u32 LE), then `lwk_kernel::freeze::ThreadRecord` as its bytes |
//! | Descriptors | JSON `fds::FdTable`: the proxy's descriptors (the application's), its cwd, umask and limits |
//! | Sockets | JSON: each TCP or UDP socket by descriptor number ([`SocketImage`]) |
//! | Memory | the application's memory by virtual address: the LWK's memory files' data under each piece of the map that is backed by one (holes are skipped: a restore reads them as zeros) |
//! | End | |
//!
//! The binary records are the LWK's own `#[repr(C)]` snapshots: an image
//! is restored by the same lwk build (the manifest names it, and each
//! snapshot carries its subsystems' versions).

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::time::Instant;

use lwk_abi::control::memfd_slot;
use lwk_kernel::freeze::ThreadRecord;
use lwk_kernel::persist::LwkState;

use crate::app::{AppInfo, Frozen};
use crate::fds::{Contents, Disposition, FdKind, FdTable};
use crate::image::{ImageError, ImageWriter, RecordKind};
use crate::tree;

/// What an image holds, and from where.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    /// The lwk version that wrote it (`CARGO_PKG_VERSION`).
    pub lwk_version: String,
    /// Seconds since the epoch when the application was frozen.
    pub frozen_at: u64,
    /// The node (host name) it was frozen on.
    pub node: String,
    pub pid: i32,
    pub proxy_pid: i32,
    pub command: String,
    /// The application's process id as it knows it (in its own pid
    /// namespace, when it runs in one): a restore gives it back.
    pub pid_in_namespace: i32,
    pub threads: u32,
    /// Bytes of LwkState and of each ThreadRecord: a reader of another
    /// build refuses a mismatch before it looks further.
    pub lwk_state_size: u64,
    pub thread_record_size: u64,
    /// Pieces of the memory map backed by the LWK's memory files, and the
    /// bytes of data under them written to the image.
    pub memory_pieces: u64,
    pub memory_bytes: u64,
    /// What `getppid` answers (the parent of the first `lwk run`).
    pub parent_pid: i32,
    /// The control region's options (`lwk run` flags).
    pub options: u64,
    /// Where the kernel's `[vdso]`, `[vvar]` and `[vvar_vclock]` were: the program
    /// knows them by address.
    pub specials: [[u64; 2]; 3],
    /// The pieces of the memory map that are mapped from files.
    pub file_mappings: Vec<FileMappingInfo>,
    /// The proxy's descriptors: number and what it is (the link in
    /// /proc/PID/fd).
    pub descriptors: Vec<(i32, String)>,
    /// The application process's credentials (the proxy's are with its
    /// descriptors); absent in images written before they were kept.
    #[serde(default)]
    pub credentials: Option<crate::fds::Credentials>,
    /// The partition it ran in: a restore makes one like it.
    #[serde(default)]
    pub partition: Option<PartitionSpec>,
    /// The packet-filter table (nftables, family inet) that keeps its TCP
    /// peers' segments out on the node it was checkpointed on, until a
    /// restore there rebuilds its connections and deletes it
    /// (`lwk_node::quiet`).
    #[serde(default)]
    pub held_by: Option<String>,
}

/// A partition as a restore remakes it: as many CPUs (which ones is the
/// destination's choice), as much memory on pages of the same size, the
/// same owner.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PartitionSpec {
    /// Its name where the application ran (for messages).
    pub name: String,
    pub cpus: usize,
    pub mem_bytes: u64,
    pub page_size: u64,
    pub owner_uid: u32,
    #[serde(default)]
    pub owner_gid: u32,
}

impl PartitionSpec {
    /// The partition whose memory directory the control region `h` names.
    pub fn of(h: &lwk_abi::control::Header) -> Option<PartitionSpec> {
        if !h.partition.is_set() {
            return None;
        }
        let mut buf = [0u8; lwk_abi::control::PARTITION_PATH_WORDS * 8];
        h.partition.mem_dir_into(&mut buf);
        let len = buf.iter().position(|&c| c == 0)?;
        let dir = std::path::Path::new(std::str::from_utf8(&buf[..len]).ok()?);
        // /run/lwk/partitions/NAME/mem
        let name = dir.parent()?.file_name()?.to_str()?;
        let p = lwk_partition::open(name).ok()?;
        (p.mem_dir == dir).then(|| PartitionSpec {
            name: p.name.clone(),
            cpus: p.cpus.len(),
            mem_bytes: p.mem_bytes,
            page_size: p.page_size,
            owner_uid: p.owner_uid,
            owner_gid: p.owner_gid,
        })
    }
}

/// A piece of the address space mapped (privately) from a file.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct FileMappingInfo {
    pub start: u64,
    pub end: u64,
    pub path: String,
    /// The file as it was: a restore refuses another one.
    pub size: u64,
    pub mtime_ns: i128,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot open memory file {fd} of process {pid}: {source}")]
    MemoryFile { pid: i32, fd: i32, source: std::io::Error },
    #[error("cannot read memory file {fd} of process {pid} at offset {offset:#x}: {source}")]
    ReadMemory { pid: i32, fd: i32, offset: u64, source: std::io::Error },
    #[error("writing the image: {0}")]
    Image(#[from] ImageError),
    #[error("process {pid} cannot be checkpointed yet: {what}")]
    Unmovable { pid: i32, what: String },
    #[error("cannot read {what} of process {pid}: {source}")]
    Proc { pid: i32, what: String, source: std::io::Error },
    #[error("the descriptors of process {pid}: {source}")]
    Descriptors { pid: i32, source: crate::fds::Error },
    /// Not now, but maybe in a moment: connections wait in a listener's
    /// accept queue (the application takes them itself if it goes on).
    #[error("process {pid} cannot be captured now: {what}")]
    Busy { pid: i32, what: String },
    #[error(transparent)]
    App(#[from] crate::app::AppError),
    #[error("cannot keep the TCP peers of process {pid} out while it is captured: {what}")]
    Hold { pid: i32, what: String },
}

/// What writing an image took.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Written {
    /// The first process's manifest.
    pub manifest: Manifest,
    /// The other processes' (of a tree).
    pub others: Vec<Manifest>,
    /// Bytes of image written (after compression).
    pub image_bytes: u64,
    pub seconds: f64,
}

/// The bytes of a plain-data value.
fn bytes_of<T: Copy>(v: &T) -> &[u8] {
    // SAFETY: T is one of the LWK's #[repr(C)] snapshots, plain data that
    // is read here as the bytes it is made of (padding included: it is
    // whatever the LWK left there, and read back as such).
    unsafe { std::slice::from_raw_parts(v as *const T as *const u8, std::mem::size_of::<T>()) }
}

/// The descriptors of the proxies of the application's processes
/// `members` (application process, proxy), which should be frozen:
/// refused if any cannot be moved (each named with its reason), but for
/// standard input, output and error, which are then handed over at the
/// restore. Descriptions that several proxies share are listed once
/// ([`tree::share_across`]).
///
/// With `relayed_by` (a migration whose source supervisor, that process,
/// stands for the application), standard streams that are still the
/// supervisor's own (the same open file) are handed over too, whatever
/// they are: they are relayed to where they lead on this node (a file
/// here stays the file here). Other descriptors that lead outside the
/// application (a pipe, a terminal) are refused: a restore hands over only
/// the standard streams. With `force_close`, what cannot move is left out
/// instead (closed in the image: the application here keeps it until it
/// ends), and named in [`Descriptors::closed`].
///
/// With [`Contents::Skip`], the pipes' bytes are not read: a check of what
/// can move while the application runs.
pub fn capture_descriptors(
    members: &[(i32, i32)],
    relayed_by: Option<i32>,
    force_close: bool,
    contents: Contents,
) -> Result<Descriptors, CheckpointError> {
    let proxies: Vec<i32> = members.iter().map(|m| m.1).collect();
    let mut tables = Vec::with_capacity(members.len());
    for &(pid, proxy) in members {
        let mut table = crate::fds::capture_with(proxy, contents)
            .map_err(|source| CheckpointError::Descriptors { pid: proxy, source })?;
        mark_signalfd_pipes(&mut table, pid);
        tables.push(table);
    }
    let shared = match members.len() {
        1 => Vec::new(),
        _ => tree::share_across(&mut tables, &proxies, contents)
            .map_err(|source| CheckpointError::Descriptors { pid: members[0].1, source })?,
    };
    let mut refused = Vec::new();
    for (table, &(pid, proxy)) in tables.iter_mut().zip(members) {
        hand_over_streams(table, proxy, relayed_by);
        let these: Vec<String> = table.unmovable().iter().map(|u| u.to_string()).collect();
        if !these.is_empty() && members.len() > 1 {
            refused.push(format!("process {pid}: {}", these.join("; ")));
        } else {
            refused.extend(these);
        }
        if force_close {
            // Closed, as a close would: gone from the table and from every
            // epoll instance's interest list.
            let gone: Vec<i32> = table.unmovable().iter().map(|u| u.fd).collect();
            table.fds.retain(|e| !gone.contains(&e.fd));
            for e in &mut table.fds {
                if let FdKind::Epoll { registrations } = &mut e.kind {
                    registrations.retain(|r| !gone.contains(&r.fd));
                }
            }
        }
    }
    if !refused.is_empty() && !force_close {
        return Err(CheckpointError::Unmovable { pid: members[0].0, what: refused.join("; ") });
    }
    Ok(Descriptors { tables, shared, closed: refused })
}

/// The local addresses of the TCP sockets (listeners and connections) in
/// the proxies' `tables`, as each proxy's network namespace lists them.
pub fn tcp_endpoints(proxies: &[i32], tables: &[FdTable]) -> Vec<std::net::SocketAddr> {
    endpoints(proxies, tables, crate::fds::SocketType::Stream, libc::IPPROTO_TCP, ["tcp", "tcp6"])
}

/// The local addresses of the UDP sockets in the proxies' `tables`.
pub fn udp_endpoints(proxies: &[i32], tables: &[FdTable]) -> Vec<std::net::SocketAddr> {
    endpoints(proxies, tables, crate::fds::SocketType::Datagram, libc::IPPROTO_UDP, ["udp", "udp6"])
}

fn endpoints(
    proxies: &[i32],
    tables: &[FdTable],
    of_type: crate::fds::SocketType,
    proto: i32,
    files: [&str; 2],
) -> Vec<std::net::SocketAddr> {
    let mut all = Vec::new();
    for (&proxy, table) in proxies.iter().zip(tables) {
        let inodes: std::collections::HashSet<u64> = table
            .fds
            .iter()
            .filter_map(|e| match e.kind {
                FdKind::Socket { inode, socket_type, protocol, .. }
                    if socket_type == of_type && (protocol == proto || protocol == 0) =>
                {
                    Some(inode)
                }
                _ => None,
            })
            .collect();
        for file in files {
            let Ok(text) = std::fs::read_to_string(format!("/proc/{proxy}/net/{file}")) else { continue };
            for line in text.lines().skip(1) {
                let f: Vec<&str> = line.split_whitespace().collect();
                let (Some(local), Some(inode)) = (f.get(1), f.get(9).and_then(|i| i.parse::<u64>().ok())) else {
                    continue;
                };
                if inodes.contains(&inode) {
                    all.extend(proc_net_address(local));
                }
            }
        }
    }
    all.sort();
    all.dedup();
    all
}

/// An address as /proc/net/tcp{,6} shows it: the address's 32-bit words
/// in hex, each in the host's (little-endian) order, a colon, the port.
fn proc_net_address(text: &str) -> Option<std::net::SocketAddr> {
    let (addr, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let words: Vec<u32> =
        (0..addr.len() / 8).map(|i| u32::from_str_radix(&addr[i * 8..i * 8 + 8], 16)).collect::<Result<_, _>>().ok()?;
    let ip: std::net::IpAddr = match words[..] {
        [w] => std::net::Ipv4Addr::from(w.to_le_bytes()).into(),
        [a, b, c, d] => {
            let mut bytes = [0u8; 16];
            for (k, w) in [a, b, c, d].into_iter().enumerate() {
                bytes[k * 4..k * 4 + 4].copy_from_slice(&w.to_le_bytes());
            }
            std::net::Ipv6Addr::from(bytes).into()
        }
        _ => return None,
    };
    Some(std::net::SocketAddr::new(ip, port))
}

/// The pipes of `table` (proxy's) that the application process `pid`
/// holds too: the LWK process keeps no pipe but the writing sides of its
/// signalfds' pipes (`lwk_kernel::signalfd`), which it makes again at a
/// restore ([`Disposition::SignalfdPipe`]).
fn mark_signalfd_pipes(table: &mut FdTable, pid: i32) {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return };
    let lwk_pipes: std::collections::HashSet<u64> = dir
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|l| l.to_str()?.strip_prefix("pipe:[")?.strip_suffix(']')?.parse().ok())
        .collect();
    for e in &mut table.fds {
        if matches!(e.kind, FdKind::Pipe { inode, fifo: None, .. } if lwk_pipes.contains(&inode)) {
            e.disposition = Disposition::SignalfdPipe;
        }
    }
    table.pipes.retain(|p| !lwk_pipes.contains(&p.inode));
}

/// The descriptors of an application's processes, as captured.
pub struct Descriptors {
    /// Each process's proxy's table, in the tree's order.
    pub tables: Vec<FdTable>,
    /// The descriptions they share.
    pub shared: Vec<tree::Shared>,
    /// What `force_close` left out, named.
    pub closed: Vec<String>,
}

/// What of `table` (proxy `proxy`'s) leads outside the application: its
/// standard streams are handed over (see [`capture_descriptors`]), any
/// other such pipe or terminal cannot move.
fn hand_over_streams(table: &mut FdTable, proxy: i32, relayed_by: Option<i32>) {
    for e in table.fds.iter_mut().filter(|e| e.fd > 2) {
        let reason = match (&e.disposition, &e.kind) {
            (Disposition::Supply { why }, FdKind::Pipe { .. } | FdKind::CharDevice { .. }) => {
                format!("{why}: a restore hands over only standard input, output and error")
            }
            // Only the LWK's own memory files travel in the image; one the
            // program made (memfd_create) would come back empty.
            (Disposition::Supply { .. }, FdKind::MemoryFile { name, .. }) => {
                format!("a memory file the program made ({name}) is not movable yet")
            }
            _ => continue,
        };
        e.disposition = Disposition::CannotMove { reason };
    }
    for e in table.fds.iter_mut().filter(|e| e.fd <= 2) {
        if matches!(e.disposition, Disposition::Shared { .. }) {
            continue;
        }
        if relayed_by.is_some_and(|s| crate::fds::same_description(proxy, e.fd, s, e.fd) == Some(true)) {
            e.disposition = Disposition::Supply { why: "a standard stream of lwk run's, relayed".to_string() };
        } else if let Disposition::CannotMove { reason } = &e.disposition {
            // Standard input, output and error that cannot be rebuilt (a
            // deleted file, say) are handed over by whoever restores, as
            // a terminal is.
            e.disposition = Disposition::Supply { why: format!("a standard stream that cannot be rebuilt ({reason})") };
        }
    }
}

/// One frozen process of the application, as [`write_image`] writes it.
pub struct ProcessImage<'a> {
    pub frozen: &'a Frozen<'a>,
    pub info: &'a AppInfo,
    /// Its proxy's descriptors.
    pub table: &'a FdTable,
    pub sockets: &'a CapturedSockets,
    /// Of its memory, only these ranges (what a pre-copy has not sent);
    /// all of it if None.
    pub only: Option<&'a [std::ops::Range<u64>]>,
    /// The table that holds its TCP peers out (see [`Manifest::held_by`]).
    pub held_by: Option<&'a str>,
}

/// Write the frozen application's processes (its first process first,
/// parents before children; `tree` says how they relate, when there are
/// several) as one image.
pub fn write_image<W: Write>(
    processes: &[ProcessImage<'_>],
    tree: &tree::TreeRecord,
    mut out: ImageWriter<W>,
) -> Result<(Written, W), CheckpointError> {
    let t0 = Instant::now();
    let pids: Vec<i32> = processes.iter().map(|p| p.frozen.app.pid).collect();
    if processes.len() > 1 {
        out.json(RecordKind::Processes, tree)?;
    }
    let mut manifests = Vec::with_capacity(processes.len());
    for p in processes {
        manifests.push(write_process(p, &pids, &mut out)?);
    }
    let image_bytes = out.bytes_written();
    let w = out.finish()?;
    let mut manifests = manifests.into_iter();
    let manifest = manifests.next().expect("at least one process");
    Ok((Written { manifest, others: manifests.collect(), image_bytes, seconds: t0.elapsed().as_secs_f64() }, w))
}

/// One process's records: manifest, LWK state, threads, descriptors,
/// sockets, memory. Its children must all be among `tree` (pids).
fn write_process<W: Write>(
    p: &ProcessImage<'_>,
    tree: &[i32],
    out: &mut ImageWriter<W>,
) -> Result<Manifest, CheckpointError> {
    let ProcessImage { frozen, info, table, sockets, only, held_by } = *p;
    let x = frozen.export();
    let pid = frozen.app.pid;
    let mm = &x.state.mm;
    let pieces = &mm.pieces[..(mm.n_pieces as usize).min(mm.pieces.len())];
    let backed: Vec<_> = pieces.iter().filter(|p| memfd_slot(p.src).is_some()).collect();

    // The memory goes after the small records, but the manifest counts it:
    // find the data extents first.
    let mut files: [Option<File>; 3] = [None, None, None];
    let mut extents = Vec::new();
    for p in &backed {
        let k = memfd_slot(p.src).expect("filtered above");
        let fd = mm.memfd[k];
        if files[k].is_none() {
            let f = File::open(format!("/proc/{pid}/fd/{fd}")).map_err(|source| CheckpointError::MemoryFile {
                pid,
                fd,
                source,
            })?;
            files[k] = Some(f);
        }
        let f = files[k].as_ref().expect("opened above");
        for (off, len) in data_extents(f, p.off, p.end - p.start) {
            let addr = p.start + (off - p.off);
            match only {
                None => extents.push((k, fd, addr, off, len)),
                // After a pre-copy: only what it has not sent.
                Some(ranges) => {
                    for r in ranges {
                        let (s, e) = (addr.max(r.start), (addr + len).min(r.end));
                        if s < e {
                            extents.push((k, fd, s, off + (s - addr), e - s));
                        }
                    }
                }
            }
        }
    }
    let unmovable = |what: String| CheckpointError::Unmovable { pid, what };
    let strays: Vec<String> =
        crate::app::children(pid).iter().filter(|c| !tree.contains(c)).map(|c| c.to_string()).collect();
    if !strays.is_empty() {
        return Err(unmovable(format!("it forked processes {} while it was being frozen", strays.join(", "))));
    }
    let h = &frozen.app.control().header;
    let partition = PartitionSpec::of(h);
    if mm.part_page != 0 && partition.is_none() {
        return Err(unmovable("it runs in a partition this node no longer describes (/run/lwk/partitions)".into()));
    }
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).map_err(|source| CheckpointError::Proc {
        pid,
        what: "the memory map".into(),
        source,
    })?;
    let mut file_mappings = Vec::new();
    for p in pieces.iter().filter(|p| memfd_slot(p.src).is_none()) {
        // A read-only shared mapping of a file (glibc's gconv cache, say)
        // comes back as a read-only private one of the same file: its
        // pages are never written, so it still shows the file as it is.
        if p.src == lwk_abi::control::SRC_APP_FD && p.prot & libc::PROT_WRITE as u32 != 0 {
            return Err(unmovable(format!("a writable shared mapping of a file at {:#x} (not movable yet)", p.start)));
        }
        let path = maps_path(&maps, p.start)
            .ok_or_else(|| unmovable(format!("the file mapped at {:#x} has no path", p.start)))?;
        if path.ends_with(" (deleted)") {
            return Err(unmovable(format!("the file mapped at {:#x}, {path}, was deleted", p.start)));
        }
        let meta = std::fs::metadata(&path).map_err(|source| CheckpointError::Proc {
            pid,
            what: format!("the mapped file {path}"),
            source,
        })?;
        file_mappings.push(FileMappingInfo {
            start: p.start,
            end: p.end,
            path,
            size: meta.len(),
            mtime_ns: mtime_ns(&meta),
        });
    }
    let mut specials = [[0u64; 2]; 3];
    for line in maps.lines() {
        for (k, name) in lwk_kernel::restore::SPECIAL_NAMES.iter().enumerate() {
            if line.ends_with(std::str::from_utf8(name).unwrap_or("?")) {
                specials[k] = maps_range(line).unwrap_or([0, 0]);
            }
        }
    }
    let mut descriptors: Vec<(i32, String)> = std::fs::read_dir(format!("/proc/{}/fd", info.proxy_pid))
        .map_err(|source| CheckpointError::Proc { pid: info.proxy_pid, what: "the descriptors".into(), source })?
        .flatten()
        .filter_map(|e| {
            let fd = e.file_name().to_str()?.parse().ok()?;
            Some((fd, std::fs::read_link(e.path()).ok()?.to_string_lossy().into_owned()))
        })
        .collect();
    descriptors.sort();
    let saved: Vec<(usize, &ThreadRecord)> = x.threads.iter().enumerate().filter(|(_, t)| t.saved != 0).collect();
    let manifest = Manifest {
        lwk_version: env!("CARGO_PKG_VERSION").to_string(),
        frozen_at: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        node: rustix::system::uname().nodename().to_string_lossy().into_owned(),
        pid,
        proxy_pid: info.proxy_pid,
        command: info.command.clone(),
        pid_in_namespace: crate::app::pid_in_namespace(pid).unwrap_or(pid),
        threads: saved.len() as u32,
        lwk_state_size: std::mem::size_of::<LwkState>() as u64,
        thread_record_size: std::mem::size_of::<ThreadRecord>() as u64,
        memory_pieces: backed.len() as u64,
        memory_bytes: extents.iter().map(|e| e.4).sum(),
        parent_pid: h.parent_pid.load(std::sync::atomic::Ordering::SeqCst),
        options: h.options.load(std::sync::atomic::Ordering::SeqCst),
        specials,
        file_mappings,
        descriptors,
        credentials: Some(
            crate::fds::Credentials::of(pid).map_err(|source| CheckpointError::Descriptors { pid, source })?,
        ),
        partition,
        held_by: held_by.map(str::to_string),
    };
    out.json(RecordKind::Manifest, &manifest)?;
    out.record(RecordKind::LwkState, bytes_of(&x.state))?;
    let mut threads = Vec::with_capacity(saved.len() * (4 + std::mem::size_of::<ThreadRecord>()));
    for (slot, t) in &saved {
        threads.extend_from_slice(&(*slot as u32).to_le_bytes());
        threads.extend_from_slice(bytes_of(*t));
    }
    out.record(RecordKind::ThreadContexts, &threads)?;
    out.json(RecordKind::Descriptors, table)?;
    out.json(RecordKind::Sockets, &sockets.images)?;
    let mut buf = vec![0u8; crate::image::MEMORY_CHUNK_LEN];
    for (k, fd, addr, off, len) in extents {
        let f = files[k].as_ref().expect("opened above");
        let mut done = 0;
        while done < len {
            let n = (len - done).min(buf.len() as u64) as usize;
            f.read_exact_at(&mut buf[..n], off + done).map_err(|source| CheckpointError::ReadMemory {
                pid,
                fd,
                offset: off + done,
                source,
            })?;
            out.memory(addr + done, &buf[..n])?;
            done += n as u64;
        }
    }
    Ok(manifest)
}

/// The extents of [off, off+len) of `f` that hold data (SEEK_DATA,
/// SEEK_HOLE); all of it where the file system cannot say.
pub(crate) fn data_extents(f: &File, off: u64, len: u64) -> Vec<(u64, u64)> {
    use std::os::fd::AsRawFd;
    let end = off + len;
    let mut out = Vec::new();
    let mut at = off;
    while at < end {
        // SAFETY: lseek on our own descriptor.
        let data = unsafe { libc::lseek(f.as_raw_fd(), at as i64, libc::SEEK_DATA) };
        if data < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
                break; // no data after `at`
            }
            return vec![(off, len)];
        }
        let data = data as u64;
        if data >= end {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(f.as_raw_fd(), data as i64, libc::SEEK_HOLE) };
        let hole = if hole < 0 { end } else { (hole as u64).min(end) };
        out.push((data, hole - data));
        at = hole;
    }
    out
}

/// [start, end) of a /proc/PID/maps line.
fn maps_range(line: &str) -> Option<[u64; 2]> {
    let (s, e) = line.split_whitespace().next()?.split_once('-')?;
    Some([u64::from_str_radix(s, 16).ok()?, u64::from_str_radix(e, 16).ok()?])
}

/// The path of the mapping of /proc/PID/maps that holds `addr`.
fn maps_path(maps: &str, addr: u64) -> Option<String> {
    maps.lines().find_map(|line| {
        let [s, e] = maps_range(line)?;
        if !(s..e).contains(&addr) {
            return None;
        }
        // address perms offset dev inode path (the path may hold spaces)
        let rest = line.splitn(6, char::is_whitespace).nth(5)?.trim_start();
        rest.starts_with('/').then(|| rest.to_string())
    })
}

/// A file's modification time in nanoseconds since the epoch.
pub fn mtime_ns(meta: &std::fs::Metadata) -> i128 {
    use std::os::unix::fs::MetadataExt;
    meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128
}

/// A socket of the application, as the image holds it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum SocketImage {
    TcpConnection(crate::sockets::TcpConnectionImage),
    TcpListener(crate::sockets::TcpListenerImage),
    Udp(crate::sockets::UdpSocketImage),
}

/// The application's sockets captured while it is frozen: their images
/// (the Sockets record), and the sockets themselves (taken from the
/// proxy), which must be resumed if the application goes on, or released
/// (closed silently) if it ends.
pub struct CapturedSockets {
    pub images: Vec<(i32, SocketImage)>,
    /// TCP connections left in repair mode by the capture.
    /// With each, its `SO_REUSEADDR` to give back if it goes on here.
    in_repair: Vec<(std::os::fd::OwnedFd, bool)>,
}

impl CapturedSockets {
    /// The application goes on: its connections leave repair mode.
    pub fn resume(self) {
        for (s, reuse) in &self.in_repair {
            let _ = crate::sockets::TcpConnection::resume_source(std::os::fd::AsFd::as_fd(s), *reuse);
        }
    }

    /// The application ends (it runs elsewhere now): its connections close
    /// without a FIN or a reset.
    pub fn release(self) {
        for (s, _) in self.in_repair {
            let _ = crate::sockets::TcpConnection::release_source(s);
        }
    }
}

/// [`capture_sockets`] for each process of a tree (`proxies` and their
/// `tables`, in the same order); on an error those already captured are
/// resumed.
///
/// The TCP sockets several processes share (`shared`) are listeners, each
/// described once here (the first holder's); a connection shared so is
/// refused.
pub fn capture_tree_sockets(
    proxies: &[i32],
    tables: &[FdTable],
    shared: &mut [tree::Shared],
) -> Result<Vec<CapturedSockets>, CheckpointError> {
    for s in shared.iter_mut() {
        let tree::SharedWhat::TcpSocket { listener } = &mut s.what else { continue };
        let &(m, fd) = s.holders.first().expect("a shared description has holders");
        *listener = Some(shared_listener(proxies[m], fd)?);
    }
    let mut all = Vec::with_capacity(proxies.len());
    for (&proxy, table) in proxies.iter().zip(tables) {
        match capture_sockets(proxy, table) {
            Ok(s) => all.push(s),
            Err(e) => {
                all.into_iter().for_each(CapturedSockets::resume);
                return Err(e);
            }
        }
    }
    Ok(all)
}

/// An application's processes frozen, with their descriptors and sockets
/// captured ([`freeze_and_capture`]).
pub struct Captured<'a> {
    /// One per process of the tree, in its order.
    pub frozen: Vec<Frozen<'a>>,
    pub descriptors: Descriptors,
    pub sockets: Vec<CapturedSockets>,
    pub tree: tree::TreeRecord,
    /// The last freeze, until every thread was parked.
    pub stop_ms: f64,
    /// The capture that followed it.
    pub capture_ms: f64,
    /// Freezes given up because the application was busy.
    pub retries: u32,
}

impl Captured<'_> {
    /// Let the application go on as it was.
    pub fn resume(self) -> Result<(), crate::app::AppError> {
        self.sockets.into_iter().for_each(CapturedSockets::resume);
        let mut first = Ok(());
        for f in self.frozen {
            let r = f.resume();
            if first.is_ok() {
                first = r;
            }
        }
        first
    }

    /// End the application here (it runs elsewhere, or its image is all
    /// that is wanted): children first, so that no parent sees one end;
    /// its connections close silently.
    pub fn end(self) {
        for f in self.frozen.into_iter().rev() {
            f.kill();
        }
        self.sockets.into_iter().for_each(CapturedSockets::release);
    }
}

/// How often a busy application is frozen again, and how long it runs in
/// between.
const BUSY_ATTEMPTS: u32 = 20;
const BUSY_PAUSE: std::time::Duration = std::time::Duration::from_millis(25);

/// Freeze every process of `tree` and capture its descriptors (see
/// [`capture_descriptors`]) and sockets. An application caught busy (a
/// connection waiting in a listener's accept queue, a fork or an exit
/// under way) goes on for a moment and is frozen again, a few times,
/// before it is refused: it takes its connections and reaps its children
/// itself, and nothing is lost. On any error it goes on.
///
/// `before_sockets` runs between the capture of the descriptors and that
/// of the sockets, which puts them in repair mode (`lwk checkpoint` keeps
/// their peers out from there on).
pub fn freeze_and_capture<'a>(
    tree: &'a tree::Tree,
    relayed_by: Option<i32>,
    force_close: bool,
    answer_within: std::time::Duration,
    before_sockets: &mut dyn FnMut(&Descriptors) -> Result<(), CheckpointError>,
) -> Result<Captured<'a>, CheckpointError> {
    let members: Vec<(i32, i32)> = tree.members.iter().map(|m| (m.app.pid, m.info.proxy_pid)).collect();
    let proxies: Vec<i32> = members.iter().map(|m| m.1).collect();
    let mut retries = 0;
    loop {
        let t0 = Instant::now();
        let attempt = tree.freeze(answer_within).map_err(CheckpointError::from).and_then(|frozen| {
            let stop_ms = t0.elapsed().as_secs_f64() * 1e3;
            let tc = Instant::now();
            let captured = (|| -> Result<_, CheckpointError> {
                let descriptors = capture_descriptors(&members, relayed_by, force_close, Contents::Read)?;
                before_sockets(&descriptors)?;
                let records = tree.records(&frozen)?;
                let mut shared = descriptors.shared.clone();
                let sockets = capture_tree_sockets(&proxies, &descriptors.tables, &mut shared)?;
                Ok((descriptors, records, shared, sockets))
            })();
            // On an error the frozen processes resume as they drop.
            let (descriptors, members, shared, sockets) = captured?;
            let tree = tree::TreeRecord { members, shared };
            let capture_ms = tc.elapsed().as_secs_f64() * 1e3;
            Ok(Captured { frozen, descriptors, sockets, tree, stop_ms, capture_ms, retries })
        });
        match attempt {
            Err(CheckpointError::Busy { .. } | CheckpointError::App(crate::app::AppError::Tree { .. }))
                if retries + 1 < BUSY_ATTEMPTS =>
            {
                retries += 1;
                std::thread::sleep(BUSY_PAUSE);
            }
            other => return other,
        }
    }
}

/// The listener at descriptor `fd` of proxy `pid`, which other proxies
/// hold too.
fn shared_listener(pid: i32, fd: i32) -> Result<crate::sockets::TcpListenerImage, CheckpointError> {
    use crate::sockets::TcpListenerImage;
    use std::os::fd::AsFd;
    let proc_error = |what: &str, e: std::io::Error| CheckpointError::Proc { pid, what: what.into(), source: e };
    let raw = rustix::process::Pid::from_raw(pid).expect("a pid");
    let pidfd = rustix::process::pidfd_open(raw, rustix::process::PidfdFlags::empty())
        .map_err(|e| proc_error("a pidfd", e.into()))?;
    let socket = rustix::process::pidfd_getfd(&pidfd, fd, rustix::process::PidfdGetfdFlags::empty())
        .map_err(|e| proc_error(&format!("descriptor {fd}"), e.into()))?;
    let unmovable = |what: String| CheckpointError::Unmovable { pid, what };
    match TcpListenerImage::is_listener(socket.as_fd()) {
        Ok(true) => {}
        Ok(false) => {
            return Err(unmovable(format!(
                "fd {fd}: a TCP connection held by several processes of the application (not movable yet)"
            )))
        }
        Err(e) => return Err(unmovable(format!("fd {fd}: {e}"))),
    }
    listener_image(fd, socket.as_fd()).map_err(|(what, busy)| match busy {
        true => CheckpointError::Busy { pid, what },
        false => unmovable(what),
    })
}

/// The image of the listener at `fd`; why not, and whether it may do in a
/// moment: connections waiting in its accept queue cannot be put back,
/// but the application takes them itself if it goes on.
fn listener_image(
    fd: i32,
    socket: std::os::fd::BorrowedFd<'_>,
) -> Result<crate::sockets::TcpListenerImage, (String, bool)> {
    match crate::sockets::TcpListenerImage::describe(socket) {
        Ok((_, queued)) if queued > 0 => Err((format!("fd {fd}: {queued} connections wait in its accept queue"), true)),
        Ok((image, _)) => Ok(image),
        Err(e) => Err((format!("fd {fd}: {e}"), false)),
    }
}

/// Capture the TCP and UDP sockets among the proxy's descriptors `table`
/// (`pid` is the proxy). A listener with connections in its accept queue
/// is refused: they cannot be put back, and the application (which goes on
/// if the checkpoint fails or leaves it running) must still accept them.
/// On an error every connection already captured is resumed.
pub fn capture_sockets(pid: i32, table: &crate::fds::FdTable) -> Result<CapturedSockets, CheckpointError> {
    use crate::fds::{FdKind, SocketFamily};
    let pidfd = match rustix::process::pidfd_open(
        rustix::process::Pid::from_raw(pid).expect("a pid"),
        rustix::process::PidfdFlags::empty(),
    ) {
        Ok(p) => p,
        Err(e) => return Err(CheckpointError::Proc { pid, what: "a pidfd".into(), source: e.into() }),
    };
    let sockets: Vec<&crate::fds::FdEntry> = table
        .fds
        .iter()
        .filter(|e| {
            matches!(&e.kind, FdKind::Socket { family: SocketFamily::Inet | SocketFamily::Inet6, .. })
                && e.same_description_as.is_none()
                && !matches!(e.disposition, crate::fds::Disposition::Shared { .. })
        })
        .collect();
    // The application is frozen: its CPUs are free, and each socket is
    // captured on its own (a thousand connections take tens of ms).
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 8);
    let chunk = sockets.len().div_ceil(workers).max(1);
    let parts: Vec<CapturedPart> = std::thread::scope(|scope| {
        let handles: Vec<_> = sockets
            .chunks(chunk)
            .map(|part| {
                let pidfd = &pidfd;
                scope.spawn(move || capture_part(pidfd, part))
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("a capture thread does not panic")).collect()
    });
    let mut out = CapturedSockets { images: Vec::new(), in_repair: Vec::new() };
    let mut failed = None;
    for part in parts {
        out.images.extend(part.images);
        out.in_repair.extend(part.in_repair);
        failed = failed.or(part.failed);
    }
    if let Some((what, busy)) = failed {
        // Every connection captured goes on as it was.
        out.resume();
        return Err(match busy {
            true => CheckpointError::Busy { pid, what },
            false => CheckpointError::Unmovable { pid, what },
        });
    }
    out.images.sort_by_key(|(fd, _)| *fd);
    Ok(out)
}

/// What one capture thread took: images, connections left in repair mode,
/// and the first failure (after which it stopped).
struct CapturedPart {
    images: Vec<(i32, SocketImage)>,
    in_repair: Vec<(std::os::fd::OwnedFd, bool)>,
    /// Why it stopped, and whether trying again later may do.
    failed: Option<(String, bool)>,
}

fn capture_part(pidfd: &std::os::fd::OwnedFd, sockets: &[&crate::fds::FdEntry]) -> CapturedPart {
    use crate::fds::{FdKind, SocketType};
    use crate::sockets::{TcpConnection, TcpListenerImage, UdpSocketImage};
    use std::os::fd::AsFd;
    let mut out = CapturedPart { images: Vec::new(), in_repair: Vec::new(), failed: None };
    for e in sockets {
        let FdKind::Socket { socket_type, .. } = &e.kind else { continue };
        let fd = match rustix::process::pidfd_getfd(pidfd, e.fd, rustix::process::PidfdGetfdFlags::empty()) {
            Ok(fd) => fd,
            Err(err) => {
                out.failed = Some((format!("fd {}: cannot take it from the proxy: {err}", e.fd), false));
                return out;
            }
        };
        let image = match socket_type {
            SocketType::Stream => match TcpListenerImage::is_listener(fd.as_fd()) {
                Ok(true) => match listener_image(e.fd, fd.as_fd()) {
                    Ok(image) => Ok(SocketImage::TcpListener(image)),
                    Err(why) => {
                        out.failed = Some(why);
                        return out;
                    }
                },
                Ok(false) => match TcpConnection::capture(fd.as_fd()) {
                    Ok(image) => {
                        out.in_repair.push((fd, image.settings.reuse_address));
                        Ok(SocketImage::TcpConnection(image))
                    }
                    Err(err) => Err(format!("fd {}: {err}", e.fd)),
                },
                Err(err) => Err(format!("fd {}: {err}", e.fd)),
            },
            SocketType::Datagram => match UdpSocketImage::capture(fd.as_fd()) {
                Ok(image) => Ok(SocketImage::Udp(image)),
                Err(err) => Err(format!("fd {}: {err}", e.fd)),
            },
            _ => Err(format!("fd {}: a raw or packet socket (not movable)", e.fd)),
        };
        match image {
            Ok(image) => out.images.push((e.fd, image)),
            Err(why) => {
                out.failed = Some((why, false));
                return out;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::proc_net_address;

    #[test]
    fn addresses_read_as_proc_net_tcp_prints_them() {
        assert_eq!(proc_net_address("0100007F:1B59"), Some("127.0.0.1:7001".parse().unwrap()));
        assert_eq!(proc_net_address("00000000:0016"), Some("0.0.0.0:22".parse().unwrap()));
        assert_eq!(proc_net_address("00000000000000000000000001000000:1B59"), Some("[::1]:7001".parse().unwrap()));
        assert_eq!(
            proc_net_address("0000000000000000FFFF00000A0012C6:0050"),
            Some("[::ffff:198.18.0.10]:80".parse().unwrap())
        );
        assert_eq!(proc_net_address("xyz"), None);
    }
}
