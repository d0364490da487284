//! The relay: durable log events → JetStream, in position order, so that stream sequence N
//! is log position N.
//!
//! - Only durable events are published (the log is the outbox; nothing is published from
//!   inside a write).
//! - Every publish carries `Nats-Expected-Last-Sequence: N-1`, so JetStream itself rejects
//!   a gap or a duplicate. Publishes are pipelined: up to `window` in flight, acks checked
//!   in order.
//! - Where to resume is read from the stream itself (its last sequence, checked against
//!   the log), so a crash, a NATS outage, or a stream deleted/recreated/purged behind our
//!   back all end the same way: republish the missing tail from the log.
//! - A stream that holds more than the log, or a different event at a position, is a
//!   conflict: the relay stops and the server starts over (see `failover/`), where the
//!   start-up check decides (catch up, quarantine, or refuse).
//! - **Fencing a deposed writer.** `Nats-Expected-Last-Sequence` alone does not stop a
//!   writer paused mid-publish (SIGSTOP, a long GC-like stall, a VM freeze) and deposed
//!   meanwhile: when it wakes, the publishes still queued in its process go out. With
//!   several queued, the second can land on top of the new writer's first message (its
//!   expected sequence matches), and the new writer's pipelined publishes can likewise
//!   land on top of the old writer's: two histories interleaved in the stream (found by
//!   the chaos runner's `pause-writer` trials). So:
//!   - the lease guard is checked before every publish, and each publish is flushed to
//!     the socket (`Client::flush`: no server round trip) before the next check, so a
//!     writer paused at any moment holds at most one publish that could land late (what
//!     reached its socket reaches the server without it);
//!   - the first publish after (re)synchronising with the stream is sent alone and its
//!     ack awaited: either it lands, and a late publish of an old writer (which can only
//!     expect the sequence it expects) is refused, or the old writer's lands and this
//!     one is refused with nothing of ours stacked on it: the relay resynchronises, finds
//!     the stream ahead of or different from the log, and the server starts over
//!     (`failover/reconcile.rs`).
//! - **Half commands.** A command's events are separate publishes, so a writer that dies
//!   or is deposed between two of them leaves the first part of a command in the stream
//!   (chaos: 1 `failover` trial in 600 once each publish was flushed on its own, above).
//!   So the relay reads whole commands (a read never ends inside one), and a command's
//!   first event carries the others, as the log holds them, in the `Shop-Command-Rest`
//!   header. A new writer finishes such a command from that header before it does
//!   anything else (`failover/complete.rs`). The alternative, JetStream's atomic batches
//!   (2.12+), was tried: the relay drained a backlog at ~2,000 events/s instead of
//!   ~90,000, and pipelined batch commits were ordered after later plain publishes
//!   ("wrong last sequence").

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, context::PublishAckFuture};
use prost::Message;
use shop_shared::ids::StreamId;
use shop_shared::pb;
use shop_shared::subjects::{
    self, HEADER_COMMAND_REST, HEADER_EVENT_ID, HEADER_EVENT_TYPE, HEADER_EXPECTED_LAST_SEQUENCE,
    HEADER_POSITION, HEADER_TRACEPARENT, STREAM_SUBJECTS,
};
use shop_shared::task::{
    blocking, wait_connected, Backoff, Panicked, Severity, TaskError, CONNECT_WAIT,
};
use tokio::sync::watch;

use crate::failover::lease::LeaseGuard;
use crate::log::{EventLog, LogError, LogTail, RELAY_CURSOR as CURSOR_KEY};

/// How often an idle relay checks that the stream is still there and complete.
const IDLE_CHECK_INTERVAL: Duration = Duration::from_secs(2);
/// Longest pause between attempts while NATS is unreachable.
const RETRY_DELAY_MAX: Duration = Duration::from_secs(2);
/// JetStream keeps this long a window for `Nats-Msg-Id` de-duplication (unused by the
/// relay, which relies on expected-last-sequence, but set explicitly).
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// How long a publish waits for the stream's ack (and any other JetStream request
/// answer) before the relay resynchronises from the stream's state. Acks take
/// milliseconds; none comes while a replicated stream elects a leader, and a failed-over
/// connection never delivers the acks of the old one, so a short wait resumes publishing
/// soon after either (what `--ack replicated` commands wait for).
const ACK_TIMEOUT: Duration = Duration::from_secs(2);
/// How often an ack wait checks that the connection it was sent on is still up.
const DISCONNECT_CHECK: Duration = Duration::from_millis(50);

