//! Hostile input through the real gRPC server, table-driven. For every case:
//! the exact status code, a message that names the problem, the server still
//! serving, and a witness node left exactly as it was.

mod common;

use std::time::Duration;

use common::{Stream, register, serving};
use registry_proto::pb;
use registry_proto::pb::node_registry_client::NodeRegistryClient;
use registry_server::Settings;
use test_support::{
    Session, TestRegistry,
    fixtures::{beat, register_request},
};
use tokio::io::AsyncWriteExt;
use tonic::Code;
use tonic::transport::Channel;

/// Builds a case's heartbeat messages from the session of node "beater".
type MakeBeats = dyn Fn(&Session) -> Vec<pb::HeartbeatRequest>;

/// What a case sends.
enum Call {
    Register(pb::RegisterRequest),
    Deregister(pb::DeregisterRequest),
    Get(pb::GetNodeRequest),
    List(pb::ListNodesRequest),
    /// Heartbeat messages on one fresh stream; the session of node "beater"
    /// is passed in so cases can use (or misuse) it.
    Beats(Box<MakeBeats>),
}

struct Case {
    name: &'static str,
    call: Call,
    code: Code,
    /// Text the status message must contain.
    says: &'static str,
}

fn reg(
    name: &'static str,
    code: Code,
    says: &'static str,
    f: impl FnOnce(&mut pb::RegisterRequest),
) -> Case {
    let mut request = register_request("victim");
    f(&mut request);
    Case {
        name,
        call: Call::Register(request),
        code,
        says,
    }
}

fn beats(
    name: &'static str,
    says: &'static str,
    code: Code,
    f: impl Fn(&Session) -> Vec<pb::HeartbeatRequest> + 'static,
) -> Case {
    Case {
        name,
        call: Call::Beats(Box::new(f)),
        code,
        says,
    }
}

/// One bad beat as the stream's first message.
fn bad_beat(
    name: &'static str,
    says: &'static str,
    f: impl Fn(&mut pb::HeartbeatRequest) + 'static,
) -> Case {
    beats(name, says, Code::InvalidArgument, move |session| {
        let mut request = beat("beater", session, 1);
        f(&mut request);
        vec![request]
    })
}

fn ts(seconds: i64, nanos: i32) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp { seconds, nanos })
}

