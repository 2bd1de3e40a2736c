//! The server side of one Heartbeat stream: the first message binds the
//! stream to its node and session, every later one renews liveness and
//! reports pool status, each is answered with an ack.
//!
//! Commands (DrainCommand, ResumeCommand) ride on the ack of the stream's
//! first message when one is owed, and are pushed unsolicited (sequence 0,
//! which acknowledges nothing) the moment DrainNode or CancelDrain owes a
//! new one: the stream waits on the node's command signal beside the
//! agent's next message, so an idle stream costs no task and no timer.
//!
//! One live stream per session: each stream takes the session's next
//! stream number when it binds, and the same signal wakes an older stream
//! of the session (or of an older session) so it ends at once with
//! FAILED_PRECONDITION saying what took over. A stream also holds its
//! token's grant and ends with UNAUTHENTICATED the moment a token reload
//! removes that token.
//!
//! A stream waiting for the agent's next message waits on two things: the
//! message, and one signal, after which it checks what happened; before
//! its first message, also on a timer. The signal is its node's once the
//! stream has named it, the registry-wide recheck of [`StreamShared`]
//! before. A recheck (shutdown, a term's end, a token reload) raises the
//! shared signal and then every node's, so a bound stream hears it through
//! its node's signal and compares the shared count. Each wait is part of
//! every open stream's state and a waiter in a wait list per beat (the
//! shared signal's list would be one lock every beat of the fleet takes),
//! so they are kept to these.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use registry_proto::convert::{to_proto_duration, to_proto_timestamp};
use registry_proto::pb;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tracing::{debug, info, warn};

use super::check_identity;
use super::heartbeat_wire::Messages;
use crate::auth::{Authenticator, TokenGrant};
use crate::error::RegistryError;
use crate::registry::{NodeSlot, Now, Registry, secrets_equal};
use crate::replica::{ReplicaRole, Term};
use crate::signal::Signal;
use crate::validate;

/// What every heartbeat stream of a service shares, held once behind an
/// `Arc` rather than copied into each stream's state: with 100k open
/// streams that state is 100k boxed futures, and these fields cost each
/// of them ~60 bytes (its box then fits a smaller allocation class).
pub(super) struct StreamShared {
    /// Where heartbeats are recorded.
    registry: Registry,
    /// Raised when the server shuts down, a term ends or the tokens are
    /// reloaded, after which each stream checks whether it may go on. One
    /// count for the three; streams not yet bound to a node wait on it, and
    /// every node's signal is raised after it for the bound ones.
    recheck: Signal,
    /// Starts the task that raises `recheck`, at the first stream.
    watching: std::sync::Once,
    /// The runtime the service was built on (the main one), where that task
    /// runs: the first stream may be on a connection thread, whose other
    /// connections would wait while it raises every node's signal.
    home: Option<tokio::runtime::Handle>,
    /// Ends the streams when the server shuts down.
    shutdown: CancellationToken,
    /// Clock-skew allowance for sent_at.
    max_clock_skew: Duration,
    /// Deadline for a stream's first message.
    first_message_timeout: Duration,
    /// Largest Heartbeat message (`--max-heartbeat-message-size`), for
    /// the streams whose framing the service reads itself.
    pub(super) max_message: usize,
    /// Handling-time histogram, looked up once, not per stream or beat.
    latency: metrics::Histogram,
}

impl StreamShared {
    pub(super) fn new(
        registry: Registry,
        shutdown: CancellationToken,
        max_clock_skew: Duration,
        first_message_timeout: Duration,
        max_message: usize,
    ) -> Self {
        Self {
            registry,
            recheck: Signal::default(),
            watching: std::sync::Once::new(),
            home: tokio::runtime::Handle::try_current().ok(),
            shutdown,
            max_clock_skew,
            first_message_timeout,
            max_message,
            latency: metrics::histogram!(crate::metrics::HEARTBEAT_SECONDS),
        }
    }