/// Relay tuning.
#[derive(Debug, Clone, Copy)]
pub struct RelayConfig {
    /// Publishes awaiting their ack at once. Must stay below async-nats'
    /// `max_ack_inflight` (5000), beyond which `publish` blocks.
    pub window: usize,
    /// Events read from the log per read.
    pub read_chunk: usize,
    /// Replicas the stream is created with and must have (`--stream-replicas`).
    pub replicas: usize,
}

/// What the relay is doing, for status and health.
pub struct RelayStatus {
    /// The relay's NATS client, whose connection state is part of the relay's health.
    client: async_nats::Client,
    /// Every position up to this one is acknowledged by JetStream.
    published: AtomicU64,
    /// The same, for those who wait for a position (`--ack replicated`).
    published_watch: watch::Sender<u64>,
    /// Connected to NATS with a verified stream.
    connected: AtomicBool,
    /// Why the relay is not publishing, when it is not.
    error: Mutex<Option<String>>,
}

impl RelayStatus {
    pub fn new(client: async_nats::Client) -> Self {
        RelayStatus {
            client,
            published: AtomicU64::new(0),
            published_watch: watch::Sender::new(0),
            connected: AtomicBool::new(false),
            error: Mutex::new(None),
        }
    }

    pub fn published(&self) -> u64 {
        self.published.load(Ordering::Acquire)
    }

    fn set_published(&self, position: u64) {
        self.published.store(position, Ordering::Release);
        self.published_watch.send_if_modified(|p| {
            let changed = *p != position;
            *p = position;
            changed
        });
    }

    /// Waits until the stream has acknowledged every position up to `position`; false
    /// if it has not within `timeout`.
    pub async fn wait_published(&self, position: u64, timeout: Duration) -> bool {
        let mut published = self.published_watch.subscribe();
        tokio::time::timeout(timeout, published.wait_for(|p| *p >= position))
            .await
            .is_ok_and(|waited| waited.is_ok())
    }

    /// Connected to NATS, with the stream verified and no error.
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Acquire) && shop_shared::nats::is_connected(&self.client)
    }

    pub fn error(&self) -> Option<String> {
        self.error.lock().map(|e| e.clone()).unwrap_or(None)
    }

    fn set_error(&self, error: Option<String>) {
        self.connected.store(error.is_none(), Ordering::Release);
        if let Ok(mut slot) = self.error.lock() {
            *slot = error;
        }
    }
}

