//! registry-ctl, the built binary, against a real registry-server running
//! in-process on 127.0.0.1:0: output and exit statuses as scripts see them.

mod common;

use common::{assert_exit, stderr, stdout};

use std::path::{Path, PathBuf};
use std::process::Output;

use registry_proto::pb::node_registry_client::NodeRegistryClient;
use registry_server::Settings;
use test_support::{Follower, Pki, TestRegistry, fixtures, follower};
use tokio::net::TcpListener;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

const ADMIN_TOKEN: &str = "admin-token-aaaaaaaaaaaaaaaa";
const READER_TOKEN: &str = "reader-token-bbbbbbbbbbbbbbbb";
const NODE_TOKEN: &str = "node-token-dddddddddddddddd";

/// Registers `node_id` (test_support's fixture: pool-0, one GPU, label
/// zone=eu-1) over `channel`, with `token` as bearer when given.
async fn register(channel: Channel, token: Option<&str>, node_id: &str) {
    let mut client = NodeRegistryClient::new(channel);
    let mut request = tonic::Request::new(fixtures::register_request(node_id));
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    client.register(request).await.unwrap();
}

/// Runs the built registry-ctl with `args` and no REGISTRY_CTL_* or
/// NODE_AGENT_* from the environment of the test run.
async fn ctl(args: &[&str]) -> Output {
    ctl_with_env(args, &[]).await
}

/// [`ctl`] with these environment variables set.
async fn ctl_with_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let args: Vec<String> = args.iter().map(|arg| (*arg).to_owned()).collect();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
        .collect();
    tokio::task::spawn_blocking(move || {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_registry-ctl"));
        for (name, _) in std::env::vars() {
            if name.starts_with("REGISTRY_CTL_")
                || name.starts_with("NODE_AGENT_")
                || name == "REGISTRY_LISTEN"
            {
                command.env_remove(name);
            }
        }
        command.envs(env).args(&args).output().unwrap()
    })
    .await
    .unwrap()
}

