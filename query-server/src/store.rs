//! The query server's sled database: view rows, secondary indexes, a copy of every event
//! (for history and as-of reads), and the checkpoint, all in one tree.
//!
//! Keys (first byte is the row kind):
//! - a view's tag ([`View::TAG`]), then its id → the view (`c` customers, `p` products,
//!   `o` orders; read-time joins such as an order's customer_name are not stored)
//! - `e` stream_id NUL first_version:u64be → a [`HistoryChunk`]: the envelopes of that
//!   stream's consecutive events applied in one batch (one row per stream per batch, not
//!   per event: hot streams and short-lived orders cost one write per batch)
//! - `x` index keys, derived from the views ([`View::index_keys`]); value = the view's
//!   id (`xa` all orders, `xc` orders by customer, `xs` orders by status, `xn` customers
//!   by name, `xp` products by stock: see `projections/`)
//! - `m` name → metadata: `checkpoint` (last applied position, then the id of the event
//!   there, to notice a stream that is not the one the views were built from; stores
//!   written before both were one row keep the id under `checkpoint_event`), `pending`
//!   (the envelopes of the batch being written, a [`PendingBatch`])
//!
//! Indexes are kept by diffing the index keys of a view before and after a batch.
//!
//! **No sled batches.** A batch of events is written one insert at a time ([`Rows`]),
//! never with `apply_batch`: the first sled batch in a process puts sled 0.34 into a
//! global lock mode for good, where every batch waits for a running flush and excludes
//! every read, so a GetOrder waited behind the consumer's writes and flushes. A crash
//! keeps a prefix of the inserts (sled replays its log in order and stops at the first
//! torn message: `pagecache/iterator.rs`, `LogIter::next`), so the rows are ordered to
//! make every prefix safe to replay from the checkpoint:
//! - the first row is `pending`, the batch's events; the checkpoint is the last row:
//!   every batch before the checkpoint is complete, and at most the one in `pending` is
//!   partly written. [`Store::open`] finishes it before anything reads the store, so
//!   the views a restarted server serves are always exactly those of its checkpoint;
//! - each view row records the position of the last event that changed it, and
//!   `projections::apply` skips an event a row already holds: a replay changes only the
//!   rows the crash did not write;
//! - a row's index entries are written before the row, so a row present means its
//!   entries are (a replay that skips the row rewrites nothing, and one that does not
//!   rewrites the same entries);
//! - views are written by [`View::WRITE_RANK`]: a customer's row, whose update reads an
//!   order's previous state, is written before the order's;
//! - history chunks are keyed by the stream's first version in the batch; finishing the
//!   batch writes the same keys again, so no event is listed twice.
//!
//! Readers may see a batch partly written: lists keep only rows that still carry the
//! index entry they were found by ([`Store::listed`]).

use std::any::Any;
use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use prost::Message;
use shop_shared::ids::StreamId;
use shop_shared::pb;
use shop_shared::storage::{open_repairing, OpenFailure};

use crate::projections::{IndexEntry, ReadViews, View, ViewTag, Views};

const EVENT: u8 = b'e';

const CHECKPOINT: &[u8] = b"mcheckpoint";
const PENDING: &[u8] = b"mpending";
/// The checkpoint's event id in stores written before it was part of `checkpoint`.
const CHECKPOINT_EVENT: &[u8] = b"mcheckpoint_event";

/// Storage failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    #[error("corrupt row {key:?}: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("{0} is not a view store (no sled conf/db files); not removing it")]
    NotAStore(String),
    #[error("I/O on {0}: {1}")]
    Io(String, std::io::Error),
    #[error("damaged: sled cannot open it ({0}), even without its snapshots")]
    Damaged(String),
}

/// The sled errors that mean damaged files (not permissions, space or a held lock).
fn is_damage(e: &sled::Error) -> bool {
    matches!(
        e,
        sled::Error::Corruption { .. } | sled::Error::ReportableBug(_)
    )
}

/// Where a damaged store in `dir` is moved: `<dir>.damaged`, next to it.
pub fn damaged_path(dir: &Path) -> std::path::PathBuf {
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push(".damaged");
    dir.with_file_name(name)
}

/// The query server's database.
pub struct Store {
    db: sled::Db,
}

