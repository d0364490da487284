//! A crash at every point of what the writer writes. The log writes a batch's rows one
//! insert at a time, and sled recovers a prefix of its inserts (see `log/mod.rs`, Crash
//! safety), so what a crash can leave is exactly a prefix of the rows of the batches
//! written so far. These tests write every such prefix into a fresh log, restart the
//! sequencer on it, and check what recovery must give: whole commands only, gapless
//! positions, indexes and states equal to a fold of the events, idempotency intact, and
//! a writer that decides on the right indexes afterwards.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use prost::Message;
use shop_shared::pb;

use super::sequencer::Sequencer;
use super::snapshot_tests::{sequencer, submission};
use super::{Accepted, WriteError};
use crate::domain::testing::{create_product, place, register, Memory};
use crate::domain::{
    Aggregate, Command, DomainError, State, EMAILS, OPEN_ORDERS, SHIPMENTS_BY_ORDER,
};
use crate::log::{open_in_test, EventLog, IndexName, WriteBatch};

fn product(sku: &str) -> Command {
    create_product(sku, 250, 100)
}

/// Batches of commands. `c-b` registers x@shop.test, is deleted, and `c-a` takes the
/// email in the same batch: a snapshot written in stream order stores `c-a`'s state
/// before `c-b`'s, so some cuts keep the new owner's state beyond `derived` while the
/// replay deletes the old one (the case where a replayed index change is overwritten by
/// one that is skipped).
fn workload() -> Vec<Vec<(Command, String)>> {
    vec![
        vec![
            (product("p1"), "k1".to_string()),
            (product("p2"), "k2".to_string()),
            (register("c-b", "x@shop.test"), "k3".to_string()),
            (register("c-c", "y@shop.test"), "k4".to_string()),
        ],
        vec![
            (place("o1", "c-b", &[("p1", 2)]), "k5".to_string()),
            (
                place("o2", "c-c", &[("p1", 1), ("p2", 3)]),
                "k6".to_string(),
            ),
            (
                Command::RestockProduct {
                    sku: "p1".into(),
                    quantity: 5,
                },
                "k7".to_string(),
            ),
        ],
        vec![
            (
                Command::CancelOrder {
                    order_id: "o1".into(),
                    reason: "changed mind".into(),
                },
                "k8".to_string(),
            ),
            (
                Command::DeleteCustomer {
                    customer_id: "c-b".into(),
                    reason: "asked".into(),
                },
                "k9".to_string(),
            ),
            (register("c-a", "x@shop.test"), "k10".to_string()),
            // Refused: the email is taken again. Writes nothing.
            (register("c-d", "y@shop.test"), "k11".to_string()),
        ],
        vec![
            (
                Command::PayOrder {
                    order_id: "o2".into(),
                    amount_cents: 1000,
                    payment_ref: "pay-1".into(),
                },
                "k12".to_string(),
            ),
            (
                Command::ShipOrder {
                    order_id: "o2".into(),
                    tracking: "t-1".into(),
                },
                "k13".to_string(),
            ),
            (place("o3", "c-a", &[("p2", 1)]), "k14".to_string()),
        ],
        vec![
            (
                Command::CreateShipment {
                    shipment_id: "s1".into(),
                    order_id: "o2".into(),
                    carrier: "ACME".into(),
                    tracking_code: "T1".into(),
                },
                "k15".to_string(),
            ),
            (
                Command::RenameCustomer {
                    customer_id: "c-a".into(),
                    name: "Ann".into(),
                },
                "k16".to_string(),
            ),
        ],
        // More than one commit record's worth, of one- and three-event commands: the
        // batch is cut between records too, and a record must never split a command.
        (0..ORDERS)
            .map(|i| {
                let order = format!("o-r{i}");
                let lines: &[(&str, i64)] = if i % 2 == 0 {
                    &[("p1", 1), ("p2", 1)]
                } else {
                    &[("p2", 1)]
                };
                (place(&order, "c-c", lines), order)
            })
            .collect(),
    ]
}

/// Orders of two and three events in the last batch of the workload (about three
/// commit records).
const ORDERS: usize = 40;

/// Runs the workload, starting snapshots written a few rows per batch part-way, and
/// returns every row written in order, with the accepted commands' results by id (in
/// acceptance order).
fn written_rows() -> (WriteBatch, Vec<(String, pb::CommandResult)>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sequencer = sequencer(Arc::new(open_in_test(dir.path())));
    let mut all = WriteBatch::default();
    let mut accepted = Vec::new();
    let mut decide = |sequencer: &mut Sequencer, commands: Vec<(Command, String)>| {
        let mut submissions: Vec<super::Submission> = commands
            .into_iter()
            .map(|(command, id)| submission(command, &id))
            .collect();
        let ids: Vec<String> = submissions_ids(&submissions);
        let (replies, batch, _) = sequencer.decide_batch(&mut submissions).expect("decide");
        sequencer.log.write(batch.clone()).expect("write");
        all.extend(batch);
        for (id, (_, outcome)) in ids.into_iter().zip(replies) {
            match outcome {
                Ok(Accepted { result, .. }) => accepted.push((id, result)),
                Err(WriteError::Domain(_)) => {}
                Err(other) => panic!("{id}: {other}"),
            }
        }
    };
    for (i, batch) in workload().into_iter().enumerate() {
        if i % 2 == 1 && !sequencer.snapshot_in_progress() {
            sequencer.start_snapshot();
            if let Some(snapshot) = sequencer.snapshot.as_mut() {
                snapshot.slice = 3;
            }
        }
        decide(&mut sequencer, batch);
    }
    // An idle writer finishes the snapshot being written.
    while sequencer.snapshot_in_progress() {
        decide(&mut sequencer, Vec::new());
    }
    (all, accepted)
}

