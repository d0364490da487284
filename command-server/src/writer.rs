//! The single writer: every command goes through one bounded queue to one thread that
//! decides it and appends its events; a second thread makes batches durable and replies.
//!
//! - **Serialized**: one thread decides every command against the latest state (its own
//!   earlier decisions included), so there are no lost updates and no interleavings that
//!   could break an invariant, with no locks.
//! - **Atomic**: each batch of commands is one `sled::Batch`; a command's rows are added
//!   only after `decide` accepted it, so a refused command writes nothing.
//! - **Group commit**: while the flusher syncs batch N, the writer decides and applies
//!   batch N+1; one sync then covers every batch applied before it. Exactly one thread
//!   ever flushes.
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
//!   snapshot (see `log.rs`) whose rows are then written a slice at a time with the next
//!   `SNAPSHOT_SLICES` batches (so that no batch holds sled's global lock for long), the
//!   last slice with the `derived` mark. On start, the records after
//!   that mark are replayed to rebuild them (skipping what a partly written snapshot
//!   already holds), so restarts never replay more than a few intervals.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::metrics::histogram::Histogram;
use prost::Message;
use shop_shared::events::{event_type, now_micros, stream_of, timestamp_from_micros};
use shop_shared::ids::{generate_id, StreamId, StreamKind};
use shop_shared::pb;
use tokio::sync::{mpsc, oneshot, watch};

use crate::domain::{
    self, email_key, order, Command, Customer, DomainError, Event, Order, Product,
};
use crate::log::{
    decode_envelope, CommandEntry, CommandRecord, CommitRecord, EventLog, LogError, PositionChunk,
    WriteBatch, RECORD_BYTES_MAX,
};

mod queue;
use queue::{Admission, Queue};

/// Applied batches that may wait for the flusher before the writer blocks.
const FLUSH_QUEUE_BATCHES: usize = 8;
/// How often the derived rows are written (and so how much a restart replays, at most).
const SNAPSHOT_INTERVAL: Duration = Duration::from_millis(100);
/// Pending derived rows that force a snapshot regardless of time (bounds memory); a
/// snapshot still being written is then finished in one batch.
const SNAPSHOT_PENDING_MAX: usize = 50_000;
/// A snapshot is written in this many slices (one per batch), of at least
/// `SNAPSHOT_SLICE_ROWS_MIN` rows. A sled batch holds sled's global lock while it is
/// applied (~10 µs a row here): a whole 100 ms snapshot at half load (~1,500 rows) held
/// it for 11–19 ms and stalled every command queued behind it; a slice holds it ~1 ms.
/// A fixed number of slices keeps a snapshot's duration in batches, not rows, so it
/// keeps up at any load.
const SNAPSHOT_SLICES: usize = 16;
const SNAPSHOT_SLICE_ROWS_MIN: usize = 64;

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
    #[error("the command queue is full ({0} commands waiting); retry with backoff")]
    Overloaded(usize),
    #[error("commands wait longer than {0} ms for the writer; retry with backoff")]
    QueueWait(u64),
    #[error("the command server is shutting down")]
    ShuttingDown,
    #[error("the event log is unusable: {0}")]
    Storage(String),
}

/// Tuning of the writer.
#[derive(Debug, Clone, Copy)]
pub struct WriterConfig {
    /// Commands that may wait in the queue.
    pub queue_capacity: usize,
    /// Commands decided into one atomic batch.
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
    command: Command,
    meta: CommandMeta,
    reply: oneshot::Sender<Result<Accepted, WriteError>>,
    queued_at: Instant,
}

/// Cloneable handle to submit commands.
#[derive(Clone)]
pub struct Writer {
    queue: mpsc::Sender<Submission>,
    capacity: usize,
    admission: Arc<Admission>,
    failure: watch::Receiver<Option<String>>,
}

/// Progress of the writer, for the relay, status and health.
#[derive(Clone)]
pub struct WriterWatch {
    /// Last position known durable.
    pub durable_position: watch::Receiver<u64>,
    /// Set when the log failed and the writer stopped.
    pub failure: watch::Receiver<Option<String>>,
    /// Recent group-commit syncs.
    pub syncs: Arc<SyncStats>,
    /// The newest written events, for the relay.
    pub recent: Arc<Recent>,
}

/// The newest events the writer wrote, as it encoded them (the exact log bytes), up to
/// [`RECENT_BYTES_MAX`]: the relay publishes what just became durable from here, without
/// reading the log back (a sled read waits for sled's global lock while the writer or the
/// flusher holds it). Positions are consecutive; older ones are read from the log.
#[derive(Default)]
pub struct Recent {
    inner: std::sync::Mutex<RecentEvents>,
}

