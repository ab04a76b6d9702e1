//! A model's resilience settings: its variants' circuit breakers, their in-flight
//! limits, retries within a budget, hedging, and the local variant that answers when
//! the others cannot (`fallback`).

use std::time::Duration;

use serde::Serialize;

use crate::decode::{self, child, Cx, Fields};
use crate::yaml::Node;

/// One breaker per variant, with these settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Breaker {
    /// Open after this many failures in a row. Default 5.
    pub consecutive_failures: u32,
    /// Or when this share of the requests over `window` failed, once `min_requests`
    /// were seen. Default 0.5.
    pub failure_rate: f64,
    /// Requests over `window` before `failure_rate` applies. Default 20.
    pub min_requests: u32,
    /// The span `failure_rate` is measured over. Default `10s`.
    #[serde(serialize_with = "crate::duration::serialize")]
    pub window: Duration,
    /// The first ejection; each re-open doubles it (with jitter). Default `5s`.
    #[serde(serialize_with = "crate::duration::serialize")]
    pub base_ejection: Duration,
    /// The longest ejection. Default `60s`.
    #[serde(serialize_with = "crate::duration::serialize")]
    pub max_ejection: Duration,
}

impl Default for Breaker {
    fn default() -> Self {
        Breaker {
            consecutive_failures: 5,
            failure_rate: 0.5,
            min_requests: 20,
            window: Duration::from_secs(10),
            base_ejection: Duration::from_secs(5),
            max_ejection: Duration::from_secs(60),
        }
    }
}

/// Per-variant limits.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Limits {
    /// Requests in flight to one variant at once; beyond it the request goes to another
    /// variant or the fallback. Default 256.
    pub max_in_flight: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_in_flight: 256 }
    }
}

/// Which failures are retried on another variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RetryOn {
    /// The connection could not be opened: nothing was sent.
    pub connect: bool,
    /// The connection closed before any response byte (a reused pooled connection the
    /// upstream had closed).
    pub reset: bool,
    /// The upstream answered 5xx.
    #[serde(rename = "5xx")]
    pub status_5xx: bool,
    /// No response head within `request_timeout`.
    pub timeout: bool,
}

/// Retries within a budget.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Retry {
    /// Failure kinds retried. Default `[connect, reset]`: predictions are reads, and
    /// those two never reached a model.
    pub on: RetryOn,
    /// Retries at most this share of requests (over the last 10 s), plus `min_per_second`.
    /// Default 0.2.
    pub budget: f64,
    /// Retries always allowed per second, whatever the share. Default 3.
    pub min_per_second: u32,
    /// Bodies above this are streamed to one variant and not retried or hedged (they
    /// would have to be held in memory). Default 1 MiB.
    pub max_body_bytes: u64,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            on: RetryOn {
                connect: true,
                reset: true,
                status_5xx: false,
                timeout: false,
            },
            budget: 0.2,
            min_per_second: 3,
            max_body_bytes: 1024 * 1024,
        }
    }
}

