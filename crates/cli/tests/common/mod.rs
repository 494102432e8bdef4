//! What the tests that freeze, checkpoint, restore and migrate programs
//! share: the C programs under tests/programs, compiled once per test
//! process, and commands that start with nothing of the test runner's open.

use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

const PROGRAMS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/programs");
const TMP_ROOT: &str = env!("CARGO_TARGET_TMPDIR");

/// tests/programs/NAME.c, compiled (with -pthread) once per test process.
pub fn compiled(name: &'static str) -> &'static Path {
    type Bins = std::sync::Mutex<std::collections::HashMap<&'static str, &'static Path>>;
    static BINS: OnceLock<Bins> = OnceLock::new();
    let mut bins = BINS.get_or_init(Default::default).lock().unwrap();
    bins.entry(name).or_insert_with(|| {
        let dir = tempfile::Builder::new().prefix("lwk-programs-").tempdir_in(TMP_ROOT).unwrap().keep();
        let out = dir.join(name);
        let o = Command::new("gcc")
            .args(["-O1", "-Wall", "-pthread", "-o"])
            .arg(&out)
            .arg(Path::new(PROGRAMS).join(format!("{name}.c")))
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
