//! The statistics `lwk run --stats` prints: per system call, how often it
//! ran, where (local in the LWK or delegated to the proxy), total and mean
//! time in the LWK's handler, read from the control region after exit.

use std::fmt::Write;
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use lwk_abi::control::{Control, NR_SLOTS};
use lwk_abi::syscalls;
use serde::Serialize;

use crate::run::ExitStatus;

#[derive(Serialize)]
pub struct Row {
    pub nr: usize,
    pub name: &'static str,
    #[serde(rename = "where")]
    pub place: &'static str,
    pub count: u64,
    pub total_ns: u64,
    pub mean_ns: u64,
}

#[derive(Serialize)]
pub struct Report {
    pub program: String,
    pub exit_code: Option<i32>,
    pub exit_signal: Option<i32>,
    pub wall_ns: u64,
    pub syscalls_total: u64,
    pub syscalls_local: u64,
    pub syscalls_delegated: u64,
    pub memory_peak_bytes: u64,
    pub memory_huge_peak_bytes: u64,
    pub huge_pages: &'static str,
    /// Restores of the LWK's state onto itself (`--selftest-restore`).
    pub selftest_restores: u64,
    pub syscalls: Vec<Row>,
}

impl Report {
    pub fn collect(ctl: &Control, tsc_hz: f64, wall: Duration, program: &Path, status: ExitStatus) -> Report {
        let ns = |cycles: u64| (cycles as f64 * 1e9 / tsc_hz) as u64;
        let mut rows = Vec::new();
        for nr in 0..NR_SLOTS {
            for (place, c) in [("local", &ctl.stats.local[nr]), ("delegated", &ctl.stats.delegated[nr])] {
                let count = c.count.load(Relaxed);
                if count > 0 {
                    let total = ns(c.cycles.load(Relaxed));
                    rows.push(Row {
                        nr,
                        name: syscalls::name(nr),
                        place,
                        count,
                        total_ns: total,
                        mean_ns: total / count,
                    });
                }
            }
        }
        rows.sort_by(|a, b| b.total_ns.cmp(&a.total_ns).then(a.nr.cmp(&b.nr)));
        let sum = |p: &str| rows.iter().filter(|r| r.place == p).map(|r| r.count).sum::<u64>();
        let (local, delegated) = (sum("local"), sum("delegated"));
        let (code, signal) = match status {
            ExitStatus::Code(c) => (Some(c), None),
            ExitStatus::Signal(s) => (None, Some(s)),
        };
        let huge_peak = ctl.stats.huge_peak.load(Relaxed);
        Report {
            program: program.display().to_string(),
            exit_code: code,
            exit_signal: signal,
            wall_ns: wall.as_nanos() as u64,
            syscalls_total: local + delegated,
            syscalls_local: local,
            syscalls_delegated: delegated,
            memory_peak_bytes: ctl.stats.mem_peak.load(Relaxed),
            memory_huge_peak_bytes: huge_peak,
            huge_pages: if ctl.header.huge_fallback.load(Relaxed) != 0 {
                "4K (fell back: no free 2 MiB huge pages)"
            } else if huge_peak > 0 {
                "2M"
            } else {
                "4K"
            },
            selftest_restores: ctl.stats.restores.load(Relaxed),
            syscalls: rows,
        }
    }

    pub fn text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "lwk: {} system calls ({} local, {} delegated) in {:.3} s; memory peak {} KiB ({} KiB on 2 MiB pages); pages: {}",
            self.syscalls_total,
            self.syscalls_local,
            self.syscalls_delegated,
            self.wall_ns as f64 / 1e9,
            self.memory_peak_bytes / 1024,
            self.memory_huge_peak_bytes / 1024,
            self.huge_pages
        );
        if self.selftest_restores > 0 {
            let _ = writeln!(s, "lwk: the LWK's state was saved, wiped and restored {} times", self.selftest_restores);
        }
        let _ =
            writeln!(s, "{:<22} {:<10} {:>10} {:>14} {:>10}", "syscall", "where", "count", "total (us)", "mean (us)");
        for r in &self.syscalls {
            let _ = writeln!(
                s,
                "{:<22} {:<10} {:>10} {:>14.1} {:>10.2}",
                r.name,
                r.place,
                r.count,
                r.total_ns as f64 / 1e3,
                r.mean_ns as f64 / 1e3
            );
        }
        s
    }

    pub fn json(&self) -> serde_json::Result<String> {
        serde_json::to_string_pretty(self)
    }
}
