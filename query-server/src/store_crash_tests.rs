//! A crash at every point of what the consumer writes. The store writes a batch's rows
//! one insert at a time and sled recovers a prefix of its inserts (see `store.rs`, No
//! sled batches), so what a crash can leave is exactly a prefix of the rows of the
//! batches written so far. These tests write every such prefix into a fresh store,
//! finish the partly written batch as `Store::open` does, check that the store is then
//! exactly the fold of the events up to its checkpoint, replay the events after it in
//! batches of another size, as the consumer does after a restart, and check that the
//! result equals an independent fold of every event: each event's effect exactly once,
//! index entries matching the rows, history without duplicates.

use std::collections::{BTreeMap, HashMap};

use prost::Message;
use shop_shared::events::stream_of;
use shop_shared::ids::StreamId;
use shop_shared::pb;
use shop_shared::pb::event::Kind;

use crate::projections::{apply, envelope, MemoryViews, View};
use crate::store::{Overlay, Rows, Store};

fn events() -> Vec<pb::EventEnvelope> {
    let customer = |id: &str, name: &str| {
        Kind::CustomerRegistered(pb::CustomerRegistered {
            customer_id: id.into(),
            name: name.into(),
            email: format!("{id}@shop.test"),
            address: String::new(),
        })
    };
    let product = |sku: &str| {
        Kind::ProductCreated(pb::ProductCreated {
            sku: sku.into(),
            name: format!("Product {sku}"),
            price_cents: 100,
            initial_stock: 50,
        })
    };
    let placed = |order: &str, customer: &str, sku: &str| {
        Kind::OrderPlaced(pb::OrderPlaced {
            order_id: order.into(),
            customer_id: customer.into(),
            lines: vec![pb::OrderLine {
                sku: sku.into(),
                quantity: 2,
                unit_price_cents: 100,
                product_name: format!("Product {sku}"),
            }],
            total_cents: 200,
        })
    };
    let reserved = |sku: &str, order: &str| {
        Kind::StockReserved(pb::StockReserved {
            sku: sku.into(),
            order_id: order.into(),
            quantity: 2,
        })
    };
    let paid = |order: &str| {
        Kind::OrderPaid(pb::OrderPaid {
            order_id: order.into(),
            amount_cents: 200,
            payment_ref: "pay".into(),
        })
    };
    let kinds = vec![
        customer("c1", "Ada"),
        customer("c2", "Bea"),
        product("p1"),
        product("p2"),
        placed("o1", "c1", "p1"),
        reserved("p1", "o1"),
        placed("o2", "c1", "p2"),
        reserved("p2", "o2"),
        paid("o1"),
        Kind::CustomerRenamed(pb::CustomerRenamed {
            customer_id: "c1".into(),
            name: "Ada Lovelace".into(),
        }),
        Kind::OrderShipped(pb::OrderShipped {
            order_id: "o1".into(),
            tracking: "t1".into(),
        }),
        Kind::StockCommitted(pb::StockCommitted {
            sku: "p1".into(),
            order_id: "o1".into(),
            quantity: 2,
        }),
        Kind::ShipmentCreated(pb::ShipmentCreated {
            shipment_id: "s1".into(),
            order_id: "o1".into(),
            carrier: "ACME".into(),
            tracking_code: "T1".into(),
        }),
        Kind::OrderCancelled(pb::OrderCancelled {
            order_id: "o2".into(),
            reason: "changed mind".into(),
        }),
        Kind::StockReleased(pb::StockReleased {
            sku: "p2".into(),
            order_id: "o2".into(),
            quantity: 2,
        }),
        placed("o3", "c2", "p1"),
        reserved("p1", "o3"),
        Kind::ShipmentTracked(pb::ShipmentTracked {
            shipment_id: "s1".into(),
            status: pb::ShipmentStatus::InTransit as i32,
            location: "Depot".into(),
            note: String::new(),
        }),
        paid("o3"),
        Kind::CustomerDeleted(pb::CustomerDeleted {
            customer_id: "c2".into(),
            reason: "asked".into(),
        }),
        Kind::ProductRestocked(pb::ProductRestocked {
            sku: "p2".into(),
            quantity: 5,
        }),
    ];
    let mut versions: HashMap<StreamId, u64> = HashMap::new();
    kinds
        .into_iter()
        .enumerate()
        .map(|(i, kind)| {
            let version = versions.entry(stream_of(&kind)).or_default();
            *version += 1;
            envelope(i as u64 + 1, *version, kind)
        })
        .collect()
}

