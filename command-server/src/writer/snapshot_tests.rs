//! Snapshots written in slices, and restarts after a partly written one.

use std::sync::Arc;
use std::time::{Duration, Instant};

use shop_shared::ids::StreamId;
use tokio::sync::oneshot;

use super::sequencer::Sequencer;
use super::snapshot::SNAPSHOT_SLICES;
use super::{Accepted, CommandMeta, Submission, Work, WriteError};
use crate::domain::{Aggregate, Command, Product, State};
use crate::log::{Durability, EventLog, WriteBatch};

/// The stored state of a product.
fn stored_product(log: &EventLog, stream: &StreamId) -> Option<Product> {
    let bytes = log.state(stream).expect("state")?;
    match Aggregate::decode(stream.kind, &bytes).expect("decode") {
        Aggregate::Product(p) => Some(p),
        other => panic!("not a product: {other:?}"),
    }
}

/// A sequencer whose snapshots the test starts itself.
pub(super) fn sequencer(log: Arc<EventLog>) -> Sequencer {
    let mut sequencer = Sequencer::open(log).expect("sequencer");
    sequencer.last_snapshot = Instant::now() + Duration::from_secs(3600);
    sequencer
}

pub(super) fn submission(command: Command, command_id: &str) -> Submission {
    let (reply, _) = oneshot::channel();
    Submission {
        work: Work::Decide(
            command,
            CommandMeta {
                command_id: command_id.to_string(),
                idempotent: true,
                request_hash: CommandMeta::hash_request(command_id, b""),
                expected_version: None,
                correlation_id: String::new(),
                causation_id: String::new(),
                traceparent: None,
                actor: String::new(),
            },
        ),
        reply,
        queued_at: Instant::now(),
    }
}

fn restock(sku: &str, quantity: i64) -> Command {
    Command::RestockProduct {
        sku: sku.to_string(),
        quantity,
    }
}

/// Decides `commands` as one batch and applies it; the replies.
fn run(
    sequencer: &mut Sequencer,
    commands: Vec<(Command, &str)>,
) -> Vec<Result<Accepted, WriteError>> {
    let submissions = commands
        .into_iter()
        .map(|(c, id)| submission(c, id))
        .collect();
    run_sent(sequencer, submissions)
}

/// A crash while a snapshot was written in slices leaves states (and index chunks,
/// idempotency rows) stored beyond the `derived` mark. The restart's replay must not
/// fold those events into them a second time, nor list them twice.
#[test]
fn restart_after_a_partly_written_snapshot_counts_nothing_twice() {
    let dir = tempfile::tempdir().expect("tempdir");
    let open = || Arc::new(crate::log::open_in_test(dir.path()));
    let sku = "p-1";
    let product = StreamId::product(sku);
    {
        let mut sequencer = sequencer(open());
        let mut commands = vec![(
            Command::CreateProduct {
                sku: sku.to_string(),
                name: "P".into(),
                price_cents: 100,
                initial_stock: 10,
            },
            "create",
        )];
        commands.extend((0..5).map(|i| (restock(sku, 1), ["r0", "r1", "r2", "r3", "r4"][i])));
        assert!(run(&mut sequencer, commands).iter().all(Result::is_ok));
        // A snapshot taken now (on_hand 15, version 6), of which only the first row,
        // the product's state, is stored before the "crash".
        assert!(!sequencer.snapshot_in_progress());
        sequencer.start_snapshot();
        let mut batch = WriteBatch::default();
        sequencer.snapshot.as_mut().expect("started").slice = 1;
        sequencer.write_snapshot(&mut batch, false);
        assert!(sequencer.snapshot_in_progress());
        sequencer.log.write(batch).expect("apply");
        sequencer.log.sync().expect("sync");
        assert_eq!(
            stored_product(&sequencer.log, &product).map(|p| (p.version, p.on_hand)),
            Some((6, 15)),
            "the state is stored beyond derived"
        );
        assert_eq!(sequencer.log.derived_position().expect("derived"), 0);
    }
    let mut sequencer = Sequencer::open(open()).expect("restart");
    assert_eq!(
        sequencer.cache.product(sku).map(|p| (p.version, p.on_hand)),
        Some((6, 15))
    );
    let stored = stored_product(&sequencer.log, &product).expect("stored");
    assert_eq!((stored.version, stored.on_hand), (6, 15));
    assert_eq!(sequencer.log.derived_position().expect("derived"), 6);
    let versions: Vec<u64> = sequencer
        .log
        .read_stream(&product, 1, 100)
        .expect("read")
        .iter()
        .map(|e| e.stream_version)
        .collect();
    assert_eq!(versions, (1..=6).collect::<Vec<_>>());
    // Idempotency survived, and the stream goes on from version 6.
    let replies = run(
        &mut sequencer,
        vec![(restock(sku, 1), "r4"), (restock(sku, 2), "r5")],
    );
    assert!(matches!(&replies[0], Ok(a) if a.replayed && a.result.version == 6));
    assert!(matches!(&replies[1], Ok(a) if !a.replayed && a.result.version == 7));
    assert_eq!(sequencer.cache.product(sku).map(|p| p.on_hand), Some(17));
}

