//! One writer, hot standbys, failover (SPEC §8): command servers on one stream, one
//! holding the writer lease in `SHOP_LEASES`, the others following the stream into their
//! own logs.
//!
//! - The writer is `kill -9`ed under load, round after round (`SHOP_FAILOVER_ROUNDS`,
//!   default 20): the standby takes over within a few lease TTLs, the old writer
//!   restarted on its data dir becomes a standby and follows; clients retry unanswered
//!   commands with the same id on whichever server writes. No acknowledged command is
//!   lost or doubled, retried ids get the original result, the logs mirror the stream and
//!   the views equal a fold of it.
//! - A server started with an empty data dir on a stream with history becomes a correct
//!   writer: history, idempotency, email uniqueness and stock intact.
//! - A deposed writer whose log holds events the stream lacks: with `--ack replicated`
//!   it moves them to a quarantine file and follows; with `--ack local` it refuses to
//!   serve and `shop-log export` shows them.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use shop_tests::writers::{writer_of, AnyWriter};
use shop_tests::{
    assert_acknowledged_once, assert_stream_mirrors_log, error_metadata, eventually, log_position,
    pb, read_stream, read_whole_log, reason, req, wait_applied, Nats, Server, ServerKind,
};
use tonic_health::pb::health_check_response::ServingStatus;

use shop_tests::model::{assert_views_equal, fetch_all, Views};

const STREAM: &str = "SHOP_EVENTS";
const CLIENTS: usize = 3;
/// The lease TTL of these tests: a failover takes about one to two of it.
const TTL_MS: u64 = 1000;

fn rounds() -> usize {
    shop_tests::rounds("SHOP_FAILOVER_ROUNDS", 20)
}

fn args(ack: &'static str) -> Vec<&'static str> {
    vec!["--ack", ack, "--lease-ttl-ms", "1000"]
}

/// An acknowledged command: its id, its request, its result, when the answer came and
/// from which server.
type Acked = Vec<(
    String,
    pb::RestockProductRequest,
    pb::CommandResult,
    Instant,
    usize,
)>;

/// A client that restocks its own product with unique command ids, sending each command
/// until it is answered by whichever server writes, with the same command id.
async fn client_loop(
    client: usize,
    endpoints: Vec<String>,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Acked>>,
    retried: Arc<AtomicUsize>,
) {
    let mut writer = AnyWriter::new(endpoints);
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let request = pb::RestockProductRequest {
            command_id: format!("restock-{client}-{n}"),
            sku: format!("k{client}"),
            quantity: 1,
            ..Default::default()
        };
        let give_up = |retries| stop.load(Ordering::Relaxed) && retries > 200;
        let Some(answered) = writer.restock(&request, give_up).await else {
            return;
        };
        if answered.retries > 0 {
            retried.fetch_add(1, Ordering::Relaxed);
        }
        acked.lock().expect("acked").push((
            request.command_id.clone(),
            request,
            answered.result,
            Instant::now(),
            answered.server,
        ));
    }
}

/// `clients` clients of `client_loop` on `servers`: what they share, and their tasks.
struct Load {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Acked>>,
    retried: Arc<AtomicUsize>,
    clients: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(servers: &[Server], clients: usize) -> Load {
        let endpoints: Vec<String> = servers.iter().map(Server::endpoint).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let acked: Arc<Mutex<Acked>> = Arc::default();
        let retried = Arc::new(AtomicUsize::new(0));
        let clients = (0..clients)
            .map(|client| {
                tokio::spawn(client_loop(
                    client,
                    endpoints.clone(),
                    stop.clone(),
                    acked.clone(),
                    retried.clone(),
                ))
            })
            .collect();
        Load {
            stop,
            acked,
            retried,
            clients,
        }
    }

    /// Stops the clients and waits for them.
    async fn finish(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for client in self.clients.drain(..) {
            client.await.expect("client");
        }
    }
}

