//! Moving an lwk application between processes, disks and nodes: the
//! Linux side of checkpoint, restore and live migration (std Rust; the LWK
//! side, which parks threads and saves its own state, is
//! `lwk_kernel::freeze` and `lwk_kernel::persist`).
//!
//! One module per job:
//!
//! | module | job |
//! |---|---|
//! | [`app`] | an lwk application seen from outside: attached, frozen, resumed |
//! | [`checkpoint`] | a frozen application written as an image |
//! | [`image`] | the image format: framed, versioned, checksummed records, on disk and on the wire |
//! | [`fds`] | a process's descriptors captured (files, pipes with their bytes, eventfd, timerfd, epoll, ...) and rebuilt at the same numbers |
//! | [`sockets`] | TCP connections moved with `TCP_REPAIR`, listening sockets, UDP sockets with their queued datagrams |
//! | [`tree`] | an application's process tree: its processes frozen together, what their proxies share |
//! | [`precopy`] | memory sent while the application runs, in rounds of what was written since |
//! | [`dirty`] | pages written since the last look: userfaultfd write-protection (async) and `PAGEMAP_SCAN` |
//!
//! See docs/migration.md for how they fit together.

pub mod app;
pub mod checkpoint;
pub mod dirty;
pub mod fds;
pub mod image;
pub mod precopy;
pub mod sockets;
pub mod tree;
