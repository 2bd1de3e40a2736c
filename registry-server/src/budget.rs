//! Bounds on what unfinished gRPC messages may pin in memory.
//!
//! A client can announce a large message (the 5-byte gRPC prefix carries
//! its length) and then send its bytes slowly, or never its last one. What
//! arrived is buffered until the message is complete, for most methods
//! before any token is checked (`service::RegistryRoute` checks Register's
//! and Heartbeat's from the headers first); without these bounds the only
//! ceiling was max streams × max message size. This layer reads each request body's gRPC
//! framing as it arrives and:
//! - refuses a message longer than its method allows (Heartbeat messages
//!   get a much smaller limit than Register: a heartbeat with 64 pools is a
//!   few KiB) as soon as its prefix arrives, with OUT_OF_RANGE naming the
//!   limit, before any of its payload is buffered (a Heartbeat stream
//!   keeps at most the frame that completed a split prefix);
//! - counts the bytes of every message still incomplete against the
//!   connection's budget and the server-wide budget, and ends the request
//!   with RESOURCE_EXHAUSTED naming the budget when one would be exceeded.
//!   A message's bytes are given back once it is complete (it is decoded at
//!   once) or its request ends.
//!
//! Connections are told apart by their remote address (one live connection
//! per address and port); the entry goes when the connection's last
//! request ends.
//!
//! Where the server serves Heartbeat through its own route
//! ([`BudgetLayer::with_heartbeat_route`], as `server::run` does), Heartbeat
//! requests are not wrapped: the route reads their gRPC framing itself
//! (`service::heartbeat_wire::Inbound`), so the layer hands it the
//! connection's budgets ([`HeartbeatBudget`]) and the stream holds against
//! them the bytes it keeps of a message not yet whole (and of whole ones
//! behind it in the same frame, until read), with the same limits and
//! refusals. A heartbeat stream lives for days: this
//! saves it an allocation for as long as it is open, and every beat a
//! second pass over its framing.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use tonic::Status;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

/// The path of the Heartbeat method, whose messages get their own limit.
pub const HEARTBEAT_PATH: &str = "/registry.v1.NodeRegistry/Heartbeat";

/// The gRPC prefix of each message: a compression flag and a length.
pub(crate) const PREFIX: usize = 5;

/// The length of the message a gRPC `prefix` announces.
pub(crate) fn announced_length(prefix: &[u8; PREFIX]) -> u32 {
    u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]])
}

/// The limits this layer enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetLimits {
    /// Largest message of any method but Heartbeat (`--max-message-size`).
    pub max_message: usize,
    /// Largest Heartbeat message (`--max-heartbeat-message-size`).
    pub max_heartbeat_message: usize,
    /// Bytes of unfinished messages one connection may hold
    /// (`--max-buffered-bytes-per-connection`).
    pub per_connection: usize,
    /// Bytes of unfinished messages all connections together may hold
    /// (`--max-buffered-bytes`).
    pub global: usize,
}

/// A count of bytes held against a limit.
#[derive(Debug)]
struct Budget {
    /// Bytes held now.
    held: AtomicUsize,
    /// Most bytes that may be held.
    limit: usize,
}

impl Budget {
    fn new(limit: usize) -> Self {
        Self {
            held: AtomicUsize::new(0),
            limit,
        }
    }

    /// Takes `n` bytes if they fit.
    fn take(&self, n: usize) -> bool {
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(n).filter(|&total| total <= self.limit)
            })
            .is_ok()
    }

    fn give(&self, n: usize) {
        self.held.fetch_sub(n, Ordering::AcqRel);
    }
}

/// The budgets shared by every request of the server.
#[derive(Debug)]
pub struct Budgets {
    /// The limits.
    limits: BudgetLimits,
    /// The server-wide budget.
    global: Budget,
    /// Each live connection's budget, by remote address.
    connections: Mutex<Connections>,
}

/// A connection's budget, with the server-wide one it draws on too.
#[derive(Debug)]
struct Connection {
    /// The connection's own budget.
    budget: Budget,
    /// The limits and the server-wide budget.
    budgets: Arc<Budgets>,
}

/// Connection budgets by remote address; an entry lives as long as a
/// request of that connection holds it.
#[derive(Debug, Default)]
struct Connections {
    /// The budgets.
    by_address: HashMap<SocketAddr, Weak<Connection>>,
    /// Size at which dead entries are swept next.
    sweep_at: usize,
}

