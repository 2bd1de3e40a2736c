//! Exponential backoff with full jitter: the n-th retry waits a uniformly
//! random time in `[0, min(max, initial * 2^n)]`, so a fleet that lost its
//! registry at one instant does not come back in lockstep.

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
}

impl Backoff {
    /// Delays from `initial` doubling up to `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max: max.max(initial),
            attempt: 0,
        }
    }

    /// The next delay (random below the current ceiling), and one more
    /// failure counted.
    pub fn next_delay(&mut self, rng: &mut fastrand::Rng) -> Duration {
        let ceiling = self
            .initial
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        ceiling.mul_f64(rng.f64())
    }

    /// Starts over from `initial` after a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_stay_under_a_doubling_ceiling_and_reset() {
        let mut rng = fastrand::Rng::with_seed(7);
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let ceilings = [100, 200, 400, 800, 1000, 1000];
        for ceiling in ceilings {
            let delay = backoff.next_delay(&mut rng);
            assert!(
                delay <= Duration::from_millis(ceiling),
                "{delay:?} > {ceiling} ms"
            );
        }
        backoff.reset();
        for _ in 0..20 {
            let mut again = backoff.clone();
            assert!(again.next_delay(&mut rng) <= Duration::from_millis(100));
        }
    }
}
