//! The pools a node runs and their live status, from three sources:
//! static configuration ([`static_pools`]), HTTP health probes ([`probe`])
//! and handoff files written by engine provisioners ([`handoff`]). What the
//! agent does to an engine when the registry drains a pool is in
//! [`action`].

pub mod action;
pub mod handoff;
pub mod probe;
pub mod static_pools;

use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;
use std::sync::Mutex;

use registry_proto::pb;
use serde::Deserialize;
use tokio::sync::watch;

use crate::error::ConfigError;
use action::PoolAction;
use probe::{ProbeOutcome, Prober};
use registry_proto::rules::{self, Field, MAX_POOLS, RuleError};

/// Slots a pool reports when neither the configuration nor the engine says
/// how many it has: one request at a time is the safe assumption.
pub const DEFAULT_SLOTS: u32 = 1;

/// A pool as the agent knows it, whichever source it came from. Optional
/// fields stay `None` until a source sets them, so a handoff file can
/// override only what it knows about a statically configured pool.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// Pool id, unique within the node (1-63 characters of `[A-Za-z0-9._-]`).
    #[serde(alias = "pool_id")]
    pub id: String,
    /// Serving engine ("llamacpp", "vllm"), reported to the registry.
    pub engine: Option<String>,
    /// Engine version, where the provisioner knows it.
    pub engine_version: Option<String>,
    /// Model served, so the registry can place requests by model.
    pub model: Option<String>,
    /// Concurrent request slots; overridden by llama.cpp's `/slots` where
    /// the engine publishes them.
    pub slots: Option<u32>,
    /// GPU indices the pool uses (its device mask); empty means all GPUs.
    pub gpus: Option<Vec<u32>>,
    /// UUIDs of the MIG slices the pool runs on ("MIG-5c1d..."), so
    /// placement can match it to a slice profile (PoolSpec.mig_uuids); each
    /// must be a slice this host lists, checked at start ([`check_mig_uuids`]).
    pub mig_uuids: Option<Vec<String>>,
    /// State reported while no probe says otherwise (default READY).
    pub state: Option<ConfiguredState>,
    /// Health URL (http://) whose answer decides the pool's state.
    pub probe: Option<String>,
    /// URL where the engine takes requests (PoolSpec.endpoint), so
    /// FindPools can hand callers a pool they can talk to directly; checked
    /// by the shared endpoint rule (http:// or https:// with a host).
    pub endpoint: Option<String>,
    /// URL of the engine's Prometheus metrics, registered as
    /// PoolSpec.metrics_url so the registry can list it for service
    /// discovery (`/sd/pools`).
    pub metrics_url: Option<String>,
    /// What to do to the engine when the registry drains the pool (it is
    /// reported DRAINING either way); not registered, so changing it does
    /// not re-register the node.
    pub drain: Option<PoolAction>,
    /// What to do to the engine when the registry cancels the drain.
    pub resume: Option<PoolAction>,
}

impl PoolConfig {
    /// A pool with only an id: READY, one slot, no probe.
    pub fn new(id: impl Into<String>) -> Self {
        PoolConfig {
            id: id.into(),
            ..PoolConfig::default()
        }
    }

    /// Fields of `over` where it sets them, else those of `self`.
    pub fn overlaid_with(&self, over: &PoolConfig) -> PoolConfig {
        PoolConfig {
            id: over.id.clone(),
            engine: over.engine.clone().or_else(|| self.engine.clone()),
            engine_version: over
                .engine_version
                .clone()
                .or_else(|| self.engine_version.clone()),
            model: over.model.clone().or_else(|| self.model.clone()),
            slots: over.slots.or(self.slots),
            gpus: over.gpus.clone().or_else(|| self.gpus.clone()),
            mig_uuids: over.mig_uuids.clone().or_else(|| self.mig_uuids.clone()),
            state: over.state.or(self.state),
            probe: over.probe.clone().or_else(|| self.probe.clone()),
            endpoint: over.endpoint.clone().or_else(|| self.endpoint.clone()),
            metrics_url: over
                .metrics_url
                .clone()
                .or_else(|| self.metrics_url.clone()),
            drain: over.drain.clone().or_else(|| self.drain.clone()),
            resume: over.resume.clone().or_else(|| self.resume.clone()),
        }
    }

