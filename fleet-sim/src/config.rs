//! Options of a simulated fleet, shared by the `fleet-sim` binary (as command
//! line flags) and by `bench` (which fills them in code).

use std::time::Duration;

use crate::error::SimError;

/// What fleet to simulate and against which registry.
#[derive(Debug, Clone, clap::Args)]
pub struct FleetConfig {
    /// Registry endpoint URL, or the replicas' URLs separated by commas
    /// (each node finds the leader and follows it after a failover).
    #[arg(
        long,
        env = "FLEET_SIM_REGISTRY",
        default_value = "http://127.0.0.1:50051"
    )]
    pub registry: String,

    /// Virtual nodes to run.
    #[arg(long, default_value_t = 1000)]
    pub nodes: usize,

    /// Heartbeat interval; without it each node uses the interval the
    /// registry advertises in RegisterResponse, as node-agent does.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub interval: Option<Duration>,

    /// Each wait between two heartbeats is the interval times a random factor
    /// in [1 - jitter, 1 + jitter], so nodes do not beat in lockstep.
    #[arg(long, default_value_t = 0.1)]
    pub jitter: f64,

    /// HTTP/2 connections the nodes share; 0 means one per node, as real
    /// agents do. Node i uses connection i mod N, so streams spread evenly.
    #[arg(long, default_value_t = 0)]
    pub connections: usize,

    /// How long the fleet runs (from the first registration).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub duration: Duration,

    /// Registrations started per second while the fleet comes up; 0 starts
    /// every node at once.
    #[arg(long, default_value_t = 1000.0)]
    pub ramp: f64,

    /// Fault mode: the fraction of nodes (0-1) that go silent at
    /// --silence-at. They keep their streams open and send nothing more.
    #[arg(long, default_value_t = 0.0)]
    pub silence_fraction: f64,

    /// When the silenced nodes stop sending, counted from the start.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub silence_at: Option<Duration>,

    /// Node ids are PREFIX-000000, PREFIX-000001, ...; runs with different
    /// prefixes can share one registry.
    #[arg(long, default_value = "sim")]
    pub id_prefix: String,

    /// Fake GPUs per node (registered, and reported in every heartbeat).
    #[arg(long, default_value_t = 8)]
    pub gpus: u32,

    /// Fake model-serving pools per node.
    #[arg(long, default_value_t = 2)]
    pub pools: u32,

    /// Fraction of nodes (0-1, spread evenly) whose GPU 0 reports UNHEALTHY
    /// (XID 79) in every heartbeat, so placement skips the pools on it.
    #[arg(long, default_value_t = 0.0)]
    pub unhealthy_gpu_fraction: f64,

    /// Every heartbeat changes every pool's slots_free (a material change,
    /// so each beat is one change event per node in the registry's feed).
    /// Without it slots_free is random per beat and repeats now and then.
    #[arg(long)]
    pub churn: bool,

    /// Every GPU figure node-agent reads from NVML in every heartbeat (ECC
    /// state and counts, retired pages and row remapping, throttle reasons,
    /// power draw and limit), as a real agent on a data-centre GPU sends
    /// them: ~530 bytes a beat at 8 GPUs and 2 pools against ~300 with
    /// the basic figures only (memory, utilisation, temperature, health).
    #[arg(long)]
    pub all_gpu_figures: bool,

    /// An ack that has not come after this long counts as an error and the
    /// node re-registers.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub ack_timeout: Duration,
}

impl FleetConfig {
    /// A fleet of `nodes` against `registry` with every other option at its
    /// default.
    pub fn new(registry: impl Into<String>, nodes: usize) -> Self {
        Self {
            registry: registry.into(),
            nodes,
            interval: None,
            jitter: 0.1,
            connections: 0,
            duration: Duration::from_secs(60),
            ramp: 1000.0,
            silence_fraction: 0.0,
            silence_at: None,
            id_prefix: "sim".into(),
            gpus: 8,
            pools: 2,
            unhealthy_gpu_fraction: 0.0,
            churn: false,
            all_gpu_figures: false,
            ack_timeout: Duration::from_secs(10),
        }
    }

    /// Connections actually opened: `connections`, or one per node.
    pub fn connection_count(&self) -> usize {
        if self.connections == 0 {
            self.nodes
        } else {
            self.connections.min(self.nodes)
        }
    }