/// Writer and standby; the writer `kill -9`ed under load, round after round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standby_takes_over_when_the_writer_dies_and_nothing_acknowledged_is_lost() {
    let nats = Nats::start();
    let a = Server::start(ServerKind::Command, &nats, &args("replicated")).await;
    let b = Server::start_standby(&nats.url(), &args("replicated")).await;
    let query = Server::start(ServerKind::Query, &nats, &[]).await;

    // The standby: not serving commands, saying who writes.
    assert_eq!(
        b.health("shop.v1.CommandService").await,
        Some(ServingStatus::NotServing)
    );
    let refused = b
        .commands()
        .await
        .create_product(req::product("x", 1, 1))
        .await
        .expect_err("a standby refuses commands");
    assert_eq!(refused.code(), tonic::Code::Unavailable);
    assert_eq!(reason(&refused).as_deref(), Some("NOT_LEADER"));
    assert_eq!(
        error_metadata(&refused).get("leader"),
        Some(&a.addr()),
        "{refused:?}"
    );
    // Each says what it is in its log status.
    for (server, role) in [(&a, "writer"), (&b, "standby")] {
        let status = server
            .log_reader()
            .await
            .get_log_status(pb::GetLogStatusRequest {})
            .await
            .expect("status")
            .into_inner();
        assert_eq!((status.role.as_str(), status.leader), (role, a.addr()));
    }

    let mut c = a.commands().await;
    for client in 0..CLIENTS {
        c.create_product(req::product(&format!("k{client}"), 100, 0))
            .await
            .expect("product");
    }
    let mut servers = [a, b];
    let mut load = Load::start(&servers, CLIENTS);
    let (acked, retried) = (load.acked.clone(), load.retried.clone());

    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut failovers = Vec::new();
    for round in 0..rounds() {
        let writer = writer_of(&servers).await;
        let before = acked.lock().expect("acked").len();
        eventually(Duration::from_secs(30), "commands under load", || {
            let n = acked.lock().expect("acked").len();
            std::future::ready((n > before + 5).then_some(()))
        })
        .await;
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..300))).await;
        let killed_at = Instant::now();
        servers[writer].kill9();
        // Until the first command acknowledged by the new writer.
        let took = eventually(Duration::from_secs(30), "the standby to take over", || {
            let first = acked
                .lock()
                .expect("acked")
                .iter()
                .find(|a| a.3 > killed_at && a.4 != writer)
                .map(|a| a.3);
            std::future::ready(first.map(|t| t - killed_at))
        })
        .await;
        failovers.push(took);
        assert!(
            took < Duration::from_millis(TTL_MS * 6),
            "round {round}: failover took {took:?}:\n{}",
            servers[1 - writer].log()
        );
        // The old writer comes back on its data dir: a standby that follows.
        servers[writer].spawn_until_listening();
        servers[writer].wait_log_serving().await;
        assert!(!servers[writer].is_writer().await, "round {round}");
    }
    load.finish().await;
    failovers.sort();
    eprintln!(
        "{} failovers: p50 {:?}, max {:?}; {} commands acknowledged, {} after a retry",
        failovers.len(),
        failovers[failovers.len() / 2],
        failovers.last().copied().unwrap_or_default(),
        acked.lock().expect("acked").len(),
        retried.load(Ordering::Relaxed)
    );
    assert!(
        retried.load(Ordering::Relaxed) > 0,
        "no command was retried"
    );

    // The writer's log mirrors the stream; the standby's log catches up with it.
    let writer = writer_of(&servers).await;
    let position = log_position(&mut servers[writer].log_reader().await).await;
    let log = read_whole_log(&mut servers[writer].log_reader().await).await;
    eventually(
        Duration::from_secs(30),
        "the stream to reach the log",
        || async {
            (shop_tests::stream_last_sequence(&nats, STREAM).await >= position).then_some(())
        },
    )
    .await;
    let stream = read_stream(&nats, STREAM).await;
    assert_stream_mirrors_log(&stream, &log);
    let standby = &servers[1 - writer];
    eventually(Duration::from_secs(30), "the standby to follow", || async {
        (log_position(&mut standby.log_reader().await).await == position).then_some(())
    })
    .await;
    assert_eq!(read_whole_log(&mut standby.log_reader().await).await, log);

    // Every acknowledged command is in the log once, at its position.
    let acked = acked.lock().expect("acked").clone();
    assert_acknowledged_once(&log, acked.iter().map(|a| (a.0.as_str(), a.2.position)));
    // A retry of any of them, now, on the writer of the end: the original result.
    let mut c = servers[writer].commands().await;
    for (id, request, result, _, _) in &acked {
        let again = c.restock_product(request.clone()).await.expect("retry");
        assert_eq!(
            again
                .metadata()
                .get("shop-replayed")
                .map(|v| v.to_str().ok()),
            Some(Some("true")),
            "{id}"
        );
        assert_eq!(&again.into_inner(), result, "{id}: the original result");
    }
    // The views equal a fold of the stream, each command once.
    let mut q = query.queries().await;
    wait_applied(&q, position, Duration::from_secs(60)).await;
    assert_views_equal(
        &fetch_all(&mut q, position).await,
        &Views::fold(&log),
        "after the failovers",
    );
}

