//! The image format: one stream of framed, versioned, hashed records that is
//! both a checkpoint on disk and a migration on the wire between node daemons.
//!
//! A stream is a [`StreamHeader`] then records, the last of which is an END
//! record. Every record carries a BLAKE3 hash over the stream header, its own
//! header (kind, sequence number, length) and its payload. With a
//! [`ClusterKey`] the hash is keyed (a MAC): only a holder of the key can write
//! a stream the reader accepts. Without one it only detects corruption, which
//! is what an image on disk needs. The sequence number makes a dropped,
//! reordered or replayed record visible; the stream header in every hash (with
//! its random [`StreamId`]) makes a record spliced in from another stream
//! visible too.
//!
//! Both ends stream: the writer holds at most one memory chunk
//! ([`MEMORY_CHUNK_LEN`]) and its compressed form, the reader at most one
//! record ([`MAX_PAYLOAD_LEN`]) and its decompressed form, whatever the size
//! of the image.
//!
//! The byte layout and the rules are in docs/image-format.md.

use std::fmt;
use std::io::{self, BufWriter, Read, Write};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// The first eight bytes of every stream.
pub const MAGIC: [u8; 8] = *b"LWKIMAGE";
/// The format's major version: a reader refuses any other. Bumped when an
/// existing layout or meaning changes.
pub const FORMAT_MAJOR: u16 = 1;
/// The format's minor version: a reader reads any minor of its major. Bumped
/// when record kinds are added (older readers see them as
/// [`Record::Unknown`] and skip them).
pub const FORMAT_MINOR: u16 = 2;

/// Bytes of the stream header: magic, major, minor, flags, stream id.
pub const STREAM_HEADER_LEN: usize = 32;
/// Bytes of a record header: kind (u32), sequence number (u64), payload length (u64).
pub const RECORD_HEADER_LEN: usize = 20;
/// Bytes of the BLAKE3 hash that closes every record.
pub const RECORD_HASH_LEN: usize = 32;
/// The largest payload a record may have. A reader refuses a larger declared
/// length before allocating anything, so a corrupt length cannot make it
/// allocate gigabytes.
pub const MAX_PAYLOAD_LEN: u64 = 64 << 20;
/// The most memory bytes the writer puts in one memory record; larger ranges
/// are split into several records.
pub const MEMORY_CHUNK_LEN: usize = 4 << 20;
/// Bytes of the header that starts a memory record's payload: address (u64),
/// length of the data once decoded (u32), encoding (u32).
pub const MEMORY_HEADER_LEN: usize = 16;

/// Stream flag: the record hashes are keyed with a cluster key.
const STREAM_FLAG_KEYED: u32 = 1;
/// Every stream flag this version knows; a reader refuses any other bit,
/// since a flag changes how the stream is read.
const KNOWN_STREAM_FLAGS: u32 = STREAM_FLAG_KEYED;

/// The cluster key: the secret the node daemons of one cluster share, used as
/// the BLAKE3 key of every record's hash on the wire.
pub type ClusterKey = [u8; 32];

/// A stream's identity, random for each stream unless the writer is given
/// one (a receiving daemon can choose it, so that a recorded stream cannot be
/// replayed to it later).
pub type StreamId = [u8; 16];

/// What a record holds. The numbers are the format's: they never change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum RecordKind {
    /// JSON: what the image holds, from which node and program, with which versions.
    Manifest = 1,
    /// Binary, opaque here: the LWK's own state (`kernel::persist::LwkState`).
    LwkState = 2,
    /// Binary, opaque here: every thread's saved context.
    ThreadContexts = 3,
    /// An address and the memory bytes there, LZ4-compressed when that is smaller
    /// (written with [`ImageWriter::memory`], read as [`Record::Memory`]).
    Memory = 4,
    /// JSON: the descriptor table (`lwk_migrate::fds`).
    Descriptors = 5,
    /// JSON: the sockets (`lwk_migrate::sockets`).
    Sockets = 6,
    /// JSON: the processes of the application (the tree, pids and tids).
    Processes = 7,
    /// JSON: where the memory records that follow (before the LWK state,
    /// in a migration's pre-copy) belong: which memory file and offset
    /// each mapped range of addresses is (`lwk_migrate::precopy`).
    MemoryMap = 8,
    /// JSON: in a migration within a single-IP cluster, the flows whose
    /// packets the destination holds from now on (`lwk_node::hold::Flows`);
    /// a restore from the image has nothing to do with it.
    Hold = 9,
    /// Empty: the stream is complete (written by [`ImageWriter::finish`]).
    End = 0xFFFF_FFFF,
}

impl RecordKind {
    /// Every kind this version knows.
    pub const ALL: [RecordKind; 10] = [
        RecordKind::Manifest,
        RecordKind::LwkState,
        RecordKind::ThreadContexts,
        RecordKind::Memory,
        RecordKind::Descriptors,
        RecordKind::Sockets,
        RecordKind::Processes,
        RecordKind::MemoryMap,
        RecordKind::Hold,
        RecordKind::End,
    ];

    /// The kind's number in the stream.
    pub const fn number(self) -> u32 {
        self as u32
    }

    /// The kind with this number, if this version knows it.
    pub fn from_number(number: u32) -> Option<RecordKind> {
        RecordKind::ALL.into_iter().find(|kind| kind.number() == number)
    }
}

/// A kind number as a person reads it: "Descriptors (5)", or "unknown kind 42".
struct KindLabel(u32);

impl fmt::Display for KindLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match RecordKind::from_number(self.0) {
            Some(kind) => write!(f, "{kind:?} ({})", self.0),
            None => write!(f, "unknown kind {}", self.0),
        }
    }
}

/// How a memory record's data is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
enum MemoryEncoding {
    Raw = 0,
    /// lz4_flex block format, without a size prefix (the header has the size).
    Lz4Block = 1,
}