    /// Starts, once, the task that raises `recheck`, and then every node
    /// signal of the registry, when the shutdown token is cancelled, a
    /// term of `role` ends and `auth` reloads its tokens.
    pub(super) fn watch(self: &Arc<Self>, role: &ReplicaRole, auth: &Authenticator) {
        self.watching.call_once(|| {
            let shared = Arc::clone(self);
            let (role, mut reloads) = (role.clone(), auth.reloads());
            let watch = async move {
                // From zero: a term that ended before this task started
                // is raised at once (a wake-up with nothing to do at worst).
                let mut terms_ended = 0;
                loop {
                    let last = tokio::select! {
                        () = shared.shutdown.cancelled() => true,
                        () = role.term_ends().raised(&mut terms_ended) => false,
                        () = reloads.next() => false,
                    };
                    // The shared count first: a stream woken by its node's
                    // signal then finds it raised.
                    shared.recheck.raise();
                    shared.registry.raise_every_signal();
                    if last {
                        return;
                    }
                }
            };
            match &self.home {
                Some(home) => drop(home.spawn(watch)),
                None => drop(tokio::spawn(watch)),
            }
        });
    }
}

/// The server side of one Heartbeat stream, its requests read from `M`.
/// Every open stream holds one (inside its response body), so what only
/// some streams need is boxed and what all share is behind `shared`.
pub(super) struct HeartbeatSession<M> {
    /// The agent's messages.
    pub(super) inbound: M,
    /// What the service's streams share (the registry, settings, the
    /// recheck signal); keeps the stream counted as open while it lives.
    pub(super) shared: OpenStream,
    /// The node this stream speaks for, fixed by the first message; kept so
    /// later messages cost one node lock and no map lookup.
    pub(super) node: Option<Arc<NodeSlot>>,
    /// The session the first message named.
    pub(super) session_id: u64,
    /// That session's secret, checked by the registry at the first
    /// message; later messages may repeat it (compared in constant time)
    /// but not change it.
    pub(super) session_secret: Box<str>,
    /// The raises of the shared recheck signal this stream has checked;
    /// from zero, so a new stream checks once at its start if anything was
    /// raised before it (the watch starts before the stream's token is
    /// checked, so nothing it must see is raised before the count it starts
    /// from).
    pub(super) recheck_seen: u64,
    /// Set once the stream has ended (an error was sent, or input ended).
    pub(super) done: bool,
    /// Who opened the stream, where the server checks tokens or client
    /// certificates; `None` (nothing kept) where it checks neither.
    pub(super) caller: Option<Box<Caller>>,
    /// The raises of the node's signal this stream has seen (a command
    /// newly owed, a newer stream or session); read with `node`.
    pub(super) signal_seen: u64,
    /// Number of the latest command this stream sent (0: none), so each
    /// is sent once per stream.
    pub(super) sent_command: u64,
    /// This stream's number within its session (from
    /// `Registry::attach_stream`), so a newer stream of the session
    /// replaces it; set with `node`.
    pub(super) stream: u64,
    /// The leadership term the stream was opened under: the stream ends
    /// when it does, and no message is acknowledged once its lease may
    /// have run out (a single registry's term never ends).
    pub(super) term: Term,
}

/// Who opened a heartbeat stream: what its first message and every token
/// reload are checked against.
pub(super) struct Caller {
    /// Whether the caller holds an admin token (which may speak for any
    /// node under mTLS).
    pub(super) token_admin: bool,
    /// Names in the client certificate, under mTLS.
    pub(super) identities: Option<Box<[String]>>,
    /// The token the stream was opened with, so a reload that removes it
    /// ends the stream; `None` when the server checks no tokens.
    pub(super) grant: Option<TokenGrant>,
}

impl Caller {
    /// What to keep of a caller; `None` when there is nothing to check
    /// (no token table, no client certificate).
    pub(super) fn kept(
        token_admin: bool,
        identities: Option<Vec<String>>,
        grant: Option<TokenGrant>,
    ) -> Option<Box<Self>> {
        (token_admin || identities.is_some() || grant.is_some()).then(|| {
            Box::new(Self {
                token_admin,
                identities: identities.map(Vec::into_boxed_slice),
                grant,
            })
        })
    }
}

/// Waits until the stream's signal is raised: its node's once it has
/// named it (a command newly owed, a newer stream or session, a recheck),
/// the shared recheck before. The signal's own wait, not a future around
/// it: it is part of every open stream's state.
fn raised<'a>(
    node: Option<&'a NodeSlot>,
    node_seen: &'a mut u64,
    recheck: &'a Signal,
    recheck_seen: &'a mut u64,
) -> impl std::future::Future<Output = ()> + 'a {
    match node {
        Some(slot) => slot.signal().raised(node_seen),
        // The count is taken here only; after a bound stream's wake-up
        // `recheck_due` compares it.
        None => recheck.raised(recheck_seen),
    }
}

