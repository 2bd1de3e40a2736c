//! One heartbeat stream: opening it, the sender task that feeds it, the
//! acks and their commands, and the watchdog that gives up on a stuck
//! stream.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use registry_proto::pb;
use registry_proto::rules;
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use tracing::{debug, info, warn};

use super::{Agent, Session, Shutdown, positive, wait};
use crate::pools::PoolConfig;
use registry_proto::backoff::random_up_to;
use registry_proto::endpoints::Leader;

/// Heartbeat requests queued ahead of the stream; beats are seconds apart,
/// so a small buffer only absorbs a slow connection.
const REQUEST_BUFFER: usize = 4;

/// How a heartbeat stream ended.
#[derive(Debug)]
pub(super) enum StreamEnd {
    /// Shutdown was requested (and Deregister was sent).
    Shutdown,
    /// The registry no longer knows the node or the session.
    Reregister(String),
    /// A newer heartbeat stream of this very session took over at the
    /// registry (another holder of the session). Registering again would
    /// end that stream in turn, so the agent does not: it tries this
    /// session again after the long refused-retry.
    Replaced(String),
    /// The pools' specs changed; the registration must be updated.
    PoolsChanged,
    /// Anything else: connection lost, stream closed, no acks.
    Failed(Status),
}

/// What the sender task stopped for.
#[derive(Debug)]
enum SenderEnd {
    PoolsChanged,
    Closed,
}

