//! `lwk partition` end to end, as root: what a partition changes on the
//! machine, and that every way out (destroy, a failed create, a create killed
//! with SIGKILL at any step) puts all of it back.

#[path = "../../partition/tests/common/mod.rs"]
mod common;

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{cpuset_root, last_cpu, read, require_partitions, serial, snapshot};

const LWK: &str = env!("CARGO_BIN_EXE_lwk");
/// Every step of create, in order (as lwk_partition::STEPS).
const STEPS: &[&str] = &["state", "shared-cpusets", "tasks", "cgroup", "irq", "hugepages", "mount", "done"];

fn lwk(args: &[&str]) -> Output {
    Command::new(LWK).args(args).output().unwrap()
}

fn lwk_env(args: &[&str], key: &str, val: &str) -> Output {
    Command::new(LWK).args(args).env(key, val).output().unwrap()
}

fn ok(o: &Output) -> String {
    assert!(o.status.success(), "lwk failed: {}\n{}", o.status, String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn fails(o: &Output, want: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(125), "expected failure with {want:?}; stderr: {err}");
    assert!(err.contains(want), "expected {want:?} in: {err}");
}

/// Destroys the partition when the test ends, even by a panic.
struct Cleanup(&'static str);
impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = Command::new(LWK).args(["partition", "destroy", "--force", self.0]).output();
    }
}

#[test]
#[ignore = "needs root, a second CPU and a cpuset cgroup"]
fn create_show_list_destroy_round_trip() {
    require_partitions();
    let _s = serial();
    let before = snapshot();
    let cpu = last_cpu().to_string();
    let _c = Cleanup("t-round");
    let out = ok(&lwk(&["partition", "create", "t-round", "--cpus", &cpu, "--mem", "16M", "--owner", "nobody"]));
    assert!(out.contains("partition t-round created"), "{out}");

    // The cpusets.
    let root = cpuset_root();
    let cg = format!("{root}/lwk/t-round");
    let v1 = !root.ends_with("/cgroup");
    if v1 {
        assert_eq!(read(format!("{cg}/cpuset.cpus")), cpu);
        assert_eq!(read(format!("{cg}/cpuset.cpu_exclusive")), "1");
        let linux = read(format!("{root}/lwk.linux/cpuset.cpus"));
        assert!(!linux.is_empty() && !linux.contains(&cpu), "lwk.linux has {linux}");
        if before.own_cpuset == "/" {
            assert_eq!(snapshot().own_cpuset, "/lwk.linux", "this test's process was not moved off the partition");
        }
    } else {
        assert_eq!(read(format!("{cg}/cpuset.cpus.effective")), cpu);
    }
    let procs = std::fs::metadata(format!("{cg}/cgroup.procs")).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&procs), 65534, "cgroup.procs is not the owner's");

    // IRQs: off the partition CPU, except those the kernel would not move.
    let info: serde_json::Value = serde_json::from_str(&ok(&lwk(&["partition", "show", "t-round", "--json"]))).unwrap();
    let skipped: Vec<String> =
        info["irqs_skipped"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap().to_string()).collect();
    for (irq, aff) in &snapshot().irq {
        if !skipped.contains(irq) {
            assert!(!aff.split(',').any(|p| p == cpu || p.ends_with(&format!("-{cpu}"))), "IRQ {irq} on {aff}");
        }
    }
    assert_eq!(info["cpus"], cpu);
    assert_eq!(info["mem_bytes"], 16 << 20);
    assert_eq!(info["page_size"], 2 << 20);
    assert_eq!(info["owner"], "nobody");
    assert_eq!(info["complete"], true);
    assert_eq!(info["hugepages_added"], 8);

    // Memory: 8 more huge pages, reserved by the mount.
    let pages: u64 = before.hugepages["hugepages-2048kB"].parse().unwrap();
    assert_eq!(snapshot().hugepages["hugepages-2048kB"], (pages + 8).to_string());
    let mounts = snapshot().lwk_mounts;
    assert!(
        mounts.iter().any(|m| m.starts_with("hugetlbfs /run/lwk/partitions/t-round/mem ") && m.contains("uid=65534")),
        "{mounts:?}"
    );

    let list = ok(&lwk(&["partition", "list"]));
    assert!(list.lines().any(|l| l.starts_with("t-round ") && l.contains("16MiB") && l.contains("nobody")), "{list}");
    let show = ok(&lwk(&["partition", "show", "t-round"]));
    assert!(show.contains("idle"), "{show}");
    let log = ok(&lwk(&["partition", "log", "t-round"]));
    assert!(log.lines().next().unwrap().contains(" created cpus="), "{log}");

    let out = ok(&lwk(&["partition", "destroy", "t-round"]));
    assert!(out.contains("destroyed"));
    assert_eq!(snapshot(), before);
    fails(&lwk(&["partition", "show", "t-round"]), "no partition t-round; see lwk partition list");
}

