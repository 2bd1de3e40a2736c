//! Property tests (coverage-guided fuzzing of the same code is in `fuzz/`,
//! see docs/FUZZING.md; the state machine's invariants are shared through
//! `Registry::check_consistency`).
//!
//! - Validation decides exactly: a valid RegisterRequest or
//!   HeartbeatRequest with exactly one field changed, to a value that is
//!   valid or invalid by construction, is accepted when the value is valid
//!   and refused with `InvalidArgument` naming that field's path when it is
//!   not. Both halves run in every pass; the counts are printed (see them
//!   with `--nocapture`).
//! - Validation never panics on arbitrary requests, and refuses only with
//!   `InvalidArgument`.
//! - The registry's state machine, driven by arbitrary sequences of
//!   register / heartbeat / stale heartbeat / deregister / clock advances on
//!   tokio's paused clock, always agrees with a simple reference model.
//!
//! `PROPTEST_CASES` sets the number of cases per property (default 256);
//! `.ci/run` runs a longer, time-bounded pass.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, TestRunner};
use registry_proto::convert::to_proto_timestamp;
use registry_proto::pb;
use registry_server::RegistryError;
use registry_server::registry::{Beat, Now, Registration, Registry, Timing};
use registry_server::validate;

// ---------------------------------------------------------------------
// Values valid or invalid by construction
// ---------------------------------------------------------------------

// The documented limits, stated here rather than read from validate.rs, so
// a changed limit fails this test instead of moving it along.
/// Most pools a node may run.
const MAX_POOLS: usize = 64;
/// Most staged model names (`models_available`).
const MAX_MODELS_AVAILABLE: usize = 256;
/// Most GPUs a node may report, and GPU indices a pool may name.
const MAX_GPUS: usize = 64;
/// Most labels a node may carry.
const MAX_LABELS: usize = 64;
/// Longest free text, in bytes.
const MAX_TEXT_LEN: usize = 256;
/// Longest node address, in bytes.
const MAX_ADDRESS_LEN: usize = 2048;

/// A value for one field, and whether the rules accept it.
#[derive(Debug, Clone)]
struct Candidate<T> {
    value: T,
    valid: bool,
}

/// Values from `valid` marked acceptable and from `invalid` marked not,
/// half and half.
fn either<T: Debug + Clone + 'static>(
    valid: impl Strategy<Value = T> + 'static,
    invalid: impl Strategy<Value = T> + 'static,
) -> BoxedStrategy<Candidate<T>> {
    prop_oneof![
        valid.prop_map(|value| Candidate { value, valid: true }),
        invalid.prop_map(|value| Candidate {
            value,
            valid: false
        }),
    ]
    .boxed()
}

/// A valid node id: a DNS label of 1 to 63 characters.
fn dns_label() -> BoxedStrategy<String> {
    prop_oneof![
        "[a-z0-9]",
        "[a-z0-9][a-z0-9-]{0,61}[a-z0-9]",
        Just("n".repeat(63)),
    ]
    .boxed()
}

fn invalid_node_id() -> BoxedStrategy<String> {
    prop_oneof![
        Just(String::new()),
        "[a-z0-9]{0,5}[A-Z][a-z0-9]{0,5}",
        Just("n".repeat(64)),
        "-[a-z0-9]{0,10}",
        "[a-z0-9]{1,10}-",
        "[a-z0-9]{0,5}[_. /é][a-z0-9]{0,5}",
    ]
    .boxed()
}

/// A control character (`char::is_control`: C0, DEL and C1).
fn control_char() -> impl Strategy<Value = char> {
    prop_oneof![0u32..0x20, Just(0x7f), 0x80u32..0xa0]
        .prop_map(|code| char::from_u32(code).expect("a control code point"))
}

/// Free text the rules accept: at most 256 bytes, no control characters.
fn valid_text() -> BoxedStrategy<String> {
    prop_oneof![
        "[ -~]{0,32}",
        "\\PC{0,32}",
        Just("a".repeat(MAX_TEXT_LEN)),
        Just("é".repeat(MAX_TEXT_LEN / 2)),
    ]
    .boxed()
}

/// Free text the rules refuse: 257 bytes, or a control character.
fn invalid_text() -> BoxedStrategy<String> {
    prop_oneof![
        Just("a".repeat(MAX_TEXT_LEN + 1)),
        Just(format!("{}a", "é".repeat(MAX_TEXT_LEN / 2))),
        ("[ -~]{0,16}", control_char(), "[ -~]{0,16}")
            .prop_map(|(head, control, tail)| format!("{head}{control}{tail}")),
    ]
    .boxed()
}

fn text_candidate() -> BoxedStrategy<Candidate<String>> {
    either(valid_text(), invalid_text())
}

fn valid_machine_id() -> BoxedStrategy<String> {
    prop_oneof!["[!-~]{1,40}", Just("m".repeat(128))].boxed()
}

fn invalid_machine_id() -> BoxedStrategy<String> {
    prop_oneof![
        Just(String::new()),
        Just("m".repeat(129)),
        "[!-~]{0,5} [!-~]{0,5}",
        "[!-~]{0,5}[é\t][!-~]{0,5}",
    ]
    .boxed()
}

fn host() -> BoxedStrategy<String> {
    prop_oneof![
        "[a-z0-9]([a-z0-9-]{0,15}[a-z0-9])?(\\.[a-z0-9]([a-z0-9-]{0,15}[a-z0-9])?){0,3}",
        (any::<u8>(), any::<u8>(), any::<u8>(), any::<u8>())
            .prop_map(|(a, b, c, d)| format!("{a}.{b}.{c}.{d}")),
        Just("[::1]".to_owned()),
    ]
    .boxed()
}

fn valid_address() -> BoxedStrategy<String> {
    let url = (
        prop_oneof![Just("http"), Just("https")],
        host(),
        prop::option::of(1u16..),
        "(/[a-z0-9._~-]{0,10}){0,3}",
    )
        .prop_map(|(scheme, host, port, path)| {
            let port = port.map(|p| format!(":{p}")).unwrap_or_default();
            format!("{scheme}://{host}{port}{path}")
        });
    prop_oneof![url, Just(long_address(MAX_ADDRESS_LEN))].boxed()
}