/// What goes wrong writing or reading an image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("I/O error on the image stream: {0}")]
    Io(#[from] io::Error),

    #[error("not an lwk image: the stream starts with {found:02x?}, not the magic \"LWKIMAGE\"")]
    NotAnImage { found: [u8; 8] },

    #[error(
        "image format version {found_major}.{found_minor} is not supported: this build reads version \
         {FORMAT_MAJOR}.x (it writes {FORMAT_MAJOR}.{FORMAT_MINOR}); use an lwk of the image's major version"
    )]
    UnsupportedVersion { found_major: u16, found_minor: u16 },

    #[error("the stream header has flags {flags:#x} this version does not know (it knows {KNOWN_STREAM_FLAGS:#x})")]
    UnknownStreamFlags { flags: u32 },

    #[error("the stream is authenticated with a cluster key, but no key was given to read it")]
    KeyRequired,

    #[error("the stream is not authenticated (written without a cluster key), but a key was given: refusing it")]
    NotAuthenticated,

    #[error(
        "the stream is not authenticated with this cluster key: the first record's MAC does not match \
         (the writer used another key, or the first record is corrupt)"
    )]
    WrongKey,

    #[error("record {position} of the stream is corrupt: its hash does not match its header and payload")]
    CorruptRecord { position: u64 },

    #[error(
        "record out of sequence: expected record {expected}, found record {found} \
         (a record was dropped, reordered or replayed)"
    )]
    OutOfSequence { expected: u64, found: u64 },

    #[error(
        "record {position} declares a payload of {len} bytes, more than the limit of {MAX_PAYLOAD_LEN}: \
         the stream is corrupt (refused before reading the payload)"
    )]
    PayloadTooLarge { position: u64, len: u64 },

    #[error("the stream ends after {records} records without an END record: it is truncated")]
    Truncated { records: u64 },

    #[error("memory record {position} is malformed: {problem}")]
    MalformedMemory { position: u64, problem: String },

    #[error("a record of {} would hold {len} bytes, more than the limit of {MAX_PAYLOAD_LEN}: split it", KindLabel(*.kind))]
    RecordTooLarge { kind: u32, len: u64 },

    #[error("the memory range at {addr:#x} of {len} bytes goes past the end of the address space")]
    MemoryRangeOverflow { addr: u64, len: u64 },

    #[error("records of kind {kind:?} are written with ImageWriter::{method}, not ImageWriter::record")]
    KindHasItsOwnMethod { kind: RecordKind, method: &'static str },

    #[error("the JSON of a {} record: {source}", KindLabel(*.kind))]
    Json {
        kind: u32,
        #[source]
        source: serde_json::Error,
    },

    #[error("this image reader already failed; it reads nothing after an error")]
    ReaderFailed,
}

/// The 32 bytes that open a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamHeader {
    pub major: u16,
    pub minor: u16,
    /// The record hashes are keyed with a cluster key.
    pub keyed: bool,
    pub stream_id: StreamId,
}

impl StreamHeader {
    fn to_bytes(self) -> [u8; STREAM_HEADER_LEN] {
        let flags = if self.keyed { STREAM_FLAG_KEYED } else { 0 };
        let mut bytes = [0u8; STREAM_HEADER_LEN];
        bytes[0..8].copy_from_slice(&MAGIC);
        bytes[8..10].copy_from_slice(&self.major.to_le_bytes());
        bytes[10..12].copy_from_slice(&self.minor.to_le_bytes());
        bytes[12..16].copy_from_slice(&flags.to_le_bytes());
        bytes[16..32].copy_from_slice(&self.stream_id);
        bytes
    }

    fn from_bytes(bytes: &[u8; STREAM_HEADER_LEN]) -> Result<StreamHeader, ImageError> {
        let found: [u8; 8] = array(&bytes[0..8]);
        if found != MAGIC {
            return Err(ImageError::NotAnImage { found });
        }
        let major = u16::from_le_bytes(array(&bytes[8..10]));
        let minor = u16::from_le_bytes(array(&bytes[10..12]));
        if major != FORMAT_MAJOR {
            return Err(ImageError::UnsupportedVersion { found_major: major, found_minor: minor });
        }
        let flags = u32::from_le_bytes(array(&bytes[12..16]));
        if flags & !KNOWN_STREAM_FLAGS != 0 {
            return Err(ImageError::UnknownStreamFlags { flags });
        }
        Ok(StreamHeader { major, minor, keyed: flags & STREAM_FLAG_KEYED != 0, stream_id: array(&bytes[16..32]) })
    }

    /// The hasher every record's hash starts from: keyed or not, with this
    /// header already in it.
    fn record_hasher(&self, key: Option<&ClusterKey>) -> blake3::Hasher {
        let mut hasher = match key {
            Some(key) => blake3::Hasher::new_keyed(key),
            None => blake3::Hasher::new(),
        };
        hasher.update(&self.to_bytes());
        hasher
    }
}

/// The first N bytes of a slice as an array; the callers' ranges have length N.
fn array<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&bytes[..N]);
    out
}

fn record_header(kind: u32, seq: u64, len: u64) -> [u8; RECORD_HEADER_LEN] {
    let mut header = [0u8; RECORD_HEADER_LEN];
    header[0..4].copy_from_slice(&kind.to_le_bytes());
    header[4..12].copy_from_slice(&seq.to_le_bytes());
    header[12..20].copy_from_slice(&len.to_le_bytes());
    header
}

/// A fresh random stream id, from the kernel's random source.
fn random_stream_id() -> io::Result<StreamId> {
    let mut id = StreamId::default();
    std::fs::File::open("/dev/urandom")?.read_exact(&mut id)?;
    Ok(id)
}

/// Writes an image stream: the header at once, then one frame per record,
/// END at [`finish`](ImageWriter::finish). A writer dropped without `finish`
/// leaves a stream that readers report as truncated, which is what an
/// aborted checkpoint or migration is.
///
/// Small writes are buffered here; the sink gets them at `finish` at the latest.
pub struct ImageWriter<W: Write> {
    sink: BufWriter<W>,
    header: StreamHeader,
    record_hasher: blake3::Hasher,
    next_seq: u64,
    bytes_written: u64,
    /// The compressed form of the memory chunk being written, kept between
    /// records so each chunk does not allocate.
    compressed: Vec<u8>,
}

impl<W: Write> ImageWriter<W> {
    /// Starts a stream on `sink` with a random stream id: keyed with `key` (a
    /// migration between daemons), or only integrity-checked (`None`: an
    /// image on disk).
    pub fn new(sink: W, key: Option<&ClusterKey>) -> Result<ImageWriter<W>, ImageError> {
        ImageWriter::with_stream_id(sink, key, random_stream_id()?)
    }

