//! `lwk migrate PID --to NODE`: move a running application to another
//! node's daemon.
//!
//! Memory goes ahead while the application runs (pre-copy rounds); then
//! freeze, capture the descriptors and sockets, stream the rest of the
//! image (keyed with the cluster key) to the destination daemon, which
//! restores it and holds it at the gate; the source says go, the
//! destination says it runs, and once it says its gate is open the copy
//! here goes (killed) and `lwk run` takes the connection as its relay. Any
//! failure before that (the destination refuses or dies, the link breaks,
//! a record is corrupted, the restore fails) resumes the application here,
//! with every descriptor as it was, and names the reason.

use std::io::Write;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use lwk_migrate::app::App;
use lwk_migrate::checkpoint::{
    capture_descriptors, freeze_and_capture, tcp_endpoints, udp_endpoints, write_image, CheckpointError, PartitionSpec,
    ProcessImage,
};
use lwk_migrate::fds::Contents;
use lwk_migrate::image::{ImageWriter, RecordKind};
use lwk_migrate::precopy::{PreCopy, Round};
use lwk_migrate::tree::Tree;
use lwk_node::channel::{Channel, Role};
use lwk_node::key::DEFAULT_KEY_FILE;
use lwk_node::quiet::Quiet;
use lwk_node::server::{Decision, Reply, Request};

#[derive(clap::Args)]
pub struct MigrateArgs {
    /// The application: its application process or its `lwk run` (see `lwk ps`).
    pid: i32,
    /// The destination node's daemon: `HOST[:PORT]` (port 7070 by default).
    #[arg(long)]
    to: String,
    #[command(flatten)]
    service: Service,
    /// Seconds the destination may stay silent before the migration fails
    /// (and the application goes on here).
    #[arg(long, default_value_t = 60)]
    timeout: u64,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Close what cannot be moved (named in the report) instead of
    /// refusing: the application at the destination finds those
    /// descriptors closed.
    #[arg(long)]
    force_close: bool,
    /// Show a progress bar on standard error while memory goes ahead
    /// (rounds, bytes, the rate at which the application writes).
    #[arg(long)]
    progress: bool,
    /// Memory goes ahead until what the application writes in a round would
    /// take this many milliseconds to send in the freeze (or stops shrinking).
    #[arg(long, default_value_t = 50, value_name = "MS")]
    target_freeze: u64,
    /// Give up before the freeze (the application goes on here) if what is
    /// left would take longer than this to send: an application that writes
    /// its memory faster than the link carries it.
    #[arg(long, value_name = "MS")]
    max_freeze: Option<u64>,
}

/// The cluster key and the service address: what `lwk migrate` and
/// `lwk drain` are told alike.
#[derive(clap::Args)]
pub struct Service {
    /// The cluster key.
    #[arg(long, default_value = DEFAULT_KEY_FILE)]
    pub key: PathBuf,
    /// The application's service address (A.B.C.D/N): it leaves this node
    /// at the commit and comes up on the destination's service interface,
    /// so its TCP connections and UDP sockets go on there. Needed when it
    /// has sockets.
    #[arg(long)]
    pub address: Option<lwk_node::address::Cidr>,
    /// Both nodes are of a single-IP cluster that has the service address
    /// (`lwk cluster up`): the address stays; the destination holds the
    /// application's packets from the freeze until its sockets there are
    /// live, so no peer has to send anything again.
    #[arg(long, requires = "address")]
    pub cluster: bool,
}

/// Pre-copy stops after this many rounds, or when a round leaves little
/// enough written since (at least this little, whatever the target), or
/// when the written set stops shrinking.
const MAX_ROUNDS: usize = 8;
const SMALL_ENOUGH: u64 = 1 << 20;

