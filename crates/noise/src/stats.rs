//! Summary statistics of one CPU's work-quantum durations.

use serde::Serialize;

/// What the table shows for one CPU. All times in microseconds.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Summary {
    pub samples: usize,
    pub min_us: f64,
    pub median_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    /// The share of the total time that was not work: (sum - samples*min) / sum, in percent.
    pub noise_percent: f64,
}

/// The nearest-rank percentile (`p` in 0..=100) of sorted values: the
/// smallest value that at least p% of the values are less than or equal to.
/// It is always one of the measured values.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    assert!(!sorted.is_empty(), "percentile of no values");
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The median: the middle value, or the mean of the two middle ones.
pub fn median(sorted: &[f64]) -> f64 {
    assert!(!sorted.is_empty(), "median of no values");
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

/// Summarises durations (µs). `None` for no durations.
pub fn summarize(durations_us: &[f64]) -> Option<Summary> {
    if durations_us.is_empty() {
        return None;
    }
    let mut sorted = durations_us.to_vec();
    sorted.sort_by(f64::total_cmp);
    let min = sorted[0];
    let sum: f64 = sorted.iter().sum();
    let noise = if sum > 0.0 { (sum - sorted.len() as f64 * min) / sum * 100.0 } else { 0.0 };
    Some(Summary {
        samples: sorted.len(),
        min_us: min,
        median_us: median(&sorted),
        p99_us: percentile(&sorted, 99.0),
        max_us: sorted[sorted.len() - 1],
        // Rounding in the sum can make a noiseless run come out a hair below zero.
        noise_percent: noise.max(0.0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        // 1..=100 shuffled: min 1, median 50.5, p99 99, max 100.
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        v.reverse();
        v.swap(3, 77);
        let s = summarize(&v).unwrap();
        assert_eq!(s.samples, 100);
        assert_eq!(s.min_us, 1.0);
        assert_eq!(s.median_us, 50.5);
        assert_eq!(s.p99_us, 99.0);
        assert_eq!(s.max_us, 100.0);
        // sum 5050, 100*min = 100: 4950/5050.
        assert!((s.noise_percent - 4950.0 / 5050.0 * 100.0).abs() < 1e-9);
    }

    #[test]
    fn noiseless_run_has_zero_noise() {
        let s = summarize(&[100.0; 1000]).unwrap();
        assert_eq!((s.min_us, s.median_us, s.p99_us, s.max_us), (100.0, 100.0, 100.0, 100.0));
        assert_eq!(s.noise_percent, 0.0);
    }

    #[test]
    fn one_interruption() {
        // 999 quanta of 100 µs and one of 1100 µs (1 ms stolen): noise = 1000 / 101000.
        let mut v = vec![100.0; 999];
        v.insert(500, 1100.0);
        let s = summarize(&v).unwrap();
        assert_eq!(s.median_us, 100.0);
        assert_eq!(s.p99_us, 100.0);
        assert_eq!(s.max_us, 1100.0);
        assert!((s.noise_percent - 1000.0 / 101000.0 * 100.0).abs() < 1e-9);
    }

    #[test]
    fn small_inputs() {
        let s = summarize(&[7.0]).unwrap();
        assert_eq!((s.min_us, s.median_us, s.p99_us, s.max_us, s.noise_percent), (7.0, 7.0, 7.0, 7.0, 0.0));
        let s = summarize(&[3.0, 1.0]).unwrap();
        assert_eq!((s.min_us, s.median_us, s.p99_us, s.max_us), (1.0, 2.0, 3.0, 3.0));
        assert!((s.noise_percent - 50.0).abs() < 1e-12);
        assert_eq!(summarize(&[]), None);
    }

    #[test]
    fn percentile_is_nearest_rank() {
        let v: Vec<f64> = (1..=200).map(f64::from).collect();
        assert_eq!(percentile(&v, 99.0), 198.0);
        assert_eq!(percentile(&v, 50.0), 100.0);
        assert_eq!(percentile(&v, 100.0), 200.0);
        assert_eq!(percentile(&v, 0.0), 1.0);
    }
}
