//! The consumer: JetStream → batches → projections → one atomic sled write.
//!
//! - Reads the stream in sequence order with an ordered consumer, starting right after
//!   the checkpoint.
//! - Applies a batch of events to the views and writes views, indexes, the events' copies
//!   and the new checkpoint in **one** sled batch: after a crash the views are exactly a
//!   fold of events 1..checkpoint, never partly ahead or behind.
//! - Skips anything at or below the checkpoint (redelivery); refuses to apply past a gap
//!   in sequences, or an event whose position is not its sequence, reporting why and
//!   retrying from the checkpoint with backoff (the relay may be republishing).
//! - Refuses a stream whose event at the checkpoint is not the one the views were built
//!   from (the views belong to another stream: rebuild them).
//! - After each commit: wakes `min_position` waiters and publishes watched changes.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull, consumer::DeliverPolicy};
use futures::{FutureExt, StreamExt};
use prost::Message;
use shop_shared::pb;
use shop_shared::subjects::HEADER_EVENT_ID;
use shop_shared::task::{
    blocking, wait_connected, Backoff, Panicked, Severity, TaskError, CONNECT_WAIT,
};
use shop_shared::telemetry;
use tokio::sync::watch;

use crate::projections::{self, Changed, Update, ViewKey};
use crate::store::{Overlay, Store, StoreError};
use crate::watchers::Watchers;

/// How often sled's buffers are written out (the consumer is the only flusher), and so
/// at most how much a crash makes it apply again. The store writes single inserts, which
/// stay in sled's buffers until a flush (a sled batch wrote them out each time, and
/// held every reader while a flush ran: see `store.rs`); a flush no longer stops
/// readers, so it runs often, and right after the first batch of a run.
const FLUSH_INTERVAL: Duration = Duration::from_millis(100);
/// How often an idle consumer refreshes the stream's last sequence.
const STREAM_INFO_INTERVAL: Duration = Duration::from_secs(2);
/// Longest pause between attempts after an error.
const RETRY_DELAY_MAX: Duration = Duration::from_secs(2);

/// Consumer tuning.
#[derive(Debug, Clone, Copy)]
pub struct ConsumerConfig {
    /// Events applied in one atomic write, at most.
    pub batch_events_max: usize,
}

/// Progress of the consumer, shared with the gRPC side.
pub struct ConsumerStatus {
    /// Last applied (committed) position.
    pub applied: watch::Sender<u64>,
    /// Last sequence of the stream, as last seen.
    stream_last: AtomicU64,
    /// Consuming normally (no error).
    healthy: AtomicBool,
    /// The NATS client is connected.
    connected: AtomicBool,
    error: Mutex<Option<String>>,
}

impl ConsumerStatus {
    pub fn new(applied: u64) -> Arc<Self> {
        Arc::new(ConsumerStatus {
            applied: watch::channel(applied).0,
            stream_last: AtomicU64::new(applied),
            healthy: AtomicBool::new(false),
            connected: AtomicBool::new(false),
            error: Mutex::new(None),
        })
    }

    pub fn applied(&self) -> u64 {
        *self.applied.borrow()
    }

    pub fn stream_last(&self) -> u64 {
        self.stream_last.load(Ordering::Acquire).max(self.applied())
    }

    /// Applying events: connected and not stopped by an error.
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire) && self.connected()
    }

    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    pub fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::Release);
    }

    pub fn error(&self) -> Option<String> {
        self.error.lock().map(|e| e.clone()).unwrap_or(None)
    }

    fn set_error(&self, error: Option<String>) {
        self.healthy.store(error.is_none(), Ordering::Release);
        if let Ok(mut slot) = self.error.lock() {
            *slot = error;
        }
    }

    /// The applied position and how far the stream's end (as last seen) is ahead of it:
    /// what `GetStatus`, the metrics and every answer's freshness metadata report.
    pub fn freshness(&self) -> Freshness {
        let applied = self.applied();
        let stream_last = self.stream_last();
        Freshness {
            applied,
            stream_last,
            lag: stream_last.saturating_sub(applied),
        }
    }

    fn saw_stream_last(&self, sequence: u64) {
        self.stream_last.store(sequence, Ordering::Release);
    }
}

