//! The product view: catalogue data and stock (on_hand, reserved, available).

use shop_shared::pb;
use shop_shared::pb::event::Kind;

/// The sku of a product or stock event.
pub fn sku_of(kind: &Kind) -> &str {
    match kind {
        Kind::ProductCreated(e) => &e.sku,
        Kind::ProductRestocked(e) => &e.sku,
        Kind::ProductPriceChanged(e) => &e.sku,
        Kind::StockReserved(e) => &e.sku,
        Kind::StockReleased(e) => &e.sku,
        Kind::StockCommitted(e) => &e.sku,
        _ => "",
    }
}

/// Folds a product or stock event.
pub fn apply(view: Option<pb::Product>, envelope: &pb::EventEnvelope, kind: &Kind) -> pb::Product {
    let mut p = view.unwrap_or_default();
    match kind {
        Kind::ProductCreated(e) => {
            p.sku.clone_from(&e.sku);
            p.name.clone_from(&e.name);
            p.price_cents = e.price_cents;
            p.on_hand = e.initial_stock;
            p.reserved = 0;
        }
        Kind::ProductRestocked(e) => p.on_hand = p.on_hand.saturating_add(e.quantity),
        Kind::ProductPriceChanged(e) => p.price_cents = e.price_cents,
        Kind::StockReserved(e) => p.reserved = p.reserved.saturating_add(e.quantity),
        Kind::StockReleased(e) => p.reserved = p.reserved.saturating_sub(e.quantity),
        Kind::StockCommitted(e) => {
            p.on_hand = p.on_hand.saturating_sub(e.quantity);
            p.reserved = p.reserved.saturating_sub(e.quantity);
        }
        _ => return p,
    }
    p.available = p.on_hand - p.reserved;
    p.version = envelope.stream_version;
    p.updated_at = envelope.occurred_at;
    p.position = envelope.position;
    p
}

#[cfg(test)]
mod tests {
    use super::super::{envelope, MemoryViews};
    use super::*;

    #[test]
    fn stock_moves() {
        let events = [
            envelope(
                1,
                1,
                Kind::ProductCreated(pb::ProductCreated {
                    sku: "p".into(),
                    name: "Pen".into(),
                    price_cents: 150,
                    initial_stock: 10,
                }),
            ),
            envelope(
                2,
                2,
                Kind::StockReserved(pb::StockReserved {
                    sku: "p".into(),
                    order_id: "o".into(),
                    quantity: 4,
                }),
            ),
            envelope(
                3,
                3,
                Kind::StockCommitted(pb::StockCommitted {
                    sku: "p".into(),
                    order_id: "o".into(),
                    quantity: 3,
                }),
            ),
            envelope(
                4,
                4,
                Kind::StockReleased(pb::StockReleased {
                    sku: "p".into(),
                    order_id: "o".into(),
                    quantity: 1,
                }),
            ),
            envelope(
                5,
                5,
                Kind::ProductRestocked(pb::ProductRestocked {
                    sku: "p".into(),
                    quantity: 5,
                }),
            ),
        ];
        let p = &MemoryViews::fold(&events).products["p"];
        assert_eq!(
            (p.on_hand, p.reserved, p.available, p.version),
            (12, 0, 12, 5)
        );
    }
}
