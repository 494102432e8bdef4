//! `lwk migrate` between two nodes: network namespaces this test creates
//! (node A and node B, a veth link between them, 198.18.0.0/24), with a
//! node daemon in B. The application runs in A and moves to B; a daemon
//! without the cluster key, or one that dies in any phase of a migration,
//! leaves the application running in A, and nothing of it in B.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{compiled, enter_netns, only_standard_streams, LineClient, TestPartition};

const LWK: &str = env!("CARGO_BIN_EXE_lwk");
const TMP_ROOT: &str = env!("CARGO_TARGET_TMPDIR");

fn restore_target() -> &'static Path {
    compiled("restore_target")
}

fn native() -> String {
    let o = Command::new(restore_target()).output().unwrap();
    String::from_utf8(o.stdout).unwrap()
}

/// A command run in network namespace `ns`, with the machine's /sys as it
/// is (`ip netns exec` mounts a sysfs of the namespace's own there, which
/// hides the cpuset cgroup that partitions live in).
fn in_netns(ns: &str) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{ns}"));
    cmd
}

fn ip(args: &[&str]) {
    let o = Command::new("ip").args(args).output().expect("ip (iproute2)");
    assert!(o.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&o.stderr));
}

/// Two nodes and a link (or, with a client, three namespaces on a
/// bridge); removed on drop (the daemon first).
struct Cluster {
    a: String,
    b: String,
    /// With a client: its namespace, the bridge's, and B's interface.
    client: Option<(String, String, String)>,
    dir: tempfile::TempDir,
    daemon: Option<Child>,
    /// A daemon in A too, for migrations back.
    daemon_a: Option<Child>,
    /// B's timeout for silent peers (seconds).
    timeout: u64,
    /// Its turn (last, so that it is given back after the rest is gone).
    _turn: Turn,
}

/// The tests run side by side, but for those that load the machine so
/// much (a whole application, a gigabyte of memory, a hundred clients)
/// that the others' timing would be another's: they run alone.
static TURNS: std::sync::RwLock<()> = std::sync::RwLock::new(());