/// Where the time went.
#[derive(Debug, Default, serde::Serialize)]
struct Report {
    /// The pre-copy rounds (memory sent while the application ran).
    rounds: Vec<Round>,
    precopy_ms: f64,
    /// Why there was no pre-copy, if there was none.
    precopy_off: Option<String>,
    /// Memory sent in the freeze.
    frozen_memory_bytes: u64,
    /// Asking for the freeze until every thread was parked.
    stop_ms: f64,
    /// Descriptors and sockets captured.
    capture_ms: f64,
    /// The rest of the image streamed in the freeze: the state, and the
    /// memory written since the last round (all of it without pre-copy).
    transfer_ms: f64,
    /// The destination's restore until the application waited at its gate.
    restore_ms: f64,
    /// The image written here until the destination said it restored it,
    /// less its restore: the bytes still in flight (socket buffers, the
    /// link) when the transfer was done here.
    in_flight_ms: f64,
    /// The commit: the address leaves, the go, the destination's word that
    /// it runs (a round trip).
    commit_ms: f64,
    /// The destination from the go until its sockets were live and its
    /// gate open (its threads run). The freeze ends there.
    resume_ms: f64,
    /// Putting in the rule that drops the peers' TCP to the service address
    /// (`lwk_node::quiet`), just before the freeze: the peers' wait is
    /// this and the freeze.
    quiet_ms: f64,
    /// In a single-IP cluster, in the freeze: until the destination held
    /// the application's flows and this node held and silenced them
    /// (part of `capture_ms`).
    hold_ms: f64,
    /// The freeze as the application saw it: until the destination's gate
    /// opened.
    freeze_ms: f64,
    /// Bytes of the image sent in the freeze.
    image_bytes: u64,
    /// Memory sent more than once: what the rounds after the first and the
    /// freeze carried (written since it was sent, or mapped since).
    resent_bytes: u64,
    /// The application's memory.
    memory_bytes: u64,
    /// Freezes given up because the application was busy (a connection
    /// in a listener's accept queue, a fork under way), each followed by a
    /// moment of running.
    busy_retries: u32,
    /// Descriptors closed (`--force-close`), with what they were.
    closed: Vec<String>,
    threads: u32,
    /// The application's processes (it and those it forked).
    processes: usize,
    total_ms: f64,
}

pub fn resolve(to: &str) -> Result<SocketAddr> {
    let with_port = if to.contains(':') { to.to_string() } else { format!("{to}:{}", lwk_node::DEFAULT_PORT) };
    with_port.to_socket_addrs()?.next().with_context(|| format!("{to}: no address"))
}

