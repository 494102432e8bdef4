//! The daemon's side of a migration: a source node connects, proves it
//! holds the cluster key, and sends an application's image; the daemon
//! restores it here (`lwk restore`, its child) and holds it ready, every
//! thread parked, until the source says go. Only then does it run, so the
//! application never runs on both nodes: until go, the source keeps every
//! resource and can resume; without go (the source says abort, dies, or the
//! connection breaks) the copy here is killed, and nothing of it stays
//! (its processes, its image directory).
//!
//! The conversation, after the handshake ([`crate::channel`]):
//!
//! | source | daemon |
//! |---|---|
//! | `Request::Restore` | `Reply::Ready` |
//! | the image, as a keyed image stream (read by `lwk restore` as it comes) | `Reply::Restored` (or `Failed`) |
//! | `Decision::Go` (or `Abort`) | `Reply::Running`, then `Reply::Opened` once the gate is open (or `Failed`) |
//! | then the relay ([`crate::relay`]) | |
//!
//! `lwk drain` asks `Request::Drain` and hears `Reply::Draining`, then
//! `Moving` and `Moved` for each application, then `Drained`
//! ([`crate::drain`]); `lwk undrain` asks `Request::Undrain`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use lwk_migrate::image::{ClusterKey, ImageError, ImageReader};
use serde::{Deserialize, Serialize};

use crate::channel::{Channel, Role, Sender};
use crate::relay::{Exit, Message};

/// What a source asks.
#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    /// An application comes: its image follows. Its service address
    /// (A.B.C.D/N), if it has one, comes up here at the go.
    Restore {
        command: String,
        memory_bytes: u64,
        address: Option<String>,
        /// The source's supervisor stands for the application: once it
        /// runs here, its standard streams, signals and exit status go
        /// over this connection ([`crate::relay`]). Without, its output is
        /// kept here (as the received directory's log).
        #[serde(default)]
        relay: bool,
        /// The partition it runs in (JSON, as `lwk restore --partition`
        /// takes it; opaque here): the restorer makes one like it before
        /// the memory comes.
        #[serde(default)]
        partition: Option<String>,
        /// Both nodes are of a single-IP cluster that has the address: it
        /// stays where it is, and this node holds the application's
        /// packets from the source's word (a `Hold` record in the image)
        /// until its sockets here are live (`crate::hold`).
        #[serde(default)]
        cluster: bool,
    },
    /// `lwk drain`: move every application of this node away, and take no
    /// new one ([`crate::drain`]).
    Drain(crate::drain::Ask),
    /// `lwk undrain`: take applications again.
    Undrain,
}

/// What the daemon answers.
#[derive(Debug, Serialize, Deserialize)]
pub enum Reply {
    /// Send the image.
    Ready,
    /// The packets of the flows the image's `Hold` record names are held
    /// here from now on.
    Holding,
    /// The application is restored here, every thread parked: waiting for
    /// the decision.
    Restored {
        pid: i32,
        receive_ms: f64,
        restore_ms: f64,
    },
    /// It runs here now (the commit: the source lets go).
    Running,
    /// Its sockets are live and its gate is open: its threads run, after
    /// `resume_ms` from the go.
    Opened {
        resume_ms: f64,
    },
    Failed {
        why: String,
    },
    /// The node is drained; these applications (first pid, command) move.
    Draining {
        apps: Vec<(i32, String)>,
    },
    /// One of them starts moving to `to`.
    Moving {
        pid: i32,
        to: String,
    },
    /// It moved (`lwk migrate --json`'s report), or did not (`why`: it
    /// goes on here).
    Moved {
        pid: i32,
        to: String,
        why: Option<String>,
        report: Option<String>,
    },
    /// All were tried.
    Drained {
        moved: usize,
        failed: usize,
    },
    /// The node takes applications again (`was`: it was drained).
    Undrained {
        was: bool,
    },
}

