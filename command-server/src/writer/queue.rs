//! The command queue: admission by waiting time (`--queue-wait-max-ms`), and the
//! writer's end, which takes batches and answers the commands that waited too long.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::{Submission, WriteError};

/// Admission by queueing time, not only the queue's length. Two checks:
/// - on arrival, the wait a new command would have (commands queued ÷ the rate the
///   writer drains them, measured while it is busy) must not exceed `wait_max`: beyond,
///   it is refused at once, before it is queued;
/// - when the writer reaches a command that waited longer than `wait_max` anyway (a slow
///   sync, a burst), that command is refused instead of decided, and new commands are
///   refused at once for the next `wait_max` (the sojourn check of CoDel).
///
/// So admitted commands wait about `wait_max` at most, and the others learn it right
/// away, however far the offered load exceeds what the writer does.
pub(super) struct Admission {
    base: Instant,
    wait_max: Option<Duration>,
    /// Microseconds after `base` until which new commands are refused.
    closed_until_us: AtomicU64,
    /// Commands per second the writer drains while busy (`f64` bits; 0 until measured).
    drain_per_s: AtomicU64,
    /// Below this many queued commands the estimate is not used (one batch).
    queued_min: usize,
}

impl Admission {
    pub(super) fn new(wait_max: Option<Duration>, queued_min: usize) -> Self {
        Admission {
            base: Instant::now(),
            wait_max,
            closed_until_us: AtomicU64::new(0),
            drain_per_s: AtomicU64::new(0),
            queued_min,
        }
    }

    /// Whether a new command may join `queued` others now.
    pub(super) fn admits(&self, queued: usize) -> bool {
        let Some(wait_max) = self.wait_max else {
            return true;
        };
        if self.micros(Instant::now()) < self.closed_until_us.load(Ordering::Relaxed) {
            return false;
        }
        let rate = f64::from_bits(self.drain_per_s.load(Ordering::Relaxed));
        queued <= self.queued_min || rate <= 0.0 || queued as f64 <= rate * wait_max.as_secs_f64()
    }

    /// Folds in a measured drain rate: `taken` commands in `elapsed` of busy writing.
    pub(super) fn measured(&self, taken: usize, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        if seconds <= 0.0 {
            return;
        }
        let sample = taken as f64 / seconds;
        let before = f64::from_bits(self.drain_per_s.load(Ordering::Relaxed));
        let rate = if before > 0.0 {
            0.7 * before + 0.3 * sample
        } else {
            sample
        };
        self.drain_per_s.store(rate.to_bits(), Ordering::Relaxed);
    }

    fn micros(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.base).as_micros()).unwrap_or(u64::MAX)
    }

    /// Whether a command queued at `queued_at` waited too long by `now`; if so, new
    /// commands are refused for the next `wait_max`.
    pub(super) fn expired(&self, queued_at: Instant, now: Instant) -> bool {
        let Some(wait_max) = self.wait_max else {
            return false;
        };
        if now.saturating_duration_since(queued_at) <= wait_max {
            return false;
        }
        self.closed_until_us
            .store(self.micros(now + wait_max), Ordering::Relaxed);
        true
    }

    pub(super) fn refusal(&self) -> WriteError {
        let ms = self.wait_max.map_or(0, |d| d.as_millis());
        WriteError::QueueWait(u64::try_from(ms).unwrap_or(u64::MAX))
    }
}

/// The writer's end of the command queue.
pub(super) struct Queue {
    receiver: mpsc::Receiver<Submission>,
    pub(super) batch_max: usize,
    admission: Arc<Admission>,
    /// When the previous batch was taken and its size, if commands were left waiting
    /// then (the writer has been busy since: the time to this batch is what deciding,
    /// applying and handing over that batch took).
    busy_since: Option<(Instant, usize)>,
}

impl Queue {
    pub(super) fn new(
        receiver: mpsc::Receiver<Submission>,
        batch_max: usize,
        admission: Arc<Admission>,
    ) -> Self {
        Queue {
            receiver,
            batch_max,
            admission,
            busy_since: None,
        }
    }

    /// Whether no command is waiting.
    pub(super) fn is_empty(&self) -> bool {
        self.receiver.is_empty()
    }

    /// The next batch of commands (blocking until one arrives unless `wait` is false);
    /// `None` once every sender is gone. Commands that waited too long are answered here.
    pub(super) fn next_batch(
        &mut self,
        submissions: &mut Vec<Submission>,
        wait: bool,
    ) -> Option<()> {
        let first = if wait {
            Some(self.receiver.blocking_recv()?)
        } else {
            match self.receiver.try_recv() {
                Ok(s) => Some(s),
                Err(mpsc::error::TryRecvError::Empty) => None,
                Err(mpsc::error::TryRecvError::Disconnected) => return None,
            }
        };
        submissions.extend(first);
        while !submissions.is_empty() && submissions.len() < self.batch_max {
            match self.receiver.try_recv() {
                Ok(s) => submissions.push(s),
                Err(_) => break,
            }
        }
        let now = Instant::now();
        if let Some((since, taken)) = self.busy_since {
            self.admission
                .measured(taken, now.saturating_duration_since(since));
        }
        self.busy_since = (!self.receiver.is_empty()).then_some((now, submissions.len()));
        // Oldest first: when the first has not waited too long, none has.
        // Followed events are history: never refused.
        let late = |s: &Submission| {
            matches!(s.work, super::Work::Decide(..)) && self.admission.expired(s.queued_at, now)
        };
        if submissions.first().is_some_and(late) {
            let (kept, late): (Vec<_>, Vec<_>) = submissions.drain(..).partition(|s| !late(s));
            *submissions = kept;
            for s in late {
                let _ = s.reply.send(Err(self.admission.refusal()));
            }
        }
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admission_closes_for_wait_max_after_a_command_waited_too_long() {
        let wait_max = Duration::from_millis(200);
        let admission = Admission::new(Some(wait_max), 10);
        let now = Instant::now();
        assert!(admission.admits(0));
        assert!(!admission.expired(now, now + wait_max));
        assert!(admission.admits(0), "a wait of exactly wait_max is fine");
        assert!(admission.expired(now, now + wait_max + Duration::from_millis(1)));
        assert!(!admission.admits(0), "closed right after a late command");
        std::thread::sleep(wait_max * 3);
        assert!(admission.admits(0), "open again once wait_max has passed");
        assert!(matches!(admission.refusal(), WriteError::QueueWait(200)));

        let unlimited = Admission::new(None, 10);
        assert!(!unlimited.expired(now, now + Duration::from_secs(3600)));
        unlimited.measured(1, Duration::from_secs(10));
        assert!(unlimited.admits(usize::MAX));
    }

    #[test]
    fn admission_refuses_on_arrival_what_would_wait_too_long() {
        let admission = Admission::new(Some(Duration::from_millis(500)), 10);
        assert!(admission.admits(5_000), "no rate measured yet");
        // 1,000 commands/s drained: 500 queued is 500 ms of waiting.
        admission.measured(100, Duration::from_millis(100));
        assert!(admission.admits(500));
        assert!(!admission.admits(501));
        assert!(admission.admits(10), "never below one batch");
        // The rate follows the measurements: at 4,000/s, 2,000 queued is fine.
        for _ in 0..50 {
            admission.measured(400, Duration::from_millis(100));
        }
        assert!(admission.admits(1_900));
        assert!(!admission.admits(2_100));
    }
}
