//! CPU and memory partitions for the LWK (the IHK `reserve`/`create` cycle).
//!
//! A partition is a set of CPUs given exclusively to LWK applications (a
//! cpuset cgroup, with the rest of the system and the IRQs kept on the other
//! CPUs) and memory reserved up front (hugetlb pages on a hugetlbfs mount, or
//! a size-limited tmpfs). Its state lives in /run/lwk/partitions/NAME:
//!
//! * `state.json`: what was done, as a list of steps written *before* each
//!   step is carried out (write-ahead, atomically by rename). Undoing is
//!   popping the list: a failed `create` does it at once, `destroy` does it
//!   later, also after `lwk` was killed in the middle of anything. Every undo
//!   is idempotent and takes "already gone" as done.
//! * `log`: one line per event, owned by the partition's owner.
//! * `run.lock`: flocked by the `lwk run` that uses the partition.
//! * `mem/`: the memory mount, where the LWK creates its memory files.
//!
//! `create` and `destroy` hold an flock on /run/lwk/lock.

pub mod cgroup;
pub mod irq;
pub mod spec;
pub mod sys;

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use rustix::fs::{chown, flock, FlockOperation, Gid, Uid};
use rustix::io::Errno;
use rustix::mount::{mount, unmount, MountFlags, UnmountFlags};
use serde::{Deserialize, Serialize};

use cgroup::Hierarchy;
use irq::IrqOriginals;
pub use spec::{
    format_cpu_list, format_size, parse_cpu_list, parse_size, validate_name, CpuListError, PageSize, SizeError, MAX_CPU,
};
use sys::{is_mount_point, is_root, read_opt, read_trim, write_raw, PathLock};

/// Where partitions live. Tests and tools may read it; nothing else should
/// write there.
pub const RUN_DIR: &str = "/run/lwk";

fn partitions_dir() -> PathBuf {
    Path::new(RUN_DIR).join("partitions")
}

fn state_dir(name: &str) -> PathBuf {
    partitions_dir().join(name)
}

/// One thing `create` did, recorded before doing it; its undo is in `undo`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "snake_case")]
pub enum Step {
    /// The shared cpusets (`lwk`, and `lwk.linux` on v1) were made to hold
    /// this partition's CPUs on Linux's behalf. Undo: fit them to the
    /// partitions that remain; with none, remove them.
    SharedCpusets { hierarchy: Hierarchy },
    /// Tasks of the root cpuset were moved into lwk.linux (v1). They go back
    /// with the undo of SharedCpusets, when no partition remains.
    MoveTasks { moved: Vec<i32>, left_in_root: usize },
    /// The partition's own cpuset. Undo: rmdir (busy unless forced).
    Cgroup { dir: PathBuf },
    /// IRQs steered away from the partitions. Undo: steer for the partitions
    /// that remain, or restore the originals.
    Irq { moved: usize, skipped: Vec<u32> },
    /// Huge pages added to the pool: `before` is the pool size read just
    /// before the write, `added` what the write really gave (None: written
    /// ahead, result unknown), `undo_from` the pool size read just before the
    /// undo's write (so a crash in the undo does not lower it twice).
    HugePages { counter: PathBuf, pages: u64, before: u64, added: Option<u64>, undo_from: Option<u64> },
    /// The memory mount. Undo: umount (busy: error), rmdir.
    Mount { dir: PathBuf, fstype: String, data: String },
}

/// Everything known about a partition; `state.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct State {
    pub name: String,
    pub cpus: Vec<usize>,
    pub mem_bytes: u64,
    pub page_size: u64,
    pub owner_uid: u32,
    pub owner_gid: u32,
    /// RFC 3339, UTC.
    pub created: String,
    /// Set when `create` finished; a partition without it is only good for
    /// `destroy`.
    pub complete: bool,
    /// The partition's cpuset (set before it is made).
    pub cgroup_dir: Option<PathBuf>,
    pub cgroup_version: u8,
    pub exclusive: bool,
    /// IRQ affinities before the first partition (see IrqOriginals).
    pub irq_originals: IrqOriginals,
    /// cpuset had to be enabled in the v2 root's subtree_control (carried
    /// like irq_originals, so the last partition to go can disable it).
    pub v2_enabled_cpuset: bool,
    /// The undo list, in the order done.
    pub steps: Vec<Step>,
}

impl State {
    fn dir(&self) -> PathBuf {
        state_dir(&self.name)
    }