impl Store {
    /// Opens (or creates) the store in `dir`; `cache_bytes` bounds sled's page cache.
    /// A batch a crash left partly written is finished first (see No sled batches).
    pub fn open(dir: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        let config = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .mode(sled::Mode::HighThroughput)
            // The consumer is the only flusher (sled#1308: concurrent flushes can hang).
            .flush_every_ms(None);
        let db = open_repairing(dir, is_damage, || config.open()).map_err(|e| match e {
            OpenFailure::Error(e) => StoreError::Sled(e),
            OpenFailure::Damaged(reason) => StoreError::Damaged(reason),
        })?;
        let store = Store { db };
        store.finish_pending()?;
        store.checkpoint()?;
        Ok(store)
    }

    /// Opens the store in `dir` like [`Store::open`]; when it is damaged (sled cannot
    /// open it, or its checkpoint or pending batch does not decode), moves it aside to
    /// `<dir>.damaged` (replacing an older one; deleting it where it cannot be moved,
    /// as with a mount point) and opens an empty store: the consumer rebuilds the views
    /// from the stream. Returns the store and, when it was replaced, why.
    pub fn open_or_replace(
        dir: &Path,
        cache_bytes: u64,
    ) -> Result<(Self, Option<String>), StoreError> {
        let damage = match Store::open(dir, cache_bytes) {
            Err(e @ (StoreError::Damaged(_) | StoreError::Corrupt { .. })) => e.to_string(),
            opened => return opened.map(|store| (store, None)),
        };
        let aside = damaged_path(dir);
        if aside.exists() {
            std::fs::remove_dir_all(&aside)
                .map_err(|e| StoreError::Io(aside.display().to_string(), e))?;
        }
        let moved = std::fs::rename(dir, &aside).is_ok();
        if !moved {
            Store::remove_contents(dir)?;
        }
        tracing::error!(
            dir = %dir.display(),
            %damage,
            moved_to = moved.then(|| aside.display().to_string()),
            "the view store is damaged; rebuilding the views from the stream in a new one"
        );
        Ok((Store::open(dir, cache_bytes)?, Some(damage)))
    }

    /// Applies again the events of the batch in `pending` if the checkpoint is before
    /// them: rows the crash kept hold their events already and are left alone
    /// (`projections::apply`), the others are written now, then the checkpoint.
    pub(crate) fn finish_pending(&self) -> Result<(), StoreError> {
        let Some(bytes) = self.db.get(PENDING)? else {
            return Ok(());
        };
        let pending = PendingBatch::decode(bytes.as_ref()).map_err(|e| StoreError::Corrupt {
            key: "mpending".into(),
            reason: e.to_string(),
        })?;
        let (checkpoint, _) = self.checkpoint()?;
        let mut overlay = Overlay::new(self);
        let mut last = None;
        for bytes in &pending.envelopes {
            let envelope =
                pb::EventEnvelope::decode(bytes.as_slice()).map_err(|e| StoreError::Corrupt {
                    key: "mpending".into(),
                    reason: e.to_string(),
                })?;
            if envelope.position <= checkpoint {
                continue;
            }
            crate::projections::apply(&mut overlay, &envelope);
            overlay.add_event(&envelope.stream_id, envelope.stream_version, bytes);
            last = Some((envelope.position, envelope.event_id));
        }
        if let Some((position, event_id)) = last {
            tracing::info!(
                from = checkpoint + 1,
                to = position,
                "finishing the batch a crash left partly written"
            );
            self.commit(overlay.into_rows(position, &event_id)?)?;
            self.flush()?;
        }
        Ok(())
    }

    /// Last applied position and the id of the event there (0 and "" when empty).
    pub fn checkpoint(&self) -> Result<(u64, String), StoreError> {
        let Some(value) = self.db.get(CHECKPOINT)? else {
            return Ok((0, String::new()));
        };
        let (position, event_id) = value.split_at(value.len().min(8));
        let position = decode_u64(position, CHECKPOINT)?;
        if !event_id.is_empty() {
            return Ok((position, String::from_utf8_lossy(event_id).into_owned()));
        }
        let event_id = self
            .db
            .get(CHECKPOINT_EVENT)?
            .map(|v| String::from_utf8_lossy(&v).into_owned())
            .unwrap_or_default();
        Ok((position, event_id))
    }

    /// A view as stored.
    pub fn view<V: View>(&self, id: &str) -> Result<Option<V>, StoreError> {
        self.get(&key(V::TAG.byte(), id.as_bytes()))
    }

