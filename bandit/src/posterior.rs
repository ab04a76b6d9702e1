//! Posteriors over one variant's reward.

use rand::Rng;
use rand_distr::{Beta, Distribution, Gamma, Normal};

/// What we believe about one variant's expected reward. Serialised (for state files)
/// as `{"kind": "beta" | "gaussian", ...fields}`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Posterior {
    /// Beta–Bernoulli: rewards are 0 or 1. `successes` and `failures` are effective
    /// counts (fractional after decay).
    Beta {
        /// Prior α (pseudo-successes).
        alpha0: f64,
        /// Prior β (pseudo-failures).
        beta0: f64,
        /// Observed successes (decayed).
        successes: f64,
        /// Observed failures (decayed).
        failures: f64,
    },
    /// Normal–Inverse-Gamma: rewards are real numbers with unknown mean and variance.
    /// Kept as decayed sufficient statistics (count, sum, sum of squares).
    Gaussian {
        /// Prior mean.
        mu0: f64,
        /// Prior strength of the mean, in pseudo-observations.
        kappa0: f64,
        /// Prior shape of the variance.
        alpha0: f64,
        /// Prior scale of the variance.
        beta0: f64,
        /// Observations (decayed).
        n: f64,
        /// Σx (decayed).
        sum: f64,
        /// Σx² (decayed).
        sum_sq: f64,
    },
}

impl Posterior {
    /// A Beta–Bernoulli posterior with prior Beta(α, β); `(1, 1)` is uniform.
    pub fn beta(alpha0: f64, beta0: f64) -> Self {
        Posterior::Beta {
            alpha0,
            beta0,
            successes: 0.0,
            failures: 0.0,
        }
    }

    /// A Normal–Inverse-Gamma posterior with prior mean `mu0` worth `kappa0`
    /// observations and an Inverse-Gamma(`alpha0`, `beta0`) prior on the variance.
    pub fn gaussian(mu0: f64, kappa0: f64, alpha0: f64, beta0: f64) -> Self {
        Posterior::Gaussian {
            mu0,
            kappa0,
            alpha0,
            beta0,
            n: 0.0,
            sum: 0.0,
            sum_sq: 0.0,
        }
    }

    /// Adds one reward. For `Beta`, any reward above 0.5 counts as a success (the
    /// objective only ever passes 0 or 1).
    pub fn observe(&mut self, reward: f64) {
        match self {
            Posterior::Beta {
                successes,
                failures,
                ..
            } => {
                if reward > 0.5 {
                    *successes += 1.0;
                } else {
                    *failures += 1.0;
                }
            }
            Posterior::Gaussian { n, sum, sum_sq, .. } => {
                *n += 1.0;
                *sum += reward;
                *sum_sq += reward * reward;
            }
        }
    }

    /// Multiplies the evidence by `factor` in (0, 1]: older observations weigh less.
    /// With a half-life of `h` observations, call it with `0.5^(1/h)` before each one.
    pub fn decay(&mut self, factor: f64) {
        let f = factor.clamp(0.0, 1.0);
        match self {
            Posterior::Beta {
                successes,
                failures,
                ..
            } => {
                *successes *= f;
                *failures *= f;
            }
            Posterior::Gaussian { n, sum, sum_sq, .. } => {
                *n *= f;
                *sum *= f;
                *sum_sq *= f;
            }
        }
    }

    /// The likelihood its rewards follow, for change detection.
    pub fn family(&self) -> crate::detect::Family {
        match self {
            Posterior::Beta { .. } => crate::detect::Family::Bernoulli,
            Posterior::Gaussian { .. } => crate::detect::Family::Gaussian,
        }
    }

    /// Replaces the evidence with `stats` (rewards as the detector saw them: 0/1 for
    /// `Beta`), keeping the prior: what is known after a change.
    pub fn reset_to(&mut self, stats: crate::detect::Stats) {
        match self {
            Posterior::Beta {
                successes,
                failures,
                ..
            } => {
                *successes = stats.sum.max(0.0);
                *failures = (stats.n - stats.sum).max(0.0);
            }
            Posterior::Gaussian { n, sum, sum_sq, .. } => {
                *n = stats.n;
                *sum = stats.sum;
                *sum_sq = stats.sum_sq;
            }
        }
    }

    /// The evidence as three numbers that add up across replicas (fleet mode):
    /// `[successes, failures, 0]` or `[n, Σx, Σx²]`. The prior is not in it.
    pub fn evidence(&self) -> [f64; 3] {
        match *self {
            Posterior::Beta {
                successes,
                failures,
                ..
            } => [successes, failures, 0.0],
            Posterior::Gaussian { n, sum, sum_sq, .. } => [n, sum, sum_sq],
        }
    }

