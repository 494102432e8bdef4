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
//! A [`Hold`] reads the queued packets as they come and gives its verdicts
//! only when told: [`Hold::release`] accepts them in order, lets what still
//! comes pass straight through while the rule goes, and accepts the
//! stragglers; dropping a `Hold` drops what it held (the source kept its
//! copies: every node receives every packet).
//!
//! A datagram that came after the hold began but before the source captured
//! its socket's queue is in both: in the queue the restore put back, and
//! held here. [`Hold::release`] is told what the restored queues end with
//! ([`Already`]), and drops the held datagrams that the queue of their port
//! ends with, so that none comes twice. (TCP needs no such care: a segment
//! the restored socket has already is dropped by TCP itself.) Only the
//! datagrams that came before the [`Hold::cut`] are compared: the source
//! holds its copies too from before its capture, so what comes after the
//! capture's record reached this node cannot be in its queues. The one
//! case that matching by content gets wrong: a sender that sends the same
//! bytes twice within that window (one cluster round trip plus the capture)
//! has the later copy taken for the earlier.
//!
//! The source holds the same flows too, from the destination's word on,
//! with its own end silenced ([`Hold::silence`]): at the commit it drops
//! what it held, at a rollback it lets it in ([`Hold::speak`] first). At
//! the release the destination lets datagrams in no faster than their
//! socket takes them ([`Hold::pace`]), TCP first; and it learns the
//! source's [`neighbours`] ([`learn`]) before the restored sockets send.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::command::run;

/// What to hold: packets to `addr` for these TCP and UDP ports.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Flows {
    pub addr: Option<Ipv4Addr>,
    pub tcp_ports: Vec<u16>,
    pub udp_ports: Vec<u16>,
    /// The source's resolved neighbours (IPv4 address, hardware address):
    /// the destination learns them before the restored connections send,
    /// or a thousand connections' first packets would wait for one
    /// address resolution, overflow its queue and be sent again later.
    #[serde(default)]
    pub neighbours: Vec<(Ipv4Addr, String)>,
}

/// This node's resolved IPv4 neighbours (/proc/net/arp, complete entries).
pub fn neighbours() -> Vec<(Ipv4Addr, String)> {
    let Ok(table) = std::fs::read_to_string("/proc/net/arp") else { return Vec::new() };
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // IP address, HW type, Flags (0x2: complete), HW address, ...
            let complete = u32::from_str_radix(f.get(2)?.trim_start_matches("0x"), 16).ok()? & 0x2 != 0;
            complete.then(|| Some((f[0].parse().ok()?, f.get(3)?.to_string())))?
        })
        .take(4096)
        .collect()
}

/// Learn `neighbours` on `dev` (as stale entries: used at once, checked by
/// the kernel when next used).
pub fn learn(neighbours: &[(Ipv4Addr, String)], dev: &str) -> Result<()> {
    if neighbours.is_empty() {
        return Ok(());
    }
    let batch: String =
        neighbours.iter().map(|(ip, mac)| format!("neigh replace {ip} lladdr {mac} dev {dev} nud stale\n")).collect();
    run("ip", &["-force", "-batch", "-"], Some(&batch))?;
    Ok(())
}

/// A datagram a restored UDP socket's queue holds already.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Already {
    /// The socket's port (the datagram's destination port).
    pub port: u16,
    pub source: std::net::SocketAddr,
    pub data: Vec<u8>,
}

const HOLDING: u8 = 0;
const PASSING: u8 = 1;
const DROPPING: u8 = 2;
const STOPPED: u8 = 3;

/// Packets held in a queue until released or dropped.
pub struct Hold {
    rules: Vec<Vec<String>>,
    shared: Arc<Shared>,
    reader: Option<std::thread::JoinHandle<Result<usize>>>,
}

