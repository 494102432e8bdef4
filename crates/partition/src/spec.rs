//! Parsing and printing of what a user types: partition names, CPU lists,
//! memory sizes, page sizes.

use std::collections::BTreeSet;

use anyhow::{anyhow, bail, Result};
use serde::{Deserialize, Serialize};

/// Checks a partition name: `[A-Za-z0-9_.-]{1,64}`, and not `.` or `..`
/// (the name is a directory under /run/lwk/partitions and in the cgroup tree).
pub fn validate_name(name: &str) -> Result<()> {
    let ok_chars = name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if name.is_empty() || name.len() > 64 || !ok_chars || name == "." || name == ".." {
        bail!("bad partition name {name:?}: use 1 to 64 characters of A-Z a-z 0-9 _ . - (not . or ..)");
    }
    Ok(())
}

/// The largest CPU number accepted in a list (the kernel's NR_CPUS limit).
const MAX_CPU: usize = 8191;

/// Parses a CPU list as the user writes it: `1`, `1-3`, `1,3-5`. Sorted, no
/// duplicates, never empty.
pub fn parse_cpu_list(s: &str) -> Result<Vec<usize>> {
    let cpus = parse_list(s).map_err(|why| anyhow!("bad CPU list {s:?}: {why}"))?;
    if cpus.is_empty() {
        bail!("bad CPU list {s:?}: no CPU given (expected e.g. 1, 1-3 or 1,3-5)");
    }
    Ok(cpus)
}

/// Parses a list in the kernel's format (cpuset.cpus, smp_affinity_list,
/// /sys/devices/system/cpu/online); the empty string is the empty list.
pub fn parse_kernel_list(s: &str) -> Result<Vec<usize>> {
    parse_list(s).map_err(|why| anyhow!("unexpected CPU list {s:?} from the kernel: {why}"))
}

fn parse_list(s: &str) -> std::result::Result<Vec<usize>, String> {
    let mut set = BTreeSet::new();
    let s = s.trim();
    if s.is_empty() {
        return Ok(Vec::new());
    }
    for part in s.split(',') {
        let part = part.trim();
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let num = |x: &str| -> std::result::Result<usize, String> {
            let x = x.trim();
            if x.is_empty() || !x.bytes().all(|c| c.is_ascii_digit()) {
                return Err(format!("{part:?} is not a CPU number or a range like 1-3"));
            }
            match x.parse::<usize>() {
                Ok(n) if n <= MAX_CPU => Ok(n),
                _ => Err(format!("CPU {x} is beyond {MAX_CPU}")),
            }
        };
        let (a, b) = (num(a)?, num(b)?);
        if a > b {
            return Err(format!("range {part} goes backwards"));
        }
        set.extend(a..=b);
    }
    Ok(set.into_iter().collect())
}

/// Prints a sorted CPU list the way the kernel does: `0-2,5`.
pub fn format_cpu_list(cpus: &[usize]) -> String {
    let mut out = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let start = cpus[i];
        while i + 1 < cpus.len() && cpus[i + 1] == cpus[i] + 1 {
            i += 1;
        }
        out.push(if cpus[i] == start { start.to_string() } else { format!("{start}-{}", cpus[i]) });
        i += 1;
    }
    out.join(",")
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

/// Parses a memory size: plain bytes, or a number with K, M, G, T (also KB,
/// KiB, ...; all powers of 1024, as the kernel's own size options are).
pub fn parse_size(s: &str) -> Result<u64> {
    let bad = || anyhow!("bad memory size {s:?}: expected bytes or a number with K, M, G or T (e.g. 256M, 1G, 512MiB)");
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(bad());
    }
    let n: u64 = num.parse().map_err(|_| anyhow!("bad memory size {s:?}: number too large"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(bad()),
    };
    let bytes = n.checked_mul(mult).ok_or_else(|| anyhow!("bad memory size {s:?}: too large"))?;
    if bytes == 0 {
        bail!("bad memory size {s:?}: must be more than 0");
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
        assert_eq!(parse_cpu_list("1").unwrap(), vec![1]);
        assert_eq!(parse_cpu_list("1-3").unwrap(), vec![1, 2, 3]);
        assert_eq!(parse_cpu_list("1,3-5").unwrap(), vec![1, 3, 4, 5]);
        assert_eq!(parse_cpu_list(" 5,1,1-2 ").unwrap(), vec![1, 2, 5]);
        for bad in ["", "a", "1-", "-1", "3-1", "1,,2", "1.5", "99999", "1-2-3"] {
            let e = parse_cpu_list(bad).unwrap_err().to_string();
            assert!(e.contains("bad CPU list"), "{bad}: {e}");
        }
        assert_eq!(parse_kernel_list("0-1\n").unwrap(), vec![0, 1]);
        assert_eq!(parse_kernel_list("\n").unwrap(), Vec::<usize>::new());
        assert_eq!(format_cpu_list(&[0, 1, 2, 5, 7, 8]), "0-2,5,7-8");
        assert_eq!(format_cpu_list(&[]), "");
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
        assert_eq!(parse_size("256M").unwrap(), 256 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("2k").unwrap(), 2048);
        for bad in ["", "M", "0", "0G", "1X", "1.5G", "-1", "99999999999T", "1 G B"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
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
