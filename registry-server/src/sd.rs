//! Prometheus HTTP service discovery (`http_sd_configs`) from the registry:
//! `/sd/nodes` lists the agents' metrics endpoints, `/sd/pools` the
//! engines'. The format is Prometheus' exactly: a JSON array of
//! `{"targets": ["host:port"], "labels": {...}}`, `[]` when empty.
//!
//! Only ONLINE nodes are listed: an OFFLINE or removed node disappears at
//! the next refresh. Nodes are read through [`Registry::list`] in pages, so
//! no registry lock is held for the whole walk.

use std::collections::BTreeMap;

use registry_proto::pb;
use serde::Serialize;

use crate::registry::{Liveness, NodeFilter, Registry};

/// Nodes read per [`Registry::list`] call.
const PAGE: usize = 512;

/// One target group of Prometheus' HTTP SD format.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TargetGroup {
    /// `host:port` of the one endpoint the group names.
    pub targets: Vec<String>,
    /// Labels Prometheus attaches to the target (`__scheme__` and
    /// `__metrics_path__` among them, which set how it scrapes).
    pub labels: BTreeMap<String, String>,
}

/// A metrics URL split the way a scrape target is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScrapeUrl {
    /// `http` or `https`.
    pub scheme: String,
    /// `host:port`, the port filled in from the scheme when absent.
    pub target: String,
    /// The path, `/` when the URL has none.
    pub path: String,
    /// Query parameters, which Prometheus takes as `__param_<name>` labels.
    pub params: Vec<(String, String)>,
}

/// Splits `url` (already validated by the registry's address rule when it
/// was registered); `None` when it has no http(s) scheme or no host.
pub fn scrape_url(url: &str) -> Option<ScrapeUrl> {
    let uri: http::Uri = url.parse().ok()?;
    let scheme = uri.scheme_str()?.to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "http" => 80,
        "https" => 443,
        _ => return None,
    };
    let host = uri.host().filter(|h| !h.is_empty())?;
    let port = uri.port_u16().unwrap_or(default_port);
    let params = uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => (pair.to_owned(), String::new()),
        })
        .collect();
    Some(ScrapeUrl {
        scheme,
        target: format!("{host}:{port}"),
        path: match uri.path() {
            "" => "/".to_owned(),
            path => path.to_owned(),
        },
        params,
    })
}

/// `name` as a Prometheus label name: every character outside
/// `[A-Za-z0-9_]` becomes `_` (the `label_` prefix keeps the first
/// character valid).
pub fn label_name(prefix: &str, name: &str) -> String {
    let mut out = String::with_capacity(prefix.len() + name.len());
    out.push_str(prefix);
    out.extend(name.chars().map(|c| {
        if c.is_ascii_alphanumeric() || c == '_' {
            c
        } else {
            '_'
        }
    }));
    out
}

/// The group of one URL with the node's identity and labels.
fn group(url: &ScrapeUrl, node: &pb::Node) -> TargetGroup {
    let mut labels = BTreeMap::new();
    for (key, value) in &node.labels {
        labels.insert(label_name("label_", key), value.clone());
    }
    labels.insert("__scheme__".to_owned(), url.scheme.clone());
    labels.insert("__metrics_path__".to_owned(), url.path.clone());
    for (name, value) in &url.params {
        labels.insert(label_name("__param_", name), value.clone());
    }
    labels.insert("node_id".to_owned(), node.node_id.clone());
    labels.insert("machine_id".to_owned(), node.machine_id.clone());
    TargetGroup {
        targets: vec![url.target.clone()],
        labels,
    }
}

/// Every ONLINE node, page by page.
fn online_nodes(registry: &Registry, mut each: impl FnMut(&pb::Node)) {
    let filter = NodeFilter {
        status: Some(Liveness::Online),
        ..NodeFilter::default()
    };
    let mut token = String::new();
    loop {
        let (nodes, next) = registry.list(&filter, PAGE, &token);
        nodes.iter().for_each(&mut each);
        match next {
            Some(next) => token = next,
            None => return,
        }
    }
}

/// `/sd/nodes`: each ONLINE node that registered a `metrics_address`.
pub fn nodes(registry: &Registry) -> Vec<TargetGroup> {
    let mut groups = Vec::new();
    online_nodes(registry, |node| {
        if let Some(url) = scrape_url(&node.metrics_address) {
            groups.push(group(&url, node));
        }
    });
    groups
}

/// `/sd/pools`: each pool with a `metrics_url` on an ONLINE node, labelled
/// with the node and the pool.
pub fn pools(registry: &Registry) -> Vec<TargetGroup> {
    let mut groups = Vec::new();
    online_nodes(registry, |node| {
        for pool in &node.pools {
            let Some(url) = scrape_url(&pool.metrics_url) else {
                continue;
            };
            let mut group = group(&url, node);
            group
                .labels
                .insert("pool_id".to_owned(), pool.pool_id.clone());
            group.labels.insert("model".to_owned(), pool.model.clone());
            group
                .labels
                .insert("engine".to_owned(), pool.engine.clone());
            groups.push(group);
        }
    });
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_scheme_target_and_path() {
        let url = scrape_url("http://10.0.0.5:9101/metrics").unwrap();
        assert_eq!(url.scheme, "http");
        assert_eq!(url.target, "10.0.0.5:9101");
        assert_eq!(url.path, "/metrics");
        let url = scrape_url("https://gpu-1.example/m?format=prometheus").unwrap();
        assert_eq!(url.target, "gpu-1.example:443");
        assert_eq!(url.path, "/m");
        assert_eq!(url.params, [("format".into(), "prometheus".into())]);
        assert_eq!(
            scrape_url("http://[::1]:9101").unwrap().target,
            "[::1]:9101"
        );
        assert_eq!(scrape_url("http://h").unwrap().path, "/");
        assert_eq!(scrape_url(""), None);
        assert_eq!(scrape_url("ftp://h/x"), None);
    }

    #[test]
    fn label_names_are_sanitised() {
        assert_eq!(label_name("label_", "rack"), "label_rack");
        assert_eq!(
            label_name("label_", "topology.kubernetes.io/zone"),
            "label_topology_kubernetes_io_zone"
        );
        assert_eq!(label_name("label_", "gpu-type"), "label_gpu_type");
    }
}
