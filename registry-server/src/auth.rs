//! Bearer-token authentication and role checks.
//!
//! Tokens come from `--auth-token-file` (one `ROLE TOKEN` pair per line) and
//! from `REGISTRY_AUTH_TOKEN` (one admin token). Only SHA-256 digests are
//! kept; a presented token is hashed and compared with every digest in
//! constant time, so neither the comparison nor an early exit tells an
//! attacker how close a guess was. Tokens are never logged: a fingerprint
//! (the first 8 hex digits of the digest) is the most that appears.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataMap;
use tracing::{error, info, warn};

pub use registry_proto::rules::MIN_TOKEN_LEN;
/// The short, non-secret name of a token for logs (the same on the agent).
pub use registry_proto::rules::token_fingerprint as fingerprint;

/// How often the token file is checked for changes (besides SIGHUP).
const WATCH_EVERY: Duration = Duration::from_secs(2);

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// An agent: Register, Heartbeat, Deregister (for its own node only).
    Node,
    /// An orchestrator or dashboard: ListNodes, GetNode.
    Reader,
    /// An operator: everything, including removing any node.
    Admin,
}

impl Role {
    fn parse(word: &str) -> Option<Self> {
        match word {
            "node" => Some(Role::Node),
            "reader" => Some(Role::Reader),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }

    /// Whether this role may call `rpc`. The one place that says who may
    /// do what.
    pub fn allows(self, rpc: Rpc) -> bool {
        match (self, rpc) {
            (Role::Admin, _) => true,
            (Role::Node, Rpc::Register | Rpc::Heartbeat | Rpc::Deregister) => true,
            (
                Role::Reader,
                Rpc::ListNodes | Rpc::GetNode | Rpc::WatchNodes | Rpc::FindPools | Rpc::ListModels,
            ) => true,
            (
                Role::Node,
                Rpc::ListNodes | Rpc::GetNode | Rpc::WatchNodes | Rpc::FindPools | Rpc::ListModels,
            ) => false,
            (Role::Reader, Rpc::Register | Rpc::Heartbeat | Rpc::Deregister) => false,
            // Cordon and drain change what placement offers: admins only.
            (
                Role::Node | Role::Reader,
                Rpc::CordonNode | Rpc::UncordonNode | Rpc::DrainNode | Rpc::CancelDrain,
            ) => false,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Role::Node => "node",
            Role::Reader => "reader",
            Role::Admin => "admin",
        }
    }
}

/// The registry's RPCs, for role checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rpc {
    /// `Register`.
    Register,
    /// `Heartbeat`.
    Heartbeat,
    /// `Deregister`.
    Deregister,
    /// `ListNodes`.
    ListNodes,
    /// `GetNode`.
    GetNode,
    /// `FindPools`: a read of the fleet, for schedulers (reader role).
    FindPools,
    /// `ListModels`: a read of the fleet (reader role).
    ListModels,
    /// `WatchNodes`.
    WatchNodes,
    /// `CordonNode` (admin role).
    CordonNode,
    /// `UncordonNode` (admin role).
    UncordonNode,
    /// `DrainNode` (admin role).
    DrainNode,
    /// `CancelDrain` (admin role).
    CancelDrain,
}

/// Why a caller or a token file was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token, or one that matches no configured token.
    #[error("{0}")]
    Unauthenticated(String),
    /// A valid token whose role may not make this call.
    #[error("{0}")]
    PermissionDenied(String),
    /// The token file cannot be used.
    #[error("token file {path}: {reason}")]
    TokenFile {
        /// The file.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// A SHA-256 digest of a token.
type TokenDigest = [u8; 32];

fn digest(token: &str) -> TokenDigest {
    Sha256::digest(token.as_bytes()).into()
}

/// The configured tokens, as digests with their roles.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenTable {
    /// Every token's digest and role.
    entries: Vec<(TokenDigest, Role)>,
}

