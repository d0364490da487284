//! The single writer: every command goes through one bounded queue to one thread that
//! decides it and appends its events; a second thread makes batches durable and replies.
//!
//! - **Serialized**: one thread decides every command against the latest state (its own
//!   earlier decisions included), so there are no lost updates and no interleavings that
//!   could break an invariant, with no locks.
//! - **Atomic**: a command's events, idempotency entry and index rows are one commit
//!   record, one sled insert; its rows are added only after `decide` accepted it, so a
//!   refused command writes nothing. Rows are written one insert at a time, never in a
//!   sled batch, and a crash keeps a prefix of them (see `log/mod.rs`, Crash safety).
//! - **Group commit**: while the flusher syncs batch N, the writer decides and writes
//!   batch N+1 (no sled batch, so nothing waits for the running flush); one sync then
//!   covers every batch written before it started. Exactly one thread ever flushes.
//! - **Acknowledged = durable**: every reply (refusals and idempotent replays included,
//!   since they may depend on state that is not yet durable) is sent by the flusher after
//!   the sync that covers the state it was decided on.
//! - **Bounded**: the queue holds at most `queue_capacity` commands (then
//!   RESOURCE_EXHAUSTED), and no command that would wait in it longer than
//!   `queue_wait_max` (see `writer/queue.rs`); a batch at most `batch_commands_max`,
//!   and at most `FLUSH_QUEUE_BATCHES` applied batches wait for a sync (then the writer
//!   waits).
//! - **Derived rows in snapshots**: aggregate states, the stream index and idempotency
//!   records are kept in memory; every `SNAPSHOT_INTERVAL` they are taken as a
//!   snapshot (see `log/mod.rs`) whose rows are then written a slice at a time with the next
//!   `SNAPSHOT_SLICES` batches (so that no batch delays its commands for long), the
//!   last slice with the `derived` mark. On start, the records after
//!   that mark are replayed to rebuild them (skipping what a partly written snapshot
//!   already holds), so restarts never replay more than a few intervals.

use std::sync::Arc;
use std::time::{Duration, Instant};

use shop_shared::pb;
use tokio::sync::{mpsc, oneshot, watch};

use crate::domain::{Command, DomainError};
use crate::log::{EventLog, LogError, LogTail, WriteBatch};

mod cache;
#[cfg(test)]
mod crash_tests;
mod flusher;
mod follow;
mod queue;
mod records;
mod sequencer;
mod snapshot;
#[cfg(test)]
mod snapshot_tests;

use flusher::{flusher_loop, FlushJob, SyncGate};
pub use flusher::{SyncStats, SyncSummary};
use queue::{Admission, Queue};
use sequencer::Sequencer;

/// Applied batches that may wait for the flusher before the writer blocks.
const FLUSH_QUEUE_BATCHES: usize = 8;
/// Everything about a command that is not the command itself.
#[derive(Debug, Clone)]
pub struct CommandMeta {
    /// The command's id, recorded in its events' envelopes: the client's, or generated.
    pub command_id: String,
    /// Whether `command_id` came from the client and is an idempotency key (a generated
    /// id cannot be retried, so no record is kept for it).
    pub idempotent: bool,
    /// Hash of the request (RPC name and payload without the command id), to tell a retry
    /// from a different request reusing the id.
    pub request_hash: [u8; 16],
    /// Optimistic concurrency on the command's own stream.
    pub expected_version: Option<u64>,
    pub correlation_id: String,
    pub causation_id: String,
    /// W3C trace context to record in the events (see `EventEnvelope.traceparent`).
    pub traceparent: Option<String>,
    /// Who issued the command, recorded in its events (`EventEnvelope.actor`).
    pub actor: String,
}

impl CommandMeta {
    /// The metadata of a request to `rpc`: `unkeyed` is the request's encoding without
    /// its command id (what a retry must repeat exactly). A `command_id` makes the
    /// request idempotent; without one an id is generated and no record is kept. The id
    /// is also the correlation and causation id until the caller says otherwise.
    pub fn for_request(rpc: &str, unkeyed: &[u8], command_id: Option<String>) -> Self {
        let idempotent = command_id.is_some();
        let command_id = command_id.unwrap_or_else(shop_shared::ids::generate_id);
        CommandMeta {
            request_hash: Self::hash_request(rpc, unkeyed),
            correlation_id: command_id.clone(),
            causation_id: command_id.clone(),
            command_id,
            idempotent,
            expected_version: None,
            traceparent: None,
            actor: String::new(),
        }
    }