#[test]
#[ignore = "needs root, a second CPU and a cpuset cgroup"]
fn tmpfs_memory_without_huge_pages() {
    require_partitions();
    let _s = serial();
    let before = snapshot();
    let _c = Cleanup("t-tmpfs");
    ok(&lwk(&[
        "partition",
        "create",
        "t-tmpfs",
        "--cpus",
        &last_cpu().to_string(),
        "--mem",
        "8M",
        "--hugepages",
        "none",
    ]));
    let mounts = snapshot().lwk_mounts;
    assert!(mounts.iter().any(|m| m.starts_with("tmpfs /run/lwk/partitions/t-tmpfs/mem ") && m.contains("size=8192k")));
    assert_eq!(snapshot().hugepages, before.hugepages);
    // The limit holds: a 9 MiB file does not fit in 8 MiB.
    let big = Command::new("dd")
        .args(["if=/dev/zero", "of=/run/lwk/partitions/t-tmpfs/mem/f", "bs=1M", "count=9"])
        .output()
        .unwrap();
    assert!(!big.status.success(), "9 MiB fitted in an 8 MiB partition");
    ok(&lwk(&["partition", "destroy", "t-tmpfs"]));
    assert_eq!(snapshot(), before);
}

#[test]
#[ignore = "needs root, a second CPU and a cpuset cgroup"]
fn bad_requests_change_nothing() {
    require_partitions();
    let _s = serial();
    let before = snapshot();
    let cpu = last_cpu().to_string();
    let all = format!("0-{cpu}");
    let cases: &[(&[&str], &str)] = &[
        (&["t-bad", "--cpus", &all, "--mem", "8M"], "would leave no CPU for Linux"),
        (&["t-bad", "--cpus", "4000", "--mem", "8M"], "CPU 4000 does not exist"),
        (&["t-bad", "--cpus", "1-", "--mem", "8M"], "bad CPU list"),
        (&["t/bad", "--cpus", &cpu, "--mem", "8M"], "bad partition name"),
        (&["cgroup.procs", "--cpus", &cpu, "--mem", "8M"], "clashes with"),
        (&["t-bad", "--cpus", &cpu, "--mem", "0"], "bad memory size"),
        (&["t-bad", "--cpus", &cpu, "--mem", "8Q"], "bad memory size"),
        (&["t-bad", "--cpus", &cpu, "--mem", "1000T"], "not enough free memory"),
        (&["t-bad", "--cpus", &cpu, "--mem", "1000T", "--hugepages", "none"], "not enough free memory"),
        (&["t-bad", "--cpus", &cpu, "--mem", "8M", "--owner", "no-such-user-here"], "no such user"),
    ];
    for (args, want) in cases {
        let mut a = vec!["partition", "create"];
        a.extend_from_slice(args);
        fails(&lwk(&a), want);
        assert_eq!(snapshot(), before, "{args:?} changed something");
    }
    let o = lwk(&["partition", "create", "t-bad", "--cpus", &cpu, "--mem", "8M", "--hugepages", "3M"]);
    assert_eq!(o.status.code(), Some(2), "clap rejects a bad page size");
    fails(&lwk(&["partition", "destroy", "t-nothing"]), "no partition t-nothing");
    fails(&lwk(&["partition", "log", "t-nothing"]), "no partition t-nothing");
    assert_eq!(snapshot(), before);
}

#[test]
#[ignore = "needs root, a second CPU and a cpuset cgroup"]
fn overlapping_cpus_and_duplicate_names_are_refused() {
    require_partitions();
    let _s = serial();
    let before = snapshot();
    let cpu = last_cpu().to_string();
    let _c = Cleanup("t-first");
    ok(&lwk(&["partition", "create", "t-first", "--cpus", &cpu, "--mem", "4M"]));
    let during = snapshot();
    fails(
        &lwk(&["partition", "create", "t-second", "--cpus", &cpu, "--mem", "4M"]),
        &format!("CPU {cpu} is already in partition t-first"),
    );
    fails(&lwk(&["partition", "create", "t-first", "--cpus", "0", "--mem", "4M"]), "partition t-first already exists");
    assert_eq!(snapshot(), during);
    ok(&lwk(&["partition", "destroy", "t-first"]));
    assert_eq!(snapshot(), before);
}

