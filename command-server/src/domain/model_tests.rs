//! Properties of the domain over arbitrary command sequences: whatever clients send, and
//! whether `decide` accepts or refuses it, the domain's invariants
//! hold: stock never below zero and reserved = what open orders hold, status moves only
//! along its edges, an email held by one live customer, indexes equal to the states.

use std::collections::{HashMap, HashSet};

use proptest::prelude::*;
use shop_shared::pb::{OrderStatus, ShipmentStatus};

use super::testing::Memory;
use super::{
    email_key, order, shipment, Command, LineRequest, EMAILS, OPEN_ORDERS, SHIPMENTS_BY_ORDER,
};

/// Small id universes so that commands collide on the same aggregates often.
fn customer_id() -> impl Strategy<Value = String> {
    (0..4u8).prop_map(|i| format!("c{i}"))
}

fn sku() -> impl Strategy<Value = String> {
    (0..4u8).prop_map(|i| format!("p{i}"))
}

fn order_id() -> impl Strategy<Value = String> {
    (0..6u8).prop_map(|i| format!("o{i}"))
}

fn shipment_id() -> impl Strategy<Value = String> {
    (0..4u8).prop_map(|i| format!("s{i}"))
}

fn email() -> impl Strategy<Value = String> {
    (0..3u8, any::<bool>()).prop_map(|(i, upper)| {
        let e = format!("user{i}@example.com");
        if upper {
            e.to_uppercase()
        } else {
            e
        }
    })
}

fn command() -> impl Strategy<Value = Command> {
    prop_oneof![
        (customer_id(), email()).prop_map(|(customer_id, email)| Command::RegisterCustomer {
            customer_id,
            name: "N".into(),
            email,
            address: String::new(),
        }),
        customer_id().prop_map(|customer_id| Command::RenameCustomer {
            customer_id,
            name: "M".into()
        }),
        customer_id().prop_map(|customer_id| Command::DeleteCustomer {
            customer_id,
            reason: String::new()
        }),
        (sku(), 0..500i64, 0..20i64).prop_map(|(sku, price_cents, initial_stock)| {
            Command::CreateProduct {
                sku,
                name: "P".into(),
                price_cents,
                initial_stock,
            }
        }),
        (sku(), 1..10i64).prop_map(|(sku, quantity)| Command::RestockProduct { sku, quantity }),
        (sku(), 0..500i64)
            .prop_map(|(sku, price_cents)| Command::ChangeProductPrice { sku, price_cents }),
        (
            order_id(),
            customer_id(),
            proptest::collection::vec((sku(), 1..8i64), 1..4)
        )
            .prop_map(|(order_id, customer_id, lines)| Command::PlaceOrder {
                order_id,
                customer_id,
                lines: lines
                    .into_iter()
                    .map(|(sku, quantity)| LineRequest { sku, quantity })
                    .collect(),
            }),
        (order_id(), 0..3000i64, any::<bool>()).prop_map(|(order_id, amount, exact)| {
            Command::PayOrder {
                // `exact` asks the test to pay the real total (filled in below).
                order_id,
                amount_cents: if exact { -1 } else { amount },
                payment_ref: "r".into(),
            }
        }),
        order_id().prop_map(|order_id| Command::ShipOrder {
            order_id,
            tracking: String::new()
        }),
        order_id().prop_map(|order_id| Command::CancelOrder {
            order_id,
            reason: "x".into()
        }),
        (shipment_id(), order_id()).prop_map(|(shipment_id, order_id)| Command::CreateShipment {
            shipment_id,
            order_id,
            carrier: "C".into(),
            tracking_code: "T".into(),
        }),
        (shipment_id(), 0..shipment::SCANNED.len()).prop_map(|(shipment_id, i)| {
            Command::RecordShipmentEvent {
                shipment_id,
                status: shipment::SCANNED[i],
                location: String::new(),
                note: String::new(),
            }
        }),
    ]
}

