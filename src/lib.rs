//! The `switchyard` binary's glue: it reads the config, builds the crates' parts on one
//! Prometheus registry, binds nothing itself (callers bind, so tests use port 0), and
//! wires the data plane and the admin listener to one shutdown signal.
//!
//! - [`load_config`] / [`DEFAULT_CONFIG`]: the config file, or the built-in one.
//! - [`start`]: runs the data plane and admin listeners; returns a [`Running`] handle.
//! - [`bandits`]: the bandits' runtime (the `switchyard-bandit-runtime` crate, in
//!   `bandit/runtime/`), wired here between the router's feedback and its pickers.
//! - [`evaluate`]: `switchyard evaluate`, off-policy estimates (IPS, SNIPS, doubly
//!   robust) of other policies from the decisions file.
//! - [`simulate`]: `switchyard simulate`, the bandit against seeded worlds.
//! - [`demo`]: `switchyard demo`, the whole loop on one machine.
//! - [`reload`]: hot reload (`SIGHUP`, `POST /admin/reload`, `serve --watch`).
//! - [`signals`]: SIGTERM and SIGINT, caught once and never missed between waits.
//! - `main.rs`: the command line (`serve`, `validate`, `model-server`) and signals.
// One audited call (the shadow thread's priority) needs `unsafe`; nothing else may.
#![deny(unsafe_code)]
#![deny(rust_2018_idioms)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use prometheus::Registry;
use switchyard_config::{Config, ConfigErrors};
use switchyard_router::admin::{AdminService, AdminState};
use switchyard_router::server::{self, Drained, ServeOptions};
use switchyard_router::{Metrics, Router};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use switchyard_bandit_runtime as bandits;
pub mod demo;
pub mod evaluate;
pub mod reload;
pub mod signals;
pub mod simulate;

pub use reload::{Overrides, Reloader};

pub use switchyard_config as config;
pub use switchyard_router as router;

/// Exit code for a bad configuration (sysexits' EX_USAGE).
pub const EXIT_BAD_CONFIG: i32 = 64;

/// The configuration `serve` uses without `--config`.
pub const DEFAULT_CONFIG: &str = include_str!("../examples/default.yaml");

/// Why a configuration could not be loaded.
#[derive(Debug)]
pub enum LoadError {
    /// The file could not be read.
    Read(String),
    /// The file was read but is wrong, in these ways.
    Invalid(ConfigErrors),
}

impl LoadError {
    /// One line per problem, prefixed with `source`.
    pub fn render(&self, source: &str) -> String {
        match self {
            LoadError::Read(e) => format!("{source}: {e}\n"),
            LoadError::Invalid(errors) => errors.render(source),
        }
    }
}

/// Reads and validates the file at `path`: [`parse_config`].
pub fn load_config(path: &Path) -> Result<Config, LoadError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| LoadError::Read(format!("cannot read the file: {e}")))?;
    parse_config(&text).map_err(LoadError::Invalid)
}

/// Every check `serve`, `validate` and `model-server` run on a config, all of them in one
/// pass, reported together: the config's own rules, and that every local model (file or
/// built-in) loads as a model with its kernels, not merely that it is readable
/// (`local.model: /etc/passwd` once passed `validate` and failed `serve`). Model files
/// are checked even when the rest of the file has errors, so a variant with two
/// problems reports both.
pub fn parse_config(text: &str) -> Result<Config, ConfigErrors> {
    // The models loaded here are kept for the table build that follows (loaded once).
    switchyard_router::table::begin_check();
    switchyard_config::from_yaml_str_checked(text, switchyard_router::table::check_model)
}

/// Why the server could not start.
#[derive(Debug)]
pub enum StartError {
    /// The config names something that cannot be used (a model that does not load):
    /// a configuration error, rendered `line:column: path: message`.
    Config(switchyard_router::table::BuildError),
    /// Anything else.
    Other(String),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Config(e) => write!(f, "{e}"),
            StartError::Other(e) => f.write_str(e),
        }
    }
}

impl std::error::Error for StartError {}

