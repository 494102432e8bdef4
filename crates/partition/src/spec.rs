//! Parsing and printing of what a user types: partition names, CPU lists,
//! memory sizes, page sizes. The CPU list and the memory size parsers are the
//! workspace's only ones: `lwk noise` and the Slurm plugin use them too.

use anyhow::{anyhow, bail, Result};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Checks a partition name: `[A-Za-z0-9_.-]{1,64}`, and not `.` or `..`
/// (the name is a directory under /run/lwk/partitions and in the cgroup tree).
pub fn validate_name(name: &str) -> Result<()> {
    let ok_chars = name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if name.is_empty() || name.len() > 64 || !ok_chars || name == "." || name == ".." {
        bail!("bad partition name {name:?}: use 1 to 64 characters of A-Z a-z 0-9 _ . - (not . or ..)");
    }
    Ok(())
}

/// The largest CPU number accepted in a list: the kernel's largest NR_CPUS
/// (CONFIG_NR_CPUS is at most 8192 on x86-64).
pub const MAX_CPU: usize = 8191;

/// Why a CPU list was refused. Every message names the list as given and,
/// where there is one, the item at fault.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CpuListError {
    #[error("bad CPU list {0:?}: it is empty (expected e.g. 1, 1-3 or 1,3-5)")]
    Empty(String),
    #[error("bad CPU list {0:?}: empty item (stray comma?)")]
    EmptyItem(String),
    #[error("bad CPU list {list:?}: {item:?} is not a CPU number or a range like 1-3")]
    NotANumber { list: String, item: String },
    #[error("bad CPU list {list:?}: range {item:?} goes backwards")]
    Backwards { list: String, item: String },
    #[error("bad CPU list {list:?}: CPU {cpu} is beyond the largest possible CPU {MAX_CPU}")]
    TooLarge { list: String, cpu: String },
    #[error("bad CPU list {list:?}: CPU {cpu} appears twice")]
    Duplicate { list: String, cpu: usize },
}

/// Parses a CPU list in the kernel's notation, as `taskset -c`, cpusets,
/// /sys/devices/system/cpu/online and Slurm write it: `1`, `1-3`, `1,3-5`
/// (blanks around numbers and a final newline are fine). Returns the CPUs in
/// ascending order. Never empty, and every CPU may appear once only: a
/// repeated CPU is most likely a typo.
pub fn parse_cpu_list(list: &str) -> std::result::Result<Vec<usize>, CpuListError> {
    let trimmed = list.trim();
    if trimmed.is_empty() {
        return Err(CpuListError::Empty(list.to_string()));
    }
    let number = |item: &str, s: &str| -> std::result::Result<usize, CpuListError> {
        let s = s.trim();
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(CpuListError::NotANumber { list: list.to_string(), item: item.trim().to_string() });
        }
        match s.parse::<usize>() {
            Ok(cpu) if cpu <= MAX_CPU => Ok(cpu),
            _ => Err(CpuListError::TooLarge { list: list.to_string(), cpu: s.to_string() }),
        }
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

/// Parses a list the kernel wrote (cpuset.cpus, smp_affinity_list,
/// /sys/devices/system/cpu/online), where the empty string is the empty list.
pub fn parse_kernel_list(s: &str) -> Result<Vec<usize>> {
    if s.trim().is_empty() {
        return Ok(Vec::new());
    }
    parse_cpu_list(s).map_err(|e| anyhow!("unexpected CPU list from the kernel: {e}"))
}

/// Prints CPU numbers the way the kernel does: `0-2,5` (in ascending order,
/// each once, whatever the order given).
pub fn format_cpu_list(cpus: &[usize]) -> String {
    let mut sorted = cpus.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut parts = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        while i + 1 < sorted.len() && sorted[i + 1] == sorted[i] + 1 {
            i += 1;
        }
        parts.push(if sorted[i] == start { start.to_string() } else { format!("{start}-{}", sorted[i]) });
        i += 1;
    }
    parts.join(",")
}

/// Prints a CPU set as the hexadecimal mask of /proc/irq/default_smp_affinity:
/// 32-bit groups separated by commas, most significant first.
pub fn format_cpu_mask(cpus: &[usize]) -> String {
    let words = cpus.iter().max().map_or(1, |m| m / 32 + 1);
    let mut w = vec![0u32; words];
    for &c in cpus {
        w[c / 32] |= 1 << (c % 32);
    }
    let mut parts: Vec<String> = w.iter().rev().map(|x| format!("{x:08x}")).collect();
    // The kernel accepts and prints the leading group without padding.
    parts[0] = format!("{:x}", w[words - 1]);
    parts.join(",")
}

