//! The bandits' runtime, wired between the router's feedback and its selectors: the
//! router does not know what a Thompson sampler is, and the bandit crate does no I/O.
//! It sits behind the router's two seams, [`switchyard_router::feedback::FeedbackSink`]
//! (feedback in) and [`switchyard_router::table::Picker`] with the route table's weights
//! (decisions out), so the binary only wires it, and the fleet's runtime can be a second
//! implementation of the same seams.
//!
//! - [`learner`]: one model's bandit at run time. [`BanditSink`] (the router's
//!   `FeedbackSink`) teaches each reward to the model's bandit the moment it is taken;
//!   the per-request picker samples from posteriors republished at every reward.
//! - One task per model recomputes the weights (P(best) within the guardrails) every
//!   `update_every` rewards or `update_interval`, whichever comes first, and publishes
//!   them to the model's selector.
//! - One housekeeping task expires decisions at their `feedback_ttl` (under
//!   `missing_feedback: zero` each counts as no conversion / zero revenue) and writes the
//!   state file every 10 seconds; [`Bandits::persist`] writes it once more at shutdown.
//! - [`state`]: the state file and `/admin/state`'s JSON, checked when read back.
//! - [`fleet`]: the seam fleet mode plugs into (a [`fleet::Ledger`] the replicas share),
//!   and what each model keeps of its exchanges with it; one task exchanges every
//!   model's deltas every `sync_interval` when a ledger is given.
//! - [`export`]: the decisions file (`bandit.decisions_file`) for `switchyard evaluate`.
//! - [`bandit_config`] / [`simulated`]: the config's `bandit:` keys as the bandit crate's
//!   settings, for the runtime and for `switchyard simulate` alike.

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

mod export;
pub mod fleet;
mod learner;
mod state;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use prometheus::{
    CounterVec, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry,
};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::{json, Value};
use switchyard_bandit::policy::{Guardrails, Override};
use switchyard_bandit::{Bandit, BanditConfig, Objective, Posterior};
use switchyard_config::{BanditMode, BanditObjective, BanditSpec, Config, HalfLife, Prior};
use switchyard_router::Router;
use tokio::task::JoinHandle;

pub use learner::BanditSink;
use learner::{Learner, Model, PickerState, SharedPicker, Slot, ThompsonPicker, VariantMetrics};
use state::{override_from, override_json, posterior_from, posterior_json};

/// Posterior draws per P(best) estimate: weights to within about 1.5 points.
const DRAWS: usize = 2000;
/// How often the state file is written while running.
const PERSIST_EVERY: Duration = Duration::from_secs(10);

fn objective(o: BanditObjective) -> Objective {
    match o {
        BanditObjective::Conversion => Objective::Conversion,
        BanditObjective::Revenue => Objective::Revenue,
        BanditObjective::Profit => Objective::Profit,
    }
}

/// The bandit a model's `bandit:` section asks for: the one place the config's keys
/// become the bandit crate's settings (the runtime and `switchyard simulate` both read
/// it, so the simulator's "defaults" are the config's).
pub fn bandit_config(b: &BanditSpec) -> BanditConfig {
    BanditConfig {
        objective: objective(b.objective),
        guardrails: Guardrails {
            min_weight: b.min_weight,
            max_step: b.max_step,
            warmup: b.warmup,
        },
        draws: DRAWS,
        half_life: match b.half_life {
            Some(HalfLife::Rewards(n)) => Some(n),
            _ => None,
        },
        prior: b.prior.map(|p| match p {
            Prior::Beta { alpha, beta } => Posterior::beta(alpha, beta),
            Prior::Gaussian {
                mean,
                strength,
                shape,
                scale,
            } => Posterior::gaussian(mean, strength, shape, scale),
        }),
        detect: b
            .detect_changes
            .then_some(switchyard_bandit::engine::DETECT_CONFIDENCE),
    }
}

/// The simulator's strategy for a model's `bandit:` section: the same bandit with the
/// runtime's cadence and mode.
pub fn simulated(b: &BanditSpec) -> switchyard_bandit::simulate::Strategy {
    switchyard_bandit::simulate::Strategy::Bandit {
        config: bandit_config(b),
        per_request: b.mode == BanditMode::PerRequest,
        update_every: b.update_every,
        update_interval: b.update_interval.as_secs_f64(),
    }
}