impl TokenTable {
    /// Parses a token file: `ROLE TOKEN` per line, `#` comments and blank
    /// lines ignored. `source` names the file in errors.
    pub fn parse(text: &str, source: &str) -> Result<Self, AuthError> {
        let bad = |line: usize, reason: String| AuthError::TokenFile {
            path: source.to_string(),
            reason: format!("line {line}: {reason}"),
        };
        let mut entries = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let line_no = index + 1;
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let mut words = line.split_whitespace();
            let (Some(role), Some(token), None) = (words.next(), words.next(), words.next()) else {
                return Err(bad(line_no, "expected `ROLE TOKEN`".into()));
            };
            let role = Role::parse(role).ok_or_else(|| {
                bad(
                    line_no,
                    format!("unknown role {role:?}; use node, reader or admin"),
                )
            })?;
            if token.len() < MIN_TOKEN_LEN {
                return Err(bad(
                    line_no,
                    format!("token is shorter than {MIN_TOKEN_LEN} characters"),
                ));
            }
            entries.push((digest(token), role));
        }
        Ok(Self { entries })
    }

    /// The role of `token`, comparing against every entry in constant time.
    pub fn role_of(&self, token: &str) -> Option<Role> {
        self.role_of_digest(&digest(token))
    }

    /// The role of the token with this digest, compared in constant time.
    fn role_of_digest(&self, presented: &TokenDigest) -> Option<Role> {
        let mut found = None;
        for (known, role) in &self.entries {
            if bool::from(known.ct_eq(presented)) {
                found = Some(*role);
            }
        }
        found
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no token is configured.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Checks callers' tokens. Cloneable; rotation swaps the table under all
/// clones.
#[derive(Clone)]
pub struct Authenticator {
    /// The tokens in force; `None` when the server runs open. A watch
    /// channel rather than a plain lock, so open streams wake on every
    /// successful reload and check that their token is still in force.
    table: Option<Arc<watch::Sender<Arc<TokenTable>>>>,
    /// Where tokens come from, for reloads.
    sources: Arc<TokenSources>,
}

/// The token a long-lived call (a Heartbeat stream) was admitted with,
/// so a reload that takes the token away ends the call at once instead of
/// leaving it acknowledged until the client hangs up.
pub struct TokenGrant {
    /// The token's digest (never the token itself).
    digest: TokenDigest,
    /// What the call was admitted for, re-checked on every reload.
    rpc: Rpc,
    /// Wakes on every successful reload.
    tables: watch::Receiver<Arc<TokenTable>>,
}

impl TokenGrant {
    /// Whether a reload since the last look took the token away
    /// (UNAUTHENTICATED) or gave it a role that may no longer make the
    /// call (PERMISSION_DENIED). Cheap while nothing was reloaded; a stream
    /// asks when [`Reloads`] (through the service's recheck signal) wakes
    /// it, rather than waiting on the token table itself.
    pub fn revoked(&mut self) -> Option<AuthError> {
        // The authenticator gone (the server is stopping): shutdown ends
        // the call, not this.
        if !self.tables.has_changed().unwrap_or(false) {
            return None;
        }
        let role = self.tables.borrow_and_update().role_of_digest(&self.digest);
        match role {
            None => Some(AuthError::Unauthenticated(
                "the token this stream was opened with has been revoked (removed from the token file)"
                    .into(),
            )),
            Some(role) if !role.allows(self.rpc) => Some(AuthError::PermissionDenied(format!(
                "the token this stream was opened with is now a {} token, which may not call {:?}",
                role.name(),
                self.rpc
            ))),
            Some(_) => None,
        }
    }
}

/// The successful reloads of an authenticator's tokens, one at a time.
#[derive(Debug)]
pub struct Reloads(Option<watch::Receiver<Arc<TokenTable>>>);

impl Reloads {
    /// Returns at the next successful reload; never on a server without
    /// tokens or once the authenticator is gone.
    pub async fn next(&mut self) {
        let reloaded = match &mut self.0 {
            Some(tables) => tables.changed().await.is_ok(),
            None => false,
        };
        if !reloaded {
            std::future::pending::<()>().await;
        }
    }
}

/// Where tokens come from.
#[derive(Debug, Default)]
pub struct TokenSources {
    /// `--auth-token-file`, re-read on SIGHUP or change.
    pub file: Option<PathBuf>,
    /// `REGISTRY_AUTH_TOKEN`: one admin token.
    pub admin_token: Option<String>,
}

impl Authenticator {
    /// No authentication: every caller may do everything.
    pub fn open() -> Self {
        Self {
            table: None,
            sources: Arc::new(TokenSources::default()),
        }
    }

    /// Loads the tokens of `sources`; open when neither source is given.
    pub fn from_sources(sources: TokenSources) -> Result<Self, AuthError> {
        if sources.file.is_none() && sources.admin_token.is_none() {
            return Ok(Self::open());
        }
        let table = load(&sources)?;
        info!(tokens = table.len(), "authentication on");
        metrics::gauge!(crate::metrics::AUTH_TOKENS).set(table.len() as f64);
        metrics::gauge!(crate::metrics::AUTH_RELOAD_FAILING).set(0.0);
        Ok(Self {
            table: Some(Arc::new(watch::Sender::new(Arc::new(table)))),
            sources: Arc::new(sources),
        })
    }

    /// Its reloads from now on.
    pub fn reloads(&self) -> Reloads {
        Reloads(self.table.as_ref().map(|table| table.subscribe()))
    }

    /// Whether the server runs without authentication.
    pub fn is_open(&self) -> bool {
        self.table.is_none()
    }

    /// The caller's role if it may make `rpc`.
    pub fn authorize(&self, metadata: &MetadataMap, rpc: Rpc) -> Result<Role, AuthError> {
        self.check(metadata, rpc).map(|(role, _)| role)
    }

    /// [`Authenticator::authorize`] for a long-lived call: also the grant
    /// that tells the call when a reload revokes its token (`None` when
    /// the server runs open).
    pub fn authorize_stream(
        &self,
        metadata: &MetadataMap,
        rpc: Rpc,
    ) -> Result<(Role, Option<TokenGrant>), AuthError> {
        let (role, digest) = self.check(metadata, rpc)?;
        let grant = self
            .table
            .as_ref()
            .zip(digest)
            .map(|(table, digest)| TokenGrant {
                digest,
                rpc,
                tables: table.subscribe(),
            });
        Ok((role, grant))
    }

    /// The caller's role and its token's digest (`None` when open).
    fn check(
        &self,
        metadata: &MetadataMap,
        rpc: Rpc,
    ) -> Result<(Role, Option<TokenDigest>), AuthError> {
        let Some(table) = &self.table else {
            return Ok((Role::Admin, None));
        };
        let header = metadata.get("authorization").ok_or_else(|| {
            AuthError::Unauthenticated(
                "missing `authorization: Bearer <token>` metadata".to_string(),
            )
        })?;
        let token = header
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| {
                AuthError::Unauthenticated(
                    "the authorization metadata must be `Bearer <token>`".to_string(),
                )
            })?;
        let presented = digest(token);
        let role = table
            .borrow()
            .role_of_digest(&presented)
            .ok_or_else(|| AuthError::Unauthenticated("unknown token".to_string()))?;
        if !role.allows(rpc) {
            return Err(AuthError::PermissionDenied(format!(
                "a {} token may not call {rpc:?}",
                role.name()
            )));
        }
        Ok((role, Some(presented)))
    }

    /// Re-reads the token sources. On success the new tokens replace the
    /// old ones at once, and every open stream whose token is gone ends
    /// (see [`TokenGrant`]). On error (an unreadable, deleted, empty or
    /// unparsable file) the previous tokens stay in force, so a bad edit
    /// cannot lock the whole fleet out; the failure is counted
    /// ([`crate::metrics::AUTH_RELOAD_FAILURES`]) and flagged
    /// ([`crate::metrics::AUTH_RELOAD_FAILING`]) until a reload succeeds.
    pub fn reload(&self) -> Result<usize, AuthError> {
        let Some(table) = &self.table else {
            return Ok(0);
        };
        let fresh = match load(&self.sources) {
            Ok(fresh) => fresh,
            Err(err) => {
                metrics::counter!(crate::metrics::AUTH_RELOAD_FAILURES).increment(1);
                metrics::gauge!(crate::metrics::AUTH_RELOAD_FAILING).set(1.0);
                return Err(err);
            }
        };
        let count = fresh.len();
        table.send_replace(Arc::new(fresh));
        metrics::gauge!(crate::metrics::AUTH_RELOAD_FAILING).set(0.0);
        metrics::gauge!(crate::metrics::AUTH_TOKENS).set(count as f64);
        Ok(count)
    }

    /// Reloads the token file on SIGHUP and whenever it changes, until
    /// `shutdown`.
    pub async fn watch(self, shutdown: CancellationToken) {
        let Some(path) = self.sources.file.clone() else {
            return;
        };
        let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            Ok(signal) => Some(signal),
            Err(err) => {
                warn!(error = %err, "no SIGHUP handler; token file is reloaded on change only");
                None
            }
        };
        let mut seen = file_stamp(&path);
        let mut tick = tokio::time::interval(WATCH_EVERY);
        loop {
            let why = tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {
                    let stamp = file_stamp(&path);
                    if stamp == seen {
                        continue;
                    }
                    seen = stamp;
                    "changed"
                }
                Some(()) = async {
                    match hangup.as_mut() {
                        Some(signal) => signal.recv().await,
                        None => std::future::pending().await,
                    }
                } => "SIGHUP",
            };
            match self.reload() {
                Ok(count) => info!(
                    trigger = why,
                    tokens = count,
                    "auth tokens reloaded; streams opened with a removed token are ended"
                ),
                Err(err) => {
                    error!(trigger = why, error = %err, "auth tokens not reloaded; the previous tokens stay in force until the file is fixed")
                }
            }
        }
    }
}