    /// A view with its read-time joins (see [`View::join`]).
    pub fn joined<V: View>(&self, id: &str) -> Result<Option<V>, StoreError> {
        let mut reader = Reader {
            store: self,
            error: None,
        };
        let view = reader.joined::<V>(id);
        match reader.error {
            Some(error) => Err(error),
            None => Ok(view),
        }
    }

    /// The view an index entry `key → id` leads to, joined, if its row still has that
    /// entry: a list never shows a row that no longer matches its filter, even while a
    /// batch that changes both is being written.
    pub fn listed<V: View>(&self, key: &[u8], id: &[u8]) -> Result<Option<V>, StoreError> {
        let view = self.joined::<V>(&String::from_utf8_lossy(id))?;
        Ok(view.filter(|v| v.index_keys().iter().any(|(k, _)| k.as_slice() == key)))
    }

    /// Decodes a view's row (as scanned under [`Self::rows_prefix`]).
    pub fn decode_row<V: View>(value: &[u8]) -> Result<V, StoreError> {
        V::decode(value).map_err(|e| StoreError::Corrupt {
            key: format!("a {} row", V::NAME),
            reason: e.to_string(),
        })
    }

    /// The prefix of every row of a view (to list them all, in id order).
    pub fn rows_prefix<V: View>() -> Vec<u8> {
        vec![V::TAG.byte()]
    }

    fn get<T: Message + Default>(&self, key: &[u8]) -> Result<Option<T>, StoreError> {
        match self.db.get(key)? {
            None => Ok(None),
            Some(bytes) => T::decode(bytes.as_ref())
                .map(Some)
                .map_err(|e| StoreError::Corrupt {
                    key: String::from_utf8_lossy(key).into_owned(),
                    reason: e.to_string(),
                }),
        }
    }

    /// Up to `limit` events of a stream from `from_version`, in version order.
    pub fn history(
        &self,
        stream: &StreamId,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<pb::EventEnvelope>, StoreError> {
        let prefix = event_prefix(stream);
        let mut at = prefix.clone();
        at.extend_from_slice(&from_version.to_be_bytes());
        // The chunk holding `from_version` starts at or before it.
        let start = match self.db.range(prefix.clone()..=at).next_back() {
            Some(row) => row?.0.to_vec(),
            None => prefix.clone(),
        };
        let mut out = Vec::new();
        for row in self.db.range(start..) {
            let (k, v) = row?;
            if !k.starts_with(&prefix) || out.len() >= limit {
                break;
            }
            for envelope in decode_chunk(&k, &v)? {
                if envelope.stream_version >= from_version && out.len() < limit {
                    out.push(envelope);
                }
            }
        }
        Ok(out)
    }

    /// Every event of a stream for which `keep` holds, stopping at the first that fails
    /// (streams are in position order, so a position or time cut-off is a prefix).
    pub fn stream_prefix_while(
        &self,
        stream: &StreamId,
        keep: impl Fn(&pb::EventEnvelope) -> bool,
    ) -> Result<Vec<pb::EventEnvelope>, StoreError> {
        let mut out = Vec::new();
        for row in self.db.scan_prefix(event_prefix(stream)) {
            let (k, v) = row?;
            for envelope in decode_chunk(&k, &v)? {
                if !keep(&envelope) {
                    return Ok(out);
                }
                out.push(envelope);
            }
        }
        Ok(out)
    }

    /// Index entries under `prefix`, after `after` (exclusive; `None` = from the start),
    /// at most `limit`: (key, value) pairs.
    pub fn scan_index(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(sled::IVec, sled::IVec)>, StoreError> {
        let iter = match after {
            Some(after) => {
                let mut start = after.to_vec();
                start.push(0);
                self.db.range(start..)
            }
            None => self.db.range(prefix.to_vec()..),
        };
        let mut out = Vec::new();
        for row in iter {
            let (k, v) = row?;
            if !k.starts_with(prefix) || out.len() >= limit {
                break;
            }
            out.push((k, v));
        }
        Ok(out)
    }

    /// The values of every index entry under `prefix` (view ids).
    pub fn index_values(&self, prefix: &[u8]) -> Result<Vec<String>, StoreError> {
        let mut out = Vec::new();
        for row in self.db.scan_prefix(prefix) {
            let (_, v) = row?;
            out.push(String::from_utf8_lossy(&v).into_owned());
        }
        Ok(out)
    }

    /// Writes the rows of a batch one insert at a time, in order (see No sled batches).
    pub fn commit(&self, rows: Rows) -> Result<(), StoreError> {
        for (key, value) in rows.0 {
            match value {
                Some(value) => self.db.insert(key, value)?,
                None => self.db.remove(key)?,
            };
        }
        Ok(())
    }

    /// Writes sled's buffers to disk (the store needs no fsync: after a crash it recovers a
    /// prefix of its rows, and the consumer replays from the checkpoint in it).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    /// Deletes the store in `dir` (for a rebuild), refusing a directory that does not
    /// look like one (sled's `conf` and `db` files), so a mistyped path deletes nothing.
    pub fn remove(dir: &Path) -> Result<(), StoreError> {
        if !dir.exists() {
            return Ok(());
        }
        if !dir.join("conf").is_file() || !dir.join("db").is_file() {
            return Err(StoreError::NotAStore(dir.display().to_string()));
        }
        std::fs::remove_dir_all(dir).map_err(|e| StoreError::Io(dir.display().to_string(), e))
    }

    /// Deletes what is in the store's directory `dir`, keeping the directory (a mount
    /// point cannot be removed or renamed). Refuses a directory without sled's `db` file.
    fn remove_contents(dir: &Path) -> Result<(), StoreError> {
        let io = |e| StoreError::Io(dir.display().to_string(), e);
        if !dir.join("db").is_file() {
            return Err(StoreError::NotAStore(dir.display().to_string()));
        }
        for entry in std::fs::read_dir(dir).map_err(io)? {
            let path = entry.map_err(io)?.path();
            if path.is_dir() {
                std::fs::remove_dir_all(&path).map_err(io)?;
            } else {
                std::fs::remove_file(&path).map_err(io)?;
            }
        }
        Ok(())
    }

    /// Every row under `prefix`, raw (for tests).
    #[cfg(test)]
    pub(crate) fn raw_scan(&self, prefix: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.db
            .scan_prefix(prefix)
            .map(|row| row.map(|(k, v)| (k.to_vec(), v.to_vec())).expect("scan"))
            .collect()
    }

    /// Bytes on disk.
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }
}

fn key(kind: u8, id: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + id.len());
    k.push(kind);
    k.extend_from_slice(id);
    k
}

