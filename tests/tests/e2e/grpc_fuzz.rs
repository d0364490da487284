//! The black-box gRPC fuzzer against both servers with authentication on: random and
//! mutated protobuf bytes to every RPC, with valid, mutated or missing tokens. The servers
//! stay up and serving, every event in the log after the set-up belongs to an accepted
//! command (or the policy's reaction to one): nothing is written by a refused request,
//! and the query server applies everything. `SHOP_FUZZ_REQUESTS` (per server) and
//! `SHOP_FUZZ_SEED` scale and replay a run.

use std::time::Duration;

use prost::Message;
use shop_tests::grpc_fuzz::{self, Target};
use shop_tests::security::{bearer, write_tokens};
use shop_tests::{eventually, pb, req, Nats, Server, ServerKind};
use tonic_health::pb::health_check_response::ServingStatus;

const ADMIN: &str = "fuzz-admin-token";

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn target(path: &'static str, seeds: Vec<Vec<u8>>) -> Target {
    Target {
        path,
        server_streaming: false,
        seeds,
    }
}

fn command_targets() -> Vec<Target> {
    let c = |id: &str| id.to_string();
    vec![
        target(
            "/shop.v1.CommandService/RegisterCustomer",
            vec![req::register("f1", "f1@example.com").encode_to_vec()],
        ),
        target(
            "/shop.v1.CommandService/RenameCustomer",
            vec![pb::RenameCustomerRequest {
                customer_id: c("c1"),
                name: c("N"),
                ..Default::default()
            }
            .encode_to_vec()],
        ),
        target(
            "/shop.v1.CommandService/ChangeCustomerAddress",
            vec![pb::ChangeCustomerAddressRequest {
                customer_id: c("c1"),
                address: c("A 1"),
                ..Default::default()
            }
            .encode_to_vec()],
        ),
        target(
            "/shop.v1.CommandService/DeleteCustomer",
            vec![pb::DeleteCustomerRequest {
                customer_id: c("c2"),
                ..Default::default()
            }
            .encode_to_vec()],
        ),
        target(
            "/shop.v1.CommandService/CreateProduct",
            vec![req::product("fp", 100, 5).encode_to_vec()],
        ),
        target(
            "/shop.v1.CommandService/RestockProduct",
            vec![pb::RestockProductRequest {
                sku: c("p1"),
                quantity: 3,
                ..Default::default()
            }
            .encode_to_vec()],
        ),
        target(
            "/shop.v1.CommandService/ChangeProductPrice",
            vec![pb::ChangeProductPriceRequest {
                sku: c("p1"),
                price_cents: 250,
                ..Default::default()
            }
            .encode_to_vec()],
        ),
        target(
            "/shop.v1.CommandService/PlaceOrder",
            vec![req::order("fo", "c1", &[("p1", 1), ("p2", 2)]).encode_to_vec()],
        ),
        target(
            "/shop.v1.CommandService/PayOrder",
            vec![req::pay("o1", 300).encode_to_vec()],
        ),
        target(
            "/shop.v1.CommandService/ShipOrder",
            vec![req::ship("o1").encode_to_vec()],
        ),
        target(
            "/shop.v1.CommandService/CancelOrder",
            vec![req::cancel("o2", "changed my mind").encode_to_vec()],
        ),
        target(
            "/shop.v1.CommandService/CreateShipment",
            vec![req::shipment("fs", "o1").encode_to_vec()],
        ),
        target(
            "/shop.v1.CommandService/RecordShipmentEvent",
            vec![req::scan("fs", pb::ShipmentStatus::InTransit, "Leipzig").encode_to_vec()],
        ),
        target("/shop.v1.LogService/GetLogStatus", vec![Vec::new()]),
        target(
            "/shop.v1.LogService/ReadLog",
            vec![pb::ReadLogRequest {
                from_position: 1,
                limit: 10,
            }
            .encode_to_vec()],
        ),
        target(
            "/shop.v1.LogService/ReadStream",
            vec![pb::ReadStreamRequest {
                stream_id: c("order-o1"),
                from_version: 1,
                limit: 10,
            }
            .encode_to_vec()],
        ),
        target("/grpc.health.v1.Health/Check", vec![Vec::new()]),
    ]
}

