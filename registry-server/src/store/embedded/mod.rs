//! The embedded backend: one redb file in `--data-dir`.
//!
//! Why redb: pure Rust (no C library to build or patch), ACID with
//! copy-on-write pages and checksummed commits (a crash mid-commit leaves
//! the previous commit intact, so the file always opens), a single file
//! with an OS lock (two registries cannot share it by mistake), and
//! well kept. SQLite would add a C build and SQL for a key-value need.
//!
//! Group commit: callers queue writes on a channel; one dedicated thread
//! (redb's commit blocks on fsync, which must not stall the async runtime)
//! takes everything queued, applies it in one write transaction, commits
//! once (one fsync for the whole batch) and then answers every caller.
//! While it commits, new writes queue up and form the next batch, so the
//! batch grows with the load and the fsync rate stays bounded.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use registry_proto::pb;
use tokio::sync::oneshot;
use tracing::{error, info, warn};

use super::record::{decode_admin, decode_node, encode_admin, encode_node};
use super::{Commit, Loaded, NodeRecord, Store, StoreError};

/// The store file's name inside `--data-dir`.
pub const FILE_NAME: &str = "registry.redb";

/// Node records by node id.
const NODES: TableDefinition<&str, &[u8]> = TableDefinition::new("nodes");
/// Admin states by node id (a separate key, so they outlive deregistration).
const ADMIN: TableDefinition<&str, &[u8]> = TableDefinition::new("admin");

/// Most writes committed in one transaction; the rest wait for the next.
const MAX_BATCH: usize = 8192;

/// One queued write.
enum Op {
    /// Put or delete a node record.
    Node {
        /// The node.
        node_id: String,
        /// The encoded record, or `None` to delete it.
        value: Option<Vec<u8>>,
    },
    /// Put or delete an admin state.
    Admin {
        /// The node.
        node_id: String,
        /// The encoded admin state, or `None` to delete it.
        value: Option<Vec<u8>>,
    },
}

/// A write and who waits for its commit.
struct Pending {
    /// What to write.
    op: Op,
    /// Told once the batch holding the write committed (or failed).
    done: oneshot::Sender<Result<(), StoreError>>,
}

/// What the writer thread is sent.
enum Message {
    /// A write to commit.
    Write(Pending),
    /// Commit what is queued, then stop and release the file.
    Close(oneshot::Sender<()>),
}

/// The embedded store: a redb file written by one group-commit thread.
pub struct EmbeddedStore {
    /// The file, for messages.
    path: PathBuf,
    /// The open database, shared with the writer thread (load reads it);
    /// `None` once closed, so the file lock goes with the writer.
    db: Mutex<Option<Arc<Database>>>,
    /// The writer thread's queue; `None` once closed.
    queue: Mutex<Option<mpsc::Sender<Message>>>,
    /// Commits done and writes committed, for the bench and metrics.
    stats: Arc<CommitStats>,
}

