//! The identity a client certificate proves under mTLS: its DNS subject
//! alternative names and its common name. A node's certificate must name its
//! node_id, so one host cannot act for another.

use tonic::Request;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// The names in the caller's client certificate; `None` without mTLS.
/// A certificate that cannot be parsed yields no names, so it matches no
/// node.
pub fn peer_identities<T>(request: &Request<T>) -> Option<Vec<String>> {
    let certs = request.peer_certs()?;
    let leaf = certs.first()?;
    Some(names_in(leaf.as_ref()))
}

/// DNS names and common names of a DER certificate.
pub fn names_in(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return Vec::new();
    };
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::DNSName(dns) = name {
                names.push((*dns).to_string());
            }
        }
    }
    for cn in cert.subject().iter_common_name() {
        if let Ok(cn) = cn.as_str() {
            names.push(cn.to_string());
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_from_san_and_common_name() {
        let mut params = rcgen::CertificateParams::new(vec!["gpu-node-7".to_string()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "gpu-node-7-cn");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let names = names_in(cert.der());
        assert_eq!(names, ["gpu-node-7", "gpu-node-7-cn"]);
        assert!(names_in(b"not a certificate").is_empty());
    }
}
