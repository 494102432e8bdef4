//! End-to-end tests of `lwk run`: each program runs natively and under
//! `lwk run --` with the same arguments, stdin, cwd and environment, and
//! the two runs must agree byte for byte on stdout and stderr and on the
//! exit status (exit code, or the signal that ended the process).
//!
//! The C programs under tests/programs are compiled with gcc once per test
//! process into a temporary directory. Every file the tests make lives in a
//! temporary directory under cargo's target tmp dir, never directly in /tmp,
//! so that the tests do not disturb each other (`ls -la /` shows /tmp).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

const LWK: &str = env!("CARGO_BIN_EXE_lwk");
const PROGRAMS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/programs");
const TMP_ROOT: &str = env!("CARGO_TARGET_TMPDIR");
/// No single run of these tests takes more than a few seconds; a hang
/// must fail the test, not the whole CI run.
const TIMEOUT: Duration = Duration::from_secs(30);
const BUSYBOX: &str = "/bin/busybox";

// ---------------------------------------------------------------------------
// Running a program natively and under lwk
// ---------------------------------------------------------------------------

struct Output {
    status: ExitStatus,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

/// What both runs of a comparison share besides the command line.
#[derive(Default, Clone)]
struct Setup<'a> {
    stdin: Option<&'a [u8]>,
    cwd: Option<&'a Path>,
    env: Vec<(&'a str, &'a str)>,
    /// Options of `lwk run` before the `--`.
    lwk_opts: Vec<&'a str>,
}

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("lwk-e2e-").tempdir_in(TMP_ROOT).expect("creating a temp dir")
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

fn native_command(cmd: &[&str]) -> Command {
    let mut c = Command::new(cmd[0]);
    c.args(&cmd[1..]);
    c
}

fn lwk_command(cmd: &[&str], lwk_opts: &[&str]) -> Command {
    let mut c = Command::new(LWK);
    c.arg("run").args(lwk_opts).arg("--").args(cmd);
    c
}

fn apply(c: &mut Command, setup: &Setup) {
    if let Some(dir) = setup.cwd {
        c.current_dir(dir);
    }
    for (k, v) in &setup.env {
        c.env(k, v);
    }
    // No core files from the programs these tests kill, natively or not
    // (the same limit for both runs; lwk passes it on to the application).
    // SAFETY: setrlimit is async-signal-safe.
    unsafe {
        c.pre_exec(|| {
            let rl = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
            libc::setrlimit(libc::RLIMIT_CORE, &rl);
            Ok(())
        });
    }
}

/// Wait for `child` at most TIMEOUT; kill it after that (None).
fn wait_deadline(child: &mut Child) -> Option<ExitStatus> {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().expect("waiting for a child") {
            return Some(s);
        }
        if start.elapsed() > TIMEOUT {
            // lwk's proxy and application die with it (PR_SET_PDEATHSIG).
            child.kill().ok();
            child.wait().ok();
            return None;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The last few lines of an output, for a report.
fn tail(b: &[u8]) -> String {
    let text = String::from_utf8_lossy(b);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join("\n")
}

fn reader(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut v = Vec::new();
        r.read_to_end(&mut v).ok();
        v
    })
}

fn execute(mut c: Command, stdin: Option<&[u8]>, what: &str) -> Output {
    c.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = c.spawn().unwrap_or_else(|e| panic!("{what}: cannot start: {e}{}", install_hint(&c, &e)));
    let writer = stdin.map(|data| {
        let data = data.to_vec();
        let mut w = child.stdin.take().unwrap();
        // A program may exit without reading all its input: ignore EPIPE.
        std::thread::spawn(move || {
            w.write_all(&data).ok();
        })
    });
    let out = reader(child.stdout.take().unwrap());
    let err = reader(child.stderr.take().unwrap());
    let status = wait_deadline(&mut child);
    if let Some(w) = writer {
        w.join().unwrap();
    }
    let (stdout, stderr) = (out.join().unwrap(), err.join().unwrap());
    let Some(status) = status else {
        panic!(
            "{what}: still running after {TIMEOUT:?}, killed; last stdout:\n{}\nlast stderr:\n{}",
            tail(&stdout),
            tail(&stderr)
        );
    };
    Output { status, stdout, stderr }
}

/// For a program the tests need that is not there: the Debian package to
/// install, so that the failure says what to do.
fn install_hint(c: &Command, e: &std::io::Error) -> String {
    let name = Path::new(c.get_program()).file_name().and_then(|n| n.to_str()).unwrap_or("");
    let package = match name {
        "python3" => "python3",
        "make" => "make",
        "gcc" => "gcc",
        "busybox" => "busybox-static",
        _ => return String::new(),
    };
    if e.kind() != std::io::ErrorKind::NotFound {
        return String::new();
    }
    format!(" (install Debian's {package})")
}

fn run_native(cmd: &[&str], setup: &Setup) -> Output {
    let mut c = native_command(cmd);
    apply(&mut c, setup);
    execute(c, setup.stdin, &format!("native {cmd:?}"))
}

fn run_lwk(cmd: &[&str], setup: &Setup) -> Output {
    let mut c = lwk_command(cmd, &setup.lwk_opts);
    apply(&mut c, setup);
    execute(c, setup.stdin, &format!("lwk run {cmd:?}"))
}

fn describe(s: &ExitStatus) -> String {
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(sig)) => format!("signal {sig}"),
        _ => format!("{s:?}"),
    }
}

/// Exit statuses agree: same code, or same terminating signal. The raw
/// wait status is not compared: its core-dump bit depends on core limits.
fn same_status(a: &ExitStatus, b: &ExitStatus) -> bool {
    a.code() == b.code() && a.signal() == b.signal()
}

fn shorten(s: &[u8]) -> String {
    let t = String::from_utf8_lossy(s);
    let mut out: String = t.chars().take(200).collect();
    if t.chars().count() > 200 {
        out.push_str("...");
    }
    format!("{out:?}")
}

/// A readable account of how two byte streams differ, or None.
fn diff(what: &str, native: &[u8], lwk: &[u8]) -> Option<String> {
    if native == lwk {
        return None;
    }
    let offset = native.iter().zip(lwk).position(|(a, b)| a != b).unwrap_or(native.len().min(lwk.len()));
    let nl: Vec<&[u8]> = native.split(|&b| b == b'\n').collect();
    let ll: Vec<&[u8]> = lwk.split(|&b| b == b'\n').collect();
    let line = nl.iter().zip(&ll).position(|(a, b)| a != b).unwrap_or(nl.len().min(ll.len()));
    let get = |v: &Vec<&[u8]>, i: usize| v.get(i).map(|l| shorten(l)).unwrap_or_else(|| "<end of output>".into());
    let mut s = format!(
        "{what} differs: native {} bytes / {} lines, lwk {} bytes / {} lines; first difference at byte {offset}, line {}\n",
        native.len(),
        nl.len().saturating_sub(1),
        lwk.len(),
        ll.len().saturating_sub(1),
        line + 1
    );
    if line > 0 {
        s += &format!("  (line {} both: {})\n", line, get(&nl, line - 1));
    }
    s += &format!("  native: {}\n  lwk:    {}\n", get(&nl, line), get(&ll, line));
    Some(s)
}

/// The whole account of a mismatch between a native and an lwk run.
fn mismatch(cmd: &[&str], native: &Output, lwk: &Output) -> Option<String> {
    let mut problems = String::new();
    if !same_status(&native.status, &lwk.status) {
        problems += &format!("status differs: native {}, lwk {}\n", describe(&native.status), describe(&lwk.status));
    }
    if let Some(d) = diff("stdout", &native.stdout, &lwk.stdout) {
        problems += &d;
    }
    if let Some(d) = diff("stderr", &native.stderr, &lwk.stderr) {
        problems += &d;
    }
    if problems.is_empty() {
        return None;
    }
    if !lwk.stderr.is_empty() && lwk.stderr != native.stderr {
        problems += &format!("lwk's stderr:\n{}\n", String::from_utf8_lossy(&lwk.stderr[..lwk.stderr.len().min(2000)]));
    }
    Some(format!("{cmd:?} behaves differently under lwk:\n{problems}"))
}

