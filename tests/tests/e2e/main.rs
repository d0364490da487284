//! End-to-end tests: real nats-server, real server processes, gRPC over TCP.
//! One test binary (one link) with a module per area.

mod bus;
mod cluster;
mod commands;
mod crash;
mod damage;
mod disk_full;
mod failover;
mod grpc_fuzz;
mod limits;
mod observability;
mod partitions;
mod power_cut;
pub mod queries;
mod query_crash;
mod security;
mod shipments;
mod skeleton;
