//! The event log in sled: what is appended, how it is keyed, how it is made durable, and
//! how it is read back.
//!
//! Everything lives in one sled tree, written one row at a time (see Crash safety).
//!
//! Keys (first byte is the row kind; stream ids never contain NUL):
//! - `B` first_position:u64be → [`CommitRecord`]: the encoded envelopes of consecutive
//!   positions (the exact bytes published to JetStream), the idempotency entries of the
//!   commands in it, and the index rows its events change. A record holds whole commands
//!   only, and is closed at the first command boundary past [`RECORD_BYTES_MAX`], so one
//!   batch of commands is a handful of rows, not one per event.
//! - index rows: [`IndexName`]'s tag, then the domain's key → value (written right after
//!   the commit record that changes them; the domain names its indexes and their key
//!   layouts, see `domain/aggregate.rs`: `E` emails, `O` open orders, `H` shipments)
//! - Derived rows, written in snapshots (see below):
//!   - `A` stream_id → current aggregate state
//!   - `S` stream_id NUL first_version:u64be → [`PositionChunk`] (stream index)
//!   - `C` command_id → [`CommandRecord`] (idempotency)
//! - `Z` name → metadata: `derived` (position up to which the derived rows are complete),
//!   `relay_published`.
//!
//! **Crash safety without batches.** The command path never calls sled's `apply_batch`
//! or a transaction: the first one in a process switches sled 0.34 into a global
//! reader-writer lock mode for good (`concurrency_control.rs`), after which every batch
//! waits for a running `flush` and excludes every read, so the writer could not write
//! batch N+1 while the flusher syncs batch N. [`EventLog::write`] instead inserts a
//! batch's rows one at a time, in order, from the one writer thread. What a crash
//! leaves is then a prefix of those inserts: sled replays its log in LSN order and stops
//! at the first torn or missing message (`pagecache/iterator.rs`, `LogIter::next` "found
//! a tear" and `check_contiguity_in_unstable_tail`), and one thread's inserts take
//! increasing LSNs. Every prefix is recoverable:
//! - a commit record is one insert holding whole commands, so there is never half a
//!   command; records are inserted in position order, so positions stay gapless;
//! - the index rows a record changes follow it, and are also inside it: on start the
//!   writer rewrites the index rows of every record after `derived`, in log order (they
//!   are absolute values, so rewriting a row already written is harmless);
//! - a snapshot's rows come before its `derived` mark: a present mark means the whole
//!   snapshot is present (and so are the index rows of every record up to it).
//!
//! `writer::crash_tests` cuts the rows of a sequence of batches at every point and
//! checks that recovery from each prefix yields exactly the commands of its records.
//!
//! **Snapshots.** Derived rows are kept in memory by the writer; every ~100 ms it takes
//! a snapshot of them and writes it a slice at a time along with the next batches of
//! commits, and `derived` after the last slice. A crash loses no information: on start
//! the writer replays the commit records after `derived` to rebuild them. Rows of a
//! snapshot cut short by the crash may be stored beyond `derived`: a state then already
//! holds the replayed events up to its version (they are skipped), and index chunks and
//! idempotency rows are rewritten under the same keys. This keeps a command's
//! synchronous write to its commit record plus rare index rows.
//!
//! **Durability.** `sync` calls sled's `flush` (writes its buffers, then
//! `sync_file_range`: survives a process crash, not a power loss) and then, in `fsync`
//! mode, `fdatasync`s sled's data file `<dir>/db`. That file holds everything as long
//! as no node outgrows sled's blob threshold (a quarter of the segment size, blobs are
//! separate files sled never fsyncs); records are capped (at most `RECORD_BYTES_MAX`
//! plus one command, whose size the domain's limits bound to tens of KiB) and the
//! segment size raised so that cannot happen. A flush covers every insert that returned
//! before it started, so inserts of later batches may run during it.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use prost::Message;
use shop_shared::ids::StreamId;
use shop_shared::pb;
use shop_shared::storage::{open_repairing, OpenFailure};

mod tail;
pub use tail::LogTail;

/// Row kind prefixes.
const RECORD: u8 = b'B';
const STATE: u8 = b'A';
const STREAM: u8 = b'S';
const COMMAND: u8 = b'C';
const META: u8 = b'Z';

/// Metadata key: position up to which the derived rows (A, S, C) are complete.
const DERIVED: &str = "derived";
/// Metadata key: this data dir's node id (the writer lease's holder, `failover/lease.rs`).
const NODE_ID: &str = "node_id";
/// Metadata key: a cut of the log after this position is under way (see
/// [`EventLog::cut_after`]); finished at the next open.
const CUT_AFTER: &str = "cut_after";
/// Metadata key of the relay's published-position cursor.
pub const RELAY_CURSOR: &str = "relay_published";