/// Run `cmd` natively and under lwk with the same stdin; both must agree on
/// stdout, stderr and exit status. Returns the native run for further checks.
fn compare(cmd: &[&str], stdin: Option<&[u8]>) -> Output {
    compare_with(cmd, &Setup { stdin, ..Setup::default() })
}

fn compare_with(cmd: &[&str], setup: &Setup) -> Output {
    compare_filtered(cmd, setup, |b| b.to_vec())
}

/// As compare_with, but both runs' stdout and stderr pass through `filter`
/// first (for outputs that legitimately differ, e.g. by a pid).
fn compare_filtered(cmd: &[&str], setup: &Setup, filter: impl Fn(&[u8]) -> Vec<u8>) -> Output {
    let native = run_native(cmd, setup);
    let lwk = run_lwk(cmd, setup);
    let f = |o: Output| Output { status: o.status, stdout: filter(&o.stdout), stderr: filter(&o.stderr) };
    let (native, lwk) = (f(native), f(lwk));
    if let Some(m) = mismatch(cmd, &native, &lwk) {
        panic!("{m}");
    }
    native
}

fn assert_exit_code(o: &Output, code: i32) {
    assert_eq!(o.status.code(), Some(code), "expected exit code {code}, got {}", describe(&o.status));
}

fn assert_signal(o: &Output, sig: i32) {
    assert_eq!(o.status.signal(), Some(sig), "expected death by signal {sig}, got {}", describe(&o.status));
}

// ---------------------------------------------------------------------------
// Test programs
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Link {
    /// -static -no-pie: no interpreter, fixed addresses.
    Static,
    /// -pie -fPIE, dynamically linked: loaded with ld.so at a random base.
    Pie,
}

/// The directory of compiled test programs, removed when the test process
/// exits.
fn build_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::Builder::new().prefix("lwk-e2e-bin-").tempdir_in(TMP_ROOT).unwrap().keep();
        extern "C" fn cleanup() {
            if let Some(d) = DIR.get() {
                std::fs::remove_dir_all(d).ok();
            }
        }
        // SAFETY: registering a plain function to run at exit.
        unsafe { libc::atexit(cleanup) };
        dir
    })
}

/// tests/programs/NAME.c compiled (once per test process) as `link`.
fn program(name: &str, link: Link) -> String {
    type Cells = Mutex<HashMap<(String, Link), Arc<OnceLock<PathBuf>>>>;
    static BUILT: OnceLock<Cells> = OnceLock::new();
    let cell = BUILT.get_or_init(Default::default).lock().unwrap().entry((name.to_string(), link)).or_default().clone();
    let path = cell.get_or_init(|| {
        let src = Path::new(PROGRAMS).join(format!("{name}.c"));
        let out = build_dir().join(format!("{name}-{link:?}").to_lowercase());
        let flags: &[&str] = match link {
            Link::Static => &["-static", "-no-pie"],
            Link::Pie => &["-pie", "-fPIE"],
        };
        let openmp: &[&str] = if name == "openmp" { &["-fopenmp"] } else { &[] };
        let o = Command::new("gcc")
            .args(openmp)
            .args(["-O1", "-Wall", "-o"])
            .arg(&out)
            .arg(&src)
            .args(flags)
            .output()
            .unwrap_or_else(|e| panic!("cannot run gcc ({e}): install Debian's gcc and libc6-dev"));
        assert!(o.status.success(), "gcc {}: {}", src.display(), String::from_utf8_lossy(&o.stderr));
        out
    });
    path_str(path).to_string()
}

/// tests/programs/NAME copied into `dir` as an executable.
fn script(name: &str, dir: &Path) -> String {
    let dst = dir.join(name);
    std::fs::copy(Path::new(PROGRAMS).join(name), &dst).unwrap();
    std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o755)).unwrap();
    path_str(&dst).to_string()
}

fn write_executable(path: &Path, content: &[u8], mode: u32) {
    std::fs::write(path, content).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Deterministic pseudo-random bytes (xorshift64*).
fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        v.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Busybox can be installed: a test that needs it fails, naming the
/// package, rather than passing without testing anything.
fn require_busybox() {
    assert!(Path::new(BUSYBOX).exists(), "{BUSYBOX} is missing: install Debian's busybox-static");
}

// ---------------------------------------------------------------------------
// Simple programs
// ---------------------------------------------------------------------------

#[test]
fn true_matches_native() {
    let o = compare(&["true"], None);
    assert_exit_code(&o, 0);
}

#[test]
fn false_matches_native() {
    let o = compare(&["false"], None);
    assert_exit_code(&o, 1);
}

#[test]
fn echo_matches_native() {
    let o = compare(&["echo", "hello", "wörld", "", "  spaced  ", "-e", "a\\tb"], None);
    assert_exit_code(&o, 0);
    assert!(o.stdout.starts_with(b"hello w\xc3\xb6rld"));
}

#[test]
fn ls_la_root_matches_native() {
    // Two things in `ls -la /` legitimately differ between the runs:
    // * the link count of /proc is the number of processes on the system
    //   plus a constant, and under lwk two more processes are alive (the
    //   supervisor `lwk` and the proxy) besides the application; other
    //   processes (parallel tests) come and go too. That column of the proc
    //   line is masked, and since its width sets the width of the column in
    //   every line (e.g. 99 -> 101 processes), runs of spaces are collapsed.
    // * anything else on the machine (not these tests: their files are
    //   under target/) may touch a directory in / between the two runs,
    //   so a mismatch is retried once before it counts.
    fn mask_proc_links(b: &[u8]) -> Vec<u8> {
        let text = String::from_utf8_lossy(b);
        let mut out = String::new();
        for line in text.lines() {
            let mut f: Vec<&str> = line.split_whitespace().collect();
            if f.len() >= 9 && f[8] == "proc" {
                f[1] = "<links>";
            }
            out += &f.join(" ");
            out.push('\n');
        }
        out.into_bytes()
    }
    let result = std::panic::catch_unwind(|| compare_filtered(&["ls", "-la", "/"], &Setup::default(), mask_proc_links));
    let o = match result {
        Ok(o) => o,
        Err(_) => compare_filtered(&["ls", "-la", "/"], &Setup::default(), mask_proc_links),
    };
    assert_exit_code(&o, 0);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains(" etc\n") && text.contains(" <links> "), "unexpected ls output:\n{text}");
}

#[test]
fn cat_file_matches_native() {
    let dir = tempdir();
    let file = dir.path().join("text.txt");
    let mut content = String::new();
    for i in 0..20_000 {
        content += &format!("line {i}: the quick brown fox {}\n", i * 7919 % 1000);
    }
    std::fs::write(&file, &content).unwrap();
    let o = compare(&["cat", path_str(&file)], None);
    assert_exit_code(&o, 0);
    assert_eq!(o.stdout, content.as_bytes());
}

#[test]
fn sha256sum_of_64_mib_file_matches_native() {
    let dir = tempdir();
    let file = dir.path().join("big.bin");
    std::fs::write(&file, pseudo_random(64 << 20, 0x5eed)).unwrap();
    let o = compare(&["sha256sum", path_str(&file)], None);
    assert_exit_code(&o, 0);
    assert_eq!(o.stdout.len(), 64 + 2 + path_str(&file).len() + 1, "{}", String::from_utf8_lossy(&o.stdout));
}

#[test]
fn sort_10_mb_file_single_threaded_matches_native() {
    // GNU sort starts worker threads for large inputs (up to 8, or the
    // number of CPUs). Threads are not supported by the LWK yet: clone
    // returns ENOSYS, sort falls back to one thread, but the LWK's note
    // about the ENOSYS lands on stderr. --parallel=1 keeps sort
    // single-threaded so both runs do the same system calls.
    let dir = tempdir();
    let file = dir.path().join("lines.txt");
    let words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "", "Iota"];
    let rnd = pseudo_random(12 << 20, 42);
    let mut text = Vec::with_capacity(10 << 20);
    for chunk in rnd.chunks(8) {
        if text.len() >= 10 << 20 {
            break;
        }
        let w = words[chunk[0] as usize % words.len()];
        let n = u32::from_le_bytes([chunk[1], chunk[2], chunk[3], chunk[4]]);
        text.extend_from_slice(format!("{w} {n:x} {}\n", chunk[5] as u32 * chunk[6] as u32).as_bytes());
    }
    std::fs::write(&file, &text).unwrap();
    let o = compare(&["sort", "--parallel=1", path_str(&file)], None);
    assert_exit_code(&o, 0);
    assert_eq!(o.stdout.len(), text.len());
}