fn invalid_address() -> BoxedStrategy<String> {
    prop_oneof![
        Just(String::new()),
        Just(long_address(MAX_ADDRESS_LEN + 1)),
        ("(ftp|grpc|file|ws)", host()).prop_map(|(scheme, host)| format!("{scheme}://{host}")),
        host().prop_map(|host| format!("{host}:9200")),
        Just("http://".to_owned()),
        Just("https://:9200".to_owned()),
        Just("http:// spaced.example".to_owned()),
        Just("http://node.example:65536".to_owned()),
        Just("http://user:pass@node.example".to_owned()),
    ]
    .boxed()
}

/// A metrics URL: empty (none) or a valid address.
fn valid_optional_address() -> BoxedStrategy<String> {
    prop_oneof![Just(String::new()), valid_address()].boxed()
}

/// A metrics URL the rules refuse: any invalid address but the empty one.
fn invalid_optional_address() -> BoxedStrategy<String> {
    invalid_address()
        .prop_filter("empty means none", |a| !a.is_empty())
        .boxed()
}

/// `http://node.example/aaa…` of exactly `len` bytes.
fn long_address(len: usize) -> String {
    let head = "http://node.example/";
    format!("{head}{}", "a".repeat(len - head.len()))
}

fn valid_pool_id() -> BoxedStrategy<String> {
    prop_oneof!["[A-Za-z0-9._-]{1,63}", Just("p".repeat(63))].boxed()
}

fn invalid_pool_id() -> BoxedStrategy<String> {
    prop_oneof![
        Just(String::new()),
        Just("p".repeat(64)),
        "[a-z]{0,5}[ /:é][a-z]{0,5}",
    ]
    .boxed()
}

fn valid_label_key() -> BoxedStrategy<String> {
    prop_oneof!["[A-Za-z0-9._/-]{1,63}", Just("k".repeat(63))].boxed()
}

fn invalid_label_key() -> BoxedStrategy<String> {
    prop_oneof![
        Just(String::new()),
        Just("k".repeat(64)),
        "[a-z]{0,5}[ :=é][a-z]{0,5}",
    ]
    .boxed()
}

fn valid_compute_capability() -> BoxedStrategy<String> {
    prop_oneof![Just(String::new()), "[0-9]{1,3}\\.[0-9]{1,4}"].boxed()
}

fn invalid_compute_capability() -> BoxedStrategy<String> {
    prop_oneof![
        "[0-9]{1,3}",
        "[0-9]{1,3}\\.",
        "\\.[0-9]{1,3}",
        "[0-9]\\.[0-9]\\.[0-9]",
        "[a-z]{1,2}\\.[0-9]",
        Just("123.45678".to_owned()),
    ]
    .boxed()
}

/// An entry count up to `max` (valid) or above it (invalid).
fn count(max: usize) -> BoxedStrategy<Candidate<usize>> {
    either(
        prop_oneof![Just(max), 0..max],
        prop_oneof![Just(max + 1), max + 1..max + 8],
    )
}

/// A path element for a label key, as validation quotes it.
fn label_path(key: &str) -> String {
    format!("labels[{key:?}]")
}

/// An id not yet in `taken`.
fn unused_id(prefix: &str, taken: impl Fn(&str) -> bool) -> String {
    (0..)
        .map(|k| format!("{prefix}-{k}"))
        .find(|id| !taken(id))
        .expect("an unused id")
}

// ---------------------------------------------------------------------
// Valid requests
// ---------------------------------------------------------------------

fn valid_pool_spec(pool_id: String) -> BoxedStrategy<pb::PoolSpec> {
    (
        valid_text(),
        valid_text(),
        valid_text(),
        any::<u32>(),
        prop::collection::vec(any::<u32>(), 0..=8),
        valid_optional_address(),
    )
        .prop_map(
            move |(engine, model, engine_version, slots_total, gpu_indices, metrics_url)| {
                pb::PoolSpec {
                    pool_id: pool_id.clone(),
                    engine,
                    model,
                    slots_total,
                    gpu_indices,
                    engine_version,
                    metrics_url,
                    endpoint: String::new(),
                    mig_uuids: Vec::new(),
                }
            },
        )
        .boxed()
}

fn valid_gpu_info(index: u32) -> BoxedStrategy<pb::GpuInfo> {
    (
        valid_text(),
        valid_text(),
        valid_text(),
        valid_compute_capability(),
        any::<u64>(),
        any::<bool>(),
    )
        .prop_map(
            move |(uuid, name, pci_bus_id, compute_capability, memory_total_bytes, mig_enabled)| {
                pb::GpuInfo {
                    index,
                    uuid,
                    name,
                    memory_total_bytes,
                    compute_capability,
                    pci_bus_id,
                    mig_enabled,
                    ..Default::default()
                }
            },
        )
        .boxed()
}

fn valid_capabilities() -> BoxedStrategy<Option<pb::Capabilities>> {
    let gpus = prop::collection::hash_set(0u32..1000, 0..=6)
        .prop_flat_map(|indices| indices.into_iter().map(valid_gpu_info).collect::<Vec<_>>());
    prop::option::of(
        (gpus, any::<u32>(), any::<u64>(), valid_text(), valid_text()).prop_map(
            |(gpus, cpu_cores, ram_total_bytes, driver_version, cuda_version)| pb::Capabilities {
                gpus,
                cpu_cores,
                ram_total_bytes,
                driver_version,
                cuda_version,
            },
        ),
    )
    .boxed()
}

/// A RegisterRequest every rule accepts, sizes from empty to a few entries
/// (the edits reach the limits).
fn valid_register_request() -> BoxedStrategy<pb::RegisterRequest> {
    let pools = prop::collection::hash_set(valid_pool_id(), 0..=6)
        .prop_flat_map(|ids| ids.into_iter().map(valid_pool_spec).collect::<Vec<_>>());
    let labels = prop::collection::hash_map(valid_label_key(), valid_text(), 0..=6);
    (
        dns_label(),
        valid_machine_id(),
        valid_address(),
        pools,
        valid_capabilities(),
        valid_text(),
        labels,
        valid_optional_address(),
    )
        .prop_map(
            |(
                node_id,
                machine_id,
                address,
                pools,
                capabilities,
                agent_version,
                labels,
                metrics_address,
            )| {
                pb::RegisterRequest {
                    node_id,
                    machine_id,
                    address,
                    pools,
                    capabilities,
                    agent_version,
                    labels,
                    metrics_address,
                    models_available: Vec::new(),
                }
            },
        )
        .boxed()
}

