//! registry-ctl's cordon and drain commands, the built binary, against a
//! small fake registry on 127.0.0.1:0 that answers the admin RPCs and
//! scripts GetNode's answers for `drain --wait`: the requests it sends,
//! its output and its exit statuses. (The real registry's side of these
//! RPCs is tested with the registry.)

mod common;

use common::{assert_exit, stderr, stdout};

use std::collections::VecDeque;
use std::process::Output;
use std::sync::{Arc, Mutex};

use registry_proto::pb;
use registry_proto::pb::node_registry_server::{NodeRegistry, NodeRegistryServer};
use tokio::net::TcpListener;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

const ADMIN_TOKEN: &str = "admin-token-aaaaaaaaaaaaaaaa";

/// What the fake registry saw, and what GetNode answers next.
#[derive(Default)]
struct Seen {
    cordons: Vec<pb::CordonNodeRequest>,
    uncordons: Vec<pb::UncordonNodeRequest>,
    drains: Vec<pb::DrainNodeRequest>,
    cancels: Vec<pb::CancelDrainRequest>,
    /// The authorization header of every admin call.
    tokens: Vec<String>,
    /// GetNode's answers in turn; the last one repeats. `None`: NOT_FOUND.
    nodes: VecDeque<Option<pb::Node>>,
    get_nodes: usize,
}

#[derive(Clone, Default)]
struct Fake(Arc<Mutex<Seen>>);

impl Fake {
    fn with<T>(&self, f: impl FnOnce(&mut Seen) -> T) -> T {
        f(&mut self.0.lock().unwrap())
    }

    async fn serve(self) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(NodeRegistryServer::new(self))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        url
    }

    fn token<T>(&self, request: &Request<T>) {
        let token = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        self.with(|s| s.tokens.push(token));
    }
}

fn unknown(node_id: &str) -> Status {
    Status::not_found(format!("node {node_id:?} is not registered"))
}

fn node(node_id: &str, admin: pb::AdminState) -> pb::Node {
    pb::Node {
        node_id: node_id.into(),
        status: pb::NodeStatus::Online as i32,
        pools: vec![pb::PoolSpec {
            pool_id: "pool-0".into(),
            slots_total: 4,
            ..Default::default()
        }],
        admin: Some(admin),
        ..Default::default()
    }
}

/// `node-1` draining pool-0 with `busy` of 4 slots busy.
fn draining(acknowledged: bool, drained: bool, busy: u32) -> Option<pb::Node> {
    let mut n = node(
        "node-1",
        pb::AdminState {
            drain: Some(pb::DrainState {
                pool_ids: vec!["pool-0".into()],
                acknowledged,
                drained,
                drained_at: drained.then_some(prost_types::Timestamp {
                    seconds: 1_795_000_000,
                    nanos: 0,
                }),
                ..Default::default()
            }),
            ..Default::default()
        },
    );
    let state = if acknowledged {
        pb::PoolState::Draining
    } else {
        pb::PoolState::Ready
    };
    n.pool_status = vec![pb::PoolStatus {
        pool_id: "pool-0".into(),
        state: state as i32,
        slots_total: 4,
        slots_free: 4 - busy,
        ..Default::default()
    }];
    Some(n)
}

#[tonic::async_trait]
impl NodeRegistry for Fake {
    async fn cordon_node(
        &self,
        request: Request<pb::CordonNodeRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        self.token(&request);
        let request = request.into_inner();
        self.with(|s| s.cordons.push(request.clone()));
        if request.node_id != "node-1" {
            return Err(unknown(&request.node_id));
        }
        Ok(Response::new(node(
            "node-1",
            pb::AdminState {
                cordoned: true,
                cordon_reason: request.reason,
                cordoned_at: Some(prost_types::Timestamp {
                    seconds: 1_795_000_000,
                    nanos: 0,
                }),
                ..Default::default()
            },
        )))
    }

    async fn uncordon_node(
        &self,
        request: Request<pb::UncordonNodeRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        self.token(&request);
        let request = request.into_inner();
        self.with(|s| s.uncordons.push(request.clone()));
        Ok(Response::new(node(
            &request.node_id,
            pb::AdminState {
                schedulable: true,
                ..Default::default()
            },
        )))
    }

