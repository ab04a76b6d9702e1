//! Whether a registration already holds this task's waker.
//!
//! A wait registers the task's waker where the event will find it, on every poll: tokio's
//! timer does so with four locked instructions (its slot locked, the waker cloned, the
//! old one dropped, the slot unlocked) beside some 130 others, and a [`crate::closing`]
//! watch with two. A locked instruction costs about 5 ns on the benchmark's machine,
//! against a fraction of one for a plain one. A connection's task waits on the same
//! timer and the same watch request after request, so it records whose waker it
//! registered ([`Registered`]) and registers again only for another one.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::task::Waker;

/// The waker a registration holds, by identity (`Waker::will_wake`'s: its data and its
/// vtable), recorded by the one task that registers it. A registration holds a clone of
/// the waker, so no other task can share its identity while it does; whoever takes the
/// waker out (a timer going off, the closing) must be seen some other way.
///
/// Atomics only so that types used through `&self` can hold one: relaxed loads and
/// stores are plain ones.
#[derive(Debug, Default)]
pub(crate) struct Registered {
    data: AtomicUsize,
    vtable: AtomicUsize,
}

impl Registered {
    /// Whether the registration holds `waker` (one that wakes the same task).
    pub(crate) fn holds(&self, waker: &Waker) -> bool {
        let (data, vtable) = identity(waker);
        self.vtable.load(Relaxed) == vtable && self.data.load(Relaxed) == data
    }

    /// `waker` was registered.
    pub(crate) fn set(&self, waker: &Waker) {
        let (data, vtable) = identity(waker);
        self.data.store(data, Relaxed);
        self.vtable.store(vtable, Relaxed);
    }

    /// The registration may no longer hold what was recorded.
    pub(crate) fn clear(&self) {
        // No waker's vtable is at address 0.
        self.vtable.store(0, Relaxed);
    }
}

fn identity(waker: &Waker) -> (usize, usize) {
    (
        waker.data().addr(),
        std::ptr::from_ref(waker.vtable()).addr(),
    )
}

/// A task for tests that counts its wake-ups.
#[cfg(test)]
#[derive(Debug, Default)]
pub(crate) struct Woken(std::sync::atomic::AtomicUsize);

#[cfg(test)]
impl std::task::Wake for Woken {
    fn wake(self: std::sync::Arc<Self>) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

#[cfg(test)]
impl Woken {
    pub(crate) fn new() -> std::sync::Arc<Self> {
        std::sync::Arc::default()
    }

    pub(crate) fn waker(self: &std::sync::Arc<Self>) -> Waker {
        Waker::from(self.clone())
    }

    pub(crate) fn count(&self) -> usize {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_holds_its_tasks_waker_and_no_other() {
        let (a, b) = (Woken::new(), Woken::new());
        let (wa, wb) = (a.waker(), b.waker());
        let r = Registered::default();
        assert!(!r.holds(&wa), "nothing is recorded at first");
        assert!(!r.holds(Waker::noop()));
        r.set(&wa);
        assert!(r.holds(&wa));
        assert!(
            r.holds(&a.waker()),
            "another of its wakers wakes the same task"
        );
        assert!(!r.holds(&wb));
        r.set(&wb);
        assert!(r.holds(&wb) && !r.holds(&wa));
        r.clear();
        assert!(!r.holds(&wb));
    }
}