    /// The pool's action of `kind`, if one is configured.
    pub fn action(&self, kind: action::ActionKind) -> Option<&PoolAction> {
        match kind {
            action::ActionKind::Drain => self.drain.as_ref(),
            action::ActionKind::Resume => self.resume.as_ref(),
        }
    }

    /// Why one of the pool's actions cannot work: `(key, why)`.
    pub fn check_actions(&self) -> Result<(), (&'static str, String)> {
        for kind in [action::ActionKind::Drain, action::ActionKind::Resume] {
            if let Some(action) = self.action(kind) {
                action.check().map_err(|why| (kind.as_str(), why))?;
            }
        }
        Ok(())
    }

    /// The pool as registered (RegisterRequest.pools).
    pub fn spec(&self) -> pb::PoolSpec {
        pb::PoolSpec {
            pool_id: self.id.clone(),
            engine: self.engine.clone().unwrap_or_default(),
            model: self.model.clone().unwrap_or_default(),
            slots_total: self.slots.unwrap_or(DEFAULT_SLOTS),
            gpu_indices: self.gpus.clone().unwrap_or_default(),
            engine_version: self.engine_version.clone().unwrap_or_default(),
            metrics_url: self.metrics_url.clone().unwrap_or_default(),
            endpoint: self.endpoint.clone().unwrap_or_default(),
            mig_uuids: self.mig_uuids.clone().unwrap_or_default(),
        }
    }

    /// The registry's rules for one pool ([`rules::pool_spec_fields`]),
    /// fields named as in the pool's own configuration (`model`).
    pub fn check_contract(&self) -> Result<(), RuleError> {
        rules::pool_spec_fields(&self.spec(), &Field::Name)
    }

    /// Checks what the registry would refuse and whether the probe URL is
    /// usable, so a typo fails at start-up instead of in an endless
    /// INVALID_ARGUMENT retry loop.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.check_contract().map_err(|rule| ConfigError::Pool {
            pool_id: rules::quoted(&self.id),
            rule,
        })?;
        if let Some(url) = &self.probe {
            probe::parse_probe_url(url)?;
        }
        self.check_actions()
            .map_err(|(key, why)| ConfigError::PoolAction {
                pool_id: rules::quoted(&self.id),
                key,
                why,
            })
    }
}

/// Checks that every MIG slice a configured pool names is one this host
/// lists in `caps` (the registry refuses the registration otherwise), so a
/// wrong UUID stops the agent at start naming the pool and `mig_uuids`.
pub fn check_mig_uuids(pools: &[PoolConfig], caps: &pb::Capabilities) -> Result<(), ConfigError> {
    for pool in pools {
        let uuids = pool.mig_uuids.as_deref().unwrap_or_default();
        rules::pool_mig_uuids(uuids, Some(caps), &|index| Field::Entry {
            list: "mig_uuids",
            index,
        })
        .map_err(|rule| ConfigError::Pool {
            pool_id: rules::quoted(&pool.id),
            rule,
        })?;
    }
    Ok(())
}

/// A pool state as written in configuration and handoff files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ConfiguredState {
    /// The engine is starting.
    Initializing,
    /// Accepting requests.
    Ready,
    /// Finishing in-flight requests.
    Draining,
    /// Unhealthy.
    Failed,
    /// Not running.
    Offline,
}

impl ConfiguredState {
    /// The protobuf state.
    pub fn to_proto(self) -> pb::PoolState {
        match self {
            ConfiguredState::Initializing => pb::PoolState::Initializing,
            ConfiguredState::Ready => pb::PoolState::Ready,
            ConfiguredState::Draining => pb::PoolState::Draining,
            ConfiguredState::Failed => pb::PoolState::Failed,
            ConfiguredState::Offline => pb::PoolState::Offline,
        }
    }
}

