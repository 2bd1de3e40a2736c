//! The contract's rules: what the registry accepts in a RegisterRequest and
//! a heartbeat, written once and used by both sides. registry-server refuses
//! a request that breaks a rule; node-agent checks what it sends with the
//! same functions, so a value the registry would refuse stops the agent at
//! start-up (or skips one handoff file) instead of looping on
//! INVALID_ARGUMENT.
//!
//! Every rule returns a [`RuleError`] naming the field. The field's path
//! (`pools[3].model`) is a [`Field`] value, turned into text only when a
//! rule fails, so checking a good request allocates nothing for names.
//! Values are never echoed at length: a 1 MiB label would otherwise come
//! back in the error.

use std::collections::HashSet;
use std::fmt;

use sha2::{Digest, Sha256};

use crate::pb;

/// Most pools a node may run (registration and heartbeat alike).
pub const MAX_POOLS: usize = 64;
/// Most GPUs a node may report, and most GPU indices one pool may name.
pub const MAX_GPUS: usize = 64;
/// Most MIG instances one GPU may list (an A100/H100 has at most 7).
pub const MAX_MIG_INSTANCES: usize = 16;
/// Most MIG slices one pool may name (`PoolSpec.mig_uuids`): no more than
/// one GPU can hold.
pub const MAX_POOL_MIG_UUIDS: usize = MAX_MIG_INSTANCES;
/// Most health reasons one GpuStats may carry.
pub const MAX_HEALTH_REASONS: usize = 16;
/// Most XID errors one GpuStats may carry.
pub const MAX_XID_ERRORS: usize = 16;
/// Most labels a node may carry.
pub const MAX_LABELS: usize = 64;
/// Longest free-text value in bytes (model, engine, GPU name, label value ...).
pub const MAX_TEXT_LEN: usize = 256;
/// Longest node address URL in bytes.
pub const MAX_ADDRESS_LEN: usize = 2048;
/// Longest machine id in bytes.
pub const MAX_MACHINE_ID_LEN: usize = 128;
/// Longest identifier (node id, pool id, label key): a DNS label's length.
pub const MAX_ID_LEN: usize = 63;
/// Longest compute capability ("major.minor").
pub const MAX_COMPUTE_CAPABILITY_LEN: usize = 8;
/// Most staged model names a node may report (`models_available`).
pub const MAX_MODELS_AVAILABLE: usize = 256;
/// Shortest bearer token either side accepts, so no guessable token is
/// ever configured.
pub const MIN_TOKEN_LEN: usize = 16;

/// Where a value sits in a request, formatted only when a rule fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field<'a> {
    /// A top-level field or a setting's name: `node_id`.
    Name(&'a str),
    /// A field of one list entry: `pools[3].model`.
    Item {
        /// The list: `pools`, `capabilities.gpus`.
        list: &'a str,
        /// The entry's position.
        index: usize,
        /// The entry's field.
        name: &'a str,
    },
    /// One entry of a list of plain values: `models_available[2]`.
    Entry {
        /// The list: `models_available`.
        list: &'a str,
        /// The entry's position.
        index: usize,
    },
    /// One MIG slice a pool names: `pools[3].mig_uuids[1]`.
    MigUuid {
        /// The pool's position in `pools`.
        index: usize,
        /// The slice's position in its `mig_uuids`.
        entry: usize,
    },
    /// One entry of a map, by key: `labels["zone"]`.
    Key {
        /// The map: `labels`.
        map: &'a str,
        /// The entry's key (cut short when long).
        key: &'a str,
    },
}

impl<'a> From<&'a str> for Field<'a> {
    fn from(name: &'a str) -> Self {
        Field::Name(name)
    }
}

impl fmt::Display for Field<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Field::Name(name) => f.write_str(name),
            Field::Item { list, index, name } => write!(f, "{list}[{index}].{name}"),
            Field::Entry { list, index } => write!(f, "{list}[{index}]"),
            Field::MigUuid { index, entry } => write!(f, "pools[{index}].mig_uuids[{entry}]"),
            Field::Key { map, key } => write!(f, "{map}[{}]", quoted(key)),
        }
    }
}

/// A value that breaks one of the contract's rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {reason}")]
pub struct RuleError {
    /// Path of the offending field (`pools[1].pool_id`).
    pub field: String,
    /// What is wrong with it; quotes the value only cut short.
    pub reason: String,
}

impl RuleError {
    /// A broken rule of `field`.
    pub fn new(field: Field<'_>, reason: impl Into<String>) -> Self {
        RuleError {
            field: field.to_string(),
            reason: reason.into(),
        }
    }
}

/// Result of a rule.
pub type RuleResult = Result<(), RuleError>;

/// A required value of at most `max` bytes.
pub fn required(field: Field<'_>, value: &str, max: usize) -> RuleResult {
    if value.is_empty() {
        return Err(RuleError::new(field, "must not be empty"));
    }
    if value.len() > max {
        return Err(RuleError::new(
            field,
            format!("is {} bytes long; at most {max} are allowed", value.len()),
        ));
    }
    Ok(())
}

