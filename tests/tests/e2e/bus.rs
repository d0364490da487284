//! The bus (README, Guarantees: the bus mirrors the log; the policy): the stream mirrors the log (sequence N == position N,
//! same bytes), through NATS outages, command-server crashes while publishing, and a
//! stream deleted or purged behind the relay's back; a conflicting stream is refused; and
//! deleting a customer cancels their open orders exactly once.

use std::collections::HashMap;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use shop_tests::{
    assert_stream_mirrors_log, eventually, log_position, pb, read_stream, read_whole_log, req,
    stream_last_sequence, Nats, Server, ServerKind,
};
use tonic_health::pb::health_check_response::ServingStatus;

const STREAM: &str = "SHOP_EVENTS";

async fn seed(server: &Server, customers: usize, skus: usize) {
    let mut c = server.commands().await;
    for i in 0..customers {
        c.register_customer(req::register(
            &format!("c{i}"),
            &format!("c{i}@example.com"),
        ))
        .await
        .expect("register");
    }
    for i in 0..skus {
        c.create_product(req::product(&format!("p{i}"), 100, 1_000_000))
            .await
            .expect("product");
    }
}

/// `n` orders from `clients` concurrent clients; every one must succeed.
async fn burst(server: &Server, tag: &str, n: usize, clients: usize) {
    let mut tasks = Vec::new();
    for client in 0..clients {
        let mut c = server.commands().await;
        let tag = tag.to_string();
        tasks.push(tokio::spawn(async move {
            for i in (client..n).step_by(clients) {
                let lines = [("p0", 1), ("p1", 2)];
                c.place_order(req::order(
                    &format!("{tag}-{i}"),
                    &format!("c{}", i % 3),
                    &lines[..1 + i % 2],
                ))
                .await
                .unwrap_or_else(|e| panic!("order {tag}-{i}: {e:?}"));
            }
        }));
    }
    for t in tasks {
        t.await.expect("client");
    }
}