/// What the reader and its [`Hold`] share.
struct Shared {
    mode: AtomicU8,
    /// How many packets came so far.
    came: AtomicUsize,
    /// Only the packets that came before this many can be in a restored
    /// queue too ([`Hold::cut`]).
    cut: AtomicUsize,
    already: Mutex<Vec<Already>>,
    /// The receive buffer (bytes) of the UDP socket on each port
    /// ([`Hold::pace`]).
    buffers: Mutex<std::collections::HashMap<u16, usize>>,
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
        // Whole packets: a held datagram is compared with the restored
        // queues' at the release.
        q.set_copy_range(queue, u16::MAX).context("netfilter queue: whole packets")?;
        q.set_queue_max_len(queue, 1 << 16).context("netfilter queue: its length")?;
        q.set_fail_open(queue, false).context("netfilter queue: drop when full")?;
        q.set_nonblocking(true);
        let shared = Arc::new(Shared {
            mode: AtomicU8::new(HOLDING),
            came: AtomicUsize::new(0),
            cut: AtomicUsize::new(usize::MAX),
            already: Mutex::new(Vec::new()),
            buffers: Mutex::new(std::collections::HashMap::new()),
        });
        let mut hold = Hold { rules: Vec::new(), shared: shared.clone(), reader: None };
        // The reader first: packets may come as soon as a rule is in.
        hold.reader = Some(std::thread::spawn(move || read(q, queue, &shared)));
        let mut rules = Vec::new();
        for (proto, ports) in [("tcp", &flows.tcp_ports), ("udp", &flows.udp_ports)] {
            for chunk in ports.chunks(15) {
                let list: Vec<String> = chunk.iter().map(u16::to_string).collect();
                // Not what a restore sends to put a socket's queued
                // datagrams back (over the loopback, marked).
                let mark = format!("{:#x}", lwk_migrate::sockets::REINJECTED_MARK);
                let rule = rule(
                    "PREROUTING",
                    &["-m", "mark", "!", "--mark", &mark, "-d", &addr.to_string(), "-p", proto],
                    &["--dports", &list.join(",")],
                    &["NFQUEUE", "--queue-num", &queue.to_string(), "--queue-bypass"],
                );
                rules.push(rule);
            }
        }
        if rules.is_empty() {
            bail!("nothing to hold: no port named");
        }
        // One command for all (it is the freeze's time).
        iptables_all("-A", &rules)?;
        hold.rules = rules;
        Ok(hold)
    }

    /// Hold `flows` in a queue of `range` that no other holder has, looking
    /// from `from` on (holds of several migrations at once); and its number.
    pub fn start_in(flows: &Flows, range: std::ops::Range<u16>, from: u16) -> Result<(Hold, u16)> {
        let len = range.end - range.start;
        let mut last = None;
        for k in 0..len.min(64) {
            let queue = range.start + (from.wrapping_sub(range.start).wrapping_add(k)) % len;
            match Hold::start(flows, queue) {
                Ok(h) => return Ok((h, queue)),
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("tried one at least"))
    }

    /// Let the held packets in, in order, then everything after them, but
    /// for the datagrams the restored queues have `already`; how many were
    /// held.
    pub fn release(mut self, already: Vec<Already>) -> Result<usize> {
        *self.shared.already.lock().expect("not poisoned") = already;
        self.shared.mode.store(PASSING, SeqCst);
        self.remove_rules();
        // What the kernel queued before the rules went is passed too.
        std::thread::sleep(Duration::from_millis(5));
        self.shared.mode.store(STOPPED, SeqCst);
        self.reader.take().expect("a reader").join().expect("the reader does not panic")
    }

    /// Also keep this node's own sockets of the flows from sending (the
    /// source's, from the freeze on): a socket being captured, or let go,
    /// may still answer (a delayed acknowledgement) with its own TCP
    /// timestamps, which run ahead of the restored socket's, and the peer
    /// would then drop the destination's segments as old (PAWS) until it
    /// sent them again. Until [`Hold::speak`], the release or the drop.
    pub fn silence(&mut self, flows: &Flows) -> Result<()> {
        let Some(addr) = flows.addr else { bail!("a hold needs the service address") };
        for chunk in flows.tcp_ports.chunks(15) {
            let list: Vec<String> = chunk.iter().map(u16::to_string).collect();
            let rule =
                rule("OUTPUT", &["-s", &addr.to_string(), "-p", "tcp"], &["--sports", &list.join(",")], &["DROP"]);
            iptables("-A", &rule)?;
            self.rules.push(rule);
        }
        Ok(())
    }

    /// This node's sockets of the flows may send again (they go on here).
    pub fn speak(&mut self) {
        self.rules.retain(|rule| {
            let output = rule[0] == "OUTPUT";
            if output {
                iptables("-D", rule).ok();
            }
            !output
        });
    }

    /// At the release, let datagrams for `port` in no faster than its
    /// socket (whose receive buffer is `receive_buffer` bytes) takes them:
    /// what was held during the freeze comes at once, and a burst larger
    /// than the buffer would be dropped there.
    pub fn pace(&self, port: u16, receive_buffer: usize) {
        self.shared.buffers.lock().expect("not poisoned").insert(port, receive_buffer);
    }

    /// The source has captured its sockets' queues (and holds what comes
    /// there since): what comes from now on cannot be in them.
    pub fn cut(&self) {
        self.shared.cut.store(self.shared.came.load(SeqCst), SeqCst);
    }

    fn remove_rules(&mut self) {
        let rules = std::mem::take(&mut self.rules);
        if iptables_all("-D", &rules).is_err() {
            // One at a time: those that are there go.
            for rule in rules {
                iptables("-D", &rule).ok();
            }
        }
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        if let Some(reader) = self.reader.take() {
            self.shared.mode.store(DROPPING, SeqCst);
            self.remove_rules();
            self.shared.mode.store(STOPPED, SeqCst);
            reader.join().ok();
        }
        self.remove_rules();
    }
}

