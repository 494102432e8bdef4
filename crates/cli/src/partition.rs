//! `lwk partition ...`: the command line of crates/partition.

use anyhow::{anyhow, bail, Context, Result};
use clap::{Subcommand, ValueEnum};
use lwk_partition::{format_size, parse_cpu_list, parse_size, validate_name, Info, PageSize, Request};

#[derive(Subcommand)]
pub enum PartitionCmd {
    /// Reserve CPUs (exclusive cpuset, IRQs steered away) and memory (huge
    /// pages reserved up front, or a tmpfs limit) for LWK applications.
    Create {
        /// Name: 1 to 64 of A-Z a-z 0-9 _ . -
        name: String,
        /// CPU list: 1, 1-3, 1,3-5. At least one online CPU must stay for Linux.
        #[arg(long, value_name = "LIST")]
        cpus: String,
        /// Memory: bytes or 256M, 1G, 512MiB... (rounded up to whole pages).
        #[arg(long, value_name = "SIZE")]
        mem: String,
        /// Page size of the memory: reserved huge pages, or `none` for a tmpfs limit.
        #[arg(long, value_enum, default_value = "2M")]
        hugepages: PageArg,
        /// User (name or uid) who may run applications on it; default: the
        /// caller (SUDO_UID under sudo).
        #[arg(long, value_name = "USER|UID")]
        owner: Option<String>,
    },
    /// List partitions.
    List,
    /// Show one partition.
    Show {
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Give a partition's CPUs, IRQs and memory back to Linux.
    Destroy {
        /// The partition (or --all).
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        name: Option<String>,
        /// Destroy every partition.
        #[arg(long)]
        all: bool,
        /// Kill the application running in it first (SIGKILL to its process group).
        #[arg(long)]
        force: bool,
    },
    /// Print a partition's event log.
    Log { name: String },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PageArg {
    /// 2 MiB huge pages.
    #[value(name = "2M")]
    Huge2M,
    /// 1 GiB huge pages.
    #[value(name = "1G")]
    Huge1G,
    /// 4 KiB pages (tmpfs): a limit, not a reservation.
    #[value(name = "none")]
    Small,
}

impl From<PageArg> for PageSize {
    fn from(p: PageArg) -> PageSize {
        match p {
            PageArg::Huge2M => PageSize::Huge2M,
            PageArg::Huge1G => PageSize::Huge1G,
            PageArg::Small => PageSize::Small,
        }
    }
}

/// The owner's uid and primary gid.
fn owner(spec: Option<&str>) -> Result<(u32, u32)> {
    use nix::unistd::{Uid, User};
    let Some(spec) = spec else {
        // Under sudo the caller is the user who typed the command.
        let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u32>().ok());
        if let (Some(u), Some(g)) = (env("SUDO_UID"), env("SUDO_GID")) {
            return Ok((u, g));
        }
        return Ok((rustix::process::getuid().as_raw(), rustix::process::getgid().as_raw()));
    };
    if !spec.is_empty() && spec.bytes().all(|b| b.is_ascii_digit()) {
        let uid: u32 = spec.parse().map_err(|_| anyhow!("bad owner {spec:?}: uid too large"))?;
        let user = User::from_uid(Uid::from_raw(uid)).ok().flatten();
        return Ok((uid, user.map_or(uid, |u| u.gid.as_raw())));
    }
    let user = User::from_name(spec)
        .with_context(|| format!("cannot look up user {spec:?}"))?
        .ok_or_else(|| anyhow!("bad owner {spec:?}: no such user"))?;
    Ok((user.uid.as_raw(), user.gid.as_raw()))
}

fn print_info(i: &Info) {
    let owner = i.owner.clone().unwrap_or_else(|| i.owner_uid.to_string());
    println!("name:        {}", i.name);
    println!("cpus:        {}{}", i.cpus, if i.exclusive { " (exclusive)" } else { "" });
    println!("linux cpus:  {}", i.linux_cpus);
    println!("memory:      {} on {} pages at {}", format_size(i.mem_bytes), i.hugepages, i.mem_dir.display());
    println!("owner:       {owner} (uid {})", i.owner_uid);
    println!("created:     {}", i.created);
    if let Some(cg) = &i.cgroup {
        println!("cgroup:      {} (v{})", cg.display(), i.cgroup_version);
    }
    println!(
        "irqs:        {} steered to Linux CPUs, {} skipped{}",
        i.irqs_moved,
        i.irqs_skipped.len(),
        if i.irqs_skipped.is_empty() { String::new() } else { format!(" {:?}", i.irqs_skipped) }
    );
    if i.hugepages_added > 0 {
        println!("huge pages:  {} added to the pool", i.hugepages_added);
    }
    println!("state:       {}", state_word(i));
}

fn state_word(i: &Info) -> String {
    match (i.complete, i.busy_pid) {
        (false, _) => "incomplete (create did not finish): destroy it".into(),
        (true, Some(p)) => format!("busy: lwk run pid {p}"),
        (true, None) => "idle".into(),
    }
}

pub fn main(cmd: PartitionCmd) -> Result<i32> {
    match cmd {
        PartitionCmd::Create { name, cpus, mem, hugepages, owner: o } => {
            // Every argument is checked before anything is touched.
            validate_name(&name)?;
            let cpus = parse_cpu_list(&cpus)?;
            let mem_bytes = parse_size(&mem)?;
            let (owner_uid, owner_gid) = owner(o.as_deref())?;
            let req = Request { name, cpus, mem_bytes, page: hugepages.into(), owner_uid, owner_gid };
            let info = lwk_partition::create(&req)?;
            println!(
                "partition {} created: cpus {}, {} on {} pages, Linux keeps cpus {}",
                info.name,
                info.cpus,
                format_size(info.mem_bytes),
                info.hugepages,
                info.linux_cpus
            );
        }
        PartitionCmd::List => {
            let all = lwk_partition::list()?;
            println!("{:<20} {:<12} {:>10} {:<5} {:<12} busy", "name", "cpus", "mem", "pages", "owner");
            for i in &all {
                let owner = i.owner.clone().unwrap_or_else(|| i.owner_uid.to_string());
                let busy = match (i.complete, i.busy_pid) {
                    (false, _) => "incomplete".to_string(),
                    (true, Some(p)) => format!("pid {p}"),
                    (true, None) => "-".to_string(),
                };
                println!(
                    "{:<20} {:<12} {:>10} {:<5} {:<12} {busy}",
                    i.name,
                    i.cpus,
                    format_size(i.mem_bytes),
                    i.hugepages,
                    owner
                );
            }
        }
        PartitionCmd::Show { name, json } => {
            let i = lwk_partition::show(&name)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&i)?);
            } else {
                print_info(&i);
            }
        }
        PartitionCmd::Destroy { name, all, force } => {
            if all {
                for n in lwk_partition::destroy_all(force)? {
                    println!("partition {n} destroyed");
                }
            } else {
                let Some(name) = name else { bail!("destroy needs a partition name or --all") };
                lwk_partition::destroy(&name, force)?;
                println!("partition {name} destroyed");
            }
        }
        PartitionCmd::Log { name } => print!("{}", lwk_partition::read_log(&name)?),
    }
    Ok(0)
}
