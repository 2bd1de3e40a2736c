//! The protobuf codec of every generated stub: prost, with per-call buffers
//! that start at 64 bytes and grow to the call's messages, instead of
//! tonic's 8 KiB.
//!
//! A heartbeat stream lives for days and carries messages of a few hundred
//! bytes, yet the default codec gives each stream an 8 KiB decode buffer and
//! an 8 KiB encode buffer: about 1.5 GiB at 100,000 open streams. A buffer
//! keeps the size it grew to for as long as its call lives, so where it
//! starts small each stream holds what its own messages need and no more:
//!
//! - **Decode**: tonic reserves a message's length again once its 5-byte
//!   prefix is read, with the whole message already in the buffer, so the
//!   buffer grows once, on the first message, to twice that message with its
//!   prefix: ~610 bytes for a beat of 8 GPUs with the basic figures, ~1.1 KiB
//!   for 8 GPUs with every figure node-agent reads from NVML (~530 bytes).
//!   A fixed start (1.25 KiB before) had to be sized for the largest beat
//!   expected and cost that much on every stream; a larger message later
//!   grows the buffer the same way (a ListNodes page, a beat with new health
//!   reasons).
//! - **Encode**: what a heartbeat stream sends is its acks (~80 bytes each);
//!   tonic cycles through the whole buffer before it reuses it from the
//!   start, so every byte of it ends up resident for as long as the stream
//!   lives. Starting at 64 bytes it settles at 128 for acks (256 before).
//!
//! Not 0: tonic also uses the size as the growth step of its decompression
//! buffers, and divides by it there.
//!
//! `tests/codec_buffers.rs` counts what a stream's decoder holds after each
//! message through tonic's own `Streaming`.
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

/// Starting size of each call's decode buffer: less than any message, so
/// the first one sizes it (see the module docs).
pub const BUFFER_SIZE: usize = 64;
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

    #[test]
    fn message_names_are_the_last_path_segment() {
        assert_eq!(
            message_name::<crate::pb::RegisterRequest>(),
            "RegisterRequest"
        );
        assert_eq!(message_name::<crate::pb::Node>(), "Node");
    }
}
