//! Address-space layout. Every fixed address lwk uses lives here.
//!
//! The lower 64 TiB of the user address space belong to the application:
//! its program, libraries, heap, stacks and every mapping it makes. The LWK
//! image, the shared control region and everything Linux places by itself
//! (the initial stack, the vDSO) live in the upper half. The proxy maps the
//! application's memory at the same addresses and has nothing else below
//! `APP_END`, so a pointer outside the application's mappings faults there
//! exactly as it would natively.

/// Lowest address the application may map (Linux's default mmap_min_addr).
pub const APP_START: u64 = 0x1_0000;
/// End (exclusive) of the application's range: 64 TiB.
pub const APP_END: u64 = 0x4000_0000_0000;

/// Where the LWK places a position-independent program (Linux uses 2/3 of
/// the address space, which is outside the application's range here).
pub const PIE_BASE: u64 = 0x1555_5540_0000;
/// Top of the region where non-fixed mmaps (and the interpreter) go; they
/// grow down from here as on Linux.
pub const MMAP_TOP: u64 = APP_END - STACK_GAP;
/// Room kept free below the top of the range for the main thread's stack.
pub const STACK_GAP: u64 = 0x100_0000_0000;
/// Top of the main thread's stack.
pub const STACK_TOP: u64 = APP_END - 0x1000;

/// The LWK image is linked here (see crates/cli/build.rs).
pub const IMAGE_BASE: u64 = 0x6f00_0000_0000;
/// The control region shared by the LWK, the proxy and the supervisor.
pub const CONTROL_ADDR: u64 = 0x6e00_0000_0000;
/// A window the LWK uses for short-lived private mappings (copies when a
/// huge page is split).
pub const SCRATCH_ADDR: u64 = 0x6d00_0000_0000;
/// Where a forking LWK maps its child's control region while it prepares
/// it (below the scratch window).
pub const CHILD_CONTROL_ADDR: u64 = SCRATCH_ADDR - (64 << 20);
/// A window for snapshots of the LWK's own state (`kernel::persist`).
pub const SNAPSHOT_ADDR: u64 = 0x6c00_0000_0000;
/// Room in the snapshot window.
pub const SNAPSHOT_SIZE: u64 = 1 << 30;
/// Where a freezing LWK maps the state it exports (`kernel::freeze`), in
/// the upper half of the snapshot window.
pub const FREEZE_EXPORT_ADDR: u64 = SNAPSHOT_ADDR + (SNAPSHOT_SIZE / 2);

pub const PAGE_SIZE: u64 = 4096;
pub const HUGE_PAGE_SIZE: u64 = 2 << 20;

// The regions do not overlap: checked when the crate compiles.
const _: () = {
    assert!(APP_START < PIE_BASE && PIE_BASE < MMAP_TOP && MMAP_TOP < STACK_TOP);
    assert!(STACK_TOP < APP_END);
    assert!(APP_END <= SCRATCH_ADDR && SCRATCH_ADDR < CONTROL_ADDR && CONTROL_ADDR < IMAGE_BASE);
    assert!(APP_END <= SNAPSHOT_ADDR && SNAPSHOT_ADDR + SNAPSHOT_SIZE <= CHILD_CONTROL_ADDR);
    assert!(CHILD_CONTROL_ADDR + (64 << 20) <= SCRATCH_ADDR);
    assert!(PIE_BASE.is_multiple_of(HUGE_PAGE_SIZE));
};