fn submissions_ids(submissions: &[super::Submission]) -> Vec<String> {
    submissions
        .iter()
        .filter_map(|s| match &s.work {
            super::Work::Decide(_, meta) => Some(meta.command_id.clone()),
            super::Work::Follow(_) => None,
        })
        .collect()
}

/// The index entries of `index` in `memory`, in key order.
fn folded(memory: &Memory, index: IndexName) -> Vec<(Vec<u8>, Vec<u8>)> {
    let entries: BTreeMap<_, _> = memory
        .indexes
        .iter()
        .filter(|((name, _), _)| *name == index)
        .map(|((_, key), value)| (key.clone(), value.clone()))
        .collect();
    entries.into_iter().collect()
}

/// Every check of one recovered log; `cut` names it in failures.
fn check_recovered(
    log: &Arc<EventLog>,
    sequencer: &mut Sequencer,
    accepted: &[(String, pb::CommandResult)],
    cut: usize,
) {
    let events = log.read_range(1, u64::MAX, usize::MAX).expect("read");
    let last = log.last_position().expect("last");
    let positions: Vec<u64> = events.iter().map(|(p, _)| *p).collect();
    assert_eq!(
        positions,
        (1..=last).collect::<Vec<_>>(),
        "cut {cut}: gapless"
    );
    let envelopes: Vec<pb::EventEnvelope> = events
        .iter()
        .map(|(_, bytes)| pb::EventEnvelope::decode(bytes.as_ref()).expect("envelope"))
        .collect();
    // Whole commands, and exactly the first ones accepted.
    let mut per_command: HashMap<&str, u32> = HashMap::new();
    for e in &envelopes {
        *per_command.entry(e.command_id.as_str()).or_default() += 1;
    }
    let present = accepted
        .iter()
        .take_while(|(id, _)| per_command.contains_key(id.as_str()))
        .count();
    assert_eq!(
        per_command.len(),
        present,
        "cut {cut}: a prefix of the commands"
    );
    for (id, result) in &accepted[..present] {
        assert_eq!(
            per_command[id.as_str()],
            result.event_count,
            "cut {cut}: {id} is whole"
        );
        let record = sequencer.command_record(id).expect("record");
        assert_eq!(
            record.and_then(|r| r.result).as_ref(),
            Some(result),
            "cut {cut}: {id}'s idempotency record"
        );
    }
    // Indexes and states equal a fold of the events.
    let memory = Memory::given(
        envelopes
            .iter()
            .map(|e| e.event.clone().and_then(|e| e.kind).expect("payload")),
    );
    for index in [EMAILS, OPEN_ORDERS, SHIPMENTS_BY_ORDER] {
        assert_eq!(
            log.index_scan(index, b"").expect("scan"),
            folded(&memory, index),
            "cut {cut}: index {}",
            index.name()
        );
    }
    for (stream, state) in &memory.aggregates {
        let stored = log.state(stream).expect("state").expect("stored");
        assert_eq!(
            &Aggregate::decode(stream.kind, &stored).expect("decode"),
            state,
            "cut {cut}: stored state of {stream}"
        );
        sequencer.cache.load(stream).expect("load");
        assert_eq!(
            sequencer.cache.aggregate(stream),
            Some(state),
            "cut {cut}: cached {stream}"
        );
    }
    assert_eq!(log.derived_position().expect("derived"), last, "cut {cut}");
    // The writer decides on the recovered indexes: every held email is refused.
    for (email, owner) in folded(&memory, EMAILS) {
        let email = String::from_utf8(email).expect("utf-8");
        let mut submissions = vec![submission(register("c-new", &email), "k-new")];
        let (replies, batch, _) = sequencer.decide_batch(&mut submissions).expect("decide");
        assert!(
            matches!(&replies[0].1, Err(WriteError::Domain(DomainError::EmailTaken { customer_id, .. }))
                if customer_id.as_bytes() == owner.as_slice()),
            "cut {cut}: {email} is held by {}: {:?}",
            String::from_utf8_lossy(&owner),
            replies[0].1
        );
        log.write(batch).expect("write");
    }
}

