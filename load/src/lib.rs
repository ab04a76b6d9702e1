//! `switchyard load`: tells a user, before production, how a model, its runtime and its
//! routing perform. It talks to Switchyard (or any TF Serving / V2 server) only over the
//! network.
//!
//! - [`target`]: the URL, its protocol preset, default bodies from the bundled model's
//!   test inputs, bodies from a file.
//! - [`engine`]: closed and open loop (coordinated-omission corrected), warm-up,
//!   connection workers, progress line.
//! - [`http1`]: a lean HTTP/1.1 client connection (h2c and gRPC go through hyper).
//! - [`stats`]: HDR histograms, per-variant breakdown from `x-switchyard-variant`,
//!   `server-timing` phases, the text and JSON reports, the sweep table.
//! - [`reward`]: simulated revenue per variant, posted to `/v1/feedback`.
//! - `limits`: the file-descriptor limit.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod engine;
pub mod http1;
mod limits;
pub mod reward;
pub mod stats;
pub mod target;

use std::time::Duration;

use serde_json::json;

/// How a request failed without an HTTP answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// No connection.
    Connect,
    /// No complete answer within `--timeout`.
    Timeout,
    /// The connection broke.
    Reset,
    /// The answer was not HTTP.
    Protocol,
}

impl ErrorKind {
    /// The report's label.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Connect => "connect",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Reset => "reset",
            ErrorKind::Protocol => "protocol",
        }
    }
}

/// Why a load run could not be done.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Bad arguments (exit 64).
    #[error("{0}")]
    Usage(String),
    /// The target does not accept connections.
    #[error("{0}")]
    Connect(String),
    /// The machine cannot open enough connections.
    #[error("{0}")]
    Limits(String),
    /// The runtime could not start.
    #[error("cannot start the runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

fn duration(text: &str) -> Result<Duration, String> {
    switchyard_config::duration::parse(text)
}

/// `switchyard load`'s arguments.
#[derive(clap::Args, Debug, Clone)]
pub struct LoadArgs {
    /// A full prediction URL, e.g. http://127.0.0.1:8080/v1/models/digits:predict. The
    /// body defaults to valid requests for that path's protocol (TF Serving `:predict`
    /// or V2 `/infer`), cycling through the bundled model's test digits.
    pub url: String,
    /// Connections, each sending its next request when the last is answered (closed
    /// loop); with --rate, the most connections used. A list (1,8,64,512) runs a sweep
    /// and prints one table. Default 8 (closed loop) or 256 (open loop).
    #[arg(long, short = 'c', value_delimiter = ',')]
    pub concurrency: Vec<usize>,
    /// Open loop: requests per second, sent on schedule whatever the answers; latency is
    /// measured from each request's intended send time (coordinated-omission corrected).
    #[arg(long, short = 'r')]
    pub rate: Option<f64>,
    /// How long to run, warm-up included (default 10s unless --requests is given).
    #[arg(long, short = 'd', value_parser = duration, conflicts_with = "requests")]
    pub duration: Option<Duration>,
    /// Stop after this many measured requests (sent after the warm-up).
    #[arg(long, short = 'n')]
    pub requests: Option<u64>,
    /// Requests sent in this first period are not counted.
    #[arg(long, value_parser = duration, default_value = "0s")]
    pub warmup: Duration,
    /// JSON bodies to send, cycled: one JSON document, or one per line.
    #[arg(long)]
    pub body_file: Option<String>,
    /// Extra request header, `name: value` (repeatable).
    #[arg(long = "header", short = 'H')]
    pub headers: Vec<String>,
    /// HTTP/2 over cleartext (prior knowledge), up to 100 streams per connection.
    #[arg(long)]
    pub h2c: bool,
    /// gRPC instead of HTTP/JSON: KServe V2 `ModelInfer` calls (raw FP32 contents) for
    /// the model of the V2 `/infer` URL, to the same host and port, over HTTP/2 (up to
    /// 100 streams per connection). gRPC statuses are reported as the HTTP statuses
    /// they stand for (UNAVAILABLE as 503, INVALID_ARGUMENT as 400, ...).
    #[arg(long, conflicts_with_all = ["body_file", "binary"])]
    pub grpc: bool,
    /// V2 binary tensors: the default bodies' pixels as FP32 bytes after a JSON header
    /// (`Inference-Header-Content-Length`), answers asked for in binary.
    #[arg(long, conflicts_with = "body_file")]
    pub binary: bool,
    /// Rows (digits) per request in the default bodies, 1 to 1024.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Time allowed per request.
    #[arg(long, value_parser = duration, default_value = "30s")]
    pub timeout: Duration,
    /// Worker threads (default: one per core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Simulated revenue per variant, posted to /v1/feedback for every answered
    /// request: `VARIANT=bernoulli(p)[*x]`, `normal(mean,sd)`, `uniform(lo,hi)`,
    /// `const(x)` (repeatable). A plain bernoulli(p) is posted as `converted`.
    #[arg(long = "reward")]
    pub rewards: Vec<String>,
    /// Post each feedback this long after its answer.
    #[arg(long, value_parser = duration, default_value = "0s")]
    pub feedback_delay: Duration,
    /// Seeds the revenue draws.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Print one JSON object (last) instead of the text report.
    #[arg(long)]
    pub json: bool,
}

