//! The query side (README, Guarantees: exactly-once on views, read your writes; the API): views equal a reference fold of the accepted
//! events (model check), read-your-writes, as-of reads, history, watches, pagination,
//! rebuild and side-by-side convergence, gap detection, argument validation.

use std::collections::BTreeMap;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use shop_tests::{
    bad_fields, eventually, log_position, parked_reads, pb, read_whole_log, req, Nats, Server,
    ServerKind, Stack,
};
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::Code;

use pb::command_service_client::CommandServiceClient;
use pb::query_service_client::QueryServiceClient;
use shop_tests::model::{assert_views_equal, fetch_all, Views};

const NAMES: [&str; 5] = ["Ann", "Anna", "anne-marie", "Bob", "Zoë"];

/// Sends one random command, valid or not; the outcome does not matter (the log is the
/// truth the views are checked against). Weighted so that orders move through every
/// status, with a fair share of refusals (unknown ids, bad quantities, wrong amounts).
pub async fn random_command(c: &mut CommandServiceClient<Channel>, rng: &mut rand::rngs::StdRng) {
    let customer = format!("c{}", rng.random_range(0..6));
    let sku = format!("p{}", rng.random_range(0..5));
    let order = format!("o{}", rng.random_range(0..40));
    let _ = match rng.random_range(0..24) {
        0 | 1 => c
            .register_customer(pb::RegisterCustomerRequest {
                customer_id: customer.clone(),
                name: NAMES[rng.random_range(0..NAMES.len())].to_string(),
                email: format!("u{}@example.com", rng.random_range(0..8)),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        2 => c
            .rename_customer(pb::RenameCustomerRequest {
                customer_id: customer,
                name: NAMES[rng.random_range(0..NAMES.len())].to_string(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        3 => c
            .change_customer_address(pb::ChangeCustomerAddressRequest {
                customer_id: customer,
                address: format!("{} Main St", rng.random_range(1..99)),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        4 if rng.random_bool(0.25) => c
            .delete_customer(pb::DeleteCustomerRequest {
                customer_id: customer,
                ..Default::default()
            })
            .await
            .map(|_| ()),
        5 | 6 => c
            .create_product(req::product(
                &sku,
                rng.random_range(0..500),
                rng.random_range(0..60),
            ))
            .await
            .map(|_| ()),
        7 => c
            .restock_product(pb::RestockProductRequest {
                sku,
                quantity: rng.random_range(-2..40),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        8 => c
            .change_product_price(pb::ChangeProductPriceRequest {
                sku,
                price_cents: rng.random_range(0..500),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        9..=13 => {
            let lines: Vec<(String, i64)> = (0..rng.random_range(1..=3))
                .map(|_| {
                    (
                        format!("p{}", rng.random_range(0..5)),
                        rng.random_range(0..5),
                    )
                })
                .collect();
            let lines: Vec<(&str, i64)> = lines.iter().map(|(s, q)| (s.as_str(), *q)).collect();
            c.place_order(req::order(&order, &customer, &lines))
                .await
                .map(|_| ())
        }
        14..=17 => {
            // Usually the right amount, learnt from the refusal of a wrong one.
            let amount = rng.random_range(0..3000);
            match c.pay_order(req::pay(&order, amount)).await {
                Err(status)
                    if status.code() == Code::FailedPrecondition && rng.random_bool(0.8) =>
                {
                    let total = shop_tests::error_metadata(&status)
                        .get("total_cents")
                        .and_then(|t| t.parse().ok());
                    match total {
                        Some(total) => c.pay_order(req::pay(&order, total)).await.map(|_| ()),
                        None => Err(status),
                    }
                }
                other => other.map(|_| ()),
            }
        }
        18..=21 => c.ship_order(req::ship(&order)).await.map(|_| ()),
        _ => c
            .cancel_order(req::cancel(&order, "random"))
            .await
            .map(|_| ()),
    };
}

async fn list_orders(
    q: &mut QueryServiceClient<Channel>,
    customer_id: &str,
    status: pb::OrderStatus,
    page_size: u32,
) -> Vec<pb::Order> {
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let page = q
            .list_orders(pb::ListOrdersRequest {
                customer_id: customer_id.into(),
                status: status as i32,
                page_size,
                page_token: token,
                min_position: 0,
            })
            .await
            .expect("list orders")
            .into_inner();
        out.extend(page.orders);
        token = page.next_page_token;
        if token.is_empty() {
            return out;
        }
    }
}

/// Checks every filtered list against the model.
async fn check_filtered_lists(q: &mut QueryServiceClient<Channel>, model: &Views) {
    let orders = model.orders_with_names();
    let statuses = [
        pb::OrderStatus::Unspecified,
        pb::OrderStatus::Placed,
        pb::OrderStatus::Paid,
        pb::OrderStatus::Shipped,
        pb::OrderStatus::Cancelled,
    ];
    let customers: Vec<String> = model
        .customers
        .keys()
        .cloned()
        .chain([String::new()])
        .collect();
    for customer in &customers {
        for status in statuses {
            let mut expected: Vec<&pb::Order> = orders
                .values()
                .filter(|o| customer.is_empty() || &o.customer_id == customer)
                .filter(|o| status == pb::OrderStatus::Unspecified || o.status() == status)
                .collect();
            expected.sort_by_key(|o| std::cmp::Reverse(o.placed_position));
            let actual = list_orders(q, customer, status, 3).await;
            let expected: Vec<pb::Order> = expected.into_iter().cloned().collect();
            assert_eq!(
                actual, expected,
                "ListOrders customer={customer:?} status={status:?}"
            );
        }
    }
    for prefix in ["", "an", "ANN", "bo", "zo", "x"] {
        for include_deleted in [false, true] {
            let mut expected: Vec<&pb::Customer> = model
                .customers
                .values()
                .filter(|c| c.name.to_lowercase().starts_with(&prefix.to_lowercase()))
                .filter(|c| include_deleted || c.status() != pb::CustomerStatus::Deleted)
                .collect();
            expected.sort_by_key(|c| (c.name.to_lowercase(), c.customer_id.clone()));
            let mut actual = Vec::new();
            let mut token = String::new();
            loop {
                let page = q
                    .list_customers(pb::ListCustomersRequest {
                        page_size: 2,
                        page_token: token,
                        name_prefix: prefix.into(),
                        include_deleted,
                        min_position: 0,
                    })
                    .await
                    .expect("list customers")
                    .into_inner();
                actual.extend(page.customers);
                token = page.next_page_token;
                if token.is_empty() {
                    break;
                }
            }
            let expected: Vec<pb::Customer> = expected.into_iter().cloned().collect();
            assert_eq!(
                actual, expected,
                "ListCustomers prefix={prefix:?} include_deleted={include_deleted}"
            );
        }
    }
    for max_available in [0, 5, 20, i64::MAX] {
        let mut expected: Vec<&pb::Product> = model
            .products
            .values()
            .filter(|p| p.available <= max_available)
            .collect();
        expected.sort_by_key(|p| (p.available, p.sku.clone()));
        let actual = q
            .list_products(pb::ListProductsRequest {
                page_size: 500,
                max_available: Some(max_available),
                ..Default::default()
            })
            .await
            .expect("list products")
            .into_inner()
            .products;
        let expected: Vec<pb::Product> = expected.into_iter().cloned().collect();
        assert_eq!(
            actual, expected,
            "ListProducts max_available={max_available}"
        );
    }
}

/// As-of reads at `position` against the model folded up to it.
async fn check_as_of(
    q: &mut QueryServiceClient<Channel>,
    events: &[pb::EventEnvelope],
    position: u64,
    model_now: &Views,
) {
    let then = Views::fold(&events[..position as usize]);
    let then_orders = then.orders_with_names();
    for id in model_now.customers.keys() {
        let got = q
            .get_customer(pb::GetCustomerRequest {
                customer_id: id.clone(),
                as_of_position: position,
                ..Default::default()
            })
            .await;
        match then.customers.get(id) {
            Some(c) => assert_eq!(
                &got.expect("as-of customer").into_inner(),
                c,
                "customer {id} as of {position}"
            ),
            None => assert_eq!(got.expect_err("absent then").code(), Code::NotFound),
        }
    }
    for sku in model_now.products.keys() {
        let got = q
            .get_product(pb::GetProductRequest {
                sku: sku.clone(),
                as_of_position: position,
                ..Default::default()
            })
            .await;
        match then.products.get(sku) {
            Some(p) => assert_eq!(
                &got.expect("as-of product").into_inner(),
                p,
                "product {sku} as of {position}"
            ),
            None => assert_eq!(got.expect_err("absent then").code(), Code::NotFound),
        }
    }
    for id in model_now.orders.keys() {
        let got = q
            .get_order(pb::GetOrderRequest {
                order_id: id.clone(),
                as_of_position: position,
                ..Default::default()
            })
            .await;
        match then_orders.get(id) {
            Some(o) => assert_eq!(
                &got.expect("as-of order").into_inner(),
                o,
                "order {id} as of {position}"
            ),
            None => assert_eq!(got.expect_err("absent then").code(), Code::NotFound),
        }
    }
}

/// GetHistory of every stream equals the log's events of that stream.
async fn check_history(q: &mut QueryServiceClient<Channel>, events: &[pb::EventEnvelope]) {
    let mut streams: BTreeMap<&str, Vec<&pb::EventEnvelope>> = BTreeMap::new();
    for e in events {
        streams.entry(&e.stream_id).or_default().push(e);
    }
    for (stream, expected) in streams {
        let mut got = Vec::new();
        let mut from = 1;
        loop {
            let page = q
                .get_history(pb::GetHistoryRequest {
                    stream_id: stream.into(),
                    from_version: from,
                    limit: 4,
                    min_position: 0,
                })
                .await
                .expect("history")
                .into_inner();
            got.extend(page.events);
            if page.next_version == 0 {
                break;
            }
            from = page.next_version;
        }
        assert_eq!(got.len(), expected.len(), "history of {stream}");
        for (h, e) in got.iter().zip(&expected) {
            assert_eq!(
                (
                    &h.event_id,
                    h.position,
                    h.stream_version,
                    &h.event_type,
                    &h.command_id,
                    h.occurred_at
                ),
                (
                    &e.event_id,
                    e.position,
                    e.stream_version,
                    &e.event_type,
                    &e.command_id,
                    e.occurred_at
                ),
                "history of {stream}"
            );
            let json: serde_json::Value =
                serde_json::from_str(&h.payload_json).expect("payload is JSON");
            assert!(
                json.is_object() && !json.as_object().is_some_and(|o| o.is_empty()),
                "{}",
                h.payload_json
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_check_views_equal_a_reference_fold_of_the_accepted_events() {
    let cases: u64 = std::env::var("SHOP_MODEL_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    for seed in 0..cases {
        let stack = Stack::start().await;
        let mut c = stack.command.commands().await;
        let mut q = stack.query.queries().await;
        let mut rng = rand::rngs::StdRng::seed_from_u64(1000 + seed);
        for _ in 0..400 {
            random_command(&mut c, &mut rng).await;
        }
        let events = read_whole_log(&mut stack.command.log_reader().await).await;
        let last = events.len() as u64;
        assert!(
            last > 50,
            "seed {seed}: too few accepted events ({last}) to mean anything"
        );
        let model = Views::fold(&events);
        for status in [
            pb::OrderStatus::Placed,
            pb::OrderStatus::Paid,
            pb::OrderStatus::Shipped,
            pb::OrderStatus::Cancelled,
        ] {
            let n = model
                .orders
                .values()
                .filter(|o| o.status() == status)
                .count();
            assert!(
                n > 0,
                "seed {seed}: the workload left no order {status:?}; it would not test that path"
            );
        }
        let actual = fetch_all(&mut q, last).await;
        assert_views_equal(&actual, &model, &format!("seed {seed}"));
        // Point reads agree with the lists.
        for (id, o) in model.orders_with_names() {
            let got = q
                .get_order(pb::GetOrderRequest {
                    order_id: id.clone(),
                    ..Default::default()
                })
                .await
                .expect("get order");
            assert_eq!(got.into_inner(), o, "seed {seed}: GetOrder {id}");
        }
        for (id, c) in &model.customers {
            let got = q
                .get_customer(pb::GetCustomerRequest {
                    customer_id: id.clone(),
                    ..Default::default()
                })
                .await
                .expect("get");
            assert_eq!(&got.into_inner(), c, "seed {seed}: GetCustomer {id}");
        }
        check_filtered_lists(&mut q, &model).await;
        for _ in 0..3 {
            let position = rng.random_range(1..=last);
            check_as_of(&mut q, &events, position, &model).await;
        }
        check_history(&mut q, &events).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_your_writes_with_the_commands_position() {
    let stack = Stack::start().await;
    let mut c = stack.command.commands().await;
    let mut q = stack.query.queries().await;
    c.register_customer(req::register("c1", "c1@example.com"))
        .await
        .expect("register");
    c.create_product(req::product("pen", 100, 1_000_000))
        .await
        .expect("product");
    for i in 0..150 {
        let id = format!("o{i}");
        let placed = c
            .place_order(req::order(&id, "c1", &[("pen", 1)]))
            .await
            .expect("place")
            .into_inner();
        let order = q
            .get_order(pb::GetOrderRequest {
                order_id: id.clone(),
                min_position: placed.position,
                ..Default::default()
            })
            .await
            .expect("the order is visible at its position")
            .into_inner();
        assert_eq!(order.version, placed.version);
        let paid = c
            .pay_order(req::pay(&id, 100))
            .await
            .expect("pay")
            .into_inner();
        let customer = q
            .get_customer(pb::GetCustomerRequest {
                customer_id: "c1".into(),
                min_position: paid.position,
                ..Default::default()
            })
            .await
            .expect("customer")
            .into_inner();
        assert_eq!(customer.order_count, i + 1);
        assert_eq!(customer.lifetime_spend_cents, 100 * (i as i64 + 1));
        let listed = q
            .list_orders(pb::ListOrdersRequest {
                customer_id: "c1".into(),
                page_size: 1,
                min_position: paid.position,
                ..Default::default()
            })
            .await
            .expect("list")
            .into_inner();
        assert_eq!(listed.orders[0].order_id, id, "newest first");
        assert_eq!(listed.orders[0].status(), pb::OrderStatus::Paid);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_position_not_yet_applied_is_unavailable_within_the_deadline() {
    let stack = Stack::start().await;
    let mut q = stack.query.queries().await;
    let mut request = tonic::Request::new(pb::GetStatusRequest {});
    request.set_timeout(Duration::from_millis(300));
    let mut req = tonic::Request::new(pb::GetCustomerRequest {
        customer_id: "c1".into(),
        min_position: 1_000,
        ..Default::default()
    });
    req.set_timeout(Duration::from_millis(300));
    let started = std::time::Instant::now();
    let status = q.get_customer(req).await.expect_err("not applied");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "bounded by the request deadline"
    );
    let _ = q.get_status(request).await.expect("status");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn as_of_time_and_position_show_the_earlier_state() {
    let stack = Stack::start().await;
    let mut c = stack.command.commands().await;
    let mut q = stack.query.queries().await;
    c.register_customer(req::register("c1", "c1@example.com"))
        .await
        .expect("register");
    c.create_product(req::product("pen", 100, 10))
        .await
        .expect("product");
    let placed = c
        .place_order(req::order("o1", "c1", &[("pen", 3)]))
        .await
        .expect("place")
        .into_inner();
    let at_placement = q
        .get_order(pb::GetOrderRequest {
            order_id: "o1".into(),
            min_position: placed.position,
            ..Default::default()
        })
        .await
        .expect("order")
        .into_inner();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let between = shop_shared::events::timestamp_from_micros(shop_shared::events::now_micros());
    tokio::time::sleep(Duration::from_millis(20)).await;
    c.rename_customer(pb::RenameCustomerRequest {
        customer_id: "c1".into(),
        name: "Renamed".into(),
        ..Default::default()
    })
    .await
    .expect("rename");
    c.pay_order(req::pay("o1", 300)).await.expect("pay");
    let shipped = c
        .ship_order(req::ship("o1"))
        .await
        .expect("ship")
        .into_inner();

    let now = q
        .get_order(pb::GetOrderRequest {
            order_id: "o1".into(),
            min_position: shipped.position,
            ..Default::default()
        })
        .await
        .expect("order")
        .into_inner();
    assert_eq!(
        (now.status(), now.customer_name.as_str()),
        (pb::OrderStatus::Shipped, "Renamed")
    );
    let by_position = q
        .get_order(pb::GetOrderRequest {
            order_id: "o1".into(),
            as_of_position: placed.position,
            ..Default::default()
        })
        .await
        .expect("as of position")
        .into_inner();
    assert_eq!(by_position, at_placement);
    assert_eq!(
        by_position.customer_name, "Customer c1",
        "the name as it was then"
    );
    let by_time = q
        .get_order(pb::GetOrderRequest {
            order_id: "o1".into(),
            as_of_time: Some(between),
            ..Default::default()
        })
        .await
        .expect("as of time")
        .into_inner();
    assert_eq!(by_time, at_placement);
    let product_then = q
        .get_product(pb::GetProductRequest {
            sku: "pen".into(),
            as_of_time: Some(between),
            ..Default::default()
        })
        .await
        .expect("product then")
        .into_inner();
    assert_eq!((product_then.on_hand, product_then.reserved), (10, 3));
    let before_anything = q
        .get_order(pb::GetOrderRequest {
            order_id: "o1".into(),
            as_of_position: 1,
            ..Default::default()
        })
        .await
        .expect_err("did not exist yet");
    assert_eq!(before_anything.code(), Code::NotFound);
    let both = q
        .get_order(pb::GetOrderRequest {
            order_id: "o1".into(),
            as_of_position: 1,
            as_of_time: Some(between),
            ..Default::default()
        })
        .await
        .expect_err("both cut-offs");
    assert_eq!(bad_fields(&both), ["as_of_time"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_receives_every_change_of_an_order_in_order() {
    let stack = Stack::start().await;
    let mut c = stack.command.commands().await;
    let mut q = stack.query.queries().await;
    c.register_customer(req::register("c1", "c1@example.com"))
        .await
        .expect("register");
    c.create_product(req::product("pen", 100, 10))
        .await
        .expect("product");
    let placed = c
        .place_order(req::order("o1", "c1", &[("pen", 1)]))
        .await
        .expect("place")
        .into_inner();
    let mut watch = q
        .watch_order(pb::WatchOrderRequest {
            order_id: "o1".into(),
            min_position: placed.position,
        })
        .await
        .expect("watch")
        .into_inner();
    let first = watch.next().await.expect("current view").expect("ok");
    assert_eq!(
        (first.version, first.status()),
        (1, pb::OrderStatus::Placed)
    );
    c.pay_order(req::pay("o1", 100)).await.expect("pay");
    c.ship_order(req::ship("o1")).await.expect("ship");
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let update = tokio::time::timeout(Duration::from_secs(10), watch.next())
            .await
            .expect("update in time")
            .expect("open")
            .expect("ok");
        seen.push((update.version, update.status()));
    }
    assert_eq!(
        seen,
        [(2, pb::OrderStatus::Paid), (3, pb::OrderStatus::Shipped)]
    );

    // A customer watch sees counter changes caused by order events too.
    let mut cw = q
        .watch_customer(pb::WatchCustomerRequest {
            customer_id: "c1".into(),
            min_position: 0,
        })
        .await
        .expect("watch customer")
        .into_inner();
    let now = cw.next().await.expect("current").expect("ok");
    c.place_order(req::order("o2", "c1", &[("pen", 1)]))
        .await
        .expect("place");
    let next = tokio::time::timeout(Duration::from_secs(10), cw.next())
        .await
        .expect("in time")
        .expect("open")
        .expect("ok");
    assert_eq!(next.order_count, now.order_count + 1);

    let missing = q
        .watch_order(pb::WatchOrderRequest {
            order_id: "nope".into(),
            min_position: 0,
        })
        .await
        .expect_err("no such order");
    assert_eq!(missing.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_watchers_do_not_stall_the_consumer() {
    let stack = Stack::start().await;
    let mut c = stack.command.commands().await;
    c.register_customer(req::register("c1", "c1@example.com"))
        .await
        .expect("register");
    c.create_product(req::product("pen", 100, 1_000_000))
        .await
        .expect("product");
    let placed = c
        .place_order(req::order("hot", "c1", &[("pen", 1)]))
        .await
        .expect("place")
        .into_inner();
    for i in 0..20 {
        c.register_customer(req::register(
            &format!("idle{i}"),
            &format!("idle{i}@example.com"),
        ))
        .await
        .expect("register");
    }
    let position = log_position(&mut stack.command.log_reader().await).await;
    // 1,000 idle watchers over a few connections, and one watcher that never reads.
    let mut clients = Vec::new();
    let mut idle = Vec::new();
    for i in 0..1000 {
        if i % 100 == 0 {
            clients.push(stack.query.queries().await);
        }
        let q = clients.last_mut().expect("client");
        let stream = q
            .watch_customer(pb::WatchCustomerRequest {
                customer_id: format!("idle{}", i % 20),
                min_position: position,
            })
            .await
            .expect("idle watch")
            .into_inner();
        idle.push(stream);
    }
    let mut q = stack.query.queries().await;
    let _never_read = q
        .watch_order(pb::WatchOrderRequest {
            order_id: "hot".into(),
            min_position: placed.position,
        })
        .await
        .expect("slow watch")
        .into_inner();
    let status = q
        .get_status(pb::GetStatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert_eq!(status.watchers, 1001);
    // Many changes: the consumer must keep up regardless.
    let mut last = 0;
    for i in 0..200 {
        let r = c
            .place_order(req::order(&format!("o{i}"), "c1", &[("pen", 1)]))
            .await
            .expect("place")
            .into_inner();
        last = r.position;
    }
    c.pay_order(req::pay("hot", 100)).await.expect("pay");
    let shipped = c
        .ship_order(req::ship("hot"))
        .await
        .expect("ship")
        .into_inner();
    let order = q
        .get_order(pb::GetOrderRequest {
            order_id: "hot".into(),
            min_position: shipped.position.max(last),
            ..Default::default()
        })
        .await
        .expect("the consumer kept up")
        .into_inner();
    assert_eq!(order.status(), pb::OrderStatus::Shipped);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_neither_skip_nor_repeat_items_while_new_ones_arrive() {
    let stack = Stack::start().await;
    let mut c = stack.command.commands().await;
    let mut q = stack.query.queries().await;
    c.register_customer(req::register("c1", "c1@example.com"))
        .await
        .expect("register");
    c.create_product(req::product("pen", 100, 1_000_000))
        .await
        .expect("product");
    let mut position = 0;
    for i in 0..120 {
        position = c
            .place_order(req::order(&format!("o{i:03}"), "c1", &[("pen", 1)]))
            .await
            .expect("place")
            .into_inner()
            .position;
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut extra = 0;
    loop {
        let page = q
            .list_orders(pb::ListOrdersRequest {
                page_size: 7,
                page_token: token,
                min_position: position,
                ..Default::default()
            })
            .await
            .expect("page")
            .into_inner();
        assert!(page.orders.len() <= 7);
        seen.extend(page.orders.into_iter().map(|o| o.order_id));
        // New orders land in front (newest first) and must not disturb later pages.
        c.place_order(req::order(&format!("new{extra}"), "c1", &[("pen", 1)]))
            .await
            .expect("place");
        extra += 1;
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    let expected: Vec<String> = (0..120).rev().map(|i| format!("o{i:03}")).collect();
    assert_eq!(seen, expected);

    // Bad tokens and a token reused with other filters are refused.
    let bad = q
        .list_orders(pb::ListOrdersRequest {
            page_token: "garbage!".into(),
            ..Default::default()
        })
        .await
        .expect_err("bad");
    assert_eq!(bad_fields(&bad), ["page_token"]);
    let page = q
        .list_orders(pb::ListOrdersRequest {
            page_size: 1,
            ..Default::default()
        })
        .await
        .expect("page")
        .into_inner();
    let other = q
        .list_orders(pb::ListOrdersRequest {
            page_token: page.next_page_token,
            customer_id: "c1".into(),
            ..Default::default()
        })
        .await
        .expect_err("other filter");
    assert_eq!(bad_fields(&other), ["page_token"]);
    // Page size is capped.
    let big = q
        .list_orders(pb::ListOrdersRequest {
            page_size: 100_000,
            ..Default::default()
        })
        .await
        .expect("big")
        .into_inner();
    assert!(big.orders.len() <= 500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_query_arguments_name_the_field() {
    let stack = Stack::start().await;
    let mut q = stack.query.queries().await;
    let s = q
        .get_customer(pb::GetCustomerRequest {
            customer_id: "no spaces".into(),
            ..Default::default()
        })
        .await
        .expect_err("bad");
    assert_eq!(
        (s.code(), bad_fields(&s)),
        (Code::InvalidArgument, vec!["customer_id".to_string()])
    );
    let s = q
        .get_order(pb::GetOrderRequest::default())
        .await
        .expect_err("bad");
    assert_eq!(bad_fields(&s), ["order_id"]);
    let s = q
        .get_history(pb::GetHistoryRequest {
            stream_id: "cart-1".into(),
            ..Default::default()
        })
        .await
        .expect_err("bad");
    assert_eq!(bad_fields(&s), ["stream_id"]);
    let s = q
        .list_orders(pb::ListOrdersRequest {
            status: 42,
            ..Default::default()
        })
        .await
        .expect_err("bad");
    assert_eq!(bad_fields(&s), ["status"]);
    let s = q
        .get_product(pb::GetProductRequest {
            sku: "nope".into(),
            ..Default::default()
        })
        .await
        .expect_err("absent");
    assert_eq!(s.code(), Code::NotFound);
    let s = q
        .get_history(pb::GetHistoryRequest {
            stream_id: "order-nope".into(),
            ..Default::default()
        })
        .await
        .expect_err("absent");
    assert_eq!(s.code(), Code::NotFound);
    let s = q
        .list_customers(pb::ListCustomersRequest {
            name_prefix: "x".repeat(1 << 20),
            ..Default::default()
        })
        .await
        .expect_err("oversized");
    assert_eq!(s.code(), Code::ResourceExhausted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_and_side_by_side_servers_converge_to_identical_views() {
    let mut stack = Stack::start().await;
    let mut c = stack.command.commands().await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(99);
    for _ in 0..200 {
        random_command(&mut c, &mut rng).await;
    }
    // A second query server, started late, catches up from sequence 1.
    let second = Server::start(ServerKind::Query, &stack.nats, &[]).await;
    for _ in 0..100 {
        random_command(&mut c, &mut rng).await;
    }
    let position = log_position(&mut stack.command.log_reader().await).await;
    let first_views = fetch_all(&mut stack.query.queries().await, position).await;
    let second_views = fetch_all(&mut second.queries().await, position).await;
    assert_eq!(first_views, second_views);

    // Rebuild the first one's views from scratch: identical again.
    stack.query.terminate();
    let output = std::process::Command::new(shop_tests::bin_dir().join("query-server"))
        .arg("rebuild")
        .arg("--data-dir")
        .arg(&stack.query.data_dir)
        .arg("--nats-url")
        .arg(stack.nats.url())
        .output()
        .expect("run rebuild");
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "rebuild failed:\n{log}");
    assert!(log.contains("rebuild done"), "{log}");
    stack.query.spawn_until_listening();
    stack.query.wait_serving().await;
    let rebuilt = fetch_all(&mut stack.query.queries().await, position).await;
    assert_eq!(rebuilt, first_views);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_in_the_stream_stops_the_consumer_before_it() {
    use prost::Message;
    let nats = Nats::start();
    let js = async_nats::jetstream::new(nats.client().await);
    // A stream written by hand, so that a message can be deleted from its middle.
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "SHOP_EVENTS".into(),
        subjects: vec!["shop.events.>".into()],
        ..Default::default()
    })
    .await
    .expect("stream");
    for position in 1..=3u64 {
        let envelope = pb::EventEnvelope {
            event_id: format!("e{position}"),
            position,
            stream_id: format!("product-p{position}"),
            stream_version: 1,
            event_type: "ProductCreated".into(),
            event: Some(pb::Event {
                kind: Some(pb::event::Kind::ProductCreated(pb::ProductCreated {
                    sku: format!("p{position}"),
                    name: "P".into(),
                    price_cents: 1,
                    initial_stock: 1,
                })),
            }),
            ..Default::default()
        };
        js.publish(
            format!("shop.events.product.p{position}"),
            envelope.encode_to_vec().into(),
        )
        .await
        .expect("publish")
        .await
        .expect("ack");
    }
    js.get_stream("SHOP_EVENTS")
        .await
        .expect("stream")
        .delete_message(2)
        .await
        .expect("delete message 2");

    let dir = tempfile::tempdir().expect("tempdir");
    let mut query = Server::new(
        ServerKind::Query,
        &nats.url(),
        dir.path().join("q"),
        dir.path().to_path_buf(),
        &[],
    );
    query.spawn_until_listening();
    let mut q = query.queries().await;
    let status = eventually(
        Duration::from_secs(15),
        "the consumer to report the gap",
        || async {
            let s = q
                .clone()
                .get_status(pb::GetStatusRequest {})
                .await
                .ok()?
                .into_inner();
            s.consumer_error.contains("gap").then_some(s)
        },
    )
    .await;
    assert_eq!(
        status.applied_position, 1,
        "applied up to the gap, not past it: {status:?}"
    );
    assert!(status.consumer_error.contains("gap"), "{status:?}");
    assert_eq!(
        query.health("").await,
        Some(tonic_health::pb::health_check_response::ServingStatus::NotServing)
    );
    assert!(q
        .get_product(pb::GetProductRequest {
            sku: "p3".into(),
            ..Default::default()
        })
        .await
        .is_err());
    assert!(q
        .get_product(pb::GetProductRequest {
            sku: "p1".into(),
            ..Default::default()
        })
        .await
        .is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_beyond_the_per_connection_limit_are_shed_with_resource_exhausted() {
    let nats = Nats::start();
    let dir = tempfile::tempdir().expect("tempdir");
    // No stream yet: the server answers (NOT_SERVING), and nothing will ever be applied.
    let mut query = Server::new(
        ServerKind::Query,
        &nats.url(),
        dir.path().join("q"),
        dir.path().to_path_buf(),
        &["--requests-per-connection-max", "8"],
    );
    query.spawn_until_listening();
    let channel = query.channel().await;
    // Forty requests wait for a position that will never come (within their deadline):
    // at most eight may hold a slot at once, every other one is shed immediately.
    let (mut held, mut shed) = (0, 0);
    for (code, waited) in parked_reads(&channel, 40, Duration::from_secs(3)).await {
        match code {
            Code::Unavailable => {
                assert!(
                    waited >= Duration::from_secs(1),
                    "held a slot until the deadline"
                );
                held += 1;
            }
            Code::ResourceExhausted => {
                assert!(
                    waited < Duration::from_secs(1),
                    "shed at once, not after waiting"
                );
                shed += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(
        (1..=8).contains(&held),
        "{held} requests held a slot (limit 8)"
    );
    assert_eq!(held + shed, 40);
    let mut q = QueryServiceClient::new(channel.clone());
    // Once they are done, the connection serves again; other connections were never affected.
    q.get_status(pb::GetStatusRequest {})
        .await
        .expect("served again");
    let mut other = query.queries().await;
    other
        .get_status(pb::GetStatusRequest {})
        .await
        .expect("other connection");
}

/// Query replicas (SPEC §8): three query servers on one stream, each with its own views.
/// Each command's reply position, given as `min_position`, makes whichever replica
/// answers show the command's effect; a replica restarted from its own data dir catches
/// up; and all three end with views equal to a fold of the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_query_replicas_each_read_your_writes() {
    let stack = Stack::start().await;
    let mut replicas = vec![
        Server::start(ServerKind::Query, &stack.nats, &[]).await,
        Server::start(ServerKind::Query, &stack.nats, &[]).await,
    ];
    let mut c = stack.command.commands().await;
    c.register_customer(req::register("c1", "c1@example.com"))
        .await
        .expect("register");
    c.create_product(req::product("pen", 100, 1_000_000))
        .await
        .expect("product");
    let mut readers = vec![stack.query.queries().await];
    for r in &replicas {
        readers.push(r.queries().await);
    }
    for i in 0..60usize {
        if i == 30 {
            // A replica down and back, from its own data dir: it catches up.
            replicas[0].restart().await;
            readers[1] = replicas[0].queries().await;
        }
        let id = format!("o{i}");
        let placed = c
            .place_order(req::order(&id, "c1", &[("pen", 1)]))
            .await
            .expect("place")
            .into_inner();
        let q = &mut readers[i % 3];
        let order = q
            .get_order(pb::GetOrderRequest {
                order_id: id.clone(),
                min_position: placed.position,
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("replica {} at {}: {e}", i % 3, placed.position))
            .into_inner();
        assert_eq!(order.version, placed.version, "replica {}", i % 3);
        let customer = readers[(i + 1) % 3]
            .get_customer(pb::GetCustomerRequest {
                customer_id: "c1".into(),
                min_position: placed.position,
                ..Default::default()
            })
            .await
            .expect("customer")
            .into_inner();
        assert_eq!(
            customer.order_count,
            i as u64 + 1,
            "replica {}",
            (i + 1) % 3
        );
    }
    let log = read_whole_log(&mut stack.command.log_reader().await).await;
    let position = log.last().map_or(0, |e| e.position);
    for (n, q) in readers.iter_mut().enumerate() {
        assert_views_equal(
            &fetch_all(q, position).await,
            &Views::fold(&log),
            &format!("replica {n}"),
        );
    }
    replicas.clear();
}
