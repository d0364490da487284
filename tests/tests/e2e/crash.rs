//! Crash test of the command side (README, Guarantees: acknowledged = durable, one total
//! order, idempotent commands): several clients send commands
//! while the command server is `kill -9`ed at random moments. After each restart, every
//! acknowledged command is in the log with all its events, positions and stream versions
//! are gapless, no command is half-applied, stock invariants hold, and commands retried
//! with the same id after the crash are not applied twice.
//!
//! Rounds: `SHOP_CRASH_ROUNDS` (default 20; set more for a nightly run).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use shop_tests::{pb, read_whole_log, req, Nats, Server, ServerKind};
use tonic::transport::Channel;
use tonic::Code;

use pb::command_service_client::CommandServiceClient;

const CUSTOMERS: usize = 5;
const SKUS: usize = 6;
const PRICE_CENTS: i64 = 100;
const CLIENTS: usize = 4;

fn rounds() -> usize {
    shop_tests::rounds("SHOP_CRASH_ROUNDS", 20)
}

/// A command the workload sends, kept whole so it can be retried verbatim.
#[derive(Debug, Clone)]
enum Cmd {
    Place(pb::PlaceOrderRequest),
    Pay(pb::PayOrderRequest),
    Ship(pb::ShipOrderRequest),
    Cancel(pb::CancelOrderRequest),
    Restock(pb::RestockProductRequest),
}

impl Cmd {
    fn command_id(&self) -> &str {
        match self {
            Cmd::Place(r) => &r.command_id,
            Cmd::Pay(r) => &r.command_id,
            Cmd::Ship(r) => &r.command_id,
            Cmd::Cancel(r) => &r.command_id,
            Cmd::Restock(r) => &r.command_id,
        }
    }

    async fn send(
        &self,
        c: &mut CommandServiceClient<Channel>,
    ) -> Result<pb::CommandResult, tonic::Status> {
        let result = match self.clone() {
            Cmd::Place(r) => c.place_order(r).await,
            Cmd::Pay(r) => c.pay_order(r).await,
            Cmd::Ship(r) => c.ship_order(r).await,
            Cmd::Cancel(r) => c.cancel_order(r).await,
            Cmd::Restock(r) => c.restock_product(r).await,
        };
        result.map(tonic::Response::into_inner)
    }
}

/// Whether a failure leaves the outcome unknown (the server may have died mid-command).
fn uncertain(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable
            | Code::Unknown
            | Code::Cancelled
            | Code::Internal
            | Code::DeadlineExceeded
    )
}

#[derive(Default)]
struct Record {
    /// Acknowledged commands: command id → reply.
    acked: HashMap<String, pb::CommandResult>,
    /// Sent, outcome unknown: to retry after the restart.
    pending: Vec<Cmd>,
}

