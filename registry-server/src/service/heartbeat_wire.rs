//! The Heartbeat method's gRPC framing, read and written here rather than
//! by tonic's generic streaming path.
//!
//! A heartbeat stream lives for days and carries one message of a few
//! hundred bytes every few seconds each way. tonic's streaming path gives
//! each stream a decode buffer it keeps for the stream's life, and its
//! reservation rule makes that buffer twice a message and more: 1.25 KiB
//! per stream here, 2.5 KiB once a node-agent beat of 8 GPUs with every
//! figure is longer than the one before it (docs/PERF-NOTES.md item 8
//! change 11). Beside it sit an encode buffer, tonic's `Streaming` state
//! and a boxed response body wrapping our own boxed reply stream.
//!
//! Here a beat is decoded straight from the HTTP/2 DATA frame that carried
//! it, so an open stream holds no buffer between beats: only a message
//! split across frames is gathered, in a buffer of its own length that is
//! let go once it is decoded. Each ack is encoded into a vector of its
//! exact length that h2 drops once written, and the reply stream and the
//! response body are one allocation. What a stream says and does is the
//! service's own ([`super::heartbeat`]): the same session, the same
//! statuses, the trailers tonic would send.
//!
//! [`super::RegistryRoute`] sits in front of the generated
//! `NodeRegistryServer` and hands the Heartbeat path to
//! [`NodeRegistryService::heartbeat_route`] here. The generated server's own `heartbeat` (over tonic's
//! `Streaming`) still works, for servers built without the route.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{BufMut, Bytes};
use futures_util::Stream;
use http::{HeaderMap, HeaderValue};
use http_body::{Body as _, Frame, SizeHint};
use prost::Message as _;
use registry_proto::pb;
use tonic::body::Body;
use tonic::{Code, Status, Streaming};

use super::NodeRegistryService;
use crate::budget::{HeartbeatBudget, Holding, PREFIX, announced_length};

/// Where a heartbeat stream's requests come from: tonic's `Streaming` on
/// the generated path, [`Inbound`] on the route.
pub(crate) trait Messages: Send + 'static {
    /// The next request; `None` once the agent closed its side.
    fn message(
        &mut self,
    ) -> impl Future<Output = Result<Option<pb::HeartbeatRequest>, Status>> + Send;
}

impl Messages for Streaming<pb::HeartbeatRequest> {
    fn message(
        &mut self,
    ) -> impl Future<Output = Result<Option<pb::HeartbeatRequest>, Status>> + Send {
        Streaming::message(self)
    }
}

/// A Heartbeat request body read frame by frame.
pub(crate) struct Inbound {
    /// The request body (HTTP/2 DATA frames).
    body: Body,
    /// Bytes that came after a whole message or as the start of one split
    /// across frames, until they make whole messages; empty (no
    /// allocation) otherwise. A DATA frame itself (a slice of h2's read
    /// buffer) is never kept: its first whole message is decoded where it
    /// lies and the rest is copied here, so no stream pins h2's buffer
    /// while it waits (agents send one beat per frame). It holds only
    /// bytes that arrived (tonic reserves the length a prefix announces at
    /// once), at most about twice the largest message while one is
    /// gathered. Boxed: nearly always there is none (`None`, 8 bytes in
    /// every open stream's state where a `Vec` took 24).
    #[allow(clippy::box_collection)] // deliberately: see above
    split: Option<Box<Vec<u8>>>,
    /// Largest message accepted (`--max-heartbeat-message-size`; checked
    /// here where no budget is in front, the budgets hold the same); 32 bits,
    /// as a gRPC prefix announces no more, and 8 bytes less in every open
    /// stream's state.
    max_message: u32,
    /// What `split` holds against the connection's and the server's
    /// budgets for unfinished messages (`crate::budget`: the budget layer
    /// leaves a Heartbeat request's body to the stream); `None` where no
    /// budget layer is in front (unit tests).
    budget: Option<Holding>,
}

impl Inbound {
    pub(crate) fn new(body: Body, max_message: usize, budget: Option<Holding>) -> Self {
        Self {
            body,
            split: None,
            max_message: u32::try_from(max_message).unwrap_or(u32::MAX),
            budget,
        }
    }

