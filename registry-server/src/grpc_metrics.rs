//! Per-RPC metrics with go-grpc-prometheus' names and labels, as a tower
//! [`Layer`] on the tonic server:
//!
//! - `grpc_server_started_total{grpc_type,grpc_service,grpc_method}`: calls
//!   started;
//! - `grpc_server_handled_total{grpc_type,grpc_service,grpc_method,grpc_code}`:
//!   calls finished, by status (`OK`, `InvalidArgument`, ... in
//!   go-grpc-prometheus' spelling; a call whose response body is dropped
//!   before its status was sent counts as `Canceled`);
//! - `grpc_server_handling_seconds{grpc_type,grpc_service,grpc_method}`:
//!   histogram of unary calls, from the request to the status.
//!
//! The status is read where gRPC puts it: in the response headers of a
//! trailers-only response (most errors), else in the trailers at the end of
//! the body, which the layer wraps to see them. A heartbeat stream counts
//! once, when it opens and when it ends: per message the wrapper only asks
//! whether a frame is the trailers.
//!
//! Every method of the registry's file descriptor set (the registry, health
//! and reflection services) is registered up front with all its label sets,
//! so the hot path looks the path up in a map and bumps cached handles; only
//! a path the descriptors do not know (answered `Unimplemented`) builds its
//! handles per call.
//!
//! One concern in one file (~390 lines of code); its unit tests, which need
//! the private body wrapper, make it longer.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use http_body::{Body, Frame, SizeHint};
use metrics::{Counter, Histogram, counter, histogram};
use prost::Message;
use tower::{Layer, Service};

/// Calls started.
pub const STARTED: &str = "grpc_server_started_total";
/// Calls finished, by code.
pub const HANDLED: &str = "grpc_server_handled_total";
/// Latency of unary calls, in seconds.
pub const HANDLING_SECONDS: &str = "grpc_server_handling_seconds";

/// Histogram buckets of unary calls: go-grpc-prometheus' defaults
/// (Prometheus' default buckets), 5 ms to 10 s.
pub const HANDLING_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// gRPC status codes 0..=16 as go-grpc-prometheus spells them (Go's
/// `codes.Code.String()`).
pub const CODE_NAMES: [&str; 17] = [
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];

/// Index of `Canceled` in [`CODE_NAMES`].
const CANCELED: usize = 1;
/// Index of `Unknown` in [`CODE_NAMES`], for a status that is no number.
const UNKNOWN: usize = 2;

/// The kind of call, as go-grpc-prometheus names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrpcType {
    /// One request, one response.
    Unary,
    /// One request, a stream of responses.
    ServerStream,
    /// A stream of requests, one response.
    ClientStream,
    /// Streams both ways (the heartbeat).
    BidiStream,
}

impl GrpcType {
    /// From a method's streaming flags.
    pub fn of(client_streaming: bool, server_streaming: bool) -> Self {
        match (client_streaming, server_streaming) {
            (false, false) => GrpcType::Unary,
            (false, true) => GrpcType::ServerStream,
            (true, false) => GrpcType::ClientStream,
            (true, true) => GrpcType::BidiStream,
        }
    }

    /// The `grpc_type` label value.
    pub fn label(self) -> &'static str {
        match self {
            GrpcType::Unary => "unary",
            GrpcType::ServerStream => "server_stream",
            GrpcType::ClientStream => "client_stream",
            GrpcType::BidiStream => "bidi_stream",
        }
    }
}

/// The cached handles of one method.
struct MethodMetrics {
    /// `grpc_server_started_total` of the method.
    started: Counter,
    /// `grpc_server_handled_total` per code, indexed by the code's number.
    handled: [Counter; 17],
    /// `grpc_server_handling_seconds`, for unary methods only.
    latency: Option<Histogram>,
}

