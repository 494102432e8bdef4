//! `lwk restore DIR`: put an application that `lwk checkpoint` wrote back
//! into new processes, on this node, and stand for it as `lwk run` does
//! (wait, report its exit status, forward signals).
//!
//! Everything is checked and built before the application's process
//! starts: the image is read whole (every record's hash, the LWK build),
//! the files it had mapped must be the same here (size and modification
//! time), the memory files are filled. Then the proxy starts, and the LWK
//! image in restore mode (`lwk_kernel::restore`) puts the rest back.
//! The application's standard input, output and error are this command's.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::BufReader;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use anyhow::{bail, Context, Result};
use lwk_abi::control::MAX_GROUPS;
use lwk_abi::control::{memfd_slot, RESTORE_OPEN, RESTORE_PARKED};
use lwk_kernel::freeze::{ThreadRecord, EXPORT_MAGIC, EXPORT_VERSION};
use lwk_kernel::mm::{MmSnapshot, PieceRecord};
use lwk_kernel::persist::LwkState;
use lwk_kernel::restore::{FileMapping, RestoreInput, FILE_PATH_MAX, INPUT_MAGIC, INPUT_SIZE, MAX_FILE_MAPPINGS};
use lwk_migrate::checkpoint::{mtime_ns, Manifest, PartitionSpec, SocketImage};
use lwk_migrate::fds::{self, FdTable};
use lwk_migrate::image::{ImageReader, Record, RecordKind};
use lwk_migrate::precopy::MappedRange;
use lwk_migrate::tree::{MemberRecord, Shared, SharedWhat, TreeRecord};

use crate::checkpoint::IMAGE_FILE;
use crate::run::{self, ExitStatus};

#[derive(clap::Args)]
pub struct RestoreArgs {
    /// The directory `lwk checkpoint` wrote.
    dir: PathBuf,
    /// The image is keyed with this cluster key (one a node daemon received).
    #[arg(long)]
    key: Option<PathBuf>,
    /// Hold the restored application at the gate (every thread parked) and
    /// write one byte to this descriptor; let it run when one byte arrives
    /// on --go-fd, end it if that closes first. (For the node daemon.)
    #[arg(long, requires = "go_fd")]
    ready_fd: Option<i32>,
    #[arg(long, requires = "ready_fd")]
    go_fd: Option<i32>,
    /// Read the image from this descriptor (a pipe from the node daemon, as
    /// it arrives) instead of DIR/image.lwk.
    #[arg(long)]
    image_fd: Option<i32>,
    /// The application's service address (A.B.C.D/N), to put on
    /// --address-dev (and announce) once its sockets are rebuilt, before it
    /// runs: it moved here with it.
    #[arg(long, requires = "address_dev")]
    address: Option<lwk_node::address::Cidr>,
    #[arg(long, requires = "address")]
    address_dev: Option<String>,
    /// The partition the application ran in (JSON, as its manifest says),
    /// known before the image comes: the partition made for it here is
    /// ready before memory that goes there arrives. (For the node daemon.)
    #[arg(long, hide = true)]
    partition: Option<String>,
}

/// The partition a restore made for an application that ran in one: like
/// it (as many CPUs, taken from those Linux has here, as much memory on
/// the same pages, the same owner), held for the run, destroyed when the
/// restore ends (and by the next restore, if this one was killed).
struct OwnPartition {
    held: Option<run::InPartition>,
    name: String,
}

/// The names of partitions `lwk restore` makes: this, and its pid.
const OWN_PARTITION_PREFIX: &str = "restored-";

impl OwnPartition {
    fn create(spec: &PartitionSpec) -> Result<OwnPartition> {
        sweep_stale_partitions();
        let page = lwk_partition::PageSize::from_bytes(spec.page_size)
            .with_context(|| format!("partition {} has pages of {} bytes", spec.name, spec.page_size))?;
        let linux = lwk_partition::linux_cpus()?;
        if linux.len() <= spec.cpus {
            bail!(
                "the application ran in partition {} of {} CPUs; this node has {} CPUs outside partitions, and one \
                 must stay with Linux",
                spec.name,
                spec.cpus,
                linux.len()
            );
        }
        let cpus = linux[linux.len() - spec.cpus..].to_vec();
        let name = format!("{OWN_PARTITION_PREFIX}{}", std::process::id());
        let req = lwk_partition::Request {
            name: name.clone(),
            cpus,
            mem_bytes: spec.mem_bytes,
            page,
            owner_uid: spec.owner_uid,
            owner_gid: spec.owner_gid,
        };
        lwk_partition::create(&req)
            .with_context(|| format!("making a partition like {}, where the application ran", spec.name))?;
        let mut own = OwnPartition { held: None, name };
        own.held = Some(run::InPartition::enter(&own.name)?);
        Ok(own)
    }

    fn part(&self) -> &lwk_partition::Partition {
        &self.held.as_ref().expect("held until dropped").part
    }

    /// Its cpuset's cgroup.procs, open for writing.
    fn procs_fd(&self) -> i32 {
        self.held.as_ref().expect("held until dropped").procs_file.as_raw_fd()
    }

    /// Does memory file `k` (4 KiB pages, 2 MiB pages, shared) come from
    /// the partition?
    fn holds_slot(&self, k: usize) -> bool {
        matches!((k, self.part().page_size), (0, 4096) | (1, HUGE))
    }
}

impl Drop for OwnPartition {
    fn drop(&mut self) {
        self.held = None;
        // Its processes may take a moment to be gone from its cpuset.
        for _ in 0..50 {
            match lwk_partition::destroy(&self.name, true) {
                Ok(()) => return,
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
            }
        }
        if let Err(e) = lwk_partition::destroy(&self.name, true) {
            eprintln!(
                "lwk: cannot destroy partition {} (lwk partition destroy {} --force): {e:#}",
                self.name, self.name
            );
        }
    }
}

/// Partitions that an `lwk restore` made and that outlived it (it was
/// killed): destroyed.
fn sweep_stale_partitions() {
    let Ok(all) = lwk_partition::list() else { return };
    for p in all {
        let Some(pid) = p.name.strip_prefix(OWN_PARTITION_PREFIX).and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            lwk_partition::destroy(&p.name, true).ok();
        }
    }
}

/// Sockets rebuilt but not yet live: TCP connections still in repair mode,
/// UDP sockets bound but without their queued datagrams. They go live once
/// the application's address is here ([`Pending::finish`]).
struct Pending {
    tcp: Vec<lwk_migrate::sockets::TcpSocketInRepair>,
    udp: Vec<(lwk_migrate::sockets::UdpSocketImage, OwnedFd, lwk_migrate::sockets::UdpBound)>,
}

impl Pending {
    fn finish(self, address: Option<(lwk_node::address::Cidr, &str)>) -> Result<()> {
        if let Some((cidr, dev)) = address {
            lwk_node::address::add(cidr, dev).with_context(|| format!("bringing {cidr} up on {dev}"))?;
        }
        let live = (|| {
            for (image, fd, bound) in self.udp {
                image.finish(fd.as_fd(), bound).with_context(|| format!("the UDP socket of {}", image.local))?;
            }
            for s in self.tcp {
                s.leave_repair().context("a TCP connection leaving repair mode")?;
            }
            anyhow::Ok(())
        })();
        // The copy here will not run: the address goes back to the source.
        if let (Err(_), Some((cidr, _))) = (&live, address) {
            lwk_node::address::remove(cidr).ok();
        }
        live
    }
}

