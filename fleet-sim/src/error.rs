//! Why a fleet could not start: the one error type of fleet-sim.

/// Why a fleet could not start.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The options cannot work.
    #[error("invalid options: {0}")]
    Config(String),
    /// The registry URL is not a usable endpoint.
    #[error("registry address {url:?}: {source}")]
    Endpoint {
        /// The URL given.
        url: String,
        /// What tonic made of it.
        source: tonic::transport::Error,
    },
    /// The open-file limit could not be read or raised.
    #[error("open-file limit: {0}")]
    FileLimit(std::io::Error),
}
