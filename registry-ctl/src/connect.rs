//! How registry-ctl reaches a registry: the URL, the bearer token and the
//! TLS settings, checked and read with node-agent's own code
//! ([`node_agent::TlsConfig`], [`node_agent::auth`]).

use std::sync::Arc;
use std::time::Duration;

use node_agent::TlsConfig;
use node_agent::auth::{self, Credentials, Secret, TokenSource};
use registry_proto::endpoints::Dialer;

use crate::cli::Cli;
use crate::error::CtlError;

/// Everything needed to open a connection to a registry (one of its
/// replicas).
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// The registry's URLs, with their scheme: one, or its replicas'.
    pub urls: Vec<String>,
    /// Bound on connecting and on each call.
    pub timeout: Duration,
    /// Where the bearer token comes from; `None` sends none.
    pub token: Option<TokenSource>,
    /// TLS settings; all empty for an `http://` registry.
    pub tls: TlsConfig,
}

/// The token and TLS flags, before a command picks its URL.
#[derive(Debug, Clone, Default)]
pub struct Credentialing {
    /// Where the bearer token comes from.
    pub token: Option<TokenSource>,
    /// The TLS flags.
    pub tls: TlsConfig,
}

impl Credentialing {
    /// The token and TLS flags of `cli`. A token value is checked here, so
    /// the message names registry-ctl's flag; a token file is read when
    /// connecting.
    pub fn from_cli(cli: &Cli) -> Result<Self, CtlError> {
        // An empty REGISTRY_CTL_TOKEN (a variable set from an unset one)
        // sends no token, as it always did: a HEALTHCHECK keeps working.
        let value = cli
            .token
            .as_deref()
            .filter(|value| !value.trim().is_empty());
        let token = match (value, &cli.token_file) {
            (Some(_), Some(_)) => return Err(CtlError::TwoTokens),
            (Some(value), None) => {
                let token = auth::check_token(value).map_err(|why| CtlError::Token { why })?;
                Some(TokenSource::Value(Secret::new(token)))
            }
            (None, Some(path)) => Some(TokenSource::File(path.clone())),
            (None, None) => None,
        };
        Ok(Credentialing {
            token,
            tls: TlsConfig {
                ca: cli.tls_ca.clone(),
                cert: cli.tls_cert.clone(),
                key: cli.tls_key.clone(),
                domain: cli.tls_domain.clone(),
            },
        })
    }

    /// These settings towards `urls`.
    pub fn towards(&self, urls: Vec<String>, timeout: Duration) -> ConnectOptions {
        ConnectOptions {
            urls,
            timeout,
            token: self.token.clone(),
            tls: self.tls.clone(),
        }
    }
}

impl ConnectOptions {
    /// Checks the TLS settings against the URL's scheme and reads the
    /// token and TLS files. Everything wrong here is a usage error.
    pub fn prepare(&self) -> Result<PreparedConnection, CtlError> {
        // One scheme for the whole list (`endpoints::parse_list`).
        let https = self.urls.iter().any(|url| url.starts_with("https://"));
        self.tls.validate(https)?;
        let tls = if https {
            Some(self.tls.client_config()?)
        } else {
            None
        };
        let credentials = Arc::new(Credentials::load(self.token.clone())?);
        Ok(PreparedConnection {
            tls,
            credentials,
            tls_domain: self.tls.domain.clone(),
        })
    }
}

/// The files read: what a connection sends.
#[derive(Debug, Clone)]
pub struct PreparedConnection {
    /// tonic's TLS configuration, for an `https://` registry.
    pub tls: Option<tonic::transport::ClientTlsConfig>,
    /// The token every call carries, through node-agent's interceptor.
    pub credentials: Arc<Credentials>,
    /// The name TLS verifies (--tls-domain), else each endpoint's host.
    pub tls_domain: Option<String>,
}

impl PreparedConnection {
    /// How endpoints are dialled: TLS with these settings, nothing else
    /// (each step is bounded by --timeout instead).
    pub fn dialer(&self) -> Dialer {
        match &self.tls {
            Some(tls) => Dialer::default().with_tls(tls.clone(), self.tls_domain.clone()),
            None => Dialer::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    const TOKEN: &str = "reader-token-aaaaaaaaaaaaaaaa";

    fn cli(args: &[&str]) -> Cli {
        Cli::try_parse_from(["registry-ctl"].iter().chain(args).chain(&["list"])).unwrap()
    }

    #[test]
    fn one_token_source_at_most() {
        let both = cli(&["--token", TOKEN, "--token-file", "/t"]);
        assert!(matches!(
            Credentialing::from_cli(&both),
            Err(CtlError::TwoTokens)
        ));
        let value = Credentialing::from_cli(&cli(&["--token", &format!(" {TOKEN}\n")])).unwrap();
        assert_eq!(value.token, Some(TokenSource::Value(Secret::new(TOKEN))));
        let file = Credentialing::from_cli(&cli(&["--token-file", "/t"])).unwrap();
        assert_eq!(file.token, Some(TokenSource::File("/t".into())));
        let empty = Credentialing::from_cli(&cli(&["--token", " "])).unwrap();
        assert_eq!(empty.token, None);
    }

    #[test]
    fn a_bad_token_value_is_named_without_quoting_it() {
        let err = Credentialing::from_cli(&cli(&["--token", "short"])).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("--token/REGISTRY_CTL_TOKEN"), "{text}");
        assert!(!text.contains("short\""), "{text}");
    }

    #[test]
    fn https_needs_the_ca_and_http_refuses_tls_flags() {
        let plain = Credentialing::default();
        let err = plain
            .towards(vec!["https://r:1".into()], Duration::from_secs(1))
            .prepare()
            .unwrap_err();
        assert!(err.to_string().contains("--tls-ca"), "{err}");
        assert_eq!(err.exit(), crate::exit::Exit::Usage);

        let with_ca = Credentialing::from_cli(&cli(&["--tls-ca", "/ca.pem"])).unwrap();
        let err = with_ca
            .towards(vec!["http://r:1".into()], Duration::from_secs(1))
            .prepare()
            .unwrap_err();
        assert!(err.to_string().contains("https://"), "{err}");
    }

    #[test]
    fn a_missing_token_file_is_a_usage_error() {
        let options = Credentialing::from_cli(&cli(&["--token-file", "/nonexistent/token"]))
            .unwrap()
            .towards(vec!["http://r:1".into()], Duration::from_secs(1));
        let err = options.prepare().unwrap_err();
        assert!(err.to_string().contains("/nonexistent/token"), "{err}");
        assert_eq!(err.exit(), crate::exit::Exit::Usage);
    }
}
