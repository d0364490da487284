//! What the store, the consumer and the watches need to know about a view, behind one
//! trait, so that none of them names a view: [`View`] (its rows' tag, id, index entries,
//! read-time joins), [`ReadViews`]/[`Views`] (where projections read and write views),
//! [`Changed`] (what an event changed, readable for watchers) and [`Update`] (one change
//! as a watcher receives it).

use std::any::Any;
use std::collections::BTreeMap;
use std::sync::Arc;

use prost::Message;
use shop_shared::ids::StreamId;

use crate::store::{Store, StoreError};

/// The tag of a view's rows in the store. The store's own row kinds (`e` events, `m`
/// metadata, `x` indexes) cannot be taken: `ViewTag::new` fails to compile then.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ViewTag(u8);

impl ViewTag {
    pub const fn new(tag: u8) -> Self {
        assert!(
            !matches!(tag, b'e' | b'm' | b'x'),
            "view tag collides with a row kind of the store"
        );
        ViewTag(tag)
    }

    pub fn byte(self) -> u8 {
        self.0
    }
}

/// An index entry of a view: key (starting with its index's [`index_prefix`]) → view id.
pub type IndexEntry = (Vec<u8>, Vec<u8>);

/// The prefix of an index's keys: the store's index row kind `x`, then the index's own
/// letter (unique among all views).
pub const fn index_prefix(letter: u8) -> [u8; 2] {
    [b'x', letter]
}

/// Order-preserving encoding of a signed number, for index keys.
pub fn ordered_i64(value: i64) -> [u8; 8] {
    ((value as u64) ^ (1 << 63)).to_be_bytes()
}

/// Newest-first encoding of a position, for index keys.
pub fn inverted(position: u64) -> [u8; 8] {
    (u64::MAX - position).to_be_bytes()
}

/// A denormalized view, stored one row per id.
pub trait View: Message + Default + Clone + PartialEq + Send + Sync + 'static {
    /// Its rows' tag in the store.
    const TAG: ViewTag;
    /// What clients call it, in messages: `order`.
    const NAME: &'static str;
    /// The request field naming its id: `order_id`.
    const ID_FIELD: &'static str;
    /// The ErrorInfo reason when it does not exist: `ORDER_NOT_FOUND`.
    const NOT_FOUND: &'static str;

    /// Where its rows come in a batch's writes (lowest first): a view whose projection
    /// reads another view's state from before an event is written before that view, so
    /// that a crash never keeps the other's new state without this one's (see
    /// `store.rs`, No sled batches).
    const WRITE_RANK: u8 = 1;

    /// Its id (the row key).
    fn id(&self) -> &str;

    /// Position of the last event that changed it: what orders a watch's updates, and
    /// what tells a replay that the row holds an event already.
    fn position(&self) -> u64;

    /// Its secondary index entries. The store keeps them by diffing these before and
    /// after each batch, so a view and its index entries never disagree.
    fn index_keys(&self) -> Vec<IndexEntry> {
        Vec::new()
    }

    /// Fills what is joined in at read time from other views (as of the same state).
    fn join(&mut self, _views: &mut impl ReadViews) {}

    /// The streams whose events make up view `id` and its joins (for as-of reads,
    /// which fold them).
    fn sources(store: &Store, id: &str) -> Result<Vec<StreamId>, StoreError>;
}

/// Where views are read.
pub trait ReadViews {
    fn get<V: View>(&mut self, id: &str) -> Option<V>;

    /// A view with its read-time joins filled in.
    fn joined<V: View>(&mut self, id: &str) -> Option<V>
    where
        Self: Sized,
    {
        let mut view = self.get::<V>(id)?;
        view.join(self);
        Some(view)
    }
}

/// Where projections read and write views.
pub trait Views: ReadViews {
    fn put<V: View>(&mut self, view: V);
}

/// A view some event changed; [`Changed::read`] reads it (joined) for watchers, only
/// when it is watched.
pub struct Changed<S> {
    pub key: ViewKey,
    read: fn(&mut S, &str) -> Option<Update>,
}

impl<S: ReadViews> Changed<S> {
    pub fn of<V: View>(id: &str) -> Self {
        Changed {
            key: ViewKey::of::<V>(id),
            read: |views, id| views.joined::<V>(id).map(Update::new),
        }
    }

    /// The changed view as it is in `views` now.
    pub fn read(&self, views: &mut S) -> Option<Update> {
        (self.read)(views, &self.key.id)
    }
}

impl<S> std::fmt::Debug for Changed<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.key.fmt(f)
    }
}

/// One view: its tag and id (what a watch is keyed by).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ViewKey {
    pub tag: ViewTag,
    pub id: String,
}

impl ViewKey {
    pub fn of<V: View>(id: &str) -> Self {
        ViewKey {
            tag: V::TAG,
            id: id.to_string(),
        }
    }
}

/// One change of a view, as watchers receive it.
#[derive(Clone)]
pub struct Update(Arc<dyn Any + Send + Sync>);

impl Update {
    pub fn new<V: View>(view: V) -> Self {
        Update(Arc::new(view))
    }

    /// The view, if it is a `V`.
    pub fn view<V: View>(&self) -> Option<&V> {
        self.0.downcast_ref::<V>()
    }
}

impl std::fmt::Debug for Update {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Update(..)")
    }
}

/// Views in memory: the reference fold for tests and the scratch space of as-of queries.
/// Rows are kept encoded, as the store keeps them.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct MemoryViews {
    rows: BTreeMap<(ViewTag, String), Vec<u8>>,
}

impl MemoryViews {
    /// Folds every envelope, in order.
    pub fn fold<'a>(
        envelopes: impl IntoIterator<Item = &'a shop_shared::pb::EventEnvelope>,
    ) -> Self {
        let mut views = MemoryViews::default();
        for e in envelopes {
            super::apply(&mut views, e);
        }
        views
    }

    /// Every view of one kind, by id.
    pub fn all<V: View>(&self) -> BTreeMap<String, V> {
        self.rows
            .range((V::TAG, String::new())..)
            .take_while(|((tag, _), _)| *tag == V::TAG)
            .filter_map(|((_, id), bytes)| Some((id.clone(), V::decode(bytes.as_slice()).ok()?)))
            .collect()
    }
}

impl ReadViews for MemoryViews {
    fn get<V: View>(&mut self, id: &str) -> Option<V> {
        let bytes = self.rows.get(&(V::TAG, id.to_string()))?;
        V::decode(bytes.as_slice()).ok()
    }
}

impl Views for MemoryViews {
    fn put<V: View>(&mut self, view: V) {
        self.rows
            .insert((V::TAG, view.id().to_string()), view.encode_to_vec());
    }
}
