//! Why a fleet could not start: the one error type of fleet-sim.

/// Why a fleet could not start.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The options cannot work.
    #[error("invalid options: {0}")]
    Config(String),
    /// A registry URL is not a usable endpoint.
    #[error(transparent)]
    Endpoint(#[from] registry_proto::endpoints::DialError),
    /// The open-file limit could not be read or raised.
    #[error("open-file limit: {0}")]
    FileLimit(std::io::Error),
}
