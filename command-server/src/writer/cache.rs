//! The aggregate cache: states and index entries loaded from the log on first use,
//! evolved in memory as commands are decided, kept across batches (bounded), so that
//! deciding rarely reads sled. States reach sled with the snapshots; index entries with
//! the commit records that change them.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use shop_shared::events::stream_of;
use shop_shared::ids::StreamId;

use super::snapshot::SnapshotRow;
use crate::domain::{self, Aggregate, Command, Event, ReadKey, READ_ROUNDS_MAX};
use crate::log::{EventLog, IndexChange, IndexName, LogError};

/// Entries cached in memory beyond this many are dropped at a snapshot (they are all in
/// sled by then).
const CACHE_ENTRIES_MAX: usize = 20_000;

/// States by stream and index entries by key; `None` = known not to exist.
pub(super) struct AggregateCache {
    log: Arc<EventLog>,
    states: HashMap<StreamId, Option<Aggregate>>,
    indexes: HashMap<(IndexName, Vec<u8>), Option<Vec<u8>>>,
    /// Streams changed since the last snapshot: never dropped from the cache before it.
    dirty: HashSet<StreamId>,
}

impl AggregateCache {
    pub(super) fn new(log: Arc<EventLog>) -> Self {
        AggregateCache {
            log,
            states: HashMap::new(),
            indexes: HashMap::new(),
            dirty: HashSet::new(),
        }
    }

    /// Once a snapshot is stored: drops the cache if it grew too large, except the
    /// states changed since the snapshot was taken (not stored yet).
    pub(super) fn trim(&mut self) {
        if self.states.len() + self.indexes.len() <= CACHE_ENTRIES_MAX {
            return;
        }
        let dirty = &self.dirty;
        self.states.retain(|stream, _| dirty.contains(stream));
        // Index entries are written with the commits: always stored.
        self.indexes.clear();
    }

    /// Forgets every cached index entry (they are read again from the log): after
    /// recovery, whose replay skips events a partly written snapshot already holds and
    /// so may have computed entries that later events, skipped, overwrote.
    pub(super) fn forget_indexes(&mut self) {
        self.indexes.clear();
    }

    /// Loads everything `decide` will read for `command`.
    pub(super) fn load_reads(&mut self, command: &Command) -> Result<(), LogError> {
        for _ in 0..READ_ROUNDS_MAX {
            let missing: Vec<ReadKey> = command
                .reads(&*self)
                .into_iter()
                .filter(|key| !self.holds(key))
                .collect();
            if missing.is_empty() {
                return Ok(());
            }
            for key in missing {
                match key {
                    ReadKey::Stream(stream) => self.load(&stream)?,
                    ReadKey::Index(index, key) => self.load_index(index, key)?,
                }
            }
        }
        debug_assert!(
            false,
            "{} still reads more after {READ_ROUNDS_MAX} rounds",
            command.name()
        );
        Ok(())
    }

    fn holds(&self, key: &ReadKey) -> bool {
        match key {
            ReadKey::Stream(stream) => self.states.contains_key(stream),
            ReadKey::Index(index, key) => self.indexes.contains_key(&(*index, key.clone())),
        }
    }

    pub(super) fn load(&mut self, stream: &StreamId) -> Result<(), LogError> {
        if self.states.contains_key(stream) {
            return Ok(());
        }
        let state = match self.log.state(stream)? {
            None => None,
            Some(bytes) => {
                Some(
                    Aggregate::decode(stream.kind, &bytes).map_err(|e| LogError::Corrupt {
                        key: format!("state of {stream}"),
                        reason: e.to_string(),
                    })?,
                )
            }
        };
        self.states.insert(stream.clone(), state);
        Ok(())
    }

    fn load_index(&mut self, index: IndexName, key: Vec<u8>) -> Result<(), LogError> {
        let value = self.log.index_get(index, &key)?;
        self.indexes.insert((index, key), value);
        Ok(())
    }

    pub(super) fn version(&self, stream: &StreamId) -> u64 {
        self.states
            .get(stream)
            .and_then(Option::as_ref)
            .map_or(0, Aggregate::version)
    }

