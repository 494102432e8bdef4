//! IRQ affinity: interrupts steered to the CPUs Linux keeps.

use std::collections::BTreeMap;
use std::fs;

use serde::{Deserialize, Serialize};

use crate::spec::{format_cpu_list, format_cpu_mask, parse_kernel_list};
use crate::sys::{read_trim, write_raw};

/// The affinities before any partition existed: what destroying the last
/// partition restores. Each partition's state carries a copy, so whichever
/// is destroyed last has them.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct IrqOriginals {
    /// IRQ number -> its smp_affinity_list.
    pub affinity: BTreeMap<u32, String>,
    /// /proc/irq/default_smp_affinity (a hex mask).
    pub default: Option<String>,
}

pub fn read_originals() -> IrqOriginals {
    let mut o = IrqOriginals::default();
    if let Ok(dir) = fs::read_dir("/proc/irq") {
        for e in dir.flatten() {
            let Some(n) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
            if let Ok(v) = read_trim(e.path().join("smp_affinity_list")) {
                o.affinity.insert(n, v);
            }
        }
    }
    o.default = read_trim("/proc/irq/default_smp_affinity").ok();
    o
}

/// What steering did: how many IRQs now avoid the partitions, and which the
/// kernel would not move (per-CPU and managed IRQs: EIO or EINVAL).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Steered {
    pub moved: usize,
    pub skipped: Vec<u32>,
}

/// Points every IRQ at the CPUs of `linux` it was allowed on before (all of
/// `linux` if none), and the default affinity at `linux`.
pub fn steer(orig: &IrqOriginals, linux: &[usize]) -> Steered {
    let mut out = Steered::default();
    for (&irq, was) in &orig.affinity {
        let before = parse_kernel_list(was).unwrap_or_default();
        let mut target: Vec<usize> = before.into_iter().filter(|c| linux.contains(c)).collect();
        if target.is_empty() {
            target = linux.to_vec();
        }
        match write_raw(format!("/proc/irq/{irq}/smp_affinity_list"), &format_cpu_list(&target)) {
            Ok(()) => out.moved += 1,
            // EIO and EINVAL are per-CPU or kernel-managed IRQs; an IRQ that
            // went away meanwhile (ENOENT) cannot be steered either.
            Err(_) => out.skipped.push(irq),
        }
    }
    if orig.default.is_some() {
        let _ = write_raw("/proc/irq/default_smp_affinity", &format_cpu_mask(linux));
    }
    out
}

/// Writes the original affinities back. Failures are the same IRQs that
/// could not be steered, or IRQs that are gone: nothing to do for either.
pub fn restore(orig: &IrqOriginals) {
    for (irq, was) in &orig.affinity {
        let _ = write_raw(format!("/proc/irq/{irq}/smp_affinity_list"), was);
    }
    if let Some(d) = &orig.default {
        let _ = write_raw("/proc/irq/default_smp_affinity", d);
    }
}
