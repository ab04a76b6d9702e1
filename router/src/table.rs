//! The route table: an immutable snapshot of what the config says, built at start and
//! at each reload and swapped whole, so requests in flight keep the table they started
//! with. A reload builds the next table from the live one: what a variant or shadow
//! keeps across it (its breaker, its connection pool, its loaded model, its counters)
//! is shared between the two tables, so nothing is lost while both are in use.

use std::collections::HashMap;
use std::sync::Arc;

use http::{HeaderName, HeaderValue};
use switchyard_config::Config;

use crate::local::LocalBackend;
use crate::metrics::{Metrics, VariantMetrics};
use crate::selector::{stable_hash, Selector, WeightError, WeightTable};
use crate::upstream::{Timeouts, Upstream};

/// Models by the name clients use.
#[derive(Debug)]
pub struct RouteTable {
    models: HashMap<String, Arc<ModelRoute>>,
    /// Whether any model has a bandit (feedback is taken only then), decided once here
    /// rather than at every feedback request.
    learns: bool,
}

/// One model: its variants and how to choose among them.
#[derive(Debug)]
pub struct ModelRoute {
    /// The client-facing name.
    pub name: String,
    /// The variants, in config order (indices match the selector's).
    pub variants: Box<[VariantRoute]>,
    /// Chooses a variant per request.
    pub selector: Selector,
    /// Header whose value pins a client to a variant.
    pub sticky_header: Option<HeaderName>,
    /// Largest request body, in bytes.
    pub body_limit: u64,
    /// `Some(feedback_ttl)` when a bandit learns from this model's predictions: its
    /// decisions are recorded for feedback.
    pub feedback_ttl: Option<std::time::Duration>,
    /// The model's key in [`ModelKeys`], as decisions and the bandits refer to it: the
    /// same while the model's name and variant list are.
    pub index: u16,
    /// [`ModelKeys::fingerprint`] of the same: the model as other replicas know it.
    pub fingerprint: u32,
    /// Chooses per request instead of the weight table when installed (a bandit in
    /// `per_request` mode); returns `None` to defer to the weight table.
    pub picker: arc_swap::ArcSwapOption<Box<dyn Picker>>,
    /// Candidates that get mirrored copies of this model's predictions.
    pub shadows: Option<switchyard_shadow::ShadowSet>,
    /// Variants that do not take gRPC calls (remote HTTP ones), as a set of bits.
    pub not_grpc: u64,
    /// Variants that take only gRPC calls (`protocol: grpc`), as a set of bits.
    pub only_grpc: u64,
    /// How many variants take gRPC calls.
    pub grpc_variants: usize,
    /// Retries, hedging and the fallback.
    pub resilience: Resilience,
}

/// A model's retry, hedge and fallback settings, with its retry budget.
pub struct Resilience {
    /// The index of the local variant that answers when the others cannot.
    pub fallback: Option<usize>,
    /// Which failures are retried, and the largest body held for a retry.
    pub retry: switchyard_config::Retry,
    /// Retries allowed: `retry.budget` per request plus `min_per_second`.
    pub budget: crate::split::RetryBudget,
    /// Ask a second variant after this long.
    pub hedge_after: Option<std::time::Duration>,
    /// The model's resilience counters, resolved per reason when used.
    pub metrics: crate::metrics::ResilienceFamilies,
}

impl std::fmt::Debug for Resilience {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resilience")
            .field("fallback", &self.fallback)
            .field("retry", &self.retry)
            .field("hedge_after", &self.hedge_after)
            .finish()
    }
}

/// A per-request chooser the binary can install on a model (Thompson sampling).
pub trait Picker: Send + Sync + std::fmt::Debug {
    /// The variant for this request and the probability it had, or `None` to use the
    /// weight table (warm-up, pin, freeze).
    fn pick(&self) -> Option<crate::selector::Pick>;
}

/// One variant of a model.
#[derive(Debug)]
pub struct VariantRoute {
    /// The variant's name.
    pub name: String,
    /// The same, ready to send as `x-switchyard-variant`.
    pub name_header: HeaderValue,
    /// The model's name on the backend.
    pub upstream_model: String,
    /// Where requests go.
    pub backend: Backend,
    /// Metric handles.
    pub metrics: VariantMetrics,
    /// Its circuit breaker and in-flight count: whether it is ready. Kept by a reload
    /// (with the new settings) while the variant's name is.
    pub health: Arc<crate::breaker::Health>,
}

