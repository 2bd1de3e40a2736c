//! HTTP health probes of pool engines, with llama.cpp server semantics:
//! `GET /health` answers 200 when ready and 503 while the model loads, and
//! `GET /slots` lists the engine's request slots.
//!
//! The client is hyper-util's: tonic already compiles hyper and hyper-util
//! into the agent, so probing costs no new crates, and probes target engines
//! on the node itself over plain HTTP, so no TLS stack is needed.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use http::{StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use registry_proto::pb;

use crate::error::{ConfigError, error_chain};

/// Largest probe answer read; a `/slots` list is a few KiB.
const MAX_BODY_BYTES: usize = 1 << 20;

/// What one probe learnt about a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeOutcome {
    /// The pool's state from the health answer.
    pub state: pb::PoolState,
    /// Slot counts from the engine's `/slots`, where it publishes them.
    pub slots: Option<SlotCounts>,
}

/// Slots of an engine, from llama.cpp's `/slots`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotCounts {
    /// Slots the engine has.
    pub total: u32,
    /// Slots not processing a request now.
    pub free: u32,
}

/// Why a probe got no HTTP answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    /// Nothing listens on the port: the engine is not running.
    #[error("connection refused")]
    Refused,
    /// No answer within the probe timeout.
    #[error("timed out")]
    Timeout,
    /// Any other failure (DNS, reset, malformed answer).
    #[error("{0}")]
    Other(String),
}

/// Maps a health probe's result to a pool state: 200 → READY, 503 →
/// INITIALIZING (llama.cpp while loading the model), connection refused →
/// OFFLINE, anything else → FAILED.
pub fn state_from_health(result: &Result<StatusCode, ProbeError>) -> pb::PoolState {
    match result {
        Ok(StatusCode::OK) => pb::PoolState::Ready,
        Ok(StatusCode::SERVICE_UNAVAILABLE) => pb::PoolState::Initializing,
        Ok(_) => pb::PoolState::Failed,
        Err(ProbeError::Refused) => pb::PoolState::Offline,
        Err(_) => pb::PoolState::Failed,
    }
}

/// Counts slots in llama.cpp's `/slots` answer: a JSON array with one object
/// per slot, busy when `is_processing` is true (current servers) or `state`
/// is non-zero (older servers). `None` when the body is not such a list.
pub fn parse_llamacpp_slots(body: &[u8]) -> Option<SlotCounts> {
    let slots: Vec<serde_json::Value> = serde_json::from_slice(body).ok()?;
    let mut free = 0u32;
    for slot in &slots {
        let busy = match (slot.get("is_processing"), slot.get("state")) {
            (Some(p), _) => p.as_bool()?,
            (None, Some(s)) => s.as_u64()? != 0,
            (None, None) => return None,
        };
        if !busy {
            free += 1;
        }
    }
    Some(SlotCounts {
        total: u32::try_from(slots.len()).ok()?,
        free,
    })
}

/// Parses a probe URL: plain `http://` with a host (see the module docs for
/// why not https).
pub fn parse_probe_url(url: &str) -> Result<Uri, ConfigError> {
    let bad = |why: &str| ConfigError::invalid("probe url", url, why);
    let uri: Uri = url.parse().map_err(|_| bad("not a URL"))?;
    if uri.scheme() != Some(&http::uri::Scheme::HTTP) {
        return Err(bad("probes speak plain http:// to the local engine"));
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(bad("no host"));
    }
    Ok(uri)
}

/// The engine's `/slots` URL next to its health URL.
pub fn slots_url(health: &Uri) -> Option<Uri> {
    let mut parts = http::uri::Parts::default();
    parts.scheme = health.scheme().cloned();
    parts.authority = health.authority().cloned();
    parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/slots"));
    Uri::from_parts(parts).ok()
}

/// Probes pool engines over HTTP/1.1, keeping connections alive between
/// probes.
pub struct Prober {
    client: Client<HttpConnector, Empty<Bytes>>,
    timeout: Duration,
    /// Pools whose engine answered `/slots` with 404 or 501 (llama.cpp run
    /// without the slots endpoint): not asked again while the pool stays
    /// ready, so the engine's log is not filled with refusals.
    slots_unsupported: Mutex<HashSet<String>>,
}

impl Prober {
    /// Each probe request gets `timeout`, connecting included.
    pub fn new(timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        Prober {
            client,
            timeout,
            slots_unsupported: Mutex::new(HashSet::new()),
        }
    }

    /// Probes one pool's health URL and, when it is ready, its slots.
    pub async fn probe(&self, pool_id: &str, url: &str) -> ProbeOutcome {
        let uri = match parse_probe_url(url) {
            Ok(uri) => uri,
            Err(e) => {
                // Validated at start-up and when handoff files are read, so
                // this is only reached by a library caller's bad config.
                tracing::warn!(pool_id, error = %e, "unusable probe url");
                return ProbeOutcome {
                    state: pb::PoolState::Failed,
                    slots: None,
                };
            }
        };
        let health = self.get(&uri).await.map(|(status, _)| status);
        let state = state_from_health(&health);
        if let Err(e) = &health {
            tracing::debug!(pool_id, url, error = %e, "health probe failed");
        }
        let slots = if state == pb::PoolState::Ready {
            self.slots(pool_id, &uri).await
        } else {
            // An engine that restarts may come back with /slots enabled.
            self.unsupported().remove(pool_id);
            None
        };
        ProbeOutcome { state, slots }
    }

