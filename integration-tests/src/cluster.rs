//! One test's world: a registry, its agents, their logs, and views of the
//! registry's state through its gRPC API.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use registry_proto::pb;
use registry_proto::pb::node_registry_client::NodeRegistryClient;
use test_support::eventually;

use crate::agent::{AgentProcess, AgentSpec};
use crate::binaries::binaries;
use crate::ctl::{CtlOutput, WatchProcess, run_ctl};
use crate::error::HarnessError;
use crate::registry::{RegistryProcess, Timing};

/// The registry's nodes by node_id.
pub type Nodes = BTreeMap<String, pb::Node>;

/// A registry and its agents, all killed when this is dropped.
#[derive(Debug)]
pub struct Cluster {
    /// The agents, in the order they were started (dropped, so killed,
    /// before the registry).
    agents: Vec<AgentProcess>,
    /// The registry.
    registry: RegistryProcess,
    /// Where every process of this test logs.
    log_dir: PathBuf,
}

impl Cluster {
    /// Builds the binaries if needed, then starts a registry with `timing`
    /// and one agent per spec. Logs go to `<target>/e2e-logs/<test>/`,
    /// emptied first, and stay there after the test for reading.
    pub async fn start(
        test: &str,
        timing: Timing,
        specs: Vec<AgentSpec>,
    ) -> Result<Self, HarnessError> {
        Self::start_with_args(test, timing, specs, Vec::new()).await
    }

    /// [`Cluster::start`] with further registry arguments (see
    /// [`RegistryProcess::start_with_args`]).
    pub async fn start_with_args(
        test: &str,
        timing: Timing,
        specs: Vec<AgentSpec>,
        registry_args: Vec<String>,
    ) -> Result<Self, HarnessError> {
        let bins = binaries()?;
        let log_dir = bins.target_dir.join("e2e-logs").join(test);
        match std::fs::remove_dir_all(&log_dir) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => {
                return Err(HarnessError::io(
                    format!("emptying {}", log_dir.display()),
                    err,
                ));
            }
        }
        std::fs::create_dir_all(&log_dir)
            .map_err(|err| HarnessError::io(format!("creating {}", log_dir.display()), err))?;
        let registry = RegistryProcess::start_with_args(
            &bins.registry_server,
            &log_dir.join("registry.log"),
            timing,
            registry_args,
        )
        .await?;
        let mut cluster = Self {
            agents: Vec::with_capacity(specs.len()),
            registry,
            log_dir,
        };
        for mut spec in specs {
            // The reconnect backoff's ceiling at 1 s unless the test says
            // otherwise: tests that restart the registry wait a few
            // heartbeat intervals for the agents, and a few refused
            // reconnects in a row would stretch one wait past that with
            // node-agent's 30 s. (The replica harness keeps the default,
            // so its failover bounds test the agent's own 1 s cap on
            // refusals by a follower.)
            spec.backoff_max.get_or_insert(Duration::from_secs(1));
            let log = cluster.log_dir.join(format!("agent-{}.log", spec.node_id));
            let agent = AgentProcess::start(
                &bins.node_agent,
                &log,
                &cluster.registry.url(),
                timing.heartbeat_interval,
                spec,
            )?;
            cluster.agents.push(agent);
        }
        Ok(cluster)
    }

    /// The registry.
    pub fn registry(&mut self) -> &mut RegistryProcess {
        &mut self.registry
    }

    /// The registry's URL, as agents and clients use it.
    pub fn url(&self) -> String {
        self.registry.url()
    }

    /// The registry's timing.
    pub fn timing(&self) -> Timing {
        self.registry.timing()
    }

    /// The agents.
    pub fn agents(&self) -> &[AgentProcess] {
        &self.agents
    }

    /// The agent of `node_id`.
    ///
    /// # Panics
    ///
    /// When the cluster has no such agent (a mistake in the test).
    pub fn agent(&mut self, node_id: &str) -> &mut AgentProcess {
        self.agents
            .iter_mut()
            .find(|agent| agent.spec.node_id == node_id)
            .unwrap_or_else(|| panic!("the cluster has no agent {node_id}"))
    }

    /// Starts `node_id`'s agent again with the same spec, its log appended
    /// to the same file. Meant for after a SIGTERM or SIGKILL; an old
    /// process still running is killed when its guard is replaced.
    ///
    /// # Panics
    ///
    /// When the cluster has no such agent (a mistake in the test).
    pub fn restart_agent(&mut self, node_id: &str) -> Result<(), HarnessError> {
        let bins = binaries()?;
        let url = self.registry.url();
        let interval = self.timing().heartbeat_interval;
        let agent = self.agent(node_id);
        let log = agent.process.log().to_path_buf();
        *agent = AgentProcess::start(&bins.node_agent, &log, &url, interval, agent.spec.clone())?;
        Ok(())
    }

    /// Runs `registry-ctl --registry URL ARGS...` to its end (bounded by
    /// `timeout`) and returns its output; its stderr is also appended to
    /// `registry-ctl.log` beside the other logs.
    pub async fn ctl(&self, args: &[&str], timeout: Duration) -> Result<CtlOutput, HarnessError> {
        let bins = binaries()?;
        run_ctl(
            &bins.registry_ctl,
            &self.log_dir.join("registry-ctl.log"),
            &self.registry.url(),
            args,
            timeout,
        )
        .await
    }

    /// Every node the registry lists, read through ListNodes.
    pub async fn nodes(&self) -> Result<Nodes, HarnessError> {
        list_nodes(&self.registry.url()).await
    }

    /// Starts `registry-ctl -o json watch` against the registry; its stderr
    /// goes to `registry-ctl-watch.log` beside the other logs.
    pub fn start_watch(&self) -> Result<WatchProcess, HarnessError> {
        let bins = binaries()?;
        WatchProcess::start(
            &bins.registry_ctl,
            &self.log_dir.join("registry-ctl-watch.log"),
            &self.registry.url(),
        )
    }

    /// Polls ListNodes until `check` accepts the nodes, and returns what it
    /// returned; panics after `timeout` with the last reason.
    pub async fn wait_nodes<T>(
        &self,
        what: &str,
        timeout: Duration,
        check: impl Fn(&Nodes) -> Result<T, String>,
    ) -> T {
        let url = self.registry.url();
        eventually(what, timeout, || {
            let url = url.clone();
            let check = &check;
            async move {
                let nodes = list_nodes(&url).await.map_err(|err| err.to_string())?;
                check(&nodes)
            }
        })
        .await
    }

    /// Waits until every agent's node is listed ONLINE and, for an agent
    /// with pools, has had a heartbeat (its pool status is set); returns
    /// the nodes. A node is listed as soon as the registry has taken its
    /// registration, a moment before the agent has the reply: a test that
    /// then signals or freezes an agent waits for its first beat, or the
    /// agent may still be registering (and leave without a session to
    /// deregister, or register again).
    pub async fn wait_all_online(&self, timeout: Duration) -> Nodes {
        let agents: Vec<(String, bool)> = self
            .agents
            .iter()
            .map(|agent| (agent.spec.node_id.clone(), !agent.spec.pools.is_empty()))
            .collect();
        let ids: Vec<&str> = agents.iter().map(|(id, _)| id.as_str()).collect();
        self.wait_nodes(
            &format!("{} are ONLINE and beating", ids.join(", ")),
            timeout,
            |nodes| {
                for (id, pools) in &agents {
                    expect_status(nodes, id, pb::NodeStatus::Online)?;
                    if *pools && nodes[id].pool_status.is_empty() {
                        return Err(format!("{id} has not sent a heartbeat yet"));
                    }
                }
                Ok(nodes.clone())
            },
        )
        .await
    }
}