    /// Writes state.json atomically (temporary file, then rename).
    fn save(&self) -> Result<()> {
        let dir = self.dir();
        let tmp = dir.join("state.json.tmp");
        let text = serde_json::to_string_pretty(self)?;
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        fs::rename(&tmp, dir.join("state.json")).with_context(|| format!("cannot write {}/state.json", dir.display()))
    }

    fn load(name: &str) -> Result<Option<State>> {
        let path = state_dir(name).join("state.json");
        match read_opt(&path)? {
            None => Ok(None),
            Some(t) => Ok(Some(serde_json::from_str(&t).with_context(|| format!("bad {}", path.display()))?)),
        }
    }

    fn push(&mut self, step: Step) -> Result<()> {
        self.steps.push(step);
        self.save()
    }

    fn last_mut(&mut self) -> &mut Step {
        self.steps.last_mut().expect("a step was pushed")
    }
}

/// A partition as `lwk run --partition NAME` uses it.
#[derive(Clone, Debug)]
pub struct Partition {
    pub name: String,
    pub cpus: Vec<usize>,
    /// The CPUs no partition holds: where Linux, the proxy and IRQs run.
    pub linux_cpus: Vec<usize>,
    pub mem_bytes: u64,
    /// 4096 for none, 2 << 20, 1 << 30.
    pub page_size: u64,
    /// The memory mount (hugetlbfs or tmpfs), owned by the owner, mode 0700.
    pub mem_dir: PathBuf,
    pub owner_uid: u32,
    pub owner_gid: u32,
    /// The partition's cpuset cgroup.
    pub cgroup_dir: PathBuf,
    /// /run/lwk/partitions/NAME.
    pub state_dir: PathBuf,
}

/// Opens a partition that `create` finished.
pub fn open(name: &str) -> Result<Partition> {
    validate_name(name)?;
    let st = State::load(name)?.ok_or_else(|| anyhow!("no partition {name}; see lwk partition list"))?;
    if !st.complete {
        bail!(
            "partition {name} is incomplete (its create did not finish); remove it with lwk partition destroy {name}"
        );
    }
    let cgroup_dir = st.cgroup_dir.clone().ok_or_else(|| anyhow!("partition {name} has no cpuset"))?;
    Ok(Partition {
        name: st.name.clone(),
        cpus: st.cpus.clone(),
        linux_cpus: linux_cpus()?,
        mem_bytes: st.mem_bytes,
        page_size: st.page_size,
        mem_dir: st.dir().join("mem"),
        owner_uid: st.owner_uid,
        owner_gid: st.owner_gid,
        cgroup_dir,
        state_dir: st.dir(),
    })
}

/// Holds a partition for one `lwk run`; released on drop or when the holder
/// dies (an flock).
#[derive(Debug)]
pub struct RunLock {
    file: File,
    pub name: String,
}

impl Drop for RunLock {
    fn drop(&mut self) {
        // Clear the pid while still holding the lock; closing releases it.
        let _ = self.file.set_len(0);
    }
}

impl Partition {
    pub fn log_path(&self) -> PathBuf {
        self.state_dir.join("log")
    }