/// Why the relay stopped or paused.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The stream and the log disagree: publishing would corrupt the mirror. Fatal.
    #[error("{0}")]
    Conflict(String),
    /// NATS is unreachable or answered with an error; retried with backoff.
    #[error("NATS: {0}")]
    Nats(String),
    /// The log cannot be read. Fatal.
    #[error(transparent)]
    Log(#[from] LogError),
    /// A blocking step panicked: a bug. Fatal.
    #[error(transparent)]
    Panicked(#[from] Panicked),
}

impl TaskError for RelayError {
    fn severity(&self) -> Severity {
        match self {
            RelayError::Nats(_) => Severity::Transient,
            RelayError::Conflict(_) | RelayError::Log(_) | RelayError::Panicked(_) => {
                Severity::Fatal
            }
        }
    }
}

fn nats(context: &str, error: impl std::fmt::Display) -> RelayError {
    RelayError::Nats(format!("{context}: {error}"))
}

/// One log event as the relay reads it.
struct LogEvent {
    position: u64,
    bytes: bytes::Bytes,
    envelope: pb::EventEnvelope,
}

impl LogEvent {
    fn decode(position: u64, bytes: bytes::Bytes) -> Result<Self, RelayError> {
        let envelope = pb::EventEnvelope::decode(bytes.as_ref()).map_err(|e| {
            RelayError::Log(LogError::Corrupt {
                key: format!("E{position}"),
                reason: e.to_string(),
            })
        })?;
        Ok(LogEvent {
            position,
            bytes,
            envelope,
        })
    }

    /// Both events belong to one command (consecutive events with one command id do: a
    /// command id's retry appends nothing).
    fn same_command(&self, other: &LogEvent) -> bool {
        !self.envelope.command_id.is_empty()
            && self.envelope.command_id == other.envelope.command_id
    }
}

/// How many of `events` come before the last command among them (0 when they are all
/// one command; all of them when the last has no command id, a command of its own).
fn before_last_command(events: &[LogEvent]) -> usize {
    match events.last() {
        Some(last) => events
            .iter()
            .rposition(|e| !e.same_command(last))
            .map_or(0, |i| i + 1),
        None => 0,
    }
}

/// The events after `events[i]` that belong to its command.
fn rest_of_command(events: &[LogEvent], i: usize) -> Vec<bytes::Bytes> {
    let Some(first) = events.get(i) else {
        return Vec::new();
    };
    events[i + 1..]
        .iter()
        .take_while(|e| first.same_command(e))
        .map(|e| e.bytes.clone())
        .collect()
}

/// The relay task's state.
pub struct Relay {
    log: Arc<EventLog>,
    tail: Arc<LogTail>,
    client: async_nats::Client,
    js: jetstream::Context,
    stream_name: String,
    durable: watch::Receiver<u64>,
    status: Arc<RelayStatus>,
    config: RelayConfig,
    /// Publishes only while this server's writer lease is valid (see `failover/lease.rs`).
    guard: LeaseGuard,
}

impl Relay {
    pub fn new(
        log: Arc<EventLog>,
        tail: Arc<LogTail>,
        client: async_nats::Client,
        stream_name: String,
        durable: watch::Receiver<u64>,
        status: Arc<RelayStatus>,
        config: RelayConfig,
    ) -> Self {
        let mut js = jetstream::new(client.clone());
        js.set_timeout(ACK_TIMEOUT);
        if let Ok(Some(cursor)) = log.meta_u64(CURSOR_KEY) {
            status.set_published(cursor);
        }
        Relay {
            log,
            tail,
            client,
            js,
            stream_name,
            durable,
            status,
            config,
            guard: LeaseGuard::always(),
        }
    }

    /// Publishes only while `guard` is valid: a writer that may have lost its lease stops
    /// publishing before anyone else can claim it.
    pub fn fenced(mut self, guard: LeaseGuard) -> Self {
        self.guard = guard;
        self
    }

    /// Makes sure the stream exists with a compatible configuration and agrees with the
    /// log; returns the position after which publishing resumes.
    pub async fn prepare(&self) -> Result<u64, RelayError> {
        let mut stream = self.ensure_stream().await?;
        let info = stream.info().await.map_err(|e| nats("stream info", e))?;
        let state = info.state.clone();
        let limited = info.config.max_messages > 0
            || info.config.max_bytes > 0
            || !info.config.max_age.is_zero();
        let log_last = *self.durable.borrow();
        if state.last_sequence > log_last {
            return Err(RelayError::Conflict(format!(
                "JetStream stream {} holds events up to sequence {}, but the event log in {} ends at position {}: \
                 either the stream was not written from this log (wrong --data-dir or --stream?), or the log lost \
                 its end (a damaged or deleted data file: sled recovers the log up to the first damaged record). \
                 Refusing to publish. Point the server at the right data dir or stream; a damaged log is kept \
                 as it is (the stream still holds every event); delete the stream only if this log is the one to keep.",
                self.stream_name,
                state.last_sequence,
                self.log.path().display(),
                log_last
            )));
        }
        let front_missing = state.last_sequence > 0 && state.first_sequence > 1;
        if front_missing && !limited {
            // Purged (or partly lost) although nothing should ever expire: sequences
            // cannot be reused, so the only way back to "sequence == position" is a new
            // stream filled from the log.
            tracing::warn!(
                stream = %self.stream_name,
                first_sequence = state.first_sequence,
                last_sequence = state.last_sequence,
                "stream lost its first events (purged?); recreating it and republishing the whole log"
            );
            self.js
                .delete_stream(&self.stream_name)
                .await
                .map_err(|e| nats("delete purged stream", e))?;
            self.ensure_stream().await?;
            return Ok(0);
        }
        if state.last_sequence > 0 && state.messages > 0 {
            self.check_same_event(&stream, state.last_sequence).await?;
        }
        Ok(state.last_sequence)
    }

    async fn ensure_stream(&self) -> Result<jetstream::stream::Stream, RelayError> {
        ensure_stream(&self.js, &self.stream_name, self.config.replicas).await
    }

    /// The message at `sequence` must be the log's event at that position.
    async fn check_same_event(
        &self,
        stream: &jetstream::stream::Stream,
        sequence: u64,
    ) -> Result<(), RelayError> {
        let message = stream
            .get_raw_message(sequence)
            .await
            .map_err(|e| nats(&format!("get message {sequence}"), e))?;
        let in_stream = message
            .headers
            .get(HEADER_EVENT_ID)
            .map(|v| v.as_str().to_string())
            .unwrap_or_default();
        let log = self.log.clone();
        let in_log = blocking("relay", move || log.event(sequence))
            .await??
            .and_then(|bytes| pb::EventEnvelope::decode(bytes.as_ref()).ok())
            .map(|e| e.event_id)
            .unwrap_or_default();
        if in_stream != in_log {
            return Err(RelayError::Conflict(format!(
                "JetStream stream {} holds event {in_stream:?} at sequence {sequence}, but the event log has {in_log:?} there: \
                 the stream was not written from this log. Refusing to publish.",
                self.stream_name
            )));
        }
        Ok(())
    }

    /// Publishes until `stop` is set and everything durable is published (or until a
    /// fatal error). NATS outages are waited out with backoff.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) -> Result<(), RelayError> {
        let mut backoff = Backoff::new("relay", RETRY_DELAY_MAX);
        loop {
            if *stop.borrow() && self.caught_up() {
                return Ok(());
            }
            let resumed = if wait_connected(&self.client, CONNECT_WAIT, &stop).await {
                self.prepare().await
            } else {
                Err(RelayError::Nats("not connected".into()))
            };
            let outcome = match resumed {
                Ok(position) => {
                    backoff.reset();
                    self.status.set_published(position);
                    self.status.set_error(None);
                    tracing::info!(stream = %self.stream_name, resume_after = position, log_position = *self.durable.borrow(), "relay publishing");
                    self.publish(position, &mut stop).await
                }
                Err(e) => Err(e),
            };
            let error = match outcome {
                Ok(()) => return Ok(()),
                Err(error) => error,
            };
            self.status.set_error(Some(error.to_string()));
            if error.severity() == Severity::Fatal {
                tracing::error!(%error, "relay stopped");
                return Err(error);
            }
            if *stop.borrow() {
                // Shutting down with NATS away: the log keeps the events.
                return Ok(());
            }
            // Events stay in the log and are published once NATS is back.
            backoff.wait(&error, &mut stop).await;
        }
    }

    fn caught_up(&self) -> bool {
        self.status.published() >= *self.durable.borrow()
    }

    /// The publishing loop proper, from `published` on.
    async fn publish(
        &mut self,
        mut published: u64,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), RelayError> {
        let mut inflight: VecDeque<(u64, PublishAckFuture)> =
            VecDeque::with_capacity(self.config.window);
        let mut saved_cursor = published;
        let mut first = true;
        // The command of the last event sent: an event of another command starts one.
        let mut last_command: Option<String> = None;
        let mut idle_check = tokio::time::interval(IDLE_CHECK_INTERVAL);
        idle_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let durable = *self.durable.borrow_and_update();
            let next = published + inflight.len() as u64 + 1;
            if next <= durable {
                if !shop_shared::nats::is_connected(&self.client) {
                    // Publishing into a dead connection only queues requests that will
                    // time out; pause and resynchronise once NATS is back.
                    return Err(RelayError::Nats("disconnected from NATS".into()));
                }
                let events = self.read_commands(next, durable).await?;
                for (i, event) in events.iter().enumerate() {
                    let command = event.envelope.command_id.as_str();
                    let rest = if !command.is_empty() && last_command.as_deref() == Some(command) {
                        None
                    } else {
                        last_command = Some(command.to_owned());
                        let others = rest_of_command(&events, i);
                        (!others.is_empty()).then(|| subjects::command_rest(&others))
                    };
                    let position = event.position;
                    if inflight.len() >= self.config.window {
                        published = self.settle(&mut inflight).await?;
                    }
                    // Fencing (see the module doc): the lease is checked before every
                    // publish, and the publish is on the socket before the next check.
                    if !self.guard.valid() {
                        return Err(RelayError::Nats(
                            "the writer lease is not confirmed: not publishing until it is".into(),
                        ));
                    }
                    let ack = self.send(event, rest).await?;
                    self.client
                        .flush()
                        .await
                        .map_err(|e| nats(&format!("flush of position {position}"), e))?;
                    inflight.push_back((position, ack));
                    if first {
                        // The first publish after (re)synchronising lands alone.
                        published = self.settle(&mut inflight).await?;
                        first = false;
                    }
                }
                continue;
            }
            if !inflight.is_empty() {
                published = self.settle(&mut inflight).await?;
                continue;
            }
            // Caught up with the log.
            if published != saved_cursor {
                let log = self.log.clone();
                // Losing the cursor only republishes (deduplicated by the stream).
                let _ = blocking("relay", move || log.set_meta_u64(CURSOR_KEY, published)).await;
                saved_cursor = published;
            }
            if *stop.borrow() {
                return Ok(());
            }
            tokio::select! {
                changed = self.durable.changed() => {
                    if changed.is_err() {
                        // The writer is gone (shutdown): everything durable is published.
                        return Ok(());
                    }
                }
                _ = stop.changed() => {}
                _ = idle_check.tick() => self.check_idle_stream(published).await?,
            }
        }
    }

    /// While idle, notices a stream deleted or truncated behind the relay's back.
    async fn check_idle_stream(&self, published: u64) -> Result<(), RelayError> {
        let mut stream = self
            .js
            .get_stream(&self.stream_name)
            .await
            .map_err(|e| nats("stream check", e))?;
        let info = stream.info().await.map_err(|e| nats("stream check", e))?;
        let state = &info.state;
        let limited = info.config.max_messages > 0
            || info.config.max_bytes > 0
            || !info.config.max_age.is_zero();
        let front_missing = state.last_sequence > 0 && state.first_sequence > 1 && !limited;
        if state.last_sequence != published || front_missing {
            return Err(RelayError::Nats(format!(
                "stream {} is at sequence {} (first {}), relay published up to {published}: resynchronising",
                self.stream_name, state.last_sequence, state.first_sequence
            )));
        }
        Ok(())
    }

    /// Reads the durable events from `next` on, at most about a chunk, ending at a command
    /// boundary: a command's first event carries the rest of the command (see the module
    /// doc), so a read never ends inside one. (`durable` is always at a command boundary:
    /// the writer makes whole commands durable, and a new writer completes the command its
    /// predecessor left half published before it publishes; see `failover/complete.rs`.)
    async fn read_commands(&self, next: u64, durable: u64) -> Result<Vec<LogEvent>, RelayError> {
        let chunk = self.config.read_chunk.max(1) as u64;
        let mut to = durable.min(next + chunk - 1);
        loop {
            let raw = match self.tail.range(next, to) {
                Some(events) => events,
                None => {
                    let log = self.log.clone();
                    let limit = usize::try_from(to - next + 1).unwrap_or(usize::MAX);
                    blocking("relay", move || log.read_range(next, to, limit)).await??
                }
            };
            let mut events = Vec::with_capacity(raw.len());
            for (expected, (position, bytes)) in (next..).zip(raw) {
                if position != expected {
                    return Err(RelayError::Log(LogError::Corrupt {
                        key: format!("E{position}"),
                        reason: format!("log gap: expected position {expected}"),
                    }));
                }
                events.push(LogEvent::decode(position, bytes)?);
            }
            if to >= durable {
                return Ok(events);
            }
            // The read may end inside a command: its last command waits for the next read,
            // unless it is all there is (a command longer than a chunk: read further).
            let keep = before_last_command(&events);
            if keep > 0 {
                events.truncate(keep);
                return Ok(events);
            }
            to = durable.min(to + chunk);
        }
    }

    /// Sends one event (with the rest of its command when it starts one with more than
    /// one event); returns its ack future.
    async fn send(
        &self,
        event: &LogEvent,
        rest: Option<String>,
    ) -> Result<PublishAckFuture, RelayError> {
        let LogEvent {
            position,
            ref bytes,
            ref envelope,
        } = *event;
        let stream = StreamId::parse(&envelope.stream_id).map_err(|e| {
            RelayError::Log(LogError::Corrupt {
                key: format!("E{position}"),
                reason: format!("stream id {:?}: {e}", envelope.stream_id),
            })
        })?;
        let subject = subjects::subject(stream.kind, &stream.id);
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            HEADER_EXPECTED_LAST_SEQUENCE,
            (position - 1).to_string().as_str(),
        );
        headers.insert(HEADER_EVENT_ID, envelope.event_id.as_str());
        headers.insert(HEADER_EVENT_TYPE, envelope.event_type.as_str());
        headers.insert(HEADER_POSITION, position.to_string().as_str());
        if envelope.traceparent.is_empty() {
            headers.insert(
                HEADER_TRACEPARENT,
                subjects::traceparent(&envelope.correlation_id, &envelope.event_id).as_str(),
            );
        } else {
            headers.insert(HEADER_TRACEPARENT, envelope.traceparent.as_str());
        }
        if let Some(rest) = rest {
            headers.insert(HEADER_COMMAND_REST, rest.as_str());
        }
        self.js
            .publish_with_headers(subject, headers, bytes.clone())
            .await
            .map_err(|e| nats(&format!("publish position {position}"), e))
    }

    /// Awaits the oldest in-flight ack and checks it landed at its position.
    async fn settle(
        &self,
        inflight: &mut VecDeque<(u64, PublishAckFuture)>,
    ) -> Result<u64, RelayError> {
        let Some((position, ack)) = inflight.pop_front() else {
            return Ok(self.status.published());
        };
        let ack = tokio::select! {
            // The ack first: when it is already in (most of the time under load), the
            // connection check never runs (no timer, no server info read).
            biased;
            ack = ack => ack.map_err(|e| nats(&format!("ack of position {position}"), e))?,
            () = disconnected(&self.client) => {
                return Err(RelayError::Nats(format!(
                    "connection lost while awaiting the ack of position {position}; resynchronising"
                )))
            }
        };
        if ack.sequence != position || ack.duplicate {
            return Err(RelayError::Nats(format!(
                "position {position} was stored as sequence {} (duplicate: {}); resynchronising",
                ack.sequence, ack.duplicate
            )));
        }
        self.status.set_published(position);
        Ok(position)
    }
}

