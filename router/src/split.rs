//! Phases *choose* and *retry*, as a tower service over the variants' stacks wrapped in
//! tower's own `Retry`:
//!
//! ```text
//! Retry<Budgeted, Split>
//!   Split        phase choose: sticky key, else the bandit's picker, else the weights,
//!                among the variants not yet tried whose stacks are ready
//!   Budgeted     phase retry: a failure of a kind in `retry.on` goes again, to another
//!                ready variant, within the model's [`RetryBudget`]
//! ```
//!
//! A split's readiness is per request (which variants it has tried), so `Split` is
//! always ready and chooses in `call`; a variant whose stack turns out not ready at
//! admission (it lost the race for its last slot or its probe) is passed over at once.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use tower::retry::budget::Budget;
use tower_service::Service;

use crate::body::LimitedBody;
use crate::breaker::failure_kind;
use crate::forward::Ask;
use crate::selector::Pick;
use crate::variant::{stack, try_ready, Answer, VariantStack};

/// One try's result, with the variant it went to, the probability that variant was
/// chosen with, and the failure kind when the variant failed.
pub(crate) struct Tried {
    pub index: usize,
    pub probability: f64,
    pub result: Answer,
    pub failure: Option<&'static str>,
}

/// No variant could take the request; the body comes back unsent, for the fallback.
pub(crate) struct Unrouted(pub LimitedBody);

/// A variant's bit in a request's set of tried variants.
pub(crate) fn bit(index: usize) -> u64 {
    1u64 << (index % 64)
}

/// Phase *choose*: a ready variant not in `tried`, by sticky key (first tries only) or
/// the picker or the weights; `None` when none is ready.
pub(crate) fn choose(ask: &Ask<'_>, tried: u64, first: bool) -> Option<Pick> {
    let model = ask.model;
    let now = crate::clock::now();
    let usable = |i: usize| tried & bit(i) == 0 && model.variants[i].health.ready(now).is_ok();
    if let Some(key) = ask.sticky.as_ref().filter(|_| first) {
        return model.selector.pick_sticky_among(key.as_bytes(), &usable);
    }
    if let Some(p) = model.picker.load().as_ref().and_then(|p| p.pick()) {
        if p.index < model.variants.len() && usable(p.index) {
            return Some(p);
        }
    }
    model.selector.pick_among(&usable)
}

/// Panic routing's choice: any variant not tried with room under its in-flight limit,
/// whatever its breaker says.
fn choose_panicked(ask: &Ask<'_>, tried: u64) -> Option<Pick> {
    let model = ask.model;
    model
        .selector
        .pick_among(&|i| tried & bit(i) == 0 && model.variants[i].health.in_flight_room())
}

/// Phase *choose* as a service: see the module map.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Split<'a> {
    ask: &'a Ask<'a>,
    panicked: bool,
}

impl<'a> Split<'a> {
    /// Chooses among ready variants.
    pub(crate) fn new(ask: &'a Ask<'a>) -> Self {
        Split {
            ask,
            panicked: false,
        }
    }

    /// Chooses among all variants, ejected or not (every variant ejected, no fallback).
    pub(crate) fn panicked(ask: &'a Ask<'a>) -> Self {
        Split {
            ask,
            panicked: true,
        }
    }
}

impl<'a> Service<LimitedBody> for Split<'a> {
    type Response = Tried;
    type Error = Unrouted;
    type Future = TryFuture<'a>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Unrouted>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, body: LimitedBody) -> TryFuture<'a> {
        let ask = self.ask;
        let first = ask.retries.load(Ordering::Relaxed) == 0;
        loop {
            let tried = ask.tried.load(Ordering::Relaxed);
            let pick = if self.panicked {
                choose_panicked(ask, tried)
            } else {
                choose(ask, tried, first)
            };
            let Some(pick) = pick else {
                return TryFuture::Unrouted { body: Some(body) };
            };
            ask.tried.fetch_or(bit(pick.index), Ordering::Relaxed);
            let mut variant = stack(ask, pick.index, self.panicked);
            if try_ready(&mut variant).is_ok() {
                return TryFuture::trying(&mut variant, pick, body);
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// A try on one variant, or the body handed back when none was ready.
    #[project = TryProj]
    pub(crate) enum TryFuture<'a> {
        Unrouted { body: Option<LimitedBody> },
        Trying {
            index: usize,
            probability: f64,
            #[pin]
            answer: <VariantStack<'a> as Service<LimitedBody>>::Future,
        },
    }
}

impl<'a> TryFuture<'a> {
    /// Sends `body` on a variant's stack that is ready.
    pub(crate) fn trying(variant: &mut VariantStack<'a>, pick: Pick, body: LimitedBody) -> Self {
        TryFuture::Trying {
            index: pick.index,
            probability: pick.probability,
            answer: variant.call(body),
        }
    }
}

impl Future for TryFuture<'_> {
    type Output = Result<Tried, Unrouted>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            TryProj::Unrouted { body } => match body.take() {
                Some(body) => Poll::Ready(Err(Unrouted(body))),
                None => panic!("TryFuture polled after it completed"),
            },
            TryProj::Trying {
                index,
                probability,
                answer,
            } => {
                let result = std::task::ready!(answer.poll(cx));
                Poll::Ready(Ok(Tried {
                    index: *index,
                    probability: *probability,
                    failure: failure_kind(&result),
                    result,
                }))
            }
        }
    }
}

