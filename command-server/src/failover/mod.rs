//! More than one command server per stream (SPEC §8): one writer holds the lease, the
//! others are hot standbys that follow the stream into their own log.
//!
//! A server starts as a standby: its follower appends what the stream holds beyond its
//! log ([`follow`]), and every quarter TTL it tries to claim the lease ([`lease`]).
//! Once it holds the lease it catches up to the stream's last sequence as it was after
//! the claim (the old writer stopped publishing before its lease could expire), stops
//! following, finishes the command the old writer may have left half published
//! ([`complete`]), and becomes the writer: the relay and the policy start, commands are
//! decided. The writer renews the lease until it shuts down (then releases it, after
//! the relay published everything) or loses it: then the server restarts in-process, and
//! the start-up check ([`reconcile`]) decides what becomes of events the stream lacks.

pub mod complete;
pub mod follow;
pub mod lease;
pub mod reconcile;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use shop_shared::task::{wait_connected, Backoff, CONNECT_WAIT};
use tokio::sync::watch;

use self::complete::Completion;
use self::follow::Follower;
use self::lease::{Claim, Holder, Lease, LeaseGuard};
use self::reconcile::StreamView;
use crate::log::EventLog;
use crate::writer::Writer;

/// What this server is, for the command service and health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Not the writer; `leader` is the writer's advertised address when known.
    Standby { leader: Option<String> },
    /// Holds the lease, caught up: decides commands.
    Writer,
}

/// Why the role engine ended.
#[derive(Debug)]
pub enum Ended {
    /// Stopped while a standby.
    Stopped,
    /// The lease was lost, or the log and the stream disagree: the server restarts and
    /// the start-up check decides.
    Restart(String),
}

/// Everything the role engine works with.
pub struct Failover {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub stream: String,
    pub log: Arc<EventLog>,
    pub writer: Writer,
    pub durable: watch::Receiver<u64>,
    pub me: Holder,
    pub ttl: Duration,
    pub replicas: usize,
    pub role: watch::Sender<Role>,
    pub guard: LeaseGuard,
}

/// The lease as held by the writer.
pub struct Held {
    pub lease: Lease,
    pub revision: u64,
}

impl Failover {
    /// Opens the lease (retrying while NATS is away); `None` once `stop` is set.
    pub async fn open_lease(&self, stop: &mut watch::Receiver<bool>) -> Option<Lease> {
        let mut backoff = Backoff::new("lease", Duration::from_secs(1));
        loop {
            if *stop.borrow() {
                return None;
            }
            if wait_connected(&self.client, CONNECT_WAIT, stop).await {
                match Lease::open(
                    &self.js,
                    &self.stream,
                    self.me.clone(),
                    self.ttl,
                    self.replicas,
                )
                .await
                {
                    Ok(lease) => return Some(lease),
                    Err(error) => backoff.wait(&error, stop).await,
                }
            } else {
                backoff.wait(&"not connected to NATS", stop).await;
            }
        }
    }

    /// Standby until this server holds the lease and its log has caught up with the
    /// stream; follows the stream meanwhile.
    pub async fn standby(
        &self,
        lease: Lease,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<Held, Ended> {
        let (follow_stop, following) = watch::channel(false);
        let mut follower = tokio::spawn(
            Follower {
                js: self.js.clone(),
                client: self.client.clone(),
                stream: self.stream.clone(),
                log: self.log.clone(),
                writer: self.writer.clone(),
                durable: self.durable.clone(),
            }
            .run(following),
        );
        let stop_following = |result: Result<Held, Ended>| async {
            let _ = follow_stop.send(true);
            result
        };
        let interval = lease.ttl() / 4;
        let mut last_error: Option<String> = None;
        loop {
            let sent = Instant::now();
            match lease.claim().await {
                Ok(Claim::Held(revision)) => {
                    let held = Held { lease, revision };
                    let outcome = self.take_over(held, sent, stop, &mut follower).await;
                    let outcome = stop_following(outcome).await;
                    // The follower must be done before the writer decides anything. (It
                    // may have ended already, awaited during the takeover: a finished
                    // handle is not awaited again.)
                    if !follower.is_finished() {
                        let _ = (&mut follower).await;
                    }
                    return match outcome {
                        Ok(held) => self.complete_last_command(held).await,
                        Err(ended) => Err(ended),
                    };
                }
                Ok(Claim::Other(holder)) => {
                    self.role.send_if_modified(|role| {
                        let standby = Role::Standby {
                            leader: Some(holder.addr.clone()),
                        };
                        let changed = *role != standby;
                        *role = standby;
                        changed
                    });
                    last_error = None;
                }
                Err(error) => {
                    let error = error.to_string();
                    if last_error.as_ref() != Some(&error) {
                        tracing::warn!(%error, "standby: cannot claim the writer lease yet");
                    }
                    last_error = Some(error);
                }
            }
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                _ = stop.changed() => return stop_following(Err(Ended::Stopped)).await,
                ended = &mut follower => {
                    let why = match ended {
                        Ok(Err(diverged)) => diverged.to_string(),
                        Ok(Ok(())) => "the follower stopped".to_string(),
                        Err(panicked) => format!("the follower panicked: {panicked}"),
                    };
                    return Err(Ended::Restart(format!("the log and the stream disagree: {why}")));
                }
            }
        }
    }

