//! A child process that cannot outlive its test.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;

use crate::error::HarnessError;

/// How much of a child's log a failing test prints.
const LOG_TAIL_BYTES: usize = 6 * 1024;

/// A running child process, its output going to a log file.
///
/// Dropping it kills the process with SIGKILL and reaps it, also while a
/// failing test unwinds; in that case the tail of its log is printed so the
/// failure can be read without digging for files.
#[derive(Debug)]
pub struct ChildProcess {
    /// The child's name in the test ("registry", "agent node-1").
    name: String,
    /// The process; `None` once it has been reaped.
    child: Option<Child>,
    /// Its process id, kept after reaping for messages.
    pid: u32,
    /// The file its stdout and stderr go to.
    log: PathBuf,
}

impl ChildProcess {
    /// Starts `command` with stdout and stderr appended to `log` (created if
    /// missing) and no stdin.
    pub fn spawn(
        name: impl Into<String>,
        mut command: Command,
        log: &Path,
    ) -> Result<Self, HarnessError> {
        let name = name.into();
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|err| HarnessError::io(format!("opening {}", log.display()), err))?;
        let err = out
            .try_clone()
            .map_err(|err| HarnessError::io("duplicating a log file handle", err))?;
        command
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        let child = command
            .spawn()
            .map_err(|err| HarnessError::io(format!("starting {name}"), err))?;
        Ok(Self {
            name,
            pid: child.id(),
            child: Some(child),
            log: log.to_path_buf(),
        })
    }

    /// Starts `command` like [`ChildProcess::spawn`], but with its stdout
    /// handed to the caller (for a client whose output the test reads);
    /// stderr goes to `log`.
    pub fn spawn_reading_stdout(
        name: impl Into<String>,
        mut command: Command,
        log: &Path,
    ) -> Result<(Self, ChildStdout), HarnessError> {
        let name = name.into();
        let err = File::options()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|err| HarnessError::io(format!("opening {}", log.display()), err))?;
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(err));
        let mut child = command
            .spawn()
            .map_err(|err| HarnessError::io(format!("starting {name}"), err))?;
        let stdout = child.stdout.take().ok_or_else(|| {
            HarnessError::io(
                format!("reading {name}"),
                std::io::Error::other("no stdout pipe"),
            )
        })?;
        Ok((
            Self {
                name,
                pid: child.id(),
                child: Some(child),
                log: log.to_path_buf(),
            },
            stdout,
        ))
    }

    /// The child's name in the test.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The child's log file.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Sends `signal` to the child.
    pub fn signal(&self, signal: Signal) -> Result<(), HarnessError> {
        let pid = i32::try_from(self.pid).expect("process ids fit in i32");
        signal::kill(Pid::from_raw(pid), signal).map_err(|source| HarnessError::Signal {
            name: self.name.clone(),
            pid: self.pid,
            signal,
            source,
        })
    }

    /// How the child exited, or `None` while it runs.
    pub fn try_exit_status(&mut self) -> Result<Option<ExitStatus>, HarnessError> {
        let Some(child) = self.child.as_mut() else {
            return Ok(None);
        };
        child
            .try_wait()
            .map_err(|err| HarnessError::io(format!("polling {}", self.name), err))
    }

    /// Waits up to `timeout` for the child to exit by itself.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, String> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.try_exit_status() {
                Ok(Some(status)) => return Ok(status),
                Ok(None) if Instant::now() >= deadline => {
                    return Err(format!(
                        "{} (pid {}) still runs after {timeout:?}",
                        self.name, self.pid
                    ));
                }
                Ok(None) => tokio::time::sleep(Duration::from_millis(20)).await,
                Err(err) => return Err(err.to_string()),
            }
        }
    }

    /// Kills the child with SIGKILL and reaps it.
    pub fn kill(&mut self) -> Result<ExitStatus, HarnessError> {
        let Some(mut child) = self.child.take() else {
            return Err(HarnessError::io(
                format!("killing {}", self.name),
                std::io::Error::other("already reaped"),
            ));
        };
        // A child that already exited cannot be killed; reaping it is all
        // that is left to do.
        let _ = child.kill();
        child
            .wait()
            .map_err(|err| HarnessError::io(format!("reaping {}", self.name), err))
    }

    /// The last bytes of the child's log.
    pub fn log_tail(&self) -> String {
        match std::fs::read(&self.log) {
            Ok(bytes) => {
                let start = bytes.len().saturating_sub(LOG_TAIL_BYTES);
                String::from_utf8_lossy(&bytes[start..]).into_owned()
            }
            Err(err) => format!("(cannot read {}: {err})", self.log.display()),
        }
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // A stopped child ignores nothing but SIGKILL, which is what is
            // sent; it was stopped on purpose and must not linger.
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "----- {} (pid {}), log {} -----\n{}",
                self.name,
                self.pid,
                self.log.display(),
                self.log_tail()
            );
        }
    }
}