    /// Starts a stream with the given id, for a receiver that chose it (so
    /// it can refuse a recorded stream replayed to it).
    pub fn with_stream_id(
        sink: W,
        key: Option<&ClusterKey>,
        stream_id: StreamId,
    ) -> Result<ImageWriter<W>, ImageError> {
        let header = StreamHeader { major: FORMAT_MAJOR, minor: FORMAT_MINOR, keyed: key.is_some(), stream_id };
        ImageWriter::with_header(sink, key, header)
    }

    fn with_header(sink: W, key: Option<&ClusterKey>, header: StreamHeader) -> Result<ImageWriter<W>, ImageError> {
        let mut sink = BufWriter::with_capacity(64 << 10, sink);
        sink.write_all(&header.to_bytes())?;
        Ok(ImageWriter {
            sink,
            header,
            record_hasher: header.record_hasher(key),
            next_seq: 0,
            bytes_written: STREAM_HEADER_LEN as u64,
            compressed: Vec::new(),
        })
    }

    /// Writes one record of `kind` with `payload` as it is. Memory and END
    /// have their own methods ([`memory`](Self::memory), [`finish`](Self::finish)).
    pub fn record(&mut self, kind: RecordKind, payload: &[u8]) -> Result<(), ImageError> {
        match kind {
            RecordKind::Memory => Err(ImageError::KindHasItsOwnMethod { kind, method: "memory" }),
            RecordKind::End => Err(ImageError::KindHasItsOwnMethod { kind, method: "finish" }),
            _ => self.write_frame(kind.number(), &[payload]),
        }
    }

    /// Writes one record of `kind` holding `value` as JSON.
    pub fn json<T: Serialize + ?Sized>(&mut self, kind: RecordKind, value: &T) -> Result<(), ImageError> {
        let payload = serde_json::to_vec(value).map_err(|source| ImageError::Json { kind: kind.number(), source })?;
        self.record(kind, &payload)
    }

    /// Writes the memory at `addr`: as many memory records as chunks of
    /// [`MEMORY_CHUNK_LEN`] bytes, each LZ4-compressed when that makes it
    /// smaller. Empty `data` writes nothing.
    pub fn memory(&mut self, addr: u64, data: &[u8]) -> Result<(), ImageError> {
        let len = data.len() as u64;
        if addr.checked_add(len).is_none() {
            return Err(ImageError::MemoryRangeOverflow { addr, len });
        }
        let mut chunk_addr = addr;
        for chunk in data.chunks(MEMORY_CHUNK_LEN) {
            self.memory_chunk(chunk_addr, chunk)?;
            chunk_addr += chunk.len() as u64;
        }
        Ok(())
    }

    fn memory_chunk(&mut self, addr: u64, chunk: &[u8]) -> Result<(), ImageError> {
        // The compression buffer is kept between chunks; it is taken out of
        // self for the write, which needs self whole.
        let mut compressed = std::mem::take(&mut self.compressed);
        let most = lz4_flex::block::get_maximum_output_size(chunk.len());
        if compressed.len() < most {
            compressed.resize(most, 0);
        }
        // Incompressible data (already compressed, encrypted, random) is
        // stored as it is: the reader then copies instead of decoding.
        let (encoding, stored) = match lz4_flex::block::compress_into(chunk, &mut compressed) {
            Ok(compressed_len) if compressed_len < chunk.len() => {
                (MemoryEncoding::Lz4Block, &compressed[..compressed_len])
            }
            _ => (MemoryEncoding::Raw, chunk),
        };
        let mut header = [0u8; MEMORY_HEADER_LEN];
        header[0..8].copy_from_slice(&addr.to_le_bytes());
        // A chunk is at most MEMORY_CHUNK_LEN, far below u32::MAX.
        header[8..12].copy_from_slice(&(chunk.len() as u32).to_le_bytes());
        header[12..16].copy_from_slice(&(encoding as u32).to_le_bytes());
        let written = self.write_frame(RecordKind::Memory.number(), &[&header, stored]);
        self.compressed = compressed;
        written
    }

    /// Writes the END record, flushes, and gives the sink back.
    pub fn finish(mut self) -> Result<W, ImageError> {
        self.write_frame(RecordKind::End.number(), &[])?;
        self.sink.flush()?;
        self.sink.into_inner().map_err(|error| ImageError::Io(error.into_error()))
    }

    /// Push everything written so far to the sink (a stream sent ahead
    /// while the application runs, before it stops).
    pub fn flush(&mut self) -> Result<(), ImageError> {
        self.sink.flush()?;
        Ok(())
    }

    /// The stream's header (its version, whether it is keyed, its id).
    pub fn header(&self) -> &StreamHeader {
        &self.header
    }

    /// Bytes of the stream so far (header, frames), written or buffered.
    pub fn bytes_written(&self) -> u64 {
        self.bytes_written
    }

    /// Records written so far (END included once written).
    pub fn records_written(&self) -> u64 {
        self.next_seq
    }

    /// One frame: record header, the payload from its parts, the hash.
    fn write_frame(&mut self, kind: u32, payload_parts: &[&[u8]]) -> Result<(), ImageError> {
        let len: u64 = payload_parts.iter().map(|part| part.len() as u64).sum();
        if len > MAX_PAYLOAD_LEN {
            return Err(ImageError::RecordTooLarge { kind, len });
        }
        let header = record_header(kind, self.next_seq, len);
        let mut hasher = self.record_hasher.clone();
        hasher.update(&header);
        for part in payload_parts {
            hasher.update(part);
        }
        let hash = hasher.finalize();
        self.sink.write_all(&header)?;
        for part in payload_parts {
            self.sink.write_all(part)?;
        }
        self.sink.write_all(hash.as_bytes())?;
        self.next_seq += 1;
        self.bytes_written += (RECORD_HEADER_LEN + RECORD_HASH_LEN) as u64 + len;
        Ok(())
    }
}

/// A memory record, decoded: the bytes that were at `addr`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryRecord {
    pub addr: u64,
    pub bytes: Vec<u8>,
    /// The bytes were stored LZ4-compressed.
    pub compressed: bool,
}

/// One record read from a stream, its hash and place in the sequence checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// Memory, decompressed.
    Memory(MemoryRecord),
    /// A record of a kind this version knows, other than memory and END, with
    /// its payload as written (JSON or binary, by kind).
    Known { kind: RecordKind, payload: Vec<u8> },
    /// A record of a kind this version does not know: intact (its hash
    /// matched), from a newer writer; a reader may skip it.
    Unknown { kind: u32, payload: Vec<u8> },
}

