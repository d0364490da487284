//! `command`: a sequence of command requests, each decoded and admitted as the command
//! server does (`grpc::admit_encoded`), then decided against an in-memory state that
//! folds every accepted command's events, as the writer does.

use command_server::domain::testing::Memory;
use command_server::domain::{decide, order, Command};
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
    let mut allowed = command.streams_read();
    if let Command::ShipOrder { order_id, .. } | Command::CancelOrder { order_id, .. } = command {
        if let Some(existing) = state.orders.get(order_id) {
            allowed.extend(order::products_of(existing));
        }
    }
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
    for (sku, product) in &state.products {
        assert!(
            product.reserved >= 0 && product.available() >= 0,
            "product {sku} went below zero: {product:?}"
        );
    }
}
