//! What a fleet counts: registrations, heartbeats sent and acknowledged,
//! errors by gRPC status code, and latency histograms (microseconds).
//!
//! Counters are atomics; histograms sit behind one mutex each, which at
//! 100k records a second on two cores costs far less than the gRPC work
//! around it. Each latency is recorded twice: in the run's total and in a
//! window that `bench` takes and resets to measure a steady-state phase
//! only (the `fleet-sim` command takes it for each progress line).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use registry_proto::status::code_name;
use tonic::Code;

/// Largest latency the histograms hold: one minute, in microseconds.
const MAX_MICROS: u64 = 60_000_000;

/// Where in a node's life an error happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// A Register call.
    Register,
    /// Opening or using a Heartbeat stream.
    Heartbeat,
}

/// Live counters of one fleet.
pub struct Stats {
    /// When the fleet started; rates and timestamps count from here.
    started: Instant,
    /// Successful Register calls (first ones and re-registrations).
    registrations: AtomicU64,
    /// Microseconds after `started` of the latest successful Register,
    /// for the registration rate of the ramp.
    last_registration_us: AtomicU64,
    /// Heartbeat messages handed to a stream.
    sent: AtomicU64,
    /// Acks received.
    acked: AtomicU64,
    /// Nodes whose current stream has had at least one ack: "attached".
    attached: AtomicI64,
    /// Register calls the registry deferred: RESOURCE_EXHAUSTED with a
    /// retry time (too many registrations at once), retried at that time.
    /// Not errors: the registry's admission control doing its job.
    deferred: AtomicU64,
    /// Failed Register calls by status code.
    register_errors: CodeCounts,
    /// Failed heartbeat streams by status code.
    heartbeat_errors: CodeCounts,
    /// Acks that did not come within the ack timeout.
    ack_timeouts: AtomicU64,
    /// Streams the registry ended without an error status.
    streams_closed: AtomicU64,
    /// Ack latency (send to ack), total and window.
    ack_latency: Mutex<Pair>,
    /// Register call latency, total and window.
    register_latency: Mutex<Pair>,
    /// How late a node's timer fired for a scheduled heartbeat: the
    /// simulator's own scheduling delay, a floor under ack latency.
    wake_lag: Mutex<Pair>,
}

/// A histogram for the whole run and one for the current window.
struct Pair {
    total: Histogram<u64>,
    window: Histogram<u64>,
}

impl Pair {
    fn new() -> Self {
        Self {
            total: new_histogram(),
            window: new_histogram(),
        }
    }

    fn record(&mut self, latency: Duration) {
        let micros = (latency.as_micros() as u64).clamp(1, MAX_MICROS);
        self.total.saturating_record(micros);
        self.window.saturating_record(micros);
    }
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_MICROS, 3).expect("valid histogram bounds")
}

/// One counter per gRPC status code.
struct CodeCounts([AtomicU64; 17]);

impl CodeCounts {
    fn new() -> Self {
        Self(std::array::from_fn(|_| AtomicU64::new(0)))
    }

    fn add(&self, code: Code) {
        let i = (code as usize).min(16);
        self.0[i].fetch_add(1, Ordering::Relaxed);
    }

    fn non_zero(&self) -> impl Iterator<Item = (Code, u64)> + '_ {
        self.0.iter().enumerate().filter_map(|(i, n)| {
            let n = n.load(Ordering::Relaxed);
            (n > 0).then(|| (Code::from_i32(i as i32), n))
        })
    }
}

fn lock(pair: &Mutex<Pair>) -> MutexGuard<'_, Pair> {
    pair.lock().unwrap_or_else(|p| p.into_inner())
}

impl Default for Stats {
    fn default() -> Self {
        Self::new()
    }
}

impl Stats {
    /// Empty counters; the clock starts now.
    pub fn new() -> Self {
        Self {
            started: Instant::now(),
            registrations: AtomicU64::new(0),
            last_registration_us: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            attached: AtomicI64::new(0),
            deferred: AtomicU64::new(0),
            register_errors: CodeCounts::new(),
            heartbeat_errors: CodeCounts::new(),
            ack_timeouts: AtomicU64::new(0),
            streams_closed: AtomicU64::new(0),
            ack_latency: Mutex::new(Pair::new()),
            register_latency: Mutex::new(Pair::new()),
            wake_lag: Mutex::new(Pair::new()),
        }
    }

