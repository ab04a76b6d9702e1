//! `switchyard`: the command line. Parsing arguments, logging, the runtime and signals
//! live here; everything else is in the library crates.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use switchyard::{
    load_config, parse_config, start_with, LoadError, Overrides, StartError, StartOptions,
    EXIT_BAD_CONFIG,
};

/// The first image of scikit-learn's digits (a 0), as the pasteable example request.
const EXAMPLE_DIGIT: &str = "[0,0,5,13,9,1,0,0,0,0,13,15,10,15,5,0,0,3,15,2,0,11,8,0,0,4,12,0,0,8,8,0,0,5,8,0,0,9,8,0,0,4,11,0,1,12,7,0,0,2,14,5,10,12,0,0,0,0,6,13,10,0,0,0]";
use switchyard_config::Config;
use switchyard_router::server::Drained;
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

/// A sidecar that routes prediction requests across weighted model variants.
#[derive(Parser)]
#[command(
    name = "switchyard",
    version,
    about,
    after_help = "Logging: SWITCHYARD_LOG sets what is logged (to stderr), in tracing's EnvFilter syntax: a level (error, warn, info, debug, trace; default info), or per module, e.g. SWITCHYARD_LOG=info,switchyard_router=debug.\nAdmin token: SWITCHYARD_ADMIN_TOKEN, when no admin_token_file is configured."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The whole loop on one machine, nothing to install: three model servers, a shadow,
    /// the sidecar with a profit bandit and a fallback, simulated traffic and revenue; a
    /// live table here and a dashboard in the browser; half-way, one variant goes down.
    Demo(switchyard::demo::DemoArgs),
    /// Serve the prediction endpoints and the admin listener until SIGTERM or SIGINT.
    Serve {
        /// YAML configuration file. Without it, the built-in configuration
        /// (examples/default.yaml) is used.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Address of the prediction endpoints, instead of the file's `listen`.
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Address of the admin endpoints, instead of the file's `admin_listen`.
        #[arg(long)]
        admin_listen: Option<std::net::SocketAddr>,
        /// Reload the config file whenever its contents change (checked every second),
        /// as SIGHUP and POST /admin/reload do.
        #[arg(long, requires = "config")]
        watch: bool,
    },
    /// Check a configuration file: prints every error with its line and YAML path and
    /// exits 64, or exits 0 when the file is good. Starts nothing.
    Validate {
        /// The YAML file to check.
        file: PathBuf,
    },
    /// Serve one ONNX model in-process over TF Serving REST and KServe V2: a standalone
    /// model server (the upstream in tests, benchmarks and the demo).
    ModelServer(ModelServerArgs),
    /// Load-test a prediction endpoint: closed loop (--concurrency) or open loop (--rate,
    /// coordinated-omission corrected), percentiles from an HDR histogram, a breakdown per
    /// variant (x-switchyard-variant) with server-timing phases, optional simulated
    /// revenue posted as feedback. Exits 64 on bad arguments, 69 when the target refuses,
    /// 71 when the file-descriptor limit is too low for the connections asked for.
    Load(switchyard_load::LoadArgs),
    /// Estimate, from the decisions file (`bandit.decisions_file`), what other policies
    /// would have earned on the same traffic: inverse-propensity (IPS, SNIPS) and
    /// doubly-robust estimates with 95% intervals. Exits 64 on a bad policy, 66 when the
    /// file cannot be read.
    Evaluate {
        /// The decisions file.
        #[arg(long)]
        log: PathBuf,
        /// Only this model (default: every model in the file).
        #[arg(long)]
        model: Option<String>,
        /// A policy to estimate (repeatable): `uniform`, `pin:VARIANT`,
        /// `fixed:a=1,b=3`, or other bandit settings `bandit:{objective: conversion,
        /// warmup: 100}` (replayed). The logged policy is always estimated first.
        #[arg(long = "policy")]
        policies: Vec<String>,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Run the bandit against seeded simulated worlds (no network) and compare it with
    /// a fixed split, ε-greedy and Seldon-style truncated Thompson sampling.
    Simulate {
        /// Decisions per run.
        #[arg(long, default_value_t = 100_000)]
        requests: u64,
        /// Seed of the first run.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Runs per scenario and strategy (seeds `seed`, `seed + 1`, …), averaged.
        #[arg(long, default_value_t = 5)]
        seeds: u64,
        /// Decisions per second: how many decisions one `update_interval` and one
        /// second of feedback delay are.
        #[arg(long, default_value_t = switchyard_bandit::simulate::DEFAULT_RATE)]
        rate: f64,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// Also write an SVG plot of the bandit's weights over time to this file.
        #[arg(long)]
        svg: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
struct ModelServerArgs {
    /// ONNX file, or `builtin:digits_mlp` / `builtin:digits_cnn`.
    #[arg(long)]
    model: String,
    /// Address of the prediction endpoints.
    #[arg(long, default_value = "127.0.0.1:8501")]
    listen: String,
    /// Address of the admin endpoints (/metrics, /healthz, /readyz).
    #[arg(long, default_value = "127.0.0.1:0")]
    admin_listen: String,
    /// The model's name in URLs.
    #[arg(long, default_value = "digits")]
    name: String,
    /// Most rows per batch.
    #[arg(long, default_value_t = 64)]
    max_batch_size: u64,
    /// How long a batch waits for more requests after its first, in microseconds.
    #[arg(long, default_value_t = 0)]
    batch_timeout_micros: u64,
    /// Threads running batches (default: one per core).
    #[arg(long)]
    num_batch_threads: Option<u64>,
    /// Full batches allowed to wait before requests get 503.
    #[arg(long, default_value_t = 100)]
    max_enqueued_batches: u64,
    /// Extra latency added to every answer, e.g. `5ms` (experiments).
    #[arg(long)]
    delay: Option<String>,
    /// Share of predictions answered with 500 (experiments), 0 to 1.
    #[arg(long, default_value_t = 0.0)]
    failure_rate: f64,
    /// Threads serving HTTP (default: one per core).
    #[arg(long)]
    worker_threads: Option<u64>,
    /// `tract` (CPU) or `wgpu` (GPU when there is one; else the CPU, with a log line).
    #[arg(long, default_value = "tract")]
    runtime: String,
    /// With `--runtime tract`: `fused` (our kernels where the graph allows, else tract's
    /// plan) or `tract` (tract's plan only). tract's plan needs a binary built with
    /// `--features tract`.
    #[arg(long)]
    cpu_kernels: Option<String>,
    /// With `--runtime wgpu`: `hardware`, or `any` to also accept a software Vulkan
    /// adapter (lavapipe) for rehearsals on a machine with no GPU.
    #[arg(long)]
    gpu_adapter: Option<String>,
}

impl ModelServerArgs {
    /// The equivalent config file, so flags are validated (and explained) like YAML.
    fn to_yaml(&self) -> String {
        let q = |s: &str| serde_json::to_string(s).unwrap_or_default();
        let mut y = format!(
            "listen: {}\nadmin_listen: {}\n",
            q(&self.listen),
            q(&self.admin_listen)
        );
        if let Some(n) = self.worker_threads {
            y.push_str(&format!("worker_threads: {n}\n"));
        }
        y.push_str(&format!(
            "models:\n  {}:\n    variants:\n      - name: local\n        weight: 1\n        local:\n          model: {}\n          failure_rate: {}\n",
            q(&self.name),
            q(&self.model),
            self.failure_rate
        ));
        if let Some(d) = &self.delay {
            y.push_str(&format!("          delay: {}\n", q(d)));
        }
        y.push_str(&format!("          runtime: {}\n", q(&self.runtime)));
        if let Some(k) = &self.cpu_kernels {
            y.push_str(&format!("          cpu_kernels: {}\n", q(k)));
        }
        if let Some(a) = &self.gpu_adapter {
            y.push_str(&format!("          gpu_adapter: {}\n", q(a)));
        }
        y.push_str(&format!(
            "          batching:\n            max_batch_size: {}\n            batch_timeout_micros: {}\n            max_enqueued_batches: {}\n",
            self.max_batch_size, self.batch_timeout_micros, self.max_enqueued_batches
        ));
        if let Some(n) = self.num_batch_threads {
            y.push_str(&format!("            num_batch_threads: {n}\n"));
        }
        y
    }
}

fn demo(args: switchyard::demo::DemoArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("switchyard demo: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(switchyard::demo::run(args));
    // Batch threads and connections end with the process.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    ExitCode::from(code)
}

fn load(args: &switchyard_load::LoadArgs) -> ExitCode {
    use std::io::Write;
    match switchyard_load::run(args) {
        Ok(out) => {
            let mut stdout = std::io::stdout().lock();
            let _ = stdout.write_all(out.as_bytes());
            let _ = stdout.flush();
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("switchyard load: {e}");
            ExitCode::from(match e {
                switchyard_load::LoadError::Usage(_) => EXIT_BAD_CONFIG as u8,
                // EX_UNAVAILABLE and EX_OSERR, from sysexits.h.
                switchyard_load::LoadError::Connect(_) => 69,
                _ => 71,
            })
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo's table is the thing to read: its components log warnings only, unless
    // SWITCHYARD_LOG says otherwise.
    let level = if matches!(cli.command, Command::Demo(_)) {
        "warn"
    } else {
        "info"
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("SWITCHYARD_LOG").unwrap_or_else(|_| EnvFilter::new(level)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command {
        Command::Validate { file } => validate(file),
        Command::Serve {
            config,
            listen,
            admin_listen,
            watch,
        } => serve(config, listen, admin_listen, watch),
        Command::ModelServer(args) => model_server(&args),
        Command::Load(args) => load(&args),
        Command::Demo(args) => demo(args),
        Command::Evaluate {
            log,
            model,
            policies,
            json,
        } => evaluate(&log, model.as_deref(), &policies, json),
        Command::Simulate {
            requests,
            seed,
            seeds,
            rate,
            json,
            svg,
        } => simulate(requests.max(10), rate, seed, seeds, json, svg),
    }
}

fn validate(file: PathBuf) -> ExitCode {
    let source = file.display().to_string();
    match load_config(&file) {
        Ok(config) => {
            let variants: usize = config.models.values().map(|m| m.variants.len()).sum();
            let shadows: usize = config.models.values().map(|m| m.shadows.len()).sum();
            let bandits = config
                .models
                .values()
                .filter(|m| m.bandit.is_some())
                .count();
            println!(
                "{source}: ok ({} model{}, {variants} variant{}, {shadows} shadow{}, {bandits} bandit{})",
                config.models.len(),
                plural(config.models.len()),
                plural(variants),
                plural(shadows),
                plural(bandits)
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprint!("{}", e.render(&source));
            ExitCode::from(EXIT_BAD_CONFIG as u8)
        }
    }
}

fn simulate(
    requests: u64,
    rate: f64,
    seed: u64,
    seeds: u64,
    json: bool,
    svg: Option<PathBuf>,
) -> ExitCode {
    if !(rate.is_finite() && rate > 0.0) {
        eprintln!("switchyard: --rate must be a positive number of decisions per second");
        return ExitCode::from(64);
    }
    let results = switchyard::simulate::simulate(requests, rate, seed, seeds);
    if let Some(path) = svg {
        if let Err(e) = std::fs::write(&path, switchyard::simulate::svg(&results)) {
            eprintln!("switchyard: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    let text = if json {
        switchyard::simulate::to_json(&results, requests, rate, seed, seeds).to_string()
    } else {
        switchyard::simulate::table(&results, requests, rate, seeds.max(1))
    };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{text}");
    ExitCode::SUCCESS
}

fn evaluate(
    log: &std::path::Path,
    model: Option<&str>,
    policies: &[String],
    json: bool,
) -> ExitCode {
    use switchyard::evaluate::{self as ev, Policy};
    let parsed: Result<Vec<Policy>, String> = policies.iter().map(|p| Policy::parse(p)).collect();
    let policies = match parsed {
        Ok(p) => p,
        Err(e) => {
            eprintln!("switchyard: --policy {e}");
            return ExitCode::from(64);
        }
    };
    match ev::evaluate(log, model, &policies) {
        Ok(report) => {
            let text = if json {
                ev::to_json(&report).to_string()
            } else {
                ev::table(&report)
            };
            let _ = writeln!(std::io::stdout().lock(), "{}", text.trim_end());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("switchyard: {e}");
            ExitCode::from(66)
        }
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

fn model_server(args: &ModelServerArgs) -> ExitCode {
    let source = "model-server";
    let config = match switchyard::parse_config(&args.to_yaml()) {
        Ok(c) => c,
        Err(e) => {
            // The user wrote flags, not YAML: name the flag, not the config path.
            for err in &e.0 {
                eprintln!(
                    "switchyard model-server: {}: {}",
                    flag_for(&err.path, &args.name),
                    err.message
                );
            }
            return ExitCode::from(EXIT_BAD_CONFIG as u8);
        }
    };
    run_with_runtime(config, source.to_string(), StartOptions::default(), false)
}

/// The `model-server` flag behind a path of the config its flags become
/// (`models.digits.variants[0].local.batching.max_batch_size` → `--max-batch-size`):
/// each config key is named after the flag's field, so clap's own argument list says
/// which flag it was.
fn flag_for(path: &str, model_name: &str) -> String {
    let key = match path.strip_prefix(&format!("models.{model_name}")) {
        // The model's own entry: its name is the one thing there that a flag sets.
        Some("") => return "--name".to_string(),
        Some(rest) => rest.rsplit('.').next().unwrap_or(rest),
        None => path,
    };
    let args = <ModelServerArgs as clap::Args>::augment_args(clap::Command::new("model-server"));
    let long = args
        .get_arguments()
        .find(|a| a.get_id() == key)
        .and_then(clap::Arg::get_long);
    long.map_or_else(|| path.to_string(), |l| format!("--{l}"))
}

fn serve(
    path: Option<PathBuf>,
    listen: Option<std::net::SocketAddr>,
    admin_listen: Option<std::net::SocketAddr>,
    watch: bool,
) -> ExitCode {
    let source = path.as_ref().map_or_else(
        || "<built-in config>".to_string(),
        |p| p.display().to_string(),
    );
    let mut file = None;
    let config = match &path {
        Some(path) => {
            let parsed = std::fs::read_to_string(path)
                .map_err(|e| LoadError::Read(format!("cannot read the file: {e}")))
                .and_then(|text| {
                    file = Some((path.clone(), switchyard::reload::config_hash(&text)));
                    parse_config(&text).map_err(LoadError::Invalid)
                });
            match parsed {
                Ok(c) => c,
                Err(e) => {
                    eprint!("{}", e.render(&path.display().to_string()));
                    return ExitCode::from(EXIT_BAD_CONFIG as u8);
                }
            }
        }
        None => {
            match switchyard_config::from_yaml_str(switchyard::DEFAULT_CONFIG) {
                Ok(c) => {
                    tracing::info!("No --config given: using the built-in configuration (examples/default.yaml).");
                    c
                }
                Err(e) => {
                    eprint!("{}", e.render("<built-in config>"));
                    return ExitCode::from(EXIT_BAD_CONFIG as u8);
                }
            }
        }
    };
    let mut config = config;
    let overrides = Overrides {
        listen,
        admin_listen,
    };
    overrides.apply(&mut config);
    if config.listen == config.admin_listen && config.listen.port() != 0 {
        eprintln!(
            "switchyard: listen and admin_listen are both {}; the admin listener needs its own port",
            config.listen
        );
        return ExitCode::from(EXIT_BAD_CONFIG as u8);
    }
    let options = StartOptions { file, overrides };
    run_with_runtime(config, source, options, watch)
}

fn run_with_runtime(
    config: Config,
    source: String,
    options: StartOptions,
    watch: bool,
) -> ExitCode {
    // One worker thread: a current-thread runtime does the same work without the
    // work-stealing scheduler's cross-thread bookkeeping (measured in bench/proxy.sh).
    let mut runtime = match config.worker_threads {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    runtime.enable_all();
    let runtime = match runtime.build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("switchyard: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(config, source, options, watch))
}

async fn run(config: Config, source: String, options: StartOptions, watch: bool) -> ExitCode {
    let data = match bind(config.listen, config.listen_backlog) {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "switchyard: cannot listen on {} (listen): {e}",
                config.listen
            );
            return ExitCode::FAILURE;
        }
    };
    let admin = match TcpListener::bind(config.admin_listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "switchyard: cannot listen on {} (admin_listen): {e}",
                config.admin_listen
            );
            return ExitCode::FAILURE;
        }
    };
    let example_model = config.models.keys().next().cloned().unwrap_or_default();
    let running = match start_with(config, data, admin, options) {
        Ok(r) => r,
        Err(StartError::Config(e)) => {
            eprintln!("{source}:{e}");
            return ExitCode::from(EXIT_BAD_CONFIG as u8);
        }
        Err(e) => {
            eprintln!("switchyard: {e}");
            return ExitCode::FAILURE;
        }
    };
    // SIGHUP's, SIGTERM's and SIGINT's handlers are in place before anyone learns the
    // addresses: their default actions would end the process without a drain.
    let hangups = hangup_signal();
    let mut stop = switchyard::signals::Stop::catch();
    // One machine-readable line on stdout (tests and scripts read the ports from it),
    // then a request to paste. Written without `println!`: if whoever reads stdout goes
    // away, a failed write must not take the server down with a panic.
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "switchyard listening data={} admin={}",
        running.data_addr, running.admin_addr
    );
    let _ = writeln!(
        out,
        "try: curl -s -X POST http://{}/v1/models/{example_model}:predict -d '{{\"instances\": [{EXAMPLE_DIGIT}]}}'",
        running.data_addr
    );
    let _ = out.flush();
    drop(out);
    tracing::info!(data = %running.data_addr, admin = %running.admin_addr, "Switchyard is serving.");
    if watch {
        running.watch(std::time::Duration::from_secs(1));
    }
    let hangups = tokio::spawn(reload_on_hangup(hangups, running.reloader()));

    stop.next().await;
    hangups.abort();
    tracing::info!(
        "Shutdown signal received; draining in-flight requests (a second signal exits at once)."
    );
    running.shutdown();
    let state = running.persister();
    tokio::select! {
        drained = running.wait() => match drained {
            Drained::Clean => {
                tracing::info!("Drained; exiting.");
                ExitCode::SUCCESS
            }
            Drained::TimedOut => {
                tracing::warn!("Drain timeout passed with requests still in flight; they were cut.");
                ExitCode::from(EXIT_DRAIN_CUT)
            }
        },
        () = stop.next() => {
            tracing::warn!("Second shutdown signal; saving bandit state and exiting without waiting for the drain.");
            state();
            ExitCode::from(EXIT_SECOND_SIGNAL)
        }
    }
}

/// Exit status when `drain_timeout` passed with requests still in flight (sysexits'
/// EX_TEMPFAIL): an orchestrator can tell a clean stop (0) from one that cut requests.
const EXIT_DRAIN_CUT: u8 = 75;

/// Exit status when a second SIGTERM or SIGINT ended the drain (128 + SIGINT, as shells
/// report an interrupted program).
const EXIT_SECOND_SIGNAL: u8 = 130;

/// Binds `addr` with an accept queue of `backlog` (tokio's `TcpListener::bind` takes
/// mio's 128).
fn bind(addr: std::net::SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As std's and tokio's own `bind` do on Unix: a restart can rebind at once.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

#[cfg(unix)]
type Hangups = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangups = ();

/// SIGHUP, caught from now on.
fn hangup_signal() -> Hangups {
    #[cfg(unix)]
    {
        switchyard::signals::catch(
            tokio::signal::unix::SignalKind::hangup(),
            "SIGHUP",
            "reload with POST /admin/reload instead",
        )
    }
}

/// Reloads the config file at each SIGHUP (errors are logged by the reload).
async fn reload_on_hangup(hangups: Hangups, reloader: std::sync::Arc<switchyard::Reloader>) {
    #[cfg(unix)]
    if let Some(mut hangups) = hangups {
        while hangups.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading the config.");
            let r = reloader.clone();
            let _ = tokio::task::spawn_blocking(move || r.reload()).await;
        }
    }
    #[cfg(not(unix))]
    let _ = (hangups, reloader);
    std::future::pending::<()>().await;
}
