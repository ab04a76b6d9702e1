//! What a run measured: HDR histograms of latency (µs, 3 significant digits), statuses,
//! transport errors, and the same per variant (from `x-switchyard-variant`) with the
//! `server-timing` phases averaged.
//!
//! A histogram is ~200 KB, so connections do not get one each (10,000 connections would
//! need 2 GB): they record into a few shards, each behind a short, rarely contended lock.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::{json, Map, Value};

use crate::ErrorKind;

fn histogram() -> Histogram<u64> {
    // 1 µs to 1 hour; values above are clamped (saturating record).
    Histogram::new_with_bounds(1, 3_600_000_000, 3)
        .unwrap_or_else(|_| unreachable!("fixed bounds are valid"))
}

/// Statistics of one group of requests (all, or one variant).
#[derive(Debug, Clone)]
pub struct Group {
    /// Latency of answered requests, in microseconds.
    pub latency: Histogram<u64>,
    /// Answers by status.
    pub statuses: BTreeMap<u16, u64>,
    /// `server-timing` phases: name → (sum of ms, count).
    pub phases: BTreeMap<String, (f64, u64)>,
}

impl Default for Group {
    fn default() -> Self {
        Group {
            latency: histogram(),
            statuses: BTreeMap::new(),
            phases: BTreeMap::new(),
        }
    }
}

impl Group {
    fn answered(&mut self, status: u16, micros: u64, server_timing: Option<&str>) {
        self.latency.saturating_record(micros.max(1));
        *self.statuses.entry(status).or_default() += 1;
        if let Some(st) = server_timing {
            for part in st.split(',') {
                let mut it = part.split(';');
                let name = it.next().unwrap_or("").trim();
                let dur = it
                    .find_map(|p| p.trim().strip_prefix("dur="))
                    .and_then(|d| d.parse::<f64>().ok());
                if let (false, Some(d)) = (name.is_empty(), dur) {
                    match self.phases.get_mut(name) {
                        Some(e) => {
                            e.0 += d;
                            e.1 += 1;
                        }
                        None => {
                            self.phases.insert(name.to_string(), (d, 1));
                        }
                    }
                }
            }
        }
    }

    fn merge(&mut self, other: &Group) {
        let _ = self.latency.add(&other.latency);
        for (s, n) in &other.statuses {
            *self.statuses.entry(*s).or_default() += n;
        }
        for (k, (sum, n)) in &other.phases {
            let e = self.phases.entry(k.clone()).or_default();
            e.0 += sum;
            e.1 += n;
        }
    }

    /// Requests answered (any status).
    pub fn answered_count(&self) -> u64 {
        self.latency.len()
    }

    /// Answers with a status outside 2xx.
    pub fn failed_statuses(&self) -> u64 {
        self.statuses
            .iter()
            .filter(|(s, _)| !(200..300).contains(*s))
            .map(|(_, n)| n)
            .sum()
    }

    /// Latency percentiles in milliseconds.
    pub fn latency_json(&self) -> Value {
        let ms = |q: f64| {
            if self.latency.is_empty() {
                Value::Null
            } else {
                json!(round3(self.latency.value_at_quantile(q) as f64 / 1000.0))
            }
        };
        json!({
            "p50": ms(0.50), "p90": ms(0.90), "p95": ms(0.95), "p99": ms(0.99), "p999": ms(0.999),
            "max": if self.latency.is_empty() { Value::Null } else { json!(round3(self.latency.max() as f64 / 1000.0)) },
            "mean": if self.latency.is_empty() { Value::Null } else { json!(round3(self.latency.mean() / 1000.0)) },
        })
    }

    fn statuses_json(&self) -> Value {
        Value::Object(
            self.statuses
                .iter()
                .map(|(s, n)| (s.to_string(), json!(n)))
                .collect(),
        )
    }

