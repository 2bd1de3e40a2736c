//! `watch`: the registry's changes as they happen, resumed from the last
//! revision seen when the registry ends the stream as too slow or goes
//! away.

use std::io::Write;
use std::time::Duration;

use registry_proto::pb;

use super::Context;
use super::list;
use crate::error::CtlError;
use crate::exit::Exit;
use crate::output::{Format, Printer};

/// Pause before reconnecting, so a registry that keeps refusing is not
/// hammered.
const RECONNECT_PAUSE: Duration = Duration::from_secs(1);

/// Connection attempts after a watch ended (a registry restarting), one
/// every [`RECONNECT_PAUSE`], before giving up with exit 3.
const RECONNECT_TRIES: u32 = 30;

/// The filters of `watch`: those of `list`, and a model.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Status, pool and labels, as `list` takes them.
    pub list: list::Filter,
    /// Only nodes with a pool serving this model.
    pub model: Option<String>,
}

impl Filter {
    /// The WatchNodes request of these filters, starting after `revision`
    /// (0: with a snapshot).
    pub fn request(&self, revision: u64) -> pb::WatchNodesRequest {
        let list = self.list.request();
        pb::WatchNodesRequest {
            status: list.status,
            pool_id: list.pool_id,
            labels: list.labels,
            model: self.model.clone().unwrap_or_default(),
            start_revision: revision,
        }
    }
}

/// Prints every event until interrupted; returns only with an error
/// (a compacted revision exits 4, an unreachable registry 3).
pub async fn run<W: Write>(
    context: &Context,
    filter: &Filter,
    from_revision: u64,
    printer: &mut Printer<W>,
) -> Result<Exit, CtlError> {
    if printer.format() != Format::Json {
        printer.text(&format!(
            "{:<10} {:<17} {:<24} {:<8} POOLS\n",
            "REVISION", "TYPE", "NODE", "STATUS"
        ))?;
    }
    let mut last = from_revision;
    // Reconnect attempts left after the watch ended; the first connection
    // gets none (an unreachable registry then exits 3 at once).
    let mut retries = 0;
    loop {
        let opened = async {
            let registry = context.query_registry().await?;
            let stream = registry.watch(filter.request(last)).await?;
            Ok::<_, CtlError>((registry, stream))
        };
        let (registry, mut stream) = match opened.await {
            Ok(opened) => opened,
            Err(err) if retries > 0 && err.exit() == Exit::Unreachable => {
                retries -= 1;
                eprintln!("registry-ctl: {err}; retrying");
                tokio::time::sleep(RECONNECT_PAUSE).await;
                continue;
            }
            Err(err) => return Err(err),
        };
        retries = RECONNECT_TRIES;
        // A snapshot's ADDED events carry each node's own revision; only
        // its SNAPSHOT_COMPLETE says where the watch stands.
        let mut in_snapshot = last == 0;
        let ended = loop {
            match stream.message().await {
                Ok(Some(event)) => {
                    if event.r#type() == pb::WatchEventType::SnapshotComplete {
                        in_snapshot = false;
                    }
                    if !in_snapshot {
                        last = last.max(event.revision);
                    }
                    print(printer, &event)?;
                }
                Ok(None) => break tonic::Status::unavailable("the registry ended the watch"),
                Err(status) => break status,
            }
        };
        match ended.code() {
            tonic::Code::ResourceExhausted | tonic::Code::Unavailable => {
                eprintln!(
                    "registry-ctl: the watch ended ({}); resuming from revision {last}",
                    ended.message()
                );
                tokio::time::sleep(RECONNECT_PAUSE).await;
            }
            _ => return Err(CtlError::rpc("WatchNodes", registry.url(), &ended)),
        }
    }
}

/// One event as a line: a table row or a JSON object.
fn print<W: Write>(
    printer: &mut Printer<W>,
    event: &pb::WatchNodesResponse,
) -> Result<(), CtlError> {
    match printer.format() {
        Format::Json => printer.message(event)?,
        Format::Table | Format::Wide => printer.text(&event_line(event))?,
    }
    printer.flush()
}

/// `REVISION TYPE NODE STATUS POOLS`, the pools as `id:STATE free/total`
/// from the latest reported status, or the registered ids before any.
pub fn event_line(event: &pb::WatchNodesResponse) -> String {
    let kind = event
        .r#type()
        .as_str_name()
        .trim_start_matches("WATCH_EVENT_TYPE_")
        .to_owned();
    let (node, status, pools) = match &event.node {
        None => ("-".to_owned(), "-".to_owned(), "-".to_owned()),
        Some(node) => (
            node.node_id.clone(),
            crate::output::node::status_word(Some(node)).to_owned(),
            pools_summary(node),
        ),
    };
    format!(
        "{:<10} {:<17} {:<24} {:<8} {}\n",
        event.revision, kind, node, status, pools
    )
}

fn pools_summary(node: &pb::Node) -> String {
    let summary: Vec<String> = if node.pool_status.is_empty() {
        node.pools.iter().map(|p| p.pool_id.clone()).collect()
    } else {
        node.pool_status
            .iter()
            .map(|p| {
                format!(
                    "{}:{} {}/{}",
                    p.pool_id,
                    p.state().as_str_name().trim_start_matches("POOL_STATE_"),
                    p.slots_free,
                    p.slots_total
                )
            })
            .collect()
    };
    if summary.is_empty() {
        "-".to_owned()
    } else {
        summary.join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::StatusFilter;

    #[test]
    fn filters_become_the_request() {
        let request = Filter {
            list: list::Filter {
                status: Some(StatusFilter::Online),
                pool: None,
                labels: vec![("zone".into(), "eu-1".into())],
            },
            model: Some("llama".into()),
        }
        .request(7);
        assert_eq!(request.status(), pb::NodeStatus::Online);
        assert_eq!(request.model, "llama");
        assert_eq!(request.start_revision, 7);
        assert_eq!(request.labels.get("zone").map(String::as_str), Some("eu-1"));
    }

    #[test]
    fn an_event_is_one_line() {
        let mut node = crate::output::node::tests::sample_node();
        node.pool_status = vec![pb::PoolStatus {
            pool_id: "pool-0".into(),
            state: pb::PoolState::Ready as i32,
            slots_total: 4,
            slots_free: 3,
            ..Default::default()
        }];
        let line = event_line(&pb::WatchNodesResponse {
            r#type: pb::WatchEventType::Modified as i32,
            revision: 12,
            node: Some(node),
            registry: None,
        });
        assert_eq!(line.lines().count(), 1);
        let words: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            words,
            [
                "12",
                "MODIFIED",
                "gpu-node-1",
                "online",
                "pool-0:READY",
                "3/4"
            ]
        );
        let marker = event_line(&pb::WatchNodesResponse {
            r#type: pb::WatchEventType::SnapshotComplete as i32,
            revision: 5,
            node: None,
            registry: None,
        });
        assert_eq!(
            marker.split_whitespace().collect::<Vec<_>>(),
            ["5", "SNAPSHOT_COMPLETE", "-", "-", "-"]
        );
    }
}
