//! `lwk noise`: the fixed work quantum (FWQ) OS-noise benchmark of the LLNL
//! ASC Sequoia suite. On each chosen CPU one pinned thread repeats the same
//! calibrated amount of pure register work; every repetition that takes
//! longer than the shortest one lost time to something else: an interrupt,
//! a timer tick, another task, the hypervisor.

pub mod fwq;
pub mod plot;
pub mod stats;
pub mod tsc;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use anyhow::{bail, Context};
use serde::Serialize;

use lwk_partition::{format_cpu_list, parse_cpu_list, CpuListError};
pub use stats::{summarize, Summary};

/// The largest quantum accepted: one second of work is far beyond any noise study.
pub const MAX_QUANTUM_US: u32 = 1_000_000;
/// The most samples accepted per CPU (8 bytes each while measuring).
pub const MAX_SAMPLES: usize = 100_000_000;

/// A CPU list given on the command line (`0`, `0-1`, `0,2-3`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuList(pub Vec<usize>);

impl FromStr for CpuList {
    type Err = CpuListError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_cpu_list(s).map(CpuList)
    }
}

/// Options of `lwk noise`.
#[derive(clap::Args, Clone, Debug)]
pub struct NoiseArgs {
    /// CPUs to measure on, like 0, 0-1 or 0,2-3 [default: every online CPU this process may run on].
    #[arg(long, value_name = "LIST")]
    pub cpus: Option<CpuList>,
    /// Quanta timed per CPU.
    #[arg(long, value_name = "N", default_value_t = 20_000)]
    pub samples: usize,
    /// Undisturbed duration of one quantum of work, in microseconds.
    #[arg(long, value_name = "U", default_value_t = 100)]
    pub quantum_us: u32,
    /// Draw every quantum's duration per CPU into an SVG chart.
    #[arg(long, value_name = "FILE")]
    pub svg: Option<PathBuf>,
    /// Write the table and every raw duration as JSON.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Logarithmic duration axis in the SVG chart.
    #[arg(long)]
    pub log_y: bool,
}

/// One CPU's result: the table row and the raw durations.
#[derive(Clone, Debug, Serialize)]
pub struct CpuResult {
    pub cpu: usize,
    #[serde(flatten)]
    pub summary: Summary,
    /// Every quantum's duration in µs, in the order they ran (rounded to ns).
    pub durations_us: Vec<f64>,
}

/// A whole run, as written by `--json`.
#[derive(Clone, Debug, Serialize)]
pub struct NoiseReport {
    pub benchmark: &'static str,
    pub quantum_us: u32,
    /// Rounds of the work loop in one quantum.
    pub loop_iterations: u64,
    /// The shortest quantum of the calibration pass, in µs.
    pub calibrated_min_us: f64,
    /// The CPU the calibration ran on.
    pub calibration_cpu: usize,
    /// TSC frequency measured against CLOCK_MONOTONIC.
    pub tsc_hz: f64,
    pub samples: usize,
    pub cpus: Vec<CpuResult>,
}

/// CPUs that are online and in this thread's affinity mask, ascending.
pub fn allowed_online_cpus() -> anyhow::Result<Vec<usize>> {
    let online = online_cpus()?;
    let mask = rustix::thread::sched_getaffinity(None).context("cannot read this process's CPU affinity")?;
    Ok(online.into_iter().filter(|&c| mask.is_set(c)).collect())
}

fn online_cpus() -> anyhow::Result<Vec<usize>> {
    const ONLINE: &str = "/sys/devices/system/cpu/online";
    let text = std::fs::read_to_string(ONLINE).with_context(|| format!("cannot read {ONLINE}"))?;
    parse_cpu_list(&text).with_context(|| format!("cannot parse {ONLINE}"))
}

/// Checks that every CPU asked for is online and in our affinity mask.
fn check_cpus(wanted: &[usize]) -> anyhow::Result<()> {
    let online = online_cpus()?;
    let allowed = allowed_online_cpus()?;
    for &cpu in wanted {
        if !online.contains(&cpu) {
            bail!("CPU {cpu} is not online (online CPUs: {})", format_cpu_list(&online));
        }
        if !allowed.contains(&cpu) {
            bail!(
                "CPU {cpu} is not in this process's CPU affinity mask (allowed: {}); a cpuset or taskset excludes it",
                format_cpu_list(&allowed)
            );
        }
    }
    Ok(())
}