fn query_targets() -> Vec<Target> {
    let c = |id: &str| id.to_string();
    let mut targets = vec![
        target(
            "/shop.v1.QueryService/GetCustomer",
            vec![pb::GetCustomerRequest {
                customer_id: c("c1"),
                min_position: 1,
                ..Default::default()
            }
            .encode_to_vec()],
        ),
        target(
            "/shop.v1.QueryService/ListCustomers",
            vec![pb::ListCustomersRequest {
                page_size: 2,
                ..Default::default()
            }
            .encode_to_vec()],
        ),
        target(
            "/shop.v1.QueryService/GetProduct",
            vec![pb::GetProductRequest {
                sku: c("p1"),
                ..Default::default()
            }
            .encode_to_vec()],
        ),
        target(
            "/shop.v1.QueryService/ListProducts",
            vec![pb::ListProductsRequest {
                page_size: 2,
                ..Default::default()
            }
            .encode_to_vec()],
        ),
        target(
            "/shop.v1.QueryService/GetOrder",
            vec![pb::GetOrderRequest {
                order_id: c("o1"),
                as_of_position: 4,
                ..Default::default()
            }
            .encode_to_vec()],
        ),
        target(
            "/shop.v1.QueryService/ListOrders",
            vec![pb::ListOrdersRequest {
                customer_id: c("c1"),
                page_size: 2,
                ..Default::default()
            }
            .encode_to_vec()],
        ),
        target(
            "/shop.v1.QueryService/GetHistory",
            vec![pb::GetHistoryRequest {
                stream_id: c("order-o1"),
                limit: 2,
                ..Default::default()
            }
            .encode_to_vec()],
        ),
        target("/shop.v1.QueryService/GetStatus", vec![Vec::new()]),
        target(
            "/shop.v1.QueryService/GetShipment",
            vec![pb::GetShipmentRequest {
                shipment_id: c("fs"),
                ..Default::default()
            }
            .encode_to_vec()],
        ),
        target("/grpc.health.v1.Health/Check", vec![Vec::new()]),
    ];
    for (path, seed) in [
        (
            "/shop.v1.QueryService/WatchOrder",
            pb::WatchOrderRequest {
                order_id: c("o1"),
                min_position: 0,
            }
            .encode_to_vec(),
        ),
        (
            "/shop.v1.QueryService/WatchCustomer",
            pb::WatchCustomerRequest {
                customer_id: c("c1"),
                min_position: 0,
            }
            .encode_to_vec(),
        ),
    ] {
        targets.push(Target {
            path,
            server_streaming: true,
            seeds: vec![seed],
        });
    }
    targets
}

#[tokio::test]
async fn fuzzed_requests_never_harm_and_refused_ones_write_nothing() {
    let requests = env_u64("SHOP_FUZZ_REQUESTS", 1500);
    let seed = env_u64("SHOP_FUZZ_SEED", 20261129);
    let dir = tempfile::tempdir().expect("tempdir");
    let tokens = dir.path().join("tokens");
    write_tokens(&tokens, &[("admin", ADMIN, "fuzzer")], &[]);
    let auth = ["--auth-tokens", tokens.to_str().expect("utf-8 path")];
    let nats = Nats::start();
    let mut command = Server::start(ServerKind::Command, &nats, &auth).await;
    let mut query = Server::start(ServerKind::Query, &nats, &auth).await;

    // Some state for mutated requests to find.
    let mut commands = command.commands().await;
    for id in ["c1", "c2"] {
        commands
            .register_customer(bearer(
                req::register(id, &format!("{id}@example.com")),
                ADMIN,
            ))
            .await
            .expect("register");
    }
    for sku in ["p1", "p2"] {
        commands
            .create_product(bearer(req::product(sku, 100, 1000), ADMIN))
            .await
            .expect("product");
    }
    for order in ["o1", "o2"] {
        commands
            .place_order(bearer(req::order(order, "c1", &[("p1", 3)]), ADMIN))
            .await
            .expect("order");
    }
    let channel = command.channel().await;
    let setup = shop_tests::read_whole_log_with(&channel, Some(ADMIN))
        .await
        .len() as u64;

    let on_command = grpc_fuzz::run(
        channel.clone(),
        &command_targets(),
        requests,
        seed,
        Some(ADMIN),
    )
    .await;
    let on_query = grpc_fuzz::run(
        query.channel().await,
        &query_targets(),
        requests,
        seed + 1,
        Some(ADMIN),
    )
    .await;
    eprintln!(
        "seed {seed}: command server {:?}\nquery server {:?}",
        on_command.codes, on_query.codes
    );

    for server in [&mut command, &mut query] {
        assert!(
            server.running(),
            "{:?} died (seed {seed}):\n{}",
            server.kind,
            server.log()
        );
        assert_eq!(
            server.health("").await,
            Some(ServingStatus::Serving),
            "seed {seed}"
        );
    }
    assert_eq!(on_command.requests, requests);
    // Refusals of several kinds were exercised, and some fuzzed commands were accepted.
    for code in ["InvalidArgument", "Unauthenticated"] {
        assert!(
            on_command.codes.contains_key(code),
            "no {code} (seed {seed}): {:?}",
            on_command.codes
        );
    }

    // Every event after the set-up is one of an accepted command's, or the policy's.
    let log = shop_tests::read_whole_log_with(&channel, Some(ADMIN)).await;
    let accepted = |position: u64| {
        on_command.accepted.iter().any(|r| {
            r.event_count > 0
                && position <= r.position
                && position + u64::from(r.event_count) > r.position
        })
    };
    for event in log.iter().filter(|e| e.position > setup) {
        assert!(
            accepted(event.position) || event.actor == command_server::policy::ACTOR,
            "event {} ({} on {}) was written by no accepted command (seed {seed})",
            event.position,
            event.event_type,
            event.stream_id
        );
    }
    // And the query server applied all of it.
    let last = log.last().map_or(0, |e| e.position);
    let mut queries = query.queries().await;
    eventually(
        Duration::from_secs(20),
        "the query server applies the fuzzed log",
        || {
            let mut queries = queries.clone();
            async move {
                let status = queries
                    .get_status(bearer(pb::GetStatusRequest {}, ADMIN))
                    .await
                    .ok()?
                    .into_inner();
                (status.applied_position == last).then_some(())
            }
        },
    )
    .await;
    drop(
        queries
            .get_status(bearer(pb::GetStatusRequest {}, ADMIN))
            .await,
    );
}
