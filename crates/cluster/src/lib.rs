//! The single-IP-address cluster (issue 10): every node presents the same
//! service address with the same hardware address on a front network
//! that brings every frame to every node, and each node keeps only the
//! packets of its own sockets.
//!
//! * [`node`]: one node's part (`lwk cluster up` / `down`): the address,
//!   the shared hardware address, the packet filter, which node answers
//!   ARP; undone by `down`, also after a crash (the node's state is in a
//!   file, and the filter is found by its table's name).
//! * [`sim`]: the same cluster on one machine (`lwk cluster sim up N` /
//!   `down`), for trying it out and for the tests: network namespaces, a
//!   front bridge that floods every frame (ageing time 0), a cluster
//!   network between the node daemons.
//!
//! Addresses, links and rules are made with iproute2's `ip` and `tc` and
//! with `nft`, as the rest of lwk does (a netlink crate would bring an async
//! runtime for a handful of calls made once).

pub mod node;
pub mod sim;

use lwk_node::command::run;
