//! Sockets moved to another node: established TCP connections (with
//! `TCP_REPAIR`), listening TCP sockets with their accept queue, and UDP
//! sockets with the datagrams waiting in their receive queue. This is
//! CRIU's soccr done our way: a narrow library that captures a socket's
//! state into a plain, serialisable image and rebuilds a socket from it.
//!
//! The caller (the migration tool, Linux side) takes each socket from the
//! proxy with `pidfd_getfd` and calls the capture of its kind. A move of a
//! TCP connection goes:
//!
//! 1. hold the flow's packets at the source (the freeze: the node's packet
//!    hold, see DESIGN.md), so the queues stop changing;
//! 2. [`TcpConnection::capture`]: the socket is put in repair mode and
//!    stays there, so whatever closes it later sends no FIN or RST;
//! 3. on the destination, with the service address not yet up there:
//!    [`TcpConnectionImage::restore_in_repair`] (bound with `IP_TRANSPARENT`,
//!    connected without a SYN, queues, options and window put back);
//! 4. the service address leaves the source and comes up on the
//!    destination; then [`TcpSocketInRepair::leave_repair`]: the socket
//!    goes live and sends a window probe, which the peer answers;
//! 5. [`TcpConnection::release_source`] (the source closes silently) once
//!    the destination confirmed; on any failure before that,
//!    [`TcpConnection::resume_source`] instead: the connection goes on at
//!    the source as if nothing happened.
//!
//! Two orders reset the connection (both seen on this kernel): the source
//! closing its socket out of repair mode, or while it still owns the
//! address and a peer packet arrives (RST from the source); and the
//! destination owning the address before the socket is restored (RST from
//! the destination).
//!
//! What is not moved: TCP connections in a state other than ESTABLISHED
//! (closing ones, half-open ones still in the handshake), data in the
//! out-of-order queue (never acknowledged, so the peer sends it again),
//! urgent data, and TCP_MD5SIG/TCP-AO keys.

use std::collections::HashMap;
use std::io;
use std::mem::size_of;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use rustix::event::{poll, PollFd, PollFlags};
use rustix::io::Errno;
use rustix::net::{sockopt, AddressFamily, Protocol, RecvFlags, SendFlags, SocketFlags, SocketType};
use serde::{Deserialize, Serialize};

/// The kernel's socket-repair interface. libc has the option numbers
/// (`TCP_REPAIR`, `TCP_REPAIR_QUEUE`, `TCP_QUEUE_SEQ`, ...); the values
/// they take and the structures they pass are defined here, from
/// include/uapi/linux/tcp.h, include/net/tcp.h (option kinds, RFC 9293)
/// and include/uapi/linux/sockios.h.
mod uapi {
    /// `TCP_REPAIR` values (include/uapi/linux/tcp.h).
    pub const TCP_REPAIR_ON: i32 = 1;
    /// Leaves repair mode and sends a window probe, which makes the peer
    /// answer at once with its view of the window.
    pub const TCP_REPAIR_OFF: i32 = 0;

    /// `TCP_REPAIR_QUEUE` values (include/uapi/linux/tcp.h).
    pub const TCP_NO_QUEUE: i32 = 0;
    pub const TCP_RECV_QUEUE: i32 = 1;
    pub const TCP_SEND_QUEUE: i32 = 2;

    /// Option kinds `TCP_REPAIR_OPTIONS` takes (include/net/tcp.h).
    pub const TCPOPT_MSS: u32 = 2;
    pub const TCPOPT_WINDOW: u32 = 3;
    pub const TCPOPT_SACK_PERM: u32 = 4;
    pub const TCPOPT_TIMESTAMP: u32 = 8;

    /// `tcp_info.tcpi_options` bits (include/uapi/linux/tcp.h).
    pub const TCPI_OPT_TIMESTAMPS: u8 = 1;
    pub const TCPI_OPT_SACK: u8 = 2;
    pub const TCPI_OPT_WSCALE: u8 = 4;

    /// `tcp_info.tcpi_state` values (include/net/tcp_states.h).
    pub const TCP_ESTABLISHED: u8 = 1;
    pub const TCP_LISTEN: u8 = 10;

    /// `struct tcp_repair_opt` (include/uapi/linux/tcp.h).
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default)]
    pub struct TcpRepairOpt {
        pub opt_code: u32,
        pub opt_val: u32,
    }

    /// `struct tcp_repair_window` (include/uapi/linux/tcp.h).
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default)]
    pub struct TcpRepairWindow {
        pub snd_wl1: u32,
        pub snd_wnd: u32,
        pub max_window: u32,
        pub rcv_wnd: u32,
        pub rcv_wup: u32,
    }

    /// Bytes in the receive queue not yet read (include/uapi/linux/sockios.h:
    /// `SIOCINQ` is `FIONREAD`).
    pub const SIOCINQ: libc::Ioctl = libc::FIONREAD;
    /// Bytes in the send queue, sent-unacknowledged and unsent (`SIOCOUTQ`
    /// is `TIOCOUTQ`).
    pub const SIOCOUTQ: libc::Ioctl = libc::TIOCOUTQ;
    /// Bytes in the send queue not sent yet.
    pub const SIOCOUTQNSD: libc::Ioctl = 0x894B;
}

/// What failed while capturing or restoring a socket.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// A system call on the socket failed.
    #[error("{operation} failed: {source}")]
    System {
        /// The call, with the option or the address it was given.
        operation: String,
        #[source]
        source: io::Error,
    },
    /// The descriptor is not a socket of the kind this capture handles.
    #[error("expected {expected}, found a socket of domain {domain}, type {kind}, protocol {protocol}")]
    WrongKind { expected: &'static str, domain: i32, kind: i32, protocol: i32 },
    /// The TCP socket is in a state this module does not move.
    #[error("the TCP socket is in state {state} ({}); only {expected} is moved", tcp_state_name(*state))]
    UnsupportedTcpState { state: u8, expected: &'static str },
    /// The connection's queues changed under every read: its packets were
    /// not held.
    #[error("the queues of the connection {local} -> {peer} changed during each of {attempts} reads: hold the flow's packets during the capture")]
    QueuesKeptChanging { local: SocketAddr, peer: SocketAddr, attempts: u32 },
    /// An image whose parts do not fit together.
    #[error("inconsistent socket image: {0}")]
    InvalidImage(String),
    /// Datagrams cannot be re-injected to an address that is not local.
    #[error("{address} is not an address of this network namespace: bring the service address up before restoring a UDP socket with queued datagrams")]
    AddressNotLocal { address: IpAddr },
    /// Re-injected datagrams did not all reach the restored socket.
    #[error("{arrived} of {injected} re-injected datagrams reached the restored UDP socket {local} (receive buffer too small?)")]
    DatagramsLost { local: SocketAddr, injected: usize, arrived: usize },
    /// The queued unsent bytes could not be written after leaving repair.
    #[error("{left} unsent bytes of {total} could not be queued on the restored connection within {timeout:?}")]
    UnsentDataStuck { left: usize, total: usize, timeout: Duration },
    /// A connection taken out of a listener's accept queue could not be
    /// captured. The connections already taken out are handed back (out
    /// of repair mode, live): give them to the application's next
    /// `accept`, or they are lost.
    #[error("capturing a connection taken from the accept queue of {listener}: {source} ({} connections handed back)", accepted.len())]
    AcceptQueue {
        listener: SocketAddr,
        accepted: Vec<OwnedFd>,
        #[source]
        source: Box<SocketError>,
    },
}

/// Results of this module.
pub type Result<T> = std::result::Result<T, SocketError>;

fn tcp_state_name(state: u8) -> &'static str {
    // include/net/tcp_states.h
    match state {
        1 => "ESTABLISHED",
        2 => "SYN_SENT",
        3 => "SYN_RECV",
        4 => "FIN_WAIT1",
        5 => "FIN_WAIT2",
        6 => "TIME_WAIT",
        7 => "CLOSE",
        8 => "CLOSE_WAIT",
        9 => "LAST_ACK",
        10 => "LISTEN",
        11 => "CLOSING",
        12 => "NEW_SYN_RECV",
        _ => "unknown",
    }
}

/// The error of a failed call, from `errno`.
fn last_error(operation: impl Into<String>) -> SocketError {
    SocketError::System { operation: operation.into(), source: io::Error::last_os_error() }
}

/// Names what a failed rustix call was doing.
trait Context<T> {
    fn context(self, operation: impl FnOnce() -> String) -> Result<T>;
}

impl<T> Context<T> for std::result::Result<T, Errno> {
    fn context(self, operation: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|errno| SocketError::System { operation: operation(), source: errno.into() })
    }
}

// ---------------------------------------------------------------------------
// Socket options and ioctls the typed wrappers of rustix do not have.

/// Values the kernel reads and writes as socket options and ioctl results:
/// integers and `repr(C)` structures of integers.
///
/// # Safety
/// Every bit pattern, all zeros included, must be a valid value of the type.
unsafe trait KernelValue: Copy {}
// SAFETY: any bit pattern is a valid integer.
unsafe impl KernelValue for i32 {}
// SAFETY: any bit pattern is a valid integer.
unsafe impl KernelValue for u32 {}
// SAFETY: a repr(C) structure of u32 only.
unsafe impl KernelValue for uapi::TcpRepairOpt {}
// SAFETY: a repr(C) structure of u32 only.
unsafe impl KernelValue for uapi::TcpRepairWindow {}
// SAFETY: a repr(C) structure of u8, u32 and u64 only.
unsafe impl KernelValue for libc::tcp_info {}

fn get_option<T: KernelValue>(socket: BorrowedFd<'_>, level: i32, name: i32, what: &str) -> Result<T> {
    // SAFETY: T is a KernelValue, for which all zeros is a valid value.
    let mut value: T = unsafe { std::mem::zeroed() };
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: value and len live across the call and value has room for
    // len bytes; the kernel writes at most len bytes and any bytes are a
    // valid T (KernelValue).
    let rc = unsafe { libc::getsockopt(socket.as_raw_fd(), level, name, (&raw mut value).cast(), &mut len) };
    if rc != 0 {
        return Err(last_error(format!("getsockopt({what})")));
    }
    Ok(value)
}

fn set_option_values<T: KernelValue>(
    socket: BorrowedFd<'_>,
    level: i32,
    name: i32,
    values: &[T],
    what: &str,
) -> Result<()> {
    let len = std::mem::size_of_val(values) as libc::socklen_t;
    // SAFETY: values is a live slice of len bytes, only read by the kernel.
    let rc = unsafe { libc::setsockopt(socket.as_raw_fd(), level, name, values.as_ptr().cast(), len) };
    if rc != 0 {
        return Err(last_error(format!("setsockopt({what})")));
    }
    Ok(())
}

fn set_option<T: KernelValue>(socket: BorrowedFd<'_>, level: i32, name: i32, value: T, what: &str) -> Result<()> {
    set_option_values(socket, level, name, std::slice::from_ref(&value), what)
}

/// An ioctl that answers one `int` (`SIOCINQ`, `SIOCOUTQ`, `SIOCOUTQNSD`).
fn ioctl_int(socket: BorrowedFd<'_>, request: libc::Ioctl, what: &str) -> Result<u32> {
    let mut value: libc::c_int = 0;
    // SAFETY: these requests write one int to the pointer given, which
    // points to a live c_int.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), request, &raw mut value) };
    if rc != 0 {
        return Err(last_error(format!("ioctl({what})")));
    }
    Ok(value as u32)
}

fn tcp_info(socket: BorrowedFd<'_>) -> Result<libc::tcp_info> {
    get_option(socket, libc::IPPROTO_TCP, libc::TCP_INFO, "TCP_INFO")
}

fn set_repair(socket: BorrowedFd<'_>, value: i32) -> Result<()> {
    set_option(socket, libc::IPPROTO_TCP, libc::TCP_REPAIR, value, &format!("TCP_REPAIR={value}"))
}

fn select_repair_queue(socket: BorrowedFd<'_>, queue: i32) -> Result<()> {
    set_option(socket, libc::IPPROTO_TCP, libc::TCP_REPAIR_QUEUE, queue, &format!("TCP_REPAIR_QUEUE={queue}"))
}

