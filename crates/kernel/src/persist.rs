//! Saving and restoring the LWK's state.
//!
//! Every subsystem of the LWK keeps its mutable state in one place and
//! implements [`Persist`]: `save` writes a snapshot of it, `restore`
//! replaces the subsystem's state by a snapshot. A snapshot is plain data:
//! `Copy`, `#[repr(C)]`, no pointers into the LWK (addresses of application
//! memory are fine: they mean the same after a restore), descriptors as
//! numbers in the application process. That is what lets fork and exec
//! carry state into a new image with the same code, and what a migration
//! sends to another node.
//!
//! Snapshots can be large (the memory map has thousands of pieces) and the
//! LWK has no allocator and runs on the application's stack, so `save`
//! writes into a snapshot the caller placed, never onto the stack.

/// A subsystem whose state can be saved and restored.
pub trait Persist {
    /// The saved state: plain data.
    type Snapshot: Copy;
    /// Changes whenever the snapshot's layout or meaning changes; a
    /// snapshot of another version is refused.
    const VERSION: u32;
    /// Write the current state into `out`.
    fn save(&self, out: &mut Self::Snapshot);
    /// Replace the current state by `s`. On an error (-errno) the
    /// subsystem is left as it was.
    fn restore(&mut self, s: &Self::Snapshot) -> Result<(), i64>;
}
