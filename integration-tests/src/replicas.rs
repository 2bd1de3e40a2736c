//! One test's replicated world: a real etcd cluster on loopback, several
//! registry-server replicas on it, agents given every replica, and views
//! of the fleet through any replica.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use test_support::etcd::EtcdCluster;
use tokio_util::sync::CancellationToken;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::agent::{AgentProcess, AgentSpec};
use crate::binaries::binaries;
use crate::cluster::{Nodes, list_nodes};
use crate::ctl::{CtlOutput, run_ctl};
use crate::error::HarnessError;
use crate::registry::{RegistryProcess, Timing};

pub use test_support::health::{LEADER_SERVICE, health, leads};

/// etcd, the replicas and the agents, all killed when this is dropped.
#[derive(Debug)]
pub struct ReplicaSet {
    /// The agents (dropped first).
    agents: Vec<AgentProcess>,
    /// The replicas, by index.
    replicas: Vec<RegistryProcess>,
    /// The etcd members.
    etcd: EtcdCluster,
    /// Where every process of this test logs.
    log_dir: PathBuf,
    /// The replicas' timing.
    timing: Timing,
}

impl ReplicaSet {
    /// Starts a 3-member etcd cluster, `replicas` registries on it with
    /// `timing` and the etcd lease `lease_ttl`, and one agent per spec given
    /// every replica. `None` when etcd is not installed (outside CI; see
    /// [`EtcdCluster::start`]).
    pub async fn start(
        test: &str,
        replicas: usize,
        timing: Timing,
        lease_ttl: Duration,
        specs: Vec<AgentSpec>,
    ) -> Result<Option<Self>, HarnessError> {
        let Some(etcd) = EtcdCluster::start(3) else {
            return Ok(None);
        };
        let bins = binaries()?;
        let log_dir = bins.target_dir.join("e2e-logs").join(test);
        let _ = std::fs::remove_dir_all(&log_dir);
        std::fs::create_dir_all(&log_dir)
            .map_err(|err| HarnessError::io(format!("creating {}", log_dir.display()), err))?;
        let mut set = Self {
            agents: Vec::new(),
            replicas: Vec::new(),
            etcd,
            log_dir,
            timing,
        };
        for i in 0..replicas {
            let args = vec![
                "--store".to_owned(),
                "etcd".to_owned(),
                "--etcd-endpoints".to_owned(),
                set.etcd.endpoints_arg(),
                "--etcd-prefix".to_owned(),
                format!("/{test}"),
                "--etcd-lease-ttl".to_owned(),
                format!("{}ms", lease_ttl.as_millis()),
                // What each replica accepted, read by the tests.
                "--metrics-listen".to_owned(),
                "127.0.0.1:0".to_owned(),
            ];
            let replica = RegistryProcess::start_with_args(
                &bins.registry_server,
                &set.log_dir.join(format!("registry-{i}.log")),
                timing,
                args,
            )
            .await?;
            set.replicas.push(replica);
        }
        for spec in specs {
            let log = set.log_dir.join(format!("agent-{}.log", spec.node_id));
            let agent = AgentProcess::start(
                &bins.node_agent,
                &log,
                &set.registry_arg(),
                timing.heartbeat_interval,
                spec,
            )?;
            set.agents.push(agent);
        }
        Ok(Some(set))
    }

