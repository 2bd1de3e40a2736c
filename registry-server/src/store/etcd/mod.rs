//! The etcd backend of several registry replicas: the durable records, the
//! election of one leader, and the follower's watch (see docs/ha.md).
//!
//! Keys under the prefix (`--etcd-prefix`):
//! - `<prefix>/leader`: the leader's advertised URL, bound to its lease;
//! - `<prefix>/nodes/<id>`: a node's record (`record::encode_node`);
//! - `<prefix>/admin/<id>`: its admin state;
//! - `<prefix>/liveness/<id>`: its latest ONLINE↔OFFLINE transition.
//!
//! Why it looks like this:
//! - Election: create the leader key in a transaction that succeeds only
//!   if it does not exist (`create_revision == 0`), bound to a lease kept
//!   alive every third of its TTL. The revision at which it was created
//!   names the term.
//! - Fencing: every write is a transaction `If create_revision(leader) ==
//!   <the term's revision> Then <writes>`: once the lease expired and
//!   another replica created the key anew, etcd refuses a deposed leader's
//!   writes, whatever that leader believes.
//! - Stepping down in time: a term *holds* only until the send time of its
//!   last acknowledged keep-alive plus the TTL minus a margin; the service
//!   asks on every write and every heartbeat message, so a process resumed
//!   after a freeze acts on no message after its lease may have expired.
//! - Writes are grouped (group commit): every write queued while a
//!   transaction is in flight goes into the next one (at most
//!   [`MAX_TXN_OPS`] operations, etcd's default limit), the last write of
//!   a key winning (etcd refuses one key twice in a transaction).

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    PutOptions, TlsOptions, Txn, TxnOp, WatchOptions,
};
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use registry_proto::backoff::Backoff;
use registry_proto::pb;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::record::{
    decode_admin, decode_liveness, decode_node, encode_admin, encode_liveness, encode_node,
};
use super::{Commit, LivenessRecord, Loaded, NodeRecord, Store, StoreError};
use crate::config::Settings;
use crate::replica::{Coordinator, Lead, MirrorEvent, Term};

/// Most operations in one transaction (etcd's default `--max-txn-ops`).
pub const MAX_TXN_OPS: usize = 128;

/// How long one etcd request may take before it counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// What the replica needs to reach etcd, from the settings.
#[derive(Debug, Clone)]
pub struct EtcdSettings {
    /// Client URLs.
    pub endpoints: Vec<String>,
    /// Key prefix, without a trailing '/'.
    pub prefix: String,
    /// The leadership's lease (whole seconds, at least 2).
    pub lease_ttl: Duration,
    /// TLS: CA bundle, client certificate and key.
    pub ca: Option<std::path::PathBuf>,
    /// Client certificate (mTLS).
    pub cert: Option<std::path::PathBuf>,
    /// Its key.
    pub key: Option<std::path::PathBuf>,
    /// etcd user and password.
    pub user: Option<(String, String)>,
}

impl EtcdSettings {
    /// The etcd settings of `settings`; reads the password file.
    pub fn from_settings(settings: &Settings) -> Result<Self, StoreError> {
        let password = match (&settings.etcd_password_file, &settings.etcd_password) {
            (Some(file), _) => Some(
                std::fs::read_to_string(file)
                    .map_err(|e| {
                        open_error(format!("--etcd-password-file {}: {e}", file.display()))
                    })?
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .to_owned(),
            ),
            (None, password) => password.clone(),
        };
        let secs = settings.etcd_lease_ttl.as_secs_f64().ceil().max(2.0);
        Ok(Self {
            endpoints: settings.etcd_endpoints.clone(),
            prefix: settings.etcd_prefix.clone(),
            lease_ttl: Duration::from_secs_f64(secs),
            ca: settings.etcd_ca.clone(),
            cert: settings.etcd_cert.clone(),
            key: settings.etcd_key.clone(),
            user: settings.etcd_user.clone().zip(password),
        })
    }
}

fn open_error(reason: String) -> StoreError {
    StoreError::Open {
        path: "etcd".into(),
        reason,
    }
}

fn etcd_error(what: &str, err: impl std::fmt::Display) -> StoreError {
    StoreError::Write(format!("etcd {what}: {err}"))
}