/// The reader: keep what comes while holding; accept everything in order
/// when passing; drop it when dropping. How many it held.
fn read(mut q: nfq::Queue, queue: u16, shared: &Shared) -> Result<usize> {
    let mut held: Vec<nfq::Message> = Vec::new();
    let mut count = 0;
    let mut deduplicated = false;
    let mut room = Room::default();
    loop {
        let m = shared.mode.load(SeqCst);
        match q.recv() {
            Ok(msg) => {
                count += usize::from(m == HOLDING);
                held.push(msg);
                shared.came.fetch_add(1, SeqCst);
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
            // The first time: what the restored queues have already goes.
            let twice = match (m, deduplicated) {
                (PASSING, false) => {
                    deduplicated = true;
                    let cut = shared.cut.load(SeqCst).min(held.len());
                    in_queues_already(&held[..cut], &shared.already.lock().expect("not poisoned"))
                }
                _ => Vec::new(),
            };
            // Datagrams to paced sockets go last, each when there is room
            // (in order among themselves): the rest (TCP) need not wait.
            let buffers = shared.buffers.lock().expect("not poisoned").clone();
            let paced = |m: &nfq::Message| datagram(m.get_payload()).is_some_and(|d| buffers.contains_key(&d.port));
            let (later, now): (Vec<_>, Vec<_>) =
                held.drain(..).enumerate().partition(|(i, msg)| m == PASSING && !twice.contains(i) && paced(msg));
            for (i, mut msg) in now.into_iter().chain(later) {
                let drop = m == DROPPING || twice.contains(&i);
                if !drop {
                    room.wait(&buffers, msg.get_payload());
                }
                msg.set_verdict(if drop { nfq::Verdict::Drop } else { nfq::Verdict::Accept });
                q.verdict(msg).context("giving a netfilter queue verdict")?;
            }
        }
    }
}

/// What the paced UDP sockets hold, as last read, and what went in since;
/// how long the release waited for each.
#[derive(Default)]
struct Room {
    queued: std::collections::HashMap<u16, usize>,
    waited: std::collections::HashMap<u16, Duration>,
}

/// How long the release waits, all in all, for one port's socket to make
/// room: an application that does not read it would otherwise hold up
/// everything behind (its datagrams then meet a full buffer, as they
/// would have natively).
const PACE_BUDGET: Duration = Duration::from_millis(250);

impl Room {
    /// Before a datagram for a paced port goes in: wait until its socket's
    /// queue is under half its buffer (within [`PACE_BUDGET`]).
    fn wait(&mut self, buffers: &std::collections::HashMap<u16, usize>, packet: &[u8]) {
        let Some(d) = datagram(packet) else { return };
        let Some(&buffer) = buffers.get(&d.port) else { return };
        // A datagram costs its bytes and the kernel's bookkeeping (truesize).
        let cost = d.data.len() + 1024;
        let start = std::time::Instant::now();
        let waited = *self.waited.get(&d.port).unwrap_or(&Duration::ZERO);
        loop {
            let queued = *self.queued.get(&d.port).unwrap_or(&0);
            if queued + cost < buffer / 2 {
                self.queued.insert(d.port, queued + cost);
                break;
            }
            // Read what it holds now; give the application time to read.
            match udp_receive_queue(d.port) {
                Some(now) if now + cost < buffer / 2 => {
                    self.queued.insert(d.port, now + cost);
                    break;
                }
                _ if waited + start.elapsed() > PACE_BUDGET => break,
                _ => std::thread::sleep(Duration::from_micros(200)),
            }
        }
        self.waited.insert(d.port, waited + start.elapsed());
    }
}

/// The bytes queued (kernel accounting) on this node's UDP sockets bound to
/// `port`, the largest (/proc/net/udp's rx_queue).
fn udp_receive_queue(port: u16) -> Option<usize> {
    let table = std::fs::read_to_string("/proc/net/udp").ok()?;
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let local = f.nth(1)?;
            let queues = f.nth(1)?;
            let p = u16::from_str_radix(local.rsplit_once(':')?.1, 16).ok()?;
            let rx = usize::from_str_radix(queues.split_once(':')?.1, 16).ok()?;
            (p == port).then_some(rx)
        })
        .max()
}

