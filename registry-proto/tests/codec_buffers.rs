//! What a heartbeat stream's codec buffers hold, counted through tonic's own
//! `Streaming` (decode) and `EncodeBody` (encode) with the contract's codec:
//! the decode buffer holds beats of 8 GPUs with the basic figures from the
//! start and grows once, to twice its start, for a node-agent's beats with
//! every NVML figure whose lengths vary as an idle-or-busy node's do; the
//! encode buffer grows once, to 128 bytes, and then stays (see
//! `registry_proto::codec`). These are the buffers of a heartbeat stream
//! served by the generated server; registry-server's own route keeps none
//! (its `service::heartbeat_wire` tests), so here the figures stand for
//! every other streaming call and for the agent's side.
//!
//! Bytes are counted by dhat's heap profiler in testing mode. It counts the
//! whole process, so this file holds one test: the test runner then runs
//! nothing beside it.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes};
use http_body::{Body, Frame};
use prost::Message;
use registry_proto::codec::SmallBufferCodec;
use registry_proto::gpu_figures::GoodOrder;
use registry_proto::pb;
use tonic::Status;
use tonic::codec::{Codec, CompressionEncoding, EncodeBody, Streaming};

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

/// Bytes allocated and not freed yet, by the whole process.
fn live() -> isize {
    dhat::HeapStats::get().curr_bytes as isize
}

/// The `n`th heartbeat of a node-agent stream: node id, session and secret
/// in every message as node-agent sends them, 2 pools, 8 GPUs with every
/// figure the agent reads from NVML (or only the basic ones). Fields vary
/// from beat to beat as real ones do, and with them the message's length
/// (varints of 1 to 10 bytes, zero fields left out): the largest of a
/// stream's beats is what its buffer must hold.
fn heartbeat(n: u64, every_figure: bool) -> pb::HeartbeatRequest {
    // Picks one of `choices` by the beat's number, so that lengths mix.
    fn pick<T: Copy>(n: u64, salt: u64, choices: &[T]) -> T {
        choices[((n.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 17).wrapping_add(salt) as usize)
            % choices.len()]
    }
    let gpu = |index: u32| {
        let salt = u64::from(index);
        let basic = pb::GpuStats {
            index,
            memory_used_bytes: pick(n, salt, &[0, 1 << 20, 60 << 30, 79 << 30]),
            memory_free_bytes: pick(n, salt + 1, &[0, 1 << 30, 20 << 30, 80 << 30]),
            utilization_percent: pick(n, salt + 2, &[0, 7, 87, 100]),
            temperature_celsius: Some(pick(n, salt + 3, &[31, 61, 95])),
            health: pb::GpuHealth::Healthy as i32,
            ..Default::default()
        };
        if !every_figure {
            return basic;
        }
        GoodOrder {
            ecc_correctable: Some(pick(n, salt + 4, &[0, 3, 1 << 20])),
            power_draw_milliwatts: pick(n, salt + 5, &[60_000, 350_000, 699_999]),
            power_limit_milliwatts: 700_000,
        }
        .figures(basic)
    };
    let pool = |p: u64| pb::PoolStatus {
        pool_id: format!("pool-{p}"),
        state: pb::PoolState::Ready as i32,
        slots_total: 256,
        slots_free: pick(n, p, &[0, 17, 255]),
        vram_free_bytes: pick(n, p + 1, &[0, 10 << 30, 70 << 30]),
        model: "meta-llama/Llama-3.1-70B-Instruct".into(),
        engine: "vllm".into(),
        // Registered with the spec; node-agent's beats leave it empty.
        endpoint: String::new(),
    };
    pb::HeartbeatRequest {
        node_id: "gpu-node-0017.dc1.example.net".into(),
        session_id: 0x9f3c_5a71_22e8_4b10,
        // 128 bits as 32 hex digits, as the registry hands them out.
        session_secret: "5f0c9a7e31d24b8c96a1e07f3b2d4c58".into(),
        sent_at: Some(prost_types::Timestamp {
            seconds: 1_800_000_000 + n as i64 * 10,
            nanos: pick(n, 9, &[0, 7, 123_456, 999_999_999]),
        }),
        pools: (0..2).map(pool).collect(),
        gpus: (0..8).map(gpu).collect(),
        // From 1: one byte, then two, three...
        sequence: n + 1,
    }
}

/// `message` as one gRPC frame (the 5-byte prefix, then the message), in
/// memory that is never freed, so that handing it to the decoder and
/// dropping it moves no count.
fn framed(message: &impl Message) -> Bytes {
    let mut frame = Vec::with_capacity(5 + message.encoded_len());
    frame.put_u8(0);
    frame.put_u32(message.encoded_len() as u32);
    message.encode(&mut frame).expect("a Vec has room");
    Bytes::from_static(Box::leak(frame.into_boxed_slice()))
}

/// A request body whose DATA frames are handed over one per poll.
struct Frames(std::vec::IntoIter<Bytes>);

impl Body for Frames {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.next().map(|data| Ok(Frame::data(data))))
    }
}

/// Decodes every message a stream of `frames` carries, one at a time, and
/// returns what the stream holds (its decode buffer) after each, counted
/// from when the stream was opened.
fn held_after_each_message(frames: Vec<Bytes>) -> Vec<isize> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let decoder =
            SmallBufferCodec::<pb::HeartbeatResponse, pb::HeartbeatRequest>::default().decoder();
        let messages = frames.len();
        let mut stream = Streaming::new_request(decoder, Frames(frames.into_iter()), None, None);
        // Sized before counting starts, so that it adds nothing to the count.
        let mut held = Vec::with_capacity(messages);
        let opened = live();
        for _ in 0..messages {
            let message = stream.message().await.expect("decodes");
            drop(message.expect("a message"));
            held.push(live() - opened);
        }
        assert!(stream.message().await.expect("ends").is_none());
        held
    })
}