/// What answers for a variant: a remote model server, or a model run in-process. Both
/// are chosen by the same selector, so the bandit can weigh them against each other.
/// Shared, so a reload that leaves a variant's backend settings as they were keeps its
/// connection pool or its loaded model and batch threads.
#[derive(Debug, Clone)]
pub enum Backend {
    /// A model server reached over HTTP.
    Remote(Arc<Upstream>),
    /// A model run in-process behind a batch queue.
    Local(Arc<LocalBackend>),
}

/// The keys decisions carry for their model: one per (model name, variant list) ever
/// routed, never reused, so a decision made before a reload still names the variant
/// list it was made from (the bandits map it onto the model's current variants).
#[derive(Debug, Default)]
pub struct ModelKeys(std::sync::Mutex<Vec<(String, Box<[String]>)>>);

impl ModelKeys {
    /// The key of `model` with these variants, assigned now if new; `None` once 65,536
    /// keys are taken (a restart starts over).
    pub fn key(&self, model: &str, variants: &[String]) -> Option<u16> {
        let mut keys = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = keys
            .iter()
            .position(|(m, v)| m == model && **v == *variants)
        {
            return u16::try_from(i).ok();
        }
        let key = u16::try_from(keys.len()).ok()?;
        keys.push((model.to_string(), variants.into()));
        Some(key)
    }

    /// Every key's model and variant list, by key.
    pub fn all(&self) -> Vec<(String, Box<[String]>)> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// A model name and variant list as every replica of a fleet names them (keys are
    /// per process): what a decision carried in a request id says it was made from.
    pub fn fingerprint(model: &str, variants: &[String]) -> u32 {
        let mut text = model.to_string();
        for v in variants {
            text.push('\0');
            text.push_str(v);
        }
        let h = crate::selector::stable_hash(text.as_bytes());
        (h ^ (h >> 32)) as u32
    }

    /// The latest key with this fingerprint.
    pub fn find(&self, fingerprint: u32) -> Option<u16> {
        let keys = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let i = keys
            .iter()
            .rposition(|(m, v)| Self::fingerprint(m, v) == fingerprint)?;
        u16::try_from(i).ok()
    }
}

/// Why a table could not be built from a (validated) config: a model file that cannot
/// be loaded, say. Carries the YAML path and position so it reads like a config error.
#[derive(Debug, thiserror::Error)]
#[error("{line}:{column}: {path}: {message}")]
pub struct BuildError {
    /// YAML path of the offending value.
    pub path: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// What went wrong.
    pub message: String,
}