    /// Exclusive, non-blocking: an error if another `lwk run` holds it.
    pub fn lock_for_run(&self) -> Result<RunLock> {
        let path = self.state_dir.join("run.lock");
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(sys::o_nofollow())
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        // `list` takes the lock for an instant to see whether it is free, so
        // a lock without a live holder's pid is retried for a moment.
        let deadline = Instant::now() + Duration::from_millis(500);
        loop {
            match flock(&file, FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => break,
                Err(Errno::WOULDBLOCK) => {
                    if let Some(pid) = holder_pid(&path) {
                        bail!("partition {} is busy: lwk run pid {pid}", self.name);
                    }
                    if Instant::now() > deadline {
                        bail!("partition {} is busy", self.name);
                    }
                    sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(e).with_context(|| format!("cannot lock {}", path.display())),
            }
        }
        file.set_len(0)?;
        file.rewind()?;
        write!(file, "{}", std::process::id())?;
        Ok(RunLock { file, name: self.name.clone() })
    }

    /// Puts a process (and its future children) into the partition's cpuset.
    pub fn add_task(&self, pid: i32) -> Result<()> {
        let procs = self.cgroup_dir.join("cgroup.procs");
        write_raw(&procs, &pid.to_string())
            .with_context(|| format!("cannot put pid {pid} into partition {} ({})", self.name, procs.display()))
    }

    /// Appends `TIME EVENT DETAILS` to the partition's log.
    pub fn log_event(&self, event: &str, details: &str) -> Result<()> {
        append_log(&self.state_dir, event, details)
    }
}

fn append_log(dir: &Path, event: &str, details: &str) -> Result<()> {
    let path = dir.join("log");
    let mut f = OpenOptions::new()
        .append(true)
        .custom_flags(sys::o_nofollow())
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let line = format!("{} {event} {}\n", sys::now_rfc3339(), details.replace('\n', " "));
    f.write_all(line.as_bytes()).with_context(|| format!("cannot write {}", path.display()))
}

/// The pid in a run.lock whose flock is held, if that process lives.
fn holder_pid(lock: &Path) -> Option<i32> {
    let mut s = String::new();
    File::open(lock).ok()?.read_to_string(&mut s).ok()?;
    let pid: i32 = s.trim().parse().ok()?;
    Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
}

/// The pid of the `lwk run` holding a partition, if any.
fn busy_pid(dir: &Path) -> Option<i32> {
    let path = dir.join("run.lock");
    let file = File::open(&path).ok()?;
    match flock(&file, FlockOperation::NonBlockingLockShared) {
        Ok(()) => None,
        Err(_) => holder_pid(&path).or(Some(0)),
    }
}

/// The CPUs that no partition holds.
pub fn linux_cpus() -> Result<Vec<usize>> {
    let taken: BTreeSet<usize> = all_states()?.iter().flat_map(|s| s.cpus.iter().copied()).collect();
    Ok(sys::online_cpus()?.into_iter().filter(|c| !taken.contains(c)).collect())
}

/// Every partition's state (a directory without a readable state is left out).
fn all_states() -> Result<Vec<State>> {
    let mut out = Vec::new();
    let Ok(dir) = fs::read_dir(partitions_dir()) else { return Ok(out) };
    for e in dir.flatten() {
        if let Some(name) = e.file_name().to_str() {
            if let Ok(Some(st)) = State::load(name) {
                out.push(st);
            }
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// What `create` is asked for.
#[derive(Clone, Debug)]
pub struct Request {
    pub name: String,
    pub cpus: Vec<usize>,
    pub mem_bytes: u64,
    pub page: PageSize,
    pub owner_uid: u32,
    pub owner_gid: u32,
}

/// A partition's description for `list` and `show`.
#[derive(Clone, Debug, Serialize)]
pub struct Info {
    pub name: String,
    pub cpus: String,
    pub linux_cpus: String,
    pub mem_bytes: u64,
    pub page_size: u64,
    pub hugepages: String,
    pub owner_uid: u32,
    pub owner: Option<String>,
    pub created: String,
    pub complete: bool,
    pub busy_pid: Option<i32>,
    pub exclusive: bool,
    pub cgroup: Option<PathBuf>,
    pub cgroup_version: u8,
    pub mem_dir: PathBuf,
    pub tasks_moved: usize,
    pub irqs_moved: usize,
    pub irqs_skipped: Vec<u32>,
    pub hugepages_added: u64,
}

fn info(st: &State, linux: &[usize]) -> Info {
    let mut i = Info {
        name: st.name.clone(),
        cpus: format_cpu_list(&st.cpus),
        linux_cpus: format_cpu_list(linux),
        mem_bytes: st.mem_bytes,
        page_size: st.page_size,
        hugepages: PageSize::from_bytes(st.page_size).map_or("?", |p| p.label()).to_string(),
        owner_uid: st.owner_uid,
        owner: nix::unistd::User::from_uid(st.owner_uid.into()).ok().flatten().map(|u| u.name),
        created: st.created.clone(),
        complete: st.complete,
        busy_pid: busy_pid(&st.dir()),
        exclusive: st.exclusive,
        cgroup: st.cgroup_dir.clone(),
        cgroup_version: st.cgroup_version,
        mem_dir: st.dir().join("mem"),
        tasks_moved: 0,
        irqs_moved: 0,
        irqs_skipped: Vec::new(),
        hugepages_added: 0,
    };
    for s in &st.steps {
        match s {
            Step::MoveTasks { moved, .. } => i.tasks_moved = moved.len(),
            Step::Irq { moved, skipped } => (i.irqs_moved, i.irqs_skipped) = (*moved, skipped.clone()),
            Step::HugePages { added, .. } => i.hugepages_added = added.unwrap_or(0),
            _ => {}
        }
    }
    i
}

pub fn list() -> Result<Vec<Info>> {
    let linux = linux_cpus()?;
    Ok(all_states()?.iter().map(|s| info(s, &linux)).collect())
}

pub fn show(name: &str) -> Result<Info> {
    validate_name(name)?;
    let st = State::load(name)?.ok_or_else(|| anyhow!("no partition {name}; see lwk partition list"))?;
    Ok(info(&st, &linux_cpus()?))
}

/// The partition's log.
pub fn read_log(name: &str) -> Result<String> {
    validate_name(name)?;
    let dir = state_dir(name);
    if !dir.exists() {
        bail!("no partition {name}; see lwk partition list");
    }
    Ok(read_opt(&dir.join("log"))?.unwrap_or_default())
}

/// Test hooks: `LWK_PARTITION_TEST_CRASH_AFTER=STEP` kills `lwk` with
/// SIGKILL right after STEP (as a `kill -9` would), and
/// `LWK_PARTITION_TEST_FAIL_AFTER=STEP` makes create fail there, so the
/// tests can check recovery and rollback from every step.
fn checkpoint(step: &str) -> Result<()> {
    if std::env::var("LWK_PARTITION_TEST_CRASH_AFTER").is_ok_and(|s| s == step) {
        let _ = rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
        std::process::abort();
    }
    if std::env::var("LWK_PARTITION_TEST_FAIL_AFTER").is_ok_and(|s| s == step) {
        bail!("failing after step {step} (LWK_PARTITION_TEST_FAIL_AFTER)");
    }
    Ok(())
}

/// The steps of create, in order (names for the test hooks).
pub const STEPS: &[&str] = &["state", "shared-cpusets", "tasks", "cgroup", "irq", "hugepages", "mount", "done"];

fn need_root(what: &str) -> Result<()> {
    if !is_root() {
        bail!("lwk partition {what} needs root (it changes cgroups, IRQ affinity and huge pages): run it with sudo");
    }
    Ok(())
}

fn global_lock() -> Result<PathLock> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(RUN_DIR)
        .with_context(|| format!("cannot create {RUN_DIR}"))?;
    PathLock::acquire(&Path::new(RUN_DIR).join("lock"))
}

/// Removes /run/lwk/partitions, the lock file and /run/lwk when nothing is
/// left in them (the lock is held by the caller).
fn tidy_run_dir(lock: PathLock) {
    if sys::rmdir_if_exists(&partitions_dir()).is_ok() {
        lock.release_and_remove();
        let _ = fs::remove_dir(RUN_DIR);
    }
}

/// The hugetlb pool counter of a page size.
fn pool_counter(page: PageSize) -> PathBuf {
    PathBuf::from(format!("/sys/kernel/mm/hugepages/hugepages-{}kB/nr_hugepages", page.bytes() / 1024))
}

fn read_u64(path: &Path) -> Result<u64> {
    let s = read_trim(path)?;
    s.parse().with_context(|| format!("bad number {s:?} in {}", path.display()))
}

/// Checks a request against the machine and the other partitions. Changes nothing.
fn check(req: &Request, others: &[State], h: &Hierarchy) -> Result<Vec<usize>> {
    validate_name(&req.name)?;
    if state_dir(&req.name).exists() {
        bail!("partition {} already exists", req.name);
    }
    if req.cpus.is_empty() {
        bail!("no CPU given");
    }
    let online = sys::online_cpus()?;
    let root = h.root_cpus()?;
    for &c in &req.cpus {
        if !sys::cpu_exists(c) {
            bail!("CPU {c} does not exist (online CPUs: {})", format_cpu_list(&online));
        }
        if !online.contains(&c) {
            bail!("CPU {c} is offline (online CPUs: {})", format_cpu_list(&online));
        }
        if !root.contains(&c) {
            bail!("CPU {c} is not in the root cpuset ({})", format_cpu_list(&root));
        }
        if let Some(o) = others.iter().find(|o| o.cpus.contains(&c)) {
            bail!("CPU {c} is already in partition {}", o.name);
        }
    }
    let n = req.name.as_str();
    if n.starts_with("cgroup.")
        || n.starts_with("cpuset.")
        || ["tasks", "notify_on_release", "release_agent"].contains(&n)
    {
        bail!("partition name {n} clashes with a cgroup control file: choose another name");
    }
    let cg = h.partition(n);
    if cg.exists() {
        bail!("partition name {} clashes with {}, which exists already", req.name, cg.display());
    }
    let taken: BTreeSet<usize> =
        others.iter().flat_map(|o| o.cpus.iter().copied()).chain(req.cpus.iter().copied()).collect();
    let linux: Vec<usize> = root.iter().copied().filter(|c| !taken.contains(c)).collect();
    if linux.is_empty() {
        bail!(
            "CPUs {} would leave no CPU for Linux: at least one of the online CPUs ({}) must stay outside partitions",
            format_cpu_list(&req.cpus),
            format_cpu_list(&root)
        );
    }
    let available = sys::meminfo("MemAvailable")?;
    let page = req.page;
    let need = req.mem_bytes.div_ceil(page.bytes()) * page.bytes();
    if page.is_huge() && !pool_counter(page).exists() {
        bail!("this kernel has no {} huge pages ({} missing)", page.label(), pool_counter(page).display());
    }
    if need > available {
        bail!(
            "not enough free memory for {} of {} pages: {} MiB available",
            format_size(need),
            page.label(),
            available >> 20
        );
    }
    Ok(linux)
}

/// Creates a partition: all or nothing.
pub fn create(req: &Request) -> Result<Info> {
    need_root("create")?;
    validate_name(&req.name)?;
    let h = Hierarchy::detect()?;
    let lock = global_lock()?;
    let others = all_states()?;
    let linux = match check(req, &others, &h) {
        Ok(l) => l,
        Err(e) => {
            tidy_run_dir(lock);
            return Err(e);
        }
    };
    let dir = state_dir(&req.name);
    fs::DirBuilder::new().recursive(true).mode(0o755).create(partitions_dir())?;
    fs::DirBuilder::new().mode(0o755).create(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let page_size = req.page.bytes();
    let mut st = State {
        name: req.name.clone(),
        cpus: req.cpus.clone(),
        mem_bytes: req.mem_bytes.div_ceil(page_size) * page_size,
        page_size,
        owner_uid: req.owner_uid,
        owner_gid: req.owner_gid,
        created: sys::now_rfc3339(),
        complete: false,
        cgroup_dir: None,
        cgroup_version: h.version,
        exclusive: false,
        // The originals from before the first partition: an existing
        // partition has them; with none, the current values are.
        irq_originals: others.first().map(|o| o.irq_originals.clone()).unwrap_or_else(irq::read_originals),
        v2_enabled_cpuset: others.iter().any(|o| o.v2_enabled_cpuset),
        steps: Vec::new(),
    };
    let result = st.save().and_then(|()| build(&mut st, &h, &others, &linux));
    match result {
        Ok(()) => {
            drop(lock);
            show(&req.name)
        }
        Err(e) => {
            // On success the state goes; if undoing failed, it stays for destroy.
            let undo = teardown(&mut st, false)
                .and_then(|()| fs::remove_dir_all(&dir).with_context(|| format!("cannot remove {}", dir.display())));
            match undo {
                Ok(()) => {
                    tidy_run_dir(lock);
                    Err(e.context(format!("cannot create partition {} (nothing was changed)", req.name)))
                }
                Err(u) => Err(anyhow!(
                    "cannot create partition {}: {e:#}; undoing it failed too: {u:#}; run lwk partition destroy {}",
                    req.name,
                    req.name
                )),
            }
        }
    }
}

fn owned_file(path: &Path, uid: u32, gid: u32) -> Result<()> {
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(sys::o_nofollow())
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    rustix::fs::fchown(&f, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))
        .with_context(|| format!("cannot give {} to uid {uid}", path.display()))?;
    Ok(())
}

fn build(st: &mut State, h: &Hierarchy, others: &[State], linux: &[usize]) -> Result<()> {
    let dir = st.dir();
    let (uid, gid) = (st.owner_uid, st.owner_gid);
    owned_file(&dir.join("log"), uid, gid)?;
    owned_file(&dir.join("run.lock"), uid, gid)?;
    checkpoint("state")?;

    let all: Vec<usize> = others
        .iter()
        .flat_map(|o| o.cpus.iter().copied())
        .chain(st.cpus.iter().copied())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    st.push(Step::SharedCpusets { hierarchy: h.clone() })?;
    if h.setup_shared(&all, linux)? {
        st.v2_enabled_cpuset = true;
        st.save()?;
    }
    checkpoint("shared-cpusets")?;

    if h.version == 1 {
        st.push(Step::MoveTasks { moved: Vec::new(), left_in_root: 0 })?;
        let mut moved = Vec::new();
        let left = h.move_root_tasks(&mut moved);
        *st.last_mut() = Step::MoveTasks { moved, left_in_root: left };
        st.save()?;
    }
    checkpoint("tasks")?;

    let cg = h.partition(&st.name);
    st.cgroup_dir = Some(cg.clone());
    st.push(Step::Cgroup { dir: cg.clone() })?;
    st.exclusive = h.create_partition(&cg, &st.cpus, uid, gid)?;
    st.save()?;
    checkpoint("cgroup")?;

    st.push(Step::Irq { moved: 0, skipped: Vec::new() })?;
    let s = irq::steer(&st.irq_originals, linux);
    *st.last_mut() = Step::Irq { moved: s.moved, skipped: s.skipped.clone() };
    st.save()?;
    checkpoint("irq")?;

    let page = PageSize::from_bytes(st.page_size).expect("page size from a PageSize");
    let pages = st.mem_bytes / st.page_size;
    if page.is_huge() {
        let counter = pool_counter(page);
        let before = read_u64(&counter)?;
        st.push(Step::HugePages { counter: counter.clone(), pages, before, added: None, undo_from: None })?;
        let wrote = write_raw(&counter, &(before + pages).to_string());
        let now = read_u64(&counter)?;
        let added = now.saturating_sub(before);
        if let Step::HugePages { added: a, .. } = st.last_mut() {
            *a = Some(added);
        }
        st.save()?;
        if added < pages {
            let why = wrote.err().map(|e| format!(" ({e})")).unwrap_or_default();
            bail!("only {added} of {pages} {} huge pages could be allocated{why}", page.label());
        }
    }
    checkpoint("hugepages")?;

    let mem = dir.join("mem");
    let (fstype, data) = if page.is_huge() {
        let ps = if page == PageSize::Huge2M { "2M" } else { "1G" };
        ("hugetlbfs", format!("pagesize={ps},size={0},min_size={0},uid={uid},gid={gid},mode=0700", st.mem_bytes))
    } else {
        ("tmpfs", format!("size={},uid={uid},gid={gid},mode=0700", st.mem_bytes))
    };
    st.push(Step::Mount { dir: mem.clone(), fstype: fstype.into(), data: data.clone() })?;
    fs::DirBuilder::new().mode(0o700).create(&mem).with_context(|| format!("cannot create {}", mem.display()))?;
    chown(&mem, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))?;
    let cdata = std::ffi::CString::new(data.clone())?;
    mount(fstype, &mem, fstype, MountFlags::NOSUID | MountFlags::NODEV, cdata.as_c_str())
        .with_context(|| format!("cannot mount {fstype} on {} with {data}", mem.display()))?;
    // The mount's root takes uid, gid and mode from the options; make sure.
    fs::set_permissions(&mem, fs::Permissions::from_mode(0o700))?;
    checkpoint("mount")?;

    let owner = nix::unistd::User::from_uid(uid.into()).ok().flatten().map_or(uid.to_string(), |u| u.name);
    append_log(
        &dir,
        "created",
        &format!(
            "cpus={} mem={} pages={} owner={owner} cgroup={} exclusive={}",
            format_cpu_list(&st.cpus),
            format_size(st.mem_bytes),
            page.label(),
            cg.display(),
            st.exclusive
        ),
    )?;
    append_log(
        &dir,
        "cpus",
        &format!("assigned {}; Linux keeps {}", format_cpu_list(&st.cpus), format_cpu_list(linux)),
    )?;
    for s in &st.steps {
        match s {
            Step::MoveTasks { moved, left_in_root } => append_log(
                &dir,
                "tasks",
                &format!("{} processes moved to the Linux CPUs, {left_in_root} left (kernel threads)", moved.len()),
            )?,
            Step::Irq { moved, skipped } => append_log(
                &dir,
                "irq",
                &format!("{moved} IRQs steered to {}, {} skipped {skipped:?}", format_cpu_list(linux), skipped.len()),
            )?,
            Step::Mount { dir: m, fstype, data } => {
                append_log(&dir, "memory", &format!("{fstype} on {} ({data})", m.display()))?
            }
            _ => {}
        }
    }
    st.complete = true;
    st.save()?;
    checkpoint("done")
}

/// Undoes the recorded steps in reverse, saving after each so that an
/// interrupted destroy resumes where it stopped.
fn teardown(st: &mut State, force: bool) -> Result<()> {
    while let Some(step) = st.steps.last().cloned() {
        undo(st, &step, force)?;
        st.steps.pop();
        st.save()?;
        checkpoint(&format!("undo-{}", step.name()))?;
    }
    Ok(())
}

impl Step {
    /// The step's name: `undo-NAME` is its checkpoint in teardown.
    pub fn name(&self) -> &'static str {
        match self {
            Step::SharedCpusets { .. } => "shared-cpusets",
            Step::MoveTasks { .. } => "tasks",
            Step::Cgroup { .. } => "cgroup",
            Step::Irq { .. } => "irq",
            Step::HugePages { .. } => "hugepages",
            Step::Mount { .. } => "mount",
        }
    }
}

fn others_cpus(name: &str) -> Result<(Vec<State>, Vec<usize>)> {
    let others: Vec<State> = all_states()?.into_iter().filter(|o| o.name != name).collect();
    let cpus = others.iter().flat_map(|o| o.cpus.iter().copied()).collect::<BTreeSet<_>>().into_iter().collect();
    Ok((others, cpus))
}

fn undo(st: &mut State, step: &Step, force: bool) -> Result<()> {
    match step {
        Step::Mount { dir, .. } => {
            if is_mount_point(dir) {
                match unmount(dir, UnmountFlags::empty()) {
                    Ok(()) => {}
                    Err(Errno::BUSY) => {
                        bail!("the memory of partition {} ({}) is still in use by some process", st.name, dir.display())
                    }
                    Err(e) => return Err(e).with_context(|| format!("cannot unmount {}", dir.display())),
                }
            }
            sys::rmdir_if_exists(dir).with_context(|| format!("cannot remove {}", dir.display()))?;
        }
        Step::HugePages { counter, before, added, undo_from, .. } => {
            let cur = read_u64(counter)?;
            let (record, target) = pool_undo(cur, *before, *added, *undo_from);
            if let Some(r) = record {
                if let Some(Step::HugePages { undo_from, .. }) = st.steps.last_mut() {
                    *undo_from = Some(r);
                }
                st.save()?;
            }
            if let Some(t) = target {
                write_raw(counter, &t.to_string())
                    .with_context(|| format!("cannot set {} to {t}", counter.display()))?;
            }
        }
        Step::Irq { .. } => {
            let (others, cpus) = others_cpus(&st.name)?;
            let with_irqs: Vec<&State> =
                others.iter().filter(|o| o.steps.iter().any(|s| matches!(s, Step::Irq { .. }))).collect();
            if with_irqs.is_empty() {
                irq::restore(&st.irq_originals);
            } else {
                let linux: Vec<usize> = sys::online_cpus()?.into_iter().filter(|c| !cpus.contains(c)).collect();
                irq::steer(&st.irq_originals, &linux);
            }
        }
        Step::Cgroup { dir } if !dir.is_dir() => {}
        Step::Cgroup { dir } => {
            let h = Hierarchy { version: st.cgroup_version, root: dir.parent().and_then(Path::parent).unwrap().into() };
            h.remove_partition(dir, force)?;
        }
        Step::MoveTasks { .. } => {}
        Step::SharedCpusets { hierarchy } => {
            let (others, cpus) = others_cpus(&st.name)?;
            let disable = st.v2_enabled_cpuset || others.iter().any(|o| o.v2_enabled_cpuset);
            hierarchy.reconcile_shared(&cpus, disable)?;
        }
    }
    Ok(())
}

/// The undo of a HugePages step, given the pool size `cur` now: what to
/// record as `undo_from` before writing (write-ahead), and what to write.
/// Lowering by exactly what was added keeps pages others added meanwhile.
fn pool_undo(cur: u64, before: u64, added: Option<u64>, undo_from: Option<u64>) -> (Option<u64>, Option<u64>) {
    match (added, undo_from) {
        // The pool moved since the undo recorded it: its write was done.
        (_, Some(u)) if u != cur => (None, None),
        (Some(0), _) => (None, None),
        (Some(k), _) => (Some(cur), Some(cur.saturating_sub(k))),
        // Killed between the write and recording its result: the pool holds
        // `before` plus whatever that write gave (nothing, or some pages).
        (None, _) if cur > before => (None, Some(before)),
        (None, _) => (None, None),
    }
}

/// Destroys a partition. A busy partition (an `lwk run` holds it, or
/// processes are in its cpuset) is refused unless `force`, which kills the
/// holding `lwk run` and every process in the partition's cpuset first.
pub fn destroy(name: &str, force: bool) -> Result<()> {
    need_root("destroy")?;
    validate_name(name)?;
    let lock = global_lock()?;
    let r = destroy_locked(name, force);
    tidy_run_dir(lock);
    r
}

/// Destroys every partition; returns the names destroyed.
pub fn destroy_all(force: bool) -> Result<Vec<String>> {
    need_root("destroy")?;
    let lock = global_lock()?;
    let mut names: Vec<String> = match fs::read_dir(partitions_dir()) {
        Ok(d) => d.flatten().filter_map(|e| e.file_name().to_str().map(String::from)).collect(),
        Err(_) => Vec::new(),
    };
    names.sort();
    let mut done = Vec::new();
    let mut errors = Vec::new();
    for n in names {
        match destroy_locked(&n, force) {
            Ok(()) => done.push(n),
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    tidy_run_dir(lock);
    if !errors.is_empty() {
        bail!("{}", errors.join("; "));
    }
    Ok(done)
}

fn destroy_locked(name: &str, force: bool) -> Result<()> {
    let dir = state_dir(name);
    if !dir.exists() {
        bail!("no partition {name}; see lwk partition list");
    }
    let Some(mut st) = State::load(name)? else {
        // Killed before the first state was written: nothing was done.
        return fs::remove_dir_all(&dir).with_context(|| format!("cannot remove {}", dir.display()));
    };
    // Hold the run lock through the destroy, so no run starts meanwhile.
    let _run = hold_run_lock(&st, force)?;
    if let Some(cg) = &st.cgroup_dir {
        let pids = sys::cgroup_pids(cg);
        if !pids.is_empty() && !force {
            bail!("partition {name} is busy: processes {pids:?} run in it; destroy --force kills them");
        }
        // Before anything is undone: the application's processes hold the
        // memory mount, which is undone before the cpuset.
        if !pids.is_empty() {
            cgroup::kill_until_empty(cg)?;
        }
    }
    let _ = append_log(&dir, "destroyed", if force { "forced" } else { "" });
    teardown(&mut st, force)?;
    let mem = dir.join("mem");
    if is_mount_point(&mem) {
        bail!("{} is still mounted; not removing {}", mem.display(), dir.display());
    }
    fs::remove_dir_all(&dir).with_context(|| format!("cannot remove {}", dir.display()))
}

fn hold_run_lock(st: &State, force: bool) -> Result<Option<File>> {
    let path = st.dir().join("run.lock");
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot open {}", path.display())),
    };
    if flock(&file, FlockOperation::NonBlockingLockExclusive).is_ok() {
        return Ok(Some(file));
    }
    let pid = holder_pid(&path);
    if !force {
        match pid {
            Some(p) => bail!("partition {} is busy: lwk run pid {p}; destroy --force kills it", st.name),
            None => bail!("partition {} is busy; destroy --force kills what runs in it", st.name),
        }
    }
    if pid == Some(std::process::id() as i32) {
        bail!("partition {} is held by this very process; release its RunLock first", st.name);
    }
    if let Some(p) = pid.and_then(rustix::process::Pid::from_raw) {
        // The holding `lwk run` only, not its process group, which may be
        // a script's or a test harness's: its application and proxy die with
        // it, and whatever else runs in the cpuset is killed by the cgroup
        // teardown.
        let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if flock(&file, FlockOperation::NonBlockingLockExclusive).is_ok() {
            return Ok(Some(file));
        }
        if Instant::now() > deadline {
            bail!("partition {} is still held by lwk run pid {pid:?} after SIGKILL", st.name);
        }
        sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::pool_undo;

    #[test]
    fn pool_undo_is_idempotent() {
        // Done: lower by what was added, recording the size first.
        assert_eq!(pool_undo(40, 8, Some(32), None), (Some(40), Some(8)));
        // Killed after recording, before writing: write it now.
        assert_eq!(pool_undo(40, 8, Some(32), Some(40)), (Some(40), Some(8)));
        // Killed after writing: nothing more.
        assert_eq!(pool_undo(8, 8, Some(32), Some(40)), (None, None));
        // Others added pages meanwhile: they stay.
        assert_eq!(pool_undo(50, 8, Some(32), None), (Some(50), Some(18)));
        // The kernel gave fewer than asked: lower by what it gave.
        assert_eq!(pool_undo(20, 8, Some(12), None), (Some(20), Some(8)));
        // Killed between the write and recording its result.
        assert_eq!(pool_undo(40, 8, None, None), (None, Some(8)));
        assert_eq!(pool_undo(8, 8, None, None), (None, None));
        assert_eq!(pool_undo(8, 8, Some(0), None), (None, None));
    }
}
