//! One model's bandit at run time: it learns each reward the moment its feedback is
//! taken, and publishes weights every `update_every` rewards or `update_interval`,
//! whichever comes first.
//!
//! - [`Learner`]: the [`Bandit`] and its totals behind one short sync lock, never held
//!   across an await or for a Monte Carlo estimate. Feedback (through [`BanditSink`]),
//!   expired decisions and the update task all write here; `/admin/state` and the state
//!   file read here, so a weight or a count is held in one place.
//! - [`Model`]: a learner with what it needs around it: the objective and costs that
//!   turn feedback into rewards, resolved metric handles, the per-request picker, and
//!   the `wake` that brings the update forward once `update_every` rewards came in.
//! - [`ThompsonPicker`]: `mode: per_request`. It samples from posteriors republished at
//!   every reward (one small allocation each), read lock-free by the request path.
//!
//! Before this, rewards went through a channel drained every `update_interval`: at
//! 2,000 requests a second the posteriors were up to 2,000 decisions old, which is most
//! of what the bandit regretted against per-request Thompson sampling.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus::{Counter, Gauge, Histogram, IntCounter};
use rand::rngs::StdRng;
use rand::SeedableRng;
use switchyard_bandit::policy::Override;
use switchyard_bandit::{Bandit, Feedback, Objective, Posterior};
use switchyard_config::MissingFeedback;
use switchyard_router::feedback::{Decision, FeedbackError, FeedbackSink, FeedbackValues};
use switchyard_router::selector::Pick;
use switchyard_router::table::Picker;
use tokio::sync::Notify;

/// A model's bandit and its running totals.
#[derive(Debug)]
pub(super) struct Learner {
    pub bandit: Bandit,
    pub rewards: Vec<u64>,
    pub revenue: Vec<f64>,
    pub cost: Vec<f64>,
    pub expired: Vec<u64>,
    /// The operator's override, applied at the next update.
    pub over: Override,
    /// Rewards learned since the weights were last recomputed.
    pub since_update: u64,
    /// When the evidence was last discounted (`half_life` in time).
    pub decayed_at: tokio::time::Instant,
    /// Set when a reload moved this state into the model's next bandit: whoever still
    /// holds this one resolves the model again and learns there.
    pub moved: bool,
    /// Fleet mode: where this replica stands with the fleet's statistics.
    pub fleet: super::fleet::Synced,
}

impl Learner {
    /// Variant `i`'s statistics as the fleet adds them.
    pub fn stats(&self, i: usize) -> super::fleet::ArmStats {
        super::fleet::ArmStats {
            evidence: self.bandit.arms()[i].evidence(),
            rewards: self.rewards[i] as f64,
            revenue: self.revenue[i],
            cost: self.cost[i],
            expired: self.expired[i] as f64,
        }
    }

    /// Replaces variant `i`'s statistics (with the fleet's, plus what is pending here).
    pub fn set_stats(&mut self, i: usize, s: super::fleet::ArmStats) {
        let count = |x: f64| {
            if x.is_finite() {
                x.max(0.0).round() as u64
            } else {
                0
            }
        };
        let posterior = self.bandit.arms()[i].with_evidence(s.evidence);
        self.rewards[i] = count(s.rewards);
        self.bandit.restore_arm(i, posterior, self.rewards[i]);
        self.revenue[i] = s.revenue;
        self.cost[i] = s.cost;
        self.expired[i] = count(s.expired);
    }
}

/// One variant's metric handles, resolved once (not per reward).
#[derive(Debug, Clone)]
pub(super) struct VariantMetrics {
    pub rewards: IntCounter,
    pub revenue: Counter,
    pub cost: Counter,
    pub expired: IntCounter,
    pub changes: IntCounter,
    pub mean: Gauge,
    pub low: Gauge,
    pub high: Gauge,
}