/// A running Switchyard: its addresses, its router, and the way to stop it.
pub struct Running {
    /// Where the data plane listens.
    pub data_addr: SocketAddr,
    /// Where the admin listener listens.
    pub admin_addr: SocketAddr,
    router: Arc<Router>,
    shutdown: watch::Sender<bool>,
    data: JoinHandle<Drained>,
    admin: JoinHandle<Drained>,
    bandits: Arc<bandits::Bandits>,
    reloader: Arc<Reloader>,
    pulse: Arc<switchyard_router::pulse::Pulse>,
}

impl Running {
    /// The bandits' state, as `/admin/state` shows it.
    pub fn bandit_state(&self) -> serde_json::Value {
        self.bandits.state()
    }

    /// Writes the bandits' state files when called (as the end of [`Running::wait`]
    /// does): for an exit that cannot wait for the drain. Outlives the handle.
    pub fn persister(&self) -> impl Fn() + Send + 'static {
        let bandits = self.bandits.clone();
        move || bandits.persist()
    }

    /// The live numbers of the last second (what `/admin/stream` sends).
    pub fn numbers(&self) -> Arc<serde_json::Value> {
        self.pulse.latest()
    }

    /// Reloads the config file (`SIGHUP`); see [`Reloader::reload`].
    pub fn reloader(&self) -> Arc<Reloader> {
        self.reloader.clone()
    }

    /// `serve --watch`: reloads the file whenever its contents change, checked every
    /// `every`, until the shutdown.
    pub fn watch(&self, every: std::time::Duration) {
        if self.reloader.has_file() {
            tokio::spawn(
                self.reloader
                    .clone()
                    .watch(every, self.shutdown.subscribe()),
            );
        }
    }

    /// The data plane (to read the route table or move weights).
    pub fn router(&self) -> &Arc<Router> {
        &self.router
    }

    /// Starts the drain: readiness turns false, the listeners stop accepting, and open
    /// connections finish their in-flight requests.
    pub fn shutdown(&self) {
        self.router.start_draining();
        let _ = self.shutdown.send(true);
    }

    /// Waits until both listeners have drained; returns how the data plane's drain ended.
    pub async fn wait(self) -> Drained {
        let data = self.data.await.unwrap_or(Drained::TimedOut);
        let _ = self.admin.await;
        self.bandits.stop();
        // In a fleet, what was learned last reaches the others (or the state file).
        self.bandits.flush().await;
        self.bandits.persist();
        data
    }
}

/// Ticks every 100 ms until the data plane has stopped (`done` turns true).
///
/// tokio's timer driver wakes itself (an eventfd `write`, then one more `epoll_wait`)
/// whenever a timer is armed that is due before every timer it already has, or when it
/// has none. Each proxied request arms its `request_timeout`, which, at low load, is the
/// only timer: so every request paid two extra system calls (seen with `strace -c` at one
/// connection: 3 `epoll_wait` and 1 `write` per request against nginx's 2 and 0). With
/// this tick always pending, request deadlines (seconds away) are never the earliest, and
/// the driver is woken 10 times a second instead of once per request.
async fn keep_timer_driver_armed(mut done: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = done.wait_for(|stopped| *stopped) => return,
        }
    }
}

/// The token in `file` (the config key `key`; the file goes into `files`, for reloads
/// to read again), or else in the environment variable `env`; `None` when neither is
/// set. A file that cannot be read or holds nothing is a configuration error naming the
/// key.
fn read_token(
    file: Option<&str>,
    key: &'static str,
    env: Option<&str>,
    files: &mut Vec<reload::TokenFile>,
) -> Result<Option<switchyard_router::auth::Token>, StartError> {
    if let Some(path) = file {
        let file = reload::TokenFile::read(key, path.into()).map_err(|message| {
            StartError::Config(switchyard_router::table::BuildError {
                path: key.to_string(),
                line: 0,
                column: 0,
                message,
            })
        })?;
        let token = file.token.clone();
        files.push(file);
        return Ok(Some(token));
    }
    Ok(env
        .and_then(|v| std::env::var(v).ok())
        .and_then(|t| switchyard_router::auth::Token::new(&t)))
}

/// Connections closed or parked after which freed memory is handed back to the system.
const TRIM_AFTER_CLOSED: u64 = 1_000;

