//! How the registry serves gRPC over its connections: hyper's HTTP/2
//! server under the registry's tower stack (tonic's routes, the gRPC
//! metrics and the budgets), with TLS from `tokio-rustls`.
//!
//! Why not tonic's `Server`: hyper runs every request stream as a task
//! that holds the service's response future inline for the stream's whole
//! life. Under tonic's server that future type is a `tower::Oneshot`
//! holding the whole request (~300 bytes) until it is called, so every
//! open Heartbeat stream, which lives as long as its agent, kept a task of
//! 512 bytes. Here the future is boxed (16 bytes in the task) and the box
//! is freed once the response starts, which puts the task in 256 bytes.
//!
//! What tonic's server did is kept, each in one place below: its HTTP/2
//! settings, the connection's address (and client certificate) in every
//! request's extensions, the `grpc-timeout` deadline shortened to the
//! server's request timeout, errors answered as gRPC statuses, and a
//! graceful shutdown that stops accepting, sends GOAWAY and waits for the
//! open connections.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt as _};
use http::{HeaderMap, Request, Response};
use http_body_util::{Either, Empty};
use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tonic::body::Body;
use tonic::transport::server::{Connected, TcpConnectInfo, TlsConnectInfo};
use tower::ServiceExt as _;
use tracing::debug;

use crate::connection_threads::{ConnectionThreads, Rehome};

/// An error from the stack or the transport, as tonic and hyper take them.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A response body: the stack's, or the empty body of a status the
/// transport answers with (a deadline passed, an error from a layer).
type Answer<B> = Response<Either<B, Empty<Bytes>>>;

/// What the transport needs of the stack it serves (tonic's routes under
/// the registry's layers): a tower service from a tonic request body to a
/// response with a [`ReplyBody`], cloned per connection and per call, its
/// futures spawned on other threads.
pub trait Stack<B>:
    tower::Service<
        Request<Body>,
        Response = Response<B>,
        Error: Into<BoxError>,
        Future: Send + 'static,
    > + Clone
    + Send
    + Sync
    + 'static
{
}

impl<S, B> Stack<B> for S where
    S: tower::Service<
            Request<Body>,
            Response = Response<B>,
            Error: Into<BoxError>,
            Future: Send + 'static,
        > + Clone
        + Send
        + Sync
        + 'static
{
}

/// What the transport needs of a response body the stack answers with.
pub trait ReplyBody: http_body::Body<Data = Bytes, Error: Into<BoxError>> + Send + 'static {}

impl<B> ReplyBody for B where
    B: http_body::Body<Data = Bytes, Error: Into<BoxError>> + Send + 'static
{
}

/// The HTTP/2 settings of every connection.
#[derive(Debug, Clone, Copy)]
pub struct Http2Settings {
    /// How often the server pings an idle connection; pings find dead
    /// connections, they never count as a node's liveness.
    pub keepalive_interval: Duration,
    /// How long a ping may go unanswered before the connection is closed.
    pub keepalive_timeout: Duration,
    /// Streams one connection may have open (`--max-streams-per-connection`).
    pub max_concurrent_streams: u32,
    /// Streams a client may reset before the server accepted them, before
    /// the connection is torn down (h2's rapid-reset guard).
    pub max_pending_accept_reset_streams: usize,
    /// How long a call may take to start its response (a unary call's
    /// whole answer; a stream's response starts at once); a client's
    /// shorter `grpc-timeout` wins.
    pub request_timeout: Duration,
}

/// Why the TLS files cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The certificate file holds no readable PEM certificate.
    #[error("no certificate can be read from the certificate file: {0}")]
    Certificate(String),
    /// The key file holds no readable PEM private key.
    #[error("no private key can be read from the key file: {0}")]
    Key(String),
    /// The client CA file holds no readable PEM certificate.
    #[error("no CA certificate can be read from the client CA file: {0}")]
    ClientCa(String),
    /// rustls refused the combination (a key that does not match the
    /// certificate, an unusable CA).
    #[error("{0}")]
    Config(String),
}

/// The server's TLS: its certificate and key, and the CA its clients'
/// certificates must be signed by under mTLS.
#[derive(Clone)]
pub struct Tls {
    acceptor: tokio_rustls::TlsAcceptor,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").finish_non_exhaustive()
    }
}

