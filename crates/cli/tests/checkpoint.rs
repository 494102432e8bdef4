//! An application seen and taken from outside while it runs: frozen and
//! resumed (`lwk_migrate::app`, the requester's half; `lwk_kernel::freeze`,
//! the LWK's), listed by `lwk ps`, and written to an image by
//! `lwk checkpoint`. Every thread parks with its context saved, wherever
//! it was (application code, a futex wait, a sleep, a delegated read,
//! wait4), and goes on after the resume as if nothing happened: the
//! program prints what it prints natively.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use lwk_migrate::app::{App, AppError};
use lwk_migrate::image::{ImageReader, Record, RecordKind};

mod common;
use common::{compiled, enter_netns, only_standard_streams, LineClient, TestPartition};

const LWK: &str = env!("CARGO_BIN_EXE_lwk");
const TMP_ROOT: &str = env!("CARGO_TARGET_TMPDIR");

fn target() -> &'static Path {
    compiled("freeze_target")
}

fn native(args: &[&str]) -> String {
    native_of(target(), args)
}

fn native_of(prog: &Path, args: &[&str]) -> String {
    let o = Command::new(prog).args(args).output().unwrap();
    assert!(o.status.success());
    String::from_utf8(o.stdout).unwrap()
}

/// Start the target under lwk; returns it once it printed "ready" (or
/// "ready PID"), with the rest of its stdout to read.
fn start(args: &[&str]) -> (Running, BufReader<std::process::ChildStdout>) {
    start_of(target(), args)
}

fn start_of(prog: &Path, args: &[&str]) -> (Running, BufReader<std::process::ChildStdout>) {
    start_with(&[], prog, args)
}

/// As `start_of`, with options `opts` for `lwk run`.
fn start_with(opts: &[&str], prog: &Path, args: &[&str]) -> (Running, BufReader<std::process::ChildStdout>) {
    let mut cmd = Command::new(LWK);
    cmd.arg("run").args(opts).arg("--").arg(prog).args(args).stdin(Stdio::null()).stdout(Stdio::piped());
    let mut child = Running(Some(only_standard_streams(&mut cmd).spawn().unwrap()));
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(line == "ready\n" || line.starts_with("ready "), "{line:?}");
    (child, out)
}

#[test]
fn a_frozen_and_resumed_program_goes_on_as_if_nothing_happened() {
    let expected = native(&[]);
    let (mut child, mut out) = start(&[]);
    // Attached through `lwk run`'s pid: the application is its child.
    let app = App::attach(child.id() as i32).expect("attach");
    assert_ne!(app.pid, child.id() as i32, "the application process, not lwk run");
    let mut freezes = 0;
    let mut saw_all_threads = false;
    for _ in 0..25 {
        let threads = app.threads().unwrap();
        let frozen = match app.freeze(Duration::from_secs(5)) {
            Ok(f) => f,
            Err(AppError::NoSuchProcess(_) | AppError::Sys { .. }) => break, // it ended
            Err(e) => panic!("freeze {freezes}: {e}"),
        };
        let x = frozen.export();
        let saved: Vec<i32> = x.threads.iter().filter(|t| t.saved != 0).map(|t| t.tid).collect();
        assert_eq!(saved.len(), x.n_threads as usize);
        assert!(saved.contains(&app.pid), "the main thread is saved");
        for tid in &saved {
            assert!(threads.contains(tid) || app.threads().unwrap().contains(tid), "thread {tid} is the application's");
        }
        saw_all_threads |= saved.len() == 4;
        let freezer = &x.threads[x.freezer_slot as usize];
        assert_eq!(freezer.saved, 1, "the freezer saves itself too");
        assert!(x.state.threads.used.iter().any(|&w| w != 0));
        frozen.resume().expect("resume");
        freezes += 1;
        std::thread::sleep(Duration::from_millis(30));
    }
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert_eq!(format!("ready\n{rest}"), expected, "the output of a run frozen {freezes} times");
    assert!(freezes >= 10, "only {freezes} freezes before the program ended");
    assert!(saw_all_threads, "no freeze caught all four threads");
}

#[test]
fn a_sleep_frozen_and_resumed_goes_on_for_the_time_it_had_left() {
    // Three freezes during a 2 s sleep: each rewinds the call, which then
    // sleeps only what it had left (restarting it in full would take at
    // least 3.5 s).
    for how in ["nano", "clock"] {
        let (mut child, mut out) = start_of(compiled("sleep_target"), &["2000", how]);
        let app = App::attach(child.id() as i32).unwrap();
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(500));
            app.freeze(Duration::from_secs(5)).unwrap().resume().unwrap();
        }
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        let ms: u64 = line.strip_prefix("slept ").and_then(|l| l.split(' ').next()).unwrap().parse().unwrap();
        assert!((2000..3000).contains(&ms), "{how}: {line}");
        assert!(line.ends_with("returned 0\n"), "{line}");
        assert!(child.wait().unwrap().success());
    }
}