#[test]
fn python3_json_file_io_hashlib_matches_native() {
    // Both runs use the same directory; the script removes what it made,
    // so the second run starts from the same state as the first.
    let dir = tempdir();
    let code = r#"
import hashlib, json, os, sys
d = sys.argv[1]
data = {"name": "lwk", "numbers": list(range(50)), "nested": {"pi": 3.25, "ok": True, "none": None, "s": "h\u00e9"}}
text = json.dumps(data, sort_keys=True, indent=1)
path = os.path.join(d, "data.json")
with open(path, "w") as f:
    f.write(text)
with open(path) as f:
    back = json.load(f)
blob = bytes(range(256)) * 8192
bpath = os.path.join(d, "blob.bin")
with open(bpath, "wb") as f:
    f.write(blob)
with open(bpath, "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()
print(json.dumps({"roundtrip": back == data, "size": os.path.getsize(path), "sha256": digest,
                  "sha256_text": hashlib.sha256(text.encode()).hexdigest(), "files": sorted(os.listdir(d))},
                 sort_keys=True))
os.remove(path)
os.remove(bpath)
sys.stderr.write("done\n")
"#;
    let o = compare(&["/usr/bin/python3", "-c", code, path_str(dir.path())], None);
    assert_exit_code(&o, 0);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("python printed JSON");
    assert_eq!(v["roundtrip"], true);
    assert_eq!(v["files"], serde_json::json!(["blob.bin", "data.json"]));
    assert!(v["sha256"].as_str().is_some_and(|h| h.len() == 64), "{v}");
    assert_eq!(o.stderr, b"done\n");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn busybox_applets_match_native() {
    require_busybox();
    let dir = tempdir();
    // Files in a subdirectory: `ls -la` shows `..`, which must not be the
    // temp root that parallel tests add directories to.
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    let file = sub.join("words.txt");
    std::fs::write(&file, "one two three\nfour five\nsix\n").unwrap();
    std::fs::write(sub.join("empty"), "").unwrap();
    let f = path_str(&file);
    let cases: &[&[&str]] = &[
        &["echo", "hello", "from", "busybox"],
        &["wc", f],
        &["wc", "-l", f],
        &["sha1sum", f],
        &["md5sum", f],
        &["ls", "-la", path_str(&sub)],
        &["ls", "/"],
        &["seq", "1", "3", "100"],
        &["seq", "-s", ",", "10"],
        &["expr", "6", "*", "7"],
        &["expr", "length", "hello"],
        &["expr", "1", "=", "2"],
        &["cat", f],
        &["sort", "-r", f],
        &["head", "-n", "2", f],
        &["basename", "/a/b/c.txt", ".txt"],
        &["printf", "%05d|%s\\n", "42", "x"],
        &["cat", "/nonexistent-lwk-e2e"],
    ];
    for args in cases {
        let mut cmd = vec![BUSYBOX];
        cmd.extend_from_slice(args);
        let o = compare(&cmd, None);
        match args[0] {
            "expr" if args[2] == "=" => assert_exit_code(&o, 1),
            "cat" if args[1].starts_with("/nonexistent") => assert_exit_code(&o, 1),
            _ => assert_exit_code(&o, 0),
        }
    }
    // An applet that reads stdin.
    let o = compare(&[BUSYBOX, "tr", "a-z", "A-Z"], Some(b"shout this\n"));
    assert_eq!(o.stdout, b"SHOUT THIS\n");
}

// ---------------------------------------------------------------------------
// C programs, static and dynamic
// ---------------------------------------------------------------------------

fn args_malloc_case(link: Link, lwk_opts: Vec<&str>) {
    let prog = program("args_malloc", link);
    let setup = Setup { env: vec![("LWK_TEST_VAR", "value with spaces=and=equals")], lwk_opts, ..Setup::default() };
    let o = compare_with(&[&prog, "first", "", "third arg", "-x", "--", "ünï"], &setup);
    assert_exit_code(&o, 0);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.starts_with("argc=7\n"), "{text}");
    assert!(text.contains("LWK_TEST_VAR=value with spaces=and=equals\n"), "{text}");
    assert!(text.contains("malloc(34603008) ok\n") && text.contains("realloc grew to 67108864\n"), "{text}");
}

#[test]
fn static_c_program_args_env_malloc_matches_native() {
    args_malloc_case(Link::Static, vec![]);
}

#[test]
fn pie_c_program_args_env_malloc_matches_native() {
    args_malloc_case(Link::Pie, vec![]);
}

#[test]
fn pie_c_program_with_4k_pages_only_matches_native() {
    args_malloc_case(Link::Pie, vec!["--hugepages", "none"]);
}

#[test]
fn wc_c_reads_stdin_matches_native() {
    let input = pseudo_random(300_000, 7);
    let o = compare(&["wc", "-c"], Some(&input));
    assert_exit_code(&o, 0);
    assert_eq!(o.stdout, b"300000\n");
}

#[test]
fn c_program_summing_stdin_matches_native() {
    let mut input = String::new();
    let mut expect = 0i64;
    for i in 0..50_000i64 {
        let v = (i * 7919) % 100_003 - 50_000;
        expect += v;
        input += &format!("{v}{}", if i % 10 == 9 { "\n" } else { " " });
    }
    for link in [Link::Static, Link::Pie] {
        let o = compare(&[&program("sum_stdin", link)], Some(input.as_bytes()));
        assert_exit_code(&o, 0);
        assert_eq!(String::from_utf8_lossy(&o.stdout), format!("count=50000 sum={expect}\n"));
    }
}

#[test]
fn sigsegv_kills_both_with_signal_11() {
    for link in [Link::Static, Link::Pie] {
        let o = compare(&[&program("exits", link), "segv"], None);
        assert_signal(&o, libc::SIGSEGV);
        assert_eq!(o.stdout, b"ending with segv\n");
    }
}

#[test]
fn exit_code_42_matches_native() {
    for link in [Link::Static, Link::Pie] {
        let o = compare(&[&program("exits", link), "ret42"], None);
        assert_exit_code(&o, 42);
    }
}

#[test]
fn underscore_exit_255_matches_native() {
    for link in [Link::Static, Link::Pie] {
        let o = compare(&[&program("exits", link), "exit255"], None);
        assert_exit_code(&o, 255);
    }
}

#[test]
fn abort_kills_both_with_sigabrt() {
    for link in [Link::Static, Link::Pie] {
        let o = compare(&[&program("exits", link), "abort"], None);
        assert_signal(&o, libc::SIGABRT);
    }
}

// The bad addresses (see bad_pointers.c) include the places where lwk keeps
// its own things in the upper half of the user address space, mapped in the
// application process and in the proxy but not in a native process: the LWK
// image (0x6f0000000000), the control region (0x6e0000000000) and the
// scratch window (0x6d0000000000).

fn has_line(text: &str, line: &str) -> bool {
    text.lines().any(|l| l == line)
}

/// Bad pointers outside the LWK's own memory: the same errnos as natively
/// on any machine.
fn outside_lwk() -> Setup<'static> {
    Setup { env: vec![("BAD_POINTERS_OUTSIDE_LWK", "1")], ..Setup::default() }
}

fn bad_pointers_delegated(setup: &Setup) -> String {
    let dir = tempdir();
    let file = dir.path().join("readable");
    std::fs::write(&file, "0123456789abcdef0123456789abcdef").unwrap();
    let mut out = String::new();
    for link in [Link::Static, Link::Pie] {
        let o = compare_with(&[&program("bad_pointers", link), "delegated", path_str(&file)], setup);
        assert_exit_code(&o, 0);
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(has_line(&text, "read              NULL                       -> -1 EFAULT"), "{text}");
        assert!(has_line(&text, "open              kernel 0xffff800000000000  -> -1 EFAULT"), "{text}");
        out = text.into_owned();
    }
    out
}