/// A node id: a DNS label (1-63 characters of `[a-z0-9-]`, starting and
/// ending with a letter or digit), so it is safe in hostnames, URLs, metric
/// labels and logs.
pub fn node_id(field: Field<'_>, id: &str) -> RuleResult {
    required(field, id, MAX_ID_LEN)?;
    let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
    if !id.chars().all(allowed) {
        return Err(RuleError::new(
            field,
            format!(
                "{} must be a DNS label: only lowercase letters a-z, digits and '-'",
                quoted(id)
            ),
        ));
    }
    if id.starts_with('-') || id.ends_with('-') {
        return Err(RuleError::new(
            field,
            format!("{} must not start or end with '-'", quoted(id)),
        ));
    }
    Ok(())
}

/// A machine id: 1-128 bytes of printable ASCII without spaces.
pub fn machine_id(field: Field<'_>, id: &str) -> RuleResult {
    required(field, id, MAX_MACHINE_ID_LEN)?;
    if !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(RuleError::new(
            field,
            "must be printable ASCII without spaces",
        ));
    }
    Ok(())
}

/// A node address: an `http://` or `https://` URL with a host, at most
/// 2048 bytes.
pub fn address(field: Field<'_>, addr: &str) -> RuleResult {
    required(field, addr, MAX_ADDRESS_LEN)?;
    if plain_address(addr) {
        return Ok(());
    }
    parsed_address(field, addr)
}

/// Whether `addr` is, by its shape alone, one that [`parsed_address`]
/// takes: `http://` or `https://`, a host of ASCII letters, digits, `.`,
/// `-` and `_`, an optional port 1-65535 and an optional path of those
/// characters, `/` and `~`. Nearly every address has this shape, and
/// checking it costs a tenth of parsing (addresses are checked for every
/// Register and pool endpoints for every heartbeat); anything else is
/// parsed.
fn plain_address(addr: &str) -> bool {
    let Some(rest) = addr
        .strip_prefix("http://")
        .or_else(|| addr.strip_prefix("https://"))
    else {
        return false;
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let (host, port) = match authority.split_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (authority, None),
    };
    let name = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_');
    !host.is_empty()
        && host.bytes().all(name)
        && port.is_none_or(|port| {
            (1..=5).contains(&port.len())
                && port.bytes().all(|b| b.is_ascii_digit())
                && port.parse::<u16>().is_ok_and(|port| port != 0)
        })
        && path.bytes().all(|b| name(b) || matches!(b, b'/' | b'~'))
}

/// [`address`]'s rules, read from the parsed URL.
fn parsed_address(field: Field<'_>, addr: &str) -> RuleResult {
    let uri: http::Uri = addr
        .parse()
        .map_err(|e| RuleError::new(field, format!("{} is not a URL: {e}", quoted(addr))))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(RuleError::new(
            field,
            format!("{} must start with http:// or https://", quoted(addr)),
        ));
    }
    let Some(authority) = uri.authority().filter(|a| !a.host().is_empty()) else {
        return Err(RuleError::new(
            field,
            format!("{} has no host", quoted(addr)),
        ));
    };
    // Credentials in the URL would be shown to every reader of the node.
    // The message does not quote the address, so it does not repeat them.
    if authority.as_str().contains('@') {
        return Err(RuleError::new(
            field,
            "must not carry user:password@ (credentials would be shown to every reader)",
        ));
    }
    // `http::Uri` keeps a port it cannot read as a u16 (":65536", ":99999").
    let after_host = &authority.as_str()[authority.as_str().rfind(']').unwrap_or(0)..];
    if after_host.contains(':') && authority.port_u16().is_none_or(|p| p == 0) {
        return Err(RuleError::new(
            field,
            format!("{} has no valid port (1-65535)", quoted(addr)),
        ));
    }
    Ok(())
}

/// An optional URL (a metrics endpoint): empty, or what [`address`] accepts.
pub fn optional_address(field: Field<'_>, addr: &str) -> RuleResult {
    if addr.is_empty() {
        return Ok(());
    }
    address(field, addr)
}

/// A pool's endpoint (where its engine takes requests): empty when
/// unknown, otherwise an [`address`].
pub fn endpoint(field: Field<'_>, url: &str) -> RuleResult {
    optional_address(field, url)
}

/// Models staged on a node's disk: at most [`MAX_MODELS_AVAILABLE`] names,
/// each non-empty [`text`], no name twice.
pub fn models_available(field: &str, models: &[String]) -> RuleResult {
    at_most(Field::Name(field), models.len(), MAX_MODELS_AVAILABLE)?;
    let mut seen = Seen::default();
    for (index, model) in models.iter().enumerate() {
        let item = Field::Entry { list: field, index };
        required(item, model, MAX_TEXT_LEN)?;
        text(item, model)?;
        unique(&mut seen, item, model)?;
    }
    Ok(())
}

/// A pool id: 1-63 characters of `[A-Za-z0-9._-]`.
pub fn pool_id(field: Field<'_>, id: &str) -> RuleResult {
    required(field, id, MAX_ID_LEN)?;
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if !id.chars().all(allowed) {
        return Err(RuleError::new(
            field,
            format!(
                "{} may only hold A-Z, a-z, 0-9, '.', '_' and '-'",
                quoted(id)
            ),
        ));
    }
    Ok(())
}

