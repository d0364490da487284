//! The order view: lines with product names and prices captured at placement, totals,
//! status and the time of each transition. The customer's name is joined in at read time
//! (so it is always the current one, or the one as of an as-of read).

use shop_shared::pb;
use shop_shared::pb::event::Kind;
use shop_shared::pb::OrderStatus;

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
        let o = &MemoryViews::fold(&events).orders["o"];
        assert_eq!(o.status(), OrderStatus::Cancelled);
        assert_eq!(o.lines[0].product_name, "Pen");
        assert_eq!(o.placed_position, 3);
        assert_eq!(o.position, 7);
        assert_eq!(o.cancel_reason, "customer deleted");
        assert!(o.placed_at.is_some() && o.cancelled_at.is_some() && o.paid_at.is_none());
    }
}
