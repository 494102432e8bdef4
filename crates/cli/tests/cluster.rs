//! The single-IP cluster (issue 10): `lwk cluster up/down` on one node, and
//! the simulated cluster of `lwk cluster sim`, whose namespaces (all
//! `lwk-sim-*`, addresses from 198.18.0.0/15) one test at a time uses and
//! removes, also when it fails.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{compiled, enter_netns, only_standard_streams, LineClient};

const LWK: &str = env!("CARGO_BIN_EXE_lwk");

fn lwk(args: &[&str]) -> std::process::Output {
    Command::new(LWK).args(args).output().unwrap()
}

fn lwk_in(ns: &str, args: &[&str]) -> std::process::Output {
    Command::new("ip").args(["netns", "exec", ns, LWK]).args(args).output().unwrap()
}

/// The simulated cluster, for one test at a time; down when dropped.
struct Sim {
    info: serde_json::Value,
    _alone: std::sync::MutexGuard<'static, ()>,
}

static SIM: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl Sim {
    fn up(nodes: usize) -> Sim {
        let alone = SIM.lock().unwrap_or_else(|e| e.into_inner());
        let o = lwk(&["cluster", "sim", "up", &nodes.to_string(), "--json"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let info = serde_json::from_slice(&o.stdout).unwrap();
        Sim { info, _alone: alone }
    }

    fn node(&self, k: usize) -> String {
        self.info["nodes"][k]["netns"].as_str().unwrap().to_string()
    }

    /// What node `k` sent from the service address.
    fn sent_by(&self, k: usize) -> u64 {
        let o = lwk_in(&self.node(k), &["cluster", "status", "--json"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(s["configured"], true, "{s}");
        s["packets_sent"].as_u64().unwrap()
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        lwk(&["cluster", "sim", "down"]);
    }
}

fn sim_leftovers() -> Vec<String> {
    let ns = String::from_utf8(Command::new("ip").args(["netns", "list"]).output().unwrap().stdout).unwrap();
    let mut left: Vec<String> = ns.lines().filter(|l| l.starts_with("lwk-sim-")).map(String::from).collect();
    if std::path::Path::new("/run/lwk/sim").exists() {
        left.push("/run/lwk/sim".into());
    }
    let daemons = Command::new("pgrep").args(["-f", "node serve --listen 198.18.1."]).output().unwrap();
    left.extend(String::from_utf8_lossy(&daemons.stdout).lines().map(|p| format!("daemon {p}")));
    left
}

#[test]
#[ignore = "needs root (network namespaces, nftables)"]
fn one_node_answers_for_the_service_address_and_sim_down_leaves_nothing() {
    let sim = Sim::up(3);
    assert_eq!(sim.info["service"], "198.18.0.10");
    // net_target under lwk on the second node, on the service address.
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &sim.node(1), LWK, "run", "--"])
        .arg(compiled("net_target"))
        .args(["198.18.0.10", "7001", "7002"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    let mut app = only_standard_streams(&mut cmd).spawn().unwrap();
    let mut out = BufReader::new(app.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n");
    let before: Vec<u64> = (0..3).map(|k| sim.sent_by(k)).collect();
    // The client, from its side (this test's thread enters it).
    let client_ns = sim.info["client"]["netns"].as_str().unwrap().to_string();
    std::thread::scope(|s| {
        s.spawn(|| {
            enter_netns(&client_ns);
            let mut c = LineClient::connect("198.18.0.10:7001", Duration::from_secs(10));
            assert_eq!(c.ask("hello\n"), "hello\n");
            let udp = std::net::UdpSocket::bind("198.18.0.100:0").unwrap();
            udp.send_to(b"d1", "198.18.0.10:7002").unwrap();
            std::thread::sleep(Duration::from_millis(200));
            assert_eq!(c.ask("udp\n"), "udp 1 198.18.0.100:d1\n");
            assert_eq!(c.ask("quit\n"), "bye\n");
        });
    });
    assert!(app.wait().unwrap().success());
    let sent: Vec<u64> = (0..3).map(|k| sim.sent_by(k) - before[k]).collect();
    assert!(sent[1] >= 4, "the node with the application answered: {sent:?}");
    assert_eq!((sent[0], sent[2]), (0, 0), "the other nodes sent nothing from the address: {sent:?}");
    drop(sim);
    assert_eq!(sim_leftovers(), Vec::<String>::new());
}

#[test]
#[ignore = "needs root (network namespaces, nftables)"]
fn sim_up_refuses_a_second_cluster_and_bad_sizes() {
    let sim = Sim::up(1);
    let o = lwk(&["cluster", "sim", "up", "2"]);
    assert_eq!(o.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&o.stderr).contains("is up already"), "{o:?}");
    drop(sim);
    let o = lwk(&["cluster", "sim", "up", "0"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("1 to 200 nodes"), "{o:?}");
    assert_eq!(sim_leftovers(), Vec::<String>::new());
}

/// A network namespace of the test's with an interface `front` (one end
/// of a veth pair: this kernel has no dummy interfaces).
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Netns {
        let name = format!("lwk-{tag}-{}", std::process::id());
        let ip = |args: &[&str]| assert!(Command::new("ip").args(args).status().unwrap().success(), "ip {args:?}");
        ip(&["netns", "add", &name]);
        let ns = Netns(name);
        ip(&["-n", &ns.0, "link", "add", "front", "type", "veth", "peer", "name", "other"]);
        ns
    }

    fn sh(&self, program: &str, args: &[&str]) -> String {
        let o = Command::new("ip").args(["netns", "exec", &self.0, program]).args(args).output().unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        lwk_in(&self.0, &["cluster", "down"]);
        Command::new("ip").args(["netns", "delete", &self.0]).status().ok();
    }
}

#[test]
#[ignore = "needs root (network namespaces, nftables)"]
fn cluster_up_configures_a_node_and_down_undoes_all_of_it() {
    let ns = Netns::new("cl");
    let mac_before = ns.sh("ip", &["-br", "link", "show", "front"]);
    let o = lwk_in(&ns.0, &["cluster", "up", "--service", "198.18.0.20/24", "--dev", "front"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let link = ns.sh("ip", &["-br", "addr", "show", "front"]);
    assert!(link.contains("198.18.0.20/24"), "{link}");
    assert!(ns.sh("ip", &["-br", "link", "show", "front"]).contains("02:4c:c6:12:00:14"));
    let rules = ns.sh("nft", &["list", "ruleset"]);
    assert!(rules.contains("socket transparent 0 accept") && rules.contains("table arp lwk-cluster"), "{rules}");
    // A second `up` is refused; `down` undoes it all.
    let o = lwk_in(&ns.0, &["cluster", "up", "--service", "198.18.0.20/24", "--dev", "front"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("already configured"), "{o:?}");
    let o = lwk_in(&ns.0, &["cluster", "down"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!ns.sh("ip", &["-br", "addr", "show", "front"]).contains("198.18.0.20"));
    assert_eq!(ns.sh("ip", &["-br", "link", "show", "front"]), mac_before);
    assert_eq!(ns.sh("nft", &["list", "ruleset"]).trim(), "");
    // Bad input is named, and leaves nothing.
    let o = lwk_in(&ns.0, &["cluster", "up", "--service", "198.18.0.300/24", "--dev", "front"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("not an IPv4 address"), "{o:?}");
    let o = lwk_in(&ns.0, &["cluster", "up", "--service", "198.18.0.20/24", "--dev", "nosuch"]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("nosuch"), "{o:?}");
    assert_eq!(ns.sh("nft", &["list", "ruleset"]).trim(), "");
    let status = lwk_in(&ns.0, &["cluster", "status"]);
    assert_eq!(String::from_utf8_lossy(&status.stdout), "not a cluster node (lwk cluster up)\n");
}
