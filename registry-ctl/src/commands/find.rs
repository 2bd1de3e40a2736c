//! `find --model M ...`: the best pools for a model (FindPools).

use std::io::Write;

use registry_proto::pb;

use super::Context;
use crate::error::CtlError;
use crate::exit::Exit;
use crate::output::{Format, Printer, placement};

/// The filters of `find`, as given on the command line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query {
    /// The model to serve.
    pub model: String,
    /// Only pools of this engine.
    pub engine: Option<String>,
    /// Free slots a pool needs (the registry's default, 1, when absent).
    pub min_slots: Option<u32>,
    /// Free VRAM a pool needs, in bytes.
    pub min_vram: Option<u64>,
    /// Labels the node must carry.
    pub labels: Vec<(String, String)>,
    /// Text every GPU name of the pool must contain, ignoring case.
    pub gpu: Option<String>,
    /// Compute capability every GPU of the pool must reach ("8.0").
    pub min_compute_capability: Option<String>,
    /// Only pools on MIG slices all of this profile ("1g.10gb").
    pub mig_profile: Option<String>,
    /// Only pools of this node.
    pub node: Option<String>,
    /// Never pools of these nodes.
    pub exclude: Vec<String>,
    /// How many candidates (the registry's default, 1, when absent).
    pub limit: Option<u32>,
}

impl Query {
    /// The FindPools request of these filters.
    pub fn request(&self) -> pb::FindPoolsRequest {
        pb::FindPoolsRequest {
            model: self.model.clone(),
            engine: self.engine.clone().unwrap_or_default(),
            min_slots_free: self.min_slots,
            min_vram_free_bytes: self.min_vram.unwrap_or_default(),
            labels: self.labels.iter().cloned().collect(),
            gpu_name: self.gpu.clone().unwrap_or_default(),
            min_compute_capability: self.min_compute_capability.clone().unwrap_or_default(),
            mig_profile: self.mig_profile.clone().unwrap_or_default(),
            node_id: self.node.clone().unwrap_or_default(),
            exclude_node_ids: self.exclude.clone(),
            limit: self.limit.unwrap_or_default(),
        }
    }
}

/// Prints the candidates (table: one line each, best first; JSON: the
/// FindPoolsResponse on one line). Exit 1, with the registry's reason on
/// stderr, when no pool qualifies (NOT_FOUND) or the pinned node cannot
/// serve (FAILED_PRECONDITION).
pub async fn run<W: Write>(
    context: &Context,
    query: &Query,
    printer: &mut Printer<W>,
) -> Result<Exit, CtlError> {
    let registry = context.query_registry().await?;
    let answer = match registry.find_pools(query.request()).await {
        Ok(answer) => answer,
        Err(err) => return no_match(err),
    };
    print(&answer, printer)?;
    Ok(Exit::from_answer(!answer.candidates.is_empty()))
}

/// Exit 1 with the registry's reason for "nothing matches"; other errors
/// keep their own exit status.
fn no_match(err: CtlError) -> Result<Exit, CtlError> {
    match err {
        CtlError::Rpc {
            code: tonic::Code::NotFound | tonic::Code::FailedPrecondition,
            message,
            ..
        } => {
            eprintln!("registry-ctl: no pool found: {message}");
            Ok(Exit::No)
        }
        other => Err(other),
    }
}

fn print<W: Write>(
    answer: &pb::FindPoolsResponse,
    printer: &mut Printer<W>,
) -> Result<(), CtlError> {
    match printer.format() {
        Format::Table => printer.text(&placement::candidate_table(answer, false)),
        Format::Wide => printer.text(&placement::candidate_table(answer, true)),
        Format::Json => printer.message(answer),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::placement::tests::sample_candidates;

    #[test]
    fn filters_become_the_request() {
        assert_eq!(
            Query {
                model: "m".into(),
                ..Query::default()
            }
            .request(),
            pb::FindPoolsRequest {
                model: "m".into(),
                ..Default::default()
            }
        );
        let request = Query {
            model: "m".into(),
            engine: Some("vllm".into()),
            min_slots: Some(0),
            min_vram: Some(10 << 30),
            labels: vec![("zone".into(), "a".into())],
            gpu: Some("H100".into()),
            min_compute_capability: Some("8.0".into()),
            mig_profile: Some("1g.10gb".into()),
            node: Some("n1".into()),
            exclude: vec!["n2".into()],
            limit: Some(5),
        }
        .request();
        assert_eq!(request.min_slots_free, Some(0), "an explicit 0 is sent");
        assert_eq!(request.min_vram_free_bytes, 10 << 30);
        assert_eq!(request.labels.get("zone").map(String::as_str), Some("a"));
        assert_eq!(
            (
                request.gpu_name.as_str(),
                request.min_compute_capability.as_str()
            ),
            ("H100", "8.0")
        );
        assert_eq!(request.mig_profile, "1g.10gb");
        assert_eq!((request.node_id.as_str(), request.limit), ("n1", 5));
        assert_eq!(request.exclude_node_ids, ["n2"]);
    }

    #[test]
    fn nothing_matching_exits_1_and_other_failures_keep_their_status() {
        let refused = |code| CtlError::Rpc {
            call: "FindPools",
            url: "http://r".into(),
            code,
            message: "model m is served by no pool".into(),
        };
        assert_eq!(no_match(refused(tonic::Code::NotFound)).unwrap(), Exit::No);
        assert_eq!(
            no_match(refused(tonic::Code::FailedPrecondition)).unwrap(),
            Exit::No
        );
        assert_eq!(
            no_match(refused(tonic::Code::InvalidArgument))
                .unwrap_err()
                .exit(),
            Exit::Usage
        );
        assert_eq!(
            no_match(refused(tonic::Code::PermissionDenied))
                .unwrap_err()
                .exit(),
            Exit::Unreachable
        );
    }

    #[test]
    fn each_format_prints_the_answer() {
        for (format, needle) in [
            (Format::Table, "VRAM FREE"),
            (Format::Wide, "NODE ADDRESS"),
            (Format::Json, "\"revision\":\"42\""),
        ] {
            let mut printer = Printer::new(format, Vec::new());
            print(&sample_candidates(), &mut printer).unwrap();
            let text = String::from_utf8(printer.finish().unwrap()).unwrap();
            assert!(
                text.contains(needle) && text.contains("gpu-node-1"),
                "{format:?}: {text}"
            );
        }
    }
}