/// A standby started with an empty data dir on a stream with history follows it (hot),
/// and, once the writer is gone, writes as the old writer would have: the history is
/// there, a retried command id gets the original result, a taken email and stock that
/// was reserved are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_started_empty_becomes_a_correct_writer() {
    let nats = Nats::start();
    let mut a = Server::start(ServerKind::Command, &nats, &args("local")).await;
    let mut c = a.commands().await;
    let mut register = req::register("c1", "ann@shop.test");
    register.command_id = "register-c1".into();
    let registered = c
        .register_customer(register.clone())
        .await
        .expect("register")
        .into_inner();
    c.create_product(req::product("p1", 500, 3))
        .await
        .expect("product");
    let mut order = req::order("o1", "c1", &[("p1", 2)]);
    order.command_id = "order-o1".into();
    let placed = c
        .place_order(order.clone())
        .await
        .expect("order")
        .into_inner();
    for i in 0..200 {
        c.register_customer(req::register(&format!("x{i}"), &format!("x{i}@shop.test")))
            .await
            .expect("register");
    }
    let b = Server::start_standby(&nats.url(), &args("local")).await;
    let history = read_whole_log(&mut a.log_reader().await).await;
    // Hot: the standby's log follows the writer's, and answers log reads.
    eventually(
        Duration::from_secs(30),
        "the standby to catch up",
        || async { (read_whole_log(&mut b.log_reader().await).await == history).then_some(()) },
    )
    .await;
    c.register_customer(req::register("late", "late@shop.test"))
        .await
        .expect("one more, followed at once");
    let history = read_whole_log(&mut a.log_reader().await).await;
    eventually(Duration::from_secs(10), "the standby to follow", || async {
        (read_whole_log(&mut b.log_reader().await).await == history).then_some(())
    })
    .await;

    a.kill9();
    b.wait_serving().await;
    assert!(b.log().contains("took over as the writer"), "{}", b.log());
    let mut c = b.commands().await;
    // A retried id: the original result, replayed; the same id for another request: no.
    let again = c.register_customer(register.clone()).await.expect("retry");
    assert_eq!(again.into_inner(), registered);
    let again = c.place_order(order.clone()).await.expect("retry");
    assert_eq!(again.into_inner(), placed);
    let mut reused = req::register("c9", "zed@shop.test");
    reused.command_id = "register-c1".into();
    let refused = c.register_customer(reused).await.expect_err("reused id");
    assert_eq!(refused.code(), tonic::Code::AlreadyExists, "{refused:?}");
    // Email uniqueness and stock (3, 2 reserved) as the old writer left them.
    let taken = c
        .register_customer(req::register("c2", "ann@shop.test"))
        .await
        .expect_err("taken email");
    assert_eq!(taken.code(), tonic::Code::AlreadyExists, "{taken:?}");
    let oversold = c
        .place_order(req::order("o2", "c1", &[("p1", 2)]))
        .await
        .expect_err("only one left");
    assert_eq!(
        oversold.code(),
        tonic::Code::FailedPrecondition,
        "{oversold:?}"
    );
    c.place_order(req::order("o3", "c1", &[("p1", 1)]))
        .await
        .expect("the last one");
    // The history is intact and goes on gaplessly.
    let log = read_whole_log(&mut b.log_reader().await).await;
    assert_eq!(log[..history.len()], history[..]);
    let positions: Vec<u64> = log.iter().map(|e| e.position).collect();
    assert_eq!(positions, (1..=log.len() as u64).collect::<Vec<_>>());
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).expect("copy");
        }
    }
}

