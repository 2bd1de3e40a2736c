//! Per-pool drain and resume actions: what the agent does to an engine when
//! the registry asks it to drain a pool (DrainCommand) or to take it back
//! (ResumeCommand). Either an HTTP POST to a local URL (an engine's admin
//! endpoint) or a command run without a shell.
//!
//! Actions run in tasks of their own ([`Actions`]), never on the heartbeat
//! path, each bounded by a timeout. Whatever the action does, the agent
//! reports a drained pool DRAINING; the action only tells the engine to
//! stop taking work (and to finish what it has), so the slots the engine
//! reports fall to idle and the registry can count the pool drained.
//!
//! Idempotence: a pool's drain action runs once per drain. The registry
//! re-sends DrainCommand on every new stream until the agent reports the
//! pools DRAINING, so the same command often arrives twice; it starts the
//! action again only where the last run failed. A ResumeCommand runs the
//! resume action of each pool it takes out of the drain, and forgets the
//! drain action's outcome, so a later drain runs it again.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::Uri;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;

use crate::error::error_chain;

/// Answer bytes of an HTTP action kept for the log.
const MAX_ANSWER_BYTES: usize = 64 << 10;
/// Characters of an answer or of a command's stderr that go into a log line.
const LOGGED_CHARS: usize = 200;
/// Longest command line accepted (program and arguments).
const MAX_COMMAND_ARGS: usize = 64;

/// One action, as written in the config file (`drain = { http_post = "..." }`)
/// or in a handoff file (`"drain": {"command": ["..."]}`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum PoolAction {
    /// POST an empty body to this plain `http://` URL (the engine runs on
    /// the node, so no TLS); any 2xx answer is success.
    HttpPost(String),
    /// Run this program with these arguments (no shell; write
    /// `["sh", "-c", "..."]` for one); exit status 0 is success. The
    /// environment adds `NODE_AGENT_POOL_ID` and `NODE_AGENT_ACTION`
    /// (`drain` or `resume`), so one script can serve every pool.
    Command(Vec<String>),
}

impl PoolAction {
    /// Why the action cannot work, if it cannot: checked at start-up and
    /// when a handoff file is read, so a typo is not first noticed in the
    /// middle of a drain.
    pub fn check(&self) -> Result<(), String> {
        match self {
            PoolAction::HttpPost(url) => parse_post_url(url).map(|_| ()),
            PoolAction::Command(args) => {
                let Some(program) = args.first() else {
                    return Err("command is empty; give the program and its arguments".into());
                };
                if program.trim().is_empty() {
                    return Err("command's program is empty".into());
                }
                if args.len() > MAX_COMMAND_ARGS {
                    return Err(format!(
                        "command has {} arguments; at most {MAX_COMMAND_ARGS}",
                        args.len()
                    ));
                }
                if args.iter().any(|a| a.contains('\0')) {
                    return Err("command contains a NUL character".into());
                }
                Ok(())
            }
        }
    }
}

/// A POST URL: plain `http://` with a host, like the health probes.
fn parse_post_url(url: &str) -> Result<Uri, String> {
    let uri: Uri = url
        .parse()
        .map_err(|_| format!("http_post {url:?} is not a URL"))?;
    if uri.scheme() != Some(&http::uri::Scheme::HTTP) {
        return Err(format!(
            "http_post {url:?}: actions speak plain http:// to the local engine"
        ));
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("http_post {url:?} has no host"));
    }
    Ok(uri)
}

/// Which of a pool's actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActionKind {
    /// On DrainCommand.
    Drain,
    /// On ResumeCommand.
    Resume,
}

impl ActionKind {
    /// `drain` or `resume`: the metric label, the log word and the
    /// `NODE_AGENT_ACTION` value.
    pub fn as_str(self) -> &'static str {
        match self {
            ActionKind::Drain => "drain",
            ActionKind::Resume => "resume",
        }
    }
}

/// Why an action failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ActionError {
    /// It did not finish within the timeout (a command is killed).
    #[error("timed out after {0}")]
    Timeout(String),
    /// The POST got an answer other than 2xx.
    #[error("answered {status}: {body}")]
    Status {
        /// The HTTP status.
        status: http::StatusCode,
        /// The start of the answer's body.
        body: String,
    },
    /// The command exited with a failure.
    #[error("exited with {status}: {stderr}")]
    Exit {
        /// The exit status, in words.
        status: String,
        /// The end of its stderr.
        stderr: String,
    },
    /// The request could not be sent or the command not started.
    #[error("{0}")]
    Failed(String),
}

/// Runs `action` for `pool_id` within `timeout`.
pub async fn run_action(
    action: &PoolAction,
    kind: ActionKind,
    pool_id: &str,
    timeout: Duration,
) -> Result<(), ActionError> {
    let work = async {
        match action {
            PoolAction::HttpPost(url) => post(url, timeout).await,
            PoolAction::Command(args) => command(args, kind, pool_id).await,
        }
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| ActionError::Timeout(humantime::format_duration(timeout).to_string()))?
}

async fn post(url: &str, timeout: Duration) -> Result<(), ActionError> {
    let uri = parse_post_url(url).map_err(ActionError::Failed)?;
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(timeout));
    // One request per action, seldom: no connection pool worth keeping.
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build(connector);
    let request = http::Request::post(uri)
        .header(
            http::header::USER_AGENT,
            concat!("node-agent/", env!("CARGO_PKG_VERSION")),
        )
        .body(Empty::new())
        .map_err(|e| ActionError::Failed(e.to_string()))?;
    let response = client
        .request(request)
        .await
        .map_err(|e| ActionError::Failed(error_chain(&e)))?;
    let status = response.status();
    if status.is_success() {
        return Ok(());
    }
    let body = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    Err(ActionError::Status {
        status,
        body: shorten(&String::from_utf8_lossy(&body)),
    })
}

