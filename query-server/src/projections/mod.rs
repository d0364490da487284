//! Projections: pure functions from events to denormalized views, one module per view.
//!
//! [`apply`] folds one event envelope into a [`Views`] store; it does no I/O itself (the
//! consumer's store loads rows on demand; tests and as-of queries use [`MemoryViews`]).
//! Events are applied in log order; each view records the position and time of the last
//! event that changed it, and an event a view already holds (its position is at or
//! before the view's) leaves that view alone: replaying the events after the checkpoint
//! over rows a crash kept from a partly written batch changes only the rows it did not
//! keep (see `store.rs`, No sled batches).

pub mod customers;
#[cfg(test)]
mod golden_tests;
pub mod orders;
pub mod products;
pub mod shipments;
mod view;

use shop_shared::pb;
use shop_shared::pb::event::Kind;

pub use view::{
    Changed, IndexEntry, MemoryViews, ReadViews, Update, View, ViewKey, ViewTag, Views,
};

/// Whether `view` holds the event at `position` already.
fn holds<V: View>(view: Option<&V>, position: u64) -> bool {
    view.is_some_and(|v| v.position() >= position)
}

/// The view `id` as it was before the event at `position`, or `Err` if it holds that
/// event already (nothing to do for this view).
fn before<S: Views, V: View>(views: &mut S, id: &str, position: u64) -> Result<Option<V>, ()> {
    let view = views.get::<V>(id);
    if holds(view.as_ref(), position) {
        Err(())
    } else {
        Ok(view)
    }
}

/// Folds one event into the views; returns the views it changed. The registry of
/// projections: which views each event changes, in which order.
pub fn apply<S: Views>(views: &mut S, envelope: &pb::EventEnvelope) -> Vec<Changed<S>> {
    let Some(kind) = envelope.event.as_ref().and_then(|e| e.kind.as_ref()) else {
        return Vec::new();
    };
    let position = envelope.position;
    match kind {
        Kind::CustomerRegistered(_)
        | Kind::CustomerRenamed(_)
        | Kind::CustomerAddressChanged(_)
        | Kind::CustomerDeleted(_) => {
            let id = customers::id_of(kind);
            let Ok(before) = before::<S, pb::Customer>(views, id, position) else {
                return Vec::new();
            };
            views.put(customers::apply(before, envelope, kind));
            vec![Changed::of::<pb::Customer>(id)]
        }
        Kind::ProductCreated(_)
        | Kind::ProductRestocked(_)
        | Kind::ProductPriceChanged(_)
        | Kind::StockReserved(_)
        | Kind::StockReleased(_)
        | Kind::StockCommitted(_) => {
            let sku = products::sku_of(kind);
            let Ok(before) = before::<S, pb::Product>(views, sku, position) else {
                return Vec::new();
            };
            views.put(products::apply(before, envelope, kind));
            vec![Changed::of::<pb::Product>(sku)]
        }
        Kind::OrderPlaced(_)
        | Kind::OrderPaid(_)
        | Kind::OrderShipped(_)
        | Kind::OrderCancelled(_) => {
            let id = orders::id_of(kind);
            // The customer row is written before the order's (`WRITE_RANK`): if the order
            // holds the event, so does its customer.
            let Ok(before) = before::<S, pb::Order>(views, id, position) else {
                return Vec::new();
            };
            let after = orders::apply(before.clone(), envelope, kind);
            let mut changed = vec![Changed::of::<pb::Order>(id)];
            let customer = views.get::<pb::Customer>(&after.customer_id);
            if let Some(customer) = customer.filter(|c| !holds(Some(c), position)) {
                let updated =
                    customers::on_order_change(customer, before.as_ref(), &after, envelope);
                changed.push(Changed::of::<pb::Customer>(&updated.customer_id));
                views.put(updated);
            }
            views.put(after);
            changed
        }
        Kind::ShipmentCreated(_) | Kind::ShipmentTracked(_) => {
            let id = shipments::id_of(kind);
            let Ok(before) = before::<S, pb::Shipment>(views, id, position) else {
                return Vec::new();
            };
            views.put(shipments::apply(before, envelope, kind));
            vec![Changed::of::<pb::Shipment>(id)]
        }
    }
}

/// Builds an envelope around an event, for tests.
#[cfg(test)]
pub(crate) fn envelope(position: u64, stream_version: u64, kind: Kind) -> pb::EventEnvelope {
    let stream = shop_shared::events::stream_of(&kind);
    pb::EventEnvelope {
        event_id: format!("e{position}"),
        position,
        stream_id: stream.to_string(),
        stream_version,
        event_type: shop_shared::events::event_type(&kind).to_string(),
        occurred_at: Some(shop_shared::events::timestamp_from_micros(
            1_000_000 * position as i64,
        )),
        command_id: String::new(),
        correlation_id: String::new(),
        causation_id: String::new(),
        event: Some(pb::Event { kind: Some(kind) }),
        traceparent: String::new(),
        actor: String::new(),
        receipt: None,
    }
}
