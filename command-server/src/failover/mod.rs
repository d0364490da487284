//! More than one command server per stream (SPEC §8): one writer holds the lease, the
//! others are hot standbys that follow the stream into their own log.

pub mod lease;
