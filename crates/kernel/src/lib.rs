//! The in-process lightweight kernel.
//!
//! It is the first image of the application process: it loads the program
//! (and its interpreter) into LWK-managed memory, builds the initial stack,
//! turns on Syscall User Dispatch so that every system call the application
//! makes traps into [`trap`], and jumps to the program. From then on it
//! handles memory, signals and identity locally and forwards everything
//! that needs a file descriptor to the proxy through [`delegate`].
#![cfg_attr(not(test), no_std)]

pub mod arch;
pub mod boot;
pub mod delegate;
pub mod elf;
pub mod exec;
pub mod fork;
pub mod freeze;
pub mod guard;
pub mod handlers;
pub mod mm;
pub mod persist;
pub mod procfs;
pub mod restore;
pub mod signal;
pub mod signalfd;
pub mod stack;
pub mod sync;
pub mod thread;
pub mod trap;
pub mod uaccess;

use lwk_abi::control::Control;
use lwk_abi::layout::CONTROL_ADDR;

/// The control region, mapped at a fixed address by [`boot`] before
/// anything else runs.
pub fn control() -> &'static Control {
    // SAFETY: boot maps CONTROL_SIZE bytes at CONTROL_ADDR before any code
    // that calls this runs, and never unmaps it.
    unsafe { &*(CONTROL_ADDR as *const Control) }
}
