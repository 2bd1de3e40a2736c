//! What a heartbeat stream's codec buffers hold, counted through tonic's own
//! `Streaming` (decode) and `EncodeBody` (encode) with the contract's codec:
//! each buffer grows to the stream's messages once and then stays (see
//! `registry_proto::codec`).
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

/// A heartbeat of 2 pools and 8 GPUs, with every figure node-agent reads
/// from NVML set or only the basic ones.
fn heartbeat(every_figure: bool) -> pb::HeartbeatRequest {
    let gpu = |index| {
        let basic = pb::GpuStats {
            index,
            memory_used_bytes: 60 << 30,
            memory_free_bytes: 20 << 30,
            utilization_percent: 87,
            temperature_celsius: Some(61),
            health: pb::GpuHealth::Healthy as i32,
            ..Default::default()
        };
        if !every_figure {
            return basic;
        }
        GoodOrder {
            ecc_correctable: Some(3),
            power_draw_milliwatts: 350_000,
            power_limit_milliwatts: 700_000,
        }
        .figures(basic)
    };
    let pool = |p| pb::PoolStatus {
        pool_id: format!("pool-{p}"),
        state: pb::PoolState::Ready as i32,
        slots_total: 32,
        slots_free: 17,
        vram_free_bytes: 10 << 30,
        model: "meta-llama/Llama-3.1-70B-Instruct".into(),
        engine: "vllm".into(),
        endpoint: String::new(),
    };
    pb::HeartbeatRequest {
        pools: (0..2).map(pool).collect(),
        gpus: (0..8).map(gpu).collect(),
        sent_at: Some(prost_types::Timestamp {
            seconds: 1_800_000_000,
            nanos: 123_456_789,
        }),
        sequence: 1 << 40,
        ..Default::default()
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
fn a_heartbeat_streams_codec_buffers_grow_to_its_messages_once() {
    let _profiler = dhat::Profiler::builder().testing().build();
    decode_buffer_grows_to_twice_the_beat();
    encode_buffer_stays_below_two_hundred_fifty_six_bytes();
}

fn decode_buffer_grows_to_twice_the_beat() {
    let basic = framed(&heartbeat(false));
    let every = framed(&heartbeat(true));
    let start = registry_proto::codec::BUFFER_SIZE as isize;
    assert!(start < basic.len() as isize, "{}", basic.len());

    let mut frames = vec![basic.clone(); 50];
    frames.extend(vec![every.clone(); 50]);
    let held = held_after_each_message(frames);

    // The first beat sizes the buffer: it grows from its start to twice the
    // framed message (tonic reserves the message's length once more after
    // the prefix), and later beats of that size fit.
    let first = held[0] + start;
    assert!(
        first <= 2 * basic.len() as isize,
        "{first} bytes for a {}-byte frame",
        basic.len()
    );
    assert!(held[..50].iter().all(|&h| h == held[0]), "{held:?}");
    // Half the 1.25 KiB every stream started with before.
    assert!(first <= 1280 / 2 + 40, "{first}");

    // Larger beats grow it once more, by Vec's doubling at most.
    let second = held[50] + start;
    assert!(second > first, "{held:?}");
    assert!(
        second <= (2 * every.len() as isize).max(2 * first),
        "{second} bytes for a {}-byte frame",
        every.len()
    );
    assert!(held[50..].iter().all(|&h| h == held[50]), "{held:?}");
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

fn encode_buffer_stays_below_two_hundred_fifty_six_bytes() {
    let ack = |sequence| pb::HeartbeatResponse {
        sequence,
        server_time: Some(prost_types::Timestamp {
            seconds: 1_800_000_000,
            nanos: 987_654_321,
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
    for sequence in 0..100 {
        // Built here, so that what it allocates is freed by the time it is
        // counted: the encoder takes it and drops it.
        let ack = ack(1 << 40 | sequence);
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

    // The first ack grows the buffer from its start to a power of two past
    // the ack (with the shared handle that lets it hand frames out); after
    // that every ack is written at the start of the same buffer.
    let start = registry_proto::codec::ENCODE_BUFFER_SIZE as isize;
    assert!(held[0] + start < 256, "{held:?}");
    assert!(held.iter().all(|&h| h == held[0]), "{held:?}");
}
