//! What each shadow has seen: counters (the Prometheus handles are the source of truth),
//! sums for means, the latest disagreements, and the optional JSONL file they are
//! appended to.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde_json::{json, Value};

use crate::compare::{Comparison, Verdict};
use crate::metrics::{DropReason, ShadowErrorKind, ShadowMetrics};

/// Bytes of each body kept in a disagreement record; enough for any classifier's
/// answer, and it bounds the memory `keep_disagreements` can hold.
const KEPT_BODY_BYTES: usize = 16 * 1024;
/// Lines waiting for the JSONL writer; beyond this, lines are skipped and counted.
const LOG_QUEUE: usize = 4096;

/// One side of a compared pair.
#[derive(Debug, Clone)]
pub(crate) struct Side {
    pub status: u16,
    pub latency: Duration,
    pub body: Bytes,
}

/// A pair of answers that did not agree.
#[derive(Debug, Clone)]
struct Disagreement {
    at_unix_ms: u64,
    request_id: String,
    comparison: Comparison,
    primary: Side,
    shadow: Side,
}

impl Disagreement {
    fn to_json(&self) -> Value {
        let side = |s: &Side| {
            json!({
                "status": s.status,
                "latency_ms": millis(s.latency),
                "output": body_json(&s.body),
            })
        };
        json!({
            "request_id": self.request_id,
            "at_unix_ms": self.at_unix_ms,
            "reason": self.comparison.verdict.as_str(),
            "rows": self.comparison.rows,
            "rows_agreeing": self.comparison.rows_agreeing,
            "max_abs_diff": self.comparison.max_abs_diff,
            "latency_difference_ms": millis(self.shadow.latency) - millis(self.primary.latency),
            "primary": side(&self.primary),
            "shadow": side(&self.shadow),
        })
    }
}

/// The body as JSON when it is JSON, else as (lossy) text.
fn body_json(body: &[u8]) -> Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()))
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[derive(Debug, Default)]
struct Sums {
    pairs: u64,
    primary_latency: f64,
    shadow_latency: f64,
    diffs: u64,
    diff_sum: f64,
    diff_max: f64,
}

/// Per-shadow statistics.
#[derive(Debug)]
pub(crate) struct Stats {
    pub metrics: ShadowMetrics,
    sums: Mutex<Sums>,
    recent: Mutex<VecDeque<Disagreement>>,
    keep: usize,
    log: Option<SyncSender<String>>,
    log_skipped: std::sync::atomic::AtomicU64,
}

impl Stats {
    pub fn new(metrics: ShadowMetrics, keep: usize, log: Option<SyncSender<String>>) -> Self {
        Stats {
            metrics,
            sums: Mutex::default(),
            recent: Mutex::new(VecDeque::with_capacity(keep.min(1024))),
            keep,
            log,
            log_skipped: Default::default(),
        }
    }

    pub fn dropped(&self, reason: DropReason) {
        let i = DropReason::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(0);
        self.metrics.dropped[i].inc();
    }

    pub fn error(&self, kind: ShadowErrorKind) {
        let i = ShadowErrorKind::ALL
            .iter()
            .position(|k| *k == kind)
            .unwrap_or(0);
        self.metrics.errors[i].inc();
    }

