//! A reference model of the query views, written independently of the query server's
//! projections: it folds the command server's log (the accepted events) into the views
//! `proto/shop/v1/queries.proto` describes, and fetches everything the query server holds for comparison.

use std::collections::BTreeMap;

use crate::pb;
use tonic::transport::Channel;

use pb::event::Kind;
use pb::query_service_client::QueryServiceClient;

#[derive(Debug, Default, Clone, PartialEq)]
pub struct Views {
    pub customers: BTreeMap<String, pb::Customer>,
    pub products: BTreeMap<String, pb::Product>,
    pub orders: BTreeMap<String, pb::Order>,
    pub shipments: BTreeMap<String, pb::Shipment>,
}

impl Views {
    /// The views after `events` (in log order).
    pub fn fold(events: &[pb::EventEnvelope]) -> Views {
        let mut v = Views::default();
        for e in events {
            v.apply(e);
        }
        v
    }

    fn apply(&mut self, e: &pb::EventEnvelope) {
        let Some(kind) = e.event.as_ref().and_then(|x| x.kind.as_ref()) else {
            return;
        };
        let at = e.occurred_at;
        match kind {
            Kind::CustomerRegistered(x) => {
                self.customers.insert(
                    x.customer_id.clone(),
                    pb::Customer {
                        customer_id: x.customer_id.clone(),
                        name: x.name.clone(),
                        email: x.email.clone(),
                        address: x.address.clone(),
                        status: pb::CustomerStatus::Active as i32,
                        version: e.stream_version,
                        updated_at: at,
                        position: e.position,
                        registered_at: at,
                        ..Default::default()
                    },
                );
            }
            Kind::CustomerRenamed(x) => {
                self.customer_event(&x.customer_id, e, |c| c.name.clone_from(&x.name))
            }
            Kind::CustomerAddressChanged(x) => {
                self.customer_event(&x.customer_id, e, |c| c.address.clone_from(&x.address))
            }
            Kind::CustomerDeleted(x) => self.customer_event(&x.customer_id, e, |c| {
                c.status = pb::CustomerStatus::Deleted as i32
            }),
            Kind::ProductCreated(x) => {
                self.products.insert(
                    x.sku.clone(),
                    pb::Product {
                        sku: x.sku.clone(),
                        name: x.name.clone(),
                        price_cents: x.price_cents,
                        on_hand: x.initial_stock,
                        reserved: 0,
                        available: x.initial_stock,
                        version: e.stream_version,
                        updated_at: at,
                        position: e.position,
                    },
                );
            }
            Kind::ProductRestocked(x) => self.product_event(&x.sku, e, |p| p.on_hand += x.quantity),
            Kind::ProductPriceChanged(x) => {
                self.product_event(&x.sku, e, |p| p.price_cents = x.price_cents)
            }
            Kind::StockReserved(x) => self.product_event(&x.sku, e, |p| p.reserved += x.quantity),
            Kind::StockReleased(x) => self.product_event(&x.sku, e, |p| p.reserved -= x.quantity),
            Kind::StockCommitted(x) => self.product_event(&x.sku, e, |p| {
                p.reserved -= x.quantity;
                p.on_hand -= x.quantity;
            }),
            Kind::OrderPlaced(x) => {
                let order = pb::Order {
                    order_id: x.order_id.clone(),
                    customer_id: x.customer_id.clone(),
                    lines: x
                        .lines
                        .iter()
                        .map(|l| pb::OrderLineView {
                            sku: l.sku.clone(),
                            product_name: l.product_name.clone(),
                            quantity: l.quantity,
                            unit_price_cents: l.unit_price_cents,
                        })
                        .collect(),
                    total_cents: x.total_cents,
                    status: pb::OrderStatus::Placed as i32,
                    placed_at: at,
                    version: e.stream_version,
                    position: e.position,
                    placed_position: e.position,
                    ..Default::default()
                };
                self.orders.insert(x.order_id.clone(), order);
                self.customer_counters(&x.customer_id, e, |c| {
                    c.order_count += 1;
                    c.open_order_count += 1;
                });
            }
            Kind::OrderPaid(x) => {
                let total = self.order_event(&x.order_id, e, |o| {
                    o.status = pb::OrderStatus::Paid as i32;
                    o.paid_at = at;
                    o.payment_ref.clone_from(&x.payment_ref);
                });
                if let Some((customer, total, _)) = total {
                    self.customer_counters(&customer, e, |c| c.lifetime_spend_cents += total);
                }
            }
            Kind::OrderShipped(x) => {
                let total = self.order_event(&x.order_id, e, |o| {
                    o.status = pb::OrderStatus::Shipped as i32;
                    o.shipped_at = at;
                    o.tracking.clone_from(&x.tracking);
                });
                if let Some((customer, _, _)) = total {
                    self.customer_counters(&customer, e, |c| c.open_order_count -= 1);
                }
            }
            Kind::OrderCancelled(x) => {
                let total = self.order_event(&x.order_id, e, |o| {
                    o.status = pb::OrderStatus::Cancelled as i32;
                    o.cancelled_at = at;
                    o.cancel_reason.clone_from(&x.reason);
                });
                if let Some((customer, total, was)) = total {
                    self.customer_counters(&customer, e, |c| {
                        c.open_order_count -= 1;
                        if was == pb::OrderStatus::Paid as i32 {
                            c.lifetime_spend_cents -= total;
                        }
                    });
                }
            }
            Kind::ShipmentCreated(x) => {
                let shipment = pb::Shipment {
                    shipment_id: x.shipment_id.clone(),
                    order_id: x.order_id.clone(),
                    carrier: x.carrier.clone(),
                    tracking_code: x.tracking_code.clone(),
                    status: pb::ShipmentStatus::Created as i32,
                    created_at: at,
                    version: e.stream_version,
                    position: e.position,
                    ..Default::default()
                };
                self.shipments.insert(x.shipment_id.clone(), shipment);
            }
            Kind::ShipmentTracked(x) => {
                let s = self
                    .shipments
                    .get_mut(&x.shipment_id)
                    .expect("event on an unknown shipment");
                s.status = x.status;
                if x.status == pb::ShipmentStatus::Delivered as i32 {
                    s.delivered_at = at;
                }
                s.tracking.push(pb::TrackingEntry {
                    status: x.status,
                    location: x.location.clone(),
                    note: x.note.clone(),
                    at,
                });
                s.version = e.stream_version;
                s.position = e.position;
            }
        }
    }

