//! A node's latest pool status as its view keeps it: each pool's figures,
//! and its names taken from the pool's registered spec where they are the
//! same.
//!
//! A `pb::PoolStatus` is 120 bytes and up to four strings of its own, and
//! every node's view held one per pool. A pool nearly always reports the
//! id, model and engine it registered (or leaves them empty), so a kept
//! report points at its spec in the view's registration for its names: 40
//! bytes a pool, nothing else on the heap. A report that names anything
//! else (a pool not registered, another model) keeps its names itself.
//! Readers that need the contract message put it back together
//! ([`PoolReports::to_proto`]); placement, the gauges and the admin checks
//! read borrowed [`PoolReading`]s; the watch history encodes the kept
//! reports as `Node.pool_status` without building messages.

use std::sync::Arc;

use prost::encoding::{self, WireType};
use registry_proto::pb;

use crate::pool_specs::PoolSpec;

/// One pool's status as reported, borrowed from wherever it is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolReading<'a> {
    /// `PoolStatus.pool_id`.
    pub pool_id: &'a str,
    /// `PoolStatus.state`, as the contract numbers it.
    pub state: i32,
    /// `PoolStatus.slots_total`.
    pub slots_total: u32,
    /// `PoolStatus.slots_free`.
    pub slots_free: u32,
    /// `PoolStatus.vram_free_bytes`.
    pub vram_free_bytes: u64,
    /// `PoolStatus.model` (empty: the registered one holds).
    pub model: &'a str,
    /// `PoolStatus.engine` (empty: the registered one holds).
    pub engine: &'a str,
    /// `PoolStatus.endpoint` (empty: the registered one holds).
    pub endpoint: &'a str,
}

impl<'a> From<&'a pb::PoolStatus> for PoolReading<'a> {
    fn from(s: &'a pb::PoolStatus) -> Self {
        PoolReading {
            pool_id: &s.pool_id,
            state: s.state,
            slots_total: s.slots_total,
            slots_free: s.slots_free,
            vram_free_bytes: s.vram_free_bytes,
            model: &s.model,
            engine: &s.engine,
            endpoint: &s.endpoint,
        }
    }
}

/// The tags of `PoolStatus`, as the contract numbers its fields.
mod tag {
    pub const POOL_ID: u32 = 1;
    pub const STATE: u32 = 2;
    pub const SLOTS_TOTAL: u32 = 3;
    pub const SLOTS_FREE: u32 = 4;
    pub const VRAM_FREE_BYTES: u32 = 5;
    pub const MODEL: u32 = 6;
    pub const ENGINE: u32 = 7;
    pub const ENDPOINT: u32 = 8;
}

/// The tag of `Node.pool_status`, under which the reports are encoded.
const POOL_STATUS_TAG: u32 = 11;

impl PoolReading<'_> {
    /// The contract message (a copy).
    pub fn to_proto(&self) -> pb::PoolStatus {
        pb::PoolStatus {
            pool_id: self.pool_id.to_owned(),
            state: self.state,
            slots_total: self.slots_total,
            slots_free: self.slots_free,
            vram_free_bytes: self.vram_free_bytes,
            model: self.model.to_owned(),
            engine: self.engine.to_owned(),
            endpoint: self.endpoint.to_owned(),
        }
    }

    /// The length of the message's own encoding, as prost encodes a
    /// `PoolStatus` (proto3: fields at their default are left out).
    fn body_len(&self) -> usize {
        let text = |tag, s: &str| {
            if s.is_empty() {
                0
            } else {
                encoding::key_len(tag) + encoding::encoded_len_varint(s.len() as u64) + s.len()
            }
        };
        let number = |tag, n: u64| {
            if n == 0 {
                0
            } else {
                encoding::key_len(tag) + encoding::encoded_len_varint(n)
            }
        };
        text(tag::POOL_ID, self.pool_id)
            // An int32 enum is encoded as a sign-extended varint.
            + number(tag::STATE, i64::from(self.state) as u64)
            + number(tag::SLOTS_TOTAL, u64::from(self.slots_total))
            + number(tag::SLOTS_FREE, u64::from(self.slots_free))
            + number(tag::VRAM_FREE_BYTES, self.vram_free_bytes)
            + text(tag::MODEL, self.model)
            + text(tag::ENGINE, self.engine)
            + text(tag::ENDPOINT, self.endpoint)
    }

    /// Appends the report as one `Node.pool_status` entry.
    fn encode(&self, buf: &mut Vec<u8>) {
        let text = |buf: &mut Vec<u8>, tag, s: &str| {
            if !s.is_empty() {
                encoding::encode_key(tag, WireType::LengthDelimited, buf);
                encoding::encode_varint(s.len() as u64, buf);
                buf.extend_from_slice(s.as_bytes());
            }
        };
        let number = |buf: &mut Vec<u8>, tag, n: u64| {
            if n != 0 {
                encoding::encode_key(tag, WireType::Varint, buf);
                encoding::encode_varint(n, buf);
            }
        };
        encoding::encode_key(POOL_STATUS_TAG, WireType::LengthDelimited, buf);
        encoding::encode_varint(self.body_len() as u64, buf);
        text(buf, tag::POOL_ID, self.pool_id);
        number(buf, tag::STATE, i64::from(self.state) as u64);
        number(buf, tag::SLOTS_TOTAL, u64::from(self.slots_total));
        number(buf, tag::SLOTS_FREE, u64::from(self.slots_free));
        number(buf, tag::VRAM_FREE_BYTES, self.vram_free_bytes);
        text(buf, tag::MODEL, self.model);
        text(buf, tag::ENGINE, self.engine);
        text(buf, tag::ENDPOINT, self.endpoint);
    }

    /// The length of [`PoolReading::encode`]'s output.
    fn encoded_len(&self) -> usize {
        let body = self.body_len();
        encoding::key_len(POOL_STATUS_TAG) + encoding::encoded_len_varint(body as u64) + body
    }
}

