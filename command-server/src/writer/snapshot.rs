//! Snapshots of the derived rows (aggregate states, stream index, idempotency records)
//! and the recovery that rebuilds them after a restart (see `log/mod.rs`, Snapshots).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use shop_shared::events::stream_of;
use shop_shared::ids::StreamId;

use super::sequencer::Sequencer;
use crate::log::{decode_envelope, CommandRecord, IndexRow, LogError, PositionChunk, WriteBatch};

/// How often the derived rows are written (and so how much a restart replays, at most).
pub(super) const SNAPSHOT_INTERVAL: Duration = Duration::from_millis(100);
/// Pending derived rows that force a snapshot regardless of time (bounds memory); a
/// snapshot still being written is then finished in one batch.
pub(super) const SNAPSHOT_PENDING_MAX: usize = 50_000;
/// A snapshot is written in this many slices (one per batch), of at least
/// `SNAPSHOT_SLICE_ROWS_MIN` rows. The writer writes a slice between two batches of
/// commands, so a slice delays the commands queued behind it: a whole 100 ms snapshot
/// at half load (~1,500 rows) once took 11–19 ms as one sled batch; a slice is a
/// sixteenth of that. A fixed number of slices keeps a snapshot's duration in batches,
/// not rows, so it keeps up at any load.
pub(super) const SNAPSHOT_SLICES: usize = 16;
pub(super) const SNAPSHOT_SLICE_ROWS_MIN: usize = 64;

/// Derived rows not yet written: the next snapshot writes them.
#[derive(Default)]
pub(super) struct Pending {
    /// Idempotency records of accepted commands.
    pub(super) commands: HashMap<String, CommandRecord>,
    /// Stream index: stream → (first version, positions of it and the next versions).
    pub(super) streams: HashMap<StreamId, (u64, Vec<u64>)>,
}

impl Pending {
    pub(super) fn len(&self) -> usize {
        self.commands.len() + self.streams.len()
    }

    pub(super) fn index(&mut self, stream: &StreamId, version: u64, position: u64) {
        self.streams
            .entry(stream.clone())
            .or_insert_with(|| (version, Vec::new()))
            .1
            .push(position);
    }
}

/// A snapshot of the derived rows as of `derived`, being written a slice per batch.
pub(super) struct Snapshot {
    /// Rows still to write (the next one last).
    rows: Vec<SnapshotRow>,
    /// Rows written per batch.
    pub(super) slice: usize,
    /// The idempotency records in it (looked up by the writer until they are stored).
    pub(super) commands: HashMap<String, CommandRecord>,
    derived: u64,
}

/// One derived row of a snapshot, encoded as it was when the snapshot was taken.
pub(super) enum SnapshotRow {
    State(StreamId, Vec<u8>),
    Stream(StreamId, u64, PositionChunk),
    Command(String),
}

impl Sequencer {
    /// Rebuilds the derived rows of the records after the last snapshot, and writes
    /// them (synced) before anything else happens.
    pub(super) fn recover(&mut self) -> Result<(), LogError> {
        let derived = self.log.derived_position()?;
        let last = self.next_position - 1;
        if last <= derived {
            return Ok(());
        }
        let started = Instant::now();
        let mut records = Vec::new();
        self.log
            .for_each_record_from(derived + 1, |first, record| {
                records.push((first, record));
                true
            })?;
        // The index rows of these records, rewritten in log order: a crash may have kept
        // a record but not the rows written after it.
        let mut batch = WriteBatch::default();
        let mut replayed = 0u64;
        let mut changes = Vec::new();
        for (first, record) in records {
            for (i, bytes) in record.envelopes.iter().enumerate() {
                let position = first + i as u64;
                if position <= derived {
                    continue;
                }
                let envelope = decode_envelope(position, bytes)?;
                let Some(event) = envelope.event.and_then(|e| e.kind) else {
                    return Err(LogError::Corrupt {
                        key: format!("event at position {position}"),
                        reason: "no payload".into(),
                    });
                };
                let stream = stream_of(&event);
                // A snapshot written in slices may have stored states beyond `derived`
                // before the crash: those events are in the state already.
                self.cache.load(&stream)?;
                if envelope.stream_version > self.cache.version(&stream) {
                    let version = self.cache.evolve(&stream, &event, &mut changes)?;
                    if version != envelope.stream_version {
                        return Err(LogError::Corrupt {
                            key: format!("event at position {position}"),
                            reason: format!(
                                "stream {stream} replays to version {version}, the envelope says {}",
                                envelope.stream_version
                            ),
                        });
                    }
                }
                self.pending
                    .index(&stream, envelope.stream_version, position);
                replayed += 1;
            }
            for entry in record.commands {
                if let Some(r) = entry.record {
                    self.pending.commands.insert(entry.command_id, r);
                }
            }
            // The record's own index rows; a record that carries none (cut short by
            // `EventLog::cut_after`, or written before records carried them) gets the
            // changes of its events as replayed here.
            if record.index_rows.is_empty() {
                for change in changes.drain(..) {
                    batch.index_row(&IndexRow::from(&change));
                }
            } else {
                changes.clear();
                for row in &record.index_rows {
                    batch.index_row(row);
                }
            }
        }
        self.cache.forget_indexes();
        self.snapshot_whole(&mut batch);
        self.log.write(batch)?;
        self.log.sync()?;
        tracing::info!(
            from = derived + 1,
            to = last,
            events = replayed,
            ms = started.elapsed().as_millis() as u64,
            "rebuilt derived rows since the last snapshot"
        );
        Ok(())
    }