pub fn main(args: MigrateArgs) -> Result<i32> {
    let key = lwk_node::key::load(&args.service.key)?;
    // The application's processes: the one `lwk run` started and those it
    // forked, each with its memory sent ahead (pre-copy).
    let tree = Tree::attach(args.pid)?;
    let app = &tree.members[0].app;
    let info = tree.members[0].info.clone();
    let members: Vec<(i32, i32)> = tree.members.iter().map(|m| (m.app.pid, m.info.proxy_pid)).collect();
    // Its address, the rules that keep its packets, are of its node: this
    // command must run there (in the same network namespace).
    let netns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/net")).ok();
    if args.service.address.is_some() && netns(&info.proxy_pid.to_string()) != netns("self") {
        bail!(
            "process {} has its sockets in another network namespace than this command: run lwk migrate in its node (for example with ip netns exec)",
            app.pid
        );
    }
    let to = resolve(&args.to)?;
    let mut report = Report::default();
    // The `lwk run` that started it keeps standing for it (its streams,
    // signals and exit status are relayed), if it published its end.
    let relay = supervisor_relay(app);
    if let Err(why) = &relay {
        eprintln!("lwk: {why}: the application's output stays at the destination");
    }
    let relay = relay.ok();
    let relayed_by = relay.as_ref().map(|r| r.0);
    // What cannot move is refused before anything is sent or stopped (the
    // descriptors are looked at again in the freeze).
    if let Err(e) = capture_descriptors(&members, relayed_by, args.force_close, Contents::Skip) {
        return Err(anyhow::Error::from(e).context(format!("process {} cannot be migrated; it goes on here", app.pid)));
    }
    let t0 = Instant::now();
    let stream = TcpStream::connect_timeout(&to, Duration::from_secs(5))
        .with_context(|| format!("cannot reach the node daemon at {to}"))?;
    stream.set_nodelay(true)?;
    // A destination that stops answering fails the migration, not hangs it.
    stream.set_read_timeout(Some(Duration::from_secs(args.timeout)))?;
    stream.set_write_timeout(Some(Duration::from_secs(args.timeout)))?;
    let mut ch = Channel::handshake(stream, &key, Role::Client).with_context(|| format!("the node daemon at {to}"))?;
    // Memory goes ahead while the application runs (pre-copy), if each of
    // its processes and proxies has a userfaultfd; otherwise all of it in
    // the freeze.
    let apps: Vec<&App> = tree.members.iter().map(|m| &m.app).collect();
    let mut precopy = match PreCopy::start(&apps) {
        Ok(p) => Some(p),
        Err(e) => {
            report.precopy_off = Some(e.to_string());
            None
        }
    };
    ch.send(&Request::Restore {
        command: info.command.clone(),
        memory_bytes: info.memory_bytes,
        address: args.service.address.map(|a| a.to_string()),
        relay: relay.is_some(),
        partition: PartitionSpec::of(&app.control().header).map(|p| serde_json::to_string(&p)).transpose()?,
        cluster: args.service.cluster,
    })?;
    match ch.recv::<Reply>()? {
        Reply::Ready => {}
        Reply::Failed { why } => bail!("the destination refused: {why}"),
        other => bail!("the destination answered {other:?}"),
    }
    let id = ch.next_image_id();
    // The image goes on a second handle of the connection; messages on `ch`.
    let bar = progress_bar(args.progress, info.memory_bytes);
    let counted = Counted { inner: ch.stream.try_clone()?, bar: bar.clone() };
    let sink = std::io::BufWriter::with_capacity(1 << 20, counted);
    let mut w = ImageWriter::with_stream_id(sink, Some(&key), id)?;
    let mut link_rate = 0.0f64;
    if let Some(pre) = &mut precopy {
        let tp = Instant::now();
        while report.rounds.len() < MAX_ROUNDS {
            let r = match pre.round(&mut w) {
                Ok(r) => r,
                Err(e) => {
                    let e = refused(&mut ch, e.into());
                    return Err(e.context(format!("pre-copy of process {}; it goes on here", app.pid)));
                }
            };
            let last = report.rounds.last().map(|l: &Round| l.dirty_bytes);
            if let Some(bar) = &bar {
                let rate = report.rounds.last().map_or(0.0, |l| r.dirty_bytes as f64 / l.ms.max(1.0) * 1e3);
                bar.set_message(format!(
                    "round {}: {:.0} MiB written since the last, {:.0} MiB/s",
                    report.rounds.len() + 1,
                    r.dirty_bytes as f64 / (1 << 20) as f64,
                    rate / (1 << 20) as f64
                ));
                bar.set_length(bar.position() + r.dirty_bytes);
            }
            // The link's rate as the rounds found it (bytes per ms).
            link_rate = link_rate.max(r.bytes as f64 / r.ms.max(0.001));
            let target = (link_rate * args.target_freeze as f64) as u64;
            let small = !report.rounds.is_empty() && r.dirty_bytes <= target.max(SMALL_ENOUGH);
            let growing = report.rounds.len() >= 2 && last.is_some_and(|l| r.dirty_bytes >= l);
            report.rounds.push(r);
            if small || growing {
                break;
            }
        }
        // What the rounds sent is still on its way (socket buffers, a
        // destination slower than the link): let it arrive while the
        // application runs, or the freeze waits for it.
        w.flush().context("sending memory ahead")?;
        drain(&ch.stream, Duration::from_secs(2));
        report.precopy_ms = ms(tp);
        let left = report.rounds.last().map_or(0, |r| r.dirty_bytes);
        let expected_ms = left as f64 / link_rate.max(0.001);
        if let Some(max) = args.max_freeze.filter(|&max| report.rounds.len() > 1 && expected_ms > max as f64) {
            bail!(
                "process {} writes its memory faster than the link carries it: {:.0} MiB written during the last of \
                 {} rounds, sent at {:.0} MiB/s, would keep it frozen about {expected_ms:.0} ms, over --max-freeze \
                 {max}; it goes on here",
                app.pid,
                left as f64 / (1 << 20) as f64,
                report.rounds.len(),
                link_rate * 1e3 / (1 << 20) as f64,
            );
        }
    }
    if let Some(bar) = &bar {
        bar.set_message("frozen: the rest");
    }

    let sent_ahead = w.bytes_written();
    // Its peers' data is kept out from before the capture until the
    // address has left (or the application goes on here): what a socket
    // took in after its queues were read would be lost (`lwk_node::quiet`).
    let tq = Instant::now();
    // In a single-IP cluster the address stays, and other applications
    // may share it: only this one's endpoints are kept out, from the
    // freeze on (below).
    let mut quiet =
        match args.service.address.filter(|_| !args.service.cluster).map(|a| Quiet::start(a.addr)).transpose() {
            Ok(q) => q,
            Err(e) => {
                ch.stream.shutdown(std::net::Shutdown::Write).ok();
                return Err(e.context(format!("process {} cannot be migrated; it goes on here", app.pid)));
            }
        };
    report.quiet_ms = ms(tq);
    let tf = Instant::now();
    // In a single-IP cluster, once the application is frozen: the
    // destination holds its flows' packets (it says so), then this node
    // holds them too, then the sockets are captured. What came before the
    // hold there is here (in the captured queues); what comes after is held
    // there; what is both, TCP drops, and the destination's hold knows by
    // the queues it is sent. What this node holds is dropped at the commit
    // (the destination has it) and let in if the application goes on here:
    // nothing is lost either way, and no peer has to send again.
    let proxies: Vec<i32> = members.iter().map(|m| m.1).collect();
    let mut holding = false;
    let mut held_here: Option<lwk_node::hold::Hold> = None;
    let mut hold_ms = 0.0;
    let mut hold_there = |d: &lwk_migrate::checkpoint::Descriptors| -> Result<(), CheckpointError> {
        let (Some(service), true) = (args.service.address, args.service.cluster) else { return Ok(()) };
        let hold_error = |what: String| CheckpointError::Hold { pid: app.pid, what };
        let tcp = tcp_endpoints(&proxies, &d.tables);
        let th = Instant::now();
        if !holding {
            let ports = |eps: Vec<SocketAddr>| -> Vec<u16> {
                let mut p: Vec<u16> = eps
                    .iter()
                    .filter(|e| e.ip() == std::net::IpAddr::V4(service.addr) || e.ip().is_unspecified())
                    .map(|e| e.port())
                    .collect();
                p.sort_unstable();
                p.dedup();
                p
            };
            let flows = lwk_node::hold::Flows {
                addr: Some(service.addr),
                tcp_ports: ports(tcp.clone()),
                udp_ports: ports(udp_endpoints(&proxies, &d.tables)),
                neighbours: lwk_node::hold::neighbours(),
            };
            if !flows.tcp_ports.is_empty() || !flows.udp_ports.is_empty() {
                w.json(RecordKind::Hold, &flows)?;
                w.flush()?;
                match ch.recv::<Reply>() {
                    Ok(Reply::Holding) => {}
                    Ok(Reply::Failed { why }) => return Err(hold_error(format!("the destination cannot hold: {why}"))),
                    Ok(other) => return Err(hold_error(format!("the destination answered {other:?}"))),
                    Err(e) => return Err(hold_error(format!("the destination did not say it holds: {e:#}"))),
                }
            }
            holding = true;
            if !flows.tcp_ports.is_empty() || !flows.udp_ports.is_empty() {
                // Queue numbers: 4000-4999 are the daemon's, these this
                // command's.
                let from = 5000 + (std::process::id() % 1000) as u16;
                let (mut h, _) = lwk_node::hold::Hold::start_in(&flows, 5000..6000, from)
                    .map_err(|e| hold_error(format!("{e:#}")))?;
                // Nothing here answers the peers any more either.
                let silenced = h.silence(&flows);
                held_here = Some(h);
                silenced.map_err(|e| hold_error(format!("{e:#}")))?;
            }
            hold_ms = ms(th);
        }
        Ok(())
    };
    let captured =
        match freeze_and_capture(&tree, relayed_by, args.force_close, Duration::from_secs(5), &mut hold_there) {
            Ok(c) => c,
            Err(e) => {
                ch.stream.shutdown(std::net::Shutdown::Write).ok();
                let_in_here(held_here);
                return Err(anyhow::Error::from(e)
                    .context(format!("process {} cannot be migrated now; it goes on here", app.pid)));
            }
        };
    report.hold_ms = hold_ms;
    report.stop_ms = captured.stop_ms;
    report.capture_ms = captured.capture_ms;
    report.busy_retries = captured.retries;
    report.closed = captured.descriptors.closed.clone();
    let mut image_sent = false;
    // Everything up to the go can fail: the application then goes on here.
    let outcome = (|| -> Result<()> {
        if captured.sockets.iter().any(|s| !s.images.is_empty()) && args.service.address.is_none() {
            bail!("the application has TCP or UDP sockets: name the service address that moves with it (--address)");
        }
        let tt = Instant::now();
        let remaining = match &mut precopy {
            Some(pre) => Some(pre.remaining()?),
            None => None,
        };
        let processes: Vec<ProcessImage> = (0..members.len())
            .map(|i| ProcessImage {
                frozen: &captured.frozen[i],
                info: &tree.members[i].info,
                table: &captured.descriptors.tables[i],
                sockets: &captured.sockets[i],
                only: remaining.as_ref().map(|r| r[i].as_slice()),
                held_by: None,
            })
            .collect();
        let (written, mut sink) = write_image(&processes, &captured.tree, w)?;
        sink.flush()?;
        drop(sink);
        image_sent = true;
        report.transfer_ms = ms(tt);
        let written_at = Instant::now();
        report.image_bytes = written.image_bytes - sent_ahead;
        report.memory_bytes = tree.members.iter().map(|m| m.info.memory_bytes).sum();
        let all = || std::iter::once(&written.manifest).chain(&written.others);
        report.frozen_memory_bytes = all().map(|m| m.memory_bytes).sum();
        report.threads = all().map(|m| m.threads).sum();
        report.processes = members.len();
        match ch.recv::<Reply>()? {
            Reply::Restored { restore_ms, .. } => {
                report.restore_ms = restore_ms;
                report.in_flight_ms = (ms(written_at) - restore_ms).max(0.0);
            }
            Reply::Failed { why } => bail!("the destination could not restore it: {why}"),
            other => bail!("the destination answered {other:?}"),
        }
        Ok(())
    })();
    if let Err(e) = outcome {
        let e = refused(&mut ch, e);
        // The destination reads a decision once the image is whole; before,
        // the image stream just ends.
        if image_sent {
            ch.send(&Decision::Abort).ok();
        } else {
            ch.stream.shutdown(std::net::Shutdown::Write).ok();
        }
        if let Some(h) = held_here.as_mut() {
            h.speak();
        }
        captured.resume().ok();
        let_in_here(held_here);
        return Err(e.context(format!("the migration of process {} to {to} failed; it goes on here", app.pid)));
    }
    // The commit: the destination runs it once it has the go, and says so;
    // only then does the copy here go. A destination that does not say so
    // (it died, the link broke) kept its copy at the gate, which ends when
    // its daemon's end closes: the application goes on here. (One window
    // is left: a "running" lost on a link that breaks just after it was
    // sent would leave both copies running.)
    // The address leaves first: the destination's comes up at the go.
    let mut moved_from = None;
    let tc = Instant::now();
    let committed = (|| -> Result<()> {
        if let Some(a) = args.service.address.filter(|_| !args.service.cluster) {
            moved_from = Some(lwk_node::address::remove(a)?);
            // Gone from here: what comes for it now is not this node's.
            if let Some(q) = quiet.take() {
                q.lift();
            }
        }
        ch.send(&Decision::Go)?;
        match ch.recv::<Reply>()? {
            Reply::Running => {}
            other => bail!("the destination answered {other:?}"),
        }
        report.commit_ms = ms(tc);
        // Then its sockets go live and its gate opens. A copy that dies
        // there never ran: the application goes on here. Without a word
        // (the link broke), it runs there: it said so.
        match ch.recv::<Reply>() {
            Ok(Reply::Opened { resume_ms }) => report.resume_ms = resume_ms,
            Ok(Reply::Failed { why }) => bail!("its copy there ended as it started: {why}"),
            Ok(other) => eprintln!("lwk: the destination answered {other:?} once it ran the application"),
            Err(e) => eprintln!("lwk: the destination said it runs the application, then nothing ({e})"),
        }
        Ok(())
    })();
    if let Err(e) = committed {
        if let (Some(a), Some(dev)) = (args.service.address, &moved_from) {
            if let Err(e) = lwk_node::address::add(a, dev) {
                eprintln!("lwk: putting {a} back on {dev}: {e:#}");
            }
        }
        if let Some(h) = held_here.as_mut() {
            h.speak();
        }
        captured.resume().ok();
        let_in_here(held_here);
        return Err(e.context(format!(
            "the destination at {to} did not confirm that process {} runs there; it goes on here",
            app.pid
        )));
    }
    report.freeze_ms = ms(tf);
    // Its supervisor takes the connection and stands for it, told so
    // before the copy here dies.
    let (stream, state) = ch.into_parts();
    if let Some((pid, end)) = &relay {
        match lwk_node::relay::hand_over(end, &stream, state, &to.to_string()) {
            Ok(()) => app.control().header.migrated.store(1, std::sync::atomic::Ordering::SeqCst),
            Err(e) => eprintln!("lwk: cannot hand the relay to lwk run (pid {pid}): {e}; it will report a kill"),
        }
    }
    drop(stream);
    captured.end();
    // Its connections here are gone (disconnected); without the address,
    // nothing comes for them any more.
    drop(quiet);
    if precopy.is_some() {
        report.resent_bytes = report.rounds.iter().skip(1).map(|r| r.bytes).sum::<u64>() + report.frozen_memory_bytes;
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    report.total_ms = ms(t0);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let rounds: Vec<String> =
            report.rounds.iter().map(|r| format!("{:.1}", r.bytes as f64 / (1 << 20) as f64)).collect();
        println!(
            "migrated {} ({}) to {to}: {} threads, {:.1} MiB of memory; pre-copy {} rounds ({} MiB){}; \
             {:.1} MiB in the freeze; frozen {:.0} ms (stop {:.0}, capture {:.0}, transfer {:.0}, in flight {:.0}, \
             restore {:.0}, commit {:.0}, resume {:.0}); {:.1} MiB of memory sent again; total {:.0} ms",
            app.pid,
            info.command,
            report.threads,
            report.memory_bytes as f64 / (1 << 20) as f64,
            report.rounds.len(),
            rounds.join(" + "),
            report.precopy_off.as_ref().map_or(String::new(), |w| format!(" (none: {w})")),
            report.frozen_memory_bytes as f64 / (1 << 20) as f64,
            report.freeze_ms,
            report.stop_ms,
            report.capture_ms,
            report.transfer_ms,
            report.in_flight_ms,
            report.restore_ms,
            report.commit_ms,
            report.resume_ms,
            report.resent_bytes as f64 / (1 << 20) as f64,
            report.total_ms,
        );
    }
    // In a cluster, what this node held the destination let in; but the
    // peers' packets still come here, and until the processes and proxies
    // here are gone their listeners would answer them with resets: this
    // node stays holding and silent until then.
    if let Some(h) = held_here {
        let pids: Vec<i32> = members.iter().flat_map(|&(a, p)| [a, p]).collect();
        if !gone_within(&pids, Duration::from_secs(30)) {
            eprintln!("lwk: the application's processes here outlived it by 30 s; its flows are let go anyway");
        }
        drop(h);
    }
    Ok(0)
}