/// A secondary index kept in the log: rows `tag key → value`, written in the same atomic
/// batch as the commit whose events change them. The domain declares its indexes and
/// computes the changes (`domain::Aggregate::index_changes`); the log only stores them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IndexName {
    tag: u8,
    name: &'static str,
}

impl IndexName {
    /// An index whose rows start with `tag`; fails to compile (in a `const`) if the tag
    /// is one of the log's own row kinds.
    pub const fn new(tag: u8, name: &'static str) -> Self {
        assert!(
            !matches!(tag, RECORD | STATE | STREAM | COMMAND | META),
            "index tag collides with a row kind of the log"
        );
        IndexName { tag, name }
    }

    pub fn name(self) -> &'static str {
        self.name
    }
}

/// An index entry as scanned: (key, value).
pub type IndexEntry = (Vec<u8>, Vec<u8>);

/// One index entry set (`value: Some`) or removed (`None`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexChange {
    pub index: IndexName,
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
}

impl IndexChange {
    pub fn put(index: IndexName, key: Vec<u8>, value: Vec<u8>) -> Self {
        IndexChange {
            index,
            key,
            value: Some(value),
        }
    }

    pub fn remove(index: IndexName, key: Vec<u8>) -> Self {
        IndexChange {
            index,
            key,
            value: None,
        }
    }
}

/// A commit record is closed at the first command boundary once it holds this many bytes
/// of envelopes.
pub const RECORD_BYTES_MAX: usize = 4 * 1024;
/// sled segment size: its blob threshold (segment / 4) stays far above any node of
/// ours (a leaf holds at most 17 entries).
const SEGMENT_BYTES: usize = 8 << 20;
/// Most events one read returns.
pub const READ_LIMIT_MAX: usize = 1_000;

/// How far an acknowledged command is guaranteed to survive.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// sled flush, then fdatasync of its data file: survives power loss. The default.
    Fsync,
    /// sled flush only (sync_file_range): survives a crash of the process, not of the
    /// machine. Faster on disks with slow cache flushes.
    Flush,
}

impl Durability {
    pub fn as_str(self) -> &'static str {
        match self {
            Durability::Fsync => "fsync",
            Durability::Flush => "flush",
        }
    }
}

/// Storage failures. Any of them makes the log unusable until restart: the writer stops
/// and health turns NOT_SERVING, since in-memory and on-disk state may have diverged.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    #[error("I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("corrupt row {key:?}: {reason}")]
    Corrupt { key: String, reason: String },
    #[error(
        "the log in {dir} is damaged: sled cannot open it ({reason}), even without its \
         snapshots. If the stream holds every acknowledged event, move {dir} aside and start \
         again: the server catches up from the stream (SPEC §8); otherwise restore a backup"
    )]
    Damaged { dir: PathBuf, reason: String },
}

/// The sled errors that mean damaged files (not permissions, space or a held lock).
fn is_damage(e: &sled::Error) -> bool {
    matches!(
        e,
        sled::Error::Corruption { .. } | sled::Error::ReportableBug(_)
    )
}

impl LogError {
    /// Whether the filesystem is full (or the user's quota spent): the one storage
    /// failure that goes away by itself, once space is freed.
    pub fn is_disk_full(&self) -> bool {
        let io = match self {
            LogError::Sled(sled::Error::Io(e)) | LogError::Io { source: e, .. } => e,
            _ => return false,
        };
        matches!(
            io.kind(),
            std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
        )
    }
}

impl LogError {
    /// Whether sled could not take the data dir's file lock: another process has the
    /// log open, or this one did until a moment ago (sled's IO threads can hold the data
    /// file, and with it the lock, for a moment after the last handle is gone).
    pub fn is_locked(&self) -> bool {
        matches!(self, LogError::Sled(sled::Error::Io(e)) if e.to_string().contains("could not acquire lock"))
    }
}

/// The events of whole commands at consecutive positions, their idempotency entries and
/// the index rows they change: everything one insert must carry so that a crash never
/// leaves part of a command (see Crash safety above).
#[derive(Clone, PartialEq, prost::Message)]
pub struct CommitRecord {
    #[prost(bytes = "bytes", repeated, tag = "1")]
    pub envelopes: Vec<bytes::Bytes>,
    #[prost(message, repeated, tag = "2")]
    pub commands: Vec<CommandEntry>,
    /// The index rows these events change, in order (absent in records written before
    /// they were carried here, when index rows were written in the same sled batch).
    #[prost(message, repeated, tag = "3")]
    pub index_rows: Vec<IndexRow>,
}

