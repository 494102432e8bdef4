//! The fixed work quantum: a loop that computes in registers only,
//! calibrated once, then repeated and timed on one pinned thread per CPU.

use std::hint::black_box;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

use anyhow::{bail, Context};
use rustix::thread::{sched_setaffinity, CpuSet};

use crate::tsc;

/// One quantum of work: `iterations` rounds of a xorshift step. The state
/// lives in one register; the loop reads and writes no memory. The result
/// depends on every round, so the compiler cannot shorten the loop, and the
/// caller passes the count and consumes the result through `black_box`, so
/// it cannot drop or hoist it either.
#[inline(never)]
fn work(iterations: u64) -> u64 {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..iterations {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
    }
    x
}

/// Runs one quantum and returns its duration in TSC ticks, with the CPU
/// the quantum ended on.
#[inline(always)]
fn timed_quantum(iterations: u64) -> (u64, usize) {
    let t0 = tsc::start();
    black_box(work(black_box(iterations)));
    let (t1, aux) = tsc::stop();
    (t1.wrapping_sub(t0), tsc::aux_cpu(aux))
}

/// Binds the calling thread to `cpu` alone.
pub fn pin_current_thread(cpu: usize) -> anyhow::Result<()> {
    let mut set = CpuSet::new();
    set.set(cpu);
    sched_setaffinity(None, &set).with_context(|| format!("cannot pin a thread to CPU {cpu}"))
}

/// The loop count chosen for a quantum and the shortest time it took.
#[derive(Clone, Copy, Debug)]
pub struct Calibration {
    pub iterations: u64,
    pub min_ticks: u64,
}

fn min_ticks(iterations: u64, reps: usize) -> u64 {
    (0..reps).map(|_| timed_quantum(iterations).0).min().unwrap_or(u64::MAX)
}

/// Finds the loop count whose undisturbed duration is `target_ticks`, on
/// the calling thread (pin it first). Each step times the loop `reps` times
/// and keeps the minimum: the minimum is the run nothing interrupted.
pub fn calibrate(target_ticks: u64, reps: usize) -> Calibration {
    let reps = reps.max(1);
    // Start small so that a huge quantum does not make the first guess slow.
    let mut iterations: u64 = 64;
    for _ in 0..4 {
        black_box(work(black_box(iterations)));
    }
    for step in 0..30 {
        let min = min_ticks(iterations, reps).max(1);
        let off = (min as f64 - target_ticks as f64).abs() / target_ticks as f64;
        if step > 0 && off < 0.005 {
            break;
        }
        // Scale at most 1000x a step: the first guesses are dominated by the
        // timer's own cost.
        let scale = (target_ticks as f64 / min as f64).clamp(1e-3, 1e3);
        iterations = ((iterations as f64 * scale).round() as u64).max(1);
    }
    Calibration { iterations, min_ticks: min_ticks(iterations, reps) }
}

/// One CPU's measurement: the duration of every quantum in TSC ticks.
#[derive(Debug)]
pub struct CpuTicks {
    pub cpu: usize,
    pub ticks: Vec<u64>,
}

const WAIT: u8 = 0;
const GO: u8 = 1;
const ABORT: u8 = 2;

/// Runs `samples` quanta of `iterations` on each CPU of `cpus` at the same
/// time, one pinned thread per CPU. The threads start measuring together,
/// once every one of them is pinned and has its buffer ready.
pub fn measure(cpus: &[usize], iterations: u64, samples: usize) -> anyhow::Result<Vec<CpuTicks>> {
    // Not a std Barrier: if a thread cannot be started, the ones already
    // waiting must be told to give up rather than wait forever.
    let ready = AtomicUsize::new(0);
    let start = AtomicU8::new(WAIT);
    let (ready, start) = (&ready, &start);
    std::thread::scope(|scope| {
        let mut threads = Vec::new();
        for &cpu in cpus {
            let spawned = std::thread::Builder::new().name(format!("fwq-cpu{cpu}")).spawn_scoped(
                scope,
                move || -> anyhow::Result<Option<CpuTicks>> {
                    let pinned = pin_current_thread(cpu);
                    // Every page of the result written before the first
                    // quantum, so that no page fault lands between quanta.
                    let mut ticks = vec![0u64; samples];
                    for t in ticks.iter_mut() {
                        *t = black_box(1);
                    }
                    ready.fetch_add(1, Ordering::AcqRel);
                    let go = loop {
                        match start.load(Ordering::Acquire) {
                            WAIT => std::thread::yield_now(),
                            s => break s == GO,
                        }
                    };
                    pinned?;
                    if !go {
                        return Ok(None);
                    }
                    for _ in 0..10 {
                        timed_quantum(iterations);
                    }
                    let mut elsewhere = 0usize;
                    for t in ticks.iter_mut() {
                        let (d, ran_on) = timed_quantum(iterations);
                        *t = d;
                        elsewhere += usize::from(ran_on != cpu);
                    }
                    if elsewhere > 0 {
                        bail!("the thread pinned to CPU {cpu} ended {elsewhere} of {samples} quanta on another CPU");
                    }
                    Ok(Some(CpuTicks { cpu, ticks }))
                },
            );
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => {
                    start.store(ABORT, Ordering::Release);
                    return Err(anyhow::Error::new(e).context(format!("cannot start the thread for CPU {cpu}")));
                }
            }
        }
        while ready.load(Ordering::Acquire) < cpus.len() {
            std::thread::yield_now();
        }
        start.store(GO, Ordering::Release);
        threads
            .into_iter()
            .map(|t| {
                let run = t.join().map_err(|_| anyhow::anyhow!("a measuring thread panicked"))??;
                run.ok_or_else(|| anyhow::anyhow!("measurement aborted"))
            })
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_depends_on_the_count() {
        assert_ne!(work(1), work(2));
        assert_eq!(work(0), 0x9e37_79b9_7f4a_7c15);
    }

    #[test]
    fn more_work_takes_longer_at_the_minimum() {
        // A 100x longer loop must have a longer minimum: the loop is not optimised away.
        let short = min_ticks(1_000, 50);
        let long = min_ticks(100_000, 50);
        assert!(long > short, "{short} vs {long}");
    }

    #[test]
    fn measure_returns_every_sample_for_every_cpu() {
        let cpus = crate::allowed_online_cpus().unwrap();
        let runs = measure(&cpus, 100, 50).unwrap();
        assert_eq!(runs.iter().map(|r| r.cpu).collect::<Vec<_>>(), cpus);
        assert!(runs.iter().all(|r| r.ticks.len() == 50 && r.ticks.iter().all(|&t| t > 0)));
    }
}