    async fn drain_node(
        &self,
        request: Request<pb::DrainNodeRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        self.token(&request);
        let request = request.into_inner();
        self.with(|s| s.drains.push(request.clone()));
        if request.node_id != "node-1" {
            return Err(unknown(&request.node_id));
        }
        if request.pool_ids.iter().any(|p| p != "pool-0") {
            return Err(Status::invalid_argument(
                "pool_ids: \"pool-9\" is not a pool of node-1",
            ));
        }
        Ok(Response::new(node(
            "node-1",
            pb::AdminState {
                drain: Some(pb::DrainState {
                    pool_ids: request.pool_ids,
                    reason: request.reason,
                    deadline: request.deadline.map(|d| prost_types::Timestamp {
                        seconds: 1_795_000_000 + d.seconds,
                        nanos: 0,
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            },
        )))
    }

    async fn cancel_drain(
        &self,
        request: Request<pb::CancelDrainRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        self.token(&request);
        let request = request.into_inner();
        self.with(|s| s.cancels.push(request.clone()));
        Ok(Response::new(node(
            &request.node_id,
            pb::AdminState::default(),
        )))
    }

    async fn get_node(
        &self,
        request: Request<pb::GetNodeRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        let node_id = request.into_inner().node_id;
        let answer = self.with(|s| {
            s.get_nodes += 1;
            if s.nodes.len() > 1 {
                s.nodes.pop_front().flatten()
            } else {
                s.nodes.front().cloned().flatten()
            }
        });
        answer.map(Response::new).ok_or_else(|| unknown(&node_id))
    }

    async fn register(
        &self,
        _: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        Err(Status::unimplemented("not faked"))
    }

    async fn deregister(
        &self,
        _: Request<pb::DeregisterRequest>,
    ) -> Result<Response<pb::DeregisterResponse>, Status> {
        Err(Status::unimplemented("not faked"))
    }

    async fn list_nodes(
        &self,
        _: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        Err(Status::unimplemented("not faked"))
    }

    async fn find_pools(
        &self,
        _: Request<pb::FindPoolsRequest>,
    ) -> Result<Response<pb::FindPoolsResponse>, Status> {
        Err(Status::unimplemented("not faked"))
    }

    async fn list_models(
        &self,
        _: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        Err(Status::unimplemented("not faked"))
    }

    type WatchNodesStream = ReceiverStream<Result<pb::WatchNodesResponse, Status>>;

    async fn watch_nodes(
        &self,
        _: Request<pb::WatchNodesRequest>,
    ) -> Result<Response<Self::WatchNodesStream>, Status> {
        Err(Status::unimplemented("not faked"))
    }

    type HeartbeatStream = ReceiverStream<Result<pb::HeartbeatResponse, Status>>;

    async fn heartbeat(
        &self,
        _: Request<Streaming<pb::HeartbeatRequest>>,
    ) -> Result<Response<Self::HeartbeatStream>, Status> {
        Err(Status::unimplemented("not faked"))
    }
}

/// Runs the built registry-ctl against `url` with the admin token and
/// `args`, with no REGISTRY_CTL_* from the test run's environment.
async fn ctl(url: &str, args: &[&str]) -> Output {
    let mut all: Vec<String> = vec!["--registry".into(), url.into()];
    all.extend(args.iter().map(|a| (*a).to_owned()));
    tokio::task::spawn_blocking(move || {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_registry-ctl"));
        for (name, _) in std::env::vars() {
            if name.starts_with("REGISTRY_CTL_") {
                command.env_remove(name);
            }
        }
        command
            .env("REGISTRY_CTL_TOKEN", ADMIN_TOKEN)
            .args(&all)
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn cordon_and_uncordon_send_the_admin_token_and_print_the_answer() {
    let fake = Fake::default();
    let url = fake.clone().serve().await;
    let out = ctl(&url, &["cordon", "node-1", "--reason", "bad fan"]).await;
    assert_exit(&out, 0);
    assert_eq!(
        stdout(&out),
        "node-1 cordoned (reason: bad fan), since 2026-11-18T11:06:40Z\n"
    );
    let out = ctl(&url, &["uncordon", "node-1"]).await;
    assert_exit(&out, 0);
    assert_eq!(stdout(&out), "node-1 uncordoned\n");
    let out = ctl(&url, &["-o", "json", "cordon", "node-1"]).await;
    assert_exit(&out, 0);
    let json: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(json["nodeId"], "node-1");
    assert_eq!(json["admin"]["cordoned"], true);
    // An unknown node is a "no" (1), with the registry's words.
    let out = ctl(&url, &["cordon", "nobody"]).await;
    assert_exit(&out, 1);
    assert!(stderr(&out).contains("NOT_FOUND"), "{}", stderr(&out));
    fake.with(|s| {
        assert_eq!(s.cordons[0].node_id, "node-1");
        assert_eq!(s.cordons[0].reason, "bad fan");
        assert_eq!(s.uncordons[0].node_id, "node-1");
        assert!(
            s.tokens
                .iter()
                .all(|t| *t == format!("Bearer {ADMIN_TOKEN}")),
            "{:?}",
            s.tokens
        );
    });
}

#[tokio::test]
async fn drain_sends_pools_reason_and_deadline_and_undrain_cancels() {
    let fake = Fake::default();
    let url = fake.clone().serve().await;
    let out = ctl(
        &url,
        &[
            "drain",
            "node-1",
            "--pool",
            "pool-0",
            "--reason",
            "kernel",
            "--deadline",
            "10m",
        ],
    )
    .await;
    assert_exit(&out, 0);
    assert_eq!(
        stdout(&out),
        "node-1 draining pools pool-0 (reason: kernel), deadline 2026-11-18T11:16:40Z\n"
    );
    let out = ctl(&url, &["drain", "node-1", "--pool", "pool-9"]).await;
    assert_exit(&out, 2);
    assert!(stderr(&out).contains("pool_ids"), "{}", stderr(&out));
    let out = ctl(&url, &["undrain", "node-1"]).await;
    assert_exit(&out, 0);
    assert_eq!(stdout(&out), "node-1 drain cancelled\n");
    fake.with(|s| {
        let drain = &s.drains[0];
        assert_eq!(drain.node_id, "node-1");
        assert_eq!(drain.pool_ids, ["pool-0"]);
        assert_eq!(drain.reason, "kernel");
        assert_eq!(drain.deadline.map(|d| d.seconds), Some(600));
        assert_eq!(s.cancels[0].node_id, "node-1");
        // Without --wait the node is not followed.
        assert_eq!(s.get_nodes, 0);
    });
}

#[tokio::test]
async fn drain_wait_prints_each_change_until_drained() {
    let fake = Fake::default();
    fake.with(|s| {
        s.nodes = VecDeque::from([
            draining(false, false, 3),
            draining(true, false, 3),
            // Unchanged: no line.
            draining(true, false, 3),
            draining(true, false, 1),
            draining(true, true, 0),
        ]);
    });
    let url = fake.clone().serve().await;
    let out = ctl(&url, &["drain", "node-1", "--pool", "pool-0", "--wait"]).await;
    assert_exit(&out, 0);
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 6, "{text}");
    assert_eq!(lines[0], "node-1 draining pools pool-0");
    let progress: Vec<&str> = lines[1..5]
        .iter()
        .map(|l| l.split_once("] ").unwrap().1)
        .collect();
    assert_eq!(
        progress,
        [
            "node-1: online, acknowledged no, drained no; pool-0 ready 3/4 busy",
            "node-1: online, acknowledged yes, drained no; pool-0 draining 3/4 busy",
            "node-1: online, acknowledged yes, drained no; pool-0 draining 1/4 busy",
            "node-1: online, acknowledged yes, drained yes; pool-0 draining 0/4 busy",
        ]
    );
    assert_eq!(lines[5], "node-1 drained at 2026-11-18T11:06:40Z");
    assert_eq!(fake.with(|s| s.get_nodes), 5);
}

#[tokio::test]
async fn drain_wait_gives_up_at_the_wait_timeout_with_exit_5() {
    let fake = Fake::default();
    fake.with(|s| s.nodes = VecDeque::from([draining(true, false, 2)]));
    let url = fake.clone().serve().await;
    let out = ctl(
        &url,
        &[
            "-o",
            "json",
            "drain",
            "node-1",
            "--wait",
            "--wait-timeout",
            "1500ms",
        ],
    )
    .await;
    assert_exit(&out, 5);
    assert!(
        stderr(&out).contains("node-1 not drained after 1s 500ms")
            && stderr(&out).contains("registry-ctl undrain node-1"),
        "{}",
        stderr(&out)
    );
    // JSON: the DrainNode answer, then the node once (it never changed).
    let lines: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{}", stdout(&out));
    assert_eq!(lines[1]["admin"]["drain"]["acknowledged"], true);
}

#[tokio::test]
async fn drain_wait_ends_with_1_when_the_drain_is_cancelled_or_the_node_gone() {
    let fake = Fake::default();
    fake.with(|s| {
        s.nodes = VecDeque::from([
            draining(false, false, 1),
            Some(node("node-1", pb::AdminState::default())),
        ]);
    });
    let url = fake.clone().serve().await;
    let out = ctl(&url, &["drain", "node-1", "--wait"]).await;
    assert_exit(&out, 1);
    assert!(stderr(&out).contains("cancelled"), "{}", stderr(&out));

    fake.with(|s| s.nodes = VecDeque::from([None]));
    let out = ctl(&url, &["drain", "node-1", "--wait"]).await;
    assert_exit(&out, 1);
    assert!(
        stderr(&out).contains("no longer registered"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test]
async fn a_registry_without_the_admin_calls_exits_3_naming_unimplemented() {
    // The real registry answers UNIMPLEMENTED until it serves these RPCs.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_routes(tonic::service::Routes::default())
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let out = ctl(&url, &["undrain", "node-1"]).await;
    assert_exit(&out, 3);
    assert!(stderr(&out).contains("UNIMPLEMENTED"), "{}", stderr(&out));
}
