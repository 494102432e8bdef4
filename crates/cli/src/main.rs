//! `lwk`: run unmodified Linux programs on the lightweight kernel.

mod checkpoint;
mod cluster;
mod drain;
mod migrate;
mod node;
mod partition;
mod ps;
mod restore;
mod run;
mod stats;
mod syscalls;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(name = "lwk", version, about = "A Linux-compatible lightweight kernel in user space")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run PROGRAM on the LWK: memory, signals and identity handled in the
    /// application process, everything else delegated to a proxy.
    Run(RunArgs),
    /// Print how the LWK runs each x86-64 system call, and how well it is
    /// supported.
    Syscalls {
        /// Output format: a table, JSON, or the Markdown compatibility page.
        #[arg(long, value_enum, default_value = "text")]
        format: syscalls::Format,
        /// The same as --format json.
        #[arg(long, conflicts_with = "format")]
        json: bool,
    },
    /// Measure OS noise: the fixed work quantum benchmark on pinned CPUs.
    Noise(lwk_noise::NoiseArgs),
    /// CPU and memory partitions for LWK applications.
    Partition {
        #[command(subcommand)]
        cmd: partition::PartitionCmd,
    },
    /// The lwk applications on this node: one line per application
    /// process, with its proxy, threads, memory, descriptors and TCP
    /// connections.
    Ps {
        #[arg(long)]
        json: bool,
    },
    /// Freeze an lwk application and write its image (its LWK state, every
    /// thread's context and its memory) to DIR/image.lwk.
    Checkpoint(checkpoint::CheckpointArgs),
    /// Put an application that `lwk checkpoint` wrote back into new
    /// processes, and stand for it as `lwk run` does.
    Restore(restore::RestoreArgs),
    /// Move a running application to another node's daemon.
    Migrate(migrate::MigrateArgs),
    /// Move every lwk application off a node (through its daemon), which
    /// then takes no new application until `lwk undrain`.
    Drain(drain::DrainArgs),
    /// Let a drained node take applications again.
    Undrain(drain::UndrainArgs),
    /// The node daemon and the cluster key.
    Node {
        #[command(subcommand)]
        cmd: node::NodeCmd,
    },
    /// A single-IP-address cluster: this node's part, or a simulated one.
    Cluster {
        #[command(subcommand)]
        cmd: cluster::ClusterCmd,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum HugePages {
    /// 2 MiB pages while the hugetlb pool has free ones, else 4 KiB.
    Auto,
    /// Fail if 2 MiB pages cannot be had.
    #[value(name = "2M")]
    Require,
    /// Only 4 KiB pages.
    #[value(name = "none")]
    Off,
}

#[derive(clap::Args)]
pub struct RunArgs {
    /// Print per-system-call statistics on stderr when the program exits.
    #[arg(long)]
    pub stats: bool,
    /// Write the statistics as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub stats_json: Option<PathBuf>,
    /// Page size for application memory.
    #[arg(long, value_enum, default_value = "auto")]
    pub hugepages: HugePages,
    /// Pre-fault 4 KiB-page memory at mmap time too (huge-page memory
    /// always is).
    #[arg(long)]
    pub prefault_all: bool,
    /// Notes from the LWK on stderr (e.g. falling back to 4 KiB pages).
    #[arg(short, long)]
    pub verbose: bool,
    /// Run in partition NAME (see `lwk partition create`): application
    /// threads on its CPUs, one per CPU, application memory from its
    /// reservation, the proxy on the other CPUs.
    #[arg(long, value_name = "NAME")]
    pub partition: Option<String>,
    /// Every N-th system call, save the LWK's whole state, wipe it and
    /// restore it, and check that the restore rebuilt it: a test of the
    /// state's save and restore, which the program must not notice.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub selftest_restore: u64,
    /// The program and its arguments.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true, value_name = "PROGRAM")]
    pub command: Vec<OsString>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run::run(args),
        Command::Syscalls { format, json } => {
            syscalls::print(if json { syscalls::Format::Json } else { format }).map(|()| 0)
        }
        Command::Noise(args) => lwk_noise::run(&args).map(|()| 0),
        Command::Partition { cmd } => partition::main(cmd),
        Command::Ps { json } => ps::main(json),
        Command::Checkpoint(args) => checkpoint::main(args),
        Command::Restore(args) => restore::main(args),
        Command::Migrate(args) => migrate::main(args),
        Command::Drain(args) => drain::drain(args),
        Command::Undrain(args) => drain::undrain(args),
        Command::Node { cmd } => node::main(cmd),
        Command::Cluster { cmd } => cluster::main(cmd),
    };
    match result {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            eprintln!("lwk: {e:#}");
            ExitCode::from(125)
        }
    }
}
