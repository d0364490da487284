//! The hot standby's follower: the stream, from the log's next position, into the log
//! through the writer thread (`Writer::follow`), so that the standby's log, states,
//! indexes and idempotency records stay a few events behind the writer's.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, consumer::DeliverPolicy};
use futures::{FutureExt, StreamExt};
use shop_shared::task::{wait_connected, Backoff, CONNECT_WAIT};
use tokio::sync::watch;

use super::reconcile::{log_event_id, StreamView};
use crate::log::EventLog;
use crate::writer::Writer;

/// Events handed to the writer at once, at most.
const FOLLOW_BATCH_MAX: usize = 1024;
/// How often a log that is ahead of the stream looks again.
const AHEAD_RECHECK: Duration = Duration::from_millis(500);
/// A session that received nothing for this long asks the stream where it ends, and
/// starts over if it is behind: an ordered consumer can wait forever on a cluster node
/// that lost the stream (found by the chaos runner: a standby that had claimed the lease
/// never caught up the last event, so nobody wrote).
const STALL_CHECK: Duration = Duration::from_secs(3);

/// Why following stopped for good.
#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    /// The log holds an event the stream has another one for: the start-up check
    /// decides what to do (quarantine or refuse).
    #[error("{0}")]
    Diverged(String),
}

/// Why one following session ended.
enum SessionEnd {
    Stopped,
    Retry(String),
    Diverged(String),
}

/// What the follower reads from and writes to.
pub struct Follower {
    pub js: jetstream::Context,
    pub client: async_nats::Client,
    pub stream: String,
    pub log: Arc<EventLog>,
    pub writer: Writer,
    pub durable: watch::Receiver<u64>,
}

impl Follower {
    /// Follows until `stop` is set, or the log and the stream disagree.
    pub async fn run(self, mut stop: watch::Receiver<bool>) -> Result<(), FollowError> {
        let mut backoff = Backoff::new("follower", Duration::from_secs(1));
        loop {
            if *stop.borrow() {
                return Ok(());
            }
            let end = if wait_connected(&self.client, CONNECT_WAIT, &stop).await {
                self.session(&mut stop).await
            } else {
                SessionEnd::Retry("not connected to NATS".into())
            };
            match end {
                SessionEnd::Stopped => return Ok(()),
                SessionEnd::Diverged(why) => return Err(FollowError::Diverged(why)),
                SessionEnd::Retry(why) => backoff.wait(&why, &mut stop).await,
            }
        }
    }

    async fn session(&self, stop: &mut watch::Receiver<bool>) -> SessionEnd {
        let view = StreamView {
            js: &self.js,
            name: &self.stream,
        };
        let last = *self.durable.borrow();
        let (first, stream_last) = match view.bounds().await {
            Ok(bounds) => bounds,
            Err(e) => return SessionEnd::Retry(e.to_string()),
        };
        let at = last.min(stream_last);
        if at > 0 && at >= first {
            match (log_event_id(&self.log, at).await, view.event_id(at).await) {
                (Ok(ours), Ok(theirs)) if ours != theirs => {
                    return SessionEnd::Diverged(format!(
                        "position {at}: this log has event {ours:?}, the stream {theirs:?}"
                    ))
                }
                (Ok(_), Ok(_)) => {}
                (Err(e), _) | (_, Err(e)) => return SessionEnd::Retry(e.to_string()),
            }
        }
        if last > stream_last {
            // Ahead of the stream: its writer publishes (this server, once it is the
            // writer) or someone else writes other events there (seen next time).
            tokio::select! {
                () = tokio::time::sleep(AHEAD_RECHECK) => {}
                _ = stop.changed() => {}
            }
            return SessionEnd::Retry(format!(
                "the log (at {last}) is ahead of the stream (at {stream_last})"
            ));
        }
        let consumer = match self.js.get_stream(&self.stream).await {
            Ok(stream) => stream
                .create_consumer(pull::OrderedConfig {
                    deliver_policy: DeliverPolicy::ByStartSequence {
                        start_sequence: last + 1,
                    },
                    max_batch: FOLLOW_BATCH_MAX as i64,
                    max_expires: shop_shared::nats::PULL_EXPIRES,
                    ..Default::default()
                })
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let mut messages = match consumer {
            Ok(consumer) => match consumer.messages().await {
                Ok(messages) => messages,
                Err(e) => return SessionEnd::Retry(format!("follow: {e}")),
            },
            Err(e) => return SessionEnd::Retry(format!("follow: {e}")),
        };
        tracing::info!(stream = %self.stream, from = last + 1, stream_last, "standby following the stream");
        let mut expected = last + 1;
        loop {
            let next = tokio::select! {
                next = tokio::time::timeout(STALL_CHECK, messages.next()) => match next {
                    Ok(next) => next,
                    Err(_) => match view.bounds().await {
                        Ok((_, stream_last)) if stream_last >= expected => {
                            return SessionEnd::Retry(format!(
                                "follow: nothing received for {STALL_CHECK:?} while the stream is at {stream_last} and this log at {}",
                                expected - 1
                            ))
                        }
                        _ => continue,
                    },
                },
                _ = stop.changed() => return SessionEnd::Stopped,
            };
            let mut batch = Vec::new();
            let mut next = next;
            loop {
                let message = match next {
                    Some(Ok(message)) => message,
                    Some(Err(e)) => return SessionEnd::Retry(format!("follow: {e}")),
                    None => return SessionEnd::Retry("follow: the consumer ended".into()),
                };
                let sequence = match message.info() {
                    Ok(info) => info.stream_sequence,
                    Err(e) => return SessionEnd::Retry(format!("follow: message metadata: {e}")),
                };
                if sequence != expected {
                    return SessionEnd::Retry(format!(
                        "follow: got sequence {sequence}, expected {expected}"
                    ));
                }
                expected += 1;
                batch.push(message.payload.clone());
                if batch.len() >= FOLLOW_BATCH_MAX {
                    break;
                }
                match messages.next().now_or_never() {
                    Some(more) => next = more,
                    None => break,
                }
            }
            if let Err(e) = self.writer.follow(batch).await {
                return SessionEnd::Retry(format!("follow: {e}"));
            }
        }
    }
}