#[test]
fn a_heartbeat_streams_codec_buffers_hold_its_messages() {
    let _profiler = dhat::Profiler::builder().testing().build();
    decode_buffer_holds_basic_beats_and_doubles_once_for_a_real_agent();
    encode_buffer_settles_at_one_hundred_twenty_eight_bytes();
}

fn decode_buffer_holds_basic_beats_and_doubles_once_for_a_real_agent() {
    let start = registry_proto::codec::BUFFER_SIZE;
    // Beats of 8 GPUs with the basic figures: the buffer holds them all from
    // the start, however their lengths vary.
    let basic: Vec<_> = (0..300).map(|n| framed(&heartbeat(n, false))).collect();
    let (shortest, longest) = lengths(&basic);
    assert!(longest - shortest >= 10, "{shortest}..{longest}");
    assert!(2 * longest <= start, "{longest}-byte frames");
    let held = held_after_each_message(basic);
    assert!(held.iter().all(|&h| h == 0), "{held:?}");

    // A real agent's beats (every NVML figure, node id and secret in each,
    // zero figures left out): twice the longest fits the start, but tonic's
    // second reservation can only reuse the buffer in place while a beat is
    // at most 5 bytes longer than the one before it (bytes' rule for moving
    // unread data back), so a longer beat doubles the buffer once. Twice the start then holds
    // every later beat: it grows once and never again.
    let every: Vec<_> = (0..300).map(|n| framed(&heartbeat(n, true))).collect();
    let (shortest, longest) = lengths(&every);
    assert!(longest - shortest >= 10, "{shortest}..{longest}");
    assert!(2 * longest <= start, "{longest}-byte frames");
    let held = held_after_each_message(every);
    let grown = held
        .iter()
        .position(|&h| h != 0)
        .expect("a longer beat grew it");
    assert!(held[..grown].iter().all(|&h| h == 0), "{held:?}");
    assert!(
        held[grown..].iter().all(|&h| h == start as isize),
        "{held:?}"
    );
}

/// The shortest and the longest of `frames`.
fn lengths(frames: &[Bytes]) -> (usize, usize) {
    let lengths = frames.iter().map(Bytes::len);
    let shortest = lengths.clone().min().expect("frames");
    (shortest, lengths.max().expect("frames"))
}

/// The acks a stream's source hands the encoder, one per poll.
#[derive(Clone, Default)]
struct NextAck(Arc<Mutex<Option<pb::HeartbeatResponse>>>);

impl futures_util::Stream for NextAck {
    type Item = Result<pb::HeartbeatResponse, Status>;

    fn poll_next(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.0.lock().expect("not poisoned").take() {
            Some(ack) => Poll::Ready(Some(Ok(ack))),
            None => Poll::Pending,
        }
    }
}

fn encode_buffer_settles_at_one_hundred_twenty_eight_bytes() {
    // The `n`th ack; its sequence and timestamp vary its length by ~10 bytes.
    let ack = |n: u64| pb::HeartbeatResponse {
        sequence: 1 << (n % 41),
        server_time: Some(prost_types::Timestamp {
            seconds: 1_800_000_000 + n as i64 * 10,
            nanos: [0, 7, 123_456, 999_999_999][n as usize % 4],
        }),
        heartbeat_interval: Some(prost_types::Duration {
            seconds: 10,
            nanos: 0,
        }),
        registry: Some(pb::RegistryInstance {
            instance_id: "01JDXRZ6Q8M6Y4J1V0K2S3T4W5".into(),
            started_at: Some(prost_types::Timestamp {
                seconds: 1_799_990_000,
                nanos: 0,
            }),
        }),
        command: None,
    };
    let next = NextAck::default();
    let encoder =
        SmallBufferCodec::<pb::HeartbeatResponse, pb::HeartbeatRequest>::default().encoder();
    let no_compression: Option<CompressionEncoding> = None;
    let mut body = Box::pin(EncodeBody::new_server(
        encoder,
        next.clone(),
        no_compression,
        Default::default(),
        None,
    ));
    let mut cx = Context::from_waker(std::task::Waker::noop());
    let mut held = Vec::with_capacity(100);
    let opened = live();
    for n in 0..100 {
        // Built here, so that what it allocates is freed by the time it is
        // counted: the encoder takes it and drops it.
        let ack = ack(n);
        let size = 5 + ack.encoded_len();
        *next.0.lock().expect("not poisoned") = Some(ack);
        let Poll::Ready(Some(Ok(frame))) = body.as_mut().poll_frame(&mut cx) else {
            panic!("an ack's frame");
        };
        assert_eq!(frame.data_ref().map(Bytes::len), Some(size));
        // Written to the socket and dropped, as h2 does, before the next.
        drop(frame);
        held.push(live() - opened);
    }
    assert!(body.as_mut().poll_frame(&mut cx).is_pending());

    // The first ack longer than the start grows the buffer to 128 bytes
    // (beside the small shared handle, ~40 bytes, that lets it hand frames
    // out); after that every ack is written at the start of the same
    // buffer, and nothing more is held.
    let start = registry_proto::codec::ENCODE_BUFFER_SIZE as isize;
    let most = *held.iter().max().expect("acks");
    assert!(most + start <= 128 + 48, "{held:?}");
    let grown = held.iter().position(|&h| h == most).expect("the most");
    assert!(grown < held.len() / 2, "{held:?}");
    assert!(held[grown..].iter().all(|&h| h == most), "{held:?}");
}
