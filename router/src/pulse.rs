//! The live numbers behind `/admin/stream`, `/dashboard` and `switchyard demo`'s
//! terminal view: once a second, per model and variant, read from the handles the
//! request path already keeps (no second count of anything), with rates and latency
//! percentiles over the last second.
//!
//! One task samples; each `/admin/stream` client gets the samples through its own
//! bounded queue. A client that reads slower than one event a second loses events
//! (counted in `switchyard_stream_dropped_total`); it never slows the sampler, let alone
//! the data plane.

use std::collections::HashMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use prometheus::core::Metric;
use prometheus::{IntCounter, Registry};
use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc};

use crate::admin::StateFn;
use crate::metrics::Phase;
use crate::proxy::Router;

/// Events each stream client may have waiting before it starts losing them.
const CLIENT_QUEUE: usize = 4;

/// Sampled predictions each stream client may have waiting, besides the numbers.
const PREDICTIONS_QUEUE: usize = 64;

/// Samples kept for a page that opens now (its charts start full): two minutes.
const HISTORY: usize = 120;

/// The sampler's output: the latest numbers, and the feed of them.
pub struct Pulse {
    latest: ArcSwap<Value>,
    history: std::sync::Mutex<std::collections::VecDeque<Arc<Value>>>,
    feed: broadcast::Sender<Bytes>,
    dropped: IntCounter,
}

impl std::fmt::Debug for Pulse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pulse").finish_non_exhaustive()
    }
}

/// What one variant's counters said at the last sample.
#[derive(Default, Clone)]
struct Seen {
    by_class: [u64; 5],
    /// Cumulative counts per latency bucket (the histogram's upper bounds are
    /// `metrics::LATENCY_BUCKETS`), then +Inf.
    buckets: Vec<u64>,
    /// Per `metrics::Phase`: seconds and observations so far.
    phases: [(f64, u64); 5],
}

impl Pulse {
    /// Registers the dropped-events counter; [`Pulse::run`] then samples.
    pub fn new(registry: &Registry) -> prometheus::Result<Arc<Self>> {
        let dropped = IntCounter::new(
            "switchyard_stream_dropped_total",
            "Events of /admin/stream not delivered because a client read too slowly.",
        )?;
        registry.register(Box::new(dropped.clone()))?;
        let (feed, _) = broadcast::channel(CLIENT_QUEUE);
        Ok(Arc::new(Pulse {
            latest: ArcSwap::from_pointee(json!({ "type": "numbers", "models": {} })),
            history: Default::default(),
            feed,
            dropped,
        }))
    }

    /// The latest sample.
    pub fn latest(&self) -> Arc<Value> {
        self.latest.load_full()
    }

    /// The samples of the last two minutes, oldest first.
    pub fn history(&self) -> Vec<Arc<Value>> {
        let h = self.history.lock().unwrap_or_else(|p| p.into_inner());
        h.iter().cloned().collect()
    }

    /// Samples every second until `done` turns true.
    pub async fn run(
        self: Arc<Self>,
        router: Arc<Router>,
        state: Option<StateFn>,
        mut done: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut seen: HashMap<(String, String), Seen> = HashMap::new();
        let mut fallbacks_seen: HashMap<String, u64> = HashMap::new();
        let mut last = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = done.wait_for(|stopped| *stopped) => return,
            }
            let now = Instant::now();
            let secs = now.duration_since(last).as_secs_f64().max(1e-3);
            last = now;
            let bandits = state.as_ref().map(|f| f());
            let sample = sample(
                &router,
                bandits.as_ref(),
                secs,
                &mut seen,
                &mut fallbacks_seen,
            );
            self.publish(sample);
        }
    }

    /// Makes `sample` the latest, keeps it in the history and sends it to every stream.
    fn publish(&self, sample: Value) {
        let event = Bytes::from(format!("data: {sample}\n\n"));
        let sample = Arc::new(sample);
        {
            let mut h = self.history.lock().unwrap_or_else(|p| p.into_inner());
            if h.len() == HISTORY {
                h.pop_front();
            }
            h.push_back(sample.clone());
        }
        self.latest.store(sample);
        // No receiver is fine: nobody is watching.
        let _ = self.feed.send(event);
    }

    /// `GET /admin/stream`'s body: the latest sample at once, then one a second, and
    /// the sampled `predictions` (`capture:`) as they come.
    pub fn stream(&self, mut predictions: broadcast::Receiver<Bytes>) -> SseBody {
        let (tx, rx) = mpsc::channel(CLIENT_QUEUE + PREDICTIONS_QUEUE);
        let first = Bytes::from(format!("data: {}\n\n", self.latest()));
        let mut feed = self.feed.subscribe();
        let dropped = self.dropped.clone();
        tokio::spawn(async move {
            // A full queue: this client is behind; the event is dropped, not waited for.
            let offer = |event: Bytes| match tx.try_send(event) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    dropped.inc();
                    true
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            };
            let mut predicting = true;
            loop {
                let open = tokio::select! {
                    numbers = feed.recv() => match numbers {
                        Ok(event) => offer(event),
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            dropped.inc_by(n);
                            true
                        }
                        Err(broadcast::error::RecvError::Closed) => false,
                    },
                    prediction = predictions.recv(), if predicting => match prediction {
                        Ok(p) => {
                            let mut event = Vec::with_capacity(p.len() + 8);
                            event.extend_from_slice(b"data: ");
                            event.extend_from_slice(&p);
                            event.extend_from_slice(b"\n\n");
                            offer(event.into())
                        }
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            dropped.inc_by(n);
                            true
                        }
                        Err(broadcast::error::RecvError::Closed) => {
                            predicting = false;
                            true
                        }
                    },
                    () = tx.closed() => false,
                };
                if !open {
                    return;
                }
            }
        });
        SseBody {
            first: Some(first),
            rx,
        }
    }
}

