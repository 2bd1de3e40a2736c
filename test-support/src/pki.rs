//! Certificates made at run time, so no test ships key material.

/// A CA and the leaf certificates it signs.
pub struct Pki {
    /// The CA, which signs leaves and whose PEM clients and servers trust.
    ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl Pki {
    /// A self-signed CA whose common name is `name`.
    pub fn new(name: &str) -> Self {
        let mut params =
            rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let key = rcgen::KeyPair::generate().expect("a CA key");
        let ca = rcgen::CertifiedIssuer::self_signed(params, key).expect("a self-signed CA");
        Self { ca }
    }

    /// The CA certificate, PEM.
    pub fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    /// A leaf certificate the CA signs for `names` (DNS names in the SAN),
    /// as (certificate PEM, key PEM).
    pub fn leaf(&self, names: &[&str]) -> (String, String) {
        let names: Vec<String> = names.iter().map(|name| name.to_string()).collect();
        let params = rcgen::CertificateParams::new(names).expect("leaf parameters");
        let key = rcgen::KeyPair::generate().expect("a leaf key");
        let cert = params.signed_by(&key, &self.ca).expect("a signed leaf");
        (cert.pem(), key.serialize_pem())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn makes_pem_certificates_and_keys() {
        let pki = Pki::new("test CA");
        assert!(pki.ca_pem().starts_with("-----BEGIN CERTIFICATE-----"));
        let (cert, key) = pki.leaf(&["localhost"]);
        assert!(cert.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"));
        assert_ne!(cert, pki.ca_pem());
    }
}