/// The sequence number of the selected queue: for the send queue the one
/// after its last byte (`write_seq`), for the receive queue the next one
/// expected (`rcv_nxt`).
fn queue_seq(socket: BorrowedFd<'_>, queue: i32) -> Result<u32> {
    select_repair_queue(socket, queue)?;
    get_option(socket, libc::IPPROTO_TCP, libc::TCP_QUEUE_SEQ, "TCP_QUEUE_SEQ")
}

fn set_queue_seq(socket: BorrowedFd<'_>, queue: i32, seq: u32) -> Result<()> {
    select_repair_queue(socket, queue)?;
    set_option(socket, libc::IPPROTO_TCP, libc::TCP_QUEUE_SEQ, seq, &format!("TCP_QUEUE_SEQ={seq}"))
}

fn flag(socket: BorrowedFd<'_>, level: i32, name: i32, what: &str) -> Result<bool> {
    Ok(get_option::<i32>(socket, level, name, what)? != 0)
}

fn set_flag(socket: BorrowedFd<'_>, level: i32, name: i32, on: bool, what: &str) -> Result<()> {
    set_option(socket, level, name, i32::from(on), &format!("{what}={}", u8::from(on)))
}

// ---------------------------------------------------------------------------
// Addresses and socket kinds.

/// The family of a socket and of the addresses it takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    fn of(address: &SocketAddr) -> Self {
        match address {
            SocketAddr::V4(_) => IpFamily::V4,
            SocketAddr::V6(_) => IpFamily::V6,
        }
    }

    fn address_family(self) -> AddressFamily {
        match self {
            IpFamily::V4 => AddressFamily::INET,
            IpFamily::V6 => AddressFamily::INET6,
        }
    }
}

/// Checks that `socket` is of `kind` over IPv4 or IPv6 and answers which.
fn expect_socket(socket: BorrowedFd<'_>, kind: SocketType, protocol: i32, expected: &'static str) -> Result<IpFamily> {
    let domain = get_option::<i32>(socket, libc::SOL_SOCKET, libc::SO_DOMAIN, "SO_DOMAIN")?;
    let found_kind = get_option::<i32>(socket, libc::SOL_SOCKET, libc::SO_TYPE, "SO_TYPE")?;
    let found_protocol = get_option::<i32>(socket, libc::SOL_SOCKET, libc::SO_PROTOCOL, "SO_PROTOCOL")?;
    let family = match domain {
        libc::AF_INET => Some(IpFamily::V4),
        libc::AF_INET6 => Some(IpFamily::V6),
        _ => None,
    };
    match family {
        Some(family) if found_kind as u32 == kind.as_raw() && found_protocol == protocol => Ok(family),
        _ => Err(SocketError::WrongKind { expected, domain, kind: found_kind, protocol: found_protocol }),
    }
}

fn local_address(socket: BorrowedFd<'_>) -> Result<SocketAddr> {
    let address = rustix::net::getsockname(socket).context(|| "getsockname".into())?;
    SocketAddr::try_from(address).context(|| "getsockname: not an IP address".into())
}

/// The peer's address, or `None` for a socket not connected.
fn peer_address(socket: BorrowedFd<'_>) -> Result<Option<SocketAddr>> {
    match rustix::net::getpeername(socket) {
        Ok(Some(address)) => {
            SocketAddr::try_from(address).map(Some).context(|| "getpeername: not an IP address".into())
        }
        Ok(None) | Err(Errno::NOTCONN) => Ok(None),
        Err(errno) => Err(errno).context(|| "getpeername".into()),
    }
}

fn new_socket(family: IpFamily, kind: SocketType, protocol: Protocol) -> Result<OwnedFd> {
    rustix::net::socket_with(family.address_family(), kind, SocketFlags::CLOEXEC, Some(protocol))
        .context(|| format!("socket({family:?}, {kind:?})"))
}

/// What lets a socket use an address that is not (yet) one of this
/// namespace's: the service address comes up on the destination only
/// after its sockets are restored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NonLocalAddress {
    /// `IP_FREEBIND`: enough to bind and listen.
    FreeBind,
    /// `IP_TRANSPARENT` (CAP_NET_ADMIN): also to connect from it, since
    /// the route lookup of `connect` refuses a source address that is not
    /// local unless the socket is transparent (ENETUNREACH).
    Transparent,
}

impl NonLocalAddress {
    fn set(self, socket: BorrowedFd<'_>, family: IpFamily, on: bool) -> Result<()> {
        let (level, name, what) = match (self, family) {
            (NonLocalAddress::FreeBind, IpFamily::V4) => (libc::SOL_IP, libc::IP_FREEBIND, "IP_FREEBIND"),
            (NonLocalAddress::FreeBind, IpFamily::V6) => (libc::SOL_IPV6, libc::IPV6_FREEBIND, "IPV6_FREEBIND"),
            (NonLocalAddress::Transparent, IpFamily::V4) => (libc::SOL_IP, libc::IP_TRANSPARENT, "IP_TRANSPARENT"),
            (NonLocalAddress::Transparent, IpFamily::V6) => {
                (libc::SOL_IPV6, libc::IPV6_TRANSPARENT, "IPV6_TRANSPARENT")
            }
        };
        set_flag(socket, level, name, on, what)
    }
}

/// Binds `socket` to `address`, with `non_local` turned on if the address
/// is not up here; answers whether it was.
fn bind_maybe_non_local(socket: BorrowedFd<'_>, address: &SocketAddr, non_local: NonLocalAddress) -> Result<bool> {
    match rustix::net::bind(socket, address) {
        Ok(()) => Ok(false),
        Err(Errno::ADDRNOTAVAIL) => {
            non_local.set(socket, IpFamily::of(address), true)?;
            rustix::net::bind(socket, address).context(|| format!("bind({address}) with {non_local:?}"))?;
            Ok(true)
        }
        Err(errno) => Err(errno).context(|| format!("bind({address})")),
    }
}

/// Binds with `SO_REUSEADDR` on (the source's socket may still hold the
/// port on this node, or connections restored before it), then gives the
/// socket back the application's own setting; answers whether `non_local`
/// was needed.
fn bind_reusing(
    socket: BorrowedFd<'_>,
    address: &SocketAddr,
    application_reuse: bool,
    non_local: NonLocalAddress,
) -> Result<bool> {
    sockopt::set_socket_reuseaddr(socket, true).context(|| "setsockopt(SO_REUSEADDR=1)".into())?;
    let used_non_local = bind_maybe_non_local(socket, address, non_local)?;
    if !application_reuse {
        sockopt::set_socket_reuseaddr(socket, false).context(|| "setsockopt(SO_REUSEADDR=0)".into())?;
    }
    Ok(used_non_local)
}

/// Socket buffer sizes as `getsockopt` reports them (twice what
/// `setsockopt` is given: the kernel's bookkeeping share included).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BufferSizes {
    pub send: usize,
    pub receive: usize,
}

impl BufferSizes {
    fn capture(socket: BorrowedFd<'_>) -> Result<Self> {
        Ok(BufferSizes {
            send: sockopt::socket_send_buffer_size(socket).context(|| "getsockopt(SO_SNDBUF)".into())?,
            receive: sockopt::socket_recv_buffer_size(socket).context(|| "getsockopt(SO_RCVBUF)".into())?,
        })
    }

    /// Sets the sizes with the `FORCE` variants (root: beyond
    /// `net.core.[rw]mem_max`), falling back to the plain ones. Setting
    /// them fixes them (no autotuning), as CRIU does: the restored queues
    /// must fit, and a size the application had set must stay.
    fn restore(&self, socket: BorrowedFd<'_>) -> Result<()> {
        let send = self.send / 2;
        let receive = self.receive / 2;
        if sockopt::set_socket_send_buffer_size_force(socket, send).is_err() {
            sockopt::set_socket_send_buffer_size(socket, send).context(|| format!("setsockopt(SO_SNDBUF={send})"))?;
        }
        if sockopt::set_socket_recv_buffer_size_force(socket, receive).is_err() {
            sockopt::set_socket_recv_buffer_size(socket, receive)
                .context(|| format!("setsockopt(SO_RCVBUF={receive})"))?;
        }
        Ok(())
    }
}

/// `IPV6_V6ONLY` of an IPv6 socket, `None` for IPv4.
fn capture_v6_only(socket: BorrowedFd<'_>, family: IpFamily) -> Result<Option<bool>> {
    match family {
        IpFamily::V4 => Ok(None),
        IpFamily::V6 => sockopt::ipv6_v6only(socket).map(Some).context(|| "getsockopt(IPV6_V6ONLY)".into()),
    }
}

fn restore_v6_only(socket: BorrowedFd<'_>, v6_only: Option<bool>) -> Result<()> {
    match v6_only {
        Some(on) => {
            sockopt::set_ipv6_v6only(socket, on).context(|| format!("setsockopt(IPV6_V6ONLY={})", u8::from(on)))
        }
        None => Ok(()),
    }
}

// ---------------------------------------------------------------------------
// TCP: established connections.

/// The operations on the socket of a live TCP connection: capture its
/// state, then let the source go or take it back. The state itself moves
/// as a [`TcpConnectionImage`].
pub enum TcpConnection {}

/// Everything needed to rebuild an established TCP connection elsewhere.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpConnectionImage {
    pub local: SocketAddr,
    pub peer: SocketAddr,
    pub send_queue: TcpSendQueue,
    pub receive_queue: TcpReceiveQueue,
    pub options: TcpNegotiatedOptions,
    pub window: TcpWindow,
    /// The connection's TCP timestamp clock (`TCP_TIMESTAMP`), so the
    /// timestamps the peer sees keep growing.
    pub timestamp: u32,
    pub settings: TcpSettings,
}

/// The send queue: bytes written by the application and not yet
/// acknowledged by the peer, the sent ones first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpSendQueue {
    /// Sequence number of the first byte (the oldest unacknowledged one).
    pub start_seq: u32,
    pub data: Vec<u8>,
    /// How many bytes at the end of `data` were never sent.
    pub unsent: u32,
}

impl TcpSendQueue {
    fn sent(&self) -> &[u8] {
        &self.data[..self.data.len() - self.unsent as usize]
    }

    fn unsent(&self) -> &[u8] {
        &self.data[self.data.len() - self.unsent as usize..]
    }
}

/// The receive queue: bytes acknowledged to the peer and not yet read by
/// the application.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpReceiveQueue {
    /// Sequence number of the first byte (the next one the application
    /// reads).
    pub start_seq: u32,
    pub data: Vec<u8>,
}

/// What the two ends agreed in the handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpNegotiatedOptions {
    /// The maximum segment size the peer accepts (`TCP_MAXSEG` in repair
    /// mode answers the clamp, not the current segment size).
    pub mss: u32,
    /// `None` when window scaling was not agreed.
    pub window_scale: Option<TcpWindowScale>,
    pub sack: bool,
    pub timestamps: bool,
}

/// Window scale shifts, as `tcpi_snd_wscale` and `tcpi_rcv_wscale`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpWindowScale {
    /// The peer's shift (applies to windows it advertises).
    pub send: u8,
    /// Our shift (applies to windows we advertise).
    pub receive: u8,
}

/// Window state (`struct tcp_repair_window`), named as the kernel does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpWindow {
    /// Sequence number of the segment that last updated the send window.
    pub snd_wl1: u32,
    /// The peer's receive window.
    pub snd_wnd: u32,
    /// The largest window the peer ever advertised.
    pub max_window: u32,
    /// Our receive window as last advertised.
    pub rcv_wnd: u32,
    /// `rcv_nxt` when that window was advertised.
    pub rcv_wup: u32,
}

impl From<uapi::TcpRepairWindow> for TcpWindow {
    fn from(w: uapi::TcpRepairWindow) -> Self {
        TcpWindow {
            snd_wl1: w.snd_wl1,
            snd_wnd: w.snd_wnd,
            max_window: w.max_window,
            rcv_wnd: w.rcv_wnd,
            rcv_wup: w.rcv_wup,
        }
    }
}

impl From<TcpWindow> for uapi::TcpRepairWindow {
    fn from(w: TcpWindow) -> Self {
        uapi::TcpRepairWindow {
            snd_wl1: w.snd_wl1,
            snd_wnd: w.snd_wnd,
            max_window: w.max_window,
            rcv_wnd: w.rcv_wnd,
            rcv_wup: w.rcv_wup,
        }
    }
}

