//! Several registry endpoints and the leader among them, for every client
//! of the contract (node-agent, registry-ctl, fleet-sim): one place that
//! parses `--registry http://a:50051,http://b:50051`, expands a DNS name
//! that resolves to several addresses into several endpoints, and finds
//! the replica that accepts writes.
//!
//! How the leader is found ([`Replicas::leader`]):
//! 1. a leader hint (the [`LEADER_METADATA`](crate::replica::LEADER_METADATA)
//!    of a follower's refusal) is tried first;
//! 2. a single endpoint is used as it is, without asking anything: a plain
//!    registry works as it always did, and a replica behind one address (a
//!    Kubernetes Service) redirects writes through the hint;
//! 3. several endpoints are asked concurrently, each within a short
//!    timeout, for the health of
//!    [`LEADER_HEALTH_SERVICE`](crate::replica::LEADER_HEALTH_SERVICE); the
//!    first to answer SERVING wins at once (a frozen replica's probe is not
//!    waited for), else, once all answered, the first one without
//!    that health entry (a registry that is not a replica set), else the
//!    first follower: its refusal names a leader the list may not hold (a
//!    replica moved), or says that none is elected. Only when no endpoint
//!    answers at all is there [`NoLeader`].
//!
//! Every client keeps the channels it opened, one per endpoint, so moving
//! between replicas does not reconnect to the ones it already knows.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::StreamExt;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Status};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::replica::{self, LEADER_HEALTH_SERVICE};
use crate::rules::{self, Field, RuleError};
use crate::status::{code_name, status_chain};

/// How long one endpoint's health may take to answer during discovery:
/// short, since a replica that slow is no leader to move to.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The URLs of a `--registry` list (`http://a:50051,http://b:50051`), each
/// checked with the contract's address rule; a bad entry is named by its
/// position (`--registry[1]`). Blanks around commas are ignored, a URL
/// given twice counts once, and all entries share one scheme (the TLS
/// flags apply to every endpoint).
pub fn parse_list(list: &str, text: &str) -> Result<Vec<String>, RuleError> {
    let entries: Vec<&str> = text.split(',').map(str::trim).collect();
    let mut urls: Vec<String> = Vec::with_capacity(entries.len());
    for (index, entry) in entries.iter().enumerate() {
        let field = if entries.len() == 1 {
            Field::Name(list)
        } else {
            Field::Entry { list, index }
        };
        if entry.is_empty() {
            let why = if entries.len() == 1 {
                "is empty"
            } else {
                "is empty (two commas in a row, or a comma at an end)"
            };
            return Err(RuleError::new(field, why));
        }
        rules::address(field, entry)?;
        if urls
            .first()
            .is_some_and(|first| scheme(first) != scheme(entry))
        {
            return Err(RuleError::new(
                field,
                format!(
                    "{} mixes http:// and https:// with {} (the TLS settings apply to every endpoint)",
                    rules::quoted(entry),
                    rules::quoted(&urls[0])
                ),
            ));
        }
        if !urls.iter().any(|url| url == entry) {
            urls.push((*entry).to_owned());
        }
    }
    Ok(urls)
}

fn scheme(url: &str) -> &str {
    url.split_once("://").map_or("", |(scheme, _)| scheme)
}

/// One endpoint to dial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The URL dialled: the one given, or, for a name that resolved to
    /// several addresses, the same URL with one of them as its host.
    pub url: String,
    /// The URL given (scheme and authority) when `url` is one of its
    /// addresses: sent as the request authority, so the server sees the
    /// name it is known by.
    pub origin: Option<String>,
    /// The host name TLS verifies (unless the TLS flags name another):
    /// the name given, never the address it resolved to.
    pub host: String,
}

impl Target {
    /// `url` dialled as it is; `None` when it has no host.
    pub fn direct(url: &str) -> Option<Target> {
        let uri: http::Uri = url.parse().ok()?;
        Some(Target {
            url: url.to_owned(),
            origin: None,
            host: bare_host(uri.host()?).to_owned(),
        })
    }