/// One index row as written: its full key (tag included) and new value, `None` removed.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IndexRow {
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    #[prost(bytes = "vec", optional, tag = "2")]
    pub value: Option<Vec<u8>>,
}

impl From<&IndexChange> for IndexRow {
    fn from(change: &IndexChange) -> Self {
        IndexRow {
            key: prefixed(change.index.tag, &change.key),
            value: change.value.clone(),
        }
    }
}

/// The idempotency entry of one accepted command (with a client-chosen id).
#[derive(Clone, PartialEq, prost::Message)]
pub struct CommandEntry {
    #[prost(string, tag = "1")]
    pub command_id: String,
    #[prost(message, optional, tag = "2")]
    pub record: Option<CommandRecord>,
}

/// The idempotency record of one accepted command.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CommandRecord {
    /// 128-bit hash of the request (RPC name and payload, without the command id).
    #[prost(bytes = "vec", tag = "1")]
    pub request_hash: Vec<u8>,
    /// The reply that was sent.
    #[prost(message, optional, tag = "2")]
    pub result: Option<pb::CommandResult>,
}

/// Positions of consecutive versions of one stream, from the chunk key's first version.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PositionChunk {
    #[prost(uint64, repeated, tag = "1")]
    pub positions: Vec<u64>,
}

/// The sled event log of the command server.
pub struct EventLog {
    db: sled::Db,
    /// A second handle on sled's data file, only for `fdatasync`.
    data_file: File,
    data_path: PathBuf,
    durability: Durability,
}

