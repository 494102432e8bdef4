//! One node of a single-IP cluster.
//!
//! `up` puts the service addresses on the node's front interface, gives
//! that interface the cluster's shared hardware address, and installs the
//! packet filter, an nftables table `lwk-cluster` (family inet):
//!
//! * at prerouting, before connection tracking and after the raw table
//!   (priority -290: a migration's hold comes first, see
//!   [`lwk_node::hold`]), a packet for a service
//!   address is accepted only when the kernel finds a local socket for it
//!   (the `socket` expression: an established flow, or a listener for a
//!   new connection); everything else for those addresses is dropped
//!   without an answer (no RST, no ICMP unreachable), since another node
//!   has the socket. Pings are answered by the ARP owner only.
//! * a counter of what this node sends from the service addresses
//!   (`lwk cluster status`, and the tests' proof that one node answers).
//! * ports spread over the nodes (`--spread PORT --node K/N`): every node
//!   runs a listener there, and a new connection (a SYN) is taken by the
//!   one node whose number is a hash of the client's address and port
//!   (nftables' `jhash`, with a seed every node shares, modulo N: the same
//!   answer on every node, so exactly one accepts). Later packets of a
//!   connection pass only where connection tracking knows it (`ct state
//!   established`), so no other node's listener answers them with a reset;
//!   this chain runs after connection tracking (priority -150). A
//!   connection restored by a migration is known there as soon as its
//!   first packet leaves (tracking picks it up mid-stream).
//!
//! Exactly one node (`--arp-owner`) answers ARP requests for the service
//! addresses: the others drop them in a table `lwk-cluster` of family arp.
//! Since every node has the same hardware address, the clients' frames
//! reach all of them however the front network learns (see the README on
//! building it).
//!
//! What `up` changed is written, before it changes it, to a state file of
//! this network namespace's under /run/lwk/cluster, and `down` undoes it:
//! after a crash halfway too, and the tables are deleted by name whether
//! the file says so or not.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use lwk_node::address::Cidr;
use serde::{Deserialize, Serialize};

use crate::run;

/// The filter's tables' name (one of family inet, one of family arp).
pub const TABLE: &str = "lwk-cluster";

/// What `lwk cluster up` sets up.
#[derive(Debug, Clone)]
pub struct Setup {
    /// The service addresses, with their prefix.
    pub services: Vec<Cidr>,
    /// The front interface.
    pub dev: String,
    /// The cluster's shared hardware address (every node the same); by
    /// default made from the first service address (02:4c:xx:xx:xx:xx, a
    /// locally administered one).
    pub mac: Option<String>,
    /// This node answers ARP requests (and pings) for the addresses.
    pub arp_owner: bool,
    /// TCP ports whose new connections are spread over the nodes.
    pub spread: Vec<u16>,
    /// This node's number K (from 1) of N, for the spread.
    pub node: Option<(u32, u32)>,
}

/// The seed of the spread's hash: the same on every node.
const SPREAD_SEED: u32 = 0x006c_776b;

/// What a node's `up` changed, to be undone.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
struct State {
    dev: String,
    /// The interface's own hardware address before.
    old_mac: String,
    mac: String,
    /// The addresses `up` added (not those the interface already had).
    added: Vec<String>,
    services: Vec<String>,
    arp_owner: bool,
    /// The interface was up before (`up` brings it up).
    #[serde(default)]
    was_up: bool,
    #[serde(default)]
    spread: Vec<u16>,
    /// This node's K of N, for the spread.
    #[serde(default)]
    node: Option<(u32, u32)>,
}