impl Tls {
    /// TLS with the PEM certificate chain `cert` and private key `key`;
    /// with `client_ca`, every client must present a certificate signed by
    /// it (mTLS). Offers HTTP/2 only (ALPN `h2`), as gRPC needs.
    pub fn new(cert: &[u8], key: &[u8], client_ca: Option<&[u8]>) -> Result<Self, TlsError> {
        let chain = certificates(cert).map_err(TlsError::Certificate)?;
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| TlsError::Key(e.to_string()))?;
        let builder = rustls::ServerConfig::builder();
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in certificates(ca).map_err(TlsError::ClientCa)? {
                    roots
                        .add(cert)
                        .map_err(|e| TlsError::ClientCa(e.to_string()))?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
                    .build()
                    .map_err(|e| TlsError::ClientCa(e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder
            .with_single_cert(chain, key)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Self {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        })
    }
}

/// Every certificate in `pem`; an error when there is none.
fn certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let chain = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    if chain.is_empty() {
        return Err("no PEM CERTIFICATE block".into());
    }
    Ok(chain)
}

/// Serves `service` on each connection `incoming` yields (with `tls`, over
/// TLS) until `shutdown` completes; then stops accepting (the listener is
/// closed at once), asks every open connection to finish (GOAWAY: open
/// calls end, no new ones start) and returns once all have closed.
///
/// With `threads`, each connection is served on one of them (see
/// [`crate::connection_threads`]); the caller stops them
/// ([`ConnectionThreads::stop`]) once this returns or is given up on.
pub async fn serve<IO, S, B>(
    incoming: impl Stream<Item = IO> + Send,
    service: S,
    settings: Http2Settings,
    tls: Option<Tls>,
    threads: Option<&ConnectionThreads>,
    shutdown: impl Future<Output = ()>,
) where
    IO: AsyncRead
        + AsyncWrite
        + Connected<ConnectInfo = TcpConnectInfo>
        + Rehome
        + Unpin
        + Send
        + 'static,
    S: Stack<B>,
    B: ReplyBody,
{
    let connections = Arc::new(Connections {
        http2: http2_builder(&settings),
        tls,
        request_timeout: settings.request_timeout,
        stopped_accepting: CancellationToken::new(),
    });
    let graceful = GracefulShutdown::new();
    {
        // Dropped when accepting stops, which closes the listener: a client
        // arriving during the drain is refused instead of left hanging.
        let mut incoming = Box::pin(incoming);
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            let io = tokio::select! {
                () = &mut shutdown => break,
                io = incoming.next() => match io {
                    Some(io) => io,
                    None => break,
                },
            };
            // Taken here, before any await: a connection whose TLS handshake
            // ends just as shutdown begins is still told to finish (one
            // still in its handshake is dropped, see `stopped_accepting`).
            let watcher = graceful.watcher();
            let (connections, service) = (connections.clone(), service.clone());
            // Two task types, not one future with both paths: a task is as
            // large as its largest state, and a TLS session's (rustls'
            // buffers and state, several KiB) would otherwise be part of
            // every plaintext connection's.
            match connections.tls.clone() {
                None => {
                    let info = io.connect_info();
                    spawn_connection(threads, io, move |io| async move {
                        connections.serve_http2(io, info, service, watcher).await;
                    });
                }
                Some(tls) => {
                    spawn_connection(threads, io, move |io| async move {
                        connections.serve_tls(&tls, io, service, watcher).await;
                    });
                }
            }
        }
    }
    // Handshakes still under way are dropped rather than waited for.
    connections.stopped_accepting.cancel();
    debug!(
        connections = graceful.count(),
        "waiting for open connections to close"
    );
    graceful.shutdown().await;
}

/// Runs `serve(io)` as a task of its own: on the current runtime, or with
/// `threads` on one of them, where `io` is first moved to that thread's
/// runtime.
fn spawn_connection<IO, F, Fut>(threads: Option<&ConnectionThreads>, io: IO, serve: F)
where
    IO: Rehome + Send + 'static,
    F: FnOnce(IO) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let Some(threads) = threads else {
        tokio::spawn(serve(io));
        return;
    };
    threads.spawn(move || async move {
        match io.rehome() {
            Ok(io) => serve(io).await,
            Err(err) => debug!(error = %err, "connection dropped: it could not move to its thread"),
        }
    });
}

/// What every connection is served with.
struct Connections {
    /// hyper's HTTP/2 server settings.
    http2: http2::Builder<TokioExecutor>,
    /// TLS, when on.
    tls: Option<Tls>,
    /// See [`Http2Settings::request_timeout`]; also bounds a TLS handshake.
    request_timeout: Duration,
    /// Cancelled once the server stops accepting: a TLS handshake under way
    /// then ends (tonic's server dropped those too) instead of holding the
    /// shutdown until it finishes or times out.
    stopped_accepting: CancellationToken,
}

