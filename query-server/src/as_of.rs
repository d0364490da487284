//! As-of reads: a view as it was at a past position or time, folded from the entity's
//! stored events with the same projection code that maintains the views.

use shop_shared::events::micros_from_timestamp;
use shop_shared::grpc::{invalid_argument, FieldViolation};
use shop_shared::pb;
use tonic::Status;

use crate::projections::MemoryViews;

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
) -> Result<Option<Cutoff>, Status> {
    let bad =
        |description: &str| invalid_argument(&[FieldViolation::new("as_of_time", description)]);
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

/// The order `id` of folded views, with its customer's name as of the same cut-off.
pub fn take_order(views: &mut MemoryViews, id: &str) -> Option<pb::Order> {
    let mut order = views.orders.remove(id)?;
    order.customer_name = views
        .customers
        .get(&order.customer_id)
        .map(|c| c.name.clone())
        .unwrap_or_default();
    Some(order)
}
