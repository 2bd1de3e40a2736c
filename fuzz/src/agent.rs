//! `agent_config`: arbitrary text as the agent reads it from operators and
//! provisioners: its TOML config file (resolved with no flags, as
//! `node-agent --config FILE` does), a `--pool` value and a handoff file.
//!
//! Checked: nothing panics, and whatever the agent accepts satisfies the
//! registry's own rules ([`registry_proto::rules`]), so an accepted config
//! or handoff file can never make the registry refuse the registration:
//! - a resolved config's RegisterRequest (its pools, labels, models,
//!   metrics address) passes `rules::register_request`, against a host
//!   that lists the MIG slices the pools name;
//! - a handoff file's pool passes the pool rules, the agent's own pool
//!   validation, and a RegisterRequest carrying it passes as above.

use std::collections::BTreeSet;
use std::path::Path;

use node_agent::config::{AgentConfig, Cli, FileConfig};
use node_agent::pools::handoff::parse_handoff;
use node_agent::pools::static_pools::parse_pool_arg;
use node_agent::pools::{PoolConfig, check_mig_uuids};
use node_agent::registration::register_request;
use registry_proto::pb;
use registry_proto::rules::{self, Field, MAX_GPUS, MAX_MIG_INSTANCES};

/// Stem of the handoff file the bytes are read as (`<stem>.json`).
const STEM: &str = "engine-7";

/// One input: the same bytes as each kind of text.
pub fn run(data: &[u8]) {
    handoff(data);
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    config(text);
    if let Some(line) = text.lines().next()
        && let Ok(pool) = parse_pool_arg(line)
        && pool.validate().is_ok()
    {
        assert_accepted_pools(&[pool]);
    }
}

fn config(text: &str) {
    let Ok(file) = FileConfig::parse(text, Path::new("agent.toml")) else {
        return;
    };
    let Ok(config) = AgentConfig::resolve(Cli::default(), file) else {
        return;
    };
    config
        .validate()
        .expect("a resolved config passes its own validation");
    assert_registrable(&config, &config.pools);
}

fn handoff(data: &[u8]) {
    let Ok(pool) = parse_handoff(STEM, data) else {
        return;
    };
    if let Err(e) = pool.validate() {
        panic!("an accepted handoff pool fails the agent's pool validation: {e}");
    }
    assert_accepted_pools(&[pool]);
}

/// Pools the agent accepted, registered by a plain valid node.
fn assert_accepted_pools(pools: &[PoolConfig]) {
    let config = AgentConfig {
        machine_id: "machine-1".into(),
        ..AgentConfig::new("http://registry.example:50051", "gpu-node-1")
    };
    assert_registrable(&config, pools);
}

/// The registration the agent would send for `config` and `pools` passes
/// the registry's rules, on a host listing every MIG slice the pools name.
fn assert_registrable(config: &AgentConfig, pools: &[PoolConfig]) {
    for (index, pool) in pools.iter().enumerate() {
        if let Err(e) = rules::pool_spec(index, &pool.spec()) {
            panic!("accepted pool {:?} breaks a rule: {e}", pool.id);
        }
    }
    let Some(capabilities) = host_with_slices(pools) else {
        return;
    };
    if check_mig_uuids(pools, &capabilities).is_err() {
        // The agent stops at start with this error, naming the pool.
        return;
    }
    let request = register_request(config, pools, capabilities);
    if let Err(e) = rules::register_request(&request) {
        panic!("the agent accepted a registration the registry refuses: {e}\n{request:?}");
    }
}

/// A host whose GPUs list every MIG slice the pools name, when a real one
/// could (each a valid text, at most what 64 GPUs hold).
fn host_with_slices(pools: &[PoolConfig]) -> Option<pb::Capabilities> {
    let slices: BTreeSet<&str> = pools
        .iter()
        .flat_map(|p| p.mig_uuids.iter().flatten())
        .map(String::as_str)
        .collect();
    if slices.len() > MAX_MIG_INSTANCES * MAX_GPUS
        || slices
            .iter()
            .any(|s| rules::text(Field::Name("uuid"), s).is_err())
    {
        return None;
    }
    let slices: Vec<&str> = slices.into_iter().collect();
    let gpus = slices
        .chunks(MAX_MIG_INSTANCES)
        .enumerate()
        .map(|(index, chunk)| pb::GpuInfo {
            index: index as u32,
            uuid: format!("GPU-{index}"),
            name: "NVIDIA H100 80GB HBM3".into(),
            compute_capability: "9.0".into(),
            mig_enabled: true,
            mig_instances: chunk
                .iter()
                .enumerate()
                .map(|(i, uuid)| pb::MigInstance {
                    uuid: (*uuid).to_owned(),
                    profile: "1g.10gb".into(),
                    memory_total_bytes: 10 << 30,
                    index: i as u32,
                })
                .collect(),
            ..Default::default()
        })
        .collect();
    Some(pb::Capabilities {
        gpus,
        ..Default::default()
    })
}
