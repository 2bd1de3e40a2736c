//! The one error type of registry-ctl, and the exit status of each error.

use std::io;

pub use registry_proto::status::{code_name, error_chain};

use crate::exit::Exit;

/// Why a command could not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// The endpoint is not a usable URL.
    #[error("invalid registry endpoint {url:?}: {source}")]
    Endpoint {
        /// The URL given.
        url: String,
        /// What tonic said.
        #[source]
        source: tonic::transport::Error,
    },
    /// A `--registry` entry is not a registry URL.
    #[error("{0}")]
    RegistryList(#[from] registry_proto::rules::RuleError),
    /// tonic refused a registry endpoint or the TLS settings for it.
    #[error("{0}")]
    Dial(#[from] registry_proto::endpoints::DialError),
    /// No registry replica answered while looking for the leader.
    #[error("{0}")]
    NoLeader(#[from] registry_proto::endpoints::NoLeader),
    /// The token given as a value cannot be one. Never quotes the token.
    #[error("invalid token from --token/REGISTRY_CTL_TOKEN: {why}")]
    Token {
        /// What is wrong with it.
        why: &'static str,
    },
    /// Both a token and a token file were given.
    #[error(
        "both --token (or REGISTRY_CTL_TOKEN) and --token-file (or REGISTRY_CTL_TOKEN_FILE) are set; give one"
    )]
    TwoTokens,
    /// A token or TLS setting or file is unusable (node-agent's checks).
    #[error("{0}")]
    Settings(#[from] node_agent::ConfigError),
    /// The node-agent's configuration could not be resolved.
    #[error("cannot resolve the node-agent configuration: {0}")]
    AgentConfig(String),
    /// Connecting failed.
    #[error("cannot reach {url}: {failure}: {detail}")]
    Connect {
        /// The registry's URL.
        url: String,
        /// The kind of failure, in words.
        failure: ConnectFailure,
        /// The transport error and its causes.
        detail: String,
    },
    /// The call failed with a gRPC status.
    #[error("{call} on {url} failed: {}: {message}", explain(*code))]
    Rpc {
        /// The call.
        call: &'static str,
        /// The registry's URL.
        url: String,
        /// The status code.
        code: tonic::Code,
        /// The status message.
        message: String,
    },
    /// Connecting or the call took longer than --timeout.
    #[error("{what} did not answer within {timeout} (deadline exceeded; see --timeout)")]
    Timeout {
        /// What was waited for.
        what: String,
        /// The bound, humantime-formatted.
        timeout: String,
    },
    /// A message could not be turned into JSON.
    #[error("cannot print {message} as JSON: {why}")]
    Json {
        /// The message's full protobuf name.
        message: &'static str,
        /// What went wrong.
        why: String,
    },
    /// Writing to stdout failed.
    #[error("cannot write the output: {0}")]
    Output(#[from] io::Error),
}

/// What kind of connection failure it was, for people to act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConnectFailure {
    /// Nothing listens on the port (or a firewall rejects it).
    #[error("connection refused (is the registry running, and on this port?)")]
    Refused,
    /// The TLS handshake failed: unknown CA, wrong name, plain-text server.
    #[error("TLS failure (check --tls-ca, --tls-domain, and http:// vs https://)")]
    Tls,
    /// The host name did not resolve.
    #[error("the host name does not resolve")]
    NameResolution,
    /// Any other transport failure.
    #[error("connection failed")]
    Other,
}

impl ConnectFailure {
    /// Classifies a transport error from connecting to `url`.
    pub fn of(url: &str, error: &(dyn std::error::Error + 'static)) -> Self {
        let chain = error_chain(error);
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
        while let Some(cause) = source {
            if let Some(io) = cause.downcast_ref::<io::Error>() {
                match io.kind() {
                    io::ErrorKind::ConnectionRefused => return ConnectFailure::Refused,
                    // tokio-rustls reports handshake failures as InvalidData.
                    io::ErrorKind::InvalidData if url.starts_with("https://") => {
                        return ConnectFailure::Tls;
                    }
                    _ => {}
                }
            }
            source = cause.source();
        }
        let lower = chain.to_ascii_lowercase();
        if lower.contains("dns error") || lower.contains("failed to lookup address") {
            ConnectFailure::NameResolution
        } else if lower.contains("tls") || lower.contains("certificate") {
            ConnectFailure::Tls
        } else {
            ConnectFailure::Other
        }
    }
}

/// The status code's name and what it usually means for registry-ctl.
pub fn explain(code: tonic::Code) -> String {
    let hint = match code {
        tonic::Code::Unauthenticated => {
            "no valid bearer token: pass a reader token (an admin token for cordon/drain) with --token-file, --token or REGISTRY_CTL_TOKEN"
        }
        tonic::Code::PermissionDenied => {
            "the token may not make this call: reading nodes needs a reader or admin token, cordon/drain an admin token, or the client certificate was refused"
        }
        tonic::Code::DeadlineExceeded => "deadline exceeded: no answer in time",
        tonic::Code::Unavailable => {
            "unavailable: the registry is shutting down or the connection broke"
        }
        tonic::Code::OutOfRange => {
            "out of range: for watch, the revision is older than the registry's history; list again and watch from the listing's revision"
        }
        other => other.description(),
    };
    format!("{} ({hint})", code_name(code))
}

impl CtlError {
    /// A failed call to `url`.
    /// The status's transport cause, if any, is added to its message
    /// ("transport error: connection closed").
    pub fn rpc(call: &'static str, url: &str, status: &tonic::Status) -> Self {
        let mut message = status.message().to_owned();
        if let Some(cause) = std::error::Error::source(status) {
            let cause = error_chain(cause);
            if cause.starts_with(&message) {
                message = cause;
            } else if !message.contains(&cause) {
                message = format!("{message}: {cause}");
            }
            if url.starts_with("http://") && status.code() == tonic::Code::Unknown {
                message.push_str(
                    " (a registry that speaks TLS closes plain-text connections: \
                     try https:// with --tls-ca)",
                );
            }
        }
        Self::Rpc {
            call,
            url: url.to_owned(),
            code: status.code(),
            message,
        }
    }

    /// The exit status this error ends the run with.
    pub fn exit(&self) -> Exit {
        match self {
            CtlError::Endpoint { .. }
            | CtlError::RegistryList(_)
            | CtlError::Dial(_)
            | CtlError::Token { .. }
            | CtlError::TwoTokens
            | CtlError::Settings(_)
            | CtlError::AgentConfig(_) => Exit::Usage,
            CtlError::Rpc {
                code: tonic::Code::InvalidArgument,
                ..
            } => Exit::Usage,
            CtlError::Rpc {
                code: tonic::Code::NotFound,
                ..
            } => Exit::No,
            CtlError::Rpc {
                code: tonic::Code::OutOfRange,
                call: "WatchNodes",
                ..
            } => Exit::Compacted,
            CtlError::Connect { .. }
            | CtlError::NoLeader(_)
            | CtlError::Rpc { .. }
            | CtlError::Timeout { .. } => Exit::Unreachable,
            CtlError::Json { .. } | CtlError::Output(_) => Exit::No,
        }
    }

    /// Whether this is stdout closed early (`registry-ctl list | head`),
    /// which is no failure worth a message.
    pub fn is_broken_pipe(&self) -> bool {
        matches!(self, CtlError::Output(err) if err.kind() == io::ErrorKind::BrokenPipe)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rpc(code: tonic::Code) -> CtlError {
        CtlError::rpc(
            "GetNode",
            "http://r:1",
            &tonic::Status::new(code, "message"),
        )
    }

    #[test]
    fn statuses_map_to_exit_codes() {
        assert_eq!(rpc(tonic::Code::NotFound).exit(), Exit::No);
        assert_eq!(rpc(tonic::Code::InvalidArgument).exit(), Exit::Usage);
        let compacted = CtlError::rpc(
            "WatchNodes",
            "http://r:1",
            &tonic::Status::out_of_range("compacted; relist from revision 9"),
        );
        assert_eq!(compacted.exit(), Exit::Compacted);
        assert!(compacted.to_string().contains("relist from revision 9"));
        for code in [
            tonic::Code::Unauthenticated,
            tonic::Code::PermissionDenied,
            tonic::Code::DeadlineExceeded,
            tonic::Code::Unavailable,
            tonic::Code::Internal,
            tonic::Code::ResourceExhausted,
        ] {
            assert_eq!(rpc(code).exit(), Exit::Unreachable, "{code:?}");
        }
        let timeout = CtlError::Timeout {
            what: "GetNode".into(),
            timeout: "3s".into(),
        };
        assert_eq!(timeout.exit(), Exit::Unreachable);
        assert_eq!(CtlError::TwoTokens.exit(), Exit::Usage);
        assert_eq!(CtlError::Token { why: "it is empty" }.exit(), Exit::Usage);
    }

    #[test]
    fn refusals_are_explained_in_words() {
        let text = rpc(tonic::Code::Unauthenticated).to_string();
        assert!(
            text.contains("UNAUTHENTICATED") && text.contains("--token"),
            "{text}"
        );
        let text = rpc(tonic::Code::PermissionDenied).to_string();
        assert!(
            text.contains("PERMISSION_DENIED") && text.contains("reader"),
            "{text}"
        );
        let text = rpc(tonic::Code::DeadlineExceeded).to_string();
        assert!(text.contains("deadline exceeded"), "{text}");
        let text = rpc(tonic::Code::Internal).to_string();
        assert!(
            text.starts_with("GetNode on http://r:1 failed: INTERNAL"),
            "{text}"
        );
    }

    #[test]
    fn connection_failures_are_classified() {
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert_eq!(
            ConnectFailure::of("http://r:1", &refused),
            ConnectFailure::Refused
        );
        let handshake = io::Error::new(io::ErrorKind::InvalidData, "invalid peer certificate");
        assert_eq!(
            ConnectFailure::of("https://r:1", &handshake),
            ConnectFailure::Tls
        );
        let other = io::Error::other("something else");
        assert_eq!(
            ConnectFailure::of("http://r:1", &other),
            ConnectFailure::Other
        );
    }

    #[test]
    fn a_closed_stdout_is_no_failure() {
        assert!(CtlError::Output(io::ErrorKind::BrokenPipe.into()).is_broken_pipe());
        assert!(!CtlError::TwoTokens.is_broken_pipe());
    }
}