/// The source's decision once the application is restored here.
#[derive(Debug, Serialize, Deserialize)]
pub enum Decision {
    /// The source let go: run it.
    Go,
    /// The source keeps it: kill the copy here.
    Abort,
}

/// How long a restored copy waits for the decision.
pub const DECISION_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Config {
    pub listen: SocketAddr,
    pub key: ClusterKey,
    /// Its file (what `lwk migrate --key` reads, for `lwk drain`).
    pub key_file: PathBuf,
    /// Where received images are kept while their application runs.
    pub state_dir: PathBuf,
    /// The `lwk` binary, which restores.
    pub lwk: PathBuf,
    /// A peer silent this long fails its migration (and the copy here goes).
    pub timeout: Duration,
    /// The interface on which migrated applications' service addresses
    /// come up.
    pub service_dev: Option<String>,
}

/// Fault injection for the tests of rollback: `LWK_NODE_FAULT=PHASE` makes
/// the daemon die at once (as `kill -9` would: no clean-up) when a
/// migration reaches PHASE: `ready` (it said ready), `partway` (a few MiB
/// of the image came), `image` (the image arrived), `parked` (the copy
/// waits at its gate, the source does not know yet), `gate` (the source
/// knows). `LWK_NODE_FAULT=stall-PHASE` makes it stop there for two
/// seconds instead, so that a test can cut the link there.
fn fault(phase: &str) {
    let Ok(asked) = std::env::var("LWK_NODE_FAULT") else { return };
    if asked == phase {
        log(&format!("fault injected at {phase}: dying"));
        // SAFETY: ends this process at once, as a SIGKILL would.
        unsafe { libc::_exit(137) };
    }
    if asked.strip_prefix("stall-") == Some(phase) {
        log(&format!("fault injected at {phase}: stalling"));
        std::thread::sleep(Duration::from_secs(2));
        log(&format!("fault injected at {phase}: going on"));
    }
}

/// Serve until killed: one thread per connection.
pub fn serve(config: Config) -> anyhow::Result<()> {
    use anyhow::Context;
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("cannot create the state directory {}", config.state_dir.display()))?;
    // Applications that were arriving when an earlier daemon died: their
    // `lwk restore` ended them when the daemon's end of the gate closed;
    // their images go now.
    for e in std::fs::read_dir(&config.state_dir)?.flatten() {
        let name = e.file_name();
        if name.to_string_lossy().starts_with("in-") && e.path().is_dir() && !e.path().join("running").exists() {
            log(&format!("removing {}, left by an earlier daemon", e.path().display()));
            std::fs::remove_dir_all(e.path()).ok();
        }
    }
    // Packets an earlier daemon held when it died pass already (the rules
    // bypass a queue nobody reads); its rules go.
    match crate::hold::sweep() {
        Ok(0) => {}
        Ok(n) => log(&format!("removed {n} packet-hold rules left by an earlier daemon")),
        Err(e) => log(&format!("cannot remove the packet-hold rules of an earlier daemon: {e:#}")),
    }
    let listener = TcpListener::bind(config.listen).with_context(|| format!("cannot listen on {}", config.listen))?;
    log(&format!("listening on {}", config.listen));
    let config = std::sync::Arc::new(config);
    for conn in listener.incoming() {
        let Ok(stream) = conn else { continue };
        let config = config.clone();
        std::thread::spawn(move || {
            let peer = stream.peer_addr().map_or_else(|_| "?".to_string(), |a| a.to_string());
            if let Err(e) = handle(stream, &config) {
                log(&format!("{peer}: {e:#}"));
            }
        });
    }
    Ok(())
}

/// The daemon's log: stderr, one line per event (a service manager keeps it).
pub fn log(line: &str) {
    eprintln!("lwk-node: {line}");
}