    fn customer_event(
        &mut self,
        id: &str,
        e: &pb::EventEnvelope,
        f: impl FnOnce(&mut pb::Customer),
    ) {
        let c = self
            .customers
            .get_mut(id)
            .expect("event on an unknown customer");
        f(c);
        c.version = e.stream_version;
        c.updated_at = e.occurred_at;
        c.position = e.position;
    }

    fn customer_counters(
        &mut self,
        id: &str,
        e: &pb::EventEnvelope,
        f: impl FnOnce(&mut pb::Customer),
    ) {
        let c = self
            .customers
            .get_mut(id)
            .expect("order of an unknown customer");
        f(c);
        c.updated_at = e.occurred_at;
        c.position = e.position;
    }

    fn product_event(
        &mut self,
        sku: &str,
        e: &pb::EventEnvelope,
        f: impl FnOnce(&mut pb::Product),
    ) {
        let p = self
            .products
            .get_mut(sku)
            .expect("event on an unknown product");
        f(p);
        p.available = p.on_hand - p.reserved;
        p.version = e.stream_version;
        p.updated_at = e.occurred_at;
        p.position = e.position;
    }

    /// Applies an order event; returns (customer, total, status before).
    fn order_event(
        &mut self,
        id: &str,
        e: &pb::EventEnvelope,
        f: impl FnOnce(&mut pb::Order),
    ) -> Option<(String, i64, i32)> {
        let o = self.orders.get_mut(id)?;
        let before = o.status;
        f(o);
        o.version = e.stream_version;
        o.position = e.position;
        Some((o.customer_id.clone(), o.total_cents, before))
    }

    /// Orders with the customer names of these views joined in.
    pub fn orders_with_names(&self) -> BTreeMap<String, pb::Order> {
        self.orders
            .iter()
            .map(|(id, o)| {
                let mut o = o.clone();
                o.customer_name = self
                    .customers
                    .get(&o.customer_id)
                    .map(|c| c.name.clone())
                    .unwrap_or_default();
                (id.clone(), o)
            })
            .collect()
    }
}

/// Everything the query server holds, read through its list APIs (all pages).
pub async fn fetch_all(q: &mut QueryServiceClient<Channel>, min_position: u64) -> Views {
    let mut v = Views::default();
    let mut token = String::new();
    loop {
        let page = q
            .list_customers(pb::ListCustomersRequest {
                page_size: 500,
                page_token: token.clone(),
                include_deleted: true,
                min_position,
                ..Default::default()
            })
            .await
            .expect("list customers")
            .into_inner();
        for c in page.customers {
            assert!(
                v.customers.insert(c.customer_id.clone(), c).is_none(),
                "customer listed twice"
            );
        }
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    loop {
        let page = q
            .list_products(pb::ListProductsRequest {
                page_size: 500,
                page_token: token.clone(),
                min_position,
                ..Default::default()
            })
            .await
            .expect("list products")
            .into_inner();
        for p in page.products {
            assert!(
                v.products.insert(p.sku.clone(), p).is_none(),
                "product listed twice"
            );
        }
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    loop {
        let page = q
            .list_orders(pb::ListOrdersRequest {
                page_size: 500,
                page_token: token.clone(),
                min_position,
                ..Default::default()
            })
            .await
            .expect("list orders")
            .into_inner();
        for o in page.orders {
            assert!(
                v.orders.insert(o.order_id.clone(), o).is_none(),
                "order listed twice"
            );
        }
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    v
}

/// Asserts the query server's views equal the model (lists and names included).
pub fn assert_views_equal(actual: &Views, expected: &Views, context: &str) {
    assert_eq!(
        actual.customers.len(),
        expected.customers.len(),
        "{context}: customer count"
    );
    for (id, c) in &expected.customers {
        assert_eq!(
            actual.customers.get(id),
            Some(c),
            "{context}: customer {id}"
        );
    }
    assert_eq!(actual.products, expected.products, "{context}: products");
    let orders = expected.orders_with_names();
    assert_eq!(actual.orders.len(), orders.len(), "{context}: order count");
    for (id, o) in &orders {
        assert_eq!(actual.orders.get(id), Some(o), "{context}: order {id}");
    }
    assert_eq!(actual.shipments, expected.shipments, "{context}: shipments");
}

/// The query server's shipments with these ids (there is no list of shipments).
pub async fn fetch_shipments(
    q: &mut QueryServiceClient<Channel>,
    ids: impl IntoIterator<Item = &String>,
    min_position: u64,
) -> BTreeMap<String, pb::Shipment> {
    let mut out = BTreeMap::new();
    for id in ids {
        let shipment = q
            .get_shipment(pb::GetShipmentRequest {
                shipment_id: id.clone(),
                min_position,
                ..Default::default()
            })
            .await
            .expect("get shipment")
            .into_inner();
        out.insert(id.clone(), shipment);
    }
    out
}
