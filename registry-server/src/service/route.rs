//! The registry's own work in front of tonic's generated server.
//!
//! [`RegistryRoute`] takes two paths before the generated
//! `NodeRegistryServer` sees them; every other method goes straight through.
//! Neither accepts compression (as the generated server is built): a
//! `grpc-encoding` other than `identity` gets tonic's UNIMPLEMENTED.
//! - **Heartbeat** is served over the service's own framing
//!   ([`super::heartbeat_wire`]).
//! - **Register** is refused or given its turn (`crate::admission`)
//!   before its body is decoded. In a storm most calls are refused with a
//!   time to come back, and the generated server would decode each ~1.3 KB
//!   request first (~28,000 instructions, half of them copying some 60
//!   strings) only to drop it. Here the token and the replica's role are
//!   checked from the headers, and a call that would be refused on arrival
//!   (the queue full, or its turn too far off) is refused then, without
//!   its body: answered in the one poll its headers bring. Any other call
//!   has its body read to its end as bytes (bounded by the budgets of
//!   `crate::budget` and by `--max-message-size`) and only then takes its
//!   turn, so a client that sends its headers and stalls holds no turn.
//!   Only a call with its turn is handed on to be decoded, validated and
//!   registered. So in a storm a request that does not decode is refused
//!   RESOURCE_EXHAUSTED first and INVALID_ARGUMENT once it gets a turn,
//!   while a bad token is refused UNAUTHENTICATED before anything but
//!   compression.
//!
//! (Taking the turn before reading the body measured better in the
//! 50,000-agent storm, but let a client that stalls its body hold a turn
//! for up to the request timeout; docs/PERF-NOTES.md item 4.)

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::Either;
use http::HeaderMap;
use http_body::Frame;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited, StreamBody};
use tonic::Status;
use tonic::body::Body;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::server::NamedService;
use tower::Service;

use super::NodeRegistryService;
use crate::admission::Admitted;
use crate::auth::Rpc;
use crate::budget::{HEARTBEAT_PATH, PREFIX, announced_length};
use crate::error::RegistryError;

/// Register's path, as the generated server routes it.
pub const REGISTER_PATH: &str = "/registry.v1.NodeRegistry/Register";

/// In a Register request's extensions when [`RegistryRoute`] holds the
/// call's turn, so the handler does not take a second one. Only the server
/// puts it there: a client cannot send extensions.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TurnTaken;

/// Heartbeat and Register's turn served by [`NodeRegistryService`] itself;
/// every other method by `generated` (see the module's notes).
#[derive(Clone)]
pub struct RegistryRoute<S> {
    /// The generated server, for every other method and for Register once
    /// it has its turn.
    generated: S,
    /// The service whose streams and turns these are; behind an `Arc`
    /// because tonic's router clones the route for every call.
    service: Arc<NodeRegistryService>,
}

impl<S> RegistryRoute<S> {
    /// Routes Heartbeat and Register's turn to `service` itself and the
    /// rest to `generated` (the generated server of the same service).
    pub fn new(generated: S, service: NodeRegistryService) -> Self {
        Self {
            generated,
            service: Arc::new(service),
        }
    }
}

impl<S: NamedService> NamedService for RegistryRoute<S> {
    const NAME: &'static str = S::NAME;
}

/// A Register call: its turn, then the generated server's answer.
type RegisterCall = Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

impl<S> Service<http::Request<Body>> for RegistryRoute<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Either<
        std::future::Ready<Result<Self::Response, Infallible>>,
        Either<S::Future, RegisterCall>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.generated.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let path = request.uri().path();
        let (heartbeat, register) = (path == HEARTBEAT_PATH, path == REGISTER_PATH);
        if !heartbeat && !register {
            return Either::Right(Either::Left(self.generated.call(request)));
        }
        if let Some(refused) = compressed(request.headers()) {
            return Either::Left(std::future::ready(Ok(refused.into_http())));
        }
        if heartbeat {
            return Either::Left(std::future::ready(Ok(self
                .service
                .heartbeat_route(request))));
        }
        // The service made ready is the one to call; a clone takes its
        // place here (tower's rule for calling from a future).
        let clone = self.generated.clone();
        let mut generated = std::mem::replace(&mut self.generated, clone);
        let service = self.service.clone();
        Either::Right(Either::Right(Box::pin(async move {
            let (request, turn) = match service.register_turn(request).await {
                Ok(admitted) => admitted,
                Err(refused) => return Ok(refused.into_http()),
            };
            let answer = generated.call(request).await;
            // Held until the answer, as the handler would hold it.
            drop(turn);
            answer
        })))
    }
}

