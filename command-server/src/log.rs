//! The event log in sled: what is appended, how it is keyed, how it is made durable, and
//! how it is read back.
//!
//! Everything lives in one sled tree so that one `sled::Batch` is one atomic write: a
//! command's events (possibly on several streams), their stream-index rows, the new state
//! rows of every aggregate they touch, the idempotency record and the secondary indexes
//! are all written together or not at all.
//!
//! Keys (first byte is the row kind; stream ids never contain NUL):
//! - `E` pos:u64be → encoded `EventEnvelope` (the exact bytes published to JetStream)
//! - `S` stream_id NUL version:u64be → pos:u64be (read a stream in version order)
//! - `A` stream_id → current aggregate state (so no command replays history)
//! - `C` command_id → `CommandRecord` (idempotency: request hash + original reply)
//! - `M` email_key → customer_id (unique email among live customers)
//! - `O` customer_id NUL order_id → empty (the customer's open orders, for the policy)
//! - `Z` name → metadata (relay cursor)
//!
//! Durability: `sync` calls sled's `flush`, which writes its buffers and then uses
//! `sync_file_range` (survives a process crash, not a power loss: neither the disk cache
//! nor the file size are made durable), and then, in `fsync` mode, `fdatasync`s sled's
//! data file (`<dir>/db`, the only file sled 0.34 writes log data to for values below its
//! blob threshold, which ours always are) so the write survives power loss too.

use std::fs::File;
use std::path::{Path, PathBuf};

use prost::Message;
use shop_shared::ids::StreamId;
use shop_shared::pb;