/// Aborts a task when dropped, so no sender outlives its stream.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Agent {
    /// Runs one heartbeat stream until it ends, on the leader (found again
    /// first when the last failure suggested it moved: after a failover
    /// the session resumes on the new leader). The bool tells whether the
    /// registry acknowledged anything on it (the connection worked).
    pub(super) async fn heartbeat_stream(
        self: &Arc<Self>,
        session: &Session,
        jitter: bool,
        shutdown: &mut Shutdown,
    ) -> (StreamEnd, bool) {
        let found = tokio::select! {
            _ = &mut *shutdown => {
                self.deregister(session).await;
                return (StreamEnd::Shutdown, false);
            }
            found = self.leader() => found,
        };
        let leader = match found {
            Ok(leader) => leader,
            Err(status) => return (StreamEnd::Failed(status), false),
        };
        let (end, acked) = self.stream_on(&leader, session, jitter, shutdown).await;
        if let StreamEnd::Failed(status) = &end {
            self.call_failed(&leader, status);
        }
        (end, acked)
    }

    async fn stream_on(
        self: &Arc<Self>,
        leader: &Leader,
        session: &Session,
        jitter: bool,
        shutdown: &mut Shutdown,
    ) -> (StreamEnd, bool) {
        let node_id = &self.config.node_id;
        if jitter {
            // A fleet re-registering after a registry restart would
            // otherwise beat in lockstep.
            let delay = random_up_to(&mut fastrand::Rng::new(), session.interval / 2);
            debug!(%node_id, delay = ?delay, "waiting before the first heartbeat");
            if wait(delay, shutdown).await {
                self.deregister(session).await;
                return (StreamEnd::Shutdown, false);
            }
        }
        let Some(first) = self.beat(session).await else {
            return (StreamEnd::PoolsChanged, false);
        };
        let last_sent = Arc::new(AtomicU64::new(first.sequence));
        let (tx, rx) = mpsc::channel(REQUEST_BUFFER);
        // Queued before the call: the registry may wait for the first
        // message before it answers with response headers.
        if tx.send(first).await.is_err() {
            return (
                StreamEnd::Failed(Status::internal("request queue closed")),
                false,
            );
        }
        let mut client = self.client(leader);
        // The registry answers the headers with the first ack, so opening
        // is bounded like an ack too: a frozen leader must not hold a
        // stream past the node timeout (a new leader's grace would run out
        // while this agent still waits on the old one).
        let open_timeout = self
            .config
            .registry_timeout
            .min(ack_timeout(session, session.interval));
        let open = tokio::time::timeout(open_timeout, client.heartbeat(ReceiverStream::new(rx)));
        let opened = tokio::select! {
            _ = &mut *shutdown => {
                self.deregister(session).await;
                return (StreamEnd::Shutdown, false);
            }
            opened = open => opened,
        };
        let mut inbound = match opened {
            Ok(Ok(response)) => response.into_inner(),
            Ok(Err(status)) => return (classify(status), false),
            Err(_) => {
                return (
                    StreamEnd::Failed(Status::deadline_exceeded(
                        "opening the heartbeat stream timed out",
                    )),
                    false,
                );
            }
        };
        debug!(%node_id, session_id = %session.id, "heartbeat stream open");

        let (interval_tx, interval_rx) = watch::channel(session.interval);
        // A drain or resume command is reported at once, not up to one
        // interval later: `registry-ctl drain --wait` and placement wait
        // for that report.
        let report_now = Arc::new(Notify::new());
        let mut sender = tokio::spawn(send_beats(
            Arc::clone(self),
            session.clone(),
            tx,
            interval_rx,
            self.pools.handoff_changes(),
            Arc::clone(&last_sent),
            Arc::clone(&report_now),
        ));
        let _abort_sender = AbortOnDrop(sender.abort_handle());
        let mut acked = false;
        let mut newest_ack = 0u64;
        // The registry acks every beat: beats unacked for half a node
        // timeout mean the stream is stuck even if TCP looks fine. Silence
        // is counted in watchdog ticks, not wall-clock time, so an agent
        // that was frozen (SIGSTOP, a suspended VM) does not drop a healthy
        // stream the moment it resumes.
        let check_every = session.interval.min(Duration::from_secs(1));
        let mut watchdog = tokio::time::interval_at(Instant::now() + check_every, check_every);
        watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ack_since_tick = false;
        let mut silent = Duration::ZERO;
        loop {
            tokio::select! {
                _ = &mut *shutdown => {
                    self.deregister(session).await;
                    return (StreamEnd::Shutdown, acked);
                }
                message = inbound.message() => match message {
                    // Sequence 0 acknowledges no beat: a command the
                    // registry pushed between acks. It proves nothing about
                    // the beats, so the watchdog does not count it.
                    Ok(Some(ack)) => {
                        if ack.sequence != 0 {
                            acked = true;
                            ack_since_tick = true;
                            newest_ack = newest_ack.max(ack.sequence);
                        }
                        if let Some(end) = self.handle_ack(ack, &interval_tx, &report_now) {
                            return (end, acked);
                        }
                    }
                    Ok(None) => {
                        return (
                            StreamEnd::Failed(Status::unavailable("registry closed the heartbeat stream")),
                            acked,
                        );
                    }
                    Err(status) => return (classify(status), acked),
                },
                end = &mut sender => {
                    let end = match end {
                        Ok(SenderEnd::PoolsChanged) => StreamEnd::PoolsChanged,
                        Ok(SenderEnd::Closed) => {
                            StreamEnd::Failed(Status::unavailable("heartbeat request stream closed"))
                        }
                        Err(e) => StreamEnd::Failed(Status::internal(format!("heartbeat sender failed: {e}"))),
                    };
                    return (end, acked);
                }
                _ = watchdog.tick() => {
                    let waiting = last_sent.load(Ordering::Relaxed) > newest_ack;
                    silent = if ack_since_tick || !waiting {
                        Duration::ZERO
                    } else {
                        silent + check_every
                    };
                    ack_since_tick = false;
                    if silent >= ack_timeout(session, *interval_tx.borrow()) {
                        return (
                            StreamEnd::Failed(Status::deadline_exceeded(format!(
                                "no heartbeat ack for {}",
                                humantime::format_duration(silent)
                            ))),
                            acked,
                        );
                    }
                }
            }
        }
    }

    /// Applies an ack's interval and command; `Some` ends the stream. A
    /// drain or resume wakes the sender through `report_now` (the registry
    /// sends each command once per stream, so this cannot loop).
    fn handle_ack(
        &self,
        ack: pb::HeartbeatResponse,
        interval: &watch::Sender<Duration>,
        report_now: &Notify,
    ) -> Option<StreamEnd> {
        let node_id = &self.config.node_id;
        if ack.sequence == 0 {
            debug!(%node_id, "registry pushed a response between acks");
        } else {
            debug!(%node_id, sequence = ack.sequence, "heartbeat acked");
        }
        self.ack_timer.acked(ack.sequence);
        if self.config.heartbeat_interval.is_none()
            && let Some(wanted) = positive(ack.heartbeat_interval.as_ref())
            && wanted != *interval.borrow()
        {
            info!(%node_id, interval = %humantime::format_duration(wanted), "registry changed the heartbeat interval");
            interval.send_replace(wanted);
        }
        match ack.command {
            Some(pb::heartbeat_response::Command::Reregister(cmd)) => {
                Some(StreamEnd::Reregister(cmd.reason))
            }
            Some(pb::heartbeat_response::Command::Drain(cmd)) => {
                // The deadline is the registry's to enforce (it counts the
                // drain done then); the agent only shows it.
                let deadline = cmd
                    .deadline
                    .as_ref()
                    .and_then(registry_proto::convert::from_proto_timestamp)
                    .map(|at| at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
                    .unwrap_or_else(|| "none".to_owned());
                warn!(%node_id, pools = ?cmd.pool_ids, reason = %cmd.reason, %deadline, "registry asked to drain pools; reporting them draining");
                self.drain_pools(&cmd);
                report_now.notify_one();
                None
            }
            Some(pb::heartbeat_response::Command::Resume(cmd)) => {
                info!(%node_id, pools = ?cmd.pool_ids, reason = %cmd.reason, "registry cancelled a drain; reporting the pools as their engines are");
                self.resume_pools(&cmd);
                report_now.notify_one();
                None
            }
            None => None,
        }
    }
}

