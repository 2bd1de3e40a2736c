//! `drain NODE` and `undrain NODE` (DrainNode, CancelDrain; admin token),
//! and `drain --wait`, which follows the node until it is drained.
//!
//! `--wait` polls GetNode rather than watching: WatchNodes filters by
//! status, pool, label and model but not by node, and a pool's busy slots
//! may change without a new revision, while the progress lines are about
//! exactly those slots.

use std::future::Future;
use std::io::Write;
use std::time::Duration;

use registry_proto::convert::to_proto_duration;
use registry_proto::pb;
use tokio::time::Instant;

use super::Context;
use super::cordon::print;
use crate::cli::DrainArgs;
use crate::error::CtlError;
use crate::exit::Exit;
use crate::output::{Format, Printer, admin, node::age};

/// How often `--wait` asks for the node: about an agent's heartbeat.
const POLL_EVERY: Duration = Duration::from_secs(1);

/// Failed polls in a row (a registry restarting) before `--wait` gives up
/// with the error (exit 3).
const POLL_FAILURES: u32 = 30;

/// Requests the drain, prints what the registry now holds, and with
/// `--wait` follows the node until it is drained.
pub async fn drain<W: Write>(
    context: &Context,
    args: &DrainArgs,
    printer: &mut Printer<W>,
) -> Result<Exit, CtlError> {
    let registry = context.admin_registry().await?;
    let node = registry.drain_node(request(args)).await?;
    print(printer, &node, admin::drain_requested)?;
    if !args.wait {
        return Ok(Exit::Ok);
    }
    printer.flush()?;
    let mut last: Option<String> = None;
    let fetch = || registry.node(&args.node_id);
    let progress = |node: &pb::Node, elapsed: Duration| -> Result<(), CtlError> {
        let line = admin::drain_progress(node);
        if line.is_none() || line == last {
            return Ok(());
        }
        match printer.format() {
            Format::Table | Format::Wide => {
                let text = line.as_deref().unwrap_or_default();
                printer.text(&format!("[{:>6}] {text}\n", age(elapsed)))?;
            }
            Format::Json => printer.message(node)?,
        }
        printer.flush()?;
        last = line;
        Ok(())
    };
    let end = follow(fetch, POLL_EVERY, args.wait_timeout, progress).await?;
    let node_id = &args.node_id;
    match end {
        WaitEnd::Drained(node) => {
            if printer.format() != Format::Json {
                printer.text(&admin::drained(&node))?;
            }
            Ok(Exit::Ok)
        }
        WaitEnd::Cancelled => {
            eprintln!("registry-ctl: the drain of {node_id} was cancelled while waiting");
            Ok(Exit::No)
        }
        WaitEnd::Gone => {
            eprintln!(
                "registry-ctl: node {node_id:?} is no longer registered at {}",
                registry.url()
            );
            Ok(Exit::No)
        }
        WaitEnd::TimedOut(limit) => {
            eprintln!(
                "registry-ctl: {node_id} not drained after {} (see --wait-timeout); the drain goes on, `registry-ctl undrain {node_id}` cancels it",
                humantime::format_duration(limit)
            );
            Ok(Exit::NotDrained)
        }
    }
}

/// Cancels the node's drain and prints what the registry now holds.
pub async fn undrain<W: Write>(
    context: &Context,
    node_id: &str,
    printer: &mut Printer<W>,
) -> Result<Exit, CtlError> {
    let request = pb::CancelDrainRequest {
        node_id: node_id.to_owned(),
    };
    let node = context
        .admin_registry()
        .await?
        .cancel_drain(request)
        .await?;
    print(printer, &node, admin::drain_cancelled)
}

/// The DrainNode request of `drain`'s arguments.
pub fn request(args: &DrainArgs) -> pb::DrainNodeRequest {
    pb::DrainNodeRequest {
        node_id: args.node_id.clone(),
        pool_ids: args.pools.clone(),
        reason: args.reason.clone(),
        deadline: args.deadline.map(to_proto_duration),
    }
}

/// Whether a failed poll may succeed if asked again: the registry was
/// unreachable or slow, not refusing.
fn transient(err: &CtlError) -> bool {
    match err {
        CtlError::Connect { .. } | CtlError::Timeout { .. } => true,
        CtlError::Rpc { code, .. } => matches!(
            code,
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
        ),
        _ => false,
    }
}

/// How `--wait` ended.
#[derive(Debug, Clone, PartialEq)]
pub enum WaitEnd {
    /// The registry counts the node drained.
    Drained(Box<pb::Node>),
    /// The drain was cancelled (no drain is requested any more).
    Cancelled,
    /// The registry no longer knows the node.
    Gone,
    /// This long passed without the node being drained.
    TimedOut(Duration),
}