#[derive(Default)]
struct RecentEvents {
    /// Position of `events[0]`.
    first: u64,
    events: std::collections::VecDeque<bytes::Bytes>,
    bytes: usize,
}

/// Envelope bytes [`Recent`] keeps at most.
const RECENT_BYTES_MAX: usize = 8 << 20;

impl Recent {
    fn lock(&self) -> std::sync::MutexGuard<'_, RecentEvents> {
        // Nothing panics while holding it; if something did, the data is still whole.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Appends the events written at `first`, `first + 1`, ...
    fn extend(&self, first: u64, events: Vec<bytes::Bytes>) {
        let mut r = self.lock();
        if r.first + r.events.len() as u64 != first {
            r.events.clear();
            r.bytes = 0;
            r.first = first;
        }
        for e in events {
            r.bytes += e.len();
            r.events.push_back(e);
        }
        while r.bytes > RECENT_BYTES_MAX {
            match r.events.pop_front() {
                Some(e) => {
                    r.bytes -= e.len();
                    r.first += 1;
                }
                None => break,
            }
        }
    }

    /// The events at positions `from..=to`, if all of them are held.
    pub fn range(&self, from: u64, to: u64) -> Option<Vec<(u64, bytes::Bytes)>> {
        let r = self.lock();
        let end = r.first + r.events.len() as u64;
        if from > to || from < r.first || to >= end {
            return None;
        }
        let skip = usize::try_from(from - r.first).ok()?;
        let take = usize::try_from(to - from + 1).ok()?;
        Some(
            (from..)
                .zip(r.events.iter().skip(skip).take(take).cloned())
                .collect(),
        )
    }
}

/// The last syncs' durations and sizes (a ring of [`SYNC_SAMPLES`]), for status, and
/// every sync in two Prometheus histograms.
pub struct SyncStats {
    samples: std::sync::Mutex<SyncSamples>,
    /// `shop_group_commit_sync_seconds`: how long each group-commit sync took.
    pub sync_seconds: Histogram,
    /// `shop_group_commit_commands`: commands acknowledged by each sync.
    pub commands_per_sync: Histogram,
}

/// Upper bounds of the commands-per-sync histogram (the batch limit defaults to 1024).
const COMMANDS_PER_SYNC_BUCKETS: [f64; 12] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0,
];

impl Default for SyncStats {
    fn default() -> Self {
        SyncStats {
            samples: std::sync::Mutex::default(),
            sync_seconds: shop_shared::metrics::latency_histogram(),
            commands_per_sync: Histogram::new(COMMANDS_PER_SYNC_BUCKETS),
        }
    }
}

#[derive(Default)]
struct SyncSamples {
    /// (duration µs, commands acknowledged) per sync, oldest overwritten first.
    ring: Vec<(u64, u64)>,
    next: usize,
    total: u64,
}

/// Syncs remembered for the status percentiles.
const SYNC_SAMPLES: usize = 4096;

/// Percentiles of the recent syncs.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SyncSummary {
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
    pub commands_per_sync: f64,
    pub total: u64,
}

impl SyncStats {
    fn record(&self, took: Duration, commands: u64) {
        self.sync_seconds.observe(took.as_secs_f64());
        self.commands_per_sync.observe(commands as f64);
        if let Ok(mut s) = self.samples.lock() {
            let sample = (
                u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
                commands,
            );
            if s.ring.len() < SYNC_SAMPLES {
                s.ring.push(sample);
            } else {
                let i = s.next;
                s.ring[i] = sample;
            }
            s.next = (s.next + 1) % SYNC_SAMPLES;
            s.total += 1;
        }
    }

    pub fn summary(&self) -> SyncSummary {
        let Ok(s) = self.samples.lock() else {
            return SyncSummary::default();
        };
        if s.ring.is_empty() {
            return SyncSummary::default();
        }
        let mut durations: Vec<u64> = s.ring.iter().map(|(d, _)| *d).collect();
        durations.sort_unstable();
        let at = |q: f64| durations[((durations.len() - 1) as f64 * q) as usize];
        let commands: u64 = s.ring.iter().map(|(_, c)| *c).sum();
        SyncSummary {
            p50_us: at(0.5),
            p99_us: at(0.99),
            max_us: at(1.0),
            commands_per_sync: commands as f64 / s.ring.len() as f64,
            total: s.total,
        }
    }
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
        let decider = Decider::open(log.clone())?;
        let last_position = decider.next_position - 1;

