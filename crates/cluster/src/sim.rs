//! A single-IP cluster on one machine (`lwk cluster sim up N` / `down`).
//!
//! Network namespaces, all named `lwk-sim-*`, addresses only from
//! 198.18.0.0/15:
//!
//! * `lwk-sim-hub` holds two bridges: `front`, with ageing time 0, so that
//!   it learns no address and floods every frame to every port (the
//!   hub-like segment a real cluster's front network must be), and
//!   `cluster`, the network between the node daemons.
//! * `lwk-sim-client`: the client side, 198.18.0.100/24 on its `front`.
//! * `lwk-sim-nK` (K = 1..N): a node. Its `front` is configured by
//!   [`crate::node::up`] (the service address 198.18.0.10/24, the shared
//!   hardware address, the filter; node 1 answers ARP), its `cluster` has
//!   198.18.1.K/24, and its node daemon (`lwk node serve`) listens there,
//!   with a cluster key made for the simulation.
//!
//! Either network can be shaped with `tc` (tbf) at a rate, on both ends of
//! every link. What was made is described in /run/lwk/sim/sim.json; `down`
//! removes everything named so (processes in the namespaces, the
//! namespaces, their nodes' state files, /run/lwk/sim), whether `up`
//! finished or not.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::run;

pub const PREFIX: &str = "lwk-sim-";
pub const HUB: &str = "lwk-sim-hub";
pub const CLIENT: &str = "lwk-sim-client";
pub const SERVICE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
/// The node daemons' port on the cluster network.
pub const DAEMON_PORT: u16 = 7070;
const DIR: &str = "/run/lwk/sim";

/// How to make the simulated cluster.
#[derive(Debug, Clone)]
pub struct Options {
    pub nodes: usize,
    /// tbf rates (as `tc` writes them: "1gbit") for the front and the
    /// cluster network.
    pub shape_front: Option<String>,
    pub shape_cluster: Option<String>,
    /// TCP ports whose new connections are spread over the nodes.
    pub spread: Vec<u16>,
    /// The lwk binary the node daemons run.
    pub lwk: PathBuf,
}

/// The simulated cluster, as `--json` prints it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sim {
    pub service: String,
    pub client: Client,
    pub nodes: Vec<SimNode>,
    /// The cluster key the daemons use (and `lwk migrate --key` needs).
    pub key: PathBuf,
    pub shape_front: Option<String>,
    pub shape_cluster: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Client {
    pub netns: String,
    pub addr: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SimNode {
    pub name: String,
    pub netns: String,
    /// Its front interface (in its namespace).
    pub front: String,
    pub cluster_addr: String,
    /// Where its daemon listens (`lwk migrate --to`).
    pub daemon: String,
    pub daemon_pid: u32,
    pub log: PathBuf,
    pub arp_owner: bool,
}

/// The description of the cluster that is up, if one is.
pub fn current() -> Option<Sim> {
    serde_json::from_slice(&std::fs::read(Path::new(DIR).join("sim.json")).ok()?).ok()
}

fn namespaces() -> Result<Vec<String>> {
    let out = run("ip", &["netns", "list"], None)?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(PREFIX))
        .map(String::from)
        .collect())
}

/// Make the cluster (see the module's documentation).
pub fn up(o: &Options) -> Result<Sim> {
    if !(1..=200).contains(&o.nodes) {
        bail!("a simulated cluster has 1 to 200 nodes, not {}", o.nodes);
    }
    if Path::new(DIR).exists() || !namespaces()?.is_empty() {
        bail!("a simulated cluster is up already: `lwk cluster sim down` first");
    }
    let made = build(o);
    if made.is_err() {
        down().ok();
    }
    made
}