/// Row kind prefixes.
const EVENT: u8 = b'E';
const STREAM: u8 = b'S';
const STATE: u8 = b'A';
const COMMAND: u8 = b'C';
const EMAIL: u8 = b'M';
const OPEN_ORDER: u8 = b'O';
const META: u8 = b'Z';

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
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .mode(sled::Mode::HighThroughput)
            // Exactly one task flushes (the flusher): sled's own periodic flusher would
            // race with it (upstream sled#1308 can hang concurrent flushes).
            .flush_every_ms(None)
            .open()?;
        let data_path = dir.join("db");
        let data_file = File::open(&data_path).map_err(|source| LogError::Io {
            path: data_path.clone(),
            source,
        })?;
        Ok(EventLog {
            db,
            data_file,
            data_path,
            durability,
        })
    }

    pub fn durability(&self) -> Durability {
        self.durability
    }

    /// Applies one batch atomically (in memory; durable after the next [`Self::sync`]).
    pub fn apply(&self, batch: sled::Batch) -> Result<(), LogError> {
        self.db.apply_batch(batch)?;
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
        match self.db.scan_prefix([EVENT]).next_back() {
            None => Ok(0),
            Some(row) => {
                let (key, _) = row?;
                decode_u64(&key[1..], &key)
            }
        }
    }

    /// The envelope at `position`.
    pub fn event(&self, position: u64) -> Result<Option<sled::IVec>, LogError> {
        Ok(self.db.get(event_key(position))?)
    }

    /// Up to `limit` events from `from` (inclusive) to `to` (inclusive), in order, as
    /// stored bytes.
    pub fn read_range(
        &self,
        from: u64,
        to: u64,
        limit: usize,
    ) -> Result<Vec<(u64, sled::IVec)>, LogError> {
        let mut out = Vec::new();
        if from > to || limit == 0 {
            return Ok(out);
        }
        for row in self.db.range(event_key(from)..=event_key(to)).take(limit) {
            let (key, value) = row?;
            out.push((decode_u64(&key[1..], &key)?, value));
        }
        Ok(out)
    }

    /// Up to `limit` events of `stream` from version `from_version`, in version order.
    pub fn read_stream(
        &self,
        stream: &StreamId,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<sled::IVec>, LogError> {
        let prefix = stream_prefix(stream);
        let mut start = prefix.clone();
        start.extend_from_slice(&from_version.to_be_bytes());
        let mut out = Vec::new();
        for row in self.db.range(start..).take(limit) {
            let (key, pos) = row?;
            if !key.starts_with(&prefix) {
                break;
            }
            let position = decode_u64(&pos, &key)?;
            let event = self.event(position)?.ok_or_else(|| LogError::Corrupt {
                key: String::from_utf8_lossy(&key).into_owned(),
                reason: format!("stream index points at missing position {position}"),
            })?;
            out.push(event);
        }
        Ok(out)
    }

    /// The stored state of an aggregate.
    pub fn state<T: Message + Default>(&self, stream: &StreamId) -> Result<Option<T>, LogError> {
        let key = state_key(stream);
        match self.db.get(&key)? {
            None => Ok(None),
            Some(bytes) => T::decode(bytes.as_ref())
                .map(Some)
                .map_err(|e| corrupt(&key, e)),
        }
    }

    /// The live customer holding an email, by email key.
    pub fn email_owner(&self, email_key: &str) -> Result<Option<String>, LogError> {
        let key = prefixed(EMAIL, email_key.as_bytes());
        Ok(self
            .db
            .get(&key)?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Ids of the customer's open (PLACED or PAID) orders.
    pub fn open_orders(&self, customer_id: &str) -> Result<Vec<String>, LogError> {
        let mut prefix = prefixed(OPEN_ORDER, customer_id.as_bytes());
        prefix.push(0);
        let mut out = Vec::new();
        for row in self.db.scan_prefix(&prefix) {
            let (key, _) = row?;
            out.push(String::from_utf8_lossy(&key[prefix.len()..]).into_owned());
        }
        Ok(out)
    }

    /// The idempotency record of a command id.
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

/// Rows of one atomic write, in the log's key layout.
#[derive(Default)]
pub struct WriteBatch {
    batch: sled::Batch,
    rows: usize,
}

impl WriteBatch {
    pub fn event(&mut self, position: u64, envelope: &[u8]) {
        self.put(event_key(position).to_vec(), envelope);
    }

    pub fn stream_index(&mut self, stream: &StreamId, version: u64, position: u64) {
        let mut key = stream_prefix(stream);
        key.extend_from_slice(&version.to_be_bytes());
        self.put(key, &position.to_be_bytes());
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

    pub fn email(&mut self, email_key: &str, owner: Option<&str>) {
        let key = prefixed(EMAIL, email_key.as_bytes());
        match owner {
            Some(customer_id) => self.put(key, customer_id.as_bytes()),
            None => self.remove(key),
        }
    }

    pub fn open_order(&mut self, customer_id: &str, order_id: &str, open: bool) {
        let mut key = prefixed(OPEN_ORDER, customer_id.as_bytes());
        key.push(0);
        key.extend_from_slice(order_id.as_bytes());
        if open {
            self.put(key, &[]);
        } else {
            self.remove(key);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    pub fn into_sled(self) -> sled::Batch {
        self.batch
    }

    fn put(&mut self, key: Vec<u8>, value: &[u8]) {
        self.batch.insert(key, value);
        self.rows += 1;
    }

    fn remove(&mut self, key: Vec<u8>) {
        self.batch.remove(key);
        self.rows += 1;
    }
}

fn prefixed(kind: u8, rest: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + rest.len());
    key.push(kind);
    key.extend_from_slice(rest);
    key
}

fn event_key(position: u64) -> [u8; 9] {
    let mut key = [EVENT; 9];
    key[1..].copy_from_slice(&position.to_be_bytes());
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

fn corrupt(key: &[u8], error: prost::DecodeError) -> LogError {
    LogError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Product;

    fn open(dir: &Path) -> EventLog {
        EventLog::open(dir, Durability::Fsync, 8 << 20).expect("open log")
    }

    #[test]
    fn batches_are_read_back_by_position_and_stream() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = open(dir.path());
        assert_eq!(log.last_position().expect("last"), 0);
        let stream = StreamId::product("p1");
        let mut batch = WriteBatch::default();
        for position in 1..=5u64 {
            batch.event(position, format!("event {position}").as_bytes());
            batch.stream_index(&stream, position, position);
        }
        batch.state(
            &stream,
            &Product {
                version: 5,
                ..Default::default()
            }
            .encode_to_vec(),
        );
        log.apply(batch.into_sled()).expect("apply");
        log.sync().expect("sync");
        assert_eq!(log.last_position().expect("last"), 5);
        let range = log.read_range(2, 4, 10).expect("range");
        assert_eq!(range.iter().map(|(p, _)| *p).collect::<Vec<_>>(), [2, 3, 4]);
        assert_eq!(log.read_range(2, 9, 2).expect("range").len(), 2);
        let by_stream = log.read_stream(&stream, 4, 10).expect("stream");
        assert_eq!(by_stream, [&b"event 4"[..], &b"event 5"[..]]);
        // A stream whose name is a prefix of another is not mixed in.
        assert!(log
            .read_stream(&StreamId::product("p"), 1, 10)
            .expect("stream")
            .is_empty());
        let state: Product = log.state(&stream).expect("state").expect("present");
        assert_eq!(state.version, 5);
    }

    #[test]
    fn indexes_and_records_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let log = open(dir.path());
            let mut batch = WriteBatch::default();
            batch.email("a@x.io", Some("c1"));
            batch.open_order("c1", "o1", true);
            batch.open_order("c1", "o2", true);
            batch.open_order("c10", "o3", true);
            batch.command(
                "cmd-1",
                &CommandRecord {
                    request_hash: vec![1; 16],
                    result: None,
                },
            );
            log.apply(batch.into_sled()).expect("apply");
            let mut batch = WriteBatch::default();
            batch.open_order("c1", "o1", false);
            log.apply(batch.into_sled()).expect("apply");
            log.sync().expect("sync");
        }
        let log = open(dir.path());
        assert_eq!(
            log.email_owner("a@x.io").expect("get").as_deref(),
            Some("c1")
        );
        assert_eq!(log.open_orders("c1").expect("scan"), ["o2"]);
        assert_eq!(
            log.command("cmd-1").expect("get").map(|r| r.request_hash),
            Some(vec![1; 16])
        );
        assert!(log.command("cmd-2").expect("get").is_none());
    }
}