impl RouteTable {
    /// Builds the table. `seed` seeds the selectors (each model gets its own stream).
    /// On a reload, `previous` is the live table: what survives in it by name is kept
    /// (see the module's note). Must run inside a Tokio runtime (clients spawn their
    /// pools there).
    pub fn build(
        config: &Config,
        metrics: &Metrics,
        seed: u64,
        shadow_runtime: Option<&switchyard_shadow::ShadowRuntime>,
        keys: &ModelKeys,
        previous: Option<&RouteTable>,
        feed: &switchyard_shadow::capture::PredictionFeed,
    ) -> Result<Self, BuildError> {
        let mut models = HashMap::with_capacity(config.models.len());
        for (name, model) in &config.models {
            let err = |message: String| BuildError {
                path: format!("models.{name}"),
                line: 0,
                column: 0,
                message,
            };
            let old_model = previous.and_then(|p| p.model(name));
            let mut variants = Vec::with_capacity(model.variants.len());
            for (i, v) in model.variants.iter().enumerate() {
                let old = old_model.and_then(|m| m.variants.iter().find(|o| o.name == v.name));
                let timeout = v
                    .request_timeout
                    .or(model.request_timeout)
                    .unwrap_or(config.request_timeout);
                let variant_metrics = metrics.variant(name, &v.name);
                let backend = match (&v.upstream, &v.local) {
                    (Some(url), _) => {
                        let timeouts = Timeouts {
                            connect: v.connect_timeout.unwrap_or(config.connect_timeout),
                            request: timeout,
                            idle: v
                                .upstream_idle_timeout
                                .unwrap_or(config.upstream_idle_timeout),
                        };
                        match old.map(|o| &o.backend) {
                            Some(Backend::Remote(up))
                                if up.same_settings(url, v.protocol, timeouts) =>
                            {
                                Backend::Remote(up.clone())
                            }
                            _ => Backend::Remote(Arc::new(
                                Upstream::new(
                                    url,
                                    v.protocol,
                                    timeouts,
                                    variant_metrics.upstream_errors().clone(),
                                )
                                .map_err(|m| err(format!("variant `{}`: {m}", v.name)))?,
                            )),
                        }
                    }
                    (None, Some(local)) => {
                        let source = LocalSource::of(local, timeout);
                        match old.map(|o| &o.backend) {
                            Some(Backend::Local(l)) if l.source == source => {
                                Backend::Local(l.clone())
                            }
                            _ => Backend::Local(Arc::new(load_local(
                                name,
                                &format!("models.{name}.variants[{i}].local.model"),
                                local,
                                metrics,
                                source,
                            )?)),
                        }
                    }
                    (None, None) => {
                        return Err(err(format!("variant `{}` has no backend", v.name)))
                    }
                };
                let families = &metrics.resilience;
                let health = match old {
                    Some(o) => {
                        o.health.reconfigure(&model.breaker, &model.limits);
                        o.health.clone()
                    }
                    None => Arc::new(crate::breaker::Health::new(
                        name,
                        &v.name,
                        &model.breaker,
                        &model.limits,
                        families.state.with_label_values(&[name, &v.name]),
                        families.ejections.with_label_values(&[name, &v.name]),
                    )),
                };
                variants.push(VariantRoute {
                    name: v.name.clone(),
                    name_header: HeaderValue::from_str(&v.name).map_err(|e| err(e.to_string()))?,
                    upstream_model: v.upstream_model.clone().unwrap_or_else(|| name.clone()),
                    backend,
                    metrics: variant_metrics,
                    health,
                });
            }
            let weights: Vec<f64> = model.variants.iter().map(|v| v.weight).collect();
            let table = WeightTable::new(&weights).map_err(|e| err(e.to_string()))?;
            let names: Vec<&str> = model.variants.iter().map(|v| v.name.as_str()).collect();
            let selector = Selector::new(&names, table, seed ^ stable_hash(name.as_bytes()));
            let sticky_header = match &model.sticky_header {
                Some(h) => Some(HeaderName::try_from(h.as_str()).map_err(|e| err(e.to_string()))?),
                None => None,
            };
            let shadows = match shadow_runtime {
                Some(rt) if !model.shadows.is_empty() || model.capture.is_some() => {
                    let defaults = switchyard_shadow::ShadowDefaults {
                        runtime: rt.handle(),
                        connect_timeout: config.connect_timeout,
                        idle_timeout: config.upstream_idle_timeout,
                        request_timeout: model.request_timeout.unwrap_or(config.request_timeout),
                        body_limit: config.body_limit(model),
                        seed: seed ^ stable_hash(name.as_bytes()).rotate_left(17),
                        feed: Some(feed.clone()),
                    };
                    let set = switchyard_shadow::ShadowSet::new(
                        name,
                        &model.shadows,
                        &defaults,
                        &metrics.shadow,
                        model.capture.as_ref(),
                        old_model.and_then(|m| m.shadows.as_ref()),
                    )
                    .map_err(|e| BuildError {
                        path: format!("models.{name}.shadows"),
                        line: 0,
                        column: 0,
                        message: e.to_string(),
                    })?;
                    Some(set)
                }
                _ => None,
            };
            let (mut not_grpc, mut only_grpc) = (0u64, 0u64);
            for (i, v) in variants.iter().enumerate() {
                if let Backend::Remote(up) = &v.backend {
                    if up.protocol == switchyard_config::UpstreamProtocol::Grpc {
                        only_grpc |= crate::split::bit(i);
                    } else {
                        not_grpc |= crate::split::bit(i);
                    }
                }
            }
            let grpc_variants = variants.len() - not_grpc.count_ones() as usize;
            let variant_names: Vec<String> =
                model.variants.iter().map(|v| v.name.clone()).collect();
            let index = keys.key(name, &variant_names).ok_or_else(|| {
                err("65,536 different variant lists were routed since start: restart to reload further".into())
            })?;
            let route = ModelRoute {
                not_grpc,
                only_grpc,
                grpc_variants,
                name: name.clone(),
                variants: variants.into_boxed_slice(),
                selector,
                sticky_header,
                body_limit: config.body_limit(model),
                feedback_ttl: model.bandit.as_ref().map(|b| b.feedback_ttl),
                index,
                fingerprint: ModelKeys::fingerprint(name, &variant_names),
                picker: arc_swap::ArcSwapOption::empty(),
                shadows,
                resilience: Resilience {
                    fallback: model
                        .fallback
                        .as_ref()
                        .and_then(|f| model.variants.iter().position(|v| &v.name == f)),
                    retry: model.retry.clone(),
                    // tower asserts a floor below i32::MAX and a percentage ≤ 1000.
                    budget: crate::split::RetryBudget::new(
                        model.retry.budget,
                        model.retry.min_per_second,
                    ),
                    hedge_after: model.hedge_after,
                    metrics: metrics.resilience.clone(),
                },
            };
            route.publish_weight_gauges();
            models.insert(name.clone(), Arc::new(route));
        }
        let learns = models.values().any(|m| m.feedback_ttl.is_some());
        // What the check loaded and this table did not take (a model a reload kept
        // running) is not needed any more.
        checked().clear();
        *running() = models
            .values()
            .flat_map(|m| m.variants.iter())
            .filter_map(|v| match &v.backend {
                Backend::Local(l) => Some(l.source.model.clone()),
                Backend::Remote(_) => None,
            })
            .collect();
        Ok(RouteTable { models, learns })
    }

