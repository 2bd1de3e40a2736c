//! The TOML config file: every [`Settings`] key, plus `[labels]` and
//! `[[pools]]` tables.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use super::settings::Settings;
use crate::error::ConfigError;
use crate::pools::PoolConfig;

/// The config file. Keys are the flags' names with `_` for `-`; unknown
/// keys are refused so a typo does not go unnoticed.
// `deny_unknown_fields` sits here, on the outer struct: serde checks a
// flattened struct's leftovers there, and ignores the attribute on the
// flattened one.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// The keys shared with the flags. `auth_token` among them is refused
    /// when resolved: the token belongs in `auth_token_file`.
    #[serde(flatten)]
    pub settings: Settings,
    /// `[labels]` table.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// `[[pools]]` tables.
    #[serde(default)]
    pub pools: Vec<PoolConfig>,
    /// `models_available = [...]`: models staged on disk, not loaded.
    #[serde(default)]
    pub models_available: Vec<String>,
}

impl FileConfig {
    /// Parses TOML text; `path` is only for the error message.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::ParseFile {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    /// Reads and parses a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
            what: "config file",
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }
}
