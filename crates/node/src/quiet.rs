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

use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The drop rule, in force until dropped (or [`Quiet::lift`]ed).
pub struct Quiet {
    child: Child,
    input: Option<ChildStdin>,
    table: String,
}

/// How long nftables may take to say the rule is in.
const CONFIRM_WITHIN: Duration = Duration::from_secs(5);

impl Quiet {
    /// Drop inbound TCP to `addr` from now on.
    pub fn start(addr: Ipv4Addr) -> Result<Quiet> {
        let mut child = Command::new("nft")
            .arg("-i")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot run nft (install nftables)")?;
        let table = format!("lwk-quiet-{}", std::process::id());
        let mut input = child.stdin.take().expect("piped");
        let output = child.stdout.take().expect("piped");
        let commands = format!(
            "add table inet {table} {{ flags owner; }}\n\
             add chain inet {table} input {{ type filter hook input priority -300; policy accept; }}\n\
             add rule inet {table} input ip daddr {addr} meta l4proto tcp drop\n\
             list table inet {table}\n"
        );
        let mut quiet = Quiet { child, input: None, table };
        input.write_all(commands.as_bytes()).context("talking to nft")?;
        input.flush().ok();
        quiet.input = Some(input);
        quiet.confirm(output, addr)?;
        Ok(quiet)
    }

    /// Wait until nft lists the table with its rule: then it is in force.
    fn confirm(&mut self, output: ChildStdout, addr: Ipv4Addr) -> Result<()> {
        let (tx, rx) = std::sync::mpsc::channel();
        let rule = format!("ip daddr {addr} meta l4proto tcp drop");
        std::thread::spawn(move || {
            for line in BufReader::new(output).lines() {
                let Ok(line) = line else { break };
                if line.trim() == rule {
                    tx.send(()).ok();
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
}
