//! CPU lists in the kernel's notation (`0`, `0-3`, `0,2-3`), as in
//! /sys/devices/system/cpu/online and `taskset -c`.

use thiserror::Error;

/// The largest CPU number accepted: the size of the kernel's `cpu_set_t`.
pub const MAX_CPU: usize = rustix::thread::CpuSet::MAX_CPU;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum CpuListError {
    #[error("empty CPU list")]
    Empty,
    #[error("empty item in CPU list {0:?} (stray comma?)")]
    EmptyItem(String),
    #[error("{item:?} in CPU list {list:?} is not a CPU number or a range like 2-3")]
    NotANumber { list: String, item: String },
    #[error("range {item:?} in CPU list {list:?} goes backwards")]
    Backwards { list: String, item: String },
    #[error("CPU {cpu} in CPU list {list:?} is beyond the largest possible CPU {max}")]
    TooLarge { list: String, cpu: usize, max: usize },
    #[error("CPU {cpu} appears twice in CPU list {list:?}")]
    Duplicate { list: String, cpu: usize },
}

/// Parses a CPU list into CPU numbers in ascending order. Every CPU may
/// appear once only: a repeated CPU is most likely a typo.
pub fn parse_cpu_list(list: &str) -> Result<Vec<usize>, CpuListError> {
    let trimmed = list.trim();
    if trimmed.is_empty() {
        return Err(CpuListError::Empty);
    }
    let number = |item: &str, s: &str| -> Result<usize, CpuListError> {
        let s = s.trim();
        let not_a_number = || CpuListError::NotANumber { list: list.to_string(), item: item.to_string() };
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(not_a_number());
        }
        let cpu: usize = s.parse().map_err(|_| not_a_number())?;
        if cpu >= MAX_CPU {
            return Err(CpuListError::TooLarge { list: list.to_string(), cpu, max: MAX_CPU - 1 });
        }
        Ok(cpu)
    };
    let mut cpus = Vec::new();
    for item in trimmed.split(',') {
        if item.trim().is_empty() {
            return Err(CpuListError::EmptyItem(list.to_string()));
        }
        let (first, last) = match item.split_once('-') {
            Some((a, b)) => (number(item, a)?, number(item, b)?),
            None => {
                let cpu = number(item, item)?;
                (cpu, cpu)
            }
        };
        if last < first {
            return Err(CpuListError::Backwards { list: list.to_string(), item: item.trim().to_string() });
        }
        cpus.extend(first..=last);
    }
    cpus.sort_unstable();
    if let Some(w) = cpus.windows(2).find(|w| w[0] == w[1]) {
        return Err(CpuListError::Duplicate { list: list.to_string(), cpu: w[0] });
    }
    Ok(cpus)
}

/// Formats CPU numbers back into the compact notation (`0-3,5`).
pub fn format_cpu_list(cpus: &[usize]) -> String {
    let mut sorted = cpus.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut parts = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let mut j = i;
        while j + 1 < sorted.len() && sorted[j + 1] == sorted[j] + 1 {
            j += 1;
        }
        parts.push(if i == j { format!("{}", sorted[i]) } else { format!("{}-{}", sorted[i], sorted[j]) });
        i = j + 1;
    }
    parts.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_ranges_and_mixtures() {
        assert_eq!(parse_cpu_list("0").unwrap(), vec![0]);
        assert_eq!(parse_cpu_list("0-1").unwrap(), vec![0, 1]);
        assert_eq!(parse_cpu_list("0,2-3").unwrap(), vec![0, 2, 3]);
        assert_eq!(parse_cpu_list("5,1-2").unwrap(), vec![1, 2, 5]);
        assert_eq!(parse_cpu_list(" 3 - 4 , 7\n").unwrap(), vec![3, 4, 7]);
        assert_eq!(parse_cpu_list("2-2").unwrap(), vec![2]);
    }

    #[test]
    fn bad_lists_are_named() {
        assert_eq!(parse_cpu_list(""), Err(CpuListError::Empty));
        assert_eq!(parse_cpu_list("  "), Err(CpuListError::Empty));
        assert_eq!(parse_cpu_list("0,"), Err(CpuListError::EmptyItem("0,".into())));
        assert_eq!(parse_cpu_list("a"), Err(CpuListError::NotANumber { list: "a".into(), item: "a".into() }));
        assert_eq!(parse_cpu_list("-1"), Err(CpuListError::NotANumber { list: "-1".into(), item: "-1".into() }));
        assert_eq!(parse_cpu_list("1-"), Err(CpuListError::NotANumber { list: "1-".into(), item: "1-".into() }));
        assert_eq!(
            parse_cpu_list("1-2-3"),
            Err(CpuListError::NotANumber { list: "1-2-3".into(), item: "1-2-3".into() })
        );
        assert_eq!(parse_cpu_list("3-1"), Err(CpuListError::Backwards { list: "3-1".into(), item: "3-1".into() }));
        assert_eq!(parse_cpu_list("0-2,1"), Err(CpuListError::Duplicate { list: "0-2,1".into(), cpu: 1 }));
        assert!(matches!(parse_cpu_list("99999999"), Err(CpuListError::TooLarge { cpu: 99999999, .. })));
        assert!(matches!(parse_cpu_list("99999999999999999999999"), Err(CpuListError::NotANumber { .. })));
        let msg = parse_cpu_list("0,x").unwrap_err().to_string();
        assert!(msg.contains("\"x\"") && msg.contains("\"0,x\""), "{msg}");
    }

    #[test]
    fn format_round_trips() {
        for list in ["0", "0-1", "0,2-3", "1,3,5-9,11"] {
            assert_eq!(format_cpu_list(&parse_cpu_list(list).unwrap()), list);
        }
        assert_eq!(format_cpu_list(&[]), "");
    }
}
