//! Which registry a command talks to: one URL, or the replicas' URLs
//! separated by commas.

use std::net::SocketAddr;

use crate::error::CtlError;

/// The registry's port when nothing says otherwise.
pub const DEFAULT_REGISTRY: &str = "http://127.0.0.1:50051";

/// A URL for `addr`: unchanged when it has a scheme, `http://` prepended
/// otherwise ("127.0.0.1:50051" is what people type).
pub fn normalize(addr: &str) -> String {
    let addr = addr.trim();
    if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    }
}

/// Every entry of a comma-separated list [`normalize`]d; empty entries are
/// kept, so [`parse`] names them.
pub fn normalize_list(list: &str) -> String {
    list.split(',')
        .map(|entry| {
            if entry.trim().is_empty() {
                String::new()
            } else {
                normalize(entry)
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The URLs of a (normalized) `--registry` list, each checked with the
/// contract's address rule; a bad one is a usage error naming it.
pub fn parse(list: &str) -> Result<Vec<String>, CtlError> {
    Ok(registry_proto::endpoints::parse_list("--registry", list)?)
}

/// The URL of the registry that listens on `listen` (a `REGISTRY_LISTEN`
/// value), as seen from the same host: a wildcard address becomes loopback.
/// `None` when `listen` is not a socket address.
pub fn from_listen(listen: &str) -> Option<String> {
    let mut addr: SocketAddr = listen.trim().parse().ok()?;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    Some(format!("http://{addr}"))
}

/// The endpoint of `health`: the flag, else this host's registry by
/// `REGISTRY_LISTEN`, else the default.
pub fn for_health(flag: Option<&str>, registry_listen: Option<&str>) -> String {
    if let Some(flag) = flag {
        return normalize_list(flag);
    }
    registry_listen
        .and_then(from_listen)
        .unwrap_or_else(|| DEFAULT_REGISTRY.to_owned())
}

/// The endpoint of the listing commands: the flag, else the default.
pub fn for_queries(flag: Option<&str>) -> String {
    flag.map(normalize_list)
        .unwrap_or_else(|| DEFAULT_REGISTRY.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_addresses_get_a_scheme() {
        assert_eq!(normalize("127.0.0.1:50051"), "http://127.0.0.1:50051");
        assert_eq!(normalize("http://registry:50051"), "http://registry:50051");
        assert_eq!(normalize(" https://r:1 "), "https://r:1");
    }

    #[test]
    fn lists_are_normalized_entry_by_entry_and_checked() {
        assert_eq!(
            normalize_list("127.0.0.1:1, https://b:2"),
            "http://127.0.0.1:1,https://b:2"
        );
        assert_eq!(
            parse(&normalize_list("a:1, b:2")).unwrap(),
            ["http://a:1", "http://b:2"]
        );
        let err = parse(&normalize_list("a:1,,b:2")).unwrap_err();
        assert!(err.to_string().contains("--registry[1]"), "{err}");
        assert_eq!(err.exit(), crate::exit::Exit::Usage);
        assert_eq!(for_queries(Some("a:1,b:2")), "http://a:1,http://b:2");
    }

    #[test]
    fn wildcard_listen_addresses_become_loopback() {
        assert_eq!(
            from_listen("0.0.0.0:6000").as_deref(),
            Some("http://127.0.0.1:6000")
        );
        assert_eq!(
            from_listen("[::]:7000").as_deref(),
            Some("http://[::1]:7000")
        );
        assert_eq!(
            from_listen("10.1.2.3:50051").as_deref(),
            Some("http://10.1.2.3:50051")
        );
        assert_eq!(from_listen("nonsense"), None);
    }

    #[test]
    fn health_prefers_the_flag_then_the_listen_variable() {
        assert_eq!(for_health(Some("r:1"), Some("0.0.0.0:2")), "http://r:1");
        assert_eq!(for_health(None, Some("0.0.0.0:2")), "http://127.0.0.1:2");
        assert_eq!(for_health(None, Some("garbage")), DEFAULT_REGISTRY);
        assert_eq!(for_health(None, None), DEFAULT_REGISTRY);
        assert_eq!(for_queries(None), DEFAULT_REGISTRY);
    }
}
