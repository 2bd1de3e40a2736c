//! The registry-ctl binary as a running client whose output the test reads.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use test_support::eventually;

use crate::error::HarnessError;
use crate::process::ChildProcess;
use crate::registry::clear_environment;

/// How many of its last lines a failing test prints.
const TAIL_LINES: usize = 20;

/// `registry-ctl --registry URL -o json watch`, its stdout lines collected
/// by a background thread; killed when dropped.
#[derive(Debug)]
pub struct WatchProcess {
    /// Every line printed so far, one JSON event each.
    lines: Arc<Mutex<Vec<String>>>,
    /// The process (stderr goes to its log).
    process: ChildProcess,
}

impl WatchProcess {
    /// Starts the watch against `registry_url`.
    pub fn start(binary: &Path, log: &Path, registry_url: &str) -> Result<Self, HarnessError> {
        let mut command = Command::new(binary);
        command
            .arg("--registry")
            .arg(registry_url)
            .args(["-o", "json", "watch"]);
        clear_environment(&mut command);
        let (process, stdout) =
            ChildProcess::spawn_reading_stdout("registry-ctl watch", command, log)?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        {
            let lines = Arc::clone(&lines);
            // Ends at EOF, when the process is killed.
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    lines
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(line);
                }
            });
        }
        Ok(Self { lines, process })
    }

    /// How many lines it has printed so far.
    pub fn line_count(&self) -> usize {
        self.lines().len()
    }

    /// The lines printed so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Waits until a line from index `from` on satisfies `matches`, and
    /// returns it; panics after `timeout` with the lines seen.
    pub async fn wait_line(
        &self,
        what: &str,
        from: usize,
        timeout: Duration,
        matches: impl Fn(&str) -> bool,
    ) -> String {
        eventually(what, timeout, || {
            let lines = self.lines();
            let found = lines.iter().skip(from).find(|line| matches(line)).cloned();
            async move {
                found.ok_or_else(|| {
                    let new = lines.len().saturating_sub(from);
                    format!(
                        "{new} new lines, none matching: {}",
                        tail(&lines[from.min(lines.len())..])
                    )
                })
            }
        })
        .await
    }

    /// The process.
    pub fn process(&mut self) -> &mut ChildProcess {
        &mut self.process
    }
}

impl Drop for WatchProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- registry-ctl watch stdout -----\n{}",
                tail(&self.lines())
            );
        }
    }
}

fn tail(lines: &[String]) -> String {
    let start = lines.len().saturating_sub(TAIL_LINES);
    lines[start..].join("\n")
}

/// How a one-shot `registry-ctl` run ended.
#[derive(Debug, Clone)]
pub struct CtlOutput {
    /// The exit status's code; `None` when a signal ended it.
    pub code: Option<i32>,
    /// What it printed on stdout.
    pub stdout: String,
    /// What it printed on stderr.
    pub stderr: String,
}

impl std::fmt::Display for CtlOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}\nstdout: {}\nstderr: {}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs `registry-ctl --registry URL ARGS...` to its end and returns its
/// output; its stderr is appended to `log` too. Killed after `timeout`
/// (an error), so a hanging command cannot hang the test.
pub async fn run_ctl(
    binary: &Path,
    log: &Path,
    registry_url: &str,
    args: &[&str],
    timeout: Duration,
) -> Result<CtlOutput, HarnessError> {
    let mut command = Command::new(binary);
    command
        .arg("--registry")
        .arg(registry_url)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    clear_environment(&mut command);
    let what = format!("registry-ctl {}", args.join(" "));
    let child = command
        .spawn()
        .map_err(|err| HarnessError::io(format!("starting {what}"), err))?;
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
    // Both pipes are drained while it runs (std's wait_with_output), on a
    // blocking thread so the test's runtime keeps going.
    let waiting = tokio::task::spawn_blocking(move || child.wait_with_output());
    let output = match tokio::time::timeout(timeout, waiting).await {
        Ok(joined) => joined
            .map_err(|err| HarnessError::io(&what, std::io::Error::other(err)))?
            .map_err(|err| HarnessError::io(&what, err))?,
        Err(_) => {
            // The blocking thread reaps it once it is dead.
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            return Err(HarnessError::io(
                &what,
                std::io::Error::other(format!("still running after {timeout:?}, killed")),
            ));
        }
    };
    let output = CtlOutput {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    };
    let entry = format!("$ {what}\n{output}\n");
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .and_then(|mut file| std::io::Write::write_all(&mut file, entry.as_bytes()))
        .map_err(|err| HarnessError::io(format!("appending to {}", log.display()), err))?;
    Ok(output)
}
