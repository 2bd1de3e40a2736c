//! A budget of log lines per second for each kind of per-node event, so a
//! registration storm or a rack going dark logs a bounded number of lines
//! instead of one per node (at 20,000 registrations a second, formatting
//! and writing the lines would cost more than the registrations).
//!
//! Within its budget an event logs its line as before; beyond it the line
//! goes to debug level, and the first event of the next second logs how
//! many were left out. The registry reads no clock: callers pass `now`.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Lines of one kind logged at their own level per second.
pub const LINES_PER_SECOND: u32 = 50;

/// Whether an event's line is logged at its level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Admit {
    /// Within the budget: log the line. `skipped` lines of the previous
    /// second were left out (0: none); say so first.
    Line {
        /// Lines left out in the previous window.
        skipped: u64,
    },
    /// Over the budget: log it at debug level only.
    Debug,
}

/// One kind's budget.
#[derive(Debug, Default)]
pub(super) struct LineBudget {
    /// The current one-second window.
    window: Mutex<Window>,
}

#[derive(Debug, Default)]
struct Window {
    /// When the window started; `None` before the first event.
    started: Option<Instant>,
    /// Lines logged in it.
    logged: u32,
    /// Lines left out in it.
    skipped: u64,
}

impl LineBudget {
    /// Counts one event now.
    pub(super) fn admit_now(&self) -> Admit {
        self.admit(Instant::now())
    }

    /// Counts one event at `now`.
    fn admit(&self, now: Instant) -> Admit {
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        let mut carried = 0;
        if w.started
            .is_none_or(|s| now.saturating_duration_since(s) >= Duration::from_secs(1))
        {
            carried = w.skipped;
            *w = Window {
                started: Some(now),
                logged: 0,
                skipped: 0,
            };
        }
        if w.logged < LINES_PER_SECOND {
            w.logged += 1;
            Admit::Line { skipped: carried }
        } else {
            w.skipped += 1;
            Admit::Debug
        }
    }
}

/// The budgets of the registry's per-node lines.
#[derive(Debug, Default)]
pub(super) struct Lines {
    /// "node registered" and "node re-registered".
    pub(super) registered: LineBudget,
    /// "node deregistered".
    pub(super) deregistered: LineBudget,
    /// "node online again".
    pub(super) online: LineBudget,
    /// "node offline".
    pub(super) offline: LineBudget,
    /// "offline node removed after retention".
    pub(super) removed: LineBudget,
}

/// Logs one per-node event under `budget`: at `level` within it (after a
/// note of what the previous second left out), at debug beyond it.
macro_rules! budgeted {
    ($budget:expr, $level:ident, $what:literal, $($field:tt)*) => {
        match $budget.admit_now() {
            $crate::registry::lines::Admit::Line { skipped } => {
                if skipped > 0 {
                    tracing::$level!(
                        skipped,
                        per_second = $crate::registry::lines::LINES_PER_SECOND,
                        concat!("more '", $what, "' lines in the last second were logged at debug level only")
                    );
                }
                tracing::$level!($($field)*, $what);
            }
            $crate::registry::lines::Admit::Debug => tracing::debug!($($field)*, $what),
        }
    };
}
pub(super) use budgeted;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_logs_its_budget_and_the_next_says_what_was_left_out() {
        let budget = LineBudget::default();
        let start = Instant::now();
        for _ in 0..LINES_PER_SECOND {
            assert_eq!(budget.admit(start), Admit::Line { skipped: 0 });
        }
        for _ in 0..7 {
            assert_eq!(
                budget.admit(start + Duration::from_millis(500)),
                Admit::Debug
            );
        }
        assert_eq!(
            budget.admit(start + Duration::from_secs(1)),
            Admit::Line { skipped: 7 }
        );
        assert_eq!(
            budget.admit(start + Duration::from_millis(1500)),
            Admit::Line { skipped: 0 }
        );
    }
}