/// hyper's HTTP/2 server with `settings` and otherwise as tonic's server
/// had it: hyper's defaults for windows, frame and header list sizes, and
/// no cap on the streams the server resets over a connection's life. h2
/// counts every reset it sends there (a stream refused past
/// `max_concurrent_streams`, DATA on a closed stream) and never forgets
/// one, so with hyper's default of 1,024 a long-lived connection shared by
/// many agents would one day be torn down with all their streams.
fn http2_builder(settings: &Http2Settings) -> http2::Builder<TokioExecutor> {
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .keep_alive_interval(settings.keepalive_interval)
        .keep_alive_timeout(settings.keepalive_timeout)
        .max_concurrent_streams(settings.max_concurrent_streams)
        .max_pending_accept_reset_streams(settings.max_pending_accept_reset_streams)
        .max_local_error_reset_streams(None);
    builder
}

impl Connections {
    /// Serves one TLS connection until it closes (or, once shutdown began,
    /// until its open calls finish).
    async fn serve_tls<IO, S, B>(&self, tls: &Tls, io: IO, service: S, watcher: Watcher)
    where
        IO: AsyncRead
            + AsyncWrite
            + Connected<ConnectInfo = TcpConnectInfo>
            + Unpin
            + Send
            + 'static,
        S: Stack<B>,
        B: ReplyBody,
    {
        // The first bytes of the handshake are bounded by the connection
        // caps (`limits`); the rest of it by the request timeout.
        let handshake = tokio::time::timeout(self.request_timeout, tls.acceptor.accept(io));
        let accepted = tokio::select! {
            accepted = handshake => accepted,
            () = self.stopped_accepting.cancelled() => {
                debug!("TLS handshake dropped: the server is shutting down");
                return;
            }
        };
        match accepted {
            Ok(Ok(io)) => {
                // The client's certificate, for `Request::peer_certs`.
                let info = io.connect_info();
                self.serve_http2(io, info, service, watcher).await;
            }
            Ok(Err(err)) => debug!(error = %err, "TLS handshake failed"),
            Err(_) => debug!("TLS handshake not finished within the request timeout"),
        }
    }

    /// Serves HTTP/2 on `io`, whose connect info every request carries,
    /// until the connection closes (or, once shutdown began, until its open
    /// calls finish).
    async fn serve_http2<IO, C, S, B>(&self, io: IO, info: C, service: S, watcher: Watcher)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        C: ConnectInfo,
        S: Stack<B>,
        B: ReplyBody,
    {
        let calls = Calls {
            service,
            info,
            request_timeout: self.request_timeout,
        };
        let connection = self.http2.serve_connection(TokioIo::new(io), calls);
        if let Err(err) = watcher.watch(connection).await {
            debug!(error = %err, "connection ended with an error");
        }
    }
}

/// What a connection puts in each of its requests' extensions: tonic's
/// connect info, as tonic's server put it there, read by
/// `Request::remote_addr` and `peer_certs` and by the budgets.
trait ConnectInfo: Clone + Send + Sync + 'static {
    fn insert_into(&self, extensions: &mut http::Extensions);
}

impl ConnectInfo for TcpConnectInfo {
    fn insert_into(&self, extensions: &mut http::Extensions) {
        extensions.insert(self.clone());
    }
}

/// Both, as tonic's server inserted them for a TLS connection: the TCP
/// addresses alone too, for readers that look for those only.
impl ConnectInfo for TlsConnectInfo<TcpConnectInfo> {
    fn insert_into(&self, extensions: &mut http::Extensions) {
        extensions.insert(self.get_ref().clone());
        extensions.insert(self.clone());
    }
}

/// One connection's calls: each request goes through the stack.
struct Calls<S, C> {
    /// The stack (a clone per call, as tower services are called).
    service: S,
    /// The connection's address (and client certificate), put in every
    /// request's extensions where tonic's `Request::remote_addr` and
    /// `peer_certs` and the budgets read it.
    info: C,
    /// See [`Http2Settings::request_timeout`].
    request_timeout: Duration,
}

