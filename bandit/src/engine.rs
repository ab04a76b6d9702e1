//! A model's bandit: one posterior per variant, rewards in, traffic weights out.

use rand::Rng;

use crate::detect::ChangeDetector;
use crate::objective::Objective;
use crate::policy::{apply_guardrails, p_best_among, thompson_pick_among, Guardrails, Override};
use crate::posterior::Posterior;

/// How a bandit learns and moves weights.
#[derive(Debug, Clone, PartialEq)]
pub struct BanditConfig {
    /// What it maximises.
    pub objective: Objective,
    /// Limits on each weight update.
    pub guardrails: Guardrails,
    /// Posterior draws per P(best) estimate.
    pub draws: usize,
    /// Forget old evidence with this half-life, in observations of an arm; `None` keeps
    /// everything (a stationary world). Time-based forgetting is [`Bandit::decay_all`].
    pub half_life: Option<f64>,
    /// The prior of every arm; `None` uses the objective's default.
    pub prior: Option<Posterior>,
    /// Watch each arm for a change of its reward ([`crate::detect`]) at this
    /// confidence (0.01: false alarms about 1% by the bound); `None` never looks.
    pub detect: Option<f64>,
}

/// The confidence of change detection unless configured otherwise: at 0.01 no false
/// alarm was seen in 20 × 100,000 steady rewards (`detect::tests`).
pub const DETECT_CONFIDENCE: f64 = 0.01;

/// The state of one model's bandit.
#[derive(Debug, Clone)]
pub struct Bandit {
    config: BanditConfig,
    arms: Vec<Posterior>,
    rewards: Vec<u64>,
    weights: Vec<f64>,
    /// The configured weights, normalised: what warm-up holds.
    configured: Vec<f64>,
    p_best: Vec<f64>,
    over: Override,
    detectors: Vec<ChangeDetector>,
    changes: u64,
    /// The arms the bandit may send traffic to (configured weight > 0), fixed at
    /// construction: read on every pick, so kept rather than recomputed.
    eligible: Vec<bool>,
}

impl Bandit {
    /// A bandit over `initial_weights.len()` arms, starting from the configured weights
    /// (normalised here).
    pub fn new(config: BanditConfig, initial_weights: &[f64]) -> Self {
        let sum: f64 = initial_weights.iter().sum();
        let weights: Vec<f64> = initial_weights
            .iter()
            .map(|w| {
                if sum > 0.0 {
                    w / sum
                } else {
                    1.0 / initial_weights.len() as f64
                }
            })
            .collect();
        let arms: Vec<Posterior> = initial_weights
            .iter()
            .map(|_| {
                config
                    .prior
                    .clone()
                    .unwrap_or_else(|| config.objective.prior())
            })
            .collect();
        let detectors = match config.detect {
            Some(confidence) => arms
                .iter()
                .map(|a| ChangeDetector::new(a.family(), confidence))
                .collect(),
            None => Vec::new(),
        };
        Bandit {
            eligible: weights.iter().map(|w| *w > 0.0).collect(),
            arms,
            detectors,
            changes: 0,
            rewards: vec![0; initial_weights.len()],
            config,
            p_best: weights.clone(),
            configured: weights.clone(),
            weights,
            over: Override::None,
        }
    }

    /// Learns one reward for `arm`.
    pub fn observe(&mut self, arm: usize, reward: f64) {
        let Some(post) = self.arms.get_mut(arm) else {
            return;
        };
        if let Some(h) = self.config.half_life {
            post.decay(0.5f64.powf(1.0 / h.max(1.0)));
        }
        post.observe(reward);
        self.rewards[arm] += 1;
        let seen = match post.family() {
            crate::detect::Family::Bernoulli => f64::from(u8::from(reward > 0.5)),
            crate::detect::Family::Gaussian => reward,
        };
        if let Some(after) = self.detectors.get_mut(arm).and_then(|d| d.observe(seen)) {
            self.changed(arm, after);
        }
    }

    /// `arm`'s reward changed: it keeps only the evidence since the change, and no
    /// other arm keeps more evidence than that. The others' estimates stand, but as
    /// uncertain as the changed arm's, so Thompson sampling looks at them again: an arm
    /// starved of traffic may be the one that is best now, and only traffic can tell.
    fn changed(&mut self, arm: usize, after: crate::detect::Stats) {
        self.changes += 1;
        let keep = after.n.max(1.0);
        for (i, post) in self.arms.iter_mut().enumerate() {
            if i == arm {
                post.reset_to(after);
            } else if post.count() > keep {
                post.decay(keep / post.count());
            }
        }
    }

    /// Changes found so far (see [`crate::detect`]).
    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// Discounts every arm's evidence by `factor` in (0, 1]: for a half-life `h` in time,
    /// call it with `0.5^(elapsed / h)` before each update.
    pub fn decay_all(&mut self, factor: f64) {
        for arm in &mut self.arms {
            arm.decay(factor);
        }
    }

    /// Recomputes the weights: P(best) per arm, then the guardrails. Returns them.
    pub fn update<R: Rng + ?Sized>(&mut self, rng: &mut R) -> &[f64] {
        let target = p_best_among(&self.arms, &self.eligible, self.config.draws, rng);
        self.apply_p_best(target)
    }

