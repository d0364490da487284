//! Projections: pure functions from events to denormalized views, one module per view.
//!
//! [`apply`] folds one event envelope into a [`Views`] store; it does no I/O itself (the
//! consumer's store loads rows on demand; tests and as-of queries use [`MemoryViews`]).
//! Events are applied in log order; each view records the position and time of the last
//! event that changed it.

pub mod customers;
pub mod orders;
pub mod products;
pub mod shipments;
mod view;

use shop_shared::pb;
use shop_shared::pb::event::Kind;

pub use view::{
    Changed, IndexEntry, MemoryViews, ReadViews, Update, View, ViewKey, ViewTag, Views,
};

/// Folds one event into the views; returns the views it changed. The registry of
/// projections: which views each event changes, in which order.
pub fn apply<S: Views>(views: &mut S, envelope: &pb::EventEnvelope) -> Vec<Changed<S>> {
    let Some(kind) = envelope.event.as_ref().and_then(|e| e.kind.as_ref()) else {
        return Vec::new();
    };
    match kind {
        Kind::CustomerRegistered(_)
        | Kind::CustomerRenamed(_)
        | Kind::CustomerAddressChanged(_)
        | Kind::CustomerDeleted(_) => {
            let id = customers::id_of(kind);
            let before = views.get::<pb::Customer>(id);
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
            let before = views.get::<pb::Product>(sku);
            views.put(products::apply(before, envelope, kind));
            vec![Changed::of::<pb::Product>(sku)]
        }
        Kind::OrderPlaced(_)
        | Kind::OrderPaid(_)
        | Kind::OrderShipped(_)
        | Kind::OrderCancelled(_) => {
            let id = orders::id_of(kind);
            let before = views.get::<pb::Order>(id);
            let after = orders::apply(before.clone(), envelope, kind);
            let mut changed = vec![Changed::of::<pb::Order>(id)];
            if let Some(customer) = views.get::<pb::Customer>(&after.customer_id) {
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
            let before = views.get::<pb::Shipment>(id);
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
    }
}