/// A label key: 1-63 characters of `[A-Za-z0-9._/-]`.
pub fn label_key(field: Field<'_>, key: &str) -> RuleResult {
    let ok = !key.is_empty()
        && key.len() <= MAX_ID_LEN
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '/' | '-'));
    if !ok {
        return Err(RuleError::new(
            field,
            "label keys must be 1-63 characters of A-Z, a-z, 0-9, '.', '_', '/' and '-'",
        ));
    }
    Ok(())
}

/// Free text (a label value, model, engine, GPU name ...): at most 256
/// bytes and no control characters; may be empty.
pub fn text(field: Field<'_>, value: &str) -> RuleResult {
    if value.len() > MAX_TEXT_LEN {
        return Err(RuleError::new(
            field,
            format!(
                "is {} bytes long; at most {MAX_TEXT_LEN} are allowed",
                value.len()
            ),
        ));
    }
    if has_control(value) {
        return Err(RuleError::new(field, "must not contain control characters"));
    }
    Ok(())
}

/// Whether `value` holds a control character (`char::is_control`: U+0000
/// to U+001F and U+007F to U+009F), read byte by byte rather than decoded
/// (this runs for some thirty strings of every Register). In UTF-8 the
/// first range and U+007F are single bytes, and U+0080 to U+009F are 0xC2
/// followed by 0x80 to 0x9F; 0xC2 is never a continuation byte.
fn has_control(value: &str) -> bool {
    let bytes = value.as_bytes();
    // Printable ASCII, nearly every value: one pass without branches.
    if bytes
        .iter()
        .fold(true, |printable, &b| printable & (0x20..0x7f).contains(&b))
    {
        return false;
    }
    bytes.iter().enumerate().any(|(i, &b)| {
        b < 0x20 || b == 0x7f || (b == 0xc2 && bytes.get(i + 1).is_some_and(|&n| n <= 0x9f))
    })
}

/// `value` made to pass [`text`]: control characters dropped, cut to
/// [`MAX_TEXT_LEN`] bytes on a character boundary. For values the agent
/// reads from the hardware rather than from a person.
pub fn fit_text(value: &str) -> String {
    let mut fitted = String::with_capacity(value.len().min(MAX_TEXT_LEN));
    for c in value.chars().filter(|c| !c.is_control()) {
        if fitted.len() + c.len_utf8() > MAX_TEXT_LEN {
            break;
        }
        fitted.push(c);
    }
    fitted
}

/// A list of at most `max` entries.
pub fn at_most(field: Field<'_>, len: usize, max: usize) -> RuleResult {
    if len > max {
        return Err(RuleError::new(
            field,
            format!("has {len} entries; at most {max} are allowed"),
        ));
    }
    Ok(())
}

/// The ids met so far in a list being checked, for [`unique`]. The first
/// eight are kept in place and compared one by one (a heartbeat's few
/// pools cost no allocation and no hashing); any more go to a set.
#[derive(Debug, Default)]
pub struct Seen<'a> {
    /// The first ids met, `len` of them.
    first: [&'a str; 8],
    /// How many of `first` are set.
    len: usize,
    /// The ids met after the first eight.
    more: HashSet<&'a str>,
}

/// Checks that `id` was not seen before in this list.
pub fn unique<'a>(seen: &mut Seen<'a>, field: Field<'_>, id: &'a str) -> RuleResult {
    let repeated = seen.first[..seen.len].contains(&id) || seen.more.contains(id);
    if repeated {
        return Err(RuleError::new(
            field,
            format!("{} appears more than once", quoted(id)),
        ));
    }
    match seen.first.get_mut(seen.len) {
        Some(free) => {
            *free = id;
            seen.len += 1;
        }
        None => {
            seen.more.insert(id);
        }
    }
    Ok(())
}

/// A compute capability: "major.minor" with decimal digits, or empty where
/// unknown.
pub fn compute_capability(field: Field<'_>, cc: &str) -> RuleResult {
    if cc.is_empty() {
        return Ok(());
    }
    let ok = cc.len() <= MAX_COMPUTE_CAPABILITY_LEN
        && cc.split_once('.').is_some_and(|(major, minor)| {
            !major.is_empty()
                && !minor.is_empty()
                && major.bytes().all(|b| b.is_ascii_digit())
                && minor.bytes().all(|b| b.is_ascii_digit())
        });
    if !ok {
        return Err(RuleError::new(
            field,
            format!("{} must look like \"8.9\" (major.minor)", quoted(cc)),
        ));
    }
    Ok(())
}

/// Labels: at most 64, each key a [`label_key`] and each value [`text`].
/// Checked in key order, so the same bad request always names the same
/// label.
pub fn labels<'a>(
    field: &str,
    labels: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> RuleResult {
    let mut entries: Vec<(&String, &String)> = labels.into_iter().collect();
    at_most(Field::Name(field), entries.len(), MAX_LABELS)?;
    entries.sort_unstable_by_key(|(key, _)| *key);
    for (key, value) in entries {
        let key_field = Field::Key { map: field, key };
        label_key(key_field, key)?;
        text(key_field, value)?;
    }
    Ok(())
}

/// One pool as registered, at position `index` of `pools`.
pub fn pool_spec(index: usize, pool: &pb::PoolSpec) -> RuleResult {
    pool_spec_fields(pool, &|name| Field::Item {
        list: "pools",
        index,
        name,
    })
}

