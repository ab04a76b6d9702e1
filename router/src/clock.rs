//! The time, read once per turn of a connection's task.
//!
//! A proxied request asks the time a dozen times (its start, the retry budget, the
//! breaker, the pool's idle check, the request timeout, the latency observed, the
//! answer's arrival...), each a `clock_gettime` of some 30 ns on a virtual machine: 6% of
//! the proxy's own CPU per request. nginx reads the clock once per turn of its event
//! loop and lets everything in that turn share the reading; [`Turns`] does the same for
//! one task: each poll of a client connection reads the clock once, and [`now`] inside
//! that poll returns the reading. Outside a turn (other tasks, threads, tests), [`now`]
//! reads the clock.
//!
//! What it costs: a time taken inside a poll is the time the poll began, early by the
//! CPU work done before it in the same poll (microseconds; nothing here waits inside a
//! poll). Deadlines set from it are as early.
//!
//! [`Alarm`] is the other half of a request's time: a deadline waited for with a timer
//! that is moved only when it would be late, and polled only when it must be.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::time::Instant;

use crate::wake::Registered;

thread_local! {
    static TURN: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// The time: the current turn's reading inside one, else the clock's (tokio's, so that
/// tests with a paused clock see their own time).
pub fn now() -> Instant {
    TURN.with(Cell::get).unwrap_or_else(Instant::now)
}

/// [`now`] as a `std` instant.
pub fn now_std() -> std::time::Instant {
    now().into_std()
}

pin_project_lite::pin_project! {
    /// A task's timer for deadlines that move on (a connection's, request after
    /// request), waited for with [`Alarm::due`].
    #[derive(Debug)]
    pub struct Alarm {
        #[pin]
        sleep: tokio::time::Sleep,
        // The waker the timer holds since it was last set, if this task's.
        held: Registered,
    }
}

impl Alarm {
    /// A timer set for `deadline`.
    pub fn until(deadline: Instant) -> Self {
        Alarm {
            sleep: tokio::time::sleep_until(deadline),
            held: Registered::default(),
        }
    }

    /// Where the timer is set.
    pub fn deadline(&self) -> Instant {
        self.sleep.deadline()
    }

    /// Whether `deadline` has passed; if not, the timer wakes the task by then. The
    /// timer is moved only when it would be late: one set earlier fires early and is
    /// set again then. A deadline that moves on with each request (an idle
    /// connection's, a request's timeout on a reused connection) so costs a
    /// timer-wheel update once per timeout, not once per request (`bench/instructions.sh`:
    /// −191 instructions per request, 0.6%). A timer already holding this task's waker
    /// and not gone off is not polled at all ([`crate::wake`]; with the closing watch's
    /// registration made once too, −8 locked instructions and −197 others per request).
    pub fn due(self: Pin<&mut Self>, deadline: Instant, cx: &mut Context<'_>) -> bool {
        let mut this = self.project();
        if this.sleep.deadline() > deadline {
            this.sleep.as_mut().reset(deadline);
            this.held.clear();
        }
        if this.held.holds(cx.waker()) && !this.sleep.is_elapsed() {
            return false;
        }
        loop {
            if this.sleep.as_mut().poll(cx).is_pending() {
                this.held.set(cx.waker());
                return false;
            }
            this.held.clear();
            // It fired for its deadline: ours too, unless that was earlier.
            if this.sleep.deadline() >= deadline {
                return true;
            }
            this.sleep.as_mut().reset(deadline);
        }
    }
}

pin_project_lite::pin_project! {
    /// A future whose every poll is one turn: the clock is read as the poll begins.
    pub struct Turns<F> {
        #[pin]
        inner: F,
    }
}

impl<F> Turns<F> {
    pub fn new(inner: F) -> Self {
        Turns { inner }
    }
}

impl<F: Future> Future for Turns<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // Restored on the way out, a panic's too: a reading must not outlive its poll.
        let _turn = Turn(TURN.with(|t| t.replace(Some(Instant::now()))));
        self.project().inner.poll(cx)
    }
}

struct Turn(Option<Instant>);