    /// The hash of a request, as stored in idempotency records.
    pub fn hash_request(rpc: &str, payload: &[u8]) -> [u8; 16] {
        let mut bytes = Vec::with_capacity(rpc.len() + 1 + payload.len());
        bytes.extend_from_slice(rpc.as_bytes());
        bytes.push(0);
        bytes.extend_from_slice(payload);
        xxhash_rust::xxh3::xxh3_128(&bytes).to_be_bytes()
    }
}

/// An accepted command's reply.
#[derive(Debug, Clone, PartialEq)]
pub struct Accepted {
    pub result: pb::CommandResult,
    /// True when this is the stored reply of an earlier request with the same command id.
    pub replayed: bool,
}

/// Why a command was not accepted.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Domain(#[from] DomainError),
    #[error("stream {stream} is at version {actual}, but expected_version was {expected}")]
    VersionConflict {
        stream: String,
        expected: u64,
        actual: u64,
    },
    #[error("command_id {0:?} was already used for a different request")]
    CommandIdReused(String),
    /// The events `decide` returned would break an invariant of the domain (a bug):
    /// nothing was written.
    #[error("the command would break an invariant ({0}); nothing was written")]
    Invariant(String),
    #[error("the command queue is full ({0} commands waiting); retry with backoff")]
    Overloaded(usize),
    #[error("commands wait longer than {0} ms for the writer; retry with backoff")]
    QueueWait(u64),
    #[error("the command server is shutting down")]
    ShuttingDown,
    #[error("the event log is unusable: {0}")]
    Storage(String),
    /// The filesystem under the log is full; nothing of the command was acknowledged.
    #[error("the disk under the event log is full: {0}")]
    DiskFull(String),
}

/// Tuning of the writer.
#[derive(Debug, Clone, Copy)]
pub struct WriterConfig {
    /// Commands that may wait in the queue.
    pub queue_capacity: usize,
    /// Commands decided into one batch (one group commit).
    pub batch_commands_max: usize,
    /// The longest a command may wait in the queue (`None`: as long as it takes).
    pub queue_wait_max: Option<Duration>,
}

impl WriteError {
    /// Whether the command was refused for overload (nothing was decided; retry later).
    pub fn is_overload(&self) -> bool {
        matches!(self, WriteError::Overloaded(_) | WriteError::QueueWait(_))
    }
}

struct Submission {
    work: Work,
    reply: oneshot::Sender<Result<Accepted, WriteError>>,
    queued_at: Instant,
}

/// What the writer thread is asked to do.
#[allow(clippy::large_enum_variant)] // `Decide` is the hot one: boxing it would allocate per command.
enum Work {
    /// Decide a command and append its events.
    Decide(Command, CommandMeta),
    /// Append events another writer decided, exactly as the stream holds them (a
    /// standby following the stream; see `writer/follow.rs`).
    Follow(Vec<bytes::Bytes>),
}

/// Cloneable handle to submit commands.
#[derive(Clone)]
pub struct Writer {
    queue: mpsc::Sender<Submission>,
    capacity: usize,
    admission: Arc<Admission>,
    failure: watch::Receiver<Option<Failure>>,
}

/// Progress of the writer, for the relay, status and health.
#[derive(Clone)]
pub struct WriterWatch {
    /// Last position known durable.
    pub durable_position: watch::Receiver<u64>,
    /// Set when the log failed and the writer stopped.
    pub failure: watch::Receiver<Option<Failure>>,
    /// Recent group-commit syncs.
    pub syncs: Arc<SyncStats>,
    /// The newest written events, for the relay.
    pub tail: Arc<LogTail>,
}

/// The writer and flusher threads, to join at shutdown.
pub struct WriterThreads {
    writer: std::thread::JoinHandle<()>,
    flusher: std::thread::JoinHandle<()>,
}

