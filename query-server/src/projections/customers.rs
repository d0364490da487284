//! The customer view: profile, status, and counters derived from the customer's orders
//! (order_count, open_order_count, lifetime_spend_cents = totals of orders now PAID or
//! SHIPPED; a cancelled order never counts).

use shop_shared::pb;
use shop_shared::pb::event::Kind;
use shop_shared::pb::{CustomerStatus, OrderStatus};

use shop_shared::ids::StreamId;

use super::view::{index_prefix, IndexEntry, View, ViewTag};
use crate::store::{Store, StoreError};

/// Index: lower(name) NUL customer_id (customers by name).
const BY_NAME: [u8; 2] = index_prefix(b'n');

impl View for pb::Customer {
    const TAG: ViewTag = ViewTag::new(b'c');
    const NAME: &'static str = "customer";
    const ID_FIELD: &'static str = "customer_id";
    const NOT_FOUND: &'static str = "CUSTOMER_NOT_FOUND";
    /// Before orders: an order event's customer update reads the order's previous state.
    const WRITE_RANK: u8 = 0;

    fn id(&self) -> &str {
        &self.customer_id
    }

    fn position(&self) -> u64 {
        self.position
    }

    fn index_keys(&self) -> Vec<IndexEntry> {
        let mut k = by_name_prefix(&self.name);
        k.push(0);
        k.extend_from_slice(self.customer_id.as_bytes());
        vec![(k, self.customer_id.as_bytes().to_vec())]
    }

    /// Its own stream, and its orders' (its counters come from them).
    fn sources(store: &Store, id: &str) -> Result<Vec<StreamId>, StoreError> {
        let mut streams = vec![StreamId::customer(id)];
        let orders = store.index_values(&super::orders::by_customer_prefix(id))?;
        streams.extend(orders.into_iter().map(StreamId::order));
        Ok(streams)
    }
}

/// Prefix of the customers-by-name index for a name prefix (case-insensitive).
pub fn by_name_prefix(name_prefix: &str) -> Vec<u8> {
    let mut k = BY_NAME.to_vec();
    k.extend_from_slice(name_prefix.to_lowercase().as_bytes());
    k
}

/// The customer id of a customer event.
pub fn id_of(kind: &Kind) -> &str {
    match kind {
        Kind::CustomerRegistered(e) => &e.customer_id,
        Kind::CustomerRenamed(e) => &e.customer_id,
        Kind::CustomerAddressChanged(e) => &e.customer_id,
        Kind::CustomerDeleted(e) => &e.customer_id,
        _ => "",
    }
}

/// Folds a customer event.
pub fn apply(
    view: Option<pb::Customer>,
    envelope: &pb::EventEnvelope,
    kind: &Kind,
) -> pb::Customer {
    let mut c = view.unwrap_or_default();
    match kind {
        Kind::CustomerRegistered(e) => {
            c.customer_id.clone_from(&e.customer_id);
            c.name.clone_from(&e.name);
            c.email.clone_from(&e.email);
            c.address.clone_from(&e.address);
            c.set_status(CustomerStatus::Active);
            c.registered_at = envelope.occurred_at;
        }
        Kind::CustomerRenamed(e) => c.name.clone_from(&e.name),
        Kind::CustomerAddressChanged(e) => c.address.clone_from(&e.address),
        Kind::CustomerDeleted(_) => c.set_status(CustomerStatus::Deleted),
        _ => return c,
    }
    c.version = envelope.stream_version;
    touch(&mut c, envelope);
    c
}

/// What one order contributes to its customer's counters.
fn contribution(order: Option<&pb::Order>) -> (i64, i64) {
    match order.map(pb::Order::status) {
        Some(OrderStatus::Placed) => (1, 0),
        Some(OrderStatus::Paid) => (1, order.map_or(0, |o| o.total_cents)),
        Some(OrderStatus::Shipped) => (0, order.map_or(0, |o| o.total_cents)),
        _ => (0, 0),
    }
}

/// Updates the counters of an order's customer after the order changed.
pub fn on_order_change(
    mut customer: pb::Customer,
    before: Option<&pb::Order>,
    after: &pb::Order,
    envelope: &pb::EventEnvelope,
) -> pb::Customer {
    let (open_before, spend_before) = contribution(before);
    let (open_after, spend_after) = contribution(Some(after));
    if before.is_none() {
        customer.order_count += 1;
    }
    let open =
        i64::try_from(customer.open_order_count).unwrap_or(i64::MAX) + open_after - open_before;
    customer.open_order_count = u64::try_from(open.max(0)).unwrap_or(0);
    customer.lifetime_spend_cents = customer
        .lifetime_spend_cents
        .saturating_add(spend_after)
        .saturating_sub(spend_before);
    touch(&mut customer, envelope);
    customer
}

fn touch(c: &mut pb::Customer, envelope: &pb::EventEnvelope) {
    c.updated_at = envelope.occurred_at;
    c.position = envelope.position;
}

#[cfg(test)]
mod tests {
    use super::super::{envelope, MemoryViews};
    use super::*;

    fn placed(order_id: &str, total_cents: i64) -> Kind {
        Kind::OrderPlaced(pb::OrderPlaced {
            order_id: order_id.into(),
            customer_id: "c1".into(),
            lines: vec![],
            total_cents,
        })
    }

    #[test]
    fn counters_follow_the_orders() {
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
            envelope(2, 1, placed("o1", 100)),
            envelope(3, 1, placed("o2", 250)),
            envelope(4, 1, placed("o3", 1000)),
            envelope(
                5,
                2,
                Kind::OrderPaid(pb::OrderPaid {
                    order_id: "o1".into(),
                    amount_cents: 100,
                    payment_ref: "r".into(),
                }),
            ),
            envelope(
                6,
                3,
                Kind::OrderShipped(pb::OrderShipped {
                    order_id: "o1".into(),
                    tracking: String::new(),
                }),
            ),
            envelope(
                7,
                2,
                Kind::OrderPaid(pb::OrderPaid {
                    order_id: "o2".into(),
                    amount_cents: 250,
                    payment_ref: "r".into(),
                }),
            ),
            envelope(
                8,
                3,
                Kind::OrderCancelled(pb::OrderCancelled {
                    order_id: "o2".into(),
                    reason: "x".into(),
                }),
            ),
            envelope(
                9,
                2,
                Kind::CustomerRenamed(pb::CustomerRenamed {
                    customer_id: "c1".into(),
                    name: "Grace".into(),
                }),
            ),
        ];
        let views = MemoryViews::fold(&events);
        let c = &views.all::<pb::Customer>()["c1"];
        assert_eq!(c.name, "Grace");
        assert_eq!(c.order_count, 3);
        // o3 is still placed; o1 shipped; o2 cancelled after payment.
        assert_eq!(c.open_order_count, 1);
        assert_eq!(c.lifetime_spend_cents, 100);
        assert_eq!(c.version, 2);
        assert_eq!(c.position, 9);
        assert_eq!(c.status(), CustomerStatus::Active);
    }
}