/// The rules of one pool (but not its uniqueness among others), each
/// field named by `field`: the registry names `pools[3].model`, the agent
/// names the pool's own setting.
pub fn pool_spec_fields<'f>(
    pool: &pb::PoolSpec,
    field: &dyn Fn(&'static str) -> Field<'f>,
) -> RuleResult {
    pool_id(field("pool_id"), &pool.pool_id)?;
    text(field("engine"), &pool.engine)?;
    text(field("model"), &pool.model)?;
    text(field("engine_version"), &pool.engine_version)?;
    optional_address(field("metrics_url"), &pool.metrics_url)?;
    endpoint(field("endpoint"), &pool.endpoint)?;
    at_most(field("gpu_indices"), pool.gpu_indices.len(), MAX_GPUS)?;
    at_most(field("mig_uuids"), pool.mig_uuids.len(), MAX_POOL_MIG_UUIDS)?;
    for uuid in &pool.mig_uuids {
        required(field("mig_uuids"), uuid, MAX_TEXT_LEN)?;
        text(field("mig_uuids"), uuid)?;
    }
    Ok(())
}

/// The MIG slices one pool names (`mig_uuids`) against the node's
/// capabilities: each must be a slice some GPU lists, at most once. Entry
/// `j` is named `field(j)`: the registry names `pools[i].mig_uuids[j]`,
/// the agent the pool's own setting.
pub fn pool_mig_uuids<'f>(
    uuids: &[String],
    caps: Option<&pb::Capabilities>,
    field: &dyn Fn(usize) -> Field<'f>,
) -> RuleResult {
    // Most pools run on whole GPUs: nothing to look up.
    if uuids.is_empty() {
        return Ok(());
    }
    let slices: HashSet<&str> = caps
        .map(|c| c.gpus.as_slice())
        .unwrap_or_default()
        .iter()
        .flat_map(|g| &g.mig_instances)
        .map(|m| m.uuid.as_str())
        .collect();
    let mut seen = Seen::default();
    for (j, uuid) in uuids.iter().enumerate() {
        if !slices.contains(uuid.as_str()) {
            return Err(RuleError::new(
                field(j),
                format!(
                    "{} is not a MIG slice listed in the node's capabilities",
                    quoted(uuid)
                ),
            ));
        }
        unique(&mut seen, field(j), uuid)?;
    }
    Ok(())
}

/// The pools of a RegisterRequest: at most 64, each valid, ids unique.
pub fn pool_specs(pools: &[pb::PoolSpec]) -> RuleResult {
    at_most(Field::Name("pools"), pools.len(), MAX_POOLS)?;
    let mut seen = Seen::default();
    for (index, pool) in pools.iter().enumerate() {
        pool_spec(index, pool)?;
        let field = Field::Item {
            list: "pools",
            index,
            name: "pool_id",
        };
        unique(&mut seen, field, &pool.pool_id)?;
    }
    Ok(())
}

/// A node's hardware: at most 64 GPUs with distinct indices, bounded text.
pub fn capabilities(caps: &pb::Capabilities) -> RuleResult {
    at_most(Field::Name("capabilities.gpus"), caps.gpus.len(), MAX_GPUS)?;
    text(
        Field::Name("capabilities.driver_version"),
        &caps.driver_version,
    )?;
    text(Field::Name("capabilities.cuda_version"), &caps.cuda_version)?;
    for (index, gpu) in caps.gpus.iter().enumerate() {
        let field = |name| Field::Item {
            list: "capabilities.gpus",
            index,
            name,
        };
        // Compared with the GPUs before it: at most 64 GPUs, so no set
        // (and no allocation or hashing) is needed per Register.
        if caps.gpus[..index].iter().any(|g| g.index == gpu.index) {
            return Err(RuleError::new(
                field("index"),
                format!("GPU index {} appears more than once", gpu.index),
            ));
        }
        text(field("uuid"), &gpu.uuid)?;
        text(field("name"), &gpu.name)?;
        text(field("pci_bus_id"), &gpu.pci_bus_id)?;
        compute_capability(field("compute_capability"), &gpu.compute_capability)?;
        at_most(
            field("mig_instances"),
            gpu.mig_instances.len(),
            MAX_MIG_INSTANCES,
        )?;
        for mig in &gpu.mig_instances {
            text(field("mig_instances.uuid"), &mig.uuid)?;
            text(field("mig_instances.profile"), &mig.profile)?;
        }
    }
    Ok(())
}

/// A whole RegisterRequest. A missing `capabilities` counts as empty.
pub fn register_request(req: &pb::RegisterRequest) -> RuleResult {
    node_id(Field::Name("node_id"), &req.node_id)?;
    machine_id(Field::Name("machine_id"), &req.machine_id)?;
    address(Field::Name("address"), &req.address)?;
    optional_address(Field::Name("metrics_address"), &req.metrics_address)?;
    text(Field::Name("agent_version"), &req.agent_version)?;
    pool_specs(&req.pools)?;
    models_available("models_available", &req.models_available)?;
    if let Some(caps) = &req.capabilities {
        capabilities(caps)?;
    }
    for (index, pool) in req.pools.iter().enumerate() {
        pool_mig_uuids(&pool.mig_uuids, req.capabilities.as_ref(), &|j| {
            Field::MigUuid { index, entry: j }
        })?;
    }
    labels("labels", &req.labels)
}

