//! Small helpers over /proc, /sys and files.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use rustix::fs::{flock, FlockOperation};

use crate::spec::parse_kernel_list;

/// Reads a small kernel file, trimmed.
pub fn read_trim(path: impl AsRef<Path>) -> Result<String> {
    let path = path.as_ref();
    Ok(fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?.trim().to_string())
}

/// Writes a value to a kernel file in one write(2), as sysfs, procfs and
/// cgroupfs want it. The raw error is kept so callers can tell EINVAL, EIO...
pub fn write_raw(path: impl AsRef<Path>, value: &str) -> io::Result<()> {
    let mut f = OpenOptions::new().write(true).open(path)?;
    f.write_all(value.as_bytes())
}

/// `write_raw` with the file and the value in the error.
pub fn write_value(path: impl AsRef<Path>, value: &str) -> Result<()> {
    let path = path.as_ref();
    write_raw(path, value).with_context(|| format!("cannot write {value:?} to {}", path.display()))
}

/// The online CPUs.
pub fn online_cpus() -> Result<Vec<usize>> {
    parse_kernel_list(&read_trim("/sys/devices/system/cpu/online")?)
}

/// Whether a CPU with this number exists at all (online or not).
pub fn cpu_exists(cpu: usize) -> bool {
    Path::new(&format!("/sys/devices/system/cpu/cpu{cpu}")).exists()
}

/// A field of /proc/meminfo, in bytes.
pub fn meminfo(key: &str) -> Result<u64> {
    let text = fs::read_to_string("/proc/meminfo").context("cannot read /proc/meminfo")?;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix(key).and_then(|r| r.strip_prefix(':')) {
            let mut it = rest.split_whitespace();
            let n: u64 = it.next().and_then(|n| n.parse().ok()).ok_or_else(|| anyhow!("bad {key} in /proc/meminfo"))?;
            return Ok(if it.next() == Some("kB") { n * 1024 } else { n });
        }
    }
    bail!("no {key} in /proc/meminfo")
}

/// Whether a process is a kernel thread (PF_KTHREAD in /proc/PID/stat).
pub fn is_kernel_thread(pid: i32) -> bool {
    const PF_KTHREAD: u64 = 0x0020_0000;
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    // Fields after the command name (which may contain spaces and parentheses):
    // state ppid pgrp session tty_nr tpgid flags ...
    let Some(after) = stat.rfind(')').map(|i| &stat[i + 1..]) else { return false };
    after.split_whitespace().nth(6).and_then(|f| f.parse::<u64>().ok()).is_some_and(|f| f & PF_KTHREAD != 0)
}

/// Whether `path` is a mount point in this mount namespace.
pub fn is_mount_point(path: &Path) -> bool {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else { return false };
    let want = path.to_string_lossy();
    info.lines().any(|l| l.split(' ').nth(4).is_some_and(|m| unescape_mountinfo(m) == want))
}

fn unescape_mountinfo(s: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo.
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The current time, RFC 3339 in UTC, to the second.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// The pids listed in a cgroup's cgroup.procs (empty if it is gone).
pub fn cgroup_pids(dir: &Path) -> Vec<i32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// Whether the effective user is root.
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// An exclusive flock on a lock file, taken so that the file it locks is the
/// one at the path: a holder may unlink the file when it is done (to leave
/// nothing behind), and a waiter that then gets the lock on the unlinked
/// file notices and tries again.
pub struct PathLock {
    file: File,
    path: std::path::PathBuf,
}

impl PathLock {
    pub fn acquire(path: &Path) -> Result<PathLock> {
        loop {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .mode(0o644)
                .custom_flags(o_nofollow())
                .open(path)
                .with_context(|| format!("cannot open the lock file {}", path.display()))?;
            flock(&file, FlockOperation::LockExclusive).with_context(|| format!("cannot lock {}", path.display()))?;
            let same = match fs::symlink_metadata(path) {
                Ok(m) => {
                    let f = file.metadata()?;
                    m.ino() == f.ino() && m.dev() == f.dev()
                }
                Err(_) => false,
            };
            if same {
                return Ok(PathLock { file, path: path.to_path_buf() });
            }
        }
    }

    /// Releases the lock and removes the lock file.
    pub fn release_and_remove(self) {
        let _ = fs::remove_file(&self.path);
        drop(self.file);
    }
}

/// O_NOFOLLOW: a lock or log file is never a symlink someone planted.
pub fn o_nofollow() -> i32 {
    rustix::fs::OFlags::NOFOLLOW.bits() as i32
}

/// Reads a whole small file as a string, or None if it does not exist.
pub fn read_opt(path: &Path) -> Result<Option<String>> {
    match File::open(path) {
        Ok(mut f) => {
            let mut s = String::new();
            f.read_to_string(&mut s).with_context(|| format!("cannot read {}", path.display()))?;
            Ok(Some(s))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Removes a directory; "already gone" is success.
pub fn rmdir_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_dir(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo("/a\\040b"), "/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
        assert_eq!(unescape_mountinfo("/end\\"), "/end\\");
    }

    #[test]
    fn own_process_facts() {
        assert!(!is_kernel_thread(std::process::id() as i32));
        assert!(is_mount_point(Path::new("/proc")));
        assert!(!is_mount_point(Path::new("/proc/self")));
        assert!(meminfo("MemTotal").unwrap() > 0);
        assert!(!online_cpus().unwrap().is_empty());
        assert!(cpu_exists(0));
    }
}
