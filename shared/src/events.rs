//! Event helpers: type names, the aggregate an event belongs to, timestamps.

use crate::ids::StreamId;
use crate::pb::event::Kind;

/// The event type name used in the envelope and the `Shop-Event-Type` header.
pub fn event_type(kind: &Kind) -> &'static str {
    match kind {
        Kind::CustomerRegistered(_) => "CustomerRegistered",
        Kind::CustomerRenamed(_) => "CustomerRenamed",
        Kind::CustomerAddressChanged(_) => "CustomerAddressChanged",
        Kind::CustomerDeleted(_) => "CustomerDeleted",
        Kind::ProductCreated(_) => "ProductCreated",
        Kind::ProductRestocked(_) => "ProductRestocked",
        Kind::ProductPriceChanged(_) => "ProductPriceChanged",
        Kind::StockReserved(_) => "StockReserved",
        Kind::StockReleased(_) => "StockReleased",
        Kind::StockCommitted(_) => "StockCommitted",
        Kind::OrderPlaced(_) => "OrderPlaced",
        Kind::OrderPaid(_) => "OrderPaid",
        Kind::OrderShipped(_) => "OrderShipped",
        Kind::OrderCancelled(_) => "OrderCancelled",
        Kind::ShipmentCreated(_) => "ShipmentCreated",
        Kind::ShipmentTracked(_) => "ShipmentTracked",
    }
}

/// The stream an event belongs to, read from its payload.
pub fn stream_of(kind: &Kind) -> StreamId {
    match kind {
        Kind::CustomerRegistered(e) => StreamId::customer(&e.customer_id),
        Kind::CustomerRenamed(e) => StreamId::customer(&e.customer_id),
        Kind::CustomerAddressChanged(e) => StreamId::customer(&e.customer_id),
        Kind::CustomerDeleted(e) => StreamId::customer(&e.customer_id),
        Kind::ProductCreated(e) => StreamId::product(&e.sku),
        Kind::ProductRestocked(e) => StreamId::product(&e.sku),
        Kind::ProductPriceChanged(e) => StreamId::product(&e.sku),
        Kind::StockReserved(e) => StreamId::product(&e.sku),
        Kind::StockReleased(e) => StreamId::product(&e.sku),
        Kind::StockCommitted(e) => StreamId::product(&e.sku),
        Kind::OrderPlaced(e) => StreamId::order(&e.order_id),
        Kind::OrderPaid(e) => StreamId::order(&e.order_id),
        Kind::OrderShipped(e) => StreamId::order(&e.order_id),
        Kind::OrderCancelled(e) => StreamId::order(&e.order_id),
        Kind::ShipmentCreated(e) => StreamId::shipment(&e.shipment_id),
        Kind::ShipmentTracked(e) => StreamId::shipment(&e.shipment_id),
    }
}

/// Microseconds since the Unix epoch, now.
pub fn now_micros() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(now.as_micros()).unwrap_or(i64::MAX)
}

/// A protobuf timestamp from microseconds since the epoch.
pub fn timestamp_from_micros(micros: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: i32::try_from(micros.rem_euclid(1_000_000) * 1_000).unwrap_or(0),
    }
}

/// Microseconds since the epoch of a protobuf timestamp (saturating).
pub fn micros_from_timestamp(ts: &prost_types::Timestamp) -> i64 {
    ts.seconds
        .saturating_mul(1_000_000)
        .saturating_add(i64::from(ts.nanos) / 1_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip() {
        for micros in [
            0,
            1,
            999_999,
            1_000_000,
            1_700_000_000_123_456,
            -1,
            -1_500_000,
        ] {
            assert_eq!(
                micros_from_timestamp(&timestamp_from_micros(micros)),
                micros
            );
        }
    }
}
