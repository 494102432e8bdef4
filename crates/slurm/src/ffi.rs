//! The few SPANK functions and types this plugin uses, bound by hand from
//! `<slurm/spank.h>` of Slurm 22.05 (Debian bookworm).
//!
//! Why not the `slurm-spank` crate: its versions 0.3 and 0.4 call
//! `spank_prepend_task_argv`, which Slurm 22.05 does not have (it came with
//! later releases), so the crate does not build against Debian's headers, and it
//! needs libclang for bindgen at build time. The functions below are resolved at
//! load time from the Slurm program that loads the plugin (srun, sbatch, salloc,
//! slurmstepd, slurmd), so nothing links against libslurm.

use std::ffi::{c_char, c_int, c_void, CString};

/// `spank_t`: opaque handle passed to every callback.
pub type SpankT = *mut c_void;
/// `spank_err_t` (= slurm_err_t); ESPANK_SUCCESS is 0.
pub type SpankErr = c_int;
pub const ESPANK_SUCCESS: SpankErr = 0;

/// `enum spank_context`.
pub const S_CTX_LOCAL: c_int = 1;
pub const S_CTX_REMOTE: c_int = 2;
pub const S_CTX_ALLOCATOR: c_int = 3;

/// `enum spank_item`, in the header's order (values are positions).
pub const S_JOB_UID: c_int = 0;
pub const S_JOB_GID: c_int = 1;
pub const S_JOB_ID: c_int = 2;
pub const S_JOB_STEPID: c_int = 3;
pub const S_JOB_LOCAL_TASK_COUNT: c_int = 6;
pub const S_JOB_ARGV: c_int = 9;
pub const S_JOB_ENV: c_int = 10;
pub const S_TASK_GLOBAL_ID: c_int = 12;
pub const S_TASK_EXIT_STATUS: c_int = 13;
pub const S_JOB_ALLOC_CORES: c_int = 25;
pub const S_JOB_ALLOC_MEM: c_int = 26;

/// Special step ids (slurm.h): SLURM_BATCH_SCRIPT, SLURM_EXTERN_CONT, SLURM_INTERACTIVE_STEP.
pub const SLURM_BATCH_SCRIPT: u32 = 0xffff_fffb;
pub const SLURM_EXTERN_CONT: u32 = 0xffff_fffc;
pub const SLURM_INTERACTIVE_STEP: u32 = 0xffff_fffa;

/// `spank_opt_cb_f`.
pub type SpankOptCb = extern "C" fn(val: c_int, optarg: *const c_char, remote: c_int) -> c_int;

/// `struct spank_option`.
#[repr(C)]
pub struct SpankOption {
    pub name: *const c_char,
    pub arginfo: *const c_char,
    pub usage: *const c_char,
    pub has_arg: c_int,
    pub val: c_int,
    pub cb: Option<SpankOptCb>,
}

extern "C" {
    pub fn spank_context() -> c_int;
    pub fn spank_option_register(spank: SpankT, opt: *mut SpankOption) -> SpankErr;
    /// Variadic: the arguments depend on the item (see spank.h).
    pub fn spank_get_item(spank: SpankT, item: c_int, ...) -> SpankErr;
    pub fn spank_setenv(spank: SpankT, var: *const c_char, val: *const c_char, overwrite: c_int) -> SpankErr;
    pub fn slurm_error(format: *const c_char, ...);
    pub fn slurm_info(format: *const c_char, ...);
}

fn log_with(f: unsafe extern "C" fn(*const c_char, ...), msg: &str) {
    let msg = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    // SAFETY: "%s" with one valid NUL-terminated string, as the format asks.
    unsafe { f(c"%s".as_ptr(), msg.as_ptr()) }
}

/// Slurm's error log: srun/sbatch print it on the user's terminal
/// ("srun: error: ..."), slurmstepd and slurmd write it to slurmd's log.
pub fn log_error(msg: &str) {
    log_with(slurm_error, msg)
}

pub fn log_info(msg: &str) {
    log_with(slurm_info, msg)
}
