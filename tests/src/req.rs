//! Request builders for the shop commands, and requests that probe the servers' limits.

use std::time::{Duration, Instant};

use shop_shared::pb::query_service_client::QueryServiceClient;
use tonic::transport::Channel;

use crate::pb;

pub fn register(id: &str, email: &str) -> pb::RegisterCustomerRequest {
    pb::RegisterCustomerRequest {
        customer_id: id.into(),
        name: format!("Customer {id}"),
        email: email.into(),
        ..Default::default()
    }
}

pub fn product(sku: &str, price_cents: i64, stock: i64) -> pb::CreateProductRequest {
    pb::CreateProductRequest {
        sku: sku.into(),
        name: format!("Product {sku}"),
        price_cents,
        initial_stock: stock,
        ..Default::default()
    }
}

pub fn order(order_id: &str, customer_id: &str, lines: &[(&str, i64)]) -> pb::PlaceOrderRequest {
    pb::PlaceOrderRequest {
        order_id: order_id.into(),
        customer_id: customer_id.into(),
        lines: lines
            .iter()
            .map(|(sku, quantity)| pb::OrderLineRequest {
                sku: (*sku).into(),
                quantity: *quantity,
            })
            .collect(),
        ..Default::default()
    }
}

pub fn pay(order_id: &str, amount_cents: i64) -> pb::PayOrderRequest {
    pb::PayOrderRequest {
        order_id: order_id.into(),
        amount_cents,
        payment_ref: format!("pay-{order_id}"),
        ..Default::default()
    }
}

pub fn ship(order_id: &str) -> pb::ShipOrderRequest {
    pb::ShipOrderRequest {
        order_id: order_id.into(),
        tracking: format!("trk-{order_id}"),
        ..Default::default()
    }
}

pub fn shipment(shipment_id: &str, order_id: &str) -> pb::CreateShipmentRequest {
    pb::CreateShipmentRequest {
        shipment_id: shipment_id.into(),
        order_id: order_id.into(),
        carrier: "DHL".into(),
        tracking_code: format!("JD-{order_id}"),
        ..Default::default()
    }
}

pub fn scan(
    shipment_id: &str,
    status: pb::ShipmentStatus,
    location: &str,
) -> pb::RecordShipmentEventRequest {
    pb::RecordShipmentEventRequest {
        shipment_id: shipment_id.into(),
        status: status as i32,
        location: location.into(),
        ..Default::default()
    }
}

pub fn cancel(order_id: &str, reason: &str) -> pb::CancelOrderRequest {
    pb::CancelOrderRequest {
        order_id: order_id.into(),
        reason: reason.into(),
        ..Default::default()
    }
}

/// Sends `n` GetCustomer requests at once over `channel`, each waiting for a position
/// that is never applied, with a `deadline`: each one's code and how long it took. A
/// request that holds one of the connection's slots waits out its deadline; one beyond
/// the per-connection limit is shed at once.
pub async fn parked_reads(
    channel: &Channel,
    n: usize,
    deadline: Duration,
) -> Vec<(tonic::Code, Duration)> {
    let mut tasks = Vec::new();
    for _ in 0..n {
        let mut q = QueryServiceClient::new(channel.clone());
        tasks.push(tokio::spawn(async move {
            let mut r = tonic::Request::new(pb::GetCustomerRequest {
                customer_id: "c".into(),
                min_position: 1_000_000,
                ..Default::default()
            });
            r.set_timeout(deadline);
            let started = Instant::now();
            let code = q.get_customer(r).await.expect_err("never applied").code();
            (code, started.elapsed())
        }));
    }
    let mut out = Vec::new();
    for task in tasks {
        out.push(task.await.expect("parked read task"));
    }
    out
}