    /// A Register call succeeded after `latency`.
    pub fn registered(&self, latency: Duration) {
        self.registrations.fetch_add(1, Ordering::Relaxed);
        let at = self.started.elapsed().as_micros() as u64;
        self.last_registration_us.fetch_max(at, Ordering::Relaxed);
        lock(&self.register_latency).record(latency);
    }

    /// A node's heartbeat timer fired `lag` after it was due.
    pub fn woke_late(&self, lag: Duration) {
        lock(&self.wake_lag).record(lag);
    }

    /// A heartbeat message was handed to its stream.
    pub fn sent(&self) {
        self.sent.fetch_add(1, Ordering::Relaxed);
    }

    /// An ack came `latency` after its heartbeat was sent.
    pub fn acked(&self, latency: Duration) {
        self.acked.fetch_add(1, Ordering::Relaxed);
        lock(&self.ack_latency).record(latency);
    }

    /// A node's stream got its first ack, or lost it (`delta` -1).
    pub fn attach(&self, delta: i64) {
        self.attached.fetch_add(delta, Ordering::Relaxed);
    }

    /// A Register call was deferred with a retry time.
    pub fn deferred(&self) {
        self.deferred.fetch_add(1, Ordering::Relaxed);
    }

    /// An error status in `phase`.
    pub fn error(&self, phase: Phase, code: Code) {
        match phase {
            Phase::Register => self.register_errors.add(code),
            Phase::Heartbeat => self.heartbeat_errors.add(code),
        }
    }

    /// An ack did not come in time.
    pub fn ack_timeout(&self) {
        self.ack_timeouts.fetch_add(1, Ordering::Relaxed);
    }

    /// The registry ended a stream without an error.
    pub fn stream_closed(&self) {
        self.streams_closed.fetch_add(1, Ordering::Relaxed);
    }

    /// Nodes whose current stream has been acknowledged at least once.
    pub fn attached(&self) -> i64 {
        self.attached.load(Ordering::Relaxed)
    }

    /// Every counter now, and the ack latency and timer lateness of the
    /// window since the previous `take_window` (which starts a new window).
    pub fn take_window(&self) -> (Snapshot, WindowLatency) {
        let snapshot = self.snapshot();
        let take = |pair: &Mutex<Pair>| {
            let mut pair = lock(pair);
            let summary = LatencySummary::of(&pair.window);
            pair.window.reset();
            summary
        };
        let latency = WindowLatency {
            ack: take(&self.ack_latency),
            wake_lag: take(&self.wake_lag),
        };
        lock(&self.register_latency).window.reset();
        (snapshot, latency)
    }

    /// Every counter now.
    pub fn snapshot(&self) -> Snapshot {
        let mut errors = BTreeMap::new();
        for (code, n) in self.register_errors.non_zero() {
            errors.insert(format!("register {}", code_name(code)), n);
        }
        for (code, n) in self.heartbeat_errors.non_zero() {
            errors.insert(format!("heartbeat {}", code_name(code)), n);
        }
        let timeouts = self.ack_timeouts.load(Ordering::Relaxed);
        if timeouts > 0 {
            errors.insert("heartbeat ack timeout".into(), timeouts);
        }
        let closed = self.streams_closed.load(Ordering::Relaxed);
        if closed > 0 {
            errors.insert("heartbeat stream closed".into(), closed);
        }
        Snapshot {
            at: Instant::now(),
            registrations: self.registrations.load(Ordering::Relaxed),
            deferred: self.deferred.load(Ordering::Relaxed),
            sent: self.sent.load(Ordering::Relaxed),
            acked: self.acked.load(Ordering::Relaxed),
            attached: self.attached(),
            errors,
        }
    }

