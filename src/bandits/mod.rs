//! The bandits, wired between the router's feedback and its selectors: the router does
//! not know what a Thompson sampler is, and the bandit crate does no I/O.
//!
//! - [`BanditSink`] is the router's [`FeedbackSink`]: it turns a feedback item into a
//!   reward with the model's objective and the variant's cost (refusing values the
//!   objective cannot take) and queues it for the model's task.
//! - One task per model drains its events, and every `update_interval` recomputes the
//!   weights (P(best) within the guardrails), publishes them to the model's selector and
//!   refreshes the model's snapshot (metrics, `/admin/state`, the state file).
//! - One housekeeping task expires decisions at their `feedback_ttl` (under
//!   `missing_feedback: zero` each counts as no conversion / zero revenue) and writes the
//!   state file every 10 seconds; [`Bandits::persist`] writes it once more at shutdown.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
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
use switchyard_bandit::{Bandit, BanditConfig, Feedback, Objective, Posterior};
use switchyard_config::{BanditMode, BanditObjective, Config, HalfLife, MissingFeedback, Prior};
use switchyard_router::feedback::{Decision, FeedbackError, FeedbackSink, FeedbackValues};
use switchyard_router::selector::Pick;
use switchyard_router::table::Picker;
use switchyard_router::Router;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Posterior draws per P(best) estimate: weights to within about 1.5 points.
const DRAWS: usize = 2000;
/// How often the state file is written while running.
const PERSIST_EVERY: Duration = Duration::from_secs(10);

/// What a model's task learns from.
#[derive(Debug)]
enum Event {
    /// Feedback taken for a decision.
    Feedback {
        variant: usize,
        reward: f64,
        revenue: f64,
        cost: f64,
        delay: f64,
    },
    /// `count` decisions of one variant expired without feedback (counted per variant
    /// at each expiry pass, not sent one by one: at tens of thousands of predictions a
    /// second, an event each cost the router measurable throughput).
    Missing {
        variant: usize,
        count: u64,
        /// The reward each counts as (`missing_feedback: zero`), or none (`ignore`).
        reward: Option<f64>,
        /// Cost of one prediction of the variant.
        cost: f64,
    },
}

#[derive(Debug)]
struct Entry {
    objective: Objective,
    /// Cost per prediction of each variant (`cost_per_1k` / 1000).
    costs: Vec<f64>,
    missing: MissingFeedback,
    events: mpsc::Sender<Event>,
    /// Feedback refused (503) and expiry events dropped because `events` was full.
    full_feedback: IntCounter,
    full_missing: IntCounter,
}

/// Events one model's bandit may have waiting. The task drains them every
/// `update_interval`; a flood of feedback beyond this is answered 503 (retryable, the
/// decision stays open) rather than buffered without limit. 65,536 events take about
/// 2.5 MB and cover 32 s of 2,000 feedbacks a second with no update at all.
const EVENT_QUEUE: usize = 65_536;

/// The router's feedback sink: validates and queues rewards per model.
#[derive(Debug)]
pub struct BanditSink {
    /// By model position in the config's sorted list (as decisions record it); `None`
    /// for models without a bandit.
    models: Vec<Option<Entry>>,
}

impl BanditSink {
    fn entry(&self, model: u16) -> Option<&Entry> {
        self.models.get(usize::from(model)).and_then(Option::as_ref)
    }
}

impl FeedbackSink for BanditSink {
    fn accept(&self, d: &Decision, age: Duration, v: &FeedbackValues) -> Result<(), FeedbackError> {
        let e = self.entry(d.model).ok_or_else(|| {
            FeedbackError::Invalid("this prediction's model has no bandit".into())
        })?;
        let variant = usize::from(d.variant);
        let fb = Feedback {
            revenue: v.revenue,
            converted: v.converted,
            reward: v.reward,
        };
        let cost = e.costs.get(variant).copied().unwrap_or(0.0);
        let reward = e
            .objective
            .reward(&fb, cost)
            .map_err(|err| FeedbackError::Invalid(err.to_string()))?;
        let revenue = v
            .revenue
            .or(v.reward)
            .unwrap_or_else(|| f64::from(u8::from(v.converted == Some(true))));
        e.events
            .try_send(Event::Feedback {
                variant,
                reward,
                revenue,
                cost,
                delay: age.as_secs_f64(),
            })
            .map_err(|err| match err {
                mpsc::error::TrySendError::Full(_) => {
                    e.full_feedback.inc();
                    FeedbackError::Busy(format!(
                        "the model's bandit has {EVENT_QUEUE} events waiting; nothing was taken, try again shortly"
                    ))
                }
                mpsc::error::TrySendError::Closed(_) => {
                    FeedbackError::Busy("the model's bandit has stopped".into())
                }
            })
    }
}

