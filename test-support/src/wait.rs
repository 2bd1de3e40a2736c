//! Waiting on conditions with deadlines instead of fixed sleeps.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// How often a condition is polled.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Polls `check` every [`POLL_INTERVAL`] until it returns `Ok`, and
/// returns that value. `check` returns `Err(reason)` while the condition
/// does not hold yet, in words that say what it saw; the reason of the
/// last poll goes into the panic when `timeout` runs out, so a failure
/// says what was seen, not only that something took too long.
///
/// # Panics
///
/// When `timeout` passes before `check` returns `Ok`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    match poll_until(timeout, &mut check).await {
        Ok(value) => value,
        Err(last) => panic!("timed out after {timeout:?} waiting until {what}; last seen: {last}"),
    }
}

/// Polls `check` like [`eventually`], and returns the last reason instead
/// of panicking when `timeout` passes.
pub async fn poll_until<T, F, Fut>(timeout: Duration, check: &mut F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let last = match check().await {
            Ok(value) => return Ok(value),
            Err(reason) => reason,
        };
        if Instant::now() >= deadline {
            return Err(last);
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn returns_the_first_success() {
        let mut polls = 0;
        let value = eventually("the third poll", Duration::from_secs(5), || {
            polls += 1;
            let seen = polls;
            async move {
                if seen >= 3 {
                    Ok(seen)
                } else {
                    Err(format!("poll {seen}"))
                }
            }
        })
        .await;
        assert_eq!(value, 3);
    }

    #[tokio::test]
    async fn reports_the_last_reason_on_timeout() {
        let mut polls = 0;
        let last = poll_until(Duration::from_millis(120), &mut || {
            polls += 1;
            let seen = polls;
            async move { Err::<(), _>(format!("still red at poll {seen}")) }
        })
        .await
        .unwrap_err();
        assert_eq!(last, format!("still red at poll {polls}"));
        assert!(polls >= 2, "polled {polls} times in 120 ms");
    }

    #[tokio::test]
    #[should_panic(expected = "waiting until the light is green; last seen: still red")]
    async fn panics_naming_the_condition_and_the_last_reason() {
        eventually("the light is green", Duration::from_millis(50), || async {
            Err::<(), _>("still red".to_owned())
        })
        .await;
    }
}
