//! `lwk noise` end to end: the built binary, a short run, its table, its
//! files, and its errors.

use std::os::unix::process::CommandExt;
use std::process::{Command, Output};

fn lwk() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lwk"))
}

fn run(args: &[&str]) -> Output {
    lwk().arg("noise").args(args).output().expect("lwk runs")
}

fn allowed_online_cpus() -> Vec<usize> {
    let online = std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap();
    let mask = rustix::thread::sched_getaffinity(None).unwrap();
    lwk_cpus(&online).into_iter().filter(|&c| mask.is_set(c)).collect()
}

/// The kernel's CPU list notation; parsed here independently of lwk-noise.
fn lwk_cpus(list: &str) -> Vec<usize> {
    let mut cpus = Vec::new();
    for item in list.trim().split(',') {
        match item.split_once('-') {
            Some((a, b)) => cpus.extend(a.parse::<usize>().unwrap()..=b.parse().unwrap()),
            None => cpus.push(item.parse().unwrap()),
        }
    }
    cpus
}

/// The table's rows: cpu, samples, min, median, p99, max, noise %.
fn rows(stdout: &str) -> Vec<(usize, usize, [f64; 5])> {
    let mut lines = stdout.lines();
    assert!(lines.next().unwrap().starts_with("FWQ: quantum"), "{stdout}");
    assert!(lines.next().unwrap().trim_start().starts_with("cpu"), "{stdout}");
    lines
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(f.len(), 7, "{l}");
            let n = |i: usize| f[i].parse::<f64>().unwrap_or_else(|e| panic!("{l}: {e}"));
            (f[0].parse().unwrap(), f[1].parse().unwrap(), [n(2), n(3), n(4), n(5), n(6)])
        })
        .collect()
}

#[test]
fn short_run_prints_one_consistent_row_per_cpu_and_writes_its_files() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("noise.json");
    let svg = dir.path().join("noise.svg");
    let out = run(&[
        "--samples",
        "200",
        "--quantum-us",
        "20",
        "--json",
        json.to_str().unwrap(),
        "--svg",
        svg.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let rows = rows(&stdout);
    let cpus = allowed_online_cpus();
    assert_eq!(rows.iter().map(|r| r.0).collect::<Vec<_>>(), cpus, "{stdout}");
    for (_, samples, [min, median, p99, max, noise]) in &rows {
        assert_eq!(*samples, 200);
        assert!(*min > 0.0 && min <= median && median <= p99 && p99 <= max, "{stdout}");
        assert!((0.0..100.0).contains(noise), "{stdout}");
    }
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(report["cpus"].as_array().unwrap().len(), cpus.len());
    assert_eq!(report["cpus"][0]["durations_us"].as_array().unwrap().len(), 200);
    assert!(std::fs::read_to_string(&svg).unwrap().starts_with("<svg"));
}

#[test]
fn one_cpu_chosen_gives_one_row() {
    let cpu = *allowed_online_cpus().last().unwrap();
    let out = run(&["--cpus", &cpu.to_string(), "--samples", "50", "--quantum-us", "20"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let rows = rows(&stdout);
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].0, rows[0].1), (cpu, 50));
}

fn fails_with(args: &[&str], expected: &str) {
    let out = run(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded");
    assert!(stderr.contains(expected), "{args:?}: {stderr}");
    assert!(out.stdout.is_empty(), "{args:?} printed {}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn bad_input_is_named() {
    fails_with(&["--samples", "0"], "--samples must be at least 1");
    fails_with(&["--quantum-us", "0"], "--quantum-us must be between 1 and");
    fails_with(&["--cpus", "3-1"], "goes backwards");
    fails_with(&["--cpus", "0,x"], "is not a CPU number");
    fails_with(&["--cpus", ""], "bad CPU list \"\": it is empty");
    let online = std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap();
    let beyond = lwk_cpus(&online).last().unwrap() + 1;
    fails_with(&["--cpus", &beyond.to_string(), "--samples", "10"], &format!("CPU {beyond} is not online"));
}

#[test]
#[ignore = "needs two CPUs this process may run on"]
fn a_cpu_outside_the_affinity_mask_is_named() {
    let cpus = allowed_online_cpus();
    assert!(cpus.len() >= 2, "this test needs two CPUs this process may run on, it has {cpus:?}");
    let (first, other) = (cpus[0], cpus[1]);
    let mut cmd = lwk();
    cmd.args(["noise", "--samples", "10", "--cpus", &other.to_string()]);
    let mut mask = rustix::thread::CpuSet::new();
    mask.set(first);
    // SAFETY: between fork and exec the child only makes one system call,
    // sched_setaffinity, on a mask built before the fork.
    unsafe {
        cmd.pre_exec(move || rustix::thread::sched_setaffinity(None, &mask).map_err(Into::into));
    }
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains(&format!("CPU {other} is not in this process's CPU affinity mask")), "{stderr}");
}