fn objective_name(o: Objective) -> &'static str {
    match o {
        Objective::Conversion => "conversion",
        Objective::Revenue => "revenue",
        Objective::Profit => "profit",
    }
}

/// The bandit metric families, registered once.
#[derive(Clone, Debug)]
pub(crate) struct Families {
    mean: GaugeVec,
    low: GaugeVec,
    high: GaugeVec,
    rewards: IntCounterVec,
    revenue: CounterVec,
    cost: CounterVec,
    expired: IntCounterVec,
    delay: HistogramVec,
    panics: IntCounterVec,
    changes: IntCounterVec,
}

impl Families {
    fn new(r: &Registry) -> prometheus::Result<Self> {
        let mv = ["model", "variant"];
        let gauge = |n: &str, h: &str| GaugeVec::new(Opts::new(n, h), &mv);
        let m = Families {
            mean: gauge("switchyard_bandit_posterior_mean", "Posterior mean of each variant's expected reward.")?,
            low: gauge("switchyard_bandit_credible_low", "Lower end of the ~95% credible interval of each variant's expected reward.")?,
            high: gauge("switchyard_bandit_credible_high", "Upper end of the ~95% credible interval of each variant's expected reward.")?,
            rewards: IntCounterVec::new(Opts::new("switchyard_bandit_rewards_total", "Rewards learned per variant (feedback, and expired decisions under missing_feedback: zero)."), &mv)?,
            revenue: CounterVec::new(Opts::new("switchyard_bandit_revenue_total", "Revenue (or 0/1 conversions, or rewards) reported per variant."), &mv)?,
            cost: CounterVec::new(Opts::new("switchyard_bandit_cost_total", "Cost of the predictions whose outcome is known (feedback or expiry), per variant."), &mv)?,
            expired: IntCounterVec::new(Opts::new("switchyard_decisions_expired_total", "Predictions whose feedback never came within feedback_ttl."), &mv)?,
            delay: HistogramVec::new(
                HistogramOpts::new("switchyard_feedback_delay_seconds", "Time from a prediction to its feedback.")
                    .buckets(vec![0.01, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0]),
                &["model"],
            )?,
            panics: IntCounterVec::new(Opts::new("switchyard_bandit_panics_total", "Bandit updates that panicked (caught: the bandit goes on at its next update)."), &["model"])?,
            changes: IntCounterVec::new(Opts::new("switchyard_bandit_changes_total", "Changes of a variant's reward found by the change detector (detect_changes): each makes the bandit forget what came before it."), &mv)?,
        };
        r.register(Box::new(m.changes.clone()))?;
        r.register(Box::new(m.panics.clone()))?;
        r.register(Box::new(m.mean.clone()))?;
        r.register(Box::new(m.low.clone()))?;
        r.register(Box::new(m.high.clone()))?;
        r.register(Box::new(m.rewards.clone()))?;
        r.register(Box::new(m.revenue.clone()))?;
        r.register(Box::new(m.cost.clone()))?;
        r.register(Box::new(m.expired.clone()))?;
        r.register(Box::new(m.delay.clone()))?;
        Ok(m)
    }

    /// Removes the series of a model whose bandit a reload removed.
    fn forget(&self, model: &str, variants: &[String]) {
        self.forget_variants(model, variants);
        let _ = self.delay.remove_label_values(&[model]);
        let _ = self.panics.remove_label_values(&[model]);
    }

    /// Removes the series of variants a reload removed from a model's bandit.
    fn forget_variants(&self, model: &str, variants: &[String]) {
        for v in variants {
            let l = [model, v.as_str()];
            for g in [&self.mean, &self.low, &self.high] {
                let _ = g.remove_label_values(&l);
            }
            for c in [&self.rewards, &self.expired, &self.changes] {
                let _ = c.remove_label_values(&l);
            }
            let _ = self.revenue.remove_label_values(&l);
            let _ = self.cost.remove_label_values(&l);
        }
    }