    /// The whole run's report, `nodes` and `connections` as configured.
    pub fn report(&self, nodes: usize, connections: usize) -> Report {
        let snapshot = self.snapshot();
        let elapsed = snapshot.at.duration_since(self.started);
        let last_reg = Duration::from_micros(self.last_registration_us.load(Ordering::Relaxed))
            .max(Duration::from_millis(1));
        Report {
            nodes,
            connections,
            elapsed,
            registrations: snapshot.registrations,
            registrations_per_sec: snapshot.registrations as f64 / last_reg.as_secs_f64(),
            deferred: snapshot.deferred,
            sent: snapshot.sent,
            acked: snapshot.acked,
            ack_latency: LatencySummary::of(&lock(&self.ack_latency).total),
            wake_lag: LatencySummary::of(&lock(&self.wake_lag).total),
            register_latency: LatencySummary::of(&lock(&self.register_latency).total),
            errors: snapshot.errors,
        }
    }
}

/// Latencies of one window.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct WindowLatency {
    /// Send-to-ack latency of heartbeats.
    pub ack: LatencySummary,
    /// How late heartbeat timers fired (the simulator's scheduling delay).
    pub wake_lag: LatencySummary,
}

/// Counters at one instant; the difference of two is a window's work.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// When it was taken.
    pub at: Instant,
    /// Successful Register calls so far.
    pub registrations: u64,
    /// Register calls deferred with a retry time so far.
    pub deferred: u64,
    /// Heartbeats sent so far.
    pub sent: u64,
    /// Acks received so far.
    pub acked: u64,
    /// Nodes attached now.
    pub attached: i64,
    /// Errors so far, by "phase CODE".
    pub errors: BTreeMap<String, u64>,
}

impl Snapshot {
    /// Errors that happened between `earlier` and this snapshot.
    pub fn errors_since(&self, earlier: &Snapshot) -> BTreeMap<String, u64> {
        self.errors
            .iter()
            .filter_map(|(k, &n)| {
                let before = earlier.errors.get(k).copied().unwrap_or(0);
                (n > before).then(|| (k.clone(), n - before))
            })
            .collect()
    }

    /// Acks per second between `earlier` and this snapshot.
    pub fn ack_rate_since(&self, earlier: &Snapshot) -> f64 {
        let secs = self.at.duration_since(earlier.at).as_secs_f64();
        if secs <= 0.0 {
            return 0.0;
        }
        (self.acked - earlier.acked) as f64 / secs
    }
}

/// Percentiles of a latency histogram.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LatencySummary {
    /// Values recorded.
    pub count: u64,
    /// Median.
    pub p50: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// Largest value.
    pub max: Duration,
}

impl LatencySummary {
    /// The percentiles of `h` (zeros when it is empty).
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        Self {
            count: h.len(),
            p50: Duration::from_micros(h.value_at_quantile(0.50)),
            p99: Duration::from_micros(h.value_at_quantile(0.99)),
            max: Duration::from_micros(h.max()),
        }
    }
}

impl fmt::Display for LatencySummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "p50 {} / p99 {} / max {}",
            fmt_ms(self.p50),
            fmt_ms(self.p99),
            fmt_ms(self.max)
        )
    }
}

/// A duration in milliseconds with a precision that suits its size.
pub fn fmt_ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms < 10.0 {
        format!("{ms:.2} ms")
    } else if ms < 1000.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{ms:.0} ms")
    }
}

/// What a fleet run reports.
#[derive(Debug, Clone)]
pub struct Report {
    /// Virtual nodes.
    pub nodes: usize,
    /// HTTP/2 connections they shared.
    pub connections: usize,
    /// Time from start to the report.
    pub elapsed: Duration,
    /// Successful Register calls.
    pub registrations: u64,
    /// Registrations per second from start to the latest one (the ramp's
    /// achieved rate).
    pub registrations_per_sec: f64,
    /// Register calls deferred with a retry time (then retried).
    pub deferred: u64,
    /// Heartbeats sent.
    pub sent: u64,
    /// Acks received.
    pub acked: u64,
    /// Send-to-ack latency of every heartbeat.
    pub ack_latency: LatencySummary,
    /// Latency of every successful Register call.
    pub register_latency: LatencySummary,
    /// How late heartbeat timers fired: the simulator's own scheduling
    /// delay. When it approaches the ack latency, the simulator (not the
    /// registry) bounds the ack latency figure.
    pub wake_lag: LatencySummary,
    /// Errors by "phase CODE".
    pub errors: BTreeMap<String, u64>,
}

