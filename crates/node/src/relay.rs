//! The relay: once an application runs on another node, the `lwk run` that
//! started it keeps standing for it. Its standard input goes to the
//! application, the application's standard output and error come back to
//! it, the signals it gets are passed on, and it ends with the
//! application's exit status, as if the application had never left. A
//! batch system that started `lwk run` notices nothing.
//!
//! The relay goes over the migration's own connection (authenticated, every
//! frame checked: [`crate::channel`]): after the destination says it runs
//! the application, the migration hands the connection over to the
//! supervisor (a unix socket the supervisor published in the control
//! region, taken with `pidfd_getfd`), with where the connection stands.
//! At the destination, the daemon keeps the other end: the restored
//! application's standard streams are pipes to it.
//!
//! A second migration chains: the supervisor at the destination
//! (`lwk restore`) stands for the application in turn, and its streams
//! are the daemon's pipes, which relay back.
//!
//! Frames are bytes: a tag and its body.

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use rustix::net::{
    recvmsg, sendmsg, socketpair, AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketFlags, SocketType,
};

use crate::channel::{ChannelError, ChannelState, Receiver, Sender};

/// How an application ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

impl Exit {
    /// From a wait status.
    pub fn from_wait(status: std::process::ExitStatus) -> Exit {
        use std::os::unix::process::ExitStatusExt;
        match (status.code(), status.signal()) {
            (Some(c), _) => Exit::Code(c),
            (None, Some(s)) => Exit::Signal(s),
            (None, None) => Exit::Code(125),
        }
    }
}

/// What goes over a relay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// Source to destination: bytes of the application's standard input.
    Input(Vec<u8>),
    /// Source to destination: its standard input ended.
    InputEnd,
    /// Source to destination: a signal for the application.
    Signal(i32),
    /// Destination to source: bytes the application wrote to descriptor
    /// `fd` (1 or 2).
    Output { fd: u8, data: Vec<u8> },
    /// Destination to source: the application ended (all its output came
    /// before).
    Exited(Exit),
}

impl Message {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Message::Input(d) => [b"i".as_slice(), d].concat(),
            Message::InputEnd => b"e".to_vec(),
            Message::Signal(s) => [b"s".as_slice(), &s.to_le_bytes()].concat(),
            Message::Output { fd, data } => [b"o".as_slice(), &[*fd], data].concat(),
            Message::Exited(Exit::Code(c)) => [b"x".as_slice(), &[0], &c.to_le_bytes()].concat(),
            Message::Exited(Exit::Signal(s)) => [b"x".as_slice(), &[1], &s.to_le_bytes()].concat(),
        }
    }

    pub fn decode(b: &[u8]) -> Result<Message, String> {
        let int = |b: &[u8]| b.try_into().map(i32::from_le_bytes).map_err(|_| "a short relay frame".to_string());
        match b.split_first() {
            Some((b'i', d)) => Ok(Message::Input(d.to_vec())),
            Some((b'e', [])) => Ok(Message::InputEnd),
            Some((b's', s)) => Ok(Message::Signal(int(s)?)),
            Some((b'o', [fd @ (1 | 2), d @ ..])) => Ok(Message::Output { fd: *fd, data: d.to_vec() }),
            Some((b'x', [0, c @ ..])) => Ok(Message::Exited(Exit::Code(int(c)?))),
            Some((b'x', [1, s @ ..])) => Ok(Message::Exited(Exit::Signal(int(s)?))),
            _ => Err(format!("an unknown relay frame ({} bytes)", b.len())),
        }
    }
}

impl Sender {
    pub fn send_message(&mut self, m: &Message) -> Result<(), ChannelError> {
        self.send_bytes(&m.encode())
    }
}

impl Receiver {
    pub fn recv_message(&mut self) -> Result<Message, ChannelError> {
        let b = self.recv_bytes()?;
        Message::decode(&b).map_err(|why| ChannelError::Io(std::io::Error::new(std::io::ErrorKind::InvalidData, why)))
    }
}

/// A relay connection idles for as long as the application runs: no
/// timeout on it, but keepalives, so that a peer gone (its node down, the
/// link cut) is noticed within about half a minute.
pub fn prepare(stream: &TcpStream) -> std::io::Result<()> {
    use rustix::net::sockopt;
    stream.set_read_timeout(None)?;
    stream.set_write_timeout(None)?;
    sockopt::set_socket_keepalive(stream, true)?;
    sockopt::set_tcp_keepidle(stream, std::time::Duration::from_secs(10))?;
    sockopt::set_tcp_keepintvl(stream, std::time::Duration::from_secs(5))?;
    sockopt::set_tcp_keepcnt(stream, 3)?;
    Ok(())
}

