//! Commit records: the envelopes of a batch, packed into records of whole commands,
//! closed at the first command boundary past `RECORD_BYTES_MAX` bytes, each with its
//! commands' idempotency entries and the index rows its events change (see `log/mod.rs`
//! for the layout and why a record is the unit a crash cannot split).

use crate::log::{CommandEntry, CommitRecord, IndexChange, IndexRow, WriteBatch, RECORD_BYTES_MAX};

/// The commit records of one batch.
pub(super) struct Records {
    first: u64,
    open: CommitRecord,
    bytes: usize,
    /// Every envelope of the batch, in position order (for `LogTail`).
    pub(super) written: Vec<bytes::Bytes>,
}

impl Records {
    pub(super) fn new(first: u64) -> Self {
        Records {
            first,
            open: CommitRecord::default(),
            bytes: 0,
            written: Vec::new(),
        }
    }

    pub(super) fn push(&mut self, position: u64, envelope: bytes::Bytes) {
        if self.open.envelopes.is_empty() {
            self.first = position;
        }
        self.bytes += envelope.len();
        self.written.push(envelope.clone());
        self.open.envelopes.push(envelope);
    }

    /// An index row the open record's events change.
    pub(super) fn index(&mut self, change: &IndexChange) {
        self.open.index_rows.push(IndexRow::from(change));
    }

    /// Attaches a command's idempotency entry to the record holding its events.
    pub(super) fn command(&mut self, entry: CommandEntry) {
        self.open.commands.push(entry);
    }

    /// Marks the end of a command's events: the record is closed if it is full.
    pub(super) fn end_command(&mut self, batch: &mut WriteBatch) {
        if self.bytes >= RECORD_BYTES_MAX {
            self.close(batch);
        }
    }

    pub(super) fn close(&mut self, batch: &mut WriteBatch) {
        if !self.open.envelopes.is_empty() {
            batch.record(self.first, &self.open);
        }
        self.open = CommitRecord::default();
        self.bytes = 0;
    }
}