/// Everything one model's bandit is.
#[derive(Debug)]
pub(super) struct Model {
    pub name: String,
    pub variants: Vec<String>,
    pub objective: Objective,
    /// Cost per prediction of each variant (`cost_per_1k` / 1000).
    pub costs: Vec<f64>,
    /// Cost per second of each variant's measured time (`cost_per_second`).
    pub cost_per_second: Vec<f64>,
    pub missing: MissingFeedback,
    pub update_every: u64,
    pub update_interval: Duration,
    pub time_half_life: Option<Duration>,
    pub learner: Mutex<Learner>,
    pub picker: Option<Arc<ThompsonPicker>>,
    /// Woken when `update_every` rewards came in, or an operator changed the override.
    pub wake: Notify,
    pub metrics: Vec<VariantMetrics>,
    pub delay: Histogram,
    pub panics: IntCounter,
    /// Fleet mode: the seed the weights are drawn with, so replicas that read the same
    /// statistics publish the same weights; time's discount is the ledger's, not ours.
    pub fleet_seed: Option<u64>,
}

impl Model {
    pub fn lock(&self) -> MutexGuard<'_, Learner> {
        // A panic mid-update leaves counts that are still counts: keep going.
        self.learner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Learns `count` rewards of `reward` for `variant` (feedback: 1; expired decisions
    /// under `missing_feedback: zero`: many), republishes the picker's posteriors, and
    /// wakes the update task when `update_every` rewards have come in since the last.
    /// False, having learned nothing, when a reload moved the bandit (see `moved`).
    #[must_use]
    fn learn(&self, variant: usize, reward: f64, count: u64, revenue: f64, cost: f64) -> bool {
        let (republish, due, changed) = {
            let mut l = self.lock();
            if l.moved {
                return false;
            }
            let changes = l.bandit.changes();
            // One observation each: forgetting by observations counts every one.
            for _ in 0..count {
                l.bandit.observe(variant, reward);
            }
            let changed = l.bandit.changes() - changes;
            l.rewards[variant] += count;
            l.revenue[variant] += revenue;
            l.cost[variant] += cost;
            l.since_update += count;
            let republish = self.picker.as_ref().map(|_| PickerState::of(&l.bandit));
            (republish, l.since_update >= self.update_every, changed)
        };
        if let (Some(p), Some(state)) = (&self.picker, republish) {
            p.state.store(Arc::new(state));
        }
        if due {
            self.wake.notify_one();
        }
        let m = &self.metrics[variant];
        m.changes.inc_by(changed);
        m.rewards.inc_by(count);
        m.revenue.inc_by(revenue.max(0.0));
        m.cost.inc_by(cost.max(0.0));
        true
    }

    /// What one prediction of `variant` that took `latency` cost.
    pub fn cost(&self, variant: usize, latency: Duration) -> f64 {
        self.costs.get(variant).copied().unwrap_or(0.0)
            + self.cost_per_second.get(variant).copied().unwrap_or(0.0) * latency.as_secs_f64()
    }

    /// `count` decisions of `variant`, which took `latency` in all, expired without
    /// feedback. False, having counted nothing, when a reload moved the bandit.
    #[must_use]
    pub fn expired(&self, variant: usize, count: u64, latency: Duration) -> bool {
        if variant >= self.variants.len() {
            return true;
        }
        let total = self.costs[variant] * count as f64
            + self.cost_per_second[variant] * latency.as_secs_f64();
        let cost = total / count.max(1) as f64;
        self.metrics[variant].expired.inc_by(count);
        match self.missing {
            MissingFeedback::Zero => {
                let reward = self.objective.missing_reward(cost);
                if !self.learn(variant, reward, count, 0.0, total) {
                    return false;
                }
                // A reload between the two locks finds the reward learned and this count
                // not yet added: the count is lost to the old state, the reward is not.
                self.lock().expired[variant] += count;
            }
            MissingFeedback::Ignore => {
                let mut l = self.lock();
                if l.moved {
                    return false;
                }
                l.expired[variant] += count;
                l.cost[variant] += total;
                drop(l);
                self.metrics[variant].cost.inc_by(total.max(0.0));
            }
        }
        true
    }

    /// Recomputes and returns the weights: the operator's override (`over`, set by
    /// `Bandits::control`), forgetting by time,
    /// P(best) estimated from a copy of the posteriors outside the lock, then the
    /// guardrails. Republishes the picker's state and the gauges.
    pub fn update(&self, rng: &mut StdRng) -> Vec<f64> {
        let mut fleet_rng = None;
        let (arms, eligible, draws) = {
            let mut l = self.lock();
            let over = l.over;
            l.bandit.set_override(over);
            // In a fleet the ledger discounts the shared evidence by time, once for all.
            let local_decay = self.fleet_seed.is_none().then_some(self.time_half_life);
            if let Some(h) = local_decay.flatten() {
                let now = tokio::time::Instant::now();
                let elapsed = now.duration_since(l.decayed_at);
                l.bandit
                    .decay_all(0.5f64.powf(elapsed.as_secs_f64() / h.as_secs_f64()));
                l.decayed_at = now;
            }
            l.since_update = 0;
            let arms = match (self.fleet_seed, l.fleet.version) {
                // The fleet's statistics as last read, and a generator seeded by their
                // version: every replica that read them draws the same P(best).
                (Some(seed), Some(version)) => {
                    fleet_rng = Some(StdRng::seed_from_u64(
                        seed ^ switchyard_router::selector::stable_hash(self.name.as_bytes())
                            ^ version.rotate_left(17),
                    ));
                    l.bandit
                        .arms()
                        .iter()
                        .zip(&l.fleet.totals)
                        .map(|(a, t)| a.with_evidence(t.evidence))
                        .collect()
                }
                _ => l.bandit.arms().to_vec(),
            };
            (arms, l.bandit.eligible().to_vec(), l.bandit.draws())
        };
        let rng = match fleet_rng.as_mut() {
            Some(r) => r,
            None => rng,
        };
        let target = switchyard_bandit::p_best_among(&arms, &eligible, draws, rng);
        let (weights, state) = {
            let mut l = self.lock();
            let weights = l.bandit.apply_p_best(target).to_vec();
            (weights, PickerState::of(&l.bandit))
        };
        for (m, arm) in self.metrics.iter().zip(&state.arms) {
            let (lo, hi) = arm.credible_interval();
            m.mean.set(arm.mean());
            m.low.set(lo);
            m.high.set(hi);
        }
        if let Some(p) = &self.picker {
            p.state.store(Arc::new(state));
        }
        weights
    }
}

/// The router's feedback sink: turns a feedback item into a reward with the model's
/// objective and the variant's cost (refusing values the objective cannot take) and
/// teaches it to the model's bandit at once.
#[derive(Debug)]
pub struct BanditSink {
    /// By the model key decisions carry (`switchyard_router::table::ModelKeys`); `None`
    /// for keys whose model has no bandit now. Replaced whole by a reload.
    pub(super) slots: ArcSwap<Vec<Option<Slot>>>,
    /// `bandit.decisions_file`, when set: each settled decision is written there.
    pub(super) export: Option<Arc<super::export::DecisionsFile>>,
    pub(super) families: super::Families,
}

/// A model key's bandit now, and where each variant of the key's list is in it.
#[derive(Debug, Clone)]
pub(super) struct Slot {
    pub model: Arc<Model>,
    /// By the variant index decisions carry: the variant's index in `model`, or `None`
    /// when a reload removed it.
    pub variants: Arc<[Option<usize>]>,
}

/// Tries at resolving a decision's bandit when reloads move it meanwhile.
const RESOLVE_TRIES: usize = 4;

impl BanditSink {
    /// The bandit that learns from a decision of model key `key` and variant `variant`
    /// now, with the variant's index there.
    pub(super) fn resolve(
        &self,
        key: u16,
        variant: u16,
    ) -> Result<(Arc<Model>, usize), &'static str> {
        let slots = self.slots.load();
        let slot = slots
            .get(usize::from(key))
            .and_then(Option::as_ref)
            .ok_or("this prediction's model has no bandit")?;
        let v = slot
            .variants
            .get(usize::from(variant))
            .copied()
            .flatten()
            .ok_or("this prediction's variant is no longer in the model's bandit")?;
        Ok((slot.model.clone(), v))
    }
}

