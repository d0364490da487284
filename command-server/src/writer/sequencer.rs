//! The sequencer: the writer thread's state. It decides each command of a batch against
//! the latest state, assigns positions and versions, and builds the batch's rows: commit
//! records, index changes, snapshot slices. It never names an aggregate: the domain says
//! what a command reads and how events change states and indexes.

use std::time::Instant;

use prost::Message;
use shop_shared::events::{event_type, now_micros, stream_of, timestamp_from_micros};
use shop_shared::ids::{generate_id, StreamId};
use shop_shared::pb;

use super::cache::AggregateCache;
use super::flusher::Reply;
use super::records::Records;
use super::snapshot::{Pending, Snapshot, SNAPSHOT_INTERVAL, SNAPSHOT_PENDING_MAX};
use super::{Accepted, CommandMeta, Submission, Work, WriteError};
use crate::domain::{self, Command, Event};
use crate::log::{CommandEntry, CommandRecord, EventLog, LogError, WriteBatch};
use std::sync::Arc;

/// The deciding half of the writer: positions, time, states and pending derived rows.
pub(super) struct Sequencer {
    pub(super) log: Arc<EventLog>,
    /// Aggregate states and index entries, kept across batches (bounded) so deciding
    /// rarely reads sled.
    pub(super) cache: AggregateCache,
    /// Derived rows not yet in a snapshot.
    pub(super) pending: Pending,
    /// The snapshot being written, a slice per batch.
    pub(super) snapshot: Option<Snapshot>,
    pub(super) last_snapshot: Instant,
    /// The position the next event gets.
    pub(super) next_position: u64,
    /// `occurred_at` of the last event, so that it never decreases along positions.
    pub(super) last_micros: i64,
}

impl Sequencer {
    /// The sequencer over `log`, its derived rows rebuilt (see [`Self::recover`]).
    pub(super) fn open(log: Arc<EventLog>) -> Result<Self, LogError> {
        let last_position = log.last_position()?;
        let last_micros = match log.event(last_position)? {
            Some(bytes) => pb::EventEnvelope::decode(bytes.as_ref())
                .ok()
                .and_then(|e| e.occurred_at)
                .map_or(0, |t| shop_shared::events::micros_from_timestamp(&t)),
            None => 0,
        };
        let mut sequencer = Sequencer {
            log: log.clone(),
            cache: AggregateCache::new(log),
            pending: Pending::default(),
            snapshot: None,
            last_snapshot: Instant::now(),
            next_position: last_position + 1,
            last_micros,
        };
        sequencer.recover()?;
        Ok(sequencer)
    }

    /// Decides every submission of a batch; returns the replies and the rows to write.
    pub(super) fn decide_batch(
        &mut self,
        submissions: &mut Vec<Submission>,
    ) -> Result<(Vec<Reply>, WriteBatch, Vec<bytes::Bytes>), LogError> {
        let mut batch = WriteBatch::default();
        let mut records = Records::new(self.next_position);
        let mut replies = Vec::with_capacity(submissions.len());
        for s in submissions.drain(..) {
            let outcome = match s.work {
                Work::Decide(command, meta) => self.decide_one(&command, &meta, &mut records)?,
                Work::Follow(envelopes) => self.follow(envelopes, &mut records, &mut batch)?,
            };
            records.end_command(&mut batch);
            replies.push((s.reply, outcome));
        }
        records.close(&mut batch);
        let overdue = self.pending.len() >= SNAPSHOT_PENDING_MAX;
        if self.snapshot.is_none() && (overdue || self.last_snapshot.elapsed() >= SNAPSHOT_INTERVAL)
        {
            self.start_snapshot();
        }
        self.write_snapshot(&mut batch, overdue);
        Ok((replies, batch, records.written))
    }

    fn decide_one(
        &mut self,
        command: &Command,
        meta: &CommandMeta,
        records: &mut Records,
    ) -> Result<Result<Accepted, WriteError>, LogError> {
        if meta.idempotent {
            if let Some(record) = self.command_record(&meta.command_id)? {
                return Ok(replay(record, meta));
            }
        }
        self.cache.load_reads(command)?;
        let own = command.stream();
        if let Some(expected) = meta.expected_version {
            let actual = self.cache.version(&own);
            if actual != expected {
                return Ok(Err(WriteError::VersionConflict {
                    stream: own.to_string(),
                    expected,
                    actual,
                }));
            }
        }
        let events = match domain::decide(command, &self.cache) {
            Ok(events) => events,
            Err(refused) => return Ok(Err(refused.into())),
        };
        if let Err(why) = self.cache.check(&events)? {
            tracing::error!(command = command.name(), %why, "decide broke an invariant; the command is refused");
            return Ok(Err(WriteError::Invariant(why)));
        }
        let result = self.append(&own, events, meta, records)?;
        if meta.idempotent {
            self.remember(meta, &result, records);
        }
        Ok(Ok(Accepted {
            result,
            replayed: false,
        }))
    }

