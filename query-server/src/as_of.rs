//! As-of reads: a view as it was at a past position or time, folded from the entity's
//! stored events with the same projection code that maintains the views.

use shop_shared::events::micros_from_timestamp;
use shop_shared::pb;

use crate::error::QueryError;
use crate::projections::{MemoryViews, ReadViews, View};
use crate::store::{Store, StoreError};

/// A point in the past to read the view at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cutoff {
    Position(u64),
    TimeMicros(i64),
}

impl Cutoff {
    /// Whether the event happened at or before the cut-off.
    pub fn keeps(self, envelope: &pb::EventEnvelope) -> bool {
        match self {
            Cutoff::Position(p) => envelope.position <= p,
            Cutoff::TimeMicros(t) => {
                envelope
                    .occurred_at
                    .as_ref()
                    .map_or(0, micros_from_timestamp)
                    <= t
            }
        }
    }

    pub fn describe(self) -> String {
        match self {
            Cutoff::Position(p) => format!("at position {p}"),
            Cutoff::TimeMicros(t) => format!("at {t} µs since the epoch"),
        }
    }
}

/// The cut-off a request asks for (`None`: read the current view), or INVALID_ARGUMENT.
pub fn cutoff(
    as_of_position: u64,
    as_of_time: Option<&prost_types::Timestamp>,
) -> Result<Option<Cutoff>, QueryError> {
    let bad = |description: &str| QueryError::bad("as_of_time", description);
    match (as_of_position, as_of_time) {
        (0, None) => Ok(None),
        (p, None) => Ok(Some(Cutoff::Position(p))),
        (0, Some(t)) => {
            if t.nanos < 0 || t.nanos >= 1_000_000_000 {
                return Err(bad("nanos must be within 0..1e9"));
            }
            Ok(Some(Cutoff::TimeMicros(micros_from_timestamp(t))))
        }
        _ => Err(bad("set as_of_position or as_of_time, not both")),
    }
}

/// Folds the kept events of several streams, merged in position order.
pub fn fold_merged(mut events: Vec<pb::EventEnvelope>) -> MemoryViews {
    events.sort_by_key(|e| e.position);
    MemoryViews::fold(&events)
}

/// The view `id` as of `cut`, with its joins as of the same cut-off: the stored events
/// of every stream it is made of ([`View::sources`]), each cut, merged and folded.
pub fn read_as_of<V: View>(store: &Store, id: &str, cut: Cutoff) -> Result<Option<V>, StoreError> {
    let mut events = Vec::new();
    for stream in V::sources(store, id)? {
        events.extend(store.stream_prefix_while(&stream, |e| cut.keeps(e))?);
    }
    Ok(fold_merged(events).joined::<V>(id))
}