/// Resolves once the client is not connected, or connected to another server than when
/// it was called (a fail-over within one check): either way the acks of what was sent on
/// the old connection will never come.
async fn disconnected(client: &async_nats::Client) {
    let server = client.server_info().server_id;
    while shop_shared::nats::is_connected(client) && client.server_info().server_id == server {
        tokio::time::sleep(DISCONNECT_CHECK).await;
    }
}

/// Gets the stream, creating it with `replicas` when missing; refuses a conflicting
/// configuration.
pub async fn ensure_stream(
    js: &jetstream::Context,
    name: &str,
    replicas: usize,
) -> Result<jetstream::stream::Stream, RelayError> {
    let mut stream = js
        .get_or_create_stream(stream_config(name, replicas))
        .await
        .map_err(|e| nats(&format!("get or create stream {name}"), e))?;
    let info = stream.info().await.map_err(|e| nats("stream info", e))?;
    check_stream_config(name, replicas, &info.config)?;
    Ok(stream)
}

/// The configuration the relay creates the stream with (`--stream-replicas`).
pub fn stream_config(name: &str, replicas: usize) -> jetstream::stream::Config {
    jetstream::stream::Config {
        name: name.to_string(),
        description: Some("shop events; stream sequence N is command-log position N".into()),
        subjects: vec![STREAM_SUBJECTS.to_string()],
        retention: jetstream::stream::RetentionPolicy::Limits,
        storage: jetstream::stream::StorageType::File,
        discard: jetstream::stream::DiscardPolicy::Old,
        duplicate_window: DUPLICATE_WINDOW,
        num_replicas: replicas,
        // Events are never deleted one by one; a purge is detected and repaired.
        deny_delete: true,
        allow_direct: true,
        ..Default::default()
    }
}

