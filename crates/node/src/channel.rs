//! An authenticated connection between two nodes.
//!
//! The handshake: each side sends `LWKNODE1` and a fresh 32-byte nonce;
//! each then sends a proof, BLAKE3 keyed with the cluster key over its role
//! and both nonces, and checks the other's. A peer without the key cannot
//! make a proof and is refused; a recorded proof is worth nothing with
//! other nonces. Both derive a session key from the cluster key and the
//! nonces.
//!
//! Messages (JSON) then go in frames: length (u32 LE), payload, and a
//! BLAKE3 hash keyed with the session key over the direction, a sequence
//! number and the payload: a changed, dropped, reordered or replayed frame
//! is refused. An image stream goes between messages on the same
//! connection, as an `image` stream keyed with the cluster key whose stream
//! id comes from the session (so it cannot be replayed either).

use std::io::{Read, Write};
use std::net::TcpStream;

use lwk_migrate::image::{ClusterKey, StreamId};
use serde::de::DeserializeOwned;
use serde::Serialize;

const MAGIC: &[u8; 8] = b"LWKNODE1";
/// A message is small (requests, reports); images go as image streams.
const MAX_MESSAGE: u32 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("the connection failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the peer is not an lwk node daemon (no LWKNODE1 greeting)")]
    NotANode,
    #[error("the peer does not hold this cluster's key: refused")]
    NotAuthenticated,
    #[error("a message failed its integrity check (changed, dropped or replayed): the connection is dropped")]
    Corrupt,
    #[error("a message of {0} bytes is over the limit")]
    TooLarge(u32),
    #[error("a malformed message: {0}")]
    Json(#[from] serde_json::Error),
}

/// Which end of the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub enum Role {
    /// The side that connected (the source of a migration).
    Client,
    /// The daemon that accepted.
    Server,
}

impl Role {
    fn tag(self) -> &'static [u8] {
        match self {
            Role::Client => b"client",
            Role::Server => b"server",
        }
    }
    fn other(self) -> Role {
        match self {
            Role::Client => Role::Server,
            Role::Server => Role::Client,
        }
    }
}

/// An authenticated connection over `S` (a TCP stream between nodes).
pub struct Channel<S = TcpStream> {
    pub stream: S,
    key: ClusterKey,
    session: [u8; 32],
    role: Role,
    sent: u64,
    received: u64,
    /// The next image stream's id (fresh for each image sent either way).
    images: u64,
}

impl<S: Read + Write> Channel<S> {
    /// Authenticate `stream` as `role` with `key`.
    pub fn handshake(mut stream: S, key: &ClusterKey, role: Role) -> Result<Channel<S>, ChannelError> {
        let mine = crate::key::random_bytes::<32>()?;
        let mut hello = [0u8; 40];
        hello[..8].copy_from_slice(MAGIC);
        hello[8..].copy_from_slice(&mine);
        stream.write_all(&hello)?;
        let mut theirs = [0u8; 40];
        stream.read_exact(&mut theirs)?;
        if &theirs[..8] != MAGIC {
            return Err(ChannelError::NotANode);
        }
        let (client, server) = match role {
            Role::Client => (mine, <[u8; 32]>::try_from(&theirs[8..]).expect("32 bytes")),
            Role::Server => (<[u8; 32]>::try_from(&theirs[8..]).expect("32 bytes"), mine),
        };
        let proof = |r: Role| {
            let mut h = blake3::Hasher::new_keyed(key);
            h.update(b"lwk node proof");
            h.update(r.tag());
            h.update(&client);
            h.update(&server);
            *h.finalize().as_bytes()
        };
        stream.write_all(&proof(role))?;
        let mut got = [0u8; 32];
        stream.read_exact(&mut got)?;
        // blake3::Hash compares in constant time.
        if blake3::Hash::from(got) != blake3::Hash::from(proof(role.other())) {
            return Err(ChannelError::NotAuthenticated);
        }
        let mut h = blake3::Hasher::new_keyed(key);
        h.update(b"lwk node session");
        h.update(&client);
        h.update(&server);
        let session = *h.finalize().as_bytes();
        Ok(Channel { stream, key: *key, session, role, sent: 0, received: 0, images: 0 })
    }