/// Hands the memory of closed and parked connections back to the system.
///
/// An HTTP/1.1 connection in use holds about 20 KiB (hyper's read and write buffers, its
/// task); when it closes or parks, glibc's allocator keeps the freed memory inside the
/// heap, where other allocations pin it: 9,000 idle connections took resident memory
/// from 10 to 193 MiB and it stayed there after they closed (`bench/connections.sh`).
/// `malloc_trim(0)` returns the free pages inside the heap too. Checked every 5 s;
/// called, off the async workers, once at least [`TRIM_AFTER_CLOSED`] connections closed
/// or parked since the last call.
async fn return_freed_memory(
    accepted: prometheus::IntCounter,
    open: prometheus::IntGauge,
    parked: prometheus::IntCounter,
    mut done: watch::Receiver<bool>,
) {
    let closed = || {
        accepted
            .get()
            .saturating_sub(u64::try_from(open.get()).unwrap_or(0))
            .saturating_add(parked.get())
    };
    let mut trimmed_at = closed();
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = done.wait_for(|stopped| *stopped) => return,
        }
        let now = closed();
        if now.saturating_sub(trimmed_at) >= TRIM_AFTER_CLOSED {
            trimmed_at = now;
            let _ = tokio::task::spawn_blocking(trim_heap).await;
        }
    }
}

/// `malloc_trim(0)`: glibc only (musl and others return freed pages themselves or not at
/// all; nothing to do there).
#[allow(unsafe_code)]
fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes a size and walks the allocator's own state under its
    // locks; it touches no memory of ours.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Where the config came from, for reloads.
#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    /// The file, with the hash of the text `config` was parsed from; `None`: the
    /// built-in config (or one a test built), which cannot be reloaded.
    pub file: Option<(std::path::PathBuf, String)>,
    /// `--listen` and `--admin-listen`, already applied to `config`.
    pub overrides: Overrides,
}

/// Starts the data plane on `data` and the admin endpoints on `admin`.
pub fn start(config: Config, data: TcpListener, admin: TcpListener) -> Result<Running, StartError> {
    start_with(config, data, admin, StartOptions::default())
}

