//! The Shipment aggregate: a parcel for a shipped order, handed to a carrier, then its
//! carrier's scans until it is delivered. One shipment per order (the
//! [`SHIPMENTS_BY_ORDER`] index); a delivered shipment takes no further event.

use shop_shared::pb;
use shop_shared::pb::{OrderStatus, ShipmentStatus};

use super::{order, Command, DomainError, Event, State, SHIPMENTS_BY_ORDER};
use crate::log::IndexChange;

/// Scans one shipment keeps at most (its view lists them all).
pub const TRACKING_EVENTS_MAX: u32 = 200;

/// The statuses a scan may report.
pub const SCANNED: [ShipmentStatus; 4] = [
    ShipmentStatus::InTransit,
    ShipmentStatus::OutForDelivery,
    ShipmentStatus::Delivered,
    ShipmentStatus::Exception,
];

/// Current state of one shipment.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Shipment {
    /// Stream version: the number of events folded in.
    #[prost(uint64, tag = "1")]
    pub version: u64,
    #[prost(string, tag = "2")]
    pub order_id: String,
    #[prost(enumeration = "ShipmentStatus", tag = "3")]
    pub status: i32,
    /// Scans recorded.
    #[prost(uint32, tag = "4")]
    pub scans: u32,
}

/// Shipment commands.
pub(super) fn decide(command: &Command, state: &impl State) -> Result<Vec<Event>, DomainError> {
    match command {
        Command::CreateShipment {
            shipment_id,
            order_id,
            carrier,
            tracking_code,
        } => {
            if state.shipment(shipment_id).is_some() {
                return Err(DomainError::ShipmentExists(shipment_id.clone()));
            }
            let order = state
                .order(order_id)
                .ok_or_else(|| DomainError::OrderNotFound(order_id.clone()))?;
            if order.status() != OrderStatus::Shipped {
                return Err(DomainError::InvalidOrderState {
                    order_id: order_id.clone(),
                    status: order::status_name(order.status()),
                    action: "create a shipment for it",
                });
            }
            if let Some(existing) = state.index(SHIPMENTS_BY_ORDER, order_id.as_bytes()) {
                return Err(DomainError::OrderHasShipment {
                    order_id: order_id.clone(),
                    shipment_id: String::from_utf8_lossy(existing).into_owned(),
                });
            }
            Ok(vec![Event::ShipmentCreated(pb::ShipmentCreated {
                shipment_id: shipment_id.clone(),
                order_id: order_id.clone(),
                carrier: carrier.trim().to_string(),
                tracking_code: tracking_code.trim().to_string(),
            })])
        }
        Command::RecordShipmentEvent {
            shipment_id,
            status,
            location,
            note,
        } => {
            let shipment = state
                .shipment(shipment_id)
                .ok_or_else(|| DomainError::ShipmentNotFound(shipment_id.clone()))?;
            if shipment.status() == ShipmentStatus::Delivered {
                return Err(DomainError::ShipmentDelivered(shipment_id.clone()));
            }
            if shipment.scans >= TRACKING_EVENTS_MAX {
                return Err(DomainError::TrackingLimit(shipment_id.clone()));
            }
            Ok(vec![Event::ShipmentTracked(pb::ShipmentTracked {
                shipment_id: shipment_id.clone(),
                status: *status as i32,
                location: location.trim().to_string(),
                note: note.trim().to_string(),
            })])
        }
        other => unreachable!("not a shipment command: {}", other.name()),
    }
}

/// Folds one shipment event into the state. Events of other aggregates leave it as is.
pub fn evolve(state: Option<Shipment>, event: &Event) -> Shipment {
    let mut s = state.unwrap_or_default();
    match event {
        Event::ShipmentCreated(e) => {
            s.order_id.clone_from(&e.order_id);
            s.set_status(ShipmentStatus::Created);
        }
        Event::ShipmentTracked(e) => {
            s.status = e.status;
            s.scans += 1;
        }
        _ => return s,
    }
    s.version += 1;
    s
}