impl Record {
    /// The record's kind number.
    pub fn kind_number(&self) -> u32 {
        match self {
            Record::Memory(_) => RecordKind::Memory.number(),
            Record::Known { kind, .. } => kind.number(),
            Record::Unknown { kind, .. } => *kind,
        }
    }

    /// The record's kind, if this version knows it.
    pub fn kind(&self) -> Option<RecordKind> {
        RecordKind::from_number(self.kind_number())
    }

    /// The payload read as JSON (Manifest, Descriptors, Sockets, Processes).
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, ImageError> {
        let payload = match self {
            Record::Memory(memory) => &memory.bytes,
            Record::Known { payload, .. } | Record::Unknown { payload, .. } => payload,
        };
        serde_json::from_slice(payload).map_err(|source| ImageError::Json { kind: self.kind_number(), source })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReaderState {
    Reading,
    Ended,
    Failed,
}

/// Reads an image stream record by record, checking each record's hash and
/// sequence number before handing it out. Also an iterator of
/// `Result<Record, ImageError>` that ends at END or after the first error.
///
/// The reader reads exactly the stream's bytes and nothing past END (the
/// source can go on with other traffic, see [`into_inner`](Self::into_inner)).
/// It reads each record with a few calls (header, payload, hash), so give it
/// a `BufReader` when the source is unbuffered and the records small.
pub struct ImageReader<R: Read> {
    source: R,
    header: StreamHeader,
    record_hasher: blake3::Hasher,
    next_seq: u64,
    state: ReaderState,
}

impl<R: Read> ImageReader<R> {
    /// Reads and checks the stream header. `key` must be the cluster key
    /// when the stream is keyed, and `None` when it is not: a reader given
    /// a key refuses an unauthenticated stream rather than trust it.
    pub fn new(mut source: R, key: Option<&ClusterKey>) -> Result<ImageReader<R>, ImageError> {
        let mut bytes = [0u8; STREAM_HEADER_LEN];
        read_exact_or_truncated(&mut source, &mut bytes, 0)?;
        let header = StreamHeader::from_bytes(&bytes)?;
        match (header.keyed, key) {
            (true, None) => return Err(ImageError::KeyRequired),
            (false, Some(_)) => return Err(ImageError::NotAuthenticated),
            _ => {}
        }
        Ok(ImageReader {
            source,
            header,
            record_hasher: header.record_hasher(key),
            next_seq: 0,
            state: ReaderState::Reading,
        })
    }

    /// The stream's header (its version, whether it is keyed, its id).
    pub fn header(&self) -> &StreamHeader {
        &self.header
    }

    /// Records read and accepted so far (END included once read).
    pub fn records_read(&self) -> u64 {
        self.next_seq
    }

    /// The next record, or `None` once END has been read. After an error it
    /// reads nothing more and answers [`ImageError::ReaderFailed`].
    pub fn next_record(&mut self) -> Result<Option<Record>, ImageError> {
        match self.state {
            ReaderState::Ended => return Ok(None),
            ReaderState::Failed => return Err(ImageError::ReaderFailed),
            ReaderState::Reading => {}
        }
        let record = self.read_record();
        match record {
            Err(_) => self.state = ReaderState::Failed,
            Ok(None) => self.state = ReaderState::Ended,
            Ok(Some(_)) => {}
        }
        record
    }

    /// The source back, positioned just after END once the stream has ended.
    pub fn into_inner(self) -> R {
        self.source
    }

    fn read_record(&mut self) -> Result<Option<Record>, ImageError> {
        let position = self.next_seq;
        let mut header = [0u8; RECORD_HEADER_LEN];
        read_exact_or_truncated(&mut self.source, &mut header, position)?;
        let kind = u32::from_le_bytes(array(&header[0..4]));
        let seq = u64::from_le_bytes(array(&header[4..12]));
        let len = u64::from_le_bytes(array(&header[12..20]));
        // Before any allocation: a corrupt length must not become a huge one.
        if len > MAX_PAYLOAD_LEN {
            return Err(ImageError::PayloadTooLarge { position, len });
        }
        let payload = self.read_payload(len)?;
        let mut hash = [0u8; RECORD_HASH_LEN];
        read_exact_or_truncated(&mut self.source, &mut hash, position)?;

        let mut hasher = self.record_hasher.clone();
        hasher.update(&header);
        hasher.update(&payload);
        // blake3::Hash compares in constant time, as a MAC check must.
        if hasher.finalize() != blake3::Hash::from_bytes(hash) {
            return Err(if self.header.keyed && position == 0 {
                ImageError::WrongKey
            } else {
                ImageError::CorruptRecord { position }
            });
        }
        if seq != position {
            return Err(ImageError::OutOfSequence { expected: position, found: seq });
        }
        self.next_seq += 1;

        Ok(match RecordKind::from_number(kind) {
            Some(RecordKind::End) => None,
            Some(RecordKind::Memory) => Some(Record::Memory(decode_memory(position, payload)?)),
            Some(kind) => Some(Record::Known { kind, payload }),
            None => Some(Record::Unknown { kind, payload }),
        })
    }

    /// Exactly `len` bytes (at most MAX_PAYLOAD_LEN, checked by the caller).
    fn read_payload(&mut self, len: u64) -> Result<Vec<u8>, ImageError> {
        // The bound was checked, so this fits in memory and in usize.
        let mut payload = Vec::with_capacity(len as usize);
        (&mut self.source).take(len).read_to_end(&mut payload)?;
        if (payload.len() as u64) < len {
            return Err(ImageError::Truncated { records: self.next_seq });
        }
        Ok(payload)
    }
}

impl<R: Read> Iterator for ImageReader<R> {
    type Item = Result<Record, ImageError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.state == ReaderState::Failed {
            return None;
        }
        self.next_record().transpose()
    }
}

impl<R: Read> std::iter::FusedIterator for ImageReader<R> {}

/// `read_exact`, with the end of the source reported as a truncated stream.
fn read_exact_or_truncated(source: &mut impl Read, buf: &mut [u8], records: u64) -> Result<(), ImageError> {
    source.read_exact(buf).map_err(|error| match error.kind() {
        io::ErrorKind::UnexpectedEof => ImageError::Truncated { records },
        _ => ImageError::Io(error),
    })
}

/// A memory record's payload (its hash already checked) as address and bytes.
fn decode_memory(position: u64, mut payload: Vec<u8>) -> Result<MemoryRecord, ImageError> {
    let malformed = |problem: String| ImageError::MalformedMemory { position, problem };
    if payload.len() < MEMORY_HEADER_LEN {
        return Err(malformed(format!("{} bytes, fewer than its {MEMORY_HEADER_LEN}-byte header", payload.len())));
    }
    let addr = u64::from_le_bytes(array(&payload[0..8]));
    let len = u32::from_le_bytes(array(&payload[8..12]));
    let encoding = u32::from_le_bytes(array(&payload[12..16]));
    let stored = &payload[MEMORY_HEADER_LEN..];
    if u64::from(len) > MAX_PAYLOAD_LEN {
        return Err(malformed(format!("it decodes to {len} bytes, more than the limit of {MAX_PAYLOAD_LEN}")));
    }
    if addr.checked_add(u64::from(len)).is_none() {
        return Err(malformed(format!("{len} bytes at {addr:#x} go past the end of the address space")));
    }
    let (bytes, compressed) = if encoding == MemoryEncoding::Raw as u32 {
        if stored.len() != len as usize {
            return Err(malformed(format!("it declares {len} bytes but holds {}", stored.len())));
        }
        // In place: no second buffer of a chunk's size.
        payload.drain(..MEMORY_HEADER_LEN);
        (payload, false)
    } else if encoding == MemoryEncoding::Lz4Block as u32 {
        let mut bytes = vec![0u8; len as usize];
        let decoded = lz4_flex::block::decompress_into(stored, &mut bytes)
            .map_err(|error| malformed(format!("its LZ4 data does not decode: {error}")))?;
        if decoded != bytes.len() {
            return Err(malformed(format!("it declares {len} bytes but its LZ4 data decodes to {decoded}")));
        }
        (bytes, true)
    } else {
        return Err(malformed(format!("unknown encoding {encoding}")));
    };
    Ok(MemoryRecord { addr, bytes, compressed })
}

#[cfg(test)]
mod tests {
    use std::ops::Range;
    use std::time::Instant;