/// A log that holds the stream's first events and then events the stream does not have
/// (a writer cut off from the stream while another took over): `history` events in
/// both, then `theirs` on the stream (from the writer now serving, returned) and `ours`
/// in the old log (its data dir, stopped).
async fn deposed_writer(nats: &Nats, ack: &'static str) -> (Server, Server, Vec<String>) {
    let mut a = Server::start(ServerKind::Command, nats, &args(ack)).await;
    let mut c = a.commands().await;
    for i in 0..5 {
        c.register_customer(req::register(&format!("h{i}"), &format!("h{i}@shop.test")))
            .await
            .expect("history");
    }
    let position = log_position(&mut a.log_reader().await).await;
    eventually(Duration::from_secs(10), "published", || async {
        (shop_tests::stream_last_sequence(nats, STREAM).await == position).then_some(())
    })
    .await;
    a.terminate();
    // The old writer's copy goes on alone against another NATS (cut off from this one).
    let old = Server::in_temp_dir(ServerKind::Command, &nats.url(), &args(ack));
    copy_dir(&a.data_dir, &old.data_dir);
    // Meanwhile the other server writes the stream on.
    a.spawn_until_listening();
    a.wait_serving().await;
    let mut c = a.commands().await;
    for i in 0..3 {
        c.register_customer(req::register(&format!("t{i}"), &format!("t{i}@shop.test")))
            .await
            .expect("theirs");
    }
    let elsewhere = Nats::start();
    let mut old = old;
    old.set_nats_url(&elsewhere.url());
    old.spawn_until_listening();
    old.wait_serving().await;
    let mut ours = Vec::new();
    let mut c = old.commands().await;
    for i in 0..4 {
        let mut request = req::register(&format!("o{i}"), &format!("o{i}@shop.test"));
        request.command_id = format!("ours-{i}");
        c.register_customer(request).await.expect("ours");
        ours.push(format!("ours-{i}"));
    }
    old.terminate();
    old.set_nats_url(&nats.url());
    (a, old, ours)
}

/// `--ack replicated`: the deposed writer's events beyond the stream were never
/// acknowledged; it moves them to a quarantine file and follows the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposed_writer_quarantines_its_unacknowledged_tail_with_ack_replicated() {
    let nats = Nats::start();
    let (writer, mut old, ours) = deposed_writer(&nats, "replicated").await;
    old.spawn_until_listening();
    old.wait_log_serving().await;
    let position = log_position(&mut writer.log_reader().await).await;
    eventually(
        Duration::from_secs(20),
        "the old writer to follow",
        || async { (log_position(&mut old.log_reader().await).await == position).then_some(()) },
    )
    .await;
    assert_eq!(
        read_whole_log(&mut old.log_reader().await).await,
        read_whole_log(&mut writer.log_reader().await).await
    );
    assert!(!old.is_writer().await);
    let log = old.log();
    assert!(log.contains("quarantine"), "{log}");
    // The quarantine file holds exactly its own events, readable with shop-log.
    let dir = old.data_dir.join("quarantine");
    let files: Vec<_> = std::fs::read_dir(&dir)
        .expect("quarantine dir")
        .map(|e| e.expect("entry").path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let shown = shop_log(&["quarantine", files[0].to_str().expect("path")]);
    let ids = command_ids(&shown);
    assert_eq!(ids, ours, "{shown}");
}

