//! What the partition tests share: the check of what they need, one test at
//! a time, and a snapshot of everything a partition changes, to compare
//! before and after.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::sync::{Mutex, MutexGuard};

static SERIAL: Mutex<()> = Mutex::new(());

/// Partition tests change machine-wide state: one at a time.
/// They also compare machine state before and after, so they wait (a
/// while) for partitions made by something else, e.g. another test suite
/// run by hand at the same time, to go.
pub fn serial() -> MutexGuard<'static, ()> {
    let guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    while std::time::Instant::now() < deadline {
        let others = fs::read_dir("/run/lwk/partitions").map(|d| d.count()).unwrap_or(0);
        if others == 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    guard
}

/// What every partition test needs and cannot install: root, a CPU besides
/// the one Linux keeps, a cpuset cgroup. The tests are `#[ignore]`d for
/// that; run anyway (`--include-ignored`) without them, they fail here,
/// saying what is missing, instead of passing without testing anything.
pub fn require_partitions() {
    let mut missing = Vec::new();
    if !rustix::process::geteuid().is_root() {
        missing.push("root (partitions change machine-wide state: run the tests as root)");
    }
    let online = fs::read_to_string("/sys/devices/system/cpu/online").unwrap_or_default();
    if online.trim() == "0" {
        missing.push("a second online CPU (one always stays with Linux)");
    }
    if !std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
        && !fs::read_to_string("/proc/self/mountinfo").unwrap_or_default().contains("cpuset")
    {
        missing.push("a cpuset cgroup (cgroup v2 at /sys/fs/cgroup, or a v1 cpuset hierarchy)");
    }
    assert!(missing.is_empty(), "this partition test cannot run: it needs {}", missing.join("; "));
}

/// The cpuset hierarchy's root (v2 /sys/fs/cgroup, v1 the cpuset mount).
pub fn cpuset_root() -> String {
    if std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        return "/sys/fs/cgroup".into();
    }
    "/sys/fs/cgroup/cpuset".into()
}

#[derive(Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub hugepages: BTreeMap<String, String>,
    pub cgroup_dirs: Vec<String>,
    pub irq: BTreeMap<String, String>,
    pub default_irq: String,
    pub lwk_mounts: Vec<String>,
    pub partitions: Vec<String>,
    /// What is in /run/lwk (the lock file must not stay behind).
    pub run_dir: Vec<String>,
    pub own_cpuset: String,
}

pub fn snapshot() -> Snapshot {
    let mut hugepages = BTreeMap::new();
    for e in fs::read_dir("/sys/kernel/mm/hugepages").unwrap().flatten() {
        let v = fs::read_to_string(e.path().join("nr_hugepages")).unwrap();
        hugepages.insert(e.file_name().to_string_lossy().into_owned(), v.trim().to_string());
    }
    let mut cgroup_dirs: Vec<String> = fs::read_dir(cpuset_root())
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("lwk"))
        .collect();
    cgroup_dirs.sort();
    let mut irq = BTreeMap::new();
    for e in fs::read_dir("/proc/irq").unwrap().flatten() {
        if let Ok(v) = fs::read_to_string(e.path().join("smp_affinity_list")) {
            irq.insert(e.file_name().to_string_lossy().into_owned(), v.trim().to_string());
        }
    }
    let lwk_mounts = fs::read_to_string("/proc/self/mounts")
        .unwrap()
        .lines()
        .filter(|l| l.contains("/run/lwk"))
        .map(String::from)
        .collect();
    let mut partitions: Vec<String> = fs::read_dir("/run/lwk/partitions")
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    partitions.sort();
    let mut run_dir: Vec<String> = fs::read_dir("/run/lwk")
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    run_dir.sort();
    Snapshot {
        hugepages,
        cgroup_dirs,
        irq,
        default_irq: fs::read_to_string("/proc/irq/default_smp_affinity").unwrap_or_default().trim().into(),
        lwk_mounts,
        partitions,
        run_dir,
        own_cpuset: fs::read_to_string("/proc/self/cpuset").unwrap_or_default().trim().into(),
    }
}

/// The highest online CPU: the one the tests give to a partition.
pub fn last_cpu() -> usize {
    let online = fs::read_to_string("/sys/devices/system/cpu/online").unwrap();
    online.trim().split([',', '-']).filter_map(|x| x.parse().ok()).max().unwrap()
}

pub fn read(path: impl AsRef<std::path::Path>) -> String {
    let p = path.as_ref();
    fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).trim().to_string()
}