    /// Refuses options that cannot work, naming the flag.
    pub fn check(&self) -> Result<(), SimError> {
        let bad = |msg: String| Err(SimError::Config(msg));
        if self.nodes == 0 {
            return bad("--nodes must be at least 1".into());
        }
        if !(0.0..=0.9).contains(&self.jitter) {
            return bad(format!("--jitter {} is outside 0-0.9", self.jitter));
        }
        if !(0.0..=1.0).contains(&self.silence_fraction) {
            return bad(format!(
                "--silence-fraction {} is outside 0-1",
                self.silence_fraction
            ));
        }
        if !(0.0..=1.0).contains(&self.unhealthy_gpu_fraction) {
            return bad(format!(
                "--unhealthy-gpu-fraction {} is outside 0-1",
                self.unhealthy_gpu_fraction
            ));
        }
        if !self.ramp.is_finite() || self.ramp < 0.0 {
            return bad(format!("--ramp {} must be 0 or more", self.ramp));
        }
        if self.interval.is_some_and(|i| i.is_zero()) {
            return bad("--interval must be above zero".into());
        }
        if self.ack_timeout.is_zero() {
            return bad("--ack-timeout must be above zero".into());
        }
        if self.gpus > 64 || self.pools > 64 {
            return bad("--gpus and --pools are at most 64 (the contract's limit)".into());
        }
        let prefix_ok = !self.id_prefix.is_empty()
            && self.id_prefix.len() <= 50
            && self
                .id_prefix
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !self.id_prefix.starts_with('-');
        if !prefix_ok {
            return bad(format!(
                "--id-prefix {:?} must be 1-50 characters of [a-z0-9-], not starting with '-'",
                self.id_prefix
            ));
        }
        Ok(())
    }

    /// The id of node `index`.
    pub fn node_id(&self, index: usize) -> String {
        format!("{}-{index:06}", self.id_prefix)
    }

    /// Whether node `index` is among the nodes silenced in fault mode. The
    /// chosen ones are spread evenly over the index range (and so over the
    /// connections): exactly floor(nodes * fraction) of them.
    pub fn is_silenced(&self, index: usize) -> bool {
        let f = self.silence_fraction;
        ((index + 1) as f64 * f).floor() > (index as f64 * f).floor()
    }

    /// Whether node `index` has a sick GPU 0 (`--unhealthy-gpu-fraction`,
    /// spread like the silenced nodes).
    pub fn has_unhealthy_gpu(&self, index: usize) -> bool {
        let f = self.unhealthy_gpu_fraction;
        ((index + 1) as f64 * f).floor() > (index as f64 * f).floor()
    }

    /// The ids of the nodes silenced in fault mode.
    pub fn silenced_ids(&self) -> Vec<String> {
        (0..self.nodes)
            .filter(|&i| self.is_silenced(i))
            .map(|i| self.node_id(i))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_silenced_fraction_is_exact_and_spread_out() {
        let mut config = FleetConfig::new("http://127.0.0.1:1", 10_000);
        config.silence_fraction = 0.1;
        let silenced: Vec<usize> = (0..10_000).filter(|&i| config.is_silenced(i)).collect();
        assert_eq!(silenced.len(), 1000);
        assert!(silenced.windows(2).all(|w| w[1] - w[0] == 10));
        config.silence_fraction = 0.0;
        assert!(config.silenced_ids().is_empty());
        config.silence_fraction = 1.0;
        assert_eq!(config.silenced_ids().len(), 10_000);
    }

    #[test]
    fn node_ids_are_dns_labels_in_index_order() {
        let config = FleetConfig::new("http://127.0.0.1:1", 3);
        assert_eq!(config.node_id(7), "sim-000007");
        assert!(config.node_id(9) < config.node_id(10));
    }

    #[test]
    fn impossible_options_are_refused() {
        let ok = FleetConfig::new("http://127.0.0.1:1", 3);
        ok.check().unwrap();
        assert_eq!(ok.connection_count(), 3);
        let mut bad = ok.clone();
        bad.silence_fraction = 1.5;
        assert!(
            bad.check()
                .unwrap_err()
                .to_string()
                .contains("--silence-fraction")
        );
        let mut bad = ok.clone();
        bad.id_prefix = "Sim".into();
        assert!(bad.check().unwrap_err().to_string().contains("--id-prefix"));
        let mut bad = ok;
        bad.nodes = 0;
        assert!(bad.check().is_err());
    }
}