#[test]
fn a_thread_that_no_signal_interrupts_fails_the_freeze_and_the_program_goes_on() {
    let expected = native(&["vfork"]);
    let (mut child, mut out) = start(&["vfork"]);
    let app = App::attach(child.id() as i32).unwrap();
    // The main thread waits for its vfork child (3 s), killable only:
    // once that child is there (not after a fixed time: on a loaded
    // machine the vfork may come late).
    let has_child = || {
        let tasks = std::fs::read_dir(format!("/proc/{}/task", app.pid)).unwrap();
        tasks.flatten().any(|t| !std::fs::read_to_string(t.path().join("children")).unwrap_or_default().is_empty())
    };
    let t = std::time::Instant::now();
    while !has_child() {
        assert!(t.elapsed() < Duration::from_secs(10), "no vfork child came");
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(50));
    match app.freeze(Duration::from_secs(5)) {
        Err(AppError::FreezeFailed { errno, .. }) => assert_eq!(errno, libc::EBUSY),
        Err(e) => panic!("unexpected error: {e}"),
        Ok(_) => panic!("froze a thread waiting for its vfork child"),
    }
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    assert!(child.wait().unwrap().success());
    assert_eq!(format!("ready\n{rest}"), expected);
}

#[test]
fn a_stopped_application_does_not_answer_and_goes_on_when_continued() {
    let expected = native(&[]);
    let (mut child, mut out) = start(&[]);
    let app = App::attach(child.id() as i32).unwrap();
    // SAFETY: signalling our own grandchild, the application.
    unsafe { libc::kill(app.pid, libc::SIGSTOP) };
    std::thread::sleep(Duration::from_millis(100));
    match app.freeze(Duration::from_millis(500)) {
        Err(AppError::NoAnswer { .. }) => {}
        Err(e) => panic!("unexpected error: {e}"),
        Ok(_) => panic!("a stopped process froze"),
    }
    // SAFETY: as above.
    unsafe { libc::kill(app.pid, libc::SIGCONT) };
    // The request it takes late is void: it goes on, and freezes again.
    std::thread::sleep(Duration::from_millis(100));
    app.freeze(Duration::from_secs(5)).expect("a freeze after SIGCONT").resume().unwrap();
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    assert!(child.wait().unwrap().success());
    assert_eq!(format!("ready\n{rest}"), expected);
}

#[test]
fn attaching_to_a_process_that_is_not_lwk_says_so() {
    let me = std::process::id() as i32;
    assert!(matches!(App::attach(me), Err(AppError::NotLwk(p)) if p == me));
    assert!(matches!(App::attach(i32::MAX - 1), Err(AppError::NoSuchProcess(_))));
}

#[test]
fn lwk_ps_lists_the_application_with_its_proxy_threads_and_descriptors() {
    let (mut child, mut out) = start(&[]);
    let app = App::attach(child.id() as i32).unwrap();
    let o = Command::new(LWK).args(["ps", "--json"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let list: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let me = list
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["pid"] == app.pid)
        .unwrap_or_else(|| panic!("pid {} not in {list}", app.pid));
    assert_eq!(me["proxy_pid"], app.proxy_pid());
    assert_eq!(me["parent_pid"], child.id(), "the first process's parent is lwk run");
    assert_eq!(me["threads"], 4);
    assert!(me["command"].as_str().unwrap().ends_with("freeze_target"), "{me}");
    assert!(me["descriptors"]["pipe"].as_u64().unwrap() >= 2, "{me}");
    assert!(me["memory_bytes"].as_u64().unwrap() > 0);
    let text = Command::new(LWK).arg("ps").output().unwrap();
    assert!(String::from_utf8_lossy(&text.stdout).lines().any(|l| l.trim_start().starts_with(&app.pid.to_string())));
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    assert!(child.wait().unwrap().success());
}

/// Read an image: its manifest, its record kinds in order, and whether its
/// memory holds `needle`.
fn read_image(path: &Path, needle: &[u8]) -> (serde_json::Value, Vec<RecordKind>, bool, usize) {
    let f = std::io::BufReader::new(std::fs::File::open(path).unwrap());
    let mut r = ImageReader::new(f, None).unwrap();
    let (mut manifest, mut kinds, mut found, mut threads_len) = (serde_json::Value::Null, Vec::new(), false, 0);
    while let Some(rec) = r.next_record().unwrap() {
        match &rec {
            Record::Memory(m) => found |= m.bytes.windows(needle.len()).any(|w| w == needle),
            Record::Known { kind: RecordKind::Manifest, .. } => manifest = rec.json().unwrap(),
            Record::Known { kind: RecordKind::ThreadContexts, payload } => threads_len = payload.len(),
            _ => {}
        }
        kinds.push(rec.kind().unwrap());
    }
    (manifest, kinds, found, threads_len)
}

#[test]
fn lwk_checkpoint_leave_running_writes_a_whole_image_and_the_program_goes_on() {
    let expected = native(&[]);
    let (mut child, mut out) = start(&[]);
    let app = App::attach(child.id() as i32).unwrap();
    std::thread::sleep(Duration::from_millis(700)); // its forked child is gone
    let dir = tempfile::Builder::new().prefix("lwk-checkpoint-").tempdir_in(TMP_ROOT).unwrap();
    let o = Command::new(LWK)
        .args(["checkpoint", &child.id().to_string()])
        .arg(dir.path())
        .args(["--leave-running", "--json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["left_running"], true);
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, ["image.lwk"], "only the whole image is left");
    let (manifest, kinds, found, threads_len) =
        read_image(&dir.path().join("image.lwk"), b"freeze-target heap marker 7f3a");
    assert_eq!(manifest["pid"], app.pid);
    assert_eq!(manifest["threads"], 4);
    assert_eq!(
        threads_len as u64,
        4 * (4 + manifest["thread_record_size"].as_u64().unwrap()),
        "four thread records, each after its slot"
    );
    assert_eq!(
        &kinds[..5],
        [
            RecordKind::Manifest,
            RecordKind::LwkState,
            RecordKind::ThreadContexts,
            RecordKind::Descriptors,
            RecordKind::Sockets
        ]
    );
    assert!(kinds[5..].iter().all(|k| *k == RecordKind::Memory));
    assert!(found, "the heap is in the image's memory");
    assert_eq!(report["manifest"]["memory_bytes"], manifest["memory_bytes"]);
    // A second checkpoint into the same directory is refused.
    let again = Command::new(LWK).args(["checkpoint", &child.id().to_string()]).arg(dir.path()).output().unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already holds an image"));
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    assert!(child.wait().unwrap().success());
    assert_eq!(format!("ready\n{rest}"), expected);
}

#[test]
fn lwk_checkpoint_without_leave_running_stops_the_application_after_the_image() {
    let (mut child, _out) = start(&[]);
    std::thread::sleep(Duration::from_millis(700)); // its forked child is gone
    let dir = tempfile::Builder::new().prefix("lwk-checkpoint-").tempdir_in(TMP_ROOT).unwrap();
    let o = Command::new(LWK).args(["checkpoint", &child.id().to_string()]).arg(dir.path()).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("stopped"));
    let status = child.wait().unwrap();
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(libc::SIGKILL), "{status:?}");
    assert!(dir.path().join("image.lwk").exists());
}

