//! Inbound TCP to an application's service address dropped at this node
//! while its connections are captured.
//!
//! A socket in repair mode still takes in data and acknowledges it. Data
//! that arrives after its queues were read would be acknowledged here and
//! then be in neither copy: the peer never sends it again, and the
//! connection hangs with a hole in its stream. (Linux's maintainers answer
//! that a packet filter must hold such traffic during a migration.) So from
//! just before the freeze until the address has left (or the application
//! goes on here after all), every TCP segment to the address is dropped
//! before TCP sees it; the peers send them again, to wherever the address
//! is by then. Holding them instead of dropping them, so that no peer waits
//! for its retransmission timer, is the single-IP cluster's job (issue 10).
//!
//! The rule lives in an nftables table of its own with the `owner` flag,
//! made by an `nft -i` child that keeps its netlink socket open: the kernel
//! deletes an owner table when that socket closes, so the rule goes with
//! this process however it ends (the child reads end of file on its
//! standard input and exits), and nothing of it is ever left behind.
//!
//! `lwk checkpoint` of an application that it stops holds its TCP
//! endpoints (not a whole address: the node's other services go on) the
//! same way during the freeze, and then keeps them held after it exits, in
//! an ordinary table named in the image ([`Quiet::keep_as`]): its peers'
//! segments are dropped, not answered with resets, until `lwk restore`
//! rebuilds the connections and deletes that table ([`release`]).

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The drop rule, in force until dropped (or [`Quiet::lift`]ed).
pub struct Quiet {
    child: Child,
    input: Option<ChildStdin>,
    table: String,
    rules: Vec<String>,
    netns: Option<std::path::PathBuf>,
}

/// Every rule carries it: nft's listing shows it, whatever else it prints.
const MARK: &str = "comment \"lwk-quiet\"";

/// How long nftables may take to say the rule is in.
const CONFIRM_WITHIN: Duration = Duration::from_secs(5);

impl Quiet {
    /// Drop inbound TCP to `addr` from now on.
    pub fn start(addr: Ipv4Addr) -> Result<Quiet> {
        Quiet::with_rules(vec![format!("ip daddr {addr} meta l4proto tcp drop")], None, &addr.to_string())
    }

    /// Drop inbound TCP to the local `endpoints` (an unspecified address:
    /// to that port on every address) from now on, in the network
    /// namespace `netns` (a /proc/PID/ns/net), or ours.
    pub fn endpoints(endpoints: &[SocketAddr], netns: Option<&Path>) -> Result<Quiet> {
        let mut ports = std::collections::BTreeSet::new();
        let (mut v4, mut v6) = (std::collections::BTreeSet::new(), std::collections::BTreeSet::new());
        for e in endpoints {
            let (set, addr) = match e.ip() {
                ip if ip.is_unspecified() => {
                    ports.insert(e.port());
                    continue;
                }
                IpAddr::V4(a) => (&mut v4, a.to_string()),
                IpAddr::V6(a) => match a.to_ipv4_mapped() {
                    Some(a) => (&mut v4, a.to_string()),
                    None => (&mut v6, a.to_string()),
                },
            };
            set.insert(format!("{addr} . {}", e.port()));
        }
        let set = |items: Vec<String>| format!("{{ {} }}", items.join(", "));
        let mut rules = Vec::new();
        if !ports.is_empty() {
            rules.push(format!("tcp dport {} drop", set(ports.iter().map(|p| p.to_string()).collect())));
        }
        if !v4.is_empty() {
            rules.push(format!("ip daddr . tcp dport {} drop", set(v4.into_iter().collect())));
        }
        if !v6.is_empty() {
            rules.push(format!("ip6 daddr . tcp dport {} drop", set(v6.into_iter().collect())));
        }
        if rules.is_empty() {
            bail!("no TCP endpoint to hold");
        }
        let what = endpoints.iter().map(|e| e.to_string()).collect::<Vec<_>>().join(", ");
        Quiet::with_rules(rules, netns, &what)
    }

    fn with_rules(rules: Vec<String>, netns: Option<&Path>, what: &str) -> Result<Quiet> {
        let mut child = nft_in(netns)
            .arg("-i")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot run nft (install nftables)")?;
        let table = format!("lwk-quiet-{}", std::process::id());
        let mut input = child.stdin.take().expect("piped");
        let output = child.stdout.take().expect("piped");
        let mut commands = format!(
            "add table inet {table} {{ flags owner; }}\n\
             add chain inet {table} input {{ type filter hook input priority -300; policy accept; }}\n"
        );
        for r in &rules {
            commands += &format!("add rule inet {table} input {r} {MARK}\n");
        }
        commands += &format!("list table inet {table}\n");
        let n = rules.len();
        let mut quiet = Quiet { child, input: None, table, rules, netns: netns.map(Path::to_path_buf) };
        input.write_all(commands.as_bytes()).context("talking to nft")?;
        input.flush().ok();
        quiet.input = Some(input);
        quiet.confirm(output, n, what)?;
        Ok(quiet)
    }

    /// Keep the rules in force after this process, in an ordinary table
    /// `name` (which [`release`] deletes), and lift the owner table.
    pub fn keep_as(self, name: &str) -> Result<()> {
        let mut text = format!(
            "table inet {name} {{\n chain input {{ type filter hook input priority -300; policy accept; }}\n}}\n"
        );
        for r in &self.rules {
            text += &format!("add rule inet {name} input {r} {MARK}\n");
        }
        nft_with(self.netns.as_deref(), &["-f", "-"], &text).with_context(|| format!("cannot keep table {name}"))?;
        self.lift();
        Ok(())
    }