/// The sender task: one beat per interval (timed from the previous beat's
/// start, so slow probes do not stretch the period), and one at once when
/// the handoff files change or a drain or resume command arrived.
async fn send_beats(
    agent: Arc<Agent>,
    session: Session,
    tx: mpsc::Sender<pb::HeartbeatRequest>,
    mut interval: watch::Receiver<Duration>,
    mut handoff: Option<watch::Receiver<Vec<PoolConfig>>>,
    last_sent: Arc<AtomicU64>,
    report_now: Arc<Notify>,
) -> SenderEnd {
    let mut last = Instant::now();
    loop {
        let next = last + *interval.borrow();
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            Ok(()) = interval.changed() => continue,
            Ok(()) = changed(&mut handoff) => {
                debug!(node_id = %agent.config.node_id, "handoff files changed; reporting now");
            }
            () = report_now.notified() => {
                debug!(node_id = %agent.config.node_id, "drain or resume command; reporting now");
            }
        }
        last = Instant::now();
        let Some(beat) = agent.beat(&session).await else {
            return SenderEnd::PoolsChanged;
        };
        last_sent.store(beat.sequence, Ordering::Relaxed);
        if tx.send(beat).await.is_err() {
            return SenderEnd::Closed;
        }
    }
}

pub(super) async fn changed(
    rx: &mut Option<watch::Receiver<Vec<PoolConfig>>>,
) -> Result<(), watch::error::RecvError> {
    match rx {
        Some(rx) => rx.changed().await,
        None => std::future::pending().await,
    }
}

/// Register again where the contract says so ([`rules::must_register_again`]:
/// node unknown, session superseded), but not when a newer stream of the
/// same session replaced this one ([`rules::stream_replaced`]); anything
/// else is a failure to retry.
fn classify(status: Status) -> StreamEnd {
    if rules::stream_replaced(&status) {
        StreamEnd::Replaced(status.message().to_owned())
    } else if rules::must_register_again(status.code()) {
        StreamEnd::Reregister(status.message().to_owned())
    } else {
        StreamEnd::Failed(status)
    }
}

/// How long beats may go unacknowledged before the stream counts as stuck:
/// half the node timeout, so that an agent whose registry froze still has
/// the other half to reach a new leader (or the registry, back) before its
/// node would be due; never under two intervals, so one late ack is not a
/// failure.
fn ack_timeout(session: &Session, interval: Duration) -> Duration {
    (session.node_timeout / 2).max(interval * 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replaced_stream_is_not_a_reason_to_register_again() {
        let mut replaced = Status::failed_precondition("a newer heartbeat stream took over");
        replaced.metadata_mut().insert(
            rules::REASON_KEY,
            tonic::metadata::MetadataValue::from_static(rules::STREAM_REPLACED),
        );
        assert!(matches!(classify(replaced), StreamEnd::Replaced(m) if m.contains("newer")));
        assert!(matches!(
            classify(Status::failed_precondition("session superseded")),
            StreamEnd::Reregister(_)
        ));
        assert!(matches!(
            classify(Status::not_found("node unknown")),
            StreamEnd::Reregister(_)
        ));
        assert!(matches!(
            classify(Status::unauthenticated("revoked")),
            StreamEnd::Failed(s) if s.code() == tonic::Code::Unauthenticated
        ));
    }
}