fn cases() -> Vec<Case> {
    use Code::*;
    let pool = |id: &str| pb::PoolSpec {
        pool_id: id.into(),
        ..Default::default()
    };
    let now = chrono::Utc::now().timestamp();
    vec![
        reg("empty node_id", InvalidArgument, "node_id", |r| {
            r.node_id.clear()
        }),
        reg("oversized node_id", InvalidArgument, "node_id", |r| {
            r.node_id = "a".repeat(64)
        }),
        reg("huge node_id", InvalidArgument, "node_id", |r| {
            r.node_id = "a".repeat(100_000)
        }),
        reg("uppercase node_id", InvalidArgument, "node_id", |r| {
            r.node_id = "GPU-1".into()
        }),
        reg("path in node_id", InvalidArgument, "node_id", |r| {
            r.node_id = "../etc".into()
        }),
        reg("unicode node_id", InvalidArgument, "node_id", |r| {
            r.node_id = "gpü".into()
        }),
        reg("leading hyphen", InvalidArgument, "node_id", |r| {
            r.node_id = "-gpu".into()
        }),
        reg("nul in node_id", InvalidArgument, "node_id", |r| {
            r.node_id = "gpu\0".into()
        }),
        reg("empty machine_id", InvalidArgument, "machine_id", |r| {
            r.machine_id.clear()
        }),
        reg("long machine_id", InvalidArgument, "machine_id", |r| {
            r.machine_id = "m".repeat(129)
        }),
        reg("space in machine_id", InvalidArgument, "machine_id", |r| {
            r.machine_id = "a b".into()
        }),
        reg("empty address", InvalidArgument, "address", |r| {
            r.address.clear()
        }),
        reg("invalid URL", InvalidArgument, "address", |r| {
            r.address = "not a url".into()
        }),
        reg("ftp URL", InvalidArgument, "address", |r| {
            r.address = "ftp://h/".into()
        }),
        reg("URL without host", InvalidArgument, "address", |r| {
            r.address = "http://".into()
        }),
        reg("port above 65535", InvalidArgument, "address", |r| {
            r.address = "http://host:65536".into()
        }),
        reg("IPv6 port above 65535", InvalidArgument, "address", |r| {
            r.address = "http://[::1]:99999".into()
        }),
        reg("credentials in the URL", InvalidArgument, "address", |r| {
            r.address = "http://user:pass@host:9200".into()
        }),
        reg("long URL", InvalidArgument, "address", |r| {
            r.address = format!("http://h/{}", "p".repeat(3000))
        }),
        reg("10,000 pools", InvalidArgument, "pools", |r| {
            r.pools = (0..10_000).map(|i| pool(&format!("p{i}"))).collect()
        }),
        reg("65 pools", InvalidArgument, "has 65 entries", |r| {
            r.pools = (0..65).map(|i| pool(&format!("p{i}"))).collect()
        }),
        reg(
            "duplicate pool ids",
            InvalidArgument,
            "pools[1].pool_id",
            |r| r.pools = vec![pool("a"), pool("a")],
        ),
        reg("empty pool id", InvalidArgument, "pools[0].pool_id", |r| {
            r.pools = vec![pool("")]
        }),
        reg(
            "pool id with space",
            InvalidArgument,
            "pools[0].pool_id",
            |r| r.pools = vec![pool("a b")],
        ),
        reg("long model name", InvalidArgument, "pools[0].model", |r| {
            r.pools[0].model = "m".repeat(300)
        }),
        reg("1 MiB label", OutOfRange, "--max-message-size", |r| {
            r.labels.insert("big".into(), "x".repeat(1 << 20));
        }),
        reg(
            "long label value",
            InvalidArgument,
            "labels[\"big\"]",
            |r| {
                r.labels.insert("big".into(), "x".repeat(300));
            },
        ),
        reg("65 labels", InvalidArgument, "labels", |r| {
            r.labels = (0..65).map(|i| (format!("k{i}"), String::new())).collect()
        }),
        reg("bad label key", InvalidArgument, "label keys", |r| {
            r.labels.insert("a key".into(), "v".into());
        }),
        reg("65 GPUs", InvalidArgument, "capabilities.gpus", |r| {
            let gpu = r.capabilities.as_ref().unwrap().gpus[0].clone();
            r.capabilities.as_mut().unwrap().gpus = (0..65)
                .map(|index| pb::GpuInfo {
                    index,
                    ..gpu.clone()
                })
                .collect();
        }),
        reg(
            "duplicate GPU index",
            InvalidArgument,
            "capabilities.gpus[1].index",
            |r| {
                let caps = r.capabilities.as_mut().unwrap();
                caps.gpus.push(caps.gpus[0].clone());
            },
        ),
        reg(
            "bad compute capability",
            InvalidArgument,
            "compute_capability",
            |r| r.capabilities.as_mut().unwrap().gpus[0].compute_capability = "nine".into(),
        ),
        reg(
            "control chars in agent_version",
            InvalidArgument,
            "agent_version",
            |r| r.agent_version = "v1\n\x1b[31m".into(),
        ),
        reg(
            "long GPU name",
            InvalidArgument,
            "capabilities.gpus[0].name",
            |r| r.capabilities.as_mut().unwrap().gpus[0].name = "n".repeat(1000),
        ),
        reg(
            "message over the size limit",
            OutOfRange,
            "--max-message-size",
            |r| r.agent_version = "v".repeat(2 << 20),
        ),
        reg(
            "takeover of a live node",
            AlreadyExists,
            "registered from another machine",
            |r| {
                r.node_id = "witness".into();
                r.machine_id = "intruder".into();
            },
        ),
        beats(
            "heartbeat before register",
            "call Register first",
            NotFound,
            |_| vec![beat("ghost", &Session::forged(7), 1)],
        ),
        bad_beat("first beat without node_id", "node_id", |b| {
            b.node_id.clear()
        }),
        bad_beat("first beat without session", "session_id", |b| {
            b.session_id = 0
        }),
        beats(
            "first beat without session_secret",
            "requires its session_secret",
            PermissionDenied,
            |session| {
                let mut request = beat("beater", session, 1);
                request.session_secret.clear();
                vec![request]
            },
        ),
        beats(
            "first beat with a wrong session_secret",
            "does not match",
            PermissionDenied,
            |session| {
                let mut request = beat("beater", session, 1);
                request.session_secret = "0".repeat(32);
                vec![request]
            },
        ),
        beats(
            "a second message switching session_secret",
            "cannot switch sessions",
            InvalidArgument,
            |session| {
                let mut second = beat("beater", session, 2);
                second.session_secret = "f".repeat(32);
                vec![beat("beater", session, 1), second]
            },
        ),
        beats(
            "beat with a wrong session",
            "superseded",
            FailedPrecondition,
            |session| {
                vec![beat(
                    "beater",
                    &Session {
                        id: session.id.wrapping_add(1),
                        ..session.clone()
                    },
                    1,
                )]
            },
        ),
        beats(
            "a second message switching node_id",
            "cannot switch nodes",
            InvalidArgument,
            |session| vec![beat("beater", session, 1), beat("witness", session, 2)],
        ),
        beats(
            "a second message switching session",
            "cannot switch sessions",
            InvalidArgument,
            |session| {
                vec![
                    beat("beater", session, 1),
                    beat(
                        "beater",
                        &Session {
                            id: session.id.wrapping_add(9),
                            ..session.clone()
                        },
                        2,
                    ),
                ]
            },
        ),
        bad_beat("slots_free > slots_total", "pools[0].slots_free", |b| {
            b.pools[0].slots_free = 5
        }),
        bad_beat("unknown pool state", "pools[0].state", |b| {
            b.pools[0].state = 99
        }),
        bad_beat("negative pool state", "pools[0].state", |b| {
            b.pools[0].state = -1
        }),
        bad_beat("unspecified pool state", "pools[0].state", |b| {
            b.pools[0].state = 0
        }),
        bad_beat("duplicate pool status", "pools[1].pool_id", |b| {
            b.pools.push(b.pools[0].clone())
        }),
        bad_beat("65 pool statuses", "pools", |b| {
            b.pools = vec![b.pools[0].clone(); 65]
        }),
        // Refused from its length prefix, before it is buffered.
        beats(
            "10,000 pool statuses (a heartbeat over its size limit)",
            "--max-heartbeat-message-size",
            Code::OutOfRange,
            |session| {
                let mut request = beat("beater", session, 1);
                request.pools = vec![request.pools[0].clone(); 10_000];
                vec![request]
            },
        ),
        bad_beat("timestamp far in the future", "sent_at", move |b| {
            b.sent_at = ts(now + 2 * 86_400, 0)
        }),
        bad_beat("timestamp far in the past", "sent_at", |b| {
            b.sent_at = ts(0, 0)
        }),
        bad_beat("timestamp out of range", "sent_at", |b| {
            b.sent_at = ts(i64::MAX, 0)
        }),
        bad_beat("timestamp with bad nanos", "sent_at", |b| {
            b.sent_at = ts(0, -1)
        }),
        bad_beat("missing timestamp", "sent_at", |b| b.sent_at = None),
        bad_beat(
            "utilisation above 100",
            "gpus[0].utilization_percent",
            |b| {
                b.gpus = vec![pb::GpuStats {
                    utilization_percent: 250,
                    ..Default::default()
                }]
            },
        ),
        Case {
            name: "deregister of an unknown node",
            call: Call::Deregister(pb::DeregisterRequest {
                node_id: "ghost".into(),
                ..Default::default()
            }),
            code: NotFound,
            says: "ghost",
        },
        Case {
            name: "deregister with an invalid id",
            call: Call::Deregister(pb::DeregisterRequest {
                node_id: "Ghost!".into(),
                ..Default::default()
            }),
            code: InvalidArgument,
            says: "node_id",
        },
        Case {
            name: "deregister with another session",
            call: Call::Deregister(pb::DeregisterRequest {
                node_id: "witness".into(),
                session_id: 1,
                ..Default::default()
            }),
            code: FailedPrecondition,
            says: "superseded",
        },
        Case {
            name: "get of an unknown node",
            call: Call::Get(pb::GetNodeRequest {
                node_id: "ghost".into(),
            }),
            code: NotFound,
            says: "ghost",
        },
        Case {
            name: "get with an empty id",
            call: Call::Get(pb::GetNodeRequest {
                node_id: String::new(),
            }),
            code: InvalidArgument,
            says: "node_id",
        },
        Case {
            name: "list with an unknown status",
            call: Call::List(pb::ListNodesRequest {
                status: 7,
                ..Default::default()
            }),
            code: InvalidArgument,
            says: "status",
        },
        Case {
            name: "list with a bad page token",
            call: Call::List(pb::ListNodesRequest {
                page_token: "\u{0}x".into(),
                ..Default::default()
            }),
            code: InvalidArgument,
            says: "page_token",
        },
        Case {
            name: "list with a long pool id",
            call: Call::List(pb::ListNodesRequest {
                pool_id: "p".repeat(100),
                ..Default::default()
            }),
            code: InvalidArgument,
            says: "pool_id",
        },
    ]
}

