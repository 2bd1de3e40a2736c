//! The agent's configuration error, and a helper that prints an error with
//! its causes.

use std::path::PathBuf;

use registry_proto::rules::RuleError;
pub use registry_proto::status::error_chain;

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file the configuration names (the config file, the token file,
    /// a TLS file) could not be read.
    #[error("cannot read {what} {path}: {source}")]
    ReadFile {
        /// What the file is for ("config file", "auth token file").
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The config file is not valid TOML of the expected shape.
    #[error("invalid config file {path}: {message}")]
    ParseFile {
        /// The file.
        path: PathBuf,
        /// What the TOML parser said.
        message: String,
    },
    /// A `--pool` value could not be parsed.
    #[error("invalid --pool {arg:?}: {why}")]
    PoolArg {
        /// The value given.
        arg: String,
        /// What is wrong with it.
        why: String,
    },
    /// A value is malformed.
    #[error("invalid {what} {value:?}: {why}")]
    Invalid {
        /// Which setting.
        what: &'static str,
        /// The value given.
        value: String,
        /// What is expected.
        why: String,
    },
    /// A setting's value breaks a rule of the registry's contract, which
    /// the registry would refuse with INVALID_ARGUMENT on every try.
    #[error("invalid {setting}: {}: {}", rule.field, rule.reason)]
    Rule {
        /// The setting, with its flag, environment variable and file key.
        setting: &'static str,
        /// The broken rule, naming the field. Not a `#[source]`: the
        /// message already holds it, and error chains would repeat it.
        rule: RuleError,
    },
    /// A configured pool (`--pool` or `[[pools]]`) breaks a rule of the
    /// registry's contract.
    #[error(
        "invalid pool {pool_id} (--pool, NODE_AGENT_POOL, [[pools]]): {}: {}",
        rule.field,
        rule.reason
    )]
    Pool {
        /// The pool's id, quoted and cut short when long.
        pool_id: String,
        /// The broken rule, naming the pool's field (in the message).
        rule: RuleError,
    },
    /// A pool's drain or resume action cannot work (a malformed URL, an
    /// empty command).
    #[error("invalid pool {pool_id} (--pool, NODE_AGENT_POOL, [[pools]]): {key}: {why}")]
    PoolAction {
        /// The pool's id, quoted and cut short when long.
        pool_id: String,
        /// The action's key (`drain` or `resume`).
        key: &'static str,
        /// What is wrong with it.
        why: String,
    },
    /// A file holds no usable content (a TLS file without the expected
    /// PEM block).
    #[error("invalid {what} {path}: {why}")]
    BadFile {
        /// What the file is for.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// The auth token is unusable. The message never quotes the token.
    #[error("invalid auth token from {from}: {why}")]
    BadToken {
        /// Where it came from ("file PATH" or the variable).
        from: String,
        /// What is wrong with it.
        why: String,
    },
    /// Settings that exclude or need each other.
    #[error("{0}")]
    Conflict(String),
    /// The TLS settings were refused when the connection was set up.
    #[error("unusable tls settings: {0}")]
    Tls(String),
    /// No node id was given and none could be derived from the hostname.
    #[error("no --node-id given and the hostname gives no usable one")]
    NoNodeId,
}

impl ConfigError {
    pub(crate) fn invalid(what: &'static str, value: &str, why: &str) -> Self {
        ConfigError::Invalid {
            what,
            value: value.to_owned(),
            why: why.to_owned(),
        }
    }

    /// A broken rule of `setting`; for `map_err`.
    pub(crate) fn rule(setting: &'static str) -> impl FnOnce(RuleError) -> Self {
        move |rule| ConfigError::Rule { setting, rule }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broken_rule_names_the_setting_and_the_field() {
        let rule = registry_proto::rules::node_id("node_id".into(), "Bad_Node").unwrap_err();
        let error = ConfigError::rule("node id (--node-id, NODE_AGENT_NODE_ID, node_id)")(rule);
        let text = error_chain(&error);
        assert!(
            text.starts_with("invalid node id (--node-id, NODE_AGENT_NODE_ID, node_id): node_id: "),
            "{text}"
        );
        assert_eq!(text.matches("DNS label").count(), 1, "{text}");
    }
}
