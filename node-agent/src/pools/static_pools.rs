//! Statically configured pools: the `--pool` flag's compact syntax. (The
//! TOML form, `[[pools]]` tables, deserializes straight into
//! [`PoolConfig`].)
//!
//! `--pool ID[,KEY=VALUE...]` with keys `slots`, `model`, `engine`,
//! `engine_version`, `state`, `probe`, `endpoint` (where the engine takes
//! requests), `metrics_url` (the engine's Prometheus metrics), `gpus`
//! (indices separated by `:`, since `,` separates the keys) and
//! `mig_uuids` (MIG slice UUIDs, also separated by `:`), for example
//! `--pool pool-0,engine=llamacpp,slots=4,gpus=0:1,probe=http://127.0.0.1:8081/health`.
//! A pool's drain and resume actions ([`super::action`]) are set in the
//! TOML file or a handoff file only: a command's argument list does not
//! fit this syntax.

use super::{ConfiguredState, PoolConfig};
use crate::error::ConfigError;

/// Parses one `--pool` value.
pub fn parse_pool_arg(arg: &str) -> Result<PoolConfig, ConfigError> {
    let bad = |why: String| ConfigError::PoolArg {
        arg: arg.to_owned(),
        why,
    };
    let mut parts = arg.split(',').map(str::trim);
    let first = parts.next().unwrap_or_default();
    let id = first.strip_prefix("id=").unwrap_or(first);
    if id.is_empty() || id.contains('=') {
        return Err(bad("it must start with the pool id".into()));
    }
    let mut pool = PoolConfig::new(id);
    for part in parts.filter(|p| !p.is_empty()) {
        let (key, value) = part
            .split_once('=')
            .ok_or_else(|| bad(format!("{part:?} is not KEY=VALUE")))?;
        let value = value.trim();
        match key.trim() {
            "slots" => {
                pool.slots = Some(
                    value
                        .parse()
                        .map_err(|_| bad(format!("slots={value:?} is not a number")))?,
                )
            }
            "model" => pool.model = Some(value.to_owned()),
            "engine" => pool.engine = Some(value.to_owned()),
            "engine_version" => pool.engine_version = Some(value.to_owned()),
            "state" => pool.state = Some(value.parse::<ConfiguredState>().map_err(bad)?),
            "probe" => pool.probe = Some(value.to_owned()),
            "endpoint" => pool.endpoint = Some(value.to_owned()),
            "metrics_url" => pool.metrics_url = Some(value.to_owned()),
            "gpus" => {
                let gpus = value
                    .split(':')
                    .filter(|s| !s.is_empty())
                    .map(|s| s.trim().parse::<u32>())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|_| bad(format!("gpus={value:?} is not like 0:1:2")))?;
                pool.gpus = Some(gpus);
            }
            "mig_uuids" => {
                let uuids = value.split(':').map(str::trim).filter(|s| !s.is_empty());
                pool.mig_uuids = Some(uuids.map(str::to_owned).collect());
            }
            other => {
                return Err(bad(format!(
                    "unknown key {other:?} (slots, model, engine, engine_version, state, probe, endpoint, metrics_url, gpus, mig_uuids)"
                )));
            }
        }
    }
    pool.validate()?;
    Ok(pool)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_id_is_a_ready_pool() {
        let pool = parse_pool_arg("pool-0").unwrap();
        assert_eq!(pool, PoolConfig::new("pool-0"));
    }

    #[test]
    fn attributes_are_parsed() {
        let pool = parse_pool_arg(
            "pool-0,slots=4,model=llama-3.1-8b,engine=llamacpp,engine_version=b4000,\
             state=initializing,gpus=0:1,probe=http://127.0.0.1:8081/health",
        )
        .unwrap();
        assert_eq!(pool.slots, Some(4));
        assert_eq!(pool.model.as_deref(), Some("llama-3.1-8b"));
        assert_eq!(pool.engine.as_deref(), Some("llamacpp"));
        assert_eq!(pool.engine_version.as_deref(), Some("b4000"));
        assert_eq!(pool.state, Some(ConfiguredState::Initializing));
        assert_eq!(pool.gpus, Some(vec![0, 1]));
        assert_eq!(pool.probe.as_deref(), Some("http://127.0.0.1:8081/health"));
        assert_eq!(parse_pool_arg("id=p1").unwrap().id, "p1");
    }

    #[test]
    fn mig_uuids_are_separated_by_colons_and_registered() {
        let pool = parse_pool_arg("pool-0,mig_uuids=MIG-a:MIG-b").unwrap();
        assert_eq!(pool.mig_uuids, Some(vec!["MIG-a".into(), "MIG-b".into()]));
        assert_eq!(pool.spec().mig_uuids, ["MIG-a", "MIG-b"]);
        // A handoff file's slices replace the configured ones.
        let over = PoolConfig {
            mig_uuids: Some(vec!["MIG-c".into()]),
            ..PoolConfig::new("pool-0")
        };
        assert_eq!(pool.overlaid_with(&over).spec().mig_uuids, ["MIG-c"]);
        assert_eq!(
            pool.overlaid_with(&PoolConfig::new("pool-0")).mig_uuids,
            pool.mig_uuids
        );
    }

    #[test]
    fn malformed_pool_args_are_refused() {
        for arg in [
            "",
            "slots=4",
            "pool-0,slots=many",
            "pool-0,colour=red",
            "pool-0,slots",
            "pool-0,state=sleepy",
            "pool-0,gpus=0,1",
            "pool 0",
            "pool-0,probe=ftp://x/health",
            "pool-0,probe=https://127.0.0.1/health",
        ] {
            assert!(parse_pool_arg(arg).is_err(), "{arg:?} was accepted");
        }
    }
}