impl WriterThreads {
    /// Waits for both threads. They end once every [`Writer`] handle is dropped and the
    /// last batch is synced and answered.
    pub fn join(self) {
        let _ = self.writer.join();
        let _ = self.flusher.join();
    }
}

impl Writer {
    /// Starts the writer and flusher threads over `log`, after rebuilding the derived
    /// rows of the records written since the last snapshot.
    pub fn start(
        log: Arc<EventLog>,
        config: WriterConfig,
    ) -> Result<(Writer, WriterWatch, WriterThreads), LogError> {
        let sequencer = Sequencer::open(log.clone())?;
        let last_position = sequencer.next_position - 1;

        let (queue_tx, queue_rx) = mpsc::channel(config.queue_capacity.max(1));
        let (flush_tx, flush_rx) = std::sync::mpsc::sync_channel(FLUSH_QUEUE_BATCHES);
        let (durable_tx, durable_rx) = watch::channel(last_position);
        let durable_tx = Arc::new(durable_tx);
        let gate = Arc::new(SyncGate::default());
        let (failure_tx, failure_rx) = watch::channel(None);
        let failure_tx = Arc::new(failure_tx);
        let syncs = Arc::new(SyncStats::default());
        let tail = Arc::new(LogTail::default());
        let durability = Durable {
            gate: gate.clone(),
            durable: durable_tx.clone(),
            syncs: syncs.clone(),
        };
        let admission = Arc::new(Admission::new(
            config.queue_wait_max,
            config.batch_commands_max.max(1),
        ));
        let writer = {
            let failure_tx = failure_tx.clone();
            let queue = Queue::new(
                queue_rx,
                config.batch_commands_max.max(1),
                admission.clone(),
            );
            let tail = tail.clone();
            std::thread::Builder::new()
                .name("shop-writer".into())
                .spawn(move || {
                    writer_loop(sequencer, queue, flush_tx, &durability, &tail, &failure_tx)
                })
                .map_err(|source| LogError::Io {
                    path: "writer thread".into(),
                    source,
                })?
        };
        let flusher = std::thread::Builder::new()
            .name("shop-flusher".into())
            .spawn({
                let syncs = syncs.clone();
                move || {
                    flusher_loop(
                        || log.sync(),
                        flush_rx,
                        &gate,
                        &durable_tx,
                        &failure_tx,
                        &syncs,
                    )
                }
            })
            .map_err(|source| LogError::Io {
                path: "flusher thread".into(),
                source,
            })?;
        Ok((
            Writer {
                queue: queue_tx,
                capacity: config.queue_capacity,
                admission,
                failure: failure_rx.clone(),
            },
            WriterWatch {
                durable_position: durable_rx,
                failure: failure_rx,
                syncs,
                tail,
            },
            WriterThreads { writer, flusher },
        ))
    }

    /// Whether new commands are admitted now (see `--queue-wait-max-ms`): callers refuse
    /// early with this, before validating.
    pub fn admitting(&self) -> Result<(), WriteError> {
        let queued = self.queue.max_capacity() - self.queue.capacity();
        if self.admission.admits(queued) {
            Ok(())
        } else {
            Err(self.admission.refusal())
        }
    }

    /// Submits a validated command and waits until it is durable (or refused).
    pub async fn submit(
        &self,
        command: Command,
        meta: CommandMeta,
    ) -> Result<Accepted, WriteError> {
        self.admitting()?;
        let (reply, answer) = oneshot::channel();
        let submission = Submission {
            work: Work::Decide(command, meta),
            reply,
            queued_at: Instant::now(),
        };
        match self.queue.try_send(submission) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                return Err(WriteError::Overloaded(self.capacity))
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(self.stopped()),
        }
        answer.await.unwrap_or_else(|_| Err(self.stopped()))
    }

    /// Appends `envelopes` (encoded, consecutive positions from the log's next one, as
    /// the stream holds them) without deciding anything, and waits until they are
    /// durable; returns the last position. States, indexes and idempotency records (from
    /// the envelopes' receipts) follow them as if this writer had decided them.
    pub async fn follow(&self, envelopes: Vec<bytes::Bytes>) -> Result<u64, WriteError> {
        let (reply, answer) = oneshot::channel();
        let submission = Submission {
            work: Work::Follow(envelopes),
            reply,
            queued_at: Instant::now(),
        };
        if self.queue.send(submission).await.is_err() {
            return Err(self.stopped());
        }
        match answer.await {
            Ok(Ok(accepted)) => Ok(accepted.result.position),
            Ok(Err(error)) => Err(error),
            Err(_) => Err(self.stopped()),
        }
    }

    fn stopped(&self) -> WriteError {
        match self.failure.borrow().clone() {
            Some(failure) if failure.disk_full => WriteError::DiskFull(failure.detail),
            Some(failure) => WriteError::Storage(failure.detail),
            None => WriteError::ShuttingDown,
        }
    }
}