/// `SNAPSHOT_SLICES` slices, the `derived` mark with the last, and idempotency answered from the snapshot while its rows are not stored.
#[test]
fn a_snapshot_is_written_in_slices_and_marks_derived_with_the_last() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = Arc::new(EventLog::open(dir.path(), Durability::Fsync, 8 << 20).expect("open"));
    let mut sequencer = sequencer(log);
    let ids: Vec<String> = (0..600).map(|i| format!("c{i}")).collect();
    let commands = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            (
                Command::CreateProduct {
                    sku: format!("p-{i}"),
                    name: "P".into(),
                    price_cents: 1,
                    initial_stock: 1,
                },
                id.as_str(),
            )
        })
        .collect();
    assert!(run(&mut sequencer, commands).iter().all(Result::is_ok));
    assert!(!sequencer.snapshot_in_progress());
    sequencer.start_snapshot();
    // 600 states, 600 index chunks, 600 idempotency rows.
    let mut slices = 0;
    while sequencer.snapshot_in_progress() {
        assert_eq!(sequencer.log.derived_position().expect("derived"), 0);
        // Answered while being written, before and after its row is stored.
        let replies = run(&mut sequencer, vec![(restock("p-599", 1), "c599")]);
        assert!(matches!(&replies[0], Ok(a) if a.replayed && a.result.position == 600));
        // Index chunks stored beyond `derived` and the tail after it: listed once.
        for sku in ["p-0", "p-599"] {
            let events = sequencer
                .log
                .read_stream(&StreamId::product(sku), 1, 10)
                .expect("read");
            assert_eq!(events.len(), 1, "{sku} while the snapshot is written");
        }
        slices += 1;
    }
    assert_eq!(slices, SNAPSHOT_SLICES);
    assert_eq!(sequencer.log.derived_position().expect("derived"), 600);
    assert!(sequencer.log.command("c0").expect("read").is_some());
}

/// A submission whose request hash is that of `payload` (what a client sent).
fn sent(command: Command, command_id: &str, payload: &[u8]) -> Submission {
    let mut s = submission(command, command_id);
    if let Work::Decide(_, meta) = &mut s.work {
        meta.request_hash = CommandMeta::hash_request("RestockProduct", payload);
    }
    s
}

/// Decides `submissions` as one batch and applies it; the replies.
fn run_sent(
    sequencer: &mut Sequencer,
    submissions: Vec<Submission>,
) -> Vec<Result<Accepted, WriteError>> {
    let mut submissions = submissions;
    let (replies, batch, _) = sequencer.decide_batch(&mut submissions).expect("decide");
    sequencer.log.write(batch).expect("apply");
    sequencer.log.sync().expect("sync");
    replies.into_iter().map(|(_, outcome)| outcome).collect()
}

/// A command id reused for another request is refused, and the same request is answered
/// with the original result, wherever the idempotency record is: pending, in a snapshot
/// being written, stored, and after a restart. Neither appends anything.
#[test]
fn a_reused_command_id_is_refused_and_a_retry_replayed_wherever_the_record_is() {
    let dir = tempfile::tempdir().expect("tempdir");
    let open = || Arc::new(crate::log::open_in_test(dir.path()));
    let create = Command::CreateProduct {
        sku: "p".into(),
        name: "P".into(),
        price_cents: 1,
        initial_stock: 10,
    };
    let check = |sequencer: &mut Sequencer, place: &str| {
        let replies = run_sent(
            sequencer,
            vec![
                sent(restock("p", 5), "r", b"five"),
                sent(restock("p", 1), "r", b"one"),
            ],
        );
        assert!(
            matches!(&replies[0], Err(WriteError::CommandIdReused(id)) if id == "r"),
            "{place}: {:?}",
            replies[0]
        );
        assert!(
            matches!(&replies[1], Ok(a) if a.replayed && a.result.version == 2 && a.result.position == 2),
            "{place}: {:?}",
            replies[1]
        );
        sequencer.cache.load(&StreamId::product("p")).expect("load");
        assert_eq!(
            sequencer.cache.product("p").map(|p| (p.version, p.on_hand)),
            Some((2, 11)),
            "{place}: nothing appended"
        );
        assert_eq!(sequencer.log.last_position().expect("last"), 2, "{place}");
        assert_eq!(sequencer.next_position, 3, "{place}");
    };
    let mut sequencer = sequencer(open());
    assert!(run(&mut sequencer, vec![(create, "create")])[0].is_ok());
    assert!(run_sent(&mut sequencer, vec![sent(restock("p", 1), "r", b"one")])[0].is_ok());
    check(&mut sequencer, "pending");
    sequencer.start_snapshot();
    check(&mut sequencer, "in the snapshot being written");
    let mut batch = WriteBatch::default();
    sequencer.write_snapshot(&mut batch, true);
    sequencer.log.write(batch).expect("apply");
    sequencer.log.sync().expect("sync");
    assert!(!sequencer.snapshot_in_progress());
    assert!(sequencer.log.command("r").expect("read").is_some());
    check(&mut sequencer, "stored");
    drop(sequencer);
    let mut sequencer = self::sequencer(open());
    check(&mut sequencer, "after a restart");
}