fn handle(stream: TcpStream, config: &Config) -> anyhow::Result<()> {
    let peer = stream.peer_addr()?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(config.timeout))?;
    stream.set_write_timeout(Some(config.timeout))?;
    let mut ch = match Channel::handshake(stream, &config.key, Role::Server) {
        Ok(ch) => ch,
        Err(e) => {
            log(&format!("{peer}: refused: {e}"));
            return Ok(());
        }
    };
    match ch.recv::<Request>()? {
        Request::Drain(ask) => {
            log(&format!("{peer}: drain to {}", ask.to.join(", ")));
            crate::drain::serve(&mut ch, config, &ask)
        }
        Request::Undrain => {
            let was = crate::drain::clear()?;
            log(&format!("{peer}: undrained: this node takes applications again"));
            ch.send(&Reply::Undrained { was })?;
            Ok(())
        }
        Request::Restore { command, .. } if crate::drain::drained().is_some() => {
            log(&format!("{peer}: refused {command}: drained"));
            ch.send(&Reply::Failed { why: crate::drain::refusal() })?;
            Ok(())
        }
        Request::Restore { command, memory_bytes, address, relay, partition, cluster } => {
            log(&format!("{peer}: receiving {command} ({} MiB of memory)", memory_bytes >> 20));
            let address = match (address, &config.service_dev) {
                (None, _) => None,
                (Some(a), _) if cluster => {
                    // The address is every node's: it must be here already.
                    let here =
                        a.parse::<crate::address::Cidr>().ok().and_then(|c| crate::address::device_of(c.addr).ok()?);
                    if here.is_none() {
                        let why = format!("{a} is not on this node: is it a node of the cluster (lwk cluster up)?");
                        ch.send(&Reply::Failed { why: why.clone() })?;
                        anyhow::bail!(why);
                    }
                    None
                }
                (Some(a), Some(dev)) => Some((a, dev.clone())),
                (Some(a), None) => {
                    let why = format!("{a} cannot come up here: this daemon has no --service-dev");
                    ch.send(&Reply::Failed { why: why.clone() })?;
                    anyhow::bail!(why);
                }
            };
            receive(ch, config, peer, Destination { address, partition, cluster }, relay)
        }
    }
}

/// A received application's directory, removed unless it ends up running.
struct Incoming {
    dir: PathBuf,
    keep: bool,
}

impl Drop for Incoming {
    fn drop(&mut self) {
        if !self.keep {
            std::fs::remove_dir_all(&self.dir).ok();
        }
    }
}

/// What an application that comes needs here: its service address (and
/// the device it comes up on), the partition it ran in.
struct Destination {
    address: Option<(String, String)>,
    partition: Option<String>,
    /// In a single-IP cluster: hold the flows the image names.
    cluster: bool,
}

