//! The bearer token the agent presents to the registry.
//!
//! The token comes from a file (`--auth-token-file`) or from the
//! environment (`NODE_AGENT_AUTH_TOKEN`). Every call (Register, Heartbeat,
//! Deregister) carries `authorization: Bearer <token>`, added by
//! [`BearerAuth`], the client's interceptor. When the registry answers
//! UNAUTHENTICATED, the session calls [`Credentials::reload`], which reads
//! the file again: a rotated token is picked up without a restart.
//!
//! The token is never logged or printed. A fingerprint, the first 8 hex
//! digits of its SHA-256 (the same the registry logs), is the most that
//! appears, so operators can tell which token an agent holds.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use tonic::metadata::AsciiMetadataValue;
use tonic::service::Interceptor;
use tonic::{Request, Status};
use tracing::{info, warn};

use crate::error::ConfigError;

/// Shortest token the registry accepts; a shorter one can never work.
pub use registry_proto::rules::MIN_TOKEN_LEN;
/// The short, non-secret name of a token for logs: the same function the
/// registry logs with, so both sides' logs name a token alike.
pub use registry_proto::rules::token_fingerprint as fingerprint;

/// A secret string. `Debug` shows its fingerprint, never the value, so a
/// configuration can be printed safely.
#[derive(Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The value itself; only for putting it on the wire.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret(fingerprint {})", fingerprint(self.0.trim()))
    }
}

/// Where the token comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// A file that holds the token alone (surrounding whitespace is
    /// ignored); read at start and again after UNAUTHENTICATED.
    File(PathBuf),
    /// The token itself (`NODE_AGENT_AUTH_TOKEN`).
    Value(Secret),
}

impl TokenSource {
    /// Where the token came from, for logs and errors ("file PATH" or
    /// "NODE_AGENT_AUTH_TOKEN").
    pub fn describe(&self) -> String {
        match self {
            TokenSource::File(path) => format!("file {}", path.display()),
            TokenSource::Value(_) => "--auth-token/NODE_AGENT_AUTH_TOKEN".to_owned(),
        }
    }
}

/// The token in `text` with surrounding whitespace removed, or why it
/// cannot be one. The reasons never quote the token.
pub fn check_token(text: &str) -> Result<&str, &'static str> {
    let token = text.trim();
    if token.is_empty() {
        return Err("it is empty");
    }
    if token.split_whitespace().nth(1).is_some() {
        return Err(
            "it holds more than one word; write the token alone (not the registry's `ROLE TOKEN` line)",
        );
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("a token is printable ASCII without spaces");
    }
    if token.len() < MIN_TOKEN_LEN {
        return Err("it is shorter than 16 characters, which the registry never accepts");
    }
    Ok(token)
}

/// A token ready to send: the header value and the fingerprint.
#[derive(Clone)]
struct Bearer {
    header: AsciiMetadataValue,
    fingerprint: String,
}

impl Bearer {
    fn new(token: &str) -> Result<Self, &'static str> {
        let token = check_token(token)?;
        let mut header = AsciiMetadataValue::try_from(format!("Bearer {token}"))
            .map_err(|_| "a token is printable ASCII without spaces")?;
        // Tells HPACK not to index the value in its compression tables.
        header.set_sensitive(true);
        Ok(Bearer {
            header,
            fingerprint: fingerprint(token),
        })
    }
}

impl fmt::Debug for Bearer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bearer")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

/// The agent's token, shared by the client's interceptor and the session
/// that re-reads it.
#[derive(Debug)]
pub struct Credentials {
    /// Where the token comes from; `None` sends no token.
    source: Option<TokenSource>,
    /// The token sent now.
    current: RwLock<Option<Bearer>>,
}

impl Credentials {
    /// No token: calls go out without `authorization`.
    pub fn none() -> Self {
        Credentials {
            source: None,
            current: RwLock::new(None),
        }
    }

    /// Reads the token from `source` (the file, if it is one). A missing,
    /// unreadable or malformed token is a configuration error.
    pub fn load(source: Option<TokenSource>) -> Result<Self, ConfigError> {
        let bearer = match &source {
            None => None,
            Some(TokenSource::Value(secret)) => {
                Some(Bearer::new(secret.expose()).map_err(|why| {
                    ConfigError::BadToken {
                        from: source
                            .as_ref()
                            .map(TokenSource::describe)
                            .unwrap_or_default(),
                        why: why.to_owned(),
                    }
                })?)
            }
            Some(TokenSource::File(path)) => {
                warn_if_shared(path);
                Some(read_token_file(path)?)
            }
        };
        Ok(Credentials {
            source,
            current: RwLock::new(bearer),
        })
    }

    /// The fingerprint of the token sent now.
    pub fn fingerprint(&self) -> Option<String> {
        self.read().as_ref().map(|b| b.fingerprint.clone())
    }

    /// Reads the token file again after the registry refused the token.
    /// True when the file now holds another token, which every later call
    /// sends. When the file cannot be read or holds no valid token, the
    /// current token is kept and a warning says why. A token from the
    /// environment cannot change: always false.
    pub fn reload(&self) -> bool {
        let Some(TokenSource::File(path)) = &self.source else {
            return false;
        };
        let fresh = match read_token_file(path) {
            Ok(fresh) => fresh,
            Err(e) => {
                warn!(error = %e, "cannot re-read the auth token; keeping the current one");
                return false;
            }
        };
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        let previous = current.as_ref().map(|b| b.fingerprint.clone());
        if previous.as_deref() == Some(fresh.fingerprint.as_str()) {
            return false;
        }
        info!(
            path = %path.display(),
            token = %fresh.fingerprint,
            previous = previous.as_deref().unwrap_or("none"),
            "auth token file changed; using the new token"
        );
        *current = Some(fresh);
        true
    }