/// Asks `fetch` for the node every `every` until it is drained, its drain
/// is cancelled, it is gone, or `limit` passes; each answer goes to
/// `progress` with the time since the start. A registry that cannot be
/// reached is asked again, up to [`POLL_FAILURES`] times in a row.
pub async fn follow<F, Fut, P>(
    mut fetch: F,
    every: Duration,
    limit: Option<Duration>,
    mut progress: P,
) -> Result<WaitEnd, CtlError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<pb::Node>, CtlError>>,
    P: FnMut(&pb::Node, Duration) -> Result<(), CtlError>,
{
    let start = Instant::now();
    let mut failures = 0;
    loop {
        match fetch().await {
            Ok(None) => return Ok(WaitEnd::Gone),
            Ok(Some(node)) => {
                failures = 0;
                progress(&node, start.elapsed())?;
                match node.admin.as_ref().and_then(|a| a.drain.as_ref()) {
                    None => return Ok(WaitEnd::Cancelled),
                    Some(drain) if drain.drained => return Ok(WaitEnd::Drained(Box::new(node))),
                    Some(_) => {}
                }
            }
            Err(err) if transient(&err) && failures < POLL_FAILURES => {
                failures += 1;
                eprintln!("registry-ctl: {err}; asking again");
            }
            Err(err) => return Err(err),
        }
        let mut pause = every;
        if let Some(limit) = limit {
            let left = limit.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Ok(WaitEnd::TimedOut(limit));
            }
            pause = pause.min(left);
        }
        tokio::time::sleep(pause).await;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;

    fn node(drain: Option<pb::DrainState>) -> pb::Node {
        pb::Node {
            node_id: "n".into(),
            admin: Some(pb::AdminState {
                drain,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn draining(acknowledged: bool, drained: bool) -> Option<pb::Node> {
        Some(node(Some(pb::DrainState {
            acknowledged,
            drained,
            ..Default::default()
        })))
    }

    /// Follows a scripted sequence of answers (the last repeats); returns
    /// the end and the elapsed time of each progress call.
    async fn run_script(
        answers: Vec<Result<Option<pb::Node>, CtlError>>,
        limit: Option<Duration>,
    ) -> (Result<WaitEnd, CtlError>, Vec<Duration>) {
        let mut answers: VecDeque<_> = answers.into();
        let mut seen = Vec::new();
        let end = follow(
            || {
                let answer = if answers.len() > 1 {
                    answers.pop_front().unwrap()
                } else {
                    match answers.front().unwrap() {
                        Ok(node) => Ok(node.clone()),
                        Err(_) => Err(unavailable()),
                    }
                };
                async move { answer }
            },
            Duration::from_secs(1),
            limit,
            |_, elapsed| {
                seen.push(elapsed);
                Ok(())
            },
        )
        .await;
        (end, seen)
    }

    fn unavailable() -> CtlError {
        CtlError::rpc(
            "GetNode",
            "http://r:1",
            &tonic::Status::unavailable("restarting"),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn waits_until_drained_once_a_second() {
        let (end, seen) = run_script(
            vec![
                Ok(draining(false, false)),
                Ok(draining(true, false)),
                Err(unavailable()),
                Ok(draining(true, true)),
            ],
            None,
        )
        .await;
        assert!(matches!(end, Ok(WaitEnd::Drained(_))), "{end:?}");
        // The failed poll made no progress call.
        assert_eq!(
            seen,
            [0, 1, 3].map(Duration::from_secs).to_vec(),
            "progress at each answered poll"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_at_the_limit() {
        let (end, seen) = run_script(
            vec![Ok(draining(true, false))],
            Some(Duration::from_millis(2500)),
        )
        .await;
        assert!(
            matches!(end, Ok(WaitEnd::TimedOut(d)) if d == Duration::from_millis(2500)),
            "{end:?}"
        );
        // Polled at 0s, 1s, 2s and once more at the limit.
        assert_eq!(seen.len(), 4, "{seen:?}");
        assert_eq!(seen.last(), Some(&Duration::from_millis(2500)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_drain_or_a_gone_node_ends_the_wait() {
        let (end, _) =
            run_script(vec![Ok(draining(false, false)), Ok(Some(node(None)))], None).await;
        assert!(matches!(end, Ok(WaitEnd::Cancelled)), "{end:?}");
        let (end, _) = run_script(vec![Ok(draining(false, false)), Ok(None)], None).await;
        assert!(matches!(end, Ok(WaitEnd::Gone)), "{end:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_registry_unreachable_for_too_long_ends_the_wait_with_its_error() {
        let (end, seen) = run_script(vec![Err(unavailable())], None).await;
        let err = end.unwrap_err();
        assert_eq!(err.exit(), Exit::Unreachable);
        assert!(seen.is_empty());
        // A refusal is not asked again.
        let mut calls = 0;
        let end = follow(
            || {
                calls += 1;
                let err = CtlError::rpc(
                    "GetNode",
                    "http://r:1",
                    &tonic::Status::permission_denied("reader token needed"),
                );
                async move { Err(err) }
            },
            Duration::from_secs(1),
            None,
            |_, _| Ok(()),
        )
        .await;
        assert!(end.unwrap_err().to_string().contains("PERMISSION_DENIED"));
        assert_eq!(calls, 1);
    }

    #[test]
    fn arguments_become_the_request() {
        let args = DrainArgs {
            node_id: "n".into(),
            pools: vec!["pool-0".into()],
            reason: "kernel".into(),
            deadline: Some(Duration::from_secs(600)),
            wait: true,
            wait_timeout: None,
        };
        let request = request(&args);
        assert_eq!(request.node_id, "n");
        assert_eq!(request.pool_ids, ["pool-0"]);
        assert_eq!(request.reason, "kernel");
        assert_eq!(request.deadline.map(|d| d.seconds), Some(600));
        let request = super::request(&DrainArgs {
            deadline: None,
            pools: vec![],
            ..args
        });
        assert!(request.deadline.is_none() && request.pool_ids.is_empty());
    }
}