/// One model's bandit as last published.
#[derive(Debug, Clone)]
struct Snapshot {
    objective: Objective,
    variants: Vec<String>,
    weights: Vec<f64>,
    arms: Vec<Posterior>,
    rewards: Vec<u64>,
    revenue: Vec<f64>,
    cost: Vec<f64>,
    expired: Vec<u64>,
    over: Override,
}

/// Operators' overrides per model, read by the model's task at each update.
type Overrides = Arc<Mutex<HashMap<String, Override>>>;

/// What a per-request picker samples from, republished by the model's task.
#[derive(Debug)]
struct PickerState {
    arms: Vec<Posterior>,
    p_best: Vec<f64>,
    /// False during warm-up and under an operator's override: the weight table decides.
    steering: bool,
}

/// Pure Thompson sampling on every request (`mode: per_request`): one draw from each
/// posterior, the highest wins; with probability n × `min_weight` a uniform pick instead,
/// so every variant keeps its exploration floor.
#[derive(Debug)]
struct ThompsonPicker {
    state: ArcSwap<PickerState>,
    explore: f64,
}

thread_local! {
    static PICK_RNG: std::cell::RefCell<StdRng> = std::cell::RefCell::new({
        let mut seed = [0u8; 32];
        // Any seed will do for choosing variants; the OS's is just the easiest.
        let _ = getrandom::fill(&mut seed);
        StdRng::from_seed(seed)
    });
}

#[derive(Debug)]
struct SharedPicker(Arc<ThompsonPicker>);

impl Picker for SharedPicker {
    fn pick(&self) -> Option<Pick> {
        use rand::RngExt;
        let st = self.0.state.load();
        let n = st.arms.len();
        if !st.steering || n == 0 {
            return None;
        }
        let explore = self.0.explore;
        PICK_RNG.with(|rng| {
            let mut rng = rng.borrow_mut();
            let index = if rng.random::<f64>() < explore {
                (rng.random::<u64>() % n as u64) as usize
            } else {
                switchyard_bandit::thompson_pick(&st.arms, &mut *rng)
            };
            let p_best = st.p_best.get(index).copied().unwrap_or(0.0);
            Some(Pick {
                index,
                probability: explore / n as f64 + (1.0 - explore) * p_best,
            })
        })
    }
}

/// The bandits of a running Switchyard.
#[derive(Debug)]
pub struct Bandits {
    sink: Arc<BanditSink>,
    snapshots: Arc<Mutex<BTreeMap<String, Snapshot>>>,
    overrides: Overrides,
    state_file: Option<PathBuf>,
    tasks: Vec<JoinHandle<()>>,
}

fn objective(o: BanditObjective) -> Objective {
    match o {
        BanditObjective::Conversion => Objective::Conversion,
        BanditObjective::Revenue => Objective::Revenue,
        BanditObjective::Profit => Objective::Profit,
    }
}

fn objective_name(o: Objective) -> &'static str {
    match o {
        Objective::Conversion => "conversion",
        Objective::Revenue => "revenue",
        Objective::Profit => "profit",
    }
}

/// Each model's queue of events, handed from [`sink`] to [`Bandits::spawn`].
#[derive(Debug)]
pub struct Receivers(HashMap<String, mpsc::Receiver<Event>>);

