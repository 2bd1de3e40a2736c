//! Admission control for Register: a storm of agents arriving at once
//! (a data centre powering up, a network coming back) is served at the
//! pace the registry can take, explicitly, instead of every call piling
//! onto the runtime's workers until heartbeats of registered nodes wait
//! seconds and calls time out.
//!
//! - At most `--max-concurrent-registrations` Register calls run at once;
//!   the next `--max-queued-registrations` wait their turn in arrival
//!   order (a waiting call is a parked task: no CPU).
//! - Past that, a call is refused at once with RESOURCE_EXHAUSTED and a
//!   retry time (`google.rpc.RetryInfo`, see [`registry_proto::retry`]).
//!   The times handed out are spread at the rate registrations have been
//!   completing, each refusal one slot after the previous one, so the
//!   refused agents come back about as fast as the queue drains rather
//!   than all together.
//!
//! The rate is measured, not configured: completions per second over
//! windows of at least [`WINDOW`] during which calls were waiting (the
//! registry was saturated, which is the only time it refuses). Stores that
//! commit in groups complete calls in bursts; a window spans many bursts,
//! but a second without any completion ends it unmeasured (a stall, not a
//! rate). A faster window is believed at once, a slower one slowly (see
//! [`Pace::completed`]). When the estimate changes, the end of the line of
//! slots handed out is moved to where that many slots end at the new rate:
//! callers already refused keep their times, and later refusals are placed
//! after the line as measured now, not after one laid out at an old,
//! slower guess that would leave the registry idle while they wait.
//!
//! A call that would wait longer than `--max-registration-wait` at that
//! rate behind the calls already queued is refused at once, rather than
//! queued only to be refused when its wait runs out.
//!
//! With `--max-registration-lag`, a call is also refused on arrival while
//! the runtimes serving calls run further behind than that
//! ([`crate::lag`]): CPU, not turns, is what a storm on a fast store runs
//! out of first, and the calls it queues then wait in the runtimes, unseen
//! by the bounds above, in front of every heartbeat. Its retry time is no
//! sooner than the lag read.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::error::RegistryError;
use crate::lag::RuntimeLag;

/// The shortest retry time handed out: a caller refused by a full queue
/// should not be back within a few milliseconds whatever the estimate.
const MIN_ADVICE: Duration = Duration::from_millis(100);
/// The longest retry time handed out, however long the line of slots.
const MAX_ADVICE: Duration = Duration::from_secs(60);
/// The time between two completions assumed before any saturated window
/// was measured (5,000 registrations a second).
const INITIAL_SPACING: Duration = Duration::from_micros(200);
/// The shortest window the completion rate is measured over.
const WINDOW: Duration = Duration::from_millis(100);
/// A saturated stretch this long without a completion is a stall (a store
/// that did not answer, a process that was not scheduled), not a rate: it
/// ends the open window unread. Well above [`WINDOW`], so a store whose
/// group commits take a few hundred milliseconds is still measured.
const STALL: Duration = Duration::from_secs(1);
/// A slower measured rate moves the estimated rate by this fraction of the
/// difference per window (a time constant of 256 windows, ~26 s at the
/// shortest: a storm's own arrival, a second or two of slow completions,
/// barely moves it; a store that stays slower is followed, the rate within
/// a minute or two, a time per call far above the estimate over minutes:
/// optimistic, see [`Pace::completed`]).
const SLOWER_STEP: u32 = 256;
/// While the runtimes lag past `--max-registration-lag`, one call in this
/// long is let through all the same (100 a second): a registry saturated
/// by heartbeats alone, its lag never under the bound, still takes new
/// nodes in, where refusing every call would lock them out for as long as
/// the load lasts.
const LAG_PASS: Duration = Duration::from_millis(10);

/// The gate every Register call passes; cloned into each service handle.
#[derive(Clone)]
pub struct Admission {
    shared: Arc<Shared>,
    /// The runtimes' lag and the most a call may arrive into
    /// (`--max-registration-lag`); `None`: not checked.
    lag: Option<(RuntimeLag, Duration)>,
}