fn receive(mut ch: Channel, config: &Config, peer: SocketAddr, to: Destination, relay: bool) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let mut incoming = Incoming { dir: config.state_dir.join(format!("in-{stamp}")), keep: false };
    std::fs::create_dir_all(&incoming.dir)?;
    ch.send(&Reply::Ready)?;
    fault("ready");
    // The restorer starts now and reads the image as it comes; the stream
    // is also checked here, record by record (keyed with the cluster key,
    // with this session's stream id), to know where it ends.
    let mut restoring = match Restoring::start(&config.lwk, &incoming.dir, &config.key, &to) {
        Ok(r) => r,
        Err(e) => {
            ch.send(&Reply::Failed { why: format!("{e:#}") }).ok();
            return Err(e);
        }
    };
    let id = ch.next_image_id();
    // The image comes on a second handle of the connection: replies (that
    // the hold is in) go out on `ch` meanwhile.
    let mut from = ch.stream.try_clone()?;
    let mut tee = Tee { from: &mut from, to: restoring.image(), passed: 0 };
    let mut hold: Option<crate::hold::Hold> = None;
    // What the restored UDP queues hold already (a datagram that came
    // after the hold began may be there too).
    let mut already: Vec<crate::hold::Already> = Vec::new();
    let checked = (|| {
        let mut r = ImageReader::new(&mut tee, Some(&config.key))?;
        if r.header().stream_id != id {
            anyhow::bail!("the image stream is not this session's");
        }
        while let Some(rec) = r.next_record()? {
            if rec.kind() == Some(lwk_migrate::image::RecordKind::Hold) && to.cluster && hold.is_none() {
                let flows: crate::hold::Flows = rec.json()?;
                let (h, queue) = crate::hold::Hold::start_in(&flows, 4000..5000, (stamp % 1000) as u16 + 4000)
                    .context("holding the application's packets")?;
                log(&format!(
                    "{peer}: holding {:?} TCP {:?} UDP {:?} in queue {queue}",
                    flows.addr, flows.tcp_ports, flows.udp_ports
                ));
                hold = Some(h);
                ch.send(&Reply::Holding)?;
                // The source's neighbours, before the restored connections
                // send (while the restore goes on).
                if let Some(dev) = config.service_dev.clone() {
                    let neighbours = flows.neighbours;
                    std::thread::spawn(move || {
                        if let Err(e) = crate::hold::learn(&neighbours, &dev) {
                            log(&format!("{peer}: learning the source's neighbours: {e:#}"));
                        }
                    });
                }
            }
            if let (Some(lwk_migrate::image::RecordKind::Sockets), Some(h)) = (rec.kind(), &hold) {
                use lwk_migrate::checkpoint::SocketImage;
                h.cut();
                let images: Vec<(i32, SocketImage)> = rec.json()?;
                for (_, image) in images {
                    if let SocketImage::Udp(u) = image {
                        h.pace(u.local.port(), u.settings.buffers.receive);
                        already.extend(u.queue.into_iter().map(|d| crate::hold::Already {
                            port: u.local.port(),
                            source: d.source,
                            data: d.data,
                        }));
                    }
                }
            }
        }
        anyhow::Ok(())
    })();
    if let Err(e) = checked {
        // A stream that ends cleanly between records: the source gave up
        // (it keeps its application, and has said why on its side).
        if let Some(ImageError::Truncated { .. }) = e.downcast_ref::<ImageError>() {
            log(&format!("{peer}: the source stopped sending the image; it keeps its application"));
            return Ok(());
        }
        // The restorer may have refused it (and closed its end): say why.
        let said = restoring.said();
        let why =
            format!("the image did not arrive whole: {e:#}{}{}", if said.is_empty() { "" } else { ": " }, said.trim());
        ch.send(&Reply::Failed { why: why.clone() }).ok();
        anyhow::bail!(why);
    }
    fault("image");
    let receive_ms = t0.elapsed().as_secs_f64() * 1e3;
    let t1 = Instant::now();
    if let Err(e) = restoring.wait_ready() {
        ch.send(&Reply::Failed { why: format!("{e:#}") }).ok();
        return Err(e);
    }
    let restore_ms = t1.elapsed().as_secs_f64() * 1e3;
    fault("parked");
    ch.send(&Reply::Restored { pid: restoring.pid(), receive_ms, restore_ms })?;
    fault("gate");
    let decision = {
        ch.stream.set_read_timeout(Some(DECISION_TIMEOUT.min(config.timeout)))?;
        ch.recv::<Decision>()
    };
    match decision {
        Ok(Decision::Go) => {
            // Said before the gate opens: if it cannot be said, the source
            // will go on with its copy, and this one must not run.
            ch.send(&Reply::Running)?;
            let go = Instant::now();
            // Its output goes to the source from its first byte, after the
            // word that the gate is open.
            // Its sockets are live once its gate opened: what was held for
            // them goes in now, in order.
            let mut release = |opened: &Reply| {
                if let (Some(h), Reply::Opened { .. }) = (hold.take(), opened) {
                    // Paced to what the sockets take: the source need not
                    // wait for it.
                    let already = std::mem::take(&mut already);
                    std::thread::spawn(move || match h.release(already) {
                        Ok(n) => log(&format!("{peer}: {n} packets held during the freeze let in")),
                        Err(e) => log(&format!("{peer}: letting the held packets in: {e:#}")),
                    });
                }
            };
            if relay {
                restoring.relay_to(ch, peer, |r| {
                    let opened = r.open(go);
                    release(&opened);
                    opened
                })?;
            } else {
                restoring.input = None; // nothing comes: it reads its end
                let opened = restoring.open(go);
                release(&opened);
                ch.send(&opened)?;
                if let Reply::Failed { why } = opened {
                    anyhow::bail!(why);
                }
            }
            incoming.keep = true;
            std::fs::write(incoming.dir.join("running"), b"").ok();
            log(&format!("{peer}: {} runs here (lwk restore pid {})", incoming.dir.display(), restoring.pid()));
            // Its `lwk restore` stands for it here. When it ends, its exit
            // status goes to the source; what it wrote while no relay
            // was there stays as <dir>.log, and the rest of the directory
            // goes.
            let dir = incoming.dir.clone();
            std::thread::spawn(move || {
                let exit = restoring.wait();
                log(&format!("{} ended: {exit:?}", dir.display()));
                std::fs::rename(dir.join("output.log"), dir.with_extension("log")).ok();
                std::fs::remove_dir_all(&dir).ok();
            });
            Ok(())
        }
        Ok(Decision::Abort) => {
            log(&format!("{peer}: the source keeps its application; the copy here is dropped"));
            Ok(())
        }
        Err(e) => {
            anyhow::bail!("no decision from the source ({e}); the copy here is dropped");
        }
    }
}

