//! The command side over gRPC: every command, every error code with its field or reason,
//! idempotency, optimistic concurrency, malformed and oversized input, overload.

use std::time::Duration;

use shop_tests::{
    bad_fields, code, error_metadata, log_position, pb, reason, req, Nats, Server, ServerKind,
};
use tonic::Code;

async fn start() -> (Nats, Server) {
    let nats = Nats::start();
    let server = Server::start(ServerKind::Command, &nats, &[]).await;
    (nats, server)
}

/// Asserts a refusal: its code, and its ErrorInfo reason or BadRequest fields.
#[track_caller]
fn refused<T: std::fmt::Debug>(
    result: Result<tonic::Response<T>, tonic::Status>,
    expected: Code,
    detail: &[&str],
) -> tonic::Status {
    let status = match result {
        Ok(ok) => panic!("expected {expected:?}, got OK: {ok:?}"),
        Err(status) => status,
    };
    assert_eq!(status.code(), expected, "{status:?}");
    if expected == Code::InvalidArgument {
        assert_eq!(bad_fields(&status), detail, "{status:?}");
    } else if let [r] = detail {
        assert_eq!(reason(&status).as_deref(), Some(*r), "{status:?}");
    }
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_and_every_refusal() {
    let (_nats, server) = start().await;
    let mut c = server.commands().await;

    // Customers.
    let r = c
        .register_customer(req::register("c1", "ada@example.com"))
        .await
        .expect("register")
        .into_inner();
    assert_eq!(
        (
            r.stream_id.as_str(),
            r.version,
            r.position,
            r.event_count,
            r.id.as_str()
        ),
        ("customer-c1", 1, 1, 1, "c1")
    );
    let generated = c
        .register_customer(req::register("", "gen@example.com"))
        .await
        .expect("register with generated id")
        .into_inner();
    assert!(
        !generated.id.is_empty() && generated.stream_id == format!("customer-{}", generated.id)
    );
    refused(
        c.register_customer(req::register("c1", "x@example.com"))
            .await,
        Code::AlreadyExists,
        &["CUSTOMER_EXISTS"],
    );
    refused(
        c.register_customer(req::register("c2", "ADA@Example.COM"))
            .await,
        Code::AlreadyExists,
        &["EMAIL_TAKEN"],
    );
    refused(
        c.register_customer(pb::RegisterCustomerRequest {
            customer_id: "bad id!".into(),
            name: String::new(),
            email: "not-an-email".into(),
            address: "a".repeat(501),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        &["customer_id", "name", "email", "address"],
    );
    c.rename_customer(pb::RenameCustomerRequest {
        customer_id: "c1".into(),
        name: "Ada L.".into(),
        ..Default::default()
    })
    .await
    .expect("rename");
    refused(
        c.rename_customer(pb::RenameCustomerRequest {
            customer_id: "nobody".into(),
            name: "x".into(),
            ..Default::default()
        })
        .await,
        Code::NotFound,
        &["CUSTOMER_NOT_FOUND"],
    );
    refused(
        c.rename_customer(pb::RenameCustomerRequest {
            customer_id: "c1".into(),
            name: "n".repeat(201),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        &["name"],
    );
    c.change_customer_address(pb::ChangeCustomerAddressRequest {
        customer_id: "c1".into(),
        address: "1 Analytical Way".into(),
        ..Default::default()
    })
    .await
    .expect("address");

    // Products.
    c.create_product(req::product("pen", 250, 10))
        .await
        .expect("create");
    c.create_product(req::product("ink", 100, 1))
        .await
        .expect("create");
    refused(
        c.create_product(req::product("pen", 1, 1)).await,
        Code::AlreadyExists,
        &["PRODUCT_EXISTS"],
    );
    refused(
        c.create_product(req::product("neg", -1, -5)).await,
        Code::InvalidArgument,
        &["price_cents", "initial_stock"],
    );
    c.restock_product(pb::RestockProductRequest {
        sku: "pen".into(),
        quantity: 5,
        ..Default::default()
    })
    .await
    .expect("restock");
    refused(
        c.restock_product(pb::RestockProductRequest {
            sku: "pen".into(),
            quantity: 0,
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        &["quantity"],
    );
    refused(
        c.restock_product(pb::RestockProductRequest {
            sku: "nope".into(),
            quantity: 1,
            ..Default::default()
        })
        .await,
        Code::NotFound,
        &["PRODUCT_NOT_FOUND"],
    );
    c.change_product_price(pb::ChangeProductPriceRequest {
        sku: "pen".into(),
        price_cents: 300,
        ..Default::default()
    })
    .await
    .expect("reprice");

    // Orders.
    let placed = c
        .place_order(req::order("o1", "c1", &[("pen", 2), ("ink", 1)]))
        .await
        .expect("place")
        .into_inner();
    assert_eq!(
        (
            placed.stream_id.as_str(),
            placed.version,
            placed.event_count
        ),
        ("order-o1", 1, 3)
    );
    let status = refused(
        c.place_order(req::order("o2", "c1", &[("ink", 1)])).await,
        Code::FailedPrecondition,
        &["INSUFFICIENT_STOCK"],
    );
    assert_eq!(error_metadata(&status)["sku"], "ink");
    refused(
        c.place_order(req::order("o1", "c1", &[("pen", 1)])).await,
        Code::AlreadyExists,
        &["ORDER_EXISTS"],
    );
    refused(
        c.place_order(req::order("o3", "c1", &[("zzz", 1)])).await,
        Code::NotFound,
        &["PRODUCT_NOT_FOUND"],
    );
    refused(
        c.place_order(req::order("o3", "ghost", &[("pen", 1)]))
            .await,
        Code::NotFound,
        &["CUSTOMER_NOT_FOUND"],
    );
    refused(
        c.place_order(req::order(
            "o3",
            "c1",
            &[("pen", 1), ("pen", 2), ("ink", 0)],
        ))
        .await,
        Code::InvalidArgument,
        &["lines[1].sku", "lines[2].quantity"],
    );
    let many: Vec<(String, i64)> = (0..101).map(|i| (format!("s{i}"), 1)).collect();
    let many: Vec<(&str, i64)> = many.iter().map(|(s, q)| (s.as_str(), *q)).collect();
    refused(
        c.place_order(req::order("o3", "c1", &many)).await,
        Code::InvalidArgument,
        &["lines"],
    );
    refused(
        c.place_order(req::order("o3", "c1", &[])).await,
        Code::InvalidArgument,
        &["lines"],
    );

    let status = refused(
        c.pay_order(req::pay("o1", 1)).await,
        Code::FailedPrecondition,
        &["AMOUNT_MISMATCH"],
    );
    assert_eq!(error_metadata(&status)["total_cents"], "700");
    refused(
        c.ship_order(req::ship("o1")).await,
        Code::FailedPrecondition,
        &["INVALID_ORDER_STATE"],
    );
    c.pay_order(req::pay("o1", 2 * 300 + 100))
        .await
        .expect("pay");
    refused(
        c.pay_order(req::pay("o1", 700)).await,
        Code::FailedPrecondition,
        &["INVALID_ORDER_STATE"],
    );
    let shipped = c
        .ship_order(req::ship("o1"))
        .await
        .expect("ship")
        .into_inner();
    assert_eq!((shipped.version, shipped.event_count), (3, 3));
    let status = refused(
        c.cancel_order(req::cancel("o1", "late")).await,
        Code::FailedPrecondition,
        &["INVALID_ORDER_STATE"],
    );
    assert_eq!(error_metadata(&status)["status"], "SHIPPED");
    refused(
        c.cancel_order(req::cancel("nope", "x")).await,
        Code::NotFound,
        &["ORDER_NOT_FOUND"],
    );
    let o4 = c
        .place_order(req::order("", "c1", &[("pen", 1)]))
        .await
        .expect("place, generated id")
        .into_inner();
    c.cancel_order(req::cancel(&o4.id, "changed mind"))
        .await
        .expect("cancel");

    // Customer deletion, then everything on that customer is refused.
    c.delete_customer(pb::DeleteCustomerRequest {
        customer_id: "c1".into(),
        reason: "gdpr".into(),
        ..Default::default()
    })
    .await
    .expect("delete");
    refused(
        c.delete_customer(pb::DeleteCustomerRequest {
            customer_id: "c1".into(),
            ..Default::default()
        })
        .await,
        Code::FailedPrecondition,
        &["CUSTOMER_DELETED"],
    );
    refused(
        c.place_order(req::order("o9", "c1", &[("pen", 1)])).await,
        Code::FailedPrecondition,
        &["CUSTOMER_DELETED"],
    );
    // The email is free again.
    c.register_customer(req::register("c9", "ada@example.com"))
        .await
        .expect("email reusable after delete");

    // Optimistic concurrency.
    let status = refused(
        c.rename_customer(pb::RenameCustomerRequest {
            customer_id: "c9".into(),
            name: "x".into(),
            expected_version: Some(5),
            ..Default::default()
        })
        .await,
        Code::Aborted,
        &["VERSION_CONFLICT"],
    );
    assert_eq!(error_metadata(&status)["actual_version"], "1");
    refused(
        c.create_product(pb::CreateProductRequest {
            expected_version: Some(1),
            ..req::product("new", 1, 1)
        })
        .await,
        Code::Aborted,
        &["VERSION_CONFLICT"],
    );
    c.create_product(pb::CreateProductRequest {
        expected_version: Some(0),
        ..req::product("new", 1, 1)
    })
    .await
    .expect("expected_version 0 = must not exist yet");

    // Bad command ids.
    refused(
        c.create_product(pb::CreateProductRequest {
            command_id: "has space".into(),
            ..req::product("p2", 1, 1)
        })
        .await,
        Code::InvalidArgument,
        &["command_id"],
    );
    refused(
        c.create_product(pb::CreateProductRequest {
            command_id: "x".repeat(129),
            ..req::product("p2", 1, 1)
        })
        .await,
        Code::InvalidArgument,
        &["command_id"],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_command_id_returns_the_original_reply_and_appends_nothing() {
    let (_nats, mut server) = start().await;
    let mut c = server.commands().await;
    let mut log = server.log_reader().await;
    c.register_customer(req::register("c1", "c1@example.com"))
        .await
        .expect("register");
    c.create_product(req::product("pen", 100, 10))
        .await
        .expect("product");
    let request = pb::PlaceOrderRequest {
        command_id: "place-once".into(),
        ..req::order("", "c1", &[("pen", 3)])
    };
    let first = c.place_order(request.clone()).await.expect("first");
    assert!(first.metadata().get("shop-replayed").is_none());
    let first = first.into_inner();
    let position = log_position(&mut log).await;

    let again = c.place_order(request.clone()).await.expect("retry");
    assert_eq!(
        again
            .metadata()
            .get("shop-replayed")
            .map(|v| v.to_str().unwrap_or("")),
        Some("true")
    );
    assert_eq!(
        again.into_inner(),
        first,
        "the original reply, generated order id included"
    );
    assert_eq!(log_position(&mut log).await, position, "nothing appended");

    // Same id, different payload.
    let other = pb::PlaceOrderRequest {
        command_id: "place-once".into(),
        ..req::order("", "c1", &[("pen", 4)])
    };
    let status = c.place_order(other).await.expect_err("reused id");
    assert_eq!(status.code(), Code::AlreadyExists);
    assert_eq!(reason(&status).as_deref(), Some("COMMAND_ID_REUSED"));

    // The records survive a crash, also those of commands acknowledged just before it
    // (idempotency records are written in snapshots every ~100 ms; the last commands'
    // records come back from replaying the log). Two commands back to back: at most
    // the first one's batch can carry a snapshot.
    let just_before = |id: &str| pb::RestockProductRequest {
        command_id: id.into(),
        sku: "pen".into(),
        quantity: 1,
        ..Default::default()
    };
    let a = c
        .restock_product(just_before("restock-a"))
        .await
        .expect("restock a")
        .into_inner();
    let b = c
        .restock_product(just_before("restock-b"))
        .await
        .expect("restock b")
        .into_inner();
    server.kill9();
    server.restart().await;
    let mut c = server.commands().await;
    let mut log = server.log_reader().await;
    let position = log_position(&mut log).await;
    assert_eq!(
        c.place_order(request)
            .await
            .expect("retry after restart")
            .into_inner(),
        first
    );
    assert_eq!(
        c.restock_product(just_before("restock-b"))
            .await
            .expect("retry b")
            .into_inner(),
        b
    );
    assert_eq!(
        c.restock_product(just_before("restock-a"))
            .await
            .expect("retry a")
            .into_inner(),
        a
    );
    assert_eq!(
        log_position(&mut log).await,
        position,
        "no retry appended anything"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_writers_with_the_same_expected_version_one_wins() {
    let (_nats, server) = start().await;
    let mut c = server.commands().await;
    for round in 0..20 {
        let id = format!("c{round}");
        c.register_customer(req::register(&id, &format!("{id}@example.com")))
            .await
            .expect("register");
        let mut tasks = Vec::new();
        for writer in 0..2 {
            let mut c = server.commands().await;
            let id = id.clone();
            tasks.push(tokio::spawn(async move {
                c.rename_customer(pb::RenameCustomerRequest {
                    customer_id: id,
                    name: format!("writer {writer}"),
                    expected_version: Some(1),
                    ..Default::default()
                })
                .await
            }));
        }
        let mut outcomes = Vec::new();
        for t in tasks {
            outcomes.push(t.await.expect("task"));
        }
        let wins = outcomes.iter().filter(|r| r.is_ok()).count();
        assert_eq!(wins, 1, "round {round}: {outcomes:?}");
        let loser = outcomes.into_iter().find_map(Result::err).expect("a loser");
        assert_eq!(loser.code(), Code::Aborted);
        assert_eq!(error_metadata(&loser)["actual_version"], "2");
    }
}

/// Wire-compatible twins of the requests with `bytes` where the real ones have
/// `string`, to send what a well-behaved client library never would.
mod raw {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RegisterCustomer {
        #[prost(bytes = "vec", tag = "1")]
        pub command_id: Vec<u8>,
        #[prost(bytes = "vec", tag = "3")]
        pub customer_id: Vec<u8>,
        #[prost(bytes = "vec", tag = "4")]
        pub name: Vec<u8>,
        #[prost(bytes = "vec", tag = "5")]
        pub email: Vec<u8>,
        #[prost(bytes = "vec", tag = "6")]
        pub address: Vec<u8>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Line {
        #[prost(bytes = "vec", tag = "1")]
        pub sku: Vec<u8>,
        #[prost(int64, tag = "2")]
        pub quantity: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PlaceOrder {
        #[prost(bytes = "vec", tag = "1")]
        pub command_id: Vec<u8>,
        #[prost(bytes = "vec", tag = "3")]
        pub order_id: Vec<u8>,
        #[prost(bytes = "vec", tag = "4")]
        pub customer_id: Vec<u8>,
        #[prost(message, repeated, tag = "5")]
        pub lines: Vec<Line>,
    }

    /// Any bytes at all as the request body.
    #[derive(Clone, PartialEq)]
    pub struct Garbage(pub Vec<u8>);
}

async fn send_raw<M: prost::Message + Send + Sync + 'static>(
    channel: tonic::transport::Channel,
    path: &'static str,
    message: M,
) -> Code {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    let codec: tonic_prost::ProstCodec<M, pb::CommandResult> = tonic_prost::ProstCodec::default();
    let result = grpc
        .unary(
            tonic::Request::new(message),
            http::uri::PathAndQuery::from_static(path),
            codec,
        )
        .await;
    code(&result)
}

/// Random bytes as the whole body (not protobuf at all).
async fn send_garbage(
    channel: tonic::transport::Channel,
    path: &'static str,
    body: Vec<u8>,
) -> Code {
    use bytes::BufMut;
    #[derive(Default)]
    struct RawCodec;
    struct RawEncoder;
    impl tonic::codec::Encoder for RawEncoder {
        type Item = raw::Garbage;
        type Error = tonic::Status;
        fn encode(
            &mut self,
            item: raw::Garbage,
            dst: &mut tonic::codec::EncodeBuf<'_>,
        ) -> Result<(), tonic::Status> {
            dst.put_slice(&item.0);
            Ok(())
        }
    }
    impl tonic::codec::Codec for RawCodec {
        type Encode = raw::Garbage;
        type Decode = pb::CommandResult;
        type Encoder = RawEncoder;
        type Decoder = <tonic_prost::ProstCodec<pb::CommandResult, pb::CommandResult> as tonic::codec::Codec>::Decoder;
        fn encoder(&mut self) -> Self::Encoder {
            RawEncoder
        }
        fn decoder(&mut self) -> Self::Decoder {
            tonic_prost::ProstCodec::<pb::CommandResult, pb::CommandResult>::default().decoder()
        }
    }
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    let result = grpc
        .unary(
            tonic::Request::new(raw::Garbage(body)),
            http::uri::PathAndQuery::from_static(path),
            RawCodec,
        )
        .await;
    code(&result)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_input_is_refused_and_writes_nothing() {
    use rand::{Rng, RngCore, SeedableRng};
    let (_nats, server) = start().await;
    let mut c = server.commands().await;
    let mut log = server.log_reader().await;
    c.register_customer(req::register("c1", "c1@example.com"))
        .await
        .expect("register");
    c.create_product(req::product("pen", 100, 10))
        .await
        .expect("product");
    let before = log_position(&mut log).await;
    let channel = server.channel().await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let client_errors = [
        Code::InvalidArgument,
        Code::ResourceExhausted,
        Code::NotFound,
        Code::AlreadyExists,
    ];

    for i in 0..150 {
        fn random(rng: &mut rand::rngs::StdRng, max: usize) -> Vec<u8> {
            let mut bytes = vec![0u8; rng.random_range(0..max)];
            rng.fill_bytes(&mut bytes);
            bytes
        }
        // Random bytes in every string field (mostly invalid UTF-8).
        let register = raw::RegisterCustomer {
            command_id: random(&mut rng, 40),
            customer_id: random(&mut rng, 80),
            name: random(&mut rng, 300),
            email: random(&mut rng, 60),
            address: random(&mut rng, 600),
        };
        let got = send_raw(
            channel.clone(),
            "/shop.v1.CommandService/RegisterCustomer",
            register,
        )
        .await;
        assert!(
            client_errors.contains(&got),
            "round {i}: RegisterCustomer with random bytes gave {got:?}"
        );
        let order = raw::PlaceOrder {
            command_id: random(&mut rng, 20),
            order_id: random(&mut rng, 70),
            customer_id: random(&mut rng, 10),
            lines: (0..rng.random_range(0..5))
                .map(|_| raw::Line {
                    sku: random(&mut rng, 70),
                    quantity: rng.random(),
                })
                .collect(),
        };
        let got = send_raw(channel.clone(), "/shop.v1.CommandService/PlaceOrder", order).await;
        assert!(
            client_errors.contains(&got),
            "round {i}: PlaceOrder with random bytes gave {got:?}"
        );
        // Not protobuf at all.
        let got = send_garbage(
            channel.clone(),
            "/shop.v1.CommandService/CancelOrder",
            random(&mut rng, 200),
        )
        .await;
        assert!(
            client_errors.contains(&got),
            "round {i}: garbage body gave {got:?}"
        );
    }

    // Missing fields: every field named.
    let status = c
        .place_order(pb::PlaceOrderRequest::default())
        .await
        .expect_err("empty");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(bad_fields(&status), ["customer_id", "lines"]);
    let status = c
        .pay_order(pb::PayOrderRequest::default())
        .await
        .expect_err("empty");
    assert_eq!(bad_fields(&status), ["order_id", "payment_ref"]);

    // Huge repeated field, beyond the request size limit: RESOURCE_EXHAUSTED.
    let lines: Vec<(String, i64)> = (0..10_000).map(|i| (format!("sku-{i}"), 1)).collect();
    let lines: Vec<(&str, i64)> = lines.iter().map(|(s, q)| (s.as_str(), *q)).collect();
    let status = c
        .place_order(req::order("big", "c1", &lines))
        .await
        .expect_err("too big");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    // A huge string too.
    let status = c
        .rename_customer(pb::RenameCustomerRequest {
            customer_id: "c1".into(),
            name: "x".repeat(1 << 20),
            ..Default::default()
        })
        .await
        .expect_err("too big");
    assert_eq!(status.code(), Code::ResourceExhausted);

    // Nothing was written, and the server still serves.
    assert_eq!(log_position(&mut log).await, before);
    c.place_order(req::order("ok", "c1", &[("pen", 1)]))
        .await
        .expect("still serving");
    assert_eq!(log_position(&mut log).await, before + 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_resource_exhausted_and_loses_nothing() {
    let nats = Nats::start();
    let server = Server::start(
        ServerKind::Command,
        &nats,
        &["--queue-capacity", "1", "--batch-commands-max", "1"],
    )
    .await;
    let mut log = server.log_reader().await;
    let mut exhausted = 0;
    let mut accepted = 0u64;
    for burst in 0..10 {
        let mut tasks = Vec::new();
        for i in 0..300 {
            let mut c = server.commands().await;
            tasks.push(tokio::spawn(async move {
                c.create_product(req::product(&format!("b{burst}-{i}"), 1, 1))
                    .await
            }));
        }
        for t in tasks {
            match t.await.expect("task") {
                Ok(_) => accepted += 1,
                Err(status) => {
                    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                    assert_eq!(reason(&status).as_deref(), Some("OVERLOADED"));
                    exhausted += 1;
                }
            }
        }
        if exhausted > 0 {
            break;
        }
    }
    assert!(
        exhausted > 0,
        "a one-slot queue under 300 concurrent commands never filled"
    );
    // Every accepted command is in the log; refused ones are not.
    tokio::time::timeout(Duration::from_secs(5), async {
        while log_position(&mut log).await != accepted {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("log holds exactly the accepted commands");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_a_stream_matches_the_log_across_snapshots_and_restarts() {
    let (_nats, mut server) = start().await;
    let mut c = server.commands().await;
    c.register_customer(req::register("c1", "c1@example.com"))
        .await
        .expect("register");
    c.create_product(req::product("pen", 1, 1_000_000))
        .await
        .expect("product");
    for round in 0..3 {
        for i in 0..60 {
            let id = format!("r{round}-o{i}");
            c.place_order(req::order(&id, "c1", &[("pen", 1)]))
                .await
                .expect("place");
            if i % 3 == 0 {
                c.cancel_order(req::cancel(&id, "x")).await.expect("cancel");
            }
            if i % 20 == 0 {
                // Let a snapshot fall between some of the events.
                tokio::time::sleep(std::time::Duration::from_millis(120)).await;
            }
        }
        let whole = shop_tests::read_whole_log(&mut server.log_reader().await).await;
        let expected: Vec<pb::EventEnvelope> = whole
            .into_iter()
            .filter(|e| e.stream_id == "product-pen")
            .collect();
        let mut got = Vec::new();
        let mut from = 1;
        loop {
            let page = server
                .log_reader()
                .await
                .read_stream(pb::ReadStreamRequest {
                    stream_id: "product-pen".into(),
                    from_version: from,
                    limit: 37,
                })
                .await
                .expect("read stream")
                .into_inner();
            got.extend(page.events);
            if page.next == 0 {
                break;
            }
            from = page.next;
        }
        if got != expected {
            let show = |events: &[pb::EventEnvelope]| -> Vec<(u64, u64)> {
                events
                    .iter()
                    .map(|e| (e.stream_version, e.position))
                    .collect()
            };
            panic!("round {round}: ReadStream (version, position)s differ from the log's:\n read: {:?}\n  log: {:?}", show(&got), show(&expected));
        }
        server.kill9();
        server.restart().await;
        c = server.commands().await;
    }
}