/// One client: places orders and moves its own orders along, until the server dies.
async fn client_loop(
    server_endpoint: String,
    client: usize,
    round: usize,
    seed: u64,
    record: Arc<Mutex<Record>>,
) {
    let Ok(channel) = Channel::from_shared(server_endpoint)
        .expect("endpoint")
        .connect()
        .await
    else {
        return;
    };
    let mut c = CommandServiceClient::new(channel);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // Orders of this client this round: id → (total, status: 0 placed, 1 paid, 2 closed).
    let mut orders: Vec<(String, i64, u8)> = Vec::new();
    for n in 0.. {
        let command_id = format!("r{round}-c{client}-n{n}");
        let open: Vec<usize> = (0..orders.len()).filter(|&i| orders[i].2 < 2).collect();
        let cmd = if open.is_empty() || rng.random_bool(0.45) {
            let lines = rng.random_range(1..=3);
            let mut skus: Vec<usize> = (0..SKUS).collect();
            let mut chosen = Vec::new();
            for _ in 0..lines {
                let i = rng.random_range(0..skus.len());
                chosen.push((format!("p{}", skus.swap_remove(i)), rng.random_range(1..=3)));
            }
            let lines: Vec<(&str, i64)> = chosen.iter().map(|(s, q)| (s.as_str(), *q)).collect();
            let order_id = format!("o-{command_id}");
            let mut r = req::order(
                &order_id,
                &format!("c{}", rng.random_range(0..CUSTOMERS)),
                &lines,
            );
            r.command_id = command_id;
            Cmd::Place(r)
        } else if rng.random_bool(0.1) {
            Cmd::Restock(pb::RestockProductRequest {
                command_id,
                sku: format!("p{}", rng.random_range(0..SKUS)),
                quantity: rng.random_range(1..=20),
                ..Default::default()
            })
        } else {
            let i = open[rng.random_range(0..open.len())];
            let (id, total, status) = orders[i].clone();
            if rng.random_bool(0.2) {
                Cmd::Cancel(pb::CancelOrderRequest {
                    command_id,
                    ..req::cancel(&id, "crash test")
                })
            } else if status == 0 {
                Cmd::Pay(pb::PayOrderRequest {
                    command_id,
                    ..req::pay(&id, total)
                })
            } else {
                Cmd::Ship(pb::ShipOrderRequest {
                    command_id,
                    ..req::ship(&id)
                })
            }
        };
        match cmd.send(&mut c).await {
            Ok(result) => {
                match &cmd {
                    Cmd::Place(r) => {
                        let total = r.lines.iter().map(|l| l.quantity * PRICE_CENTS).sum();
                        orders.push((r.order_id.clone(), total, 0));
                    }
                    Cmd::Pay(r) => set_status(&mut orders, &r.order_id, 1),
                    Cmd::Ship(r) => set_status(&mut orders, &r.order_id, 2),
                    Cmd::Cancel(r) => set_status(&mut orders, &r.order_id, 2),
                    Cmd::Restock(_) => {}
                }
                record
                    .lock()
                    .expect("record")
                    .acked
                    .insert(cmd.command_id().to_string(), result);
            }
            Err(status) if uncertain(&status) => {
                record.lock().expect("record").pending.push(cmd);
                return;
            }
            // A definite refusal (e.g. insufficient stock): nothing was written.
            Err(_) => {}
        }
    }
}

fn set_status(orders: &mut [(String, i64, u8)], id: &str, status: u8) {
    if let Some(o) = orders.iter_mut().find(|o| o.0 == id) {
        o.2 = status;
    }
}

