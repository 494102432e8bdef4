//! The choice of the partition's CPUs inside a job's allocation. CPU lists
//! ("0-3,8,10-11", the kernel's and Slurm's format) are lwk-partition's.

use lwk_partition::{format_cpu_list, parse_cpu_list};

use crate::Error;

/// What the user asked for with `--lwk-cpus`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CpuRequest {
    /// N CPUs, chosen from the job's allocation on the node.
    Count(u32),
    /// Exactly these CPUs.
    List(Vec<usize>),
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
        Ok(CpuRequest::List(parse_cpu_list(list).map_err(|e| Error::Invalid(format!("--lwk-cpus={text}: {e}")))?))
    }

    /// The partition's CPUs inside `allocated` (the job's CPUs on this node).
    /// At least one allocated CPU always stays with Linux: slurmstepd, the
    /// proxies and `lwk run` itself run there.
    pub fn choose(&self, allocated: &[usize]) -> Result<Vec<usize>, Error> {
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
                let outside: Vec<usize> = list.iter().copied().filter(|c| !allocated.contains(c)).collect();
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
        assert_eq!(CpuRequest::parse(" 3-3 ").unwrap(), CpuRequest::List(vec![3]));
    }

    #[test]
    fn bad_lists_name_the_option_and_the_list() {
        for (bad, why) in
            [("2-1", "goes backwards"), ("a", "is not a CPU number"), ("1,,2", "empty item"), ("1,1", "twice")]
        {
            let err = CpuRequest::parse(bad).unwrap_err().to_string();
            assert!(err.starts_with(&format!("--lwk-cpus={bad}: bad CPU list {bad:?}: ")), "{err}");
            assert!(err.contains(why), "{err}");
        }
    }
}