/// The size of each memory file (sparse), as the LWK makes them.
const MEMFD_SPACE: u64 = 1 << 40;
const HUGE: u64 = 2 << 20;

/// A shared mapping of a file, unmapped on drop.
struct Mapped {
    ptr: *mut u8,
    len: usize,
}

impl Mapped {
    fn new(fd: i32, len: usize, off: u64) -> std::io::Result<Mapped> {
        // SAFETY: a fresh shared mapping of our own descriptor.
        let ptr = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, off as i64)
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Mapped { ptr: ptr.cast(), len })
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: our own mapping; nothing borrowed from it outlives self.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

fn memfd(name: &str, flags: libc::c_uint) -> Result<OwnedFd> {
    let cname = std::ffi::CString::new(name).expect("no NUL");
    // SAFETY: plain memfd_create.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), flags | libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("memfd_create {name}"));
    }
    // SAFETY: a fresh descriptor of ours.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// One process of the image read and checked, and its memory files filled.
struct Prepared {
    manifest: Manifest,
    /// Its proxy's descriptors, rebuilt there.
    table: FdTable,
    /// Its TCP and UDP sockets, by descriptor number.
    sockets: Vec<(i32, SocketImage)>,
    /// Every saved thread's id (in the application's pid namespace).
    thread_ids: Vec<i32>,
    input: OwnedFd,
    /// The memory files, with the descriptor number each must have in the
    /// application process.
    memfds: Vec<(OwnedFd, i32)>,
    /// Other numbers the LWK makes its own descriptors at (its signalfds'),
    /// which ours must stay clear of.
    lwk_fds: Vec<i32>,
}

/// One process of the image as its records arrive.
struct Building {
    input_fd: OwnedFd,
    input_map: Mapped,
    manifest: Option<Manifest>,
    have_state: bool,
    memfds: [Option<OwnedFd>; 3],
    memory_bytes: u64,
    table: Option<FdTable>,
    sockets: Vec<(i32, SocketImage)>,
    /// Memory came ahead (pre-copy) into its memory files.
    precopied: bool,
}

impl Building {
    fn new() -> Result<Building> {
        let input_fd = memfd("lwk-restore", 0)?;
        rustix::fs::ftruncate(&input_fd, INPUT_SIZE).context("sizing the restore input")?;
        let input_map =
            Mapped::new(input_fd.as_raw_fd(), INPUT_SIZE as usize, 0).context("mapping the restore input")?;
        Ok(Building {
            input_fd,
            input_map,
            manifest: None,
            have_state: false,
            memfds: [None, None, None],
            memory_bytes: 0,
            table: None,
            sockets: Vec::new(),
            precopied: false,
        })
    }

    fn input(&mut self) -> &mut RestoreInput {
        input_in(&mut self.input_map)
    }

    /// Everything read: check that it adds up, fill in the rest of the input.
    fn finish(mut self, path: &Path) -> Result<Prepared> {
        let bad = |what: &str| anyhow::anyhow!("{}: {what}", path.display());
        let manifest = self.manifest.take().ok_or_else(|| bad("no manifest"))?;
        let table = self.table.take().ok_or_else(|| bad("no descriptors"))?;
        check_supplies(&table, &self.sockets)?;
        if !self.have_state {
            return Err(bad("no LWK state"));
        }
        if self.memory_bytes != manifest.memory_bytes {
            return Err(bad("the memory records do not add up to what the manifest says"));
        }
        let input = self.input();
        let x = &mut input.export;
        x.magic = EXPORT_MAGIC;
        x.version = EXPORT_VERSION;
        x.n_threads = x.threads.iter().filter(|t| t.saved != 0).count() as u32;
        if x.n_threads != manifest.threads {
            return Err(bad("the thread records do not match the manifest"));
        }
        let thread_ids: Vec<i32> = x.threads.iter().filter(|t| t.saved != 0).map(|t| t.tid).collect();
        input.magic = INPUT_MAGIC;
        input.same_ids = 1;
        input.specials = manifest.specials;
        if let Some(c) = &manifest.credentials {
            if !input.credentials.set(c.uid, c.gid, &c.groups) {
                bail!(
                    "{}: the application had {} supplementary groups, more than {MAX_GROUPS}",
                    path.display(),
                    c.groups.len()
                );
            }
        }
        if manifest.file_mappings.len() > MAX_FILE_MAPPINGS {
            bail!("{}: more than {MAX_FILE_MAPPINGS} file mappings", path.display());
        }
        input.n_files = manifest.file_mappings.len() as u64;
        for (slot, f) in input.files.iter_mut().zip(&manifest.file_mappings) {
            let p = f.path.as_bytes();
            if p.len() >= FILE_PATH_MAX {
                bail!("{}: the path is too long for a restore", f.path);
            }
            *slot = FileMapping { start: f.start, end: f.end, path: [0; FILE_PATH_MAX] };
            slot.path[..p.len()].copy_from_slice(p);
        }
        let mm_fds = input.export.state.mm.memfd;
        let lwk_fds =
            input.export.state.signalfd.entries.iter().filter(|e| e.app_fd >= 0).flat_map(|e| [e.sfd, e.pipe]);
        let lwk_fds = lwk_fds.collect();
        let memfds = self.memfds.into_iter().enumerate().filter_map(|(k, fd)| Some((fd?, mm_fds[k]))).collect();
        let Building { input_fd, input_map, sockets, .. } = self;
        drop(input_map);
        Ok(Prepared { manifest, table, sockets, thread_ids, input: input_fd, memfds, lwk_fds })
    }
}

/// The restore input in `map` (a Building's).
fn input_in(map: &mut Mapped) -> &mut RestoreInput {
    // SAFETY: the mapping is INPUT_SIZE bytes, zeroed when made, and
    // RestoreInput is plain data valid when zeroed; it is used only
    // through the &mut borrow of its mapping.
    unsafe { &mut *(map.ptr as *mut RestoreInput) }
}

