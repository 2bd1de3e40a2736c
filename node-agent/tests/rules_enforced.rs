//! What the agent does with values the registry would refuse: a bad
//! setting stops the binary with status 2 naming it, a bad handoff file is
//! left out while the node still registers, and a registration the
//! registry refuses anyway is retried on the long `--register-refused-retry`
//! delay, not the reconnect backoff, unless a handoff file changes.
//!
//! The registry here is a stub NodeRegistry that records every Register
//! and answers it as told, since the real registry-server accepts whatever
//! the agent's own checks let through.

use std::pin::Pin;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::Stream;
use node_agent::{AgentConfig, FakeGpuSource};
use registry_proto::pb;
use registry_proto::pb::node_registry_server::{NodeRegistry, NodeRegistryServer};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status, Streaming};

/// A registry that records Register calls and answers them with `answer`.
#[derive(Clone)]
struct StubRegistry {
    /// Every RegisterRequest received, in order.
    registered: Arc<Mutex<Vec<pb::RegisterRequest>>>,
    /// `None` accepts; `Some(status)` refuses every Register with it.
    refuse: Option<Status>,
    /// How long it takes to answer a Register.
    answer_after: Duration,
}

type Beats = Pin<Box<dyn Stream<Item = Result<pb::HeartbeatResponse, Status>> + Send>>;

#[tonic::async_trait]
impl NodeRegistry for StubRegistry {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        self.registered.lock().unwrap().push(request.into_inner());
        tokio::time::sleep(self.answer_after).await;
        match &self.refuse {
            Some(status) => Err(status.clone()),
            None => Ok(Response::new(pb::RegisterResponse {
                session_id: 1,
                created: true,
                session_secret: "s".repeat(32),
                ..Default::default()
            })),
        }
    }

    async fn deregister(
        &self,
        _: Request<pb::DeregisterRequest>,
    ) -> Result<Response<pb::DeregisterResponse>, Status> {
        Ok(Response::new(pb::DeregisterResponse::default()))
    }

    async fn list_nodes(
        &self,
        _: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        Err(Status::unimplemented("stub"))
    }

    async fn get_node(&self, _: Request<pb::GetNodeRequest>) -> Result<Response<pb::Node>, Status> {
        Err(Status::unimplemented("stub"))
    }

    // The agent never asks for placement; these answer like any RPC the
    // test does not script.
    async fn find_pools(
        &self,
        _: Request<pb::FindPoolsRequest>,
    ) -> Result<Response<pb::FindPoolsResponse>, Status> {
        Err(Status::unimplemented("stub"))
    }

    async fn list_models(
        &self,
        _: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        Err(Status::unimplemented("stub"))
    }

    async fn cordon_node(
        &self,
        _: Request<pb::CordonNodeRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        Err(Status::unimplemented("not used"))
    }

    async fn uncordon_node(
        &self,
        _: Request<pb::UncordonNodeRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        Err(Status::unimplemented("not used"))
    }

    async fn drain_node(
        &self,
        _: Request<pb::DrainNodeRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        Err(Status::unimplemented("not used"))
    }

    async fn cancel_drain(
        &self,
        _: Request<pb::CancelDrainRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        Err(Status::unimplemented("not used"))
    }

    type WatchNodesStream =
        Pin<Box<dyn Stream<Item = Result<pb::WatchNodesResponse, Status>> + Send>>;

    async fn watch_nodes(
        &self,
        _: Request<pb::WatchNodesRequest>,
    ) -> Result<Response<Self::WatchNodesStream>, Status> {
        Err(Status::unimplemented("stub"))
    }

    type HeartbeatStream = Beats;

    async fn heartbeat(
        &self,
        _: Request<Streaming<pb::HeartbeatRequest>>,
    ) -> Result<Response<Beats>, Status> {
        Err(Status::unimplemented("stub"))
    }
}

/// Serves `stub` on 127.0.0.1:0; returns its URL.
async fn serve(stub: StubRegistry) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(NodeRegistryServer::new(stub))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    url
}

