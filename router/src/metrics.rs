//! Prometheus metrics of the data plane, registered on a registry passed down from
//! `main` (no globals). Labels are bounded: `model` and `variant` come from the config,
//! never from a request; rejections before a model is known carry only a `reason`.
//!
//! Per-variant handles are resolved once when the route table is built, so the hot path
//! touches atomics only (no label lookup, no lock).

use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};

use crate::error::UpstreamErrorKind;

/// Latency buckets in seconds: 100 µs to 30 s, for proxies in front of fast and slow
/// models alike.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

/// The data plane's metric families.
#[derive(Clone, Debug)]
pub struct Metrics {
    requests: IntCounterVec,
    duration: HistogramVec,
    phases: HistogramVec,
    upstream_errors: IntCounterVec,
    weight: GaugeVec,
    rejected: IntCounterVec,
    /// Client connections open now.
    pub connections_open: IntGauge,
    /// Client connections accepted since start.
    pub connections_total: IntCounter,
    /// Connections refused at `max_connections`.
    pub connections_refused: IntCounter,
    /// Idle HTTP/1.1 connections parked now (held without hyper's buffers).
    pub connections_parked: IntGauge,
    /// Times an idle HTTP/1.1 connection was parked, since start.
    pub connections_parked_total: IntCounter,
    /// Requests being handled now (until their response head is sent).
    pub in_flight: IntGauge,
    /// Decisions evicted from the full decision log before their feedback TTL.
    pub decisions_evicted: IntCounter,
    /// Queue, compute, batch-size and shed metrics of local models.
    pub local: switchyard_inference::batcher::LocalMetricFamilies,
    /// Mirroring, comparison and drop metrics of shadows.
    pub shadow: switchyard_shadow::ShadowMetricFamilies,
    /// Breakers, retries, fallbacks and hedges.
    pub resilience: ResilienceFamilies,
}

/// The resilience phases' metric families.
#[derive(Clone, Debug)]
pub struct ResilienceFamilies {
    /// `switchyard_variant_state{model,variant}`: 0 closed, 1 open, 2 half-open.
    pub state: IntGaugeVec,
    /// `switchyard_variant_ejections_total{model,variant}`.
    pub ejections: IntCounterVec,
    /// `switchyard_retries_total{model,reason}`.
    pub retries: IntCounterVec,
    /// `switchyard_retries_refused_total{model,reason}`: retries the budget refused.
    pub retries_refused: IntCounterVec,
    /// `switchyard_fallbacks_total{model,reason}`.
    pub fallbacks: IntCounterVec,
    /// `switchyard_hedges_total{model,outcome}`: `won` (the hedge answered first) or
    /// `lost`.
    pub hedges: IntCounterVec,
}

impl ResilienceFamilies {
    fn new(registry: &Registry) -> prometheus::Result<Self> {
        let counter =
            |name: &str, help: &str, labels: &[&str]| -> prometheus::Result<IntCounterVec> {
                let c = IntCounterVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(c.clone()))?;
                Ok(c)
            };
        let state = IntGaugeVec::new(
            Opts::new(
                "switchyard_variant_state",
                "Circuit breaker state per variant: 0 closed, 1 open (ejected), 2 half-open (one probe).",
            ),
            &["model", "variant"],
        )?;
        registry.register(Box::new(state.clone()))?;
        Ok(ResilienceFamilies {
            state,
            ejections: counter(
                "switchyard_variant_ejections_total",
                "Times a variant's circuit breaker opened.",
                &["model", "variant"],
            )?,
            retries: counter(
                "switchyard_retries_total",
                "Requests sent again to another variant, by the failure that caused it.",
                &["model", "reason"],
            )?,
            retries_refused: counter(
                "switchyard_retries_refused_total",
                "Retries the retry budget refused, by the failure that asked for them.",
                &["model", "reason"],
            )?,
            fallbacks: counter(
                "switchyard_fallbacks_total",
                "Requests answered by the model's fallback, by reason.",
                &["model", "reason"],
            )?,
            hedges: counter(
                "switchyard_hedges_total",
                "Hedged requests by outcome: won (the hedge answered first) or lost.",
                &["model", "outcome"],
            )?,
        })
    }
}

/// Handles for one (model, variant) pair.
#[derive(Clone, Debug)]
pub struct VariantMetrics {
    by_class: [IntCounter; 5],
    duration: Histogram,
    /// By [`Phase`].
    phases: [Histogram; 5],
    errors: UpstreamErrors,
    /// The variant's current share of traffic (a fraction; a model's sum to 1).
    pub weight: Gauge,
}

