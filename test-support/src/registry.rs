//! A registry-server served in-process on a loopback port for the length of
//! a test.

use std::net::SocketAddr;
use std::time::Duration;

use registry_proto::pb::node_registry_client::NodeRegistryClient;
use registry_server::{ServerError, Settings};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

/// How long [`TestRegistry::stop`] waits for the server to finish.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// `settings` keeping their state in an embedded store in `data_dir`, so
/// a registry restarted on the same directory loads it (tests default to
/// the memory store).
pub fn durable(settings: Settings, data_dir: &std::path::Path) -> Settings {
    Settings {
        store: registry_server::config::StoreKind::Embedded,
        data_dir: data_dir.to_path_buf(),
        ..settings
    }
}

/// A registry serving from a listener the test bound, until
/// [`TestRegistry::stop`]. The port is never guessed: it is bound as
/// `127.0.0.1:0` and read back with `local_addr()`.
pub struct TestRegistry {
    /// Where it listens.
    pub addr: SocketAddr,
    /// `https` when the settings turn TLS on, else `http`.
    scheme: &'static str,
    /// Sent to stop the server gracefully.
    stop: Option<oneshot::Sender<()>>,
    /// The server task.
    task: JoinHandle<Result<(), ServerError>>,
}

impl TestRegistry {
    /// Serves `settings` on a fresh `127.0.0.1:0` listener.
    pub async fn start(settings: Settings) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        Self::serve(listener, settings)
    }

    /// Serves `settings` on `addr` again after an earlier registry there
    /// stopped. SO_REUSEADDR, so connections in TIME_WAIT do not block the
    /// bind.
    pub async fn restart_on(addr: SocketAddr, settings: Settings) -> Self {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .expect("a TCP socket");
        socket.set_reuseaddr(true).expect("SO_REUSEADDR");
        socket
            .bind(addr)
            .unwrap_or_else(|err| panic!("bind {addr} again: {err}"));
        let listener = socket.listen(1024).expect("listen");
        Self::serve(listener, settings)
    }

    /// Serves `settings` on a listener the test already holds (for
    /// instance, one bound before the registry should answer).
    pub fn serve(listener: TcpListener, settings: Settings) -> Self {
        crate::init_logs();
        let addr = listener.local_addr().expect("the listener's address");
        let scheme = if settings.tls_cert.is_some() {
            "https"
        } else {
            "http"
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(registry_server::run(listener, settings, async {
            let _ = stopped.await;
        }));
        Self {
            addr,
            scheme,
            stop: Some(stop),
            task,
        }
    }

    /// The URL clients dial: `http://` or `https://` and the address.
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    /// A plaintext channel on its own connection.
    ///
    /// # Panics
    ///
    /// When the registry serves TLS (build the channel with the test's
    /// CA then) or cannot be reached.
    pub async fn channel(&self) -> Channel {
        assert_eq!(self.scheme, "http", "channel() is plaintext only");
        Channel::from_shared(self.url())
            .expect("a valid URL")
            .connect()
            .await
            .unwrap_or_else(|err| panic!("connect to {}: {err}", self.url()))
    }

    /// A NodeRegistry client on its own plaintext connection.
    pub async fn client(&self) -> NodeRegistryClient<Channel> {
        NodeRegistryClient::new(self.channel().await)
    }

    /// Stops gracefully and waits until the server has finished and its
    /// listener is closed.
    ///
    /// # Panics
    ///
    /// When the server does not stop within 10 s or ends with an error.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(STOP_TIMEOUT, &mut self.task)
            .await
            .expect("the registry stops within 10 s")
            .expect("the registry task did not panic")
            .expect("the registry stopped without an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use registry_proto::pb;

    #[tokio::test]
    async fn serves_stops_and_serves_again_on_the_same_address() {
        let registry = TestRegistry::start(Settings::default()).await;
        assert_eq!(registry.url(), format!("http://{}", registry.addr));
        let mut client = registry.client().await;
        client
            .register(crate::fixtures::register_request("n1"))
            .await
            .expect("a valid registration is accepted");
        let addr = registry.addr;
        registry.stop().await;

        let again = TestRegistry::restart_on(addr, Settings::default()).await;
        assert_eq!(again.addr, addr);
        let listed = again
            .client()
            .await
            .list_nodes(pb::ListNodesRequest::default())
            .await
            .expect("ListNodes")
            .into_inner();
        assert!(listed.nodes.is_empty(), "a restarted registry starts empty");
        again.stop().await;
    }
}
