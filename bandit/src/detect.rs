//! Change detection: notices when one variant's reward changes, so the bandit can forget
//! what no longer holds without forgetting anything in a world that stands still.
//!
//! Why not a half-life alone: discounting at a fixed rate costs regret in every
//! stationary world (the posteriors never narrow past the half-life's worth of
//! evidence, so close variants are explored forever), and discounting by an arm's own
//! rewards never touches an arm starved of traffic. A test that fires only on evidence
//! of a change costs next to nothing until the world changes, then acts at once.
//!
//! The test is the generalised likelihood ratio (GLR) of Besson & Kaufmann, "Efficient
//! change-point detection for tackling piecewise-stationary bandits" (JMLR 2022): over
//! the arm's recent rewards, the largest log-likelihood gain of explaining them as two
//! segments with different means rather than one, compared with
//! `ln(n^1.5 / confidence)`. It is run on blocks of [`BLOCK`] rewards over a window of
//! the last [`WINDOW_BLOCKS`] blocks, so one reward costs a few dozen additions.
//! Bernoulli rewards use the Bernoulli likelihood; real-valued ones a Gaussian with each
//! segment's own variance (Welch's form), so one huge revenue in a short segment does
//! not pass for a change.

use std::collections::VecDeque;

/// Rewards per block: the test runs once per block, at its boundaries.
pub const BLOCK: u32 = 16;
/// Blocks kept (8,192 rewards): a change is found among an arm's latest rewards.
pub const WINDOW_BLOCKS: usize = 512;
/// The fewest blocks on either side of a change (64 rewards): fewer cannot tell a
/// change from luck at the thresholds used.
const MIN_SIDE_BLOCKS: usize = 4;

/// Sufficient statistics of some rewards.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Stats {
    /// How many.
    pub n: f64,
    /// Their sum.
    pub sum: f64,
    /// The sum of their squares.
    pub sum_sq: f64,
}

impl Stats {
    fn add(&mut self, x: f64) {
        self.n += 1.0;
        self.sum += x;
        self.sum_sq += x * x;
    }

    fn plus(self, o: Stats) -> Stats {
        Stats {
            n: self.n + o.n,
            sum: self.sum + o.sum,
            sum_sq: self.sum_sq + o.sum_sq,
        }
    }

    fn minus(self, o: Stats) -> Stats {
        Stats {
            n: self.n - o.n,
            sum: self.sum - o.sum,
            sum_sq: self.sum_sq - o.sum_sq,
        }
    }

    fn mean(&self) -> f64 {
        if self.n > 0.0 {
            self.sum / self.n
        } else {
            0.0
        }
    }

    /// The sample variance.
    fn var(&self) -> f64 {
        let m = self.mean();
        ((self.sum_sq - self.n * m * m) / (self.n - 1.0).max(1.0)).max(0.0)
    }
}

/// The likelihood model of the rewards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// 0/1 rewards.
    Bernoulli,
    /// Real-valued rewards.
    Gaussian,
}

/// One arm's detector.
#[derive(Debug, Clone)]
pub struct ChangeDetector {
    family: Family,
    /// `ln(1 / confidence)`: larger asks for more evidence before a change is declared.
    log_inv_confidence: f64,
    blocks: VecDeque<Stats>,
    current: Stats,
    in_current: u32,
}

/// Bernoulli KL divergence kl(p, q), with both clamped away from 0 and 1.
fn kl_bernoulli(p: f64, q: f64) -> f64 {
    const E: f64 = 1e-12;
    let p = p.clamp(E, 1.0 - E);
    let q = q.clamp(E, 1.0 - E);
    p * (p / q).ln() + (1.0 - p) * ((1.0 - p) / (1.0 - q)).ln()
}

impl ChangeDetector {
    /// A detector whose false alarms are rare: about `confidence` per test sequence by
    /// the bound (far fewer in practice; `bench/bandit.sh` counts them).
    pub fn new(family: Family, confidence: f64) -> Self {
        ChangeDetector {
            family,
            log_inv_confidence: (1.0 / confidence.clamp(1e-12, 1.0)).ln(),
            blocks: VecDeque::with_capacity(WINDOW_BLOCKS),
            current: Stats::default(),
            in_current: 0,
        }
    }

    /// Takes one reward. When it completes a block and the test finds a change, returns
    /// the rewards since the change and forgets those before it.
    pub fn observe(&mut self, reward: f64) -> Option<Stats> {
        if !reward.is_finite() {
            return None;
        }
        self.current.add(reward);
        self.in_current += 1;
        if self.in_current < BLOCK {
            return None;
        }
        if self.blocks.len() == WINDOW_BLOCKS {
            self.blocks.pop_front();
        }
        self.blocks.push_back(std::mem::take(&mut self.current));
        self.in_current = 0;
        let split = self.find_change()?;
        self.blocks.drain(..split);
        Some(self.blocks.iter().fold(Stats::default(), |a, b| a.plus(*b)))
    }