/// Read and check the image, and fill each process's memory files: the
/// processes, first the one `lwk run` started, and how they relate (one
/// process: a tree of one).
fn prepare(
    dir: &Path,
    key: Option<&lwk_migrate::image::ClusterKey>,
    image_fd: Option<i32>,
    part: &mut Option<OwnPartition>,
) -> Result<(Vec<Prepared>, TreeRecord)> {
    let path = match image_fd {
        Some(fd) => PathBuf::from(format!("the image on descriptor {fd}")),
        None => dir.join(IMAGE_FILE),
    };
    let f = match image_fd {
        // SAFETY: a descriptor our caller (the node daemon) passed us, ours now.
        Some(fd) => unsafe { File::from_raw_fd(fd) },
        None => File::open(&path).with_context(|| format!("cannot open {}", path.display()))?,
    };
    let mut r = ImageReader::new(BufReader::new(f), key).with_context(|| format!("{}", path.display()))?;
    let bad = |what: &str| anyhow::anyhow!("{}: {what}", path.display());

    // Pre-copied memory first (each process's, into its memory files),
    // then the tree, then each process's records, each starting with its
    // manifest.
    let mut builds: Vec<Building> = Vec::new();
    let mut cur: Option<usize> = None;
    let mut tree: Option<TreeRecord> = None;
    let mut premap: Vec<MappedRange> = Vec::new();
    let members = |tree: &Option<TreeRecord>| tree.as_ref().map_or(1, |t| t.members.len());
    while let Some(rec) = r.next_record().with_context(|| format!("reading {}", path.display()))? {
        match rec {
            Record::Known { kind: RecordKind::Processes, .. } => {
                if tree.is_some() || cur.is_some() {
                    return Err(bad("the process tree record is out of place"));
                }
                let t: TreeRecord = rec.json()?;
                check_tree(&t).map_err(|e| bad(&e))?;
                if builds.len() > t.members.len() {
                    return Err(bad("memory came ahead for more processes than the tree has"));
                }
                tree = Some(t);
            }
            Record::Known { kind: RecordKind::Manifest, .. } => {
                let m: Manifest = rec.json()?;
                if m.lwk_state_size != std::mem::size_of::<LwkState>() as u64
                    || m.thread_record_size != std::mem::size_of::<ThreadRecord>() as u64
                {
                    bail!(
                        "{}: written by another lwk build ({}); restore it with that build",
                        path.display(),
                        m.lwk_version
                    );
                }
                check_files(&m)?;
                let next = cur.map_or(0, |c| c + 1);
                if next >= members(&tree) {
                    return Err(bad("more processes than the tree record names"));
                }
                if let (0, Some(spec), None) = (next, &m.partition, &part) {
                    if builds.iter().any(|b| b.memfds.iter().any(Option::is_some)) {
                        return Err(bad("memory came ahead of the partition it belongs in"));
                    }
                    *part = Some(OwnPartition::create(spec)?);
                }
                while builds.len() <= next {
                    builds.push(Building::new()?);
                }
                builds[next].manifest = Some(m);
                cur = Some(next);
            }
            Record::Known { kind: RecordKind::LwkState, payload } => {
                let i = cur.ok_or_else(|| bad("the LWK state record is out of place"))?;
                if payload.len() != std::mem::size_of::<LwkState>() || builds[i].have_state {
                    return Err(bad("the LWK state record is out of place or of the wrong size"));
                }
                let input = builds[i].input();
                // SAFETY: the record holds the bytes of an LwkState written
                // by this build (its size checked, its hash verified); the
                // LWK checks every value before it uses it.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        payload.as_ptr(),
                        &mut input.export.state as *mut LwkState as *mut u8,
                        payload.len(),
                    )
                };
                builds[i].have_state = true;
                let t = tree.as_ref();
                let shares = t.and_then(|t| t.members.get(i)?.shares_memory_with);
                let shared_slot =
                    shares.is_some() || t.is_some_and(|t| t.members.iter().any(|m| m.shares_memory_with == Some(i)));
                // The shared memory of a process it forked, or that forked
                // it: one file for both.
                let theirs = match shares {
                    Some(j) => builds[j].memfds[2]
                        .as_ref()
                        .map(|f| f.try_clone())
                        .transpose()
                        .context("sharing a memory file")?,
                    None => None,
                };
                let b = &mut builds[i];
                let mm = &input_in(&mut b.input_map).export.state.mm;
                for k in 0..3 {
                    if mm.memfd[k] < 0 {
                        b.memfds[k] = None; // pre-copied, but no longer in use
                    } else if k == 2 && theirs.is_some() {
                        b.memfds[2] = theirs.as_ref().map(|f| f.try_clone()).transpose()?;
                    } else if b.memfds[k].is_none() {
                        b.memfds[k] = Some(memory_file(k, part.as_ref())?);
                    }
                }
                if b.precopied {
                    // A shared file's free offsets may be another process's.
                    free_unused(mm, &b.memfds, if shared_slot { 2 } else { 3 })?;
                }
            }
            Record::Known { kind: RecordKind::ThreadContexts, payload } => {
                let size = 4 + std::mem::size_of::<ThreadRecord>();
                let i = cur.filter(|&i| builds[i].have_state);
                let Some(i) = i.filter(|_| payload.len() % size == 0) else {
                    return Err(bad("the thread record is out of place or of the wrong size"));
                };
                let input = builds[i].input();
                for chunk in payload.chunks(size) {
                    let slot = u32::from_le_bytes(chunk[..4].try_into().expect("4 bytes")) as usize;
                    let Some(t) = input.export.threads.get_mut(slot) else {
                        return Err(bad("a thread slot is out of range"));
                    };
                    // SAFETY: as for the state: a ThreadRecord's bytes from
                    // this build; the LWK checks what it uses.
                    unsafe {
                        std::ptr::copy_nonoverlapping(chunk[4..].as_ptr(), t as *mut ThreadRecord as *mut u8, size - 4)
                    };
                    t.saved = 1;
                }
            }
            Record::Known { kind: RecordKind::Descriptors, .. } => {
                let i = cur.ok_or_else(|| bad("the descriptors record is out of place"))?;
                let t: FdTable = rec.json()?;
                fds::check(&t).context("the application's files are not as they were")?;
                builds[i].table = Some(t);
            }
            Record::Known { kind: RecordKind::Sockets, .. } => {
                let i = cur.ok_or_else(|| bad("the sockets record is out of place"))?;
                builds[i].sockets = rec.json()?;
            }
            Record::Known { kind: RecordKind::MemoryMap, .. } => {
                if cur.is_some() {
                    return Err(bad("a memory map after the processes' states"));
                }
                premap = rec.json()?;
            }
            Record::Memory(m) if cur.is_none() => {
                // Pre-copy: into the memory file the map sent just before
                // names.
                let end = m.addr + m.bytes.len() as u64;
                let r = premap
                    .iter()
                    .find(|r| r.start <= m.addr && end <= r.end && r.slot < 3)
                    .ok_or_else(|| bad("pre-copied memory outside the map sent with it"))?;
                if r.member >= MAX_TREE {
                    return Err(bad("pre-copied memory of a process beyond any tree"));
                }
                while builds.len() <= r.member {
                    builds.push(Building::new()?);
                }
                let b = &mut builds[r.member];
                if b.memfds[r.slot].is_none() {
                    b.memfds[r.slot] = Some(memory_file(r.slot, part.as_ref())?);
                }
                write_at(&b.memfds, r.slot, r.offset + (m.addr - r.start), &m.bytes)
                    .with_context(|| format!("restoring pre-copied memory at {:#x}", m.addr))?;
                b.precopied = true;
            }
            Record::Memory(m) => {
                let b = &mut builds[cur.expect("checked by the guard above")];
                if !b.have_state {
                    return Err(bad("memory before its process's state"));
                }
                let mm = &input_in(&mut b.input_map).export.state.mm;
                write_memory(mm, &b.memfds, m.addr, &m.bytes)
                    .with_context(|| format!("restoring memory at {:#x}", m.addr))?;
                b.memory_bytes += m.bytes.len() as u64;
            }
            Record::Known { .. } | Record::Unknown { .. } => {}
        }
    }
    if builds.len() != members(&tree) || cur != Some(builds.len() - 1) {
        return Err(bad("fewer processes than the tree record names"));
    }
    let prepared = builds.into_iter().map(|b| b.finish(&path)).collect::<Result<Vec<_>>>()?;
    let tree = match tree {
        Some(t) => t,
        None => TreeRecord {
            members: vec![MemberRecord {
                pid_in_namespace: prepared[0].manifest.pid_in_namespace,
                parent: None,
                exit_signal: libc::SIGCHLD,
                shares_memory_with: None,
            }],
            shared: Vec::new(),
        },
    };
    Ok((prepared, tree))
}

/// The most processes a tree may have here (a bound on what an image can
/// make this restorer build).
const MAX_TREE: usize = 4096;

