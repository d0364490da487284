//! The benchmark's stages, one file each. Each takes the running [`Stack`] (or starts
//! its own), measures, and adds its figures to the results.

pub mod cluster;
pub mod commands;
pub mod failover;
pub mod growth;
pub mod half_load;
pub mod mixed;
pub mod observability;
pub mod overload;
pub mod pipeline;
pub mod queries;
pub mod rebuild;
pub mod watchers;

use shop_tests::{Nats, Server};

use crate::workload::{Catalog, Conn};

/// The stack the first stages share: NATS, both servers, a channel to each, the
/// catalog set up on them.
pub struct Stack {
    pub nats: Nats,
    pub command: Server,
    pub query: Server,
    pub command_channel: Conn,
    pub query_channel: Conn,
    pub catalog: Catalog,
    /// Encoded size of a typical event envelope (for the sled ceiling).
    pub envelope_bytes: f64,
}