impl MethodMetrics {
    /// Registers every series of `service`/`method` with the recorder.
    fn register(grpc_type: GrpcType, service: &str, method: &str) -> Self {
        let labels = [
            ("grpc_type", grpc_type.label().to_owned()),
            ("grpc_service", service.to_owned()),
            ("grpc_method", method.to_owned()),
        ];
        let handled = CODE_NAMES.map(|code| {
            let mut with_code = labels.to_vec();
            with_code.push(("grpc_code", code.to_owned()));
            counter!(HANDLED, &with_code)
        });
        MethodMetrics {
            started: counter!(STARTED, &labels),
            handled,
            latency: (grpc_type == GrpcType::Unary).then(|| histogram!(HANDLING_SECONDS, &labels)),
        }
    }
}

/// The methods' handles by request path (`/registry.v1.NodeRegistry/Register`).
#[derive(Clone)]
pub struct GrpcMetricsLayer {
    /// Handles per known path; built once, read-only afterwards.
    methods: Arc<HashMap<String, Arc<MethodMetrics>>>,
}

impl std::fmt::Debug for GrpcMetricsLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcMetricsLayer")
            .field("methods", &self.methods.len())
            .finish()
    }
}

/// Why the descriptors could not be read.
#[derive(Debug, thiserror::Error)]
#[error("file descriptor set: {0}")]
pub struct DescriptorError(#[from] prost::DecodeError);

impl GrpcMetricsLayer {
    /// A layer knowing every method of the encoded file descriptor sets
    /// (those the server also hands to reflection). Registers their series
    /// with the global recorder, so they export zero before the first call.
    pub fn from_descriptor_sets(sets: &[&[u8]]) -> Result<Self, DescriptorError> {
        let mut methods = HashMap::new();
        for encoded in sets {
            let set = prost_types::FileDescriptorSet::decode(*encoded)?;
            for file in set.file {
                let package = file.package();
                for service in &file.service {
                    let full = if package.is_empty() {
                        service.name().to_owned()
                    } else {
                        format!("{package}.{}", service.name())
                    };
                    for method in &service.method {
                        let grpc_type =
                            GrpcType::of(method.client_streaming(), method.server_streaming());
                        methods.insert(
                            format!("/{full}/{}", method.name()),
                            Arc::new(MethodMetrics::register(grpc_type, &full, method.name())),
                        );
                    }
                }
            }
        }
        Ok(GrpcMetricsLayer {
            methods: Arc::new(methods),
        })
    }

    /// The handles of `path`: cached, or built now for an unknown path
    /// (counted as unary, the way a client calling it would).
    fn lookup(&self, path: &str) -> Arc<MethodMetrics> {
        if let Some(known) = self.methods.get(path) {
            return Arc::clone(known);
        }
        let trimmed = path.trim_start_matches('/');
        let (service, method) = trimmed.rsplit_once('/').unwrap_or(("unknown", trimmed));
        Arc::new(MethodMetrics::register(GrpcType::Unary, service, method))
    }
}

impl<S> Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetrics {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`GrpcMetricsLayer`] wraps around the server's routes.
#[derive(Clone)]
pub struct GrpcMetrics<S> {
    /// The routes.
    inner: S,
    /// The handles.
    layer: GrpcMetricsLayer,
}

impl<S> std::fmt::Debug for GrpcMetrics<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcMetrics").finish_non_exhaustive()
    }
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for GrpcMetrics<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
{
    type Response = http::Response<ObservedBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let method = self.layer.lookup(request.uri().path());
        method.started.increment(1);
        ResponseFuture {
            inner: self.inner.call(request),
            observer: Some(Observer {
                method,
                started: Instant::now(),
                done: false,
            }),
        }
    }
}

/// Records the call's end once: at the status, or as `Canceled` when
/// dropped before one was seen.
struct Observer {
    /// The method's handles.
    method: Arc<MethodMetrics>,
    /// When the call began, for the unary histogram.
    started: Instant,
    /// Whether the end is recorded.
    done: bool,
}