/// Pre-copied pages at offsets the memory manager no longer uses must read
/// as zeros when it gives them out again, as its free offsets do (in the
/// memory files below slot `below`).
fn free_unused(mm: &MmSnapshot, files: &[Option<OwnedFd>; 3], below: usize) -> Result<()> {
    for (k, file) in files.iter().enumerate().take(below) {
        let Some(fd) = file else { continue };
        let e = &mm.extents[k];
        for x in &e.free[..(e.n as usize).min(e.free.len())] {
            rustix::fs::fallocate(
                fd,
                rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
                x.off,
                x.len,
            )
            .context("freeing pre-copied pages no longer in use")?;
        }
    }
    Ok(())
}

/// A tree record makes sense: a first process, parents before children,
/// shared memory and descriptions of processes it names.
fn check_tree(t: &TreeRecord) -> std::result::Result<(), String> {
    if t.members.is_empty() || t.members[0].parent.is_some() {
        return Err("the process tree has no first process".into());
    }
    for (i, m) in t.members.iter().enumerate().skip(1) {
        if m.parent.is_none_or(|p| p >= i) || m.shares_memory_with.is_some_and(|j| j >= i) {
            return Err(format!("process {} of the tree comes before its parent", m.pid_in_namespace));
        }
        if !(1..=64).contains(&m.exit_signal) {
            return Err(format!("process {} of the tree has exit signal {}", m.pid_in_namespace, m.exit_signal));
        }
    }
    if t.shared.iter().flat_map(|s| &s.holders).any(|&(m, _)| m >= t.members.len()) {
        return Err("a shared descriptor names a process outside the tree".into());
    }
    Ok(())
}

/// The files the program had mapped must be the same here.
fn check_files(m: &Manifest) -> Result<()> {
    for f in &m.file_mappings {
        let meta = std::fs::metadata(&f.path)
            .with_context(|| format!("{}, which the program had mapped, is not here", f.path))?;
        if meta.len() != f.size || mtime_ns(&meta) != f.mtime_ns {
            bail!(
                "{}, which the program had mapped, has changed since the checkpoint (size or modification time)",
                f.path
            );
        }
    }
    Ok(())
}

/// What leads outside the application (a terminal, a pipe to another
/// process) is handed over: standard input, output and error are this
/// command's. Sockets are rebuilt from their images. Anything else of that
/// kind cannot be yet.
fn check_supplies(t: &FdTable, sockets: &[(i32, SocketImage)]) -> Result<()> {
    let others: Vec<String> = t
        .to_supply()
        .into_iter()
        .filter(|(fd, _)| *fd > 2 && !sockets.iter().any(|s| s.0 == *fd))
        .map(|(fd, why)| format!("fd {fd} ({why})"))
        .collect();
    if !others.is_empty() {
        bail!(
            "the application had descriptors that lead outside it, which lwk restore cannot hand over yet \
             (only standard input, output and error): {}",
            others.join(", ")
        );
    }
    Ok(())
}

/// A new memory file of slot `k` (4 KiB pages, 2 MiB pages, shared), as
/// the LWK makes them: in the partition's memory directory when its pages
/// are the partition's.
fn memory_file(k: usize, part: Option<&OwnPartition>) -> Result<OwnedFd> {
    if let Some(p) = part.filter(|p| p.holds_slot(k)) {
        let dir = &p.part().mem_dir;
        let fd = rustix::fs::open(
            dir,
            rustix::fs::OFlags::TMPFILE | rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::from_raw_mode(0o600),
        )
        .with_context(|| format!("a memory file in the partition's {}", dir.display()))?;
        rustix::fs::ftruncate(&fd, MEMFD_SPACE).context("sizing a memory file")?;
        return Ok(fd);
    }
    let (name, flags) = match k {
        0 => ("lwk-mem", 0),
        1 => ("lwk-huge", libc::MFD_HUGETLB | libc::MFD_HUGE_2MB),
        _ => ("lwk-shared", 0),
    };
    let fd = memfd(name, flags)?;
    rustix::fs::ftruncate(&fd, MEMFD_SPACE).context("sizing a memory file")?;
    Ok(fd)
}

/// Put `bytes`, the application's memory at `addr`, into the memory file
/// of the piece that holds it.
fn write_memory(mm: &MmSnapshot, files: &[Option<OwnedFd>; 3], addr: u64, bytes: &[u8]) -> Result<()> {
    let pieces: &[PieceRecord] = &mm.pieces[..(mm.n_pieces as usize).min(mm.pieces.len())];
    let end = addr.checked_add(bytes.len() as u64).context("the range wraps")?;
    let i = pieces.partition_point(|p| p.end <= addr);
    let p = pieces.get(i).filter(|p| p.start <= addr && end <= p.end).context("no single piece of the map holds it")?;
    let k = memfd_slot(p.src).context("the piece is not backed by a memory file")?;
    write_at(files, k, p.off + (addr - p.start), bytes)
}

/// Put `bytes` into memory file `k` at `off`.
fn write_at(files: &[Option<OwnedFd>; 3], k: usize, off: u64, bytes: &[u8]) -> Result<()> {
    let file = files[k].as_ref().context("its memory file is missing")?;
    if k == 1 {
        // hugetlbfs has no write(): map the huge pages and copy.
        let (lo, hi) = (off & !(HUGE - 1), (off + bytes.len() as u64).next_multiple_of(HUGE));
        let m = Mapped::new(file.as_raw_fd(), (hi - lo) as usize, lo)
            .context("mapping 2 MiB pages (are enough huge pages free? /proc/sys/vm/nr_hugepages)")?;
        // SAFETY: the mapping covers [lo, hi), which holds [off, off+len).
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), m.ptr.add((off - lo) as usize), bytes.len()) };
    } else {
        // SAFETY: a File borrowing our descriptor, not closing it.
        let f = std::mem::ManuallyDrop::new(unsafe { File::from_raw_fd(file.as_raw_fd()) });
        f.write_all_at(bytes, off)?;
    }
    Ok(())
}