/// The latest pool status of a node, as its views keep it. Cloning shares
/// it. Read only with the pool specs of the registration it was built
/// against ([`NodeView`](crate::view::NodeView) pairs the two).
#[derive(Debug, Clone)]
pub struct PoolReports(Arc<[PoolReport]>);

impl Default for PoolReports {
    fn default() -> Self {
        PoolReports(Arc::new([]))
    }
}

/// One pool's status as kept.
#[derive(Debug, Clone)]
struct PoolReport {
    /// Free VRAM, in bytes.
    vram_free_bytes: u64,
    /// The state, as the contract numbers it.
    state: i32,
    /// Slots in all.
    slots_total: u32,
    /// Slots free.
    slots_free: u32,
    /// Where the id, model, engine and endpoint come from.
    names: Names,
}

/// Where a kept report's names come from.
#[derive(Debug, Clone)]
enum Names {
    /// The registered spec at `at` has the pool's id; of the model, engine
    /// and endpoint, those flagged in `from_spec` are the spec's and the
    /// others were reported empty.
    Spec { at: u16, from_spec: u8 },
    /// Anything else: the names as reported.
    Own(Box<OwnNames>),
}

/// The names of a report that does not match its spec.
#[derive(Debug, Clone)]
struct OwnNames {
    pool_id: Box<str>,
    model: Box<str>,
    engine: Box<str>,
    endpoint: Box<str>,
}

/// `Names::Spec` flags: which names are the spec's.
const MODEL: u8 = 1;
const ENGINE: u8 = 2;
const ENDPOINT: u8 = 4;

impl PoolReport {
    /// Keeps `reported`, the `index`-th pool of a beat, for a node
    /// registered with `specs`.
    fn new(index: usize, reported: &pb::PoolStatus, specs: &[PoolSpec]) -> Self {
        // Agents report pools in the order they registered them: the same
        // position is tried first.
        let spec = specs
            .get(index)
            .filter(|s| s.pool_id() == reported.pool_id)
            .map(|s| (index, s))
            .or_else(|| {
                specs
                    .iter()
                    .enumerate()
                    .find(|(_, s)| s.pool_id() == reported.pool_id)
            });
        let names = spec
            .and_then(|(at, spec)| {
                let at = u16::try_from(at).ok()?;
                let mut from_spec = 0;
                for (flag, told, registered) in [
                    (MODEL, &reported.model, spec.model()),
                    (ENGINE, &reported.engine, spec.engine()),
                    (ENDPOINT, &reported.endpoint, spec.endpoint()),
                ] {
                    if told == registered && !told.is_empty() {
                        from_spec |= flag;
                    } else if !told.is_empty() {
                        return None;
                    }
                }
                Some(Names::Spec { at, from_spec })
            })
            .unwrap_or_else(|| {
                Names::Own(Box::new(OwnNames {
                    pool_id: reported.pool_id.as_str().into(),
                    model: reported.model.as_str().into(),
                    engine: reported.engine.as_str().into(),
                    endpoint: reported.endpoint.as_str().into(),
                }))
            });
        PoolReport {
            vram_free_bytes: reported.vram_free_bytes,
            state: reported.state,
            slots_total: reported.slots_total,
            slots_free: reported.slots_free,
            names,
        }
    }

