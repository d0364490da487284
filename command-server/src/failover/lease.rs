//! The writer lease: one key (the stream's name) in the JetStream key-value bucket
//! `SHOP_LEASES`, whose entries expire `--lease-ttl-ms` after they were last written.
//!
//! - **Claim**: create the key (fails if someone holds it). A server that finds its own
//!   node id in the key (it restarted after a crash, with the same data dir) takes it back
//!   at once with a revision-checked update instead of waiting for it to expire.
//! - **Renew**: a revision-checked update every quarter TTL. It fails if the entry expired
//!   or someone else wrote it since: the lease is lost.
//! - **Fence**: the holder counts its lease valid until the moment it *sent* its last
//!   successful renewal plus three quarters of the TTL ([`LeaseGuard`]); the entry
//!   expires a TTL after the server *wrote* it, later still, so the holder stops
//!   publishing before anyone else can claim. `Nats-Expected-Last-Sequence` on every
//!   publish fences the rest: a deposed writer's publish lands only on the sequence it
//!   expects.
//! - **Release**: on a clean shutdown the holder deletes its entry (revision-checked), so
//!   a standby takes over at its next check instead of a TTL later.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};

/// The bucket of writer leases.
pub const LEASE_BUCKET: &str = "SHOP_LEASES";

/// Who holds a lease: a node (a data dir, see [`crate::log::EventLog::node_id`]) and the
/// address clients reach it at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub node: String,
    pub addr: String,
}

impl Holder {
    fn encode(&self) -> bytes::Bytes {
        format!("{}\n{}", self.node, self.addr).into()
    }

    fn decode(value: &[u8]) -> Holder {
        let text = String::from_utf8_lossy(value);
        let (node, addr) = text.split_once('\n').unwrap_or((&text, ""));
        Holder {
            node: node.to_string(),
            addr: addr.to_string(),
        }
    }
}

/// The answer to a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This server holds the lease, at this revision.
    Held(u64),
    /// Someone else does.
    Other(Holder),
}

/// A lease operation NATS did not answer (retry; the lease is neither won nor lost).
#[derive(Debug, thiserror::Error)]
#[error("writer lease: {0}")]
pub struct LeaseError(String);

fn lease_error(what: &str, error: impl std::fmt::Display) -> LeaseError {
    LeaseError(format!("{what}: {error}"))
}

/// One server's view of the lease of one stream.
pub struct Lease {
    kv: kv::Store,
    key: String,
    me: Holder,
    ttl: Duration,
}

impl Lease {
    /// The lease of stream `key`, in the bucket (created with `ttl` and `replicas` when
    /// missing; an existing bucket's TTL wins, with a warning when it differs).
    pub async fn open(
        js: &jetstream::Context,
        key: &str,
        me: Holder,
        ttl: Duration,
        replicas: usize,
    ) -> Result<Lease, LeaseError> {
        let kv = match js.get_key_value(LEASE_BUCKET).await {
            Ok(kv) => kv,
            Err(_) => js
                .create_key_value(kv::Config {
                    bucket: LEASE_BUCKET.to_string(),
                    description: "shop command servers' writer leases, key = stream name".into(),
                    history: 1,
                    max_age: ttl,
                    storage: jetstream::stream::StorageType::File,
                    num_replicas: replicas,
                    ..Default::default()
                })
                .await
                .map_err(|e| lease_error("create bucket", e))?,
        };
        let mut lease = Lease {
            kv,
            key: key.to_string(),
            me,
            ttl,
        };
        let status = lease
            .kv
            .status()
            .await
            .map_err(|e| lease_error("bucket status", e))?;
        let bucket_ttl = status.max_age();
        if bucket_ttl != ttl && !bucket_ttl.is_zero() {
            tracing::warn!(
                bucket = LEASE_BUCKET,
                bucket_ttl_ms = bucket_ttl.as_millis() as u64,
                flag_ttl_ms = ttl.as_millis() as u64,
                "the lease bucket exists with another TTL; it wins (every server must use the same --lease-ttl-ms)"
            );
            lease.ttl = bucket_ttl;
        }
        Ok(lease)
    }

