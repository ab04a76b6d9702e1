//! Dynamic batching with TensorFlow Serving's semantics.
//!
//! Requests queue up; a batch thread takes the oldest request and waits until either
//! `max_batch_size` rows are queued or `batch_timeout_micros` have passed since that
//! request arrived, then runs everything it took as one batch and hands each request its
//! rows of the output. `num_batch_threads` threads run batches in parallel. When the rows
//! waiting exceed `max_enqueued_batches` full batches, new requests are refused at once
//! (HTTP 503) and counted, so a slow model sheds load instead of growing a queue.
//!
//! The batch threads are plain OS threads: inference never runs on the async workers.
//! The async side only enqueues and awaits a oneshot reply. Dropping the [`Batcher`]
//! closes the queue; threads finish every request already accepted, then exit.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};
use tokio::sync::oneshot;

use crate::error::InferenceError;
use crate::model::{OnnxModel, Session};

/// TF Serving's batching knobs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchingOptions {
    /// Most rows in one batch. A single request with more rows runs as its own batch.
    pub max_batch_size: usize,
    /// How long a batch waits for more requests after its first one arrived.
    pub batch_timeout: Duration,
    /// Threads running batches in parallel.
    pub num_batch_threads: usize,
    /// Full batches allowed to wait; beyond that, requests are refused.
    pub max_enqueued_batches: usize,
}

/// Metric families of local models, labelled by model name (bounded: from the config).
#[derive(Debug, Clone)]
pub struct LocalMetricFamilies {
    queue: HistogramVec,
    compute: HistogramVec,
    batch: HistogramVec,
    shed: IntCounterVec,
    queued: IntGaugeVec,
    runtime: IntGaugeVec,
    panics: IntCounterVec,
}

/// One model's metric handles.
#[derive(Debug, Clone)]
pub struct LocalMetrics {
    queue: Histogram,
    compute: Histogram,
    batch: Histogram,
    shed: IntCounter,
    queued: IntGauge,
    panics: IntCounter,
}

impl LocalMetricFamilies {
    /// Registers the families on `registry`.
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let secs = |name: &str, help: &str| {
            HistogramVec::new(
                HistogramOpts::new(name, help).buckets(vec![
                    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
                    0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
                ]),
                &["model"],
            )
        };
        let queue = secs(
            "switchyard_local_queue_seconds",
            "Time a request waited in a local model's batch queue.",
        )?;
        let compute = secs(
            "switchyard_local_compute_seconds",
            "Time a local model took to run one batch.",
        )?;
        let batch = HistogramVec::new(
            HistogramOpts::new(
                "switchyard_local_batch_size",
                "Rows per batch run by a local model.",
            )
            .buckets(vec![
                1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
            ]),
            &["model"],
        )?;
        let shed = IntCounterVec::new(
            Opts::new(
                "switchyard_local_shed_total",
                "Requests refused with 503 because a local model's queue was full.",
            ),
            &["model"],
        )?;
        let queued = IntGaugeVec::new(
            Opts::new(
                "switchyard_local_queued_rows",
                "Rows waiting in a local model's batch queue now.",
            ),
            &["model"],
        )?;
        let runtime = IntGaugeVec::new(
            Opts::new(
                "switchyard_local_runtime_info",
                "1 for what runs each local model: `wgpu` (GPU kernels), `fused` (Switchyard's CPU kernels) or `tract` (tract's plan); 0 for the others.",
            ),
            &["model", "runtime"],
        )?;
        let panics = IntCounterVec::new(
            Opts::new(
                "switchyard_local_panics_total",
                "Panics caught in a local model's batch threads (the batch is answered 500, the thread goes on with a fresh run state).",
            ),
            &["model"],
        )?;
        registry.register(Box::new(panics.clone()))?;
        registry.register(Box::new(runtime.clone()))?;
        registry.register(Box::new(queued.clone()))?;
        registry.register(Box::new(queue.clone()))?;
        registry.register(Box::new(compute.clone()))?;
        registry.register(Box::new(batch.clone()))?;
        registry.register(Box::new(shed.clone()))?;
        Ok(LocalMetricFamilies {
            queue,
            compute,
            batch,
            shed,
            queued,
            runtime,
            panics,
        })
    }

    /// Records what runs `model` (see [`OnnxModel::runtime_name`]): a `runtime: wgpu`
    /// model with no usable GPU runs on the CPU, and this is where that shows.
    pub fn set_runtime(&self, model: &str, runtime: &str) {
        for name in crate::model::RUNTIME_NAMES {
            self.runtime
                .with_label_values(&[model, name])
                .set(i64::from(name == runtime));
        }
    }

    /// Removes `model`'s series (a reload removed its local variant).
    pub fn forget(&self, model: &str) {
        for v in [&self.queue, &self.compute, &self.batch] {
            let _ = v.remove_label_values(&[model]);
        }
        let _ = self.shed.remove_label_values(&[model]);
        let _ = self.queued.remove_label_values(&[model]);
        let _ = self.panics.remove_label_values(&[model]);
        for name in crate::model::RUNTIME_NAMES {
            let _ = self.runtime.remove_label_values(&[model, name]);
        }
    }

    /// The handles of `model`.
    pub fn model(&self, model: &str) -> LocalMetrics {
        LocalMetrics {
            queue: self.queue.with_label_values(&[model]),
            compute: self.compute.with_label_values(&[model]),
            batch: self.batch.with_label_values(&[model]),
            shed: self.shed.with_label_values(&[model]),
            queued: self.queued.with_label_values(&[model]),
            panics: self.panics.with_label_values(&[model]),
        }
    }
}