    /// Send one message.
    pub fn send<T: Serialize>(&mut self, msg: &T) -> Result<(), ChannelError> {
        self.send_bytes(&serde_json::to_vec(msg)?)
    }

    /// Receive one message.
    pub fn recv<T: DeserializeOwned>(&mut self) -> Result<T, ChannelError> {
        Ok(serde_json::from_slice(&self.recv_bytes()?)?)
    }

    /// Send one frame of bytes.
    pub fn send_bytes(&mut self, payload: &[u8]) -> Result<(), ChannelError> {
        write_frame(&mut self.stream, &self.session, self.role, &mut self.sent, payload)
    }

    /// Receive one frame of bytes.
    pub fn recv_bytes(&mut self) -> Result<Vec<u8>, ChannelError> {
        read_frame(&mut self.stream, &self.session, self.role.other(), &mut self.received)
    }

    /// The cluster key, which keys image streams on this connection.
    pub fn key(&self) -> &ClusterKey {
        &self.key
    }

    /// The id of the next image stream on this connection, the same at
    /// both ends (derived from the session): a reader refuses a stream
    /// with another id.
    pub fn next_image_id(&mut self) -> StreamId {
        let mut h = blake3::Hasher::new_keyed(&self.session);
        h.update(b"lwk image stream");
        h.update(&self.images.to_le_bytes());
        self.images += 1;
        h.finalize().as_bytes()[..16].try_into().expect("16 bytes")
    }
}

/// The frame MAC: keyed with the session key, over the sender's role, the
/// frame's sequence number and its payload.
fn mac(session: &[u8; 32], from: Role, seq: u64, payload: &[u8]) -> blake3::Hash {
    let mut h = blake3::Hasher::new_keyed(session);
    h.update(from.tag());
    h.update(&seq.to_le_bytes());
    h.update(payload);
    h.finalize()
}

fn write_frame(
    w: &mut impl Write,
    session: &[u8; 32],
    role: Role,
    sent: &mut u64,
    payload: &[u8],
) -> Result<(), ChannelError> {
    if payload.len() > MAX_MESSAGE as usize {
        return Err(ChannelError::TooLarge(payload.len() as u32));
    }
    let mac = mac(session, role, *sent, payload);
    *sent += 1;
    let mut frame = Vec::with_capacity(4 + payload.len() + 32);
    frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    frame.extend_from_slice(payload);
    frame.extend_from_slice(mac.as_bytes());
    w.write_all(&frame)?;
    Ok(())
}

fn read_frame(r: &mut impl Read, session: &[u8; 32], from: Role, received: &mut u64) -> Result<Vec<u8>, ChannelError> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len);
    if len > MAX_MESSAGE {
        return Err(ChannelError::TooLarge(len));
    }
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload)?;
    let mut tag = [0u8; 32];
    r.read_exact(&mut tag)?;
    // blake3::Hash compares in constant time.
    if blake3::Hash::from(tag) != mac(session, from, *received, &payload) {
        return Err(ChannelError::Corrupt);
    }
    *received += 1;
    Ok(payload)
}

/// Where an authenticated connection stands: enough to go on with it in
/// another process (a relay handed over with its socket). Holds the
/// session key: it goes only to a process this one trusts.
#[derive(Clone, Serialize, serde::Deserialize)]
pub struct ChannelState {
    session: [u8; 32],
    role: Role,
    sent: u64,
    received: u64,
}

impl<S> Channel<S> {
    /// The connection and where it stands (the cluster key stays here).
    pub fn into_parts(self) -> (S, ChannelState) {
        let state = ChannelState { session: self.session, role: self.role, sent: self.sent, received: self.received };
        (self.stream, state)
    }
}