/// Socket options of a TCP socket worth keeping. `O_NONBLOCK` belongs to
/// the open file, not the socket: the fd module keeps it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpSettings {
    pub no_delay: bool,
    pub keepalive: bool,
    /// `TCP_KEEPIDLE`, `TCP_KEEPINTVL`, `TCP_KEEPCNT` (kept even when
    /// keepalive is off: the application may turn it on later).
    pub keepalive_idle_secs: u32,
    pub keepalive_interval_secs: u32,
    pub keepalive_count: u32,
    pub buffers: BufferSizes,
    pub v6_only: Option<bool>,
    /// `SO_REUSEADDR` (an accepted connection has its listener's). Leaving
    /// repair mode turns it off (the kernel's `SK_NO_REUSE`): it is set
    /// again after, or the connection's TIME_WAIT would keep a restarted
    /// server from binding its port. Absent in older images: off.
    #[serde(default)]
    pub reuse_address: bool,
}

impl TcpSettings {
    fn capture(socket: BorrowedFd<'_>, family: IpFamily) -> Result<Self> {
        Ok(TcpSettings {
            no_delay: sockopt::tcp_nodelay(socket).context(|| "getsockopt(TCP_NODELAY)".into())?,
            keepalive: sockopt::socket_keepalive(socket).context(|| "getsockopt(SO_KEEPALIVE)".into())?,
            keepalive_idle_secs: sockopt::tcp_keepidle(socket).context(|| "getsockopt(TCP_KEEPIDLE)".into())?.as_secs()
                as u32,
            keepalive_interval_secs: sockopt::tcp_keepintvl(socket)
                .context(|| "getsockopt(TCP_KEEPINTVL)".into())?
                .as_secs() as u32,
            keepalive_count: sockopt::tcp_keepcnt(socket).context(|| "getsockopt(TCP_KEEPCNT)".into())?,
            buffers: BufferSizes::capture(socket)?,
            v6_only: capture_v6_only(socket, family)?,
            // Read before repair mode (set by the caller): in it the kernel
            // reports its own forced reuse.
            reuse_address: false,
        })
    }

    /// Everything but the buffer sizes and `IPV6_V6ONLY`, which must be set
    /// before the queues are written and before `bind`.
    fn restore_behaviour(&self, socket: BorrowedFd<'_>) -> Result<()> {
        sockopt::set_tcp_nodelay(socket, self.no_delay)
            .context(|| format!("setsockopt(TCP_NODELAY={})", u8::from(self.no_delay)))?;
        sockopt::set_tcp_keepidle(socket, Duration::from_secs(self.keepalive_idle_secs.into()))
            .context(|| format!("setsockopt(TCP_KEEPIDLE={})", self.keepalive_idle_secs))?;
        sockopt::set_tcp_keepintvl(socket, Duration::from_secs(self.keepalive_interval_secs.into()))
            .context(|| format!("setsockopt(TCP_KEEPINTVL={})", self.keepalive_interval_secs))?;
        sockopt::set_tcp_keepcnt(socket, self.keepalive_count)
            .context(|| format!("setsockopt(TCP_KEEPCNT={})", self.keepalive_count))?;
        sockopt::set_socket_keepalive(socket, self.keepalive)
            .context(|| format!("setsockopt(SO_KEEPALIVE={})", u8::from(self.keepalive)))
    }
}

/// The largest value `TCP_MAXSEG` takes (`MAX_TCP_WINDOW`, include/net/tcp.h).
const MAX_TCP_WINDOW: u32 = 32767;

/// How often the queues are read again when they changed during a read.
const QUEUE_READ_ATTEMPTS: u32 = 8;

/// The counters that say whether the queues changed while they were read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct QueueCounters {
    /// `write_seq`: after the last byte of the send queue.
    send_end_seq: u32,
    send_len: u32,
    unsent_len: u32,
    /// `rcv_nxt`: after the last byte of the receive queue.
    receive_end_seq: u32,
    receive_len: u32,
}

impl QueueCounters {
    fn read(socket: BorrowedFd<'_>) -> Result<Self> {
        // The receive side first: the send queue stays selected after.
        let receive_end_seq = queue_seq(socket, uapi::TCP_RECV_QUEUE)?;
        let receive_len = ioctl_int(socket, uapi::SIOCINQ, "SIOCINQ")?;
        Ok(QueueCounters {
            send_end_seq: queue_seq(socket, uapi::TCP_SEND_QUEUE)?,
            send_len: ioctl_int(socket, uapi::SIOCOUTQ, "SIOCOUTQ")?,
            unsent_len: ioctl_int(socket, uapi::SIOCOUTQNSD, "SIOCOUTQNSD")?,
            receive_end_seq,
            receive_len,
        })
    }
}

/// Reads a whole queue of a socket in repair mode without taking it out
/// (`MSG_PEEK` with the queue selected). One byte of room more than
/// `expected` shows whether the queue grew since it was counted.
fn peek_queue(socket: BorrowedFd<'_>, queue: i32, expected: u32) -> Result<Vec<u8>> {
    select_repair_queue(socket, queue)?;
    if expected == 0 {
        return Ok(Vec::new());
    }
    let mut data = vec![0u8; expected as usize + 1];
    let (read, _) = rustix::net::recv(socket, &mut data[..], RecvFlags::PEEK | RecvFlags::DONTWAIT)
        .context(|| format!("recv(MSG_PEEK) of repair queue {queue}"))?;
    data.truncate(read);
    Ok(data)
}

impl TcpConnection {
    /// Captures an ESTABLISHED TCP connection (IPv4 or IPv6). The socket is
    /// left in repair mode with its send queue selected: it sends nothing
    /// new (bytes it would send count as sent, and a rollback sends them at
    /// the retransmission timeout) until
    /// [`TcpConnection::resume_source`], and whatever closes it (for
    /// example [`TcpConnection::release_source`]) sends no FIN or RST. If
    /// the capture fails, the socket is taken out of repair mode again.
    ///
    /// The flow's packets should be held while this runs (the freeze):
    /// incoming data and acknowledgements change the queues; the capture
    /// reads them again when they changed, a few times, then gives up.
    pub fn capture(socket: BorrowedFd<'_>) -> Result<TcpConnectionImage> {
        let family = expect_socket(socket, SocketType::STREAM, libc::IPPROTO_TCP, "a TCP socket over IPv4 or IPv6")?;
        // Checked before repair mode: a socket that is not established
        // must not be touched at all.
        let state = tcp_info(socket)?.tcpi_state;
        if state != uapi::TCP_ESTABLISHED {
            return Err(SocketError::UnsupportedTcpState { state, expected: "ESTABLISHED" });
        }
        let reuse_address = sockopt::socket_reuseaddr(socket).context(|| "getsockopt(SO_REUSEADDR)".into())?;
        set_repair(socket, uapi::TCP_REPAIR_ON)?;
        // In repair mode the socket still transmits (a pacing timer, an
        // incoming ACK) unless the send queue is selected: then the kernel
        // marks what it would send as sent without sending it. The peer
        // must never see a byte past the captured `snd_nxt`: the restored
        // socket drops every packet acknowledging more as acknowledging
        // unsent data, and the connection stalls.
        let captured =
            select_repair_queue(socket, uapi::TCP_SEND_QUEUE).and_then(|()| capture_in_repair(socket, family));
        match captured {
            Ok(mut image) => {
                image.settings.reuse_address = reuse_address;
                Ok(image)
            }
            Err(error) => {
                // Back as it was; the capture's error is the one to report.
                let _ = Self::resume_source(socket, reuse_address);
                Err(error)
            }
        }
    }

    /// Lets the source's connection go: puts the socket in repair mode (if
    /// it is not already), disconnects it without FIN or RST (it is in no
    /// lookup table any more, though the proxy's own descriptor stays open
    /// until the application's proxy exits) and closes this descriptor.
    pub fn release_source(socket: OwnedFd) -> Result<()> {
        set_repair(socket.as_fd(), uapi::TCP_REPAIR_ON)?;
        // Disconnected now (in repair mode: without a reset), not when the
        // proxy's descriptor closes too: until then the socket would still
        // be found for the peer's packets, and where they still come (a
        // single-IP cluster: every node gets them) it would answer with
        // its own timestamps, ahead of the destination's, and the peer
        // would drop the destination's next segments as old (PAWS).
        rustix::net::connect_unspec(socket.as_fd()).context(|| "connect(AF_UNSPEC) in repair mode".into())?;
        drop(socket);
        Ok(())
    }

    /// Takes the source's connection back (the rollback): out of repair
    /// mode, with a window probe that makes the peer answer at once, and
    /// its `SO_REUSEADDR` (`reuse_address`, as captured) again.
    pub fn resume_source(socket: BorrowedFd<'_>, reuse_address: bool) -> Result<()> {
        select_repair_queue(socket, uapi::TCP_NO_QUEUE)?;
        set_repair(socket, uapi::TCP_REPAIR_OFF)?;
        sockopt::set_socket_reuseaddr(socket, reuse_address)
            .context(|| format!("setsockopt(SO_REUSEADDR={})", u8::from(reuse_address)))
    }
}

fn capture_in_repair(socket: BorrowedFd<'_>, family: IpFamily) -> Result<TcpConnectionImage> {
    let info = tcp_info(socket)?;
    let local = local_address(socket)?;
    let peer = peer_address(socket)?.ok_or_else(|| SocketError::System {
        operation: "getpeername".into(),
        source: io::Error::from(io::ErrorKind::NotConnected),
    })?;
    // Bit fields `tcpi_snd_wscale : 4, tcpi_rcv_wscale : 4`: the first is
    // the low nibble on x86-64 (little endian).
    let window_scale = (info.tcpi_options & uapi::TCPI_OPT_WSCALE != 0)
        .then_some(TcpWindowScale { send: info.tcpi_snd_rcv_wscale & 0x0f, receive: info.tcpi_snd_rcv_wscale >> 4 });
    let options = TcpNegotiatedOptions {
        mss: get_option(socket, libc::IPPROTO_TCP, libc::TCP_MAXSEG, "TCP_MAXSEG")?,
        window_scale,
        sack: info.tcpi_options & uapi::TCPI_OPT_SACK != 0,
        timestamps: info.tcpi_options & uapi::TCPI_OPT_TIMESTAMPS != 0,
    };

    let mut attempt = 0;
    let (counters, send_data, receive_data, window) = loop {
        attempt += 1;
        let before = QueueCounters::read(socket)?;
        let receive_data = peek_queue(socket, uapi::TCP_RECV_QUEUE, before.receive_len)?;
        let send_data = peek_queue(socket, uapi::TCP_SEND_QUEUE, before.send_len)?;
        let window: uapi::TcpRepairWindow =
            get_option(socket, libc::IPPROTO_TCP, libc::TCP_REPAIR_WINDOW, "TCP_REPAIR_WINDOW")?;
        let after = QueueCounters::read(socket)?;
        if before == after
            && send_data.len() == before.send_len as usize
            && receive_data.len() == before.receive_len as usize
            && before.unsent_len <= before.send_len
        {
            break (before, send_data, receive_data, window);
        }
        if attempt == QUEUE_READ_ATTEMPTS {
            return Err(SocketError::QueuesKeptChanging { local, peer, attempts: attempt });
        }
    };

    Ok(TcpConnectionImage {
        local,
        peer,
        send_queue: TcpSendQueue {
            start_seq: counters.send_end_seq.wrapping_sub(counters.send_len),
            data: send_data,
            unsent: counters.unsent_len,
        },
        receive_queue: TcpReceiveQueue {
            start_seq: counters.receive_end_seq.wrapping_sub(counters.receive_len),
            data: receive_data,
        },
        options,
        window: window.into(),
        timestamp: get_option(socket, libc::IPPROTO_TCP, libc::TCP_TIMESTAMP, "TCP_TIMESTAMP")?,
        settings: TcpSettings::capture(socket, family)?,
    })
}

