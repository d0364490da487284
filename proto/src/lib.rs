//! The `shop.v1` contract, generated from `proto/shop/v1/*.proto` at build time (with
//! `protox`, so no `protoc` is needed on the machine).
//!
//! [`FILE_DESCRIPTOR_SET`] holds the encoded descriptors of these files and of the
//! well-known types they import; servers hand it to gRPC reflection, and the query server
//! uses it to render event payloads as JSON.

#![allow(clippy::all, missing_docs, rust_2018_idioms)]

pub mod shop {
    pub mod v1 {
        tonic::include_proto!("shop.v1");
    }
}

pub use shop::v1;

/// Encoded `google.protobuf.FileDescriptorSet` of the whole contract.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("shop_descriptor");
