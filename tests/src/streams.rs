//! Reading what the servers wrote: the command server's log (through LogService) and
//! the JetStream stream, and the check that one mirrors the other.

use shop_shared::pb::log_service_client::LogServiceClient;
use shop_shared::pb::query_service_client::QueryServiceClient;
use tonic::transport::Channel;

use std::time::Duration;

use crate::{pb, security, Nats};

/// Every event of the command server's log, in position order (through LogService).
pub async fn read_whole_log(client: &mut LogServiceClient<Channel>) -> Vec<pb::EventEnvelope> {
    read_log_as(client, None).await
}

/// [`read_whole_log`] over `channel`, with a bearer token when given.
pub async fn read_whole_log_with(channel: &Channel, token: Option<&str>) -> Vec<pb::EventEnvelope> {
    read_log_as(&mut LogServiceClient::new(channel.clone()), token).await
}

async fn read_log_as(
    client: &mut LogServiceClient<Channel>,
    token: Option<&str>,
) -> Vec<pb::EventEnvelope> {
    try_read_log_as(client, token).await.expect("read log")
}

/// [`read_whole_log`], or the status of the read that failed (the server went away).
pub async fn try_read_whole_log(
    client: &mut LogServiceClient<Channel>,
) -> Result<Vec<pb::EventEnvelope>, tonic::Status> {
    try_read_log_as(client, None).await
}

async fn try_read_log_as(
    client: &mut LogServiceClient<Channel>,
    token: Option<&str>,
) -> Result<Vec<pb::EventEnvelope>, tonic::Status> {
    let mut events = Vec::new();
    let mut from = 1;
    loop {
        let page = pb::ReadLogRequest {
            from_position: from,
            limit: 1000,
        };
        let request = match token {
            Some(token) => security::bearer(page, token),
            None => tonic::Request::new(page),
        };
        let page = client.read_log(request).await?.into_inner();
        let done = page.next == 0;
        from = page.next;
        events.extend(page.events);
        if done {
            return Ok(events);
        }
    }
}

/// The log's last position (through LogService).
pub async fn log_position(client: &mut LogServiceClient<Channel>) -> u64 {
    client
        .get_log_status(pb::GetLogStatusRequest {})
        .await
        .expect("log status")
        .into_inner()
        .log_position
}

/// One message of the JetStream stream.
#[derive(Debug, Clone)]
pub struct StreamMessage {
    pub sequence: u64,
    pub subject: String,
    pub headers: std::collections::HashMap<String, String>,
    pub envelope: pb::EventEnvelope,
}

/// Every message of the event stream, read in sequence order (empty if the stream does
/// not exist). Retries when the stream changes under the read (the relay may be
/// recreating it).
pub async fn read_stream(nats: &Nats, stream: &str) -> Vec<StreamMessage> {
    read_stream_with(&nats.client().await, stream).await
}

/// [`read_stream`] through a given client (e.g. one connected to a cluster).
pub async fn read_stream_with(client: &async_nats::Client, stream: &str) -> Vec<StreamMessage> {
    for _ in 0..5 {
        if let Some(messages) = read_stream_once(client, stream).await {
            return messages;
        }
    }
    panic!("could not read stream {stream} in 5 attempts");
}