/// Phase *retry* as a tower retry policy: see the module map.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Budgeted<'a> {
    ask: &'a Ask<'a>,
}

impl<'a> Budgeted<'a> {
    pub(crate) fn new(ask: &'a Ask<'a>) -> Self {
        Budgeted { ask }
    }
}

fn retried_on(retry: &switchyard_config::Retry, kind: &str) -> bool {
    let on = &retry.on;
    match kind {
        "connect" => on.connect,
        "reset" => on.reset,
        "timeout" => on.timeout,
        "5xx" => on.status_5xx,
        _ => false,
    }
}

impl tower::retry::Policy<LimitedBody, Tried, Unrouted> for Budgeted<'_> {
    type Future = std::future::Ready<()>;

    fn retry(
        &mut self,
        _: &mut LimitedBody,
        result: &mut Result<Tried, Unrouted>,
    ) -> Option<Self::Future> {
        let ask = self.ask;
        let model = ask.model;
        let res = &model.resilience;
        let kind = result.as_ref().ok()?.failure?;
        if !retried_on(&res.retry, kind) {
            return None;
        }
        // Only when another variant can take it; else the fallback answers in its place.
        choose(ask, ask.tried.load(Ordering::Relaxed), false)?;
        if !res.budget.withdraw() {
            res.metrics
                .retries_refused
                .with_label_values(&[&model.name, kind])
                .inc();
            return None;
        }
        ask.retries.fetch_add(1, Ordering::Relaxed);
        res.metrics
            .retries
            .with_label_values(&[&model.name, kind])
            .inc();
        Some(std::future::ready(()))
    }

    fn clone_request(&mut self, body: &LimitedBody) -> Option<LimitedBody> {
        // A streamed body (over `retry.max_body_bytes`, or no declared length) goes once.
        body.try_clone()
    }
}

/// The retry budget (tower's [`Budget`]): a token bucket that starts empty and earns
/// `retry.budget` of a token per request and `retry.min_per_second` tokens per second;
/// a retry spends one. So over any run, retries ≤ budget × requests + min_per_second ×
/// seconds, exactly. What it may hold is capped at Finagle's window: `budget` × the
/// last 10 s of requests + 10 s of `min_per_second`, so a long calm does not bank a
/// retry storm for the next outage.
///
/// Not tower's `TpsBudget`: it spends a whole number of deposits per retry, so a share
/// that is not 1/k rounds up (0.3 allowed a third), and its reserve is 10 s of
/// `min_per_second` at any moment, not per second of the run (1,000 refused requests
/// over 11 s got 260 retries, where budget × requests + min_per_second × seconds is
/// 233). Tokens are counted in millionths, so shares add up exactly.
#[derive(Debug)]
pub struct RetryBudget {
    per_request: u64,
    per_second: u64,
    state: std::sync::Mutex<Bucket>,
}

/// One retry, in the bucket's units.
const TOKEN: u64 = 1_000_000;

/// Requests are counted per second over the last [`SLOTS`] seconds, for the cap.
const SLOTS: usize = 10;

#[derive(Debug)]
struct Bucket {
    tokens: u64,
    refilled: tokio::time::Instant,
    requests: [u64; SLOTS],
    slot: usize,
    /// When the current slot's second ends: an instant to compare with, where a
    /// duration since its start is a checked, normalised subtraction per request.
    slot_ends: tokio::time::Instant,
}