    /// The model clients call `name`.
    pub fn model(&self, name: &str) -> Option<&Arc<ModelRoute>> {
        self.models.get(name)
    }

    /// Whether any model has a bandit.
    pub fn learns(&self) -> bool {
        self.learns
    }

    /// All models, in no particular order.
    pub fn models(&self) -> impl Iterator<Item = &Arc<ModelRoute>> {
        self.models.values()
    }
}

impl ModelRoute {
    /// Replaces the model's weights (any non-negative numbers with a positive sum) and
    /// updates the `switchyard_variant_weight` gauges. The seam the bandit drives.
    pub fn set_weights(&self, weights: &[f64]) -> Result<(), WeightError> {
        self.selector.set_weights(weights)?;
        self.publish_weight_gauges();
        Ok(())
    }

    fn publish_weight_gauges(&self) {
        let table = self.selector.table();
        for (v, w) in self.variants.iter().zip(table.weights()) {
            v.metrics.weight.set(*w);
        }
    }
}

/// Reads and parses a local model (file or built-in) with its configured CPU kernels:
/// what `serve` does first, and all that `validate` does, so the two refuse the same
/// files with the same message.
pub fn load_model(
    local: &switchyard_config::Local,
) -> Result<switchyard_inference::OnnxModel, String> {
    let bytes: std::borrow::Cow<'static, [u8]> = match local.model.strip_prefix("builtin:") {
        Some(b) => switchyard_inference::builtin::get(b)
            .ok_or_else(|| format!("no built-in model `{b}`"))?
            .into(),
        None => std::fs::read(&local.model)
            .map_err(|e| {
                // A path relative to the repository, run from elsewhere: the bundled
                // models are in the binary.
                let hint = if e.kind() == std::io::ErrorKind::NotFound {
                    format!(
                        " (the bundled models need no file: {})",
                        switchyard_config::BUILTIN_MODELS
                            .iter()
                            .map(|m| format!("`builtin:{m}`"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                } else {
                    String::new()
                };
                format!("cannot read model file `{}`: {e}{hint}", local.model)
            })?
            .into(),
    };
    let kernels = match local.cpu_kernels {
        switchyard_config::CpuKernels::Fused => switchyard_inference::Kernels::Auto,
        switchyard_config::CpuKernels::Tract => switchyard_inference::Kernels::TractOnly,
    };
    switchyard_inference::OnnxModel::from_bytes_with(&local.model, &bytes, kernels)
        .map_err(|e| e.to_string())
}

/// What a local variant was loaded from: a reload loads the model again only when this
/// changed (its settings, its timeout, or the file on disk).
#[derive(Debug, Clone, PartialEq)]
pub struct LocalSource {
    model: ModelSource,
    /// Its `request_timeout`.
    timeout: std::time::Duration,
}

impl LocalSource {
    fn of(local: &switchyard_config::Local, timeout: std::time::Duration) -> Self {
        LocalSource {
            model: ModelSource::of(local),
            timeout,
        }
    }
}

/// What a model is loaded from: the variant's `local:` settings, without their position
/// in the file, and the model file's length and modification time (`None` for built-in
/// models).
#[derive(Debug, Clone, PartialEq)]
struct ModelSource {
    settings: switchyard_config::Local,
    file: Option<(u64, Option<std::time::SystemTime>)>,
}

impl ModelSource {
    fn of(local: &switchyard_config::Local) -> Self {
        let mut settings = local.clone();
        settings.model_at = (0, 0);
        let file = (!local.model.starts_with("builtin:"))
            .then(|| std::fs::metadata(&local.model).ok())
            .flatten()
            .map(|m| (m.len(), m.modified().ok()));
        ModelSource { settings, file }
    }
}

/// Models the configuration check loaded ([`check_model`]), kept for the table build
/// that follows it: `serve`, `model-server`, the demo and a reload check every local
/// model by loading it, then build the table, and without this each model was loaded
/// twice (twice the start-up time, for a large graph on tract seconds more). A check
/// starts it afresh ([`begin_check`]), so it holds at most one configuration's models;
/// a build takes the ones it uses and drops the rest.
static CHECKED: std::sync::Mutex<Vec<(ModelSource, switchyard_inference::OnnxModel)>> =
    std::sync::Mutex::new(Vec::new());

fn checked() -> std::sync::MutexGuard<'static, Vec<(ModelSource, switchyard_inference::OnnxModel)>>
{
    // A panic while holding it leaves a list of whole entries: still usable.
    CHECKED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The sources of the models the last table built runs. A model running unchanged
/// loaded once already: a reload's check need not load it again (which would hold a
/// second copy of a large model in memory while the first serves).
static RUNNING: std::sync::Mutex<Vec<ModelSource>> = std::sync::Mutex::new(Vec::new());

fn running() -> std::sync::MutexGuard<'static, Vec<ModelSource>> {
    RUNNING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Starts a configuration check: models kept from an earlier one are dropped.
pub fn begin_check() {
    checked().clear();
}

/// The configuration check of a local model: [`load_model`], the model kept for the
/// build that follows.
pub fn check_model(local: &switchyard_config::Local) -> Result<(), String> {
    let source = ModelSource::of(local);
    if running().contains(&source) {
        return Ok(());
    }
    let model = load_model(local)?;
    let mut kept = checked();
    kept.retain(|(s, _)| *s != source);
    kept.push((source, model));
    Ok(())
}

/// The model the check loaded from `local`'s source, if it kept one; else loads it.
fn checked_or_load(
    local: &switchyard_config::Local,
) -> Result<switchyard_inference::OnnxModel, String> {
    let source = ModelSource::of(local);
    let kept = {
        let mut kept = checked();
        kept.iter()
            .position(|(s, _)| *s == source)
            .map(|i| kept.swap_remove(i).1)
    };
    match kept {
        Some(model) => Ok(model),
        None => load_model(local),
    }
}

/// Loads a local model (file or built-in) and starts its batch threads.
fn load_local(
    model: &str,
    path: &str,
    local: &switchyard_config::Local,
    metrics: &Metrics,
    source: LocalSource,
) -> Result<LocalBackend, BuildError> {
    let timeout = source.timeout;
    let err = |message: String| BuildError {
        path: path.to_string(),
        line: local.model_at.0,
        column: local.model_at.1,
        message,
    };
    #[allow(unused_mut)]
    let mut loaded = checked_or_load(local).map_err(err)?;
    if local.runtime == switchyard_config::LocalRuntime::Wgpu {
        // No GPU, or a graph outside the GPU kernels: the model still serves, on the
        // CPU, and the log says why (a sidecar must not refuse to start over it).
        #[cfg(feature = "gpu")]
        loaded.use_gpu(switchyard_inference::gpu::GpuOptions {
            allow_cpu_adapter: local.gpu_adapter == switchyard_config::GpuAdapter::Any,
            // A batch the device has not finished by the time its requests have had
            // their 504 is not worth waiting for.
            max_wait: Some(timeout),
            ..Default::default()
        });
        #[cfg(not(feature = "gpu"))]
        tracing::warn!(%model, "runtime wgpu: this binary was built without the `gpu` feature; the model runs on the CPU.");
    }
    let runtime = loaded.runtime_name();
    metrics.local.set_runtime(model, runtime);
    let b = &local.batching;
    let threads = b.num_batch_threads.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    let options = switchyard_inference::BatchingOptions {
        max_batch_size: b.max_batch_size,
        batch_timeout: std::time::Duration::from_micros(b.batch_timeout_micros),
        num_batch_threads: threads,
        max_enqueued_batches: b.max_enqueued_batches,
    };
    let batcher = switchyard_inference::Batcher::start(
        model,
        Arc::new(loaded),
        options,
        metrics.local.model(model),
    )
    .map_err(|e| err(format!("cannot start batch threads: {e}")))?;
    tracing::info!(%model, file = %local.model, threads, runtime, "Local model loaded.");
    Ok(LocalBackend {
        batcher,
        source,
        delay: local.delay,
        failure_rate: local.failure_rate,
        timeout,
        version: local.version.to_string(),
    })
}