/// tonic's refusal of a compressed request, where `headers` announce one.
fn compressed(headers: &HeaderMap) -> Option<Status> {
    let encoding = headers.get("grpc-encoding")?;
    if encoding == "identity" {
        return None;
    }
    let name = match encoding.to_str() {
        Ok(name) => name.to_owned(),
        Err(_) => format!("{encoding:?}"),
    };
    let mut status = Status::unimplemented(format!(
        "Content is compressed with `{name}` which isn't supported"
    ));
    // What the client may send instead, as tonic says it.
    let identity = MetadataValue::from_static("identity");
    status
        .metadata_mut()
        .insert("grpc-accept-encoding", identity);
    Some(status)
}

impl NodeRegistryService {
    /// Register's refusals that need only the headers (the token, this
    /// replica's role), then its body read whole, then the call's turn:
    /// the request to hand on, its body as bytes and marked
    /// [`TurnTaken`], with the turn.
    async fn register_turn(
        &self,
        request: http::Request<Body>,
    ) -> Result<(http::Request<Body>, Admitted), Status> {
        let (mut parts, body) = request.into_parts();
        // The headers lent to the token check as metadata, not copied.
        let metadata = MetadataMap::from_headers(std::mem::take(&mut parts.headers));
        let authorized = self.auth.authorize(&metadata, Rpc::Register);
        parts.headers = metadata.into_headers();
        authorized.map_err(RegistryError::from)?;
        self.role.writable()?;
        // A call that would be refused on arrival is refused now, before
        // its body is read: in a storm most are, and each is then answered
        // in the one poll of its stream that its headers bring.
        self.admission.refuse_early()?;
        let body = read_whole(body, self.max_message).await?;
        let turn = self.admission.take_turn().await?;
        parts.extensions.insert(TurnTaken);
        Ok((http::Request::from_parts(parts, body), turn))
    }
}

/// A unary request's body to its end, to hand on: its bytes, and its
/// trailers where it has any (tonic reads them into the request's
/// metadata). At most one message of `max_message` bytes with its prefix;
/// the budgets in front refuse a message announced longer (and one that
/// would overrun them) as it comes. A body that does not hold one whole
/// message (empty, or cut short) is refused here rather than after a turn.
async fn read_whole(body: Body, max_message: usize) -> Result<Body, Status> {
    let limit = max_message.saturating_add(PREFIX);
    let whole = match Limited::new(body, limit).collect().await {
        Ok(whole) => whole,
        Err(err) if err.is::<LengthLimitError>() => {
            return Err(Status::out_of_range(format!(
                "the Register request is longer than one message of --max-message-size ({max_message} bytes)"
            )));
        }
        Err(err) => return Err(Status::from_error(err)),
    };
    let trailers = whole.trailers().cloned();
    let bytes = whole.to_bytes();
    if !holds_a_whole_message(&bytes) {
        return Err(Status::invalid_argument(format!(
            "the Register request is not a whole gRPC message ({} bytes)",
            bytes.len()
        )));
    }
    Ok(match trailers {
        None => Body::new(Full::new(bytes)),
        Some(trailers) => Body::new(StreamBody::new(futures_util::stream::iter([
            Ok::<_, Infallible>(Frame::data(bytes)),
            Ok(Frame::trailers(trailers)),
        ]))),
    })
}