/// Checks every guarantee against the whole log.
fn verify(events: &[pb::EventEnvelope], acked: &HashMap<String, pb::CommandResult>) {
    // One total order, gapless; stream versions gapless; time never goes back.
    let mut versions: HashMap<&str, u64> = HashMap::new();
    let mut last_micros = i64::MIN;
    for (i, e) in events.iter().enumerate() {
        assert_eq!(
            e.position,
            i as u64 + 1,
            "positions must be 1, 2, 3, ... without gaps"
        );
        let v = versions.entry(&e.stream_id).or_default();
        *v += 1;
        assert_eq!(
            e.stream_version, *v,
            "stream {} versions must be gapless",
            e.stream_id
        );
        let micros = e
            .occurred_at
            .as_ref()
            .map_or(0, shop_shared::events::micros_from_timestamp);
        assert!(
            micros >= last_micros,
            "occurred_at decreased at position {}",
            e.position
        );
        last_micros = micros;
    }
    // Each command's events are contiguous (no command appears twice: retries were not
    // applied again) and complete (never half-applied).
    let mut groups: BTreeMap<&str, Vec<&pb::EventEnvelope>> = BTreeMap::new();
    let mut previous: Option<&str> = None;
    for e in events {
        if previous != Some(e.command_id.as_str()) {
            assert!(
                !groups.contains_key(e.command_id.as_str()),
                "command {} applied twice",
                e.command_id
            );
        }
        groups.entry(&e.command_id).or_default().push(e);
        previous = Some(&e.command_id);
    }
    let lines_of: HashMap<String, usize> = events
        .iter()
        .filter_map(|e| match e.event.as_ref().and_then(|e| e.kind.as_ref()) {
            Some(pb::event::Kind::OrderPlaced(p)) => Some((p.order_id.clone(), p.lines.len())),
            _ => None,
        })
        .collect();
    for group in groups.values() {
        use pb::event::Kind;
        let kinds: Vec<&Kind> = group
            .iter()
            .filter_map(|e| e.event.as_ref().and_then(|e| e.kind.as_ref()))
            .collect();
        match kinds.first() {
            Some(Kind::OrderPlaced(p)) => {
                assert_eq!(
                    kinds.len(),
                    1 + p.lines.len(),
                    "OrderPlaced without all its reservations"
                );
                assert!(kinds[1..]
                    .iter()
                    .all(|k| matches!(k, Kind::StockReserved(_))));
            }
            Some(Kind::OrderShipped(s)) => {
                assert_eq!(
                    kinds.len(),
                    1 + lines_of[&s.order_id],
                    "OrderShipped without all its stock commits"
                );
            }
            Some(Kind::OrderCancelled(c)) => {
                assert_eq!(
                    kinds.len(),
                    1 + lines_of[&c.order_id],
                    "OrderCancelled without all its releases"
                );
            }
            _ => assert_eq!(kinds.len(), 1),
        }
    }
    // Every acknowledged command is there, exactly as acknowledged.
    for (command_id, result) in acked {
        let group = groups
            .get(command_id.as_str())
            .unwrap_or_else(|| panic!("acknowledged command {command_id} lost"));
        assert_eq!(group.len() as u32, result.event_count, "{command_id}");
        let last = group.last().expect("non-empty");
        assert_eq!(last.position, result.position, "{command_id}");
        let own = group
            .iter()
            .rev()
            .find(|e| e.stream_id == result.stream_id)
            .expect("own stream event");
        assert_eq!(own.stream_version, result.version, "{command_id}");
    }
    // Stock invariant after every event.
    let mut stock: HashMap<String, (i64, i64)> = HashMap::new();
    for e in events {
        use pb::event::Kind;
        let Some(kind) = e.event.as_ref().and_then(|e| e.kind.as_ref()) else {
            continue;
        };
        let (sku, d_on_hand, d_reserved) = match kind {
            Kind::ProductCreated(p) => (&p.sku, p.initial_stock, 0),
            Kind::ProductRestocked(p) => (&p.sku, p.quantity, 0),
            Kind::StockReserved(s) => (&s.sku, 0, s.quantity),
            Kind::StockReleased(s) => (&s.sku, 0, -s.quantity),
            Kind::StockCommitted(s) => (&s.sku, -s.quantity, -s.quantity),
            _ => continue,
        };
        let entry = stock.entry(sku.clone()).or_default();
        entry.0 += d_on_hand;
        entry.1 += d_reserved;
        assert!(
            0 <= entry.1 && entry.1 <= entry.0,
            "stock invariant broken for {sku} at position {}: {entry:?}",
            e.position
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_loses_no_acknowledged_command() {
    let nats = Nats::start();
    let mut server = Server::start(ServerKind::Command, &nats, &[]).await;
    {
        let mut c = server.commands().await;
        for i in 0..CUSTOMERS {
            c.register_customer(req::register(
                &format!("c{i}"),
                &format!("c{i}@example.com"),
            ))
            .await
            .expect("register");
        }
        for i in 0..SKUS {
            c.create_product(req::product(&format!("p{i}"), PRICE_CENTS, 200))
                .await
                .expect("product");
        }
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut acked_total: HashMap<String, pb::CommandResult> = HashMap::new();
    let rounds = rounds();
    for round in 0..rounds {
        let record = Arc::new(Mutex::new(Record::default()));
        let mut tasks = Vec::new();
        for client in 0..CLIENTS {
            tasks.push(tokio::spawn(client_loop(
                server.endpoint(),
                client,
                round,
                rng.random(),
                record.clone(),
            )));
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(20..250))).await;
        server.kill9();
        for t in tasks {
            t.await.expect("client task");
        }
        server.restart().await;

        // Retry whatever had no answer, with the same command ids.
        let pending = std::mem::take(&mut record.lock().expect("record").pending);
        let mut c = server.commands().await;
        for cmd in pending {
            match cmd.send(&mut c).await {
                Ok(result) => {
                    record
                        .lock()
                        .expect("record")
                        .acked
                        .insert(cmd.command_id().to_string(), result);
                }
                Err(status) => assert!(
                    !uncertain(&status),
                    "retry after restart failed: {status:?}"
                ),
            }
        }
        acked_total.extend(std::mem::take(&mut record.lock().expect("record").acked));

        let events = read_whole_log(&mut server.log_reader().await).await;
        verify(&events, &acked_total);
    }
    assert!(
        acked_total.len() > rounds * 5,
        "the workload did too little to mean anything: {}",
        acked_total.len()
    );
    let blobs = server.data_dir.join("blobs");
    let blob_count = std::fs::read_dir(&blobs).map(|d| d.count()).unwrap_or(0);
    assert_eq!(
        blob_count, 0,
        "sled wrote unsynced blob files; values must stay below its blob threshold"
    );
}
