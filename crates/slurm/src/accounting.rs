//! Per-job accounting: each step's tasks' LWK statistics (from `lwk run
//! --stats-json`) and exit statuses, with totals over the job, in one JSON
//! file per job (`<accounting_dir>/<JOBID>.json`).

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::Error;

/// The part of `lwk run --stats-json` that is accounted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LwkStats {
    #[serde(default)]
    pub exit_code: Option<i32>,
    #[serde(default)]
    pub exit_signal: Option<i32>,
    #[serde(default)]
    pub wall_ns: u64,
    #[serde(default)]
    pub syscalls_total: u64,
    pub syscalls_local: u64,
    pub syscalls_delegated: u64,
    pub memory_peak_bytes: u64,
    #[serde(default)]
    pub memory_huge_peak_bytes: u64,
}

/// One task of a step on one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRecord {
    pub task: u32,
    /// Exit code, when the task exited.
    pub exit_code: Option<i32>,
    /// Signal that ended the task, when one did.
    pub signal: Option<i32>,
    /// None when `lwk run` wrote no statistics (it was killed, or never started).
    pub stats: Option<LwkStats>,
}

impl TaskRecord {
    /// From the wait status slurmstepd saw (S_TASK_EXIT_STATUS) or, without
    /// one, from what lwk reported.
    pub fn new(task: u32, wait_status: Option<i32>, stats: Option<LwkStats>) -> Self {
        let (exit_code, signal) = match wait_status {
            Some(st) if libc::WIFEXITED(st) => (Some(libc::WEXITSTATUS(st)), None),
            Some(st) if libc::WIFSIGNALED(st) => (None, Some(libc::WTERMSIG(st))),
            _ => match &stats {
                Some(s) => (s.exit_code, s.exit_signal),
                None => (None, None),
            },
        };
        TaskRecord { task, exit_code, signal, stats }
    }

    fn status_word(&self) -> String {
        match (self.exit_code, self.signal) {
            (Some(c), _) => c.to_string(),
            (None, Some(s)) => format!("sig{s}"),
            (None, None) => "unknown".into(),
        }
    }
}

/// Sums over tasks.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub tasks: u64,
    /// Tasks for which lwk wrote statistics.
    pub tasks_with_stats: u64,
    pub syscalls_total: u64,
    pub syscalls_local: u64,
    pub syscalls_delegated: u64,
    /// Largest memory high-water mark of one task.
    pub memory_peak_bytes_max: u64,
    /// Sum of the tasks' memory high-water marks.
    pub memory_peak_bytes_sum: u64,
    /// How many tasks ended how: "0", "1", "sig11", "unknown".
    pub exit_statuses: BTreeMap<String, u64>,
}

impl Totals {
    fn add_task(&mut self, t: &TaskRecord) {
        self.tasks += 1;
        if let Some(s) = &t.stats {
            self.tasks_with_stats += 1;
            self.syscalls_total += s.syscalls_total;
            self.syscalls_local += s.syscalls_local;
            self.syscalls_delegated += s.syscalls_delegated;
            self.memory_peak_bytes_max = self.memory_peak_bytes_max.max(s.memory_peak_bytes);
            self.memory_peak_bytes_sum += s.memory_peak_bytes;
        }
        *self.exit_statuses.entry(t.status_word()).or_default() += 1;
    }

    fn add(&mut self, o: &Totals) {
        self.tasks += o.tasks;
        self.tasks_with_stats += o.tasks_with_stats;
        self.syscalls_total += o.syscalls_total;
        self.syscalls_local += o.syscalls_local;
        self.syscalls_delegated += o.syscalls_delegated;
        self.memory_peak_bytes_max = self.memory_peak_bytes_max.max(o.memory_peak_bytes_max);
        self.memory_peak_bytes_sum += o.memory_peak_bytes_sum;
        for (k, v) in &o.exit_statuses {
            *self.exit_statuses.entry(k.clone()).or_default() += v;
        }
    }
}