    /// The report, its names read from `specs` where they are the spec's.
    fn reading<'a>(&'a self, specs: &'a [PoolSpec]) -> PoolReading<'a> {
        let (pool_id, model, engine, endpoint) = match &self.names {
            Names::Spec { at, from_spec } => match specs.get(usize::from(*at)) {
                Some(spec) => {
                    let pick = |flag, s: &'a str| {
                        if from_spec & flag != 0 { s } else { "" }
                    };
                    (
                        spec.pool_id(),
                        pick(MODEL, spec.model()),
                        pick(ENGINE, spec.engine()),
                        pick(ENDPOINT, spec.endpoint()),
                    )
                }
                // Only read against the registration it was built for,
                // which has the spec.
                None => {
                    debug_assert!(false, "a pool report read against another registration");
                    ("", "", "", "")
                }
            },
            Names::Own(own) => (&*own.pool_id, &*own.model, &*own.engine, &*own.endpoint),
        };
        PoolReading {
            pool_id,
            state: self.state,
            slots_total: self.slots_total,
            slots_free: self.slots_free,
            vram_free_bytes: self.vram_free_bytes,
            model,
            engine,
            endpoint,
        }
    }
}

impl PoolReports {
    /// Keeps `reported` (a beat's pool status, validated) for a node
    /// registered with `specs`.
    pub fn new(reported: &[pb::PoolStatus], specs: &[PoolSpec]) -> Self {
        PoolReports(
            reported
                .iter()
                .enumerate()
                .map(|(i, r)| PoolReport::new(i, r, specs))
                .collect(),
        )
    }

    /// The same reports for a node now registered with `to` instead of
    /// `from` (names are matched to the new specs again).
    pub fn rebased(&self, from: &[PoolSpec], to: &[PoolSpec]) -> Self {
        PoolReports::new(&self.to_proto(from), to)
    }

    /// How many pools are reported.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether no pool is reported.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The `index`-th report, read with `specs`.
    pub fn get<'a>(&'a self, index: usize, specs: &'a [PoolSpec]) -> Option<PoolReading<'a>> {
        self.0.get(index).map(|r| r.reading(specs))
    }

    /// Every report in the reported order, read with `specs`.
    pub fn iter<'a>(&'a self, specs: &'a [PoolSpec]) -> Readings<'a> {
        Readings(Source::Kept {
            reports: self.0.iter(),
            specs,
        })
    }

    /// The reports as the contract sends them, for a reader's copy.
    pub fn to_proto(&self, specs: &[PoolSpec]) -> Vec<pb::PoolStatus> {
        self.iter(specs).map(|r| r.to_proto()).collect()
    }

    /// The length of [`PoolReports::encode`]'s output.
    pub fn encoded_len(&self, specs: &[PoolSpec]) -> usize {
        self.iter(specs).map(|r| r.encoded_len()).sum()
    }

    /// Appends the reports as `Node.pool_status` encodes them.
    pub fn encode(&self, specs: &[PoolSpec], buf: &mut Vec<u8>) {
        for reading in self.iter(specs) {
            reading.encode(buf);
        }
    }
}

/// Pool readings, from a beat's messages or from kept reports.
#[derive(Debug, Clone)]
pub struct Readings<'a>(Source<'a>);

/// Where [`Readings`] read from.
#[derive(Debug, Clone)]
enum Source<'a> {
    /// A beat's pool status as received.
    Reported(std::slice::Iter<'a, pb::PoolStatus>),
    /// Kept reports and the specs they name.
    Kept {
        reports: std::slice::Iter<'a, PoolReport>,
        specs: &'a [PoolSpec],
    },
}

impl<'a> Readings<'a> {
    /// Readings of a beat's pool status.
    pub fn reported(pools: &'a [pb::PoolStatus]) -> Self {
        Readings(Source::Reported(pools.iter()))
    }
}

impl<'a> Iterator for Readings<'a> {
    type Item = PoolReading<'a>;

    fn next(&mut self) -> Option<PoolReading<'a>> {
        match &mut self.0 {
            Source::Reported(pools) => pools.next().map(PoolReading::from),
            Source::Kept { reports, specs } => {
                let specs: &'a [PoolSpec] = specs;
                reports.next().map(|r| r.reading(specs))
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        match &self.0 {
            Source::Reported(pools) => pools.size_hint(),
            Source::Kept { reports, .. } => reports.size_hint(),
        }
    }
}

impl ExactSizeIterator for Readings<'_> {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool_specs::PoolSpecs;
    use prost::Message;