#[test]
#[ignore = "needs root, a second CPU and a cpuset cgroup"]
fn concurrent_creates_of_one_cpu_give_it_to_one() {
    require_partitions();
    let _s = serial();
    let before = snapshot();
    let cpu = last_cpu().to_string();
    let _c = (Cleanup("t-race-a"), Cleanup("t-race-b"));
    let spawn = |name: &str| {
        Command::new(LWK)
            .args(["partition", "create", name, "--cpus", &cpu, "--mem", "4M"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn("t-race-a"), spawn("t-race-b"));
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    let (won, lost, loser) = match (a.status.success(), b.status.success()) {
        (true, false) => ("t-race-a", b, "t-race-b"),
        (false, true) => ("t-race-b", a, "t-race-a"),
        _ => panic!("exactly one create must win: {a:?} {b:?}"),
    };
    fails(&lost, &format!("CPU {cpu} is already in partition {won}"));
    fails(&lwk(&["partition", "show", loser]), "no partition");
    ok(&lwk(&["partition", "destroy", won]));
    assert_eq!(snapshot(), before);
}

#[test]
#[ignore = "needs root, a second CPU and a cpuset cgroup"]
fn a_failure_at_any_step_rolls_everything_back() {
    require_partitions();
    let _s = serial();
    let before = snapshot();
    let cpu = last_cpu().to_string();
    let _c = Cleanup("t-fail");
    for step in STEPS {
        let o = lwk_env(
            &["partition", "create", "t-fail", "--cpus", &cpu, "--mem", "4M"],
            "LWK_PARTITION_TEST_FAIL_AFTER",
            step,
        );
        fails(&o, "nothing was changed");
        fails(&o, &format!("failing after step {step}"));
        assert_eq!(snapshot(), before, "failure after {step} left something behind");
    }
}

#[test]
#[ignore = "needs root, a second CPU and a cpuset cgroup"]
fn destroy_cleans_up_after_a_create_killed_at_any_step() {
    require_partitions();
    let _s = serial();
    let before = snapshot();
    let cpu = last_cpu().to_string();
    let _c = Cleanup("t-crash");
    for step in STEPS {
        let o = lwk_env(
            &["partition", "create", "t-crash", "--cpus", &cpu, "--mem", "4M"],
            "LWK_PARTITION_TEST_CRASH_AFTER",
            step,
        );
        assert_eq!(o.status.signal(), Some(9), "create was to be killed after {step}: {o:?}");
        let list = ok(&lwk(&["partition", "list"]));
        let line = list.lines().find(|l| l.starts_with("t-crash ")).unwrap_or_else(|| panic!("{list}"));
        assert_eq!(line.ends_with("incomplete"), *step != "done", "{line}");
        if *step != "done" {
            // An incomplete partition cannot be used, only destroyed.
            let o = lwk(&["partition", "show", "t-crash"]);
            assert!(ok(&o).contains("incomplete"));
        }
        ok(&lwk(&["partition", "destroy", "t-crash"]));
        assert_eq!(snapshot(), before, "destroy after a kill at {step} left something behind");
    }
}

#[test]
#[ignore = "needs root, a second CPU and a cpuset cgroup"]
fn a_destroy_killed_or_failed_at_any_step_can_be_run_again() {
    require_partitions();
    let _s = serial();
    let before = snapshot();
    let cpu = last_cpu().to_string();
    let _c = Cleanup("t-again");
    // The undo steps of a v1 partition with huge pages, in the order undone.
    let mut undo = vec!["mount", "hugepages", "irq", "cgroup", "tasks", "shared-cpusets"];
    if cpuset_root().ends_with("/cgroup") {
        undo.retain(|s| *s != "tasks");
    }
    for step in undo {
        ok(&lwk(&["partition", "create", "t-again", "--cpus", &cpu, "--mem", "4M"]));
        let point = format!("undo-{step}");
        let o = lwk_env(&["partition", "destroy", "t-again"], "LWK_PARTITION_TEST_CRASH_AFTER", &point);
        assert_eq!(o.status.signal(), Some(9), "destroy was to be killed after {point}: {o:?}");
        assert!(ok(&lwk(&["partition", "list"])).contains("t-again "), "the half-destroyed partition is listed");
        ok(&lwk(&["partition", "destroy", "t-again"]));
        assert_eq!(snapshot(), before, "destroy after a kill at {point} left something behind");

        ok(&lwk(&["partition", "create", "t-again", "--cpus", &cpu, "--mem", "4M"]));
        let o = lwk_env(&["partition", "destroy", "t-again"], "LWK_PARTITION_TEST_FAIL_AFTER", &point);
        fails(&o, &format!("failing after step {point}"));
        ok(&lwk(&["partition", "destroy", "t-again"]));
        assert_eq!(snapshot(), before, "destroy after a failure at {point} left something behind");
    }
}

#[test]
#[ignore = "needs root, a second CPU and a cpuset cgroup"]
fn destroy_all() {
    require_partitions();
    let _s = serial();
    let before = snapshot();
    ok(&lwk(&["partition", "destroy", "--all"]));
    let _c = Cleanup("t-all-a");
    let _d = Cleanup("t-all-b");
    let cpu = last_cpu();
    ok(&lwk(&["partition", "create", "t-all-a", "--cpus", &cpu.to_string(), "--mem", "4M"]));
    let mut names = vec!["t-all-a"];
    if cpu >= 2 {
        ok(&lwk(&[
            "partition",
            "create",
            "t-all-b",
            "--cpus",
            &(cpu - 1).to_string(),
            "--mem",
            "4M",
            "--hugepages",
            "none",
        ]));
        names.push("t-all-b");
    }
    let out = ok(&lwk(&["partition", "destroy", "--all"]));
    for n in names {
        assert!(out.contains(&format!("partition {n} destroyed")), "{out}");
    }
    assert_eq!(snapshot(), before);
    assert!(lwk(&["partition", "destroy"]).status.code() == Some(2), "destroy needs a name or --all");
}

#[test]
#[ignore = "needs root, a second CPU and a cpuset cgroup"]
fn busy_partitions_are_not_destroyed_unless_forced() {
    require_partitions();
    let _s = serial();
    let before = snapshot();
    let _c = Cleanup("t-busy");
    ok(&lwk(&["partition", "create", "t-busy", "--cpus", &last_cpu().to_string(), "--mem", "4M", "--owner", "nobody"]));
    // A stand-in for `lwk run`, as the owner: holds run.lock with its pid in
    // it, in a process group of its own.
    let lock = "/run/lwk/partitions/t-busy/run.lock";
    let mut holder = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "setsid", "flock", "-xn", lock, "sh", "-c"])
        .arg(format!("echo $$ > {lock}; exec sleep 60"))
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let pid = loop {
        let s = std::fs::read_to_string(lock).unwrap();
        if !s.trim().is_empty() {
            break s.trim().to_string();
        }
        assert!(Instant::now() < deadline, "the holder never wrote its pid");
        std::thread::sleep(Duration::from_millis(20));
    };
    let list = ok(&lwk(&["partition", "list"]));
    assert!(list.lines().any(|l| l.starts_with("t-busy ") && l.ends_with(&format!("pid {pid}"))), "{list}");
    let during = snapshot();
    fails(&lwk(&["partition", "destroy", "t-busy"]), &format!("partition t-busy is busy: lwk run pid {pid}"));
    fails(&lwk(&["partition", "destroy", "--all"]), "is busy");
    assert_eq!(snapshot(), during);
    ok(&lwk(&["partition", "destroy", "--force", "t-busy"]));
    // The pid in run.lock (sh, now sleep) was killed; flock, its parent,
    // then ends too.
    let status = holder.wait().unwrap();
    assert!(!status.success(), "the holder was to be killed: {status:?}");
    assert_eq!(snapshot(), before);
}

#[test]
#[ignore = "needs root, a second CPU and a cpuset cgroup"]
fn create_and_destroy_need_root() {
    require_partitions();
    let _s = serial();
    let as_nobody = |args: &[&str]| {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", LWK])
            .args(args)
            .output()
            .unwrap()
    };
    fails(&as_nobody(&["partition", "create", "t-user", "--cpus", "1", "--mem", "4M"]), "needs root");
    fails(&as_nobody(&["partition", "destroy", "--all"]), "needs root");
    ok(&as_nobody(&["partition", "list"]));
}