/// The pools of a heartbeat: at most 64, ids unique, a known state, free
/// slots within the total.
pub fn pool_statuses(pools: &[pb::PoolStatus]) -> RuleResult {
    at_most(Field::Name("pools"), pools.len(), MAX_POOLS)?;
    let mut seen = Seen::default();
    for (index, pool) in pools.iter().enumerate() {
        let field = |name| Field::Item {
            list: "pools",
            index,
            name,
        };
        pool_id(field("pool_id"), &pool.pool_id)?;
        unique(&mut seen, field("pool_id"), &pool.pool_id)?;
        match pb::PoolState::try_from(pool.state) {
            Ok(pb::PoolState::Unspecified) => {
                return Err(RuleError::new(
                    field("state"),
                    "must be set (POOL_STATE_UNSPECIFIED is not a state)",
                ));
            }
            Ok(_) => {}
            Err(_) => {
                return Err(RuleError::new(
                    field("state"),
                    format!("{} is not a known PoolState", pool.state),
                ));
            }
        }
        if pool.slots_free > pool.slots_total {
            return Err(RuleError::new(
                field("slots_free"),
                format!(
                    "{} exceeds slots_total {}",
                    pool.slots_free, pool.slots_total
                ),
            ));
        }
        text(field("model"), &pool.model)?;
        text(field("engine"), &pool.engine)?;
        endpoint(field("endpoint"), &pool.endpoint)?;
    }
    Ok(())
}

/// The GPU figures of a heartbeat: at most 64, utilization a percentage.
pub fn gpu_stats(gpus: &[pb::GpuStats]) -> RuleResult {
    at_most(Field::Name("gpus"), gpus.len(), MAX_GPUS)?;
    for (index, gpu) in gpus.iter().enumerate() {
        if gpu.utilization_percent > 100 {
            return Err(RuleError::new(
                Field::Item {
                    list: "gpus",
                    index,
                    name: "utilization_percent",
                },
                format!("{} is above 100", gpu.utilization_percent),
            ));
        }
        let field = |name| Field::Item {
            list: "gpus",
            index,
            name,
        };
        if pb::GpuHealth::try_from(gpu.health).is_err() {
            return Err(RuleError::new(
                field("health"),
                format!("{} is not a GpuHealth value", gpu.health),
            ));
        }
        at_most(
            field("health_reasons"),
            gpu.health_reasons.len(),
            MAX_HEALTH_REASONS,
        )?;
        for reason in &gpu.health_reasons {
            text(field("health_reasons"), reason)?;
        }
        at_most(field("xid_errors"), gpu.xid_errors.len(), MAX_XID_ERRORS)?;
    }
    Ok(())
}

/// The short, non-secret name of a bearer token for logs: the first 8 hex
/// digits of its SHA-256, the same on the agent and the registry so their
/// logs can be matched.
pub fn token_fingerprint(token: &str) -> String {
    lower_hex(&Sha256::digest(token.as_bytes())[..4])
}

/// `bytes` as lowercase hex digits, two per byte. Written digit by digit:
/// the registry writes every session secret with it, and a `format!` per
/// byte was ~8,600 instructions of every Register.
pub fn lower_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut hex = String::with_capacity(2 * bytes.len());
    for &b in bytes {
        hex.push(char::from(DIGITS[usize::from(b >> 4)]));
        hex.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    hex
}

/// Whether a failed Heartbeat (or Deregister) means "register again":
/// NOT_FOUND (the registry no longer knows the node) and
/// FAILED_PRECONDITION (its session was superseded), except a stream that
/// a newer stream of its own session replaced ([`stream_replaced`]: check
/// it first). Anything else is a failure to retry on the same
/// registration.
pub fn must_register_again(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::NotFound | tonic::Code::FailedPrecondition
    )
}

/// Metadata key (in the trailers of a failed call) carrying a
/// machine-readable reason where the status code alone would mislead.
pub const REASON_KEY: &str = "registry-reason";

/// [`REASON_KEY`] value: a Heartbeat stream ended with FAILED_PRECONDITION
/// because a newer stream of the same session took over. Unlike a
/// superseded session this does not mean "register again": registering
/// would end the newer stream in turn, and two holders of one session
/// would take turns forever.
pub const STREAM_REPLACED: &str = "stream-replaced";

/// Whether a failed Heartbeat stream was ended because a newer stream of
/// its own session took over (see [`STREAM_REPLACED`]).
pub fn stream_replaced(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::FailedPrecondition
        && status
            .metadata()
            .get(REASON_KEY)
            .is_some_and(|v| v.as_bytes() == STREAM_REPLACED.as_bytes())
}