/// The registry's clock in the heartbeat properties.
fn now() -> DateTime<Utc> {
    DateTime::from_timestamp(1_800_000_000, 0).expect("a valid time")
}

/// The clock skew the heartbeat properties allow.
const MAX_SKEW: Duration = Duration::from_secs(60);
const MAX_SKEW_MS: i64 = MAX_SKEW.as_millis() as i64;

/// `now()` moved by `skew_ms`.
fn sent_at(skew_ms: i64) -> prost_types::Timestamp {
    to_proto_timestamp(now() + chrono::Duration::milliseconds(skew_ms))
}

fn valid_pool_status(pool_id: String) -> BoxedStrategy<pb::PoolStatus> {
    (
        1i32..=5,
        (0u32..1000).prop_flat_map(|total| (Just(total), 0..=total)),
        any::<u64>(),
        valid_text(),
        valid_text(),
    )
        .prop_map(
            move |(state, (slots_total, slots_free), vram_free_bytes, model, engine)| {
                pb::PoolStatus {
                    pool_id: pool_id.clone(),
                    state,
                    slots_total,
                    slots_free,
                    vram_free_bytes,
                    model,
                    engine,
                    endpoint: String::new(),
                }
            },
        )
        .boxed()
}

fn valid_gpu_stats() -> BoxedStrategy<pb::GpuStats> {
    (
        any::<u32>(),
        0u32..=100,
        any::<u64>(),
        any::<u64>(),
        prop::option::of(any::<u32>()),
    )
        .prop_map(
            |(index, utilization_percent, memory_used_bytes, memory_free_bytes, temperature)| {
                pb::GpuStats {
                    index,
                    memory_used_bytes,
                    memory_free_bytes,
                    utilization_percent,
                    temperature_celsius: temperature,
                    ..Default::default()
                }
            },
        )
        .boxed()
}

/// A HeartbeatRequest whose payload every rule accepts at [`now`] with
/// [`MAX_SKEW`].
fn valid_heartbeat_request() -> BoxedStrategy<pb::HeartbeatRequest> {
    let pools = prop::collection::hash_set(valid_pool_id(), 0..=6)
        .prop_flat_map(|ids| ids.into_iter().map(valid_pool_status).collect::<Vec<_>>());
    (
        dns_label(),
        any::<u64>(),
        -MAX_SKEW_MS..=MAX_SKEW_MS,
        pools,
        prop::collection::vec(valid_gpu_stats(), 0..=6),
        any::<u64>(),
    )
        .prop_map(
            |(node_id, session_id, skew_ms, pools, gpus, sequence)| pb::HeartbeatRequest {
                node_id,
                session_id,
                session_secret: "s".repeat(32),
                sent_at: Some(sent_at(skew_ms)),
                pools,
                gpus,
                sequence,
            },
        )
        .boxed()
}

// ---------------------------------------------------------------------
// One-field edits and their expected outcome
// ---------------------------------------------------------------------

