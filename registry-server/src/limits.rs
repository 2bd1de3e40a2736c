//! The connection cap: an accept loop that hands tonic at most
//! `max_connections` live connections. A connection beyond the cap is closed
//! at once, so a client opening connections without limit cannot exhaust
//! the server's file descriptors while registered nodes keep theirs.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::transport::server::{Connected, TcpConnectInfo};
use tracing::warn;

/// A TCP connection holding one of the cap's permits until it closes.
pub struct LimitedConnection {
    /// The connection itself.
    stream: TcpStream,
    /// Returned to the cap when the connection is dropped.
    _permit: OwnedSemaphorePermit,
}

/// Connections refused because the cap was reached (for logs and tests).
pub static REFUSED_CONNECTIONS: AtomicU64 = AtomicU64::new(0);

/// Accepts from `listener`, at most `max` connections open at once.
pub fn incoming(
    listener: TcpListener,
    max: usize,
) -> impl Stream<Item = io::Result<LimitedConnection>> {
    let permits = Arc::new(Semaphore::new(max));
    futures_util::stream::unfold((listener, permits), move |(listener, permits)| async move {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => match permits.clone().try_acquire_owned() {
                    Ok(permit) => {
                        // Heartbeat acks are small and latency-bound.
                        let _ = stream.set_nodelay(true);
                        let connection = LimitedConnection {
                            stream,
                            _permit: permit,
                        };
                        return Some((Ok(connection), (listener, permits)));
                    }
                    Err(_) => {
                        let refused = REFUSED_CONNECTIONS.fetch_add(1, Ordering::Relaxed);
                        // Log the first and then every 1000th, not a flood.
                        if refused.is_multiple_of(1000) {
                            warn!(%peer, max, refused = refused + 1, "connection refused: --max-connections reached");
                        }
                    }
                },
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
        Pin::new(&mut self.stream).poll_read(cx, buf)
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