/// The held packets (by index) that are datagrams a restored queue ends
/// with: for each port, the longest run of held datagrams from the first
/// that equals the end of that port's queue.
fn in_queues_already(held: &[nfq::Message], already: &[Already]) -> Vec<usize> {
    let mut twice = Vec::new();
    let datagrams: Vec<(usize, Already)> =
        held.iter().enumerate().filter_map(|(i, m)| Some((i, datagram(m.get_payload())?))).collect();
    let mut ports: Vec<u16> = datagrams.iter().map(|(_, d)| d.port).collect();
    ports.sort_unstable();
    ports.dedup();
    for port in ports {
        let here: Vec<&(usize, Already)> = datagrams.iter().filter(|(_, d)| d.port == port).collect();
        let queue: Vec<&Already> = already.iter().filter(|a| a.port == port).collect();
        let k = (0..=here.len().min(queue.len()))
            .rev()
            .find(|&k| here[..k].iter().zip(&queue[queue.len() - k..]).all(|((_, h), q)| h == *q))
            .unwrap_or(0);
        twice.extend(here[..k].iter().map(|(i, _)| *i));
    }
    twice
}

/// An IPv4 UDP packet as the datagram it carries.
fn datagram(packet: &[u8]) -> Option<Already> {
    let ihl = usize::from(*packet.first()? & 0x0f) * 4;
    if packet.first()? >> 4 != 4 || *packet.get(9)? != 17 || packet.len() < ihl + 8 {
        return None;
    }
    let src = std::net::Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
    let udp = &packet[ihl..];
    let sport = u16::from_be_bytes([udp[0], udp[1]]);
    let dport = u16::from_be_bytes([udp[2], udp[3]]);
    let len = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
    let data = udp.get(8..len.max(8))?.to_vec();
    Some(Already { port: dport, source: std::net::SocketAddr::new(src.into(), sport), data })
}

/// A rule of `chain` (raw table): `matches`, the ports (`multiport`), this
/// process's comment, then `-j` and `target`.
fn rule(chain: &str, matches: &[&str], ports: &[&str], target: &[&str]) -> Vec<String> {
    let comment = comment();
    let mut rule = vec![chain];
    rule.extend(matches);
    rule.extend(["-m", "multiport"]);
    rule.extend(ports);
    rule.extend(["-m", "comment", "--comment", &comment, "-j"]);
    rule.extend(target);
    rule.into_iter().map(str::to_string).collect()
}

/// `op` (-A or -D) for each of `rules` (raw table), in one transaction
/// (`iptables-restore --noflush`).
fn iptables_all(op: &str, rules: &[Vec<String>]) -> Result<()> {
    if rules.is_empty() {
        return Ok(());
    }
    let mut text = String::from("*raw\n");
    for rule in rules {
        text += &format!("{op} {}\n", rule.join(" "));
    }
    text += "COMMIT\n";
    run("iptables-restore", &["-w", "--noflush"], Some(&text))?;
    Ok(())
}

fn iptables(op: &str, rule: &[String]) -> Result<String> {
    let mut args = vec!["-w", "-t", "raw", op];
    args.extend(rule.iter().map(String::as_str));
    run("iptables", &args, None)
}