    fn variant(&self, model: &str, variant: &str) -> VariantMetrics {
        let l = [model, variant];
        VariantMetrics {
            rewards: self.rewards.with_label_values(&l),
            revenue: self.revenue.with_label_values(&l),
            cost: self.cost.with_label_values(&l),
            expired: self.expired.with_label_values(&l),
            changes: self.changes.with_label_values(&l),
            mean: self.mean.with_label_values(&l),
            low: self.low.with_label_values(&l),
            high: self.high.with_label_values(&l),
        }
    }
}

/// The sink the router's feedback goes to; [`Bandits::spawn`] fills it with the
/// config's bandits (and each reload with the new config's). It exists whether or not a
/// model has a bandit, so a reload can add the first one.
pub fn sink(config: &Config, registry: &Registry) -> Result<Arc<BanditSink>, String> {
    let families = Families::new(registry).map_err(|e| format!("bandit metrics: {e}"))?;
    let export = match &config.bandit.decisions_file {
        Some(path) => Some(export::DecisionsFile::open(path, registry)?),
        None => None,
    };
    Ok(Arc::new(BanditSink {
        slots: ArcSwap::from_pointee(Vec::new()),
        export,
        families,
    }))
}

/// A fresh bandit for the model `name` of the config.
fn new_model(
    name: &str,
    model: &switchyard_config::Model,
    b: &BanditSpec,
    families: &Families,
    fleet_seed: Option<u64>,
) -> Arc<Model> {
    let cfg = bandit_config(b);
    let variants: Vec<String> = model.variants.iter().map(|v| v.name.clone()).collect();
    let weights: Vec<f64> = model.variants.iter().map(|v| v.weight).collect();
    let n = variants.len();
    let bandit = Bandit::new(cfg, &weights);
    let picker = (b.mode == BanditMode::PerRequest).then(|| {
        Arc::new(ThompsonPicker {
            // Not steering until the state is restored and the first update ran.
            state: ArcSwap::from_pointee(PickerState {
                steering: false,
                ..PickerState::of(&bandit)
            }),
            explore: (b.min_weight * n as f64).min(1.0),
        })
    });
    Arc::new(Model {
        name: name.to_string(),
        metrics: variants.iter().map(|v| families.variant(name, v)).collect(),
        delay: families.delay.with_label_values(&[name]),
        panics: families.panics.with_label_values(&[name]),
        objective: objective(b.objective),
        costs: model
            .variants
            .iter()
            .map(|v| v.cost_per_1k / 1000.0)
            .collect(),
        cost_per_second: model.variants.iter().map(|v| v.cost_per_second).collect(),
        missing: b.missing_feedback,
        update_every: b.update_every,
        update_interval: b.update_interval,
        time_half_life: match b.half_life {
            Some(HalfLife::Time(h)) => Some(h),
            _ => None,
        },
        learner: Mutex::new(Learner {
            bandit,
            rewards: vec![0; n],
            revenue: vec![0.0; n],
            cost: vec![0.0; n],
            expired: vec![0; n],
            over: Override::None,
            since_update: 0,
            decayed_at: tokio::time::Instant::now(),
            moved: false,
            fleet: fleet::Synced::new(n),
        }),
        fleet_seed,
        picker,
        wake: tokio::sync::Notify::new(),
        variants,
    })
}

/// The bandits of a running Switchyard.
#[derive(Debug)]
pub struct Bandits {
    /// By name, for `/admin/state`, the state file and operators' overrides; replaced
    /// whole by a reload.
    models: Arc<ArcSwap<BTreeMap<String, Arc<Model>>>>,
    router: Arc<Router>,
    sink: Arc<BanditSink>,
    seed: u64,
    state_file: Option<PathBuf>,
    export: Option<Arc<export::DecisionsFile>>,
    /// Each model's update task, by model name.
    updates: Mutex<BTreeMap<String, JoinHandle<()>>>,
    housekeeping: JoinHandle<()>,
    /// Fleet mode: the ledger, this replica's name in it, and the exchange task.
    fleet: Option<(Arc<dyn fleet::Ledger>, String, JoinHandle<()>)>,
}

