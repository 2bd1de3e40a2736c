//! The one error type of registry-ctl.

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
    /// Connecting failed.
    #[error("cannot connect to {url}: {source}")]
    Connect {
        /// The registry's URL.
        url: String,
        /// The transport error.
        #[source]
        source: tonic::transport::Error,
    },
    /// The call failed with a gRPC status.
    #[error("{call} failed: {code:?}: {message}")]
    Rpc {
        /// The call.
        call: &'static str,
        /// The status code.
        code: tonic::Code,
        /// The status message.
        message: String,
    },
    /// Connecting or the call took longer than --timeout.
    #[error("{what} did not answer within {timeout}")]
    Timeout {
        /// What was waited for.
        what: String,
        /// The bound, humantime-formatted.
        timeout: String,
    },
    /// The token cannot be sent as gRPC metadata.
    #[error("the token is not a valid header value (printable ASCII only)")]
    Token,
    /// The node-agent's configuration could not be resolved.
    #[error("cannot resolve the node-agent configuration: {0}")]
    AgentConfig(String),
}

impl CtlError {
    /// A failed call.
    pub fn rpc(call: &'static str, status: tonic::Status) -> Self {
        Self::Rpc {
            call,
            code: status.code(),
            message: status.message().to_owned(),
        }
    }
}