/// Waits until the stream has caught up with the log, then compares them whole.
async fn assert_mirrored(nats: &Nats, server: &Server) {
    let mut log = server.log_reader().await;
    let position = log_position(&mut log).await;
    eventually(
        Duration::from_secs(30),
        "stream to catch up with the log",
        || async { (stream_last_sequence(nats, STREAM).await == position).then_some(()) },
    )
    .await;
    let events = read_whole_log(&mut log).await;
    assert_eq!(events.len() as u64, position);
    assert_stream_mirrors_log(&read_stream(nats, STREAM).await, &events);
    let status = log
        .get_log_status(pb::GetLogStatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert_eq!((status.published_position, status.relay_lag), (position, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_burst_sequence_n_is_position_n() {
    let nats = Nats::start();
    let server = Server::start(ServerKind::Command, &nats, &[]).await;
    seed(&server, 3, 2).await;
    burst(&server, "b", 400, 8).await;
    assert_mirrored(&nats, &server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_keep_succeeding_while_nats_is_down_and_the_stream_catches_up() {
    let mut nats = Nats::start();
    let server = Server::start(ServerKind::Command, &nats, &[]).await;
    seed(&server, 3, 2).await;
    burst(&server, "before", 50, 4).await;
    assert_mirrored(&nats, &server).await;

    nats.kill();
    server
        .wait_health(
            command_server::RELAY_HEALTH_SERVICE,
            ServingStatus::NotServing,
            Duration::from_secs(10),
        )
        .await;
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        burst(
            &server,
            &format!("down-{}", started.elapsed().as_millis()),
            40,
            4,
        )
        .await;
    }
    let mut log = server.log_reader().await;
    let status = log
        .get_log_status(pb::GetLogStatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert!(!status.nats_connected && status.relay_lag > 0, "{status:?}");
    assert_eq!(server.health("").await, Some(ServingStatus::Serving));

    nats.restart();
    assert_mirrored(&nats, &server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_publishing_leaves_no_gap_and_no_duplicate() {
    let mut nats = Nats::start();
    let mut server = Server::start(ServerKind::Command, &nats, &[]).await;
    seed(&server, 3, 2).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for round in 0..5 {
        // A backlog to publish: written while NATS is away.
        nats.kill();
        burst(&server, &format!("r{round}"), 600, 8).await;
        nats.restart();
        // Kill the command server at random moments while the relay works through it.
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..120))).await;
            server.kill9();
            server.restart().await;
        }
    }
    assert_mirrored(&nats, &server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_stream_is_rebuilt_from_the_log_while_running_or_after_restart() {
    let nats = Nats::start();
    let mut server = Server::start(ServerKind::Command, &nats, &[]).await;
    seed(&server, 3, 2).await;
    burst(&server, "a", 200, 4).await;
    assert_mirrored(&nats, &server).await;

    // Deleted while the server runs (and is idle): noticed and rebuilt.
    let js = async_nats::jetstream::new(nats.client().await);
    js.delete_stream(STREAM).await.expect("delete stream");
    assert_mirrored(&nats, &server).await;

    // Deleted while the server is down: rebuilt after restart.
    server.terminate();
    js.delete_stream(STREAM).await.expect("delete stream");
    server.spawn_until_listening();
    server.wait_serving().await;
    burst(&server, "b", 50, 2).await;
    assert_mirrored(&nats, &server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purged_stream_is_recreated_and_republished() {
    let nats = Nats::start();
    let server = Server::start(ServerKind::Command, &nats, &[]).await;
    seed(&server, 3, 2).await;
    burst(&server, "a", 100, 4).await;
    assert_mirrored(&nats, &server).await;
    let js = async_nats::jetstream::new(nats.client().await);
    js.get_stream(STREAM)
        .await
        .expect("stream")
        .purge()
        .await
        .expect("purge");
    // Sequences cannot be reused: the relay recreates the stream and republishes all.
    eventually(
        Duration::from_secs(20),
        "stream recreated from sequence 1",
        || async {
            let messages = read_stream(&nats, STREAM).await;
            (messages.first().map(|m| m.sequence) == Some(1)).then_some(())
        },
    )
    .await;
    burst(&server, "b", 20, 2).await;
    assert_mirrored(&nats, &server).await;
}

/// A log that is a prefix of the stream (here: empty) is brought up to date from it and
/// serves (SPEC §8); a log that disagrees with the stream is refused in local mode,
/// naming the positions and the command that exports them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_behind_the_stream_catches_up_and_one_that_disagrees_is_refused() {
    let nats = Nats::start();
    let mut a = Server::start(ServerKind::Command, &nats, &[]).await;
    seed(&a, 2, 2).await;
    let a_events = read_whole_log(&mut a.log_reader().await).await;
    let a_position = a_events.len() as u64;
    eventually(Duration::from_secs(10), "published", || async {
        (stream_last_sequence(&nats, STREAM).await == a_position).then_some(())
    })
    .await;
    a.terminate();

    // A fresh log against a stream with history: caught up, then the writer.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut b = Server::new(
        ServerKind::Command,
        &nats.url(),
        dir.path().join("b"),
        dir.path().to_path_buf(),
        &[],
    );
    b.spawn_until_listening();
    b.wait_serving().await;
    assert_eq!(read_whole_log(&mut b.log_reader().await).await, a_events);
    b.terminate();

    // A log as long as the stream but with other events: refused.
    let other_nats = Nats::start();
    let mut c = Server::start(ServerKind::Command, &other_nats, &[]).await;
    seed(&c, 2, 2).await;
    assert_eq!(log_position(&mut c.log_reader().await).await, a_position);
    c.terminate();
    let mut c = Server::new(
        ServerKind::Command,
        &nats.url(),
        c.data_dir.clone(),
        dir.path().to_path_buf(),
        &[],
    );
    c.spawn();
    let status = c
        .wait_exit(Duration::from_secs(20))
        .expect("refuses to start");
    assert!(!status.success());
    let log = c.log();
    assert!(
        log.contains("refusing to start")
            && log.contains("positions 1..=")
            && log.contains("shop-log export"),
        "{log}"
    );

    // The right log still starts.
    a.spawn_until_listening();
    a.wait_serving().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_with_a_conflicting_configuration_is_refused_at_start() {
    let nats = Nats::start();
    let js = async_nats::jetstream::new(nats.client().await);
    js.create_stream(async_nats::jetstream::stream::Config {
        name: STREAM.into(),
        subjects: vec!["shop.events.>".into(), "other.>".into()],
        ..Default::default()
    })
    .await
    .expect("create conflicting stream");
    let log = refused_at_start(&nats, &[]).await;
    assert!(log.contains("subjects"), "{log}");
}

/// Starts a command server with an empty data dir and `args` on `nats`; it must exit
/// with a failure; its log.
async fn refused_at_start(nats: &Nats, args: &[&str]) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = Server::new(
        ServerKind::Command,
        &nats.url(),
        dir.path().join("d"),
        dir.path().to_path_buf(),
        args,
    );
    server.spawn();
    let status = server
        .wait_exit(Duration::from_secs(20))
        .expect("refuses to start");
    assert!(!status.success());
    server.log()
}

/// `--stream-replicas` is checked against an existing stream: one with another replica
/// count is refused, with both counts named, rather than silently used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_with_another_replica_count_is_refused_at_start() {
    let nats = Nats::start();
    let js = async_nats::jetstream::new(nats.client().await);
    js.create_stream(async_nats::jetstream::stream::Config {
        name: STREAM.into(),
        subjects: vec!["shop.events.>".into()],
        num_replicas: 1,
        ..Default::default()
    })
    .await
    .expect("create stream");
    let log = refused_at_start(&nats, &["--stream-replicas", "3"]).await;
    assert!(
        log.contains("1 replica(s), --stream-replicas says 3"),
        "{log}"
    );
}

/// Per order: its cancellations and stock releases in the log.
fn cancellations(events: &[pb::EventEnvelope]) -> (HashMap<String, usize>, HashMap<String, i64>) {
    let mut cancelled = HashMap::new();
    let mut released = HashMap::new();
    for e in events {
        match e.event.as_ref().and_then(|e| e.kind.as_ref()) {
            Some(pb::event::Kind::OrderCancelled(c)) => {
                assert_eq!(c.reason, "customer deleted");
                *cancelled.entry(c.order_id.clone()).or_default() += 1;
            }
            Some(pb::event::Kind::StockReleased(r)) => {
                *released.entry(r.order_id.clone()).or_default() += r.quantity
            }
            _ => {}
        }
    }
    (cancelled, released)
}

async fn policy_scenario(kill_after_delete: bool) {
    let nats = Nats::start();
    let mut server = Server::start(ServerKind::Command, &nats, &[]).await;
    let mut c = server.commands().await;
    c.register_customer(req::register("doomed", "doomed@example.com"))
        .await
        .expect("register");
    c.register_customer(req::register("other", "other@example.com"))
        .await
        .expect("register");
    c.create_product(req::product("pen", 100, 100))
        .await
        .expect("product");
    c.create_product(req::product("ink", 50, 100))
        .await
        .expect("product");
    c.place_order(req::order("open-1", "doomed", &[("pen", 2)]))
        .await
        .expect("order");
    c.place_order(req::order("open-2", "doomed", &[("pen", 1), ("ink", 3)]))
        .await
        .expect("order");
    c.place_order(req::order("paid", "doomed", &[("ink", 4)]))
        .await
        .expect("order");
    c.pay_order(req::pay("paid", 200)).await.expect("pay");
    c.place_order(req::order("shipped", "doomed", &[("pen", 5)]))
        .await
        .expect("order");
    c.pay_order(req::pay("shipped", 500)).await.expect("pay");
    c.ship_order(req::ship("shipped")).await.expect("ship");
    c.place_order(req::order("not-theirs", "other", &[("pen", 1)]))
        .await
        .expect("order");

    let deleted = c
        .delete_customer(pb::DeleteCustomerRequest {
            customer_id: "doomed".into(),
            reason: "closed".into(),
            ..Default::default()
        })
        .await
        .expect("delete")
        .into_inner();
    if kill_after_delete {
        server.kill9();
        server.restart().await;
    }
    let log = server.log_reader().await;
    let events = eventually(
        Duration::from_secs(20),
        "the policy to cancel 3 orders",
        || async {
            let events = read_whole_log(&mut log.clone()).await;
            let (cancelled, _) = cancellations(&events);
            (cancelled.len() == 3).then_some(events)
        },
    )
    .await;
    let delete_event = events
        .iter()
        .find(|e| e.position == deleted.position)
        .expect("delete event");
    for e in events.iter().filter(|e| e.event_type == "OrderCancelled") {
        assert_eq!(
            e.causation_id, delete_event.event_id,
            "caused by the deletion event"
        );
    }
    // Restart once more (the consumer may redeliver): still exactly once.
    server.kill9();
    server.restart().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let events = read_whole_log(&mut server.log_reader().await).await;
    let (cancelled, released) = cancellations(&events);
    let expected: HashMap<String, usize> = ["open-1", "open-2", "paid"]
        .iter()
        .map(|o| (o.to_string(), 1))
        .collect();
    assert_eq!(cancelled, expected);
    let expected: HashMap<String, i64> = [("open-1", 2), ("open-2", 4), ("paid", 4)]
        .iter()
        .map(|(o, q)| (o.to_string(), *q))
        .collect();
    assert_eq!(released, expected, "stock released exactly once per line");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_customer_cancels_exactly_their_open_orders() {
    policy_scenario(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_completes_when_the_server_dies_right_after_the_delete() {
    policy_scenario(true).await;
}

/// Another writer appends to the stream behind the relay's back (a second relay on the
/// same stream, or an operator's publish). The relay's next publish expects the stream
/// to end at the position before it (`Nats-Expected-Last-Sequence`), so the stream
/// refuses it: the log's event never lands at another sequence, and the relay stops with
/// the conflict instead of publishing around it. Commands are still accepted: the log is
/// the source of truth.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_racing_the_relay_is_refused_by_the_stream_never_interleaved() {
    use prost::Message;
    let nats = Nats::start();
    let server = Server::start(ServerKind::Command, &nats, &[]).await;
    seed(&server, 2, 2).await;
    // (Compared by events only, not with the header checks of `assert_mirrored`: this
    // test must fail by what lands in the stream if the relay's expectation is lost.)
    let n = log_position(&mut server.log_reader().await).await;
    eventually(
        Duration::from_secs(30),
        "the stream to catch up",
        || async { (stream_last_sequence(&nats, STREAM).await == n).then_some(()) },
    )
    .await;

    let intruder = pb::EventEnvelope {
        event_id: "intruder-1".into(),
        position: n + 1,
        stream_id: "customer-intruder".into(),
        stream_version: 1,
        event_type: "CustomerRegistered".into(),
        ..Default::default()
    };
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Shop-Event-Id", "intruder-1");
    let js = async_nats::jetstream::new(nats.client().await);
    js.publish_with_headers(
        "shop.events.customer.intruder",
        headers,
        intruder.encode_to_vec().into(),
    )
    .await
    .expect("publish")
    .await
    .expect("stored");

    let mut c = server.commands().await;
    let late = c
        .register_customer(req::register("late", "late@example.com"))
        .await
        .expect("accepted while the stream is not ours")
        .into_inner();
    assert_eq!(late.position, n + 1);
    let events = read_whole_log(&mut server.log_reader().await).await;
    // The relay stops on the conflict; the server starts over, and its start-up check
    // finds a log that holds an event the stream has another one for: with --ack local
    // that event may have been acknowledged, so it refuses to serve and keeps it.
    let mut server = server;
    let status = server
        .wait_exit(Duration::from_secs(30))
        .expect("the server refuses to go on");
    let log_text = server.log();
    assert!(!status.success(), "{log_text}");
    assert!(
        log_text.contains("was not written from this log"),
        "{log_text}"
    );
    assert!(
        log_text.contains("refusing to start") && log_text.contains("shop-log export"),
        "{log_text}"
    );

    // The stream holds the log's first n events at their positions, the intruder at
    // n + 1, and nothing else: no event of the log anywhere but at its own position.
    let messages = read_stream(&nats, STREAM).await;
    let landed: Vec<(u64, &str)> = messages
        .iter()
        .map(|m| (m.sequence, m.envelope.event_id.as_str()))
        .collect();
    assert_eq!(messages.len() as u64, n + 1, "the stream holds {landed:?}");
    let count = usize::try_from(n).expect("small");
    for (m, e) in messages.iter().zip(&events[..count]) {
        assert_eq!(
            (m.sequence, &m.envelope.event_id),
            (e.position, &e.event_id)
        );
    }
    assert_eq!(messages[count].envelope.event_id, "intruder-1");
    assert!(messages
        .iter()
        .all(|m| m.envelope.event_id != events[count].event_id));
}

/// The policy acknowledges a `CustomerDeleted` only once every cancel it caused is
/// durable: the moment the stream shows the message acknowledged, the log already holds
/// every cancel. (Acknowledged earlier, a crash in between would lose the cancels for
/// good: the message would not be redelivered.) The customer has many open orders, so
/// the cancels take long enough that an early acknowledgement is seen while they run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_acknowledges_a_deletion_only_after_its_cancels_are_durable() {
    const ORDERS: usize = 150;
    let nats = Nats::start();
    let server = Server::start(ServerKind::Command, &nats, &[]).await;
    let mut c = server.commands().await;
    c.register_customer(req::register("doomed", "doomed@example.com"))
        .await
        .expect("register");
    c.create_product(req::product("pen", 100, 1_000))
        .await
        .expect("product");
    for i in 0..ORDERS {
        c.place_order(req::order(&format!("o{i}"), "doomed", &[("pen", 1)]))
            .await
            .expect("order");
    }
    let deleted = c
        .delete_customer(pb::DeleteCustomerRequest {
            customer_id: "doomed".into(),
            reason: "closed".into(),
            ..Default::default()
        })
        .await
        .expect("delete")
        .into_inner();

    let js = async_nats::jetstream::new(nats.client().await);
    let acknowledged = eventually(
        Duration::from_secs(60),
        "the policy to acknowledge the deletion",
        || {
            let js = js.clone();
            async move {
                let mut consumer: async_nats::jetstream::consumer::PullConsumer = js
                    .get_consumer_from_stream(command_server::policy::CONSUMER_NAME, STREAM)
                    .await
                    .ok()?;
                let info = consumer.info().await.ok()?;
                (info.ack_floor.stream_sequence >= deleted.position).then_some(())
            }
        },
    );
    acknowledged.await;
    // Read at once: what is durable now was durable when the acknowledgement landed.
    let events = read_whole_log(&mut server.log_reader().await).await;
    let (cancelled, _) = cancellations(&events);
    assert_eq!(
        cancelled.len(),
        ORDERS,
        "the deletion was acknowledged with only {} of {ORDERS} cancels durable",
        cancelled.len()
    );
}

/// `--ack replicated`: a command is answered only once the stream holds its events.
/// With NATS down it fails UNAVAILABLE (reason NOT_REPLICATED) after the timeout and is
/// not acknowledged; its events stay in the log, are relayed when NATS is back, and the
/// same command_id then answers the original result. (`--ack local` answers from the
/// local log with NATS down:
/// `commands_keep_succeeding_while_nats_is_down_and_the_stream_catches_up`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_replicated_answers_only_what_the_stream_holds() {
    let mut nats = Nats::start();
    let replicated = Server::start(
        ServerKind::Command,
        &nats,
        &["--ack", "replicated", "--replicated-ack-timeout-ms", "700"],
    )
    .await;
    let mut c = replicated.commands().await;
    let first = c
        .register_customer(req::register("c1", "c1@example.com"))
        .await
        .expect("register")
        .into_inner();
    assert!(
        stream_last_sequence(&nats, STREAM).await >= first.position,
        "answered before the stream held position {}",
        first.position
    );

    nats.stop();
    let started = std::time::Instant::now();
    let mut request = req::register("c2", "c2@example.com");
    request.command_id = "replicated-c2".into();
    let refused = c
        .register_customer(request.clone())
        .await
        .expect_err("not acknowledged without the stream");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert_eq!(
        shop_tests::reason(&refused).as_deref(),
        Some("NOT_REPLICATED")
    );
    assert!(started.elapsed() >= Duration::from_millis(700));
    let position: u64 = shop_tests::error_metadata(&refused)["position"]
        .parse()
        .expect("position");

    nats.restart();
    let retried = eventually(Duration::from_secs(30), "the retry to be answered", || {
        let mut c = c.clone();
        let request = request.clone();
        async move { c.register_customer(request).await.ok() }
    })
    .await;
    assert_eq!(
        retried
            .metadata()
            .get("shop-replayed")
            .map(|v| v.to_str().ok()),
        Some(Some("true")),
        "the retry is answered from the first attempt's events"
    );
    assert_eq!(retried.into_inner().position, position);
    let log = read_whole_log(&mut replicated.log_reader().await).await;
    assert_eq!(
        log.iter()
            .filter(|e| e.command_id == "replicated-c2")
            .count(),
        1,
        "the command's event is in the log once"
    );
    assert!(stream_last_sequence(&nats, STREAM).await >= position);
}