/// As [`start`], for a config read from a file that reloads may read again.
pub fn start_with(
    config: Config,
    data: TcpListener,
    admin: TcpListener,
    options: StartOptions,
) -> Result<Running, StartError> {
    let mut token_files = Vec::new();
    let admin_token = read_token(
        config.admin_token_file.as_deref(),
        "admin_token_file",
        Some("SWITCHYARD_ADMIN_TOKEN"),
        &mut token_files,
    )?;
    let feedback_token = read_token(
        config.feedback_token_file.as_deref(),
        "feedback_token_file",
        None,
        &mut token_files,
    )?;
    let registry = Registry::new();
    let metrics =
        Metrics::new(&registry).map_err(|e| StartError::Other(format!("metrics: {e}")))?;
    let sink = bandits::sink(&config, &registry).map_err(StartError::Other)?;
    let fleet = match &config.fleet {
        Some(f) => Some(switchyard_fleet::Fleet::new(f, &registry).map_err(StartError::Other)?),
        None => None,
    };
    let router = Router::with_options(
        &config,
        metrics.clone(),
        Some(sink.clone() as Arc<dyn switchyard_router::feedback::FeedbackSink>),
        switchyard_router::proxy::RouterOptions {
            shadow_thread_start: Some(lowest_cpu_priority),
            feedback_token,
            fleet: fleet
                .clone()
                .map(|f| f as Arc<dyn switchyard_router::feedback::FleetDecisions>),
        },
    )
    .map_err(StartError::Config)?;
    let bandits = Arc::new(
        bandits::Bandits::spawn_in(
            &config,
            router.clone(),
            sink,
            &registry,
            fleet.map(|f| f as Arc<dyn bandits::fleet::Ledger>),
        )
        .map_err(StartError::Other)?,
    );
    let data_addr = data
        .local_addr()
        .map_err(|e| StartError::Other(e.to_string()))?;
    let admin_addr = admin
        .local_addr()
        .map_err(|e| StartError::Other(e.to_string()))?;

    let (file, hash) = match options.file {
        Some((file, hash)) => (Some(file), hash),
        None => (
            None,
            reload::config_hash(&serde_json::to_string(&config).unwrap_or_default()),
        ),
    };
    let reloader = Arc::new(
        Reloader::new(
            file,
            options.overrides,
            config.clone(),
            hash,
            router.clone(),
            bandits.clone(),
            (data_addr, admin_addr),
            token_files,
            &registry,
        )
        .map_err(StartError::Other)?,
    );

    let (shutdown, signal) = watch::channel(false);
    let wait_for = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };

    // The admin listener outlives the data plane's drain, so probes see `/readyz` turn
    // 503 (rather than a refused connection) while in-flight requests finish.
    let (data_done, admin_signal) = watch::channel(false);
    let proxy = router.clone();
    let data_opts = ServeOptions {
        max_connections: config.max_connections,
        drain_timeout: config.drain_timeout,
        client_header_timeout: config.client_header_timeout,
        client_send_timeout: config.client_send_timeout,
        connection_metrics: Some((
            metrics.connections_open.clone(),
            metrics.connections_total.clone(),
        )),
        refused: Some(metrics.connections_refused.clone()),
        park_after: server::PARK_AFTER,
        parked_metrics: Some((
            metrics.connections_parked.clone(),
            metrics.connections_parked_total.clone(),
        )),
    };
    let data = tokio::spawn(async move {
        let drained = server::serve(
            data,
            move |peer| proxy.service(Some(peer.ip())),
            wait_for(signal),
            data_opts,
        )
        .await;
        let _ = data_done.send(true);
        drained
    });

    tokio::spawn(keep_timer_driver_armed(admin_signal.clone()));
    tokio::spawn(return_freed_memory(
        metrics.connections_total.clone(),
        metrics.connections_open.clone(),
        metrics.connections_parked_total.clone(),
        admin_signal.clone(),
    ));

    let pulse = switchyard_router::pulse::Pulse::new(&registry)
        .map_err(|e| StartError::Other(format!("metrics: {e}")))?;
    tokio::spawn(pulse.clone().run(
        router.clone(),
        Some(bandits.state_fn()),
        admin_signal.clone(),
    ));
    let admin_service = AdminService(Arc::new(AdminState {
        pulse: Some(pulse.clone()),
        registry,
        router: router.clone(),
        config_json: reloader.config_json(),
        reload: reloader.has_file().then(|| {
            let r = reloader.clone();
            Arc::new(move || r.reload()) as switchyard_router::admin::ReloadFn
        }),
        state: Some(bandits.state_fn()),
        control: Some(bandits.control_fn()),
        token: admin_token.clone(),
    }));
    if admin_token.is_none() && !admin_addr.ip().is_loopback() {
        tracing::warn!(
            %admin_addr,
            "The admin listener is not on loopback and has no token: anyone who reaches it can pin, freeze and release bandits. Set admin_token_file (or SWITCHYARD_ADMIN_TOKEN), or bind admin_listen to 127.0.0.1."
        );
    }
    let admin_opts = ServeOptions {
        max_connections: 256,
        drain_timeout: std::time::Duration::from_secs(1),
        client_header_timeout: config.client_header_timeout,
        client_send_timeout: config.client_send_timeout,
        connection_metrics: None,
        refused: None,
        park_after: server::PARK_AFTER,
        parked_metrics: None,
    };
    let admin = tokio::spawn(server::serve(
        admin,
        move |_| admin_service.clone(),
        wait_for(admin_signal),
        admin_opts,
    ));

    Ok(Running {
        data_addr,
        admin_addr,
        router,
        shutdown,
        data,
        admin,
        bandits,
        reloader,
        pulse,
    })
}

/// Puts the calling thread at the lowest CPU priority (nice 19). The shadow thread runs
/// there: when it shares a busy core with the data plane, the scheduler gives the core
/// to primary requests, the shadow queues fill and further mirrors are dropped and
/// counted, instead of mirrors taking CPU from the traffic that matters. With a core to
/// spare, nothing changes.
#[allow(unsafe_code)]
fn lowest_cpu_priority() {
    // SAFETY: setpriority(2) takes plain integers and touches no memory of ours. On
    // Linux, PRIO_PROCESS with id 0 means the calling thread.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) };
    if rc != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "Cannot lower the shadow thread's priority.");
    }
}
