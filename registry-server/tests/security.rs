//! Authentication, TLS and mTLS, node identity, and resource limits, against
//! real servers on 127.0.0.1:0.

mod common;

use std::time::Duration;

use common::{Stream, serving};
use registry_proto::pb;
use registry_proto::pb::node_registry_client::NodeRegistryClient;
use registry_server::Settings;
use tempfile::TempDir;
use test_support::{
    Pki, Session, TestRegistry, eventually,
    fixtures::{beat, register_request},
};
use tokio::net::TcpListener;
use tonic::Code;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

const NODE_TOKEN: &str = "node-token-aaaaaaaaaaaaaaaa";
const READER_TOKEN: &str = "reader-token-bbbbbbbbbbbbbbbb";
const ADMIN_TOKEN: &str = "admin-token-cccccccccccccccc";

/// Adds `authorization: Bearer <token>` to every call, or nothing.
#[derive(Clone)]
struct Bearer(Option<MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(header) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", header.clone());
        }
        Ok(request)
    }
}

type AuthedClient = NodeRegistryClient<InterceptedService<Channel, Bearer>>;

/// A client that sends `token` (or nothing) as a bearer token.
fn client_with(channel: Channel, token: Option<&str>) -> AuthedClient {
    let header = token.map(|t| format!("Bearer {t}").parse().unwrap());
    NodeRegistryClient::with_interceptor(channel, Bearer(header))
}

