//! `lwk checkpoint PID DIR`: freeze an lwk application (every process of
//! its tree) and write it to DIR/image.lwk (see `lwk_migrate::checkpoint`
//! for what the image holds).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use lwk_migrate::checkpoint::{freeze_and_capture, write_image, ProcessImage};
use lwk_migrate::image::ImageWriter;
use lwk_migrate::tree::Tree;

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
    let captured = freeze_and_capture(&tree, None, false, Duration::from_secs(5))?;
    let busy_retries = captured.retries;
    let written = (|| -> Result<_> {
        let processes: Vec<ProcessImage> = (0..tree.members.len())
            .map(|i| ProcessImage {
                frozen: &captured.frozen[i],
                info: &tree.members[i].info,
                table: &captured.descriptors.tables[i],
                sockets: &captured.sockets[i],
                only: None,
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
    }
    Ok(0)
}