    fn spec(pool_id: &str, model: &str) -> pb::PoolSpec {
        pb::PoolSpec {
            pool_id: pool_id.into(),
            model: model.into(),
            engine: "vllm".into(),
            endpoint: format!("http://10.0.0.1:8000/{pool_id}"),
            slots_total: 16,
            ..Default::default()
        }
    }

    fn status(pool_id: &str, model: &str, engine: &str) -> pb::PoolStatus {
        pb::PoolStatus {
            pool_id: pool_id.into(),
            state: pb::PoolState::Ready as i32,
            slots_total: 16,
            slots_free: 5,
            vram_free_bytes: 3 << 30,
            model: model.into(),
            engine: engine.into(),
            endpoint: String::new(),
        }
    }

    /// `Node` with only its pool status: what the history's encoding of
    /// the reports must decode to.
    #[derive(Clone, PartialEq, prost::Message)]
    struct StatusOnly {
        #[prost(message, repeated, tag = "11")]
        pool_status: Vec<pb::PoolStatus>,
    }

    /// Every way a pool may report its names: as registered, some empty,
    /// another model, another order, a pool not registered, an endpoint
    /// of its own, figures at zero and an enum outside the contract's.
    fn cases() -> (PoolSpecs, Vec<pb::PoolStatus>) {
        let specs = PoolSpecs::from(vec![
            spec("p0", "llama"),
            spec("p1", "mistral"),
            spec("p2", "qwen"),
        ]);
        let mut moved = status("p0", "", "");
        moved.endpoint = "http://10.0.0.1:9000".into();
        let mut idle = status("p2", "qwen", "vllm");
        idle.slots_free = 0;
        idle.vram_free_bytes = 0;
        idle.state = -3;
        let mut same_endpoint = status("p1", "mistral", "");
        same_endpoint.endpoint = "http://10.0.0.1:8000/p1".into();
        let reported = vec![
            same_endpoint,
            idle,
            status("p1", "llama", "vllm"),
            moved,
            status("handoff", "llama", "sglang"),
            status("p0", "llama", "vllm"),
        ];
        (specs, reported)
    }

    #[test]
    fn kept_reports_read_back_as_reported() {
        let (specs, reported) = cases();
        let kept = PoolReports::new(&reported, &specs);
        assert_eq!(kept.len(), reported.len());
        assert_eq!(kept.to_proto(&specs), reported);
        let read: Vec<_> = kept.iter(&specs).collect();
        let sent: Vec<_> = reported.iter().map(PoolReading::from).collect();
        assert_eq!(read, sent);
        assert_eq!(kept.iter(&specs).len(), reported.len());
        for (i, s) in sent.iter().enumerate() {
            assert_eq!(kept.get(i, &specs).as_ref(), Some(s));
        }
        assert!(kept.get(reported.len(), &specs).is_none());
        assert!(PoolReports::default().is_empty());
        assert!(PoolReports::new(&[], &specs).to_proto(&specs).is_empty());
    }

    #[test]
    fn names_as_registered_are_not_kept_again() {
        let (specs, reported) = cases();
        let kept = PoolReports::new(&reported, &specs);
        let own: Vec<bool> = kept
            .0
            .iter()
            .map(|r| matches!(r.names, Names::Own(_)))
            .collect();
        // Another model, another endpoint, a pool not registered.
        assert_eq!(own, [false, false, true, true, true, false]);
        assert!(std::mem::size_of::<PoolReport>() <= 40);
    }

    #[test]
    fn the_encoding_is_prosts_and_decodes_to_the_reports() {
        let (specs, reported) = cases();
        let kept = PoolReports::new(&reported, &specs);
        let mut buf = Vec::new();
        kept.encode(&specs, &mut buf);
        assert_eq!(buf.len(), kept.encoded_len(&specs));
        let expected = StatusOnly {
            pool_status: reported.clone(),
        };
        assert_eq!(buf, expected.encode_to_vec());
        assert_eq!(StatusOnly::decode(buf.as_slice()).unwrap(), expected);
    }

    #[test]
    fn rebased_reports_name_the_new_specs() {
        let (specs, reported) = cases();
        let kept = PoolReports::new(&reported, &specs);
        // Registered again with the pools in another order, one gone.
        let again = PoolSpecs::from(vec![spec("p2", "qwen"), spec("p0", "llama")]);
        let moved = kept.rebased(&specs, &again);
        assert_eq!(moved.to_proto(&again), reported);
    }
}