impl Budgets {
    /// Budgets with `limits`.
    pub fn new(limits: BudgetLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            global: Budget::new(limits.global),
            connections: Mutex::default(),
        })
    }

    /// Bytes of unfinished messages held now, server-wide.
    pub fn held(&self) -> usize {
        self.global.held.load(Ordering::Acquire)
    }

    /// The budget of the connection from `address` (a new one when none
    /// is live); without an address (a test transport), one of the
    /// request's own.
    fn connection(self: &Arc<Self>, address: Option<SocketAddr>) -> Arc<Connection> {
        let new = || {
            Arc::new(Connection {
                budget: Budget::new(self.limits.per_connection),
                budgets: Arc::clone(self),
            })
        };
        let Some(address) = address else {
            return new();
        };
        let mut connections = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(connection) = connections.by_address.get(&address).and_then(Weak::upgrade) {
            return connection;
        }
        let connection = new();
        connections
            .by_address
            .insert(address, Arc::downgrade(&connection));
        if connections.by_address.len() >= connections.sweep_at {
            connections.by_address.retain(|_, b| b.strong_count() > 0);
            connections.sweep_at = (connections.by_address.len() * 2).max(1024);
        }
        connection
    }

    /// Wraps a request's body so its messages are held to the budgets;
    /// with `heartbeat_route`, a Heartbeat request's body is passed on as it
    /// is, with its budgets beside it (see the module's notes).
    pub fn wrap<B>(
        self: &Arc<Self>,
        request: http::Request<B>,
        heartbeat_route: bool,
    ) -> http::Request<tonic::body::Body>
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let heartbeat = request.uri().path() == HEARTBEAT_PATH;
        let address = remote_address(request.extensions());
        let connection = self.connection(address);
        let (mut parts, body) = request.into_parts();
        if heartbeat && heartbeat_route {
            parts.extensions.insert(HeartbeatBudget(connection));
            // tonic's own body (what the server hands on) is not boxed again.
            return http::Request::from_parts(parts, tonic::body::Body::new(body));
        }
        let body = BudgetedBody {
            inner: body,
            holding: Holding::new(connection),
            heartbeat,
            frame: FrameReader::default(),
        };
        http::Request::from_parts(parts, tonic::body::Body::new(body))
    }
}

/// The budgets of a Heartbeat request's connection, in its extensions, for
/// the stream that reads its framing (see the module's notes).
#[derive(Debug, Clone)]
pub struct HeartbeatBudget(Arc<Connection>);

impl HeartbeatBudget {
    /// The budgets of a Heartbeat request from `address` (tests).
    #[cfg(test)]
    pub(crate) fn of(budgets: &Arc<Budgets>, address: Option<SocketAddr>) -> Self {
        Self(budgets.connection(address))
    }

    /// What the stream holds against these budgets (nothing yet).
    pub fn holding(self) -> Holding {
        Holding::new(self.0)
    }
}

/// What one request holds against its connection's budget and the
/// server-wide one: the bytes of its unfinished message. Given back when
/// the message is whole or the holding is dropped.
#[derive(Debug)]
pub struct Holding {
    /// The connection's budget, and through it the server's.
    connection: Arc<Connection>,
    /// Bytes held now.
    held: usize,
}

impl Holding {
    fn new(connection: Arc<Connection>) -> Self {
        Self {
            connection,
            held: 0,
        }
    }

    /// Refuses a message longer than its method allows.
    pub fn check_length(&self, heartbeat: bool, len: usize) -> Result<(), Status> {
        let limits = self.connection.budgets.limits;
        let (limit, flag, what) = if heartbeat {
            (
                limits.max_heartbeat_message,
                "--max-heartbeat-message-size",
                "a Heartbeat message",
            )
        } else {
            (limits.max_message, "--max-message-size", "a message")
        };
        if len > limit {
            metrics::counter!(crate::metrics::MESSAGES_REFUSED, "reason" => "too_large")
                .increment(1);
            return Err(Status::out_of_range(format!(
                "{what} of {len} bytes is larger than the {limit} bytes this registry accepts ({flag})"
            )));
        }
        Ok(())
    }