impl Bandits {
    /// Restores the state file (if `config.state_file` names one that exists) into the
    /// config's bandits, installs them in the sink, their weights and per-request pickers
    /// in the route table, and starts a task per model and the housekeeping task.
    pub fn spawn(
        config: &Config,
        router: Arc<Router>,
        sink: Arc<BanditSink>,
        registry: &Registry,
    ) -> Result<Self, String> {
        Self::spawn_in(config, router, sink, registry, None)
    }

    /// As [`Bandits::spawn`], in a fleet: every model's statistics are exchanged with
    /// `ledger` every `ledger.interval()` (see [`fleet`]).
    pub fn spawn_in(
        config: &Config,
        router: Arc<Router>,
        sink: Arc<BanditSink>,
        registry: &Registry,
        ledger: Option<Arc<dyn fleet::Ledger>>,
    ) -> Result<Self, String> {
        let state_file = config.state_file.as_ref().map(PathBuf::from);
        let corrupt = IntCounter::new(
            "switchyard_state_file_corrupt_total",
            "State files found corrupt or implausible at start, moved aside (`<file>.corrupt-<unix time>`).",
        )
        .map_err(|e| format!("bandit metrics: {e}"))?;
        registry
            .register(Box::new(corrupt.clone()))
            .map_err(|e| format!("bandit metrics: {e}"))?;
        let saved: Value = state_file
            .as_ref()
            .map_or(Value::Null, |p| state::read_state(p, &corrupt));
        let models: Arc<ArcSwap<BTreeMap<String, Arc<Model>>>> = Arc::default();
        // Kept in the state file, so a restarted replica's pushes keep their numbers.
        let replica = ledger.as_ref().map(|_| {
            saved["replica"]
                .as_str()
                .filter(|r| !r.is_empty() && r.len() <= 64)
                .map_or_else(new_replica_name, str::to_string)
        });
        let housekeeping = {
            let (models, file) = (models.clone(), state_file.clone());
            let replica = replica.clone();
            let (router, sink) = (router.clone(), sink.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                let mut last_write = Instant::now();
                loop {
                    tick.tick().await;
                    expire(&router, &sink).await;
                    if let Some(file) = file.as_deref() {
                        if last_write.elapsed() >= PERSIST_EVERY {
                            state::write_state(
                                file,
                                &render(&models.load(), replica.as_deref()).to_string(),
                            );
                            last_write = Instant::now();
                        }
                    }
                }
            })
        };
        let fleet = ledger.zip(replica).map(|(ledger, replica)| {
            let task = tokio::spawn(sync_task(models.clone(), ledger.clone(), replica.clone()));
            (ledger, replica, task)
        });
        let bandits = Bandits {
            fleet,
            models,
            export: sink.export.clone(),
            router,
            sink,
            seed: config.seed.unwrap_or(0x5EED),
            state_file,
            updates: Mutex::default(),
            housekeeping,
        };
        bandits.install(config, &bandits.router.table(), &saved["models"]);
        Ok(bandits)
    }

    /// Takes a reloaded config's bandits, on the route table about to go live: a model
    /// whose name survives keeps what its bandit learned (posteriors, totals, override,
    /// weights, each change detector's recent rewards) under its new settings, variant
    /// by variant (a new variant starts from the prior); a new model starts fresh.
    /// Feedback for decisions made before the reload goes to the same variant in the new
    /// bandit.
    pub fn reload(&self, config: &Config, next: &switchyard_router::table::RouteTable) {
        self.install(config, next, &Value::Null);
    }

    fn install(
        &self,
        config: &Config,
        table: &switchyard_router::table::RouteTable,
        saved: &Value,
    ) {
        let mut fresh = BTreeMap::new();
        let fleet_seed = self.fleet.as_ref().map(|_| self.seed);
        for (name, model) in &config.models {
            if let Some(b) = &model.bandit {
                fresh.insert(
                    name.clone(),
                    new_model(name, model, b, &self.sink.families, fleet_seed),
                );
            }
        }
        let old = self.models.load_full();
        {
            // Every live learner locked while its state moves: feedback that resolved an
            // old bandit waits here, then finds it moved and resolves the new one.
            let mut guards: Vec<_> = old.values().map(|m| (m, m.lock())).collect();
            for (m, l) in &mut guards {
                if let Some(next) = fresh.get(&m.name) {
                    restore(next, &render_model(m, l));
                    let mut n = next.lock();
                    // An override not yet pushed to the fleet is still to be pushed.
                    n.fleet.override_pending = l.fleet.override_pending;
                    carry_detectors(next, &mut n, m, l);
                }
                l.moved = true;
            }
            for (name, m) in &fresh {
                if !old.contains_key(name) {
                    restore(m, &saved[name.as_str()]);
                }
            }
            let slots = self
                .router
                .model_keys()
                .into_iter()
                .map(|(name, variants)| {
                    fresh.get(&name).map(|m| Slot {
                        model: m.clone(),
                        variants: variants
                            .iter()
                            .map(|v| m.variants.iter().position(|x| x == v))
                            .collect(),
                    })
                })
                .collect();
            self.sink.slots.store(Arc::new(slots));
            self.models.store(Arc::new(fresh.clone()));
        }
        for (name, m) in old.iter() {
            if !fresh.contains_key(name) {
                self.sink.families.forget(name, &m.variants);
            } else {
                let now = &fresh[name].variants;
                let gone: Vec<String> = m
                    .variants
                    .iter()
                    .filter(|v| !now.contains(v))
                    .cloned()
                    .collect();
                self.sink.families.forget_variants(name, &gone);
            }
        }
        let mut updates = self.updates.lock().unwrap_or_else(|p| p.into_inner());
        for task in std::mem::take(&mut *updates).into_values() {
            task.abort();
        }
        for (name, m) in fresh {
            if let Some(route) = table.model(&name) {
                let _ = route.set_weights(m.lock().bandit.weights());
                route.picker.store(m.picker.as_ref().map(|p| {
                    Arc::new(Box::new(SharedPicker(p.clone()))
                        as Box<dyn switchyard_router::table::Picker>)
                }));
            }
            let mut rng = StdRng::seed_from_u64(
                self.seed ^ switchyard_router::selector::stable_hash(name.as_bytes()),
            );
            // The first update now, on the table about to go live, rather than as the
            // task's first tick: a task first polled after feedback had begun to come in
            // would count those rewards into it, and the next `update_every` would then
            // take that many more.
            if let Some(weights) = update_caught(&m, &mut rng) {
                publish(table, &name, &weights);
            }
            updates.insert(name, tokio::spawn(update_task(m, self.router.clone(), rng)));
        }
    }

    /// `/admin/state`: each model's objective and, per variant, its weight, posterior
    /// mean and credible interval, rewards, revenue and cost totals.
    pub fn state(&self) -> Value {
        let mut state = render(&self.models.load(), self.replica());
        if let Some((ledger, ..)) = &self.fleet {
            state["fleet"] = ledger.status();
        }
        state
    }

    /// This replica's name in the fleet's ledger.
    fn replica(&self) -> Option<&str> {
        self.fleet.as_ref().map(|(_, r, _)| r.as_str())
    }

    /// Fleet mode: exchanges every model's statistics once more now (at shutdown, so
    /// what this replica learned last reaches the fleet), each within
    /// [`fleet::EXCHANGE_TIMEOUT`]. What cannot be pushed stays in the state file.
    pub async fn flush(&self) {
        if let Some((ledger, replica, _)) = &self.fleet {
            for m in self.models.load().values() {
                let _ = sync_model(m, ledger.as_ref(), replica).await;
            }
        }
    }

    /// A renderer for the admin listener.
    pub fn state_fn(self: &Arc<Self>) -> switchyard_router::admin::StateFn {
        let me = self.clone();
        Arc::new(move || me.state())
    }

    /// Sets an operator's override for `model`: `pin` (to `variant`), `freeze` or
    /// `release`. It takes effect at once: the model's update is brought forward.
    pub fn control(
        &self,
        model: &str,
        action: &str,
        variant: Option<&str>,
    ) -> Result<Value, (u16, String)> {
        let models = self.models.load();
        let m = models
            .get(model)
            .ok_or((404, format!("model `{model}` has no bandit")))?;
        let over = match (action, variant) {
            ("pin", Some(v)) => Override::Pin(
                m.variants
                    .iter()
                    .position(|x| x == v)
                    .ok_or((404, format!("model `{model}` has no variant `{v}`")))?,
            ),
            ("freeze", _) => Override::Freeze,
            ("release", _) => Override::None,
            _ => return Err((400, format!("unknown action `{action}`"))),
        };
        {
            let mut l = m.lock();
            l.over = over;
            // In a fleet it is pushed at the next exchange and becomes every replica's.
            l.fleet.override_pending = true;
        }
        m.wake.notify_one();
        tracing::info!(%model, %action, variant = variant.unwrap_or(""), "Bandit override set by an operator.");
        Ok(json!({ "model": model, "override": override_json(over, &m.variants) }))
    }

    /// A controller for the admin listener.
    pub fn control_fn(self: &Arc<Self>) -> switchyard_router::admin::ControlFn {
        let me = self.clone();
        Arc::new(move |model, action, variant| me.control(model, action, variant))
    }

    /// Writes the state file now (at shutdown).
    pub fn persist(&self) {
        if let Some(file) = &self.state_file {
            state::write_state(
                file,
                &render(&self.models.load(), self.replica()).to_string(),
            );
        }
        if let Some(x) = &self.export {
            x.finish(Duration::from_secs(2));
        }
    }

    /// Stops the tasks.
    pub fn stop(&self) {
        self.housekeeping.abort();
        if let Some((.., task)) = &self.fleet {
            task.abort();
        }
        for t in self
            .updates
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
        {
            t.abort();
        }
    }
}

