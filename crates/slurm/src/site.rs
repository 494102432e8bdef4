//! Site policy: the plugin's arguments in plugstack.conf, e.g.
//! `required /usr/lib/slurm/liblwk_slurm.so lwk=/usr/local/bin/lwk default_mem=256M max_mem_fraction=0.5 allow_groups=hpc`.

use std::path::{Path, PathBuf};

use lwk_partition::parse_size;

use crate::Error;

pub const DEFAULT_LWK: &str = "/usr/local/bin/lwk";
pub const DEFAULT_ACCOUNTING_DIR: &str = "/var/lib/lwk/accounting";
pub const DEFAULT_STATE_DIR: &str = "/run/lwk/slurm";
pub const DEFAULT_PARTITIONS_DIR: &str = "/run/lwk/partitions";
pub const DEFAULT_SCONTROL: &str = "/usr/bin/scontrol";
pub const DEFAULT_MEM: u64 = 256 << 20;

#[derive(Debug, Clone, PartialEq)]
pub struct SiteConfig {
    /// The `lwk` binary (`lwk=`).
    pub lwk: PathBuf,
    /// The task helper that slurmstepd executes in place of the task (`exec_helper=`);
    /// by default `lwk-slurm-exec` next to the `lwk` binary.
    pub exec_helper: PathBuf,
    /// Partition memory when the user gives no --lwk-mem (`default_mem=`).
    pub default_mem: u64,
    /// At most this fraction of the job's memory on the node, or of the node's
    /// memory when the job has no memory limit (`max_mem_fraction=`, 0 < f <= 1).
    pub max_mem_fraction: f64,
    /// Only these users may use --lwk (`allow_users=a,b`); empty = everyone
    /// (unless allow_groups is given).
    pub allow_users: Vec<String>,
    /// Members of these groups may use --lwk (`allow_groups=g,h`).
    pub allow_groups: Vec<String>,
    /// `--hugepages` for `lwk partition create` (`hugepages=2M|1G|none`); unset: lwk's default.
    pub hugepages: Option<String>,
    /// Per-job accounting files `JOBID.json` (`accounting_dir=`).
    pub accounting_dir: PathBuf,
    /// Per-step working directories for the tasks' statistics (`state_dir=`).
    pub state_dir: PathBuf,
    /// Where lwk keeps its partitions (`partitions_dir=`), read by the epilog
    /// to find partitions a dead step left.
    pub partitions_dir: PathBuf,
    /// `scontrol` for the job comment (`scontrol=`); `comment=no` turns it off.
    pub scontrol: PathBuf,
    pub comment: bool,
}

impl Default for SiteConfig {
    fn default() -> Self {
        SiteConfig {
            lwk: DEFAULT_LWK.into(),
            exec_helper: helper_next_to(Path::new(DEFAULT_LWK)),
            default_mem: DEFAULT_MEM,
            max_mem_fraction: 1.0,
            allow_users: Vec::new(),
            allow_groups: Vec::new(),
            hugepages: None,
            accounting_dir: DEFAULT_ACCOUNTING_DIR.into(),
            state_dir: DEFAULT_STATE_DIR.into(),
            partitions_dir: DEFAULT_PARTITIONS_DIR.into(),
            scontrol: DEFAULT_SCONTROL.into(),
            comment: true,
        }
    }
}

fn helper_next_to(lwk: &Path) -> PathBuf {
    lwk.parent().unwrap_or(Path::new("/")).join("lwk-slurm-exec")
}

fn absolute(key: &str, value: &str) -> Result<PathBuf, Error> {
    if !value.starts_with('/') {
        return Err(Error::Config(format!("{key}={value}: must be an absolute path")));
    }
    Ok(PathBuf::from(value))
}

fn names(value: &str) -> Vec<String> {
    value.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect()
}