    fn phases_json(&self) -> Value {
        Value::Object(
            self.phases
                .iter()
                .map(|(k, (sum, n))| (k.clone(), json!(round3(sum / *n as f64))))
                .collect(),
        )
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// One shard's counts.
#[derive(Debug, Default)]
pub struct Shard {
    /// Everything.
    pub all: Group,
    /// By variant name.
    pub variants: BTreeMap<Box<str>, Group>,
    /// Transport errors by kind.
    pub errors: BTreeMap<&'static str, u64>,
}

/// The shared recorder.
#[derive(Debug)]
pub struct Recorder {
    shards: Vec<Mutex<Shard>>,
}

impl Recorder {
    /// A recorder with `n` shards.
    pub fn new(n: usize) -> Self {
        Recorder {
            shards: (0..n.max(1)).map(|_| Mutex::default()).collect(),
        }
    }

    fn shard(&self, key: usize) -> std::sync::MutexGuard<'_, Shard> {
        self.shards[key % self.shards.len()]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Records an answer.
    pub fn answered(
        &self,
        key: usize,
        status: u16,
        latency: Duration,
        variant: Option<&str>,
        server_timing: Option<&str>,
    ) {
        let micros = latency.as_micros().min(u128::from(u64::MAX)) as u64;
        let mut s = self.shard(key);
        s.all.answered(status, micros, server_timing);
        if let Some(v) = variant {
            match s.variants.get_mut(v) {
                Some(g) => g.answered(status, micros, server_timing),
                None => {
                    let mut g = Group::default();
                    g.answered(status, micros, server_timing);
                    s.variants.insert(v.into(), g);
                }
            }
        }
    }

    /// Records a transport error.
    pub fn error(&self, key: usize, kind: ErrorKind) {
        *self.shard(key).errors.entry(kind.as_str()).or_default() += 1;
    }

    /// All shards merged.
    pub fn merged(&self) -> Shard {
        let mut out = Shard::default();
        for s in &self.shards {
            let s = s.lock().unwrap_or_else(|e| e.into_inner());
            out.all.merge(&s.all);
            for (k, g) in &s.variants {
                out.variants.entry(k.clone()).or_default().merge(g);
            }
            for (k, n) in &s.errors {
                *out.errors.entry(k).or_default() += n;
            }
        }
        out
    }
}

/// Revenue simulated and feedback sent, per variant.
#[derive(Debug, Default, Clone)]
pub struct FeedbackTotals {
    /// Items posted.
    pub sent: u64,
    /// Items answered 200.
    pub accepted: u64,
    /// Items refused (any other status), by status.
    pub refused: BTreeMap<u16, u64>,
    /// Items that could not be posted (connection failed).
    pub failed: u64,
    /// Revenue drawn per variant: (sum, count).
    pub revenue: BTreeMap<String, (f64, u64)>,
}

/// The result of one run (one concurrency level).
#[derive(Debug)]
pub struct Report {
    /// Connections (closed loop) or the connection cap (open loop).
    pub concurrency: usize,
    /// Target rate (open loop).
    pub rate: Option<f64>,
    /// Measured time: first measured send to last measured completion.
    pub elapsed: Duration,
    /// Counts.
    pub stats: Shard,
    /// Requests sent after the warm-up (answered or not).
    pub requests: u64,
    /// Open loop: sends that started more than 1 ms after their intended time, and the
    /// largest such lag.
    pub late_sends: u64,
    /// The largest lag.
    pub max_lag: Duration,
    /// The generator's own CPU time during the measured part, when known.
    pub cpu: Option<Duration>,
    /// Worker threads.
    pub threads: usize,
    /// Feedback, when rewards were simulated.
    pub feedback: Option<FeedbackTotals>,
    /// Things the user should know (couldn't keep up, fd limit, …).
    pub warnings: Vec<String>,
}

impl Report {
    /// Transport errors plus answers outside 2xx.
    pub fn errors(&self) -> u64 {
        self.stats.errors.values().sum::<u64>() + self.stats.all.failed_statuses()
    }

    /// Requests per second over the measured time.
    pub fn throughput(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.requests as f64 / secs
        } else {
            0.0
        }
    }

    /// The JSON object `--json` prints.
    pub fn to_json(&self) -> Value {
        let mut variants = Map::new();
        for (name, g) in &self.stats.variants {
            let mut v = json!({
                "requests": g.answered_count(),
                "share": if self.stats.all.answered_count() > 0 { round3(g.answered_count() as f64 / self.stats.all.answered_count() as f64) } else { 0.0 },
                "latency_ms": g.latency_json(),
                "status": g.statuses_json(),
                "server_timing_ms": g.phases_json(),
            });
            if let Some((sum, n)) = self.feedback.as_ref().and_then(|f| f.revenue.get(&**name)) {
                v["revenue"] = json!({ "total": round3(*sum), "per_request": round3(sum / (*n).max(1) as f64) });
            }
            variants.insert(name.to_string(), v);
        }
        let mut out = json!({
            "requests": self.requests,
            "errors": self.errors(),
            "throughput_rps": round3(self.throughput()),
            "elapsed_s": round3(self.elapsed.as_secs_f64()),
            "concurrency": self.concurrency,
            "rate": self.rate,
            "latency_ms": self.stats.all.latency_json(),
            "status": self.stats.all.statuses_json(),
            "transport_errors": self.stats.errors,
            "server_timing_ms": self.stats.all.phases_json(),
            "variants": variants,
            "generator": {
                "threads": self.threads,
                "cpu_s": self.cpu.map(|c| round3(c.as_secs_f64())),
                "late_sends": self.late_sends,
                "max_send_lag_ms": round3(self.max_lag.as_secs_f64() * 1000.0),
            },
            "warnings": self.warnings,
        });
        if let Some(f) = &self.feedback {
            out["feedback"] = json!({
                "sent": f.sent,
                "accepted": f.accepted,
                "refused": f.refused.iter().map(|(s, n)| (s.to_string(), json!(n))).collect::<Map<_, _>>(),
                "failed": f.failed,
            });
        }
        out
    }

    /// The human report.
    pub fn to_text(&self) -> String {
        use std::fmt::Write;
        let mut t = String::new();
        let mode = match self.rate {
            Some(r) => format!("open loop at {r} req/s (latency from the intended send time), up to {} connections", self.concurrency),
            None => format!("closed loop, {} connections", self.concurrency),
        };
        let _ = writeln!(t, "{mode}");
        let _ = writeln!(
            t,
            "{} requests in {:.2} s: {:.1} req/s; {} errors",
            self.requests,
            self.elapsed.as_secs_f64(),
            self.throughput(),
            self.errors()
        );
        let _ = writeln!(
            t,
            "\nlatency (ms)      p50      p90      p95      p99    p99.9      max"
        );
        let row = |name: &str, g: &Group| {
            let q = |x: f64| g.latency.value_at_quantile(x) as f64 / 1000.0;
            if g.latency.is_empty() {
                format!("{name:<12} (no answers)\n")
            } else {
                format!(
                    "{name:<12} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3}\n",
                    q(0.5),
                    q(0.9),
                    q(0.95),
                    q(0.99),
                    q(0.999),
                    g.latency.max() as f64 / 1000.0
                )
            }
        };
        t.push_str(&row("all", &self.stats.all));
        for (name, g) in &self.stats.variants {
            t.push_str(&row(&format!("  {name}"), g));
        }
        let statuses: Vec<String> = self
            .stats
            .all
            .statuses
            .iter()
            .map(|(s, n)| format!("{s}: {n}"))
            .collect();
        let _ = writeln!(
            t,
            "\nstatus: {}",
            if statuses.is_empty() {
                "none".into()
            } else {
                statuses.join(", ")
            }
        );
        if !self.stats.errors.is_empty() {
            let e: Vec<String> = self
                .stats
                .errors
                .iter()
                .map(|(k, n)| format!("{k}: {n}"))
                .collect();
            let _ = writeln!(t, "transport errors: {}", e.join(", "));
        }
        if !self.stats.variants.is_empty() {
            let _ = writeln!(
                t,
                "\nper variant (x-switchyard-variant), server-timing phases averaged (ms):"
            );
            let total = self.stats.all.answered_count().max(1) as f64;
            for (name, g) in &self.stats.variants {
                let phases: Vec<String> = g
                    .phases
                    .iter()
                    .map(|(k, (s, n))| format!("{k} {:.3}", s / *n as f64))
                    .collect();
                let _ = write!(
                    t,
                    "  {name}: {} requests ({:.1}%), {}",
                    g.answered_count(),
                    100.0 * g.answered_count() as f64 / total,
                    if phases.is_empty() {
                        "no server-timing".into()
                    } else {
                        phases.join(", ")
                    }
                );
                if let Some((sum, n)) = self.feedback.as_ref().and_then(|f| f.revenue.get(&**name))
                {
                    let _ = write!(
                        t,
                        "; revenue {:.2} ({:.4} per request)",
                        sum,
                        sum / (*n).max(1) as f64
                    );
                }
                t.push('\n');
            }
        }
        if let Some(f) = &self.feedback {
            let _ = writeln!(
                t,
                "\nfeedback: {} sent, {} accepted, {} refused, {} failed",
                f.sent,
                f.accepted,
                f.refused.values().sum::<u64>(),
                f.failed
            );
        }
        if let Some(cpu) = self.cpu {
            let _ = writeln!(
                t,
                "\ngenerator: {} threads, {:.2} CPU-s ({:.1} µs per request)",
                self.threads,
                cpu.as_secs_f64(),
                cpu.as_secs_f64() * 1e6 / self.requests.max(1) as f64
            );
        }
        for w in &self.warnings {
            let _ = writeln!(t, "warning: {w}");
        }
        t
    }
}

/// A concurrency sweep as one table (perf_analyzer's layout).
pub fn sweep_table(reports: &[Report]) -> String {
    let mut t = String::from(
        "concurrency   req/s        p50 ms    p90 ms    p95 ms    p99 ms   p99.9 ms   errors\n",
    );
    for r in reports {
        let g = &r.stats.all;
        let q = |x: f64| {
            if g.latency.is_empty() {
                f64::NAN
            } else {
                g.latency.value_at_quantile(x) as f64 / 1000.0
            }
        };
        t.push_str(&format!(
            "{:<13} {:<12.1} {:<9.3} {:<9.3} {:<9.3} {:<9.3} {:<10.3} {}\n",
            r.concurrency,
            r.throughput(),
            q(0.5),
            q(0.9),
            q(0.95),
            q(0.99),
            q(0.999),
            r.errors()
        ));
    }
    t
}
