//! The closed-loop driver: `concurrency` tasks, each sending its next request
//! as soon as the previous one is answered, spread round-robin over the
//! connections. Each task records into its own histogram (no shared lock on
//! the measured path); they are merged at the end.
//!
//! A run is bounded twice: by time (warm-up + duration) and by a count of
//! operations shared by all tasks, so setup phases ("register exactly 100,000
//! instances") use the same machinery and nothing runs unbounded.

use std::{
    fmt::Display,
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use hdrhistogram::Histogram;
use tokio::{task::JoinSet, time::Instant};
use tonic::transport::Channel;

/// Highest latency the histograms hold, in microseconds (a minute): anything
/// slower is clamped there, and is a failure anyway.
const MAX_LATENCY_US: u64 = 60_000_000;

/// A histogram of latencies in microseconds, 3 significant digits.
pub(crate) fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("static histogram bounds are valid")
}

/// How long and how much one drive runs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Plan {
    /// Not measured: lets connections, allocators and caches settle.
    pub(crate) warmup: Duration,
    /// Measured time after the warm-up.
    pub(crate) duration: Duration,
    /// Most operations started in total, across all tasks.
    pub(crate) limit: u64,
}

impl Plan {
    /// Time-bounded: warm-up then `duration` (count bound: effectively none,
    /// but still finite).
    pub(crate) fn timed(warmup: Duration, duration: Duration) -> Self {
        Self {
            warmup,
            duration,
            limit: u64::MAX,
        }
    }

    /// Exactly `n` operations, all measured, within `timeout`.
    pub(crate) fn count(n: u64, timeout: Duration) -> Self {
        Self {
            warmup: Duration::ZERO,
            duration: timeout,
            limit: n,
        }
    }
}

/// One task's view of the run: hands out the next operation and records how
/// it went.
#[derive(Debug)]
pub(crate) struct Recorder {
    measure_from: Instant,
    stop_at: Instant,
    seq: Arc<AtomicU64>,
    limit: u64,
    hist: Histogram<u64>,
    ops: u64,
    units: u64,
    errors: u64,
    first_error: Option<String>,
}

impl Recorder {
    /// The next operation's start time and sequence number (unique across
    /// tasks), or `None` when the run is over.
    pub(crate) fn next(&mut self) -> Option<(Instant, u64)> {
        let now = Instant::now();
        if now >= self.stop_at {
            return None;
        }
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        (seq < self.limit).then_some((now, seq))
    }

    /// The operation started at `t0` succeeded and did `units` of work
    /// (renewals, instances...). Counted only if it started after warm-up.
    pub(crate) fn ok(&mut self, t0: Instant, units: u64) {
        if t0 >= self.measure_from {
            let us = t0.elapsed().as_micros() as u64;
            self.hist.saturating_record(us.max(1));
            self.ops += 1;
            self.units += units;
        }
    }

    /// The operation started at `t0` failed.
    pub(crate) fn failed(&mut self, t0: Instant, error: impl Display) {
        if t0 >= self.measure_from {
            self.errors += 1;
        }
        if self.first_error.is_none() {
            self.first_error = Some(error.to_string());
        }
    }
}

/// What a drive measured, all tasks merged.
#[derive(Debug)]
pub(crate) struct Outcome {
    /// Latency of each measured operation, in µs.
    pub(crate) hist: Histogram<u64>,
    /// Measured operations that succeeded.
    pub(crate) ops: u64,
    /// Units of work they did (equal to `ops` unless operations batch).
    pub(crate) units: u64,
    /// Measured operations that failed.
    pub(crate) errors: u64,
    /// The first failure's message, measured or not.
    pub(crate) first_error: Option<String>,
    /// Length of the measured window.
    pub(crate) elapsed: Duration,
}

impl Outcome {
    /// Operations per second over the measured window.
    pub(crate) fn ops_per_sec(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Units per second over the measured window.
    pub(crate) fn units_per_sec(&self) -> f64 {
        self.units as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Runs `worker(task index, channel, recorder)` on `concurrency` tasks, the
/// channels assigned round-robin, and merges what they recorded. Each worker
/// loops on [`Recorder::next`] and returns its recorder plus whatever it
/// collected (lease ids, send times...).
pub(crate) async fn drive<F, Fut, T>(
    channels: &[Channel],
    concurrency: usize,
    plan: Plan,
    worker: F,
) -> (Outcome, Vec<T>)
where
    F: Fn(usize, Channel, Recorder) -> Fut,
    Fut: Future<Output = (Recorder, T)> + Send + 'static,
    T: Send + 'static,
{
    let start = Instant::now();
    let measure_from = start + plan.warmup;
    let stop_at = measure_from + plan.duration;
    let seq = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for i in 0..concurrency {
        let recorder = Recorder {
            measure_from,
            stop_at,
            seq: seq.clone(),
            limit: plan.limit,
            hist: histogram(),
            ops: 0,
            units: 0,
            errors: 0,
            first_error: None,
        };
        tasks.spawn(worker(i, channels[i % channels.len()].clone(), recorder));
    }
    let mut outcome = Outcome {
        hist: histogram(),
        ops: 0,
        units: 0,
        errors: 0,
        first_error: None,
        elapsed: Duration::ZERO,
    };
    let mut collected = Vec::with_capacity(concurrency);
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((rec, out)) => {
                outcome.hist.add(&rec.hist).expect("same histogram bounds");
                outcome.ops += rec.ops;
                outcome.units += rec.units;
                outcome.errors += rec.errors;
                if outcome.first_error.is_none() {
                    outcome.first_error = rec.first_error;
                }
                collected.push(out);
            }
            Err(e) => {
                outcome.errors += 1;
                outcome
                    .first_error
                    .get_or_insert_with(|| format!("load task failed: {e}"));
            }
        }
    }
    let end = Instant::now().min(stop_at);
    outcome.elapsed = end.saturating_duration_since(measure_from);
    (outcome, collected)
}