impl Report {
    /// Errors of every kind added up.
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Failed Register calls (deferrals with a retry time are not failures).
    pub fn register_failures(&self) -> u64 {
        self.errors
            .iter()
            .filter(|(kind, _)| kind.starts_with("register "))
            .map(|(_, n)| n)
            .sum()
    }
}

/// "none" or "register UNAVAILABLE 3, heartbeat NOT_FOUND 2".
pub fn fmt_errors(errors: &BTreeMap<String, u64>) -> String {
    if errors.is_empty() {
        return "none".into();
    }
    errors
        .iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        writeln!(f, "fleet-sim report")?;
        writeln!(
            f,
            "  nodes              {} on {} connection(s)",
            self.nodes, self.connections
        )?;
        writeln!(f, "  ran for            {secs:.1} s")?;
        writeln!(
            f,
            "  registrations      {} ok, {:.0}/s, latency {}",
            self.registrations, self.registrations_per_sec, self.register_latency
        )?;
        if self.deferred > 0 {
            writeln!(
                f,
                "  deferred           {} Register calls told to retry later (RESOURCE_EXHAUSTED with a retry time)",
                self.deferred
            )?;
        }
        writeln!(
            f,
            "  heartbeats         {} sent, {} acked ({:.0}/s)",
            self.sent,
            self.acked,
            self.acked as f64 / secs
        )?;
        writeln!(f, "  ack latency        {}", self.ack_latency)?;
        writeln!(
            f,
            "  timer lateness     {} (simulator scheduling)",
            self.wake_lag
        )?;
        write!(f, "  errors             {}", fmt_errors(&self.errors))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_reset_but_totals_keep_everything() {
        let stats = Stats::new();
        for ms in [1, 2, 3, 100] {
            stats.sent();
            stats.acked(Duration::from_millis(ms));
        }
        stats.woke_late(Duration::from_micros(30));
        let (first, window) = stats.take_window();
        assert_eq!(window.ack.count, 4);
        assert!(window.ack.max >= Duration::from_millis(99));
        assert_eq!(window.wake_lag.count, 1);
        stats.sent();
        stats.acked(Duration::from_millis(5));
        let (second, window) = stats.take_window();
        assert_eq!(window.ack.count, 1);
        assert_eq!(window.wake_lag.count, 0);
        assert_eq!(second.acked - first.acked, 1);
        let report = stats.report(1, 1);
        assert_eq!(report.ack_latency.count, 5);
        assert_eq!((report.sent, report.acked), (5, 5));
    }

    #[test]
    fn errors_are_counted_by_phase_and_code() {
        let stats = Stats::new();
        let before = stats.snapshot();
        stats.error(Phase::Register, Code::Unavailable);
        stats.error(Phase::Heartbeat, Code::NotFound);
        stats.error(Phase::Heartbeat, Code::NotFound);
        stats.ack_timeout();
        let after = stats.snapshot();
        let since = after.errors_since(&before);
        assert_eq!(since["register UNAVAILABLE"], 1);
        assert_eq!(since["heartbeat NOT_FOUND"], 2);
        assert_eq!(since["heartbeat ack timeout"], 1);
        stats.deferred();
        let report = stats.report(1, 1);
        assert_eq!(report.error_count(), 4);
        assert_eq!(report.register_failures(), 1, "a deferral is no failure");
        assert_eq!(report.deferred, 1);
        assert_eq!(
            fmt_errors(&since),
            "heartbeat NOT_FOUND 2, heartbeat ack timeout 1, register UNAVAILABLE 1"
        );
    }

    #[test]
    fn milliseconds_are_printed_with_a_sensible_precision() {
        assert_eq!(fmt_ms(Duration::from_micros(1234)), "1.23 ms");
        assert_eq!(fmt_ms(Duration::from_micros(45_600)), "45.6 ms");
        assert_eq!(fmt_ms(Duration::from_secs(2)), "2000 ms");
    }
}
