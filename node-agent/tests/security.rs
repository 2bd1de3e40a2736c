//! The agent, run in-process, against a real registry-server on 127.0.0.1:0
//! that checks bearer tokens, TLS and mTLS: what gets a node registered,
//! what keeps it out, what the agent logs, and that the token never shows
//! in the logs.

mod common;

use std::time::Duration;

use common::{
    ADMIN_TOKEN, Admin, Agent, ClientTls, Files, NODE_TOKEN, NodeCondition, agent_config,
    registry_settings,
};
use node_agent::auth::fingerprint;
use node_agent::pools::PoolConfig;
use node_agent::{AgentConfig, Secret, TlsConfig, TokenSource};
use test_support::{LogCapture, Pki, TestRegistry, eventually};

const WAIT: Duration = Duration::from_secs(10);

/// A registry with tokens and TLS ("localhost" certificate), with mTLS
/// when `client_ca` is given; and the test's admin client for it.
async fn tls_registry(
    files: &Files,
    server: &Pki,
    client_ca: Option<&Pki>,
) -> (TestRegistry, Admin) {
    let (cert, key) = server.leaf(&["localhost"]);
    let registry = TestRegistry::start(registry_server::Settings {
        auth_token_file: Some(files.registry_tokens()),
        tls_cert: Some(files.write("server.pem", &cert)),
        tls_key: Some(files.write("server.key", &key)),
        tls_client_ca: client_ca.map(|ca| files.write("client-ca.pem", &ca.ca_pem())),
        ..registry_settings()
    })
    .await;
    let admin = Admin::connect(
        &registry,
        &ClientTls {
            ca: Some(server.ca_pem()),
            domain: "localhost".into(),
            identity: client_ca.map(|ca| ca.leaf(&["operator"])),
        },
    )
    .await;
    (registry, admin)
}

/// An agent for `node_id` with the node token from a file.
fn agent_with_token_file(files: &Files, registry: &TestRegistry, node_id: &str) -> AgentConfig {
    let mut config = agent_config(&registry.url(), node_id);
    config.pools = vec![PoolConfig::new("pool-0")];
    let path = files.write_secret(&format!("{node_id}.token"), &format!("{NODE_TOKEN}\n"));
    config.auth_token = Some(TokenSource::File(path));
    config
}

/// Agent TLS settings: trust `server`'s CA, verify "localhost" (the
/// certificate's name; the URL names 127.0.0.1), present `identity`.
fn agent_tls(files: &Files, server: &Pki, identity: Option<(String, String)>) -> TlsConfig {
    let (cert, key) = match identity {
        Some((cert, key)) => (
            Some(files.write("node.pem", &cert)),
            Some(files.write("node.key", &key)),
        ),
        None => (None, None),
    };
    TlsConfig {
        ca: Some(files.write("registry-ca.pem", &server.ca_pem())),
        cert,
        key,
        domain: Some("localhost".into()),
    }
}

fn assert_no_token_in(logs: &LogCapture) {
    let text = logs.text();
    for token in [NODE_TOKEN, ADMIN_TOKEN] {
        assert!(!text.contains(token), "a token was logged:\n{text}");
    }
}

#[tokio::test]
async fn agent_with_the_node_token_registers_and_heartbeats() {
    let (logs, _guard) = LogCapture::start("info,node_agent=debug");
    let files = Files::new();
    let registry = TestRegistry::start(registry_server::Settings {
        auth_token_file: Some(files.registry_tokens()),
        ..registry_settings()
    })
    .await;
    let admin = Admin::connect(&registry, &ClientTls::default()).await;
    let agent = Agent::start(agent_with_token_file(&files, &registry, "t1"));

    let node = admin.wait_heartbeating("t1").await;
    assert_eq!(node.pool_status[0].pool_id, "pool-0");
    // Several beats, not just the first: the stream keeps carrying the token.
    let first = node.last_heartbeat_at.unwrap();
    eventually("a later heartbeat", WAIT, || {
        let admin = admin.clone();
        async move {
            admin.node("t1").await.matching(|n| {
                let at = n.last_heartbeat_at.unwrap();
                (at.seconds, at.nanos) > (first.seconds, first.nanos)
            })
        }
    })
    .await;
    assert!(logs.count(&fingerprint(NODE_TOKEN)) >= 1, "{}", logs.text());
    assert_eq!(logs.count("open to every user"), 0, "{}", logs.text());
    assert_no_token_in(&logs);

    agent.stop().await.unwrap();
    registry.stop().await;
}