impl RetryBudget {
    /// `budget` retries per request, plus `min_per_second`.
    pub fn new(budget: f64, min_per_second: u32) -> Self {
        let now = crate::clock::now();
        RetryBudget {
            // The config bounds `budget` to 0..=1; the cast saturates regardless.
            per_request: (budget * TOKEN as f64).round() as u64,
            per_second: u64::from(min_per_second) * TOKEN,
            state: std::sync::Mutex::new(Bucket {
                tokens: 0,
                refilled: now,
                requests: [0; SLOTS],
                slot: 0,
                slot_ends: now + std::time::Duration::from_secs(1),
            }),
        }
    }

    /// Brings the bucket to now: the time's tokens, the request window moved on, and
    /// the cap applied.
    fn settle<'a>(&self, b: &'a mut std::sync::MutexGuard<'_, Bucket>) -> &'a mut Bucket {
        let now = crate::clock::now();
        let second = std::time::Duration::from_secs(1);
        let mut moved = 0;
        while now >= b.slot_ends && moved < SLOTS {
            b.slot = (b.slot + 1) % SLOTS;
            let slot = b.slot;
            b.requests[slot] = 0;
            b.slot_ends += second;
            moved += 1;
        }
        if moved == SLOTS {
            b.slot_ends = now + second;
        }
        // In u64 (a u128 division was a library call per request); past its range
        // (centuries of microseconds), as many tokens as there can be: the cap holds.
        let micros = u64::try_from(now.duration_since(b.refilled).as_micros()).unwrap_or(u64::MAX);
        let earned = micros
            .checked_mul(self.per_second)
            .map_or(u64::MAX, |n| n / 1_000_000);
        let recent: u64 = b.requests.iter().sum();
        let cap = self
            .per_request
            .saturating_mul(recent)
            .saturating_add(self.per_second.saturating_mul(SLOTS as u64))
            .max(TOKEN);
        b.tokens = b.tokens.saturating_add(earned).min(cap);
        // Time is consumed only in whole earned units, so slow drips are not lost.
        if earned > 0 || self.per_second == 0 {
            b.refilled = now;
        }
        b
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Bucket> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Budget for RetryBudget {
    fn deposit(&self) {
        let mut guard = self.lock();
        let b = self.settle(&mut guard);
        let slot = b.slot;
        b.requests[slot] = b.requests[slot].saturating_add(1);
        b.tokens = b.tokens.saturating_add(self.per_request);
    }

    fn withdraw(&self) -> bool {
        let mut guard = self.lock();
        let b = self.settle(&mut guard);
        if b.tokens >= TOKEN {
            b.tokens -= TOKEN;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spend(budget: &RetryBudget) -> usize {
        std::iter::from_fn(|| budget.withdraw().then_some(())).count()
    }

    /// The share is exact (0.2 is 20%, 0.3 is 30%), time earns `min_per_second`, and
    /// nothing is earned before the first request or second.
    #[tokio::test(start_paused = true)]
    async fn retries_are_the_budgets_share_of_requests_plus_the_floor_per_second() {
        for (share, requests, want) in [(0.2, 1000, 200), (0.3, 1000, 300), (0.25, 8, 2)] {
            let b = RetryBudget::new(share, 3);
            assert_eq!(spend(&b), 0, "an empty bucket at start");
            for _ in 0..requests {
                b.deposit();
            }
            assert_eq!(spend(&b), want, "budget {share}");
        }
        let b = RetryBudget::new(0.2, 3);
        tokio::time::advance(std::time::Duration::from_secs(2)).await;
        assert_eq!(spend(&b), 6, "two seconds of min_per_second 3");
    }

    /// A long calm banks at most Finagle's window: budget × the last 10 s of requests
    /// plus 10 s of the floor.
    #[tokio::test(start_paused = true)]
    async fn a_long_calm_banks_at_most_ten_seconds_of_budget() {
        let b = RetryBudget::new(0.2, 3);
        for _ in 0..60 {
            for _ in 0..100 {
                b.deposit();
            }
            tokio::time::advance(std::time::Duration::from_secs(1)).await;
        }
        // 60 s of 100 requests/s earned 1,200 + 180; the last 10 s hold 900 requests
        // (the current second has none yet) and 30 of floor.
        assert_eq!(spend(&b), 180 + 30);
    }
}
