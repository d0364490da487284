//! Measurements of one run: a latency histogram (HdrHistogram, microseconds), completions
//! per second, and failures by gRPC code; and their serializable summary.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

/// Highest latency recorded, in microseconds (beyond: clamped).
const LATENCY_MAX_US: u64 = 60_000_000;

pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_MAX_US, 3).expect("valid histogram bounds")
}

/// Per-client recorder, merged at the end of a run (no sharing on the hot path except
/// the per-second counters).
pub struct Recorder {
    pub latency: Histogram<u64>,
    pub errors: BTreeMap<String, u64>,
    pub ok: u64,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder {
            latency: histogram(),
            errors: BTreeMap::new(),
            ok: 0,
        }
    }
}

impl Recorder {
    pub fn record_ok(&mut self, elapsed: Duration) {
        self.ok += 1;
        let us = u64::try_from(elapsed.as_micros())
            .unwrap_or(LATENCY_MAX_US)
            .clamp(1, LATENCY_MAX_US);
        let _ = self.latency.record(us);
    }

    pub fn record_error(&mut self, code: tonic::Code) {
        *self.errors.entry(format!("{code:?}")).or_default() += 1;
    }

    pub fn merge(&mut self, other: Recorder) {
        let _ = self.latency.add(&other.latency);
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
        self.ok += other.ok;
    }
}

/// Completions per elapsed second of a run.
pub struct Timeline {
    start: Instant,
    buckets: Vec<AtomicU64>,
}

impl Timeline {
    pub fn new(start: Instant, seconds: u64) -> Self {
        Timeline {
            start,
            buckets: (0..seconds + 2).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    pub fn tick(&self) {
        let i = usize::try_from(self.start.elapsed().as_secs()).unwrap_or(usize::MAX);
        if let Some(b) = self.buckets.get(i) {
            b.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn series(&self, seconds: u64) -> Vec<u64> {
        self.buckets
            .iter()
            .take(usize::try_from(seconds).unwrap_or(0))
            .map(|b| b.load(Ordering::Relaxed))
            .collect()
    }
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Latency {
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
    /// (latency ms, fraction of requests at or below it), for the CDF plot.
    pub cdf: Vec<(f64, f64)>,
}

impl Latency {
    pub fn of(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        let quantiles = [
            0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999,
            0.9999, 1.0,
        ];
        Latency {
            p50_ms: ms(h.value_at_quantile(0.5)),
            p90_ms: ms(h.value_at_quantile(0.9)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
            mean_ms: h.mean() / 1000.0,
            cdf: quantiles
                .iter()
                .map(|&q| (ms(h.value_at_quantile(q)), q))
                .collect(),
        }
    }
}

/// Summary of one load run.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    pub name: String,
    pub concurrency: usize,
    pub connections: usize,
    pub seconds: f64,
    pub ok: u64,
    pub per_second: f64,
    pub latency: Latency,
    pub errors: BTreeMap<String, u64>,
    /// Completions in each second of the run.
    pub timeline: Vec<u64>,
}

impl RunSummary {
    pub fn new(
        name: &str,
        concurrency: usize,
        connections: usize,
        elapsed: Duration,
        recorder: &Recorder,
        timeline: Vec<u64>,
    ) -> Self {
        let seconds = elapsed.as_secs_f64().max(1e-9);
        RunSummary {
            name: name.to_string(),
            concurrency,
            connections,
            seconds,
            ok: recorder.ok,
            per_second: recorder.ok as f64 / seconds,
            latency: Latency::of(&recorder.latency),
            errors: recorder.errors.clone(),
            timeline,
        }
    }
}
