//! Projections: pure functions from events to denormalized views, one module per view.
//!
//! [`apply`] folds one event envelope into a [`Views`] store; it does no I/O itself (the
//! consumer's store loads rows on demand; tests and as-of queries use [`MemoryViews`]).
//! Events are applied in log order; each view records the position and time of the last
//! event that changed it.

pub mod customers;
pub mod orders;
pub mod products;

use std::collections::HashMap;

use shop_shared::pb;
use shop_shared::pb::event::Kind;

/// Where projections read and write views.
pub trait Views {
    fn customer(&mut self, customer_id: &str) -> Option<pb::Customer>;
    fn put_customer(&mut self, view: pb::Customer);
    fn product(&mut self, sku: &str) -> Option<pb::Product>;
    fn put_product(&mut self, view: pb::Product);
    fn order(&mut self, order_id: &str) -> Option<pb::Order>;
    fn put_order(&mut self, view: pb::Order);
}

/// A view that an event changed (for watchers).
#[derive(Debug, Clone, PartialEq)]
pub enum Changed {
    Customer(String),
    Product(String),
    Order(String),
}

/// Folds one event into the views; returns the views it changed.
pub fn apply(views: &mut impl Views, envelope: &pb::EventEnvelope) -> Vec<Changed> {
    let Some(kind) = envelope.event.as_ref().and_then(|e| e.kind.as_ref()) else {
        return Vec::new();
    };
    match kind {
        Kind::CustomerRegistered(_)
        | Kind::CustomerRenamed(_)
        | Kind::CustomerAddressChanged(_)
        | Kind::CustomerDeleted(_) => {
            let id = customers::id_of(kind);
            let before = views.customer(id);
            let after = customers::apply(before, envelope, kind);
            views.put_customer(after);
            vec![Changed::Customer(id.to_string())]
        }
        Kind::ProductCreated(_)
        | Kind::ProductRestocked(_)
        | Kind::ProductPriceChanged(_)
        | Kind::StockReserved(_)
        | Kind::StockReleased(_)
        | Kind::StockCommitted(_) => {
            let sku = products::sku_of(kind);
            let before = views.product(sku);
            let after = products::apply(before, envelope, kind);
            views.put_product(after);
            vec![Changed::Product(sku.to_string())]
        }
        Kind::OrderPlaced(_)
        | Kind::OrderPaid(_)
        | Kind::OrderShipped(_)
        | Kind::OrderCancelled(_) => {
            let id = orders::id_of(kind);
            let before = views.order(id);
            let after = orders::apply(before.clone(), envelope, kind);
            let mut changed = vec![Changed::Order(id.to_string())];
            if let Some(customer) = views.customer(&after.customer_id) {
                let updated =
                    customers::on_order_change(customer, before.as_ref(), &after, envelope);
                changed.push(Changed::Customer(updated.customer_id.clone()));
                views.put_customer(updated);
            }
            views.put_order(after);
            changed
        }
    }
}

/// Views in memory: the reference fold for tests and the scratch space of as-of queries.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct MemoryViews {
    pub customers: HashMap<String, pb::Customer>,
    pub products: HashMap<String, pb::Product>,
    pub orders: HashMap<String, pb::Order>,
}

impl MemoryViews {
    /// Folds every envelope, in order.
    pub fn fold<'a>(envelopes: impl IntoIterator<Item = &'a pb::EventEnvelope>) -> Self {
        let mut views = MemoryViews::default();
        for e in envelopes {
            apply(&mut views, e);
        }
        views
    }
}

impl Views for MemoryViews {
    fn customer(&mut self, customer_id: &str) -> Option<pb::Customer> {
        self.customers.get(customer_id).cloned()
    }
    fn put_customer(&mut self, view: pb::Customer) {
        self.customers.insert(view.customer_id.clone(), view);
    }
    fn product(&mut self, sku: &str) -> Option<pb::Product> {
        self.products.get(sku).cloned()
    }
    fn put_product(&mut self, view: pb::Product) {
        self.products.insert(view.sku.clone(), view);
    }
    fn order(&mut self, order_id: &str) -> Option<pb::Order> {
        self.orders.get(order_id).cloned()
    }
    fn put_order(&mut self, view: pb::Order) {
        self.orders.insert(view.order_id.clone(), view);
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