fn event_prefix(stream: &StreamId) -> Vec<u8> {
    let mut k = key(EVENT, stream.to_string().as_bytes());
    k.push(0);
    k
}

fn decode_u64(bytes: &[u8], key: &[u8]) -> Result<u64, StoreError> {
    let array: [u8; 8] = bytes.try_into().map_err(|_| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: "expected 8 bytes".into(),
    })?;
    Ok(u64::from_be_bytes(array))
}

/// The rows of a batch, in the order they must be written (`None` removes a row).
#[derive(Default, Clone)]
pub struct Rows(Vec<(Vec<u8>, Option<Vec<u8>>)>);

impl Rows {
    fn put(&mut self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.0.push((key.into(), Some(value.into())));
    }

    fn remove(&mut self, key: impl Into<Vec<u8>>) {
        self.0.push((key.into(), None));
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The first `rows` rows: what a crash part-way through writing them leaves.
    #[cfg(test)]
    pub(crate) fn truncate(&mut self, rows: usize) {
        self.0.truncate(rows);
    }

    #[cfg(test)]
    pub(crate) fn extend(&mut self, other: Rows) {
        self.0.extend(other.0);
    }
}

/// The envelopes of the batch being written, as received from JetStream.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PendingBatch {
    #[prost(bytes = "vec", repeated, tag = "1")]
    pub envelopes: Vec<Vec<u8>>,
}

/// The events of one stream applied in one batch, as received from JetStream.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HistoryChunk {
    #[prost(bytes = "vec", repeated, tag = "1")]
    pub envelopes: Vec<Vec<u8>>,
}

fn decode_chunk(key: &[u8], bytes: &[u8]) -> Result<Vec<pb::EventEnvelope>, StoreError> {
    let corrupt = |e: prost::DecodeError| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: e.to_string(),
    };
    HistoryChunk::decode(bytes)
        .map_err(corrupt)?
        .envelopes
        .iter()
        .map(|e| pb::EventEnvelope::decode(e.as_slice()).map_err(corrupt))
        .collect()
}

/// Reads views from the store for joins, keeping the first error.
struct Reader<'s> {
    store: &'s Store,
    error: Option<StoreError>,
}

impl ReadViews for Reader<'_> {
    fn get<V: View>(&mut self, id: &str) -> Option<V> {
        match self.store.view(id) {
            Ok(view) => view,
            Err(error) => {
                self.error.get_or_insert(error);
                None
            }
        }
    }
}