/// `--ack local`: the deposed writer's events beyond the stream may have been
/// acknowledged: it refuses to serve, keeps them, and `shop-log export` shows them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposed_writer_refuses_to_serve_with_ack_local_and_its_tail_is_exported() {
    let nats = Nats::start();
    let (_writer, mut old, ours) = deposed_writer(&nats, "local").await;
    let before = std::fs::metadata(old.data_dir.join("db"))
        .expect("db")
        .len();
    old.spawn();
    let status = old
        .wait_exit(Duration::from_secs(20))
        .expect("refuses to serve");
    assert!(!status.success());
    let log = old.log();
    let from = 6; // after the 5 events of the shared history
    assert!(
        log.contains(&format!("positions {from}..=")) && log.contains("shop-log export"),
        "{log}"
    );
    assert!(
        std::fs::metadata(old.data_dir.join("db"))
            .expect("db")
            .len()
            >= before
    );
    let shown = shop_log(&[
        "export",
        "--data-dir",
        old.data_dir.to_str().expect("path"),
        "--from",
        &from.to_string(),
    ]);
    assert_eq!(command_ids(&shown), ours, "{shown}");
    assert!(
        shown.contains("o3@shop.test"),
        "payloads are shown: {shown}"
    );
}

/// Runs `shop-log` with `args`; its stdout.
fn shop_log(args: &[&str]) -> String {
    let output = std::process::Command::new(shop_tests::bin_dir().join("shop-log"))
        .args(args)
        .output()
        .expect("run shop-log");
    assert!(
        output.status.success(),
        "shop-log {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf-8")
}

/// The distinct command ids of `shop-log`'s JSON lines, in order.
fn command_ids(json_lines: &str) -> Vec<String> {
    let mut ids: Vec<String> = Vec::new();
    for line in json_lines.lines() {
        let value: serde_json::Value = serde_json::from_str(line).expect("JSON line");
        let id = value["commandId"].as_str().unwrap_or_default().to_string();
        if ids.last() != Some(&id) {
            ids.push(id);
        }
    }
    ids
}

/// A writer stopped cleanly releases its lease once its relay published everything: a
/// standby takes over at its next check, long before the lease would have expired, with
/// every event the old writer acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_stopped_cleanly_hands_over_without_waiting_for_its_lease_to_expire() {
    let nats = Nats::start();
    let slow = ["--lease-ttl-ms", "20000"];
    let mut a = Server::start(ServerKind::Command, &nats, &slow).await;
    let b = Server::start_standby(&nats.url(), &slow).await;
    let mut c = a.commands().await;
    for i in 0..50 {
        c.register_customer(req::register(&format!("c{i}"), &format!("c{i}@shop.test")))
            .await
            .expect("register");
    }
    let log = read_whole_log(&mut a.log_reader().await).await;
    let stopped = Instant::now();
    assert!(a.terminate().is_some_and(|s| s.success()));
    b.wait_serving().await;
    let took = stopped.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "took {took:?}: the lease was not released"
    );
    assert_eq!(read_whole_log(&mut b.log_reader().await).await, log);
}