/// A reader that copies what it reads.
struct Tee<'a, R: Read, W: Write> {
    from: &'a mut R,
    to: W,
    passed: u64,
}

impl<R: Read, W: Write> Read for Tee<'_, R, W> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.from.read(buf)?;
        self.to.write_all(&buf[..n])?;
        const PARTWAY: u64 = 4 << 20;
        if self.passed < PARTWAY && self.passed + n as u64 >= PARTWAY {
            fault("partway");
        }
        self.passed += n as u64;
        Ok(n)
    }
}

/// An `lwk restore` that holds the application restored and parked until
/// [`Restoring::go`]; killed if dropped before.
struct Restoring {
    child: Option<Child>,
    go: Option<OwnedFd>,
    image: Option<std::fs::File>,
    ready: Option<std::fs::File>,
    /// Its standard input (the application's, handed over).
    input: Option<std::process::ChildStdin>,
    output: Arc<Output>,
    /// The threads that read its standard output and error.
    collectors: Vec<std::thread::JoinHandle<()>>,
}

/// Where a restored application's standard output and error go: the
/// received directory's log (`lwk restore`'s own words about a failed
/// restore, too) until a relay to the source is attached, then the
/// source; back to the log if the relay is lost.
struct Output {
    log: Mutex<std::fs::File>,
    relay: Mutex<Option<Sender>>,
    /// The start of what went to the log, also here: a failed `lwk
    /// restore` removes its directory, the log with it.
    said: Mutex<Vec<u8>>,
}

/// How much of a restorer's words are kept to say why it failed.
const SAID_MAX: usize = 64 << 10;

impl Output {
    fn write(&self, fd: u8, data: &[u8]) {
        let mut relay = self.relay.lock().expect("not poisoned");
        if let Some(tx) = relay.as_mut() {
            match tx.send_message(&Message::Output { fd, data: data.to_vec() }) {
                Ok(()) => return,
                Err(e) => {
                    log(&format!("the relay to the source is lost ({e}); output is kept here"));
                    *relay = None;
                }
            }
        }
        self.log.lock().expect("not poisoned").write_all(data).ok();
        let mut said = self.said.lock().expect("not poisoned");
        let room = SAID_MAX.saturating_sub(said.len());
        said.extend_from_slice(&data[..data.len().min(room)]);
    }
}

