//! Commit records: the envelopes of a batch, packed into records of at most
//! `RECORD_BYTES_MAX` bytes, each command's idempotency entry in the record holding its
//! last event (see `log/mod.rs` for the layout).

use crate::log::{CommandEntry, CommitRecord, WriteBatch, RECORD_BYTES_MAX};

/// The commit records of one batch, closed at `RECORD_BYTES_MAX`.
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

    pub(super) fn push(&mut self, position: u64, envelope: bytes::Bytes, batch: &mut WriteBatch) {
        if !self.open.envelopes.is_empty() && self.bytes + envelope.len() > RECORD_BYTES_MAX {
            self.close(batch);
        }
        if self.open.envelopes.is_empty() {
            self.first = position;
        }
        self.bytes += envelope.len();
        self.written.push(envelope.clone());
        self.open.envelopes.push(envelope);
    }

    /// Attaches a command's idempotency entry to the record holding its last event.
    pub(super) fn command(&mut self, entry: CommandEntry) {
        self.open.commands.push(entry);
    }

    pub(super) fn close(&mut self, batch: &mut WriteBatch) {
        if !self.open.envelopes.is_empty() {
            batch.record(self.first, &self.open);
        }
        self.open = CommitRecord::default();
        self.bytes = 0;
    }
}