    use serde::Deserialize;

    use super::*;

    const KEY: ClusterKey = [7; 32];
    const OTHER_KEY: ClusterKey = [8; 32];
    /// A kind no version knows yet, as a newer writer's optional record.
    const NEWER_KIND: u32 = 1000;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Manifest {
        program: String,
        node: String,
        lwk_version: String,
    }

    fn manifest() -> Manifest {
        Manifest { program: "/bin/app".into(), node: "node-a".into(), lwk_version: "0.1.0".into() }
    }

    /// Deterministic bytes that do not compress (xorshift).
    fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut bytes = Vec::with_capacity(len + 8);
        while bytes.len() < len {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            bytes.extend_from_slice(&state.to_le_bytes());
        }
        bytes.truncate(len);
        bytes
    }

    /// The memory of the large-image test: even pages text-like (they
    /// compress), odd pages random (they do not).
    fn page_contents(addr: u64, len: usize) -> Vec<u8> {
        assert!(addr.is_multiple_of(4096) && len.is_multiple_of(4096));
        let mut bytes = Vec::with_capacity(len);
        for page in addr / 4096..(addr + len as u64) / 4096 {
            if page % 2 == 0 {
                let line = format!("page {page}: the quick brown fox jumps over the lazy dog\n");
                bytes.extend(line.bytes().cycle().take(4096));
            } else {
                bytes.extend(random_bytes(page, 4096));
            }
        }
        bytes
    }

    /// One record of every kind, an unknown one among them, then END.
    fn sample_stream(key: Option<&ClusterKey>) -> Vec<u8> {
        let mut writer = ImageWriter::new(Vec::new(), key).unwrap();
        writer.json(RecordKind::Manifest, &manifest()).unwrap();
        writer.record(RecordKind::LwkState, b"lwk state blob").unwrap();
        writer.record(RecordKind::ThreadContexts, &[1, 2, 3, 4]).unwrap();
        writer.memory(0x7000_0000, &[0x5a; 8192]).unwrap();
        writer.memory(0x7000_4000, &random_bytes(1, 300)).unwrap();
        writer.json(RecordKind::Descriptors, &vec![0, 1, 2]).unwrap();
        writer.write_frame(NEWER_KIND, &[b"from a newer writer"]).unwrap();
        writer.json(RecordKind::Sockets, &serde_json::json!({"tcp": []})).unwrap();
        writer.json(RecordKind::Processes, &serde_json::json!([{"pid": 1}])).unwrap();
        writer.record(RecordKind::LwkState, &[]).unwrap();
        writer.finish().unwrap()
    }

    fn read_all(stream: &[u8], key: Option<&ClusterKey>) -> Result<Vec<Record>, ImageError> {
        ImageReader::new(stream, key)?.collect()
    }

    /// The byte ranges of the stream's frames (record header, payload, hash).
    fn frames(stream: &[u8]) -> Vec<Range<usize>> {
        let mut frames = Vec::new();
        let mut start = STREAM_HEADER_LEN;
        while start < stream.len() {
            let len = u64::from_le_bytes(array(&stream[start + 12..start + 20])) as usize;
            let end = start + RECORD_HEADER_LEN + len + RECORD_HASH_LEN;
            frames.push(start..end);
            start = end;
        }
        assert_eq!(start, stream.len());
        frames
    }

    /// The stream with its frames in the given order.
    fn reframed(stream: &[u8], order: &[usize]) -> Vec<u8> {
        let frames = frames(stream);
        let mut out = stream[..STREAM_HEADER_LEN].to_vec();
        for &index in order {
            out.extend_from_slice(&stream[frames[index].clone()]);
        }
        out
    }