    /// Every replica's URL, comma-separated, as agents and registry-ctl
    /// take it.
    pub fn registry_arg(&self) -> String {
        self.replicas
            .iter()
            .map(RegistryProcess::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The unlabelled sample `name` of replica `i`'s `/metrics`; `None`
    /// when it does not answer (down, frozen) or has no such sample.
    pub fn metric(&self, i: usize, name: &str) -> Option<f64> {
        let addr = self.replicas[i].metrics_addr()?;
        let text = test_support::http::get(addr, "/metrics")?;
        test_support::http::sample(&text, name)
    }

    /// Every replica's URL, by index.
    pub fn urls(&self) -> Vec<String> {
        self.replicas.iter().map(RegistryProcess::url).collect()
    }

    /// The replicas' timing.
    pub fn timing(&self) -> Timing {
        self.timing
    }

    /// Replica `i`.
    pub fn replica(&mut self, i: usize) -> &mut RegistryProcess {
        &mut self.replicas[i]
    }

    /// The etcd members.
    pub fn etcd(&mut self) -> &mut EtcdCluster {
        &mut self.etcd
    }

    /// The agents.
    pub fn agents(&self) -> &[AgentProcess] {
        &self.agents
    }

    /// Replica `i`'s health for `service` ("" is the process as a whole;
    /// [`LEADER_SERVICE`] is SERVING on the leader only); `None` when it
    /// does not answer.
    pub async fn health(&self, i: usize, service: &str) -> Option<ServingStatus> {
        health(&self.replicas[i].url(), service).await
    }

    /// The replicas whose `registry.v1.NodeRegistry` health is SERVING now.
    pub async fn leaders(&self) -> Vec<usize> {
        let mut leaders = Vec::new();
        for i in 0..self.replicas.len() {
            if self.health(i, LEADER_SERVICE).await == Some(ServingStatus::Serving) {
                leaders.push(i);
            }
        }
        leaders
    }

    /// Waits until exactly one replica leads, and returns it.
    pub async fn wait_leader(&self, timeout: Duration) -> usize {
        test_support::eventually("exactly one replica leads", timeout, || async {
            match self.leaders().await.as_slice() {
                [one] => Ok(*one),
                many => Err(format!("leading: {many:?}")),
            }
        })
        .await
    }

    /// Every node replica `i` lists (its own copy on a follower).
    pub async fn nodes_via(&self, i: usize) -> Result<Nodes, HarnessError> {
        list_nodes(&self.replicas[i].url()).await
    }

    /// Waits until replica `i` lists every agent's node ONLINE.
    pub async fn wait_all_online_via(&self, i: usize, timeout: Duration) -> Nodes {
        self.wait_all_via(i, timeout, false).await
    }

    /// Waits until the leader `i` lists every agent's node ONLINE and has
    /// had a heartbeat from each (its pool status is set). Only then does
    /// every agent hold its Register's reply: a node is listed ONLINE once
    /// its registration is applied in memory, before the store's commit and
    /// the reply. A test that kills or freezes the leader waits for this
    /// first, or an agent may still be waiting out a lost reply (the
    /// agent's registry timeout, 5 s) when the new leader's fresh node
    /// timeout (3 s in these tests) runs out, which is the agent's timing
    /// and not the failover's; or the registration may not be committed
    /// at all, and the node registers again. Pool status is live state: a
    /// follower has none.
    pub async fn wait_all_streaming_via(&self, i: usize, timeout: Duration) -> Nodes {
        self.wait_all_via(i, timeout, true).await
    }

    async fn wait_all_via(&self, i: usize, timeout: Duration, streaming: bool) -> Nodes {
        let url = self.replicas[i].url();
        let ids: Vec<String> = self.agents.iter().map(|a| a.spec.node_id.clone()).collect();
        let what = if streaming {
            "every agent's node ONLINE and beating"
        } else {
            "every agent's node ONLINE"
        };
        test_support::eventually(what, timeout, || {
            let (url, ids) = (url.clone(), ids.clone());
            async move {
                let nodes = list_nodes(&url).await.map_err(|e| e.to_string())?;
                for id in &ids {
                    match nodes.get(id) {
                        Some(node)
                            if node.status() == registry_proto::pb::NodeStatus::Online
                                && (!streaming || !node.pool_status.is_empty()) => {}
                        other => {
                            return Err(format!(
                                "{id}: {:?}, pool status {:?}",
                                other.map(|n| n.status()),
                                other.map(|n| n.pool_status.len())
                            ));
                        }
                    }
                }
                Ok(nodes)
            }
        })
        .await
    }

    /// Runs `registry-ctl --registry <every replica> ARGS...`.
    pub async fn ctl(&self, args: &[&str], timeout: Duration) -> Result<CtlOutput, HarnessError> {
        let bins = binaries()?;
        run_ctl(
            &bins.registry_ctl,
            &self.log_dir.join("registry-ctl.log"),
            &self.registry_arg(),
            args,
            timeout,
        )
        .await
    }

    /// Where this test's logs are.
    pub fn log_dir(&self) -> &std::path::Path {
        &self.log_dir
    }
}

/// Polls every replica's ListNodes every 100 ms (after each round) until
/// stopped, and keeps
/// whatever it ever saw OFFLINE (replica, node) — the tests' "0 OFFLINE at
/// any point".
pub struct OfflineWatch {
    seen: Arc<Mutex<Watched>>,
    stop: CancellationToken,
}

/// What an [`OfflineWatch`] saw.
#[derive(Debug, Default, Clone)]
pub struct Watched {
    /// Every node ever listed OFFLINE, as "NODE on URL".
    pub offline: BTreeSet<String>,
    /// How many polls each replica answered: a watch whose replicas never
    /// answered proves nothing.
    pub answered: std::collections::BTreeMap<String, usize>,
}

impl Watched {
    /// Panics unless no node was ever listed OFFLINE and every replica
    /// answered at least `min_answers` polls.
    pub fn assert_none_offline(&self, min_answers: usize) {
        assert!(
            self.offline.is_empty(),
            "listed OFFLINE: {:?}",
            self.offline
        );
        for (url, answered) in &self.answered {
            assert!(
                *answered >= min_answers,
                "{url} answered {answered} ListNodes polls, fewer than {min_answers}: {:?}",
                self.answered
            );
        }
    }
}

impl OfflineWatch {
    /// Starts polling `urls`.
    pub fn start(urls: Vec<String>) -> Self {
        let answered = urls.iter().map(|url| (url.clone(), 0)).collect();
        let seen = Arc::new(Mutex::new(Watched {
            offline: BTreeSet::new(),
            answered,
        }));
        let stop = CancellationToken::new();
        let (s, st) = (seen.clone(), stop.clone());
        tokio::spawn(async move {
            while !st.is_cancelled() {
                for url in &urls {
                    // A replica that is down or frozen may not answer;
                    // what is listed counts, and how often each answered.
                    let listed =
                        tokio::time::timeout(Duration::from_millis(500), list_nodes(url)).await;
                    if let Ok(Ok(nodes)) = listed {
                        let mut seen = s.lock().unwrap();
                        *seen.answered.entry(url.clone()).or_default() += 1;
                        for node in nodes.values() {
                            if node.status() == registry_proto::pb::NodeStatus::Offline {
                                seen.offline.insert(format!("{} on {url}", node.node_id));
                            }
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Self { seen, stop }
    }

    /// Stops polling; what it saw.
    pub fn finish(self) -> Watched {
        self.stop.cancel();
        self.seen.lock().unwrap().clone()
    }
}

/// Waits until the registry at `url` lists `count` nodes, every one ONLINE
/// and, with `heard`, none suspect (a leader heard every one since it took
/// over; a follower's copy does not say).
pub async fn wait_listed_online(url: &str, count: usize, heard: bool, timeout: Duration) {
    test_support::eventually("every node listed ONLINE", timeout, || async {
        let nodes = list_nodes(url).await.map_err(|e| e.to_string())?;
        let online = nodes
            .values()
            .filter(|n| {
                n.status() == registry_proto::pb::NodeStatus::Online && !(heard && n.suspect)
            })
            .count();
        if nodes.len() == count && online == count {
            Ok(())
        } else {
            Err(format!("{} listed, {online} ONLINE and heard", nodes.len()))
        }
    })
    .await;
}