impl FeedbackSink for BanditSink {
    fn accept(&self, d: &Decision, age: Duration, v: &FeedbackValues) -> Result<(), FeedbackError> {
        for _ in 0..RESOLVE_TRIES {
            let (m, variant) = self
                .resolve(d.model, d.variant)
                .map_err(|e| FeedbackError::Invalid(e.into()))?;
            match self.teach(&m, variant, d, age, v)? {
                true => return Ok(()),
                // A reload moved the bandit between resolving and learning: again.
                false => continue,
            }
        }
        Err(FeedbackError::Busy(
            "reloads kept moving this model's bandit; send it again".into(),
        ))
    }

    fn check(&self, d: &Decision, v: &FeedbackValues) -> Result<(), FeedbackError> {
        let (m, variant) = self
            .resolve(d.model, d.variant)
            .map_err(|e| FeedbackError::Invalid(e.into()))?;
        Self::reward(&m, variant, d, v).map(drop)
    }
}

impl BanditSink {
    /// The reward these values make for this decision's model, or why there is none.
    fn reward(
        m: &Model,
        variant: usize,
        d: &Decision,
        v: &FeedbackValues,
    ) -> Result<f64, FeedbackError> {
        let fb = Feedback {
            revenue: v.revenue,
            converted: v.converted,
            reward: v.reward,
        };
        m.objective
            .reward(&fb, m.cost(variant, d.latency()))
            .map_err(|err| FeedbackError::Invalid(err.to_string()))
    }

