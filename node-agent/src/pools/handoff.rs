//! Handoff files: engine provisioners write one `*.json` file per pool into a
//! directory (the seed design's `.runtime/engines/`), and the agent reports
//! those pools.
//!
//! The directory is polled (every second by default) rather than watched
//! with inotify: polling needs no extra crate, sees changes on bind mounts,
//! overlay and network file systems where inotify events go missing, and
//! one second meets the two-second update bound (CLOUD-3013). Files are
//! re-read on every poll and compared by content, not mtime, because a
//! provisioner rewriting a file twice in one second keeps the mtime on file
//! systems with coarse timestamps. The files are tiny, so this is cheap.
//!
//! A file that fails to parse (say, caught half-written by a provisioner
//! that does not write atomically) keeps the pool it last described, with a
//! warning, so the pool does not flap away and back. A file that parses but
//! describes a pool the registry would refuse (a rule of
//! [`registry_proto::rules`]: a bad pool id, a model over 256 bytes, more
//! than 64 GPUs ...) is skipped with a warning naming the file and the
//! field: one bad file must not keep the whole node unregistered.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use registry_proto::rules::RuleError;
use serde::Deserialize;
use tokio::sync::watch;

use super::action::PoolAction;
use super::{ConfiguredState, PoolConfig};

/// Larger files are not handoff files; they are skipped unread.
const MAX_FILE_BYTES: u64 = 1 << 20;

/// One handoff file. Unknown fields are ignored: provisioners record more
/// (pid, command line) than the registry needs.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct HandoffFile {
    /// The pool's id; the file name without `.json` when absent.
    pub pool_id: Option<String>,
    /// Serving engine ("llamacpp").
    pub engine: Option<String>,
    /// Engine version.
    pub engine_version: Option<String>,
    /// Model served.
    pub model: Option<String>,
    /// Base URL of the engine ("http://127.0.0.1:8081"); its `/health` is
    /// probed unless `health_url` names another URL, and it is the pool's
    /// endpoint (PoolSpec.endpoint) for FindPools. Handoff files carry no
    /// staged models: staging is the node's business, not one engine's, so
    /// `models_available` comes from the agent's configuration only.
    pub url: Option<String>,
    /// Explicit health URL.
    pub health_url: Option<String>,
    /// Request slots.
    pub slots: Option<u32>,
    /// GPUs the engine uses: a list `[0, 1]`, a CUDA_VISIBLE_DEVICES-style
    /// string `"0,1"`, or a bit mask (bit i = GPU i).
    pub device_mask: Option<DeviceMask>,
    /// State to report when there is no URL to probe.
    pub state: Option<ConfiguredState>,
    /// URL of the engine's Prometheus metrics ("http://127.0.0.1:8081/metrics").
    pub metrics_url: Option<String>,
    /// MIG slice UUIDs the pool runs on (`["MIG-5c1d..."]`), registered as
    /// PoolSpec.mig_uuids.
    pub mig_uuids: Option<Vec<String>>,
    /// What to do when the registry drains the pool:
    /// `{"http_post": "http://127.0.0.1:8081/admin/drain"}` or
    /// `{"command": ["systemctl", "stop", "engine@7"]}`.
    pub drain: Option<PoolAction>,
    /// What to do when the registry cancels the drain (same forms).
    pub resume: Option<PoolAction>,
}

/// The forms a device mask takes in handoff files.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum DeviceMask {
    /// `[0, 1]`
    List(Vec<u32>),
    /// Bit i set = GPU i.
    Bits(u64),
    /// `"0,1"`
    Text(String),
}

impl DeviceMask {
    /// The GPU indices, ascending; `None` for a malformed string.
    pub fn indices(&self) -> Option<Vec<u32>> {
        let mut indices = match self {
            DeviceMask::List(list) => list.clone(),
            DeviceMask::Bits(bits) => (0..64).filter(|i| bits & (1u64 << i) != 0).collect(),
            DeviceMask::Text(text) => text
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| s.parse().ok())
                .collect::<Option<Vec<u32>>>()?,
        };
        indices.sort_unstable();
        indices.dedup();
        Some(indices)
    }
}

