//! The protobuf codec of every generated stub: prost, with per-call buffers
//! that start at 1 KiB instead of tonic's 8 KiB.
//!
//! A heartbeat stream lives for days and carries messages of a few hundred
//! bytes, yet the default codec gives each stream an 8 KiB decode buffer and
//! an 8 KiB encode buffer: about 1.5 GiB at 100,000 open streams. Buffers
//! still grow on demand for a large message (a ListNodes page).

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// Starting size of each call's encode and decode buffer.
pub const BUFFER_SIZE: usize = 1024;
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

fn settings() -> BufferSettings {
    BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD)
}

impl<T, U> Codec for SmallBufferCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(settings())
    }
}
