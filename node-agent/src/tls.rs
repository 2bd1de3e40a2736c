//! TLS towards the registry: the CAs that sign its certificate, the name to
//! verify it against, and an optional client identity for mTLS.
//!
//! This build trusts no certificate authority by itself: tonic's `tls-ring`
//! feature comes without system or webpki roots, and the registry is an
//! internal service whose certificate a private CA signs. So an `https://`
//! registry needs `--tls-ca`. To trust the host's public roots instead,
//! pass the system bundle (`/etc/ssl/certs/ca-certificates.crt`).

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use crate::error::ConfigError;

/// TLS settings; all empty for a plain `http://` registry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsConfig {
    /// PEM bundle of the CAs trusted to sign the registry's certificate.
    /// Required for an `https://` registry.
    pub ca: Option<PathBuf>,
    /// PEM certificate (chain) the agent presents (mTLS). Under mTLS the
    /// registry wants it to name the node id as a DNS SAN or the CN.
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    pub key: Option<PathBuf>,
    /// Name to verify the registry's certificate against, when the URL's
    /// host is not in it (an IP address, a load balancer's name).
    pub domain: Option<String>,
}

impl TlsConfig {
    /// Whether any TLS setting is given.
    pub fn is_set(&self) -> bool {
        self.ca.is_some() || self.cert.is_some() || self.key.is_some() || self.domain.is_some()
    }

    /// Checks the settings against the registry URL's scheme, without
    /// reading any file.
    pub fn validate(&self, https: bool) -> Result<(), ConfigError> {
        if !https {
            if self.is_set() {
                return Err(ConfigError::Conflict(
                    "--tls-ca, --tls-cert, --tls-key and --tls-domain need an https:// registry"
                        .into(),
                ));
            }
            return Ok(());
        }
        if self.ca.is_none() {
            return Err(ConfigError::Conflict(
                "an https:// registry needs --tls-ca (this build trusts no CA by itself; \
                 pass the registry's CA, or /etc/ssl/certs/ca-certificates.crt for the system roots)"
                    .into(),
            ));
        }
        match (&self.cert, &self.key) {
            (Some(_), None) => {
                return Err(ConfigError::Conflict(
                    "--tls-cert needs --tls-key (the certificate's private key)".into(),
                ));
            }
            (None, Some(_)) => {
                return Err(ConfigError::Conflict(
                    "--tls-key needs --tls-cert (the client certificate)".into(),
                ));
            }
            _ => {}
        }
        if let Some(domain) = &self.domain
            && !valid_server_name(domain)
        {
            return Err(ConfigError::invalid(
                "tls domain",
                domain,
                "a DNS name or an IP address",
            ));
        }
        Ok(())
    }

    /// Reads the files into tonic's client configuration. Files that
    /// cannot be read or hold no PEM of the expected kind are
    /// configuration errors.
    pub fn client_config(&self) -> Result<ClientTlsConfig, ConfigError> {
        let mut tls = ClientTlsConfig::new();
        if let Some(ca) = &self.ca {
            tls = tls.ca_certificate(Certificate::from_pem(read_pem(
                "tls ca",
                ca,
                "CERTIFICATE-----",
            )?));
        }
        if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
            tls = tls.identity(Identity::from_pem(
                read_pem("tls cert", cert, "CERTIFICATE-----")?,
                read_pem("tls key", key, "PRIVATE KEY-----")?,
            ));
        }
        if let Some(domain) = &self.domain {
            tls = tls.domain_name(domain.clone());
        }
        Ok(tls)
    }
}

/// Reads a PEM file and checks that it holds a `-----BEGIN ...{marker}`
/// block, so a swapped or empty file is named at start-up rather than
/// failing every handshake.
fn read_pem(what: &'static str, path: &Path, marker: &str) -> Result<Vec<u8>, ConfigError> {
    let pem = std::fs::read(path).map_err(|source| ConfigError::ReadFile {
        what,
        path: path.to_owned(),
        source,
    })?;
    let text = String::from_utf8_lossy(&pem);
    let found = text.match_indices("-----BEGIN ").any(|(at, _)| {
        text[at..]
            .lines()
            .next()
            .is_some_and(|l| l.ends_with(marker))
    });
    if !found {
        return Err(ConfigError::BadFile {
            what,
            path: path.to_owned(),
            why: format!("no PEM block ending in {marker:?}"),
        });
    }
    Ok(pem)
}

/// A DNS name (labels of `[A-Za-z0-9-]`) or an IP address.
fn valid_server_name(name: &str) -> bool {
    if name.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(ca: bool, cert: bool, key: bool) -> TlsConfig {
        TlsConfig {
            ca: ca.then(|| "/etc/node-agent/ca.pem".into()),
            cert: cert.then(|| "/etc/node-agent/node.pem".into()),
            key: key.then(|| "/etc/node-agent/node.key".into()),
            domain: None,
        }
    }

    #[test]
    fn settings_are_checked_against_the_scheme() {
        assert!(TlsConfig::default().validate(false).is_ok());
        assert!(paths(true, false, false).validate(true).is_ok());
        assert!(paths(true, true, true).validate(true).is_ok());

        let err = paths(false, false, false).validate(true).unwrap_err();
        assert!(err.to_string().contains("--tls-ca"), "{err}");
        let err = paths(true, false, false).validate(false).unwrap_err();
        assert!(err.to_string().contains("https://"), "{err}");
        let err = paths(true, true, false).validate(true).unwrap_err();
        assert!(err.to_string().contains("--tls-key"), "{err}");
        let err = paths(true, false, true).validate(true).unwrap_err();
        assert!(err.to_string().contains("--tls-cert"), "{err}");

        let mut tls = paths(true, false, false);
        for good in ["registry.internal", "localhost", "10.0.0.1", "::1"] {
            tls.domain = Some(good.into());
            assert!(tls.validate(true).is_ok(), "{good}");
        }
        for bad in ["", "https://registry", "a..b", "-x.example", "with space"] {
            tls.domain = Some(bad.into());
            assert!(tls.validate(true).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn unusable_pem_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["n1".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let cert_path = write("cert.pem", &cert.pem());
        let key_path = write("key.pem", &key.serialize_pem());

        let good = TlsConfig {
            ca: Some(cert_path.clone()),
            cert: Some(cert_path.clone()),
            key: Some(key_path.clone()),
            domain: Some("registry.internal".into()),
        };
        assert!(good.client_config().is_ok());

        // Key and certificate swapped.
        let swapped = TlsConfig {
            cert: Some(key_path.clone()),
            key: Some(cert_path.clone()),
            ..good.clone()
        };
        let err = swapped.client_config().unwrap_err().to_string();
        assert!(err.contains("tls cert") && err.contains("key.pem"), "{err}");

        let empty = TlsConfig {
            ca: Some(write("empty.pem", "")),
            ..good.clone()
        };
        let err = empty.client_config().unwrap_err().to_string();
        assert!(err.contains("tls ca") && err.contains("empty.pem"), "{err}");

        let missing = TlsConfig {
            ca: Some(dir.path().join("missing.pem")),
            ..good
        };
        let err = missing.client_config().unwrap_err().to_string();
        assert!(err.contains("cannot read tls ca"), "{err}");
    }
}