/// Remove hold rules whose process is gone (a holder that crashed).
pub fn sweep() -> Result<usize> {
    let listed = match (
        run("iptables", &["-w", "-t", "raw", "-S", "PREROUTING"], None),
        run("iptables", &["-w", "-t", "raw", "-S", "OUTPUT"], None),
    ) {
        (Ok(a), Ok(b)) => a + &b,
        _ => return Ok(0), // no iptables: no rules either
    };
    let mut removed = 0;
    for line in listed.lines() {
        let Some(pid) = line.split("lwk-hold-").nth(1).and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        else {
            continue;
        };
        // A zombie is an ended holder too (its parent may be slow to reap).
        if !lwk_migrate::app::ended(&format!("/proc/{pid}/stat")) {
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
    use std::os::fd::AsRawFd;

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
        run("ip", &["link", "set", "lo", "up"], None).unwrap();
        let udp = std::net::UdpSocket::bind("127.0.0.1:9999").unwrap();
        udp.set_nonblocking(true).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:9998").unwrap();
        let mut client = std::net::TcpStream::connect("127.0.0.1:9998").unwrap();
        let (mut server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        let retrans = retransmitted();
        let flows =
            Flows { addr: Some(Ipv4Addr::LOCALHOST), tcp_ports: vec![9998], udp_ports: vec![9999], neighbours: vec![] };
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
        // What a restore sends to put a queue back passes.
        let marked = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mark = lwk_migrate::sockets::REINJECTED_MARK;
        // SAFETY: setsockopt on our socket with a u32 value.
        let set = unsafe {
            libc::setsockopt(marked.as_raw_fd(), libc::SOL_SOCKET, libc::SO_MARK, (&raw const mark).cast(), 4)
        };
        assert_eq!(set, 0);
        marked.send_to(b"reinjected", "127.0.0.1:9999").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let got = udp.recv(&mut buf).expect("a re-injected datagram is not held");
        assert_eq!(&buf[..got], b"reinjected");
        let n = hold.release(Vec::new()).unwrap();
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
        let rules = run("iptables", &["-t", "raw", "-S", "PREROUTING"], None).unwrap();
        assert!(!rules.contains("lwk-hold"), "{rules}");
        // Silenced: this node's end of the flows sends nothing (the server
        // here: 127.0.0.1:9998), until it may speak again.
        let mut hold = Hold::start(&flows, 7).unwrap();
        hold.silence(&flows).unwrap();
        client.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        server.write_all(b"unheard").unwrap();
        assert!(client.read(&mut buf).is_err(), "the silenced end was heard");
        hold.speak();
        assert!(!run("iptables", &["-t", "raw", "-S", "OUTPUT"], None).unwrap().contains("lwk-hold"));
        client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let got = client.read(&mut buf).expect("sent again once it may speak");
        assert_eq!(&buf[..got], b"unheard");
        hold.release(Vec::new()).unwrap();
        // Datagrams that the restored queue ends with are not let in twice:
        // the queue had "old", "a0", "a1" (the last two came after the
        // hold began); the hold has a0..a3.
        let hold = Hold::start(&flows, 7).unwrap();
        for i in 0..4 {
            sender.send_to(format!("a{i}").as_bytes(), "127.0.0.1:9999").unwrap();
        }
        std::thread::sleep(Duration::from_millis(50));
        let from = sender.local_addr().unwrap();
        let queued = |data: &str| Already { port: 9999, source: from, data: data.as_bytes().to_vec() };
        assert_eq!(hold.release(vec![queued("old"), queued("a0"), queued("a1")]).unwrap(), 4);
        std::thread::sleep(Duration::from_millis(20));
        for want in ["a2", "a3"] {
            let got = udp.recv(&mut buf).expect("the datagrams the queue did not have");
            assert_eq!(&buf[..got], want.as_bytes());
        }
        assert!(udp.recv(&mut buf).is_err(), "a datagram came in twice");
        // After the cut, nothing held can be in the queue: the same bytes
        // again are new datagrams.
        let hold = Hold::start(&flows, 7).unwrap();
        sender.send_to(b"same", "127.0.0.1:9999").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        hold.cut();
        sender.send_to(b"same", "127.0.0.1:9999").unwrap();
        sender.send_to(b"same", "127.0.0.1:9999").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(hold.release(vec![queued("same"), queued("same")]).unwrap(), 3);
        std::thread::sleep(Duration::from_millis(20));
        for _ in 0..2 {
            let got = udp.recv(&mut buf).expect("the two that came after the cut");
            assert_eq!(&buf[..got], b"same");
        }
        assert!(udp.recv(&mut buf).is_err(), "the one in the queue came in twice");
        // Dropped: what it held is gone (the source had it), the rule too.
        let hold = Hold::start(&flows, 7).unwrap();
        sender.send_to(b"x", "127.0.0.1:9999").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        drop(hold);
        std::thread::sleep(Duration::from_millis(20));
        assert!(udp.recv(&mut buf).is_err(), "a dropped datagram came in");
        let rules = run("iptables", &["-t", "raw", "-S", "PREROUTING"], None).unwrap();
        assert!(!rules.contains("lwk-hold"), "{rules}");
        // A rule whose holder died is swept; a live holder's is not.
        let stale: Vec<String> = "PREROUTING -d 127.0.0.1 -p udp -m comment --comment lwk-hold-2147483646 -j NFQUEUE --queue-num 7 --queue-bypass"
            .split(' ')
            .map(String::from)
            .collect();
        iptables("-A", &stale).unwrap();
        let live = Hold::start(&flows, 8).unwrap();
        assert_eq!(sweep().unwrap(), 1);
        let rules = run("iptables", &["-t", "raw", "-S", "PREROUTING"], None).unwrap();
        assert!(!rules.contains("2147483646") && rules.contains(&comment()), "{rules}");
        drop(live);
    }
}