/// Why a handoff file was not used.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    /// Not JSON of the expected shape.
    #[error("malformed handoff file: {0}")]
    Json(#[from] serde_json::Error),
    /// Parsed, but a field is unusable.
    #[error("{0}")]
    Invalid(String),
    /// The pool breaks a rule of the registry's contract.
    #[error(transparent)]
    Rule(#[from] RuleError),
}

/// Turns the content of the handoff file `<stem>.json` into a pool.
pub fn parse_handoff(stem: &str, bytes: &[u8]) -> Result<PoolConfig, HandoffError> {
    let file: HandoffFile = serde_json::from_slice(bytes)?;
    let probe = match (&file.health_url, &file.url) {
        (Some(health), _) => Some(health.clone()),
        (None, Some(base)) => Some(format!("{}/health", base.trim_end_matches('/'))),
        (None, None) => None,
    };
    let gpus = match &file.device_mask {
        Some(mask) => Some(mask.indices().ok_or_else(|| {
            HandoffError::Invalid(format!("device_mask {mask:?} is not like \"0,1\""))
        })?),
        None => None,
    };
    let pool = PoolConfig {
        id: file.pool_id.unwrap_or_else(|| stem.to_owned()),
        engine: file.engine,
        engine_version: file.engine_version,
        model: file.model,
        slots: file.slots,
        gpus,
        mig_uuids: file.mig_uuids,
        state: file.state,
        probe,
        endpoint: file.url.clone(),
        metrics_url: file.metrics_url,
        drain: file.drain,
        resume: file.resume,
    };
    pool.check_contract()?;
    if let Some(url) = &pool.probe {
        super::probe::parse_probe_url(url).map_err(|e| HandoffError::Invalid(e.to_string()))?;
    }
    pool.check_actions()
        .map_err(|(key, why)| HandoffError::Invalid(format!("{key}: {why}")))?;
    Ok(pool)
}

/// What the directory held at the last scan, per file.
struct Cached {
    bytes: Vec<u8>,
    /// The pool the file last described successfully.
    pool: Option<PoolConfig>,
}

/// A handoff directory and what its files said at the last scan.
pub struct HandoffDir {
    dir: PathBuf,
    files: BTreeMap<PathBuf, Cached>,
    /// Whether "cannot read the directory" was logged (once, not per poll).
    unreadable_logged: bool,
}

impl HandoffDir {
    /// A directory not yet scanned. It need not exist yet: provisioners may
    /// create it after the agent starts.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        HandoffDir {
            dir: dir.into(),
            files: BTreeMap::new(),
            unreadable_logged: false,
        }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Reads the directory and returns its pools in id order (blocking I/O).
    pub fn scan(&mut self) -> Vec<PoolConfig> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => {
                self.unreadable_logged = false;
                entries
            }
            Err(e) => {
                if !self.unreadable_logged {
                    tracing::warn!(dir = %self.dir.display(), error = %e, "cannot read handoff directory; reporting no handoff pools until it appears");
                    self.unreadable_logged = true;
                }
                self.files.clear();
                return Vec::new();
            }
        };
        let mut seen = BTreeSet::new();
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "json") || !path.is_file() {
                continue;
            }
            seen.insert(path.clone());
            self.refresh(&path);
        }
        self.files.retain(|path, _| seen.contains(path));

        let mut pools: BTreeMap<String, PoolConfig> = BTreeMap::new();
        for (path, cached) in &self.files {
            let Some(pool) = &cached.pool else { continue };
            if pools.contains_key(&pool.id) {
                tracing::warn!(file = %path.display(), pool_id = %pool.id, "two handoff files name one pool; using the first by file name");
                continue;
            }
            pools.insert(pool.id.clone(), pool.clone());
        }
        pools.into_values().collect()
    }

    fn refresh(&mut self, path: &Path) {
        let too_big = std::fs::metadata(path).is_ok_and(|m| m.len() > MAX_FILE_BYTES);
        if too_big {
            tracing::warn!(file = %path.display(), "handoff file over 1 MiB; skipped");
            self.files.remove(path);
            return;
        }
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            // Removed between listing and reading: the next scan drops it.
            Err(e) => {
                tracing::debug!(file = %path.display(), error = %e, "cannot read handoff file");
                return;
            }
        };
        if self.files.get(path).is_some_and(|c| c.bytes == bytes) {
            return;
        }
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let previous = self.files.get(path).and_then(|c| c.pool.clone());
        let pool = match parse_handoff(&stem, &bytes) {
            Ok(pool) => {
                tracing::info!(file = %path.display(), pool_id = %pool.id, "handoff file read");
                Some(pool)
            }
            // Maybe caught half-written: the next poll will tell.
            Err(e @ HandoffError::Json(_)) => {
                tracing::warn!(file = %path.display(), error = %e, "ignoring handoff file content; keeping what it said before");
                previous
            }
            // Complete but unusable: the registry would refuse the whole
            // registration for it, so the file is left out until fixed.
            Err(HandoffError::Rule(rule)) => {
                tracing::warn!(file = %path.display(), field = %rule.field, reason = %rule.reason, "handoff file skipped: its pool breaks a registry rule");
                None
            }
            Err(e @ HandoffError::Invalid(_)) => {
                tracing::warn!(file = %path.display(), error = %e, "handoff file skipped");
                None
            }
        };
        self.files.insert(path.to_owned(), Cached { bytes, pool });
    }
}

