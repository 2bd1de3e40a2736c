//! The harness's one error type.

use std::path::PathBuf;
use std::time::Duration;

/// Why the harness could not build, start or control a process.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// `cargo build` of the binaries under test failed or could not run.
    #[error("building the binaries under test failed: {0}")]
    Build(String),
    /// A file or process operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What the harness was doing.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Sending a signal to a child failed.
    #[error("sending {signal} to {name} (pid {pid}): {source}")]
    Signal {
        /// The child's name in the test.
        name: String,
        /// Its process id.
        pid: u32,
        /// The signal.
        signal: nix::sys::signal::Signal,
        /// The underlying error.
        #[source]
        source: nix::Error,
    },
    /// A child exited before it was ready.
    #[error("{name} exited before it was ready ({status}); its log is {}", log.display())]
    EarlyExit {
        /// The child's name in the test.
        name: String,
        /// How it exited.
        status: std::process::ExitStatus,
        /// Its log file.
        log: PathBuf,
    },
    /// A child asked to stop did not exit in time.
    #[error("{name} did not exit: {detail}; its log is {}", log.display())]
    NotStopped {
        /// The child's name in the test.
        name: String,
        /// What the wait saw.
        detail: String,
        /// Its log file.
        log: PathBuf,
    },
    /// A child did not become ready in time.
    #[error("{name} was not ready after {timeout:?}; its log is {}", log.display())]
    NotReady {
        /// The child's name in the test.
        name: String,
        /// How long the harness waited.
        timeout: Duration,
        /// Its log file.
        log: PathBuf,
    },
    /// A gRPC call failed.
    #[error("{call}: {status}")]
    Rpc {
        /// The call that failed.
        call: &'static str,
        /// The status it returned.
        status: Box<tonic::Status>,
    },
    /// Connecting to the registry failed.
    #[error("connecting to {url}: {source}")]
    Connect {
        /// The registry's URL.
        url: String,
        /// The transport error.
        #[source]
        source: tonic::transport::Error,
    },
}

impl HarnessError {
    /// An I/O error with what the harness was doing.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}
