//! Waiting on conditions with deadlines instead of fixed sleeps.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// How often a condition is polled.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// What one poll of a condition found: the value once it holds, else why
/// not yet.
///
/// `Result<T, String>` says why in its own words; `Option<T>` and `bool`
/// are for conditions whose "not yet" needs no explanation.
pub trait Attempt {
    /// What the wait returns once the condition holds.
    type Value;

    /// `Ok(value)` when the condition holds, else `Err(why not)`.
    fn into_result(self) -> Result<Self::Value, String>;
}

impl<T> Attempt for Result<T, String> {
    type Value = T;

    fn into_result(self) -> Result<T, String> {
        self
    }
}

impl<T> Attempt for Option<T> {
    type Value = T;

    fn into_result(self) -> Result<T, String> {
        self.ok_or_else(|| "the check found nothing yet".to_owned())
    }
}

impl Attempt for bool {
    type Value = ();

    fn into_result(self) -> Result<(), String> {
        if self {
            Ok(())
        } else {
            Err("the check was false".to_owned())
        }
    }
}

/// Polls `check` every [`POLL_INTERVAL`] until it holds, and returns its
/// value. The reason of the last poll that failed goes into the panic when
/// `timeout` runs out, so a failure says what was seen, not only that
/// something took too long.
///
/// # Panics
///
/// When `timeout` passes before `check` holds.
pub async fn eventually<A, F, Fut>(what: &str, timeout: Duration, mut check: F) -> A::Value
where
    A: Attempt,
    F: FnMut() -> Fut,
    Fut: Future<Output = A>,
{
    match poll_until(timeout, &mut check).await {
        Ok(value) => value,
        Err(last) => panic!("timed out after {timeout:?} waiting until {what}; last seen: {last}"),
    }
}

/// Polls `check` like [`eventually`], and returns the last reason instead
/// of panicking when `timeout` passes.
pub async fn poll_until<A, F, Fut>(timeout: Duration, check: &mut F) -> Result<A::Value, String>
where
    A: Attempt,
    F: FnMut() -> Fut,
    Fut: Future<Output = A>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let last = match check().await.into_result() {
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

    #[tokio::test]
    async fn options_and_booleans_are_conditions_too() {
        let mut polls = 0;
        let found = eventually("a value", Duration::from_secs(5), || {
            polls += 1;
            let seen = polls;
            async move { (seen >= 2).then_some(seen * 10) }
        })
        .await;
        assert_eq!(found, 20);
        let last = poll_until(Duration::from_millis(50), &mut || async { false })
            .await
            .unwrap_err();
        assert_eq!(last, "the check was false");
    }
}