type Reply = oneshot::Sender<Result<Output, InferenceError>>;

/// A request's outputs, with where its time went (the phases `server-timing` and
/// `switchyard_phase_duration_seconds` report).
#[derive(Debug)]
pub struct Output {
    /// The output values, row after row.
    pub values: Vec<f32>,
    /// From queueing to its batch starting.
    pub queued: Duration,
    /// Its batch's run.
    pub computed: Duration,
}

struct Job {
    input: Vec<f32>,
    rows: usize,
    enqueued: Instant,
    reply: Reply,
}

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    rows: usize,
    closed: bool,
}

/// A count and the nanoseconds it took, in Triton's statistics extension's shape.
#[derive(Debug, Default)]
struct Tally {
    count: AtomicU64,
    ns: AtomicU64,
}

impl Tally {
    fn add(&self, d: Duration) {
        self.count.fetch_add(1, Ordering::Relaxed);
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.ns.fetch_add(ns, Ordering::Relaxed);
    }

    fn read(&self) -> Counted {
        Counted {
            count: self.count.load(Ordering::Relaxed),
            ns: self.ns.load(Ordering::Relaxed),
        }
    }
}

/// A count and its total duration in nanoseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counted {
    /// How many.
    pub count: u64,
    /// Their total duration, nanoseconds.
    pub ns: u64,
}

/// The runtime's own counters since it started, in the terms of Triton's statistics
/// extension (`GET /v2/models/{m}/stats`): requests that succeeded or failed (from
/// queueing to answer), their time queued and computing, rows inferred and batches run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Requests answered with an output: count and time from queueing to answer.
    pub success: Counted,
    /// Requests that failed in the queue or the model: count and time until then.
    pub fail: Counted,
    /// Time requests spent queued before their batch ran.
    pub queue: Counted,
    /// Time requests spent in their batch's model run.
    pub compute: Counted,
    /// Rows inferred (Triton's `inference_count`: a batch-32 request counts 32).
    pub inference_count: u64,
    /// Batches run (Triton's `execution_count`).
    pub execution_count: u64,
    /// When the last batch ran, milliseconds since the Unix epoch; 0 before the first.
    pub last_inference_ms: u64,
}

#[derive(Debug, Default)]
struct StatCounters {
    success: Tally,
    fail: Tally,
    queue: Tally,
    compute: Tally,
    inference_count: AtomicU64,
    execution_count: AtomicU64,
    last_inference_ms: AtomicU64,
}