#[tokio::test]
async fn agent_with_a_wrong_token_keeps_retrying_and_is_never_registered() {
    let (logs, _guard) = LogCapture::start("info,node_agent=debug");
    let files = Files::new();
    let registry = TestRegistry::start(registry_server::Settings {
        auth_token_file: Some(files.registry_tokens()),
        ..registry_settings()
    })
    .await;
    let admin = Admin::connect(&registry, &ClientTls::default()).await;
    const WRONG: &str = "wrong-token-dddddddddddddddd";
    let mut config = agent_config(&registry.url(), "t2");
    // Mode 0644, as a careless operator leaves it: the agent warns.
    config.auth_token = Some(TokenSource::File(files.write("t2.token", WRONG)));
    // A refused token is retried after the refused-retry (shortened here),
    // not on the reconnect backoff.
    config.register_refused_retry = Duration::from_millis(200);
    let agent = Agent::start(config);

    // Three refusals: it retries and says why each time.
    logs.wait_for(
        "register rejected by the registry: unauthenticated",
        3,
        WAIT,
    )
    .await;
    assert!(admin.nodes().await.is_empty());
    let text = logs.text();
    assert!(text.contains("Unauthenticated"), "{text}");
    assert!(text.contains(&fingerprint(WRONG)), "{text}");
    assert!(text.contains("check --auth-token-file"), "{text}");
    assert!(text.contains("open to every user"), "{text}");
    assert!(!text.contains(WRONG), "the token was logged:\n{text}");

    agent.stop().await.unwrap();
    assert!(admin.nodes().await.is_empty());
    registry.stop().await;
}

#[tokio::test]
async fn agent_rereads_its_token_file_after_unauthenticated() {
    let (logs, _guard) = LogCapture::start("info,node_agent=debug");
    let files = Files::new();
    let registry = TestRegistry::start(registry_server::Settings {
        auth_token_file: Some(files.registry_tokens()),
        ..registry_settings()
    })
    .await;
    let admin = Admin::connect(&registry, &ClientTls::default()).await;
    let mut config = agent_config(&registry.url(), "t3");
    config.pools = vec![PoolConfig::new("pool-0")];
    // The token the registry has just rotated away from.
    let token_file = files.write_secret("t3.token", "retired-token-eeeeeeeeeeeeeeee\n");
    config.auth_token = Some(TokenSource::File(token_file));
    let agent = Agent::start(config);
    logs.wait_for(
        "register rejected by the registry: unauthenticated",
        1,
        WAIT,
    )
    .await;

    // The new token lands in the file; no restart, no signal.
    files.write_secret("t3.token", &format!("{NODE_TOKEN}\n"));
    admin.wait_heartbeating("t3").await;
    assert!(
        logs.count("auth token file changed; using the new token") == 1,
        "{}",
        logs.text()
    );
    assert_no_token_in(&logs);

    agent.stop().await.unwrap();
    assert!(admin.node("t3").await.is_none());
    registry.stop().await;
}

#[tokio::test]
async fn graceful_stop_deregisters_under_tokens() {
    let (logs, _guard) = LogCapture::start("info,node_agent=debug");
    let files = Files::new();
    let registry = TestRegistry::start(registry_server::Settings {
        auth_token_file: Some(files.registry_tokens()),
        ..registry_settings()
    })
    .await;
    let admin = Admin::connect(&registry, &ClientTls::default()).await;
    // The token from the environment this time (NODE_AGENT_AUTH_TOKEN).
    let mut config = agent_config(&registry.url(), "t4");
    config.pools = vec![PoolConfig::new("pool-0")];
    config.auth_token = Some(TokenSource::Value(Secret::new(NODE_TOKEN)));
    let agent = Agent::start(config);
    admin.wait_heartbeating("t4").await;

    agent.stop().await.unwrap();
    // Deregister is awaited before the agent returns: gone at once.
    assert!(admin.node("t4").await.is_none());
    assert_eq!(
        logs.count("node_agent::session: deregistered"),
        1,
        "{}",
        logs.text()
    );
    assert_no_token_in(&logs);
    registry.stop().await;
}