/// Where a request's time goes, as `switchyard_phase_duration_seconds` and
/// `server-timing` name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// From the request's arrival to a variant chosen and its body under way.
    Route = 0,
    /// Local variants: waiting for a batch.
    Queue = 1,
    /// Local variants: the batch's run.
    Compute = 2,
    /// Remote variants: from sending upstream to its response head.
    Upstream = 3,
    /// Local variants: from the outputs to the answer (encoding, compression).
    Respond = 4,
}

impl Phase {
    /// Every phase, in order.
    pub const ALL: [Phase; 5] = [
        Phase::Route,
        Phase::Queue,
        Phase::Compute,
        Phase::Upstream,
        Phase::Respond,
    ];

    /// The `phase` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Route => "route",
            Phase::Queue => "queue",
            Phase::Compute => "compute",
            Phase::Upstream => "upstream",
            Phase::Respond => "respond",
        }
    }
}

impl VariantMetrics {
    /// Counts `d` spent in `phase`.
    pub fn phase(&self, phase: Phase, d: std::time::Duration) {
        self.phases[phase as usize].observe(d.as_secs_f64());
    }

    /// A phase's histogram (for `pulse`'s means over a window).
    pub fn phase_histogram(&self, phase: Phase) -> &Histogram {
        &self.phases[phase as usize]
    }

    /// Answers so far, by status class (1xx to 5xx).
    pub fn counts(&self) -> [u64; 5] {
        self.by_class.each_ref().map(IntCounter::get)
    }

    /// The latency histogram (for `pulse`'s percentiles over a window).
    pub fn duration(&self) -> &Histogram {
        &self.duration
    }

    /// Counts one answer with `status` that took `seconds` to its response head.
    pub fn record(&self, status: u16, seconds: f64) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.by_class[class].inc();
        self.duration.observe(seconds);
    }

    /// Counts one upstream failure.
    pub fn upstream_error(&self, kind: UpstreamErrorKind) {
        self.errors.inc(kind);
    }

    /// The variant's `switchyard_upstream_errors_total` handles, for its upstream client
    /// to count the failures of answer bodies, which come after the try is over.
    pub fn upstream_errors(&self) -> &UpstreamErrors {
        &self.errors
    }
}

/// One variant's `switchyard_upstream_errors_total` handles, by kind; cheap to clone
/// (one `Arc`).
#[derive(Debug, Clone)]
pub struct UpstreamErrors(std::sync::Arc<[IntCounter; 4]>);

impl UpstreamErrors {
    /// Counts one failure of `kind`.
    pub fn inc(&self, kind: UpstreamErrorKind) {
        let i = UpstreamErrorKind::ALL
            .iter()
            .position(|k| *k == kind)
            .unwrap_or_default();
        self.0[i].inc();
    }
}

