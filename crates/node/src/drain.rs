//! A drained node (`lwk drain`): its applications are moved to other
//! nodes, and it takes no new ones, neither started here (`lwk run`) nor
//! migrated here, until `lwk undrain`.
//!
//! The mark is a file under /run/lwk/drained named by this network
//! namespace (a node is a network namespace: one per machine, several in
//! the simulated cluster); /run is a tmpfs, so a reboot undrains.

use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::channel::Channel;
use crate::server::{log, Config, Reply};

fn mark() -> Result<PathBuf> {
    let link = std::fs::read_link("/proc/self/ns/net").context("this process's network namespace")?;
    let id: String = link.to_string_lossy().chars().filter(char::is_ascii_digit).collect();
    Ok(PathBuf::from(format!("/run/lwk/drained/{id}")))
}

/// Since when this node is drained (seconds since the epoch), if it is.
pub fn drained() -> Option<u64> {
    let text = std::fs::read_to_string(mark().ok()?).ok()?;
    Some(text.trim().parse().unwrap_or(0))
}

/// Mark this node drained.
pub fn set() -> Result<()> {
    let mark = mark()?;
    std::fs::create_dir_all(mark.parent().expect("a parent"))?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    std::fs::write(&mark, format!("{now}\n")).with_context(|| format!("cannot write {}", mark.display()))
}

/// Take applications again; whether it was drained.
pub fn clear() -> Result<bool> {
    let mark = mark()?;
    match std::fs::remove_file(&mark) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("cannot remove {}", mark.display())),
    }
}

/// The error of an application refused because this node is drained.
pub fn refusal() -> String {
    "this node is drained (lwk drain): it takes no new application until lwk undrain".to_string()
}

/// The daemon's side of `lwk drain`: mark this node drained, then move
/// every lwk application of this node (each process tree, by its first
/// process) to the nodes `to`, in turn, `parallel` at a time, with `lwk
/// migrate` (the same command a user would run: `--address`, `--cluster`
/// as given). What it says: [`Reply::Draining`] with the applications,
/// [`Reply::Moving`] and [`Reply::Moved`] for each, [`Reply::Drained`] at
/// the end.
pub fn serve(ch: &mut Channel, config: &Config, ask: &Ask) -> Result<()> {
    use std::sync::mpsc;
    if ask.to.is_empty() {
        ch.send(&Reply::Failed { why: "name at least one node to move the applications to".into() })?;
        return Ok(());
    }
    set()?;
    log("drained: this node takes no new application");
    let apps = roots();
    ch.send(&Reply::Draining { apps: apps.clone() })?;
    let (said, hear) = mpsc::channel::<Reply>();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let (mut moved, mut failed) = (0, 0);
    std::thread::scope(|s| -> Result<()> {
        for _ in 0..ask.parallel.clamp(1, apps.len().max(1)) {
            let said = said.clone();
            let (apps, next) = (&apps, &next);
            s.spawn(move || loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let Some((pid, _)) = apps.get(i) else { break };
                let to = &ask.to[i % ask.to.len()];
                said.send(Reply::Moving { pid: *pid, to: to.clone() }).ok();
                said.send(migrate(config, ask, *pid, to)).ok();
            });
        }
        drop(said);
        for reply in hear {
            if let Reply::Moved { pid, ref to, ref why, .. } = reply {
                match why {
                    None => moved += 1,
                    Some(why) => {
                        failed += 1;
                        log(&format!("drain: process {pid} did not move to {to}: {why}"));
                    }
                }
            }
            ch.send(&reply)?;
        }
        Ok(())
    })?;
    log(&format!("drain: {moved} applications moved, {failed} not"));
    ch.send(&Reply::Drained { moved, failed })?;
    Ok(())
}

/// What `lwk drain` asks.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Ask {
    /// The nodes' daemons to move the applications to (`HOST[:PORT]`).
    pub to: Vec<String>,
    /// `lwk migrate --address`, and `--cluster`.
    pub address: Option<String>,
    pub cluster: bool,
    /// How many migrations at once.
    pub parallel: usize,
}

/// The lwk applications of this node (this network namespace): the first
/// process of each tree, with its command.
fn roots() -> Vec<(i32, String)> {
    let here = std::fs::read_link("/proc/self/ns/net").ok();
    let mut roots: Vec<(i32, String)> = Vec::new();
    // Every process of a tree already found: its tree is not walked again.
    let mut seen = std::collections::HashSet::new();
    for app in lwk_migrate::app::App::list() {
        if seen.contains(&app.pid) || std::fs::read_link(format!("/proc/{}/ns/net", app.pid)).ok() != here {
            continue;
        }
        let Ok(tree) = lwk_migrate::tree::Tree::attach(app.pid) else { continue };
        seen.extend(tree.pids());
        let root = &tree.members[0];
        roots.push((root.app.pid, root.info.command.clone()));
    }
    roots
}

/// `lwk migrate PID --to TO --json`: its report, or why not.
fn migrate(config: &Config, ask: &Ask, pid: i32, to: &str) -> Reply {
    let mut cmd = std::process::Command::new(&config.lwk);
    cmd.args(["migrate", &pid.to_string(), "--to", to, "--json", "--key"]).arg(&config.key_file);
    if let Some(a) = &ask.address {
        cmd.args(["--address", a]);
    }
    if ask.cluster {
        cmd.arg("--cluster");
    }
    let moved = |why: Option<String>, report: Option<String>| Reply::Moved { pid, to: to.to_string(), why, report };
    match cmd.stdin(std::process::Stdio::null()).output() {
        Ok(o) if o.status.success() => moved(None, Some(String::from_utf8_lossy(&o.stdout).into_owned())),
        Ok(o) => moved(Some(String::from_utf8_lossy(&o.stderr).trim().to_string()), None),
        Err(e) => moved(Some(format!("cannot run {}: {e}", config.lwk.display())), None),
    }
}
