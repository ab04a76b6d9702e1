//! Running one load level: the schedule (closed or open loop), the connection workers,
//! the progress line, and the report.
//!
//! Closed loop: each connection sends its next request as soon as the last one is
//! answered. Open loop: request `i` is due at `start + i / rate`; a free connection takes
//! the next due request and its latency counts from when it was *due*, not when it was
//! sent (wrk2's correction for coordinated omission: a server that stalls cannot hide
//! the requests that queued behind the stall).

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tokio::sync::mpsc;

use crate::http1::{Conn, Response as Answer};
use crate::reward::{post_feedback, Answered, Reward};
use crate::stats::{Recorder, Report};
use crate::target::Target;
use crate::{ErrorKind, LoadError};

/// Everything a level needs.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Where to send.
    pub target: Target,
    /// `POST` with bodies, or `GET`.
    pub method: &'static str,
    /// Bodies, cycled.
    pub bodies: Vec<Bytes>,
    /// Extra headers, `name: value`.
    pub headers: Vec<String>,
    /// Open loop at this rate, else closed loop.
    pub rate: Option<f64>,
    /// Stop after this long (warm-up included) ...
    pub duration: Option<Duration>,
    /// ... or after this many measured requests.
    pub requests: Option<u64>,
    /// Excluded from the results.
    pub warmup: Duration,
    /// Per request.
    pub timeout: Duration,
    /// HTTP/2 cleartext instead of HTTP/1.1.
    pub h2c: bool,
    /// gRPC `ModelInfer` calls (the bodies are framed messages; implies `h2c`).
    pub grpc: bool,
    /// Simulated revenue per variant (empty: no feedback).
    pub rewards: std::collections::BTreeMap<String, Reward>,
    /// Feedback is posted this long after each answer.
    pub feedback_delay: Duration,
    /// Seeds the revenue draws.
    pub seed: u64,
    /// Show a progress line on a terminal.
    pub progress: bool,
    /// Worker threads of the runtime.
    pub threads: usize,
}

struct Schedule {
    start: Instant,
    warmup_end: Instant,
    end: Option<Instant>,
    limit: Option<u64>,
    interval_ns: Option<f64>,
    seq: AtomicU64,
    measured_taken: AtomicU64,
}

struct Ticket {
    seq: u64,
    intended: Option<Instant>,
    measured: bool,
}

impl Schedule {
    fn next(&self) -> Option<Ticket> {
        match self.interval_ns {
            None => {
                let now = Instant::now();
                if self.end.is_some_and(|e| now >= e) {
                    return None;
                }
                let measured = now >= self.warmup_end;
                if measured {
                    if let Some(limit) = self.limit {
                        if self.measured_taken.fetch_add(1, Ordering::Relaxed) >= limit {
                            return None;
                        }
                    }
                }
                Some(Ticket {
                    seq: self.seq.fetch_add(1, Ordering::Relaxed),
                    intended: None,
                    measured,
                })
            }
            Some(ns) => {
                let seq = self.seq.fetch_add(1, Ordering::Relaxed);
                let intended = self.start + Duration::from_nanos((seq as f64 * ns) as u64);
                if self.end.is_some_and(|e| intended >= e) {
                    return None;
                }
                let measured = intended >= self.warmup_end;
                if measured {
                    if let Some(limit) = self.limit {
                        if self.measured_taken.fetch_add(1, Ordering::Relaxed) >= limit {
                            return None;
                        }
                    }
                }
                Some(Ticket {
                    seq,
                    intended: Some(intended),
                    measured,
                })
            }
        }
    }
}

struct Ctx {
    plan: Plan,
    schedule: Schedule,
    recorder: Recorder,
    run_id: String,
    base: Instant,
    done: AtomicU64,
    measured: AtomicU64,
    first_measured_us: AtomicU64,
    last_done_us: AtomicU64,
    late: AtomicU64,
    max_lag_us: AtomicU64,
    feedback: Option<mpsc::Sender<Answered>>,
    feedback_dropped: AtomicU64,
    stopped: AtomicBool,
}

