//! The checker, run after every trial once the load has stopped: every guarantee of
//! SPEC §2 that a fault could break, against what the clients were told.
//!
//! - every acknowledged command is in the log exactly once, whole (its events at
//!   consecutive positions ending at the position it was answered with);
//! - an unanswered command is there at most once;
//! - positions are gapless;
//! - the stream holds the log: sequence = position, the same bytes;
//! - a standby's log equals the writer's;
//! - the query server's views equal an independent fold of the log;
//! - resent acknowledged commands get their original result (idempotency across
//!   restarts and failovers).
//!
//! A check that fails panics with what it found (the harness's helpers assert); the
//! runner turns the panic into a violation.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::Rng;
use shop_tests::model::{assert_views_equal, fetch_all, Views};
use shop_tests::pb::log_service_client::LogServiceClient;
use shop_tests::writers::{writer_of, AnyWriter, Command, Sent};
use shop_tests::{assert_stream_holds_log, eventually, try_read_whole_log};

use crate::load::Acked;
use crate::world::{World, STREAM};

/// Runs every check; panics on the first violation.
pub async fn check(world: &World, rng: &mut StdRng) {
    let (acked, unanswered, refused) = {
        let ledger = world.clients.ledger.lock().expect("ledger");
        (
            ledger.acked.clone(),
            ledger.unanswered.clone(),
            ledger.refused.clone(),
        )
    };
    assert!(refused.is_empty(), "commands refused: {refused:?}");
    let (writer, log) = settled_log(world).await;

    for (i, e) in log.iter().enumerate() {
        assert_eq!(e.position, i as u64 + 1, "positions must be gapless");
    }
    let mut by_command: HashMap<&str, Vec<u64>> = HashMap::new();
    for e in &log {
        by_command
            .entry(&e.command_id)
            .or_default()
            .push(e.position);
    }
    for (id, positions) in &by_command {
        assert!(
            positions.windows(2).all(|w| w[1] == w[0] + 1),
            "command {id} has events at {positions:?}: written twice or torn"
        );
    }
    for a in &acked {
        let id = a.command.id();
        let n = u64::from(a.result.event_count);
        let expected: Vec<u64> = (a.result.position + 1 - n..=a.result.position).collect();
        assert_eq!(
            by_command.get(id),
            Some(&expected),
            "acknowledged {id} (answered {:?}) must be in the log exactly once, whole",
            a.result
        );
    }
    for c in &unanswered {
        let written = by_command.get(c.id()).map_or(0, Vec::len);
        assert!(
            written == 0 || written == events_of(c),
            "unanswered {} must be in the log at most once, whole: {written} events",
            c.id()
        );
    }

    // The stream holds the log (the relay may still be publishing its tail).
    let client = world.bus.client().await;
    assert_stream_holds_log(&client, STREAM, &log, Duration::from_secs(60)).await;

    // A standby follows.
    for (i, s) in world.commands.iter().enumerate() {
        if i != writer {
            eventually(Duration::from_secs(60), "the standby to follow", || async {
                // It may be restarting (a deposed writer cutting its tail): asked again.
                let standby = try_read_whole_log(&mut log_reader(s)).await.ok()?;
                (standby == log).then_some(())
            })
            .await;
        }
    }

    // The views.
    let last = log.len() as u64;
    let mut q = world.query.queries().await;
    shop_tests::wait_applied(&q, last, Duration::from_secs(60)).await;
    let views = fetch_all(&mut q, last).await;
    assert_views_equal(&views, &Views::fold(&log), "views after the trial");

    // Idempotency: the last commands and a sample of the rest, resent.
    let mut sample: Vec<&Acked> = acked.iter().rev().take(5).collect();
    for _ in 0..10.min(acked.len()) {
        sample.push(&acked[rng.random_range(0..acked.len())]);
    }
    let endpoints = world.commands.iter().map(|s| s.endpoint()).collect();
    let mut any = AnyWriter::new(endpoints);
    for a in sample {
        match any.send(&a.command, |retries| retries > 500).await {
            Sent::Answered(again) => assert_eq!(
                again.result,
                a.result,
                "{} resent must get its original result",
                a.command.id()
            ),
            other => panic!("{} resent: {other:?}", a.command.id()),
        }
    }
}

/// How long one server must have been the writer before its log is read, when there are
/// several: after a fault a deposed writer may still restart (and cut an unacknowledged
/// tail), and a lease may still change hands.
const SETTLED: Duration = Duration::from_secs(3);

/// The writer, once it has been the same server for [`SETTLED`] (when there are several)
/// and still is after its log was read, and that log. A server restarting meanwhile (its port closed for a
/// moment) is waited out, up to the world's patience.
async fn settled_log(world: &World) -> (usize, Vec<shop_tests::pb::EventEnvelope>) {
    let deadline = Instant::now() + world.patience();
    let settled = if world.commands.len() > 1 {
        SETTLED
    } else {
        Duration::ZERO
    };
    let mut held: Option<(usize, Instant)> = None;
    loop {
        assert!(
            Instant::now() < deadline,
            "no writer held for {SETTLED:?} within {:?}",
            world.patience()
        );
        let now = writer_of(&world.commands).await;
        match held {
            Some((w, since)) if w == now && since.elapsed() >= settled => {
                let server = &world.commands[w];
                if let Ok(log) = try_read_whole_log(&mut log_reader(server)).await {
                    if server.is_writer().await {
                        return (w, log);
                    }
                }
                held = None;
            }
            Some((w, _)) if w == now => {}
            _ => held = Some((now, Instant::now())),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A LogService client that connects when first used (and again after a restart).
fn log_reader(server: &shop_tests::Server) -> LogServiceClient<tonic::transport::Channel> {
    let channel = tonic::transport::Channel::from_shared(server.endpoint())
        .expect("endpoint")
        .connect_lazy();
    LogServiceClient::new(channel)
}

/// How many events a command of the load appends.
fn events_of(command: &Command) -> usize {
    match command {
        Command::Restock(_) | Command::Register(_) => 1,
        Command::PlaceOrder(order) => 1 + order.lines.len(),
    }
}
