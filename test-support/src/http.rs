//! A plain HTTP/1.0 GET and Prometheus text samples: the metrics and health
//! ports of the registry and of etcd, read without an HTTP client.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// The body of `GET path` on `addr`, read within a second; `None` when
/// nothing answers.
pub fn get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut raw = String::new();
    let _ = stream.read_to_string(&mut raw);
    raw.split_once("\r\n\r\n").map(|(_, body)| body.to_owned())
}

/// The value of the unlabelled sample `name` in Prometheus text.
pub fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        line.strip_prefix(name)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sample_is_read_by_its_exact_name() {
        let text = "# HELP etcd_mvcc_put_total x\n\
                    etcd_mvcc_put_total_size 9\n\
                    etcd_mvcc_put_total 42\n";
        assert_eq!(sample(text, "etcd_mvcc_put_total"), Some(42.0));
        assert_eq!(sample(text, "etcd_mvcc_delete_total"), None);
    }
}
