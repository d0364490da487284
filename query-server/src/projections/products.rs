//! The product view: catalogue data and stock (on_hand, reserved, available).

use shop_shared::pb;
use shop_shared::pb::event::Kind;

use shop_shared::ids::StreamId;

use super::view::{index_prefix, ordered_i64, IndexEntry, View, ViewTag};
use crate::store::{Store, StoreError};

/// Index: ordered(available) sku (products by stock).
pub const BY_AVAILABLE: [u8; 2] = index_prefix(b'p');

impl View for pb::Product {
    const TAG: ViewTag = ViewTag::new(b'p');
    const NAME: &'static str = "product";
    const ID_FIELD: &'static str = "sku";
    const NOT_FOUND: &'static str = "PRODUCT_NOT_FOUND";

    fn id(&self) -> &str {
        &self.sku
    }

    fn position(&self) -> u64 {
        self.position
    }

    fn index_keys(&self) -> Vec<IndexEntry> {
        let mut k = BY_AVAILABLE.to_vec();
        k.extend_from_slice(&ordered_i64(self.available));
        k.extend_from_slice(self.sku.as_bytes());
        vec![(k, self.sku.as_bytes().to_vec())]
    }

    fn sources(_store: &Store, sku: &str) -> Result<Vec<StreamId>, StoreError> {
        Ok(vec![StreamId::product(sku)])
    }
}

/// Key just past every product with `available <= max_available` in the stock index.
pub fn by_available_end(max_available: i64) -> Vec<u8> {
    let mut k = BY_AVAILABLE.to_vec();
    match max_available.checked_add(1) {
        Some(next) => k.extend_from_slice(&ordered_i64(next)),
        None => k.push(0xff),
    }
    k
}

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
        let p = &MemoryViews::fold(&events).all::<pb::Product>()["p"];
        assert_eq!(
            (p.on_hand, p.reserved, p.available, p.version),
            (12, 0, 12, 5)
        );
    }
}