struct Shared {
    /// One permit per Register allowed to run at once.
    permits: Arc<Semaphore>,
    /// `--max-concurrent-registrations`.
    max_in_flight: usize,
    /// `--max-queued-registrations`: calls that may wait for a permit.
    max_waiting: usize,
    /// `--max-registration-wait`: how long a call may wait for a permit;
    /// then it is refused with a retry time rather than left to run into
    /// its caller's deadline.
    max_wait: Duration,
    /// Calls waiting for a permit now.
    waiting: AtomicUsize,
    /// The service-time estimate and the retry slots handed out. A std
    /// mutex: held for a few arithmetic steps, never across an await.
    pace: Mutex<Pace>,
    /// Refusals so far (for metrics).
    refused: AtomicUsize,
}

/// The rate estimate and the line of retry slots.
struct Pace {
    /// Time between two completions while saturated: the inverse of the
    /// rate registrations complete at.
    spacing: Duration,
    /// Start of the current saturated window, if one is open.
    window_start: Option<Instant>,
    /// Completions in the current window.
    window_done: u32,
    /// The last saturated completion, to see gaps between them.
    last_done: Option<Instant>,
    /// The latest retry time handed out; the next refusal gets a later one.
    last_slot: Option<Instant>,
    /// The latest refusal for the runtimes' lag (`--max-registration-lag`).
    lag_refused_at: Option<Instant>,
    /// The latest call let through although the runtimes lagged.
    lag_passed_at: Option<Instant>,
}

/// A Register call's turn to run; dropping it (the call answered or
/// cancelled) gives the turn to the next in line.
pub struct Admitted {
    permit: Option<OwnedSemaphorePermit>,
    shared: Arc<Shared>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        // The permit first, so the next call starts before the estimate.
        drop(self.permit.take());
        let waiting = self.shared.waiting.load(Ordering::Acquire) > 0;
        let now = Instant::now();
        let mut pace = self.shared.pace.lock().expect("admission pace lock");
        // Saturated: calls wait for a turn, or were lately turned away for
        // the runtimes' lag (on a fast store, the only sign of it).
        let saturated = waiting || pace.lag_refused_lately(now);
        pace.completed(now, saturated);
    }
}

/// Counts a caller in the queue until it leaves it (admitted, or gone
/// because its call was cancelled while waiting).
struct InQueue<'a>(&'a AtomicUsize);

impl Drop for InQueue<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
        metrics::gauge!(crate::metrics::REGISTRATIONS_WAITING).decrement(1.0);
    }
}

impl Admission {
    /// A gate letting `max_in_flight` calls run (at least one) and
    /// `max_waiting` more wait, each at most `max_wait`.
    pub fn new(max_in_flight: usize, max_waiting: usize, max_wait: Duration) -> Self {
        let max_in_flight = max_in_flight.max(1);
        Admission {
            shared: Arc::new(Shared {
                permits: Arc::new(Semaphore::new(max_in_flight)),
                max_in_flight,
                max_waiting,
                max_wait,
                waiting: AtomicUsize::new(0),
                pace: Mutex::new(Pace {
                    spacing: INITIAL_SPACING,
                    window_start: None,
                    window_done: 0,
                    last_done: None,
                    last_slot: None,
                    lag_refused_at: None,
                    lag_passed_at: None,
                }),
                refused: AtomicUsize::new(0),
            }),
            lag: None,
        }
    }

    /// This gate, also refusing calls that arrive while `lag` reads more
    /// than `max` (a zero `max`: not checked).
    pub fn with_lag(mut self, lag: RuntimeLag, max: Duration) -> Self {
        self.lag = (!max.is_zero()).then_some((lag, max));
        self
    }

    /// Waits for the call's turn, or refuses it ([`RegistryError::Busy`]
    /// with the time to come back): at once when the queue is full, or
    /// when no turn came within the longest wait.
    pub async fn admit(&self) -> Result<Admitted, RegistryError> {
        self.refuse_lagging()?;
        self.take_turn().await
    }

