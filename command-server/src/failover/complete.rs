//! Takeover: finishing the command the previous writer left half published.
//!
//! A command's events are separate publishes, so a writer that dies (or is deposed)
//! between two of them leaves the first part of a command at the end of the stream:
//! an `OrderPlaced` without its `StockReserved`, say, and no receipt for a retry. The
//! relay therefore sends the rest of every command with more than one event along with
//! its first event (header `Shop-Command-Rest`, the envelopes as the old writer's log
//! holds them). A new writer, once caught up and before it decides or publishes
//! anything, looks at the last command in its log: when the stream holds only part of
//! it, it appends the rest from that header to its log, and its relay publishes it like
//! any other event. The events are the old writer's own bytes, so a late publish of the
//! old writer (see the relay's fencing) and the new writer's land the same event, and
//! the old writer's log still matches the stream when it comes back.

use std::sync::Arc;

use prost::Message;
use shop_shared::pb;
use shop_shared::subjects;
use shop_shared::task::blocking;

use super::reconcile::{ReconcileError, StreamView};
use crate::log::EventLog;
use crate::writer::Writer;

/// Events looked at per step back from the log's end to find where its last command
/// starts (a command has at most about a hundred).
const LOOK_BACK: u64 = 256;

/// What became of the log's last command.
#[derive(Debug, PartialEq, Eq)]
pub enum Completion {
    /// Nothing to do: the log is empty, ends with a whole command, or its last command
    /// carries no rest (a single event, or written before the header existed).
    Whole,
    /// The command that starts at `first` was missing `appended` events, now appended
    /// up to `last`.
    Completed {
        first: u64,
        appended: usize,
        last: u64,
    },
    /// The rest cannot be used (does not decode, or does not match the log): the
    /// command stays as it is, and the reason is logged.
    Unusable(String),
}

/// Completes the log's last command from the stream (see the module doc). `last` is
/// the log's last position, nothing else writes to the log meanwhile.
pub async fn complete_last_command(
    log: &Arc<EventLog>,
    stream: &StreamView<'_>,
    writer: &Writer,
    last: u64,
) -> Result<Completion, ReconcileError> {
    let Some((first, tail)) = last_command(log, last).await? else {
        return Ok(Completion::Whole);
    };
    let Some(value) = stream.command_rest(first).await? else {
        return Ok(Completion::Whole);
    };
    let rest = match subjects::parse_command_rest(&value) {
        Ok(rest) => rest,
        Err(why) => return Ok(Completion::Unusable(format!("position {first}: {why}"))),
    };
    let present = tail.len() - 1;
    if rest.len() <= present {
        return Ok(Completion::Whole);
    }
    if let Some(i) = (0..present).find(|&i| rest[i] != tail[i + 1]) {
        return Ok(Completion::Unusable(format!(
            "the command starting at position {first}: its event at position {} differs from the one its first event carries",
            first + 1 + i as u64
        )));
    }
    let command = pb::EventEnvelope::decode(tail[0].as_ref())
        .map(|e| e.command_id)
        .unwrap_or_default();
    let missing = rest[present..].to_vec();
    for (i, bytes) in missing.iter().enumerate() {
        let position = last + 1 + i as u64;
        match pb::EventEnvelope::decode(bytes.as_ref()) {
            Ok(e) if e.position == position && e.command_id == command => {}
            Ok(e) => {
                return Ok(Completion::Unusable(format!(
                    "the rest of the command starting at position {first} holds an event for position {} of command {:?} where position {position} of {command:?} belongs",
                    e.position, e.command_id
                )))
            }
            Err(error) => {
                return Ok(Completion::Unusable(format!(
                    "the rest of the command starting at position {first}: event {i} does not decode: {error}"
                )))
            }
        }
    }
    let appended = missing.len();
    let last = writer
        .follow(missing)
        .await
        .map_err(|e| ReconcileError::Write(e.to_string()))?;
    Ok(Completion::Completed {
        first,
        appended,
        last,
    })
}

/// Where the log's last command starts, and its events in the log (`None` for an empty
/// log or a last event without a command id).
async fn last_command(
    log: &Arc<EventLog>,
    last: u64,
) -> Result<Option<(u64, Vec<bytes::Bytes>)>, ReconcileError> {
    if last == 0 {
        return Ok(None);
    }
    let mut from = last;
    loop {
        from = from.saturating_sub(LOOK_BACK).max(1);
        let reader = log.clone();
        let events = blocking("takeover", move || {
            reader.read_range(
                from,
                last,
                usize::try_from(last - from + 1).unwrap_or(usize::MAX),
            )
        })
        .await??;
        let ids: Vec<String> = events
            .iter()
            .map(|(_, bytes)| {
                pb::EventEnvelope::decode(bytes.as_ref())
                    .map(|e| e.command_id)
                    .unwrap_or_default()
            })
            .collect();
        let Some(command) = ids.last().filter(|id| !id.is_empty()) else {
            return Ok(None);
        };
        let start = ids
            .iter()
            .rposition(|id| id != command)
            .map_or(0, |i| i + 1);
        if start > 0 || from == 1 {
            let first = events.get(start).map_or(last, |(p, _)| *p);
            let tail = events.into_iter().skip(start).map(|(_, b)| b).collect();
            return Ok(Some((first, tail)));
        }
        // The whole window is one command: look further back.
    }
}