struct Shared {
    queue: Mutex<Queue>,
    stats: StatCounters,
    ready: Condvar,
    options: BatchingOptions,
    model: Arc<OnnxModel>,
    metrics: LocalMetrics,
    /// Batch threads inside their supervisor (they leave only when the queue closes).
    live: AtomicUsize,
    /// Per batch thread: when its current batch started, as milliseconds since `epoch`
    /// plus one; 0 while it waits for work. Read by [`Batcher::health`].
    busy: Vec<AtomicU64>,
    epoch: Instant,
    /// Test seam: while it holds `true`, batches wait before running (a model stuck on
    /// its device, without a model that really hangs).
    #[cfg(test)]
    gate: Arc<(Mutex<bool>, Condvar)>,
}

impl Shared {
    // A poisoned lock means a batch thread panicked mid-update; the queue itself is
    // still consistent (every update is a few field writes), so keep serving.
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn new(options: BatchingOptions, model: Arc<OnnxModel>, metrics: LocalMetrics) -> Self {
        let threads = options.num_batch_threads.max(1);
        Shared {
            queue: Mutex::new(Queue::default()),
            stats: StatCounters::default(),
            ready: Condvar::new(),
            options,
            model,
            metrics,
            live: AtomicUsize::new(0),
            busy: (0..threads).map(|_| AtomicU64::new(0)).collect(),
            epoch: Instant::now(),
            #[cfg(test)]
            gate: Arc::new((Mutex::new(false), Condvar::new())),
        }
    }

    fn millis(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX - 1)
    }
}

/// Why a local model cannot serve now (see [`Batcher::health`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotServing(pub String);

impl std::fmt::Display for NotServing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A model behind a batch queue and its threads.
pub struct Batcher {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Batcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher")
            .field("options", &self.shared.options)
            .finish()
    }
}