/// How fresh the views are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Freshness {
    /// Last position applied to the views.
    pub applied: u64,
    /// Last sequence of the stream, as last seen (at least `applied`).
    pub stream_last: u64,
    /// `stream_last - applied`.
    pub lag: u64,
}

/// Why the consumer stopped applying.
#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    #[error("gap in the stream: expected sequence {expected}, got {got}; not applying past it")]
    Gap { expected: u64, got: u64 },
    #[error("event at sequence {sequence} cannot be applied: {reason}")]
    Poison { sequence: u64, reason: String },
    #[error("{0}")]
    Conflict(String),
    #[error("NATS: {0}")]
    Nats(String),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// A blocking step panicked: a bug.
    #[error(transparent)]
    Panicked(#[from] Panicked),
}

impl TaskError for ConsumerError {
    /// A gap or an unusable event may be the relay republishing: retried from the
    /// checkpoint. Another stream, a failing store or a bug stop the consumer.
    fn severity(&self) -> Severity {
        match self {
            ConsumerError::Gap { .. } | ConsumerError::Poison { .. } | ConsumerError::Nats(_) => {
                Severity::Transient
            }
            ConsumerError::Conflict(_) | ConsumerError::Store(_) | ConsumerError::Panicked(_) => {
                Severity::Fatal
            }
        }
    }
}

/// A consumer session's progress.
struct Session {
    /// Last committed position.
    checkpoint: u64,
    /// The apply running on a blocking thread, if any.
    inflight: Option<tokio::task::JoinHandle<Result<Applied, ConsumerError>>>,
    /// Committed since the last flush.
    dirty: bool,
}

/// One message, as the blocking apply step needs it.
struct Incoming {
    sequence: u64,
    payload: bytes::Bytes,
    /// The event's apply span, when its trace is sampled and spans are exported.
    span: Option<tracing::Span>,
}

/// A span per sampled event, child of the span in its `traceparent` header (the
/// command's server span): it lasts from the event's arrival to the commit of the batch
/// that applies it, so a trace shows the command, then the time until its events are
/// visible. Per-event children rather than one batch span with links: a trace viewer
/// then shows the view update inside the command's trace; the cost is paid only for
/// sampled events, and nothing at all when spans are not exported.
fn apply_span(message: &async_nats::jetstream::Message, sequence: u64) -> Option<tracing::Span> {
    if !telemetry::exporting() {
        return None;
    }
    let traceparent = message
        .headers
        .as_ref()?
        .get(shop_shared::subjects::HEADER_TRACEPARENT)?
        .as_str();
    let parent = telemetry::TraceParent::parse(traceparent).filter(|p| p.sampled)?;
    let span = tracing::info_span!(
        target: telemetry::EXPORT_TARGET,
        "apply",
        otel.name = "apply event to views",
        otel.kind = "consumer",
        messaging.system = "nats",
        position = sequence,
        trace_id = tracing::field::Empty,
        span_id = tracing::field::Empty,
    );
    telemetry::export_context(&span, Some(&parent));
    Some(span)
}

/// What a committed batch produced.
struct Applied {
    checkpoint: u64,
    updates: Vec<(ViewKey, Update)>,
    /// Applied up to `checkpoint`, then met this.
    stopped: Option<ConsumerError>,
}

/// The consumer task's state.
pub struct Consumer {
    pub store: Arc<Store>,
    pub client: async_nats::Client,
    pub stream_name: String,
    pub status: Arc<ConsumerStatus>,
    pub watchers: Arc<Watchers>,
    pub config: ConsumerConfig,
}

