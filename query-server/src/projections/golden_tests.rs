//! Every event kind folded into the views, with the fields each one must set asserted,
//! after the step that sets them (a later event may hide an earlier one's effect). Also
//! the read-time join, the replay skip, what `Changed` reads, each view's as-of sources,
//! and the order-preserving key encodings. Written against the survivors of a
//! cargo-mutants run over `projections/` (RELIABILITY.md).

use shop_shared::ids::StreamId;
use shop_shared::pb;
use shop_shared::pb::event::Kind;

use super::view::{inverted, ordered_i64};
use super::{apply, envelope, MemoryViews, ReadViews, View};
use crate::store::{Overlay, Store};

fn events() -> Vec<pb::EventEnvelope> {
    let kinds = [
        (
            1,
            Kind::CustomerRegistered(pb::CustomerRegistered {
                customer_id: "c1".into(),
                name: "Ada".into(),
                email: "a@x.io".into(),
                address: "1 Main St".into(),
            }),
        ),
        (
            2,
            Kind::CustomerAddressChanged(pb::CustomerAddressChanged {
                customer_id: "c1".into(),
                address: "2 High St".into(),
            }),
        ),
        (
            1,
            Kind::ProductCreated(pb::ProductCreated {
                sku: "p1".into(),
                name: "Pen".into(),
                price_cents: 100,
                initial_stock: 10,
            }),
        ),
        (
            2,
            Kind::ProductPriceChanged(pb::ProductPriceChanged {
                sku: "p1".into(),
                price_cents: 150,
            }),
        ),
        (
            1,
            Kind::OrderPlaced(pb::OrderPlaced {
                order_id: "o1".into(),
                customer_id: "c1".into(),
                lines: vec![pb::OrderLine {
                    sku: "p1".into(),
                    quantity: 2,
                    unit_price_cents: 150,
                    product_name: "Pen".into(),
                }],
                total_cents: 300,
            }),
        ),
        (
            3,
            Kind::StockReserved(pb::StockReserved {
                sku: "p1".into(),
                order_id: "o1".into(),
                quantity: 2,
            }),
        ),
        (
            2,
            Kind::OrderPaid(pb::OrderPaid {
                order_id: "o1".into(),
                amount_cents: 300,
                payment_ref: "pay-1".into(),
            }),
        ),
        (
            3,
            Kind::OrderShipped(pb::OrderShipped {
                order_id: "o1".into(),
                tracking: "trk-1".into(),
            }),
        ),
        (
            4,
            Kind::StockCommitted(pb::StockCommitted {
                sku: "p1".into(),
                order_id: "o1".into(),
                quantity: 2,
            }),
        ),
        (
            1,
            Kind::ShipmentCreated(pb::ShipmentCreated {
                shipment_id: "s1".into(),
                order_id: "o1".into(),
                carrier: "ACME".into(),
                tracking_code: "T1".into(),
            }),
        ),
        (
            1,
            Kind::OrderPlaced(pb::OrderPlaced {
                order_id: "o2".into(),
                customer_id: "c1".into(),
                lines: vec![pb::OrderLine {
                    sku: "p1".into(),
                    quantity: 1,
                    unit_price_cents: 150,
                    product_name: "Pen".into(),
                }],
                total_cents: 150,
            }),
        ),
        (
            5,
            Kind::StockReserved(pb::StockReserved {
                sku: "p1".into(),
                order_id: "o2".into(),
                quantity: 1,
            }),
        ),
        (
            3,
            Kind::CustomerDeleted(pb::CustomerDeleted {
                customer_id: "c1".into(),
                reason: "asked".into(),
            }),
        ),
    ];
    kinds
        .into_iter()
        .enumerate()
        .map(|(i, (version, kind))| envelope(i as u64 + 1, version, kind))
        .collect()
}

/// The views after the first `n` events.
fn after(n: usize) -> MemoryViews {
    MemoryViews::fold(&events()[..n])
}

#[test]
fn every_event_kind_sets_its_fields() {
    let mut v = after(2);
    let c = v.get::<pb::Customer>("c1").expect("registered");
    assert_eq!((c.name.as_str(), c.email.as_str()), ("Ada", "a@x.io"));
    assert_eq!(c.address, "2 High St");
    assert_eq!((c.version, c.position), (2, 2));

    let mut v = after(4);
    let p = v.get::<pb::Product>("p1").expect("created");
    assert_eq!((p.name.as_str(), p.price_cents), ("Pen", 150));

    let mut v = after(6);
    let p = v.get::<pb::Product>("p1").expect("product");
    assert_eq!((p.on_hand, p.reserved, p.available), (10, 2, 8));
    let o = v.get::<pb::Order>("o1").expect("placed");
    assert_eq!((o.status(), o.total_cents), (pb::OrderStatus::Placed, 300));
    assert_eq!(o.placed_position, 5);
    let c = v.get::<pb::Customer>("c1").expect("customer");
    assert_eq!((c.order_count, c.open_order_count), (1, 1));
    assert_eq!(c.lifetime_spend_cents, 0);

    let mut v = after(7);
    let o = v.get::<pb::Order>("o1").expect("paid");
    assert_eq!(o.status(), pb::OrderStatus::Paid);
    assert_eq!(o.payment_ref, "pay-1");
    assert!(o.paid_at.is_some());
    assert_eq!((o.version, View::position(&o)), (2, 7));
    let c = v.get::<pb::Customer>("c1").expect("customer");
    assert_eq!(c.lifetime_spend_cents, 300, "a paid order counts");
    assert_eq!(c.open_order_count, 1, "a paid order is still open");

    let mut v = after(13);
    let o = v.get::<pb::Order>("o1").expect("shipped");
    assert_eq!(
        (o.status(), o.tracking.as_str()),
        (pb::OrderStatus::Shipped, "trk-1")
    );
    let p = v.get::<pb::Product>("p1").expect("product");
    assert_eq!((p.on_hand, p.reserved, p.available), (8, 1, 7));
    let s = v.get::<pb::Shipment>("s1").expect("shipment");
    assert_eq!((s.order_id.as_str(), s.carrier.as_str()), ("o1", "ACME"));
    let c = v.get::<pb::Customer>("c1").expect("customer");
    assert_eq!(c.status(), pb::CustomerStatus::Deleted);
    assert_eq!((c.order_count, c.open_order_count), (2, 1));
    assert_eq!(c.lifetime_spend_cents, 300);
}