/// A connection to etcd and the layout of this registry's keys. Cheap to
/// clone.
#[derive(Clone)]
pub struct Etcd {
    /// The client (itself a handle on one balanced channel).
    client: Client,
    /// Key prefix, without a trailing '/'.
    prefix: String,
    /// The leadership's lease.
    ttl: Duration,
    /// The endpoints, for messages.
    endpoints: Vec<String>,
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Etcd")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .finish()
    }
}

/// Where a key belongs.
enum Key<'a> {
    Leader,
    Node(&'a str),
    Admin(&'a str),
    Liveness(&'a str),
    Other,
}

impl Etcd {
    /// Connects lazily (the first request dials; an etcd that is down at
    /// start is retried by the replica loop, not a reason to exit).
    pub async fn connect(settings: &EtcdSettings) -> Result<Self, StoreError> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|e| open_error(format!("{}: {e}", path.display())))
        };
        // HTTP/2 pings find a dead connection under an idle watch; etcd
        // closes connections that ping more often than every 5 s
        // (--grpc-keepalive-min-time), so no more often than 10 s.
        let mut options = ConnectOptions::new()
            .with_connect_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(Duration::from_secs(10), REQUEST_TIMEOUT)
            .with_keep_alive_while_idle(true);
        if let Some((user, password)) = &settings.user {
            options = options.with_user(user.clone(), password.clone());
        }
        if settings.ca.is_some() || settings.cert.is_some() {
            let mut tls = TlsOptions::new();
            if let Some(ca) = &settings.ca {
                tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
            }
            if let (Some(cert), Some(key)) = (&settings.cert, &settings.key) {
                tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            options = options.with_tls(tls);
        }
        let client = Client::connect(&settings.endpoints, Some(options))
            .await
            .map_err(|e| open_error(format!("connecting to {:?}: {e}", settings.endpoints)))?;
        Ok(Self {
            client,
            prefix: settings.prefix.clone(),
            ttl: settings.lease_ttl,
            endpoints: settings.endpoints.clone(),
        })
    }

    fn leader_key(&self) -> String {
        format!("{}/leader", self.prefix)
    }

    fn node_key(&self, id: &str) -> String {
        format!("{}/nodes/{id}", self.prefix)
    }

    fn admin_key(&self, id: &str) -> String {
        format!("{}/admin/{id}", self.prefix)
    }

    fn liveness_key(&self, id: &str) -> String {
        format!("{}/liveness/{id}", self.prefix)
    }

    /// What `key` holds.
    fn classify<'a>(&self, key: &'a str) -> Key<'a> {
        let Some(rest) = key
            .strip_prefix(self.prefix.as_str())
            .and_then(|r| r.strip_prefix('/'))
        else {
            return Key::Other;
        };
        if rest == "leader" {
            return Key::Leader;
        }
        match rest.split_once('/') {
            Some(("nodes", id)) => Key::Node(id),
            Some(("admin", id)) => Key::Admin(id),
            Some(("liveness", id)) => Key::Liveness(id),
            _ => Key::Other,
        }
    }

    /// Every record under the prefix, read at one revision, and that
    /// revision.
    pub async fn load(&self) -> Result<(Loaded, i64), StoreError> {
        let mut client = self.client.clone();
        let response = tokio::time::timeout(
            REQUEST_TIMEOUT * 4,
            client.get(
                format!("{}/", self.prefix),
                Some(GetOptions::new().with_prefix()),
            ),
        )
        .await
        .map_err(|_| etcd_error("read", "timed out"))?
        .map_err(|e| etcd_error("read", e))?;
        let revision = response.header().map_or(0, |h| h.revision());
        let mut loaded = Loaded::default();
        for kv in response.kvs() {
            let key = kv.key_str().map_err(|e| etcd_error("read", e))?;
            self.decode_into(key, kv.value(), &mut loaded)?;
        }
        Ok((loaded, revision))
    }

    /// Adds the record at `key` to `loaded`.
    fn decode_into(&self, key: &str, value: &[u8], loaded: &mut Loaded) -> Result<(), StoreError> {
        let corrupt = |reason: String| StoreError::Corrupt {
            path: "etcd".into(),
            key: key.to_owned(),
            reason,
        };
        match self.classify(key) {
            Key::Node(id) => loaded.nodes.push(decode_node(id, value).map_err(corrupt)?),
            Key::Admin(id) => loaded
                .admin
                .push((id.to_owned(), decode_admin(value).map_err(corrupt)?)),
            Key::Liveness(id) => loaded
                .liveness
                .push((id.to_owned(), decode_liveness(value).map_err(corrupt)?)),
            Key::Leader | Key::Other => {}
        }
        Ok(())
    }

    /// The change at `key` as a follower applies it; `None` for keys that
    /// are not records (the leader key) or cannot be read (logged).
    fn event(&self, kind: EventType, key: &str, value: &[u8]) -> Option<MirrorEvent> {
        let deleted = kind == EventType::Delete;
        let decoded = match self.classify(key) {
            Key::Node(id) if deleted => Ok(MirrorEvent::DeleteNode(id.to_owned())),
            Key::Node(id) => decode_node(id, value).map(MirrorEvent::PutNode),
            Key::Admin(id) if deleted => Ok(MirrorEvent::Admin(id.to_owned(), None)),
            Key::Admin(id) => {
                decode_admin(value).map(|a| MirrorEvent::Admin(id.to_owned(), Some(a)))
            }
            Key::Liveness(_) if deleted => return None,
            Key::Liveness(id) => {
                decode_liveness(value).map(|l| MirrorEvent::Liveness(id.to_owned(), l))
            }
            Key::Leader | Key::Other => return None,
        };
        decoded
            .map_err(
                |reason| warn!(%key, %reason, "an unreadable record in etcd; left out of the copy"),
            )
            .ok()
    }

    /// Follows every change after `after` until `stop`: list-then-watch,
    /// relisting (`Reset`) when etcd has compacted the history it needs,
    /// `Lost` while etcd cannot be reached and `Restored` after.
    pub fn mirror(&self, after: i64, stop: CancellationToken) -> mpsc::Receiver<MirrorEvent> {
        let (tx, rx) = mpsc::channel(4096);
        let etcd = self.clone();
        tokio::spawn(async move {
            let mut next = after + 1;
            let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
            let mut lost = false;
            loop {
                let ended = tokio::select! {
                    () = stop.cancelled() => return,
                    ended = etcd.follow(&mut next, &tx, &mut lost) => ended,
                };
                let why = match ended {
                    Follow::Closed => return,
                    Follow::Compacted => match etcd.load().await {
                        Ok((loaded, revision)) => {
                            next = revision + 1;
                            if tx.send(MirrorEvent::Reset(loaded)).await.is_err() {
                                return;
                            }
                            lost = false;
                            continue;
                        }
                        Err(err) => err.to_string(),
                    },
                    Follow::Failed(why) => why,
                };
                if !lost {
                    lost = true;
                    warn!(reason = %why, "the follower's watch of etcd broke; retrying");
                    if tx.send(MirrorEvent::Lost(why)).await.is_err() {
                        return;
                    }
                }
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(backoff.next_delay()) => {}
                }
            }
        });
        rx
    }

    /// One watch from `next` until it breaks.
    async fn follow(
        &self,
        next: &mut i64,
        tx: &mpsc::Sender<MirrorEvent>,
        lost: &mut bool,
    ) -> Follow {
        let mut client = self.client.clone();
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(*next)
            .with_progress_notify();
        let mut stream = match client
            .watch(format!("{}/", self.prefix), Some(options))
            .await
        {
            Ok(stream) => stream,
            Err(err) => return Follow::Failed(err.to_string()),
        };
        loop {
            let response = match stream.message().await {
                Ok(Some(response)) => response,
                Ok(None) => return Follow::Failed("etcd ended the watch".into()),
                Err(err) => return Follow::Failed(err.to_string()),
            };
            if response.compact_revision() > 0 {
                return Follow::Compacted;
            }
            if response.canceled() {
                return Follow::Failed(format!(
                    "etcd cancelled the watch: {}",
                    response.cancel_reason()
                ));
            }
            if *lost {
                *lost = false;
                if tx.send(MirrorEvent::Restored).await.is_err() {
                    return Follow::Closed;
                }
            }
            for event in response.events() {
                let Some(kv) = event.kv() else { continue };
                *next = (*next).max(kv.mod_revision() + 1);
                let Ok(key) = kv.key_str() else { continue };
                if let Some(change) = self.event(event.event_type(), key, kv.value())
                    && tx.send(change).await.is_err()
                {
                    return Follow::Closed;
                }
            }
            // A progress notification (no events, not the creation
            // answer) says every change up to its revision was delivered;
            // other headers name the store's revision, which may be ahead
            // of events still on their way.
            if response.events().is_empty()
                && !response.created()
                && let Some(header) = response.header()
            {
                *next = (*next).max(header.revision() + 1);
            }
        }
    }

    /// The leader's URL, kept current until `stop`.
    pub fn observe_leader(&self, stop: CancellationToken) -> watch::Receiver<Option<String>> {
        let (tx, rx) = watch::channel(None);
        let etcd = self.clone();
        tokio::spawn(async move {
            let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    why = etcd.follow_leader(&tx) => {
                        if tx.is_closed() {
                            return;
                        }
                        tracing::debug!(reason = %why, "watch of the leader key broke; retrying");
                    }
                }
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(backoff.next_delay()) => {}
                }
            }
        });
        rx
    }

    /// Reads the leader key, then follows it until the watch breaks.
    async fn follow_leader(&self, tx: &watch::Sender<Option<String>>) -> String {
        let mut client = self.client.clone();
        let key = self.leader_key();
        let current = match client.get(key.clone(), None).await {
            Ok(current) => current,
            Err(err) => return err.to_string(),
        };
        let leader = current
            .kvs()
            .first()
            .and_then(|kv| kv.value_str().ok().map(str::to_owned));
        tx.send_replace(leader);
        let from = current.header().map_or(0, |h| h.revision()) + 1;
        let options = WatchOptions::new().with_start_revision(from);
        let mut stream = match client.watch(key, Some(options)).await {
            Ok(stream) => stream,
            Err(err) => return err.to_string(),
        };
        loop {
            match stream.message().await {
                Ok(Some(response)) => {
                    for event in response.events() {
                        let leader = match event.event_type() {
                            EventType::Delete => None,
                            EventType::Put => event
                                .kv()
                                .and_then(|kv| kv.value_str().ok().map(str::to_owned)),
                        };
                        tx.send_replace(leader);
                    }
                    if response.canceled() {
                        return "the watch was cancelled".into();
                    }
                }
                Ok(None) => return "etcd ended the watch".into(),
                Err(err) => return err.to_string(),
            }
        }
    }

    /// Waits until this replica, reachable at `advertise`, leads.
    pub async fn campaign(
        &self,
        advertise: &str,
        stop: &CancellationToken,
    ) -> Result<EtcdTerm, StoreError> {
        let key = self.leader_key();
        let ttl_secs = i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX).max(2);
        loop {
            if stop.is_cancelled() {
                return Err(StoreError::Write("stopped before being elected".into()));
            }
            let mut client = self.client.clone();
            let granted_at = Instant::now();
            let lease = timed("lease grant", client.lease_grant(ttl_secs, None)).await?;
            let txn = Txn::new()
                .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(
                    key.clone(),
                    advertise,
                    Some(PutOptions::new().with_lease(lease.id())),
                )])
                .or_else([TxnOp::get(key.clone(), None)]);
            let answer = match timed("campaign", client.txn(txn)).await {
                Ok(answer) => answer,
                Err(err) => {
                    let _ = client.lease_revoke(lease.id()).await;
                    return Err(err);
                }
            };
            let revision = answer.header().map_or(0, |h| h.revision());
            if answer.succeeded() {
                info!(revision, lease = lease.id(), "elected leader through etcd");
                return Ok(EtcdTerm::start(
                    self.clone(),
                    lease.id(),
                    revision,
                    granted_at,
                ));
            }
            let _ = client.lease_revoke(lease.id()).await;
            // Someone leads: wait for the key's deletion (lease expired,
            // resigned), then campaign again.
            let options = WatchOptions::new().with_start_revision(revision + 1);
            let mut stream = timed("watch", client.watch(key.clone(), Some(options))).await?;
            loop {
                let message = tokio::select! {
                    () = stop.cancelled() => return Err(StoreError::Write("stopped before being elected".into())),
                    message = stream.message() => message,
                };
                match message {
                    Ok(Some(response)) => {
                        if response
                            .events()
                            .iter()
                            .any(|e| e.event_type() == EventType::Delete)
                            || response.canceled()
                        {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(err) => return Err(etcd_error("watch", err)),
                }
            }
        }
    }
}

