//! Start-up: how this server's log stands against the stream, and what to do about it.
//!
//! - The log is a prefix of the stream (or equal): fine, it follows the rest.
//! - The log extends the stream and nobody else holds the lease: fine, its tail is
//!   published once it is the writer (the relay's usual catch-up).
//! - Otherwise the log holds events the stream does not have at their positions (it
//!   disagrees at some position, or it extends the stream while another server writes):
//!   - `--ack replicated`: those events were never acknowledged (a command is answered
//!     only once the stream holds its events), so they are moved aside into a quarantine
//!     file in the data dir, logged, and cut from the log, which then follows the stream;
//!   - `--ack local`: they may have been acknowledged, so the server refuses to serve
//!     and keeps them: `shop-log export` shows and exports them for an operator.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_nats::jetstream;
use prost::Message;
use shop_shared::pb;
use shop_shared::subjects::{HEADER_COMMAND_REST, HEADER_EVENT_ID};
use shop_shared::task::blocking;

use super::lease::Lease;
use crate::log::{EventLog, LogError};
use crate::AckLevel;

/// Why the log cannot be served as it is.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// Local mode, and the log holds events the stream lacks: refuse to serve.
    #[error("{0}")]
    Diverged(String),
    /// NATS did not answer; try again.
    #[error("NATS: {0}")]
    Nats(String),
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("quarantine file {path}: {source}")]
    Quarantine {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Panicked(#[from] shop_shared::task::Panicked),
    #[error(transparent)]
    Lease(#[from] super::lease::LeaseError),
    /// The writer could not append (full disk, failed storage).
    #[error("writing to the log: {0}")]
    Write(String),
}

fn nats(what: &str, error: impl std::fmt::Display) -> ReconcileError {
    ReconcileError::Nats(format!("{what}: {error}"))
}

/// The stream's view of positions: its last sequence and event ids by sequence.
pub struct StreamView<'a> {
    pub js: &'a jetstream::Context,
    pub name: &'a str,
}

impl StreamView<'_> {
    /// The stream's last sequence and first sequence (0, 0 when it does not exist).
    pub async fn bounds(&self) -> Result<(u64, u64), ReconcileError> {
        match self.js.get_stream(self.name).await {
            Ok(mut stream) => {
                let info = stream.info().await.map_err(|e| nats("stream info", e))?;
                Ok((info.state.first_sequence, info.state.last_sequence))
            }
            Err(e)
                if matches!(
                    e.kind(),
                    jetstream::context::GetStreamErrorKind::JetStream(ref js)
                        if js.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
                ) =>
            {
                Ok((0, 0))
            }
            Err(e) => Err(nats("get stream", e)),
        }
    }

    /// The event id of the message at `sequence`.
    pub async fn event_id(&self, sequence: u64) -> Result<String, ReconcileError> {
        let stream = self
            .js
            .get_stream(self.name)
            .await
            .map_err(|e| nats("get stream", e))?;
        let message = stream
            .get_raw_message(sequence)
            .await
            .map_err(|e| nats(&format!("get message {sequence}"), e))?;
        Ok(message
            .headers
            .get(HEADER_EVENT_ID)
            .map(|v| v.as_str().to_string())
            .unwrap_or_default())
    }
}

impl StreamView<'_> {
    /// The `Shop-Command-Rest` header of the message at `sequence` (see `complete.rs`);
    /// `None` when it has none, or the stream no longer holds that message.
    pub async fn command_rest(&self, sequence: u64) -> Result<Option<String>, ReconcileError> {
        let stream = self
            .js
            .get_stream(self.name)
            .await
            .map_err(|e| nats("get stream", e))?;
        match stream.get_raw_message(sequence).await {
            Ok(message) => Ok(message
                .headers
                .get(HEADER_COMMAND_REST)
                .map(|v| v.as_str().to_string())),
            Err(e) if e.kind() == jetstream::stream::RawMessageErrorKind::NoMessageFound => {
                Ok(None)
            }
            Err(e) => Err(nats(&format!("get message {sequence}"), e)),
        }
    }
}

/// The event id at `position` in the log ("" if absent).
pub async fn log_event_id(log: &Arc<EventLog>, position: u64) -> Result<String, ReconcileError> {
    let log = log.clone();
    let bytes = blocking("reconcile", move || log.event(position)).await??;
    Ok(bytes
        .and_then(|b| pb::EventEnvelope::decode(b.as_ref()).ok())
        .map(|e| e.event_id)
        .unwrap_or_default())
}