/// Modification time and length: enough to notice an edit or a rename
/// over the file.
fn file_stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

fn load(sources: &TokenSources) -> Result<TokenTable, AuthError> {
    let mut table = TokenTable::default();
    if let Some(path) = &sources.file {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| AuthError::TokenFile {
            path: shown.clone(),
            reason: e.to_string(),
        })?;
        table = TokenTable::parse(&text, &shown)?;
    }
    if let Some(token) = &sources.admin_token {
        if token.len() < MIN_TOKEN_LEN {
            return Err(AuthError::TokenFile {
                path: "REGISTRY_AUTH_TOKEN".into(),
                reason: format!("token is shorter than {MIN_TOKEN_LEN} characters"),
            });
        }
        table.entries.push((digest(token), Role::Admin));
    }
    if table.is_empty() {
        return Err(AuthError::TokenFile {
            path: sources
                .file
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            reason: "holds no token; the server would refuse everyone".into(),
        });
    }
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODE: &str = "node-token-0123456789";
    const READER: &str = "reader-token-0123456789";
    const ADMIN: &str = "admin-token-0123456789";

    fn table() -> TokenTable {
        TokenTable::parse(
            &format!(
                "# role token\nnode {NODE}\n\nreader   {READER}  # dashboards\nadmin {ADMIN}\n"
            ),
            "tokens",
        )
        .unwrap()
    }

    fn metadata(value: &str) -> MetadataMap {
        let mut map = MetadataMap::new();
        map.insert("authorization", value.parse().unwrap());
        map
    }

    fn with_table(table: TokenTable) -> Authenticator {
        Authenticator {
            table: Some(Arc::new(watch::Sender::new(Arc::new(table)))),
            sources: Arc::new(TokenSources::default()),
        }
    }

    #[test]
    fn the_file_format_is_parsed_and_checked() {
        let table = table();
        assert_eq!(table.len(), 3);
        assert_eq!(table.role_of(NODE), Some(Role::Node));
        assert_eq!(table.role_of(READER), Some(Role::Reader));
        assert_eq!(table.role_of(ADMIN), Some(Role::Admin));
        assert_eq!(table.role_of("node-token-012345678"), None);

        for (text, needle) in [
            ("root abcdefghijklmnopq", "unknown role"),
            ("node short", "shorter than 16"),
            ("node", "expected `ROLE TOKEN`"),
            ("node a b", "expected `ROLE TOKEN`"),
        ] {
            let err = TokenTable::parse(text, "f").unwrap_err().to_string();
            assert!(err.contains(needle) && err.contains("line 1"), "{err}");
        }
    }

    #[test]
    fn roles_allow_exactly_their_calls() {
        use Rpc::*;
        for rpc in [
            Register, Heartbeat, Deregister, ListNodes, GetNode, WatchNodes, FindPools, ListModels,
        ] {
            assert!(Role::Admin.allows(rpc));
        }
        assert!(Role::Reader.allows(FindPools) && Role::Reader.allows(ListModels));
        assert!(!Role::Node.allows(FindPools) && !Role::Node.allows(ListModels));
        assert!(Role::Node.allows(Register) && Role::Node.allows(Heartbeat));
        assert!(Role::Node.allows(Deregister) && !Role::Node.allows(ListNodes));
        assert!(Role::Reader.allows(ListNodes) && Role::Reader.allows(GetNode));
        assert!(Role::Reader.allows(WatchNodes) && !Role::Node.allows(WatchNodes));
        assert!(!Role::Reader.allows(Register) && !Role::Reader.allows(Heartbeat));
        for rpc in [CordonNode, UncordonNode, DrainNode, CancelDrain] {
            assert!(Role::Admin.allows(rpc), "{rpc:?}");
            assert!(
                !Role::Node.allows(rpc) && !Role::Reader.allows(rpc),
                "{rpc:?}"
            );
        }
    }

    #[test]
    fn callers_are_authenticated_then_authorised() {
        let auth = with_table(table());
        assert_eq!(
            auth.authorize(&metadata(&format!("Bearer {NODE}")), Rpc::Heartbeat),
            Ok(Role::Node)
        );
        assert!(matches!(
            auth.authorize(&MetadataMap::new(), Rpc::ListNodes),
            Err(AuthError::Unauthenticated(m)) if m.contains("missing")
        ));
        assert!(matches!(
            auth.authorize(&metadata(NODE), Rpc::Register),
            Err(AuthError::Unauthenticated(m)) if m.contains("Bearer")
        ));
        assert!(matches!(
            auth.authorize(&metadata("Bearer wrong-token-0123456789"), Rpc::Register),
            Err(AuthError::Unauthenticated(_))
        ));
        assert!(matches!(
            auth.authorize(&metadata(&format!("Bearer {READER}")), Rpc::Register),
            Err(AuthError::PermissionDenied(m)) if m.contains("reader")
        ));
        assert!(
            Authenticator::open()
                .authorize(&MetadataMap::new(), Rpc::Deregister)
                .is_ok()
        );
    }

    #[test]
    fn reload_rotates_tokens_and_keeps_old_ones_on_a_bad_file() {
        let dir = std::env::temp_dir().join(format!("auth-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokens");
        std::fs::write(&path, format!("node {NODE}\n")).unwrap();
        let auth = Authenticator::from_sources(TokenSources {
            file: Some(path.clone()),
            admin_token: None,
        })
        .unwrap();
        let as_node = metadata(&format!("Bearer {NODE}"));
        let as_new = metadata("Bearer rotated-token-0123456789");
        assert!(auth.authorize(&as_node, Rpc::Register).is_ok());

        std::fs::write(&path, "node rotated-token-0123456789\n").unwrap();
        assert_eq!(auth.reload(), Ok(1));
        assert!(auth.authorize(&as_node, Rpc::Register).is_err());
        assert!(auth.authorize(&as_new, Rpc::Register).is_ok());

        std::fs::write(&path, "garbage line here\n").unwrap();
        assert!(auth.reload().is_err());
        assert!(
            auth.authorize(&as_new, Rpc::Register).is_ok(),
            "old tokens stay"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_reload_that_removes_a_token_revokes_its_streams_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(
            &path,
            format!("node {NODE}\nreader {READER}\nadmin {ADMIN}\n"),
        )
        .unwrap();
        let auth = Authenticator::from_sources(TokenSources {
            file: Some(path.clone()),
            admin_token: None,
        })
        .unwrap();
        let grant = |token: &str| {
            auth.authorize_stream(&metadata(&format!("Bearer {token}")), Rpc::Heartbeat)
                .unwrap()
                .1
        };
        let (mut node, mut admin) = (grant(NODE), grant(ADMIN));
        assert!(node.is_some() && admin.is_some());

        // A reload that keeps both tokens revokes nothing.
        let mut reloads = auth.reloads();
        std::fs::write(&path, format!("node {NODE}\nadmin {ADMIN}\n")).unwrap();
        auth.reload().unwrap();
        tokio::time::timeout(Duration::from_secs(10), reloads.next())
            .await
            .expect("a reload is told");
        assert!(
            node.as_mut().and_then(TokenGrant::revoked).is_none(),
            "the node token is still in force"
        );

        // The node token removed: its stream is revoked, the admin's is not.
        std::fs::write(&path, format!("admin {ADMIN}\n")).unwrap();
        auth.reload().unwrap();
        let err = node
            .as_mut()
            .and_then(TokenGrant::revoked)
            .expect("revoked");
        assert!(
            matches!(&err, AuthError::Unauthenticated(m) if m.contains("revoked")),
            "{err}"
        );
        assert!(admin.as_mut().and_then(TokenGrant::revoked).is_none());

        // A token given a role that may not heartbeat: permission denied.
        std::fs::write(&path, format!("reader {ADMIN}\n")).unwrap();
        auth.reload().unwrap();
        assert!(
            matches!(admin.as_mut().and_then(TokenGrant::revoked), Some(AuthError::PermissionDenied(m)) if m.contains("reader"))
        );
        assert!(
            admin.as_mut().and_then(TokenGrant::revoked).is_none(),
            "told once per reload"
        );

        // A server without tokens grants nothing to revoke.
        let (_, none) = Authenticator::open()
            .authorize_stream(&MetadataMap::new(), Rpc::Heartbeat)
            .unwrap();
        assert!(none.is_none());
        let mut never = Authenticator::open().reloads();
        let quiet = tokio::time::timeout(Duration::from_millis(20), never.next()).await;
        assert!(quiet.is_err(), "nothing to reload");
    }

    #[test]
    fn failed_reloads_are_counted_and_flagged_until_one_succeeds() {
        use metrics_exporter_prometheus::PrometheusBuilder;
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, format!("node {NODE}\n")).unwrap();
        metrics::with_local_recorder(&recorder, || {
            let auth = Authenticator::from_sources(TokenSources {
                file: Some(path.clone()),
                admin_token: None,
            })
            .unwrap();
            std::fs::write(&path, "").unwrap();
            assert!(auth.reload().is_err(), "an empty file is refused");
            std::fs::write(&path, "node\n").unwrap();
            assert!(auth.reload().is_err(), "an unparsable file is refused");
            std::fs::remove_file(&path).unwrap();
            assert!(auth.reload().is_err(), "a deleted file is refused");
            // The tokens loaded last stay in force meanwhile.
            assert!(
                auth.authorize(&metadata(&format!("Bearer {NODE}")), Rpc::Register)
                    .is_ok()
            );
        });
        let text = handle.render();
        let value = |series: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(series)?.trim().parse::<f64>().ok())
        };
        assert_eq!(
            value("registry_auth_reload_failures_total"),
            Some(3.0),
            "{text}"
        );
        assert_eq!(value("registry_auth_reload_failing"), Some(1.0), "{text}");
        assert_eq!(value("registry_auth_tokens"), Some(1.0), "{text}");

        std::fs::write(&path, format!("node {NODE}\nreader {READER}\n")).unwrap();
        metrics::with_local_recorder(&recorder, || {
            let auth = Authenticator::from_sources(TokenSources {
                file: Some(path.clone()),
                admin_token: None,
            })
            .unwrap();
            assert_eq!(auth.reload(), Ok(2));
        });
        let text = handle.render();
        let value = |series: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(series)?.trim().parse::<f64>().ok())
        };
        assert_eq!(value("registry_auth_reload_failing"), Some(0.0), "{text}");
        assert_eq!(value("registry_auth_tokens"), Some(2.0), "{text}");
    }

    #[test]
    fn fingerprints_do_not_reveal_the_token() {
        let fp = fingerprint(ADMIN);
        assert_eq!(fp.len(), 8);
        assert!(!ADMIN.contains(&fp));
    }
}
