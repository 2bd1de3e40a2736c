//! `decode_and_validate`: the bytes of a gRPC message body, decoded as
//! every request message of the contract and validated as the server does
//! before any state is touched.
//!
//! Checked for each message that decodes:
//! - validation never panics, and refuses only with INVALID_ARGUMENT (a
//!   [`RegistryError::InvalidArgument`] or a placement error that maps to
//!   it), with a message of bounded length (long values are not echoed);
//! - an accepted message re-encodes to bytes that decode to the same
//!   message, which validation accepts again with the same result.

use std::time::Duration;

use chrono::{DateTime, Utc};
use prost::Message;
use registry_proto::convert::from_proto_timestamp;
use registry_proto::pb;
use registry_proto::rules;
use registry_server::RegistryError;
use registry_server::placement::PlacementQuery;
use registry_server::validate;

/// Longest status message a refusal may carry: values are quoted
/// shortened, so a huge field does not come back whole.
const MAX_MESSAGE_LEN: usize = 1024;

/// The registry's default clock skew allowance (`--max-clock-skew`).
const MAX_CLOCK_SKEW: Duration = Duration::from_secs(300);

/// One input: every message kind gets the same bytes.
pub fn run(data: &[u8]) {
    register(data);
    heartbeat(data);
    drain(data);
    cordon(data);
    find_pools(data);
    list_nodes(data);
    watch_nodes(data);
    list_models(data);
    by_node_id::<pb::DeregisterRequest>(data, |r| &r.node_id);
    by_node_id::<pb::GetNodeRequest>(data, |r| &r.node_id);
    by_node_id::<pb::UncordonNodeRequest>(data, |r| &r.node_id);
    by_node_id::<pb::CancelDrainRequest>(data, |r| &r.node_id);
}

/// The message, re-encoded and decoded again: must be the same message.
fn round_trip<M: Message + Default + PartialEq + std::fmt::Debug>(message: &M) -> M {
    let again =
        M::decode(message.encode_to_vec().as_slice()).expect("a re-encoded message decodes");
    assert_eq!(&again, message, "re-encoding changed the message");
    again
}

/// A refusal must be INVALID_ARGUMENT with a short message.
fn refused(err: &RegistryError) {
    assert!(
        matches!(err, RegistryError::InvalidArgument { .. }),
        "refused with something other than INVALID_ARGUMENT: {err:?}"
    );
    let status = tonic::Status::from(err.clone());
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().len() <= MAX_MESSAGE_LEN,
        "a {}-byte status message",
        status.message().len()
    );
}

fn register(data: &[u8]) {
    let Ok(request) = pb::RegisterRequest::decode(data) else {
        return;
    };
    match validate::registration(request.clone()) {
        Ok(registration) => {
            let again = validate::registration(round_trip(&request))
                .expect("a re-encoded accepted registration is accepted");
            assert_eq!(again, registration);
        }
        Err(err) => refused(&err),
    }
}

/// The registry's clock for a heartbeat: a fixed time, and (to get past
/// the skew check more often) the message's own `sent_at`.
fn clocks(request: &pb::HeartbeatRequest) -> Vec<DateTime<Utc>> {
    let fixed = DateTime::from_timestamp(1_800_000_000, 0).expect("a valid time");
    let own = request.sent_at.as_ref().and_then(from_proto_timestamp);
    std::iter::once(fixed).chain(own).collect()
}

fn heartbeat(data: &[u8]) {
    let Ok(request) = pb::HeartbeatRequest::decode(data) else {
        return;
    };
    if let Err(err) = validate::node_id("node_id", &request.node_id) {
        refused(&err);
    }
    for now in clocks(&request) {
        let mut taken = request.clone();
        match validate::beat(&mut taken, now, MAX_CLOCK_SKEW) {
            Ok(beat) => {
                assert_eq!(beat.received_at, now);
                let mut again = round_trip(&request);
                let beat_again = validate::beat(&mut again, now, MAX_CLOCK_SKEW)
                    .expect("a re-encoded accepted heartbeat is accepted");
                assert_eq!(beat_again, beat);
                assert!(again.pools.is_empty() && again.gpus.is_empty());
            }
            Err(err) => refused(&err),
        }
    }
}

fn drain(data: &[u8]) {
    let Ok(request) = pb::DrainNodeRequest::decode(data) else {
        return;
    };
    match validate::drain(request.clone()) {
        Ok(drain) => {
            let again = validate::drain(round_trip(&request))
                .expect("a re-encoded accepted drain is accepted");
            assert_eq!(again, drain);
            assert!(
                drain
                    .deadline
                    .is_none_or(|d| { !d.is_zero() && d <= validate::MAX_DRAIN_DEADLINE })
            );
        }
        Err(err) => refused(&err),
    }
}

fn cordon(data: &[u8]) {
    let Ok(request) = pb::CordonNodeRequest::decode(data) else {
        return;
    };
    let checked = validate::node_id("node_id", &request.node_id)
        .and_then(|()| rules::text("reason".into(), &request.reason).map_err(RegistryError::from));
    if let Err(err) = checked {
        refused(&err);
    }
}

fn find_pools(data: &[u8]) {
    let Ok(request) = pb::FindPoolsRequest::decode(data) else {
        return;
    };
    match PlacementQuery::from_request(request.clone()) {
        Ok(query) => {
            let again = PlacementQuery::from_request(round_trip(&request))
                .expect("a re-encoded accepted query is accepted");
            assert_eq!(again, query);
        }
        Err(err) => refused(&RegistryError::from(err)),
    }
}

fn list_nodes(data: &[u8]) {
    let Ok(request) = pb::ListNodesRequest::decode(data) else {
        return;
    };
    let filter = validate::node_filter(request.status, &request.pool_id, &request.labels);
    match filter {
        Ok(filter) => assert_eq!(filter.labels.len(), request.labels.len()),
        Err(err) => refused(&err),
    }
    if !request.page_token.is_empty()
        && let Err(err) = validate::node_id("page_token", &request.page_token)
    {
        refused(&err);
    }
}

fn watch_nodes(data: &[u8]) {
    let Ok(request) = pb::WatchNodesRequest::decode(data) else {
        return;
    };
    if let Err(err) = validate::node_filter(request.status, &request.pool_id, &request.labels) {
        refused(&err);
    }
    if let Err(err) = rules::text("model".into(), &request.model) {
        refused(&err.into());
    }
}

fn list_models(data: &[u8]) {
    let Ok(request) = pb::ListModelsRequest::decode(data) else {
        return;
    };
    if let Err(err) = rules::text("model".into(), &request.model) {
        refused(&err.into());
    }
}

/// The requests that carry only a node id.
fn by_node_id<M: Message + Default>(data: &[u8], id: fn(&M) -> &String) {
    let Ok(request) = M::decode(data) else {
        return;
    };
    if let Err(err) = validate::node_id("node_id", id(&request)) {
        refused(&err);
    }
}