fn bad_pointers_local(setup: &Setup) -> String {
    let mut out = String::new();
    for link in [Link::Static, Link::Pie] {
        let o = compare_with(&[&program("bad_pointers", link), "local"], setup);
        assert_exit_code(&o, 0);
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(has_line(&text, "clock_gettime     NULL                       -> -1 EFAULT"), "{text}");
        out = text.into_owned();
    }
    out
}

#[test]
fn bad_pointers_to_delegated_calls_give_native_errnos() {
    let text = bad_pointers_delegated(&outside_lwk());
    assert!(text.lines().count() > 100 && !text.contains("0x6e0000000000"), "{text}");
}

#[test]
fn bad_pointers_to_local_calls_give_native_errnos() {
    let text = bad_pointers_local(&outside_lwk());
    assert!(text.lines().count() > 130 && !text.contains("0x6e0000000000"), "{text}");
}

/// Only memory protection keys let lwk answer EFAULT for a pointer into its
/// own memory (README, "Bad pointers"); without them (no pku in
/// /proc/cpuinfo) this test fails at once saying so, and `.ci/run` leaves
/// it out with a line that says why.
fn require_pku() {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags = cpuinfo.lines().find(|l| l.starts_with("flags")).unwrap_or("");
    assert!(
        flags.split_whitespace().any(|f| f == "pku"),
        "this CPU has no memory protection keys (no pku in /proc/cpuinfo): lwk cannot make pointers into its \
         own memory give EFAULT"
    );
}

#[test]
#[ignore = "needs memory protection keys (pku in /proc/cpuinfo)"]
fn bad_pointers_into_the_lwks_memory_give_native_errnos() {
    require_pku();
    let text = bad_pointers_delegated(&Setup::default());
    assert!(has_line(&text, "writev            0x6e0000000000             -> -1 EFAULT"), "{text}");
    assert!(text.lines().count() > 150, "{text}");
    let text = bad_pointers_local(&Setup::default());
    assert!(has_line(&text, "clock_gettime     0x6e0000000000             -> -1 EFAULT"), "{text}");
    assert!(text.lines().count() > 200, "{text}");
}

// ---------------------------------------------------------------------------
// Scripts
// ---------------------------------------------------------------------------

#[test]
fn shebang_sh_script_matches_native() {
    let dir = tempdir();
    let s = script("shebang.sh", dir.path());
    let setup =
        Setup { stdin: Some(b"first line\nsecond\n\nlast without newline"), cwd: Some(dir.path()), ..Setup::default() };
    let o = compare_with(&[&s, "a b", "", "c"], &setup);
    assert_exit_code(&o, 7);
    assert!(String::from_utf8_lossy(&o.stdout).contains("read 3 lines"));
    // Also started by a relative path from its directory.
    compare_with(&["./shebang.sh", "x"], &setup);
}

#[test]
fn shebang_sh_with_interpreter_argument_matches_native() {
    let dir = tempdir();
    let s = script("shebang_e.sh", dir.path());
    let o = compare(&[&s], None);
    assert_exit_code(&o, 1);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("step 3") && !text.contains("not reached"), "{text}");
}

#[test]
fn shebang_python_script_matches_native() {
    // #!/usr/bin/env python3 would need env to exec python3, and execve is
    // not supported by the LWK yet: the interpreter is named directly.
    let dir = tempdir();
    let s = dir.path().join("script.py");
    write_executable(
        &s,
        b"#!/usr/bin/python3\nimport sys, json\nprint(json.dumps({'argv': sys.argv[1:], 'stdin': sys.stdin.read()}))\nsys.exit(3)\n",
        0o755,
    );
    let o = compare(&[path_str(&s), "one", "two words"], Some(b"input\n"));
    assert_exit_code(&o, 3);
    assert_eq!(o.stdout, b"{\"argv\": [\"one\", \"two words\"], \"stdin\": \"input\\n\"}\n");
}

// ---------------------------------------------------------------------------
// Programs lwk cannot start: the status a shell gives, one line naming it
// ---------------------------------------------------------------------------

/// `sh -c '"$0"' PROG`: how a shell starts PROG.
fn run_via_sh(prog: &str) -> Output {
    run_native(&["sh", "-c", "\"$0\"", prog], &Setup::default())
}

/// lwk's status must be `status`, as is the shell's when `shell_agrees`;
/// its stderr one line naming the program. The message text is lwk's own.
fn check_not_runnable(prog: &str, status: i32, shell_agrees: bool) -> String {
    let lwk = run_lwk(&[prog], &Setup::default());
    assert_exit_code(&lwk, status);
    if shell_agrees {
        let sh = run_via_sh(prog);
        assert!(same_status(&sh.status, &lwk.status), "sh: {}, lwk: {}", describe(&sh.status), describe(&lwk.status));
    }
    assert!(lwk.stdout.is_empty());
    let err = String::from_utf8(lwk.stderr).unwrap();
    assert!(err.ends_with('\n') && err.lines().count() == 1, "not one line: {err:?}");
    assert!(err.contains(prog), "message does not name {prog}: {err:?}");
    err
}

#[test]
fn missing_program_exits_127_like_sh() {
    let dir = tempdir();
    let missing = dir.path().join("no-such-program");
    check_not_runnable(path_str(&missing), 127, true);
    check_not_runnable("lwk-e2e-no-such-command-anywhere", 127, true);
}

#[test]
fn non_executable_file_exits_126_like_sh() {
    let dir = tempdir();
    let f = dir.path().join("not-executable");
    write_executable(&f, b"#!/bin/sh\necho should not run\n", 0o644);
    check_not_runnable(path_str(&f), 126, true);
}

#[test]
fn non_elf_binary_without_shebang_exits_126_like_sh() {
    let dir = tempdir();
    let f = dir.path().join("garbage");
    write_executable(&f, b"GARBAGE\0\x01\x02\x03 not a program\n", 0o755);
    check_not_runnable(path_str(&f), 126, true);
}

#[test]
fn non_elf_text_without_shebang_exits_126_like_execve() {
    // A shell (and execvp) runs a text file without #! as a shell script
    // when execve fails with ENOEXEC; lwk, like execve itself, does not.
    let dir = tempdir();
    let f = dir.path().join("text-no-shebang");
    write_executable(&f, b"echo this is not a program\n", 0o755);
    let e = Command::new(&f).spawn().map(|mut c| c.wait()).expect_err("execve of a text file must fail");
    assert_eq!(e.raw_os_error(), Some(libc::ENOEXEC));
    check_not_runnable(path_str(&f), 126, false);
}

#[test]
fn elf32_exits_126_with_32_bit_message() {
    // gcc -m32 needs multilib; an ELFCLASS32 i386 header made by hand.
    let mut h = Vec::new();
    h.extend_from_slice(b"\x7fELF");
    h.extend_from_slice(&[1, 1, 1, 0]); // ELFCLASS32, little endian, version 1, SYSV
    h.extend_from_slice(&[0; 8]);
    for half in [2u16, 3] {
        h.extend_from_slice(&half.to_le_bytes()); // ET_EXEC, EM_386
    }
    for word in [1u32, 0x0804_8000, 52, 0, 0] {
        h.extend_from_slice(&word.to_le_bytes()); // version, entry, phoff, shoff, flags
    }
    for half in [52u16, 32, 0, 40, 0, 0] {
        h.extend_from_slice(&half.to_le_bytes()); // ehsize, phentsize, phnum, shentsize, shnum, shstrndx
    }
    assert_eq!(h.len(), 52);
    let dir = tempdir();
    let f = dir.path().join("elf32");
    write_executable(&f, &h, 0o755);
    let err = check_not_runnable(path_str(&f), 126, true);
    assert!(err.contains("32-bit"), "{err:?}");
}

#[test]
fn directory_exits_126_like_sh() {
    let dir = tempdir();
    check_not_runnable(path_str(dir.path()), 126, true);
}

// ---------------------------------------------------------------------------
// Pipes and signals
// ---------------------------------------------------------------------------

