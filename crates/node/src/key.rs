//! The cluster key: 32 random bytes, shared by every node of the cluster
//! (as munge's key is), in a file only root can read. Every connection
//! between node daemons proves both ends hold it, and every message and
//! image record on it is hashed with it.

use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use lwk_migrate::image::ClusterKey;

/// Where the key is unless told otherwise.
pub const DEFAULT_KEY_FILE: &str = "/etc/lwk/cluster.key";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read the cluster key {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("the cluster key {path} can be read by others than its owner (mode {mode:o}): chmod 600 it")]
    Exposed { path: PathBuf, mode: u32 },
    #[error("the cluster key {path} is not owned by root or by this user")]
    Owner { path: PathBuf },
    #[error("the cluster key {path} is not 64 hexadecimal digits")]
    Malformed { path: PathBuf },
    #[error("cannot write the cluster key {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

/// Read the key from `path`, refusing a file others could read.
pub fn load(path: &Path) -> Result<ClusterKey, KeyError> {
    let read = |source| KeyError::Read { path: path.to_owned(), source };
    let meta = std::fs::metadata(path).map_err(read)?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyError::Exposed { path: path.to_owned(), mode });
    }
    // SAFETY: plain geteuid.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != 0 && meta.uid() != me {
        return Err(KeyError::Owner { path: path.to_owned() });
    }
    let mut text = String::new();
    std::fs::File::open(path).and_then(|mut f| f.read_to_string(&mut text)).map_err(read)?;
    parse(text.trim()).ok_or_else(|| KeyError::Malformed { path: path.to_owned() })
}

fn parse(hex: &str) -> Option<ClusterKey> {
    if hex.len() != 64 {
        return None;
    }
    let mut key = [0u8; 32];
    for (i, b) in key.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(key)
}

/// Make a new random key in `path` (mode 600; the file must not exist).
pub fn generate(path: &Path) -> Result<(), KeyError> {
    let key = random_bytes::<32>().map_err(|source| KeyError::Write { path: path.to_owned(), source })?;
    save(path, &key)
}

/// Write `key` to `path` as `load` reads it (mode 600; the file must not
/// exist).
pub fn save(path: &Path, key: &ClusterKey) -> Result<(), KeyError> {
    let write = |source| KeyError::Write { path: path.to_owned(), source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(write)?;
    }
    let text: String = key.iter().map(|b| format!("{b:02x}")).collect::<String>() + "\n";
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(write)?;
    std::io::Write::write_all(&mut f, text.as_bytes()).map_err(write)
}

/// `N` bytes from the kernel's random source.
pub fn random_bytes<const N: usize>() -> std::io::Result<[u8; N]> {
    let mut b = [0u8; N];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_key_loads_and_an_exposed_or_malformed_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.key");
        generate(&path).unwrap();
        let key = load(&path).unwrap();
        assert_ne!(key, [0u8; 32]);
        assert!(generate(&path).is_err(), "an existing key is never overwritten");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(load(&path), Err(KeyError::Exposed { mode: 0o644, .. })));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&path, "abc\n").unwrap();
        assert!(matches!(load(&path), Err(KeyError::Malformed { .. })));
    }
}