impl FromStr for ConfiguredState {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        <ConfiguredState as clap::ValueEnum>::from_str(s, true)
            .map_err(|_| "expected ready, initializing, draining, failed or offline".to_owned())
    }
}

/// Pools to drain on the registry's request (DrainCommand): reported as
/// DRAINING while their engine is otherwise READY, since the agent cannot
/// stop the engine itself but can keep the registry from placing new work
/// (and a pool's drain action, if it has one, tells the engine).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Drain {
    /// Every pool, present and future (a DrainCommand with no pool ids).
    pub all: bool,
    /// These pool ids.
    pub pools: BTreeSet<String>,
    /// Pools resumed one by one while `all` is set: "drain everything,
    /// then resume pool-1" must leave the others drained.
    pub except: BTreeSet<String>,
}

impl Drain {
    /// Adds the pools of one DrainCommand.
    pub fn add(&mut self, pool_ids: &[String]) {
        if pool_ids.is_empty() {
            self.all = true;
            self.except.clear();
        } else {
            for id in pool_ids {
                self.except.remove(id);
                self.pools.insert(id.clone());
            }
        }
    }

    /// Takes back the pools of one ResumeCommand (none named: all of them).
    pub fn resume(&mut self, pool_ids: &[String]) {
        if pool_ids.is_empty() {
            *self = Drain::default();
        } else {
            for id in pool_ids {
                self.pools.remove(id);
                if self.all {
                    self.except.insert(id.clone());
                }
            }
        }
    }

    /// Whether `pool_id` is drained.
    pub fn covers(&self, pool_id: &str) -> bool {
        (self.all && !self.except.contains(pool_id)) || self.pools.contains(pool_id)
    }
}

/// Combines the static pools with the handoff directory's and turns them
/// into specs and live statuses.
pub struct PoolTracker {
    /// The configured pools (at most [`MAX_POOLS`], checked at start-up).
    static_pools: Vec<PoolConfig>,
    /// The handoff directory's pools, where one is set.
    handoff: Option<watch::Receiver<Vec<PoolConfig>>>,
    /// Probes the pools that have a health URL.
    prober: Prober,
    /// Pool ids left out at the last merge, so the warning is logged when
    /// the set changes, not on every heartbeat.
    left_out: Mutex<Vec<String>>,
    /// The host's hardware, so a handoff pool naming a MIG slice the host
    /// does not list is left out (the registry would refuse the whole
    /// registration); `None`: no such check (no capabilities given).
    capabilities: Option<pb::Capabilities>,
    /// Handoff pool ids left out for unknown MIG slices at the last merge,
    /// so the warning is logged when the set changes.
    unknown_slices: Mutex<Vec<String>>,
}

impl PoolTracker {
    /// `handoff` is the watcher's channel where a handoff directory is set.
    pub fn new(
        static_pools: Vec<PoolConfig>,
        handoff: Option<watch::Receiver<Vec<PoolConfig>>>,
        prober: Prober,
    ) -> Self {
        PoolTracker {
            static_pools,
            handoff,
            prober,
            left_out: Mutex::new(Vec::new()),
            capabilities: None,
            unknown_slices: Mutex::new(Vec::new()),
        }
    }

    /// The same tracker checking handoff pools' MIG slices against `caps`.
    pub fn with_capabilities(mut self, caps: pb::Capabilities) -> Self {
        self.capabilities = Some(caps);
        self
    }

    /// A receiver that changes whenever the handoff files do (so a change is
    /// reported at once, not at the next interval).
    pub fn handoff_changes(&self) -> Option<watch::Receiver<Vec<PoolConfig>>> {
        self.handoff.clone()
    }