    /// Takes over `from`'s window of rewards (a reload's new bandit from the old one), so
    /// a change that straddles the reload is still found; nothing when the two model
    /// different kinds of reward. The confidence stays this detector's.
    pub fn carry(&mut self, from: &ChangeDetector) {
        if from.family == self.family {
            self.blocks.clone_from(&from.blocks);
            self.current = from.current;
            self.in_current = from.in_current;
        }
    }

    /// Forgets everything (after another arm's change, or a restore).
    pub fn clear(&mut self) {
        self.blocks.clear();
        self.current = Stats::default();
        self.in_current = 0;
    }

    /// The block index where the rewards after it differ most from those before, if
    /// that difference passes the threshold.
    fn find_change(&self) -> Option<usize> {
        let k = self.blocks.len();
        if k < 2 * MIN_SIDE_BLOCKS {
            return None;
        }
        let total = self.blocks.iter().fold(Stats::default(), |a, b| a.plus(*b));
        let threshold = 1.5 * total.n.ln() + self.log_inv_confidence;
        let mut left = Stats::default();
        let mut best: Option<(f64, usize)> = None;
        for (i, b) in self.blocks.iter().enumerate().take(k - MIN_SIDE_BLOCKS) {
            left = left.plus(*b);
            if i + 1 < MIN_SIDE_BLOCKS {
                continue;
            }
            let right = total.minus(left);
            let glr = match self.family {
                Family::Bernoulli => {
                    let m = total.mean();
                    left.n * kl_bernoulli(left.mean(), m) + right.n * kl_bernoulli(right.mean(), m)
                }
                Family::Gaussian => {
                    // Each side's own variance (one huge reward in a short segment
                    // inflates its own variance, not the other's), but never below the
                    // whole window's: 64 rewards without a single conversion have no
                    // variance of their own, and are no change in a 10% world.
                    let floor = total.var().max(1e-12);
                    let d = left.mean() - right.mean();
                    let v = left.var().max(floor) / left.n + right.var().max(floor) / right.n;
                    d * d / (2.0 * v)
                }
            };
            if glr > threshold && best.is_none_or(|(g, _)| glr > g) {
                best = Some((glr, i + 1));
            }
        }
        best.map(|(_, split)| split)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{RngExt, SeedableRng};
    use rand_distr::{Distribution, LogNormal};

    fn bernoulli(d: &mut ChangeDetector, p: f64, n: usize, rng: &mut StdRng) -> Vec<usize> {
        (0..n)
            .filter_map(|i| d.observe(f64::from(rng.random::<f64>() < p)).map(|_| i))
            .collect()
    }

    /// 100,000 rewards of one rate, 20 seeds: no alarm at all. (The bound allows
    /// about 1% per sequence; this is the rate that keeps stationary regret intact.)
    #[test]
    fn a_steady_rate_raises_no_alarm() {
        for seed in 0..20 {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut d = ChangeDetector::new(Family::Bernoulli, 0.01);
            let alarms = bernoulli(&mut d, 0.055, 100_000, &mut rng);
            assert!(alarms.is_empty(), "seed {seed}: alarms at {alarms:?}");
        }
    }

    /// A rate that halves from 10% to 5% after 8,000 rewards is found within 2,000
    /// rewards, and what comes back is mostly the rewards after the change: the split
    /// is placed within 1,024 rewards of the truth (luck moves it), their rate near 5%.
    #[test]
    fn a_halved_rate_is_found_with_the_rewards_after_it() {
        for seed in 0..20 {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut d = ChangeDetector::new(Family::Bernoulli, 0.01);
            assert!(bernoulli(&mut d, 0.10, 8_000, &mut rng).is_empty());
            let mut found = None;
            for i in 0..2_000 {
                if let Some(after) = d.observe(f64::from(rng.random::<f64>() < 0.05)) {
                    found = Some((i, after));
                    break;
                }
            }
            let (at, after) = found.unwrap_or_else(|| panic!("seed {seed}: not found"));
            let rate = after.sum / after.n;
            assert!(
                after.n <= (at + 1) as f64 + 1024.0,
                "seed {seed}: {after:?}"
            );
            assert!((0.02..0.08).contains(&rate), "seed {seed}: rate {rate}");
        }
    }

    /// Heavy-tailed revenue (log-normal, σ 1.5: one reward in a thousand is 100× the
    /// median) raises no alarm in 100,000 rewards; a mean that doubles is found.
    #[test]
    fn heavy_tails_are_not_a_change_but_a_new_mean_is() {
        for seed in 0..10 {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut d = ChangeDetector::new(Family::Gaussian, 0.01);
            let heavy = LogNormal::new(0.0, 1.5).unwrap();
            for i in 0..100_000 {
                assert!(
                    d.observe(heavy.sample(&mut rng)).is_none(),
                    "seed {seed} at {i}"
                );
            }
            let doubled = LogNormal::new(2f64.ln(), 1.5).unwrap();
            let found = (0..4_000).any(|_| d.observe(doubled.sample(&mut rng)).is_some());
            assert!(found, "seed {seed}: a doubled mean was not found");
        }
    }
}
