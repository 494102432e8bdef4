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
pub const FORMAT_MINOR: u16 = 0;

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
    /// Empty: the stream is complete (written by [`ImageWriter::finish`]).
    End = 0xFFFF_FFFF,
}

impl RecordKind {
    /// Every kind this version knows.
    pub const ALL: [RecordKind; 8] = [
        RecordKind::Manifest,
        RecordKind::LwkState,
        RecordKind::ThreadContexts,
        RecordKind::Memory,
        RecordKind::Descriptors,
        RecordKind::Sockets,
        RecordKind::Processes,
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
/// It reads each record in three calls, so give it a `BufReader` when the
/// source is unbuffered and the records small.
pub struct ImageReader<R: Read> {
    source: R,
    header: StreamHeader,
    keyed: bool,
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
            keyed: header.keyed,
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
            return Err(if self.keyed && position == 0 {
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