/// How one watch ended.
enum Follow {
    /// The receiver is gone.
    Closed,
    /// etcd compacted the history the watch needed: relist.
    Compacted,
    /// The watch broke (why).
    Failed(String),
}

/// `request` bounded by [`REQUEST_TIMEOUT`].
async fn timed<T>(
    what: &str,
    request: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, StoreError> {
    tokio::time::timeout(REQUEST_TIMEOUT, request)
        .await
        .map_err(|_| etcd_error(what, "timed out"))?
        .map_err(|e| etcd_error(what, e))
}

/// Time since a fixed origin, in ms, for an atomic deadline.
fn millis_since(origin: Instant, at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(origin).as_millis()).unwrap_or(u64::MAX)
}

/// One leadership term won through etcd. Cheap to clone.
#[derive(Clone)]
pub struct EtcdTerm {
    /// The term's state.
    inner: Arc<TermInner>,
}

struct TermInner {
    /// The lease the leader key is bound to.
    lease: i64,
    /// The revision at which this replica created the leader key: the
    /// fence of every write.
    revision: i64,
    /// The origin of `holds_until_ms`.
    origin: Instant,
    /// Until when (ms after `origin`) the lease surely holds.
    holds_until_ms: AtomicU64,
    /// Cancelled when the term ends.
    lost: CancellationToken,
    /// The connection.
    etcd: Etcd,
}