#[tokio::test]
async fn a_revoked_token_ends_the_stream_and_the_agent_waits_for_a_new_one() {
    let (logs, _guard) = LogCapture::start("info,node_agent=debug");
    let files = Files::new();
    let registry = TestRegistry::start(registry_server::Settings {
        auth_token_file: Some(files.registry_tokens()),
        ..registry_settings()
    })
    .await;
    let admin = Admin::connect(&registry, &ClientTls::default()).await;
    let mut config = agent_with_token_file(&files, &registry, "t6");
    // Long enough that a retry inside this test can only be the file's.
    config.register_refused_retry = Duration::from_secs(3600);
    let agent = Agent::start(config);
    admin.wait_heartbeating("t6").await;

    // The registry revokes the agent's token; the agent's file keeps it.
    const NEW: &str = "new-node-token-gggggggggggggggg";
    files.write_secret(
        "registry-tokens",
        &format!("node {NEW}\nadmin {ADMIN_TOKEN}\n"),
    );
    let refused = "heartbeat stream rejected by the registry: unauthenticated";
    logs.wait_for(refused, 1, WAIT).await;
    // No hammering: with a 50 ms backoff a reconnect loop would have
    // refused dozens of times by now.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(logs.count(refused), 1, "{}", logs.text());
    assert_eq!(
        logs.count("rejected by the registry: unauthenticated"),
        1,
        "{}",
        logs.text()
    );
    assert!(logs.text().contains("retry_in=1h"), "{}", logs.text());

    // The new token lands in the agent's file: it resumes, same session.
    let session = admin.node("t6").await.unwrap().session_id;
    let before = admin.node("t6").await.unwrap().last_heartbeat_at.unwrap();
    files.write_secret("t6.token", NEW);
    eventually("a heartbeat with the new token", WAIT, || {
        let admin = admin.clone();
        async move {
            admin.node("t6").await.matching(|n| {
                let at = n.last_heartbeat_at.unwrap();
                (at.seconds, at.nanos) > (before.seconds, before.nanos)
            })
        }
    })
    .await;
    assert_eq!(admin.node("t6").await.unwrap().session_id, session);
    agent.stop().await.unwrap();
    assert!(!logs.text().contains(NEW), "{}", logs.text());
    assert_no_token_in(&logs);
    registry.stop().await;
}

#[tokio::test]
async fn a_token_rotated_while_running_reconnects_with_it_and_deregisters() {
    let (logs, _guard) = LogCapture::start("info,node_agent=debug");
    let files = Files::new();
    let registry_tokens = files.registry_tokens();
    let registry = TestRegistry::start(registry_server::Settings {
        auth_token_file: Some(registry_tokens),
        ..registry_settings()
    })
    .await;
    let admin = Admin::connect(&registry, &ClientTls::default()).await;
    let agent = Agent::start(agent_with_token_file(&files, &registry, "t5"));
    admin.wait_heartbeating("t5").await;

    // The operator rotates: the agent's file gets the new node token,
    // then the registry knows only that one.
    const ROTATED: &str = "rotated-node-token-ffffffffffff";
    files.write_secret("t5.token", ROTATED);
    files.write_secret(
        "registry-tokens",
        &format!("node {ROTATED}\nadmin {ADMIN_TOKEN}\n"),
    );
    // The registry re-reads its file on its own schedule; the old token is
    // refused as unknown (no longer "a node token may not list") once it has.
    let old = Admin::with_token(&registry, NODE_TOKEN).await;
    eventually("the registry to drop the old token", WAIT, || {
        let old = old.clone();
        async move {
            match old.list_code().await {
                tonic::Code::Unauthenticated => Ok(()),
                code => Err(format!("the old token still gets {code:?}")),
            }
        }
    })
    .await;

    // The registry ended the stream opened with the old token at its
    // reload; the agent re-read its file and carries on with the new one.
    let before = admin.node("t5").await.unwrap().last_heartbeat_at.unwrap();
    eventually("a heartbeat after the rotation", WAIT, || {
        let admin = admin.clone();
        async move {
            admin.node("t5").await.matching(|n| {
                let at = n.last_heartbeat_at.unwrap();
                (at.seconds, at.nanos) > (before.seconds, before.nanos)
            })
        }
    })
    .await;

    // Deregister goes out with the new token.
    agent.stop().await.unwrap();
    assert!(admin.node("t5").await.is_none(), "deregistered");
    assert_eq!(
        logs.count("auth token file changed; using the new token"),
        1,
        "{}",
        logs.text()
    );
    assert!(!logs.text().contains(ROTATED), "{}", logs.text());
    assert_no_token_in(&logs);
    registry.stop().await;
}

