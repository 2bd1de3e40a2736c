//! The agent and the registry agree on every rule of the contract: one
//! table of good and bad values, each run through the agent's checks (its
//! configuration, and for pools also a handoff file) and through the
//! registry's `validate::registration`. Both accept or both refuse; a value
//! the agent lets through and the registry refuses would loop on
//! INVALID_ARGUMENT forever.

use node_agent::pools::PoolConfig;
use node_agent::pools::handoff::parse_handoff;
use node_agent::{AgentConfig, FakeGpuSource, GpuSource};
use registry_proto::pb;
use registry_proto::rules::{
    MAX_GPUS, MAX_LABELS, MAX_MODELS_AVAILABLE, MAX_POOL_MIG_UUIDS, MAX_POOLS,
};

/// One value under test, in the field it goes to.
#[derive(Debug, Clone)]
enum Case {
    NodeId(String),
    MachineId(String),
    Address(String),
    PoolId(String),
    LabelKey(String),
    LabelValue(String),
    Model(String),
    Engine(String),
    EngineVersion(String),
    /// A pool naming this many GPU indices.
    GpuIndices(usize),
    /// This many pools.
    Pools(usize),
    /// This many labels.
    Labels(usize),
    /// A pool's endpoint URL.
    Endpoint(String),
    /// One staged model name.
    ModelAvailable(String),
    /// This many staged models.
    ModelsAvailable(usize),
}

/// The table: each value and whether the contract accepts it.
fn table() -> Vec<(Case, bool)> {
    use Case::*;
    let s = |v: &str| v.to_owned();
    vec![
        (NodeId(s("gpu-01")), true),
        (NodeId("a".repeat(63)), true),
        (NodeId(s("")), false),
        (NodeId(s("Gpu-01")), false),
        (NodeId(s("gpu_01")), false),
        (NodeId(s("-gpu")), false),
        (NodeId(s("gpu-")), false),
        (NodeId(s("gpu.01")), false),
        (NodeId("a".repeat(64)), false),
        (MachineId(s("4c4c4544004d3510")), true),
        (MachineId(s("host:A_1/b")), true),
        (MachineId("x".repeat(128)), true),
        (MachineId(s("")), false),
        (MachineId(s("has space")), false),
        (MachineId(s("tab\there")), false),
        (MachineId(s("ünï")), false),
        (MachineId("x".repeat(129)), false),
        (Address(s("http://10.0.0.5:9200")), true),
        (Address(s("https://gpu-01.example.com/v1")), true),
        (Address(s("http://[::1]:9200")), true),
        (Address(s("")), false),
        (Address(s("10.0.0.5:9200")), false),
        (Address(s("ftp://gpu-01/")), false),
        (Address(s("http://")), false),
        (Address(s("not a url")), false),
        (Address(s("http://host:65536")), false),
        (Address(s("http://[::1]:99999")), false),
        (Address(s("http://user:pass@host:9200")), false),
        (Address(format!("http://h/{}", "p".repeat(2048))), false),
        (PoolId(s("pool-0")), true),
        (PoolId(s("Pool_0.a-b")), true),
        (PoolId("p".repeat(63)), true),
        (PoolId(s("pool 0")), false),
        (PoolId(s("pool/0")), false),
        (PoolId("p".repeat(64)), false),
        (LabelKey(s("zone")), true),
        (LabelKey(s("team/owner.x_y-z")), true),
        (LabelKey("k".repeat(63)), true),
        (LabelKey(s("")), false),
        (LabelKey(s("a b")), false),
        (LabelKey(s("a=b")), false),
        (LabelKey("k".repeat(64)), false),
        (LabelValue(s("")), true),
        (LabelValue(s("eu west 1")), true),
        (LabelValue("v".repeat(256)), true),
        (LabelValue("é".repeat(128)), true),
        (LabelValue("v".repeat(257)), false),
        (LabelValue("é".repeat(129)), false),
        (LabelValue(s("line\nbreak")), false),
        (Model(s("llama-3.1-8b-instruct")), true),
        (Model("m".repeat(256)), true),
        (Model("m".repeat(257)), false),
        (Model(s("nul\u{0}byte")), false),
        (Engine(s("llamacpp")), true),
        (Engine("e".repeat(257)), false),
        (Engine(s("bell\u{7}")), false),
        (EngineVersion(s("b4000")), true),
        (EngineVersion("ü".repeat(200)), false),
        (GpuIndices(0), true),
        (GpuIndices(MAX_GPUS), true),
        (GpuIndices(MAX_GPUS + 1), false),
        (Pools(0), true),
        (Pools(MAX_POOLS), true),
        (Pools(MAX_POOLS + 1), false),
        (Labels(MAX_LABELS), true),
        (Labels(MAX_LABELS + 1), false),
        (Endpoint(s("")), true),
        (Endpoint(s("http://10.0.0.5:8000")), true),
        (Endpoint(s("https://pool-0.gpu-01.example.com/v1")), true),
        (Endpoint(s("http://[::1]:8000")), true),
        (Endpoint(s("10.0.0.5:8000")), false),
        (Endpoint(s("grpc://10.0.0.5:8000")), false),
        (Endpoint(s("http://")), false),
        (Endpoint(s("not a url")), false),
        (Endpoint(format!("http://h/{}", "p".repeat(2048))), false),
        (ModelAvailable(s("qwen2.5-7b-instruct")), true),
        (ModelAvailable("m".repeat(256)), true),
        (ModelAvailable(s("")), false),
        (ModelAvailable("m".repeat(257)), false),
        (ModelAvailable(s("tab\there")), false),
        (ModelsAvailable(MAX_MODELS_AVAILABLE), true),
        (ModelsAvailable(MAX_MODELS_AVAILABLE + 1), false),
    ]
}