/// Allowed status moves: PLACED → PAID → SHIPPED, PLACED/PAID → CANCELLED.
fn allowed(from: Option<OrderStatus>, to: OrderStatus) -> bool {
    use OrderStatus::*;
    matches!(
        (from, to),
        (None, Placed)
            | (Some(Placed), Placed)
            | (Some(Placed), Paid)
            | (Some(Paid), Paid)
            | (Some(Paid), Shipped)
            | (Some(Shipped), Shipped)
            | (Some(Cancelled), Cancelled)
            | (Some(Placed), Cancelled)
            | (Some(Paid), Cancelled)
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn invariants_hold_for_any_command_sequence(commands in proptest::collection::vec(command(), 1..80)) {
        let mut m = Memory::default();
        for mut cmd in commands {
            // Make some payments exact so that orders progress past PAID.
            if let Command::PayOrder { order_id, amount_cents, .. } = &mut cmd {
                if *amount_cents == -1 {
                    *amount_cents = m.orders().get(order_id.as_str()).map_or(0, |o| o.total_cents);
                }
            }
            let before: HashMap<String, OrderStatus> =
                m.orders().iter().map(|(k, o)| (k.to_string(), o.status())).collect();
            let delivered_before: HashMap<String, u64> = m
                .shipments()
                .iter()
                .filter(|(_, s)| s.status() == ShipmentStatus::Delivered)
                .map(|(k, s)| (k.to_string(), s.version))
                .collect();
            let snapshot = m.clone();
            let result = m.when(cmd);
            if result.is_err() {
                // A refused command changes nothing.
                prop_assert_eq!(&m.products(), &snapshot.products());
                prop_assert_eq!(&m.orders(), &snapshot.orders());
                prop_assert_eq!(&m.customers(), &snapshot.customers());
                prop_assert_eq!(&m.shipments(), &snapshot.shipments());
                prop_assert_eq!(&m.indexes, &snapshot.indexes);
            }

            // 0 <= reserved <= on_hand for every product.
            for (sku, p) in &m.products() {
                prop_assert!(0 <= p.reserved && p.reserved <= p.on_hand, "{sku}: {p:?}");
            }
            // Reserved stock equals what open orders hold.
            let mut held: HashMap<&str, i64> = HashMap::new();
            for o in m.orders().values().filter(|o| o.is_open()) {
                for l in &o.lines {
                    *held.entry(l.sku.as_str()).or_default() += l.quantity;
                }
            }
            for (sku, p) in &m.products() {
                prop_assert_eq!(p.reserved, held.get(*sku).copied().unwrap_or(0));
            }
            // Status moves only along the allowed edges.
            for (id, o) in &m.orders() {
                prop_assert!(allowed(before.get(*id).copied(), o.status()),
                    "{id}: {:?} -> {:?}", before.get(*id), o.status());
            }
            // An email is held by at most one live customer.
            let mut emails = HashSet::new();
            for c in m.customers().values().filter(|c| !c.deleted) {
                prop_assert!(emails.insert(email_key(&c.email)), "duplicate email {}", c.email);
            }
            // The indexes are exactly what the states say: each live customer's email,
            // each open order.
            let mut expected = HashSet::new();
            for (id, c) in m.customers().iter().filter(|(_, c)| !c.deleted) {
                expected.insert((EMAILS, email_key(&c.email).into_bytes(), id.as_bytes().to_vec()));
            }
            for (id, o) in m.orders().iter().filter(|(_, o)| o.is_open()) {
                let mut key = order::open_orders_prefix(&o.customer_id);
                key.extend_from_slice(id.as_bytes());
                expected.insert((OPEN_ORDERS, key, Vec::new()));
            }
            for (id, s) in m.shipments().iter() {
                expected.insert((SHIPMENTS_BY_ORDER, s.order_id.as_bytes().to_vec(), id.as_bytes().to_vec()));
                // Shipments exist only for shipped orders, and a delivered one never moves.
                prop_assert_eq!(m.orders().get(s.order_id.as_str()).map(|o| o.status()), Some(OrderStatus::Shipped));
                if let Some(version) = delivered_before.get(*id) {
                    prop_assert_eq!(s.version, *version);
                }
            }
            let actual: HashSet<_> = m.indexes.iter().map(|((i, k), v)| (*i, k.clone(), v.clone())).collect();
            prop_assert_eq!(actual, expected);
        }
    }
}