impl Observer {
    /// Records the end with code number `code`.
    fn finish(&mut self, code: usize) {
        if self.done {
            return;
        }
        self.done = true;
        self.method.handled[code.min(CODE_NAMES.len() - 1)].increment(1);
        if let Some(latency) = &self.method.latency {
            latency.record(self.started.elapsed().as_secs_f64());
        }
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.finish(CANCELED);
    }
}

/// The code of a `grpc-status` header, if `headers` hold one.
fn status_code(headers: &http::HeaderMap) -> Option<usize> {
    let value = headers.get("grpc-status")?;
    Some(
        std::str::from_utf8(value.as_bytes())
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|code| *code < CODE_NAMES.len())
            .unwrap_or(UNKNOWN),
    )
}

pin_project_lite::pin_project! {
    /// The routes' response future; on the response, records a
    /// trailers-only status or hands the observer to the body.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        observer: Option<Observer>,
    }
}

impl<F, ResBody, E> std::future::Future for ResponseFuture<F>
where
    F: std::future::Future<Output = Result<http::Response<ResBody>, E>>,
{
    type Output = Result<http::Response<ObservedBody<ResBody>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        let mut observer = this.observer.take();
        let response = match result {
            Ok(response) => response,
            Err(err) => {
                // The transport fails the call without any status.
                if let Some(observer) = observer.as_mut() {
                    observer.finish(UNKNOWN);
                }
                return Poll::Ready(Err(err));
            }
        };
        if let Some(code) = status_code(response.headers()) {
            if let Some(observer) = observer.as_mut() {
                observer.finish(code);
            }
            observer = None;
        }
        Poll::Ready(Ok(response.map(|inner| ObservedBody { inner, observer })))
    }
}

pin_project_lite::pin_project! {
    /// A response body that records the status of its trailers.
    pub struct ObservedBody<B> {
        #[pin]
        inner: B,
        observer: Option<Observer>,
    }
}

impl<B: Body> Body for ObservedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        if let Some(observer) = this.observer.as_mut() {
            match &frame {
                // Per message: one branch, nothing recorded.
                Some(Ok(frame)) if frame.is_data() => {}
                Some(Ok(frame)) => {
                    if let Some(code) = frame.trailers_ref().and_then(status_code) {
                        observer.finish(code);
                    }
                }
                Some(Err(_)) => observer.finish(UNKNOWN),
                // The body ended without a status in its trailers.
                None => observer.finish(UNKNOWN),
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;

    use metrics_exporter_prometheus::PrometheusBuilder;

    use super::*;

    /// A streaming response body: `messages` data frames, then trailers
    /// with `grpc-status: 0`.
    struct Messages {
        /// Data frames still to send.
        left: usize,
        /// Whether the trailers were sent.
        ended: bool,
    }

    impl Body for Messages {
        type Data = &'static [u8];
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
            if self.left > 0 {
                self.left -= 1;
                return Poll::Ready(Some(Ok(Frame::data(&b"ack"[..]))));
            }
            if self.ended {
                return Poll::Ready(None);
            }
            self.ended = true;
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
            Poll::Ready(Some(Ok(Frame::trailers(trailers))))
        }
    }

    /// Routes that answer every call with a stream of `messages` acks.
    struct Streams {
        /// Acks per stream.
        messages: usize,
    }

