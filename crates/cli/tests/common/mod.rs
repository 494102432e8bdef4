//! What the tests that freeze, checkpoint, restore and migrate programs
//! share: the C programs under tests/programs, compiled once per test
//! process, and commands that start with nothing of the test runner's open.

use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

const PROGRAMS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/programs");
const TMP_ROOT: &str = env!("CARGO_TARGET_TMPDIR");

/// tests/programs/NAME.c, compiled (with -pthread) once per test process;
/// a NAME with a slash is a path from the workspace's root without `.c`
/// (bench/src/memhog).
pub fn compiled(name: &'static str) -> &'static Path {
    type Bins = std::sync::Mutex<std::collections::HashMap<&'static str, &'static Path>>;
    static BINS: OnceLock<Bins> = OnceLock::new();
    let mut bins = BINS.get_or_init(Default::default).lock().unwrap();
    bins.entry(name).or_insert_with(|| {
        let dir = tempfile::Builder::new().prefix("lwk-programs-").tempdir_in(TMP_ROOT).unwrap().keep();
        let out = dir.join(Path::new(name).file_name().unwrap());
        let o = Command::new("gcc")
            .args(["-O1", "-Wall", "-pthread", "-o"])
            .arg(&out)
            .arg(match name.contains('/') {
                true => Path::new(PROGRAMS).join("../../../..").join(format!("{name}.c")),
                false => Path::new(PROGRAMS).join(format!("{name}.c")),
            })
            .output()
            .unwrap_or_else(|e| panic!("cannot run gcc ({e}): install Debian's gcc and libc6-dev"));
        assert!(o.status.success(), "gcc: {}", String::from_utf8_lossy(&o.stderr));
        Box::leak(out.into_boxed_path())
    })
}

/// Let `cmd` start with only stdin, stdout and stderr open, whatever the
/// test runner was given: a program checkpointed later must not hold the
/// runner's descriptors (they lead outside it).
pub fn only_standard_streams(cmd: &mut Command) -> &mut Command {
    // SAFETY: close_range is async-signal-safe.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, || {
            libc::syscall(libc::SYS_close_range, 3, u32::MAX, libc::CLOSE_RANGE_CLOEXEC);
            Ok(())
        })
    }
}

/// Move the calling thread (a test's own) into network namespace `name`:
/// what it starts from then on runs there too.
pub fn enter_netns(name: &str) {
    let f = std::fs::File::open(format!("/run/netns/{name}")).unwrap();
    // SAFETY: moves the calling thread into the namespace.
    assert_eq!(unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) }, 0);
}

/// A TCP client of tests/programs/net_target.c: one line out, one back.
pub struct LineClient {
    conn: std::net::TcpStream,
    replies: std::io::BufReader<std::net::TcpStream>,
}

impl LineClient {
    pub fn connect(to: impl std::net::ToSocketAddrs, timeout: std::time::Duration) -> LineClient {
        let conn = std::net::TcpStream::connect(to).unwrap();
        conn.set_read_timeout(Some(timeout)).unwrap();
        let replies = std::io::BufReader::new(conn.try_clone().unwrap());
        LineClient { conn, replies }
    }

    /// Send `what` (a line) and read the answer line.
    pub fn ask(&mut self, what: &str) -> String {
        self.send(what);
        self.answer()
    }

    /// Send `what` only.
    #[allow(dead_code)] // not every test binary sends ahead
    pub fn send(&mut self, what: &str) {
        use std::io::Write;
        self.conn.write_all(what.as_bytes()).unwrap();
    }

    /// The next answer line.
    pub fn answer(&mut self) -> String {
        use std::io::BufRead;
        let mut answer = String::new();
        self.replies.read_line(&mut answer).unwrap();
        answer
    }
}

/// A partition on the last online CPU (`--mem MEM`, 4 KiB pages) made for
/// one test, destroyed (forcibly) when dropped, also on a panic.
#[allow(dead_code)] // not every test binary makes partitions
pub struct TestPartition {
    pub name: String,
    /// Its CPU (not every test binary looks).
    #[allow(dead_code)]
    pub cpu: usize,
}

#[allow(dead_code)]
impl TestPartition {
    pub fn create(tag: &str, mem: &str) -> TestPartition {
        let lwk = env!("CARGO_BIN_EXE_lwk");
        let online = std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap();
        let cpu = *lwk_partition::parse_cpu_list(&online).unwrap().last().unwrap();
        let name = format!("t-{tag}-{}", std::process::id());
        let o = Command::new(lwk)
            .args(["partition", "create", &name, "--cpus", &cpu.to_string(), "--mem", mem, "--hugepages", "none"])
            .output()
            .unwrap();
        assert!(o.status.success(), "partition create: {}", String::from_utf8_lossy(&o.stderr));
        TestPartition { name, cpu }
    }
}

impl Drop for TestPartition {
    fn drop(&mut self) {
        Command::new(env!("CARGO_BIN_EXE_lwk")).args(["partition", "destroy", "--force", &self.name]).output().ok();
    }
}