/// Whether `bytes` start with a whole gRPC message: its prefix and as
/// many bytes as the prefix announces.
fn holds_a_whole_message(bytes: &[u8]) -> bool {
    bytes
        .first_chunk::<PREFIX>()
        .is_some_and(|prefix| bytes.len() - PREFIX >= announced_length(prefix) as usize)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use bytes::Bytes;

    use http::HeaderValue;
    use tower::ServiceExt as _;

    use super::*;
    use crate::auth::{Authenticator, TokenSources};

    /// A service with one Register running at a time and `max_queued`
    /// queued, `auth` checking its tokens, and messages of at most
    /// `max_message`.
    fn one_at_a_time_of(
        auth: Authenticator,
        max_message: usize,
        max_queued: usize,
    ) -> NodeRegistryService {
        let settings = crate::config::Settings {
            max_concurrent_registrations: 1,
            max_queued_registrations: max_queued,
            max_message_size: max_message,
            ..crate::config::Settings::default()
        };
        NodeRegistryService::new(
            crate::registry::Registry::new(settings.timing()),
            &settings,
            auth,
            tokio_util::sync::CancellationToken::new(),
            crate::placement::PlacementIndex::new(),
        )
    }

    fn one_at_a_time(auth: Authenticator) -> NodeRegistryService {
        one_at_a_time_of(auth, 4 << 20, 0)
    }

    /// `service` behind the route, with a stand-in for the generated
    /// server that counts its calls (the count beside it) and answers OK,
    /// saying whether the route had taken the call's turn.
    fn routed(
        service: NodeRegistryService,
    ) -> (
        RegistryRoute<
            impl Service<
                http::Request<Body>,
                Response = http::Response<Body>,
                Error = Infallible,
                Future = impl Send,
            > + Clone
            + Send,
        >,
        Arc<AtomicUsize>,
    ) {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let generated = tower::service_fn(move |request: http::Request<Body>| {
            counted.fetch_add(1, Ordering::SeqCst);
            let taken = request.extensions().get::<TurnTaken>().is_some();
            async move {
                let mut response = http::Response::new(Body::empty());
                let taken = HeaderValue::from_static(if taken { "yes" } else { "no" });
                response.headers_mut().insert("x-turn-taken", taken);
                Ok::<_, Infallible>(response)
            }
        });
        (RegistryRoute::new(generated, service), calls)
    }

    /// A Register request whose body is not a RegisterRequest at all.
    fn register_of_garbage(token: Option<&'static str>) -> http::Request<Body> {
        let garbage = Bytes::from_static(b"\0\0\0\0\x05\xff\xff\xff\xff\xff");
        register_with(token, Body::new(Full::new(garbage)))
    }

    /// A Register request of `body`, with `token` if any.
    fn register_with(token: Option<&'static str>, body: Body) -> http::Request<Body> {
        let mut request = http::Request::builder()
            .uri(format!("http://registry{REGISTER_PATH}"))
            .body(body)
            .unwrap();
        if let Some(token) = token {
            let bearer = HeaderValue::from_str(&format!("Bearer {token}")).unwrap();
            request.headers_mut().insert("authorization", bearer);
        }
        request
    }

    #[tokio::test]
    async fn a_register_without_a_turn_is_refused_before_its_body_is_decoded() {
        let service = one_at_a_time(Authenticator::open());
        let held = service.admission.admit().await.unwrap();
        let (route, calls) = routed(service);

        let response = route
            .clone()
            .oneshot(register_of_garbage(None))
            .await
            .unwrap();
        assert_eq!(response.headers()["grpc-status"], "8", "RESOURCE_EXHAUSTED");
        assert_eq!(calls.load(Ordering::SeqCst), 0, "never handed on");

        // With the turn free the call goes on, marked as holding it (the
        // generated server's handler then takes no second turn).
        drop(held);
        let response = route.oneshot(register_of_garbage(None)).await.unwrap();
        assert_eq!(response.headers()["x-turn-taken"], "yes");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    // A paused clock: the refusal below must come within 10 ms of the call
    // let through, however slow the machine.
    #[tokio::test(start_paused = true)]
    async fn a_register_arriving_while_the_runtimes_lag_is_refused_before_its_body_is_read() {
        let lag = crate::lag::RuntimeLag::new(1);
        let service = one_at_a_time_of(Authenticator::open(), 4 << 20, 4)
            .with_lag(lag.clone(), Duration::from_millis(10));
        let (route, calls) = routed(service);

        lag.record(0, Duration::from_millis(80));
        // The first call while lagging passes (one in every 10 ms does).
        let response = route
            .clone()
            .oneshot(register_of_garbage(None))
            .await
            .unwrap();
        assert_eq!(response.headers()["x-turn-taken"], "yes");
        // A body that never ends: refused all the same, so it was never read.
        let body = Body::new(http_body_util::StreamBody::new(
            futures_util::stream::pending::<Result<http_body::Frame<Bytes>, Status>>(),
        ));
        let response = tokio::time::timeout(
            Duration::from_secs(5),
            route.clone().oneshot(register_with(None, body)),
        )
        .await
        .expect("answered from the headers")
        .unwrap();
        assert_eq!(response.headers()["grpc-status"], "8", "RESOURCE_EXHAUSTED");
        let message = response.headers()["grpc-message"].to_str().unwrap();
        assert!(
            message.contains("--max-registration-lag"),
            "the refusal names the flag: {message}"
        );
        assert!(
            response.headers().contains_key("grpc-status-details-bin"),
            "with a retry time"
        );
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "the refused call never handed on"
        );

        // Caught up: the next call goes on.
        lag.record(0, Duration::ZERO);
        let response = route.oneshot(register_of_garbage(None)).await.unwrap();
        assert_eq!(response.headers()["x-turn-taken"], "yes");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_bad_token_is_refused_as_such_even_when_no_turn_is_free() {
        let auth = Authenticator::from_sources(TokenSources {
            file: None,
            admin_token: Some("the-admin-token-of-this-test".into()),
        })
        .unwrap();
        let service = one_at_a_time(auth);
        let _held = service.admission.admit().await.unwrap();
        let (route, calls) = routed(service);

        for token in [None, Some("not-a-token")] {
            let response = route
                .clone()
                .oneshot(register_of_garbage(token))
                .await
                .unwrap();
            assert_eq!(response.headers()["grpc-status"], "16", "UNAUTHENTICATED");
        }
        let response = route
            .oneshot(register_of_garbage(Some("the-admin-token-of-this-test")))
            .await
            .unwrap();
        assert_eq!(response.headers()["grpc-status"], "8", "RESOURCE_EXHAUSTED");
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn the_turn_is_held_until_the_answer() {
        let service = one_at_a_time(Authenticator::open());
        let admission = service.admission.clone();
        let answer = Arc::new(tokio::sync::Semaphore::new(0));
        let slow = {
            let answer = answer.clone();
            tower::service_fn(move |_request: http::Request<Body>| {
                let answer = answer.clone();
                async move {
                    let _go = answer.acquire().await.unwrap();
                    Ok::<_, Infallible>(http::Response::new(Body::empty()))
                }
            })
        };
        let route = RegistryRoute::new(slow, service);
        let call = tokio::spawn(route.oneshot(register_of_garbage(None)));
        let running = async {
            while admission.in_flight() == 0 {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), running)
            .await
            .expect("the call takes its turn");
        tokio::task::yield_now().await;
        assert_eq!(admission.in_flight(), 1, "held while the handler runs");
        answer.add_permits(1);
        call.await.unwrap().unwrap();
        assert_eq!(admission.in_flight(), 0, "given back with the answer");
    }

    #[tokio::test]
    async fn a_register_whose_body_stalls_holds_no_turn() {
        let service = one_at_a_time(Authenticator::open());
        let admission = service.admission.clone();
        let (route, calls) = routed(service);

        // Headers, then nothing: the body never ends.
        let never = futures_util::stream::pending::<Result<http_body::Frame<Bytes>, Status>>();
        let stalled = register_with(None, Body::new(http_body_util::StreamBody::new(never)));
        let stalled = tokio::spawn(route.clone().oneshot(stalled));
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(admission.in_flight(), 0, "no turn while the body comes");
        assert_eq!(admission.waiting(), 0);

        // The one turn is free for a call whose body came.
        let response = route.oneshot(register_of_garbage(None)).await.unwrap();
        assert_eq!(response.headers()["x-turn-taken"], "yes");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(!stalled.is_finished());
        stalled.abort();
    }

    #[tokio::test]
    async fn a_call_that_would_be_refused_is_refused_before_its_body_comes() {
        let service = one_at_a_time(Authenticator::open());
        let _held = service.admission.admit().await.unwrap();
        let (route, calls) = routed(service);

        // No turn free and no place in the queue: refused on its headers,
        // though its body never comes.
        let never = futures_util::stream::pending::<Result<http_body::Frame<Bytes>, Status>>();
        let request = register_with(None, Body::new(http_body_util::StreamBody::new(never)));
        let response = tokio::time::timeout(Duration::from_secs(5), route.oneshot(request))
            .await
            .expect("answered without the body")
            .unwrap();
        assert_eq!(response.headers()["grpc-status"], "8", "RESOURCE_EXHAUSTED");
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    }

    /// Sends `body` as a Register while the one turn is held and one
    /// place in the queue is free, and returns the answer's status and
    /// message: a call refused for its body answers at once, taking
    /// neither the place nor a refusal's retry slot.
    async fn refused_for_its_body(max_message: usize, body: Vec<u8>) -> (String, String) {
        let service = one_at_a_time_of(Authenticator::open(), max_message, 1);
        let admission = service.admission.clone();
        let _held = admission.admit().await.unwrap();
        let (route, calls) = routed(service);
        let request = register_with(None, Body::new(Full::new(Bytes::from(body))));
        let response = tokio::time::timeout(Duration::from_secs(5), route.oneshot(request))
            .await
            .expect("answered without waiting for a turn")
            .unwrap();
        assert_eq!(admission.waiting(), 0);
        assert_eq!(admission.refused(), 0);
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        let header = |name| response.headers()[name].to_str().unwrap().to_owned();
        // (grpc-message is percent-encoded; these messages hold only spaces.)
        let message = header("grpc-message").replace("%20", " ");
        (header("grpc-status"), message)
    }

    #[tokio::test]
    async fn a_body_longer_than_one_message_is_refused_without_a_turn() {
        // Two whole messages of 16 bytes: each within the limit, together
        // longer than one.
        let mut two = Vec::new();
        for _ in 0..2 {
            two.extend_from_slice(&[0, 0, 0, 0, 16]);
            two.extend_from_slice(&[0x0a; 16]);
        }
        let (code, message) = refused_for_its_body(16, two).await;
        assert_eq!(code, "11", "OUT_OF_RANGE");
        assert!(message.contains("max-message-size"), "{message}");

        // One message of 16 bytes is handed on.
        let service = one_at_a_time_of(Authenticator::open(), 16, 0);
        let (route, calls) = routed(service);
        let mut one = vec![0, 0, 0, 0, 16];
        one.extend_from_slice(&[0x0a; 16]);
        let request = register_with(None, Body::new(Full::new(Bytes::from(one))));
        let response = route.oneshot(request).await.unwrap();
        assert_eq!(response.headers()["x-turn-taken"], "yes");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_body_without_a_whole_message_is_refused_without_a_turn() {
        let cut_short = vec![0, 0, 0, 0, 16, 0x0a, 0x02];
        for body in [vec![], vec![0, 0, 0], cut_short] {
            let (code, message) = refused_for_its_body(4 << 20, body).await;
            assert_eq!(code, "3", "INVALID_ARGUMENT");
            assert!(message.contains("not a whole gRPC message"), "{message}");
        }
    }

    #[tokio::test]
    async fn a_bodys_trailers_are_handed_on() {
        let service = one_at_a_time(Authenticator::open());
        let reads = tower::service_fn(|request: http::Request<Body>| async move {
            let whole = request.into_body().collect().await.unwrap();
            let trailer = whole.trailers().and_then(|t| t.get("x-trailer")).cloned();
            let mut response = http::Response::new(Body::empty());
            if let Some(trailer) = trailer {
                response.headers_mut().insert("x-trailer-seen", trailer);
            }
            Ok::<_, Infallible>(response)
        });
        let route = RegistryRoute::new(reads, service);
        let mut trailers = HeaderMap::new();
        trailers.insert("x-trailer", HeaderValue::from_static("kept"));
        let frames = futures_util::stream::iter([
            Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"\0\0\0\0\x01\x0a"))),
            Ok(Frame::trailers(trailers)),
        ]);
        let request = register_with(None, Body::new(StreamBody::new(frames)));
        let response = route.oneshot(request).await.unwrap();
        assert_eq!(response.headers()["x-trailer-seen"], "kept");
    }

    #[tokio::test]
    async fn a_compressed_register_is_refused_unimplemented_without_a_turn() {
        let service = one_at_a_time(Authenticator::open());
        let _held = service.admission.admit().await.unwrap();
        let (route, calls) = routed(service);

        let mut request = register_of_garbage(None);
        let gzip = HeaderValue::from_static("gzip");
        request.headers_mut().insert("grpc-encoding", gzip);
        let response = route.oneshot(request).await.unwrap();
        assert_eq!(response.headers()["grpc-status"], "12", "UNIMPLEMENTED");
        assert_eq!(response.headers()["grpc-accept-encoding"], "identity");
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    }
}