impl EtcdTerm {
    /// The term of a lease granted at `granted_at` and a leader key
    /// created at `revision`; keeps the lease alive until the term ends.
    fn start(etcd: Etcd, lease: i64, revision: i64, granted_at: Instant) -> Self {
        let origin = granted_at;
        let term = Self {
            inner: Arc::new(TermInner {
                lease,
                revision,
                origin,
                holds_until_ms: AtomicU64::new(0),
                lost: CancellationToken::new(),
                etcd,
            }),
        };
        term.extend(granted_at);
        tokio::spawn(term.clone().keep_alive());
        term
    }

    /// The safety margin: the lease is not trusted for its last fifth (at
    /// least 500 ms), so the replica stops before etcd can elect another.
    fn margin(&self) -> Duration {
        (self.inner.etcd.ttl / 5).max(Duration::from_millis(500))
    }

    /// The lease holds until `sent + ttl - margin`, `sent` being when an
    /// acknowledged keep-alive (or the grant) was sent.
    fn extend(&self, sent: Instant) {
        let until = sent + self.inner.etcd.ttl - self.margin();
        self.inner
            .holds_until_ms
            .fetch_max(millis_since(self.inner.origin, until), Ordering::AcqRel);
    }

    /// Whether the lease surely still holds.
    pub fn holds(&self) -> bool {
        !self.inner.lost.is_cancelled()
            && millis_since(self.inner.origin, Instant::now())
                < self.inner.holds_until_ms.load(Ordering::Acquire)
    }