/// Running totals of the writer thread.
#[derive(Debug, Default)]
pub struct CommitStats {
    /// Transactions committed.
    pub commits: std::sync::atomic::AtomicU64,
    /// Writes committed (a commit holds one or more).
    pub writes: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Deletes the store file (`--reset-store`), logged loudly: everything
/// stored is gone.
pub fn reset(path: &Path) -> Result<(), StoreError> {
    match std::fs::remove_file(path) {
        Ok(()) => {
            warn!(path = %path.display(), "--reset-store: deleted the store file; every stored node, session and admin state is gone");
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            warn!(path = %path.display(), "--reset-store: no store file to delete; starting empty");
            Ok(())
        }
        Err(e) => Err(StoreError::Open {
            path: path.to_path_buf(),
            reason: format!("--reset-store cannot delete it: {e}"),
        }),
    }
}

impl EmbeddedStore {
    /// Opens (or creates) the store file at `path`, creating its directory,
    /// and starts the writer thread. A file that is not a valid store is an
    /// error naming it, never an empty start.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let open_error = |reason: String| StoreError::Open {
            path: path.to_path_buf(),
            reason,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| open_error(format!("cannot create {}: {e}", dir.display())))?;
        }
        let db = Database::create(path).map_err(|e| open_error(e.to_string()))?;
        // Both tables exist from the first open, so reads never meet a
        // missing table.
        let txn = db.begin_write().map_err(|e| open_error(e.to_string()))?;
        txn.open_table(NODES)
            .map_err(|e| open_error(e.to_string()))?;
        txn.open_table(ADMIN)
            .map_err(|e| open_error(e.to_string()))?;
        txn.commit().map_err(|e| open_error(e.to_string()))?;
        let db = Arc::new(db);
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(CommitStats::default());
        let writer = Writer {
            db: db.clone(),
            rx,
            stats: stats.clone(),
        };
        std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer.run())
            .map_err(|e| open_error(format!("cannot start the writer thread: {e}")))?;
        info!(path = %path.display(), "embedded store open");
        Ok(Self {
            path: path.to_path_buf(),
            db: Mutex::new(Some(db)),
            queue: Mutex::new(Some(tx)),
            stats,
        })
    }

    /// Commits and writes so far.
    pub fn commit_stats(&self) -> &CommitStats {
        &self.stats
    }

    /// Queues `op`; the future answers once it is committed.
    fn queue(&self, op: Op) -> Commit {
        let (done, answer) = oneshot::channel();
        let sent = self
            .queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|tx| tx.send(Message::Write(Pending { op, done })).is_ok())
            .unwrap_or(false);
        async move {
            if !sent {
                return Err(StoreError::Write("the store is closed".into()));
            }
            answer
                .await
                .unwrap_or_else(|_| Err(StoreError::Write("the store writer stopped".into())))
        }
        .boxed()
    }

    /// Reads every record (blocking).
    fn read_all(db: &Database, path: &Path) -> Result<Loaded, StoreError> {
        let read_error = |reason: String| StoreError::Open {
            path: path.to_path_buf(),
            reason,
        };
        let corrupt = |key: &str, reason: String| StoreError::Corrupt {
            path: path.to_path_buf(),
            key: key.to_string(),
            reason,
        };
        let txn = db.begin_read().map_err(|e| read_error(e.to_string()))?;
        let mut loaded = Loaded::default();
        let nodes = txn
            .open_table(NODES)
            .map_err(|e| read_error(e.to_string()))?;
        for entry in nodes.iter().map_err(|e| read_error(e.to_string()))? {
            let (key, value) = entry.map_err(|e| read_error(e.to_string()))?;
            let record = decode_node(key.value(), value.value())
                .map_err(|why| corrupt(&format!("node {}", key.value()), why))?;
            loaded.nodes.push(record);
        }
        let admin = txn
            .open_table(ADMIN)
            .map_err(|e| read_error(e.to_string()))?;
        for entry in admin.iter().map_err(|e| read_error(e.to_string()))? {
            let (key, value) = entry.map_err(|e| read_error(e.to_string()))?;
            let state = decode_admin(value.value())
                .map_err(|why| corrupt(&format!("admin state of {}", key.value()), why))?;
            loaded.admin.push((key.value().to_string(), state));
        }
        Ok(loaded)
    }
}

