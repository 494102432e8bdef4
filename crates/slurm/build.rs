//! Slurm refuses a SPANK plugin whose `plugin_version` is not its own major.minor
//! (SLURM_VERSION_NUMBER). Take it from the Slurm headers this plugin is built for
//! (libslurm-dev); SLURM_INCLUDE_DIR points elsewhere if they are not in /usr/include.
use std::{env, fs, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=SLURM_INCLUDE_DIR");
    let dir = env::var("SLURM_INCLUDE_DIR").unwrap_or_else(|_| "/usr/include".into());
    let header = PathBuf::from(dir).join("slurm/slurm_version.h");
    println!("cargo:rerun-if-changed={}", header.display());
    let version = fs::read_to_string(&header).ok().and_then(|text| {
        text.lines().find_map(|line| {
            let rest = line.trim().strip_prefix("#define SLURM_VERSION_NUMBER")?;
            u32::from_str_radix(rest.trim().trim_start_matches("0x"), 16).ok()
        })
    });
    let version = match version {
        Some(v) => v,
        None => {
            // The workspace must build without Slurm installed; a plugin built so is
            // refused by Slurm at load time ("Incompatible Slurm plugin version").
            println!(
                "cargo:warning={} not found or without SLURM_VERSION_NUMBER: install libslurm-dev \
                 (or set SLURM_INCLUDE_DIR); this liblwk_slurm.so will be refused by Slurm",
                header.display()
            );
            0
        }
    };
    println!("cargo:rustc-env=LWK_SLURM_VERSION_NUMBER={version}");
}