    fn check_sample(records: &[Record]) {
        assert_eq!(records.len(), 10);
        assert_eq!(records[0].kind(), Some(RecordKind::Manifest));
        assert_eq!(records[0].json::<Manifest>().unwrap(), manifest());
        assert_eq!(records[1], Record::Known { kind: RecordKind::LwkState, payload: b"lwk state blob".to_vec() });
        assert_eq!(records[2], Record::Known { kind: RecordKind::ThreadContexts, payload: vec![1, 2, 3, 4] });
        assert_eq!(
            records[3],
            Record::Memory(MemoryRecord { addr: 0x7000_0000, bytes: vec![0x5a; 8192], compressed: true })
        );
        assert_eq!(
            records[4],
            Record::Memory(MemoryRecord { addr: 0x7000_4000, bytes: random_bytes(1, 300), compressed: false })
        );
        assert_eq!(records[5].kind(), Some(RecordKind::Descriptors));
        assert_eq!(records[5].json::<Vec<i32>>().unwrap(), vec![0, 1, 2]);
        assert_eq!(records[6], Record::Unknown { kind: NEWER_KIND, payload: b"from a newer writer".to_vec() });
        assert_eq!(records[6].kind(), None);
        assert_eq!(records[7].kind(), Some(RecordKind::Sockets));
        assert_eq!(records[7].json::<serde_json::Value>().unwrap(), serde_json::json!({"tcp": []}));
        assert_eq!(records[8].kind(), Some(RecordKind::Processes));
        assert_eq!(records[8].json::<serde_json::Value>().unwrap(), serde_json::json!([{"pid": 1}]));
        assert_eq!(records[9], Record::Known { kind: RecordKind::LwkState, payload: vec![] });
    }

    #[test]
    fn image_round_trip_of_every_kind_unkeyed() {
        let stream = sample_stream(None);
        let mut reader = ImageReader::new(&stream[..], None).unwrap();
        assert!(!reader.header().keyed);
        assert_eq!((reader.header().major, reader.header().minor), (FORMAT_MAJOR, FORMAT_MINOR));
        let records: Vec<Record> = reader.by_ref().collect::<Result<_, _>>().unwrap();
        check_sample(&records);
        assert_eq!(reader.records_read(), 11, "ten records and END");
        assert!(reader.next_record().unwrap().is_none(), "nothing after END");
    }

    #[test]
    fn image_round_trip_of_every_kind_keyed() {
        let stream = sample_stream(Some(&KEY));
        let reader = ImageReader::new(&stream[..], Some(&KEY)).unwrap();
        assert!(reader.header().keyed);
        check_sample(&reader.collect::<Result<Vec<_>, _>>().unwrap());
    }

    #[test]
    fn image_kind_numbers_are_the_formats() {
        let numbers: Vec<u32> = RecordKind::ALL.iter().map(|kind| kind.number()).collect();
        assert_eq!(numbers, [1, 2, 3, 4, 5, 6, 7, 8, 9, 0xFFFF_FFFF]);
        for kind in RecordKind::ALL {
            assert_eq!(RecordKind::from_number(kind.number()), Some(kind));
        }
        assert_eq!(RecordKind::from_number(0), None);
    }

    #[test]
    fn image_every_flipped_bit_is_detected() {
        for key in [None, Some(&KEY)] {
            let stream = sample_stream(key);
            for position in 0..stream.len() {
                for bit in 0..8 {
                    let mut corrupt = stream.clone();
                    corrupt[position] ^= 1 << bit;
                    assert!(
                        read_all(&corrupt, key).is_err(),
                        "bit {bit} of byte {position} flipped (keyed: {}) went unnoticed",
                        key.is_some()
                    );
                }
            }
        }
    }

    #[test]
    fn image_flipped_bits_are_reported_as_what_they_hit() {
        let stream = sample_stream(None);
        let frames = frames(&stream);
        let mut corrupt = stream.clone();
        corrupt[frames[2].start] ^= 1; // the kind of record 2
        assert!(matches!(read_all(&corrupt, None), Err(ImageError::CorruptRecord { position: 2 })));
        let mut corrupt = stream.clone();
        corrupt[frames[3].end - 1] ^= 0x80; // the hash of record 3
        assert!(matches!(read_all(&corrupt, None), Err(ImageError::CorruptRecord { position: 3 })));
        let mut corrupt = stream.clone();
        corrupt[10] ^= 1; // the minor version: in every hash
        assert!(matches!(read_all(&corrupt, None), Err(ImageError::CorruptRecord { position: 0 })));
        let mut corrupt = stream.clone();
        corrupt[0] ^= 1;
        assert!(matches!(read_all(&corrupt, None), Err(ImageError::NotAnImage { .. })));
    }

    #[test]
    fn image_reordered_dropped_and_replayed_records_are_detected() {
        for key in [None, Some(&KEY)] {
            let stream = sample_stream(key);
            let count = frames(&stream).len();
            let all: Vec<usize> = (0..count).collect();
            assert_eq!(read_all(&reframed(&stream, &all), key).unwrap().len(), count - 1);

            let mut swapped = all.clone();
            swapped.swap(1, 2);
            let error = read_all(&reframed(&stream, &swapped), key).unwrap_err();
            assert!(matches!(error, ImageError::OutOfSequence { expected: 1, found: 2 }), "{error}");

            let dropped: Vec<usize> = all.iter().copied().filter(|&index| index != 4).collect();
            let error = read_all(&reframed(&stream, &dropped), key).unwrap_err();
            assert!(matches!(error, ImageError::OutOfSequence { expected: 4, found: 5 }), "{error}");

            let mut replayed = all.clone();
            replayed.insert(4, 3);
            let error = read_all(&reframed(&stream, &replayed), key).unwrap_err();
            assert!(matches!(error, ImageError::OutOfSequence { expected: 4, found: 3 }), "{error}");

            let without_end = &all[..count - 1];
            let error = read_all(&reframed(&stream, without_end), key).unwrap_err();
            assert!(matches!(error, ImageError::Truncated { records: 10 }), "{error}");
        }
    }

    #[test]
    fn image_record_from_another_stream_is_detected() {
        // Same key, same position, same contents: only the stream id differs.
        let first = sample_stream(Some(&KEY));
        let second = sample_stream(Some(&KEY));
        let frame = frames(&second)[3].clone();
        let mut spliced = first.clone();
        spliced[frame.clone()].copy_from_slice(&second[frame]);
        let error = read_all(&spliced, Some(&KEY)).unwrap_err();
        assert!(matches!(error, ImageError::CorruptRecord { position: 3 }), "{error}");
    }