/// One model's update task: recomputes its weights every `update_interval` (the first
/// made as the task was), or sooner when woken, and publishes them to the model's route
/// in the live table.
async fn update_task(m: Arc<Model>, router: Arc<Router>, mut rng: StdRng) {
    let first = tokio::time::Instant::now() + m.update_interval;
    let mut tick = tokio::time::interval_at(first, m.update_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = m.wake.notified() => tick.reset(),
        }
        let Some(weights) = update_caught(&m, &mut rng) else {
            continue;
        };
        publish(&router.table(), &m.name, &weights);
    }
}

/// Publishes a model's new weights to its route in `table`, if it has one.
fn publish(table: &switchyard_router::table::RouteTable, model: &str, weights: &[f64]) {
    if let Some(route) = table.model(model) {
        if let Err(e) = route.set_weights(weights) {
            tracing::warn!(model = %model, error = %e, "Bandit weights refused.");
        }
    }
}

/// One update, caught: a panic in the bandit's arithmetic must not end its task (its
/// model would stop publishing weights behind a green health check). Counted, logged,
/// tried again at the next update.
fn update_caught(m: &Model, rng: &mut StdRng) -> Option<Vec<f64>> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| m.update(rng))) {
        Ok(weights) => Some(weights),
        Err(panic) => {
            m.panics.inc();
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            tracing::error!(model = %m.name, panic = %what, "A bandit update panicked; the bandit goes on at its next update.");
            None
        }
    }
}