/// One field of a valid RegisterRequest changed. Index picks an existing
/// pool, GPU or label (one is added first where there is none).
#[derive(Debug, Clone)]
enum RegisterEdit {
    NodeId(Candidate<String>),
    MachineId(Candidate<String>),
    Address(Candidate<String>),
    MetricsAddress(Candidate<String>),
    AgentVersion(Candidate<String>),
    PoolCount(Candidate<usize>),
    PoolId(Index, Candidate<String>),
    DuplicatePoolId(Index),
    /// `engine`, `model` or `engine_version` of a pool.
    PoolText(Index, &'static str, Candidate<String>),
    PoolGpuIndexCount(Index, Candidate<usize>),
    PoolMetricsUrl(Index, Candidate<String>),
    PoolEndpoint(Index, Candidate<String>),
    /// This many distinct staged model names.
    ModelsAvailableCount(Candidate<usize>),
    /// One staged model name.
    ModelAvailable(Candidate<String>),
    GpuCount(Candidate<usize>),
    DuplicateGpuIndex(Index),
    /// `uuid`, `name` or `pci_bus_id` of a GPU.
    GpuText(Index, &'static str, Candidate<String>),
    ComputeCapability(Index, Candidate<String>),
    /// `driver_version` or `cuda_version`.
    CapabilityText(&'static str, Candidate<String>),
    LabelCount(Candidate<usize>),
    LabelKey(Candidate<String>),
    LabelValue(Index, Candidate<String>),
}

fn register_edit() -> BoxedStrategy<RegisterEdit> {
    use RegisterEdit as E;
    let index = any::<Index>;
    prop_oneof![
        either(dns_label(), invalid_node_id()).prop_map(E::NodeId),
        either(valid_machine_id(), invalid_machine_id()).prop_map(E::MachineId),
        either(valid_address(), invalid_address()).prop_map(E::Address),
        either(valid_optional_address(), invalid_optional_address()).prop_map(E::MetricsAddress),
        text_candidate().prop_map(E::AgentVersion),
        count(MAX_POOLS).prop_map(E::PoolCount),
        (index(), either(valid_pool_id(), invalid_pool_id())).prop_map(|(i, id)| E::PoolId(i, id)),
        index().prop_map(E::DuplicatePoolId),
        (
            index(),
            prop::sample::select(vec!["engine", "model", "engine_version"]),
            text_candidate()
        )
            .prop_map(|(i, field, value)| E::PoolText(i, field, value)),
        (index(), count(MAX_GPUS)).prop_map(|(i, n)| E::PoolGpuIndexCount(i, n)),
        (
            index(),
            either(valid_optional_address(), invalid_optional_address())
        )
            .prop_map(|(i, url)| E::PoolMetricsUrl(i, url)),
        (
            index(),
            either(valid_optional_address(), invalid_optional_address())
        )
            .prop_map(|(i, url)| E::PoolEndpoint(i, url)),
        count(MAX_MODELS_AVAILABLE).prop_map(E::ModelsAvailableCount),
        text_candidate().prop_map(E::ModelAvailable),
        count(MAX_GPUS).prop_map(E::GpuCount),
        index().prop_map(E::DuplicateGpuIndex),
        (
            index(),
            prop::sample::select(vec!["uuid", "name", "pci_bus_id"]),
            text_candidate()
        )
            .prop_map(|(i, field, value)| E::GpuText(i, field, value)),
        (
            index(),
            either(valid_compute_capability(), invalid_compute_capability())
        )
            .prop_map(|(i, cc)| E::ComputeCapability(i, cc)),
        (
            prop::sample::select(vec!["driver_version", "cuda_version"]),
            text_candidate()
        )
            .prop_map(|(field, value)| E::CapabilityText(field, value)),
        count(MAX_LABELS).prop_map(E::LabelCount),
        either(valid_label_key(), invalid_label_key()).prop_map(E::LabelKey),
        (index(), text_candidate()).prop_map(|(i, value)| E::LabelValue(i, value)),
    ]
    .boxed()
}

/// The field a refusal must name after pool `i`'s id became `c.value`,
/// and whether the request stays valid: a valid id another pool already
/// has makes a duplicate, which validation reports at the later of the
/// two.
fn edited_pool_id<'a>(
    ids: impl Iterator<Item = &'a String>,
    i: usize,
    c: &Candidate<String>,
) -> (String, bool) {
    let clash = ids
        .enumerate()
        .find(|(k, id)| *k != i && **id == c.value)
        .map(|(k, _)| k);
    match clash {
        Some(k) if c.valid => (format!("pools[{}].pool_id", k.max(i)), false),
        _ => (format!("pools[{i}].pool_id"), c.valid),
    }
}

/// A valid pool spec with no GPUs and empty text.
fn plain_pool_spec(pool_id: String) -> pb::PoolSpec {
    pb::PoolSpec {
        pool_id,
        slots_total: 1,
        ..Default::default()
    }
}

/// The position of the pool `index` picks, adding one if there is none,
/// and at least `min` in all.
fn pick_pool_spec(request: &mut pb::RegisterRequest, index: &Index, min: usize) -> usize {
    while request.pools.len() < min.max(1) {
        let id = unused_id("pool", |id| request.pools.iter().any(|p| p.pool_id == id));
        request.pools.push(plain_pool_spec(id));
    }
    index.index(request.pools.len())
}

/// The GPUs of the request, which gets capabilities if it had none.
fn gpus_of(request: &mut pb::RegisterRequest) -> &mut Vec<pb::GpuInfo> {
    &mut request.capabilities.get_or_insert_default().gpus
}

/// The position of the GPU `index` picks, adding GPUs (with unused
/// indices) until there are at least `min`, and at least one.
fn pick_gpu(request: &mut pb::RegisterRequest, index: &Index, min: usize) -> usize {
    let gpus = gpus_of(request);
    while gpus.len() < min.max(1) {
        let unused = gpus.iter().map(|g| g.index + 1).max().unwrap_or(0);
        gpus.push(pb::GpuInfo {
            index: unused,
            ..Default::default()
        });
    }
    index.index(gpus.len())
}

impl RegisterEdit {
    /// Applies the edit; returns the path of the field changed and whether
    /// the new value is valid.
    fn apply(self, request: &mut pb::RegisterRequest) -> (String, bool) {
        use RegisterEdit as E;
        match self {
            E::NodeId(c) => {
                request.node_id = c.value;
                ("node_id".into(), c.valid)
            }
            E::MachineId(c) => {
                request.machine_id = c.value;
                ("machine_id".into(), c.valid)
            }
            E::Address(c) => {
                request.address = c.value;
                ("address".into(), c.valid)
            }
            E::MetricsAddress(c) => {
                request.metrics_address = c.value;
                ("metrics_address".into(), c.valid)
            }
            E::AgentVersion(c) => {
                request.agent_version = c.value;
                ("agent_version".into(), c.valid)
            }
            E::PoolCount(c) => {
                request.pools = (0..c.value)
                    .map(|k| plain_pool_spec(format!("pool-{k}")))
                    .collect();
                ("pools".into(), c.valid)
            }
            E::PoolId(index, c) => {
                let i = pick_pool_spec(request, &index, 1);
                let outcome = edited_pool_id(request.pools.iter().map(|p| &p.pool_id), i, &c);
                request.pools[i].pool_id = c.value;
                outcome
            }
            E::DuplicatePoolId(index) => {
                pick_pool_spec(request, &index, 2);
                let later = 1 + index.index(request.pools.len() - 1);
                let earlier = index.index(later);
                request.pools[later].pool_id = request.pools[earlier].pool_id.clone();
                (format!("pools[{later}].pool_id"), false)
            }
            E::PoolText(index, field, c) => {
                let i = pick_pool_spec(request, &index, 1);
                let pool = &mut request.pools[i];
                *match field {
                    "engine" => &mut pool.engine,
                    "model" => &mut pool.model,
                    _ => &mut pool.engine_version,
                } = c.value;
                (format!("pools[{i}].{field}"), c.valid)
            }
            E::PoolGpuIndexCount(index, c) => {
                let i = pick_pool_spec(request, &index, 1);
                request.pools[i].gpu_indices = (0..c.value as u32).collect();
                (format!("pools[{i}].gpu_indices"), c.valid)
            }
            E::PoolMetricsUrl(index, c) => {
                let i = pick_pool_spec(request, &index, 1);
                request.pools[i].metrics_url = c.value;
                (format!("pools[{i}].metrics_url"), c.valid)
            }
            E::PoolEndpoint(index, c) => {
                let i = pick_pool_spec(request, &index, 1);
                request.pools[i].endpoint = c.value;
                (format!("pools[{i}].endpoint"), c.valid)
            }
            E::ModelsAvailableCount(c) => {
                request.models_available = (0..c.value).map(|k| format!("model-{k}")).collect();
                ("models_available".into(), c.valid)
            }
            E::ModelAvailable(c) => {
                // An empty name is refused although empty free text is not.
                let valid = c.valid && !c.value.is_empty();
                request.models_available = vec![c.value];
                ("models_available[0]".into(), valid)
            }
            E::GpuCount(c) => {
                *gpus_of(request) = (0..c.value as u32)
                    .map(|index| pb::GpuInfo {
                        index,
                        ..Default::default()
                    })
                    .collect();
                ("capabilities.gpus".into(), c.valid)
            }
            E::DuplicateGpuIndex(index) => {
                pick_gpu(request, &index, 2);
                let gpus = gpus_of(request);
                let later = 1 + index.index(gpus.len() - 1);
                let earlier = index.index(later);
                gpus[later].index = gpus[earlier].index;
                (format!("capabilities.gpus[{later}].index"), false)
            }
            E::GpuText(index, field, c) => {
                let i = pick_gpu(request, &index, 1);
                let gpu = &mut gpus_of(request)[i];
                *match field {
                    "uuid" => &mut gpu.uuid,
                    "name" => &mut gpu.name,
                    _ => &mut gpu.pci_bus_id,
                } = c.value;
                (format!("capabilities.gpus[{i}].{field}"), c.valid)
            }
            E::ComputeCapability(index, c) => {
                let i = pick_gpu(request, &index, 1);
                gpus_of(request)[i].compute_capability = c.value;
                (
                    format!("capabilities.gpus[{i}].compute_capability"),
                    c.valid,
                )
            }
            E::CapabilityText(field, c) => {
                let capabilities = request.capabilities.get_or_insert_default();
                *match field {
                    "driver_version" => &mut capabilities.driver_version,
                    _ => &mut capabilities.cuda_version,
                } = c.value;
                (format!("capabilities.{field}"), c.valid)
            }
            E::LabelCount(c) => {
                request.labels = (0..c.value)
                    .map(|k| (format!("key-{k}"), "value".to_owned()))
                    .collect();
                ("labels".into(), c.valid)
            }
            E::LabelKey(c) => {
                // One label more; a valid key may replace one of the same
                // name, which keeps the count within the limit.
                let path = label_path(&c.value);
                request.labels.insert(c.value, "value".into());
                (path, c.valid)
            }
            E::LabelValue(index, c) => {
                if request.labels.is_empty() {
                    request.labels.insert("zone".into(), "eu-1".into());
                }
                let mut keys: Vec<String> = request.labels.keys().cloned().collect();
                keys.sort();
                let key = keys.swap_remove(index.index(keys.len()));
                let path = label_path(&key);
                request.labels.insert(key, c.value);
                (path, c.valid)
            }
        }
    }
}

/// Where a heartbeat's `sent_at` is, relative to the registry's clock.
#[derive(Debug, Clone)]
enum SentAt {
    /// `now()` moved by this many milliseconds.
    Skewed(i64),
    /// No timestamp.
    Missing,
    /// A timestamp with nanoseconds out of range.
    BadNanos(i32),
}

/// One field of a valid HeartbeatRequest changed.
#[derive(Debug, Clone)]
enum BeatEdit {
    SentAt(Candidate<SentAt>),
    PoolCount(Candidate<usize>),
    PoolId(Index, Candidate<String>),
    DuplicatePoolId(Index),
    PoolState(Index, Candidate<i32>),
    /// `(slots_total, slots_free)`.
    Slots(Index, Candidate<(u32, u32)>),
    /// `model` or `engine` of a pool.
    PoolText(Index, &'static str, Candidate<String>),
    /// A reported pool endpoint.
    PoolEndpoint(Index, Candidate<String>),
    GpuCount(Candidate<usize>),
    Utilization(Index, Candidate<u32>),
}

fn beat_edit() -> BoxedStrategy<BeatEdit> {
    use BeatEdit as E;
    let index = any::<Index>;
    let skew = MAX_SKEW_MS;
    prop_oneof![
        either(
            prop_oneof![Just(skew), Just(-skew), -skew..=skew].prop_map(SentAt::Skewed),
            prop_oneof![
                prop_oneof![Just(skew + 1), skew + 1..i64::from(u32::MAX)].prop_map(SentAt::Skewed),
                prop_oneof![Just(-skew - 1), -i64::from(u32::MAX)..-skew].prop_map(SentAt::Skewed),
                Just(SentAt::Missing),
                prop_oneof![Just(-1), i32::MIN..0, 1_000_000_000..=i32::MAX]
                    .prop_map(SentAt::BadNanos),
            ]
        )
        .prop_map(E::SentAt),
        count(MAX_POOLS).prop_map(E::PoolCount),
        (index(), either(valid_pool_id(), invalid_pool_id())).prop_map(|(i, id)| E::PoolId(i, id)),
        index().prop_map(E::DuplicatePoolId),
        (
            index(),
            either(
                1i32..=5,
                prop_oneof![Just(0), Just(6), i32::MIN..0, 6..=i32::MAX]
            )
        )
            .prop_map(|(i, state)| E::PoolState(i, state)),
        (
            index(),
            either(
                any::<u32>().prop_flat_map(|total| (Just(total), 0..=total)),
                (0..u32::MAX).prop_flat_map(|total| (Just(total), total + 1..=u32::MAX)),
            )
        )
            .prop_map(|(i, slots)| E::Slots(i, slots)),
        (
            index(),
            either(valid_optional_address(), invalid_optional_address())
        )
            .prop_map(|(i, url)| E::PoolEndpoint(i, url)),
        (
            index(),
            prop::sample::select(vec!["model", "engine"]),
            text_candidate()
        )
            .prop_map(|(i, field, value)| E::PoolText(i, field, value)),
        count(MAX_GPUS).prop_map(E::GpuCount),
        (
            index(),
            either(
                prop_oneof![Just(100u32), 0u32..100],
                prop_oneof![Just(101u32), 101..=u32::MAX]
            )
        )
            .prop_map(|(i, utilization)| E::Utilization(i, utilization)),
    ]
    .boxed()
}

/// A valid pool status with no text.
fn plain_pool_status(pool_id: String) -> pb::PoolStatus {
    pb::PoolStatus {
        pool_id,
        state: pb::PoolState::Ready as i32,
        ..Default::default()
    }
}

/// The position of the pool `index` picks, adding pools until there are
/// at least `min`, and at least one.
fn pick_pool_status(request: &mut pb::HeartbeatRequest, index: &Index, min: usize) -> usize {
    while request.pools.len() < min.max(1) {
        let id = unused_id("pool", |id| request.pools.iter().any(|p| p.pool_id == id));
        request.pools.push(plain_pool_status(id));
    }
    index.index(request.pools.len())
}

impl BeatEdit {
    /// Applies the edit; returns the path of the field changed and whether
    /// the new value is valid.
    fn apply(self, request: &mut pb::HeartbeatRequest) -> (String, bool) {
        use BeatEdit as E;
        match self {
            E::SentAt(c) => {
                request.sent_at = match c.value {
                    SentAt::Skewed(ms) => Some(sent_at(ms)),
                    SentAt::Missing => None,
                    SentAt::BadNanos(nanos) => Some(prost_types::Timestamp {
                        seconds: now().timestamp(),
                        nanos,
                    }),
                };
                ("sent_at".into(), c.valid)
            }
            E::PoolCount(c) => {
                request.pools = (0..c.value)
                    .map(|k| plain_pool_status(format!("pool-{k}")))
                    .collect();
                ("pools".into(), c.valid)
            }
            E::PoolId(index, c) => {
                let i = pick_pool_status(request, &index, 1);
                let outcome = edited_pool_id(request.pools.iter().map(|p| &p.pool_id), i, &c);
                request.pools[i].pool_id = c.value;
                outcome
            }
            E::DuplicatePoolId(index) => {
                pick_pool_status(request, &index, 2);
                let later = 1 + index.index(request.pools.len() - 1);
                let earlier = index.index(later);
                request.pools[later].pool_id = request.pools[earlier].pool_id.clone();
                (format!("pools[{later}].pool_id"), false)
            }
            E::PoolState(index, c) => {
                let i = pick_pool_status(request, &index, 1);
                request.pools[i].state = c.value;
                (format!("pools[{i}].state"), c.valid)
            }
            E::Slots(index, c) => {
                let i = pick_pool_status(request, &index, 1);
                (request.pools[i].slots_total, request.pools[i].slots_free) = c.value;
                (format!("pools[{i}].slots_free"), c.valid)
            }
            E::PoolText(index, field, c) => {
                let i = pick_pool_status(request, &index, 1);
                let pool = &mut request.pools[i];
                *match field {
                    "model" => &mut pool.model,
                    _ => &mut pool.engine,
                } = c.value;
                (format!("pools[{i}].{field}"), c.valid)
            }
            E::PoolEndpoint(index, c) => {
                let i = pick_pool_status(request, &index, 1);
                request.pools[i].endpoint = c.value;
                (format!("pools[{i}].endpoint"), c.valid)
            }
            E::GpuCount(c) => {
                request.gpus = (0..c.value as u32)
                    .map(|index| pb::GpuStats {
                        index,
                        ..Default::default()
                    })
                    .collect();
                ("gpus".into(), c.valid)
            }
            E::Utilization(index, c) => {
                if request.gpus.is_empty() {
                    request.gpus.push(pb::GpuStats::default());
                }
                let i = index.index(request.gpus.len());
                request.gpus[i].utilization_percent = c.value;
                (format!("gpus[{i}].utilization_percent"), c.valid)
            }
        }
    }
}

/// Accepted and refused cases of one property run.
#[derive(Default)]
struct Outcomes {
    accepted: AtomicUsize,
    refused: AtomicUsize,
}

impl Outcomes {
    /// Checks that `result` is what an edit of `field` to a value that is
    /// `valid` (or not) must give, and counts it.
    fn check<T: Debug>(
        &self,
        result: Result<T, RegistryError>,
        field: &str,
        valid: bool,
    ) -> Result<(), TestCaseError> {
        match (valid, result) {
            (true, Ok(_)) => {
                self.accepted.fetch_add(1, Ordering::Relaxed);
            }
            (true, Err(err)) => {
                return Err(TestCaseError::fail(format!(
                    "a valid {field} was refused: {err:?}"
                )));
            }
            (false, Err(RegistryError::InvalidArgument { field: named, .. })) => {
                prop_assert_eq!(named, field, "the refusal names another field");
                self.refused.fetch_add(1, Ordering::Relaxed);
            }
            (false, other) => {
                return Err(TestCaseError::fail(format!(
                    "an invalid {field} was not refused with InvalidArgument: {other:?}"
                )));
            }
        }
        Ok(())
    }

    /// Prints the counts and checks that both halves of the property ran.
    fn report(&self, property: &str, cases: u32) {
        let accepted = self.accepted.load(Ordering::Relaxed);
        let refused = self.refused.load(Ordering::Relaxed);
        eprintln!("{property}: {cases} cases, {accepted} accepted, {refused} refused");
        // Half the edits are valid by construction; a fifth each is far
        // below what a working generator gives, even for small case counts.
        let floor = cases as usize / 5;
        assert!(
            accepted >= floor && refused >= floor,
            "{property}: only {accepted} accepted and {refused} refused of {cases}"
        );
    }
}

/// Runs `test` on `strategy` with the default (or `PROPTEST_CASES`)
/// configuration, and returns the number of cases.
fn run_property<S: Strategy>(
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) -> u32 {
    let config = Config {
        source_file: Some(file!()),
        ..Config::default()
    };
    let cases = config.cases;
    let mut runner = TestRunner::new(config);
    if let Err(failure) = runner.run(&strategy, test) {
        panic!("{failure}");
    }
    cases
}

#[test]
fn registration_accepts_a_valid_edit_and_refuses_an_invalid_one_by_field() {
    let outcomes = Outcomes::default();
    let cases = run_property(
        (valid_register_request(), register_edit()),
        |(mut request, edit)| {
            let (field, valid) = edit.apply(&mut request);
            outcomes.check(validate::registration(request), &field, valid)
        },
    );
    outcomes.report("registration", cases);
}

#[test]
fn heartbeat_accepts_a_valid_edit_and_refuses_an_invalid_one_by_field() {
    let outcomes = Outcomes::default();
    let cases = run_property(
        (valid_heartbeat_request(), beat_edit()),
        |(mut request, edit)| {
            let (field, valid) = edit.apply(&mut request);
            outcomes.check(validate::beat(&mut request, now(), MAX_SKEW), &field, valid)
        },
    );
    outcomes.report("heartbeat", cases);
}

// ---------------------------------------------------------------------
// Arbitrary input
// ---------------------------------------------------------------------

/// Strings that are mostly near the rules' edges, plus arbitrary text.
fn arbitrary_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9-]{0,70}",
        "[A-Za-z0-9._/ -]{0,70}",
        "https?://[a-z0-9.-]{0,20}(:[0-9]{1,6})?(/[a-z]{0,5})?",
        any::<String>(),
        Just(String::new()),
    ]
}

