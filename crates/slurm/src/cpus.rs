//! CPU lists in the kernel's and Slurm's list format ("0-3,8,10-11") and the
//! choice of the partition's CPUs inside a job's allocation.

use crate::Error;

/// Parses "0-3,8" into sorted, deduplicated CPU numbers.
pub fn parse_cpu_list(text: &str) -> Result<Vec<u32>, Error> {
    let bad = |why: &str| Error::Invalid(format!("CPU list {text:?}: {why}"));
    let mut cpus = Vec::new();
    for piece in text.trim().split(',') {
        let piece = piece.trim();
        if piece.is_empty() {
            return Err(bad("empty element"));
        }
        let number = |s: &str| s.trim().parse::<u32>().map_err(|_| bad(&format!("{s:?} is not a CPU number")));
        match piece.split_once('-') {
            Some((lo, hi)) => {
                let (lo, hi) = (number(lo)?, number(hi)?);
                if lo > hi {
                    return Err(bad(&format!("range {piece} goes backwards")));
                }
                if hi - lo > 65535 {
                    return Err(bad(&format!("range {piece} is too large")));
                }
                cpus.extend(lo..=hi);
            }
            None => cpus.push(number(piece)?),
        }
    }
    cpus.sort_unstable();
    cpus.dedup();
    Ok(cpus)
}

/// Formats sorted CPU numbers as a list with ranges: [0,1,2,5] -> "0-2,5".
pub fn format_cpu_list(cpus: &[u32]) -> String {
    let mut out = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let start = cpus[i];
        let mut end = start;
        while i + 1 < cpus.len() && cpus[i + 1] == end + 1 {
            i += 1;
            end = cpus[i];
        }
        out.push(if start == end { start.to_string() } else { format!("{start}-{end}") });
        i += 1;
    }
    out.join(",")
}

/// What the user asked for with `--lwk-cpus`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CpuRequest {
    /// N CPUs, chosen from the job's allocation on the node.
    Count(u32),
    /// Exactly these CPUs.
    List(Vec<u32>),
}

impl CpuRequest {
    /// "N" (a plain number) or a CPU list ("2", is a count; "2-3", "1,3" are lists;
    /// a single CPU as a list is written "3-3" or "3,").
    pub fn parse(text: &str) -> Result<Self, Error> {
        let text = text.trim();
        if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
            let n: u32 = text.parse().map_err(|_| Error::Invalid(format!("--lwk-cpus={text}: number too large")))?;
            if n == 0 {
                return Err(Error::Invalid("--lwk-cpus=0: at least one CPU is needed".into()));
            }
            return Ok(CpuRequest::Count(n));
        }
        let list = text.trim_end_matches(',');
        Ok(CpuRequest::List(parse_cpu_list(list).map_err(|e| Error::Invalid(format!("--lwk-cpus: {e}")))?))
    }

    /// The partition's CPUs inside `allocated` (the job's CPUs on this node).
    /// At least one allocated CPU always stays with Linux: slurmstepd, the
    /// proxies and `lwk run` itself run there.
    pub fn choose(&self, allocated: &[u32]) -> Result<Vec<u32>, Error> {
        let alloc = format_cpu_list(allocated);
        match self {
            CpuRequest::Count(n) => {
                let n = *n as usize;
                if n >= allocated.len() {
                    return Err(Error::Policy(format!(
                        "--lwk-cpus={n}: the job has {} CPU(s) on this node ({alloc}) and one must stay with Linux; \
                         ask for at most {} or allocate more CPUs (e.g. -c {})",
                        allocated.len(),
                        allocated.len().saturating_sub(1),
                        n + 1
                    )));
                }
                // The highest-numbered CPUs: CPU 0 (or the lowest of the job)
                // usually takes the interrupts, keep it for Linux.
                Ok(allocated[allocated.len() - n..].to_vec())
            }
            CpuRequest::List(list) => {
                let outside: Vec<u32> = list.iter().copied().filter(|c| !allocated.contains(c)).collect();
                if !outside.is_empty() {
                    return Err(Error::Policy(format!(
                        "--lwk-cpus={}: CPU(s) {} are not allocated to the job on this node (it has {alloc})",
                        format_cpu_list(list),
                        format_cpu_list(&outside)
                    )));
                }
                if list.len() >= allocated.len() {
                    return Err(Error::Policy(format!(
                        "--lwk-cpus={}: that is every CPU of the job on this node ({alloc}); one must stay with Linux",
                        format_cpu_list(list)
                    )));
                }
                Ok(list.clone())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_parse_and_format_round_trip() {
        assert_eq!(parse_cpu_list("0-2,5,4").unwrap(), vec![0, 1, 2, 4, 5]);
        assert_eq!(format_cpu_list(&[0, 1, 2, 4, 5, 7]), "0-2,4-5,7");
        assert_eq!(parse_cpu_list(" 3 ").unwrap(), vec![3]);
        assert!(parse_cpu_list("2-1").is_err());
        assert!(parse_cpu_list("a").is_err());
        assert!(parse_cpu_list("1,,2").is_err());
    }

    #[test]
    fn count_takes_highest_cpus_and_keeps_one_for_linux() {
        let r = CpuRequest::parse("2").unwrap();
        assert_eq!(r, CpuRequest::Count(2));
        assert_eq!(r.choose(&[0, 1, 2, 3]).unwrap(), vec![2, 3]);
        let err = r.choose(&[4, 5]).unwrap_err().to_string();
        assert!(err.contains("one must stay with Linux"), "{err}");
        assert!(CpuRequest::parse("0").is_err());
    }

    #[test]
    fn list_must_be_inside_allocation_and_leave_one() {
        let r = CpuRequest::parse("1,3").unwrap();
        assert_eq!(r, CpuRequest::List(vec![1, 3]));
        assert_eq!(r.choose(&[0, 1, 2, 3]).unwrap(), vec![1, 3]);
        let err = r.choose(&[0, 1]).unwrap_err().to_string();
        assert!(err.contains("CPU(s) 3 are not allocated"), "{err}");
        assert!(CpuRequest::parse("0-1").unwrap().choose(&[0, 1]).is_err());
        assert_eq!(CpuRequest::parse("1,").unwrap(), CpuRequest::List(vec![1]));
    }
}