/// A restored TCP connection still in repair mode: bound, connected, its
/// queues and window back, but silent. Bring the service address up on
/// this node, then [`TcpSocketInRepair::leave_repair`].
#[derive(Debug)]
pub struct TcpSocketInRepair {
    socket: OwnedFd,
    /// Bytes the application had written that were never sent: written
    /// after repair mode ends, as fresh data (written in repair mode they
    /// would count as sent, and go out only at the retransmission timeout).
    unsent: Vec<u8>,
    /// `SO_REUSEADDR` once live (leaving repair mode turns it off).
    reuse_address: bool,
    /// `IP_TRANSPARENT` was turned on to connect from an address not up
    /// here: turned off again once the connection is live.
    transparent: bool,
}

impl AsFd for TcpSocketInRepair {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

/// How long the restored connection's unsent bytes may wait for room in
/// its send buffer (they fitted at the source, so they should at once).
const UNSENT_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

impl TcpSocketInRepair {
    /// Ends repair mode: the connection is live, sends a window probe the
    /// peer answers, and the bytes the source had not sent yet are queued.
    pub fn leave_repair(self) -> Result<OwnedFd> {
        let socket = self.socket.as_fd();
        set_repair(socket, uapi::TCP_REPAIR_OFF)?;
        sockopt::set_socket_reuseaddr(socket, self.reuse_address)
            .context(|| format!("setsockopt(SO_REUSEADDR={})", u8::from(self.reuse_address)))?;
        write_all_within(socket, &self.unsent, UNSENT_WRITE_TIMEOUT)?;
        if self.transparent {
            let family = IpFamily::of(&local_address(socket)?);
            NonLocalAddress::Transparent.set(socket, family, false)?;
        }
        Ok(self.socket)
    }
}

/// Writes `data` to a live socket without blocking past `timeout`.
fn write_all_within(socket: BorrowedFd<'_>, data: &[u8], timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut written = 0;
    while written < data.len() {
        match rustix::net::send(socket, &data[written..], SendFlags::DONTWAIT | SendFlags::NOSIGNAL) {
            Ok(n) => written += n,
            Err(Errno::AGAIN) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(SocketError::UnsentDataStuck {
                        left: data.len() - written,
                        total: data.len(),
                        timeout,
                    });
                }
                let wait = rustix::event::Timespec::try_from(left)
                    .unwrap_or(rustix::event::Timespec { tv_sec: 1, tv_nsec: 0 });
                let mut fds = [PollFd::new(&socket, PollFlags::OUT)];
                poll(&mut fds, Some(&wait)).context(|| "poll(POLLOUT)".into())?;
            }
            Err(Errno::INTR) => {}
            Err(errno) => return Err(errno).context(|| format!("send of {} unsent bytes", data.len())),
        }
    }
    Ok(())
}

/// The largest piece of a queue written at once; halved while the kernel
/// answers ENOMEM (a receive-queue write is one buffer of that size).
const QUEUE_WRITE_CHUNK: usize = 1 << 20;
const QUEUE_WRITE_MIN_CHUNK: usize = 4096;

/// Writes bytes into a queue of a socket in repair mode: to the receive
/// queue as if they had arrived, to the send queue as sent and awaiting
/// acknowledgement.
fn write_repair_queue(socket: BorrowedFd<'_>, queue: i32, data: &[u8]) -> Result<()> {
    if data.is_empty() {
        return Ok(());
    }
    select_repair_queue(socket, queue)?;
    let mut chunk = QUEUE_WRITE_CHUNK;
    let mut written = 0;
    while written < data.len() {
        let end = data.len().min(written + chunk);
        match rustix::net::send(socket, &data[written..end], SendFlags::DONTWAIT | SendFlags::NOSIGNAL) {
            Ok(0) => {
                return Err(SocketError::System {
                    operation: format!("send to repair queue {queue}"),
                    source: io::Error::from(io::ErrorKind::WriteZero),
                })
            }
            Ok(n) => written += n,
            Err(Errno::NOMEM) if chunk > QUEUE_WRITE_MIN_CHUNK => chunk /= 2,
            Err(Errno::INTR) => {}
            Err(errno) => {
                return Err(errno)
                    .context(|| format!("send to repair queue {queue} ({written} of {} bytes written)", data.len()))
            }
        }
    }
    Ok(())
}

impl TcpConnectionImage {
    /// Rebuilds the connection in this network namespace and makes it live
    /// at once. Use [`TcpConnectionImage::restore_in_repair`] instead when
    /// the service address is to come up between the two.
    pub fn restore(&self) -> Result<OwnedFd> {
        self.restore_in_repair()?.leave_repair()
    }

    /// Rebuilds the connection and leaves it in repair mode (silent): bound
    /// to its local address (with `IP_TRANSPARENT`, turned off again by
    /// [`TcpSocketInRepair::leave_repair`], if that address is not up
    /// here yet), connected to its peer without a SYN, with its sequence
    /// numbers, queues, negotiated options, window and timestamp clock.
    pub fn restore_in_repair(&self) -> Result<TcpSocketInRepair> {
        if self.send_queue.unsent as usize > self.send_queue.data.len() {
            return Err(SocketError::InvalidImage(format!(
                "{} unsent bytes in a send queue of {}",
                self.send_queue.unsent,
                self.send_queue.data.len()
            )));
        }
        if IpFamily::of(&self.local) != IpFamily::of(&self.peer) {
            return Err(SocketError::InvalidImage(format!(
                "local address {} and peer {} are of different families",
                self.local, self.peer
            )));
        }
        let socket = new_socket(IpFamily::of(&self.local), SocketType::STREAM, rustix::net::ipproto::TCP)?;
        let fd = socket.as_fd();
        set_repair(fd, uapi::TCP_REPAIR_ON)?;
        // Before the queues: they must fit.
        self.settings.buffers.restore(fd)?;
        restore_v6_only(fd, self.settings.v6_only)?;
        // Sequence numbers are set while the socket is closed (before
        // connect), to the start of each queue: writing the queues moves
        // them to where the source's ended.
        set_queue_seq(fd, uapi::TCP_RECV_QUEUE, self.receive_queue.start_seq)?;
        set_queue_seq(fd, uapi::TCP_SEND_QUEUE, self.send_queue.start_seq)?;
        select_repair_queue(fd, uapi::TCP_NO_QUEUE)?;
        // No SO_REUSEADDR here: repair mode already lets the socket share
        // its port with the restored listener and other connections
        // (SK_FORCE_REUSE), and SO_REUSEADDR would replace that by the
        // weaker SK_CAN_REUSE.
        let transparent = bind_maybe_non_local(fd, &self.local, NonLocalAddress::Transparent)?;
        // The segment size is computed at connect from the MSS clamp, which
        // TCP_REPAIR_OPTIONS sets only after it: without this the
        // connection would send 536-byte segments (less options).
        // TCP_MAXSEG takes at most MAX_TCP_WINDOW (include/net/tcp.h);
        // only loopback's MSS is larger.
        let segment_limit = self.options.mss.min(MAX_TCP_WINDOW);
        set_option(fd, libc::IPPROTO_TCP, libc::TCP_MAXSEG, segment_limit, &format!("TCP_MAXSEG={segment_limit}"))?;
        // In repair mode connect sends no SYN: the socket is ESTABLISHED.
        rustix::net::connect(fd, &self.peer).context(|| format!("connect({}) in repair mode", self.peer))?;
        // Options must be set before the first byte of the send queue.
        self.restore_negotiated_options(fd)?;
        set_option(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_TIMESTAMP,
            self.timestamp,
            &format!("TCP_TIMESTAMP={}", self.timestamp),
        )?;
        write_repair_queue(fd, uapi::TCP_RECV_QUEUE, &self.receive_queue.data)?;
        write_repair_queue(fd, uapi::TCP_SEND_QUEUE, self.send_queue.sent())?;
        select_repair_queue(fd, uapi::TCP_NO_QUEUE)?;
        // After the receive queue: the kernel checks the window against
        // rcv_nxt, which the queue moved.
        set_option(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_REPAIR_WINDOW,
            uapi::TcpRepairWindow::from(self.window),
            "TCP_REPAIR_WINDOW",
        )?;
        self.settings.restore_behaviour(fd)?;
        Ok(TcpSocketInRepair {
            socket,
            unsent: self.send_queue.unsent().to_vec(),
            reuse_address: self.settings.reuse_address,
            transparent,
        })
    }

    fn restore_negotiated_options(&self, socket: BorrowedFd<'_>) -> Result<()> {
        let options = &self.options;
        let mut repair = vec![uapi::TcpRepairOpt { opt_code: uapi::TCPOPT_MSS, opt_val: options.mss }];
        if let Some(scale) = options.window_scale {
            repair.push(uapi::TcpRepairOpt {
                opt_code: uapi::TCPOPT_WINDOW,
                opt_val: u32::from(scale.send) | u32::from(scale.receive) << 16,
            });
        }
        if options.sack {
            repair.push(uapi::TcpRepairOpt { opt_code: uapi::TCPOPT_SACK_PERM, opt_val: 0 });
        }
        if options.timestamps {
            repair.push(uapi::TcpRepairOpt { opt_code: uapi::TCPOPT_TIMESTAMP, opt_val: 0 });
        }
        set_option_values(
            socket,
            libc::IPPROTO_TCP,
            libc::TCP_REPAIR_OPTIONS,
            &repair,
            &format!("TCP_REPAIR_OPTIONS {options:?}"),
        )
    }
}

// ---------------------------------------------------------------------------
// TCP: listening sockets.

/// A listening TCP socket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpListenerImage {
    pub local: SocketAddr,
    /// The backlog given to `listen` (the kernel's `sk_max_ack_backlog`).
    pub backlog: u32,
    pub reuse_address: bool,
    pub reuse_port: bool,
    /// Options accepted connections inherit.
    pub settings: TcpSettings,
}

/// How [`UdpSocketImage::restore_bound`] bound a socket, for
/// [`UdpSocketImage::finish`].
#[derive(Clone, Copy, Debug)]
pub struct UdpBound {
    transparent: bool,
}

/// A captured listener and the connections taken out of its accept queue.
///
/// The accept queue cannot be written back: a connection the kernel has
/// accepted and the application not yet is taken out with `accept` during
/// the freeze and captured as an established connection (left in repair
/// mode, like any other). The caller restores them with the listener and
/// hands them to the application's next `accept` calls before the
/// listener's own; on a rollback, it resumes them and does the same at
/// the source.
#[derive(Debug)]
pub struct CapturedTcpListener {
    pub listener: TcpListenerImage,
    pub accept_queue: Vec<AcceptedConnection>,
}

/// A connection taken from a listener's accept queue during the capture.
#[derive(Debug)]
pub struct AcceptedConnection {
    /// The source's socket, in repair mode: release or resume it as any
    /// captured connection.
    pub socket: OwnedFd,
    pub image: TcpConnectionImage,
}

impl TcpListenerImage {
    /// Captures a listening socket and takes its accept queue out (see
    /// [`CapturedTcpListener`]). Connections still in the handshake are
    /// not in the accept queue and are not moved.
    pub fn capture(listener: BorrowedFd<'_>) -> Result<CapturedTcpListener> {
        let (image, _) = Self::describe(listener)?;
        let accept_queue = take_accept_queue(listener, image.local)?;
        Ok(CapturedTcpListener { listener: image, accept_queue })
    }

    /// The listener's image and how many connections wait in its accept
    /// queue, leaving them there (for a checkpoint after which the
    /// application goes on, which must still accept them).
    pub fn describe(listener: BorrowedFd<'_>) -> Result<(TcpListenerImage, u32)> {
        let family = expect_socket(listener, SocketType::STREAM, libc::IPPROTO_TCP, "a TCP socket over IPv4 or IPv6")?;
        let info = tcp_info(listener)?;
        if info.tcpi_state != uapi::TCP_LISTEN {
            return Err(SocketError::UnsupportedTcpState { state: info.tcpi_state, expected: "LISTEN" });
        }
        let image = TcpListenerImage {
            local: local_address(listener)?,
            // For a listener, TCP_INFO answers the backlog in tcpi_sacked
            // (and the accept queue's length in tcpi_unacked).
            backlog: info.tcpi_sacked,
            reuse_address: sockopt::socket_reuseaddr(listener).context(|| "getsockopt(SO_REUSEADDR)".into())?,
            reuse_port: sockopt::socket_reuseport(listener).context(|| "getsockopt(SO_REUSEPORT)".into())?,
            settings: TcpSettings::capture(listener, family)?,
        };
        Ok((image, info.tcpi_unacked))
    }