/// Whether every process of `pids` ended (a zombie counts) within `limit`.
fn gone_within(pids: &[i32], limit: Duration) -> bool {
    let t = Instant::now();
    let ended = |pid: &i32| lwk_migrate::app::ended(&format!("/proc/{pid}/stat"));
    while !pids.iter().all(ended) {
        if t.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    true
}

/// The application goes on here after all: what this node held of its
/// flows during the freeze goes in, in order (the destination drops its
/// copies).
fn let_in_here(held: Option<lwk_node::hold::Hold>) {
    if let Some(h) = held {
        if let Err(e) = h.release(Vec::new()) {
            eprintln!("lwk: letting in the packets held during the freeze: {e:#}");
        }
    }
}

/// A send that failed often means that the destination refused what came
/// (a record that failed its check) and closed: its reason, if it gave one,
/// comes first.
fn refused(ch: &mut Channel, e: anyhow::Error) -> anyhow::Error {
    ch.stream.set_read_timeout(Some(Duration::from_secs(1))).ok();
    match ch.recv::<Reply>() {
        Ok(Reply::Failed { why }) => anyhow::anyhow!("the destination refused it: {why}"),
        _ => e,
    }
}

/// The supervisor of `app` (its parent, `lwk run` or `lwk restore`) and
/// the end of its relay hand-over socket.
fn supervisor_relay(app: &App) -> std::result::Result<(i32, std::os::fd::OwnedFd), String> {
    let published = app.control().header.relay_fd.load(std::sync::atomic::Ordering::SeqCst);
    if published <= 0 {
        return Err("the application's supervisor cannot relay".to_string());
    }
    let parent = lwk_migrate::app::parent_of(app.pid)
        .filter(|&p| p > 0)
        .ok_or("the application's supervisor is not in this pid namespace")?;
    let end = lwk_node::relay::take(parent, published - 1)
        .map_err(|e| format!("cannot take the relay end of the application's supervisor (pid {parent}): {e}"))?;
    Ok((parent, end))
}

/// Wait until the peer has acknowledged all but a little of what was sent
/// on `stream` (TIOCOUTQ), or `within`.
fn drain(stream: &TcpStream, within: Duration) {
    use std::os::fd::AsRawFd;
    const LITTLE: libc::c_int = 64 << 10;
    let t0 = Instant::now();
    while t0.elapsed() < within {
        let mut queued: libc::c_int = 0;
        // SAFETY: TIOCOUTQ writes one int, ours.
        if unsafe { libc::ioctl(stream.as_raw_fd(), libc::TIOCOUTQ, &mut queued) } != 0 || queued < LITTLE {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A bar of the bytes sent, on a terminal only.
fn progress_bar(wanted: bool, memory: u64) -> Option<indicatif::ProgressBar> {
    if !wanted {
        return None;
    }
    let bar = indicatif::ProgressBar::with_draw_target(Some(memory), indicatif::ProgressDrawTarget::stderr());
    let style = indicatif::ProgressStyle::with_template("{bar:30} {bytes}/{total_bytes} {bytes_per_sec} {msg}")
        .expect("a valid template");
    bar.set_style(style);
    bar.set_message("round 1: all of its memory");
    Some(bar)
}

/// The connection to the destination, counting what goes to the bar.
struct Counted<W> {
    inner: W,
    bar: Option<indicatif::ProgressBar>,
}

impl<W: Write> Write for Counted<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        if let Some(bar) = &self.bar {
            bar.inc(n as u64);
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}