impl<S, C, B> hyper::service::Service<Request<Incoming>> for Calls<S, C>
where
    // The response type named once more: it is what ties `B` to `S` here.
    S: Stack<B> + tower::Service<Request<Body>, Response = Response<B>>,
    C: ConnectInfo,
    B: ReplyBody,
{
    type Response = Answer<B>;
    type Error = BoxError;
    /// Boxed: hyper keeps this future inside the stream's task for the
    /// stream's life (see the module's notes); the box holds the request
    /// only until the response starts.
    type Future = Pin<Box<dyn Future<Output = Result<Answer<B>, BoxError>> + Send>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let mut request = request.map(Body::new);
        self.info.insert_into(request.extensions_mut());
        let limit = call_limit(request.headers(), self.request_timeout);
        let call = self.service.clone().oneshot(request);
        Box::pin(async move {
            let answered = match tokio::time::timeout(limit, call).await {
                Ok(answered) => answered.map_err(Into::into),
                Err(_) => Err(tonic::TimeoutExpired(()).into()),
            };
            match answered {
                Ok(response) => Ok(response.map(Either::Left)),
                // A status from a layer, or CANCELLED for the deadline, as a
                // gRPC answer; anything else resets the stream.
                Err(err) => Status::try_from_error(err)
                    .map(|status| status.into_http::<Empty<Bytes>>().map(Either::Right)),
            }
        })
    }
}

/// The time a call has to start its response: the client's
/// `grpc-timeout`, when it sends a valid one, but no more than the
/// server's `request_timeout`.
fn call_limit(headers: &HeaderMap, request_timeout: Duration) -> Duration {
    headers
        .get("grpc-timeout")
        .and_then(|value| grpc_timeout(value.as_bytes()))
        .map_or(request_timeout, |client| client.min(request_timeout))
}

