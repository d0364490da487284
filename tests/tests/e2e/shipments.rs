//! Shipments, end to end: the aggregate added by following ARCHITECTURE.md's checklist.
//! Its commands and every refusal, its one-per-order index across a kill -9 of the
//! command server, its view (now, as of a past position, and against an independent fold
//! of the log), and its history.

use shop_tests::{code, log_position, pb, read_whole_log, reason, req, Stack};
use tonic::Code;

use pb::ShipmentStatus;
use shop_tests::model::{assert_views_equal, fetch_all, fetch_shipments, Views};

/// Customer c1, product a, orders o1 (paid and shipped) and o2 (placed).
async fn shop(c: &mut pb::command_service_client::CommandServiceClient<tonic::transport::Channel>) {
    c.register_customer(req::register("c1", "c1@example.com"))
        .await
        .expect("register");
    c.create_product(req::product("a", 250, 10))
        .await
        .expect("product");
    c.place_order(req::order("o1", "c1", &[("a", 2)]))
        .await
        .expect("place o1");
    c.pay_order(req::pay("o1", 500)).await.expect("pay");
    c.ship_order(req::ship("o1")).await.expect("ship");
    c.place_order(req::order("o2", "c1", &[("a", 1)]))
        .await
        .expect("place o2");
}

#[track_caller]
fn refused<T: std::fmt::Debug>(result: Result<T, tonic::Status>, expected: Code, why: &str) {
    assert_eq!(code(&result), expected, "{result:?}");
    if let Err(status) = &result {
        if expected == Code::InvalidArgument {
            assert_eq!(shop_tests::bad_fields(status), [why], "{status:?}");
        } else {
            assert_eq!(reason(status).as_deref(), Some(why), "{status:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipments_are_created_tracked_and_read_back() {
    let mut stack = Stack::start().await;
    let mut c = stack.command.commands().await;
    shop(&mut c).await;

    // Commands and refusals.
    let mut create = req::shipment("s1", "o1");
    create.command_id = "create-s1".into();
    let created = c
        .create_shipment(create.clone())
        .await
        .expect("create")
        .into_inner();
    assert_eq!(
        (created.stream_id.as_str(), created.version),
        ("shipment-s1", 1)
    );
    let retried = c.create_shipment(create).await.expect("retry").into_inner();
    assert_eq!(retried, created, "a retry answers the original result");
    refused(
        c.create_shipment(req::shipment("s2", "o1")).await,
        Code::AlreadyExists,
        "ORDER_HAS_SHIPMENT",
    );
    refused(
        c.create_shipment(req::shipment("s1", "o2")).await,
        Code::AlreadyExists,
        "SHIPMENT_EXISTS",
    );
    refused(
        c.create_shipment(req::shipment("s3", "o2")).await,
        Code::FailedPrecondition,
        "INVALID_ORDER_STATE",
    );
    refused(
        c.create_shipment(req::shipment("s3", "nope")).await,
        Code::NotFound,
        "ORDER_NOT_FOUND",
    );
    let mut blank = req::shipment("s3", "o2");
    blank.carrier = "  ".into();
    refused(
        c.create_shipment(blank).await,
        Code::InvalidArgument,
        "carrier",
    );

    c.record_shipment_event(req::scan("s1", ShipmentStatus::InTransit, "Leipzig"))
        .await
        .expect("in transit");
    let in_transit = log_position(&mut stack.command.log_reader().await).await;
    for status in [ShipmentStatus::Unspecified, ShipmentStatus::Created] {
        refused(
            c.record_shipment_event(req::scan("s1", status, "x")).await,
            Code::InvalidArgument,
            "status",
        );
    }
    let mut unknown_status = req::scan("s1", ShipmentStatus::InTransit, "x");
    unknown_status.status = 99;
    refused(
        c.record_shipment_event(unknown_status).await,
        Code::InvalidArgument,
        "status",
    );
    refused(
        c.record_shipment_event(req::scan("s9", ShipmentStatus::InTransit, "x"))
            .await,
        Code::NotFound,
        "SHIPMENT_NOT_FOUND",
    );
    c.record_shipment_event(req::scan("s1", ShipmentStatus::Delivered, "Berlin"))
        .await
        .expect("delivered");
    refused(
        c.record_shipment_event(req::scan("s1", ShipmentStatus::InTransit, "x"))
            .await,
        Code::FailedPrecondition,
        "SHIPMENT_DELIVERED",
    );

    // The state and the index survive a kill -9 (rebuilt from the log's records).
    stack.command.kill9();
    stack.command.restart().await;
    let mut c = stack.command.commands().await;
    refused(
        c.create_shipment(req::shipment("s4", "o1")).await,
        Code::AlreadyExists,
        "ORDER_HAS_SHIPMENT",
    );
    refused(
        c.record_shipment_event(req::scan("s1", ShipmentStatus::InTransit, "x"))
            .await,
        Code::FailedPrecondition,
        "SHIPMENT_DELIVERED",
    );

    // The view, against an independent fold of the log.
    let log = read_whole_log(&mut stack.command.log_reader().await).await;
    let last = log.last().map_or(0, |e| e.position);
    let expected = Views::fold(&log);
    assert_eq!(expected.shipments.len(), 1);
    let mut q = stack.query.queries().await;
    let mut actual = fetch_all(&mut q, last).await;
    actual.shipments = fetch_shipments(&mut q, expected.shipments.keys(), last).await;
    assert_views_equal(&actual, &expected, "after the shipment's events");
    let s1 = &actual.shipments["s1"];
    assert_eq!(s1.status(), ShipmentStatus::Delivered);
    assert_eq!(s1.tracking.len(), 2);

    // As of the in-transit scan; unknown shipments; history.
    let then = q
        .get_shipment(pb::GetShipmentRequest {
            shipment_id: "s1".into(),
            as_of_position: in_transit,
            ..Default::default()
        })
        .await
        .expect("as of")
        .into_inner();
    assert_eq!(
        (then.status(), then.tracking.len()),
        (ShipmentStatus::InTransit, 1)
    );
    let missing = q
        .get_shipment(pb::GetShipmentRequest {
            shipment_id: "s9".into(),
            ..Default::default()
        })
        .await;
    refused(missing, Code::NotFound, "SHIPMENT_NOT_FOUND");
    let history = q
        .get_history(pb::GetHistoryRequest {
            stream_id: "shipment-s1".into(),
            ..Default::default()
        })
        .await
        .expect("history")
        .into_inner();
    let types: Vec<&str> = history
        .events
        .iter()
        .map(|e| e.event_type.as_str())
        .collect();
    assert_eq!(
        types,
        ["ShipmentCreated", "ShipmentTracked", "ShipmentTracked"]
    );
}