/// Short timeouts and a fast reconnect backoff, so only the refused-retry
/// setting can keep the agent from registering again within a second.
fn config(registry: &str) -> AgentConfig {
    let mut config = AgentConfig::new(registry, "rules-1");
    config.gpus.fake = Some(1);
    config.registry_timeout = Duration::from_secs(1);
    config.deregister_timeout = Duration::from_millis(200);
    config.backoff.initial = Duration::from_millis(10);
    config.backoff.max = Duration::from_millis(50);
    config
}

/// Waits until `registered` holds `count` registrations, or `limit`
/// passes (the test's own assertions then say what is missing). Waiting on
/// what happened, rather than for a fixed time, keeps a slow machine from
/// failing the tests.
async fn wait_for_registrations(
    registered: &Mutex<Vec<pb::RegisterRequest>>,
    count: usize,
    limit: Duration,
) {
    let deadline = tokio::time::Instant::now() + limit;
    while registered.lock().unwrap().len() < count && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Runs the agent until `stub` has received `count` registrations (at most
/// 10 s), then `then` longer, and stops it.
async fn run_agent_until(config: AgentConfig, stub: &StubRegistry, count: usize, then: Duration) {
    let registered = stub.registered.clone();
    let stop = async move {
        wait_for_registrations(&registered, count, Duration::from_secs(10)).await;
        tokio::time::sleep(then).await;
    };
    let gpus = Arc::new(FakeGpuSource::new(1, "rules"));
    node_agent::run_with_gpu_source(config, gpus, stop)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_refused_registration_waits_the_long_retry_not_the_backoff() {
    let refused = StubRegistry {
        registered: Arc::default(),
        refuse: Some(Status::invalid_argument("invalid machine_id: stub says no")),
        answer_after: Duration::ZERO,
    };
    let url = serve(refused.clone()).await;
    let mut long = config(&url);
    long.register_refused_retry = Duration::from_secs(3600);
    // A second past the refusal: the backoff (at most 50 ms) would have
    // retried many times.
    run_agent_until(long, &refused, 1, Duration::from_secs(1)).await;
    assert_eq!(refused.registered.lock().unwrap().len(), 1);

    // The same refusal with a short setting is retried: the delay is the
    // setting's (300 ms: a few more calls in the 900 ms after the second,
    // where the backoff would make dozens).
    refused.registered.lock().unwrap().clear();
    let mut short = config(&url);
    short.register_refused_retry = Duration::from_millis(300);
    run_agent_until(short, &refused, 2, Duration::from_millis(900)).await;
    let calls = refused.registered.lock().unwrap().len();
    assert!((3..=8).contains(&calls), "{calls} registrations");
}

/// A handoff directory whose `p.json` names model "a", a stub refusing
/// every Register as invalid after `answer_after`, and an agent waiting
/// an hour before retrying such a refusal but watching the directory.
async fn refused_handoff(answer_after: Duration) -> (StubRegistry, AgentConfig, tempfile::TempDir) {
    let refused = StubRegistry {
        registered: Arc::default(),
        refuse: Some(Status::invalid_argument(
            "invalid pools[0].model: stub says no",
        )),
        answer_after,
    };
    let url = serve(refused.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("p.json"), r#"{"model":"a"}"#).unwrap();
    let mut config = config(&url);
    config.register_refused_retry = Duration::from_secs(3600);
    config.handoff_dir = Some(dir.path().to_owned());
    config.handoff_poll_interval = Duration::from_millis(100);
    (refused, config, dir)
}

/// Writes model "b" into the handoff file once the stub has a Register
/// and `after` more has passed.
fn rewrite_after_first_register(stub: &StubRegistry, dir: &tempfile::TempDir, after: Duration) {
    let registered = stub.registered.clone();
    let path = dir.path().join("p.json");
    tokio::spawn(async move {
        wait_for_registrations(&registered, 1, Duration::from_secs(10)).await;
        tokio::time::sleep(after).await;
        std::fs::write(path, r#"{"model":"b"}"#).unwrap();
    });
}

fn models(stub: &StubRegistry) -> Vec<String> {
    let registered = stub.registered.lock().unwrap();
    registered
        .iter()
        .map(|r| r.pools[0].model.clone())
        .collect()
}

#[tokio::test]
async fn a_handoff_change_ends_the_long_retry_early() {
    let (refused, config, dir) = refused_handoff(Duration::ZERO).await;
    // Three polls after the refusal: the agent is waiting out its hour.
    rewrite_after_first_register(&refused, &dir, Duration::from_millis(300));
    run_agent_until(config, &refused, 2, Duration::from_millis(200)).await;
    assert_eq!(models(&refused), ["a", "b"]);
}

#[tokio::test]
async fn a_handoff_change_during_the_refused_register_still_counts() {
    // The file changes while the Register is in flight (the stub answers
    // after 500 ms; the directory is read every 100 ms): the agent must not
    // take that change as already seen when it starts waiting.
    let (refused, config, dir) = refused_handoff(Duration::from_millis(500)).await;
    rewrite_after_first_register(&refused, &dir, Duration::ZERO);
    run_agent_until(config, &refused, 2, Duration::from_millis(200)).await;
    assert_eq!(models(&refused), ["a", "b"]);
}

#[tokio::test]
async fn a_handoff_file_breaking_a_rule_is_left_out_and_the_node_registers() {
    let stub = StubRegistry {
        registered: Arc::default(),
        refuse: None,
        answer_after: Duration::ZERO,
    };
    let url = serve(stub.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("good.json"), r#"{"pool_id":"pool-good"}"#).unwrap();
    let long_model = format!(r#"{{"pool_id":"pool-bad","model":"{}"}}"#, "m".repeat(300));
    std::fs::write(dir.path().join("bad.json"), long_model).unwrap();
    std::fs::write(dir.path().join("bad id.json"), "{}").unwrap();
    let mut config = config(&url);
    config.handoff_dir = Some(dir.path().to_owned());
    run_agent_until(config, &stub, 1, Duration::ZERO).await;

    let registered = stub.registered.lock().unwrap();
    let first = registered.first().expect("the node registered");
    let pools: Vec<&str> = first.pools.iter().map(|p| p.pool_id.as_str()).collect();
    assert_eq!(pools, ["pool-good"]);
    registry_server::validate::registration(first.clone()).unwrap();
}

/// The binary, without the caller's NODE_AGENT_* variables.
fn agent_command() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_node-agent"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("NODE_AGENT_") {
            command.env_remove(key);
        }
    }
    command.stdout(Stdio::null()).stderr(Stdio::piped());
    command
}

#[test]
fn settings_the_registry_would_refuse_exit_2_naming_the_setting() {
    let long_model = format!("pool-0,model={}", "m".repeat(257));
    let cases: [(&[&str], &str); 5] = [
        (&["--machine-id", "has space"], "--machine-id"),
        (&["--pool", &long_model], "model"),
        (&["--label", "zone=a\u{1}b"], "--label"),
        (&["--pool", "pool-0,endpoint=10.0.0.5:8000"], "endpoint"),
        (&["--model-available", "tab\there"], "--model-available"),
    ];
    for (args, named) in cases {
        let output = agent_command()
            .args(["--node-id", "n1", "--fake-gpus", "1"])
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(named), "{args:?}: {stderr}");
    }
    let output = agent_command()
        .args(["--node-id", "n1"])
        .env("NODE_AGENT_MACHINE_ID", "two words")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("NODE_AGENT_MACHINE_ID"), "{stderr}");
}

#[test]
fn an_unusable_pool_action_in_the_config_file_exits_2_naming_the_pool_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agent.toml");
    std::fs::write(
        &file,
        "[[pools]]\nid = \"pool-0\"\ndrain = { http_post = \"https://127.0.0.1:8081/admin/drain\" }\n",
    )
    .unwrap();
    let output = agent_command()
        .args(["--node-id", "n1", "--fake-gpus", "1", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("\"pool-0\"") && stderr.contains("drain: http_post"),
        "{stderr}"
    );
}