/// Applies `events` in batches of `size` as the consumer does; the rows of each batch,
/// written to `store` as they are built.
fn apply_in_batches(store: &Store, events: &[pb::EventEnvelope], size: usize) -> Rows {
    let mut all = Rows::default();
    for batch in events.chunks(size) {
        let mut overlay = Overlay::new(store);
        for e in batch {
            apply(&mut overlay, e);
            overlay.add_event(&e.stream_id, e.stream_version, &e.encode_to_vec());
        }
        let last = batch.last().expect("a batch has events");
        let rows = overlay
            .into_rows(last.position, &last.event_id)
            .expect("rows");
        store.commit(rows.clone()).expect("commit");
        all.extend(rows);
    }
    all
}

/// Every row of a view kind, decoded, by id.
fn rows<V: View>(store: &Store) -> BTreeMap<String, V> {
    store
        .raw_scan(&Store::rows_prefix::<V>())
        .into_iter()
        .map(|(_, value)| {
            let view = Store::decode_row::<V>(&value).expect("row");
            (view.id().to_string(), view)
        })
        .collect()
}

/// The index entries the rows of a view kind must have.
fn index_of<V: View>(views: &BTreeMap<String, V>) -> Vec<(Vec<u8>, Vec<u8>)> {
    views.values().flat_map(View::index_keys).collect()
}

#[test]
fn every_prefix_of_the_written_rows_replays_to_each_event_once() {
    let events = events();
    let dir = tempfile::tempdir().expect("tempdir");
    let all = apply_in_batches(&Store::open(dir.path(), 8 << 20).expect("open"), &events, 4);
    assert!(all.len() > 40, "rows: {}", all.len());
    for cut in 0..=all.len() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), 8 << 20).expect("open");
        let mut prefix = all.clone();
        prefix.truncate(cut);
        store.commit(prefix).expect("write");
        // What `Store::open` does on the store a crash left.
        store.finish_pending().expect("finish");
        let (checkpoint, _) = store.checkpoint().expect("checkpoint");
        let at_checkpoint = &events[..checkpoint as usize];
        check(
            &store,
            at_checkpoint,
            &format!("cut {cut}, at checkpoint {checkpoint}"),
        );
        // The restart: the events after the checkpoint, in batches of another size.
        apply_in_batches(&store, &events[checkpoint as usize..], 3);
        check(&store, &events, &format!("cut {cut}, caught up"));
    }
}

/// The store equals the fold of `events`, and its checkpoint is the last of them.
fn check(store: &Store, events: &[pb::EventEnvelope], at: &str) {
    let reference = MemoryViews::fold(events);
    let checkpoint = events.last().map(|e| (e.position, e.event_id.clone()));
    assert_eq!(
        store.checkpoint().expect("checkpoint"),
        checkpoint.unwrap_or_default(),
        "{at}"
    );
    let customers = rows::<pb::Customer>(store);
    let products = rows::<pb::Product>(store);
    let orders = rows::<pb::Order>(store);
    let shipments = rows::<pb::Shipment>(store);
    assert_eq!(
        customers,
        reference.all::<pb::Customer>(),
        "{at}: customers"
    );
    assert_eq!(products, reference.all::<pb::Product>(), "{at}: products");
    assert_eq!(orders, reference.all::<pb::Order>(), "{at}: orders");
    assert_eq!(
        shipments,
        reference.all::<pb::Shipment>(),
        "{at}: shipments"
    );
    let mut expected: Vec<(Vec<u8>, Vec<u8>)> = index_of(&customers);
    expected.extend(index_of(&products));
    expected.extend(index_of(&orders));
    expected.extend(index_of(&shipments));
    expected.sort();
    assert_eq!(store.raw_scan(b"x"), expected, "{at}: index entries");
    let mut streams: Vec<&str> = events.iter().map(|e| e.stream_id.as_str()).collect();
    streams.sort_unstable();
    streams.dedup();
    for stream in streams {
        let id = StreamId::parse(stream).expect("stream id");
        let history: Vec<u64> = store
            .history(&id, 1, 1000)
            .expect("history")
            .iter()
            .map(|e| e.position)
            .collect();
        let want: Vec<u64> = events
            .iter()
            .filter(|e| e.stream_id == stream)
            .map(|e| e.position)
            .collect();
        assert_eq!(history, want, "{at}: history of {stream}");
    }
}
