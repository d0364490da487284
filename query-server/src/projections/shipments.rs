//! The shipment view: carrier, tracking code, current status, every scan with its time.

use shop_shared::ids::StreamId;
use shop_shared::pb;
use shop_shared::pb::event::Kind;
use shop_shared::pb::ShipmentStatus;

use super::view::{View, ViewTag};
use crate::store::{Store, StoreError};

impl View for pb::Shipment {
    const TAG: ViewTag = ViewTag::new(b's');
    const NAME: &'static str = "shipment";
    const ID_FIELD: &'static str = "shipment_id";
    const NOT_FOUND: &'static str = "SHIPMENT_NOT_FOUND";

    fn id(&self) -> &str {
        &self.shipment_id
    }

    fn position(&self) -> u64 {
        self.position
    }

    fn sources(_store: &Store, id: &str) -> Result<Vec<StreamId>, StoreError> {
        Ok(vec![StreamId::shipment(id)])
    }
}

/// The shipment id of a shipment event.
pub fn id_of(kind: &Kind) -> &str {
    match kind {
        Kind::ShipmentCreated(e) => &e.shipment_id,
        Kind::ShipmentTracked(e) => &e.shipment_id,
        _ => "",
    }
}

/// Folds a shipment event.
pub fn apply(
    view: Option<pb::Shipment>,
    envelope: &pb::EventEnvelope,
    kind: &Kind,
) -> pb::Shipment {
    let mut s = view.unwrap_or_default();
    match kind {
        Kind::ShipmentCreated(e) => {
            s.shipment_id.clone_from(&e.shipment_id);
            s.order_id.clone_from(&e.order_id);
            s.carrier.clone_from(&e.carrier);
            s.tracking_code.clone_from(&e.tracking_code);
            s.set_status(ShipmentStatus::Created);
            s.created_at = envelope.occurred_at;
        }
        Kind::ShipmentTracked(e) => {
            s.status = e.status;
            if e.status() == ShipmentStatus::Delivered {
                s.delivered_at = envelope.occurred_at;
            }
            s.tracking.push(pb::TrackingEntry {
                status: e.status,
                location: e.location.clone(),
                note: e.note.clone(),
                at: envelope.occurred_at,
            });
        }
        _ => return s,
    }
    s.version = envelope.stream_version;
    s.position = envelope.position;
    s
}

#[cfg(test)]
mod tests {
    use super::super::{envelope, MemoryViews};
    use super::*;

    #[test]
    fn scans_are_listed_in_order_and_delivery_is_timed() {
        let tracked = |status: ShipmentStatus, location: &str| {
            Kind::ShipmentTracked(pb::ShipmentTracked {
                shipment_id: "s".into(),
                status: status as i32,
                location: location.into(),
                note: String::new(),
            })
        };
        let events = [
            envelope(
                7,
                1,
                Kind::ShipmentCreated(pb::ShipmentCreated {
                    shipment_id: "s".into(),
                    order_id: "o".into(),
                    carrier: "DHL".into(),
                    tracking_code: "JD1".into(),
                }),
            ),
            envelope(9, 2, tracked(ShipmentStatus::InTransit, "Leipzig")),
            envelope(12, 3, tracked(ShipmentStatus::Delivered, "Berlin")),
        ];
        let s = &MemoryViews::fold(&events).all::<pb::Shipment>()["s"];
        assert_eq!((s.order_id.as_str(), s.carrier.as_str()), ("o", "DHL"));
        assert_eq!(s.status(), ShipmentStatus::Delivered);
        let places: Vec<&str> = s.tracking.iter().map(|t| t.location.as_str()).collect();
        assert_eq!(places, ["Leipzig", "Berlin"]);
        assert_eq!(s.delivered_at, events[2].occurred_at);
        assert_eq!((s.version, s.position), (3, 12));
    }
}