/// Expires the decisions past their `feedback_ttl`: each bandit counts them (and, under
/// `missing_feedback: zero`, learns a zero reward from them); the decisions file gets
/// them. In a fleet, a decision whose feedback another replica took is not missing
/// (the fleet's store is asked, off the request path).
async fn expire(router: &Router, sink: &BanditSink) {
    let mut expired = router.decisions().expire_keyed(Instant::now());
    if let (Some(fleet), false) = (router.fleet(), expired.is_empty()) {
        let claimed = fleet
            .claimed(expired.iter().map(|(k, _)| *k).collect())
            .await;
        let mut claimed = claimed.into_iter();
        expired.retain(|_| !claimed.next().unwrap_or(false));
    }
    let mut counts: BTreeMap<(u16, u16), (u64, Duration)> = BTreeMap::new();
    for (_, d) in expired {
        let e = counts.entry((d.model, d.variant)).or_default();
        e.0 += 1;
        e.1 += d.latency();
        if let (Some(x), Ok((m, v))) = (&sink.export, sink.resolve(d.model, d.variant)) {
            let reward = m.objective.missing_reward(m.cost(v, d.latency()));
            x.settled(&m.name, &m.variants[v], d.probability, reward, false);
        }
    }
    for ((model, variant), (count, latency)) in counts {
        // A reload may move the bandit between resolving and counting: then again.
        for _ in 0..4 {
            let Ok((m, v)) = sink.resolve(model, variant) else {
                break;
            };
            if m.expired(v, count, latency) {
                break;
            }
        }
    }
}