    /// Holding the lease: brings the log up to the stream's end (as of now, after the
    /// claim), renewing the lease meanwhile.
    async fn take_over(
        &self,
        mut held: Held,
        claimed_at: Instant,
        stop: &mut watch::Receiver<bool>,
        follower: &mut tokio::task::JoinHandle<Result<(), follow::FollowError>>,
    ) -> Result<Held, Ended> {
        let started = Instant::now();
        self.guard.confirmed(claimed_at, held.lease.ttl());
        let view = StreamView {
            js: &self.js,
            name: &self.stream,
        };
        let target = loop {
            match view.bounds().await {
                Ok((_, last)) => break last,
                Err(error) => {
                    tracing::warn!(%error, "taking over: cannot read the stream's end yet");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            if *stop.borrow() {
                return Err(Ended::Stopped);
            }
        };
        let from = *self.durable.borrow();
        tracing::info!(stream = %self.stream, log_position = from, stream_last = target, "claimed the writer lease; catching up");
        let mut durable = self.durable.clone();
        let mut renew = tokio::time::interval(held.lease.ttl() / 4);
        renew.tick().await;
        while *durable.borrow_and_update() < target {
            tokio::select! {
                _ = durable.changed() => {}
                _ = renew.tick() => held = renew_lease(held, &self.guard).await?,
                _ = stop.changed() => return Err(Ended::Stopped),
                ended = &mut *follower => {
                    return Err(Ended::Restart(format!(
                        "taking over, the follower ended: {:?}",
                        ended.map(|r| r.err().map(|e| e.to_string()))
                    )));
                }
            }
        }
        tracing::info!(
            stream = %self.stream,
            position = *self.durable.borrow(),
            caught_up_events = self.durable.borrow().saturating_sub(from),
            ms = started.elapsed().as_millis() as u64,
            "took over as the writer at this position"
        );
        Ok(held)
    }
}

impl Failover {
    /// Caught up, the follower stopped: appends what the stream lacks of the log's last
    /// command, if the previous writer left it half published (see [`complete`]).
    async fn complete_last_command(&self, held: Held) -> Result<Held, Ended> {
        let view = StreamView {
            js: &self.js,
            name: &self.stream,
        };
        let last = *self.durable.borrow();
        match complete::complete_last_command(&self.log, &view, &self.writer, last).await {
            Ok(Completion::Whole) => Ok(held),
            Ok(Completion::Completed {
                first,
                appended,
                last,
            }) => {
                tracing::warn!(
                    stream = %self.stream,
                    first,
                    appended,
                    last,
                    "the previous writer left a command half published: appended the rest it carried"
                );
                Ok(held)
            }
            Ok(Completion::Unusable(why)) => {
                tracing::error!(
                    stream = %self.stream,
                    %why,
                    "the log may end with part of a command, and its rest cannot be used: it stays as it is"
                );
                Ok(held)
            }
            Err(error) => Err(Ended::Restart(format!(
                "taking over: completing the log's last command: {error}"
            ))),
        }
    }
}

/// One renewal: the lease at its new revision, or the restart when it is lost.
async fn renew_lease(mut held: Held, guard: &LeaseGuard) -> Result<Held, Ended> {
    let sent = Instant::now();
    match held.lease.renew(held.revision).await {
        Ok(Some(revision)) => {
            held.revision = revision;
            guard.confirmed(sent, held.lease.ttl());
            Ok(held)
        }
        Ok(None) => match held.lease.claim().await {
            // It expired (NATS was away, or this process paused) and nobody took it:
            // this server still writes; the stream's expected-sequence checks catch
            // anything else.
            Ok(Claim::Held(revision)) => {
                held.revision = revision;
                guard.confirmed(sent, held.lease.ttl());
                tracing::warn!("the writer lease had expired; claimed it again");
                Ok(held)
            }
            Ok(Claim::Other(holder)) => {
                guard.revoke();
                Err(Ended::Restart(format!(
                    "lost the writer lease to {} ({})",
                    holder.addr, holder.node
                )))
            }
            Err(error) => {
                tracing::warn!(%error, "writer lease expired and could not be claimed again yet");
                Ok(held)
            }
        },
        Err(error) => {
            tracing::warn!(%error, "writer lease not renewed; retrying");
            Ok(held)
        }
    }
}

/// The writer's lease keeper: renews every quarter TTL until `release` is set (then
/// gives the lease up) or the lease is lost. Holds nothing else of the server (in
/// particular no writer handle, which would keep the writer from finishing).
pub async fn keep(
    mut held: Held,
    guard: &LeaseGuard,
    release: &mut watch::Receiver<bool>,
) -> Result<(), Ended> {
    let mut renew = tokio::time::interval(held.lease.ttl() / 4);
    renew.tick().await;
    loop {
        tokio::select! {
            _ = renew.tick() => held = renew_lease(held, guard).await?,
            _ = release.changed() => {
                guard.revoke();
                held.lease.release(held.revision).await;
                return Ok(());
            }
        }
    }
}