fn arbitrary_pool_spec() -> impl Strategy<Value = pb::PoolSpec> {
    (
        arbitrary_text(),
        arbitrary_text(),
        arbitrary_text(),
        any::<u32>(),
        prop::collection::vec(any::<u32>(), 0..70),
        arbitrary_text(),
    )
        .prop_map(
            |(pool_id, engine, model, slots_total, gpu_indices, metrics_url)| pb::PoolSpec {
                pool_id,
                engine,
                model,
                slots_total,
                gpu_indices,
                engine_version: String::new(),
                metrics_url,
                endpoint: String::new(),
                mig_uuids: Vec::new(),
            },
        )
}

fn arbitrary_gpu_info() -> impl Strategy<Value = pb::GpuInfo> {
    (
        0u32..80,
        arbitrary_text(),
        arbitrary_text(),
        "[0-9]{0,3}(\\.[0-9]{0,3})?|.{0,6}",
    )
        .prop_map(|(index, uuid, name, compute_capability)| pb::GpuInfo {
            index,
            uuid,
            name,
            memory_total_bytes: 80 << 30,
            compute_capability,
            pci_bus_id: String::new(),
            mig_enabled: false,
            ..Default::default()
        })
}

fn arbitrary_register_request() -> impl Strategy<Value = pb::RegisterRequest> {
    (
        arbitrary_text(),
        arbitrary_text(),
        arbitrary_text(),
        prop::collection::vec(arbitrary_pool_spec(), 0..70),
        prop::option::of(prop::collection::vec(arbitrary_gpu_info(), 0..70)),
        arbitrary_text(),
        prop::collection::hash_map(arbitrary_text(), arbitrary_text(), 0..70),
        arbitrary_text(),
    )
        .prop_map(
            |(
                node_id,
                machine_id,
                address,
                pools,
                gpus,
                agent_version,
                labels,
                metrics_address,
            )| {
                pb::RegisterRequest {
                    node_id,
                    machine_id,
                    address,
                    pools,
                    capabilities: gpus.map(|gpus| pb::Capabilities {
                        gpus,
                        ..Default::default()
                    }),
                    agent_version,
                    labels,
                    metrics_address,
                    models_available: Vec::new(),
                }
            },
        )
}