    /// How logs and errors name it: the URL, and the name it stands for.
    pub fn label(&self) -> String {
        match &self.origin {
            Some(origin) => format!("{} ({origin})", self.url),
            None => self.url.clone(),
        }
    }
}

/// A host without the brackets `http::Uri` keeps around an IPv6 address.
fn bare_host(host: &str) -> &str {
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

/// The endpoints of `urls`: a host name that resolves to several
/// addresses becomes one endpoint per address (in the resolver's order);
/// an address, a name with one address, and a name that does not resolve
/// now are dialled as given (tonic resolves them at each connect, as a
/// single registry always was). An endpoint reached twice counts once.
pub async fn resolve(urls: &[String]) -> Vec<Target> {
    let mut targets: Vec<Target> = Vec::new();
    for url in urls {
        for target in resolve_one(url).await {
            if !targets.iter().any(|t| t.url == target.url) {
                targets.push(target);
            }
        }
    }
    targets
}

async fn resolve_one(url: &str) -> Vec<Target> {
    let Some(direct) = Target::direct(url) else {
        return Vec::new();
    };
    let Ok(uri) = url.parse::<http::Uri>() else {
        return vec![direct];
    };
    if direct.host.parse::<IpAddr>().is_ok() {
        return vec![direct];
    }
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("https") {
            443
        } else {
            80
        });
    let host = direct.host.clone();
    match tokio::net::lookup_host((host.as_str(), port)).await {
        Ok(found) => expand(&uri, direct, found.collect()),
        Err(_) => vec![direct],
    }
}

/// `direct` (the URL `uri` as given) as one endpoint per address in
/// `addrs` when there are several, else as it is.
fn expand(uri: &http::Uri, direct: Target, mut addrs: Vec<SocketAddr>) -> Vec<Target> {
    let mut seen = Vec::new();
    addrs.retain(|addr| {
        let new = !seen.contains(addr);
        seen.push(*addr);
        new
    });
    let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
        return vec![direct];
    };
    if addrs.len() < 2 {
        return vec![direct];
    }
    let path = uri
        .path_and_query()
        .map(|p| p.as_str())
        .filter(|p| *p != "/")
        .unwrap_or("");
    addrs
        .into_iter()
        .map(|addr| Target {
            url: format!("{scheme}://{addr}{path}"),
            origin: Some(format!("{scheme}://{authority}")),
            host: direct.host.clone(),
        })
        .collect()
}

/// How a client dials an endpoint: its own channel settings (timeouts,
/// keepalive) and its TLS configuration, the same for every endpoint.
#[derive(Clone)]
pub struct Dialer {
    /// The client's TLS configuration, for `https://` endpoints.
    tls: Option<ClientTlsConfig>,
    /// The name the TLS flags say to verify; `None` verifies each
    /// endpoint's host name.
    tls_domain: Option<String>,
    /// The client's endpoint settings.
    tune: Arc<dyn Fn(Endpoint) -> Endpoint + Send + Sync>,
}

impl fmt::Debug for Dialer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dialer")
            .field("tls", &self.tls.is_some())
            .field("tls_domain", &self.tls_domain)
            .finish_non_exhaustive()
    }
}

impl Default for Dialer {
    fn default() -> Self {
        Dialer {
            tls: None,
            tls_domain: None,
            tune: Arc::new(|endpoint| endpoint),
        }
    }
}

impl Dialer {
    /// Endpoints with `tune` applied (connect timeout, keepalive...).
    pub fn new(tune: impl Fn(Endpoint) -> Endpoint + Send + Sync + 'static) -> Self {
        Dialer {
            tune: Arc::new(tune),
            ..Dialer::default()
        }
    }

    /// TLS towards `https://` endpoints; `domain` is the name to verify
    /// when the TLS flags give one, else each endpoint's host name.
    pub fn with_tls(mut self, tls: ClientTlsConfig, domain: Option<String>) -> Self {
        self.tls = Some(tls);
        self.tls_domain = domain;
        self
    }