    /// The interceptor that adds the token to every call.
    pub fn interceptor(self: &Arc<Self>) -> BearerAuth {
        BearerAuth(Arc::clone(self))
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Option<Bearer>> {
        self.current.read().unwrap_or_else(|e| e.into_inner())
    }
}

fn read_token_file(path: &Path) -> Result<Bearer, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
        what: "auth token file",
        path: path.to_owned(),
        source,
    })?;
    Bearer::new(&text).map_err(|why| ConfigError::BadToken {
        from: format!("file {}", path.display()),
        why: why.to_owned(),
    })
}

/// A token file that every user can read leaks the node's credential.
/// Group access is left alone: `root:node-agent 0640` is a deliberate way
/// to keep the agent from changing its own token.
fn warn_if_shared(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o007 != 0 {
            warn!(
                path = %path.display(),
                mode = %format!("{mode:o}"),
                "auth token file is open to every user; chmod 600 it"
            );
        }
    }
}

/// Adds `authorization: Bearer <token>` to every call, when a token is
/// configured. Clones share the token, so a reload reaches all of them.
#[derive(Debug, Clone)]
pub struct BearerAuth(Arc<Credentials>);

impl Interceptor for BearerAuth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(bearer) = self.0.read().as_ref() {
            request
                .metadata_mut()
                .insert("authorization", bearer.header.clone());
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "node-token-aaaaaaaaaaaaaaaa";

    fn header_of(auth: &mut BearerAuth) -> Option<String> {
        let request = auth.call(Request::new(())).unwrap();
        request
            .metadata()
            .get("authorization")
            .map(|v| v.to_str().unwrap().to_owned())
    }

    fn write(dir: &tempfile::TempDir, text: &str) -> PathBuf {
        let path = dir.path().join("token");
        // Write and rename, as a rotation should, so no half file is read.
        let tmp = dir.path().join("token.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        path
    }

    #[test]
    fn fingerprints_match_the_registry_and_hide_the_token() {
        let fp = fingerprint(TOKEN);
        assert_eq!(fp.len(), 8);
        assert!(fp.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(fp, fingerprint("another-token-bbbbbbbbbbbbbbbb"));
        let debug = format!("{:?}", Secret::new(TOKEN));
        assert!(!debug.contains(TOKEN), "{debug}");
        assert!(debug.contains(&fp), "{debug}");
    }

    #[test]
    fn token_text_is_trimmed_and_checked() {
        assert_eq!(check_token(&format!("  {TOKEN}\n")), Ok(TOKEN));
        for bad in [
            "",
            " \n ",
            "short",
            &format!("node {TOKEN}"),
            "tøken-with-non-ascii-aaaaaaaa",
        ] {
            assert!(check_token(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn every_call_carries_the_bearer_token() {
        let credentials =
            Arc::new(Credentials::load(Some(TokenSource::Value(Secret::new(TOKEN)))).unwrap());
        let mut auth = credentials.interceptor();
        assert_eq!(header_of(&mut auth), Some(format!("Bearer {TOKEN}")));
        assert_eq!(credentials.fingerprint(), Some(fingerprint(TOKEN)));
        // A token from the environment cannot change.
        assert!(!credentials.reload());

        let mut none = Arc::new(Credentials::none()).interceptor();
        assert_eq!(header_of(&mut none), None);
    }

    #[test]
    fn the_token_file_is_read_trimmed_and_reloaded_on_change() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, &format!("{TOKEN}\n"));
        let credentials =
            Arc::new(Credentials::load(Some(TokenSource::File(path.clone()))).unwrap());
        let mut auth = credentials.interceptor();
        assert_eq!(header_of(&mut auth), Some(format!("Bearer {TOKEN}")));

        // Same content: nothing changes.
        assert!(!credentials.reload());

        const ROTATED: &str = "rotated-token-cccccccccccccccc";
        write(&dir, ROTATED);
        assert!(credentials.reload());
        assert_eq!(header_of(&mut auth), Some(format!("Bearer {ROTATED}")));
        assert_eq!(credentials.fingerprint(), Some(fingerprint(ROTATED)));

        // A broken or vanished file keeps the token that was working.
        write(&dir, "");
        assert!(!credentials.reload());
        std::fs::remove_file(&path).unwrap();
        assert!(!credentials.reload());
        assert_eq!(header_of(&mut auth), Some(format!("Bearer {ROTATED}")));
    }

    #[test]
    fn unusable_token_files_are_config_errors_that_do_not_quote_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        let err = Credentials::load(Some(TokenSource::File(missing))).unwrap_err();
        assert!(
            err.to_string().contains("cannot read auth token file"),
            "{err}"
        );

        let path = write(&dir, &format!("node {TOKEN}\n"));
        let err = Credentials::load(Some(TokenSource::File(path))).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("more than one word"), "{text}");
        assert!(!text.contains(TOKEN), "{text}");

        let err = Credentials::load(Some(TokenSource::Value(Secret::new("short")))).unwrap_err();
        assert!(err.to_string().contains("NODE_AGENT_AUTH_TOKEN"), "{err}");
    }
}
