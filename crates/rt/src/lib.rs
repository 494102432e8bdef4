//! A freestanding runtime for the LWK image: raw system calls, the memory
//! functions the compiler expects, and formatted output to a file
//! descriptor. No libc, no allocator, no thread-local storage: this code runs
//! inside the application's address space with the application's FS base.
//!
//! Written by hand because nothing on crates.io is both libc-free and free of
//! TLS; `rustix`'s linux_raw backend comes close but still expects an
//! origin/libc runtime to set up the process.
#![cfg_attr(not(test), no_std)]

pub mod mem;
pub mod nr;
pub mod out;
pub mod pkey;
pub mod sys;
pub mod thread;

pub use sys::*;
