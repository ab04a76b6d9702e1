//! Phases *limit* and *break*: each variant's readiness. A variant takes a request only
//! while its circuit breaker is closed (or half-open with no probe out) and it has fewer
//! than `limits.max_in_flight` requests in flight; the *choose* phase routes around
//! variants that are not ready, as linkerd's balancer routes around unready endpoints.
//!
//! The breaker (Envoy's outlier detection and linkerd's failure accrual in one): it
//! opens after `consecutive_failures` failures in a row, or when `failure_rate` of the
//! requests over `window` failed once `min_requests` were seen. Open, the variant is
//! ejected for `base_ejection`, doubled on each re-open up to `max_ejection`, with ±10%
//! jitter so a fleet's sidecars do not probe in step. Then one request is let through
//! (half-open): its success closes the breaker, its failure re-opens it for longer.
//!
//! A failure is a connect error, a reset, a timeout, or a 5xx answer; a client's own
//! mistake (a 4xx) is not the variant's. Every transition is logged and shown in
//! `switchyard_variant_state{model,variant}` (0 closed, 1 open, 2 half-open).
//!
//! Time is tokio's clock, so tests drive the schedules with paused time. The state sits
//! behind a short sync lock never held across an await; the common case (closed, under
//! the limit) reads one atomic and bumps another.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use prometheus::{IntCounter, IntGauge};
use switchyard_config::{Breaker, Limits};
use tokio::time::Instant;

use crate::RouterError;

/// The breaker's state, as the gauge shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Taking requests.
    Closed = 0,
    /// Ejected until its ejection ends.
    Open = 1,
    /// One probe request is (or may be) out.
    HalfOpen = 2,
}

impl State {
    /// The name shown in `/admin/state` and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half-open",
        }
    }
}

/// How a request to a variant ended, as far as its breaker cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// An answer that was not a 5xx.
    Success,
    /// A connect error, reset, timeout or 5xx.
    Failure,
}

/// Why a variant cannot take a request now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotReady {
    /// Its breaker is open (or half-open with its probe out).
    Ejected,
    /// It has `max_in_flight` requests in flight.
    Full,
}

/// Counts over one slice of the failure-rate window. Its two ends are kept as instants,
/// not its start: a request then compares instants, where a duration since the start
/// is a checked, normalised subtraction (two per request were 0.4% of the proxy's
/// instructions).
#[derive(Debug, Clone, Copy)]
struct Slice {
    /// When the next request starts a new slice.
    ends: Instant,
    /// When the window has moved past this slice.
    forgotten: Instant,
    total: u32,
    failures: u32,
}

/// Slices per window: the rate forgets old requests a tenth of a window at a time.
const SLICES: u32 = 10;

#[derive(Debug)]
struct Inner {
    /// Under the lock: only recording an outcome reads them, and a reload may change
    /// them while the state goes on.
    settings: Breaker,
    state: State,
    /// When an open breaker lets its probe through.
    until: Instant,
    /// Whether the half-open probe is out.
    probing: bool,
    consecutive: u32,
    /// Ejections since the breaker last stayed closed for `max_ejection`.
    ejections: u32,
    closed_since: Instant,
    slices: VecDeque<Slice>,
    /// For the jitter: a counter through SplitMix64's finaliser.
    draws: u64,
}

/// One variant's breaker and in-flight count.
#[derive(Debug)]
pub struct Health {
    model: String,
    variant: String,
    /// `limits.max_in_flight`; a reload may change it.
    max_in_flight: AtomicUsize,
    in_flight: AtomicUsize,
    /// `State as u8`, readable without the lock.
    state: AtomicU8,
    inner: Mutex<Inner>,
    gauge: IntGauge,
    ejections: IntCounter,
}

/// A slot taken on a variant; dropping it frees the slot. Record the outcome with
/// [`Permit::record`]; a permit dropped unrecorded (the client went away) counts as
/// neither, and a probe dropped so lets another probe go.
#[derive(Debug)]
pub struct Permit<'a> {
    health: &'a Health,
    probe: bool,
    recorded: bool,
}