#[tokio::test]
async fn agent_over_tls_with_tls_ca_registers_and_deregisters() {
    let (logs, _guard) = LogCapture::start("info,node_agent=debug");
    let files = Files::new();
    let server = Pki::new("registry CA");
    let (registry, admin) = tls_registry(&files, &server, None).await;
    assert!(registry.url().starts_with("https://127.0.0.1:"));
    let mut config = agent_with_token_file(&files, &registry, "s1");
    config.tls = agent_tls(&files, &server, None);
    let agent = Agent::start(config);

    admin.wait_heartbeating("s1").await;
    assert!(logs.count("tls on") == 1, "{}", logs.text());
    agent.stop().await.unwrap();
    assert!(admin.node("s1").await.is_none());
    registry.stop().await;
}

#[tokio::test]
async fn agent_over_tls_refuses_a_registry_certificate_it_cannot_verify() {
    let (logs, _guard) = LogCapture::start("info,node_agent=debug");
    let files = Files::new();
    let server = Pki::new("registry CA");
    let (registry, admin) = tls_registry(&files, &server, None).await;

    // Without --tls-domain the agent checks the URL's host, 127.0.0.1,
    // which the "localhost" certificate does not name.
    let mut config = agent_with_token_file(&files, &registry, "s2");
    config.tls = agent_tls(&files, &server, None);
    config.tls.domain = None;
    let agent = Agent::start(config);
    logs.wait_for("register failed", 2, WAIT).await;
    assert!(admin.nodes().await.is_empty());
    assert!(logs.text().contains("certificate"), "{}", logs.text());
    agent.stop().await.unwrap();

    // A CA other than the registry's: the same.
    let impostor = Pki::new("another CA");
    let mut config = agent_with_token_file(&files, &registry, "s3");
    config.tls = agent_tls(&files, &server, None);
    config.tls.ca = Some(files.write("impostor-ca.pem", &impostor.ca_pem()));
    let failures = logs.count("register failed");
    let agent = Agent::start(config);
    logs.wait_for("register failed", failures + 2, WAIT).await;
    assert!(admin.nodes().await.is_empty());
    agent.stop().await.unwrap();
    registry.stop().await;
}

#[tokio::test]
async fn agent_over_mtls_with_a_certificate_for_its_node_id_registers() {
    let (logs, _guard) = LogCapture::start("info,node_agent=debug");
    let files = Files::new();
    let server = Pki::new("registry CA");
    let clients = Pki::new("node CA");
    let (registry, admin) = tls_registry(&files, &server, Some(&clients)).await;
    let mut config = agent_with_token_file(&files, &registry, "m1");
    config.tls = agent_tls(&files, &server, Some(clients.leaf(&["m1"])));
    let agent = Agent::start(config);

    admin.wait_heartbeating("m1").await;
    agent.stop().await.unwrap();
    assert!(admin.node("m1").await.is_none(), "deregistered under mTLS");
    assert_no_token_in(&logs);
    registry.stop().await;
}

#[tokio::test]
async fn agent_over_mtls_with_a_certificate_for_another_name_is_refused() {
    let (logs, _guard) = LogCapture::start("info,node_agent=debug");
    let files = Files::new();
    let server = Pki::new("registry CA");
    let clients = Pki::new("node CA");
    let (registry, admin) = tls_registry(&files, &server, Some(&clients)).await;
    // A good certificate from the right CA, but for another node.
    let mut config = agent_with_token_file(&files, &registry, "m2");
    config.tls = agent_tls(&files, &server, Some(clients.leaf(&["m3"])));
    let agent = Agent::start(config);

    logs.wait_for(
        "register rejected by the registry: permission denied",
        2,
        WAIT,
    )
    .await;
    assert!(admin.nodes().await.is_empty());
    let text = logs.text();
    assert!(text.contains("PermissionDenied"), "{text}");
    assert!(text.contains("must name this node id"), "{text}");
    agent.stop().await.unwrap();
    assert!(admin.nodes().await.is_empty());
    registry.stop().await;
}