/// A value for an error message: quoted, and cut short when long.
pub fn quoted(value: &str) -> String {
    const SHOWN: usize = 64;
    if value.chars().count() <= SHOWN {
        format!("{value:?}")
    } else {
        let head: String = value.chars().take(SHOWN).collect();
        format!("{head:?}... ({} bytes)", value.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Whatever passes the shape check of [`plain_address`] passes
        /// the parsed check too, so the shortcut changes no answer.
        #[test]
        fn plain_addresses_are_addresses(
            addr in "(https?|HTTP|ftp)://[A-Za-z0-9._~@\\[\\]:-]{0,12}(:[0-9]{0,6})?(/[A-Za-z0-9._~/%?#-]{0,10})?",
        ) {
            if plain_address(&addr) {
                proptest::prop_assert_eq!(parsed_address("a".into(), &addr), Ok(()), "{}", addr);
            }
        }

        #[test]
        fn plain_address_shapes_are_taken(
            addr in "https?://[A-Za-z0-9._-]{1,12}(:[1-9][0-9]{0,3})?(/[A-Za-z0-9._~/-]{0,10})?",
        ) {
            proptest::prop_assert!(plain_address(&addr), "{}", addr);
            proptest::prop_assert_eq!(parsed_address("a".into(), &addr), Ok(()), "{}", addr);
        }
    }

    #[test]
    fn ports_out_of_range_and_odd_forms_are_parsed_not_taken_by_shape() {
        for addr in [
            "http://h:0",
            "http://h:65536",
            "http://h:",
            "http://h:123456",
            "http://:80",
            "http://u:p@h",
            "HTTP://h",
            "http://h?x",
            "http://[::1]:80",
            "http://h/%20",
        ] {
            assert!(!plain_address(addr), "{addr}");
        }
        for addr in [
            "http://h:1",
            "http://h:65535",
            "https://a.b-c_d/x/~y",
            "http://h/",
        ] {
            assert!(plain_address(addr), "{addr}");
        }
    }

    #[test]
    fn bytes_are_written_in_hex_as_format_writes_them() {
        let every: Vec<u8> = (0..=255).collect();
        let expected: String = every.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(lower_hex(&every), expected);
        assert_eq!(lower_hex(&[]), "");
        assert_eq!(token_fingerprint("t").len(), 8);
    }

    #[test]
    fn control_characters_are_found_byte_by_byte_exactly_as_decoded() {
        // Every character alone, between others, and before U+00A0 (0xC2
        // 0xA0: a lead byte that is no control). Each character's bytes
        // are read on their own, so this covers strings of any length.
        for c in (0..=0x10ffff).filter_map(char::from_u32) {
            for value in [c.to_string(), format!("a{c}é"), format!("{c}\u{a0}")] {
                assert_eq!(
                    has_control(&value),
                    value.chars().any(char::is_control),
                    "{:?}",
                    c
                );
            }
        }
        assert!(!has_control(""));
        assert!(!has_control("NVIDIA H100 80GB HBM3 ¢ é ñ"));
    }

    #[test]
    fn fields_format_as_paths() {
        assert_eq!(Field::Name("node_id").to_string(), "node_id");
        let item = Field::Item {
            list: "pools",
            index: 3,
            name: "model",
        };
        assert_eq!(item.to_string(), "pools[3].model");
        let key = Field::Key {
            map: "labels",
            key: "zone",
        };
        assert_eq!(key.to_string(), "labels[\"zone\"]");
    }

    #[test]
    fn endpoints_are_optional_urls() {
        endpoint("e".into(), "").unwrap();
        endpoint("e".into(), "http://10.0.0.5:8000").unwrap();
        endpoint("e".into(), "https://pool.example/v1").unwrap();
        for bad in [
            "10.0.0.5:8000",
            "ftp://h/",
            "http://",
            &format!("http://{}", "a".repeat(2048)),
        ] {
            let err = endpoint(
                Field::Item {
                    list: "pools",
                    index: 1,
                    name: "endpoint",
                },
                bad,
            )
            .unwrap_err();
            assert_eq!(err.field, "pools[1].endpoint", "{bad:?}");
        }
    }

    #[test]
    fn models_available_are_bounded_unique_text() {
        models_available("models_available", &[]).unwrap();
        models_available(
            "models_available",
            &["llama-3.1-8b".into(), "qwen2.5-7b".into()],
        )
        .unwrap();
        let err = models_available("models_available", &["a".into(), "".into()]).unwrap_err();
        assert_eq!(err.field, "models_available[1]");
        assert!(err.reason.contains("empty"));
        let err = models_available("models_available", &["a".into(), "a".into()]).unwrap_err();
        assert!(err.reason.contains("more than once"), "{err}");
        let err = models_available("models_available", &["bad\nname".into()]).unwrap_err();
        assert!(err.reason.contains("control"), "{err}");
        let many: Vec<String> = (0..=MAX_MODELS_AVAILABLE)
            .map(|i| format!("m{i}"))
            .collect();
        let err = models_available("models_available", &many).unwrap_err();
        assert_eq!(err.field, "models_available");
    }

    #[test]
    fn a_repeat_is_found_among_the_first_eight_and_past_them() {
        let ids: Vec<String> = (0..20).map(|i| format!("p{i}")).collect();
        let check = |list: &[String]| {
            let mut seen = Seen::default();
            list.iter().enumerate().try_for_each(|(index, id)| {
                unique(&mut seen, Field::Entry { list: "ids", index }, id)
            })
        };
        check(&ids).unwrap();
        // A repeat of one kept in place, of one in the set, and of the
        // first kept in place met after the set was started.
        for (at, of) in [(5, 2), (15, 10), (19, 0)] {
            let mut list = ids.clone();
            list[at] = list[of].clone();
            let err = check(&list).unwrap_err();
            assert_eq!(err.field, format!("ids[{at}]"));
            assert!(err.reason.contains("more than once"), "{err}");
        }
    }

    #[test]
    fn register_request_and_heartbeat_check_endpoints_and_models() {
        let mut req = pb::RegisterRequest {
            node_id: "gpu-1".into(),
            machine_id: "m-1".into(),
            address: "http://10.0.0.5:9200".into(),
            pools: vec![pb::PoolSpec {
                pool_id: "p0".into(),
                endpoint: "http://10.0.0.5:8000".into(),
                ..Default::default()
            }],
            models_available: vec!["llama".into()],
            ..Default::default()
        };
        register_request(&req).unwrap();
        req.pools[0].endpoint = "nope".into();
        assert_eq!(
            register_request(&req).unwrap_err().field,
            "pools[0].endpoint"
        );
        req.pools[0].endpoint.clear();
        req.models_available.push("llama".into());
        assert_eq!(
            register_request(&req).unwrap_err().field,
            "models_available[1]"
        );
        let status = pb::PoolStatus {
            pool_id: "p0".into(),
            state: pb::PoolState::Ready as i32,
            endpoint: "tcp://x".into(),
            ..Default::default()
        };
        assert_eq!(
            pool_statuses(&[status]).unwrap_err().field,
            "pools[0].endpoint"
        );
    }

    #[test]
    fn identifier_rules() {
        for good in ["a", "0", "gpu-node-1", &"a".repeat(63)] {
            node_id("n".into(), good).unwrap();
        }
        for bad in [
            "",
            "UPPER",
            "under_score",
            "-lead",
            "trail-",
            "spa ce",
            &"a".repeat(64),
        ] {
            assert!(node_id("n".into(), bad).is_err(), "{bad:?}");
        }
        pool_id("p".into(), "Pool_0.a-b").unwrap();
        assert!(pool_id("p".into(), "pool 0").is_err());
        label_key("k".into(), "team/owner").unwrap();
        assert!(label_key("k".into(), "a=b").is_err());
        machine_id("m".into(), "4c4c4544004d3510").unwrap();
        assert!(machine_id("m".into(), "a b").is_err());
        assert!(machine_id("m".into(), &"x".repeat(129)).is_err());
    }

    #[test]
    fn addresses_need_an_http_scheme_and_a_host() {
        address("a".into(), "https://gpu-1.example:9200/v1").unwrap();
        address("a".into(), "http://[::1]:9200").unwrap();
        address("a".into(), "http://[::1]").unwrap();
        address("a".into(), "http://gpu-1:65535").unwrap();
        for bad in [
            "",
            "not a url",
            "ftp://host/",
            "10.0.0.1:9200",
            "http://",
            "http://host:65536",
            "http://[::1]:99999",
            "http://host:0",
            "http://host:",
            "http://user:pass@host:9200",
            "http://user@host",
        ] {
            let err = address("address".into(), bad).unwrap_err();
            assert_eq!(err.field, "address", "{bad:?}");
        }
        let err = address("address".into(), "http://admin:s3cret@host").unwrap_err();
        assert!(!err.to_string().contains("s3cret"), "{err}");
    }

    #[test]
    fn text_is_bounded_in_bytes_and_has_no_control_characters() {
        text("t".into(), &"é".repeat(128)).unwrap();
        assert!(text("t".into(), &"é".repeat(129)).is_err());
        assert!(text("t".into(), "a\nb").is_err());
        let fitted = fit_text(&format!("a\tb{}", "é".repeat(300)));
        text("t".into(), &fitted).unwrap();
        assert!(fitted.starts_with("abé"));
    }

    #[test]
    fn compute_capability_is_major_dot_minor() {
        compute_capability("c".into(), "").unwrap();
        compute_capability("c".into(), "9.0").unwrap();
        for bad in ["9", "9.", ".0", "x.y", "1.2.3", "123456.78"] {
            assert!(compute_capability("c".into(), bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn errors_name_the_field_path() {
        let pools = vec![
            pb::PoolSpec {
                pool_id: "a".into(),
                ..Default::default()
            };
            2
        ];
        assert_eq!(pool_specs(&pools).unwrap_err().field, "pools[1].pool_id");
        let bad_label = [("zone".to_owned(), "x".repeat(257))];
        let map: std::collections::HashMap<_, _> = bad_label.into();
        assert_eq!(
            labels("labels", &map).unwrap_err().field,
            "labels[\"zone\"]"
        );
        let long = "k".repeat(1000);
        let err = label_key(
            Field::Key {
                map: "labels",
                key: &long,
            },
            &long,
        )
        .unwrap_err();
        assert!(err.to_string().len() < 300, "{err}");
    }

    #[test]
    fn fingerprints_are_short_and_stable() {
        let fp = token_fingerprint("node-token-aaaaaaaaaaaaaaaa");
        assert_eq!(fp.len(), 8);
        assert_eq!(fp, token_fingerprint("node-token-aaaaaaaaaaaaaaaa"));
        assert_ne!(fp, token_fingerprint("node-token-bbbbbbbbbbbbbbbb"));
    }

    #[test]
    fn only_not_found_and_failed_precondition_mean_register_again() {
        assert!(must_register_again(tonic::Code::NotFound));
        assert!(must_register_again(tonic::Code::FailedPrecondition));
        let mut replaced = tonic::Status::failed_precondition("a newer stream took over");
        assert!(!stream_replaced(&replaced), "the code alone says nothing");
        replaced.metadata_mut().insert(
            REASON_KEY,
            tonic::metadata::MetadataValue::from_static(STREAM_REPLACED),
        );
        assert!(stream_replaced(&replaced));
        let mut other = tonic::Status::not_found("gone");
        other.metadata_mut().insert(
            REASON_KEY,
            tonic::metadata::MetadataValue::from_static(STREAM_REPLACED),
        );
        assert!(!stream_replaced(&other), "only with FAILED_PRECONDITION");
        for code in [
            tonic::Code::InvalidArgument,
            tonic::Code::Unavailable,
            tonic::Code::Unauthenticated,
            tonic::Code::PermissionDenied,
        ] {
            assert!(!must_register_again(code), "{code:?}");
        }
    }

    #[test]
    fn gpu_health_and_mig_slices_are_bounded_and_named() {
        let healthy = pb::GpuStats {
            health: pb::GpuHealth::Unhealthy as i32,
            health_reasons: vec!["xid 79".into()],
            xid_errors: vec![79],
            ..Default::default()
        };
        gpu_stats(std::slice::from_ref(&healthy)).unwrap();
        let field_of = |gpus: &[pb::GpuStats]| gpu_stats(gpus).unwrap_err().field;
        let unknown = pb::GpuStats {
            health: 9,
            ..Default::default()
        };
        assert_eq!(field_of(&[healthy.clone(), unknown]), "gpus[1].health");
        let chatty = pb::GpuStats {
            health_reasons: vec!["r".into(); MAX_HEALTH_REASONS + 1],
            ..Default::default()
        };
        assert_eq!(field_of(&[chatty]), "gpus[0].health_reasons");
        let long = pb::GpuStats {
            health_reasons: vec!["r".repeat(MAX_TEXT_LEN + 1)],
            ..Default::default()
        };
        assert_eq!(field_of(&[long]), "gpus[0].health_reasons");
        let xids = pb::GpuStats {
            xid_errors: vec![13; MAX_XID_ERRORS + 1],
            ..Default::default()
        };
        assert_eq!(field_of(&[xids]), "gpus[0].xid_errors");

        let caps = |mig: Vec<pb::MigInstance>| pb::Capabilities {
            gpus: vec![pb::GpuInfo {
                mig_enabled: true,
                mig_instances: mig,
                ..Default::default()
            }],
            ..Default::default()
        };
        let slice = pb::MigInstance {
            uuid: "MIG-1".into(),
            profile: "1g.10gb".into(),
            memory_total_bytes: 10 << 30,
            index: 0,
        };
        capabilities(&caps(vec![slice.clone()])).unwrap();
        let err = capabilities(&caps(vec![slice.clone(); MAX_MIG_INSTANCES + 1])).unwrap_err();
        assert_eq!(err.field, "capabilities.gpus[0].mig_instances");
        let bad_profile = pb::MigInstance {
            profile: "p".repeat(MAX_TEXT_LEN + 1),
            ..slice
        };
        let err = capabilities(&caps(vec![bad_profile])).unwrap_err();
        assert_eq!(err.field, "capabilities.gpus[0].mig_instances.profile");
    }

    #[test]
    fn pool_mig_uuids_must_name_listed_slices_once() {
        let slice = |uuid: &str| pb::MigInstance {
            uuid: uuid.into(),
            profile: "1g.10gb".into(),
            ..Default::default()
        };
        let mut req = pb::RegisterRequest {
            node_id: "gpu-1".into(),
            machine_id: "m-1".into(),
            address: "http://10.0.0.5:9200".into(),
            capabilities: Some(pb::Capabilities {
                gpus: vec![pb::GpuInfo {
                    mig_enabled: true,
                    mig_instances: vec![slice("MIG-a"), slice("MIG-b")],
                    ..Default::default()
                }],
                ..Default::default()
            }),
            pools: vec![
                pb::PoolSpec {
                    pool_id: "whole".into(),
                    ..Default::default()
                },
                pb::PoolSpec {
                    pool_id: "sliced".into(),
                    mig_uuids: vec!["MIG-a".into(), "MIG-b".into()],
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        register_request(&req).unwrap();
        let field_of = |req: &pb::RegisterRequest| register_request(req).unwrap_err().field;

        req.pools[1].mig_uuids[1] = "MIG-elsewhere".into();
        assert_eq!(field_of(&req), "pools[1].mig_uuids[1]");
        req.pools[1].mig_uuids[1] = "MIG-a".into();
        assert_eq!(field_of(&req), "pools[1].mig_uuids[1]");
        req.pools[1].mig_uuids = vec!["MIG-a".into(); MAX_POOL_MIG_UUIDS + 1];
        assert_eq!(field_of(&req), "pools[1].mig_uuids");

        // A node reporting no capabilities has no slices to name.
        req.pools[1].mig_uuids = vec!["MIG-a".into()];
        req.capabilities = None;
        assert_eq!(field_of(&req), "pools[1].mig_uuids[0]");

        // The agent names its own setting through the same rule.
        let err = pool_mig_uuids(&["MIG-x".into()], None, &|_| Field::Name("pool.mig_uuids"))
            .unwrap_err();
        assert_eq!(err.field, "pool.mig_uuids");
        assert!(err.reason.contains("\"MIG-x\""), "{}", err.reason);
    }
}
