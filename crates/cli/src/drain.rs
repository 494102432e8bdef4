//! `lwk drain NODE` and `lwk undrain NODE`: asked of NODE's daemon, which
//! moves its applications itself (`lwk_node::drain`); here, what it says,
//! as a progress bar on a terminal and a summary (or JSON).

use std::io::IsTerminal;
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use lwk_node::channel::{Channel, Role};
use lwk_node::key::DEFAULT_KEY_FILE;
use lwk_node::server::{Reply, Request};

#[derive(clap::Args)]
pub struct DrainArgs {
    /// The node to drain: its daemon, `HOST[:PORT]` (port 7070 by default).
    node: String,
    /// Where its applications go: a node's daemon (again for several: the
    /// applications are dealt out in turn).
    #[arg(long, required = true)]
    to: Vec<String>,
    /// The key, and the address each application's `lwk migrate` is given.
    #[command(flatten)]
    service: crate::migrate::Service,
    /// How many applications move at once.
    #[arg(long, default_value_t = 1)]
    parallel: usize,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct UndrainArgs {
    /// The node: its daemon, `HOST[:PORT]`.
    node: String,
    /// The cluster key.
    #[arg(long, default_value = DEFAULT_KEY_FILE)]
    key: PathBuf,
}

fn connect(node: &str, key: &std::path::Path) -> Result<Channel> {
    let key = lwk_node::key::load(key)?;
    let addr = crate::migrate::resolve(node)?;
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("cannot reach the node daemon at {addr}"))?;
    stream.set_nodelay(true)?;
    // A migration may take long; each says when it ends.
    stream.set_read_timeout(None)?;
    Channel::handshake(stream, &key, Role::Client).with_context(|| format!("the node daemon at {addr}"))
}

/// One application's fate, for the summary.
#[derive(Debug, serde::Serialize)]
struct Outcome {
    pid: i32,
    command: String,
    to: String,
    moved: bool,
    /// Why not (it goes on at the drained node).
    why: Option<String>,
    /// `lwk migrate --json`'s report.
    report: Option<serde_json::Value>,
}

pub fn drain(args: DrainArgs) -> Result<i32> {
    if args.parallel == 0 {
        bail!("--parallel 0: at least one migration at a time");
    }
    let mut ch = connect(&args.node, &args.service.key)?;
    let ask = lwk_node::drain::Ask {
        to: args.to.clone(),
        address: args.service.address.map(|a| a.to_string()),
        cluster: args.service.cluster,
        parallel: args.parallel,
    };
    ch.send(&Request::Drain(ask))?;
    let t0 = Instant::now();
    let apps = match ch.recv::<Reply>()? {
        Reply::Draining { apps } => apps,
        Reply::Failed { why } => bail!("{}: {why}", args.node),
        other => bail!("{} answered {other:?}", args.node),
    };
    let bar = (std::io::stderr().is_terminal() && !args.json).then(|| {
        let bar = indicatif::ProgressBar::new(apps.len() as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} applications moved {msg}")
                .expect("a valid template"),
        );
        bar
    });
    let mut outcomes: Vec<Outcome> = Vec::new();
    let command = |pid: i32| apps.iter().find(|a| a.0 == pid).map_or_else(String::new, |a| a.1.clone());
    let (moved, failed) = loop {
        match ch.recv::<Reply>()? {
            Reply::Moving { pid, to } => {
                if let Some(bar) = &bar {
                    bar.set_message(format!("(now {pid} to {to})"));
                }
            }
            Reply::Moved { pid, to, why, report } => {
                if let Some(bar) = &bar {
                    bar.inc(1);
                }
                let report = report.and_then(|r| serde_json::from_str(&r).ok());
                outcomes.push(Outcome { pid, command: command(pid), to, moved: why.is_none(), why, report });
            }
            Reply::Drained { moved, failed } => break (moved, failed),
            Reply::Failed { why } => bail!("{}: {why}", args.node),
            other => bail!("{} answered {other:?}", args.node),
        }
    };
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let total_ms = t0.elapsed().as_secs_f64() * 1e3;
    if args.json {
        let summary = serde_json::json!({
            "node": args.node, "moved": moved, "failed": failed, "total_ms": total_ms, "applications": outcomes,
        });
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        for o in &outcomes {
            match (&o.why, &o.report) {
                (None, Some(r)) => println!(
                    "moved {} ({}) to {}: frozen {:.0} ms, total {:.0} ms",
                    o.pid,
                    o.command,
                    o.to,
                    r["freeze_ms"].as_f64().unwrap_or(0.0),
                    r["total_ms"].as_f64().unwrap_or(0.0)
                ),
                (None, None) => println!("moved {} ({}) to {}", o.pid, o.command, o.to),
                (Some(why), _) => println!("not moved {} ({}): {why}", o.pid, o.command),
            }
        }
        println!(
            "{}: drained; {moved} of {} applications moved in {:.1} s{}; it takes no new application until lwk undrain",
            args.node,
            apps.len(),
            total_ms / 1e3,
            if failed > 0 { format!(", {failed} go on there") } else { String::new() }
        );
    }
    Ok(if failed > 0 { 1 } else { 0 })
}

pub fn undrain(args: UndrainArgs) -> Result<i32> {
    let mut ch = connect(&args.node, &args.key)?;
    ch.send(&Request::Undrain)?;
    match ch.recv::<Reply>()? {
        Reply::Undrained { was } => {
            println!("{}: takes applications again{}", args.node, if was { "" } else { " (it was not drained)" });
            Ok(0)
        }
        Reply::Failed { why } => bail!("{}: {why}", args.node),
        other => bail!("{} answered {other:?}", args.node),
    }
}