/// The sending half of a connection, for a thread of its own.
pub struct Sender<S = TcpStream> {
    stream: S,
    session: [u8; 32],
    role: Role,
    sent: u64,
}

/// The receiving half.
pub struct Receiver<S = TcpStream> {
    stream: S,
    session: [u8; 32],
    role: Role,
    received: u64,
}

impl<S: Write> Sender<S> {
    pub fn send_bytes(&mut self, payload: &[u8]) -> Result<(), ChannelError> {
        write_frame(&mut self.stream, &self.session, self.role, &mut self.sent, payload)
    }
}

impl<S: Read> Receiver<S> {
    pub fn recv_bytes(&mut self) -> Result<Vec<u8>, ChannelError> {
        read_frame(&mut self.stream, &self.session, self.role.other(), &mut self.received)
    }
}

/// Both halves of a connection over `stream`, from where it stood.
pub fn split(stream: TcpStream, state: ChannelState) -> std::io::Result<(Sender, Receiver)> {
    let other = stream.try_clone()?;
    let ChannelState { session, role, sent, received } = state;
    Ok((Sender { stream, session, role, sent }, Receiver { stream: other, session, role, received }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    type Pair = (Result<Channel<UnixStream>, ChannelError>, Result<Channel<UnixStream>, ChannelError>);

    /// Both ends of a connection (a socket pair: no network in unit tests).
    fn pair(a: ClusterKey, b: ClusterKey) -> Pair {
        let (x, y) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || Channel::handshake(y, &b, Role::Server));
        let client = Channel::handshake(x, &a, Role::Client);
        (client, server.join().unwrap())
    }

    #[test]
    fn both_ends_with_the_key_talk_and_a_peer_without_it_is_refused() {
        let (c, s) = pair([7; 32], [7; 32]);
        let (mut c, mut s) = (c.unwrap(), s.unwrap());
        c.send(&vec!["hello", "node"]).unwrap();
        assert_eq!(s.recv::<Vec<String>>().unwrap(), ["hello", "node"]);
        s.send(&42u32).unwrap();
        assert_eq!(c.recv::<u32>().unwrap(), 42);
        assert_eq!(c.next_image_id(), s.next_image_id(), "both ends agree on the image stream's id");
        assert_ne!(c.next_image_id(), [0; 16]);

        let (c, s) = pair([7; 32], [8; 32]);
        assert!(matches!(c, Err(ChannelError::NotAuthenticated) | Err(ChannelError::Io(_))));
        assert!(matches!(s, Err(ChannelError::NotAuthenticated) | Err(ChannelError::Io(_))));
    }

    #[test]
    fn a_changed_or_replayed_frame_is_refused() {
        let (c, s) = pair([1; 32], [1; 32]);
        let (mut c, mut s) = (c.unwrap(), s.unwrap());
        // A frame made by hand, then with one payload byte flipped.
        let payload = serde_json::to_vec(&"abc").unwrap();
        let mac = mac(&c.session, Role::Client, 0, &payload);
        let mut frame = (payload.len() as u32).to_le_bytes().to_vec();
        frame.extend_from_slice(&payload);
        frame.extend_from_slice(mac.as_bytes());
        let mut bad = frame.clone();
        bad[5] ^= 1;
        c.stream.write_all(&bad).unwrap();
        assert!(matches!(s.recv::<String>(), Err(ChannelError::Corrupt)));
        // The receiver did not count the bad one: the good one passes, and
        // the same frame again (a replay) does not.
        c.stream.write_all(&frame).unwrap();
        assert_eq!(s.recv::<String>().unwrap(), "abc");
        c.stream.write_all(&frame).unwrap();
        assert!(matches!(s.recv::<String>(), Err(ChannelError::Corrupt)), "a replayed frame");
    }
}
