//! Holding a migrating application's packets (issue 10): from before the
//! source freezes until the restored sockets leave repair mode, the
//! destination keeps every packet of the application's flows in a
//! netfilter queue, and then lets them in, in the order they came.
//!
//! The queue is fed by an iptables rule (the xtables NFQUEUE target: nft's
//! own `queue` statement is not built into these kernels), in the raw
//! table's PREROUTING chain, which runs before the cluster's filter
//! (`lwk_cluster::node::TABLE`, at priority -290): a packet let go goes on to that
//! filter, which by then finds its restored socket. The rule has
//! `--queue-bypass`, so a holder that died leaves the traffic to the
//! filter instead of a queue nobody reads, and carries a comment naming
//! this process, so that [`sweep`] removes rules whose holder is gone.
//!
//! A [`Hold`] reads the queued packets' metadata as they come (the kernel
//! keeps the packets) and gives its verdicts only when told:
//! [`Hold::release`] accepts them in order, lets what still comes pass
//! straight through while the rule goes, and accepts the stragglers;
//! dropping a `Hold` drops what it held (the source kept its copies: every
//! node receives every packet).

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU8, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// What to hold: packets to `addr` for these TCP and UDP ports.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Flows {
    pub addr: Option<Ipv4Addr>,
    pub tcp_ports: Vec<u16>,
    pub udp_ports: Vec<u16>,
}

const HOLDING: u8 = 0;
const PASSING: u8 = 1;
const DROPPING: u8 = 2;
const STOPPED: u8 = 3;

/// Packets held in a queue until released or dropped.
pub struct Hold {
    rules: Vec<Vec<String>>,
    mode: Arc<AtomicU8>,
    reader: Option<std::thread::JoinHandle<Result<usize>>>,
}

/// The comment on this process's rules.
fn comment() -> String {
    format!("lwk-hold-{}", std::process::id())
}

impl Hold {
    /// Hold `flows` in queue `queue` from now on.
    pub fn start(flows: &Flows, queue: u16) -> Result<Hold> {
        let Some(addr) = flows.addr else { bail!("a hold needs the service address") };
        let mut q = nfq::Queue::open().context("cannot open a netfilter queue socket")?;
        q.bind(queue).with_context(|| format!("cannot bind netfilter queue {queue}"))?;
        q.set_copy_range(queue, 0).context("netfilter queue: metadata only")?;
        q.set_queue_max_len(queue, 1 << 16).context("netfilter queue: its length")?;
        q.set_fail_open(queue, false).context("netfilter queue: drop when full")?;
        q.set_nonblocking(true);
        let mode = Arc::new(AtomicU8::new(HOLDING));
        let mut hold = Hold { rules: Vec::new(), mode: mode.clone(), reader: None };
        // The reader first: packets may come as soon as a rule is in.
        hold.reader = Some(std::thread::spawn(move || read(q, queue, &mode)));
        for (proto, ports) in [("tcp", &flows.tcp_ports), ("udp", &flows.udp_ports)] {
            for chunk in ports.chunks(15) {
                let list: Vec<String> = chunk.iter().map(u16::to_string).collect();
                let rule: Vec<String> = [
                    "PREROUTING",
                    "-d",
                    &addr.to_string(),
                    "-p",
                    proto,
                    "-m",
                    "multiport",
                    "--dports",
                    &list.join(","),
                    "-m",
                    "comment",
                    "--comment",
                    &comment(),
                    "-j",
                    "NFQUEUE",
                    "--queue-num",
                    &queue.to_string(),
                    "--queue-bypass",
                ]
                .iter()
                .map(|s| s.to_string())
                .collect();
                iptables("-A", &rule)?;
                hold.rules.push(rule);
            }
        }
        if hold.rules.is_empty() {
            bail!("nothing to hold: no port named");
        }
        Ok(hold)
    }

    /// Let the held packets in, in order, then everything after them;
    /// how many were held.
    pub fn release(mut self) -> Result<usize> {
        self.mode.store(PASSING, SeqCst);
        self.remove_rules();
        // What the kernel queued before the rules went is passed too.
        std::thread::sleep(Duration::from_millis(5));
        self.mode.store(STOPPED, SeqCst);
        self.reader.take().expect("a reader").join().expect("the reader does not panic")
    }

    fn remove_rules(&mut self) {
        for rule in std::mem::take(&mut self.rules) {
            iptables("-D", &rule).ok();
        }
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        if let Some(reader) = self.reader.take() {
            self.mode.store(DROPPING, SeqCst);
            self.remove_rules();
            self.mode.store(STOPPED, SeqCst);
            reader.join().ok();
        }
        self.remove_rules();
    }
}