pub fn main(args: RestoreArgs) -> Result<i32> {
    let key = match &args.key {
        Some(k) => Some(lwk_node::key::load(k)?),
        None => None,
    };
    // A partition like the one it ran in, before its memory comes.
    let mut part = match &args.partition {
        Some(json) => {
            let spec: PartitionSpec = serde_json::from_str(json).context("--partition")?;
            Some(OwnPartition::create(&spec)?)
        }
        None => None,
    };
    let (ps, tree) = prepare(&args.dir, key.as_ref(), args.image_fd, &mut part)?;
    if part.is_some() && ps[0].manifest.partition.is_none() {
        bail!("--partition: the image says the application ran in no partition");
    }
    let held_by = ps[0].manifest.held_by.clone();
    let kernel = run::kernel_image()?;
    let mut regions = Vec::with_capacity(ps.len());
    for p in &ps {
        let region = run::ControlRegion::create(p.manifest.options, run::spin_cycles())?;
        let h = &region.get().header;
        h.parent_pid.store(p.manifest.parent_pid, Ordering::Relaxed);
        if let Some(own) = &part {
            use std::os::unix::ffi::OsStrExt;
            let q = own.part();
            if !h.partition.set(&q.cpus, q.page_size, q.mem_dir.as_os_str().as_bytes()) {
                bail!("partition {}: its CPU numbers or memory path do not fit the LWK's control region", q.name);
            }
        }
        if args.go_fd.is_none() {
            h.restore_gate.store(RESTORE_OPEN, Ordering::SeqCst);
        }
        regions.push(region);
    }
    // What the processes' proxies share, built once and handed to each.
    let mut shared = build_shared(&tree.shared, &ps)?;

    // The application gets its process ids back in a pid namespace of its
    // own (and a mount namespace whose /proc shows it): a keeper is the
    // namespace's first process, the proxies come next, the application
    // processes then get their old pids, and the LWK gives each thread its
    // old tid.
    // Our own pid namespace, to come back to once the children are there.
    let own_pid_ns = File::open("/proc/self/ns/pid").context("opening our own pid namespace")?;
    // SAFETY: plain unshare; this process has one thread.
    if unsafe { libc::unshare(libc::CLONE_NEWPID) } != 0 {
        let e = std::io::Error::last_os_error();
        bail!("lwk restore needs root, to give the application its process ids back in a pid namespace: {e}");
    }
    let max_id = ps
        .iter()
        .flat_map(|p| p.thread_ids.iter().copied().chain([p.manifest.pid_in_namespace]))
        .chain(tree.members.iter().map(|m| m.pid_in_namespace))
        .max()
        .unwrap_or(1);
    let mut keeper = Keeper::start(max_id)?;
    let proxy_mnt = keeper.mnt.try_clone().context("the keeper's mount namespace")?;
    let (proxies, pending) = spawn_proxies(&kernel, &ps, &regions, &mut shared, &proxy_mnt)?;
    let address = args.address.zip(args.address_dev.as_deref());
    let mut pending = Some(pending);
    if args.go_fd.is_none() {
        // Here already: the sockets go live before the application starts.
        if let Err(e) = pending.take().expect("once").finish(address) {
            end_children(&proxies);
            return Err(e);
        }
    }
    let launches: Result<Vec<Launch>> =
        ps.iter().enumerate().map(|(i, p)| launch_of(p, &regions[i], &tree, i)).collect();
    let launches = match launches {
        Ok(l) => l,
        Err(e) => {
            end_children(&proxies);
            return Err(e);
        }
    };
    let procs = part.as_ref().map(OwnPartition::procs_fd);
    let app = match spawn_restoring(&kernel, &launches, &proxy_mnt, procs) {
        Ok(c) => c,
        Err(e) => {
            end_children(&proxies);
            return Err(e);
        }
    };
    let mut all = vec![app];
    all.extend(&proxies);
    drop(launches);
    drop(ps);
    // Back in our own namespace for the children to come: only there can
    // this process start threads (the relay's, if the application moves
    // on), as clone refuses a thread whose children's namespace is not
    // its own.
    // SAFETY: setns on a namespace descriptor of ours.
    if unsafe { libc::setns(own_pid_ns.as_raw_fd(), libc::CLONE_NEWPID) } != 0 {
        let e = std::io::Error::last_os_error();
        end_children(&all);
        bail!("cannot return to our own pid namespace: {e}");
    }
    if let (Some(ready), Some(go)) = (args.ready_fd, args.go_fd) {
        let finish = || pending.take().expect("once").finish(address);
        let ns_pids: Vec<i32> = tree.members.iter().map(|m| m.pid_in_namespace).collect();
        let at_gate = AtGate { regions: &regions, app, proxy: proxies[0], ns_pids: &ns_pids };
        if let Err(e) = hold_at_gate(&at_gate, ready, go, finish) {
            // The image directory is the daemon's, and this copy is not to
            // run: nothing of it stays.
            std::fs::remove_dir_all(&args.dir).ok();
            end_children(&all);
            return Err(e);
        }
    }
    // The source node kept the connections' peers out since the
    // checkpoint (`lwk checkpoint`); if this is that node, they come in
    // again now that the sockets are back.
    if let Some(name) = &held_by {
        match lwk_node::quiet::release(name) {
            Ok(_) => {}
            Err(e) => eprintln!("lwk restore: warning: TCP held since the checkpoint is still held out: {e:#}"),
        }
    }
    run::APP_PID.store(app, Ordering::Relaxed);
    run::setup_signals();
    let standing = run::Standing::start(&regions[0])?;
    let outcome = run::wait_both(app, proxies[0]);
    // The other processes' proxies are ours too: those whose application
    // ended have ended. An application process that outlives the first (an
    // orphan, as natively) goes on with its proxy in the keeper's care.
    for &p in &proxies[1..] {
        // SAFETY: reaping our own child if it ended.
        unsafe { libc::waitpid(p, std::ptr::null_mut(), libc::WNOHANG) };
    }
    if part.is_none() {
        keeper.let_go();
    }
    let mut outcome = outcome?;
    outcome.status = standing.outcome(&regions[0], outcome.status)?;
    run::APP_PID.store(0, Ordering::Relaxed);
    // Its partition goes before a signal of the application's ends us,
    // and with it whatever of the application still runs there.
    drop(keeper);
    drop(part);
    if let Some(e) = outcome.proxy_failure {
        bail!("the proxy process failed ({e}); the application was stopped");
    }
    Ok(match outcome.status {
        ExitStatus::Code(c) => c,
        ExitStatus::Signal(sig) => run::reraise(sig),
    })
}

/// Start every process's proxy, each with the descriptions it shares with
/// the others (`shared`), in the mount namespace `mnt` (the keeper's):
/// their pids (the first one's first) and their sockets not yet live. On
/// an error, those started are ended.
fn spawn_proxies(
    kernel: &Path,
    ps: &[Prepared],
    regions: &[run::ControlRegion],
    shared: &mut [BTreeMap<i32, OwnedFd>],
    mnt: &File,
) -> Result<(Vec<i32>, Pending)> {
    let mut proxies: Vec<i32> = Vec::with_capacity(ps.len());
    let mut pending = Pending { tcp: Vec::new(), udp: Vec::new() };
    for (i, p) in ps.iter().enumerate() {
        let given = std::mem::take(&mut shared[i]);
        match spawn_proxy(kernel, &regions[i], &p.table, &p.sockets, given, mnt, i > 0) {
            Ok((pid, pend)) => {
                proxies.push(pid);
                pending.tcp.extend(pend.tcp);
                pending.udp.extend(pend.udp);
            }
            Err(e) => {
                end_children(&proxies);
                return Err(e);
            }
        }
    }
    Ok((proxies, pending))
}

/// The descriptions the tree's proxies share (`shared`), each built once:
/// for each process, the descriptors to hand its proxy, by number.
fn build_shared(shared: &[Shared], ps: &[Prepared]) -> Result<Vec<BTreeMap<i32, OwnedFd>>> {
    let mut given: Vec<BTreeMap<i32, OwnedFd>> = ps.iter().map(|_| BTreeMap::new()).collect();
    for (id, s) in shared.iter().enumerate() {
        let entry_of = |m: usize, fd: i32| {
            ps.get(m)
                .and_then(|p| p.table.entry(fd))
                .filter(|e| e.disposition == fds::Disposition::Shared { id })
                .with_context(|| format!("shared descriptor {fd} of process {m} is not in its table"))
        };
        match &s.what {
            SharedWhat::Pipe(contents) => {
                let first = s.holders.first().map_or(-1, |h| h.1);
                let (r, w) = fds::rebuild_pipe(contents, first).context("rebuilding a pipe between the processes")?;
                // Each end one description, with the status flags its first
                // holder's entry says.
                let mut flagged = [false, false];
                for &(m, fd) in &s.holders {
                    let e = entry_of(m, fd)?;
                    let end = lwk_migrate::tree::pipe_end(e).context("a shared pipe entry that is no pipe")?;
                    let (mine, k) = match end {
                        fds::PipeEnd::Read => (r.try_clone()?, 0),
                        fds::PipeEnd::Write => (w.try_clone()?, 1),
                        // An anonymous pipe has no path; /proc opens it again.
                        fds::PipeEnd::ReadWrite => (
                            rustix::fs::open(
                                format!("/proc/self/fd/{}", r.as_raw_fd()).as_str(),
                                rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC,
                                rustix::fs::Mode::empty(),
                            )
                            .context("opening a shared pipe for reading and writing")?,
                            2,
                        ),
                    };
                    if k == 2 || !flagged[k] {
                        fds::set_status_flags(mine.as_fd(), e)?;
                        if k < 2 {
                            flagged[k] = true;
                        }
                    }
                    given[m].insert(fd, mine);
                }
            }
            SharedWhat::TcpSocket { listener } => {
                let listener = listener.as_ref().context("a shared TCP socket without its image")?;
                let one =
                    listener.restore().with_context(|| format!("rebuilding the listener on {}", listener.local))?;
                // Its status flags (O_NONBLOCK), as its first holder had them.
                if let Some(&(m, fd)) = s.holders.first() {
                    fds::set_status_flags(one.as_fd(), entry_of(m, fd)?)?;
                }
                for &(m, fd) in &s.holders {
                    entry_of(m, fd)?;
                    given[m].insert(fd, one.try_clone()?);
                }
            }
            SharedWhat::Description(e) => {
                let one = fds::rebuild_description(e)
                    .with_context(|| format!("rebuilding descriptor {} shared by the processes", e.fd))?;
                for &(m, fd) in &s.holders {
                    entry_of(m, fd)?;
                    given[m].insert(fd, one.try_clone()?);
                }
            }
        }
    }
    Ok(given)
}