/// What the writer needs to sync a batch itself (see `flusher.rs`).
struct Durable {
    gate: Arc<SyncGate>,
    durable: Arc<watch::Sender<u64>>,
    syncs: Arc<SyncStats>,
}

fn writer_loop(
    mut sequencer: Sequencer,
    mut queue: Queue,
    flush: std::sync::mpsc::SyncSender<FlushJob>,
    durability: &Durable,
    tail: &LogTail,
    failure: &watch::Sender<Option<Failure>>,
) {
    let mut submissions = Vec::with_capacity(queue.batch_max);
    loop {
        // While a snapshot is being written, an idle writer keeps writing it.
        let wait = !sequencer.snapshot_in_progress();
        if queue.next_batch(&mut submissions, wait).is_none() {
            break;
        }
        let first = sequencer.next_position;
        let (replies, batch, written) = match sequencer.decide_batch(&mut submissions) {
            Ok(done) => done,
            Err(error) => {
                fail(failure, &error);
                return;
            }
        };
        if !batch.is_empty() {
            if let Err(error) = sequencer.log.write(batch) {
                // Nothing of this batch was acknowledged; its replies are dropped, so
                // their callers see the storage failure.
                fail(failure, &error);
                return;
            }
        }
        if replies.is_empty() && sequencer.snapshot_in_progress() {
            // A slice of a snapshot alone: synced with the next commands (or the last
            // slice), like any applied batch.
            continue;
        }
        // Before the flush job: by the time a position is durable, it is here.
        if !written.is_empty() {
            tail.extend(first, written);
        }
        let job = FlushJob {
            replies,
            last_position: sequencer.next_position - 1,
        };
        if durability.gate.flusher_idle() && queue.is_empty() {
            // Nothing to decide meanwhile: sync here rather than wake the flusher.
            let log = sequencer.log.clone();
            if !durability.gate.sync_and_answer(
                &mut || log.sync(),
                &mut vec![job],
                &durability.durable,
                failure,
                &durability.syncs,
            ) {
                return;
            }
            continue;
        }
        durability.gate.hand();
        if flush.send(job).is_err() {
            // The flusher stopped after a sync failure; it reported it.
            return;
        }
    }
    // Shutting down: a last snapshot, so the next start replays nothing.
    let mut batch = WriteBatch::default();
    sequencer.snapshot_whole(&mut batch);
    match sequencer.log.write(batch) {
        Ok(()) => {
            durability.gate.hand();
            let _ = flush.send(FlushJob {
                replies: Vec::new(),
                last_position: sequencer.next_position - 1,
            });
        }
        Err(error) => fail(failure, &error),
    }
    tracing::debug!("command queue closed; writer done");
}

fn fail(failure: &watch::Sender<Option<Failure>>, error: &LogError) {
    tracing::error!(%error, "event log write failed; the command server stops accepting commands");
    failure.send_replace(Some(Failure::of(error)));
}

/// Why the log stopped taking writes (the writer then stops: see `LogError`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub detail: String,
    /// The filesystem is full: the server restarts by itself once there is space again
    /// (see `restart_when_space_returns` in lib.rs).
    pub disk_full: bool,
}

impl Failure {
    pub fn of(error: &LogError) -> Failure {
        Failure {
            detail: error.to_string(),
            disk_full: error.is_disk_full(),
        }
    }
}