    /// The same prior with `e` (see [`Posterior::evidence`]) as its evidence. Counts and
    /// Σx² below zero (sums of deltas rounded, or a fleet's total shrunk by a change
    /// found elsewhere) are taken as zero.
    pub fn with_evidence(&self, e: [f64; 3]) -> Posterior {
        let pos = |x: f64| if x.is_finite() { x.max(0.0) } else { 0.0 };
        let mut p = self.clone();
        match &mut p {
            Posterior::Beta {
                successes,
                failures,
                ..
            } => {
                *successes = pos(e[0]);
                *failures = pos(e[1]);
            }
            Posterior::Gaussian { n, sum, sum_sq, .. } => {
                *n = pos(e[0]);
                *sum = if e[1].is_finite() && *n > 0.0 {
                    e[1]
                } else {
                    0.0
                };
                *sum_sq = pos(e[2]);
            }
        }
        p
    }

    /// Effective number of observations.
    pub fn count(&self) -> f64 {
        match self {
            Posterior::Beta {
                successes,
                failures,
                ..
            } => successes + failures,
            Posterior::Gaussian { n, .. } => *n,
        }
    }

    /// Posterior parameters of the Gaussian case: (μₙ, κₙ, αₙ, βₙ).
    fn nig(&self) -> Option<(f64, f64, f64, f64)> {
        let Posterior::Gaussian {
            mu0,
            kappa0,
            alpha0,
            beta0,
            n,
            sum,
            sum_sq,
        } = *self
        else {
            return None;
        };
        let mean = if n > 0.0 { sum / n } else { 0.0 };
        let ss = (sum_sq - n * mean * mean).max(0.0);
        let kappa = kappa0 + n;
        let mu = (kappa0 * mu0 + sum) / kappa;
        let alpha = alpha0 + n / 2.0;
        let beta = beta0 + 0.5 * ss + kappa0 * n * (mean - mu0).powi(2) / (2.0 * kappa);
        Some((mu, kappa, alpha, beta))
    }

    /// The posterior mean of the expected reward.
    pub fn mean(&self) -> f64 {
        match self {
            Posterior::Beta {
                alpha0,
                beta0,
                successes,
                failures,
            } => (alpha0 + successes) / (alpha0 + beta0 + successes + failures),
            Posterior::Gaussian { .. } => self.nig().map_or(0.0, |(mu, ..)| mu),
        }
    }

    /// A central credible interval for the expected reward at about 95%, from the
    /// normal approximation to the posterior (Beta: its mean and standard deviation;
    /// Gaussian: the Student-t marginal of the mean, treated as normal).
    pub fn credible_interval(&self) -> (f64, f64) {
        const Z: f64 = 1.959_963_985;
        match self {
            Posterior::Beta {
                alpha0,
                beta0,
                successes,
                failures,
            } => {
                let (a, b) = (alpha0 + successes, beta0 + failures);
                let sd = (a * b / ((a + b).powi(2) * (a + b + 1.0))).sqrt();
                let m = a / (a + b);
                ((m - Z * sd).max(0.0), (m + Z * sd).min(1.0))
            }
            Posterior::Gaussian { .. } => match self.nig() {
                Some((mu, kappa, alpha, beta)) => {
                    let scale = (beta / (alpha * kappa)).sqrt();
                    (mu - Z * scale, mu + Z * scale)
                }
                None => (0.0, 0.0),
            },
        }
    }

    /// One draw of the expected reward from the posterior (the heart of Thompson
    /// sampling).
    pub fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> f64 {
        self.sample_with_floor(rng, 0.0)
    }

    /// The within-arm variance of the rewards, summed over `arms` (Gaussian ones with at
    /// least two observations): what [`Posterior::sample_with_floor`] takes.
    pub fn pooled_variance(arms: &[Posterior]) -> f64 {
        let (mut ss, mut n) = (0.0, 0.0);
        for arm in arms {
            if let Posterior::Gaussian {
                n: k, sum, sum_sq, ..
            } = *arm
            {
                if k >= 2.0 {
                    ss += (sum_sq - sum * sum / k).max(0.0);
                    n += k - 1.0;
                }
            }
        }
        if n > 0.0 {
            ss / n
        } else {
            0.0
        }
    }