/// Kill and reap our children `pids` (a restore that will not run).
fn end_children(pids: &[i32]) {
    for &pid in pids {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    for &pid in pids {
        // SAFETY: reaping our own child.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
    }
}

/// The restored processes held at their gates.
struct AtGate<'a> {
    /// One control region per process, the first process's first.
    regions: &'a [run::ControlRegion],
    /// The first application process and its proxy (our children).
    app: i32,
    proxy: i32,
    /// Each process's pid in the application's namespace.
    ns_pids: &'a [i32],
}

impl AtGate<'_> {
    /// Has process `i` of the tree ended (or never started)? The others
    /// are not our children: the first proxy's mount namespace has a
    /// /proc of their pid namespace.
    fn ended(&self, i: usize) -> bool {
        if i == 0 {
            return run::has_terminated(self.app);
        }
        lwk_migrate::app::ended(&format!("/proc/{}/root/proc/{}/stat", self.proxy, self.ns_pids[i]))
    }
}

/// Wait until every restored process is ready at its gate, say so on
/// `ready`, and when `go` brings a byte make the sockets live and open the
/// gates; `go` closing first (the source kept its application) is an error.
fn hold_at_gate(at: &AtGate<'_>, ready: i32, go: i32, sockets_live: impl FnOnce() -> Result<()>) -> Result<()> {
    // SAFETY: descriptors our caller (the node daemon) passed us, ours now.
    let (ready, go) = unsafe { (File::from_raw_fd(ready), File::from_raw_fd(go)) };
    for (i, region) in at.regions.iter().enumerate() {
        let gate = &region.get().header.restore_gate;
        let mut looked = std::time::Instant::now();
        while gate.load(Ordering::SeqCst) != RESTORE_PARKED {
            // Looking for an ended process costs a read of /proc: not at
            // every turn.
            if (i == 0 || looked.elapsed() > std::time::Duration::from_millis(100)) && at.ended(i) {
                bail!("restored process {} of the application ended before it was ready", at.ns_pids[i]);
            }
            looked = std::time::Instant::now();
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }
    std::io::Write::write_all(&mut &ready, b"r").context("telling the daemon the application is ready")?;
    let mut byte = [0u8; 1];
    match std::io::Read::read(&mut &go, &mut byte) {
        Ok(1) if byte[0] == b'g' => {}
        _ => bail!("the source kept its application: the copy here ends"),
    }
    sockets_live()?;
    for region in at.regions {
        let gate = &region.get().header.restore_gate;
        gate.store(RESTORE_OPEN, Ordering::SeqCst);
        // SAFETY: waking the LWK's waiters on the gate word (a shared futex).
        unsafe { libc::syscall(libc::SYS_futex, gate.as_ptr(), libc::FUTEX_WAKE, i32::MAX) };
    }
    // The daemon tells the source when its freeze ended.
    std::io::Write::write_all(&mut &ready, b"o").ok();
    Ok(())
}

/// Start the proxy with the application's descriptors rebuilt at their
/// numbers (`fds::restore`, in the child before it becomes the LWK image),
/// its working directory, umask and limits. Descriptors that must close on
/// exec are rebuilt open across the exec and named to the proxy, which
/// marks them again.
fn spawn_proxy(
    kernel: &Path,
    region: &run::ControlRegion,
    table: &FdTable,
    sockets: &[(i32, SocketImage)],
    shared: BTreeMap<i32, OwnedFd>,
    mnt: &File,
    child: bool,
) -> Result<(i32, Pending)> {
    use std::os::unix::ffi::OsStrExt;
    let top = table.fds.iter().map(|e| e.fd).max().unwrap_or(2).max(2);
    // Above every number the table uses: restore leaves it where it is.
    // SAFETY: duplicating our own descriptor.
    let ctl = unsafe { libc::fcntl(region.fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, top + 1) };
    if ctl < 0 {
        bail!("cannot pass the control region on: {}", std::io::Error::last_os_error());
    }
    // SAFETY: ctl is ours alone from here.
    let ctl = unsafe { OwnedFd::from_raw_fd(ctl) };
    let cloexec: Vec<String> = table.fds.iter().filter(|e| e.close_on_exec).map(|e| e.fd.to_string()).collect();
    // A forked process's proxy may outlive us, as its process may.
    let role = if child { "child" } else { "first" };
    let args: Vec<std::ffi::CString> = [
        std::ffi::CString::new("lwk-proxy").expect("no NUL"),
        std::ffi::CString::new("proxy").expect("no NUL"),
        std::ffi::CString::new(ctl.as_raw_fd().to_string()).expect("no NUL"),
        std::ffi::CString::new(cloexec.join(",")).expect("no NUL"),
        std::ffi::CString::new(role).expect("no NUL"),
    ]
    .into();
    let path = std::ffi::CString::new(kernel.as_os_str().as_bytes()).context("the LWK image's path")?;
    let mut argv: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    // Sockets rebuilt from their images (the address is this node's: the
    // application ran here, or its address moved here).
    // Connections stay in repair mode and UDP sockets without their queue
    // until the address is here (Pending).
    // Descriptions shared with the tree's other processes: built once.
    let mut supplied = shared;
    let mut pending = Pending { tcp: Vec::new(), udp: Vec::new() };
    for (fd, image) in sockets {
        let why = || format!("cannot rebuild the socket of descriptor {fd}");
        let s = match image {
            SocketImage::TcpConnection(i) => {
                let r = i.restore_in_repair().with_context(why)?;
                let dup = r.as_fd().try_clone_to_owned()?;
                pending.tcp.push(r);
                dup
            }
            SocketImage::TcpListener(i) => i.restore().with_context(why)?,
            SocketImage::Udp(i) => {
                let (s, bound) = i.restore_bound().with_context(why)?;
                pending.udp.push((i.clone(), s.try_clone()?, bound));
                s
            }
        };
        supplied.insert(*fd, s);
    }
    // Handed over: our standard input, output and error.
    let stdio: Vec<i32> =
        table.to_supply().into_iter().map(|(fd, _)| fd).filter(|fd| !supplied.contains_key(fd)).collect();
    for fd in stdio {
        // SAFETY: only 0, 1 and 2 are handed over (check_supplies); a
        // closed one makes the dup fail.
        let own = rustix::io::fcntl_dupfd_cloexec(unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }, 3)
            .with_context(|| format!("cannot hand descriptor {fd} over"))?;
        supplied.insert(fd, own);
    }
    // The child says when its mount namespace is ready (one byte), or dies.
    let (ready_r, ready_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).context("a pipe")?;
    // SAFETY: this process has one thread, so the child may allocate; it
    // only rebuilds descriptors and execs (or exits).
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        bail!("cannot start the proxy: {}", std::io::Error::last_os_error());
    }
    if pid == 0 {
        let fail = |what: String| -> ! {
            eprintln!("lwk: restoring the application's descriptors: {what}");
            // SAFETY: leaving the child without running the parent's exit code.
            unsafe { libc::_exit(125) }
        };
        drop(ready_r);
        if let Err(e) =
            rustix::thread::move_into_link_name_space(mnt.as_fd(), Some(rustix::thread::LinkNameSpaceType::Mount))
        {
            fail(format!("joining the keeper's mount namespace: {e}"));
        }
        if rustix::io::write(&ready_w, b"r") != Ok(1) {
            fail("the restorer is gone".into());
        }
        drop(ready_w);
        if let Err(e) = fds::restore(table, fds::RestoreOptions { supplied }) {
            fail(e.to_string());
        }
        if let Err(e) = fds::apply_process_fs(&table.process) {
            fail(e.to_string());
        }
        // The proxy's table is the application's and nothing else: whatever
        // else this process had open closes at the exec.
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            let open: Vec<i32> = dir.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect();
            for fd in open.into_iter().filter(|&fd| fd != ctl.as_raw_fd() && table.entry(fd).is_none()) {
                // SAFETY: marking a descriptor of our own table.
                unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
            }
        }
        for e in &table.fds {
            // SAFETY: clearing FD_CLOEXEC on a descriptor just rebuilt.
            unsafe { libc::fcntl(e.fd, libc::F_SETFD, 0) };
        }
        // SAFETY: the control descriptor must survive the exec.
        unsafe { libc::fcntl(ctl.as_raw_fd(), libc::F_SETFD, 0) };
        // SAFETY: a NUL-terminated argv of ours; the environment is ours.
        unsafe { libc::execv(path.as_ptr(), argv.as_ptr()) };
        fail(format!("cannot start the LWK image: {}", std::io::Error::last_os_error()));
    }
    drop(ready_w);
    let mut byte = [0u8; 1];
    if rustix::io::read(&ready_r, &mut byte) != Ok(1) {
        // SAFETY: reaping our own child, which said why it failed.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
        bail!("the proxy could not join the application's namespaces");
    }
    Ok((pid, pending))
}