/// A valid configuration with `value` applied.
fn config_with(value: &Case) -> AgentConfig {
    let mut config = AgentConfig::new("http://127.0.0.1:50051", "gpu-01");
    config.machine_id = "4c4c4544004d3510".into();
    config.address = "http://10.0.0.5:9200".into();
    config.gpus.fake = Some(2);
    config.pools = vec![PoolConfig::new("pool-0")];
    let pool = &mut config.pools[0];
    match value.clone() {
        Case::NodeId(v) => config.node_id = v,
        Case::MachineId(v) => config.machine_id = v,
        Case::Address(v) => config.address = v,
        Case::PoolId(v) => pool.id = v,
        Case::LabelKey(v) => {
            config.labels.insert(v, "x".into());
        }
        Case::LabelValue(v) => {
            config.labels.insert("zone".into(), v);
        }
        Case::Model(v) => pool.model = Some(v),
        Case::Engine(v) => pool.engine = Some(v),
        Case::EngineVersion(v) => pool.engine_version = Some(v),
        Case::GpuIndices(n) => pool.gpus = Some((0..n as u32).collect()),
        Case::Pools(n) => {
            config.pools = (0..n).map(|i| PoolConfig::new(format!("p{i}"))).collect();
        }
        Case::Labels(n) => {
            config.labels = (0..n).map(|i| (format!("k{i}"), "v".into())).collect();
        }
        Case::Endpoint(v) => pool.endpoint = Some(v),
        Case::ModelAvailable(v) => config.models_available = vec![v],
        Case::ModelsAvailable(n) => {
            config.models_available = (0..n).map(|i| format!("m{i}")).collect();
        }
    }
    config
}

/// The RegisterRequest the agent sends for `config`.
fn register_request(config: &AgentConfig) -> pb::RegisterRequest {
    let inventory = FakeGpuSource::new(2, "seed").inventory().unwrap();
    node_agent::registration::register_request(
        config,
        &config.pools,
        pb::Capabilities {
            gpus: inventory.gpus,
            cpu_cores: 8,
            ram_total_bytes: 1 << 30,
            driver_version: inventory.driver_version,
            cuda_version: inventory.cuda_version,
        },
    )
}