/// A free loopback port nothing listens on.
async fn closed_port() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}")
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_list_status_and_health_against_an_open_registry() {
    let registry = TestRegistry::start(Settings::default()).await;
    register(registry.channel().await, None, "gpu-a").await;
    register(registry.channel().await, None, "gpu-b").await;
    let url = &registry.url();

    // get of a registered node: 0, one line of proto3 JSON.
    let output = ctl(&["--registry", url, "-o", "json", "get", "gpu-a"]).await;
    assert_exit(&output, 0);
    let text = stdout(&output);
    assert_eq!(text.lines().count(), 1, "{text}");
    let node: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(node["nodeId"], "gpu-a");
    assert_eq!(node["status"], "NODE_STATUS_ONLINE");
    assert!(node["sessionId"].is_string(), "{node}");
    assert!(
        node["registeredAt"].as_str().unwrap().ends_with('Z'),
        "{node}"
    );

    // get as a table: the description.
    let output = ctl(&["--registry", url, "get", "gpu-a"]).await;
    assert_exit(&output, 0);
    let text = stdout(&output);
    assert!(text.starts_with("Node:            gpu-a\n"), "{text}");
    assert!(text.contains("Status:          online, since"), "{text}");
    assert!(text.contains("NVIDIA H100 80GB HBM3"), "{text}");

    // get of an absent node: 1, nothing on stdout, the reason on stderr.
    let output = ctl(&["--registry", url, "-o", "json", "get", "nobody"]).await;
    assert_exit(&output, 1);
    assert_eq!(stdout(&output), "");
    assert!(
        stderr(&output).contains("not registered"),
        "{}",
        stderr(&output)
    );

    // list as JSON lines: one node per line, in node id order.
    let output = ctl(&["--registry", url, "--output", "json", "list"]).await;
    assert_exit(&output, 0);
    let ids: Vec<String> = stdout(&output)
        .lines()
        .map(|line| {
            let node: serde_json::Value = serde_json::from_str(line).unwrap();
            node["nodeId"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(ids, ["gpu-a", "gpu-b"]);

    // list as a table, with filters.
    let output = ctl(&[
        "--registry",
        url,
        "list",
        "--status",
        "online",
        "--pool",
        "pool-0",
        "--label",
        "zone=eu-1",
    ])
    .await;
    assert_exit(&output, 0);
    let text = stdout(&output);
    assert!(
        text.starts_with("NODE   STATUS  GPUS  POOLS   ADDRESS"),
        "{text}"
    );
    assert!(
        text.contains("\ngpu-a  online  1     pool-0  http://gpu-a.example:9200"),
        "{text}"
    );
    let output = ctl(&["--registry", url, "-o", "wide", "list"]).await;
    assert_exit(&output, 0);
    assert!(
        stdout(&output).contains("machine-gpu-a"),
        "{}",
        stdout(&output)
    );

    // list with filters matching nothing: 1.
    let output = ctl(&[
        "--registry",
        url,
        "-o",
        "json",
        "list",
        "--status",
        "offline",
    ])
    .await;
    assert_exit(&output, 1);
    assert_eq!(stdout(&output), "");
    let output = ctl(&["--registry", url, "list", "--pool", "no-such-pool"]).await;
    assert_exit(&output, 1);

    // status: a word, and 0 even for an absent node.
    let output = ctl(&["--registry", url, "status", "gpu-b"]).await;
    assert_exit(&output, 0);
    assert_eq!(stdout(&output), "online\n");
    let output = ctl(&["--registry", url, "status", "nobody"]).await;
    assert_exit(&output, 0);
    assert_eq!(stdout(&output), "absent\n");
    let output = ctl(&["--registry", url, "-o", "json", "status", "gpu-b"]).await;
    assert_eq!(
        stdout(&output),
        "{\"nodeId\":\"gpu-b\",\"status\":\"online\"}\n"
    );

    // health, exactly as the HEALTHCHECK runs it (with REGISTRY_LISTEN
    // replaced by --registry).
    let output = ctl(&["--registry", url, "--timeout", "3s", "health"]).await;
    assert_exit(&output, 0);
    assert_eq!(stdout(&output), "serving\n");
    let output = ctl(&["--registry", url, "-o", "json", "health"]).await;
    assert_eq!(stdout(&output), "{\"status\":\"SERVING\"}\n");

    // An argument the registry refuses: 2.
    let output = ctl(&["--registry", url, "get", "Not_A_Node"]).await;
    assert_exit(&output, 2);
    assert!(
        stderr(&output).contains("INVALID_ARGUMENT"),
        "{}",
        stderr(&output)
    );

    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_registry_exits_3_with_the_reason() {
    let url = closed_port().await;
    for command in [
        vec!["get", "gpu-a"],
        vec!["list"],
        vec!["status", "gpu-a"],
        vec!["health"],
    ] {
        let mut args = vec!["--registry", url.as_str(), "--timeout", "2s"];
        args.extend(command);
        let output = ctl(&args).await;
        assert_exit(&output, 3);
        assert!(
            stderr(&output).contains("connection refused"),
            "{args:?}: {}",
            stderr(&output)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_come_from_a_file_and_refusals_exit_3() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = write(
        dir.path(),
        "tokens",
        &format!("reader {READER_TOKEN}\nadmin {ADMIN_TOKEN}\nnode {NODE_TOKEN}\n"),
    );
    let registry = TestRegistry::start(Settings {
        auth_token_file: Some(tokens),
        ..Settings::default()
    })
    .await;
    register(registry.channel().await, Some(ADMIN_TOKEN), "gpu-a").await;
    let url = &registry.url();

    let output = ctl(&["--registry", url, "get", "gpu-a"]).await;
    assert_exit(&output, 3);
    assert!(
        stderr(&output).contains("UNAUTHENTICATED"),
        "{}",
        stderr(&output)
    );

    let wrong = write(dir.path(), "wrong", "wrong-token-cccccccccccccccc\n");
    let output = ctl(&[
        "--registry",
        url,
        "--token-file",
        wrong.to_str().unwrap(),
        "list",
    ])
    .await;
    assert_exit(&output, 3);
    assert!(
        stderr(&output).contains("UNAUTHENTICATED"),
        "{}",
        stderr(&output)
    );

    // A node token may not read nodes.
    let output = ctl(&["--registry", url, "--token", NODE_TOKEN, "get", "gpu-a"]).await;
    assert_exit(&output, 3);
    assert!(
        stderr(&output).contains("PERMISSION_DENIED"),
        "{}",
        stderr(&output)
    );

    let reader = write(dir.path(), "reader", &format!("{READER_TOKEN}\n"));
    let output = ctl(&[
        "--registry",
        url,
        "--token-file",
        reader.to_str().unwrap(),
        "-o",
        "json",
        "get",
        "gpu-a",
    ])
    .await;
    assert_exit(&output, 0);
    let node: serde_json::Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(node["nodeId"], "gpu-a");

    let output = ctl(&[
        "--registry",
        url,
        "--token",
        READER_TOKEN,
        "status",
        "gpu-a",
    ])
    .await;
    assert_exit(&output, 0);
    assert_eq!(stdout(&output), "online\n");

    // The health service needs no token.
    let output = ctl(&["--registry", url, "health"]).await;
    assert_exit(&output, 0);

    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_registries_need_the_ca_and_a_wrong_one_is_a_tls_failure() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("registry-ctl test CA");
    let (server_cert, server_key) = pki.leaf(&["localhost"]);
    let registry = TestRegistry::start(Settings {
        tls_cert: Some(write(dir.path(), "server.pem", &server_cert)),
        tls_key: Some(write(dir.path(), "server.key", &server_key)),
        ..Settings::default()
    })
    .await;
    let ca = write(dir.path(), "ca.pem", &pki.ca_pem());
    let channel = Endpoint::from_shared(registry.url())
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(pki.ca_pem()))
                .domain_name("localhost"),
        )
        .unwrap()
        .connect()
        .await
        .unwrap();
    register(channel, None, "gpu-a").await;
    let url = &registry.url();
    let ca = ca.to_str().unwrap();

    let output = ctl(&[
        "--registry",
        url,
        "--tls-ca",
        ca,
        "--tls-domain",
        "localhost",
        "-o",
        "json",
        "get",
        "gpu-a",
    ])
    .await;
    assert_exit(&output, 0);
    let node: serde_json::Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(node["nodeId"], "gpu-a");

    // agent-check takes the agent's own TLS settings.
    let pid = std::process::id().to_string();
    let output = ctl_with_env(
        &["agent-check", "--pid", &pid],
        &[
            ("NODE_AGENT_REGISTRY", url),
            ("NODE_AGENT_NODE_ID", "gpu-a"),
            ("NODE_AGENT_TLS_CA", ca),
            ("NODE_AGENT_TLS_DOMAIN", "localhost"),
        ],
    )
    .await;
    assert_exit(&output, 0);
    assert_eq!(stdout(&output), format!("gpu-a is online at {url}\n"));

    // https:// without --tls-ca: a usage error, before connecting.
    let output = ctl(&["--registry", url, "get", "gpu-a"]).await;
    assert_exit(&output, 2);
    assert!(stderr(&output).contains("--tls-ca"), "{}", stderr(&output));

    // A CA that did not sign the server's certificate.
    let other = write(dir.path(), "other-ca.pem", &Pki::new("another CA").ca_pem());
    let output = ctl(&[
        "--registry",
        url,
        "--tls-ca",
        other.to_str().unwrap(),
        "--tls-domain",
        "localhost",
        "get",
        "gpu-a",
    ])
    .await;
    assert_exit(&output, 3);
    assert!(
        stderr(&output).contains("TLS failure"),
        "{}",
        stderr(&output)
    );

    // Plain text against the TLS port.
    let plain = registry.url().replace("https://", "http://");
    let output = ctl(&["--registry", &plain, "--timeout", "2s", "get", "gpu-a"]).await;
    assert_exit(&output, 3);

    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_that_never_answers_is_a_deadline_exceeded() {
    // Accepts connections and holds them without a byte of HTTP/2.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let output = ctl(&["--registry", &url, "--timeout", "300ms", "get", "gpu-a"]).await;
    assert_exit(&output, 3);
    assert!(
        stderr(&output).contains("deadline exceeded"),
        "{}",
        stderr(&output)
    );
    holder.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_check_resolves_the_agent_from_its_environment() {
    let registry = TestRegistry::start(Settings::default()).await;
    register(registry.channel().await, None, "gpu-a").await;
    // The test process is no node-agent: only the environment counts.
    let pid = std::process::id().to_string();
    let check = |node: &'static str, url: String| {
        let pid = pid.clone();
        async move {
            ctl_with_env(
                &["--timeout", "3s", "agent-check", "--pid", &pid],
                &[("NODE_AGENT_REGISTRY", &url), ("NODE_AGENT_NODE_ID", node)],
            )
            .await
        }
    };

    let output = check("gpu-a", registry.url()).await;
    assert_exit(&output, 0);
    assert_eq!(
        stdout(&output),
        format!("gpu-a is online at {}\n", registry.url())
    );

    let output = check("gpu-z", registry.url()).await;
    assert_exit(&output, 1);
    assert_eq!(
        stdout(&output),
        format!("gpu-z is absent at {}\n", registry.url())
    );

    let output = check("gpu-a", closed_port().await).await;
    assert_exit(&output, 3);

    registry.stop().await;
}

/// `find` and `models` as scripts see them. The registry's placement index
/// is fed by its change feed; gpu-a has registered but never sent a
/// heartbeat, so it is not offered either way: `find` exits 1 with the
/// registry's reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn find_and_models_need_a_reader_and_exit_1_when_nothing_matches() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = write(
        dir.path(),
        "tokens",
        &format!("reader {READER_TOKEN}\nadmin {ADMIN_TOKEN}\nnode {NODE_TOKEN}\n"),
    );
    let registry = TestRegistry::start(Settings {
        auth_token_file: Some(tokens),
        ..Settings::default()
    })
    .await;
    register(registry.channel().await, Some(ADMIN_TOKEN), "gpu-a").await;
    let url = &registry.url();
    let reader = ["--registry", url, "--token", READER_TOKEN];

    let output = ctl(&[&reader[..], &["find", "--model", "llama-3.1-8b"]].concat()).await;
    assert_exit(&output, 1);
    assert_eq!(stdout(&output), "");
    let err = stderr(&output);
    assert!(
        err.contains("no pool found") && err.contains("llama-3.1-8b"),
        "{err}"
    );

    let output = ctl(&[&reader[..], &["find", "--model", "m", "--limit", "101"]].concat()).await;
    assert_exit(&output, 2);
    assert!(stderr(&output).contains("limit"), "{}", stderr(&output));

    let output = ctl(&[&reader[..], &["find", "--model", "m", "--node", "ghost"]].concat()).await;
    assert_exit(&output, 1);
    assert!(
        stderr(&output).contains("ghost is not registered"),
        "{}",
        stderr(&output)
    );

    for command in [&["find", "--model", "m"][..], &["models"][..]] {
        let output =
            ctl(&[&["--registry", url, "--token", NODE_TOKEN][..], command].concat()).await;
        assert_exit(&output, 3);
        assert!(
            stderr(&output).contains("PERMISSION_DENIED"),
            "{command:?}: {}",
            stderr(&output)
        );
    }

    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_prints_the_snapshot_then_changes_and_a_compacted_start_exits_4() {
    use std::io::{BufRead, BufReader};
    let registry = TestRegistry::start(Settings {
        watch_history: 2,
        revision_base: registry_server::RevisionBase::Zero,
        ..Settings::default()
    })
    .await;
    let channel = registry.channel().await;
    register(channel.clone(), None, "gpu-a").await;
    // A running watch in JSON: the snapshot, its marker, then a change.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_registry-ctl"))
        .args(["--registry", &registry.url(), "-o", "json", "watch"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let lines = tokio::task::spawn_blocking(move || {
        BufReader::new(stdout)
            .lines()
            .take(3)
            .map(Result::unwrap)
            .collect::<Vec<String>>()
    });
    // The watch is open once its snapshot is out; register after a moment
    // either way, since a change before the snapshot shows in it instead.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    register(channel.clone(), None, "gpu-b").await;
    let lines = tokio::time::timeout(std::time::Duration::from_secs(10), lines)
        .await
        .expect("three lines within 10 s")
        .unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let events: Vec<serde_json::Value> = lines
        .iter()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(events[0]["type"], "WATCH_EVENT_TYPE_ADDED", "{lines:?}");
    assert_eq!(events[0]["node"]["nodeId"], "gpu-a");
    assert_eq!(events[1]["type"], "WATCH_EVENT_TYPE_SNAPSHOT_COMPLETE");
    assert_eq!(events[1]["revision"], "1");
    assert_eq!(events[2]["type"], "WATCH_EVENT_TYPE_ADDED");
    assert_eq!(events[2]["node"]["nodeId"], "gpu-b");
    assert_eq!(events[2]["revision"], "2");

    // With gpu-c and gpu-d the history of 2 holds revisions 3 and 4:
    // resuming after 1 is compacted: exit 4, saying to relist.
    register(channel.clone(), None, "gpu-c").await;
    register(channel, None, "gpu-d").await;
    let compacted = ctl(&[
        "--registry",
        &registry.url(),
        "watch",
        "--from-revision",
        "1",
    ])
    .await;
    assert_exit(&compacted, 4);
    assert!(
        stderr(&compacted).contains("compacted; relist from revision 4"),
        "{}",
        stderr(&compacted)
    );
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_reconnects_after_a_restart_and_exits_4_when_its_revision_is_gone() {
    use std::io::{BufRead, BufReader, Read};
    let registry = TestRegistry::start(Settings::default()).await;
    let addr = registry.addr;
    register(registry.channel().await, None, "gpu-a").await;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_registry-ctl"))
        .args(["--registry", &registry.url(), "watch"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let head = tokio::task::spawn_blocking(move || {
        let mut lines = Vec::new();
        for _ in 0..3 {
            let mut line = String::new();
            stdout.read_line(&mut line).unwrap();
            lines.push(line);
        }
        lines
    });
    let head = tokio::time::timeout(std::time::Duration::from_secs(10), head)
        .await
        .expect("the snapshot within 10 s")
        .unwrap();
    assert!(head[0].starts_with("REVISION"), "{head:?}");
    assert!(
        head[1].contains("ADDED") && head[1].contains("gpu-a"),
        "{head:?}"
    );
    assert!(head[2].contains("SNAPSHOT_COMPLETE"), "{head:?}");

    // A restart: the watch ends with UNAVAILABLE, registry-ctl retries
    // until the new registry answers, whose history starts after the old
    // revision: OUT_OF_RANGE, exit 4.
    registry.stop().await;
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let again = TestRegistry::restart_on(addr, Settings::default()).await;
    let status = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                let mut stderr = String::new();
                child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut stderr)
                    .unwrap();
                return (status, stderr);
            }
            if std::time::Instant::now() > deadline {
                child.kill().unwrap();
                panic!("registry-ctl watch did not end within 20 s");
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    })
    .await
    .unwrap();
    let (status, stderr) = status;
    assert_eq!(status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("resuming from revision"), "{stderr}");
    assert!(stderr.contains("compacted; relist"), "{stderr}");
    again.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_adds_a_degraded_line_while_the_registry_doubts_itself() {
    // Three nodes that never heartbeat, and a guard that trips from two
    // nodes on: one node timeout after registering, all three are silent at
    // once and the guard holds them ONLINE as suspect.
    let server = TestRegistry::start(Settings {
        node_timeout: std::time::Duration::from_secs(1),
        heartbeat_interval: std::time::Duration::from_millis(300),
        mass_offline_min_nodes: 2,
        ..Settings::default()
    })
    .await;
    let url = &server.url();
    for id in ["gpu-a", "gpu-b", "gpu-c"] {
        register(server.channel().await, None, id).await;
    }
    let output = ctl(&["--registry", url, "health"]).await;
    assert_exit(&output, 0);
    assert_eq!(stdout(&output), "serving\n", "trusted before the deadlines");

    let degraded = test_support::eventually(
        "registry-ctl health reports degraded",
        std::time::Duration::from_secs(15),
        || async {
            let output = ctl(&["--registry", url, "health"]).await;
            let text = stdout(&output);
            if output.status.code() == Some(0) && text.contains("degraded:") {
                Ok(text)
            } else {
                Err(format!("{:?}: {text}", output.status.code()))
            }
        },
    )
    .await;
    assert!(degraded.starts_with("serving\ndegraded: "), "{degraded}");
    // The held nodes are ONLINE and suspect, not OFFLINE.
    let output = ctl(&["--registry", url, "-o", "json", "status", "gpu-a"]).await;
    assert_eq!(
        stdout(&output),
        "{\"nodeId\":\"gpu-a\",\"status\":\"online\"}\n"
    );
    // JSON stays the plain HealthCheckResponse, for scripts.
    let output = ctl(&["--registry", url, "-o", "json", "health"]).await;
    assert_eq!(stdout(&output), "{\"status\":\"SERVING\"}\n");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cordon_needs_an_admin_token_and_an_unknown_node_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = write(
        dir.path(),
        "tokens",
        &format!("reader {READER_TOKEN}\nadmin {ADMIN_TOKEN}\nnode {NODE_TOKEN}\n"),
    );
    let registry = TestRegistry::start(Settings {
        auth_token_file: Some(tokens),
        ..Settings::default()
    })
    .await;
    register(registry.channel().await, Some(ADMIN_TOKEN), "gpu-a").await;
    let url = &registry.url();
    let as_reader = ["--registry", url, "--token", READER_TOKEN];
    let as_admin = ["--registry", url, "--token", ADMIN_TOKEN];

    // A reader may look but not cordon: refused, and nothing changed.
    let output = ctl(&[&as_reader[..], &["cordon", "gpu-a", "--reason", "bad fan"]].concat()).await;
    assert_exit(&output, 3);
    assert!(
        stderr(&output).contains("PERMISSION_DENIED"),
        "{}",
        stderr(&output)
    );
    let output = ctl(&[&as_reader[..], &["-o", "json", "get", "gpu-a"]].concat()).await;
    assert_exit(&output, 0);
    let node: serde_json::Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_ne!(node["admin"]["cordoned"], true, "{node}");

    // The admin token cordons it, and the node shows it with the reason.
    let output = ctl(&[&as_admin[..], &["cordon", "gpu-a", "--reason", "bad fan"]].concat()).await;
    assert_exit(&output, 0);
    let output = ctl(&[&as_reader[..], &["-o", "json", "get", "gpu-a"]].concat()).await;
    assert_exit(&output, 0);
    let node: serde_json::Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(node["admin"]["cordoned"], true, "{node}");
    assert_eq!(node["admin"]["cordonReason"], "bad fan", "{node}");

    // NOT_FOUND exits 1, as `registry-ctl cordon --help` says, naming it.
    let output = ctl(&[&as_admin[..], &["cordon", "gpu-nowhere"]].concat()).await;
    assert_exit(&output, 1);
    assert!(
        stderr(&output).contains("gpu-nowhere"),
        "{}",
        stderr(&output)
    );

    let output = ctl(&[&as_admin[..], &["uncordon", "gpu-a"]].concat()).await;
    assert_exit(&output, 0);
    let output = ctl(&[&as_reader[..], &["-o", "json", "get", "gpu-a"]].concat()).await;
    let node: serde_json::Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_ne!(node["admin"]["cordoned"], true, "{node}");

    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_reach_the_leader_and_a_followers_reads_warn_that_they_may_be_stale() {
    let registry = TestRegistry::start(Settings::default()).await;
    register(registry.channel().await, None, "gpu-a").await;
    let follower = Follower::start(Some(registry.url())).await;
    let through_follower = ["--registry", &follower.url()];

    // One address that reaches a follower: refused there, done at the
    // leader it names.
    let output = ctl(&[
        &through_follower[..],
        &["cordon", "gpu-a", "--reason", "fan"],
    ]
    .concat())
    .await;
    assert_exit(&output, 0);
    assert_eq!(follower.refused(), 1);

    // A follower's read answers, with one warning line on stderr.
    let output = ctl(&[&through_follower[..], &["-o", "json", "get", "gpu-a"]].concat()).await;
    assert_exit(&output, 0);
    let node: serde_json::Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(node["admin"]["cordoned"], true, "{node}");
    let warning = stderr(&output);
    assert_eq!(warning.lines().count(), 1, "{warning}");
    assert!(warning.contains("follower"), "{warning}");
    assert!(warning.contains(follower::STALE_TEXT), "{warning}");

    // Both replicas listed, the follower first: the leader is found by
    // its health, the follower is never asked to write.
    let both = format!("{},{}", follower.url(), registry.url());
    let output = ctl(&["--registry", &both, "uncordon", "gpu-a"]).await;
    assert_exit(&output, 0);
    assert_eq!(follower.refused(), 1);
    // The leader's answers carry no staleness: no warning.
    let output = ctl(&["--registry", &registry.url(), "list"]).await;
    assert_exit(&output, 0);
    assert_eq!(stderr(&output), "");

    // No leader elected: the write fails with the follower's words.
    follower.point_at(None);
    let output = ctl(&[&through_follower[..], &["cordon", "gpu-a"]].concat()).await;
    assert_exit(&output, 3);
    assert!(
        stderr(&output).contains("no leader elected"),
        "{}",
        stderr(&output)
    );
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_go_to_the_first_replica_that_answers_and_a_bad_list_is_a_usage_error() {
    let registry = TestRegistry::start(Settings::default()).await;
    register(registry.channel().await, None, "gpu-a").await;
    let down = closed_port().await;
    let list = format!("{down},{}", registry.url());
    let output = ctl(&["--registry", &list, "status", "gpu-a"]).await;
    assert_exit(&output, 0);

    let output = ctl(&["--registry", "127.0.0.1:1,,127.0.0.1:2", "list"]).await;
    assert_exit(&output, 2);
    assert!(
        stderr(&output).contains("--registry[1]"),
        "{}",
        stderr(&output)
    );
    let output = ctl(&["--registry", "http://127.0.0.1:1,ftp://b:2", "list"]).await;
    assert_exit(&output, 2);
    assert!(stderr(&output).contains("ftp://b:2"), "{}", stderr(&output));
    registry.stop().await;
}