    /// The TTL in force (the bucket's).
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Who holds the lease now, if anyone.
    pub async fn holder(&self) -> Result<Option<(Holder, u64)>, LeaseError> {
        let entry = self
            .kv
            .entry(self.key.as_str())
            .await
            .map_err(|e| lease_error("read", e))?;
        Ok(entry
            .filter(|e| e.operation == kv::Operation::Put)
            .map(|e| (Holder::decode(&e.value), e.revision)))
    }

    /// Tries to take the lease.
    pub async fn claim(&self) -> Result<Claim, LeaseError> {
        match self.kv.create(self.key.as_str(), self.me.encode()).await {
            Ok(revision) => return Ok(Claim::Held(revision)),
            Err(error) if error.kind() == kv::CreateErrorKind::AlreadyExists => {}
            Err(error) => return Err(lease_error("claim", error)),
        }
        match self.holder().await? {
            None => Err(LeaseError("claim: the lease was released meanwhile".into())),
            Some((holder, revision)) if holder.node == self.me.node => {
                // Our own lease, from before a restart: take it back now.
                match self.renew(revision).await? {
                    Some(revision) => Ok(Claim::Held(revision)),
                    None => Err(LeaseError("claim: the lease changed meanwhile".into())),
                }
            }
            Some((holder, _)) => Ok(Claim::Other(holder)),
        }
    }

    /// Renews the lease held at `revision`: the new revision, or `None` if it is lost
    /// (expired, or written by someone else).
    pub async fn renew(&self, revision: u64) -> Result<Option<u64>, LeaseError> {
        match self
            .kv
            .update(self.key.as_str(), self.me.encode(), revision)
            .await
        {
            Ok(revision) => Ok(Some(revision)),
            Err(error) if error.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(None),
            Err(error) => Err(lease_error("renew", error)),
        }
    }

    /// Gives the lease up (a clean shutdown), so that a standby need not wait for it to
    /// expire.
    pub async fn release(&self, revision: u64) {
        if let Err(error) = self
            .kv
            .delete_expect_revision(self.key.as_str(), Some(revision))
            .await
        {
            tracing::warn!(%error, "could not release the writer lease; it expires by itself");
        }
    }
}

/// Until when the holder counts its lease valid: what the relay checks before each
/// publish. Shared between the lease keeper and the relay.
#[derive(Clone)]
pub struct LeaseGuard {
    base: Instant,
    /// Milliseconds after `base`; 0 = not valid.
    until_ms: Arc<AtomicU64>,
}

impl Default for LeaseGuard {
    fn default() -> Self {
        LeaseGuard {
            base: Instant::now(),
            until_ms: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl LeaseGuard {
    /// A guard that is always valid (a relay outside failover, in unit tests).
    pub fn always() -> Self {
        let guard = LeaseGuard::default();
        guard.until_ms.store(u64::MAX, Ordering::Release);
        guard
    }

    /// The lease was confirmed by a write sent at `sent`: valid until `sent` plus three
    /// quarters of `ttl`.
    pub fn confirmed(&self, sent: Instant, ttl: Duration) {
        let until = sent.saturating_duration_since(self.base) + ttl * 3 / 4;
        let ms = u64::try_from(until.as_millis()).unwrap_or(u64::MAX);
        self.until_ms.fetch_max(ms, Ordering::AcqRel);
    }

    /// The lease is gone: nothing more may be published.
    pub fn revoke(&self) {
        self.until_ms.store(0, Ordering::Release);
    }

    pub fn valid(&self) -> bool {
        let now = u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX);
        now < self.until_ms.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_holder_round_trips_and_tolerates_a_bare_value() {
        let holder = Holder {
            node: "n1".into(),
            addr: "10.0.0.1:50051".into(),
        };
        assert_eq!(Holder::decode(&holder.encode()), holder);
        assert_eq!(Holder::decode(b"n2").node, "n2");
    }

    #[test]
    fn a_guard_is_valid_for_three_quarters_of_the_ttl_after_the_send() {
        let guard = LeaseGuard::default();
        assert!(!guard.valid());
        guard.confirmed(Instant::now(), Duration::from_secs(60));
        assert!(guard.valid());
        guard.confirmed(
            Instant::now() - Duration::from_secs(3600),
            Duration::from_secs(1),
        );
        assert!(guard.valid(), "an older confirmation never shortens it");
        guard.revoke();
        assert!(!guard.valid());
        guard.confirmed(Instant::now(), Duration::ZERO);
        assert!(!guard.valid(), "no time left: not valid");
    }
}