/// A server that claims the lease with its log behind the stream (here: empty, the
/// writer gone cleanly, so it claims at once) writes only after it caught up: its first
/// command lands after the whole stream, never in the middle of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_claims_the_lease_behind_the_stream_catches_up_before_it_writes() {
    const EVENTS: usize = 1500;
    let nats = Nats::start();
    let mut a = Server::start(ServerKind::Command, &nats, &args("local")).await;
    let mut tasks = Vec::new();
    for t in 0..6 {
        let mut c = a.commands().await;
        tasks.push(tokio::spawn(async move {
            for i in (t..EVENTS).step_by(6) {
                c.register_customer(req::register(&format!("c{i}"), &format!("c{i}@shop.test")))
                    .await
                    .expect("register");
            }
        }));
    }
    for task in tasks {
        task.await.expect("writer task");
    }
    let history = read_whole_log(&mut a.log_reader().await).await;
    assert!(a.terminate().is_some_and(|s| s.success()));
    let mut b = Server::in_temp_dir(ServerKind::Command, &nats.url(), &args("local"));
    b.spawn_until_listening();
    b.wait_serving().await;
    let first = b
        .commands()
        .await
        .register_customer(req::register("new", "new@shop.test"))
        .await
        .expect("the first command of the new writer")
        .into_inner();
    assert_eq!(first.position, EVENTS as u64 + 1, "{}", b.log());
    let log = read_whole_log(&mut b.log_reader().await).await;
    assert_eq!(log[..EVENTS], history[..]);
    // Not by luck or a second attempt: it took over once, caught up, never restarted (a
    // writer that wrote behind the stream would find it disagreeing and start over).
    let text = b.log();
    assert_eq!(text.matches("took over as the writer").count(), 1, "{text}");
    assert!(!text.contains("restarting"), "{text}");
}

/// The customer-deleted policy runs on the writer only: with a standby following, a
/// deleted customer's open orders are cancelled exactly once, by the writer, and the
/// standby's log is the writer's (a standby running the policy would decide commands
/// into its own log, apart from the stream). After a failover the new writer runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_runs_on_the_writer_only() {
    let nats = Nats::start();
    let mut a = Server::start(ServerKind::Command, &nats, &args("local")).await;
    let b = Server::start_standby(&nats.url(), &args("local")).await;
    let cancels_of = |log: &[pb::EventEnvelope], customer: &str| {
        log.iter()
            .filter(|e| e.event_type == "OrderCancelled" && e.stream_id.contains(customer))
            .count()
    };
    for (round, server) in ["first", "second"].into_iter().enumerate() {
        let writer = if round == 0 { &a } else { &b };
        let mut c = writer.commands().await;
        let customer = format!("gone-{server}");
        c.register_customer(req::register(&customer, &format!("{customer}@shop.test")))
            .await
            .expect("register");
        c.create_product(req::product(&format!("p-{server}"), 100, 100))
            .await
            .expect("product");
        for i in 0..3 {
            c.place_order(req::order(
                &format!("{customer}-o{i}"),
                &customer,
                &[(format!("p-{server}").as_str(), 1)],
            ))
            .await
            .expect("order");
        }
        c.delete_customer(pb::DeleteCustomerRequest {
            customer_id: customer.clone(),
            reason: "asked".into(),
            ..Default::default()
        })
        .await
        .expect("delete");
        eventually(Duration::from_secs(20), "the policy's cancels", || async {
            let log = read_whole_log(&mut writer.log_reader().await).await;
            (cancels_of(&log, &customer) >= 3).then_some(())
        })
        .await;
        // Quiet for a moment: nothing more comes, from either server.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let log = read_whole_log(&mut writer.log_reader().await).await;
        assert_eq!(
            cancels_of(&log, &customer),
            3,
            "round {round}: cancelled once each"
        );
        let standby = if round == 0 { &b } else { &a };
        eventually(Duration::from_secs(20), "the standby to follow", || async {
            (read_whole_log(&mut standby.log_reader().await).await == log).then_some(())
        })
        .await;
        if round == 0 {
            a.kill9();
            b.wait_serving().await;
            a.spawn_until_listening();
            a.wait_log_serving().await;
        }
    }
}