/// A Server-Sent Events body: frames as they come, until the client goes away.
pub struct SseBody {
    first: Option<Bytes>,
    rx: mpsc::Receiver<Bytes>,
}

impl Body for SseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(first) = self.first.take() {
            return Poll::Ready(Some(Ok(Frame::data(first))));
        }
        self.rx
            .poll_recv(cx)
            .map(|event| event.map(|e| Ok(Frame::data(e))))
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// One sample of every model in the live table.
fn sample(
    router: &Router,
    bandits: Option<&Value>,
    secs: f64,
    seen: &mut HashMap<(String, String), Seen>,
    fallbacks_seen: &mut HashMap<String, u64>,
) -> Value {
    let table = router.table();
    let fallbacks = router.metrics().fallbacks_by_model();
    let mut models = serde_json::Map::new();
    let mut names: Vec<_> = table.models().collect();
    names.sort_by(|a, b| a.name.cmp(&b.name));
    for model in names {
        let bandit = bandits.and_then(|b| b["models"].get(&model.name));
        let mut variants = Vec::with_capacity(model.variants.len());
        for v in model.variants.iter() {
            let now = Seen {
                by_class: v.metrics.counts(),
                buckets: buckets(v.metrics.duration()),
                phases: Phase::ALL.map(|p| {
                    let h = v.metrics.phase_histogram(p);
                    (h.get_sample_sum(), h.get_sample_count())
                }),
            };
            let before = seen
                .insert((model.name.clone(), v.name.clone()), now.clone())
                .unwrap_or_default();
            let delta = |i: usize| now.by_class[i].saturating_sub(before.by_class[i]);
            let answered: u64 = (0..5).map(delta).sum();
            let window: Vec<u64> = now
                .buckets
                .iter()
                .enumerate()
                .map(|(i, c)| c.saturating_sub(before.buckets.get(i).copied().unwrap_or(0)))
                .collect();
            // Mean milliseconds per phase over the window, for the phases it saw.
            let mut phases = serde_json::Map::new();
            for (i, p) in Phase::ALL.iter().enumerate() {
                let n = now.phases[i].1.saturating_sub(before.phases[i].1);
                if n > 0 {
                    let secs = now.phases[i].0 - before.phases[i].0;
                    phases.insert(p.as_str().into(), json!(secs * 1000.0 / n as f64));
                }
            }
            let health = v.health.snapshot();
            let mut out = json!({
                "name": v.name,
                "weight": v.metrics.weight.get(),
                "rps": answered as f64 / secs,
                "errors_per_s": delta(4) as f64 / secs,
                "p50_ms": quantile(&window, 0.5).map(|s| s * 1000.0),
                "p99_ms": quantile(&window, 0.99).map(|s| s * 1000.0),
                "requests": now.by_class.iter().sum::<u64>(),
                "failed": now.by_class[4],
                "breaker": health["breaker"],
                "in_flight": health["in_flight"],
                "local": matches!(v.backend, crate::table::Backend::Local(_)),
                "phases_ms": phases,
            });
            if let Some(b) = bandit.and_then(|b| b["variants"].get(&v.name)) {
                let rewards = b["rewards"].as_f64().unwrap_or(0.0);
                let revenue = b["revenue_total"].as_f64().unwrap_or(0.0);
                let cost = b["cost_total"].as_f64().unwrap_or(0.0);
                out["revenue"] = revenue.into();
                out["cost"] = cost.into();
                out["rewards"] = b["rewards"].clone();
                out["profit_per_1k"] =
                    json!((rewards > 0.0).then(|| (revenue - cost) / rewards * 1000.0));
                out["posterior_mean"] = b["posterior_mean"].clone();
            }
            variants.push(out);
        }
        let total_fallbacks = fallbacks.get(&model.name).copied().unwrap_or(0);
        let fallback_delta = total_fallbacks.saturating_sub(
            fallbacks_seen
                .insert(model.name.clone(), total_fallbacks)
                .unwrap_or(0),
        );
        let shadows: Vec<Value> = model.shadows.as_ref().map_or_else(Vec::new, |s| {
            s.report()["shadows"]
                .as_array()
                .map(|all| {
                    all.iter()
                        .map(|r| {
                            json!({
                                "name": r["name"],
                                "mirrored": r["mirrored"],
                                "compared": r["compared"],
                                "agreement": r["agreement"],
                                "mean_max_abs_diff": r["max_abs_diff"]["mean"],
                            })
                        })
                        .collect()
                })
                .unwrap_or_default()
        });
        models.insert(
            model.name.clone(),
            json!({
                "variants": variants,
                "fallbacks": total_fallbacks,
                "fallbacks_per_s": fallback_delta as f64 / secs,
                "shadows": shadows,
                "bandit": bandit.map(|b| json!({ "objective": b["objective"], "override": b["override"] })),
            }),
        );
    }
    // Variants gone from the table are forgotten with it.
    seen.retain(|(m, v), _| {
        table
            .model(m)
            .is_some_and(|r| r.variants.iter().any(|x| &x.name == v))
    });
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    json!({ "type": "numbers", "t": t, "models": models })
}