    /// Holds `n` more bytes of the unfinished message.
    fn hold(&mut self, n: usize) -> Result<(), Status> {
        let Connection { budget, budgets } = &*self.connection;
        if !budget.take(n) {
            metrics::counter!(crate::metrics::MESSAGES_REFUSED, "reason" => "connection_budget")
                .increment(1);
            return Err(Status::resource_exhausted(format!(
                "this connection's unfinished messages would hold more than {} bytes (--max-buffered-bytes-per-connection); finish or cancel the others first",
                budget.limit
            )));
        }
        if !budgets.global.take(n) {
            budget.give(n);
            metrics::counter!(crate::metrics::MESSAGES_REFUSED, "reason" => "global_budget")
                .increment(1);
            return Err(Status::resource_exhausted(format!(
                "the registry holds its maximum of {} bytes of unfinished messages (--max-buffered-bytes); retry later",
                budgets.global.limit
            )));
        }
        self.held += n;
        Ok(())
    }

    /// Holds exactly `bytes` (more, or giving some back); on a refusal
    /// what was held stays held.
    pub fn hold_exactly(&mut self, bytes: usize) -> Result<(), Status> {
        match bytes.checked_sub(self.held) {
            Some(0) => Ok(()),
            Some(more) => self.hold(more),
            None => {
                let fewer = self.held - bytes;
                self.connection.budget.give(fewer);
                self.connection.budgets.global.give(fewer);
                self.held = bytes;
                Ok(())
            }
        }
    }

    /// Gives back everything held (the message completed, or was
    /// abandoned).
    pub fn release(&mut self) {
        // Never refused: it only gives back.
        let _ = self.hold_exactly(0);
    }
}

impl Drop for Holding {
    fn drop(&mut self) {
        self.release();
    }
}

/// The client's address, plain or under TLS.
fn remote_address(extensions: &http::Extensions) -> Option<SocketAddr> {
    extensions
        .get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
        .or_else(|| {
            extensions
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|info| info.get_ref().remote_addr())
        })
}

/// Where the reader is in the gRPC framing: `[flag][len: u32 BE][payload]`.
#[derive(Debug, Default)]
struct FrameReader {
    /// Prefix bytes seen of the current message (0..=5).
    prefix: [u8; PREFIX],
    /// How many of `prefix` are filled.
    prefix_len: usize,
    /// Payload bytes still to come of the current message.
    payload_left: usize,
}

/// What one chunk of body bytes did to the framing.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// `n` bytes belong to a message not yet complete.
    Held(usize),
    /// A message completed with the bytes taken.
    Completed,
    /// A prefix announced a message of this many bytes.
    Announced(usize),
}

impl FrameReader {
    /// Consumes up to one framing step from `chunk`, returning what it was
    /// and how many bytes of the chunk it took.
    fn step(&mut self, chunk: &[u8]) -> (Step, usize) {
        if self.prefix_len < PREFIX {
            let take = (PREFIX - self.prefix_len).min(chunk.len());
            self.prefix[self.prefix_len..self.prefix_len + take].copy_from_slice(&chunk[..take]);
            self.prefix_len += take;
            if self.prefix_len < PREFIX {
                return (Step::Held(take), take);
            }
            let len = announced_length(&self.prefix) as usize;
            self.payload_left = len;
            if len == 0 {
                self.prefix_len = 0;
                return (Step::Completed, take);
            }
            return (Step::Announced(len), take);
        }
        let take = self.payload_left.min(chunk.len());
        self.payload_left -= take;
        if self.payload_left == 0 {
            self.prefix_len = 0;
            return (Step::Completed, take);
        }
        (Step::Held(take), take)
    }
}

/// A request body whose unfinished messages count against the budgets (of
/// any method but Heartbeat where the Heartbeat route reads its own).
struct BudgetedBody<B> {
    /// The body as received (tonic's boxed body: not boxed again).
    inner: B,
    /// Bytes of the unfinished message held against the budgets.
    holding: Holding,
    /// Whether this is a Heartbeat request (its own message limit).
    heartbeat: bool,
    /// The framing read so far.
    frame: FrameReader,
}