    /// The second half of [`Bandit::update`], for a caller that estimated P(best) from a
    /// copy of [`Bandit::arms`] without holding the bandit (its Monte Carlo is the slow
    /// part): takes `target` as each arm's probability of being best and applies the
    /// guardrails. Returns the weights.
    pub fn apply_p_best(&mut self, target: Vec<f64>) -> &[f64] {
        if target.len() != self.arms.len() {
            return &self.weights;
        }
        self.p_best = target;
        let target = &self.p_best;
        // Warm-up holds the *configured* weights, not whatever is current: after an
        // operator releases a pin, a variant that got no traffic must get some again.
        if self.over == Override::None && !self.warmed_up() {
            self.weights.clone_from(&self.configured);
            return &self.weights;
        }
        // An arm configured at weight 0 gets no traffic, so no rewards: it must not hold
        // the warm-up open for ever (a fallback variant did, and the bandit never
        // steered). It counts as warmed up.
        let rewards: Vec<u64> = self
            .rewards
            .iter()
            .zip(&self.eligible)
            .map(|(r, e)| if *e { *r } else { u64::MAX })
            .collect();
        let mut weights = apply_guardrails(
            &self.weights,
            target,
            &rewards,
            &self.config.guardrails,
            self.over,
        );
        // The floor gives every arm a share; a weight-0 variant takes none unless an
        // operator pins it.
        if self.over == Override::None {
            for (w, e) in weights.iter_mut().zip(&self.eligible) {
                if !e {
                    *w = 0.0;
                }
            }
            let sum: f64 = weights.iter().sum();
            if sum > 0.0 {
                weights.iter_mut().for_each(|w| *w /= sum);
            }
        }
        self.weights = weights;
        &self.weights
    }

    /// Per-request Thompson sampling instead of published weights.
    pub fn pick<R: Rng + ?Sized>(&self, rng: &mut R) -> usize {
        thompson_pick_among(&self.arms, &self.eligible, rng)
    }

    /// The arms the bandit may send traffic to: those configured with a positive
    /// weight (a weight-0 variant is a fallback or an operator's to pin).
    pub fn eligible(&self) -> &[bool] {
        &self.eligible
    }

    /// Each arm's probability of being best, as of the last update.
    pub fn p_best(&self) -> &[f64] {
        &self.p_best
    }

    /// True when the guardrails let the bandit steer: warm-up done and no override.
    pub fn steering(&self) -> bool {
        self.over == Override::None && self.warmed_up()
    }

    /// Whether every arm it may send traffic to has `warmup` rewards.
    fn warmed_up(&self) -> bool {
        self.rewards
            .iter()
            .zip(&self.eligible)
            .all(|(r, e)| !e || *r >= self.config.guardrails.warmup)
    }

    /// The current weights (sum to 1).
    pub fn weights(&self) -> &[f64] {
        &self.weights
    }

    /// The posteriors, in arm order.
    pub fn arms(&self) -> &[Posterior] {
        &self.arms
    }

    /// Rewards received per arm.
    pub fn rewards(&self) -> &[u64] {
        &self.rewards
    }

    /// Restores an arm's posterior and reward count (from a state file).
    pub fn restore_arm(&mut self, arm: usize, posterior: Posterior, rewards: u64) {
        if let (Some(p), Some(r)) = (self.arms.get_mut(arm), self.rewards.get_mut(arm)) {
            *p = posterior;
            *r = rewards;
        }
    }

    /// Takes over `from`'s change detector of arm `from_arm` for `arm` (a reload: the
    /// same variant in the next bandit), so the recent rewards it holds still count
    /// towards finding a change. Nothing when either bandit detects no changes.
    pub fn carry_detector(&mut self, arm: usize, from: &Bandit, from_arm: usize) {
        if let (Some(d), Some(old)) = (self.detectors.get_mut(arm), from.detectors.get(from_arm)) {
            d.carry(old);
        }
    }

    /// Replaces the current weights (from a state file); ignored unless they are one
    /// finite, non-negative number per arm with a positive sum.
    pub fn restore_weights(&mut self, weights: &[f64]) {
        let sum: f64 = weights.iter().sum();
        if weights.len() == self.weights.len()
            && sum > 0.0
            && weights.iter().all(|w| w.is_finite() && *w >= 0.0)
        {
            self.weights = weights.iter().map(|w| w / sum).collect();
        }
    }

    /// The draws per P(best) estimate this bandit was configured with.
    pub fn draws(&self) -> usize {
        self.config.draws
    }