impl EventLog {
    /// Opens (or creates) the log in `dir`. `cache_bytes` bounds sled's page cache.
    pub fn open(dir: &Path, durability: Durability, cache_bytes: u64) -> Result<Self, LogError> {
        std::fs::create_dir_all(dir).map_err(|source| LogError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let config = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .segment_size(SEGMENT_BYTES)
            .mode(sled::Mode::HighThroughput)
            // Exactly one task flushes (the flusher): sled's own periodic flusher would
            // race with it (upstream sled#1308 can hang concurrent flushes).
            .flush_every_ms(None);
        let db = open_repairing(dir, is_damage, || config.open()).map_err(|e| match e {
            OpenFailure::Error(e) => LogError::Sled(e),
            OpenFailure::Damaged(reason) => LogError::Damaged {
                dir: dir.to_path_buf(),
                reason,
            },
        })?;
        let data_path = dir.join("db");
        let data_file = File::open(&data_path).map_err(|source| LogError::Io {
            path: data_path.clone(),
            source,
        })?;
        let log = EventLog {
            db,
            data_file,
            data_path,
            durability,
        };
        log.finish_cut()?;
        Ok(log)
    }

    /// This data dir's node id, created on first use (durable with the next sync).
    pub fn node_id(&self) -> Result<String, LogError> {
        let key = prefixed(META, NODE_ID.as_bytes());
        if let Some(id) = self.db.get(&key)? {
            return Ok(String::from_utf8_lossy(&id).into_owned());
        }
        let id = shop_shared::ids::generate_id();
        self.db.insert(key, id.as_bytes())?;
        Ok(id)
    }

    /// Removes every event after position `keep` (a deposed writer's tail the stream
    /// never took, already saved by the caller), with every derived row, which the
    /// writer then rebuilds from the records at start. Crash-safe: a mark is made
    /// durable first, and the cut is finished (again, idempotently) at the next open.
    pub fn cut_after(&self, keep: u64) -> Result<(), LogError> {
        self.db
            .insert(prefixed(META, CUT_AFTER.as_bytes()), &keep.to_be_bytes())?;
        self.sync()?;
        self.finish_cut()
    }

    fn finish_cut(&self) -> Result<(), LogError> {
        let Some(keep) = self.meta_u64(CUT_AFTER)? else {
            return Ok(());
        };
        let mut rows = Vec::new();
        for row in self.db.iter() {
            let (key, value) = row?;
            match key.first().copied() {
                Some(META) => {}
                Some(RECORD) => {
                    let first = decode_u64(&key[1..], &key)?;
                    if first > keep {
                        rows.push((key.to_vec(), None));
                        continue;
                    }
                    let mut record = decode_record(&key, &value)?;
                    let kept = usize::try_from(keep - first + 1).unwrap_or(usize::MAX);
                    if record.envelopes.len() > kept {
                        // A record that straddles the cut keeps its first events, the
                        // idempotency entries of those, and no index rows (the writer's
                        // recovery computes them from the events).
                        record.envelopes.truncate(kept);
                        record.commands.retain(|entry| {
                            entry
                                .record
                                .as_ref()
                                .and_then(|r| r.result.as_ref())
                                .is_some_and(|r| r.position <= keep)
                        });
                        record.index_rows.clear();
                        rows.push((key.to_vec(), Some(record.encode_to_vec())));
                    }
                }
                // States, stream index, idempotency records, index rows: rebuilt.
                _ => rows.push((key.to_vec(), None)),
            }
        }
        let mut batch = WriteBatch { rows };
        batch.derived(0);
        let cursor = self.meta_u64(RELAY_CURSOR)?.unwrap_or(0);
        batch.put(
            prefixed(META, RELAY_CURSOR.as_bytes()),
            &cursor.min(keep).to_be_bytes(),
        );
        self.write(batch)?;
        self.sync()?;
        self.db.remove(prefixed(META, CUT_AFTER.as_bytes()))?;
        self.sync()?;
        tracing::warn!(
            keep,
            "event log cut after position {keep}; derived rows are rebuilt"
        );
        Ok(())
    }

    /// sled's data file (`<data-dir>/db`).
    pub fn path(&self) -> &Path {
        &self.data_path
    }

    pub fn durability(&self) -> Durability {
        self.durability
    }

    /// Writes the batch's rows one insert at a time, in order (in memory; durable after
    /// the next [`Self::sync`]). Never a sled batch: see Crash safety above. A crash
    /// keeps a prefix of the rows.
    pub fn write(&self, batch: WriteBatch) -> Result<(), LogError> {
        for (key, value) in batch.rows {
            match value {
                Some(value) => self.db.insert(key, value)?,
                None => self.db.remove(key)?,
            };
        }
        Ok(())
    }

    /// Makes everything applied so far durable, per the durability mode. Only the
    /// flusher calls it.
    pub fn sync(&self) -> Result<(), LogError> {
        self.db.flush()?;
        if self.durability == Durability::Fsync {
            self.data_file.sync_data().map_err(|source| LogError::Io {
                path: self.data_path.clone(),
                source,
            })?;
        }
        Ok(())
    }

    /// Position of the last event, 0 when the log is empty.
    pub fn last_position(&self) -> Result<u64, LogError> {
        match self.db.scan_prefix([RECORD]).next_back() {
            None => Ok(0),
            Some(row) => {
                let (key, value) = row?;
                let first = decode_u64(&key[1..], &key)?;
                let record = decode_record(&key, &value)?;
                Ok(first + record.envelopes.len() as u64 - 1)
            }
        }
    }

    /// Position up to which the derived rows (states, stream index, idempotency) are
    /// complete.
    pub fn derived_position(&self) -> Result<u64, LogError> {
        Ok(self.meta_u64(DERIVED)?.unwrap_or(0))
    }

    /// The envelope at `position`.
    pub fn event(&self, position: u64) -> Result<Option<bytes::Bytes>, LogError> {
        Ok(self
            .read_range(position, position, 1)?
            .pop()
            .map(|(_, e)| e))
    }

    /// Up to `limit` events from `from` to `to` (both inclusive), in order, as stored.
    pub fn read_range(
        &self,
        from: u64,
        to: u64,
        limit: usize,
    ) -> Result<Vec<(u64, bytes::Bytes)>, LogError> {
        let mut out = Vec::new();
        if from > to || limit == 0 {
            return Ok(out);
        }
        self.for_each_record_from(from, |first, record| {
            for (i, envelope) in record.envelopes.into_iter().enumerate() {
                let position = first + i as u64;
                if position > to || out.len() >= limit {
                    return false;
                }
                if position >= from {
                    out.push((position, envelope));
                }
            }
            true
        })?;
        Ok(out)
    }

    /// Calls `visit(first_position, record)` for the record holding `from` and every
    /// later one, until it returns false.
    pub fn for_each_record_from(
        &self,
        from: u64,
        mut visit: impl FnMut(u64, CommitRecord) -> bool,
    ) -> Result<(), LogError> {
        let start = match self.db.range(record_key(0)..=record_key(from)).next_back() {
            Some(row) => row?.0.to_vec(),
            None => record_key(0).to_vec(),
        };
        for row in self.db.range(start..) {
            let (key, value) = row?;
            if key.first() != Some(&RECORD) {
                break;
            }
            let first = decode_u64(&key[1..], &key)?;
            if !visit(first, decode_record(&key, &value)?) {
                break;
            }
        }
        Ok(())
    }

    /// Up to `limit` events of `stream` from version `from_version`, in version order,
    /// decoded: the stream index (up to the derived position) plus the commit records
    /// after it (about a snapshot interval's worth; events both in a chunk written after
    /// `derived` and in the tail are returned once).
    pub fn read_stream(
        &self,
        stream: &StreamId,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<pb::EventEnvelope>, LogError> {
        // Read `derived` first: the chunks read next cover at least up to it.
        let derived = self.derived_position()?;
        let prefix = stream_prefix(stream);
        let mut at = prefix.clone();
        at.extend_from_slice(&from_version.to_be_bytes());
        let start = match self.db.range(prefix.clone()..=at).next_back() {
            Some(row) => row?.0.to_vec(),
            None => prefix.clone(),
        };
        let mut positions = Vec::new();
        'chunks: for row in self.db.range(start..) {
            let (key, value) = row?;
            if !key.starts_with(&prefix) {
                break;
            }
            let first_version = decode_u64(&key[prefix.len()..], &key)?;
            let chunk = PositionChunk::decode(value.as_ref()).map_err(|e| corrupt(&key, e))?;
            for (i, position) in chunk.positions.into_iter().enumerate() {
                if first_version + i as u64 >= from_version {
                    positions.push(position);
                    if positions.len() >= limit {
                        break 'chunks;
                    }
                }
            }
        }
        let mut by_version = BTreeMap::new();
        let mut cached: Option<(u64, CommitRecord)> = None;
        for position in positions {
            let in_cache = cached.as_ref().is_some_and(|(first, r)| {
                (*first..*first + r.envelopes.len() as u64).contains(&position)
            });
            if !in_cache {
                self.for_each_record_from(position, |first, record| {
                    cached = Some((first, record));
                    false
                })?;
            }
            if let Some((first, record)) = &cached {
                if let Some(bytes) = record.envelopes.get((position - first) as usize) {
                    let e = decode_envelope(position, bytes)?;
                    by_version.insert(e.stream_version, e);
                }
            }
        }
        // The tail not yet in the index.
        let wanted = stream.to_string();
        let mut failure = None;
        self.for_each_record_from(derived + 1, |first, record| {
            for (i, bytes) in record.envelopes.iter().enumerate() {
                match decode_envelope(first + i as u64, bytes) {
                    Ok(e) if e.stream_id == wanted && e.stream_version >= from_version => {
                        by_version.insert(e.stream_version, e);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        failure = Some(e);
                        return false;
                    }
                }
            }
            true
        })?;
        if let Some(e) = failure {
            return Err(e);
        }
        Ok(by_version.into_values().take(limit).collect())
    }

    /// The stored state of an aggregate (as of the derived position), encoded.
    pub fn state(&self, stream: &StreamId) -> Result<Option<sled::IVec>, LogError> {
        Ok(self.db.get(state_key(stream))?)
    }

    /// The value of an index entry.
    pub fn index_get(&self, index: IndexName, key: &[u8]) -> Result<Option<Vec<u8>>, LogError> {
        Ok(self.db.get(prefixed(index.tag, key))?.map(|v| v.to_vec()))
    }

    /// The index entries whose keys start with `prefix`: (key, value), in key order.
    pub fn index_scan(&self, index: IndexName, prefix: &[u8]) -> Result<Vec<IndexEntry>, LogError> {
        let mut out = Vec::new();
        for row in self.db.scan_prefix(prefixed(index.tag, prefix)) {
            let (key, value) = row?;
            out.push((key[1..].to_vec(), value.to_vec()));
        }
        Ok(out)
    }

    /// The stored idempotency record of a command id (as of the derived position).
    pub fn command(&self, command_id: &str) -> Result<Option<CommandRecord>, LogError> {
        let key = prefixed(COMMAND, command_id.as_bytes());
        match self.db.get(&key)? {
            None => Ok(None),
            Some(bytes) => CommandRecord::decode(bytes.as_ref())
                .map(Some)
                .map_err(|e| corrupt(&key, e)),
        }
    }

    /// A metadata value.
    pub fn meta_u64(&self, name: &str) -> Result<Option<u64>, LogError> {
        let key = prefixed(META, name.as_bytes());
        match self.db.get(&key)? {
            None => Ok(None),
            Some(v) => decode_u64(&v, &key).map(Some),
        }
    }

    /// Sets a metadata value (durable with the next sync; losing it is harmless).
    pub fn set_meta_u64(&self, name: &str, value: u64) -> Result<(), LogError> {
        self.db
            .insert(prefixed(META, name.as_bytes()), &value.to_be_bytes())?;
        Ok(())
    }

    /// Bytes sled has on disk (for status and benchmarks).
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }
}