    /// What `split` keeps (nothing, nearly always).
    fn split(&self) -> &[u8] {
        self.split.as_deref().map_or(&[], Vec::as_slice)
    }

    /// `read`'s message, with what `split` keeps afterwards held against
    /// the budgets. Not in `message` itself: its state (part of every open
    /// stream's) would keep room for the message across its wait.
    fn held(
        &mut self,
        read: impl FnOnce(&mut Self) -> Result<Option<pb::HeartbeatRequest>, Status>,
    ) -> Result<Option<pb::HeartbeatRequest>, Status> {
        let held = read(self).and_then(|message| {
            self.hold_split()?;
            Ok(message)
        });
        if held.is_err() {
            // The stream ends with this error: nothing it kept is held on
            // until it is dropped.
            self.split = None;
            if let Some(holding) = &mut self.budget {
                holding.release();
            }
        }
        held
    }

    /// Holds what `split` now keeps against the budgets (the bytes of a
    /// message not yet whole, rarely of a whole one not yet read): more
    /// when it grew, given back when it shrank. A message that comes whole
    /// in its frame is never kept, so never counted.
    fn hold_split(&mut self) -> Result<(), Status> {
        let kept = self.split.as_deref().map_or(0, Vec::len);
        match &mut self.budget {
            Some(holding) => holding.hold_exactly(kept),
            None => Ok(()),
        }
    }

    /// The length of the message at the start of `bytes`, its prefix
    /// included, once the prefix is there; the same refusals as tonic's
    /// decoder for a compressed or oversized message.
    fn framed_len(&self, bytes: &[u8]) -> Result<Option<usize>, Status> {
        let Some(prefix) = bytes.first_chunk::<PREFIX>() else {
            return Ok(None);
        };
        match prefix[0] {
            0 => {}
            // The route refuses a grpc-encoding up front (`super::route`).
            1 => {
                return Err(Status::internal(
                    "protocol error: received message with compressed-flag but no \
                     grpc-encoding was specified",
                ));
            }
            flag => {
                return Err(Status::internal(format!(
                    "protocol error: received message with invalid compression flag: \
                     {flag} (valid flags are 0 and 1), while sending request"
                )));
            }
        }
        let len = announced_length(prefix);
        // One check per message: the budgets' (the same limit, a refusal
        // naming the flag) where a budget layer is in front, tonic's own
        // otherwise.
        match &self.budget {
            Some(holding) => holding.check_length(true, len as usize)?,
            None if len > self.max_message => {
                return Err(Status::out_of_range(format!(
                    "Error, decoded message length too large: found {len} bytes, the limit is: {} \
                     bytes",
                    self.max_message
                )));
            }
            None => {}
        }
        Ok(Some(PREFIX + len as usize))
    }

    /// The next message gathered in `split`, if one is whole.
    fn gathered(&mut self) -> Result<Option<pb::HeartbeatRequest>, Status> {
        let split = self.split();
        let Some(len) = self.framed_len(split)? else {
            return Ok(None);
        };
        if split.len() < len {
            return Ok(None);
        }
        let message = registry_proto::codec::decode_message(&split[PREFIX..len]);
        // What follows the message moves to a buffer of its own length
        // (none when nothing does), so neither a large message's room nor
        // its allocation outlives it.
        let rest = kept(&split[len..]);
        self.split = rest;
        message.map(Some)
    }

    /// A DATA frame came: its first message if it holds one whole, decoded
    /// where it lies; what is left of the frame is copied to `split`.
    fn took(&mut self, frame: Bytes) -> Result<Option<pb::HeartbeatRequest>, Status> {
        if let Some(split) = &mut self.split {
            split.extend_from_slice(&frame);
            return self.gathered();
        }
        match self.framed_len(&frame)? {
            Some(len) if frame.len() >= len => {
                // Rare (one beat per frame is the rule): a copy of what
                // follows the message.
                self.split = kept(&frame[len..]);
                registry_proto::codec::decode_message(&frame[PREFIX..len]).map(Some)
            }
            // Room for what came, not for what the prefix announced: a
            // message sent slowly pins only the bytes that arrived (what
            // the budgets count), growing as the rest comes.
            _ => {
                self.split = kept(&frame);
                Ok(None)
            }
        }
    }