    /// [`Admission::admit`] for a call that passed
    /// [`Admission::refuse_early`] already: its turn, without a second look
    /// at the runtimes' lag (that call was let through it).
    pub async fn take_turn(&self) -> Result<Admitted, RegistryError> {
        let shared = &self.shared;
        let permit = match shared.permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                let before = shared.waiting.fetch_add(1, Ordering::AcqRel);
                metrics::gauge!(crate::metrics::REGISTRATIONS_WAITING).increment(1.0);
                let in_queue = InQueue(&shared.waiting);
                if let Some(refused) = self.refusal_on_arrival(before) {
                    drop(in_queue);
                    return Err(refused);
                }
                let turn =
                    tokio::time::timeout(shared.max_wait, shared.permits.clone().acquire_owned())
                        .await;
                drop(in_queue);
                match turn {
                    Ok(permit) => permit.expect("the admission semaphore is never closed"),
                    Err(_) => {
                        let waiting = shared.waiting.load(Ordering::Acquire);
                        return Err(self.refuse(
                            waiting,
                            format!(
                                "no turn within --max-registration-wait ({}) with {waiting} waiting",
                                humantime::format_duration(shared.max_wait)
                            ),
                        ));
                    }
                }
            }
        };
        Ok(Admitted {
            permit: Some(permit),
            shared: shared.clone(),
        })
    }

    /// Refuses a call now if [`Admission::admit`] would refuse it on
    /// arrival, before anything else is done for it (its body read); a
    /// call let through still takes its turn with `admit`, which may queue
    /// or refuse it as things stand then.
    pub fn refuse_early(&self) -> Result<(), RegistryError> {
        self.refuse_lagging()?;
        let shared = &self.shared;
        if shared.permits.available_permits() > 0 {
            return Ok(());
        }
        self.refusal_on_arrival(shared.waiting.load(Ordering::Acquire))
            .map_or(Ok(()), Err)
    }

    /// The refusal of a call that finds no free turn and `before` calls
    /// queued: when the queue is full, or when its turn would come only
    /// after the longest wait at the measured pace. Not when the queue is
    /// empty: someone must wait for the rate to be measured again.
    fn refusal_on_arrival(&self, before: usize) -> Option<RegistryError> {
        let shared = &self.shared;
        if before >= shared.max_waiting {
            return Some(self.refuse(
                before,
                format!("{before} are waiting, the most --max-queued-registrations allows"),
            ));
        }
        let expected = self.expected_wait(before);
        if before > 0 && expected > shared.max_wait {
            return Some(self.refuse(
                before,
                format!(
                    "{before} are waiting, about {} at the pace registrations complete, longer than --max-registration-wait ({})",
                    humantime::format_duration(registry_proto::retry::whole_millis(expected)),
                    humantime::format_duration(shared.max_wait)
                ),
            ));
        }
        None
    }

    /// Refuses a call arriving while the runtimes run further behind
    /// than `--max-registration-lag`, with a retry time no sooner than the
    /// lag read (the work already queued must be done first).
    fn refuse_lagging(&self) -> Result<(), RegistryError> {
        let Some((lag, max)) = &self.lag else {
            return Ok(());
        };
        lag.arrived();
        let behind = lag.here();
        if behind <= *max {
            return Ok(());
        }
        let now = Instant::now();
        let mut pace = self.shared.pace.lock().expect("admission pace lock");
        // One call every LAG_PASS passes however far behind: a registry
        // kept busy by heartbeats alone still takes nodes in.
        if pace
            .lag_passed_at
            .is_none_or(|at| now.saturating_duration_since(at) >= LAG_PASS)
        {
            pace.lag_passed_at = Some(now);
            return Ok(());
        }
        pace.lag_refused_at = Some(now);
        let waiting = self.shared.waiting.load(Ordering::Acquire);
        Err(self.refusal(
            &mut pace,
            now,
            waiting,
            behind,
            format!(
                "the registry is running {} behind, more than --max-registration-lag ({})",
                humantime::format_duration(registry_proto::retry::whole_millis(behind)),
                humantime::format_duration(*max)
            ),
        ))
    }

    /// The refusal of a call that found `waiting` calls in the queue: the
    /// next free retry slot, one spacing after the last one handed out and
    /// no earlier than the queue ahead can drain.
    fn refuse(&self, waiting: usize, why: String) -> RegistryError {
        let mut pace = self.shared.pace.lock().expect("admission pace lock");
        self.refusal(&mut pace, Instant::now(), waiting, Duration::ZERO, why)
    }

    /// A refusal at `now`, counted, with the retry slot `pace` hands out
    /// at least `floor` away.
    fn refusal(
        &self,
        pace: &mut Pace,
        now: Instant,
        waiting: usize,
        floor: Duration,
        why: String,
    ) -> RegistryError {
        self.shared.refused.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(crate::metrics::REGISTRATIONS_REFUSED).increment(1);
        let retry_after = pace.next_slot(now, waiting, floor);
        RegistryError::Busy { why, retry_after }
    }

    /// Calls waiting for their turn now.
    pub fn waiting(&self) -> usize {
        self.shared.waiting.load(Ordering::Acquire)
    }

    /// Calls running now.
    pub fn in_flight(&self) -> usize {
        self.shared.max_in_flight - self.shared.permits.available_permits()
    }

    /// Calls refused so far.
    pub fn refused(&self) -> usize {
        self.shared.refused.load(Ordering::Relaxed)
    }

    /// How long a call queued behind `ahead` others waits for its turn
    /// at the measured pace.
    fn expected_wait(&self, ahead: usize) -> Duration {
        self.spacing()
            .saturating_mul(u32::try_from(ahead.saturating_add(1)).unwrap_or(u32::MAX))
    }

    /// The measured time between two completions while saturated.
    pub fn spacing(&self) -> Duration {
        self.shared
            .pace
            .lock()
            .expect("admission pace lock")
            .spacing
    }
}