/// Start `cmd` with stdout a pipe, read a little, close the read end: the
/// next write must kill the program with SIGPIPE.
fn closed_pipe_status(mut c: Command, what: &str) -> ExitStatus {
    c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut buf = [0u8; 64];
    out.read_exact(&mut buf).unwrap();
    assert!(buf.starts_with(b"y\ny\n"), "{what}: {:?}", String::from_utf8_lossy(&buf));
    drop(out);
    let err = reader(child.stderr.take().unwrap());
    let status = wait_deadline(&mut child).unwrap_or_else(|| panic!("{what}: still running after {TIMEOUT:?}, killed"));
    let err = err.join().unwrap();
    assert!(err.is_empty(), "{what} stderr: {}", String::from_utf8_lossy(&err));
    status
}

#[test]
fn writing_to_closed_pipe_dies_of_sigpipe() {
    // The test harness ignores SIGPIPE; Command restores the default
    // disposition in the children, as a shell would have it.
    let native = closed_pipe_status(native_command(&["yes"]), "native yes");
    let lwk = closed_pipe_status(lwk_command(&["yes"], &[]), "lwk run yes");
    assert_eq!(native.signal(), Some(libc::SIGPIPE), "native: {}", describe(&native));
    assert_eq!(lwk.signal(), Some(libc::SIGPIPE), "lwk: {}", describe(&lwk));
}

// ---------------------------------------------------------------------------
// Memory: file mappings, mremap, mprotect, munmap, brk
// ---------------------------------------------------------------------------

fn mapped_file_content() -> Vec<u8> {
    let mut v = Vec::new();
    let mut i = 0;
    while v.len() < 5 * 4096 + 123 {
        v.extend_from_slice(format!("record {i:06} of the mapped file\n").as_bytes());
        i += 1;
    }
    v
}

/// What mmap_file writes through its mapping, applied to `v`.
fn as_mapped_writes(v: &[u8]) -> Vec<u8> {
    let mut w = v.to_vec();
    for i in (0..w.len()).step_by(4096) {
        w[i] = b'A' + ((i / 4096) % 26) as u8;
    }
    w[1..7].copy_from_slice(b"MAPPED");
    w
}

#[test]
fn mmap_shared_file_writes_reach_the_file() {
    let content = mapped_file_content();
    let dir = tempdir();
    let (fnat, flwk) = (dir.path().join("native.dat"), dir.path().join("lwk.dat"));
    std::fs::write(&fnat, &content).unwrap();
    std::fs::write(&flwk, &content).unwrap();
    let prog = program("mmap_file", Link::Pie);
    let native = run_native(&[&prog, "shared", path_str(&fnat)], &Setup::default());
    let lwk = run_lwk(&[&prog, "shared", path_str(&flwk)], &Setup::default());
    if let Some(m) = mismatch(&[&prog, "shared", "FILE"], &native, &lwk) {
        panic!("{m}");
    }
    assert_exit_code(&lwk, 0);
    let expect = as_mapped_writes(&content);
    assert_eq!(std::fs::read(&fnat).unwrap(), expect, "native file after MAP_SHARED writes");
    if let Some(d) = diff("file after MAP_SHARED writes", &expect, &std::fs::read(&flwk).unwrap()) {
        panic!("{d}");
    }
}

#[test]
fn mmap_private_file_writes_stay_private() {
    let content = mapped_file_content();
    let dir = tempdir();
    let file = dir.path().join("private.dat");
    std::fs::write(&file, &content).unwrap();
    // The file is read-only for the program: MAP_PRIVATE does not need more.
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o444)).unwrap();
    for link in [Link::Static, Link::Pie] {
        let o = compare(&[&program("mmap_file", link), "private", path_str(&file)], None);
        assert_exit_code(&o, 0);
        assert!(String::from_utf8_lossy(&o.stdout).contains("after: AMAPPED"));
        if let Some(d) = diff("file after MAP_PRIVATE writes", &content, &std::fs::read(&file).unwrap()) {
            panic!("{d}");
        }
    }
}

#[test]
fn mremap_mprotect_munmap_brk_match_native() {
    for link in [Link::Static, Link::Pie] {
        let o = compare(&[&program("vm_ops", link)], None);
        assert_exit_code(&o, 0);
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(!text.contains(": no") && !text.contains("wrong"), "natively already wrong:\n{text}");
        assert!(text.contains("munmap middle=0 pages around kept: yes"), "{text}");
        assert!(text.contains("sbrk back at start: yes"), "{text}");
    }
}

// ---------------------------------------------------------------------------
// lwk's own commands and options
// ---------------------------------------------------------------------------

fn lwk_output(args: &[&str]) -> Output {
    let mut c = Command::new(LWK);
    c.args(args);
    execute(c, None, &format!("lwk {args:?}"))
}

#[test]
fn stats_prints_table_on_stderr() {
    let o = lwk_output(&["run", "--stats", "--", "true"]);
    assert_exit_code(&o, 0);
    assert!(o.stdout.is_empty());
    let err = String::from_utf8(o.stderr).unwrap();
    assert!(err.starts_with("lwk: ") && err.contains(" system calls ("), "{err}");
    let header = err.lines().nth(1).unwrap_or("");
    assert!(header.starts_with("syscall") && header.contains("where") && header.contains("count"), "{err}");
    assert!(err.lines().any(|l| l.starts_with("mmap ") && l.contains(" local ")), "{err}");
    assert!(err.lines().any(|l| l.starts_with("read ") && l.contains(" delegated ")), "{err}");
}

#[test]
fn stats_table_names_exit_group() {
    let o = lwk_output(&["run", "--stats", "--", "true"]);
    assert_exit_code(&o, 0);
    let err = String::from_utf8(o.stderr).unwrap();
    assert!(err.lines().any(|l| l.starts_with("exit_group ") && l.contains(" local ")), "{err}");
}