/// The default shared hardware address of a cluster whose first service
/// address is `a`.
pub fn mac_of(a: std::net::Ipv4Addr) -> String {
    let o = a.octets();
    format!("02:4c:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3])
}

/// This network namespace's state file.
fn state_file() -> Result<PathBuf> {
    let link = std::fs::read_link("/proc/self/ns/net").context("this process's network namespace")?;
    let id: String = link.to_string_lossy().chars().filter(char::is_ascii_digit).collect();
    Ok(PathBuf::from(format!("/run/lwk/cluster/{id}.json")))
}

/// Configure this node (see the module's documentation).
pub fn up(s: &Setup) -> Result<()> {
    if s.services.is_empty() {
        bail!("name at least one service address (A.B.C.D/N)");
    }
    match s.node {
        Some((k, n)) if k == 0 || k > n => bail!("--node {k}/{n}: K counts from 1 to N"),
        None if !s.spread.is_empty() => bail!("--spread needs this node's number: --node K/N"),
        _ => {}
    }
    let file = state_file()?;
    if file.exists() {
        bail!("this node is already configured ({}): `lwk cluster down` first", file.display());
    }
    let old = lwk_node::address::hardware_address(&s.dev).with_context(|| format!("the interface {}", s.dev))?;
    let old_mac = old.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
    let mac = s.mac.clone().unwrap_or_else(|| mac_of(s.services[0].addr));
    let present = run("ip", &["-o", "-4", "addr", "show", "dev", &s.dev], None)?;
    let flags = run("ip", &["-br", "link", "show", "dev", &s.dev], None)?;
    let was_up = flags.split(['<', '>']).nth(1).is_some_and(|f| f.split(',').any(|f| f == "UP"));
    let mut state = State {
        dev: s.dev.clone(),
        old_mac,
        mac: mac.clone(),
        added: Vec::new(),
        services: s.services.iter().map(|c| c.to_string()).collect(),
        arp_owner: s.arp_owner,
        was_up,
        spread: s.spread.clone(),
        node: s.node,
    };
    for c in &s.services {
        if !present.contains(&format!("inet {c} ")) {
            state.added.push(c.to_string());
        }
    }
    // Written first: whatever happens from here, `down` undoes it.
    std::fs::create_dir_all(file.parent().expect("a directory")).context("/run/lwk/cluster")?;
    std::fs::write(&file, serde_json::to_vec_pretty(&state)?).with_context(|| format!("{}", file.display()))?;
    let done = (|| -> Result<()> {
        run("nft", &["-f", "-"], Some(&filter_rules(&state)))?;
        run("ip", &["link", "set", "dev", &s.dev, "address", &mac], None)?;
        for c in &state.added {
            run("ip", &["addr", "add", c, "dev", &s.dev], None)?;
        }
        run("ip", &["link", "set", "dev", &s.dev, "up"], None)?;
        Ok(())
    })();
    if let Err(e) = done {
        down().ok();
        return Err(e.context("configuring this node of the cluster (undone)"));
    }
    Ok(())
}

/// The filter's rules, as `nft -f` reads them.
fn filter_rules(s: &State) -> String {
    let addrs: Vec<&str> = s.services.iter().map(|c| c.split('/').next().unwrap_or(c)).collect();
    let set = format!("{{ {} }}", addrs.join(", "));
    let ping = if s.arp_owner { "accept" } else { "drop" };
    let mut rules = format!(
        "table inet {TABLE} {{\n\
         \tchain pre {{\n\
         \t\ttype filter hook prerouting priority -290; policy accept;\n\
         \t\tip daddr {set} socket transparent 0 accept\n\
         \t\tip daddr {set} socket transparent 1 accept\n\
         \t\tip daddr {set} icmp type echo-request {ping}\n\
         \t\tip daddr {set} drop\n\
         \t}}\n\
         \tchain out {{\n\
         \t\ttype filter hook output priority 0; policy accept;\n\
         \t\tip saddr {set} counter\n\
         \t}}\n\
         }}\n"
    );
    if let (false, Some((k, n))) = (s.spread.is_empty(), s.node) {
        let ports: Vec<String> = s.spread.iter().map(u16::to_string).collect();
        let to = format!("ip daddr {set} tcp dport {{ {} }}", ports.join(", "));
        let syn = "tcp flags & (syn | ack) == syn";
        let mine = k - 1;
        rules += &format!(
            "table inet {TABLE} {{\n\
             \tchain spread {{\n\
             \t\ttype filter hook prerouting priority -150; policy accept;\n\
             \t\t{to} {syn} jhash ip saddr . tcp sport mod {n} seed {SPREAD_SEED:#x} == {mine} accept\n\
             \t\t{to} {syn} drop\n\
             \t\t{to} ct state established accept\n\
             \t\t{to} drop\n\
             \t}}\n\
             }}\n"
        );
    }
    if !s.arp_owner {
        rules += &format!(
            "table arp {TABLE} {{\n\
             \tchain in {{\n\
             \t\ttype filter hook input priority 0; policy accept;\n\
             \t\tarp operation request arp daddr ip {set} drop\n\
             \t}}\n\
             }}\n"
        );
    }
    rules
}

/// Undo `up` in this network namespace: what was undone, one line each.
pub fn down() -> Result<Vec<String>> {
    let mut undone = Vec::new();
    // Packet holds of migrations whose holder died (a killed daemon).
    match lwk_node::hold::sweep() {
        Ok(0) => {}
        Ok(n) => undone.push(format!("{n} packet-hold rules of processes that ended")),
        Err(e) => undone.push(format!("packet-hold rules of ended processes not removed: {e:#}")),
    }
    for family in ["inet", "arp"] {
        if run("nft", &["list", "table", family, TABLE], None).is_ok() {
            run("nft", &["delete", "table", family, TABLE], None)?;
            undone.push(format!("packet filter ({family} table {TABLE})"));
        }
    }
    let file = state_file()?;
    let Ok(text) = std::fs::read(&file) else { return Ok(undone) };
    let state: State = serde_json::from_slice(&text).with_context(|| format!("{}", file.display()))?;
    for c in &state.added {
        if run("ip", &["addr", "del", c, "dev", &state.dev], None).is_ok() {
            undone.push(format!("address {c} on {}", state.dev));
        }
    }
    if run("ip", &["link", "set", "dev", &state.dev, "address", &state.old_mac], None).is_ok() {
        undone.push(format!("hardware address of {} back to {}", state.dev, state.old_mac));
    }
    if !state.was_up && run("ip", &["link", "set", "dev", &state.dev, "down"], None).is_ok() {
        undone.push(format!("{} down again", state.dev));
    }
    std::fs::remove_file(&file).with_context(|| format!("{}", file.display()))?;
    Ok(undone)
}

/// What this node is, for `lwk cluster status`.
#[derive(Debug, Serialize)]
pub struct Status {
    pub configured: bool,
    pub dev: Option<String>,
    pub services: Vec<String>,
    pub mac: Option<String>,
    pub arp_owner: bool,
    /// Ports whose new connections are spread, and this node's K of N.
    pub spread: Vec<u16>,
    pub node: Option<(u32, u32)>,
    /// Packets this node sent from the service addresses since `up`.
    pub packets_sent: u64,
}

pub fn status() -> Result<Status> {
    let file = state_file()?;
    let state: Option<State> = std::fs::read(&file).ok().and_then(|t| serde_json::from_slice(&t).ok());
    let listed = run("nft", &["list", "chain", "inet", TABLE, "out"], None).unwrap_or_default();
    let packets_sent =
        listed.split_whitespace().skip_while(|w| *w != "packets").nth(1).and_then(|n| n.parse().ok()).unwrap_or(0);
    Ok(Status {
        configured: state.is_some(),
        dev: state.as_ref().map(|s| s.dev.clone()),
        services: state.as_ref().map_or(Vec::new(), |s| s.services.clone()),
        mac: state.as_ref().map(|s| s.mac.clone()),
        arp_owner: state.as_ref().is_some_and(|s| s.arp_owner),
        spread: state.as_ref().map_or(Vec::new(), |s| s.spread.clone()),
        node: state.as_ref().and_then(|s| s.node),
        packets_sent,
    })
}