/// The last position at which the log and the stream agree (they agree on a prefix:
/// both only ever append), searched over `0..=up_to`. Positions the stream no longer
/// holds (before its first sequence) count as agreeing.
pub async fn agreed_prefix(
    log: &Arc<EventLog>,
    stream: &StreamView<'_>,
    first: u64,
    up_to: u64,
) -> Result<u64, ReconcileError> {
    let agrees = |p: u64| async move {
        if p == 0 || p < first {
            return Ok::<_, ReconcileError>(true);
        }
        Ok(log_event_id(log, p).await? == stream.event_id(p).await?)
    };
    if agrees(up_to).await? {
        return Ok(up_to);
    }
    // Invariant: agrees(low) and !agrees(high).
    let (mut low, mut high) = (0, up_to);
    while high - low > 1 {
        let mid = low + (high - low) / 2;
        if agrees(mid).await? {
            low = mid;
        } else {
            high = mid;
        }
    }
    Ok(low)
}

/// Checks the log against the stream before the writer starts on it; may quarantine a
/// tail (replicated mode) or refuse (local mode). See the module doc.
pub async fn reconcile(
    log: &Arc<EventLog>,
    stream: &StreamView<'_>,
    lease: &Lease,
    node: &str,
    ack: AckLevel,
) -> Result<(), ReconcileError> {
    let last = log.last_position()?;
    let (first, stream_last) = stream.bounds().await?;
    let agreed = agreed_prefix(log, stream, first, last.min(stream_last)).await?;
    if agreed == last {
        return Ok(());
    }
    let other_writer = lease.holder().await?.filter(|(h, _)| h.node != node);
    if agreed == stream_last && other_writer.is_none() {
        // Ahead of the stream and nobody else writes: the relay publishes the tail.
        return Ok(());
    }
    let why = if agreed < stream_last {
        format!(
            "the stream {} has other events from position {} on",
            stream.name,
            agreed + 1
        )
    } else {
        format!(
            "the stream {} ends at position {stream_last} and another command server ({}) now writes it",
            stream.name,
            other_writer.map(|(h, _)| h.addr).unwrap_or_default()
        )
    };
    match ack {
        AckLevel::Replicated => {
            let path = quarantine(log, agreed).await?;
            tracing::warn!(
                from = agreed + 1,
                to = last,
                file = %path.display(),
                "{why}: this log's events from position {} were never acknowledged (--ack replicated); \
                 moved them to the quarantine file and cut them from the log; following the stream",
                agreed + 1
            );
            Ok(())
        }
        AckLevel::Local => Err(ReconcileError::Diverged(format!(
            "the event log in {} holds events at positions {}..={last} that the stream lacks: {why}. \
             With --ack local they may have been acknowledged to clients, so this server does not \
             serve or drop them. Show and export them with \
             `shop-log export --data-dir {} --from {}` (JSON lines: command ids, payloads) for an \
             operator to re-submit what still applies; then move the data dir aside to start this \
             server again as a standby.",
            log.path().display(),
            agreed + 1,
            log.path().parent().unwrap_or(Path::new(".")).display(),
            agreed + 1
        ))),
    }
}

/// Saves the events after `keep` into `<data-dir>/quarantine/after-<keep>-<ms>.events`
/// (each: a 4-byte big-endian length, then the envelope as stored), synced, then cuts
/// them from the log. The file's path.
async fn quarantine(log: &Arc<EventLog>, keep: u64) -> Result<PathBuf, ReconcileError> {
    let log = log.clone();
    blocking("quarantine", move || {
        let events = log.read_range(keep + 1, u64::MAX, usize::MAX)?;
        let dir = log
            .path()
            .parent()
            .unwrap_or(Path::new("."))
            .join("quarantine");
        let path = dir.join(format!(
            "after-{keep}-{}.events",
            shop_shared::events::now_micros() / 1000
        ));
        let io = |source| ReconcileError::Quarantine {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(&dir).map_err(io)?;
        let mut file = std::fs::File::create(&path).map_err(io)?;
        for (_, bytes) in &events {
            let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
            file.write_all(&len.to_be_bytes()).map_err(io)?;
            file.write_all(bytes).map_err(io)?;
        }
        file.sync_all().map_err(io)?;
        if let Ok(dir) = std::fs::File::open(&dir) {
            let _ = dir.sync_all();
        }
        log.cut_after(keep)?;
        Ok(path)
    })
    .await?
}

/// Reads a quarantine file back: the envelopes, as stored.
pub fn read_quarantine(path: &Path) -> std::io::Result<Vec<bytes::Bytes>> {
    let data = std::fs::read(path)?;
    let mut out = Vec::new();
    let mut rest = data.as_slice();
    while rest.len() >= 4 {
        let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        rest = &rest[4..];
        if rest.len() < len {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "quarantine file ends inside an event",
            ));
        }
        out.push(bytes::Bytes::copy_from_slice(&rest[..len]));
        rest = &rest[len..];
    }
    Ok(out)
}