impl Drop for Turn {
    fn drop(&mut self) {
        TURN.with(|t| t.set(self.0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wake::Woken;
    use std::time::Duration;

    /// Blocks the thread long enough for the clock to move on.
    fn pass_time() {
        std::thread::sleep(Duration::from_millis(2));
    }

    /// When a wait for `deadline` ends, on tokio's paused clock (which jumps to the
    /// next timer when every task waits): at the deadline, whatever the timer was set
    /// to. A wait no timer ends fails after a minute.
    async fn woken_after(timer: &mut Pin<Box<Alarm>>, deadline: Instant) -> Duration {
        let start = Instant::now();
        let waited = std::future::poll_fn(|cx| {
            if timer.as_mut().due(deadline, cx) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        });
        tokio::time::timeout(Duration::from_secs(60), waited)
            .await
            .expect("the timer never woke the task");
        Instant::now() - start
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_is_met_by_a_timer_set_earlier_later_or_long_past() {
        let s = Duration::from_secs;
        let start = Instant::now();
        let mut timer = Box::pin(Alarm::until(start + s(1)));
        // Set earlier: it fires at 1 s, is not due, and is set again for 3 s.
        assert_eq!(woken_after(&mut timer, start + s(3)).await, s(3));
        assert_eq!(timer.deadline(), start + s(3));
        // Gone off already (at 3 s): set again, not taken for the new deadline.
        assert_eq!(woken_after(&mut timer, start + s(5)).await, s(2));
        // Set later (10 s): moved back to the deadline.
        let mut later = Box::pin(Alarm::until(start + s(10)));
        assert_eq!(woken_after(&mut later, start + s(8)).await, s(3));
        // A deadline already past is due at once.
        assert_eq!(woken_after(&mut timer, start + s(4)).await, s(0));
    }

    /// A timer polled again by the task it holds is not polled (nothing to see from
    /// outside but that it still wakes that task); polled by another task, it wakes
    /// that one.
    #[tokio::test(start_paused = true)]
    async fn the_timer_wakes_the_task_that_waited_last() {
        let s = Duration::from_secs;
        let start = Instant::now();
        let mut timer = Box::pin(Alarm::until(start + s(1)));
        let (a, b) = (Woken::new(), Woken::new());
        let (wa, wb) = (a.waker(), b.waker());
        for _ in 0..3 {
            assert!(!timer
                .as_mut()
                .due(start + s(1), &mut Context::from_waker(&wa)));
        }
        tokio::time::sleep(s(2)).await;
        assert_eq!(a.count(), 1, "the task that waited is woken once");
        // It went off: polled again, it is due (the task is not told again).
        assert!(timer
            .as_mut()
            .due(start + s(1), &mut Context::from_waker(&wa)));
        // Waited for again by one task, then another: the other is woken.
        assert!(!timer
            .as_mut()
            .due(start + s(5), &mut Context::from_waker(&wa)));
        assert!(!timer
            .as_mut()
            .due(start + s(5), &mut Context::from_waker(&wb)));
        tokio::time::sleep(s(4)).await;
        assert_eq!((a.count(), b.count()), (1, 1), "the last to wait is woken");
        assert!(timer
            .as_mut()
            .due(start + s(5), &mut Context::from_waker(&wb)));
    }

    #[tokio::test]
    async fn a_turn_shares_one_reading_and_leaves_none_behind() {
        let outside = now();
        pass_time();
        assert!(now() > outside, "outside a turn, now() reads the clock");
        let (first, same_turn, next_turn) = Turns::new(async {
            let first = now();
            pass_time();
            let same_turn = now();
            tokio::task::yield_now().await;
            (first, same_turn, now())
        })
        .await;
        assert_eq!(first, same_turn, "one turn, one reading");
        assert!(next_turn > first, "each poll is a turn of its own");
        let after = now();
        pass_time();
        assert!(now() > after, "the turn's reading went with it");

        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut fut = std::pin::pin!(Turns::new(async { panic!("in a turn") }));
            let _ = fut
                .as_mut()
                .poll(&mut Context::from_waker(std::task::Waker::noop()));
        }));
        assert!(panicked.is_err());
        let before = now();
        pass_time();
        assert!(now() > before, "a panic in a turn leaves no reading behind");
    }
}