    #[test]
    fn image_wrong_or_missing_key_is_refused() {
        let keyed = sample_stream(Some(&KEY));
        let mut reader = ImageReader::new(&keyed[..], Some(&OTHER_KEY)).unwrap();
        let error = reader.next_record().unwrap_err();
        assert!(matches!(error, ImageError::WrongKey));
        assert!(error.to_string().contains("the stream is not authenticated with this cluster key"), "{error}");
        assert!(matches!(reader.next_record(), Err(ImageError::ReaderFailed)));
        assert!(reader.next().is_none(), "the iterator ends after an error");

        assert!(matches!(ImageReader::new(&keyed[..], None), Err(ImageError::KeyRequired)));
        // An unkeyed stream, or a keyed one with its flag cleared, is not
        // accepted by a reader that expects authentication.
        let unkeyed = sample_stream(None);
        assert!(matches!(ImageReader::new(&unkeyed[..], Some(&KEY)), Err(ImageError::NotAuthenticated)));
        let mut downgraded = keyed.clone();
        downgraded[12] &= !1;
        assert!(matches!(ImageReader::new(&downgraded[..], Some(&KEY)), Err(ImageError::NotAuthenticated)));
    }

    #[test]
    fn image_truncated_anywhere_is_reported_as_truncated() {
        let stream = sample_stream(Some(&KEY));
        for end in 0..stream.len() {
            match read_all(&stream[..end], Some(&KEY)) {
                Err(ImageError::Truncated { .. }) => {}
                other => panic!("stream cut at {end} of {}: {other:?}", stream.len()),
            }
        }
        let error = read_all(&stream[..stream.len() - 1], Some(&KEY)).unwrap_err();
        assert_eq!(error.to_string(), "the stream ends after 10 records without an END record: it is truncated");
    }

    #[test]
    fn image_oversize_length_is_refused_before_allocating() {
        for len in [MAX_PAYLOAD_LEN + 1, 1 << 40, u64::MAX] {
            let mut stream = ImageWriter::new(Vec::new(), None).unwrap().sink.into_inner().unwrap();
            stream.extend_from_slice(&record_header(RecordKind::LwkState.number(), 0, len));
            // Allocating `len` bytes would abort the test; refusing it is instant.
            let error = read_all(&stream, None).unwrap_err();
            assert!(
                matches!(error, ImageError::PayloadTooLarge { position: 0, len: found } if found == len),
                "{error}"
            );
        }
        // The writer refuses to write one too (the parts are one 4 MiB buffer, repeated).
        let part = vec![0u8; MEMORY_CHUNK_LEN];
        let parts = vec![&part[..]; (MAX_PAYLOAD_LEN as usize / MEMORY_CHUNK_LEN) + 1];
        let mut writer = ImageWriter::new(io::sink(), None).unwrap();
        let error = writer.write_frame(RecordKind::LwkState.number(), &parts).unwrap_err();
        assert!(matches!(error, ImageError::RecordTooLarge { .. }), "{error}");
    }

    #[test]
    fn image_unknown_major_version_is_refused_naming_both() {
        let mut stream = sample_stream(None);
        stream[8..10].copy_from_slice(&2u16.to_le_bytes());
        stream[10..12].copy_from_slice(&3u16.to_le_bytes());
        let error = ImageReader::new(&stream[..], None).err().unwrap();
        assert!(matches!(error, ImageError::UnsupportedVersion { found_major: 2, found_minor: 3 }));
        let message = error.to_string();
        assert!(message.contains("2.3") && message.contains("1.x"), "{message}");
    }

    #[test]
    fn image_newer_minor_version_is_read() {
        let header = StreamHeader { major: FORMAT_MAJOR, minor: FORMAT_MINOR + 5, keyed: false, stream_id: [3; 16] };
        let mut writer = ImageWriter::with_header(Vec::new(), None, header).unwrap();
        writer.write_frame(NEWER_KIND, &[b"new"]).unwrap();
        writer.record(RecordKind::LwkState, b"state").unwrap();
        let stream = writer.finish().unwrap();
        let mut reader = ImageReader::new(&stream[..], None).unwrap();
        assert_eq!(reader.header(), &header);
        let records: Vec<Record> = reader.by_ref().collect::<Result<_, _>>().unwrap();
        assert_eq!(
            records,
            [
                Record::Unknown { kind: NEWER_KIND, payload: b"new".to_vec() },
                Record::Known { kind: RecordKind::LwkState, payload: b"state".to_vec() },
            ]
        );
    }

    #[test]
    fn image_unknown_stream_flags_are_refused() {
        let mut stream = sample_stream(None);
        stream[12] |= 4;
        assert!(matches!(ImageReader::new(&stream[..], None), Err(ImageError::UnknownStreamFlags { flags: 4 })));
    }

    #[test]
    fn image_reader_stops_at_end_and_leaves_what_follows() {
        let mut stream = sample_stream(None);
        stream.extend_from_slice(b"verdict");
        let mut reader = ImageReader::new(&stream[..], None).unwrap();
        assert_eq!(reader.by_ref().count(), 10);
        assert_eq!(reader.into_inner(), b"verdict");
    }

    #[test]
    fn image_lz4_is_used_when_it_pays() {
        let compressible = page_contents(0, 64 << 10).into_iter().take(4096).cycle().take(64 << 10).collect::<Vec<_>>();
        let random = random_bytes(9, 64 << 10);
        let mut writer = ImageWriter::new(Vec::new(), None).unwrap();
        writer.memory(0x1000_0000, &compressible).unwrap();
        let after_compressible = writer.bytes_written();
        writer.memory(0x2000_0000, &random).unwrap();
        let random_len = writer.bytes_written() - after_compressible;
        let stream = writer.finish().unwrap();
        assert!(after_compressible < 4096, "64 KiB of repeated text took {after_compressible} bytes");
        assert!(random_len > 64 << 10, "random bytes are stored as they are: {random_len}");

        let records = read_all(&stream, None).unwrap();
        assert_eq!(
            records,
            [
                Record::Memory(MemoryRecord { addr: 0x1000_0000, bytes: compressible, compressed: true }),
                Record::Memory(MemoryRecord { addr: 0x2000_0000, bytes: random, compressed: false }),
            ]
        );
    }