    /// Sets an operator override (freeze, pin) for the next updates.
    pub fn set_override(&mut self, over: Override) {
        self.over = over;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    /// A variant configured with weight 0 is never picked nor weighted by the bandit,
    /// even when it is the best by its rewards; a pin still reaches it.
    #[test]
    fn a_weight_zero_variant_is_not_the_bandits_to_explore() {
        let config = BanditConfig {
            objective: Objective::Conversion,
            guardrails: Guardrails {
                min_weight: 0.1,
                max_step: 1.0,
                warmup: 0,
            },
            draws: 200,
            half_life: None,
            prior: None,
            detect: None,
        };
        let mut rng = StdRng::seed_from_u64(3);
        let mut b = Bandit::new(config, &[1.0, 1.0, 0.0]);
        for _ in 0..50 {
            b.observe(2, 1.0);
            b.observe(0, 0.0);
        }
        assert!((0..1000).all(|_| b.pick(&mut rng) != 2));
        let w = b.update(&mut rng).to_vec();
        assert_eq!(w[2], 0.0, "{w:?}");
        assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-9, "{w:?}");
        b.set_override(Override::Pin(2));
        assert_eq!(b.update(&mut rng), [0.0, 0.0, 1.0]);
    }

    /// A weight-0 variant (a fallback) never gets traffic: the warm-up ends when the
    /// others have theirs, and the bandit steers.
    #[test]
    fn a_weight_zero_variant_does_not_hold_the_warmup_open() {
        let config = BanditConfig {
            objective: Objective::Conversion,
            guardrails: Guardrails {
                min_weight: 0.0,
                max_step: 1.0,
                warmup: 20,
            },
            draws: 400,
            half_life: None,
            prior: None,
            detect: None,
        };
        let mut rng = StdRng::seed_from_u64(5);
        let mut b = Bandit::new(config, &[1.0, 1.0, 0.0]);
        for _ in 0..19 {
            b.observe(0, 1.0);
            b.observe(1, 0.0);
        }
        assert!(!b.steering(), "arm 1 has 19 of 20 rewards");
        assert_eq!(b.update(&mut rng), [0.5, 0.5, 0.0]);
        b.observe(0, 1.0);
        b.observe(1, 0.0);
        assert!(b.steering(), "the weight-0 arm must not hold the warm-up");
        let w = b.update(&mut rng).to_vec();
        assert!(w[0] > 0.9 && w[2] == 0.0, "{w:?}");
    }

    /// A reload builds a new bandit from the old one's state. A change in the rewards
    /// just before it is still found after it when the detector's window is carried
    /// over; a fresh detector, which sees only the new rate, never finds it. 10 seeds.
    #[test]
    fn a_change_that_straddles_a_reload_is_still_found() {
        use rand::RngExt;
        let config = BanditConfig {
            objective: Objective::Conversion,
            guardrails: Guardrails {
                min_weight: 0.0,
                max_step: 1.0,
                warmup: 0,
            },
            draws: 100,
            half_life: None,
            prior: None,
            detect: Some(DETECT_CONFIDENCE),
        };
        for seed in 0..10 {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut old = Bandit::new(config.clone(), &[1.0, 1.0]);
            for _ in 0..3_000 {
                old.observe(0, f64::from(rng.random::<f64>() < 0.6));
            }
            // The change, 0.6 to 0.4: 100 rewards at the new rate (too few to tell it
            // from luck), then the reload.
            for _ in 0..100 {
                old.observe(0, f64::from(rng.random::<f64>() < 0.4));
            }
            assert_eq!(old.changes(), 0, "seed {seed}: found before the reload");
            let next = |carry: bool| {
                let mut b = Bandit::new(config.clone(), &[1.0, 1.0]);
                b.restore_arm(0, old.arms()[0].clone(), old.rewards()[0]);
                if carry {
                    b.carry_detector(0, &old, 0);
                }
                b
            };
            let (mut carried, mut fresh) = (next(true), next(false));
            for _ in 0..2_000 {
                let r = f64::from(rng.random::<f64>() < 0.4);
                carried.observe(0, r);
                fresh.observe(0, r);
            }
            assert!(carried.changes() >= 1, "seed {seed}: carried");
            assert_eq!(fresh.changes(), 0, "seed {seed}: fresh");
            // Found: the old evidence is gone, the estimate is the new rate's; the
            // fresh detector's bandit still leans on the 3,000 old rewards.
            let (mean, stale) = (carried.arms()[0].mean(), fresh.arms()[0].mean());
            assert!((mean - 0.4).abs() < 0.05, "seed {seed}: mean {mean}");
            assert!(stale > 0.5, "seed {seed}: fresh mean {stale}");
        }
    }

    #[test]
    fn releasing_a_pin_during_warmup_restores_the_configured_weights() {
        let config = BanditConfig {
            objective: Objective::Conversion,
            guardrails: Guardrails {
                min_weight: 0.0,
                max_step: 1.0,
                warmup: 5,
            },
            draws: 100,
            half_life: None,
            prior: None,
            detect: None,
        };
        let mut rng = StdRng::seed_from_u64(1);
        let mut b = Bandit::new(config, &[3.0, 1.0]);
        b.set_override(Override::Pin(0));
        assert_eq!(b.update(&mut rng), [1.0, 0.0]);
        for _ in 0..10 {
            b.observe(0, 0.0); // only the pinned arm learns
        }
        b.set_override(Override::None);
        assert_eq!(
            b.update(&mut rng),
            [0.75, 0.25],
            "arm 1 must get traffic to warm up"
        );
    }
}