/// Asks the registry at `url` for up to `limit` pools serving `model`
/// (FindPools, other filters left at their defaults).
pub async fn find_pools(
    url: &str,
    model: &str,
    limit: u32,
) -> Result<Vec<pb::PoolCandidate>, HarnessError> {
    let mut client = NodeRegistryClient::connect(url.to_owned())
        .await
        .map_err(|source| HarnessError::Connect {
            url: url.to_owned(),
            source,
        })?;
    let found = client
        .find_pools(pb::FindPoolsRequest {
            model: model.to_owned(),
            limit,
            ..Default::default()
        })
        .await
        .map_err(|status| HarnessError::Rpc {
            call: "FindPools",
            status: Box::new(status),
        })?
        .into_inner();
    Ok(found.candidates)
}

/// Reads every node from the registry at `url`, all pages.
pub async fn list_nodes(url: &str) -> Result<Nodes, HarnessError> {
    let mut client = NodeRegistryClient::connect(url.to_owned())
        .await
        .map_err(|source| HarnessError::Connect {
            url: url.to_owned(),
            source,
        })?;
    let mut nodes = Nodes::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_nodes(pb::ListNodesRequest {
                page_token: page_token.clone(),
                ..Default::default()
            })
            .await
            .map_err(|status| HarnessError::Rpc {
                call: "ListNodes",
                status: Box::new(status),
            })?
            .into_inner();
        for node in page.nodes {
            nodes.insert(node.node_id.clone(), node);
        }
        if page.next_page_token.is_empty() {
            return Ok(nodes);
        }
        page_token = page.next_page_token;
    }
}

/// `Ok(node)` when `node_id` is listed with `want`, otherwise the reason.
pub fn expect_status<'a>(
    nodes: &'a Nodes,
    node_id: &str,
    want: pb::NodeStatus,
) -> Result<&'a pb::Node, String> {
    let node = nodes
        .get(node_id)
        .ok_or_else(|| format!("{node_id} is not listed (listed: {})", listed(nodes)))?;
    if node.status() == want {
        Ok(node)
    } else {
        Err(format!(
            "{node_id} is {}, want {}",
            node.status().as_str_name(),
            want.as_str_name()
        ))
    }
}

/// The listed nodes with their status, for messages.
pub fn listed(nodes: &Nodes) -> String {
    if nodes.is_empty() {
        return "none".to_owned();
    }
    nodes
        .values()
        .map(|node| format!("{} {}", node.node_id, node.status().as_str_name()))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, status: pb::NodeStatus) -> pb::Node {
        pb::Node {
            node_id: id.to_owned(),
            status: status as i32,
            ..Default::default()
        }
    }

    #[test]
    fn expect_status_says_what_it_saw() {
        let mut nodes = Nodes::new();
        nodes.insert("a".into(), node("a", pb::NodeStatus::Offline));
        assert!(expect_status(&nodes, "a", pb::NodeStatus::Offline).is_ok());
        assert_eq!(
            expect_status(&nodes, "a", pb::NodeStatus::Online).unwrap_err(),
            "a is NODE_STATUS_OFFLINE, want NODE_STATUS_ONLINE"
        );
        assert_eq!(
            expect_status(&nodes, "b", pb::NodeStatus::Online).unwrap_err(),
            "b is not listed (listed: a NODE_STATUS_OFFLINE)"
        );
    }
}