    pub(super) fn snapshot_in_progress(&self) -> bool {
        self.snapshot.is_some()
    }

    /// Takes a snapshot of the derived rows (states, stream index, idempotency
    /// records), complete up to the last decided position, to be written from now on.
    pub(super) fn start_snapshot(&mut self) {
        let mut rows = Vec::with_capacity(
            self.cache.dirty_len() + self.pending.streams.len() + self.pending.commands.len(),
        );
        self.cache.snapshot_dirty(&mut rows);
        for (stream, (first_version, positions)) in self.pending.streams.drain() {
            rows.push(SnapshotRow::Stream(
                stream,
                first_version,
                PositionChunk { positions },
            ));
        }
        rows.extend(
            self.pending
                .commands
                .keys()
                .map(|id| SnapshotRow::Command(id.clone())),
        );
        rows.reverse();
        self.snapshot = Some(Snapshot {
            slice: rows
                .len()
                .div_ceil(SNAPSHOT_SLICES)
                .max(SNAPSHOT_SLICE_ROWS_MIN),
            rows,
            commands: std::mem::take(&mut self.pending.commands),
            derived: self.next_position - 1,
        });
        self.last_snapshot = Instant::now();
    }

    /// Adds the next slice of the snapshot being written to `batch` (all of it when
    /// `whole`); with its last row, the `derived` mark.
    pub(super) fn write_snapshot(&mut self, batch: &mut WriteBatch, whole: bool) {
        let Some(snapshot) = self.snapshot.as_mut() else {
            return;
        };
        let rows = if whole { usize::MAX } else { snapshot.slice };
        for _ in 0..rows {
            let Some(row) = snapshot.rows.pop() else {
                break;
            };
            match row {
                SnapshotRow::State(stream, bytes) => batch.state(&stream, &bytes),
                SnapshotRow::Stream(stream, first_version, chunk) => {
                    batch.stream_chunk(&stream, first_version, &chunk)
                }
                SnapshotRow::Command(id) => {
                    if let Some(record) = snapshot.commands.get(&id) {
                        batch.command(&id, record);
                    }
                }
            }
        }
        if snapshot.rows.is_empty() {
            batch.derived(snapshot.derived);
            self.snapshot = None;
            self.cache.trim();
        }
    }

    /// Writes every derived row into `batch`: the rest of a snapshot being written and
    /// a new one of everything since (at start-up and shutdown).
    pub(super) fn snapshot_whole(&mut self, batch: &mut WriteBatch) {
        self.write_snapshot(batch, true);
        self.start_snapshot();
        self.write_snapshot(batch, true);
    }

    /// The idempotency record of `command_id` (pending, being written, or stored).
    pub(super) fn command_record(
        &self,
        command_id: &str,
    ) -> Result<Option<CommandRecord>, LogError> {
        if let Some(record) = self.pending.commands.get(command_id) {
            return Ok(Some(record.clone()));
        }
        if let Some(record) = self
            .snapshot
            .as_ref()
            .and_then(|s| s.commands.get(command_id))
        {
            return Ok(Some(record.clone()));
        }
        self.log.command(command_id)
    }
}