/// The reader: keep what comes while holding; accept everything in order
/// when passing; drop it when dropping. How many it held.
fn read(mut q: nfq::Queue, queue: u16, mode: &AtomicU8) -> Result<usize> {
    let mut held: Vec<nfq::Message> = Vec::new();
    let mut count = 0;
    loop {
        let m = mode.load(SeqCst);
        match q.recv() {
            Ok(msg) => {
                count += usize::from(m == HOLDING);
                held.push(msg);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if m == STOPPED && held.is_empty() {
                    q.unbind(queue).ok();
                    return Ok(count);
                }
                if held.is_empty() || m == HOLDING {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            Err(e) => return Err(e).context("reading the netfilter queue"),
        }
        if m != HOLDING {
            let verdict = if m == DROPPING { nfq::Verdict::Drop } else { nfq::Verdict::Accept };
            for mut msg in held.drain(..) {
                msg.set_verdict(verdict);
                q.verdict(msg).context("giving a netfilter queue verdict")?;
            }
        }
    }
}

fn iptables(op: &str, rule: &[String]) -> Result<String> {
    let mut args = vec!["-w", "-t", "raw", op];
    args.extend(rule.iter().map(String::as_str));
    run("iptables", &args)
}

/// Run `program` with `args`: its standard output, or its error naming the
/// command.
fn run(program: &str, args: &[&str]) -> Result<String> {
    let o = std::process::Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program} (install {program})"))?;
    if !o.status.success() {
        bail!("{program} {}: {}", args.join(" "), String::from_utf8_lossy(&o.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// Remove hold rules whose process is gone (a holder that crashed).
pub fn sweep() -> Result<usize> {
    let listed = match run("iptables", &["-w", "-t", "raw", "-S", "PREROUTING"]) {
        Ok(l) => l,
        Err(_) => return Ok(0), // no iptables: no rules either
    };
    let mut removed = 0;
    for line in listed.lines() {
        let Some(pid) = line.split("lwk-hold-").nth(1).and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        else {
            continue;
        };
        if std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let Some(rule) = line.strip_prefix("-A ") else { continue };
        let rule: Vec<String> = rule.split_whitespace().map(|w| w.trim_matches('"').to_string()).collect();
        if iptables("-D", &rule).is_ok() {
            removed += 1;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn retransmitted() -> u64 {
        let snmp = std::fs::read_to_string("/proc/net/snmp").unwrap();
        let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
        let (names, values) = (tcp.next().unwrap(), tcp.next().unwrap());
        let i = names.split_whitespace().position(|n| n == "RetransSegs").unwrap();
        values.split_whitespace().nth(i).unwrap().parse().unwrap()
    }

    #[test]
    #[ignore = "needs root (a network namespace, iptables, a netfilter queue)"]
    fn held_packets_come_in_after_the_release_in_order_and_none_is_lost_or_sent_again() {
        // In a network namespace of this thread's own (iptables, its
        // child, and the hold's reader thread are there too).
        // SAFETY: unshare of the calling thread's network namespace.
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "{}", std::io::Error::last_os_error());
        run("ip", &["link", "set", "lo", "up"]).unwrap();
        let udp = std::net::UdpSocket::bind("127.0.0.1:9999").unwrap();
        udp.set_nonblocking(true).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:9998").unwrap();
        let mut client = std::net::TcpStream::connect("127.0.0.1:9998").unwrap();
        let (mut server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        let retrans = retransmitted();
        let flows = Flows { addr: Some(Ipv4Addr::LOCALHOST), tcp_ports: vec![9998], udp_ports: vec![9999] };
        let hold = Hold::start(&flows, 7).unwrap();
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for i in 0..50u32 {
            sender.send_to(&i.to_be_bytes(), "127.0.0.1:9999").unwrap();
        }
        client.write_all(b"held bytes").unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let mut buf = [0u8; 64];
        assert!(udp.recv(&mut buf).is_err(), "a datagram got through the hold");
        assert!(server.read(&mut buf).is_err(), "TCP data got through the hold");
        let n = hold.release().unwrap();
        assert!(n >= 51, "held {n}");
        std::thread::sleep(Duration::from_millis(50));
        for i in 0..50u32 {
            let got = udp.recv(&mut buf).expect("every datagram, after the release");
            assert_eq!(&buf[..got], &i.to_be_bytes(), "in order");
        }
        let got = server.read(&mut buf).unwrap();
        assert_eq!(&buf[..got], b"held bytes");
        assert_eq!(retransmitted(), retrans, "nothing was sent again");
        // The rule is gone: traffic flows as before.
        client.write_all(b"after").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let got = server.read(&mut buf).unwrap();
        assert_eq!(&buf[..got], b"after");
        let rules = run("iptables", &["-t", "raw", "-S", "PREROUTING"]).unwrap();
        assert!(!rules.contains("lwk-hold"), "{rules}");
        // Dropped: what it held is gone (the source had it), the rule too.
        let hold = Hold::start(&flows, 7).unwrap();
        sender.send_to(b"x", "127.0.0.1:9999").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        drop(hold);
        std::thread::sleep(Duration::from_millis(20));
        assert!(udp.recv(&mut buf).is_err(), "a dropped datagram came in");
        let rules = run("iptables", &["-t", "raw", "-S", "PREROUTING"]).unwrap();
        assert!(!rules.contains("lwk-hold"), "{rules}");
        // A rule whose holder died is swept; a live holder's is not.
        let stale: Vec<String> = "PREROUTING -d 127.0.0.1 -p udp -m comment --comment lwk-hold-2147483646 -j NFQUEUE --queue-num 7 --queue-bypass"
            .split(' ')
            .map(String::from)
            .collect();
        iptables("-A", &stale).unwrap();
        let live = Hold::start(&flows, 8).unwrap();
        assert_eq!(sweep().unwrap(), 1);
        let rules = run("iptables", &["-t", "raw", "-S", "PREROUTING"]).unwrap();
        assert!(!rules.contains("2147483646") && rules.contains(&comment()), "{rules}");
        drop(live);
    }
}