impl SiteConfig {
    pub fn from_args<S: AsRef<str>>(args: &[S]) -> Result<Self, Error> {
        let mut cfg = SiteConfig::default();
        let mut helper = None;
        for arg in args {
            let arg = arg.as_ref();
            let (key, value) =
                arg.split_once('=').ok_or_else(|| Error::Config(format!("argument {arg:?} is not KEY=VALUE")))?;
            match key {
                "lwk" => cfg.lwk = absolute(key, value)?,
                "exec_helper" => helper = Some(absolute(key, value)?),
                "default_mem" => {
                    cfg.default_mem = parse_size(value).map_err(|e| Error::Config(format!("default_mem: {e}")))?
                }
                "max_mem_fraction" => {
                    cfg.max_mem_fraction =
                        value.parse::<f64>().ok().filter(|f| *f > 0.0 && *f <= 1.0).ok_or_else(|| {
                            Error::Config(format!("max_mem_fraction={value}: want a number in (0, 1]"))
                        })?
                }
                "allow_users" => cfg.allow_users = names(value),
                "allow_groups" => cfg.allow_groups = names(value),
                "hugepages" => match value {
                    "2M" | "1G" | "none" => cfg.hugepages = Some(value.to_string()),
                    _ => return Err(Error::Config(format!("hugepages={value}: want 2M, 1G or none"))),
                },
                "accounting_dir" => cfg.accounting_dir = absolute(key, value)?,
                "state_dir" => cfg.state_dir = absolute(key, value)?,
                "partitions_dir" => cfg.partitions_dir = absolute(key, value)?,
                "scontrol" => cfg.scontrol = absolute(key, value)?,
                "comment" => {
                    cfg.comment = match value {
                        "yes" | "1" | "true" => true,
                        "no" | "0" | "false" => false,
                        _ => return Err(Error::Config(format!("comment={value}: want yes or no"))),
                    }
                }
                _ => {
                    return Err(Error::Config(format!(
                        "unknown argument {key:?} (known: lwk, exec_helper, default_mem, max_mem_fraction, \
                         allow_users, allow_groups, hugepages, accounting_dir, state_dir, partitions_dir, \
                         scontrol, comment)"
                    )))
                }
            }
        }
        cfg.exec_helper = helper.unwrap_or_else(|| helper_next_to(&cfg.lwk));
        Ok(cfg)
    }

    /// Whether `user` (with the names of all its groups) may use --lwk.
    pub fn allows(&self, user: &str, groups: &[String]) -> bool {
        if self.allow_users.is_empty() && self.allow_groups.is_empty() {
            return true;
        }
        self.allow_users.iter().any(|u| u == user) || groups.iter().any(|g| self.allow_groups.contains(g))
    }

    /// The largest partition memory for a job with `job_mem` bytes on the node
    /// (0: no job limit, then `node_mem` counts).
    pub fn max_mem(&self, job_mem: u64, node_mem: u64) -> u64 {
        let base = if job_mem > 0 { job_mem } else { node_mem };
        (base as f64 * self.max_mem_fraction) as u64
    }
}

/// A size in the form `lwk partition create --mem` takes: whole MiB ("256M")
/// when it is one, else KiB rounded up.
pub fn format_size(bytes: u64) -> String {
    if bytes.is_multiple_of(1 << 30) {
        format!("{}G", bytes >> 30)
    } else if bytes.is_multiple_of(1 << 20) {
        format!("{}M", bytes >> 20)
    } else {
        format!("{}K", bytes.div_ceil(1024))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_for_the_lwk_command() {
        // Parsed back by `lwk partition create --mem` (lwk_partition::parse_size).
        for bytes in [256 << 20, 2 << 30, 1000, 4096, 3 << 10] {
            assert!(parse_size(&format_size(bytes)).unwrap() >= bytes, "{bytes}");
        }
        assert_eq!(format_size(256 << 20), "256M");
        assert_eq!(format_size(2 << 30), "2G");
        assert_eq!(format_size(1000), "1K");
    }

    #[test]
    fn args_parse_and_reject_nonsense() {
        let cfg = SiteConfig::from_args(&[
            "lwk=/opt/lwk/bin/lwk",
            "default_mem=128M",
            "max_mem_fraction=0.5",
            "allow_users=alice,bob",
            "allow_groups=hpc",
            "hugepages=none",
            "comment=no",
        ])
        .unwrap();
        assert_eq!(cfg.lwk, PathBuf::from("/opt/lwk/bin/lwk"));
        assert_eq!(cfg.exec_helper, PathBuf::from("/opt/lwk/bin/lwk-slurm-exec"));
        assert_eq!(cfg.default_mem, 128 << 20);
        assert_eq!(cfg.max_mem(1000, 5000), 500);
        assert_eq!(cfg.max_mem(0, 5000), 2500);
        assert!(cfg.allows("bob", &[]));
        assert!(cfg.allows("carol", &["users".into(), "hpc".into()]));
        assert!(!cfg.allows("carol", &["users".into()]));
        assert!(!cfg.comment);
        for bad in ["lwk=relative/lwk", "max_mem_fraction=1.5", "colour=blue", "default_mem=lots", "noequals"] {
            let err = SiteConfig::from_args(&[bad]).unwrap_err().to_string();
            assert!(err.contains(bad.split('=').next().unwrap()), "{bad}: {err}");
        }
        let err = SiteConfig::from_args(&["default_mem=0"]).unwrap_err().to_string();
        assert_eq!(err, r#"plugstack.conf: lwk plugin: default_mem: bad memory size "0": must be more than 0"#);
        assert!(SiteConfig::from_args::<&str>(&[]).unwrap().allows("anyone", &[]));
    }
}