async fn run(
    client: &mut NodeRegistryClient<Channel>,
    call: &Call,
    session: &Session,
) -> tonic::Status {
    match call {
        Call::Register(r) => client.register(r.clone()).await.unwrap_err(),
        Call::Deregister(r) => client.deregister(r.clone()).await.unwrap_err(),
        Call::Get(r) => client.get_node(r.clone()).await.unwrap_err(),
        Call::List(r) => client.list_nodes(r.clone()).await.unwrap_err(),
        Call::Beats(make) => {
            let mut stream = Stream::open(client).await.unwrap();
            let mut messages = make(session);
            let last = messages.pop().unwrap();
            for message in messages {
                stream
                    .send(message)
                    .await
                    .expect("messages before the last are fine");
            }
            stream.send(last).await.unwrap_err()
        }
    }
}

#[tokio::test]
async fn hostile_inputs_get_exact_codes_and_touch_nothing() {
    let server = TestRegistry::start(Settings::default()).await;
    let channel = server.channel().await;
    let mut client = NodeRegistryClient::new(channel.clone());
    client.register(register_request("witness")).await.unwrap();
    let session = register(&mut client, register_request("beater")).await;
    let reader = client.clone();
    let witness = || {
        let mut client = reader.clone();
        async move {
            client
                .get_node(pb::GetNodeRequest {
                    node_id: "witness".into(),
                })
                .await
                .unwrap()
                .into_inner()
        }
    };
    let before = witness().await;

    let cases = cases();
    assert!(cases.len() >= 40, "only {} cases", cases.len());
    for case in &cases {
        let status = run(&mut client, &case.call, &session).await;
        assert_eq!(
            status.code(),
            case.code,
            "{}: {}",
            case.name,
            status.message()
        );
        assert!(
            status.message().contains(case.says),
            "{}: {:?} does not mention {:?}",
            case.name,
            status.message(),
            case.says
        );
        assert!(
            status.message().len() < 400,
            "{}: message too long",
            case.name
        );
        assert!(
            serving(channel.clone()).await,
            "{}: server stopped serving",
            case.name
        );
        assert_eq!(
            witness().await,
            before,
            "{}: the witness node changed",
            case.name
        );
    }
    // Nothing was registered by any refused call.
    let listed = client
        .list_nodes(pb::ListNodesRequest::default())
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<_> = listed.nodes.iter().map(|n| n.node_id.as_str()).collect();
    assert_eq!(ids, ["beater", "witness"]);
    server.stop().await;
}