    /// The body ended: cleanly unless it ended inside a message.
    fn ended(&self) -> Result<Option<pb::HeartbeatRequest>, Status> {
        if self.split().is_empty() {
            Ok(None)
        } else {
            Err(Status::internal("Unexpected EOF decoding stream."))
        }
    }
}

/// `bytes` kept in a buffer of exactly their length; none when empty.
#[allow(clippy::box_collection)] // `Inbound::split`'s type
fn kept(bytes: &[u8]) -> Option<Box<Vec<u8>>> {
    (!bytes.is_empty()).then(|| Box::new(bytes.to_vec()))
}

impl Inbound {
    /// The next message, polled: a frame is taken in whole within one
    /// poll, so dropping the wait between polls loses nothing.
    fn poll_message(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<pb::HeartbeatRequest>, Status>> {
        loop {
            if let Some(message) = self.held(Self::gathered)? {
                return Poll::Ready(Ok(Some(message)));
            }
            let read = match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => match self.held(|inbound| inbound.took(data))? {
                        Some(message) => Ok(Some(message)),
                        None => continue,
                    },
                    // Trailers end a request (agents send none).
                    Err(_) => self.ended(),
                },
                // The agent reset its stream: it is gone, as tonic reads it.
                Some(Err(status)) if status.code() == Code::Cancelled => Ok(None),
                Some(Err(status)) => Err(status),
                None => self.ended(),
            };
            return Poll::Ready(read);
        }
    }
}

impl Messages for Inbound {
    // Cancel-safe, as `select!` needs (see `poll_message`). Written out
    // rather than an `async fn`: the wait is part of every open stream's
    // state, and a closure over `self` is 8 bytes where the `async fn`
    // took 32.
    fn message(
        &mut self,
    ) -> impl Future<Output = Result<Option<pb::HeartbeatRequest>, Status>> + Send {
        std::future::poll_fn(move |cx| self.poll_message(cx))
    }
}

pin_project_lite::pin_project! {
    /// A Heartbeat response body: each reply as one gRPC message, then the
    /// status as trailers, as tonic's server writes them. `ended` is set
    /// once the trailers went out.
    pub(crate) struct AckBody<S> {
        #[pin]
        replies: S,
        ended: bool,
    }
}

impl<S> AckBody<S> {
    pub(crate) fn new(replies: S) -> Self {
        Self {
            replies,
            ended: false,
        }
    }
}

/// One reply framed for the wire, in a buffer of exactly its length.
fn framed(reply: &pb::HeartbeatResponse) -> Bytes {
    let len = reply.encoded_len();
    let mut out = Vec::with_capacity(PREFIX + len);
    out.put_u8(0);
    // A reply is a few hundred bytes at most (its command's reason is
    // bounded); the length fits the prefix.
    out.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
    reply.encode_raw(&mut out);
    Bytes::from(out)
}

/// The trailers that end a stream with `status`.
fn trailers(status: &Status) -> HeaderMap {
    let mut trailers = HeaderMap::with_capacity(3);
    if status.add_header(&mut trailers).is_err() {
        // Only a header value that cannot be written fails; say INTERNAL
        // rather than nothing.
        trailers.clear();
        trailers.insert("grpc-status", HeaderValue::from_static("13"));
    }
    trailers
}

