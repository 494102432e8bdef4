//! Definitions shared by every part of lwk: the address-space layout, the
//! control region that the LWK, the proxy and the supervisor share, and the
//! one table that says where each system call runs.
#![cfg_attr(not(test), no_std)]

pub mod control;
pub mod layout;
pub mod syscalls;