/// Refuses an existing stream the relay cannot mirror the log into.
fn check_stream_config(
    name: &str,
    replicas: usize,
    config: &jetstream::stream::Config,
) -> Result<(), RelayError> {
    let mut problems = Vec::new();
    if config.num_replicas != replicas {
        problems.push(format!(
            "it has {} replica(s), --stream-replicas says {replicas} (change one: `nats stream edit {name} --replicas {replicas}`, or the flag)",
            config.num_replicas
        ));
    }
    if config.subjects != [STREAM_SUBJECTS] {
        problems.push(format!(
            "its subjects are {:?}, expected exactly [{STREAM_SUBJECTS:?}] (other subjects would take sequence numbers)",
            config.subjects
        ));
    }
    if config.retention != jetstream::stream::RetentionPolicy::Limits {
        problems.push(format!(
            "its retention is {:?}, expected Limits (work-queue or interest retention deletes events)",
            config.retention
        ));
    }
    if config.sealed {
        problems.push("it is sealed".into());
    }
    if config.mirror.is_some() || config.sources.as_ref().is_some_and(|s| !s.is_empty()) {
        problems.push("it is a mirror or has sources".into());
    }
    if !problems.is_empty() {
        return Err(RelayError::Conflict(format!(
            "JetStream stream {name} exists with a configuration the relay cannot use: {}",
            problems.join("; ")
        )));
    }
    if config.max_messages > 0 || config.max_bytes > 0 || !config.max_age.is_zero() {
        tracing::warn!(stream = name, "stream has limits: old events will expire and new query servers cannot rebuild from the start");
    }
    if config.storage == jetstream::stream::StorageType::Memory {
        tracing::warn!(
            stream = name,
            "stream uses memory storage: it is republished from the log after every NATS restart"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Events at positions 1.. of the given commands ("" for none).
    fn events(commands: &[&str]) -> Vec<LogEvent> {
        (1..)
            .zip(commands)
            .map(|(position, command)| {
                let envelope = pb::EventEnvelope {
                    position,
                    command_id: command.to_string(),
                    ..Default::default()
                };
                LogEvent {
                    position,
                    bytes: envelope.encode_to_vec().into(),
                    envelope,
                }
            })
            .collect()
    }

    fn positions(rest: &[bytes::Bytes]) -> Vec<u64> {
        rest.iter()
            .map(|b| {
                pb::EventEnvelope::decode(b.as_ref())
                    .expect("envelope")
                    .position
            })
            .collect()
    }

    #[test]
    fn a_read_is_cut_before_its_last_command() {
        assert_eq!(before_last_command(&events(&["a", "b", "b", "c", "c"])), 3);
        assert_eq!(before_last_command(&events(&["a", "b"])), 1);
        assert_eq!(
            before_last_command(&events(&["a", "a", "a"])),
            0,
            "all one command"
        );
        assert_eq!(before_last_command(&events(&[])), 0);
        // Events without a command id are whole commands of their own: nothing is cut.
        assert_eq!(before_last_command(&events(&["a", "", ""])), 3);
        assert_eq!(before_last_command(&events(&["", ""])), 2);
    }

    #[test]
    fn the_rest_of_a_command_is_its_following_events() {
        let read = events(&["a", "b", "b", "b", "c", "", "", "d", "d"]);
        assert_eq!(positions(&rest_of_command(&read, 0)), Vec::<u64>::new());
        assert_eq!(positions(&rest_of_command(&read, 1)), vec![3, 4]);
        assert_eq!(positions(&rest_of_command(&read, 2)), vec![4]);
        assert_eq!(positions(&rest_of_command(&read, 4)), Vec::<u64>::new());
        assert_eq!(positions(&rest_of_command(&read, 5)), Vec::<u64>::new());
        assert_eq!(positions(&rest_of_command(&read, 7)), vec![9]);
        assert_eq!(positions(&rest_of_command(&read, 9)), Vec::<u64>::new());
    }
}
