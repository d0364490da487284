//! The end-to-end test harness: real `nats-server` with JetStream, the real server
//! binaries, real gRPC over TCP.
//!
//! - [`Nats`]: a throwaway nats-server (free port, temp store), killed and removed on
//!   drop, stoppable and restartable on the same port and store.
//! - [`Server`]: a `command-server` or `query-server` process (logs in its temp dir),
//!   started on a free port, waited for until health is SERVING, `kill -9`-able and
//!   restartable on the same port and data dir.
//! - [`Stack`]: NATS plus both servers, the usual fixture.
//! - [`cluster::NatsCluster`]: a 3-node JetStream cluster, nodes killable and restartable,
//!   the stream leader found.
//! - [`eventually`]: poll an async condition until a deadline (never sleep and hope).
//! - [`status`]: a status's code, BadRequest fields, ErrorInfo reason and metadata.
//! - [`req`]: request builders; [`streams`]: the log and the JetStream stream, read back.
//! - [`observability`]: metrics scrapes and parsing, a real OTLP span receiver.
//! - [`security`]: a throwaway PKI, tokens files, JWTs, NATS users.
//! - [`grpc_fuzz`]: random and mutated protobuf bytes to every RPC of a server.
//! - [`power`]: power cuts (an LD_PRELOAD shim that keeps only what was synced).
//! - [`writers`]: a client of a writer and its standbys, following the writer.
//! - [`model`]: an independent fold of the log into the query views, and the views read
//!   back from a query server.
//!
//! Binaries are found next to the test executable (`target/<profile>/`), or in
//! `SHOP_BIN_DIR`; `nats-server` via `NATS_SERVER_BIN`, `.tools/bin`, or PATH. A missing
//! binary fails the test with instructions; nothing is skipped silently.

use std::time::{Duration, Instant};

pub use shop_shared::pb;

pub mod cluster;
pub mod grpc_fuzz;
pub mod model;
pub mod observability;
pub mod power;
mod processes;
pub mod req;
pub mod security;
pub mod status;
pub mod streams;
pub mod writers;

pub use processes::*;
pub use req::parked_reads;
pub use status::*;
pub use streams::*;

/// Polls `check` until it returns `Some`, or panics after `timeout` with `what`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    let mut delay = Duration::from_millis(5);
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(200));
    }
}

/// The `SHOP_<NAME>_ROUNDS` environment variable, or `default`: how many rounds a
/// fault-injection test runs (more for a nightly run).
pub fn rounds(env: &str, default: usize) -> usize {
    std::env::var(env)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