    /// Every pool now, in pool id order; at most [`MAX_POOLS`], with a
    /// warning naming those left out.
    pub fn current(&self) -> Vec<PoolConfig> {
        let handoff = self
            .handoff
            .as_ref()
            .map(|rx| rx.borrow().clone())
            .unwrap_or_default();
        let handoff = self.drop_unknown_slices(handoff);
        let Merged { pools, left_out } = merge_pools(&self.static_pools, &handoff);
        let mut logged = self.left_out.lock().unwrap_or_else(|e| e.into_inner());
        if *logged != left_out {
            if !left_out.is_empty() {
                tracing::warn!(
                    left_out = ?left_out,
                    max = MAX_POOLS,
                    "more pools than the registry accepts; these handoff pools are not reported"
                );
            }
            *logged = left_out;
        }
        pools
    }

    /// `handoff` without the pools naming a MIG slice the host does not
    /// list, with a warning naming them when that set changes.
    fn drop_unknown_slices(&self, mut handoff: Vec<PoolConfig>) -> Vec<PoolConfig> {
        let Some(caps) = &self.capabilities else {
            return handoff;
        };
        let mut dropped = Vec::new();
        handoff.retain(|pool| {
            let uuids = pool.mig_uuids.as_deref().unwrap_or_default();
            let known = rules::pool_mig_uuids(uuids, Some(caps), &|index| Field::Entry {
                list: "mig_uuids",
                index,
            });
            if let Err(rule) = &known {
                dropped.push(format!("{}: {rule}", pool.id));
            }
            known.is_ok()
        });
        let mut logged = self
            .unknown_slices
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if *logged != dropped {
            if !dropped.is_empty() {
                tracing::warn!(
                    left_out = ?dropped,
                    "handoff pools naming MIG slices this host does not list are not reported"
                );
            }
            *logged = dropped;
        }
        handoff
    }

    /// Live status of `pools`: probed where a probe is set, configured
    /// otherwise. `gpus` gives the free memory of each pool's GPUs.
    pub async fn status(
        &self,
        pools: &[PoolConfig],
        gpus: &[pb::GpuStats],
        drain: &Drain,
    ) -> Vec<pb::PoolStatus> {
        let probes = pools.iter().map(|pool| async move {
            match &pool.probe {
                Some(url) => Some(self.prober.probe(&pool.id, url).await),
                None => None,
            }
        });
        let outcomes = futures_util::future::join_all(probes).await;
        pools
            .iter()
            .zip(outcomes)
            .map(|(pool, outcome)| pool_status(pool, outcome.as_ref(), gpus, drain))
            .collect()
    }
}

/// The pools to report, and the ids of those left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Merged {
    /// At most [`MAX_POOLS`] pools, sorted by id.
    pub pools: Vec<PoolConfig>,
    /// Handoff pools beyond [`MAX_POOLS`], in id order.
    pub left_out: Vec<String>,
}

/// Static pools overlaid with handoff pools of the same id (the provisioner
/// knows more about a running engine than the boot-time configuration),
/// plus handoff-only pools while fewer than [`MAX_POOLS`] are taken: the
/// registry refuses a registration with more, and the configured pools
/// come first. `handoff` is in id order, so the same pools are left out
/// every time.
pub fn merge_pools(static_pools: &[PoolConfig], handoff: &[PoolConfig]) -> Merged {
    let mut by_id: BTreeMap<String, PoolConfig> = static_pools
        .iter()
        .map(|p| (p.id.clone(), p.clone()))
        .collect();
    let mut left_out = Vec::new();
    for pool in handoff {
        let merged = match by_id.get(&pool.id) {
            Some(base) => base.overlaid_with(pool),
            None if by_id.len() >= MAX_POOLS => {
                left_out.push(pool.id.clone());
                continue;
            }
            None => pool.clone(),
        };
        by_id.insert(pool.id.clone(), merged);
    }
    Merged {
        pools: by_id.into_values().collect(),
        left_out,
    }
}