    #[test]
    fn image_memory_is_chunked() {
        let data = random_bytes(5, 2 * MEMORY_CHUNK_LEN + 100);
        let mut writer = ImageWriter::new(Vec::new(), None).unwrap();
        writer.memory(0x4000_0000, &data).unwrap();
        writer.memory(0x5000_0000, &[]).unwrap();
        let stream = writer.finish().unwrap();
        let chunks: Vec<(u64, usize)> = read_all(&stream, None)
            .unwrap()
            .into_iter()
            .map(|record| match record {
                Record::Memory(memory) => (memory.addr, memory.bytes.len()),
                other => panic!("not memory: {other:?}"),
            })
            .collect();
        let chunk = MEMORY_CHUNK_LEN as u64;
        assert_eq!(
            chunks,
            [(0x4000_0000, MEMORY_CHUNK_LEN), (0x4000_0000 + chunk, MEMORY_CHUNK_LEN), (0x4000_0000 + 2 * chunk, 100)]
        );
    }

    #[test]
    fn image_writer_refuses_misuse() {
        let mut writer = ImageWriter::new(io::sink(), None).unwrap();
        assert!(matches!(
            writer.record(RecordKind::Memory, b""),
            Err(ImageError::KindHasItsOwnMethod { method: "memory", .. })
        ));
        assert!(matches!(
            writer.record(RecordKind::End, b""),
            Err(ImageError::KindHasItsOwnMethod { method: "finish", .. })
        ));
        assert!(matches!(writer.memory(u64::MAX - 10, &[0; 20]), Err(ImageError::MemoryRangeOverflow { .. })));
        assert_eq!(writer.records_written(), 0);
    }

    #[test]
    fn image_malformed_memory_record_is_refused() {
        let mut payload = vec![0u8; MEMORY_HEADER_LEN + 4];
        payload[8..12].copy_from_slice(&4u32.to_le_bytes());
        payload[12..16].copy_from_slice(&9u32.to_le_bytes()); // no such encoding
        let mut writer = ImageWriter::new(Vec::new(), None).unwrap();
        writer.write_frame(RecordKind::Memory.number(), &[&payload]).unwrap();
        let stream = writer.finish().unwrap();
        let error = read_all(&stream, None).unwrap_err();
        assert!(matches!(error, ImageError::MalformedMemory { position: 0, .. }), "{error}");
        assert!(error.to_string().contains("unknown encoding 9"), "{error}");
    }

    /// The process's peak resident size, in bytes.
    fn peak_resident_bytes() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|line| line.starts_with("VmHWM:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
    }

    #[test]
    fn image_large_memory_streams_in_bounded_memory() {
        const IMAGE_LEN: usize = 128 << 20;
        const SLICE_LEN: usize = 8 << 20;
        const BASE: u64 = 0x7f00_0000_0000;
        // Writer and reader on the two ends of a pipe: the image exists only
        // one record at a time.
        let (pipe_reader, pipe_writer) = io::pipe().unwrap();
        std::fs::write("/proc/self/clear_refs", "5").unwrap(); // resets the peak
        let peak_before = peak_resident_bytes();
        let start = Instant::now();
        let writer_thread = std::thread::spawn(move || {
            let mut writer = ImageWriter::new(pipe_writer, Some(&KEY)).unwrap();
            for offset in (0..IMAGE_LEN).step_by(SLICE_LEN) {
                let addr = BASE + offset as u64;
                writer.memory(addr, &page_contents(addr, SLICE_LEN)).unwrap();
            }
            let stream_len = writer.bytes_written() + (RECORD_HEADER_LEN + RECORD_HASH_LEN) as u64;
            writer.finish().unwrap();
            stream_len
        });
        let mut next_addr = BASE;
        let mut compressed_records = 0;
        for record in ImageReader::new(pipe_reader, Some(&KEY)).unwrap() {
            let Record::Memory(memory) = record.unwrap() else { panic!("not memory") };
            assert_eq!(memory.addr, next_addr);
            assert!(memory.bytes == page_contents(memory.addr, memory.bytes.len()), "memory at {:#x}", memory.addr);
            next_addr += memory.bytes.len() as u64;
            compressed_records += usize::from(memory.compressed);
        }
        let seconds = start.elapsed().as_secs_f64();
        let stream_len = writer_thread.join().unwrap();
        let peak_growth = peak_resident_bytes().saturating_sub(peak_before);
        assert_eq!(next_addr, BASE + IMAGE_LEN as u64);
        assert_eq!(compressed_records, IMAGE_LEN / MEMORY_CHUNK_LEN, "half-text chunks compress");
        println!(
            "image: {} MiB of memory (half text, half random) as a {} MiB keyed stream, generated, written, piped, \
             read and compared in {seconds:.2} s; peak resident growth {} MiB",
            IMAGE_LEN >> 20,
            stream_len >> 20,
            peak_growth >> 20,
        );
        assert!(peak_growth < 64 << 20, "peak resident size grew by {} MiB", peak_growth >> 20);

        // Throughput, after the peak was taken: the writer and the reader
        // alone, against BLAKE3 alone over the same bytes (the least either
        // end must do). Printed, not asserted: the machine is shared.
        const DATA_LEN: usize = 16 << 20;
        const ROUNDS: usize = 8;
        let data = page_contents(BASE, DATA_LEN);
        let mut writer = ImageWriter::new(io::sink(), Some(&KEY)).unwrap();
        let start = Instant::now();
        for round in 0..ROUNDS {
            writer.memory(BASE + (round * DATA_LEN) as u64, &data).unwrap();
        }
        let write_seconds = start.elapsed().as_secs_f64();
        let mut writer = ImageWriter::new(Vec::new(), Some(&KEY)).unwrap();
        writer.memory(BASE, &data).unwrap();
        let stream = writer.finish().unwrap();
        let start = Instant::now();
        for _ in 0..ROUNDS {
            for record in ImageReader::new(&stream[..], Some(&KEY)).unwrap() {
                record.unwrap();
            }
        }
        let read_seconds = start.elapsed().as_secs_f64();
        let start = Instant::now();
        for _ in 0..ROUNDS {
            std::hint::black_box(blake3::keyed_hash(&KEY, &data));
        }
        let hash_seconds = start.elapsed().as_secs_f64();
        let mib = ((ROUNDS * DATA_LEN) >> 20) as f64;
        println!(
            "image throughput (same memory, {} build): writer {:.0} MiB/s, reader {:.0} MiB/s, keyed BLAKE3 alone \
             {:.0} MiB/s (writer {:.2}x, reader {:.2}x of it)",
            if cfg!(debug_assertions) { "debug" } else { "release" },
            mib / write_seconds,
            mib / read_seconds,
            mib / hash_seconds,
            hash_seconds / write_seconds,
            hash_seconds / read_seconds,
        );
    }
}