#[test]
fn stats_json_file_has_syscalls_with_positive_counts() {
    let dir = tempdir();
    let file = dir.path().join("stats.json");
    let o = lwk_output(&["run", "--stats-json", path_str(&file), "--", "true"]);
    assert_exit_code(&o, 0);
    assert!(o.stderr.is_empty(), "--stats-json alone prints nothing: {}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).expect("stats file is JSON");
    assert_eq!(v["exit_code"], 0);
    let rows = v["syscalls"].as_array().expect("a syscalls array");
    assert!(!rows.is_empty());
    let mut total = 0;
    for r in rows {
        let count = r["count"].as_u64().unwrap_or(0);
        assert!(count > 0, "{r}");
        assert!(r["name"].is_string() && (r["where"] == "local" || r["where"] == "delegated"), "{r}");
        total += count;
    }
    assert_eq!(v["syscalls_total"].as_u64(), Some(total));
    assert!(rows.iter().any(|r| r["name"] == "mmap"));
}

#[test]
fn exit_status_of_a_killed_program_is_reported_in_stats_json() {
    let dir = tempdir();
    let file = dir.path().join("stats.json");
    let prog = program("exits", Link::Static);
    let mut c = Command::new(LWK);
    c.args(["run", "--stats-json", path_str(&file), "--", &prog, "segv"]);
    apply(&mut c, &Setup::default());
    let o = execute(c, None, "lwk run --stats-json exits segv");
    assert_signal(&o, libc::SIGSEGV);
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(v["exit_signal"], libc::SIGSEGV);
    assert!(v["exit_code"].is_null());
}

// ---------------------------------------------------------------------------
// The delegation channel
// ---------------------------------------------------------------------------

/// Delegated calls separated by pauses around the proxy's spin budget, with
/// budgets that make it fall asleep all the time: every wait and wake-up
/// path of the channel, many times. A lost wake-up shows as a hang (the
/// harness's timeout). A proxy that re-read the futex word before sleeping
/// once hung sha256sum in the benchmarks this way.
#[test]
fn delegation_channel_survives_sleeping_sides() {
    for spin in ["0", "3000", "20000"] {
        let setup = Setup { env: vec![("LWK_SPIN_CYCLES", spin)], ..Setup::default() };
        let o = compare_with(&[&program("delegate_stress", Link::Static), "30000"], &setup);
        assert_exit_code(&o, 0);
        assert!(String::from_utf8_lossy(&o.stdout).starts_with("calls=30000 sum="));
    }
}

#[test]
fn fork_gives_the_child_its_own_memory_and_the_parent_its_status() {
    for link in [Link::Static, Link::Pie] {
        let o = compare(&[&program("fork", link)], None);
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(has_line(&out, "parent g=5 heap=parent data child exit=3"), "{out}");
    }
}

#[test]
fn shells_pipelines_and_subprocesses_match_native() {
    compare(&["bash", "-c", "ls / | wc -l; echo x | cat; (echo sub) ; /bin/echo done"], None);
    compare(&["/bin/sh", "-c", "for i in 1 2 3; do echo $i; done | sort -r | head -2"], None);
    let py = "import subprocess; print(subprocess.run(['echo', 'hi'], capture_output=True).stdout); \
              print(subprocess.check_output('ls /usr | head -3', shell=True))";
    compare(&["/usr/bin/python3", "-c", py], None);
}

// ---------------------------------------------------------------------------
// Threads
// ---------------------------------------------------------------------------

#[test]
fn pthread_stress_with_mutex_and_condvar_matches_native() {
    for link in [Link::Static, Link::Pie] {
        let o = compare(&[&program("threads", link), "stress"], None);
        assert_exit_code(&o, 0);
        assert!(String::from_utf8_lossy(&o.stdout).starts_with("counter=4500000 joined=140 turns="));
    }
}

#[test]
fn a_thread_blocked_in_a_delegated_call_does_not_block_the_others() {
    let o = compare(&[&program("threads", Link::Pie), "blocking"], None);
    assert_exit_code(&o, 0);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(has_line(&out, "reader got 5 bytes: hello"), "{out}");
    assert!(has_line(&out, "main made 2000 calls while the reader was blocked"), "{out}");
}

#[test]
fn sigsegv_in_one_thread_kills_the_process_as_natively() {
    let o = compare(&[&program("threads", Link::Static), "segv"], None);
    assert_signal(&o, 11);
}

#[test]
fn gnu_sort_with_threads_matches_native() {
    let dir = tempdir();
    let input = dir.path().join("in.txt");
    let mut text = String::new();
    let mut x: u64 = 88172645463325252;
    for _ in 0..300_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        text.push_str(&format!("{}\n", x % 1_000_000_007));
    }
    std::fs::write(&input, text).unwrap();
    compare(&["sort", "--parallel=4", "-S", "64M", path_str(&input)], None);
}

// ---------------------------------------------------------------------------
// execve
// ---------------------------------------------------------------------------

#[test]
fn execve_keeps_fds_but_closes_close_on_exec_ones() {
    let dir = tempdir();
    let file = dir.path().join("data");
    std::fs::write(&file, "xyz").unwrap();
    for link in [Link::Static, Link::Pie] {
        let o = compare(&[&program("exec", link), "fds", path_str(&file)], None);
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(has_line(&out, "close-on-exec fd closed") && has_line(&out, "kept fd reads 'y' at offset 1"), "{out}");
    }
}

#[test]
fn execve_keeps_the_signal_mask() {
    let o = compare(&[&program("exec", Link::Pie), "mask"], None);
    assert!(has_line(&String::from_utf8_lossy(&o.stdout), "SIGUSR1 blocked, SIGUSR2 not blocked after exec"));
}

#[test]
fn failing_execve_returns_the_native_errors_and_the_program_goes_on() {
    let dir = tempdir();
    std::fs::write(dir.path().join("not-executable"), "#!/bin/sh\n").unwrap();
    std::fs::write(dir.path().join("not-elf"), "just text\n").unwrap();
    std::fs::set_permissions(dir.path().join("not-elf"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::create_dir(dir.path().join("directory")).unwrap();
    let o = compare(&[&program("exec", Link::Static), "errors", path_str(dir.path())], None);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(has_line(&out, "still running"), "{out}");
    assert!(out.contains("missing                      -> -1 ENOENT"), "{out}");
}

#[test]
fn execve_of_a_relative_path_follows_the_applications_cwd() {
    let dir = tempdir();
    std::fs::copy(program("exec", Link::Pie), dir.path().join("prog")).unwrap();
    let o = compare(&[&program("exec", Link::Pie), "relative", path_str(dir.path())], None);
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("running as ./prog"));
}

#[test]
fn execve_of_scripts_and_programs_through_env_and_sh() {
    compare(&["/usr/bin/env", "echo", "through", "env"], None);
    compare(&["/bin/sh", "-c", "exec ls -d /usr /nonexistent"], None);
    compare(&[&program("exec", Link::Static), "argv0"], None);
    compare(&["/usr/bin/python3", "-c", "import os; os.execv('/bin/echo', ['echo', 'from', 'python'])"], None);
}

// ---------------------------------------------------------------------------
// Signals and blocking delegated calls; build tools
// ---------------------------------------------------------------------------

#[test]
fn a_signal_interrupts_a_blocked_delegated_read_as_natively() {
    let prog = program("signals", Link::Pie);
    let o = compare(&[&prog, "alarm-eintr"], None);
    assert!(has_line(&String::from_utf8_lossy(&o.stdout), "read -> -1 EINTR, handler ran 1 time(s), data ''"));
    let o = compare(&[&prog, "alarm-restart"], None);
    assert!(has_line(&String::from_utf8_lossy(&o.stdout), "read -> 4 , handler ran 1 time(s), data 'late'"));
    let o = compare(&[&prog, "pselect"], None);
    assert!(has_line(&String::from_utf8_lossy(&o.stdout), "pselect -> -1 EINTR, handler ran 1 time(s)"));
}

#[test]
fn vfork_shares_memory_until_exec_and_keeps_the_parents_stack() {
    for link in [Link::Pie, Link::Static] {
        let o = compare(&[&program("vfork", link)], None);
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(has_line(&out, "vfork+_exit: status 7, child's write seen: 42"), "{out}");
        assert!(has_line(&out, "vfork+failed exec: status 127, shared -1"), "{out}");
        assert!(has_line(&out, "20 vforks beside a busy thread done"), "{out}");
        assert!(has_line(&out, "posix_spawn a b"), "{out}");
    }
}

#[test]
fn signalfd_reads_polls_and_blocks_as_natively() {
    for link in [Link::Pie, Link::Static] {
        let o = compare(&[&program("signalfd", link)], None);
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(has_line(&out, "poll after kill: 1 revents POLLIN"), "{out}");
        assert!(has_line(&out, "epoll_wait: 1 data 7"), "{out}");
        assert!(has_line(&out, "read: 128 signo User defined signal 2 from-child 1"), "{out}");
        assert!(has_line(&out, "blocking read: 128 signo User defined signal 1"), "{out}");
        assert!(has_line(&out, "interrupted read: -1 Interrupted system call"), "{out}");
    }
}

#[test]
fn make_j2_builds_a_small_c_project_as_natively() {
    let dir = tempdir();
    for i in 1..=6 {
        std::fs::write(dir.path().join(format!("f{i}.c")), format!("int f{i}(int x) {{ return x * {i}; }}\n")).unwrap();
    }
    std::fs::write(
        dir.path().join("main.c"),
        "#include <stdio.h>\nint f1(int), f2(int), f3(int), f4(int), f5(int), f6(int);\n\
         int main(void) { printf(\"%d\\n\", f1(1) + f2(2) + f3(3) + f4(4) + f5(5) + f6(6)); return 0; }\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("Makefile"),
        "OBJS = main.o f1.o f2.o f3.o f4.o f5.o f6.o\nprog: $(OBJS)\n\tgcc -o $@ $(OBJS)\n\
         %.o: %.c\n\tgcc -O1 -c $< -o $@\nclean:\n\trm -f *.o prog\n",
    )
    .unwrap();
    // Native first, then lwk from a clean tree; the outputs of make and of
    // the program it built must be the same.
    let setup = Setup { cwd: Some(dir.path()), ..Setup::default() };
    let native = run_native(&["make", "-s", "-j2"], &setup);
    run_native(&["make", "-s", "clean"], &setup);
    let lwk = run_lwk(&["make", "-s", "-j2"], &setup);
    assert_eq!((native.status.code(), &native.stdout), (lwk.status.code(), &lwk.stdout));
    let out = run_native(&["./prog"], &setup);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "91\n");
}