impl Restoring {
    fn start(lwk: &Path, dir: &Path, key: &ClusterKey, to: &Destination) -> anyhow::Result<Restoring> {
        use anyhow::Context;
        // The key goes to the restorer as a file only root reads.
        let key_file = dir.join("cluster.key");
        crate::key::save(&key_file, key)?;
        let pipe = || rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC);
        let (go_r, go_w) = pipe()?;
        let (ready_r, ready_w) = pipe()?;
        let (image_r, image_w) = pipe()?;
        let log = std::fs::File::create(dir.join("output.log"))?;
        let mut cmd = Command::new(lwk);
        cmd.arg("restore")
            .arg(dir)
            .arg("--key")
            .arg(&key_file)
            .arg("--go-fd")
            .arg(go_r.as_raw_fd().to_string())
            .arg("--ready-fd")
            .arg(ready_w.as_raw_fd().to_string())
            .arg("--image-fd")
            .arg(image_r.as_raw_fd().to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some((cidr, dev)) = &to.address {
            cmd.arg("--address").arg(cidr).arg("--address-dev").arg(dev);
        }
        if let Some(p) = &to.partition {
            cmd.arg("--partition").arg(p);
        }
        let raw = [go_r.as_raw_fd(), ready_w.as_raw_fd(), image_r.as_raw_fd()];
        // SAFETY: only fcntl on open descriptors runs in the child: the
        // pipe ends it uses stay open across exec.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                for fd in raw {
                    libc::fcntl(fd, libc::F_SETFD, 0);
                }
                Ok(())
            })
        };
        let mut child = cmd.spawn().with_context(|| format!("cannot start {}", lwk.display()))?;
        drop((go_r, ready_w, image_r));
        let output = Arc::new(Output { log: Mutex::new(log), relay: Mutex::new(None), said: Mutex::new(Vec::new()) });
        let mut collectors = Vec::new();
        let outs: [(u8, Box<dyn Read + Send>); 2] =
            [(1, Box::new(child.stdout.take().expect("piped"))), (2, Box::new(child.stderr.take().expect("piped")))];
        for (fd, mut pipe) in outs {
            let output = output.clone();
            collectors.push(std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 << 10];
                while let Ok(n @ 1..) = pipe.read(&mut buf) {
                    output.write(fd, &buf[..n]);
                }
            }));
        }
        Ok(Restoring {
            input: child.stdin.take(),
            child: Some(child),
            go: Some(go_w),
            image: Some(std::fs::File::from(image_w)),
            ready: Some(std::fs::File::from(ready_r)),
            output,
            collectors,
        })
    }

    /// Where the image goes, as it arrives: the restorer reads it at once
    /// (pre-copied memory lands in its memory files while the application
    /// still runs at the source).
    fn image(&mut self) -> &mut std::fs::File {
        self.image.as_mut().expect("until the image is complete")
    }

    /// What the restorer said (why it failed), once its output is all in
    /// (it ended, or after two seconds).
    fn said(&mut self) -> String {
        self.image = None; // a restorer still reading sees the end
        let t0 = Instant::now();
        while !self.collectors.iter().all(|c| c.is_finished()) && t0.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(10));
        }
        String::from_utf8_lossy(&self.output.said.lock().expect("not poisoned")).trim().to_string()
    }

    /// The image is complete: wait until the application is restored and
    /// parked at its gate (one byte), or the restore failed (end of file;
    /// its reason is in output.log).
    fn wait_ready(&mut self) -> anyhow::Result<()> {
        self.image = None;
        let mut byte = [0u8; 1];
        if self.ready.as_mut().expect("until the gate opens").read(&mut byte)? != 1 {
            let status = self.child.take().expect("started").wait()?;
            anyhow::bail!("the restore failed ({status}): {}", self.said());
        }
        Ok(())
    }

    /// Let the application run: the go, then the restorer's word that its
    /// sockets are live and its gate open (what the source hears).
    fn open(&mut self, go: Instant) -> Reply {
        if let Err(e) = self.go() {
            return Reply::Failed { why: format!("the go did not reach the restorer: {e}") };
        }
        let mut byte = [0u8; 1];
        match self.ready.take().expect("once").read(&mut byte) {
            Ok(1) if byte[0] == b'o' => Reply::Opened { resume_ms: go.elapsed().as_secs_f64() * 1e3 },
            _ => Reply::Failed { why: format!("the restored copy ended as it started: {}", self.said()) },
        }
    }

    /// From now on the application's output goes to the source over `ch`,
    /// and the source's input and signals come to it. `first` opens the
    /// gate; what it answers goes first (the application's output waits).
    fn relay_to(
        &mut self,
        ch: Channel,
        peer: SocketAddr,
        first: impl FnOnce(&mut Self) -> Reply,
    ) -> anyhow::Result<()> {
        let (stream, state) = ch.into_parts();
        crate::relay::prepare(&stream)?;
        let (mut tx, mut rx) = crate::channel::split(stream, state)?;
        let output = self.output.clone();
        {
            let mut relay = output.relay.lock().expect("not poisoned");
            let reply = first(self);
            tx.send_bytes(&serde_json::to_vec(&reply)?)?;
            if let Reply::Failed { why } = reply {
                anyhow::bail!(why);
            }
            *relay = Some(tx);
        }
        let pid = self.pid();
        let output = self.output.clone();
        // Input waits in a queue for an application that does not read it
        // yet, so that signals still pass.
        let (queue, inputs) = std::sync::mpsc::sync_channel::<Vec<u8>>(256);
        let mut stdin = self.input.take();
        std::thread::spawn(move || {
            for data in inputs {
                if stdin.as_mut().is_none_or(|s| s.write_all(&data).is_err()) {
                    stdin = None;
                }
            }
        });
        let mut queue = Some(queue);
        std::thread::spawn(move || loop {
            match rx.recv_message() {
                Ok(Message::Input(data)) => {
                    if queue.as_ref().is_some_and(|q| q.send(data).is_err()) {
                        queue = None;
                    }
                }
                // The queue's end closes its input; signals still come.
                Ok(Message::InputEnd) => queue = None,
                Ok(Message::Signal(sig)) => {
                    // SAFETY: kill on our child, which passes it on.
                    unsafe { libc::kill(pid, sig) };
                }
                Ok(other) => {
                    log(&format!("{peer}: unexpected on a relay: {other:?}"));
                    return;
                }
                Err(e) => {
                    // Ended by the source after the application's exit,
                    // or lost: either way nothing more comes.
                    if output.relay.lock().expect("not poisoned").take().is_some() {
                        log(&format!("{peer}: the relay is lost ({e}); output is kept here"));
                    }
                    return;
                }
            }
        });
        Ok(())
    }

    /// Let the application run.
    fn go(&mut self) -> anyhow::Result<()> {
        let mut go = std::fs::File::from(self.go.take().expect("once"));
        go.write_all(b"g")?;
        Ok(())
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    /// Wait until the application ends here, all its output is passed on,
    /// and say how it ended to the source.
    fn wait(mut self) -> std::io::Result<Exit> {
        let exit = Exit::from_wait(self.child.take().expect("started").wait()?);
        for c in std::mem::take(&mut self.collectors) {
            c.join().ok();
        }
        if let Some(mut tx) = self.output.relay.lock().expect("not poisoned").take() {
            tx.send_message(&Message::Exited(exit)).ok();
        }
        Ok(exit)
    }
}

impl Drop for Restoring {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // Never let go: the copy here must not run.
            c.kill().ok();
            c.wait().ok();
        }
    }
}