fn write_tokens(dir: &TempDir, text: &str) -> std::path::PathBuf {
    let path = dir.path().join("tokens");
    // Write then rename, as operators should, so the server never reads a
    // half-written file.
    let tmp = dir.path().join("tokens.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    path
}

#[tokio::test]
async fn tokens_gate_every_rpc_by_role_and_health_stays_open() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = write_tokens(
        &dir,
        &format!("node {NODE_TOKEN}\nreader {READER_TOKEN}\nadmin {ADMIN_TOKEN}\n"),
    );
    let server = TestRegistry::start(Settings {
        auth_token_file: Some(tokens),
        ..Settings::default()
    })
    .await;
    let channel = server.channel().await;
    let mut anonymous = client_with(channel.clone(), None);
    let mut wrong = client_with(channel.clone(), Some("wrong-token-dddddddddddddddd"));
    let mut node = client_with(channel.clone(), Some(NODE_TOKEN));
    let mut reader = client_with(channel.clone(), Some(READER_TOKEN));
    let mut admin = client_with(channel.clone(), Some(ADMIN_TOKEN));

    let err = anonymous
        .register(register_request("n1"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("authorization"), "{}", err.message());
    let err = wrong
        .list_nodes(pb::ListNodesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(!err.message().contains("wrong-token"), "never echo a token");
    let err = Stream::open(&mut anonymous).await.err().unwrap();
    assert_eq!(err.code(), Code::Unauthenticated);

    let session: Session = node
        .register(register_request("n1"))
        .await
        .unwrap()
        .into_inner()
        .into();
    let mut stream = Stream::open(&mut node).await.unwrap();
    stream.send(beat("n1", &session, 1)).await.unwrap();
    let err = node
        .list_nodes(pb::ListNodesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("node token"), "{}", err.message());

    let listed = reader
        .list_nodes(pb::ListNodesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.nodes.len(), 1);
    reader
        .get_node(pb::GetNodeRequest {
            node_id: "n1".into(),
        })
        .await
        .unwrap();
    let err = reader.register(register_request("n2")).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = reader
        .deregister(pb::DeregisterRequest {
            node_id: "n1".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    // A node token removes a node only with that session's secret.
    let err = node
        .deregister(pb::DeregisterRequest {
            node_id: "n1".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().contains("session_secret"),
        "{}",
        err.message()
    );
    let err = node
        .deregister(pb::DeregisterRequest {
            node_id: "n1".into(),
            session_id: session.id,
            session_secret: "0".repeat(32),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    node.register(register_request("n2")).await.unwrap();
    let n2: Session = node
        .register(register_request("n2"))
        .await
        .unwrap()
        .into_inner()
        .into();
    node.deregister(pb::DeregisterRequest {
        node_id: "n2".into(),
        session_id: n2.id,
        session_secret: n2.secret,
    })
    .await
    .unwrap();

    // An admin token removes any node.
    admin
        .list_nodes(pb::ListNodesRequest::default())
        .await
        .unwrap();
    admin
        .deregister(pb::DeregisterRequest {
            node_id: "n1".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(serving(channel).await, "health needs no token");
    server.stop().await;
}

#[tokio::test]
async fn cordon_and_drain_need_the_admin_role() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = write_tokens(
        &dir,
        &format!("node {NODE_TOKEN}\nreader {READER_TOKEN}\nadmin {ADMIN_TOKEN}\n"),
    );
    let server = TestRegistry::start(Settings {
        auth_token_file: Some(tokens),
        ..Settings::default()
    })
    .await;
    let channel = server.channel().await;
    let mut node = client_with(channel.clone(), Some(NODE_TOKEN));
    node.register(register_request("n1")).await.unwrap();

    /// Calls all four admin RPCs on n1, returning each one's code.
    async fn admin_calls(client: &mut AuthedClient) -> Vec<Code> {
        let id = || "n1".to_string();
        let code = |r: Result<tonic::Response<pb::Node>, tonic::Status>| match r {
            Ok(_) => Code::Ok,
            Err(e) => e.code(),
        };
        vec![
            code(
                client
                    .cordon_node(pb::CordonNodeRequest {
                        node_id: id(),
                        reason: String::new(),
                    })
                    .await,
            ),
            code(
                client
                    .uncordon_node(pb::UncordonNodeRequest { node_id: id() })
                    .await,
            ),
            code(
                client
                    .drain_node(pb::DrainNodeRequest {
                        node_id: id(),
                        ..Default::default()
                    })
                    .await,
            ),
            code(
                client
                    .cancel_drain(pb::CancelDrainRequest { node_id: id() })
                    .await,
            ),
        ]
    }
    let mut reader = client_with(channel.clone(), Some(READER_TOKEN));
    let mut anonymous = client_with(channel.clone(), None);
    let mut admin = client_with(channel, Some(ADMIN_TOKEN));
    assert_eq!(admin_calls(&mut node).await, [Code::PermissionDenied; 4]);
    assert_eq!(admin_calls(&mut reader).await, [Code::PermissionDenied; 4]);
    assert_eq!(
        admin_calls(&mut anonymous).await,
        [Code::Unauthenticated; 4]
    );
    assert_eq!(admin_calls(&mut admin).await, [Code::Ok; 4]);
    server.stop().await;
}

#[tokio::test]
async fn the_token_file_rotates_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = write_tokens(&dir, &format!("reader {READER_TOKEN}\n"));
    let server = TestRegistry::start(Settings {
        auth_token_file: Some(tokens),
        ..Settings::default()
    })
    .await;
    let channel = server.channel().await;
    let mut old = client_with(channel.clone(), Some(READER_TOKEN));
    old.list_nodes(pb::ListNodesRequest::default())
        .await
        .unwrap();

    const ROTATED: &str = "rotated-reader-eeeeeeeeeeeeeeee";
    write_tokens(&dir, &format!("reader {ROTATED} # rotated\n"));
    let new = client_with(channel.clone(), Some(ROTATED));
    eventually(
        "the rotated token is accepted",
        Duration::from_secs(10),
        || {
            let mut new = new.clone();
            async move {
                match new.list_nodes(pb::ListNodesRequest::default()).await {
                    Ok(_) => Ok(()),
                    Err(status) => Err(format!("ListNodes answered {status}")),
                }
            }
        },
    )
    .await;
    let err = old
        .list_nodes(pb::ListNodesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    server.stop().await;
}

#[tokio::test]
async fn a_revoked_token_ends_the_streams_opened_with_it() {
    const OTHER_NODE: &str = "other-node-token-ffffffffffffffff";
    let dir = tempfile::tempdir().unwrap();
    let tokens = write_tokens(&dir, &format!("node {NODE_TOKEN}\nnode {OTHER_NODE}\n"));
    let server = TestRegistry::start(Settings {
        auth_token_file: Some(tokens),
        ..Settings::default()
    })
    .await;
    let channel = server.channel().await;
    let mut revoked = client_with(channel.clone(), Some(NODE_TOKEN));
    let mut kept = client_with(channel.clone(), Some(OTHER_NODE));
    let n1: Session = revoked
        .register(register_request("n1"))
        .await
        .unwrap()
        .into_inner()
        .into();
    let n2: Session = kept
        .register(register_request("n2"))
        .await
        .unwrap()
        .into_inner()
        .into();
    let mut doomed = Stream::open(&mut revoked).await.unwrap();
    doomed.send(beat("n1", &n1, 1)).await.unwrap();
    let mut living = Stream::open(&mut kept).await.unwrap();
    living.send(beat("n2", &n2, 1)).await.unwrap();

    write_tokens(&dir, &format!("node {OTHER_NODE}\n"));
    // The stream ends at the reload, though it sends nothing (the watcher
    // notices the change within seconds; `next` waits up to 10 s).
    let err = doomed.next().await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("revoked"), "{}", err.message());
    assert!(!err.message().contains(NODE_TOKEN), "never echo a token");

    // Streams of tokens still in force carry on.
    let ack = living.send(beat("n2", &n2, 2)).await.unwrap();
    assert_eq!(ack.sequence, 2);
    server.stop().await;
}

#[tokio::test]
async fn a_broken_or_deleted_token_file_keeps_the_tokens_in_force_and_says_so() {
    let (logs, _guard) = test_support::LogCapture::start("registry_server=info");
    let dir = tempfile::tempdir().unwrap();
    let tokens = write_tokens(&dir, &format!("node {NODE_TOKEN}\n"));
    let server = TestRegistry::start(Settings {
        auth_token_file: Some(tokens.clone()),
        ..Settings::default()
    })
    .await;
    let mut node = client_with(server.channel().await, Some(NODE_TOKEN));
    let session: Session = node
        .register(register_request("n1"))
        .await
        .unwrap()
        .into_inner()
        .into();
    let mut stream = Stream::open(&mut node).await.unwrap();
    stream.send(beat("n1", &session, 1)).await.unwrap();

    let refused = "auth tokens not reloaded";
    for (sequence, (what, change)) in [
        ("unparsable", Some("this is not a token line\n")),
        ("empty", Some("# nothing\n")),
        ("deleted", None),
    ]
    .into_iter()
    .enumerate()
    {
        let seen = logs.count(refused);
        match change {
            Some(text) => {
                write_tokens(&dir, text);
            }
            None => std::fs::remove_file(&tokens).unwrap(),
        }
        logs.wait_for(refused, seen + 1, Duration::from_secs(10))
            .await;
        let sequence = sequence as u64 + 2;
        let ack = stream
            .send(beat("n1", &session, sequence))
            .await
            .unwrap_or_else(|e| panic!("{what} file: the stream ended: {e}"));
        assert_eq!(ack.sequence, sequence, "{what} file");
        // New calls still authenticate with the old token (GetNode is not
        // a node's call: refused for the role, not for the token).
        let err = node
            .get_node(pb::GetNodeRequest {
                node_id: "n1".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{what} file: {err}");
    }
    assert!(
        logs.text().contains("previous tokens stay in force"),
        "{}",
        logs.text()
    );
    server.stop().await;
}

#[tokio::test]
async fn an_env_admin_token_works_alone() {
    let server = TestRegistry::start(Settings {
        auth_token: Some(ADMIN_TOKEN.into()),
        ..Settings::default()
    })
    .await;
    let channel = server.channel().await;
    client_with(channel.clone(), Some(ADMIN_TOKEN))
        .register(register_request("n1"))
        .await
        .unwrap();
    let err = client_with(channel, Some(NODE_TOKEN))
        .register(register_request("n1"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    server.stop().await;
}

#[tokio::test]
async fn without_tokens_only_loopback_listens_unless_told_otherwise() {
    let listener = TcpListener::bind("0.0.0.0:0").await.unwrap();
    let err = registry_server::run(listener, Settings::default(), std::future::pending())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("--insecure-no-auth"), "{err}");

    let listener = TcpListener::bind("0.0.0.0:0").await.unwrap();
    let server = TestRegistry::serve(
        listener,
        Settings {
            insecure_no_auth: true,
            ..Settings::default()
        },
    );
    let channel = Channel::from_shared(format!("http://127.0.0.1:{}", server.addr.port()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    assert!(serving(channel).await);
    server.stop().await;
}

#[tokio::test]
async fn reflection_can_be_switched_off() {
    use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    let server = TestRegistry::start(Settings {
        disable_reflection: true,
        ..Settings::default()
    })
    .await;
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let err = ServerReflectionClient::new(server.channel().await)
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
    server.stop().await;
}

/// A server with TLS (and mTLS when `client_ca`), its files in `dir`. It
/// serves on two connection threads, as the binary does by default, so the
/// TLS handshake and the client certificate's names are checked there.
async fn tls_server(dir: &TempDir, pki: &Pki, client_ca: Option<&Pki>) -> TestRegistry {
    let (cert, key) = pki.leaf(&["localhost"]);
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    TestRegistry::start(Settings {
        tls_cert: Some(write("server.pem", &cert)),
        tls_key: Some(write("server.key", &key)),
        tls_client_ca: client_ca.map(|ca| write("client-ca.pem", &ca.ca_pem())),
        connection_threads: Some(2),
        ..Settings::default()
    })
    .await
}

async fn tls_channel(
    server: &TestRegistry,
    pki: &Pki,
    client: Option<(String, String)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(pki.ca_pem()))
        .domain_name("localhost");
    if let Some((cert, key)) = client {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Channel::from_shared(format!("https://{}", server.addr))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await
}

#[tokio::test]
async fn tls_serves_and_a_plaintext_client_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("registry test CA");
    let server = tls_server(&dir, &pki, None).await;

    let channel = tls_channel(&server, &pki, None).await.unwrap();
    NodeRegistryClient::new(channel)
        .register(register_request("n1"))
        .await
        .unwrap();

    let plaintext = Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await;
    let refused = match plaintext {
        Err(_) => true,
        Ok(channel) => NodeRegistryClient::new(channel)
            .list_nodes(pb::ListNodesRequest::default())
            .await
            .is_err(),
    };
    assert!(refused, "a plaintext client must not be served");
    server.stop().await;
}

#[tokio::test]
async fn mtls_refuses_clients_without_a_good_certificate_and_binds_node_ids() {
    let dir = tempfile::tempdir().unwrap();
    let server_pki = Pki::new("server CA");
    let client_pki = Pki::new("client CA");
    let stranger_pki = Pki::new("stranger CA");
    let server = tls_server(&dir, &server_pki, Some(&client_pki)).await;

    // No client certificate, or one from another CA: no service.
    for client in [None, Some(stranger_pki.leaf(&["n1"]))] {
        let refused = match tls_channel(&server, &server_pki, client).await {
            Err(_) => true,
            Ok(channel) => NodeRegistryClient::new(channel)
                .list_nodes(pb::ListNodesRequest::default())
                .await
                .is_err(),
        };
        assert!(refused);
    }

    // A certificate for n1 acts for n1 only.
    let channel = tls_channel(&server, &server_pki, Some(client_pki.leaf(&["n1"])))
        .await
        .unwrap();
    let mut n1 = NodeRegistryClient::new(channel);
    let session: Session = n1
        .register(register_request("n1"))
        .await
        .unwrap()
        .into_inner()
        .into();
    let mut stream = Stream::open(&mut n1).await.unwrap();
    stream.send(beat("n1", &session, 1)).await.unwrap();
    let err = n1.register(register_request("n2")).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("n2"), "{}", err.message());
    let mut other = Stream::open(&mut n1).await.unwrap();
    let err = other
        .send(beat("n2", &Session::forged(1), 1))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    server.stop().await;
}

#[tokio::test]
async fn a_live_node_cannot_be_taken_over_from_another_machine() {
    let server = TestRegistry::start(Settings::default()).await;
    let mut client = NodeRegistryClient::new(server.channel().await);
    client.register(register_request("n1")).await.unwrap();
    let mut intruder = register_request("n1");
    intruder.machine_id = "another-machine".into();
    intruder.address = "http://evil.example:9200".into();
    let err = client.register(intruder).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    let node = client
        .get_node(pb::GetNodeRequest {
            node_id: "n1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(node.address, "http://n1.example:9200");
    server.stop().await;
}

#[tokio::test]
async fn a_stream_flood_is_refused_while_nodes_keep_heartbeating() {
    let server = TestRegistry::start(Settings {
        node_timeout: Duration::from_millis(1500),
        heartbeat_interval: Duration::from_millis(100),
        max_heartbeat_streams: 10,
        max_nodes: 5,
        ..Settings::default()
    })
    .await;
    let mut client = NodeRegistryClient::new(server.channel().await);

    // Three real nodes heartbeat throughout.
    let mut nodes = Vec::new();
    for id in ["n1", "n2", "n3"] {
        let session: Session = client
            .register(register_request(id))
            .await
            .unwrap()
            .into_inner()
            .into();
        nodes.push((id, session, Stream::open(&mut client).await.unwrap()));
    }
    let beating = tokio::spawn(async move {
        for sequence in 1.. {
            for (id, session, stream) in &mut nodes {
                stream.send(beat(id, session, sequence)).await.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });

    // The abuser opens streams without end on its own connection and never
    // writes: 7 fit under the cap, the rest are refused.
    let mut abuser = NodeRegistryClient::new(server.channel().await);
    let mut idle = Vec::new();
    let mut refused = 0;
    for _ in 0..30 {
        match Stream::open(&mut abuser).await {
            Ok(stream) => idle.push(stream),
            Err(status) => {
                assert_eq!(
                    status.code(),
                    Code::ResourceExhausted,
                    "{}",
                    status.message()
                );
                assert!(status.message().contains("10 heartbeat streams"));
                refused += 1;
            }
        }
    }
    assert_eq!(idle.len(), 7);
    assert_eq!(refused, 23);

    // Registering more nodes than the cap is refused too.
    client.register(register_request("n4")).await.unwrap();
    client.register(register_request("n5")).await.unwrap();
    let err = client.register(register_request("n6")).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);

    // Idle streams are closed after the first-message timeout...
    for stream in &mut idle {
        let err = stream.next().await.unwrap_err();
        assert_eq!(err.code(), Code::DeadlineExceeded, "{}", err.message());
    }
    // ...while the real nodes stayed ONLINE all along.
    for id in ["n1", "n2", "n3"] {
        let node = client
            .get_node(pb::GetNodeRequest { node_id: id.into() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(node.status(), pb::NodeStatus::Online, "{id}");
        assert_eq!(
            node.status_changed_at, node.registered_at,
            "{id} never flapped"
        );
    }
    beating.abort();
    server.stop().await;
}

#[tokio::test]
async fn connections_beyond_the_cap_are_closed_and_others_keep_working() {
    let server = TestRegistry::start(Settings {
        max_connections: 4,
        ..Settings::default()
    })
    .await;
    let mut client = NodeRegistryClient::new(server.channel().await);
    client.register(register_request("n1")).await.unwrap();

    // Raw connections fill the cap; the next ones are closed by the server.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(tokio::net::TcpStream::connect(server.addr).await.unwrap());
    }
    let mut extra = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read(&mut extra, &mut buf),
    )
    .await
    .expect("the server closes a connection over the cap");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");

    // The connection that was there first is still served.
    client
        .get_node(pb::GetNodeRequest {
            node_id: "n1".into(),
        })
        .await
        .unwrap();
    drop(held);
    server.stop().await;
}

/// Reads until the server closes `stream` (EOF or reset), or `within`
/// passes; true when it closed.
async fn closed_by_server(stream: &mut tokio::net::TcpStream, within: Duration) -> bool {
    let mut sink = Vec::new();
    tokio::time::timeout(
        within,
        tokio::io::AsyncReadExt::read_to_end(stream, &mut sink),
    )
    .await
    .is_ok()
}

/// A raw TCP connection to `to` from the loopback address `from`.
async fn connect_from(from: &str, to: std::net::SocketAddr) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    socket.connect(to).await.unwrap()
}

#[tokio::test]
async fn one_address_cannot_take_every_connection_slot() {
    let server = TestRegistry::start(Settings {
        max_connections_per_address: 2,
        ..Settings::default()
    })
    .await;
    let mut held = vec![
        connect_from("127.0.0.2", server.addr).await,
        connect_from("127.0.0.2", server.addr).await,
    ];
    // The address's third connection is closed at once...
    let mut third = connect_from("127.0.0.2", server.addr).await;
    assert!(closed_by_server(&mut third, Duration::from_secs(5)).await);
    // ...while another address is still served.
    let mut client = NodeRegistryClient::new(server.channel().await);
    client.register(register_request("n1")).await.unwrap();
    // Closing one gives the address its slot back.
    held.pop();
    let again = connect_from("127.0.0.2", server.addr).await;
    let mut probe = again;
    assert!(!closed_by_server(&mut probe, Duration::from_millis(300)).await);
    drop(held);
    server.stop().await;
}

#[tokio::test]
async fn a_stalled_handshake_is_closed_at_the_deadline() {
    let server = TestRegistry::start(Settings {
        request_timeout: Duration::from_millis(500),
        ..Settings::default()
    })
    .await;
    // A few bytes of the HTTP/2 preface, then nothing: before, the server
    // kept such a socket (and its slot) for as long as the client liked.
    let mut stalled = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut stalled, b"PRI * HTTP")
        .await
        .unwrap();
    assert!(closed_by_server(&mut stalled, Duration::from_secs(10)).await);
    // A real client completes its handshake and is served past the deadline.
    let mut client = NodeRegistryClient::new(server.channel().await);
    tokio::time::sleep(Duration::from_millis(700)).await;
    client.register(register_request("n1")).await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn long_heartbeat_streams_outlive_the_unary_request_timeout() {
    let server = TestRegistry::start(Settings {
        request_timeout: Duration::from_millis(200),
        ..Settings::default()
    })
    .await;
    let mut client = NodeRegistryClient::new(server.channel().await);
    let session: Session = client
        .register(register_request("n1"))
        .await
        .unwrap()
        .into_inner()
        .into();
    let mut stream = Stream::open(&mut client).await.unwrap();
    for sequence in 1..=6 {
        stream.send(beat("n1", &session, sequence)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.stop().await;
}