/// One pool's status from its configuration and, where it has a probe, the
/// probe's outcome.
pub fn pool_status(
    pool: &PoolConfig,
    probe: Option<&ProbeOutcome>,
    gpus: &[pb::GpuStats],
    drain: &Drain,
) -> pb::PoolStatus {
    let mut state = match probe {
        Some(outcome) => outcome.state,
        None => pool
            .state
            .map(ConfiguredState::to_proto)
            .unwrap_or(pb::PoolState::Ready),
    };
    if state == pb::PoolState::Ready && drain.covers(&pool.id) {
        state = pb::PoolState::Draining;
    }
    // Without the engine's own count a ready pool is assumed idle. A
    // DRAINING pool keeps the engine's count: the registry counts the pool
    // drained once no slot is busy (slots_free == slots_total), and never
    // places work on it anyway. A pool in any other state takes no new
    // work, whatever its engine says.
    let (slots_total, mut slots_free) = match probe.and_then(|o| o.slots) {
        Some(slots) => (slots.total, slots.free.min(slots.total)),
        None => {
            let total = pool.slots.unwrap_or(DEFAULT_SLOTS);
            (total, total)
        }
    };
    if !matches!(state, pb::PoolState::Ready | pb::PoolState::Draining) {
        slots_free = 0;
    }
    let wanted = pool.gpus.as_deref().unwrap_or_default();
    let vram_free_bytes = gpus
        .iter()
        .filter(|g| wanted.is_empty() || wanted.contains(&g.index))
        .map(|g| g.memory_free_bytes)
        .fold(0u64, u64::saturating_add);
    pb::PoolStatus {
        pool_id: pool.id.clone(),
        state: state as i32,
        slots_total,
        slots_free,
        vram_free_bytes,
        model: pool.model.clone().unwrap_or_default(),
        engine: pool.engine.clone().unwrap_or_default(),
        // The endpoint is registered with the spec; a heartbeat repeats it
        // only when it differs, which the agent's sources never make happen
        // (a changed endpoint changes the spec and re-registers).
        endpoint: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::probe::SlotCounts;
    use super::*;

    fn gpu(index: u32, free: u64) -> pb::GpuStats {
        pb::GpuStats {
            index,
            memory_free_bytes: free,
            ..Default::default()
        }
    }

    #[test]
    fn handoff_pools_naming_slices_the_host_lacks_are_left_out_and_static_ones_checked() {
        let caps = pb::Capabilities {
            gpus: vec![pb::GpuInfo {
                mig_enabled: true,
                mig_instances: vec![pb::MigInstance {
                    uuid: "MIG-a".into(),
                    profile: "1g.10gb".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let on = |id: &str, uuid: &str| PoolConfig {
            mig_uuids: Some(vec![uuid.into()]),
            ..PoolConfig::new(id)
        };
        let (_tx, rx) = watch::channel(vec![on("good", "MIG-a"), on("bad", "MIG-zz")]);
        let tracker = PoolTracker::new(
            vec![PoolConfig::new("static")],
            Some(rx),
            Prober::new(std::time::Duration::from_secs(1)),
        )
        .with_capabilities(caps.clone());
        let ids: Vec<String> = tracker.current().into_iter().map(|p| p.id).collect();
        assert_eq!(ids, ["good", "static"]);

        check_mig_uuids(&[on("good", "MIG-a")], &caps).unwrap();
        let err = check_mig_uuids(&[on("bad", "MIG-zz")], &caps).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("\"bad\"") && text.contains("mig_uuids[0]"),
            "{text}"
        );
    }

    #[test]
    fn static_pool_defaults_to_ready_with_free_slots() {
        let mut pool = PoolConfig::new("pool-0");
        pool.slots = Some(4);
        pool.model = Some("llama".into());
        let status = pool_status(&pool, None, &[], &Drain::default());
        assert_eq!(status.state(), pb::PoolState::Ready);
        assert_eq!((status.slots_total, status.slots_free), (4, 4));
        assert_eq!(status.model, "llama");
    }

    #[test]
    fn configured_state_is_reported_and_takes_no_work_unless_ready() {
        let mut pool = PoolConfig::new("pool-0");
        pool.state = Some(ConfiguredState::Initializing);
        let status = pool_status(&pool, None, &[], &Drain::default());
        assert_eq!(status.state(), pb::PoolState::Initializing);
        assert_eq!((status.slots_total, status.slots_free), (DEFAULT_SLOTS, 0));
    }

    #[test]
    fn probe_outcome_overrides_configured_state_and_slots() {
        let mut pool = PoolConfig::new("pool-0");
        pool.slots = Some(8);
        pool.probe = Some("http://127.0.0.1:1/health".into());
        let outcome = ProbeOutcome {
            state: pb::PoolState::Ready,
            slots: Some(SlotCounts { total: 4, free: 1 }),
        };
        let status = pool_status(&pool, Some(&outcome), &[], &Drain::default());
        assert_eq!((status.slots_total, status.slots_free), (4, 1));
        let failed = ProbeOutcome {
            state: pb::PoolState::Failed,
            slots: None,
        };
        let status = pool_status(&pool, Some(&failed), &[], &Drain::default());
        assert_eq!(status.state(), pb::PoolState::Failed);
        assert_eq!((status.slots_total, status.slots_free), (8, 0));
    }

    #[test]
    fn vram_free_sums_the_pools_gpus_or_all_of_them() {
        let gpus = [gpu(0, 10), gpu(1, 20), gpu(2, 40)];
        let mut pool = PoolConfig::new("p");
        assert_eq!(
            pool_status(&pool, None, &gpus, &Drain::default()).vram_free_bytes,
            70
        );
        pool.gpus = Some(vec![0, 2]);
        assert_eq!(
            pool_status(&pool, None, &gpus, &Drain::default()).vram_free_bytes,
            50
        );
    }

    #[test]
    fn drained_ready_pools_report_draining() {
        let pool = PoolConfig::new("p");
        let mut drain = Drain::default();
        drain.add(&["other".to_owned()]);
        assert_eq!(
            pool_status(&pool, None, &[], &drain).state(),
            pb::PoolState::Ready
        );
        drain.add(&[]);
        let status = pool_status(&pool, None, &[], &drain);
        assert_eq!(status.state(), pb::PoolState::Draining);
        // No engine count: assumed idle, as a ready pool is, so the
        // registry can count it drained at once.
        assert_eq!((status.slots_total, status.slots_free), (1, 1));
    }

    #[test]
    fn draining_pools_report_the_engines_free_slots() {
        let mut pool = PoolConfig::new("p");
        pool.probe = Some("http://127.0.0.1:1/health".into());
        let mut drain = Drain::default();
        drain.add(&["p".to_owned()]);
        let busy = ProbeOutcome {
            state: pb::PoolState::Ready,
            slots: Some(SlotCounts { total: 4, free: 1 }),
        };
        let status = pool_status(&pool, Some(&busy), &[], &drain);
        assert_eq!(status.state(), pb::PoolState::Draining);
        assert_eq!((status.slots_total, status.slots_free), (4, 1));
        // Idle: still DRAINING; the registry decides it is drained.
        let idle = ProbeOutcome {
            state: pb::PoolState::Ready,
            slots: Some(SlotCounts { total: 4, free: 4 }),
        };
        let status = pool_status(&pool, Some(&idle), &[], &drain);
        assert_eq!(status.state(), pb::PoolState::Draining);
        assert_eq!((status.slots_total, status.slots_free), (4, 4));
        // An engine that stopped is reported as it is.
        let stopped = ProbeOutcome {
            state: pb::PoolState::Offline,
            slots: None,
        };
        let status = pool_status(&pool, Some(&stopped), &[], &drain);
        assert_eq!(status.state(), pb::PoolState::Offline);
        assert_eq!(status.slots_free, 0);
    }

    #[test]
    fn drain_all_then_resume_one_leaves_the_others_drained() {
        let ids = |list: &[&str]| list.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let mut drain = Drain::default();
        drain.add(&[]);
        drain.resume(&ids(&["p1"]));
        assert!(drain.covers("p0") && drain.covers("p2") && drain.covers("future"));
        assert!(!drain.covers("p1"));
        // Drained again by name, then everything again.
        drain.add(&ids(&["p1"]));
        assert!(drain.covers("p1"));
        drain.resume(&ids(&["p1", "p2"]));
        assert!(!drain.covers("p1") && !drain.covers("p2") && drain.covers("p0"));
        drain.add(&[]);
        assert!(drain.covers("p1") && drain.covers("p2"));
        drain.resume(&[]);
        assert_eq!(drain, Drain::default());
        // Named pools only: resuming one leaves the other.
        drain.add(&ids(&["a", "b"]));
        drain.resume(&ids(&["a"]));
        assert!(!drain.covers("a") && drain.covers("b") && !drain.covers("c"));
    }

    #[test]
    fn handoff_actions_overlay_static_ones() {
        let mut base = PoolConfig::new("p");
        base.drain = Some(PoolAction::HttpPost("http://127.0.0.1:1/drain".into()));
        base.resume = Some(PoolAction::HttpPost("http://127.0.0.1:1/resume".into()));
        let mut file = PoolConfig::new("p");
        file.drain = Some(PoolAction::Command(vec!["true".into()]));
        let merged = base.overlaid_with(&file);
        assert_eq!(merged.drain, file.drain);
        assert_eq!(merged.resume, base.resume);
        // Actions are not registered: changing them does not re-register.
        assert_eq!(merged.spec(), base.spec());
    }

    #[test]
    fn handoff_pools_overlay_static_ones_field_by_field() {
        let mut base = PoolConfig::new("pool-0");
        base.slots = Some(4);
        base.model = Some("static-model".into());
        let mut file = PoolConfig::new("pool-0");
        file.engine_version = Some("b4000".into());
        file.model = Some("file-model".into());
        let extra = PoolConfig::new("pool-1");
        let merged = merge_pools(&[base], &[file, extra]).pools;
        assert_eq!(merged.len(), 2);
        assert_eq!(merged[0].slots, Some(4));
        assert_eq!(merged[0].model.as_deref(), Some("file-model"));
        assert_eq!(merged[0].engine_version.as_deref(), Some("b4000"));
        assert_eq!(merged[1].id, "pool-1");
    }

    #[test]
    fn pools_beyond_the_limit_are_left_out_static_ones_first() {
        let ids = |prefix: &str, n: usize| -> Vec<PoolConfig> {
            (0..n)
                .map(|i| PoolConfig::new(format!("{prefix}{i:02}")))
                .collect()
        };
        let static_pools = ids("s", 10);
        // Handoff files for two static pools and 60 new ones.
        let mut handoff = ids("h", 60);
        handoff.extend(ids("s", 2));
        handoff.sort_by(|a, b| a.id.cmp(&b.id));
        let merged = merge_pools(&static_pools, &handoff);
        assert_eq!(merged.pools.len(), MAX_POOLS);
        assert!(
            static_pools
                .iter()
                .all(|s| merged.pools.iter().any(|p| p.id == s.id))
        );
        let left: Vec<String> = (54..60).map(|i| format!("h{i:02}")).collect();
        assert_eq!(merged.left_out, left);
        let specs: Vec<pb::PoolSpec> = merged.pools.iter().map(PoolConfig::spec).collect();
        rules::pool_specs(&specs).unwrap();
    }

    #[test]
    fn a_pool_breaking_a_rule_names_the_pool_and_the_field() {
        let mut pool = PoolConfig::new("pool-0");
        pool.engine = Some("e".repeat(300));
        let err = pool.validate().unwrap_err().to_string();
        assert!(
            err.contains("\"pool-0\"") && err.contains("engine"),
            "{err}"
        );
        pool.engine = None;
        pool.gpus = Some((0..65).collect());
        assert_eq!(pool.check_contract().unwrap_err().field, "gpu_indices");
    }
}
