//! The registry's own work in front of tonic's generated server.
//!
//! [`RegistryRoute`] takes two paths before the generated
//! `NodeRegistryServer` sees them; every other method goes straight through:
//! - **Heartbeat** is served over the service's own framing
//!   ([`super::heartbeat_wire`]).
//! - **Register** takes its turn (`crate::admission`) before its body is
//!   decoded. In a storm most calls are refused with a time to come back,
//!   and the generated server would decode each ~1.3 KB request first
//!   (~28,000 instructions, half of them copying some 60 strings) only to
//!   drop it. Here the token and the replica's role are checked from the
//!   headers, the turn is taken, and only a call with its turn is handed on
//!   to be decoded, validated and registered. A queued call waits with its
//!   body still in h2's buffers, bounded by `--max-queued-registrations`.
//!   So in a storm a malformed request is refused RESOURCE_EXHAUSTED first
//!   and INVALID_ARGUMENT once its turn comes, as a bad token is refused
//!   UNAUTHENTICATED before any turn.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::Either;
use http::HeaderMap;
use tonic::Status;
use tonic::body::Body;
use tonic::metadata::MetadataMap;
use tonic::server::NamedService;
use tower::Service;

use super::NodeRegistryService;
use crate::admission::Admitted;
use crate::auth::Rpc;
use crate::budget::HEARTBEAT_PATH;
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

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        match request.uri().path() {
            HEARTBEAT_PATH => Either::Left(std::future::ready(Ok(self
                .service
                .heartbeat_route(request)))),
            REGISTER_PATH => {
                // The service made ready is the one to call; a clone takes
                // its place here (tower's rule for calling from a future).
                let clone = self.generated.clone();
                let mut generated = std::mem::replace(&mut self.generated, clone);
                let service = self.service.clone();
                Either::Right(Either::Right(Box::pin(async move {
                    let turn = match service.register_turn(request.headers()).await {
                        Ok(turn) => turn,
                        Err(refused) => return Ok(refused.into_http()),
                    };
                    request.extensions_mut().insert(TurnTaken);
                    let answer = generated.call(request).await;
                    // Held until the answer, as the handler would hold it.
                    drop(turn);
                    answer
                })))
            }
            _ => Either::Right(Either::Left(self.generated.call(request))),
        }
    }
}

impl NodeRegistryService {
    /// Register's refusals that need only the headers (the token, this
    /// replica's role), then the call's turn.
    async fn register_turn(&self, headers: &HeaderMap) -> Result<Admitted, Status> {
        let metadata = MetadataMap::from_headers(headers.clone());
        self.auth
            .authorize(&metadata, Rpc::Register)
            .map_err(RegistryError::from)?;
        self.role.writable()?;
        Ok(self.admission.admit().await?)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http::HeaderValue;
    use tower::ServiceExt as _;

    use super::*;
    use crate::auth::{Authenticator, TokenSources};

    /// A service with one Register running at a time and none queued, and
    /// `auth` checking its tokens.
    fn one_at_a_time(auth: Authenticator) -> NodeRegistryService {
        let settings = crate::config::Settings {
            max_concurrent_registrations: 1,
            max_queued_registrations: 0,
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

    /// A stand-in for the generated server: counts its calls and answers
    /// OK, saying whether the route had taken the call's turn.
    fn generated(
        calls: Arc<AtomicUsize>,
    ) -> impl Service<
        http::Request<Body>,
        Response = http::Response<Body>,
        Error = Infallible,
        Future = impl Send,
    > + Clone
    + Send {
        tower::service_fn(move |request: http::Request<Body>| {
            calls.fetch_add(1, Ordering::SeqCst);
            let taken = request.extensions().get::<TurnTaken>().is_some();
            async move {
                let mut response = http::Response::new(Body::empty());
                let taken = HeaderValue::from_static(if taken { "yes" } else { "no" });
                response.headers_mut().insert("x-turn-taken", taken);
                Ok::<_, Infallible>(response)
            }
        })
    }

    /// A Register request whose body is not a RegisterRequest at all.
    fn register_of_garbage(token: Option<&'static str>) -> http::Request<Body> {
        let mut request = http::Request::builder()
            .uri(format!("http://registry{REGISTER_PATH}"))
            .body(Body::new(http_body_util::Full::new(
                bytes::Bytes::from_static(b"\0\0\0\0\x05\xff\xff\xff\xff\xff"),
            )))
            .unwrap();
        if let Some(token) = token {
            let bearer = HeaderValue::from_str(&format!("Bearer {token}")).unwrap();
            request.headers_mut().insert("authorization", bearer);
        }
        request
    }

    #[tokio::test]
    async fn a_register_without_a_turn_is_refused_before_its_body_is_read() {
        let service = one_at_a_time(Authenticator::open());
        let held = service.admission.admit().await.unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let route = RegistryRoute::new(generated(calls.clone()), service);

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

    #[tokio::test]
    async fn a_bad_token_is_refused_as_such_even_when_no_turn_is_free() {
        let auth = Authenticator::from_sources(TokenSources {
            file: None,
            admin_token: Some("the-admin-token-of-this-test".into()),
        })
        .unwrap();
        let service = one_at_a_time(auth);
        let _held = service.admission.admit().await.unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let route = RegistryRoute::new(generated(calls.clone()), service);

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
        tokio::time::timeout(std::time::Duration::from_secs(5), running)
            .await
            .expect("the call takes its turn");
        tokio::task::yield_now().await;
        assert_eq!(admission.in_flight(), 1, "held while the handler runs");
        answer.add_permits(1);
        call.await.unwrap().unwrap();
        assert_eq!(admission.in_flight(), 0, "given back with the answer");
    }
}