    /// What `events` would make of the states they change, checked against the
    /// domain's invariants ([`Aggregate::check`]), without changing anything.
    pub(super) fn check(&mut self, events: &[Event]) -> Result<Result<(), String>, LogError> {
        let mut after: HashMap<StreamId, Aggregate> = HashMap::new();
        for event in events {
            let stream = stream_of(event);
            // Loaded already when `decide` read it; an event on a stream it did not
            // read is checked against the stored state too.
            self.load(&stream)?;
            let before = match after.remove(&stream) {
                Some(state) => Some(state),
                None => self.states.get(&stream).cloned().flatten(),
            };
            let next = Aggregate::evolve(stream.kind, before, event);
            if let Err(why) = next.check() {
                return Ok(Err(format!("{stream}: {why}")));
            }
            after.insert(stream, next);
        }
        Ok(Ok(()))
    }

    /// Folds an accepted event into its stream's state, adds the index changes to
    /// `changes`, and returns the stream's new version.
    pub(super) fn evolve(
        &mut self,
        stream: &StreamId,
        event: &Event,
        changes: &mut Vec<IndexChange>,
    ) -> Result<u64, LogError> {
        self.load(stream)?;
        self.dirty.insert(stream.clone());
        let before = self.states.get_mut(stream).and_then(Option::take);
        let after = Aggregate::evolve(stream.kind, before.clone(), event);
        for change in Aggregate::index_changes(stream, before.as_ref(), &after) {
            self.indexes
                .insert((change.index, change.key.clone()), change.value.clone());
            changes.push(change);
        }
        let version = after.version();
        self.states.insert(stream.clone(), Some(after));
        Ok(version)
    }

    /// The encoded states changed since the last snapshot, as snapshot rows, in stream
    /// order (so that what a crash part-way through a snapshot leaves is reproducible).
    pub(super) fn snapshot_dirty(&mut self, rows: &mut Vec<SnapshotRow>) {
        let mut dirty: Vec<StreamId> = self.dirty.drain().collect();
        dirty.sort_unstable_by_key(StreamId::to_string);
        for stream in dirty {
            if let Some(state) = self.states.get(&stream).and_then(Option::as_ref) {
                let bytes = state.encode();
                rows.push(SnapshotRow::State(stream, bytes));
            }
        }
    }

    pub(super) fn dirty_len(&self) -> usize {
        self.dirty.len()
    }
}

impl domain::State for AggregateCache {
    fn aggregate(&self, stream: &StreamId) -> Option<&Aggregate> {
        self.states.get(stream).and_then(Option::as_ref)
    }

    fn index(&self, index: IndexName, key: &[u8]) -> Option<&[u8]> {
        // Only called for keys `load_reads` loaded; a miss means "absent".
        self.indexes
            .get(&(index, key.to_vec()))
            .and_then(|v| v.as_deref())
    }
}

#[cfg(test)]
mod tests {
    use shop_shared::pb;

    use super::*;

    /// A product with 1 unit on hand, and events that would reserve 2 of it.
    #[test]
    fn events_breaking_an_invariant_are_caught_before_anything_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cache = AggregateCache::new(Arc::new(crate::log::open_in_test(dir.path())));
        let created = Event::ProductCreated(pb::ProductCreated {
            sku: "p".into(),
            name: "P".into(),
            price_cents: 1,
            initial_stock: 1,
        });
        cache
            .evolve(&StreamId::product("p"), &created, &mut Vec::new())
            .expect("evolve");
        let reserve = |quantity| {
            Event::StockReserved(pb::StockReserved {
                sku: "p".into(),
                order_id: "o".into(),
                quantity,
            })
        };
        assert_eq!(cache.check(&[reserve(1)]).expect("read"), Ok(()));
        let refused = cache.check(&[reserve(1), reserve(1)]).expect("read");
        assert_eq!(
            refused,
            Err("product-p: stock would be 2 reserved of 1 on hand".to_string())
        );
        assert_eq!(cache.version(&StreamId::product("p")), 1, "nothing changed");
    }
}