/// Why a memory size was refused; the message names the size as given.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("bad memory size {size:?}: {why}")]
pub struct SizeError {
    pub size: String,
    pub why: &'static str,
}

/// Parses a memory size: plain bytes, or a number with K, M, G, T (also KB,
/// KiB, B, ..., any case, blanks between; all powers of 1024, as the kernel's
/// own size options are). Never 0.
pub fn parse_size(s: &str) -> std::result::Result<u64, SizeError> {
    let bad = |why| SizeError { size: s.to_string(), why };
    let syntax = "expected bytes or a number with K, M, G or T (e.g. 256M, 1G, 512MiB)";
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(bad(syntax));
    }
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(bad(syntax)),
    };
    let bytes = num.parse::<u64>().ok().and_then(|n| n.checked_mul(mult)).ok_or_else(|| bad("too large"))?;
    if bytes == 0 {
        return Err(bad("must be more than 0"));
    }
    Ok(bytes)
}

/// Prints a size in the largest binary unit that divides it exactly.
pub fn format_size(bytes: u64) -> String {
    for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if bytes >= 1 << shift && bytes.trailing_zeros() >= shift {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    format!("{bytes}B")
}

/// The page size of a partition's memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PageSize {
    /// 2 MiB hugetlb pages, reserved up front.
    #[serde(rename = "2M")]
    Huge2M,
    /// 1 GiB hugetlb pages, reserved up front.
    #[serde(rename = "1G")]
    Huge1G,
    /// 4 KiB pages from tmpfs: a limit, not a reservation.
    #[serde(rename = "none")]
    Small,
}

impl PageSize {
    pub fn bytes(self) -> u64 {
        match self {
            PageSize::Huge2M => 2 << 20,
            PageSize::Huge1G => 1 << 30,
            PageSize::Small => 4096,
        }
    }
    pub fn from_bytes(b: u64) -> Option<PageSize> {
        [PageSize::Huge2M, PageSize::Huge1G, PageSize::Small].into_iter().find(|p| p.bytes() == b)
    }
    /// `2M`, `1G`, `none`: as on the command line.
    pub fn label(self) -> &'static str {
        match self {
            PageSize::Huge2M => "2M",
            PageSize::Huge1G => "1G",
            PageSize::Small => "none",
        }
    }
    pub fn is_huge(self) -> bool {
        self != PageSize::Small
    }
}

