//! GetHistory's rendering: stored envelopes → history events with a protobuf-JSON payload.

use prost::Message;
use shop_shared::pb;

/// History events per page, default and maximum.
pub const HISTORY_LIMIT_DEFAULT: usize = 100;
pub const HISTORY_LIMIT_MAX: usize = 1000;

/// The number of events to serve for a requested limit (0: the default).
pub fn history_limit(requested: u32) -> usize {
    match usize::try_from(requested) {
        Ok(0) | Err(_) => HISTORY_LIMIT_DEFAULT,
        Ok(n) => n.min(HISTORY_LIMIT_MAX),
    }
}

/// One stored envelope as a history event.
pub fn history_event(
    event_desc: &prost_reflect::MessageDescriptor,
    e: pb::EventEnvelope,
) -> pb::HistoryEvent {
    pb::HistoryEvent {
        payload_json: payload_json(event_desc, e.event.as_ref()),
        event_id: e.event_id,
        position: e.position,
        stream_id: e.stream_id,
        stream_version: e.stream_version,
        event_type: e.event_type,
        occurred_at: e.occurred_at,
        command_id: e.command_id,
        correlation_id: e.correlation_id,
        causation_id: e.causation_id,
        actor: e.actor,
    }
}

/// The payload of an event as protobuf JSON (e.g. `{"orderId": "o1", ...}`).
pub fn payload_json(
    event_desc: &prost_reflect::MessageDescriptor,
    event: Option<&pb::Event>,
) -> String {
    let Some(event) = event else {
        return "{}".into();
    };
    let dynamic = match prost_reflect::DynamicMessage::decode(
        event_desc.clone(),
        event.encode_to_vec().as_slice(),
    ) {
        Ok(d) => d,
        Err(_) => return "{}".into(),
    };
    match serde_json::to_value(&dynamic) {
        Ok(serde_json::Value::Object(map)) => map
            .into_iter()
            .next()
            .map(|(_, inner)| inner.to_string())
            .unwrap_or_else(|| "{}".into()),
        _ => "{}".into(),
    }
}
