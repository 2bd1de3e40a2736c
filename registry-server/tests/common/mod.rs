//! Helpers of the registry-server integration tests that only they use;
//! what other crates' tests share too (the in-process registry, waits,
//! PKI, request fixtures) is in the test-support crate.
#![allow(dead_code)] // each test binary uses its own subset

use std::time::Duration;

use registry_proto::pb;
use test_support::Session;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::Channel;

/// Registers `request` and returns its session.
pub async fn register(
    client: &mut pb::node_registry_client::NodeRegistryClient<Channel>,
    request: pb::RegisterRequest,
) -> Session {
    client.register(request).await.unwrap().into_inner().into()
}

/// The node as GetNode reports it (panics on an error).
pub async fn get(
    client: &mut pb::node_registry_client::NodeRegistryClient<Channel>,
    node_id: &str,
) -> pb::Node {
    client
        .get_node(pb::GetNodeRequest {
            node_id: node_id.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// The node's status, as GetNode reports it.
pub async fn status_of(
    client: &mut pb::node_registry_client::NodeRegistryClient<Channel>,
    node_id: &str,
) -> pb::NodeStatus {
    get(client, node_id).await.status()
}

/// `Ok` when the node's status is `want`, else the status it has, for
/// `test_support::eventually`.
pub async fn status_is(
    client: &mut pb::node_registry_client::NodeRegistryClient<Channel>,
    node_id: &str,
    want: pb::NodeStatus,
) -> Result<(), String> {
    match status_of(client, node_id).await {
        status if status == want => Ok(()),
        status => Err(format!("{node_id} is {status:?}")),
    }
}

/// An open Heartbeat stream: a sender for requests and the server's replies.
pub struct Stream {
    pub tx: mpsc::Sender<pb::HeartbeatRequest>,
    pub rx: Streaming<pb::HeartbeatResponse>,
}

impl Stream {
    pub async fn open<T>(
        client: &mut pb::node_registry_client::NodeRegistryClient<T>,
    ) -> Result<Self, tonic::Status>
    where
        T: tonic::client::GrpcService<tonic::body::Body>,
        T::Error: Into<tonic::codegen::StdError>,
        T::ResponseBody: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
        <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
    {
        let (tx, requests) = mpsc::channel(16);
        let rx = client
            .heartbeat(ReceiverStream::new(requests))
            .await?
            .into_inner();
        Ok(Self { tx, rx })
    }

    /// Sends one request and returns the server's answer to it.
    pub async fn send(
        &mut self,
        request: pb::HeartbeatRequest,
    ) -> Result<pb::HeartbeatResponse, tonic::Status> {
        // The server may already have ended the stream; the reply says why.
        let _ = self.tx.send(request).await;
        self.next().await
    }

    /// The server's next message on the stream.
    pub async fn next(&mut self) -> Result<pb::HeartbeatResponse, tonic::Status> {
        let reply = tokio::time::timeout(Duration::from_secs(10), self.rx.next())
            .await
            .expect("a reply within 10 s");
        match reply {
            Some(result) => result,
            None => panic!("stream ended without a status"),
        }
    }
}

/// Whether the server answers the health service with SERVING.
pub async fn serving(channel: Channel) -> bool {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .is_ok_and(|r| r.into_inner().status() == ServingStatus::Serving)
}
