//! The order view: lines with product names and prices captured at placement, totals,
//! status and the time of each transition. The customer's name is joined in at read time
//! (so it is always the current one, or the one as of an as-of read).

use shop_shared::pb;
use shop_shared::pb::event::Kind;
use shop_shared::pb::OrderStatus;

use shop_shared::ids::StreamId;

use super::view::{index_prefix, inverted, IndexEntry, ReadViews, View, ViewTag};
use crate::store::{Store, StoreError};

/// Index: inv(placed_position) (all orders, newest first).
pub const ALL: [u8; 2] = index_prefix(b'a');
/// Index: customer_id NUL inv(placed_position) (orders of a customer).
const BY_CUSTOMER: [u8; 2] = index_prefix(b'c');
/// Index: status inv(placed_position) (orders by status).
const BY_STATUS: [u8; 2] = index_prefix(b's');

impl View for pb::Order {
    const TAG: ViewTag = ViewTag::new(b'o');
    const NAME: &'static str = "order";
    const ID_FIELD: &'static str = "order_id";
    const NOT_FOUND: &'static str = "ORDER_NOT_FOUND";

    fn id(&self) -> &str {
        &self.order_id
    }

    fn position(&self) -> u64 {
        self.position
    }

    fn index_keys(&self) -> Vec<IndexEntry> {
        let inv = inverted(self.placed_position);
        let id = self.order_id.as_bytes().to_vec();
        let mut all = ALL.to_vec();
        all.extend_from_slice(&inv);
        let mut by_customer = by_customer_prefix(&self.customer_id);
        by_customer.extend_from_slice(&inv);
        let mut by_status = by_status_prefix(self.status());
        by_status.extend_from_slice(&inv);
        vec![
            (all, id.clone()),
            (by_customer, id.clone()),
            (by_status, id),
        ]
    }

    /// The customer's name, as of the same state (current, or as of an as-of read).
    fn join(&mut self, views: &mut impl ReadViews) {
        self.customer_name = views
            .get::<pb::Customer>(&self.customer_id)
            .map(|c| c.name)
            .unwrap_or_default();
    }

    /// Its own stream, and its customer's (for the name). Which customer is read from
    /// the current view: an order never changes customers.
    fn sources(store: &Store, id: &str) -> Result<Vec<StreamId>, StoreError> {
        Ok(match store.view::<pb::Order>(id)? {
            Some(current) => vec![
                StreamId::order(id),
                StreamId::customer(&current.customer_id),
            ],
            None => Vec::new(),
        })
    }
}

/// Prefix of the orders-by-customer index for one customer.
pub fn by_customer_prefix(customer_id: &str) -> Vec<u8> {
    let mut k = BY_CUSTOMER.to_vec();
    k.extend_from_slice(customer_id.as_bytes());
    k.push(0);
    k
}

/// Prefix of the orders-by-status index for one status.
pub fn by_status_prefix(status: OrderStatus) -> Vec<u8> {
    let mut k = BY_STATUS.to_vec();
    k.push(u8::try_from(status as i32).unwrap_or(0));
    k
}

/// The order id of an order event.
pub fn id_of(kind: &Kind) -> &str {
    match kind {
        Kind::OrderPlaced(e) => &e.order_id,
        Kind::OrderPaid(e) => &e.order_id,
        Kind::OrderShipped(e) => &e.order_id,
        Kind::OrderCancelled(e) => &e.order_id,
        _ => "",
    }
}

/// Folds an order event.
pub fn apply(view: Option<pb::Order>, envelope: &pb::EventEnvelope, kind: &Kind) -> pb::Order {
    let mut o = view.unwrap_or_default();
    match kind {
        Kind::OrderPlaced(e) => {
            o.order_id.clone_from(&e.order_id);
            o.customer_id.clone_from(&e.customer_id);
            o.lines = e
                .lines
                .iter()
                .map(|l| pb::OrderLineView {
                    sku: l.sku.clone(),
                    product_name: l.product_name.clone(),
                    quantity: l.quantity,
                    unit_price_cents: l.unit_price_cents,
                })
                .collect();
            o.total_cents = e.total_cents;
            o.set_status(OrderStatus::Placed);
            o.placed_at = envelope.occurred_at;
            o.placed_position = envelope.position;
        }
        Kind::OrderPaid(e) => {
            o.set_status(OrderStatus::Paid);
            o.paid_at = envelope.occurred_at;
            o.payment_ref.clone_from(&e.payment_ref);
        }
        Kind::OrderShipped(e) => {
            o.set_status(OrderStatus::Shipped);
            o.shipped_at = envelope.occurred_at;
            o.tracking.clone_from(&e.tracking);
        }
        Kind::OrderCancelled(e) => {
            o.set_status(OrderStatus::Cancelled);
            o.cancelled_at = envelope.occurred_at;
            o.cancel_reason.clone_from(&e.reason);
        }
        _ => return o,
    }
    o.version = envelope.stream_version;
    o.position = envelope.position;
    o
}

#[cfg(test)]
mod tests {
    use super::super::{envelope, MemoryViews};
    use super::*;

    #[test]
    fn lifecycle_timestamps_and_reason() {
        let events = [
            envelope(
                3,
                1,
                Kind::OrderPlaced(pb::OrderPlaced {
                    order_id: "o".into(),
                    customer_id: "c".into(),
                    lines: vec![pb::OrderLine {
                        sku: "p".into(),
                        quantity: 2,
                        unit_price_cents: 150,
                        product_name: "Pen".into(),
                    }],
                    total_cents: 300,
                }),
            ),
            envelope(
                7,
                2,
                Kind::OrderCancelled(pb::OrderCancelled {
                    order_id: "o".into(),
                    reason: "customer deleted".into(),
                }),
            ),
        ];
        let o = &MemoryViews::fold(&events).all::<pb::Order>()["o"];
        assert_eq!(o.status(), OrderStatus::Cancelled);
        assert_eq!(o.lines[0].product_name, "Pen");
        assert_eq!(o.placed_position, 3);
        assert_eq!(o.position, 7);
        assert_eq!(o.cancel_reason, "customer deleted");
        assert!(o.placed_at.is_some() && o.cancelled_at.is_some() && o.paid_at.is_none());
    }
}