/// The sink for `config`'s bandits (None if no model has one), and the queues their
/// tasks will drain.
pub fn sink(
    config: &Config,
    registry: &Registry,
) -> Result<(Option<Arc<BanditSink>>, Receivers), String> {
    let full = IntCounterVec::new(
        Opts::new(
            "switchyard_bandit_queue_full_total",
            "Events a model's bandit could not queue: `feedback` answered 503, `missing` (expired decisions) dropped.",
        ),
        &["model", "event"],
    )
    .map_err(|e| format!("bandit metrics: {e}"))?;
    let mut models = Vec::with_capacity(config.models.len());
    let mut receivers = Receivers(HashMap::new());
    for (name, model) in &config.models {
        let Some(b) = &model.bandit else {
            models.push(None);
            continue;
        };
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        models.push(Some(Entry {
            objective: objective(b.objective),
            costs: model
                .variants
                .iter()
                .map(|v| v.cost_per_1k / 1000.0)
                .collect(),
            missing: b.missing_feedback,
            events: tx,
            full_feedback: full.with_label_values(&[name, "feedback"]),
            full_missing: full.with_label_values(&[name, "missing"]),
        }));
        receivers.0.insert(name.clone(), rx);
    }
    if models.iter().all(Option::is_none) {
        Ok((None, receivers))
    } else {
        registry
            .register(Box::new(full))
            .map_err(|e| format!("bandit metrics: {e}"))?;
        Ok((Some(Arc::new(BanditSink { models })), receivers))
    }
}

/// Per-variant bandit metrics.
#[derive(Clone)]
struct Metrics {
    mean: GaugeVec,
    low: GaugeVec,
    high: GaugeVec,
    rewards: IntCounterVec,
    revenue: CounterVec,
    cost: CounterVec,
    expired: IntCounterVec,
    delay: HistogramVec,
    panics: IntCounterVec,
}

impl Metrics {
    fn new(r: &Registry) -> prometheus::Result<Self> {
        let mv = ["model", "variant"];
        let gauge = |n: &str, h: &str| GaugeVec::new(Opts::new(n, h), &mv);
        let m = Metrics {
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
        };
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
}

fn posterior_json(p: &Posterior) -> Value {
    serde_json::to_value(p).unwrap_or(Value::Null)
}

/// A saved posterior, if it is one (non-finite numbers were saved as `null` and fail).
fn posterior_from(v: &Value) -> Option<Posterior> {
    serde_json::from_value(v.clone()).ok()
}

fn override_json(o: Override, variants: &[String]) -> Value {
    match o {
        Override::None => json!("none"),
        Override::Freeze => json!("freeze"),
        Override::Pin(i) => json!({ "pin": variants.get(i) }),
    }
}

fn override_from(v: &Value, variants: &[String]) -> Override {
    match v {
        Value::String(s) if s == "freeze" => Override::Freeze,
        Value::Object(o) => o
            .get("pin")
            .and_then(Value::as_str)
            .and_then(|name| variants.iter().position(|v| v == name))
            .map_or(Override::None, Override::Pin),
        _ => Override::None,
    }
}

fn render(snapshots: &BTreeMap<String, Snapshot>) -> Value {
    let models: serde_json::Map<String, Value> = snapshots
        .iter()
        .map(|(name, s)| {
            let variants: serde_json::Map<String, Value> = s
                .variants
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    let (lo, hi) = s.arms[i].credible_interval();
                    (
                        v.clone(),
                        json!({
                            "weight": s.weights[i],
                            "posterior_mean": s.arms[i].mean(),
                            "credible_interval": [lo, hi],
                            "rewards": s.rewards[i],
                            "revenue_total": s.revenue[i],
                            "cost_total": s.cost[i],
                            "expired_without_feedback": s.expired[i],
                            "posterior": posterior_json(&s.arms[i]),
                        }),
                    )
                })
                .collect();
            (
                name.clone(),
                json!({
                    "objective": objective_name(s.objective),
                    "override": override_json(s.over, &s.variants),
                    "variants": variants,
                }),
            )
        })
        .collect();
    json!({ "version": 1, "models": models })
}

