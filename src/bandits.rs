//! The bandits, wired between the router's feedback and its selectors: the router does
//! not know what a Thompson sampler is, and the bandit crate does no I/O.
//!
//! - [`BanditSink`] is the router's [`FeedbackSink`]: it turns a feedback item into a
//!   reward with the model's objective and the variant's cost (refusing values the
//!   objective cannot take) and queues it for the model's task.
//! - One task per model drains its rewards, and every `update_interval` recomputes the
//!   weights (P(best) within the guardrails) and publishes them to the model's selector.
//! - One sweeper expires decisions at their `feedback_ttl`; under
//!   `missing_feedback: zero` each one counts as no conversion / zero revenue.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::SeedableRng;
use switchyard_bandit::policy::Guardrails;
use switchyard_bandit::{Bandit, BanditConfig, Feedback, Objective};
use switchyard_config::{BanditObjective, Config, MissingFeedback};
use switchyard_router::feedback::{FeedbackSink, FeedbackValues};
use switchyard_router::Router;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Posterior draws per P(best) estimate: enough for weights to within ~1.5 points.
const DRAWS: usize = 2000;

#[derive(Debug)]
struct Entry {
    objective: Objective,
    /// Cost per prediction of each variant (`cost_per_1k` / 1000).
    costs: Vec<f64>,
    missing: MissingFeedback,
    rewards: mpsc::UnboundedSender<(usize, f64)>,
}

/// The router's feedback sink: validates and queues rewards per model.
#[derive(Debug)]
pub struct BanditSink {
    models: HashMap<String, Entry>,
}

impl FeedbackSink for BanditSink {
    fn accept(&self, model: &str, variant: usize, v: &FeedbackValues) -> Result<(), String> {
        let e = self
            .models
            .get(model)
            .ok_or_else(|| format!("model `{model}` has no bandit"))?;
        let fb = Feedback {
            revenue: v.revenue,
            converted: v.converted,
            reward: v.reward,
        };
        let cost = e.costs.get(variant).copied().unwrap_or(0.0);
        let reward = e
            .objective
            .reward(&fb, cost)
            .map_err(|err| err.to_string())?;
        e.rewards
            .send((variant, reward))
            .map_err(|_| "the model's bandit has stopped".to_string())
    }
}

fn objective(o: BanditObjective) -> Objective {
    match o {
        BanditObjective::Conversion => Objective::Conversion,
        BanditObjective::Revenue => Objective::Revenue,
        BanditObjective::Profit => Objective::Profit,
    }
}

/// Each model's queue of (variant, reward), drained by its task.
pub type Receivers = HashMap<String, mpsc::UnboundedReceiver<(usize, f64)>>;

/// The sink for `config`'s bandits (None if no model has one), and the receivers their
/// tasks will drain.
pub fn sink(config: &Config) -> (Option<Arc<BanditSink>>, Receivers) {
    let mut models = HashMap::new();
    let mut receivers = HashMap::new();
    for (name, model) in &config.models {
        let Some(b) = &model.bandit else { continue };
        let (tx, rx) = mpsc::unbounded_channel();
        models.insert(
            name.clone(),
            Entry {
                objective: objective(b.objective),
                costs: model
                    .variants
                    .iter()
                    .map(|v| v.cost_per_1k / 1000.0)
                    .collect(),
                missing: b.missing_feedback,
                rewards: tx,
            },
        );
        receivers.insert(name.clone(), rx);
    }
    if models.is_empty() {
        (None, receivers)
    } else {
        (Some(Arc::new(BanditSink { models })), receivers)
    }
}

/// Starts one task per model with a bandit, and the decision sweeper.
pub fn spawn(
    config: &Config,
    router: Arc<Router>,
    sink: Arc<BanditSink>,
    mut receivers: Receivers,
) -> Vec<JoinHandle<()>> {
    let mut tasks = Vec::new();
    let seed = config.seed.unwrap_or(0x5EED);
    for (name, model) in &config.models {
        let (Some(b), Some(mut rx)) = (&model.bandit, receivers.remove(name)) else {
            continue;
        };
        let cfg = BanditConfig {
            objective: objective(b.objective),
            guardrails: Guardrails {
                min_weight: b.min_weight,
                max_step: b.max_step,
                warmup: b.warmup,
            },
            draws: DRAWS,
            half_life: b.half_life,
        };
        let weights: Vec<f64> = model.variants.iter().map(|v| v.weight).collect();
        let mut bandit = Bandit::new(cfg, &weights);
        let mut rng =
            StdRng::seed_from_u64(seed ^ switchyard_router::selector::stable_hash(name.as_bytes()));
        let (router, name, every) = (router.clone(), name.clone(), b.update_interval);
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                while let Ok((variant, reward)) = rx.try_recv() {
                    bandit.observe(variant, reward);
                }
                let weights = bandit.update(&mut rng).to_vec();
                if let Some(route) = router.table().model(&name) {
                    if let Err(e) = route.set_weights(&weights) {
                        tracing::warn!(model = %name, error = %e, "Bandit weights refused.");
                    }
                }
            }
        }));
    }
    // Expire decisions once a second; feed the missing ones back where configured.
    tasks.push(tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            for d in router
                .decisions()
                .expire(tokio::time::Instant::now().into_std())
            {
                if let Some(e) = sink.models.get(&*d.model) {
                    if e.missing == MissingFeedback::Zero {
                        let cost = e.costs.get(d.variant).copied().unwrap_or(0.0);
                        let _ = e
                            .rewards
                            .send((d.variant, e.objective.missing_reward(cost)));
                    }
                }
            }
        }
    }));
    tasks
}
