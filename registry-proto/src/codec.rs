//! The protobuf codec of every generated stub: prost, with per-call buffers
//! that start at 1.25 KiB (decode) and 256 bytes (encode) instead of
//! tonic's 8 KiB.
//!
//! A heartbeat stream lives for days and carries messages of a few hundred
//! bytes, yet the default codec gives each stream an 8 KiB decode buffer and
//! an 8 KiB encode buffer: about 1.5 GiB at 100,000 open streams. Buffers
//! still grow on demand for a large message (a ListNodes page).
//!
//! The encode buffer starts smaller than the decode buffer: what a
//! heartbeat stream sends is its acks (~80 bytes each), and tonic cycles
//! through the whole buffer before it reuses it from the start, so every
//! byte of it ends up resident for as long as the stream lives.
//!
//! The decode buffer must hold twice a message: tonic reserves a message's
//! length again once its 5-byte prefix is read, with the whole message
//! already in the buffer, and grows the buffer to twice its size when that
//! does not fit. 1.25 KiB holds heartbeats up to 637 bytes: 8 GPUs with
//! every figure node-agent reads from NVML and 2 pools are ~530-560 bytes
//! (they grew a 1 KiB buffer to 2 KiB), 8 GPUs with the basic figures ~300.
//!
//! A request that is not valid protobuf (bad UTF-8 in a string field, a
//! truncated field) is the caller's mistake: the server answers
//! INVALID_ARGUMENT naming the message ("malformed RegisterRequest: ..."),
//! not tonic's INTERNAL. Only request messages (`*Request`, decoded by the
//! server) are mapped; a client that cannot decode a response keeps
//! INTERNAL, since there the fault is not the caller's.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::{Code, Status};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// Starting size of each call's decode buffer: twice a heartbeat of 8 GPUs
/// with every NVML figure, and the message prefix (see the module docs).
pub const BUFFER_SIZE: usize = 1280;
/// Starting size of each call's encode buffer: a few acks.
pub const ENCODE_BUFFER_SIZE: usize = 256;
/// Encoded bytes after which a long-running encode yields (tonic's default).
const YIELD_THRESHOLD: usize = 32 * 1024;

/// Prost encoding with small starting buffers; see the module docs.
#[derive(Debug, Clone, Copy)]
pub struct SmallBufferCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SmallBufferCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

fn settings(buffer_size: usize) -> BufferSettings {
    BufferSettings::new(buffer_size, YIELD_THRESHOLD)
}

impl<T, U> Codec for SmallBufferCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ContractDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(settings(ENCODE_BUFFER_SIZE))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ContractDecoder(ProstDecoder::new(settings(BUFFER_SIZE)))
    }
}

/// Prost decoding that answers a malformed request with INVALID_ARGUMENT.
#[derive(Debug)]
pub struct ContractDecoder<U>(ProstDecoder<U>);

impl<U: prost::Message + Default> Decoder for ContractDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf).map_err(|status| {
            let name = message_name::<U>();
            if status.code() == Code::Internal && name.ends_with("Request") {
                Status::invalid_argument(format!("malformed {name}: {}", status.message()))
            } else {
                status
            }
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}

/// The message's own name ("RegisterRequest") from its Rust type path.
fn message_name<U>() -> &'static str {
    let path = std::any::type_name::<U>();
    path.rsplit("::").next().unwrap_or(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A heartbeat of 2 pools and `gpus` GPUs, with every figure the agent
    /// reads from NVML set or only the basic ones.
    fn heartbeat(gpus: u32, every_figure: bool) -> crate::pb::HeartbeatRequest {
        use crate::pb;
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
            crate::gpu_figures::GoodOrder {
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
            gpus: (0..gpus).map(gpu).collect(),
            sent_at: Some(prost_types::Timestamp {
                seconds: 1_800_000_000,
                nanos: 123_456_789,
            }),
            sequence: 1 << 40,
            ..Default::default()
        }
    }

    #[test]
    fn the_decode_buffer_holds_twice_a_heartbeat_of_eight_gpus() {
        use prost::Message;
        // What the buffer must hold without growing: the prefix and the
        // message, and tonic's reservation of the message's length again.
        let needed = |beat: crate::pb::HeartbeatRequest| 5 + 2 * beat.encoded_len();
        let every = needed(heartbeat(8, true));
        assert!(every <= BUFFER_SIZE, "{every}");
        // Room for ~50 bytes more of health reasons or XIDs before it grows.
        assert!((BUFFER_SIZE - every) / 2 >= 50, "{every}");
        assert!(needed(heartbeat(8, false)) <= BUFFER_SIZE);
    }

    #[test]
    fn message_names_are_the_last_path_segment() {
        assert_eq!(
            message_name::<crate::pb::RegisterRequest>(),
            "RegisterRequest"
        );
        assert_eq!(message_name::<crate::pb::Node>(), "Node");
    }
}