/// Restores what the saved state `old` knows of the model's variants that still exist,
/// under the same objective; the weights only if every variant is known.
/// A reload: each surviving variant's change detector takes over the old one's window
/// of recent rewards, so a change that straddles the reload is still found. (Not in
/// the state file: a few thousand rewards per variant, which a restart forgoes.)
fn carry_detectors(next: &Model, into: &mut Learner, old: &Model, from: &Learner) {
    if objective_name(next.objective) != objective_name(old.objective) {
        return;
    }
    for (i, v) in next.variants.iter().enumerate() {
        if let Some(j) = old.variants.iter().position(|x| x == v) {
            into.bandit.carry_detector(i, &from.bandit, j);
        }
    }
}

fn restore(m: &Model, old: &Value) {
    if old["objective"].as_str() != Some(objective_name(m.objective)) {
        if let Some(was) = old["objective"].as_str() {
            tracing::warn!(model = %m.name, was, now = objective_name(m.objective), "The bandit's objective changed: what it learned about the old one is dropped.");
        }
        return;
    }
    let mut l = m.lock();
    let mut saved_weights = Vec::with_capacity(m.variants.len());
    for (i, v) in m.variants.iter().enumerate() {
        let o = &old["variants"][v.as_str()];
        if let Some(p) = posterior_from(&o["posterior"]) {
            let rewards = o["rewards"].as_u64().unwrap_or(0);
            l.bandit.restore_arm(i, p, rewards);
            l.rewards[i] = rewards;
            l.revenue[i] = o["revenue_total"].as_f64().unwrap_or(0.0);
            l.cost[i] = o["cost_total"].as_f64().unwrap_or(0.0);
            l.expired[i] = o["expired_without_feedback"].as_u64().unwrap_or(0);
        }
        if let Some(w) = o["weight"].as_f64() {
            saved_weights.push(w);
        }
    }
    if saved_weights.len() == m.variants.len() {
        l.bandit.restore_weights(&saved_weights);
    }
    let over = override_from(&old["override"], &m.variants);
    l.over = over;
    l.bandit.set_override(over);
    if old["fleet"].is_object() {
        l.fleet = fleet::Synced::from_json(&old["fleet"], &m.variants);
    }
    tracing::info!(model = %m.name, "Bandit state restored.");
}

/// `/admin/state` and the state file: per model, its objective, override and, per
/// variant, what its bandit knows. Each model's learner is locked in turn, briefly.
fn render(models: &BTreeMap<String, Arc<Model>>, replica: Option<&str>) -> Value {
    let models: serde_json::Map<String, Value> = models
        .iter()
        .map(|(name, m)| (name.clone(), render_model(m, &m.lock())))
        .collect();
    match replica {
        Some(r) => json!({ "version": 1, "replica": r, "models": models }),
        None => json!({ "version": 1, "models": models }),
    }
}

/// One model's part of [`render`], from its locked learner.
fn render_model(m: &Model, l: &Learner) -> Value {
    let arms = l.bandit.arms();
    let weights = l.bandit.weights();
    let variants: serde_json::Map<String, Value> = m
        .variants
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let (lo, hi) = arms[i].credible_interval();
            (
                v.clone(),
                json!({
                    "weight": weights[i],
                    "posterior_mean": arms[i].mean(),
                    "credible_interval": [lo, hi],
                    "rewards": l.rewards[i],
                    "revenue_total": l.revenue[i],
                    "cost_total": l.cost[i],
                    "expired_without_feedback": l.expired[i],
                    "posterior": posterior_json(&arms[i]),
                }),
            )
        })
        .collect();
    let mut out = json!({
        "objective": objective_name(m.objective),
        "override": override_json(l.over, &m.variants),
        "variants": variants,
    });
    if m.fleet_seed.is_some() {
        out["fleet"] = l.fleet.to_json(&m.variants);
    }
    out
}