#[test]
fn an_order_is_joined_with_its_customers_name() {
    let mut v = after(13);
    assert_eq!(v.get::<pb::Order>("o1").expect("stored").customer_name, "");
    let joined = v.joined::<pb::Order>("o1").expect("joined");
    assert_eq!(joined.customer_name, "Ada");
    assert_eq!(joined.order_id, "o1");
    assert!(v.joined::<pb::Order>("nope").is_none());
}

#[test]
fn an_event_a_view_holds_is_skipped_and_what_changed_is_readable() {
    let events = events();
    let mut v = after(7);
    let before = v.clone();
    // The payment again (a replay over rows that hold it): nothing changes.
    assert!(apply(&mut v, &events[6]).is_empty());
    assert_eq!(v, before);
    // The shipment: the order changed, readable for watchers.
    let changed = apply(&mut v, &events[7]);
    assert!(format!("{:?}", changed[0]).contains("o1"));
    let update = changed[0].read(&mut v).expect("the order");
    assert_eq!(format!("{update:?}"), "Update(..)");
    let order = update.view::<pb::Order>().expect("an order");
    assert_eq!(order.status(), pb::OrderStatus::Shipped);
    assert_eq!(order.customer_name, "Ada", "watchers get the joined view");
}

#[test]
fn as_of_sources_are_each_views_streams() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path(), 8 << 20).expect("open");
    let mut overlay = Overlay::new(&store);
    let events = events();
    for e in &events {
        apply(&mut overlay, e);
    }
    let last = events.last().expect("events");
    store
        .commit(
            overlay
                .into_rows(last.position, &last.event_id)
                .expect("rows"),
        )
        .expect("commit");
    assert_eq!(
        pb::Order::sources(&store, "o1").expect("sources"),
        [StreamId::order("o1"), StreamId::customer("c1")]
    );
    assert!(pb::Order::sources(&store, "nope")
        .expect("sources")
        .is_empty());
    assert_eq!(
        pb::Customer::sources(&store, "c1").expect("sources"),
        [
            StreamId::customer("c1"),
            StreamId::order("o2"),
            StreamId::order("o1")
        ]
    );
    assert_eq!(
        pb::Product::sources(&store, "p1").expect("sources"),
        [StreamId::product("p1")]
    );
    assert_eq!(
        pb::Shipment::sources(&store, "s1").expect("sources"),
        [StreamId::shipment("s1")]
    );
}

#[test]
fn key_encodings_keep_order() {
    let numbers = [i64::MIN, -1_000_000, -1, 0, 1, 42, 1 << 40, i64::MAX];
    for pair in numbers.windows(2) {
        assert!(
            ordered_i64(pair[0]) < ordered_i64(pair[1]),
            "{} < {}",
            pair[0],
            pair[1]
        );
    }
    let positions = [0u64, 1, 2, 1_000, u64::MAX / 2, u64::MAX];
    for pair in positions.windows(2) {
        assert!(
            inverted(pair[0]) > inverted(pair[1]),
            "newest first: {} before {}",
            pair[1],
            pair[0]
        );
    }
    assert_eq!(inverted(0), u64::MAX.to_be_bytes());
}

/// A creation event names the view it created: watchers of that id get it (the row is
/// stored under the view's own id either way, so only the change key shows it).
#[test]
fn a_creation_event_changes_the_view_it_creates() {
    let events = events();
    let mut v = MemoryViews::default();
    let mut keys = Vec::new();
    for e in &events {
        keys.extend(apply(&mut v, e).into_iter().map(|c| c.key.id));
    }
    // Registered, address, product, price, placed (+ customer), reserved, paid
    // (+ customer), shipped (+ customer), committed, shipment, placed (+ customer),
    // reserved, deleted.
    assert_eq!(
        keys,
        [
            "c1", "c1", "p1", "p1", "o1", "c1", "p1", "o1", "c1", "o1", "c1", "p1", "s1", "o2",
            "c1", "p1", "c1"
        ]
    );
}