/// Resolves when the first message is overdue; never once it came (no
/// deadline). Written out: part of every open stream's state, 8 bytes
/// where an `async fn` took 24.
fn first_message_due(
    deadline: &mut Option<Pin<Box<tokio::time::Sleep>>>,
) -> impl std::future::Future<Output = ()> + '_ {
    std::future::poll_fn(move |cx| match deadline {
        Some(due) => due.as_mut().poll(cx),
        None => std::task::Poll::Pending,
    })
}

/// Why a stream ends when its term does; agents then find the leader.
fn not_leading() -> RegistryError {
    RegistryError::NotLeader {
        leader: None,
        why: "it stepped down: its etcd lease ended".into(),
    }
}

/// The stream of `session`'s replies: each pulls the agent's next
/// message and answers it. No task and no channel per stream, which keeps
/// 100k idle streams cheap.
pub(super) fn replies<M: Messages>(
    session: HeartbeatSession<M>,
) -> impl Stream<Item = Result<pb::HeartbeatResponse, Status>> + Send + 'static {
    futures_util::stream::unfold(session, |mut session| async move {
        let reply = session.next_reply().await?;
        Some((reply, session))
    })
}

/// One open heartbeat stream in the registry's count, until dropped, and
/// what the service's streams share.
pub(super) struct OpenStream(Arc<StreamShared>);