/// Rows to write in order, in the log's key layout (`None` removes the row).
#[derive(Default, Clone)]
pub struct WriteBatch {
    rows: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl WriteBatch {
    /// A commit record starting at `first_position`, then the index rows it changes.
    pub fn record(&mut self, first_position: u64, record: &CommitRecord) {
        self.put(record_key(first_position).to_vec(), &record.encode_to_vec());
        for row in &record.index_rows {
            self.index_row(row);
        }
    }

    /// Positions of `stream`'s versions from `first_version` on.
    pub fn stream_chunk(&mut self, stream: &StreamId, first_version: u64, chunk: &PositionChunk) {
        let mut key = stream_prefix(stream);
        key.extend_from_slice(&first_version.to_be_bytes());
        self.put(key, &chunk.encode_to_vec());
    }

    pub fn state(&mut self, stream: &StreamId, state: &[u8]) {
        self.put(state_key(stream), state);
    }

    pub fn command(&mut self, command_id: &str, record: &CommandRecord) {
        self.put(
            prefixed(COMMAND, command_id.as_bytes()),
            &record.encode_to_vec(),
        );
    }

    /// Marks the derived rows complete up to `position`.
    pub fn derived(&mut self, position: u64) {
        self.put(prefixed(META, DERIVED.as_bytes()), &position.to_be_bytes());
    }

    /// Sets or removes an index entry.
    pub fn index_row(&mut self, row: &IndexRow) {
        self.rows.push((row.key.clone(), row.value.clone()));
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Rows in the batch.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// The first `rows` rows only: what a crash part-way through writing the batch
    /// leaves (for the crash tests).
    #[cfg(test)]
    pub(crate) fn truncate(&mut self, rows: usize) {
        self.rows.truncate(rows);
    }

    /// The batch followed by `other`.
    #[cfg(test)]
    pub(crate) fn extend(&mut self, other: WriteBatch) {
        self.rows.extend(other.rows);
    }

    fn put(&mut self, key: Vec<u8>, value: &[u8]) {
        self.rows.push((key, Some(value.to_vec())));
    }
}

fn prefixed(kind: u8, rest: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + rest.len());
    key.push(kind);
    key.extend_from_slice(rest);
    key
}

fn record_key(first_position: u64) -> [u8; 9] {
    let mut key = [RECORD; 9];
    key[1..].copy_from_slice(&first_position.to_be_bytes());
    key
}

fn stream_prefix(stream: &StreamId) -> Vec<u8> {
    let mut key = prefixed(STREAM, stream.to_string().as_bytes());
    key.push(0);
    key
}

fn state_key(stream: &StreamId) -> Vec<u8> {
    prefixed(STATE, stream.to_string().as_bytes())
}

fn decode_u64(bytes: &[u8], key: &[u8]) -> Result<u64, LogError> {
    let array: [u8; 8] = bytes.try_into().map_err(|_| LogError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: format!("expected 8 bytes, found {}", bytes.len()),
    })?;
    Ok(u64::from_be_bytes(array))
}