impl Ctx {
    fn request_id(&self, seq: u64) -> String {
        format!("{}-{seq}", self.run_id)
    }

    /// The HTTP/1.1 message for request `seq`, written into `out`.
    fn h1_request(&self, out: &mut Vec<u8>, seq: u64) {
        out.clear();
        let body: &[u8] = if self.plan.bodies.is_empty() {
            &[]
        } else {
            &self.plan.bodies[(seq % self.plan.bodies.len() as u64) as usize]
        };
        out.extend_from_slice(self.plan.method.as_bytes());
        out.push(b' ');
        out.extend_from_slice(self.plan.target.path.as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
        out.extend_from_slice(self.plan.target.host.as_bytes());
        out.extend_from_slice(b"\r\nx-request-id: ");
        out.extend_from_slice(self.run_id.as_bytes());
        out.push(b'-');
        out.extend_from_slice(seq.to_string().as_bytes());
        for h in &self.plan.headers {
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(h.as_bytes());
        }
        if !body.is_empty() || self.plan.method == "POST" {
            out.extend_from_slice(b"\r\ncontent-type: application/json\r\ncontent-length: ");
            out.extend_from_slice(body.len().to_string().as_bytes());
        }
        out.extend_from_slice(b"\r\n\r\n");
        out.extend_from_slice(body);
    }

    fn since_base(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.base).as_micros() as u64
    }

