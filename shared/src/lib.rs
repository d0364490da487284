//! What the command server and the query server share: the contract between them.
//!
//! Layout:
//! - [`pb`]: the generated `shop.v1` protobuf types and gRPC services (from `proto/`).
//! - [`ids`]: id syntax (`[A-Za-z0-9_-]{1,64}`), stream ids and their kinds.
//! - [`subjects`]: NATS names: stream, subjects, header names, trace context.
//! - [`events`]: event type names, timestamps, envelope helpers.
//! - [`config`]: flags both binaries take (NATS, stream, logging).
//! - [`telemetry`]: `tracing` set-up, text or JSON.
//! - [`grpc`]: health, reflection, deadlines, shutdown, error-detail helpers.
//! - [`limits`]: connections at once, HTTP/2 streams and header bytes, open files.
//! - [`nats`]: connecting to NATS without crash-looping while it is away.
//! - [`metrics`]: Prometheus metrics: gRPC middleware, load shedding, scrape-time gauges.
//! - [`auth`]: tokens, JWTs and client certificates → principal and roles; the layer.
//! - [`security`]: a server's TLS and mTLS, authentication layer and reflection switch.

pub mod auth;
pub mod config;
pub mod events;
pub mod grpc;
pub mod ids;
pub mod limits;
pub mod metrics;
pub mod nats;
pub mod security;
pub mod storage;
pub mod subjects;
pub mod task;
pub mod telemetry;

/// The generated `shop.v1` types and services.
pub use shop_proto::v1 as pb;
/// Encoded descriptors of the whole contract (for reflection and JSON rendering).
pub use shop_proto::FILE_DESCRIPTOR_SET;
