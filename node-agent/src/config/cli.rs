//! Command-line flags. Each also reads the `NODE_AGENT_*` environment
//! variable named in its help.

use std::path::PathBuf;

use clap::Parser;

use super::settings::Settings;

/// The agent's command line: the config file, every [`Settings`] flag,
/// and the two list flags whose file form differs (`[[pools]]` and
/// `[labels]` tables).
#[derive(Debug, Clone, Default, Parser)]
#[command(
    name = "node-agent",
    version,
    about = "Registers this GPU host with the node registry and reports its pools."
)]
pub struct Cli {
    /// TOML config file; flags and environment variables override it.
    #[arg(long, env = "NODE_AGENT_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// The settings a config file may hold too.
    #[command(flatten)]
    pub settings: Settings,

    /// A pool: ID[,slots=N][,model=M][,engine=E][,engine_version=V]
    /// [,state=ready|initializing|draining|failed|offline][,gpus=0:1]
    /// [,probe=http://HOST:PORT/health][,endpoint=http://HOST:PORT]
    /// [,metrics_url=http://HOST:PORT/metrics].
    /// Repeatable; the environment
    /// variable separates pools with ';'.
    #[arg(
        long = "pool",
        env = "NODE_AGENT_POOL",
        value_name = "SPEC",
        value_delimiter = ';'
    )]
    pub pools: Vec<String>,

    /// A label KEY=VALUE. Repeatable; the environment variable separates
    /// labels with ','.
    #[arg(
        long = "label",
        env = "NODE_AGENT_LABEL",
        value_name = "KEY=VALUE",
        value_delimiter = ','
    )]
    pub labels: Vec<String>,

    /// A model staged on this host's disk but not loaded by any pool, so
    /// ListModels can say where it could start quickly. Repeatable; added
    /// to the file's `models_available`; the environment variable
    /// separates models with ','.
    #[arg(
        long = "model-available",
        env = "NODE_AGENT_MODEL_AVAILABLE",
        value_name = "MODEL",
        value_delimiter = ','
    )]
    pub models_available: Vec<String>,
}