#[test]
fn proc_self_names_the_application_not_the_proxy_or_the_lwk() {
    let py = "import os\n\
              print(os.readlink('/proc/self/exe'), os.path.realpath('/proc/self/exe'))\n\
              print(open('/proc/self/comm').read().strip(), open('/proc/thread-self/comm').read().strip())\n\
              print(sorted(os.listdir('/proc/self/fd')))\n\
              print(open('/proc/self/stat').read().split()[0] == str(os.getpid()))";
    let o = compare(&["/usr/bin/python3", "-c", py], None);
    assert!(String::from_utf8_lossy(&o.stdout).ends_with("True\n"));
}

#[test]
fn openmp_with_four_threads_matches_native() {
    let o = compare(&[&program("openmp", Link::Pie)], None);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "threads=4 sum=59999997\n");
}

#[test]
fn shared_anonymous_memory_stays_shared_across_fork() {
    for link in [Link::Static, Link::Pie] {
        let o = compare(&[&program("shared_anon", link)], None);
        assert_eq!(String::from_utf8_lossy(&o.stdout), "shared=42 private=1\n");
    }
    let py = "import multiprocessing as mp\n\
              def work(v, l):\n    with l: v.value += 5\n\
              if __name__ == '__main__':\n\
              \x20   v = mp.Value('i', 1); l = mp.Lock()\n\
              \x20   ps = [mp.Process(target=work, args=(v, l)) for _ in range(3)]\n\
              \x20   [p.start() for p in ps]; [p.join() for p in ps]\n\
              \x20   print('value', v.value)";
    let o = compare(&["/usr/bin/python3", "-c", py], None);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "value 16\n");
}

// ---------------------------------------------------------------------------
// Running in a partition (root: creates and destroys its own partitions)
// ---------------------------------------------------------------------------

/// A partition made for one test, destroyed when dropped (also on panic).
struct TestPartition(String);

/// One partition test at a time: they all want the last CPU.
static PARTITION_TESTS: Mutex<()> = Mutex::new(());

impl TestPartition {
    fn create(tag: &str, cpu: usize, mem: &str, pages: &str) -> TestPartition {
        let name = format!("e2e-{tag}-{}", std::process::id());
        let out = Command::new(LWK)
            .args(["partition", "create", &name, "--cpus", &cpu.to_string(), "--mem", mem, "--hugepages", pages])
            .output()
            .unwrap();
        assert!(out.status.success(), "partition create: {}", String::from_utf8_lossy(&out.stderr));
        TestPartition(name)
    }
}

impl Drop for TestPartition {
    fn drop(&mut self) {
        // Not --force: a run still holding it would be a bug to see here.
        let out = Command::new(LWK).args(["partition", "destroy", &self.0]).output().unwrap();
        assert!(out.status.success(), "partition destroy: {}", String::from_utf8_lossy(&out.stderr));
    }
}

/// For a test that makes partitions (`#[ignore]`d: they need root and a CPU
/// besides the one Linux keeps): the CPU to give them (the last online one)
/// and the turn to use it. Run without root or with one CPU, the test fails
/// here. The turn comes first: while another test's partition exists, this
/// process runs on Linux's CPUs only, so its own affinity would hide a CPU.
fn partition_cpu() -> (usize, std::sync::MutexGuard<'static, ()>) {
    let turn = PARTITION_TESTS.lock().unwrap_or_else(|e| e.into_inner());
    let online = std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap();
    let online = lwk_partition::parse_cpu_list(&online).unwrap();
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    assert!(
        uid == 0 && online.len() >= 2,
        "partitions need root and a second online CPU: this is uid {uid}, online CPUs {online:?}"
    );
    (*online.last().unwrap(), turn)
}

fn run_in(part: &TestPartition, extra: &[&str], cmd: &[&str]) -> Output {
    let mut opts = vec!["--partition", part.0.as_str()];
    opts.extend_from_slice(extra);
    run_lwk(cmd, &Setup { stdin: None, cwd: None, env: vec![], lwk_opts: opts })
}

#[test]
#[ignore = "needs root, a second CPU and a cpuset cgroup"]
fn run_in_a_partition_pins_threads_to_its_cpu_and_takes_its_memory() {
    let (cpu, _turn) = partition_cpu();
    let prog = program("where", Link::Pie);
    let stats = tempdir();
    for pages in ["2M", "none"] {
        let part = TestPartition::create(&format!("run{pages}"), cpu, "64M", pages);
        let json = stats.path().join(format!("{pages}.json"));
        let o = run_in(&part, &["--stats-json", path_str(&json)], &[&prog, "16"]);
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "{pages}: {}\n{out}", String::from_utf8_lossy(&o.stderr));
        for line in [format!("main on cpu {cpu}"), format!("thread on cpu {cpu}"), format!("allowed {cpu}")] {
            assert!(has_line(&out, &line), "{pages}: no '{line}' in:\n{out}");
        }
        assert!(has_line(&out, "touched 16 MiB"), "{out}");
        let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
        let huge = report["memory_huge_peak_bytes"].as_u64().unwrap();
        assert_eq!(huge > 0, pages == "2M", "{pages}: memory on 2 MiB pages: {report}");

        // More than the partition holds: ENOMEM to the program, one line
        // from the LWK saying why, nothing else broken.
        let o = run_in(&part, &[], &[&prog, "200"]);
        assert_eq!(o.status.code(), Some(1), "{pages}: {}", String::from_utf8_lossy(&o.stderr));
        assert!(has_line(&String::from_utf8_lossy(&o.stdout), "no memory for 200 MiB"));
        assert!(String::from_utf8_lossy(&o.stderr).contains("partition's memory is used up"));

        let log = Command::new(LWK).args(["partition", "log", &part.0]).output().unwrap();
        let log = String::from_utf8_lossy(&log.stdout);
        assert!(log.lines().any(|l| l.contains(" started ") && l.contains("where")), "{log}");
        assert!(log.lines().any(|l| l.contains(" exited ") && l.ends_with("status 1")), "{log}");
    }
}

#[test]
fn run_in_a_missing_partition_fails_clearly() {
    let o = run_lwk(
        &["/bin/true"],
        &Setup { stdin: None, cwd: None, env: vec![], lwk_opts: vec!["--partition", "e2e-no-such"] },
    );
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no partition e2e-no-such"), "{}", shorten(&o.stderr));
}

#[test]
#[ignore = "needs root, a second CPU and a cpuset cgroup"]
fn run_in_a_busy_partition_fails_clearly() {
    let (cpu, _turn) = partition_cpu();
    let part = TestPartition::create("busy", cpu, "16M", "none");
    let mut first = Command::new(LWK).args(["run", "--partition", &part.0, "--", "/bin/sleep", "3"]).spawn().unwrap();
    // Wait until the first run holds the partition (show names its pid).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let show = Command::new(LWK).args(["partition", "show", &part.0, "--json"]).output().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
        if v["busy_pid"].as_i64() == Some(first.id() as i64) {
            break;
        }
        assert!(Instant::now() < deadline, "the first run never took the partition: {v}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let second = Command::new(LWK).args(["run", "--partition", &part.0, "--", "/bin/true"]).output().unwrap();
    assert_eq!(second.status.code(), Some(125));
    let why = String::from_utf8_lossy(&second.stderr);
    assert!(why.contains(&format!("is busy: lwk run pid {}", first.id())), "{why}");
    assert!(first.wait().unwrap().success());
}

#[test]
#[ignore = "needs root"]
fn a_child_that_drops_root_for_nobody_still_runs_as_natively() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "changing uid to nobody needs root");
    let o = compare(
        &[
            "/usr/bin/python3",
            "-c",
            "import subprocess; subprocess.run(['/usr/bin/id', '-u'], user='nobody', check=True)",
        ],
        None,
    );
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "65534");
}