fn build(o: &Options) -> Result<Sim> {
    std::fs::create_dir_all(DIR).with_context(|| DIR.to_string())?;
    let ip = |args: &[&str]| run("ip", args, None);
    ip(&["netns", "add", HUB])?;
    for br in ["front", "cluster"] {
        ip(&["-n", HUB, "link", "add", br, "type", "bridge", "ageing_time", "0"])?;
        ip(&["-n", HUB, "link", "set", br, "up"])?;
    }
    let key = Path::new(DIR).join("cluster.key");
    lwk_node::key::generate(&key).context("a cluster key for the simulation")?;
    // The client side.
    netns(CLIENT)?;
    link(CLIENT, "front", "f-client", "front", o.shape_front.as_deref())?;
    ip(&["-n", CLIENT, "addr", "add", &format!("{CLIENT_ADDR}/24"), "dev", "front"])?;
    ip(&["-n", CLIENT, "link", "set", "front", "up"])?;
    let mut nodes = Vec::new();
    for k in 1..=o.nodes {
        let name = format!("n{k}");
        let ns = format!("{PREFIX}{name}");
        netns(&ns)?;
        link(&ns, "front", &format!("f-{name}"), "front", o.shape_front.as_deref())?;
        link(&ns, "cluster", &format!("c-{name}"), "cluster", o.shape_cluster.as_deref())?;
        let cluster_addr = format!("198.18.1.{k}");
        ip(&["-n", &ns, "addr", "add", &format!("{cluster_addr}/24"), "dev", "cluster"])?;
        ip(&["-n", &ns, "link", "set", "cluster", "up"])?;
        let lwk = o.lwk.to_string_lossy();
        let mut cluster_up = vec!["netns", "exec", &ns, &lwk, "cluster", "up", "--dev", "front"];
        let service = format!("{SERVICE}/24");
        cluster_up.extend(["--service", &service]);
        if k == 1 {
            cluster_up.push("--arp-owner");
        }
        let spread: Vec<String> = o.spread.iter().map(u16::to_string).collect();
        let node = format!("{k}/{}", o.nodes);
        for p in &spread {
            cluster_up.extend(["--spread", p]);
        }
        if !spread.is_empty() {
            cluster_up.extend(["--node", &node]);
        }
        ip(&cluster_up)?;
        let log = Path::new(DIR).join(format!("{name}.log"));
        let daemon = format!("{cluster_addr}:{DAEMON_PORT}");
        let state = Path::new(DIR).join(&name);
        let out = std::fs::File::create(&log).with_context(|| format!("{}", log.display()))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &ns])
            .arg(&o.lwk)
            .args(["node", "serve", "--listen", &daemon, "--service-dev", "front", "--key"])
            .arg(&key)
            .arg("--state-dir")
            .arg(&state)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("starting a node daemon")?;
        nodes.push(SimNode {
            name,
            netns: ns,
            front: "front".into(),
            cluster_addr,
            daemon,
            daemon_pid: child.id(),
            log,
            arp_owner: k == 1,
        });
    }
    let sim = Sim {
        service: SERVICE.to_string(),
        client: Client { netns: CLIENT.into(), addr: CLIENT_ADDR.to_string() },
        nodes,
        key,
        shape_front: o.shape_front.clone(),
        shape_cluster: o.shape_cluster.clone(),
    };
    std::fs::write(Path::new(DIR).join("sim.json"), serde_json::to_vec_pretty(&sim)?)?;
    for n in &sim.nodes {
        wait_listening(n)?;
    }
    Ok(sim)
}

/// A namespace with its loopback up and no IPv6 (the nodes share a
/// hardware address, so their link-local addresses would clash).
fn netns(name: &str) -> Result<()> {
    run("ip", &["netns", "add", name], None)?;
    run("ip", &["-n", name, "link", "set", "lo", "up"], None)?;
    run("ip", &["netns", "exec", name, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"], None)?;
    run("ip", &["netns", "exec", name, "sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"], None)?;
    Ok(())
}

/// A link from `dev` in namespace `ns` to port `port` of the hub's bridge
/// `bridge`, shaped at `rate` both ways if one is given.
fn link(ns: &str, dev: &str, port: &str, bridge: &str, rate: Option<&str>) -> Result<()> {
    run("ip", &["link", "add", dev, "netns", ns, "type", "veth", "peer", "name", port, "netns", HUB], None)?;
    run("ip", &["-n", HUB, "link", "set", port, "master", bridge, "up"], None)?;
    if let Some(rate) = rate {
        for (n, d) in [(ns, dev), (HUB, port)] {
            run(
                "ip",
                &[
                    "netns", "exec", n, "tc", "qdisc", "add", "dev", d, "root", "tbf", "rate", rate, "burst", "256kb",
                    "latency", "50ms",
                ],
                None,
            )?;
        }
    }
    Ok(())
}

/// Wait until node `n`'s daemon listens (or say why it does not).
fn wait_listening(n: &SimNode) -> Result<()> {
    let t0 = std::time::Instant::now();
    loop {
        let listening =
            run("ip", &["netns", "exec", &n.netns, "ss", "-Htln", &format!("sport = :{DAEMON_PORT}")], None)?;
        if !listening.trim().is_empty() {
            return Ok(());
        }
        if t0.elapsed() > std::time::Duration::from_secs(10) {
            let log = std::fs::read_to_string(&n.log).unwrap_or_default();
            bail!("the daemon of {} does not listen on {}: {}", n.name, n.daemon, log.trim());
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Remove the simulated cluster, whatever of it exists: what was removed.
pub fn down() -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for ns in namespaces()? {
        let pids = run("ip", &["netns", "pids", &ns], None).unwrap_or_default();
        for pid in pids.split_whitespace() {
            run("kill", &["-9", pid], None).ok();
        }
        // Its node's state file and drained mark (named by the
        // namespace's inode, which a later namespace may get).
        if let Ok(meta) = std::fs::metadata(format!("/run/netns/{ns}")) {
            use std::os::unix::fs::MetadataExt;
            std::fs::remove_file(format!("/run/lwk/cluster/{}.json", meta.ino())).ok();
            if std::fs::remove_file(format!("/run/lwk/drained/{}", meta.ino())).is_ok() {
                removed.push(format!("the drained mark of {ns}"));
            }
        }
        run("ip", &["netns", "delete", &ns], None)?;
        removed.push(format!("namespace {ns}"));
    }
    if Path::new(DIR).exists() {
        std::fs::remove_dir_all(DIR).with_context(|| DIR.to_string())?;
        removed.push(DIR.to_string());
    }
    Ok(removed)
}
