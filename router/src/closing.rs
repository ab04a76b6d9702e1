//! The listener's closing, as its connections wait for it: [`Closing`] is the
//! listener's side, a [`Watch`] each connection's, held for the connection's life.
//!
//! An HTTP/1.1 connection waits for the listener's closing at every request head, so
//! that an idle keep-alive connection ends at once when the listener closes. With a
//! `tokio::sync::watch` receiver each such wait put the task in a list under a lock and
//! took it out again (2% of the proxy's instructions per request, `bench/instructions.sh`).
//! Here a connection registers once, when its [`Watch`] is made, and a wait is an
//! atomic registration of its task's waker in its own slot, made again only for
//! another task's waker ([`crate::wake`]): the closing wakes every slot. The drain's
//! end ([`Closing::drained`]) is the last watch dropped.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use atomic_waker::AtomicWaker;
use slab::Slab;

use crate::wake::Registered;

/// The listener's side: closes, and tells when every connection has gone. Its clones
/// are the same listener's.
#[derive(Debug, Default, Clone)]
pub struct Closing {
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    closed: AtomicBool,
    /// Each live watch's slot, woken by the closing.
    slots: Mutex<Slab<Arc<AtomicWaker>>>,
    /// Told when the last watch is dropped after the closing.
    drained: tokio::sync::Notify,
}

impl Shared {
    fn slots(&self) -> MutexGuard<'_, Slab<Arc<AtomicWaker>>> {
        // A slab is whole after any panic (an insert or a remove): use it as it is.
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Closing {
    /// A listener not yet closing, watched by nobody.
    pub fn new() -> Self {
        Self::default()
    }

    /// A connection's watch, held until the connection has closed.
    pub fn watch(&self) -> Watch {
        let slot = Arc::new(AtomicWaker::new());
        let key = self.shared.slots().insert(slot.clone());
        Watch {
            shared: self.shared.clone(),
            slot,
            held: Registered::default(),
            key,
        }
    }

    /// Closes: every watch's wait ends, now and from now on.
    pub fn close(&self) {
        // Before the wakes: a task woken must see it (and one registering after this
        // store sees it when it checks).
        self.shared.closed.store(true, Ordering::SeqCst);
        for (_, slot) in self.shared.slots().iter() {
            slot.wake();
        }
    }

    /// Ends once no watch is left.
    pub async fn drained(&self) {
        loop {
            // Made before the check: a drop in between leaves its permit.
            let told = self.shared.drained.notified();
            if self.shared.slots().is_empty() {
                return;
            }
            told.await;
        }
    }
}

/// A connection's view of the listener's closing.
#[derive(Debug)]
pub struct Watch {
    shared: Arc<Shared>,
    slot: Arc<AtomicWaker>,
    /// Whose waker `slot` holds.
    held: Registered,
    key: usize,
}

impl Watch {
    /// Whether the listener is closing.
    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::SeqCst)
    }

    /// Ready once the listener is closing; until then the task is woken when it does.
    /// One task's waker at a time: the last to poll is the one woken.
    pub fn poll_closed(&self, cx: &mut Context<'_>) -> Poll<()> {
        // Registered before the check, so a closing in between is not missed. Held
        // already, it stays held until the closing takes it, which it does after
        // marking the listener closed: then the check sees that.
        if !self.held.holds(cx.waker()) {
            self.slot.register(cx.waker());
            self.held.set(cx.waker());
        }
        if self.is_closed() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// [`Watch::poll_closed`] as a future.
    pub fn closed(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(|cx| self.poll_closed(cx))
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut slots = self.shared.slots();
        slots.remove(self.key);
        if slots.is_empty() {
            // A permit when nobody waits yet: `drained` takes it.
            self.shared.drained.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const BOUND: Duration = Duration::from_secs(10);

    #[tokio::test]
    async fn the_closing_wakes_every_watch_waiting_and_ends_later_waits_at_once() {
        let closing = Closing::new();
        let watches: Vec<Watch> = (0..3).map(|_| closing.watch()).collect();
        let waiting: Vec<_> = watches
            .into_iter()
            .map(|w| {
                tokio::spawn(async move {
                    w.closed().await;
                    w
                })
            })
            .collect();
        tokio::task::yield_now().await;
        assert!(waiting.iter().all(|t| !t.is_finished()));
        closing.close();
        for task in waiting {
            let w = tokio::time::timeout(BOUND, task)
                .await
                .expect("woken by the closing")
                .unwrap();
            assert!(w.is_closed());
        }
        // A watch made after the closing sees it at once.
        let late = closing.watch();
        tokio::time::timeout(BOUND, late.closed())
            .await
            .expect("closed already");
    }

    #[tokio::test]
    async fn the_drain_ends_when_the_last_watch_is_dropped() {
        let closing = Closing::new();
        let (a, b) = (closing.watch(), closing.watch());
        closing.close();
        let mut drained = std::pin::pin!(closing.drained());
        assert!(poll_once(drained.as_mut()).await.is_pending());
        drop(a);
        assert!(poll_once(drained.as_mut()).await.is_pending());
        drop(b);
        tokio::time::timeout(BOUND, drained)
            .await
            .expect("drained once no watch is left");
        // With none to begin with, at once.
        tokio::time::timeout(BOUND, Closing::new().drained())
            .await
            .expect("nothing to drain");
    }

    /// A watch waited on again by its task registers nothing new, and still wakes it;
    /// waited on by another task, it wakes that one.
    #[test]
    fn the_closing_wakes_the_task_that_waited_last() {
        let closing = Closing::new();
        let (a, b) = (crate::wake::Woken::new(), crate::wake::Woken::new());
        let (wa, wb) = (a.waker(), b.waker());
        let first = closing.watch();
        for _ in 0..3 {
            assert!(first
                .poll_closed(&mut Context::from_waker(&wa))
                .is_pending());
        }
        let second = closing.watch();
        assert!(second
            .poll_closed(&mut Context::from_waker(&wa))
            .is_pending());
        assert!(second
            .poll_closed(&mut Context::from_waker(&wb))
            .is_pending());
        closing.close();
        assert_eq!(
            (a.count(), b.count()),
            (1, 1),
            "each watch wakes the last to wait"
        );
        assert!(first.poll_closed(&mut Context::from_waker(&wa)).is_ready());
        assert!(second.poll_closed(&mut Context::from_waker(&wb)).is_ready());
    }

    /// Polls `fut` once.
    async fn poll_once<F: Future + Unpin>(mut fut: F) -> Poll<F::Output> {
        std::future::poll_fn(|cx| Poll::Ready(std::pin::Pin::new(&mut fut).poll(cx))).await
    }
}
