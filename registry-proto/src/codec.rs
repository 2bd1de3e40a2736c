//! The protobuf codec of every generated stub: prost, with per-call buffers
//! that start at 1.25 KiB (decode) and 64 bytes (encode) instead of tonic's
//! 8 KiB.
//!
//! A heartbeat stream lives for days and carries messages of a few hundred
//! bytes, yet the default codec gives each stream an 8 KiB decode buffer and
//! an 8 KiB encode buffer: about 1.5 GiB at 100,000 open streams. A buffer
//! keeps the size it grew to for as long as its call lives. Buffers still
//! grow on demand for a large message (a ListNodes page).
//!
//! The registry's own Heartbeat streams no longer go through this codec on
//! the server: registry-server reads and writes that method's framing
//! itself (`service/heartbeat_wire.rs`) and keeps no buffer per stream
//! between beats. What follows holds for every other call, for servers
//! built without that route, and for the agent's side of a stream (its
//! decode buffer holds the registry's ~85-byte acks).
//!
//! - **Decode: 1.25 KiB.** tonic reserves a message's length again once
//!   its 5-byte prefix is read, with the whole message already in the
//!   buffer, so the buffer must hold twice a message and its prefix or it
//!   grows, by doubling its whole size. And it can only move unread bytes
//!   back to its start (instead of growing) while a message is at most 5
//!   bytes longer than the one before it (`bytes`' rule). 1.25 KiB holds
//!   beats of 8 GPUs with the basic figures (~360-370 bytes framed) however
//!   their lengths vary. A node-agent beat of 8 GPUs with every NVML
//!   figure, its node id and session secret (~600-610 bytes) fits it too,
//!   but the first beat more than 5 bytes longer than the one before (a
//!   GPU going idle or busy: a zero figure is left out of the message)
//!   doubles the buffer to 2.5 KiB, where it stays (`tests/codec_buffers.rs`
//!   counts both). Beats that vary less never grow it. Starting smaller was
//!   tried: buffers sized by a stream's first message double on the first
//!   longer beat as well, and end larger (docs/PERF-NOTES.md item 8 change
//!   11).
//! - **Encode: starts below an ack, settles at 128 bytes.** What a
//!   heartbeat stream sends is its acks (~85 bytes each), and tonic cycles
//!   through the whole buffer before it reuses it from the start, so every
//!   byte of it ends up resident for as long as the stream lives. From 64
//!   bytes the first ack grows it to 128, where every later ack is written
//!   from the start again (an ack is handed out as its own `Bytes` and h2
//!   copies small frames into its write buffer and drops them, so the
//!   buffer is unshared by the next ack); 256 bytes before. Not 0: tonic
//!   divides by the size where it compresses.
//!
//! `tests/codec_buffers.rs` counts what a stream's buffers hold after each
//! message through tonic's own `Streaming` and `EncodeBody`.
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

/// Starting size of each call's decode buffer: twice a node-agent heartbeat
/// of 8 GPUs with every NVML figure and its prefix (a longer beat still
/// doubles it once, see the module docs).
pub const BUFFER_SIZE: usize = 1280;
/// Starting size of each call's encode buffer: less than an ack.
pub const ENCODE_BUFFER_SIZE: usize = 64;
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
        self.0.decode(buf).map_err(malformed::<U>)
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}

/// Decodes one whole message the way [`ContractDecoder`] does, for a
/// server that reads a method's gRPC frames itself (the registry's
/// Heartbeat streams): the same INVALID_ARGUMENT for a malformed request.
pub fn decode_message<U: prost::Message + Default>(bytes: &[u8]) -> Result<U, Status> {
    // tonic-prost's own words for a decode error, INTERNAL, then the rule.
    U::decode(bytes).map_err(|err| malformed::<U>(Status::internal(err.to_string())))
}

/// A request message that failed to decode is the caller's fault:
/// INVALID_ARGUMENT naming the message; anything else stays as it is.
fn malformed<U>(status: Status) -> Status {
    let name = message_name::<U>();
    if status.code() == Code::Internal && name.ends_with("Request") {
        Status::invalid_argument(format!("malformed {name}: {}", status.message()))
    } else {
        status
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

    #[test]
    fn message_names_are_the_last_path_segment() {
        assert_eq!(
            message_name::<crate::pb::RegisterRequest>(),
            "RegisterRequest"
        );
        assert_eq!(message_name::<crate::pb::Node>(), "Node");
    }
}