/// A standby never runs the policy, even when nobody else does (the writer here has
/// `--no-policy`): a deleted customer's orders stay open, and the standby's log stays
/// the writer's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_never_runs_the_policy() {
    let nats = Nats::start();
    let mut no_policy = args("local");
    no_policy.push("--no-policy");
    let a = Server::start(ServerKind::Command, &nats, &no_policy).await;
    let b = Server::start_standby(&nats.url(), &args("local")).await;
    let mut c = a.commands().await;
    c.register_customer(req::register("gone", "gone@shop.test"))
        .await
        .expect("register");
    c.create_product(req::product("p", 100, 100))
        .await
        .expect("product");
    c.place_order(req::order("o", "gone", &[("p", 1)]))
        .await
        .expect("order");
    c.delete_customer(pb::DeleteCustomerRequest {
        customer_id: "gone".into(),
        reason: "asked".into(),
        ..Default::default()
    })
    .await
    .expect("delete");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let log = read_whole_log(&mut a.log_reader().await).await;
    assert_eq!(
        log.last().map(|e| e.event_type.as_str()),
        Some("CustomerDeleted")
    );
    eventually(Duration::from_secs(10), "the standby to follow", || async {
        (read_whole_log(&mut b.log_reader().await).await == log).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(read_whole_log(&mut b.log_reader().await).await, log);
}

/// The production shape: a 3-node NATS cluster, the stream and the lease bucket at three
/// replicas, `--ack replicated`, a writer and a standby. The writer is `kill -9`ed, and
/// so is the stream's leader node, under load: nothing acknowledged is lost or doubled,
/// and the logs mirror the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writer_failover_on_a_three_node_cluster_loses_nothing_acknowledged() {
    let mut cluster = shop_tests::cluster::NatsCluster::start().await;
    let urls = cluster.urls();
    let mut flags = args("replicated");
    flags.extend(["--stream-replicas", "3"]);
    let a = Server::start_on(ServerKind::Command, &urls, &flags).await;
    let b = Server::start_standby(&urls, &flags).await;
    a.commands()
        .await
        .create_product(req::product("k0", 100, 0))
        .await
        .expect("product");
    let mut servers = [a, b];
    let mut load = Load::start(&servers, 1);
    let acked = load.acked.clone();
    let progress = |what: &'static str| {
        let acked = acked.clone();
        async move {
            let before = acked.lock().expect("acked").len();
            eventually(Duration::from_secs(60), what, || {
                let n = acked.lock().expect("acked").len();
                std::future::ready((n > before + 10).then_some(()))
            })
            .await;
        }
    };
    progress("commands under load").await;
    for round in 0..2 {
        let writer = writer_of(&servers).await;
        servers[writer].kill9();
        progress("the standby to take over").await;
        servers[writer].spawn_until_listening();
        servers[writer].wait_log_serving().await;
        let leader = eventually(Duration::from_secs(30), "a stream leader", || {
            cluster.stream_leader(STREAM)
        })
        .await;
        cluster.kill(leader);
        progress("commands with a node down").await;
        cluster.restart(leader);
        eprintln!("round {round}: writer {writer} and NATS node {leader} killed");
    }
    load.finish().await;

    let writer = writer_of(&servers).await;
    let log = read_whole_log(&mut servers[writer].log_reader().await).await;
    let client = cluster.client().await;
    shop_tests::assert_stream_holds_log(&client, STREAM, &log, Duration::from_secs(60)).await;
    let acked = acked.lock().expect("acked").clone();
    assert_acknowledged_once(&log, acked.iter().map(|a| (a.0.as_str(), a.2.position)));
    let standby = &servers[1 - writer];
    eventually(Duration::from_secs(60), "the standby to follow", || async {
        (read_whole_log(&mut standby.log_reader().await).await == log).then_some(())
    })
    .await;
}

