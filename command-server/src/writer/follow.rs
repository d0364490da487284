//! Following: a standby appends the events another writer decided, exactly as the stream
//! holds them (the same bytes, so its log stays a byte-for-byte copy), and keeps its
//! states, indexes and idempotency records as if it had decided them itself, so that
//! it can take over as the writer with nothing left to rebuild.

use prost::Message;
use shop_shared::events::{micros_from_timestamp, stream_of};
use shop_shared::pb;

use super::records::Records;
use super::sequencer::{record_of_receipt, Sequencer};
use super::{Accepted, WriteError};
use crate::log::{LogError, WriteBatch};

impl Sequencer {
    /// Appends `envelopes`, which must start at the next position and be consecutive.
    /// Nothing is written unless every one decodes and is where it should be.
    pub(super) fn follow(
        &mut self,
        envelopes: Vec<bytes::Bytes>,
        records: &mut Records,
        batch: &mut WriteBatch,
    ) -> Result<Result<Accepted, WriteError>, LogError> {
        let mut decoded = Vec::with_capacity(envelopes.len());
        for (i, bytes) in envelopes.iter().enumerate() {
            let expected = self.next_position + i as u64;
            let refused = |why: String| {
                Ok(Err(WriteError::Storage(format!(
                    "followed event at position {expected}: {why}"
                ))))
            };
            let envelope = match pb::EventEnvelope::decode(bytes.as_ref()) {
                Ok(envelope) => envelope,
                Err(error) => return refused(format!("does not decode: {error}")),
            };
            if envelope.position != expected {
                return refused(format!("it says position {}", envelope.position));
            }
            if envelope
                .event
                .as_ref()
                .and_then(|e| e.kind.as_ref())
                .is_none()
            {
                return refused("no payload".into());
            }
            decoded.push(envelope);
        }
        let mut changes = Vec::new();
        let mut command: Option<String> = None;
        for (bytes, envelope) in envelopes.into_iter().zip(decoded) {
            let position = envelope.position;
            if command.as_deref().is_some_and(|c| c != envelope.command_id) {
                // A command boundary: the previous command's index rows, then its record
                // may close.
                for change in changes.drain(..) {
                    records.index(&change);
                }
                records.end_command(batch);
            }
            command = Some(envelope.command_id.clone());
            let Some(event) = envelope.event.and_then(|e| e.kind) else {
                continue; // checked above
            };
            let stream = stream_of(&event);
            let version = self.cache.evolve(&stream, &event, &mut changes)?;
            if version != envelope.stream_version {
                return Err(LogError::Corrupt {
                    key: format!("followed event at position {position}"),
                    reason: format!(
                        "stream {stream} is at version {version} after it here, the envelope says {}: \
                         this log and the stream disagree",
                        envelope.stream_version
                    ),
                });
            }
            self.pending.index(&stream, version, position);
            if let Some(at) = envelope.occurred_at {
                self.last_micros = self.last_micros.max(micros_from_timestamp(&at));
            }
            self.next_position = position + 1;
            records.push(position, bytes);
            if let Some(receipt) = envelope.receipt {
                let record = record_of_receipt(receipt, position);
                self.remember_record(envelope.command_id, record, records);
            }
        }
        for change in changes.drain(..) {
            records.index(&change);
        }
        Ok(Ok(Accepted {
            result: pb::CommandResult {
                position: self.next_position - 1,
                ..Default::default()
            },
            replayed: false,
        }))
    }
}
