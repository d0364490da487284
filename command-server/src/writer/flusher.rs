//! The flusher thread: makes written batches durable, one sync for every batch written
//! since the last, then publishes the durable position and sends the batches' replies.
//! When it is idle and no command is waiting, the writer syncs its batch itself instead
//! of waking it (one thread hand-off fewer at low load). Exactly one thread syncs at a
//! time, whichever holds the [`SyncGate`] (sled can hang when several flush at once,
//! sled#1308).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::{oneshot, watch};

use super::{Accepted, WriteError};
use crate::log::LogError;

pub(super) type Reply = (
    oneshot::Sender<Result<Accepted, WriteError>>,
    Result<Accepted, WriteError>,
);

/// An applied batch waiting for a sync.
pub(super) struct FlushJob {
    pub(super) replies: Vec<Reply>,
    pub(super) last_position: u64,
}

/// Who syncs: held for the whole of a sync and its replies, so that one thread syncs at
/// a time; and the jobs handed to the flusher and not answered yet.
#[derive(Default)]
pub(super) struct SyncGate {
    lock: Mutex<()>,
    handed: AtomicUsize,
}

impl SyncGate {
    /// Whether every job handed to the flusher has been answered.
    pub(super) fn flusher_idle(&self) -> bool {
        self.handed.load(Ordering::Acquire) == 0
    }

    /// Counts a job about to be handed to the flusher.
    pub(super) fn hand(&self) {
        self.handed.fetch_add(1, Ordering::AcqRel);
    }

    /// Syncs and answers `pending` while holding the gate; false if the sync failed.
    pub(super) fn sync_and_answer(
        &self,
        sync: &mut impl FnMut() -> Result<(), LogError>,
        pending: &mut Vec<FlushJob>,
        durable: &watch::Sender<u64>,
        failure: &watch::Sender<Option<super::Failure>>,
        syncs: &SyncStats,
    ) -> bool {
        let _held = self
            .lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let started = Instant::now();
        let synced = sync();
        let commands: usize = pending.iter().map(|j| j.replies.len()).sum();
        syncs.record(started.elapsed(), commands as u64);
        if let Err(error) = synced {
            // Unknown what reached the disk: acknowledge nothing more, ever.
            tracing::error!(%error, "sync of the event log failed; the command server stops accepting commands");
            failure.send_replace(Some(super::Failure::of(&error)));
            return false;
        }
        // Publish the new durable position before replying, so that a client reading the
        // log (or the relay) right after its reply sees its own events.
        let last = pending
            .iter()
            .map(|j| j.last_position)
            .fold(*durable.borrow(), u64::max);
        durable.send_if_modified(|position| {
            let changed = *position != last;
            *position = last;
            changed
        });
        for job in pending.drain(..) {
            for (reply, outcome) in job.replies {
                let _client_gone = reply.send(outcome);
            }
        }
        true
    }
}

/// Runs until the writer is gone. `sync` makes everything written so far durable
/// (`EventLog::sync`; a test passes one it controls).
pub(super) fn flusher_loop(
    mut sync: impl FnMut() -> Result<(), LogError>,
    jobs: std::sync::mpsc::Receiver<FlushJob>,
    gate: &SyncGate,
    durable: &watch::Sender<u64>,
    failure: &watch::Sender<Option<super::Failure>>,
    syncs: &SyncStats,
) {
    let mut pending = Vec::new();
    while let Ok(first) = jobs.recv() {
        pending.push(first);
        while let Ok(more) = jobs.try_recv() {
            pending.push(more);
        }
        let handed = pending.len();
        if !gate.sync_and_answer(&mut sync, &mut pending, durable, failure, syncs) {
            return;
        }
        gate.handed.fetch_sub(handed, Ordering::AcqRel);
    }
    tracing::debug!("writer finished; flusher done");
}

/// The last syncs' durations and sizes (a ring of [`SYNC_SAMPLES`]), for status, and
/// every sync in two Prometheus histograms.
pub struct SyncStats {
    samples: std::sync::Mutex<SyncSamples>,
    /// `shop_group_commit_sync_seconds`: how long each group-commit sync took.
    pub sync_seconds: Histogram,
    /// `shop_group_commit_commands`: commands acknowledged by each sync.
    pub commands_per_sync: Histogram,
}

/// Upper bounds of the commands-per-sync histogram (the batch limit defaults to 1024).
const COMMANDS_PER_SYNC_BUCKETS: [f64; 12] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0,
];

impl Default for SyncStats {
    fn default() -> Self {
        SyncStats {
            samples: std::sync::Mutex::default(),
            sync_seconds: shop_shared::metrics::latency_histogram(),
            commands_per_sync: Histogram::new(COMMANDS_PER_SYNC_BUCKETS),
        }
    }
}