    /// The tonic endpoint of `target`, not connected.
    pub fn endpoint(&self, target: &Target) -> Result<Endpoint, tonic::transport::Error> {
        let mut endpoint = Endpoint::from_shared(target.url.clone())?;
        if let Some(origin) = &target.origin {
            endpoint = endpoint.origin(Endpoint::from_shared(origin.clone())?.uri().clone());
        }
        endpoint = (self.tune)(endpoint);
        if let Some(tls) = &self.tls {
            let domain = self
                .tls_domain
                .clone()
                .unwrap_or_else(|| target.host.clone());
            endpoint = endpoint.tls_config(tls.clone().domain_name(domain))?;
        }
        Ok(endpoint)
    }
}

/// Why an endpoint could not be used.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// The list was empty.
    #[error("no registry endpoint given")]
    Empty,
    /// tonic refused the endpoint (a URL it cannot dial, a TLS setting).
    #[error("registry endpoint {url:?}: {detail}")]
    Endpoint {
        /// The endpoint.
        url: String,
        /// What tonic said, with its causes.
        detail: String,
    },
}

/// No endpoint answered: each one's failure, to log and to retry on the
/// client's backoff.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no registry replica answers among {count} endpoints: {report}")]
pub struct NoLeader {
    /// Endpoints asked.
    pub count: usize,
    /// Each endpoint and its answer, `; `-separated.
    pub report: String,
}

impl NoLeader {
    /// As a gRPC status (UNAVAILABLE), for clients whose retry path
    /// handles statuses.
    pub fn status(&self) -> Status {
        Status::unavailable(self.to_string())
    }
}

/// What one endpoint's health said about leading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// SERVING: the leader.
    Serving,
    /// NOT_SERVING: a follower, or a replica that stepped down.
    NotServing,
    /// No health entry for the service (or no health service): a live
    /// registry that is not a replica set; usable when no leader answers.
    NoHealth(String),
    /// No answer (refused, timed out, another error).
    Unreachable(String),
}

impl Probe {
    /// Whether calls may go there.
    pub fn usable(&self) -> bool {
        matches!(self, Probe::Serving | Probe::NoHealth(_))
    }
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Probe::Serving => f.write_str("SERVING"),
            Probe::NotServing => f.write_str("NOT_SERVING (a follower)"),
            Probe::NoHealth(why) => write!(f, "no leader health entry ({why})"),
            Probe::Unreachable(why) => write!(f, "unreachable ({why})"),
        }
    }
}

/// The endpoint calls go to, as [`Replicas::leader`] or
/// [`Replicas::current`] chose it.
#[derive(Debug, Clone)]
pub struct Leader {
    /// The channel to it.
    pub channel: Channel,
    /// Its [`Target::label`], for logs.
    pub label: String,
    /// The endpoint itself, for a client that dials its own connection
    /// (registry-ctl connects eagerly, to report a refused connection
    /// as such).
    pub target: Target,
    /// Which choice this is; [`Replicas::failed`] takes it back so that a
    /// failure seen on an endpoint already left behind is not acted on
    /// twice (many nodes share one `Replicas` in fleet-sim).
    pub epoch: u64,
}

/// A client's registry endpoints and the one it uses now. Shared (behind
/// an `Arc`) by everything that talks to the same registry.
#[derive(Debug)]
pub struct Replicas {
    /// The endpoints given, as parsed by [`parse_list`].
    configured: Vec<String>,
    /// How endpoints are dialled.
    dialer: Dialer,
    /// [`PROBE_TIMEOUT`] unless set.
    probe_timeout: Duration,
    /// The choice and the channels.
    state: Mutex<State>,
    /// One discovery at a time: callers that waited for one use its
    /// choice instead of asking again.
    discovery: tokio::sync::Mutex<()>,
}