impl std::str::FromStr for PageSize {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "2m" | "2mib" => Ok(PageSize::Huge2M),
            "1g" | "1gib" => Ok(PageSize::Huge1G),
            "none" | "4k" => Ok(PageSize::Small),
            _ => bail!("bad page size {s:?}: expected 2M, 1G or none"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "job.1", "A_b-c", &"x".repeat(64)] {
            validate_name(ok).unwrap();
        }
        for bad in ["", ".", "..", "a/b", "a b", "é", &"x".repeat(65)] {
            let e = validate_name(bad).unwrap_err().to_string();
            assert!(e.contains("bad partition name"), "{e}");
        }
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0").unwrap(), vec![0]);
        assert_eq!(parse_cpu_list("1").unwrap(), vec![1]);
        assert_eq!(parse_cpu_list("1-3").unwrap(), vec![1, 2, 3]);
        assert_eq!(parse_cpu_list("1,3-5").unwrap(), vec![1, 3, 4, 5]);
        assert_eq!(parse_cpu_list("5,1-2").unwrap(), vec![1, 2, 5]);
        assert_eq!(parse_cpu_list("0-2,5,4").unwrap(), vec![0, 1, 2, 4, 5]);
        assert_eq!(parse_cpu_list(" 3 - 4 , 7\n").unwrap(), vec![3, 4, 7]);
        assert_eq!(parse_cpu_list(" 3 ").unwrap(), vec![3]);
        assert_eq!(parse_cpu_list("2-2").unwrap(), vec![2]);
        assert_eq!(parse_cpu_list("8191").unwrap(), vec![8191]);
        for bad in ["", "a", "1-", "-1", "3-1", "1,,2", "0,", "1.5", "99999", "1-2-3", "0-2,1", " 5,1,1-2 "] {
            let e = parse_cpu_list(bad).unwrap_err().to_string();
            assert!(e.starts_with(&format!("bad CPU list {bad:?}: ")), "{bad}: {e}");
        }
    }

    #[test]
    fn bad_cpu_lists_are_named() {
        let list = |s: &str| s.to_string();
        assert_eq!(parse_cpu_list(""), Err(CpuListError::Empty(list(""))));
        assert_eq!(parse_cpu_list("  "), Err(CpuListError::Empty(list("  "))));
        assert_eq!(parse_cpu_list("0,"), Err(CpuListError::EmptyItem(list("0,"))));
        assert_eq!(parse_cpu_list("1,,2"), Err(CpuListError::EmptyItem(list("1,,2"))));
        for bad in ["a", "-1", "1-", "1-2-3", "1.5"] {
            assert_eq!(parse_cpu_list(bad), Err(CpuListError::NotANumber { list: list(bad), item: list(bad) }));
        }
        assert_eq!(parse_cpu_list("3-1"), Err(CpuListError::Backwards { list: list("3-1"), item: list("3-1") }));
        assert_eq!(parse_cpu_list("2-1"), Err(CpuListError::Backwards { list: list("2-1"), item: list("2-1") }));
        assert_eq!(parse_cpu_list("0-2,1"), Err(CpuListError::Duplicate { list: list("0-2,1"), cpu: 1 }));
        assert_eq!(parse_cpu_list("8192"), Err(CpuListError::TooLarge { list: list("8192"), cpu: list("8192") }));
        let huge = "99999999999999999999999";
        assert_eq!(parse_cpu_list(huge), Err(CpuListError::TooLarge { list: list(huge), cpu: list(huge) }));
        assert_eq!(
            parse_cpu_list("0,x").unwrap_err().to_string(),
            r#"bad CPU list "0,x": "x" is not a CPU number or a range like 1-3"#
        );
        assert_eq!(
            parse_cpu_list("1, 3-2").unwrap_err().to_string(),
            r#"bad CPU list "1, 3-2": range "3-2" goes backwards"#
        );
    }

    #[test]
    fn kernel_lists_and_formatting() {
        assert_eq!(parse_kernel_list("0-1\n").unwrap(), vec![0, 1]);
        assert_eq!(parse_kernel_list("\n").unwrap(), Vec::<usize>::new());
        assert!(parse_kernel_list("0-x").unwrap_err().to_string().contains("from the kernel"));
        assert_eq!(format_cpu_list(&[0, 1, 2, 5, 7, 8]), "0-2,5,7-8");
        assert_eq!(format_cpu_list(&[0, 1, 2, 4, 5, 7]), "0-2,4-5,7");
        assert_eq!(format_cpu_list(&[5, 1, 2, 2]), "1-2,5");
        assert_eq!(format_cpu_list(&[]), "");
        for list in ["0", "0-1", "0,2-3", "1,3,5-9,11"] {
            assert_eq!(format_cpu_list(&parse_cpu_list(list).unwrap()), list);
        }
    }

    #[test]
    fn masks() {
        assert_eq!(format_cpu_mask(&[0]), "1");
        assert_eq!(format_cpu_mask(&[0, 1]), "3");
        assert_eq!(format_cpu_mask(&[4]), "10");
        assert_eq!(format_cpu_mask(&[0, 33]), "2,00000001");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("4096B").unwrap(), 4096);
        assert_eq!(parse_size("256M").unwrap(), 256 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("1g").unwrap(), 1 << 30);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("512kb").unwrap(), 512 << 10);
        assert_eq!(parse_size("2k").unwrap(), 2048);
        assert_eq!(parse_size(" 3 T ").unwrap(), 3 << 40);
        for bad in ["", "M", "0", "0G", "1X", "12X", "1.5G", "-1", "+5M", "99999999999T", "1 G B", "lots"] {
            let e = parse_size(bad).unwrap_err().to_string();
            assert!(e.starts_with(&format!("bad memory size {bad:?}: ")), "{bad}: {e}");
        }
        assert_eq!(parse_size("0").unwrap_err().why, "must be more than 0");
        assert_eq!(parse_size("99999999999T").unwrap_err().why, "too large");
        assert_eq!(parse_size("99999999999999999999999").unwrap_err().why, "too large");
        assert_eq!(format_size(256 << 20), "256MiB");
        assert_eq!(format_size(1 << 30), "1GiB");
        assert_eq!(format_size(1000), "1000B");
    }

    #[test]
    fn page_sizes() {
        assert_eq!("2M".parse::<PageSize>().unwrap().bytes(), 2 << 20);
        assert_eq!("1g".parse::<PageSize>().unwrap(), PageSize::Huge1G);
        assert_eq!("none".parse::<PageSize>().unwrap().bytes(), 4096);
        assert!("3M".parse::<PageSize>().is_err());
        assert_eq!(PageSize::from_bytes(1 << 30), Some(PageSize::Huge1G));
    }
}
