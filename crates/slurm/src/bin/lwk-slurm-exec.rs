//! What slurmstepd executes in place of a task of an `--lwk` step: the lwk
//! SPANK plugin replaced the task's `argv[0]` by this program's path and put the
//! real `argv[0]`, the partition and the statistics file in the environment.
//! This turns `lwk-slurm-exec ARGS...` into
//! `lwk run --partition P --stats-json F -- ARGV0 ARGS...`.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode};

use lwk_slurm::env;

fn main() -> ExitCode {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    let (Some(lwk), Some(partition), Some(stats), Some(argv0)) =
        (var(env::LWK), var(env::PARTITION), var(env::STATS), var(env::ARGV0))
    else {
        eprintln!(
            "lwk-slurm-exec: {}, {}, {} and {} must be set: this program is run by the lwk Slurm plugin, not by hand",
            env::LWK,
            env::PARTITION,
            env::STATS,
            env::ARGV0
        );
        return ExitCode::from(2);
    };
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let mut cmd = Command::new(&lwk);
    cmd.arg("run")
        .arg("--partition")
        .arg(&partition)
        .arg("--stats-json")
        .arg(&stats)
        .arg("--")
        .arg(&argv0)
        .args(&args)
        // The task sees its own environment; PARTITION stays so that a step
        // started inside this task (srun in a batch script) shares the partition.
        .env_remove(env::LWK)
        .env_remove(env::STATS)
        .env_remove(env::ARGV0);
    let err = cmd.exec();
    eprintln!("lwk-slurm-exec: cannot execute {}: {err}", lwk.to_string_lossy());
    ExitCode::from(126)
}