    /// Is `socket` a listening TCP socket?
    pub fn is_listener(socket: BorrowedFd<'_>) -> Result<bool> {
        Ok(tcp_info(socket)?.tcpi_state == uapi::TCP_LISTEN)
    }

    /// A listening socket again: bound (with `SO_REUSEADDR`, and
    /// `IP_FREEBIND` if the address is not up here yet) and listening.
    pub fn restore(&self) -> Result<OwnedFd> {
        let family = IpFamily::of(&self.local);
        let socket = new_socket(family, SocketType::STREAM, rustix::net::ipproto::TCP)?;
        let fd = socket.as_fd();
        restore_v6_only(fd, self.settings.v6_only)?;
        if self.reuse_port {
            sockopt::set_socket_reuseport(fd, true).context(|| "setsockopt(SO_REUSEPORT=1)".into())?;
        }
        self.settings.restore_behaviour(fd)?;
        bind_reusing(fd, &self.local, self.reuse_address, NonLocalAddress::FreeBind)?;
        let backlog = i32::try_from(self.backlog).unwrap_or(i32::MAX);
        rustix::net::listen(fd, backlog).context(|| format!("listen({}, {backlog})", self.local))?;
        Ok(socket)
    }
}

/// Accepts every connection waiting in the accept queue and captures each.
fn take_accept_queue(listener: BorrowedFd<'_>, local: SocketAddr) -> Result<Vec<AcceptedConnection>> {
    let mut taken: Vec<AcceptedConnection> = Vec::new();
    loop {
        // A zero-timeout poll rather than O_NONBLOCK: the listener's file
        // status flags are shared with the application's descriptor.
        let mut fds = [PollFd::new(&listener, PollFlags::IN)];
        let ready = poll(&mut fds, Some(&rustix::event::Timespec { tv_sec: 0, tv_nsec: 0 }))
            .context(|| "poll(POLLIN) on the listener".into())?;
        if ready == 0 {
            return Ok(taken);
        }
        let socket =
            rustix::net::accept_with(listener, SocketFlags::CLOEXEC).context(|| format!("accept on {local}"))?;
        match TcpConnection::capture(socket.as_fd()) {
            Ok(image) => taken.push(AcceptedConnection { socket, image }),
            Err(error) => {
                // Hand every connection taken out back, live.
                let mut accepted = Vec::with_capacity(taken.len() + 1);
                for connection in taken {
                    let _ = TcpConnection::resume_source(
                        connection.socket.as_fd(),
                        connection.image.settings.reuse_address,
                    );
                    accepted.push(connection.socket);
                }
                accepted.push(socket);
                return Err(SocketError::AcceptQueue { listener: local, accepted, source: Box::new(error) });
            }
        }
    }
}

// ---------------------------------------------------------------------------
// UDP.

/// A UDP socket, bound or connected, with its queued datagrams.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UdpSocketImage {
    /// The bound address (port 0 when never bound).
    pub local: SocketAddr,
    /// The peer of a connected socket.
    pub peer: Option<SocketAddr>,
    pub settings: UdpSettings,
    /// The receive queue, oldest first.
    pub queue: Vec<QueuedDatagram>,
}

/// A datagram waiting in a UDP socket's receive queue.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuedDatagram {
    pub source: SocketAddr,
    /// The address it was sent to (`IP_ORIGDSTADDR`), which tells a socket
    /// bound to a wildcard address which of the node's addresses it came to.
    pub destination: Option<SocketAddr>,
    pub data: Vec<u8>,
}

/// Socket options of a UDP socket worth keeping.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UdpSettings {
    pub reuse_address: bool,
    pub reuse_port: bool,
    pub broadcast: bool,
    /// `IP_PKTINFO` (IPv4) or `IPV6_RECVPKTINFO` (IPv6): the application
    /// learns each datagram's destination.
    pub packet_info: bool,
    pub buffers: BufferSizes,
    pub v6_only: Option<bool>,
}

/// The option that delivers each datagram's destination address, per family.
fn original_destination_option(family: IpFamily) -> (i32, i32, &'static str) {
    match family {
        IpFamily::V4 => (libc::SOL_IP, libc::IP_RECVORIGDSTADDR, "IP_RECVORIGDSTADDR"),
        IpFamily::V6 => (libc::SOL_IPV6, libc::IPV6_RECVORIGDSTADDR, "IPV6_RECVORIGDSTADDR"),
    }
}

fn packet_info_option(family: IpFamily) -> (i32, i32, &'static str) {
    match family {
        IpFamily::V4 => (libc::SOL_IP, libc::IP_PKTINFO, "IP_PKTINFO"),
        IpFamily::V6 => (libc::SOL_IPV6, libc::IPV6_RECVPKTINFO, "IPV6_RECVPKTINFO"),
    }
}

impl UdpSettings {
    fn capture(socket: BorrowedFd<'_>, family: IpFamily) -> Result<Self> {
        let (level, name, what) = packet_info_option(family);
        Ok(UdpSettings {
            reuse_address: sockopt::socket_reuseaddr(socket).context(|| "getsockopt(SO_REUSEADDR)".into())?,
            reuse_port: sockopt::socket_reuseport(socket).context(|| "getsockopt(SO_REUSEPORT)".into())?,
            broadcast: sockopt::socket_broadcast(socket).context(|| "getsockopt(SO_BROADCAST)".into())?,
            packet_info: flag(socket, level, name, what)?,
            buffers: BufferSizes::capture(socket)?,
            v6_only: capture_v6_only(socket, family)?,
        })
    }

    fn restore(&self, socket: BorrowedFd<'_>, family: IpFamily) -> Result<()> {
        restore_v6_only(socket, self.v6_only)?;
        self.buffers.restore(socket)?;
        if self.reuse_port {
            sockopt::set_socket_reuseport(socket, true).context(|| "setsockopt(SO_REUSEPORT=1)".into())?;
        }
        sockopt::set_socket_broadcast(socket, self.broadcast)
            .context(|| format!("setsockopt(SO_BROADCAST={})", u8::from(self.broadcast)))?;
        let (level, name, what) = packet_info_option(family);
        set_flag(socket, level, name, self.packet_info, what)
    }
}

/// The largest UDP payload, plus room to see that a datagram was larger.
const DATAGRAM_BUFFER: usize = 65536;

/// Reads every queued datagram without taking it out: with `SO_PEEK_OFF`
/// set, each `MSG_PEEK` moves on to the next datagram. The socket's own
/// `SO_PEEK_OFF` and `IP_RECVORIGDSTADDR` are put back afterwards.
fn peek_datagrams(socket: BorrowedFd<'_>, family: IpFamily) -> Result<Vec<QueuedDatagram>> {
    let peek_offset: i32 = get_option(socket, libc::SOL_SOCKET, libc::SO_PEEK_OFF, "SO_PEEK_OFF")?;
    let (level, name, what) = original_destination_option(family);
    let original_destination = flag(socket, level, name, what)?;
    set_option(socket, libc::SOL_SOCKET, libc::SO_PEEK_OFF, 0i32, "SO_PEEK_OFF=0")?;
    let peeked = set_flag(socket, level, name, true, what).and_then(|()| {
        let mut buffer = vec![0u8; DATAGRAM_BUFFER];
        let mut queue = Vec::new();
        while let Some(datagram) = peek_next_datagram(socket, &mut buffer)? {
            queue.push(datagram);
        }
        Ok(queue)
    });
    let restored =
        set_option(socket, libc::SOL_SOCKET, libc::SO_PEEK_OFF, peek_offset, &format!("SO_PEEK_OFF={peek_offset}"))
            .and_then(|()| set_flag(socket, level, name, original_destination, what));
    let queue = peeked?;
    restored?;
    Ok(queue)
}