fn decode_record(key: &[u8], value: &[u8]) -> Result<CommitRecord, LogError> {
    let record = CommitRecord::decode(value).map_err(|e| corrupt(key, e))?;
    if record.envelopes.is_empty() {
        return Err(LogError::Corrupt {
            key: String::from_utf8_lossy(key).into_owned(),
            reason: "empty commit record".into(),
        });
    }
    Ok(record)
}

/// Decodes a stored envelope.
pub fn decode_envelope(position: u64, bytes: &[u8]) -> Result<pb::EventEnvelope, LogError> {
    pb::EventEnvelope::decode(bytes).map_err(|e| LogError::Corrupt {
        key: format!("event at position {position}"),
        reason: e.to_string(),
    })
}

fn corrupt(key: &[u8], error: prost::DecodeError) -> LogError {
    LogError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: error.to_string(),
    }
}

/// Opens the log in `dir` in a test, also right after a log on it was dropped in the same
/// process: sled's IO threads can hold the data file, and with it the file lock, for a
/// moment after the last handle is gone (sled's own tests block on the lock for the same
/// reason), so a lock held that way is waited for, up to 10 s.
#[cfg(test)]
pub(crate) fn open_in_test(dir: &Path) -> EventLog {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match EventLog::open(dir, Durability::Fsync, 8 << 20) {
            Ok(log) => return log,
            Err(e) if e.is_locked() && std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("open log in {}: {e}", dir.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Product;

    fn open(dir: &Path) -> EventLog {
        open_in_test(dir)
    }

    /// What a restarted server waits out (`main.rs`): a log still open is "locked", and
    /// nothing else is.
    #[test]
    fn a_log_still_open_is_reported_locked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = open(dir.path());
        let again = EventLog::open(dir.path(), Durability::Fsync, 8 << 20)
            .err()
            .expect("a second open of an open log fails");
        assert!(again.is_locked(), "{again}");
        drop(log);
        let reopened = open(dir.path());
        drop(reopened);
        let full = LogError::Sled(sled::Error::Io(std::io::Error::from(
            std::io::ErrorKind::StorageFull,
        )));
        assert!(!full.is_locked() && full.is_disk_full());
    }

    fn envelope(position: u64, stream: &StreamId, version: u64) -> bytes::Bytes {
        pb::EventEnvelope {
            event_id: format!("e{position}"),
            position,
            stream_id: stream.to_string(),
            stream_version: version,
            ..Default::default()
        }
        .encode_to_vec()
        .into()
    }

    #[test]
    fn records_are_read_back_by_position() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = open(dir.path());
        assert_eq!(log.last_position().expect("last"), 0);
        let s = StreamId::product("p1");
        let mut batch = WriteBatch::default();
        // Records 1-3, 4-5, 6.
        for (first, n) in [(1u64, 3u64), (4, 2), (6, 1)] {
            let record = CommitRecord {
                envelopes: (first..first + n).map(|p| envelope(p, &s, p)).collect(),
                ..Default::default()
            };
            batch.record(first, &record);
        }
        log.write(batch).expect("apply");
        log.sync().expect("sync");
        assert_eq!(log.last_position().expect("last"), 6);
        let positions = |from, to, limit| -> Vec<u64> {
            log.read_range(from, to, limit)
                .expect("range")
                .iter()
                .map(|(p, _)| *p)
                .collect()
        };
        assert_eq!(positions(1, 6, 100), [1, 2, 3, 4, 5, 6]);
        assert_eq!(positions(2, 4, 100), [2, 3, 4]);
        assert_eq!(positions(5, 9, 100), [5, 6]);
        assert_eq!(positions(3, 6, 2), [3, 4]);
        assert!(positions(7, 9, 100).is_empty());
        assert!(log.event(4).expect("event").is_some());
    }

    /// sled 0.34 takes an unfinished snapshot (`snap.*.generating`, left by a write that
    /// a full disk or a crash cut) as its latest and refuses to open, as it does with a
    /// damaged finished one; the log drops its snapshots and opens with every event.
    #[test]
    fn a_damaged_sled_snapshot_does_not_stop_the_log_from_opening() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let log = open(dir.path());
            let mut batch = WriteBatch::default();
            let s = StreamId::product("p1");
            batch.record(
                1,
                &CommitRecord {
                    envelopes: vec![envelope(1, &s, 1), envelope(2, &s, 2)],
                    ..Default::default()
                },
            );
            log.write(batch).expect("write");
            log.sync().expect("sync");
        }
        // A torn snapshot write, and a finished snapshot damaged: sled refuses both.
        let torn = dir.path().join("snap.FFFFFFFFFFFFFFF0.generating");
        std::fs::write(&torn, [7u8; 5]).expect("torn snapshot");
        let log = open(dir.path());
        assert_eq!(log.last_position().expect("last"), 2);
        assert!(!torn.exists());
        drop(log);
        let snapshots: Vec<_> = std::fs::read_dir(dir.path())
            .expect("list")
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("snap."))
            .map(|e| e.path())
            .collect();
        assert!(!snapshots.is_empty(), "sled wrote a snapshot at open");
        for snapshot in &snapshots {
            let mut bytes = std::fs::read(snapshot).expect("read");
            for b in &mut bytes {
                *b = !*b;
            }
            std::fs::write(snapshot, bytes).expect("damage");
        }
        let log = open(dir.path());
        assert_eq!(log.last_position().expect("last"), 2);
        assert_eq!(log.read_range(1, 2, 10).expect("read").len(), 2);
    }

    /// Each stream's index rows are its own: two streams with chunks at the same first
    /// version read back only their own events (a mutant giving every stream one prefix
    /// survived the unit tests before this one).
    #[test]
    fn two_streams_indexed_at_the_same_versions_read_back_their_own_events() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = open(dir.path());
        let (a, b) = (StreamId::product("a"), StreamId::product("b"));
        let mut batch = WriteBatch::default();
        // One record per event: the tail read after `derived` re-reads the record that
        // holds `derived`, which would hide a wrong index if it held everything.
        for pos in 1..=6u64 {
            let stream = if pos % 2 == 1 { &a } else { &b };
            batch.record(
                pos,
                &CommitRecord {
                    envelopes: vec![envelope(pos, stream, pos.div_ceil(2))],
                    ..Default::default()
                },
            );
        }
        let chunk = |positions: Vec<u64>| PositionChunk { positions };
        batch.stream_chunk(&a, 1, &chunk(vec![1, 3, 5]));
        batch.stream_chunk(&b, 1, &chunk(vec![2, 4, 6]));
        batch.derived(6);
        log.write(batch).expect("apply");
        for (stream, expected) in [(&a, [1, 3, 5]), (&b, [2, 4, 6])] {
            let read = log.read_stream(stream, 1, 100).expect("read");
            let positions: Vec<u64> = read.iter().map(|e| e.position).collect();
            assert_eq!(positions, expected, "{stream}");
            assert!(read.iter().all(|e| e.stream_id == stream.to_string()));
        }
    }

    #[test]
    fn meta_values_are_read_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = open(dir.path());
        assert_eq!(log.meta_u64(RELAY_CURSOR).expect("meta"), None);
        log.set_meta_u64(RELAY_CURSOR, 42).expect("set");
        assert_eq!(log.meta_u64(RELAY_CURSOR).expect("meta"), Some(42));
    }

    #[test]
    fn streams_are_read_from_the_index_and_the_tail() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = open(dir.path());
        let p = StreamId::product("p");
        let other = StreamId::product("pp");
        // Positions 1..=6 alternate between p (versions 1..=3) and pp.
        let mut batch = WriteBatch::default();
        let envelopes = (1..=6u64)
            .map(|pos| {
                if pos % 2 == 1 {
                    envelope(pos, &p, pos.div_ceil(2))
                } else {
                    envelope(pos, &other, pos / 2)
                }
            })
            .collect();
        batch.record(
            1,
            &CommitRecord {
                envelopes,
                ..Default::default()
            },
        );
        // The index knows p's first two versions (positions 1, 3); position 5 is the tail.
        batch.stream_chunk(
            &p,
            1,
            &PositionChunk {
                positions: vec![1, 3],
            },
        );
        batch.derived(4);
        batch.state(
            &p,
            &Product {
                version: 2,
                ..Default::default()
            }
            .encode_to_vec(),
        );
        log.write(batch).expect("apply");
        let versions = |from, limit| -> Vec<u64> {
            log.read_stream(&p, from, limit)
                .expect("stream")
                .iter()
                .map(|e| e.stream_version)
                .collect()
        };
        assert_eq!(versions(1, 100), [1, 2, 3]);
        assert_eq!(versions(2, 100), [2, 3]);
        assert_eq!(versions(3, 100), [3]);
        assert_eq!(versions(1, 2), [1, 2]);
        let bytes = log.state(&p).expect("state").expect("present");
        let state = Product::decode(bytes.as_ref()).expect("decode");
        assert_eq!(state.version, 2);
        assert_eq!(log.derived_position().expect("derived"), 4);
    }

    /// The CI failure this guards against: a reopen while the dropped log's file lock is
    /// still held waits for it instead of failing.
    #[test]
    fn a_reopen_in_the_same_process_waits_for_the_lock() {
        let dir = tempfile::tempdir().expect("tempdir");
        let held = open(dir.path());
        let release = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(200));
            drop(held);
        });
        let log = open(dir.path());
        assert_eq!(log.last_position().expect("last"), 0);
        release.join().expect("join");
    }

    const OWNERS: IndexName = IndexName::new(b'E', "owners");
    const OPEN: IndexName = IndexName::new(b'O', "open");

    fn set(batch: &mut WriteBatch, index: IndexName, key: &[u8], value: Option<&[u8]>) {
        batch.index_row(&IndexRow::from(&IndexChange {
            index,
            key: key.to_vec(),
            value: value.map(<[u8]>::to_vec),
        }));
    }

    #[test]
    fn indexes_and_records_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let log = open(dir.path());
            let mut batch = WriteBatch::default();
            set(&mut batch, OWNERS, b"a@x.io", Some(b"c1"));
            set(&mut batch, OPEN, b"c1\0o1", Some(b""));
            set(&mut batch, OPEN, b"c1\0o2", Some(b""));
            set(&mut batch, OPEN, b"c10\0o3", Some(b""));
            batch.command(
                "cmd-1",
                &CommandRecord {
                    request_hash: vec![1; 16],
                    result: None,
                },
            );
            log.write(batch).expect("apply");
            let mut batch = WriteBatch::default();
            set(&mut batch, OPEN, b"c1\0o1", None);
            log.write(batch).expect("apply");
            log.sync().expect("sync");
        }
        let log = open(dir.path());
        assert_eq!(
            log.index_get(OWNERS, b"a@x.io").expect("get"),
            Some(b"c1".to_vec())
        );
        // The on-disk layout: the tag, then the key.
        assert_eq!(
            log.db.get(b"Ea@x.io").expect("raw").as_deref(),
            Some(&b"c1"[..])
        );
        assert_eq!(
            log.index_scan(OPEN, b"c1\0").expect("scan"),
            [(b"c1\0o2".to_vec(), Vec::new())]
        );
        assert_eq!(
            log.command("cmd-1").expect("get").map(|r| r.request_hash),
            Some(vec![1; 16])
        );
        assert!(log.command("cmd-2").expect("get").is_none());
    }
}