impl Store for EmbeddedStore {
    fn load(&self) -> BoxFuture<'static, Result<Loaded, StoreError>> {
        let db = self.db.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let path = self.path.clone();
        async move {
            let Some(db) = db else {
                return Err(StoreError::Write("the store is closed".into()));
            };
            tokio::task::spawn_blocking(move || Self::read_all(&db, &path))
                .await
                .unwrap_or_else(|e| Err(StoreError::Write(format!("loading panicked: {e}"))))
        }
        .boxed()
    }

    fn put_node(&self, record: NodeRecord) -> Commit {
        self.queue(Op::Node {
            node_id: record.registration.node_id().to_owned(),
            value: Some(encode_node(&record)),
        })
    }

    fn delete_node(&self, node_id: &str) -> Commit {
        self.queue(Op::Node {
            node_id: node_id.to_string(),
            value: None,
        })
    }

    fn put_admin(&self, node_id: &str, admin: Option<pb::AdminState>) -> Commit {
        self.queue(Op::Admin {
            node_id: node_id.to_string(),
            value: admin.as_ref().map(encode_admin),
        })
    }

    fn close(&self) -> BoxFuture<'static, ()> {
        let tx = self.queue.lock().unwrap_or_else(|p| p.into_inner()).take();
        // The writer holds the last reference and drops it when done.
        self.db.lock().unwrap_or_else(|p| p.into_inner()).take();
        async move {
            let Some(tx) = tx else { return };
            let (done, closed) = oneshot::channel();
            if tx.send(Message::Close(done)).is_ok() {
                let _ = closed.await;
            }
        }
        .boxed()
    }

    fn describe(&self) -> String {
        format!("embedded ({})", self.path.display())
    }
}

/// The group-commit thread.
struct Writer {
    /// The database (the thread holds the last reference after close).
    db: Arc<Database>,
    /// Queued writes.
    rx: mpsc::Receiver<Message>,
    /// Totals.
    stats: Arc<CommitStats>,
}

impl Writer {
    fn run(self) {
        let mut batch = Vec::new();
        let mut closing = None;
        loop {
            // Block for the first write, then take whatever else is queued.
            match self.rx.recv() {
                Ok(Message::Write(p)) => batch.push(p),
                Ok(Message::Close(done)) => closing = Some(done),
                Err(_) => break,
            }
            while closing.is_none() && batch.len() < MAX_BATCH {
                match self.rx.try_recv() {
                    Ok(Message::Write(p)) => batch.push(p),
                    Ok(Message::Close(done)) => closing = Some(done),
                    Err(_) => break,
                }
            }
            if !batch.is_empty() {
                let started = std::time::Instant::now();
                let result = self.commit(&batch).map_err(StoreError::Write);
                if let Err(err) = &result {
                    error!(error = %err, writes = batch.len(), "store commit failed");
                    metrics::counter!(crate::metrics::STORE_FAILURES).increment(1);
                } else {
                    use std::sync::atomic::Ordering::Relaxed;
                    self.stats.commits.fetch_add(1, Relaxed);
                    self.stats.writes.fetch_add(batch.len() as u64, Relaxed);
                    metrics::counter!(crate::metrics::STORE_COMMITS).increment(1);
                    metrics::counter!(crate::metrics::STORE_WRITES).increment(batch.len() as u64);
                    metrics::histogram!(crate::metrics::STORE_COMMIT_SECONDS)
                        .record(started.elapsed().as_secs_f64());
                }
                for pending in batch.drain(..) {
                    let _ = pending.done.send(result.clone());
                }
            }
            if let Some(done) = closing.take() {
                // Writes queued behind the close are refused.
                while let Ok(message) = self.rx.try_recv() {
                    if let Message::Write(p) = message {
                        let _ = p
                            .done
                            .send(Err(StoreError::Write("the store is closed".into())));
                    }
                }
                drop(self.db);
                let _ = done.send(());
                return;
            }
        }
    }

    /// Applies `batch` in one transaction and commits it durably.
    fn commit(&self, batch: &[Pending]) -> Result<(), String> {
        let txn = self.db.begin_write().map_err(|e| e.to_string())?;
        {
            let mut nodes = txn.open_table(NODES).map_err(|e| e.to_string())?;
            let mut admin = txn.open_table(ADMIN).map_err(|e| e.to_string())?;
            for pending in batch {
                let (table, node_id, value) = match &pending.op {
                    Op::Node { node_id, value } => (&mut nodes, node_id, value),
                    Op::Admin { node_id, value } => (&mut admin, node_id, value),
                };
                match value {
                    Some(bytes) => table.insert(node_id.as_str(), bytes.as_slice()),
                    None => table.remove(node_id.as_str()),
                }
                .map_err(|e| e.to_string())?;
            }
        }
        txn.commit().map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests;
