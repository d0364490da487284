//! `command`: a sequence of command requests, each decoded and admitted as the command
//! server does (`grpc::admit_encoded`), then decided against an in-memory state that
//! folds every accepted command's events, as the writer does.

use command_server::domain::testing::Memory;
use command_server::domain::{decide, Command, ReadKey};
use command_server::grpc::{admit_encoded, status_of};
use command_server::writer::WriteError;
use shop_shared::events::stream_of;
use shop_shared::ids::StreamId;
use tonic::Code;

use crate::chunks;

/// Input: chunks; a chunk's tag picks the RPC (`grpc::COMMAND_RPCS`, modulo), its body
/// is the protobuf request.
pub fn command(data: &[u8]) {
    let mut state = Memory::default();
    for (rpc, body) in chunks(data) {
        match admit_encoded(usize::from(rpc), body) {
            Ok(command) => run(&mut state, &command),
            Err(status) => {
                assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
                assert!(!status.message().is_empty());
            }
        }
    }
}

fn run(state: &mut Memory, command: &Command) {
    assert!(
        command.validate().is_ok(),
        "admitted but invalid: {command:?}"
    );
    // What the writer loads before deciding: nothing else may be written.
    let allowed: Vec<StreamId> = command
        .reads(&*state)
        .into_iter()
        .filter_map(|key| match key {
            ReadKey::Stream(stream) => Some(stream),
            ReadKey::Index(..) => None,
        })
        .collect();
    match decide(command, state) {
        Ok(events) => {
            for event in &events {
                let stream: StreamId = stream_of(event);
                assert!(
                    allowed.contains(&stream),
                    "{} wrote to {stream}, which it did not read",
                    command.name()
                );
                state.apply(event);
            }
        }
        Err(refused) => {
            let status = status_of(&WriteError::Domain(refused));
            assert!(
                !matches!(status.code(), Code::Internal | Code::Unknown | Code::Ok),
                "a domain refusal became {status:?}"
            );
        }
    }
    for (sku, product) in &state.products() {
        assert!(
            product.reserved >= 0 && product.available() >= 0,
            "product {sku} went below zero: {product:?}"
        );
    }
}