async fn read_stream_once(client: &async_nats::Client, stream: &str) -> Option<Vec<StreamMessage>> {
    use async_nats::jetstream::consumer::pull::OrderedConfig;
    use futures::StreamExt;
    use prost::Message;
    let js = async_nats::jetstream::new(client.clone());
    let Ok(mut s) = js.get_stream(stream).await else {
        return Some(Vec::new());
    };
    let last = s.info().await.ok()?.state.last_sequence;
    let mut out = Vec::new();
    if last == 0 {
        return Some(out);
    }
    let consumer = s.create_consumer(OrderedConfig::default()).await.ok()?;
    let mut messages = consumer.messages().await.ok()?;
    loop {
        let m = tokio::time::timeout(Duration::from_secs(5), messages.next())
            .await
            .ok()??
            .ok()?;
        let info = m.info().ok()?;
        let headers = m
            .headers
            .as_ref()
            .map(|h| {
                h.iter()
                    .map(|(k, v)| {
                        (
                            k.to_string(),
                            v.first().map(|v| v.to_string()).unwrap_or_default(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.push(StreamMessage {
            sequence: info.stream_sequence,
            subject: m.subject.to_string(),
            headers,
            envelope: pb::EventEnvelope::decode(m.payload.as_ref()).expect("envelope"),
        });
        if info.stream_sequence >= last {
            return Some(out);
        }
    }
}

/// The stream's last sequence (0 if it does not exist).
pub async fn stream_last_sequence(nats: &Nats, stream: &str) -> u64 {
    let js = async_nats::jetstream::new(nats.client().await);
    match js.get_stream(stream).await {
        Ok(mut s) => s.info().await.map(|i| i.state.last_sequence).unwrap_or(0),
        Err(_) => 0,
    }
}

/// Asserts that the stream mirrors the log: sequence N is position N, the same event,
/// with the documented subject and headers.
pub fn assert_stream_mirrors_log(messages: &[StreamMessage], log: &[pb::EventEnvelope]) {
    assert_eq!(messages.len(), log.len(), "stream and log differ in length");
    for (m, e) in messages.iter().zip(log) {
        assert_eq!(
            m.sequence, e.position,
            "stream sequence must equal log position"
        );
        assert_eq!(
            &m.envelope, e,
            "event at sequence {} differs from the log",
            m.sequence
        );
        let (kind, id) = e.stream_id.split_once('-').expect("stream id");
        assert_eq!(m.subject, format!("shop.events.{kind}.{id}"));
        assert_eq!(m.headers.get("Shop-Event-Id"), Some(&e.event_id));
        assert_eq!(m.headers.get("Shop-Event-Type"), Some(&e.event_type));
        assert_eq!(
            m.headers.get("Shop-Position"),
            Some(&e.position.to_string())
        );
        assert_eq!(
            m.headers.get("Nats-Expected-Last-Sequence"),
            Some(&(e.position - 1).to_string())
        );
        let tp = m.headers.get("traceparent").expect("traceparent");
        assert!(
            shop_shared::subjects::trace_id_of_traceparent(tp).is_some(),
            "bad traceparent {tp}"
        );
    }
}

/// Waits (up to `timeout`) until the stream is as long as `log` (the relay may still be
/// publishing its tail), then asserts that it mirrors it ([`assert_stream_mirrors_log`]).
pub async fn assert_stream_holds_log(
    client: &async_nats::Client,
    stream: &str,
    log: &[pb::EventEnvelope],
    timeout: Duration,
) {
    let messages = crate::eventually(timeout, "the stream to hold the log", || async {
        let s = read_stream_with(client, stream).await;
        (s.len() >= log.len()).then_some(s)
    })
    .await;
    assert_stream_mirrors_log(&messages, log);
}

/// Waits until the query server has applied `position` (its status says so), for up to
/// `timeout`; panics naming what it waited for otherwise.
pub async fn wait_applied(q: &QueryServiceClient<Channel>, position: u64, timeout: Duration) {
    crate::eventually(timeout, "the query server to catch up", || {
        let mut q = q.clone();
        async move {
            let s = q
                .get_status(pb::GetStatusRequest {})
                .await
                .ok()?
                .into_inner();
            (s.applied_position >= position).then_some(())
        }
    })
    .await;
}

/// Asserts that each acknowledged one-event command (its id and the position it was
/// answered with) is in the log exactly once, at that position.
pub fn assert_acknowledged_once<'a>(
    log: &[pb::EventEnvelope],
    acked: impl IntoIterator<Item = (&'a str, u64)>,
) {
    let mut by_command: std::collections::HashMap<&str, Vec<u64>> = Default::default();
    for e in log {
        by_command
            .entry(&e.command_id)
            .or_default()
            .push(e.position);
    }
    for (id, position) in acked {
        assert_eq!(
            by_command.get(id),
            Some(&vec![position]),
            "acknowledged {id} must be in the log exactly once, at its position"
        );
    }
}
