//! A cheap wake-up shared by many tasks: what a node's heartbeat streams
//! wait on (a command owed, a newer stream), and what every open stream
//! waits on for the registry-wide reasons to stop (shutdown, a term's end,
//! a token reload). One per node, so it is kept small.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use tokio::sync::futures::Notified;

/// A wake-up for many waiters: a count of raises and one wait list. Each
/// waiter remembers the count it has seen, so a raise while it was busy
/// elsewhere is not lost. (A `tokio::sync::watch` channel does this with
/// ~350 bytes, eight wait lists among them; this is ~50.)
#[derive(Debug, Default)]
pub struct Signal {
    /// Raises so far.
    raised: AtomicU64,
    /// Those waiting for the next raise.
    waiters: tokio::sync::Notify,
}

impl Signal {
    /// Wakes every waiter, and makes every waiter that has not seen this
    /// raise find it when it next waits.
    pub fn raise(&self) {
        self.raised.fetch_add(1, Ordering::SeqCst);
        self.waiters.notify_waiters();
    }

    /// The raises so far: what a waiter starting to listen has seen.
    pub fn seen(&self) -> u64 {
        self.raised.load(Ordering::SeqCst)
    }

    /// Whether there was a raise since `seen` was read.
    pub fn raised_since(&self, seen: u64) -> bool {
        self.seen() != seen
    }

    /// Returns at once if there was a raise since `*seen`, or else at the
    /// next one; `*seen` is then brought up to date.
    pub fn raised<'a>(&'a self, seen: &'a mut u64) -> Raised<'a> {
        Raised {
            signal: self,
            seen,
            next: self.waiters.notified(),
        }
    }
}

pin_project_lite::pin_project! {
    /// [`Signal::raised`]'s wait: part of every open heartbeat stream's
    /// state, so written out (80 bytes, where an `async fn` doing the same
    /// took 120: it kept its arguments and its locals apart).
    pub struct Raised<'a> {
        signal: &'a Signal,
        seen: &'a mut u64,
        // The place in the wait list.
        #[pin]
        next: Notified<'a>,
    }
}

impl Future for Raised<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        loop {
            // In the wait list (with this task's waker) before the count
            // is read, so a raise between the two is not missed; one lock
            // of the list per poll.
            let woken = this.next.as_mut().poll(cx).is_ready();
            let now = this.signal.seen();
            if now != **this.seen {
                **this.seen = now;
                return Poll::Ready(());
            }
            if !woken {
                return Poll::Pending;
            }
            // Woken, yet the count was seen: listen afresh.
            this.next.set(this.signal.waiters.notified());
        }
    }
}

#[cfg(test)]
mod tests {
    use futures_util::FutureExt;

    use super::Signal;

    #[tokio::test]
    async fn a_raise_is_found_whether_it_came_before_or_during_the_wait() {
        let signal = std::sync::Arc::new(Signal::default());
        let mut seen = signal.seen();
        assert!(
            signal.raised(&mut seen).now_or_never().is_none(),
            "nothing raised: the wait goes on"
        );

        // Raised while the stream was busy elsewhere: found at once.
        signal.raise();
        assert!(signal.raised_since(seen));
        assert!(signal.raised(&mut seen).now_or_never().is_some());
        assert_eq!(seen, signal.seen(), "the raise is now seen");
        assert!(signal.raised(&mut seen).now_or_never().is_none());

        // Raised while waiting: every waiter wakes.
        let waiters: Vec<_> = (0..2)
            .map(|_| {
                let signal = signal.clone();
                let mut seen = signal.seen();
                tokio::spawn(async move { signal.raised(&mut seen).await })
            })
            .collect();
        tokio::task::yield_now().await;
        signal.raise();
        for waiter in waiters {
            tokio::time::timeout(std::time::Duration::from_secs(10), waiter)
                .await
                .expect("a waiter woke")
                .unwrap();
        }
    }
}