/// The order → shipment index entry, set when the shipment is created (never removed:
/// an order keeps its shipment).
pub(super) fn index_changes(
    shipment_id: &str,
    before: Option<&Shipment>,
    after: &Shipment,
) -> Vec<IndexChange> {
    if before.is_some() || after.order_id.is_empty() {
        return Vec::new();
    }
    vec![IndexChange::put(
        SHIPMENTS_BY_ORDER,
        after.order_id.as_bytes().to_vec(),
        shipment_id.as_bytes().to_vec(),
    )]
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;

    /// Customer c1, product a, order o1 for one unit, paid and shipped.
    fn shipped() -> Memory {
        let mut m = Memory::default();
        m.when(register("c1", "a@x.io")).unwrap();
        m.when(create_product("a", 100, 5)).unwrap();
        m.when(place("o1", "c1", &[("a", 1)])).unwrap();
        m.when(Command::PayOrder {
            order_id: "o1".into(),
            amount_cents: 100,
            payment_ref: "r".into(),
        })
        .unwrap();
        m.when(Command::ShipOrder {
            order_id: "o1".into(),
            tracking: String::new(),
        })
        .unwrap();
        m
    }

    fn create(shipment_id: &str, order_id: &str) -> Command {
        Command::CreateShipment {
            shipment_id: shipment_id.into(),
            order_id: order_id.into(),
            carrier: " DHL ".into(),
            tracking_code: "JD0001".into(),
        }
    }

    fn scan(shipment_id: &str, status: ShipmentStatus) -> Command {
        Command::RecordShipmentEvent {
            shipment_id: shipment_id.into(),
            status,
            location: "Leipzig".into(),
            note: String::new(),
        }
    }

    #[test]
    fn a_shipped_order_gets_one_shipment() {
        let mut m = shipped();
        let events = m.when(create("s1", "o1")).unwrap();
        assert!(matches!(&events[..], [Event::ShipmentCreated(e)] if e.carrier == "DHL"));
        assert_eq!(
            m.when(create("s2", "o1")),
            Err(DomainError::OrderHasShipment {
                order_id: "o1".into(),
                shipment_id: "s1".into()
            })
        );
        assert_eq!(
            m.when(create("s1", "o1")),
            Err(DomainError::ShipmentExists("s1".into()))
        );
    }

    #[test]
    fn only_a_shipped_order_and_only_an_existing_one() {
        let mut m = shipped();
        assert_eq!(
            m.when(create("s1", "nope")),
            Err(DomainError::OrderNotFound("nope".into()))
        );
        m.when(place("o2", "c1", &[("a", 1)])).unwrap();
        assert!(matches!(
            m.when(create("s2", "o2")),
            Err(DomainError::InvalidOrderState {
                status: "PLACED",
                ..
            })
        ));
    }

    #[test]
    fn scans_until_delivered_then_nothing() {
        let mut m = shipped();
        m.when(create("s1", "o1")).unwrap();
        assert_eq!(
            m.when(scan("s9", ShipmentStatus::InTransit)),
            Err(DomainError::ShipmentNotFound("s9".into()))
        );
        for status in [
            ShipmentStatus::InTransit,
            ShipmentStatus::Exception,
            ShipmentStatus::OutForDelivery,
            ShipmentStatus::Delivered,
        ] {
            m.when(scan("s1", status)).unwrap();
        }
        assert_eq!(
            m.when(scan("s1", ShipmentStatus::InTransit)),
            Err(DomainError::ShipmentDelivered("s1".into()))
        );
        let s = m.shipment("s1").unwrap();
        assert_eq!(
            (s.version, s.scans, s.status()),
            (5, 4, ShipmentStatus::Delivered)
        );
        assert_eq!(m.shipments().len(), 1);
        // Only the creation sets the order's index entry; scans write none.
        let before = s.clone();
        let mut after = before.clone();
        after.version += 1;
        assert!(index_changes("s1", Some(&before), &after).is_empty());
    }

    #[test]
    fn scans_are_bounded() {
        let mut m = shipped();
        m.when(create("s1", "o1")).unwrap();
        for _ in 0..TRACKING_EVENTS_MAX {
            m.when(scan("s1", ShipmentStatus::InTransit)).unwrap();
        }
        assert_eq!(
            m.when(scan("s1", ShipmentStatus::InTransit)),
            Err(DomainError::TrackingLimit("s1".into()))
        );
    }

    #[test]
    fn creating_and_scanning_validate_their_fields() {
        let err = Command::CreateShipment {
            shipment_id: "bad id".into(),
            order_id: "o1".into(),
            carrier: " ".into(),
            tracking_code: String::new(),
        }
        .validate()
        .unwrap_err();
        assert_eq!(
            field_names(&err),
            ["shipment_id", "carrier", "tracking_code"]
        );
        for status in [ShipmentStatus::Unspecified, ShipmentStatus::Created] {
            let err = scan("s1", status).validate().unwrap_err();
            assert_eq!(field_names(&err), ["status"]);
        }
    }
}
