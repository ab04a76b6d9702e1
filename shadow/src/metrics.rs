//! Prometheus families for shadows, registered on the registry passed down from `main`.
//! Labels are `model` and `shadow` (both from the config) plus a fixed reason or verdict.

use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts,
    Registry,
};

use crate::compare::Verdict;

/// Why a selected request was not mirrored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// The shadow's queue was full (it is slow, dead or over its concurrency cap).
    QueueFull,
    /// The request body was over the model's body limit.
    TooLarge,
    /// The client's body broke off before it was complete.
    BodyError,
}

impl DropReason {
    /// Every reason, in the order of the per-shadow handles.
    pub const ALL: [DropReason; 3] = [
        DropReason::QueueFull,
        DropReason::TooLarge,
        DropReason::BodyError,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::QueueFull => "queue_full",
            DropReason::TooLarge => "too_large",
            DropReason::BodyError => "body_error",
        }
    }
}

/// How a mirror that was sent failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShadowErrorKind {
    /// No connection could be made.
    Connect,
    /// No complete answer within the shadow's `request_timeout`.
    Timeout,
    /// The connection broke or the answer was not HTTP.
    Reset,
}

impl ShadowErrorKind {
    /// Every kind, in the order of the per-shadow handles.
    pub const ALL: [ShadowErrorKind; 3] = [
        ShadowErrorKind::Connect,
        ShadowErrorKind::Timeout,
        ShadowErrorKind::Reset,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            ShadowErrorKind::Connect => "connect",
            ShadowErrorKind::Timeout => "timeout",
            ShadowErrorKind::Reset => "reset",
        }
    }
}

/// The families; cheap to clone.
#[derive(Clone, Debug)]
pub struct ShadowMetricFamilies {
    capture_looked: IntCounterVec,
    capture_borderline: IntCounterVec,
    capture_dropped: IntCounterVec,
    mirrored: IntCounterVec,
    dropped: IntCounterVec,
    errors: IntCounterVec,
    compared: IntCounterVec,
    agreement: GaugeVec,
    divergence: HistogramVec,
    duration: HistogramVec,
}

/// Handles for one (model, shadow), resolved once so the request path touches atomics only.
#[derive(Clone, Debug)]
pub struct ShadowMetrics {
    pub(crate) mirrored: IntCounter,
    pub(crate) dropped: [IntCounter; 3],
    pub(crate) errors: [IntCounter; 3],
    pub(crate) compared: [IntCounter; 6],
    pub(crate) agreement: Gauge,
    pub(crate) divergence: Histogram,
    pub(crate) duration: Histogram,
}