#[test]
fn sigterm_to_the_whole_process_group_ends_the_program_as_natively() {
    // A batch system cancelling a job, or a hang-up, signals the group:
    // the proxy (in that group too) must not die first.
    for prog in [&["/bin/sleep", "10"][..], &["/usr/bin/python3", "-c", "import time; time.sleep(10)"][..]] {
        let mut c = lwk_command(prog, &[]);
        c.process_group(0).stdout(Stdio::null()).stderr(Stdio::piped());
        let child = c.spawn().unwrap();
        std::thread::sleep(Duration::from_millis(500));
        // SAFETY: signals the process group we just made.
        unsafe { libc::kill(-(child.id() as i32), libc::SIGTERM) };
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.signal(), Some(libc::SIGTERM), "{prog:?}: {}", shorten(&out.stderr));
    }
}

#[test]
fn sigio_and_sigurg_from_delegated_descriptors_reach_the_program() {
    let o = compare(&[&program("sigio", Link::Pie)], None);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(has_line(&out, "SIGIO from a pipe: 1"), "{out}");
    assert!(has_line(&out, "SIGURG from OOB data: 1"), "{out}");
}

#[test]
#[ignore = "needs root, a second CPU and a cpuset cgroup"]
fn destroy_force_ends_a_running_application_and_its_children() {
    let (cpu, _turn) = partition_cpu();
    let part = TestPartition::create("force", cpu, "16M", "none");
    let marker = format!("sleep 3{}", std::process::id() % 1000);
    let script = format!("{marker} & {marker}");
    let mut run = Command::new(LWK)
        .args(["run", "--partition", &part.0, "--", "/bin/sh", "-c", &script])
        .process_group(0)
        .spawn()
        .unwrap();
    let show = Command::new(LWK).args(["partition", "show", &part.0, "--json"]).output().unwrap();
    let show: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    let cpuset = format!("{}/cgroup.procs", show["cgroup"].as_str().unwrap());
    let deadline = Instant::now() + Duration::from_secs(10);
    // The shell and both sleeps (and their LWKs) are in the partition.
    while std::fs::read_to_string(&cpuset).map_or(0, |t| t.lines().count()) < 3 {
        assert!(Instant::now() < deadline, "the application never started in the partition");
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = Command::new(LWK).args(["partition", "destroy", "--force", &part.0]).output().unwrap();
    assert!(o.status.success(), "{}", shorten(&o.stderr));
    assert_eq!(run.wait().unwrap().signal(), Some(libc::SIGKILL));
    let left = Command::new("pgrep").args(["-f", &marker]).output().unwrap();
    assert!(left.stdout.is_empty(), "still running: {}", String::from_utf8_lossy(&left.stdout));
    std::mem::forget(part); // destroyed above
}

#[test]
fn a_sigsys_sent_to_the_program_is_its_own_not_a_system_call() {
    let prog = program("sigsys", Link::Pie);
    let o = compare(&[&prog], None);
    assert_eq!(o.status.signal(), Some(libc::SIGSYS));
    let o = compare(&[&prog, "ignore"], None);
    assert!(has_line(&String::from_utf8_lossy(&o.stdout), "ignored SIGSYS, still here"));
    // SIGRTMAX is the LWK's too (it stops threads): sent to the program it
    // kills it by default, and ignored it is ignored, as natively.
    compare(&["sh", "-c", "kill -64 $$; echo not reached"], None);
    let o = compare(&["sh", "-c", "trap '' 64; kill -64 $$; echo still here"], None);
    assert!(has_line(&String::from_utf8_lossy(&o.stdout), "still here"));
    // Across execve an ignored SIGSYS stays ignored, a handled one goes back
    // to the default (the LWK keeps SIGSYS's action itself, so it must carry
    // that over by itself).
    let o = compare(&["sh", "-c", "trap '' SYS; exec sh -c 'kill -SYS $$; echo still here'"], None);
    assert!(has_line(&String::from_utf8_lossy(&o.stdout), "still here"));
    let o = compare(&["sh", "-c", "trap 'echo handler' SYS; exec sh -c 'kill -SYS $$; echo still here'"], None);
    assert_eq!(o.status.signal(), Some(libc::SIGSYS));
}

#[test]
fn fork_beside_a_writing_thread_copies_a_snapshot() {
    let o = compare(&[&program("mtfork", Link::Pie)], None);
    assert!(has_line(&String::from_utf8_lossy(&o.stdout), "forks whose copy was not a snapshot: 0 of 10"));
}

#[test]
fn kill_9_of_lwk_run_at_any_moment_leaves_no_process_behind() {
    for delay_ms in [0u64, 1, 3, 10, 50] {
        let mut c = lwk_command(&["/bin/sleep", "30"], &[]);
        c.process_group(0).stdout(Stdio::null()).stderr(Stdio::null());
        let mut child = c.spawn().unwrap();
        let pgid = child.id() as i32;
        std::thread::sleep(Duration::from_millis(delay_ms));
        child.kill().unwrap();
        child.wait().unwrap();
        // The application and the proxy die with it (they share its group;
        // as zombies they wait for init to reap them, which is not ours).
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let alive = live_in_group(pgid);
            if alive.is_empty() {
                break;
            }
            assert!(Instant::now() < deadline, "after {delay_ms} ms: {alive:?} outlived lwk run");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Processes of group `pgid` that are not zombies: (pid, comm).
fn live_in_group(pgid: i32) -> Vec<(i32, String)> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // pid (comm) state ppid pgrp ...
        let Some((head, rest)) = stat.rsplit_once(')') else { continue };
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.len() > 2 && f[0] != "Z" && f[2].parse() == Ok(pgid) {
            v.push((pid, head.split_once('(').map_or("", |x| x.1).to_string()));
        }
    }
    v
}

// ---------------------------------------------------------------------------
// The LWK's state saved and restored onto itself (kernel::persist)
// ---------------------------------------------------------------------------

/// Every few system calls the LWK saves its whole state, wipes it (signal
/// actions, timers, threads, signalfds, identity, the calling thread's
/// registers, FPU state, TLS base and robust list), restores it and checks
/// that the restore rebuilt it; the programs must not notice. The other
/// threads of a multithreaded one are stopped meanwhile (the LWK's
/// SIGRTMAX) and find their state as they left it.
#[test]
fn programs_do_not_notice_the_lwk_restoring_its_state_onto_itself() {
    let dir = tempdir();
    let stats = dir.path().join("stats.json");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec![program("signals", Link::Pie), "alarm-restart".into()], "1"),
        (vec![program("signals", Link::Pie), "pselect".into()], "1"),
        (vec![program("threads", Link::Static), "stress".into()], "5"),
        (vec![program("signalfd", Link::Pie)], "2"),
        (vec![program("vm_ops", Link::Static)], "1"),
        (vec![program("args_malloc", Link::Pie), "a".into(), "b c".into()], "1"),
        (vec!["python3".into(), "-c".into(), PYTHON_WITH_THREADS.into()], "7"),
    ];
    for (cmd, every) in &cases {
        let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
        let setup =
            Setup { lwk_opts: vec!["--selftest-restore", every, "--stats-json", path_str(&stats)], ..Setup::default() };
        let o = compare_with(&cmd, &setup);
        assert_exit_code(&o, 0);
        let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&stats).unwrap()).unwrap();
        let restores = report["selftest_restores"].as_u64().unwrap();
        let calls = report["syscalls_total"].as_u64().unwrap();
        let every: u64 = every.parse().unwrap();
        // Counted in the first process, whose calls were nearly all trapped
        // (the statistics also count calls the LWK makes no trap for).
        assert!(restores > 0 && restores >= calls / every / 2, "{cmd:?}: {restores} restores in {calls} calls");
    }
}

const PYTHON_WITH_THREADS: &str = "
import hashlib, json, signal, threading
hits = []
signal.signal(signal.SIGALRM, lambda s, f: hits.append(s))
signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)
def work(i):
    return hashlib.sha256(str(i).encode() * 1000).hexdigest()
out = []
ts = [threading.Thread(target=lambda i=i: out.append(work(i))) for i in range(4)]
[t.start() for t in ts]
[t.join() for t in ts]
while len(hits) < 5:
    signal.pause()
signal.setitimer(signal.ITIMER_REAL, 0)
print(json.dumps(sorted(out))[:64], len(hits) >= 5)
";
