//! Log set-up of tests: the logs of a failing test on request, and logs
//! captured to assert on.

use std::io::Write;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

/// Logs to the test's output, filtered by `RUST_LOG`, when `RUST_LOG` is
/// set; does nothing otherwise, and nothing after the first call. Run a
/// failing test with `RUST_LOG=debug` to see what the code under test
/// logged.
pub fn init_logs() {
    if std::env::var_os("RUST_LOG").is_some() {
        // Fails only when a subscriber is already set, which is fine.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

/// The log lines written on this thread while [`LogCapture::start`]'s
/// guard lives. A `#[tokio::test]` runs on one thread, and in-process
/// servers and agents it starts run on it too, so the capture sees all
/// they log.
#[derive(Clone, Default)]
pub struct LogCapture(Arc<Mutex<Vec<u8>>>);

impl LogCapture {
    /// Captures what passes `filter` (an `EnvFilter` directive such as
    /// `"info,node_agent=debug"`), without colours, until the guard is
    /// dropped.
    ///
    /// # Panics
    ///
    /// When `filter` is not a valid directive.
    pub fn start(filter: &str) -> (Self, tracing::subscriber::DefaultGuard) {
        let logs = Self::default();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(EnvFilter::try_new(filter).expect("a valid log filter"))
            .with_writer(logs.clone())
            .with_ansi(false)
            .finish();
        (logs, tracing::subscriber::set_default(subscriber))
    }

    /// Everything captured so far.
    pub fn text(&self) -> String {
        let bytes = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// How often `needle` occurs in the captured text.
    pub fn count(&self, needle: &str) -> usize {
        self.text().matches(needle).count()
    }

    /// Waits until `needle` has been logged at least `times` times.
    ///
    /// # Panics
    ///
    /// When that takes longer than `timeout`; the panic says how many
    /// times it was seen.
    pub async fn wait_for(&self, needle: &str, times: usize, timeout: Duration) {
        crate::eventually(
            &format!("{times} × {needle:?} in the logs"),
            timeout,
            || {
                let seen = self.count(needle);
                async move {
                    if seen >= times {
                        Ok(())
                    } else {
                        Err(format!("seen {seen} times"))
                    }
                }
            },
        )
        .await;
    }
}

impl Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for LogCapture {
    type Writer = Self;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_what_passes_the_filter_while_the_guard_lives() {
        let (logs, guard) = LogCapture::start("info");
        tracing::info!(answer = 42, "captured line");
        tracing::debug!("below the filter");
        drop(guard);
        tracing::info!("after the guard");
        let text = logs.text();
        assert_eq!(logs.count("captured line"), 1, "{text}");
        assert!(text.contains("answer=42"), "{text}");
        assert_eq!(logs.count("below the filter"), 0, "{text}");
        assert_eq!(logs.count("after the guard"), 0, "{text}");
    }

    #[tokio::test]
    async fn waits_for_a_line_logged_later() {
        // The test's runtime has one thread, so the spawned task logs into
        // this thread's capture.
        let (logs, _guard) = LogCapture::start("info");
        let later = tokio::spawn(async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            tracing::info!("logged later");
        });
        assert_eq!(logs.count("logged later"), 0);
        logs.wait_for("logged later", 1, Duration::from_secs(5))
            .await;
        later.await.unwrap();
        assert_eq!(logs.count("logged later"), 1);
    }
}
