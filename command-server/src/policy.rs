//! Reactions to events, service-to-service through the bus: when a customer is deleted,
//! cancel each of their open (PLACED or PAID) orders with reason `customer deleted`.
//!
//! It consumes `CustomerDeleted` from JetStream with a durable consumer, exactly as an
//! order service reacting to a customer service would, so it completes even when the
//! command server is killed right after acknowledging the delete: the event is in the
//! log, the relay publishes it after the restart, and the consumer picks it up.
//!
//! Idempotent: each `CancelOrder` carries a command id derived from the triggering event
//! id and the order id, so a redelivery replays the stored replies instead of cancelling
//! (and releasing stock) twice. A message is acked only after its commands are durable.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull};
use futures::StreamExt;
use prost::Message;
use shop_shared::ids::StreamKind;
use shop_shared::pb;
use shop_shared::subjects::{self, HEADER_EVENT_TYPE};
use shop_shared::telemetry;
use tokio::sync::watch;
use tracing::Instrument;

use crate::domain::{order, Command, DomainError, OPEN_ORDERS};
use crate::log::{EventLog, LogError};
use crate::writer::{CommandMeta, WriteError, Writer};
use shop_shared::task::{blocking, Backoff, Panicked, Severity, TaskError};

/// Durable consumer name.
pub const CONSUMER_NAME: &str = "shop-policy-cancel-orders-of-deleted-customers";
/// Reason recorded on the cancelled orders.
pub const CANCEL_REASON: &str = "customer deleted";
/// The `actor` of the policy's commands (their causation is the deletion event).
pub const ACTOR: &str = "policy:customer-deleted";
/// Messages delivered but not yet acked, at most.
const ACK_PENDING_MAX: i64 = 256;
/// Redelivery delay when a message was not acked.
const ACK_WAIT: Duration = Duration::from_secs(10);
/// Longest pause between attempts while NATS or the writer is unavailable.
const RETRY_DELAY_MAX: Duration = Duration::from_secs(2);

/// UUID namespace of policy command ids.
const COMMAND_ID_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x5b0f_0e3c_2a51_4c8e_9f7d_1c2b_3a4d_5e6f);

/// The command id of the cancellation of `order_id` caused by event `event_id`.
pub fn cancel_command_id(event_id: &str, order_id: &str) -> String {
    uuid::Uuid::new_v5(
        &COMMAND_ID_NAMESPACE,
        format!("{event_id}/{order_id}").as_bytes(),
    )
    .to_string()
}

/// The policy task's state.
pub struct Policy {
    pub client: async_nats::Client,
    pub stream_name: String,
    pub log: std::sync::Arc<EventLog>,
    pub writer: Writer,
}