    /// Cancelled when the term ends.
    pub fn lost(&self) -> CancellationToken {
        self.inner.lost.clone()
    }

    /// The revision that fences this term's writes.
    pub fn revision(&self) -> i64 {
        self.inner.revision
    }

    /// Keeps the lease alive every third of the TTL until the term ends;
    /// ends it when the lease can no longer be trusted.
    async fn keep_alive(self) {
        let every = self.inner.etcd.ttl / 3;
        let mut client = self.inner.etcd.client.clone();
        let mut channel = None;
        loop {
            if self.inner.lost.is_cancelled() {
                return;
            }
            let sent = Instant::now();
            let renewed = async {
                if channel.is_none() {
                    channel = Some(client.lease_keep_alive(self.inner.lease).await?);
                }
                let (keeper, stream) = channel.as_mut().expect("just set");
                keeper.keep_alive().await?;
                stream.message().await
            };
            match tokio::time::timeout(every, renewed).await {
                Ok(Ok(Some(answer))) if answer.ttl() > 0 => self.extend(sent),
                Ok(Ok(Some(_))) => {
                    warn!("the leadership lease expired in etcd; stepping down");
                    self.inner.lost.cancel();
                    return;
                }
                Ok(Ok(None)) | Ok(Err(_)) | Err(_) => channel = None,
            }
            // Sleep until the next renewal, or until the lease can no
            // longer be trusted, whichever is first.
            let until = self.inner.origin
                + Duration::from_millis(self.inner.holds_until_ms.load(Ordering::Acquire));
            let next = (sent + every).min(until);
            tokio::select! {
                () = self.inner.lost.cancelled() => return,
                () = tokio::time::sleep_until(next) => {}
            }
            if !self.holds() {
                warn!(
                    ttl = %humantime::format_duration(self.inner.etcd.ttl),
                    "the leadership lease could not be renewed in time; stepping down"
                );
                self.inner.lost.cancel();
                return;
            }
        }
    }