impl ShadowMetricFamilies {
    /// Creates the families and registers them on `registry`.
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let two = ["model", "shadow"];
        let per_model =
            |name: &str, help: &str| IntCounterVec::new(Opts::new(name, help), &["model"]);
        let f = ShadowMetricFamilies {
            capture_looked: per_model(
                "switchyard_capture_predictions_total",
                "Answered predictions `capture` looked at (sampled), per model.",
            )?,
            capture_borderline: per_model(
                "switchyard_capture_borderline_total",
                "Borderline predictions (top-1 minus top-2 below capture.margin) queued for the capture file.",
            )?,
            capture_dropped: per_model(
                "switchyard_capture_dropped_total",
                "Borderline predictions not written: the writer's queue was full, or the write failed.",
            )?,
            mirrored: IntCounterVec::new(
                Opts::new(
                    "switchyard_shadow_mirrored_total",
                    "Requests copied to the shadow's queue.",
                ),
                &two,
            )?,
            dropped: IntCounterVec::new(
                Opts::new(
                    "switchyard_shadow_dropped_total",
                    "Requests chosen for the shadow but not mirrored, by reason.",
                ),
                &["model", "shadow", "reason"],
            )?,
            errors: IntCounterVec::new(
                Opts::new(
                    "switchyard_shadow_errors_total",
                    "Mirrors sent that got no answer, by kind.",
                ),
                &["model", "shadow", "kind"],
            )?,
            compared: IntCounterVec::new(
                Opts::new(
                    "switchyard_shadow_compared_total",
                    "Shadow answers compared with the primary's, by verdict (agree or the reason they differ).",
                ),
                &["model", "shadow", "verdict"],
            )?,
            agreement: GaugeVec::new(
                Opts::new(
                    "switchyard_shadow_agreement_ratio",
                    "Share of compared requests where the shadow agreed with the primary (top-1 per row).",
                ),
                &two,
            )?,
            divergence: HistogramVec::new(
                HistogramOpts::new(
                    "switchyard_shadow_divergence",
                    "Largest absolute difference between the shadow's and the primary's output values, per request.",
                )
                .buckets(vec![
                    1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.05, 0.1, 0.25, 0.5, 1.0, 10.0,
                ]),
                &two,
            )?,
            duration: HistogramVec::new(
                HistogramOpts::new(
                    "switchyard_shadow_duration_seconds",
                    "Time from sending a mirror to the end of the shadow's answer.",
                )
                .buckets(vec![
                    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                    0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                ]),
                &two,
            )?,
        };
        registry.register(Box::new(f.capture_looked.clone()))?;
        registry.register(Box::new(f.capture_borderline.clone()))?;
        registry.register(Box::new(f.capture_dropped.clone()))?;
        registry.register(Box::new(f.mirrored.clone()))?;
        registry.register(Box::new(f.dropped.clone()))?;
        registry.register(Box::new(f.errors.clone()))?;
        registry.register(Box::new(f.compared.clone()))?;
        registry.register(Box::new(f.agreement.clone()))?;
        registry.register(Box::new(f.divergence.clone()))?;
        registry.register(Box::new(f.duration.clone()))?;
        Ok(f)
    }

    /// The capture counters of `model`.
    pub fn for_capture(&self, model: &str) -> crate::capture::CaptureMetrics {
        crate::capture::CaptureMetrics {
            looked: self.capture_looked.with_label_values(&[model]),
            borderline: self.capture_borderline.with_label_values(&[model]),
            dropped: self.capture_dropped.with_label_values(&[model]),
        }
    }

    /// Removes `model`'s capture series (a reload removed its `capture:`).
    pub fn forget_capture(&self, model: &str) {
        for c in [
            &self.capture_looked,
            &self.capture_borderline,
            &self.capture_dropped,
        ] {
            let _ = c.remove_label_values(&[model]);
        }
    }

    /// Removes the series of one shadow of `model` (a reload removed it), so /metrics
    /// no longer reports a shadow that is gone.
    pub fn forget(&self, model: &str, shadow: &str) {
        let two = [model, shadow];
        let _ = self.mirrored.remove_label_values(&two);
        for r in DropReason::ALL {
            let _ = self
                .dropped
                .remove_label_values(&[model, shadow, r.as_str()]);
        }
        for k in ShadowErrorKind::ALL {
            let _ = self
                .errors
                .remove_label_values(&[model, shadow, k.as_str()]);
        }
        for v in Verdict::ALL {
            let _ = self
                .compared
                .remove_label_values(&[model, shadow, v.as_str()]);
        }
        let _ = self.agreement.remove_label_values(&two);
        let _ = self.divergence.remove_label_values(&two);
        let _ = self.duration.remove_label_values(&two);
    }

    /// The handles for one shadow of `model`.
    pub fn for_shadow(&self, model: &str, shadow: &str) -> ShadowMetrics {
        let two = [model, shadow];
        ShadowMetrics {
            mirrored: self.mirrored.with_label_values(&two),
            dropped: DropReason::ALL
                .map(|r| self.dropped.with_label_values(&[model, shadow, r.as_str()])),
            errors: ShadowErrorKind::ALL
                .map(|k| self.errors.with_label_values(&[model, shadow, k.as_str()])),
            compared: Verdict::ALL.map(|v| {
                self.compared
                    .with_label_values(&[model, shadow, v.as_str()])
            }),
            agreement: self.agreement.with_label_values(&two),
            divergence: self.divergence.with_label_values(&two),
            duration: self.duration.with_label_values(&two),
        }
    }
}
