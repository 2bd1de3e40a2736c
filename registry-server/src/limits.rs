//! The connection cap: an accept loop that hands tonic at most
//! `max_connections` live connections. A connection beyond the cap is closed
//! at once, so a client opening connections without limit cannot exhaust
//! the server's file descriptors while registered nodes keep theirs.

use std::future::Future;
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
    /// Until the client's first bytes arrive: when they must have arrived.
    /// A connection that never speaks would otherwise hold its permit, a
    /// task and a file descriptor forever, and block graceful shutdown.
    first_bytes_deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// Connections refused because the cap was reached (for logs and tests).
pub static REFUSED_CONNECTIONS: AtomicU64 = AtomicU64::new(0);

/// Accepts from `listener`, at most `max` connections open at once.
/// Each connection must send its first bytes within `first_bytes_within`.
pub fn incoming(
    listener: TcpListener,
    max: usize,
    first_bytes_within: Duration,
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
                            first_bytes_deadline: Some(Box::pin(tokio::time::sleep(
                                first_bytes_within,
                            ))),
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
        let this = &mut *self;
        if let Some(deadline) = &mut this.first_bytes_deadline
            && deadline.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "client sent nothing in time",
            )));
        }
        let filled = buf.filled().len();
        let polled = Pin::new(&mut this.stream).poll_read(cx, buf);
        if buf.filled().len() > filled {
            this.first_bytes_deadline = None;
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
