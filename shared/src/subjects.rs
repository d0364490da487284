//! NATS names shared by the relay (publisher) and the query server (consumer).
//!
//! Event at log position N is published to `shop.events.<kind>.<id>` as JetStream stream
//! sequence N; the headers repeat what a consumer needs without decoding the payload.

use crate::ids::StreamKind;

/// Default JetStream stream name.
pub const DEFAULT_STREAM: &str = "SHOP_EVENTS";
/// Subjects the stream captures.
pub const STREAM_SUBJECTS: &str = "shop.events.>";
/// Prefix of every event subject.
pub const SUBJECT_PREFIX: &str = "shop.events";

/// JetStream's optimistic-concurrency header: the publish is rejected unless the stream's
/// last sequence equals this value.
pub const HEADER_EXPECTED_LAST_SEQUENCE: &str = "Nats-Expected-Last-Sequence";
/// The event's id (UUIDv7).
pub const HEADER_EVENT_ID: &str = "Shop-Event-Id";
/// The event's type, e.g. `OrderPlaced`.
pub const HEADER_EVENT_TYPE: &str = "Shop-Event-Type";
/// The event's log position (equal to its stream sequence).
pub const HEADER_POSITION: &str = "Shop-Position";
/// W3C trace context.
pub const HEADER_TRACEPARENT: &str = "traceparent";
/// On the first event of a command with more than one: the command's other events, so
/// that a writer taking over from one that died mid-command can publish the rest
/// (`command_rest` / `parse_command_rest`: each envelope in standard base64, in
/// position order, separated by commas).
pub const HEADER_COMMAND_REST: &str = "Shop-Command-Rest";

/// `shop.events.<kind>.<id>`.
pub fn subject(kind: StreamKind, id: &str) -> String {
    format!("{SUBJECT_PREFIX}.{}.{id}", kind.as_str())
}

/// Subjects of one aggregate kind: `shop.events.<kind>.>`.
pub fn kind_filter(kind: StreamKind) -> String {
    format!("{SUBJECT_PREFIX}.{}.>", kind.as_str())
}

/// A W3C `traceparent` value for an event that carries none of its own (its command was
/// not traced): the trace id comes from the correlation id (so every event of one client
/// interaction shares a trace), the span id from the event id. Flagged not sampled: no
/// span with that id was recorded, so a consumer should not start exporting from it.
pub fn traceparent(correlation_id: &str, event_id: &str) -> String {
    let trace_id = trace_id_hex(correlation_id);
    let event_hex = hex_of_uuidish(event_id);
    let span_id = &event_hex[16..32];
    format!("00-{trace_id}-{span_id}-00")
}

/// The 32-hex-digit trace id for a correlation id: the id itself when it already is 32
/// hex digits (a W3C trace id) or a UUID, else a UUIDv5 of it.
pub fn trace_id_hex(correlation_id: &str) -> String {
    hex_of_uuidish(correlation_id)
}

fn hex_of_uuidish(s: &str) -> String {
    if s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return s.to_ascii_lowercase();
    }
    let uuid = uuid::Uuid::parse_str(s)
        .unwrap_or_else(|_| uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, s.as_bytes()));
    uuid.simple().to_string()
}

/// Extracts the trace id from a `traceparent` header value, if well-formed.
pub fn trace_id_of_traceparent(value: &str) -> Option<&str> {
    let mut parts = value.split('-');
    let version = parts.next()?;
    let trace_id = parts.next()?;
    let span_id = parts.next()?;
    let _flags = parts.next()?;
    let ok = version.len() == 2
        && trace_id.len() == 32
        && span_id.len() == 16
        && trace_id.bytes().all(|b| b.is_ascii_hexdigit())
        && trace_id.bytes().any(|b| b != b'0');
    ok.then_some(trace_id)
}

/// The `Shop-Command-Rest` header value for a command's events after its first.
pub fn command_rest(events: &[bytes::Bytes]) -> String {
    use base64::Engine as _;
    let mut value = String::new();
    for (i, event) in events.iter().enumerate() {
        if i > 0 {
            value.push(',');
        }
        base64::engine::general_purpose::STANDARD.encode_string(event, &mut value);
    }
    value
}

/// The events a `Shop-Command-Rest` header value holds; an error names the one that
/// does not decode.
pub fn parse_command_rest(value: &str) -> Result<Vec<bytes::Bytes>, String> {
    use base64::Engine as _;
    value
        .split(',')
        .enumerate()
        .map(|(i, part)| {
            base64::engine::general_purpose::STANDARD
                .decode(part)
                .map(bytes::Bytes::from)
                .map_err(|e| format!("{HEADER_COMMAND_REST} entry {i}: {e}"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_rest_round_trips() {
        let events = vec![
            bytes::Bytes::from_static(b"\x00\x01,\r\n"),
            bytes::Bytes::from_static(b"second"),
            bytes::Bytes::new(),
        ];
        let value = command_rest(&events);
        assert!(!value.contains(['\r', '\n', ' ']), "{value}");
        assert_eq!(parse_command_rest(&value), Ok(events));
        assert_eq!(
            parse_command_rest(&command_rest(&[bytes::Bytes::from_static(b"one")])),
            Ok(vec![bytes::Bytes::from_static(b"one")])
        );
        let error = parse_command_rest("b25l,*not base64*").unwrap_err();
        assert!(error.contains("entry 1"), "{error}");
    }

    #[test]
    fn subjects_have_kind_and_id() {
        assert_eq!(subject(StreamKind::Order, "o1"), "shop.events.order.o1");
        assert_eq!(kind_filter(StreamKind::Customer), "shop.events.customer.>");
    }

    #[test]
    fn traceparent_is_w3c_shaped() {
        let event_id = crate::ids::generate_id();
        let tp = traceparent("0af7651916cd43dd8448eb211c80319c", &event_id);
        assert!(tp.starts_with("00-0af7651916cd43dd8448eb211c80319c-"));
        assert_eq!(tp.len(), 55);
        assert_eq!(
            trace_id_of_traceparent(&tp),
            Some("0af7651916cd43dd8448eb211c80319c")
        );
        // Any correlation id maps to some valid trace id.
        let tp = traceparent("not a uuid", &event_id);
        assert!(trace_id_of_traceparent(&tp).is_some());
        assert_eq!(trace_id_of_traceparent("garbage"), None);
    }
}
