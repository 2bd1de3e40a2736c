//! Connection threads (`--connection-threads N`): every connection is
//! served, start to end, on one of N threads that each run a
//! single-threaded tokio runtime, instead of on the main runtime's shared
//! workers.
//!
//! Why: a heartbeat wakes two tasks in turn (the connection's, which reads
//! and writes the socket, and its stream's, which runs the handler). On a
//! multi-threaded runtime, waking a task while another worker sleeps wakes
//! that worker to share the work (a futex call, a context switch, a
//! search for work and a sleep again), and at one beat at a time that
//! costs more than the beat itself (docs/PERF-NOTES.md item 9). A thread
//! that owns its connections' socket registrations, timers and tasks
//! wakes only itself; the connections, spread over the threads, still use
//! every core. The price is that nothing moves between them: a connection
//! busy with a large reply delays the others of its thread.
//!
//! Everything else (the deadline loop, the store, the metrics port, the
//! replica loop, the heartbeat streams' recheck task) stays on the main
//! runtime; tasks on either side wake each other through tokio's channels
//! and `Notify`, which work across runtimes.

use std::future::Future;
use std::io;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// A connection that can move to the runtime it is served on.
pub trait Rehome: Sized {
    /// This connection, registered with the runtime this is called on
    /// instead of the one that accepted it.
    fn rehome(self) -> io::Result<Self>;
}

/// The threads, each with its runtime and its count of open connections.
/// [`ConnectionThreads::stop`] ends the connections still on them and
/// waits until they are gone; dropping it stops them without waiting.
pub struct ConnectionThreads {
    /// One per thread.
    threads: Box<[ConnectionThread]>,
}

/// One thread's runtime and load.
struct ConnectionThread {
    /// Where its connections are spawned.
    handle: Handle,
    /// Its open connections: a new one goes to the thread with fewest.
    open: Arc<AtomicUsize>,
    /// Sent (or dropped) to end the thread's runtime. The runtime is
    /// dropped on its own thread, since dropping one inside another
    /// runtime's task would panic.
    stop: oneshot::Sender<()>,
    /// Sent (or dropped, were the thread to panic) once the runtime and
    /// every task still on it were dropped.
    stopped: oneshot::Receiver<()>,
}

impl ConnectionThreads {
    /// Starts `count` threads named `registry-conn-I`, each running a
    /// single-threaded runtime with its own timer and I/O driver.
    pub fn start(count: NonZeroUsize) -> io::Result<Self> {
        let mut threads = Vec::with_capacity(count.get());
        for i in 0..count.get() {
            // The runtime is built on its thread and only its handle comes
            // back: a runtime dropped here, inside the caller's async
            // context (had the thread failed to start), would panic.
            let (built, handle) = std::sync::mpsc::sync_channel(1);
            let (stop, stop_asked) = oneshot::channel::<()>();
            let (dropped, stopped) = oneshot::channel::<()>();
            std::thread::Builder::new()
                .name(format!("registry-conn-{i}"))
                .spawn(move || {
                    let runtime = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(runtime) => runtime,
                        Err(err) => {
                            let _ = built.send(Err(err));
                            return;
                        }
                    };
                    let _ = built.send(Ok(runtime.handle().clone()));
                    // Runs the spawned connections until told to stop.
                    runtime.block_on(async {
                        let _ = stop_asked.await;
                    });
                    // Its connections' tasks are dropped here, on this
                    // thread and inside its runtime's context, before
                    // `stop` hears that they are gone.
                    drop(runtime);
                    let _ = dropped.send(());
                })?;
            let handle = handle.recv().map_err(|_| {
                io::Error::other("a connection thread ended before its runtime was built")
            })??;
            threads.push(ConnectionThread {
                handle,
                open: Arc::new(AtomicUsize::new(0)),
                stop,
                stopped,
            });
        }
        Ok(Self {
            threads: threads.into_boxed_slice(),
        })
    }

    /// Ends every connection still on the threads and returns once their
    /// tasks were dropped and the threads' runtimes with them: what a
    /// connection's task holds (a heartbeat stream's state, a call under
    /// way) is gone before the caller closes what they use (the store).
    pub async fn stop(self) {
        let mut stopped = Vec::with_capacity(self.threads.len());
        for thread in self.threads {
            let _ = thread.stop.send(());
            stopped.push(thread.stopped);
        }
        for thread in stopped {
            // An error: the thread ended without saying so (it panicked);
            // it is gone either way.
            let _ = thread.await;
        }
    }

    /// How many threads serve connections.
    pub fn len(&self) -> usize {
        self.threads.len()
    }

    /// Always false: there is at least one thread.
    pub fn is_empty(&self) -> bool {
        self.threads.is_empty()
    }

    /// Open connections on each thread, in thread order.
    #[cfg(test)]
    fn open(&self) -> Vec<usize> {
        self.threads
            .iter()
            .map(|t| t.open.load(Ordering::Relaxed))
            .collect()
    }

    /// Runs `task(i)` on thread `i`, for every thread, outside the count
    /// of open connections (a probe of the thread's own runtime). The
    /// tasks end with their threads.
    pub fn spawn_on_each<F>(&self, task: impl Fn(usize) -> F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        for (i, thread) in self.threads.iter().enumerate() {
            thread.handle.spawn(task(i));
        }
    }

    /// Serves one connection on the thread with the fewest open: `serve`
    /// is called on that thread (so the connection's socket and timers are
    /// registered with its runtime) and the future it returns runs there
    /// until the connection ends.
    pub fn spawn<S, F>(&self, serve: S)
    where
        S: FnOnce() -> F + Send + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        let thread = self
            .threads
            .iter()
            .min_by_key(|t| t.open.load(Ordering::Relaxed))
            .expect("at least one connection thread");
        let open = OpenConnection::count(&thread.open);
        // `serve` runs inside the task, on the thread: what it registers
        // (the socket, timers) belongs to that thread's runtime.
        thread.handle.spawn(async move {
            let _open = open;
            serve().await;
        });
    }
}

