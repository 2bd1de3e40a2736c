//! The agent's session logic against a scripted registry that does what the
//! real one rarely does: never ack, push Reregister, Drain and Resume
//! commands (in acks, or unsolicited with sequence 0), ask for another
//! heartbeat interval.

mod common;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Agent, agent_config};
use node_agent::pools::PoolConfig;
use registry_proto::convert::to_proto_duration;
use registry_proto::pb;
use registry_proto::pb::heartbeat_response::Command;
use registry_proto::pb::node_registry_server::{NodeRegistry, NodeRegistryServer};
use test_support::eventually;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

const WAIT: Duration = Duration::from_secs(10);

/// What the scripted registry saw and what it answers.
#[derive(Default)]
struct Script {
    /// Ack heartbeats at all.
    ack: bool,
    /// Commands for the next acks, one per ack (None: a plain ack).
    commands: VecDeque<Option<Command>>,
    /// Commands pushed unsolicited, as the registry pushes an operator's
    /// drain: one per beat received, in a response with sequence 0 that
    /// acknowledges nothing (sent whether or not `ack` is set).
    pushes: VecDeque<Command>,
    /// Send a sequence-0 response for every beat even when `pushes` is
    /// empty (a registry chattier than the real one).
    push_empty: bool,
    /// Interval advertised in RegisterResponse.
    heartbeat_interval: Duration,
    /// Interval advertised in every ack (None: none, keep the current
    /// one); a long one leaves only the beats sent out of turn.
    ack_interval: Option<Duration>,
    /// Node timeout advertised in RegisterResponse.
    node_timeout: Duration,
    registers: Vec<pb::RegisterRequest>,
    streams_opened: usize,
    beats: Vec<pb::HeartbeatRequest>,
    deregisters: Vec<pb::DeregisterRequest>,
    /// Statuses that end the stream, one per beat, before any ack.
    end_with: VecDeque<Status>,
}

#[derive(Clone)]
struct Scripted(Arc<Mutex<Script>>);

impl Scripted {
    fn with<T>(&self, f: impl FnOnce(&mut Script) -> T) -> T {
        f(&mut self.0.lock().unwrap())
    }

    /// Serves the script on 127.0.0.1:0 and returns the URL.
    async fn serve(script: Script) -> (Scripted, String) {
        let scripted = Scripted(Arc::new(Mutex::new(script)));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = tonic::transport::Server::builder()
            .add_service(NodeRegistryServer::new(scripted.clone()))
            .serve_with_incoming(TcpListenerStream::new(listener));
        tokio::spawn(server);
        (scripted, url)
    }
}