    fn teach(
        &self,
        m: &Model,
        variant: usize,
        d: &Decision,
        age: Duration,
        v: &FeedbackValues,
    ) -> Result<bool, FeedbackError> {
        let cost = m.cost(variant, d.latency());
        let reward = Self::reward(m, variant, d, v)?;
        let revenue = v
            .revenue
            .or(v.reward)
            .unwrap_or_else(|| f64::from(u8::from(v.converted == Some(true))));
        if !m.learn(variant, reward, 1, revenue, cost) {
            return Ok(false);
        }
        m.delay.observe(age.as_secs_f64());
        if let Some(x) = &self.export {
            x.settled(&m.name, &m.variants[variant], d.probability, reward, true);
        }
        Ok(true)
    }
}

/// What a per-request picker samples from.
#[derive(Debug)]
pub(super) struct PickerState {
    pub arms: Vec<Posterior>,
    /// Variants the bandit may pick (configured weight > 0).
    pub eligible: Vec<bool>,
    /// How many of them (for the uniform exploration), counted once here rather than
    /// on every request.
    pub eligible_count: usize,
    pub p_best: Vec<f64>,
    /// False during warm-up and under an operator's override: the weight table decides.
    pub steering: bool,
}

impl PickerState {
    /// What the picker should sample from now.
    pub fn of(bandit: &Bandit) -> Self {
        PickerState {
            arms: bandit.arms().to_vec(),
            eligible: bandit.eligible().to_vec(),
            eligible_count: bandit.eligible().iter().filter(|e| **e).count().max(1),
            p_best: bandit.p_best().to_vec(),
            steering: bandit.steering(),
        }
    }
}

/// Pure Thompson sampling on every request (`mode: per_request`): one draw from each
/// posterior, the highest wins; with probability n × `min_weight` a uniform pick instead,
/// so every variant keeps its exploration floor.
#[derive(Debug)]
pub(super) struct ThompsonPicker {
    pub state: ArcSwap<PickerState>,
    pub explore: f64,
}

thread_local! {
    static PICK_RNG: std::cell::RefCell<StdRng> = std::cell::RefCell::new({
        let mut seed = [0u8; 32];
        // Any seed will do for choosing variants; the OS's is just the easiest.
        let _ = getrandom::fill(&mut seed);
        StdRng::from_seed(seed)
    });
}

/// The picker as the router holds it.
#[derive(Debug)]
pub(super) struct SharedPicker(pub Arc<ThompsonPicker>);