    impl Service<http::Request<()>> for Streams {
        type Response = http::Response<Messages>;
        type Error = std::convert::Infallible;
        type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<()>) -> Self::Future {
            std::future::ready(Ok(http::Response::new(Messages {
                left: self.messages,
                ended: false,
            })))
        }
    }

    /// The value of one sample line in `text`.
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
    }

    #[tokio::test]
    async fn a_stream_counts_once_and_its_messages_record_nothing() {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let layer = metrics::with_local_recorder(&recorder, || {
            GrpcMetricsLayer::from_descriptor_sets(&[registry_proto::FILE_DESCRIPTOR_SET])
        })
        .unwrap();
        let mut service = layer.layer(Streams { messages: 1000 });
        let request = http::Request::builder()
            .uri("/registry.v1.NodeRegistry/Heartbeat")
            .body(())
            .unwrap();
        let mut body = service.call(request).await.unwrap().into_body();
        let labels = "grpc_type=\"bidi_stream\",grpc_service=\"registry.v1.NodeRegistry\",grpc_method=\"Heartbeat\"";
        let handled_ok = format!("grpc_server_handled_total{{{labels},grpc_code=\"OK\"}}");
        let started = format!("grpc_server_started_total{{{labels}}}");
        let mut data_frames = 0;
        while let Some(frame) = poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
            if frame.unwrap().is_data() {
                data_frames += 1;
                if data_frames == 500 {
                    // Mid-stream: started once, nothing handled yet.
                    let text = handle.render();
                    assert_eq!(sample(&text, &started), Some(1.0), "{text}");
                    assert_eq!(sample(&text, &handled_ok), Some(0.0), "{text}");
                }
            }
        }
        assert_eq!(data_frames, 1000);
        drop(body);
        let text = handle.render();
        assert_eq!(sample(&text, &started), Some(1.0), "{text}");
        assert_eq!(sample(&text, &handled_ok), Some(1.0), "{text}");
        let canceled = format!("grpc_server_handled_total{{{labels},grpc_code=\"Canceled\"}}");
        assert_eq!(
            sample(&text, &canceled),
            Some(0.0),
            "dropped after its status: {text}"
        );
    }

    #[tokio::test]
    async fn a_stream_dropped_before_its_status_counts_as_canceled() {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let layer = metrics::with_local_recorder(&recorder, || {
            GrpcMetricsLayer::from_descriptor_sets(&[registry_proto::FILE_DESCRIPTOR_SET])
        })
        .unwrap();
        let mut service = layer.layer(Streams { messages: 10 });
        let request = http::Request::builder()
            .uri("/registry.v1.NodeRegistry/Heartbeat")
            .body(())
            .unwrap();
        let mut body = service.call(request).await.unwrap().into_body();
        poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
        drop(body);
        let text = handle.render();
        let canceled = "grpc_server_handled_total{grpc_type=\"bidi_stream\",grpc_service=\"registry.v1.NodeRegistry\",grpc_method=\"Heartbeat\",grpc_code=\"Canceled\"}";
        assert_eq!(sample(&text, canceled), Some(1.0), "{text}");
    }

    #[test]
    fn codes_are_spelled_like_go_grpc_prometheus() {
        for (number, name) in CODE_NAMES.iter().enumerate() {
            let code = tonic::Code::from_i32(number as i32);
            // tonic's Debug spelling is Go's, except "Ok" and "Cancelled".
            let tonic_name = match format!("{code:?}").as_str() {
                "Ok" => "OK".to_owned(),
                "Cancelled" => "Canceled".to_owned(),
                other => other.to_owned(),
            };
            assert_eq!(*name, tonic_name, "code {number}");
        }
    }

    #[test]
    fn the_status_header_is_read_as_a_code() {
        let mut headers = http::HeaderMap::new();
        assert_eq!(status_code(&headers), None);
        headers.insert("grpc-status", http::HeaderValue::from_static("5"));
        assert_eq!(status_code(&headers), Some(5));
        headers.insert("grpc-status", http::HeaderValue::from_static("99"));
        assert_eq!(status_code(&headers), Some(UNKNOWN));
    }

    #[test]
    fn the_registry_descriptors_give_every_method_its_type() {
        let layer = GrpcMetricsLayer::from_descriptor_sets(&[
            registry_proto::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
        ])
        .unwrap();
        for path in [
            "/registry.v1.NodeRegistry/Register",
            "/registry.v1.NodeRegistry/Heartbeat",
            "/grpc.health.v1.Health/Watch",
        ] {
            assert!(layer.methods.contains_key(path), "{path}");
        }
        assert!(
            layer.methods["/registry.v1.NodeRegistry/Register"]
                .latency
                .is_some()
        );
        assert!(
            layer.methods["/registry.v1.NodeRegistry/Heartbeat"]
                .latency
                .is_none()
        );
    }
}
