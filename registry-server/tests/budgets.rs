//! What unfinished messages may pin, through the real server: clients
//! speaking raw HTTP/2 announce large messages and stall part-way, which a
//! gRPC client cannot be made to do.

use std::time::Duration;

use bytes::Bytes;
use registry_proto::pb;
use registry_server::config::Settings;
use test_support::TestRegistry;
use tokio::net::TcpStream;

const HEARTBEAT: &str = "/registry.v1.NodeRegistry/Heartbeat";
const REGISTER: &str = "/registry.v1.NodeRegistry/Register";

/// A raw HTTP/2 connection to the registry.
async fn connect(registry: &TestRegistry) -> h2::client::SendRequest<Bytes> {
    let tcp = TcpStream::connect(registry.addr).await.unwrap();
    let (send, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    send.ready().await.unwrap()
}

/// Opens a gRPC call to `path` and sends `bytes` of its request body
/// without ending it.
async fn open(
    send: &mut h2::client::SendRequest<Bytes>,
    path: &str,
    bytes: Vec<u8>,
) -> (h2::client::ResponseFuture, h2::SendStream<Bytes>) {
    let request = http::Request::builder()
        .method("POST")
        .uri(format!("http://registry{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (response, mut body) = send.send_request(request, false).unwrap();
    body.reserve_capacity(bytes.len());
    body.send_data(Bytes::from(bytes), false).unwrap();
    (response, body)
}

/// The gRPC status the call ended with (from the headers of a
/// trailers-only answer, or the trailers), within 10 s.
async fn status_of(response: h2::client::ResponseFuture) -> (tonic::Code, String) {
    tokio::time::timeout(Duration::from_secs(10), async move {
        let response = response.await.unwrap();
        let from = |headers: &http::HeaderMap| {
            headers.get("grpc-status").map(|code| {
                let code = code.to_str().unwrap().parse::<i32>().unwrap();
                let message = headers
                    .get("grpc-message")
                    .map(|m| percent_decode(m.to_str().unwrap()))
                    .unwrap_or_default();
                (tonic::Code::from(code), message)
            })
        };
        if let Some(status) = from(response.headers()) {
            return status;
        }
        let mut body = response.into_body();
        while let Some(chunk) = body.data().await {
            chunk.unwrap();
        }
        let trailers = body.trailers().await.unwrap().unwrap();
        from(&trailers).unwrap()
    })
    .await
    .expect("the registry did not end the call")
}

/// grpc-message is percent-encoded.
fn percent_decode(text: &str) -> String {
    let mut out = Vec::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&text[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A gRPC length prefix announcing `len` bytes, then `sent` bytes of them.
fn partial(len: u32, sent: usize) -> Vec<u8> {
    let mut bytes = vec![0u8];
    bytes.extend_from_slice(&len.to_be_bytes());
    bytes.resize(5 + sent, 0);
    bytes
}

/// Budgets small enough that everything a test sends on one connection
/// fits HTTP/2's 1 MiB connection window, so flow control never decides
/// which stream's bytes arrive first.
fn settings() -> Settings {
    Settings {
        max_message_size: 256 * KIB,
        max_heartbeat_message_size: 16 * KIB,
        max_buffered_bytes_per_connection: 512 * KIB,
        max_buffered_bytes: 768 * KIB,
        ..Settings::default()
    }
}

const KIB: usize = 1024;

#[tokio::test]
async fn a_heartbeat_announcing_more_than_its_limit_ends_at_once() {
    let registry = TestRegistry::start(settings()).await;
    let mut send = connect(&registry).await;
    // Below --max-message-size, above the Heartbeat limit: refused as
    // soon as the prefix arrives, nothing of it held.
    let (response, _body) = open(&mut send, HEARTBEAT, partial(100 * 1024, 100)).await;
    let (code, message) = status_of(response).await;
    assert_eq!(code, tonic::Code::OutOfRange, "{message}");
    assert!(
        message.contains("--max-heartbeat-message-size"),
        "{message}"
    );
    registry.stop().await;
}

/// The Heartbeat route reads its framing itself; what its streams keep of
/// unfinished messages still counts against the connection's budget.
#[tokio::test]
async fn unfinished_heartbeats_are_bounded_per_connection() {
    let registry = TestRegistry::start(settings()).await;
    let mut send = connect(&registry).await;
    // 40 streams holding 15 KiB each (within the 16 KiB Heartbeat limit)
    // would hold 600 KiB, past the connection's 512 KiB: one is refused.
    let mut held = Vec::new();
    for _ in 0..40 {
        held.push(open(&mut send, HEARTBEAT, partial(16 * 1024, 15 * 1024)).await);
    }
    let (responses, _bodies): (Vec<_>, Vec<_>) = held.into_iter().unzip();
    let statuses = responses.into_iter().map(|r| Box::pin(status_of(r)));
    let ((code, message), _, _) = futures_util::future::select_all(statuses).await;
    assert_eq!(code, tonic::Code::ResourceExhausted, "{message}");
    assert!(
        message.contains("--max-buffered-bytes-per-connection"),
        "{message}"
    );
    registry.stop().await;
}

#[tokio::test]
async fn unfinished_registers_are_bounded_per_connection_and_others_still_register() {
    let registry = TestRegistry::start(settings()).await;
    let mut greedy = connect(&registry).await;
    // Two unfinished messages of 200 KiB so far fit the 512 KiB
    // connection budget...
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(open(&mut greedy, REGISTER, partial(250 * 1024, 200 * 1024)).await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // ...a third does not: it ends with RESOURCE_EXHAUSTED naming the budget.
    let (third, _body) = open(&mut greedy, REGISTER, partial(250 * 1024, 200 * 1024)).await;
    let (code, message) = status_of(third).await;
    assert_eq!(code, tonic::Code::ResourceExhausted, "{message}");
    assert!(
        message.contains("--max-buffered-bytes-per-connection"),
        "{message}"
    );

    // Another client registers meanwhile.
    let mut client = registry.client().await;
    client
        .register(pb::RegisterRequest {
            node_id: "gpu-1".into(),
            machine_id: "machine-gpu-1".into(),
            address: "http://gpu-1:9200".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    drop(held);
    registry.stop().await;
}

#[tokio::test]
async fn unfinished_messages_of_all_connections_share_one_budget() {
    let registry = TestRegistry::start(settings()).await;
    let mut held = Vec::new();
    // Two connections hold 360 KiB each (within their 512 KiB budgets): a
    // third connection's first 100 KiB pass its own budget but not the
    // 768 KiB server-wide one.
    let mut first = connect(&registry).await;
    let mut second = connect(&registry).await;
    for send in [&mut first, &mut second] {
        held.push(open(send, REGISTER, partial(250 * 1024, 180 * 1024)).await);
        held.push(open(send, REGISTER, partial(250 * 1024, 180 * 1024)).await);
    }
    // Let the server read what was sent.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut third = connect(&registry).await;
    let (response, _body) = open(&mut third, REGISTER, partial(250 * 1024, 100 * 1024)).await;
    let (code, message) = status_of(response).await;
    assert_eq!(code, tonic::Code::ResourceExhausted, "{message}");
    assert!(message.contains("--max-buffered-bytes)"), "{message}");
    drop(held);
    registry.stop().await;
}

/// A shared connection (a proxy in front of many agents, fleet-sim) whose
/// streams are cancelled in a burst before the registry accepted them is
/// not torn down: h2's default allows 20 such streams per connection, then
/// answers GOAWAY, which would drop every other stream on it at once.
#[tokio::test]
async fn a_burst_of_streams_cancelled_before_accept_keeps_the_connection() {
    let registry = TestRegistry::start(Settings::default()).await;
    let mut send = connect(&registry).await;
    // On this single-threaded runtime nothing is flushed or served until
    // the test yields: the 100 requests and their resets arrive together.
    for _ in 0..100 {
        let request = http::Request::builder()
            .method("POST")
            .uri(format!("http://registry{HEARTBEAT}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap();
        let (_response, mut body) = send.send_request(request, false).unwrap();
        body.send_reset(h2::Reason::CANCEL);
    }
    // The same connection still serves a call: a Register missing its node
    // id is refused by the registry, not by a dead connection.
    let mut send = send.ready().await.expect("the connection is still open");
    let (response, mut body) = open(&mut send, REGISTER, partial(0, 0)).await;
    body.send_data(Bytes::new(), true).unwrap();
    let (code, message) = status_of(response).await;
    assert_eq!(code, tonic::Code::InvalidArgument, "{message}");
}
