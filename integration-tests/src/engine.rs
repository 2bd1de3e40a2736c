//! A stand-in for an inference engine's HTTP health endpoint, so a test can
//! switch a pool between READY and not READY while its agent runs.
//!
//! The agent probes a pool's `probe=URL` at every beat: 200 is READY, 503
//! is INITIALIZING (docs/node-agent.md, "Pool status"). `/slots` answers
//! 404, so the agent reports the configured slots.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::error::HarnessError;

/// How often the accept loop looks for a stop request.
const ACCEPT_PAUSE: Duration = Duration::from_millis(5);

/// A loopback HTTP server answering `GET /health` with 200 while ready and
/// 503 while not; stopped when dropped.
#[derive(Debug)]
pub struct FakeEngine {
    addr: SocketAddr,
    ready: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeEngine {
    /// Starts a ready engine on `127.0.0.1:0`.
    pub fn start() -> Result<Self, HarnessError> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .map_err(|err| HarnessError::io("binding a fake engine", err))?;
        let addr = listener
            .local_addr()
            .map_err(|err| HarnessError::io("reading a fake engine's address", err))?;
        listener
            .set_nonblocking(true)
            .map_err(|err| HarnessError::io("configuring a fake engine", err))?;
        let ready = Arc::new(AtomicBool::new(true));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (ready, stop) = (Arc::clone(&ready), Arc::clone(&stop));
            std::thread::spawn(move || serve(&listener, &ready, &stop))
        };
        Ok(Self {
            addr,
            ready,
            stop,
            thread: Some(thread),
        })
    }

    /// `http://127.0.0.1:PORT`, the pool's endpoint.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `http://127.0.0.1:PORT/health`, the pool's probe URL.
    pub fn health_url(&self) -> String {
        format!("{}/health", self.url())
    }

    /// Makes `/health` answer 200 (`true`) or 503 (`false`) from the next
    /// request on.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }
}

impl Drop for FakeEngine {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve(listener: &TcpListener, ready: &AtomicBool, stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => answer(stream, ready),
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(ACCEPT_PAUSE);
            }
            Err(_) => std::thread::sleep(ACCEPT_PAUSE),
        }
    }
}

/// Answers one request and closes the connection (the agent's client
/// opens a new one for the next probe).
fn answer(mut stream: TcpStream, ready: &AtomicBool) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }
    let line = String::from_utf8_lossy(&request);
    let status = if line.starts_with("GET /health ") {
        if ready.load(Ordering::SeqCst) {
            "200 OK"
        } else {
            "503 Service Unavailable"
        }
    } else {
        "404 Not Found"
    };
    let _ = write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
}