impl Bandits {
    /// Starts a task per model with a bandit and the housekeeping task; restores the
    /// state file if `config.state_file` names one that exists.
    pub fn spawn(
        config: &Config,
        router: Arc<Router>,
        sink: Arc<BanditSink>,
        mut receivers: Receivers,
        registry: &Registry,
    ) -> Result<Self, String> {
        let metrics = Metrics::new(registry).map_err(|e| format!("bandit metrics: {e}"))?;
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
            .map_or(Value::Null, |p| read_state(p, &corrupt));
        let snapshots = Arc::new(Mutex::new(BTreeMap::new()));
        let overrides: Overrides = Arc::new(Mutex::new(HashMap::new()));
        let mut tasks = Vec::new();
        let seed = config.seed.unwrap_or(0x5EED);
        for (name, model) in &config.models {
            let (Some(b), Some(mut rx)) = (&model.bandit, receivers.0.remove(name)) else {
                continue;
            };
            let obj = objective(b.objective);
            let cfg = BanditConfig {
                objective: obj,
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
            };
            // Wall-clock forgetting: each update discounts by the time since the last.
            let time_decay = match b.half_life {
                Some(HalfLife::Time(h)) => {
                    Some(0.5f64.powf(b.update_interval.as_secs_f64() / h.as_secs_f64()))
                }
                _ => None,
            };
            let names: Vec<String> = model.variants.iter().map(|v| v.name.clone()).collect();
            let weights: Vec<f64> = model.variants.iter().map(|v| v.weight).collect();
            let mut bandit = Bandit::new(cfg, &weights);
            let n = names.len();
            let mut snap = Snapshot {
                objective: obj,
                variants: names.clone(),
                weights: bandit.weights().to_vec(),
                arms: bandit.arms().to_vec(),
                rewards: vec![0; n],
                revenue: vec![0.0; n],
                cost: vec![0.0; n],
                expired: vec![0; n],
                over: Override::None,
            };
            // Restore what the file knows of variants that still exist, under the same
            // objective; restore the weights only if every variant is known.
            let old = &saved["models"][name.as_str()];
            if old["objective"].as_str() == Some(objective_name(obj)) {
                let mut saved_weights = Vec::with_capacity(n);
                for (i, v) in names.iter().enumerate() {
                    let o = &old["variants"][v.as_str()];
                    if let Some(p) = posterior_from(&o["posterior"]) {
                        let rewards = o["rewards"].as_u64().unwrap_or(0);
                        bandit.restore_arm(i, p, rewards);
                        snap.rewards[i] = rewards;
                        snap.revenue[i] = o["revenue_total"].as_f64().unwrap_or(0.0);
                        snap.cost[i] = o["cost_total"].as_f64().unwrap_or(0.0);
                        snap.expired[i] = o["expired_without_feedback"].as_u64().unwrap_or(0);
                    }
                    if let Some(w) = o["weight"].as_f64() {
                        saved_weights.push(w);
                    }
                }
                if saved_weights.len() == n {
                    bandit.restore_weights(&saved_weights);
                }
                snap.over = override_from(&old["override"], &names);
                bandit.set_override(snap.over);
                overrides
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(name.clone(), snap.over);
                tracing::info!(model = %name, "Bandit state restored.");
            }
            snap.weights = bandit.weights().to_vec();
            snap.arms = bandit.arms().to_vec();
            if let Some(route) = router.table().model(name) {
                let _ = route.set_weights(&snap.weights);
            }
            snapshots
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(name.clone(), snap.clone());
            let mut rng = StdRng::seed_from_u64(
                seed ^ switchyard_router::selector::stable_hash(name.as_bytes()),
            );
            let picker = (b.mode == BanditMode::PerRequest).then(|| {
                let p = Arc::new(ThompsonPicker {
                    state: ArcSwap::from_pointee(PickerState {
                        arms: bandit.arms().to_vec(),
                        p_best: bandit.p_best().to_vec(),
                        steering: false,
                    }),
                    explore: (b.min_weight * n as f64).min(1.0),
                });
                if let Some(route) = router.table().model(name) {
                    route
                        .picker
                        .store(Some(Arc::new(Box::new(SharedPicker(p.clone())))));
                }
                p
            });
            let (router, name, every, snapshots, m, overrides) = (
                router.clone(),
                name.clone(),
                b.update_interval,
                snapshots.clone(),
                metrics.clone(),
                overrides.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    // One update, caught: a panic in the bandit's arithmetic must not end
                    // this task (its model would stop learning and its feedback queue fill
                    // up behind a green health check). Counted, logged, tried again at
                    // the next tick.
                    let update = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    while let Ok(event) = rx.try_recv() {
                        match event {
                            Event::Feedback {
                                variant,
                                reward,
                                revenue,
                                cost,
                                delay,
                            } => {
                                bandit.observe(variant, reward);
                                let v = &snap.variants[variant];
                                snap.rewards[variant] += 1;
                                snap.revenue[variant] += revenue;
                                snap.cost[variant] += cost;
                                m.rewards.with_label_values(&[&name, v]).inc();
                                m.revenue
                                    .with_label_values(&[&name, v])
                                    .inc_by(revenue.max(0.0));
                                m.cost.with_label_values(&[&name, v]).inc_by(cost.max(0.0));
                                m.delay.with_label_values(&[&name]).observe(delay);
                            }
                            Event::Missing {
                                variant,
                                count,
                                reward,
                                cost,
                            } => {
                                let v = &snap.variants[variant];
                                let total = cost * count as f64;
                                snap.expired[variant] += count;
                                snap.cost[variant] += total;
                                m.expired.with_label_values(&[&name, v]).inc_by(count);
                                m.cost.with_label_values(&[&name, v]).inc_by(total.max(0.0));
                                if let Some(r) = reward {
                                    // One observation each: decay by observations counts
                                    // every one of them.
                                    for _ in 0..count {
                                        bandit.observe(variant, r);
                                    }
                                    snap.rewards[variant] += count;
                                    m.rewards.with_label_values(&[&name, v]).inc_by(count);
                                }
                            }
                        }
                    }
                    let over = overrides
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get(&name)
                        .copied()
                        .unwrap_or(Override::None);
                    bandit.set_override(over);
                    snap.over = over;
                    if let Some(f) = time_decay {
                        bandit.decay_all(f);
                    }
                    let weights = bandit.update(&mut rng).to_vec();
                    if let Some(route) = router.table().model(&name) {
                        if let Err(e) = route.set_weights(&weights) {
                            tracing::warn!(model = %name, error = %e, "Bandit weights refused.");
                        }
                    }
                    if let Some(p) = &picker {
                        p.state.store(Arc::new(PickerState {
                            arms: bandit.arms().to_vec(),
                            p_best: bandit.p_best().to_vec(),
                            steering: bandit.steering(),
                        }));
                    }
                    snap.weights = weights;
                    snap.arms = bandit.arms().to_vec();
                    for (i, v) in snap.variants.iter().enumerate() {
                        let (lo, hi) = snap.arms[i].credible_interval();
                        m.mean
                            .with_label_values(&[&name, v])
                            .set(snap.arms[i].mean());
                        m.low.with_label_values(&[&name, v]).set(lo);
                        m.high.with_label_values(&[&name, v]).set(hi);
                    }
                    snapshots
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(name.clone(), snap.clone());
                    }));
                    if let Err(panic) = update {
                        m.panics.with_label_values(&[&name]).inc();
                        let what = panic
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| panic.downcast_ref::<String>().cloned())
                            .unwrap_or_default();
                        tracing::error!(model = %name, panic = %what, "A bandit update panicked; the bandit goes on at its next update.");
                    }
                }
            }));
        }
        let bandits = Bandits {
            sink,
            snapshots,
            overrides,
            state_file,
            tasks: Vec::new(),
        };
        let housekeeping = {
            let (sink, snapshots, file) = (
                bandits.sink.clone(),
                bandits.snapshots.clone(),
                bandits.state_file.clone(),
            );
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                let mut last_write = Instant::now();
                loop {
                    tick.tick().await;
                    let mut counts: BTreeMap<(u16, u16), u64> = BTreeMap::new();
                    for d in router.decisions().expire(Instant::now()) {
                        *counts.entry((d.model, d.variant)).or_default() += 1;
                    }
                    for ((model, variant), count) in counts {
                        if let Some(e) = sink.entry(model) {
                            let variant = usize::from(variant);
                            let cost = e.costs.get(variant).copied().unwrap_or(0.0);
                            let reward = (e.missing == MissingFeedback::Zero)
                                .then(|| e.objective.missing_reward(cost));
                            let sent = e.events.try_send(Event::Missing {
                                variant,
                                count,
                                reward,
                                cost,
                            });
                            // One event per (variant, second): only a bandit that has not
                            // drained for a long time drops these.
                            if let Err(mpsc::error::TrySendError::Full(_)) = sent {
                                e.full_missing.inc();
                            }
                        }
                    }
                    if file.is_some() && last_write.elapsed() >= PERSIST_EVERY {
                        write_state(file.as_ref(), &snapshots);
                        last_write = Instant::now();
                    }
                }
            })
        };
        tasks.push(housekeeping);
        Ok(Bandits { tasks, ..bandits })
    }

    /// `/admin/state`: each model's objective and, per variant, its weight, posterior
    /// mean and credible interval, rewards, revenue and cost totals.
    pub fn state(&self) -> Value {
        render(&self.snapshots.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// A renderer for the admin listener.
    pub fn state_fn(self: &Arc<Self>) -> switchyard_router::admin::StateFn {
        let me = self.clone();
        Arc::new(move || me.state())
    }

    /// Sets an operator's override for `model`: `pin` (to `variant`), `freeze` or
    /// `release`. It takes effect at the model's next update.
    pub fn control(
        &self,
        model: &str,
        action: &str,
        variant: Option<&str>,
    ) -> Result<Value, (u16, String)> {
        let variants = self
            .snapshots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(model)
            .map(|s| s.variants.clone())
            .ok_or((404, format!("model `{model}` has no bandit")))?;
        let over = match (action, variant) {
            ("pin", Some(v)) => Override::Pin(
                variants
                    .iter()
                    .position(|x| x == v)
                    .ok_or((404, format!("model `{model}` has no variant `{v}`")))?,
            ),
            ("freeze", _) => Override::Freeze,
            ("release", _) => Override::None,
            _ => return Err((400, format!("unknown action `{action}`"))),
        };
        self.overrides
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(model.to_string(), over);
        tracing::info!(%model, %action, variant = variant.unwrap_or(""), "Bandit override set by an operator.");
        Ok(json!({ "model": model, "override": override_json(over, &variants) }))
    }

    /// A controller for the admin listener.
    pub fn control_fn(self: &Arc<Self>) -> switchyard_router::admin::ControlFn {
        let me = self.clone();
        Arc::new(move |model, action, variant| me.control(model, action, variant))
    }

    /// Writes the state file now (at shutdown).
    pub fn persist(&self) {
        write_state(self.state_file.as_ref(), &self.snapshots);
    }

    /// Stops the tasks.
    pub fn stop(&self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Writes the snapshots atomically: to `FILE.tmp`, then renamed over `FILE`, so a crash
/// mid-write never leaves a torn file.
/// The saved state at `file`, checked: a missing file is a fresh start; a file that is
/// empty, not JSON, or holds values no run could have written (negative or non-finite
/// counts, wrong types) is never silently replaced: it is renamed
/// `<file>.corrupt-<unix time>`, an error is logged and counted, and the bandits start
/// fresh (the next save writes a new file beside the kept one).
fn read_state(file: &Path, corrupt: &IntCounter) -> Value {
    let bytes = match std::fs::read(file) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Value::Null,
        Err(e) => {
            tracing::error!(file = %file.display(), error = %e, "Cannot read the bandit state file; starting the bandits fresh (the file is left as it is).");
            return Value::Null;
        }
    };
    let problem = match serde_json::from_slice::<Value>(&bytes) {
        Ok(v) => match implausible(&v) {
            None => return v,
            Some(p) => p,
        },
        Err(e) => format!("not JSON: {e}"),
    };
    corrupt.inc();
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut aside = file.as_os_str().to_owned();
    aside.push(format!(".corrupt-{secs}"));
    let aside = PathBuf::from(aside);
    match std::fs::rename(file, &aside) {
        Ok(()) => {
            tracing::error!(file = %file.display(), kept = %aside.display(), %problem, "Bandit state file is corrupt; kept aside, starting the bandits fresh.")
        }
        Err(e) => {
            tracing::error!(file = %file.display(), %problem, error = %e, "Bandit state file is corrupt and cannot be moved aside; starting the bandits fresh.")
        }
    }
    Value::Null
}

/// Why `state` cannot be a file [`write_state`] wrote, if it cannot.
fn implausible(state: &Value) -> Option<String> {
    let models = match state.get("models") {
        Some(Value::Object(m)) => m,
        _ => return Some("no `models` object".into()),
    };
    for (model, m) in models {
        let Some(variants) = m.get("variants").and_then(Value::as_object) else {
            return Some(format!("model `{model}` has no `variants` object"));
        };
        for (variant, v) in variants {
            let at = |what: &str| format!("models.{model}.variants.{variant}.{what}");
            for key in ["rewards", "expired_without_feedback"] {
                if v.get(key).is_some_and(|n| n.as_u64().is_none()) {
                    return Some(format!("{} is not a count", at(key)));
                }
            }
            for key in ["revenue_total", "cost_total", "weight"] {
                if v.get(key)
                    .is_some_and(|n| !n.as_f64().is_some_and(f64::is_finite))
                {
                    return Some(format!("{} is not a finite number", at(key)));
                }
            }
            if v.get("weight")
                .and_then(Value::as_f64)
                .is_some_and(|w| w < 0.0)
            {
                return Some(format!("{} is negative", at("weight")));
            }
            if let Some(p) = v.get("posterior") {
                if posterior_from(p).is_none() {
                    return Some(format!("{} is not a posterior", at("posterior")));
                }
                if !all_finite_and_counts_non_negative(p) {
                    return Some(format!(
                        "{} holds a non-finite number or a negative count",
                        at("posterior")
                    ));
                }
            }
        }
    }
    None
}

/// Every number in `v` finite; counts and pseudo-counts not negative.
fn all_finite_and_counts_non_negative(v: &Value) -> bool {
    match v {
        Value::Number(n) => n.as_f64().is_some_and(f64::is_finite),
        Value::Array(a) => a.iter().all(all_finite_and_counts_non_negative),
        Value::Object(o) => o.iter().all(|(k, x)| {
            all_finite_and_counts_non_negative(x)
                && !([
                    "alpha0",
                    "beta0",
                    "successes",
                    "failures",
                    "kappa0",
                    "n",
                    "sum_sq",
                ]
                .contains(&k.as_str())
                    && x.as_f64().is_some_and(|f| f < 0.0))
        }),
        Value::Null => false,
        _ => true,
    }
}

fn write_state(file: Option<&PathBuf>, snapshots: &Mutex<BTreeMap<String, Snapshot>>) {
    let Some(file) = file else { return };
    let body = render(&snapshots.lock().unwrap_or_else(|p| p.into_inner())).to_string();
    let tmp = file.with_extension("tmp");
    let result = std::fs::write(&tmp, body).and_then(|()| std::fs::rename(&tmp, file));
    if let Err(e) = result {
        tracing::error!(file = %file.display(), error = %e, "Cannot write the bandit state file; statistics will not survive a restart.");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bandit that does not drain (its task never started here) takes
    /// `EVENT_QUEUE` feedbacks, then answers Busy (503) and counts each refusal: the
    /// queue never grows past its bound, and nothing refused is half-taken.
    #[test]
    fn a_full_event_queue_refuses_feedback_with_busy() {
        let config = switchyard_config::from_yaml_str(
            "models:\n  rec:\n    bandit: {objective: conversion}\n    variants:\n      - {name: a, upstream: \"http://127.0.0.1:1\", weight: 1}\n",
        )
        .unwrap();
        let registry = Registry::new();
        let (sink, mut receivers) = sink(&config, &registry).unwrap();
        let sink = sink.unwrap();
        let decision = Decision {
            model: 0,
            variant: 0,
            probability: 1.0,
            at_ms: 0,
            ttl_ms: 1000,
            rewarded: false,
        };
        let values = FeedbackValues {
            converted: Some(true),
            ..FeedbackValues::default()
        };
        for _ in 0..EVENT_QUEUE {
            sink.accept(&decision, Duration::ZERO, &values).unwrap();
        }
        for _ in 0..3 {
            assert!(matches!(
                sink.accept(&decision, Duration::ZERO, &values),
                Err(FeedbackError::Busy(_))
            ));
        }
        let refused = registry
            .gather()
            .into_iter()
            .find(|f| f.name() == "switchyard_bandit_queue_full_total")
            .and_then(|f| {
                f.get_metric()
                    .iter()
                    .find(|m| m.get_label().iter().any(|l| l.value() == "feedback"))
                    .map(|m| m.get_counter().get_value())
            });
        assert_eq!(refused, Some(3.0));
        // Once drained, feedback is taken again.
        let rx = receivers.0.get_mut("rec").unwrap();
        while rx.try_recv().is_ok() {}
        assert!(sink.accept(&decision, Duration::ZERO, &values).is_ok());
    }
}