#[derive(Debug)]
struct State {
    /// Where calls go.
    current: Target,
    /// The channel to `current`.
    channel: Channel,
    /// Bumped at every choice.
    epoch: u64,
    /// Set after a failure that may mean the leader moved: the next
    /// [`Replicas::leader`] looks again.
    stale: bool,
    /// The leader a follower pointed to, tried first.
    hint: Option<String>,
    /// One lazy channel per endpoint dialled, by URL.
    channels: HashMap<String, Channel>,
}

impl Replicas {
    /// `configured` (from [`parse_list`]) dialled by `dialer`. Nothing is
    /// connected or resolved yet; calls go to the first endpoint until
    /// the first [`Replicas::leader`]. Every endpoint is built now, so one
    /// tonic cannot dial is a start-up error.
    pub fn new(configured: Vec<String>, dialer: Dialer) -> Result<Self, DialError> {
        let mut channels = HashMap::new();
        let mut first = None;
        for url in &configured {
            let target = Target::direct(url).ok_or_else(|| DialError::Endpoint {
                url: url.clone(),
                detail: "no host".into(),
            })?;
            let channel = dialer
                .endpoint(&target)
                .map_err(|err| DialError::Endpoint {
                    url: url.clone(),
                    detail: crate::status::error_chain(&err),
                })?
                .connect_lazy();
            channels.insert(url.clone(), channel.clone());
            first.get_or_insert((target, channel));
        }
        let (current, channel) = first.ok_or(DialError::Empty)?;
        Ok(Replicas {
            configured,
            dialer,
            probe_timeout: PROBE_TIMEOUT,
            state: Mutex::new(State {
                current,
                channel,
                epoch: 0,
                stale: true,
                hint: None,
                channels,
            }),
            discovery: tokio::sync::Mutex::new(()),
        })
    }

    /// Health probes bounded by `timeout` instead of [`PROBE_TIMEOUT`].
    pub fn with_probe_timeout(mut self, timeout: Duration) -> Self {
        self.probe_timeout = timeout;
        self
    }