enum Turn {
    Shared(#[allow(dead_code)] std::sync::RwLockReadGuard<'static, ()>),
    Alone(#[allow(dead_code)] std::sync::RwLockWriteGuard<'static, ()>),
}

impl Turn {
    fn shared() -> Turn {
        Turn::Shared(TURNS.read().unwrap_or_else(|e| e.into_inner()))
    }

    fn alone() -> Turn {
        Turn::Alone(TURNS.write().unwrap_or_else(|e| e.into_inner()))
    }
}

const A_ADDR: &str = "198.18.0.1";
const B_ADDR: &str = "198.18.0.2";
const B_ADDR_24: &str = "198.18.0.2/24";
/// The service address of the application with sockets: it moves.
const SERVICE: &str = "198.18.0.10";
const SERVICE_24: &str = "198.18.0.10/24";

impl Cluster {
    fn new(tag: &str) -> Cluster {
        let _turn = Turn::shared();
        let id = std::process::id();
        let (a, b) = (format!("lwk-{tag}-a-{id}"), format!("lwk-{tag}-b-{id}"));
        ip(&["netns", "add", &a]);
        let c = Cluster {
            a: a.clone(),
            b: b.clone(),
            client: None,
            dir: tempfile::Builder::new().prefix("lwk-cluster-").tempdir_in(TMP_ROOT).unwrap(),
            daemon: None,
            daemon_a: None,
            timeout: 10,
            _turn,
        };
        ip(&["netns", "add", &b]);
        // Interface names: at most 15 bytes, and apart for each test.
        let (va, vb) = (format!("a{tag}{id}"), format!("b{tag}{id}"));
        ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb]);
        ip(&["link", "set", &va, "netns", &a]);
        ip(&["link", "set", &vb, "netns", &b]);
        ip(&["-n", &a, "addr", "add", "198.18.0.1/24", "dev", &va]);
        ip(&["-n", &b, "addr", "add", &format!("{B_ADDR}/24"), "dev", &vb]);
        for (ns, dev) in [(&a, &va), (&b, &vb)] {
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        let o = Command::new(LWK).args(["node", "keygen"]).arg(c.key()).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        c
    }

    /// Node A, node B and a client C on one bridge (in a namespace of its
    /// own), all in 198.18.0.0/24; the service address SERVICE on A.
    fn with_client(tag: &str) -> Cluster {
        Cluster::with_client_taking(tag, Turn::shared())
    }

    /// As `with_client`, for a test that runs alone.
    fn with_client_alone(tag: &str) -> Cluster {
        Cluster::with_client_taking(tag, Turn::alone())
    }

    fn with_client_taking(tag: &str, _turn: Turn) -> Cluster {
        let id = std::process::id();
        let names = ["a", "b", "c", "s"].map(|n| format!("lwk-{tag}-{n}-{id}"));
        let mut c = Cluster {
            a: names[0].clone(),
            b: names[1].clone(),
            client: None,
            dir: tempfile::Builder::new().prefix("lwk-cluster-").tempdir_in(TMP_ROOT).unwrap(),
            daemon: None,
            daemon_a: None,
            timeout: 10,
            _turn,
        };
        for n in &names {
            ip(&["netns", "add", n]);
        }
        c.client = Some((names[2].clone(), names[3].clone(), format!("b{tag}{id}")));
        let sw = &names[3];
        ip(&["-n", sw, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", sw, "link", "set", "br0", "up"]);
        for (ns, letter, addr) in
            [(&names[0], "a", "198.18.0.1/24"), (&names[1], "b", B_ADDR_24), (&names[2], "c", "198.18.0.100/24")]
        {
            let (inner, outer) = (format!("{letter}{tag}{id}"), format!("p{letter}{tag}{id}"));
            ip(&["link", "add", &inner, "type", "veth", "peer", "name", &outer]);
            ip(&["link", "set", &inner, "netns", ns]);
            ip(&["link", "set", &outer, "netns", sw]);
            ip(&["-n", sw, "link", "set", &outer, "master", "br0", "up"]);
            ip(&["-n", ns, "addr", "add", addr, "dev", &inner]);
            ip(&["-n", ns, "link", "set", &inner, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        ip(&["-n", &names[0], "addr", "add", SERVICE_24, "dev", &format!("a{tag}{id}")]);
        let o = Command::new(LWK).args(["node", "keygen"]).arg(c.key()).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        c
    }

    fn key(&self) -> PathBuf {
        self.dir.path().join("cluster.key")
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Start B's daemon with `key`, and `fault` injected (LWK_NODE_FAULT).
    fn start_daemon(&mut self, key: &Path, fault: Option<&str>) {
        self.stop_daemon();
        let d = self.spawn_daemon(&self.b, B_ADDR, key, &self.state(), "daemon.log", fault);
        self.daemon = Some(d);
    }

    /// Start a daemon in A too (no fault).
    fn start_daemon_in_a(&mut self) {
        let d = self.spawn_daemon(&self.a, A_ADDR, &self.key(), &self.dir.path().join("state-a"), "daemon-a.log", None);
        self.daemon_a = Some(d);
    }

    fn spawn_daemon(&self, ns: &str, addr: &str, key: &Path, state: &Path, log: &str, fault: Option<&str>) -> Child {
        let mut cmd = in_netns(ns);
        cmd.args([LWK, "node", "serve", "--listen", &format!("{addr}:7070")])
            .arg("--key")
            .arg(key)
            .arg("--state-dir")
            .arg(state)
            .args(["--timeout", &self.timeout.to_string()])
            .stderr(std::fs::File::create(self.dir.path().join(log)).unwrap());
        if let Some(f) = fault {
            cmd.env("LWK_NODE_FAULT", f);
        }
        if let Some((_, _, dev)) = &self.client {
            // The node's own end on the bridge: b… in B, a… in A.
            let dev = if ns == self.a { format!("a{}", &dev[1..]) } else { dev.clone() };
            cmd.args(["--service-dev", &dev]);
        }
        let d = cmd.spawn().unwrap();
        let t0 = Instant::now();
        let said = || std::fs::read_to_string(self.dir.path().join(log)).unwrap_or_default();
        while !said().contains("listening") {
            assert!(t0.elapsed() < Duration::from_secs(10), "the daemon did not start: {}", said());
            std::thread::sleep(Duration::from_millis(10));
        }
        d
    }

    fn stop_daemon(&mut self) {
        for d in [self.daemon.take(), self.daemon_a.take()].into_iter().flatten() {
            let mut d = d;
            d.kill().ok();
            d.wait().ok();
        }
    }

    fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// Wait until B's daemon has said `what`.
    fn wait_for_daemon(&self, what: &str) {
        let t0 = Instant::now();
        while !self.daemon_log().contains(what) {
            assert!(t0.elapsed() < Duration::from_secs(20), "the daemon did not say {what:?}: {}", self.daemon_log());
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The application processes that run in namespace `ns` (`lwk ps`).
    fn apps_in(&self, ns: &str) -> Vec<i32> {
        let apps = Command::new(LWK).args(["ps", "--json"]).output().unwrap();
        let list: serde_json::Value = serde_json::from_slice(&apps.stdout).unwrap();
        let net = std::fs::metadata(format!("/run/netns/{ns}")).map(|m| m.ino()).unwrap();
        let inside = |pid: i32| {
            let link = std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap_or_default();
            link.to_string_lossy() == format!("net:[{net}]")
        };
        list.as_array().unwrap().iter().map(|a| a["pid"].as_i64().unwrap() as i32).filter(|&p| inside(p)).collect()
    }

    /// Nothing of received applications is left in B (but their logs).
    fn wait_until_b_is_clean(&self, why: &str) {
        let t0 = Instant::now();
        while self.leftovers().iter().any(|n| !n.ends_with(".log")) || !self.apps_in(&self.b).is_empty() {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "{why}: left in B: {:?}, {:?}\n{}",
                self.leftovers(),
                self.apps_in(&self.b),
                self.daemon_log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The application in node A, once it printed "ready".
    fn start_app(&self) -> (Child, BufReader<ChildStdout>, i32) {
        self.start(restore_target(), &[])
    }

    /// restore_target in node A, in partition `name`.
    fn start_in_partition(&self, name: &str) -> (Child, BufReader<ChildStdout>, i32) {
        self.start_with(&["--partition", name], restore_target(), &[])
    }

    fn start(&self, prog: &Path, args: &[&str]) -> (Child, BufReader<ChildStdout>, i32) {
        self.start_with(&[], prog, args)
    }

    fn start_with(&self, opts: &[&str], prog: &Path, args: &[&str]) -> (Child, BufReader<ChildStdout>, i32) {
        let mut cmd = in_netns(&self.a);
        cmd.args([LWK, "run"]).args(opts).arg("--").arg(prog).args(args).stdin(Stdio::null()).stdout(Stdio::piped());
        let mut child = only_standard_streams(&mut cmd).spawn().unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert_eq!(line, "ready\n");
        let app = lwk_migrate::app::App::attach(child.id() as i32).unwrap();
        (child, out, app.pid)
    }

    fn migrate(&self, pid: i32, key: &Path) -> std::process::Output {
        self.migrate_with(pid, key, &[])
    }

    fn migrate_with(&self, pid: i32, key: &Path, extra: &[&str]) -> std::process::Output {
        self.migrate_command(&self.a, pid, B_ADDR, key, extra).output().unwrap()
    }

    /// `lwk migrate` from namespace `from` to the daemon at `to`.
    fn migrate_command(&self, from: &str, pid: i32, to: &str, key: &Path, extra: &[&str]) -> Command {
        let mut cmd = in_netns(from);
        cmd.args([LWK, "migrate", &pid.to_string(), "--to", to, "--json"])
            .arg("--key")
            .arg(key)
            .args(["--timeout", &self.timeout.to_string()])
            .args(extra);
        cmd
    }

    /// The output of the application that ran in B, once it ended (the
    /// daemon keeps it as the received directory's log).
    fn output_in_b(&self) -> String {
        let t0 = Instant::now();
        loop {
            let logs: Vec<String> = self.leftovers().into_iter().filter(|n| n.ends_with(".log")).collect();
            if let Some(name) = logs.first() {
                return std::fs::read_to_string(self.state().join(name)).unwrap();
            }
            assert!(t0.elapsed() < Duration::from_secs(20), "it did not end in B: {}", self.daemon_log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What is left of received applications in B's state directory.
    fn leftovers(&self) -> Vec<String> {
        std::fs::read_dir(self.state())
            .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop_daemon();
        let mut all = vec![self.a.clone(), self.b.clone()];
        if let Some((c, sw, _)) = &self.client {
            all.extend([c.clone(), sw.clone()]);
        }
        for ns in all {
            // Whatever still runs there (a test that failed half-way leaves
            // its application, or the copy restored in B) goes with it.
            if let Ok(o) = Command::new("ip").args(["netns", "pids", &ns]).output() {
                for pid in String::from_utf8_lossy(&o.stdout).split_whitespace().filter_map(|p| p.parse().ok()) {
                    // SAFETY: plain kill of a process of the test's own namespace.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            Command::new("ip").args(["netns", "delete", &ns]).status().ok();
        }
    }
}

#[test]
#[ignore = "needs root (network namespaces, pid namespaces)"]
fn an_application_migrates_to_another_node_and_finishes_there() {
    let expected = native();
    let mut c = Cluster::new("mig");
    c.start_daemon(&c.key(), None);
    let (mut child, mut out, pid) = c.start_app();
    std::thread::sleep(Duration::from_millis(150));
    let o = c.migrate(pid, &c.key());
    assert!(o.status.success(), "{}\n{}", String::from_utf8_lossy(&o.stderr), c.daemon_log());
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    // Its main thread and its waiter; its sleeper ends after some 600 ms,
    // which a loaded machine may reach before the freeze.
    assert!(matches!(report["threads"].as_u64(), Some(2 | 3)), "{report}");
    assert!(report["memory_bytes"].as_u64().unwrap() >= 32 << 20, "{report}");
    for part in
        ["stop_ms", "capture_ms", "transfer_ms", "in_flight_ms", "restore_ms", "commit_ms", "resume_ms", "freeze_ms"]
    {
        assert!(report[part].as_f64().is_some(), "{part} in {report}");
    }
    // The freeze is made of its parts, and ends when the gate opened there.
    let parts: f64 = ["stop_ms", "capture_ms", "transfer_ms", "in_flight_ms", "restore_ms", "commit_ms", "resume_ms"]
        .iter()
        .map(|p| report[p].as_f64().unwrap())
        .sum();
    let freeze = report["freeze_ms"].as_f64().unwrap();
    assert!(parts <= freeze + 1.0 && report["resume_ms"].as_f64().unwrap() > 0.0, "{report}");
    // Memory went ahead while it ran: the freeze carried only a little.
    assert_eq!(report["precopy_off"], serde_json::Value::Null, "{report}");
    let rounds = report["rounds"].as_array().unwrap();
    assert!(!rounds.is_empty(), "{report}");
    assert!(rounds[0]["bytes"].as_u64().unwrap() >= 32 << 20, "the first round sends it all: {report}");
    assert!(report["frozen_memory_bytes"].as_u64().unwrap() < 8 << 20, "{report}");
    // It finishes in B, and the `lwk run` in A stands for it: its output
    // comes there, and so does its exit status.
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    assert_eq!(format!("ready\n{rest}"), expected, "{}", c.daemon_log());
    assert!(child.wait().unwrap().success());
    // Nothing of its output stayed in B, and its directory goes once it
    // ended.
    assert_eq!(c.output_in_b(), "");
    let t1 = Instant::now();
    while !c.leftovers().iter().all(|n| n.ends_with(".log")) {
        assert!(t1.elapsed() < Duration::from_secs(5), "only its log stays: {:?}", c.leftovers());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The application, after a failed migration, finishes in A as natively.
fn finishes_at_the_source(mut child: Child, mut out: BufReader<ChildStdout>, expected: &str) {
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    assert!(child.wait().unwrap().success());
    assert_eq!(format!("ready\n{rest}"), expected);
}

#[test]
#[ignore = "needs root (network namespaces, pid namespaces)"]
fn a_daemon_without_the_cluster_key_is_refused_and_the_application_goes_on() {
    let expected = native();
    let mut c = Cluster::new("key");
    let other = c.dir.path().join("other.key");
    assert!(Command::new(LWK).args(["node", "keygen"]).arg(&other).status().unwrap().success());
    c.start_daemon(&other, None);
    let (child, out, pid) = c.start_app();
    let o = c.migrate(pid, &c.key());
    assert_eq!(o.status.code(), Some(125));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("does not hold this cluster's key"), "{err}");
    finishes_at_the_source(child, out, &expected);
    assert!(c.daemon_log().contains("refused"), "{}", c.daemon_log());
    assert!(c.leftovers().is_empty(), "{:?}", c.leftovers());
}

#[test]
#[ignore = "needs root (network namespaces, pid namespaces)"]
fn a_destination_that_dies_in_any_phase_leaves_the_application_at_the_source_and_nothing_there() {
    let expected = native();
    let mut c = Cluster::new("die");
    for phase in ["ready", "partway", "image", "parked", "gate"] {
        c.start_daemon(&c.key(), Some(phase));
        let (child, out, pid) = c.start_app();
        let o = c.migrate(pid, &c.key());
        assert_eq!(o.status.code(), Some(125), "{phase}: {}", String::from_utf8_lossy(&o.stdout));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("it goes on here"), "{phase}: {err}");
        finishes_at_the_source(child, out, &expected);
        assert!(c.daemon_log().contains(&format!("fault injected at {phase}")), "{}", c.daemon_log());
        // A daemon started again removes what the dead one left; the copy
        // held at its gate ended when the dead daemon's end closed. No
        // copy runs in B.
        c.start_daemon(&c.key(), None);
        c.wait_until_b_is_clean(phase);
    }
}

#[test]
#[ignore = "needs root (network namespaces, pid namespaces, TCP_REPAIR)"]
fn a_tcp_connection_and_queued_datagrams_go_on_at_the_destination_with_the_service_address() {
    use std::net::UdpSocket;
    let mut c = Cluster::with_client("tcp");
    c.start_daemon(&c.key(), None);
    let (mut child, mut out, pid) = c.start(compiled("net_target"), &[SERVICE, "7001", "7002"]);
    // The client, from its own namespace (this test's thread enters it).
    let (client_ns, _, _) = c.client.clone().unwrap();
    enter_netns(&client_ns);
    let mut client = LineClient::connect((SERVICE, 7001), Duration::from_secs(20));
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "connected\n");
    assert_eq!(client.ask("hello\n"), "hello\n");
    let udp = UdpSocket::bind("198.18.0.100:0").unwrap();
    for d in ["d1", "d2"] {
        udp.send_to(d.as_bytes(), (SERVICE, 7002)).unwrap();
    }
    std::thread::sleep(Duration::from_millis(200)); // queued and acknowledged
    let o = c.migrate_with(pid, &c.key(), &["--address", SERVICE_24]);
    assert!(o.status.success(), "{}\n{}", String::from_utf8_lossy(&o.stderr), c.daemon_log());
    // The same connection, now served in B: no reset, every byte.
    assert_eq!(client.ask("world\n"), "world\n");
    assert_eq!(client.ask("udp\n"), "udp 2 198.18.0.100:d1 198.18.0.100:d2\n");
    assert_eq!(client.ask("quit\n"), "bye\n");
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "done\n");
    assert!(child.wait().unwrap().success());
}

/// One client of service_target: a connection that streams numbered
/// lines and checks that each comes back, in order, once.
struct Streamer {
    handle: std::thread::JoinHandle<Result<u64, String>>,
}

impl Streamer {
    /// Connect from the calling thread's network namespace; the thread
    /// that streams runs until `stop`, and says how many lines came back.
    fn start(
        id: usize,
        stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
        sent: std::sync::Arc<std::sync::atomic::AtomicU64>,
    ) -> Streamer {
        use std::io::Write;
        let conn = std::net::TcpStream::connect((SERVICE, 7001)).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let handle = std::thread::spawn(move || {
            let mut replies = BufReader::new(conn.try_clone().unwrap());
            let mut w = &conn;
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let line = format!("client {id} line {n}\n");
                w.write_all(line.as_bytes()).map_err(|e| format!("client {id}: send {n}: {e}"))?;
                let mut back = String::new();
                replies
                    .read_line(&mut back)
                    .map_err(|e| format!("client {id}: echo {n}: {e} at {:?}", std::time::SystemTime::now()))?;
                if back != line {
                    return Err(format!("client {id}: sent {line:?}, got {back:?}"));
                }
                sent.fetch_add(line.len() as u64, std::sync::atomic::Ordering::SeqCst);
                n += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(n)
        });
        Streamer { handle }
    }
}

#[test]
#[ignore = "needs root (network namespaces, pid namespaces, TCP_REPAIR)"]
fn a_whole_application_with_a_child_100_clients_udp_and_512_mib_goes_to_b_and_back_without_losing_a_byte() {
    // service_target: a thread rewriting 512 MiB with its pattern, a forked
    // child that adds up every line the server gets (through a pipe), an
    // epoll loop echoing 100 clients that stream numbered lines through
    // the whole migration, and a UDP socket read only afterwards.
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    let mut c = Cluster::with_client_alone("all");
    c.timeout = 60;
    c.start_daemon(&c.key(), None);
    c.start_daemon_in_a();
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &c.a, LWK, "run", "--"])
        .arg(compiled("service_target"))
        .args([SERVICE, "7001", "7002", "512"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    let mut child = only_standard_streams(&mut cmd).spawn().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut ready = String::new();
    out.read_line(&mut ready).unwrap();
    let pid_line = ready.strip_prefix("ready ").expect("ready PID").trim().to_string();
    let pid = lwk_migrate::app::App::attach(child.id() as i32).unwrap().pid;

    let (client_ns, _, _) = c.client.clone().unwrap();
    enter_netns(&client_ns);
    let stop = Arc::new(AtomicBool::new(false));
    let bytes = Arc::new(AtomicU64::new(0));
    let streamers: Vec<Streamer> = (0..100).map(|i| Streamer::start(i, stop.clone(), bytes.clone())).collect();
    let udp = std::net::UdpSocket::bind("198.18.0.100:0").unwrap();
    for d in ["d1", "d2", "d3"] {
        udp.send_to(d.as_bytes(), (SERVICE, 7002)).unwrap();
    }
    std::thread::sleep(Duration::from_millis(500));
    let before = bytes.load(Ordering::SeqCst);
    assert!(before > 0, "the clients stream before the migration");

    let o = c.migrate_with(pid, &c.key(), &["--address", SERVICE_24]);
    assert!(o.status.success(), "{}\n{}", String::from_utf8_lossy(&o.stderr), c.daemon_log());
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["processes"], 2, "{report}");
    assert_eq!(report["threads"], 3, "{report}");
    assert_eq!(report["precopy_off"], serde_json::Value::Null, "{report}");
    let in_b = c.apps_in(&c.b);
    assert_eq!(in_b.len(), 2, "both processes run in B");
    let after_migration = bytes.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(1000));
    assert!(bytes.load(Ordering::SeqCst) > after_migration, "the clients stream after the migration");
    // And back to A, still streaming.
    let first = *in_b.iter().min_by_key(|&&p| lwk_migrate::app::pid_in_namespace(p)).unwrap();
    let o = c.migrate_command(&c.b, first, A_ADDR, &c.key(), &["--address", SERVICE_24]).output().unwrap();
    assert!(o.status.success(), "{}\n{}", String::from_utf8_lossy(&o.stderr), c.daemon_log());
    let back = bytes.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(1000));
    assert!(bytes.load(Ordering::SeqCst) > back, "the clients stream after the way back");
    stop.store(true, Ordering::SeqCst);
    let mut lines = 0;
    for s in streamers {
        lines += s.handle.join().unwrap().unwrap();
    }
    // Datagrams queued before the freeze, read after it.
    let mut control = LineClient::connect((SERVICE, 7001), Duration::from_secs(20));
    assert_eq!(control.ask("udp\n"), "udp 3 d1 d2 d3\n");
    assert_eq!(control.ask("end\n"), "bye\n");
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    let total = bytes.load(Ordering::SeqCst);
    assert_eq!(
        rest,
        format!("pid {pid_line}\nmemory ok\nchild exit 3 lines {lines} bytes {total}\n"),
        "{report}\n{}",
        c.daemon_log()
    );
    assert!(child.wait().unwrap().success());
    c.wait_until_b_is_clean("after it went back to A");
}

#[test]
#[ignore = "needs root (network namespaces, pid namespaces), a second CPU and a cpuset cgroup (partitions)"]
fn an_application_in_a_partition_moves_only_where_a_partition_like_it_can_be_made() {
    // restore_target runs in A in a partition of the last CPU. B (on the
    // same machine) must make a partition of one CPU too: with two CPUs
    // there is none left (one stays with Linux), and the migration is
    // refused with the reason while the application goes on in A; with
    // more, it moves and B's partition goes when it ends.
    let online = std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap();
    let online = lwk_partition::parse_cpu_list(&online).unwrap();
    let source = TestPartition::create("mig", "128M");
    let expected = native();
    let mut c = Cluster::new("part");
    c.start_daemon(&c.key(), None);
    let (child, out, pid) = c.start_in_partition(&source.name);
    let o = c.migrate(pid, &c.key());
    let err = String::from_utf8_lossy(&o.stderr);
    if online.len() <= 2 {
        assert!(!o.status.success(), "{}", c.daemon_log());
        assert!(err.contains("CPUs outside partitions") && err.contains("goes on here"), "{err}\n{}", c.daemon_log());
        finishes_at_the_source(child, out, &expected);
    } else {
        assert!(o.status.success(), "{err}\n{}", c.daemon_log());
        finishes_at_the_source(child, out, &expected);
    }
    c.wait_until_b_is_clean("after the partition");
    let list = String::from_utf8(Command::new(LWK).args(["partition", "list"]).output().unwrap().stdout).unwrap();
    assert!(!list.contains("restored-"), "no partition of B's is left: {list}");
}

/// The relay target in A, with its standard input and error piped too.
struct Talking {
    child: Child,
    input: Option<std::process::ChildStdin>,
    out: BufReader<ChildStdout>,
    err: BufReader<std::process::ChildStderr>,
    pid: i32,
}

impl Talking {
    fn start(c: &Cluster) -> Talking {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &c.a, LWK, "run", "--"])
            .arg(compiled("relay_target"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = only_standard_streams(&mut cmd).spawn().unwrap();
        let input = child.stdin.take();
        let out = BufReader::new(child.stdout.take().unwrap());
        let err = BufReader::new(child.stderr.take().unwrap());
        let mut t = Talking { child, input, out, err, pid: 0 };
        assert_eq!(t.line(), "ready\n");
        t.pid = lwk_migrate::app::App::attach(t.child.id() as i32).unwrap().pid;
        t
    }

    fn line(&mut self) -> String {
        let mut l = String::new();
        self.out.read_line(&mut l).unwrap();
        l
    }

    fn say(&mut self, what: &str) -> (String, String) {
        use std::io::Write;
        writeln!(self.input.as_mut().unwrap(), "{what}").unwrap();
        let out = self.line();
        let mut err = String::new();
        self.err.read_line(&mut err).unwrap();
        (out, err)
    }
}

#[test]
#[ignore = "needs root (network namespaces, pid namespaces)"]
fn lwk_run_at_the_source_keeps_standing_for_a_migrated_application() {
    use std::io::Write;
    use std::os::unix::process::ExitStatusExt;
    let mut c = Cluster::new("rel");
    c.start_daemon(&c.key(), None);

    // Its standard streams and its exit status.
    let mut t = Talking::start(&c);
    assert_eq!(t.say("one"), ("echo: one\n".into(), "err: one\n".into()));
    let o = c.migrate(t.pid, &c.key());
    assert!(o.status.success(), "{}\n{}", String::from_utf8_lossy(&o.stderr), c.daemon_log());
    assert!(c.daemon_log().contains("runs here"), "{}", c.daemon_log());
    assert_eq!(t.say("two"), ("echo: two\n".into(), "err: two\n".into()), "{}", c.daemon_log());
    // A signal to `lwk run` reaches it in B.
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(t.child.id() as i32, libc::SIGUSR1) };
    assert_eq!(t.line(), "usr1\n");
    assert_eq!(t.say("three"), ("echo: three\n".into(), "err: three\n".into()));
    writeln!(t.input.as_mut().unwrap(), "exit 7").unwrap();
    assert_eq!(t.line(), "bye\n");
    assert_eq!(t.child.wait().unwrap().code(), Some(7), "{}", c.daemon_log());

    // The end of its input, then a death by signal: signals still pass
    // once the input ended.
    let mut t = Talking::start(&c);
    let o = c.migrate(t.pid, &c.key());
    assert!(o.status.success(), "{}\n{}", String::from_utf8_lossy(&o.stderr), c.daemon_log());
    assert_eq!(t.say("four"), ("echo: four\n".into(), "err: four\n".into()));
    drop(t.input.take());
    assert_eq!(t.line(), "eof\n");
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(t.child.id() as i32, libc::SIGTERM) };
    let status = t.child.wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGTERM), "{status:?}: {}", c.daemon_log());

    // Its input ended before it moved.
    let mut t = Talking::start(&c);
    drop(t.input.take());
    assert_eq!(t.line(), "eof\n");
    let o = c.migrate(t.pid, &c.key());
    assert!(o.status.success(), "{}\n{}", String::from_utf8_lossy(&o.stderr), c.daemon_log());
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(t.child.id() as i32, libc::SIGUSR1) };
    assert_eq!(t.line(), "usr1\n");
    assert_eq!(t.child.wait().unwrap().code(), Some(3));
    // Nothing of them stays in B.
    let t0 = Instant::now();
    while c.leftovers().iter().any(|n| !n.ends_with(".log")) {
        assert!(t0.elapsed() < Duration::from_secs(10), "left in B: {:?}", c.leftovers());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Packet-filter rules in B that drop everything between it and A.
fn cut_link(c: &Cluster) {
    let rules = format!(
        "table inet lwk_cut {{\n\
         chain in {{ type filter hook input priority 0; policy accept; ip saddr {A_ADDR} drop; }}\n\
         chain out {{ type filter hook output priority 0; policy accept; ip daddr {A_ADDR} drop; }}\n\
         }}\n"
    );
    nft(c, &["-f", "-"], Some(&rules));
}

fn heal_link(c: &Cluster) {
    nft(c, &["delete", "table", "inet", "lwk_cut"], None);
}

fn nft(c: &Cluster, args: &[&str], input: Option<&str>) {
    use std::io::Write;
    let mut child = Command::new("ip")
        .args(["netns", "exec", &c.b, "nft"])
        .args(args)
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nft (Debian's nftables)");
    child.stdin.take().unwrap().write_all(input.unwrap_or("").as_bytes()).unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "nft {args:?}: {}", String::from_utf8_lossy(&o.stderr));
}

#[test]
#[ignore = "needs root (network namespaces, pid namespaces, nftables)"]
fn a_link_cut_in_any_phase_leaves_the_application_at_the_source_and_nothing_there() {
    let expected = native();
    let mut c = Cluster::new("cut");
    // Silent peers fail their migration after 3 s.
    c.timeout = 3;
    // Cut while the daemon stalls at each phase (before the source hears
    // that its copy is parked: after that, a cut is the one window where
    // both nodes could run it, see lwk migrate).
    for phase in ["ready", "partway", "image", "parked"] {
        c.start_daemon(&c.key(), Some(&format!("stall-{phase}")));
        let (child, out, pid) = c.start_app();
        let migrating = c
            .migrate_command(&c.a, pid, B_ADDR, &c.key(), &[])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        c.wait_for_daemon(&format!("fault injected at {phase}: stalling"));
        cut_link(&c);
        let o = migrating.wait_with_output().unwrap();
        let said = format!("{phase}: {:?} {}{}", o.status, String::from_utf8_lossy(&o.stdout), c.daemon_log());
        assert_eq!(o.status.code(), Some(125), "{said}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("it goes on here"), "{phase}: {err}");
        finishes_at_the_source(child, out, &expected);
        // B gives up on its silent peer, and drops its copy.
        c.wait_until_b_is_clean(phase);
        heal_link(&c);
    }
}

#[test]
#[ignore = "needs root (network namespaces, pid namespaces)"]
fn a_corrupted_chunk_fails_the_migration_and_the_application_goes_on() {
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};
    let expected = native();
    let mut c = Cluster::new("bad");
    c.start_daemon(&c.key(), None);
    // A man in the middle, in A, that flips one byte 8 MiB into what the
    // source sends (well inside the first round of memory).
    enter_netns(&c.a);
    let listener = TcpListener::bind((A_ADDR, 7071)).unwrap();
    let middle = std::thread::spawn(move || {
        let (from, _) = listener.accept().unwrap();
        let to = TcpStream::connect((B_ADDR, 7070)).unwrap();
        let (mut from_r, mut to_w) = (from.try_clone().unwrap(), to.try_clone().unwrap());
        let (mut to_r, mut from_w) = (to, from);
        let back = std::thread::spawn(move || std::io::copy(&mut to_r, &mut from_w).ok());
        let mut buf = vec![0u8; 64 << 10];
        let mut passed = 0u64;
        const AT: u64 = 8 << 20;
        while let Ok(n @ 1..) = from_r.read(&mut buf) {
            if passed <= AT && AT < passed + n as u64 {
                buf[(AT - passed) as usize] ^= 0x20;
            }
            passed += n as u64;
            if to_w.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        to_w.shutdown(std::net::Shutdown::Write).ok();
        back.join().ok();
    });
    let (child, out, pid) = c.start_app();
    let o = c.migrate_command(&c.a, pid, &format!("{A_ADDR}:7071"), &c.key(), &[]).output().unwrap();
    assert_eq!(o.status.code(), Some(125), "{}", String::from_utf8_lossy(&o.stdout));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("did not arrive whole") && err.contains("it goes on here"), "{err}");
    finishes_at_the_source(child, out, &expected);
    c.wait_until_b_is_clean("corrupted");
    middle.join().unwrap();
}

#[test]
#[ignore = "needs root (network namespaces, pid namespaces)"]
fn an_application_migrated_to_b_and_back_to_a_still_talks_through_its_first_lwk_run() {
    use std::io::Write;
    let mut c = Cluster::new("aba");
    c.start_daemon(&c.key(), None);
    c.start_daemon_in_a();
    let mut t = Talking::start(&c);
    assert_eq!(t.say("one"), ("echo: one\n".into(), "err: one\n".into()));
    let o = c.migrate(t.pid, &c.key());
    assert!(o.status.success(), "{}\n{}", String::from_utf8_lossy(&o.stderr), c.daemon_log());
    assert_eq!(t.say("two"), ("echo: two\n".into(), "err: two\n".into()));
    // Back to A, from B, by its pid there.
    let in_b = c.apps_in(&c.b);
    assert_eq!(in_b.len(), 1, "{in_b:?}");
    let o = c.migrate_command(&c.b, in_b[0], A_ADDR, &c.key(), &[]).output().unwrap();
    assert!(o.status.success(), "{}\n{}", String::from_utf8_lossy(&o.stderr), c.daemon_log());
    assert_eq!(t.say("three"), ("echo: three\n".into(), "err: three\n".into()));
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(t.child.id() as i32, libc::SIGUSR1) };
    assert_eq!(t.line(), "usr1\n");
    writeln!(t.input.as_mut().unwrap(), "exit 5").unwrap();
    assert_eq!(t.line(), "bye\n");
    assert_eq!(t.child.wait().unwrap().code(), Some(5));
    c.wait_until_b_is_clean("after it left B");
}

#[test]
#[ignore = "needs root (network namespaces, pid namespaces)"]
fn a_process_tree_migrated_to_b_and_back_keeps_its_child_pipes_and_shared_memory() {
    // tree_target's parent and child pass numbers through two pipes and
    // add them up in shared memory; they move to B and back to A mid-way.
    // The child stays the parent's child (getppid, SIGUSR1, wait4 and its
    // exit status), and the output comes through the first lwk run.
    let prog = compiled("tree_target");
    let pause = ["40000"];
    let o = Command::new(prog).args(pause).output().unwrap();
    let expected = String::from_utf8(o.stdout).unwrap();
    let mut c = Cluster::new("tree");
    c.start_daemon(&c.key(), None);
    c.start_daemon_in_a();
    let (mut child, mut out, pid) = c.start(prog, &pause);
    std::thread::sleep(Duration::from_millis(200));
    let o = c.migrate(pid, &c.key());
    assert!(o.status.success(), "{}\n{}", String::from_utf8_lossy(&o.stderr), c.daemon_log());
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["processes"], 2, "{report}");
    assert_eq!(report["threads"], 2, "{report}");
    assert_eq!(report["precopy_off"], serde_json::Value::Null, "both processes' memory went ahead: {report}");
    let in_b = c.apps_in(&c.b);
    assert_eq!(in_b.len(), 2, "both processes run in B: {in_b:?}");
    std::thread::sleep(Duration::from_millis(300));
    let first = *in_b.iter().min_by_key(|&&p| lwk_migrate::app::pid_in_namespace(p)).unwrap();
    let o = c.migrate_command(&c.b, first, A_ADDR, &c.key(), &[]).output().unwrap();
    assert!(o.status.success(), "{}\n{}", String::from_utf8_lossy(&o.stderr), c.daemon_log());
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    assert_eq!(format!("ready\n{rest}"), expected, "{}", c.daemon_log());
    assert!(child.wait().unwrap().success());
    c.wait_until_b_is_clean("after the tree left B");
}

#[test]
#[ignore = "needs root (network namespaces, pid namespaces, tc)"]
fn a_writer_faster_than_the_link_is_refused_before_the_freeze_with_max_freeze() {
    let mut c = Cluster::new("fast");
    c.start_daemon(&c.key(), None);
    // 100 Mbit/s from A; the program rewrites all of its 32 MiB four
    // times a second.
    let dev = format!("afast{}", std::process::id());
    ip(&[
        "netns", "exec", &c.a, "tc", "qdisc", "add", "dev", &dev, "root", "tbf", "rate", "100mbit", "burst", "256kb",
        "latency", "50ms",
    ]);
    let (mut child, mut out, pid) = c.start(compiled("bench/src/memhog"), &["32", "60", "128"]);
    let o = c.migrate_with(pid, &c.key(), &["--max-freeze", "200"]);
    assert_eq!(o.status.code(), Some(125), "{}", String::from_utf8_lossy(&o.stdout));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("writes its memory faster than the link carries it") && err.contains("it goes on here"),
        "{err}"
    );
    // It goes on here, whole.
    // SAFETY: a signal to our own child (it ends the program's writing).
    unsafe { libc::kill(child.id() as i32, libc::SIGUSR1) };
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "ok\n");
    assert!(child.wait().unwrap().success());
    c.wait_until_b_is_clean("refused");
}

/// Debian's CPython, whose test package bench/compat.py runs too.
const PYTHON: &str = "/usr/bin/python3.11";

/// CPython's own regression modules, the summary a run prints (the count
/// of tests, the progress line, the verdict; not the time).
const CPYTHON_MODULES: [&str; 3] = ["test.test_math", "test.test_json", "test.test_statistics"];

fn unittest_summary(stderr: &str) -> Vec<String> {
    stderr
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with("---"))
        .map(|l| if l.starts_with("Ran ") { l.split(" in ").next().unwrap().to_string() } else { l.to_string() })
        .collect()
}

#[test]
#[ignore = "needs root (network namespaces, pid namespaces) and python3.11 with its test package"]
fn cpython_regression_modules_migrated_in_the_middle_of_their_run_give_the_native_results() {
    let work = tempfile::Builder::new().prefix("lwk-cpython-").tempdir_in(TMP_ROOT).unwrap();
    let native = Command::new(PYTHON)
        .args(["-m", "unittest"])
        .args(CPYTHON_MODULES)
        .current_dir(work.path())
        .output()
        .expect("python3.11 (Debian's python3.11 and libpython3.11-testsuite)");
    let expected = unittest_summary(&String::from_utf8_lossy(&native.stderr));
    assert!(native.status.success() && expected.iter().any(|l| l.starts_with("Ran ")), "{expected:?}");

    let mut c = Cluster::new("py");
    c.start_daemon(&c.key(), None);
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &c.a, LWK, "run", "--", PYTHON, "-m", "unittest"])
        .args(CPYTHON_MODULES)
        .current_dir(work.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = only_standard_streams(&mut cmd).spawn().unwrap();
    // Into its run; a moment where it cannot move (a child process, a file
    // it just deleted) is refused with the reason, and tried again.
    std::thread::sleep(Duration::from_secs(2));
    let pid = lwk_migrate::app::App::attach(child.id() as i32).unwrap().pid;
    let mut refusals = Vec::new();
    loop {
        let o = c.migrate(pid, &c.key());
        if o.status.success() {
            break;
        }
        refusals.push(String::from_utf8_lossy(&o.stderr).into_owned());
        assert!(refusals.len() < 10, "never migrated: {refusals:?}\n{}", c.daemon_log());
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(c.daemon_log().contains("runs here"), "{}", c.daemon_log());
    // It ends in B; its results come through the lwk run in A.
    let o = child.wait_with_output().unwrap();
    let got = unittest_summary(&String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "{:?}: {got:?}", o.status);
    assert_eq!(got, expected, "refused first: {refusals:?}");
}

#[test]
#[ignore = "needs root (network namespaces, pid namespaces)"]
fn what_cannot_move_is_refused_before_anything_stops_and_force_close_closes_it() {
    let mut c = Cluster::new("frc");
    c.start_daemon(&c.key(), None);
    let (mut child, mut out, pid) = c.start(compiled("force_target"), &[]);
    let o = c.migrate(pid, &c.key());
    assert_eq!(o.status.code(), Some(125), "{}", String::from_utf8_lossy(&o.stdout));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("inotify") && err.contains("appmem") && err.contains("it goes on here"), "{err}");
    // Refused before anything was sent: the daemon heard nothing.
    assert!(!c.daemon_log().contains("receiving"), "{}", c.daemon_log());
    let o = c.migrate_with(pid, &c.key(), &["--force-close"]);
    assert!(o.status.success(), "{}\n{}", String::from_utf8_lossy(&o.stderr), c.daemon_log());
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let closed = report["closed"].as_array().unwrap();
    assert!(closed.len() == 2 && closed[0].as_str().unwrap().contains("inotify"), "{report}");
    assert!(closed[1].as_str().unwrap().contains("appmem"), "{report}");
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "inotify closed\nmemfd closed\n");
    assert!(child.wait().unwrap().success());
}

#[test]
#[ignore = "needs root (network namespaces, pid namespaces)"]
fn a_migration_after_one_rolled_back_copies_ahead_again_and_completes() {
    let expected = native();
    let mut c = Cluster::new("again");
    c.start_daemon(&c.key(), Some("gate"));
    let (mut child, mut out, pid) = c.start_app();
    let o = c.migrate(pid, &c.key());
    assert_eq!(o.status.code(), Some(125), "{}", String::from_utf8_lossy(&o.stdout));
    c.start_daemon(&c.key(), None);
    let o = c.migrate(pid, &c.key());
    assert!(o.status.success(), "{}\n{}", String::from_utf8_lossy(&o.stderr), c.daemon_log());
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["precopy_off"], serde_json::Value::Null, "{report}");
    assert!(!report["rounds"].as_array().unwrap().is_empty(), "{report}");
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    assert_eq!(format!("ready\n{rest}"), expected, "{}", c.daemon_log());
    assert!(child.wait().unwrap().success());
}