impl OpenStream {
    /// Counts one more open stream; returns it with the count of streams
    /// open before it.
    pub(super) fn open(shared: &Arc<StreamShared>) -> (Self, i64) {
        let before = shared
            .registry
            .stats()
            .open_streams
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        (Self(Arc::clone(shared)), before)
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0
            .registry
            .stats()
            .open_streams
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl std::ops::Deref for OpenStream {
    type Target = StreamShared;

    fn deref(&self) -> &StreamShared {
        &self.0
    }
}

impl<M: Messages> HeartbeatSession<M> {
    fn node_id(&self) -> &str {
        self.node.as_deref().map_or("", NodeSlot::id)
    }

    /// The answer to the agent's next message; `None` ends the stream.
    pub(super) async fn next_reply(&mut self) -> Option<Result<pb::HeartbeatResponse, Status>> {
        if self.done {
            return None;
        }
        // Until the stream has named its node, it may stay silent only so
        // long; afterwards silence is the node's deadline's business. Boxed:
        // a timer is needed once per stream, its room in the state always.
        let mut first_deadline = self
            .node
            .is_none()
            .then(|| Box::pin(tokio::time::sleep(self.shared.first_message_timeout)));
        let message = loop {
            if let Some(end) = self.recheck_due() {
                self.done = true;
                return Some(Err(end));
            }
            tokio::select! {
                biased;
                () = raised(
                    self.node.as_deref(),
                    &mut self.signal_seen,
                    &self.shared.recheck,
                    &mut self.recheck_seen,
                ) => {
                    if let Some(end) = self.recheck_due() {
                        self.done = true;
                        return Some(Err(end));
                    }
                    match self.push() {
                        Ok(Some(push)) => return Some(Ok(push)),
                        Ok(None) => {}
                        Err(err) => {
                            self.done = true;
                            let reason = match err {
                                RegistryError::StreamReplaced { .. } => "replaced",
                                _ => "superseded",
                            };
                            metrics::counter!(crate::metrics::STREAMS_ENDED, "reason" => reason)
                                .increment(1);
                            info!(
                                node_id = %self.node_id(),
                                error = %err,
                                "heartbeat stream ended: something newer took over"
                            );
                            return Some(Err(err.into()));
                        }
                    }
                }
                () = first_message_due(&mut first_deadline) => {
                    self.done = true;
                    let err = RegistryError::TooSlow(format!(
                        "no first heartbeat message within {}; the stream is closed",
                        humantime::format_duration(self.shared.first_message_timeout)
                    ));
                    info!(error = %err, "idle heartbeat stream closed");
                    return Some(Err(err.into()));
                }
                message = self.inbound.message() => break message,
            }
        };
        if !self.term.holds() {
            // The lease may have expired while this replica was frozen:
            // another may lead now, so this message is not acknowledged.
            self.done = true;
            return Some(Err(not_leading().into()));
        }
        match message {
            Ok(Some(mut request)) => match self.timed_handle(&mut request) {
                Ok(ack) => Some(Ok(ack)),
                Err(err) => {
                    self.done = true;
                    warn!(
                        node_id = %self.node_id(),
                        error = %err,
                        "heartbeat refused; closing stream"
                    );
                    Some(Err(err.into()))
                }
            },
            Ok(None) => {
                self.done = true;
                debug!(node_id = %self.node_id(), "heartbeat stream closed by agent");
                None
            }
            Err(status) => {
                self.done = true;
                info!(
                    node_id = %self.node_id(),
                    code = ?status.code(),
                    message = status.message(),
                    "heartbeat stream broken"
                );
                Some(Err(status))
            }
        }
    }

    /// Why the stream must end now for a registry-wide reason, if a
    /// recheck was raised since the stream last checked and it must.
    fn recheck_due(&mut self) -> Option<Status> {
        let raised = self.shared.recheck.seen();
        if raised == self.recheck_seen {
            return None;
        }
        self.recheck_seen = raised;
        self.must_end()
    }

    /// After a recheck: why the stream must end now for a registry-wide
    /// reason (the server shuts down, its term ended, its token was
    /// revoked), if it must.
    fn must_end(&mut self) -> Option<Status> {
        if self.shared.shutdown.is_cancelled() {
            return Some(RegistryError::ShuttingDown.into());
        }
        if self.term.lost().is_cancelled() {
            metrics::counter!(crate::metrics::STREAMS_ENDED, "reason" => "stepped_down")
                .increment(1);
            info!(
                node_id = %self.node_id(),
                "heartbeat stream ended: this replica no longer leads"
            );
            return Some(not_leading().into());
        }
        let grant = self.caller.as_deref_mut()?.grant.as_mut()?;
        let err = grant.revoked()?;
        metrics::counter!(crate::metrics::STREAMS_ENDED, "reason" => "revoked").increment(1);
        warn!(
            node_id = %self.node_id(),
            error = %err,
            "heartbeat stream ended: its token was revoked"
        );
        Some(RegistryError::from(err).into())
    }

    /// After a wake-up: the unsolicited message carrying a newly owed
    /// command, if this stream has not sent it yet; or why the stream
    /// must end (a newer stream or session took over, the node is gone).
    fn push(&mut self) -> Result<Option<pb::HeartbeatResponse>, RegistryError> {
        let Some(node) = self.node.as_ref() else {
            return Ok(None);
        };
        let Some(command) = self.shared.registry.pending_on_stream(
            node,
            self.session_id,
            self.stream,
            &mut self.sent_command,
        )?
        else {
            return Ok(None);
        };
        debug!(node_id = %node.id(), "command pushed on the heartbeat stream");
        Ok(Some(self.reply(0, Now::read().wall, Some(command))))
    }

    /// A response: the ack of `sequence` (0: acknowledges nothing).
    fn reply(
        &self,
        sequence: u64,
        wall: chrono::DateTime<chrono::Utc>,
        command: Option<pb::heartbeat_response::Command>,
    ) -> pb::HeartbeatResponse {
        pb::HeartbeatResponse {
            sequence,
            server_time: Some(to_proto_timestamp(wall)),
            heartbeat_interval: Some(to_proto_duration(
                self.shared.registry.timing().heartbeat_interval,
            )),
            command,
            registry: Some(self.shared.registry.instance().clone()),
        }
    }

    fn timed_handle(
        &mut self,
        request: &mut pb::HeartbeatRequest,
    ) -> Result<pb::HeartbeatResponse, RegistryError> {
        let started = std::time::Instant::now();
        let result = self.handle(request);
        self.shared.latency.record(started.elapsed().as_secs_f64());
        result
    }

    fn handle(
        &mut self,
        request: &mut pb::HeartbeatRequest,
    ) -> Result<pb::HeartbeatResponse, RegistryError> {
        let node = match &self.node {
            None => {
                validate::node_id("node_id", &request.node_id)?;
                if request.session_id == 0 {
                    return Err(RegistryError::invalid(
                        "session_id",
                        "is required in the first message of a stream (use RegisterResponse.session_id)",
                    ));
                }
                if let Some(caller) = &self.caller {
                    check_identity(
                        caller.identities.as_deref(),
                        caller.token_admin,
                        &request.node_id,
                    )?;
                }
                let (slot, stream) = self.shared.registry.attach_stream(
                    &request.node_id,
                    request.session_id,
                    &request.session_secret,
                )?;
                self.stream = stream;
                debug!(node_id = %slot.id(), "heartbeat stream opened");
                // What is owed now rides on this message's ack; only later
                // raises wake the stream.
                self.signal_seen = slot.signal().seen();
                self.session_id = request.session_id;
                self.session_secret = std::mem::take(&mut request.session_secret).into_boxed_str();
                self.node.insert(slot)
            }
            Some(slot) => {
                if !request.node_id.is_empty() && request.node_id != slot.id() {
                    return Err(RegistryError::invalid(
                        "node_id",
                        format!(
                            "this stream speaks for node {}; a stream cannot switch nodes",
                            slot.id()
                        ),
                    ));
                }
                if (request.session_id != 0 && request.session_id != self.session_id)
                    || (!request.session_secret.is_empty()
                        && !secrets_equal(&request.session_secret, &self.session_secret))
                {
                    return Err(RegistryError::invalid(
                        "session_id",
                        format!(
                            "this stream speaks for session {}; a stream cannot switch sessions",
                            self.session_id
                        ),
                    ));
                }
                slot
            }
        };
        let now = Now::read();
        let beat = validate::beat(request, now.wall, self.shared.max_clock_skew)?;
        let command = self.shared.registry.heartbeat_on_stream(
            node,
            self.session_id,
            self.stream,
            beat,
            now.at,
            &mut self.sent_command,
        )?;
        Ok(self.reply(request.sequence, now.wall, command))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::TokenSources;
    use crate::registry::tests::registration;

    #[tokio::test]
    async fn a_reload_a_term_end_and_shutdown_each_raise_the_streams_recheck() {
        let dir = tempfile::tempdir().unwrap();
        let tokens = dir.path().join("tokens");
        std::fs::write(&tokens, "node node-token-0123456789\n").unwrap();
        let auth = Authenticator::from_sources(TokenSources {
            file: Some(tokens.clone()),
            admin_token: None,
        })
        .unwrap();
        let role = ReplicaRole::starting_follower();
        role.lead(Term::new(Arc::new(|| true), CancellationToken::new()));
        let shutdown = CancellationToken::new();
        let registry = Registry::new(crate::registry::Timing::default());
        let shared = Arc::new(StreamShared::new(
            registry.clone(),
            shutdown.clone(),
            Duration::from_secs(1),
            Duration::from_secs(1),
            64 * 1024,
        ));
        // A bound stream hears a recheck through its node's signal.
        let registered = registry.register(registration("n1"), Now::read()).unwrap();
        let (node, _) = registry
            .attach_stream("n1", registered.session_id, &registered.session_secret)
            .unwrap();
        let node_start = node.signal().seen();
        // Every stream asks; one task watches.
        shared.watch(&role, &auth);
        shared.watch(&role, &auth);

        let start = shared.recheck.seen();
        let mut seen = start;
        let wait = Duration::from_secs(10);
        std::fs::write(&tokens, "node other-token-0123456789\n").unwrap();
        auth.reload().unwrap();
        let raised = tokio::time::timeout(wait, shared.recheck.raised(&mut seen)).await;
        raised.expect("a reload raises it");
        role.follow(None, "the lease ended");
        let raised = tokio::time::timeout(wait, shared.recheck.raised(&mut seen)).await;
        raised.expect("a term's end raises it");
        shutdown.cancel();
        let raised = tokio::time::timeout(wait, shared.recheck.raised(&mut seen)).await;
        raised.expect("shutdown raises it");
        assert_eq!(
            shared.recheck.seen() - start,
            3,
            "one watcher: each cause raised once"
        );
        assert_eq!(
            node.signal().seen() - node_start,
            3,
            "each raised the node's signal after the shared one"
        );
    }
}