fn arbitrary_pool_status() -> impl Strategy<Value = pb::PoolStatus> {
    (arbitrary_text(), -2i32..8, any::<u32>(), any::<u32>()).prop_map(
        |(pool_id, state, slots_total, slots_free)| pb::PoolStatus {
            pool_id,
            state,
            slots_total,
            slots_free,
            vram_free_bytes: 0,
            model: String::new(),
            engine: String::new(),
            endpoint: String::new(),
        },
    )
}

/// Whether `result` is an acceptance or a refusal naming a field, the only
/// answers validation may give.
fn accepted_or_invalid_argument<T>(result: &Result<T, RegistryError>) -> bool {
    match result {
        Ok(_) => true,
        Err(RegistryError::InvalidArgument { field, .. }) => !field.is_empty(),
        Err(_) => false,
    }
}

proptest! {
    #[test]
    fn registration_validation_never_panics_on_arbitrary_input(
        request in arbitrary_register_request()
    ) {
        let result = validate::registration(request);
        prop_assert!(accepted_or_invalid_argument(&result), "{:?}", result.err());
    }

    #[test]
    fn beat_validation_never_panics_on_arbitrary_input(
        pools in prop::collection::vec(arbitrary_pool_status(), 0..70),
        skew_secs in -10_000i64..10_000,
        nanos in -5i32..1_000_000_005,
        utilization in 0u32..200,
    ) {
        let now = Utc::now();
        let mut request = pb::HeartbeatRequest {
            sent_at: Some(prost_types::Timestamp { seconds: now.timestamp() + skew_secs, nanos }),
            pools,
            gpus: vec![pb::GpuStats { utilization_percent: utilization, ..Default::default() }],
            ..Default::default()
        };
        let result = validate::beat(&mut request, now, Duration::from_secs(3600));
        prop_assert!(accepted_or_invalid_argument(&result), "{:?}", result.err());
    }
}