        let (queue_tx, queue_rx) = mpsc::channel(config.queue_capacity.max(1));
        let (flush_tx, flush_rx) = std::sync::mpsc::sync_channel(FLUSH_QUEUE_BATCHES);
        let (durable_tx, durable_rx) = watch::channel(last_position);
        let (failure_tx, failure_rx) = watch::channel(None);
        let failure_tx = Arc::new(failure_tx);
        let syncs = Arc::new(SyncStats::default());
        let recent = Arc::new(Recent::default());
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
            let recent = recent.clone();
            std::thread::Builder::new()
                .name("shop-writer".into())
                .spawn(move || writer_loop(decider, queue, flush_tx, &recent, &failure_tx))
                .map_err(|source| LogError::Io {
                    path: "writer thread".into(),
                    source,
                })?
        };
        let flusher = std::thread::Builder::new()
            .name("shop-flusher".into())
            .spawn({
                let syncs = syncs.clone();
                move || flusher_loop(&log, flush_rx, &durable_tx, &failure_tx, &syncs)
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
                recent,
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
            command,
            meta,
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

    fn stopped(&self) -> WriteError {
        match self.failure.borrow().clone() {
            Some(reason) => WriteError::Storage(reason),
            None => WriteError::ShuttingDown,
        }
    }
}

type Reply = (
    oneshot::Sender<Result<Accepted, WriteError>>,
    Result<Accepted, WriteError>,
);

/// An applied batch waiting for a sync.
struct FlushJob {
    replies: Vec<Reply>,
    last_position: u64,
}

fn writer_loop(
    mut decider: Decider,
    mut queue: Queue,
    flush: std::sync::mpsc::SyncSender<FlushJob>,
    recent: &Recent,
    failure: &watch::Sender<Option<String>>,
) {
    let mut submissions = Vec::with_capacity(queue.batch_max);
    loop {
        // While a snapshot is being written, an idle writer keeps writing it.
        let wait = !decider.snapshot_in_progress();
        if queue.next_batch(&mut submissions, wait).is_none() {
            break;
        }
        let first = decider.next_position;
        let (replies, batch, written) = match decider.decide_batch(&mut submissions) {
            Ok(done) => done,
            Err(error) => {
                fail(failure, &error);
                return;
            }
        };
        if !batch.is_empty() {
            if let Err(error) = decider.log.apply(batch) {
                // Nothing of this batch was acknowledged; its replies are dropped, so
                // their callers see the storage failure.
                fail(failure, &error);
                return;
            }
        }
        if replies.is_empty() && decider.snapshot_in_progress() {
            // A slice of a snapshot alone: synced with the next commands (or the last
            // slice), like any applied batch.
            continue;
        }
        // Before the flush job: by the time a position is durable, it is here.
        if !written.is_empty() {
            recent.extend(first, written);
        }
        let job = FlushJob {
            replies,
            last_position: decider.next_position - 1,
        };
        if flush.send(job).is_err() {
            // The flusher stopped after a sync failure; it reported it.
            return;
        }
    }
    // Shutting down: a last snapshot, so the next start replays nothing.
    let mut batch = WriteBatch::default();
    decider.snapshot_whole(&mut batch);
    match decider.log.apply(batch) {
        Ok(()) => {
            let _ = flush.send(FlushJob {
                replies: Vec::new(),
                last_position: decider.next_position - 1,
            });
        }
        Err(error) => fail(failure, &error),
    }
    tracing::debug!("command queue closed; writer done");
}

fn fail(failure: &watch::Sender<Option<String>>, error: &LogError) {
    tracing::error!(%error, "event log write failed; the command server stops accepting commands");
    failure.send_replace(Some(error.to_string()));
}

fn flusher_loop(
    log: &EventLog,
    jobs: std::sync::mpsc::Receiver<FlushJob>,
    durable: &watch::Sender<u64>,
    failure: &watch::Sender<Option<String>>,
    syncs: &SyncStats,
) {
    let mut pending = Vec::new();
    while let Ok(first) = jobs.recv() {
        pending.push(first);
        while let Ok(more) = jobs.try_recv() {
            pending.push(more);
        }
        let started = Instant::now();
        let synced = log.sync();
        let commands: usize = pending.iter().map(|j| j.replies.len()).sum();
        syncs.record(started.elapsed(), commands as u64);
        if let Err(error) = synced {
            // Unknown what reached the disk: acknowledge nothing more, ever.
            tracing::error!(%error, "sync of the event log failed; the command server stops accepting commands");
            failure.send_replace(Some(error.to_string()));
            return;
        }
        // Publish the new durable position before replying, so that a client reading the
        // log (or the relay) right after its reply sees its own events.
        let last = pending
            .iter()
            .map(|j| j.last_position)
            .fold(*durable.borrow(), u64::max);
        durable.send_if_modified(|position| {
            let changed = *position != last;
            *position = last;
            changed
        });
        for job in pending.drain(..) {
            for (reply, outcome) in job.replies {
                let _client_gone = reply.send(outcome);
            }
        }
    }
    tracing::debug!("writer finished; flusher done");
}

/// Derived rows not yet written: the next snapshot writes them.
#[derive(Default)]
struct Pending {
    /// Idempotency records of accepted commands.
    commands: HashMap<String, CommandRecord>,
    /// Stream index: stream → (first version, positions of it and the next versions).
    streams: HashMap<StreamId, (u64, Vec<u64>)>,
}

impl Pending {
    fn len(&self) -> usize {
        self.commands.len() + self.streams.len()
    }

    fn index(&mut self, stream: &StreamId, version: u64, position: u64) {
        self.streams
            .entry(stream.clone())
            .or_insert_with(|| (version, Vec::new()))
            .1
            .push(position);
    }
}

/// A snapshot of the derived rows as of `derived`, being written a slice per batch.
struct Snapshot {
    /// Rows still to write (the next one last).
    rows: Vec<SnapshotRow>,
    /// Rows written per batch.
    slice: usize,
    /// The idempotency records in it (looked up by the writer until they are stored).
    commands: HashMap<String, CommandRecord>,
    derived: u64,
}

/// One derived row of a snapshot, encoded as it was when the snapshot was taken.
enum SnapshotRow {
    State(StreamId, Vec<u8>),
    Stream(StreamId, u64, PositionChunk),
    Command(String),
}

/// The commit records of one batch, closed at `RECORD_BYTES_MAX`.
struct Records {
    first: u64,
    open: CommitRecord,
    bytes: usize,
    /// Every envelope of the batch, in position order (for [`Recent`]).
    written: Vec<bytes::Bytes>,
}

impl Records {
    fn new(first: u64) -> Self {
        Records {
            first,
            open: CommitRecord::default(),
            bytes: 0,
            written: Vec::new(),
        }
    }

    fn push(&mut self, position: u64, envelope: bytes::Bytes, batch: &mut WriteBatch) {
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
    fn command(&mut self, entry: CommandEntry) {
        self.open.commands.push(entry);
    }

    fn close(&mut self, batch: &mut WriteBatch) {
        if !self.open.envelopes.is_empty() {
            batch.record(self.first, &self.open);
        }
        self.open = CommitRecord::default();
        self.bytes = 0;
    }
}

/// The deciding half of the writer: positions, time, states and pending derived rows.
struct Decider {
    log: Arc<EventLog>,
    /// Aggregate states, kept across batches (bounded) so deciding rarely reads sled.
    states: States,
    pending: Pending,
    /// The snapshot being written, a slice per batch.
    snapshot: Option<Snapshot>,
    last_snapshot: Instant,
    next_position: u64,
    /// `occurred_at` of the last event, so that it never decreases along positions.
    last_micros: i64,
}

impl Decider {
    /// The decider over `log`, its derived rows rebuilt (see [`Self::recover`]).
    fn open(log: Arc<EventLog>) -> Result<Self, LogError> {
        let last_position = log.last_position()?;
        let last_micros = match log.event(last_position)? {
            Some(bytes) => pb::EventEnvelope::decode(bytes.as_ref())
                .ok()
                .and_then(|e| e.occurred_at)
                .map_or(0, |t| shop_shared::events::micros_from_timestamp(&t)),
            None => 0,
        };
        let mut decider = Decider {
            log: log.clone(),
            states: States::new(log),
            pending: Pending::default(),
            snapshot: None,
            last_snapshot: Instant::now(),
            next_position: last_position + 1,
            last_micros,
        };
        decider.recover()?;
        Ok(decider)
    }

    /// Rebuilds the derived rows of the records after the last snapshot, and writes
    /// them (synced) before anything else happens.
    fn recover(&mut self) -> Result<(), LogError> {
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
        let mut scratch = WriteBatch::default();
        let mut replayed = 0u64;
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
                self.states.load(&stream)?;
                if envelope.stream_version > self.states.version(&stream) {
                    let version = self.states.evolve(&stream, &event, &mut scratch)?;
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
        }
        // The email and open-order rows were written with the commits; only the derived
        // rows are new.
        let mut batch = WriteBatch::default();
        self.snapshot_whole(&mut batch);
        self.log.apply(batch)?;
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

    fn snapshot_in_progress(&self) -> bool {
        self.snapshot.is_some()
    }

    /// Takes a snapshot of the derived rows (states, stream index, idempotency
    /// records), complete up to the last decided position, to be written from now on.
    fn start_snapshot(&mut self) {
        let mut rows = Vec::with_capacity(
            self.states.dirty.len() + self.pending.streams.len() + self.pending.commands.len(),
        );
        self.states.snapshot_dirty(&mut rows);
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
    fn write_snapshot(&mut self, batch: &mut WriteBatch, whole: bool) {
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
            self.states.trim();
        }
    }

    /// Writes every derived row into `batch`: the rest of a snapshot being written and
    /// a new one of everything since (at start-up and shutdown).
    fn snapshot_whole(&mut self, batch: &mut WriteBatch) {
        self.write_snapshot(batch, true);
        self.start_snapshot();
        self.write_snapshot(batch, true);
    }

    /// The idempotency record of `command_id` (pending, being written, or stored).
    fn command_record(&self, command_id: &str) -> Result<Option<CommandRecord>, LogError> {
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

    /// Decides every submission of a batch; returns the replies and the rows to write.
    fn decide_batch(
        &mut self,
        submissions: &mut Vec<Submission>,
    ) -> Result<(Vec<Reply>, WriteBatch, Vec<bytes::Bytes>), LogError> {
        let mut batch = WriteBatch::default();
        let mut records = Records::new(self.next_position);
        let mut replies = Vec::with_capacity(submissions.len());
        for s in submissions.drain(..) {
            let outcome = self.decide_one(&s.command, &s.meta, &mut batch, &mut records)?;
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
        batch: &mut WriteBatch,
        records: &mut Records,
    ) -> Result<Result<Accepted, WriteError>, LogError> {
        if meta.idempotent {
            if let Some(record) = self.command_record(&meta.command_id)? {
                return Ok(if record.request_hash == meta.request_hash {
                    Ok(Accepted {
                        result: record.result.unwrap_or_default(),
                        replayed: true,
                    })
                } else {
                    Err(WriteError::CommandIdReused(meta.command_id.clone()))
                });
            }
        }

        let states = &mut self.states;
        for stream in command.streams_read() {
            states.load(&stream)?;
        }
        if let Command::RegisterCustomer { email, .. } = command {
            states.load_email(&email_key(email))?;
        }
        let own = command.stream();
        if let (StreamKind::Order, Some(order)) = (own.kind, states.orders.get(&own.id)) {
            let products: Vec<StreamId> = order.iter().flat_map(order::products_of).collect();
            for p in products {
                states.load(&p)?;
            }
        }
        if let Some(expected) = meta.expected_version {
            let actual = states.version(&own);
            if actual != expected {
                return Ok(Err(WriteError::VersionConflict {
                    stream: own.to_string(),
                    expected,
                    actual,
                }));
            }
        }
        let events = match domain::decide(command, &*states) {
            Ok(events) => events,
            Err(refused) => return Ok(Err(refused.into())),
        };

        let event_count = u32::try_from(events.len()).unwrap_or(u32::MAX);
        let now = now_micros().max(self.last_micros);
        self.last_micros = now;
        let occurred_at = timestamp_from_micros(now);
        let mut own_version = self.states.version(&own);
        let mut position = 0;
        for event in events {
            position = self.next_position;
            self.next_position += 1;
            let stream = stream_of(&event);
            let version = self.states.evolve(&stream, &event, batch)?;
            if stream == own {
                own_version = version;
            }
            self.pending.index(&stream, version, position);
            let envelope = pb::EventEnvelope {
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
            };
            records.push(position, envelope.encode_to_vec().into(), batch);
        }
        let result = pb::CommandResult {
            stream_id: own.to_string(),
            version: own_version,
            position,
            event_count,
            id: own.id.clone(),
        };
        if meta.idempotent {
            let record = CommandRecord {
                request_hash: meta.request_hash.to_vec(),
                result: Some(result.clone()),
            };
            records.command(CommandEntry {
                command_id: meta.command_id.clone(),
                record: Some(record.clone()),
            });
            self.pending
                .commands
                .insert(meta.command_id.clone(), record);
        }
        Ok(Ok(Accepted {
            result,
            replayed: false,
        }))
    }
}

/// Aggregates cached in memory beyond this many are dropped at a snapshot (they are all
/// in sled by then).
const STATE_CACHE_MAX: usize = 20_000;

/// Aggregate states: loaded from the log on first use, evolved in memory as commands are
/// decided, written to sled with each snapshot and kept cached (bounded, see
/// [`STATE_CACHE_MAX`]). `None` = known not to exist.
struct States {
    log: Arc<EventLog>,
    customers: HashMap<String, Option<Customer>>,
    products: HashMap<String, Option<Product>>,
    orders: HashMap<String, Option<Order>>,
    /// Email key → live owner (`None`: known free).
    emails: HashMap<String, Option<String>>,
    /// Streams changed since the last snapshot: never dropped from the cache before it.
    dirty: HashSet<StreamId>,
}

impl States {
    fn new(log: Arc<EventLog>) -> Self {
        States {
            log,
            customers: HashMap::new(),
            products: HashMap::new(),
            orders: HashMap::new(),
            emails: HashMap::new(),
            dirty: HashSet::new(),
        }
    }

    /// Once a snapshot is stored: drops the cache if it grew too large, except the
    /// states changed since the snapshot was taken (not stored yet).
    fn trim(&mut self) {
        let cached =
            self.customers.len() + self.products.len() + self.orders.len() + self.emails.len();
        if cached <= STATE_CACHE_MAX {
            return;
        }
        let dirty = &self.dirty;
        let keep = |kind: StreamKind, id: &String| {
            dirty.contains(&StreamId {
                kind,
                id: id.clone(),
            })
        };
        self.customers
            .retain(|id, _| keep(StreamKind::Customer, id));
        self.products.retain(|id, _| keep(StreamKind::Product, id));
        self.orders.retain(|id, _| keep(StreamKind::Order, id));
        // Email rows are written with the commits: always stored.
        self.emails.clear();
    }

    fn load(&mut self, stream: &StreamId) -> Result<(), LogError> {
        let log = &self.log;
        match stream.kind {
            StreamKind::Customer => {
                if !self.customers.contains_key(&stream.id) {
                    let state = log.state::<Customer>(stream)?;
                    self.customers.insert(stream.id.clone(), state);
                }
            }
            StreamKind::Product => {
                if !self.products.contains_key(&stream.id) {
                    let state = log.state::<Product>(stream)?;
                    self.products.insert(stream.id.clone(), state);
                }
            }
            StreamKind::Order => {
                if !self.orders.contains_key(&stream.id) {
                    let state = log.state::<Order>(stream)?;
                    self.orders.insert(stream.id.clone(), state);
                }
            }
        }
        Ok(())
    }

    /// Loads the owner of an email key (for RegisterCustomer).
    fn load_email(&mut self, key: &str) -> Result<(), LogError> {
        if !self.emails.contains_key(key) {
            let owner = self.log.email_owner(key)?;
            self.emails.insert(key.to_string(), owner);
        }
        Ok(())
    }

    fn version(&self, stream: &StreamId) -> u64 {
        let version = match stream.kind {
            StreamKind::Customer => self
                .customers
                .get(&stream.id)
                .and_then(|s| s.as_ref().map(|c| c.version)),
            StreamKind::Product => self
                .products
                .get(&stream.id)
                .and_then(|s| s.as_ref().map(|p| p.version)),
            StreamKind::Order => self
                .orders
                .get(&stream.id)
                .and_then(|s| s.as_ref().map(|o| o.version)),
        };
        version.unwrap_or(0)
    }

    /// Folds an accepted event into its stream's state, maintains the secondary indexes
    /// in `batch`, and returns the stream's new version.
    fn evolve(
        &mut self,
        stream: &StreamId,
        event: &Event,
        batch: &mut WriteBatch,
    ) -> Result<u64, LogError> {
        self.load(stream)?;
        self.dirty.insert(stream.clone());
        let version = match stream.kind {
            StreamKind::Customer => {
                let before = self.customers.get_mut(&stream.id).and_then(Option::take);
                let freed_email = match (event, &before) {
                    (Event::CustomerDeleted(_), Some(c)) => Some(email_key(&c.email)),
                    _ => None,
                };
                let after = domain::customer::evolve(before, event);
                if let Event::CustomerRegistered(e) = event {
                    let key = email_key(&e.email);
                    batch.email(&key, Some(&e.customer_id));
                    self.emails.insert(key, Some(e.customer_id.clone()));
                }
                if let Some(key) = freed_email {
                    batch.email(&key, None);
                    self.emails.insert(key, None);
                }
                let version = after.version;
                self.customers.insert(stream.id.clone(), Some(after));
                version
            }
            StreamKind::Product => {
                let before = self.products.get_mut(&stream.id).and_then(Option::take);
                let after = domain::product::evolve(before, event);
                debug_assert!(
                    0 <= after.reserved && after.reserved <= after.on_hand,
                    "stock invariant broken: {after:?}"
                );
                let version = after.version;
                self.products.insert(stream.id.clone(), Some(after));
                version
            }
            StreamKind::Order => {
                let before = self.orders.get_mut(&stream.id).and_then(Option::take);
                let after = domain::order::evolve(before, event);
                batch.open_order(&after.customer_id, &stream.id, after.is_open());
                let version = after.version;
                self.orders.insert(stream.id.clone(), Some(after));
                version
            }
        };
        Ok(version)
    }

    /// The encoded states changed since the last snapshot, as snapshot rows.
    fn snapshot_dirty(&mut self, rows: &mut Vec<SnapshotRow>) {
        for stream in self.dirty.drain() {
            let bytes = match stream.kind {
                StreamKind::Customer => self
                    .customers
                    .get(&stream.id)
                    .and_then(Option::as_ref)
                    .map(Message::encode_to_vec),
                StreamKind::Product => self
                    .products
                    .get(&stream.id)
                    .and_then(Option::as_ref)
                    .map(Message::encode_to_vec),
                StreamKind::Order => self
                    .orders
                    .get(&stream.id)
                    .and_then(Option::as_ref)
                    .map(Message::encode_to_vec),
            };
            if let Some(bytes) = bytes {
                rows.push(SnapshotRow::State(stream, bytes));
            }
        }
    }
}

impl domain::State for States {
    fn customer(&self, customer_id: &str) -> Option<&Customer> {
        self.customers.get(customer_id).and_then(Option::as_ref)
    }

    fn product(&self, sku: &str) -> Option<&Product> {
        self.products.get(sku).and_then(Option::as_ref)
    }

    fn order(&self, order_id: &str) -> Option<&Order> {
        self.orders.get(order_id).and_then(Option::as_ref)
    }

    fn email_owner(&self, email_key: &str) -> Option<&str> {
        self.emails.get(email_key).and_then(|o| o.as_deref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::State;
    use crate::log::Durability;

    /// A decider whose snapshots the test starts itself.
    fn decider(log: Arc<EventLog>) -> Decider {
        let mut decider = Decider::open(log).expect("decider");
        decider.last_snapshot = Instant::now() + Duration::from_secs(3600);
        decider
    }

    fn submission(command: Command, command_id: &str) -> Submission {
        let (reply, _) = oneshot::channel();
        Submission {
            meta: CommandMeta {
                command_id: command_id.to_string(),
                idempotent: true,
                request_hash: CommandMeta::hash_request(command_id, b""),
                expected_version: None,
                correlation_id: String::new(),
                causation_id: String::new(),
                traceparent: None,
                actor: String::new(),
            },
            command,
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
        decider: &mut Decider,
        commands: Vec<(Command, &str)>,
    ) -> Vec<Result<Accepted, WriteError>> {
        let mut submissions = commands
            .into_iter()
            .map(|(c, id)| submission(c, id))
            .collect();
        let (replies, batch, _) = decider.decide_batch(&mut submissions).expect("decide");
        decider.log.apply(batch).expect("apply");
        decider.log.sync().expect("sync");
        replies.into_iter().map(|(_, outcome)| outcome).collect()
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
            let mut decider = decider(open());
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
            assert!(run(&mut decider, commands).iter().all(Result::is_ok));
            // A snapshot taken now (on_hand 15, version 6), of which only the first row,
            // the product's state, is stored before the "crash".
            assert!(!decider.snapshot_in_progress());
            decider.start_snapshot();
            let mut batch = WriteBatch::default();
            decider.snapshot.as_mut().expect("started").slice = 1;
            decider.write_snapshot(&mut batch, false);
            assert!(decider.snapshot_in_progress());
            decider.log.apply(batch).expect("apply");
            decider.log.sync().expect("sync");
            assert_eq!(
                decider
                    .log
                    .state::<Product>(&product)
                    .expect("state")
                    .map(|p| (p.version, p.on_hand)),
                Some((6, 15)),
                "the state is stored beyond derived"
            );
            assert_eq!(decider.log.derived_position().expect("derived"), 0);
        }
        let mut decider = Decider::open(open()).expect("restart");
        assert_eq!(
            decider.states.product(sku).map(|p| (p.version, p.on_hand)),
            Some((6, 15))
        );
        let stored = decider
            .log
            .state::<Product>(&product)
            .expect("state")
            .expect("stored");
        assert_eq!((stored.version, stored.on_hand), (6, 15));
        assert_eq!(decider.log.derived_position().expect("derived"), 6);
        let versions: Vec<u64> = decider
            .log
            .read_stream(&product, 1, 100)
            .expect("read")
            .iter()
            .map(|e| e.stream_version)
            .collect();
        assert_eq!(versions, (1..=6).collect::<Vec<_>>());
        // Idempotency survived, and the stream goes on from version 6.
        let replies = run(
            &mut decider,
            vec![(restock(sku, 1), "r4"), (restock(sku, 2), "r5")],
        );
        assert!(matches!(&replies[0], Ok(a) if a.replayed && a.result.version == 6));
        assert!(matches!(&replies[1], Ok(a) if !a.replayed && a.result.version == 7));
        assert_eq!(decider.states.product(sku).map(|p| p.on_hand), Some(17));
    }

    /// `SNAPSHOT_SLICES` slices, the `derived` mark with the last, and idempotency answered from the snapshot while its rows are not stored.
    #[test]
    fn a_snapshot_is_written_in_slices_and_marks_derived_with_the_last() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = Arc::new(EventLog::open(dir.path(), Durability::Fsync, 8 << 20).expect("open"));
        let mut decider = decider(log);
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
        assert!(run(&mut decider, commands).iter().all(Result::is_ok));
        assert!(!decider.snapshot_in_progress());
        decider.start_snapshot();
        // 600 states, 600 index chunks, 600 idempotency rows.
        let mut slices = 0;
        while decider.snapshot_in_progress() {
            assert_eq!(decider.log.derived_position().expect("derived"), 0);
            // Answered while being written, before and after its row is stored.
            let replies = run(&mut decider, vec![(restock("p-599", 1), "c599")]);
            assert!(matches!(&replies[0], Ok(a) if a.replayed && a.result.position == 600));
            // Index chunks stored beyond `derived` and the tail after it: listed once.
            for sku in ["p-0", "p-599"] {
                let events = decider
                    .log
                    .read_stream(&StreamId::product(sku), 1, 10)
                    .expect("read");
                assert_eq!(events.len(), 1, "{sku} while the snapshot is written");
            }
            slices += 1;
        }
        assert_eq!(slices, SNAPSHOT_SLICES);
        assert_eq!(decider.log.derived_position().expect("derived"), 600);
        assert!(decider.log.command("c0").expect("read").is_some());
    }

    fn events(range: std::ops::Range<u64>) -> Vec<bytes::Bytes> {
        range.map(|p| bytes::Bytes::from(p.to_string())).collect()
    }

    #[test]
    fn recent_returns_only_ranges_it_holds_whole() {
        let recent = Recent::default();
        assert_eq!(recent.range(1, 1), None);
        recent.extend(1, events(1..4));
        recent.extend(4, events(4..6));
        let got = recent.range(2, 5).expect("held");
        assert_eq!(
            got,
            vec![
                (2, bytes::Bytes::from("2")),
                (3, bytes::Bytes::from("3")),
                (4, bytes::Bytes::from("4")),
                (5, bytes::Bytes::from("5")),
            ]
        );
        assert_eq!(recent.range(5, 6), None, "6 is not written yet");
        assert_eq!(recent.range(0, 1), None);
        assert_eq!(recent.range(3, 2), None);
    }

    #[test]
    fn recent_restarts_at_a_discontinuity_and_drops_the_oldest_beyond_its_budget() {
        let recent = Recent::default();
        recent.extend(10, events(10..12));
        recent.extend(20, events(20..21));
        assert_eq!(
            recent.range(10, 10),
            None,
            "not continuous with 20: dropped"
        );
        assert!(recent.range(20, 20).is_some());

        let big = bytes::Bytes::from(vec![0u8; super::RECENT_BYTES_MAX / 4 + 1]);
        recent.extend(21, vec![big.clone(), big.clone(), big.clone(), big.clone()]);
        assert_eq!(recent.range(20, 21), None, "the oldest went first");
        assert!(recent.range(22, 24).is_some());
    }
}