/// A histogram's cumulative bucket counts, +Inf last.
fn buckets(h: &prometheus::Histogram) -> Vec<u64> {
    let m = h.metric();
    let hist = m.get_histogram();
    let mut out: Vec<u64> = hist
        .get_bucket()
        .iter()
        .map(|b| b.cumulative_count())
        .collect();
    out.push(hist.get_sample_count());
    out
}

/// The `q` quantile, in seconds, of the window's cumulative bucket counts (upper
/// bounds `LATENCY_BUCKETS`, then +Inf), interpolated within its bucket as Prometheus'
/// `histogram_quantile` does; `None` for an empty window.
fn quantile(window: &[u64], q: f64) -> Option<f64> {
    let bounds = crate::metrics::LATENCY_BUCKETS;
    let total = *window.last()?;
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut below = 0u64;
    let mut lower = 0.0;
    for (i, &count) in window.iter().enumerate() {
        let upper = bounds.get(i).copied();
        if count as f64 >= rank {
            let Some(upper) = upper else {
                // Past the last bound: say the last bound, as Prometheus does.
                return bounds.last().copied();
            };
            let in_bucket = (count - below) as f64;
            let frac = if in_bucket > 0.0 {
                (rank - below as f64) / in_bucket
            } else {
                1.0
            };
            return Some(lower + (upper - lower) * frac.clamp(0.0, 1.0));
        }
        below = count;
        lower = upper.unwrap_or(lower);
    }
    bounds.last().copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream client that reads nothing holds at most its queue: later samples are
    /// dropped for it and counted, publishing never waits, and a client that reads gets
    /// the newest sample again.
    #[tokio::test]
    async fn a_stream_that_is_not_read_loses_events_and_holds_nothing_up() {
        let pulse = Pulse::new(&Registry::new()).unwrap();
        let (_predictions, none) = broadcast::channel(1);
        let mut body = pulse.stream(none);
        // Let the client's task subscribe before anything is published.
        tokio::task::yield_now().await;
        for i in 0..150 {
            pulse.publish(json!({ "n": i }));
            tokio::task::yield_now().await;
        }
        // Bounded: the forwarding task runs on this runtime.
        for _ in 0..100 {
            if pulse.dropped.get() >= 80 {
                break;
            }
            tokio::task::yield_now().await;
        }
        let dropped = pulse.dropped.get();
        let queue = (CLIENT_QUEUE + PREDICTIONS_QUEUE) as u64;
        assert!(dropped >= 150 - queue - 2, "only {dropped} of 150 dropped");
        assert_eq!(pulse.history().len(), HISTORY);
        // What it reads: the first sample it was given, then what its queue held.
        let mut read = Vec::new();
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        while let Poll::Ready(Some(Ok(frame))) = Pin::new(&mut body).poll_frame(&mut cx) {
            read.push(String::from_utf8(frame.into_data().unwrap().to_vec()).unwrap());
        }
        assert!(
            read.len() <= CLIENT_QUEUE + PREDICTIONS_QUEUE + 1,
            "{read:?}"
        );
        assert!(read[0].starts_with("data: {"), "{read:?}");
    }

    /// 100 answers: 50 in (0.5 ms, 1 ms], 49 in (1, 2.5], 1 in (25, 50]: the median is
    /// at the top of the first of them, p99 at the top of the second.
    #[test]
    fn quantiles_interpolate_within_their_bucket() {
        // Bounds (ms): 0.1 0.25 0.5 1 2.5 5 10 25 50 ...
        let mut window = vec![0u64; 18];
        let add = |w: &mut Vec<u64>, from: usize, n: u64| {
            for c in w.iter_mut().skip(from) {
                *c += n;
            }
        };
        add(&mut window, 3, 50);
        add(&mut window, 4, 49);
        add(&mut window, 8, 1);
        let p50 = quantile(&window, 0.5).unwrap();
        assert!((p50 - 0.001).abs() < 1e-12, "{p50}");
        let p99 = quantile(&window, 0.99).unwrap();
        assert!((p99 - 0.0025).abs() < 1e-12, "{p99}");
        assert_eq!(quantile(&[0; 18], 0.5), None);
    }
}
