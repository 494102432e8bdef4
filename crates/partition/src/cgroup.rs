//! The cpuset cgroups of partitions, cgroup v1 or v2 (detected at run time).
//!
//! Layout, under the cpuset hierarchy's root R:
//! * `R/lwk`: parent of every partition, holding the union of their CPUs
//!   (v1: `cpu_exclusive`; v2: `cpuset.cpus.partition=root`);
//! * `R/lwk/NAME`: one partition, its CPUs, exclusive where the kernel allows;
//! * v1 only, `R/lwk.linux`: the remaining CPUs. Every movable task of the
//!   root cpuset is moved there so that nothing else runs on partition CPUs;
//!   when the last partition goes they are moved back and it is removed. On v2
//!   no such move is needed: a partition root takes its CPUs away from the
//!   rest of the system by itself.

use std::fs;
use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rustix::fs::{chown, Gid, Uid};
use rustix::io::Errno;
use serde::{Deserialize, Serialize};

use crate::spec::{format_cpu_list, parse_kernel_list};
use crate::sys::{cgroup_pids, is_kernel_thread, read_trim, rmdir_if_exists, write_raw, write_value};

pub const PARENT: &str = "lwk";
pub const LINUX: &str = "lwk.linux";

/// Which cpuset hierarchy, and where.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hierarchy {
    pub version: u8,
    pub root: PathBuf,
}

impl Hierarchy {
    /// Finds the cpuset hierarchy: cgroup v2 when /sys/fs/cgroup is a cgroup2
    /// mount with the cpuset controller, else a cgroup v1 cpuset mount.
    pub fn detect() -> Result<Hierarchy> {
        let v2 = Path::new("/sys/fs/cgroup");
        if let Ok(ctl) = fs::read_to_string(v2.join("cgroup.controllers")) {
            if !ctl.split_whitespace().any(|c| c == "cpuset") {
                bail!("cgroup v2 at /sys/fs/cgroup has no cpuset controller (cgroup.controllers: {})", ctl.trim());
            }
            return Ok(Hierarchy { version: 2, root: v2.to_path_buf() });
        }
        let info = fs::read_to_string("/proc/self/mountinfo").context("cannot read /proc/self/mountinfo")?;
        for line in info.lines() {
            // ... mount-point ... - fstype source super-options
            let Some((pre, post)) = line.split_once(" - ") else { continue };
            let mut post = post.split(' ');
            let (fstype, _src, opts) = (post.next(), post.next(), post.next().unwrap_or(""));
            if fstype == Some("cgroup") && opts.split(',').any(|o| o == "cpuset") {
                if let Some(mp) = pre.split(' ').nth(4) {
                    return Ok(Hierarchy { version: 1, root: PathBuf::from(mp) });
                }
            }
        }
        bail!("no cpuset cgroup: /sys/fs/cgroup is not cgroup v2 with cpuset, and no cgroup v1 cpuset is mounted")
    }

    pub fn parent(&self) -> PathBuf {
        self.root.join(PARENT)
    }
    pub fn linux(&self) -> PathBuf {
        self.root.join(LINUX)
    }
    pub fn partition(&self, name: &str) -> PathBuf {
        self.parent().join(name)
    }