/// A `grpc-timeout` value as the gRPC over HTTP/2 spec writes it: at most
/// eight ASCII digits and a unit (`H`, `M`, `S`, `m`, `u`, `n`); `None`
/// for anything else, which is then ignored.
fn grpc_timeout(value: &[u8]) -> Option<Duration> {
    let (&unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let amount: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(amount * 60 * 60),
        b'M' => Duration::from_secs(amount * 60),
        b'S' => Duration::from_secs(amount),
        b'm' => Duration::from_millis(amount),
        b'u' => Duration::from_micros(amount),
        b'n' => Duration::from_nanos(amount),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_as_the_spec_writes_them() {
        let parsed = |v: &str| grpc_timeout(v.as_bytes());
        assert_eq!(parsed("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parsed("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parsed("30S"), Some(Duration::from_secs(30)));
        assert_eq!(parsed("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parsed("99999999u"), Some(Duration::from_micros(99_999_999)));
        assert_eq!(parsed("5n"), Some(Duration::from_nanos(5)));
        for bad in ["", "S", "123456789S", "1x", "-1S", "1.5S", " 1S", "1s"] {
            assert_eq!(parsed(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_shorter_of_the_client_and_server_deadlines_applies() {
        let server = Duration::from_secs(10);
        let mut headers = HeaderMap::new();
        assert_eq!(call_limit(&headers, server), server);
        headers.insert("grpc-timeout", "500m".parse().unwrap());
        assert_eq!(call_limit(&headers, server), Duration::from_millis(500));
        headers.insert("grpc-timeout", "1M".parse().unwrap());
        assert_eq!(call_limit(&headers, server), server);
        // A malformed deadline is ignored, not an error.
        headers.insert("grpc-timeout", "soon".parse().unwrap());
        assert_eq!(call_limit(&headers, server), server);
    }

    use std::convert::Infallible;
    use std::net::SocketAddr;
    use std::sync::Mutex;

    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::{Notify, oneshot};
    use tonic::transport::server::TcpConnectInfo;

    use crate::limits::{ConnectionLimits, incoming};

    /// A server on 127.0.0.1:0 whose every call answers once `release` is
    /// notified, naming the caller's address (from the connection info) in
    /// an `x-remote` header and the thread that answered in `x-thread`;
    /// stops when `stop` is sent.
    async fn server(
        request_timeout: Duration,
        release: Arc<Notify>,
    ) -> (SocketAddr, oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
        server_with(request_timeout, release, None, None).await
    }

    /// [`server`] with `tls`, and on `threads` when given (a new
    /// connection then has 500 ms for its handshake's first bytes).
    async fn server_with(
        request_timeout: Duration,
        release: Arc<Notify>,
        tls: Option<Tls>,
        threads: Option<ConnectionThreads>,
    ) -> (SocketAddr, oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handshake_within = match threads {
            Some(_) => Duration::from_millis(500),
            None => Duration::from_secs(10),
        };
        let limits = ConnectionLimits {
            max: 16,
            per_address: 16,
            handshake_within,
        };
        let service = tower::service_fn(move |request: Request<Body>| {
            let release = release.clone();
            async move {
                release.notified().await;
                let remote = request
                    .extensions()
                    .get::<TcpConnectInfo>()
                    .and_then(TcpConnectInfo::remote_addr)
                    .map_or_else(|| "none".to_string(), |a| a.to_string());
                let mut response = Status::ok("").into_http::<Body>();
                response
                    .headers_mut()
                    .insert("x-remote", remote.parse().unwrap());
                let thread = std::thread::current().name().unwrap_or("").to_owned();
                response
                    .headers_mut()
                    .insert("x-thread", thread.parse().unwrap());
                Ok::<_, Infallible>(response)
            }
        });
        let settings = Http2Settings {
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            max_concurrent_streams: 100,
            max_pending_accept_reset_streams: 100,
            request_timeout,
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let served = tokio::spawn(async move {
            serve(
                incoming(listener, limits),
                service,
                settings,
                tls,
                threads.as_ref(),
                async move {
                    let _ = stopped.await;
                },
            )
            .await;
            if let Some(threads) = threads {
                threads.stop().await;
            }
        });
        (addr, stop, served)
    }

    /// A gRPC call's response head over a new HTTP/2 connection, with
    /// `headers` added; and the client's own address.
    async fn call(
        addr: SocketAddr,
        headers: &[(&str, &str)],
    ) -> (h2::client::ResponseFuture, SocketAddr) {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let local = tcp.local_addr().unwrap();
        let (mut client, connection) = h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(connection);
        let mut request = Request::post(format!("http://{addr}/test.Echo/Call"))
            .header("content-type", "application/grpc")
            .header("te", "trailers");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let (response, _) = client
            .send_request(request.body(()).unwrap(), true)
            .unwrap();
        (response, local)
    }

    /// The `grpc-status` a trailers-only response carries.
    fn grpc_status(response: &Response<h2::RecvStream>) -> &str {
        response.headers()["grpc-status"].to_str().unwrap()
    }

    #[tokio::test]
    async fn a_call_past_its_deadline_ends_cancelled() {
        let never = Arc::new(Notify::new());
        let (addr, _stop, _served) = server(Duration::from_millis(300), never).await;
        // The server's timeout bounds a call that sends none...
        let (response, _) = call(addr, &[]).await;
        let response = response.await.unwrap();
        assert_eq!(grpc_status(&response), "1", "{response:?}");
        // ...and a client's shorter deadline wins.
        let (addr, _stop, _served) =
            server(Duration::from_secs(600), Arc::new(Notify::new())).await;
        let (response, _) = call(addr, &[("grpc-timeout", "50m")]).await;
        let response = response.await.unwrap();
        assert_eq!(grpc_status(&response), "1", "{response:?}");
        // Percent-encoded, as the spec has `grpc-message`.
        assert_eq!(response.headers()["grpc-message"], "Timeout%20expired");
    }

    #[tokio::test]
    async fn every_request_carries_its_connections_address() {
        let release = Arc::new(Notify::new());
        let (addr, _stop, _served) = server(Duration::from_secs(10), release.clone()).await;
        let (response, local) = call(addr, &[]).await;
        release.notify_one();
        let response = response.await.unwrap();
        assert_eq!(grpc_status(&response), "0");
        assert_eq!(response.headers()["x-remote"], local.to_string().as_str());
    }

    #[tokio::test]
    async fn shutdown_refuses_new_connections_and_waits_for_open_calls() {
        let release = Arc::new(Notify::new());
        let (addr, stop, served) = server(Duration::from_secs(10), release.clone()).await;
        let (open_call, _) = call(addr, &[]).await;
        // The call is in the service (waiting to be released) before the
        // shutdown starts.
        let answered = Arc::new(Mutex::new(None));
        let waiter = {
            let answered = answered.clone();
            tokio::spawn(async move {
                let response = open_call.await.unwrap();
                *answered.lock().unwrap() = Some(grpc_status(&response).to_string());
            })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        stop.send(()).unwrap();
        // The listener closes once accepting stops.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(addr).await.is_ok() {
            let now = tokio::time::Instant::now();
            assert!(
                now < deadline,
                "the listener still accepts after shutdown began"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            !served.is_finished(),
            "shutdown did not wait for the open call"
        );
        release.notify_one();
        waiter.await.unwrap();
        assert_eq!(answered.lock().unwrap().as_deref(), Some("0"));
        tokio::time::timeout(Duration::from_secs(10), served)
            .await
            .expect("serving ends once the open connection closed")
            .unwrap();
    }

    #[tokio::test]
    async fn shutdown_drops_a_tls_handshake_under_way() {
        use tokio::io::AsyncWriteExt as _;
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let tls = Tls::new(cert.pem().as_bytes(), key.serialize_pem().as_bytes(), None).unwrap();
        // A request timeout far past the test's: only shutdown can end the
        // handshake in time.
        let never = Arc::new(Notify::new());
        let (addr, stop, served) =
            server_with(Duration::from_secs(600), never, Some(tls), None).await;
        // A TLS record announcing a 508-byte ClientHello, and 40 bytes of it:
        // past the connection caps' first bytes, never finished.
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        let mut partial = vec![0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc];
        partial.extend([0u8; 36]);
        tcp.write_all(&partial).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), served)
            .await
            .expect("shutdown waited for a handshake that never finishes")
            .unwrap();
    }

    #[tokio::test]
    async fn connection_threads_serve_each_connection_on_the_least_busy_one() {
        let release = Arc::new(Notify::new());
        let threads = ConnectionThreads::start(std::num::NonZeroUsize::new(2).unwrap()).unwrap();
        let (addr, stop, served) = server_with(
            Duration::from_secs(10),
            release.clone(),
            None,
            Some(threads),
        )
        .await;
        // Two connections, each with a call held open in the service: the
        // second goes to the thread the first left idle.
        let (first, first_local) = call(addr, &[]).await;
        let (second, second_local) = call(addr, &[]).await;
        let answers = tokio::spawn(async move { (first.await, second.await) });
        tokio::time::sleep(Duration::from_millis(200)).await;
        // A shutdown under way still waits for the open calls.
        stop.send(()).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !served.is_finished(),
            "shutdown did not wait for the open calls"
        );
        release.notify_waiters();
        let (first, second) = answers.await.unwrap();
        let (first, second) = (first.unwrap(), second.unwrap());
        assert_eq!(grpc_status(&first), "0");
        assert_eq!(grpc_status(&second), "0");
        // Each request still carries its own connection's address.
        assert_eq!(
            first.headers()["x-remote"],
            first_local.to_string().as_str()
        );
        assert_eq!(
            second.headers()["x-remote"],
            second_local.to_string().as_str()
        );
        let mut answered_on =
            [&first, &second].map(|r| r.headers()["x-thread"].to_str().unwrap().to_owned());
        answered_on.sort();
        assert_eq!(answered_on, ["registry-conn-0", "registry-conn-1"]);
        tokio::time::timeout(Duration::from_secs(10), served)
            .await
            .expect("serving ends once the open connections closed")
            .unwrap();
    }

    #[tokio::test]
    async fn a_silent_connection_on_a_connection_thread_is_closed_at_its_handshake_deadline() {
        use tokio::io::AsyncReadExt as _;
        let threads = ConnectionThreads::start(std::num::NonZeroUsize::new(1).unwrap()).unwrap();
        let never = Arc::new(Notify::new());
        let (addr, _stop, _served) =
            server_with(Duration::from_secs(600), never, None, Some(threads)).await;
        // The deadline was set when the connection was accepted, on the main
        // runtime's timer; the thread's timer must end it (500 ms) on its
        // own. The server's SETTINGS come from the thread once the
        // connection is there; then this test's runtime (the main one, on
        // which the accept loop runs) is blocked in a plain read, so a
        // deadline left on its timer could not fire until the read gave up.
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 64];
        let first = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf))
            .await
            .expect("the server's SETTINGS within 5 s")
            .unwrap();
        assert!(first > 0, "the connection was closed before it was served");
        let mut tcp = tcp.into_std().unwrap();
        tcp.set_nonblocking(false).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let closed = loop {
            match std::io::Read::read(&mut tcp, &mut buf) {
                Ok(0) => break Ok(()),
                Ok(_) => {} // the rest of the server's first frames
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => break Err(err),
                Err(err) if err.kind() == std::io::ErrorKind::TimedOut => break Err(err),
                Err(_) => break Ok(()), // reset: closed too
            }
        };
        assert!(
            closed.is_ok(),
            "a connection that never spoke was not closed while the main runtime was blocked"
        );
    }

    #[test]
    fn unreadable_tls_files_say_which() {
        let err = Tls::new(b"not pem", b"", None).unwrap_err();
        assert!(matches!(err, TlsError::Certificate(_)), "{err}");
    }
}