#[tokio::test]
async fn garbage_bytes_and_half_open_connections_do_not_hurt_the_server() {
    let server = TestRegistry::start(Settings {
        // Also the deadline for a new connection's first bytes.
        request_timeout: Duration::from_millis(500),
        ..Settings::default()
    })
    .await;
    let channel = server.channel().await;
    let mut client = NodeRegistryClient::new(channel.clone());
    client.register(register_request("witness")).await.unwrap();

    let payloads: [&[u8]; 4] = [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\xff\xff\xff\xff\xff\xff\xff\xff\xff",
        &[0u8; 4096],
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
    ];
    for payload in payloads {
        let mut raw = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        let _ = raw.write_all(payload).await;
        let _ = raw.shutdown().await;
    }
    // A connection that never says anything is closed by the server.
    let mut silent = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    // (The server speaks first: its HTTP/2 SETTINGS frame; read to the end.)
    let mut buf = Vec::new();
    // Ends (EOF or reset) only when the server closes the connection.
    let _ended = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read_to_end(&mut silent, &mut buf),
    )
    .await
    .expect("the server closes a connection that sends nothing");

    assert!(serving(channel).await);
    let node = client
        .get_node(pb::GetNodeRequest {
            node_id: "witness".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(node.status(), pb::NodeStatus::Online);
    server.stop().await;
}

/// Sends pre-encoded bytes as one unary request and returns the status, so
/// a test can send what no generated client would: invalid protobuf.
async fn raw_unary(channel: Channel, path: &'static str, body: Vec<u8>) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    grpc.unary(
        tonic::Request::new(body),
        http::uri::PathAndQuery::from_static(path),
        RawCodec,
    )
    .await
    .expect_err("a malformed request is refused")
}

/// Bytes in, bytes out.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        let len = bytes::Buf::remaining(src);
        Ok(Some(bytes::Buf::copy_to_bytes(src, len).to_vec()))
    }
}

#[tokio::test]
async fn malformed_protobuf_is_invalid_argument_naming_the_message() {
    let server = TestRegistry::start(Settings::default()).await;
    let channel = server.channel().await;
    let mut client = NodeRegistryClient::new(channel.clone());
    client.register(register_request("witness")).await.unwrap();

    // Field 1 (node_id), length 2, bytes that are not UTF-8.
    let bad_utf8 = vec![0x0a, 0x02, 0xff, 0xfe];
    let status = raw_unary(
        channel.clone(),
        "/registry.v1.NodeRegistry/Register",
        bad_utf8.clone(),
    )
    .await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("malformed RegisterRequest"),
        "{status:?}"
    );
    // A length running past the end of the message.
    let truncated = vec![0x0a, 0x10, b'a'];
    let status = raw_unary(
        channel.clone(),
        "/registry.v1.NodeRegistry/GetNode",
        truncated,
    )
    .await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("malformed GetNodeRequest"),
        "{status:?}"
    );

    assert!(serving(channel).await);
    let node = client
        .get_node(pb::GetNodeRequest {
            node_id: "witness".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(node.status(), pb::NodeStatus::Online);
    server.stop().await;
}