/// The same pool written as a handoff file, where the value is a pool's.
fn handoff_json(value: &Case) -> Option<String> {
    let field = |key: &str, v: &str| serde_json::json!({ key: v }).to_string();
    match value {
        Case::PoolId(v) => Some(field("pool_id", v)),
        Case::Model(v) => Some(field("model", v)),
        Case::Engine(v) => Some(field("engine", v)),
        Case::EngineVersion(v) => Some(field("engine_version", v)),
        Case::GpuIndices(n) => Some(
            serde_json::json!({ "device_mask": (0..*n as u32).collect::<Vec<_>>() }).to_string(),
        ),
        // A handoff file's `url` is the endpoint, but it is also probed and
        // the probe accepts only plain http://, stricter than the contract:
        // endpoints are compared on the configuration path only.
        _ => None,
    }
}

#[test]
fn the_agent_and_the_registry_accept_and_refuse_the_same_values() {
    for (value, valid) in table() {
        let config = config_with(&value);
        let agent = config.validate();
        let server = registry_server::validate::registration(register_request(&config));
        assert_eq!(
            agent.is_ok(),
            valid,
            "agent on {value:?}: {:?}",
            agent.err().map(|e| e.to_string())
        );
        assert_eq!(
            server.is_ok(),
            valid,
            "registry on {value:?}: {:?}",
            server.err().map(|e| e.to_string())
        );
        if let Some(json) = handoff_json(&value) {
            let pool = parse_handoff("pool-0", json.as_bytes());
            assert_eq!(pool.is_ok(), valid, "handoff file {json}: {pool:?}");
        }
    }
}

#[test]
fn the_agent_leaves_out_handoff_pools_beyond_the_limit_so_the_registry_accepts() {
    let handoff: Vec<PoolConfig> = (0..MAX_POOLS + 10)
        .map(|i| PoolConfig::new(format!("h{i:03}")))
        .collect();
    let merged = node_agent::pools::merge_pools(&[PoolConfig::new("static")], &handoff);
    assert_eq!(merged.pools.len(), MAX_POOLS);
    assert_eq!(merged.left_out.len(), 11);
    let mut config = config_with(&Case::Pools(0));
    config.pools = merged.pools;
    registry_server::validate::registration(register_request(&config)).unwrap();
}

#[test]
fn the_agent_and_the_registry_agree_on_a_pools_mig_slices() {
    let inventory = FakeGpuSource::new(2, "seed")
        .with_mig(&["1g.10gb".into(), "3g.40gb".into()])
        .inventory()
        .unwrap();
    let caps = pb::Capabilities {
        gpus: inventory.gpus,
        ..Default::default()
    };
    let listed = caps.gpus[1].mig_instances[0].uuid.clone();
    let cases: Vec<(Vec<String>, bool)> = vec![
        (vec![], true),
        (vec![listed.clone()], true),
        (vec!["MIG-not-here".into()], false),
        (vec![listed.clone(), listed.clone()], false),
        (vec![listed.clone(); MAX_POOL_MIG_UUIDS + 1], false),
    ];
    for (uuids, valid) in cases {
        let mut config = config_with(&Case::Pools(0));
        let mut pool = PoolConfig::new("pool-0");
        pool.mig_uuids = Some(uuids.clone());
        config.pools = vec![pool];
        let agent = config
            .validate()
            .and_then(|()| node_agent::pools::check_mig_uuids(&config.pools, &caps));
        let request =
            node_agent::registration::register_request(&config, &config.pools, caps.clone());
        let server = registry_server::validate::registration(request);
        assert_eq!(agent.is_ok(), valid, "agent on {uuids:?}: {agent:?}");
        assert_eq!(server.is_ok(), valid, "registry on {uuids:?}: {server:?}");
    }
}