impl Consumer {
    /// Consumes until `stop` is set, or (rebuild) until the applied position reaches
    /// `until`. Errors are reported in the status and retried with backoff; only a
    /// conflicting stream or a failing store ends the task with an error.
    pub async fn run(
        self,
        mut stop: watch::Receiver<bool>,
        until: Option<u64>,
    ) -> Result<(), ConsumerError> {
        let js = jetstream::new(self.client.clone());
        let mut backoff = Backoff::new("consumer", RETRY_DELAY_MAX);
        let result = loop {
            if *stop.borrow() || until.is_some_and(|u| self.status.applied() >= u) {
                break Ok(());
            }
            let error = match self.consume(&js, &mut stop, until).await {
                Ok(()) => break Ok(()),
                Err(error) => error,
            };
            self.status.set_error(Some(error.to_string()));
            if error.severity() == Severity::Fatal {
                tracing::error!(%error, "consumer stopped");
                break Err(error);
            }
            backoff.wait(&error, &mut stop).await;
        };
        let store = self.store.clone();
        let _ = blocking("consumer", move || store.flush()).await;
        result
    }

    /// One consumer session: verify, then apply batches until an error or the end.
    async fn consume(
        &self,
        js: &jetstream::Context,
        stop: &mut watch::Receiver<bool>,
        until: Option<u64>,
    ) -> Result<(), ConsumerError> {
        if !wait_connected(&self.client, CONNECT_WAIT, stop).await {
            return Err(ConsumerError::Nats("not connected".into()));
        }
        let mut stream = js
            .get_stream(&self.stream_name)
            .await
            .map_err(|e| ConsumerError::Nats(format!("stream {}: {e}", self.stream_name)))?;
        let info = stream
            .info()
            .await
            .map_err(|e| ConsumerError::Nats(format!("stream info: {e}")))?
            .clone();
        self.status.saw_stream_last(info.state.last_sequence);
        let store = self.store.clone();
        let (checkpoint, checkpoint_event) =
            blocking("consumer", move || store.checkpoint()).await??;
        self.verify(
            &mut stream,
            info.state.last_sequence,
            checkpoint,
            &checkpoint_event,
        )
        .await?;

        let consumer = stream
            .create_consumer(pull::OrderedConfig {
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: checkpoint + 1,
                },
                max_batch: i64::try_from(self.config.batch_events_max).unwrap_or(1000),
                max_expires: shop_shared::nats::PULL_EXPIRES,
                ..Default::default()
            })
            .await
            .map_err(|e| ConsumerError::Nats(format!("create consumer: {e}")))?;
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| ConsumerError::Nats(format!("consumer messages: {e}")))?;
        self.status.set_error(None);
        tracing::info!(stream = %self.stream_name, from = checkpoint + 1, stream_last = info.state.last_sequence, "consuming");

        let mut session = Session {
            checkpoint,
            inflight: None,
            dirty: false,
        };
        let result = self
            .apply_messages(&mut session, &mut messages, &mut stream, stop, until)
            .await;
        // Never leave an apply running behind the session: a later session must start
        // from the checkpoint it commits.
        let drained = match session.inflight.take() {
            Some(apply) => self.finish(apply.await, &mut session),
            None => Ok(()),
        };
        result.and(drained)
    }

    /// Checks that the stream is the one the views were built from: it reaches the
    /// checkpoint, and the event there is the one applied last.
    async fn verify(
        &self,
        stream: &mut jetstream::stream::Stream,
        stream_last: u64,
        checkpoint: u64,
        checkpoint_event: &str,
    ) -> Result<(), ConsumerError> {
        if checkpoint == 0 {
            return Ok(());
        }
        if stream_last < checkpoint {
            return Err(ConsumerError::Nats(format!(
                "stream {} ends at sequence {} but the views are at {checkpoint}; waiting for the relay to republish",
                self.stream_name, stream_last
            )));
        }
        match stream.get_raw_message(checkpoint).await {
            Ok(message) => {
                let id = message
                    .headers
                    .get(HEADER_EVENT_ID)
                    .map(|v| v.as_str().to_string())
                    .unwrap_or_default();
                if id != checkpoint_event {
                    return Err(ConsumerError::Conflict(format!(
                        "the event at sequence {checkpoint} of stream {} is {id:?}, but the views were built with {checkpoint_event:?}: \
                         these views come from another stream. Rebuild them (query-server rebuild) or use another --data-dir.",
                        self.stream_name
                    )));
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, checkpoint, "cannot read the checkpoint's event to verify the stream; continuing")
            }
        }
        Ok(())
    }

    /// Applies batches as they come. Batching adapts to load: while one batch is being
    /// applied (on a blocking thread), arriving events are gathered, and the next apply
    /// takes all of them (up to `batch_events_max`). Idle, an event is applied at once;
    /// busy, batches grow and fold more updates of the same view into one write.
    async fn apply_messages(
        &self,
        session: &mut Session,
        messages: &mut pull::Ordered,
        stream: &mut jetstream::stream::Stream,
        stop: &mut watch::Receiver<bool>,
        until: Option<u64>,
    ) -> Result<(), ConsumerError> {
        let max = self.config.batch_events_max;
        let mut pending: Vec<Incoming> = Vec::with_capacity(max);
        // Last sequence received (handed to an apply or pending).
        let mut received = session.checkpoint;
        let mut last_flush = Instant::now()
            .checked_sub(FLUSH_INTERVAL)
            .unwrap_or_else(Instant::now);
        let mut info_tick = tokio::time::interval(STREAM_INFO_INTERVAL);
        info_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut flush_tick = tokio::time::interval(FLUSH_INTERVAL);
        flush_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if session.inflight.is_none() && !pending.is_empty() {
                self.launch(
                    session,
                    std::mem::replace(&mut pending, Vec::with_capacity(max)),
                );
            }
            if session.inflight.is_none() && until.is_some_and(|u| session.checkpoint >= u) {
                return Ok(());
            }
            let want_more = pending.len() < max && until.is_none_or(|u| received < u);
            tokio::select! {
                done = async {
                    match session.inflight.as_mut() {
                        Some(apply) => apply.await,
                        None => std::future::pending().await,
                    }
                }, if session.inflight.is_some() => {
                    session.inflight = None;
                    self.finish(done, session)?;
                    if session.dirty && last_flush.elapsed() >= FLUSH_INTERVAL {
                        self.flush().await?;
                        session.dirty = false;
                        last_flush = Instant::now();
                    }
                }
                next = messages.next(), if want_more => {
                    received = received.max(self.gather(next, messages, &mut pending, max)?);
                }
                _ = stop.changed() => return Ok(()),
                _ = flush_tick.tick() => {
                    if session.dirty && session.inflight.is_none() {
                        self.flush().await?;
                        session.dirty = false;
                        last_flush = Instant::now();
                    }
                }
                _ = info_tick.tick() => {
                    if let Ok(info) = stream.info().await {
                        self.status.saw_stream_last(info.state.last_sequence);
                    }
                }
            }
        }
    }

    /// Takes `next` and every message already arrived after it (up to `max` pending):
    /// the last sequence taken.
    fn gather(
        &self,
        mut next: Option<Result<jetstream::Message, pull::OrderedError>>,
        messages: &mut pull::Ordered,
        pending: &mut Vec<Incoming>,
        max: usize,
    ) -> Result<u64, ConsumerError> {
        let mut last = 0;
        loop {
            let message = match next {
                Some(Ok(message)) => message,
                Some(Err(e)) => return Err(ConsumerError::Nats(format!("consumer: {e}"))),
                None => return Err(ConsumerError::Nats("consumer ended".into())),
            };
            let info = message
                .info()
                .map_err(|e| ConsumerError::Nats(format!("message metadata: {e}")))?;
            self.status
                .saw_stream_last(info.stream_sequence + info.pending);
            last = last.max(info.stream_sequence);
            pending.push(Incoming {
                sequence: info.stream_sequence,
                payload: message.payload.clone(),
                span: apply_span(&message, info.stream_sequence),
            });
            if pending.len() >= max {
                return Ok(last);
            }
            match messages.next().now_or_never() {
                Some(n) => next = n,
                None => return Ok(last),
            }
        }
    }

    /// Starts applying a batch on a blocking thread.
    fn launch(&self, session: &mut Session, batch: Vec<Incoming>) {
        let watched = self.watchers.watched();
        let store = self.store.clone();
        let from = session.checkpoint;
        session.inflight = Some(tokio::task::spawn_blocking(move || {
            apply_batch(&store, batch, from, &watched)
        }));
    }

    /// Takes in the result of an apply: checkpoint, waiters, watchers.
    fn finish(
        &self,
        joined: Result<Result<Applied, ConsumerError>, tokio::task::JoinError>,
        session: &mut Session,
    ) -> Result<(), ConsumerError> {
        let applied = joined.map_err(|source| Panicked {
            what: "consumer",
            source,
        })??;
        if applied.checkpoint > session.checkpoint {
            session.checkpoint = applied.checkpoint;
            session.dirty = true;
            self.status.applied.send_replace(applied.checkpoint);
            if !applied.updates.is_empty() {
                self.watchers.publish(applied.updates);
            }
        }
        match applied.stopped {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    async fn flush(&self) -> Result<(), ConsumerError> {
        let store = self.store.clone();
        blocking("consumer", move || store.flush()).await??;
        Ok(())
    }
}

/// Applies a batch to the views and commits it with the checkpoint, atomically. Stops
/// (committing what came before) at a gap or an event that cannot be applied.
fn apply_batch(
    store: &Store,
    batch: Vec<Incoming>,
    checkpoint: u64,
    watched: &HashSet<ViewKey>,
) -> Result<Applied, ConsumerError> {
    let mut overlay = Overlay::new(store);
    let mut applied = checkpoint;
    let mut applied_event = String::new();
    let mut updates = Vec::new();
    let mut stopped = None;
    // Closed once the batch is committed: the events are visible then.
    let mut spans = Vec::new();
    for message in batch {
        if message.sequence <= applied {
            continue;
        }
        spans.extend(message.span);
        if message.sequence != applied + 1 {
            stopped = Some(ConsumerError::Gap {
                expected: applied + 1,
                got: message.sequence,
            });
            break;
        }
        let envelope = match pb::EventEnvelope::decode(message.payload.as_ref()) {
            Ok(e) => e,
            Err(e) => {
                stopped = Some(ConsumerError::Poison {
                    sequence: message.sequence,
                    reason: format!("not an EventEnvelope: {e}"),
                });
                break;
            }
        };
        if envelope.position != message.sequence {
            stopped = Some(ConsumerError::Poison {
                sequence: message.sequence,
                reason: format!("its envelope says position {}", envelope.position),
            });
            break;
        }
        let changed = projections::apply(&mut overlay, &envelope);
        overlay.add_event(
            &envelope.stream_id,
            envelope.stream_version,
            &message.payload,
        );
        if !watched.is_empty() {
            collect_updates(&mut overlay, changed, watched, &mut updates);
        }
        applied = message.sequence;
        applied_event = envelope.event_id;
    }
    if applied > checkpoint {
        store.commit(overlay.into_rows(applied, &applied_event)?)?;
    }
    drop(spans);
    Ok(Applied {
        checkpoint: applied,
        updates,
        stopped,
    })
}

/// The watched views among those an event changed, as they are now.
fn collect_updates<'s>(
    overlay: &mut Overlay<'s>,
    changed: Vec<Changed<Overlay<'s>>>,
    watched: &HashSet<ViewKey>,
    updates: &mut Vec<(ViewKey, Update)>,
) {
    for change in changed {
        if watched.contains(&change.key) {
            if let Some(update) = change.read(overlay) {
                updates.push((change.key, update));
            }
        }
    }
}