/// One step on one node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub step: String,
    pub node: String,
    pub partition: String,
    pub cpus: String,
    pub mem_bytes: u64,
    pub tasks: Vec<TaskRecord>,
    pub totals: Totals,
    /// Set when the record was made by the job epilog from what a step that
    /// did not finish normally (slurmstepd killed) left behind.
    #[serde(default)]
    pub recovered_by_epilog: bool,
}

impl StepRecord {
    pub fn new(
        step: &str,
        node: &str,
        partition: &str,
        cpus: &str,
        mem_bytes: u64,
        mut tasks: Vec<TaskRecord>,
    ) -> Self {
        tasks.sort_by_key(|t| t.task);
        let mut totals = Totals::default();
        tasks.iter().for_each(|t| totals.add_task(t));
        StepRecord {
            step: step.into(),
            node: node.into(),
            partition: partition.into(),
            cpus: cpus.into(),
            mem_bytes,
            tasks,
            totals,
            recovered_by_epilog: false,
        }
    }
}

/// The per-job file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobAccounting {
    pub job_id: u32,
    pub uid: u32,
    /// Keyed "STEP@NODE".
    pub steps: BTreeMap<String, StepRecord>,
    pub totals: Totals,
}

impl JobAccounting {
    pub fn new(job_id: u32, uid: u32) -> Self {
        JobAccounting { job_id, uid, steps: BTreeMap::new(), totals: Totals::default() }
    }

    pub fn add_step(&mut self, step: StepRecord) {
        self.steps.insert(format!("{}@{}", step.step, step.node), step);
        let mut totals = Totals::default();
        self.steps.values().for_each(|s| totals.add(&s.totals));
        self.totals = totals;
    }

    /// One line for the job's Comment.
    pub fn comment(&self) -> String {
        let t = &self.totals;
        let exits: Vec<String> = t.exit_statuses.iter().map(|(k, v)| format!("{k}x{v}")).collect();
        format!(
            "lwk: tasks={} syscalls_local={} syscalls_delegated={} mem_peak_max={}K exit={}",
            t.tasks,
            t.syscalls_local,
            t.syscalls_delegated,
            t.memory_peak_bytes_max / 1024,
            exits.join(",")
        )
    }
}

/// Reads one task's statistics file; None when it is missing or unreadable
/// (the task's lwk never finished writing it).
pub fn read_stats(path: &Path) -> Option<LwkStats> {
    let text = fs::read(path).ok()?;
    serde_json::from_slice(&text).ok()
}

