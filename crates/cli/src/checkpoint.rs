//! `lwk checkpoint PID DIR`: freeze an lwk application (every process of
//! its tree) and write it to DIR/image.lwk (see `lwk_migrate::checkpoint`
//! for what the image holds).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use lwk_migrate::checkpoint::{freeze_and_capture, tcp_endpoints, write_image, CheckpointError, ProcessImage};
use lwk_migrate::image::ImageWriter;
use lwk_migrate::tree::Tree;
use lwk_node::quiet::Quiet;

#[derive(clap::Args)]
pub struct CheckpointArgs {
    /// The application: its application process or its `lwk run` (see `lwk ps`).
    pid: i32,
    /// A directory for the image (created if missing; must not hold one).
    dir: PathBuf,
    /// Let the application go on afterwards (by default it is stopped: killed
    /// once the image is complete).
    #[arg(long)]
    leave_running: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// The image's file name in DIR.
pub const IMAGE_FILE: &str = "image.lwk";

pub fn main(args: CheckpointArgs) -> Result<i32> {
    let tree = Tree::attach(args.pid)?;
    let root = &tree.members[0];
    std::fs::create_dir_all(&args.dir).with_context(|| format!("cannot create {}", args.dir.display()))?;
    let path = args.dir.join(IMAGE_FILE);
    if path.exists() {
        bail!("{} already holds an image: choose another directory or remove it", args.dir.display());
    }
    // Written under another name and renamed when complete: a file named
    // image.lwk is always a whole image.
    let partial = args.dir.join(format!("{IMAGE_FILE}.partial"));
    let file = std::fs::File::create(&partial).with_context(|| format!("cannot create {}", partial.display()))?;
    let t0 = Instant::now();
    // An application that stops leaves TCP connections that its restore
    // goes on with: their peers' segments are dropped from before its
    // sockets are captured (a socket in repair mode still acknowledges
    // data) until that restore, not answered with resets by this node.
    let proxies: Vec<i32> = tree.members.iter().map(|m| m.info.proxy_pid).collect();
    let netns = other_netns(proxies[0]);
    let mut hold: Option<(Quiet, Vec<std::net::SocketAddr>)> = None;
    let mut hold_endpoints = |d: &lwk_migrate::checkpoint::Descriptors| {
        let endpoints = tcp_endpoints(&proxies, &d.tables);
        if args.leave_running || hold.as_ref().map(|h| &h.1) == Some(&endpoints) {
            return Ok(());
        }
        hold = None; // another try found other sockets
        if !endpoints.is_empty() {
            let q = Quiet::endpoints(&endpoints, netns.as_deref())
                .map_err(|e| CheckpointError::Hold { pid: root.app.pid, what: format!("{e:#}") })?;
            hold = Some((q, endpoints));
        }
        Ok(())
    };
    let captured = freeze_and_capture(&tree, None, false, Duration::from_secs(5), &mut hold_endpoints)?;
    let busy_retries = captured.retries;
    let held_by = hold.as_ref().map(|_| {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        format!("lwk-held-{}-{now}", root.app.pid)
    });
    let written = (|| -> Result<_> {
        let processes: Vec<ProcessImage> = (0..tree.members.len())
            .map(|i| ProcessImage {
                frozen: &captured.frozen[i],
                info: &tree.members[i].info,
                table: &captured.descriptors.tables[i],
                sockets: &captured.sockets[i],
                only: None,
                held_by: if i == 0 { held_by.as_deref() } else { None },
            })
            .collect();
        let w = ImageWriter::new(std::io::BufWriter::new(file), None)?;
        let (written, w) = write_image(&processes, &captured.tree, w)?;
        let f = w.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        Ok(written)
    })();
    let written = match written {
        Ok(w) => w,
        Err(e) => {
            captured.resume().ok();
            std::fs::remove_file(&partial).ok();
            return Err(e.context(format!("checkpoint of process {} failed; it goes on", root.app.pid)));
        }
    };
    std::fs::rename(&partial, &path).with_context(|| format!("cannot rename {}", partial.display()))?;
    let frozen_ms = t0.elapsed().as_secs_f64() * 1e3;
    let endpoints: Vec<String> = hold.as_ref().map_or(Vec::new(), |h| h.1.iter().map(|e| e.to_string()).collect());
    if let (Some((quiet, _)), Some(name)) = (hold, &held_by) {
        if let Err(e) = quiet.keep_as(name) {
            captured.resume().ok();
            std::fs::remove_file(&path).ok();
            return Err(e.context(format!("checkpoint of process {} failed; it goes on", root.app.pid)));
        }
    }
    if args.leave_running {
        captured.resume()?;
    } else {
        // The image is complete: the application ends where it stands
        // (its `lwk run` reports the SIGKILL), its connections closed
        // silently (a restore goes on with them).
        captured.end();
    }
    let m = &written.manifest;
    let all = || std::iter::once(m).chain(&written.others);
    let threads: u32 = all().map(|m| m.threads).sum();
    let memory: u64 = all().map(|m| m.memory_bytes).sum();
    if args.json {
        let report = serde_json::json!({
            "image": path,
            "manifest": m,
            "processes": 1 + written.others.len(),
            "other_manifests": written.others,
            "image_bytes": written.image_bytes,
            "write_seconds": written.seconds,
            "frozen_ms": frozen_ms,
            "busy_retries": busy_retries,
            "left_running": args.leave_running,
            "held_by": held_by,
            "held_endpoints": endpoints,
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "checkpoint of {} ({}): {} process{}, {} threads, {:.1} MiB of memory; image {} ({:.1} MiB) in {:.0} ms; \
             frozen {:.0} ms; {}",
            m.pid,
            m.command,
            1 + written.others.len(),
            if written.others.is_empty() { "" } else { "es" },
            threads,
            memory as f64 / (1 << 20) as f64,
            path.display(),
            written.image_bytes as f64 / (1 << 20) as f64,
            written.seconds * 1e3,
            frozen_ms,
            if args.leave_running { "left running" } else { "stopped" }
        );
        if let Some(name) = &held_by {
            println!(
                "TCP to {} is dropped here until `lwk restore {}` on this node rebuilds its connections \
                 (or `nft delete table inet {name}` lets it in again)",
                endpoints.join(", "),
                args.dir.display()
            );
        }
    }
    Ok(0)
}

/// The network namespace of process `pid`, if it is not ours.
fn other_netns(pid: i32) -> Option<PathBuf> {
    let theirs = PathBuf::from(format!("/proc/{pid}/ns/net"));
    let same = std::fs::read_link(&theirs).ok()? == std::fs::read_link("/proc/self/ns/net").ok()?;
    (!same).then_some(theirs)
}