    /// As [`Posterior::sample`], with the reward's variance drawn no lower than
    /// `var_floor` (Gaussian only). Why: with heavy-tailed rewards (order values, one in
    /// a hundred ten times the median) an arm's first few hundred rewards usually lack
    /// the rare large ones, so its own variance is underestimated, its posterior too
    /// narrow, and an unlucky start was never looked at again (2 seeds of 10 in the
    /// heavy-tailed profit world). The arms' pooled variance, from all the traffic, is
    /// the floor [`crate::policy::thompson_pick`] passes.
    pub fn sample_with_floor<R: Rng + ?Sized>(&self, rng: &mut R, var_floor: f64) -> f64 {
        match self {
            Posterior::Beta {
                alpha0,
                beta0,
                successes,
                failures,
            } => Beta::new(alpha0 + successes, beta0 + failures)
                .map_or_else(|_| self.mean(), |d| d.sample(rng)),
            Posterior::Gaussian { .. } => {
                let Some((mu, kappa, alpha, beta)) = self.nig() else {
                    return 0.0;
                };
                // σ² ~ Inverse-Gamma(α, β), i.e. 1 / Gamma(α, scale 1/β); μ ~ N(μₙ, σ²/κₙ).
                let precision = Gamma::new(alpha, 1.0 / beta).map_or(1.0, |g| g.sample(rng));
                let variance = (1.0 / precision.max(1e-300)).max(var_floor);
                let sd = (variance / kappa).sqrt();
                Normal::new(mu, sd).map_or(mu, |n| n.sample(rng))
            }
        }
    }
}

#[cfg(test)]
mod tests {

    /// Rewards seen by two replicas, added as evidence, give the posterior one replica
    /// seeing them all would have: what fleet mode relies on.
    #[test]
    fn evidence_adds_across_replicas() {
        for prior in [
            Posterior::beta(1.0, 1.0),
            Posterior::gaussian(0.0, 1.0, 2.0, 2.0),
        ] {
            let (mut one, mut a, mut b) = (prior.clone(), prior.clone(), prior.clone());
            for i in 0..100 {
                let r = if i % 3 == 0 {
                    1.0
                } else {
                    0.25 * f64::from(i % 5)
                };
                one.observe(r);
                if i % 2 == 0 {
                    a.observe(r)
                } else {
                    b.observe(r)
                }
            }
            let (ea, eb) = (a.evidence(), b.evidence());
            let merged = prior.with_evidence([ea[0] + eb[0], ea[1] + eb[1], ea[2] + eb[2]]);
            assert!((merged.mean() - one.mean()).abs() < 1e-12);
            assert_eq!(merged.count(), one.count());
            // A total driven below zero by rounding is no evidence, not negative evidence.
            assert_eq!(prior.with_evidence([-1e-9, -2.0, -3.0]).count(), 0.0);
        }
    }

    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn beta_mean_is_the_conjugate_update() {
        let mut p = Posterior::beta(1.0, 1.0);
        for i in 0..100 {
            p.observe(if i < 30 { 1.0 } else { 0.0 });
        }
        // Beta(1 + 30, 1 + 70): mean 31/102, exactly.
        assert!((p.mean() - 31.0 / 102.0).abs() < 1e-12);
        let (lo, hi) = p.credible_interval();
        assert!(lo < 0.3 && 0.3 < hi && hi - lo < 0.2);
    }

    #[test]
    fn gaussian_mean_shrinks_to_the_prior_by_kappa() {
        let mut p = Posterior::gaussian(0.0, 4.0, 2.0, 2.0);
        for _ in 0..12 {
            p.observe(2.0);
        }
        // μₙ = (κ₀μ₀ + Σx) / (κ₀ + n) = 24 / 16.
        assert!((p.mean() - 1.5).abs() < 1e-12);
    }

    /// Draws follow the posterior: their average is the posterior mean within
    /// 5 standard errors (seeded, so it fails never or always).
    #[test]
    fn samples_average_to_the_posterior_mean() {
        let mut rng = StdRng::seed_from_u64(11);
        let mut b = Posterior::beta(2.0, 5.0);
        let mut g = Posterior::gaussian(1.0, 1.0, 3.0, 3.0);
        for i in 0..50 {
            b.observe(f64::from(i % 3 == 0));
            g.observe(f64::from(i % 7) - 2.0);
        }
        for p in [b, g] {
            let draws: Vec<f64> = (0..20_000).map(|_| p.sample(&mut rng)).collect();
            let m = draws.iter().sum::<f64>() / draws.len() as f64;
            let sd =
                (draws.iter().map(|d| (d - m).powi(2)).sum::<f64>() / draws.len() as f64).sqrt();
            let se = sd / (draws.len() as f64).sqrt();
            assert!((m - p.mean()).abs() < 5.0 * se, "{m} vs {}", p.mean());
        }
    }

    #[test]
    fn decay_forgets_old_evidence() {
        let mut p = Posterior::beta(1.0, 1.0);
        for _ in 0..1000 {
            p.observe(1.0);
        }
        let factor = 0.5f64.powf(1.0 / 100.0); // half-life 100 observations
        for _ in 0..1000 {
            p.decay(factor);
            p.observe(0.0);
        }
        // After ten half-lives the early successes weigh ~1/1024 of what they did.
        assert!(p.mean() < 0.02, "{}", p.mean());
        assert!(p.count() < 200.0);
    }
}