#[test]
#[ignore = "needs root (lwk restore gives the application its pids back in a pid namespace)"]
fn a_checkpointed_program_restored_in_new_processes_finishes_as_a_native_run_does() {
    let prog = compiled("restore_target");
    let (_, before, dir) = checkpointed(prog, Duration::from_millis(150));
    assert_eq!(before, "", "the checkpointed run stops after its image is written");
    restored_twice_as_native(prog, &dir, &before);
}

/// Run `prog` under lwk, and after `after` checkpoint it (it stops): what
/// `lwk checkpoint` printed, what the program printed after "ready", and
/// the image's directory.
fn checkpointed(prog: &Path, after: Duration) -> (String, String, tempfile::TempDir) {
    let (mut child, mut out) = start_of(prog, &[]);
    std::thread::sleep(after);
    let (said, dir) = checkpoint_stopping(&mut child);
    let mut before = String::new();
    out.read_to_string(&mut before).unwrap();
    (said, before, dir)
}

/// Checkpoint the application that `child` (its `lwk run`) runs, which
/// then stops (SIGKILL): what `lwk checkpoint` printed, and the image's
/// directory.
fn checkpoint_stopping(child: &mut std::process::Child) -> (String, tempfile::TempDir) {
    let app = App::attach(child.id() as i32).unwrap();
    let dir = tempfile::Builder::new().prefix("lwk-checkpoint-").tempdir_in(TMP_ROOT).unwrap();
    let o = Command::new(LWK).args(["checkpoint", &app.pid.to_string()]).arg(dir.path()).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&child.wait().unwrap()), Some(libc::SIGKILL));
    (String::from_utf8(o.stdout).unwrap(), dir)
}

/// A process of the test's (`lwk run` or `lwk restore`), killed (with the
/// application, which dies with it) if the test ends before it did.
struct Running(Option<std::process::Child>);

impl Running {
    fn wait_with_output(mut self) -> std::io::Result<std::process::Output> {
        self.0.take().expect("running").wait_with_output()
    }
}

impl std::ops::Deref for Running {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        self.0.as_ref().expect("running")
    }
}

impl std::ops::DerefMut for Running {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        self.0.as_mut().expect("running")
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            if matches!(c.try_wait(), Ok(None)) {
                c.kill().ok();
            }
            c.wait().ok();
        }
    }
}