/// Scans `dir` once now, then every `poll` in a task; the channel carries
/// the directory's pools and changes only when they do.
pub async fn watch_dir(
    dir: PathBuf,
    poll: Duration,
) -> (
    watch::Receiver<Vec<PoolConfig>>,
    tokio::task::JoinHandle<()>,
) {
    let (mut handoff, first) = scan_blocking(HandoffDir::new(dir)).await;
    let (tx, rx) = watch::channel(first);
    let task = tokio::spawn(async move {
        let mut ticker = tokio::time::interval(poll);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            ticker.tick().await;
            let (dir, pools) = scan_blocking(handoff).await;
            handoff = dir;
            tx.send_if_modified(|current| {
                let changed = *current != pools;
                if changed {
                    *current = pools;
                }
                changed
            });
            if tx.is_closed() {
                return;
            }
        }
    });
    (rx, task)
}

async fn scan_blocking(mut dir: HandoffDir) -> (HandoffDir, Vec<PoolConfig>) {
    let path = dir.path().to_owned();
    tokio::task::spawn_blocking(move || {
        let pools = dir.scan();
        (dir, pools)
    })
    .await
    .unwrap_or_else(|e| {
        // Only a panic inside scan gets here; start over from an empty cache.
        tracing::error!(error = %e, "handoff scan panicked");
        (HandoffDir::new(path), Vec::new())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_handoff_file_becomes_a_probed_pool() {
        let pool = parse_handoff(
            "ignored",
            br#"{"pool_id":"pool-7","engine":"llamacpp","engine_version":"b4000",
                "url":"http://127.0.0.1:8081/","slots":4,"device_mask":[1,0],
                "model":"llama-3.1-8b","pid":1234}"#,
        )
        .unwrap();
        assert_eq!(pool.id, "pool-7");
        assert_eq!(pool.engine.as_deref(), Some("llamacpp"));
        assert_eq!(pool.engine_version.as_deref(), Some("b4000"));
        assert_eq!(pool.model.as_deref(), Some("llama-3.1-8b"));
        assert_eq!(pool.slots, Some(4));
        assert_eq!(pool.gpus, Some(vec![0, 1]));
        assert_eq!(pool.probe.as_deref(), Some("http://127.0.0.1:8081/health"));
        assert_eq!(pool.endpoint.as_deref(), Some("http://127.0.0.1:8081/"));
        assert_eq!(pool.spec().endpoint, "http://127.0.0.1:8081/");
    }

    #[test]
    fn a_handoff_metrics_url_is_registered_and_checked() {
        let pool = parse_handoff(
            "pool-8",
            br#"{"metrics_url":"http://127.0.0.1:8081/metrics"}"#,
        )
        .unwrap();
        assert_eq!(pool.spec().metrics_url, "http://127.0.0.1:8081/metrics");
        let err = parse_handoff("pool-8", br#"{"metrics_url":"file:///tmp/m"}"#).unwrap_err();
        assert!(err.to_string().contains("metrics_url"), "{err}");
    }

    #[test]
    fn handoff_files_carry_drain_and_resume_actions() {
        let pool = parse_handoff(
            "p",
            br#"{"drain":{"http_post":"http://127.0.0.1:8081/admin/drain"},
                "resume":{"command":["systemctl","start","engine@p"]}}"#,
        )
        .unwrap();
        assert_eq!(
            pool.drain,
            Some(PoolAction::HttpPost(
                "http://127.0.0.1:8081/admin/drain".into()
            ))
        );
        assert_eq!(
            pool.resume,
            Some(PoolAction::Command(vec![
                "systemctl".into(),
                "start".into(),
                "engine@p".into()
            ]))
        );
        let err = parse_handoff("p", br#"{"drain":{"command":[]}}"#).unwrap_err();
        assert!(
            matches!(&err, HandoffError::Invalid(why) if why.starts_with("drain: ")),
            "{err}"
        );
        let err = parse_handoff("p", br#"{"resume":{"http_post":"ftp://x/"}}"#).unwrap_err();
        assert!(err.to_string().contains("resume: http_post"), "{err}");
        assert!(parse_handoff("p", br#"{"drain":{"http_get":"http://x/"}}"#).is_err());
    }

    #[test]
    fn file_name_is_the_default_pool_id_and_state_is_kept() {
        let pool = parse_handoff("pool-3", br#"{"state":"initializing"}"#).unwrap();
        assert_eq!(pool.id, "pool-3");
        assert_eq!(pool.state, Some(ConfiguredState::Initializing));
        assert_eq!(pool.probe, None);
    }

    #[test]
    fn device_masks_in_every_form() {
        let parse = |json: &str| parse_handoff("p", json.as_bytes()).unwrap().gpus;
        assert_eq!(parse(r#"{"device_mask":"2, 0"}"#), Some(vec![0, 2]));
        assert_eq!(parse(r#"{"device_mask":5}"#), Some(vec![0, 2]));
        assert_eq!(parse(r#"{"device_mask":[3]}"#), Some(vec![3]));
        assert!(parse_handoff("p", br#"{"device_mask":"a,b"}"#).is_err());
    }

    #[test]
    fn explicit_health_url_wins_and_bad_files_are_refused() {
        let pool = parse_handoff(
            "p",
            br#"{"url":"http://127.0.0.1:1","health_url":"http://127.0.0.1:2/ready"}"#,
        )
        .unwrap();
        assert_eq!(pool.probe.as_deref(), Some("http://127.0.0.1:2/ready"));
        assert!(parse_handoff("p", b"{not json").is_err());
        assert!(parse_handoff("p", br#"{"pool_id":"bad id"}"#).is_err());
        assert!(parse_handoff("p", br#"{"url":"https://x"}"#).is_err());
        assert!(parse_handoff("p", br#"{"state":"sleepy"}"#).is_err());
    }

    #[test]
    fn pools_the_registry_would_refuse_are_refused_naming_the_field() {
        let long_model = format!(r#"{{"model":"{}"}}"#, "m".repeat(257));
        let many_gpus = format!(r#"{{"device_mask":{:?}}}"#, (0..65).collect::<Vec<u32>>());
        for (json, field) in [
            (long_model.as_str(), "model"),
            (r#"{"engine":"llama\u0000cpp"}"#, "engine"),
            (many_gpus.as_str(), "gpu_indices"),
            (r#"{"pool_id":"bad id"}"#, "pool_id"),
        ] {
            match parse_handoff("p", json.as_bytes()) {
                Err(HandoffError::Rule(rule)) => assert_eq!(rule.field, field, "{json}"),
                other => panic!("{json}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_file_breaking_a_rule_is_skipped_and_the_others_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut handoff = HandoffDir::new(dir.path());
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, r#"{"pool_id":"pool-bad","slots":1}"#).unwrap();
        std::fs::write(dir.path().join("good.json"), r#"{"pool_id":"pool-good"}"#).unwrap();
        assert_eq!(handoff.scan().len(), 2);
        // Rewritten with a value the registry refuses: dropped, not kept.
        let long = format!(r#"{{"pool_id":"pool-bad","model":"{}"}}"#, "m".repeat(300));
        std::fs::write(&bad, long).unwrap();
        let ids: Vec<_> = handoff.scan().into_iter().map(|p| p.id).collect();
        assert_eq!(ids, ["pool-good"]);
    }

    #[test]
    fn scan_tracks_new_changed_broken_and_removed_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut handoff = HandoffDir::new(dir.path());
        assert!(handoff.scan().is_empty());

        let a = dir.path().join("a.json");
        std::fs::write(&a, r#"{"pool_id":"pool-a","slots":2}"#).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not a handoff file").unwrap();
        std::fs::write(dir.path().join("b.json.tmp"), "{").unwrap();
        let pools = handoff.scan();
        assert_eq!(pools.len(), 1);
        assert_eq!(pools[0].slots, Some(2));

        std::fs::write(&a, r#"{"pool_id":"pool-a","slots":3}"#).unwrap();
        assert_eq!(handoff.scan()[0].slots, Some(3));

        // Half-written: the pool keeps its last good description.
        std::fs::write(&a, r#"{"pool_id":"pool-a","#).unwrap();
        assert_eq!(handoff.scan()[0].slots, Some(3));

        std::fs::write(dir.path().join("b.json"), r#"{"engine":"vllm"}"#).unwrap();
        let ids: Vec<_> = handoff.scan().into_iter().map(|p| p.id).collect();
        assert_eq!(ids, ["b", "pool-a"]);

        std::fs::remove_file(&a).unwrap();
        let ids: Vec<_> = handoff.scan().into_iter().map(|p| p.id).collect();
        assert_eq!(ids, ["b"]);
    }

    #[test]
    fn a_missing_directory_has_no_pools() {
        let dir = tempfile::tempdir().unwrap();
        let mut handoff = HandoffDir::new(dir.path().join("not-yet"));
        assert!(handoff.scan().is_empty());
        std::fs::create_dir(dir.path().join("not-yet")).unwrap();
        std::fs::write(dir.path().join("not-yet/p.json"), "{}").unwrap();
        assert_eq!(handoff.scan().len(), 1);
    }

    #[tokio::test]
    async fn watcher_publishes_a_new_file_within_two_seconds() {
        let dir = tempfile::tempdir().unwrap();
        let (mut rx, task) = watch_dir(dir.path().to_owned(), Duration::from_secs(1)).await;
        assert!(rx.borrow().is_empty());
        std::fs::write(dir.path().join("p.json"), r#"{"slots":2}"#).unwrap();
        let started = std::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(2), rx.changed())
            .await
            .expect("no update within 2 s")
            .unwrap();
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(rx.borrow()[0].id, "p");
        task.abort();
    }
}