/// Runs the load test (or sweep) and returns what to print on stdout.
pub fn run(args: &LoadArgs) -> Result<String, LoadError> {
    let usage = |m: String| Err(LoadError::Usage(m));
    let target = target::Target::parse(&args.url)?;
    if let Some(r) = args.rate {
        if !(r.is_finite() && r > 0.0) {
            return usage(format!("--rate must be a positive number, not {r}"));
        }
    }
    if args.requests == Some(0) {
        return usage("--requests must be at least 1".into());
    }
    if let Some(d) = args.duration {
        if d <= args.warmup {
            return usage(format!(
                "--duration ({d:?}) must be longer than --warmup ({:?})",
                args.warmup
            ));
        }
    }
    let levels = if args.concurrency.is_empty() {
        vec![if args.rate.is_some() { 256 } else { 8 }]
    } else {
        args.concurrency.clone()
    };
    if let Some(bad) = levels.iter().find(|c| **c == 0 || **c > 1_000_000) {
        return usage(format!(
            "--concurrency {bad}: give 1 to 1,000,000 connections"
        ));
    }
    if let Some(h) = args.headers.iter().find(|h| !h.contains(':')) {
        return usage(format!("--header `{h}`: write `name: value`"));
    }
    if args.batch == 0 || args.batch > 1024 {
        return usage(format!("--batch {}: give 1 to 1024 rows", args.batch));
    }
    if (args.grpc || args.binary) && target.preset != target::Preset::V2 {
        return usage(format!(
            "--grpc and --binary take a V2 URL (http://host:port/v2/models/{{model}}/infer), not {}",
            args.url
        ));
    }
    let mut headers = args.headers.clone();
    let bodies = match &args.body_file {
        Some(f) => target::bodies_from_file(f)?,
        None if args.grpc => target::grpc_bodies(&target, args.batch),
        None if args.binary => {
            let (bodies, header_length) = target::binary_bodies(args.batch);
            headers.push(format!("inference-header-content-length: {header_length}"));
            bodies
        }
        None => target::default_bodies(target.preset, args.batch),
    };
    let rewards = reward::parse_rewards(&args.rewards).map_err(LoadError::Usage)?;
    let threads = args.threads.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    let plan = engine::Plan {
        method: if bodies.is_empty() { "GET" } else { "POST" },
        target,
        bodies,
        headers,
        rate: args.rate,
        duration: match (args.duration, args.requests) {
            (None, None) => Some(Duration::from_secs(10)),
            (d, _) => d,
        },
        requests: args.requests,
        warmup: args.warmup,
        timeout: args.timeout,
        h2c: args.h2c || args.grpc,
        grpc: args.grpc,
        rewards,
        feedback_delay: args.feedback_delay,
        seed: args.seed,
        progress: !args.json || levels.len() == 1,
        threads: threads.max(1),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(plan.threads)
        .enable_all()
        .build()
        .map_err(LoadError::Runtime)?;
    let reports = runtime.block_on(async {
        let mut out = Vec::with_capacity(levels.len());
        for c in &levels {
            out.push(engine::run_level(&plan, *c).await?);
        }
        Ok::<_, LoadError>(out)
    })?;
    let last = reports
        .last()
        .unwrap_or_else(|| unreachable!("at least one level"));
    Ok(match (args.json, reports.len()) {
        (true, 1) => format!("{}\n", last.to_json()),
        (true, _) => {
            let mut v = last.to_json();
            v["sweep"] = json!(reports
                .iter()
                .map(stats::Report::to_json)
                .collect::<Vec<_>>());
            format!("{v}\n")
        }
        (false, 1) => last.to_text(),
        (false, _) => {
            let mut t = stats::sweep_table(&reports);
            for r in &reports {
                for w in &r.warnings {
                    t.push_str(&format!("warning (concurrency {}): {w}\n", r.concurrency));
                }
            }
            t
        }
    })
}