// ---------------------------------------------------------------------
// The registry's state machine against a reference model
// ---------------------------------------------------------------------

const TIMEOUT_MS: u64 = 1000;
const RETENTION_MS: u64 = 3000;
/// Timer resolution: a node's status is not checked this close after a
/// deadline, where either answer is correct.
const SLACK_MS: u64 = 3;

#[derive(Debug, Clone)]
enum Op {
    /// Register node `n` from machine `m`.
    Register { n: usize, m: usize },
    /// A heartbeat on node `n`'s current session.
    Beat { n: usize },
    /// A heartbeat naming node `n`'s previous session.
    StaleBeat { n: usize },
    /// Deregister node `n` with its session.
    Deregister { n: usize },
    /// Move the paused clock.
    Advance { ms: u64 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0usize..4, 0usize..2).prop_map(|(n, m)| Op::Register { n, m }),
        (0usize..4).prop_map(|n| Op::Beat { n }),
        (0usize..4).prop_map(|n| Op::StaleBeat { n }),
        (0usize..4).prop_map(|n| Op::Deregister { n }),
        prop_oneof![1u64..50, 200u64..1500, 2000u64..4000].prop_map(|ms| Op::Advance { ms }),
    ]
}

/// What the model believes about one node.
#[derive(Debug, Clone)]
struct ModelNode {
    machine: usize,
    /// Model time (ms) of the last sign of life.
    last_seen: u64,
    session: (u64, String),
    previous: Option<(u64, String)>,
}

impl ModelNode {
    fn deadline(&self) -> u64 {
        self.last_seen + TIMEOUT_MS
    }
    fn online(&self, now: u64) -> bool {
        now < self.deadline()
    }
    fn removed(&self, now: u64) -> bool {
        now >= self.deadline() + RETENTION_MS
    }
    /// Within timer resolution after the deadline or the removal time.
    fn at_edge(&self, now: u64) -> bool {
        let edge = |t: u64| (t..t + SLACK_MS).contains(&now);
        edge(self.deadline()) || edge(self.deadline() + RETENTION_MS)
    }
}