/// The supervisor's side of a hand-over: a unix socket pair, one end
/// published (its number goes in the control region), the other read.
pub struct Handoff {
    mine: OwnedFd,
    theirs: OwnedFd,
}

/// A relay handed over: the connection, where it stands, and the peer.
pub struct Handed {
    pub stream: TcpStream,
    pub state: ChannelState,
    /// The destination, as the migration named it.
    pub peer: String,
}

/// What a hand-over carries besides the socket.
#[derive(serde::Serialize, serde::Deserialize)]
struct HandoffBody {
    state: ChannelState,
    peer: String,
}

impl Handoff {
    pub fn new() -> std::io::Result<Handoff> {
        let (mine, theirs) = socketpair(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None)?;
        Ok(Handoff { mine, theirs })
    }

    /// The end a migration takes (a descriptor of this process).
    pub fn published(&self) -> RawFd {
        self.theirs.as_raw_fd()
    }

    /// The end this process reads, for a thread that waits on it.
    pub fn receiver(&self) -> std::io::Result<OwnedFd> {
        self.mine.try_clone()
    }
}

/// Wait for a hand-over on `mine` ([`Handoff::receiver`]).
pub fn receive(mine: &OwnedFd) -> std::io::Result<Handed> {
    let mut body = vec![0u8; 4096];
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut anc = RecvAncillaryBuffer::new(&mut space);
    let r = recvmsg(mine, &mut [IoSliceMut::new(&mut body)], &mut anc, RecvFlags::CMSG_CLOEXEC)?;
    let mut fd = None;
    for m in anc.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = m {
            for f in fds {
                fd.get_or_insert(f);
            }
        }
    }
    let invalid = |why: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, why.to_string());
    let fd = fd.ok_or_else(|| invalid("a hand-over without its connection"))?;
    let body: HandoffBody = serde_json::from_slice(&body[..r.bytes]).map_err(|_| invalid("a malformed hand-over"))?;
    Ok(Handed { stream: TcpStream::from(fd), state: body.state, peer: body.peer })
}

/// Take the published end of a supervisor's hand-over socket (descriptor
/// `fd` of process `pid`).
pub fn take(pid: i32, fd: RawFd) -> std::io::Result<OwnedFd> {
    use rustix::process::{pidfd_getfd, pidfd_open, Pid, PidfdFlags, PidfdGetfdFlags};
    let pid = Pid::from_raw(pid).ok_or_else(|| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let pidfd = pidfd_open(pid, PidfdFlags::empty())?;
    Ok(pidfd_getfd(pidfd, fd, PidfdGetfdFlags::empty())?)
}

/// Hand the connection `stream`, standing at `state`, to the supervisor
/// behind `to` (taken with [`take`]).
pub fn hand_over(to: &OwnedFd, stream: &TcpStream, state: ChannelState, peer: &str) -> std::io::Result<()> {
    let body = serde_json::to_vec(&HandoffBody { state, peer: peer.to_string() }).map_err(std::io::Error::other)?;
    let fds = [stream.as_fd()];
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut anc = SendAncillaryBuffer::new(&mut space);
    anc.push(SendAncillaryMessage::ScmRights(&fds));
    sendmsg(to, &[IoSlice::new(&body)], &mut anc, SendFlags::NOSIGNAL)?;
    Ok(())
}

/// Stand for the application at the other end of `handed`: our standard
/// input goes there, its output comes to our standard output and error,
/// and each signal number read from `signals` (a pipe our signal handler
/// writes) is passed on. Returns how the application ended, or why it can
/// no longer be known.
pub fn stand_for(handed: Handed, signals: Option<OwnedFd>) -> Result<Exit, String> {
    let peer = handed.peer.clone();
    let lost =
        |e: ChannelError| format!("lost the connection to the application at {peer} ({e}); it may still run there");
    prepare(&handed.stream).map_err(|e| lost(e.into()))?;
    let (tx, mut rx) = crate::channel::split(handed.stream, handed.state).map_err(|e| lost(e.into()))?;
    let tx = std::sync::Arc::new(std::sync::Mutex::new(tx));
    {
        let tx = tx.clone();
        std::thread::spawn(move || forward_input(&tx));
    }
    if let Some(signals) = signals {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut pipe = std::fs::File::from(signals);
            let mut b = [0u8; 1];
            while pipe.read_exact(&mut b).is_ok() {
                if tx.lock().expect("not poisoned").send_message(&Message::Signal(b[0] as i32)).is_err() {
                    break;
                }
            }
        });
    }
    // Our output descriptors may be closed by their reader: then what
    // comes for them is dropped (we ignore SIGPIPE, as Rust programs do).
    let mut open = [true; 3];
    loop {
        match rx.recv_message().map_err(lost)? {
            Message::Output { fd, data } => {
                let i = fd as usize;
                if open[i] {
                    // SAFETY: our own standard output or error, open for
                    // our whole life.
                    let mut f = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(fd as RawFd) });
                    open[i] = f.write_all(&data).is_ok();
                }
            }
            Message::Exited(exit) => return Ok(exit),
            other => return Err(format!("the application's node sent {other:?} on its relay")),
        }
    }
}