/// One connection in its thread's count, until dropped.
struct OpenConnection(Arc<AtomicUsize>);

impl OpenConnection {
    fn count(open: &Arc<AtomicUsize>) -> Self {
        open.fetch_add(1, Ordering::Relaxed);
        Self(open.clone())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn two() -> ConnectionThreads {
        ConnectionThreads::start(NonZeroUsize::new(2).unwrap()).unwrap()
    }

    /// Waits (real time, up to 5 s) until `open` reads `want`.
    async fn open_becomes(threads: &ConnectionThreads, want: &[usize]) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while threads.open() != want {
            assert!(
                tokio::time::Instant::now() < deadline,
                "open connections {:?}, expected {want:?}",
                threads.open()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn a_connection_runs_on_the_thread_with_fewest_open_and_leaves_its_count_when_done() {
        let threads = two();
        let (tx, mut ran_on) = tokio::sync::mpsc::unbounded_channel();
        let mut ends = Vec::new();
        for _ in 0..3 {
            let (end, ended) = oneshot::channel::<()>();
            ends.push(end);
            let tx = tx.clone();
            threads.spawn(move || async move {
                let name = std::thread::current().name().map(str::to_owned);
                tx.send(name).unwrap();
                let _ = ended.await;
            });
        }
        let mut names = Vec::new();
        for _ in 0..3 {
            names.push(ran_on.recv().await.unwrap().unwrap());
        }
        names.sort();
        assert_eq!(
            names,
            ["registry-conn-0", "registry-conn-0", "registry-conn-1"]
        );
        open_becomes(&threads, &[2, 1]).await;
        // The first connection ends: thread 0 is down to one, and the next
        // connection goes to the first of the two with fewest.
        drop(ends.remove(0));
        open_becomes(&threads, &[1, 1]).await;
        let tx = tx.clone();
        threads.spawn(move || async move {
            tx.send(std::thread::current().name().map(str::to_owned))
                .unwrap();
        });
        assert_eq!(
            ran_on.recv().await.unwrap().as_deref(),
            Some("registry-conn-0")
        );
        open_becomes(&threads, &[1, 1]).await;
    }

    #[tokio::test]
    async fn dropping_the_threads_ends_the_connections_on_them() {
        let threads = two();
        let (held, dropped) = oneshot::channel::<()>();
        threads.spawn(move || async move {
            // Never ends by itself; `held` is dropped with the task.
            let _held = held;
            std::future::pending::<()>().await;
        });
        open_becomes(&threads, &[1, 0]).await;
        drop(threads);
        tokio::time::timeout(Duration::from_secs(5), dropped)
            .await
            .expect("the connection outlived its thread's runtime")
            .expect_err("the connection's task was dropped, not finished");
    }

    #[tokio::test]
    async fn stop_returns_once_the_tasks_on_the_threads_are_dropped() {
        use std::sync::atomic::AtomicBool;

        /// Sets its flag when dropped, after a pause that a `stop` that
        /// did not wait would return within.
        struct SlowToDrop(Arc<AtomicBool>);
        impl Drop for SlowToDrop {
            fn drop(&mut self) {
                std::thread::sleep(Duration::from_millis(200));
                self.0.store(true, Ordering::SeqCst);
            }
        }

        let threads = two();
        let gone = [
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        ];
        for flag in &gone {
            let held = SlowToDrop(flag.clone());
            threads.spawn(move || async move {
                let _held = held;
                std::future::pending::<()>().await;
            });
        }
        open_becomes(&threads, &[1, 1]).await;
        threads.stop().await;
        assert!(
            gone.iter().all(|flag| flag.load(Ordering::SeqCst)),
            "stop returned before every connection's task was dropped"
        );
    }
}