    /// Wait until nft lists the table with its `n` rules: then they are in
    /// force.
    fn confirm(&mut self, output: ChildStdout, n: usize, addr: &str) -> Result<()> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut seen = 0;
            for line in BufReader::new(output).lines() {
                let Ok(line) = line else { break };
                if line.contains(MARK) {
                    seen += 1;
                    if seen == n {
                        tx.send(()).ok();
                    }
                }
            }
        });
        let t0 = Instant::now();
        loop {
            if rx.recv_timeout(Duration::from_millis(10)).is_ok() {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    std::io::Read::read_to_string(&mut e, &mut err).ok();
                }
                bail!("nft could not drop traffic to {addr} ({status}): {}", err.trim());
            }
            if t0.elapsed() > CONFIRM_WITHIN {
                bail!("nft did not confirm the rule dropping traffic to {addr} within {CONFIRM_WITHIN:?}");
            }
        }
    }

    /// Let traffic in again.
    pub fn lift(mut self) {
        self.end();
    }

    fn end(&mut self) {
        if let Some(mut input) = self.input.take() {
            // Deleted at once; closing the socket would delete it too.
            writeln!(input, "delete table inet {}", self.table).ok();
        }
        self.child.wait().ok();
    }
}

impl Drop for Quiet {
    fn drop(&mut self) {
        self.end();
    }
}

/// Delete the table `name` that [`Quiet::keep_as`] left, if this node has
/// it: true if it did.
pub fn release(name: &str) -> Result<bool> {
    let listed = nft_in(None).args(["list", "table", "inet", name]).output().context("cannot run nft")?;
    if !listed.status.success() {
        return Ok(false);
    }
    nft_with(None, &["delete", "table", "inet", name], "")?;
    Ok(true)
}

/// nft, run in the network namespace `netns` when one is named.
fn nft_in(netns: Option<&Path>) -> Command {
    match netns {
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net={}", ns.display())).arg("nft");
            c
        }
        None => Command::new("nft"),
    }
}

fn nft_with(netns: Option<&Path>, args: &[&str], input: &str) -> Result<()> {
    let mut child = nft_in(netns)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run nft (install nftables)")?;
    child.stdin.take().expect("piped").write_all(input.as_bytes()).context("talking to nft")?;
    let o = child.wait_with_output()?;
    if !o.status.success() {
        bail!("nft {}: {}", args.join(" "), String::from_utf8_lossy(&o.stderr).trim());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tables() -> String {
        let o = Command::new("nft").args(["list", "tables"]).output().unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    #[test]
    #[ignore = "needs root (nftables)"]
    fn the_rule_is_in_force_until_lifted_and_gone_with_its_holder() {
        // In a network namespace of this thread's own (nft, its child,
        // runs there too).
        // SAFETY: unshare of the calling thread's network namespace.
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "{}", std::io::Error::last_os_error());
        let q = Quiet::start(Ipv4Addr::new(198, 18, 0, 77)).unwrap();
        let name = format!("lwk-quiet-{}", std::process::id());
        let listed = Command::new("nft").args(["list", "table", "inet", &name]).output().unwrap();
        assert!(String::from_utf8_lossy(&listed.stdout).contains("ip daddr 198.18.0.77"), "{listed:?}");
        q.lift();
        assert!(!tables().contains(&name), "{}", tables());
        // Killed with its holder: the owner table goes with the socket.
        let mut q = Quiet::start(Ipv4Addr::new(198, 18, 0, 77)).unwrap();
        q.child.kill().unwrap();
        q.child.wait().unwrap();
        let t0 = Instant::now();
        while tables().contains(&name) {
            assert!(t0.elapsed() < Duration::from_secs(5), "the table outlived nft");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    #[ignore = "needs root (nftables)"]
    fn endpoints_are_held_by_address_and_port_kept_after_the_holder_and_released() {
        // SAFETY: unshare of the calling thread's network namespace.
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "{}", std::io::Error::last_os_error());
        let endpoints: Vec<SocketAddr> =
            ["127.0.0.1:7001", "0.0.0.0:7002", "[::1]:7003", "[::ffff:198.18.0.9]:7004", "127.0.0.1:7001"]
                .iter()
                .map(|e| e.parse().unwrap())
                .collect();
        let q = Quiet::endpoints(&endpoints, None).unwrap();
        let owner = format!("lwk-quiet-{}", std::process::id());
        let listed = Command::new("nft").args(["list", "table", "inet", &owner]).output().unwrap();
        let listed = String::from_utf8_lossy(&listed.stdout).into_owned();
        assert!(listed.contains("tcp dport 7002 drop"), "{listed}");
        assert!(listed.contains("ip daddr . tcp dport { 127.0.0.1 . 7001, 198.18.0.9 . 7004 } drop"), "{listed}");
        assert!(listed.contains("ip6 daddr . tcp dport { ::1 . 7003 } drop"), "{listed}");
        q.keep_as("lwk-held-test").unwrap();
        assert!(!tables().contains(&owner), "{}", tables());
        assert!(tables().contains("lwk-held-test"), "{}", tables());
        assert!(release("lwk-held-test").unwrap());
        assert!(!tables().contains("lwk-held-test"), "{}", tables());
        assert!(!release("lwk-held-test").unwrap(), "released twice");
        assert!(Quiet::endpoints(&[], None).is_err(), "nothing to hold");
    }
}
