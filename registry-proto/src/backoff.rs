//! Exponential backoff with full jitter: the n-th retry waits a uniformly
//! random time in `[0, min(max, initial * 2^n)]`. Full jitter spreads the
//! reconnects of a whole fleet after a registry restart instead of having
//! every agent retry in lockstep.
//!
//! node-agent reconnects with it, and fleet-sim's virtual agents do the
//! same, so a simulated fleet comes back the way a real one does.

use std::time::Duration;

/// Retry delays for one run of failures; [`Backoff::reset`] after success.
#[derive(Debug, Clone)]
pub struct Backoff {
    /// Ceiling of the first delay.
    initial: Duration,
    /// Largest ceiling, however many failures in a row.
    max: Duration,
    /// Failures since the last success; doubles the ceiling each time.
    attempt: u32,
    /// Where the jitter comes from.
    rng: fastrand::Rng,
}

impl Backoff {
    /// Delays seeded from the OS's entropy.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self::with_rng(initial, max, fastrand::Rng::new())
    }

    /// Delays from the given generator (tests seed it).
    pub fn with_rng(initial: Duration, max: Duration, rng: fastrand::Rng) -> Self {
        Backoff {
            initial,
            max: max.max(initial),
            attempt: 0,
            rng,
        }
    }

    /// The upper bound of the next delay.
    pub fn ceiling(&self) -> Duration {
        // 2^20 * any sane initial delay is far past any sane max.
        let factor = 1u32 << self.attempt.min(20);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// The next delay, and one more failed attempt counted.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        let delay = random_up_to(&mut self.rng, ceiling);
        self.attempt = self.attempt.saturating_add(1);
        delay
    }

    /// Failed attempts since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// Starts over from `initial` after a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// A uniformly random duration in `[0, max]`.
pub fn random_up_to(rng: &mut fastrand::Rng, max: Duration) -> Duration {
    let nanos = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(rng.u64(0..=nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceilings_double_up_to_the_cap() {
        let mut b = Backoff::with_rng(
            Duration::from_millis(100),
            Duration::from_secs(1),
            fastrand::Rng::with_seed(1),
        );
        let mut ceilings = Vec::new();
        for _ in 0..6 {
            ceilings.push(b.ceiling().as_millis());
            b.next_delay();
        }
        assert_eq!(ceilings, [100, 200, 400, 800, 1000, 1000]);
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(100));
        assert_eq!(b.attempts(), 0);
    }

    #[test]
    fn delays_stay_within_bounds_and_are_spread() {
        let mut b = Backoff::with_rng(
            Duration::from_millis(10),
            Duration::from_secs(30),
            fastrand::Rng::with_seed(7),
        );
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1000 {
            let ceiling = b.ceiling();
            let delay = b.next_delay();
            assert!(delay <= ceiling, "{delay:?} > {ceiling:?}");
            assert!(delay <= Duration::from_secs(30));
            seen.insert(delay);
        }
        assert!(
            seen.len() > 900,
            "jitter is not random: {} values",
            seen.len()
        );
    }

    #[test]
    fn huge_attempt_counts_do_not_overflow() {
        let mut b = Backoff::with_rng(
            Duration::from_secs(1),
            Duration::from_secs(30),
            fastrand::Rng::with_seed(3),
        );
        for _ in 0..200 {
            b.next_delay();
        }
        assert_eq!(b.ceiling(), Duration::from_secs(30));
        // A max below initial is raised to initial, not an empty range.
        let small = Backoff::new(Duration::from_secs(2), Duration::from_secs(1));
        assert_eq!(small.ceiling(), Duration::from_secs(2));
    }

    #[test]
    fn random_up_to_zero_is_zero() {
        let mut rng = fastrand::Rng::with_seed(0);
        assert_eq!(random_up_to(&mut rng, Duration::ZERO), Duration::ZERO);
    }
}