    async fn slots(&self, pool_id: &str, health: &Uri) -> Option<SlotCounts> {
        if self.unsupported().contains(pool_id) {
            return None;
        }
        let url = slots_url(health)?;
        match self.get(&url).await {
            Ok((StatusCode::OK, body)) => {
                let counts = parse_llamacpp_slots(&body);
                if counts.is_none() {
                    tracing::debug!(pool_id, "slots answer is not a llama.cpp slot list");
                }
                counts
            }
            Ok((StatusCode::NOT_FOUND | StatusCode::NOT_IMPLEMENTED, _)) => {
                tracing::info!(
                    pool_id,
                    "engine publishes no /slots; reporting configured slots"
                );
                self.unsupported().insert(pool_id.to_owned());
                None
            }
            Ok((status, _)) => {
                tracing::debug!(pool_id, %status, "slots request refused");
                None
            }
            Err(e) => {
                tracing::debug!(pool_id, error = %e, "slots request failed");
                None
            }
        }
    }

    fn unsupported(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        // A poisoned set only means a panic elsewhere; its content is fine.
        self.slots_unsupported
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    async fn get(&self, uri: &Uri) -> Result<(StatusCode, Bytes), ProbeError> {
        let request = http::Request::get(uri.clone())
            .header(
                http::header::USER_AGENT,
                concat!("node-agent/", env!("CARGO_PKG_VERSION")),
            )
            .body(Empty::new())
            .map_err(|e| ProbeError::Other(e.to_string()))?;
        let exchange = async {
            let response = self.client.request(request).await.map_err(|e| {
                if is_refused(&e) {
                    ProbeError::Refused
                } else {
                    ProbeError::Other(error_chain(&e))
                }
            })?;
            let status = response.status();
            let body = Limited::new(response.into_body(), MAX_BODY_BYTES)
                .collect()
                .await
                .map_err(|e| ProbeError::Other(e.to_string()))?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| ProbeError::Timeout)?
    }
}

/// Whether the error, or one of its causes, is a refused TCP connection.
fn is_refused(err: &hyper_util::client::legacy::Error) -> bool {
    if !err.is_connect() {
        return false;
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(err);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return io.kind() == std::io::ErrorKind::ConnectionRefused;
        }
        source = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_answers_map_to_pool_states() {
        let cases = [
            (Ok(StatusCode::OK), pb::PoolState::Ready),
            (
                Ok(StatusCode::SERVICE_UNAVAILABLE),
                pb::PoolState::Initializing,
            ),
            (Ok(StatusCode::INTERNAL_SERVER_ERROR), pb::PoolState::Failed),
            (Ok(StatusCode::NOT_FOUND), pb::PoolState::Failed),
            (Ok(StatusCode::NO_CONTENT), pb::PoolState::Failed),
            (Err(ProbeError::Refused), pb::PoolState::Offline),
            (Err(ProbeError::Timeout), pb::PoolState::Failed),
            (
                Err(ProbeError::Other("reset".into())),
                pb::PoolState::Failed,
            ),
        ];
        for (result, want) in cases {
            assert_eq!(state_from_health(&result), want, "{result:?}");
        }
    }

    #[test]
    fn llamacpp_slots_are_counted() {
        let current = br#"[{"id":0,"is_processing":true},{"id":1,"is_processing":false},
                           {"id":2,"is_processing":false}]"#;
        assert_eq!(
            parse_llamacpp_slots(current),
            Some(SlotCounts { total: 3, free: 2 })
        );
        let older = br#"[{"id":0,"state":0},{"id":1,"state":1}]"#;
        assert_eq!(
            parse_llamacpp_slots(older),
            Some(SlotCounts { total: 2, free: 1 })
        );
        assert_eq!(
            parse_llamacpp_slots(b"[]"),
            Some(SlotCounts { total: 0, free: 0 })
        );
        assert_eq!(parse_llamacpp_slots(br#"{"error":"no"}"#), None);
        assert_eq!(parse_llamacpp_slots(br#"[{"id":0}]"#), None);
        assert_eq!(parse_llamacpp_slots(b"not json"), None);
    }

    #[test]
    fn slots_url_sits_next_to_the_health_url() {
        let health: Uri = "http://127.0.0.1:8081/health?x=1".parse().unwrap();
        assert_eq!(
            slots_url(&health).unwrap().to_string(),
            "http://127.0.0.1:8081/slots"
        );
    }

    #[test]
    fn probe_urls_must_be_plain_http_with_a_host() {
        assert!(parse_probe_url("http://127.0.0.1:8081/health").is_ok());
        assert!(parse_probe_url("https://127.0.0.1:8081/health").is_err());
        assert!(parse_probe_url("/health").is_err());
        assert!(parse_probe_url("not a url").is_err());
    }

    #[tokio::test]
    async fn refused_connection_probes_offline() {
        // Bind then drop a listener: the port is known to be closed.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let prober = Prober::new(Duration::from_secs(2));
        let outcome = prober.probe("p", &format!("http://{addr}/health")).await;
        assert_eq!(outcome.state, pb::PoolState::Offline);
        assert_eq!(outcome.slots, None);
    }
}