impl Pace {
    /// The retry time of a refusal at `now` with `waiting` calls queued:
    /// one spacing after the last slot handed out, no earlier than the
    /// queue ahead drains nor than `floor`, within [`MIN_ADVICE`,
    /// `MAX_ADVICE`].
    fn next_slot(&mut self, now: Instant, waiting: usize, floor: Duration) -> Duration {
        let drained = now
            + self
                .spacing
                .saturating_mul(u32::try_from(waiting).unwrap_or(u32::MAX))
                .max(floor);
        let slot = match self.last_slot {
            Some(last) => (last + self.spacing).max(drained),
            None => drained,
        };
        let slot = slot.min(now + MAX_ADVICE).max(now + MIN_ADVICE);
        self.last_slot = Some(slot);
        slot - now
    }

    /// Whether a call was refused for the runtimes' lag within the last
    /// [`WINDOW`] before `now`: completions then are at the pace the CPU
    /// allows, a rate to measure as when calls wait for a turn.
    fn lag_refused_lately(&self, now: Instant) -> bool {
        self.lag_refused_at
            .is_some_and(|at| now.saturating_duration_since(at) < WINDOW)
    }

    /// A call completed at `now`; `saturated` when others were waiting.
    /// A window that closes with completions in it updates the estimate:
    /// a faster rate is taken at once, a slower one approached by a
    /// [`SLOWER_STEP`]th of the difference per window. Optimistic on
    /// purpose: while a storm arrives the registry spends its time taking
    /// in and refusing the storm itself and completes fewer calls than it
    /// can once the storm is spread, and too late a retry time leaves it
    /// idle while agents wait, where too early a one only costs another
    /// refusal. An unsaturated moment discards the open window (the rate
    /// then is the callers', not the registry's), and so does a gap of
    /// [`STALL`] between two completions: the registry was stalled then,
    /// and one late completion would otherwise read as a rate many times
    /// slower.
    fn completed(&mut self, now: Instant, saturated: bool) {
        if !saturated {
            self.window_start = None;
            self.last_done = None;
            return;
        }
        let previous = self.last_done.replace(now);
        let gap = previous.is_none_or(|at| now - at >= STALL);
        let Some(start) = self.window_start.filter(|_| !gap) else {
            self.window_start = Some(now);
            self.window_done = 0;
            return;
        };
        self.window_done += 1;
        let elapsed = now - start;
        if elapsed >= WINDOW {
            let measured = elapsed / self.window_done;
            let spacing = if measured < self.spacing {
                measured
            } else {
                // Averaged as a rate, not as a time per call: a window
                // of a few completions over a slow commit reads as a time
                // per call many times the usual, and one such window would
                // move an average of times far; as a rate it can take at
                // most a SLOWER_STEPth of the rate away.
                let rate = 1.0 / self.spacing.as_secs_f64();
                let measured_rate = 1.0 / measured.as_secs_f64();
                let rate = rate - (rate - measured_rate) / f64::from(SLOWER_STEP);
                Duration::from_secs_f64(1.0 / rate)
            };
            self.rescale_line(now, spacing);
            self.spacing = spacing;
            self.window_start = Some(now);
            self.window_done = 0;
        }
    }

