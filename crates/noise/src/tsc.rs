//! The time-stamp counter: ordered reads and its frequency, measured
//! against CLOCK_MONOTONIC.

#[cfg(not(target_arch = "x86_64"))]
compile_error!("lwk-noise times work quanta with the x86-64 time-stamp counter");

use std::arch::x86_64::{__rdtscp, _mm_lfence, _rdtsc};
use std::time::{Duration, Instant};

/// Reads the TSC before a timed region: the LFENCE keeps the read from
/// being executed before earlier instructions have completed.
#[inline(always)]
pub fn start() -> u64 {
    // SAFETY: LFENCE and RDTSC are available on every x86-64 CPU and touch no memory.
    unsafe {
        _mm_lfence();
        _rdtsc()
    }
}

/// Reads the TSC after a timed region, with the CPU's TSC_AUX value (Linux
/// puts the CPU number in its low 12 bits). RDTSCP waits for the timed
/// instructions to complete; the LFENCE keeps later ones from starting first.
#[inline(always)]
pub fn stop() -> (u64, u32) {
    let mut aux = 0u32;
    // SAFETY: RDTSCP is present on every CPU we run on (checked by
    // `check_cpu_flags` before any measurement); it only writes `aux`.
    let tsc = unsafe { __rdtscp(&mut aux) };
    // SAFETY: as above.
    unsafe { _mm_lfence() };
    (tsc, aux)
}

/// The CPU number recorded in a TSC_AUX value by Linux.
pub fn aux_cpu(aux: u32) -> usize {
    (aux & 0xfff) as usize
}

/// The CPU features the measurement relies on, read from /proc/cpuinfo.
/// Missing `rdtscp` is an error; a TSC that is not invariant only a warning,
/// returned for the caller to print.
pub fn check_cpu_flags() -> anyhow::Result<Option<String>> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo")
        .map_err(|e| anyhow::anyhow!("cannot read /proc/cpuinfo to check for the TSC: {e}"))?;
    let flags: Vec<&str> = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, f)| f.split_whitespace().collect())
        .unwrap_or_default();
    if !flags.contains(&"rdtscp") {
        anyhow::bail!("this CPU has no RDTSCP instruction (no 'rdtscp' flag in /proc/cpuinfo): cannot time quanta");
    }
    let missing: Vec<&str> = ["constant_tsc", "nonstop_tsc"].into_iter().filter(|f| !flags.contains(f)).collect();
    Ok((!missing.is_empty()).then(|| {
        format!(
            "the TSC may not tick at a constant rate (no {} in /proc/cpuinfo): durations may be off",
            missing.join(", ")
        )
    }))
}

/// Measures the TSC frequency in Hz against CLOCK_MONOTONIC (which is what
/// `Instant` reads on Linux): the median of `rounds` busy-waits of `window`.
pub fn measure_hz(window: Duration, rounds: usize) -> f64 {
    let mut estimates: Vec<f64> = (0..rounds.max(1))
        .map(|_| {
            // Each clock read is bracketed by two TSC reads and stands for
            // their middle; of a few tries the tightest bracket is kept, so an
            // interrupt between the reads does not skew the estimate.
            let bracket = || {
                (0..8)
                    .map(|_| {
                        let a = start();
                        let t = Instant::now();
                        let b = start();
                        (b - a, a / 2 + b / 2, t)
                    })
                    .min_by_key(|&(width, _, _)| width)
                    .map(|(_, tsc, t)| (tsc, t))
                    .expect("eight tries")
            };
            let (tsc0, t0) = bracket();
            let mut now = bracket();
            while now.1.duration_since(t0) < window {
                now = bracket();
            }
            let (tsc1, t1) = now;
            (tsc1 - tsc0) as f64 / t1.duration_since(t0).as_secs_f64()
        })
        .collect();
    estimates.sort_by(f64::total_cmp);
    estimates[estimates.len() / 2]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frequency_is_plausible() {
        let hz = measure_hz(Duration::from_millis(10), 3);
        // Any x86-64 TSC of the last 20 years ticks between 100 MHz and 10 GHz.
        assert!((1e8..1e10).contains(&hz), "{hz}");
    }

    #[test]
    fn tsc_advances_and_aux_names_a_cpu() {
        let t0 = start();
        let (t1, aux) = stop();
        assert!(t1 >= t0);
        let online = std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap();
        let online = lwk_partition::parse_cpu_list(&online).unwrap();
        assert!(online.contains(&aux_cpu(aux)), "TSC_AUX {aux:#x} is not an online CPU {online:?}");
    }
}