impl Batcher {
    /// Starts `options.num_batch_threads` threads serving `model`.
    pub fn start(
        name: &str,
        model: Arc<OnnxModel>,
        options: BatchingOptions,
        metrics: LocalMetrics,
    ) -> std::io::Result<Self> {
        let shared = Arc::new(Shared::new(options, model, metrics));
        let mut threads = Vec::with_capacity(shared.busy.len());
        for i in 0..shared.busy.len() {
            // Counted before the thread runs, so a batcher is never seen with no live
            // thread while its threads are still starting.
            shared.live.fetch_add(1, Ordering::SeqCst);
            let spawned = std::thread::Builder::new()
                .name(format!("batch-{name}-{i}"))
                .spawn({
                    let shared = shared.clone();
                    move || supervise(&shared, i)
                });
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => {
                    shared.live.fetch_sub(1, Ordering::SeqCst);
                    return Err(e);
                }
            }
        }
        Ok(Batcher { shared, threads })
    }

    /// Whether the model can serve now: `Err` when no batch thread is alive, when every
    /// batch thread has been inside one batch for longer than `stall` (a model stuck on
    /// its device), or when the oldest queued request has waited longer than `stall`
    /// (the queue is not moving). Readiness endpoints report it; it clears by itself
    /// when the threads move again.
    pub fn health(&self, stall: Duration) -> Result<(), NotServing> {
        let shared = &self.shared;
        if shared.live.load(Ordering::SeqCst) == 0 {
            return Err(NotServing("no batch thread is alive".into()));
        }
        let now = shared.millis(Instant::now()) + 1;
        let stall_ms = u64::try_from(stall.as_millis()).unwrap_or(u64::MAX);
        let stuck = shared.busy.iter().all(|b| {
            let since = b.load(Ordering::SeqCst);
            since != 0 && now.saturating_sub(since) > stall_ms
        });
        if stuck {
            return Err(NotServing(format!(
                "every batch thread ({}) has been running one batch for more than {stall:?}",
                shared.busy.len()
            )));
        }
        let oldest = shared.lock().jobs.front().map(|j| j.enqueued);
        if let Some(waited) = oldest.map(|t| t.elapsed()) {
            if waited > stall {
                return Err(NotServing(format!(
                    "the oldest queued request has waited {:.1}s, more than {stall:?}: the queue is not moving",
                    waited.as_secs_f64()
                )));
            }
        }
        Ok(())
    }

    /// The model served.
    pub fn model(&self) -> &OnnxModel {
        &self.shared.model
    }

    /// The batching options it runs with.
    pub fn options(&self) -> &BatchingOptions {
        &self.shared.options
    }

    /// Its counters since it started (see [`Stats`]).
    pub fn stats(&self) -> Stats {
        let s = &self.shared.stats;
        Stats {
            success: s.success.read(),
            fail: s.fail.read(),
            queue: s.queue.read(),
            compute: s.compute.read(),
            inference_count: s.inference_count.load(Ordering::Relaxed),
            execution_count: s.execution_count.load(Ordering::Relaxed),
            last_inference_ms: s.last_inference_ms.load(Ordering::Relaxed),
        }
    }

    /// Counts a request that failed before reaching the queue (refused input, a full
    /// queue, a timeout), `took` after it arrived: Triton counts those as failures too.
    pub fn count_failure(&self, took: Duration) {
        self.shared.stats.fail.add(took);
    }

    /// Queues `rows` rows (laid out contiguously in `input`) and waits for their output
    /// rows. Refuses at once with [`InferenceError::Overloaded`] when the queue is full.
    pub async fn infer(&self, input: Vec<f32>, rows: usize) -> Result<Vec<f32>, InferenceError> {
        self.enqueue(input, rows)?.await.map(|o| o.values)
    }

    /// Rows waiting in the queue now.
    pub fn queued_rows(&self) -> usize {
        self.shared.lock().rows
    }

    /// Queues a request and returns its pending answer, which does not borrow the
    /// batcher. Refuses at once when the queue is full.
    pub fn enqueue(&self, input: Vec<f32>, rows: usize) -> Result<Pending, InferenceError> {
        self.submit(input, rows).map(Pending)
    }

    fn submit(
        &self,
        input: Vec<f32>,
        rows: usize,
    ) -> Result<oneshot::Receiver<Result<Output, InferenceError>>, InferenceError> {
        let opts = &self.shared.options;
        // Rows and values must agree before a batch thread slices them: a mismatch
        // once made the kernels index past the end (and the thread panic).
        let row_len = self.shared.model.signature().input.row_len();
        if rows == 0 || rows.checked_mul(row_len) != Some(input.len()) {
            return Err(InferenceError::BadInput(format!(
                "{} values do not make {rows} rows of {row_len}",
                input.len()
            )));
        }
        let (reply, rx) = oneshot::channel();
        {
            let mut q = self.shared.lock();
            if q.closed {
                return Err(InferenceError::Closed);
            }
            let capacity = opts.max_enqueued_batches * opts.max_batch_size;
            // An empty queue always takes a request, however large, so no request is
            // refused for its size alone.
            if q.rows > 0 && q.rows + rows > capacity {
                drop(q);
                self.shared.metrics.shed.inc();
                let queued = capacity.div_ceil(opts.max_batch_size.max(1));
                return Err(InferenceError::Overloaded { queued });
            }
            q.rows += rows;
            self.shared.metrics.queued.set(q.rows as i64);
            q.jobs.push_back(Job {
                input,
                rows,
                enqueued: Instant::now(),
                reply,
            });
        }
        // Every batch thread re-checks: one may be waiting for this batch to fill up.
        self.shared.ready.notify_all();
        Ok(rx)
    }
}

/// A queued request's answer.
#[derive(Debug)]
pub struct Pending(oneshot::Receiver<Result<Output, InferenceError>>);

impl std::future::Future for Pending {
    type Output = Result<Output, InferenceError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(InferenceError::Closed)))
    }
}

impl Drop for Batcher {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.ready.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Runs [`batch_loop`] until the queue closes. The model's own panics are caught per
/// batch in [`run_batch`]; this catches anything else, counts it, and starts the loop
/// again with a fresh run state, so no panic can take a batch thread away (a dead thread
/// once left its model queueing requests that no thread would ever take).
fn supervise(shared: &Shared, thread: usize) {
    // Leaves the live count however the loop ends.
    struct Live<'a>(&'a Shared);
    impl Drop for Live<'_> {
        fn drop(&mut self) {
            self.0.live.fetch_sub(1, Ordering::SeqCst);
        }
    }
    let _live = Live(shared);
    loop {
        let outcome =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| batch_loop(shared, thread)));
        shared.busy[thread].store(0, Ordering::SeqCst);
        match outcome {
            Ok(()) => return,
            Err(panic) => {
                shared.metrics.panics.inc();
                tracing::error!(
                    panic = panic_message(&*panic),
                    "A batch thread panicked outside the model; it starts over."
                );
            }
        }
    }
}

pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(not a string)")
}

fn new_session(shared: &Shared) -> Option<Session> {
    match shared.model.session() {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!(error = %e, "A batch thread cannot create a run state; it will run the shared plan.");
            None
        }
    }
}

fn batch_loop(shared: &Shared, thread: usize) {
    let opts = &shared.options;
    let mut session = new_session(shared);
    loop {
        let mut q = shared.lock();
        // Wait for a first request.
        while q.jobs.is_empty() {
            if q.closed {
                return;
            }
            q = shared.ready.wait(q).unwrap_or_else(|p| p.into_inner());
        }
        // Wait for the batch to fill, or for the first request's timeout.
        let Some(first) = q.jobs.front().map(|j| j.enqueued) else {
            continue;
        };
        let deadline = first + opts.batch_timeout;
        while q.rows < opts.max_batch_size && !q.closed {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            q = shared
                .ready
                .wait_timeout(q, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
            if q.jobs.front().map(|j| j.enqueued) != Some(first) {
                break; // another thread took that batch
            }
        }
        let mut batch = Vec::new();
        let mut rows = 0;
        let mut taken = 0;
        while let Some(job) = q.jobs.front() {
            if !batch.is_empty() && rows + job.rows > opts.max_batch_size {
                break;
            }
            let Some(job) = q.jobs.pop_front() else { break };
            taken += job.rows;
            // Its caller stopped waiting (request timeout, client gone): skip the work.
            if job.reply.is_closed() {
                continue;
            }
            rows += job.rows;
            batch.push(job);
        }
        q.rows -= taken;
        shared.metrics.queued.set(q.rows as i64);
        drop(q);
        if batch.is_empty() {
            continue;
        }
        shared.busy[thread].store(shared.millis(Instant::now()) + 1, Ordering::SeqCst);
        let outcome = run_batch(shared, session.as_mut(), batch, rows);
        shared.busy[thread].store(0, Ordering::SeqCst);
        if outcome.is_err() {
            // The run state may be half-written by the panic: start from a fresh one.
            session = new_session(shared);
        }
    }
}

/// Runs one batch and answers each of its requests; `Err` when the model panicked (the
/// requests are answered with an error, the panic counted).
fn run_batch(
    shared: &Shared,
    session: Option<&mut Session>,
    batch: Vec<Job>,
    rows: usize,
) -> Result<(), ()> {
    let started = Instant::now();
    for job in &batch {
        let queued = started - job.enqueued;
        shared.metrics.queue.observe(queued.as_secs_f64());
        shared.stats.queue.add(queued);
    }
    let stats = &shared.stats;
    stats.execution_count.fetch_add(1, Ordering::Relaxed);
    stats
        .inference_count
        .fetch_add(rows as u64, Ordering::Relaxed);
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    stats.last_inference_ms.store(wall, Ordering::Relaxed);
    shared.metrics.batch.observe(rows as f64);
    #[cfg(test)]
    {
        let (closed, opened) = &*shared.gate;
        let mut closed = closed.lock().unwrap_or_else(|p| p.into_inner());
        while *closed {
            closed = opened.wait(closed).unwrap_or_else(|p| p.into_inner());
        }
    }
    let input = if batch.len() == 1 {
        batch[0].input.clone()
    } else {
        let mut all = Vec::with_capacity(batch.iter().map(|j| j.input.len()).sum());
        for job in &batch {
            all.extend_from_slice(&job.input);
        }
        all
    };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match session {
        Some(s) => s.run(input, rows),
        None => shared.model.run(input, rows),
    }));
    let computed = started.elapsed();
    shared.metrics.compute.observe(computed.as_secs_f64());
    for _ in &batch {
        stats.compute.add(computed);
    }
    // Each request's whole time, from queueing to its answer.
    let answered = |job: &Job, ok: bool| {
        let tally = if ok { &stats.success } else { &stats.fail };
        tally.add(job.enqueued.elapsed());
    };
    let result = match result {
        Ok(r) => r,
        Err(panic) => {
            shared.metrics.panics.inc();
            let msg = panic_message(&*panic).to_string();
            tracing::error!(panic = %msg, rows, "A local model panicked running a batch; its requests get 500.");
            for job in batch {
                answered(&job, false);
                let _ = job.reply.send(Err(InferenceError::Run(format!(
                    "the model failed on this batch: {msg}"
                ))));
            }
            return Err(());
        }
    };
    match result {
        Ok(output) => {
            let per_row = output.len().checked_div(rows).unwrap_or(0);
            let mut at = 0;
            for job in batch {
                let n = job.rows * per_row;
                // Checked: an output shorter than promised is an error, not a panic.
                let answer = output
                    .get(at..at + n)
                    .map(|values| Output {
                        values: values.to_vec(),
                        queued: started.saturating_duration_since(job.enqueued),
                        computed,
                    })
                    .ok_or_else(|| {
                        InferenceError::Run(format!(
                            "the model gave {} values for {rows} rows",
                            output.len()
                        ))
                    });
                answered(&job, answer.is_ok());
                let _ = job.reply.send(answer);
                at += n;
            }
        }
        Err(e) => {
            let msg = e.to_string();
            for job in batch {
                answered(&job, false);
                let _ = job.reply.send(Err(InferenceError::Run(msg.clone())));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared() -> (Shared, Registry) {
        let registry = Registry::new();
        let metrics = LocalMetricFamilies::new(&registry).unwrap().model("mlp");
        let model = OnnxModel::from_bytes("mlp", crate::builtin::DIGITS_MLP).unwrap();
        let options = BatchingOptions {
            max_batch_size: 8,
            batch_timeout: Duration::ZERO,
            num_batch_threads: 1,
            max_enqueued_batches: 1,
        };
        let shared = Shared::new(options, Arc::new(model), metrics);
        (shared, registry)
    }

    fn job(
        input: Vec<f32>,
        rows: usize,
    ) -> (Job, oneshot::Receiver<Result<Output, InferenceError>>) {
        let (reply, rx) = oneshot::channel();
        let job = Job {
            input,
            rows,
            enqueued: Instant::now(),
            reply,
        };
        (job, rx)
    }

    /// The fused kernels slice the input by the row count: five rows promised and one
    /// given is the panic a client once caused (through a wrapped `rows * 64`). Submit
    /// now refuses it; here it is fed past `submit` to show the catch.
    #[test]
    fn a_panicking_batch_is_answered_and_counted_and_the_thread_goes_on() {
        let (shared, registry) = shared();
        let mut session = shared.model.session().ok();
        let (bad, mut bad_rx) = job(vec![0.5; 64], 5);
        let outcome = run_batch(&shared, session.as_mut(), vec![bad], 5);
        assert!(outcome.is_err(), "the panic is reported to the loop");
        match bad_rx.try_recv() {
            Ok(Err(InferenceError::Run(m))) => assert!(m.contains("failed"), "{m}"),
            other => panic!("expected a run error, got {other:?}"),
        }
        let panics = registry
            .gather()
            .into_iter()
            .find(|f| f.name() == "switchyard_local_panics_total")
            .map(|f| f.get_metric()[0].get_counter().get_value());
        assert_eq!(panics, Some(1.0));
        // A fresh run state serves the next batch.
        let mut session = new_session(&shared);
        let (good, mut good_rx) = job(vec![0.5; 128], 2);
        assert!(run_batch(&shared, session.as_mut(), vec![good], 2).is_ok());
        assert_eq!(good_rx.try_recv().unwrap().unwrap().values.len(), 20);
    }

    /// Triton's statistics: a batch of two requests (3 and 2 rows) is one execution,
    /// five inferences, two successes each with its queue and compute time; a panicking
    /// batch's request is a failure.
    #[test]
    fn statistics_count_requests_rows_and_batches() {
        let (shared, _registry) = shared();
        let mut session = shared.model.session().ok();
        let (a, _ra) = job(vec![0.5; 3 * 64], 3);
        let (b, _rb) = job(vec![0.5; 2 * 64], 2);
        run_batch(&shared, session.as_mut(), vec![a, b], 5).unwrap();
        let (bad, _rbad) = job(vec![0.5; 64], 5);
        assert!(run_batch(&shared, session.as_mut(), vec![bad], 5).is_err());
        let s = &shared.stats;
        assert_eq!(s.success.read().count, 2);
        assert_eq!(s.fail.read().count, 1);
        assert_eq!(s.queue.read().count, 3);
        assert_eq!(s.compute.read().count, 3);
        assert_eq!(s.inference_count.load(Ordering::Relaxed), 10);
        assert_eq!(s.execution_count.load(Ordering::Relaxed), 2);
        assert!(s.last_inference_ms.load(Ordering::Relaxed) > 1_700_000_000_000);
    }

    #[test]
    fn submit_refuses_rows_that_do_not_match_the_values() {
        let registry = Registry::new();
        let metrics = LocalMetricFamilies::new(&registry).unwrap().model("mlp");
        let model = Arc::new(OnnxModel::from_bytes("mlp", crate::builtin::DIGITS_MLP).unwrap());
        let options = BatchingOptions {
            max_batch_size: 8,
            batch_timeout: Duration::ZERO,
            num_batch_threads: 1,
            max_enqueued_batches: 1,
        };
        let b = Batcher::start("mlp", model, options, metrics).unwrap();
        for (len, rows) in [(64, 5), (64, 0), (63, 1), (64, usize::MAX)] {
            assert!(
                matches!(
                    b.enqueue(vec![0.0; len], rows),
                    Err(InferenceError::BadInput(_))
                ),
                "{len} values as {rows} rows"
            );
        }
        assert!(b.enqueue(vec![0.0; 128], 2).is_ok());
    }

    fn set_gate(shared: &Shared, closed: bool) {
        let (lock, cv) = &*shared.gate;
        *lock.lock().unwrap() = closed;
        cv.notify_all();
    }

    /// Polls `health` until it says `want` (bounded: a few seconds of polling).
    fn wait_for(b: &Batcher, stall: Duration, want: bool) -> Result<(), NotServing> {
        let mut last = b.health(stall);
        for _ in 0..500 {
            if last.is_ok() == want {
                return last;
            }
            std::thread::sleep(Duration::from_millis(10));
            last = b.health(stall);
        }
        panic!("health did not become {want}: {last:?}");
    }

    /// A model stuck in a batch (a hung device) makes the model not ready, with the
    /// reason; when it moves again, ready again. Dropping the batcher (no live thread)
    /// is not ready either.
    #[test]
    fn health_turns_false_while_the_threads_are_stuck_and_true_when_they_move() {
        let registry = Registry::new();
        let metrics = LocalMetricFamilies::new(&registry).unwrap().model("mlp");
        let model = Arc::new(OnnxModel::from_bytes("mlp", crate::builtin::DIGITS_MLP).unwrap());
        let options = BatchingOptions {
            max_batch_size: 1,
            batch_timeout: Duration::ZERO,
            num_batch_threads: 1,
            max_enqueued_batches: 4,
        };
        let b = Batcher::start("mlp", model, options, metrics).unwrap();
        let stall = Duration::from_millis(50);
        assert_eq!(b.health(stall), Ok(()));

        set_gate(&b.shared, true);
        let first = b.enqueue(vec![0.5; 64], 1).unwrap();
        let second = b.enqueue(vec![0.5; 64], 1).unwrap();
        let why = wait_for(&b, stall, false).unwrap_err().0;
        assert!(
            why.contains("running one batch") || why.contains("not moving"),
            "{why}"
        );

        set_gate(&b.shared, false);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert_eq!(rt.block_on(first).unwrap().values.len(), 10);
        assert_eq!(rt.block_on(second).unwrap().values.len(), 10);
        wait_for(&b, stall, true).unwrap();

        // Closed: the threads leave, and the batcher says so.
        let shared = b.shared.clone();
        drop(b);
        assert_eq!(shared.live.load(Ordering::SeqCst), 0);
    }
}