    /// Counts one compared pair and keeps it if the two disagree.
    pub fn compared(&self, request_id: &str, c: Comparison, primary: Side, shadow: Side) {
        let i = Verdict::ALL
            .iter()
            .position(|v| *v == c.verdict)
            .unwrap_or(0);
        self.metrics.compared[i].inc();
        let total: u64 = self.metrics.compared.iter().map(|m| m.get()).sum();
        let agreed = self.metrics.compared[0].get();
        self.metrics
            .agreement
            .set(agreed as f64 / total.max(1) as f64);
        if let Some(d) = c.max_abs_diff {
            self.metrics.divergence.observe(d);
        }
        {
            let mut s = self.sums.lock().unwrap_or_else(|e| e.into_inner());
            s.pairs += 1;
            s.primary_latency += primary.latency.as_secs_f64();
            s.shadow_latency += shadow.latency.as_secs_f64();
            if let Some(d) = c.max_abs_diff {
                s.diffs += 1;
                s.diff_sum += d;
                s.diff_max = s.diff_max.max(d);
            }
        }
        if c.verdict == Verdict::Agree {
            return;
        }
        let truncate = |mut side: Side| {
            side.body.truncate(KEPT_BODY_BYTES);
            side
        };
        let d = Disagreement {
            at_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            request_id: request_id.to_string(),
            comparison: c,
            primary: truncate(primary),
            shadow: truncate(shadow),
        };
        if let Some(log) = &self.log {
            if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) =
                log.try_send(d.to_json().to_string())
            {
                self.log_skipped
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
        if self.keep == 0 {
            return;
        }
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if recent.len() == self.keep {
            recent.pop_front();
        }
        recent.push_back(d);
    }

    /// The counters and means as JSON, latest disagreements first.
    pub fn report(&self) -> serde_json::Map<String, Value> {
        let m = &self.metrics;
        let by = |counters: &[prometheus::IntCounter], labels: &[&str]| -> (u64, Value) {
            let mut map = serde_json::Map::new();
            let mut total = 0;
            for (c, l) in counters.iter().zip(labels) {
                total += c.get();
                map.insert((*l).to_string(), c.get().into());
            }
            (total, Value::Object(map))
        };
        let (dropped, dropped_by) = by(&m.dropped, &DropReason::ALL.map(DropReason::as_str));
        let (errors, errors_by) = by(
            &m.errors,
            &ShadowErrorKind::ALL.map(ShadowErrorKind::as_str),
        );
        let (compared, verdicts) = by(&m.compared, &Verdict::ALL.map(Verdict::as_str));
        let agreed = m.compared[0].get();
        let s = self.sums.lock().unwrap_or_else(|e| e.into_inner());
        let mean = |sum: f64, n: u64| (n > 0).then(|| sum / n as f64);
        let primary_ms = mean(s.primary_latency * 1000.0, s.pairs);
        let shadow_ms = mean(s.shadow_latency * 1000.0, s.pairs);
        let mut out = serde_json::Map::new();
        out.insert("mirrored".into(), m.mirrored.get().into());
        out.insert("dropped".into(), dropped.into());
        out.insert("dropped_by_reason".into(), dropped_by);
        out.insert("errors".into(), errors.into());
        out.insert("errors_by_kind".into(), errors_by);
        out.insert("compared".into(), compared.into());
        out.insert("agreed".into(), agreed.into());
        out.insert(
            "agreement".into(),
            json!((compared > 0).then(|| agreed as f64 / compared as f64)),
        );
        out.insert("verdicts".into(), verdicts);
        out.insert(
            "max_abs_diff".into(),
            json!({ "mean": mean(s.diff_sum, s.diffs), "max": (s.diffs > 0).then_some(s.diff_max) }),
        );
        out.insert(
            "latency_ms".into(),
            json!({
                "primary_mean": primary_ms,
                "shadow_mean": shadow_ms,
                "mean_difference": shadow_ms.zip(primary_ms).map(|(a, b)| a - b),
            }),
        );
        drop(s);
        out.insert(
            "disagreements_log_skipped".into(),
            self.log_skipped
                .load(std::sync::atomic::Ordering::Relaxed)
                .into(),
        );
        let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        out.insert(
            "disagreements".into(),
            Value::Array(recent.iter().rev().map(Disagreement::to_json).collect()),
        );
        out
    }
}

/// Opens `path` for appending and starts the thread that writes lines to it, so a slow
/// disk never blocks an async worker. The thread ends when the sender is dropped.
pub(crate) fn open_log(path: &str) -> std::io::Result<SyncSender<String>> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    let (tx, rx) = sync_channel::<String>(LOG_QUEUE);
    std::thread::Builder::new()
        .name("shadow-log".into())
        .spawn(move || {
            let mut out = std::io::LineWriter::new(file);
            for line in rx {
                if writeln!(out, "{line}").is_err() {
                    break;
                }
            }
        })?;
    Ok(tx)
}