impl Picker for SharedPicker {
    fn pick(&self) -> Option<Pick> {
        use rand::RngExt;
        let st = self.0.state.load();
        let n = st.arms.len();
        if !st.steering || n == 0 {
            return None;
        }
        let explore = self.0.explore;
        let eligible = st.eligible_count;
        PICK_RNG.with(|rng| {
            let mut rng = rng.borrow_mut();
            let index = if explore > 0.0 && rng.random::<f64>() < explore {
                // Uniform among the variants the bandit may pick.
                let nth = (rng.random::<u64>() % eligible as u64) as usize;
                (0..n)
                    .filter(|i| st.eligible.get(*i) == Some(&true))
                    .nth(nth)
                    .unwrap_or(0)
            } else {
                switchyard_bandit::thompson_pick_among(&st.arms, &st.eligible, &mut *rng)
            };
            // The propensity recorded for off-policy evaluation: P(best) as of the last
            // update, by Monte Carlo over `DRAWS` draws. A variant drawn now whose
            // estimate was 0 has a true probability below about 1/DRAWS, not 0 (which
            // no estimator could divide by): half of that stands in.
            let p_best = st
                .p_best
                .get(index)
                .copied()
                .unwrap_or(0.0)
                .max(0.5 / super::DRAWS as f64);
            Some(Pick {
                index,
                probability: explore / eligible as f64 + (1.0 - explore) * p_best,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Model `rec`'s config: `bandit`, and variants `a` and `b` in `order`.
    fn config(bandit: &str, order: [&str; 2]) -> switchyard_config::Config {
        let mut yaml = format!("models:\n  rec:\n    bandit: {bandit}\n    variants:\n");
        for v in order {
            yaml +=
                &format!("      - {{name: {v}, upstream: \"http://127.0.0.1:1\", weight: 1}}\n");
        }
        switchyard_config::from_yaml_str(&yaml).unwrap()
    }

    /// Model `rec`'s learner, as a (re)load builds it.
    fn model(config: &switchyard_config::Config, sink: &BanditSink) -> Arc<Model> {
        let rec = &config.models["rec"];
        super::super::new_model(
            "rec",
            rec,
            rec.bandit.as_ref().unwrap(),
            &sink.families,
            None,
        )
    }

    fn sink(bandit: &str) -> (Arc<BanditSink>, Arc<Model>) {
        let config = config(bandit, ["a", "b"]);
        let sink = super::super::sink(&config, &prometheus::Registry::new()).unwrap();
        let model = model(&config, &sink);
        sink.slots.store(Arc::new(vec![Some(Slot {
            model: model.clone(),
            variants: [Some(0), Some(1)].into(),
        })]));
        (sink, model)
    }

    fn decision(variant: u16) -> Decision {
        Decision {
            model: 0,
            variant,
            probability: 0.5,
            at_ms: 0,
            ttl_ms: 60_000,
            latency_us: 0,
            rewarded: false,
        }
    }

    fn converted(yes: bool) -> FeedbackValues {
        FeedbackValues {
            converted: Some(yes),
            ..FeedbackValues::default()
        }
    }

    /// A reload that reorders the variants: each detector's window goes to the variant
    /// of the same name, so a change in `a` begun before the reload (0.6 to 0.4, 100
    /// rewards in: too few to call) is found in `a` after it, and `b` finds none.
    #[test]
    fn a_reload_carries_each_variants_change_detector_by_name() {
        use rand::{RngExt, SeedableRng};
        let (sink, old) = sink("{objective: conversion, warmup: 0}");
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for p in std::iter::repeat_n(0.6, 3_000).chain(std::iter::repeat_n(0.4, 100)) {
            let yes = rng.random::<f64>() < p;
            sink.accept(&decision(0), Duration::ZERO, &converted(yes))
                .unwrap();
        }
        assert_eq!(old.lock().bandit.changes(), 0, "found before the reload");
        let next = model(
            &config("{objective: conversion, warmup: 0}", ["b", "a"]),
            &sink,
        );
        let mut n = next.lock();
        super::super::carry_detectors(&next, &mut n, &old, &old.lock());
        for _ in 0..2_000 {
            n.bandit.observe(1, f64::from(rng.random::<f64>() < 0.4));
        }
        let found = n.bandit.changes();
        assert!(found >= 1, "`a`'s change, carried to index 1");
        for _ in 0..2_000 {
            n.bandit.observe(0, f64::from(rng.random::<f64>() < 0.4));
        }
        assert_eq!(n.bandit.changes(), found, "`b` saw no change of its own");
    }

    /// A feedback is in the posterior the moment it is taken, and the per-request
    /// picker samples from it: nothing waits for an update task (none runs here).
    #[test]
    fn each_feedback_is_learned_at_once() {
        let (sink, model) = sink("{objective: conversion, mode: per_request, warmup: 0}");
        let picker = model.picker.clone().unwrap();
        let before = picker.state.load().arms[1].mean();
        for _ in 0..30 {
            sink.accept(&decision(1), Duration::ZERO, &converted(true))
                .unwrap();
        }
        sink.accept(&decision(0), Duration::ZERO, &converted(false))
            .unwrap();
        let l = model.lock();
        assert_eq!(l.rewards, [1, 30]);
        assert_eq!(l.revenue, [0.0, 30.0]);
        drop(l);
        let state = picker.state.load();
        // Beta(1 + 30, 1): mean 31/32.
        assert!((state.arms[1].mean() - 31.0 / 32.0).abs() < 1e-9);
        assert!(state.arms[1].mean() > before);
        assert!(
            state.steering,
            "no warm-up: the picker steers from the start"
        );
    }

    /// `update_every` rewards wake the update task; fewer do not. The update then
    /// moves the weights toward the arm that converts.
    #[tokio::test]
    async fn update_every_rewards_bring_the_update_forward() {
        let (sink, model) = sink(
            "{objective: conversion, update_every: 50, update_interval: 1h, warmup: 0, min_weight: 0, max_step: 1}",
        );
        for i in 0..49 {
            sink.accept(&decision(i % 2), Duration::ZERO, &converted(i % 2 == 1))
                .unwrap();
        }
        let woken = tokio::time::timeout(Duration::from_millis(50), model.wake.notified()).await;
        assert!(woken.is_err(), "woken after 49 rewards of 50");
        sink.accept(&decision(1), Duration::ZERO, &converted(true))
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), model.wake.notified())
            .await
            .expect("the 50th reward wakes the update");
        let mut rng = StdRng::seed_from_u64(7);
        let weights = model.update(&mut rng);
        assert!(weights[1] > 0.99, "{weights:?}");
        assert_eq!(model.lock().since_update, 0);
    }

    /// With the defaults, a variant whose conversion rate falls from 50% to 0 is
    /// noticed within a few hundred rewards: the change is counted, and the posterior
    /// the picker samples keeps only what came after (its mean near 0, not near the
    /// 41% that 1,024 old and 400 new rewards would average to).
    #[test]
    fn a_change_is_found_and_what_came_before_is_forgotten() {
        let (sink, model) = sink("{objective: conversion}");
        for i in 0..1024 {
            sink.accept(&decision(0), Duration::ZERO, &converted(i % 2 == 0))
                .unwrap();
        }
        assert_eq!(model.metrics[0].changes.get(), 0);
        for _ in 0..400 {
            sink.accept(&decision(0), Duration::ZERO, &converted(false))
                .unwrap();
        }
        // Once, or twice when the first split was placed early and a few old rewards
        // were left on the near side of it.
        assert!((1..=2).contains(&model.metrics[0].changes.get()));
        let state = model.picker.as_ref().unwrap().state.load();
        assert!(state.arms[0].mean() < 0.05, "{}", state.arms[0].mean());
        assert_eq!(
            model.lock().rewards[0],
            1424,
            "every reward is still counted"
        );
    }

    /// Expired decisions under `missing_feedback: zero` are learned as misses (and
    /// counted); under `ignore` only counted.
    #[test]
    fn expired_decisions_count_as_misses_only_when_asked() {
        let (_, model) = sink("{objective: conversion, missing_feedback: zero}");
        assert!(model.expired(0, 10, Duration::ZERO));
        let l = model.lock();
        assert_eq!((l.rewards[0], l.expired[0]), (10, 10));
        // Beta(1, 1 + 10).
        assert!((l.bandit.arms()[0].mean() - 1.0 / 12.0).abs() < 1e-9);
        drop(l);
        let (_, model) = sink("{objective: conversion}");
        assert!(model.expired(0, 10, Duration::ZERO));
        let l = model.lock();
        assert_eq!((l.rewards[0], l.expired[0]), (0, 10));
    }
}