    /// The endpoints given.
    pub fn configured(&self) -> &[String] {
        &self.configured
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The endpoint in use now, without asking anything (Deregister at
    /// shutdown, a read that any replica answers).
    pub fn current(&self) -> Leader {
        let state = self.state();
        Leader {
            channel: state.channel.clone(),
            label: state.current.label(),
            target: state.current.clone(),
            epoch: state.epoch,
        }
    }

    /// The leader: the endpoint in use when nothing since suggested the
    /// leader moved, else found again (see the module's documentation).
    pub async fn leader(&self) -> Result<Leader, NoLeader> {
        let _one_at_a_time = self.discovery.lock().await;
        let (hint, stale) = {
            let mut state = self.state();
            (state.hint.take(), state.stale)
        };
        if !stale {
            return Ok(self.current());
        }
        let mut report = Vec::new();
        if let Some(target) = hint.as_deref().and_then(Target::direct) {
            let probe = self.probe(&target).await;
            if probe.usable()
                && let Ok(channel) = self.channel(&target)
            {
                return Ok(self.choose(target, channel));
            }
            report.push(format!("{} (the leader hint): {probe}", target.label()));
        }
        let targets = resolve(&self.configured).await;
        if let [only] = targets.as_slice() {
            match self.channel(only) {
                Ok(channel) => return Ok(self.choose(only.clone(), channel)),
                Err(why) => report.push(format!("{}: {why}", only.label())),
            }
        } else {
            // The leader answers first or not at all: a frozen replica
            // must not delay the choice by a whole probe timeout.
            let mut pending: futures_util::stream::FuturesUnordered<_> = targets
                .iter()
                .enumerate()
                .map(|(index, target)| async move { (index, self.probe(target).await) })
                .collect();
            let mut probes = vec![None; targets.len()];
            while let Some((index, probe)) = pending.next().await {
                if probe == Probe::Serving
                    && let Ok(channel) = self.channel(&targets[index])
                {
                    return Ok(self.choose(targets[index].clone(), channel));
                }
                probes[index] = Some(probe);
            }
            let probes: Vec<Probe> = probes.into_iter().flatten().collect();
            let rank = |wanted: fn(&Probe) -> bool| probes.iter().position(wanted);
            let pick = rank(|p| *p == Probe::Serving)
                .or_else(|| rank(|p| matches!(p, Probe::NoHealth(_))))
                .or_else(|| rank(|p| *p == Probe::NotServing));
            if let Some(index) = pick {
                let target = targets[index].clone();
                if let Ok(channel) = self.channel(&target) {
                    return Ok(self.choose(target, channel));
                }
            }
            report.extend(
                targets
                    .iter()
                    .zip(&probes)
                    .map(|(target, probe)| format!("{}: {probe}", target.label())),
            );
        }
        Err(NoLeader {
            count: targets.len(),
            report: report.join("; "),
        })
    }

    /// Tells that a call on `leader` failed with `status`. A follower's
    /// hint is tried at the next [`Replicas::leader`]; a failure that may
    /// mean the leader moved or died (UNAVAILABLE, a deadline, a broken
    /// connection) makes it look again. Answers of a live leader
    /// (NOT_FOUND, INVALID_ARGUMENT, ...) change nothing. Returns the hint
    /// when there is one, for the caller's log.
    pub fn failed(&self, leader: &Leader, status: &Status) -> Option<String> {
        let hint = replica::leader_hint(status);
        let moved = hint.is_some()
            || matches!(
                status.code(),
                Code::Unavailable
                    | Code::DeadlineExceeded
                    | Code::Cancelled
                    | Code::Unknown
                    | Code::Internal
                    | Code::Aborted
            );
        if !moved {
            return None;
        }
        let mut state = self.state();
        if state.epoch != leader.epoch {
            // Another caller's failure already led to a new choice.
            return None;
        }
        state.stale = true;
        state.hint.clone_from(&hint);
        hint
    }

    fn choose(&self, target: Target, channel: Channel) -> Leader {
        let mut state = self.state();
        state.current = target;
        state.channel = channel;
        state.epoch += 1;
        state.stale = false;
        drop(state);
        self.current()
    }

    /// The (cached) lazy channel to `target`.
    fn channel(&self, target: &Target) -> Result<Channel, String> {
        if let Some(channel) = self.state().channels.get(&target.url) {
            return Ok(channel.clone());
        }
        let channel = self
            .dialer
            .endpoint(target)
            .map_err(|err| crate::status::error_chain(&err))?
            .connect_lazy();
        self.state()
            .channels
            .insert(target.url.clone(), channel.clone());
        Ok(channel)
    }

    /// What `target`'s health says about leading, within the probe timeout.
    pub async fn probe(&self, target: &Target) -> Probe {
        let channel = match self.channel(target) {
            Ok(channel) => channel,
            Err(why) => return Probe::Unreachable(why),
        };
        let mut health = HealthClient::new(channel);
        let request = HealthCheckRequest {
            service: LEADER_HEALTH_SERVICE.to_owned(),
        };
        match tokio::time::timeout(self.probe_timeout, health.check(request)).await {
            Err(_) => Probe::Unreachable(format!(
                "no health answer within {}",
                humanize(self.probe_timeout)
            )),
            Ok(Ok(answer)) => match answer.into_inner().status() {
                ServingStatus::Serving => Probe::Serving,
                _ => Probe::NotServing,
            },
            Ok(Err(status)) => match status.code() {
                // No such entry, no health service, or health behind a
                // token: a live registry that is not a replica set.
                Code::NotFound
                | Code::Unimplemented
                | Code::Unauthenticated
                | Code::PermissionDenied => Probe::NoHealth(format!(
                    "{}: {}",
                    code_name(status.code()),
                    status.message()
                )),
                code => {
                    Probe::Unreachable(format!("{}: {}", code_name(code), status_chain(&status)))
                }
            },
        }
    }
}

fn humanize(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

#[cfg(test)]
mod tests;
