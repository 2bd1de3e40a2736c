//! Retry advice on a refusal: the registry tells a caller it turns away
//! for now (RESOURCE_EXHAUSTED when too many registrations are under way)
//! when to come back, as the standard `google.rpc.RetryInfo` status detail
//! that gRPC clients in any language can read, and the registry's own
//! clients (node-agent, fleet-sim) wait that long instead of their
//! exponential backoff. The server spreads the times it hands out, so a
//! storm of refused agents comes back at the pace it can take.

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// A refusal with `code` and `message` that asks the caller to retry after
/// `after` (rounded to whole milliseconds, at least one).
pub fn refusal(code: Code, message: impl Into<String>, after: Duration) -> Status {
    let after = whole_millis(after).max(Duration::from_millis(1));
    Status::with_error_details(code, message, ErrorDetails::with_retry_info(Some(after)))
}

/// `d` cut to whole milliseconds: how retry times are sent and shown.
pub fn whole_millis(d: Duration) -> Duration {
    Duration::from_millis(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The retry delay `status` advises, when it carries one.
pub fn advice(status: &Status) -> Option<Duration> {
    status.get_details_retry_info()?.retry_delay
}

/// How long a client waits after a refusal that advised `after`: the advice
/// plus up to a tenth more at random, so callers given the same time do not
/// come back in the same instant.
pub fn wait_for(advised: Duration, rng: &mut fastrand::Rng) -> Duration {
    advised + crate::backoff::random_up_to(rng, advised / 10)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_advice_survives_the_status_details() {
        let status = refusal(
            Code::ResourceExhausted,
            "too many registrations",
            Duration::from_micros(1_234_567),
        );
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(status.message(), "too many registrations");
        assert_eq!(advice(&status), Some(Duration::from_millis(1234)));
        // Through the wire form (grpc-status-details-bin) as a client sees it.
        let response = status.into_http::<()>();
        let seen = Status::from_header_map(response.headers()).expect("status from headers");
        assert_eq!(advice(&seen), Some(Duration::from_millis(1234)));
    }

    #[test]
    fn no_advice_on_a_plain_status_and_at_least_a_millisecond_when_given() {
        assert_eq!(advice(&Status::resource_exhausted("full")), None);
        let status = refusal(Code::ResourceExhausted, "x", Duration::ZERO);
        assert_eq!(advice(&status), Some(Duration::from_millis(1)));
    }

    #[test]
    fn the_wait_is_the_advice_plus_at_most_a_tenth() {
        let mut rng = fastrand::Rng::with_seed(7);
        let advised = Duration::from_secs(2);
        for _ in 0..1000 {
            let w = wait_for(advised, &mut rng);
            assert!(w >= advised && w <= advised + advised / 10, "{w:?}");
        }
    }
}