impl Permit<'_> {
    /// Whether this request is the half-open probe.
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    /// Tells the breaker how the request ended.
    pub fn record(mut self, outcome: Outcome) {
        self.recorded = true;
        self.health.record(outcome, self.probe, crate::clock::now());
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        self.health.in_flight.fetch_sub(1, Ordering::AcqRel);
        if self.probe && !self.recorded {
            self.health.lock().probing = false;
        }
    }
}

impl Health {
    /// A closed breaker for `model`'s `variant`.
    pub fn new(
        model: &str,
        variant: &str,
        settings: &Breaker,
        limits: &Limits,
        gauge: IntGauge,
        ejections: IntCounter,
    ) -> Self {
        let now = crate::clock::now();
        gauge.set(State::Closed as i64);
        Health {
            model: model.to_string(),
            variant: variant.to_string(),
            max_in_flight: AtomicUsize::new(limits.max_in_flight),
            in_flight: AtomicUsize::new(0),
            state: AtomicU8::new(State::Closed as u8),
            inner: Mutex::new(Inner {
                settings: *settings,
                state: State::Closed,
                until: now,
                probing: false,
                consecutive: 0,
                ejections: 0,
                closed_since: now,
                slices: VecDeque::with_capacity(SLICES as usize + 1),
                draws: crate::selector::stable_hash(variant.as_bytes()),
            }),
            gauge,
            ejections,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic mid-update leaves a consistent enough state: keep going.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The breaker's state now.
    pub fn state(&self) -> State {
        match self.state.load(Ordering::Acquire) {
            0 => State::Closed,
            1 => State::Open,
            _ => State::HalfOpen,
        }
    }

    fn max_in_flight(&self) -> usize {
        self.max_in_flight.load(Ordering::Relaxed)
    }

    /// Takes a reloaded config's settings; the state (open or closed, failures counted,
    /// ejections) goes on under them.
    pub fn reconfigure(&self, settings: &Breaker, limits: &Limits) {
        let mut inner = self.lock();
        let (old, new) = (inner.settings.window, settings.window);
        if old != new {
            // The slices counted so far, re-cut to the new window from where each began.
            for slice in &mut inner.slices {
                let start = slice.forgotten - old;
                slice.ends = start + new / SLICES;
                slice.forgotten = start + new;
            }
        }
        inner.settings = *settings;
        drop(inner);
        self.max_in_flight
            .store(limits.max_in_flight, Ordering::Relaxed);
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Whether a request could be admitted now (for choosing; [`Health::admit`] decides).
    pub fn ready(&self, now: Instant) -> Result<(), NotReady> {
        if self.in_flight() >= self.max_in_flight() {
            return Err(NotReady::Full);
        }
        match self.state() {
            State::Closed => Ok(()),
            State::Open => {
                if self.lock().until <= now {
                    Ok(())
                } else {
                    Err(NotReady::Ejected)
                }
            }
            State::HalfOpen => {
                if self.lock().probing {
                    Err(NotReady::Ejected)
                } else {
                    Ok(())
                }
            }
        }
    }

    /// Takes a slot for one request, or says why not. An open breaker whose ejection
    /// is over turns half-open and this request is its probe.
    pub fn admit(&self, now: Instant) -> Result<Permit<'_>, NotReady> {
        let taken = self.in_flight.fetch_add(1, Ordering::AcqRel);
        let permit = |probe| Permit {
            health: self,
            probe,
            recorded: false,
        };
        if taken >= self.max_in_flight() {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            return Err(NotReady::Full);
        }
        if self.state() == State::Closed {
            return Ok(permit(false));
        }
        let mut inner = self.lock();
        let probe = match inner.state {
            State::Closed => false,
            State::Open if inner.until <= now => {
                self.set_state(
                    &mut inner,
                    State::HalfOpen,
                    "its ejection ended; one probe goes",
                );
                inner.probing = true;
                true
            }
            State::HalfOpen if !inner.probing => {
                inner.probing = true;
                true
            }
            _ => {
                drop(inner);
                self.in_flight.fetch_sub(1, Ordering::AcqRel);
                return Err(NotReady::Ejected);
            }
        };
        drop(inner);
        Ok(permit(probe))
    }

    /// Whether the variant has a free in-flight slot, whatever its breaker says.
    pub fn in_flight_room(&self) -> bool {
        self.in_flight() < self.max_in_flight()
    }

    /// A slot under the in-flight limit whatever the breaker says, for panic routing
    /// (every variant ejected and no fallback). Its outcome moves no open breaker.
    pub fn admit_ignoring_breaker(&self) -> Result<Permit<'_>, NotReady> {
        if self.in_flight.fetch_add(1, Ordering::AcqRel) >= self.max_in_flight() {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            return Err(NotReady::Full);
        }
        Ok(Permit {
            health: self,
            probe: false,
            recorded: false,
        })
    }

    fn record(&self, outcome: Outcome, probe: bool, now: Instant) {
        let mut inner = self.lock();
        let s = inner.settings;
        if probe {
            inner.probing = false;
            match outcome {
                Outcome::Success => {
                    inner.consecutive = 0;
                    inner.slices.clear();
                    inner.closed_since = now;
                    self.set_state(&mut inner, State::Closed, "its probe succeeded");
                }
                Outcome::Failure => self.open(&mut inner, now, "its probe failed"),
            }
            return;
        }
        if inner.state != State::Closed {
            // An answer to a request admitted before the breaker opened: counted in
            // the window below, but it does not move an open breaker.
            return;
        }
        // The failure-rate window, in slices.
        if inner.slices.back().is_none_or(|last| now >= last.ends) {
            inner.slices.push_back(Slice {
                ends: now + s.window / SLICES,
                forgotten: now + s.window,
                total: 0,
                failures: 0,
            });
        }
        while inner
            .slices
            .front()
            .is_some_and(|first| now >= first.forgotten)
        {
            inner.slices.pop_front();
        }
        if let Some(last) = inner.slices.back_mut() {
            last.total += 1;
            last.failures += u32::from(outcome == Outcome::Failure);
        }
        match outcome {
            Outcome::Success => inner.consecutive = 0,
            Outcome::Failure => {
                inner.consecutive += 1;
                let (total, failures) = inner
                    .slices
                    .iter()
                    .fold((0u32, 0u32), |(t, f), x| (t + x.total, f + x.failures));
                if inner.consecutive >= s.consecutive_failures {
                    let why = format!("{} failures in a row", inner.consecutive);
                    self.open(&mut inner, now, &why);
                } else if total >= s.min_requests
                    && f64::from(failures) >= s.failure_rate * f64::from(total)
                {
                    let why = format!(
                        "{failures} of its last {total} requests failed (failure_rate {})",
                        s.failure_rate
                    );
                    self.open(&mut inner, now, &why);
                }
            }
        }
    }

    fn open(&self, inner: &mut Inner, now: Instant, why: &str) {
        let s = inner.settings;
        // A breaker that stayed closed for a whole max_ejection starts over at base.
        if inner.state == State::Closed && now.duration_since(inner.closed_since) >= s.max_ejection
        {
            inner.ejections = 0;
        }
        let doublings = inner.ejections.min(30);
        let ejection = s
            .base_ejection
            .saturating_mul(1u32 << doublings)
            .min(s.max_ejection);
        inner.draws = inner.draws.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let u = (switchyard_config::hash::mix(inner.draws) >> 11) as f64 / (1u64 << 53) as f64;
        let jittered = ejection.mul_f64(0.9 + 0.2 * u).min(s.max_ejection);
        inner.ejections += 1;
        inner.until = now + jittered;
        inner.consecutive = 0;
        inner.slices.clear();
        self.ejections.inc();
        let why = format!("{why}; ejected for {:.1}s", jittered.as_secs_f64());
        self.set_state(inner, State::Open, &why);
    }

    fn set_state(&self, inner: &mut Inner, to: State, why: &str) {
        let from = inner.state;
        inner.state = to;
        if to == State::Closed {
            inner.closed_since = Instant::now();
        }
        self.state.store(to as u8, Ordering::Release);
        self.gauge.set(to as i64);
        if to == State::Open {
            tracing::warn!(model = %self.model, variant = %self.variant, from = from.as_str(), to = to.as_str(), reason = %why, "Circuit breaker opened.");
        } else {
            tracing::info!(model = %self.model, variant = %self.variant, from = from.as_str(), to = to.as_str(), reason = %why, "Circuit breaker changed state.");
        }
    }

    /// What `/admin/state` shows of this variant.
    pub fn snapshot(&self) -> serde_json::Value {
        let left = self.ejected_for(Instant::now());
        let inner = self.lock();
        let ejected_for = (inner.state == State::Open).then_some(left.as_secs_f64());
        serde_json::json!({
            "breaker": inner.state.as_str(),
            "in_flight": self.in_flight(),
            "consecutive_failures": inner.consecutive,
            "ejections": inner.ejections,
            "ejected_for_seconds": ejected_for,
        })
    }

    /// The ejection an open breaker has left (zero when not open).
    pub fn ejected_for(&self, now: Instant) -> Duration {
        let inner = self.lock();
        if inner.state == State::Open {
            inner.until.saturating_duration_since(now)
        } else {
            Duration::ZERO
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A remote gRPC variant's server-side failure statuses (trailers-only, so in the
    /// headers) count as a 5xx for its breaker and retries; its client-side ones (a
    /// NOT_FOUND, an INVALID_ARGUMENT) and OK do not.
    #[test]
    fn grpc_failure_statuses_are_failures() {
        for (code, failed) in [
            ("14", true),
            ("13", true),
            ("4", true),
            ("2", true),
            ("0", false),
            ("5", false),
            ("3", false),
        ] {
            let mut resp = crate::grpc::status(crate::error::GrpcCode::Ok, "x");
            resp.headers_mut()
                .insert("grpc-status", http::HeaderValue::from_static(code));
            assert_eq!(
                failure_kind(&Ok(resp)).is_some(),
                failed,
                "grpc-status {code}"
            );
        }
        // gRPC is HTTP/2's: an HTTP/1.1 answer's `grpc-status` field is not a status.
        let unavailable = || crate::grpc::status(crate::error::GrpcCode::Unavailable, "x");
        assert!(failure_kind(&Ok(unavailable())).is_some());
        assert_eq!(crate::grpc::status_of(&unavailable()), 503);
        let mut resp = unavailable();
        *resp.version_mut() = http::Version::HTTP_11;
        assert_eq!(crate::grpc::status_of(&resp), 200);
        assert!(failure_kind(&Ok(resp)).is_none());
    }

    fn health(settings: Breaker, max_in_flight: usize) -> Health {
        let gauge = IntGauge::new("g", "g").unwrap();
        let ejections = IntCounter::new("e", "e").unwrap();
        Health::new(
            "m",
            "v",
            &settings,
            &Limits { max_in_flight },
            gauge,
            ejections,
        )
    }

    fn fail(h: &Health) {
        h.admit(Instant::now()).unwrap().record(Outcome::Failure);
    }

    /// A backend that answers every request with one status.
    struct Status(u16);

    impl tower_service::Service<()> for Status {
        type Response = http::Response<crate::body::ProxyBody>;
        type Error = RouterError;
        type Future = std::future::Ready<Result<Self::Response, RouterError>>;

        fn poll_ready(
            &mut self,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), RouterError>> {
            std::task::Poll::Ready(Ok(()))
        }

        fn call(&mut self, (): ()) -> Self::Future {
            let mut resp = http::Response::new(crate::body::ProxyBody::full(bytes::Bytes::new()));
            *resp.status_mut() = http::StatusCode::from_u16(self.0).unwrap();
            std::future::ready(Ok(resp))
        }
    }

    fn ready<S: tower_service::Service<(), Error = RouterError>>(
        svc: &mut S,
    ) -> Result<(), RouterError> {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match svc.poll_ready(&mut cx) {
            std::task::Poll::Ready(r) => r,
            std::task::Poll::Pending => panic!("a guard never waits"),
        }
    }

    fn not_ready(r: Result<(), RouterError>) -> NotReady {
        match r {
            Err(RouterError::NotReady(why)) => why,
            other => panic!("expected not ready, got {other:?}"),
        }
    }

    /// The layer's readiness is the breaker's and the limit's: 500s through the guard
    /// open the breaker, which makes the service not ready until the ejection ends; then
    /// exactly one guard is ready (the probe), and its success makes the others ready.
    /// A guard that is ready holds a slot, so `max_in_flight` ready guards fill it.
    #[tokio::test(start_paused = true)]
    async fn a_guarded_service_is_ready_only_when_its_variant_can_take_a_request() {
        use tower::Layer;
        use tower_service::Service;
        let h = health(
            Breaker {
                consecutive_failures: 2,
                min_requests: 1000,
                base_ejection: Duration::from_secs(5),
                max_ejection: Duration::from_secs(60),
                ..Breaker::default()
            },
            2,
        );
        let layer = GuardLayer::new(&h);
        for _ in 0..2 {
            let mut svc = layer.layer(Status(500));
            ready(&mut svc).unwrap();
            let resp = svc.call(()).await.unwrap();
            assert_eq!(resp.status(), 500);
        }
        assert_eq!(h.state(), State::Open);
        assert_eq!(
            not_ready(ready(&mut layer.layer(Status(200)))),
            NotReady::Ejected
        );

        tokio::time::advance(Duration::from_secs(6)).await;
        let mut probe = layer.layer(Status(200));
        ready(&mut probe).unwrap();
        assert_eq!(h.state(), State::HalfOpen);
        assert_eq!(
            not_ready(ready(&mut layer.layer(Status(200)))),
            NotReady::Ejected
        );
        probe.call(()).await.unwrap();
        assert_eq!(h.state(), State::Closed);

        let mut a = layer.layer(Status(200));
        let mut b = layer.layer(Status(200));
        ready(&mut a).unwrap();
        ready(&mut b).unwrap();
        assert_eq!(
            not_ready(ready(&mut layer.layer(Status(200)))),
            NotReady::Full
        );
        drop(a);
        let mut c = layer.layer(Status(200));
        ready(&mut c).unwrap();
        assert_eq!(h.in_flight(), 2, "b and c hold the slots");
        drop((b, c));
        assert_eq!(h.in_flight(), 0, "a guard dropped unused frees its slot");
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_failures_and_ejection_doubles_up_to_the_cap() {
        let h = health(
            Breaker {
                consecutive_failures: 3,
                min_requests: 1000,
                base_ejection: Duration::from_secs(5),
                max_ejection: Duration::from_secs(12),
                ..Breaker::default()
            },
            10,
        );
        fail(&h);
        fail(&h);
        h.admit(Instant::now()).unwrap().record(Outcome::Success);
        fail(&h);
        fail(&h);
        assert_eq!(h.state(), State::Closed, "a success resets the run");
        fail(&h);
        assert_eq!(h.state(), State::Open);
        assert_eq!(h.admit(Instant::now()).unwrap_err(), NotReady::Ejected);
        // Ejections: ~5 s, then ~10 s, then capped at 12 s (±10% jitter).
        let mut ejections = Vec::new();
        for _ in 0..3 {
            let left = h.ejected_for(Instant::now());
            ejections.push(left.as_secs_f64());
            tokio::time::advance(left).await;
            let probe = h.admit(Instant::now()).unwrap();
            assert!(probe.is_probe());
            assert_eq!(h.state(), State::HalfOpen);
            // Exactly one probe at a time.
            assert_eq!(h.admit(Instant::now()).unwrap_err(), NotReady::Ejected);
            probe.record(Outcome::Failure);
            assert_eq!(h.state(), State::Open);
        }
        assert!((4.5..=5.5).contains(&ejections[0]), "{ejections:?}");
        assert!((9.0..=11.0).contains(&ejections[1]), "{ejections:?}");
        assert!((10.8..=12.0).contains(&ejections[2]), "{ejections:?}");
        // A probe that succeeds closes it.
        tokio::time::advance(h.ejected_for(Instant::now())).await;
        h.admit(Instant::now()).unwrap().record(Outcome::Success);
        assert_eq!(h.state(), State::Closed);
        assert!(h.admit(Instant::now()).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn opens_on_the_failure_rate_over_the_window_once_enough_were_seen() {
        let h = health(
            Breaker {
                consecutive_failures: 100,
                failure_rate: 0.5,
                min_requests: 10,
                window: Duration::from_secs(10),
                ..Breaker::default()
            },
            10,
        );
        // Alternating: never two failures in a row, half failing.
        for i in 0..9 {
            let outcome = if i % 2 == 0 {
                Outcome::Success
            } else {
                Outcome::Failure
            };
            h.admit(Instant::now()).unwrap().record(outcome);
            tokio::time::advance(Duration::from_millis(100)).await;
        }
        assert_eq!(h.state(), State::Closed, "fewer than min_requests");
        fail(&h);
        assert_eq!(h.state(), State::Open, "5 of 10 failed");
    }

    #[tokio::test(start_paused = true)]
    async fn old_requests_leave_the_window() {
        let h = health(
            Breaker {
                consecutive_failures: 100,
                failure_rate: 0.5,
                min_requests: 4,
                window: Duration::from_secs(10),
                ..Breaker::default()
            },
            10,
        );
        fail(&h);
        fail(&h);
        h.admit(Instant::now()).unwrap().record(Outcome::Success);
        // Eleven seconds later the two failures are out of the window.
        tokio::time::advance(Duration::from_secs(11)).await;
        h.admit(Instant::now()).unwrap().record(Outcome::Success);
        h.admit(Instant::now()).unwrap().record(Outcome::Success);
        h.admit(Instant::now()).unwrap().record(Outcome::Success);
        fail(&h);
        assert_eq!(h.state(), State::Closed, "1 of 4 in the window");
    }

    #[tokio::test(start_paused = true)]
    async fn a_reloaded_window_forgets_what_it_has_passed() {
        let settings = |secs| Breaker {
            consecutive_failures: 100,
            failure_rate: 0.5,
            min_requests: 3,
            window: Duration::from_secs(secs),
            ..Breaker::default()
        };
        let h = health(settings(10), 10);
        fail(&h);
        fail(&h);
        h.reconfigure(&settings(2), &Limits { max_in_flight: 10 });
        // Three seconds on, the two failures are out of the new window (not the old).
        tokio::time::advance(Duration::from_secs(3)).await;
        h.admit(Instant::now()).unwrap().record(Outcome::Success);
        h.admit(Instant::now()).unwrap().record(Outcome::Success);
        fail(&h);
        assert_eq!(h.state(), State::Closed, "1 of 3 in the window, not 3 of 5");
    }

    #[tokio::test(start_paused = true)]
    async fn the_in_flight_limit_makes_a_variant_unready_until_a_slot_frees() {
        let h = health(Breaker::default(), 2);
        let a = h.admit(Instant::now()).unwrap();
        let b = h.admit(Instant::now()).unwrap();
        assert_eq!(h.ready(Instant::now()), Err(NotReady::Full));
        assert_eq!(h.admit(Instant::now()).unwrap_err(), NotReady::Full);
        drop(a);
        assert!(h.ready(Instant::now()).is_ok());
        drop(b);
        assert_eq!(h.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_abandoned_by_its_client_lets_another_probe_go() {
        let h = health(
            Breaker {
                consecutive_failures: 1,
                ..Breaker::default()
            },
            10,
        );
        fail(&h);
        tokio::time::advance(Duration::from_secs(6)).await;
        let probe = h.admit(Instant::now()).unwrap();
        assert!(probe.is_probe());
        drop(probe);
        let again = h.admit(Instant::now()).unwrap();
        assert!(again.is_probe());
    }
}

/// The failure kind a try's result counts as, for the breaker and the retry policy; `None`
/// when the variant did its job (any answer below 500) or the client is at fault.
pub(crate) fn failure_kind(
    result: &Result<http::Response<crate::body::ProxyBody>, RouterError>,
) -> Option<&'static str> {
    match result {
        // A gRPC failure status (trailers-only, so in the headers) is a 5xx too.
        Ok(resp) if resp.status().is_server_error() || crate::grpc::failed(resp) => Some("5xx"),
        Ok(_) => None,
        Err(RouterError::Upstream { kind, .. }) => Some(kind.as_str()),
        Err(RouterError::LocalTimeout(_)) => Some("timeout"),
        Err(RouterError::Inference(_)) => Some("5xx"),
        // A local model's full queue is load shedding, not a broken variant: counted
        // as a failure it would eject a busy model for seconds after its queue drained.
        Err(RouterError::Overloaded(_)) => None,
        Err(_) => None,
    }
}

/// Phases *limit* and *break* as a tower layer over a variant's backend: the service is
/// ready only while [`Health::admit`] gives it a slot (its breaker closed or its probe
/// free, under `max_in_flight`), and every answer is told to the breaker.
#[derive(Debug, Clone, Copy)]
pub struct GuardLayer<'a> {
    health: &'a Health,
    ignore_breaker: bool,
}

impl<'a> GuardLayer<'a> {
    /// Guards a variant by its health.
    pub fn new(health: &'a Health) -> Self {
        GuardLayer {
            health,
            ignore_breaker: false,
        }
    }

    /// Panic routing (every variant ejected, no fallback): only the in-flight limit holds.
    pub fn ignoring_breaker(health: &'a Health) -> Self {
        GuardLayer {
            health,
            ignore_breaker: true,
        }
    }
}

impl<'a, S> tower::Layer<S> for GuardLayer<'a> {
    type Service = Guard<'a, S>;

    fn layer(&self, inner: S) -> Guard<'a, S> {
        Guard {
            inner,
            layer: *self,
            permit: None,
        }
    }
}

/// See [`GuardLayer`]. Ready means a slot is held: `poll_ready` takes it, `call` spends it.
#[derive(Debug)]
pub struct Guard<'a, S> {
    inner: S,
    layer: GuardLayer<'a>,
    permit: Option<Permit<'a>>,
}

impl<'a, S, Req> tower_service::Service<Req> for Guard<'a, S>
where
    S: tower_service::Service<
        Req,
        Response = http::Response<crate::body::ProxyBody>,
        Error = RouterError,
    >,
{
    type Response = S::Response;
    type Error = RouterError;
    type Future = GuardFuture<'a, S::Future>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), RouterError>> {
        if self.permit.is_none() {
            let health = self.layer.health;
            let admitted = if self.layer.ignore_breaker {
                health.admit_ignoring_breaker()
            } else {
                health.admit(crate::clock::now())
            };
            // Not ready is an answer, not a wait: the split chooses another variant
            // at once, as linkerd's balancer skips unready endpoints.
            match admitted {
                Ok(permit) => self.permit = Some(permit),
                Err(why) => return std::task::Poll::Ready(Err(RouterError::NotReady(why))),
            }
        }
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        GuardFuture {
            inner: self.inner.call(req),
            permit: self.permit.take(),
        }
    }
}

pin_project_lite::pin_project! {
    /// A guarded request: tells the breaker how it ended, frees its slot when dropped
    /// (a cancelled request, a lost hedge, counts as neither success nor failure).
    pub struct GuardFuture<'a, F> {
        #[pin]
        inner: F,
        permit: Option<Permit<'a>>,
    }
}

impl<F> std::future::Future for GuardFuture<'_, F>
where
    F: std::future::Future<Output = Result<http::Response<crate::body::ProxyBody>, RouterError>>,
{
    type Output = F::Output;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        let this = self.project();
        let result = std::task::ready!(this.inner.poll(cx));
        if let Some(permit) = this.permit.take() {
            match failure_kind(&result) {
                Some(_) => permit.record(Outcome::Failure),
                // A client's own mistake says nothing of the variant.
                None if result.is_err() => drop(permit),
                None => permit.record(Outcome::Success),
            }
        }
        std::task::Poll::Ready(result)
    }
}