/// Adds `step` to `<dir>/<job>.json` under an exclusive lock (steps of one
/// job end concurrently), creating the directory (root-only, 0755) and file
/// (0644) as needed. Returns the updated job record.
pub fn record_step(dir: &Path, job_id: u32, uid: u32, step: StepRecord) -> Result<JobAccounting, Error> {
    let io = |what: &str, p: &Path, e: std::io::Error| Error::Io(format!("{what} {}: {e}", p.display()));
    fs::create_dir_all(dir).map_err(|e| io("creating", dir, e))?;
    let lock_path = dir.join(format!("{job_id}.lock"));
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| io("opening", &lock_path, e))?;
    // SAFETY: flock on a descriptor we own; released when `lock` is dropped.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(io("locking", &lock_path, std::io::Error::last_os_error()));
    }
    let path = dir.join(format!("{job_id}.json"));
    let mut job = match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|_| JobAccounting::new(job_id, uid)),
        Err(_) => JobAccounting::new(job_id, uid),
    };
    job.add_step(step);
    let tmp = dir.join(format!(".{job_id}.json.tmp"));
    let write = || -> std::io::Result<()> {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(serde_json::to_string_pretty(&job).map_err(std::io::Error::other)?.as_bytes())?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        fs::rename(&tmp, &path)
    };
    let result = write().map_err(|e| io("writing", &path, e));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    drop(lock);
    let _ = fs::remove_file(&lock_path);
    result.map(|_| job)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(local: u64, delegated: u64, peak: u64) -> LwkStats {
        LwkStats {
            exit_code: Some(0),
            syscalls_local: local,
            syscalls_delegated: delegated,
            syscalls_total: local + delegated,
            memory_peak_bytes: peak,
            ..Default::default()
        }
    }

    #[test]
    fn wait_status_decodes() {
        let t = TaskRecord::new(0, Some(3 << 8), None);
        assert_eq!((t.exit_code, t.signal), (Some(3), None));
        let t = TaskRecord::new(0, Some(11), None);
        assert_eq!((t.exit_code, t.signal), (None, Some(11)));
        let s = LwkStats { exit_code: None, exit_signal: Some(9), ..stats(1, 1, 1) };
        let t = TaskRecord::new(0, None, Some(s));
        assert_eq!((t.exit_code, t.signal), (None, Some(9)));
    }

    #[test]
    fn totals_over_tasks_and_steps() {
        let a = StepRecord::new(
            "0",
            "n1",
            "slurm-7.0",
            "1",
            1 << 20,
            vec![
                TaskRecord::new(1, Some(0), Some(stats(10, 5, 100))),
                TaskRecord::new(0, Some(11), Some(stats(1, 2, 300))),
                TaskRecord::new(2, Some(9), None),
            ],
        );
        assert_eq!(a.tasks[0].task, 0);
        assert_eq!(a.totals.tasks, 3);
        assert_eq!(a.totals.tasks_with_stats, 2);
        assert_eq!(a.totals.syscalls_local, 11);
        assert_eq!(a.totals.syscalls_delegated, 7);
        assert_eq!(a.totals.syscalls_total, 18);
        assert_eq!(a.totals.memory_peak_bytes_max, 300);
        assert_eq!(a.totals.memory_peak_bytes_sum, 400);
        assert_eq!(a.totals.exit_statuses.get("sig11"), Some(&1));
        let b = StepRecord::new(
            "1",
            "n1",
            "slurm-7.1",
            "1",
            1 << 20,
            vec![TaskRecord::new(0, Some(0), Some(stats(4, 4, 50)))],
        );
        let mut job = JobAccounting::new(7, 1000);
        job.add_step(a.clone());
        job.add_step(b);
        job.add_step(a); // the same step again replaces, does not double
        assert_eq!(job.totals.tasks, 4);
        assert_eq!(job.totals.syscalls_local, 15);
        assert_eq!(job.totals.exit_statuses.get("0"), Some(&2));
        let c = job.comment();
        assert!(c.starts_with("lwk: tasks=4 syscalls_local=15 syscalls_delegated=11"), "{c}");
    }

    #[test]
    fn record_step_merges_into_the_job_file() {
        let dir = std::env::temp_dir().join(format!("lwk-slurm-acct-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let s0 = StepRecord::new("0", "n1", "p", "1", 1, vec![TaskRecord::new(0, Some(0), Some(stats(3, 2, 9)))]);
        let s1 = StepRecord::new("1", "n1", "p", "1", 1, vec![TaskRecord::new(0, Some(256), Some(stats(1, 1, 9)))]);
        record_step(&dir, 42, 0, s0).unwrap();
        let job = record_step(&dir, 42, 0, s1).unwrap();
        let back: JobAccounting = serde_json::from_slice(&fs::read(dir.join("42.json")).unwrap()).unwrap();
        assert_eq!(back, job);
        assert_eq!(back.totals.syscalls_local, 4);
        assert_eq!(back.totals.exit_statuses.get("1"), Some(&1));
        assert!(!dir.join("42.lock").exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn reads_real_lwk_stats_shape() {
        let json = r#"{"program":"/bin/true","exit_code":0,"exit_signal":null,"wall_ns":2937781,
            "syscalls_total":29,"syscalls_local":19,"syscalls_delegated":10,"memory_peak_bytes":8511488,
            "memory_huge_peak_bytes":0,"huge_pages":"4K","syscalls":[]}"#;
        let s: LwkStats = serde_json::from_str(json).unwrap();
        assert_eq!((s.syscalls_local, s.syscalls_delegated, s.memory_peak_bytes), (19, 10, 8511488));
    }
}