/// An output file must be creatable: checked before measuring, so that a
/// typo costs no measurement and leaves nothing behind.
fn check_output(path: &Path, what: &str) -> anyhow::Result<()> {
    if path.is_dir() {
        bail!("{what} {} is a directory", path.display());
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !parent.is_dir() {
        bail!("{what} {}: directory {} does not exist", path.display(), parent.display());
    }
    Ok(())
}

fn validate(args: &NoiseArgs) -> anyhow::Result<Vec<usize>> {
    if args.samples == 0 {
        bail!("--samples must be at least 1");
    }
    if args.samples > MAX_SAMPLES {
        bail!("--samples {} is more than the {MAX_SAMPLES} accepted", args.samples);
    }
    if args.quantum_us == 0 || args.quantum_us > MAX_QUANTUM_US {
        bail!("--quantum-us must be between 1 and {MAX_QUANTUM_US}, not {}", args.quantum_us);
    }
    let cpus = match &args.cpus {
        Some(CpuList(c)) => {
            check_cpus(c)?;
            c.clone()
        }
        None => allowed_online_cpus()?,
    };
    if cpus.is_empty() {
        bail!("no online CPU is in this process's affinity mask");
    }
    if let Some(p) = &args.json {
        check_output(p, "--json")?;
    }
    if let Some(p) = &args.svg {
        check_output(p, "--svg")?;
    }
    Ok(cpus)
}

/// Runs the benchmark and returns its report; prints nothing, writes no file.
/// `warn` receives notes for the user (e.g. a TSC that is not invariant).
pub fn measure(args: &NoiseArgs, warn: &mut dyn FnMut(&str)) -> anyhow::Result<NoiseReport> {
    let cpus = validate(args)?;
    if let Some(w) = tsc::check_cpu_flags()? {
        warn(&w);
    }
    let tsc_hz = tsc::measure_hz(Duration::from_millis(20), 5);
    let target_ticks = (f64::from(args.quantum_us) * 1e-6 * tsc_hz).round().max(1.0) as u64;

    // Calibrate once, on the first CPU measured, on a thread of its own so
    // that the caller's affinity is left as it was.
    let calibration_cpu = cpus[0];
    // About 200 ms of calibration at the most, at least 5 repetitions a step.
    let reps = (200_000 / args.quantum_us as usize).clamp(5, 200);
    let calibration = std::thread::scope(|s| {
        s.spawn(|| -> anyhow::Result<fwq::Calibration> {
            fwq::pin_current_thread(calibration_cpu)?;
            Ok(fwq::calibrate(target_ticks, reps))
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the calibration thread panicked"))?
    })?;

    let runs = fwq::measure(&cpus, calibration.iterations, args.samples)?;
    let to_us = |ticks: u64| (ticks as f64 / tsc_hz * 1e9).round() / 1e3;
    let cpus = runs
        .into_iter()
        .map(|run| {
            let durations_us: Vec<f64> = run.ticks.iter().map(|&t| to_us(t)).collect();
            let summary = summarize(&durations_us).expect("samples >= 1 was checked");
            CpuResult { cpu: run.cpu, summary, durations_us }
        })
        .collect();
    Ok(NoiseReport {
        benchmark: "fwq",
        quantum_us: args.quantum_us,
        loop_iterations: calibration.iterations,
        calibrated_min_us: to_us(calibration.min_ticks),
        calibration_cpu,
        tsc_hz,
        samples: args.samples,
        cpus,
    })
}

/// Writes the per-CPU table.
pub fn write_table(report: &NoiseReport, out: &mut dyn Write) -> std::io::Result<()> {
    writeln!(
        out,
        "FWQ: quantum {} us ({} loop iterations, {:.3} us at the minimum on CPU {}), {} samples per CPU, TSC {:.3} GHz",
        report.quantum_us,
        report.loop_iterations,
        report.calibrated_min_us,
        report.calibration_cpu,
        report.samples,
        report.tsc_hz / 1e9
    )?;
    writeln!(
        out,
        "{:>4} {:>9} {:>11} {:>11} {:>11} {:>11} {:>8}",
        "cpu", "samples", "min_us", "median_us", "p99_us", "max_us", "noise_%"
    )?;
    for c in &report.cpus {
        let s = &c.summary;
        writeln!(
            out,
            "{:>4} {:>9} {:>11.3} {:>11.3} {:>11.3} {:>11.3} {:>8.4}",
            c.cpu, s.samples, s.min_us, s.median_us, s.p99_us, s.max_us, s.noise_percent
        )?;
    }
    Ok(())
}

/// `lwk noise`: measure, print the table on stdout, write the files asked for.
pub fn run(args: &NoiseArgs) -> anyhow::Result<()> {
    let report = measure(args, &mut |w| eprintln!("lwk noise: warning: {w}"))?;
    let mut stdout = std::io::stdout().lock();
    write_table(&report, &mut stdout).context("cannot write the table to stdout")?;
    if let Some(path) = &args.json {
        let mut text = serde_json::to_string(&report).context("cannot encode the report as JSON")?;
        text.push('\n');
        std::fs::write(path, text).with_context(|| format!("cannot write --json {}", path.display()))?;
    }
    if let Some(path) = &args.svg {
        plot::write_svg(&report, path, args.log_y).with_context(|| format!("cannot write --svg {}", path.display()))?;
    }
    Ok(())
}