    /// Gives `events` their positions and versions, folds them into the cache, and adds
    /// their envelopes and index changes to the commit records.
    fn append(
        &mut self,
        own: &StreamId,
        events: Vec<Event>,
        meta: &CommandMeta,
        records: &mut Records,
    ) -> Result<pb::CommandResult, LogError> {
        let event_count = u32::try_from(events.len()).unwrap_or(u32::MAX);
        let now = now_micros().max(self.last_micros);
        self.last_micros = now;
        let occurred_at = timestamp_from_micros(now);
        let mut own_version = self.cache.version(own);
        let mut changes = Vec::new();
        let mut envelopes = Vec::with_capacity(events.len());
        for event in events {
            let position = self.next_position;
            self.next_position += 1;
            let stream = stream_of(&event);
            let version = self.cache.evolve(&stream, &event, &mut changes)?;
            if stream == *own {
                own_version = version;
            }
            self.pending.index(&stream, version, position);
            envelopes.push(pb::EventEnvelope {
                event_id: generate_id(),
                position,
                stream_id: stream.to_string(),
                stream_version: version,
                event_type: event_type(&event).to_string(),
                occurred_at: Some(occurred_at),
                command_id: meta.command_id.clone(),
                correlation_id: meta.correlation_id.clone(),
                causation_id: meta.causation_id.clone(),
                event: Some(pb::Event { kind: Some(event) }),
                traceparent: meta.traceparent.clone().unwrap_or_default(),
                actor: meta.actor.clone(),
                receipt: None,
            });
        }
        let result = pb::CommandResult {
            stream_id: own.to_string(),
            version: own_version,
            position: envelopes.last().map_or(0, |e| e.position),
            event_count,
            id: own.id.clone(),
        };
        if let Some(last) = envelopes.last_mut().filter(|_| meta.idempotent) {
            last.receipt = Some(receipt(&meta.request_hash, &result));
        }
        for envelope in envelopes {
            records.push(envelope.position, envelope.encode_to_vec().into());
        }
        for change in &changes {
            records.index(change);
        }
        Ok(result)
    }

    /// Keeps an accepted command's idempotency record: in its commit record, and pending
    /// for the next snapshot.
    fn remember(&mut self, meta: &CommandMeta, result: &pb::CommandResult, records: &mut Records) {
        let record = CommandRecord {
            request_hash: meta.request_hash.to_vec(),
            result: Some(result.clone()),
        };
        self.remember_record(meta.command_id.clone(), record, records);
    }

    pub(super) fn remember_record(
        &mut self,
        command_id: String,
        record: CommandRecord,
        records: &mut Records,
    ) {
        records.command(CommandEntry {
            command_id: command_id.clone(),
            record: Some(record.clone()),
        });
        self.pending.commands.insert(command_id, record);
    }
}

/// The receipt an idempotent command's last event carries (see `EventEnvelope.receipt`).
fn receipt(request_hash: &[u8], result: &pb::CommandResult) -> pb::CommandReceipt {
    pb::CommandReceipt {
        request_hash: request_hash.to_vec(),
        stream_id: result.stream_id.clone(),
        version: result.version,
        event_count: result.event_count,
        id: result.id.clone(),
    }
}

/// The idempotency record a followed event's receipt stands for.
pub(super) fn record_of_receipt(receipt: pb::CommandReceipt, position: u64) -> CommandRecord {
    CommandRecord {
        request_hash: receipt.request_hash,
        result: Some(pb::CommandResult {
            stream_id: receipt.stream_id,
            version: receipt.version,
            position,
            event_count: receipt.event_count,
            id: receipt.id,
        }),
    }
}

/// The answer to a retried command id: the stored result, or a refusal when the id was
/// used for a different request.
fn replay(record: CommandRecord, meta: &CommandMeta) -> Result<Accepted, WriteError> {
    if record.request_hash == meta.request_hash {
        Ok(Accepted {
            result: record.result.unwrap_or_default(),
            replayed: true,
        })
    } else {
        Err(WriteError::CommandIdReused(meta.command_id.clone()))
    }
}
