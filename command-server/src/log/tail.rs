//! The newest events of the log, as the writer encoded them (the exact log bytes), kept
//! in memory for the relay: it publishes what just became durable from here, without
//! reading the log back (a sled read waits for sled's global lock while the writer or the
//! flusher holds it). Positions are consecutive; older ones are read from the log.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard, PoisonError};

/// The log's in-memory tail, up to [`TAIL_BYTES_MAX`] of envelopes.
#[derive(Default)]
pub struct LogTail {
    inner: Mutex<TailEvents>,
}

#[derive(Default)]
struct TailEvents {
    /// Position of `events[0]`.
    first: u64,
    events: VecDeque<bytes::Bytes>,
    bytes: usize,
}

/// Envelope bytes [`LogTail`] keeps at most.
const TAIL_BYTES_MAX: usize = 8 << 20;

impl LogTail {
    fn lock(&self) -> MutexGuard<'_, TailEvents> {
        // Nothing panics while holding it; if something did, the data is still whole.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends the events written at `first`, `first + 1`, ...
    pub fn extend(&self, first: u64, events: Vec<bytes::Bytes>) {
        let mut r = self.lock();
        if r.first + r.events.len() as u64 != first {
            r.events.clear();
            r.bytes = 0;
            r.first = first;
        }
        for e in events {
            r.bytes += e.len();
            r.events.push_back(e);
        }
        while r.bytes > TAIL_BYTES_MAX {
            match r.events.pop_front() {
                Some(e) => {
                    r.bytes -= e.len();
                    r.first += 1;
                }
                None => break,
            }
        }
    }

    /// The events at positions `from..=to`, if all of them are held.
    pub fn range(&self, from: u64, to: u64) -> Option<Vec<(u64, bytes::Bytes)>> {
        let r = self.lock();
        let end = r.first + r.events.len() as u64;
        if from > to || from < r.first || to >= end {
            return None;
        }
        let skip = usize::try_from(from - r.first).ok()?;
        let take = usize::try_from(to - from + 1).ok()?;
        Some(
            (from..)
                .zip(r.events.iter().skip(skip).take(take).cloned())
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(range: std::ops::Range<u64>) -> Vec<bytes::Bytes> {
        range.map(|p| bytes::Bytes::from(p.to_string())).collect()
    }

    #[test]
    fn tail_returns_only_ranges_it_holds_whole() {
        let tail = LogTail::default();
        assert_eq!(tail.range(1, 1), None);
        tail.extend(1, events(1..4));
        tail.extend(4, events(4..6));
        let got = tail.range(2, 5).expect("held");
        assert_eq!(
            got,
            vec![
                (2, bytes::Bytes::from("2")),
                (3, bytes::Bytes::from("3")),
                (4, bytes::Bytes::from("4")),
                (5, bytes::Bytes::from("5")),
            ]
        );
        assert_eq!(tail.range(5, 6), None, "6 is not written yet");
        assert_eq!(tail.range(0, 1), None);
        assert_eq!(tail.range(3, 2), None);
    }

    #[test]
    fn tail_restarts_at_a_discontinuity_and_drops_the_oldest_beyond_its_budget() {
        let tail = LogTail::default();
        tail.extend(10, events(10..12));
        tail.extend(20, events(20..21));
        assert_eq!(tail.range(10, 10), None, "not continuous with 20: dropped");
        assert!(tail.range(20, 20).is_some());

        let big = bytes::Bytes::from(vec![0u8; TAIL_BYTES_MAX / 4 + 1]);
        tail.extend(21, vec![big.clone(), big.clone(), big.clone(), big.clone()]);
        assert_eq!(tail.range(20, 21), None, "the oldest went first");
        assert!(tail.range(22, 24).is_some());
    }
}