/// A replica's name: 64 random bits in hex.
fn new_replica_name() -> String {
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    format!("{:016x}", u64::from_le_bytes(b))
}

/// Fleet mode: exchanges every model's statistics with the ledger every interval. A
/// failed exchange is the ledger's to count and log; what it did not take is sent again
/// next time.
async fn sync_task(
    models: Arc<ArcSwap<BTreeMap<String, Arc<Model>>>>,
    ledger: Arc<dyn fleet::Ledger>,
    replica: String,
) {
    let mut tick = tokio::time::interval(ledger.interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for m in models.load().values() {
            let _ = sync_model(m, ledger.as_ref(), &replica).await;
        }
    }
}

/// One exchange of `m`'s statistics (two when a push left unanswered went first): see
/// [`fleet`] for the arithmetic. After it the model holds the fleet's totals plus what
/// it learned during the exchange, and its update is brought forward.
async fn sync_model(m: &Model, ledger: &dyn fleet::Ledger, replica: &str) -> Result<(), String> {
    for _ in 0..2 {
        let n = m.variants.len();
        let (push, retry) = {
            let mut l = m.lock();
            if l.moved || l.fleet.base.len() != n {
                return Ok(());
            }
            let set_override = std::mem::take(&mut l.fleet.override_pending)
                .then(|| override_json(l.over, &m.variants));
            let (seq, deltas, retry) = match l.fleet.unacked.clone() {
                Some((seq, d)) => (seq, d, true),
                None => {
                    let d: Vec<fleet::ArmStats> =
                        (0..n).map(|i| l.stats(i).minus(&l.fleet.base[i])).collect();
                    if d.iter().all(fleet::ArmStats::is_zero) {
                        (0, d, false)
                    } else {
                        l.fleet.seq += 1;
                        let seq = l.fleet.seq;
                        for (b, x) in l.fleet.base.iter_mut().zip(&d) {
                            *b = b.plus(x);
                        }
                        l.fleet.unacked = Some((seq, d.clone()));
                        (seq, d, false)
                    }
                }
            };
            let push = fleet::Push {
                replica: replica.to_string(),
                model: m.name.clone(),
                objective: objective_name(m.objective),
                variants: m.variants.clone(),
                seq,
                deltas,
                seed: l.fleet.totals.clone(),
                half_life: m.time_half_life,
                set_override,
            };
            (push, retry)
        };
        let (seq, pushed_override) = (push.seq, push.set_override.is_some());
        let answer = tokio::time::timeout(fleet::EXCHANGE_TIMEOUT, ledger.exchange(push))
            .await
            .unwrap_or_else(|_| Err("the exchange timed out".into()));
        let totals = match answer {
            Ok(t) if t.arms.len() == n => t,
            Ok(_) => return Err("the ledger answered another number of variants".into()),
            Err(e) => {
                if pushed_override {
                    m.lock().fleet.override_pending = true;
                }
                return Err(e);
            }
        };
        let republish = {
            let mut l = m.lock();
            if l.moved {
                // The next bandit holds the same push, unanswered: it sends it again.
                return Ok(());
            }
            if l.fleet.unacked.as_ref().is_some_and(|(s, _)| *s == seq) {
                l.fleet.unacked = None;
            }
            for (i, total) in totals.arms.iter().enumerate() {
                let pending = l.stats(i).minus(&l.fleet.base[i]);
                l.set_stats(i, total.plus(&pending));
                l.fleet.base[i] = *total;
            }
            if l.fleet.version.is_some_and(|v| totals.version < v) {
                tracing::warn!(model = %m.name, "The fleet's statistics went back in time (its Redis restarted without them?): it starts again from the last totals a replica read, plus what each learned since.");
            }
            l.fleet.totals = totals.arms;
            l.fleet.version = Some(totals.version);
            if !l.fleet.override_pending {
                l.over = override_from(&totals.over, &m.variants);
            }
            m.picker.as_ref().map(|_| PickerState::of(&l.bandit))
        };
        if let (Some(p), Some(state)) = (&m.picker, republish) {
            p.state.store(Arc::new(state));
        }
        m.wake.notify_one();
        if !retry {
            break;
        }
    }
    Ok(())
}