    /// Books one outcome. `from`: when the request was due (open loop) or sent.
    fn outcome(&self, key: usize, t: &Ticket, from: Instant, result: Result<Answer, ErrorKind>) {
        let now = Instant::now();
        self.done.fetch_add(1, Ordering::Relaxed);
        if !t.measured {
            return;
        }
        self.measured.fetch_add(1, Ordering::Relaxed);
        self.first_measured_us
            .fetch_min(self.since_base(from), Ordering::Relaxed);
        self.last_done_us
            .fetch_max(self.since_base(now), Ordering::Relaxed);
        match result {
            Err(kind) => self.recorder.error(key, kind),
            Ok(Answer {
                status,
                variant,
                server_timing: timing,
                ..
            }) => {
                self.recorder.answered(
                    key,
                    status,
                    now - from,
                    variant.as_deref(),
                    timing.as_deref(),
                );
                if let (Some(tx), Some(v), true) =
                    (&self.feedback, variant, (200..300).contains(&status))
                {
                    let a = Answered {
                        request_id: self.request_id(t.seq),
                        variant: v.into(),
                        at: now,
                    };
                    if tx.try_send(a).is_err() {
                        self.feedback_dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    }

    async fn wait_turn(&self, t: &Ticket) -> Instant {
        match t.intended {
            None => Instant::now(),
            Some(at) => {
                // Tokio's timer ticks in milliseconds: sleep to within a tick of the
                // intended time, then yield until it, so sends are not up to 1 ms late
                // (which the corrected latency would count against the server).
                let tick = Duration::from_millis(1);
                if let Some(early) = at.checked_sub(tick) {
                    if early > Instant::now() {
                        tokio::time::sleep_until(early.into()).await;
                    }
                }
                while Instant::now() < at {
                    tokio::task::yield_now().await;
                }
                let lag = Instant::now().saturating_duration_since(at);
                if lag > Duration::from_millis(1) {
                    self.late.fetch_add(1, Ordering::Relaxed);
                }
                self.max_lag_us
                    .fetch_max(lag.as_micros() as u64, Ordering::Relaxed);
                at
            }
        }
    }
}

async fn h1_worker(key: usize, ctx: Arc<Ctx>) {
    tokio::time::sleep_until(ctx.schedule.start.into()).await;
    let mut conn: Option<Conn> = None;
    let mut buf = Vec::with_capacity(1024);
    while let Some(t) = ctx.schedule.next() {
        let from = ctx.wait_turn(&t).await;
        ctx.h1_request(&mut buf, t.seq);
        if conn.as_ref().is_none_or(|c| !c.reusable()) {
            match Conn::connect(&ctx.plan.target.addr, ctx.plan.timeout).await {
                Ok(c) => conn = Some(c),
                Err(_) => {
                    ctx.outcome(key, &t, from, Err(ErrorKind::Connect));
                    // A refusing server must not turn the loop into a busy spin.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        let result = match tokio::time::timeout(ctx.plan.timeout, c.exchange(&buf, false)).await {
            Err(_) => {
                conn = None;
                Err(ErrorKind::Timeout)
            }
            Ok(Err(kind)) => {
                conn = None;
                Err(kind)
            }
            Ok(Ok(r)) => Ok(r),
        };
        ctx.outcome(key, &t, from, result);
    }
}

type H2Sender = hyper::client::conn::http2::SendRequest<Full<Bytes>>;

async fn h2_connect(addr: &str, timeout: Duration) -> Result<H2Sender, ErrorKind> {
    let stream = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| ErrorKind::Connect)?
        .map_err(|_| ErrorKind::Connect)?;
    let _ = stream.set_nodelay(true);
    let (send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .map_err(|_| ErrorKind::Connect)?;
    tokio::spawn(conn);
    Ok(send)
}

/// Streams per HTTP/2 connection.
const H2_STREAMS_PER_CONN: usize = 100;

async fn h2_worker(key: usize, ctx: Arc<Ctx>, shared: Arc<tokio::sync::Mutex<Option<H2Sender>>>) {
    tokio::time::sleep_until(ctx.schedule.start.into()).await;
    while let Some(t) = ctx.schedule.next() {
        let from = ctx.wait_turn(&t).await;
        let sender = {
            let mut slot = shared.lock().await;
            if slot.as_ref().is_none_or(|s| s.is_closed()) {
                *slot = h2_connect(&ctx.plan.target.addr, ctx.plan.timeout)
                    .await
                    .ok();
            }
            slot.clone()
        };
        let Some(mut sender) = sender else {
            ctx.outcome(key, &t, from, Err(ErrorKind::Connect));
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let body = if ctx.plan.bodies.is_empty() {
            Bytes::new()
        } else {
            ctx.plan.bodies[(t.seq % ctx.plan.bodies.len() as u64) as usize].clone()
        };
        let grpc = ctx.plan.grpc;
        let path = if grpc {
            crate::target::GRPC_INFER
        } else {
            ctx.plan.target.path.as_str()
        };
        let mut req = http::Request::builder()
            .method(ctx.plan.method)
            .uri(format!("http://{}{path}", ctx.plan.target.host))
            .header("x-request-id", ctx.request_id(t.seq));
        if grpc {
            req = req
                .header("content-type", "application/grpc")
                .header("te", "trailers");
        } else if !body.is_empty() {
            req = req.header("content-type", "application/json");
        }
        for h in &ctx.plan.headers {
            if let Some((k, v)) = h.split_once(':') {
                req = req.header(k.trim(), v.trim());
            }
        }
        let Ok(req) = req.body(Full::new(body)) else {
            ctx.outcome(key, &t, from, Err(ErrorKind::Protocol));
            continue;
        };
        let exchange = async {
            sender.ready().await.map_err(|_| ErrorKind::Reset)?;
            let resp = sender
                .send_request(req)
                .await
                .map_err(|_| ErrorKind::Reset)?;
            let hdr = |n: &str| {
                resp.headers().get(n).map(|v| {
                    String::from_utf8_lossy(v.as_bytes())
                        .into_owned()
                        .into_boxed_str()
                })
            };
            let (mut status, variant, timing) = (
                resp.status().as_u16(),
                hdr("x-switchyard-variant"),
                hdr("server-timing"),
            );
            let head_status = switchyard_proto::grpc_status(resp.headers());
            let collected = resp
                .into_body()
                .collect()
                .await
                .map_err(|_| ErrorKind::Reset)?;
            if grpc && status == 200 {
                // Trailers-only answers carry the status in the headers.
                let code = head_status
                    .or_else(|| collected.trailers().and_then(switchyard_proto::grpc_status));
                status = code.map_or(502, switchyard_proto::http_status_for);
            }
            Ok(Answer {
                status,
                variant,
                server_timing: timing,
                body: Vec::new(),
            })
        };
        let result = tokio::time::timeout(ctx.plan.timeout, exchange)
            .await
            .unwrap_or(Err(ErrorKind::Timeout));
        ctx.outcome(key, &t, from, result);
    }
}

/// CPU time of this process (user + system), from `/proc/self/stat` in USER_HZ (100 per
/// second on Linux); `None` elsewhere.
fn process_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(Duration::from_millis((utime + stime) * 10))
}

/// Runs one level at `concurrency` connections (closed loop) or with at most that many
/// (open loop). Must run inside a multi-thread Tokio runtime.
pub async fn run_level(plan: &Plan, concurrency: usize) -> Result<Report, LoadError> {
    // Fail fast and clearly when nothing listens, instead of counting errors for the
    // whole duration.
    Conn::connect(&plan.target.addr, plan.timeout)
        .await
        .map_err(|(_, msg)| LoadError::Connect(msg))?;
    let mut warnings = Vec::new();
    let connections = if plan.h2c {
        concurrency.div_ceil(H2_STREAMS_PER_CONN)
    } else {
        concurrency
    };
    crate::limits::ensure_fds(connections + 64)?;
    let start = Instant::now() + Duration::from_millis(20);
    let schedule = Schedule {
        start,
        warmup_end: start + plan.warmup,
        end: plan.duration.map(|d| start + d),
        limit: plan.requests,
        interval_ns: plan.rate.map(|r| 1e9 / r),
        seq: AtomicU64::new(0),
        measured_taken: AtomicU64::new(0),
    };
    let (feedback_tx, feedback_task) = if plan.rewards.is_empty() {
        (None, None)
    } else {
        let (tx, rx) = mpsc::channel(1 << 20);
        let task = tokio::spawn(post_feedback(
            plan.target.addr.clone(),
            plan.target.host.clone(),
            plan.rewards.clone(),
            plan.feedback_delay,
            plan.seed,
            rx,
        ));
        (Some(tx), Some(task))
    };
    // Request ids unique across runs: feedback for a reused id would be refused (409).
    let run_id = {
        let mut b = [0u8; 6];
        let _ = getrandom::fill(&mut b);
        let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
        format!("load-{hex}")
    };
    let ctx = Arc::new(Ctx {
        plan: plan.clone(),
        schedule,
        recorder: Recorder::new(plan.threads * 4),
        run_id,
        base: start,
        done: AtomicU64::new(0),
        measured: AtomicU64::new(0),
        first_measured_us: AtomicU64::new(u64::MAX),
        last_done_us: AtomicU64::new(0),
        late: AtomicU64::new(0),
        max_lag_us: AtomicU64::new(0),
        feedback: feedback_tx,
        feedback_dropped: AtomicU64::new(0),
        stopped: AtomicBool::new(false),
    });
    let cpu_before = process_cpu();
    let mut tasks = Vec::with_capacity(concurrency);
    if plan.h2c {
        let conns: Vec<_> = (0..connections)
            .map(|_| Arc::new(tokio::sync::Mutex::new(None)))
            .collect();
        for i in 0..concurrency {
            tasks.push(tokio::spawn(h2_worker(
                i,
                ctx.clone(),
                conns[i % connections].clone(),
            )));
        }
    } else {
        for i in 0..concurrency {
            tasks.push(tokio::spawn(h1_worker(i, ctx.clone())));
        }
    }
    let progress = plan.progress && std::io::stderr().is_terminal();
    let ticker = progress.then(|| tokio::spawn(progress_line(ctx.clone())));
    for t in tasks {
        let _ = t.await;
    }
    ctx.stopped.store(true, Ordering::Relaxed);
    if let Some(t) = ticker {
        let _ = t.await;
        eprint!("\r\x1b[2K");
    }
    let cpu = cpu_before
        .zip(process_cpu())
        .map(|(a, b)| b.saturating_sub(a));
    let first = ctx.first_measured_us.load(Ordering::Relaxed);
    let last = ctx.last_done_us.load(Ordering::Relaxed);
    let elapsed = Duration::from_micros(last.saturating_sub(first.min(last)));
    let requests = ctx.measured.load(Ordering::Relaxed);
    let late = ctx.late.load(Ordering::Relaxed);
    let max_lag = Duration::from_micros(ctx.max_lag_us.load(Ordering::Relaxed));
    if let Some(rate) = plan.rate {
        let achieved = requests as f64 / elapsed.as_secs_f64().max(1e-9);
        if late > requests / 100 || achieved < 0.95 * rate {
            warnings.push(format!(
                "{late} of {requests} sends started more than 1 ms after their intended time (worst {:.1} ms): \
                 latencies include that wait (coordinated-omission corrected), but the target rate of {rate} req/s \
                 was not offered on time; the server is too slow for it, or give more connections (--concurrency)",
                max_lag.as_secs_f64() * 1e3
            ));
        }
    }
    // Below a second the 10 ms CPU clock is too coarse to say anything.
    if let (Some(cpu), true) = (cpu, elapsed >= Duration::from_secs(1)) {
        let busy = cpu.as_secs_f64() / elapsed.as_secs_f64() / plan.threads as f64;
        if busy > 0.9 {
            warnings.push(format!(
                "the generator used {:.0}% of its {} threads: it may be the bottleneck, not the server",
                busy * 100.0,
                plan.threads
            ));
        }
    }
    let ctx = Arc::try_unwrap(ctx)
        .map_err(|_| LoadError::Usage("internal: a worker outlived the run".into()))?;
    let dropped = ctx.feedback_dropped.load(Ordering::Relaxed);
    // Closing the channel lets the poster finish what is due and stop.
    drop(ctx.feedback);
    let feedback = match feedback_task {
        Some(task) => {
            let mut totals = task.await.unwrap_or_default();
            totals.failed += dropped;
            Some(totals)
        }
        None => None,
    };
    Ok(Report {
        concurrency,
        rate: plan.rate,
        elapsed,
        stats: ctx.recorder.merged(),
        requests,
        late_sends: late,
        max_lag,
        cpu,
        threads: plan.threads,
        feedback,
        warnings,
    })
}

/// `[=====>      ] 42%  12,345 req/s  4.2 s` on stderr, five times a second.
async fn progress_line(ctx: Arc<Ctx>) {
    let mut last_done = 0;
    let mut last = Instant::now();
    while !ctx.stopped.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = Instant::now();
        let done = ctx.done.load(Ordering::Relaxed);
        let rate = (done - last_done) as f64 / (now - last).as_secs_f64();
        (last_done, last) = (done, now);
        let elapsed = now.saturating_duration_since(ctx.schedule.start);
        let frac = match (ctx.plan.duration, ctx.plan.requests) {
            (Some(d), _) => elapsed.as_secs_f64() / d.as_secs_f64(),
            (None, Some(n)) => ctx.measured.load(Ordering::Relaxed) as f64 / n.max(1) as f64,
            _ => 0.0,
        }
        .clamp(0.0, 1.0);
        let width = 30;
        let filled = (frac * width as f64) as usize;
        let bar: String = (0..width)
            .map(|i| match i.cmp(&filled) {
                std::cmp::Ordering::Less => '=',
                std::cmp::Ordering::Equal => '>',
                std::cmp::Ordering::Greater => ' ',
            })
            .collect();
        eprint!(
            "\r[{bar}] {:>3.0}%  {rate:>9.0} req/s  {:.1} s  ",
            frac * 100.0,
            elapsed.as_secs_f64()
        );
    }
}
