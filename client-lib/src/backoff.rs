//! Exponential backoff with jitter, shared by the keepalive and watch loops.

use std::time::Duration;

use rand::Rng;

/// First retry delay: short enough that a registry restart is noticed fast.
pub(crate) const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest retry delay: a registry that starts (or comes back) is found
/// within this long, so a service started before its registry is
/// registered within a second of the registry starting. Polling a dead
/// registry this often is cheap: a refused connection is one SYN and one
/// RST, and the jitter below spreads a fleet's attempts.
pub(crate) const BACKOFF_MAX: Duration = Duration::from_millis(800);

/// Doubling delays between [`BACKOFF_MIN`] and [`BACKOFF_MAX`]; each delay
/// is drawn uniformly from its upper half so that clients that lost the
/// registry at the same moment do not retry in lockstep.
#[derive(Debug, Default)]
pub(crate) struct Backoff {
    attempt: u32,
}

impl Backoff {
    /// The next delay to wait, growing with each call.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let ceiling = BACKOFF_MIN
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(BACKOFF_MAX);
        self.attempt = self.attempt.saturating_add(1);
        let nanos = ceiling.as_nanos() as u64;
        Duration::from_nanos(rand::rng().random_range(nanos / 2..=nanos))
    }

    /// Back to the shortest delay after a success.
    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// `base` scaled by a random factor in [0.9, 1.1], so renewals of many
/// clients spread out instead of arriving together.
pub(crate) fn jitter(base: Duration) -> Duration {
    base.mul_f64(rand::rng().random_range(0.9..=1.1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_and_resets() {
        let mut b = Backoff::default();
        let first = b.next_delay();
        assert!(
            first >= BACKOFF_MIN / 2 && first <= BACKOFF_MIN,
            "{first:?}"
        );
        let mut last = first;
        for _ in 0..20 {
            last = b.next_delay();
            assert!(last <= BACKOFF_MAX);
        }
        assert!(last >= BACKOFF_MAX / 2, "{last:?}");
        b.reset();
        assert!(b.next_delay() <= BACKOFF_MIN);
    }

    #[test]
    fn jitter_stays_within_ten_percent() {
        for _ in 0..100 {
            let d = jitter(Duration::from_millis(1000));
            assert!(d >= Duration::from_millis(899) && d <= Duration::from_millis(1101));
        }
    }
}