#[test]
fn every_prefix_of_the_written_rows_recovers_whole_commands_and_consistent_indexes() {
    let (all, accepted) = written_rows();
    assert_eq!(
        accepted.len(),
        15 + ORDERS,
        "every command but the refused one"
    );
    assert!(
        all.len() > 30,
        "rows of records, indexes and snapshots: {}",
        all.len()
    );
    for cut in 0..=all.len() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = Arc::new(open_in_test(dir.path()));
        let mut prefix = all.clone();
        prefix.truncate(cut);
        log.write(prefix).expect("write");
        let mut sequencer = Sequencer::open(log.clone()).expect("recover");
        check_recovered(&log, &mut sequencer, &accepted, cut);
    }
}

/// A standby following the stream: the same events, in chunks that cut commands anywhere,
/// give the follower the writer's states, indexes and idempotency records (from the
/// envelopes' receipts), live and after a restart.
#[test]
fn a_follower_of_the_events_alone_has_the_writers_states_indexes_and_records() {
    let (all, accepted) = written_rows();
    let source_dir = tempfile::tempdir().expect("tempdir");
    let source = open_in_test(source_dir.path());
    source.write(all).expect("write");
    let events: Vec<bytes::Bytes> = source
        .read_range(1, u64::MAX, usize::MAX)
        .expect("read")
        .into_iter()
        .map(|(_, bytes)| bytes)
        .collect();
    for chunk in [1, 5, 64] {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = Arc::new(open_in_test(dir.path()));
        let mut follower = sequencer(log.clone());
        for part in events.chunks(chunk) {
            let (reply, _) = tokio::sync::oneshot::channel();
            let mut work = vec![super::Submission {
                work: super::Work::Follow(part.to_vec()),
                reply,
                queued_at: std::time::Instant::now(),
            }];
            let (replies, batch, _) = follower.decide_batch(&mut work).expect("follow");
            assert!(replies[0].1.is_ok(), "chunk {chunk}: {:?}", replies[0].1);
            log.write(batch).expect("write");
        }
        let mut batch = WriteBatch::default();
        follower.snapshot_whole(&mut batch);
        log.write(batch).expect("write");
        check_recovered(&log, &mut follower, &accepted, chunk);
        let mut restarted = Sequencer::open(log.clone()).expect("reopen");
        check_recovered(&log, &mut restarted, &accepted, chunk);
    }
}

/// Followed events that do not start at the next position, or do not decode, are
/// refused whole: nothing is written.
#[test]
fn followed_events_out_of_place_are_refused_whole() {
    let (all, _) = written_rows();
    let source_dir = tempfile::tempdir().expect("tempdir");
    let source = open_in_test(source_dir.path());
    source.write(all).expect("write");
    let events: Vec<bytes::Bytes> = source
        .read_range(1, 4, usize::MAX)
        .expect("read")
        .into_iter()
        .map(|(_, bytes)| bytes)
        .collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let log = Arc::new(open_in_test(dir.path()));
    let mut follower = sequencer(log.clone());
    let garbled = vec![events[0].clone(), bytes::Bytes::from_static(b"\xff\xff")];
    for bad in [events[1..].to_vec(), garbled] {
        let (reply, _) = tokio::sync::oneshot::channel();
        let mut work = vec![super::Submission {
            work: super::Work::Follow(bad),
            reply,
            queued_at: std::time::Instant::now(),
        }];
        let (replies, batch, _) = follower.decide_batch(&mut work).expect("follow");
        assert!(
            matches!(replies[0].1, Err(WriteError::Storage(_))),
            "{:?}",
            replies[0].1
        );
        assert!(batch.is_empty());
        assert_eq!(follower.next_position, 1);
    }
}

/// Cutting the log after a command (what a deposed writer's quarantine does) leaves
/// exactly the commands before the cut, with states, indexes and idempotency records
/// rebuilt from them alone, wherever the cut falls in a commit record.
#[test]
fn a_log_cut_after_any_command_recovers_exactly_the_commands_before_it() {
    let (all, accepted) = written_rows();
    let mut cuts: Vec<u64> = accepted.iter().map(|(_, r)| r.position).collect();
    cuts.insert(0, 0);
    for keep in cuts {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = Arc::new(open_in_test(dir.path()));
        log.write(all.clone()).expect("write");
        log.sync().expect("sync");
        log.cut_after(keep).expect("cut");
        assert_eq!(log.last_position().expect("last"), keep);
        let kept: Vec<(String, pb::CommandResult)> = accepted
            .iter()
            .filter(|(_, r)| r.position <= keep)
            .cloned()
            .collect();
        let mut sequencer = Sequencer::open(log.clone()).expect("recover");
        check_recovered(&log, &mut sequencer, &kept, keep as usize);
        for (id, result) in accepted.iter().filter(|(_, r)| r.position > keep) {
            assert_eq!(
                sequencer.command_record(id).expect("record"),
                None,
                "cut after {keep}: {id} (at {}) is gone",
                result.position
            );
        }
    }
}
