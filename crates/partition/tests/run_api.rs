//! The library API `lwk run --partition NAME` uses: open, lock_for_run,
//! add_task, log_event; as root, and what the owner (not root) may do.

mod common;

use std::process::Command;

use common::{last_cpu, read, require_partitions, serial, snapshot};
use lwk_partition::{PageSize, Request};

/// Destroys the partition when the test ends, even by a panic.
struct Cleanup(&'static str);
impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = lwk_partition::destroy(self.0, true);
    }
}

fn request(name: &str, owner: u32) -> Request {
    Request {
        name: name.into(),
        cpus: vec![last_cpu()],
        mem_bytes: 3 << 20, // rounded up to 2 pages
        page: PageSize::Huge2M,
        owner_uid: owner,
        owner_gid: owner,
    }
}

#[test]
#[ignore = "needs root, a second CPU and a cpuset cgroup"]
fn open_lock_add_task_log() {
    require_partitions();
    let _s = serial();
    let before = snapshot();
    let e = lwk_partition::open("t-api-none").unwrap_err().to_string();
    assert_eq!(e, "no partition t-api-none; see lwk partition list");

    let _c = Cleanup("t-api");
    let info = lwk_partition::create(&request("t-api", 0)).unwrap();
    assert_eq!(info.mem_bytes, 4 << 20);
    let p = lwk_partition::open("t-api").unwrap();
    assert_eq!(p.cpus, vec![last_cpu()]);
    assert!(!p.linux_cpus.is_empty() && !p.linux_cpus.contains(&last_cpu()));
    assert_eq!((p.page_size, p.mem_bytes, p.owner_uid), (2 << 20, 4 << 20, 0));
    assert!(p.mem_dir.ends_with("t-api/mem"));

    // One run at a time; the lock names its holder, and goes with it.
    let lock = p.lock_for_run().unwrap();
    let e = p.lock_for_run().unwrap_err().to_string();
    assert_eq!(e, format!("partition t-api is busy: lwk run pid {}", std::process::id()));
    assert_eq!(lwk_partition::show("t-api").unwrap().busy_pid, Some(std::process::id() as i32));
    let e = lwk_partition::destroy("t-api", false).unwrap_err().to_string();
    assert!(e.contains("is busy: lwk run pid"), "{e}");
    let e = lwk_partition::destroy("t-api", true).unwrap_err().to_string();
    assert!(e.contains("held by this very process"), "{e}");
    drop(lock);
    assert_eq!(lwk_partition::show("t-api").unwrap().busy_pid, None);
    drop(p.lock_for_run().unwrap());

    // A task put into the partition runs on its CPUs only.
    let mut child = Command::new("sleep").arg("60").spawn().unwrap();
    p.add_task(child.id() as i32).unwrap();
    assert_eq!(read(format!("/proc/{}/cpuset", child.id())), "/lwk/t-api");
    let status = read(format!("/proc/{}/status", child.id()));
    let allowed = status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).unwrap().trim().to_string();
    assert_eq!(allowed, last_cpu().to_string());
    let e = p.add_task(999_999_999).unwrap_err();
    assert!(format!("{e:#}").contains("cannot put pid 999999999 into partition t-api"), "{e:#}");

    p.log_event("started", "pid 42 program /bin/true").unwrap();
    let log = lwk_partition::read_log("t-api").unwrap();
    let last = log.lines().last().unwrap();
    assert!(last.ends_with(" started pid 42 program /bin/true"), "{last}");
    assert!(
        last.as_bytes()[4] == b'-' && last.contains('T') && last.split(' ').next().unwrap().ends_with('Z'),
        "{last}"
    );

    // A process in it makes it busy; --force kills it.
    let e = lwk_partition::destroy("t-api", false).unwrap_err().to_string();
    assert!(e.contains(&format!("processes [{}]", child.id())), "{e}");
    lwk_partition::destroy("t-api", true).unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(child.wait().unwrap().signal(), Some(9));
    assert_eq!(snapshot(), before);
    let e = lwk_partition::open("t-api").unwrap_err().to_string();
    assert_eq!(e, "no partition t-api; see lwk partition list");
}

#[test]
#[ignore = "needs root, a second CPU and a cpuset cgroup"]
fn the_owner_can_run_without_root() {
    require_partitions();
    let _s = serial();
    let before = snapshot();
    let _c = Cleanup("t-owner");
    lwk_partition::create(&request("t-owner", 65534)).unwrap();
    let p = lwk_partition::open("t-owner").unwrap();
    // As uid 65534: join the cpuset, append to the log, take the run lock,
    // create a memory file in the mount.
    let script = format!(
        "echo $$ > {cg}/cgroup.procs && cat /proc/self/cpuset && echo line >> {dir}/log && flock -xn {dir}/run.lock true \
         && touch {mem}/f && rm {mem}/f && echo ok",
        cg = p.cgroup_dir.display(),
        dir = p.state_dir.display(),
        mem = p.mem_dir.display()
    );
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "sh", "-c", &script])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout, "/lwk/t-owner\nok\n");
    // Someone else may not use the memory.
    let out = Command::new("setpriv")
        .args(["--reuid=65533", "--regid=65533", "--clear-groups", "touch"])
        .arg(p.mem_dir.join("g"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "another user wrote into the partition's memory");
    lwk_partition::destroy("t-owner", false).unwrap();
    assert_eq!(snapshot(), before);
}