async fn command(args: &[String], kind: ActionKind, pool_id: &str) -> Result<(), ActionError> {
    let (program, rest) = args
        .split_first()
        .ok_or_else(|| ActionError::Failed("empty command".into()))?;
    let output = tokio::process::Command::new(program)
        .args(rest)
        .env("NODE_AGENT_POOL_ID", pool_id)
        .env("NODE_AGENT_ACTION", kind.as_str())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        // The timeout drops this future: the child must not outlive it.
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| ActionError::Failed(format!("cannot start {program:?}: {e}")))?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    Err(ActionError::Exit {
        status: output.status.to_string(),
        stderr: shorten(stderr.trim()),
    })
}

/// The last [`LOGGED_CHARS`] characters of `text` on one line (an error
/// message is usually at the end).
fn shorten(text: &str) -> String {
    let line = text.replace(['\n', '\r'], " ");
    let count = line.chars().count();
    if count <= LOGGED_CHARS {
        return line;
    }
    let tail: String = line.chars().skip(count - LOGGED_CHARS).collect();
    format!("...{tail}")
}

/// Where a pool's drain action stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainAction {
    /// Started and not finished.
    Running,
    /// Finished successfully: not run again until the pool is resumed.
    Done,
    /// Failed: run again on the next DrainCommand.
    Failed,
}

/// One pool's actions: the drain action's progress, and a lock that keeps
/// the pool's actions in order (a resume never overtakes its drain).
#[derive(Debug, Default)]
struct PoolActions {
    /// The drain action's progress since the last resume; `None` before it
    /// was started.
    drain: Option<DrainAction>,
    /// Held while one of the pool's actions runs.
    order: Arc<tokio::sync::Mutex<()>>,
}

/// Starts pools' actions in tasks and remembers how their drain actions
/// went. Cheap to clone; clones share the record.
#[derive(Debug, Clone)]
pub struct Actions {
    /// Per pool id.
    pools: Arc<Mutex<BTreeMap<String, PoolActions>>>,
    /// Bound on one action.
    timeout: Duration,
}

impl Actions {
    /// Actions bounded by `timeout` each.
    pub fn new(timeout: Duration) -> Self {
        Actions {
            pools: Arc::default(),
            timeout,
        }
    }

    /// The drain action's progress for `pool_id`.
    pub fn drain_state(&self, pool_id: &str) -> Option<DrainAction> {
        self.lock().get(pool_id).and_then(|p| p.drain)
    }

    /// Starts the drain action of `pool_id` unless it is running or done
    /// (a DrainCommand re-sent on a new stream); a failed one is retried.
    /// Returns the task, or `None` when nothing was started.
    pub fn drain(&self, pool_id: &str, action: &PoolAction) -> Option<tokio::task::JoinHandle<()>> {
        let order = {
            let mut pools = self.lock();
            let pool = pools.entry(pool_id.to_owned()).or_default();
            if matches!(pool.drain, Some(DrainAction::Running | DrainAction::Done)) {
                return None;
            }
            pool.drain = Some(DrainAction::Running);
            Arc::clone(&pool.order)
        };
        let this = self.clone();
        let pool_id = pool_id.to_owned();
        let action = action.clone();
        Some(tokio::spawn(async move {
            let _turn = order.lock().await;
            let ok = this.execute(&action, ActionKind::Drain, &pool_id).await;
            if let Some(pool) = this.lock().get_mut(&pool_id)
                && pool.drain == Some(DrainAction::Running)
            {
                pool.drain = Some(if ok {
                    DrainAction::Done
                } else {
                    DrainAction::Failed
                });
            }
        }))
    }

    /// `pool_id` leaves the drain: forgets its drain action's outcome (a
    /// later drain runs it again) and starts `action`, if any, after any
    /// drain action still running for the pool.
    pub fn resume(
        &self,
        pool_id: &str,
        action: Option<&PoolAction>,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let order = {
            let mut pools = self.lock();
            let pool = pools.entry(pool_id.to_owned()).or_default();
            pool.drain = None;
            Arc::clone(&pool.order)
        };
        let action = action?.clone();
        let this = self.clone();
        let pool_id = pool_id.to_owned();
        Some(tokio::spawn(async move {
            let _turn = order.lock().await;
            this.execute(&action, ActionKind::Resume, &pool_id).await;
        }))
    }

    /// Runs one action, logs and counts its outcome; true on success.
    async fn execute(&self, action: &PoolAction, kind: ActionKind, pool_id: &str) -> bool {
        let what = kind.as_str();
        tracing::info!(pool_id, action = what, run = ?action, "running pool action");
        let outcome = run_action(action, kind, pool_id, self.timeout).await;
        crate::metrics::pool_action(what, outcome.is_ok());
        match outcome {
            Ok(()) => {
                tracing::info!(pool_id, action = what, "pool action succeeded");
                true
            }
            Err(e) => {
                let retry = match kind {
                    ActionKind::Drain => "retried on the next drain command",
                    ActionKind::Resume => "not retried",
                };
                tracing::error!(pool_id, action = what, error = %e, retry, "pool action failed");
                false
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, PoolActions>> {
        // A poisoned map only means a panic elsewhere; its content is fine.
        self.pools.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests;