/// An IP socket address from the kernel's `sockaddr_in` or `sockaddr_in6`.
///
/// # Safety
/// `address` must point to `len` readable bytes.
unsafe fn socket_address_from_raw(address: *const libc::sockaddr, len: usize) -> Option<SocketAddr> {
    if len < size_of::<libc::sa_family_t>() {
        return None;
    }
    // SAFETY: at least the family field is readable (checked above, and
    // the caller's promise); read_unaligned does not need alignment.
    let family = unsafe { std::ptr::read_unaligned(address.cast::<libc::sa_family_t>()) };
    match i32::from(family) {
        libc::AF_INET if len >= size_of::<libc::sockaddr_in>() => {
            // SAFETY: len covers a whole sockaddr_in (checked).
            let v4 = unsafe { std::ptr::read_unaligned(address.cast::<libc::sockaddr_in>()) };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr)),
                u16::from_be(v4.sin_port),
            )))
        }
        libc::AF_INET6 if len >= size_of::<libc::sockaddr_in6>() => {
            // SAFETY: len covers a whole sockaddr_in6 (checked).
            let v6 = unsafe { std::ptr::read_unaligned(address.cast::<libc::sockaddr_in6>()) };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(v6.sin6_addr.s6_addr),
                u16::from_be(v6.sin6_port),
                u32::from_be(v6.sin6_flowinfo),
                v6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// The next datagram after the socket's peek offset, or `None` when no
/// more are queued.
fn peek_next_datagram(socket: BorrowedFd<'_>, buffer: &mut [u8]) -> Result<Option<QueuedDatagram>> {
    // SAFETY: all zeros is a valid sockaddr_storage (plain integers).
    let mut source: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    // u64 elements: cmsghdr alignment.
    let mut control = [0u64; 32];
    let mut iov = libc::iovec { iov_base: buffer.as_mut_ptr().cast(), iov_len: buffer.len() };
    // SAFETY: all zeros is a valid msghdr (null pointers, zero lengths).
    let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
    message.msg_name = (&raw mut source).cast();
    message.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    message.msg_iov = &raw mut iov;
    message.msg_iovlen = 1;
    message.msg_control = control.as_mut_ptr().cast();
    message.msg_controllen = size_of_val(&control);
    // SAFETY: every pointer in message (name, iov and its buffer, control)
    // points to live memory of the length given next to it, all of which
    // outlives the call.
    let length = unsafe {
        libc::recvmsg(socket.as_raw_fd(), &raw mut message, libc::MSG_PEEK | libc::MSG_DONTWAIT | libc::MSG_TRUNC)
    };
    if length < 0 {
        let error = io::Error::last_os_error();
        if error.kind() == io::ErrorKind::WouldBlock {
            return Ok(None);
        }
        return Err(SocketError::System { operation: "recvmsg(MSG_PEEK) with SO_PEEK_OFF".into(), source: error });
    }
    let length = length as usize;
    if length > buffer.len() {
        return Err(SocketError::System {
            operation: format!("recvmsg(MSG_PEEK): a datagram of {length} bytes"),
            source: io::Error::from(io::ErrorKind::FileTooLarge),
        });
    }
    // SAFETY: the kernel wrote msg_namelen bytes of address into source,
    // which has room for any address (sockaddr_storage).
    let source = unsafe { socket_address_from_raw((&raw const source).cast(), message.msg_namelen as usize) }
        .ok_or_else(|| SocketError::System {
            operation: "recvmsg(MSG_PEEK): source address".into(),
            source: io::Error::from(io::ErrorKind::InvalidData),
        })?;
    let mut destination = None;
    // SAFETY: message is the header recvmsg filled in; its control buffer
    // (msg_control, msg_controllen) is live.
    let mut header = unsafe { libc::CMSG_FIRSTHDR(&raw const message) };
    while !header.is_null() {
        // SAFETY: CMSG_FIRSTHDR/CMSG_NXTHDR return null or a header that
        // lies within the control buffer.
        let cmsg = unsafe { &*header };
        let is_destination = (cmsg.cmsg_level == libc::SOL_IP && cmsg.cmsg_type == libc::IP_ORIGDSTADDR)
            || (cmsg.cmsg_level == libc::SOL_IPV6 && cmsg.cmsg_type == libc::IPV6_ORIGDSTADDR);
        if is_destination {
            // SAFETY: header is a valid control message (above).
            let data_offset = unsafe { libc::CMSG_LEN(0) } as usize;
            let data_len = cmsg.cmsg_len.saturating_sub(data_offset);
            // SAFETY: the message's data is cmsg_len - CMSG_LEN(0) bytes
            // at CMSG_DATA, within the control buffer.
            destination = unsafe { socket_address_from_raw(libc::CMSG_DATA(header).cast(), data_len) };
        }
        // SAFETY: as for CMSG_FIRSTHDR: message and its control buffer are live.
        header = unsafe { libc::CMSG_NXTHDR(&raw const message, header) };
    }
    Ok(Some(QueuedDatagram { source, destination, data: buffer[..length].to_vec() }))
}

impl UdpSocketImage {
    /// Captures a UDP socket (IPv4 or IPv6, bound or connected) with its
    /// receive queue. The queue is read without being consumed: on a
    /// rollback the source socket holds every datagram still.
    ///
    /// Limit (kernel 6.18): a peek with `SO_PEEK_OFF` skips a zero-length
    /// datagram unless it is at the head of the queue and was never peeked
    /// before (`__skb_try_recv_from_queue` skips a buffer when the offset
    /// is at or past its length and the offset is not 0 or the buffer was
    /// peeked). Empty datagrams are therefore not moved; the source keeps
    /// them for a rollback.
    pub fn capture(socket: BorrowedFd<'_>) -> Result<UdpSocketImage> {
        let family = expect_socket(socket, SocketType::DGRAM, libc::IPPROTO_UDP, "a UDP socket over IPv4 or IPv6")?;
        Ok(UdpSocketImage {
            local: local_address(socket)?,
            peer: peer_address(socket)?,
            settings: UdpSettings::capture(socket, family)?,
            queue: peek_datagrams(socket, family)?,
        })
    }

    /// Rebuilds the socket: bound (with `SO_REUSEADDR`, and `IP_TRANSPARENT`
    /// if needed), its queued datagrams sent to it again from their
    /// original source addresses, then connected if it was.
    ///
    /// With datagrams queued, the addresses they were sent to must be up
    /// in this namespace already ([`SocketError::AddressNotLocal`]); hold
    /// the service's packets until this returns, so the re-injected
    /// datagrams come first.
    pub fn restore(&self) -> Result<OwnedFd> {
        let (socket, bound) = self.restore_bound()?;
        self.finish(socket.as_fd(), bound)?;
        Ok(socket)
    }

    /// The first half of [`UdpSocketImage::restore`], for a destination
    /// whose address comes up later: the socket made and bound (with
    /// `IP_TRANSPARENT` if its address is not up here yet), nothing sent
    /// to it yet. Call [`UdpSocketImage::finish`] once the address is up.
    pub fn restore_bound(&self) -> Result<(OwnedFd, UdpBound)> {
        let family = IpFamily::of(&self.local);
        let socket = new_socket(family, SocketType::DGRAM, rustix::net::ipproto::UDP)?;
        let fd = socket.as_fd();
        self.settings.restore(fd, family)?;
        let mut transparent = false;
        if self.local.port() != 0 || !self.local.ip().is_unspecified() {
            transparent = bind_reusing(fd, &self.local, self.settings.reuse_address, NonLocalAddress::Transparent)?;
        }
        Ok((socket, UdpBound { transparent }))
    }

    /// The second half: the queued datagrams sent to the socket again
    /// (the address must be up here), then connect.
    pub fn finish(&self, socket: BorrowedFd<'_>, bound: UdpBound) -> Result<()> {
        // Before connect: a connected socket takes datagrams from its peer
        // only, and some in the queue may have come before the connect.
        self.reinject_queue(socket)?;
        if let Some(peer) = self.peer {
            rustix::net::connect(socket, &peer).context(|| format!("connect({peer})"))?;
        }
        if bound.transparent {
            NonLocalAddress::Transparent.set(socket, IpFamily::of(&self.local), false)?;
        }
        Ok(())
    }

    /// Where a queued datagram is sent again: the bound address, or, for a
    /// socket bound to a wildcard address, the address it came to.
    fn reinjection_target(&self, datagram: &QueuedDatagram) -> SocketAddr {
        match datagram.destination {
            Some(destination) if self.local.ip().is_unspecified() => {
                SocketAddr::new(destination.ip(), self.local.port())
            }
            _ if self.local.ip().is_unspecified() => {
                let loopback = match self.local {
                    SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                    SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
                };
                SocketAddr::new(loopback, self.local.port())
            }
            _ => self.local,
        }
    }

    /// Sends each queued datagram to the restored socket again, in order,
    /// from its original source address (an `IP_TRANSPARENT` socket bound
    /// to it: needs CAP_NET_ADMIN), and waits until all have arrived.
    fn reinject_queue(&self, socket: BorrowedFd<'_>) -> Result<()> {
        if self.queue.is_empty() {
            return Ok(());
        }
        let mut senders: HashMap<SocketAddr, OwnedFd> = HashMap::new();
        let mut checked_local: Vec<IpAddr> = Vec::new();
        for datagram in &self.queue {
            let target = unmapped(self.reinjection_target(datagram));
            if !checked_local.contains(&target.ip()) {
                if !is_local_address(target.ip())? {
                    return Err(SocketError::AddressNotLocal { address: target.ip() });
                }
                checked_local.push(target.ip());
            }
            let source = unmapped(datagram.source);
            let sender = match senders.entry(source) {
                std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
                std::collections::hash_map::Entry::Vacant(entry) => entry.insert(transparent_sender(source)?),
            };
            let sent = rustix::net::sendto(sender.as_fd(), &datagram.data, SendFlags::NOSIGNAL, &target)
                .context(|| format!("sendto({target}) from {source} (re-injecting a queued datagram)"))?;
            if sent != datagram.data.len() {
                return Err(SocketError::System {
                    operation: format!("sendto({target}) from {source}: {sent} of {} bytes", datagram.data.len()),
                    source: io::Error::from(io::ErrorKind::WriteZero),
                });
            }
        }
        self.wait_for_reinjected(socket)
    }

    /// Loopback delivery is asynchronous (a softirq): waits until the
    /// restored socket holds as many datagrams as were sent to it.
    fn wait_for_reinjected(&self, socket: BorrowedFd<'_>) -> Result<()> {
        const ARRIVAL_TIMEOUT: Duration = Duration::from_secs(1);
        let family = IpFamily::of(&self.local);
        let deadline = Instant::now() + ARRIVAL_TIMEOUT;
        loop {
            let arrived = peek_datagrams(socket, family)?.len();
            if arrived >= self.queue.len() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(SocketError::DatagramsLost { local: self.local, injected: self.queue.len(), arrived });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// An IPv4-mapped IPv6 address (a v4 peer of a dual-stack socket) as the
/// IPv4 address it is: the re-injecting socket speaks IPv4 on the wire.
fn unmapped(address: SocketAddr) -> SocketAddr {
    match address {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => address,
        },
        SocketAddr::V4(_) => address,
    }
}

/// Whether `address` is one of this network namespace's addresses: a
/// plain bind to it succeeds.
fn is_local_address(address: IpAddr) -> Result<bool> {
    let probe_address = SocketAddr::new(address, 0);
    let probe = new_socket(IpFamily::of(&probe_address), SocketType::DGRAM, rustix::net::ipproto::UDP)?;
    match rustix::net::bind(&probe, &probe_address) {
        Ok(()) => Ok(true),
        Err(Errno::ADDRNOTAVAIL) => Ok(false),
        Err(errno) => Err(errno).context(|| format!("bind({probe_address}) to probe the address")),
    }
}

/// A UDP socket that sends from `source`, an address of another host:
/// `IP_TRANSPARENT` lets it bind there.
fn transparent_sender(source: SocketAddr) -> Result<OwnedFd> {
    let family = IpFamily::of(&source);
    let sender = new_socket(family, SocketType::DGRAM, rustix::net::ipproto::UDP)?;
    let fd = sender.as_fd();
    let (level, name, what) = match family {
        IpFamily::V4 => (libc::SOL_IP, libc::IP_TRANSPARENT, "IP_TRANSPARENT"),
        IpFamily::V6 => (libc::SOL_IPV6, libc::IPV6_TRANSPARENT, "IPV6_TRANSPARENT"),
    };
    set_flag(fd, level, name, true, what)?;
    sockopt::set_socket_reuseaddr(fd, true).context(|| "setsockopt(SO_REUSEADDR=1)".into())?;
    set_option(fd, libc::SOL_SOCKET, libc::SO_MARK, REINJECTED_MARK, "SO_MARK")?;
    rustix::net::bind(fd, &source).context(|| format!("bind({source}) with {what} to re-inject datagrams"))?;
    Ok(sender)
}

/// The packet mark of re-injected datagrams: a hold of the application's
/// packets (`lwk_node::hold`) lets them pass.
pub const REINJECTED_MARK: u32 = 0x6c77_6b00;

#[cfg(test)]
mod tests {
    //! Moves between network namespaces made by each test (addresses from
    //! 198.18.0.0/15 only), deleted when the test ends, passed or failed.

    use super::*;
    use std::fs::File;
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpListener, TcpStream, UdpSocket};
    use std::process::Command;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    use std::thread::JoinHandle;

    fn run(program: &str, args: &[&str]) {
        let output = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
        assert!(output.status.success(), "{program} {}: {}", args.join(" "), String::from_utf8_lossy(&output.stderr));
    }

    fn ip(args: &[&str]) {
        run("ip", args);
    }

    /// Network namespaces made by one test; deleted (with the veths and
    /// bridges in them) when it ends, also by a panic.
    struct Namespaces {
        names: Vec<String>,
    }

    impl Namespaces {
        fn new() -> Self {
            Namespaces { names: Vec::new() }
        }

        fn add(&mut self, role: &str) -> String {
            static NEXT: AtomicU64 = AtomicU64::new(0);
            let name = format!("lwk-sockets-{}-{}-{role}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
            ip(&["netns", "add", &name]);
            self.names.push(name.clone());
            ip(&["-n", &name, "link", "set", "lo", "up"]);
            name
        }
    }

    impl Drop for Namespaces {
        fn drop(&mut self) {
            for name in self.names.iter().rev() {
                let _ = Command::new("ip").args(["netns", "del", name]).status();
            }
        }
    }

    /// Runs `f` on a thread inside network namespace `ns`: the sockets it
    /// makes belong to that namespace wherever they are used afterwards.
    fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let file = File::open(format!("/run/netns/{ns}")).expect("open netns");
                    // SAFETY: setns with a namespace descriptor that is
                    // open; it moves only this thread.
                    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                    assert_eq!(rc, 0, "setns({ns}): {}", io::Error::last_os_error());
                    f()
                })
                .join()
                .expect("thread in a network namespace panicked")
        })
    }

    /// Drops every packet `dev` sends (a token bucket smaller than any
    /// packet), standing for the freeze's packet hold.
    fn drop_egress(ns: &str, dev: &str) {
        run(
            "ip",
            &[
                "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", "1kbit", "burst", "10",
                "latency", "1ms",
            ],
        );
    }

    fn restore_egress(ns: &str, dev: &str) {
        run("ip", &["netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root"]);
    }

    const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
    const CLIENT_2: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
    const SERVICE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
    const SERVICE_CIDR: &str = "198.18.0.10/32";

    /// A client and two nodes on one bridge (in a namespace of its own)
    /// that floods every frame to every port (ageing time 0); the nodes
    /// share one MAC address, as in the single-IP cluster, so the service
    /// address moves without the client noticing. It starts on node A.
    struct Lan {
        client: String,
        node_a: String,
        node_b: String,
        lan: String,
        // Last: deleted after everything else.
        _namespaces: Namespaces,
    }

    impl Lan {
        fn new() -> Lan {
            let mut namespaces = Namespaces::new();
            let lan = namespaces.add("lan");
            let client = namespaces.add("client");
            let node_a = namespaces.add("a");
            let node_b = namespaces.add("b");
            ip(&["-n", &lan, "link", "add", "br0", "type", "bridge", "ageing_time", "0"]);
            ip(&["-n", &lan, "link", "set", "br0", "up"]);
            for (ns, port, shared_mac) in
                [(&client, "port-client", false), (&node_a, "port-a", true), (&node_b, "port-b", true)]
            {
                ip(&["-n", &lan, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns]);
                ip(&["-n", &lan, "link", "set", port, "master", "br0", "up"]);
                if shared_mac {
                    ip(&["-n", ns, "link", "set", "eth0", "address", "02:00:c6:12:00:0a"]);
                }
                ip(&["-n", ns, "link", "set", "eth0", "up"]);
            }
            ip(&["-n", &client, "addr", "add", "198.18.0.1/24", "dev", "eth0"]);
            ip(&["-n", &client, "addr", "add", "198.18.0.2/24", "dev", "eth0"]);
            ip(&["-n", &node_a, "addr", "add", "198.18.0.11/24", "dev", "eth0"]);
            ip(&["-n", &node_a, "addr", "add", SERVICE_CIDR, "dev", "eth0"]);
            ip(&["-n", &node_b, "addr", "add", "198.18.0.12/24", "dev", "eth0"]);
            Lan { client, node_a, node_b, lan, _namespaces: namespaces }
        }

        fn port_of(&self, node: &str) -> &'static str {
            if node == self.node_a {
                "port-a"
            } else {
                "port-b"
            }
        }

        fn cut_cable(&self, node: &str) {
            ip(&["-n", &self.lan, "link", "set", self.port_of(node), "down"]);
        }

        fn reconnect_cable(&self, node: &str) {
            ip(&["-n", &self.lan, "link", "set", self.port_of(node), "up"]);
        }

        fn remove_service_address(&self, node: &str) {
            ip(&["-n", node, "addr", "del", SERVICE_CIDR, "dev", "eth0"]);
        }

        fn add_service_address(&self, node: &str) {
            ip(&["-n", node, "addr", "add", SERVICE_CIDR, "dev", "eth0"]);
        }
    }

    // --- a stream that shows any lost, duplicated or reordered byte -------

    fn pattern_byte(position: u64) -> u8 {
        (position.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8
    }

    fn check_pattern(start: u64, data: &[u8]) -> io::Result<()> {
        match data.iter().enumerate().find(|(i, byte)| **byte != pattern_byte(start + *i as u64)) {
            None => Ok(()),
            Some((i, _)) => {
                Err(io::Error::new(io::ErrorKind::InvalidData, format!("stream broken at byte {}", start + i as u64)))
            }
        }
    }

    /// The client: one thread writes the pattern, one reads the echo and
    /// checks it; any error (a reset above all) fails the test.
    struct StreamClient {
        stop: Arc<AtomicBool>,
        writer: JoinHandle<io::Result<u64>>,
        reader: JoinHandle<io::Result<u64>>,
        stream: TcpStream,
    }

    impl StreamClient {
        fn start(stream: TcpStream) -> Self {
            stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            stream.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
            let stop = Arc::new(AtomicBool::new(false));
            let mut output = stream.try_clone().unwrap();
            let writer_stop = stop.clone();
            let writer = std::thread::spawn(move || {
                let mut position = 0u64;
                let mut chunk = [0u8; 4096];
                while !writer_stop.load(Ordering::Relaxed) {
                    for (i, byte) in chunk.iter_mut().enumerate() {
                        *byte = pattern_byte(position + i as u64);
                    }
                    output.write_all(&chunk)?;
                    position += chunk.len() as u64;
                }
                output.shutdown(Shutdown::Write)?;
                Ok(position)
            });
            let mut input = stream.try_clone().unwrap();
            let reader = std::thread::spawn(move || {
                let mut position = 0u64;
                let mut buffer = vec![0u8; 65536];
                loop {
                    let n = input.read(&mut buffer)?;
                    if n == 0 {
                        return Ok(position);
                    }
                    check_pattern(position, &buffer[..n])?;
                    position += n as u64;
                }
            });
            StreamClient { stop, writer, reader, stream }
        }

        fn retransmissions(&self) -> u32 {
            tcp_info(self.stream.as_fd()).unwrap().tcpi_total_retrans
        }

        /// Stops writing, waits for the whole echo; answers the bytes
        /// written and the bytes echoed back.
        fn finish(self) -> (u64, u64) {
            self.stop.store(true, Ordering::Relaxed);
            let written = self.writer.join().unwrap().expect("client writer");
            let echoed = self.reader.join().unwrap().expect("client reader");
            (written, echoed)
        }
    }

    /// The application's side: echoes what it reads, checking it. Its
    /// state moves with the connection (in lwk, with the application's
    /// memory).
    #[derive(Default)]
    struct EchoState {
        position: u64,
        pending: Vec<u8>,
    }

    /// Runs the echo with non-blocking calls until `freeze` is set (answers
    /// false) or the client's end of stream is echoed (answers true).
    fn run_echo(stream: &TcpStream, state: &mut EchoState, freeze: &AtomicBool) -> io::Result<bool> {
        stream.set_nonblocking(true)?;
        let mut buffer = vec![0u8; 65536];
        let mut end_of_stream = false;
        loop {
            if freeze.load(Ordering::Relaxed) {
                return Ok(false);
            }
            let mut idle = true;
            if !state.pending.is_empty() {
                match (&*stream).write(&state.pending) {
                    Ok(n) => {
                        state.pending.drain(..n);
                        idle = false;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            if end_of_stream && state.pending.is_empty() {
                stream.shutdown(Shutdown::Write)?;
                return Ok(true);
            }
            if !end_of_stream && state.pending.len() < 4 << 20 {
                match (&*stream).read(&mut buffer) {
                    Ok(0) => end_of_stream = true,
                    Ok(n) => {
                        check_pattern(state.position, &buffer[..n])?;
                        state.position += n as u64;
                        state.pending.extend_from_slice(&buffer[..n]);
                        idle = false;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            if idle {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }

    /// The application running on a thread until frozen.
    struct EchoApp {
        freeze: Arc<AtomicBool>,
        thread: JoinHandle<io::Result<(TcpStream, EchoState, bool)>>,
    }

    impl EchoApp {
        fn start(stream: TcpStream, mut state: EchoState) -> Self {
            let freeze = Arc::new(AtomicBool::new(false));
            let flag = freeze.clone();
            let thread = std::thread::spawn(move || {
                let done = run_echo(&stream, &mut state, &flag)?;
                Ok((stream, state, done))
            });
            EchoApp { freeze, thread }
        }

        fn freeze(self) -> (TcpStream, EchoState) {
            self.freeze.store(true, Ordering::Relaxed);
            let (stream, state, done) = self.thread.join().unwrap().expect("echo application");
            assert!(!done, "the stream ended before the freeze");
            (stream, state)
        }

        /// Waits for the end of the stream.
        fn join(self) -> EchoState {
            let (_, state, done) = self.thread.join().unwrap().expect("echo application");
            assert!(done);
            state
        }
    }

    /// The application's last steps before its freeze, with its outgoing
    /// acknowledgements lost: it reads half of its receive queue and
    /// writes that back, so the capture finds unread bytes, sent bytes not
    /// yet acknowledged and, past the congestion window, unsent ones.
    fn last_echo_before_freeze(stream: &TcpStream, state: &mut EchoState) {
        let queued = ioctl_int(stream.as_fd(), uapi::SIOCINQ, "SIOCINQ").unwrap() as usize;
        let mut data = vec![0u8; queued / 2];
        (&*stream).read_exact(&mut data).unwrap();
        check_pattern(state.position, &data).unwrap();
        state.position += data.len() as u64;
        state.pending.extend_from_slice(&data);
        loop {
            match (&*stream).write(&state.pending) {
                Ok(n) => {
                    state.pending.drain(..n);
                    if state.pending.is_empty() {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("last echo: {e}"),
            }
        }
    }

    fn describe(image: &TcpConnectionImage) -> String {
        format!(
            "receive queue {} B, send queue {} B ({} unsent), mss {}, {:?}, sack {}, timestamps {}, window {:?}",
            image.receive_queue.data.len(),
            image.send_queue.data.len(),
            image.send_queue.unsent,
            image.options.mss,
            image.options.window_scale,
            image.options.sack,
            image.options.timestamps,
            image.window
        )
    }

    fn to_stream(socket: OwnedFd) -> TcpStream {
        TcpStream::from(socket)
    }

    /// Connects the client to a listener on node A and starts the stream
    /// and the echo; answers when both have run for a while.
    fn start_stream(lan: &Lan, port: u16) -> (StreamClient, EchoApp) {
        let listener = in_netns(&lan.node_a, || TcpListener::bind((SERVICE, port)).unwrap());
        let client = in_netns(&lan.client, || TcpStream::connect((SERVICE, port)).unwrap());
        let (server, _) = listener.accept().unwrap();
        let client = StreamClient::start(client);
        let app = EchoApp::start(server, EchoState::default());
        std::thread::sleep(Duration::from_millis(300));
        (client, app)
    }

    /// Freezes the application with data in flight both ways (the
    /// client's packets lost from here on, as the packet hold would keep
    /// them) and captures the connection.
    fn freeze_and_capture(lan: &Lan, app: EchoApp) -> (TcpStream, EchoState, TcpConnectionImage, Duration) {
        let (stream, mut state) = app.freeze();
        // The client keeps writing: the receive queue fills.
        std::thread::sleep(Duration::from_millis(100));
        drop_egress(&lan.client, "eth0");
        std::thread::sleep(Duration::from_millis(20));
        last_echo_before_freeze(&stream, &mut state);
        let started = Instant::now();
        let image = TcpConnection::capture(stream.as_fd()).expect("capture");
        let capture_time = started.elapsed();
        eprintln!("captured: {}", describe(&image));
        assert!(!image.receive_queue.data.is_empty(), "nothing in the receive queue");
        assert!(image.send_queue.data.len() > image.send_queue.unsent as usize, "no sent and unacknowledged bytes");
        // The image's serialised form is the one that travels.
        let json = serde_json::to_string(&image).unwrap();
        let image: TcpConnectionImage = serde_json::from_str(&json).unwrap();
        (stream, state, image, capture_time)
    }

    fn finish_stream(client: StreamClient, app: EchoApp) {
        std::thread::sleep(Duration::from_millis(500));
        let retransmissions = client.retransmissions();
        let (written, echoed) = client.finish();
        let state = app.join();
        eprintln!("client wrote {written} bytes, got {echoed} back; client retransmissions: {retransmissions}");
        assert_eq!(state.position, written, "the application did not read every byte");
        assert_eq!(echoed, written, "the echo is not the whole stream");
    }

    #[test]
    #[ignore = "needs root (network namespaces, TCP_REPAIR)"]
    fn tcp_connection_moves_to_another_node_without_a_break() {
        let lan = Lan::new();
        let (client, app) = start_stream(&lan, 7000);
        let (stream, state, image, capture_time) = freeze_and_capture(&lan, app);

        // The source goes silent, then loses the address.
        lan.cut_cable(&lan.node_a);
        let proxys_own = stream.try_clone().unwrap();
        TcpConnection::release_source(OwnedFd::from(stream)).unwrap();
        // Gone at once, though a descriptor (the proxy's) is still open.
        assert_eq!(tcp_info(proxys_own.as_fd()).unwrap().tcpi_state, 7, "TCP_CLOSE");
        lan.remove_service_address(&lan.node_a);
        lan.reconnect_cable(&lan.node_a);

        let started = Instant::now();
        let in_repair = in_netns(&lan.node_b, || image.restore_in_repair()).expect("restore in repair");
        let restore_time = started.elapsed();
        lan.add_service_address(&lan.node_b);
        let started = Instant::now();
        let restored = in_repair.leave_repair().expect("leave repair");
        let leave_time = started.elapsed();
        // Accepted from a listener with SO_REUSEADDR (std's): so is the
        // restored connection, though leaving repair mode turns it off.
        assert!(image.settings.reuse_address);
        assert!(sockopt::socket_reuseaddr(restored.as_fd()).unwrap(), "SO_REUSEADDR as at the source");
        eprintln!("capture {capture_time:?}, restore in repair {restore_time:?}, leave repair {leave_time:?}");
        restore_egress(&lan.client, "eth0");
        let segment_size = tcp_info(restored.as_fd()).unwrap().tcpi_snd_mss;
        assert_eq!(segment_size, image.options.mss - 12, "segment size: the MSS less the timestamp option");

        let app = EchoApp::start(to_stream(restored), state);
        finish_stream(client, app);
    }

    #[test]
    #[ignore = "needs root (network namespaces, TCP_REPAIR)"]
    fn tcp_connection_goes_on_at_the_source_after_a_rollback() {
        let lan = Lan::new();
        let (client, app) = start_stream(&lan, 7001);
        let (stream, state, image, _) = freeze_and_capture(&lan, app);
        TcpConnection::resume_source(stream.as_fd(), image.settings.reuse_address).expect("resume");
        assert!(sockopt::socket_reuseaddr(stream.as_fd()).unwrap(), "SO_REUSEADDR as before the capture");
        restore_egress(&lan.client, "eth0");
        let app = EchoApp::start(stream, state);
        finish_stream(client, app);
    }

    #[test]
    #[ignore = "needs root (network namespaces, TCP_REPAIR)"]
    fn ipv6_tcp_connection_is_rebuilt_in_place() {
        let mut namespaces = Namespaces::new();
        let ns = namespaces.add("v6");
        let address = SocketAddr::from((Ipv6Addr::LOCALHOST, 7002));
        let listener = in_netns(&ns, || TcpListener::bind(address).unwrap());
        let client = in_netns(&ns, || TcpStream::connect(address).unwrap());
        let (server, _) = listener.accept().unwrap();
        let client = StreamClient::start(client);
        let app = EchoApp::start(server, EchoState::default());
        std::thread::sleep(Duration::from_millis(300));

        let (stream, mut state) = app.freeze();
        std::thread::sleep(Duration::from_millis(100));
        // One interface carries both ways here: everything is held.
        drop_egress(&ns, "lo");
        last_echo_before_freeze(&stream, &mut state);
        let image = TcpConnection::capture(stream.as_fd()).expect("capture");
        eprintln!("captured: {}", describe(&image));
        assert!(image.local.is_ipv6() && !image.receive_queue.data.is_empty());
        TcpConnection::release_source(OwnedFd::from(stream)).unwrap();
        let restored = in_netns(&ns, || image.restore()).expect("restore");
        restore_egress(&ns, "lo");
        let app = EchoApp::start(to_stream(restored), state);
        finish_stream(client, app);
        drop(namespaces);
    }

    #[test]
    #[ignore = "needs root (network namespaces, TCP_REPAIR)"]
    fn connection_in_the_accept_queue_is_not_lost() {
        let lan = Lan::new();
        let port = 7003;
        let listener = in_netns(&lan.node_a, || {
            let socket = new_socket(IpFamily::V4, SocketType::STREAM, rustix::net::ipproto::TCP).unwrap();
            rustix::net::bind(&socket, &SocketAddr::from((SERVICE, port))).unwrap();
            rustix::net::listen(&socket, 16).unwrap();
            socket
        });
        // The kernel completes the handshake; the application never accepts.
        let mut client = in_netns(&lan.client, || TcpStream::connect((SERVICE, port)).unwrap());
        client.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        client.write_all(b"hello").unwrap();
        std::thread::sleep(Duration::from_millis(50));

        lan.cut_cable(&lan.node_a);
        let captured = TcpListenerImage::capture(listener.as_fd()).expect("capture listener");
        assert_eq!(captured.listener.backlog, 16);
        assert_eq!(captured.listener.local, SocketAddr::from((SERVICE, port)));
        assert_eq!(captured.accept_queue.len(), 1, "the accept queue's connection");
        drop(listener);
        let mut images = Vec::new();
        for connection in captured.accept_queue {
            assert_eq!(connection.image.receive_queue.data, b"hello");
            images.push(connection.image);
            TcpConnection::release_source(connection.socket).unwrap();
        }
        lan.remove_service_address(&lan.node_a);
        lan.reconnect_cable(&lan.node_a);

        let (listener, in_repair) = in_netns(&lan.node_b, || {
            let listener = captured.listener.restore().expect("restore listener");
            let connections: Vec<_> =
                images.iter().map(|image| image.restore_in_repair().expect("restore connection")).collect();
            (listener, connections)
        });
        lan.add_service_address(&lan.node_b);
        // The application's first accept gets the restored connection.
        for connection in in_repair {
            let mut accepted = to_stream(connection.leave_repair().unwrap());
            accepted.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let mut hello = [0u8; 5];
            accepted.read_exact(&mut hello).unwrap();
            assert_eq!(&hello, b"hello");
            accepted.write_all(b"world").unwrap();
        }
        let mut world = [0u8; 5];
        client.read_exact(&mut world).expect("answer through the moved connection");
        assert_eq!(&world, b"world");

        // The restored listener takes new connections at node B.
        let listener = TcpListener::from(listener);
        let mut second = in_netns(&lan.client, || TcpStream::connect((SERVICE, port)).unwrap());
        let (mut accepted, peer) = listener.accept().unwrap();
        assert_eq!(peer.ip(), IpAddr::V4(CLIENT));
        second.write_all(b"again").unwrap();
        let mut again = [0u8; 5];
        accepted.read_exact(&mut again).unwrap();
        assert_eq!(&again, b"again");
    }

    #[test]
    #[ignore = "needs root (network namespaces, TCP_REPAIR)"]
    fn many_connections_move_together() {
        const CONNECTIONS: usize = 200;
        let lan = Lan::new();
        let port = 7006;
        let listener = in_netns(&lan.node_a, || TcpListener::bind((SERVICE, port)).unwrap());
        let mut pairs = Vec::new();
        for i in 0..CONNECTIONS {
            let mut client = in_netns(&lan.client, || TcpStream::connect((SERVICE, port)).unwrap());
            client.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let (mut server, _) = listener.accept().unwrap();
            // Unread at both ends: each connection has both queues' worth.
            client.write_all(format!("request {i}").as_bytes()).unwrap();
            server.write_all(format!("reply {i}").as_bytes()).unwrap();
            pairs.push((client, server));
        }
        std::thread::sleep(Duration::from_millis(100));
        drop(listener);

        lan.cut_cable(&lan.node_a);
        let started = Instant::now();
        let images: Vec<_> =
            pairs.iter().map(|(_, server)| TcpConnection::capture(server.as_fd()).expect("capture")).collect();
        let capture_time = started.elapsed();
        let mut clients = Vec::new();
        for (client, server) in pairs {
            TcpConnection::release_source(OwnedFd::from(server)).unwrap();
            clients.push(client);
        }
        lan.remove_service_address(&lan.node_a);
        lan.reconnect_cable(&lan.node_a);

        let started = Instant::now();
        let in_repair: Vec<_> =
            in_netns(&lan.node_b, || images.iter().map(|image| image.restore_in_repair().expect("restore")).collect());
        let restore_time = started.elapsed();
        lan.add_service_address(&lan.node_b);
        let started = Instant::now();
        let servers: Vec<_> =
            in_repair.into_iter().map(|socket| to_stream(socket.leave_repair().expect("leave repair"))).collect();
        let leave_time = started.elapsed();
        eprintln!(
            "{CONNECTIONS} connections: capture {:?} ({:?} each), restore in repair {:?} ({:?} each), leave repair {:?} ({:?} each)",
            capture_time,
            capture_time / CONNECTIONS as u32,
            restore_time,
            restore_time / CONNECTIONS as u32,
            leave_time,
            leave_time / CONNECTIONS as u32
        );

        for (i, (mut client, mut server)) in clients.into_iter().zip(servers).enumerate() {
            server.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let request = format!("request {i}");
            let mut got = vec![0u8; request.len()];
            server.read_exact(&mut got).unwrap();
            assert_eq!(got, request.as_bytes());
            server.write_all(b" and more").unwrap();
            let reply = format!("reply {i} and more");
            let mut got = vec![0u8; reply.len()];
            client.read_exact(&mut got).expect("reply through the moved connection");
            assert_eq!(got, reply.as_bytes());
        }
    }

    fn udp_from(lan: &Lan, address: Ipv4Addr, port: u16) -> UdpSocket {
        in_netns(&lan.client, || UdpSocket::bind((address, port)).unwrap())
    }

    #[test]
    #[ignore = "needs root (network namespaces, IP_TRANSPARENT)"]
    fn udp_queue_moves_with_its_source_addresses() {
        let lan = Lan::new();
        let bound_address = SocketAddr::from((SERVICE, 7004));
        let bound = in_netns(&lan.node_a, || UdpSocket::bind(bound_address).unwrap());
        let connected_peer = SocketAddr::from((CLIENT, 4003));
        let connected = in_netns(&lan.node_a, || {
            let socket = UdpSocket::bind((SERVICE, 7005)).unwrap();
            socket.connect(connected_peer).unwrap();
            socket
        });
        let first = udp_from(&lan, CLIENT, 4001);
        let second = udp_from(&lan, CLIENT_2, 4002);
        let third = udp_from(&lan, CLIENT, 4003);
        let mut expected: Vec<(SocketAddr, Vec<u8>)> = Vec::new();
        for i in 0..8usize {
            let (sender, source) = if i % 2 == 0 {
                (&first, SocketAddr::from((CLIENT, 4001)))
            } else {
                (&second, SocketAddr::from((CLIENT_2, 4002)))
            };
            // One larger than the link's MTU too. (Not an empty one: see
            // UdpSocketImage::capture.)
            let data = match i {
                5 => vec![0x5a; 9000],
                _ => format!("datagram {i}").into_bytes(),
            };
            sender.send_to(&data, bound_address).unwrap();
            expected.push((source, data));
        }
        third.send_to(b"to the connected one", (SERVICE, 7005)).unwrap();
        std::thread::sleep(Duration::from_millis(100));

        let image = UdpSocketImage::capture(bound.as_fd()).expect("capture");
        let got: Vec<_> = image.queue.iter().map(|d| (d.source, d.data.clone())).collect();
        assert_eq!(got, expected);
        assert!(image.queue.iter().all(|d| d.destination == Some(bound_address)));
        // Not consumed, and the socket's own peek offset is back.
        assert_eq!(UdpSocketImage::capture(bound.as_fd()).unwrap(), image);
        let peek_offset: i32 = get_option(bound.as_fd(), libc::SOL_SOCKET, libc::SO_PEEK_OFF, "SO_PEEK_OFF").unwrap();
        assert_eq!(peek_offset, -1);
        let connected_image = UdpSocketImage::capture(connected.as_fd()).expect("capture connected");
        assert_eq!(connected_image.peer, Some(connected_peer));
        assert_eq!(connected_image.queue.len(), 1);

        let json = serde_json::to_string(&image).unwrap();
        let image: UdpSocketImage = serde_json::from_str(&json).unwrap();
        drop(bound);
        drop(connected);
        lan.remove_service_address(&lan.node_a);
        let early = in_netns(&lan.node_b, || image.restore());
        assert!(
            matches!(early, Err(SocketError::AddressNotLocal { .. })),
            "restored before the address was up: {early:?}"
        );
        lan.add_service_address(&lan.node_b);
        let started = Instant::now();
        let (restored, restored_connected) = in_netns(&lan.node_b, || (image.restore(), connected_image.restore()));
        eprintln!("UDP restore with {} datagrams: {:?}", image.queue.len(), started.elapsed());
        let restored = UdpSocket::from(restored.expect("restore"));
        let restored_connected = UdpSocket::from(restored_connected.expect("restore connected"));
        restored.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        restored_connected.set_read_timeout(Some(Duration::from_secs(5))).unwrap();

        // New traffic comes after the moved queue.
        first.send_to(b"after the move", bound_address).unwrap();
        expected.push((SocketAddr::from((CLIENT, 4001)), b"after the move".to_vec()));
        let mut buffer = vec![0u8; 65536];
        for (source, data) in &expected {
            let (n, from) = restored.recv_from(&mut buffer).expect("a moved datagram");
            assert_eq!((from, &buffer[..n]), (*source, &data[..]));
        }
        let (n, from) = restored_connected.recv_from(&mut buffer).unwrap();
        assert_eq!((from, &buffer[..n]), (connected_peer, &b"to the connected one"[..]));
        assert_eq!(restored_connected.peer_addr().unwrap(), connected_peer);
    }
}
