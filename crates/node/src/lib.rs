//! The node daemon (`lwk node serve`) and what talks to it: the cluster
//! key ([`key`]), authenticated connections between nodes ([`channel`]),
//! the service address that moves with an application ([`address`]) and
//! the drop rule that keeps its peers' data out while its connections are
//! captured ([`quiet`]), the hold of its packets in a single-IP cluster
//! ([`hold`]), moving every application off a node ([`drain`]), and
//! the daemon's side of a migration ([`server`]): it receives an
//! application's image and restores it on this node.
//!
//! The daemon uses one thread per connection and per restored application:
//! a node handles a few migrations at a time, each a long stream, so an
//! async runtime would buy nothing here.

pub mod address;
pub mod channel;
pub mod command;
pub mod drain;
pub mod hold;
pub mod key;
pub mod quiet;
pub mod relay;
pub mod server;

/// The port a node daemon listens on unless told otherwise.
pub const DEFAULT_PORT: u16 = 7070;
