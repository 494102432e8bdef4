//! `lwk checkpoint PID DIR`: freeze an lwk application and write it to
//! DIR/image.lwk (see `lwk_migrate::checkpoint` for what the image holds).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use lwk_migrate::app::App;
use lwk_migrate::checkpoint::{capture_descriptors, capture_sockets, write_image};
use lwk_migrate::image::ImageWriter;

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
    let app = App::attach(args.pid)?;
    let info = app.info();
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
    let frozen = app.freeze(Duration::from_secs(5))?;
    let mut sockets = None;
    let written = capture_descriptors(app.pid, info.proxy_pid, None, false)
        .and_then(|(table, _)| {
            let s = capture_sockets(info.proxy_pid, &table)?;
            Ok((table, sockets.insert(s)))
        })
        .map_err(anyhow::Error::from)
        .and_then(|(table, s)| {
            let w = ImageWriter::new(std::io::BufWriter::new(file), None)?;
            Ok(write_image(&frozen, &info, &table, s, None, w)?)
        })
        .and_then(|(written, w)| {
            let f = w.into_inner().map_err(|e| e.into_error())?;
            f.sync_all()?;
            Ok(written)
        });
    let written = match written {
        Ok(w) => w,
        Err(e) => {
            if let Some(s) = sockets {
                s.resume();
            }
            drop(frozen); // resumes
            std::fs::remove_file(&partial).ok();
            return Err(e.context(format!("checkpoint of process {} failed; it goes on", app.pid)));
        }
    };
    let sockets = sockets.expect("captured when the image was written");
    std::fs::rename(&partial, &path).with_context(|| format!("cannot rename {}", partial.display()))?;
    let frozen_ms = t0.elapsed().as_secs_f64() * 1e3;
    if args.leave_running {
        sockets.resume();
        frozen.resume()?;
    } else {
        // The image is complete: the application ends where it stands
        // (its `lwk run` reports the SIGKILL), its connections closed
        // silently (a restore goes on with them).
        frozen.kill();
        sockets.release();
    }
    let m = &written.manifest;
    if args.json {
        let report = serde_json::json!({
            "image": path,
            "manifest": m,
            "image_bytes": written.image_bytes,
            "write_seconds": written.seconds,
            "frozen_ms": frozen_ms,
            "left_running": args.leave_running,
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "checkpoint of {} ({}): {} threads, {:.1} MiB of memory in {} pieces; image {} ({:.1} MiB) in {:.0} ms; \
             frozen {:.0} ms; {}",
            m.pid,
            m.command,
            m.threads,
            m.memory_bytes as f64 / (1 << 20) as f64,
            m.memory_pieces,
            path.display(),
            written.image_bytes as f64 / (1 << 20) as f64,
            written.seconds * 1e3,
            frozen_ms,
            if args.leave_running { "left running" } else { "stopped" }
        );
    }
    Ok(0)
}