/// A writer that dies between two publishes of one command leaves its first part at the
/// end of the stream. The new writer finishes it from the rest the first event carries
/// (`Shop-Command-Rest`) before it decides anything: the whole command, byte for byte
/// as the old writer wrote it, and a retry of its id answered the original result.
/// (Here the dead writer's stream is rebuilt on a second NATS up to the middle of an
/// order; the chaos runner's `failover` trials kill writers at such moments.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_writer_finishes_the_command_its_predecessor_left_half_published() {
    let nats = Nats::start();
    let mut a = Server::start(ServerKind::Command, &nats, &args("replicated")).await;
    let mut c = a.commands().await;
    c.register_customer(req::register("c1", "ann@shop.test"))
        .await
        .expect("register");
    for sku in ["p1", "p2", "p3"] {
        c.create_product(req::product(sku, 500, 3))
            .await
            .expect("product");
    }
    let mut order = req::order("o1", "c1", &[("p1", 2), ("p2", 1), ("p3", 3)]);
    order.command_id = "order-o1".into();
    let placed = c
        .place_order(order.clone())
        .await
        .expect("order")
        .into_inner();
    a.kill9();
    let written = read_stream(&nats, STREAM).await;
    assert_eq!(written.len() as u64, placed.position);
    // OrderPlaced and three StockReserved; the first carries the other three.
    let first = placed.position - 3;
    let source = async_nats::jetstream::new(nats.client().await)
        .get_stream(STREAM)
        .await
        .expect("stream");
    let mut raw = Vec::new();
    for sequence in 1..=placed.position {
        raw.push(source.get_raw_message(sequence).await.expect("message"));
    }
    let rest = |m: &async_nats::jetstream::message::StreamMessage| {
        m.headers
            .get(shop_shared::subjects::HEADER_COMMAND_REST)
            .map(|v| shop_shared::subjects::parse_command_rest(v.as_str()).expect("rest"))
    };
    let carried = rest(&raw[first as usize - 1]).expect("the order's first event carries the rest");
    let others: Vec<bytes::Bytes> = raw[first as usize..]
        .iter()
        .map(|m| m.payload.clone())
        .collect();
    assert_eq!(carried, others);
    assert!(
        raw.iter()
            .enumerate()
            .all(|(i, m)| (i as u64 + 1 == first) == rest(m).is_some()),
        "only the first event of a command with more than one carries a rest"
    );

    // The stream as a writer killed after the order's second publish left it.
    let other = Nats::start();
    let js = async_nats::jetstream::new(other.client().await);
    js.create_stream(command_server::relay::stream_config(STREAM, 1))
        .await
        .expect("create stream");
    for m in &raw[..first as usize + 1] {
        js.publish_with_headers(m.subject.clone(), m.headers.clone(), m.payload.clone())
            .await
            .expect("publish")
            .await
            .expect("stored");
    }
    let b = Server::start_standby(&other.url(), &args("replicated")).await;
    b.wait_serving().await;
    assert!(
        b.log().contains("left a command half published"),
        "{}",
        b.log()
    );
    let mut c = b.commands().await;
    let again = c.place_order(order).await.expect("retry");
    assert_eq!(again.into_inner(), placed, "the original result, replayed");
    // The stream and the new writer's log hold the whole order, as the old writer wrote it.
    let repaired = read_stream(&other, STREAM).await;
    let envelopes = |messages: &[shop_tests::StreamMessage]| -> Vec<pb::EventEnvelope> {
        messages.iter().map(|m| m.envelope.clone()).collect()
    };
    assert_eq!(envelopes(&repaired), envelopes(&written));
    let log = read_whole_log(&mut b.log_reader().await).await;
    assert_eq!(log, envelopes(&written));
    // Stock reserved by the whole order: p3 had 3, all reserved.
    let oversold = c
        .place_order(req::order("o2", "c1", &[("p3", 1)]))
        .await
        .expect_err("p3 is all reserved");
    assert_eq!(
        oversold.code(),
        tonic::Code::FailedPrecondition,
        "{oversold:?}"
    );
}