/// Why the policy paused or stopped.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// NATS is unreachable or answered with an error; retried with backoff.
    #[error("NATS: {0}")]
    Nats(String),
    /// The open orders cannot be read. Fatal.
    #[error(transparent)]
    Log(#[from] LogError),
    /// A blocking step panicked: a bug. Fatal.
    #[error(transparent)]
    Panicked(#[from] Panicked),
    /// The writer is gone (shutdown or storage failure); the message stays unacked.
    #[error("the writer stopped")]
    WriterStopped,
}

impl TaskError for PolicyError {
    fn severity(&self) -> Severity {
        match self {
            PolicyError::Nats(_) => Severity::Transient,
            _ => Severity::Fatal,
        }
    }
}

fn nats(context: &str, error: impl std::fmt::Display) -> PolicyError {
    PolicyError::Nats(format!("{context}: {error}"))
}

impl Policy {
    /// Consumes until `stop` is set. NATS outages are waited out.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let js = jetstream::new(self.client.clone());
        let mut backoff = Backoff::new("policy", RETRY_DELAY_MAX);
        while !*stop.borrow() {
            match self.consume(&js, &mut stop).await {
                Ok(()) => return,
                Err(PolicyError::WriterStopped) => {
                    tracing::info!("the writer stopped; the policy stops");
                    return;
                }
                Err(error) if error.severity() == Severity::Fatal => {
                    tracing::error!(%error, "policy stopped");
                    return;
                }
                Err(error) => backoff.wait(&error, &mut stop).await,
            }
        }
    }

    async fn consume(
        &self,
        js: &jetstream::Context,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), PolicyError> {
        if !shop_shared::nats::is_connected(&self.client) {
            return Err(PolicyError::Nats("not connected".into()));
        }
        let stream = js
            .get_stream(&self.stream_name)
            .await
            .map_err(|e| nats(&format!("stream {}", self.stream_name), e))?;
        let consumer: jetstream::consumer::Consumer<pull::Config> = stream
            .get_or_create_consumer(
                CONSUMER_NAME,
                pull::Config {
                    durable_name: Some(CONSUMER_NAME.to_string()),
                    description: Some("cancels open orders of deleted customers".into()),
                    filter_subject: subjects::kind_filter(StreamKind::Customer),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    deliver_policy: jetstream::consumer::DeliverPolicy::All,
                    ack_wait: ACK_WAIT,
                    max_ack_pending: ACK_PENDING_MAX,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| nats(CONSUMER_NAME, e))?;
        let mut messages = consumer
            .stream()
            .expires(shop_shared::nats::PULL_EXPIRES)
            .heartbeat(shop_shared::nats::PULL_EXPIRES / 2)
            .messages()
            .await
            .map_err(|e| nats(CONSUMER_NAME, e))?;
        loop {
            let next = tokio::select! {
                next = messages.next() => next,
                _ = stop.changed() => return Ok(()),
            };
            let message = match next {
                Some(Ok(m)) => m,
                Some(Err(e)) => return Err(nats(CONSUMER_NAME, e)),
                None => return Err(PolicyError::Nats(format!("{CONSUMER_NAME} ended"))),
            };
            self.handle(&message).await?;
            if let Err(e) = message.double_ack().await {
                // Redelivery is harmless: the command ids make it a replay.
                tracing::debug!(error = %e, "policy ack failed; the message will be redelivered");
            }
        }
    }

    /// Handles one event; an error leaves it unacked.
    async fn handle(&self, message: &jetstream::Message) -> Result<(), PolicyError> {
        let is_delete = message
            .headers
            .as_ref()
            .and_then(|h| h.get(HEADER_EVENT_TYPE))
            .is_some_and(|t| t.as_str() == "CustomerDeleted");
        if !is_delete {
            return Ok(());
        }
        let envelope = match pb::EventEnvelope::decode(message.payload.as_ref()) {
            Ok(e) => e,
            Err(error) => {
                tracing::error!(%error, subject = %message.subject, "undecodable event; skipped by the policy");
                return Ok(());
            }
        };
        let Some(pb::event::Kind::CustomerDeleted(deleted)) =
            envelope.event.as_ref().and_then(|e| e.kind.clone())
        else {
            tracing::error!(event_id = %envelope.event_id, "CustomerDeleted header on another event; skipped");
            return Ok(());
        };
        let log = self.log.clone();
        let prefix = order::open_orders_prefix(&deleted.customer_id);
        let scan = move || {
            let entries = log.index_scan(OPEN_ORDERS, &prefix)?;
            Ok::<_, LogError>(order::open_order_ids(&prefix, entries))
        };
        let orders = blocking("policy", scan).await??;
        for order_id in orders {
            if !self.cancel(&envelope, &order_id).await {
                return Err(PolicyError::WriterStopped);
            }
        }
        Ok(())
    }

    /// Cancels one order; false when the writer is gone. The cancel continues the trace
    /// of the event that caused it.
    async fn cancel(&self, cause: &pb::EventEnvelope, order_id: &str) -> bool {
        // The cancel joins the cause's trace; it never starts one of its own.
        let parent = telemetry::TraceParent::parse(&cause.traceparent);
        let (span, traceparent) = if parent.is_some_and(|p| p.sampled) && telemetry::exporting() {
            let span = tracing::info_span!(
                target: telemetry::EXPORT_TARGET,
                "policy",
                otel.name = "customer-deleted policy: CancelOrder",
                otel.kind = "internal",
                order_id,
                trace_id = tracing::field::Empty,
                span_id = tracing::field::Empty,
            );
            let traceparent = telemetry::export_context(&span, parent.as_ref());
            (span, traceparent)
        } else {
            let (trace_id, span_id) = telemetry::local_ids(parent.as_ref());
            let span = tracing::info_span!(
                "policy",
                order_id,
                trace_id = %trace_id,
                span_id = %span_id,
            );
            (span, parent.as_ref().map(telemetry::TraceParent::header))
        };
        self.cancel_traced(cause, order_id, traceparent)
            .instrument(span)
            .await
    }

    async fn cancel_traced(
        &self,
        cause: &pb::EventEnvelope,
        order_id: &str,
        traceparent: Option<String>,
    ) -> bool {
        let request = pb::CancelOrderRequest {
            command_id: String::new(),
            expected_version: None,
            order_id: order_id.to_string(),
            reason: CANCEL_REASON.to_string(),
        };
        let mut meta = CommandMeta::for_request(
            "CancelOrder",
            &request.encode_to_vec(),
            Some(cancel_command_id(&cause.event_id, order_id)),
        );
        meta.correlation_id.clone_from(&cause.correlation_id);
        meta.causation_id.clone_from(&cause.event_id);
        meta.traceparent = traceparent;
        meta.actor = ACTOR.to_string();
        let command = Command::CancelOrder {
            order_id: order_id.to_string(),
            reason: CANCEL_REASON.to_string(),
        };
        let mut backoff = Backoff::new("policy cancel", RETRY_DELAY_MAX);
        loop {
            match self.writer.submit(command.clone(), meta.clone()).await {
                Ok(accepted) => {
                    tracing::info!(order_id, customer_event = %cause.event_id, replayed = accepted.replayed, "order of deleted customer cancelled");
                    return true;
                }
                Err(WriteError::Domain(
                    DomainError::InvalidOrderState { .. } | DomainError::OrderNotFound(_),
                )) => {
                    // Shipped or cancelled since the list was read: nothing to do.
                    return true;
                }
                Err(e) if e.is_overload() => tokio::time::sleep(backoff.failed(&e)).await,
                Err(
                    WriteError::ShuttingDown | WriteError::Storage(_) | WriteError::DiskFull(_),
                ) => return false,
                Err(other) => {
                    tracing::error!(error = %other, order_id, "policy could not cancel the order");
                    return true;
                }
            }
        }
    }
}
