//! `capture:` — the predictions a model was least sure of, kept for relabelling, and a
//! sample of its predictions for the dashboard.
//!
//! A sampled request's body and answer are taken by the same taps shadows use (nothing
//! is copied; the client never waits) and read on the shadow thread: each answered row's
//! top-1 score minus its runner-up's is its margin, and a row under `margin` makes the
//! prediction borderline. Borderline predictions go, one JSON line each (request id,
//! time, variant, inputs, outputs, margins), through a bounded queue to a writer thread
//! that rotates the file at `max_bytes` (`<file>.1`, replaced). A full queue drops the
//! line and counts it; a failed write counts too. Up to 20 predictions a second per
//! model go to the dashboard's feed as well.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use prometheus::IntCounter;
use serde_json::{json, Value};
use switchyard_config::ShadowSampling;

use crate::compare::top_two;
use crate::sample::Sampler;

/// Lines waiting for the writer at most.
const QUEUE: usize = 1024;
/// Least time between two predictions sent to the dashboard, per model.
const FEED_EVERY: Duration = Duration::from_millis(50);

/// Where sampled predictions are shown live: one JSON object per event.
pub type PredictionFeed = tokio::sync::broadcast::Sender<Bytes>;

/// Counters of one model's capture.
#[derive(Debug, Clone)]
pub struct CaptureMetrics {
    /// Answers looked at.
    pub looked: IntCounter,
    /// Borderline predictions queued for the file.
    pub borderline: IntCounter,
    /// Lines not written (queue full, write failed).
    pub dropped: IntCounter,
}

/// One model's capture.
#[derive(Debug)]
pub struct Capture {
    spec: switchyard_config::Capture,
    model: String,
    sampler: Sampler,
    writer: Arc<Writer>,
    metrics: CaptureMetrics,
    feed: Option<PredictionFeed>,
    started: Instant,
    fed_at_ms: AtomicU64,
}

/// The writer thread's end of a capture file.
#[derive(Debug)]
struct Writer {
    file: String,
    max_bytes: u64,
    lines: SyncSender<String>,
}

impl Writer {
    fn start(file: &str, max_bytes: u64, dropped: IntCounter) -> std::io::Result<Self> {
        let mut out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(file)?;
        let mut size = out.metadata().map_or(0, |m| m.len());
        let (lines, rx) = sync_channel::<String>(QUEUE);
        let path = file.to_string();
        std::thread::Builder::new()
            .name("capture-writer".into())
            .spawn(move || {
                // Ends when every sender is gone (the capture was dropped by a reload or
                // at shutdown).
                for line in rx {
                    let len = line.len() as u64 + 1;
                    if size > 0 && size + len > max_bytes {
                        let rotated = format!("{path}.1");
                        let reopened = std::fs::rename(&path, &rotated).and_then(|()| {
                            std::fs::OpenOptions::new()
                                .create(true)
                                .append(true)
                                .open(&path)
                        });
                        match reopened {
                            Ok(f) => {
                                out = f;
                                size = 0;
                            }
                            Err(e) => {
                                tracing::warn!(file = %path, error = %e, "Cannot rotate the capture file; lines are dropped until it can.");
                                dropped.inc();
                                continue;
                            }
                        }
                    }
                    match writeln!(out, "{line}") {
                        Ok(()) => size += len,
                        Err(_) => dropped.inc(),
                    }
                }
            })?;
        Ok(Writer {
            file: file.to_string(),
            max_bytes,
            lines,
        })
    }
}

impl Capture {
    /// The capture `spec` of `model`; on a reload, `previous` (the live one) lends its
    /// writer when the file and size are the same, so one thread writes each file.
    pub fn new(
        model: &str,
        spec: &switchyard_config::Capture,
        seed: u64,
        metrics: CaptureMetrics,
        feed: Option<PredictionFeed>,
        previous: Option<&Capture>,
    ) -> std::io::Result<Self> {
        let writer = match previous
            .map(|p| &p.writer)
            .filter(|w| w.file == spec.file && w.max_bytes == spec.max_bytes)
        {
            Some(w) => w.clone(),
            None => Arc::new(Writer::start(
                &spec.file,
                spec.max_bytes,
                metrics.dropped.clone(),
            )?),
        };
        Ok(Capture {
            spec: spec.clone(),
            model: model.to_string(),
            sampler: Sampler::new(ShadowSampling::Random, spec.sample, seed),
            writer,
            metrics,
            feed,
            started: Instant::now(),
            fed_at_ms: AtomicU64::new(0),
        })
    }

    /// Whether the request with this id is looked at.
    pub fn takes(&self, request_id: &[u8]) -> bool {
        self.sampler.take(request_id)
    }

    /// Reads one answered prediction (off the request path): feeds the dashboard, and
    /// keeps it when a row is borderline.
    pub(crate) fn look(
        &self,
        request_id: &str,
        variant: &str,
        request: &[u8],
        status: u16,
        answer: &[u8],
        latency: Duration,
    ) {
        if !(200..300).contains(&status) {
            return;
        }
        let rows = top_two(answer);
        let Some(first) = rows.first() else {
            return;
        };
        self.metrics.looked.inc();
        let borderline = rows.iter().any(|r| r.margin < self.spec.margin);
        self.feed(request_id, variant, first, borderline, latency);
        if !borderline {
            return;
        }
        let time_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let parsed = |b: &[u8]| {
            serde_json::from_slice::<Value>(b)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(b).into_owned()))
        };
        let line = json!({
            "request_id": request_id,
            "time_ms": time_ms,
            "model": self.model,
            "variant": variant,
            "margins": rows.iter().map(|r| r.margin).collect::<Vec<_>>(),
            "classes": rows.iter().map(|r| r.class).collect::<Vec<_>>(),
            "inputs": parsed(request),
            "outputs": parsed(answer),
        })
        .to_string();
        match self.writer.lines.try_send(line) {
            Ok(()) => self.metrics.borderline.inc(),
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.metrics.dropped.inc()
            }
        }
    }

    /// One prediction to the dashboard, at most every `FEED_EVERY`.
    fn feed(
        &self,
        request_id: &str,
        variant: &str,
        row: &crate::compare::Scored,
        borderline: bool,
        latency: Duration,
    ) {
        let Some(feed) = &self.feed else { return };
        let now = self.started.elapsed().as_millis() as u64 + 1;
        let last = self.fed_at_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) < FEED_EVERY.as_millis() as u64
            || self
                .fed_at_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let event = json!({
            "type": "prediction",
            "model": self.model,
            "variant": variant,
            "request_id": request_id,
            "class": row.class,
            "score": row.score,
            "margin": row.margin,
            "borderline": borderline,
            "latency_ms": latency.as_secs_f64() * 1000.0,
        });
        let _ = feed.send(Bytes::from(event.to_string()));
    }
}