/// `lwk restore` of the image in `dir` (its output piped), once the
/// application it restored runs: the restore, and the application.
fn restore_started(dir: &Path) -> (Running, App) {
    let restored = Command::new(LWK)
        .arg("restore")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut restored = Running(Some(restored));
    let t0 = std::time::Instant::now();
    loop {
        match App::attach(restored.id() as i32) {
            Ok(a) if a.control().header.started.load(std::sync::atomic::Ordering::SeqCst) != 0 => return (restored, a),
            _ => {
                if let Some(status) = restored.try_wait().unwrap() {
                    let mut err = String::new();
                    restored.stderr.take().unwrap().read_to_string(&mut err).unwrap();
                    panic!("lwk restore ended ({status}) before the application ran: {err}");
                }
                assert!(t0.elapsed() < Duration::from_secs(30), "the restored application did not start")
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Restored twice from the image in `dir`: each run finishes the work of
/// `prog`, which printed `before` until the checkpoint, as a native run.
fn restored_twice_as_native(prog: &Path, dir: &tempfile::TempDir, before: &str) {
    // The native run comes after the first restore: until then, the
    // ports of a program with TCP connections are held closed.
    let mut expected = None;
    for _ in 0..2 {
        let r = Command::new(LWK).arg("restore").arg(dir.path()).stdin(Stdio::null()).output().unwrap();
        assert!(r.status.success(), "{:?}: {}", r.status, String::from_utf8_lossy(&r.stderr));
        let after = String::from_utf8(r.stdout).unwrap();
        let expected = expected.get_or_insert_with(|| native_of(prog, &[]));
        assert_eq!(&format!("ready\n{before}{after}"), expected, "stderr: {}", String::from_utf8_lossy(&r.stderr));
    }
}

#[test]
fn lwk_restore_refuses_a_damaged_image_or_a_changed_file_before_anything_starts() {
    let prog = compiled("restore_target");
    // A copy of the program: it is changed after the checkpoint.
    let dir = tempfile::Builder::new().prefix("lwk-checkpoint-").tempdir_in(TMP_ROOT).unwrap();
    let copy = dir.path().join("restore_target");
    std::fs::copy(prog, &copy).unwrap();
    let (mut child, _out) = start_of(&copy, &[]);
    let app = App::attach(child.id() as i32).unwrap();
    let image_dir = dir.path().join("image");
    let o = Command::new(LWK).args(["checkpoint", &app.pid.to_string()]).arg(&image_dir).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    child.wait().unwrap();
    let image = image_dir.join("image.lwk");

    // One byte flipped in the middle of the image.
    let good = std::fs::read(&image).unwrap();
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x40;
    std::fs::write(&image, &bad).unwrap();
    let r = Command::new(LWK).arg("restore").arg(&image_dir).output().unwrap();
    assert_eq!(r.status.code(), Some(125));
    assert!(r.stdout.is_empty(), "nothing of the program ran");
    assert!(String::from_utf8_lossy(&r.stderr).contains("image.lwk"), "{}", String::from_utf8_lossy(&r.stderr));

    // Whole again, but the program's file changed since.
    std::fs::write(&image, &good).unwrap();
    let f = std::fs::OpenOptions::new().append(true).open(&copy).unwrap();
    std::io::Write::write_all(&mut &f, b"\0").unwrap();
    drop(f);
    let r = Command::new(LWK).arg("restore").arg(&image_dir).output().unwrap();
    assert_eq!(r.status.code(), Some(125));
    assert!(r.stdout.is_empty(), "nothing of the program ran");
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("restore_target") && err.contains("changed"), "{err}");
}

#[test]
#[ignore = "needs root (lwk restore gives the application its pids back in a pid namespace)"]
fn descriptors_come_back_at_their_numbers_with_the_bytes_in_their_pipes() {
    // freeze_target's reader thread blocks in read() on a pipe that the
    // main thread feeds; its stdout is a pipe to this test (handed over at
    // the restore). Checkpointed once its forked child is gone.
    let expected = native(&[]);
    let (mut child, mut out) = start(&[]);
    let app = App::attach(child.id() as i32).unwrap();
    std::thread::sleep(Duration::from_millis(700));
    let dir = tempfile::Builder::new().prefix("lwk-checkpoint-").tempdir_in(TMP_ROOT).unwrap();
    let o = Command::new(LWK).args(["checkpoint", &app.pid.to_string()]).arg(dir.path()).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut before = String::new();
    out.read_to_string(&mut before).unwrap();
    child.wait().unwrap();
    let r = Command::new(LWK).arg("restore").arg(dir.path()).stdin(Stdio::null()).output().unwrap();
    assert!(r.status.success(), "{:?}: {}", r.status, String::from_utf8_lossy(&r.stderr));
    let after = String::from_utf8(r.stdout).unwrap();
    assert_eq!(format!("ready\n{before}{after}"), expected, "stderr: {}", String::from_utf8_lossy(&r.stderr));
}

/// The record kinds of an image and its tree record, if it has one.
fn image_tree(path: &Path) -> (Vec<RecordKind>, Option<lwk_migrate::tree::TreeRecord>) {
    let f = std::io::BufReader::new(std::fs::File::open(path).unwrap());
    let mut r = ImageReader::new(f, None).unwrap();
    let (mut kinds, mut tree) = (Vec::new(), None);
    while let Some(rec) = r.next_record().unwrap() {
        if let Record::Known { kind: RecordKind::Processes, .. } = &rec {
            tree = Some(rec.json().unwrap());
        }
        kinds.push(rec.kind().unwrap());
    }
    (kinds, tree)
}

#[test]
fn a_process_tree_is_checkpointed_whole_and_goes_on() {
    // tree_target's parent and child talk through two pipes and add up in
    // shared memory; checkpointed (left running) mid-way.
    let prog = compiled("tree_target");
    let expected = native_of(prog, &[]);
    let (mut child, mut out) = start_of(prog, &[]);
    let app = App::attach(child.id() as i32).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let forked = lwk_migrate::app::children(app.pid);
    assert_eq!(forked.len(), 1, "the program's child is there");
    let dir = tempfile::Builder::new().prefix("lwk-checkpoint-").tempdir_in(TMP_ROOT).unwrap();
    // Named by the child: the application is the whole tree still.
    let o = Command::new(LWK)
        .args(["checkpoint", &forked[0].to_string()])
        .arg(dir.path())
        .args(["--leave-running", "--json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["processes"], 2);
    assert_eq!(report["manifest"]["pid"], app.pid, "the first process first");
    let (kinds, tree) = image_tree(&dir.path().join("image.lwk"));
    assert_eq!(kinds[0], RecordKind::Processes, "the tree comes first");
    assert_eq!(kinds.iter().filter(|k| **k == RecordKind::Manifest).count(), 2, "one manifest per process");
    let tree = tree.unwrap();
    assert_eq!(tree.members.len(), 2);
    assert_eq!(tree.members[1].parent, Some(0));
    assert_eq!(tree.members[1].exit_signal, libc::SIGCHLD);
    assert_eq!(tree.members[1].shares_memory_with, Some(0), "the shared anonymous memory is one file");
    // The two pipes between them (their ends in both proxies), and stdin
    // (/dev/null, one description both hold), each once.
    let pipes = tree.shared.iter().filter(|s| matches!(s.what, lwk_migrate::tree::SharedWhat::Pipe(_))).count();
    assert_eq!(pipes, 2, "{:?}", tree.shared);
    assert!(tree.shared.iter().all(|s| s.holders.iter().any(|h| h.0 == 0) && s.holders.iter().any(|h| h.0 == 1)));
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    assert!(child.wait().unwrap().success());
    assert_eq!(format!("ready\n{rest}"), expected);
}

#[test]
#[ignore = "needs root (lwk restore gives the application its pids back in a pid namespace)"]
fn a_process_tree_is_restored_with_its_parent_child_pipes_and_shared_memory() {
    // After the restore, the child is the parent's child again (getppid,
    // wait4 with its exit status 7, SIGUSR1 from it), the bytes in the
    // pipe between them are still there, and both see one shared memory.
    let prog = compiled("tree_target");
    let (said, before, dir) = checkpointed(prog, Duration::from_millis(300));
    assert!(said.contains("2 processes"), "{said}");
    restored_twice_as_native(prog, &dir, &before);
}

#[test]
#[ignore = "needs root, a second CPU and a cpuset cgroup (partitions)"]
fn an_application_that_ran_in_a_partition_is_restored_into_one_made_like_it_and_gone_after() {
    // Checkpointed in partition A (the last CPU, 64 MiB of 4 KiB pages),
    // which is then destroyed (this machine has one CPU to give); the
    // restore makes its own like it, runs the application there (its
    // threads on its CPU, its memory in its memory directory) and destroys
    // it when the application ends.
    let lwk = |args: &[&str]| Command::new(LWK).args(args).output().unwrap();
    let source = TestPartition::create("ck", "64M");
    let cpu = source.cpu;
    let (mut child, _out) = start_with(&["--partition", &source.name], compiled("sleep_target"), &["3000"]);
    let (_, dir) = checkpoint_stopping(&mut child);
    drop(source);

    let (restored, app) = restore_started(dir.path());
    let own = format!("restored-{}", restored.id());
    let list = String::from_utf8(lwk(&["partition", "list"]).stdout).unwrap();
    assert!(list.contains(&own), "{list}");
    let status = std::fs::read_to_string(format!("/proc/{}/status", app.pid)).unwrap();
    let allowed = status.lines().find(|l| l.starts_with("Cpus_allowed_list:")).unwrap();
    assert_eq!(allowed.split_whitespace().nth(1), Some(cpu.to_string().as_str()), "{allowed}");
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", app.pid)).unwrap();
    assert!(maps.contains(&format!("/run/lwk/partitions/{own}/mem/")), "its memory is the partition's:\n{maps}");
    let r = restored.wait_with_output().unwrap();
    assert!(r.status.success(), "{:?}: {}", r.status, String::from_utf8_lossy(&r.stderr));
    let after = String::from_utf8(r.stdout).unwrap();
    assert!(after.starts_with("slept ") && after.ends_with("returned 0\n"), "{after}");
    let list = String::from_utf8(lwk(&["partition", "list"]).stdout).unwrap();
    assert!(!list.contains(&own), "its partition is gone: {list}");
}

#[test]
#[ignore = "needs root (a network namespace, TCP_REPAIR, a pid namespace)"]
fn a_loopback_connection_between_a_parent_and_its_child_survives_checkpoint_and_restore() {
    // loopback_target's child sends numbers a few ahead over 127.0.0.1 and
    // checks each comes back doubled: both ends are the tree's, captured
    // and rebuilt in repair mode, with the bytes in flight.
    let _ns = NetNs::enter("lo");
    let prog = compiled("loopback_target");
    let (said, before, dir) = checkpointed(prog, Duration::from_millis(500));
    assert!(said.contains("2 processes"), "{said}");
    restored_twice_as_native(prog, &dir, &before);
}

#[test]
#[ignore = "needs root (a network namespace, a pid namespace)"]
fn a_pre_forked_servers_shared_listener_comes_back_once_for_all_its_workers() {
    // prefork_target's two workers share one listener (the parent closed
    // its own): it is rebuilt once and handed to both, which serve
    // connections made after the restore and are reaped by the parent.
    let _ns = NetNs::enter("pf");
    let ask = |what: &str| {
        let mut c = std::net::TcpStream::connect("127.0.0.1:7402").unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        std::io::Write::write_all(&mut c, what.as_bytes()).unwrap();
        let mut answer = String::new();
        c.read_to_string(&mut answer).unwrap();
        answer
    };
    let prog = compiled("prefork_target");
    let (mut child, _out) = start_of(prog, &[]);
    assert_eq!(ask("before\n"), "worker: before\n");
    let (said, dir) = checkpoint_stopping(&mut child);
    assert!(said.contains("3 processes"), "{said}");
    let (restored, _) = restore_started(dir.path());
    assert_eq!(ask("after\n"), "worker: after\n");
    assert_eq!(ask("quit\n"), "worker: quit\n");
    assert_eq!(ask("quit\n"), "worker: quit\n");
    let r = restored.wait_with_output().unwrap();
    assert!(r.status.success(), "{:?}: {}", r.status, String::from_utf8_lossy(&r.stderr));
    assert_eq!(String::from_utf8(r.stdout).unwrap(), "workers done: 2 of 2\n");
}

/// A network namespace of this test's own (only its loopback, up), which
/// the calling thread enters: everything it starts runs there. Deleted on
/// drop; the thread is the test's own and ends with it.
struct NetNs(String);

impl NetNs {
    fn enter(tag: &str) -> NetNs {
        let name = format!("lwk-{tag}-{}", std::process::id());
        let ip = |args: &[&str]| {
            let o = Command::new("ip").args(args).output().expect("ip (iproute2)");
            assert!(o.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&o.stderr));
        };
        ip(&["netns", "add", &name]);
        let ns = NetNs(name);
        ip(&["-n", &ns.0, "link", "set", "lo", "up"]);
        enter_netns(&ns.0);
        ns
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        Command::new("ip").args(["netns", "delete", &self.0]).status().ok();
    }
}

#[test]
#[ignore = "needs root (a network namespace, TCP_REPAIR)"]
fn a_connection_waiting_in_the_accept_queue_is_left_to_the_application_and_the_freeze_tried_again() {
    // net_target accepts only 400 ms after it listens: the client's
    // connection waits in the accept queue, which a freeze cannot carry.
    // The application goes on for a moment and is frozen again until it
    // has taken the connection itself.
    let _ns = NetNs::enter("aq");
    let prog = compiled("net_target");
    let (mut child, mut out) = start_of(prog, &["127.0.0.1", "7001", "7002", "400"]);
    let mut client = LineClient::connect("127.0.0.1:7001", Duration::from_secs(10));
    let app = App::attach(child.id() as i32).unwrap();
    let dir = tempfile::Builder::new().prefix("lwk-checkpoint-").tempdir_in(TMP_ROOT).unwrap();
    let o = Command::new(LWK)
        .args(["checkpoint", &app.pid.to_string()])
        .arg(dir.path())
        .args(["--leave-running", "--json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(report["busy_retries"].as_u64().unwrap() >= 1, "{report}");
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "connected\n");
    assert_eq!(client.ask("hello\n"), "hello\n");
    assert_eq!(client.ask("quit\n"), "bye\n");
    assert!(child.wait().unwrap().success());
}

#[test]
#[ignore = "needs root (a network namespace, TCP_REPAIR, IP_TRANSPARENT)"]
fn a_tcp_connection_and_queued_datagrams_survive_checkpoint_and_restore() {
    use std::net::UdpSocket;
    let _ns = NetNs::enter("ck");
    let prog = compiled("net_target");
    let (mut child, mut out) = start_of(prog, &["127.0.0.1", "7001", "7002"]);
    let mut client = LineClient::connect("127.0.0.1:7001", Duration::from_secs(10));
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "connected\n");
    assert_eq!(client.ask("hello\n"), "hello\n");
    // Two datagrams from two addresses wait, unread, in its UDP queue.
    for (from, what) in [("127.0.0.2:0", "d1"), ("127.0.0.3:0", "d2")] {
        UdpSocket::bind(from).unwrap().send_to(what.as_bytes(), "127.0.0.1:7002").unwrap();
    }
    std::thread::sleep(Duration::from_millis(200)); // acknowledgements settle
    let (said, dir) = checkpoint_stopping(&mut child);
    // Until the restore, this node drops the client's segments (it would
    // answer them with a reset): the client sends meanwhile, and its
    // retransmission reaches the restored application.
    let table = said.split("nft delete table inet ").nth(1).and_then(|t| t.split('`').next()).expect(&said);
    assert!(said.contains("TCP to 127.0.0.1:7001 is dropped here"), "{said}");
    let listed = Command::new("nft").args(["list", "table", "inet", table]).output().unwrap();
    assert!(listed.status.success(), "{said}");
    client.send("world\n");
    std::thread::sleep(Duration::from_millis(300));
    let (restored, _) = restore_started(dir.path());
    // The connection goes on where it was, in both directions.
    assert_eq!(client.answer(), "world\n");
    let listed = Command::new("nft").args(["list", "table", "inet", table]).output().unwrap();
    assert!(!listed.status.success(), "the restore let the client in again");
    assert_eq!(client.ask("udp\n"), "udp 2 127.0.0.2:d1 127.0.0.3:d2\n");
    assert_eq!(client.ask("quit\n"), "bye\n");
    let r = restored.wait_with_output().unwrap();
    assert!(r.status.success(), "{:?}: {}", r.status, String::from_utf8_lossy(&r.stderr));
    assert_eq!(String::from_utf8_lossy(&r.stdout), "done\n");
}

#[test]
#[ignore = "needs root (a network namespace, TCP_REPAIR, IP_TRANSPARENT, a pid namespace)"]
fn the_whole_application_with_its_child_clients_datagrams_and_memory_survives_checkpoint_and_restore() {
    // service_target (as the migration tests run it): a writer thread
    // keeping 64 MiB in its pattern, a forked child that the server tells
    // every line's length through a pipe, an epoll loop echoing 10
    // clients, a UDP socket read only after the restore.
    use std::net::UdpSocket;
    let _ns = NetNs::enter("sv");
    let prog = compiled("service_target");
    let (mut child, _out) = start_of(prog, &["127.0.0.1", "7001", "7002", "64"]);
    let pid = App::attach(child.id() as i32).unwrap().pid;
    let mut clients: Vec<LineClient> =
        (0..10).map(|_| LineClient::connect("127.0.0.1:7001", Duration::from_secs(10))).collect();
    let mut bytes = 0;
    let mut each = |clients: &mut Vec<LineClient>, round: usize| {
        for (i, c) in clients.iter_mut().enumerate() {
            let line = format!("client {i} line {round}\n");
            assert_eq!(c.ask(&line), line);
            bytes += line.len();
        }
    };
    each(&mut clients, 0);
    for d in ["d1", "d2", "d3"] {
        UdpSocket::bind("127.0.0.2:0").unwrap().send_to(d.as_bytes(), "127.0.0.1:7002").unwrap();
    }
    std::thread::sleep(Duration::from_millis(200)); // acknowledgements settle
    let (said, dir) = checkpoint_stopping(&mut child);
    assert!(said.contains("2 processes, 3 threads"), "{said}");
    let (restored, _) = restore_started(dir.path());
    each(&mut clients, 1);
    let mut control = LineClient::connect("127.0.0.1:7001", Duration::from_secs(10));
    assert_eq!(control.ask("udp\n"), "udp 3 d1 d2 d3\n");
    assert_eq!(control.ask("end\n"), "bye\n");
    let r = restored.wait_with_output().unwrap();
    assert!(r.status.success(), "{:?}: {}", r.status, String::from_utf8_lossy(&r.stderr));
    assert_eq!(
        String::from_utf8_lossy(&r.stdout),
        format!("pid {pid}\nmemory ok\nchild exit 3 lines 20 bytes {bytes}\n")
    );
}

#[test]
#[ignore = "needs root (lwk restore gives the application its pids back in a pid namespace)"]
fn signalfds_read_and_polled_come_back_with_the_signal_pending_at_the_checkpoint() {
    // signalfd_target sent itself a SIGUSR1, which it blocks and reads
    // from a signalfd after its sleep, through epoll; it is checkpointed
    // while it sleeps. The restored one reads that signal, then those
    // sent to it afterwards, from both of its signalfds.
    let prog = compiled("signalfd_target");
    let (mut child, _out) = start_of(prog, &[]);
    let (_, dir) = checkpoint_stopping(&mut child);
    let (mut restored, app) = restore_started(dir.path());
    let mut out = BufReader::new(restored.stdout.take().unwrap());
    let mut line = || {
        let mut l = String::new();
        out.read_line(&mut l).unwrap();
        l
    };
    assert_eq!(line(), "sfd USR1\n");
    // SAFETY: signals to the restored application, ours.
    unsafe { libc::kill(app.pid, libc::SIGUSR2) };
    assert_eq!(line(), "sfd USR2\n");
    // SAFETY: as above.
    unsafe { libc::kill(app.pid, libc::SIGTERM) };
    assert_eq!(line(), "sfd2 TERM\n");
    assert_eq!(line(), "done\n");
    let r = restored.wait_with_output().unwrap();
    assert!(r.status.success(), "{:?}: {}", r.status, String::from_utf8_lossy(&r.stderr));
}

#[test]
#[ignore = "needs root (lwk restore gives the application its pids back in a pid namespace)"]
fn a_restored_child_outlives_its_parent_as_natively() {
    // orphan_target's parent ends 600 ms after it forked; its child goes
    // on 300 ms longer. Restored, the child must not end with the first
    // process (whose proxy the pid namespace once hung on): it finishes,
    // reparented, and `lwk restore` ends with the parent's status.
    let prog = compiled("orphan_target");
    let (said, before, dir) = checkpointed(prog, Duration::from_millis(100));
    assert!(said.contains("2 processes"), "{said}");
    restored_twice_as_native(prog, &dir, &before);
}

#[test]
fn an_application_whose_requester_dies_while_it_is_frozen_goes_on() {
    // `lwk checkpoint` writes into a FIFO nobody reads: it blocks, with the
    // application frozen, until it is killed.
    let expected = native(&[]);
    let (mut child, mut out) = start(&[]);
    let app = App::attach(child.id() as i32).unwrap();
    std::thread::sleep(Duration::from_millis(700)); // its forked child is gone
    let dir = tempfile::Builder::new().prefix("lwk-checkpoint-").tempdir_in(TMP_ROOT).unwrap();
    let fifo = dir.path().join("image.lwk.partial");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: plain mkfifo and a non-blocking open of it for reading.
    let reader = unsafe {
        assert_eq!(libc::mkfifo(c.as_ptr(), 0o600), 0);
        libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_NONBLOCK)
    };
    assert!(reader >= 0);
    let mut requester = Command::new(LWK)
        .args(["checkpoint", &app.pid.to_string()])
        .arg(dir.path())
        .arg("--leave-running")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let frozen = || app.control().header.freeze.load(std::sync::atomic::Ordering::SeqCst) == 3;
    let t0 = std::time::Instant::now();
    while !frozen() {
        assert!(t0.elapsed() < Duration::from_secs(10), "never frozen");
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(frozen(), "frozen while the requester lives");
    requester.kill().unwrap();
    requester.wait().unwrap();
    let t1 = std::time::Instant::now();
    while frozen() {
        assert!(t1.elapsed() < Duration::from_secs(5), "still frozen 5 s after its requester died");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    assert!(child.wait().unwrap().success());
    assert_eq!(format!("ready\n{rest}"), expected);
    // SAFETY: our own descriptor.
    unsafe { libc::close(reader) };
}

#[test]
#[ignore = "needs root (lwk restore gives the application its pids back in a pid namespace)"]
fn a_restored_program_checkpointed_again_and_restored_again_finishes_as_a_native_run_does() {
    let prog = compiled("restore_target");
    let expected = native_of(prog, &[]);
    let (mut child, mut out) = start_of(prog, &[]);
    let app = App::attach(child.id() as i32).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let dirs: Vec<_> =
        (0..2).map(|_| tempfile::Builder::new().prefix("lwk-checkpoint-").tempdir_in(TMP_ROOT).unwrap()).collect();
    let checkpoint = |pid: i32, dir: &Path| {
        let o = Command::new(LWK).args(["checkpoint", &pid.to_string()]).arg(dir).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    checkpoint(app.pid, dirs[0].path());
    let mut before = String::new();
    out.read_to_string(&mut before).unwrap();
    child.wait().unwrap();
    // The first restore runs a while in its pid namespace, and is
    // checkpointed there (through its `lwk restore`).
    let mut first = Command::new(LWK)
        .arg("restore")
        .arg(dirs[0].path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    checkpoint(first.id() as i32, dirs[1].path());
    let mut partial = String::new();
    first.stdout.take().unwrap().read_to_string(&mut partial).unwrap();
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&first.wait().unwrap()), Some(libc::SIGKILL));
    let r = Command::new(LWK).arg("restore").arg(dirs[1].path()).stdin(Stdio::null()).output().unwrap();
    assert!(r.status.success(), "{:?}: {}", r.status, String::from_utf8_lossy(&r.stderr));
    let after = String::from_utf8(r.stdout).unwrap();
    assert_eq!(format!("ready\n{before}{partial}{after}"), expected);
}

#[test]
#[ignore = "needs root (lwk restore, and a program run as another user)"]
fn a_restored_program_keeps_its_own_credentials_not_the_restorers() {
    use std::os::unix::process::CommandExt;
    const NOBODY: u32 = 65534;
    let prog = compiled("creds_target");
    let o = Command::new(prog).uid(NOBODY).gid(NOBODY).output().unwrap();
    let expected = String::from_utf8(o.stdout).unwrap();
    assert!(expected.contains("uid 65534 65534 65534") && expected.contains("Permission denied"), "{expected}");
    let mut cmd = Command::new(LWK);
    cmd.arg("run").arg("--").arg(prog).uid(NOBODY).gid(NOBODY).stdin(Stdio::null()).stdout(Stdio::piped());
    let mut child = only_standard_streams(&mut cmd).spawn().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    out.read_line(&mut first).unwrap();
    assert!(first.ends_with("ready\n"), "{first}");
    let app = App::attach(child.id() as i32).unwrap();
    let dir = tempfile::Builder::new().prefix("lwk-checkpoint-").tempdir_in(TMP_ROOT).unwrap();
    let o = Command::new(LWK).args(["checkpoint", &app.pid.to_string()]).arg(dir.path()).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    child.wait().unwrap();
    // Restored by root: it runs with its own ids, every thread of it.
    let r = Command::new(LWK).arg("restore").arg(dir.path()).stdin(Stdio::null()).output().unwrap();
    assert!(r.status.success(), "{:?}: {}", r.status, String::from_utf8_lossy(&r.stderr));
    let after = String::from_utf8(r.stdout).unwrap();
    assert_eq!(format!("{first}{after}"), expected, "stderr: {}", String::from_utf8_lossy(&r.stderr));
}