/// A view of any kind, as the overlay holds it.
trait AnyView: Send {
    fn as_any(&self) -> &dyn Any;
    fn write_rank(&self) -> u8;
    fn index_keys(&self) -> Vec<IndexEntry>;
    fn encode(&self) -> Vec<u8>;
    fn same(&self, other: &dyn AnyView) -> bool;
}

impl<V: View> AnyView for V {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn write_rank(&self) -> u8 {
        V::WRITE_RANK
    }

    fn index_keys(&self) -> Vec<IndexEntry> {
        View::index_keys(self)
    }

    fn encode(&self) -> Vec<u8> {
        self.encode_to_vec()
    }

    fn same(&self, other: &dyn AnyView) -> bool {
        other.as_any().downcast_ref::<V>() == Some(self)
    }
}

/// One row of the overlay: the view as stored, and as it is now.
struct Row {
    stored: Option<Box<dyn AnyView>>,
    current: Option<Box<dyn AnyView>>,
}

impl Row {
    fn write_rank(&self) -> u8 {
        self.current
            .as_ref()
            .or(self.stored.as_ref())
            .map_or(u8::MAX, |v| v.write_rank())
    }

    fn changed(&self) -> bool {
        match (&self.stored, &self.current) {
            (None, None) => false,
            (Some(a), Some(b)) => !a.same(b.as_ref()),
            _ => true,
        }
    }
}

/// The views a batch of events touches, loaded on first use and written back at commit.
pub struct Overlay<'s> {
    store: &'s Store,
    rows: HashMap<(ViewTag, String), Row>,
    /// History chunks of this batch: stream id → (first version, envelopes).
    events: HashMap<String, (u64, HistoryChunk)>,
    /// Every envelope of this batch, in order.
    batch: PendingBatch,
    /// Storage error met while loading; reported at commit.
    error: Option<StoreError>,
}

impl<'s> Overlay<'s> {
    pub fn new(store: &'s Store) -> Self {
        Overlay {
            store,
            rows: HashMap::new(),
            events: HashMap::new(),
            batch: PendingBatch::default(),
            error: None,
        }
    }

    /// Records an event's envelope bytes for history (events of a stream arrive in
    /// version order).
    pub fn add_event(&mut self, stream_id: &str, version: u64, envelope: &[u8]) {
        let chunk = self
            .events
            .entry(stream_id.to_string())
            .or_insert_with(|| (version, HistoryChunk::default()));
        chunk.1.envelopes.push(envelope.to_vec());
        self.batch.envelopes.push(envelope.to_vec());
    }

    /// The batch's rows in writing order (see No sled batches): its events, changed views
    /// by write rank, each after its index diff, then history chunks, then the checkpoint.
    pub fn into_rows(self, checkpoint: u64, checkpoint_event_id: &str) -> Result<Rows, StoreError> {
        if let Some(error) = self.error {
            return Err(error);
        }
        let mut rows = Rows::default();
        rows.put(PENDING, self.batch.encode_to_vec());
        let mut changed: Vec<_> = self.rows.into_iter().filter(|(_, r)| r.changed()).collect();
        changed.sort_by(|((tag_a, id_a), a), ((tag_b, id_b), b)| {
            (a.write_rank(), tag_a, id_a).cmp(&(b.write_rank(), tag_b, id_b))
        });
        for ((tag, id), row) in changed {
            write_row(&mut rows, key(tag.byte(), id.as_bytes()), &row);
        }
        for (stream_id, (first_version, chunk)) in self.events {
            let mut k = key(EVENT, stream_id.as_bytes());
            k.push(0);
            k.extend_from_slice(&first_version.to_be_bytes());
            rows.put(k, chunk.encode_to_vec());
        }
        let mut value = checkpoint.to_be_bytes().to_vec();
        value.extend_from_slice(checkpoint_event_id.as_bytes());
        rows.put(CHECKPOINT, value);
        Ok(rows)
    }

    /// The row of a view, loaded from the store on first use.
    fn row<V: View>(&mut self, id: &str) -> &mut Row {
        let Overlay {
            store, rows, error, ..
        } = self;
        rows.entry((V::TAG, id.to_string())).or_insert_with(|| {
            let stored = store.view::<V>(id).unwrap_or_else(|e| {
                error.get_or_insert(e);
                None
            });
            Row {
                current: stored.clone().map(|v| Box::new(v) as Box<dyn AnyView>),
                stored: stored.map(|v| Box::new(v) as Box<dyn AnyView>),
            }
        })
    }
}