/// The first process of the application's pid namespace, which mounts its
/// /proc and stays while anything runs there: an application process
/// that outlives the first (as an orphan does natively) is not killed
/// with the namespace when the first process and its proxy end, and is
/// reaped here, as init reaps orphans. It holds nothing of ours (not the
/// image, not a socket, not our standard streams), and goes once this
/// process let it go and it is alone in the namespace. Killed when
/// dropped before [`Keeper::let_go`], and gone at once if this process
/// ends before that (a restore that failed, or was killed): the
/// namespace, and whatever runs there, goes with it.
struct Keeper {
    pid: i32,
    /// Its mount namespace, which the proxies and the application join.
    mnt: File,
    /// Its end: "go" and closed once the application runs.
    hold: Option<OwnedFd>,
    let_go: bool,
}

impl Keeper {
    fn start(max_id: i32) -> Result<Keeper> {
        let (hold_r, hold_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).context("a pipe")?;
        let (ready_r, ready_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).context("a pipe")?;
        // SAFETY: this process has one thread, so the child may allocate.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            bail!("cannot start the pid namespace's first process: {}", std::io::Error::last_os_error());
        }
        if pid == 0 {
            drop((hold_w, ready_r));
            if let Err(e) = enter_namespaces(max_id) {
                eprintln!("lwk: restoring the application's namespaces: {e:#}");
                // SAFETY: leaving the child without running the parent's exit code.
                unsafe { libc::_exit(125) }
            }
            rustix::io::write(&ready_w, b"k").ok();
            keep(hold_r, ready_w)
        }
        drop((hold_r, ready_w));
        let mut byte = [0u8; 1];
        if rustix::io::read(&ready_r, &mut byte) != Ok(1) {
            // SAFETY: reaping our own child, which said why it failed.
            unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
            bail!("could not set up the application's pid and mount namespaces");
        }
        let mnt = File::open(format!("/proc/{pid}/ns/mnt")).context("the keeper's mount namespace")?;
        Ok(Keeper { pid, mnt, hold: Some(hold_w), let_go: false })
    }

    /// The application is running: what of it outlives this process stays.
    fn let_go(&mut self) {
        if let Some(hold) = self.hold.take() {
            self.let_go = rustix::io::write(&hold, LET_GO) == Ok(1);
        }
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        if !self.let_go {
            end_children(&[self.pid]);
            return;
        }
        // Alone, it goes within moments: reaped here, not left to init.
        // With an orphan to keep, it stays (and is init's child after us).
        for _ in 0..10 {
            // SAFETY: reaping our own child if it ended.
            if unsafe { libc::waitpid(self.pid, std::ptr::null_mut(), libc::WNOHANG) } != 0 {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

/// What the restorer writes to let the keeper go its own way.
const LET_GO: &[u8] = b"g";

/// The keeper's life: reap what ends, and go when the restorer let go and
/// nothing else runs in the namespace, or at once if the restorer ended
/// without letting go.
fn keep(hold: OwnedFd, ready: OwnedFd) -> ! {
    use std::os::fd::IntoRawFd;
    drop(ready);
    // Only `hold` stays open, as 3; the standard streams are /dev/null.
    let hold = hold.into_raw_fd();
    // SAFETY: descriptor-number calls on our own table.
    unsafe {
        libc::dup2(hold, 3);
        libc::syscall(libc::SYS_close_range, 4u32, u32::MAX, 0u32);
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        for fd in 0..3 {
            libc::dup2(null, fd);
        }
        if null > 3 {
            libc::close(null);
        }
        libc::prctl(libc::PR_SET_NAME, c"lwk-keeper".as_ptr());
    }
    // Held: reap what ends, and wait for the restorer's word.
    loop {
        // SAFETY: reaping whatever ended among our children.
        while unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) } > 0 {}
        let mut p = libc::pollfd { fd: 3, events: libc::POLLIN, revents: 0 };
        // SAFETY: one pollfd of ours.
        if unsafe { libc::poll(&mut p, 1, 200) } > 0 {
            let mut byte = [0u8; 1];
            // SAFETY: one byte into our own buffer.
            if unsafe { libc::read(3, byte.as_mut_ptr().cast(), 1) } != 1 || byte != LET_GO {
                // SAFETY: leaving; the namespace ends with us.
                unsafe { libc::_exit(0) }
            }
            break;
        }
    }
    // Let go: reap until nothing else is left. Once the restorer is gone,
    // everything here is our child (orphans come to a namespace's first
    // process); until then some are its, which we only look for.
    loop {
        // SAFETY: waiting for any of our children.
        if unsafe { libc::waitpid(-1, std::ptr::null_mut(), 0) } < 0 {
            if alone() {
                // SAFETY: leaving, with nothing of the parent's to run.
                unsafe { libc::_exit(0) }
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

/// Is this (the first) process the only one in its pid namespace?
fn alone() -> bool {
    let Ok(dir) = std::fs::read_dir("/proc") else { return true };
    !dir.flatten().any(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()).is_some_and(|p| p != 1))
}

/// In the pid namespace's first process (the proxy, before it becomes the
/// LWK image): a mount namespace of the application's own with a /proc of
/// its pid namespace (so /proc/self, and /proc/PID with the ids the
/// application knows, are right), and the next ids handed out above every
/// id the application had, so the proxy's threads take none of them.
fn enter_namespaces(max_id: i32) -> Result<()> {
    use rustix::mount::{mount, mount_change, MountFlags, MountPropagationFlags};
    // SAFETY: a new mount namespace for this process, which has one thread
    // and holds no reference into the old one's mounts.
    unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNS) }.context("unshare(CLONE_NEWNS)")?;
    mount_change("/", MountPropagationFlags::REC | MountPropagationFlags::PRIVATE).context("making / private")?;
    mount("proc", "/proc", "proc", MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC, None)
        .context("mounting /proc for the pid namespace")?;
    std::fs::write("/proc/sys/kernel/ns_last_pid", max_id.to_string()).context("setting ns_last_pid")?;
    Ok(())
}

/// At most three memory files, the control region, stderr and the input.
const MAX_PLACES: usize = 6;

/// How one application process of the tree starts: the LWK image in
/// restore mode, as process `ns_pid` of the new pid namespace, with
/// `places` (descriptor, number) in place.
struct Launch {
    args: Vec<std::ffi::CString>,
    places: Vec<(i32, i32)>,
    ns_pid: i32,
    exit_signal: i32,
    /// The processes it forked (places in the tree), started by it.
    children: Vec<usize>,
}

/// Process `i` of the tree `p`, with its region: its memory files where
/// the saved state says, the control region, stderr for the LWK's
/// messages and the input above all of them (and above the numbers of the
/// LWK's signalfds, which it makes itself).
fn launch_of(p: &Prepared, region: &run::ControlRegion, tree: &TreeRecord, i: usize) -> Result<Launch> {
    let top = p.memfds.iter().map(|m| m.1).chain(p.lwk_fds.iter().copied()).max().unwrap_or(2).max(2) + 1;
    let (ctl_at, diag_at, input_at) = (top, top + 1, top + 2);
    let mut places: Vec<(i32, i32)> = p.memfds.iter().map(|(fd, at)| (fd.as_raw_fd(), *at)).collect();
    places.push((region.fd.as_raw_fd(), ctl_at));
    places.push((2, diag_at));
    places.push((p.input.as_raw_fd(), input_at));
    assert!(places.len() <= MAX_PLACES);
    let argv0 = p.manifest.command.split(' ').next().unwrap_or("lwk-restored");
    let args = [argv0.to_string(), "restore".into(), ctl_at.to_string(), diag_at.to_string(), input_at.to_string()]
        .into_iter()
        .map(|a| std::ffi::CString::new(a).context("a NUL in the command"))
        .collect::<Result<_>>()?;
    let m = &tree.members[i];
    let children = tree.members.iter().enumerate().filter(|(_, c)| c.parent == Some(i)).map(|(c, _)| c).collect();
    Ok(Launch { args, places, ns_pid: m.pid_in_namespace, exit_signal: m.exit_signal, children })
}

/// Start the tree's application processes, in the proxy's mount namespace
/// `mnt` (and the partition's cpuset, whose cgroup.procs is `procs`): the
/// first as our child, each other one as the child of the
/// process that forked it (which starts it before it becomes the LWK
/// image, so that wait4 and SIGCHLD work as they did). Everything else of
/// ours closes on exec. Returns the first one's pid as this process sees it.
fn spawn_restoring(kernel: &Path, launches: &[Launch], mnt: &File, procs: Option<i32>) -> Result<i32> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(kernel.as_os_str().as_bytes()).context("the LWK image's path")?;
    let pid = clone_at(launches[0].ns_pid, libc::SIGCHLD);
    if pid < 0 {
        let e = std::io::Error::last_os_error();
        bail!("cannot start the application process as pid {} in its pid namespace: {e}", launches[0].ns_pid);
    }
    if pid > 0 {
        return Ok(pid as i32);
    }
    // The child: only system calls on what was prepared above.
    // SAFETY: joining the proxy's mount namespace (this process has one thread).
    if unsafe { libc::setns(mnt.as_raw_fd(), libc::CLONE_NEWNS) } != 0 {
        launch_failed("joining the proxy's mount namespace");
    }
    // Into the partition's cpuset (with the processes it starts), so that
    // the LWK can pin each thread to one of its CPUs.
    // SAFETY: a write of our own bytes to an open descriptor.
    if procs.is_some_and(|fd| unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) } != 1) {
        launch_failed("entering the partition's cpuset");
    }
    launch(launches, 0, &path)
}

