//! `envelope`: stored and published bytes decoded as the servers decode them.
//! `as_of_history`: as-of folds and history rendering over arbitrary events.

use std::collections::HashMap;
use std::sync::OnceLock;

use command_server::log::{decode_envelope, CommitRecord};
use prost::Message;
use query_server::as_of::{cutoff, fold_merged};
use query_server::history::history_event;
use query_server::projections::{self, MemoryViews, ReadViews};
use shop_shared::events::{event_type, stream_of};
use shop_shared::ids::{validate_id, StreamId};
use shop_shared::pb;

use crate::chunks;

/// Input: one envelope (as the query server consumes it) and, read again, one commit
/// record of the command server's log with the envelopes it holds.
pub fn envelope(data: &[u8]) {
    if let Ok(envelope) = decode_envelope(1, data) {
        check_envelope(&envelope);
        let mut views = MemoryViews::default();
        projections::apply(&mut views, &envelope);
        projections::apply(&mut views, &envelope);
    }
    if let Ok(record) = CommitRecord::decode(data) {
        let mut views = MemoryViews::default();
        for (i, bytes) in record.envelopes.iter().enumerate() {
            if let Ok(envelope) = decode_envelope(i as u64 + 1, bytes) {
                check_envelope(&envelope);
                projections::apply(&mut views, &envelope);
            }
        }
        let again = CommitRecord::decode(record.encode_to_vec().as_slice());
        assert_eq!(
            again.as_ref(),
            Ok(&record),
            "a commit record does not round-trip"
        );
    }
}

fn check_envelope(envelope: &pb::EventEnvelope) {
    let again = pb::EventEnvelope::decode(envelope.encode_to_vec().as_slice());
    assert_eq!(
        again.as_ref(),
        Ok(envelope),
        "an envelope does not round-trip"
    );
    if let Some(kind) = envelope.event.as_ref().and_then(|e| e.kind.as_ref()) {
        assert!(!event_type(kind).is_empty());
        let stream = stream_of(kind);
        if validate_id(&stream.id).is_ok() {
            let parsed = StreamId::parse(&stream.to_string()).ok();
            assert_eq!(parsed, Some(stream), "a stream id does not round-trip");
        }
    }
}

fn event_descriptor() -> &'static prost_reflect::MessageDescriptor {
    static DESCRIPTOR: OnceLock<prost_reflect::MessageDescriptor> = OnceLock::new();
    DESCRIPTOR.get_or_init(|| {
        prost_reflect::DescriptorPool::decode(shop_shared::FILE_DESCRIPTOR_SET)
            .ok()
            .and_then(|pool| pool.get_message_by_name("shop.v1.Event"))
            .expect("the shop descriptors hold shop.v1.Event")
    })
}

/// Input: chunks; the first body is a `GetOrderRequest` (its `as_of_position` and
/// `as_of_time`), every later body an envelope. The envelopes are grouped by stream,
/// cut as the store cuts them (each stream's prefix the cut-off keeps), folded, every
/// view read back with the customer-name join, and every envelope rendered as history.
pub fn as_of_history(data: &[u8]) {
    let mut parts = chunks(data);
    let Some((_, request)) = parts.next() else {
        return;
    };
    let Ok(request) = pb::GetOrderRequest::decode(request) else {
        return;
    };
    let envelopes: Vec<pb::EventEnvelope> = parts
        .filter_map(|(_, body)| pb::EventEnvelope::decode(body).ok())
        .collect();
    for envelope in &envelopes {
        let rendered = history_event(event_descriptor(), envelope.clone());
        let json: serde_json::Value = serde_json::from_str(&rendered.payload_json)
            .unwrap_or_else(|e| panic!("history payload is not JSON ({e}): {rendered:?}"));
        assert!(json.is_object(), "history payload is not an object: {json}");
        assert_eq!(rendered.position, envelope.position);
    }
    let Ok(Some(cut)) = cutoff(request.as_of_position, request.as_of_time.as_ref()) else {
        return;
    };
    let mut streams: HashMap<&str, Vec<pb::EventEnvelope>> = HashMap::new();
    let mut cutting: HashMap<&str, bool> = HashMap::new();
    for envelope in &envelopes {
        let open = cutting.entry(&envelope.stream_id).or_insert(true);
        *open = *open && cut.keeps(envelope);
        if *open {
            streams
                .entry(&envelope.stream_id)
                .or_default()
                .push(envelope.clone());
        }
    }
    let kept: Vec<pb::EventEnvelope> = streams.into_values().flatten().collect();
    assert!(kept.iter().all(|e| cut.keeps(e)));
    let mut views = fold_merged(kept);
    let customers = views.all::<pb::Customer>();
    for id in views.all::<pb::Order>().into_keys() {
        let order = views
            .joined::<pb::Order>(&id)
            .expect("a folded order is there");
        let name = customers.get(&order.customer_id).map(|c| c.name.as_str());
        assert_eq!(order.customer_name, name.unwrap_or_default());
    }
    assert!(!cut.describe().is_empty());
}