impl ReadViews for Overlay<'_> {
    fn get<V: View>(&mut self, id: &str) -> Option<V> {
        self.row::<V>(id)
            .current
            .as_ref()
            .and_then(|v| v.as_any().downcast_ref::<V>())
            .cloned()
    }
}

impl Views for Overlay<'_> {
    fn put<V: View>(&mut self, view: V) {
        let id = view.id().to_string();
        self.row::<V>(&id).current = Some(Box::new(view));
    }
}

/// A changed view's index diff, then its row.
fn write_row(rows: &mut Rows, row_key: Vec<u8>, row: &Row) {
    let keys = |v: &Option<Box<dyn AnyView>>| -> BTreeSet<IndexEntry> {
        v.as_ref()
            .map(|v| v.index_keys().into_iter().collect())
            .unwrap_or_default()
    };
    let (before, after) = (keys(&row.stored), keys(&row.current));
    for (k, _) in before.difference(&after) {
        rows.remove(k.as_slice());
    }
    for (k, v) in after.difference(&before) {
        rows.put(k.as_slice(), v.as_slice());
    }
    match &row.current {
        Some(view) => rows.put(row_key, view.encode()),
        None => rows.remove(row_key),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::projections::{apply, customers, envelope, orders, products};
    use shop_shared::pb::event::Kind;

    #[test]
    fn views_indexes_and_checkpoint_commit_together() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), 8 << 20).expect("open");
        let events = [
            envelope(
                1,
                1,
                Kind::CustomerRegistered(pb::CustomerRegistered {
                    customer_id: "c1".into(),
                    name: "Ada".into(),
                    email: "a@x.io".into(),
                    address: String::new(),
                }),
            ),
            envelope(2, 1, placed("o1", "c1")),
            envelope(
                3,
                2,
                Kind::CustomerRenamed(pb::CustomerRenamed {
                    customer_id: "c1".into(),
                    name: "Bea".into(),
                }),
            ),
        ];
        let mut overlay = Overlay::new(&store);
        for e in &events {
            apply(&mut overlay, e);
            overlay.add_event(&e.stream_id, e.stream_version, &e.encode_to_vec());
        }
        store
            .commit(overlay.into_rows(3, "e3").expect("batch"))
            .expect("commit");
        assert_eq!(
            store.checkpoint().expect("checkpoint"),
            (3, "e3".to_string())
        );
        assert_eq!(
            store
                .view::<pb::Customer>("c1")
                .expect("get")
                .expect("exists")
                .name,
            "Bea"
        );
        // The name index follows the rename: the old entry is gone.
        assert!(store
            .scan_index(&customers::by_name_prefix("ada"), None, 10)
            .expect("scan")
            .is_empty());
        assert_eq!(
            store
                .scan_index(&customers::by_name_prefix("b"), None, 10)
                .expect("scan")
                .len(),
            1
        );
        assert_eq!(
            store
                .index_values(&orders::by_customer_prefix("c1"))
                .expect("scan"),
            ["o1"]
        );
        assert_eq!(
            store
                .history(&StreamId::customer("c1"), 1, 10)
                .expect("history")
                .len(),
            2
        );
    }

    /// A store sled cannot open, or whose checkpoint does not decode, is moved aside and
    /// replaced by an empty one (rebuilt from the stream); a damaged snapshot alone is
    /// repaired in place.
    #[test]
    fn a_damaged_store_is_moved_aside_and_replaced_by_an_empty_one() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("views");
        let checkpointed = |position: u64| {
            let store = Store::open(&dir, 8 << 20).expect("open");
            store
                .commit(Overlay::new(&store).into_rows(position, "e").expect("rows"))
                .expect("commit");
            store.flush().expect("flush");
        };
        checkpointed(7);
        // sled writes its snapshot when it opens a database with something in it.
        drop(Store::open(&dir, 8 << 20).expect("open"));
        let mut snapshots = 0;
        for entry in std::fs::read_dir(&dir).expect("list").flatten() {
            if entry.file_name().to_string_lossy().starts_with("snap.") {
                std::fs::write(entry.path(), b"not a snapshot").expect("damage");
                snapshots += 1;
            }
        }
        assert!(snapshots > 0, "sled wrote a snapshot");
        let (store, replaced) = Store::open_or_replace(&dir, 8 << 20).expect("open");
        assert_eq!(replaced, None);
        assert_eq!(store.checkpoint().expect("checkpoint").0, 7);
        store.db.insert(CHECKPOINT, &b"bad"[..]).expect("insert");
        store.flush().expect("flush");
        drop(store);

        assert!(matches!(
            Store::open(&dir, 8 << 20),
            Err(StoreError::Corrupt { .. })
        ));
        let (store, replaced) = Store::open_or_replace(&dir, 8 << 20).expect("open");
        assert!(replaced.expect("replaced").contains("mcheckpoint"));
        assert_eq!(store.checkpoint().expect("checkpoint").0, 0);
        assert!(root.path().join("views.damaged").join("db").is_file());
        drop(store);
        // A second replacement replaces the older damaged copy.
        checkpointed(9);
        let store = Store::open(&dir, 8 << 20).expect("open");
        store.db.insert(CHECKPOINT, &b"bad"[..]).expect("insert");
        store.flush().expect("flush");
        drop(store);
        let (store, replaced) = Store::open_or_replace(&dir, 8 << 20).expect("open");
        assert!(replaced.is_some());
        assert_eq!(store.checkpoint().expect("checkpoint").0, 0);
    }

    fn registered(id: &str, name: &str) -> Kind {
        Kind::CustomerRegistered(pb::CustomerRegistered {
            customer_id: id.into(),
            name: name.into(),
            email: format!("{id}@x.io"),
            address: String::new(),
        })
    }

    fn placed(order: &str, customer: &str) -> Kind {
        Kind::OrderPlaced(pb::OrderPlaced {
            order_id: order.into(),
            customer_id: customer.into(),
            lines: vec![],
            total_cents: 5,
        })
    }

    fn renamed(id: &str, name: &str) -> Kind {
        Kind::CustomerRenamed(pb::CustomerRenamed {
            customer_id: id.into(),
            name: name.into(),
        })
    }

    /// Applies `events` in one batch and commits it with its checkpoint.
    fn apply_batch(store: &Store, events: &[pb::EventEnvelope]) {
        let mut overlay = Overlay::new(store);
        for e in events {
            apply(&mut overlay, e);
            overlay.add_event(&e.stream_id, e.stream_version, &e.encode_to_vec());
        }
        let last = events.last().map_or(0, |e| e.position);
        store
            .commit(overlay.into_rows(last, &format!("e{last}")).expect("rows"))
            .expect("commit");
    }

    /// Lists show a row only while it still carries the index entry it was found by, and
    /// reads join an order's customer name.
    #[test]
    fn lists_drop_rows_that_left_their_index_and_reads_join() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), 8 << 20).expect("open");
        apply_batch(
            &store,
            &[
                envelope(1, 1, registered("c1", "Ada")),
                envelope(2, 1, placed("o1", "c1")),
            ],
        );
        let found = |prefix: &str| {
            store
                .scan_index(&customers::by_name_prefix(prefix), None, 10)
                .expect("scan")
        };
        let before = found("ada");
        assert_eq!(before.len(), 1);
        let (old_key, id) = (before[0].0.to_vec(), before[0].1.to_vec());
        let listed = store
            .listed::<pb::Customer>(&old_key, &id)
            .expect("listed")
            .expect("listed under its entry");
        assert_eq!(listed.name, "Ada");

        apply_batch(&store, &[envelope(3, 2, renamed("c1", "Bea"))]);
        assert_eq!(
            store.listed::<pb::Customer>(&old_key, &id).expect("listed"),
            None,
            "no longer under the old name's entry"
        );
        let after = found("bea");
        assert_eq!(after.len(), 1);
        assert_eq!(
            store
                .listed::<pb::Customer>(&after[0].0, &after[0].1)
                .expect("listed")
                .map(|c| c.name),
            Some("Bea".to_string())
        );
        let order = store
            .joined::<pb::Order>("o1")
            .expect("joined")
            .expect("order");
        assert_eq!(order.customer_name, "Bea", "joined at read time");
        assert_eq!(store.joined::<pb::Order>("o2").expect("joined"), None);
        store.flush().expect("flush");
        assert!(store.size_on_disk() > 1);
    }

    /// A batch that changes no view (a redelivered event) writes no view row: only the
    /// batch's own rows.
    #[test]
    fn unchanged_views_are_not_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), 8 << 20).expect("open");
        let first = envelope(1, 1, registered("c1", "Ada"));
        apply_batch(&store, std::slice::from_ref(&first));
        let baseline = Overlay::new(&store).into_rows(1, "e1").expect("rows").len();

        let mut replay = Overlay::new(&store);
        apply(&mut replay, &first);
        assert_eq!(replay.into_rows(1, "e1").expect("rows").len(), baseline);

        let mut change = Overlay::new(&store);
        apply(&mut change, &envelope(2, 2, renamed("c1", "Bea")));
        assert!(change.into_rows(2, "e2").expect("rows").len() > baseline);
    }

    /// A store another handle has open (sled's lock) is an error, not damage: nothing is
    /// moved aside or replaced.
    #[test]
    fn a_store_open_elsewhere_is_not_taken_for_damage() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("views");
        let store = Store::open(&dir, 8 << 20).expect("open");
        apply_batch(&store, &[envelope(1, 1, registered("c1", "Ada"))]);
        assert!(Store::open_or_replace(&dir, 8 << 20).is_err());
        assert!(!root.path().join("views.damaged").exists());
        assert_eq!(store.checkpoint().expect("checkpoint").0, 1);
    }

    /// `remove` (for a rebuild) deletes a store and refuses any directory that is not
    /// one, so a mistyped path deletes nothing.
    #[test]
    fn remove_deletes_a_store_and_nothing_else() {
        let root = tempfile::tempdir().expect("tempdir");
        assert!(Store::remove(&root.path().join("missing")).is_ok());
        for files in [&["keep"][..], &["conf", "keep"][..], &["db", "keep"][..]] {
            let other = root.path().join(files.join("-"));
            std::fs::create_dir_all(&other).expect("dir");
            for name in files {
                std::fs::write(other.join(name), b"x").expect("write");
            }
            assert!(
                matches!(Store::remove(&other), Err(StoreError::NotAStore(_))),
                "{files:?}"
            );
            assert!(other.join("keep").exists(), "{files:?}");
        }
        let dir = root.path().join("views");
        drop(Store::open(&dir, 8 << 20).expect("open"));
        Store::remove(&dir).expect("remove");
        assert!(!dir.exists());
    }

    #[test]
    fn history_reads_across_chunks_from_any_version() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), 8 << 20).expect("open");
        let restock = |position: u64| {
            envelope(
                position,
                position,
                Kind::ProductRestocked(pb::ProductRestocked {
                    sku: "p".into(),
                    quantity: 1,
                }),
            )
        };
        // Three batches: versions 1-3, 4-5, 6 (one chunk each).
        for (batch, versions) in [(1..=3u64), (4..=5), (6..=6)].into_iter().enumerate() {
            let mut overlay = Overlay::new(&store);
            let mut last = 0;
            for v in versions {
                let e = restock(v);
                overlay.add_event(&e.stream_id, e.stream_version, &e.encode_to_vec());
                last = v;
            }
            store
                .commit(overlay.into_rows(last, &format!("e{last}")).expect("batch"))
                .expect("commit");
            assert_eq!(
                store.checkpoint().expect("checkpoint").0,
                last,
                "batch {batch}"
            );
        }
        let stream = StreamId::product("p");
        let versions = |from, limit| -> Vec<u64> {
            store
                .history(&stream, from, limit)
                .expect("history")
                .iter()
                .map(|e| e.stream_version)
                .collect()
        };
        assert_eq!(versions(1, 100), [1, 2, 3, 4, 5, 6]);
        assert_eq!(versions(2, 3), [2, 3, 4]);
        assert_eq!(versions(5, 100), [5, 6]);
        assert_eq!(versions(6, 100), [6]);
        assert!(versions(7, 100).is_empty());
        let until_4 = store
            .stream_prefix_while(&stream, |e| e.position <= 4)
            .expect("prefix");
        assert_eq!(until_4.len(), 4);
        // Another stream whose id extends this one's is not mixed in.
        assert!(store
            .history(&StreamId::product("pp"), 1, 10)
            .expect("history")
            .is_empty());
    }

    #[test]
    fn products_by_available_are_ordered_by_stock() {
        let a = View::index_keys(&pb::Product {
            sku: "a".into(),
            available: 5,
            ..Default::default()
        });
        let b = View::index_keys(&pb::Product {
            sku: "b".into(),
            available: 40,
            ..Default::default()
        });
        assert!(a[0].0 < b[0].0);
        assert!(a[0].0 < products::by_available_end(5));
        assert!(b[0].0 > products::by_available_end(5));
        assert!(b[0].0 < products::by_available_end(i64::MAX));
    }
}
