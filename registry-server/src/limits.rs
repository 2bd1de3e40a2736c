//! The connection caps: an accept loop that hands the server at most
//! `max_connections` live connections, and at most `per_address` from one
//! source address. A connection beyond a cap is closed at once, so a client
//! opening connections without limit cannot exhaust the server's file
//! descriptors, and one address cannot lock every other agent out.
//!
//! A new connection must also deliver its handshake's first
//! [`HANDSHAKE_BYTES`] within the deadline: the HTTP/2 preface and the
//! header of the client's SETTINGS frame (24 + 9 bytes), or as much of a TLS
//! ClientHello (which is longer). A socket that sends a few bytes and
//! stalls would otherwise hold its slot for as long as it likes.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::transport::server::{Connected, TcpConnectInfo};
use tracing::warn;

/// Bytes a new connection must deliver within the handshake deadline: the
/// HTTP/2 client preface (24) and a frame header (9). A TLS ClientHello is
/// longer, so the same count works under TLS.
pub const HANDSHAKE_BYTES: usize = 24 + 9;

/// A TCP connection holding one of the cap's permits (and its address's)
/// until it closes.
pub struct LimitedConnection {
    /// The connection itself.
    stream: TcpStream,
    /// Returned to the global cap when the connection is dropped.
    _permit: OwnedSemaphorePermit,
    /// Returned to the per-address cap when the connection is dropped.
    _address: AddressSlot,
    /// Until the handshake's first bytes arrive: when they must have. A
    /// connection that never speaks, or stalls mid-preface, would otherwise
    /// hold its permits, a task and a file descriptor, and block graceful
    /// shutdown.
    handshake_deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Handshake bytes still expected before the deadline is lifted.
    handshake_left: usize,
}

/// Connections refused because the global cap was reached.
pub static REFUSED_CONNECTIONS: AtomicU64 = AtomicU64::new(0);
/// Connections refused because their address held its share.
pub static REFUSED_PER_ADDRESS: AtomicU64 = AtomicU64::new(0);

/// Open connections per source address.
#[derive(Debug, Default)]
struct PerAddress {
    /// Count by address; an address leaves the map at zero.
    open: Mutex<HashMap<IpAddr, usize>>,
}

impl PerAddress {
    /// Counts one more connection from `ip`, unless it has `max` already.
    fn take(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<AddressSlot> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let count = open.entry(ip).or_insert(0);
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(AddressSlot {
            ip,
            counts: self.clone(),
        })
    }
}

/// One connection's place in its address's count, given back on drop.
struct AddressSlot {
    /// The connection's source address.
    ip: IpAddr,
    /// The counts it is part of.
    counts: Arc<PerAddress>,
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut open = self.counts.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = open.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// How many connections are let in, and how fast they must speak.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Open connections at most.
    pub max: usize,
    /// Open connections from one source address at most.
    pub per_address: usize,
    /// Time for a new connection's first [`HANDSHAKE_BYTES`].
    pub handshake_within: Duration,
}

/// Accepts from `listener` within `limits`.
pub fn incoming(
    listener: TcpListener,
    limits: ConnectionLimits,
) -> impl Stream<Item = LimitedConnection> {
    let permits = Arc::new(Semaphore::new(limits.max));
    let per_address = Arc::new(PerAddress::default());
    let state = (listener, permits, per_address);
    futures_util::stream::unfold(state, move |(listener, permits, per_address)| async move {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    let Ok(permit) = permits.clone().try_acquire_owned() else {
                        let refused = REFUSED_CONNECTIONS.fetch_add(1, Ordering::Relaxed);
                        // Log the first and then every 1000th, not a flood.
                        if refused.is_multiple_of(1000) {
                            warn!(%peer, max = limits.max, refused = refused + 1, "connection refused: --max-connections reached");
                        }
                        continue;
                    };
                    let Some(address) = per_address.take(peer.ip(), limits.per_address) else {
                        let refused = REFUSED_PER_ADDRESS.fetch_add(1, Ordering::Relaxed);
                        if refused.is_multiple_of(1000) {
                            warn!(%peer, max = limits.per_address, refused = refused + 1, "connection refused: --max-connections-per-address reached");
                        }
                        continue;
                    };
                    // Heartbeat acks are small and latency-bound.
                    let _ = stream.set_nodelay(true);
                    let connection = LimitedConnection {
                        stream,
                        _permit: permit,
                        _address: address,
                        handshake_deadline: Some(Box::pin(tokio::time::sleep(
                            limits.handshake_within,
                        ))),
                        handshake_left: HANDSHAKE_BYTES,
                    };
                    return Some((connection, (listener, permits, per_address)));
                }
                Err(err) => {
                    // EMFILE and friends: back off instead of spinning, and
                    // keep serving the connections already open.
                    warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    })
}

impl crate::connection_threads::Rehome for LimitedConnection {
    /// The socket moves to the calling runtime's I/O driver and the
    /// handshake deadline (the same instant) to its timer: a connection
    /// served on a connection thread is then woken by that thread alone.
    fn rehome(mut self) -> io::Result<Self> {
        self.stream = TcpStream::from_std(self.stream.into_std()?)?;
        self.handshake_deadline = self
            .handshake_deadline
            .map(|deadline| Box::pin(tokio::time::sleep_until(deadline.deadline())));
        Ok(self)
    }
}

impl Connected for LimitedConnection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for LimitedConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(deadline) = &mut this.handshake_deadline
            && deadline.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "client did not send its handshake in time",
            )));
        }
        let filled = buf.filled().len();
        let polled = Pin::new(&mut this.stream).poll_read(cx, buf);
        if this.handshake_deadline.is_some() {
            let read = buf.filled().len() - filled;
            this.handshake_left = this.handshake_left.saturating_sub(read);
            if this.handshake_left == 0 {
                this.handshake_deadline = None;
            }
        }
        polled
    }
}

impl AsyncWrite for LimitedConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}