/// Moves the paused clock and lets the expiry task run, in steps of at
/// most [`STEP_MS`]: one jump past a deadline by more than the stall
/// threshold (1 s here) is what a stopped registry looks like, and the
/// expiry loop would rightly give every node a fresh grace. Time passing
/// normally reaches the loop in small steps.
async fn advance(ms: u64) {
    let mut left = ms;
    while left > 0 {
        let step = left.min(STEP_MS);
        tokio::time::advance(Duration::from_millis(step)).await;
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }
        left -= step;
    }
}

/// Largest single move of the paused clock, well below the stall threshold.
const STEP_MS: u64 = 250;

fn beat_for(n: usize, session: &(u64, String)) -> Beat {
    let mut request = pb::HeartbeatRequest {
        node_id: format!("n{n}"),
        session_id: session.0,
        session_secret: session.1.clone(),
        sent_at: Some(to_proto_timestamp(Utc::now())),
        ..Default::default()
    };
    validate::beat(&mut request, Utc::now(), Duration::from_secs(60)).unwrap()
}

fn registration(n: usize, m: usize) -> Registration {
    validate::registration(pb::RegisterRequest {
        node_id: format!("n{n}"),
        machine_id: format!("machine-{m}"),
        address: "http://node:9200".into(),
        ..Default::default()
    })
    .unwrap()
}

async fn run_model(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let registry = Registry::new(Timing {
        node_timeout: Duration::from_millis(TIMEOUT_MS),
        heartbeat_interval: Duration::from_millis(100),
        offline_retention: Duration::from_millis(RETENTION_MS),
    });
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(registry_server::expiry::run(registry.clone(), stop.clone()));
    let mut model: HashMap<usize, ModelNode> = HashMap::new();
    let mut now = 0u64;

    for op in ops {
        // Right at a deadline either status is correct (timer resolution);
        // act only away from such edges, so every answer is determined.
        if !matches!(op, Op::Advance { .. }) {
            while model.values().any(|node| node.at_edge(now)) {
                advance(SLACK_MS).await;
                now += SLACK_MS;
            }
            model.retain(|_, node| !node.removed(now));
        }
        match op {
            Op::Register { n, m } => {
                let taken = model
                    .get(&n)
                    .is_some_and(|node| node.online(now) && node.machine != m);
                match registry.register(registration(n, m), Now::read()) {
                    Ok(reg) => {
                        prop_assert!(!taken, "took over a live node");
                        let previous = model.get(&n).map(|node| node.session.clone());
                        model.insert(
                            n,
                            ModelNode {
                                machine: m,
                                last_seen: now,
                                session: (reg.session_id, reg.session_secret),
                                previous,
                            },
                        );
                    }
                    Err(RegistryError::NodeTaken { .. }) => prop_assert!(taken),
                    Err(other) => prop_assert!(false, "register failed: {other}"),
                }
            }
            Op::Beat { n } => {
                let id = format!("n{n}");
                match model.get_mut(&n) {
                    Some(node) => {
                        let slot = registry.attach(&id, node.session.0, &node.session.1);
                        prop_assert!(slot.is_ok(), "attach failed: {:?}", slot.err());
                        registry
                            .heartbeat(
                                &slot.unwrap(),
                                node.session.0,
                                beat_for(n, &node.session),
                                tokio::time::Instant::now(),
                            )
                            .map_err(|e| TestCaseError::fail(e.to_string()))?;
                        node.last_seen = now;
                    }
                    None => {
                        let unknown = matches!(
                            registry.attach(&id, 1, "x"),
                            Err(RegistryError::NodeNotFound { .. })
                        );
                        prop_assert!(unknown, "{} should be unknown", id);
                    }
                }
            }
            Op::StaleBeat { n } => {
                if let Some(ModelNode {
                    previous: Some(old),
                    ..
                }) = model.get(&n)
                {
                    let refused = registry.attach(&format!("n{n}"), old.0, &old.1);
                    let superseded =
                        matches!(refused, Err(RegistryError::SessionSuperseded { .. }));
                    prop_assert!(superseded, "stale session accepted");
                }
            }
            Op::Deregister { n } => {
                let id = format!("n{n}");
                match model.remove(&n) {
                    Some(node) => registry
                        .deregister(&id, node.session.0, Some(&node.session.1))
                        .map_err(|e| TestCaseError::fail(e.to_string()))?,
                    None => {
                        let unknown = matches!(
                            registry.deregister(&id, 0, None),
                            Err(RegistryError::NodeNotFound { .. })
                        );
                        prop_assert!(unknown, "{} should be unknown", id);
                    }
                }
            }
            Op::Advance { ms } => {
                advance(ms).await;
                now += ms;
            }
        }

        // Forget nodes the model says retention removed (at the edge the
        // registry may not have yet, which the checks below allow).
        model.retain(|_, node| !node.removed(now) || node.at_edge(now));

        // The registry agrees with the model, away from deadline edges.
        for n in 0..4 {
            let id = format!("n{n}");
            let got = registry.get(&id);
            let Some(node) = model.get(&n) else {
                prop_assert!(got.is_err(), "{id} should be gone at {now} ms");
                continue;
            };
            if node.at_edge(now) {
                continue;
            }
            if node.removed(now) {
                prop_assert!(got.is_err(), "{id} outlived its retention at {now} ms");
                continue;
            }
            let got =
                got.map_err(|e| TestCaseError::fail(format!("{id} missing at {now} ms: {e}")))?;
            let want = if node.online(now) {
                pb::NodeStatus::Online
            } else {
                pb::NodeStatus::Offline
            };
            prop_assert_eq!(
                got.status(),
                want,
                "{} at {} ms, last seen {}",
                id,
                now,
                node.last_seen
            );
            prop_assert_eq!(got.session_id, node.session.0);
        }
        // The bookkeeping invariants the fuzz target checks too.
        registry.check_consistency().map_err(TestCaseError::fail)?;
        let counts = registry.counts();
        let online = model.values().filter(|node| node.online(now)).count() as u64;
        let near_edge = model.values().any(|node| node.at_edge(now));
        if !near_edge {
            prop_assert_eq!(counts.online, online);
            prop_assert_eq!(counts.online + counts.offline, model.len() as u64);
        }
    }
    stop.cancel();
    Ok(())
}

proptest! {
    #[test]
    fn the_state_machine_agrees_with_a_reference_model(ops in prop::collection::vec(op(), 1..60)) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        runtime.block_on(run_model(ops))?;
    }
}