#[tonic::async_trait]
impl NodeRegistry for Scripted {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let (session_id, interval, timeout) = self.with(|s| {
            s.registers.push(request.into_inner());
            (
                s.registers.len() as u64,
                s.heartbeat_interval,
                s.node_timeout,
            )
        });
        Ok(Response::new(pb::RegisterResponse {
            session_id,
            created: session_id == 1,
            heartbeat_interval: Some(to_proto_duration(interval)),
            node_timeout: Some(to_proto_duration(timeout)),
            registered_at: None,
            session_secret: format!("secret-{session_id}"),
            registry: None,
        }))
    }

    async fn deregister(
        &self,
        request: Request<pb::DeregisterRequest>,
    ) -> Result<Response<pb::DeregisterResponse>, Status> {
        self.with(|s| s.deregisters.push(request.into_inner()));
        Ok(Response::new(pb::DeregisterResponse {}))
    }

    async fn list_nodes(
        &self,
        _: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        Err(Status::unimplemented("not scripted"))
    }

    async fn get_node(&self, _: Request<pb::GetNodeRequest>) -> Result<Response<pb::Node>, Status> {
        Err(Status::unimplemented("not scripted"))
    }

    // The agent never asks for placement; these answer like any RPC the
    // test does not script.
    async fn find_pools(
        &self,
        _: Request<pb::FindPoolsRequest>,
    ) -> Result<Response<pb::FindPoolsResponse>, Status> {
        Err(Status::unimplemented("not scripted"))
    }

    async fn list_models(
        &self,
        _: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        Err(Status::unimplemented("not scripted"))
    }

    // The agent never calls the admin RPCs.
    async fn cordon_node(
        &self,
        _: Request<pb::CordonNodeRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        Err(Status::unimplemented("not scripted"))
    }

    async fn uncordon_node(
        &self,
        _: Request<pb::UncordonNodeRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        Err(Status::unimplemented("not scripted"))
    }

    async fn drain_node(
        &self,
        _: Request<pb::DrainNodeRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        Err(Status::unimplemented("not scripted"))
    }

    async fn cancel_drain(
        &self,
        _: Request<pb::CancelDrainRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        Err(Status::unimplemented("not scripted"))
    }

    type WatchNodesStream = ReceiverStream<Result<pb::WatchNodesResponse, Status>>;

    // The agent never watches; the contract's change feed is not scripted.
    async fn watch_nodes(
        &self,
        _: Request<pb::WatchNodesRequest>,
    ) -> Result<Response<Self::WatchNodesStream>, Status> {
        Err(Status::unimplemented("not scripted"))
    }

    type HeartbeatStream = ReceiverStream<Result<pb::HeartbeatResponse, Status>>;

    async fn heartbeat(
        &self,
        request: Request<Streaming<pb::HeartbeatRequest>>,
    ) -> Result<Response<Self::HeartbeatStream>, Status> {
        self.with(|s| s.streams_opened += 1);
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let script = self.clone();
        tokio::spawn(async move {
            while let Ok(Some(beat)) = inbound.message().await {
                if let Some(end) = script.with(|s| s.end_with.pop_front()) {
                    let _ = tx.send(Err(end)).await;
                    return;
                }
                let sequence = beat.sequence;
                let (push, reply) = script.with(|s| {
                    s.beats.push(beat);
                    let push = match s.pushes.pop_front() {
                        Some(command) => Some(Some(command)),
                        None => s.push_empty.then_some(None),
                    };
                    (push, s.ack.then(|| s.commands.pop_front().flatten()))
                });
                if let Some(command) = push {
                    let pushed = pb::HeartbeatResponse {
                        sequence: 0,
                        server_time: None,
                        heartbeat_interval: None,
                        command,
                        registry: None,
                    };
                    if tx.send(Ok(pushed)).await.is_err() {
                        return;
                    }
                }
                if let Some(command) = reply {
                    let ack = pb::HeartbeatResponse {
                        sequence,
                        server_time: None,
                        heartbeat_interval: script.with(|s| s.ack_interval.map(to_proto_duration)),
                        command,
                        registry: None,
                    };
                    if tx.send(Ok(ack)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

fn script(ack: bool) -> Script {
    Script {
        ack,
        heartbeat_interval: Duration::from_millis(100),
        node_timeout: Duration::from_millis(600),
        ..Script::default()
    }
}

#[tokio::test]
async fn unacked_heartbeats_make_the_agent_reopen_the_stream() {
    test_support::init_logs();
    let (registry, url) = Scripted::serve(script(false)).await;
    let mut config = agent_config(&url, "s1");
    config.heartbeat_interval = Some(Duration::from_millis(100));
    let agent = Agent::start(config);
    eventually("a second heartbeat stream", WAIT, || {
        let opened = registry.with(|s| s.streams_opened);
        async move {
            if opened >= 2 {
                Ok(())
            } else {
                Err(format!("{opened} streams opened"))
            }
        }
    })
    .await;
    // The session was never refused, so it is reused, not replaced.
    assert_eq!(registry.with(|s| s.registers.len()), 1);
    let sessions: Vec<u64> = registry.with(|s| s.beats.iter().map(|b| b.session_id).collect());
    assert!(registry.with(|s| {
        s.beats
            .iter()
            .all(|b| b.session_secret == format!("secret-{}", b.session_id))
    }));
    assert!(sessions.iter().all(|&id| id == 1), "{sessions:?}");
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn reregister_command_makes_the_agent_register_again() {
    test_support::init_logs();
    let mut s = script(true);
    s.commands
        .push_back(Some(Command::Reregister(pb::ReregisterCommand {
            reason: "registry state lost".into(),
        })));
    let (registry, url) = Scripted::serve(s).await;
    let agent = Agent::start(agent_config(&url, "s2"));
    eventually("beats of the second session", WAIT, || {
        let sessions: Vec<u64> = registry.with(|s| s.beats.iter().map(|b| b.session_id).collect());
        async move {
            if sessions.contains(&2) {
                Ok(())
            } else {
                Err(format!("beats of sessions {sessions:?}"))
            }
        }
    })
    .await;
    assert_eq!(registry.with(|s| s.registers.len()), 2);
    agent.stop().await.unwrap();
    // Deregister names the current session, so it cannot remove a newer one.
    let deregisters = registry.with(|s| s.deregisters.clone());
    assert_eq!(deregisters.len(), 1);
    assert_eq!(deregisters[0].node_id, "s2");
    assert_eq!(deregisters[0].session_id, 2);
    assert_eq!(deregisters[0].session_secret, "secret-2");
}

#[tokio::test]
async fn drain_command_reports_the_pools_draining() {
    test_support::init_logs();
    let mut s = script(true);
    s.commands.push_back(Some(Command::Drain(pb::DrainCommand {
        pool_ids: vec!["pool-0".into()],
        reason: "maintenance".into(),
        deadline: None,
    })));
    let (registry, url) = Scripted::serve(s).await;
    let mut config = agent_config(&url, "s3");
    config.pools = vec![PoolConfig::new("pool-0"), PoolConfig::new("pool-1")];
    let agent = Agent::start(config);
    let beat = eventually("a beat with pool-0 draining", WAIT, || {
        let beat = registry.with(|s| {
            s.beats
                .iter()
                .find(|b| {
                    b.pools
                        .iter()
                        .any(|p| p.pool_id == "pool-0" && p.state() == pb::PoolState::Draining)
                })
                .cloned()
                .ok_or_else(|| format!("{} beats, none with pool-0 draining", s.beats.len()))
        });
        async move { beat }
    })
    .await;
    let other = beat.pools.iter().find(|p| p.pool_id == "pool-1").unwrap();
    assert_eq!(other.state(), pb::PoolState::Ready);
    // The first beat, before the command, had pool-0 ready.
    let first = registry.with(|s| s.beats[0].clone());
    assert_eq!(first.pools[0].state(), pb::PoolState::Ready);
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn agent_follows_the_registry_interval_unless_overridden() {
    test_support::init_logs();
    let (registry, url) = Scripted::serve(script(true)).await;
    let mut config = agent_config(&url, "s4");
    // Without the override the registry's 100ms applies, not the 10s default.
    config.heartbeat_interval = None;
    let agent = Agent::start(config);
    eventually("ten beats", Duration::from_secs(5), || {
        let beats = registry.with(|s| s.beats.len());
        async move {
            if beats >= 10 {
                Ok(())
            } else {
                Err(format!("{beats} beats"))
            }
        }
    })
    .await;
    let beats = registry.with(|s| s.beats.clone());
    // Every beat names the node and session and carries the agent's clock,
    // with increasing sequence numbers.
    assert!(beats.iter().all(|b| b.node_id == "s4" && b.session_id == 1));
    assert!(beats.iter().all(|b| b.sent_at.is_some()));
    assert!(beats.windows(2).all(|w| w[0].sequence < w[1].sequence));
    assert!(beats.iter().all(|b| b.gpus.len() == 2));
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn unsolicited_responses_do_not_count_as_acks() {
    test_support::init_logs();
    // Never an ack, but a sequence-0 message after every beat: the stream
    // is no healthier for them, so the watchdog still gives up on it.
    let mut s = script(false);
    s.push_empty = true;
    let (registry, url) = Scripted::serve(s).await;
    let mut config = agent_config(&url, "s5");
    config.heartbeat_interval = Some(Duration::from_millis(100));
    let agent = Agent::start(config);
    eventually("a second heartbeat stream", WAIT, || {
        let opened = registry.with(|s| s.streams_opened);
        async move {
            if opened >= 2 {
                Ok(())
            } else {
                Err(format!("{opened} streams opened"))
            }
        }
    })
    .await;
    agent.stop().await.unwrap();
}

/// The first beat (after `from`) whose pools are in these states.
fn beat_with(
    registry: &Scripted,
    from: usize,
    want: &[(&str, pb::PoolState)],
) -> Result<usize, String> {
    registry.with(|s| {
        s.beats
            .iter()
            .enumerate()
            .skip(from)
            .find(|(_, b)| {
                want.iter().all(|(id, state)| {
                    b.pools
                        .iter()
                        .any(|p| p.pool_id == *id && p.state() == *state)
                })
            })
            .map(|(i, _)| i)
            .ok_or_else(|| format!("{} beats, none with {want:?}", s.beats.len()))
    })
}

fn lines(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn pushed_drain_runs_the_drain_action_once_and_resume_its_resume_action() {
    test_support::init_logs();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("actions");
    let append = |word: &str| {
        node_agent::pools::action::PoolAction::Command(vec![
            "sh".into(),
            "-c".into(),
            format!("echo \"{word} $NODE_AGENT_POOL_ID\" >> '{}'", log.display()),
        ])
    };
    let drain_all = Command::Drain(pb::DrainCommand {
        pool_ids: vec![],
        reason: "maintenance".into(),
        deadline: Some(prost_types::Timestamp {
            seconds: 2_000_000_000,
            nanos: 0,
        }),
    });
    let mut s = script(true);
    // The same drain twice, as a registry re-sends it.
    s.pushes.push_back(drain_all.clone());
    s.pushes.push_back(drain_all);
    let (registry, url) = Scripted::serve(s).await;
    let mut config = agent_config(&url, "s6");
    config.heartbeat_interval = Some(Duration::from_millis(100));
    let mut pool0 = PoolConfig::new("pool-0");
    pool0.drain = Some(append("drain"));
    pool0.resume = Some(append("resume"));
    config.pools = vec![pool0, PoolConfig::new("pool-1")];
    let agent = Agent::start(config);

    let draining = [
        ("pool-0", pb::PoolState::Draining),
        ("pool-1", pb::PoolState::Draining),
    ];
    let drained_at = eventually("both pools draining after both drains", WAIT, || {
        let found = beat_with(&registry, 0, &draining);
        let pending = registry.with(|s| s.pushes.len());
        async move {
            match found {
                Ok(i) if pending == 0 => Ok(i),
                Ok(_) => Err(format!("{pending} pushes not sent yet")),
                Err(e) => Err(e),
            }
        }
    })
    .await;
    // A few beats later the action has run, and run once.
    let seen = registry.with(|s| s.beats.len());
    eventually("the drain action's line and three more beats", WAIT, || {
        let beats = registry.with(|s| s.beats.len());
        let lines = lines(&log);
        async move {
            if beats >= seen + 3 && !lines.is_empty() {
                Ok(())
            } else {
                Err(format!("{beats} beats, lines {lines:?}"))
            }
        }
    })
    .await;
    assert_eq!(lines(&log), ["drain pool-0"]);
    // The pool without an engine count is reported idle while draining.
    let beat = registry.with(|s| s.beats[drained_at].clone());
    assert!(beat.pools.iter().all(|p| p.slots_free == p.slots_total));

    // Resume pool-0 only: its resume action runs, pool-1 stays drained.
    let from = registry.with(|s| {
        s.pushes.push_back(Command::Resume(pb::ResumeCommand {
            pool_ids: vec!["pool-0".into()],
            reason: "drain cancelled".into(),
        }));
        s.beats.len()
    });
    let resumed = [
        ("pool-0", pb::PoolState::Ready),
        ("pool-1", pb::PoolState::Draining),
    ];
    eventually("pool-0 ready and pool-1 draining", WAIT, || {
        let found = beat_with(&registry, from, &resumed);
        async move { found }
    })
    .await;
    eventually("the resume action's line", WAIT, || {
        let lines = lines(&log);
        async move {
            if lines.len() >= 2 {
                Ok(lines)
            } else {
                Err(format!("{lines:?}"))
            }
        }
    })
    .await;
    assert_eq!(lines(&log), ["drain pool-0", "resume pool-0"]);
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn drain_and_resume_are_reported_at_once_not_one_interval_later() {
    let mut s = script(true);
    // After the first beat the registry asks for an hour between beats:
    // any further beat in this test is one sent because of a command.
    s.ack_interval = Some(Duration::from_secs(3600));
    s.pushes.push_back(Command::Drain(pb::DrainCommand {
        pool_ids: vec![],
        reason: "maintenance".into(),
        deadline: None,
    }));
    s.pushes.push_back(Command::Resume(pb::ResumeCommand {
        pool_ids: vec![],
        reason: "drain cancelled".into(),
    }));
    let (registry, url) = Scripted::serve(s).await;
    let mut config = agent_config(&url, "s9");
    config.heartbeat_interval = None;
    config.pools = vec![PoolConfig::new("pool-0")];
    let agent = Agent::start(config);

    let draining = eventually("a beat reports the pool DRAINING", WAIT, || {
        let found = beat_with(&registry, 1, &[("pool-0", pb::PoolState::Draining)]);
        async move { found }
    })
    .await;
    assert_eq!(draining, 1, "the drain was not reported by the next beat");
    let ready = eventually("a later beat reports the pool READY", WAIT, || {
        let found = beat_with(&registry, 2, &[("pool-0", pb::PoolState::Ready)]);
        async move { found }
    })
    .await;
    assert_eq!(ready, 2, "the resume was not reported by the next beat");
    let first = registry.with(|s| s.beats[0].clone());
    assert!(
        first
            .pools
            .iter()
            .all(|p| p.state() == pb::PoolState::Ready),
        "{first:?}"
    );
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn a_failed_drain_action_is_retried_by_the_next_drain_command_only() {
    test_support::init_logs();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("tries");
    let drain = Command::Drain(pb::DrainCommand {
        pool_ids: vec!["pool-0".into()],
        reason: "maintenance".into(),
        deadline: None,
    });
    let mut s = script(true);
    s.pushes.push_back(drain.clone());
    let (registry, url) = Scripted::serve(s).await;
    let mut config = agent_config(&url, "s7");
    config.heartbeat_interval = Some(Duration::from_millis(100));
    let mut pool = PoolConfig::new("pool-0");
    pool.drain = Some(node_agent::pools::action::PoolAction::Command(vec![
        "sh".into(),
        "-c".into(),
        format!("echo try >> '{}'; exit 1", log.display()),
    ]));
    config.pools = vec![pool];
    let agent = Agent::start(config);
    let tries = |want: usize| {
        let log = log.clone();
        async move {
            eventually(&format!("{want} tries"), WAIT, || {
                let n = lines(&log).len();
                async move {
                    if n >= want {
                        Ok(())
                    } else {
                        Err(format!("{n} tries"))
                    }
                }
            })
            .await
        }
    };
    tries(1).await;
    // Failed, and the pool is still reported DRAINING; beats do not retry.
    let seen = registry.with(|s| s.beats.len());
    eventually("five more beats", WAIT, || {
        let beats = registry.with(|s| s.beats.len());
        async move {
            if beats >= seen + 5 {
                Ok(())
            } else {
                Err(format!("{beats} beats"))
            }
        }
    })
    .await;
    assert_eq!(lines(&log).len(), 1);
    assert!(beat_with(&registry, seen, &[("pool-0", pb::PoolState::Draining)]).is_ok());
    // The registry sends the drain again: the action is tried again.
    registry.with(|s| s.pushes.push_back(drain));
    tries(2).await;
    agent.stop().await.unwrap();
    assert_eq!(lines(&log).len(), 2);
}

#[tokio::test]
async fn a_stream_replaced_by_its_own_session_is_not_fought() {
    let mut replaced = Status::failed_precondition(
        "a newer heartbeat stream of session 1 of node n1 took over; this stream is closed",
    );
    replaced.metadata_mut().insert(
        registry_proto::rules::REASON_KEY,
        tonic::metadata::MetadataValue::from_static(registry_proto::rules::STREAM_REPLACED),
    );
    let (registry, url) = Scripted::serve(Script {
        end_with: VecDeque::from([replaced]),
        ..script(true)
    })
    .await;
    let mut config = agent_config(&url, "n1");
    config.pools = vec![PoolConfig::new("pool-0")];
    config.register_refused_retry = Duration::from_millis(700);
    let agent = Agent::start(config);

    // After the refusal, the agent comes back on the same session, once the
    // refused-retry has passed, instead of registering again (which would
    // end the other holder's stream in turn).
    eventually("a second stream", WAIT, || {
        let opened = registry.with(|s| s.streams_opened);
        async move {
            if opened >= 2 {
                Ok(())
            } else {
                Err(format!("{opened} streams opened"))
            }
        }
    })
    .await;
    eventually("beats on the same session", WAIT, || {
        let acked = registry.with(|s| s.beats.len());
        async move {
            if acked >= 3 {
                Ok(())
            } else {
                Err(format!("{acked} beats"))
            }
        }
    })
    .await;
    registry.with(|s| {
        assert_eq!(s.registers.len(), 1, "never registered again");
        assert_eq!(s.streams_opened, 2, "one retry, not a reconnect loop");
        assert!(s.beats.iter().all(|b| b.session_id == 1));
    });
    agent.stop().await.unwrap();
}