impl Metrics {
    /// Creates the families and registers them on `registry`.
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let requests = IntCounterVec::new(
            Opts::new(
                "switchyard_requests_total",
                "Requests answered per model and variant, by status class (1xx..5xx).",
            ),
            &["model", "variant", "class"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "switchyard_request_duration_seconds",
                "Time from receiving a request to sending its response head, per model and variant.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["model", "variant"],
        )?;
        let phases = HistogramVec::new(
            HistogramOpts::new(
                "switchyard_phase_duration_seconds",
                "Where requests' time goes, per model, variant and phase: route, then upstream (remote variants) or queue, compute and respond (local variants).",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["model", "variant", "phase"],
        )?;
        let upstream_errors = IntCounterVec::new(
            Opts::new(
                "switchyard_upstream_errors_total",
                "Upstream failures per model and variant, by kind (connect, timeout, reset, protocol), of a try or of an answer's body after its head.",
            ),
            &["model", "variant", "kind"],
        )?;
        let weight = GaugeVec::new(
            Opts::new(
                "switchyard_variant_weight",
                "Current share of a model's traffic sent to each variant (a fraction; a model's weights sum to 1).",
            ),
            &["model", "variant"],
        )?;
        let rejected = IntCounterVec::new(
            Opts::new(
                "switchyard_rejected_requests_total",
                "Requests refused before a variant was chosen, by reason.",
            ),
            &["reason"],
        )?;
        let connections_open = IntGauge::new(
            "switchyard_connections_open",
            "Client connections open on the data plane.",
        )?;
        let connections_total = IntCounter::new(
            "switchyard_connections_total",
            "Client connections accepted on the data plane since start.",
        )?;
        let connections_refused = IntCounter::new(
            "switchyard_connections_refused_total",
            "Client connections answered 503 and closed because max_connections were open.",
        )?;
        registry.register(Box::new(connections_refused.clone()))?;
        let connections_parked = IntGauge::new(
            "switchyard_connections_parked",
            "Idle HTTP/1.1 client connections parked now: held as bare sockets, without \
             hyper's buffers, until their next request.",
        )?;
        let connections_parked_total = IntCounter::new(
            "switchyard_connections_parked_total",
            "Times an idle HTTP/1.1 client connection was parked, since start.",
        )?;
        registry.register(Box::new(connections_parked.clone()))?;
        registry.register(Box::new(connections_parked_total.clone()))?;
        let in_flight = IntGauge::new(
            "switchyard_requests_in_flight",
            "Requests being handled now, until their response head is sent.",
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(phases.clone()))?;
        registry.register(Box::new(upstream_errors.clone()))?;
        registry.register(Box::new(weight.clone()))?;
        registry.register(Box::new(rejected.clone()))?;
        registry.register(Box::new(connections_open.clone()))?;
        registry.register(Box::new(connections_total.clone()))?;
        registry.register(Box::new(in_flight.clone()))?;
        let local = switchyard_inference::batcher::LocalMetricFamilies::new(registry)?;
        let shadow = switchyard_shadow::ShadowMetricFamilies::new(registry)?;
        let decisions_evicted = IntCounter::new(
            "switchyard_decisions_evicted_total",
            "Decisions evicted before their feedback_ttl because the decision log \
             (bandit.decision_log_capacity) was full; their feedback is answered 410.",
        )?;
        registry.register(Box::new(decisions_evicted.clone()))?;
        Ok(Metrics {
            resilience: ResilienceFamilies::new(registry)?,
            decisions_evicted,
            local,
            shadow,
            requests,
            duration,
            phases,
            upstream_errors,
            weight,
            rejected,
            connections_open,
            connections_total,
            connections_refused,
            connections_parked,
            connections_parked_total,
            in_flight,
        })
    }

    /// Requests answered by each model's fallback so far, all reasons together.
    pub fn fallbacks_by_model(&self) -> std::collections::HashMap<String, u64> {
        use prometheus::core::Collector;
        let mut out = std::collections::HashMap::new();
        for family in self.resilience.fallbacks.collect() {
            for m in family.get_metric() {
                if let Some(model) = m.get_label().iter().find(|l| l.name() == "model") {
                    *out.entry(model.value().to_string()).or_default() +=
                        m.get_counter().get_value() as u64;
                }
            }
        }
        out
    }

    /// Removes the series of `model`'s `variant` (a reload removed it).
    pub fn forget_variant(&self, model: &str, variant: &str) {
        let labels = [("model", model), ("variant", variant)];
        forget(&self.requests, &labels);
        forget(&self.duration, &labels);
        forget(&self.phases, &labels);
        forget(&self.upstream_errors, &labels);
        forget(&self.weight, &labels);
        forget(&self.resilience.state, &labels);
        forget(&self.resilience.ejections, &labels);
    }

    /// Removes the series of `model` itself (a reload removed it, or its local
    /// variant); its variants' and shadows' go with [`Metrics::forget_variant`] and the
    /// shadow families.
    pub fn forget_model(&self, model: &str) {
        let labels = [("model", model)];
        let r = &self.resilience;
        for vec in [&r.retries, &r.retries_refused, &r.fallbacks, &r.hedges] {
            forget(vec, &labels);
        }
    }

    /// Resolves the handles of one (model, variant) pair.
    pub fn variant(&self, model: &str, variant: &str) -> VariantMetrics {
        let class = |c: &str| self.requests.with_label_values(&[model, variant, c]);
        VariantMetrics {
            by_class: [
                class("1xx"),
                class("2xx"),
                class("3xx"),
                class("4xx"),
                class("5xx"),
            ],
            duration: self.duration.with_label_values(&[model, variant]),
            phases: Phase::ALL
                .map(|p| self.phases.with_label_values(&[model, variant, p.as_str()])),
            errors: UpstreamErrors(std::sync::Arc::new(UpstreamErrorKind::ALL.map(|k| {
                self.upstream_errors
                    .with_label_values(&[model, variant, k.as_str()])
            }))),
            weight: self.weight.with_label_values(&[model, variant]),
        }
    }

    /// Counts a request refused before a variant was chosen.
    pub fn rejected(&self, reason: &'static str) {
        self.rejected.with_label_values(&[reason]).inc();
    }
}

/// Removes every series of `vec` whose labels include all of `labels` (the families'
/// other labels, a reason or a status class, are whatever was recorded).
fn forget<T: prometheus::core::MetricVecBuilder>(
    vec: &prometheus::core::MetricVec<T>,
    labels: &[(&str, &str)],
) {
    use prometheus::core::Collector;
    for family in vec.collect() {
        for m in family.get_metric() {
            let pairs: std::collections::HashMap<&str, &str> = m
                .get_label()
                .iter()
                .map(|l| (l.name(), l.value()))
                .collect();
            if labels.iter().all(|(k, v)| pairs.get(k) == Some(v)) {
                let _ = vec.remove(&pairs);
            }
        }
    }
}