#[derive(Default)]
struct SyncSamples {
    /// (duration µs, commands acknowledged) per sync, oldest overwritten first.
    ring: Vec<(u64, u64)>,
    next: usize,
    total: u64,
}

/// Syncs remembered for the status percentiles.
const SYNC_SAMPLES: usize = 4096;

/// Percentiles of the recent syncs.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SyncSummary {
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
    pub commands_per_sync: f64,
    pub total: u64,
}

impl SyncStats {
    pub(super) fn record(&self, took: Duration, commands: u64) {
        self.sync_seconds.observe(took.as_secs_f64());
        self.commands_per_sync.observe(commands as f64);
        if let Ok(mut s) = self.samples.lock() {
            let sample = (
                u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
                commands,
            );
            if s.ring.len() < SYNC_SAMPLES {
                s.ring.push(sample);
            } else {
                let i = s.next;
                s.ring[i] = sample;
            }
            s.next = (s.next + 1) % SYNC_SAMPLES;
            s.total += 1;
        }
    }

    pub fn summary(&self) -> SyncSummary {
        let Ok(s) = self.samples.lock() else {
            return SyncSummary::default();
        };
        if s.ring.is_empty() {
            return SyncSummary::default();
        }
        let mut durations: Vec<u64> = s.ring.iter().map(|(d, _)| *d).collect();
        durations.sort_unstable();
        let at = |q: f64| durations[((durations.len() - 1) as f64 * q) as usize];
        let commands: u64 = s.ring.iter().map(|(_, c)| *c).sum();
        SyncSummary {
            p50_us: at(0.5),
            p99_us: at(0.99),
            max_us: at(1.0),
            commands_per_sync: commands as f64 / s.ring.len() as f64,
            total: s.total,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;

    fn accepted(position: u64) -> (Reply, oneshot::Receiver<Result<Accepted, WriteError>>) {
        let (reply, answer) = oneshot::channel();
        let outcome = Ok(Accepted {
            result: shop_shared::pb::CommandResult {
                position,
                ..Default::default()
            },
            replayed: false,
        });
        ((reply, outcome), answer)
    }

    /// Nothing is acknowledged, and the durable position (what the relay publishes and
    /// LogService serves up to) does not move, until the sync covering the batch has
    /// returned; a failed sync acknowledges nothing, ever.
    #[test]
    fn nothing_is_durable_or_answered_before_the_sync_returns() {
        let (jobs_tx, jobs) = mpsc::sync_channel(8);
        let (durable_tx, durable) = watch::channel(0u64);
        let (failure_tx, failure) = watch::channel(None);
        let (entered_tx, entered) = mpsc::channel();
        let (release_tx, release) = mpsc::channel::<Result<(), LogError>>();
        let flusher = std::thread::spawn(move || {
            let sync = move || {
                entered_tx.send(()).expect("test alive");
                release.recv().expect("test alive")
            };
            let gate = SyncGate::default();
            flusher_loop(
                sync,
                jobs,
                &gate,
                &durable_tx,
                &failure_tx,
                &SyncStats::default(),
            );
        });
        let (reply, mut answer) = accepted(5);
        jobs_tx
            .send(FlushJob {
                replies: vec![reply],
                last_position: 5,
            })
            .expect("flusher alive");
        // The sync is running (and held): whatever the flusher does before it, it did.
        entered.recv().expect("sync started");
        assert_eq!(*durable.borrow(), 0, "durable before the sync returned");
        assert!(
            answer.try_recv().is_err(),
            "answered before the sync returned"
        );
        release_tx.send(Ok(())).expect("flusher alive");
        let answered = loop {
            match answer.try_recv() {
                Ok(outcome) => break outcome,
                Err(oneshot::error::TryRecvError::Empty) => std::thread::yield_now(),
                Err(e) => panic!("no answer: {e}"),
            }
        };
        assert!(matches!(answered, Ok(a) if a.result.position == 5));
        assert_eq!(*durable.borrow(), 5, "durable once answered");

        // A failed sync: nothing of its batch is acknowledged or made durable.
        let (reply, answer) = accepted(9);
        jobs_tx
            .send(FlushJob {
                replies: vec![reply],
                last_position: 9,
            })
            .expect("flusher alive");
        entered.recv().expect("sync started");
        release_tx
            .send(Err(LogError::Corrupt {
                key: "test".into(),
                reason: "disk gone".into(),
            }))
            .expect("flusher alive");
        flusher.join().expect("the flusher stops");
        assert_eq!(*durable.borrow(), 5);
        assert!(failure.borrow().is_some());
        assert!(answer.blocking_recv().is_err(), "the reply was dropped");
    }
}