/// A fork (clone3 without a new stack or CLONE_VM) whose child is
/// process `ns_pid` of our pid namespace for children, and sends
/// `exit_signal` when it ends. Returns as fork does.
fn clone_at(ns_pid: i32, exit_signal: i32) -> libc::c_long {
    let ids = [ns_pid];
    // struct clone_args: flags, pidfd, child_tid, parent_tid, exit_signal,
    // stack, stack_size, tls, set_tid, set_tid_size, cgroup.
    let clone_args: [u64; 11] = [0, 0, 0, 0, exit_signal as u64, 0, 0, 0, ids.as_ptr() as u64, 1, 0];
    // SAFETY: clone3 without a new stack or CLONE_VM is a fork; the process
    // calling it has one thread.
    unsafe { libc::syscall(libc::SYS_clone3, clone_args.as_ptr(), std::mem::size_of_val(&clone_args)) }
}

fn launch_failed(what: &str) -> ! {
    eprintln!("lwk: starting the restored application: {what}: {}", std::io::Error::last_os_error());
    // SAFETY: leaving the child without running the parent's exit code.
    unsafe { libc::_exit(125) }
}

/// In the child that becomes process `i`: start its children (each does
/// the same), put its descriptors in place and become the LWK image.
fn launch(launches: &[Launch], i: usize, path: &std::ffi::CStr) -> ! {
    let l = &launches[i];
    for &c in &l.children {
        let pid = clone_at(launches[c].ns_pid, launches[c].exit_signal);
        if pid < 0 {
            launch_failed("starting a process it had forked");
        }
        if pid == 0 {
            launch(launches, c, path);
        }
    }
    let places = &l.places;
    let high = 1 + launches.iter().flat_map(|l| &l.places).map(|&(f, t)| f.max(t)).max().unwrap_or(0);
    let mut moved = [-1; MAX_PLACES];
    for (m, &(from, _)) in moved.iter_mut().zip(places) {
        // SAFETY: duplicating our own descriptors above every target.
        *m = unsafe { libc::fcntl(from, libc::F_DUPFD_CLOEXEC, high) };
        if *m < 0 {
            launch_failed("placing its descriptors");
        }
    }
    for (&fd, &(_, to)) in moved.iter().zip(places) {
        // SAFETY: every source was moved above every target first.
        if unsafe { libc::dup2(fd, to) } < 0 {
            launch_failed("placing its descriptors");
        }
    }
    let mut argv: Vec<*const libc::c_char> = l.args.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    // SAFETY: a NUL-terminated argv of ours; the environment is ours.
    unsafe { libc::execv(path.as_ptr(), argv.as_ptr()) };
    launch_failed("executing the LWK image")
}
