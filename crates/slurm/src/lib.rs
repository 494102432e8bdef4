//! lwk's Slurm SPANK plugin (`liblwk_slurm.so`).
//!
//! Adds `--lwk`, `--lwk-cpus=N|LIST` and `--lwk-mem=SIZE` to srun, sbatch and
//! salloc. For a step that asks for it, on each node, slurmstepd (root) creates
//! the LWK partition `slurm-JOBID.STEP` owned by the job's user before the
//! tasks start, each task runs as `lwk run --partition slurm-JOBID.STEP
//! --stats-json FILE -- ARGV`, and when the step ends, whatever its tasks did,
//! the partition is destroyed and the tasks' statistics and exit statuses are
//! added to the job's accounting file and comment. The job epilog destroys
//! whatever a step that died without its exit callback left.
//!
//! The partition is per step, not per job: the slurmstepd that creates it is
//! the one that runs the tasks and sees them end, so creation, use and
//! teardown live in one process and one step's failure cannot leak into the
//! next. Steps started from inside an LWK task (srun inside an `sbatch --lwk`
//! script) run on the enclosing step's partition.

pub mod accounting;
pub mod cpus;
mod ffi;
mod plugin;
pub mod site;

/// Environment variables between the plugin (task_init) and `lwk-slurm-exec`.
pub mod env {
    /// The lwk binary.
    pub const LWK: &str = "LWK_SLURM_LWK";
    /// The partition the task runs on; also tells steps started inside the task
    /// which partition to share.
    pub const PARTITION: &str = "LWK_SLURM_PARTITION";
    /// Where `lwk run` writes the task's statistics.
    pub const STATS: &str = "LWK_SLURM_STATS";
    /// The task's own `argv[0]`, which the plugin replaced by the helper's path.
    pub const ARGV0: &str = "LWK_SLURM_ARGV0";
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A malformed option value from the user.
    #[error("{0}")]
    Invalid(String),
    /// A request the site policy or the allocation does not allow.
    #[error("{0}")]
    Policy(String),
    /// A malformed plugstack.conf argument.
    #[error("plugstack.conf: lwk plugin: {0}")]
    Config(String),
    #[error("{0}")]
    Io(String),
    /// `lwk` or `scontrol` failed.
    #[error("{0}")]
    Command(String),
}
