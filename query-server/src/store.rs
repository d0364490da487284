//! The query server's sled database: view rows, secondary indexes, a copy of every event
//! (for history and as-of reads), and the checkpoint, all in one tree so that one batch
//! of events is one atomic write (views + indexes + events + checkpoint together).
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
//! - `m` name → metadata: `checkpoint` (last applied position) and the id of the event at
//!   the checkpoint (to notice a stream that is not the one the views were built from)
//!
//! Indexes are kept by diffing the index keys of a view before and after a batch, so a
//! view and its index entries can never disagree.

use std::any::Any;
use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use prost::Message;
use shop_shared::ids::StreamId;
use shop_shared::pb;

use crate::projections::{IndexEntry, ReadViews, View, ViewTag, Views};

const EVENT: u8 = b'e';

const CHECKPOINT: &[u8] = b"mcheckpoint";
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
}

/// The query server's database.
pub struct Store {
    db: sled::Db,
}

impl Store {
    /// Opens (or creates) the store in `dir`; `cache_bytes` bounds sled's page cache.
    pub fn open(dir: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .mode(sled::Mode::HighThroughput)
            // The consumer is the only flusher (sled#1308: concurrent flushes can hang).
            .flush_every_ms(None)
            .open()?;
        Ok(Store { db })
    }

    /// Last applied position and the id of the event there (0 and "" when empty).
    pub fn checkpoint(&self) -> Result<(u64, String), StoreError> {
        let position = match self.db.get(CHECKPOINT)? {
            Some(v) => decode_u64(&v, CHECKPOINT)?,
            None => 0,
        };
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

    /// Applies a batch atomically.
    pub fn commit(&self, batch: sled::Batch) -> Result<(), StoreError> {
        self.db.apply_batch(batch)?;
        Ok(())
    }

    /// Writes sled's buffers to disk (the store needs no fsync: after a crash it recovers a
    /// consistent prefix of batches, views and checkpoint together).
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
    fn index_keys(&self) -> Vec<IndexEntry>;
    fn encode(&self) -> Vec<u8>;
    fn same(&self, other: &dyn AnyView) -> bool;
}

impl<V: View> AnyView for V {
    fn as_any(&self) -> &dyn Any {
        self
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
    /// Storage error met while loading; reported at commit.
    error: Option<StoreError>,
}

impl<'s> Overlay<'s> {
    pub fn new(store: &'s Store) -> Self {
        Overlay {
            store,
            rows: HashMap::new(),
            events: HashMap::new(),
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
    }

    /// Builds the atomic batch: changed views, their index diffs, events, checkpoint.
    pub fn into_batch(
        self,
        checkpoint: u64,
        checkpoint_event_id: &str,
    ) -> Result<sled::Batch, StoreError> {
        if let Some(error) = self.error {
            return Err(error);
        }
        let mut batch = sled::Batch::default();
        for ((tag, id), row) in self.rows {
            if row.changed() {
                write_row(&mut batch, &key(tag.byte(), id.as_bytes()), &row);
            }
        }
        for (stream_id, (first_version, chunk)) in self.events {
            let mut k = key(EVENT, stream_id.as_bytes());
            k.push(0);
            k.extend_from_slice(&first_version.to_be_bytes());
            batch.insert(k, chunk.encode_to_vec());
        }
        batch.insert(CHECKPOINT, &checkpoint.to_be_bytes());
        batch.insert(CHECKPOINT_EVENT, checkpoint_event_id.as_bytes());
        Ok(batch)
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

/// A changed view's row and its index diff.
fn write_row(batch: &mut sled::Batch, row_key: &[u8], row: &Row) {
    let keys = |v: &Option<Box<dyn AnyView>>| -> BTreeSet<IndexEntry> {
        v.as_ref()
            .map(|v| v.index_keys().into_iter().collect())
            .unwrap_or_default()
    };
    let (before, after) = (keys(&row.stored), keys(&row.current));
    for (k, _) in before.difference(&after) {
        batch.remove(k.as_slice());
    }
    for (k, v) in after.difference(&before) {
        batch.insert(k.as_slice(), v.as_slice());
    }
    match &row.current {
        Some(view) => batch.insert(row_key, view.encode()),
        None => batch.remove(row_key),
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
            envelope(
                2,
                1,
                Kind::OrderPlaced(pb::OrderPlaced {
                    order_id: "o1".into(),
                    customer_id: "c1".into(),
                    lines: vec![],
                    total_cents: 5,
                }),
            ),
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
            .commit(overlay.into_batch(3, "e3").expect("batch"))
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
                .commit(
                    overlay
                        .into_batch(last, &format!("e{last}"))
                        .expect("batch"),
                )
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