    /// Gives the leadership up: deletes the leader key (if still this
    /// term's) and revokes the lease.
    pub async fn resign(self) {
        self.inner.lost.cancel();
        let etcd = &self.inner.etcd;
        let mut client = etcd.client.clone();
        let key = etcd.leader_key();
        let txn = Txn::new()
            .when([Compare::create_revision(
                key.clone(),
                CompareOp::Equal,
                self.inner.revision,
            )])
            .and_then([TxnOp::delete(key, None)]);
        let _ = timed("resign", client.txn(txn)).await;
        let _ = timed("lease revoke", client.lease_revoke(self.inner.lease)).await;
    }
}

/// One queued write: its operation (by key) and who waits for it.
struct Queued {
    /// The key written.
    key: String,
    /// Put (value) or delete (`None`).
    value: Option<Vec<u8>>,
    /// Answered once the write's transaction committed or failed.
    done: oneshot::Sender<Result<(), StoreError>>,
}

/// The registry's store on etcd: every write fenced by the current term.
pub struct EtcdStore {
    /// The connection.
    etcd: Etcd,
    /// The term writes are fenced by; `None`: not leading, every write
    /// refused.
    term: Arc<Mutex<Option<EtcdTerm>>>,
    /// The writer's queue.
    queue: mpsc::UnboundedSender<Queued>,
}

impl EtcdStore {
    /// A store on `etcd`, with its writer task.
    pub fn new(etcd: Etcd) -> Self {
        let (queue, rx) = mpsc::unbounded_channel();
        let term = Arc::new(Mutex::new(None));
        tokio::spawn(write_loop(etcd.clone(), term.clone(), rx));
        Self { etcd, term, queue }
    }

    /// The term writes are fenced by from now on (`None`: refuse them).
    pub fn set_term(&self, term: Option<EtcdTerm>) {
        *self.term.lock().unwrap_or_else(|p| p.into_inner()) = term;
    }

    /// Queues one key's write.
    fn write(&self, key: String, value: Option<Vec<u8>>) -> Commit {
        let (done, answer) = oneshot::channel();
        if self.queue.send(Queued { key, value, done }).is_err() {
            return std::future::ready(Err(StoreError::Write("the etcd writer stopped".into())))
                .boxed();
        }
        async move {
            answer
                .await
                .unwrap_or_else(|_| Err(StoreError::Write("the etcd writer stopped".into())))
        }
        .boxed()
    }
}

/// The writer: takes every queued write, fences them by the current term
/// in one transaction per batch, and answers each.
async fn write_loop(
    etcd: Etcd,
    term: Arc<Mutex<Option<EtcdTerm>>>,
    mut rx: mpsc::UnboundedReceiver<Queued>,
) {
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, MAX_TXN_OPS).await > 0 {
        let current = term.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let result = match current {
            Some(term) if term.holds() => commit(&etcd, &term, &batch).await,
            _ => Err(StoreError::Write(
                "this replica is not the leader (its etcd lease ended); the write is refused"
                    .into(),
            )),
        };
        if let Err(err) = &result {
            warn!(error = %err, writes = batch.len(), "etcd write failed");
            metrics::counter!(crate::metrics::STORE_FAILURES).increment(1);
        }
        metrics::counter!(crate::metrics::STORE_COMMITS).increment(1);
        metrics::counter!(crate::metrics::STORE_WRITES).increment(batch.len() as u64);
        for queued in batch.drain(..) {
            let _ = queued.done.send(result.clone());
        }
    }
}