impl<B> BudgetedBody<B> {
    /// Counts `chunk` against the framing and budgets; an error ends the
    /// request.
    fn account(&mut self, mut chunk: &[u8]) -> Result<(), Status> {
        // Bytes of this chunk that belong to a message still unfinished at
        // its end: a message that arrives whole in one chunk (a heartbeat,
        // nearly always) is never counted, so costs no atomic operation.
        let mut unfinished = 0;
        while !chunk.is_empty() {
            let (step, took) = self.frame.step(chunk);
            chunk = &chunk[took..];
            match step {
                Step::Announced(len) => {
                    self.holding.check_length(self.heartbeat, len)?;
                    unfinished += took;
                }
                Step::Held(n) => unfinished += n,
                Step::Completed => {
                    unfinished = 0;
                    self.holding.release();
                }
            }
        }
        if unfinished > 0 {
            self.holding.hold(unfinished)?;
        }
        Ok(())
    }
}

impl<B> Body for BudgetedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        // Every field is Unpin (the inner body by the bound).
        let this = self.get_mut();
        let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            Poll::Ready(Some(Err(err))) => {
                return Poll::Ready(Some(Err(Status::from_error(err.into()))));
            }
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => return Poll::Pending,
        };
        if let Some(data) = frame.data_ref() {
            let chunk = data.chunk();
            if let Err(status) = this.account(chunk) {
                this.holding.release();
                return Poll::Ready(Some(Err(status)));
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The tower layer that applies [`Budgets`] to every request.
#[derive(Debug, Clone)]
pub struct BudgetLayer {
    /// The shared budgets.
    budgets: Arc<Budgets>,
    /// Whether Heartbeat requests go to the Heartbeat route, which holds
    /// its streams to the budgets itself.
    heartbeat_route: bool,
}

impl BudgetLayer {
    /// A layer holding every request's body to `budgets`.
    pub fn new(budgets: Arc<Budgets>) -> Self {
        Self {
            budgets,
            heartbeat_route: false,
        }
    }

    /// Leaves Heartbeat bodies to the Heartbeat route
    /// (`service::RegistryRoute`), handing it their budgets: only for a
    /// server that serves Heartbeat through it, or those streams would be
    /// held to no budget.
    pub fn with_heartbeat_route(mut self) -> Self {
        self.heartbeat_route = true;
        self
    }
}

impl<S> tower::Layer<S> for BudgetLayer {
    type Service = BudgetService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        BudgetService {
            inner,
            budgets: self.budgets.clone(),
            heartbeat_route: self.heartbeat_route,
        }
    }
}

/// [`BudgetLayer`]'s service.
#[derive(Debug, Clone)]
pub struct BudgetService<S> {
    /// The service the wrapped requests go to.
    inner: S,
    /// The shared budgets.
    budgets: Arc<Budgets>,
    /// See [`BudgetLayer::with_heartbeat_route`].
    heartbeat_route: bool,
}

impl<S, B> tower::Service<http::Request<B>> for BudgetService<S>
where
    S: tower::Service<http::Request<tonic::body::Body>>,
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        self.inner
            .call(self.budgets.wrap(request, self.heartbeat_route))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> BudgetLimits {
        BudgetLimits {
            max_message: 1000,
            max_heartbeat_message: 100,
            per_connection: 1500,
            global: 2500,
        }
    }

    /// A prefix announcing `len` payload bytes.
    fn prefix(len: u32) -> Vec<u8> {
        let mut p = vec![0u8];
        p.extend_from_slice(&len.to_be_bytes());
        p
    }

    fn body(budgets: &Arc<Budgets>, port: u16) -> BudgetedBody<http_body_util::Empty<Bytes>> {
        let address = SocketAddr::from(([127, 0, 0, 1], port));
        BudgetedBody {
            inner: http_body_util::Empty::new(),
            holding: Holding::new(budgets.connection(Some(address))),
            heartbeat: false,
            frame: FrameReader::default(),
        }
    }

    #[test]
    fn framing_is_read_across_any_chunking() {
        let budgets = Budgets::new(limits());
        let mut message = prefix(10);
        message.extend_from_slice(&[7; 10]);
        message.extend(prefix(0));
        message.extend(prefix(3));
        message.extend_from_slice(&[1, 2, 3]);
        for split in 1..message.len() {
            let mut b = body(&budgets, 1);
            for chunk in message.chunks(split) {
                b.account(chunk).unwrap();
            }
            assert_eq!(
                b.holding.held, 0,
                "complete messages hold nothing (chunks of {split})"
            );
            assert_eq!(budgets.held(), 0);
        }
    }

    #[test]
    fn a_heartbeat_may_not_announce_more_than_its_limit() {
        let budgets = Budgets::new(limits());
        let heartbeat = Holding::new(budgets.connection(None));
        heartbeat.check_length(true, 100).unwrap();
        let err = heartbeat.check_length(true, 101).unwrap_err();
        assert_eq!(err.code(), tonic::Code::OutOfRange);
        assert!(
            err.message().contains("Heartbeat message of 101 bytes"),
            "{}",
            err.message()
        );
        assert!(err.message().contains("--max-heartbeat-message-size"));
        // Register-sized messages are fine on other methods.
        // A wrapped Heartbeat body (no route) is held to the same limit.
        let mut wrapped = body(&budgets, 1);
        wrapped.heartbeat = true;
        assert_eq!(
            wrapped.account(&prefix(101)).unwrap_err().code(),
            tonic::Code::OutOfRange
        );
        let mut b = body(&budgets, 1);
        b.account(&prefix(101)).unwrap();
        let err = body(&budgets, 1).account(&prefix(1001)).unwrap_err();
        assert!(
            err.message().contains("--max-message-size"),
            "{}",
            err.message()
        );
    }

    #[test]
    fn unfinished_messages_count_against_the_connection_and_are_given_back() {
        let budgets = Budgets::new(limits());
        let mut first = body(&budgets, 1);
        first.account(&prefix(1000)).unwrap();
        first.account(&[0; 900]).unwrap();
        assert_eq!(budgets.held(), 905);
        let mut second = body(&budgets, 1);
        second.account(&prefix(1000)).unwrap();
        let err = second.account(&[0; 600]).unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        assert!(
            err.message()
                .contains("--max-buffered-bytes-per-connection"),
            "{}",
            err.message()
        );
        // Another connection is not affected.
        let mut other = body(&budgets, 2);
        other.account(&prefix(1000)).unwrap();
        other.account(&[0; 600]).unwrap();
        // The first message completes: its bytes are given back.
        first.account(&[0; 100]).unwrap();
        drop(second);
        drop(other);
        assert_eq!(budgets.held(), 0);
    }

    #[test]
    fn the_server_wide_budget_bounds_all_connections_together() {
        let budgets = Budgets::new(limits());
        let mut bodies: Vec<_> = (0..3).map(|port| body(&budgets, port)).collect();
        bodies[0].account(&prefix(1000)).unwrap();
        bodies[0].account(&[0; 995]).unwrap();
        bodies[1].account(&prefix(1000)).unwrap();
        bodies[1].account(&[0; 995]).unwrap();
        bodies[2].account(&prefix(1000)).unwrap();
        let err = bodies[2].account(&[0; 600]).unwrap_err();
        assert!(
            err.message().contains("--max-buffered-bytes)"),
            "{}",
            err.message()
        );
        // What the refused chunk would have held was not kept anywhere.
        assert_eq!(budgets.held(), 2005);
        drop(bodies);
        assert_eq!(budgets.held(), 0);
    }

    #[test]
    fn a_holding_follows_what_its_stream_keeps_and_gives_all_back_when_dropped() {
        let budgets = Budgets::new(limits());
        let mut holding = HeartbeatBudget::of(&budgets, None).holding();
        holding.hold_exactly(700).unwrap();
        holding.hold_exactly(1200).unwrap();
        assert_eq!(budgets.held(), 1200);
        holding.hold_exactly(300).unwrap();
        assert_eq!(budgets.held(), 300, "what it no longer keeps is given back");
        let err = holding.hold_exactly(1600).unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        assert_eq!(budgets.held(), 300, "a refusal keeps what was held");
        drop(holding);
        assert_eq!(budgets.held(), 0);
    }

    #[test]
    fn dead_connection_entries_are_swept() {
        let budgets = Budgets::new(limits());
        for port in 0..5000 {
            drop(budgets.connection(Some(SocketAddr::from(([127, 0, 0, 1], port)))));
        }
        let live = budgets.connections.lock().unwrap().by_address.len();
        assert!(live < 2048, "{live} entries kept for closed connections");
    }
}