    fn cpus_file(&self) -> &'static str {
        if self.version == 1 {
            "cpuset.cpus"
        } else {
            "cpuset.cpus.effective"
        }
    }

    /// The CPUs of the root cpuset: all that partitions and Linux share.
    pub fn root_cpus(&self) -> Result<Vec<usize>> {
        parse_kernel_list(&read_trim(self.root.join(self.cpus_file()))?)
    }

    /// v1 needs cpuset.mems set before a task can join a cpuset.
    fn init_dir(&self, dir: &Path) -> Result<()> {
        match fs::create_dir(dir) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                return Err(e).with_context(|| format!("cannot create the cgroup {}", dir.display()))
            }
            _ => {}
        }
        if self.version == 1 {
            let mems = read_trim(self.root.join("cpuset.mems"))?;
            write_value(dir.join("cpuset.mems"), &mems)?;
        }
        Ok(())
    }

    /// Makes `R/lwk` hold `all` (every partition's CPUs, this new one
    /// included) and, on v1, `R/lwk.linux` hold `linux`. Linux's side shrinks
    /// first so the exclusive `lwk` never overlaps it. Returns whether cpuset
    /// had to be enabled in the v2 root's subtree_control.
    pub fn setup_shared(&self, all: &[usize], linux: &[usize]) -> Result<bool> {
        let mut enabled = false;
        if self.version == 1 {
            self.init_dir(&self.linux())?;
            write_value(self.linux().join("cpuset.cpus"), &format_cpu_list(linux))?;
            self.init_dir(&self.parent())?;
            write_value(self.parent().join("cpuset.cpus"), &format_cpu_list(all))?;
            // Exclusive where the kernel allows: it refuses when a cpuset
            // outside ours (e.g. a container's) overlaps; then we go on.
            let _ = write_raw(self.parent().join("cpuset.cpu_exclusive"), "1");
        } else {
            let sub = read_trim(self.root.join("cgroup.subtree_control"))?;
            if !sub.split_whitespace().any(|c| c == "cpuset") {
                write_value(self.root.join("cgroup.subtree_control"), "+cpuset")?;
                enabled = true;
            }
            self.init_dir(&self.parent())?;
            write_value(self.parent().join("cpuset.cpus"), &format_cpu_list(all))?;
            let _ = write_raw(self.parent().join("cpuset.cpus.partition"), "root");
            write_value(self.parent().join("cgroup.subtree_control"), "+cpuset")?;
        }
        Ok(enabled)
    }

    /// v1: moves every movable process of the root cpuset into lwk.linux.
    /// Kernel threads are left where they are (the per-CPU ones cannot move,
    /// and moving the others is not ours to decide); so is a process the
    /// kernel refuses to move. Processes in other cpusets are not touched.
    /// Returns the number of processes left in the root.
    pub fn move_root_tasks(&self, moved: &mut Vec<i32>) -> usize {
        if self.version != 1 {
            return 0;
        }
        let mut skipped = std::collections::BTreeSet::new();
        let target = self.linux().join("cgroup.procs");
        // Processes may fork while we move: go round until a round finds
        // nothing new to move.
        for _ in 0..20 {
            let mut progress = false;
            for pid in cgroup_pids(&self.root) {
                if skipped.contains(&pid) {
                    continue;
                }
                if is_kernel_thread(pid) {
                    skipped.insert(pid);
                    continue;
                }
                match write_raw(&target, &pid.to_string()) {
                    Ok(()) => {
                        moved.push(pid);
                        progress = true;
                    }
                    Err(e) if e.raw_os_error() == Some(Errno::SRCH.raw_os_error()) => {}
                    Err(_) => {
                        skipped.insert(pid);
                    }
                }
            }
            if !progress {
                break;
            }
        }
        skipped.len()
    }

    /// Creates the partition's own cpuset and lets the owner add tasks to it.
    /// Returns whether it is exclusive.
    pub fn create_partition(&self, dir: &Path, cpus: &[usize], uid: u32, gid: u32) -> Result<bool> {
        // Not init_dir: this one must be new (a name must not land on a control file).
        fs::create_dir(dir).with_context(|| format!("cannot create the cgroup {}", dir.display()))?;
        self.init_dir(dir)?;
        write_value(dir.join("cpuset.cpus"), &format_cpu_list(cpus))?;
        let exclusive = if self.version == 1 {
            write_raw(dir.join("cpuset.cpu_exclusive"), "1").is_ok()
        } else {
            let _ = write_raw(dir.join("cpuset.cpus.partition"), "root");
            let got = read_trim(dir.join("cpuset.cpus.partition")).unwrap_or_default();
            if got == "root" {
                true
            } else {
                let _ = write_raw(dir.join("cpuset.cpus.partition"), "member");
                false
            }
        };
        let files: &[&str] =
            if self.version == 1 { &["tasks", "cgroup.procs"] } else { &["cgroup.procs", "cgroup.threads"] };
        for f in files {
            let p = dir.join(f);
            chown(&p, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))
                .with_context(|| format!("cannot give {} to uid {uid}", p.display()))?;
        }
        Ok(exclusive)
    }

    /// Removes a partition's cpuset. With processes in it: an error naming
    /// them, or with `force` SIGKILL for each and a wait for them to go.
    pub fn remove_partition(&self, dir: &Path, force: bool) -> Result<()> {
        if !dir.exists() {
            return Ok(());
        }
        let pids = cgroup_pids(dir);
        if !pids.is_empty() {
            if !force {
                bail!("processes {pids:?} still run in {}; destroy --force kills them", dir.display());
            }
            kill_until_empty(dir)?;
        }
        rmdir_retry(dir)
    }

    /// Makes the shared cpusets fit the partitions that remain (the union of
    /// their CPUs is `remaining`); with none left, moves every task back to
    /// the root cpuset and removes lwk.linux and lwk. Idempotent.
    pub fn reconcile_shared(&self, remaining: &[usize], disable_subtree: bool) -> Result<()> {
        let (parent, linux) = (self.parent(), self.linux());
        if remaining.is_empty() {
            if self.version == 1 && linux.exists() {
                move_all(&linux, &self.root);
                rmdir_retry(&linux)?;
            }
            rmdir_retry(&parent)?;
            if self.version == 2 && disable_subtree {
                // Fails if someone else started to use cpuset meanwhile: then it stays.
                let _ = write_raw(self.root.join("cgroup.subtree_control"), "-cpuset");
            }
            return Ok(());
        }
        if parent.exists() {
            write_value(parent.join("cpuset.cpus"), &format_cpu_list(remaining))?;
        }
        if self.version == 1 && linux.exists() {
            let root = self.root_cpus()?;
            let rest: Vec<usize> = root.into_iter().filter(|c| !remaining.contains(c)).collect();
            write_value(linux.join("cpuset.cpus"), &format_cpu_list(&rest))?;
        }
        Ok(())
    }
}

/// Moves every process of cgroup `from` to `to`, going round while
/// processes fork (bounded).
fn move_all(from: &Path, to: &Path) {
    let target = to.join("cgroup.procs");
    for round in 0..100 {
        let pids = cgroup_pids(from);
        if pids.is_empty() {
            return;
        }
        if round > 0 {
            sleep(Duration::from_millis(10));
        }
        for pid in pids {
            let _ = write_raw(&target, &pid.to_string());
        }
    }
}

pub(crate) fn kill_until_empty(dir: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pids = cgroup_pids(dir);
        if pids.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("processes {pids:?} in {} did not die after SIGKILL", dir.display());
        }
        for pid in pids {
            if let Some(p) = rustix::process::Pid::from_raw(pid) {
                let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
            }
        }
        sleep(Duration::from_millis(20));
    }
}

/// rmdir of a cgroup, tolerating "already gone" and waiting a little while
/// the kernel still counts tasks that just left or died (EBUSY).
fn rmdir_retry(dir: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match rmdir_if_exists(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(Errno::BUSY.raw_os_error()) && Instant::now() < deadline => {
                sleep(Duration::from_millis(20))
            }
            Err(e) => return Err(e).with_context(|| format!("cannot remove the cgroup {}", dir.display())),
        }
    }
}