/// Our standard input, to the application, until it ends. A terminal is
/// read only while we are in its foreground (as the application itself
/// would, without being stopped for reading from the background).
fn forward_input(tx: &std::sync::Mutex<Sender>) {
    // SAFETY: our standard input, open for our whole life.
    let stdin = unsafe { BorrowedFd::borrow_raw(0) };
    let tty = rustix::termios::isatty(stdin);
    let mut buf = vec![0u8; 64 << 10];
    loop {
        if tty && !in_foreground(stdin) {
            std::thread::sleep(std::time::Duration::from_millis(200));
            continue;
        }
        let n = match rustix::io::read(stdin, &mut buf) {
            Ok(n) => n,
            Err(rustix::io::Errno::INTR | rustix::io::Errno::AGAIN) => {
                std::thread::sleep(std::time::Duration::from_millis(10));
                continue;
            }
            Err(_) => 0, // closed, or gone: the application sees its end
        };
        let m = if n == 0 { Message::InputEnd } else { Message::Input(buf[..n].to_vec()) };
        if tx.lock().expect("not poisoned").send_message(&m).is_err() || n == 0 {
            return;
        }
    }
}

fn in_foreground(tty: BorrowedFd<'_>) -> bool {
    match (rustix::termios::tcgetpgrp(tty), rustix::process::getpgrp()) {
        (Ok(fg), pg) => fg == pg,
        (Err(_), _) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_message_reads_back_as_itself() {
        for m in [
            Message::Input(b"abc".to_vec()),
            Message::Input(Vec::new()),
            Message::InputEnd,
            Message::Signal(15),
            Message::Output { fd: 1, data: b"out".to_vec() },
            Message::Output { fd: 2, data: vec![0; 70_000] },
            Message::Exited(Exit::Code(7)),
            Message::Exited(Exit::Signal(9)),
        ] {
            assert_eq!(Message::decode(&m.encode()).unwrap(), m);
        }
        assert!(Message::decode(b"o\x03x").is_err(), "only descriptors 1 and 2 come back");
        assert!(Message::decode(b"s12").is_err());
        assert!(Message::decode(b"").is_err());
    }

    #[test]
    fn a_connection_handed_over_goes_on_where_it_stood() {
        use crate::channel::{Channel, Role};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut ch = Channel::handshake(s, &[3; 32], Role::Server).unwrap();
            ch.send(&"before").unwrap();
            let (stream, state) = ch.into_parts();
            let (mut tx, mut rx) = crate::channel::split(stream, state).unwrap();
            tx.send_message(&Message::Output { fd: 1, data: b"after".to_vec() }).unwrap();
            assert_eq!(rx.recv_message().unwrap(), Message::Signal(15));
        });
        let mut ch = Channel::handshake(TcpStream::connect(addr).unwrap(), &[3; 32], Role::Client).unwrap();
        assert_eq!(ch.recv::<String>().unwrap(), "before");
        let (stream, state) = ch.into_parts();
        // Handed over to "another process" through the socket pair.
        let h = Handoff::new().unwrap();
        let theirs = h.theirs.try_clone().unwrap();
        hand_over(&theirs, &stream, state, "node b").unwrap();
        drop(stream);
        let handed = receive(&h.receiver().unwrap()).unwrap();
        assert_eq!(handed.peer, "node b");
        let (mut tx, mut rx) = crate::channel::split(handed.stream, handed.state).unwrap();
        assert_eq!(rx.recv_message().unwrap(), Message::Output { fd: 1, data: b"after".to_vec() });
        tx.send_message(&Message::Signal(15)).unwrap();
        server.join().unwrap();
    }
}