impl<S> http_body::Body for AckBody<S>
where
    S: Stream<Item = Result<pb::HeartbeatResponse, Status>>,
{
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.project();
        if *this.ended {
            return Poll::Ready(None);
        }
        let frame = match ready!(this.replies.poll_next(cx)) {
            Some(Ok(reply)) => Frame::data(framed(&reply)),
            Some(Err(status)) => {
                *this.ended = true;
                Frame::trailers(trailers(&status))
            }
            None => {
                *this.ended = true;
                Frame::trailers(trailers(&Status::ok("")))
            }
        };
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

impl NodeRegistryService {
    /// Opens a heartbeat stream for `request`: its response headers now,
    /// its acks as the agent's beats come; or a trailers-only refusal. The
    /// route has refused a compressed stream already.
    pub(super) fn heartbeat_route(&self, request: http::Request<Body>) -> http::Response<Body> {
        let max_message = self.streams.max_message;
        let (mut parts, body) = request.into_parts();
        let budget = parts
            .extensions
            .remove::<HeartbeatBudget>()
            .map(HeartbeatBudget::holding);
        let request = tonic::Request::from_http(http::Request::from_parts(
            parts,
            Inbound::new(body, max_message, budget),
        ));
        match self.open_heartbeat(request) {
            Ok(session) => {
                let mut response = http::Response::new(Body::new(AckBody::new(
                    super::heartbeat::replies(session),
                )));
                response.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static("application/grpc"),
                );
                response
            }
            Err(status) => status.into_http(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::Arc;

    use super::*;
    use crate::budget::HEARTBEAT_PATH;
    use http_body_util::{BodyExt, StreamBody};

    /// A request body that yields `frames` in order, then ends.
    fn body(frames: Vec<Result<Frame<Bytes>, Status>>) -> Body {
        Body::new(StreamBody::new(futures_util::stream::iter(frames)))
    }

    fn beat(sequence: u64) -> pb::HeartbeatRequest {
        pb::HeartbeatRequest {
            node_id: "gpu-node-1".into(),
            session_id: 7,
            sequence,
            ..Default::default()
        }
    }

    /// `message` with its gRPC prefix.
    fn prefixed(message: &pb::HeartbeatRequest) -> Vec<u8> {
        let mut out = vec![0];
        out.extend_from_slice(&u32::try_from(message.encoded_len()).unwrap().to_be_bytes());
        message.encode(&mut out).unwrap();
        out
    }

    fn data(bytes: &[u8]) -> Result<Frame<Bytes>, Status> {
        Ok(Frame::data(Bytes::copy_from_slice(bytes)))
    }

    async fn read_all(inbound: &mut Inbound) -> Result<Vec<u64>, Status> {
        let mut sequences = Vec::new();
        while let Some(message) = inbound.message().await? {
            sequences.push(message.sequence);
            // Between beats nothing is held but the bytes that came after
            // the message.
            assert_eq!(
                inbound.split.as_ref().map_or(0, |v| v.capacity()),
                inbound.split().len()
            );
        }
        Ok(sequences)
    }

    #[tokio::test]
    async fn messages_are_read_whole_split_across_frames_and_several_to_a_frame() {
        let [one, two, three, four, five, six] = [1, 2, 3, 4, 5, 6].map(|n| prefixed(&beat(n)));
        // An empty message is five bytes of prefix: a beat of defaults.
        let empty = prefixed(&pb::HeartbeatRequest::default());
        let joined = |parts: &[&[u8]]| parts.concat();
        let frames = vec![
            // One to a frame.
            data(&one),
            // Two to a frame.
            data(&joined(&[&two, &three])),
            // One in three pieces, the first shorter than its prefix.
            data(&four[..3]),
            data(&four[3..10]),
            data(&four[10..]),
            // A whole one and the start of the next, then the rest of it
            // with an empty message.
            data(&joined(&[&five, &six[..8]])),
            data(&joined(&[&six[8..], &empty])),
        ];
        let mut inbound = Inbound::new(body(frames), 64 * 1024, None);
        assert_eq!(
            read_all(&mut inbound).await.unwrap(),
            vec![1, 2, 3, 4, 5, 6, 0]
        );
        assert_eq!(
            inbound.split.as_ref().map_or(0, |v| v.capacity()),
            0,
            "the gathering buffer let go"
        );
    }

    #[tokio::test]
    async fn a_message_gathered_from_many_frames_leaves_no_room_behind() {
        let big = pb::HeartbeatRequest {
            node_id: "n".repeat(40_000),
            sequence: 1,
            ..Default::default()
        };
        let (big, next) = (prefixed(&big), prefixed(&beat(2)));
        // The last piece carries the next beat's first bytes.
        let (pieces, last) = big.split_at(big.len() - 100);
        let mut frames: Vec<_> = pieces.chunks(1000).map(data).collect();
        frames.push(data(&[last, &next[..4]].concat()));
        let mut inbound = Inbound::new(body(frames), 64 * 1024, None);
        assert_eq!(inbound.message().await.unwrap().unwrap().sequence, 1);
        assert_eq!(inbound.split().len(), 4);
        assert_eq!(
            inbound.split.as_ref().map_or(0, |v| v.capacity()),
            4,
            "not the big message's room"
        );
    }

    #[test]
    fn a_message_announced_long_pins_only_the_bytes_that_came() {
        let mut inbound = Inbound::new(body(vec![]), 64 * 1024, None);
        let mut start = vec![0];
        start.extend_from_slice(&60_000_u32.to_be_bytes());
        start.extend_from_slice(&[0x0a; 10]);
        assert!(inbound.took(Bytes::from(start)).unwrap().is_none());
        assert_eq!(inbound.split().len(), 15);
        assert!(
            inbound.split.as_ref().map_or(0, |v| v.capacity()) < 64,
            "{}",
            inbound.split.as_ref().map_or(0, |v| v.capacity())
        );
    }

    /// The status `frames` end with when read with `max_message`, asserted
    /// to have `code` and a message containing `words`.
    async fn refusal(
        frames: Vec<Result<Frame<Bytes>, Status>>,
        max_message: usize,
        code: Code,
        words: &str,
    ) -> Status {
        let mut inbound = Inbound::new(body(frames), max_message, None);
        let err = inbound.message().await.unwrap_err();
        assert_eq!(err.code(), code, "{err:?}");
        assert!(err.message().contains(words), "{err:?}");
        err
    }

    #[tokio::test]
    async fn a_message_cut_short_a_compressed_one_and_an_oversized_one_are_refused() {
        let one = prefixed(&beat(1));
        let cut = vec![data(&one[..one.len() - 1])];
        refusal(cut, 64 * 1024, Code::Internal, "Unexpected EOF").await;

        for (flag, words) in [(1, "compressed-flag"), (2, "invalid compression flag: 2")] {
            let mut flagged = one.clone();
            flagged[0] = flag;
            refusal(vec![data(&flagged)], 64 * 1024, Code::Internal, words).await;
        }

        // Refused as soon as the prefix is whole, before its payload came.
        let frames = vec![data(&one[..2]), data(&one[2..5])];
        refusal(frames, 8, Code::OutOfRange, "the limit is: 8 bytes").await;
    }

    #[tokio::test]
    async fn a_malformed_beat_is_invalid_argument_and_a_reset_ends_the_stream_quietly() {
        // Field 1 (node_id) as a string of invalid UTF-8.
        let malformed = [0, 0, 0, 0, 3, 0x0a, 1, 0xff];
        let frames = vec![data(&malformed)];
        let words = "malformed HeartbeatRequest: ";
        let err = refusal(frames, 64 * 1024, Code::InvalidArgument, words).await;
        assert!(err.message().starts_with(words), "{err:?}");

        let one = prefixed(&beat(1));
        let frames = vec![data(&one), Err(Status::cancelled("reset by the agent"))];
        let mut inbound = Inbound::new(body(frames), 64 * 1024, None);
        assert_eq!(read_all(&mut inbound).await.unwrap(), vec![1]);

        // Trailers end the stream like its end; any other body error ends
        // it with that error.
        let frames = vec![data(&one), Ok(Frame::trailers(HeaderMap::new()))];
        let mut inbound = Inbound::new(body(frames), 64 * 1024, None);
        assert_eq!(read_all(&mut inbound).await.unwrap(), vec![1]);
        let frames = vec![data(&one), Err(Status::unknown("h2 protocol error"))];
        let mut inbound = Inbound::new(body(frames), 64 * 1024, None);
        assert_eq!(inbound.message().await.unwrap().unwrap().sequence, 1);
        assert_eq!(inbound.message().await.unwrap_err().code(), Code::Unknown);
    }

    /// Budgets of 1,000 bytes per connection for unfinished messages.
    fn small_budgets() -> Arc<crate::budget::Budgets> {
        crate::budget::Budgets::new(crate::budget::BudgetLimits {
            max_message: 64 * 1024,
            max_heartbeat_message: 64 * 1024,
            per_connection: 1000,
            global: 2000,
        })
    }

    #[tokio::test]
    async fn a_message_split_across_frames_is_held_against_the_budgets_until_whole() {
        let budgets = small_budgets();
        let holding = || Some(HeartbeatBudget::of(&budgets, None).holding());
        // Beats of ~700 bytes, each whole in its frame: nothing is held,
        // however many come.
        let big = |sequence| pb::HeartbeatRequest {
            node_id: "n".repeat(700),
            sequence,
            ..Default::default()
        };
        let frames = (1..=3).map(|n| data(&prefixed(&big(n)))).collect();
        let mut inbound = Inbound::new(body(frames), 64 * 1024, holding());
        assert_eq!(read_all(&mut inbound).await.unwrap(), vec![1, 2, 3]);
        assert_eq!(budgets.held(), 0);

        // One split in two: its first part is held until the rest comes.
        let one = prefixed(&big(4));
        let frames = vec![data(&one[..300]), data(&one[300..])];
        let mut inbound = Inbound::new(body(frames), 64 * 1024, holding());
        assert_eq!(inbound.message().await.unwrap().unwrap().sequence, 4);
        assert_eq!(budgets.held(), 0, "given back once whole");

        // One split in three whose first two parts exceed the connection's
        // budget: refused, naming it, and nothing stays held.
        let huge = prefixed(&pb::HeartbeatRequest {
            node_id: "n".repeat(1500),
            ..Default::default()
        });
        let frames = vec![
            data(&huge[..600]),
            data(&huge[600..1200]),
            data(&huge[1200..]),
        ];
        let mut inbound = Inbound::new(body(frames), 64 * 1024, holding());
        let err = inbound.message().await.unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted);
        assert!(
            err.message()
                .contains("--max-buffered-bytes-per-connection"),
            "{}",
            err.message()
        );
        assert_eq!(budgets.held(), 0, "given back at the refusal");
        assert_eq!(
            inbound.split.as_ref().map_or(0, |v| v.capacity()),
            0,
            "and let go"
        );
    }

    #[tokio::test]
    async fn while_a_message_is_split_its_first_part_is_held() {
        use futures_util::FutureExt as _;

        let budgets = small_budgets();
        let holding = Some(HeartbeatBudget::of(&budgets, None).holding());
        let (frames, received) = tokio::sync::mpsc::unbounded_channel();
        let body = Body::new(StreamBody::new(
            tokio_stream::wrappers::UnboundedReceiverStream::new(received),
        ));
        let mut inbound = Inbound::new(body, 64 * 1024, holding);
        let one = prefixed(&pb::HeartbeatRequest {
            node_id: "n".repeat(700),
            sequence: 1,
            ..Default::default()
        });
        frames.send(data(&one[..300])).unwrap();
        assert!(inbound.message().now_or_never().is_none(), "not whole yet");
        assert_eq!(budgets.held(), 300, "its first part is held");
        frames.send(data(&one[300..])).unwrap();
        let message = inbound.message().now_or_never().unwrap().unwrap().unwrap();
        assert_eq!(message.sequence, 1);
        assert_eq!(budgets.held(), 0, "given back once whole");
    }

    #[tokio::test]
    async fn a_heartbeat_longer_than_its_limit_is_refused_naming_the_flag() {
        let budgets = crate::budget::Budgets::new(crate::budget::BudgetLimits {
            max_message: 64 * 1024,
            max_heartbeat_message: 100,
            per_connection: 1000,
            global: 2000,
        });
        let holding = Some(HeartbeatBudget::of(&budgets, None).holding());
        let long = prefixed(&pb::HeartbeatRequest {
            node_id: "n".repeat(200),
            ..Default::default()
        });
        let mut inbound = Inbound::new(body(vec![data(&long[..20])]), 100, holding);
        let err = inbound.message().await.unwrap_err();
        assert_eq!(err.code(), Code::OutOfRange);
        assert!(
            err.message().contains("--max-heartbeat-message-size"),
            "{}",
            err.message()
        );
        assert_eq!(budgets.held(), 0, "refused at its prefix, nothing held");
    }

    /// A service over a registry that holds node `n1`, and its session.
    fn service_with_n1() -> (NodeRegistryService, crate::registry::Registered) {
        use crate::registry::{Now, Registry};

        let settings = crate::config::Settings::default();
        let registry = Registry::new(settings.timing());
        let registered = registry
            .register(crate::registry::tests::registration("n1"), Now::read())
            .unwrap();
        let service = NodeRegistryService::new(
            registry,
            &settings,
            crate::auth::Authenticator::open(),
            tokio_util::sync::CancellationToken::new(),
            crate::placement::PlacementIndex::new(),
        );
        (service, registered)
    }

    /// Every open stream holds its response body, boxed, for as long as
    /// the agent stays: 100k streams are 100k of these. Kept within the
    /// allocator's 320-byte size class (448 before the stream's rarely used
    /// parts were boxed and its signal wait written out, 384 before its
    /// term was shared, its gathering buffer boxed and its waits for a
    /// message and for the first message's deadline written out).
    #[tokio::test]
    async fn an_open_streams_state_fits_the_320_byte_class() {
        let (service, _registered) = service_with_n1();
        let request = tonic::Request::new(Inbound::new(Body::empty(), 1024, None));
        let session = service.open_heartbeat(request).unwrap();
        let body = AckBody::new(super::super::heartbeat::replies(session));
        let size = std::mem::size_of_val(&body);
        assert!(size <= 320, "a stream's state is {size} bytes");
    }

    /// Beat `sequence` of `n1`'s session, as an agent sends it.
    fn beat_of(registered: &crate::registry::Registered, sequence: u64) -> pb::HeartbeatRequest {
        pb::HeartbeatRequest {
            node_id: "n1".into(),
            session_id: registered.session_id,
            session_secret: registered.session_secret.to_string(),
            sequence,
            sent_at: Some(registry_proto::convert::to_proto_timestamp(
                chrono::Utc::now(),
            )),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn the_route_serves_heartbeat_itself_and_hands_every_other_path_on() {
        use tower::ServiceExt as _;

        let (service, registered) = service_with_n1();
        let generated = tower::service_fn(|_request: http::Request<Body>| async {
            let mut response = http::Response::new(Body::empty());
            let served_by = HeaderValue::from_static("generated");
            response.headers_mut().insert("x-served-by", served_by);
            Ok::<_, Infallible>(response)
        });
        let route = super::super::RegistryRoute::new(generated, service);
        let request = |path: &str, frames| {
            http::Request::builder()
                .uri(format!("http://registry{path}"))
                .body(body(frames))
                .unwrap()
        };

        let other = request("/registry.v1.NodeRegistry/GetNode", vec![]);
        let response = route.clone().oneshot(other).await.unwrap();
        assert_eq!(response.headers()["x-served-by"], "generated");

        let beat = beat_of(&registered, 1);
        let stream = request(HEARTBEAT_PATH, vec![data(&prefixed(&beat))]);
        let response = route.clone().oneshot(stream).await.unwrap();
        assert!(response.headers().get("x-served-by").is_none());
        assert_eq!(response.headers()["content-type"], "application/grpc");
        let mut acks = response.into_body();
        let ack = acks.frame().await.unwrap().unwrap().into_data().unwrap();
        let ack = pb::HeartbeatResponse::decode(&ack[PREFIX..]).unwrap();
        assert_eq!(ack.sequence, 1);
        // The agent closed its side: the stream ends OK.
        let trailers = acks
            .frame()
            .await
            .unwrap()
            .unwrap()
            .into_trailers()
            .unwrap();
        assert_eq!(trailers["grpc-status"], "0");

        let mut compressed = request(HEARTBEAT_PATH, vec![]);
        let gzip = HeaderValue::from_static("gzip");
        compressed.headers_mut().insert("grpc-encoding", gzip);
        let response = route.oneshot(compressed).await.unwrap();
        assert_eq!(response.headers()["grpc-status"], "12", "UNIMPLEMENTED");
        assert_eq!(response.headers()["grpc-accept-encoding"], "identity");
    }

    /// A server on 127.0.0.1:0 with the service behind the route or (for
    /// `routed` false) behind the generated server alone; a client of it
    /// and the session of a registered node `n1`.
    async fn serve(
        routed: bool,
    ) -> (
        pb::node_registry_client::NodeRegistryClient<tonic::transport::Channel>,
        crate::registry::Registered,
    ) {
        use pb::node_registry_server::NodeRegistryServer;

        let (service, registered) = service_with_n1();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let generated = NodeRegistryServer::new(service.clone());
        let router = if routed {
            tonic::transport::Server::builder()
                .add_service(super::super::RegistryRoute::new(generated, service))
        } else {
            tonic::transport::Server::builder().add_service(generated)
        };
        tokio::spawn(router.serve_with_incoming(incoming));
        let client = pb::node_registry_client::NodeRegistryClient::connect(url)
            .await
            .unwrap();
        (client, registered)
    }

    #[tokio::test]
    async fn the_route_and_the_generated_server_answer_a_stream_alike() {
        let mut answers = Vec::new();
        for routed in [true, false] {
            let (mut client, registered) = serve(routed).await;
            let beat = |sequence| beat_of(&registered, sequence);
            // Two beats acked, then one that may not switch sessions.
            let mut wrong = beat(3);
            wrong.session_id += 1;
            let beats = futures_util::stream::iter([beat(1), beat(2), wrong]);
            let mut acks = client.heartbeat(beats).await.unwrap().into_inner();
            let mut answer = Vec::new();
            loop {
                match acks.message().await {
                    Ok(Some(ack)) => answer.push(format!("ack {}", ack.sequence)),
                    Ok(None) => break,
                    Err(status) => {
                        // Each server chose its own session id.
                        let message = status
                            .message()
                            .replace(&registered.session_id.to_string(), "SESSION");
                        answer.push(format!("{:?}: {message}", status.code()));
                        break;
                    }
                }
            }
            answers.push(answer);
        }
        assert_eq!(answers[0].len(), 3, "{:?}", answers[0]);
        assert_eq!(answers[0][..2], ["ack 1", "ack 2"]);
        assert!(
            answers[0][2].starts_with("InvalidArgument: "),
            "{:?}",
            answers[0]
        );
        assert_eq!(answers[0], answers[1], "route, then the generated server");
    }

    #[tokio::test]
    async fn replies_go_out_framed_and_the_status_as_trailers() {
        let reply = pb::HeartbeatResponse {
            sequence: 3,
            ..Default::default()
        };
        let replies = futures_util::stream::iter(vec![
            Ok(reply.clone()),
            Err(Status::failed_precondition("a newer stream took over")),
        ]);
        let mut body = std::pin::pin!(AckBody::new(replies));
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        let mut expected = vec![0];
        expected.extend_from_slice(&u32::try_from(reply.encoded_len()).unwrap().to_be_bytes());
        reply.encode(&mut expected).unwrap();
        assert_eq!(first.as_ref(), expected.as_slice());
        let trailers = body
            .frame()
            .await
            .unwrap()
            .unwrap()
            .into_trailers()
            .unwrap();
        assert_eq!(trailers["grpc-status"], "9");
        assert_eq!(trailers["grpc-message"], "a%20newer%20stream%20took%20over");
        assert!(body.is_end_stream());
        assert!(body.frame().await.is_none());

        let mut clean = std::pin::pin!(AckBody::new(futures_util::stream::empty::<
            Result<pb::HeartbeatResponse, Status>,
        >()));
        let trailers = clean
            .frame()
            .await
            .unwrap()
            .unwrap()
            .into_trailers()
            .unwrap();
        assert_eq!(trailers["grpc-status"], "0");
    }
}