pub(crate) fn decode_breaker(cx: &mut Cx, node: &Node, path: &str) -> Option<Breaker> {
    let f = Fields::new(
        cx,
        node,
        path,
        &[
            "consecutive_failures",
            "failure_rate",
            "min_requests",
            "window",
            "base_ejection",
            "max_ejection",
        ],
    )?;
    let d = Breaker::default();
    let count = |cx: &mut Cx, n: &Node, p: &str| {
        let v = decode::u64(cx, n, p)?;
        if v == 0 || v > u64::from(u32::MAX) {
            cx.error(
                n,
                p,
                format!("must be between 1 and {}, found {v}", u32::MAX),
            );
            return None;
        }
        u32::try_from(v).ok()
    };
    let consecutive_failures = f.optional(cx, "consecutive_failures", count);
    let failure_rate = f.optional(cx, "failure_rate", |cx, n, p| {
        let v = decode::f64(cx, n, p)?;
        if !(v > 0.0 && v <= 1.0) {
            cx.error(n, p, format!("must be in (0, 1], found {v}"));
            return None;
        }
        Some(v)
    });
    let min_requests = f.optional(cx, "min_requests", count);
    let window = f.optional(cx, "window", decode::duration);
    let base_ejection = f.optional(cx, "base_ejection", decode::duration);
    let max_ejection = f.optional(cx, "max_ejection", decode::duration);
    let b = Breaker {
        consecutive_failures: consecutive_failures.unwrap_or(d.consecutive_failures),
        failure_rate: failure_rate.unwrap_or(d.failure_rate),
        min_requests: min_requests.unwrap_or(d.min_requests),
        window: window.unwrap_or(d.window),
        base_ejection: base_ejection.unwrap_or(d.base_ejection),
        max_ejection: max_ejection.unwrap_or(d.max_ejection),
    };
    if b.base_ejection > b.max_ejection {
        let n = f
            .get("max_ejection")
            .or(f.get("base_ejection"))
            .unwrap_or(node);
        cx.error(
            n,
            &child(path, "max_ejection"),
            format!(
                "must be at least base_ejection ({:?}), found {:?}",
                b.base_ejection, b.max_ejection
            ),
        );
        return None;
    }
    Some(b)
}

pub(crate) fn decode_limits(cx: &mut Cx, node: &Node, path: &str) -> Option<Limits> {
    let f = Fields::new(cx, node, path, &["max_in_flight"])?;
    let max_in_flight = f.optional(cx, "max_in_flight", |cx, n, p| {
        let v = decode::u64(cx, n, p)?;
        if v == 0 {
            cx.error(n, p, "must be at least 1");
            return None;
        }
        Some(usize::try_from(v).unwrap_or(usize::MAX))
    });
    Some(Limits {
        max_in_flight: max_in_flight.unwrap_or(Limits::default().max_in_flight),
    })
}

pub(crate) fn decode_retry(cx: &mut Cx, node: &Node, path: &str) -> Option<Retry> {
    let f = Fields::new(
        cx,
        node,
        path,
        &["on", "budget", "min_per_second", "max_body_bytes"],
    )?;
    let d = Retry::default();
    let on = f.optional(cx, "on", |cx, n, p| {
        let items = decode::seq(cx, n, p)?;
        let mut on = RetryOn {
            connect: false,
            reset: false,
            status_5xx: false,
            timeout: false,
        };
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            let kind = decode::one_of(
                cx,
                item,
                &format!("{p}[{i}]"),
                &[("connect", 0), ("reset", 1), ("5xx", 2), ("timeout", 3)],
            );
            match kind {
                Some(0) => on.connect = true,
                Some(1) => on.reset = true,
                Some(2) => on.status_5xx = true,
                Some(_) => on.timeout = true,
                None => ok = false,
            }
        }
        ok.then_some(on)
    });
    let budget = f.optional(cx, "budget", |cx, n, p| {
        let v = decode::f64(cx, n, p)?;
        if !(0.0..=1.0).contains(&v) {
            cx.error(n, p, format!("must be between 0 and 1, found {v}"));
            return None;
        }
        Some(v)
    });
    let min_per_second = f.optional(cx, "min_per_second", |cx, n, p| {
        let v = decode::u64(cx, n, p)?;
        u32::try_from(v)
            .map_err(|_| cx.error(n, p, format!("at most {}, found {v}", u32::MAX)))
            .ok()
    });
    let max_body_bytes = f.optional(cx, "max_body_bytes", decode::byte_size);
    Some(Retry {
        on: on.unwrap_or(d.on),
        budget: budget.unwrap_or(d.budget),
        min_per_second: min_per_second.unwrap_or(d.min_per_second),
        max_body_bytes: max_body_bytes.unwrap_or(d.max_body_bytes),
    })
}