    /// The line of slots still ahead, laid out one old spacing apart, laid
    /// out again at `spacing`: the callers refused so far come back at the
    /// times they were given, and the next refusal is placed where the
    /// line ends at the new pace.
    fn rescale_line(&mut self, now: Instant, spacing: Duration) {
        if let Some(last) = self.last_slot.filter(|&last| last > now) {
            let ahead = (last - now).as_secs_f64() / self.spacing.as_secs_f64().max(1e-9);
            self.last_slot = Some(now + spacing.mul_f64(ahead).min(MAX_ADVICE));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    /// A longest wait no test reaches.
    const LONG: Duration = Duration::from_secs(3600);

    fn poll_once<F: Future>(f: std::pin::Pin<&mut F>) -> Poll<F::Output> {
        f.poll(&mut Context::from_waker(Waker::noop()))
    }

    fn busy(result: Result<Admitted, RegistryError>) -> (String, Duration) {
        match result {
            Err(RegistryError::Busy { why, retry_after }) => (why, retry_after),
            Err(e) => panic!("expected Busy, got {e}"),
            Ok(_) => panic!("expected Busy, was admitted"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn calls_past_the_permits_wait_and_past_the_queue_are_refused() {
        let gate = Admission::new(2, 2, LONG);
        let a = gate.admit().await.expect("first runs");
        let _b = gate.admit().await.expect("second runs");
        assert_eq!(gate.in_flight(), 2);
        let mut c = pin!(gate.admit());
        let mut d = pin!(gate.admit());
        assert!(poll_once(c.as_mut()).is_pending());
        assert!(poll_once(d.as_mut()).is_pending());
        assert_eq!(gate.waiting(), 2);
        let (why, _) = busy(gate.admit().await);
        assert_eq!(
            why,
            "2 are waiting, the most --max-queued-registrations allows"
        );
        assert_eq!(gate.refused(), 1);
        // A permit given back lets the first in line run, in order.
        drop(a);
        let Poll::Ready(Ok(_c)) = poll_once(c.as_mut()) else {
            panic!("the first waiter runs once a permit is free");
        };
        assert!(poll_once(d.as_mut()).is_pending());
        assert_eq!(gate.waiting(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_that_gets_no_turn_within_the_longest_wait_is_refused_then() {
        let gate = Admission::new(1, 10, Duration::from_secs(3));
        let turn = gate.admit().await.expect("runs");
        let waiter = tokio::spawn({
            let gate = gate.clone();
            async move {
                let asked = Instant::now();
                let result = gate.admit().await;
                (asked.elapsed(), result)
            }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(gate.waiting(), 1);
        let (waited, result) = waiter.await.unwrap();
        assert_eq!(waited, Duration::from_secs(3));
        let (why, advice) = busy(result);
        assert_eq!(
            why,
            "no turn within --max-registration-wait (3s) with 0 waiting"
        );
        assert!(advice >= MIN_ADVICE, "{advice:?}");
        assert_eq!(gate.waiting(), 0, "it left the queue");
        assert_eq!(gate.refused(), 1);
        drop(turn);
        gate.admit().await.expect("the next call runs at once");
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_waiter_gives_its_place_back() {
        let gate = Admission::new(1, 1, LONG);
        let _a = gate.admit().await.expect("runs");
        {
            let mut b = pin!(gate.admit());
            assert!(poll_once(b.as_mut()).is_pending());
            assert_eq!(gate.waiting(), 1);
        }
        assert_eq!(gate.waiting(), 0);
        let mut c = pin!(gate.admit());
        assert!(poll_once(c.as_mut()).is_pending(), "queued, not refused");
    }

    /// Runs `calls` Register-like tasks that each hold their turn for
    /// `hold`, all arriving at once.
    fn saturate(gate: &Admission, calls: usize, hold: Duration) {
        for _ in 0..calls {
            let gate = gate.clone();
            tokio::spawn(async move {
                if let Ok(turn) = gate.admit().await {
                    tokio::time::sleep(hold).await;
                    drop(turn);
                }
            });
        }
    }

    async fn sleep_ms(total: u64) {
        // Small steps, so every task runs at its own time.
        for _ in 0..total {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_is_measured_only_while_calls_wait() {
        let gate = Admission::new(100, 100_000, LONG);
        assert_eq!(gate.spacing(), INITIAL_SPACING);
        // 100 at a time, 2 ms each: one completion every 20 µs, faster
        // than the initial estimate, so believed after one window.
        saturate(&gate, 20_000, Duration::from_millis(2));
        sleep_ms(300).await;
        let fast = gate.spacing();
        assert!(
            fast > Duration::from_micros(19) && fast < Duration::from_micros(21),
            "{fast:?}"
        );
        sleep_ms(200).await;
        assert_eq!(gate.waiting() + gate.in_flight(), 0);
        // Unsaturated calls (nobody waiting), however slow, leave it alone.
        for _ in 0..20 {
            let turn = gate.admit().await.expect("runs");
            tokio::time::sleep(Duration::from_millis(100)).await;
            drop(turn);
        }
        assert_eq!(gate.spacing(), fast);
    }

    #[test]
    fn a_faster_rate_is_believed_at_once_and_a_slower_one_slowly() {
        let start = Instant::now();
        let mut p = pace(INITIAL_SPACING);
        let ms = |n: u64| start + Duration::from_millis(n);
        // Saturated completions every 1 ms (slower than the initial 200
        // µs): after 2 s (a storm arriving) the estimate has moved less
        // than a tenth of the way; after 60 s the rate most of it (from
        // 5,000/s to under 1,500/s, against 1,000/s measured).
        for n in 0..=2_000 {
            p.completed(ms(n), true);
        }
        let early = p.spacing;
        assert!(
            early > INITIAL_SPACING && early < Duration::from_micros(280),
            "{early:?}"
        );
        for n in 2_001..=60_000 {
            p.completed(ms(n), true);
        }
        let late = p.spacing;
        let late_rate = 1.0 / late.as_secs_f64();
        assert!(late_rate < 1_500.0, "{late:?}");
        // Every 10 µs now: believed after one window.
        let from = ms(60_000);
        for n in 0..=20_000 {
            p.completed(from + Duration::from_micros(10 * n), true);
        }
        let fast = p.spacing;
        assert!(
            fast > Duration::from_nanos(9_900) && fast <= Duration::from_micros(10),
            "{fast:?}"
        );
    }

    #[test]
    fn a_stall_between_completions_is_not_read_as_a_slow_rate() {
        let start = Instant::now();
        let mut p = pace(Duration::from_micros(500));
        let us = |n: u64| start + Duration::from_micros(n);
        // Completions every 500 µs for 50 ms, then none for 5 s (every
        // call waiting on something else), then one.
        for n in 0..100 {
            p.completed(us(500 * n), true);
        }
        p.completed(us(5_050_000), true);
        // Without the stall check that one window of 5.05 s over 100
        // completions would move it (a 256th of the rate away, ~2 µs).
        assert_eq!(p.spacing, Duration::from_micros(500));
        // Measuring starts again from that completion.
        for n in 1..=400 {
            p.completed(us(5_050_000 + 400 * n), true);
        }
        assert_eq!(p.spacing, Duration::from_micros(400));
    }

    #[test]
    fn a_few_slow_windows_take_little_of_the_rate() {
        // One completion every 330 ms, saturated, for 15 windows (no
        // stall): each window reads as 3 calls a second. Averaged as a
        // rate each takes a 256th of the rate away (5,000/s -> ~4,700/s);
        // averaged as a time per call each added 1.3 ms (-> ~19 ms).
        let start = Instant::now();
        let mut p = pace(INITIAL_SPACING);
        for n in 0..=15u64 {
            p.completed(start + Duration::from_millis(330 * n), true);
        }
        assert!(p.spacing < Duration::from_micros(250), "{:?}", p.spacing);
    }

    #[test]
    fn a_store_committing_every_150_ms_is_still_measured_as_slower() {
        let start = Instant::now();
        let mut p = pace(INITIAL_SPACING);
        // 10 calls per commit, a commit every 150 ms (15 ms a call) for a
        // minute: gaps longer than a window but no stall. The rate falls
        // from 5,000/s towards 67/s by a 256th of the difference a window:
        // to ~1,100/s after the minute, and on.
        let mut at_commit = Vec::new();
        for commit in 0..800u64 {
            let at = start + Duration::from_millis(150 * commit);
            for _ in 0..10 {
                p.completed(at, true);
            }
            at_commit.push(p.spacing);
        }
        let (minute, two) = (at_commit[399], at_commit[799]);
        assert!(minute > Duration::from_micros(800), "{minute:?}");
        assert!(two > Duration::from_millis(3), "{two:?}");
    }

    #[test]
    fn the_line_of_slots_is_laid_out_again_when_the_rate_changes() {
        let start = Instant::now();
        let mut p = pace(Duration::from_millis(2));
        // 1,000 refused: a line from the 100 ms floor, 2 ms apart.
        for _ in 0..1_000 {
            p.next_slot(start, 0, Duration::ZERO);
        }
        assert_eq!(
            p.next_slot(start, 0, Duration::ZERO),
            Duration::from_millis(2_100)
        );
        // Then the registry is seen completing one every 200 µs: the rest
        // of the line, ~995 slots, takes about 200 ms at that pace, and
        // the next refusal is placed after it rather than after 2 s.
        let from = start + Duration::from_millis(10);
        for n in 0..=600 {
            p.completed(from + Duration::from_micros(200 * n), true);
        }
        let now = from + Duration::from_micros(200 * 600);
        let next = p.next_slot(now, 0, Duration::ZERO);
        assert!(
            next > Duration::from_millis(150) && next < Duration::from_millis(250),
            "{next:?}"
        );
    }

    /// A gate of one turn whose pace was measured at `spacing` a call,
    /// and its turn taken.
    async fn one_running_at(max_wait: Duration, spacing: Duration) -> (Admission, Admitted) {
        let gate = Admission::new(1, 100, max_wait);
        gate.shared.pace.lock().unwrap().spacing = spacing;
        let running = gate.admit().await.expect("runs");
        (gate, running)
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_in_line_waits_however_slow_the_pace() {
        // At a measured 10 s a call, even the first waiter would wait past
        // the longest wait; it queues all the same, so completions are
        // seen saturated and the pace can be measured again.
        let (gate, _running) =
            one_running_at(Duration::from_secs(3), Duration::from_secs(10)).await;
        let mut first = pin!(gate.admit());
        assert!(poll_once(first.as_mut()).is_pending(), "queued");
        assert_eq!(gate.waiting(), 1);
        busy(gate.admit().await);
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_that_would_wait_past_the_longest_wait_is_refused_at_once() {
        // One running and a measured pace of 1 s a call: with 2 queued,
        // a fourth would wait about 3 s, more than the longest wait of
        // 2.5 s, and is refused when it asks, not after 2.5 s.
        let (gate, _running) =
            one_running_at(Duration::from_millis(2_500), Duration::from_secs(1)).await;
        let mut b = pin!(gate.admit());
        let mut c = pin!(gate.admit());
        assert!(poll_once(b.as_mut()).is_pending());
        assert!(poll_once(c.as_mut()).is_pending());
        let asked = Instant::now();
        let (why, advice) = busy(gate.admit().await);
        assert_eq!(asked.elapsed(), Duration::ZERO);
        assert_eq!(
            why,
            "2 are waiting, about 3s at the pace registrations complete, longer than --max-registration-wait (2s 500ms)"
        );
        assert_eq!(advice, Duration::from_secs(2), "after the two ahead");
        assert_eq!(gate.waiting(), 2, "the refused call left no place taken");
    }

    #[tokio::test(start_paused = true)]
    async fn an_early_refusal_is_what_admit_would_refuse_on_arrival() {
        // A free turn: never refused early.
        let gate = Admission::new(1, 100, Duration::from_millis(2_500));
        assert!(gate.refuse_early().is_ok());
        // One running at 1 s a call: the first and second in line would
        // wait 1 and 2 s and pass; a third, with two queued, about 3 s,
        // past the longest wait of 2.5 s, and is refused as admit refuses
        // it, without taking a place in the queue.
        let (gate, _running) =
            one_running_at(Duration::from_millis(2_500), Duration::from_secs(1)).await;
        assert!(gate.refuse_early().is_ok(), "the first in line");
        let mut b = pin!(gate.admit());
        assert!(poll_once(b.as_mut()).is_pending());
        assert!(gate.refuse_early().is_ok(), "the second in line");
        let mut c = pin!(gate.admit());
        assert!(poll_once(c.as_mut()).is_pending());
        let (early, early_advice) = match gate.refuse_early() {
            Err(RegistryError::Busy { why, retry_after }) => (why, retry_after),
            other => panic!("expected Busy, got {other:?}"),
        };
        let (why, advice) = busy(gate.admit().await);
        assert_eq!(early, why);
        // The early refusal took a retry slot as admit's does: the next
        // refusal gets the slot one spacing later.
        assert_eq!(advice, early_advice + Duration::from_secs(1));
        assert_eq!(gate.waiting(), 2);
        assert_eq!(gate.refused(), 2);
    }

    fn pace(spacing: Duration) -> Pace {
        Pace {
            spacing,
            window_start: None,
            window_done: 0,
            last_done: None,
            last_slot: None,
            lag_refused_at: None,
            lag_passed_at: None,
        }
    }

    #[test]
    fn refusals_get_slots_one_spacing_apart_after_the_queue_drains() {
        let now = Instant::now();
        let mut p = pace(Duration::from_millis(10));
        // 40 waiting drain in 400 ms: the first slot is then, the next
        // ones 10 ms apart.
        let advice: Vec<Duration> = (0..5)
            .map(|_| p.next_slot(now, 40, Duration::ZERO))
            .collect();
        let ms: Vec<u128> = advice.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [400, 410, 420, 430, 440]);
        // Later, with the old slots past, the line starts again from the
        // queue's drain time (or the floor).
        let later = now + Duration::from_secs(5);
        assert_eq!(p.next_slot(later, 40, Duration::ZERO).as_millis(), 400);
        assert_eq!(
            p.next_slot(later + Duration::from_secs(5), 0, Duration::ZERO),
            MIN_ADVICE
        );
    }

    #[test]
    fn advice_is_at_least_the_floor_and_at_most_a_minute() {
        let now = Instant::now();
        let mut p = pace(Duration::from_micros(1));
        assert_eq!(p.next_slot(now, 5, Duration::ZERO), MIN_ADVICE);
        let mut p = pace(Duration::from_secs(7));
        let advice: Vec<Duration> = (0..20)
            .map(|_| p.next_slot(now, 0, Duration::ZERO))
            .collect();
        assert!(advice.iter().all(|a| *a <= MAX_ADVICE), "{advice:?}");
        assert_eq!(advice[19], MAX_ADVICE);
        assert_eq!(
            pace(Duration::from_secs(1)).next_slot(now, usize::MAX, Duration::ZERO),
            MAX_ADVICE
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_arriving_while_the_runtimes_lag_is_refused_with_a_retry_after_the_lag() {
        let lag = RuntimeLag::new(2);
        let gate = Admission::new(4, 4, LONG).with_lag(lag.clone(), Duration::from_millis(10));
        // On time, or within the bound: calls run.
        lag.record(0, Duration::from_millis(10));
        assert!(gate.refuse_early().is_ok());
        let running = gate.admit().await.expect("within the bound");
        // One runtime 250 ms behind: the first call in LAG_PASS still
        // passes; the next are refused on arrival, before and at the turn,
        // with free turns and nobody waiting.
        lag.record(0, Duration::from_millis(250));
        assert!(gate.refuse_early().is_ok(), "one in LAG_PASS passes");
        let early = match gate.refuse_early() {
            Err(RegistryError::Busy { why, retry_after }) => (why, retry_after),
            other => panic!("expected Busy, got {other:?}"),
        };
        let (why, retry_after) = busy(gate.admit().await);
        assert_eq!(
            why,
            "the registry is running 250ms behind, more than --max-registration-lag (10ms)"
        );
        assert_eq!(early.0, why);
        assert!(early.1 >= Duration::from_millis(250), "{:?}", early.1);
        assert!(retry_after > early.1, "the next slot comes after the first");
        assert_eq!(gate.refused(), 2);
        assert_eq!(gate.in_flight(), 1, "the call already running is untouched");
        // However long the lag lasts, one call in LAG_PASS gets through:
        // as the route takes it, an early look and then its turn alone.
        tokio::time::advance(LAG_PASS).await;
        assert!(gate.refuse_early().is_ok(), "one in LAG_PASS passes");
        let passed = gate.take_turn().await.expect("its turn, no second look");
        assert!(gate.refuse_early().is_err());
        drop(passed);
        drop(running);
        // Caught up: calls run again.
        lag.record(0, Duration::ZERO);
        assert!(gate.admit().await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_zero_bound_never_checks_the_lag() {
        let lag = RuntimeLag::new(1);
        lag.record(0, Duration::from_secs(5));
        let gate = Admission::new(1, 1, LONG).with_lag(lag, Duration::ZERO);
        assert!(gate.refuse_early().is_ok());
        assert!(gate.admit().await.is_ok());
    }
}
