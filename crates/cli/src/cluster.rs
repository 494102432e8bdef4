//! `lwk cluster`: this node's part of a single-IP cluster, and a simulated
//! cluster on one machine (see `lwk_cluster`).

use anyhow::{Context, Result};
use lwk_node::address::Cidr;

#[derive(clap::Subcommand)]
pub enum ClusterCmd {
    /// Make this node one of a single-IP cluster: the service addresses on
    /// the front interface with the cluster's shared hardware address, and
    /// the filter that keeps only what belongs to this node's sockets.
    Up {
        /// A service address with its prefix (A.B.C.D/N); more than once
        /// for several.
        #[arg(long = "service", required = true)]
        services: Vec<Cidr>,
        /// The front interface (the network every node receives all of).
        #[arg(long)]
        dev: String,
        /// The cluster's shared hardware address (the same on every node);
        /// by default 02:4c: and the first service address's bytes.
        #[arg(long)]
        mac: Option<String>,
        /// This node, and only this one in the cluster, answers ARP
        /// requests and pings for the service addresses.
        #[arg(long)]
        arp_owner: bool,
        /// A TCP port whose new connections are spread over the nodes (each
        /// runs a listener; one takes each connection, by a hash of the
        /// client's address and port); more than once for several. Needs
        /// --node.
        #[arg(long, value_name = "PORT")]
        spread: Vec<u16>,
        /// This node's number K (from 1) of the N that share the spread
        /// ports: K/N.
        #[arg(long, value_name = "K/N", value_parser = parse_node)]
        node: Option<(u32, u32)>,
    },
    /// Undo `lwk cluster up` on this node (also after a crash).
    Down,
    /// This node's part: addresses, hardware address, what it sent.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// A simulated cluster of network namespaces on this machine.
    Sim {
        #[command(subcommand)]
        cmd: SimCmd,
    },
}

#[derive(clap::Subcommand)]
pub enum SimCmd {
    /// Make N nodes (each with its node daemon) and a client side, on a
    /// front bridge that floods every frame and a cluster network.
    Up {
        nodes: usize,
        /// Shape the front network to RATE (tc tbf, e.g. 1gbit).
        #[arg(long, value_name = "RATE")]
        shape_front: Option<String>,
        /// Shape the cluster network between the daemons to RATE.
        #[arg(long, value_name = "RATE")]
        shape_cluster: Option<String>,
        /// Spread new connections to this TCP port over the nodes (each
        /// node's `lwk cluster up --spread PORT --node K/N`).
        #[arg(long, value_name = "PORT")]
        spread: Vec<u16>,
        /// Print the nodes, the client side and the service address as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove the simulated cluster: namespaces, daemons, rules, files.
    Down,
}

pub fn main(cmd: ClusterCmd) -> Result<i32> {
    match cmd {
        ClusterCmd::Up { services, dev, mac, arp_owner, spread, node } => {
            lwk_cluster::node::up(&lwk_cluster::node::Setup { services, dev, mac, arp_owner, spread, node })?;
            Ok(0)
        }
        ClusterCmd::Down => {
            for what in lwk_cluster::node::down()? {
                println!("removed: {what}");
            }
            Ok(0)
        }
        ClusterCmd::Status { json } => {
            let s = lwk_cluster::node::status()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else if !s.configured {
                println!("not a cluster node (lwk cluster up)");
            } else {
                println!(
                    "{} on {} ({}){}; {} packets sent from them",
                    s.services.join(", "),
                    s.dev.as_deref().unwrap_or("?"),
                    s.mac.as_deref().unwrap_or("?"),
                    if s.arp_owner { ", answering ARP" } else { "" },
                    s.packets_sent
                );
            }
            Ok(0)
        }
        ClusterCmd::Sim { cmd: SimCmd::Up { nodes, shape_front, shape_cluster, spread, json } } => {
            let lwk = std::env::current_exe().context("cannot find the lwk binary's own path")?;
            let options = lwk_cluster::sim::Options { nodes, shape_front, shape_cluster, spread, lwk };
            let sim = lwk_cluster::sim::up(&options)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&sim)?);
            } else {
                println!("service address {} (answered by {})", sim.service, sim.nodes[0].name);
                println!("client: {} in namespace {}", sim.client.addr, sim.client.netns);
                for n in &sim.nodes {
                    println!("{}: namespace {}, daemon {} (log {})", n.name, n.netns, n.daemon, n.log.display());
                }
                println!("cluster key: {}", sim.key.display());
            }
            Ok(0)
        }
        ClusterCmd::Sim { cmd: SimCmd::Down } => {
            for what in lwk_cluster::sim::down()? {
                println!("removed: {what}");
            }
            Ok(0)
        }
    }
}

/// K/N: a node's number of N.
fn parse_node(s: &str) -> Result<(u32, u32), String> {
    let (k, n) = s.split_once('/').ok_or_else(|| format!("{s}: expected K/N, e.g. 2/3"))?;
    let k: u32 = k.parse().map_err(|_| format!("{s}: K is not a number"))?;
    let n: u32 = n.parse().map_err(|_| format!("{s}: N is not a number"))?;
    if k == 0 || k > n {
        return Err(format!("{s}: K counts from 1 to N"));
    }
    Ok((k, n))
}