/// One fenced transaction of `batch` (the last write of each key wins).
async fn commit(etcd: &Etcd, term: &EtcdTerm, batch: &[Queued]) -> Result<(), StoreError> {
    let mut last: HashMap<&str, Option<&Vec<u8>>> = HashMap::new();
    let mut order = Vec::new();
    for queued in batch {
        if last.insert(&queued.key, queued.value.as_ref()).is_none() {
            order.push(queued.key.as_str());
        }
    }
    let ops: Vec<TxnOp> = order
        .into_iter()
        .map(|key| match last[key] {
            Some(value) => TxnOp::put(key, value.clone(), None),
            None => TxnOp::delete(key, None),
        })
        .collect();
    let txn = Txn::new()
        .when([Compare::create_revision(
            etcd.leader_key(),
            CompareOp::Equal,
            term.revision(),
        )])
        .and_then(ops);
    let mut client = etcd.client.clone();
    let answer = timed("write", client.txn(txn)).await?;
    if answer.succeeded() {
        Ok(())
    } else {
        term.inner.lost.cancel();
        Err(StoreError::Write(
            "fenced: another replica leads now (the leader key is no longer this term's); the write is refused".into(),
        ))
    }
}

impl Store for EtcdStore {
    fn load(&self) -> BoxFuture<'static, Result<Loaded, StoreError>> {
        let etcd = self.etcd.clone();
        async move { etcd.load().await.map(|(loaded, _)| loaded) }.boxed()
    }

    fn put_node(&self, record: NodeRecord) -> Commit {
        let key = self.etcd.node_key(record.registration.node_id());
        self.write(key, Some(encode_node(&record)))
    }

    fn delete_node(&self, node_id: &str) -> Commit {
        // Both answers resolve together: one transaction holds both.
        let liveness = self.write(self.etcd.liveness_key(node_id), None);
        let node = self.write(self.etcd.node_key(node_id), None);
        async move {
            let (a, b) = futures_util::join!(liveness, node);
            a.and(b)
        }
        .boxed()
    }

    fn put_admin(&self, node_id: &str, admin: Option<pb::AdminState>) -> Commit {
        let key = self.etcd.admin_key(node_id);
        self.write(key, admin.as_ref().map(encode_admin))
    }

    fn put_liveness(&self, node_id: &str, liveness: LivenessRecord) -> Commit {
        let key = self.etcd.liveness_key(node_id);
        self.write(key, Some(encode_liveness(&liveness)))
    }

    fn close(&self) -> BoxFuture<'static, ()> {
        std::future::ready(()).boxed()
    }

    fn describe(&self) -> String {
        format!("etcd {:?} under {}", self.etcd.endpoints, self.etcd.prefix)
    }
}

/// The replica loop's view of etcd: election, leader, watch, fenced store.
pub struct EtcdCoordinator {
    /// The connection.
    etcd: Etcd,
    /// The store whose writes the won term fences.
    store: Arc<EtcdStore>,
    /// This replica's URL, stored in the leader key when it leads.
    advertise: String,
}

impl Coordinator for EtcdCoordinator {
    fn load(&self) -> BoxFuture<'static, Result<(Loaded, i64), StoreError>> {
        let etcd = self.etcd.clone();
        async move { etcd.load().await }.boxed()
    }

    fn mirror(&self, after: i64, stop: CancellationToken) -> mpsc::Receiver<MirrorEvent> {
        self.etcd.mirror(after, stop)
    }

    fn observe_leader(&self, stop: CancellationToken) -> watch::Receiver<Option<String>> {
        self.etcd.observe_leader(stop)
    }

    fn campaign(&self, stop: CancellationToken) -> BoxFuture<'static, Result<Lead, StoreError>> {
        let (etcd, store, advertise) = (
            self.etcd.clone(),
            self.store.clone(),
            self.advertise.clone(),
        );
        async move {
            let term = etcd.campaign(&advertise, &stop).await?;
            store.set_term(Some(term.clone()));
            let holds = {
                let term = term.clone();
                Arc::new(move || term.holds())
            };
            let lost = term.lost();
            let resign = {
                let store = store.clone();
                async move {
                    store.set_term(None);
                    term.resign().await;
                }
                .boxed()
            };
            Ok(Lead {
                term: Term::new(holds, lost),
                resign,
            })
        }
        .boxed()
    }
}

/// The store and coordinator of a replica reachable at `advertise`, on
/// the etcd `settings` name.
pub async fn replicas(
    settings: &Settings,
    advertise: String,
) -> Result<crate::server::Replicas, StoreError> {
    let etcd = Etcd::connect(&EtcdSettings::from_settings(settings)?).await?;
    let store = Arc::new(EtcdStore::new(etcd.clone()));
    let coordinator = EtcdCoordinator {
        etcd,
        store: store.clone(),
        advertise,
    };
    Ok(crate::server::Replicas {
        store,
        coordinator: Arc::new(coordinator),
    })
}
